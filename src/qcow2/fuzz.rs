//! The body of the `open_read` fuzz target, shared with the test that replays its findings
//! (`tests/fuzz_regressions.rs`), so both exercise exactly the same code.

use super::disk::Disk;

/// Bytes of data one input may make us read: enough to cover every structure of a small
/// image, small enough to keep thousands of executions per second.
const READ_BUDGET: u64 = 8 << 20;

/// Opens `data` as an image and reads everything it maps. Returns whether it opened.
pub fn open_read(data: &[u8]) -> bool {
    let Ok(disk) = Disk::from_bytes("fuzz-input", data.to_vec()) else {
        return false;
    };
    let _ = disk.read_stored(READ_BUDGET);
    let mut extents = 0u32;
    let _ = disk.for_each_extent(0, disk.size(), |_| {
        extents += 1;
        if extents > 100_000 {
            return Err(super::ErrorKind::Corrupt("enough".into()).at("fuzz-input"));
        }
        Ok(())
    });
    if let Some(q) = disk.qcow2() {
        for s in q
            .snapshots()
            .iter()
            .map(|s| s.id.clone())
            .collect::<Vec<_>>()
        {
            if let Ok(d) = Disk::from_bytes("fuzz-input", data.to_vec()) {
                let _ = snapshot_view(d, &s);
            }
        }
    }
    true
}

fn snapshot_view(mut d: Disk, id: &str) -> super::Result<u64> {
    d.select_snapshot(id)?;
    d.read_stored(READ_BUDGET)
}

/// Where fuzz targets put their scratch files: `/dev/shm` where there is one (millions of
/// executions should not wear a disk), else the temporary directory.
pub fn scratch_dir() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// The body of the `check_image` fuzz target: `data` written to a scratch file (in `/dev/shm`
/// where there is one), checked as `qmprestore check` does, the owners of some of its bytes
/// found as `verify` finds those of damaged bytes, and, when it is corrupt, repaired
/// as `check -r all` does (a rebuilt refcount structure, a rewritten snapshot table) and
/// checked again. Returns whether it was checked.
pub fn check_bytes(data: &[u8]) -> bool {
    use super::check::{check, repair, Repair};
    let path = scratch_dir().join(format!("qmpbackup-fuzz-check-{}.img", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return false;
    }
    let report = check(&path);
    // What verify asks of a damaged file: the owners of its bytes, in a few probed ranges.
    let len = data.len() as u64;
    let _ = super::check::owners(&path, &[(0, 512), (len / 3, len / 2), (len - len / 4, len)]);
    if report.as_ref().is_ok_and(|r| r.exit_code() != 0) && repair(&path, Repair::All).is_ok() {
        let _ = check(&path);
    }
    let _ = std::fs::remove_file(&path);
    report.is_ok()
}

/// The body of the `luks_header` fuzz target: `data` parsed as a LUKS header followed by its
/// key material; a header that parses must serialise back to itself, and one whose
/// iteration counts are small (a fuzzer cannot wait for real ones) is unlocked with a fixed
/// passphrase, reading key material from the rest of `data`. Returns whether it parsed.
pub fn luks_header(data: &[u8]) -> bool {
    use super::crypto::{keyslot, luks};
    let Ok(h) = luks::Header::parse(data) else {
        return false;
    };
    assert_eq!(luks::Header::parse(&h.to_bytes()).as_ref(), Ok(&h));
    let cheap = |n: u32| n <= 1000;
    if cheap(h.mk_iterations) && h.slots.iter().all(|s| !s.active || cheap(s.iterations)) {
        let read = |at: u64, buf: &mut [u8]| -> std::io::Result<()> {
            let at = usize::try_from(at).map_err(std::io::Error::other)?;
            let src = data
                .get(at..at.saturating_add(buf.len()))
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        };
        let _ = keyslot::unlock(&h, b"fuzz", &read);
    }
    true
}
