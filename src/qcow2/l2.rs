//! L2 tables and the classification of their entries.
//!
//! An L2 entry maps one guest cluster. Standard entries are 64 bits; with extended L2
//! (incompatible bit 4) each entry carries a second word, a bitmap of 32 subclusters that are
//! each allocated, zero, or unallocated. The classification follows QEMU's
//! `qcow2_get_subcluster_type` exactly, because map output and reads must agree with it.

use super::error::{corrupt, ErrorKind};
use super::header::Header;

pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard descriptor: reads as zeros (never used with extended L2).
pub const ZERO: u64 = 1;
/// Bits 1..8 and 56..61 of a standard descriptor: reserved, must be zero (`check` reports
/// them; reads ignore them, as QEMU's do).
pub const STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Subclusters per cluster with extended L2.
pub const SUBCLUSTERS: u32 = 32;

/// What a reader needs to interpret L2 entries of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Format {
    pub cluster_bits: u32,
    pub extended: bool,
    /// With an external data file, offset 0 plus COPIED is a valid mapping.
    pub external_data: bool,
}

impl L2Format {
    pub fn of(header: &Header) -> L2Format {
        L2Format {
            cluster_bits: header.cluster_bits,
            extended: header.extended_l2(),
            external_data: header.has_data_file(),
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes one classification unit covers: a subcluster or a whole cluster.
    pub fn unit_size(&self) -> u64 {
        if self.extended {
            self.cluster_size() / SUBCLUSTERS as u64
        } else {
            self.cluster_size()
        }
    }

    pub fn units_per_cluster(&self) -> u32 {
        if self.extended {
            SUBCLUSTERS
        } else {
            1
        }
    }

    pub fn entries_per_table(&self) -> u64 {
        self.cluster_size() / if self.extended { 16 } else { 8 }
    }
}

/// Where a compressed cluster's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host byte offset of the compressed stream (not aligned).
    pub offset: u64,
    /// Upper bound of the stream length: whole 512-byte sectors, minus the offset into the
    /// first. The stream may be shorter; the last cluster of a file may reach past its end.
    pub max_len: u64,
}

impl CompressedDescriptor {
    pub fn decode(word: u64, cluster_bits: u32) -> CompressedDescriptor {
        let shift = 62 - (cluster_bits - 8);
        let sectors_mask = (1u64 << (cluster_bits - 8)) - 1;
        let offset = word & ((1u64 << shift) - 1);
        let sectors = ((word >> shift) & sectors_mask) + 1;
        CompressedDescriptor {
            offset,
            max_len: sectors * 512 - (offset & 511),
        }
    }

    /// The L2 word for `len` compressed bytes at `offset`.
    pub fn encode(offset: u64, len: u64, cluster_bits: u32) -> u64 {
        let shift = 62 - (cluster_bits - 8);
        let additional = ((offset + len - 1) >> 9) - (offset >> 9);
        COMPRESSED | (additional << shift) | offset
    }
}

/// The state of one subcluster (or of a cluster, without extended L2), as QEMU names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subcluster {
    /// Data at this host offset (of the subcluster itself).
    Normal(u64),
    /// Reads as zeros; no host cluster.
    ZeroPlain,
    /// Reads as zeros; a host cluster is allocated (preallocation), subcluster offset given.
    ZeroAlloc(u64),
    /// Not allocated here: read the backing file (or zeros).
    UnallocatedPlain,
    /// Not allocated here although the cluster has a host cluster (extended L2 only).
    UnallocatedAlloc(u64),
    /// The whole cluster is compressed.
    Compressed(CompressedDescriptor),
}

/// One L2 entry: the descriptor word and, with extended L2, the subcluster bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry {
    pub word: u64,
    pub bitmap: u64,
}

impl L2Entry {
    pub fn host_offset(&self) -> u64 {
        self.word & OFFSET_MASK
    }

    pub fn is_compressed(&self) -> bool {
        self.word & COMPRESSED != 0
    }

    /// Classifies subcluster `sub` (0 without extended L2).
    pub fn classify(&self, f: &L2Format, sub: u32) -> Result<Subcluster, ErrorKind> {
        let w = self.word;
        if w & COMPRESSED != 0 {
            if f.extended && self.bitmap != 0 {
                return Err(corrupt(format!(
                    "compressed cluster with a non-zero subcluster bitmap ({:#x})",
                    self.bitmap
                )));
            }
            if f.external_data {
                return Err(corrupt(
                    "compressed cluster in an image with an external data file",
                ));
            }
            return Ok(Subcluster::Compressed(CompressedDescriptor::decode(
                w & !(COMPRESSED | COPIED),
                f.cluster_bits,
            )));
        }
        let host = w & OFFSET_MASK;
        let allocated = host != 0 || (f.external_data && w & COPIED != 0);
        if allocated && host % f.cluster_size() != 0 {
            return Err(corrupt(format!(
                "data cluster offset {host:#x} is not cluster aligned"
            )));
        }
        let sub_host = host + sub as u64 * f.unit_size();
        if !f.extended {
            return Ok(match (w & ZERO != 0, allocated) {
                (true, true) => Subcluster::ZeroAlloc(host),
                (true, false) => Subcluster::ZeroPlain,
                (false, true) => Subcluster::Normal(host),
                (false, false) => Subcluster::UnallocatedPlain,
            });
        }
        let alloc = self.bitmap as u32;
        let zero = (self.bitmap >> 32) as u32;
        let bit = 1u32 << sub;
        if allocated {
            if alloc & zero != 0 {
                return Err(corrupt(format!(
                    "subcluster bitmap {:#018x} marks subclusters both allocated and zero",
                    self.bitmap
                )));
            }
            Ok(if zero & bit != 0 {
                Subcluster::ZeroAlloc(sub_host)
            } else if alloc & bit != 0 {
                Subcluster::Normal(sub_host)
            } else {
                Subcluster::UnallocatedAlloc(sub_host)
            })
        } else {
            if alloc != 0 {
                return Err(corrupt(format!(
                    "subcluster bitmap {:#018x} marks subclusters allocated in a cluster without host offset",
                    self.bitmap
                )));
            }
            Ok(if zero & bit != 0 {
                Subcluster::ZeroPlain
            } else {
                Subcluster::UnallocatedPlain
            })
        }
    }
}

/// One L2 table, decoded to native integers.
///
/// Words are kept as they are on disk (big-endian) and swapped when an entry is read: a table
/// is usually read for a few entries and long empty stretches (which need no swapping to be
/// recognised), so decoding all of it on every load was the bulk of reading deep chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2Table {
    words: Box<[u64]>,
    extended: bool,
}

impl L2Table {
    /// One cluster of L2 entries as stored.
    pub fn parse(bytes: &[u8], extended: bool) -> L2Table {
        L2Table {
            words: bytes
                .chunks_exact(8)
                .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            extended,
        }
    }

    /// Reads the table of `bytes` bytes at `offset` straight into its words.
    pub fn read(
        storage: &dyn super::storage::Storage,
        offset: u64,
        bytes: u64,
        extended: bool,
    ) -> std::io::Result<L2Table> {
        let mut words = vec![0u64; (bytes / 8) as usize].into_boxed_slice();
        // SAFETY: any bit pattern is a valid u64, and u8 has no alignment requirement, so
        // the words' memory viewed as bytes is entirely the middle part.
        let (_, raw, _) = unsafe { words.align_to_mut::<u8>() };
        super::storage::read_exact(storage, raw, offset, "L2 table")?;
        Ok(L2Table { words, extended })
    }

    /// A table with every entry zero (unallocated).
    pub fn empty(entries: usize, extended: bool) -> L2Table {
        let n = if extended { entries * 2 } else { entries };
        L2Table {
            words: vec![0; n].into_boxed_slice(),
            extended,
        }
    }

    /// Memory the decoded table takes.
    pub fn bytes(&self) -> usize {
        self.words.len() * 8
    }

    pub fn len(&self) -> usize {
        if self.extended {
            self.words.len() / 2
        } else {
            self.words.len()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// How many entries from `index` on (at most to `end`) are all zero: unallocated, with no
    /// subcluster bits. A plain word scan, for the long empty stretches of incremental images.
    pub fn zero_entries(&self, index: usize, end: usize) -> usize {
        let per = if self.extended { 2 } else { 1 };
        self.words[index * per..end * per]
            .iter()
            .position(|&w| w != 0)
            .map_or(end - index, |p| p / per)
    }

    pub fn entry(&self, index: usize) -> L2Entry {
        if self.extended {
            L2Entry {
                word: u64::from_be(self.words[index * 2]),
                bitmap: u64::from_be(self.words[index * 2 + 1]),
            }
        } else {
            L2Entry {
                word: u64::from_be(self.words[index]),
                bitmap: 0,
            }
        }
    }

    pub fn set(&mut self, index: usize, e: L2Entry) {
        if self.extended {
            self.words[index * 2] = e.word.to_be();
            self.words[index * 2 + 1] = e.bitmap.to_be();
        } else {
            self.words[index] = e.word.to_be();
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD: L2Format = L2Format {
        cluster_bits: 16,
        extended: false,
        external_data: false,
    };
    const EXT: L2Format = L2Format {
        cluster_bits: 17,
        extended: true,
        external_data: false,
    };

    #[test]
    fn compressed_descriptor_round_trip() {
        for bits in 9..=21 {
            for (off, len) in [(0x12345u64, 1u64), (0x10000, 700), (0x1ff, 2), (0x200, 512)] {
                let len = len.min(1 << bits);
                let w = CompressedDescriptor::encode(off, len, bits);
                let d = CompressedDescriptor::decode(w & !COMPRESSED, bits);
                assert_eq!(d.offset, off);
                assert!(
                    d.max_len >= len && d.max_len < len + 512,
                    "{bits} {off} {len}"
                );
            }
        }
    }

    #[test]
    fn qemu_compressed_entry_decodes() {
        // 64 KiB clusters: x = 54; one additional sector at byte offset 0x50010.
        let w = (1u64 << 54) | 0x50010;
        let d = CompressedDescriptor::decode(w, 16);
        assert_eq!(d.offset, 0x50010);
        assert_eq!(d.max_len, 1024 - 0x10);
    }

    #[test]
    fn standard_classification() {
        let c = |word| L2Entry { word, bitmap: 0 }.classify(&STD, 0).unwrap();
        assert_eq!(c(0), Subcluster::UnallocatedPlain);
        assert_eq!(c(ZERO), Subcluster::ZeroPlain);
        assert_eq!(c(COPIED | 0x50000), Subcluster::Normal(0x50000));
        assert_eq!(c(0x50000 | ZERO), Subcluster::ZeroAlloc(0x50000));
        assert!(L2Entry {
            word: 0x50200,
            bitmap: 0
        }
        .classify(&STD, 0)
        .is_err());
    }

    #[test]
    fn external_data_offset_zero() {
        let f = L2Format {
            external_data: true,
            ..STD
        };
        let e = L2Entry {
            word: COPIED,
            bitmap: 0,
        };
        assert_eq!(e.classify(&f, 0).unwrap(), Subcluster::Normal(0));
        assert_eq!(e.classify(&STD, 0).unwrap(), Subcluster::UnallocatedPlain);
    }

    #[test]
    fn extended_classification() {
        let e = L2Entry {
            word: 0x40000,
            bitmap: 0b01 | (0b10 << 32),
        };
        assert_eq!(e.classify(&EXT, 0).unwrap(), Subcluster::Normal(0x40000));
        assert_eq!(e.classify(&EXT, 1).unwrap(), Subcluster::ZeroAlloc(0x41000));
        assert_eq!(
            e.classify(&EXT, 2).unwrap(),
            Subcluster::UnallocatedAlloc(0x42000)
        );
        let both = L2Entry {
            word: 0x40000,
            bitmap: 1 | (1 << 32),
        };
        assert!(both.classify(&EXT, 5).is_err());
        let alloc_without_host = L2Entry { word: 0, bitmap: 1 };
        assert!(alloc_without_host.classify(&EXT, 0).is_err());
        let zero_plain = L2Entry {
            word: 0,
            bitmap: 1 << 33,
        };
        assert_eq!(zero_plain.classify(&EXT, 1).unwrap(), Subcluster::ZeroPlain);
        assert_eq!(
            zero_plain.classify(&EXT, 0).unwrap(),
            Subcluster::UnallocatedPlain
        );
    }
}
