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

use super::alloc::Refcounts;
use super::error::{ErrorKind, Result};
use super::header::{self, Header};
use super::image::Qcow2;
use super::l1::{self, L1Entry};
use super::l2::{self, L2Entry, L2Format, L2Table, Subcluster};
use super::refcount;
use super::storage::read_exact;
use crate::qcow2::fault::pwrite;
use serde::Serialize;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

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

/// The result, with `qemu-img check --output=json` field names.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    pub filename: String,
    pub format: &'static str,
    pub check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// One line per problem found, QEMU's wording where it has one.
    #[serde(skip)]
    pub messages: Vec<String>,
    /// The corruptions that only concern refcounts or COPIED flags (included in
    /// `corruptions`): what rebuilding the refcounts from the mapping repairs, as QEMU does on
    /// opening an image with the dirty bit set.
    #[serde(skip)]
    pub refcount_corruptions: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl CheckReport {
    /// `qemu-img check`'s human summary.
    pub fn human(&self) -> String {
        let r = self;
        let mut s = String::new();
        if r.corruptions == 0 && r.leaks == 0 {
            s.push_str("No errors were found on the image.\n");
        }
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.leaks_fixed + r.corruptions_fixed > 0 {
            s.push_str(&format!(
                "Repaired: {} leaked clusters, {} corruptions.\n",
                r.leaks_fixed, r.corruptions_fixed
            ));
        }
        let pct = |n: u64| 100.0 * n as f64 / r.total_clusters.max(1) as f64;
        let pct_of = |n: u64| 100.0 * n as f64 / r.allocated_clusters.max(1) as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\nImage end offset: {}\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters),
            pct_of(r.fragmented_clusters),
            pct_of(r.compressed_clusters),
            r.image_end_offset
        ));
        s
    }

    /// `qemu-img check`'s exit code: 0 clean, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> u8 {
        if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// A COPIED flag to verify once refcounts are known.
enum Copied {
    L1 {
        index: usize,
        entry: L1Entry,
    },
    L2 {
        table: u64,
        index: usize,
        entry: L2Entry,
        cluster: u64,
    },
}

impl Copied {
    /// The host cluster whose refcount the flag must agree with.
    fn cluster(&self, cs: u64) -> u64 {
        match self {
            Copied::L1 { entry, .. } => entry.l2_offset() / cs,
            Copied::L2 { cluster, .. } => *cluster,
        }
    }
}

struct Walk<'a> {
    q: &'a Qcow2,
    file: &'a File,
    cs: u64,
    /// References counted per host cluster (saturating).
    refs: Vec<u16>,
    report: CheckReport,
    copied: Vec<Copied>,
    /// Messages not kept (beyond [`MAX_MESSAGES`]).
    dropped: u64,
}

impl Walk<'_> {
    fn message(&mut self, msg: String) {
        if self.report.messages.len() < MAX_MESSAGES {
            self.report.messages.push(msg);
        } else {
            self.dropped += 1;
        }
    }

    fn corrupt(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.message(format!("ERROR {msg}"));
    }

    fn corrupt_refcount(&mut self, msg: String) {
        self.report.refcount_corruptions += 1;
        self.corrupt(msg);
    }

    /// Counts one reference on every cluster of `[off, off + len)`.
    fn reference(&mut self, off: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let first = off / self.cs;
        let last = off.saturating_add(len - 1) / self.cs;
        for c in first..=last {
            match self.refs.get_mut(c as usize) {
                Some(r) => *r = r.saturating_add(1),
                None => {
                    self.corrupt(format!(
                        "{what} at {off:#x} lies beyond the end of the image file"
                    ));
                    return;
                }
            }
        }
    }

    fn walk_l1(&mut self, table: &[L1Entry], active: bool) {
        let fmt = L2Format::of(self.q.header());
        for (i, e) in table.iter().enumerate() {
            let off = e.l2_offset();
            if off == 0 {
                continue;
            }
            if off % self.cs != 0 {
                self.corrupt(format!("L2 table offset {off:#x} unaligned (L1 index {i})"));
                continue;
            }
            if active {
                self.copied.push(Copied::L1 {
                    index: i,
                    entry: *e,
                });
            }
            self.reference(off, self.cs, "L2 table");
            let mut bytes = vec![0u8; self.cs as usize];
            if read_exact(self.file, &mut bytes, off, "L2 table").is_err() {
                self.report.check_errors += 1;
                continue;
            }
            let l2 = L2Table::parse(&bytes, fmt.extended);
            self.walk_l2(&fmt, &l2, off, i as u64, active);
        }
    }

    /// Fragmentation is counted as QEMU does: per L2 table, a data cluster not directly after
    /// the previous one, and every compressed cluster.
    fn walk_l2(
        &mut self,
        fmt: &L2Format,
        l2: &L2Table,
        table_off: u64,
        l1_index: u64,
        active: bool,
    ) {
        let external = self.q.data_file().is_some();
        let mut last: Option<u64> = None;
        for idx in 0..l2.len() {
            let e = l2.entry(idx);
            if e.word == 0 && e.bitmap == 0 {
                continue;
            }
            let guest = (l1_index * fmt.entries_per_table() + idx as u64) * self.cs;
            let kind = match e.classify(fmt, 0) {
                Ok(k) => k,
                Err(k) => {
                    self.corrupt(format!("guest offset {guest:#x}: {k}"));
                    continue;
                }
            };
            if fmt.extended {
                if let Err(k) =
                    (1..l2::SUBCLUSTERS).try_for_each(|s| e.classify(fmt, s).map(|_| ()))
                {
                    self.corrupt(format!("guest offset {guest:#x}: {k}"));
                }
            }
            match kind {
                Subcluster::Compressed(d) => {
                    if active {
                        self.report.allocated_clusters += 1;
                        self.report.compressed_clusters += 1;
                        self.report.fragmented_clusters += 1;
                    }
                    self.reference(d.offset, d.max_len.min(self.cs * 2), "compressed cluster");
                }
                Subcluster::Normal(h)
                | Subcluster::ZeroAlloc(h)
                | Subcluster::UnallocatedAlloc(h) => {
                    if active {
                        self.report.allocated_clusters += 1;
                        if last.is_some_and(|l| l + self.cs != h) {
                            self.report.fragmented_clusters += 1;
                        }
                        last = Some(h);
                        self.copied.push(Copied::L2 {
                            table: table_off,
                            index: idx,
                            entry: e,
                            cluster: h / self.cs,
                        });
                    }
                    if !external {
                        self.reference(h, self.cs, "data cluster");
                    }
                }
                Subcluster::ZeroPlain | Subcluster::UnallocatedPlain => {}
            }
        }
    }
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
    run(&Qcow2::open_for_check(path)?, path, Some(mode))
}

fn run(q: &Qcow2, path: &Path, repair: Option<Repair>) -> Result<CheckReport> {
    let at = |k: ErrorKind| k.at(path);
    let file = File::open(path).map_err(|e| at(e.into()))?;
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
        file: &file,
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
    };
    for finding in q.check_findings() {
        w.corrupt(finding.clone());
    }
    w.reference(0, cs, "header");
    let active = l1::read_table(&file, h.l1_table_offset, h.l1_size).map_err(at)?;
    w.reference(h.l1_table_offset, h.l1_size as u64 * 8, "L1 table");
    w.walk_l1(&active, true);
    w.reference(h.snapshots_offset, q.snapshot_table_len(), "snapshot table");
    for s in q.snapshots() {
        w.reference(s.l1_table_offset, s.l1_size as u64 * 8, "snapshot L1 table");
        match l1::read_table(&file, s.l1_table_offset, s.l1_size) {
            Ok(t) => w.walk_l1(&t, false),
            Err(_) => w.report.check_errors += 1,
        }
    }
    let rt = refcount::read_table(
        &file,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        h.cluster_bits,
    )
    .map_err(at)?;
    w.reference(
        h.refcount_table_offset,
        h.refcount_table_clusters as u64 * cs,
        "refcount table",
    );
    for (i, &b) in rt.iter().enumerate() {
        if b != 0 {
            if b >= file_len {
                w.corrupt(format!("refcount block {i} at {b:#x} is outside the image"));
            } else {
                w.reference(b, cs, "refcount block");
            }
        }
    }
    if let Some(ext) = &q.extensions().bitmaps {
        if h.autoclear_features & header::autoclear::BITMAPS != 0 {
            w.reference(ext.directory_offset, ext.directory_size, "bitmap directory");
            for b in q.bitmaps() {
                w.reference(b.table_offset, b.table_size as u64 * 8, "bitmap table");
                let mut t = vec![0u8; b.table_size as usize * 8];
                if read_exact(&file, &mut t, b.table_offset, "bitmap table").is_ok() {
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
            Some(&b) if b != 0 && b < file_len => {
                let ok = read_exact(&file, &mut block, b, "refcount block").is_ok();
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
        if h.corrupt() && mode == Repair::Leaks {
            return Err(at(ErrorKind::Unsupported(
                "the image is marked corrupt: repair it with --repair all".into(),
            )));
        }
        let fixed = apply_repairs(path, &h, mode, &too_low, &too_high, &copied_fixes)?;
        report.leaks_fixed = fixed.0;
        report.corruptions_fixed = fixed.1;
        report.leaks = report.leaks.saturating_sub(fixed.0);
        report.corruptions = report.corruptions.saturating_sub(fixed.1);
    }
    Ok(report)
}

/// Writes the repairs: raised refcounts first (a crash then leaves leaks, never corruption),
/// then COPIED flags, then lowered refcounts, then the header bits. Returns (leaks, corruptions)
/// fixed.
fn apply_repairs(
    path: &Path,
    h: &Header,
    mode: Repair,
    too_low: &[(u64, u64)],
    too_high: &[(u64, u64)],
    copied: &[(u64, u64)],
) -> Result<(u64, u64)> {
    let at = |k: ErrorKind| k.at(path);
    let (file, _ours) = super::lock::open_for_write(path).map_err(at)?;
    let mut refs = Refcounts::load(&file, h).map_err(at)?;
    let mut fixed_corruptions = 0;
    if mode == Repair::All {
        for &(c, r) in too_low {
            refs.set(&file, c, r).map_err(at)?;
            fixed_corruptions += 1;
        }
        if refs.write_back(&file).map_err(at)?.is_some() {
            return Err(at(ErrorKind::Unsupported(
                "repair would need a larger refcount table".into(),
            )));
        }
        file.sync_data().map_err(|e| at(e.into()))?;
        for &(off, word) in copied {
            pwrite(&file, &word.to_be_bytes(), off).map_err(|e| at(e.into()))?;
            fixed_corruptions += 1;
        }
        file.sync_data().map_err(|e| at(e.into()))?;
    }
    for &(c, r) in too_high {
        refs.set(&file, c, r).map_err(at)?;
    }
    refs.write_back(&file).map_err(at)?;
    file.sync_data().map_err(|e| at(e.into()))?;
    if mode == Repair::All && (h.dirty() || h.corrupt()) {
        let mut nh = h.clone();
        nh.incompatible_features &= !(header::incompat::DIRTY | header::incompat::CORRUPT);
        pwrite(&file, &nh.to_bytes(), 0).map_err(|e| at(e.into()))?;
        file.sync_data().map_err(|e| at(e.into()))?;
    }
    Ok((too_high.len() as u64, fixed_corruptions))
}
