//! Phase 5 of a run, and what follows a failure: the graph taken down in the order QEMU
//! accepts; after success durable files under their final names, manifests, then the chain
//! bitmaps moved on in one transaction; after a failure nothing of the run kept.

use super::files::target_cluster_size;
use super::{Disk_, Run};
use crate::backup::error::{BackupError, Result};
use crate::backup::{fleece, layout, plan};
use crate::qcow2::Format;
use crate::store::manifest::{self, Manifest};
use crate::store::place::Folder;
use crate::store::place::Place;
use serde_json::json;

impl Run<'_> {
    /// Removes every node the run added, in the order QEMU accepts, and resumes the VM.
    /// Returns an error if something could not be removed.
    pub(super) fn teardown(&mut self) -> Result<()> {
        self.resume();
        if !self.opts.remove_delay.is_zero() {
            tracing::info!(
                "Delay removal of devices by [{}] seconds",
                self.opts.remove_delay.as_secs()
            );
            std::thread::sleep(self.opts.remove_delay);
        }
        let mut failed = Vec::new();
        let qmp = &mut *self.qmp;
        let mut del = |node: &str| {
            if let Err(e) = qmp.execute("blockdev-del", json!({"node-name": node})) {
                failed.push(format!("blockdev-del {node}: {e}"));
            }
        };
        if self.disks.iter().any(|d| d.snap_added) {
            tracing::info!("Removing snapshot-access devices from virtual machine");
        }
        for d in &mut self.disks {
            if d.snap_added {
                del(&d.rec.snap_node);
                d.snap_added = false;
            }
        }
        if self.disks.iter().any(|d| d.switched) {
            tracing::info!("Disable copy-before-write filter");
        }
        for d in &mut self.disks {
            if d.switched {
                let qdev = d.dev.qdev.clone().unwrap_or_default();
                match self
                    .qmp
                    .execute("qom-set", fleece::switch(&qdev, &d.dev.node))
                {
                    Ok(_) => d.switched = false,
                    Err(e) => failed.push(format!(
                        "{}: switching back to {}: {e}",
                        d.dev.name, d.dev.node
                    )),
                }
            }
        }
        let qmp = &mut *self.qmp;
        let mut del = |node: &str| match qmp.execute("blockdev-del", json!({"node-name": node})) {
            Ok(_) => true,
            Err(e) => {
                failed.push(format!("blockdev-del {node}: {e}"));
                false
            }
        };
        let step = |disks: &[Disk_], added: fn(&Disk_) -> bool, what: &str| {
            if disks.iter().any(added) {
                tracing::info!("Removing {what} devices from virtual machine");
            }
        };
        step(&self.disks, |d| d.cbw_added && !d.switched, "cbw");
        for d in &mut self.disks {
            if d.cbw_added && !d.switched && del(&d.rec.cbw_node) {
                d.cbw_added = false;
            }
        }
        step(&self.disks, |d| d.target_added, "backup target");
        for d in &mut self.disks {
            if d.target_added && del(&d.rec.target_node) {
                d.target_added = false;
            }
        }
        step(&self.disks, |d| d.fleece_added && !d.cbw_added, "fleece");
        for d in &mut self.disks {
            if d.fleece_added && !d.cbw_added && del(&d.rec.fleece_node) {
                d.fleece_added = false;
            }
        }
        if self.paused_by_us {
            match self.qmp.execute("cont", json!({})) {
                Ok(_) => {
                    self.paused_by_us = false;
                    tracing::info!("Resumed virtual machine");
                }
                Err(e) => failed.push(format!("resuming the VM: {e}")),
            }
        }
        tracing::info!("Removing fleece image files");
        for d in &self.disks {
            let _ = std::fs::remove_file(&d.rec.fleece);
        }
        if let Some(dir) = self.disks.first().and_then(|d| d.rec.fleece.parent()) {
            let _ = std::fs::remove_dir(dir);
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(BackupError::Failed(format!(
                "the VM's block graph could not be fully restored (the next run retries): {}",
                failed.join("; ")
            )))
        }
    }

    /// After success: durable files under their final names, manifests, then the bitmaps.
    pub(super) fn finish(&mut self) -> Result<()> {
        tracing::info!("Renaming partial files");
        for d in &self.disks {
            let f = std::fs::File::open(&d.rec.partial).map_err(BackupError::io(&d.rec.partial))?;
            f.sync_all().map_err(BackupError::io(&d.rec.partial))?;
            let (place, partial) = Folder::of_file(&d.rec.partial);
            let (_, file_name) = Folder::of_file(&d.final_path);
            let at = BackupError::io(&d.final_path);
            place.rename(&partial, &file_name).map_err(at)?;
            place
                .sync(&file_name)
                .map_err(BackupError::io(&d.final_path))?;
            if !self.opts.timestamp && !d.decision.level.is_delta() && self.opts.symlink {
                layout::update_symlink(&d.dir, d.decision.level, &d.name, &file_name)
                    .map_err(BackupError::io(&d.dir))?;
            }
            let sums = place
                .open(&file_name)
                .and_then(|data| manifest::checksums(&*data))
                .map_err(BackupError::io(&d.final_path))?;
            let m = Manifest {
                manifest_version: manifest::MANIFEST_VERSION,
                tool: format!("qmpbackup {}", env!("CARGO_PKG_VERSION")),
                file: file_name,
                level: d.decision.level,
                epoch: self.epoch,
                uuid: self.uuid.clone().filter(|_| d.decision.level.chained()),
                bitmap: self
                    .uuid
                    .as_deref()
                    .filter(|_| d.decision.level.chained())
                    .map(plan::bitmap_name),
                device: d.dev.name.clone(),
                node: d.dev.node.clone(),
                qdev: d.dev.qdev.clone(),
                source_file: d.dev.filename.clone(),
                qemu_version: self.qmp.version.to_string(),
                format: d.target_format.name().to_string(),
                virtual_size: d.dev.virtual_size,
                cluster_size: (d.target_format == Format::Qcow2)
                    .then(|| target_cluster_size(&d.dev)),
                parent: d.decision.parent.clone(),
                sums,
            };
            m.write(&place)
                .map_err(BackupError::io(place.locate(&manifest::name_for(&m.file))))?;
            if d.decision.level.starts_chain() {
                let config = serde_json::to_vec_pretty(&d.dev.image).unwrap_or_default();
                let cpath = self.target.config_path(&d.name);
                let (root, config_name) = Folder::of_file(&cpath);
                root.write(&config_name, &config)
                    .map_err(BackupError::io(&cpath))?;
                tracing::info!("Saved image info: [{}]", cpath.display());
            }
            tracing::info!(
                "Saved backup file: [{}], size: [{}]",
                d.final_path.display(),
                m.sums.file_size
            );
        }
        self.rotate_bitmaps();
        self.lock
            .clear()
            .map_err(BackupError::io(".qmpbackup-run"))?;
        Ok(())
    }

    /// B := N for every chained disk, in one transaction. If it fails, B still covers every
    /// write since the previous backup: the next incremental copies a little more.
    fn rotate_bitmaps(&mut self) {
        let Some(uuid) = self.uuid.clone() else {
            return;
        };
        for d in &mut self.disks {
            let Some(next) = &d.rec.next_bitmap else {
                continue;
            };
            let node = &d.dev.node;
            let existing = d
                .decision
                .bitmap
                .clone()
                .or_else(|| plan::chain_bitmap(&d.dev, &uuid).map(|b| b.name.clone()));
            let first = match &existing {
                Some(b) => {
                    json!({"type": "block-dirty-bitmap-clear", "data": {"node": node, "name": b}})
                }
                None => json!({"type": "block-dirty-bitmap-add", "data": {
                    "node": node, "name": plan::bitmap_name(&uuid),
                    "persistent": d.dev.can_persist_bitmaps()}}),
            };
            let chain = existing.unwrap_or_else(|| plan::bitmap_name(&uuid));
            let actions = json!([
                first,
                {"type": "block-dirty-bitmap-merge", "data": {"node": node, "target": chain, "bitmaps": [next]}},
                {"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": next}},
            ]);
            match self
                .qmp
                .execute("transaction", json!({ "actions": actions }))
            {
                Ok(_) => d.next_added = false,
                Err(e) => tracing::error!(
                    "{}: the backup is complete, but its chain bitmap could not be updated ({e}); \
                     the next incremental copies more than needed, or auto takes a full",
                    d.dev.name
                ),
            }
        }
        self.remove_next_bitmaps();
    }

    fn remove_next_bitmaps(&mut self) {
        for d in &mut self.disks {
            if let (true, Some(n)) = (d.next_added, &d.rec.next_bitmap) {
                match self.qmp.execute(
                    "block-dirty-bitmap-remove",
                    json!({"node": d.dev.node, "name": n}),
                ) {
                    Ok(_) => d.next_added = false,
                    Err(e) => tracing::warn!("{}: removing bitmap {n}: {e}", d.dev.name),
                }
            }
        }
    }

    /// After a failure: nothing of this run stays (the chain bitmaps were never touched).
    pub(super) fn discard(&mut self, graph_clean: bool) {
        self.remove_next_bitmaps();
        for d in &self.disks {
            if let Err(e) = std::fs::remove_file(&d.rec.partial) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("{}: {e}", d.rec.partial.display());
                }
            }
        }
        if graph_clean {
            if let Err(e) = self.lock.clear() {
                tracing::warn!("clearing the run record: {e}");
            }
        }
    }
}
