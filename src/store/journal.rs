//! Backup files changed in place with their manifests kept exact.
//!
//! `commit`, `snapshotrebase`, `prune` and the re-linking of an INC change backup files in
//! place. Deleting the manifest first (as they once did) made `verify` lose its checksums
//! for exactly the files that matter most; re-reading the whole file afterwards would cost a
//! pass over a FULL of any size and would bless damage that was already there. Instead a
//! [`Rewrite`] keeps the old manifest in a journal and learns of every write before it is
//! made (through [`crate::qcow2::fault::watch`], so data, L2 tables, refcounts and header
//! alike): an extent's old checksum is proven against the file before its first write (a
//! damaged FULL stops the change instead of being folded into), its index is appended to the
//! journal durably, and only then is it written. At the end only the touched extents and what
//! the file grew by are read again (the bytes just written, from the page cache); every other
//! extent keeps its recorded checksum, so damage there stays visible.
//!
//! A crash leaves the journal (in the dot-folder [`FOLDER`], which the original restore tool
//! does not take for a backup); the same command run again resumes it: extents listed there
//! may hold new bytes and are recomputed, every other one is still as the backup wrote it.

use super::manifest::{self, extent_crc, Checksums, Manifest};
use super::place::{Folder, Place};
use crate::qcow2::fault::{self, Watch};
use rayon::prelude::*;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the journal keeps of the file as it was: its manifest, and its modification time
/// (the original restore tool orders a folder's files by it, so a change must not move it).
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    mtime_secs: u64,
    mtime_nanos: u32,
    manifest: Manifest,
}

/// The journals' sub-folder in a disk's folder.
pub const FOLDER: &str = ".journal";

fn names(file: &str) -> (String, String) {
    (
        format!("{FOLDER}/{file}.json"),
        format!("{FOLDER}/{file}.touched"),
    )
}

/// One backup file being changed in place (see the module documentation).
pub struct Rewrite {
    folder: Folder,
    name: String,
    path: PathBuf,
    /// The file's modification time before the change (from the journal when resumed).
    mtime: SystemTime,
    /// `None` when the file has no usable manifest: there is nothing to keep exact.
    state: Option<Arc<Mutex<State>>>,
    watch: Option<Watch>,
}

struct State {
    path: PathBuf,
    old: Manifest,
    crcs: Vec<u32>,
    touched: BTreeSet<u64>,
    log: File,
    data: File,
    /// Extents journaled ahead of a write that continues a sequential run: doubles while
    /// the run goes on (up to [`AHEAD`]), so a long in-place fold pays a few journal syncs
    /// per run instead of one per write.
    ahead: u64,
}

/// The most extents journaled (and proven) ahead of a sequential write.
const AHEAD: u64 = 32;

impl State {
    /// Proves extent `i` of the old file against its recorded checksum.
    fn prove(&self, i: u64) -> io::Result<()> {
        let (start, end) = self.old.sums.extent(i as usize);
        let got = extent_crc(&self.data, start, end)?;
        let want = self.crcs[i as usize];
        if got != want {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: bytes {start}..{end} no longer match the manifest (crc32 {got:08x}, manifest {want:08x}): the file was damaged before this change, which stopped before writing there (run `qmprestore verify`)",
                    self.path.display()
                ),
            ));
        }
        Ok(())
    }

    /// Before a write of `len` bytes at `offset`: proves and journals the extents of the old
    /// file it is the first to touch.
    fn before_write(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let sums = &self.old.sums;
        if len == 0 || offset >= sums.file_size {
            return Ok(());
        }
        let last = (offset + len).min(sums.file_size) - 1;
        let (first, last) = (offset / sums.extent_size, last / sums.extent_size);
        let mut fresh: Vec<u64> = (first..=last)
            .filter(|i| !self.touched.contains(i))
            .collect();
        let Some(&start) = fresh.first() else {
            return Ok(());
        };
        // An extent proven and journaled but then not written costs a read, nothing else:
        // its checksum is recomputed to the same value.
        self.ahead = if start > 0 && self.touched.contains(&(start - 1)) {
            (self.ahead * 2).clamp(1, AHEAD)
        } else {
            0
        };
        let extents = sums.file_size.div_ceil(sums.extent_size);
        for &i in &fresh {
            self.prove(i)?;
        }
        // Extents ahead are proven too; one that fails ends the look-ahead (only a write that
        // reaches it must fail).
        for i in last + 1..(last + 1 + self.ahead).min(extents) {
            if self.touched.contains(&i) || self.prove(i).is_err() {
                break;
            }
            fresh.push(i);
        }
        let bytes: Vec<u8> = fresh.iter().flat_map(|i| i.to_le_bytes()).collect();
        self.log.write_all(&bytes)?;
        self.log.sync_data()?;
        self.touched.extend(fresh);
        Ok(())
    }
}

impl Rewrite {
    /// Starts (or, after an interruption, resumes) changing backup file `path` in place.
    pub fn begin(path: &Path) -> io::Result<Rewrite> {
        let (folder, name) = Folder::of_file(path);
        let (json, log) = names(&name);
        let mut rw = Rewrite {
            folder,
            name,
            path: path.to_path_buf(),
            mtime: std::fs::metadata(path)?.modified()?,
            state: None,
            watch: None,
        };
        let old = if exists(&rw.folder, &json) {
            let r = read_record(&rw.folder, &json)?;
            rw.mtime = UNIX_EPOCH + Duration::new(r.mtime_secs, r.mtime_nanos);
            let extents = r.manifest.sums.file_size / r.manifest.sums.extent_size.max(1) + 1;
            let touched = read_log(&rw.folder.locate(&log), extents)?;
            Some((r.manifest, touched))
        } else {
            rw.start(&json, &log)?
        };
        let Some((old, touched)) = old else {
            return Ok(rw);
        };
        manifest::forget(&rw.folder, &rw.name)?;
        let crcs = old.sums.crcs().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", rw.folder.locate(&json).display()),
            )
        })?;
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(rw.folder.locate(&log))?;
        // A record a crash cut short goes, so the ones appended now stay aligned.
        let len = log.metadata()?.len();
        log.set_len(len - len % 8)?;
        let state = Arc::new(Mutex::new(State {
            path: rw.path.clone(),
            old,
            crcs,
            touched,
            log,
            data: File::open(path)?,
            ahead: 0,
        }));
        let hook = Arc::clone(&state);
        rw.watch = Some(fault::watch(
            path,
            Box::new(move |off, len| {
                hook.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .before_write(off, len)
            }),
        )?);
        rw.state = Some(state);
        Ok(rw)
    }

    /// A first start: the manifest (if usable) is copied into the journal beside an empty
    /// log of touched extents, both durable before anything changes.
    fn start(&self, json: &str, log: &str) -> io::Result<Option<(Manifest, BTreeSet<u64>)>> {
        let m = match Manifest::read(&self.folder, &self.name) {
            Ok(m) if m.sums.crcs().is_ok() => m,
            Ok(_) | Err(_) => {
                if manifest::exists(&self.folder, &self.name) {
                    tracing::warn!(
                        "{}: the manifest is unusable and goes with this change",
                        self.path.display()
                    );
                }
                manifest::forget(&self.folder, &self.name)?;
                return Ok(None);
            }
        };
        let size = std::fs::metadata(&self.path)?.len();
        if size != m.sums.file_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: the file is {size} bytes, its manifest recorded {}: damaged? (run `qmprestore verify`); nothing changed",
                    self.path.display(),
                    m.sums.file_size
                ),
            ));
        }
        let log_path = self.folder.locate(log);
        let dir = log_path.parent().expect("in the journal folder");
        std::fs::create_dir_all(dir)?;
        crate::qcow2::storage::sync_parent(dir)?;
        File::create(&log_path)?.sync_all()?;
        let since = self
            .mtime
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let record = Record {
            mtime_secs: since.as_secs(),
            mtime_nanos: since.subsec_nanos(),
            manifest: m,
        };
        let bytes = serde_json::to_vec_pretty(&record).map_err(io::Error::other)?;
        self.folder.write(json, &bytes)?;
        Ok(Some((record.manifest, BTreeSet::new())))
    }

    /// Ends the change (every write to the file made and flushed): sets the file's
    /// modification time to `mtime`, or back to what it was, then writes its new manifest
    /// (old facts, `edit`ed, with the checksums of touched and added extents recomputed) and
    /// drops the journal.
    pub fn finish(
        mut self,
        mtime: Option<SystemTime>,
        edit: impl FnOnce(&mut Manifest),
    ) -> io::Result<()> {
        self.watch = None;
        let f = File::options().write(true).open(&self.path)?;
        f.set_modified(mtime.unwrap_or(self.mtime))?;
        f.sync_all()?;
        let Some(state) = self.state.take() else {
            return Ok(());
        };
        let state = Arc::try_unwrap(state)
            .ok()
            .expect("the watch, the only other owner, is gone")
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        let size = state.data.metadata()?.len();
        let extent = state.old.sums.extent_size;
        let old_size = state.old.sums.file_size;
        let mut crcs = state.crcs;
        crcs.resize(size.div_ceil(extent) as usize, 0);
        let grown = if size == old_size {
            crcs.len() as u64
        } else {
            old_size.min(size) / extent
        };
        let redo: Vec<u64> = state
            .touched
            .iter()
            .copied()
            .filter(|&i| i < grown)
            .chain(grown..crcs.len() as u64)
            .collect();
        let sums = Checksums::sized(size, extent);
        let fresh = redo
            .par_iter()
            .map(|&i| {
                let (start, end) = sums.extent(i as usize);
                extent_crc(&state.data, start, end)
            })
            .collect::<io::Result<Vec<u32>>>()?;
        for (i, c) in redo.iter().zip(fresh) {
            crcs[*i as usize] = c;
        }
        let mut m = state.old;
        m.sums = Checksums::new(size, extent, &crcs);
        m.manifest_version = manifest::MANIFEST_VERSION;
        m.tool = format!("qmprestore {}", env!("CARGO_PKG_VERSION"));
        m.file = self.name.clone();
        edit(&mut m);
        m.write(&self.folder)?;
        discard(&self.folder, &self.name)
    }
}

impl Drop for Rewrite {
    /// A change that ends without [`Rewrite::finish`] (an error) and wrote nothing puts the
    /// manifest back, so `verify` keeps proving the file; once something was written the
    /// journal stays for the run that completes the change.
    fn drop(&mut self) {
        self.watch = None;
        let Some(state) = self.state.take() else {
            return;
        };
        let state = state.lock().unwrap_or_else(|p| p.into_inner());
        if state.touched.is_empty() && state.old.write(&self.folder).is_ok() {
            let _ = discard(&self.folder, &self.name);
        }
    }
}

/// Whether `name` exists in `place`.
fn exists(place: &dyn Place, name: &str) -> bool {
    !matches!(place.open(name), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

/// The journal record `name` in `place`.
fn read_record(place: &dyn Place, name: &str) -> io::Result<Record> {
    let path = place.locate(name);
    let bad = |e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: journal of an interrupted change is unreadable: {e}",
                path.display()
            ),
        )
    };
    let size = std::fs::metadata(&path).map_err(|e| bad(&e))?.len();
    if size > manifest::MAX_MANIFEST {
        return Err(bad(&format!("{size} bytes")));
    }
    let bytes = std::fs::read(&path).map_err(|e| bad(&e))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(&e))
}

/// The extents a journal's log lists, at most `extents` of them (a record cut by a crash is
/// ignored: its extent was not written yet).
fn read_log(path: &Path, extents: u64) -> io::Result<BTreeSet<u64>> {
    let fail = |e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: journal of an interrupted change: {e}", path.display()),
        )
    };
    let size = std::fs::metadata(path).map_err(|e| fail(&e))?.len();
    if size / 8 > extents {
        return Err(fail(&format!("{size} bytes for {extents} extents")));
    }
    let bytes = std::fs::read(path).map_err(|e| fail(&e))?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Whether backup file `file` has the journal of an interrupted change.
pub fn pending(place: &dyn Place, file: &str) -> bool {
    exists(place, &names(file).0)
}

/// The backup files of `place` whose change is pending (see [`pending`]), from one listing
/// of the journals' folder (an object store would otherwise answer one request per file).
pub fn all_pending(place: &dyn Place) -> std::collections::HashSet<String> {
    place
        .list(FOLDER)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| e.name.strip_suffix(".json").map(str::to_string))
        .collect()
}

/// Drops the journal of backup file `file`, if any, durably (the file is gone or its new
/// manifest is written).
pub fn discard(place: &dyn Place, file: &str) -> io::Result<()> {
    let (json, log) = names(file);
    for name in [json, log] {
        match place.delete(&name) {
            Ok(()) => place.sync(&name)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
