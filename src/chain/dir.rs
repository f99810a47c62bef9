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

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// The kind of a backup file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Full,
    Inc,
    Copy,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Full => "full",
            Level::Inc => "inc",
            Level::Copy => "copy",
        }
    }
}

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
}

/// A problem with a backup directory that prevents a restore.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{dir}: {problem}")]
    Layout { dir: PathBuf, problem: String },
}

fn layout(dir: &Path, problem: impl Into<String>) -> DirError {
    DirError::Layout {
        dir: dir.to_path_buf(),
        problem: problem.into(),
    }
}

/// The files of a backup directory, for one disk.
#[derive(Debug)]
pub struct BackupDir {
    pub dir: PathBuf,
    /// Backup files in backup order.
    pub files: Vec<BackupFile>,
    /// Interrupted or failed backups (`*.partial`), of any disk: `--filter` does not hide them.
    pub partials: Vec<PathBuf>,
    /// The chain id, from `uuid` here or one level up.
    pub uuid: Option<String>,
}

/// The files a restore uses: the latest FULL and the INCs after it, in order.
#[derive(Debug, Clone)]
pub struct Chain {
    pub files: Vec<BackupFile>,
    /// FULL backups before the one the chain starts with (not restored).
    pub older_fulls: Vec<BackupFile>,
}

/// Splits `FULL-1700000000-disk.qcow2` into (level, epoch, disk).
pub fn parse_name(name: &str) -> Option<(Level, u64, String)> {
    let (level, rest) = [
        ("FULL-", Level::Full),
        ("INC-", Level::Inc),
        ("COPY-", Level::Copy),
    ]
    .iter()
    .find_map(|(p, l)| name.strip_prefix(p).map(|r| (*l, r)))?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || rest.as_bytes().get(digits) != Some(&b'-') {
        return None;
    }
    let epoch = rest[..digits].parse().ok()?;
    Some((level, epoch, rest[digits + 1..].to_string()))
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

impl BackupDir {
    /// Reads `dir`. With `filter`, only files whose name contains it are considered (to pick
    /// one disk in a flat directory, as the original's `--filter`).
    pub fn scan(dir: &Path, filter: Option<&str>) -> Result<BackupDir, DirError> {
        Self::scan_matching(dir, &|name| filter.is_none_or(|f| name.contains(f)))
    }

    /// Reads the files of the disk named `disk` (the part after `LEVEL-<epoch>-`) in `dir`,
    /// which may hold other disks too (a flat directory).
    pub fn scan_disk(dir: &Path, disk: &str) -> Result<BackupDir, DirError> {
        Self::scan_matching(dir, &|name| {
            let name = name.strip_suffix(".partial").unwrap_or(name);
            match parse_name(name) {
                Some((_, _, d)) => d == disk,
                // A --no-timestamp file, or its `FULL-<disk>` / `COPY-<disk>` alias.
                None => name == disk || name.split_once('-').is_some_and(|(_, d)| d == disk),
            }
        })
    }

    fn scan_matching(dir: &Path, wanted: &dyn Fn(&str) -> bool) -> Result<BackupDir, DirError> {
        let io = |e| DirError::Io(dir.to_path_buf(), e);
        let entries = std::fs::read_dir(dir).map_err(io)?;
        let mut files = Vec::new();
        let mut partials = Vec::new();
        let mut aliases = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_side_file(&name) {
                continue;
            }
            let path = entry.path();
            let link = std::fs::symlink_metadata(&path).map_err(io)?;
            // Every partial file counts, whatever disk it names (as in the original): a
            // folder with an interrupted backup in it is not to be trusted blindly.
            if name.ends_with(".partial") && !link.is_dir() {
                partials.push(path);
                continue;
            }
            if !wanted(&name) {
                continue;
            }
            if link.file_type().is_symlink() {
                let target = std::fs::read_link(&path).map_err(io)?;
                if parse_name(name.trim_end_matches(".partial")).is_some() {
                    // Neither tool makes a timestamped backup a link: one that is may lead
                    // anywhere on the host.
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
            if !link.is_file() {
                continue;
            }
            let mtime = link
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
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
                size: link.len(),
                mtime,
            });
        }
        // A symlink names the level of a timestamp-less file.
        for (alias, target) in aliases {
            let target = target.file_name().map(|t| t.to_string_lossy().into_owned());
            if let (Some(level), Some(t)) = (alias.split('-').next(), target) {
                if let Some(f) = files.iter_mut().find(|f| f.name == t && !f.named_epoch) {
                    f.level = if level == "COPY" {
                        Level::Copy
                    } else {
                        Level::Full
                    };
                }
            }
        }
        files.sort_by(|a, b| (a.epoch, a.mtime, &a.name).cmp(&(b.epoch, b.mtime, &b.name)));
        partials.sort();
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
        let uuid = [dir.join("uuid"), dir.join("..").join("uuid")]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
            .map(|s| s.trim().to_string());
        Ok(BackupDir {
            dir: dir.to_path_buf(),
            files,
            partials,
            uuid,
        })
    }

    /// The restore chain: the latest FULL and every INC after it.
    pub fn chain(&self) -> Result<Chain, DirError> {
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
    pub fn refuse_partials(&self) -> Result<(), DirError> {
        match self.partials.first() {
            None => Ok(()),
            Some(p) => Err(layout(
                &self.dir,
                format!(
                    "partial backup {} found: a backup was interrupted; remove or finish it first",
                    p.display()
                ),
            )),
        }
    }
}

impl Chain {
    /// The chain up to the restore point `until` names: an exact file name, a name prefix
    /// (`INC-1700000600`), or a time (epoch seconds or ISO 8601, local time unless it carries
    /// `Z` or an offset): the latest restore point at or before it.
    pub fn until(&self, spec: &str, dir: &Path) -> Result<Chain, DirError> {
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

/// Epoch seconds, or ISO 8601 `YYYY-MM-DD[THH:MM[:SS]][Z|±HH:MM]` (local time without a zone).
pub fn parse_time(s: &str) -> Option<u64> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok();
    }
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i32> { s.get(r)?.parse().ok() };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (mut hour, mut min, mut sec, mut pos) = (0, 0, 0, 10);
    if b.len() > 10 {
        if b[10] != b'T' && b[10] != b' ' {
            return None;
        }
        hour = num(11..13)?;
        min = num(14..16)?;
        pos = 16;
        if b.get(16) == Some(&b':') {
            sec = num(17..19)?;
            pos = 19;
        }
    }
    let zone = &s[pos..];
    let offset = match zone {
        "" => None,
        "Z" => Some(0),
        z if (z.starts_with('+') || z.starts_with('-')) && z.len() == 6 => {
            let h: i64 = z[1..3].parse().ok()?;
            let m: i64 = z[4..6].parse().ok()?;
            let sign = if z.starts_with('-') { -1 } else { 1 };
            Some(sign * (h * 3600 + m * 60))
        }
        _ => return None,
    };
    // SAFETY: a zeroed tm is valid input for mktime/timegm, which only read and normalise it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = year - 1900;
    tm.tm_mon = month - 1;
    tm.tm_mday = day;
    tm.tm_hour = hour;
    tm.tm_min = min;
    tm.tm_sec = sec;
    tm.tm_isdst = -1;
    let t = match offset {
        None => (unsafe { libc::mktime(&mut tm) }) as i64,
        Some(off) => (unsafe { libc::timegm(&mut tm) }) as i64 - off,
    };
    u64::try_from(t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            parse_name("INC-1700000600-disk.qcow2"),
            Some((Level::Inc, 1_700_000_600, "disk.qcow2".into()))
        );
        assert_eq!(
            parse_name("FULL-12-a-b"),
            Some((Level::Full, 12, "a-b".into()))
        );
        assert_eq!(parse_name("FULL-disk.qcow2"), None);
        assert_eq!(parse_name("INC-12"), None);
        assert_eq!(parse_name("disk.qcow2"), None);
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("1700000000"), Some(1_700_000_000));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Some(1_700_000_000));
        assert_eq!(parse_time("2023-11-14T23:13:20+01:00"), Some(1_700_000_000));
        assert_eq!(parse_time("2023-11-14T22:13Z"), Some(1_699_999_980));
        assert!(parse_time("2023-11-14").is_some());
        assert_eq!(parse_time("INC-1700"), None);
        assert_eq!(parse_time("2023-11-14X"), None);
    }
}
