//! `qmprestore prune`: keep the restore points the rules name, fold the others away.

use crate::options::{JsonArg, ProgressArg};
use crate::report::{print, print_json};
use anyhow::{Context, Result};
use qmpbackup::chain::prune::{self, PruneOptions, PruneReport};
use qmpbackup::store::keep::Policy;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub const HELP: &str = "Examples:
  qmprestore prune --dir /backup/vm1/disk1.qcow2 --keep-last 7 --dry-run
  qmprestore prune --dir /backup/vm1 --keep-daily 7 --keep-weekly 4 --keep-monthly 6 --json

The rules are Proxmox Backup Server's: keep-last keeps the newest N points; keep-hourly,
-daily, -weekly (ISO weeks), -monthly and -yearly keep the newest point of each of the last N
such periods (local time) that have one, each rule only among the points no earlier rule
kept. --dir is one disk's folder, a target holding disk folders, or a --monthly target (its
YYYY-MM folders go whole when no rule keeps a point of theirs; the newest never goes).

Points before the oldest kept one are folded into the FULL, which is renamed after that
point (FULL-<its epoch>-<disk>); a point between kept ones is folded into the INC after it.
Every kept point restores as before, at every instant: an interrupted prune is completed by
running it again. Changed files get new manifests, so verify keeps proving them.

On an object store (--dir s3://BUCKET/PREFIX/...) objects cannot change in place: the folder
is copied to a local work folder (--work-dir, default $TMPDIR), pruned there, the new and
changed files are uploaded (the FULL before the INCs, files before manifests), and only then
are the objects of the points that went deleted. An interruption leaves every kept point
restorable from the store; running it again completes it.";

#[derive(clap::Args)]
pub struct Args {
    /// A disk's backup folder, a target holding disk folders, or a --monthly target.
    #[arg(long)]
    dir: PathBuf,
    /// Only consider files whose name contains this (picks one disk in a flat folder).
    #[arg(long)]
    filter: Option<String>,
    /// Keep the newest N restore points.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest point of each of the last N hours that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_hourly: u32,
    /// Keep the newest point of each of the last N days that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_daily: u32,
    /// Keep the newest point of each of the last N ISO weeks that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_weekly: u32,
    /// Keep the newest point of each of the last N months that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_monthly: u32,
    /// Keep the newest point of each of the last N years that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_yearly: u32,
    /// Print what would be kept, folded and removed, and the bytes it frees; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Limit the folds' throughput to this many bytes per second.
    #[arg(long, value_parser = crate::options::parse_size)]
    rate_limit: Option<u64>,
    /// Where an object store's folder is copied to be pruned (default: $TMPDIR).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    #[command(flatten)]
    json: JsonArg,
    #[command(flatten)]
    progress: ProgressArg,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let policy = Policy {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
    };
    let opts = PruneOptions {
        policy,
        filter: a.filter,
        dry_run: a.dry_run,
        rate_limit: a.rate_limit,
        progress: a.progress.progress,
    };
    let report = if qmpbackup::s3::url::is_s3(&a.dir) {
        in_store(&a.dir, a.work_dir, &opts)?
    } else {
        prune::prune(&a.dir, &opts)?
    };
    if a.json.json {
        print_json(&report)
    } else {
        print(&report.human())
    }
}

/// Prunes an object-store folder through a local copy: stage, prune, upload what is new or
/// changed, then delete what went (see HELP).
fn in_store(url: &Path, work_dir: Option<PathBuf>, opts: &PruneOptions) -> Result<PruneReport> {
    // One work folder per store folder: what a killed run left there goes first.
    let base = work_dir.unwrap_or_else(std::env::temp_dir);
    let url_crc = crc32fast::hash(url.as_os_str().as_encoded_bytes());
    let work = Work(base.join(format!(".qmprestore-prune-{url_crc:08x}")));
    let _ = std::fs::remove_dir_all(&work.0);
    std::fs::create_dir_all(&work.0).with_context(|| format!("creating {}", work.0.display()))?;
    prune::stage(url, &work.0)?;
    if !opts.dry_run {
        prune::take_held_manifests(url, &work.0)?;
    }
    let before = prune::manifests(&work.0);
    let mut report = prune::prune(&work.0, opts)?;
    if !opts.dry_run {
        prune::hold_manifests(url, &work.0, &before)?;
        let bar = indicatif::ProgressBar::hidden();
        let text = url.to_string_lossy();
        qmpbackup::backup::push::push(&work.0, &text, false, &bar)
            .with_context(|| format!("uploading the pruned folder to {text}"))?;
        prune::forget_in(url, &report)?;
        prune::release_manifests(url)?;
    }
    let local = work.0.display().to_string();
    let shown = url.display().to_string();
    report.dir = shown.clone();
    for p in &mut report.points {
        p.dir = p.dir.replacen(&local, &shown, 1);
    }
    for n in &mut report.notes {
        *n = n.replacen(&local, &shown, 1);
    }
    Ok(report)
}

/// The local copy of a folder being pruned, removed when done (or failed: the store is the
/// truth, and a re-run copies it again).
struct Work(PathBuf);

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
