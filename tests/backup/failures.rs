use crate::common;
use crate::common::backup_vm::*;
use crate::common::qemu::{log_of, Stop, Vm};
use serde_json::json;
use std::path::Path;
use std::process::Child;

/// Nothing of a failed run is left: no partial file, d0 still has `files` backup files, and
/// QEMU holds no node, job or bitmap of ours.
fn assert_nothing_left(s: &mut BackupVm, files: usize) {
    assert!(partials(&s.dd).is_empty());
    assert_eq!(s.files().len(), files);
    assert_graph_clean(&mut s.vm);
}

/// An incremental whose job is cancelled by someone else, or interrupted by SIGTERM, fails
/// (the original took a foreign cancel for success and had cleared the bitmap when the job
/// started); nothing of it stays, and the next incremental still holds the whole delta.
#[test]
fn a_failed_or_interrupted_incremental_keeps_its_delta() {
    let Some(mut s) = BackupVm::one_disk() else {
        return;
    };
    s.vm.write(D0.io, 0x11, 0, 2 * MIB);
    s.backup("full", &[]);
    s.vm.write(D0.io, 0x22, 8 * MIB, 8 * MIB);
    s.capture(&[&D0], "exp");

    // Cancelled from outside.
    let child = s.slow_inc();
    let job = wait_for_job(&mut s.vm);
    let jobs = s.vm.exec("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["speed"], 1048576, "--speed-limit reaches the job");
    s.vm.exec("block-job-cancel", json!({"device": job, "force": true}));
    let log = assert_exit(child, 1);
    assert!(log.contains("cancelled by someone else"), "{log}");
    assert_nothing_left(&mut s, 1);

    // Interrupted by SIGTERM.
    let child = s.slow_inc();
    wait_for_job(&mut s.vm);
    terminate(&child);
    assert_exit(child, 130);
    assert_nothing_left(&mut s, 1);

    s.backup("inc", &[]);
    assert_eq!(s.files().len(), 2);
    s.assert_restores(&D0, None, "exp");
    assert_graph_clean(&mut s.vm);
}

/// `auto` in an empty directory takes a full; then incrementals; after QEMU was killed (the
/// persistent bitmap is left inconsistent) it falls back to a full and says why. Also: QEMU
/// killed in the middle of a backup.
#[test]
fn auto_starts_chains_and_recovers_after_qemu_crashes() {
    let Some(mut s) = BackupVm::one_disk() else {
        return;
    };
    s.vm.write(D0.io, 0x11, 0, MIB);
    let log = s.backup("auto", &[]);
    assert!(
        log.contains("no chain in the target directory yet"),
        "{log}"
    );
    s.vm.write(D0.io, 0x12, MIB, MIB);
    s.backup("auto", &[]);
    let names = s.files();
    assert!(
        names[0].starts_with("FULL-") && names[1].starts_with("INC-"),
        "{names:?}"
    );

    // A clean restart keeps the persistent bitmap: the chain continues.
    s.vm.restart(Stop::Quit);
    s.vm.write(D0.io, 0x15, 5 * MIB, MIB);
    let log = s.backup("auto", &[]);
    assert!(!log.contains("taking a full backup"), "{log}");
    assert!(s.files()[2].starts_with("INC-"));

    // QEMU dies; the restarted one finds the stored bitmap inconsistent.
    s.vm.write(D0.io, 0x13, 2 * MIB, MIB);
    s.vm.io(D0.io, "flush");
    s.vm.restart(Stop::Kill);
    let o = s.try_backup("inc", &[]);
    assert_eq!(o.status.code(), Some(1));
    let log = log_of(&o);
    assert!(log.contains("inconsistent"), "{log}");
    let log = s.backup("auto", &[]);
    assert!(log.contains("inconsistent"), "{log}");
    let names = s.files();
    assert!(names[3].starts_with("FULL-"), "{names:?}");
    s.capture(&[&D0], "a");
    s.assert_restores(&D0, None, "a");

    // QEMU killed during a backup: the run fails; the next auto (new QEMU) takes a full.
    s.vm.write(D0.io, 0x14, 3 * MIB, 8 * MIB);
    let child = s.spawn_backup("auto", &["--speed-limit", "1048576"]);
    wait_for_job(&mut s.vm);
    s.vm.stop(Stop::Kill);
    assert_exit(child, 1);
    s.vm.start_again();
    let log = s.backup("auto", &[]);
    assert!(log.contains("taking a full backup"), "{log}");
    assert!(partials(&s.dd).is_empty());
    s.capture(&[&D0], "b");
    s.assert_restores(&D0, None, "b");
    assert_graph_clean(&mut s.vm);
}

/// Stale partial files: any partial file in a disk's folder (another tool's interrupted run,
/// whose bitmap may have been cleared) makes `inc` refuse in the original's words, leaving it
/// there, while `auto` sets it aside and starts a new full chain; one of our own
/// run killed with SIGKILL (QEMU still holding its nodes and job) is cleaned up — job, nodes,
/// temporary bitmap, files — and the chain continues. The original's stale partial blocked
/// every later incremental, even after a new full.
#[test]
fn stale_partials_and_a_killed_run_are_recovered() {
    let Some(mut s) = BackupVm::one_disk() else {
        return;
    };
    s.vm.write(D0.io, 0x61, 0, MIB);
    s.backup("full", &[]);
    // Any partial file in the disk's folder, whatever its name (the original's own test
    // plants this one), blocks an incremental, and the restore commands refuse the folder:
    // one rule for both tools. Nothing is moved by the refused run.
    std::fs::write(s.dd.join("FULL-bar.partial"), b"").unwrap();
    s.vm.write(D0.io, 0x60, 2 * MIB, MIB);
    let refused = format!(
        "Partial backup found in [{}], possible broken backup chain. Execute new full backup",
        s.dd.display()
    );
    let assert_inc_refused = |s: &BackupVm| {
        let o = s.try_backup("inc", &[]);
        assert_eq!(o.status.code(), Some(1), "{}", log_of(&o));
        assert!(log_of(&o).contains(&refused), "{}", log_of(&o));
    };
    assert_inc_refused(&s);
    assert!(s.dd.join("FULL-bar.partial").exists());
    assert_eq!(s.files().len(), 1, "no INC written");
    let rebase = common::qmprestore(&["rebase", "--dry-run", "--dir", s.dd.to_str().unwrap()]);
    assert_eq!(rebase.status.code(), Some(1));
    // auto takes a full backup, says why, and sets the file aside.
    let log = s.backup("auto", &[]);
    assert!(
        log.contains("partial backup FULL-bar.partial found")
            && log.contains("taking a full backup")
            && log.contains("Auto backup mode set to: full"),
        "{log}"
    );
    assert!(s.dd.join(".quarantine/FULL-bar.partial").exists());
    s.vm.write(D0.io, 0x64, 3 * MIB, MIB);
    let log = s.backup("auto", &[]);
    assert!(log.contains("Auto backup mode set to: inc"), "{log}");
    // One named like ours, dated after the FULL: the same.
    let full_epoch = epoch(&s.files()[1]).unwrap();
    let planted = format!("INC-{}-d0.qcow2.partial", full_epoch + 1);
    std::fs::write(s.dd.join(&planted), b"left by another tool").unwrap();
    assert_inc_refused(&s);
    let log = s.backup("auto", &[]);
    assert!(
        log.contains(&format!("partial backup {planted} found"))
            && log.contains("taking a full backup"),
        "{log}"
    );
    assert!(s.dd.join(".quarantine").join(&planted).exists());
    s.vm.write(D0.io, 0x62, MIB, MIB);
    s.backup("inc", &[]);

    // Our own run, killed while its job runs.
    s.vm.write(D0.io, 0x63, 4 * MIB, 8 * MIB);
    let mut child = s.slow_inc();
    wait_for_job(&mut s.vm);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(partials(&s.dd).len(), 1);
    let log = s.backup("inc", &[]);
    assert!(log.contains("interrupted run"), "{log}");
    assert!(partials(&s.dd).is_empty());
    assert_graph_clean(&mut s.vm);
    s.capture(&[&D0], "k");
    s.assert_restores(&D0, None, "k");
    let names = s.files();
    assert_eq!(
        names.iter().filter(|n| n.starts_with("FULL-")).count(),
        3,
        "{names:?}"
    );
    let epochs: Vec<u64> = names.iter().map(|n| epoch(n).unwrap()).collect();
    assert!(
        epochs.windows(2).all(|w| w[0] < w[1]),
        "runs within one second get distinct names: {names:?}"
    );
}

/// Two disks of one base name, in folders `a/` and `c/`, with names no job id may contain,
/// and two more block nodes (`other`, `scratch`) for a foreign job.
fn two_disks_of_one_name_vm(dir: &Path) -> Vm {
    let disks = [
        "a/1 disk+x.qcow2",
        "c/1 disk+x.qcow2",
        "other.qcow2",
        "scratch.qcow2",
    ];
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    for f in disks {
        std::fs::create_dir_all(dir.join(f).parent().unwrap()).unwrap();
        common::qemu_img(dir, &["create", "-q", "-f", "qcow2", f, "64M"]);
    }
    let mut args = Vec::new();
    for (id, f) in [("a", disks[0]), ("b", disks[1])] {
        args.extend([
            "-drive".into(),
            format!(
                "if=none,id=d{id},file={},format=qcow2,node-name=n{id}",
                p(f)
            ),
            "-device".into(),
            format!("virtio-blk-pci,drive=d{id},id=vd{id}"),
        ]);
    }
    for node in ["other", "scratch"] {
        args.extend([
            "-blockdev".into(),
            format!(
                "driver=qcow2,node-name={node},file.driver=file,file.filename={}",
                p(&format!("{node}.qcow2"))
            ),
        ]);
    }
    Vm::start(dir, &args)
}

/// A backup of both disks of [`two_disks_of_one_name_vm`], in the background at `speed`.
fn spawn_both(s: &BackupVm, level: &str, speed: &str) -> Child {
    s.spawn_backup(level, &["-i", "da,db", "--speed-limit", speed])
}

/// Two disks: cancelling one job fails the whole run and QEMU cancels the other (grouped
/// completion); a foreign job that finishes during our backup does not end our wait early
/// (the original counted every job's events); SIGTERM with a foreign job running ends
/// promptly. Disks with equal base names and names no job id may contain get distinct files.
#[test]
fn jobs_are_grouped_and_foreign_jobs_ignored() {
    let Some(mut s) = BackupVm::new(two_disks_of_one_name_vm) else {
        return;
    };
    s.vm.write("da", 0x71, 0, 8 * MIB);
    s.vm.write("db", 0x72, 0, 8 * MIB);
    let child = spawn_both(&s, "full", "2097152");
    let job = wait_for_job(&mut s.vm);
    s.vm.exec("block-job-cancel", json!({"device": job, "force": true}));
    let log = assert_exit(child, 1);
    assert!(
        log.contains("da") && log.contains("db"),
        "both jobs ended as failures: {log}"
    );
    assert_graph_clean(&mut s.vm);
    let da = s.target.join("da-1 disk+x.qcow2");
    assert!(!da.exists() || files(&da).is_empty());

    // A foreign job completes while ours run.
    s.vm.write("-d vda/virtio-backend", 0x73, 0, 64 << 10);
    let child = spawn_both(&s, "full", "2097152");
    wait_for_job(&mut s.vm);
    s.vm.exec(
        "blockdev-backup",
        json!({"job-id": "foreign", "device": "other", "target": "scratch", "sync": "full"}),
    );
    assert_exit(child, 0);
    for (node_dir, dev, file) in [
        ("da-1 disk+x.qcow2", "da", "a/1 disk+x.qcow2"),
        ("db-1 disk+x.qcow2", "db", "c/1 disk+x.qcow2"),
    ] {
        let exp = s.dir.join(format!("{dev}.raw"));
        s.vm.capture(dev, file, "qcow2", &exp);
        assert_restores(&s.target.join(node_dir), None, &exp);
    }

    // SIGTERM while a foreign job runs: ours are cancelled, the foreign one is left alone.
    s.vm.exec("blockdev-backup", json!({"job-id": "foreign2", "device": "other", "target": "scratch", "sync": "full", "speed": 1024}));
    s.vm.write("da", 0x74, 0, 8 * MIB);
    let child = spawn_both(&s, "inc", "1048576");
    wait_for_jobs(&mut s.vm, 2);
    let started = std::time::Instant::now();
    terminate(&child);
    assert_exit(child, 130);
    assert!(started.elapsed().as_secs() < 10);
    let jobs = s.vm.exec("query-block-jobs", json!({}));
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
    assert_eq!(jobs[0]["device"], "foreign2");
}
