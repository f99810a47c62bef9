//! `qmpbackup backup`: the options of a backup run, turned into the library's
//! [`Options`](qmpbackup::backup::run::Options), the run, then the push it may ask for.

use crate::push::{self, PushArgs};
use anyhow::{Context, Result};
use clap::ValueEnum;
use qmpbackup::backup::device::Selection;
use qmpbackup::backup::fleece::FileIo;
use qmpbackup::backup::job::Progress;
use qmpbackup::backup::plan::Requested;
use qmpbackup::backup::run::{self, Options};
use qmpbackup::backup::vm::VmState;
use qmpbackup::chain::prune::{PruneOptions, PruneReport};
use qmpbackup::qmp::{Address, Qmp};
use qmpbackup::store::keep::Policy;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
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
    /// After a successful run (and push), prune the target by these rules, as
    /// `qmprestore prune --dir TARGET` does: e.g. "keep-last=7,keep-weekly=4" (rules:
    /// keep-last, -hourly, -daily, -weekly, -monthly, -yearly).
    #[arg(long, value_name = "RULES", value_parser = parse_rules)]
    prune: Option<Policy>,
}

/// `--prune`'s rules; a policy that keeps nothing is refused here, before QEMU is contacted.
fn parse_rules(s: &str) -> Result<Policy, String> {
    let p = Policy::parse(s)?;
    if p.is_empty() {
        return Err("no rule above 0: the prune would keep nothing".into());
    }
    Ok(p)
}

#[derive(Clone, Copy, ValueEnum)]
enum Level {
    Copy,
    Full,
    Inc,
    Auto,
}

#[derive(Clone, Copy, ValueEnum)]
enum Aio {
    Threads,
    #[value(name = "io_uring")]
    IoUring,
}

impl Args {
    /// What the original refuses as a failed run (exit 1), not as a usage error; checked
    /// before QEMU is contacted.
    pub fn refuse(&self) -> Result<()> {
        if !self.exclude.is_empty() && !self.include.is_empty() {
            anyhow::bail!("Specify either included or excluded devices");
        }
        if self.prune.is_some() && self.push.push_only {
            anyhow::bail!("--prune folds the local backup files, which --push-only removes");
        }
        Ok(())
    }

    fn options(self, agent: Option<Address>) -> Options {
        Options {
            level: match self.level {
                Level::Copy => Requested::Copy,
                Level::Full => Requested::Full,
                Level::Inc => Requested::Inc,
                Level::Auto => Requested::Auto,
            },
            target: self.target,
            selection: Selection {
                include: self.include,
                exclude: self.exclude,
                include_raw: self.include_raw,
            },
            monthly: self.monthly,
            subdirs: !self.no_subdir,
            timestamp: !self.no_timestamp,
            symlink: !self.no_symlink,
            quiesce: self.quiesce,
            agent,
            pause: self.pause,
            speed_limit: self.speed_limit,
            progress: Progress {
                bars: std::io::stderr().is_terminal(),
                interval: Duration::from_secs(self.progress_interval.max(1)),
            },
            cbw_timeout: self.cbw_timeout,
            compress: self.compress,
            uuid: self.uuid,
            remove_delay: Duration::from_secs(self.remove_delay),
            target_io: FileIo {
                aio: Some(match self.blockdev_aio {
                    Aio::Threads => "threads".into(),
                    Aio::IoUring => "io_uring".into(),
                }),
                direct: self.blockdev_disable_cache,
            },
            fleece_dir: self.fleece_dir,
            link_incs: self.link_incs,
        }
    }
}

/// Runs the backup, then (only after a successful run) the push it asks for: a failed push
/// leaves the local chain whole.
pub fn run(
    mut qmp: Qmp,
    state: &VmState,
    mut a: Args,
    agent: Option<Address>,
    interrupted: &AtomicBool,
) -> Result<()> {
    let push_args = std::mem::take(&mut a.push);
    let rules = a.prune.take();
    let opts = a.options(agent);
    run::run(&mut qmp, &opts, state, interrupted)?;
    drop(qmp);
    push::push(&opts.target, &push_args)?;
    if let Some(policy) = rules {
        let report = prune(&opts.target, policy)?;
        // The store follows: what the prune changed goes up, then what it deleted goes.
        if let Some(url) = push_args.url() {
            push::push(&opts.target, &push_args)?;
            qmpbackup::chain::prune::forget_in(std::path::Path::new(url), &report)
                .with_context(|| format!("deleting the pruned points from {url}"))?;
        }
    }
    Ok(())
}

/// `--prune`: the target's restore points the rules do not keep are folded away; the report's
/// lines go to the log.
fn prune(target: &std::path::Path, policy: Policy) -> Result<PruneReport> {
    let opts = PruneOptions {
        policy,
        filter: None,
        dry_run: false,
        rate_limit: None,
        progress: false,
    };
    let report = qmpbackup::chain::prune::prune(target, &opts)
        .with_context(|| format!("pruning {}", target.display()))?;
    for line in report.human().lines() {
        tracing::info!(target: crate::LOG, "Prune: {line}");
    }
    Ok(report)
}
