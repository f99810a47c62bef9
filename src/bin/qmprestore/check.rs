//! `qmprestore check`: an image's consistency, judged and repaired as qemu-img check does.

use crate::options::{Output, OutputArg};
use crate::report::{print, print_json};
use anyhow::Result;
use clap::ValueEnum;
use qmpbackup::qcow2::check::{self, Repair};
use std::path::PathBuf;
use std::process::ExitCode;

pub const HELP: &str = "Exit codes: 0 no problems, 2 corruptions, 3 only leaked clusters,
1 the image could not be checked.

Examples:
  qmprestore check FULL-1700000000-disk.qcow2
  qmprestore check --repair leaks --output json FULL-1700000000-disk.qcow2";

#[derive(clap::Args)]
pub struct Args {
    file: PathBuf,
    #[command(flatten)]
    output: OutputArg,
    /// Repair leaked clusters only, or everything that can be repaired.
    #[arg(short = 'r', long, value_enum)]
    repair: Option<RepairArg>,
}

#[derive(Clone, Copy, ValueEnum)]
enum RepairArg {
    Leaks,
    All,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let report = match a.repair {
        None => check::check(&a.file)?,
        Some(RepairArg::Leaks) => check::repair(&a.file, Repair::Leaks)?,
        Some(RepairArg::All) => check::repair(&a.file, Repair::All)?,
    };
    for m in &report.messages {
        eprintln!("{m}");
    }
    match a.output.output {
        Output::Json => print_json(&report)?,
        Output::Human => print(&report.human())?,
    };
    Ok(ExitCode::from(report.exit_code()))
}
