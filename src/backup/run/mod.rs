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

//!
//! The phases live in submodules: [`prepare`] (1), [`files`] (the images created in 1),
//! [`graph`] (2 to 4), [`finish`] (5, and the teardown and discard after a failure), and
//! [`recover`] (the clean-up after a killed run, before anything else).

mod files;
mod finish;
mod graph;
mod prepare;
mod recover;

use super::device::{Device, Selection};
use super::error::{BackupError, Result};
use super::fleece;
use super::job::Progress;
use super::layout::Target;
use super::plan::{Decision, Requested};
use super::state::{DiskRecord, RunLock};
use super::vm::VmState;
use crate::qcow2::Format;
use crate::qmp::{Address, Agent, Qmp};
use crate::store::time::month_of;
use std::path::PathBuf;
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
        Some(stale) => recover::recover(qmp, &stale, &mut lock)?,
        None => Vec::new(),
    };
    let prepare::Prepared { disks, uuid, epoch } =
        prepare::prepare(qmp, opts, &target, &ours, epoch_now)?;
    let mut r = Run {
        qmp,
        opts,
        target: &target,
        lock: &mut lock,
        disks,
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

fn check(interrupted: &AtomicBool) -> Result<()> {
    if interrupted.load(Ordering::SeqCst) {
        Err(BackupError::Interrupted)
    } else {
        Ok(())
    }
}
