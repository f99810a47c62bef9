//! `qmpbackup push` and `backup --push`: a backup target folder uploaded to an object store.

use anyhow::{Context, Result};
use qmpbackup::backup::{log, push};
use std::path::{Path, PathBuf};

pub const HELP: &str = "Examples:
  qmpbackup push --target /backup/vm1 --push s3://backups/vm1
  qmpbackup push --target /backup/vm1 --push s3://backups/vm1 --push-only";

#[derive(clap::Args, Default)]
pub struct PushArgs {
    /// After a successful run, upload the target folder to an object store
    /// (s3://BUCKET/PREFIX, same layout below PREFIX) what the store does not hold yet.
    /// Credentials, region and endpoint come from AWS_* variables or ~/.aws (see README).
    #[arg(long, value_name = "URL")]
    push: Option<String>,
    /// With --push: remove the local backup files once they are uploaded and verified,
    /// keeping their manifests (what the next incremental needs).
    #[arg(long, requires = "push")]
    pub push_only: bool,
}

/// `qmpbackup push`: needs no QMP socket.
#[derive(clap::Args)]
pub struct Args {
    /// The backup target folder (as given to backup --target).
    #[arg(short, long)]
    target: PathBuf,
    #[command(flatten)]
    push: PushArgs,
}

impl PushArgs {
    /// The store `--push` names, if any.
    pub fn url(&self) -> Option<&str> {
        self.push.as_deref()
    }
}

pub fn run(a: &Args) -> Result<()> {
    anyhow::ensure!(a.push.push.is_some(), "give --push s3://BUCKET/PREFIX");
    push(&a.target, &a.push)
}

/// Uploads `target` when `--push` asks for it.
pub fn push(target: &Path, args: &PushArgs) -> Result<()> {
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
    tracing::info!(target: crate::LOG,
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
