//! `qmprestore merge`: a backup chain written into one new image; the backups stay untouched.
//!
//! The chain (the latest FULL and its INCs up to the restore point) is stacked in directory
//! order, whatever backing links the files carry, and written through the same parallel
//! machinery as `convert`: the merged cluster map comes from each layer's metadata (newest
//! layer first, zero clusters included), data is read in parallel, copied inside the kernel
//! where it is contiguous, and every guest cluster is written once. No temporary copies.

use super::convert::{self, ConvertOptions, Qcow2Output};
use super::error::{ChainError, Result};
use super::outdir::NewDirs;
use crate::qcow2::crypto::Keying;
use crate::qcow2::header::CompressionType;
use crate::store::{open_restore_point, ChainSelect, RestorePoint};
use std::path::{Path, PathBuf};

/// Output format of a merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Qcow2,
    Raw,
}

#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub select: ChainSelect,
    pub target: Target,
    pub compress: Option<CompressionType>,
    /// Replace an existing target file.
    pub force: bool,
    pub progress: bool,
    /// Average bytes per second to stay under.
    pub rate_limit: Option<u64>,
    /// Write a plaintext image even when the chain is encrypted.
    pub decrypt: bool,
}

/// Merges the chain in `dir` into `target_file`; returns the files merged, oldest first.
pub fn merge(dir: &Path, target_file: &Path, opts: &MergeOptions) -> Result<Vec<PathBuf>> {
    let RestorePoint { chain, disk, .. } = open_restore_point(dir, &opts.select)?;
    convert::refuse_chain_member(&disk, target_file)?;
    let exists = std::fs::symlink_metadata(target_file).is_ok();
    let is_device = std::fs::metadata(target_file)
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .unwrap_or(false);
    if exists && !is_device && !opts.force {
        return Err(ChainError::Refused(format!(
            "{} exists; use --force to replace it",
            target_file.display()
        )));
    }
    // A file target is written under a temporary name and renamed when complete, so an
    // interrupted merge never leaves a half-written image under the target's name, and a
    // re-run (which replaces the leftover) needs no --force.
    let dirs = NewDirs::for_file(target_file)
        .map_err(|e| crate::qcow2::ErrorKind::Io(e).at(target_file))?;
    let staging = (!is_device).then(|| staging_name(target_file));
    if let Some(tmp) = &staging {
        let _ = std::fs::remove_file(tmp);
    }
    let out_path = staging.as_deref().unwrap_or(target_file);
    let copts = ConvertOptions {
        snapshot: None,
        progress: opts.progress,
        rate_limit: opts.rate_limit,
    };
    match opts.target {
        Target::Raw => convert::disk_to_raw(&disk, out_path, &copts)?,
        Target::Qcow2 => {
            if is_device {
                return Err(ChainError::Refused(
                    "a qcow2 merge needs a file target, not a block device".into(),
                ));
            }
            let base = disk
                .chain()
                .last()
                .and_then(|i| i.qcow2().map(|q| q.cluster_size()));
            let out = Qcow2Output {
                cluster_size: base.unwrap_or(65536),
                compression_type: opts.compress.unwrap_or(CompressionType::Zlib),
                compress: opts.compress.is_some(),
                encrypt: if opts.decrypt { None } else { keying(&disk)? },
            };
            convert::disk_to_qcow2(&disk, out_path, &copts, &out)?
        }
    }
    if let Some(tmp) = &staging {
        let at = |e| crate::qcow2::ErrorKind::Io(e).at(target_file);
        std::fs::rename(tmp, target_file).map_err(at)?;
        crate::qcow2::storage::sync_parent(target_file).map_err(at)?;
    }
    dirs.keep();
    Ok(chain.paths())
}

/// How a qcow2 merge of `disk` is encrypted: with a new header when a target passphrase was
/// given; else, when the chain is encrypted, under the LUKS header of its oldest encrypted
/// file (the FULL's, normally: same passphrases, no new PBKDF2 cost); else not at all.
fn keying(disk: &crate::qcow2::Disk) -> Result<Option<Keying>> {
    if crate::qcow2::crypto::keys::target().is_some() {
        return Ok(Some(Keying::Fresh(Default::default())));
    }
    let encrypted: Vec<_> = disk
        .chain()
        .rev()
        .filter_map(|i| i.qcow2())
        .filter(|q| q.encryption().is_some())
        .collect();
    for q in &encrypted {
        if let Some(k) = q.keying_to_share()? {
            return Ok(Some(k));
        }
    }
    match encrypted.first() {
        Some(q) => Err(ChainError::Refused(format!(
            "{} uses legacy AES encryption, which new images do not get: give --target-key-file \
             for a LUKS-encrypted merge, or --decrypt for a plaintext one",
            q.path().display()
        ))),
        None => Ok(None),
    }
}

/// `.<name>.merging` beside `target`: where a merge writes before the rename.
pub fn staging_name(target: &Path) -> PathBuf {
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    target.with_file_name(format!(".{name}.merging"))
}
