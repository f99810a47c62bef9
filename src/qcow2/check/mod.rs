//! Consistency check (and repair) of a qcow2 image, like `qemu-img check`.
//!
//! Every structure that owns host clusters is walked and its clusters counted: header, L1
//! tables (active and of each snapshot), L2 tables and the data they map (once per L1 table
//! that reaches them, as QEMU counts), the snapshot table, the refcount table and blocks, and
//! persistent bitmaps. The counts are then compared with the stored refcounts: a refcount
//! below the number of references is a corruption (a write could reuse a cluster still in
//! use), one above it a leak (wasted space). COPIED flags must be set exactly where the
//! refcount is 1, and no offset may be unaligned or lie past the end of the file.
//!
//! `check` exists to judge damaged images, so it opens what the reader refuses wherever QEMU
//! opens the image ([`Qcow2::open_for_check`]) and walks past every refusal the reader makes
//! of the metadata: each is reported as a corruption, in the reader's words with its offset
//! (the same functions decide and word both), and the walk goes on as QEMU's does. What QEMU
//! cannot open either (a header it does not understand) fails as every command does: exit 1.
//! Exit codes and summary are `qemu-img check`'s (see [`CheckReport`]).
//!
//! A repair only repairs refcounts (and the COPIED flags and bits that follow them). Where the
//! check found a fault in what maps guest data or a structure the reader refuses, a refcount
//! repair would take the broken mapping as the truth — free the clusters a cut or misplaced
//! table no longer reaches, write COPIED flags into whatever an L2 table pointer lands on, or
//! grow the file under a table that reads as zeros past its end — so it refuses and writes
//! nothing. So does a repair after a check that could not read everything.
//!
//! Memory: one counter per host cluster of the file (2 bytes, as QEMU), plus one L2 or refcount
//! block at a time; stored refcounts are compared block by block, not collected. A file may
//! claim any length (a sparse file costs nothing to make), so files of more than
//! [`MAX_CLUSTERS`] clusters are refused, and messages beyond [`MAX_MESSAGES`] are counted, not
//! kept.

mod compare;
mod repair;
mod report;
mod walk;

pub use report::CheckReport;
pub use walk::{Owner, Role};

use super::error::{ErrorKind, Result};
use super::image::Qcow2;
use std::path::Path;
use walk::Walk;

/// Most host clusters a file may span to be checked: 256 MiB of counters; 8 TiB of file with
/// 64 KiB clusters.
pub const MAX_CLUSTERS: u64 = 1 << 27;
/// Messages kept in a report; the rest are counted in a last line.
pub const MAX_MESSAGES: usize = 10_000;

/// What to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Lower refcounts that are too high.
    Leaks,
    /// Also raise refcounts that are too low, fix COPIED flags and clear the dirty bit.
    All,
}

/// Checks an image; `Err` only when it cannot be checked at all (unreadable header).
pub fn check(path: &Path) -> Result<CheckReport> {
    check_open(&Qcow2::open_for_check(path)?, path)
}

/// [`check`] of the image at `path`, already open as `q`.
pub fn check_open(q: &Qcow2, path: &Path) -> Result<CheckReport> {
    run(q, path, None)
}

/// What holds the bytes `[start, end)` of each of `ranges` (disjoint) in the image at `path`:
/// every counted structure and guest cluster whose host range overlaps one, found by the same
/// walk that counts references, so damage found in a file's bytes can be told in the guest's
/// terms. Bytes nothing counts get no owner.
pub fn owners(path: &Path, ranges: &[(u64, u64)]) -> Result<Vec<Owner>> {
    let q = Qcow2::open_for_check(path)?;
    let file = super::protocol::open(path).map_err(|e| ErrorKind::from(e).at(path))?;
    let mut w = Walk::new(&q, &*file, path)?;
    w.probe = ranges.to_vec();
    w.probe.sort_unstable();
    let entries = w
        .count_structures()
        .map_err(|e| ErrorKind::from(e).at(path))?;
    w.refcount_blocks(&entries);
    Ok(std::mem::take(&mut w.owners))
}

/// Checks and repairs an image in place; the report counts what was found and fixed.
pub fn repair(path: &Path, mode: Repair) -> Result<CheckReport> {
    let q = Qcow2::open_for_check(path)?;
    let incomplete = incomplete_snapshots(&q).count() as u64;
    // The table is written anew first (as QEMU's repair does), then refcounts are repaired
    // for the new table and the old one. Only when the refcount repair may write too (not
    // when entries were left out, for one: rewriting would drop them).
    if mode == Repair::All && incomplete > 0 {
        if let Some(why) = run(&q, path, None)?.unrepairable_reason() {
            return Err(refused(path, &why));
        }
        repair::complete_snapshot_table(path, &q)?;
        drop(q);
        let mut report = run(&Qcow2::open_for_check(path)?, path, Some(mode))?;
        report.corruptions_fixed += incomplete;
        let repaired =
            (0..incomplete).map(|i| format!("Repairing snapshot table entry {i} is incomplete"));
        report.messages.splice(0..0, repaired);
        return Ok(report);
    }
    run(&q, path, Some(mode))
}

/// Indices of the snapshot table entries a version 3 image lacks the 16 bytes of extra data
/// for (the version requires them; older versions may omit them).
fn incomplete_snapshots(q: &Qcow2) -> impl Iterator<Item = usize> + '_ {
    let v3 = q.header().version >= 3;
    q.snapshots()
        .iter()
        .enumerate()
        .filter(move |(_, s)| v3 && s.disk_size.is_none())
        .map(|(i, _)| i)
}

/// The error of a repair that must not write, and did not.
fn refused(path: &Path, why: &str) -> super::error::Error {
    ErrorKind::Unsupported(format!(
        "not repaired, nothing was written: {why}; a refcount repair would build on that"
    ))
    .at(path)
}

fn run(q: &Qcow2, path: &Path, repair: Option<Repair>) -> Result<CheckReport> {
    let at = |k: ErrorKind| k.at(path);
    let file = super::protocol::open(path).map_err(|e| at(e.into()))?;
    let h = q.header().clone();
    let cs = h.cluster_size();
    let mut w = Walk::new(q, &*file, path)?;
    let entries = w.count_structures().map_err(|e| at(e.into()))?;
    let blocks = w.refcount_blocks(&entries);
    if h.refcount_table_clusters > 0 {
        let (offset, len) = (
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * cs,
        );
        let shared = (offset / cs..offset.saturating_add(len).div_ceil(cs))
            .any(|c| w.refs.get(c as usize).is_some_and(|&r| r > 1));
        if offset < cs {
            w.corrupt_structure(format!(
                "refcount table at {offset:#x} overlaps the image header"
            ));
        } else if shared {
            w.corrupt_structure(format!(
                "refcount table at {offset:#x} shares clusters with other structures"
            ));
        }
    }
    let fixes = compare::compare(&mut w, &blocks, repair.is_some());
    if w.dropped > 0 {
        let n = w.dropped;
        w.report
            .messages
            .push(format!("({n} more messages not shown)"));
    }
    let Some(mode) = repair else {
        return Ok(w.report);
    };
    if let Some(why) = w.report.unrepairable_reason() {
        return Err(refused(path, &why));
    }
    if mode == Repair::Leaks && (h.corrupt() || w.rebuild) {
        let why = if h.corrupt() {
            "the image is marked corrupt"
        } else {
            "the refcount structure is damaged"
        };
        return Err(at(ErrorKind::Unsupported(format!(
            "{why}: repair it with --repair all"
        ))));
    }
    let mut report = w.report;
    let fixed = if w.rebuild {
        // The references the new structure must hold: all but the old structure's own.
        let mut refs = w.refs;
        let nb = refs.len() as u64;
        for &(off, len) in &w.refcount_structure {
            let clusters = (off / cs)..(off.saturating_add(len)).div_ceil(cs);
            for c in clusters.take_while(|&c| c < nb) {
                refs[c as usize] = refs[c as usize].saturating_sub(1);
            }
        }
        repair::rebuild_repairs(path, &h, &refs, q.file_len(), &fixes.copied)?;
        (report.leaks, report.refcount_corruptions)
    } else {
        repair::apply_repairs(path, &h, mode, &fixes)?
    };
    report.leaks_fixed = fixed.0;
    report.corruptions_fixed = fixed.1;
    report.leaks = report.leaks.saturating_sub(fixed.0);
    report.corruptions = report.corruptions.saturating_sub(fixed.1);
    Ok(report)
}
