//! What the server exports: restore points of backup folders, or an image with its backing
//! chain, each opened once as a [`Disk`] and shared by every connection and request.
//!
//! An export answers the two questions the transmission phase asks: the bytes of a range (as
//! data pieces and holes, so a structured reply never sends zeros it can describe) and its
//! block status in the metadata contexts a client selected. Both come from the merged map of
//! the chain ([`Disk::extent_at`]), so a hole costs its metadata, never a read.

use super::error::ServeError;
use super::proto::tflag;
use crate::qcow2::{Disk, Format, OpenOptions, Result};
use crate::store::{self, ChainSelect};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The largest read (and block status range with data) the server answers: the spec's
/// "never a denial of service" bound.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The preferred request size advertised: a typical qcow2 cluster.
const PREFERRED_BLOCK: u32 = 64 << 10;
/// At most this many block status descriptors in one reply (the spec allows 2^20).
const MAX_DESCRIPTORS: usize = 1 << 16;

/// A metadata context a client can select for `NBD_CMD_BLOCK_STATUS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`: bit 0 hole (no stored data), bit 1 reads as zeros.
    Allocation,
    /// `qemu:allocation-depth`: 0 unallocated in the whole chain, else 1 + the depth of the
    /// layer that provides the bytes (1 = the restore point's own file).
    Depth,
}

impl Context {
    pub const ALL: [Context; 2] = [Context::Allocation, Context::Depth];

    pub fn id(self) -> u32 {
        match self {
            Context::Allocation => 1,
            Context::Depth => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Context::Allocation => "base:allocation",
            Context::Depth => "qemu:allocation-depth",
        }
    }

    /// The contexts a `NBD_OPT_LIST_META_CONTEXT` query names: a full name, or a namespace
    /// (`base:`, `qemu:`) for all of its contexts. Unknown namespaces match nothing.
    pub fn listed_by(query: &[u8]) -> impl Iterator<Item = Context> + '_ {
        Context::ALL.into_iter().filter(move |c| {
            let name = c.name().as_bytes();
            name == query || (query.ends_with(b":") && name.starts_with(query))
        })
    }

    /// The context a `NBD_OPT_SET_META_CONTEXT` query selects: full names only.
    pub fn selected_by(query: &[u8]) -> Option<Context> {
        Context::ALL
            .into_iter()
            .find(|c| c.name().as_bytes() == query)
    }
}

/// A run of a read: data to send, or (with structured replies) a hole the client fills with
/// zeros itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub len: u64,
    pub hole: bool,
}

/// Where a run of a read comes from, for replies that send file data without copying it
/// through user space.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// Zeros: sent as a hole.
    Hole,
    /// Stored as it is in this file at this offset.
    File(&'a std::fs::File, u64),
    /// Must be read (compressed clusters, storage without a file).
    Read,
}

/// A run of a read and its source.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    pub offset: u64,
    pub len: u64,
    pub source: Source<'a>,
}

/// One disk served read-only.
pub struct Export {
    names: Vec<String>,
    description: String,
    disk: Disk,
}

impl Export {
    pub fn new(names: Vec<String>, description: String, disk: Disk) -> Export {
        Export {
            names,
            description,
            disk,
        }
    }

    /// The names clients reach it by (the empty name is the default export).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn size(&self) -> u64 {
        self.disk.size()
    }

    /// Transmission flags: read-only, and safe for many connections at once (nothing changes).
    pub fn flags(&self) -> u16 {
        tflag::HAS_FLAGS
            | tflag::READ_ONLY
            | tflag::SEND_FLUSH
            | tflag::SEND_DF
            | tflag::CAN_MULTI_CONN
            | tflag::SEND_CACHE
    }

    /// Block size constraints: any byte is addressable; requests of up to [`MAX_PAYLOAD`].
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        (1, PREFERRED_BLOCK, MAX_PAYLOAD)
    }

    /// Guest bytes at `offset` (within the export).
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.disk.read_at(buf, offset)
    }

    /// The data pieces and holes of `[offset, offset + len)`, in order, adjacent ones of the
    /// same kind merged (for replies that read all data into a buffer).
    pub fn pieces(&self, offset: u64, len: u64) -> Result<Vec<Piece>> {
        let mut out: Vec<Piece> = Vec::new();
        for r in self.runs(offset, len)? {
            let hole = matches!(r.source, Source::Hole);
            match out.last_mut() {
                Some(p) if p.hole == hole => p.len += r.len,
                _ => out.push(Piece {
                    offset: r.offset,
                    len: r.len,
                    hole,
                }),
            }
        }
        Ok(out)
    }

    /// The runs of `[offset, offset + len)` with their sources, adjacent reads merged.
    pub fn runs(&self, offset: u64, len: u64) -> Result<Vec<Run<'_>>> {
        let mut out: Vec<Run> = Vec::new();
        self.disk.for_each_extent(offset, len, |e| {
            let source = if e.zero {
                Source::Hole
            } else {
                match self.disk.direct_source(&e)? {
                    Some((f, host)) => Source::File(f, host),
                    None => Source::Read,
                }
            };
            match (out.last_mut(), source) {
                (Some(r), Source::Hole) if matches!(r.source, Source::Hole) => r.len += e.length,
                (Some(r), Source::Read) if matches!(r.source, Source::Read) => r.len += e.length,
                _ => out.push(Run {
                    offset: e.start,
                    len: e.length,
                    source,
                }),
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Block status descriptors `(length, flags)` of `[offset, offset + len)` for each
    /// context, in the order given; at most one descriptor each with `one`. Stops early (the
    /// spec allows a shorter answer) after [`MAX_DESCRIPTORS`] in any context.
    pub fn status(
        &self,
        offset: u64,
        len: u64,
        contexts: &[Context],
        one: bool,
    ) -> Result<Vec<Vec<(u32, u32)>>> {
        let mut out: Vec<Vec<(u32, u32)>> = vec![Vec::new(); contexts.len()];
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let e = self.disk.extent_at(pos, end - pos)?;
            let mut full = false;
            for (ctx, descs) in contexts.iter().zip(out.iter_mut()) {
                let flags = match ctx {
                    Context::Allocation => u32::from(!e.data) | (u32::from(e.zero) << 1),
                    Context::Depth => {
                        if e.present {
                            e.depth + 1
                        } else {
                            0
                        }
                    }
                };
                // The request length is 32-bit, so a descriptor never outgrows it.
                let n = e.length as u32;
                match descs.last_mut() {
                    Some(d) if d.1 == flags => d.0 += n,
                    _ => descs.push((n, flags)),
                }
                full |= (one && descs.len() > 1) || descs.len() > MAX_DESCRIPTORS;
            }
            if full {
                for descs in &mut out {
                    let keep = if one { 1 } else { MAX_DESCRIPTORS };
                    descs.truncate(keep);
                }
                break;
            }
            pos += e.length;
        }
        if one {
            // Contexts may split at different places: each keeps its own first run, which is
            // still exact (a shorter answer than asked is allowed).
            for descs in &mut out {
                descs.truncate(1);
            }
        }
        Ok(out)
    }
}

/// The exports of one server, looked up by name.
pub struct Exports {
    list: Vec<Arc<Export>>,
}

impl Exports {
    pub fn find(&self, name: &[u8]) -> Option<&Arc<Export>> {
        self.list
            .iter()
            .find(|e| e.names.iter().any(|n| n.as_bytes() == name))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.list.iter()
    }

    /// One export: `disk`, reachable by the empty name and `name`.
    pub fn single(disk: Disk, description: String, name: Option<&str>) -> Exports {
        let mut names = vec![String::new()];
        names.extend(name.filter(|n| !n.is_empty()).map(str::to_string));
        Exports {
            list: vec![Arc::new(Export::new(names, description, disk))],
        }
    }

    /// An image with its backing chain (format probed unless given).
    pub fn of_image(
        path: &Path,
        format: Option<Format>,
        name: Option<&str>,
    ) -> Result<Exports, ServeError> {
        let disk = Disk::open_with(
            path,
            &OpenOptions {
                format,
                ..Default::default()
            },
        )?;
        let description = format!("{} ({} layers)", path.display(), disk.chain().count());
        Ok(Exports::single(disk, description, name))
    }

    /// The restore point of a backup folder of one disk, or, for a backup target holding
    /// several disk folders, one export per disk named after its folder.
    pub fn of_dir(
        dir: &Path,
        select: &ChainSelect,
        name: Option<&str>,
    ) -> Result<Exports, ServeError> {
        let dirs = store::folder::backup_dirs_below(dir, 1)?;
        if dirs.first().map(PathBuf::as_path) == Some(dir) || dirs.is_empty() {
            let (disk, description) = restore_point(dir, select)?;
            return Ok(Exports::single(disk, description, name));
        }
        if name.is_some() {
            return Err(ServeError::Refused(format!(
                "--name names the one export of a disk folder; {} holds {} disks, served under their folder names",
                dir.display(),
                dirs.len()
            )));
        }
        let mut list = Vec::with_capacity(dirs.len());
        for d in &dirs {
            let folder = d.file_name().unwrap_or_default().to_string_lossy();
            let (disk, description) = restore_point(d, select)?;
            list.push(Arc::new(Export::new(
                vec![folder.into_owned()],
                description,
                disk,
            )));
        }
        Ok(Exports { list })
    }
}

/// Opens the restore point of one disk folder, described for `NBD_OPT_LIST`.
fn restore_point(dir: &Path, select: &ChainSelect) -> Result<(Disk, String), ServeError> {
    let store::RestorePoint { chain, disk, .. } = store::open_restore_point(dir, select)?;
    let point = chain.files.last().map(|f| f.name.as_str()).unwrap_or("");
    let description = format!(
        "restore point {point} of {} ({} files)",
        dir.display(),
        chain.files.len()
    );
    Ok((disk, description))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_context_queries() {
        let all: Vec<_> = Context::listed_by(b"qemu:").collect();
        assert_eq!(all, [Context::Depth]);
        let base: Vec<_> = Context::listed_by(b"base:").collect();
        assert_eq!(base, [Context::Allocation]);
        assert_eq!(Context::listed_by(b"x-other:").count(), 0);
        assert_eq!(Context::listed_by(b"base:allocation").count(), 1);
        assert_eq!(Context::selected_by(b"base:"), None);
        assert_eq!(
            Context::selected_by(b"qemu:allocation-depth"),
            Some(Context::Depth)
        );
    }
}
