//! The pre-flight every qmpbackup command starts with: is the VM in a state we can work on,
//! and what it is (QEMU version, name, emulated TPMs), logged in the original's words.

use super::error::{BackupError, Result};
use crate::qmp::Qmp;
use serde_json::json;

/// The run state QEMU reports (`running`, `prelaunch`, `paused`, ...).
pub struct VmState {
    pub status: String,
}

impl VmState {
    pub fn running(&self) -> bool {
        self.status == "running"
    }
}

/// Checks the VM's state and logs what it is. Refuses a VM that is neither running, paused,
/// suspended nor prelaunch (a shut-down or crashed guest, an incoming migration).
pub fn preflight(qmp: &mut Qmp) -> Result<VmState> {
    let reply = qmp.execute("query-status", json!({}))?;
    let status = reply["status"].as_str().unwrap_or("").to_string();
    if !matches!(
        status.as_str(),
        "running" | "prelaunch" | "paused" | "suspended"
    ) {
        return Err(BackupError::Refused(format!(
            "VM not ready for backup, state: [{status}]: backups need it running, paused or prelaunch"
        )));
    }
    tracing::info!("VM is in state: [{status}]");
    // The original printed major.micro.minor; this is the version as QEMU numbers it.
    tracing::info!("Qemu version: [{}] [{}]", qmp.version, qmp.package);
    if let Ok(name) = qmp.execute("query-name", json!({})) {
        if let Some(name) = name["name"].as_str() {
            tracing::info!("VM Name: [{name}]");
        }
    }
    if let Ok(tpms) = qmp.execute("query-tpm", json!({})) {
        for t in tpms.as_array().into_iter().flatten() {
            if t["options"]["type"] == "emulator" {
                tracing::warn!(
                    "VM seems to use emulated TPM device [{}]: additional files may require backup.",
                    t["id"].as_str().unwrap_or("?")
                );
            }
        }
    }
    Ok(VmState { status })
}
