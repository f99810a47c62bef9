//! Writes that fail because the disk is full (ENOSPC, on a small tmpfs mounted for the test)
//! or because the file may not grow (EFBIG under RLIMIT_FSIZE): a clear error, backups
//! untouched, no partial output, and an in-place command that was cut short completes when run
//! again with room.

mod common;

use common::chains::build;
use common::*;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// How the test makes writes fail.
#[derive(Clone, Copy)]
enum Full {
    /// RLIMIT_FSIZE: growing a file past the given limit fails with EFBIG.
    FileSize,
    /// The chain and every output live on a tmpfs with little room left: ENOSPC.
    Space,
}

/// Runs qmprestore; under [`Full::FileSize`] with the file size limited to `limit` bytes.
fn qmprestore(full: Full, limit: u64, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qmprestore"));
    c.args(args);
    if let Full::FileSize = full {
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
    }
    c.output().unwrap()
}

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes; `None` (with a loud message) where mounting is not
    /// permitted, a failure in CI, where the tests run as root.
    fn mount(size: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        if o.status.success() {
            return Some(Tmpfs { dir });
        }
        let why = String::from_utf8_lossy(&o.stderr);
        skip(&format!(
            "cannot mount a tmpfs ({why}); ENOSPC was not tested"
        ));
        None
    }

    fn resize(&self, size: u64) {
        run(Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path()));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
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

fn bytes_in(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len().next_multiple_of(4096))
        .sum()
}

#[test]
fn file_size_limits_give_clear_errors_and_leave_nothing_behind() {
    exercise(Full::FileSize);
}

#[test]
fn a_full_file_system_gives_clear_errors_and_leaves_nothing_behind() {
    exercise(Full::Space);
}

fn exercise(full: Full) {
    if !have("qemu-img") {
        return;
    }
    let b = build(3, true, "", None);
    // Under Space, the chain moves to a tmpfs with 64 KiB to spare: too little for any
    // merged image and for the clusters commit adds to the FULL.
    let mut tmpfs = None;
    let dir: PathBuf = match full {
        Full::FileSize => b.dir.clone(),
        Full::Space => {
            let Some(fs) = Tmpfs::mount(bytes_in(&b.dir) + (64 << 10)) else {
                return;
            };
            let dir = fs.dir.path().join("disk.qcow2");
            std::fs::create_dir(&dir).unwrap();
            for n in &b.names {
                std::fs::copy(b.dir.join(n), dir.join(n)).unwrap();
            }
            tmpfs = Some(fs);
            dir
        }
    };
    let needle = match full {
        Full::FileSize => "File too large",
        Full::Space => "No space left on device",
    };
    let d = dir.to_str().unwrap();
    let root = dir.parent().unwrap();
    let before = sums(&dir);
    for format in ["qcow2", "raw"] {
        let out = root.join(format!("merged.{format}"));
        let o = qmprestore(
            full,
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
        assert!(err.contains(needle), "{format}: {err}");
        let left: Vec<_> = std::fs::read_dir(root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().contains("merged"))
            .collect();
        assert!(left.is_empty(), "{format}: partial output left: {left:?}");
        assert_eq!(sums(&dir), before, "{format}: a backup file changed");
    }
    let conv = root.join("conv.raw");
    let o = qmprestore(
        full,
        1 << 20,
        &[
            "convert",
            "-O",
            "raw",
            dir.join(&b.names[0]).to_str().unwrap(),
            conv.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains(needle));
    assert!(!conv.exists());

    // commit grows the FULL in place: cut short, the chain still restores, and a second run
    // without the limit completes.
    let full_image = dir.join(&b.names[0]);
    let size = std::fs::metadata(&full_image).unwrap().len();
    let o = qmprestore(full, size + 4096, &["commit", "--dir", d]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "{err}");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        b.names.len(),
        "no INC was removed"
    );
    assert_verifies(&dir);
    if let Some(fs) = &tmpfs {
        fs.resize(64 << 20);
    }
    run(Command::new(env!("CARGO_BIN_EXE_qmprestore")).args(["commit", "--dir", d]));
    assert_same(&full_image, b.expected.last().unwrap());
    assert_no_corruption(&full_image);
}
