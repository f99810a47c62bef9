//! Writing repairs: refcounts patched in place or a new refcount structure, COPIED flags, the
//! dirty and corrupt bits, a completed snapshot table. Each write is made durable before the
//! next one depends on it.

use super::compare::Fixes;
use super::Repair;
use crate::qcow2::alloc::Refcounts;
use crate::qcow2::error::{ErrorKind, Result};
use crate::qcow2::fault::pwrite;
use crate::qcow2::header::{self, Header};
use crate::qcow2::image::Qcow2;
use crate::qcow2::snapshot;
use std::fs::File;
use std::path::Path;

/// Writes the snapshot table again with full extra data past the end of the file and switches
/// the header to it; the old table's clusters become leaks and the new ones are counted by the
/// refcount repair that follows.
pub(super) fn complete_snapshot_table(path: &Path, q: &Qcow2) -> Result<()> {
    let at = |k: ErrorKind| k.at(path);
    let io = |e: std::io::Error| at(e.into());
    let h = q.header();
    let (file, _ours) = crate::qcow2::lock::open_for_write(path).map_err(at)?;
    let bytes = snapshot::encode_table(q.snapshots(), h.size);
    let offset = q.file_len().div_ceil(h.cluster_size()) * h.cluster_size();
    pwrite(&file, &bytes, offset).map_err(io)?;
    file.sync_data().map_err(io)?;
    let mut nh = h.clone();
    nh.snapshots_offset = offset;
    pwrite(&file, &nh.to_bytes(), 0).map_err(io)?;
    file.sync_data().map_err(io)
}

/// Writes the repairs: raised refcounts first (a crash then leaves leaks, never corruption),
/// then COPIED flags, then lowered refcounts, then the header bits. Returns (leaks, corruptions)
/// fixed.
pub(super) fn apply_repairs(
    path: &Path,
    h: &Header,
    mode: Repair,
    fixes: &Fixes,
) -> Result<(u64, u64)> {
    let Fixes {
        too_low,
        too_high,
        copied,
    } = fixes;
    let at = |k: ErrorKind| k.at(path);
    let (file, _ours) = crate::qcow2::lock::open_for_write(path).map_err(at)?;
    let mut refs = Refcounts::load(&file, h).map_err(at)?;
    let mut fixed_corruptions = 0;
    if mode == Repair::All {
        for &(c, r) in too_low.iter() {
            refs.set(&file, c, r).map_err(at)?;
            fixed_corruptions += 1;
        }
        if refs.write_back(&file).map_err(at)?.is_some() {
            return Err(at(ErrorKind::Unsupported(
                "repair would need a larger refcount table".into(),
            )));
        }
        file.sync_data().map_err(|e| at(e.into()))?;
        write_copied(&file, copied).map_err(at)?;
        fixed_corruptions += copied.len() as u64;
    }
    for &(c, r) in too_high.iter() {
        refs.set(&file, c, r).map_err(at)?;
    }
    refs.write_back(&file).map_err(at)?;
    file.sync_data().map_err(|e| at(e.into()))?;
    if mode == Repair::All {
        clear_flags(&file, h).map_err(at)?;
    }
    Ok((too_high.len() as u64, fixed_corruptions))
}

/// Replaces the refcount structure with one built from the counted references, then fixes
/// COPIED flags against them and clears the dirty and corrupt bits.
pub(super) fn rebuild_repairs(
    path: &Path,
    h: &Header,
    refs: &[u16],
    file_len: u64,
    copied: &[(u64, u64)],
) -> Result<()> {
    let at = |k: ErrorKind| k.at(path);
    let (file, _ours) = crate::qcow2::lock::open_for_write(path).map_err(at)?;
    let switched = crate::qcow2::rebuild::rebuild(&file, h, refs, file_len).map_err(at)?;
    write_copied(&file, copied).map_err(at)?;
    clear_flags(&file, &switched).map_err(at)
}

/// Writes corrected L1/L2 entries (COPIED flags), durably.
fn write_copied(file: &File, copied: &[(u64, u64)]) -> std::result::Result<(), ErrorKind> {
    for &(off, word) in copied {
        pwrite(file, &word.to_be_bytes(), off)?;
    }
    Ok(file.sync_data()?)
}

/// Clears the dirty and corrupt bits of header `h` (written only when one is set).
fn clear_flags(file: &File, h: &Header) -> std::result::Result<(), ErrorKind> {
    if !(h.dirty() || h.corrupt()) {
        return Ok(());
    }
    let mut nh = h.clone();
    nh.incompatible_features &= !(header::incompat::DIRTY | header::incompat::CORRUPT);
    pwrite(file, &nh.to_bytes(), 0)?;
    Ok(file.sync_data()?)
}
