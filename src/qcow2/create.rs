//! Creating new qcow2 images (what `qemu-img create -f qcow2` does), natively.
//!
//! The initial layout is QEMU's: the header cluster, the refcount table, the refcount blocks
//! that cover all initial metadata, then the L1 table (and, for a raw external data file, L2
//! tables mapping every cluster 1:1). The file is built with plain writes followed by one
//! `fsync`; until then it is not a valid image, which is fine for a file nobody else knows of.

use super::error::{ErrorKind, Result};
use super::ext;
use super::header::{self, autoclear, compat, incompat, CompressionType, Header};
use super::l2::{self, L2Entry, L2Format, L2Table};
use super::refcount::{self, RefcountFormat};
use super::Format;
use crate::qcow2::crypto::{Crypt, Keying};
use crate::qcow2::fault::pwrite;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Everything `qmprestore create -o ...` can ask for.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u64,
    /// qcow2 version: 2 (compat 0.10) or 3 (compat 1.1).
    pub version: u32,
    pub refcount_bits: u32,
    pub lazy_refcounts: bool,
    pub extended_l2: bool,
    pub compression: CompressionType,
    /// Backing file name as it is to be stored, and its format.
    pub backing: Option<(String, Option<Format>)>,
    /// External data file name as stored (relative to the image), and whether it is raw.
    pub data_file: Option<(String, bool)>,
    /// LUKS encryption of the guest data.
    pub encrypt: Option<Keying>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression: CompressionType::Zlib,
            backing: None,
            data_file: None,
            encrypt: None,
        }
    }
}

impl CreateOptions {
    /// Checks the combination the way QEMU does, so we never write an image it would refuse.
    pub fn validate(&self) -> Result<(), String> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(format!(
                "cluster size {cs} must be a power of two between 512 and 2 MiB"
            ));
        }
        let rb = self.refcount_bits;
        if !rb.is_power_of_two() || rb > 64 {
            return Err(format!(
                "refcount width {rb} must be a power of two from 1 to 64"
            ));
        }
        match self.version {
            2 => {
                use header::{compat, feature_name, incompat, FeatureKind};
                let v3_only = [
                    (rb != 16, "refcount widths other than 16"),
                    (
                        self.lazy_refcounts,
                        feature_name(FeatureKind::Compatible, compat::LAZY_REFCOUNTS),
                    ),
                    (
                        self.extended_l2,
                        feature_name(FeatureKind::Incompatible, incompat::EXTENDED_L2),
                    ),
                    (
                        self.compression.needs_feature_bit(),
                        feature_name(FeatureKind::Incompatible, incompat::COMPRESSION),
                    ),
                    (
                        self.data_file.is_some(),
                        feature_name(FeatureKind::Incompatible, incompat::DATA_FILE),
                    ),
                ];
                if let Some((_, what)) = v3_only.iter().find(|(bad, _)| *bad) {
                    return Err(format!(
                        "{what}: not in version 2 images (needs compat 1.1)"
                    ));
                }
            }
            3 => {}
            v => return Err(format!("unknown qcow2 version {v}")),
        }
        if self.extended_l2 && cs < 16384 {
            return Err("extended L2 entries need clusters of at least 16 KiB".into());
        }
        if let Some((name, _)) = &self.backing {
            if name.is_empty() || name.len() > header::MAX_BACKING_NAME as usize {
                return Err("backing file name must be 1 to 1023 bytes".into());
            }
            if matches!(self.data_file, Some((_, true))) {
                return Err("a raw external data file cannot have a backing file".into());
            }
        }
        if let Some(k) = &self.encrypt {
            if matches!(self.data_file, Some((_, true))) {
                return Err("a raw external data file cannot be encrypted".into());
            }
            k.validate()?;
        }
        let probe = self.header(0, 0, 0, 0);
        if self.size > probe.max_virtual_size() {
            return Err(format!(
                "virtual size {} is too large for {cs}-byte clusters",
                self.size
            ));
        }
        Ok(())
    }

    /// Virtual size as QEMU stores it: rounded up to whole sectors.
    pub fn rounded_size(&self) -> u64 {
        self.size.div_ceil(512) * 512
    }

    fn header(&self, rt_offset: u64, rt_clusters: u32, l1_offset: u64, l1_size: u32) -> Header {
        let mut incompatible = 0;
        if self.compression.needs_feature_bit() {
            incompatible |= incompat::COMPRESSION;
        }
        if self.extended_l2 {
            incompatible |= incompat::EXTENDED_L2;
        }
        let mut autoclear_bits = 0;
        if let Some((_, raw)) = &self.data_file {
            incompatible |= incompat::DATA_FILE;
            if *raw {
                autoclear_bits |= autoclear::DATA_FILE_RAW;
            }
        }
        Header {
            version: self.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: self.cluster_size.trailing_zeros(),
            size: self.rounded_size(),
            crypt_method: if self.encrypt.is_some() {
                crate::qcow2::crypto::METHOD_LUKS
            } else {
                0
            },
            l1_size,
            l1_table_offset: l1_offset,
            refcount_table_offset: rt_offset,
            refcount_table_clusters: rt_clusters,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompatible,
            compatible_features: if self.lazy_refcounts {
                compat::LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: autoclear_bits,
            refcount_order: self.refcount_bits.trailing_zeros(),
            header_length: if self.version == 2 { 72 } else { 112 },
            compression_type: self.compression,
            unknown_tail: Vec::new(),
        }
    }
}

/// Serialises header, extensions and backing name into cluster 0. The feature name table is
/// optional and dropped when the cluster is too small for it.
pub fn header_cluster(
    h: &mut Header,
    extensions: &[(u32, Vec<u8>)],
    backing: Option<&[u8]>,
) -> Result<Vec<u8>, ErrorKind> {
    let cs = h.cluster_size() as usize;
    let build = |h: &mut Header, with_names: bool| -> Option<Vec<u8>> {
        let mut area = Vec::new();
        for (kind, data) in extensions {
            if *kind == ext::FEATURE_TABLE && !with_names {
                continue;
            }
            area.extend(ext::encode(*kind, data));
        }
        area.extend(ext::encode(ext::END, &[]));
        let mut out = h.to_bytes();
        out.extend(area);
        if let Some(name) = backing {
            h.backing_file_offset = out.len() as u64;
            h.backing_file_size = name.len() as u32;
            out.extend_from_slice(name);
        } else {
            h.backing_file_offset = 0;
            h.backing_file_size = 0;
        }
        if out.len() > cs {
            return None;
        }
        out[..h.header_length as usize].copy_from_slice(&h.to_bytes());
        out.resize(cs, 0);
        Some(out)
    };
    build(h, true).or_else(|| build(h, false)).ok_or_else(|| {
        ErrorKind::Unsupported(
            "header, extensions and backing file name do not fit in one cluster".into(),
        )
    })
}

/// The feature name table of new images: every feature this implementation knows.
pub fn feature_table() -> Vec<u8> {
    ext::feature_table(
        header::FEATURES
            .iter()
            .map(|f| (f.kind as u8, f.bit, f.name)),
    )
}

/// Creates a new image at `path` (which must not exist), durably.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    create_file(path, opts, true).map(drop)
}

/// Creates a new image; with `durable` false nothing is flushed, for an image that will be
/// filled and only flushed at the end (a half-written output is worthless either way).
/// What a new image holds: its header and its first cluster (header, extensions, backing
/// name), and the cipher of an encrypted one.
pub struct Created {
    pub header: Header,
    pub cluster0: Vec<u8>,
    pub crypt: Option<Crypt>,
}

pub fn create_file(path: &Path, opts: &CreateOptions, durable: bool) -> Result<Created> {
    opts.validate()
        .map_err(|m| ErrorKind::Unsupported(m).at(path))?;
    let at = |e: std::io::Error| ErrorKind::Io(e).at(path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(at)?;
    let result = write_new(&file, path, opts, durable);
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn write_new(file: &File, path: &Path, opts: &CreateOptions, durable: bool) -> Result<Created> {
    let at = |e: std::io::Error| ErrorKind::Io(e).at(path);
    let cs = opts.cluster_size;
    let probe = opts.header(0, 0, 0, 0);
    let l1_size = probe.l1_entries_needed(opts.rounded_size());
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let raw_data = matches!(opts.data_file, Some((_, true)));
    let l2_clusters = if raw_data { l1_size } else { 0 };
    let luks = match &opts.encrypt {
        Some(k) => Some(k.build().map_err(|m| ErrorKind::Encryption(m).at(path))?),
        None => None,
    };
    let luks_clusters = luks
        .as_ref()
        .map_or(0, |a| (a.bytes.len() as u64).div_ceil(cs));
    let rf = RefcountFormat {
        cluster_bits: probe.cluster_bits,
        order: probe.refcount_order,
    };
    // Fixed point: refcount blocks must cover every metadata cluster, including themselves
    // and the table that points to them.
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let total = 1 + rt + rb + l1_clusters + l2_clusters + luks_clusters;
        let need_rb = total.div_ceil(rf.block_entries());
        let need_rt = (need_rb * 8).div_ceil(cs);
        if need_rb == rb && need_rt == rt {
            break;
        }
        (rt, rb) = (need_rt.max(rt), need_rb.max(rb));
    }
    let rt_off = cs;
    let rb_off = rt_off + rt * cs;
    let l1_off = rb_off + rb * cs;
    let l2_off = l1_off + l1_clusters * cs;
    let luks_off = l2_off + l2_clusters * cs;
    let total = 1 + rt + rb + l1_clusters + l2_clusters + luks_clusters;

    let mut h = opts.header(rt_off, rt as u32, l1_off, l1_size as u32);
    let mut extensions = Vec::new();
    if let Some((_, Some(f))) = &opts.backing {
        extensions.push((ext::BACKING_FORMAT, f.name().as_bytes().to_vec()));
    }
    if let Some((name, _)) = &opts.data_file {
        extensions.push((ext::DATA_FILE, name.as_bytes().to_vec()));
    }
    if let Some(area) = &luks {
        let e = ext::CryptoExt {
            offset: luks_off,
            length: area.bytes.len() as u64,
        };
        extensions.push((ext::CRYPTO, e.to_bytes()));
    }
    if opts.version >= 3 {
        extensions.push((ext::FEATURE_TABLE, feature_table()));
    }
    let backing = opts.backing.as_ref().map(|(n, _)| n.as_bytes());
    let cluster0 = header_cluster(&mut h, &extensions, backing).map_err(|k| k.at(path))?;

    let mut table = vec![0u8; (rt * cs) as usize];
    for i in 0..rb {
        table[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&(rb_off + i * cs).to_be_bytes());
    }
    let mut blocks = vec![0u8; (rb * cs) as usize];
    for c in 0..total {
        let (t, i) = rf.locate(c);
        let block = &mut blocks[(t * cs) as usize..((t + 1) * cs) as usize];
        refcount::set(block, i, rf.order, 1);
    }
    let mut l1 = vec![0u8; (l1_clusters * cs) as usize];
    file.set_len(total * cs).map_err(at)?;
    pwrite(file, &cluster0, 0).map_err(at)?;
    pwrite(file, &table, rt_off).map_err(at)?;
    pwrite(file, &blocks, rb_off).map_err(at)?;
    if raw_data {
        let fmt = L2Format::of(&h);
        let per_table = fmt.entries_per_table();
        let clusters = h.size.div_ceil(cs);
        for t in 0..l1_size {
            let mut l2 = L2Table::empty(per_table as usize, fmt.extended);
            for i in 0..per_table {
                let guest = t * per_table + i;
                if guest < clusters {
                    let mut e = L2Entry {
                        word: l2::COPIED | (guest * cs),
                        bitmap: 0,
                    };
                    if fmt.extended {
                        e.bitmap = 0xffff_ffff;
                    }
                    l2.set(i as usize, e);
                }
            }
            let off = l2_off + t * cs;
            pwrite(file, &l2.to_bytes(), off).map_err(at)?;
            l1[t as usize * 8..t as usize * 8 + 8]
                .copy_from_slice(&(super::l1::COPIED | off).to_be_bytes());
        }
    }
    pwrite(file, &l1, l1_off).map_err(at)?;
    if let Some(area) = &luks {
        pwrite(file, &area.bytes, luks_off).map_err(at)?;
    }
    if let Some((name, _)) = &opts.data_file {
        let data_path: PathBuf = super::image::resolve_relative(path, Path::new(name));
        let data = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data_path)
            .map_err(|e| ErrorKind::Io(e).at(&data_path))?;
        if raw_data {
            data.set_len(h.size)
                .map_err(|e| ErrorKind::Io(e).at(&data_path))?;
        }
        if durable {
            data.sync_all()
                .map_err(|e| ErrorKind::Io(e).at(&data_path))?;
        }
    }
    if durable {
        file.sync_all().map_err(at)?;
        super::storage::sync_parent(path).map_err(at)?;
    }
    Ok(Created {
        header: h,
        cluster0,
        crypt: luks.map(|a| a.crypt),
    })
}
