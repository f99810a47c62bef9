//! `--push s3://BUCKET/PREFIX`: a backup target folder uploaded to an object store in the same
//! layout, so `qmprestore … --dir s3://BUCKET/PREFIX/<disk>` restores from there.
//!
//! What to upload is decided from a listing of the prefix, never from local state: a file is
//! skipped when an object of the same size carries the same CRC-32 (recorded as metadata by
//! the upload that made it), and uploaded otherwise. So a push is idempotent, and one that was
//! interrupted (even by SIGKILL: an unfinished upload never shows under its key) is completed
//! by the next run; a large file's unfinished multipart upload is recorded beside it (a dot
//! file, `.<name>.upload`), so that run sends only the parts the store lacks. Backup files go
//! up before their manifests, so an object with a manifest beside it is complete. A backup file's parts are checked against its manifest's CRCs before
//! the upload completes: a file damaged on local disk is refused, not archived.
//!
//! `--push-only` then removes the local backup files that are verified in the store, keeping
//! their manifests: the next incremental learns its predecessor (name, size, format) from
//! them, and local restores say where the files went.

use super::error::{BackupError, Result};
use crate::s3::upload::{file_crc, upload, Source};
use crate::s3::{S3Error, S3Url};
use crate::store::manifest::{self, Manifest};
use crate::store::name::{parse_name, strip_partial};
use crate::store::place::Folder;
use indicatif::ProgressBar;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// What a push did.
#[derive(Debug, Default)]
pub struct Pushed {
    /// Files uploaded (paths relative to the target folder).
    pub uploaded: Vec<String>,
    /// Files the store already held.
    pub present: Vec<String>,
    /// Local backup files removed (`--push-only`).
    pub removed: Vec<PathBuf>,
}

/// One local file to push.
struct Local {
    /// Path relative to the target folder, with `/`.
    rel: String,
    path: PathBuf,
    size: u64,
    /// The manifest of a backup file, when it describes the file as it is.
    manifest: Option<Manifest>,
}

/// Whether a folder entry is pushed: backups, manifests, `uuid`, `<disk>.config` are; partial
/// files, fleece images, quarantined partials, run records and other dot files are not.
fn pushed_name(name: &str, is_dir: bool) -> bool {
    if is_dir {
        return !name.starts_with('.') || name == manifest::FOLDER;
    }
    !name.starts_with('.') && strip_partial(name).is_none() && !name.contains(".fleece.")
}

/// The regular files below `dir` that a push uploads, data files first, manifests last.
fn local_files(dir: &Path) -> Result<Vec<Local>> {
    let mut out = Vec::new();
    let mut todo = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, rel)) = todo.pop() {
        for entry in std::fs::read_dir(&d).map_err(BackupError::io(&d))? {
            let entry = entry.map_err(BackupError::io(&d))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ft = entry.file_type().map_err(BackupError::io(entry.path()))?;
            let child = format!("{rel}{name}");
            if ft.is_dir() && pushed_name(&name, true) {
                todo.push((entry.path(), format!("{child}/")));
            } else if ft.is_file() && pushed_name(&name, false) {
                let path = entry.path();
                let size = entry.metadata().map_err(BackupError::io(&path))?.len();
                let manifest = parse_name(&name)
                    .and_then(|_| Manifest::read(&Folder::new(&d), &name).ok())
                    .filter(|m| m.sums.file_size == size && m.sums.crcs().is_ok());
                out.push(Local {
                    rel: child,
                    path,
                    size,
                    manifest,
                });
            }
        }
    }
    let is_manifest = |l: &Local| l.rel.contains(&format!("{}/", manifest::FOLDER));
    out.sort_by(|a, b| (is_manifest(a), &a.rel).cmp(&(is_manifest(b), &b.rel)));
    Ok(out)
}

/// The CRC-32 of a whole file from its manifest's extent CRCs, without reading it.
fn combined(manifest: &Manifest) -> Option<u32> {
    let sums = &manifest.sums;
    let mut whole = crc32fast::Hasher::new();
    for (i, crc) in sums.crcs().ok()?.into_iter().enumerate() {
        let (start, end) = sums.extent(i);
        whole.combine(&crc32fast::Hasher::new_with_initial_len(crc, end - start));
    }
    Some(whole.finalize())
}

/// The CRCs of consecutive `piece`-byte pieces of a `size`-byte file, combined into the CRCs of
/// `unit`-byte units (`piece` divides `unit`).
fn combine_into(crcs: &[u32], piece: u64, size: u64, unit: u64) -> Vec<u32> {
    let mut units: Vec<crc32fast::Hasher> = Vec::new();
    for (i, &crc) in crcs.iter().enumerate() {
        let start = i as u64 * piece;
        let len = piece.min(size.saturating_sub(start));
        let u = (start / unit) as usize;
        if units.len() <= u {
            units.resize_with(u + 1, crc32fast::Hasher::new);
        }
        units[u].combine(&crc32fast::Hasher::new_with_initial_len(crc, len));
    }
    units.into_iter().map(|h| h.finalize()).collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Compares the CRCs of uploaded parts with the manifest's extents, both combined into the
/// smallest ranges whole parts and whole extents make up.
fn check_parts(m: &Manifest, part: u64, crcs: &[u32]) -> std::result::Result<(), String> {
    let sums = &m.sums;
    let extents = sums.crcs()?;
    let unit = part / gcd(part, sums.extent_size) * sums.extent_size;
    let read = combine_into(crcs, part, sums.file_size, unit);
    let recorded = combine_into(&extents, sums.extent_size, sums.file_size, unit);
    if read.len() != recorded.len() {
        return Err(format!(
            "{} parts for a file of {} bytes: not the file the manifest describes",
            crcs.len(),
            sums.file_size
        ));
    }
    for (i, (got, want)) in read.iter().zip(&recorded).enumerate() {
        if got != want {
            let start = i as u64 * unit;
            let end = (start + unit).min(sums.file_size);
            return Err(format!(
                "bytes {start}..{end} read crc32 {got:08x}, the backup's manifest recorded {want:08x}: the local file is damaged; not uploaded"
            ));
        }
    }
    Ok(())
}

/// Uploads what `target` holds and `url` lacks; with `only`, removes the uploaded backup
/// files here afterwards. `bar` is set to the bytes of the folder and advanced as they are
/// found in the store or uploaded.
pub fn push(target: &Path, url: &str, only: bool, bar: &ProgressBar) -> Result<Pushed> {
    let url = S3Url::parse(url)?;
    let client = crate::store::bucket::client(&url.bucket)?;
    let prefix = url.folder_prefix();
    let listing = client.list(&prefix, false)?;
    let remote: HashMap<&str, u64> = listing
        .objects
        .iter()
        .filter_map(|o| Some((o.key.strip_prefix(&prefix)?, o.size)))
        .collect();
    let mut report = Pushed::default();
    let mut verified = Vec::new();
    let files = local_files(target)?;
    bar.set_length(files.iter().map(|l| l.size).sum());
    for local in files {
        bar.set_message(format!("push {}", local.rel));
        let key = format!("{prefix}{}", local.rel);
        let file = File::open(&local.path).map_err(BackupError::io(&local.path))?;
        let crc = match local.manifest.as_ref().and_then(combined) {
            Some(c) => c,
            None => file_crc(&file, local.size).map_err(BackupError::io(&local.path))?,
        };
        let want = format!("{crc:08x}");
        let held = remote.get(local.rel.as_str()) == Some(&local.size)
            && client.describe(&key)?.and_then(|d| d.crc32).as_deref() == Some(&want);
        if held {
            bar.inc(local.size);
            report.present.push(local.rel.clone());
        } else {
            let check = |part: u64, crcs: &[u32]| match &local.manifest {
                Some(m) => check_parts(m, part, crcs),
                None => {
                    let mut h = crc32fast::Hasher::new();
                    for (i, c) in crcs.iter().enumerate() {
                        let len = part.min(local.size - i as u64 * part);
                        h.combine(&crc32fast::Hasher::new_with_initial_len(*c, len));
                    }
                    (h.finalize() == crc)
                        .then_some(())
                        .ok_or_else(|| "the file changed while it was uploaded".to_string())
                }
            };
            let journal = local.path.with_file_name(format!(
                ".{}.upload",
                local.path.file_name().unwrap_or_default().to_string_lossy()
            ));
            let source = Source {
                file: &file,
                size: local.size,
                crc,
            };
            upload(&client, &key, source, &check, &|n| bar.inc(n), &journal)?;
            // What the store says it holds now, not what we sent.
            let after = client.describe(&key)?;
            let ok = after
                .as_ref()
                .is_some_and(|d| d.head.size == local.size && d.crc32.as_deref() == Some(&want));
            if !ok {
                return Err(S3Error::Reply(
                    client.url(&key),
                    format!(
                        "after the upload the store does not hold {} bytes with crc32 {want}",
                        local.size
                    ),
                )
                .into());
            }
            tracing::info!("Uploaded {} to {}", local.path.display(), client.url(&key));
            report.uploaded.push(local.rel.clone());
        }
        if local.manifest.is_some() {
            verified.push(local.path.clone());
        }
    }
    if only {
        for path in verified {
            std::fs::remove_file(&path).map_err(BackupError::io(&path))?;
            crate::qcow2::storage::sync_parent(&path).map_err(BackupError::io(&path))?;
            tracing::info!("Removed {} (kept in {url})", path.display());
            report.removed.push(path);
        }
    }
    Ok(report)
}
