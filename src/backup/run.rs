//! One backup run: the QMP dialogue from pre-flight to the renamed, checksummed files.
//!
//! Order of events, and why:
//! 1. Everything that can fail without touching the VM happens first: device selection, the
//!    level of each disk, target and fleece images (created natively), the run record.
//! 2. Target, fleece and copy-before-write nodes are added; the guest's disks are untouched.
//! 3. The snapshot point. If the VM runs it is stopped for this step only (a few
//!    milliseconds). A new bitmap `N` starts recording, then every device is switched onto
//!    its filter: the backup shows the disks as they were at the switch, all disks at one
//!    instant. `N` started before the switch, so it holds every write after it (plus perhaps
//!    a few from before, which the next incremental copies once more: harmless). The chain
//!    bitmap `B` is not touched: it still holds every write since the previous backup.
//! 4. The jobs read the snapshot (an incremental: through a copy of `B` made after the switch)
//!    and are started in one transaction with grouped completion: one failure cancels all.
//! 5. Only after every job succeeded, the graph is taken down, the files are synced and
//!    renamed to their final names, their manifests written — and then, in one transaction,
//!    `B` becomes `N`. A run that fails or is killed anywhere before leaves `B` as it was, so
//!    the next incremental still covers everything (the original cleared `B` when the job
//!    started and lost the delta of every failed incremental).

use super::device::{parse_query_block, Device, Selection};
use super::error::{BackupError, Result};
use super::fleece;
use super::job::{self, Progress};
use super::layout::{self, Target};
use super::plan::{self, ChainState, Decision, Requested};
use super::state::{DiskRecord, RunLock, RunRecord};
use super::vm::VmState;
use crate::qcow2::create::{create_file, CreateOptions};
use crate::qcow2::{Disk, Format};
use crate::qmp::{Address, Agent, FreezeState, Qmp};
use crate::store::folder::BackupDir;
use crate::store::folder::{newest_epoch, quarantine, quarantined};
use crate::store::manifest::{self, Manifest};
use crate::store::name::{file_name, partial_name, Level};
use crate::store::place::{Folder, Place};
use crate::store::time::month_of;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Everything `qmpbackup backup` can be asked.
pub struct Options {
    pub level: Requested,
    pub target: PathBuf,
    pub selection: Selection,
    pub monthly: bool,
    pub subdirs: bool,
    pub timestamp: bool,
    pub symlink: bool,
    pub quiesce: bool,
    pub agent: Option<Address>,
    pub pause: bool,
    pub speed_limit: u64,
    pub progress: Progress,
    pub cbw_timeout: u64,
    pub compress: bool,
    pub uuid: Option<String>,
    pub remove_delay: Duration,
    /// How QEMU opens the backup targets.
    pub target_io: fleece::FileIo,
    pub fleece_dir: Option<PathBuf>,
    /// INC files name their predecessor as backing file (`--link-incs`). The original's
    /// restore procedures need standalone INCs, the default.
    pub link_incs: bool,
}

/// A disk whose level is decided.
struct Planned {
    dev: Device,
    name: String,
    dir: PathBuf,
    decision: Decision,
}

/// One disk in a run.
struct Disk_ {
    dev: Device,
    name: String,
    decision: Decision,
    dir: PathBuf,
    final_path: PathBuf,
    target_format: Format,
    rec: DiskRecord,
    // Progress through the graph changes, for teardown.
    target_added: bool,
    fleece_added: bool,
    cbw_added: bool,
    switched: bool,
    snap_added: bool,
    next_added: bool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs a backup over `qmp` of a VM whose pre-flight gave `vm`. `interrupted` is set by the
/// SIGINT/SIGTERM handler.
pub fn run(qmp: &mut Qmp, opts: &Options, vm: &VmState, interrupted: &AtomicBool) -> Result<()> {
    let epoch_now = now();
    let month = opts.monthly.then(|| month_of(epoch_now));
    let target = Target::prepare(&opts.target, month.as_deref(), opts.subdirs)
        .map_err(BackupError::io(&opts.target))?;
    if target.new_month {
        tracing::info!(
            "New monthly directory will be created: {}",
            target.root.display()
        );
    }
    tracing::info!("Backup target directory: {}", target.root.display());
    if opts.compress {
        tracing::info!("Enabling compress option for backup operation.");
    }
    if opts.selection.include_raw {
        tracing::info!("Including raw devices in backup operation.");
    }
    let mut lock = RunLock::acquire(&target.root).map_err(BackupError::io(&target.root))?;
    let ours: Vec<PathBuf> = match lock.stale.take() {
        Some(stale) => recover(qmp, &stale, &mut lock)?,
        None => Vec::new(),
    };
    // Only now: a killed run's filters are gone and the devices show their own nodes.
    let devices = select(qmp, &opts.selection)?;

    let existing_uuid = target.uuid().map_err(BackupError::io(target.uuid_path()))?;
    let mut disks = Vec::new();
    let mut refusals = Vec::new();
    let mut set_aside = Vec::new();
    for (dev, name) in devices {
        let dir = target.disk_dir(&name);
        std::fs::create_dir_all(&dir).map_err(BackupError::io(&dir))?;
        let state = chain_state(&dir, &name, &existing_uuid, target.new_month, &ours)?;
        match plan::decide(opts.level, &dev, &state) {
            Ok(decision) => {
                if let Some(why) = &decision.reason {
                    tracing::warn!("{}: taking a full backup: {why}", dev.name);
                }
                set_aside.extend(state.partials.iter().map(|p| dir.join(p)));
                disks.push(Planned {
                    dev,
                    name,
                    dir,
                    decision,
                });
            }
            Err(e) => refusals.push(e),
        }
    }
    if !refusals.is_empty() {
        // Nothing moved: the partial files stay for whoever looks at the folder next (the
        // restore commands refuse it too, as the original's did).
        return Err(BackupError::Refused(refusals.join("\n")));
    }
    if opts.level == Requested::Auto {
        let level = |l| disks.iter().all(|d| d.decision.level == l);
        tracing::info!(
            "Auto backup mode set to: {}",
            if level(Level::Inc) {
                "inc"
            } else if level(Level::Full) {
                "full"
            } else {
                "inc, full for some disks"
            }
        );
    }
    // A new FULL or COPY starts afresh: the partial files before it are set aside (the
    // original's stayed and blocked every later incremental).
    for p in set_aside {
        if p.exists() {
            let (place, name) = Folder::of_file(&p);
            let to = quarantine(&place, &name).map_err(BackupError::io(&p))?;
            tracing::warn!(
                "partial file {} of an interrupted run set aside as {}",
                p.display(),
                to.display()
            );
        }
    }

    // The chain id: kept when a chain exists, else --uuid or a new one.
    let chained = disks.iter().any(|d| d.decision.level.chained());
    let uuid = match (&existing_uuid, &opts.uuid) {
        (Some(u), asked) if chained => {
            if asked.as_ref().is_some_and(|a| a != u) {
                tracing::warn!(
                    "--uuid {} ignored: {} already holds chain {u}",
                    asked.as_deref().unwrap_or_default(),
                    target.root.display()
                );
            }
            tracing::info!(
                "Current Backup UUID: [{u}] for folder [{}]",
                target.root.display()
            );
            Some(u.clone())
        }
        (Some(u), _) => Some(u.clone()),
        (None, asked) if chained => {
            let u = match asked {
                Some(a) => a.clone(),
                None => layout::new_uuid().map_err(BackupError::io("/dev/urandom"))?,
            };
            target
                .write_uuid(&u)
                .map_err(BackupError::io(target.uuid_path()))?;
            tracing::info!("Backup UUID: [{u}]");
            Some(u)
        }
        (None, _) => None,
    };

    let dirs: Vec<PathBuf> = disks.iter().map(|d| d.dir.clone()).collect();
    let epoch = unique_epoch(epoch_now, &dirs);
    let tag = run_tag(qmp)?;
    let fleece_dir = opts
        .fleece_dir
        .clone()
        .unwrap_or_else(|| target.fleece_dir());
    std::fs::create_dir_all(&fleece_dir).map_err(BackupError::io(&fleece_dir))?;

    let mut run_disks = Vec::new();
    for (
        i,
        Planned {
            dev,
            name,
            dir,
            decision,
        },
    ) in disks.into_iter().enumerate()
    {
        let (target_node, fleece_node, cbw_node, snap_node, job) =
            fleece::names(&tag, i, &dev.name);
        // --no-timestamp names full and copy backups only: a delta always carries its time.
        let timestamp = opts.timestamp || decision.level.is_delta();
        let file = file_name(decision.level, epoch, &name, timestamp);
        let final_path = dir.join(&file);
        // A raw disk's full copy stays raw; a delta is qcow2 (raw cannot tell unchanged from
        // zeroed blocks).
        let target_format = if dev.is_raw() && !decision.level.is_delta() {
            Format::Raw
        } else {
            Format::Qcow2
        };
        let next_bitmap = match (&uuid, decision.level) {
            (Some(u), level) if level.chained() => Some(format!("{}-next", plan::bitmap_name(u))),
            _ => None,
        };
        let rec = DiskRecord {
            device: dev.name.clone(),
            node: dev.node.clone(),
            qdev: dev.qdev.clone(),
            job,
            target_node,
            fleece_node: fleece_node.clone(),
            cbw_node,
            snap_node,
            next_bitmap,
            partial: dir.join(partial_name(&file)),
            fleece: fleece_dir.join(format!("{fleece_node}.qcow2")),
        };
        run_disks.push(Disk_ {
            dev,
            name,
            decision,
            dir,
            final_path,
            target_format,
            rec,
            target_added: false,
            fleece_added: false,
            cbw_added: false,
            switched: false,
            snap_added: false,
            next_added: false,
        });
    }
    let mut r = Run {
        qmp,
        opts,
        target: &target,
        lock: &mut lock,
        disks: run_disks,
        uuid,
        epoch,
        was_running: vm.running(),
        paused_by_us: false,
        stopped: false,
        agent: None,
        frozen: false,
    };
    let result = r.execute(interrupted);
    let cleaned = r.teardown();
    match result {
        Ok(()) => {
            cleaned?;
            r.finish()
        }
        Err(e) => {
            r.discard(cleaned.is_ok());
            Err(e)
        }
    }
}

struct Run<'a> {
    qmp: &'a mut Qmp,
    opts: &'a Options,
    target: &'a Target,
    lock: &'a mut RunLock,
    disks: Vec<Disk_>,
    uuid: Option<String>,
    epoch: u64,
    was_running: bool,
    paused_by_us: bool,
    stopped: bool,
    agent: Option<Agent>,
    frozen: bool,
}

impl Run<'_> {
    /// Files, graph, snapshot point and jobs. On error the caller tears down.
    fn execute(&mut self, interrupted: &AtomicBool) -> Result<()> {
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
    fn resume(&mut self) {
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

    /// Removes every node the run added, in the order QEMU accepts, and resumes the VM.
    /// Returns an error if something could not be removed.
    fn teardown(&mut self) -> Result<()> {
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
    fn finish(&mut self) -> Result<()> {
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
            let (file_size, crc32) = place
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
                file_size,
                extent_size: manifest::EXTENT_SIZE,
                crc32,
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
                "Saved backup file: [{}], size: [{file_size}]",
                d.final_path.display()
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
    fn discard(&mut self, graph_clean: bool) {
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

fn check(interrupted: &AtomicBool) -> Result<()> {
    if interrupted.load(Ordering::SeqCst) {
        Err(BackupError::Interrupted)
    } else {
        Ok(())
    }
}

/// A random tag for this run's node names and job ids that no node or job in QEMU uses yet:
/// a killed run's leftovers (or its late events) must never be taken for ours.
fn run_tag(qmp: &mut Qmp) -> Result<String> {
    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    let jobs = qmp.execute("query-block-jobs", json!({}))?;
    let taken = |tag: &str| {
        let node = format!("qmpbackup-{tag}");
        let job = format!("qmpbackup.{tag}");
        nodes.as_array().into_iter().flatten().any(|n| {
            n["node-name"]
                .as_str()
                .is_some_and(|x| x.starts_with(&node))
        }) || jobs
            .as_array()
            .into_iter()
            .flatten()
            .any(|j| j["device"].as_str().is_some_and(|x| x.starts_with(&job)))
    };
    loop {
        let random = layout::new_uuid().map_err(BackupError::io("/dev/urandom"))?;
        // Five hex digits keep the longest name (qmpbackup-<tag><index>-fleece) within 31.
        let tag = random[..5].to_string();
        if !taken(&tag) {
            return Ok(tag);
        }
    }
}

/// The selected devices with the names their backups get. Disks whose image files share a
/// base name get the device name as prefix, so they never write into each other's files.
pub fn select(qmp: &mut Qmp, selection: &Selection) -> Result<Vec<(Device, String)>> {
    let reply = qmp.execute("query-block", json!({}))?;
    let mut devices = Vec::new();
    let mut known = Vec::new();
    for d in parse_query_block(&reply) {
        if let Ok(d) = &d {
            known.push((d.name.clone(), d.node.clone()));
        }
        match d {
            Ok(d) if d.node.starts_with("qmpbackup-") => {
                return Err(BackupError::Refused(format!(
                    "{}: still routed through node {} of an interrupted qmpbackup run into another \
                     target directory; run a backup into that directory once to clean it up",
                    d.name, d.node
                )))
            }
            Ok(d) => match selection.left_out(&d) {
                None => devices.push(d),
                Some((tracing::Level::WARN, why)) => tracing::warn!("{why}"),
                Some((_, why)) => tracing::info!("{why}"),
            },
            Err(why) => tracing::warn!("skipping a device: {why}"),
        }
    }
    for name in selection.include.iter().chain(&selection.exclude) {
        if !known.iter().any(|(n, node)| n == name || node == name) {
            tracing::warn!(
                "--include/--exclude names {name}, which is no device or node of this VM"
            );
        }
    }
    if devices.is_empty() {
        return Err(BackupError::Refused(
            "VM does not have any devices suitable for backup (see --include, --exclude, --include-raw)"
                .into(),
        ));
    }
    let names: Vec<String> = devices.iter().map(Device::basename).collect();
    Ok(devices
        .into_iter()
        .zip(names.iter())
        .map(|(d, base)| {
            let name = if names.iter().filter(|n| *n == base).count() > 1 {
                let prefix: String = d
                    .name
                    .chars()
                    .map(|c| if c == '/' || c == '#' { '_' } else { c })
                    .collect();
                tracing::warn!(
                    "{}: image name {base} is not unique in this VM: backups named {prefix}-{base}",
                    d.name
                );
                format!("{prefix}-{base}")
            } else {
                base.clone()
            };
            (d, name)
        })
        .collect())
}

/// What `dir` holds of disk `name`'s chain. The partial files of our own interrupted run
/// (`ours`) are removed here; every other `*.partial` in the folder is listed (and set aside
/// only once the run is decided: a refused incremental leaves them where they are).
fn chain_state(
    dir: &Path,
    name: &str,
    uuid: &Option<String>,
    new_month: bool,
    ours: &[PathBuf],
) -> Result<ChainState> {
    let bd = BackupDir::scan_disk(dir, name).map_err(|e| BackupError::Refused(e.to_string()))?;
    let mut partials = Vec::new();
    for p in bd.partials.iter().map(|p| &p.path) {
        if ours.contains(p) {
            std::fs::remove_file(p).map_err(BackupError::io(p))?;
            tracing::warn!(
                "removed partial file {} of our interrupted run",
                p.display()
            );
        } else if let Some(n) = p.file_name() {
            partials.push(n.to_string_lossy().into_owned());
        }
    }
    // Partial files of another tool's run after the current chain's FULL mean the chain
    // bitmap cannot be trusted (the original clears it when a job starts) until a new FULL.
    // Older ones predate the chain: harmless once set aside. A name without epoch is dated by
    // its mtime (kept when it is set aside).
    let chain = bd.chain().ok();
    let full_epoch = chain.as_ref().map(|c| c.files[0].epoch);
    let foreign = quarantined(&Folder::new(dir))
        .map_err(BackupError::io(dir))?
        .into_iter()
        .filter(|(name, mtime)| {
            let epoch = crate::store::name::parse_name(name.trim_end_matches(".partial"))
                .map_or(*mtime, |p| p.1);
            full_epoch.is_some_and(|f| epoch > f)
        })
        .map(|(name, _)| name)
        .collect();
    let last = match chain {
        Some(chain) => {
            let f = chain.files.last().expect("a chain has a FULL");
            let size = match &f.pushed {
                Some(p) => p.virtual_size,
                None => Disk::open_alone(&f.path).map(|d| d.size()).map_err(|e| {
                    BackupError::Refused(format!("the chain's newest file is unreadable: {e}"))
                })?,
            };
            Some((f.name.clone(), size))
        }
        None => None,
    };
    Ok(ChainState {
        dir: dir.to_path_buf(),
        uuid: uuid.clone(),
        new_month,
        last,
        partials,
        foreign_partials: foreign,
    })
}

/// An epoch later than every backup in `dirs`: two runs in one second get distinct names
/// (the original overwrote the first).
fn unique_epoch(now: u64, dirs: &[PathBuf]) -> u64 {
    let places: Vec<Folder> = dirs.iter().map(|d| Folder::new(d)).collect();
    let places: Vec<&dyn Place> = places.iter().map(|p| p as &dyn Place).collect();
    let newest = newest_epoch(&places);
    if newest < now {
        return now;
    }
    if newest - now <= 2 {
        std::thread::sleep(Duration::from_millis(1000 * (newest - now + 1)));
        let t = self::now();
        if t > newest {
            return t;
        }
    }
    tracing::warn!(
        "backups dated in the future (epoch {newest}): is the clock right? naming this one {}",
        newest + 1
    );
    newest + 1
}

fn target_cluster_size(dev: &Device) -> u64 {
    dev.cluster_size
        .filter(|c| c.is_power_of_two() && (512..=2 << 20).contains(c))
        .unwrap_or(65536)
}

fn fleece_options(dev: &Device) -> CreateOptions {
    CreateOptions {
        size: dev.virtual_size,
        cluster_size: target_cluster_size(dev),
        ..Default::default()
    }
}

fn create_image(path: &Path, opts: &CreateOptions) -> Result<()> {
    create_file(path, opts, true).map(drop)?;
    Ok(())
}

/// The `.partial` target: qcow2 with the source's compat, cluster size and lazy refcounts. An
/// INC is a standalone delta, as the original writes it (its restore procedures copy and
/// delete INCs one at a time, and fail on INCs that name a predecessor); with `link` it names
/// its predecessor as backing file, so the chain describes itself and QEMU or qemu-img can
/// open the newest INC directly. A raw source's FULL or COPY is a sparse raw file.
fn create_target(d: &Disk_, link: bool) -> Result<()> {
    if d.target_format == Format::Raw {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&d.rec.partial)
            .map_err(BackupError::io(&d.rec.partial))?;
        f.set_len(d.dev.virtual_size)
            .map_err(BackupError::io(&d.rec.partial))?;
        return Ok(());
    }
    let backing = match d.decision.parent.as_ref().filter(|_| link) {
        Some(parent) => {
            let path = d.dir.join(parent);
            // A predecessor uploaded and removed (--push-only) is described by its manifest.
            let fmt = match Manifest::read(&Folder::new(&d.dir), parent) {
                Ok(m) if !path.exists() => Format::from_name(&m.format).unwrap_or(Format::Qcow2),
                _ => Disk::open_alone(&path)?.format(),
            };
            Some((
                parent.clone(),
                Some(if fmt == Format::Raw {
                    Format::Raw
                } else {
                    Format::Qcow2
                }),
            ))
        }
        None => None,
    };
    let opts = CreateOptions {
        size: d.dev.virtual_size,
        cluster_size: target_cluster_size(&d.dev),
        version: if d.dev.compat.as_deref() == Some("0.10") {
            2
        } else {
            3
        },
        lazy_refcounts: d.dev.lazy_refcounts && d.dev.compat.as_deref() != Some("0.10"),
        backing,
        ..Default::default()
    };
    create_image(&d.rec.partial, &opts)
}

/// Cleans up after a run that was killed: its jobs, nodes and temporary bitmaps in QEMU (if
/// this is the same QEMU), its fleece files. Returns its partial files, which the caller
/// removes (they are ours: the chain bitmap was never touched).
fn recover(qmp: &mut Qmp, stale: &RunRecord, lock: &mut RunLock) -> Result<Vec<PathBuf>> {
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
