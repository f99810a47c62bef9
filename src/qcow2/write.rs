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

mod header_edit;
mod snapshots;
pub use snapshots::Op as SnapshotOp;

use super::alloc::Refcounts;
use super::bitmap;
use super::create::CreateOptions;
use super::disk::{Disk, OpenOptions};
use super::error::{corrupt, ErrorKind, Result};
use super::header::{self, CompressionType, Header};
use super::image::Qcow2;
use super::l1::{self, L1Entry};
use super::l2::{self, CompressedDescriptor, L2Entry, L2Format, L2Table};
use super::lock::Ours;
use super::mapping::{self, Status};
use super::storage::{read_exact, read_zero_padded, Storage};
use crate::qcow2::fault::{copy_range, pwrite};
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

/// What a writer needs to know of its image.
struct Parts<'a> {
    path: &'a Path,
    header: Header,
    ext: super::ext::Extensions,
    /// The external data file, resolved.
    data_file: Option<PathBuf>,
    /// Backing file name and format, as the header names them.
    backing: Option<(std::ffi::OsString, Option<String>)>,
    snapshots: Vec<super::snapshot::Snapshot>,
    /// Bytes of the snapshot table on disk (entries written by others may be shorter or
    /// longer than ours: the clusters to release on replacing it are counted from this).
    snapshot_table_len: u64,
    /// Bitmap directory offset and entries, when bitmaps are in use.
    bitmaps: Option<(u64, Vec<bitmap::Bitmap>)>,
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
}

impl Writer {
    /// Opens an existing image for writing (its backing chain read-only, for copy-on-write of
    /// partial clusters).
    pub fn open(path: &Path) -> Result<Writer> {
        let at = |k: ErrorKind| k.at(path);
        let reader = Qcow2::open(path)?;
        let h = reader.header().clone();
        if h.corrupt() {
            return Err(at(ErrorKind::Unsupported(
                "the image is marked corrupt; it must be repaired before it is written".into(),
            )));
        }
        if h.dirty() {
            // Refcounts are not trustworthy (lazy refcounts were in use): rebuild them from
            // the mapping before allocating anything, as QEMU does on a writable open.
            tracing::warn!(
                "{}: dirty bit set, repairing refcounts first",
                path.display()
            );
            super::check::repair(path, super::check::Repair::All)?;
            return Writer::open(path);
        }
        refuse_corruptions(&reader, path)?;
        let bitmaps = reader
            .extensions()
            .bitmaps
            .filter(|_| !reader.bitmaps().is_empty())
            .map(|e| (e.directory_offset, reader.bitmaps().to_vec()));
        Writer::assemble(Parts {
            path,
            header: h,
            ext: reader.extensions().clone(),
            data_file: reader.data_file().map(|d| d.path.clone()),
            backing: reader.backing_name().map(|n| {
                (
                    n.to_os_string(),
                    reader.backing_format().map(str::to_string),
                )
            }),
            snapshots: reader.snapshots().to_vec(),
            snapshot_table_len: reader.snapshot_table_len(),
            bitmaps,
        })
    }

    /// Creates a new image at `path` (which must not exist) and opens it for writing: the
    /// state is known from what was just written, so nothing is read back and checked (the
    /// file is not made durable; the writer's flushes do that).
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Writer> {
        let created = super::create::create_file(path, opts, false)?;
        let h = created.header;
        let end = if h.has_backing_file() {
            h.backing_file_offset as usize
        } else {
            created.cluster0.len()
        };
        let ext = super::ext::Extensions::parse(&created.cluster0[h.header_length as usize..end])
            .map_err(|k| k.at(path))?;
        let result = Writer::assemble(Parts {
            path,
            data_file: ext
                .data_file
                .as_ref()
                .map(|n| super::image::resolve_relative(path, Path::new(n))),
            backing: opts
                .backing
                .as_ref()
                .map(|(n, f)| (n.into(), f.map(|f| f.name().to_string()))),
            header: h,
            ext,
            snapshots: Vec::new(),
            snapshot_table_len: 0,
            bitmaps: None,
        });
        if result.is_err() {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    /// A writer over an image whose header, extensions and side files are known.
    fn assemble(p: Parts) -> Result<Writer> {
        let path = p.path;
        let at = |k: ErrorKind| k.at(path);
        let h = p.header;
        let (file, mine) = super::lock::open_for_write(path).map_err(at)?;
        let mut ours = vec![mine];
        let data = match p.data_file {
            Some(d) => {
                let (f, mine) = super::lock::open_for_write(&d).map_err(|k| k.at(&d))?;
                ours.push(mine);
                Some((d, f))
            }
            None => None,
        };
        let backing = match &p.backing {
            Some((name, format)) => Some(open_backing(path, name, format.as_deref())?),
            None => None,
        };
        let refs = Refcounts::load(&file, &h).map_err(at)?;
        let l1 = l1::read_table(&file, h.l1_table_offset, h.l1_size).map_err(at)?;
        Ok(Writer {
            path: path.to_path_buf(),
            file,
            data,
            _ours: ours,
            fmt: L2Format::of(&h),
            cs: h.cluster_size(),
            header: h,
            l1,
            l1_dirty: BTreeSet::new(),
            l2: HashMap::new(),
            refs,
            backing,
            frees: Vec::new(),
            compress_pos: None,
            prepared: false,
            bitmaps: p.bitmaps,
            snapshots: p.snapshots,
            snapshot_table_len: p.snapshot_table_len,
            ext: p.ext,
            ordered: true,
            data_written: std::cell::Cell::new(false),
            drop_behind: Default::default(),
        })
    }

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
                Status::Data { host } => read_zero_padded(self.data_file().1, dst, host)
                    .map_err(|e| self.at(e.into()))?,
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

    fn write_host(&self, buf: &[u8], host: u64) -> Result<()> {
        let (path, f) = self.data_target();
        pwrite(f, buf, host).map_err(|e| ErrorKind::Io(e).at(path))
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

    /// Writes `buf` at guest offset `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.prepare()?;
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let gc = off / self.cs;
            let within = (off % self.cs) as usize;
            let whole = (buf.len() - pos) / self.cs as usize;
            if within == 0 && whole > 1 && !self.fmt.extended {
                let n = self.write_fresh_run(gc, &buf[pos..pos + whole * self.cs as usize])?;
                if n > 0 {
                    pos += n as usize * self.cs as usize;
                    self.maybe_flush()?;
                    continue;
                }
            }
            let n = (self.cs as usize - within).min(buf.len() - pos);
            self.write_in_cluster(gc, within, &buf[pos..pos + n])?;
            pos += n;
            self.maybe_flush()?;
        }
        Ok(())
    }

    /// Writes `len` bytes of `src` (from `src_off`) at guest offset `guest`, copying inside the
    /// kernel where the target clusters are unallocated (a fresh image: convert, merge) or ours
    /// alone (commit into a FULL), and through memory otherwise.
    pub fn copy_from(&mut self, src: &File, src_off: u64, guest: u64, len: u64) -> Result<()> {
        self.check_range(guest, len)?;
        self.prepare()?;
        let cs = self.cs;
        let mut done = 0;
        while done < len {
            let at = guest + done;
            let whole = if at % cs == 0 { (len - done) / cs } else { 0 };
            if let Some((table, n)) = self.fresh_run(at / cs, whole)? {
                let host = self.alloc_run(at / cs, n)?;
                let (path, dst) = self.data_target();
                copy_range(src, src_off + done, dst, host, n * cs)
                    .map_err(|e| ErrorKind::Io(e).at(path))?;
                self.map_run(table, at / cs, host, n);
                done += n * cs;
            } else if let Some((host, n)) = self.owned_run(at / cs, whole)? {
                // Clusters that are ours alone are overwritten in place, also in the kernel.
                let (path, dst) = self.data_target();
                copy_range(src, src_off + done, dst, host, n * cs)
                    .map_err(|e| ErrorKind::Io(e).at(path))?;
                done += n * cs;
            } else {
                let n = (len - done).min(cs - at % cs);
                let mut buf = vec![0u8; n as usize];
                read_zero_padded(src, &mut buf, src_off + done).map_err(|e| self.at(e.into()))?;
                self.write_at(&buf, at)?;
                done += n;
            }
            self.maybe_flush()?;
        }
        Ok(())
    }

    /// Up to `max` whole clusters from `gc` that can be overwritten in place (allocated, not
    /// zero-flagged, ours alone) and lie back to back on the host: (first host offset, count).
    fn owned_run(&mut self, gc: u64, max: u64) -> Result<Option<(u64, u64)>> {
        if self.fmt.extended {
            return Ok(None);
        }
        let mut first = 0;
        let mut n = 0;
        while n < max {
            let (_, e) = self.entry(gc + n)?;
            if e.word & l2::ZERO != 0 || !self.owned(&e)? {
                break;
            }
            let host = e.host_offset();
            if n == 0 {
                first = host;
            } else if host != first + n * self.cs {
                break;
            }
            n += 1;
        }
        Ok((n > 0).then_some((first, n)))
    }

    /// The fast path for filling unallocated space (a fresh image, a convert, a merge): a run
    /// of whole clusters from `gc` that are all unallocated gets one contiguous allocation and
    /// one write. Returns how many clusters it wrote (0: not applicable here).
    fn write_fresh_run(&mut self, gc: u64, data: &[u8]) -> Result<u64> {
        let Some((table, n)) = self.fresh_run(gc, data.len() as u64 / self.cs)? else {
            return Ok(0);
        };
        if n < 2 {
            return Ok(0);
        }
        let host = self.alloc_run(gc, n)?;
        self.write_host(&data[..(n * self.cs) as usize], host)?;
        self.map_run(table, gc, host, n);
        Ok(n)
    }

    /// How many of the (at most `max`) guest clusters from `gc`, within one L2 table, are
    /// unallocated (standard L2 only), with that table made writable; `None` if none.
    fn fresh_run(&mut self, gc: u64, max: u64) -> Result<Option<(u64, u64)>> {
        if max == 0 || self.fmt.extended {
            return Ok(None);
        }
        let per = self.fmt.entries_per_table();
        let table = self.writable_table(gc)?;
        let first = (gc % per) as usize;
        let slot = &self.l2[&table];
        let n = (0..max.min(per - gc % per) as usize)
            .take_while(|&i| slot.table.entry(first + i) == L2Entry::default())
            .count() as u64;
        Ok((n > 0).then_some((table, n)))
    }

    /// Host clusters for `n` guest clusters from `gc`: contiguous, 1:1 in a data file.
    fn alloc_run(&mut self, gc: u64, n: u64) -> Result<u64> {
        match self.data {
            Some(_) => Ok(gc * self.cs),
            None => self.refs.alloc(&self.file, n).map_err(|k| self.at(k)),
        }
    }

    /// Maps `n` guest clusters from `gc` to the host run at `host`.
    fn map_run(&mut self, table: u64, gc: u64, host: u64, n: u64) {
        for i in 0..n {
            let word = l2::COPIED | (host + i * self.cs);
            self.set_entry(table, gc + i, L2Entry { word, bitmap: 0 });
        }
    }

    fn write_in_cluster(&mut self, gc: u64, within: usize, data: &[u8]) -> Result<()> {
        let (table, e) = self.entry(gc)?;
        if self.fmt.extended {
            return self.write_subclusters(table, gc, e, within, data);
        }
        let zero_flag = e.word & l2::ZERO != 0;
        if !zero_flag && self.owned(&e)? {
            self.write_host(data, e.host_offset() + within as u64)?;
            return Ok(());
        }
        // Copy on write: a whole new cluster holding the old content around the new data.
        self.copy_on_write(table, gc, &e, within, data, 0)
    }

    /// Gives guest cluster `gc` a new host cluster holding its current content with `data`
    /// laid over it at `within`, and releases the old one (after the next flush).
    fn copy_on_write(
        &mut self,
        table: u64,
        gc: u64,
        old: &L2Entry,
        within: usize,
        data: &[u8],
        bitmap: u64,
    ) -> Result<()> {
        let cs = self.cs as usize;
        let host = self.new_cluster(gc)?;
        if data.len() == cs {
            self.write_host(data, host)?;
        } else {
            let mut full = vec![0u8; cs];
            self.read_current(&mut full, gc * self.cs)?;
            full[within..within + data.len()].copy_from_slice(data);
            self.write_host(&full, host)?;
        }
        self.release(old);
        self.set_entry(
            table,
            gc,
            L2Entry {
                word: l2::COPIED | host,
                bitmap,
            },
        );
        Ok(())
    }

    /// Extended L2: only the subclusters a write touches are filled (partial ones completed
    /// from their current content) and marked allocated.
    fn write_subclusters(
        &mut self,
        table: u64,
        gc: u64,
        e: L2Entry,
        within: usize,
        data: &[u8],
    ) -> Result<()> {
        let cs = self.cs as usize;
        let sub = cs / l2::SUBCLUSTERS as usize;
        let cluster_off = gc * self.cs;
        let first = within / sub;
        let last = (within + data.len() - 1) / sub;
        let (lo, hi) = (first * sub, (last + 1) * sub);
        let mut span = vec![0u8; hi - lo];
        if within != lo || within + data.len() != hi {
            self.read_current(&mut span, cluster_off + lo as u64)?;
        }
        span[within - lo..within - lo + data.len()].copy_from_slice(data);
        let mask: u32 = (first..=last).fold(0, |m, s| m | (1 << s));
        let has_host = e.host_offset() != 0 || (self.data.is_some() && e.word & l2::COPIED != 0);
        if has_host && self.owned(&e)? {
            self.write_host(&span, e.host_offset() + lo as u64)?;
            let bitmap = (e.bitmap | mask as u64) & !((mask as u64) << 32);
            self.set_entry(
                table,
                gc,
                L2Entry {
                    word: e.word,
                    bitmap,
                },
            );
            return Ok(());
        }
        if !e.is_compressed() && !has_host {
            let host = self.new_cluster(gc)?;
            self.write_host(&span, host + lo as u64)?;
            let zero = (e.bitmap >> 32) as u32 & !mask;
            self.set_entry(
                table,
                gc,
                L2Entry {
                    word: l2::COPIED | host,
                    bitmap: ((zero as u64) << 32) | mask as u64,
                },
            );
            return Ok(());
        }
        // Compressed or shared: copy the whole cluster.
        self.copy_on_write(table, gc, &e, lo, &span, 0xffff_ffff)
    }

    /// Makes `[offset, offset + len)` read as zeros: whole clusters (or subclusters) become
    /// zero entries and release their data; partial ones are written with zeros. Version 2
    /// images have no zero flag: there whole clusters are unallocated when nothing lies
    /// beneath, and written with zeros otherwise.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.set_range(offset, len, true)
    }

    /// Drops `[offset, offset + len)`: whole clusters (subclusters) become unallocated, so they
    /// read from the backing file again (or as zeros without one); partial ones are untouched.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.set_range(offset, len, false)
    }

    fn set_range(&mut self, offset: u64, len: u64, zero: bool) -> Result<()> {
        self.check_range(offset, len)?;
        self.prepare()?;
        let unit = self.fmt.unit_size();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let gc = pos / self.cs;
            let cluster_end = ((gc + 1) * self.cs).min(end);
            let a = pos.div_ceil(unit) * unit;
            let b = (cluster_end / unit) * unit;
            if zero {
                // Partial units at either end get real zeros.
                for (s, e) in [(pos, a.min(cluster_end)), (b.max(a).max(pos), cluster_end)] {
                    if e > s {
                        self.write_at(&vec![0u8; (e - s) as usize], s)?;
                    }
                }
            }
            if b > a {
                self.set_units(gc, a, b, zero)?;
            }
            pos = cluster_end;
            self.maybe_flush()?;
        }
        Ok(())
    }

    /// Whole units `[a, b)` of guest cluster `gc` become zero (or unallocated).
    fn set_units(&mut self, gc: u64, a: u64, b: u64, zero: bool) -> Result<()> {
        let (table, e) = self.entry(gc)?;
        if self.fmt.extended {
            let sub = self.fmt.unit_size();
            let first = (a - gc * self.cs) / sub;
            let last = (b - gc * self.cs) / sub;
            let mask: u64 = (first..last).fold(0, |m, s| m | (1 << s));
            if e.is_compressed() {
                // Compressed clusters have no subclusters: decompress, then zero the range.
                let mut full = vec![0u8; self.cs as usize];
                self.read_current(&mut full, gc * self.cs)?;
                full[(first * sub) as usize..(last * sub) as usize].fill(0);
                return self.write_in_cluster(gc, 0, &full);
            }
            let mut bitmap = e.bitmap & !mask;
            bitmap = if zero {
                bitmap | (mask << 32)
            } else {
                bitmap & !(mask << 32)
            };
            let mut word = e.word;
            if bitmap as u32 == 0
                && (e.host_offset() != 0 || self.data.is_some() && e.word & l2::COPIED != 0)
            {
                // No subcluster uses the host cluster any more.
                self.release(&e);
                word = 0;
            }
            self.set_entry(table, gc, L2Entry { word, bitmap });
            return Ok(());
        }
        let whole = a == gc * self.cs && b == (gc + 1) * self.cs;
        debug_assert!(whole);
        let version2 = self.header.version < 3;
        if zero && version2 && self.backing.is_some() {
            return self.write_in_cluster(gc, 0, &vec![0u8; self.cs as usize]);
        }
        self.release(&e);
        let word = if zero && !version2 { l2::ZERO } else { 0 };
        self.set_entry(table, gc, L2Entry { word, bitmap: 0 });
        Ok(())
    }

    /// Writes whole guest clusters in compressed form. `clusters` pairs a guest cluster index
    /// with its compressed stream (from [`compress_cluster`]), or with the plain data when it
    /// does not compress; compress them in parallel before calling this.
    pub fn write_compressed(&mut self, clusters: &[(u64, Compressed)]) -> Result<()> {
        if self.data.is_some() {
            return Err(self.at(ErrorKind::Unsupported(
                "compressed clusters are not possible with an external data file".into(),
            )));
        }
        self.prepare()?;
        for (gc, c) in clusters {
            self.check_range(gc * self.cs, self.cs)?;
            match c {
                Compressed::Plain(data) => self.write_in_cluster(*gc, 0, data)?,
                Compressed::Stream(bytes) => {
                    let off = self.place_compressed(bytes.len() as u64)?;
                    self.data_written.set(true);
                    pwrite(&self.file, bytes, off).map_err(|e| self.at(e.into()))?;
                    let (table, e) = self.entry(*gc)?;
                    self.release(&e);
                    let word = CompressedDescriptor::encode(
                        off,
                        bytes.len() as u64,
                        self.fmt.cluster_bits,
                    );
                    self.set_entry(table, *gc, L2Entry { word, bitmap: 0 });
                }
            }
            self.maybe_flush()?;
        }
        Ok(())
    }

    /// Finds room for `len` compressed bytes, packing streams back to back into host clusters,
    /// and takes one reference on every host cluster the stream touches.
    fn place_compressed(&mut self, len: u64) -> Result<u64> {
        let cs = self.cs;
        if let Some(pos) = self.compress_pos.take() {
            let (first, last) = (pos / cs, (pos + len - 1) / cs);
            // The cluster holding `pos` holds earlier streams of this flush interval (nothing
            // is freed before the next flush, which forgets `pos`); it needs room for one more
            // reference, and the following clusters must be free.
            let max = self.refs.format().max_value();
            let mut ok = self.refs.get(&self.file, first).map_err(|k| self.at(k))? < max;
            let mut claimed = Vec::new();
            for c in first + 1..=last {
                if !ok {
                    break;
                }
                ok = self.refs.claim(&self.file, c).map_err(|k| self.at(k))?;
                if ok {
                    claimed.push(c);
                }
            }
            if ok {
                self.refs
                    .add(&self.file, first, 1)
                    .map_err(|k| self.at(k))?;
                self.compress_pos = Some(pos + len).filter(|e| e % cs != 0);
                return Ok(pos);
            }
            for c in claimed {
                self.refs.set(&self.file, c, 0).map_err(|k| self.at(k))?;
            }
        }
        let start = self
            .refs
            .alloc(&self.file, len.div_ceil(cs))
            .map_err(|k| self.at(k))?;
        self.compress_pos = Some(start + len).filter(|e| e % cs != 0);
        Ok(start)
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

    fn maybe_flush(&mut self) -> Result<()> {
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
        let dirty = super::alloc::sorted_keys(&self.l2, |s| s.dirty);
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

/// Refuses to write an image whose metadata `check` finds corrupt. The writer trusts the
/// refcounts: a refcount block placed on the L1 table or an L2 table, or a cluster referenced
/// twice with refcount 1, would turn the next allocation or in-place write into damage to
/// other structures (QEMU catches some of this with overlap checks at write time; checking
/// first, metadata only, catches all of it before anything is touched). Leaked clusters are
/// harmless and allowed: an interrupted write leaves them.
fn refuse_corruptions(reader: &Qcow2, path: &Path) -> Result<()> {
    let report = super::check::check_open(reader, path)?;
    if report.corruptions == 0 && report.check_errors == 0 {
        return Ok(());
    }
    let first = report
        .messages
        .iter()
        .find(|m| m.starts_with("ERROR"))
        .map(|m| format!(" (first: {})", m.trim_start_matches("ERROR ")))
        .unwrap_or_default();
    let errors = match report.check_errors {
        0 => String::new(),
        n => format!(" and {n} unreadable structure(s)"),
    };
    Err(ErrorKind::Unsupported(format!(
        "refusing to write: check finds {} corruption(s){errors}{first}; \
         repair a copy with `qmprestore check --repair all`",
        report.corruptions
    ))
    .at(path))
}

/// Opens the backing chain of the image at `path` read-only (for copy-on-write reads).
/// Opens the backing chain `name` (with `format`) would give the image at `path`: what a
/// new backing link must pass before anything is written.
pub fn open_backing(path: &Path, name: &std::ffi::OsStr, format: Option<&str>) -> Result<Disk> {
    let target = super::disk::backing_path(path, name).map_err(|k| k.at(path))?;
    let format = match format {
        Some(f) => Some(super::Format::from_name(f).ok_or_else(|| {
            ErrorKind::Unsupported(format!("backing file format '{f}' is not supported")).at(path)
        })?),
        None => None,
    };
    Disk::open_with(
        &target,
        &OpenOptions {
            format,
            ..Default::default()
        },
    )
}

/// A cluster prepared for [`Writer::write_compressed`].
pub enum Compressed {
    /// The compressed stream (shorter than a cluster).
    Stream(Vec<u8>),
    /// Did not compress: stored as plain data.
    Plain(Vec<u8>),
}

/// Compresses one cluster for [`Writer::write_compressed`]: the stream, or the data itself
/// where compressing saves nothing (QEMU stores such clusters plainly too).
pub fn compress_cluster(kind: CompressionType, data: &[u8]) -> Compressed {
    match kind.compress(data) {
        Some(stream) => Compressed::Stream(stream),
        None => Compressed::Plain(data.to_vec()),
    }
}
