//! The L1 table: one 64-bit entry per L2 table, contiguous on disk.

use super::error::{corrupt, ErrorKind};
use super::storage::{read_exact, read_zero_padded, Storage};
use byteorder::{BigEndian, ByteOrder};

/// Bits 9..55 of an L1 entry: the L2 table's host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the L2 table's refcount is exactly 1 (active L1 only).
pub const COPIED: u64 = 1 << 63;
/// Bits 0..8 and 56..62: reserved, must be zero (`check` reports them; reads ignore them).
pub const RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;

/// One L1 table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// Host offset of the L2 table, 0 when unallocated.
    pub fn l2_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }

    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }

    /// The L2 table offset, checked: `None` when unallocated, an error when unaligned or when
    /// the table would lie past the end of the file.
    pub fn checked_l2_offset(
        self,
        index: usize,
        cluster_size: u64,
        file_len: u64,
    ) -> Result<Option<u64>, ErrorKind> {
        let off = self.l2_offset();
        if off == 0 {
            return Ok(None);
        }
        if off % cluster_size != 0 {
            return Err(corrupt(format!(
                "L2 table offset {off:#x} is not cluster aligned (L1 index {index})"
            )));
        }
        if off + cluster_size > file_len {
            return Err(corrupt(format!(
                "L2 table at {off:#x} (L1 index {index}) lies past the end of the file ({file_len} bytes)"
            )));
        }
        Ok(Some(off))
    }
}

/// Reads an L1 table of `entries` entries at `offset`.
pub fn read_table(
    storage: &dyn Storage,
    offset: u64,
    entries: u32,
) -> Result<Vec<L1Entry>, ErrorKind> {
    let mut bytes = vec![0u8; entries as usize * 8];
    read_exact(storage, &mut bytes, offset, "L1 table")?;
    Ok(decode(&bytes))
}

/// Reads an L1 table as QEMU reads one the reader refuses, for `check` (which reports the
/// table's end separately): entries past the end of the file read as zeros, unallocated, so
/// the table returned stops at the last entry the file holds. A table that claims to lie past
/// the end costs no memory.
pub fn read_table_for_check(
    storage: &dyn Storage,
    offset: u64,
    entries: u32,
) -> std::io::Result<Vec<L1Entry>> {
    let inside = storage.size()?.saturating_sub(offset).div_ceil(8);
    let mut bytes = vec![0u8; inside.min(entries as u64) as usize * 8];
    read_zero_padded(storage, &mut bytes, offset)?;
    Ok(decode(&bytes))
}

fn decode(bytes: &[u8]) -> Vec<L1Entry> {
    bytes
        .chunks_exact(8)
        .map(|c| L1Entry(BigEndian::read_u64(c)))
        .collect()
}

/// Checks that no two entries of one L1 table point to the same L2 table. A valid image never
/// does that, and a hostile one could otherwise make a small file describe an enormous,
/// slow-to-walk mapping.
pub fn check_distinct(table: &[L1Entry]) -> Result<(), ErrorKind> {
    let mut offsets: Vec<(u64, usize)> = table
        .iter()
        .enumerate()
        .filter(|(_, e)| e.l2_offset() != 0)
        .map(|(i, e)| (e.l2_offset(), i))
        .collect();
    offsets.sort_unstable();
    for w in offsets.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(corrupt(format!(
                "L1 entries {} and {} both point to the L2 table at {:#x}",
                w[0].1, w[1].1, w[0].0
            )));
        }
    }
    Ok(())
}

/// Serialises an L1 table.
pub fn to_bytes(table: &[L1Entry]) -> Vec<u8> {
    table.iter().flat_map(|e| e.0.to_be_bytes()).collect()
}
