//! Page-cache advice for long copies between files.
//!
//! A fold copies hundreds of MiB out of INCs that are deleted right after, into a FULL that
//! must be flushed before they are. Left to itself the kernel keeps every copied page of both
//! in memory and writes nothing until the flush: the copy takes fresh memory for each page it
//! writes (on a virtual machine whose free memory the host has reclaimed, a host page fault
//! per page: 8× slower appends measured here), and then the flush waits for all of it at once.
//! Two hints fix both: forget the source pages once copied, so the destination's pages are the
//! ones just released, and start writing the destination back while the copy goes on, so the
//! disk works in parallel with it. Both are advice: an error changes nothing, and durability
//! still comes only from the writer's flushes.

use std::fs::File;
use std::os::unix::io::AsRawFd;

/// Tells the kernel that the cached pages of `len` bytes of `file` from `offset` will not be
/// read again (`POSIX_FADV_DONTNEED`; clean pages are freed at once).
pub fn forget_cached(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: an open descriptor we borrow; advice does not touch memory of ours.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED);
    }
}

/// Starts writing back every dirty page of `file` that is not being written already, without
/// waiting for any (`sync_file_range(SYNC_FILE_RANGE_WRITE)` over the whole file).
pub fn start_writeback(file: &File) {
    // SAFETY: an open descriptor we borrow; offset 0 and length 0 mean the whole file.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}
