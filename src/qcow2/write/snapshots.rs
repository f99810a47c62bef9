//! Internal snapshots: create, apply (revert to) and delete, as QEMU does them.
//!
//! A snapshot is a copy of the active L1 table plus one more reference on every L2 table and
//! data cluster it reaches; later writes then copy on write. Each operation orders its
//! metadata updates so that a crash leaves at worst leaked clusters (refcounts above the
//! number of references), plus, for apply and delete, the window QEMU itself has where some
//! COPIED flags are not yet updated (`check --repair` fixes those).

use super::Writer;
use crate::qcow2::error::{ErrorKind, Result};
use crate::qcow2::fault::pwrite;
use crate::qcow2::l1::{self, L1Entry};
use crate::qcow2::l2::{self, CompressedDescriptor, L2Entry};
use crate::qcow2::snapshot::{self, Snapshot};
use std::time::{SystemTime, UNIX_EPOCH};

/// What `snapshot` is asked to do.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    Create(&'a str),
    Apply(&'a str),
    Delete(&'a str),
}

impl Op<'_> {
    /// Refuses a request that cannot succeed on an image with `snapshots` (and an external
    /// data file or not). Callers ask before a writer opens the image: a writable open of a
    /// dirty image repairs it first, and a refused command must leave the file as it was.
    pub fn refuse(self, snapshots: &[Snapshot], data_file: bool) -> Result<(), ErrorKind> {
        if data_file {
            // QEMU refuses too: data in an external file cannot be shared copy-on-write.
            return Err(ErrorKind::Unsupported(
                "internal snapshots are not supported with an external data file".into(),
            ));
        }
        match self {
            Op::Create(name) => {
                if name.is_empty() || snapshots.iter().any(|s| s.name == name) {
                    return Err(ErrorKind::Unsupported(format!(
                        "a snapshot named '{name}' already exists (or the name is empty)"
                    )));
                }
            }
            Op::Apply(key) | Op::Delete(key) => {
                if snapshot::find(snapshots, key).is_none() {
                    return Err(ErrorKind::NotFound(format!(
                        "no snapshot with id or name '{key}'"
                    )));
                }
            }
        }
        Ok(())
    }
}

impl Writer {
    /// The snapshots as they are now.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// Creates an internal snapshot of the current state; QEMU's id scheme (highest numeric id
    /// plus one). Names must be unique.
    pub fn create_snapshot(&mut self, name: &str) -> Result<Snapshot> {
        Op::Create(name)
            .refuse(&self.snapshots, self.data.is_some())
            .map_err(|k| self.at(k))?;
        self.flush()?;
        // 1. One more reference on all the active L1 reaches: in memory first, so a refcount
        // that cannot take it fails the command before anything is written (bitmap flags and
        // the dirty bit included).
        let l1 = self.l1.clone();
        self.update_refs(&l1, 1)?;
        self.prepare()?;
        self.set_dirty(true)?;
        // 2. A copy of the active L1 table.
        let l1_bytes = (l1.len() as u64 * 8).div_ceil(self.cs).max(1) * self.cs;
        let l1_off = self
            .refs
            .alloc(&self.file, l1_bytes / self.cs)
            .map_err(|k| self.at(k))?;
        let mut bytes = l1::to_bytes(&l1);
        bytes.resize(l1_bytes as usize, 0);
        pwrite(&self.file, &bytes, l1_off).map_err(|e| self.at(e.into()))?;
        self.flush()?;
        // 3. Everything is shared now: clear COPIED flags (matches the raised refcounts).
        self.fix_copied()?;
        self.flush()?;
        // 4. The table entry.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let id = self
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let snap = Snapshot {
            l1_table_offset: l1_off,
            l1_size: l1.len() as u32,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.header.size),
            icount: Some(0),
            extra_unknown: Vec::new(),
        };
        let mut all = self.snapshots.clone();
        all.push(snap.clone());
        self.write_snapshot_table(all)?;
        self.set_dirty(false)?;
        Ok(snap)
    }

    /// Reverts the disk to a snapshot (by id or name); the snapshot itself stays.
    pub fn apply_snapshot(&mut self, key: &str) -> Result<()> {
        Op::Apply(key)
            .refuse(&self.snapshots, self.data.is_some())
            .map_err(|k| self.at(k))?;
        let (snap, snap_l1) = self.load_snapshot(key)?;
        if snap_l1.len() > self.l1.len() {
            return Err(self.at(ErrorKind::Unsupported(
                "the snapshot's L1 table is larger than the active one (disk shrunk since)".into(),
            )));
        }
        // 1. The snapshot's clusters gain the active table's reference (in memory before
        // anything is written: a refcount that cannot take it fails the command with the file
        // as it was).
        self.update_refs(&snap_l1, 1)?;
        self.prepare()?;
        self.set_dirty(true)?;
        self.flush()?;
        // 2. The active L1 becomes the snapshot's (entries beyond it: unallocated).
        let n = self.l1.len();
        let old = std::mem::replace(
            &mut self.l1,
            snap_l1
                .iter()
                .map(|e| L1Entry(e.0 & !l1::COPIED))
                .chain(std::iter::repeat(L1Entry(0)))
                .take(n)
                .collect(),
        );
        self.l1_dirty.extend(0..n);
        if let Some(size) = snap.disk_size {
            self.header.size = size.min(self.header.l1_span() * self.l1.len() as u64);
            self.write_header()?;
        }
        self.flush()?;
        // 3. What only the old state referenced is released, then COPIED recomputed.
        self.update_refs(&old, -1)?;
        self.flush()?;
        self.fix_copied()?;
        self.flush()?;
        self.set_dirty(false)
    }

    /// Deletes a snapshot (by id or name) and releases what only it referenced.
    pub fn delete_snapshot(&mut self, key: &str) -> Result<()> {
        Op::Delete(key)
            .refuse(&self.snapshots, self.data.is_some())
            .map_err(|k| self.at(k))?;
        let (snap, snap_l1) = self.load_snapshot(key)?;
        self.prepare()?;
        self.set_dirty(true)?;
        let rest: Vec<Snapshot> = self
            .snapshots
            .iter()
            .filter(|s| s.id != snap.id)
            .cloned()
            .collect();
        self.write_snapshot_table(rest)?;
        self.update_refs(&snap_l1, -1)?;
        let l1_clusters = (snap.l1_size as u64 * 8).div_ceil(self.cs).max(1);
        self.frees
            .push((snap.l1_table_offset / self.cs, l1_clusters));
        self.flush()?;
        self.fix_copied()?;
        self.flush()?;
        self.set_dirty(false)
    }

    /// Raises or lowers the dirty bit (version 3 only). Snapshot operations cannot keep
    /// refcounts and COPIED flags in step at every instant (QEMU cannot either), so they run
    /// under the dirty bit: an interrupted one leaves an image that QEMU and this tool repair
    /// on their next writable open, before anything trusts its refcounts.
    fn set_dirty(&mut self, dirty: bool) -> Result<()> {
        if self.header.version < 3 || self.header.dirty() == dirty {
            return Ok(());
        }
        self.header.incompatible_features ^= crate::qcow2::header::incompat::DIRTY;
        self.write_header()?;
        self.sync()
    }

    /// Finds a snapshot and reads its L1 table, with everything pending flushed first (nothing
    /// is pending in a writer just opened: this writes nothing then).
    fn load_snapshot(&mut self, key: &str) -> Result<(Snapshot, Vec<L1Entry>)> {
        let snap = snapshot::find(&self.snapshots, key)
            .cloned()
            .ok_or_else(|| {
                self.at(ErrorKind::NotFound(format!(
                    "no snapshot with id or name '{key}'"
                )))
            })?;
        let table = l1::read_table(&self.file, snap.l1_table_offset, snap.l1_size)
            .map_err(|k| self.at(k))?;
        self.flush()?;
        Ok((snap, table))
    }

    /// Adds `delta` to the refcount of every L2 table and data cluster `table` reaches.
    fn update_refs(&mut self, table: &[L1Entry], delta: i64) -> Result<()> {
        for e in table.iter().filter(|e| e.l2_offset() != 0) {
            let t = e.l2_offset();
            let entries: Vec<L2Entry> = {
                let slot = self.table(t)?;
                (0..slot.table.len()).map(|i| slot.table.entry(i)).collect()
            };
            for entry in entries {
                if let Some((first, n)) = self.clusters_of(&entry) {
                    for c in first..first + n {
                        self.refs
                            .add(&self.file, c, delta)
                            .map_err(|k| self.at(k))?;
                    }
                }
            }
            self.refs
                .add(&self.file, t / self.cs, delta)
                .map_err(|k| self.at(k))?;
        }
        Ok(())
    }

    /// Host clusters of this image file an L2 entry references (first, count).
    pub(super) fn clusters_of(&self, e: &L2Entry) -> Option<(u64, u64)> {
        if e.is_compressed() {
            let d = CompressedDescriptor::decode(
                e.word & !(l2::COMPRESSED | l2::COPIED),
                self.fmt.cluster_bits,
            );
            let first = d.offset / self.cs;
            return Some((first, (d.offset + d.max_len - 1) / self.cs - first + 1));
        }
        (e.host_offset() != 0 && self.data.is_none()).then(|| (e.host_offset() / self.cs, 1))
    }

    /// Sets COPIED exactly where the refcount is 1, in the active L1 and its L2 tables.
    fn fix_copied(&mut self) -> Result<()> {
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let t = e.l2_offset();
            if t == 0 {
                continue;
            }
            let own = self
                .refs
                .get(&self.file, t / self.cs)
                .map_err(|k| self.at(k))?
                == 1;
            let want = if own {
                L1Entry(t | l1::COPIED)
            } else {
                L1Entry(t)
            };
            if want != e {
                self.l1[i] = want;
                self.l1_dirty.insert(i);
            }
            let n = self.table(t)?.table.len();
            for idx in 0..n {
                let entry = self.l2[&t].table.entry(idx);
                if entry.is_compressed() || entry.host_offset() == 0 && self.data.is_none() {
                    continue;
                }
                let single = match self.clusters_of(&entry) {
                    Some((c, _)) => self.refs.get(&self.file, c).map_err(|k| self.at(k))? == 1,
                    None => true,
                };
                let word = if single {
                    entry.word | l2::COPIED
                } else {
                    entry.word & !l2::COPIED
                };
                if word != entry.word {
                    let slot = self.l2.get_mut(&t).expect("loaded above");
                    slot.table.set(idx, L2Entry { word, ..entry });
                    slot.dirty = true;
                }
            }
        }
        Ok(())
    }

    /// Replaces the snapshot table: the new one at fresh clusters, the header switched, the old
    /// one released.
    fn write_snapshot_table(&mut self, snaps: Vec<Snapshot>) -> Result<()> {
        let bytes = snapshot::encode_table(&snaps, self.header.size);
        let old = (self.header.snapshots_offset, self.snapshot_table_len);
        let new_off = if bytes.is_empty() {
            0
        } else {
            let n = (bytes.len() as u64).div_ceil(self.cs);
            let off = self.refs.alloc(&self.file, n).map_err(|k| self.at(k))?;
            pwrite(&self.file, &bytes, off).map_err(|e| self.at(e.into()))?;
            off
        };
        self.flush()?;
        self.header.nb_snapshots = snaps.len() as u32;
        self.header.snapshots_offset = new_off;
        self.write_header()?;
        self.sync()?;
        if old.0 != 0 && old.1 > 0 {
            self.frees.push((old.0 / self.cs, old.1.div_ceil(self.cs)));
        }
        self.snapshots = snaps;
        self.snapshot_table_len = bytes.len() as u64;
        self.flush()
    }
}
