//! Options that many `qmprestore` commands take, declared once and flattened into each
//! command's arguments (`#[command(flatten)]`): a new shared option touches this file only.

use clap::{Args, ValueEnum};
use qmpbackup::chain::create_opts;
use qmpbackup::qcow2::header::CompressionType;
use qmpbackup::qcow2::{Disk, Format, OpenOptions};
use qmpbackup::store::ChainSelect;
use std::path::{Path, PathBuf};

/// Options every chain command shares, spelled as the original's.
#[derive(Args)]
pub struct ChainArgs {
    /// Backup directory of one disk (e.g. /backup/vm1/disk1.qcow2).
    #[arg(long)]
    pub dir: PathBuf,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Limit restore throughput to this many bytes per second.
    #[arg(long, value_parser = parse_size)]
    pub rate_limit: Option<u64>,
}

/// Which restore point of a backup directory, and what its files may reference.
#[derive(Args)]
pub struct SelectArgs {
    /// Restore point: a file name, a name prefix (INC-1700000600), or a time (epoch or ISO
    /// 8601): the latest point at or before it. Default: the newest.
    #[arg(long)]
    pub until: Option<String>,
    /// Only consider files whose name contains this (picks one disk in a flat directory).
    #[arg(long)]
    pub filter: Option<String>,
    /// Follow backing file names that lead out of the backup directory (absolute or with
    /// `..`); refused by default.
    #[arg(long)]
    pub allow_outside_backing: bool,
}

impl SelectArgs {
    pub fn select(&self) -> ChainSelect {
        ChainSelect {
            until: self.until.clone(),
            filter: self.filter.clone(),
            allow_outside_backing: self.allow_outside_backing,
        }
    }
}

/// What the commands that change backup files in place take: the chain, and `--dry-run`.
#[derive(Args)]
pub struct InPlaceArgs {
    #[command(flatten)]
    pub chain: ChainArgs,
    /// Print what would be done and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `-p/--progress`.
#[derive(Args)]
pub struct ProgressArg {
    /// Show a progress bar (on a terminal).
    #[arg(short = 'p', long)]
    pub progress: bool,
}

/// `--json`: the commands whose original spelling is a flag.
#[derive(Args)]
pub struct JsonArg {
    /// Machine-readable output (JSON on standard output).
    #[arg(long)]
    pub json: bool,
}

/// `--output human|json`: the image commands, spelled as qemu-img's.
#[derive(Args)]
pub struct OutputArg {
    /// Report format (JSON uses qemu-img's field names).
    #[arg(long, value_enum, default_value = "human")]
    pub output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

/// `-f/--format` of an image that is read: probed when omitted.
#[derive(Args)]
pub struct FormatArg {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub format: Option<ImageFormat>,
}

impl FormatArg {
    /// Opens `file` with its backing chain, in this format.
    pub fn open(&self, file: &Path) -> anyhow::Result<Disk> {
        open(file, self.format)
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ImageFormat {
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

/// Opens `file` with its backing chain; `format` probed when `None`.
pub fn open(file: &Path, format: Option<ImageFormat>) -> anyhow::Result<Disk> {
    Ok(Disk::open_with(
        file,
        &OpenOptions {
            format: format.map(Format::from),
            ..Default::default()
        },
    )?)
}

/// A compression type, parsed (and listed in `--help`) by the codec module itself.
pub fn compression_type() -> impl clap::builder::TypedValueParser<Value = CompressionType> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(CompressionType::names())
        .map(|s| s.parse::<CompressionType>().expect("a listed name"))
}

/// A size with an optional unit (64k, 2M, 20G), as qemu-img reads them.
pub fn parse_size(s: &str) -> Result<u64, String> {
    create_opts::parse_size(s)
}
