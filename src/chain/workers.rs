//! How many reads a command keeps in flight.
//!
//! Local reads are served by the page cache or a disk queue: one rayon worker per core keeps
//! them busy. Reads from an object store are network round trips that cost the store's
//! latency each, so a disk with remote layers is processed by more workers than cores; the
//! count is bounded because every worker holds chunk buffers (memory stays well under 128 MiB).

/// Workers for disks with layers in an object store.
pub const REMOTE_WORKERS: usize = 8;

/// Runs `f` on enough rayon workers for a disk whose reads are `remote` or not.
pub fn run<T: Send>(remote: bool, f: impl FnOnce() -> T + Send) -> T {
    if !remote || rayon::current_num_threads() >= REMOTE_WORKERS {
        return f();
    }
    match rayon::ThreadPoolBuilder::new()
        .num_threads(REMOTE_WORKERS)
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}
