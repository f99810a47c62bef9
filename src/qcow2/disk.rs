//! A guest disk: an image together with its backing chain.
//!
//! This is the API the rest of the project reads through. [`Disk::read_at`] returns the
//! guest-visible bytes and may be called from many threads at once; [`Disk::extent_at`] and
//! [`Disk::for_each_extent`] describe where every byte comes from (layer, host offset,
//! compressed, zero), with the same semantics as `qemu-img map`. Backing files are resolved the
//! way QEMU resolves them, with loop detection and a depth limit, and every failure names the
//! image whose reference could not be followed.

use super::error::{ErrorKind, Result};
use super::header::MAGIC;
use super::image::{resolve_relative, Qcow2, Status};
use super::merged::Windows;
use super::raw::Raw;
use super::storage::Storage;
use serde::Serialize;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Backing chains deeper than this are refused (a daily backup for over a year fits).
pub const MAX_CHAIN_DEPTH: usize = 1000;

/// Image formats this tool reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    /// Parses a format name as QEMU writes it in the backing format extension.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "qcow2" => Some(Format::Qcow2),
            "raw" => Some(Format::Raw),
            _ => None,
        }
    }
}

/// The storage of one layer of a chain.
pub enum Layer {
    Qcow2(Box<Qcow2>),
    Raw(Raw),
}

/// How to open a disk.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The format of the top image; probed when `None`.
    pub format: Option<Format>,
    /// Open only the top image: unallocated clusters then read as zeros.
    pub no_backing: bool,
    /// Read the top image as it was at this internal snapshot (id or name).
    pub snapshot: Option<String>,
}

/// One layer of the guest-visible view of a byte range, as `qemu-img map --output=json`
/// describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    /// Which layer provides the bytes: 0 the top image, 1 its backing file, ...
    pub depth: u32,
    /// Allocated (data or zero) in some layer.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by stored data.
    pub data: bool,
    pub compressed: bool,
    /// Host offset in the layer's file (or its external data file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl Extent {
    /// Whether `next` directly continues this extent (qemu-img's merge rule).
    pub fn mergeable(&self, next: &Extent) -> bool {
        self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (Some(a), Some(b)) => a + self.length == b,
                (None, None) => true,
                _ => false,
            }
    }
}

/// One file of a chain: its path and how it is stored.
pub struct Image {
    path: PathBuf,
    layer: Layer,
}

impl Image {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn layer(&self) -> &Layer {
        &self.layer
    }

    pub fn qcow2(&self) -> Option<&Qcow2> {
        match &self.layer {
            Layer::Qcow2(q) => Some(q),
            Layer::Raw(_) => None,
        }
    }

    pub fn format(&self) -> Format {
        match self.layer {
            Layer::Qcow2(_) => Format::Qcow2,
            Layer::Raw(_) => Format::Raw,
        }
    }

    /// Guest-visible size of this file on its own.
    pub fn size(&self) -> u64 {
        match &self.layer {
            Layer::Qcow2(q) => q.size(),
            Layer::Raw(r) => r.size(),
        }
    }

    /// Whether reads of this file are network round trips (see [`Storage::is_remote`]).
    pub fn is_remote(&self) -> bool {
        match &self.layer {
            Layer::Qcow2(q) => q.is_remote(),
            Layer::Raw(r) => r.storage().is_remote(),
        }
    }

    /// Bytes the file occupies on the host.
    pub fn allocated_bytes(&self) -> Option<u64> {
        match &self.layer {
            Layer::Qcow2(q) => q.allocated_bytes(),
            Layer::Raw(r) => r.allocated_bytes(),
        }
    }
}

/// An opened image with its backing chain: `images[0]` is the top, each next one the backing
/// file of the one before. Every walk down the chain is a loop, not a recursion, so a chain
/// of a thousand backups needs no deep stack.
pub struct Disk {
    images: Vec<Image>,
    /// The merged map, built a window at a time (see [`super::merged`]).
    windows: Windows,
}

impl Disk {
    /// Opens an image (format probed) and its whole backing chain.
    pub fn open(path: &Path) -> Result<Disk> {
        Disk::open_with(path, &OpenOptions::default())
    }

    /// Opens one file alone (format probed), ignoring any backing file it names: its header,
    /// tables and own clusters.
    pub fn open_alone(path: &Path) -> Result<Disk> {
        Disk::open_with(
            path,
            &OpenOptions {
                no_backing: true,
                ..Default::default()
            },
        )
    }

    pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Disk> {
        let mut images: Vec<Image> = Vec::new();
        let mut seen: Vec<PathBuf> = Vec::new();
        let mut next = Some((path.to_path_buf(), opts.format));
        // Images opened ahead (see `open_ahead`), taken when the chain reaches them.
        let mut ahead: HashMap<PathBuf, Result<Image>> = HashMap::new();
        while let Some((path, format)) = next.take() {
            if images.len() > MAX_CHAIN_DEPTH {
                return Err(ErrorKind::Backing(format!(
                    "backing chain deeper than {MAX_CHAIN_DEPTH} images"
                ))
                .at(&images[0].path));
            }
            let image = match ahead.remove(&path) {
                Some(Ok(image)) if format.is_none_or(|f| f == image.format()) => {
                    let canonical =
                        super::protocol::identity(&path).map_err(|e| ErrorKind::Io(e).at(&path))?;
                    enter(&path, &mut seen, canonical)?;
                    image
                }
                // Not opened ahead, or failed there: opened here, with its own error.
                _ => open_image(&path, format, &mut seen)?,
            };
            if !opts.no_backing {
                if let Some(q) = image.qcow2() {
                    if let Some(name) = q.backing_name() {
                        next = Some(backing_of(&path, q, name)?);
                        if images.is_empty() {
                            ahead = open_ahead(&path);
                        }
                    }
                }
            }
            images.push(image);
        }
        let mut disk = Disk::of(images);
        if let Some(key) = &opts.snapshot {
            disk.select_snapshot(key)?;
        }
        Ok(disk)
    }

    /// Stacks independent images into one disk: `chain[0]` at the bottom, each next one laid
    /// over the previous, whatever backing files they name themselves. This is how a backup
    /// directory restores: its order is authoritative (the original tool's INCs have no
    /// backing file at all).
    ///
    /// The images are opened in parallel when they are all remote (an object store answers
    /// many requests at once, and a deep chain would otherwise wait its depth in round trips).
    pub fn stack(chain: &[PathBuf]) -> Result<Disk> {
        // Opened oldest first, so that the newest images' blocks, which a restore reads first,
        // are the ones an object store's block cache still holds when the opens are done.
        let opened = super::fanout::map(
            chain,
            super::protocol::in_flight(chain),
            |path| -> Result<(Image, PathBuf)> {
                let canonical =
                    super::protocol::identity(path).map_err(|e| ErrorKind::Io(e).at(path))?;
                Ok((open_layer(path, None)?, canonical))
            },
        );
        let mut seen = Vec::new();
        let mut images = Vec::with_capacity(chain.len());
        for (path, opened) in chain.iter().zip(opened).rev() {
            let (image, canonical) = opened?;
            enter(path, &mut seen, canonical)?;
            images.push(image);
        }
        if images.is_empty() {
            return Err(ErrorKind::NotFound("no images to stack".into()).at(Path::new(".")));
        }
        Ok(Disk::of(images))
    }

    fn of(mut images: Vec<Image>) -> Disk {
        if images.len() > 1 {
            // One budget for the chain's L2 tables, however deep it is.
            let shared = std::sync::Arc::new(super::cache::L2Cache::new(super::cache::BUDGET));
            for image in &mut images {
                if let Layer::Qcow2(q) = &mut image.layer {
                    q.share_cache(shared.clone());
                }
            }
        }
        Disk {
            windows: Windows::new(&images),
            images,
        }
    }

    /// Opens a qcow2 image held in memory, without backing file or data file (for fuzzing).
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Disk> {
        let path = Path::new(name);
        let q = Qcow2::from_storage(path, Box::new(bytes), &|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "no files available",
            ))
        })?;
        Ok(Disk::of(vec![Image {
            path: path.to_path_buf(),
            layer: Layer::Qcow2(Box::new(q)),
        }]))
    }

    /// Whether any layer is read over the network.
    pub fn is_remote(&self) -> bool {
        self.images.iter().any(Image::is_remote)
    }

    /// Switches the top image to its view at an internal snapshot (id or name).
    pub fn select_snapshot(&mut self, key: &str) -> Result<()> {
        let top = &mut self.images[0];
        match &mut top.layer {
            Layer::Qcow2(q) => q.select_snapshot(key)?,
            Layer::Raw(_) => {
                return Err(
                    ErrorKind::Unsupported("raw images have no internal snapshots".into())
                        .at(&top.path),
                )
            }
        }
        self.windows = Windows::new(&self.images);
        Ok(())
    }

    /// The top image.
    pub fn top(&self) -> &Image {
        &self.images[0]
    }

    pub fn path(&self) -> &Path {
        self.top().path()
    }

    pub fn qcow2(&self) -> Option<&Qcow2> {
        self.top().qcow2()
    }

    pub fn format(&self) -> Format {
        self.top().format()
    }

    /// The top image, then its backing file, and so on down the chain.
    pub fn chain(&self) -> std::slice::Iter<'_, Image> {
        self.images.iter()
    }

    /// The file holding the uncompressed data of layer `depth` (its external data file if it
    /// has one): where an [`Extent`]'s `offset` points.
    /// `None` for an encrypted layer: its bytes as stored are ciphertext.
    pub fn data_file_of(&self, depth: u32) -> Option<&File> {
        match &self.images.get(depth as usize)?.layer {
            Layer::Qcow2(q) if q.encryption().is_some() => None,
            Layer::Qcow2(q) => q.data_storage().as_file(),
            Layer::Raw(r) => r.storage().as_file(),
        }
    }

    /// The file and offset that hold an extent's bytes as they are (uncompressed data in a
    /// local file), checked as a read checks them, for copies that bypass user space
    /// (`sendfile`); `None` when the bytes must be read (compressed) or are zeros.
    pub fn direct_source(&self, e: &Extent) -> Result<Option<(&File, u64)>> {
        let (Some(host), false, true) = (e.offset, e.compressed, e.data) else {
            return Ok(None);
        };
        let storage = match &self.images[e.depth as usize].layer {
            Layer::Qcow2(q) if q.encryption().is_some() => return Ok(None),
            Layer::Qcow2(q) => q.data_source(host, e.length)?.0,
            Layer::Raw(r) => r.storage(),
        };
        Ok(storage.as_file().map(|f| (f, host)))
    }

    /// Guest-visible size (the top image's).
    pub fn size(&self) -> u64 {
        self.top().size()
    }

    /// Reads guest data at `offset`; bytes past the end of the disk read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let inside = (buf.len() as u64).min(self.size().saturating_sub(offset));
        buf[inside as usize..].fill(0);
        let mut pos = 0u64;
        while pos < inside {
            let e = self.extent_at(offset + pos, inside - pos)?;
            self.read_extent(&e, &mut buf[pos as usize..(pos + e.length) as usize])?;
            pos += e.length;
        }
        Ok(())
    }

    /// Reads the bytes of one extent (as [`Disk::extent_at`] returned it) into `dst`.
    fn read_extent(&self, e: &Extent, dst: &mut [u8]) -> Result<()> {
        if !e.data {
            dst.fill(0);
            return Ok(());
        }
        let q = match &self.images[e.depth as usize].layer {
            Layer::Raw(r) => return r.read(dst, e.start),
            Layer::Qcow2(q) => q,
        };
        if !e.compressed {
            let host = e.offset.expect("uncompressed data has a host offset");
            return q.read_data(dst, host, e.start);
        }
        // Extents of compressed data never cross a cluster: its descriptor is the layer's.
        let Status::Compressed(d) = q.status(e.start, e.length)?.0 else {
            return Err(ErrorKind::Corrupt(format!(
                "guest offset {:#x}: the mapping changed while the image was read",
                e.start
            ))
            .at(&self.images[e.depth as usize].path));
        };
        let cs = q.cluster_size();
        let mut cluster = vec![0u8; cs as usize];
        q.read_compressed(d, &mut cluster)?;
        let within = (e.start % cs) as usize;
        dst.copy_from_slice(&cluster[within..within + dst.len()]);
        Ok(())
    }

    /// Describes the guest range starting at `offset` (< size): the extent covers 1..=`max`
    /// bytes and is not necessarily maximal (see [`Disk::for_each_extent`]).
    pub fn extent_at(&self, offset: u64, max: u64) -> Result<Extent> {
        self.windows.extent_at(&self.images, offset, max)
    }

    /// Calls `f` with the maximal extents covering `[offset, offset + len)` (clipped to the
    /// disk size), merged as `qemu-img map` merges them. Streams: memory does not grow with the
    /// number of extents.
    pub fn for_each_extent(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(Extent) -> Result<()>,
    ) -> Result<()> {
        let end = offset.saturating_add(len).min(self.size());
        let mut pos = offset;
        let mut cur: Option<Extent> = None;
        while pos < end {
            let e = self.extent_at(pos, end - pos)?;
            pos += e.length;
            match &mut cur {
                Some(c) if c.mergeable(&e) => c.length += e.length,
                _ => {
                    if let Some(done) = cur.replace(e) {
                        f(done)?;
                    }
                }
            }
        }
        if let Some(done) = cur {
            f(done)?;
        }
        Ok(())
    }

    /// The chunks of `chunk` bytes (at multiples of `chunk`) that hold anything but zeros,
    /// in order, found from the metadata: holes and zero ranges are stepped over an extent at
    /// a time, so the cost follows the allocated data and the metadata, not the virtual size.
    pub fn data_chunks(&self, chunk: u64) -> DataChunks<'_> {
        DataChunks {
            disk: self,
            chunk,
            pos: 0,
            end: self.size(),
        }
    }

    /// Reads every range the metadata says holds data (decompressing compressed clusters), so
    /// that damage anywhere in the mapped data surfaces as an error. Chunks are read in
    /// parallel (a file in an object store is read at the store's speed, not one round trip
    /// at a time); reading stops once about `budget` bytes are read; returns the bytes read.
    pub fn read_stored(&self, budget: u64) -> Result<u64> {
        use rayon::prelude::*;
        use std::sync::atomic::{AtomicU64, Ordering};
        const STEP: u64 = 4 << 20;
        let chunks: Vec<u64> = self.data_chunks(STEP).collect::<Result<_>>()?;
        let done = AtomicU64::new(0);
        chunks.par_iter().try_for_each_init(
            || vec![0u8; STEP as usize],
            |buf, &start| {
                if done.load(Ordering::Relaxed) >= budget {
                    return Ok(());
                }
                let len = STEP.min(self.size() - start);
                let mut read = 0;
                self.for_each_extent(start, len, |e| {
                    if e.data {
                        self.read_at(&mut buf[..e.length as usize], e.start)?;
                        read += e.length;
                    }
                    Ok(())
                })?;
                done.fetch_add(read, Ordering::Relaxed);
                Ok(())
            },
        )?;
        Ok(done.into_inner().min(budget))
    }
}

/// Opens one file of a chain, refusing one already seen (a loop).
fn open_image(path: &Path, format: Option<Format>, seen: &mut Vec<PathBuf>) -> Result<Image> {
    let canonical = super::protocol::identity(path).map_err(|e| ErrorKind::Io(e).at(path))?;
    enter(path, seen, canonical)?;
    open_layer(path, format)
}

/// The images beside `top` that its backing chain likely passes through, opened in parallel
/// (none for local files): a chain in an object store is otherwise opened one round trip
/// after the other, since each image names the next.
fn open_ahead(top: &Path) -> HashMap<PathBuf, Result<Image>> {
    let mut names = super::protocol::neighbours(top, MAX_CHAIN_DEPTH);
    if names.is_empty() {
        return HashMap::new();
    }
    // Oldest first, as `Disk::stack` opens: the nearest images' blocks stay cached.
    names.reverse();
    let opened = super::fanout::map(&names, super::protocol::in_flight(&names), |p| {
        open_layer(p, None)
    });
    names.into_iter().zip(opened).collect()
}

/// Adds `path` (whose storage `canonical` names) to the files of this chain opened so far
/// (`seen`), refusing it when one of them is the same file: a backing file loop.
fn enter(path: &Path, seen: &mut Vec<PathBuf>, canonical: PathBuf) -> Result<()> {
    // Canonical paths compare as bytes (fast: a 1000-file chain checks half a million pairs).
    if let Some(first) = seen
        .iter()
        .position(|p| p.as_os_str() == canonical.as_os_str())
    {
        let cycle: Vec<String> = seen[first..]
            .iter()
            .map(PathBuf::as_path)
            .chain(std::iter::once(canonical.as_path()))
            .map(|p| p.display().to_string())
            .collect();
        return Err(
            ErrorKind::Backing(format!("backing file loop: {}", cycle.join(" -> "))).at(path),
        );
    }
    seen.push(canonical);
    Ok(())
}

/// Opens one image of a chain, without its backing file.
fn open_layer(path: &Path, format: Option<Format>) -> Result<Image> {
    let file = super::protocol::open(path).map_err(|e| ErrorKind::Io(e).at(path))?;
    if let Some(f) = file.as_file() {
        super::lock::warn_if_written(f, path);
    }
    let format = match format {
        Some(f) => f,
        None => probe(&*file).map_err(|k| k.at(path))?,
    };
    let layer = match format {
        Format::Raw => Layer::Raw(Raw::from_storage(path, file)?),
        Format::Qcow2 => Layer::Qcow2(Box::new(Qcow2::from_storage(
            path,
            file,
            &super::protocol::open,
        )?)),
    };
    Ok(Image {
        path: path.to_path_buf(),
        layer,
    })
}

/// The backing file of `q` (at `path`): where it is and which format to open it with.
fn backing_of(path: &Path, q: &Qcow2, name: &OsStr) -> Result<(PathBuf, Option<Format>)> {
    let target = backing_path(path, name).map_err(|k| k.at(path))?;
    let format = match q.backing_format() {
        Some(f) => Some(Format::from_name(f).ok_or_else(|| {
            ErrorKind::Unsupported(format!("backing file format '{f}' is not supported")).at(path)
        })?),
        None => None,
    };
    if super::protocol::is_local(&target) && !target.exists() {
        return Err(ErrorKind::Backing(format!(
            "backing file '{}' (resolved to {}) does not exist",
            name.to_string_lossy(),
            target.display()
        ))
        .at(path));
    }
    Ok((target, format))
}

/// Where a backing file name points, resolved like QEMU: protocol and `json:` names are
/// refused, absolute names used as they are, relative ones joined to the image's directory.
/// See [`Disk::data_chunks`].
pub struct DataChunks<'a> {
    disk: &'a Disk,
    chunk: u64,
    pos: u64,
    end: u64,
}

impl Iterator for DataChunks<'_> {
    /// A chunk's start; an error ends the iteration.
    type Item = Result<u64>;

    fn next(&mut self) -> Option<Result<u64>> {
        while self.pos < self.end {
            let e = match self.disk.extent_at(self.pos, self.end - self.pos) {
                Ok(e) => e,
                Err(err) => {
                    self.pos = self.end;
                    return Some(Err(err));
                }
            };
            if !e.zero {
                let start = self.pos / self.chunk * self.chunk;
                self.pos = start + self.chunk;
                return Some(Ok(start));
            }
            self.pos += e.length;
        }
        None
    }
}

pub fn backing_path(image: &Path, name: &OsStr) -> Result<PathBuf, ErrorKind> {
    let bytes = name.as_bytes();
    if bytes.starts_with(b"json:") {
        return Err(ErrorKind::Unsupported(format!(
            "json: backing file names are not supported ({})",
            name.to_string_lossy()
        )));
    }
    if let Some(i) = bytes.iter().position(|&c| c == b':' || c == b'/') {
        if bytes[i] == b':' {
            return Err(ErrorKind::Unsupported(format!(
                "backing file '{}' uses a protocol, only local files are supported",
                name.to_string_lossy()
            )));
        }
    }
    Ok(resolve_relative(image, Path::new(name)))
}

/// Recognises qcow2 by its magic; refuses other image formats rather than reading their
/// metadata as guest data; anything else is raw.
fn probe(file: &dyn Storage) -> Result<Format, ErrorKind> {
    let mut magic = [0u8; 8];
    let n = file.read_at(&mut magic, 0)?;
    let magic = &magic[..n];
    if magic.len() >= 4 && u32::from_be_bytes(magic[..4].try_into().unwrap()) == MAGIC {
        return Ok(Format::Qcow2);
    }
    let others: [(&[u8], &str); 6] = [
        (b"KDMV", "vmdk"),
        (b"vhdxfile", "vhdx"),
        (b"QED\0", "qed"),
        (b"LUKS\xba\xbe", "luks"),
        (b"conectix", "vpc"),
        (b"<<< ", "vdi"),
    ];
    for (sig, name) in others {
        if magic.starts_with(sig) {
            return Err(ErrorKind::Unsupported(format!(
                "{name} images are not supported (only qcow2 and raw)"
            )));
        }
    }
    Ok(Format::Raw)
}
