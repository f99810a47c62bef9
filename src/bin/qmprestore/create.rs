//! `qmprestore create`: a new qcow2 image, with qemu-img's `-o` options.

use crate::options::{open, parse_size, ImageFormat};
use anyhow::{Context, Result};
use qmpbackup::chain::create_opts;
use qmpbackup::qcow2::create::{self, CreateOptions};
use qmpbackup::qcow2::Format;
use std::path::PathBuf;
use std::process::ExitCode;

pub const HELP: &str =
    "Options (-o, comma separated): cluster_size, compat (0.10|1.1), refcount_bits,
lazy_refcounts, extended_l2, compression_type (zlib|zstd), backing_file, backing_fmt,
data_file, data_file_raw.

Examples:
  qmprestore create disk.qcow2 20G
  qmprestore create -o cluster_size=2M,compression_type=zstd -b FULL.qcow2 -F qcow2 INC.qcow2 20G";

#[derive(clap::Args)]
pub struct Args {
    /// Image options, as qemu-img's -o.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file name to store (relative to the new image).
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F', value_enum)]
    backing_format: Option<ImageFormat>,
    /// Store the backing name without opening it (e.g. an NBD URI); needs a size.
    #[arg(short = 'u')]
    unsafe_backing: bool,
    file: PathBuf,
    /// Virtual size (e.g. 64M, 20G); defaults to the backing file's size.
    #[arg(value_parser = parse_size)]
    size: Option<u64>,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let mut opts = CreateOptions::default();
    for o in &a.options {
        create_opts::apply(&mut opts, o).map_err(anyhow::Error::msg)?;
    }
    // Like qemu-img, the backing file is opened (which proves it is there and readable, and
    // gives the size) unless -u says it cannot or need not be.
    let backing_size = match &a.backing {
        Some(b) if !a.unsafe_backing => {
            let path = qmpbackup::qcow2::disk::backing_path(&a.file, std::ffi::OsStr::new(b))
                .map_err(|k| k.at(&a.file))
                .context("pass -u to store a backing name that is not opened here")?;
            Some(open(&path, a.backing_format)?.size())
        }
        _ => None,
    };
    if let Some(b) = a.backing {
        opts.backing = Some((b, a.backing_format.map(Format::from)));
    }
    opts.size = match (a.size, backing_size) {
        (Some(s), _) | (None, Some(s)) => s,
        (None, None) if opts.backing.is_some() => {
            anyhow::bail!("a size is needed with -u (the backing file is not opened)")
        }
        (None, None) => anyhow::bail!("a size is needed (or a backing file to take it from)"),
    };
    create::create(&a.file, &opts)?;
    Ok(ExitCode::SUCCESS)
}
