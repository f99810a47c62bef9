//! `qmprestore list`: the restore points of a backup directory.

use super::error::{ChainError, Result};
use crate::store::folder::backup_dirs_below;
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
    if bd.files.is_empty() && bd.partials.is_empty() {
        return Err(nothing_to_list(dir, filter)?);
    }
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

/// Why `dir` lists nothing, and what to pass instead: a backup target holds one folder per
/// disk, and it is one of those that holds restore points.
fn nothing_to_list(dir: &Path, filter: Option<&str>) -> Result<ChainError> {
    let shown = dir.display();
    let what = match filter {
        Some(f) => format!("{shown} holds no backup files whose name contains {f:?}"),
        None => format!("{shown} holds no backup files (FULL-…, INC-…, COPY-…)"),
    };
    let below: Vec<String> = backup_dirs_below(dir, 2)?
        .into_iter()
        .filter(|d| d != dir)
        .map(|d| d.display().to_string())
        .collect();
    Ok(ChainError::Refused(match below.as_slice() {
        [] => what,
        [one] => format!("{what}; it holds the disk folder {one}: pass that as --dir"),
        many => format!(
            "{what}; it holds {} disk folders: pass one of them as --dir ({}); verify and serve also take the whole target",
            many.len(),
            many.join(", ")
        ),
    }))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(dir: &Path, filter: Option<&str>) -> String {
        match list(dir, filter) {
            Err(ChainError::Refused(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_folder_without_backups_says_which_disk_folders_to_pass() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path();
        for disk in ["a.qcow2", "b.qcow2"] {
            std::fs::create_dir(target.join(disk)).unwrap();
            std::fs::write(
                target.join(disk).join(format!("FULL-1700000000-{disk}")),
                b"",
            )
            .unwrap();
        }
        std::fs::create_dir(target.join("empty")).unwrap();
        let why = refusal(target, None);
        assert!(why.contains("holds no backup files"), "{why}");
        assert!(why.contains("2 disk folders"), "{why}");
        assert!(why.contains("a.qcow2") && why.contains("b.qcow2"), "{why}");
        let why = refusal(&target.join("empty"), None);
        assert!(
            why.ends_with("holds no backup files (FULL-…, INC-…, COPY-…)"),
            "{why}"
        );
        let why = refusal(&target.join("a.qcow2"), Some("zzz"));
        assert!(why.contains("whose name contains \"zzz\""), "{why}");
        assert_eq!(list(&target.join("a.qcow2"), None).unwrap().len(), 1);
    }
}
