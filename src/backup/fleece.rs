//! The block-graph changes of image fleecing for one disk, as QMP arguments.
//!
//! ```text
//! device ──> cbw (copy-before-write) ──file──> disk node        (guest I/O)
//!             └──target──> fleece image        (old data of clusters the guest overwrites)
//! snapshot-access ──> cbw                      (the disk as it was at the switch)
//! backup job: snapshot-access ──> target image (the .partial backup file)
//! ```
//! The filter has no access bitmap: every cluster of the snapshot stays readable, so a guest
//! write that lands between the bitmap operations and the switch can never make the job fail
//! (the original restricted the filter to the bitmap and lost such writes or failed with
//! EACCES). Guest writes are never failed by the backup (`on-cbw-error: break-snapshot`), and
//! a slow fleece cannot stall the guest for longer than `cbw-timeout`.
//!
//! Node names have at most 31 characters whatever the disk is called
//! (`qmpbackup-<run><index>-<role>`): QEMU rejects longer ones, which broke the original for
//! any node name over 14 characters.

use super::state::DiskRecord;
use serde_json::{json, Value};
use std::path::Path;

/// Names of the nodes and the job for disk `index` of run `tag`.
pub fn names(tag: &str, index: usize, device: &str) -> (String, String, String, String, String) {
    let base = format!("qmpbackup-{tag}{index}");
    let job_device: String = device
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-._".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    (
        format!("{base}-tgt"),
        format!("{base}-fleece"),
        format!("{base}-cbw"),
        format!("{base}-snap"),
        format!("qmpbackup.{tag}{index}.{job_device}"),
    )
}

/// How QEMU opens a backup target's file.
#[derive(Debug, Clone, Default)]
pub struct FileIo {
    /// `aio` of the file node (threads, io_uring); QEMU's default when absent.
    pub aio: Option<String>,
    /// Direct I/O (`cache.direct`): the data bypasses the host's page cache.
    pub direct: bool,
}

/// `blockdev-add` arguments for an image file opened without its backing chain.
pub fn image_node(node: &str, path: &Path, format: &str, io: &FileIo) -> Value {
    let mut file = json!({"driver": "file", "filename": path.to_string_lossy()});
    if let Some(aio) = &io.aio {
        file["aio"] = json!(aio);
    }
    let mut v = json!({"driver": format, "node-name": node, "file": file});
    if io.direct {
        v["cache"] = json!({"direct": true});
    }
    if format == "qcow2" {
        v["backing"] = Value::Null;
        v["discard"] = json!("unmap");
    }
    v
}

pub fn cbw_node(r: &DiskRecord, cbw_timeout: u64) -> Value {
    json!({
        "driver": "copy-before-write",
        "node-name": r.cbw_node,
        "file": r.node,
        "target": r.fleece_node,
        "on-cbw-error": "break-snapshot",
        "cbw-timeout": cbw_timeout,
    })
}

pub fn snap_node(r: &DiskRecord) -> Value {
    json!({"driver": "snapshot-access", "node-name": r.snap_node, "file": r.cbw_node})
}

/// `qom-set` of the device's drive; `qdev` is `query-block`'s path of the device.
pub fn switch(qdev: &str, node: &str) -> Value {
    json!({"path": qdev, "property": "drive", "value": node})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_qemu_limits() {
        let (t, f, c, s, j) = names("ab12f", 999, "drive-virtio-disk0 (very long):x");
        for n in [&t, &f, &c, &s] {
            assert!(n.len() <= 31, "{n}");
            assert!(n.starts_with(|c: char| c.is_ascii_alphabetic()));
        }
        assert!(
            j.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)),
            "{j}"
        );
    }
}
