//! Which backup files a restore uses: the chain of a folder up to the restore point, what its
//! files may name as backing files, and the chain opened as one disk.

use super::error::StoreError;
use super::folder::{BackupDir, Chain};
use crate::qcow2::{Disk, Format};
use std::path::{Path, PathBuf};

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

/// A restore point of a backup folder: the folder, the chain up to the point, and its files
/// opened once as one disk.
pub struct RestorePoint {
    pub folder: BackupDir,
    pub chain: Chain,
    pub disk: Disk,
}

/// Opens the restore point of `dir` that `select` names, every file once. Backing file names
/// that lead out of the directory (absolute, or through `..`) are refused unless allowed: a
/// hostile or misplaced backup must not make a restore read (or a commit copy) files from
/// elsewhere on the host. Raw INCs are refused (see [`open_chain`]).
pub fn open_restore_point(dir: &Path, select: &ChainSelect) -> Result<RestorePoint, StoreError> {
    let folder = BackupDir::scan(dir, select.filter.as_deref())?;
    folder.refuse_partials()?;
    let mut chain = folder.chain()?;
    if let Some(u) = &select.until {
        chain = chain.until(u, dir)?;
    }
    if let Some(f) = chain.files.iter().find(|f| f.pushed.is_some()) {
        return Err(StoreError::Refused(format!(
            "{}: {} was uploaded to an object store and removed here (qmpbackup --push-only); only its manifest is left: restore from the object store (--dir s3://BUCKET/PREFIX/...)",
            dir.display(),
            f.name
        )));
    }
    let disk = open_chain(&chain)?;
    if !select.allow_outside_backing {
        for image in disk.chain() {
            let name = image.qcow2().and_then(|q| q.backing_name());
            refuse_outside_backing(image.path(), name)?;
        }
    }
    Ok(RestorePoint {
        folder,
        chain,
        disk,
    })
}

/// Refuses `file` if its backing file name is absolute or climbs out of its directory.
fn refuse_outside_backing(file: &Path, name: Option<&std::ffi::OsStr>) -> Result<(), StoreError> {
    let Some(name) = name else {
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
        return Err(StoreError::Refused(format!(
            "{}: backing file {} lies outside the backup directory; pass --allow-outside-backing if that is intended",
            file.display(),
            name.display()
        )));
    }
    Ok(())
}

/// Opens the chain as one disk, refusing raw INCs: a raw file cannot tell "unchanged" from
/// "zero", so it cannot be laid over its predecessor.
fn open_chain(chain: &Chain) -> Result<Disk, StoreError> {
    let paths: Vec<PathBuf> = chain.paths();
    let disk = Disk::stack(&paths)?;
    let images: Vec<_> = disk.chain().collect();
    for (i, img) in images.iter().enumerate() {
        let is_base = i + 1 == images.len();
        if img.format() == Format::Raw && !is_base {
            return Err(StoreError::Refused(format!(
                "{} is a raw incremental backup: raw files cannot tell unchanged blocks from zeroed ones, so it cannot be restored on top of its predecessor",
                img.path().display()
            )));
        }
    }
    Ok(disk)
}
