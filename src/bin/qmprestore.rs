//! `qmprestore`: restore QEMU backups and inspect images without qemu-img.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use qmpbackup::chain::compare::{self, Comparison};
use qmpbackup::chain::convert::{self, ConvertOptions};
use qmpbackup::chain::info;
use qmpbackup::chain::map::{self, MapFormat};
use qmpbackup::qcow2::{Disk, Format, Image, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const EXIT_CODES: &str = "\
Exit codes:
  0  success (compare: images are identical)
  1  failure (compare: images differ)
  2  compare only: an image could not be read";

#[derive(Parser)]
#[command(
    name = "qmprestore",
    version,
    about = "Restore QEMU backups and inspect qcow2/raw images natively, without qemu-img",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Log debug details to stderr.
    #[arg(long, global = true)]
    debug: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Human,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum ImageFormat {
    Qcow2,
    Raw,
}

impl From<ImageFormat> for Format {
    fn from(f: ImageFormat) -> Format {
        match f {
            ImageFormat::Qcow2 => Format::Qcow2,
            ImageFormat::Raw => Format::Raw,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ConvertTarget {
    Raw,
}

#[derive(Subcommand)]
enum Command {
    /// Show an image's format, sizes, backing file, snapshots and qcow2 features.
    #[command(after_help = "Examples:
  qmprestore info backup/disk/FULL-1700000000-disk.qcow2
  qmprestore info --backing-chain --output json backup/disk/INC-1700000100-disk.qcow2")]
    Info {
        file: PathBuf,
        /// Also describe every backing file below the image.
        #[arg(long)]
        backing_chain: bool,
        /// Report format (JSON uses qemu-img's field names).
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Image format (probed when omitted).
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<ImageFormat>,
    },
    /// Show where each guest range is stored, like `qemu-img map`.
    #[command(after_help = "Examples:
  qmprestore map disk.qcow2
  qmprestore map --output json INC-1700000100-disk.qcow2 | jq '.[] | select(.depth == 0)'")]
    Map {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<ImageFormat>,
    },
    /// Write the guest-visible contents of an image (with its backing chain) to a new file.
    #[command(after_help = "Examples:
  qmprestore convert -O raw INC-1700000100-disk.qcow2 restored.raw
  qmprestore convert -O raw -l FULL-BACKUP FULL-1700000000-disk.qcow2 at-full.raw
  qmprestore convert -O raw backup.qcow2 /dev/vg0/restored   (block device target)

Zero ranges become holes in a regular output file; the output is synced before exit.")]
    Convert {
        /// Output format.
        #[arg(short = 'O', value_enum)]
        output_format: ConvertTarget,
        /// Convert the disk as it was at this internal snapshot (id or name).
        #[arg(short = 'l', value_name = "SNAPSHOT")]
        snapshot: Option<String>,
        /// Show a progress bar (on a terminal).
        #[arg(short = 'p', long)]
        progress: bool,
        src: PathBuf,
        dst: PathBuf,
    },
    /// Compare the guest-visible contents of two images (qcow2 or raw, probed).
    #[command(
        after_help = "Exit codes: 0 identical, 1 different (the first differing offset is
printed), 2 an image could not be read.

Example:
  qmprestore compare restored.qcow2 /var/lib/libvirt/images/vm.qcow2"
    )]
    Compare {
        a: PathBuf,
        b: PathBuf,
        #[arg(short = 'p', long)]
        progress: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.debug);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qmprestore: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(debug: bool) {
    let level = if debug { "debug" } else { "warn" };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QMPRESTORE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_target(false)
        .without_time()
        .init();
}

fn open(file: &Path, format: Option<ImageFormat>) -> Result<Disk> {
    Ok(Disk::open_with(
        file,
        &OpenOptions {
            format: format.map(Format::from),
            ..Default::default()
        },
    )?)
}

fn run(command: Command) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match command {
        Command::Info {
            file,
            backing_chain,
            output,
            format,
        } => {
            let disk = open(&file, format)?;
            let layers: Vec<&Image> = if backing_chain {
                disk.chain().collect()
            } else {
                vec![disk.top()]
            };
            let infos: Vec<info::ImageInfo> = layers.into_iter().map(info::describe).collect();
            match output {
                Output::Json if backing_chain => {
                    writeln!(out, "{}", serde_json::to_string_pretty(&infos)?)?
                }
                Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&infos[0])?)?,
                Output::Human => {
                    let texts: Vec<String> = infos.iter().map(info::human).collect();
                    write!(out, "{}", texts.join("\n"))?
                }
            }
        }
        Command::Map {
            file,
            output,
            format,
        } => {
            let disk = open(&file, format)?;
            let f = match output {
                Output::Human => MapFormat::Human,
                Output::Json => MapFormat::Json,
            };
            map::write_map(&disk, f, &mut out)?;
        }
        Command::Convert {
            output_format: ConvertTarget::Raw,
            snapshot,
            progress,
            src,
            dst,
        } => {
            convert::to_raw(&src, &dst, &ConvertOptions { snapshot, progress })
                .with_context(|| format!("converting {}", src.display()))?;
        }
        Command::Compare { a, b, progress } => {
            return Ok(compare_cmd(&a, &b, progress));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn compare_cmd(a: &Path, b: &Path, progress: bool) -> ExitCode {
    let result = (|| -> Result<Comparison> {
        let da = open(a, None)?;
        let db = open(b, None)?;
        if da.size() != db.size() {
            eprintln!("Warning: Image size mismatch!");
        }
        Ok(compare::compare(&da, &db, progress)?)
    })();
    match result {
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
    }
}
