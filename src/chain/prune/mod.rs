//! `qmprestore prune`: retention for backup chains and monthly folders.
//!
//! Which restore points stay is decided by PBS's keep rules ([`crate::store::keep`]); what
//! it takes to drop a point differs from PBS, because a point of a chain is data the later
//! points build on:
//! - points before the oldest kept one are folded into the FULL (as `commit --until` does),
//!   which then holds that point and is renamed after it (`FULL-<its epoch>-<disk>`: the new
//!   name is linked, the next INC re-linked to it, the old name unlinked);
//! - a point between kept ones is folded into the INC after it (what that INC does not
//!   overwrite itself is copied into it, it is re-linked to the point's predecessor, and the
//!   point's file goes);
//! - an older chain (files before the latest FULL) with no kept point goes whole, and so does
//!   a month folder (`--monthly`) with no kept point (never the newest one).
//!
//! Every change keeps every kept point restorable at every instant (see `commit` for the
//! order of a fold; a point folded into its successor stays readable through its file until
//! that file is deleted, last). The manifests of changed files are rewritten, not dropped
//! ([`Rewrite`]), and modification times keep the order the original restore tool sorts by.
//! A fold into the FULL is announced in a record in the disk folder's `.journal/` before it
//! starts, so that after an interruption the same command finishes it (fold, then rename)
//! before it looks at the rules again: a FULL caught between two points is never kept as a
//! point of its own.

use super::commit::{commit, fold, refuse_shrunk, FoldOptions};
use super::error::{ChainError, Result};
use super::links::{relink, remove_backup};
use super::throttle::Throttle;
use crate::qcow2::write::Writer;
use crate::qcow2::{Disk, ErrorKind, Extent};
use crate::store::folder::backup_dirs_below;
use crate::store::journal::{self, Rewrite};
use crate::store::keep::{select, Civil, Policy, Rule};
use crate::store::manifest::Manifest;
use crate::store::name::{file_name, parse_name};
use crate::store::place::{Folder, Kind, Place};
use crate::store::time::local_time;
use crate::store::{BackupDir, BackupFile, ChainSelect, Level};
use serde::{Deserialize, Serialize};

mod fold;
mod store;
use fold::{finish_interrupted, fold_into_full, fold_into_next, pending_records, FoldRecord};
use std::path::{Path, PathBuf};
pub use store::{
    forget_in, hold_manifests, manifests, release_manifests, stage, take_held_manifests,
};

/// What `prune` keeps and how it goes about it.
pub struct PruneOptions {
    pub policy: Policy,
    /// Only files whose name contains this (one disk of a flat folder).
    pub filter: Option<String>,
    pub dry_run: bool,
    pub rate_limit: Option<u64>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// What happens to one restore point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Keep,
    /// Folded into the FULL or into the INC after it.
    Fold,
    /// Deleted with its older chain or its month folder.
    Remove,
}

#[derive(Debug, Serialize)]
pub struct PointFate {
    /// The disk folder.
    pub dir: String,
    pub file: String,
    pub epoch: u64,
    pub time: String,
    /// The rule that keeps the point, if one does.
    pub kept_by: Option<Rule>,
    pub action: Action,
    /// The file that holds the point's data afterwards (a folded point: what it went into; a
    /// kept point whose file is folded into the FULL: the FULL's new name).
    pub into: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct PruneReport {
    pub dir: String,
    pub policy: String,
    pub dry_run: bool,
    pub points: Vec<PointFate>,
    /// Month folders that go whole.
    pub removed_folders: Vec<String>,
    /// Bytes of backup files deleted (folded or removed).
    pub bytes_freed: u64,
    /// Guest bytes the folds write into kept files.
    pub bytes_written: u64,
    pub notes: Vec<String>,
    /// The backup files deleted (or to delete), relative to `dir`: what a copy of the folder
    /// elsewhere (an object store) must lose too. Newest first within a chain, its FULL last:
    /// deleted in this order, what is left of a chain is always its beginning, whose files
    /// all find their backing files.
    #[serde(skip)]
    pub deleted: Vec<String>,
}

impl PruneReport {
    /// The readable report: a line per point, then the totals.
    pub fn human(&self) -> String {
        let would = if self.dry_run { "would " } else { "" };
        let mut s = String::new();
        for f in &self.removed_folders {
            s += &format!("{would}remove folder {f} (no point kept)\n");
        }
        for p in &self.points {
            let why = p.kept_by.map(|r| format!(" (keep-{})", r.name()));
            let line = match (p.action, &p.into) {
                (Action::Keep, Some(into)) => format!(
                    "keep   {} {}{}, {would}held by {into}",
                    p.time,
                    p.file,
                    why.unwrap_or_default()
                ),
                (Action::Keep, None) => {
                    format!("keep   {} {}{}", p.time, p.file, why.unwrap_or_default())
                }
                (Action::Fold, into) => format!(
                    "{would}fold {} {} into {}",
                    p.time,
                    p.file,
                    into.as_deref().unwrap_or("?")
                ),
                (Action::Remove, _) => format!("{would}remove {} {}", p.time, p.file),
            };
            s += &format!("{}: {line}\n", p.dir);
        }
        for n in &self.notes {
            s += &format!("note: {n}\n");
        }
        let (frees, writes) = if self.dry_run {
            ("would free", "would write")
        } else {
            ("freed", "wrote")
        };
        s + &format!(
            "{frees} {} bytes of backup files; {writes} {} bytes into kept files\n",
            self.bytes_freed, self.bytes_written
        )
    }
}

/// One disk folder: its backup files (in backup order) and their verdicts.
struct Unit {
    dir: PathBuf,
    /// The month folder it lies in (`--monthly` targets).
    month: Option<String>,
    /// What identifies the disk across month folders: its folder's path below the month.
    key: PathBuf,
    files: Vec<BackupFile>,
    kept: Vec<Option<Rule>>,
}

pub fn prune(dir: &Path, opts: &PruneOptions) -> Result<PruneReport> {
    crate::store::bucket::refuse_in_place(dir, "prune")?;
    if opts.policy.is_empty() {
        return Err(ChainError::Refused(
            "no keep rule above 0 given: prune would keep nothing (--keep-last N, --keep-daily N, ...)".into(),
        ));
    }
    let mut report = PruneReport {
        dir: dir.display().to_string(),
        policy: opts.policy.describe(),
        dry_run: opts.dry_run,
        points: Vec::new(),
        removed_folders: Vec::new(),
        bytes_freed: 0,
        bytes_written: 0,
        notes: Vec::new(),
        deleted: Vec::new(),
    };
    let months = month_folders(dir)?;
    let roots: Vec<(Option<String>, PathBuf)> = if months.is_empty() {
        vec![(None, dir.to_path_buf())]
    } else {
        months
            .iter()
            .map(|m| (Some(m.clone()), dir.join(m)))
            .collect()
    };
    if !opts.dry_run {
        finish_removals(dir)?;
    }
    let mut units = Vec::new();
    // Month folders that hold more than the disks pruned here (other disks than --filter
    // picks, COPY backups): never removed whole.
    let mut blocked = std::collections::HashSet::new();
    for (month, root) in &roots {
        if opts.filter.is_some() {
            blocked.extend(month.clone());
        }
        for d in backup_dirs_below(root, 1)? {
            if !opts.dry_run {
                finish_interrupted(&d, opts)?;
            } else if pending_records(&d)?.next().is_some() {
                report.notes.push(format!(
                    "{}: an interrupted prune is pending; it is completed first when run without --dry-run",
                    d.display()
                ));
            }
            let bd = BackupDir::scan(&d, opts.filter.as_deref())?;
            bd.refuse_partials()?;
            refuse_several_disks(&bd)?;
            let all = bd.files.len();
            let files: Vec<BackupFile> = bd
                .files
                .into_iter()
                .filter(|f| f.level != Level::Copy)
                .collect();
            if files.len() < all {
                blocked.extend(month.clone());
            }
            if files.is_empty() {
                continue;
            }
            units.push(Unit {
                key: d.strip_prefix(root).unwrap_or(&d).to_path_buf(),
                dir: d,
                month: month.clone(),
                kept: vec![None; files.len()],
                files,
            });
        }
    }
    if units.is_empty() {
        return Err(ChainError::Refused(format!(
            "{}: no backup files found",
            dir.display()
        )));
    }
    decide(&mut units, &opts.policy);
    // Month folders no rule keeps a point of go whole; never the newest.
    let newest = months.last().cloned();
    for m in &months {
        let here: Vec<&Unit> = units
            .iter()
            .filter(|u| u.month.as_ref() == Some(m))
            .collect();
        if Some(m) != newest.as_ref()
            && !blocked.contains(m)
            && here.iter().all(|u| u.kept.iter().all(Option::is_none))
        {
            report.removed_folders.push(m.clone());
        }
    }
    for u in &units {
        let gone = u
            .month
            .as_ref()
            .is_some_and(|m| report.removed_folders.contains(m));
        prune_unit(u, dir, gone, opts, &mut report)?;
    }
    for m in report.removed_folders.clone() {
        report.bytes_freed += folder_bytes(&dir.join(&m));
        if !opts.dry_run {
            remove_folder(dir, &m)?;
        }
    }
    Ok(report)
}

/// The `YYYY-MM` folders of a `--monthly` target, oldest first.
fn month_folders(dir: &Path) -> Result<Vec<String>> {
    let place = Folder::new(dir);
    let at = |e| ErrorKind::Io(e).at(dir);
    let mut months: Vec<String> = place
        .list("")
        .map_err(at)?
        .into_iter()
        .filter(|e| e.kind == Kind::Folder && is_month(&e.name))
        .map(|e| e.name)
        .collect();
    months.sort();
    Ok(months)
}

fn is_month(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 7
        && b[4] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || c.is_ascii_digit())
}

/// A flat folder with several disks' files needs `--filter`: one chain per prune.
fn refuse_several_disks(bd: &BackupDir) -> Result<()> {
    let mut disks: Vec<&str> = bd.files.iter().map(|f| f.disk.as_str()).collect();
    disks.sort();
    disks.dedup();
    if disks.len() > 1 {
        return Err(ChainError::Refused(format!(
            "{} holds backups of several disks ({}): pick one with --filter",
            bd.dir.display(),
            disks.join(", ")
        )));
    }
    Ok(())
}

/// Applies the policy to each disk's points across all its folders (a disk's key is its
/// folder below the month folder).
fn decide(units: &mut [Unit], policy: &Policy) {
    let mut keys: Vec<PathBuf> = units.iter().map(|u| u.key.clone()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let members: Vec<usize> = (0..units.len()).filter(|&i| units[i].key == key).collect();
        let epochs: Vec<u64> = members
            .iter()
            .flat_map(|&i| units[i].files.iter().map(|f| f.epoch))
            .collect();
        let mut verdicts = select(&epochs, policy, Civil::local).into_iter();
        for &i in &members {
            for k in units[i].kept.iter_mut() {
                *k = verdicts.next().expect("one verdict per point");
            }
        }
    }
}

/// Plans (and, unless a dry run, carries out) the prune of one disk folder.
fn prune_unit(
    u: &Unit,
    top: &Path,
    folder_goes: bool,
    opts: &PruneOptions,
    r: &mut PruneReport,
) -> Result<()> {
    let dir = u.dir.display().to_string();
    let rel = |name: &str| -> String {
        let p = u.dir.join(name);
        p.strip_prefix(top)
            .unwrap_or(&p)
            .to_string_lossy()
            .into_owned()
    };
    let fate =
        |f: &BackupFile, kept_by: Option<Rule>, action: Action, into: Option<String>| PointFate {
            dir: dir.clone(),
            file: f.name.clone(),
            epoch: f.epoch,
            time: local_time(f.epoch as i64),
            kept_by,
            action,
            into,
        };
    if folder_goes {
        for (f, k) in u.files.iter().zip(&u.kept) {
            r.points.push(fate(f, *k, Action::Remove, None));
        }
        return Ok(());
    }
    // The chains of the folder: each FULL starts one; the last is the one restored.
    let starts: Vec<usize> = (0..u.files.len())
        .filter(|&i| u.files[i].level == Level::Full)
        .collect();
    let Some(&current) = starts.last() else {
        return Err(ChainError::Refused(format!("{dir}: no FULL backup found")));
    };
    // INCs before the first FULL belong to no chain this folder can restore: they are left
    // alone, never deleted on a guess.
    if starts[0] > 0 {
        for (f, k) in u.files[..starts[0]].iter().zip(&u.kept) {
            r.points.push(fate(f, *k, Action::Keep, None));
        }
        r.notes.push(format!(
            "{dir}: {} INCs before the first FULL are left as they are",
            starts[0]
        ));
    }
    let held = prune_chain(u, current, opts, r, &fate, &rel)?;
    // Older chains go after the current one is done: while a prune is completed, an INC of
    // the current chain may still name a file of an older one.
    for (from, to) in starts.windows(2).map(|w| (w[0], w[1])) {
        let older = &u.files[from..to];
        let kept = u.kept[from..to].iter().any(Option::is_some);
        let action = if kept { Action::Keep } else { Action::Remove };
        for (f, k) in older.iter().zip(&u.kept[from..to]) {
            r.points.push(fate(f, *k, action, None));
        }
        if kept {
            r.notes.push(format!(
                "{dir}: the older chain from {} is kept whole: a rule keeps one of its points",
                older[0].name
            ));
            continue;
        }
        r.bytes_freed += older.iter().map(|f| f.size).sum::<u64>();
        r.deleted.extend(older.iter().rev().map(|f| rel(&f.name)));
        if !opts.dry_run {
            // Newest first: what is left is always a chain's beginning.
            for f in older.iter().rev() {
                remove_backup(&f.path)?;
            }
        }
    }
    if !opts.dry_run {
        follow_image_link(&u.dir, held.as_ref(), r)?;
    }
    Ok(())
}

/// The `image` link `rebase` leaves (it names the restore point chosen then): when its file
/// went, it names the renamed FULL if that holds the same point, and goes otherwise (its point
/// is gone; `rebase --until` picks another).
fn follow_image_link(
    dir: &Path,
    held: Option<&(String, String)>,
    r: &mut PruneReport,
) -> Result<()> {
    let link = dir.join("image");
    let Ok(target) = std::fs::read_link(&link) else {
        return Ok(());
    };
    if dir.join(&target).exists() {
        return Ok(());
    }
    let at = |e| ErrorKind::Io(e).at(&link);
    std::fs::remove_file(&link).map_err(at)?;
    match held {
        Some((point, full)) if target.as_os_str() == point.as_str() => {
            std::os::unix::fs::symlink(full, &link).map_err(at)?;
        }
        _ => r.notes.push(format!(
            "{}: its restore point {} was pruned, so the link went (rebase --until sets another)",
            link.display(),
            target.display()
        )),
    }
    crate::qcow2::storage::sync_parent(&link).map_err(at)?;
    Ok(())
}

/// What the report says of a point: its file, the rule that keeps it, the action, the file
/// that holds it afterwards.
type Fate<'a> = dyn Fn(&BackupFile, Option<Rule>, Action, Option<String>) -> PointFate + 'a;

/// Prunes the chain of `u` that starts at file `current` (the folder's latest FULL); returns
/// the point the FULL came to hold and its new name, if it folded.
fn prune_chain(
    u: &Unit,
    current: usize,
    opts: &PruneOptions,
    r: &mut PruneReport,
    fate: &Fate<'_>,
    rel: &dyn Fn(&str) -> String,
) -> Result<Option<(String, String)>> {
    let dir = u.dir.display().to_string();
    let chain = &u.files[current..];
    let kept = &u.kept[current..];
    let Some(first) = kept.iter().position(Option::is_some) else {
        r.notes.push(format!(
            "{dir}: no point of the chain is kept, but its month folder stays: the chain is kept whole"
        ));
        for (f, k) in chain.iter().zip(kept) {
            r.points.push(fate(f, *k, Action::Keep, None));
        }
        return Ok(None);
    };
    // The first INC names the FULL it builds on: a run interrupted between uploading a
    // renamed FULL and its re-linked INC (an object store) may have left the old name.
    if let (Some(inc), false) = (chain.get(1), opts.dry_run) {
        if super::links::backing_of(&inc.path)?.is_some_and(|(b, _)| b != chain[0].name) {
            relink(&inc.path, &chain[0].path)?;
        }
    }
    let mut held = None;
    let full_name = if first > 0 {
        let full = &chain[0];
        if !full.named_epoch {
            return Err(ChainError::Refused(format!(
                "{}: the FULL's name has no time (--no-timestamp), so its place in the chain is its modification time, which folding changes: prune keeps such a chain (commit --until folds it)",
                full.path.display()
            )));
        }
        let to = file_name(Level::Full, chain[first].epoch, &full.disk, true);
        for f in &chain[..first] {
            r.points.push(fate(f, None, Action::Fold, Some(to.clone())));
        }
        r.points.push(fate(
            &chain[first],
            kept[first],
            Action::Keep,
            Some(to.clone()),
        ));
        r.bytes_freed += chain[1..=first].iter().map(|f| f.size).sum::<u64>();
        r.deleted
            .extend(chain[1..=first].iter().rev().map(|f| rel(&f.name)));
        if to != full.name {
            r.deleted.push(rel(&full.name));
        }
        let record = FoldRecord {
            full: full.name.clone(),
            until: chain[first].name.clone(),
            rename_to: to.clone(),
            epoch: chain[first].epoch,
        };
        r.bytes_written += fold_into_full(&u.dir, &record, opts)?;
        held = Some((record.until, to.clone()));
        to
    } else {
        r.points.push(fate(&chain[0], kept[0], Action::Keep, None));
        chain[0].name.clone()
    };
    // Points between kept ones, oldest first, each into the file after it.
    let mut prev = u.dir.join(&full_name);
    for i in first + 1..chain.len() {
        let f = &chain[i];
        if kept[i].is_some() {
            r.points.push(fate(f, kept[i], Action::Keep, None));
            prev = f.path.clone();
            continue;
        }
        // The newest point is always kept (every rule keeps its period's newest).
        let Some(next) = chain.get(i + 1) else {
            r.points.push(fate(f, None, Action::Keep, None));
            continue;
        };
        r.points
            .push(fate(f, None, Action::Fold, Some(next.name.clone())));
        r.bytes_freed += f.size;
        r.deleted.push(rel(&f.name));
        r.bytes_written += fold_into_next(&prev, &f.path, &next.path, opts)?;
    }
    Ok(held)
}

/// The bytes of the files in a folder and its sub-folders.
fn folder_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// Where a month folder waits while it is deleted: a dot-name no scan takes for backups.
const REMOVING: &str = ".removing-";

/// Deletes month folder `month` of `target`: renamed out of sight first (one atomic step),
/// then deleted; an interruption leaves the renamed folder, which the next prune deletes.
fn remove_folder(target: &Path, month: &str) -> Result<()> {
    let from = target.join(month);
    let to = target.join(format!("{REMOVING}{month}"));
    let at = |e| ErrorKind::Io(e).at(&from);
    std::fs::rename(&from, &to).map_err(at)?;
    crate::qcow2::storage::sync_parent(&to).map_err(at)?;
    std::fs::remove_dir_all(&to).map_err(at)?;
    Ok(())
}

/// Finishes the deletions of month folders an interrupted prune began.
fn finish_removals(target: &Path) -> Result<()> {
    let at = |e| ErrorKind::Io(e).at(target);
    for e in std::fs::read_dir(target).map_err(at)? {
        let e = e.map_err(at)?;
        if e.file_name().to_string_lossy().starts_with(REMOVING) && e.path().is_dir() {
            std::fs::remove_dir_all(e.path()).map_err(at)?;
        }
    }
    Ok(())
}
