//! `qmprestore`: restore QEMU backups and inspect images without qemu-img.
//!
//! This file only parses the command line and dispatches: each command's options and the
//! code that turns them into a library call live in a module of their own beside it, and the
//! options many commands share in `options`, so that a new shared option touches one file.

mod check;
mod compare;
mod convert;
mod create;
mod fold;
mod info;
mod key;
mod list;
mod merge;
mod options;
mod prune;
mod rebase;
mod report;
mod secrets;
mod serve;
mod snapshot;
mod verify;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

const EXIT_CODES: &str = "\
Exit codes:
  0  success (compare: identical; check: no problems)
  1  failure (compare: images differ; check: the image could not be checked)
  2  compare: an image could not be read; check: corruptions found
  3  check: only leaked clusters found";

#[derive(Parser)]
#[command(
    name = "qmprestore",
    version = qmpbackup::cli::VERSION,
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
    #[command(flatten)]
    keys: secrets::KeyArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge a backup chain into one new image; the backup files stay untouched.
    #[command(after_help = merge::HELP)]
    Merge(merge::Args),
    /// Fold the INCs up to the restore point into the FULL, in place, then delete them.
    #[command(after_help = fold::COMMIT_HELP)]
    Commit(fold::Args),
    /// Fold each INC into the FULL and keep every backup as an internal snapshot.
    #[command(name = "snapshotrebase", after_help = fold::SNAPSHOT_REBASE_HELP)]
    SnapshotRebase(fold::Args),
    /// Keep the restore points retention rules name; fold the others away, crash-safely.
    #[command(after_help = prune::HELP)]
    Prune(prune::Args),
    /// Link every INC to its predecessor in place and point `image` at the restore point.
    #[command(after_help = rebase::HELP)]
    Rebase(rebase::Args),
    /// Prove that backup chains restore: structure, consistency, links, and every stored byte.
    #[command(after_help = verify::HELP)]
    Verify(verify::Args),
    /// List the restore points of a backup directory.
    #[command(after_help = list::HELP)]
    List(list::Args),
    /// Show an image's format, sizes, backing file, snapshots and qcow2 features.
    #[command(after_help = info::INFO_HELP)]
    Info(info::InfoArgs),
    /// Show where each guest range is stored, like `qemu-img map`.
    #[command(after_help = info::MAP_HELP)]
    Map(info::MapArgs),
    /// Write the guest-visible contents of an image (with its backing chain) to a new file.
    #[command(after_help = convert::HELP)]
    Convert(convert::Args),
    /// Create a new qcow2 image (qemu-img's -o options).
    #[command(after_help = create::HELP)]
    Create(create::Args),
    /// Check an image's consistency (refcounts, references, flags), like qemu-img check.
    #[command(after_help = check::HELP)]
    Check(check::Args),
    /// List, create, apply or delete internal snapshots.
    #[command(after_help = snapshot::HELP)]
    Snapshot(snapshot::Args),
    /// Add or remove the passphrases of LUKS-encrypted images (key slots).
    #[command(after_help = key::HELP)]
    Key(key::Args),
    /// Compare the guest-visible contents of two images (qcow2 or raw, probed).
    #[command(after_help = compare::HELP)]
    Compare(compare::Args),
    /// Serve a restore point (or any image with its backing chain) read-only over NBD.
    #[command(after_help = serve::HELP)]
    Serve(serve::Args),
    #[command(flatten)]
    SelfDoc(qmpbackup::cli::SelfDoc),
}

fn main() -> ExitCode {
    let args = secrets::image_opts_args(std::env::args_os().collect());
    let (cli, cmd) = qmpbackup::cli::parse_from::<Cli>(args);
    if let Command::SelfDoc(doc) = cli.command {
        return doc.run(cmd);
    }
    init_logging(cli.debug);
    qmpbackup::store::bucket::register();
    qmpbackup::cli::restrict_new_files(cli.group_readable);
    // A write past the file size limit (ulimit -f) must fail with EFBIG, which we report and
    // clean up after, instead of killing the process with SIGXFSZ halfway through.
    // SAFETY: setting a signal's disposition to "ignore" before any thread starts.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let _ = cli.skip_check;
    let result = secrets::install(&cli.keys).and_then(|()| run(cli.command));
    qmpbackup::qcow2::crypto::keys::forget();
    qmpbackup::store::bucket::log_traffic();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qmprestore: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(debug: bool) {
    // Debug lines are ours: the HTTP and TLS crates' own (connection pools, handshakes) stay
    // at warn.
    let level = if debug {
        "warn,qmpbackup=debug,qmprestore=debug"
    } else {
        "warn"
    };
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

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Merge(a) => merge::run(a),
        Command::Commit(a) => fold::commit(a),
        Command::SnapshotRebase(a) => fold::snapshot_rebase(a),
        Command::Prune(a) => prune::run(a),
        Command::Rebase(a) => rebase::run(a),
        Command::Verify(a) => verify::run(a),
        Command::List(a) => list::run(a),
        Command::Info(a) => info::info(a),
        Command::Map(a) => info::map(a),
        Command::Convert(a) => convert::run(a),
        Command::Create(a) => create::run(a),
        Command::Check(a) => check::run(a),
        Command::Snapshot(a) => snapshot::run(a),
        Command::Key(a) => key::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Serve(a) => serve::run(a),
        Command::SelfDoc(_) => unreachable!("handled in main"),
    }
}
