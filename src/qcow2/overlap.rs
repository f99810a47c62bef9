//! Where an image keeps its metadata, so that guest data pointing there is refused.
//!
//! In a valid image no data cluster shares host bytes with the header, the L1 or refcount
//! table, the snapshot table or an L2 table. A damaged or hostile image may point a data (or
//! compressed) cluster at one of them; QEMU checks this before writes only, so a read would
//! silently hand metadata to the guest — and a restore would write it into the new disk. The
//! reader refuses such clusters with the structure they overlap, and L2 tables that lie on
//! other metadata when it opens the image.

use super::bitmap::Bitmap;
use super::error::{corrupt, ErrorKind};
use super::ext::BitmapsExt;
use super::header::Header;
use super::l1::L1Entry;
use super::snapshot::Snapshot;

/// Host byte ranges holding metadata, sorted and merged.
#[derive(Debug, Default)]
pub struct Metadata {
    ranges: Vec<(u64, u64, &'static str)>,
}

/// The image's metadata as the reader finds it at open.
pub struct Structures<'a> {
    pub header: &'a Header,
    /// The LUKS header and key material (offset, length).
    pub crypto: Option<(u64, u64)>,
    pub l1: &'a [L1Entry],
    pub snapshots: &'a [Snapshot],
    /// The bitmap directory and its bitmaps, when they are in use.
    pub bitmaps: Option<(&'a BitmapsExt, &'a [Bitmap])>,
}

impl Metadata {
    /// Collects the metadata ranges. An L2 table that lies on any other structure whose place
    /// the header or its extensions give (the header, an L1, refcount or bitmap table, the
    /// snapshot table) is refused: read through, it would hand that structure's bytes to the
    /// guest as data. A refcount block on an L2 table is the refcount table's damage: reads
    /// do not use refcounts and stay right, `check` reports it and writers refuse the image.
    pub fn new(s: &Structures) -> Result<Metadata, ErrorKind> {
        let (metadata, problems) = Metadata::collect(s);
        match problems.into_iter().next() {
            Some(problem) => Err(corrupt(problem)),
            None => Ok(metadata),
        }
    }

    /// The ranges, and every L2 table that lies on another structure as a problem (what
    /// [`Metadata::new`] refuses), for `check`, which reports them all.
    pub fn collect(s: &Structures) -> (Metadata, Vec<String>) {
        let h = s.header;
        let cs = h.cluster_size();
        // Offsets come from the file: a snapshot's L1 offset is not validated on open (it is
        // only read when the snapshot is), so ends saturate instead of overflowing.
        let range = |start: u64, len: u64, what| (start, start.saturating_add(len), what);
        let mut r = vec![range(0, cs, "the header")];
        if h.l1_size > 0 {
            r.push(range(
                h.l1_table_offset,
                h.l1_size as u64 * 8,
                "the L1 table",
            ));
        }
        if h.refcount_table_clusters > 0 {
            let len = h.refcount_table_clusters as u64 * cs;
            r.push(range(h.refcount_table_offset, len, "the refcount table"));
        }
        if let Some((offset, len)) = s.crypto {
            r.push(range(offset, len, "the LUKS header"));
        }
        if h.nb_snapshots > 0 {
            r.push(range(h.snapshots_offset, cs, "the snapshot table"));
        }
        for snap in s.snapshots.iter().filter(|s| s.l1_size > 0) {
            let len = snap.l1_size as u64 * 8;
            r.push(range(snap.l1_table_offset, len, "a snapshot's L1 table"));
        }
        if let Some((ext, bitmaps)) = s.bitmaps {
            r.push(range(
                ext.directory_offset,
                ext.directory_size,
                "the bitmap directory",
            ));
            r.extend(
                bitmaps
                    .iter()
                    .map(|b| range(b.table_offset, b.table_size as u64 * 8, "a bitmap table")),
            );
        }
        let others = Metadata::merged(r.clone());
        let mut problems = Vec::new();
        for (i, e) in s.l1.iter().enumerate() {
            let o = e.l2_offset();
            if o == 0 {
                continue;
            }
            if let Some(what) = others.overlap(o, cs) {
                problems.push(format!("L2 table at {o:#x} (L1 index {i}) overlaps {what}"));
            }
            r.push(range(o, cs, "an L2 table"));
        }
        (Metadata::merged(r), problems)
    }

    fn merged(mut r: Vec<(u64, u64, &'static str)>) -> Metadata {
        r.sort_unstable();
        let mut merged: Vec<(u64, u64, &'static str)> = Vec::with_capacity(r.len());
        for (s, e, what) in r {
            match merged.last_mut() {
                Some(last) if s < last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e, what)),
            }
        }
        Metadata { ranges: merged }
    }

    /// The metadata structure `[start, start + len)` overlaps, if any.
    pub fn overlap(&self, start: u64, len: u64) -> Option<&'static str> {
        let i = self.ranges.partition_point(|r| r.1 <= start);
        self.ranges
            .get(i)
            .filter(|r| r.0 < start.saturating_add(len))
            .map(|r| r.2)
    }
}
