//! From L2 entries to runs: how a guest range is stored in one image.
//!
//! Shared by the reader (tables from its cache) and the writer (tables it holds in memory), so
//! both interpret entries identically. A run is a maximal stretch inside one L2 table whose
//! units (clusters, or subclusters with extended L2) have the same state and contiguous host
//! offsets; compressed clusters are always runs of their own.

use super::error::{corrupt, ErrorKind};
use super::l2::{CompressedDescriptor, L2Format, L2Table, Subcluster};

/// How a guest byte range is stored in one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Uncompressed data at this host offset (in the external data file if there is one).
    Data { host: u64 },
    /// A compressed cluster (runs never span more than one).
    Compressed(CompressedDescriptor),
    /// Reads as zeros; `host` is set where a host cluster is still allocated.
    Zero { host: Option<u64> },
    /// Not stored here: the backing file (or zeros) provides it.
    Unallocated { host: Option<u64> },
}

/// The run starting at `guest` in `table` (the L2 table covering it), at most `limit` bytes,
/// which must not cross the table's span.
pub fn run(
    f: &L2Format,
    table: &L2Table,
    guest: u64,
    limit: u64,
) -> Result<(Status, u64), ErrorKind> {
    let unit = f.unit_size();
    let per_cluster = f.units_per_cluster() as u64;
    let per_table = f.entries_per_table();
    let classify = |u: u64| -> Result<Subcluster, ErrorKind> {
        let cluster = u / per_cluster;
        table
            .entry((cluster % per_table) as usize)
            .classify(f, (u % per_cluster) as u32)
            .map_err(|k| {
                corrupt(format!(
                    "guest offset {:#x}: {}",
                    cluster * f.cluster_size(),
                    k.detail()
                ))
            })
    };
    let first_unit = guest / unit;
    let first = classify(first_unit)?;
    let within = guest % unit;
    let status = match first {
        Subcluster::Normal(h) => Status::Data { host: h + within },
        Subcluster::ZeroAlloc(h) => Status::Zero {
            host: Some(h + within),
        },
        Subcluster::ZeroPlain => Status::Zero { host: None },
        Subcluster::UnallocatedPlain => Status::Unallocated { host: None },
        Subcluster::UnallocatedAlloc(h) => Status::Unallocated {
            host: Some(h + within),
        },
        Subcluster::Compressed(d) => {
            let cluster_end = (guest / f.cluster_size() + 1) * f.cluster_size();
            return Ok((Status::Compressed(d), limit.min(cluster_end - guest)));
        }
    };
    let end_limit = guest + limit;
    let mut end = (first_unit + 1) * unit;
    if first == Subcluster::UnallocatedPlain {
        // Long empty stretches (incremental images are mostly empty) in one word scan.
        let cluster = first_unit / per_cluster;
        let index = (cluster % per_table) as usize;
        let last = ((end_limit - 1) / f.cluster_size() % per_table) as usize + 1;
        let empty = table.zero_entries(index, last) as u64;
        end = end.max((cluster + empty) * f.cluster_size());
    }
    while end < end_limit {
        let next = classify(end / unit)?;
        if !continues(first, next, end - first_unit * unit) {
            break;
        }
        end += unit;
    }
    Ok((status, end.min(end_limit) - guest))
}

/// Whether `next`, `distance` bytes after `first`, continues the same run.
fn continues(first: Subcluster, next: Subcluster, distance: u64) -> bool {
    use Subcluster::*;
    match (first, next) {
        (Normal(a), Normal(b))
        | (ZeroAlloc(a), ZeroAlloc(b))
        | (UnallocatedAlloc(a), UnallocatedAlloc(b)) => b == a + distance,
        (ZeroPlain, ZeroPlain) | (UnallocatedPlain, UnallocatedPlain) => true,
        _ => false,
    }
}
