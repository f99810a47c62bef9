//! `qmprestore snapshot`: list, create, apply or delete an image's internal snapshots.

use crate::report::print;
use anyhow::Result;
use qmpbackup::chain::info;
use qmpbackup::qcow2::write::{SnapshotOp, Writer};
use qmpbackup::qcow2::{Disk, Qcow2};
use std::path::PathBuf;
use std::process::ExitCode;

pub const HELP: &str = "Examples:
  qmprestore snapshot -l FULL-1700000000-disk.qcow2
  qmprestore snapshot -c before-upgrade disk.qcow2
  qmprestore snapshot -a before-upgrade disk.qcow2";

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("action").required(true).args(["list", "create", "apply", "delete"])))]
pub struct Args {
    /// List snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot with this name.
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Revert the disk to this snapshot (id or name).
    #[arg(short = 'a', value_name = "NAME")]
    apply: Option<String>,
    /// Delete this snapshot (id or name).
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    file: PathBuf,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let file = &a.file;
    if a.list {
        let disk = Disk::open_alone(file)?;
        return match disk.qcow2().filter(|q| !q.snapshots().is_empty()) {
            Some(q) => print(&info::snapshot_table(&info::snapshots(q))),
            None => Ok(ExitCode::SUCCESS),
        };
    }
    let op = match (&a.create, &a.apply, &a.delete) {
        (Some(name), _, _) => SnapshotOp::Create(name),
        (_, Some(key), _) => SnapshotOp::Apply(key),
        (_, _, Some(key)) => SnapshotOp::Delete(key),
        _ => return Ok(ExitCode::SUCCESS),
    };
    // A request that cannot succeed is refused before the writer opens the image (opening a
    // dirty image for writing repairs it).
    let q = Qcow2::open(file)?;
    op.refuse(q.snapshots(), q.data_file().is_some())
        .map_err(|k| k.at(file))?;
    drop(q);
    let mut w = Writer::open(file)?;
    match op {
        SnapshotOp::Create(name) => drop(w.create_snapshot(name)?),
        SnapshotOp::Apply(key) => w.apply_snapshot(key)?,
        SnapshotOp::Delete(key) => w.delete_snapshot(key)?,
    }
    w.flush()?;
    Ok(ExitCode::SUCCESS)
}
