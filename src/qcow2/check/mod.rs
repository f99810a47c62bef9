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
//! Memory: one counter per host cluster of the file (2 bytes, as QEMU), plus one L2 or refcount
//! block at a time; stored refcounts are compared block by block, not collected. A file may
//! claim any length (a sparse file costs nothing to make), so files of more than
//! [`MAX_CLUSTERS`] clusters are refused, and messages beyond [`MAX_MESSAGES`] are counted, not
//! kept.

mod repair;
mod report;
mod walk;

pub use report::CheckReport;

use super::error::{ErrorKind, Result};
use super::header;
use super::image::Qcow2;
use super::l1;
use super::l2;
use super::refcount;
use super::storage::read_exact;
use std::collections::HashMap;
use std::path::Path;
use walk::{Copied, Walk};

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

/// Checks and repairs an image in place; the report counts what was found and fixed.
pub fn repair(path: &Path, mode: Repair) -> Result<CheckReport> {
    let q = Qcow2::open_for_check(path)?;
    let incomplete = incomplete_snapshots(&q).count() as u64;
    // The table is written anew first (as QEMU's repair does), then refcounts are repaired
    // for the new table and the old one. Not when entries were left out: rewriting would drop
    // them.
    if mode == Repair::All && incomplete > 0 && q.check_findings().is_empty() {
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

fn run(q: &Qcow2, path: &Path, repair: Option<Repair>) -> Result<CheckReport> {
    let at = |k: ErrorKind| k.at(path);
    let file = super::protocol::open(path).map_err(|e| at(e.into()))?;
    let file = &*file;
    let h = q.header().clone();
    let cs = h.cluster_size();
    let file_len = q.file_len();
    let nb = file_len.div_ceil(cs);
    if nb > MAX_CLUSTERS {
        return Err(at(ErrorKind::Unsupported(format!(
            "the file is {file_len} bytes long: {nb} clusters, more than the {MAX_CLUSTERS} \
             a check can count"
        ))));
    }
    let mut w = Walk {
        q,
        file,
        cs,
        refs: vec![0; nb as usize],
        report: CheckReport {
            filename: path.display().to_string(),
            format: "qcow2",
            total_clusters: h.size.div_ceil(cs),
            ..Default::default()
        },
        copied: Vec::new(),
        dropped: 0,
        rebuild: false,
        refcount_structure: Vec::new(),
    };
    for finding in q.check_findings() {
        w.corrupt(finding.clone());
    }
    w.reference(0, cs, "header");
    let active = l1::read_table(file, h.l1_table_offset, h.l1_size).map_err(at)?;
    w.reference(h.l1_table_offset, h.l1_size as u64 * 8, "L1 table");
    w.walk_l1(&active, true);
    w.reference(h.snapshots_offset, q.snapshot_table_len(), "snapshot table");
    if q.data_file().is_some() && h.nb_snapshots > 0 {
        w.corrupt(format!(
            "{} snapshots in image with data file",
            h.nb_snapshots
        ));
    }
    for i in incomplete_snapshots(q) {
        w.corrupt(format!("snapshot table entry {i} is incomplete"));
    }
    for s in q.snapshots() {
        w.reference(s.l1_table_offset, s.l1_size as u64 * 8, "snapshot L1 table");
        match l1::read_table(file, s.l1_table_offset, s.l1_size) {
            Ok(t) => w.walk_l1(&t, false),
            Err(_) => w.report.check_errors += 1,
        }
    }
    let entries = refcount::read_entries(
        file,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        h.cluster_bits,
    )
    .map_err(at)?;
    let table_len = h.refcount_table_clusters as u64 * cs;
    w.reference(h.refcount_table_offset, table_len, "refcount table");
    w.refcount_structure
        .push((h.refcount_table_offset, table_len));
    if let Some(ext) = &q.extensions().bitmaps {
        if h.autoclear_features & header::autoclear::BITMAPS != 0 {
            w.reference(ext.directory_offset, ext.directory_size, "bitmap directory");
            for b in q.bitmaps() {
                w.reference(b.table_offset, b.table_size as u64 * 8, "bitmap table");
                let mut t = vec![0u8; b.table_size as usize * 8];
                if read_exact(file, &mut t, b.table_offset, "bitmap table").is_ok() {
                    for e in t.chunks_exact(8) {
                        let off = u64::from_be_bytes(e.try_into().unwrap()) & l2::OFFSET_MASK;
                        if off != 0 {
                            w.reference(off, cs, "bitmap data");
                        }
                    }
                }
            }
        }
    }
    let rt = w.refcount_blocks(&entries);
    if h.refcount_table_clusters == 0 {
        w.rebuild = true;
    } else {
        let first = h.refcount_table_offset / cs;
        let shared = (first..(h.refcount_table_offset + table_len).div_ceil(cs))
            .any(|c| w.refs.get(c as usize).is_some_and(|&r| r > 1));
        if h.refcount_table_offset < cs {
            w.corrupt_structure(format!(
                "refcount table at {:#x} overlaps the image header",
                h.refcount_table_offset
            ));
        } else if shared {
            w.corrupt_structure(format!(
                "refcount table at {:#x} shares clusters with other structures",
                h.refcount_table_offset
            ));
        }
    }
    // Stored refcounts, block by block.
    let fmt = refcount::RefcountFormat {
        cluster_bits: h.cluster_bits,
        order: h.refcount_order,
    };
    let per_block = fmt.block_entries();
    // Stored refcounts are kept only where COPIED flags need them.
    let wanted: std::collections::HashSet<u64> = w.copied.iter().map(|c| c.cluster(cs)).collect();
    let mut stored: HashMap<u64, u64> = HashMap::new();
    let mut too_low = Vec::new();
    let mut too_high = Vec::new();
    let mut highest = None;
    let mut block = vec![0u8; cs as usize];
    for t in 0..nb.div_ceil(per_block) {
        let first = t * per_block;
        let have = match rt.get(t as usize) {
            Some(&b) if b != 0 => {
                let ok = read_exact(file, &mut block, b, "refcount block").is_ok();
                if !ok {
                    w.report.check_errors += 1;
                }
                ok
            }
            _ => false,
        };
        for c in first..(first + per_block).min(nb) {
            let s = if have {
                refcount::get(&block, c - first, fmt.order)
            } else {
                0
            };
            let r = w.refs[c as usize] as u64;
            if s == 0 && r == 0 {
                continue;
            }
            highest = Some(c);
            if wanted.contains(&c) {
                stored.insert(c, s);
            }
            if s == 0 {
                // As QEMU: a cluster in use that looks free cannot be patched safely (the
                // patch itself could allocate it).
                w.rebuild = true;
            }
            if s < r {
                w.corrupt_refcount(format!("cluster {c} refcount={s} reference={r}"));
                if repair.is_some() {
                    too_low.push((c, r));
                }
            } else if s > r {
                w.report.leaks += 1;
                w.message(format!("Leaked cluster {c} refcount={s} reference={r}"));
                if repair.is_some() {
                    too_high.push((c, r));
                }
            }
        }
    }
    // COPIED must say "refcount is 1": reported against the stored refcounts, repaired
    // against the counted references (what a full repair makes the refcounts).
    let external = q.data_file().is_some();
    let entry_size = if h.extended_l2() { 16 } else { 8 };
    // (entry offset, entry, host cluster, whose refcount is implicitly 1)
    let flags: Vec<(u64, u64, u64, bool)> = w
        .copied
        .iter()
        .map(|c| match *c {
            Copied::L1 { index, entry } => (
                h.l1_table_offset + index as u64 * 8,
                entry.0,
                c.cluster(cs),
                false,
            ),
            Copied::L2 {
                table,
                index,
                entry,
                cluster,
            } => (
                table + index as u64 * entry_size,
                entry.word,
                cluster,
                external,
            ),
        })
        .collect();
    let mut copied_fixes = Vec::new();
    for &(off, word, c, implicit) in &flags {
        // L1 and L2 entries keep COPIED in the same bit.
        let copied = word & l1::COPIED != 0;
        let stored_single = implicit || stored.get(&c) == Some(&1);
        if stored_single != copied {
            w.corrupt_refcount(format!("OFLAG_COPIED: entry at {off:#x} is {word:#018x}"));
        }
        let counted_single = implicit || w.refs.get(c as usize) == Some(&1);
        if counted_single != copied {
            copied_fixes.push((off, word ^ l1::COPIED));
        }
    }
    // QEMU: the end of the last cluster in use.
    w.report.image_end_offset = highest.map_or(0, |c| (c + 1) * cs);
    if w.dropped > 0 {
        let n = w.dropped;
        w.report
            .messages
            .push(format!("({n} more messages not shown)"));
    }
    let mut report = w.report;
    if let Some(mode) = repair {
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
        let fixed = if w.rebuild {
            // The references the new structure must hold: all but the old structure's own.
            let mut refs = w.refs;
            for &(off, len) in &w.refcount_structure {
                let clusters = (off / cs)..(off.saturating_add(len)).div_ceil(cs);
                for c in clusters.take_while(|&c| c < nb) {
                    refs[c as usize] = refs[c as usize].saturating_sub(1);
                }
            }
            repair::rebuild_repairs(path, &h, &refs, file_len, &copied_fixes)?;
            (report.leaks, report.refcount_corruptions)
        } else {
            repair::apply_repairs(path, &h, mode, &too_low, &too_high, &copied_fixes)?
        };
        report.leaks_fixed = fixed.0;
        report.corruptions_fixed = fixed.1;
        report.leaks = report.leaks.saturating_sub(fixed.0);
        report.corruptions = report.corruptions.saturating_sub(fixed.1);
    }
    Ok(report)
}
