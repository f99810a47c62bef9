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
//!
//! The FULL's manifest follows the change ([`Rewrite`]): checksums of what the fold wrote are
//! recomputed, the others kept, so `verify` still proves the whole file afterwards. The FULL
//! takes the modification time of the last INC folded into it, before the first kept one's,
//! as the original restore tool (which orders files by it) needs.

use super::error::{ChainError, Result};
use super::links::{is_linked, mtime, relink, remove_backup};
use super::throttle::Throttle;
use crate::qcow2::pagecache::forget_cached;
use crate::qcow2::write::Writer;
use crate::qcow2::{Disk, ErrorKind, Extent, Format};
use crate::store::journal::Rewrite;
use crate::store::{open_restore_point, RestorePoint};
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

/// How commit and snapshotrebase fold a chain into its FULL.
#[derive(Clone)]
pub struct FoldOptions {
    pub select: crate::store::ChainSelect,
    pub dry_run: bool,
    pub rate_limit: Option<u64>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// What a commit did (or would do).
#[derive(Debug, Default)]
pub struct CommitReport {
    pub full: PathBuf,
    pub folded: Vec<PathBuf>,
    pub relinked: Option<PathBuf>,
    /// Guest bytes written into the FULL.
    pub bytes: u64,
    /// Nothing was changed: what would be done.
    pub dry_run: bool,
}

impl CommitReport {
    /// The report of `qmprestore commit`.
    pub fn human(&self) -> String {
        let (fold, link, bytes) = if self.dry_run {
            ("would fold", "would link", "to write")
        } else {
            ("folded", "linked", "written")
        };
        let full = self.full.display();
        let mut s = String::new();
        for f in &self.folded {
            s += &format!("{fold} {} into {full}\n", f.display());
        }
        if let Some(n) = &self.relinked {
            s += &format!("{link} {} to {full}\n", n.display());
        }
        s + &format!("{} bytes {bytes}\n", self.bytes)
    }
}

pub fn commit(dir: &Path, opts: &FoldOptions) -> Result<CommitReport> {
    crate::store::bucket::refuse_in_place(dir, "commit")?;
    let RestorePoint {
        folder,
        chain,
        disk,
    } = open_restore_point(dir, &opts.select)?;
    let full_chain = folder.chain()?;
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
        dry_run: opts.dry_run,
    };
    if folded.is_empty() {
        return Ok(report);
    }
    let full_image = disk.chain().last().expect("chain has a FULL");
    if full_image.format() != Format::Qcow2 {
        return Err(ChainError::Refused(format!(
            "{} is raw: commit needs a qcow2 FULL (use merge instead)",
            full.display()
        )));
    }
    refuse_shrunk(&disk)?;
    report.relinked = match &next {
        Some(n) if is_linked(n)? => Some(n.clone()),
        _ => None,
    };
    let ranges = newer_than_full(&disk)?;
    report.bytes = ranges.iter().map(|e| e.length).sum();
    if opts.dry_run {
        return Ok(report);
    }
    let stamp = mtime(folded.last().expect("not empty"))?;
    let rw = Rewrite::begin(&full).map_err(|e| ErrorKind::Io(e).at(&full))?;
    let size = disk.size();
    let mut w = Writer::open(&full)?;
    // A disk that grew between backups: the FULL grows first (a re-run finds it grown).
    w.grow(size)?;
    drop(disk);
    let throttle = Throttle::new(opts.rate_limit);
    let bar = super::progress::bytes(report.bytes, "commit", opts.progress);
    // What of each INC survives (is not superseded by a newer one) goes into the FULL, oldest
    // INC first; once that is durable the INC is no longer needed: its successor, if linked, is
    // pointed at the FULL, and it is deleted while the next one is folded. An interruption
    // leaves the newest INCs and a FULL holding everything older: re-running converges.
    delete_behind(|deleter| {
        let release = |i: usize| -> Result<bool> {
            if let Some(succ) = folded.get(i + 1).or(next.as_ref()) {
                relink(succ, &full)?;
            }
            Ok(deleter.send(folded[i].clone()).is_ok())
        };
        let last = folded.len() - 1;
        for (i, f) in folded.iter().enumerate() {
            // Layers count from the top: the newest INC is 0.
            let depth = (last - i) as u32;
            let own: Vec<Extent> = ranges
                .iter()
                .filter(|e| e.depth == depth)
                .map(|e| Extent { depth: 0, ..*e })
                .collect();
            fold(&Disk::open_alone(f)?, &own, &mut w, &throttle, &bar)?;
            if i < last {
                w.flush()?;
                if !release(i)? {
                    return Ok(());
                }
            }
        }
        w.finish()?;
        rw.finish(Some(stamp), |m| m.virtual_size = size)
            .map_err(|e| ErrorKind::Io(e).at(&full))?;
        release(last)?;
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(report)
}

/// Runs `work` with a channel of folded backup files to delete: a thread of its own deletes
/// them in the order sent, each durably (directory synced) before the next, so an
/// interruption leaves only the newest, whatever the file system. Deleting is slow where the
/// file system discards the freed blocks (~30 ms per 128 MiB here) and overlaps with the
/// folding that goes on meanwhile. A failed send means the deletion failed: `work` should
/// stop; the deletion's error is returned after `work`'s own.
pub fn delete_behind<T>(work: impl FnOnce(&Sender<PathBuf>) -> Result<T>) -> Result<T> {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<PathBuf>();
        let deleter = s.spawn(move || -> Result<()> {
            for f in rx {
                remove_backup(&f)?;
            }
            Ok(())
        });
        let done = work(&tx);
        drop(tx);
        let deleted = deleter.join().expect("the deleter does not panic");
        let value = done?;
        deleted?;
        Ok(value)
    })
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
/// ranges as zero clusters. The INCs are deleted after a fold, so what is copied out of them
/// leaves the page cache step by step ([`forget_cached`]), and the FULL is written back while
/// the copy goes on ([`Writer::write_behind`]): memory use stays flat, and the flush before the
/// deletions finds little left (commit of 4×128 MiB here: 2.0 s of copying and 0.3 s of flush
/// → 0.35 s in all).
pub fn fold(
    disk: &Disk,
    ranges: &[Extent],
    w: &mut Writer,
    throttle: &Throttle,
    bar: &ProgressBar,
) -> Result<()> {
    const STEP: u64 = 4 << 20;
    let mut buf = vec![0u8; STEP as usize];
    for e in ranges {
        if e.zero && !e.data {
            // Metadata only: nothing for `--rate-limit` to pace.
            w.write_zeroes(e.start, e.length)?;
            bar.inc(e.length);
            continue;
        }
        // Uncompressed data stored in a file is copied inside the kernel; anything else
        // (compressed, past the end of its file) goes through `buf`.
        let src = match (e.data, e.offset) {
            (true, Some(host)) => disk.data_file_of(e.depth).map(|f| (f, host)),
            _ => None,
        };
        let mut done = 0;
        while done < e.length {
            let n = STEP.min(e.length - done);
            match src {
                Some((f, host)) => {
                    w.copy_from(f, host + done, e.start + done, n)?;
                    forget_cached(f, host + done, n);
                }
                None => {
                    let b = &mut buf[..n as usize];
                    disk.read_at(b, e.start + done)?;
                    w.write_at(b, e.start + done)?;
                }
            }
            w.write_behind();
            throttle.pace(n);
            bar.inc(n);
            done += n;
        }
    }
    Ok(())
}
