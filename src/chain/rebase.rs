//! `qmprestore rebase`: link every INC of the chain to its predecessor in place (backing file
//! name and format in the header only, as `qemu-img rebase -u`), then point the `image`
//! symlink at the chosen restore point, so any QEMU can boot the backup directly.
//!
//! Each header change is one small write; files are changed oldest first and the symlink is
//! replaced atomically last, so an interrupted rebase leaves a chain that restores as before
//! and a re-run completes it.

use super::error::{ChainError, Result};
use super::links::{backing_of, set_backing};
use crate::qcow2::Format;
use crate::store::{open_restore_point, RestorePoint};
use std::path::{Path, PathBuf};

pub struct RebaseOptions {
    pub select: crate::store::ChainSelect,
    pub dry_run: bool,
    /// Replace an existing `image` symlink.
    pub force: bool,
}

/// One planned (or made) change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Backing {
        file: PathBuf,
        backing: String,
        format: Format,
    },
    Link {
        link: PathBuf,
        target: String,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Backing {
                file,
                backing,
                format,
            } => write!(
                f,
                "set backing file of {} to {backing} ({})",
                file.display(),
                format.name()
            ),
            Change::Link { link, target } => write!(f, "link {} -> {target}", link.display()),
        }
    }
}

/// Rebases the chain in `dir`; returns the changes (made, or planned with `dry_run`).
pub fn rebase(dir: &Path, opts: &RebaseOptions) -> Result<Vec<Change>> {
    crate::store::bucket::refuse_in_place(dir, "rebase")?;
    // Validates every file (and refuses raw INCs) before anything changes.
    let RestorePoint { chain, disk, .. } = open_restore_point(dir, &opts.select)?;
    let formats: Vec<Format> = disk.chain().map(|i| i.format()).rev().collect();
    let link = dir.join("image");
    let top = chain.files.last().expect("a chain has a FULL").name.clone();
    // A link to this restore point is what this run would make: an interrupted rebase that
    // got that far is completed by running it again, with no --force.
    let linked = std::fs::read_link(&link).is_ok_and(|t| t == Path::new(&top));
    if std::fs::symlink_metadata(&link).is_ok() && !opts.force && !linked {
        return Err(ChainError::Refused(format!(
            "{} exists; use --force to replace it",
            link.display()
        )));
    }
    let mut changes = Vec::new();
    for (i, pair) in chain.files.windows(2).enumerate() {
        let wanted = (pair[0].name.clone(), Some(formats[i].name().to_string()));
        if backing_of(&pair[1].path)? != Some(wanted) {
            changes.push(Change::Backing {
                file: pair[1].path.clone(),
                backing: pair[0].name.clone(),
                format: formats[i],
            });
        }
    }
    if !linked {
        changes.push(Change::Link {
            link: link.clone(),
            target: top,
        });
    }
    if opts.dry_run {
        return Ok(changes);
    }
    for c in &changes {
        match c {
            Change::Backing {
                file,
                backing,
                format,
            } => {
                set_backing(file, backing, *format)?;
            }
            Change::Link { link, target } => {
                let tmp = link.with_file_name(".image.tmp");
                let _ = std::fs::remove_file(&tmp);
                let io = |e| ChainError::Refused(format!("{}: {e}", link.display()));
                std::os::unix::fs::symlink(target, &tmp).map_err(io)?;
                std::fs::rename(&tmp, link).map_err(io)?;
            }
        }
    }
    Ok(changes)
}

/// The report of `qmprestore rebase`: a line per change.
pub fn describe(changes: &[Change], dry_run: bool) -> String {
    let would = if dry_run { "would " } else { "" };
    changes.iter().map(|c| format!("{would}{c}\n")).collect()
}
