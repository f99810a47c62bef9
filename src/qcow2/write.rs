//! Writing to a qcow2 image in place: data, zeros, discards, compressed clusters.
//!
//! Metadata changes are kept in memory (L1, dirty L2 tables, refcounts) and committed by
//! [`Writer::flush`] in an order that keeps the image valid on disk at every instant:
//!
//! 1. new data is written to clusters nobody references yet;
//! 2. refcount increments (and a relocated refcount table) are written, then `fdatasync`:
//!    from here a crash only leaks the new clusters;
//! 3. the header switches to a relocated refcount table, then `fdatasync`;
//! 4. changed L2 tables are written, then `fdatasync` (each entry flips from old to new);
//! 5. the L1 table entries of new or copied L2 tables are written, then `fdatasync`;
//! 6. refcounts of clusters no longer referenced are decremented, then `fdatasync`: a crash
//!    before this only leaks them.
//!
//! So a crash at any point leaves, for every guest cluster, either the old or the new
//! content, and at worst leaked clusters, never a wrong mapping. Clusters shared with an
//! internal snapshot (refcount > 1), and L2 tables shared likewise, are copied before they are
//! changed. Persistent dirty bitmaps cannot be kept exact by this writer, so before the first
//! change every bitmap is flagged in use (QEMU then treats it as inconsistent, and a backup
//! tool starts a new full chain) rather than left silently stale.

mod compressed;
mod data;
mod flush;
mod header_edit;
mod open;
mod snapshots;
mod zeroes;
pub use compressed::{compress_cluster, Compressed};
pub use open::open_backing;
pub use snapshots::Op as SnapshotOp;

use super::alloc::Refcounts;
use super::bitmap;
use super::crypto::{self, Crypt};
use super::disk::Disk;
use super::error::{corrupt, ErrorKind, Result};
use super::header::{self, Header};
use super::l1::{self, L1Entry};
use super::l2::{self, CompressedDescriptor, L2Entry, L2Format, L2Table};
use super::lock::Ours;
use super::mapping::{self, Status};
use super::storage::{read_exact, Storage};
use crate::qcow2::fault::pwrite;
use crate::qcow2::pagecache;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Dirty L2 tables kept before a flush is forced (bounds memory on huge writes).
const MAX_DIRTY_L2: usize = 512;

struct L2Slot {
    table: L2Table,
    dirty: bool,
}

/// A qcow2 image opened for writing.
pub struct Writer {
    path: PathBuf,
    file: File,
    data: Option<(PathBuf, File)>,
    /// The write-lock registrations of `file` and `data`.
    _ours: Vec<Ours>,
    header: Header,
    fmt: L2Format,
    cs: u64,
    l1: Vec<L1Entry>,
    l1_dirty: BTreeSet<usize>,
    l2: HashMap<u64, L2Slot>,
    refs: Refcounts,
    backing: Option<Disk>,
    /// Host clusters (first cluster index, count) whose references are dropped by changes
    /// not yet flushed; decremented after the new mapping is on disk.
    frees: Vec<(u64, u64)>,
    /// Where the next compressed stream may go: the first unused byte of a host cluster
    /// that already holds compressed streams written since the last flush.
    compress_pos: Option<u64>,
    prepared: bool,
    bitmaps: Option<(u64, Vec<bitmap::Bitmap>)>,
    snapshots: Vec<super::snapshot::Snapshot>,
    snapshot_table_len: u64,
    ext: super::ext::Extensions,
    ordered: bool,
    /// Guest data written since the last flush made it durable (in place, it changes no
    /// metadata, so only this says a flush has work to do).
    data_written: std::cell::Cell<bool>,
    drop_behind: pagecache::DropBehind,
    /// The cipher of an encrypted image: data is encrypted on its way to the disk.
    crypt: Option<std::sync::Arc<Crypt>>,
}

impl Writer {
    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.header.size
    }

    fn at(&self, k: ErrorKind) -> super::Error {
        k.at(&self.path)
    }

    /// Before the first change: clear autoclear bits we do not maintain and flag persistent
    /// bitmaps in use, durably, so no later crash can leave a stale bitmap marked valid.
    fn prepare(&mut self) -> Result<()> {
        if self.prepared {
            return Ok(());
        }
        let known = header::autoclear::KNOWN;
        let mut changed = false;
        if self.header.autoclear_features & !known != 0 {
            self.header.autoclear_features &= known;
            changed = true;
        }
        if let Some((dir_off, bitmaps)) = &self.bitmaps {
            let mut pos = *dir_off;
            let mut bytes = [0u8; bitmap::Entry::LEN];
            for _ in bitmaps {
                read_exact(&self.file, &mut bytes, pos, "bitmap directory")
                    .map_err(|e| self.at(e.into()))?;
                let mut entry = bitmap::Entry::read(&bytes);
                entry.flags |= bitmap::FLAG_IN_USE;
                entry.write(&mut bytes);
                pwrite(&self.file, &bytes, pos).map_err(|e| self.at(e.into()))?;
                pos += entry.encoded_len();
            }
            if !bitmaps.is_empty() {
                tracing::warn!(
                    "{}: persistent bitmaps {} flagged in use: this write makes them inconsistent",
                    self.path.display(),
                    bitmaps
                        .iter()
                        .map(|b| b.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        if changed {
            self.write_header()?;
        }
        if changed || self.bitmaps.as_ref().is_some_and(|(_, b)| !b.is_empty()) {
            self.sync()?;
        }
        self.prepared = true;
        Ok(())
    }

    fn write_header(&mut self) -> Result<()> {
        let bytes = self.header.to_bytes();
        pwrite(&self.file, &bytes, 0).map_err(|e| self.at(e.into()))
    }

    /// The ordering barrier between metadata updates; skipped while filling a new image.
    fn sync(&self) -> Result<()> {
        if !self.ordered {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| self.at(e.into()))
    }

    /// For an image this process just created and nobody else uses yet: skip the ordering
    /// barriers between metadata updates (a crash leaves a worthless partial output either
    /// way); [`Writer::finish`] makes everything durable once at the end.
    pub fn unordered(mut self) -> Self {
        self.ordered = false;
        self
    }

    /// Flushes, then makes the image (and its data file and directory entry) durable.
    pub fn finish(mut self) -> Result<()> {
        self.flush()?;
        if let Some((p, f)) = &self.data {
            f.sync_all().map_err(|e| ErrorKind::Io(e).at(p))?;
        }
        self.file.sync_all().map_err(|e| self.at(e.into()))?;
        super::storage::sync_parent(&self.path).map_err(|e| self.at(e.into()))
    }

    /// The L2 table at `offset`, loaded into the write-back cache.
    fn table(&mut self, offset: u64) -> Result<&mut L2Slot> {
        if !self.l2.contains_key(&offset) {
            let mut bytes = vec![0u8; self.cs as usize];
            read_exact(&self.file, &mut bytes, offset, "L2 table")
                .map_err(|e| self.at(e.into()))?;
            self.l2.insert(
                offset,
                L2Slot {
                    table: L2Table::parse(&bytes, self.fmt.extended),
                    dirty: false,
                },
            );
        }
        Ok(self.l2.get_mut(&offset).expect("inserted above"))
    }

    /// How the guest range at `guest` is stored now (including unflushed changes).
    fn status(&mut self, guest: u64, max: u64) -> Result<(Status, u64)> {
        let span = self.header.l1_span();
        let i = (guest / span) as usize;
        let limit = max.min((i as u64 + 1) * span - guest);
        let l2_off = match self.l1.get(i) {
            Some(e) if e.l2_offset() != 0 => e.l2_offset(),
            _ => return Ok((Status::Unallocated { host: None }, limit)),
        };
        let fmt = self.fmt;
        let slot = self.table(l2_off)?;
        mapping::run(&fmt, &slot.table, guest, limit).map_err(|k| k.at(&self.path))
    }

    /// Reads guest data as the image shows it now (for copy-on-write).
    fn read_current(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            if off >= self.header.size {
                buf[pos..].fill(0);
                break;
            }
            let max = ((buf.len() - pos) as u64).min(self.header.size - off);
            let (st, n) = self.status(off, max)?;
            let dst = &mut buf[pos..pos + n as usize];
            match st {
                Status::Data { host } => self.read_host(dst, host, off)?,
                Status::Zero { .. } => dst.fill(0),
                Status::Unallocated { .. } => match &self.backing {
                    Some(b) => b.read_at(dst, off)?,
                    None => dst.fill(0),
                },
                Status::Compressed(d) => {
                    let mut cluster = vec![0u8; self.cs as usize];
                    self.read_compressed(d, &mut cluster)?;
                    let within = (off % self.cs) as usize;
                    dst.copy_from_slice(&cluster[within..within + n as usize]);
                }
            }
            pos += n as usize;
        }
        Ok(())
    }

    fn read_compressed(&self, d: CompressedDescriptor, out: &mut [u8]) -> Result<()> {
        let len = Storage::size(&self.file).map_err(|e| self.at(e.into()))?;
        if d.offset >= len {
            return Err(self.at(corrupt(format!(
                "compressed cluster at host offset {:#x} lies past the end of the file",
                d.offset
            ))));
        }
        let mut input = vec![0u8; d.max_len.min(len - d.offset) as usize];
        read_exact(&self.file, &mut input, d.offset, "compressed cluster")
            .map_err(|e| self.at(e.into()))?;
        self.header
            .compression_type
            .decompress(&input, out)
            .map_err(|m| {
                self.at(corrupt(format!(
                    "compressed cluster at {:#x}: {m}",
                    d.offset
                )))
            })
    }

    /// The L2 table for guest cluster `gc`, writable: allocated when missing, copied when
    /// shared with a snapshot. Returns its offset.
    fn writable_table(&mut self, gc: u64) -> Result<u64> {
        let per = self.fmt.entries_per_table();
        let i = (gc / per) as usize;
        if i >= self.l1.len() {
            return Err(self.at(corrupt(format!(
                "guest cluster {gc} lies beyond the L1 table"
            ))));
        }
        let e = self.l1[i];
        let old = e.l2_offset();
        if old != 0 && e.copied() {
            self.table(old)?;
            return Ok(old);
        }
        let new = self
            .refs
            .alloc(&self.file, 1)
            .map_err(|k| k.at(&self.path))?;
        let table = if old == 0 {
            L2Table::empty(per as usize, self.fmt.extended)
        } else {
            // Shared with a snapshot: copy it. Its data clusters keep their counts (each is
            // referenced from both tables now); the old table loses this reference.
            self.frees.push((old / self.cs, 1));
            self.table(old)?.table.clone()
        };
        self.l2.insert(new, L2Slot { table, dirty: true });
        self.l1[i] = L1Entry(l1::COPIED | new);
        self.l1_dirty.insert(i);
        Ok(new)
    }

    fn entry(&mut self, gc: u64) -> Result<(u64, L2Entry)> {
        let t = self.writable_table(gc)?;
        let idx = (gc % self.fmt.entries_per_table()) as usize;
        Ok((t, self.l2[&t].table.entry(idx)))
    }

    fn set_entry(&mut self, table: u64, gc: u64, e: L2Entry) {
        let idx = (gc % self.fmt.entries_per_table()) as usize;
        let slot = self.l2.get_mut(&table).expect("writable table is cached");
        slot.table.set(idx, e);
        slot.dirty = true;
    }

    /// Schedules the release of what an entry referenced (after the flush that removes it).
    fn release(&mut self, e: &L2Entry) {
        if let Some(r) = self.clusters_of(e) {
            self.frees.push(r);
        }
    }

    /// Whether an entry's host cluster may be written in place (ours alone).
    fn owned(&mut self, e: &L2Entry) -> Result<bool> {
        if e.is_compressed()
            || e.host_offset() == 0 && !(self.data.is_some() && e.word & l2::COPIED != 0)
        {
            return Ok(false);
        }
        if self.data.is_some() {
            return Ok(true);
        }
        let rc = self
            .refs
            .get(&self.file, e.host_offset() / self.cs)
            .map_err(|k| k.at(&self.path))?;
        Ok(rc == 1)
    }

    /// A new host cluster for guest cluster `gc`: 1:1 in an external data file, else
    /// allocated.
    fn new_cluster(&mut self, gc: u64) -> Result<u64> {
        if self.data.is_some() {
            return Ok(gc * self.cs);
        }
        self.refs.alloc(&self.file, 1).map_err(|k| k.at(&self.path))
    }

    /// Reads guest data (at guest offset `guest`) stored at `host`, decrypted.
    fn read_host(&self, buf: &mut [u8], host: u64, guest: u64) -> Result<()> {
        crypto::read_stored(self.crypt.as_deref(), self.data_file().1, buf, host, guest)
            .map_err(|e| self.at(e.into()))
    }

    /// Writes guest data at `host`, encrypted in an encrypted image (a range that is not
    /// whole sectors completed from the sectors' current content).
    fn write_host(&self, buf: &[u8], host: u64) -> Result<()> {
        let (path, f) = self.data_target();
        let io = |e| ErrorKind::Io(e).at(path);
        let Some(c) = &self.crypt else {
            return pwrite(f, buf, host).map_err(io);
        };
        let s = crypto::cipher::SECTOR as u64;
        let start = host / s * s;
        let end = (host + buf.len() as u64).div_ceil(s) * s;
        let mut wide = vec![0u8; (end - start) as usize];
        let lead = (host - start) as usize;
        // Only the first and last sectors can be partly written: their current content is
        // read (guest offsets only number legacy AES sectors, which are never written).
        let last = wide.len() - s as usize;
        if lead != 0 {
            crypto::read_stored(Some(c), f, &mut wide[..s as usize], start, 0).map_err(io)?;
        }
        if end != host + buf.len() as u64 && (last > 0 || lead == 0) {
            crypto::read_stored(Some(c), f, &mut wide[last..], end - s, 0).map_err(io)?;
        }
        wide[lead..lead + buf.len()].copy_from_slice(buf);
        c.encrypt(&mut wide, start, 0);
        pwrite(f, &wide, start).map_err(io)
    }

    /// Whether data is encrypted on its way to the disk (so stored bytes cannot be copied
    /// in the kernel).
    pub fn encrypted(&self) -> bool {
        self.crypt.is_some()
    }

    /// Starts writing back the guest data written so far without waiting for it
    /// ([`pagecache::start_writeback`]): a long copy then overlaps the disk's work with its
    /// own, and the flush that ends it finds little left to do. Durability still comes only
    /// from the flushes.
    pub fn write_behind(&self) {
        pagecache::start_writeback(self.data_file().1, 0, 0);
    }

    /// For an image filled front to back (convert, merge): [`Writer::write_behind`], and the
    /// data written long enough ago leaves the page cache ([`pagecache::DropBehind`]).
    pub fn write_behind_dropping(&self) {
        let f = self.data_file().1;
        if let Ok(m) = f.metadata() {
            self.drop_behind.advance(f, m.len());
        }
    }

    /// Where guest data goes: the external data file, if any, else the image.
    fn data_file(&self) -> (&Path, &File) {
        match &self.data {
            Some((p, f)) => (p.as_path(), f),
            None => (self.path.as_path(), &self.file),
        }
    }

    /// [`Writer::data_file`], flagged as about to change.
    fn data_target(&self) -> (&Path, &File) {
        self.data_written.set(true);
        self.data_file()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.header.size) {
            return Err(self.at(ErrorKind::Unsupported(format!(
                "write of {len} bytes at {offset} goes past the end of the {}-byte disk",
                self.header.size
            ))));
        }
        Ok(())
    }
}
