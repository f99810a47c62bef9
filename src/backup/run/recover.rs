//! The clean-up after a killed run, before a new run does anything else: the run record in
//! the target lists what the killed run added to QEMU and wrote, so exactly that is removed.

use crate::backup::error::{BackupError, Result};
use crate::backup::fleece;
use crate::backup::state::{RunLock, RunRecord};
use crate::qmp::Qmp;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// Cleans up after a run that was killed: its jobs, nodes and temporary bitmaps in QEMU (if
/// this is the same QEMU), its fleece files. Returns its partial files, which the caller
/// removes (they are ours: the chain bitmap was never touched).
pub(super) fn recover(
    qmp: &mut Qmp,
    stale: &RunRecord,
    lock: &mut RunLock,
) -> Result<Vec<PathBuf>> {
    tracing::warn!(
        "cleaning up after an interrupted run (pid {}, started {})",
        stale.pid,
        stale.started
    );
    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    let has = |n: &str| {
        nodes
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["node-name"] == n)
    };
    let jobs = qmp.execute("query-block-jobs", json!({}))?;
    for d in &stale.disks {
        if jobs
            .as_array()
            .into_iter()
            .flatten()
            .any(|j| j["device"] == d.job.as_str())
        {
            let _ = qmp.execute("block-job-cancel", json!({"device": d.job, "force": true}));
            for _ in 0..100 {
                let j = qmp.execute("query-block-jobs", json!({}))?;
                if !j
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|x| x["device"] == d.job.as_str())
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let mut step = |cmd: &str, args: Value| {
            if let Err(e) = qmp.execute(cmd, args) {
                tracing::warn!("recovery: {cmd}: {e}");
            }
        };
        if has(&d.snap_node) {
            step("blockdev-del", json!({"node-name": d.snap_node}));
        }
        if has(&d.cbw_node) {
            if let Some(q) = &d.qdev {
                step("qom-set", fleece::switch(q, &d.node));
            }
            step("blockdev-del", json!({"node-name": d.cbw_node}));
        }
        for n in [&d.target_node, &d.fleece_node] {
            if has(n) {
                step("blockdev-del", json!({"node-name": n}));
            }
        }
        if let Some(n) = &d.next_bitmap {
            if has(&d.node) {
                let _ = qmp.execute(
                    "block-dirty-bitmap-remove",
                    json!({"node": d.node, "name": n}),
                );
            }
        }
        let _ = std::fs::remove_file(&d.fleece);
    }
    lock.clear().map_err(BackupError::io(".qmpbackup-run"))?;
    Ok(stale.disks.iter().map(|d| d.partial.clone()).collect())
}
