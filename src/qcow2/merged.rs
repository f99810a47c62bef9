//! The merged map of a chain, one window of guest addresses at a time.
//!
//! Asking each layer in turn for every extent (top first, down to the layer that holds the
//! bytes) costs the chain's depth for every extent: a 1000-file chain of scattered
//! incrementals spent seconds there, and kept up to 64 L2 tables per layer in memory. Instead
//! the map of a window (8192 of the smallest allocation units in the chain, at most 1 GiB) is
//! built once, layer by layer, each layer asked only about the ranges every layer above it left
//! unallocated; a layer whose L1 entry is empty there answers in one step. Building a window
//! thus costs the runs the layers actually map there plus one step per layer, and each L2 table
//! is read once per window, so the tables need no long-lived cache of their own. A few recent
//! windows are kept: the pipelines walk the disk in order, and parallel workers share a window.

use super::disk::{Extent, Image, Layer};
use super::error::{ErrorKind, Result};
use super::image::Status;
use std::sync::{Arc, Mutex};

/// Allocation units (clusters, or subclusters with extended L2) a window spans.
const WINDOW_UNITS: u64 = 8192;
/// Windows kept: enough for the producer of a pipeline to run a few windows ahead of its
/// workers without either building one twice.
const KEPT: usize = 16;

/// The merged map of `[start, start + span)` (clipped to the disk): runs in guest order,
/// covering it without gaps.
struct Window {
    start: u64,
    runs: Vec<Extent>,
}

/// Recently built windows of one disk.
pub struct Windows {
    span: u64,
    recent: Mutex<Vec<Arc<Window>>>,
}

impl Windows {
    pub fn new(images: &[Image]) -> Windows {
        let unit = images
            .iter()
            .filter_map(|i| i.qcow2())
            .map(|q| {
                let cs = q.cluster_size();
                if q.header().extended_l2() {
                    cs / 32
                } else {
                    cs
                }
            })
            .min()
            .unwrap_or(64 << 10);
        Windows {
            span: (unit * WINDOW_UNITS).clamp(1 << 20, 1 << 30),
            recent: Mutex::new(Vec::new()),
        }
    }

    /// The extent at `offset` (< the disk size): how the merged map stores it, for at most
    /// `max` bytes and not past the end of its window.
    pub fn extent_at(&self, images: &[Image], offset: u64, max: u64) -> Result<Extent> {
        let w = self.window(images, offset)?;
        let i = w.runs.partition_point(|r| r.start + r.length <= offset);
        let Some(&r) = w.runs.get(i) else {
            // Only an offset past the end of the disk finds no run (callers clip to it).
            return Err(ErrorKind::Unsupported(format!(
                "guest offset {offset:#x} lies past the end of the disk"
            ))
            .at(images[0].path()));
        };
        let delta = offset - r.start;
        Ok(Extent {
            start: offset,
            length: (r.length - delta).min(max),
            offset: r.offset.map(|h| h + delta),
            ..r
        })
    }

    fn window(&self, images: &[Image], offset: u64) -> Result<Arc<Window>> {
        let start = offset / self.span * self.span;
        {
            let mut recent = self.lock();
            if let Some(i) = recent.iter().position(|w| w.start == start) {
                let w = recent.remove(i);
                recent.push(w.clone());
                return Ok(w);
            }
        }
        // Built outside the lock: workers in different windows build in parallel (two in the
        // same one build it twice, identically).
        let end = (start + self.span).min(images[0].size());
        let w = Arc::new(Window {
            start,
            runs: build(images, start, end)?,
        });
        let mut recent = self.lock();
        if !recent.iter().any(|x| x.start == start) {
            if recent.len() == KEPT {
                recent.remove(0);
            }
            recent.push(w.clone());
        }
        Ok(w)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Window>>> {
        // Every update is one push or remove: a poisoned lock still holds a consistent list.
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The merged map of `[start, end)`: each layer, top first, is asked about the ranges still
/// unallocated above it. Semantics as `qemu-img map`: a range no layer allocates is reported at
/// the depth of the last layer asked, as absent zeros; a backing file shorter than the disk
/// reads as absent zeros past its end.
fn build(images: &[Image], start: u64, end: u64) -> Result<Vec<Extent>> {
    let mut runs = Vec::new();
    let mut todo = vec![(start, end)];
    for (depth, image) in images.iter().enumerate() {
        let next_size = images.get(depth + 1).map(Image::size);
        let mut below: Vec<(u64, u64)> = Vec::new();
        for &(a, b) in &todo {
            let mut pos = a;
            while pos < b {
                let mut e = Extent {
                    start: pos,
                    length: b - pos,
                    depth: depth as u32,
                    present: true,
                    zero: false,
                    data: false,
                    compressed: false,
                    offset: None,
                };
                let q = match image.layer() {
                    Layer::Raw(r) => {
                        let (data, n) = r.allocation(pos, b - pos)?;
                        e.length = n;
                        e.data = data;
                        e.zero = !data;
                        e.offset = Some(pos);
                        runs.push(e);
                        pos += n;
                        continue;
                    }
                    Layer::Qcow2(q) => q,
                };
                let (status, n) = q.status(pos, b - pos)?;
                e.length = n;
                match status {
                    Status::Data { host } => {
                        e.data = true;
                        e.offset = Some(host);
                    }
                    Status::Compressed(_) => {
                        e.data = true;
                        e.compressed = true;
                    }
                    Status::Zero { host } => {
                        e.zero = true;
                        e.offset = host;
                    }
                    Status::Unallocated { host } => {
                        // What the next layer covers goes down; the rest reads as absent zeros.
                        let covered = next_size.map_or(pos, |s| s.clamp(pos, pos + n));
                        if covered > pos {
                            match below.last_mut() {
                                Some(last) if last.1 == pos => last.1 = covered,
                                _ => below.push((pos, covered)),
                            }
                        }
                        if covered < pos + n {
                            runs.push(Extent {
                                start: covered,
                                length: pos + n - covered,
                                present: false,
                                zero: true,
                                offset: host.map(|h| h + (covered - pos)),
                                ..e
                            });
                        }
                        pos += n;
                        continue;
                    }
                }
                runs.push(e);
                pos += n;
            }
        }
        if below.is_empty() {
            break;
        }
        todo = below;
    }
    runs.sort_unstable_by_key(|e| e.start);
    Ok(runs)
}
