//! Opening an image for writing, or creating one: the reader validates the image first
//! (and `check` must find no corruption: the writer trusts the refcounts it then keeps in
//! memory), then the writer takes the image's write locks and its metadata.

use super::Writer;
use crate::qcow2::alloc::Refcounts;
use crate::qcow2::bitmap;
use crate::qcow2::create::CreateOptions;
use crate::qcow2::disk::{Disk, OpenOptions};
use crate::qcow2::error::{ErrorKind, Result};
use crate::qcow2::header::Header;
use crate::qcow2::image::Qcow2;
use crate::qcow2::l1::{self};
use crate::qcow2::l2::L2Format;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

impl Writer {
    /// Opens an existing image for writing (its backing chain read-only, for copy-on-write of
    /// partial clusters).
    pub fn open(path: &Path) -> Result<Writer> {
        let at = |k: ErrorKind| k.at(path);
        let reader = Qcow2::open(path)?;
        let h = reader.header().clone();
        if h.corrupt() {
            return Err(at(ErrorKind::Unsupported(
                "the image is marked corrupt; it must be repaired before it is written".into(),
            )));
        }
        if h.dirty() {
            // Refcounts are not trustworthy (lazy refcounts were in use): rebuild them from
            // the mapping before allocating anything, as QEMU does on a writable open.
            tracing::warn!(
                "{}: dirty bit set, repairing refcounts first",
                path.display()
            );
            crate::qcow2::check::repair(path, crate::qcow2::check::Repair::All)?;
            return Writer::open(path);
        }
        refuse_corruptions(&reader, path)?;
        let crypt = match reader.encryption() {
            None => None,
            Some(e) if e.method == crate::qcow2::crypto::Method::Aes => {
                return Err(at(ErrorKind::Unsupported(
                    "legacy AES encrypted images are read only (convert them to LUKS)".into(),
                )))
            }
            Some(e) => Some(e.crypt().map_err(|m| at(ErrorKind::Encryption(m)))?.clone()),
        };
        let bitmaps = reader
            .extensions()
            .bitmaps
            .filter(|_| !reader.bitmaps().is_empty())
            .map(|e| (e.directory_offset, reader.bitmaps().to_vec()));
        Writer::assemble(Parts {
            path,
            header: h,
            ext: reader.extensions().clone(),
            data_file: reader.data_file().map(|d| d.path.clone()),
            backing: reader.backing_name().map(|n| {
                (
                    n.to_os_string(),
                    reader.backing_format().map(str::to_string),
                )
            }),
            snapshots: reader.snapshots().to_vec(),
            snapshot_table_len: reader.snapshot_table_len(),
            bitmaps,
            crypt,
        })
    }

    /// Creates a new image at `path` (which must not exist) and opens it for writing: the
    /// state is known from what was just written, so nothing is read back and checked (the
    /// file is not made durable; the writer's flushes do that).
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Writer> {
        let created = crate::qcow2::create::create_file(path, opts, false)?;
        let h = created.header;
        let end = if h.has_backing_file() {
            h.backing_file_offset as usize
        } else {
            created.cluster0.len()
        };
        let ext =
            crate::qcow2::ext::Extensions::parse(&created.cluster0[h.header_length as usize..end])
                .map_err(|k| k.at(path))?;
        let result = Writer::assemble(Parts {
            path,
            data_file: ext
                .data_file
                .as_ref()
                .map(|n| crate::qcow2::image::resolve_relative(path, Path::new(n))),
            backing: opts
                .backing
                .as_ref()
                .map(|(n, f)| (n.into(), f.map(|f| f.name().to_string()))),
            header: h,
            ext,
            snapshots: Vec::new(),
            snapshot_table_len: 0,
            bitmaps: None,
            crypt: created.crypt.map(std::sync::Arc::new),
        });
        if result.is_err() {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    /// A writer over an image whose header, extensions and side files are known.
    fn assemble(p: Parts) -> Result<Writer> {
        let path = p.path;
        let at = |k: ErrorKind| k.at(path);
        let h = p.header;
        let (file, mine) = crate::qcow2::lock::open_for_write(path).map_err(at)?;
        let mut ours = vec![mine];
        let data = match p.data_file {
            Some(d) => {
                let (f, mine) = crate::qcow2::lock::open_for_write(&d).map_err(|k| k.at(&d))?;
                ours.push(mine);
                Some((d, f))
            }
            None => None,
        };
        let backing = match &p.backing {
            Some((name, format)) => Some(open_backing(path, name, format.as_deref())?),
            None => None,
        };
        let refs = Refcounts::load(&file, &h).map_err(at)?;
        let l1 = l1::read_table(&file, h.l1_table_offset, h.l1_size).map_err(at)?;
        Ok(Writer {
            path: path.to_path_buf(),
            file,
            data,
            _ours: ours,
            fmt: L2Format::of(&h),
            cs: h.cluster_size(),
            header: h,
            l1,
            l1_dirty: BTreeSet::new(),
            l2: HashMap::new(),
            refs,
            backing,
            frees: Vec::new(),
            compress_pos: None,
            prepared: false,
            bitmaps: p.bitmaps,
            snapshots: p.snapshots,
            snapshot_table_len: p.snapshot_table_len,
            ext: p.ext,
            ordered: true,
            data_written: std::cell::Cell::new(false),
            drop_behind: Default::default(),
            crypt: p.crypt,
        })
    }
}

/// What a writer needs to know of its image.
struct Parts<'a> {
    path: &'a Path,
    header: Header,
    ext: crate::qcow2::ext::Extensions,
    /// The external data file, resolved.
    data_file: Option<PathBuf>,
    /// Backing file name and format, as the header names them.
    backing: Option<(std::ffi::OsString, Option<String>)>,
    snapshots: Vec<crate::qcow2::snapshot::Snapshot>,
    /// Bytes of the snapshot table on disk (entries written by others may be shorter or
    /// longer than ours: the clusters to release on replacing it are counted from this).
    snapshot_table_len: u64,
    /// Bitmap directory offset and entries, when bitmaps are in use.
    bitmaps: Option<(u64, Vec<bitmap::Bitmap>)>,
    crypt: Option<std::sync::Arc<crate::qcow2::crypto::Crypt>>,
}

/// Refuses to write an image whose metadata `check` finds corrupt. The writer trusts the
/// refcounts: a refcount block placed on the L1 table or an L2 table, or a cluster referenced
/// twice with refcount 1, would turn the next allocation or in-place write into damage to
/// other structures (QEMU catches some of this with overlap checks at write time; checking
/// first, metadata only, catches all of it before anything is touched). Leaked clusters are
/// harmless and allowed: an interrupted write leaves them.
fn refuse_corruptions(reader: &Qcow2, path: &Path) -> Result<()> {
    let report = crate::qcow2::check::check_open(reader, path)?;
    if report.corruptions == 0 && report.check_errors == 0 {
        return Ok(());
    }
    let first = report
        .messages
        .iter()
        .find(|m| m.starts_with("ERROR"))
        .map(|m| format!(" (first: {})", m.trim_start_matches("ERROR ")))
        .unwrap_or_default();
    let errors = match report.check_errors {
        0 => String::new(),
        n => format!(" and {n} unreadable structure(s)"),
    };
    Err(ErrorKind::Unsupported(format!(
        "refusing to write: check finds {} corruption(s){errors}{first}; \
         repair a copy with `qmprestore check --repair all`",
        report.corruptions
    ))
    .at(path))
}

/// Opens the backing chain `name` (with `format`) would give the image at `path`: what a
/// new backing link must pass before anything is written.
pub fn open_backing(path: &Path, name: &std::ffi::OsStr, format: Option<&str>) -> Result<Disk> {
    let target = crate::qcow2::disk::backing_path(path, name).map_err(|k| k.at(path))?;
    let format = match format {
        Some(f) => Some(crate::qcow2::Format::from_name(f).ok_or_else(|| {
            ErrorKind::Unsupported(format!("backing file format '{f}' is not supported")).at(path)
        })?),
        None => None,
    };
    Disk::open_with(
        &target,
        &OpenOptions {
            format,
            ..Default::default()
        },
    )
}
