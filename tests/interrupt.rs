//! Interrupted chain commands: `commit`, `snapshotrebase`, `merge` and `rebase` are stopped
//! after their N-th write (the fault hook aborts the process: no destructors, no flush) for
//! every N up to 80 and every 7th N after that, until the command finishes (at least 50
//! points each), and killed with SIGKILL at random moments. Afterwards
//! `qmprestore verify` must say the chain is restorable (and it must be: a merge of it equals
//! the disk at the newest backup), re-running the command must complete, its result must
//! equal that disk byte for byte, and `qemu-img check` must find no corruption.

mod common;

use common::chains::{build, Backups};
use common::crashes;
use common::*;
use std::path::Path;
use std::process::Command;

fn qmprestore(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qmprestore"));
    c.args(args);
    c
}

/// The command under test on chain directory `dir`; `out` is merge's target.
fn args<'a>(cmd: &'a str, dir: &'a str, out: &'a str) -> Vec<&'a str> {
    match cmd {
        "merge" => vec!["merge", "--dir", dir, "--targetfile", out],
        _ => vec![cmd, "--dir", dir],
    }
}

/// What must hold after an interruption of `cmd` and after the re-run.
fn judge(cmd: &str, b: &Backups, dir: &Path, out: &Path, what: &str) {
    let newest = b.expected.last().unwrap();
    let d = dir.to_str().unwrap();
    // verify tells the truth: it says restorable, and a restore gives the newest state.
    let v = qmprestore(&["verify", "--dir", d]).output().unwrap();
    assert_eq!(
        v.status.code(),
        Some(0),
        "{what}: verify: {}",
        String::from_utf8_lossy(&v.stdout)
    );
    let m = dir.parent().unwrap().join("judge.qcow2");
    run(&mut qmprestore(&[
        "merge",
        "--force",
        "--dir",
        d,
        "--targetfile",
        m.to_str().unwrap(),
    ]));
    assert_same(&m, newest);
    // The re-run completes, with the right result. A merge target only ever appears complete
    // (written under a temporary name, then renamed): if it is there, the merge was done.
    if !(cmd == "merge" && out.exists()) {
        run(&mut qmprestore(&args(cmd, d, out.to_str().unwrap())));
    }
    let result = match cmd {
        "merge" => out.to_path_buf(),
        "rebase" => dir.join("image"),
        _ => dir.join(&b.names[0]),
    };
    assert_same(&result, newest);
    assert_no_corruption(&result);
    if cmd == "snapshotrebase" {
        let last = qmpbackup::chain::snapshot_rebase::snapshot_name(
            b.names
                .last()
                .unwrap()
                .split('-')
                .nth(1)
                .unwrap()
                .parse()
                .unwrap(),
        );
        assert_eq!(
            sha256_bytes(&render(dir, &b.names[0], Some(&last))),
            sha256_file(newest),
            "{what}: snapshot {last}"
        );
    }
    let _ = std::fs::remove_file(out);
}

fn crash_points(cmd: &str) {
    if !have("qemu-img") {
        return;
    }
    // INCs of 4 KiB clusters over a 64 KiB-cluster FULL: many small copies and metadata
    // updates. rebase writes one header per INC, so it gets a long chain of unlinked INCs.
    let b = if cmd == "rebase" {
        build(60, false, "cluster_size=4096", None)
    } else {
        build(14, true, "cluster_size=4096", None)
    };
    let root = b.dir.parent().unwrap().to_path_buf();
    if cmd == "merge" {
        // merge coalesces neighbouring clusters into one copy, and its output takes the FULL's
        // cluster size: 512-byte clusters give it many L2 tables and refcount blocks to write.
        let full = b.dir.join(&b.names[0]);
        let small = root.join("small.qcow2");
        qemu_img(
            &root,
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=512",
                full.to_str().unwrap(),
                small.to_str().unwrap(),
            ],
        );
        std::fs::rename(&small, &full).unwrap();
    }
    let work = root.join("work");
    let out = root.join("merged.qcow2");
    let sums: Vec<String> = b
        .names
        .iter()
        .map(|n| sha256_file(&b.dir.join(n)))
        .collect();
    let fresh = || {
        let dir = b.copy_to(&work);
        qmprestore(&args(cmd, dir.to_str().unwrap(), out.to_str().unwrap()))
    };
    let check = |what: &str| {
        if cmd == "merge" {
            let now: Vec<String> = b.names.iter().map(|f| sha256_file(&work.join(f))).collect();
            assert_eq!(now, sums, "{what}: merge changed a backup file");
        }
        judge(cmd, &b, &work, &out, what);
    };
    let points = crashes::after_each_write(
        (0..).map(|i: u64| if i < 80 { i } else { 80 + (i - 80) * 7 }),
        fresh,
        |what| check(&format!("{cmd}, {what}")),
    );
    let _ = std::fs::remove_file(&out);
    eprintln!("{cmd}: {points} crash points");
    assert!(points >= 50, "{cmd}: only {points} crash points");
    crashes::killed_at_random(10, points, fresh, |what, finished| {
        if finished {
            let _ = std::fs::remove_file(&out);
        } else {
            check(&format!("{cmd}, {what}"));
        }
    });
}

#[test]
fn commit_interrupted_at_every_write() {
    crash_points("commit");
}

#[test]
fn snapshotrebase_interrupted_at_every_write() {
    crash_points("snapshotrebase");
}

#[test]
fn merge_interrupted_at_every_write() {
    crash_points("merge");
}

#[test]
fn rebase_interrupted_at_every_write() {
    crash_points("rebase");
}
