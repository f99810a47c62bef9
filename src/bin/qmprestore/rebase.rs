//! `qmprestore rebase`: links each INC to its predecessor in place (headers only).

use crate::options::InPlaceArgs;
use crate::report::print;
use anyhow::Result;
use qmpbackup::chain::rebase::{self, RebaseOptions};
use std::process::ExitCode;

pub const HELP: &str = "Example:
  qmprestore rebase --dir /backup/vm1/disk1.qcow2 --until INC-1700000600 --dry-run
  qemu-system-x86_64 ... -drive file=/backup/vm1/disk1.qcow2/image

Only headers change (backing file name and format, as qemu-img rebase -u); data is untouched.";

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    in_place: InPlaceArgs,
    /// Replace an existing `image` symlink.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let opts = RebaseOptions {
        select: a.in_place.chain.select.select(),
        dry_run: a.in_place.dry_run,
        force: a.force,
    };
    let changes = rebase::rebase(&a.in_place.chain.dir, &opts)?;
    print(&rebase::describe(&changes, a.in_place.dry_run))
}
