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

/// Bytes covered by one checksum in the manifests written now (version 2): small enough that
/// a damaged extent names a few guest clusters, not 64 MiB of the disk.
pub const EXTENT_SIZE: u64 = 1 << 20;
/// Version 1 manifests have 64 MiB extents, their CRCs as a list; still read and checked.
pub const MANIFEST_VERSION: u32 = 2;
/// Extent sizes a manifest may declare: powers of two from 64 KiB to 1 GiB.
const EXTENT_SIZES: std::ops::RangeInclusive<u64> = (64 << 10)..=(1 << 30);
/// The size of the reads a checksum pass makes of a local file, whatever the extent size:
/// small enough that what a read copies is still in the CPU's cache when the checksum reads it
/// (with 4 MiB reads verify spent 18% more CPU), as `cat`'s 128 KiB reads are.
const READ: u64 = 256 << 10;
/// The size of the reads of a remote object: a store answers few large GETs best.
const REMOTE_READ: u64 = 4 << 20;

/// The read size for `data`.
fn read_size(data: &dyn Storage) -> u64 {
    if data.is_remote() {
        REMOTE_READ
    } else {
        READ
    }
}
/// Extents checksummed by one parallel task: a few large sequential reads each.
const GROUP: u64 = 64 << 20;

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
    #[serde(flatten)]
    pub sums: Checksums,
}

/// The size of a file and a CRC-32 (IEEE) of each of its extents (the last may be short), as
/// the manifest records them: version 2 as one string of 8 hex digits per extent (`crc32s`:
/// 8 bytes per MiB, so a 2 TiB file's manifest stays at 16 MiB), version 1 as a list of such
/// strings (`crc32`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checksums {
    pub file_size: u64,
    pub extent_size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    crc32: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    crc32s: String,
}

/// Bytes of a file that differ from what the manifest recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// Byte range in the file.
    pub start: u64,
    pub end: u64,
    pub problem: String,
    /// The file's size differs (cut or grown): `[start, end)` is what is missing or added.
    pub size: bool,
}

impl Checksums {
    /// A record of `crcs`, one per `extent_size` bytes of a `file_size`-byte file.
    pub(super) fn new(file_size: u64, extent_size: u64, crcs: &[u32]) -> Checksums {
        Checksums {
            file_size,
            extent_size,
            crc32: Vec::new(),
            crc32s: crcs.iter().map(|c| format!("{c:08x}")).collect(),
        }
    }

    /// The CRC of each extent; `Err` names what is wrong with a record that is no record of
    /// ours (a bad extent size, digits that are no hex, too few or too many extents).
    pub fn crcs(&self) -> Result<Vec<u32>, String> {
        if !EXTENT_SIZES.contains(&self.extent_size) || !self.extent_size.is_power_of_two() {
            return Err(format!(
                "the manifest's extents of {} bytes are none of ours (powers of two from 64 KiB to 1 GiB)",
                self.extent_size
            ));
        }
        let hex = |h: &str| {
            (h.len() == 8)
                .then(|| u32::from_str_radix(h, 16).ok())
                .flatten()
                .ok_or_else(|| format!("the manifest's checksum '{h}' is not 8 hex digits"))
        };
        let crcs = if self.crc32s.is_empty() {
            self.crc32
                .iter()
                .map(|h| hex(h))
                .collect::<Result<Vec<u32>, String>>()?
        } else {
            let text = self.crc32s.as_bytes();
            if text.len() % 8 != 0 || !self.crc32s.is_ascii() {
                return Err("the manifest's checksums are not 8 hex digits each".into());
            }
            text.chunks(8)
                .map(|c| hex(std::str::from_utf8(c).unwrap_or_default()))
                .collect::<Result<Vec<u32>, String>>()?
        };
        let want = self.file_size.div_ceil(self.extent_size);
        if crcs.len() as u64 != want {
            return Err(format!(
                "the manifest has {} checksums for {} bytes in extents of {}: it should have {want}",
                crcs.len(),
                self.file_size,
                self.extent_size
            ));
        }
        Ok(crcs)
    }

    /// A record of a `file_size`-byte file in `extent_size` extents, without checksums yet:
    /// what [`Checksums::extent`] needs.
    pub(super) fn sized(file_size: u64, extent_size: u64) -> Checksums {
        Checksums::new(file_size, extent_size, &[])
    }

    /// The byte range of extent `i`.
    pub fn extent(&self, i: usize) -> (u64, u64) {
        let start = i as u64 * self.extent_size;
        (start, (start + self.extent_size).min(self.file_size))
    }
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

/// The checksums of `data` in the extents manifests are written with now.
pub fn checksums(data: &dyn Storage) -> io::Result<Checksums> {
    let size = data.size()?;
    Ok(Checksums::new(
        size,
        EXTENT_SIZE,
        &crcs_of(data, size, EXTENT_SIZE)?,
    ))
}

/// The CRC-32 of every `extent`-byte extent of the first `size` bytes of `data`. Groups of
/// extents are checksummed in parallel, each in sequential steps whatever the extent size.
fn crcs_of(data: &dyn Storage, size: u64, extent: u64) -> io::Result<Vec<u32>> {
    let group = GROUP.max(extent);
    let file = mappable(data, size);
    let step = if file.is_some() {
        MAP_STEP
    } else {
        read_size(data)
    };
    let groups = (0..size.div_ceil(group))
        .into_par_iter()
        .map_init(Vec::new, |buf, g| {
            let (start, end) = (g * group, ((g + 1) * group).min(size));
            let mut crcs = Vec::with_capacity(((end - start) / extent + 1) as usize);
            let mut h = crc32fast::Hasher::new();
            let mut pos = start;
            while pos < end {
                let n = step.min(end - pos) as usize;
                let map = file.and_then(|file| map_range(file, pos, n));
                let chunk: &[u8] = match &map {
                    Some(map) => map,
                    None => {
                        buf.resize(n, 0);
                        read_exact(data, &mut buf[..n], pos, "backup file")?;
                        &buf[..n]
                    }
                };
                // Split the chunk at extent boundaries.
                let mut at = 0;
                while at < n {
                    let boundary = (pos + at as u64) / extent * extent + extent;
                    let take = ((boundary - (pos + at as u64)) as usize).min(n - at);
                    h.update(&chunk[at..at + take]);
                    at += take;
                    let here = pos + at as u64;
                    if here % extent == 0 || here == end {
                        crcs.push(std::mem::take(&mut h).finalize());
                    }
                }
                pos += n as u64;
            }
            Ok(crcs)
        })
        .collect::<io::Result<Vec<Vec<u32>>>>()?;
    Ok(groups.concat())
}

/// The bytes a checksum pass maps of a local file at a time: few enough system calls, and
/// little resident at once (the mapped pages count in the process's RSS until unmapped).
const MAP_STEP: u64 = 2 << 20;

/// `data`'s file when it is a local file of at least `size` bytes: a checksum pass then reads
/// it through read-only mappings, so the CRC reads the page cache itself instead of a copy of
/// it. That halves verify's CPU and makes it faster than `cat` of the same files.
///
/// A file cut shorter while mapped would make a read of the lost pages fault (SIGBUS): the
/// backup files verify and the manifest writers read are never shrunk in place (the commands
/// that change them only write within or past their end), so mapping is safe here.
fn mappable(data: &dyn Storage, size: u64) -> Option<&std::fs::File> {
    let file = data.as_file()?;
    (file.metadata().ok()?.len() >= size).then_some(file)
}

/// A read-only mapping of bytes `pos..pos + len` of `file`, `None` when mapping fails (the
/// caller reads them instead).
fn map_range(file: &std::fs::File, pos: u64, len: usize) -> Option<memmap2::Mmap> {
    // Populated at once: from a cold cache, faulting page by page read the file in small
    // pieces (30% slower than `cat`); populated, it reads as fast as `cat` does.
    // SAFETY: see `mappable`: nothing shrinks the file while the mapping lives, and the
    // mapping is only read.
    unsafe {
        memmap2::MmapOptions::new()
            .offset(pos)
            .len(len)
            .populate()
            .map(file)
    }
    .ok()
}

/// The CRC-32 of bytes `start..end` of `data`.
pub(super) fn extent_crc(data: &dyn Storage, start: u64, end: u64) -> io::Result<u32> {
    let read = read_size(data);
    let mut buf = vec![0u8; read.min(end - start) as usize];
    let mut h = crc32fast::Hasher::new();
    let mut pos = start;
    while pos < end {
        let chunk = &mut buf[..read.min(end - pos) as usize];
        read_exact(data, chunk, pos, "backup file")?;
        h.update(chunk);
        pos += chunk.len() as u64;
    }
    Ok(h.finalize())
}

/// Manifests are small (16 MiB for a 2 TiB file); one that is far larger is no manifest of
/// ours.
pub(super) const MAX_MANIFEST: u64 = 128 << 20;

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

    /// Compares `file` with the manifest's checksums: each extent that differs, and a size
    /// that differs. `Err(problem)` when the manifest's record is unusable.
    pub fn check(&self, file: &dyn Storage) -> io::Result<Result<Vec<Mismatch>, String>> {
        let sums = &self.sums;
        let want = match sums.crcs() {
            Ok(c) => c,
            Err(problem) => return Ok(Err(problem)),
        };
        let size = file.size()?;
        let mut found = Vec::new();
        if size != sums.file_size {
            let at = size.min(sums.file_size);
            found.push(Mismatch {
                start: at,
                end: size.max(sums.file_size),
                problem: format!(
                    "file is {size} bytes, the manifest recorded {}",
                    sums.file_size
                ),
                size: true,
            });
        }
        let got = crcs_of(file, size.min(sums.file_size), sums.extent_size)?;
        for (i, (got, want)) in got.iter().zip(&want).enumerate() {
            let (start, end) = sums.extent(i);
            // A short last extent of a cut file differs without being damaged: the size says so.
            if got != want && end <= size {
                found.push(Mismatch {
                    start,
                    end,
                    problem: format!(
                        "checksum mismatch in bytes {start}..{end}: crc32 {got:08x}, manifest {want:08x}"
                    ),
                    size: false,
                });
            }
        }
        Ok(Ok(found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Bytes that differ from extent to extent (so a checksum of the wrong range shows).
    fn bytes(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9u32;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn mapped_files_and_read_storage_give_the_checksums_of_each_extent() {
        // Not a multiple of the map step, the group or the extent: every boundary case.
        let data = bytes((MAP_STEP * 9 + 12_345) as usize);
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        for extent in [64 << 10, EXTENT_SIZE, 64 << 20] {
            let want: Vec<u32> = data.chunks(extent as usize).map(crc32fast::hash).collect();
            let size = data.len() as u64;
            assert!(mappable(&file, size).is_some());
            assert_eq!(
                crcs_of(&file, size, extent).unwrap(),
                want,
                "file, extent {extent}"
            );
            assert_eq!(
                crcs_of(&data, size, extent).unwrap(),
                want,
                "memory, extent {extent}"
            );
        }
    }

    #[test]
    fn a_file_shorter_than_asked_is_read_and_reported_not_mapped() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes(1000)).unwrap();
        assert!(mappable(&file, 2000).is_none());
        let e = crcs_of(&file, 2000, EXTENT_SIZE).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }
}
