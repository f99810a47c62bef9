//! Counting references: every structure that owns host clusters is walked and each cluster
//! it uses counted, with what is wrong on the way reported in QEMU's wording.

use super::report::CheckReport;
use super::MAX_MESSAGES;
use crate::qcow2::image::Qcow2;
use crate::qcow2::l1::{self, L1Entry};
use crate::qcow2::l2::{self, L2Entry, L2Format, L2Table, Subcluster};
use crate::qcow2::refcount;
use crate::qcow2::storage::{read_exact, Storage};

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
    /// References counted per host cluster (saturating).
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
}

impl Walk<'_> {
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
    pub(super) fn reference(&mut self, off: u64, len: u64, what: &str) {
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

    pub(super) fn walk_l1(&mut self, table: &[L1Entry], active: bool) {
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
