//! Phase 1 of a run: everything that can fail without touching the VM's block graph. The
//! devices to back up and their names, each disk's level (and the partial files of earlier
//! runs, set aside only once the run is decided), the chain id, a unique epoch for the file
//! names, and a tag for node names and job ids that nothing in QEMU uses yet.

use super::{Disk_, Options};
use crate::backup::device::{parse_query_block, Device, Selection};
use crate::backup::error::{BackupError, Result};
use crate::backup::fleece;
use crate::backup::layout::{self, Target};
use crate::backup::plan::{self, ChainState, Decision, Requested};
use crate::backup::state::DiskRecord;
use crate::qcow2::{Disk, Format};
use crate::qmp::Qmp;
use crate::store::folder::{newest_epoch, quarantine, quarantined, BackupDir};
use crate::store::name::{file_name, partial_name, Level};
use crate::store::place::{Folder, Place};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a run will do, decided before the VM is touched.
pub(super) struct Prepared {
    pub disks: Vec<Disk_>,
    pub uuid: Option<String>,
    pub epoch: u64,
}

/// A disk whose level is decided.
struct Planned {
    dev: Device,
    name: String,
    dir: PathBuf,
    decision: Decision,
}

/// Decides every selected disk's level and names its files. `ours` are the partial files of
/// our own killed run (removed, not set aside); `epoch_now` the run's time.
pub(super) fn prepare(
    qmp: &mut Qmp,
    opts: &Options,
    target: &Target,
    ours: &[PathBuf],
    epoch_now: u64,
) -> Result<Prepared> {
    // Only now: a killed run's filters are gone and the devices show their own nodes.
    let devices = select(qmp, &opts.selection)?;
    let existing_uuid = target.uuid().map_err(BackupError::io(target.uuid_path()))?;
    let mut disks = Vec::new();
    let mut refusals = Vec::new();
    let mut set_aside = Vec::new();
    for (dev, name) in devices {
        let dir = target.disk_dir(&name);
        std::fs::create_dir_all(&dir).map_err(BackupError::io(&dir))?;
        let state = chain_state(&dir, &name, &existing_uuid, target.new_month, ours)?;
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
    let chained = disks.iter().any(|d| d.decision.level.chained());
    let uuid = chain_id(opts, target, &existing_uuid, chained)?;
    let dirs: Vec<PathBuf> = disks.iter().map(|d| d.dir.clone()).collect();
    let epoch = unique_epoch(epoch_now, &dirs);
    let tag = run_tag(qmp)?;
    let fleece_dir = opts
        .fleece_dir
        .clone()
        .unwrap_or_else(|| target.fleece_dir());
    std::fs::create_dir_all(&fleece_dir).map_err(BackupError::io(&fleece_dir))?;
    let disks = disks
        .into_iter()
        .enumerate()
        .map(|(i, p)| run_disk(i, p, &tag, epoch, &uuid, &fleece_dir, opts.timestamp))
        .collect();
    Ok(Prepared { disks, uuid, epoch })
}

/// The chain id: kept when a chain exists, else --uuid or a new one (written to the target).
fn chain_id(
    opts: &Options,
    target: &Target,
    existing: &Option<String>,
    chained: bool,
) -> Result<Option<String>> {
    Ok(match (existing, &opts.uuid) {
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
    })
}

/// Disk number `i` of run `tag`: its node names, job id, file names and bitmap.
fn run_disk(
    i: usize,
    Planned {
        dev,
        name,
        dir,
        decision,
    }: Planned,
    tag: &str,
    epoch: u64,
    uuid: &Option<String>,
    fleece_dir: &Path,
    timestamp: bool,
) -> Disk_ {
    let (target_node, fleece_node, cbw_node, snap_node, job) = fleece::names(tag, i, &dev.name);
    // --no-timestamp names full and copy backups only: a delta always carries its time.
    let timestamp = timestamp || decision.level.is_delta();
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
    Disk_ {
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
        let t = super::now();
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
