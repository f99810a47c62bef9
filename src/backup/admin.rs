//! `qmpbackup info` and `qmpbackup cleanup`: look at the VM's disks and bitmaps, and remove
//! the bitmaps of backup chains that are no longer wanted.

use super::device::{parse_query_block, Device};
use super::error::{BackupError, Result};
use crate::qmp::Qmp;
use serde_json::{json, Value};

/// Every disk with a medium, raw ones included, with its `query-block` record.
pub fn devices(qmp: &mut Qmp) -> Result<Vec<(Device, Value)>> {
    let reply = qmp.execute("query-block", json!({}))?;
    let records: Vec<Value> = reply
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e.get("inserted").is_some())
        .cloned()
        .collect();
    let out: Vec<(Device, Value)> = parse_query_block(&reply)
        .into_iter()
        .zip(records)
        .filter_map(|(d, r)| d.ok().map(|d| (d, r)))
        .collect();
    if out.is_empty() {
        return Err(BackupError::Refused(
            "VM has no block devices with a medium".into(),
        ));
    }
    Ok(out)
}

/// Removes the bitmaps qmpbackup created (names containing `qmpbackup`, as the original); with `uuid`, only
/// those of that chain. Returns (device, bitmap) of each one removed.
pub fn remove_bitmaps(qmp: &mut Qmp, uuid: Option<&str>) -> Result<Vec<(String, String)>> {
    let mut removed = Vec::new();
    for (dev, _) in devices(qmp)? {
        for b in &dev.bitmaps {
            let ours = b.name.contains("qmpbackup");
            if !ours || uuid.is_some_and(|u| !b.name.ends_with(u)) {
                continue;
            }
            qmp.execute(
                "block-dirty-bitmap-remove",
                json!({"node": dev.node, "name": b.name}),
            )?;
            removed.push((dev.name.clone(), b.name.clone()));
        }
    }
    Ok(removed)
}
