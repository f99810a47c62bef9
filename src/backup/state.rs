//! The run record: a lock that keeps two runs out of one target directory, and a note of what
//! the running backup has put into QEMU and onto disk.
//!
//! A run killed with SIGKILL cannot clean up after itself: its filter and target nodes stay in
//! QEMU (the guest's disk still routed through a copy-before-write filter), its `.partial`
//! files stay in the chain. The next run finds the record (the lock is free again because
//! the kernel released it with the process), removes exactly what the record lists, and knows
//! the partial files were ours — so it knows the chain's bitmap was never touched (we change
//! it only after a backup is complete) and the chain can continue. Partial files the record
//! does not list come from another tool (the original clears its bitmap when a job starts), so
//! after one of those only a new full backup is safe.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// What one disk of a run put into QEMU and onto disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiskRecord {
    pub device: String,
    pub node: String,
    pub qdev: Option<String>,
    pub job: String,
    pub target_node: String,
    pub fleece_node: String,
    pub cbw_node: String,
    pub snap_node: String,
    /// The bitmap started at the snapshot point (non-persistent), if any.
    pub next_bitmap: Option<String>,
    pub partial: PathBuf,
    pub fleece: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunRecord {
    pub pid: u32,
    pub started: u64,
    pub disks: Vec<DiskRecord>,
}

/// The held lock of a target directory.
/// The file stays (empty after a clean run): removing it could let two runs lock different
/// files of the same name.
pub struct RunLock {
    file: File,
    /// What a killed earlier run left, if anything.
    pub stale: Option<RunRecord>,
}

impl RunLock {
    /// Takes the lock of `root`, failing at once if another run holds it.
    pub fn acquire(root: &Path) -> io::Result<RunLock> {
        let path = root.join(".qmpbackup-run");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("another backup is running into {} ({e})", root.display()),
            ));
        }
        let text = std::fs::read(&path)?;
        let stale = serde_json::from_slice::<RunRecord>(&text).ok();
        Ok(RunLock { file, stale })
    }

    /// Records what the run is about to create (durably, before creating it).
    pub fn record(&mut self, record: &RunRecord) -> io::Result<()> {
        use std::io::{Seek, Write};
        let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        self.file.set_len(0)?;
        self.file.seek(io::SeekFrom::Start(0))?;
        self.file.write_all(&bytes)?;
        self.file.sync_all()
    }

    /// The run is over and everything it recorded is gone.
    pub fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.stale = None;
        Ok(())
    }
}
