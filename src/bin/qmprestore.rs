//! `qmprestore`: restore QEMU backups and inspect images without qemu-img.

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use qmpbackup::chain::commit::{self, FoldOptions};
use qmpbackup::chain::compare::{self, Comparison};
use qmpbackup::chain::convert::{self, ConvertOptions, Qcow2Output};
use qmpbackup::chain::create_opts;
use qmpbackup::chain::info;
use qmpbackup::chain::list;
use qmpbackup::chain::map::{self, MapFormat};
use qmpbackup::chain::merge::{self, MergeOptions};
use qmpbackup::chain::rebase::{self, RebaseOptions};
use qmpbackup::chain::snapshot_rebase;
use qmpbackup::chain::verify;
use qmpbackup::qcow2::check::{self, Repair};
use qmpbackup::qcow2::create::{self, CreateOptions};
use qmpbackup::qcow2::header::CompressionType;
use qmpbackup::qcow2::write::{SnapshotOp, Writer};
use qmpbackup::qcow2::{Disk, Format, Image, OpenOptions, Qcow2};
use qmpbackup::serve;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const EXIT_CODES: &str = "\
Exit codes:
  0  success (compare: identical; check: no problems)
  1  failure (compare: images differ; check: the image could not be checked)
  2  compare: an image could not be read; check: corruptions found
  3  check: only leaked clusters found";

/// Options every chain command shares, spelled as the original's.
#[derive(clap::Args)]
struct ChainArgs {
    /// Backup directory of one disk (e.g. /backup/vm1/disk1.qcow2).
    #[arg(long)]
    dir: PathBuf,
    #[command(flatten)]
    select: SelectArgs,
    /// Limit restore throughput to this many bytes per second.
    #[arg(long, value_parser = parse_size_arg)]
    rate_limit: Option<u64>,
}

/// Which restore point of a backup directory, and what its files may reference.
#[derive(clap::Args)]
struct SelectArgs {
    /// Restore point: a file name, a name prefix (INC-1700000600), or a time (epoch or ISO
    /// 8601): the latest point at or before it. Default: the newest.
    #[arg(long)]
    until: Option<String>,
    /// Only consider files whose name contains this (picks one disk in a flat directory).
    #[arg(long)]
    filter: Option<String>,
    /// Follow backing file names that lead out of the backup directory (absolute or with
    /// `..`); refused by default.
    #[arg(long)]
    allow_outside_backing: bool,
}

/// What commit and snapshotrebase take.
#[derive(clap::Args)]
struct FoldArgs {
    #[command(flatten)]
    chain: ChainArgs,
    /// Print what would be done and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Show a progress bar (on a terminal).
    #[arg(short = 'p', long)]
    progress: bool,
}

impl FoldArgs {
    fn options(&self) -> FoldOptions {
        FoldOptions {
            select: self.chain.select.select(),
            dry_run: self.dry_run,
            rate_limit: self.chain.rate_limit,
            progress: self.progress,
        }
    }
}

impl SelectArgs {
    fn select(&self) -> qmpbackup::store::ChainSelect {
        qmpbackup::store::ChainSelect {
            until: self.until.clone(),
            filter: self.filter.clone(),
            allow_outside_backing: self.allow_outside_backing,
        }
    }
}

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
    /// Accepted for compatibility with the original qmprestore; files are always validated
    /// natively (opening an image checks its structure).
    #[arg(long, global = true)]
    skip_check: bool,
    /// Files and folders this creates (merge and convert outputs, their new folders) are
    /// 0640/0750 instead of 0600/0700, whatever the umask: for sites whose restore user reads
    /// through a group.
    #[arg(long, global = true)]
    group_readable: bool,
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
    Qcow2,
}

/// A compression type, parsed (and listed in `--help`) by the codec module itself.
fn compression_type() -> impl clap::builder::TypedValueParser<Value = CompressionType> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(CompressionType::names())
        .map(|s| s.parse::<CompressionType>().expect("a listed name"))
}

#[derive(Clone, Copy, ValueEnum)]
enum RepairArg {
    Leaks,
    All,
}

#[derive(Clone, Copy, ValueEnum)]
enum MergeFormat {
    Qcow2,
    Raw,
}

#[derive(Subcommand)]
enum Command {
    /// Merge a backup chain into one new image; the backup files stay untouched.
    #[command(after_help = "Examples:
  qmprestore merge --dir /backup/vm1/disk1.qcow2 --targetfile /restore/disk1.qcow2
  qmprestore merge --dir /backup/vm1/disk1.qcow2 --until INC-1700000600 --targetfile at-noon.qcow2
  qmprestore merge --dir /backup/vm1/disk1.qcow2 --format raw --targetfile /dev/vg0/disk1

The chain is the latest FULL and the INCs after it, in the order of the epochs in their names.")]
    Merge {
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
        /// Show a progress bar (on a terminal).
        #[arg(short = 'p', long)]
        progress: bool,
    },
    /// Fold the INCs up to the restore point into the FULL, in place, then delete them.
    #[command(after_help = "Examples:
  qmprestore commit --dir /backup/vm1/disk1.qcow2 --dry-run
  qmprestore commit --dir /backup/vm1/disk1.qcow2 --until INC-1700000600

The FULL is flushed before any INC is deleted; an interrupted commit is completed by running
it again. INCs after the restore point stay valid (the next one is re-linked to the FULL).")]
    Commit {
        #[command(flatten)]
        fold: FoldArgs,
    },
    /// Fold each INC into the FULL and keep every backup as an internal snapshot.
    #[command(
        name = "snapshotrebase",
        after_help = "Example:
  qmprestore snapshotrebase --dir /backup/vm1/disk1.qcow2
  qemu-img snapshot -l /backup/vm1/disk1.qcow2/FULL-1700000000-disk1.qcow2

The FULL gets the snapshot FULL-BACKUP, then one snapshot per INC named after its time
(%Y-%m-%d-%H:%M:%S, local time); each INC is deleted once its snapshot is on disk."
    )]
    SnapshotRebase {
        #[command(flatten)]
        fold: FoldArgs,
    },
    /// Link every INC to its predecessor in place and point `image` at the restore point.
    #[command(after_help = "Example:
  qmprestore rebase --dir /backup/vm1/disk1.qcow2 --until INC-1700000600 --dry-run
  qemu-system-x86_64 ... -drive file=/backup/vm1/disk1.qcow2/image

Only headers change (backing file name and format, as qemu-img rebase -u); data is untouched.")]
    Rebase {
        #[command(flatten)]
        chain: ChainArgs,
        /// Print the planned changes and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Replace an existing `image` symlink.
        #[arg(long)]
        force: bool,
    },
    /// Prove that backup chains restore: structure, consistency, links, and every stored byte.
    #[command(
        after_help = "Exit codes: 0 restorable, 1 problems found, 2 could not run.

Examples:
  qmprestore verify --dir /backup/vm1/disk1.qcow2
  qmprestore verify --recursive --json --dir /backup > report.json"
    )]
    Verify {
        #[arg(long)]
        dir: PathBuf,
        /// Verify every backup directory below --dir.
        #[arg(long)]
        recursive: bool,
        #[arg(long)]
        filter: Option<String>,
        /// Machine-readable report naming each problem with its file.
        #[arg(long)]
        json: bool,
    },
    /// List the restore points of a backup directory.
    #[command(after_help = "Example:
  qmprestore list --dir /backup/vm1/disk1.qcow2 --json")]
    List {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        filter: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
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
  qmprestore convert -O qcow2 -c --compression-type zstd INC-1700000100-disk.qcow2 restored.qcow2
  qmprestore convert -O raw -l FULL-BACKUP FULL-1700000000-disk.qcow2 at-full.raw
  qmprestore convert -O raw backup.qcow2 /dev/vg0/restored   (block device target)

Zero ranges become holes (raw) or stay unallocated (qcow2); the output is synced before exit.
An existing output file is replaced, except a file the source reads from.")]
    Convert {
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
        #[arg(long, default_value = "64k", value_parser = parse_size_arg)]
        cluster_size: u64,
        /// Show a progress bar (on a terminal).
        #[arg(short = 'p', long)]
        progress: bool,
        src: PathBuf,
        dst: PathBuf,
    },
    /// Create a new qcow2 image (qemu-img's -o options).
    #[command(
        after_help = "Options (-o, comma separated): cluster_size, compat (0.10|1.1), refcount_bits,
lazy_refcounts, extended_l2, compression_type (zlib|zstd), backing_file, backing_fmt,
data_file, data_file_raw.

Examples:
  qmprestore create disk.qcow2 20G
  qmprestore create -o cluster_size=2M,compression_type=zstd -b FULL.qcow2 -F qcow2 INC.qcow2 20G"
    )]
    Create {
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
        #[arg(value_parser = parse_size_arg)]
        size: Option<u64>,
    },
    /// Check an image's consistency (refcounts, references, flags), like qemu-img check.
    #[command(
        after_help = "Exit codes: 0 no problems, 2 corruptions, 3 only leaked clusters,
1 the image could not be checked.

Examples:
  qmprestore check FULL-1700000000-disk.qcow2
  qmprestore check --repair leaks --output json FULL-1700000000-disk.qcow2"
    )]
    Check {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Repair leaked clusters only, or everything that can be repaired.
        #[arg(short = 'r', long, value_enum)]
        repair: Option<RepairArg>,
    },
    /// List, create, apply or delete internal snapshots.
    #[command(group(clap::ArgGroup::new("action").required(true).args(["list", "create", "apply", "delete"])),
        after_help = "Examples:
  qmprestore snapshot -l FULL-1700000000-disk.qcow2
  qmprestore snapshot -c before-upgrade disk.qcow2
  qmprestore snapshot -a before-upgrade disk.qcow2")]
    Snapshot {
        /// List snapshots.
        #[arg(short = 'l')]
        list: bool,
        /// Create a snapshot with this name.
        #[arg(short = 'c', value_name = "NAME")]
        create: Option<String>,
        /// Revert the disk to this snapshot (id or name).
        #[arg(short = 'a', value_name = "NAME")]
        apply: Option<String>,
        /// Delete this snapshot (id or name).
        #[arg(short = 'd', value_name = "NAME")]
        delete: Option<String>,
        file: PathBuf,
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
    /// Serve a restore point (or any image with its backing chain) read-only over NBD.
    #[command(after_help = "Examples:
  qmprestore serve --dir /backup/vm1/disk1.qcow2 --socket /run/restore.sock
  qemu-img convert -O raw 'nbd+unix:///?socket=/run/restore.sock' disk1.raw

  qmprestore serve --dir /backup/vm1 --until 2026-11-30T12:00 --listen 127.0.0.1:10809
  nbdinfo --list nbd://127.0.0.1:10809      (one export per disk folder)

  qmprestore serve --dir /backup/vm1/disk1.qcow2 --listen 0.0.0.0:10809 \\
      --tls-creds /etc/pki/qemu --tls-verify-peer

Live restore (the VM runs at once; block-stream copies the rest in the background):
  qmprestore serve --dir /backup/vm1/disk1.qcow2 --socket /run/r.sock &
  qmprestore create -u -b 'nbd+unix:///?socket=/run/r.sock' -F raw disk1.qcow2 20G
  qemu-system-x86_64 ... -drive file=disk1.qcow2,if=virtio,id=d0   then QMP:
  {\"execute\": \"block-stream\", \"arguments\": {\"job-id\": \"r\", \"device\": \"d0\"}}

The default export (empty name) is the restore point; with --dir naming a backup target that
holds several disk folders, each disk is an export named after its folder. The socket accepts
connections only once every export is open. Serves until SIGINT/SIGTERM (exit 0 once the
requests in flight are answered), or with --once until the last client leaves.")]
    Serve {
        /// Backup directory of one disk, or a backup target holding one folder per disk.
        #[arg(long, conflicts_with_all = ["image", "format"], required_unless_present = "image")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        select: SelectArgs,
        /// An image to serve with its backing chain (instead of --dir).
        image: Option<PathBuf>,
        /// Format of IMAGE (probed when omitted).
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<ImageFormat>,
        /// Listen on this unix socket (created mode 0600; only a stale socket is replaced).
        #[arg(long, conflicts_with = "listen")]
        socket: Option<PathBuf>,
        /// Listen on TCP HOST:PORT; other than loopback only with --tls-creds or --insecure.
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
        /// Another name for the export besides the default (empty) one.
        #[arg(long = "name", value_name = "EXPORT")]
        name: Option<String>,
        /// Require TLS, with QEMU's tls-creds-x509 files from DIR (server-cert.pem,
        /// server-key.pem; ca-cert.pem for --tls-verify-peer).
        #[arg(long, value_name = "DIR")]
        tls_creds: Option<PathBuf>,
        /// Accept only clients whose certificate chains to DIR/ca-cert.pem.
        #[arg(long, requires = "tls_creds")]
        tls_verify_peer: bool,
        /// Allow clear text on an address other than loopback (a trusted network).
        #[arg(long)]
        insecure: bool,
        /// Exit when the last client disconnects.
        #[arg(long)]
        once: bool,
        /// Write the server's process id to this file once it accepts connections.
        #[arg(long, value_name = "FILE")]
        pidfile: Option<PathBuf>,
        /// Close connections that have not finished negotiating after this many seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = serve::HANDSHAKE_LIMIT.as_secs())]
        handshake_limit: u64,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Example:
  qmprestore completions bash > /etc/bash_completion.d/qmprestore")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on standard output.
    #[command(after_help = "Example:
  qmprestore man > /usr/local/share/man/man1/qmprestore.1")]
    Man,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Completions { shell } => {
            qmpbackup::cli::completions(shell, Cli::command(), &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man => return qmpbackup::cli::print_man(Cli::command()),
        _ => {}
    }
    init_logging(cli.debug);
    qmpbackup::store::bucket::register();
    qmpbackup::cli::restrict_new_files(cli.group_readable);
    // A write past the file size limit (ulimit -f) must fail with EFBIG, which we report and
    // clean up after, instead of killing the process with SIGXFSZ halfway through.
    // SAFETY: setting a signal's disposition to "ignore" before any thread starts.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let _ = cli.skip_check;
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
        .with_ansi(qmpbackup::cli::colour_for(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ))
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
    match command {
        Command::Info {
            file,
            backing_chain,
            output,
            format,
        } => info_cmd(&file, backing_chain, output, format),
        Command::Map {
            file,
            output,
            format,
        } => map_cmd(&file, output, format),
        Command::Convert {
            output_format,
            snapshot,
            compress,
            compression_type,
            cluster_size,
            progress,
            src,
            dst,
        } => {
            let opts = ConvertOptions {
                snapshot,
                progress,
                rate_limit: None,
            };
            let qcow2 = Qcow2Output {
                cluster_size,
                compression_type,
                compress,
            };
            convert_cmd(output_format, &src, &dst, &opts, &qcow2)
        }
        Command::Create {
            options,
            backing,
            backing_format,
            unsafe_backing,
            file,
            size,
        } => create_cmd(
            &options,
            backing.map(|b| (b, backing_format, !unsafe_backing)),
            &file,
            size,
        ),
        Command::Serve {
            dir,
            select,
            image,
            format,
            socket,
            listen,
            name,
            tls_creds,
            tls_verify_peer,
            insecure,
            once,
            pidfile,
            handshake_limit,
        } => {
            let exports = match (&dir, &image) {
                (Some(d), _) => serve::Exports::of_dir(d, &select.select(), name.as_deref())?,
                (None, Some(i)) => {
                    serve::Exports::of_image(i, format.map(Format::from), name.as_deref())?
                }
                (None, None) => anyhow::bail!("give --dir DIR or an IMAGE to serve"),
            };
            let tls = tls_creds
                .map(|d| serve::tls::server_config(&d, tls_verify_peer))
                .transpose()?;
            let place = Listen {
                socket,
                listen,
                insecure,
            };
            let opts = serve::Options {
                tls,
                once,
                handshake_limit: std::time::Duration::from_secs(handshake_limit),
            };
            serve_cmd(exports, &place, &opts, pidfile.as_deref())
        }
        Command::Check {
            file,
            output,
            repair,
        } => check_cmd(&file, output, repair),
        Command::Snapshot {
            list,
            create,
            apply,
            delete,
            file,
        } => snapshot_cmd(list, create, apply, delete, &file),
        Command::Merge {
            chain,
            targetfile,
            format,
            compress,
            force,
            progress,
        } => {
            let opts = MergeOptions {
                select: chain.select.select(),
                target: match format {
                    MergeFormat::Qcow2 => merge::Target::Qcow2,
                    MergeFormat::Raw => merge::Target::Raw,
                },
                compress,
                force,
                progress,
                rate_limit: chain.rate_limit,
            };
            for f in merge::merge(&chain.dir, &targetfile, &opts)? {
                eprintln!("merged {}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Commit { fold } => {
            print(&commit::commit(&fold.chain.dir, &fold.options())?.human())
        }
        Command::SnapshotRebase { fold } => {
            let plan = snapshot_rebase::snapshot_rebase(&fold.chain.dir, &fold.options())?;
            print(&snapshot_rebase::describe(&plan, fold.dry_run))
        }
        Command::Rebase {
            chain,
            dry_run,
            force,
        } => {
            let opts = RebaseOptions {
                select: chain.select.select(),
                dry_run,
                force,
            };
            let changes = rebase::rebase(&chain.dir, &opts)?;
            print(&rebase::describe(&changes, dry_run))
        }
        Command::Verify {
            dir,
            recursive,
            filter,
            json,
        } => verify_cmd(&dir, recursive, filter.as_deref(), json),
        Command::List { dir, filter, json } => {
            let points = list::list(&dir, filter.as_deref())?;
            if json {
                print_json(&points)
            } else {
                print(&list::table(&points))
            }
        }
        Command::Compare { a, b, progress } => Ok(compare_cmd(&a, &b, progress)),
        Command::Completions { .. } | Command::Man => unreachable!("handled in main"),
    }
}

/// Writes a command's report to standard output.
fn print(report: &str) -> Result<ExitCode> {
    std::io::stdout().lock().write_all(report.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn print_json(value: &impl serde::Serialize) -> Result<ExitCode> {
    print(&format!("{}\n", serde_json::to_string_pretty(value)?))
}

fn info_cmd(
    file: &Path,
    backing_chain: bool,
    output: Output,
    format: Option<ImageFormat>,
) -> Result<ExitCode> {
    let disk = open(file, format)?;
    let layers: Vec<&Image> = if backing_chain {
        disk.chain().collect()
    } else {
        vec![disk.top()]
    };
    let infos: Vec<info::ImageInfo> = layers.into_iter().map(info::describe).collect();
    match output {
        Output::Json if backing_chain => print_json(&infos),
        Output::Json => print_json(&infos[0]),
        Output::Human => print(&infos.iter().map(info::human).collect::<Vec<_>>().join("\n")),
    }
}

fn map_cmd(file: &Path, output: Output, format: Option<ImageFormat>) -> Result<ExitCode> {
    let disk = open(file, format)?;
    let f = match output {
        Output::Human => MapFormat::Human,
        Output::Json => MapFormat::Json,
    };
    map::write_map(&disk, f, &mut std::io::stdout().lock())?;
    Ok(ExitCode::SUCCESS)
}

fn convert_cmd(
    output_format: ConvertTarget,
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    qcow2: &Qcow2Output,
) -> Result<ExitCode> {
    match output_format {
        ConvertTarget::Raw => convert::to_raw(src, dst, opts),
        ConvertTarget::Qcow2 => convert::to_qcow2(src, dst, opts, qcow2),
    }
    .with_context(|| format!("converting {}", src.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// `backing`: the name to store, its format, and whether to open it (not with `-u`).
fn create_cmd(
    options: &[String],
    backing: Option<(String, Option<ImageFormat>, bool)>,
    file: &Path,
    size: Option<u64>,
) -> Result<ExitCode> {
    let mut opts = CreateOptions::default();
    for o in options {
        create_opts::apply(&mut opts, o).map_err(anyhow::Error::msg)?;
    }
    // Like qemu-img, the backing file is opened (which proves it is there and readable, and
    // gives the size) unless -u says it cannot or need not be.
    let backing_size = match &backing {
        Some((b, format, true)) => {
            let path = qmpbackup::qcow2::disk::backing_path(file, std::ffi::OsStr::new(b))
                .map_err(|k| k.at(file))
                .context("pass -u to store a backing name that is not opened here")?;
            let disk = Disk::open_with(
                &path,
                &OpenOptions {
                    format: format.map(Format::from),
                    ..Default::default()
                },
            )?;
            Some(disk.size())
        }
        _ => None,
    };
    if let Some((b, format, _)) = backing {
        opts.backing = Some((b, format.map(Format::from)));
    }
    opts.size = match (size, backing_size) {
        (Some(s), _) | (None, Some(s)) => s,
        (None, None) if opts.backing.is_some() => {
            anyhow::bail!("a size is needed with -u (the backing file is not opened)")
        }
        (None, None) => anyhow::bail!("a size is needed (or a backing file to take it from)"),
    };
    create::create(file, &opts)?;
    Ok(ExitCode::SUCCESS)
}

/// Where `serve` listens, as given on the command line.
struct Listen {
    socket: Option<PathBuf>,
    listen: Option<String>,
    insecure: bool,
}

fn serve_cmd(
    exports: serve::Exports,
    place: &Listen,
    opts: &serve::Options,
    pidfile: Option<&Path>,
) -> Result<ExitCode> {
    let tls = opts.tls.is_some();
    let listeners = match (&place.socket, &place.listen, serve::Listener::inherited()?) {
        (Some(s), None, None) => vec![serve::Listener::unix(s)?],
        (None, Some(a), None) => serve::Listener::tcp(a, tls, place.insecure)?,
        (None, None, Some(l)) => l,
        (None, None, None) => {
            anyhow::bail!("say where to listen: --socket PATH or --listen HOST:PORT")
        }
        _ => anyhow::bail!(
            "systemd passed listening sockets (LISTEN_FDS): --socket and --listen cannot be used with them"
        ),
    };
    for l in &listeners {
        for e in exports.iter() {
            let name = e.names().last().map_or("", |n| n.as_str());
            eprintln!(
                "qmprestore: serving {} ({})",
                l.uri(name, tls),
                e.description()
            );
        }
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    if let Some(p) = pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let served = serve::serve(&listeners, exports, opts, &stop);
    if let Some(p) = pidfile {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!("served {} connections", served?);
    Ok(ExitCode::SUCCESS)
}

fn check_cmd(file: &Path, output: Output, repair: Option<RepairArg>) -> Result<ExitCode> {
    let report = match repair {
        None => check::check(file)?,
        Some(RepairArg::Leaks) => check::repair(file, Repair::Leaks)?,
        Some(RepairArg::All) => check::repair(file, Repair::All)?,
    };
    for m in &report.messages {
        eprintln!("{m}");
    }
    match output {
        Output::Json => print_json(&report)?,
        Output::Human => print(&report.human())?,
    };
    Ok(ExitCode::from(report.exit_code()))
}

fn snapshot_cmd(
    list: bool,
    create: Option<String>,
    apply: Option<String>,
    delete: Option<String>,
    file: &Path,
) -> Result<ExitCode> {
    if list {
        let disk = Disk::open_alone(file)?;
        return match disk.qcow2().filter(|q| !q.snapshots().is_empty()) {
            Some(q) => print(&info::snapshot_table(&info::snapshots(q))),
            None => Ok(ExitCode::SUCCESS),
        };
    }
    let op = match (&create, &apply, &delete) {
        (Some(name), _, _) => SnapshotOp::Create(name),
        (_, Some(key), _) => SnapshotOp::Apply(key),
        (_, _, Some(key)) => SnapshotOp::Delete(key),
        _ => return Ok(ExitCode::SUCCESS),
    };
    // A request that cannot succeed is refused before the writer opens the image (opening a
    // dirty image for writing repairs it).
    let q = Qcow2::open(file)?;
    op.refuse(q.snapshots(), q.data_file().is_some())
        .map_err(|k| k.at(file))?;
    drop(q);
    let mut w = Writer::open(file)?;
    match op {
        SnapshotOp::Create(name) => drop(w.create_snapshot(name)?),
        SnapshotOp::Apply(key) => w.apply_snapshot(key)?,
        SnapshotOp::Delete(key) => w.delete_snapshot(key)?,
    }
    w.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `verify`'s exit codes: 0 restorable, 1 problems, 2 could not run.
fn verify_cmd(dir: &Path, recursive: bool, filter: Option<&str>, json: bool) -> Result<ExitCode> {
    let report = match verify::verify(dir, recursive, filter) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qmprestore: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if json {
        print_json(&report)?;
    } else {
        print(&report.human())?;
    }
    Ok(ExitCode::from(if report.restorable { 0 } else { 1 }))
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    create_opts::parse_size(s)
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
