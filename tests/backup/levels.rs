use crate::common::backup_vm::*;
use crate::common::qemu::{backup_ok, log_of, qmpbackup, Stop, Vm};
use crate::common::{self, assert_same, json_of, qmprestore_ok};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Full, writes, inc, writes, inc on six kinds of disk; every restore point of every disk
/// restores to exactly the disk at that backup, also after rebase, commit or snapshotrebase;
/// the chains verify, and a flipped byte is found.
#[test]
fn full_inc_inc_restores_every_point_of_every_disk() {
    let Some(mut s) = BackupVm::all_disks() else {
        return;
    };
    let disks = [&D0, &S0, &L0, &R0, &DF, &VARS];
    for (i, d) in disks.iter().enumerate() {
        s.vm.write(d.io, 0x10 + i as u8, 0, 64 << 10);
        if d.file != "vars.fd" {
            s.vm.write(d.io, 0x20 + i as u8, 60 * MIB, MIB);
        }
    }
    s.backup("full", &["--include-raw"]);
    s.capture(&disks, "0");
    for (i, d) in disks.iter().enumerate() {
        s.vm.write(d.io, 0x30 + i as u8, 4096, 8192);
        s.vm.io(d.io, "write -z 60M 64k");
    }
    s.backup("inc", &["--include-raw"]);
    s.capture(&disks, "1");
    for (i, d) in disks.iter().enumerate() {
        s.vm.write(d.io, 0x40 + i as u8, 32 << 10, 64 << 10);
    }
    s.backup("inc", &["--include-raw"]);
    s.capture(&disks, "2");

    for d in &disks {
        let names = files(&s.target.join(d.file));
        assert_eq!(names.len(), 3, "{}: {names:?}", d.file);
        for (i, name) in names.iter().enumerate() {
            s.assert_restores(d, Some(name), &i.to_string());
        }
    }
    assert!(s.target.join("uuid").exists());
    assert!(!s.target.join(".fleece").exists(), "fleece files removed");
    s.vm.stop(Stop::Quit);

    // rebase, commit and snapshotrebase of a copy of each qcow2 chain (the raw ones have a raw
    // FULL: merge restores those).
    for d in [&D0, &S0, &L0, &DF] {
        in_place_commands_restore_the_chain(&s, d);
    }

    // The chains verify, manifests included; a flipped byte is found with file and offset.
    let verify = |dir: &Path| {
        common::qmprestore(&[
            "verify",
            "--recursive",
            "--json",
            "--dir",
            dir.to_str().unwrap(),
        ])
    };
    let o = verify(&s.target);
    let report = json_of(&o);
    assert_eq!(o.status.code(), Some(0), "{report}");
    assert_eq!(
        report["dirs"].as_array().unwrap().len(),
        7,
        "six disks and the read-only pflash code"
    );
    let inc = s.dd.join(&s.files()[1]);
    let len = std::fs::metadata(&inc).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&inc).unwrap();
    use std::os::unix::fs::FileExt;
    let at = len - 100;
    let mut b = [0u8];
    std::fs::File::open(&inc)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    let o = verify(&s.dd);
    let report = json_of(&o);
    assert_eq!(o.status.code(), Some(1), "{report}");
    let problems = report["dirs"][0]["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p["file"] == s.files()[1].as_str() && p["offset"] == 0),
        "{report}"
    );
}

/// rebase, commit and snapshotrebase of copies of `d`'s chain of three (with its manifests)
/// restore each point captured as `0`, `1`, `2`; they rewrite the manifests of the files they
/// change, drop those of the files they delete, and the result verifies (every byte of the
/// changed files against their new manifests).
fn in_place_commands_restore_the_chain(s: &BackupVm, d: &Disk) {
    let expect = |i: usize| s.captured(d, &i.to_string());
    let chain = s.target.join(d.file);
    let names = files(&chain);
    let copy = |tag: &str| -> PathBuf {
        let c = s.dir.join(format!("{}.{tag}", d.file));
        std::fs::create_dir_all(c.join(".manifest")).unwrap();
        for n in &names {
            std::fs::copy(chain.join(n), c.join(n)).unwrap();
            let m = format!(".manifest/{n}.json");
            std::fs::copy(chain.join(&m), c.join(&m)).unwrap();
        }
        c
    };
    for (i, name) in names.iter().enumerate().skip(1) {
        let c = copy(&format!("rebase{i}"));
        qmprestore_ok(&["rebase", "--until", name, "--dir", c.to_str().unwrap()]);
        assert_same(&c.join("image"), &expect(i));
        assert_eq!(
            common::manifest_names(&c).len(),
            3,
            "the manifests of the INCs rebase linked are rewritten"
        );
        common::assert_verifies(&c);
    }
    for command in ["commit", "snapshotrebase"] {
        let c = copy(command);
        qmprestore_ok(&[command, "--dir", c.to_str().unwrap()]);
        let full = c.join(&names[0]);
        assert_same(&full, &expect(2));
        common::assert_check_clean(&full);
        assert_eq!(
            common::manifest_names(&c),
            [format!("{}.json", names[0])],
            "the FULL's manifest is rewritten, the folded INCs' go"
        );
        common::assert_verifies(&c);
    }
    let full = s
        .dir
        .join(format!("{}.snapshotrebase", d.file))
        .join(&names[0]);
    let snaps = [
        "FULL-BACKUP".to_string(),
        qmpbackup::chain::snapshot_rebase::snapshot_name(epoch(&names[1]).unwrap()),
        qmpbackup::chain::snapshot_rebase::snapshot_name(epoch(&names[2]).unwrap()),
    ];
    for (i, snap) in snaps.iter().enumerate() {
        let out = s.dir.join(format!("{}.snap{i}.raw", d.file));
        common::run(
            Command::new("qemu-img")
                .args(["convert", "-O", "raw", "-l"])
                .arg(format!("snapshot.name={snap}"))
                .arg(&full)
                .arg(&out),
        );
        assert_same(&out, &expect(i));
    }
}

/// Guest writes injected right before and right after the fleecing switch (through a QMP
/// proxy that acts between the tool's commands): each lands in exactly one backup, the one
/// its time says. The original lost the write after the switch of a full backup (neither in
/// the snapshot nor in the new bitmap), and of an incremental backup (dirty bit cleared with
/// the old data backed up) or failed with EACCES (clean cluster outside the filter's bitmap).
#[test]
fn writes_at_the_snapshot_point_land_in_exactly_one_backup() {
    let Some(mut s) = BackupVm::one_disk() else {
        return;
    };
    s.vm.write(D0.io, 0x11, 0, 4 * MIB);
    let mut helper = s.vm.third();
    let (mut run, mut after_switch) = (0, false);
    let (d, fleece) = (s.dir.clone(), s.target.join(".fleece"));
    let sock = s.proxy(move |line| {
        let mut w = |p: u8, off: u64| {
            common::qemu::hmp_io(&mut helper, D0.io, &format!("write -P 0x{p:02x} {off} 64k"))
        };
        if after_switch {
            after_switch = false;
            match run {
                1 => w(0x62, MIB),
                2 => {
                    w(0x64, MIB); // dirty since the last backup
                    w(0x65, 3 * MIB); // clean
                }
                _ => {}
            }
        }
        if is_switch(line) {
            match run {
                0 => w(0x61, 0),
                1 => w(0x63, 2 * MIB),
                _ => {}
            }
            let fleece: Vec<_> = std::fs::read_dir(&fleece).unwrap().collect();
            assert_eq!(
                fleece.len(),
                1,
                "the fleece image is in the target, not next to the disk"
            );
            common::qemu::hmp_io(&mut helper, D0.io, "flush");
            common::run(
                Command::new("qemu-img")
                    .args(["convert", "-U", "-O", "raw", "d0.qcow2"])
                    .arg(format!("exp{run}.raw"))
                    .current_dir(&d),
            );
            run += 1;
            after_switch = true;
        }
    });
    for level in ["full", "inc", "inc"] {
        backup_ok(&sock, &backup_args(s.tgt(), level, &[]));
    }
    let names = s.files();
    assert_eq!(names.len(), 3);
    for (i, name) in names.iter().enumerate() {
        assert_restores(&s.dd, Some(name), &s.dir.join(format!("exp{i}.raw")));
    }
}

/// copy (outside the chain: no uuid, no bitmap), --monthly, --compress, --no-subdir,
/// --no-timestamp twice (the symlink is replaced; the original failed), include/exclude, and
/// the manifest beside each file.
#[test]
fn copy_monthly_compressed_and_flat_backups_hold_the_selected_disks() {
    let Some(mut s) = BackupVm::all_disks() else {
        return;
    };
    s.vm.write(D0.io, 0x31, 0, 2 * MIB);
    s.vm.write(S0.io, 0x32, MIB, MIB);
    s.capture(&[&D0, &S0], "c");
    let d0_now = s.captured(&D0, "c");

    let copy = s.dir.join("copy");
    let logfile = s.dir.join("logs/sub/qmpbackup.log");
    let options: Vec<&str> = "-i disk0,disks --remove-delay 1 --blockdev-aio threads"
        .split(' ')
        .collect();
    let mut args = vec!["-L", logfile.to_str().unwrap()];
    args.extend(backup_args(copy.to_str().unwrap(), "copy", &options));
    backup_ok(&s.vm.socket(), &args);
    let logged = std::fs::read_to_string(&logfile).unwrap();
    assert!(
        logged.contains("Qemu version: [10.") && logged.contains("VM is in state: [prelaunch]"),
        "{logged}"
    );
    assert!(!copy.join("uuid").exists(), "copy starts no chain");
    let mut dirs: Vec<String> = std::fs::read_dir(&copy)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    dirs.sort();
    assert_eq!(dirs, ["d0.qcow2", "s0.qcow2"]);
    let c = files(&copy.join("d0.qcow2"));
    assert!(c[0].starts_with("COPY-"));
    assert_same(&copy.join("d0.qcow2").join(&c[0]), &d0_now);
    let bitmaps = json_of(&qmpbackup(
        &s.vm.socket(),
        &["info", "--show", "bitmaps", "--json"],
    ));
    assert!(
        bitmaps
            .as_object()
            .unwrap()
            .values()
            .all(|v| v.as_array().is_none_or(|a| a.is_empty())),
        "{bitmaps}"
    );

    // Monthly + compressed, excluding everything but d0 and s0.
    let m = s.dir.join("monthly");
    let excluded = "pflash0,pflash1,diskl,diskd";
    s.backup_into(&m, "auto", &["--monthly", "--compress", "-e", excluded]);
    let months: Vec<_> = std::fs::read_dir(&m).unwrap().flatten().collect();
    assert_eq!(months.len(), 1);
    let month = months[0].file_name().to_string_lossy().into_owned();
    assert!(month.len() == 7 && month.as_bytes()[4] == b'-', "{month}");
    let md = months[0].path().join("d0.qcow2");
    let f = files(&md);
    let map = common::run(
        Command::new("qemu-img")
            .args(["map", "--output=json"])
            .arg(md.join(&f[0])),
    );
    assert!(map.contains("\"compressed\": true"), "{map}");
    assert_same(&md.join(&f[0]), &d0_now);
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(md.join(".manifest").join(format!("{}.json", f[0]))).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["level"], "full");
    assert_eq!(manifest["device"], "disk0");
    assert_eq!(manifest["virtual_size"], 64 * MIB);
    assert_eq!(
        manifest["uuid"].as_str().unwrap(),
        std::fs::read_to_string(months[0].path().join("uuid")).unwrap()
    );
    assert!(months[0].path().join("d0.qcow2.config").exists());

    // Flat, no timestamp, twice.
    let flat = s.dir.join("flat");
    for _ in 0..2 {
        let flat_d0 = ["--no-subdir", "--no-timestamp", "-i", "disk0"];
        s.backup_into(&flat, "full", &flat_d0);
    }
    assert_eq!(
        std::fs::read_link(flat.join("FULL-d0.qcow2")).unwrap(),
        Path::new("d0.qcow2")
    );
    assert_same(&flat.join("d0.qcow2"), &d0_now);

    // include and exclude together are refused as the original refuses them (exit 1, its
    // words), before anything is created.
    let both = ["-i", "disk0", "-e", "disks"];
    let o = qmpbackup(&s.vm.socket(), &backup_args("x", "full", &both));
    assert_eq!(o.status.code(), Some(1));
    assert!(log_of(&o).contains("Specify either included or excluded devices"));
    assert!(!Path::new("x").exists());
}

/// Raw disks, pflash and qcow2 v2: bitmaps can only be non-persistent, so after a QEMU restart `auto`
/// takes a full of exactly those disks (and says why) while qcow2 disks continue with
/// incrementals; `--compress` works for raw disks on every level (their INCs are qcow2). Each
/// disk's target gets its own source's options (the original accumulated them across disks).
/// The log names QEMU's version in the right order. Fleece images live in the target, never
/// next to the VM's disks.
#[test]
fn raw_disks_get_a_full_after_a_restart_and_each_disk_keeps_its_options() {
    let Some(mut s) = BackupVm::new(|dir| {
        common::qemu_img_create(
            dir,
            "-f qcow2 -o cluster_size=4096,compat=0.10 d0.qcow2 64M",
        );
        common::qemu_img_create(
            dir,
            "-f qcow2 -o cluster_size=131072,lazy_refcounts=on s0.qcow2 64M",
        );
        common::qemu_img_create(dir, "-f raw r0.raw 64M");
        create_pflash(dir);
        Vm::start(dir, &all_disks_args(dir, &[&D0, &S0, &R0]))
    }) else {
        return;
    };
    let before: Vec<_> = std::fs::read_dir(&s.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let disks = [&D0, &S0, &R0, &VARS];
    for (i, d) in disks.iter().enumerate() {
        s.vm.write(d.io, 0x80 + i as u8, 0, 32 << 10);
    }
    let raw_compressed = ["--include-raw", "--compress"];
    let log = s.backup("auto", &raw_compressed);
    let version = common::run(Command::new("qemu-img").arg("--version"));
    let version = version.split_whitespace().nth(2).unwrap();
    assert!(
        log.contains(&format!("Qemu version: [{version}] ")),
        "{log}"
    );
    let nth = |d: &str, i: usize| s.target.join(d).join(&files(&s.target.join(d))[i]);
    let i0 = qemu_info(&nth("d0.qcow2", 0));
    assert_eq!(
        (
            i0["cluster-size"].as_u64(),
            i0["format-specific"]["data"]["compat"].as_str()
        ),
        (Some(4096), Some("0.10"))
    );
    let i1 = qemu_info(&nth("s0.qcow2", 0));
    assert_eq!(
        (
            i1["cluster-size"].as_u64(),
            i1["format-specific"]["data"]["lazy-refcounts"].as_bool()
        ),
        (Some(131072), Some(true))
    );
    assert_eq!(qemu_info(&nth("r0.raw", 0))["format"], "raw");
    for (i, d) in disks.iter().enumerate() {
        s.vm.write(d.io, 0x90 + i as u8, 8 << 10, 64 << 10);
    }
    s.backup("inc", &raw_compressed);
    assert_eq!(qemu_info(&nth("r0.raw", 1))["format"], "qcow2");
    let after: Vec<_> = std::fs::read_dir(&s.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        before.len() + 1,
        after.len(),
        "only the target directory was added next to the disks"
    );

    // Restart: the qcow2 bitmaps persist, the raw ones are gone.
    s.vm.restart(Stop::Quit);
    for (i, d) in disks.iter().enumerate() {
        s.vm.write(d.io, 0xa0 + i as u8, 128 << 10, 64 << 10);
    }
    let log = s.backup("auto", &raw_compressed);
    assert!(log.contains("cannot be persistent"), "{log}");
    // d0 is qcow2 v2 (compat 0.10): no persistent bitmaps either.
    for (d, level) in [
        ("d0.qcow2", "FULL-"),
        ("s0.qcow2", "INC-"),
        ("r0.raw", "FULL-"),
        ("vars.fd", "FULL-"),
        ("code.fd", "FULL-"),
    ] {
        let names = files(&s.target.join(d));
        assert!(names.last().unwrap().starts_with(level), "{d}: {names:?}");
    }
    s.capture(&disks, "z");
    for d in disks {
        s.assert_restores(d, None, "z");
    }
}

/// prune on a chain a real QEMU made: the two newest points stay (the FULL renamed after the
/// older of them) and restore as before, the chain verifies, and the next incremental backup
/// builds on the pruned chain, with `--prune` keeping it at two points.
#[test]
fn prune_keeps_the_newest_points_and_the_next_inc_builds_on_them() {
    let Some(mut s) = BackupVm::one_disk() else {
        return;
    };
    s.vm.write(D0.io, 0x10, 0, 2 * MIB);
    s.backup("full", &[]);
    s.capture(&[&D0], "0");
    for i in 1..=4u8 {
        s.vm.write(D0.io, 0x10 + i, i as u64 * MIB, MIB);
        s.vm.io(D0.io, &format!("write -z {}M 64k", 8 + i));
        s.backup("inc", &[]);
        s.capture(&[&D0], &i.to_string());
    }
    let names = s.files();
    assert_eq!(names.len(), 5, "{names:?}");
    let dd = s.dd.to_str().unwrap().to_string();
    qmprestore_ok(&["prune", "--dir", &dd, "--keep-last", "2"]);
    let full = |inc: &str| format!("FULL-{}-{}", epoch(inc).unwrap(), D0.file);
    assert_eq!(s.files(), [full(&names[3]), names[4].clone()]);
    s.assert_restores(&D0, Some(&full(&names[3])), "3");
    s.assert_restores(&D0, None, "4");
    common::assert_verifies(&s.dd);

    s.vm.write(D0.io, 0x55, 6 * MIB, MIB);
    let log = s.backup("inc", &["--prune", "keep-last=2"]);
    assert!(log.contains("Prune: "), "{log}");
    s.capture(&[&D0], "5");
    let now = s.files();
    assert_eq!(now.len(), 2, "{now:?}");
    assert_eq!(now[0], full(&names[4]));
    s.assert_restores(&D0, Some(&now[0]), "4");
    s.assert_restores(&D0, None, "5");
    common::assert_verifies(&s.dd);
    s.vm.stop(Stop::Quit);
}
