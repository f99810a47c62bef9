//! `qmprestore list`: the restore points of a backup directory.

use crate::options::JsonArg;
use crate::report::{print, print_json};
use anyhow::Result;
use qmpbackup::chain::list;
use std::path::PathBuf;
use std::process::ExitCode;

pub const HELP: &str = "Example:
  qmprestore list --dir /backup/vm1/disk1.qcow2 --json";

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    filter: Option<String>,
    #[command(flatten)]
    json: JsonArg,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let points = list::list(&a.dir, a.filter.as_deref())?;
    if a.json.json {
        print_json(&points)
    } else {
        print(&list::table(&points))
    }
}
