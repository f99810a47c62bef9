//! Where a backup run puts its files, compatible with the original qmpbackup so a chain
//! started by either tool continues with the other:
//!
//! ```text
//! <target>/[YYYY-MM/]uuid                    chain id (no trailing newline)
//! <target>/[YYYY-MM/]<disk>.config           QEMU's description of the source image (JSON)
//! <target>/[YYYY-MM/]<disk>/                 one directory per disk (none with --no-subdir)
//!     FULL-<epoch>-<disk>, INC-<epoch>-<disk>, COPY-<epoch>-<disk>   (+ .partial while running)
//!     .manifest/<file>.json                  per-backup manifest (ours)
//!     .quarantine/<file>.partial             partial files of interrupted runs, set aside
//! <target>/[YYYY-MM/].fleece/                fleecing images while a run is in progress
//! ```
//! Side files live in dot-directories: both tools' restore commands take every regular file
//! of a disk directory as a backup, and neither looks into subdirectories.

use std::io;
use std::path::{Path, PathBuf};

pub use crate::chain::dir::Level;

/// The target directory of one run.
#[derive(Debug, Clone)]
pub struct Target {
    pub root: PathBuf,
    /// `--monthly` and this month's directory did not exist before the run.
    pub new_month: bool,
    pub subdirs: bool,
}

impl Target {
    /// Resolves `--target` (and `--monthly`, with `month` as `YYYY-MM`) and creates it.
    pub fn prepare(dir: &Path, monthly: Option<&str>, subdirs: bool) -> io::Result<Target> {
        let root = match monthly {
            Some(m) => dir.join(m),
            None => dir.to_path_buf(),
        };
        let new_month = monthly.is_some() && !root.exists();
        std::fs::create_dir_all(&root)?;
        // QEMU opens the files we name relative to its own working directory, not ours.
        let root = std::path::absolute(&root)?;
        Ok(Target {
            root,
            new_month,
            subdirs,
        })
    }

    pub fn uuid_path(&self) -> PathBuf {
        self.root.join("uuid")
    }

    /// The chain id, if a chain was started here.
    pub fn uuid(&self) -> io::Result<Option<String>> {
        match std::fs::read_to_string(self.uuid_path()) {
            Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the chain id (durably: the bitmap name depends on it).
    pub fn write_uuid(&self, uuid: &str) -> io::Result<()> {
        write_durably(&self.uuid_path(), uuid.as_bytes())
    }

    pub fn disk_dir(&self, disk: &str) -> PathBuf {
        if self.subdirs {
            self.root.join(disk)
        } else {
            self.root.clone()
        }
    }

    pub fn config_path(&self, disk: &str) -> PathBuf {
        self.root.join(format!("{disk}.config"))
    }

    pub fn fleece_dir(&self) -> PathBuf {
        self.root.join(".fleece")
    }
}

/// The final name of a backup file.
pub fn file_name(level: Level, epoch: u64, disk: &str, timestamp: bool) -> String {
    if timestamp {
        format!("{}-{epoch}-{disk}", level_tag(level))
    } else {
        disk.to_string()
    }
}

pub fn level_tag(level: Level) -> &'static str {
    match level {
        Level::Full => "FULL",
        Level::Inc => "INC",
        Level::Copy => "COPY",
    }
}

/// Points `<dir>/<LEVEL>-<disk>` at `name` (for --no-timestamp), replacing an older link
/// atomically (the original failed on the second run).
pub fn update_symlink(dir: &Path, level: Level, disk: &str, name: &str) -> io::Result<()> {
    let link = dir.join(format!("{}-{disk}", level_tag(level)));
    let tmp = dir.join(format!(".{}-{disk}.link", level_tag(level)));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(name, &tmp)?;
    std::fs::rename(&tmp, &link)
}

/// Writes `bytes` to `path` through a temporary file, fsynced and renamed into place.
pub fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    crate::qcow2::create::sync_parent(path)
}

/// The newest epoch named by any file in `dirs` (backups, partials, quarantined partials), so
/// a run can take a later one: two runs within one second must not share a name.
pub fn newest_epoch(dirs: &[PathBuf]) -> u64 {
    let mut newest = 0;
    for dir in dirs {
        for d in [dir.clone(), dir.join(".quarantine")] {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let name = name.strip_suffix(".partial").unwrap_or(&name);
                if let Some((_, epoch, _)) = crate::chain::dir::parse_name(name) {
                    newest = newest.max(epoch);
                }
            }
        }
    }
    newest
}

/// Moves an interrupted run's partial file out of the chain, keeping it for inspection.
pub fn quarantine(partial: &Path) -> io::Result<PathBuf> {
    let dir = partial
        .parent()
        .unwrap_or(Path::new("."))
        .join(".quarantine");
    std::fs::create_dir_all(&dir)?;
    let to = dir.join(partial.file_name().unwrap_or_default());
    std::fs::rename(partial, &to)?;
    Ok(to)
}

/// A random RFC 4122 version 4 UUID.
pub fn new_uuid() -> io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

/// `YYYY-MM` of `epoch` in local time (the original's --monthly directory).
pub fn month_of(epoch: u64) -> String {
    crate::chain::info::local_time(epoch as i64)[..7].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_uuids() {
        assert_eq!(file_name(Level::Inc, 17, "d.qcow2", true), "INC-17-d.qcow2");
        assert_eq!(file_name(Level::Full, 17, "d.qcow2", false), "d.qcow2");
        let u = new_uuid().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, new_uuid().unwrap());
    }

    #[test]
    fn epochs_and_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().to_path_buf();
        std::fs::write(d.join("FULL-100-a"), b"").unwrap();
        std::fs::write(d.join("INC-250-a.partial"), b"").unwrap();
        assert_eq!(newest_epoch(std::slice::from_ref(&d)), 250);
        quarantine(&d.join("INC-250-a.partial")).unwrap();
        assert_eq!(newest_epoch(std::slice::from_ref(&d)), 250);
        update_symlink(&d, Level::Full, "a", "a").unwrap();
        update_symlink(&d, Level::Full, "a", "a").unwrap();
        assert_eq!(
            std::fs::read_link(d.join("FULL-a")).unwrap(),
            Path::new("a")
        );
    }
}
