//! Header extensions: the typed records between the header and the end of cluster 0.
//!
//! Known ones are decoded (backing format, feature names, bitmaps, external data file, LUKS
//! pointer); unknown ones are kept verbatim because a writer must preserve what it does not
//! understand.

use super::be::be_struct;
use super::error::{corrupt, ErrorKind};
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

pub const END: u32 = 0;
pub const BACKING_FORMAT: u32 = 0xe279_2aca;
pub const FEATURE_TABLE: u32 = 0x6803_f857;
pub const BITMAPS: u32 = 0x2385_2875;
pub const CRYPTO: u32 = 0x0537_be77;
pub const DATA_FILE: u32 = 0x4441_5441;

/// One entry of the feature name table (48 bytes on disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

be_struct! {
    /// The head of every extension record; the payload follows, padded to 8 bytes.
    pub struct Record(8) {
        kind: u32 = 0, len: u32 = 4,
    }
}

be_struct! {
    /// The bitmaps extension: where the bitmap directory is.
    pub struct BitmapsExt(24) {
        nb_bitmaps: u32 = 0,
        /// Must be zero.
        reserved: u32 = 4, directory_size: u64 = 8, directory_offset: u64 = 16,
    }
}

be_struct! {
    /// The full-disk encryption extension: where the LUKS header is.
    pub struct CryptoExt(16) {
        offset: u64 = 0, length: u64 = 8,
    }
}

be_struct! {
    /// The head of a feature name table entry; the name fills the rest of its 48 bytes.
    pub struct FeatureEntry(2) {
        kind: u8 = 0, bit: u8 = 1,
    }
}

/// Bytes of one feature name table entry.
const FEATURE_ENTRY: usize = 48;

/// QEMU: at most 65535 bitmaps, directory at most 64 MiB.
pub const MAX_BITMAPS: u32 = 65535;
pub const MAX_BITMAP_DIRECTORY: u64 = 64 << 20;

/// All header extensions of an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    pub backing_format: Option<String>,
    pub feature_names: Vec<FeatureName>,
    pub bitmaps: Option<BitmapsExt>,
    pub data_file: Option<OsString>,
    /// LUKS header pointer; only its presence matters to a reader.
    pub crypto: Option<CryptoExt>,
    /// Unknown extensions as (type, data), in file order.
    pub unknown: Vec<(u32, Vec<u8>)>,
}

impl Extensions {
    /// Parses the extension area `area` (cluster 0 from the extension start up to the backing
    /// file name or the end of the cluster).
    pub fn parse(area: &[u8]) -> Result<Extensions, ErrorKind> {
        let mut ext = Extensions::default();
        let mut seen = Vec::new();
        let mut pos = 0usize;
        while pos < area.len() {
            // As QEMU: a record head that does not fit before the end is an overrun too.
            if area.len() - pos < Record::LEN {
                return Err(corrupt(format!(
                    "header extension too large: {} bytes left for an 8-byte record head",
                    area.len() - pos
                )));
            }
            let Record { kind, len } = Record::read(&area[pos..]);
            let len = len as usize;
            pos += Record::LEN;
            if kind == END {
                break;
            }
            if len > area.len() - pos {
                return Err(corrupt(format!(
                    "header extension too large: {kind:#010x} of {len} bytes overruns the header cluster or the backing file name"
                )));
            }
            if seen.contains(&kind) {
                return Err(corrupt(format!(
                    "header extension {kind:#010x} appears twice"
                )));
            }
            seen.push(kind);
            let data = &area[pos..pos + len];
            match kind {
                BACKING_FORMAT => {
                    // QEMU keeps format names in 16 bytes and refuses longer ones.
                    if len >= 16 {
                        return Err(corrupt(format!(
                            "backing format name of {len} bytes is too long (at most 15)"
                        )));
                    }
                    ext.backing_format = Some(String::from_utf8_lossy(data).into_owned())
                }
                FEATURE_TABLE => ext.feature_names = parse_feature_table(data),
                BITMAPS => {
                    if len != BitmapsExt::LEN {
                        return Err(corrupt("bitmaps header extension has a wrong length"));
                    }
                    ext.bitmaps = Some(BitmapsExt::read(data));
                }
                DATA_FILE => ext.data_file = Some(OsString::from_vec(data.to_vec())),
                CRYPTO => {
                    if len != CryptoExt::LEN {
                        return Err(corrupt("crypto header extension has a wrong length"));
                    }
                    ext.crypto = Some(CryptoExt::read(data));
                }
                _ => ext.unknown.push((kind, data.to_vec())),
            }
            pos += len.div_ceil(8) * 8;
        }
        Ok(ext)
    }

    /// All extensions as (type, payload) records, in a canonical order, for rewriting the
    /// header cluster. Unknown ones are kept as they were.
    pub fn to_records(&self) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        if let Some(f) = &self.backing_format {
            out.push((BACKING_FORMAT, f.as_bytes().to_vec()));
        }
        if let Some(d) = &self.data_file {
            out.push((DATA_FILE, d.as_bytes().to_vec()));
        }
        if !self.feature_names.is_empty() {
            let entries = self
                .feature_names
                .iter()
                .map(|f| (f.kind, f.bit, f.name.as_str()));
            out.push((FEATURE_TABLE, feature_table(entries)));
        }
        if let Some(b) = &self.bitmaps {
            out.push((BITMAPS, b.to_bytes()));
        }
        if let Some(c) = &self.crypto {
            out.push((CRYPTO, c.to_bytes()));
        }
        out.extend(self.unknown.iter().cloned());
        out
    }

    /// The name the feature table gives to an incompatible feature bit, if any.
    pub fn incompatible_name(&self, bit: u8) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|f| f.kind == 0 && f.bit == bit)
            .map(|f| f.name.as_str())
    }
}

fn parse_feature_table(data: &[u8]) -> Vec<FeatureName> {
    data.chunks_exact(FEATURE_ENTRY)
        .map(|e| {
            let head = FeatureEntry::read(e);
            let raw = &e[FeatureEntry::LEN..];
            let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
            FeatureName {
                kind: head.kind,
                bit: head.bit,
                name: String::from_utf8_lossy(&raw[..end]).into_owned(),
            }
        })
        .collect()
}

/// A feature name table (the extension's payload) of (kind, bit, name) entries; names are cut
/// to the 46 bytes an entry holds.
pub fn feature_table<'a>(entries: impl IntoIterator<Item = (u8, u8, &'a str)>) -> Vec<u8> {
    let mut table = Vec::new();
    for (kind, bit, name) in entries {
        let mut e = [0u8; FEATURE_ENTRY];
        FeatureEntry { kind, bit }.write(&mut e);
        let n = &name.as_bytes()[..name.len().min(FEATURE_ENTRY - FeatureEntry::LEN)];
        e[FeatureEntry::LEN..FeatureEntry::LEN + n.len()].copy_from_slice(n);
        table.extend_from_slice(&e);
    }
    table
}

impl BitmapsExt {
    /// The checks QEMU makes of a bitmaps extension it uses (autoclear bit 0 set); an
    /// extension a program without bitmap support left behind is ignored unchecked.
    pub fn validate(&self) -> Result<(), ErrorKind> {
        if self.reserved != 0 {
            return Err(corrupt("bitmaps extension: reserved field is not zero"));
        }
        if self.nb_bitmaps == 0 || self.nb_bitmaps > MAX_BITMAPS {
            return Err(corrupt(format!(
                "bitmaps extension: {} bitmaps (1 to {MAX_BITMAPS} allowed)",
                self.nb_bitmaps
            )));
        }
        if self.directory_size == 0 || self.directory_size > MAX_BITMAP_DIRECTORY {
            return Err(corrupt(format!(
                "bitmap directory of {} bytes (at most 64 MiB)",
                self.directory_size
            )));
        }
        Ok(())
    }
}

/// Serialises one extension record with its padding.
pub fn encode(kind: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Record {
        kind,
        len: data.len() as u32,
    }
    .to_bytes();
    out.extend_from_slice(data);
    out.resize(Record::LEN + data.len().div_ceil(8) * 8, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_and_unknown() {
        let mut area = encode(BACKING_FORMAT, b"raw");
        area.extend(encode(0x1234_5678, b"opaque"));
        area.extend(encode(DATA_FILE, b"d.raw"));
        area.extend(encode(END, b""));
        let e = Extensions::parse(&area).unwrap();
        assert_eq!(e.backing_format.as_deref(), Some("raw"));
        assert_eq!(e.data_file, Some(OsString::from("d.raw")));
        assert_eq!(e.unknown, vec![(0x1234_5678, b"opaque".to_vec())]);
    }

    #[test]
    fn records_round_trip() {
        let mut area = encode(BACKING_FORMAT, b"qcow2");
        area.extend(encode(FEATURE_TABLE, &[0u8; 96]));
        area.extend(encode(0x7777_0000, b"keep me"));
        area.extend(encode(END, b""));
        let e = Extensions::parse(&area).unwrap();
        let mut again: Vec<u8> = e
            .to_records()
            .iter()
            .flat_map(|(k, d)| encode(*k, d))
            .collect();
        again.extend(encode(END, b""));
        assert_eq!(Extensions::parse(&again).unwrap(), e);
    }

    #[test]
    fn overrunning_length_is_an_error() {
        let mut area = encode(BACKING_FORMAT, b"qcow2");
        area[4..8].copy_from_slice(&1000u32.to_be_bytes());
        assert!(Extensions::parse(&area).is_err());
    }

    #[test]
    fn duplicate_is_an_error() {
        let mut area = encode(BACKING_FORMAT, b"qcow2");
        area.extend(encode(BACKING_FORMAT, b"raw"));
        assert!(Extensions::parse(&area).is_err());
    }
}
