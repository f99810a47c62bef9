//! `qmpbackup`: live backups of a QEMU VM's disks over QMP. A drop-in replacement for the
//! original Python tool: same subcommands, options and directory layout.
//!
//! This file only parses the command line, sets up the log and dispatches: each subcommand's
//! options and the code that turns them into library calls live in a module beside it.

mod backup;
mod cleanup;
mod info;
mod push;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use qmpbackup::backup::log::{self, Console};
use qmpbackup::backup::{vm, BackupError};
use qmpbackup::qmp::{Address, Qmp};
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

/// The name the front end's log lines carry (`… INFO - qmpbackup: …`), whichever of its
/// modules logs them.
const LOG: &str = "qmpbackup";

#[derive(Parser)]
#[command(name = "qmpbackup", version = qmpbackup::cli::VERSION, about = "Full, incremental and copy backups of running QEMU VMs over QMP", after_help = AFTER_HELP)]
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

#[derive(Subcommand)]
enum Command {
    /// Back up the VM's disks.
    Backup(backup::Args),
    /// Remove the dirty bitmaps of backup chains from the VM's disks.
    Cleanup(cleanup::Args),
    /// Show the VM's block devices or their dirty bitmaps (as the original prints them).
    Info(info::Args),
    /// Upload a backup target folder to an object store: what it lacks, verified; an
    /// interrupted push is completed by the next.
    #[command(after_help = push::HELP)]
    Push(push::Args),
    #[command(flatten)]
    SelfDoc(qmpbackup::cli::SelfDoc),
}

fn main() -> ExitCode {
    let (mut cli, mut cmd) = qmpbackup::cli::parse::<Cli>();
    let command = match cli.command.take() {
        None => {
            // As the original: no subcommand prints the help and fails.
            let _ = cmd.print_help();
            return ExitCode::from(1);
        }
        Some(Command::SelfDoc(doc)) => return doc.run(cmd),
        Some(command) => command,
    };
    qmpbackup::store::bucket::register();
    let socket = match (&cli.socket, &command) {
        (Some(s), _) => s.clone(),
        // A push talks to the object store only.
        (None, Command::Push(_)) => String::new(),
        (None, _) => cmd
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "the following required arguments were not provided:\n  --socket <SOCKET>",
            )
            .exit(),
    };
    // A report on standard output that a script parses keeps the log off it.
    let console = match &command {
        Command::Info(a) if a.prints_report() => Console::Stderr,
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
    let result = run(cli, command, &socket);
    qmpbackup::store::bucket::log_traffic();
    match result {
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

fn run(cli: Cli, command: Command, socket: &str) -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&interrupted)).context("signal handler")?;
    }
    match &command {
        Command::Backup(a) => a.refuse()?,
        Command::Push(a) => return push::run(a),
        _ => {}
    }
    let mut qmp = connect(socket, Duration::from_secs(cli.connect_timeout.max(1)))?;
    let state = vm::preflight(&mut qmp)?;
    match command {
        Command::Backup(a) => {
            let agent = cli
                .agent_socket
                .as_deref()
                .map(Address::parse)
                .transpose()?;
            backup::run(qmp, &state, a, agent, &interrupted)
        }
        Command::Cleanup(a) => cleanup::run(&mut qmp, &a),
        Command::Info(a) => info::run(&mut qmp, &a),
        Command::Push(_) | Command::SelfDoc(_) => {
            unreachable!("handled before")
        }
    }
}
