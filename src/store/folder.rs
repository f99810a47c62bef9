//! A backup directory as qmpbackup (the original and ours) lays it out.
//!
//! ```text
//! <target>/[YYYY-MM/]uuid, <disk>.config
//! <target>/[YYYY-MM/]<disk>/FULL-<epoch>-<disk>, INC-<epoch>-<disk>, COPY-<epoch>-<disk>
//! ```
//! plus `.partial` files of running or failed backups, flat directories holding several disks
//! (`--no-subdir`), and names without timestamp (`--no-timestamp`, maybe with a
//! `FULL-<name>` symlink). This module turns all of that into one model: the backup files of
//! one disk, ordered by the epoch in their names (the file's mtime only breaks ties or stands
//! in where a name has no epoch), and the restore chain: the latest FULL and the INCs after
//! it. Everything else the restore commands do works on that model, so the layout quirks live
//! here only.

use super::error::StoreError;
use super::name::{parse_name, strip_partial, Level};
use super::place::{Folder, Kind, Place};
use super::time::parse_time;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One backup file.
#[derive(Debug, Clone)]
pub struct BackupFile {
    pub path: PathBuf,
    pub name: String,
    pub level: Level,
    /// Seconds since the epoch: from the name, else the file's mtime.
    pub epoch: u64,
    /// Whether the epoch came from the name.
    pub named_epoch: bool,
    /// The disk the file belongs to (the name after `LEVEL-<epoch>-`).
    pub disk: String,
    pub size: u64,
    mtime: u64,
    /// Uploaded and removed here (`qmpbackup --push-only`): only its manifest is left.
    pub pushed: Option<Pushed>,
}

/// What the manifest of a file uploaded and removed says of it: what a next incremental
/// backup needs to know of its predecessor.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub virtual_size: u64,
    pub format: String,
}

fn layout(dir: &Path, problem: impl Into<String>) -> StoreError {
    StoreError::Layout {
        dir: dir.to_path_buf(),
        problem: problem.into(),
    }
}

/// The files of a backup directory, for one disk.
pub struct BackupDir {
    pub dir: PathBuf,
    /// Where the files are.
    pub place: Arc<dyn Place>,
    /// Backup files in backup order.
    pub files: Vec<BackupFile>,
    /// Interrupted or failed backups (`*.partial`), of any disk: `--filter` does not hide them.
    pub partials: Vec<Partial>,
    /// The chain id, from `uuid` here or one level up.
    pub uuid: Option<String>,
}

/// An interrupted or failed backup's file (`*.partial`).
#[derive(Debug, Clone)]
pub struct Partial {
    pub path: PathBuf,
    /// Bytes stored, from the folder's listing.
    pub size: u64,
}

impl std::fmt::Debug for BackupDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupDir")
            .field("dir", &self.dir)
            .field("files", &self.files)
            .field("partials", &self.partials)
            .field("uuid", &self.uuid)
            .finish()
    }
}

/// The files a restore uses: the latest FULL and the INCs after it, in order.
#[derive(Debug, Clone)]
pub struct Chain {
    pub files: Vec<BackupFile>,
    /// FULL backups before the one the chain starts with (not restored).
    pub older_fulls: Vec<BackupFile>,
}

/// Files that live in backup directories but are not backups.
fn is_side_file(name: &str) -> bool {
    name == "uuid"
        || name == "image"
        || name.ends_with(".config")
        || name.ends_with(".manifest.json")
        || name.contains(".fleece.")
        || name.starts_with('.')
}

/// Where partial files of interrupted runs are set aside, in a disk's folder.
pub const QUARANTINE: &str = ".quarantine";

/// Moves an interrupted run's partial file `name` out of the chain (into [`QUARANTINE`]),
/// durably, keeping it for inspection; returns where it went.
pub fn quarantine(place: &dyn Place, name: &str) -> std::io::Result<PathBuf> {
    let to = format!("{QUARANTINE}/{name}");
    place.rename(name, &to)?;
    place.sync(&to)?;
    Ok(place.locate(&to))
}

/// Names and mtimes of the partial files set aside in `place`.
pub fn quarantined(place: &dyn Place) -> std::io::Result<Vec<(String, u64)>> {
    Ok(place
        .list(QUARANTINE)?
        .into_iter()
        .map(|e| (e.name, e.mtime))
        .collect())
}

/// The newest epoch named by any file in `places` (backups, partials, quarantined partials,
/// manifests of files pushed away), so a run can take a later one: two runs within one second
/// must not share a name.
pub fn newest_epoch(places: &[&dyn Place]) -> u64 {
    let mut newest = 0;
    for place in places {
        for sub in ["", QUARANTINE, super::manifest::FOLDER] {
            for e in place.list(sub).unwrap_or_default() {
                let name = e.name.strip_suffix(".json").unwrap_or(&e.name);
                let name = strip_partial(name).unwrap_or(name);
                if let Some((_, epoch, _)) = parse_name(name) {
                    newest = newest.max(epoch);
                }
            }
        }
    }
    newest
}

/// The backup directories at or below `dir` (folders holding backup file names), at most
/// `max_depth` levels down, sorted. Dot-directories hold side files (manifests, quarantined
/// partials), not backups, and are skipped.
pub fn backup_dirs_below(dir: &Path, max_depth: usize) -> Result<Vec<PathBuf>, StoreError> {
    let mut found = Vec::new();
    let mut todo = vec![(dir.to_path_buf(), 0)];
    while let Some((dir, depth)) = todo.pop() {
        let io = |e| StoreError::Io(dir.clone(), e);
        let place = super::place::at(&dir).map_err(io)?;
        let mut has_backups = false;
        for entry in place.list("").map_err(io)? {
            let name = &entry.name;
            match entry.kind {
                Kind::Folder if depth < max_depth && !name.starts_with('.') => {
                    todo.push((place.locate(name), depth + 1))
                }
                Kind::File => {
                    has_backups |= parse_name(strip_partial(name).unwrap_or(name)).is_some()
                }
                _ => {}
            }
        }
        if has_backups {
            found.push(dir.clone());
        }
    }
    found.sort();
    Ok(found)
}

/// A text file of `place` of at most `limit` bytes (a larger one is not the file meant), if
/// it can be read.
pub fn read_small(place: &dyn Place, name: &str, limit: u64) -> Option<String> {
    let data = place.open(name).ok()?;
    let size = data.size().ok()?;
    if size > limit {
        return None;
    }
    let mut buf = vec![0u8; size as usize];
    let n = data.read_at(&mut buf, 0).ok()?;
    String::from_utf8(buf[..n].to_vec()).ok()
}

impl BackupDir {
    /// Reads `dir`. With `filter`, only files whose name contains it are considered (to pick
    /// one disk in a flat directory, as the original's `--filter`).
    pub fn scan(dir: &Path, filter: Option<&str>) -> Result<BackupDir, StoreError> {
        let place = super::place::at(dir).map_err(|e| StoreError::Io(dir.to_path_buf(), e))?;
        Self::scan_place(place, filter)
    }

    /// [`BackupDir::scan`] of any place that holds backup files.
    pub fn scan_place(
        place: Arc<dyn Place>,
        filter: Option<&str>,
    ) -> Result<BackupDir, StoreError> {
        Self::scan_matching(place, &|name| filter.is_none_or(|f| name.contains(f)))
    }

    /// Reads the files of the disk named `disk` (the part after `LEVEL-<epoch>-`) in `dir`,
    /// which may hold other disks too (a flat directory).
    pub fn scan_disk(dir: &Path, disk: &str) -> Result<BackupDir, StoreError> {
        Self::scan_matching(Arc::new(Folder::new(dir)), &|name| {
            let name = strip_partial(name).unwrap_or(name);
            match parse_name(name) {
                Some((_, _, d)) => d == disk,
                // A --no-timestamp file, or its `FULL-<disk>` / `COPY-<disk>` alias.
                None => name == disk || name.split_once('-').is_some_and(|(_, d)| d == disk),
            }
        })
    }

    fn scan_matching(
        place: Arc<dyn Place>,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Result<BackupDir, StoreError> {
        let dir = &place.locate("");
        let entries = place
            .list("")
            .map_err(|e| StoreError::Io(dir.to_path_buf(), e))?;
        let mut files = Vec::new();
        let mut partials = Vec::new();
        let mut aliases = Vec::new();
        for entry in entries {
            let name = entry.name;
            if is_side_file(&name) {
                continue;
            }
            let path = place.locate(&name);
            // Every partial file counts, whatever disk it names (as in the original): a
            // folder with an interrupted backup in it is not to be trusted blindly.
            if strip_partial(&name).is_some() && entry.kind != Kind::Folder {
                partials.push(Partial {
                    path,
                    size: entry.size,
                });
                continue;
            }
            if !wanted(&name) {
                continue;
            }
            let mtime = entry.mtime;
            match entry.kind {
                Kind::Link(target) => {
                    if parse_name(&name).is_some() {
                        // Neither tool makes a timestamped backup a link: one that is may
                        // lead anywhere on the host.
                        return Err(layout(
                            dir,
                            format!(
                                "{name} is a symbolic link (to {}): backup files must be regular files in the backup directory",
                                target.display()
                            ),
                        ));
                    }
                    // `FULL-<name>` -> `<name>` made by --no-timestamp: an alias, not a backup.
                    aliases.push((name, target));
                    continue;
                }
                Kind::File => {}
                Kind::Folder | Kind::Other => continue,
            }
            let (level, epoch, disk, named_epoch) = match parse_name(&name) {
                Some((l, e, d)) => (l, e, d, true),
                // A name without timestamp (--no-timestamp): only full and copy backups are
                // written that way; treated as a FULL taken at its mtime.
                None => (Level::Full, mtime, name.clone(), false),
            };
            files.push(BackupFile {
                path,
                name,
                level,
                epoch,
                named_epoch,
                disk,
                size: entry.size,
                mtime,
                pushed: None,
            });
        }
        // A manifest whose file is gone: the file was uploaded and removed (--push-only).
        // Commands that delete backup files drop their manifests first, so nothing else
        // leaves one behind.
        for e in place.list(super::manifest::FOLDER).unwrap_or_default() {
            let Some(name) = e.name.strip_suffix(".json") else {
                continue;
            };
            let Some((level, epoch, disk)) = parse_name(name) else {
                continue;
            };
            if !wanted(name) || files.iter().any(|f| f.name == name) {
                continue;
            }
            let Ok(m) = super::manifest::Manifest::read(&*place, name) else {
                continue;
            };
            files.push(BackupFile {
                path: place.locate(name),
                name: name.to_string(),
                level,
                epoch,
                named_epoch: true,
                disk,
                size: m.sums.file_size,
                mtime: epoch,
                pushed: Some(Pushed {
                    virtual_size: m.virtual_size,
                    format: m.format,
                }),
            });
        }
        // A symlink names the level of a timestamp-less file.
        for (alias, target) in aliases {
            let target = target.file_name().map(|t| t.to_string_lossy().into_owned());
            if let (Some(level), Some(t)) = (Level::of_alias(&alias), target) {
                if let Some(f) = files.iter_mut().find(|f| f.name == t && !f.named_epoch) {
                    f.level = level;
                }
            }
        }
        // At one epoch a FULL comes last: only a prune makes a FULL share its epoch with an
        // INC (the FULL then holds that INC's point), and while both exist the FULL must start
        // the chain.
        let key = |f: &BackupFile| (f.epoch, f.level == Level::Full, f.mtime);
        files.sort_by(|a, b| (key(a), &a.name).cmp(&(key(b), &b.name)));
        partials.sort_by(|a, b| a.path.cmp(&b.path));
        let mut disks: Vec<&str> = files.iter().map(|f| f.disk.as_str()).collect();
        disks.sort_unstable();
        disks.dedup();
        if disks.len() > 1 {
            return Err(layout(
                dir,
                format!(
                    "backups of several disks ({}): choose one with --filter",
                    disks.join(", ")
                ),
            ));
        }
        // The chain id, beside the backups (flat layout) or one level up (a disk's folder).
        let uuid = ["uuid", "../uuid"]
            .iter()
            .find_map(|n| read_small(&*place, n, 4096))
            .map(|s| s.trim().to_string());
        Ok(BackupDir {
            dir: dir.to_path_buf(),
            place,
            files,
            partials,
            uuid,
        })
    }

    /// The restore chain: the latest FULL and every INC after it.
    pub fn chain(&self) -> Result<Chain, StoreError> {
        let start = self
            .files
            .iter()
            .rposition(|f| f.level == Level::Full)
            .ok_or_else(|| layout(&self.dir, "no FULL backup found"))?;
        let older_fulls = self.files[..start]
            .iter()
            .filter(|f| f.level == Level::Full)
            .cloned()
            .collect();
        let files = std::iter::once(self.files[start].clone())
            .chain(
                self.files[start + 1..]
                    .iter()
                    .filter(|f| f.level == Level::Inc)
                    .cloned(),
            )
            .collect();
        Ok(Chain { files, older_fulls })
    }

    /// Refuses partial backups: a chain containing one cannot be trusted to be complete.
    pub fn refuse_partials(&self) -> Result<(), StoreError> {
        match self.partials.first() {
            None => Ok(()),
            Some(p) => Err(layout(
                &self.dir,
                format!(
                    "partial backup {} found: a backup was interrupted; remove or finish it first",
                    p.path.display()
                ),
            )),
        }
    }
}

impl Chain {
    /// The chain up to the restore point `until` names: an exact file name, a name prefix
    /// (`INC-1700000600`), or a time (epoch seconds or ISO 8601, local time unless it carries
    /// `Z` or an offset): the latest restore point at or before it.
    pub fn until(&self, spec: &str, dir: &Path) -> Result<Chain, StoreError> {
        let n = self.files.len();
        let idx = if let Some(i) = self.files.iter().position(|f| f.name == spec) {
            i
        } else if let Some(t) = parse_time(spec) {
            self.files
                .iter()
                .rposition(|f| f.epoch <= t)
                .ok_or_else(|| layout(dir, format!("no restore point at or before {spec}")))?
        } else {
            let matches: Vec<usize> = (0..n)
                .filter(|&i| self.files[i].name.starts_with(spec))
                .collect();
            match matches[..] {
                [i] => i,
                [] => return Err(layout(dir, format!("no restore point matches '{spec}'"))),
                _ => {
                    return Err(layout(
                        dir,
                        format!("'{spec}' matches several restore points"),
                    ))
                }
            }
        };
        Ok(Chain {
            files: self.files[..=idx].to_vec(),
            older_fulls: self.older_fulls.clone(),
        })
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_and_quarantine() {
        let (t, d) = super::super::place::tests::scratch();
        for name in ["FULL-100-a", "INC-250-a.partial"] {
            d.write(name, b"").unwrap();
        }
        assert_eq!(newest_epoch(&[&d]), 250);
        let to = quarantine(&d, "INC-250-a.partial").unwrap();
        assert_eq!(to, t.path().join(".quarantine/INC-250-a.partial"));
        assert_eq!(newest_epoch(&[&d]), 250);
        assert_eq!(quarantined(&d).unwrap()[0].0, "INC-250-a.partial");
    }
}
