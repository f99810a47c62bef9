//! Writes that fail because the file may not grow (EFBIG under RLIMIT_FSIZE, as ENOSPC would
//! on a full disk): a clear error, backups untouched, no partial output, and an in-place
//! command that was cut short completes when run again.

mod common;

use common::chains::build;
use common::*;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

/// Runs qmprestore with the file size limit set to `limit` bytes.
fn limited(limit: u64, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qmprestore"));
    c.args(args);
    // SAFETY: setrlimit is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        c.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().unwrap()
}

fn sums(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    names.iter().map(|p| sha256_file(p)).collect()
}

#[test]
fn file_size_limits_give_clear_errors_and_leave_nothing_behind() {
    if !have("qemu-img") {
        return;
    }
    let b = build(3, true, "", None);
    let d = b.dir.to_str().unwrap();
    let root = b.dir.parent().unwrap();
    let before = sums(&b.dir);
    for format in ["qcow2", "raw"] {
        let out = root.join(format!("merged.{format}"));
        let o = limited(
            1 << 20,
            &[
                "merge",
                "--format",
                format,
                "--dir",
                d,
                "--targetfile",
                out.to_str().unwrap(),
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{format}: {err}");
        assert!(err.contains("File too large"), "{format}: {err}");
        let left: Vec<_> = std::fs::read_dir(root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().contains("merged"))
            .collect();
        assert!(left.is_empty(), "{format}: partial output left: {left:?}");
        assert_eq!(sums(&b.dir), before, "{format}: a backup file changed");
    }
    let conv = root.join("conv.raw");
    let o = limited(
        1 << 20,
        &[
            "convert",
            "-O",
            "raw",
            b.dir.join(&b.names[0]).to_str().unwrap(),
            conv.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(!conv.exists());

    // commit grows the FULL in place: cut short, the chain still restores, and a second run
    // without the limit completes.
    let full = b.dir.join(&b.names[0]);
    let size = std::fs::metadata(&full).unwrap().len();
    let o = limited(size + 4096, &["commit", "--dir", d]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("File too large"), "{err}");
    assert_eq!(
        std::fs::read_dir(&b.dir).unwrap().count(),
        b.names.len(),
        "no INC was removed"
    );
    let v = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .args(["verify", "--dir", d])
        .output()
        .unwrap();
    assert_eq!(
        v.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&v.stdout)
    );
    run(Command::new(env!("CARGO_BIN_EXE_qmprestore")).args(["commit", "--dir", d]));
    assert_same(&full, b.expected.last().unwrap());
    assert_no_corruption(&full);
}
