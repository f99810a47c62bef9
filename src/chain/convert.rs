//! `qmprestore convert`: the guest-visible contents of an image (and its chain) as a raw file,
//! onto a block device, or as a new qcow2 image (optionally compressed).
//!
//! Raw output:
//! The disk is cut into fixed chunks processed in parallel (rayon): each worker asks the
//! metadata which parts of its chunk hold data, reads only those, and writes them at the same
//! offset with positional writes, so no ordering between workers is needed. Ranges that read
//! as zeros stay holes in a regular output file (it is created empty at full length), and
//! data blocks that happen to be all zeros are not written either, as qemu-img does. Memory is
//! one chunk buffer per worker plus metadata. The output is flushed to stable storage before
//! success is reported, and a file this command created is removed again if it fails.

use super::outdir::NewDirs;
use super::progress;
use super::throttle::Throttle;
use crate::qcow2::create::CreateOptions;
use crate::qcow2::crypto::Keying;
use crate::qcow2::fault::pwrite;
use crate::qcow2::header::CompressionType;
use crate::qcow2::pagecache;
use crate::qcow2::write::{compress_cluster, Compressed, Writer};
use crate::qcow2::{Disk, Error, ErrorKind, Extent, OpenOptions, Result};
use rayon::prelude::*;
use std::fs::{File, OpenOptions as FileOpen};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Guest bytes one worker handles at a time.
pub const CHUNK: u64 = 4 << 20;
/// Granularity of zero detection in data (qemu-img's default `-S 4k`).
pub const ZERO_BLOCK: usize = 4096;

#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// Convert the disk as it was at this internal snapshot (id or name).
    pub snapshot: Option<String>,
    /// Show a progress bar (only drawn on a terminal).
    pub progress: bool,
    /// Average bytes per second to stay under (guest bytes processed).
    pub rate_limit: Option<u64>,
}

/// qcow2 output settings.
#[derive(Debug, Clone)]
pub struct Qcow2Output {
    pub cluster_size: u64,
    /// How compressed clusters are encoded (also recorded in the header).
    pub compression_type: CompressionType,
    /// Write every cluster that shrinks compressed.
    pub compress: bool,
    /// Encrypt the new image (LUKS).
    pub encrypt: Option<Keying>,
}

impl Default for Qcow2Output {
    fn default() -> Self {
        Qcow2Output {
            cluster_size: 65536,
            compression_type: CompressionType::Zlib,
            compress: false,
            encrypt: None,
        }
    }
}

fn open_source(src: &Path, dst: &Path, opts: &ConvertOptions) -> Result<Disk> {
    let disk = Disk::open_with(
        src,
        &OpenOptions {
            snapshot: opts.snapshot.clone(),
            ..Default::default()
        },
    )?;
    refuse_chain_member(&disk, dst)?;
    Ok(disk)
}

/// Writes the guest-visible contents of `src` to a new qcow2 image `dst` (replacing a file of
/// that name). Reading, zero detection and compression run in parallel; one writer appends
/// the clusters in guest order, so the output is laid out sequentially.
pub fn to_qcow2(src: &Path, dst: &Path, opts: &ConvertOptions, out: &Qcow2Output) -> Result<()> {
    let disk = open_source(src, dst, opts)?;
    let dirs = NewDirs::for_file(dst).map_err(|e| ErrorKind::Io(e).at(dst))?;
    if dst.exists() {
        std::fs::remove_file(dst).map_err(|e| ErrorKind::Io(e).at(dst))?;
    }
    disk_to_qcow2(&disk, dst, opts, out)?;
    dirs.keep();
    Ok(())
}

/// Writes the guest-visible contents of an opened disk to a new qcow2 image `dst` (which must
/// not exist); removes it again on failure.
pub fn disk_to_qcow2(
    disk: &Disk,
    dst: &Path,
    opts: &ConvertOptions,
    out: &Qcow2Output,
) -> Result<()> {
    let size = disk.size();
    if out.compress && out.encrypt.is_some() {
        // QEMU would store compressed clusters in plaintext; qemu-img refuses the same.
        return Err(ErrorKind::Unsupported(
            "compression and encryption are not supported at the same time".into(),
        )
        .at(dst));
    }
    let result = Writer::create(
        dst,
        &CreateOptions {
            size,
            cluster_size: out.cluster_size,
            compression: out.compression_type,
            encrypt: out.encrypt.clone(),
            ..Default::default()
        },
    )
    .and_then(|w| {
        super::workers::run(disk.is_remote(), || {
            write_qcow2(disk, w.unordered(), opts, out)
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// What the parallel stage makes of one chunk of the disk.
struct Produced {
    /// The chunk's guest offset and length, and its data (empty when nothing is written
    /// plainly).
    start: u64,
    len: u64,
    data: Vec<u8>,
    /// Byte ranges of `data` to write plainly (non-zero runs of clusters).
    plain: Vec<std::ops::Range<usize>>,
    /// Guest clusters to write compressed.
    compressed: Vec<(u64, Compressed)>,
    /// The chunk's data, when all of it lies uncompressed in local files: (layer, host offset,
    /// guest offset, length) to copy inside the kernel instead of reading it.
    copies: Vec<(u32, u64, u64, u64)>,
    /// Bytes of the chunk the metadata shows as data: what was read (and what `--rate-limit`
    /// paces; holes cost no I/O).
    data_bytes: u64,
}

fn write_qcow2(disk: &Disk, mut w: Writer, opts: &ConvertOptions, out: &Qcow2Output) -> Result<()> {
    let size = disk.size();
    let cs = out.cluster_size;
    let bar = progress::bytes(size, "convert", opts.progress);
    let throttle = Throttle::new(opts.rate_limit);
    let chunk = CHUNK.max(cs);
    // Workers read, scan and compress chunks while the writer appends earlier ones in guest
    // order; at most a few chunks per thread are held, so memory stays bounded whatever the
    // disk size. A remote disk's many workers wait on the store, not on each other: two
    // chunks beyond theirs keep the writer fed, and RSS under 128 MiB.
    let threads = rayon::current_num_threads();
    let window = if disk.is_remote() {
        threads + 2
    } else {
        2 * threads
    };
    // Chunk buffers go round between workers and writer: fresh allocations would cost a page
    // fault per 4 KiB every time.
    let pool = BufferPool::default();
    let pool = &pool;
    // Consecutive in-kernel copies from one contiguous source range become one call (of at
    // most MAX_COPY bytes, so the page cache behind it is dropped as it goes).
    const MAX_COPY: u64 = 32 << 20;
    let mut pending: Option<(u32, u64, u64, u64)> = None;
    let copy = |w: &mut Writer, run: Option<(u32, u64, u64, u64)>| -> Result<()> {
        if let Some((depth, host, start, len)) = run {
            let src = disk
                .data_file_of(depth)
                .expect("copy only planned for files");
            w.copy_from(src, host, start, len)?;
            w.write_behind_dropping();
            bar.set_position(start + len);
            throttle.pace(len);
        }
        Ok(())
    };
    // Only chunks holding data are visited: the new image reads zeros elsewhere.
    super::workers::ordered(
        disk.data_chunks(chunk),
        window,
        |c| produce(disk, c, chunk.min(size - c), cs, out, pool),
        |p| {
            for &(depth, host, start, len) in &p.copies {
                match &mut pending {
                    Some((d, h, s, l))
                        if *d == depth && *h + *l == host && *s + *l == start && *l < MAX_COPY =>
                    {
                        *l += len
                    }
                    _ => copy(&mut w, pending.replace((depth, host, start, len)))?,
                }
            }
            if !p.copies.is_empty() {
                return Ok(());
            }
            copy(&mut w, pending.take())?;
            for r in &p.plain {
                w.write_at(&p.data[r.clone()], p.start + r.start as u64)?;
            }
            if !p.compressed.is_empty() {
                w.write_compressed(&p.compressed)?;
            }
            w.write_behind_dropping();
            bar.set_position(p.start + p.len);
            throttle.pace(p.data_bytes);
            pool.put(p.data);
            Ok(())
        },
    )?;
    copy(&mut w, pending.take())?;
    w.finish()?;
    bar.finish_and_clear();
    Ok(())
}

/// Reads one chunk and decides what to write: runs of non-zero clusters (plain), or single
/// compressed clusters. Zero ranges produce nothing: the new image reads zeros there.
fn produce(
    disk: &Disk,
    start: u64,
    len: u64,
    cs: u64,
    out: &Qcow2Output,
    pool: &BufferPool,
) -> Result<Produced> {
    let mut p = Produced {
        start,
        len,
        data: Vec::new(),
        plain: Vec::new(),
        compressed: Vec::new(),
        copies: Vec::new(),
        data_bytes: 0,
    };
    let mut extents = Vec::new();
    disk.for_each_extent(start, len, |e| {
        extents.push(e);
        Ok(())
    })?;
    let data: Vec<&Extent> = extents.iter().filter(|e| !e.zero).collect();
    p.data_bytes = data.iter().map(|e| e.length).sum();
    if data.is_empty() {
        return Ok(p);
    }
    if !out.compress && out.encrypt.is_none() {
        // All data uncompressed in local files (checked as reads check it): copied inside the
        // kernel, holes between the pieces left alone.
        let mut copies = Vec::with_capacity(data.len());
        for e in &data {
            match disk.direct_source(e)? {
                Some((_, host)) => copies.push((e.depth, host, e.start, e.length)),
                None => break,
            }
        }
        if copies.len() == data.len() {
            p.copies = copies;
            return Ok(p);
        }
    }
    p.data = pool.take(len as usize);
    // Only the clusters the metadata shows holding data are read and scanned: a chunk with a
    // little data in a hole costs that data, not the chunk.
    let mut spans: Vec<std::ops::Range<u64>> = Vec::new();
    for e in &data {
        let first = (e.start - start) / cs;
        let end = (e.start + e.length - start).div_ceil(cs);
        match spans.last_mut() {
            Some(last) if last.end >= first => last.end = last.end.max(end),
            _ => spans.push(first..end),
        }
    }
    for span in spans {
        let (from, to) = (
            (span.start * cs) as usize,
            ((span.end * cs).min(len)) as usize,
        );
        let data = &mut p.data[from..to];
        disk.read_at(data, start + from as u64)?;
        let mut run: Option<std::ops::Range<usize>> = None;
        for (i, cluster) in data.chunks(cs as usize).enumerate() {
            let at = from + i * cs as usize;
            let zero = is_zero(cluster);
            if zero || out.compress && cluster.len() as u64 == cs {
                p.plain.extend(run.take());
                if !zero {
                    p.compressed.push((
                        (start + at as u64) / cs,
                        compress_cluster(out.compression_type, cluster),
                    ));
                }
                continue;
            }
            match &mut run {
                Some(r) => r.end = at + cluster.len(),
                None => run = Some(at..at + cluster.len()),
            }
        }
        p.plain.extend(run);
    }
    Ok(p)
}

/// Reusable chunk buffers.
#[derive(Default)]
struct BufferPool(std::sync::Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    fn take(&self, len: usize) -> Vec<u8> {
        let mut b = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        b.resize(len, 0);
        b
    }

    fn put(&self, b: Vec<u8>) {
        if b.capacity() > 0 {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(b);
        }
    }
}

/// Writes the guest-visible contents of `src` to `dst` as raw.
pub fn to_raw(src: &Path, dst: &Path, opts: &ConvertOptions) -> Result<()> {
    let disk = open_source(src, dst, opts)?;
    let dirs = NewDirs::for_file(dst).map_err(|e| ErrorKind::Io(e).at(dst))?;
    disk_to_raw(&disk, dst, opts)?;
    dirs.keep();
    Ok(())
}

/// Writes the guest-visible contents of an opened disk to `dst` as raw (a file, created or
/// replaced, or a block device); a file it created is removed again on failure.
pub fn disk_to_raw(disk: &Disk, dst: &Path, opts: &ConvertOptions) -> Result<()> {
    let existed = dst.exists();
    let at = |e: std::io::Error| ErrorKind::Io(e).at(dst);
    let out = FileOpen::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dst)
        .map_err(at)?;
    let result = write_raw(disk, &out, dst, opts);
    if result.is_err() && !existed {
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn write_raw(disk: &Disk, out: &File, dst: &Path, opts: &ConvertOptions) -> Result<()> {
    let at = |e: std::io::Error| ErrorKind::Io(e).at(dst);
    let meta = out.metadata().map_err(at)?;
    let sparse = meta.file_type().is_file();
    let size = disk.size();
    if sparse {
        // Empty the file first so every range we skip is a hole that reads as zeros.
        out.set_len(0).map_err(at)?;
        out.set_len(size).map_err(at)?;
    } else if meta.file_type().is_block_device() {
        let dev_size = block_device_size(out).map_err(at)?;
        if dev_size < size {
            return Err(ErrorKind::Unsupported(format!(
                "block device holds {dev_size} bytes, the image needs {size}"
            ))
            .at(dst));
        }
    }
    let bar = progress::bytes(size, "convert", opts.progress);
    let throttle = Throttle::new(opts.rate_limit);
    // A sparse file gets only the chunks holding data; a device gets zeros everywhere else.
    let chunks: Vec<u64> = if sparse {
        disk.data_chunks(CHUNK).collect::<Result<_>>()?
    } else {
        (0..size.div_ceil(CHUNK)).map(|i| i * CHUNK).collect()
    };
    super::workers::run(disk.is_remote(), || {
        chunks.par_iter().try_for_each_init(
            || (vec![0u8; CHUNK as usize], None),
            |(buf, behind), &start| -> Result<()> {
                let len = CHUNK.min(size - start);
                let mut extents = Vec::new();
                disk.for_each_extent(start, len, |e| {
                    extents.push(e);
                    Ok(())
                })?;
                let mut moved = 0;
                for e in extents {
                    let slice = &mut buf[..e.length as usize];
                    if e.zero {
                        if sparse {
                            continue;
                        }
                        slice.fill(0);
                    } else {
                        disk.read_at(slice, e.start)?;
                    }
                    moved += e.length;
                    write_nonzero(out, slice, e.start, sparse).map_err(at)?;
                }
                // This chunk starts going to disk, and this worker's previous one leaves the page
                // cache once written: the output's cache stays two chunks per worker (see
                // `pagecache`), however large the disk.
                pagecache::start_writeback(out, start, len);
                if let Some((s, l)) = behind.replace((start, len)) {
                    pagecache::drop_written(out, s, l);
                }
                bar.inc(len);
                throttle.pace(moved);
                Ok(())
            },
        )
    })?;
    out.sync_all().map_err(at)?;
    bar.finish_and_clear();
    Ok(())
}

/// Writes `data` at `offset`, skipping all-zero blocks when the target is sparse.
fn write_nonzero(out: &File, data: &[u8], offset: u64, sparse: bool) -> std::io::Result<()> {
    if !sparse {
        return pwrite(out, data, offset);
    }
    let mut run_start: Option<usize> = None;
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + ZERO_BLOCK).min(data.len());
        let zero = is_zero(&data[pos..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(s)) => {
                pwrite(out, &data[s..pos], offset + s as u64)?;
                run_start = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(s) = run_start {
        pwrite(out, &data[s..], offset + s as u64)?;
    }
    Ok(())
}

/// Fast all-zero test (word at a time).
pub fn is_zero(data: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets aligned middle.
    let (head, mid, tail) = unsafe { data.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

fn block_device_size(f: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    let n = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(n)
}

/// Refuses to write over any file the source disk reads from, and outputs that are not local
/// files (an object store takes whole uploaded files: write locally, then push).
pub fn refuse_chain_member(disk: &Disk, dst: &Path) -> Result<()> {
    if !crate::qcow2::protocol::is_local(dst) {
        return Err(ErrorKind::Unsupported(
            "images are written to local files or devices only; to store one in an object store, write it locally and upload it (qmpbackup push)".into(),
        )
        .at(dst));
    }
    let Ok(target) = std::fs::metadata(dst) else {
        return Ok(());
    };
    for d in disk.chain() {
        let mut files = vec![d.path().to_path_buf()];
        if let Some(df) = d.qcow2().and_then(|q| q.data_file()) {
            files.push(df.path.clone());
        }
        for f in files {
            if let Ok(m) = std::fs::metadata(&f) {
                if m.dev() == target.dev() && m.ino() == target.ino() {
                    return Err(Error {
                        path: dst.to_path_buf(),
                        kind: ErrorKind::Unsupported(format!(
                            "refusing to overwrite {}, which the source reads from",
                            f.display()
                        )),
                    });
                }
            }
        }
    }
    Ok(())
}
