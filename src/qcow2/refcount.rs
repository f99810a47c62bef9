//! Refcount table and refcount blocks: how many references each host cluster has.
//!
//! Refcounts are 1 to 64 bits wide (`refcount_order` 0..6). Widths of 8 bits and more are
//! big-endian; narrower ones are packed least significant bits first within each byte.

use super::error::{corrupt, ErrorKind};
use super::storage::{read_exact, read_zero_padded, Storage};
use byteorder::{BigEndian, ByteOrder};

/// Bits 9..63 of a refcount table entry: the refcount block's offset.
pub const OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Why an image without a refcount table is refused (and what `check` reports of it).
pub const NO_TABLE: &str = "the image does not contain a reference count table";
/// Bits 0..8 of a refcount table entry: reserved, must be zero.
pub const RESERVED_MASK: u64 = 0x1ff;

/// Geometry of the two-level refcount structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountFormat {
    pub cluster_bits: u32,
    pub order: u32,
}

impl RefcountFormat {
    pub fn bits(&self) -> u32 {
        1 << self.order
    }

    /// Refcount entries in one refcount block.
    pub fn block_entries(&self) -> u64 {
        (1u64 << self.cluster_bits) * 8 / self.bits() as u64
    }

    /// (table index, index in block) of a host cluster number.
    pub fn locate(&self, cluster: u64) -> (u64, u64) {
        (
            cluster / self.block_entries(),
            cluster % self.block_entries(),
        )
    }

    /// The largest refcount this width can hold.
    pub fn max_value(&self) -> u64 {
        if self.bits() == 64 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }
}

/// Reads entry `index` of a refcount block.
pub fn get(block: &[u8], index: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    match bits {
        1 | 2 | 4 => {
            let bit = index * bits;
            let byte = block[(bit / 8) as usize];
            ((byte >> (bit % 8)) as u64) & ((1 << bits) - 1)
        }
        8 => block[index as usize] as u64,
        16 => BigEndian::read_u16(&block[index as usize * 2..]) as u64,
        32 => BigEndian::read_u32(&block[index as usize * 4..]) as u64,
        _ => BigEndian::read_u64(&block[index as usize * 8..]),
    }
}

/// Writes entry `index` of a refcount block; `value` must fit the width.
pub fn set(block: &mut [u8], index: u64, order: u32, value: u64) {
    let bits = 1u64 << order;
    match bits {
        1 | 2 | 4 => {
            let bit = index * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            let b = &mut block[(bit / 8) as usize];
            *b = (*b & !mask) | (((value as u8) << (bit % 8)) & mask);
        }
        8 => block[index as usize] = value as u8,
        16 => BigEndian::write_u16(&mut block[index as usize * 2..], value as u16),
        32 => BigEndian::write_u32(&mut block[index as usize * 4..], value as u32),
        _ => BigEndian::write_u64(&mut block[index as usize * 8..], value),
    }
}

/// Reads the refcount table (`clusters` clusters at `offset`) as its raw entries.
fn read_entries(
    storage: &dyn Storage,
    offset: u64,
    clusters: u32,
    cluster_bits: u32,
) -> Result<Vec<u64>, ErrorKind> {
    let mut bytes = vec![0u8; (clusters as usize) << cluster_bits];
    read_exact(storage, &mut bytes, offset, "refcount table")?;
    Ok(bytes.chunks_exact(8).map(BigEndian::read_u64).collect())
}

/// Reads the refcount table's raw entries for `check`, which judges each entry itself, as
/// QEMU reads them: entries past the end of the file read as zeros (check reports the table's
/// end separately).
pub fn read_entries_padded(
    storage: &dyn Storage,
    offset: u64,
    clusters: u32,
    cluster_bits: u32,
) -> std::io::Result<Vec<u64>> {
    let mut bytes = vec![0u8; (clusters as usize) << cluster_bits];
    read_zero_padded(storage, &mut bytes, offset)?;
    Ok(bytes.chunks_exact(8).map(BigEndian::read_u64).collect())
}

/// Why the reader refuses the refcount block at `block` (non-zero) of a file of `file_len`
/// bytes: unaligned, or not wholly inside the file.
pub fn block_refusal(block: u64, cluster_size: u64, file_len: u64) -> Option<String> {
    (block % cluster_size != 0 || block.saturating_add(cluster_size) > file_len)
        .then(|| format!("refcount block at {block:#x} is unaligned or past the end of the file"))
}

/// Reads the refcount table as block offsets, refusing blocks that are not cluster aligned.
pub fn read_table(
    storage: &dyn Storage,
    offset: u64,
    clusters: u32,
    cluster_bits: u32,
) -> Result<Vec<u64>, ErrorKind> {
    let cs = 1u64 << cluster_bits;
    read_entries(storage, offset, clusters, cluster_bits)?
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let off = e & OFFSET_MASK;
            if off % cs != 0 {
                return Err(corrupt(format!(
                    "refcount block offset {off:#x} (refcount table index {i}) is not cluster aligned"
                )));
            }
            Ok(off)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips() {
        for order in 0..=6 {
            let f = RefcountFormat {
                cluster_bits: 9,
                order,
            };
            let mut block = vec![0u8; 512];
            let n = f.block_entries();
            for i in 0..n {
                set(&mut block, i, order, (i * 7 + 3) & f.max_value());
            }
            for i in 0..n {
                assert_eq!(get(&block, i, order), (i * 7 + 3) & f.max_value());
            }
        }
    }

    #[test]
    fn narrow_widths_pack_lsb_first() {
        let mut block = vec![0u8; 4];
        set(&mut block, 0, 0, 1);
        assert_eq!(block[0], 0x01);
        set(&mut block, 1, 2, 0xa);
        assert_eq!(block[0], 0xa1);
    }
}
