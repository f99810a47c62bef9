//! Phases 2 to 4 of a run: target, fleece and copy-before-write nodes added, the snapshot
//! point (a new bitmap, then every device switched onto its filter, with the VM stopped for
//! those milliseconds and the guest's file systems frozen on request), and the backup jobs
//! in one transaction with grouped completion.

use super::files::{create_image, create_target, fleece_options};
use super::{check, Run};
use crate::backup::error::{BackupError, Result};
use crate::backup::state::RunRecord;
use crate::backup::{fleece, job};
use crate::qcow2::Format;
use crate::qmp::{Agent, FreezeState};
use serde_json::{json, Value};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

impl Run<'_> {
    /// Files, graph, snapshot point and jobs. On error the caller tears down.
    pub(super) fn execute(&mut self, interrupted: &AtomicBool) -> Result<()> {
        let record = RunRecord {
            pid: std::process::id(),
            started: self.epoch,
            disks: self.disks.iter().map(|d| d.rec.clone()).collect(),
        };
        self.lock
            .record(&record)
            .map_err(BackupError::io(".qmpbackup-run"))?;
        for d in &self.disks {
            tracing::info!(
                "Create target backup image: [{}], virtual size: [{}]",
                d.rec.partial.display(),
                d.dev.virtual_size
            );
            create_target(d, self.opts.link_incs)?;
            tracing::info!(
                "Create fleece image: [{}], virtual size: [{}]",
                d.rec.fleece.display(),
                d.dev.virtual_size
            );
            create_image(&d.rec.fleece, &fleece_options(&d.dev))?;
        }
        if self.opts.pause && self.was_running {
            self.qmp.execute("stop", json!({}))?;
            self.paused_by_us = true;
            tracing::info!("Paused/suspended virtual machine");
        }
        // Each step for every disk before the next, in the original's order and words.
        tracing::info!("Attach backup target devices to virtual machine");
        for d in &mut self.disks {
            let (node, file) = (&d.rec.target_node, &d.rec.partial);
            let io = &self.opts.target_io;
            let args = fleece::image_node(node, file, d.target_format.name(), io);
            self.qmp.execute("blockdev-add", args)?;
            d.target_added = true;
        }
        tracing::info!("Attach fleece devices to virtual machine");
        for d in &mut self.disks {
            let args = fleece::image_node(
                &d.rec.fleece_node,
                &d.rec.fleece,
                "qcow2",
                &Default::default(),
            );
            self.qmp.execute("blockdev-add", args)?;
            d.fleece_added = true;
        }
        tracing::info!("Adding cbw devices to virtual machine");
        for i in 0..self.disks.len() {
            let cbw = fleece::cbw_node(&self.disks[i].rec, self.opts.cbw_timeout);
            self.qmp.execute("blockdev-add", cbw)?;
            self.disks[i].cbw_added = true;
        }
        check(interrupted)?;
        self.quiesce();
        if self.was_running && !self.paused_by_us {
            self.qmp.execute("stop", json!({}))?;
            self.stopped = true;
        }
        // The snapshot point: N starts, then every device moves onto its filter.
        let adds: Vec<Value> = self
            .disks
            .iter()
            .filter_map(|d| {
                d.rec.next_bitmap.as_ref().map(|n| {
                    json!({"type": "block-dirty-bitmap-add",
                           "data": {"node": d.dev.node, "name": n, "persistent": false}})
                })
            })
            .collect();
        if !adds.is_empty() {
            self.qmp.execute("transaction", json!({"actions": adds}))?;
            for d in &mut self.disks {
                d.next_added = d.rec.next_bitmap.is_some();
            }
        }
        tracing::info!("Activate copy-before-write filter");
        for i in 0..self.disks.len() {
            let d = &self.disks[i];
            let qdev = d.dev.qdev.as_deref().ok_or_else(|| {
                BackupError::Refused(format!(
                    "{}: QEMU reports no qdev path for the device",
                    d.dev.name
                ))
            })?;
            self.qmp
                .execute("qom-set", fleece::switch(qdev, &d.rec.cbw_node))?;
            self.disks[i].switched = true;
        }
        tracing::info!("Add snapshot-access devices.");
        for i in 0..self.disks.len() {
            self.qmp
                .execute("blockdev-add", fleece::snap_node(&self.disks[i].rec))?;
            self.disks[i].snap_added = true;
        }
        // Bitmap actions cannot share the grouped transaction of the jobs.
        let mut bitmap_copies = Vec::new();
        let mut actions = Vec::new();
        for d in &self.disks {
            let mut job = json!({
                "job-id": d.rec.job, "device": d.rec.snap_node, "target": d.rec.target_node,
                "sync": "full", "speed": self.opts.speed_limit,
            });
            if self.opts.compress && d.target_format == Format::Qcow2 {
                job["compress"] = json!(true);
            }
            if let (true, Some(b)) = (d.decision.level.is_delta(), &d.decision.bitmap) {
                // A backup job finds its bitmap only on its source node: copy B there.
                let s = "qmpbackup-snap";
                bitmap_copies.push(json!({"type": "block-dirty-bitmap-add",
                    "data": {"node": d.rec.snap_node, "name": s, "persistent": false}}));
                bitmap_copies.push(json!({"type": "block-dirty-bitmap-merge",
                    "data": {"node": d.rec.snap_node, "target": s,
                             "bitmaps": [{"node": d.dev.node, "name": b}]}}));
                job["sync"] = json!("incremental");
                job["bitmap"] = json!(s);
            }
            actions.push(json!({"type": "blockdev-backup", "data": job}));
        }
        if !bitmap_copies.is_empty() {
            self.qmp
                .execute("transaction", json!({ "actions": bitmap_copies }))?;
        }
        // Events of earlier jobs (a killed run's, cancelled during recovery) are not ours.
        self.qmp.drop_events()?;
        self.qmp.execute(
            "transaction",
            json!({"actions": actions, "properties": {"completion-mode": "grouped"}}),
        )?;
        tracing::info!(
            "Started backup transaction for [{}] devices",
            self.disks.len()
        );
        self.resume();
        let jobs: Vec<(String, String)> = self
            .disks
            .iter()
            .map(|d| (d.rec.job.clone(), d.dev.name.clone()))
            .collect();
        job::wait(self.qmp, &jobs, &self.opts.progress, interrupted)
    }

    /// Freezes the guest's file systems for the snapshot point (--quiesce). An unreachable
    /// agent only warns, as in the original.
    fn quiesce(&mut self) {
        if !self.opts.quiesce || self.opts.pause {
            return;
        }
        let Some(addr) = &self.opts.agent else {
            tracing::warn!(
                "Quisce option set but agent socket is missing, please set via --agent-socket"
            );
            return;
        };
        let attempt = || -> crate::qmp::Result<Agent> {
            let mut agent = Agent::connect(addr, Duration::from_secs(5))?;
            agent.ping()?;
            if !agent.can_freeze()? {
                return Err(crate::qmp::QmpError::Protocol {
                    addr: addr.to_string(),
                    problem: "the guest agent does not offer guest-fsfreeze-freeze".into(),
                });
            }
            Ok(agent)
        };
        match attempt() {
            Ok(mut agent) => {
                let state = agent.status();
                if state.as_ref().ok() == Some(&FreezeState::Frozen) {
                    tracing::warn!("Filesystem is already frozen");
                } else {
                    match agent.freeze(Duration::from_secs(60)) {
                        Ok(n) => {
                            tracing::info!("\"{n}\" Filesystem(s) freezed");
                            self.frozen = true;
                        }
                        Err(e) => {
                            tracing::warn!("Unable to freeze: \"{e}\" (backing up unfrozen)")
                        }
                    }
                }
                self.agent = Some(agent);
            }
            Err(e) => {
                tracing::warn!("Unable to reach Guest Agent: can't freeze file systems. ({e})")
            }
        }
    }

    /// Lets the VM run on once the snapshot point is behind us.
    pub(super) fn resume(&mut self) {
        if self.stopped {
            match self.qmp.execute("cont", json!({})) {
                Ok(_) => self.stopped = false,
                Err(e) => tracing::error!("could not resume the VM: {e}"),
            }
        }
        if self.frozen {
            if let Some(agent) = &mut self.agent {
                match agent.thaw() {
                    Ok(n) => {
                        self.frozen = false;
                        tracing::info!("\"{n}\" filesystem(s) thawed");
                    }
                    Err(e) => tracing::error!("Unable to thaw filesystem: \"{e}\""),
                }
            }
        }
    }
}
