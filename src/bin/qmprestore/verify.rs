//! `qmprestore verify`: proves that backup chains restore, for people and CI jobs.

use crate::options::JsonArg;
use crate::report::{print, print_json};
use anyhow::Result;
use qmpbackup::chain::verify;
use std::path::PathBuf;
use std::process::ExitCode;

pub const HELP: &str = "Exit codes: 0 restorable, 1 problems found, 2 could not run.

Examples:
  qmprestore verify --dir /backup/vm1/disk1.qcow2
  qmprestore verify --recursive --json --dir /backup > report.json";

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    dir: PathBuf,
    /// Verify every backup directory below --dir.
    #[arg(long)]
    recursive: bool,
    #[arg(long)]
    filter: Option<String>,
    #[command(flatten)]
    json: JsonArg,
}

/// `verify`'s exit codes: 0 restorable, 1 problems, 2 could not run.
pub fn run(a: Args) -> Result<ExitCode> {
    let report = match verify::verify(&a.dir, a.recursive, a.filter.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qmprestore: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if a.json.json {
        print_json(&report)?;
    } else {
        print(&report.human())?;
    }
    Ok(ExitCode::from(if report.restorable { 0 } else { 1 }))
}
