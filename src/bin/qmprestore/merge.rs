//! `qmprestore merge`: a restore point of a backup chain as one new image.

use crate::options::{compression_type, ChainArgs, ProgressArg};
use anyhow::Result;
use clap::ValueEnum;
use qmpbackup::chain::merge::{self, MergeOptions};
use qmpbackup::qcow2::header::CompressionType;
use std::path::PathBuf;
use std::process::ExitCode;

pub const HELP: &str = "Examples:
  qmprestore merge --dir /backup/vm1/disk1.qcow2 --targetfile /restore/disk1.qcow2
  qmprestore merge --dir /backup/vm1/disk1.qcow2 --until INC-1700000600 --targetfile at-noon.qcow2
  qmprestore merge --dir /backup/vm1/disk1.qcow2 --format raw --targetfile /dev/vg0/disk1
  qmprestore merge --key-file /root/backup.key --dir /backup/vm1/disk1.qcow2 --targetfile d.qcow2

The chain is the latest FULL and the INCs after it, in the order of the epochs in their names.";

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    chain: ChainArgs,
    /// The new image (or, with --format raw, a block device).
    #[arg(long)]
    targetfile: PathBuf,
    /// Output format (qcow2 keeps the FULL's cluster size).
    #[arg(long, value_enum, default_value = "qcow2")]
    format: MergeFormat,
    /// Compress the qcow2 output.
    #[arg(long, value_parser = compression_type())]
    compress: Option<CompressionType>,
    /// Replace an existing target file.
    #[arg(long)]
    force: bool,
    /// Write a plaintext image from an encrypted chain (by default the output is encrypted
    /// under the FULL's LUKS header, or a new one with --target-key-file).
    #[arg(long)]
    decrypt: bool,
    #[command(flatten)]
    progress: ProgressArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum MergeFormat {
    Qcow2,
    Raw,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let opts = MergeOptions {
        select: a.chain.select.select(),
        target: match a.format {
            MergeFormat::Qcow2 => merge::Target::Qcow2,
            MergeFormat::Raw => merge::Target::Raw,
        },
        compress: a.compress,
        force: a.force,
        progress: a.progress.progress,
        rate_limit: a.chain.rate_limit,
        decrypt: a.decrypt,
    };
    for f in merge::merge(&a.chain.dir, &a.targetfile, &opts)? {
        eprintln!("merged {}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}
