//! Crash safety: a process killed after its N-th write to an image, for many N, leaves an
//! image that `qemu-img check` finds free of corruption (leaks allowed) and that reads, cluster
//! by cluster, as either the old or the new content; internal snapshots stay intact.
//!
//! The crash is real: the operation runs in a child process (this test binary, re-run with
//! `CHILD`) with the fault hook set, and aborts there.

mod common;

use common::*;
use qmpbackup::qcow2::fault;
use qmpbackup::qcow2::write::Writer;
use std::path::Path;
use std::process::Command;

const CHILD: &str = "QMPBACKUP_CRASH_TEST_CHILD";
const SIZE: u64 = 4 << 20;
const CS: usize = 512;

/// The operations under test, run in the child.
fn operate(op: &str, path: &Path) {
    let mut w = Writer::open(path).unwrap();
    match op {
        "write" => {
            w.write_at(&vec![0xc3; 1 << 20], 1_300_000).unwrap();
            w.write_zeroes(3_500_000, 200_000).unwrap();
        }
        "snapshot-create" => {
            w.create_snapshot("new").unwrap();
        }
        "snapshot-delete" => w.delete_snapshot("s").unwrap(),
        "snapshot-apply" => w.apply_snapshot("s").unwrap(),
        _ => panic!("unknown operation {op}"),
    }
    w.flush().unwrap();
}

/// Entry point of the child process; a no-op when run as an ordinary test.
#[test]
fn child_process_entry_point() {
    if let Ok(spec) = std::env::var(CHILD) {
        let (op, path) = spec.split_once(':').unwrap();
        operate(op, Path::new(path));
    }
}

fn run_child(op: &str, path: &Path, crash_after: Option<u64>) -> bool {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "child_process_entry_point",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD, format!("{op}:{}", path.display()));
    if let Some(n) = crash_after {
        c.env(fault::ENV, n.to_string());
    }
    c.output().unwrap().status.success()
}

fn crash_points(op: &str) {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    // Tiny clusters and wide refcounts: the write needs new L2 tables, new refcount blocks
    // and a larger refcount table, and shares everything with a snapshot first.
    qemu_img(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=64",
            "t.qcow2",
            &SIZE.to_string(),
        ],
    );
    qemu_io(
        p,
        "t.qcow2",
        &["write -P 0x11 0 2M", "write -P 0x22 3M 512k"],
    );
    qemu_img(p, &["snapshot", "-c", "s", "t.qcow2"]);
    qemu_io(p, "t.qcow2", &["write -P 0x33 1M 64k"]);
    let template = std::fs::read(p.join("t.qcow2")).unwrap();
    let old = render(p, "t.qcow2", None);
    let snap = render(p, "t.qcow2", Some("s"));
    // The expected result, from an uninterrupted run.
    assert!(
        run_child(op, &p.join("t.qcow2"), None),
        "{op} failed without a crash"
    );
    let new = render(p, "t.qcow2", None);
    let mut points = 0;
    for n in (0..).map(|i: u64| if i < 60 { i } else { 60 + (i - 60) * 11 }) {
        std::fs::write(p.join("t.qcow2"), &template).unwrap();
        let finished = run_child(op, &p.join("t.qcow2"), Some(n));
        points += 1;
        let image = p.join("t.qcow2");
        let dirty = qmpbackup::qcow2::header::Header::parse(&std::fs::read(&image).unwrap())
            .unwrap()
            .dirty();
        if dirty {
            // Interrupted under the dirty bit: refcounts and COPIED flags may disagree, as in
            // QEMU; the next writable open repairs them. Do that, then judge.
            assert!(
                op.starts_with("snapshot"),
                "{op}: plain writes never set the dirty bit"
            );
            drop(Writer::open(&image).unwrap());
        }
        let out = Command::new("qemu-img")
            .current_dir(p)
            .args(["check", "t.qcow2"])
            .output()
            .unwrap();
        let code = out.status.code().unwrap();
        assert!(
            code == 0 || code == 3,
            "{op}, crash after write {n} (dirty: {dirty}): qemu-img check exit {code}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let ours = qmpbackup::qcow2::check::check(&image).unwrap();
        assert_eq!(
            ours.corruptions, 0,
            "{op}, crash after write {n}: {:?}",
            ours.messages
        );
        let now = render(p, "t.qcow2", None);
        for (i, c) in now.chunks(CS).enumerate() {
            let r = i * CS..(i + 1) * CS;
            assert!(
                c == &old[r.clone()] || c == &new[r],
                "{op}, crash after write {n}: cluster {i} is neither old nor new"
            );
        }
        let listed = qemu_img(p, &["snapshot", "-l", "t.qcow2"]);
        if listed.contains(" s ") {
            assert!(
                render(p, "t.qcow2", Some("s")) == snap,
                "{op}, crash after write {n}: snapshot s changed"
            );
        }
        if finished {
            assert!(now == new, "{op}: finished run differs");
            break;
        }
        assert!(n < 20_000, "{op} never finished");
    }
    eprintln!("{op}: {points} crash points checked");
    assert!(points >= 20, "{op}: only {points} crash points");
}

#[test]
fn crash_during_writes() {
    crash_points("write");
}

#[test]
fn crash_during_snapshot_create() {
    crash_points("snapshot-create");
}

#[test]
fn crash_during_snapshot_delete() {
    crash_points("snapshot-delete");
}

#[test]
fn crash_during_snapshot_apply() {
    crash_points("snapshot-apply");
}
