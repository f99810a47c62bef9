//! `qmprestore convert`: an image's guest-visible contents into a new raw or qcow2 file.

use crate::options::{compression_type, parse_size, ProgressArg};
use anyhow::Result;
use clap::ValueEnum;
use qmpbackup::chain::convert::{self, ConvertOptions, Qcow2Output};
use qmpbackup::chain::create_opts;
use qmpbackup::qcow2::create::CreateOptions;
use qmpbackup::qcow2::header::CompressionType;
use std::path::PathBuf;
use std::process::ExitCode;

pub const HELP: &str = "Examples:
  qmprestore convert -O raw INC-1700000100-disk.qcow2 restored.raw
  qmprestore convert -O qcow2 -c --compression-type zstd INC-1700000100-disk.qcow2 restored.qcow2
  qmprestore convert -O raw -l FULL-BACKUP FULL-1700000000-disk.qcow2 at-full.raw
  qmprestore convert -O raw backup.qcow2 /dev/vg0/restored   (block device target)
  qmprestore convert --key-file k -O raw encrypted.qcow2 plain.raw
  qmprestore convert --target-key-file k -O qcow2 -o encrypt.format=luks plain.raw encrypted.qcow2

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
    /// qcow2 output: image options, as qemu-img's -o (cluster_size, compression_type,
    /// encrypt.format=luks and the other encrypt.* options).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
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
            let mut o = CreateOptions {
                cluster_size: a.cluster_size,
                compression: a.compression_type,
                ..Default::default()
            };
            for list in &a.options {
                create_opts::apply(&mut o, list).map_err(anyhow::Error::msg)?;
            }
            let qcow2 = Qcow2Output {
                cluster_size: o.cluster_size,
                compression_type: o.compression,
                compress: a.compress,
                encrypt: o.encrypt,
            };
            convert::to_qcow2(&a.src, &a.dst, &opts, &qcow2)
        }
    }?;
    Ok(ExitCode::SUCCESS)
}
