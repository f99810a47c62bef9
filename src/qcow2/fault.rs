//! The one write path of the format engine: crash injection for the crash-safety tests, and
//! watches that learn of a write to a file before it happens.
//!
//! Every write this crate makes to an image goes through [`pwrite`] or [`copy_range`]. When the environment
//! variable `QMPBACKUP_TEST_CRASH_AFTER_WRITES` holds a number N, the process aborts right
//! before its write number N+1 (counting from zero): no destructor, no flush, exactly like a
//! crash between two system calls. Tests run the real binary with it for many N and check that
//! the image is consistent afterwards. Without the variable this is one relaxed atomic
//! increment per write.
//!
//! A [`watch`] on a file is told each write's byte range before the write is made and may
//! refuse it: a restore command that changes a backup file in place journals which checksum
//! extents it touches before touching them (`store::journal`), wherever in the engine the
//! write comes from (data, L2 tables, refcounts, header). Without a watch this costs one more
//! relaxed atomic load per write.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

pub const ENV: &str = "QMPBACKUP_TEST_CRASH_AFTER_WRITES";

static WRITES: AtomicU64 = AtomicU64::new(0);

fn limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| std::env::var(ENV).ok().and_then(|v| v.parse().ok()))
}

fn before_write() {
    if let Some(n) = limit() {
        if WRITES.fetch_add(1, Ordering::Relaxed) >= n {
            std::process::abort();
        }
    }
}

/// What a watch is told before each write to its file: the byte offset and length.
pub type Hook = Box<dyn FnMut(u64, u64) -> io::Result<()> + Send>;

/// Whether any watch is set (the fast path skips the lookup).
static WATCHING: AtomicBool = AtomicBool::new(false);
/// The watched files, by device and inode (the writer opens the file on its own).
static WATCHES: Mutex<Vec<(u64, u64, Hook)>> = Mutex::new(Vec::new());

/// A watch on one file; dropping it ends the watch.
pub struct Watch {
    dev: u64,
    ino: u64,
}

/// Calls `hook` before every write this process makes to the file at `path` (by any name or
/// descriptor); an error from the hook fails that write before anything is written.
pub fn watch(path: &Path, hook: Hook) -> io::Result<Watch> {
    let m = std::fs::metadata(path)?;
    let (dev, ino) = (m.dev(), m.ino());
    let mut w = WATCHES.lock().unwrap_or_else(|p| p.into_inner());
    w.push((dev, ino, hook));
    WATCHING.store(true, Ordering::Release);
    Ok(Watch { dev, ino })
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut w = WATCHES.lock().unwrap_or_else(|p| p.into_inner());
        w.retain(|(d, i, _)| (*d, *i) != (self.dev, self.ino));
        WATCHING.store(!w.is_empty(), Ordering::Release);
    }
}

/// Tells the watches of `file`, if any, of a write of `len` bytes at `offset`.
fn notify(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if !WATCHING.load(Ordering::Acquire) {
        return Ok(());
    }
    let m = file.metadata()?;
    let mut w = WATCHES.lock().unwrap_or_else(|p| p.into_inner());
    for (_, _, hook) in w
        .iter_mut()
        .filter(|(d, i, _)| (*d, *i) == (m.dev(), m.ino()))
    {
        hook(offset, len)?;
    }
    Ok(())
}

/// Writes all of `buf` at `offset` (the one write path of the format engine).
pub fn pwrite(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    // The watch first: a crash injected here then falls between what it journals and the
    // write, the moment its journal exists for.
    notify(file, offset, buf.len() as u64)?;
    before_write();
    file.write_all_at(buf, offset)
}

/// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off` inside the kernel
/// (`copy_file_range`: no trip through user memory, shared extents where the file system can),
/// falling back to reads and writes where the kernel cannot. Counts as one write.
pub fn copy_range(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    notify(dst, dst_off, len)?;
    before_write();
    let (mut from, mut to, mut left) = (src_off as i64, dst_off as i64, len);
    while left > 0 {
        // SAFETY: both descriptors are open files we borrow; the offsets are ours.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut from,
                dst.as_raw_fd(),
                &mut to,
                left as usize,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => break,
                _ => return Err(e),
            }
        }
        if n == 0 {
            // Source shorter than asked: the rest reads as zeros.
            break;
        }
        left -= n as u64;
    }
    if left > 0 {
        let done = len - left;
        let mut buf = vec![0u8; left.min(8 << 20) as usize];
        let mut pos = 0;
        while pos < left {
            let n = (left - pos).min(buf.len() as u64) as usize;
            let got =
                crate::qcow2::storage::Storage::read_at(src, &mut buf[..n], src_off + done + pos)?;
            buf[got..n].fill(0);
            dst.write_all_at(&buf[..n], dst_off + done + pos)?;
            pos += n as u64;
        }
    }
    Ok(())
}
