//! A place that holds backup files: the seam between the backup-folder contract and where the
//! bytes live. Everything above this trait (scanning a folder, manifests, partial files,
//! setting files aside, writing the chain id) goes through it; a local folder is the first
//! implementation, an object-store prefix can be the next without touching those callers.
//!
//! Names are relative to the place and may name one level of sub-folder (`.manifest/x.json`,
//! `.quarantine/y.partial`). Changes are not durable until [`Place::sync`] (a local folder:
//! the folder's fsync), except [`Place::write`], which is atomic and durable by itself.

use crate::qcow2::storage::{sync_parent, Storage};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

/// What a listing shows of one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File,
    Folder,
    /// A symbolic link, with what it points to.
    Link(PathBuf),
    Other,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub kind: Kind,
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: u64,
}

pub trait Place: Send + Sync {
    /// Where `name` lives (the place itself for ""): a path to open images by, and to name
    /// in messages.
    fn locate(&self, name: &str) -> PathBuf;
    /// The entries of the place (`sub` = "") or of one of its sub-folders; a missing
    /// sub-folder lists as empty.
    fn list(&self, sub: &str) -> io::Result<Vec<Entry>>;
    /// Opens `name` for positioned reads.
    fn open(&self, name: &str) -> io::Result<Box<dyn Storage>>;
    /// Creates or replaces `name` with `bytes`, atomically and durably.
    fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()>;
    /// Renames `from` to `to` (replacing `to`), creating `to`'s sub-folder if needed.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Deletes `name`.
    fn delete(&self, name: &str) -> io::Result<()>;
    /// Makes the renames and deletions of `name`'s folder durable.
    fn sync(&self, name: &str) -> io::Result<()>;
}

/// The place `dir` names: a folder in an object store (`s3://BUCKET/PREFIX`), else a local
/// folder.
pub fn at(dir: &Path) -> io::Result<Arc<dyn Place>> {
    if crate::s3::url::is_s3(dir) {
        let url = crate::s3::S3Url::of_path(dir)?;
        return Ok(Arc::new(super::bucket::Prefix::new(url)?));
    }
    Ok(Arc::new(Folder::new(dir)))
}

/// The place that holds `file`, and the file's name in it.
pub fn of_file(file: &Path) -> io::Result<(Arc<dyn Place>, String)> {
    if crate::s3::url::is_s3(file) {
        let url = crate::s3::S3Url::of_path(file)?;
        let (dir, name) = url.key.rsplit_once('/').unwrap_or(("", &url.key));
        let dir = crate::s3::S3Url {
            bucket: url.bucket.clone(),
            key: dir.to_string(),
        };
        return Ok((Arc::new(super::bucket::Prefix::new(dir)?), name.to_string()));
    }
    let (folder, name) = Folder::of_file(file);
    Ok((Arc::new(folder), name))
}

/// A local folder.
#[derive(Debug, Clone)]
pub struct Folder {
    dir: PathBuf,
}

impl Folder {
    pub fn new(dir: &Path) -> Folder {
        Folder {
            dir: dir.to_path_buf(),
        }
    }

    /// The folder that holds `file`, and the file's name in it.
    pub fn of_file(file: &Path) -> (Folder, String) {
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        (Folder::new(dir), name.into_owned())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn mtime(m: &std::fs::Metadata) -> u64 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

impl Place for Folder {
    fn locate(&self, name: &str) -> PathBuf {
        if name.is_empty() {
            return self.dir.clone();
        }
        self.dir.join(name)
    }

    fn list(&self, sub: &str) -> io::Result<Vec<Entry>> {
        let dir = self.dir.join(sub);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !sub.is_empty() => {
                return Ok(Vec::new())
            }
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path)?;
            let kind = if meta.file_type().is_symlink() {
                Kind::Link(std::fs::read_link(&path)?)
            } else if meta.is_file() {
                Kind::File
            } else if meta.is_dir() {
                Kind::Folder
            } else {
                Kind::Other
            };
            out.push(Entry {
                name: entry.file_name().to_string_lossy().into_owned(),
                kind,
                size: meta.len(),
                mtime: mtime(&meta),
            });
        }
        Ok(out)
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(std::fs::File::open(self.locate(name))?))
    }

    fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let path = self.locate(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let base = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{base}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        sync_parent(&path)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let to = self.locate(to);
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::rename(self.locate(from), to)
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.locate(name))
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        sync_parent(&self.locate(name))
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A local folder in a temporary directory (kept alive by the first half).
    pub fn scratch() -> (tempfile::TempDir, Folder) {
        let t = tempfile::tempdir().unwrap();
        let f = Folder::new(t.path());
        (t, f)
    }

    #[test]
    fn a_local_folder_lists_writes_renames_and_deletes() {
        let (t, f) = scratch();
        f.write(".manifest/a.json", b"{}").unwrap();
        f.write("a", b"abc").unwrap();
        assert_eq!(f.list(".quarantine").unwrap().len(), 0);
        f.rename("a", ".quarantine/a").unwrap();
        f.sync(".quarantine/a").unwrap();
        let q = f.list(".quarantine").unwrap();
        assert_eq!(
            (q[0].name.as_str(), q[0].size, &q[0].kind),
            ("a", 3, &Kind::File)
        );
        let mut buf = [0u8; 3];
        f.open(".quarantine/a")
            .unwrap()
            .read_at(&mut buf, 0)
            .unwrap();
        assert_eq!(&buf, b"abc");
        f.delete(".quarantine/a").unwrap();
        assert!(f.list(".quarantine").unwrap().is_empty());
        let mut top: Vec<_> = f
            .list("")
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.kind))
            .collect();
        top.sort_by(|a, b| a.0.cmp(&b.0));
        let folder = |n: &str| (n.to_string(), Kind::Folder);
        assert_eq!(top, vec![folder(".manifest"), folder(".quarantine")]);
        assert!(
            f.list("missing-top").is_ok() && Folder::new(&t.path().join("no")).list("").is_err()
        );
    }
}
