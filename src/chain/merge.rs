//! `qmprestore merge`: a backup chain written into one new image; the backups stay untouched.
//!
//! The chain (the latest FULL and its INCs up to the restore point) is stacked in directory
//! order, whatever backing links the files carry, and written through the same parallel
//! machinery as `convert`: the merged cluster map comes from each layer's metadata (newest
//! layer first, zero clusters included), data is read in parallel, copied inside the kernel
//! where it is contiguous, and every guest cluster is written once. No temporary copies.

use super::convert::{self, ConvertOptions, Qcow2Output};
use super::dir::{BackupDir, Chain};
use super::error::{ChainError, Result};
use super::outdir::NewDirs;
use crate::qcow2::header::CompressionType;
use crate::qcow2::{Disk, Format};
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
}

/// Which files of a backup directory a chain command works on, and what it may follow.
#[derive(Debug, Clone, Default)]
pub struct ChainSelect {
    /// Restore point (see [`Chain::until`]).
    pub until: Option<String>,
    /// Only files whose name contains this.
    pub filter: Option<String>,
    /// Accept backing file names that lead out of the backup directory.
    pub allow_outside_backing: bool,
}

/// The backup files a restore of `dir` uses, up to the restore point. Backing file names that
/// lead out of the directory (absolute, or through `..`) are refused unless allowed: a
/// hostile or misplaced backup must not make a restore read (or a commit copy) files from
/// elsewhere on the host.
pub fn restore_chain(dir: &Path, select: &ChainSelect) -> Result<(BackupDir, Chain)> {
    let bd = BackupDir::scan(dir, select.filter.as_deref())?;
    bd.refuse_partials()?;
    let mut chain = bd.chain()?;
    if let Some(u) = &select.until {
        chain = chain.until(u, dir)?;
    }
    if !select.allow_outside_backing {
        for f in &chain.files {
            refuse_outside_backing(&f.path)?;
        }
    }
    Ok((bd, chain))
}

/// Refuses `file` if its backing file name is absolute or climbs out of its directory.
pub fn refuse_outside_backing(file: &Path) -> Result<()> {
    let opts = crate::qcow2::OpenOptions {
        no_backing: true,
        ..Default::default()
    };
    let disk = Disk::open_with(file, &opts)?;
    let Some(name) = disk.qcow2().and_then(|q| q.backing_name()) else {
        return Ok(());
    };
    let name = Path::new(name);
    let climbs = name.is_absolute()
        || name.components().any(|c| {
            !matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        });
    // A name inside the directory may still be a symlink that leads out of it.
    let dir = file.parent().unwrap_or(Path::new("."));
    let leaves = match (
        std::fs::canonicalize(dir.join(name)),
        std::fs::canonicalize(dir),
    ) {
        (Ok(target), Ok(dir)) => !target.starts_with(dir),
        _ => false,
    };
    let escapes = climbs || leaves;
    if escapes {
        return Err(ChainError::Refused(format!(
            "{}: backing file {} lies outside the backup directory; pass --allow-outside-backing if that is intended",
            file.display(),
            name.display()
        )));
    }
    Ok(())
}

/// Opens the chain as one disk, refusing raw INCs: a raw file cannot tell "unchanged" from
/// "zero", so it cannot be laid over its predecessor.
pub fn open_chain(chain: &Chain) -> Result<Disk> {
    let paths: Vec<PathBuf> = chain.paths();
    let disk = Disk::stack(&paths)?;
    let images: Vec<_> = disk.chain().collect();
    for (i, img) in images.iter().enumerate() {
        let is_base = i + 1 == images.len();
        if img.format() == Format::Raw && !is_base {
            return Err(ChainError::Refused(format!(
                "{} is a raw incremental backup: raw files cannot tell unchanged blocks from zeroed ones, so it cannot be restored on top of its predecessor",
                img.path().display()
            )));
        }
    }
    Ok(disk)
}

/// Merges the chain in `dir` into `target_file`; returns the files merged, oldest first.
pub fn merge(dir: &Path, target_file: &Path, opts: &MergeOptions) -> Result<Vec<PathBuf>> {
    let (_, chain) = restore_chain(dir, &opts.select)?;
    let disk = open_chain(&chain)?;
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
            };
            convert::disk_to_qcow2(&disk, out_path, &copts, &out)?
        }
    }
    if let Some(tmp) = &staging {
        let at = |e| crate::qcow2::ErrorKind::Io(e).at(target_file);
        std::fs::rename(tmp, target_file).map_err(at)?;
        crate::qcow2::create::sync_parent(target_file).map_err(at)?;
    }
    dirs.keep();
    Ok(chain.paths())
}

/// `.<name>.merging` beside `target`: where a merge writes before the rename.
pub fn staging_name(target: &Path) -> PathBuf {
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    target.with_file_name(format!(".{name}.merging"))
}
