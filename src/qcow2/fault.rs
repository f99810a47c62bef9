//! Crash injection for the crash-safety tests.
//!
//! Every write this crate makes to an image goes through [`pwrite`]. When the environment
//! variable `QMPBACKUP_TEST_CRASH_AFTER_WRITES` holds a number N, the process aborts right
//! before its write number N+1 (counting from zero): no destructor, no flush, exactly like a
//! crash between two system calls. Tests run the real binary with it for many N and check that
//! the image is consistent afterwards. Without the variable this is one relaxed atomic
//! increment per write.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

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

/// Writes all of `buf` at `offset` (the one write path of the format engine).
pub fn pwrite(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    before_write();
    file.write_all_at(buf, offset)
}

/// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off` inside the kernel
/// (`copy_file_range`: no trip through user memory, shared extents where the file system can),
/// falling back to reads and writes where the kernel cannot. Counts as one write.
pub fn copy_range(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
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
