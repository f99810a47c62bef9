use crate::common::backup_vm::*;
use crate::common::qemu::{log_of, qmpbackup};
use crate::common::{self, assert_same, json_of, mode, qmprestore_ok};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// info and cleanup; a chain started by the original (FULL without manifest, bitmap named as
/// its versions 0.56-0.62 did) continues with our incrementals.
#[test]
fn info_and_cleanup_answer_as_the_originals_and_its_chain_continues() {
    let Some(mut s) = BackupVm::one_disk() else {
        return;
    };
    s.vm.write(D0.io, 0x51, 0, MIB);
    // The original's FULL of this state, and its bitmap.
    std::fs::create_dir_all(&s.dd).unwrap();
    std::fs::write(s.target.join("uuid"), "0f0e0d0c-orig").unwrap();
    s.vm.exec(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "qmpbackup-disk0-0f0e0d0c-orig", "persistent": true}),
    );
    s.vm.io(D0.io, "flush");
    common::run(
        Command::new("qemu-img")
            .args(["convert", "-U", "-O", "qcow2", "d0.qcow2"])
            .arg(s.dd.join("FULL-1000000000-d0.qcow2"))
            .current_dir(&s.dir),
    );
    s.vm.write(D0.io, 0x52, 4 * MIB, MIB);
    s.backup("inc", &["--link-incs"]);
    s.capture(&[&D0], "x");
    s.assert_restores(&D0, None, "x");
    let names = s.files();
    let info = qemu_info(&s.dd.join(&names[1]));
    assert_eq!(
        info["backing-filename"], "FULL-1000000000-d0.qcow2",
        "{info}"
    );

    let socket = s.vm.socket();
    let ask = |args: &[&str]| qmpbackup(&socket, args);
    let bitmaps = json_of(&ask(&["info", "--show", "bitmaps", "--json"]));
    assert_eq!(bitmaps["disk0"][0]["name"], "qmpbackup-disk0-0f0e0d0c-orig");
    let human = common::succeeded(ask(&["info", "--show", "blockdev", "--human"]));
    assert!(human.contains("disk0: node disk0, qcow2"), "{human}");
    let blockdev = json_of(&ask(&["info", "--show", "blockdev", "--json"]));
    assert_eq!(blockdev[0]["inserted"]["node-name"], "disk0");

    // The original's forms on standard output, as its own test script greps them.
    let bitmaps = common::succeeded(ask(&["info", "--show", "bitmaps"]));
    assert!(
        bitmaps.contains("INFO - ")
            && bitmaps.contains(&format!("disk0 [{}]:", s.dir.join("d0.qcow2").display())),
        "{bitmaps}"
    );
    let listed = logged_json(&bitmaps);
    assert_eq!(
        listed[0]["name"], "qmpbackup-disk0-0f0e0d0c-orig",
        "{bitmaps}"
    );
    assert!(
        bitmaps.lines().any(|l| l.contains("\"recording\": true")),
        "{bitmaps}"
    );
    let blockdev = common::succeeded(ask(&["info", "--show", "blockdev"]));
    assert!(
        blockdev.contains("INFO - qmpbackup: Attached block devices:"),
        "{blockdev}"
    );
    let record = logged_json(&blockdev);
    let expected = json!({
        "backing_image": false,
        "bitmaps": listed,
        "child_device": null,
        "device": "disk0",
        "driver": null,
        "filename": s.dir.join("d0.qcow2").to_str().unwrap(),
        "format": "qcow2",
        "has_bitmap": true,
        "node": "disk0",
        "node_safe": "disk0",
        "path": s.dir.to_str().unwrap(),
        "qdev": "/machine/peripheral/vd0/virtio-backend",
        "virtual_size": 64 * MIB,
    });
    assert_eq!(record, expected, "{blockdev}");

    let none = common::succeeded(ask(&["cleanup", "--remove-bitmaps", "--uuid", "other"]));
    assert!(
        none.contains("Removing bitmaps matching uuid [other]")
            && !none.contains("Removing bitmap:"),
        "{none}"
    );
    let removed = common::succeeded(ask(&[
        "cleanup",
        "--remove-bitmap",
        "--uuid",
        "0f0e0d0c-orig",
    ]));
    assert!(
        removed.contains("Removing bitmap: qmpbackup-disk0-0f0e0d0c-orig"),
        "{removed}"
    );
    let log = s.backup("auto", &[]);
    assert!(log.contains("is missing"), "{log}");
    assert_eq!(
        ask(&["cleanup"]).status.code(),
        Some(2),
        "--remove-bitmap is required"
    );
}

/// The JSON document a log printed over several lines (the original's `info` output): from
/// the line whose message opens it to the line that closes it.
fn logged_json(log: &str) -> serde_json::Value {
    let lines: Vec<&str> = log.lines().collect();
    let first = lines
        .iter()
        .position(|l| l.ends_with(": {") || l.ends_with(": ["))
        .unwrap_or_else(|| panic!("no JSON in {log}"));
    let close = if lines[first].ends_with('{') {
        "}"
    } else {
        "]"
    };
    let last = first + lines[first..].iter().position(|l| *l == close).unwrap();
    let mut text = lines[first][lines[first].len() - 1..].to_string();
    for l in &lines[first + 1..=last] {
        text.push('\n');
        text.push_str(l);
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Runs the original qmprestore's procedure `mode` (its qemu-img sequence, replayed by
/// `tests/scripts/original-restore.sh`) on a copy of the backup files of `from` (mtimes
/// kept: the original orders by them) in `to`; returns its output.
fn original_restore_of_copy(mode: &str, from: &Path, to: &Path, target: Option<&Path>) -> Output {
    std::fs::create_dir_all(to).unwrap();
    for n in files(from) {
        common::run(Command::new("cp").arg("-a").arg(from.join(&n)).arg(to));
    }
    let mut cmd = Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/original-restore.sh"),
    );
    cmd.arg(mode).arg(to);
    if let Some(t) = target {
        cmd.arg(t);
    }
    cmd.output().unwrap()
}

/// [`original_restore_of_copy`] in `s.dir/<to>`, which must succeed; returns the copy.
fn original_restores(s: &BackupVm, mode: &str, to: &str, target: Option<&Path>) -> PathBuf {
    let copy = s.dir.join(to);
    let o = original_restore_of_copy(mode, &s.dd, &copy, target);
    assert!(o.status.success(), "{}", log_of(&o));
    copy
}

/// Our default INCs are standalone deltas, as the original's: its merge, commit and
/// snapshotrebase (the qemu-img sequences it runs) restore our chains to exactly the disk at
/// the last backup, and so does ours. `--link-incs` chains (which the original's commit cannot
/// restore) and mixed chains restore with ours.
#[test]
fn the_originals_restore_procedures_restore_our_chains() {
    let Some(mut s) = BackupVm::one_disk() else {
        return;
    };
    s.vm.write(D0.io, 0x71, 0, 2 * MIB);
    s.backup("full", &[]);
    s.vm.write(D0.io, 0x72, MIB, 64 << 10);
    s.vm.io(D0.io, "write -z 32M 1M");
    s.backup("inc", &[]);
    s.vm.write(D0.io, 0x73, 40 * MIB, 3 * MIB);
    s.backup("inc", &[]);
    s.capture(&[&D0], "last");
    let expected = s.captured(&D0, "last");
    let names = s.files();
    assert_eq!(names.len(), 3, "{names:?}");
    for inc in &names[1..] {
        let info = qemu_info(&s.dd.join(inc));
        assert!(
            info.get("backing-filename").is_none(),
            "{inc} is standalone: {info}"
        );
    }

    let merged = s.dir.join("orig-restore/restored.qcow2");
    std::fs::create_dir(s.dir.join("orig-restore")).unwrap();
    original_restores(&s, "merge", "orig-merge", Some(&merged));
    assert_same(&merged, &expected);
    let c = original_restores(&s, "commit", "orig-commit", None);
    assert_same(&c.join(&names[0]), &expected);
    assert_eq!(files(&c), names[..1]);
    let c = original_restores(&s, "snapshotrebase", "orig-snaprebase", None);
    assert_same(&c.join(&names[0]), &expected);
    let snaps = common::run(
        Command::new("qemu-img")
            .args(["snapshot", "-l"])
            .arg(c.join(&names[0])),
    );
    assert_eq!(
        snaps
            .lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
            .count(),
        3,
        "{snaps}"
    );
    s.assert_restores(&D0, None, "last");

    // Linked on request: what the original's commit cannot restore (the next INC's backing
    // file is gone once the first is committed and deleted); ours restores it, and mixed.
    s.vm.write(D0.io, 0x74, 8 * MIB, MIB);
    s.backup("inc", &["--link-incs"]);
    s.vm.write(D0.io, 0x75, 9 * MIB, MIB);
    s.backup("inc", &["--link-incs"]);
    s.capture(&[&D0], "linked");
    let names = s.files();
    let info = qemu_info(&s.dd.join(&names[4]));
    assert_eq!(info["backing-filename"], names[3].as_str(), "{info}");
    s.assert_restores(&D0, None, "linked");
    let c = s.dir.join("orig-commit-linked");
    assert!(!original_restore_of_copy("commit", &s.dd, &c, None)
        .status
        .success());
}

/// Runs qmpbackup under umask 022 (the usual one), so the modes it creates are its own doing.
fn qmpbackup_umask_022(socket: &str, args: &[&str]) -> Output {
    let mut all = vec!["--socket", socket];
    all.extend_from_slice(args);
    let o = common::with_umask_022(env!("CARGO_BIN_EXE_qmpbackup"), &all);
    assert!(o.status.success(), "{args:?}: {}", log_of(&o));
    o
}

/// `[2026-12-01 10:00:00,123]    INFO - <func>: ` (console) or `... - <func>  ` (file): the
/// original's layout, which scripts cut and grep.
fn is_original_line(line: &str, level: &str, file: bool) -> bool {
    let b = line.as_bytes();
    let stamp = b.len() > 26
        && b[0] == b'['
        && b[24] == b']'
        && b[11] == b' '
        && b[20] == b','
        && line[1..24]
            .chars()
            .all(|c| c.is_ascii_digit() || "-: ,".contains(c));
    let rest = &line[25.min(line.len())..];
    let head = format!(" {level:>7} - ");
    let Some(after) = rest.strip_prefix(&head) else {
        return false;
    };
    let func_end = after.find([':', ' ']).unwrap_or(0);
    let sep = if file { "  " } else { ": " };
    stamp && func_end > 0 && after[func_end..].starts_with(sep)
}

/// Backup folders 0700 and files 0600 under umask 022 (0750/0640 with --group-readable),
/// existing folders untouched; and the log as the original writes it: on standard output, its
/// line layout, the version and command line first (also in the log file), its words.
#[test]
fn backups_are_private_and_the_log_reads_as_the_originals() {
    let Some(mut s) = BackupVm::one_disk() else {
        return;
    };
    s.vm.write(D0.io, 0x81, 0, MIB);
    let logfile = s.dir.join("logs/q.log");
    let mut args = vec!["-L", logfile.to_str().unwrap()];
    args.extend(backup_args(s.tgt(), "full", &[]));
    let o = qmpbackup_umask_022(&s.vm.socket(), &args);
    let dd = &s.dd;
    let full = dd.join(&s.files()[0]);
    for (p, m) in [
        (&s.target, 0o700),
        (dd, 0o700),
        (&full, 0o600),
        (&dd.join(".manifest"), 0o700),
        (&s.target.join("uuid"), 0o600),
        (&s.target.join("d0.qcow2.config"), 0o600),
    ] {
        assert_eq!(mode(p), m, "{}", p.display());
    }
    for m in common::manifest_names(dd) {
        assert_eq!(mode(&dd.join(".manifest").join(m)), 0o600);
    }
    assert_eq!(
        mode(&logfile),
        0o644,
        "the log stays readable for monitoring"
    );

    let out = String::from_utf8(o.stdout).unwrap();
    assert!(
        !out.contains('\u{1b}'),
        "no colour when not on a terminal: {out}"
    );
    let first = out.lines().next().unwrap();
    let command_line = format!(
        "{} --socket {} {}",
        env!("CARGO_BIN_EXE_qmpbackup"),
        s.vm.socket(),
        args.join(" ")
    );
    assert!(is_original_line(first, "INFO", false), "{first}");
    assert!(
        first.ends_with(&format!(
            "Version: {} Arguments: {command_line}",
            env!("CARGO_PKG_VERSION")
        )),
        "{first}"
    );
    assert!(
        out.lines().all(|l| !l.starts_with('[')
            || is_original_line(l, "INFO", false)
            || is_original_line(l, "WARNING", false)),
        "{out}"
    );
    for words in [
        "Backup target directory: ",
        "Attach backup target devices to virtual machine",
        "Started backup transaction for [1] devices",
        "Backup for all [1] devices finished.",
        "Renaming partial files",
        "Removing fleece image files",
        &format!(
            "Saved image info: [{}]",
            s.target.join("d0.qcow2.config").display()
        ),
    ] {
        assert!(out.contains(words), "{words}: {out}");
    }
    let logged = std::fs::read_to_string(&logfile).unwrap();
    let first = logged.lines().next().unwrap();
    assert!(
        is_original_line(first, "INFO", true) && first.contains("  Version: "),
        "{first}"
    );

    // An existing folder keeps its mode; what is made in it is private. --group-readable and
    // --debug (the version line still first).
    let open = s.dir.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut args = vec!["--debug"];
    args.extend(backup_args(open.to_str().unwrap(), "full", &[]));
    let o = qmpbackup_umask_022(&s.vm.socket(), &args);
    assert!(String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .unwrap()
        .contains("Version: "));
    assert_eq!((mode(&open), mode(&open.join("d0.qcow2"))), (0o755, 0o700));
    let shared = s.dir.join("shared");
    qmpbackup_umask_022(
        &s.vm.socket(),
        &backup_args(shared.to_str().unwrap(), "full", &["--group-readable"]),
    );
    let sd = shared.join("d0.qcow2");
    assert_eq!(
        (
            mode(&shared),
            mode(&sd),
            mode(&sd.join(&files(&sd)[0])),
            mode(&shared.join("uuid"))
        ),
        (0o750, 0o750, 0o640, 0o640)
    );
}

/// A chain pruned by ours still restores with the original's procedures: they take the files
/// in modification-time order and want the FULL first, which the renamed FULL keeps (it takes
/// the last folded INC's time), and the journals live in dot-folders they do not read.
#[test]
fn a_pruned_chain_still_restores_with_the_originals_tools() {
    let Some(mut s) = BackupVm::one_disk() else {
        return;
    };
    s.vm.write(D0.io, 0x61, 0, 2 * MIB);
    s.backup("full", &[]);
    for i in 1..=3u8 {
        s.vm.write(D0.io, 0x61 + i, i as u64 * MIB, MIB);
        s.backup("inc", &[]);
    }
    s.capture(&[&D0], "last");
    let expected = s.captured(&D0, "last");
    qmprestore_ok(&["prune", "--dir", s.dd.to_str().unwrap(), "--keep-last", "2"]);
    let names = s.files();
    assert_eq!(names.len(), 2, "{names:?}");
    std::fs::create_dir(s.dir.join("orig-restore")).unwrap();
    let merged = s.dir.join("orig-restore/restored.qcow2");
    original_restores(&s, "merge", "orig-merge", Some(&merged));
    assert_same(&merged, &expected);
    let c = original_restores(&s, "commit", "orig-commit", None);
    assert_same(&c.join(&names[0]), &expected);
}
