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

use super::progress;
use crate::qcow2::create::{create, CreateOptions};
use crate::qcow2::fault::pwrite;
use crate::qcow2::header::CompressionType;
use crate::qcow2::write::{compress_cluster, Compressed, Writer};
use crate::qcow2::{Disk, Error, ErrorKind, OpenOptions, Result};
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
}

/// qcow2 output settings.
#[derive(Debug, Clone)]
pub struct Qcow2Output {
    pub cluster_size: u64,
    /// How compressed clusters are encoded (also recorded in the header).
    pub compression_type: CompressionType,
    /// Write every cluster that shrinks compressed.
    pub compress: bool,
}

impl Default for Qcow2Output {
    fn default() -> Self {
        Qcow2Output {
            cluster_size: 65536,
            compression_type: CompressionType::Zlib,
            compress: false,
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
    if dst.exists() {
        std::fs::remove_file(dst).map_err(|e| ErrorKind::Io(e).at(dst))?;
    }
    let size = disk.size();
    create(
        dst,
        &CreateOptions {
            size,
            cluster_size: out.cluster_size,
            compression: out.compression_type,
            ..Default::default()
        },
    )?;
    let result = write_qcow2(&disk, dst, opts, out);
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// One cluster's worth of output, produced by the parallel stage.
enum Piece {
    Plain(u64, Vec<u8>),
    Compressed(u64, Compressed),
}

fn write_qcow2(disk: &Disk, dst: &Path, opts: &ConvertOptions, out: &Qcow2Output) -> Result<()> {
    let size = disk.size();
    let cs = out.cluster_size;
    let mut w = Writer::open(dst)?;
    let bar = progress::bytes(size, "convert", opts.progress);
    let chunk = CHUNK.max(cs);
    // A batch is what the workers produce before the writer consumes it: a few chunks per
    // thread, so memory stays at a few dozen MiB whatever the disk size.
    let batch = chunk * 4 * rayon::current_num_threads() as u64;
    let mut start = 0;
    while start < size {
        let end = (start + batch).min(size);
        let chunks: Vec<u64> = (start..end).step_by(chunk as usize).collect();
        let pieces: Vec<Vec<Piece>> = chunks
            .par_iter()
            .map(|&c| produce(disk, c, chunk.min(size - c), cs, out))
            .collect::<Result<_>>()?;
        for piece in pieces.into_iter().flatten() {
            match piece {
                Piece::Plain(off, data) => w.write_at(&data, off)?,
                Piece::Compressed(gc, c) => w.write_compressed(&[(gc, c)])?,
            }
        }
        bar.inc(end - start);
        start = end;
    }
    w.flush()?;
    bar.finish_and_clear();
    Ok(())
}

/// Reads one chunk and turns it into pieces: runs of non-zero clusters (plain), or single
/// compressed clusters. Zero ranges produce nothing: the new image reads zeros there.
fn produce(disk: &Disk, start: u64, len: u64, cs: u64, out: &Qcow2Output) -> Result<Vec<Piece>> {
    let mut pieces = Vec::new();
    if disk.is_zero(start, len)? {
        return Ok(pieces);
    }
    let mut buf = vec![0u8; len as usize];
    disk.read_at(&mut buf, start)?;
    let mut run: Option<(u64, Vec<u8>)> = None;
    for (i, cluster) in buf.chunks(cs as usize).enumerate() {
        let off = start + i as u64 * cs;
        if is_zero(cluster) {
            pieces.extend(run.take().map(|(o, d)| Piece::Plain(o, d)));
            continue;
        }
        if out.compress && cluster.len() as u64 == cs {
            pieces.extend(run.take().map(|(o, d)| Piece::Plain(o, d)));
            pieces.push(Piece::Compressed(
                off / cs,
                compress_cluster(out.compression_type, cluster),
            ));
            continue;
        }
        match &mut run {
            Some((_, d)) => d.extend_from_slice(cluster),
            None => run = Some((off, cluster.to_vec())),
        }
    }
    pieces.extend(run.map(|(o, d)| Piece::Plain(o, d)));
    Ok(pieces)
}

/// Writes the guest-visible contents of `src` to `dst` as raw.
pub fn to_raw(src: &Path, dst: &Path, opts: &ConvertOptions) -> Result<()> {
    let disk = open_source(src, dst, opts)?;
    let existed = dst.exists();
    let at = |e: std::io::Error| ErrorKind::Io(e).at(dst);
    let out = FileOpen::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dst)
        .map_err(at)?;
    let result = write_raw(&disk, &out, dst, opts);
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
    let chunks: Vec<u64> = (0..size.div_ceil(CHUNK)).map(|i| i * CHUNK).collect();
    chunks.par_iter().try_for_each_init(
        || vec![0u8; CHUNK as usize],
        |buf, &start| -> Result<()> {
            let len = CHUNK.min(size - start);
            let mut extents = Vec::new();
            disk.for_each_extent(start, len, |e| {
                extents.push(e);
                Ok(())
            })?;
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
                write_nonzero(out, slice, e.start, sparse).map_err(at)?;
            }
            bar.inc(len);
            Ok(())
        },
    )?;
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

/// Refuses to write over any file the source disk reads from.
pub fn refuse_chain_member(disk: &Disk, dst: &Path) -> Result<()> {
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
