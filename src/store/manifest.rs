//! The manifest written beside every backup file (in the disk directory's `.manifest/`): what
//! the file is (level, time, chain id, bitmap, source device, sizes, parent) and a CRC-32 of
//! each fixed-size extent of the file as written, so `verify` can prove a file is the one the
//! backup produced, and name the damaged extent when it is not.
//!
//! The original tool kept no such record: the chain state had to be guessed from names and
//! mtimes, and bit rot went unnoticed until a restore.

use super::name::Level;
use super::place::Place;
use crate::qcow2::storage::{read_exact, Storage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io;

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

/// The manifests' sub-folder in a disk's folder.
pub const FOLDER: &str = ".manifest";

/// The name (in the disk's place) of backup file `file`'s manifest.
pub fn name_for(file: &str) -> String {
    format!("{FOLDER}/{file}.json")
}

/// Removes the manifest of backup file `file`, durably, before a restore command changes the
/// file in place (or after it deletes it): the manifest describes the file as the backup
/// wrote it, so left behind it would make `verify` report the intended change as damage. Done
/// before the change, a crash in between leaves a file that is simply verified without a
/// manifest.
pub fn forget(place: &dyn Place, file: &str) -> io::Result<()> {
    let name = name_for(file);
    match place.delete(&name) {
        Ok(()) => place.sync(&name),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether backup file `file` has a manifest (asked of the place, like every other access).
pub fn exists(place: &dyn Place, file: &str) -> bool {
    !matches!(place.open(&name_for(file)), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

/// The CRC-32 of every extent of `data` and its size; extents are read in parallel.
pub fn checksums(data: &dyn Storage) -> io::Result<(u64, Vec<String>)> {
    let size = data.size()?;
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
                read_exact(data, &mut buf[..n], pos, "backup file")?;
                h.update(&buf[..n]);
                pos += n as u64;
                remaining -= n as u64;
            }
            Ok(format!("{:08x}", h.finalize()))
        })
        .collect::<io::Result<Vec<_>>>()?;
    Ok((size, crcs))
}

/// Manifests are small; one that is not is no manifest of ours.
const MAX_MANIFEST: u64 = 16 << 20;

impl Manifest {
    /// Reads the manifest of backup file `file` in `place`.
    pub fn read(place: &dyn Place, file: &str) -> Result<Manifest, String> {
        let name = name_for(file);
        let path = place.locate(&name);
        let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        let data = place.open(&name).map_err(|e| fail(&e))?;
        let size = data.size().map_err(|e| fail(&e))?;
        if size > MAX_MANIFEST {
            return Err(fail(&format!("not a manifest: {size} bytes")));
        }
        let mut text = vec![0u8; size as usize];
        read_exact(&*data, &mut text, 0, "manifest").map_err(|e| fail(&e))?;
        serde_json::from_slice(&text).map_err(|e| fail(&format!("not a manifest: {e}")))
    }

    /// Writes the manifest beside its file, atomically and durably.
    pub fn write(&self, place: &dyn Place) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        place.write(&name_for(&self.file), &bytes)
    }

    /// Compares `file` with the manifest; each problem is (offset, message).
    pub fn check(&self, file: &dyn Storage) -> io::Result<Vec<(u64, String)>> {
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
