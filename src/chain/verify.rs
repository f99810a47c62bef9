//! `qmprestore verify`: proves that a backup chain restores, for CI jobs and worried admins.
//!
//! Per backup directory: no partial backups, a FULL, strictly increasing epochs, every file
//! opens and passes the consistency check, backing links (where present) name the
//! predecessor, virtual sizes agree (growth is reported as a resize), the chain id agrees with
//! the source's bitmap names where the `.config` tells them, and every stored cluster of every
//! file is read (compressed ones decompressed), so bit rot anywhere is found. Where qmpbackup
//! wrote a manifest, the file must match it: per-extent checksums, level, time, chain id,
//! predecessor and size. Damaged bytes are reported as what they held: the guest byte ranges
//! or the metadata, and the restore points they affect (`damage`). Files are verified in
//! parallel.

use super::damage::{self, Finding, Kind};
use super::error::Result;
use crate::qcow2::{check, Disk, OpenOptions};
use crate::store::folder::read_small;
use crate::store::folder::{BackupDir, BackupFile};
use crate::store::manifest::{self, Manifest, Mismatch};
use crate::store::place;
use crate::store::Level;
use rayon::prelude::*;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Default, Serialize)]
pub struct Problem {
    pub file: String,
    pub problem: String,
    /// Byte offset in the file, where the problem has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// For damaged bytes: what they held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    /// For damaged data: the guest bytes it held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_start: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_length: Option<u64>,
    /// For damaged metadata: the structures it held.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub holds: Vec<&'static str>,
    /// For damaged bytes: the restore points (backup file names) that read them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affected_restore_points: Option<Vec<String>>,
}

impl Problem {
    fn new(file: &str, problem: String) -> Problem {
        Problem {
            file: file.to_string(),
            problem,
            ..Default::default()
        }
    }

    /// The problem of `finding` in `file`, which affects `points`.
    fn damage(file: &str, f: Finding, points: Vec<String>) -> Problem {
        let what = match f.kind {
            Kind::Data if f.snapshot.is_some() => "damaged data of an internal snapshot",
            Kind::Data => "damaged guest data",
            Kind::Metadata => "damaged metadata",
            Kind::Unused => "damaged bytes that nothing uses",
        };
        Problem {
            file: file.to_string(),
            problem: format!("{what}: {}", f.problem),
            offset: Some(f.start),
            kind: Some(f.kind),
            guest_start: f.guest.map(|g| g.0),
            guest_length: f.guest.map(|g| g.1 - g.0),
            holds: f.holds,
            affected_restore_points: Some(points),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct DirReport {
    pub dir: String,
    pub restorable: bool,
    pub files: Vec<String>,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
    /// Facts worth knowing that do not prevent a restore (resizes, leaked clusters, older
    /// chains).
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub restorable: bool,
    pub dirs: Vec<DirReport>,
}

impl Report {
    /// The readable report: a verdict per directory, then its problems and notes.
    pub fn human(&self) -> String {
        let mut s = String::new();
        for d in &self.dirs {
            let verdict = if d.restorable {
                "restorable"
            } else {
                "NOT restorable"
            };
            s += &format!(
                "{}: {verdict} ({} files, {} bytes read)\n",
                d.dir,
                d.files.len(),
                d.bytes_read
            );
            for p in &d.problems {
                let at = p
                    .offset
                    .filter(|_| p.kind.is_none())
                    .map(|o| format!(" (offset {o})"))
                    .unwrap_or_default();
                s += &format!("  problem: {}: {}{at}\n", p.file, p.problem);
                if let (Some(start), Some(len)) = (p.guest_start, p.guest_length) {
                    s += &format!("    guest bytes {start}..{} ({len} bytes)\n", start + len);
                }
                if !p.holds.is_empty() {
                    s += &format!("    holding: {}\n", p.holds.join(", "));
                }
                match p.affected_restore_points.as_deref() {
                    Some([]) => s += "    affected restore points: none\n",
                    Some(points) => {
                        s += &format!("    affected restore points: {}\n", points.join(", "))
                    }
                    None => {}
                }
            }
            for n in &d.notes {
                s += &format!("  note: {n}\n");
            }
        }
        s
    }
}

/// Verifies `dir`, or with `recursive` every backup directory below it.
pub fn verify(dir: &Path, recursive: bool, filter: Option<&str>) -> Result<Report> {
    let io = |e| crate::store::StoreError::Io(dir.to_path_buf(), e);
    crate::store::place::at(dir)
        .and_then(|p| p.list(""))
        .map_err(io)?;
    let dirs = if recursive {
        crate::store::folder::backup_dirs_below(dir, 8)?
    } else {
        vec![dir.to_path_buf()]
    };
    if dirs.is_empty() {
        return Err(super::error::ChainError::Refused(format!(
            "no backup directories below {}",
            dir.display()
        )));
    }
    let remote = crate::s3::url::is_s3(dir);
    let reports: Vec<DirReport> = super::workers::run(remote, || {
        dirs.iter().map(|d| verify_dir(d, filter)).collect()
    });
    Ok(Report {
        restorable: reports.iter().all(|r| r.restorable),
        dirs: reports,
    })
}

fn verify_dir(dir: &Path, filter: Option<&str>) -> DirReport {
    let dir_name = dir.display().to_string();
    let mut r = DirReport {
        dir: dir_name.clone(),
        restorable: false,
        files: Vec::new(),
        bytes_read: 0,
        problems: Vec::new(),
        notes: Vec::new(),
    };
    let problem = |r: &mut DirReport, file: &str, p: String| r.problems.push(Problem::new(file, p));
    let bd = match BackupDir::scan(dir, filter) {
        Ok(b) => b,
        Err(e) => {
            problem(&mut r, &dir_name, e.to_string());
            return r;
        }
    };
    for p in &bd.partials {
        problem(
            &mut r,
            &p.path.display().to_string(),
            "partial backup: a backup was interrupted or failed".into(),
        );
    }
    let chain = match bd.chain() {
        Ok(c) => c,
        Err(e) => {
            problem(&mut r, &dir_name, e.to_string());
            return r;
        }
    };
    for f in &chain.older_fulls {
        r.notes
            .push(format!("{} starts an older chain (not restored)", f.name));
    }
    r.files = chain.files.iter().map(|f| f.name.clone()).collect();
    for w in chain.files.windows(2) {
        if w[1].epoch <= w[0].epoch {
            problem(
                &mut r,
                &w[1].name,
                format!(
                    "its epoch {} does not follow {} of {}",
                    w[1].epoch, w[0].epoch, w[0].name
                ),
            );
        }
    }
    // Per file, in parallel: structure, consistency, every stored byte.
    let results: Vec<FileResult> = chain.files.par_iter().map(verify_file).collect();
    let files = damage::Chain::new(chain.files.iter().map(|f| f.path.as_path()).collect());
    let mut prev: Option<(u64, String)> = None;
    let pending = crate::store::journal::all_pending(&*bd.place);
    for (i, (f, res)) in chain.files.iter().zip(results).enumerate() {
        for finding in res.damage {
            let points = files.affected(i, &finding);
            r.problems.push(Problem::damage(&f.name, finding, points));
        }
        let parent = i.checked_sub(1).map(|p| &chain.files[p]);
        if let Some(m) = &res.manifest {
            check_manifest(f, m, parent, bd.uuid.as_deref(), &mut r);
        }
        r.bytes_read += res.bytes;
        for p in res.problems {
            problem(&mut r, &f.name, p);
        }
        r.notes
            .extend(res.notes.into_iter().map(|n| format!("{}: {n}", f.name)));
        if pending.contains(&f.name) {
            r.notes.push(format!(
                "{}: an interrupted in-place change (commit, prune, ...) holds its manifest in {}/: run that command again to complete it",
                f.name,
                crate::store::journal::FOLDER
            ));
        }
        if let Some((size, backing)) = res.shape {
            if let (Some((_, pname)), Some(b)) = (&prev, &backing) {
                let earlier = chain.files[..i].iter().any(|e| e.name == *b);
                if b != pname && earlier {
                    // What an interrupted commit or snapshotrebase leaves: the next INC was
                    // relinked to the FULL that already holds its predecessor's data, which is
                    // deleted next. Restores stack the directory's files in order.
                    r.notes.push(format!(
                        "{}: backing file is {b}, not its predecessor {pname} (an interrupted commit or snapshotrebase)",
                        f.name
                    ));
                } else if b != pname {
                    problem(
                        &mut r,
                        &f.name,
                        format!("backing file is {b}, but its predecessor is {pname}"),
                    );
                }
            }
            if let Some((psize, _)) = &prev {
                if size > *psize {
                    r.notes.push(format!(
                        "{}: disk resized from {psize} to {size} bytes",
                        f.name
                    ));
                } else if size < *psize {
                    problem(
                        &mut r,
                        &f.name,
                        format!("virtual size {size} is smaller than its predecessor's {psize}"),
                    );
                }
            }
            prev = Some((size, f.name.clone()));
        }
    }
    check_uuid(&bd, &mut r);
    r.restorable = r.problems.is_empty();
    r
}

/// A file's manifest and what comparing the file with its checksums found.
struct ManifestCheck {
    manifest: Result<Manifest, String>,
    /// Each range that differs, or why the file could not be compared.
    found: Result<Vec<Mismatch>, String>,
}

impl ManifestCheck {
    /// Reads `file`'s manifest (when qmpbackup wrote one) and compares the file's checksums.
    fn of(file: &Path) -> Option<ManifestCheck> {
        let (place, name) = place::of_file(file).ok()?;
        if !manifest::exists(&*place, &name) {
            return None;
        }
        let manifest = Manifest::read(&*place, &name);
        let found = match &manifest {
            Ok(m) => place
                .open(&name)
                .and_then(|data| m.check(&*data))
                .map_err(|e| format!("reading for the manifest check: {e}"))
                .and_then(|checked| checked),
            Err(_) => Ok(Vec::new()),
        };
        Some(ManifestCheck { manifest, found })
    }

    /// Every byte of the file was read and matches what the backup wrote.
    fn matches(&self) -> bool {
        self.manifest.is_ok() && self.found.as_ref().is_ok_and(|f| f.is_empty())
    }
}

/// Reports what the manifest check of `f` found, and compares the facts the manifest records
/// with what the directory says.
fn check_manifest(
    f: &BackupFile,
    mc: &ManifestCheck,
    parent: Option<&BackupFile>,
    uuid: Option<&str>,
    r: &mut DirReport,
) {
    let mut notes = Vec::new();
    let mut push = |problem: String| r.problems.push(Problem::new(&f.name, problem));
    let m = match &mc.manifest {
        Ok(m) => m,
        Err(e) => return push(e.clone()),
    };
    if m.file != f.name {
        push(format!("its manifest describes {}", m.file));
    }
    if m.level != f.level || (f.named_epoch && m.epoch != f.epoch) {
        push(format!(
            "manifest says {} at {}, the name says {} at {}",
            m.level.name(),
            m.epoch,
            f.level.name(),
            f.epoch
        ));
    }
    if let (Some(mu), Some(u)) = (&m.uuid, uuid) {
        if mu != u {
            push(format!("manifest chain id {mu}, directory chain id {u}"));
        }
    }
    if let (Some(mp), Some(p)) = (&m.parent, parent) {
        // commit and snapshotrebase fold the predecessors into the FULL, delete them, and drop
        // the FULL's manifest (it changed in place): what follows then builds on the FULL.
        let gone = |name: &str| {
            place::of_file(&p.path).is_ok_and(|(place, _)| {
                matches!(place.open(name), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
            })
        };
        let folded = p.level == Level::Full && gone(mp) && gone(&manifest::name_for(&p.name));
        if folded {
            notes.push(format!(
                "{}: predecessor {mp} was folded into {}",
                f.name, p.name
            ));
        } else if *mp != p.name {
            push(format!(
                "manifest names {mp} as predecessor, the chain has {}",
                p.name
            ));
        }
    }
    // Damage is reported with what it affects (verify_dir); here only a failed comparison.
    if let Err(e) = &mc.found {
        push(e.clone());
    }
    r.notes.extend(notes);
}

/// What verifying one backup file found.
struct FileResult {
    bytes: u64,
    problems: Vec<String>,
    notes: Vec<String>,
    /// Virtual size and backing file name, when the file opened.
    shape: Option<(u64, Option<String>)>,
    manifest: Option<ManifestCheck>,
    /// What the bytes that differ from the manifest held.
    damage: Vec<Finding>,
}

/// Opens and checks one backup file and reads every stored byte: through its manifest's
/// checksums when it has one (a file that matches needs no second read: each byte is what the
/// backup wrote), else cluster by cluster, decompressing.
fn verify_file(f: &BackupFile) -> FileResult {
    let path = f.path.as_path();
    let mut res = FileResult {
        bytes: 0,
        problems: Vec::new(),
        notes: Vec::new(),
        shape: None,
        manifest: ManifestCheck::of(path),
        damage: Vec::new(),
    };
    let opts = OpenOptions {
        no_backing: true,
        ..Default::default()
    };
    let mismatches = match res.manifest.as_ref().map(|m| &m.found) {
        Some(Ok(found)) => found.clone(),
        _ => Vec::new(),
    };
    let disk = match Disk::open_with(path, &opts) {
        Ok(d) => d,
        Err(e) => {
            res.problems.push(e.to_string());
            res.damage = damage::findings(path, None, &mismatches);
            return res;
        }
    };
    if disk.qcow2().is_some() {
        match check::check(path) {
            Ok(c) => {
                let dirty = disk.qcow2().is_some_and(|q| q.header().dirty());
                if dirty && c.corruptions == c.refcount_corruptions {
                    // An interrupted write or snapshot operation under the dirty bit: the
                    // mapping is intact, and the next writable open (ours or QEMU's)
                    // rebuilds the refcounts.
                    res.notes.push(format!(
                        "dirty bit set (an interrupted write): {} refcount inconsistencies, repaired on the next writable open",
                        c.corruptions + c.leaks
                    ));
                } else if c.corruptions > 0 {
                    let first: Vec<&str> = c.messages.iter().take(3).map(String::as_str).collect();
                    res.problems.push(format!(
                        "{} corruptions ({})",
                        c.corruptions,
                        first.join("; ")
                    ));
                }
                if c.check_errors > 0 {
                    // The check missed part of the image: it cannot vouch for it.
                    res.problems.push(format!(
                        "{} structures could not be read, so the check is incomplete",
                        c.check_errors
                    ));
                }
                if c.leaks > 0 {
                    res.notes.push(format!(
                        "{} leaked clusters (harmless; check --repair leaks frees them)",
                        c.leaks
                    ));
                }
            }
            Err(e) => res.problems.push(e.to_string()),
        }
    }
    // An encrypted file's manifest covers its ciphertext, so it is verified without the key;
    // with the key, every cluster is also read and decrypted (the key opens it, every
    // cluster can be read and decompressed).
    let encryption = disk.qcow2().and_then(|q| q.encryption());
    let locked = encryption.is_some_and(|e| !e.unlocked());
    let read = |res: &mut FileResult| match disk.read_stored(u64::MAX) {
        Ok(b) => res.bytes = b,
        Err(e) => res.problems.push(e.to_string()),
    };
    match &res.manifest {
        Some(m) if m.matches() => {
            res.bytes = m.manifest.as_ref().map_or(0, |m| m.sums.file_size);
            if encryption.is_some() && !locked {
                read(&mut res);
            }
        }
        _ if locked => res.notes.push(
            "encrypted, no key given: structure checked, data not decrypted (--key-file reads it all)".into(),
        ),
        _ => read(&mut res),
    }
    res.damage = damage::findings(path, Some(&disk), &mismatches);
    let backing = disk
        .qcow2()
        .and_then(|q| q.backing_name())
        .map(|n| n.to_string_lossy().into_owned());
    res.shape = Some((disk.size(), backing));
    res
}

/// The `uuid` file names the chain; the source disk's bitmaps (from `<disk>.config`, the
/// qemu-img info the backup saved) must include `qmpbackup-<uuid>` when they name any.
fn check_uuid(bd: &BackupDir, r: &mut DirReport) {
    let Some(uuid) = &bd.uuid else { return };
    let Some(disk) = bd.files.first().map(|f| f.disk.clone()) else {
        return;
    };
    let config = [format!("{disk}.config"), format!("../{disk}.config")];
    let Some(text) = config
        .iter()
        .find_map(|n| read_small(&*bd.place, n, 16 << 20))
    else {
        return;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        r.notes.push(format!("{disk}.config is not valid JSON"));
        return;
    };
    let names: Vec<&str> = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b["name"].as_str()).collect())
        .unwrap_or_default();
    let ours: Vec<&&str> = names
        .iter()
        .filter(|n| n.starts_with("qmpbackup-"))
        .collect();
    // Older versions of the original named the bitmap qmpbackup-<device>-<uuid>.
    if !ours.is_empty() && !ours.iter().any(|n| n.ends_with(uuid.as_str())) {
        r.problems.push(Problem::new(
            "uuid",
            format!(
                "chain id {uuid} matches none of the source's backup bitmaps ({})",
                ours.iter().map(|s| **s).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
}
