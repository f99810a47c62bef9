//! The qcow2 header (cluster 0, bytes 0 to `header_length`).
//!
//! Parsing validates every field against the specification and QEMU's limits before anything
//! else trusts it: the header decides how much memory the L1 and refcount tables take and where
//! reads go, so a hostile header must be stopped here.

use super::error::{corrupt, ErrorKind};
use byteorder::{BigEndian, ByteOrder};

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

/// Incompatible feature bits.
pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compat {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    pub const BITMAPS: u64 = 1 << 0;
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// How compressed clusters are encoded (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate; QEMU calls it "zlib".
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// The fixed part of a qcow2 header, version 2 or 3.
#[derive(Debug, Clone, PartialEq, Eq)]
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

impl Header {
    /// Parses and validates the header from the start of the file. `buf` holds at least
    /// [`PROBE_LENGTH`] bytes or the whole file if shorter. Checks that need the file size or the
    /// feature name table are in [`Header::validate`] and the image open code.
    pub fn parse(buf: &[u8]) -> Result<Header, ErrorKind> {
        if buf.len() < V2_HEADER_LENGTH as usize {
            return Err(corrupt(format!(
                "file is {} bytes, too short for a qcow2 header",
                buf.len()
            )));
        }
        let be32 = |o: usize| BigEndian::read_u32(&buf[o..o + 4]);
        let be64 = |o: usize| BigEndian::read_u64(&buf[o..o + 8]);
        if be32(0) != MAGIC {
            return Err(corrupt("not a qcow2 image (bad magic)"));
        }
        let version = be32(4);
        if version != 2 && version != 3 {
            return Err(ErrorKind::Unsupported(format!(
                "qcow2 version {version} is not supported (only 2 and 3)"
            )));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(8),
            backing_file_size: be32(16),
            cluster_bits: be32(20),
            size: be64(24),
            crypt_method: be32(32),
            l1_size: be32(36),
            l1_table_offset: be64(40),
            refcount_table_offset: be64(48),
            refcount_table_clusters: be32(56),
            nb_snapshots: be32(60),
            snapshots_offset: be64(64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: CompressionType::Zlib,
            unknown_tail: Vec::new(),
        };
        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LENGTH as usize {
                return Err(corrupt("file too short for a version 3 header"));
            }
            h.incompatible_features = be64(72);
            h.compatible_features = be64(80);
            h.autoclear_features = be64(88);
            h.refcount_order = be32(96);
            h.header_length = be32(100);
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
                h.compression_type = match byte {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    t => {
                        return Err(ErrorKind::Unsupported(format!(
                            "unknown compression type {t}"
                        )))
                    }
                };
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
        if has_compression_bit != (h.compression_type != CompressionType::Zlib) {
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
            if h.backing_file_offset + h.backing_file_size as u64 > h.cluster_size() {
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
            h.check_table_offset(h.snapshots_offset, "snapshot table")?;
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
        if h.l1_size > 0 {
            h.check_table_offset(h.l1_table_offset, "L1 table")?;
        }
        if h.refcount_table_clusters as u64 * h.cluster_size() > MAX_REFCOUNT_TABLE_BYTES {
            return Err(corrupt(format!(
                "refcount table of {} clusters exceeds QEMU's 8 MiB limit",
                h.refcount_table_clusters
            )));
        }
        h.check_table_offset(h.refcount_table_offset, "refcount table")?;
        if version == 3 && h.header_length > 112 {
            let end = (h.header_length as usize).min(buf.len());
            h.unknown_tail = buf[112.min(end)..end].to_vec();
        }
        Ok(h)
    }

    fn check_table_offset(&self, offset: u64, what: &str) -> Result<(), ErrorKind> {
        if offset == 0 || offset % self.cluster_size() != 0 || offset > MAX_HOST_OFFSET {
            return Err(corrupt(format!(
                "{what} offset {offset:#x} is not a valid cluster-aligned offset"
            )));
        }
        Ok(())
    }

    /// Checks the tables the header points to against the file length.
    pub fn validate(&self, file_len: u64) -> Result<(), ErrorKind> {
        let fits = |offset: u64, len: u64, what: &str| {
            if offset.checked_add(len).is_none_or(|end| end > file_len) {
                Err(corrupt(format!(
                    "{what} at {offset:#x} ({len} bytes) extends past the end of the file ({file_len} bytes)"
                )))
            } else {
                Ok(())
            }
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
            fits(self.snapshots_offset, 40, "snapshot table")?;
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
        let put32 = |b: &mut [u8], o: usize, v: u32| BigEndian::write_u32(&mut b[o..o + 4], v);
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        BigEndian::write_u64(&mut b[8..16], self.backing_file_offset);
        put32(&mut b, 16, self.backing_file_size);
        put32(&mut b, 20, self.cluster_bits);
        BigEndian::write_u64(&mut b[24..32], self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        BigEndian::write_u64(&mut b[40..48], self.l1_table_offset);
        BigEndian::write_u64(&mut b[48..56], self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        BigEndian::write_u64(&mut b[64..72], self.snapshots_offset);
        if self.version >= 3 {
            BigEndian::write_u64(&mut b[72..80], self.incompatible_features);
            BigEndian::write_u64(&mut b[80..88], self.compatible_features);
            BigEndian::write_u64(&mut b[88..96], self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, self.header_length);
            if len > 104 {
                b[104] = match self.compression_type {
                    CompressionType::Zlib => 0,
                    CompressionType::Zstd => 1,
                };
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
