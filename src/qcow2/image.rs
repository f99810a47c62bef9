//! One qcow2 file: its metadata, the mapping of guest offsets, and reads of its own clusters.
//!
//! A [`Qcow2`] knows nothing about its backing file: where a cluster is unallocated it says so,
//! and [`super::disk::Disk`] decides what that reads as. Opening parses and validates all
//! fixed-size metadata (header, extensions, L1 table, snapshot table, bitmap directory); L2
//! tables are loaded on demand into a bounded cache, so memory stays proportional to the
//! metadata actually touched, never to the data.

use super::bitmap::{self, Bitmap};
use super::cache::{self, ImageId, L2Cache};
use super::crypto::Encryption;
use super::error::{corrupt, ErrorKind, Result};
use super::ext::Extensions;
use super::header::{self, Header};
use super::l1::{self, L1Entry};
use super::l2::{CompressedDescriptor, L2Format, L2Table};
use super::mapping;
pub use super::mapping::Status;
use super::refcount::{self, RefcountFormat};
use super::snapshot::{self, Snapshot};
use super::storage::{read_exact, Storage};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An external data file: guest data lives there, metadata in the qcow2 file.
pub struct DataFile {
    /// The name as stored in the header extension.
    pub name: OsString,
    /// Where it was found (resolved against the image's directory).
    pub path: PathBuf,
    storage: Box<dyn Storage>,
    len: u64,
}

/// Why the reader refuses a cluster of guest data; the message is the reader's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// It starts past the end of the file: nothing of it can be read.
    PastEnd(String),
    /// It lies on metadata: read, it would hand that structure's bytes to the guest.
    Overlap(String),
}

impl Refusal {
    pub fn message(&self) -> &str {
        match self {
            Refusal::PastEnd(m) | Refusal::Overlap(m) => m,
        }
    }
}

/// A parsed qcow2 image (one file, without its backing chain).
pub struct Qcow2 {
    /// What an open for `check` found and tolerated (empty for a normal open).
    check_findings: Vec<String>,
    /// Bytes of the snapshot table as read.
    snapshot_table_len: u64,
    path: PathBuf,
    file: Box<dyn Storage>,
    file_len: u64,
    header: Header,
    ext: Extensions,
    backing_name: Option<OsString>,
    data_file: Option<DataFile>,
    format: L2Format,
    l1: Vec<L1Entry>,
    snapshots: Vec<Snapshot>,
    bitmaps: Vec<Bitmap>,
    /// Decoded L2 tables: this image's own cache, or one its chain shares.
    cache: Arc<L2Cache>,
    cache_key: ImageId,
    metadata: super::overlap::Metadata,
    encryption: Option<Encryption>,
}

/// How strict an open is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Refuse every fault: what reading and writing need.
    Read,
    /// Keep going where `check` can report instead (see [`Qcow2::open_for_check`]).
    Check,
}

impl Qcow2 {
    /// Opens a qcow2 file read-only; an external data file is looked up next to it.
    pub fn open(path: &Path) -> Result<Qcow2> {
        Qcow2::open_as(path, Mode::Read)
    }

    /// Opens an image for `check`, which must examine what a normal open refuses wherever
    /// QEMU opens the image: a table on the header or past the largest host offset, a backing
    /// file name offset inside the header, an L2 table on other metadata are listed in
    /// [`Qcow2::check_findings`]; a snapshot table that cannot be read whole, or entries with
    /// unusable L1 tables, are left out and listed there too (as QEMU's check does). Tables
    /// that extend past the end of the file read as zeros there, as in QEMU, and L1 entries
    /// sharing an L2 table are kept: the check reports both. What QEMU cannot open either (a
    /// header it does not understand, unknown features, bad extensions, encryption, an
    /// unaligned table) fails as in [`Qcow2::open`].
    pub fn open_for_check(path: &Path) -> Result<Qcow2> {
        Qcow2::open_as(path, Mode::Check)
    }

    fn open_as(path: &Path, mode: Mode) -> Result<Qcow2> {
        let file = super::protocol::open(path).map_err(|e| ErrorKind::Io(e).at(path))?;
        Qcow2::from_storage_as(path, file, &super::protocol::open, mode)
    }

    /// Parses an image from any storage. `open_data_file` opens an external data file by its
    /// resolved path (memory-backed images in fuzzing have none to offer).
    pub fn from_storage(
        path: &Path,
        file: Box<dyn Storage>,
        open_data_file: &dyn Fn(&Path) -> std::io::Result<Box<dyn Storage>>,
    ) -> Result<Qcow2> {
        Qcow2::from_storage_as(path, file, open_data_file, Mode::Read)
    }

    fn from_storage_as(
        path: &Path,
        file: Box<dyn Storage>,
        open_data_file: &dyn Fn(&Path) -> std::io::Result<Box<dyn Storage>>,
        mode: Mode,
    ) -> Result<Qcow2> {
        let at = |k: ErrorKind| k.at(path);
        let file_len = file.size().map_err(|e| at(e.into()))?;
        let mut probe = vec![0u8; header::PROBE_LENGTH.min(file_len as usize)];
        read_exact(&*file, &mut probe, 0, "header").map_err(|e| at(e.into()))?;
        let (header, mut findings) = match mode {
            Mode::Read => (Header::parse(&probe).map_err(at)?, Vec::new()),
            Mode::Check => Header::parse_for_check(&probe).map_err(at)?,
        };
        if mode == Mode::Read {
            header.validate(file_len).map_err(at)?;
            // As QEMU: nothing could be written safely, and the image is not what it says.
            // (`check` reports it and repairs it with a new structure.)
            if header.refcount_table_clusters == 0 {
                return Err(at(corrupt(refcount::NO_TABLE)));
            }
        }

        let cs = header.cluster_size();
        let mut cluster0 = vec![0u8; cs.min(file_len) as usize];
        read_exact(&*file, &mut cluster0, 0, "header cluster").map_err(|e| at(e.into()))?;
        let ext_start = header.extensions_offset() as usize;
        let mut ext_end = if header.backing_file_offset != 0 {
            header.backing_file_offset as usize
        } else {
            cluster0.len()
        };
        if ext_end < ext_start || ext_end > cluster0.len() {
            let problem = format!(
                "backing file name offset {:#x} lies inside the header or past the end of the file",
                header.backing_file_offset
            );
            // Inside the header, QEMU reads no extensions, and a name from the header's own
            // bytes; `check` goes on as it does.
            let inside_header = header.backing_file_offset != 0 && ext_start <= cluster0.len();
            if mode == Mode::Read || !inside_header || ext_end > cluster0.len() {
                return Err(at(corrupt(problem)));
            }
            findings.push(problem);
            ext_end = ext_start;
        }
        let ext = Extensions::parse(&cluster0[ext_start..ext_end]).map_err(at)?;

        let unknown = header.unknown_incompatible();
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| match ext.incompatible_name(b as u8) {
                    Some(n) => format!("bit {b} ({n})"),
                    None => format!("bit {b}"),
                })
                .collect();
            return Err(at(ErrorKind::Unsupported(format!(
                "unsupported incompatible feature {}",
                names.join(", ")
            ))));
        }
        let encryption = Encryption::of_qcow2(
            header.crypt_method,
            ext.crypto.map(|c| (c.offset, c.length)),
            file_len,
            &|pos, buf| read_exact(&*file, buf, pos, "LUKS header"),
        )
        .map_err(|m| at(ErrorKind::Encryption(m)))?;
        if header.corrupt() {
            tracing::warn!(
                "{}: the image is marked corrupt; reading it anyway (never written)",
                path.display()
            );
        }
        if ext.bitmaps.is_some() && header.autoclear_features & header::autoclear::BITMAPS == 0 {
            tracing::warn!(
                "{}: a program without bitmap support modified this image; its bitmaps are inconsistent and ignored",
                path.display()
            );
        }

        let backing_name = match header.has_backing_file() {
            true => {
                let o = header.backing_file_offset as usize;
                let name = cluster0
                    .get(o..o + header.backing_file_size as usize)
                    .ok_or_else(|| at(corrupt("the file ends inside the backing file name")))?;
                Some(OsStr::from_bytes(name).to_os_string())
            }
            false => None,
        };

        if header.data_file_raw() && !header.has_data_file() {
            return Err(at(corrupt("data-file-raw requires a data file")));
        }
        let data_file = if header.has_data_file() {
            let name = ext.data_file.clone().ok_or_else(|| {
                at(corrupt(
                    "the image needs an external data file but its header names none",
                ))
            })?;
            let resolved = resolve_relative(path, Path::new(&name));
            let storage = open_data_file(&resolved).map_err(|e| {
                at(ErrorKind::Io(std::io::Error::new(
                    e.kind(),
                    format!("cannot open external data file {}: {e}", resolved.display()),
                )))
            })?;
            let len = storage.size().map_err(|e| at(e.into()))?;
            Some(DataFile {
                name,
                path: resolved,
                storage,
                len,
            })
        } else {
            None
        };

        let l1 = match mode {
            Mode::Read => {
                let l1 = l1::read_table(&*file, header.l1_table_offset, header.l1_size);
                l1.and_then(|t| l1::check_distinct(&t).map(|_| t))
                    .map_err(at)?
            }
            Mode::Check => l1::read_table_for_check(&*file, header.l1_table_offset, header.l1_size)
                .map_err(|e| at(e.into()))?,
        };
        let table = snapshot::TableAt {
            offset: header.snapshots_offset,
            count: header.nb_snapshots,
            cluster_size: cs,
            max_l1_entries: header::MAX_L1_BYTES / 8,
        };
        let snapshot::Table {
            snapshots,
            len: snapshot_table_len,
            problems,
        } = match mode {
            Mode::Read => snapshot::read_table(&*file, table).map_err(at)?,
            Mode::Check => snapshot::read_table_for_check(&*file, table),
        };
        let bitmaps = match &ext.bitmaps {
            Some(b) if header.autoclear_features & header::autoclear::BITMAPS != 0 => {
                b.validate().map_err(at)?;
                bitmap::read_directory(&*file, b, cs, header.size).map_err(at)?
            }
            _ => Vec::new(),
        };
        let structures = super::overlap::Structures {
            header: &header,
            crypto: encryption.as_ref().and_then(|e| e.area),
            l1: &l1,
            snapshots: &snapshots,
            bitmaps: ext
                .bitmaps
                .as_ref()
                .filter(|_| !bitmaps.is_empty())
                .map(|e| (e, &bitmaps[..])),
        };
        let metadata = match mode {
            Mode::Read => super::overlap::Metadata::new(&structures).map_err(at)?,
            Mode::Check => {
                let (metadata, overlaps) = super::overlap::Metadata::collect(&structures);
                findings.extend(overlaps);
                metadata
            }
        };
        findings.extend(problems);
        Ok(Qcow2 {
            check_findings: findings,
            snapshot_table_len,
            metadata,
            path: path.to_path_buf(),
            file,
            file_len,
            format: L2Format::of(&header),
            header,
            ext,
            backing_name,
            data_file,
            l1,
            snapshots,
            bitmaps,
            cache: Arc::new(L2Cache::new(cache::BUDGET)),
            cache_key: ImageId::unique(),
            encryption,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of the snapshot table, entries a check left out included.
    pub fn snapshot_table_len(&self) -> u64 {
        self.snapshot_table_len
    }

    /// The faults an open for `check` let through or left out (see
    /// [`Qcow2::open_for_check`]).
    pub fn check_findings(&self) -> &[String] {
        &self.check_findings
    }

    /// The L1 table this view maps guest offsets through (the active one, or a snapshot's
    /// after [`Qcow2::select_snapshot`]).
    pub fn l1_table(&self) -> &[L1Entry] {
        &self.l1
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }

    /// Virtual size. A snapshot view keeps the image's current size, as `qemu-img convert -l`
    /// does; the size recorded with the snapshot is in [`Snapshot::disk_size`].
    pub fn size(&self) -> u64 {
        self.header.size
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Bytes the file occupies on the host, when the storage can tell.
    pub fn allocated_bytes(&self) -> Option<u64> {
        self.file.allocated_bytes()
    }

    pub fn backing_name(&self) -> Option<&OsStr> {
        self.backing_name.as_deref()
    }

    pub fn backing_format(&self) -> Option<&str> {
        self.ext.backing_format.as_deref()
    }

    pub fn data_file(&self) -> Option<&DataFile> {
        self.data_file.as_ref()
    }

    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    pub fn bitmaps(&self) -> &[Bitmap] {
        &self.bitmaps
    }

    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Switches this (read-only) view to the disk as it was at an internal snapshot, found by
    /// id or name as `qemu-img convert -l` does. Guest ranges beyond the snapshot's L1 table
    /// read as unallocated.
    pub fn select_snapshot(&mut self, key: &str) -> Result<()> {
        let snap = snapshot::find(&self.snapshots, key)
            .ok_or_else(|| {
                ErrorKind::NotFound(format!("no snapshot with id or name '{key}'")).at(&self.path)
            })?
            .clone();
        if let Some(problem) = snap.l1_refusal(self.file_len) {
            return Err(corrupt(problem).at(&self.path));
        }
        self.l1 = l1::read_table(&*self.file, snap.l1_table_offset, snap.l1_size)
            .and_then(|t| l1::check_distinct(&t).map(|_| t))
            .map_err(|k| k.at(&self.path))?;
        self.cache.forget(self.cache_key);
        Ok(())
    }

    /// How the guest range starting at `guest` is stored here: a status and the length
    /// (1..=`max`) of the run it applies to. Runs end at L2 table boundaries, at the end of a
    /// compressed cluster, and where host offsets stop being contiguous.
    /// Keeps this image's L2 tables in `cache` (shared with the other images of a chain, so
    /// that one budget bounds them all).
    pub fn share_cache(&mut self, cache: Arc<L2Cache>) {
        self.cache = cache;
    }

    pub fn status(&self, guest: u64, max: u64) -> Result<(Status, u64)> {
        let f = &self.format;
        let span = self.header.l1_span();
        let l1_index = guest / span;
        let limit = max.min((l1_index + 1) * span - guest);
        let unallocated = Ok((Status::Unallocated { host: None }, limit));
        let Some(entry) = self.l1.get(l1_index as usize) else {
            return unallocated;
        };
        let Some(l2_offset) = entry
            .checked_l2_offset(l1_index as usize, f.cluster_size(), self.file_len)
            .map_err(|k| k.at(&self.path))?
        else {
            return unallocated;
        };
        let table = self.l2_table(l2_offset)?;
        mapping::run(&self.format, &table, guest, limit).map_err(|k| k.at(&self.path))
    }

    fn l2_table(&self, offset: u64) -> Result<std::sync::Arc<L2Table>> {
        self.cache.get_or_load(self.cache_key, offset, || {
            L2Table::read(
                &*self.file,
                offset,
                self.cluster_size(),
                self.format.extended,
            )
            .map_err(|e| ErrorKind::Io(e).at(&self.path))
        })
    }

    /// Whether the image or its data file is read over the network.
    pub fn is_remote(&self) -> bool {
        self.file.is_remote() || self.data_storage().is_remote()
    }

    /// The storage uncompressed data lives in (the data file, or the image itself).
    pub fn data_storage(&self) -> &dyn Storage {
        match &self.data_file {
            Some(d) => &*d.storage,
            None => &*self.file,
        }
    }

    /// How the image is encrypted (`None`: it is not).
    pub fn encryption(&self) -> Option<&Encryption> {
        self.encryption.as_ref()
    }

    /// The cipher of an encrypted image (`None`: plaintext); an error when no passphrase
    /// unlocked it.
    pub fn crypt(&self) -> Result<Option<&std::sync::Arc<super::crypto::Crypt>>> {
        match &self.encryption {
            None => Ok(None),
            Some(e) => e
                .crypt()
                .map(Some)
                .map_err(|m| ErrorKind::Encryption(m).at(&self.path)),
        }
    }

    /// How a new image keeps this image's LUKS header (same passphrases, same master key);
    /// `None` when it has none to share (plaintext, legacy AES).
    pub fn keying_to_share(&self) -> Result<Option<super::crypto::Keying>> {
        let Some((e, (offset, _))) = self.encryption.as_ref().and_then(|e| Some((e, e.area?)))
        else {
            return Ok(None);
        };
        e.keying_to_share(&|at, buf| read_exact(&*self.file, buf, offset + at, "LUKS header"))
            .map_err(|m| ErrorKind::Encryption(m).at(&self.path))
    }

    /// Reads uncompressed guest data stored at `host` (a [`Status::Data`] run at guest offset
    /// `guest`), decrypted. Bytes past the end of the file read as zeros, as in QEMU, but a
    /// run that starts past it is corrupt.
    pub fn read_data(&self, buf: &mut [u8], host: u64, guest: u64) -> Result<()> {
        let crypt = self.crypt()?.map(|c| &**c);
        let (storage, path) = self.data_source(host, buf.len() as u64)?;
        super::crypto::read_stored(crypt, storage, buf, host, guest)
            .map_err(|e| ErrorKind::Io(e).at(path))
    }

    /// Where `len` bytes of guest data at `host` are stored (the image or its data file),
    /// after the checks every read makes: inside the file, not on metadata. Bytes past the
    /// end of the file read as zeros.
    pub fn data_source(&self, host: u64, len: u64) -> Result<(&dyn Storage, &Path)> {
        let (storage, path) = match &self.data_file {
            Some(d) => (&*d.storage, d.path.as_path()),
            None => (&*self.file, self.path.as_path()),
        };
        match self.data_refusal(host, len) {
            Some(refusal) => Err(corrupt(refusal.message()).at(path)),
            None => Ok((storage, path)),
        }
    }

    /// Why guest data at `[host, host + len)` (uncompressed, in the image or its data file)
    /// is refused: it starts past the end of the file, or lies on metadata of the image file.
    /// `check` reports the same of every allocated cluster.
    pub fn data_refusal(&self, host: u64, len: u64) -> Option<Refusal> {
        let file_len = self.data_file.as_ref().map_or(self.file_len, |d| d.len);
        if host >= file_len {
            return Some(Refusal::PastEnd(format!(
                "data cluster at host offset {host:#x} lies past the end of the file ({file_len} bytes)"
            )));
        }
        match self.data_file {
            Some(_) => None,
            None => self.overlap_refusal("data", host, len),
        }
    }

    /// Why a compressed cluster is refused: it starts past the end of the file, or its bytes
    /// (up to the end of the file) lie on metadata.
    pub fn compressed_refusal(&self, d: CompressedDescriptor) -> Option<Refusal> {
        if d.offset >= self.file_len {
            return Some(Refusal::PastEnd(format!(
                "compressed cluster at host offset {:#x} lies past the end of the file ({} bytes)",
                d.offset, self.file_len
            )));
        }
        let len = d.max_len.min(self.file_len - d.offset);
        self.overlap_refusal("compressed", d.offset, len)
    }

    fn overlap_refusal(&self, what: &str, host: u64, len: u64) -> Option<Refusal> {
        self.metadata.overlap(host, len).map(|structure| {
            Refusal::Overlap(format!(
                "{what} cluster at host offset {host:#x} overlaps {structure}"
            ))
        })
    }

    /// Decompresses one compressed cluster into `out` (one cluster long).
    pub fn read_compressed(&self, d: CompressedDescriptor, out: &mut [u8]) -> Result<()> {
        if let Some(refusal) = self.compressed_refusal(d) {
            return Err(corrupt(refusal.message()).at(&self.path));
        }
        let len = d.max_len.min(self.file_len - d.offset) as usize;
        let mut input = vec![0u8; len];
        read_exact(&*self.file, &mut input, d.offset, "compressed cluster")
            .map_err(|e| ErrorKind::Io(e).at(&self.path))?;
        self.header
            .compression_type
            .decompress(&input, out)
            .map_err(|m| {
                corrupt(format!(
                    "compressed cluster at host offset {:#x}: {m}",
                    d.offset
                ))
                .at(&self.path)
            })
    }

    /// The refcount of host cluster number `cluster` (0 when no refcount block covers it).
    pub fn refcount(&self, cluster: u64) -> Result<u64> {
        let at = |k: ErrorKind| k.at(&self.path);
        let f = RefcountFormat {
            cluster_bits: self.header.cluster_bits,
            order: self.header.refcount_order,
        };
        let (table_index, block_index) = f.locate(cluster);
        if table_index >= self.header.refcount_table_clusters as u64 * self.cluster_size() / 8 {
            return Ok(0);
        }
        let mut entry = [0u8; 8];
        read_exact(
            &*self.file,
            &mut entry,
            self.header.refcount_table_offset + table_index * 8,
            "refcount table",
        )
        .map_err(|e| at(e.into()))?;
        let block = u64::from_be_bytes(entry) & refcount::OFFSET_MASK;
        if block == 0 {
            return Ok(0);
        }
        if let Some(problem) = refcount::block_refusal(block, self.cluster_size(), self.file_len) {
            return Err(at(corrupt(problem)));
        }
        let mut bytes = vec![0u8; self.cluster_size() as usize];
        read_exact(&*self.file, &mut bytes, block, "refcount block").map_err(|e| at(e.into()))?;
        Ok(refcount::get(&bytes, block_index, f.order))
    }
}

/// Resolves a file name stored in an image (backing or data file) as QEMU does for backing
/// files: absolute names as they are, relative ones against the image's own directory.
pub fn resolve_relative(image: &Path, name: &Path) -> PathBuf {
    if name.is_absolute() {
        name.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new("")).join(name)
    }
}
