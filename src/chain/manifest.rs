//! The manifest written beside every backup file (in the disk directory's `.manifest/`): what
//! the file is (level, time, chain id, bitmap, source device, sizes, parent) and a CRC-32 of
//! each fixed-size extent of the file as written, so `verify` can prove a file is the one the
//! backup produced, and name the damaged extent when it is not.
//!
//! The original tool kept no such record: the chain state had to be guessed from names and
//! mtimes, and bit rot went unnoticed until a restore.

use super::dir::Level;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes covered by one checksum.
pub const EXTENT_SIZE: u64 = 64 << 20;
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub manifest_version: u32,
    /// The program and version that wrote it.
    pub tool: String,
    /// The backup file's name (in the directory above `.manifest/`).
    pub file: String,
    pub level: Level,
    pub epoch: u64,
    pub uuid: Option<String>,
    pub bitmap: Option<String>,
    pub device: String,
    pub node: String,
    pub qdev: Option<String>,
    pub source_file: String,
    pub qemu_version: String,
    /// Format of the backup file (`qcow2` or `raw`).
    pub format: String,
    pub virtual_size: u64,
    pub cluster_size: Option<u64>,
    /// The file this one builds on (an INC's predecessor), by name.
    pub parent: Option<String>,
    pub file_size: u64,
    pub extent_size: u64,
    /// CRC-32 (IEEE) of each extent, as 8 hex digits; the last extent may be short.
    pub crc32: Vec<String>,
}

/// Where the manifest of backup file `file` lives.
pub fn path_for(file: &Path) -> PathBuf {
    let dir = file.parent().unwrap_or(Path::new("."));
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    dir.join(".manifest").join(format!("{name}.json"))
}

/// Removes the manifest of `file`, durably, before a restore command changes the file in
/// place (or after it deletes it): the manifest describes the file as the backup wrote it, so
/// left behind it would make `verify` report the intended change as damage. Done before the
/// change, a crash in between leaves a file that is simply verified without a manifest.
pub fn forget(file: &Path) -> io::Result<()> {
    let path = path_for(file);
    match std::fs::remove_file(&path) {
        Ok(()) => crate::qcow2::create::sync_parent(&path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The CRC-32 of every extent of `file` and its size; extents are read in parallel.
pub fn checksums(file: &Path) -> io::Result<(u64, Vec<String>)> {
    let f = std::fs::File::open(file)?;
    let size = f.metadata()?.len();
    let crcs = (0..size.div_ceil(EXTENT_SIZE))
        .into_par_iter()
        .map(|i| {
            let start = i * EXTENT_SIZE;
            let mut remaining = EXTENT_SIZE.min(size - start);
            let mut buf = vec![0u8; 4 << 20];
            let mut h = crc32fast::Hasher::new();
            let mut pos = start;
            while remaining > 0 {
                let n = remaining.min(buf.len() as u64) as usize;
                f.read_exact_at(&mut buf[..n], pos)?;
                h.update(&buf[..n]);
                pos += n as u64;
                remaining -= n as u64;
            }
            Ok(format!("{:08x}", h.finalize()))
        })
        .collect::<io::Result<Vec<_>>>()?;
    Ok((size, crcs))
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Manifest, String> {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_slice(&text)
            .map_err(|e| format!("{}: not a manifest: {e}", path.display()))
    }

    /// Compares `file` with the manifest; each problem is (offset, message).
    pub fn check(&self, file: &Path) -> io::Result<Vec<(u64, String)>> {
        let mut problems = Vec::new();
        if self.extent_size != EXTENT_SIZE {
            problems.push((
                0,
                format!(
                    "manifest uses extents of {} bytes; this version checks {EXTENT_SIZE}",
                    self.extent_size
                ),
            ));
            return Ok(problems);
        }
        let (size, crcs) = checksums(file)?;
        if size != self.file_size {
            problems.push((
                size.min(self.file_size),
                format!(
                    "file is {size} bytes, the manifest recorded {}",
                    self.file_size
                ),
            ));
        }
        for (i, (got, want)) in crcs.iter().zip(&self.crc32).enumerate() {
            if got != want {
                problems.push((
                    i as u64 * EXTENT_SIZE,
                    format!(
                        "checksum mismatch in bytes {}..{}: crc32 {got}, manifest {want}",
                        i as u64 * EXTENT_SIZE,
                        ((i as u64 + 1) * EXTENT_SIZE).min(size)
                    ),
                ));
            }
        }
        Ok(problems)
    }
}
