//! `qmprestore list`: the restore points of a backup directory.

use super::error::Result;
use crate::store::time::local_time;
use crate::store::{BackupDir, Level};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct Point {
    pub file: String,
    pub level: Level,
    /// Seconds since the epoch (from the name, else the file's mtime).
    pub epoch: u64,
    pub time: String,
    /// Bytes on disk.
    pub size: u64,
    /// `restore-point` (part of the chain restored), `older-full` (a FULL before the one the
    /// chain starts with), `copy`, or `partial` (an interrupted backup).
    pub status: &'static str,
}

pub fn list(dir: &Path, filter: Option<&str>) -> Result<Vec<Point>> {
    let bd = BackupDir::scan(dir, filter)?;
    let chain = bd.chain().ok();
    let in_chain = |name: &str| {
        chain
            .as_ref()
            .is_some_and(|c| c.files.iter().any(|f| f.name == name))
    };
    let mut out: Vec<Point> = bd
        .files
        .iter()
        .map(|f| Point {
            file: f.name.clone(),
            level: f.level,
            epoch: f.epoch,
            time: local_time(f.epoch as i64),
            size: f.size,
            status: match f.level {
                Level::Copy => "copy",
                _ if in_chain(&f.name) => "restore-point",
                Level::Full => "older-full",
                Level::Inc => "older-inc",
            },
        })
        .collect();
    for p in &bd.partials {
        out.push(Point {
            file: p
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            level: if p.path.to_string_lossy().contains("INC-") {
                Level::Inc
            } else {
                Level::Full
            },
            epoch: 0,
            time: String::new(),
            size: p.size,
            status: "partial",
        });
    }
    Ok(out)
}

/// `qmprestore list`'s table.
pub fn table(points: &[Point]) -> String {
    let mut s = format!(
        "{:<40} {:<5} {:>19} {:>10}  status\n",
        "file", "level", "time", "size"
    );
    for p in points {
        s += &format!(
            "{:<40} {:<5} {:>19} {:>10}  {}\n",
            p.file,
            p.level.name(),
            p.time,
            super::units::size(p.size),
            p.status
        );
    }
    s
}
