//! `qmpbackup`: live backups of a QEMU VM's disks over QMP. A drop-in replacement for the
//! original Python tool: same subcommands, options and directory layout.

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use qmpbackup::backup::device::{Device, Selection};
use qmpbackup::backup::fleece::FileIo;
use qmpbackup::backup::job::Progress;
use qmpbackup::backup::log::{self, Console};
use qmpbackup::backup::plan::Requested;
use qmpbackup::backup::push;
use qmpbackup::backup::run::{self, Options};
use qmpbackup::backup::vm;
use qmpbackup::backup::{admin, BackupError};
use qmpbackup::qmp::{Address, Qmp};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

const AFTER_HELP: &str = "\
Examples:
  qmpbackup --socket /run/vm1.qmp backup --level full --target /backup/vm1
  qmpbackup --socket /run/vm1.qmp backup --level auto --monthly --target /backup/vm1
  qmpbackup --socket tcp:[::1]:4444 backup -l inc -t /backup/vm1 --exclude pflash0
  qmpbackup --socket /run/vm1.qmp info --show bitmaps
  qmpbackup --socket /run/vm1.qmp cleanup --remove-bitmap --uuid <chain id>
  qmpbackup completions bash > /etc/bash_completion.d/qmpbackup

The log goes to standard output in the original's format (info --json/--human: to standard
error). New backup folders are 0700 and files 0600 (--group-readable: 0750/0640).

Give qmpbackup a QMP socket of its own: QEMU serves one client per socket.

Exit codes:
  0    success
  1    the backup (or command) failed; nothing of the failed run is kept and the chain's
       dirty bitmaps are unchanged, so the next run continues the chain
  2    invalid command line
  130  interrupted by SIGINT/SIGTERM (jobs cancelled, everything cleaned up)";

#[derive(Parser)]
#[command(name = "qmpbackup", version, about = "Full, incremental and copy backups of running QEMU VMs over QMP", after_help = AFTER_HELP)]
struct Cli {
    /// QMP socket: a unix socket path, or tcp:HOST:PORT (IPv6: tcp:[::1]:4444). Required by
    /// backup, cleanup and info.
    #[arg(long)]
    socket: Option<String>,
    /// Guest-agent socket (unix path or tcp:HOST:PORT), used by `backup --quiesce`.
    #[arg(long)]
    agent_socket: Option<String>,
    /// Log debug details, including the QMP traffic.
    #[arg(long)]
    debug: bool,
    /// Also append the log to this file (its folder is created).
    #[arg(short = 'L', long)]
    logfile: Option<PathBuf>,
    /// Also log to the local syslog.
    #[arg(long)]
    syslog: bool,
    /// Seconds to wait for QEMU's greeting (a socket that already serves another client
    /// accepts the connection but never greets).
    #[arg(long, default_value_t = 10)]
    connect_timeout: u64,
    /// New folders 0750 and files 0640 (default 0700 and 0600, whatever the umask): for sites
    /// whose restore user reads backups through a group. Existing folders keep their modes.
    #[arg(long, global = true)]
    group_readable: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Level {
    Copy,
    Full,
    Inc,
    Auto,
}

#[derive(Clone, Copy, ValueEnum)]
enum Show {
    Blockdev,
    Bitmaps,
}

#[derive(Clone, Copy, ValueEnum)]
enum Aio {
    Threads,
    #[value(name = "io_uring")]
    IoUring,
}

#[derive(Subcommand)]
enum Command {
    /// Back up the VM's disks.
    Backup(BackupArgs),
    /// Remove the dirty bitmaps of backup chains from the VM's disks.
    Cleanup {
        /// Remove every qmpbackup bitmap (required, as in the original).
        #[arg(long, visible_alias = "remove-bitmaps", required = true)]
        remove_bitmap: bool,
        /// Only the bitmaps of this chain id.
        #[arg(long)]
        uuid: Option<String>,
    },
    /// Show the VM's block devices or their dirty bitmaps (as the original prints them).
    Info {
        #[arg(long, value_enum)]
        show: Show,
        /// One JSON document on standard output (the log goes to standard error).
        #[arg(long, conflicts_with = "human")]
        json: bool,
        /// A readable table on standard output (the log goes to standard error).
        #[arg(long)]
        human: bool,
    },
    /// Upload a backup target folder to an object store: what it lacks, verified; an
    /// interrupted push is completed by the next.
    #[command(
        after_help = "Examples:\n  qmpbackup push --target /backup/vm1 --push s3://backups/vm1\n  qmpbackup push --target /backup/vm1 --push s3://backups/vm1 --push-only"
    )]
    Push {
        /// The backup target folder (as given to backup --target).
        #[arg(short, long)]
        target: PathBuf,
        #[command(flatten)]
        push: PushArgs,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on standard output.
    Man,
}

#[derive(clap::Args)]
struct BackupArgs {
    /// copy: standalone full copy outside any chain; full: start a chain; inc: changes since the
    /// chain's last backup; auto: inc where possible, else full (and says why).
    #[arg(short, long, value_enum)]
    level: Level,
    /// Target directory (created if missing).
    #[arg(short, long)]
    target: PathBuf,
    /// Comma-separated devices or node names to leave out.
    #[arg(short, long, value_delimiter = ',')]
    exclude: Vec<String>,
    /// Comma-separated devices or node names to back up (only these).
    #[arg(short, long, value_delimiter = ',')]
    include: Vec<String>,
    /// Write into TARGET/YYYY-MM; with auto, a new month starts a new chain.
    #[arg(long)]
    monthly: bool,
    /// Put all disks' files directly into the target directory.
    #[arg(long)]
    no_subdir: bool,
    /// copy/full: name the file after the disk only (plus a FULL-/COPY-<disk> symlink).
    #[arg(long)]
    no_timestamp: bool,
    /// With --no-timestamp: no symlink.
    #[arg(long)]
    no_symlink: bool,
    /// Freeze the guest's file systems through the guest agent at the snapshot point.
    #[arg(long)]
    quiesce: bool,
    /// Pause a running VM for the whole backup (a VM that is not running stays as it is).
    #[arg(long)]
    pause: bool,
    /// Bytes per second per backup job (0: unlimited).
    #[arg(long, default_value_t = 0)]
    speed_limit: u64,
    /// Seconds between progress log lines (without a terminal).
    #[arg(long, default_value_t = 20)]
    progress_interval: u64,
    /// Seconds a guest write may wait for the fleecing copy before the snapshot is broken
    /// (the backup then fails, the guest write succeeds).
    #[arg(long, default_value_t = 45)]
    cbw_timeout: u64,
    /// Compress the backup (qcow2 targets).
    #[arg(long)]
    compress: bool,
    /// Include raw-format disks (pflash is always included).
    #[arg(long)]
    include_raw: bool,
    /// Chain id for a new chain (ignored, with a warning, when the target has one).
    #[arg(long)]
    uuid: Option<String>,
    /// Seconds to wait before the temporary nodes are removed.
    #[arg(long, default_value_t = 0)]
    remove_delay: u64,
    /// aio mode of the target's file node.
    #[arg(long, value_enum, default_value = "threads")]
    blockdev_aio: Aio,
    /// Write the backup with direct I/O (QEMU's cache.direct): nightly backups then do not
    /// push what the host had cached out of its page cache. The target's file system must
    /// support O_DIRECT. (The original's option of this name changed nothing.)
    #[arg(long)]
    blockdev_disable_cache: bool,
    /// Directory for the temporary fleecing images (default: TARGET/.fleece).
    #[arg(long)]
    fleece_dir: Option<PathBuf>,
    /// Write each INC with its predecessor as backing file, so QEMU and qemu-img can open the
    /// newest INC directly. The original's qmprestore cannot restore such chains; ours
    /// restores both kinds.
    #[arg(long)]
    link_incs: bool,
    #[command(flatten)]
    push: PushArgs,
}

#[derive(clap::Args)]
struct PushArgs {
    /// After a successful run, upload the target folder to an object store
    /// (s3://BUCKET/PREFIX, same layout below PREFIX) what the store does not hold yet.
    /// Credentials, region and endpoint come from AWS_* variables or ~/.aws (see README).
    #[arg(long, value_name = "URL")]
    push: Option<String>,
    /// With --push: remove the local backup files once they are uploaded and verified,
    /// keeping their manifests (what the next incremental needs).
    #[arg(long, requires = "push")]
    push_only: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(command) = &cli.command else {
        // As the original: no subcommand prints the help and fails.
        let _ = Cli::command().print_help();
        return ExitCode::from(1);
    };
    match command {
        Command::Completions { shell } => {
            qmpbackup::cli::completions(*shell, Cli::command(), &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man => return qmpbackup::cli::print_man(Cli::command()),
        _ => {}
    }
    qmpbackup::store::bucket::register();
    let socket = match (&cli.socket, command) {
        (Some(s), _) => s.clone(),
        // A push talks to the object store only.
        (None, Command::Push { .. }) => String::new(),
        (None, _) => Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "the following required arguments were not provided:\n  --socket <SOCKET>",
            )
            .exit(),
    };
    // A report on standard output that a script parses keeps the log off it.
    let console = match command {
        Command::Info { json, human, .. } if *json || *human => Console::Stderr,
        _ => Console::Stdout,
    };
    if let Err(e) = log::init(console, cli.debug, cli.logfile.as_deref(), cli.syslog) {
        let what = cli
            .logfile
            .as_deref()
            .map_or("syslog".into(), |p| p.display().to_string());
        eprintln!("qmpbackup: {what}: {e}");
        return ExitCode::from(1);
    }
    // After the log file is open: a monitoring user may read that one.
    qmpbackup::cli::restrict_new_files(cli.group_readable);
    let argv: Vec<String> = std::env::args().collect();
    tracing::info!(
        "Version: {} Arguments: {}",
        env!("CARGO_PKG_VERSION"),
        argv.join(" ")
    );
    match run(cli, &socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let backup_error = e.downcast_ref::<BackupError>();
            let interrupted = matches!(backup_error, Some(BackupError::Interrupted));
            if interrupted {
                tracing::error!("Backup aborted by signal.");
            }
            match backup_error {
                Some(BackupError::Failed(_) | BackupError::Qmp(_)) => {
                    tracing::error!("Error executing backup: {e:#}")
                }
                _ => tracing::error!("{e:#}"),
            }
            ExitCode::from(if interrupted { 130 } else { 1 })
        }
    }
}

fn connect(socket: &str, greeting: Duration) -> Result<Qmp> {
    let addr = Address::parse(socket)?;
    match socket.strip_prefix("tcp:") {
        Some(endpoint) => tracing::info!("Connecting QMP endpoint: [{endpoint}]"),
        None => tracing::info!("Connecting QMP socket: [{socket}]"),
    }
    let mut qmp = Qmp::connect(&addr, greeting)
        .with_context(|| format!("Can't connect QMP socket [{socket}]"))?;
    // Commands such as blockdev-add on slow storage may take a while.
    qmp.timeout = Duration::from_secs(300);
    Ok(qmp)
}

fn run(cli: Cli, socket: &str) -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&interrupted)).context("signal handler")?;
    }
    if let Some(Command::Backup(a)) = &cli.command {
        if !a.exclude.is_empty() && !a.include.is_empty() {
            // As the original: a failed run (exit 1), not a usage error.
            anyhow::bail!("Specify either included or excluded devices");
        }
    }
    if let Some(Command::Push { target, push }) = &cli.command {
        anyhow::ensure!(push.push.is_some(), "give --push s3://BUCKET/PREFIX");
        return push_cmd(target, push);
    }
    let mut qmp = connect(socket, Duration::from_secs(cli.connect_timeout.max(1)))?;
    let state = vm::preflight(&mut qmp)?;
    match cli.command.expect("checked in main") {
        Command::Backup(a) => {
            let opts = Options {
                level: match a.level {
                    Level::Copy => Requested::Copy,
                    Level::Full => Requested::Full,
                    Level::Inc => Requested::Inc,
                    Level::Auto => Requested::Auto,
                },
                target: a.target,
                selection: Selection {
                    include: a.include,
                    exclude: a.exclude,
                    include_raw: a.include_raw,
                },
                monthly: a.monthly,
                subdirs: !a.no_subdir,
                timestamp: !a.no_timestamp,
                symlink: !a.no_symlink,
                quiesce: a.quiesce,
                agent: cli
                    .agent_socket
                    .as_deref()
                    .map(Address::parse)
                    .transpose()?,
                pause: a.pause,
                speed_limit: a.speed_limit,
                progress: Progress {
                    bars: std::io::stderr().is_terminal(),
                    interval: Duration::from_secs(a.progress_interval.max(1)),
                },
                cbw_timeout: a.cbw_timeout,
                compress: a.compress,
                uuid: a.uuid,
                remove_delay: Duration::from_secs(a.remove_delay),
                target_io: FileIo {
                    aio: Some(match a.blockdev_aio {
                        Aio::Threads => "threads".into(),
                        Aio::IoUring => "io_uring".into(),
                    }),
                    direct: a.blockdev_disable_cache,
                },
                fleece_dir: a.fleece_dir,
                link_incs: a.link_incs,
            };
            run::run(&mut qmp, &opts, &state, &interrupted)?;
            // Only a successful run is pushed; a failed push leaves the local chain whole.
            drop(qmp);
            push_cmd(&opts.target, &a.push)?;
        }
        Command::Cleanup { uuid, .. } => {
            admin::remove_bitmaps(&mut qmp, uuid.as_deref())?;
        }
        Command::Info { show, json, human } => {
            let devices = admin::devices(&mut qmp)?;
            if json {
                print_json(show, devices)?;
            } else if human {
                print_human(show, devices)?;
            } else {
                log_original(show, &devices);
            }
        }
        Command::Push { .. } | Command::Completions { .. } | Command::Man => {
            unreachable!("handled before")
        }
    }
    Ok(())
}

/// Uploads `target` when `--push` asks for it.
fn push_cmd(target: &std::path::Path, args: &PushArgs) -> Result<()> {
    let Some(url) = &args.push else {
        return Ok(());
    };
    let bar = qmpbackup::chain::progress::bytes(0, "push", true);
    let multi = (!bar.is_hidden()).then(indicatif::MultiProgress::new);
    let _shown = multi.as_ref().map(|m| {
        m.add(bar.clone());
        log::around_bars(m)
    });
    let done = push::push(target, url, args.push_only, &bar)
        .with_context(|| format!("pushing {} to {url}", target.display()))?;
    bar.finish_and_clear();
    tracing::info!(
        "Pushed {} to {url}: {} files uploaded, {} already there{}",
        target.display(),
        done.uploaded.len(),
        done.present.len(),
        if done.removed.is_empty() {
            String::new()
        } else {
            format!(", {} local backup files removed", done.removed.len())
        }
    );
    Ok(())
}

/// `info` as the original logs it: the device records, or each device's bitmap list, as
/// Python-formatted JSON.
fn log_original(show: Show, devices: &[(Device, serde_json::Value)]) {
    match show {
        Show::Blockdev => {
            tracing::info!("Attached block devices:");
            for (d, entry) in devices {
                let record = admin::original_record(d, entry);
                tracing::info!("{}", admin::python_json(&record));
            }
        }
        Show::Bitmaps => {
            for (d, entry) in devices {
                if d.bitmaps.is_empty() {
                    tracing::info!("No bitmaps found for device: \"{}:{}\"", d.node, d.filename);
                    continue;
                }
                tracing::info!("{} [{}]:", d.node, d.filename);
                let list = &entry["inserted"]["dirty-bitmaps"];
                tracing::info!("{}", admin::python_json(list));
            }
        }
    }
}

fn print_json(show: Show, devices: Vec<(Device, serde_json::Value)>) -> Result<()> {
    let doc = match show {
        Show::Blockdev => serde_json::Value::Array(devices.into_iter().map(|(_, r)| r).collect()),
        Show::Bitmaps => devices
            .into_iter()
            .map(|(d, r)| (d.name, r["inserted"]["dirty-bitmaps"].clone()))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    };
    writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}

fn print_human(show: Show, devices: Vec<(Device, serde_json::Value)>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for (d, _) in devices {
        match show {
            Show::Blockdev => writeln!(
                out,
                "{}: node {}, {} {}, {} bytes{}{}",
                d.name,
                d.node,
                d.format,
                d.filename,
                d.virtual_size,
                d.qdev.map(|q| format!(", qdev {q}")).unwrap_or_default(),
                if d.read_only { ", read-only" } else { "" }
            )?,
            Show::Bitmaps => {
                if d.bitmaps.is_empty() {
                    writeln!(out, "{}: no bitmaps", d.name)?;
                }
                for b in d.bitmaps {
                    let mut flags = vec![if b.recording { "recording" } else { "disabled" }];
                    if b.persistent {
                        flags.push("persistent");
                    }
                    if b.busy {
                        flags.push("busy");
                    }
                    if b.inconsistent {
                        flags.push("inconsistent");
                    }
                    writeln!(
                        out,
                        "{}: {} ({}, {} dirty bytes)",
                        d.name,
                        b.name,
                        flags.join(", "),
                        b.count
                    )?;
                }
            }
        }
    }
    Ok(())
}
