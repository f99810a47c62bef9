//! Pruning a folder in an object store, where objects cannot change in place: the folder is
//! staged into a local copy and pruned there; these put the result back (manifests held while
//! files go up, deletions last).

use super::*;

/// Copies the backup folders below `from` (an object-store prefix) into the local folder
/// `to`: backup files, manifests, chain ids and configs, not other dot-folders. A prune of an
/// object store runs on such a copy (objects cannot change in place); see [`forget_in`].
pub fn stage(from: &Path, to: &Path) -> Result<()> {
    let place = crate::store::place::at(from).map_err(|e| ErrorKind::Io(e).at(from))?;
    let mut todo = vec![String::new()];
    let mut buf = vec![0u8; 8 << 20];
    while let Some(sub) = todo.pop() {
        let here = to.join(&sub);
        std::fs::create_dir_all(&here).map_err(|e| ErrorKind::Io(e).at(&here))?;
        for e in place.list(&sub).map_err(|e| ErrorKind::Io(e).at(from))? {
            let name = if sub.is_empty() {
                e.name.clone()
            } else {
                format!("{sub}/{}", e.name)
            };
            match e.kind {
                Kind::Folder
                    if !e.name.starts_with('.') || e.name == crate::store::manifest::FOLDER =>
                {
                    todo.push(name)
                }
                Kind::File if !e.name.starts_with('.') => {
                    let src = place
                        .open(&name)
                        .map_err(|err| ErrorKind::Io(err).at(place.locate(&name)))?;
                    let dst = to.join(&name);
                    let at = |err| ErrorKind::Io(err).at(&dst);
                    let f = std::fs::File::create(&dst).map_err(at)?;
                    let size = src.size().map_err(at)?;
                    let mut pos = 0;
                    while pos < size {
                        let n = (size - pos).min(buf.len() as u64) as usize;
                        crate::qcow2::storage::read_exact(&*src, &mut buf[..n], pos, "backup file")
                            .map_err(|err| ErrorKind::Io(err).at(place.locate(&name)))?;
                        std::os::unix::fs::FileExt::write_all_at(&f, &buf[..n], pos).map_err(at)?;
                        pos += n as u64;
                    }
                    // Ties between equal epochs are broken by modification time, as there.
                    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.mtime))
                        .map_err(at)?;
                    f.sync_all().map_err(at)?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Deletes from `dir` (a copy of the pruned folder, such as its object-store prefix after the
/// pruned files were uploaded) what `report`'s prune deleted: each file's manifest first (an
/// object store takes a manifest without its file for a file pushed away), then the file;
/// whole month folders likewise, manifests first. Missing objects are fine: a re-run after an
/// interruption deletes the rest.
pub fn forget_in(dir: &Path, report: &PruneReport) -> Result<()> {
    let place = crate::store::place::at(dir).map_err(|e| ErrorKind::Io(e).at(dir))?;
    let gone = |name: &str| -> Result<()> {
        match place.delete(name) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ErrorKind::Io(e).at(place.locate(name)).into()),
        }
    };
    let manifest_of = |rel: &str| match rel.rsplit_once('/') {
        Some((sub, file)) => format!("{sub}/{}", crate::store::manifest::name_for(file)),
        None => crate::store::manifest::name_for(rel),
    };
    for f in &report.deleted {
        gone(&manifest_of(f))?;
        gone(f)?;
    }
    for m in &report.removed_folders {
        let mut files = Vec::new();
        let mut todo = vec![m.clone()];
        while let Some(sub) = todo.pop() {
            for e in place.list(&sub).map_err(|e| ErrorKind::Io(e).at(dir))? {
                let name = format!("{sub}/{}", e.name);
                match e.kind {
                    Kind::Folder => todo.push(name),
                    _ => files.push(name),
                }
            }
        }
        // Manifests first, then the backup files newest first (what is left of a chain is its
        // beginning), then the rest.
        let is_manifest = |n: &String| n.contains(&format!("/{}/", crate::store::manifest::FOLDER));
        let epoch = |n: &String| {
            let base = n.rsplit('/').next().unwrap_or(n);
            parse_name(base).map(|(_, e, _)| e)
        };
        files.sort_by_key(|n| {
            (
                !is_manifest(n),
                epoch(n).is_none(),
                std::cmp::Reverse(epoch(n)),
            )
        });
        for f in &files {
            gone(f)?;
        }
    }
    Ok(())
}

/// Where a prune of an object store keeps the manifests it is about to upload (a dot-folder no
/// scan takes for backups): a file goes up before its manifest, so a run killed in between
/// leaves a file without one, and the next run finds it here.
const PENDING: &str = ".prune-pending";

/// The suffix of a held manifest's version before the change.
const OLD: &str = ".old";

fn pending_key(rel: &str) -> String {
    format!("{PENDING}/{}", rel.replace('/', "#"))
}

/// The manifests below the local folder `dir` (path relative to it, bytes).
pub fn manifests(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if d.file_name() == Some(std::ffi::OsStr::new(crate::store::manifest::FOLDER)) {
                if let (Ok(bytes), Ok(rel)) = (std::fs::read(&p), p.strip_prefix(dir)) {
                    out.push((rel.to_string_lossy().into_owned(), bytes));
                }
            }
        }
    }
    out
}

/// Before the pruned copy `local` of store folder `url` is uploaded: every manifest that is
/// new or changed (against `before`, the copy's manifests as staged) is kept in the store's
/// pending folder, then the old versions of the changed ones are deleted (no moment may show
/// a replaced file with its old manifest: verify would call that damage).
pub fn hold_manifests(url: &Path, local: &Path, before: &[(String, Vec<u8>)]) -> Result<()> {
    let place = crate::store::place::at(url).map_err(|e| ErrorKind::Io(e).at(url))?;
    let at = |name: &str| {
        let p = place.locate(name);
        move |e| ErrorKind::Io(e).at(&p)
    };
    let old: std::collections::HashMap<&str, &Vec<u8>> =
        before.iter().map(|(r, b)| (r.as_str(), b)).collect();
    let changed: Vec<(String, Vec<u8>)> = manifests(local)
        .into_iter()
        .filter(|(rel, bytes)| old.get(rel.as_str()) != Some(&bytes))
        .collect();
    for (rel, bytes) in &changed {
        let key = pending_key(rel);
        place.write(&key, bytes).map_err(at(&key))?;
        // The old one too: a run killed before the new file is up finds the old file.
        if let Some(old) = old.get(rel.as_str()) {
            let key = format!("{key}{OLD}");
            place.write(&key, old).map_err(at(&key))?;
        }
    }
    for (rel, _) in changed.iter().filter(|(r, _)| old.contains_key(r.as_str())) {
        match place.delete(rel) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(at(rel)(e))?,
            _ => {}
        }
    }
    Ok(())
}

/// After an interrupted prune of store folder `url`, staged into `local`: a backup file there
/// without a manifest gets the one the interrupted run held for it (the new or the old
/// version), if the file is exactly what that manifest describes.
pub fn take_held_manifests(url: &Path, local: &Path) -> Result<()> {
    let place = crate::store::place::at(url).map_err(|e| ErrorKind::Io(e).at(url))?;
    for e in place.list(PENDING).map_err(|e| ErrorKind::Io(e).at(url))? {
        let rel = e.name.trim_end_matches(OLD).replace('#', "/");
        let target = local.join(&rel);
        let (Some(dir), Some(name)) = (
            Path::new(&rel).parent().and_then(Path::parent),
            Path::new(&rel)
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json")),
        ) else {
            continue;
        };
        let file = local.join(dir).join(name);
        if target.exists() || !file.exists() || rel.contains("..") {
            continue;
        }
        let folder = Folder::new(&local.join(dir));
        let key = format!("{PENDING}/{}", e.name);
        let Ok(data) = place.open(&key) else { continue };
        let size = data.size().unwrap_or(u64::MAX);
        if size > 128 << 20 {
            continue;
        }
        let mut bytes = vec![0u8; size as usize];
        if crate::qcow2::storage::read_exact(&*data, &mut bytes, 0, "manifest").is_err() {
            continue;
        }
        let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else {
            continue;
        };
        let Ok(f) = std::fs::File::open(&file) else {
            continue;
        };
        if m.file == name && matches!(m.check(&f), Ok(Ok(found)) if found.is_empty()) {
            m.write(&folder).map_err(|e| ErrorKind::Io(e).at(&target))?;
        }
    }
    Ok(())
}

/// After the upload: the manifests held for it (and for interrupted runs before) go.
pub fn release_manifests(url: &Path) -> Result<()> {
    let place = crate::store::place::at(url).map_err(|e| ErrorKind::Io(e).at(url))?;
    let listed = place.list(PENDING).map_err(|e| ErrorKind::Io(e).at(url))?;
    for key in listed.iter().map(|e| format!("{PENDING}/{}", e.name)) {
        match place.delete(&key) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ErrorKind::Io(e).at(place.locate(&key)).into())
            }
            _ => {}
        }
    }
    Ok(())
}
