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

/// Writes all of `buf` at `offset` (the one write path of the format engine).
pub fn pwrite(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    if let Some(n) = limit() {
        if WRITES.fetch_add(1, Ordering::Relaxed) >= n {
            std::process::abort();
        }
    }
    file.write_all_at(buf, offset)
}
