//! `qmprestore info` and `map`: what an image is and where its data lies, as qemu-img
//! reports them.

use crate::options::{FormatArg, Output, OutputArg};
use crate::report::{print, print_json};
use anyhow::Result;
use qmpbackup::chain::info;
use qmpbackup::chain::map::{self, MapFormat};
use qmpbackup::qcow2::Image;
use std::path::PathBuf;
use std::process::ExitCode;

pub const INFO_HELP: &str = "Examples:
  qmprestore info backup/disk/FULL-1700000000-disk.qcow2
  qmprestore info --backing-chain --output json backup/disk/INC-1700000100-disk.qcow2";

pub const MAP_HELP: &str = "Examples:
  qmprestore map disk.qcow2
  qmprestore map --output json INC-1700000100-disk.qcow2 | jq '.[] | select(.depth == 0)'";

#[derive(clap::Args)]
pub struct InfoArgs {
    file: PathBuf,
    /// Also describe every backing file below the image.
    #[arg(long)]
    backing_chain: bool,
    #[command(flatten)]
    output: OutputArg,
    #[command(flatten)]
    format: FormatArg,
}

#[derive(clap::Args)]
pub struct MapArgs {
    file: PathBuf,
    #[command(flatten)]
    output: OutputArg,
    #[command(flatten)]
    format: FormatArg,
}

pub fn info(a: InfoArgs) -> Result<ExitCode> {
    let disk = a.format.open(&a.file)?;
    let layers: Vec<&Image> = if a.backing_chain {
        disk.chain().collect()
    } else {
        vec![disk.top()]
    };
    let infos: Vec<info::ImageInfo> = layers.into_iter().map(info::describe).collect();
    match a.output.output {
        Output::Json if a.backing_chain => print_json(&infos),
        Output::Json => print_json(&infos[0]),
        Output::Human => print(&infos.iter().map(info::human).collect::<Vec<_>>().join("\n")),
    }
}

pub fn map(a: MapArgs) -> Result<ExitCode> {
    let disk = a.format.open(&a.file)?;
    let f = match a.output.output {
        Output::Human => MapFormat::Human,
        Output::Json => MapFormat::Json,
    };
    map::write_map(&disk, f, &mut std::io::stdout().lock())?;
    Ok(ExitCode::SUCCESS)
}
