//! Entry point for the `nbd_session` fuzz target (and its regression test): arbitrary bytes
//! are a client's side of a whole connection — greeting, options, requests, garbage — sent to
//! the real negotiation and transmission code over a socket pair. The export is a small qcow2
//! image with data, zero clusters and unallocated space, so reads and block status take every
//! path. Any panic, hang or unbounded allocation is a finding.

use super::export::Exports;
use super::wire::Socket;
use super::Shared;
use crate::qcow2::create::CreateOptions;
use crate::qcow2::write::Writer;
use crate::qcow2::Disk;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// The image every session serves: 4 MiB, data in its first and third MiB (a pattern), a
/// zero cluster range in the second, the rest unallocated.
fn image() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("qmpbackup-nbd-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("export.qcow2");
    let _ = std::fs::remove_file(&path);
    let opts = CreateOptions {
        size: 4 << 20,
        ..Default::default()
    };
    let build = || -> crate::qcow2::Result<()> {
        let mut w = Writer::create(&path, &opts)?;
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        w.write_at(&data, 0)?;
        w.write_zeroes(1 << 20, 1 << 20)?;
        w.write_at(&data, 2 << 20)?;
        w.finish()
    };
    build().map_err(std::io::Error::other)?;
    Ok(path)
}

fn shared() -> Option<&'static Arc<Shared>> {
    static SHARED: OnceLock<Option<Arc<Shared>>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            // A fuzzer's process is not a Rust binary's: a client that leaves must not kill it.
            // SAFETY: ignoring SIGPIPE only turns a write to a closed socket into an error.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
            let disk = Disk::open(&image().ok()?).ok()?;
            let exports = Exports::single(disk, "fuzz export".into(), Some("named"));
            Shared::new(exports, None).ok().map(Arc::new)
        })
        .as_ref()
}

/// Plays `data` as a client's whole side of a connection; returns how many bytes the server
/// answered with.
pub fn session(data: &[u8]) -> usize {
    let Some(shared) = shared() else {
        return 0;
    };
    let Ok((ours, theirs)) = UnixStream::pair() else {
        return 0;
    };
    let Ok(mut replies) = theirs.try_clone() else {
        return 0;
    };
    let data = data.to_vec();
    // The client writes everything and closes its side; the server must then finish.
    let client = std::thread::spawn(move || {
        let mut theirs = theirs;
        let _ = theirs.write_all(&data);
        let _ = theirs.shutdown(std::net::Shutdown::Write);
    });
    let server = {
        let shared = shared.clone();
        std::thread::spawn(move || super::connection(&shared, 0, Socket::Unix(ours)))
    };
    let mut answered = 0;
    let mut buf = [0u8; 1 << 16];
    loop {
        match replies.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answered += n,
            // libFuzzer's timeout alarm interrupts reads: going on is all it asks.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    // Whatever ended the reading, the server must not wait on replies no one takes.
    drop(replies);
    let _ = client.join();
    let _ = server.join();
    answered
}
