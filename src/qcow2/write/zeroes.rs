//! Zero writes and discards: L2 entries changed without touching data (zero flags, or
//! unallocated where nothing below shows through), down to subclusters on extended L2.

use super::Writer;
use crate::qcow2::error::Result;
use crate::qcow2::l2::{self, L2Entry};

impl Writer {
    /// Makes `[offset, offset + len)` read as zeros: whole clusters (or subclusters) become
    /// zero entries and release their data; partial ones are written with zeros. Version 2
    /// images have no zero flag: there whole clusters are unallocated when nothing lies
    /// beneath, and written with zeros otherwise.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.set_range(offset, len, true)
    }

    /// Drops `[offset, offset + len)`: whole clusters (subclusters) become unallocated, so they
    /// read from the backing file again (or as zeros without one); partial ones are untouched.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.set_range(offset, len, false)
    }

    fn set_range(&mut self, offset: u64, len: u64, zero: bool) -> Result<()> {
        self.check_range(offset, len)?;
        self.prepare()?;
        let unit = self.fmt.unit_size();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let gc = pos / self.cs;
            let cluster_end = ((gc + 1) * self.cs).min(end);
            let a = pos.div_ceil(unit) * unit;
            let b = (cluster_end / unit) * unit;
            if zero {
                // Partial units at either end get real zeros.
                for (s, e) in [(pos, a.min(cluster_end)), (b.max(a).max(pos), cluster_end)] {
                    if e > s {
                        self.write_at(&vec![0u8; (e - s) as usize], s)?;
                    }
                }
            }
            if b > a {
                self.set_units(gc, a, b, zero)?;
            }
            pos = cluster_end;
            self.maybe_flush()?;
        }
        Ok(())
    }

    /// Whole units `[a, b)` of guest cluster `gc` become zero (or unallocated).
    fn set_units(&mut self, gc: u64, a: u64, b: u64, zero: bool) -> Result<()> {
        let (table, e) = self.entry(gc)?;
        if self.fmt.extended {
            let sub = self.fmt.unit_size();
            let first = (a - gc * self.cs) / sub;
            let last = (b - gc * self.cs) / sub;
            let mask: u64 = (first..last).fold(0, |m, s| m | (1 << s));
            if e.is_compressed() {
                // Compressed clusters have no subclusters: decompress, then zero the range.
                let mut full = vec![0u8; self.cs as usize];
                self.read_current(&mut full, gc * self.cs)?;
                full[(first * sub) as usize..(last * sub) as usize].fill(0);
                return self.write_in_cluster(gc, 0, &full);
            }
            let mut bitmap = e.bitmap & !mask;
            bitmap = if zero {
                bitmap | (mask << 32)
            } else {
                bitmap & !(mask << 32)
            };
            let mut word = e.word;
            if bitmap as u32 == 0
                && (e.host_offset() != 0 || self.data.is_some() && e.word & l2::COPIED != 0)
            {
                // No subcluster uses the host cluster any more.
                self.release(&e);
                word = 0;
            }
            self.set_entry(table, gc, L2Entry { word, bitmap });
            return Ok(());
        }
        let whole = a == gc * self.cs && b == (gc + 1) * self.cs;
        debug_assert!(whole);
        let version2 = self.header.version < 3;
        if zero && version2 && self.backing.is_some() {
            return self.write_in_cluster(gc, 0, &vec![0u8; self.cs as usize]);
        }
        self.release(&e);
        let word = if zero && !version2 { l2::ZERO } else { 0 };
        self.set_entry(table, gc, L2Entry { word, bitmap: 0 });
        Ok(())
    }
}
