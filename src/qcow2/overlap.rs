//! Where an image keeps its metadata, so that guest data pointing there is refused.
//!
//! In a valid image no data cluster shares host bytes with the header, the L1 or refcount
//! table, the snapshot table or an L2 table. A damaged or hostile image may point a data (or
//! compressed) cluster at one of them; QEMU checks this before writes only, so a read would
//! silently hand metadata to the guest — and a restore would write it into the new disk. The
//! reader refuses such clusters with the structure they overlap.

use super::header::Header;
use super::l1::L1Entry;
use super::snapshot::Snapshot;

/// Host byte ranges holding metadata, sorted and merged.
#[derive(Debug, Default)]
pub struct Metadata {
    ranges: Vec<(u64, u64, &'static str)>,
}

impl Metadata {
    pub fn new(h: &Header, l1: &[L1Entry], snapshots: &[Snapshot]) -> Metadata {
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
        if h.nb_snapshots > 0 {
            r.push(range(h.snapshots_offset, cs, "the snapshot table"));
        }
        for s in snapshots.iter().filter(|s| s.l1_size > 0) {
            let len = s.l1_size as u64 * 8;
            r.push(range(s.l1_table_offset, len, "a snapshot's L1 table"));
        }
        r.extend(
            l1.iter()
                .map(|e| e.l2_offset())
                .filter(|&o| o != 0)
                .map(|o| range(o, cs, "an L2 table")),
        );
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
