//! `qmprestore snapshotrebase`: turn a chain into one image with an internal snapshot per
//! backup. The FULL first gets the snapshot `FULL-BACKUP` (when absent); then each INC, in
//! order, is folded in, a snapshot named after the INC's time (`%Y-%m-%d-%H:%M:%S`, local time,
//! as the original) is taken, and the INC is deleted. Each step is flushed before the next, so
//! a re-run after an interruption continues where it stopped: folding the same INC again
//! writes the same data, and an existing snapshot of that name is kept. The FULL's manifest
//! follows the change, as in commit.

use super::commit::{delete_behind, fold, newer_than_full, refuse_shrunk, FoldOptions};
use super::error::{ChainError, Result};
use super::links::{mtime, relink};
use super::throttle::Throttle;
use crate::qcow2::write::Writer;
use crate::qcow2::{Disk, ErrorKind, Format};
use crate::store::journal::Rewrite;
use crate::store::time::local_time;
use crate::store::{open_restore_point, RestorePoint};
use std::path::{Path, PathBuf};

pub const FULL_SNAPSHOT: &str = "FULL-BACKUP";

/// Snapshot name for a backup taken at `epoch`.
pub fn snapshot_name(epoch: u64) -> String {
    local_time(epoch as i64).replace(' ', "-")
}

/// One step of a snapshot rebase: fold an INC (none for the FULL's own snapshot), then take
/// the snapshot.
#[derive(Debug, Clone)]
pub struct Step {
    pub snapshot: String,
    pub folds: Option<PathBuf>,
}

/// Returns the steps in order; with `dry_run` what would be done.
pub fn snapshot_rebase(dir: &Path, opts: &FoldOptions) -> Result<Vec<Step>> {
    crate::store::bucket::refuse_in_place(dir, "snapshotrebase")?;
    // Validates every file (and refuses raw INCs) before anything changes.
    let RestorePoint {
        folder,
        chain,
        disk,
    } = open_restore_point(dir, &opts.select)?;
    let all = folder.chain()?;
    let full = chain.files[0].path.clone();
    if disk.chain().last().map(|i| i.format()) != Some(Format::Qcow2) {
        return Err(ChainError::Refused(format!(
            "{} is raw: internal snapshots need a qcow2 FULL",
            full.display()
        )));
    }
    refuse_shrunk(&disk)?;
    let size = disk.size();
    drop(disk);
    let mut plan = vec![Step {
        snapshot: FULL_SNAPSHOT.to_string(),
        folds: None,
    }];
    plan.extend(chain.files[1..].iter().map(|f| Step {
        snapshot: snapshot_name(f.epoch),
        folds: Some(f.path.clone()),
    }));
    if opts.dry_run {
        return Ok(plan);
    }
    let throttle = Throttle::new(opts.rate_limit);
    // Its length grows as each INC's ranges are known.
    let bar = super::progress::bytes(0, "snapshotrebase", opts.progress);
    let has = |name: &str| -> Result<bool> {
        let d = Disk::open_alone(&full)?;
        Ok(d.qcow2()
            .is_some_and(|q| q.snapshots().iter().any(|s| s.name == name)))
    };
    let stamp = match chain.files.last() {
        Some(f) if chain.files.len() > 1 => Some(mtime(&f.path)?),
        _ => None,
    };
    let at = |e| ErrorKind::Io(e).at(&full);
    let rw = Rewrite::begin(&full).map_err(at)?;
    if !has(FULL_SNAPSHOT)? {
        let mut w = Writer::open(&full)?;
        w.create_snapshot(FULL_SNAPSHOT)?;
        w.finish()?;
    }
    delete_behind(|deleter| {
        for (i, f) in chain.files.iter().enumerate().skip(1) {
            let name = snapshot_name(f.epoch);
            let pair = Disk::stack(&[full.clone(), f.path.clone()])?;
            let ranges = newer_than_full(&pair)?;
            bar.inc_length(ranges.iter().map(|e| e.length).sum());
            let mut w = Writer::open(&full)?;
            w.grow(pair.size())?;
            fold(&pair, &ranges, &mut w, &throttle, &bar)?;
            drop(pair);
            w.flush()?;
            if !has(&name)? {
                w.create_snapshot(&name)?;
            }
            w.finish()?;
            if let Some(next) = all.files.get(i + 1) {
                relink(&next.path, &full)?;
            }
            if deleter.send(f.path.clone()).is_err() {
                break;
            }
        }
        // The FULL is durable and holds what it holds; a re-run finds the journal and ends
        // here too.
        Ok(rw.finish(stamp, |m| m.virtual_size = size).map_err(at)?)
    })?;
    bar.finish_and_clear();
    Ok(plan)
}

/// The report of `qmprestore snapshotrebase`: a line per step.
pub fn describe(plan: &[Step], dry_run: bool) -> String {
    let would = if dry_run { "would " } else { "" };
    plan.iter()
        .map(|s| match &s.folds {
            Some(f) => format!(
                "{would}fold {} and snapshot it as {}\n",
                f.display(),
                s.snapshot
            ),
            None => format!("{would}snapshot the FULL as {} (when absent)\n", s.snapshot),
        })
        .collect()
}
