//! The links between backup files that the in-place commands (rebase, commit,
//! snapshotrebase) read and change: the backing file an INC names, and the manifests that
//! must go before a file changes or disappears.

use super::error::Result;
use crate::qcow2::write::{self, Writer};
use crate::qcow2::{Disk, ErrorKind, Format};
use crate::store::manifest;
use crate::store::place::{Folder, Place};
use std::path::Path;

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
/// (a backup file is never touched without need; its manifest goes first when it is).
pub fn set_backing(file: &Path, backing: &str, format: Format) -> Result<bool> {
    if backing_of(file)? == Some((backing.to_string(), Some(format.name().to_string()))) {
        return Ok(false);
    }
    // The new backing must open before anything changes, the manifest included.
    write::open_backing(file, std::ffi::OsStr::new(backing), Some(format.name()))?;
    forget_manifest(file)?;
    Writer::open(file)?.set_backing(Some((backing, Some(format))))?;
    Ok(true)
}

/// Points `inc`'s backing file at `full` (same directory, so by name).
pub fn link_to(inc: &Path, full: &Path) -> Result<()> {
    let name = full.file_name().expect("a file").to_string_lossy();
    set_backing(inc, &name, Format::Qcow2)?;
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

/// Deletes a folded backup file durably, its manifest first (so no manifest outlives its
/// file).
pub fn remove_backup(file: &Path) -> Result<()> {
    forget_manifest(file)?;
    let (place, name) = Folder::of_file(file);
    let at = |e| ErrorKind::Io(e).at(file);
    place.delete(&name).map_err(at)?;
    place.sync(&name).map_err(at)?;
    Ok(())
}
