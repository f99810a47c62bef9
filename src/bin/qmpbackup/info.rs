//! `qmpbackup info`: the VM's block devices or their dirty bitmaps, logged as the original
//! logs them, or as a table or one JSON document on standard output.

use anyhow::Result;
use clap::ValueEnum;
use qmpbackup::backup::admin;
use qmpbackup::backup::device::Device;
use qmpbackup::qmp::Qmp;
use std::io::Write;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_enum)]
    show: Show,
    /// One JSON document on standard output (the log goes to standard error).
    #[arg(long, conflicts_with = "human")]
    json: bool,
    /// A readable table on standard output (the log goes to standard error).
    #[arg(long)]
    human: bool,
}

impl Args {
    /// Whether the report takes standard output (the log then goes to standard error).
    pub fn prints_report(&self) -> bool {
        self.json || self.human
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Show {
    Blockdev,
    Bitmaps,
}

pub fn run(qmp: &mut Qmp, a: &Args) -> Result<()> {
    let devices = admin::devices(qmp)?;
    if a.json {
        print_json(a.show, devices)
    } else if a.human {
        print_human(a.show, devices)
    } else {
        log_original(a.show, &devices);
        Ok(())
    }
}

/// `info` as the original logs it: the device records, or each device's bitmap list, as
/// Python-formatted JSON.
fn log_original(show: Show, devices: &[(Device, serde_json::Value)]) {
    match show {
        Show::Blockdev => {
            tracing::info!(target: crate::LOG, "Attached block devices:");
            for (d, entry) in devices {
                let record = admin::original_record(d, entry);
                tracing::info!(target: crate::LOG, "{}", admin::python_json(&record));
            }
        }
        Show::Bitmaps => {
            for (d, entry) in devices {
                if d.bitmaps.is_empty() {
                    tracing::info!(target: crate::LOG, "No bitmaps found for device: \"{}:{}\"", d.node, d.filename);
                    continue;
                }
                tracing::info!(target: crate::LOG, "{} [{}]:", d.node, d.filename);
                let list = &entry["inserted"]["dirty-bitmaps"];
                tracing::info!(target: crate::LOG, "{}", admin::python_json(list));
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
