//! The folder an output image goes into. `merge --targetfile restore/disk.qcow2` creates a
//! missing `restore/`, as the original's merge did, and so does `convert`; each new folder is
//! made durable (its parent fsynced), and a command that fails takes the folders it made
//! away again, so a failed restore leaves nothing behind.

use std::path::{Path, PathBuf};

/// Folders created for an output, outermost first. Call [`NewDirs::keep`] once the output is
/// complete; dropped without it, the folders are removed again (those still empty).
#[must_use]
pub struct NewDirs {
    made: Vec<PathBuf>,
}

impl NewDirs {
    /// Creates every missing folder above `file`.
    pub fn for_file(file: &Path) -> std::io::Result<NewDirs> {
        let mut missing = Vec::new();
        let mut dir = file.parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            if std::fs::symlink_metadata(d).is_ok() {
                break;
            }
            missing.push(d.to_path_buf());
            dir = d.parent();
        }
        let mut made = NewDirs { made: Vec::new() };
        for d in missing.into_iter().rev() {
            match std::fs::create_dir(&d) {
                Ok(()) => made.made.push(d.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
            crate::qcow2::storage::sync_parent(&d)?;
        }
        Ok(made)
    }

    /// The output is complete: the folders stay.
    pub fn keep(mut self) {
        self.made.clear();
    }
}

impl Drop for NewDirs {
    fn drop(&mut self) {
        for d in self.made.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}
