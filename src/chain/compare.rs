//! `qmprestore compare`: are two disks' guest-visible contents identical?
//!
//! Same contract as `qemu-img compare` without `-s`: images of different sizes are compared on
//! their common part, and the excess of the larger one must read as zeros. Only the chunks
//! either side's metadata shows holding data are visited (compared in parallel): a sparse
//! multi-TiB disk costs its data and metadata, not its size.

use super::convert::CHUNK;
use super::progress;
use crate::qcow2::{Disk, Result};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// The verdict of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Identical,
    /// The first guest offset at which the contents differ.
    MismatchAt(u64),
}

pub fn compare(a: &Disk, b: &Disk, show_progress: bool) -> Result<Comparison> {
    let size = a.size().max(b.size());
    let bar = progress::bytes(size, "compare", show_progress);
    let first = AtomicU64::new(u64::MAX);
    let mut chunks: Vec<u64> = a.data_chunks(CHUNK).collect::<Result<_>>()?;
    chunks.extend(b.data_chunks(CHUNK).collect::<Result<Vec<_>>>()?);
    chunks.sort_unstable();
    chunks.dedup();
    let remote = a.is_remote() || b.is_remote();
    super::workers::run(remote, || {
        chunks.par_iter().try_for_each_init(
            || (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]),
            |(ba, bb), &start| -> Result<()> {
                let len = CHUNK.min(size - start);
                bar.inc(len);
                if start >= first.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let (ba, bb) = (&mut ba[..len as usize], &mut bb[..len as usize]);
                a.read_at(ba, start)?;
                b.read_at(bb, start)?;
                if let Some(i) = ba.iter().zip(bb.iter()).position(|(x, y)| x != y) {
                    first.fetch_min(start + i as u64, Ordering::Relaxed);
                }
                Ok(())
            },
        )
    })?;
    bar.finish_and_clear();
    Ok(match first.into_inner() {
        u64::MAX => Comparison::Identical,
        off => Comparison::MismatchAt(off),
    })
}
