//! What damage means for the guest: `verify` finds bytes of a backup file that differ from
//! its manifest, and the user's question is what was lost. The damaged extents are told in
//! the guest's terms: the guest byte ranges whose data they held (or the metadata they held,
//! named), and the restore points that read those bytes from the damaged file. A later INC
//! that wrote the same guest range shields the points from it on; damaged metadata (header,
//! L1/L2 tables, refcounts) can change what any later point reads, so it affects all of them.

use crate::qcow2::check::{self, Owner, Role};
use crate::qcow2::{Disk, OpenOptions};
use crate::store::manifest::Mismatch;
use serde::Serialize;
use std::cell::OnceCell;
use std::path::Path;

/// What the damaged bytes held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Guest data: a restore point that reads it from this file restores wrong bytes there.
    Data,
    /// Structures that map the data (or the file's size changed): what later points read
    /// from this file may be wrong anywhere.
    Metadata,
    /// Bytes nothing in the image uses (free clusters): no restore point reads them.
    Unused,
}

/// One consequence of damage in one file.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// The file's damaged bytes, `[start, end)`.
    pub start: u64,
    pub end: u64,
    pub problem: String,
    pub kind: Kind,
    /// Guest bytes `[start, end)` the damaged bytes held (data only).
    pub guest: Option<(u64, u64)>,
    /// The structures the damaged bytes held (metadata only).
    pub holds: Vec<&'static str>,
    /// The internal snapshot the data belongs to, when only a snapshot maps it.
    pub snapshot: Option<String>,
}

/// The findings for `mismatches` of the file at `path`, open as `disk` (alone, without its
/// backing file), or `None` when it does not open (its header or tables are damaged).
/// Adjacent damaged extents are taken together.
pub fn findings(path: &Path, disk: Option<&Disk>, mismatches: &[Mismatch]) -> Vec<Finding> {
    let ranges = merged(mismatches);
    // One walk of the image's metadata for all damaged ranges of a qcow2 file.
    let owners = match disk.and_then(|d| d.qcow2()) {
        Some(_) => {
            let probe: Vec<(u64, u64)> = ranges
                .iter()
                .filter(|m| !m.size)
                .map(|m| (m.start, m.end))
                .collect();
            Some(check::owners(path, &probe).map_err(|e| e.to_string()))
        }
        None => None,
    };
    let mut out = Vec::new();
    for m in &ranges {
        let (Some(disk), false) = (disk, m.size) else {
            let holds = if m.size {
                "the file's end"
            } else {
                "structures the image does not open without"
            };
            out.push(finding(m, Kind::Metadata, None, vec![holds], None));
            continue;
        };
        match (disk.qcow2(), &owners) {
            (Some(q), Some(Ok(owners))) => {
                let inside: Vec<Owner> = owners
                    .iter()
                    .filter(|o| o.host < m.end && o.host + o.len > m.start)
                    .cloned()
                    .collect();
                let names = |i: usize| q.snapshots().get(i).map(|s| s.name.clone());
                out.extend(of_owners(m, &inside, q.cluster_size(), names));
            }
            (Some(_), Some(Err(e))) => out.push(Finding {
                problem: format!("{}; what the bytes held is unknown: {e}", m.problem),
                ..finding(m, Kind::Metadata, None, Vec::new(), None)
            }),
            _ => {
                // A raw file is the guest disk itself.
                let end = m.end.min(disk.size());
                let guest = (m.start < end).then_some((m.start, end));
                let kind = guest.map_or(Kind::Unused, |_| Kind::Data);
                out.push(finding(m, kind, guest, Vec::new(), None));
            }
        }
    }
    out
}

/// Adjacent checksum mismatches as one range (a burst of damage is one finding, not one per
/// MiB).
fn merged(mismatches: &[Mismatch]) -> Vec<Mismatch> {
    let mut out: Vec<Mismatch> = Vec::new();
    for m in mismatches {
        match out.last_mut() {
            Some(last) if !m.size && !last.size && last.end == m.start => {
                last.end = m.end;
                last.problem = format!(
                    "checksum mismatch in bytes {}..{} (several extents)",
                    last.start, last.end
                );
            }
            _ => out.push(m.clone()),
        }
    }
    out
}

fn finding(
    m: &Mismatch,
    kind: Kind,
    guest: Option<(u64, u64)>,
    holds: Vec<&'static str>,
    snapshot: Option<String>,
) -> Finding {
    Finding {
        start: m.start,
        end: m.end,
        problem: m.problem.clone(),
        kind,
        guest,
        holds,
        snapshot,
    }
}

/// The findings for one damaged range from the owners the walk found in it: the metadata it
/// held (one finding naming each structure), the guest ranges of its data (one finding per
/// contiguous range and snapshot), or, with no owner, unused bytes.
fn of_owners(
    m: &Mismatch,
    owners: &[Owner],
    cluster: u64,
    snapshot_name: impl Fn(usize) -> Option<String>,
) -> Vec<Finding> {
    let mut holds: Vec<&'static str> = Vec::new();
    let mut data: Vec<(Option<usize>, u64, u64)> = Vec::new();
    // A cluster the active image maps too is reported once, as the active image's data.
    let active: std::collections::HashSet<u64> = owners
        .iter()
        .filter(|o| matches!(o.role, Role::Guest { snapshot: None, .. }))
        .map(|o| o.host)
        .collect();
    for o in owners {
        match o.role {
            Role::Guest {
                snapshot: Some(_), ..
            } if active.contains(&o.host) => {}
            Role::Structure(what) => {
                if !holds.contains(&what) {
                    holds.push(what);
                }
            }
            Role::Guest {
                guest,
                compressed,
                snapshot,
            } => {
                let (lo, hi) = (o.host.max(m.start), (o.host + o.len).min(m.end));
                // A compressed cluster is lost as a whole; stored data byte for byte.
                let range = if compressed {
                    (guest, guest + cluster)
                } else {
                    (guest + (lo - o.host), guest + (hi - o.host))
                };
                data.push((snapshot, range.0, range.1));
            }
        }
    }
    let mut out = Vec::new();
    if !holds.is_empty() {
        out.push(finding(m, Kind::Metadata, None, holds, None));
    }
    data.sort_unstable();
    let mut runs: Vec<(Option<usize>, u64, u64)> = Vec::new();
    for (snap, s, e) in data {
        match runs.last_mut() {
            Some(r) if r.0 == snap && r.2 >= s => r.2 = r.2.max(e),
            _ => runs.push((snap, s, e)),
        }
    }
    for (snap, s, e) in runs {
        let name = snap.map(|i| snapshot_name(i).unwrap_or_else(|| format!("#{i}")));
        out.push(finding(m, Kind::Data, Some((s, e)), Vec::new(), name));
    }
    if out.is_empty() {
        out.push(finding(m, Kind::Unused, None, Vec::new(), None));
    }
    out
}

/// The files of a chain, oldest first, each opened (alone) the first time a finding needs to
/// know what it writes: many findings in one chain open each later file once.
pub struct Chain<'a> {
    paths: Vec<&'a Path>,
    opened: Vec<OnceCell<Option<Disk>>>,
}

impl<'a> Chain<'a> {
    pub fn new(paths: Vec<&'a Path>) -> Chain<'a> {
        let opened = paths.iter().map(|_| OnceCell::new()).collect();
        Chain { paths, opened }
    }

    fn name(&self, i: usize) -> String {
        self.paths[i]
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    }

    /// File `i` alone; `None` when it does not open.
    fn disk(&self, i: usize) -> Option<&Disk> {
        let opts = OpenOptions {
            no_backing: true,
            ..Default::default()
        };
        self.opened[i]
            .get_or_init(|| Disk::open_with(self.paths[i], &opts).ok())
            .as_ref()
    }

    /// The restore points (by file name) that read what `f`, found in file `index`, damaged:
    /// for data, that file's point and each later one until the later files between them
    /// have written every damaged guest byte; for metadata, that point and all later ones;
    /// for unused bytes none; for data only a snapshot maps, that snapshot.
    pub fn affected(&self, index: usize, f: &Finding) -> Vec<String> {
        match (f.kind, &f.snapshot, f.guest) {
            (Kind::Unused, ..) => Vec::new(),
            (_, Some(snap), _) => {
                vec![format!("{} (internal snapshot '{snap}')", self.name(index))]
            }
            (Kind::Data, None, Some((start, end))) => {
                let mut left = vec![(start, end)];
                let mut out = vec![self.name(index)];
                for later in index + 1..self.paths.len() {
                    left = unwritten(self.disk(later), &left);
                    if left.is_empty() {
                        break;
                    }
                    out.push(self.name(later));
                }
                out
            }
            _ => (index..self.paths.len()).map(|i| self.name(i)).collect(),
        }
    }
}

/// The parts of `ranges` that `disk` (one file alone) does not write; all of them when it
/// cannot be read (a damaged later file shields nothing).
fn unwritten(disk: Option<&Disk>, ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let Some(disk) = disk else {
        return ranges.to_vec();
    };
    let mut out = Vec::new();
    for &(start, end) in ranges {
        let walked = disk.for_each_extent(start, end - start, |e| {
            // Standalone INCs read as zeros where they hold nothing: only what is allocated
            // here is written here.
            if !e.present {
                out.push((e.start, e.start + e.length));
            }
            Ok(())
        });
        if walked.is_err() {
            return ranges.to_vec();
        }
        // Past the end of a smaller (older-sized) image nothing is written.
        if end > disk.size() {
            out.push((start.max(disk.size()), end));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mismatch(start: u64, end: u64) -> Mismatch {
        Mismatch {
            start,
            end,
            problem: "checksum mismatch".into(),
            size: false,
        }
    }

    #[test]
    fn owners_become_guest_ranges_structures_or_unused() {
        let m = mismatch(1 << 20, 2 << 20);
        let owner = |host: u64, len: u64, role: Role| Owner { host, len, role };
        let data = |guest, snapshot| Role::Guest {
            guest,
            compressed: false,
            snapshot,
        };
        let owners = [
            owner(0xf0000, 0x20000, data(0x40000, None)),
            owner(0x110000, 0x10000, data(0x60000, None)),
            owner(0x120000, 0x10000, Role::Structure("L2 table")),
            owner(0x130000, 0x10000, data(0x0, Some(0))),
            // Shared by the active image and a snapshot: the active image's data only.
            owner(0x110000, 0x10000, data(0x60000, Some(0))),
            owner(
                0x140000,
                0x100,
                Role::Guest {
                    guest: 0x90000,
                    compressed: true,
                    snapshot: None,
                },
            ),
            owner(0x150000, 0x10000, Role::Structure("L2 table")),
        ];
        let f = of_owners(&m, &owners, 0x10000, |_| Some("s1".into()));
        let guest: Vec<_> = f
            .iter()
            .filter_map(|f| f.guest.map(|g| (g, f.snapshot.clone())))
            .collect();
        // The first cluster straddles the range's start: only its second half is damaged, and
        // it joins the next one; the compressed cluster is lost whole.
        assert_eq!(
            guest,
            [
                ((0x50000, 0x70000), None),
                ((0x90000, 0xa0000), None),
                ((0x0, 0x10000), Some("s1".to_string()))
            ]
        );
        assert_eq!(f[0].kind, Kind::Metadata);
        assert_eq!(f[0].holds, ["L2 table"]);
        assert_eq!(of_owners(&m, &[], 0x10000, |_| None)[0].kind, Kind::Unused);
    }

    #[test]
    fn adjacent_mismatches_are_one_range() {
        let all = merged(&[mismatch(0, 10), mismatch(10, 20), mismatch(30, 40)]);
        let ranges: Vec<_> = all.iter().map(|m| (m.start, m.end)).collect();
        assert_eq!(ranges, [(0, 20), (30, 40)]);
    }
}
