//! Comparing what the walk counted with what the image stores: refcounts block by block (a
//! refcount below the references is a corruption, one above a leak) and COPIED flags, which
//! must say "refcount is 1".

use super::walk::{Copied, Walk};
use crate::qcow2::l1;
use crate::qcow2::refcount::{self, RefcountFormat};
use crate::qcow2::storage::read_zero_padded;
use std::collections::{HashMap, HashSet};

/// What a repair would change, found while comparing.
#[derive(Default)]
pub(super) struct Fixes {
    /// (cluster, references) where the refcount is too low.
    pub too_low: Vec<(u64, u64)>,
    /// (cluster, references) where the refcount is too high.
    pub too_high: Vec<(u64, u64)>,
    /// (entry offset, corrected entry) for COPIED flags that disagree with the references.
    pub copied: Vec<(u64, u64)>,
}

/// Compares stored refcounts (the blocks at `blocks`, by refcount table index) with the
/// counted references, then checks COPIED flags; sets the report's image end offset. The
/// fixes are collected when `repairing`.
pub(super) fn compare(w: &mut Walk, blocks: &[u64], repairing: bool) -> Fixes {
    let h = w.q.header();
    let cs = w.cs;
    let nb = w.refs.len() as u64;
    let fmt = RefcountFormat {
        cluster_bits: h.cluster_bits,
        order: h.refcount_order,
    };
    let per_block = fmt.block_entries();
    // Stored refcounts are kept only where COPIED flags need them.
    let wanted: HashSet<u64> = w.copied.iter().map(|c| c.cluster(cs)).collect();
    let mut stored: HashMap<u64, u64> = HashMap::new();
    let mut fixes = Fixes::default();
    let mut highest = None;
    let mut block = vec![0u8; cs as usize];
    for t in 0..nb.div_ceil(per_block) {
        let first = t * per_block;
        let have = match blocks.get(t as usize) {
            // A block cut by the end of the file reads as QEMU reads it: zeros past the end.
            Some(&b) if b != 0 => match read_zero_padded(w.file, &mut block, b) {
                Ok(()) => true,
                Err(e) => {
                    w.check_error(format!("reading the refcount block at {b:#x}: {e}"));
                    false
                }
            },
            _ => false,
        };
        for c in first..(first + per_block).min(nb) {
            let s = if have {
                refcount::get(&block, c - first, fmt.order)
            } else {
                0
            };
            let r = w.refs[c as usize] as u64;
            if s == 0 && r == 0 {
                continue;
            }
            highest = Some(c);
            if wanted.contains(&c) {
                stored.insert(c, s);
            }
            if s == 0 {
                // As QEMU: a cluster in use that looks free cannot be patched safely (the
                // patch itself could allocate it).
                w.rebuild = true;
            }
            if s < r {
                w.corrupt_refcount(format!("cluster {c} refcount={s} reference={r}"));
                if repairing {
                    fixes.too_low.push((c, r));
                }
            } else if s > r {
                w.report.leaks += 1;
                w.message(format!("Leaked cluster {c} refcount={s} reference={r}"));
                if repairing {
                    fixes.too_high.push((c, r));
                }
            }
        }
    }
    // QEMU: the end of the last cluster in use.
    w.report.image_end_offset = highest.map_or(0, |c| (c + 1) * cs);
    fixes.copied = copied_flags(w, &stored);
    fixes
}

/// COPIED must say "refcount is 1": reported against the stored refcounts, repaired against
/// the counted references (what a full repair makes the refcounts). Returns the corrected
/// entries.
fn copied_flags(w: &mut Walk, stored: &HashMap<u64, u64>) -> Vec<(u64, u64)> {
    let h = w.q.header();
    let cs = w.cs;
    let external = w.q.data_file().is_some();
    let entry_size = h.l2_entry_size();
    // (entry offset, entry, host cluster, whose refcount is implicitly 1)
    let flags: Vec<(u64, u64, u64, bool)> = w
        .copied
        .iter()
        .map(|c| match *c {
            Copied::L1 { index, entry } => (
                h.l1_table_offset + index as u64 * 8,
                entry.0,
                c.cluster(cs),
                false,
            ),
            Copied::L2 {
                table,
                index,
                entry,
                cluster,
            } => (
                table + index as u64 * entry_size,
                entry.word,
                cluster,
                external,
            ),
        })
        .collect();
    let mut fixes = Vec::new();
    for (off, word, c, implicit) in flags {
        // L1 and L2 entries keep COPIED in the same bit.
        let copied = word & l1::COPIED != 0;
        let stored_single = implicit || stored.get(&c) == Some(&1);
        if stored_single != copied {
            w.corrupt_refcount(format!("OFLAG_COPIED: entry at {off:#x} is {word:#018x}"));
        }
        let counted_single = implicit || w.refs.get(c as usize) == Some(&1);
        if counted_single != copied {
            fixes.push((off, word ^ l1::COPIED));
        }
    }
    fixes
}
