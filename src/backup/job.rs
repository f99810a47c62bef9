//! Waiting for a run's backup jobs: their events decide success, progress comes from
//! `query-block-jobs`, and a signal cancels them.
//!
//! Only events of our own job ids count (the original counted every job's events, and took a
//! cancelled job for a finished one). A job ends exactly once: with `BLOCK_JOB_COMPLETED`
//! (failed if it carries an error) or `BLOCK_JOB_CANCELLED` (always a failure: a backup that
//! did not copy everything is no backup, whoever cancelled it). The jobs run in one
//! transaction with grouped completion, so when one fails QEMU cancels the others.

use super::error::{BackupError, Result};
use crate::qmp::Qmp;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How a run reports job progress.
pub struct Progress {
    /// Progress bars (on a terminal).
    pub bars: bool,
    /// Seconds between progress log lines.
    pub interval: Duration,
}

struct Job {
    id: String,
    label: String,
    outcome: Option<std::result::Result<(), String>>,
    bar: Option<ProgressBar>,
}

/// Waits until every job in `jobs` (id, label) has ended. `interrupted` is set by the signal
/// handler; then the jobs are cancelled and [`BackupError::Interrupted`] returned once they
/// have ended.
pub fn wait(
    qmp: &mut Qmp,
    jobs: &[(String, String)],
    progress: &Progress,
    interrupted: &AtomicBool,
) -> Result<()> {
    let multi = progress.bars.then(MultiProgress::new);
    let _shown = multi.as_ref().map(super::log::around_bars);
    let style = ProgressStyle::with_template(
        "{prefix:>16} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )
    .expect("static template")
    .progress_chars("=> ");
    let mut jobs: Vec<Job> = jobs
        .iter()
        .map(|(id, label)| Job {
            id: id.clone(),
            label: label.clone(),
            outcome: None,
            bar: multi.as_ref().map(|m| {
                let b = m.add(ProgressBar::new(0));
                b.set_style(style.clone());
                b.set_prefix(label.clone());
                b
            }),
        })
        .collect();
    let mut cancel_sent: Option<Instant> = None;
    let mut next_poll = Instant::now();
    let mut next_log = Instant::now() + progress.interval;
    while jobs.iter().any(|j| j.outcome.is_none()) {
        if interrupted.load(Ordering::SeqCst) && cancel_sent.is_none() {
            tracing::info!("Received signal, wait until all jobs have been cancelled.");
            for j in jobs.iter().filter(|j| j.outcome.is_none()) {
                if let Err(e) =
                    qmp.execute("block-job-cancel", json!({"device": j.id, "force": true}))
                {
                    tracing::warn!("cancel {}: {e}", j.id);
                }
            }
            cancel_sent = Some(Instant::now());
        }
        if cancel_sent.is_some_and(|t| t.elapsed() > Duration::from_secs(60)) {
            return Err(BackupError::Failed(
                "backup jobs did not end within 60 s of being cancelled".into(),
            ));
        }
        if Instant::now() >= next_poll {
            poll(qmp, &mut jobs, Instant::now() >= next_log)?;
            if Instant::now() >= next_log {
                next_log = Instant::now() + progress.interval;
            }
            next_poll = Instant::now() + Duration::from_millis(500);
        }
        let Some(event) = qmp.next_event(Duration::from_millis(200))? else {
            continue;
        };
        let id = event
            .str("device")
            .or(event.str("id"))
            .unwrap_or("")
            .to_string();
        let Some(job) = jobs.iter_mut().find(|j| j.id == id) else {
            if event.name == "SHUTDOWN" {
                return Err(BackupError::Failed("QEMU is shutting down".into()));
            }
            continue;
        };
        match event.name.as_str() {
            "BLOCK_JOB_COMPLETED" => {
                job.outcome = Some(match event.str("error") {
                    Some(err) => Err(format!("{}: backup job failed: {err}", job.label)),
                    None => {
                        let (len, offset) =
                            (event.data["len"].as_u64(), event.data["offset"].as_u64());
                        if len != offset {
                            Err(format!(
                                "{}: job ended at {offset:?} of {len:?} bytes",
                                job.label
                            ))
                        } else {
                            tracing::info!("Block job [{}] finished", job.id);
                            Ok(())
                        }
                    }
                });
                if let Some(Err(e)) = &job.outcome {
                    tracing::error!("Block job [{}] failed: {e}", job.id);
                }
            }
            "BLOCK_JOB_CANCELLED" => {
                let by = if cancel_sent.is_some() {
                    "on our request"
                } else {
                    "by someone else"
                };
                tracing::error!("Block job [{}] cancelled.", job.id);
                job.outcome = Some(Err(format!("{}: backup job was cancelled {by}", job.label)));
            }
            "BLOCK_JOB_ERROR" => {
                tracing::error!(
                    "Block job [{}] failed. ({}: I/O error {})",
                    job.id,
                    job.label,
                    event.data
                );
            }
            "JOB_STATUS_CHANGE" if event.str("status") == Some("null") && job.outcome.is_none() => {
                job.outcome = Some(Err(format!(
                    "{}: job disappeared without a result",
                    job.label
                )));
            }
            _ => {}
        }
        if let (Some(bar), Some(Ok(()))) = (&job.bar, &job.outcome) {
            bar.set_position(bar.length().unwrap_or(0));
        }
    }
    for j in &jobs {
        if let Some(bar) = &j.bar {
            bar.finish();
        }
    }
    if cancel_sent.is_some() {
        return Err(BackupError::Interrupted);
    }
    if jobs.iter().all(|j| matches!(j.outcome, Some(Ok(())))) {
        tracing::info!("Backup for all [{}] devices finished.", jobs.len());
    }
    let failures: Vec<String> = jobs
        .into_iter()
        .filter_map(|j| j.outcome.and_then(|o| o.err()))
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(BackupError::Failed(failures.join("; ")))
    }
}

/// Updates the bars (and logs a progress line when `log`) from `query-block-jobs`.
fn poll(qmp: &mut Qmp, jobs: &mut [Job], log: bool) -> Result<()> {
    let reply = qmp.execute("query-block-jobs", json!({}))?;
    for info in reply.as_array().into_iter().flatten() {
        let Some(job) = jobs.iter().find(|j| info["device"] == j.id.as_str()) else {
            continue;
        };
        let (offset, len) = (
            info["offset"].as_u64().unwrap_or(0),
            info["len"].as_u64().unwrap_or(0),
        );
        if let Some(bar) = &job.bar {
            bar.set_length(len);
            bar.set_position(offset);
        }
        if log && job.bar.is_none() && len > 0 {
            tracing::info!(
                "[{}] Wrote Offset: {}% ({offset} of {len})",
                job.id,
                (offset as f64 * 100.0 / len as f64).round()
            );
        }
    }
    Ok(())
}
