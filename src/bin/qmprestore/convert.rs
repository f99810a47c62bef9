//! `qmprestore convert`: an image's guest-visible contents into a new raw or qcow2 file.

use crate::options::{compression_type, parse_size, ProgressArg};
use anyhow::Result;
use clap::ValueEnum;
use qmpbackup::chain::convert::{self, ConvertOptions, Qcow2Output};
use qmpbackup::qcow2::header::CompressionType;
use std::path::PathBuf;
use std::process::ExitCode;

pub const HELP: &str = "Examples:
  qmprestore convert -O raw INC-1700000100-disk.qcow2 restored.raw
  qmprestore convert -O qcow2 -c --compression-type zstd INC-1700000100-disk.qcow2 restored.qcow2
  qmprestore convert -O raw -l FULL-BACKUP FULL-1700000000-disk.qcow2 at-full.raw
  qmprestore convert -O raw backup.qcow2 /dev/vg0/restored   (block device target)

Zero ranges become holes (raw) or stay unallocated (qcow2); the output is synced before exit.
An existing output file is replaced, except a file the source reads from.";

#[derive(clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(short = 'O', value_enum)]
    output_format: ConvertTarget,
    /// Convert the disk as it was at this internal snapshot (id or name).
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// qcow2 output: compress every cluster that shrinks.
    #[arg(short = 'c', long)]
    compress: bool,
    /// qcow2 output: how compressed clusters are encoded.
    #[arg(long, value_parser = compression_type(), default_value = "zlib")]
    compression_type: CompressionType,
    /// qcow2 output: cluster size (e.g. 64k, 2M).
    #[arg(long, default_value = "64k", value_parser = parse_size)]
    cluster_size: u64,
    #[command(flatten)]
    progress: ProgressArg,
    src: PathBuf,
    dst: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum ConvertTarget {
    Raw,
    Qcow2,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let opts = ConvertOptions {
        snapshot: a.snapshot,
        progress: a.progress.progress,
        rate_limit: None,
    };
    match a.output_format {
        ConvertTarget::Raw => convert::to_raw(&a.src, &a.dst, &opts),
        ConvertTarget::Qcow2 => {
            let qcow2 = Qcow2Output {
                cluster_size: a.cluster_size,
                compression_type: a.compression_type,
                compress: a.compress,
            };
            convert::to_qcow2(&a.src, &a.dst, &opts, &qcow2)
        }
    }?;
    Ok(ExitCode::SUCCESS)
}
