//! A new refcount structure, built from the references `check` counted.
//!
//! When the refcount table or its blocks cannot be trusted (the table lies on the header or on
//! other metadata, an entry is unaligned, has reserved bits or points past the file, a block
//! shares its cluster, a cluster in use has no refcount at all), patching refcounts in place
//! would write through the damaged structure, or place a new block on a cluster that is in use
//! but looks free. Instead a complete structure, blocks and table, is written past the end of
//! the file and made durable, and only then does the header point to it. Until that header
//! write the old structure is in force and nothing it describes was touched; after it, the old
//! table and blocks are unreferenced space. QEMU fills holes inside the file instead; placing
//! everything past the end costs a few clusters and never writes over a cluster a damaged
//! structure might still claim.

use super::error::{corrupt, ErrorKind};
use super::fault::pwrite;
use super::header::{Header, MAX_REFCOUNT_TABLE_BYTES};
use super::refcount::{self, RefcountFormat};
use std::collections::BTreeSet;
use std::fs::File;

/// The layout of the new structure: which table indices get a block, where blocks and table go.
struct Layout {
    /// Table indices with a block, ascending; block `j` is at cluster `start + j`.
    blocks: Vec<u64>,
    /// The first cluster past the file: where the blocks start.
    start: u64,
    table_clusters: u64,
}

impl Layout {
    fn plan(refs: &[u16], per_block: u64, cs: u64) -> Layout {
        let start = refs.len() as u64;
        let mut blocks: BTreeSet<u64> = refs
            .chunks(per_block as usize)
            .enumerate()
            .filter(|(_, c)| c.iter().any(|&r| r != 0))
            .map(|(t, _)| t as u64)
            .collect();
        // The new clusters need blocks too, which may need more table: until nothing grows.
        loop {
            let entries = blocks.last().map_or(0, |&t| t + 1);
            let table_clusters = (entries * 8).div_ceil(cs).max(1);
            let end = start + blocks.len() as u64 + table_clusters;
            let before = blocks.len();
            blocks.extend(start / per_block..=(end - 1) / per_block);
            let entries_now = blocks.last().map_or(0, |&t| t + 1);
            if blocks.len() == before && (entries_now * 8).div_ceil(cs).max(1) == table_clusters {
                return Layout {
                    blocks: blocks.into_iter().collect(),
                    start,
                    table_clusters,
                };
            }
        }
    }

    fn table_cluster(&self) -> u64 {
        self.start + self.blocks.len() as u64
    }

    /// The refcount cluster `c` gets: what was counted, 1 for the new structure's own clusters.
    fn value(&self, refs: &[u16], c: u64) -> u64 {
        match refs.get(c as usize) {
            Some(&r) => r as u64,
            None if c < self.table_cluster() + self.table_clusters => 1,
            None => 0,
        }
    }
}

/// Writes a refcount structure holding `refs` (one count per cluster of the file) past the end
/// of `file`, makes it durable and switches the header `h` to it; returns the header as now on
/// disk. On failure before the switch the file is cut back to `file_len`: nothing else was
/// written.
pub fn rebuild(file: &File, h: &Header, refs: &[u16], file_len: u64) -> Result<Header, ErrorKind> {
    let cs = h.cluster_size();
    let fmt = RefcountFormat {
        cluster_bits: h.cluster_bits,
        order: h.refcount_order,
    };
    if let Some(c) = refs
        .iter()
        .position(|&r| r == u16::MAX || r as u64 > fmt.max_value())
    {
        return Err(ErrorKind::Unsupported(format!(
            "cannot rebuild the refcounts: cluster {c} has {} references, more than the \
             image's {}-bit refcounts (or this check) can hold",
            refs[c],
            fmt.bits()
        )));
    }
    let layout = Layout::plan(refs, fmt.block_entries(), cs);
    let entries = layout.table_clusters * cs / 8;
    if layout.table_clusters * cs > MAX_REFCOUNT_TABLE_BYTES {
        return Err(corrupt(format!(
            "cannot rebuild the refcounts: the table would need {} clusters, more than QEMU's \
             8 MiB limit",
            layout.table_clusters
        )));
    }
    let written = write_structure(file, &layout, refs, fmt, cs, entries);
    if let Err(e) = written {
        // Only new space past the old end was written: give it back.
        let _ = file.set_len(file_len);
        return Err(e);
    }
    let mut switched = h.clone();
    switched.refcount_table_offset = layout.table_cluster() * cs;
    switched.refcount_table_clusters = layout.table_clusters as u32;
    pwrite(file, &switched.to_bytes(), 0)?;
    file.sync_data()?;
    Ok(switched)
}

fn write_structure(
    file: &File,
    layout: &Layout,
    refs: &[u16],
    fmt: RefcountFormat,
    cs: u64,
    entries: u64,
) -> Result<(), ErrorKind> {
    let per_block = fmt.block_entries();
    let mut table = vec![0u8; (entries * 8) as usize];
    let mut block = vec![0u8; cs as usize];
    for (j, &t) in layout.blocks.iter().enumerate() {
        block.fill(0);
        for i in 0..per_block {
            let v = layout.value(refs, t * per_block + i);
            if v != 0 {
                refcount::set(&mut block, i, fmt.order, v);
            }
        }
        let at = (layout.start + j as u64) * cs;
        pwrite(file, &block, at)?;
        table[(t * 8) as usize..(t * 8 + 8) as usize].copy_from_slice(&at.to_be_bytes());
    }
    pwrite(file, &table, layout.table_cluster() * cs)?;
    file.sync_data()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_new_structure_describes_itself() {
        // 512-byte clusters with 16-bit refcounts: 256 clusters per block.
        for used in [1usize, 255, 256, 257, 5000] {
            let refs = vec![1u16; used];
            let l = Layout::plan(&refs, 256, 512);
            let end = l.table_cluster() + l.table_clusters;
            for c in 0..end {
                let t = c / 256;
                assert!(l.blocks.contains(&t), "cluster {c} of {used} has no block");
                assert!(l.value(&refs, c) >= 1);
            }
            assert!(l.blocks.last().unwrap() * 8 < l.table_clusters * 512);
            assert_eq!(l.value(&refs, end), 0);
        }
    }

    #[test]
    fn empty_ranges_get_no_block() {
        let mut refs = vec![0u16; 256 * 10];
        refs[3] = 1;
        let l = Layout::plan(&refs, 256, 512);
        assert_eq!(l.blocks, vec![0, 10]);
    }
}
