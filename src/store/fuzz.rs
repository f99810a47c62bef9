//! The body of the `dir_names` fuzz target: backup directories are untrusted too (copied
//! around, renamed by hand, planted). Each input line becomes a file name in a scratch
//! directory, which is then read as a backup directory: scanned, for one disk, as a chain, and
//! cut at restore points named by other lines.

use crate::store::folder::BackupDir;

/// Creates the files named by `data`'s lines (at most 64) and reads the directory. Returns how
/// many files were created.
pub fn dir_names(data: &[u8]) -> usize {
    let dir = crate::qcow2::fuzz::scratch_dir()
        .join(format!("qmpbackup-fuzz-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir(&dir).is_err() {
        return 0;
    }
    let names: Vec<String> = String::from_utf8_lossy(data)
        .lines()
        .take(64)
        .map(|l| l.replace(['/', '\0'], "_"))
        .filter(|l| !l.is_empty() && l.len() < 200 && l != "." && l != "..")
        .collect();
    let mut created = 0;
    for n in &names {
        if std::fs::write(dir.join(n), b"").is_ok() {
            created += 1;
        }
    }
    if let Ok(bd) = BackupDir::scan(&dir, None) {
        let _ = bd.refuse_partials();
        if let Ok(chain) = bd.chain() {
            for n in names.iter().take(4) {
                let _ = chain.until(n, &dir);
            }
        }
    }
    for n in names.iter().take(4) {
        let _ = BackupDir::scan_disk(&dir, n);
        let _ = BackupDir::scan(&dir, Some(n));
    }
    let _ = std::fs::remove_dir_all(&dir);
    created
}

/// The body of the `manifest` fuzz target: manifests are read from backup folders and object
/// stores, so they are untrusted too. `data` up to its first NUL byte is a manifest (JSON), the
/// rest the backup file it describes; the manifest is parsed, its checksums decoded, and the
/// file compared with it. Returns how many extents differ (or `None` when it is no manifest).
pub fn manifest(data: &[u8]) -> Option<usize> {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (json, file) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let m: crate::store::manifest::Manifest = serde_json::from_slice(json).ok()?;
    let _ = m.sums.crcs();
    let checked = m.check(&file.to_vec()).ok()?;
    checked.ok().map(|found| found.len())
}
