//! The qcow2 header (cluster 0, bytes 0 to `header_length`).
//!
//! Parsing validates every field against the specification and QEMU's limits before anything
//! else trusts it: the header decides how much memory the L1 and refcount tables take and where
//! reads go, so a hostile header must be stopped here.

use super::be::{be_fields, Be};
use super::error::{corrupt, ErrorKind};

pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header; also where v2 header extensions start.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Minimum length of a version 3 header.
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Bytes to read before the cluster size is known.
pub const PROBE_LENGTH: usize = 112;

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU: the L1 table is at most 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU: the refcount table is at most 8 MiB.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// QEMU: at most 65536 internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU: backing file names are at most 1023 bytes.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Host offsets must stay below 2^56 (bits 56.. of table entries are flags).
pub const MAX_HOST_OFFSET: u64 = (1 << 56) - 1;
/// Bytes of a snapshot table entry without its variable part (what QEMU bounds the table by).
const SNAPSHOT_HEADER_LEN: u64 = 40;

/// Why a structure of `len` bytes at `offset` cannot be read whole: it extends past the end of
/// a file of `file_len` bytes. The reader refuses such a structure; `check` reports it in the
/// same words and reads it as QEMU does, with zeros past the end.
pub fn past_end(what: &str, offset: u64, len: u64, file_len: u64) -> Option<String> {
    offset
        .checked_add(len)
        .is_none_or(|end| end > file_len)
        .then(|| {
            format!(
                "{what} at {offset:#x} ({len} bytes) extends past the end of the file ({file_len} bytes)"
            )
        })
}

/// The three groups of feature bits, as the feature name table numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    Incompatible = 0,
    Compatible = 1,
    Autoclear = 2,
}

/// One feature bit this implementation knows.
#[derive(Debug, Clone, Copy)]
pub struct Feature {
    pub kind: FeatureKind,
    pub bit: u8,
    /// QEMU's name for it (what its feature name table says).
    pub name: &'static str,
}

impl Feature {
    pub const fn mask(&self) -> u64 {
        1 << self.bit
    }
}

const fn feature(kind: FeatureKind, bit: u8, name: &'static str) -> Feature {
    Feature { kind, bit, name }
}

/// Every feature bit this implementation knows, with its name: the source of the masks below,
/// of the feature name table written into new images, and of messages about features.
pub const FEATURES: [Feature; 8] = [
    feature(FeatureKind::Incompatible, 0, "dirty bit"),
    feature(FeatureKind::Incompatible, 1, "corrupt bit"),
    feature(FeatureKind::Incompatible, 2, "external data file"),
    feature(FeatureKind::Incompatible, 3, "compression type"),
    feature(FeatureKind::Incompatible, 4, "extended L2 entries"),
    feature(FeatureKind::Compatible, 0, "lazy refcounts"),
    feature(FeatureKind::Autoclear, 0, "bitmaps"),
    feature(FeatureKind::Autoclear, 1, "raw external data"),
];

/// The bits of `kind` in [`FEATURES`].
const fn known(kind: FeatureKind) -> u64 {
    let mut mask = 0;
    let mut i = 0;
    while i < FEATURES.len() {
        if FEATURES[i].kind as u8 == kind as u8 {
            mask |= FEATURES[i].mask();
        }
        i += 1;
    }
    mask
}

/// Incompatible feature bits.
pub mod incompat {
    use super::{known, FeatureKind, FEATURES};
    pub const DIRTY: u64 = FEATURES[0].mask();
    pub const CORRUPT: u64 = FEATURES[1].mask();
    pub const DATA_FILE: u64 = FEATURES[2].mask();
    pub const COMPRESSION: u64 = FEATURES[3].mask();
    pub const EXTENDED_L2: u64 = FEATURES[4].mask();
    pub const KNOWN: u64 = known(FeatureKind::Incompatible);
}

/// Compatible feature bits.
pub mod compat {
    use super::FEATURES;
    pub const LAZY_REFCOUNTS: u64 = FEATURES[5].mask();
}

/// Autoclear feature bits.
pub mod autoclear {
    use super::{known, FeatureKind, FEATURES};
    pub const BITMAPS: u64 = FEATURES[6].mask();
    pub const DATA_FILE_RAW: u64 = FEATURES[7].mask();
    pub const KNOWN: u64 = known(FeatureKind::Autoclear);
}

/// The name of a known feature bit.
pub fn feature_name(kind: FeatureKind, mask: u64) -> &'static str {
    FEATURES
        .iter()
        .find(|f| f.kind == kind && f.mask() == mask)
        .map_or("unknown feature", |f| f.name)
}

pub use super::compress::CompressionType;

/// The fixed part of a qcow2 header, version 2 or 3.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Additional header fields after byte 105 that this version does not know; kept so a
    /// rewritten header preserves them.
    pub unknown_tail: Vec<u8>,
}

// Where each field lies: the version 2 part (after the magic), then what version 3 adds.
be_fields! {
    Header, read_v2, write_v2 {
        version: u32 = 4, backing_file_offset: u64 = 8, backing_file_size: u32 = 16,
        cluster_bits: u32 = 20, size: u64 = 24, crypt_method: u32 = 32,
        l1_size: u32 = 36, l1_table_offset: u64 = 40, refcount_table_offset: u64 = 48,
        refcount_table_clusters: u32 = 56, nb_snapshots: u32 = 60, snapshots_offset: u64 = 64,
    }
}
be_fields! {
    Header, read_v3, write_v3 {
        incompatible_features: u64 = 72, compatible_features: u64 = 80, autoclear_features: u64 = 88,
        refcount_order: u32 = 96, header_length: u32 = 100,
    }
}

impl Header {
    /// Parses and validates the header from the start of the file. `buf` holds at least
    /// [`PROBE_LENGTH`] bytes or the whole file if shorter. Checks that need the file size or the
    /// feature name table are in [`Header::validate`] and the image open code.
    pub fn parse(buf: &[u8]) -> Result<Header, ErrorKind> {
        Header::parse_with(buf, &mut |problem| Err(corrupt(problem)))
    }

    /// [`Header::parse`] for `check`, which examines what the reader refuses where QEMU opens
    /// the image: a table placed on the header or beyond the largest host offset (QEMU only
    /// asks for alignment and an offset that fits in 63 bits). Those placements are returned
    /// as problems instead of errors; everything else fails as in [`Header::parse`].
    pub fn parse_for_check(buf: &[u8]) -> Result<(Header, Vec<String>), ErrorKind> {
        let mut problems = Vec::new();
        let h = Header::parse_with(buf, &mut |problem| {
            problems.push(problem);
            Ok(())
        })?;
        Ok((h, problems))
    }

    /// The parser; `placement` decides whether a table placement QEMU accepts but the reader
    /// refuses ends the parsing (its error) or is only recorded.
    fn parse_with(
        buf: &[u8],
        placement: &mut dyn FnMut(String) -> Result<(), ErrorKind>,
    ) -> Result<Header, ErrorKind> {
        if buf.len() < V2_HEADER_LENGTH as usize {
            return Err(corrupt(format!(
                "file is {} bytes, too short for a qcow2 header",
                buf.len()
            )));
        }
        if u32::get(buf, 0) != MAGIC {
            return Err(corrupt("not a qcow2 image (bad magic)"));
        }
        let mut h = Header {
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            ..Header::default()
        };
        h.read_v2(buf);
        let version = h.version;
        if version != 2 && version != 3 {
            return Err(ErrorKind::Unsupported(format!(
                "qcow2 version {version} is not supported (only 2 and 3)"
            )));
        }
        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LENGTH as usize {
                return Err(corrupt("file too short for a version 3 header"));
            }
            h.read_v3(buf);
            if h.header_length < V3_MIN_HEADER_LENGTH || h.header_length % 8 != 0 {
                return Err(corrupt(format!(
                    "header length {} is invalid (at least 104, a multiple of 8)",
                    h.header_length
                )));
            }
            if h.header_length > 104 {
                let byte = *buf
                    .get(104)
                    .ok_or_else(|| corrupt("file ends inside the header"))?;
                h.compression_type = CompressionType::from_header_byte(byte).ok_or_else(|| {
                    ErrorKind::Unsupported(format!("unknown compression type {byte}"))
                })?;
            }
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits {} out of range ({MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS}: 512 B to 2 MiB clusters)",
                h.cluster_bits
            )));
        }
        if h.header_length as u64 > h.cluster_size() {
            return Err(corrupt(format!(
                "header length {} exceeds the cluster size",
                h.header_length
            )));
        }
        if h.refcount_order > 6 {
            return Err(corrupt(format!(
                "refcount_order {} out of range (0 to 6)",
                h.refcount_order
            )));
        }
        let has_compression_bit = h.incompatible_features & incompat::COMPRESSION != 0;
        if has_compression_bit != h.compression_type.needs_feature_bit() {
            return Err(corrupt(
                "compression type field and incompatible feature bit 3 disagree",
            ));
        }
        if h.extended_l2() && h.cluster_bits < 14 {
            return Err(corrupt(
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_NAME {
                return Err(corrupt(format!(
                    "backing file name is {} bytes long (at most {MAX_BACKING_NAME})",
                    h.backing_file_size
                )));
            }
            if h.backing_file_offset
                .saturating_add(h.backing_file_size as u64)
                > h.cluster_size()
            {
                return Err(corrupt("backing file name lies outside the header cluster"));
            }
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(format!(
                "{} snapshots (QEMU allows at most {MAX_SNAPSHOTS})",
                h.nb_snapshots
            )));
        }
        if h.nb_snapshots > 0 {
            let len = h.nb_snapshots as u64 * SNAPSHOT_HEADER_LEN;
            h.check_table_offset(h.snapshots_offset, len, "snapshot table", placement)?;
        } else if h.snapshots_offset % h.cluster_size() != 0 {
            // QEMU refuses this even without snapshots ("Snapshot table offset invalid").
            return Err(corrupt(format!(
                "snapshot table offset {:#x} is not cluster aligned",
                h.snapshots_offset
            )));
        }
        if h.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table of {} entries exceeds QEMU's 32 MiB limit",
                h.l1_size
            )));
        }
        if h.size > h.max_virtual_size() {
            return Err(corrupt(format!(
                "virtual size {} is too large for {}-byte clusters",
                h.size,
                h.cluster_size()
            )));
        }
        if (h.l1_size as u64) < h.l1_entries_needed(h.size) {
            return Err(corrupt(format!(
                "L1 table of {} entries is too small for the virtual size {}",
                h.l1_size, h.size
            )));
        }
        let l1_len = h.l1_size as u64 * 8;
        if h.l1_size > 0 {
            h.check_table_offset(h.l1_table_offset, l1_len, "L1 table", placement)?;
        } else if h.l1_table_offset % h.cluster_size() != 0 {
            // QEMU checks the offset of an empty table too ("Active L1 table offset invalid").
            h.check_table_offset(h.l1_table_offset, l1_len, "L1 table", placement)?;
        }
        if h.refcount_table_clusters as u64 * h.cluster_size() > MAX_REFCOUNT_TABLE_BYTES {
            return Err(corrupt(format!(
                "refcount table of {} clusters exceeds QEMU's 8 MiB limit",
                h.refcount_table_clusters
            )));
        }
        // QEMU opens an image whose refcount table lies on the header (offset 0): reads do not
        // use refcounts, so only `check` reports it and writers refuse it.
        if h.refcount_table_offset != 0 {
            let len = h.refcount_table_clusters as u64 * h.cluster_size();
            h.check_table_offset(h.refcount_table_offset, len, "refcount table", placement)?;
        }
        if version == 3 && h.header_length > 112 {
            let end = (h.header_length as usize).min(buf.len());
            h.unknown_tail = buf[112.min(end)..end].to_vec();
        }
        Ok(h)
    }

    /// Checks where a table of `len` bytes at `offset` lies. QEMU refuses an unaligned table
    /// and one whose end does not fit in 63 bits ("offset invalid"): so does every open. A
    /// table on the header or past the largest host offset goes to `placement`.
    fn check_table_offset(
        &self,
        offset: u64,
        len: u64,
        what: &str,
        placement: &mut dyn FnMut(String) -> Result<(), ErrorKind>,
    ) -> Result<(), ErrorKind> {
        let problem = |p: &str| format!("{what} offset {offset:#x} {p}");
        const BEYOND: &str = "lies beyond the largest host offset qcow2 can address";
        if offset % self.cluster_size() != 0 {
            Err(corrupt(problem("is not cluster aligned")))
        } else if offset
            .checked_add(len)
            .is_none_or(|end| end > i64::MAX as u64)
        {
            Err(corrupt(problem(BEYOND)))
        } else if offset == 0 {
            placement(problem("overlaps the image header"))
        } else if offset > MAX_HOST_OFFSET {
            placement(problem(BEYOND))
        } else {
            Ok(())
        }
    }

    /// Checks the tables the header points to against the file length (the snapshot table by
    /// its first entry).
    pub fn validate(&self, file_len: u64) -> Result<(), ErrorKind> {
        let fits = |offset: u64, len: u64, what: &str| match past_end(what, offset, len, file_len) {
            Some(problem) => Err(corrupt(problem)),
            None => Ok(()),
        };
        if self.l1_size > 0 {
            fits(self.l1_table_offset, self.l1_size as u64 * 8, "L1 table")?;
        }
        fits(
            self.refcount_table_offset,
            self.refcount_table_clusters as u64 * self.cluster_size(),
            "refcount table",
        )?;
        if self.nb_snapshots > 0 {
            fits(self.snapshots_offset, SNAPSHOT_HEADER_LEN, "snapshot table")?;
        }
        Ok(())
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTENDED_L2 != 0
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries in one L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Guest bytes one L1 entry covers.
    pub fn l1_span(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    pub fn l1_entries_needed(&self, size: u64) -> u64 {
        size.div_ceil(self.l1_span())
    }

    /// The largest virtual size whose L1 table fits QEMU's limit.
    pub fn max_virtual_size(&self) -> u64 {
        (MAX_L1_BYTES / 8).saturating_mul(self.l1_span())
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    pub fn has_backing_file(&self) -> bool {
        self.backing_file_offset != 0 && self.backing_file_size > 0
    }

    pub fn dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    pub fn corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }

    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// Incompatible feature bits this implementation does not know.
    pub fn unknown_incompatible(&self) -> u64 {
        self.incompatible_features & !incompat::KNOWN
    }

    /// Where header extensions start.
    pub fn extensions_offset(&self) -> u64 {
        self.header_length as u64
    }

    /// Serialises the header (without extensions) as it is laid out on disk.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = if self.version >= 3 {
            (self.header_length as usize)
                .max(V3_MIN_HEADER_LENGTH as usize)
                .max(if self.unknown_tail.is_empty() {
                    0
                } else {
                    112 + self.unknown_tail.len()
                })
        } else {
            V2_HEADER_LENGTH as usize
        };
        let mut b = vec![0u8; len];
        MAGIC.put(&mut b, 0);
        self.write_v2(&mut b);
        if self.version >= 3 {
            self.write_v3(&mut b);
            if len > 104 {
                b[104] = self.compression_type.header_byte();
            }
            if !self.unknown_tail.is_empty() {
                b[112..112 + self.unknown_tail.len()].copy_from_slice(&self.unknown_tail);
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 64 << 20,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: CompressionType::Zlib,
            unknown_tail: Vec::new(),
        }
    }

    #[test]
    fn feature_bits_come_from_the_table() {
        assert_eq!(incompat::KNOWN, 0b1_1111);
        assert_eq!(
            (
                incompat::EXTENDED_L2,
                compat::LAZY_REFCOUNTS,
                autoclear::DATA_FILE_RAW
            ),
            (1 << 4, 1, 2)
        );
        assert_eq!(
            feature_name(FeatureKind::Incompatible, incompat::EXTENDED_L2),
            "extended L2 entries"
        );
        assert_eq!(
            feature_name(FeatureKind::Autoclear, autoclear::BITMAPS),
            "bitmaps"
        );
    }

    #[test]
    fn round_trip() {
        let h = sample();
        assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn keeps_unknown_additional_fields() {
        let mut h = sample();
        h.header_length = 128;
        h.unknown_tail = (1..=16).collect();
        let parsed = Header::parse(&h.to_bytes()).unwrap();
        assert_eq!(parsed.unknown_tail, h.unknown_tail);
        assert_eq!(parsed.extensions_offset(), 128);
        let v2 = Header {
            version: 2,
            header_length: 72,
            ..sample()
        };
        let parsed = Header::parse(&v2.to_bytes()).unwrap();
        assert_eq!(
            (parsed.version, parsed.refcount_order, parsed.header_length),
            (2, 4, 72)
        );
    }

    #[test]
    fn rejects_out_of_range_fields() {
        type Case = (fn(&mut Header), &'static str);
        let cases: Vec<Case> = vec![
            (|h| h.cluster_bits = 8, "cluster_bits"),
            (|h| h.cluster_bits = 22, "cluster_bits"),
            (|h| h.l1_size = u32::MAX, "L1 table"),
            (|h| h.l1_size = 0, "too small"),
            (|h| h.refcount_table_clusters = 1 << 20, "refcount table"),
            (|h| h.refcount_order = 7, "refcount_order"),
            (|h| h.l1_table_offset = 0x30001, "L1 table offset"),
            (|h| h.nb_snapshots = 70000, "snapshots"),
            (|h| h.header_length = 100, "header length"),
            (|h| h.size = u64::MAX, "virtual size"),
            (
                |h| h.compression_type = CompressionType::Zstd,
                "compression",
            ),
        ];
        for (mutate, needle) in cases {
            let mut h = sample();
            mutate(&mut h);
            let err = Header::parse(&h.to_bytes()).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }

    #[test]
    fn truncated_header_is_an_error() {
        let b = sample().to_bytes();
        for len in [0, 4, 71, 80, 103] {
            assert!(Header::parse(&b[..len]).is_err(), "length {len}");
        }
    }
}
