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
use super::snapshot;
use super::storage::{read_exact, Storage};
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
    file: &'a dyn Storage,
    cs: u64,
    /// References counted per host cluster (saturating).
    refs: Vec<u16>,
    report: CheckReport,
    copied: Vec<Copied>,
    /// Messages not kept (beyond [`MAX_MESSAGES`]).
    dropped: u64,
    /// The refcount structure cannot be repaired in place: a repair writes a new one.
    rebuild: bool,
    /// Where the refcount table and blocks were counted: a new structure replaces them, so a
    /// rebuild takes their references out again.
    refcount_structure: Vec<(u64, u64)>,
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

    /// A fault of the refcount structure itself: only a new structure repairs it.
    fn corrupt_structure(&mut self, msg: String) {
        self.rebuild = true;
        self.corrupt_refcount(msg);
    }

    /// Judges each refcount table entry as QEMU's check does, after every other structure was
    /// counted, and counts the blocks' clusters. Returns the block offsets to read stored
    /// refcounts from (0 where the entry is empty or unusable).
    fn refcount_blocks(&mut self, entries: &[u64]) -> Vec<u64> {
        let nb = self.refs.len() as u64;
        let mut blocks = Vec::with_capacity(entries.len());
        for (i, &e) in entries.iter().enumerate() {
            let off = e & refcount::OFFSET_MASK;
            let usable = if e & refcount::RESERVED_MASK != 0 {
                // As QEMU: the block is not counted as referenced, but its refcounts are read
                // where the offset leads to one (reads mask the reserved bits).
                self.corrupt_structure(format!("refcount table entry {i} has reserved bits set"));
                off % self.cs == 0 && off / self.cs < nb
            } else if off % self.cs != 0 {
                self.corrupt_structure(format!(
                    "refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                false
            } else if off / self.cs >= nb {
                self.corrupt_structure(format!("refcount block {i} is outside image"));
                false
            } else {
                if off != 0 {
                    self.reference(off, self.cs, "refcount block");
                    self.refcount_structure.push((off, self.cs));
                    let r = self.refs[(off / self.cs) as usize];
                    if r != 1 {
                        self.corrupt_structure(format!("refcount block {i} refcount={r}"));
                    }
                }
                true
            };
            blocks.push(if usable { off } else { 0 });
        }
        blocks
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
            if e.0 & l1::RESERVED_MASK != 0 {
                self.corrupt(format!("found L1 entry with reserved bits set: {:x}", e.0));
            }
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
            if e.word & l2::COMPRESSED == 0 && e.word & l2::STD_RESERVED_MASK != 0 {
                self.corrupt(format!(
                    "found l2 entry with reserved bits set: {:x}",
                    e.word
                ));
            } else if e.word & l2::COMPRESSED != 0 && e.word & l2::COPIED != 0 {
                self.corrupt(format!(
                    "guest offset {guest:#x}: copied flag must never be set for compressed clusters"
                ));
            }
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
    let q = Qcow2::open_for_check(path)?;
    let incomplete = incomplete_snapshots(&q).count() as u64;
    // The table is written anew first (as QEMU's repair does), then refcounts are repaired
    // for the new table and the old one. Not when entries were left out: rewriting would drop
    // them.
    if mode == Repair::All && incomplete > 0 && q.check_findings().is_empty() {
        complete_snapshot_table(path, &q)?;
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

/// Writes the snapshot table again with full extra data past the end of the file and switches
/// the header to it; the old table's clusters become leaks and the new ones are counted by the
/// refcount repair that follows.
fn complete_snapshot_table(path: &Path, q: &Qcow2) -> Result<()> {
    let at = |k: ErrorKind| k.at(path);
    let io = |e: std::io::Error| at(e.into());
    let h = q.header();
    let (file, _ours) = super::lock::open_for_write(path).map_err(at)?;
    let bytes = snapshot::encode_table(q.snapshots(), h.size);
    let offset = q.file_len().div_ceil(h.cluster_size()) * h.cluster_size();
    pwrite(&file, &bytes, offset).map_err(io)?;
    file.sync_data().map_err(io)?;
    let mut nh = h.clone();
    nh.snapshots_offset = offset;
    pwrite(&file, &nh.to_bytes(), 0).map_err(io)?;
    file.sync_data().map_err(io)
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
            rebuild_repairs(path, &h, &refs, file_len, &copied_fixes)?;
            (report.leaks, report.refcount_corruptions)
        } else {
            apply_repairs(path, &h, mode, &too_low, &too_high, &copied_fixes)?
        };
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
        write_copied(&file, copied).map_err(at)?;
        fixed_corruptions += copied.len() as u64;
    }
    for &(c, r) in too_high {
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
fn rebuild_repairs(
    path: &Path,
    h: &Header,
    refs: &[u16],
    file_len: u64,
    copied: &[(u64, u64)],
) -> Result<()> {
    let at = |k: ErrorKind| k.at(path);
    let (file, _ours) = super::lock::open_for_write(path).map_err(at)?;
    let switched = super::rebuild::rebuild(&file, h, refs, file_len).map_err(at)?;
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
