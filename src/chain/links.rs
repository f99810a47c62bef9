//! The links between backup files that the in-place commands (rebase, commit,
//! snapshotrebase, prune) read and change: the backing file an INC names, the manifest that
//! follows a file's change ([`Rewrite`]) or goes with the file, and the modification times
//! the original restore tool orders a folder by.

use super::error::Result;
use crate::qcow2::write::{self, Writer};
use crate::qcow2::{Disk, ErrorKind, Format};
use crate::store::journal::{self, Rewrite};
use crate::store::manifest::{self, Manifest};
use crate::store::place::{Folder, Place};
use std::path::Path;
use std::time::SystemTime;

/// The backing file name and format a backup file's header names, if any.
pub fn backing_of(path: &Path) -> Result<Option<(String, Option<String>)>> {
    let d = Disk::open_alone(path)?;
    Ok(d.qcow2().and_then(|q| {
        q.backing_name().map(|n| {
            (
                n.to_string_lossy().into_owned(),
                q.backing_format().map(str::to_string),
            )
        })
    }))
}

/// Whether a backup file names a backing file (the linked layout).
pub fn is_linked(path: &Path) -> Result<bool> {
    Ok(backing_of(path)?.is_some())
}

/// Sets `file`'s backing file name and format in place, unless the header already says so
/// (a backup file is never touched without need). Its manifest then names the backing file
/// as predecessor and has the header's new checksum; its modification time stays. A change
/// an interruption left half done (the header written, the manifest not yet) is completed.
pub fn set_backing(file: &Path, backing: &str, format: Format) -> Result<bool> {
    let (place, name) = Folder::of_file(file);
    let done = backing_of(file)? == Some((backing.to_string(), Some(format.name().to_string())));
    // The manifest says so too (an interrupted change may have ended without it).
    let told = Manifest::read(&place, &name).map_or(true, |m| m.parent.as_deref() == Some(backing));
    if done && told && !journal::pending(&place, &name) {
        return Ok(false);
    }
    // The new backing must open before anything changes, the manifest included.
    write::open_backing(file, std::ffi::OsStr::new(backing), Some(format.name()))?;
    let at = |e| ErrorKind::Io(e).at(file);
    let rw = Rewrite::begin(file).map_err(at)?;
    if !done {
        Writer::open(file)?.set_backing(Some((backing, Some(format))))?;
    }
    rw.finish(None, |m| m.parent = Some(backing.to_string()))
        .map_err(at)?;
    Ok(!done)
}

/// Makes INC `inc` build on `base` (same folder): the backing file its header names, if it
/// names one, and the predecessor its manifest names.
pub fn relink(inc: &Path, base: &Path) -> Result<()> {
    if is_linked(inc)? {
        return link_to(inc, base);
    }
    let (place, name) = Folder::of_file(inc);
    let base = base.file_name().expect("a file").to_string_lossy();
    let at = |e| ErrorKind::Io(e).at(place.locate(&manifest::name_for(&name)));
    match Manifest::read(&place, &name) {
        Ok(mut m) if m.parent.as_deref() != Some(&base) => {
            m.parent = Some(base.into_owned());
            m.write(&place).map_err(at)?;
        }
        _ => {}
    }
    Ok(())
}

/// The modification time of `file`.
pub fn mtime(file: &Path) -> Result<SystemTime> {
    std::fs::metadata(file)
        .and_then(|m| m.modified())
        .map_err(|e| ErrorKind::Io(e).at(file).into())
}

/// Points `inc`'s backing file at `full` (same directory, so by name, with its format).
pub fn link_to(inc: &Path, full: &Path) -> Result<()> {
    let name = full.file_name().expect("a file").to_string_lossy();
    let format = Disk::open_alone(full)?.format();
    set_backing(inc, &name, format)?;
    Ok(())
}

/// [`manifest::forget`] of backup file `file`, with the error naming the manifest.
pub fn forget_manifest(file: &Path) -> Result<()> {
    let (place, name) = Folder::of_file(file);
    manifest::forget(&place, &name).map_err(|e| {
        ErrorKind::Io(e)
            .at(place.locate(&manifest::name_for(&name)))
            .into()
    })
}

/// Deletes a folded backup file durably, its manifest and any journal first (so neither
/// outlives its file).
pub fn remove_backup(file: &Path) -> Result<()> {
    forget_manifest(file)?;
    let (place, name) = Folder::of_file(file);
    let at = |e| ErrorKind::Io(e).at(file);
    journal::discard(&place, &name).map_err(at)?;
    place.delete(&name).map_err(at)?;
    place.sync(&name).map_err(at)?;
    Ok(())
}
