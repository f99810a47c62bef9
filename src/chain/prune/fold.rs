//! The folds of a prune and what makes them restartable: into the FULL (with the record that
//! announces it and the rename that follows it) and into the INC after a point.

use super::*;

/// The record of a fold into the FULL, written before it starts (see the module docs).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct FoldRecord {
    /// The FULL's name before.
    pub(super) full: String,
    /// The INC whose point the FULL comes to hold.
    pub(super) until: String,
    /// The FULL's name after.
    pub(super) rename_to: String,
    pub(super) epoch: u64,
}

const RECORD_PREFIX: &str = "prune-";

fn record_name(full: &str) -> String {
    format!("{}/{RECORD_PREFIX}{full}.json", journal::FOLDER)
}

/// Folds the chain up to `record.until` into the FULL and renames it, the record durable
/// first; returns the guest bytes written (to write, in a dry run).
pub(super) fn fold_into_full(dir: &Path, record: &FoldRecord, opts: &PruneOptions) -> Result<u64> {
    let fold = FoldOptions {
        select: ChainSelect {
            until: Some(record.until.clone()),
            filter: opts.filter.clone(),
            allow_outside_backing: false,
        },
        dry_run: opts.dry_run,
        rate_limit: opts.rate_limit,
        progress: opts.progress,
    };
    // commit's refusals (a raw or damaged FULL, a shrunk disk, ...) come before the record.
    let bytes = commit(
        dir,
        &FoldOptions {
            dry_run: true,
            ..fold.clone()
        },
    )?
    .bytes;
    if opts.dry_run {
        return Ok(bytes);
    }
    let place = Folder::new(dir);
    let name = record_name(&record.full);
    let bytes = serde_json::to_vec_pretty(record).expect("a record serializes");
    place
        .write(&name, &bytes)
        .map_err(|e| ErrorKind::Io(e).at(place.locate(&name)))?;
    let written = commit(dir, &fold)?.bytes;
    rename_full(dir, record)?;
    discard_record(&place, &name)?;
    Ok(written)
}

/// The FULL, which now holds the point of `record.until`, takes the name of that point:
/// link the new name, give it the manifest, re-link the first INC, unlink the old name. Each
/// step finds the previous one done when run again.
fn rename_full(dir: &Path, record: &FoldRecord) -> Result<()> {
    let (old, new) = (dir.join(&record.full), dir.join(&record.rename_to));
    if old == new || !old.exists() {
        return Ok(());
    }
    let place = Folder::new(dir);
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e| ErrorKind::Io(e).at(&p)
    };
    if !new.exists() {
        std::fs::hard_link(&old, &new).map_err(at(&new))?;
        place.sync(&record.rename_to).map_err(at(&new))?;
    }
    if let Ok(mut m) = Manifest::read(&place, &record.full) {
        m.file = record.rename_to.clone();
        m.epoch = record.epoch;
        m.write(&place).map_err(at(&new))?;
    }
    let bd = BackupDir::scan_disk(dir, &disk_of(&record.full))?;
    let chain = bd.chain()?;
    if chain
        .files
        .first()
        .is_some_and(|f| f.name == record.rename_to)
    {
        if let Some(inc) = chain.files.get(1) {
            relink(&inc.path, &new)?;
        }
    }
    remove_backup(&old)
}

fn disk_of(name: &str) -> String {
    parse_name(name).map(|(_, _, d)| d).unwrap_or_default()
}

fn discard_record(place: &Folder, name: &str) -> Result<()> {
    let at = |e| ErrorKind::Io(e).at(place.locate(name));
    place.delete(name).map_err(at)?;
    place.sync(name).map_err(at)?;
    Ok(())
}

/// The fold records left in `dir` by an interrupted prune.
pub(super) fn pending_records(dir: &Path) -> Result<impl Iterator<Item = String>> {
    let place = Folder::new(dir);
    let list = place
        .list(journal::FOLDER)
        .map_err(|e| ErrorKind::Io(e).at(dir))?;
    Ok(list
        .into_iter()
        .map(|e| e.name)
        .filter(|n| n.starts_with(RECORD_PREFIX) && n.ends_with(".json")))
}

/// Completes what an interrupted prune recorded: the fold into the FULL (if its last INC is
/// still there), then the rename.
pub(super) fn finish_interrupted(dir: &Path, opts: &PruneOptions) -> Result<()> {
    let place = Folder::new(dir);
    for file in pending_records(dir)?.collect::<Vec<_>>() {
        let name = format!("{}/{file}", journal::FOLDER);
        let path = place.locate(&name);
        let bad = |e: &dyn std::fmt::Display| {
            ChainError::Refused(format!(
                "{}: record of an interrupted prune is unreadable: {e}",
                path.display()
            ))
        };
        let size = std::fs::metadata(&path).map_err(|e| bad(&e))?.len();
        if size > 64 << 10 {
            return Err(bad(&format!("{size} bytes")));
        }
        let text = std::fs::read(&path).map_err(|e| bad(&e))?;
        let record: FoldRecord = serde_json::from_slice(&text).map_err(|e| bad(&e))?;
        // Plain backup file names of one disk, nothing that leads elsewhere.
        let disk = disk_of(&record.full);
        let plain = |n: &str| {
            !n.contains('/') && parse_name(n).is_some_and(|(_, _, d)| d == disk && !d.is_empty())
        };
        if ![&record.full, &record.until, &record.rename_to]
            .iter()
            .all(|n| plain(n))
        {
            return Err(bad(&"it names files that are no backups of one disk here"));
        }
        if opts
            .filter
            .as_ref()
            .is_some_and(|f| !record.full.contains(f.as_str()))
        {
            continue;
        }
        tracing::info!(
            "{}: completing an interrupted prune: {} comes to hold {} as {}",
            dir.display(),
            record.full,
            record.until,
            record.rename_to
        );
        if dir.join(&record.full).exists() && dir.join(&record.until).exists() {
            let fold = PruneOptions {
                policy: opts.policy.clone(),
                filter: opts.filter.clone(),
                dry_run: false,
                rate_limit: opts.rate_limit,
                progress: opts.progress,
            };
            fold_into_full(dir, &record, &fold)?;
        } else {
            rename_full(dir, &record)?;
            discard_record(&place, &name)?;
        }
    }
    Ok(())
}

/// Folds INC `inc` into `next`, the INC after it: what `next` does not hold itself (data or
/// zeros) is copied into it, then `next` is re-linked to `prev` and `inc` deleted. Returns the
/// guest bytes written (to write, in a dry run).
pub(super) fn fold_into_next(
    prev: &Path,
    inc: &Path,
    next: &Path,
    opts: &PruneOptions,
) -> Result<u64> {
    let pair = Disk::stack(&[inc.to_path_buf(), next.to_path_buf()])?;
    refuse_shrunk(&pair)?;
    let top = pair.chain().next().expect("two layers");
    let Some(q) = top.qcow2() else {
        return Err(ChainError::Refused(format!(
            "{} is raw: folding a point into it needs qcow2",
            next.display()
        )));
    };
    let cs = q.cluster_size();
    let size = pair.size();
    let mut ranges = Vec::new();
    pair.for_each_extent(0, size, |e| {
        // Allocated in `inc` (not merely read as zeros past the bottom of the pair).
        if e.depth == 1 && e.present && (e.data || e.zero) {
            ranges.push(Extent { depth: 0, ..e });
        }
        Ok(())
    })?;
    // Whole clusters of `next` only: a partial one would be completed from its backing file,
    // which is `inc` until the relink and its predecessor after.
    if let Some(e) = ranges.iter().find(|e| {
        e.start % cs != 0 || ((e.start + e.length) % cs != 0 && e.start + e.length != size)
    }) {
        return Err(ChainError::Refused(format!(
            "{}: guest bytes {}..{} do not cover whole clusters of {} ({cs} bytes): the files have different cluster sizes; use merge",
            inc.display(),
            e.start,
            e.start + e.length,
            next.display()
        )));
    }
    // A version 2 image has no zero flag: a zeroed range written into an INC that names no
    // backing file would stay unallocated, which there means "unchanged".
    let zeros = ranges.iter().any(|e| e.zero && !e.data);
    if zeros && q.header().version < 3 && q.backing_name().is_none() {
        return Err(ChainError::Refused(format!(
            "{}: a qcow2 version 2 INC without a backing file name cannot take the zeroed ranges of {}: use merge",
            next.display(),
            inc.display()
        )));
    }
    let bytes = ranges.iter().map(|e| e.length).sum();
    if opts.dry_run {
        return Ok(bytes);
    }
    drop(pair);
    let at = |e| ErrorKind::Io(e).at(next);
    let rw = Rewrite::begin(next).map_err(at)?;
    let mut w = Writer::open(next)?;
    let throttle = Throttle::new(opts.rate_limit);
    let bar = crate::chain::progress::bytes(bytes, "prune", opts.progress);
    fold(&Disk::open_alone(inc)?, &ranges, &mut w, &throttle, &bar)?;
    w.finish()?;
    bar.finish_and_clear();
    rw.finish(None, |_| {}).map_err(at)?;
    relink(next, prev)?;
    remove_backup(inc)?;
    Ok(bytes)
}
