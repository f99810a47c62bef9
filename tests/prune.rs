//! `qmprestore prune` on chains qemu-img made (the disk's contents at every backup kept as
//! raw images): the kept restore points, and only they, are listed afterwards with their
//! times; each restores to exactly the disk at that backup (qemu-img compare); the changed
//! files pass `qemu-img check` and `verify` proves every byte against their new manifests;
//! a dry run changes nothing; an interruption after any write, and SIGKILL at random
//! moments, leave every kept point restorable, and running the command again converges to
//! the same result. Real-QEMU chains are pruned in `tests/backup/levels.rs`.

mod common;

use common::chains::{build, Backups};
use common::crashes;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `qmprestore prune --dir <dir> <args>` in UTC (the calendar rules use local time).
fn prune_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qmprestore"));
    c.arg("prune")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .env("TZ", "UTC");
    c
}

fn prune(dir: &Path, args: &[&str]) -> Output {
    prune_cmd(dir, args).output().unwrap()
}

fn prune_ok(dir: &Path, args: &[&str]) -> String {
    run(&mut prune_cmd(dir, args))
}

/// The restore points `list` shows: (file, epoch).
fn points(dir: &Path) -> Vec<(String, u64)> {
    let o = qmprestore(&["list", "--json", "--dir", dir.to_str().unwrap()]);
    json_of(&o)
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["status"] == "restore-point")
        .map(|p| {
            (
                p["file"].as_str().unwrap().to_string(),
                p["epoch"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn epoch_of(name: &str) -> u64 {
    name.split('-').nth(1).unwrap().parse().unwrap()
}

/// Asserts that the point of `dir` at `epoch` restores to `expected`.
fn assert_point(dir: &Path, epoch: u64, expected: &Path) {
    let out = dir.parent().unwrap().join("point.qcow2");
    qmprestore_ok(&[
        "merge",
        "--force",
        "--dir",
        dir.to_str().unwrap(),
        "--until",
        &epoch.to_string(),
        "--targetfile",
        out.to_str().unwrap(),
    ]);
    assert_same(&out, expected);
}

/// Every file below `dir` (manifests and journals included) with its bytes' hash and mtime.
fn state(dir: &Path) -> BTreeMap<PathBuf, (String, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let m = std::fs::metadata(&p).unwrap().modified().unwrap();
                out.insert(p.clone(), (sha256_file(&p), m));
            }
        }
    }
    out
}

/// A copy of the chain with its manifests.
fn copy_with_manifests(b: &Backups, to: &Path) -> PathBuf {
    b.copy_to(to);
    std::fs::create_dir_all(to.join(".manifest")).unwrap();
    for n in &b.names {
        let m = format!(".manifest/{n}.json");
        std::fs::copy(b.dir.join(&m), to.join(&m)).unwrap();
    }
    to.to_path_buf()
}

/// No journal or prune record is left behind.
fn assert_no_journal(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir.join(".journal"))
        .map(|r| r.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// After a prune that keeps the points `kept` (indexes into the chain as built): `list` shows
/// exactly them, with their times; each restores; the files pass check and verify with a
/// manifest each; modification times keep the order. After a crash `leaks` may be left (the
/// clusters a write in flight had allocated), never corruption.
fn assert_pruned(b: &Backups, dir: &Path, kept: &[usize], leaks: bool) {
    let now = points(dir);
    let epochs: Vec<u64> = kept.iter().map(|&k| epoch_of(&b.names[k])).collect();
    assert_eq!(
        now.iter().map(|p| p.1).collect::<Vec<_>>(),
        epochs,
        "{now:?}"
    );
    assert_eq!(now[0].0, format!("FULL-{}-disk.qcow2", epochs[0]));
    for (&k, (name, _)) in kept.iter().zip(&now).skip(1) {
        assert_eq!(name, &b.names[k]);
    }
    for (&k, &e) in kept.iter().zip(&epochs) {
        assert_point(dir, e, &b.expected[k]);
    }
    let files: Vec<String> = now.iter().map(|p| p.0.clone()).collect();
    for f in &files {
        if leaks {
            assert_no_corruption(&dir.join(f));
        } else {
            assert_check_clean(&dir.join(f));
        }
    }
    assert_eq!(
        manifest_names(dir),
        files
            .iter()
            .map(|f| format!("{f}.json"))
            .collect::<Vec<_>>()
    );
    assert_verifies(dir);
    assert_no_journal(dir);
    let mtimes: Vec<_> = files
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).unwrap().modified().unwrap())
        .collect();
    assert!(mtimes.windows(2).all(|w| w[0] <= w[1]), "{mtimes:?}");
}

#[test]
fn keep_last_folds_the_older_points_into_a_renamed_full() {
    if !have("qemu-img") {
        return;
    }
    for linked in [true, false] {
        let b = build(5, linked, "", None);
        b.write_manifests();
        let dir = copy_with_manifests(&b, &b.root().join("work"));
        // rebase's `image` link on point 4, which the FULL comes to hold: it follows.
        if linked {
            qmprestore_ok(&[
                "rebase",
                "--dir",
                dir.to_str().unwrap(),
                "--until",
                &b.names[4],
            ]);
        }
        let out = prune_ok(&dir, &["--keep-last", "2"]);
        assert!(out.contains("freed"), "{out}");
        assert_pruned(&b, &dir, &[4, 5], false);
        let full = format!("FULL-{}-disk.qcow2", epoch_of(&b.names[4]));
        if linked {
            assert_eq!(
                std::fs::read_link(dir.join("image")).unwrap(),
                Path::new(&full)
            );
        }
        if linked {
            let info = common::backup_vm::qemu_info(&dir.join(&b.names[5]));
            assert_eq!(info["backing-filename"], full.as_str(), "{info}");
        }
        // Running it again changes nothing.
        let before = state(&dir);
        prune_ok(&dir, &["--keep-last", "2"]);
        assert_eq!(state(&dir), before);
        // The next point folds in the same way.
        prune_ok(&dir, &["--keep-last", "1"]);
        assert_pruned(&b, &dir, &[5], false);
    }
}

#[test]
fn a_dry_run_changes_nothing_and_says_what_goes() {
    if !have("qemu-img") {
        return;
    }
    let b = build(5, true, "", None);
    b.write_manifests();
    let before = state(&b.dir);
    let o = prune(&b.dir, &["--keep-last", "2", "--dry-run", "--json"]);
    let v = json_of(&o);
    assert!(o.status.success(), "{v}");
    assert_eq!(state(&b.dir), before, "a dry run changed files");
    let freed: u64 = b.names[1..=4]
        .iter()
        .map(|n| std::fs::metadata(b.dir.join(n)).unwrap().len())
        .sum();
    assert_eq!(v["bytes_freed"].as_u64(), Some(freed), "{v}");
    assert!(v["bytes_written"].as_u64().unwrap() > 0, "{v}");
    let actions: Vec<&str> = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["fold", "fold", "fold", "fold", "keep", "keep"]);
    let human = succeeded(prune(&b.dir, &["--keep-last", "2", "--dry-run"]));
    assert!(human.contains("would fold"), "{human}");
    assert!(
        human.contains(&format!("would free {freed} bytes")),
        "{human}"
    );
    assert_eq!(state(&b.dir), before);
}

#[test]
fn keeping_nothing_is_refused() {
    if !have("qemu-img") {
        return;
    }
    let b = build(2, true, "", None);
    let before = state(&b.dir);
    for args in [&["--keep-last", "0"][..], &[], &["--keep-daily", "0"]] {
        let o = prune(&b.dir, args);
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("keep nothing"), "{err}");
    }
    assert_eq!(state(&b.dir), before);
}

/// The chain renamed to the given epochs (unlinked, so names are free), with manifests.
fn at_epochs(rounds: usize, epochs: &[u64]) -> Backups {
    let mut b = build(rounds, false, "", None);
    for (k, e) in epochs.iter().enumerate() {
        let level = if k == 0 { "FULL" } else { "INC" };
        let name = format!("{level}-{e}-disk.qcow2");
        std::fs::rename(b.dir.join(&b.names[k]), b.dir.join(&name)).unwrap();
        b.names[k] = name;
    }
    b.write_manifests();
    b
}

/// keep-daily 3 over six points on four days keeps the newest of each of the last three
/// days: the first two points fold into the FULL, the one between kept points into its
/// successor. Linked by `rebase` first, so the re-links are exercised too.
#[test]
fn calendar_rules_fold_points_between_kept_ones_into_their_successor() {
    if !have("qemu-img") {
        return;
    }
    // 2026-03-01 10:00, 03-02 10:00, 03-02 11:00, 03-03 10:00, 03-04 10:00, 03-04 12:00 UTC.
    let epochs = [
        1772359200, 1772445600, 1772449200, 1772532000, 1772618400, 1772625600,
    ];
    let b = at_epochs(5, &epochs);
    b.qmprestore_ok("rebase", &[]);
    let o = prune(&b.dir, &["--keep-daily", "3", "--dry-run", "--json"]);
    let v = json_of(&o);
    let kept: Vec<Option<&str>> = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kept_by"].as_str())
        .collect();
    assert_eq!(
        kept,
        [
            None,
            None,
            Some("daily"),
            Some("daily"),
            None,
            Some("daily")
        ],
        "{v}"
    );
    prune_ok(&b.dir, &["--keep-daily", "3"]);
    assert_pruned(&b, &b.dir, &[2, 3, 5], false);
    let info = common::backup_vm::qemu_info(&b.dir.join(&b.names[5]));
    assert_eq!(info["backing-filename"], b.names[3].as_str(), "{info}");
}

/// A --monthly target: a month folder no rule keeps a point of goes whole; in the others the
/// points no rule keeps are folded away.
#[test]
fn monthly_folders_without_a_kept_point_go_whole() {
    if !have("qemu-img") {
        return;
    }
    let target = tempfile::tempdir().unwrap();
    // Two points in each of January, February and March 2026.
    let months = [
        ("2026-01", [1767582000, 1768878000]),
        ("2026-02", [1770087600, 1771297200]),
        ("2026-03", [1772420400, 1773025200]),
    ];
    let mut chains = Vec::new();
    for (m, epochs) in months {
        let b = at_epochs(1, &epochs);
        let dir = target.path().join(m).join("disk.qcow2");
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        std::fs::write(dir.parent().unwrap().join("uuid"), "test-chain").unwrap();
        copy_with_manifests(&b, &dir);
        chains.push((b, dir));
    }
    // With --filter no month folder goes whole: it may hold other disks.
    let o = prune(
        target.path(),
        &[
            "--keep-monthly",
            "2",
            "--filter",
            "disk",
            "--dry-run",
            "--json",
        ],
    );
    let v = json_of(&o);
    assert!(o.status.success(), "{v}");
    assert_eq!(v["removed_folders"], serde_json::json!([]), "{v}");
    let o = prune(target.path(), &["--keep-monthly", "2", "--json"]);
    let v = json_of(&o);
    assert!(o.status.success(), "{v}");
    assert_eq!(v["removed_folders"], serde_json::json!(["2026-01"]), "{v}");
    assert!(!target.path().join("2026-01").exists());
    for (b, dir) in &chains[1..] {
        assert_pruned(b, dir, &[1], false);
    }
    let left: Vec<_> = std::fs::read_dir(target.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(left.iter().all(|n| !n.starts_with('.')), "{left:?}");
}

/// A FULL whose bytes no longer match its manifest where the fold would write is not folded
/// into: the prune stops there with the damage named, and nothing it removed is lost.
#[test]
fn a_damaged_full_is_not_folded_into() {
    if !have("qemu-img") {
        return;
    }
    let b = build(3, true, "", None);
    b.write_manifests();
    // The first data cluster INC 1 writes, in the FULL: overwritten in place by the fold.
    let inc = qmpbackup::qcow2::Disk::open_alone(&b.dir.join(&b.names[1])).unwrap();
    let mut first = None;
    inc.for_each_extent(0, inc.size(), |e| {
        if e.data && first.is_none() {
            first = Some(e.start);
        }
        Ok(())
    })
    .unwrap();
    let full = b.dir.join(&b.names[0]);
    let host = {
        let d = qmpbackup::qcow2::Disk::open_alone(&full).unwrap();
        d.extent_at(first.unwrap(), 1).unwrap().offset.unwrap()
    };
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&full).unwrap();
    f.write_all_at(b"rot!", host + 100).unwrap();
    let o = prune(&b.dir, &["--keep-last", "1"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no longer match the manifest"), "{err}");
    assert!(err.contains(&b.names[0]), "{err}");
    for n in &b.names[1..] {
        assert!(b.dir.join(n).exists(), "{n} went");
    }
    // Nothing was written: the FULL's manifest is back, and verify names the damage.
    assert!(manifest_names(&b.dir).contains(&format!("{}.json", b.names[0])));
    let o = b.qmprestore("verify", &["--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v = json_of(&o);
    assert!(
        v["dirs"][0]["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["file"] == b.names[0].as_str()),
        "{v}"
    );
}

/// Interrupted after its N-th write (for many N) and by SIGKILL at random moments: every
/// kept point restores at that instant, and running prune again converges to the result of an
/// uninterrupted run, manifests included.
#[test]
fn an_interrupted_prune_converges() {
    if !have("qemu-img") {
        return;
    }
    // INCs of 4 KiB clusters: many small copies and metadata updates.
    let b = build(8, true, "cluster_size=4096", None);
    b.write_manifests();
    let kept = [5, 6, 7, 8];
    let work = b.root().join("work");
    let judge = |dir: &Path, what: &str| {
        for &k in &kept {
            let e = epoch_of(&b.names[k]);
            let out = dir.parent().unwrap().join("point.qcow2");
            let o = qmprestore(&[
                "merge",
                "--force",
                "--dir",
                dir.to_str().unwrap(),
                "--until",
                &e.to_string(),
                "--targetfile",
                out.to_str().unwrap(),
            ]);
            assert!(
                o.status.success(),
                "{what}: point {k}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert_same(&out, &b.expected[k]);
        }
        // A change left half done is noted by verify.
        let pending = std::fs::read_dir(dir.join(".journal")).is_ok_and(|r| {
            r.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.ends_with(".json") && !n.starts_with("prune-")
            })
        });
        if pending {
            let v = json_of(&qmprestore(&[
                "verify",
                "--json",
                "--dir",
                dir.to_str().unwrap(),
            ]));
            assert!(
                v["dirs"][0]["notes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|n| n.as_str().unwrap().contains("interrupted in-place change")),
                "{what}: {v}"
            );
        }
        prune_ok(dir, &["--keep-last", "4"]);
        assert_pruned(&b, dir, &kept, true);
    };
    let fresh = || prune_cmd(&copy_with_manifests(&b, &work), &["--keep-last", "4"]);
    let n = crashes::after_each_write(0.., fresh, |what| judge(&work, what));
    eprintln!("prune: {n} crash points");
    assert!(n >= 40, "only {n} crash points");
    crashes::killed_at_random(8, n, fresh, |what, _| judge(&work, what));
}
