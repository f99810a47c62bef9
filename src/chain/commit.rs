//! `qmprestore commit`: fold the INCs up to the restore point into the FULL, in place, then
//! delete them.
//!
//! One pass over the stacked chain's map: every guest range whose newest version lives in an
//! INC is written into the FULL once (zeroed ranges as zero clusters); ranges the FULL already
//! holds are not touched and no data is read twice. The FULL is flushed to stable storage
//! before anything is deleted; then the first INC after the restore point (if any, and if it
//! is linked) is re-linked to the FULL, and the folded INCs are deleted oldest first. Re-running
//! after an interruption at any point converges: a FULL that already holds a newer state is
//! simply overwritten with the same data by the INCs that are left, newest last.

use super::error::{ChainError, Result};
use super::manifest;
use super::merge::{open_chain, restore_chain};
use super::throttle::Throttle;
use crate::qcow2::write::Writer;
use crate::qcow2::{Disk, ErrorKind, Extent, Format};
use std::path::{Path, PathBuf};

pub struct CommitOptions {
    pub select: super::merge::ChainSelect,
    pub dry_run: bool,
    pub rate_limit: Option<u64>,
}

/// What a commit did (or would do).
#[derive(Debug, Default)]
pub struct CommitReport {
    pub full: PathBuf,
    pub folded: Vec<PathBuf>,
    pub relinked: Option<PathBuf>,
    /// Guest bytes written into the FULL.
    pub bytes: u64,
}

pub fn commit(dir: &Path, opts: &CommitOptions) -> Result<CommitReport> {
    let (bd, chain) = restore_chain(dir, &opts.select)?;
    let full_chain = bd.chain()?;
    let full = chain.files[0].path.clone();
    let folded: Vec<PathBuf> = chain.files[1..].iter().map(|f| f.path.clone()).collect();
    let next = full_chain
        .files
        .get(chain.files.len())
        .map(|f| f.path.clone());
    let mut report = CommitReport {
        full: full.clone(),
        folded: folded.clone(),
        relinked: None,
        bytes: 0,
    };
    if folded.is_empty() {
        return Ok(report);
    }
    let disk = open_chain(&chain)?;
    let full_image = disk.chain().last().expect("chain has a FULL");
    if full_image.format() != Format::Qcow2 {
        return Err(ChainError::Refused(format!(
            "{} is raw: commit needs a qcow2 FULL (use merge instead)",
            full.display()
        )));
    }
    refuse_shrunk(&disk)?;
    let relink = match &next {
        Some(n) => crate::qcow2::Disk::open_with(
            n,
            &crate::qcow2::OpenOptions {
                no_backing: true,
                ..Default::default()
            },
        )?
        .qcow2()
        .and_then(|q| q.backing_name().map(|_| n.clone())),
        None => None,
    };
    report.relinked = relink.clone();
    let ranges = newer_than_full(&disk)?;
    report.bytes = ranges.iter().map(|e| e.length).sum();
    if opts.dry_run {
        return Ok(report);
    }
    forget_manifest(&full)?;
    let mut w = Writer::open(&full)?;
    // A disk that grew between backups: the FULL grows first (a re-run finds it grown).
    w.grow(disk.size())?;
    fold(&disk, &ranges, &mut w, &Throttle::new(opts.rate_limit))?;
    drop(disk);
    w.finish()?;
    if let Some(n) = &relink {
        link_to(n, &full)?;
    }
    // The folded INCs go oldest first (a newer one left over only repeats what the FULL
    // holds). Linked ones are pointed at the FULL before any is deleted, so an interruption
    // never leaves an INC naming a deleted predecessor.
    for f in &folded {
        if is_linked(f)? {
            link_to(f, &full)?;
        }
    }
    for f in &folded {
        remove_backup(f)?;
    }
    crate::qcow2::create::sync_parent(&full).map_err(|e| ErrorKind::Io(e).at(dir))?;
    Ok(report)
}

/// Refuses chains in which the disk shrank: folding would have to cut the FULL, and an image
/// that shrinks loses data a later restore point might still show.
pub fn refuse_shrunk(disk: &Disk) -> Result<()> {
    let mut sizes = disk
        .chain()
        .map(|i| (i.size(), i.path().to_path_buf()))
        .collect::<Vec<_>>();
    sizes.reverse();
    for w in sizes.windows(2) {
        if w[1].0 < w[0].0 {
            return Err(ChainError::Refused(format!(
                "the disk shrank between backups ({} bytes in {}, {} in {}): use merge, which writes a new image",
                w[0].0,
                w[0].1.display(),
                w[1].0,
                w[1].1.display()
            )));
        }
    }
    Ok(())
}

/// The ranges of a stacked chain whose newest version lies above the bottom image (the FULL):
/// what folding must write into it.
pub fn newer_than_full(disk: &Disk) -> Result<Vec<Extent>> {
    let layers = disk.chain().count() as u32;
    let mut ranges = Vec::new();
    disk.for_each_extent(0, disk.size(), |e| {
        if e.depth + 1 < layers && (e.data || e.zero) {
            ranges.push(e);
        }
        Ok(())
    })?;
    Ok(ranges)
}

/// Writes `ranges` of `disk` into the FULL open in `w`: data read from the INCs, zeroed
/// ranges as zero clusters.
pub fn fold(disk: &Disk, ranges: &[Extent], w: &mut Writer, throttle: &Throttle) -> Result<()> {
    const STEP: u64 = 4 << 20;
    let mut buf = vec![0u8; STEP as usize];
    for e in ranges {
        if e.zero && !e.data {
            w.write_zeroes(e.start, e.length)?;
            throttle.pace(e.length);
            continue;
        }
        // Uncompressed data stored in a file: copied inside the kernel.
        if let (true, Some(host), Some(src)) = (e.data, e.offset, disk.data_file_of(e.depth)) {
            w.copy_from(src, host, e.start, e.length)?;
            throttle.pace(e.length);
            continue;
        }
        let mut pos = e.start;
        while pos < e.start + e.length {
            let n = STEP.min(e.start + e.length - pos);
            let b = &mut buf[..n as usize];
            disk.read_at(b, pos)?;
            w.write_at(b, pos)?;
            throttle.pace(n);
            pos += n;
        }
    }
    Ok(())
}

/// The backing file name and format a backup file's header names, if any.
pub fn backing_of(path: &Path) -> Result<Option<(String, Option<String>)>> {
    let d = Disk::open_with(
        path,
        &crate::qcow2::OpenOptions {
            no_backing: true,
            ..Default::default()
        },
    )?;
    Ok(d.qcow2().and_then(|q| {
        q.backing_name().map(|n| {
            (
                n.to_string_lossy().into_owned(),
                q.backing_format().map(str::to_string),
            )
        })
    }))
}

/// Whether a backup file names a backing file (the linked layout).
pub fn is_linked(path: &Path) -> Result<bool> {
    Ok(backing_of(path)?.is_some())
}

/// Sets `file`'s backing file name and format in place, unless the header already says so
/// (a backup file is never touched without need; its manifest goes first when it is).
pub fn set_backing(file: &Path, backing: &str, format: Format) -> Result<bool> {
    if backing_of(file)? == Some((backing.to_string(), Some(format.name().to_string()))) {
        return Ok(false);
    }
    forget_manifest(file)?;
    Writer::open(file)?.set_backing(Some((backing, Some(format))))?;
    Ok(true)
}

/// Points `inc`'s backing file at `full` (same directory, so by name).
pub fn link_to(inc: &Path, full: &Path) -> Result<()> {
    let name = full.file_name().expect("a file").to_string_lossy();
    set_backing(inc, &name, Format::Qcow2)?;
    Ok(())
}

/// [`manifest::forget`] with the error naming the file.
pub fn forget_manifest(file: &Path) -> Result<()> {
    manifest::forget(file).map_err(|e| ErrorKind::Io(e).at(manifest::path_for(file)).into())
}

/// Deletes a folded backup file, its manifest first (so no manifest outlives its file).
pub fn remove_backup(file: &Path) -> Result<()> {
    forget_manifest(file)?;
    std::fs::remove_file(file).map_err(|e| ErrorKind::Io(e).at(file).into())
}
