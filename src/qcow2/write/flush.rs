//! Committing metadata: the one path through which every change reaches the disk, in the
//! order the module documentation of [`super`] gives (data, refcount increments, header, L2
//! tables, L1, then refcount decrements, each step durable before the next). The crash
//! tests cut the process at each of these steps.

use super::{Writer, MAX_DIRTY_L2};
use crate::qcow2::error::{corrupt, ErrorKind, Result};
use crate::qcow2::fault::pwrite;

impl Writer {
    pub(super) fn maybe_flush(&mut self) -> Result<()> {
        if self.l2.values().filter(|s| s.dirty).count() >= MAX_DIRTY_L2 {
            self.flush()?;
        }
        // Clean tables are only a cache: keep it bounded too.
        if self.l2.len() > 2 * MAX_DIRTY_L2 {
            self.l2.retain(|_, s| s.dirty);
        }
        Ok(())
    }

    /// Commits everything written so far, in crash-safe order (see the module docs).
    pub fn flush(&mut self) -> Result<()> {
        // Clusters are released below; a half-filled compressed cluster might be among them
        // and then be reused for something else, so never append to it after a flush.
        self.compress_pos = None;
        let idle = !self.data_written.get()
            && !self.refs.is_dirty()
            && self.l1_dirty.is_empty()
            && self.frees.is_empty()
            && self.l2.values().all(|s| !s.dirty);
        if idle {
            // Every sync costs a device cache flush even when nothing changed.
            return Ok(());
        }
        if let (Some((p, f)), true) = (&self.data, self.ordered) {
            f.sync_data().map_err(|e| ErrorKind::Io(e).at(p))?;
        }
        // 1-2: data and refcount increments.
        let moved = self.refs.write_back(&self.file).map_err(|k| self.at(k))?;
        self.sync()?;
        self.data_written.set(false);
        // 3: a relocated refcount table goes live; the old one is released below.
        if let Some(m) = moved {
            self.header.refcount_table_offset = m.new_offset;
            self.header.refcount_table_clusters = m.new_clusters;
            self.write_header()?;
            self.sync()?;
            self.frees
                .push((m.old_offset / self.cs, m.old_clusters as u64));
        }
        // 4: L2 tables.
        let dirty = crate::qcow2::alloc::sorted_keys(&self.l2, |s| s.dirty);
        for off in &dirty {
            let bytes = self.l2[off].table.to_bytes();
            pwrite(&self.file, &bytes, *off).map_err(|e| self.at(e.into()))?;
        }
        if !dirty.is_empty() {
            self.sync()?;
        }
        for off in dirty {
            self.l2.get_mut(&off).expect("listed").dirty = false;
        }
        // 5: L1 entries.
        if !self.l1_dirty.is_empty() {
            let dirty = std::mem::take(&mut self.l1_dirty);
            for i in dirty {
                let off = self.header.l1_table_offset + i as u64 * 8;
                pwrite(&self.file, &self.l1[i].0.to_be_bytes(), off)
                    .map_err(|e| self.at(e.into()))?;
            }
            self.sync()?;
        }
        // 6: release what is no longer referenced.
        if !self.frees.is_empty() {
            for (first, n) in std::mem::take(&mut self.frees) {
                for c in first..first + n {
                    self.refs.add(&self.file, c, -1).map_err(|k| self.at(k))?;
                }
            }
            if let Some(m) = self.refs.write_back(&self.file).map_err(|k| self.at(k))? {
                // Releasing never grows the table; keep the invariant visible.
                return Err(self.at(corrupt(format!(
                    "unexpected refcount table move to {:#x}",
                    m.new_offset
                ))));
            }
            self.sync()?;
        }
        Ok(())
    }
}
