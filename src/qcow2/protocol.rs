//! Where an image's bytes come from when its name is not a local path.
//!
//! QEMU picks a protocol driver by the prefix of a file name (`nbd:`, `ssh://`, …) below the
//! format driver. This is the same seam: layers above register a [`Protocol`] for a prefix
//! (`s3://`), and every place the engine opens a file by name (a chain's images, backing files,
//! external data files) asks [`open`], so the format engine reads an image in an object store
//! without knowing object stores. Names without a registered prefix are local files.

use super::storage::Storage;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Opens names of one protocol as byte storage.
pub trait Protocol: Send + Sync {
    fn open(&self, name: &Path) -> io::Result<Box<dyn Storage>>;
    /// How many opens (each a round trip) are worth running at once.
    fn in_flight(&self) -> usize {
        1
    }
    /// Up to `limit` names of the images beside `name` that a backing chain from it likely
    /// passes through, nearest first, to open ahead and in parallel; none by default (a
    /// local file's backing file opens at once).
    fn neighbours(&self, _name: &Path, _limit: usize) -> Vec<PathBuf> {
        Vec::new()
    }
}

type Registry = Vec<(&'static str, Arc<dyn Protocol>)>;

static REGISTRY: RwLock<Registry> = RwLock::new(Vec::new());

/// Makes names starting with `prefix` open through `protocol` (replacing an earlier one).
pub fn register(prefix: &'static str, protocol: Arc<dyn Protocol>) {
    let mut r = REGISTRY.write().unwrap_or_else(|p| p.into_inner());
    r.retain(|(p, _)| *p != prefix);
    r.push((prefix, protocol));
}

fn find(name: &Path) -> Option<Arc<dyn Protocol>> {
    let bytes = name.as_os_str().as_encoded_bytes();
    let r = REGISTRY.read().unwrap_or_else(|p| p.into_inner());
    r.iter()
        .find(|(prefix, _)| bytes.starts_with(prefix.as_bytes()))
        .map(|(_, p)| p.clone())
}

/// Whether `name` is a local file name (no registered protocol claims it).
pub fn is_local(name: &Path) -> bool {
    find(name).is_none()
}

/// Opens `name` for positioned reads: through its protocol, or as a local file.
pub fn open(name: &Path) -> io::Result<Box<dyn Storage>> {
    match find(name) {
        Some(p) => p.open(name),
        None => Ok(Box::new(std::fs::File::open(name)?)),
    }
}

/// How many of `names` to open at once: the protocol's request budget when they are all
/// remote, one (the page cache answers local files faster than threads start) otherwise.
pub fn in_flight(names: &[impl AsRef<Path>]) -> usize {
    names
        .iter()
        .map(|n| find(n.as_ref()).map_or(1, |p| p.in_flight()))
        .min()
        .unwrap_or(1)
}

/// [`Protocol::neighbours`] of `name`.
pub fn neighbours(name: &Path, limit: usize) -> Vec<PathBuf> {
    find(name).map_or_else(Vec::new, |p| p.neighbours(name, limit))
}

/// The name that identifies `name`'s storage, for loop detection: the canonical path of a
/// local file, the name itself otherwise.
pub fn identity(name: &Path) -> io::Result<PathBuf> {
    if is_local(name) {
        std::fs::canonicalize(name)
    } else {
        Ok(name.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Memory;
    impl Protocol for Memory {
        fn open(&self, name: &Path) -> io::Result<Box<dyn Storage>> {
            Ok(Box::new(name.to_string_lossy().into_owned().into_bytes()))
        }
        fn in_flight(&self) -> usize {
            5
        }
    }

    #[test]
    fn registered_prefixes_open_through_their_protocol() {
        register("mem-test:", Arc::new(Memory));
        let s = open(Path::new("mem-test:abc")).unwrap();
        assert_eq!(s.size().unwrap(), 12);
        assert!(!is_local(Path::new("mem-test:x")) && is_local(Path::new("/x/mem-test:")));
        assert_eq!(
            identity(Path::new("mem-test:x")).unwrap(),
            Path::new("mem-test:x")
        );
        assert!(open(Path::new("/nonexistent/file")).is_err());
        assert_eq!(in_flight(&["mem-test:a", "mem-test:b"]), 5);
        assert_eq!(in_flight(&["mem-test:a", "/local"]), 1);
    }
}
