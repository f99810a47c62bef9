//! `qmprestore commit` and `snapshotrebase`: the commands that fold INCs into the FULL in
//! place. They take the same options and differ in what the FULL keeps.

use crate::options::{InPlaceArgs, ProgressArg};
use crate::report::print;
use anyhow::Result;
use qmpbackup::chain::commit::{self, FoldOptions};
use qmpbackup::chain::snapshot_rebase;
use std::process::ExitCode;

pub const COMMIT_HELP: &str = "Examples:
  qmprestore commit --dir /backup/vm1/disk1.qcow2 --dry-run
  qmprestore commit --dir /backup/vm1/disk1.qcow2 --until INC-1700000600

The FULL is flushed before any INC is deleted; an interrupted commit is completed by running
it again. INCs after the restore point stay valid (the next one is re-linked to the FULL).";

pub const SNAPSHOT_REBASE_HELP: &str = "Example:
  qmprestore snapshotrebase --dir /backup/vm1/disk1.qcow2
  qemu-img snapshot -l /backup/vm1/disk1.qcow2/FULL-1700000000-disk1.qcow2

The FULL gets the snapshot FULL-BACKUP, then one snapshot per INC named after its time
(%Y-%m-%d-%H:%M:%S, local time); each INC is deleted once its snapshot is on disk.";

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    in_place: InPlaceArgs,
    #[command(flatten)]
    progress: ProgressArg,
}

impl Args {
    fn options(&self) -> FoldOptions {
        FoldOptions {
            select: self.in_place.chain.select.select(),
            dry_run: self.in_place.dry_run,
            rate_limit: self.in_place.chain.rate_limit,
            progress: self.progress.progress,
        }
    }
}

pub fn commit(a: Args) -> Result<ExitCode> {
    print(&commit::commit(&a.in_place.chain.dir, &a.options())?.human())
}

pub fn snapshot_rebase(a: Args) -> Result<ExitCode> {
    let plan = snapshot_rebase::snapshot_rebase(&a.in_place.chain.dir, &a.options())?;
    print(&snapshot_rebase::describe(&plan, a.in_place.dry_run))
}
