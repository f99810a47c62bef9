//! Counting references: every structure that owns host clusters is walked and each cluster
//! it uses counted, with what is wrong on the way reported.
//!
//! The walk goes where the reader refuses to: `check` exists to judge damaged images. Every
//! refusal the reader makes of what it walks is reported in the reader's own words (the same
//! functions decide and word them), and the walk then goes on as QEMU's check does: a table
//! that extends past the end of the file reads as zeros there, an L2 table that lies on other
//! metadata is read as an L2 table, clusters are counted wherever they are. Those faults are
//! marked unrepairable: a refcount repair would take the broken mapping as the truth and free,
//! share or write over what it really needs.

use super::report::CheckReport;
use super::{MAX_CLUSTERS, MAX_MESSAGES};
use crate::qcow2::error::{ErrorKind, Result};
use crate::qcow2::header::{self, past_end};
use crate::qcow2::image::{Qcow2, Refusal};
use crate::qcow2::l1::{self, L1Entry};
use crate::qcow2::l2::{self, L2Entry, L2Format, L2Table, Subcluster};
use crate::qcow2::refcount;
use crate::qcow2::storage::{read_exact, read_zero_padded, Storage};
use std::path::Path;

/// What a counted host range holds: the role the walk found it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Metadata, by its name ("header", "L2 table", "refcount block", ...).
    Structure(&'static str),
    /// Guest data of the guest cluster at `guest` (stored, or `compressed`: the range is the
    /// compressed bytes), in the active image (`snapshot` None) or in internal snapshot
    /// number `snapshot`.
    Guest {
        guest: u64,
        compressed: bool,
        snapshot: Option<usize>,
    },
}

impl Role {
    /// Its name in messages.
    pub fn what(&self) -> &'static str {
        match self {
            Role::Structure(w) => w,
            Role::Guest {
                compressed: true, ..
            } => "compressed cluster",
            Role::Guest { .. } => "data cluster",
        }
    }
}

/// A host range of the file that overlaps a probed range, and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub host: u64,
    pub len: u64,
    pub role: Role,
}

/// A COPIED flag to verify once refcounts are known.
pub(super) enum Copied {
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
    pub(super) fn cluster(&self, cs: u64) -> u64 {
        match self {
            Copied::L1 { entry, .. } => entry.l2_offset() / cs,
            Copied::L2 { cluster, .. } => *cluster,
        }
    }
}

pub(super) struct Walk<'a> {
    pub(super) q: &'a Qcow2,
    pub(super) file: &'a dyn Storage,
    pub(super) cs: u64,
    pub(super) file_len: u64,
    /// References counted per host cluster of the file (saturating).
    pub(super) refs: Vec<u16>,
    pub(super) report: CheckReport,
    pub(super) copied: Vec<Copied>,
    /// Messages not kept (beyond [`MAX_MESSAGES`]).
    pub(super) dropped: u64,
    /// The refcount structure cannot be repaired in place: a repair writes a new one.
    pub(super) rebuild: bool,
    /// Where the refcount table and blocks were counted: a new structure replaces them, so a
    /// rebuild takes their references out again.
    pub(super) refcount_structure: Vec<(u64, u64)>,
    /// Host ranges `[start, end)`, sorted, whose owners are wanted ([`super::owners`]).
    pub(super) probe: Vec<(u64, u64)>,
    /// The counted ranges that overlap [`Walk::probe`], with their roles.
    pub(super) owners: Vec<Owner>,
}

impl<'a> Walk<'a> {
    /// A walk of `q` (the image at `path`), reading through `file`. Files of more clusters
    /// than [`MAX_CLUSTERS`] are refused: one counter per cluster is the walk's memory.
    pub(super) fn new(q: &'a Qcow2, file: &'a dyn Storage, path: &Path) -> Result<Walk<'a>> {
        let h = q.header();
        let cs = h.cluster_size();
        let file_len = q.file_len();
        let nb = file_len.div_ceil(cs);
        if nb > MAX_CLUSTERS {
            return Err(ErrorKind::Unsupported(format!(
                "the file is {file_len} bytes long: {nb} clusters, more than the {MAX_CLUSTERS} \
                 a check can count"
            ))
            .at(path));
        }
        Ok(Walk {
            q,
            file,
            cs,
            file_len,
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
            probe: Vec::new(),
            owners: Vec::new(),
        })
    }

    pub(super) fn message(&mut self, msg: String) {
        if self.report.messages.len() < MAX_MESSAGES {
            self.report.messages.push(msg);
        } else {
            self.dropped += 1;
        }
    }

    pub(super) fn corrupt(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.message(format!("ERROR {msg}"));
    }

    pub(super) fn corrupt_refcount(&mut self, msg: String) {
        self.report.refcount_corruptions += 1;
        self.corrupt(msg);
    }

    /// A fault of the refcount structure itself: only a new structure repairs it.
    pub(super) fn corrupt_structure(&mut self, msg: String) {
        self.rebuild = true;
        self.corrupt_refcount(msg);
    }

    /// A fault a refcount repair would build on (see the module documentation).
    pub(super) fn unrepairable(&mut self, msg: String) {
        self.report.unrepairable += 1;
        if self.report.first_unrepairable.is_none() {
            self.report.first_unrepairable = Some(msg.clone());
        }
        self.corrupt(msg);
    }

    /// A structure that could not be read (an I/O error, not the end of the file): the check
    /// is incomplete, and says so in its verdict.
    pub(super) fn check_error(&mut self, msg: String) {
        self.report.check_errors += 1;
        self.message(format!("ERROR {msg}"));
    }

    /// Counts everything that owns host clusters except the refcount blocks, and returns the
    /// refcount table's entries.
    pub(super) fn count_structures(&mut self) -> std::io::Result<Vec<u64>> {
        let q = self.q;
        let h = q.header();
        let cs = self.cs;
        for finding in q.check_findings() {
            self.unrepairable(finding.clone());
        }
        self.reference(0, cs, Role::Structure("header"));
        if let Some((offset, len)) = q.encryption().and_then(|e| e.area) {
            let len = len.min(self.file_len.saturating_sub(offset));
            self.reference(offset, len, Role::Structure("LUKS header"));
        }
        let l1_len = h.l1_size as u64 * 8;
        let problem = (l1_len > 0)
            .then(|| past_end("L1 table", h.l1_table_offset, l1_len, self.file_len))
            .flatten();
        self.counted(problem, h.l1_table_offset, l1_len, "L1 table");
        self.walk_l1(q.l1_table(), None);
        self.reference(
            h.snapshots_offset,
            q.snapshot_table_len(),
            Role::Structure("snapshot table"),
        );
        if q.data_file().is_some() && h.nb_snapshots > 0 {
            self.corrupt(format!(
                "{} snapshots in image with data file",
                h.nb_snapshots
            ));
        }
        for i in super::incomplete_snapshots(q) {
            self.corrupt(format!("snapshot table entry {i} is incomplete"));
        }
        for (index, s) in q.snapshots().iter().enumerate() {
            let len = s.l1_size as u64 * 8;
            let problem = s.l1_refusal(self.file_len);
            self.counted(problem, s.l1_table_offset, len, "snapshot L1 table");
            match l1::read_table_for_check(self.file, s.l1_table_offset, s.l1_size) {
                Ok(t) => self.walk_l1(&t, Some(index)),
                Err(e) => self.check_error(format!(
                    "snapshot '{}': reading the L1 table at {:#x}: {e}",
                    s.name, s.l1_table_offset
                )),
            }
        }
        let (offset, clusters) = (h.refcount_table_offset, h.refcount_table_clusters);
        let entries = refcount::read_entries_padded(self.file, offset, clusters, h.cluster_bits)?;
        let table_len = clusters as u64 * cs;
        // A new structure replaces a table the reader refuses: a rebuild repairs it.
        match past_end("refcount table", offset, table_len, self.file_len) {
            Some(problem) if table_len > 0 => {
                self.corrupt_structure(problem);
                self.add(offset, table_len, Role::Structure("refcount table"));
            }
            _ => self.reference(offset, table_len, Role::Structure("refcount table")),
        }
        self.refcount_structure.push((offset, table_len));
        if clusters == 0 {
            self.corrupt_structure(refcount::NO_TABLE.into());
        }
        self.count_bitmaps();
        Ok(entries)
    }

    /// Persistent bitmaps in use: the directory, each bitmap's table and the data clusters
    /// the tables point to (all validated at open).
    fn count_bitmaps(&mut self) {
        let q = self.q;
        let Some(ext) = &q.extensions().bitmaps else {
            return;
        };
        if q.header().autoclear_features & header::autoclear::BITMAPS == 0 {
            return;
        }
        self.reference(
            ext.directory_offset,
            ext.directory_size,
            Role::Structure("bitmap directory"),
        );
        for b in q.bitmaps() {
            self.reference(
                b.table_offset,
                b.table_size as u64 * 8,
                Role::Structure("bitmap table"),
            );
            let mut t = vec![0u8; b.table_size as usize * 8];
            if let Err(e) = read_exact(self.file, &mut t, b.table_offset, "bitmap table") {
                self.check_error(e.to_string());
                continue;
            }
            for e in t.chunks_exact(8) {
                let off = u64::from_be_bytes(e.try_into().expect("8 bytes")) & l2::OFFSET_MASK;
                if off != 0 {
                    self.reference(off, self.cs, Role::Structure("bitmap data"));
                }
            }
        }
    }

    /// Judges each refcount table entry as QEMU's check does, after every other structure was
    /// counted, and counts the blocks' clusters. Returns the block offsets to read stored
    /// refcounts from (0 where the entry is empty or unusable).
    pub(super) fn refcount_blocks(&mut self, entries: &[u64]) -> Vec<u64> {
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
                    // Cut by the end of the file: read as QEMU reads it, zeros past the end.
                    if let Some(problem) = refcount::block_refusal(off, self.cs, self.file_len) {
                        self.corrupt_structure(problem);
                    }
                    self.add(off, self.cs, Role::Structure("refcount block"));
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

    /// Counts one reference on every cluster of `[off, off + len)` inside the file, which
    /// holds `role` (an owner when it overlaps the probe).
    fn add(&mut self, off: u64, len: u64, role: Role) {
        if len == 0 {
            return;
        }
        let end = off.saturating_add(len);
        let first = self.probe.partition_point(|&(_, e)| e <= off);
        if self.probe.get(first).is_some_and(|&(s, _)| s < end) {
            self.owners.push(Owner {
                host: off,
                len,
                role,
            });
        }
        let first = off / self.cs;
        let end = (off.saturating_add(len - 1) / self.cs + 1).min(self.refs.len() as u64);
        for c in first..end {
            let r = &mut self.refs[c as usize];
            *r = r.saturating_add(1);
        }
    }

    /// Counts the clusters of `[off, off + len)`. As QEMU, a range that ends a cluster or
    /// more past the end of the file is a corruption and counts nothing.
    fn reference(&mut self, off: u64, len: u64, role: Role) {
        if len == 0 {
            return;
        }
        let end = off.saturating_add(len);
        if end.saturating_sub(self.file_len) >= self.cs {
            self.unrepairable(format!(
                "{} at {off:#x} lies beyond the end of the image file",
                role.what()
            ));
            return;
        }
        self.add(off, len, role);
    }

    /// Counts a structure the reader refuses with `problem` (reported instead of QEMU's
    /// end-of-file message), or else references it.
    fn counted(&mut self, problem: Option<String>, off: u64, len: u64, what: &'static str) {
        match problem {
            Some(problem) => {
                self.unrepairable(problem);
                self.add(off, len, Role::Structure(what));
            }
            None => self.reference(off, len, Role::Structure(what)),
        }
    }

    /// Walks an L1 table: the active one (`snapshot` None) or that of snapshot number
    /// `snapshot`.
    fn walk_l1(&mut self, table: &[L1Entry], snapshot: Option<usize>) {
        let active = snapshot.is_none();
        if let Err(k) = l1::check_distinct(table) {
            let whose = snapshot.map_or(String::new(), |i| {
                format!("snapshot '{}': ", self.q.snapshots()[i].name)
            });
            self.unrepairable(format!("{whose}{}", k.detail()));
        }
        let fmt = L2Format::of(self.q.header());
        for (i, e) in table.iter().enumerate() {
            let off = e.l2_offset();
            if e.0 & l1::RESERVED_MASK != 0 {
                self.corrupt(format!("found L1 entry with reserved bits set: {:x}", e.0));
            }
            if off == 0 {
                continue;
            }
            let problem = e
                .checked_l2_offset(i, self.cs, self.file_len)
                .err()
                .map(|k| k.detail());
            if off % self.cs != 0 {
                // Not walked: what an unaligned offset leads to is no table.
                self.unrepairable(problem.unwrap_or_default());
                continue;
            }
            if active && off / self.cs < self.refs.len() as u64 {
                self.copied.push(Copied::L1 {
                    index: i,
                    entry: *e,
                });
            }
            self.counted(problem, off, self.cs, "L2 table");
            if off >= self.file_len {
                // All zeros as QEMU reads it: nothing allocated to walk.
                continue;
            }
            let mut bytes = vec![0u8; self.cs as usize];
            if let Err(e) = read_zero_padded(self.file, &mut bytes, off) {
                self.check_error(format!("reading the L2 table at {off:#x}: {e}"));
                continue;
            }
            let l2 = L2Table::parse(&bytes, fmt.extended);
            self.walk_l2(&fmt, &l2, off, i as u64, snapshot);
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
        snapshot: Option<usize>,
    ) {
        let active = snapshot.is_none();
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
                    self.unrepairable(format!("guest offset {guest:#x}: {}", k.detail()));
                    continue;
                }
            };
            if fmt.extended {
                if let Err(k) =
                    (1..l2::SUBCLUSTERS).try_for_each(|s| e.classify(fmt, s).map(|_| ()))
                {
                    self.unrepairable(format!("guest offset {guest:#x}: {}", k.detail()));
                }
            }
            match kind {
                Subcluster::Compressed(d) => {
                    if active {
                        self.report.allocated_clusters += 1;
                        self.report.compressed_clusters += 1;
                        self.report.fragmented_clusters += 1;
                    }
                    let refusal = self.q.compressed_refusal(d);
                    let len = d.max_len.min(self.cs * 2);
                    let role = Role::Guest {
                        guest,
                        compressed: true,
                        snapshot,
                    };
                    self.refused(refusal, d.offset, len, role);
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
                        // Past the end of the file there is no refcount to agree with.
                        if external || h / self.cs < self.refs.len() as u64 {
                            self.copied.push(Copied::L2 {
                                table: table_off,
                                index: idx,
                                entry: e,
                                cluster: h / self.cs,
                            });
                        }
                    }
                    let refusal = self.q.data_refusal(h, self.cs);
                    if external {
                        // Data file clusters are not refcounted; only the reader's refusal.
                        if let Some(r) = refusal {
                            self.unrepairable(r.message().to_string());
                        }
                    } else {
                        let role = Role::Guest {
                            guest,
                            compressed: false,
                            snapshot,
                        };
                        self.refused(refusal, h, self.cs, role);
                    }
                }
                Subcluster::ZeroPlain | Subcluster::UnallocatedPlain => {}
            }
        }
    }

    /// Counts guest data at `[off, off + len)` the reader refuses with `refusal`: on metadata
    /// it is counted too (the refcounts then show the sharing, as QEMU reports it); past the
    /// end of the file there is nothing to count.
    fn refused(&mut self, refusal: Option<Refusal>, off: u64, len: u64, role: Role) {
        match refusal {
            Some(Refusal::PastEnd(m)) => self.unrepairable(m),
            Some(Refusal::Overlap(m)) => {
                self.unrepairable(m);
                self.reference(off, len, role);
            }
            None => self.reference(off, len, role),
        }
    }
}
