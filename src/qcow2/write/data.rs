//! Guest data written in place: into clusters the image owns alone (refcount 1), or into
//! new clusters allocated in runs, with copy-on-write of partial clusters (and subclusters
//! of extended L2 images) from the current content or the backing chain.

use super::Writer;
use crate::qcow2::error::{ErrorKind, Result};
use crate::qcow2::fault::copy_range;
use crate::qcow2::l2::{self, L2Entry};
use crate::qcow2::storage::read_zero_padded;
use std::fs::File;

impl Writer {
    /// Writes `buf` at guest offset `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.prepare()?;
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let gc = off / self.cs;
            let within = (off % self.cs) as usize;
            let whole = (buf.len() - pos) / self.cs as usize;
            if within == 0 && whole > 1 && !self.fmt.extended {
                let n = self.write_fresh_run(gc, &buf[pos..pos + whole * self.cs as usize])?;
                if n > 0 {
                    pos += n as usize * self.cs as usize;
                    self.maybe_flush()?;
                    continue;
                }
            }
            let n = (self.cs as usize - within).min(buf.len() - pos);
            self.write_in_cluster(gc, within, &buf[pos..pos + n])?;
            pos += n;
            self.maybe_flush()?;
        }
        Ok(())
    }

    /// Writes `len` bytes of `src` (from `src_off`) at guest offset `guest`, copying inside the
    /// kernel where the target clusters are unallocated (a fresh image: convert, merge) or ours
    /// alone (commit into a FULL), and through memory otherwise.
    pub fn copy_from(&mut self, src: &File, src_off: u64, guest: u64, len: u64) -> Result<()> {
        self.check_range(guest, len)?;
        self.prepare()?;
        let cs = self.cs;
        let mut done = 0;
        while done < len {
            let at = guest + done;
            // Encrypted data is never copied as stored: it goes through memory (and the
            // cipher).
            let whole = if at % cs == 0 && !self.encrypted() {
                (len - done) / cs
            } else {
                0
            };
            if let Some((table, n)) = self.fresh_run(at / cs, whole)? {
                let host = self.alloc_run(at / cs, n)?;
                let (path, dst) = self.data_target();
                copy_range(src, src_off + done, dst, host, n * cs)
                    .map_err(|e| ErrorKind::Io(e).at(path))?;
                self.map_run(table, at / cs, host, n);
                done += n * cs;
            } else if let Some((host, n)) = self.owned_run(at / cs, whole)? {
                // Clusters that are ours alone are overwritten in place, also in the kernel.
                let (path, dst) = self.data_target();
                copy_range(src, src_off + done, dst, host, n * cs)
                    .map_err(|e| ErrorKind::Io(e).at(path))?;
                done += n * cs;
            } else {
                let n = (len - done).min(cs - at % cs);
                let mut buf = vec![0u8; n as usize];
                read_zero_padded(src, &mut buf, src_off + done).map_err(|e| self.at(e.into()))?;
                self.write_at(&buf, at)?;
                done += n;
            }
            self.maybe_flush()?;
        }
        Ok(())
    }

    /// Up to `max` whole clusters from `gc` that can be overwritten in place (allocated, not
    /// zero-flagged, ours alone) and lie back to back on the host: (first host offset, count).
    fn owned_run(&mut self, gc: u64, max: u64) -> Result<Option<(u64, u64)>> {
        if self.fmt.extended {
            return Ok(None);
        }
        let mut first = 0;
        let mut n = 0;
        while n < max {
            let (_, e) = self.entry(gc + n)?;
            if e.word & l2::ZERO != 0 || !self.owned(&e)? {
                break;
            }
            let host = e.host_offset();
            if n == 0 {
                first = host;
            } else if host != first + n * self.cs {
                break;
            }
            n += 1;
        }
        Ok((n > 0).then_some((first, n)))
    }

    /// The fast path for filling unallocated space (a fresh image, a convert, a merge): a run
    /// of whole clusters from `gc` that are all unallocated gets one contiguous allocation and
    /// one write. Returns how many clusters it wrote (0: not applicable here).
    fn write_fresh_run(&mut self, gc: u64, data: &[u8]) -> Result<u64> {
        let Some((table, n)) = self.fresh_run(gc, data.len() as u64 / self.cs)? else {
            return Ok(0);
        };
        if n < 2 {
            return Ok(0);
        }
        let host = self.alloc_run(gc, n)?;
        self.write_host(&data[..(n * self.cs) as usize], host)?;
        self.map_run(table, gc, host, n);
        Ok(n)
    }

    /// How many of the (at most `max`) guest clusters from `gc`, within one L2 table, are
    /// unallocated (standard L2 only), with that table made writable; `None` if none.
    fn fresh_run(&mut self, gc: u64, max: u64) -> Result<Option<(u64, u64)>> {
        if max == 0 || self.fmt.extended {
            return Ok(None);
        }
        let per = self.fmt.entries_per_table();
        let table = self.writable_table(gc)?;
        let first = (gc % per) as usize;
        let slot = &self.l2[&table];
        let n = (0..max.min(per - gc % per) as usize)
            .take_while(|&i| slot.table.entry(first + i) == L2Entry::default())
            .count() as u64;
        Ok((n > 0).then_some((table, n)))
    }

    /// Host clusters for `n` guest clusters from `gc`: contiguous, 1:1 in a data file.
    fn alloc_run(&mut self, gc: u64, n: u64) -> Result<u64> {
        match self.data {
            Some(_) => Ok(gc * self.cs),
            None => self.refs.alloc(&self.file, n).map_err(|k| self.at(k)),
        }
    }

    /// Maps `n` guest clusters from `gc` to the host run at `host`.
    fn map_run(&mut self, table: u64, gc: u64, host: u64, n: u64) {
        for i in 0..n {
            let word = l2::COPIED | (host + i * self.cs);
            self.set_entry(table, gc + i, L2Entry { word, bitmap: 0 });
        }
    }

    pub(super) fn write_in_cluster(&mut self, gc: u64, within: usize, data: &[u8]) -> Result<()> {
        let (table, e) = self.entry(gc)?;
        if self.fmt.extended {
            return self.write_subclusters(table, gc, e, within, data);
        }
        let zero_flag = e.word & l2::ZERO != 0;
        if !zero_flag && self.owned(&e)? {
            self.write_host(data, e.host_offset() + within as u64)?;
            return Ok(());
        }
        // Copy on write: a whole new cluster holding the old content around the new data.
        self.copy_on_write(table, gc, &e, within, data, 0)
    }

    /// Gives guest cluster `gc` a new host cluster holding its current content with `data`
    /// laid over it at `within`, and releases the old one (after the next flush).
    fn copy_on_write(
        &mut self,
        table: u64,
        gc: u64,
        old: &L2Entry,
        within: usize,
        data: &[u8],
        bitmap: u64,
    ) -> Result<()> {
        let cs = self.cs as usize;
        let host = self.new_cluster(gc)?;
        if data.len() == cs {
            self.write_host(data, host)?;
        } else {
            let mut full = vec![0u8; cs];
            self.read_current(&mut full, gc * self.cs)?;
            full[within..within + data.len()].copy_from_slice(data);
            self.write_host(&full, host)?;
        }
        self.release(old);
        self.set_entry(
            table,
            gc,
            L2Entry {
                word: l2::COPIED | host,
                bitmap,
            },
        );
        Ok(())
    }

    /// Extended L2: only the subclusters a write touches are filled (partial ones completed
    /// from their current content) and marked allocated.
    fn write_subclusters(
        &mut self,
        table: u64,
        gc: u64,
        e: L2Entry,
        within: usize,
        data: &[u8],
    ) -> Result<()> {
        let cs = self.cs as usize;
        let sub = cs / l2::SUBCLUSTERS as usize;
        let cluster_off = gc * self.cs;
        let first = within / sub;
        let last = (within + data.len() - 1) / sub;
        let (lo, hi) = (first * sub, (last + 1) * sub);
        let mut span = vec![0u8; hi - lo];
        if within != lo || within + data.len() != hi {
            self.read_current(&mut span, cluster_off + lo as u64)?;
        }
        span[within - lo..within - lo + data.len()].copy_from_slice(data);
        let mask: u32 = (first..=last).fold(0, |m, s| m | (1 << s));
        let has_host = e.host_offset() != 0 || (self.data.is_some() && e.word & l2::COPIED != 0);
        if has_host && self.owned(&e)? {
            self.write_host(&span, e.host_offset() + lo as u64)?;
            let bitmap = (e.bitmap | mask as u64) & !((mask as u64) << 32);
            self.set_entry(
                table,
                gc,
                L2Entry {
                    word: e.word,
                    bitmap,
                },
            );
            return Ok(());
        }
        if !e.is_compressed() && !has_host {
            let host = self.new_cluster(gc)?;
            self.write_host(&span, host + lo as u64)?;
            let zero = (e.bitmap >> 32) as u32 & !mask;
            self.set_entry(
                table,
                gc,
                L2Entry {
                    word: l2::COPIED | host,
                    bitmap: ((zero as u64) << 32) | mask as u64,
                },
            );
            return Ok(());
        }
        // Compressed or shared: copy the whole cluster.
        self.copy_on_write(table, gc, &e, lo, &span, 0xffff_ffff)
    }
}
