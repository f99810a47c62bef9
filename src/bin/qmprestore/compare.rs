//! `qmprestore compare`: whether two images show the guest the same bytes, with qemu-img
//! compare's words and exit codes.

use crate::options::{open, ProgressArg};
use anyhow::Result;
use qmpbackup::chain::compare::{self, Comparison};
use std::path::PathBuf;
use std::process::ExitCode;

pub const HELP: &str = "Exit codes: 0 identical, 1 different (the first differing offset is
printed), 2 an image could not be read.

Example:
  qmprestore compare restored.qcow2 /var/lib/libvirt/images/vm.qcow2";

#[derive(clap::Args)]
pub struct Args {
    a: PathBuf,
    b: PathBuf,
    #[command(flatten)]
    progress: ProgressArg,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let result = (|| -> Result<Comparison> {
        let da = open(&a.a, None)?;
        let db = open(&a.b, None)?;
        if da.size() != db.size() {
            eprintln!("Warning: Image size mismatch!");
        }
        Ok(compare::compare(&da, &db, a.progress.progress)?)
    })();
    Ok(match result {
        Ok(Comparison::Identical) => {
            println!("Images are identical.");
            ExitCode::SUCCESS
        }
        Ok(Comparison::MismatchAt(off)) => {
            println!("Content mismatch at offset {off}!");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("qmprestore: {e:#}");
            ExitCode::from(2)
        }
    })
}
