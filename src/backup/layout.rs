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

use crate::store::name::{alias_name, Level};
use crate::store::place::{Folder, Place};
use std::io;
use std::path::{Path, PathBuf};

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
        Folder::new(&self.root).write("uuid", uuid.as_bytes())
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

/// Points `<dir>/<LEVEL>-<disk>` at `name` (for --no-timestamp), replacing an older link
/// atomically (the original failed on the second run).
pub fn update_symlink(dir: &Path, level: Level, disk: &str, name: &str) -> io::Result<()> {
    let alias = alias_name(level, disk);
    let link = dir.join(&alias);
    let tmp = dir.join(format!(".{alias}.link"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(name, &tmp)?;
    std::fs::rename(&tmp, &link)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_and_symlinks() {
        let u = new_uuid().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, new_uuid().unwrap());
        let t = tempfile::tempdir().unwrap();
        let d = t.path().to_path_buf();
        update_symlink(&d, Level::Full, "a", "a").unwrap();
        update_symlink(&d, Level::Full, "a", "a").unwrap();
        assert_eq!(
            std::fs::read_link(d.join("FULL-a")).unwrap(),
            Path::new("a")
        );
    }
}
