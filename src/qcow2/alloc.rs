//! The cluster allocator: refcounts in memory, written back in a safe order.
//!
//! Refcount blocks are loaded on demand and kept (they are metadata: one 64 KiB block
//! describes 2 GiB of image with 16-bit refcounts). Changes stay in memory until
//! [`Refcounts::write_back`]; the writer calls it at the points where the crash-safety order
//! needs refcounts on disk (increments before the references that need them, decrements after
//! the references are gone). New refcount blocks describe themselves when they fall into
//! their own range, and a refcount table that is too small is replaced by a larger one at a
//! new place; the header switch and the release of the old table are the writer's job.

use super::error::{corrupt, ErrorKind};
use super::header::{Header, MAX_HOST_OFFSET};
use super::refcount::{self, RefcountFormat};
use super::storage::{read_exact, Storage};
use crate::qcow2::fault::pwrite;
use std::collections::HashMap;
use std::fs::File;

struct Block {
    data: Vec<u8>,
    dirty: bool,
}

/// A relocation of the refcount table waiting for the header to point to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableMove {
    pub new_offset: u64,
    pub new_clusters: u32,
    pub old_offset: u64,
    pub old_clusters: u32,
}

pub struct Refcounts {
    fmt: RefcountFormat,
    cs: u64,
    /// Block offsets by table index; may be longer than the on-disk table (growth pending).
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u32,
    table_dirty: bool,
    blocks: HashMap<u64, Block>,
    /// No cluster below this index is free.
    free_hint: u64,
    pending_move: Option<TableMove>,
}

impl Refcounts {
    pub fn load(file: &File, h: &Header) -> Result<Refcounts, ErrorKind> {
        let table = refcount::read_table(
            file,
            h.refcount_table_offset,
            h.refcount_table_clusters,
            h.cluster_bits,
        )?;
        Ok(Refcounts {
            fmt: RefcountFormat {
                cluster_bits: h.cluster_bits,
                order: h.refcount_order,
            },
            cs: h.cluster_size(),
            table,
            table_offset: h.refcount_table_offset,
            table_clusters: h.refcount_table_clusters,
            table_dirty: false,
            blocks: HashMap::new(),
            free_hint: 0,
            pending_move: None,
        })
    }

    pub fn format(&self) -> RefcountFormat {
        self.fmt
    }

    /// Refcount of host cluster number `cluster`.
    pub fn get(&mut self, file: &File, cluster: u64) -> Result<u64, ErrorKind> {
        let (t, i) = self.fmt.locate(cluster);
        let order = self.fmt.order;
        match self.block(file, t)? {
            Some(b) => Ok(refcount::get(&b.data, i, order)),
            None => Ok(0),
        }
    }

    fn block(&mut self, file: &File, t: u64) -> Result<Option<&mut Block>, ErrorKind> {
        let Some(&off) = self.table.get(t as usize) else {
            return Ok(None);
        };
        if off == 0 {
            return Ok(None);
        }
        if !self.blocks.contains_key(&t) {
            let mut data = vec![0u8; self.cs as usize];
            read_exact(file as &dyn Storage, &mut data, off, "refcount block")?;
            self.blocks.insert(t, Block { data, dirty: false });
        }
        Ok(self.blocks.get_mut(&t))
    }

    /// Sets the refcount of `cluster`, creating refcount blocks (and growing the table) as
    /// needed.
    pub fn set(&mut self, file: &File, cluster: u64, value: u64) -> Result<(), ErrorKind> {
        if value > self.fmt.max_value() {
            return Err(ErrorKind::Unsupported(format!(
                "refcount {value} overflows the image's {}-bit refcounts",
                self.fmt.bits()
            )));
        }
        let (t, i) = self.fmt.locate(cluster);
        if self.block(file, t)?.is_none() {
            self.new_block(file, t)?;
        }
        let order = self.fmt.order;
        let b = self.block(file, t)?.expect("block was just created");
        refcount::set(&mut b.data, i, order, value);
        b.dirty = true;
        if value == 0 {
            self.free_hint = self.free_hint.min(cluster);
        }
        Ok(())
    }

    pub fn add(&mut self, file: &File, cluster: u64, delta: i64) -> Result<u64, ErrorKind> {
        let cur = self.get(file, cluster)?;
        let new = cur.checked_add_signed(delta).ok_or_else(|| {
            let at = cluster * self.cs;
            if delta < 0 {
                corrupt(format!("refcount of cluster {at:#x} would drop below zero"))
            } else {
                ErrorKind::Unsupported(format!(
                    "refcount of cluster {at:#x} would overflow the image's {}-bit refcounts",
                    self.fmt.bits()
                ))
            }
        })?;
        self.set(file, cluster, new)?;
        Ok(new)
    }

    /// Creates the refcount block for table index `t`.
    fn new_block(&mut self, file: &File, t: u64) -> Result<(), ErrorKind> {
        if t as usize >= self.table.len() {
            self.grow_table(file, t)?;
        }
        loop {
            // Growing the table (or creating another block) may already have created this
            // one; a second block would lose the refcounts recorded in the first.
            if self.block(file, t)?.is_some() {
                return Ok(());
            }
            // The block's own cluster: the first free one. In the range the new block
            // describes, the block records itself; elsewhere the block covering it must exist
            // first (creating that one may take this cluster, hence the retry).
            let c = self.find_free(file, 1)?;
            let (ct, ci) = self.fmt.locate(c);
            let mut data = vec![0u8; self.cs as usize];
            if ct == t {
                refcount::set(&mut data, ci, self.fmt.order, 1);
            } else if self.block(file, ct)?.is_none() {
                self.new_block(file, ct)?;
                continue;
            } else {
                self.set(file, c, 1)?;
            }
            self.blocks.insert(t, Block { data, dirty: true });
            self.table[t as usize] = c * self.cs;
            self.table_dirty = true;
            return Ok(());
        }
    }

    /// Makes room in the table for index `t`: the new, larger table gets fresh clusters; it is
    /// written by [`Refcounts::write_back`], and the writer then points the header to it and
    /// frees the old one.
    fn grow_table(&mut self, file: &File, t: u64) -> Result<(), ErrorKind> {
        let per_cluster = self.cs / 8;
        let old_len = self.table.len() as u64;
        let mut entries = (t + 1).max(old_len * 2).div_ceil(per_cluster) * per_cluster;
        loop {
            let clusters = entries / per_cluster;
            if clusters * self.cs > super::header::MAX_REFCOUNT_TABLE_BYTES {
                return Err(ErrorKind::Unsupported(
                    "the refcount table would exceed QEMU's 8 MiB limit".into(),
                ));
            }
            if self.table.len() < entries as usize {
                self.table.resize(entries as usize, 0);
            }
            let start = self.find_free(file, clusters)?;
            if start + clusters > entries * self.fmt.block_entries() {
                entries *= 2;
                continue;
            }
            // Every block describing the new table's clusters must exist before they are
            // claimed; creating one may occupy part of the range, so search again then.
            let (first, last) = (
                self.fmt.locate(start).0,
                self.fmt.locate(start + clusters - 1).0,
            );
            let mut created = false;
            for bt in first..=last {
                if self.block(file, bt)?.is_none() {
                    self.new_block(file, bt)?;
                    created = true;
                }
            }
            if created {
                continue;
            }
            for c in start..start + clusters {
                self.set(file, c, 1)?;
            }
            let old = self
                .pending_move
                .map_or((self.table_offset, self.table_clusters), |m| {
                    (m.old_offset, m.old_clusters)
                });
            if let Some(prev) = self.pending_move {
                // An earlier relocation target that was never written is free again.
                for c in 0..prev.new_clusters as u64 {
                    self.set(file, prev.new_offset / self.cs + c, 0)?;
                }
            }
            self.pending_move = Some(TableMove {
                new_offset: start * self.cs,
                new_clusters: clusters as u32,
                old_offset: old.0,
                old_clusters: old.1,
            });
            self.table_offset = start * self.cs;
            self.table_clusters = clusters as u32;
            self.table_dirty = true;
            return Ok(());
        }
    }

    /// The first run of `n` free clusters (refcounts not changed).
    pub fn find_free(&mut self, file: &File, n: u64) -> Result<u64, ErrorKind> {
        // Cluster 0 is the header, never free.
        let mut c = self.free_hint.max(1);
        let mut run_start = c;
        let mut first_free = None;
        loop {
            if (c + 1) * self.cs > MAX_HOST_OFFSET {
                return Err(ErrorKind::Unsupported(
                    "image would exceed 2^56 bytes".into(),
                ));
            }
            let (t, _) = self.fmt.locate(c);
            let free = match self.table.get(t as usize) {
                Some(0) | None => true,
                Some(_) => self.get(file, c)? == 0,
            };
            if !free {
                c += 1;
                run_start = c;
                continue;
            }
            first_free.get_or_insert(c);
            if c + 1 - run_start >= n {
                self.free_hint = first_free.unwrap_or(run_start);
                return Ok(run_start);
            }
            c += 1;
        }
    }

    /// Allocates `n` contiguous clusters (refcount 1 each); returns the host offset.
    pub fn alloc(&mut self, file: &File, n: u64) -> Result<u64, ErrorKind> {
        loop {
            let start = self.find_free(file, n)?;
            // Make sure the blocks exist first: creating one may take a cluster of the run.
            let (first, last) = (self.fmt.locate(start).0, self.fmt.locate(start + n - 1).0);
            let mut created = false;
            for t in first..=last {
                if self.block(file, t)?.is_none() {
                    self.new_block(file, t)?;
                    created = true;
                }
            }
            if created {
                continue;
            }
            for c in start..start + n {
                self.set(file, c, 1)?;
            }
            if self.free_hint == start {
                self.free_hint = start + n;
            }
            return Ok(start * self.cs);
        }
    }

    /// Takes cluster `c` (refcount 0 → 1) if it is free once the refcount block describing it
    /// exists; creating that block may use `c` itself, and then this returns false.
    pub fn claim(&mut self, file: &File, c: u64) -> Result<bool, ErrorKind> {
        let (t, _) = self.fmt.locate(c);
        if self.block(file, t)?.is_none() {
            self.new_block(file, t)?;
        }
        if self.get(file, c)? != 0 {
            return Ok(false);
        }
        self.set(file, c, 1)?;
        Ok(true)
    }

    /// Whether [`Refcounts::write_back`] has anything to write.
    pub fn is_dirty(&self) -> bool {
        self.table_dirty || self.pending_move.is_some() || self.blocks.values().any(|b| b.dirty)
    }

    /// Writes dirty refcount blocks and, when it moved, the new refcount table. Returns the
    /// table relocation the header must now point to, if any (after the caller has flushed).
    pub fn write_back(&mut self, file: &File) -> Result<Option<TableMove>, ErrorKind> {
        for t in sorted_keys(&self.blocks, |b| b.dirty) {
            let off = self.table[t as usize];
            let b = self.blocks.get_mut(&t).expect("listed above");
            pwrite(file, &b.data, off)?;
            b.dirty = false;
        }
        if self.table_dirty {
            let mut bytes = vec![0u8; self.table_clusters as usize * self.cs as usize];
            for (i, off) in self.table.iter().enumerate() {
                bytes[i * 8..i * 8 + 8].copy_from_slice(&off.to_be_bytes());
            }
            pwrite(file, &bytes, self.table_offset)?;
            self.table_dirty = false;
        }
        Ok(self.pending_move.take())
    }

    /// Where the table is now (for the header).
    pub fn table_location(&self) -> (u64, u32) {
        (self.table_offset, self.table_clusters)
    }

    pub fn has_dirty(&self) -> bool {
        self.table_dirty || self.blocks.values().any(|b| b.dirty)
    }
}

/// The keys of `map` whose values pass `keep`, in ascending order: metadata is written back
/// in file order.
pub(crate) fn sorted_keys<V>(
    map: &std::collections::HashMap<u64, V>,
    keep: impl Fn(&V) -> bool,
) -> Vec<u64> {
    let mut keys: Vec<u64> = map
        .iter()
        .filter(|(_, v)| keep(v))
        .map(|(&k, _)| k)
        .collect();
    keys.sort_unstable();
    keys
}
