//! qmpbackup against a real QEMU 10 (prelaunch and running, no guest OS): every backup is
//! restored with qmprestore and compared with qemu-img against the disk as it was at the
//! backup instant.

mod common;

use common::needs_qemu;

use common::assert_same;
use common::qemu::{backup_ok, log_of, qmpbackup, Vm};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

const MIB: u64 = 1 << 20;

/// One disk of the test VM: how QEMU attaches it and how the test reaches it.
struct Disk {
    /// Device name in the backup layout (the image's base name).
    file: &'static str,
    fmt: &'static str,
    /// How qemu-io reaches the device: `-d <qdev>` or a legacy drive name.
    io: &'static str,
}

const fn disk(file: &'static str, fmt: &'static str, io: &'static str) -> Disk {
    Disk { file, fmt, io }
}

const D0: Disk = disk("d0.qcow2", "qcow2", "-d vd0/virtio-backend");
const S0: Disk = disk("s0.qcow2", "qcow2", "-d sd0");
const L0: Disk = disk("l0.qcow2", "qcow2", "drive-l");
const R0: Disk = disk("r0.raw", "raw", "-d vd2/virtio-backend");
const DF: Disk = disk("df.qcow2", "qcow2", "-d vd3/virtio-backend");
const VARS: Disk = disk("vars.fd", "raw", "pflash1");

/// Creates the images and starts a VM with: a -blockdev qcow2 on virtio-blk, one on scsi-hd,
/// a legacy -drive, a raw disk, a qcow2 with a raw data file, and pflash code + vars.
fn vm_all(dir: &Path) -> Vm {
    for f in ["d0.qcow2", "s0.qcow2", "l0.qcow2"] {
        common::qemu_img_create(dir, &format!("-f qcow2 {f} 64M"));
    }
    common::qemu_img_create(dir, "-f raw r0.raw 64M");
    common::qemu_img_create(
        dir,
        "-f qcow2 -o data_file=df.raw,data_file_raw=on df.qcow2 64M",
    );
    for f in ["code.fd", "vars.fd"] {
        std::fs::File::create(dir.join(f))
            .unwrap()
            .set_len(64 << 10)
            .unwrap();
    }
    Vm::start(dir, &all_args(dir))
}

fn all_args(dir: &Path) -> Vec<String> {
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    [
        "-drive".into(),
        format!("if=pflash,format=raw,file={},readonly=on", p("code.fd")),
        "-drive".into(),
        format!("if=pflash,format=raw,file={}", p("vars.fd")),
        "-blockdev".into(),
        format!("driver=file,filename={},node-name=file0", p("d0.qcow2")),
        "-blockdev".into(),
        "driver=qcow2,file=file0,node-name=disk0".into(),
        "-device".into(),
        "virtio-blk-pci,drive=disk0,id=vd0".into(),
        "-blockdev".into(),
        format!(
            "driver=qcow2,node-name=disks,file.driver=file,file.filename={}",
            p("s0.qcow2")
        ),
        "-device".into(),
        "virtio-scsi-pci,id=scsi0".into(),
        "-device".into(),
        "scsi-hd,drive=disks,bus=scsi0.0,id=sd0".into(),
        "-drive".into(),
        format!(
            "if=none,id=drive-l,file={},format=qcow2,node-name=diskl",
            p("l0.qcow2")
        ),
        "-device".into(),
        "virtio-blk-pci,drive=drive-l,id=vd1".into(),
        "-blockdev".into(),
        format!(
            "driver=raw,node-name=diskr,file.driver=file,file.filename={}",
            p("r0.raw")
        ),
        "-device".into(),
        "virtio-blk-pci,drive=diskr,id=vd2".into(),
        "-blockdev".into(),
        format!(
            "driver=qcow2,node-name=diskd,file.driver=file,file.filename={}",
            p("df.qcow2")
        ),
        "-device".into(),
        "virtio-blk-pci,drive=diskd,id=vd3".into(),
    ]
    .to_vec()
}

/// Captures every disk's current contents as `<file>.<tag>.raw`.
fn capture(vm: &mut Vm, disks: &[&Disk], tag: &str) {
    for d in disks {
        let out = vm.dir.join(format!("{}.{tag}.raw", d.file));
        vm.capture(d.io, d.file, d.fmt, &out);
    }
}

fn restore(args: &[&str]) -> String {
    common::run(Command::new(env!("CARGO_BIN_EXE_qmprestore")).args(args))
}

/// Merges the chain in `disk_dir` (up to `until`) and asserts it equals `expected`.
fn assert_restores(disk_dir: &Path, until: Option<&str>, expected: &Path) {
    let out = expected.with_extension("restored.qcow2");
    restore_merge(disk_dir, until, &out);
    assert_same(&out, expected);
}

fn restore_merge(disk_dir: &Path, until: Option<&str>, out: &Path) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qmprestore"));
    cmd.args(["merge", "--force", "--dir"])
        .arg(disk_dir)
        .arg("--targetfile")
        .arg(out);
    if let Some(u) = until {
        cmd.args(["--until", u]);
    }
    common::run(&mut cmd);
}

/// The backup files of a disk directory, oldest first.
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("FULL-") || n.starts_with("INC-") || n.starts_with("COPY-"))
        .filter(|n| !n.ends_with(".partial"))
        .collect();
    v.sort_by_key(|n| n.split('-').nth(1).and_then(|e| e.parse::<u64>().ok()));
    v
}

/// Full, writes, inc, writes, inc on six kinds of disk; every restore point of every disk
/// restores to exactly the disk at that backup.
#[test]
fn full_inc_inc_restores_every_point_of_every_disk() {
    let Some(Setup {
        _t,
        dir,
        mut vm,
        target,
        dd,
    }) = Setup::new(vm_all)
    else {
        return;
    };
    let disks = [&D0, &S0, &L0, &R0, &DF, &VARS];
    for (i, d) in disks.iter().enumerate() {
        vm.write(d.io, 0x10 + i as u8, 0, 64 << 10);
        if d.file != "vars.fd" {
            vm.write(d.io, 0x20 + i as u8, 60 * MIB, MIB);
        }
    }
    let tgt = target.to_str().unwrap();
    backup_ok(
        &vm.socket(),
        &["backup", "-l", "full", "-t", tgt, "--include-raw"],
    );
    capture(&mut vm, &disks, "0");
    for (i, d) in disks.iter().enumerate() {
        vm.write(d.io, 0x30 + i as u8, 4096, 8192);
        vm.io(d.io, "write -z 60M 64k");
    }
    backup_ok(
        &vm.socket(),
        &["backup", "-l", "inc", "-t", tgt, "--include-raw"],
    );
    capture(&mut vm, &disks, "1");
    for (i, d) in disks.iter().enumerate() {
        vm.write(d.io, 0x40 + i as u8, 32 << 10, 64 << 10);
    }
    backup_ok(
        &vm.socket(),
        &["backup", "-l", "inc", "-t", tgt, "--include-raw"],
    );
    capture(&mut vm, &disks, "2");

    for d in &disks {
        let dd = target.join(d.file);
        let names = files(&dd);
        assert_eq!(names.len(), 3, "{}: {names:?}", d.file);
        for (i, name) in names.iter().enumerate() {
            assert_restores(&dd, Some(name), &dir.join(format!("{}.{i}.raw", d.file)));
        }
    }
    assert!(target.join("uuid").exists());
    assert!(!target.join(".fleece").exists(), "fleece files removed");
    vm.quit();

    // rebase, commit and snapshotrebase of a copy of each qcow2 chain (the raw ones have a raw
    // FULL: merge restores those).
    for d in [&D0, &S0, &L0, &DF] {
        let expect = |i: usize| dir.join(format!("{}.{i}.raw", d.file));
        let names = files(&target.join(d.file));
        // With the manifests: the commands drop those of the files they change or delete,
        // and the result verifies.
        let copy = |tag: &str| -> PathBuf {
            let c = dir.join(format!("{}.{tag}", d.file));
            std::fs::create_dir_all(c.join(".manifest")).unwrap();
            for n in &names {
                std::fs::copy(target.join(d.file).join(n), c.join(n)).unwrap();
                let m = format!(".manifest/{n}.json");
                std::fs::copy(target.join(d.file).join(&m), c.join(&m)).unwrap();
            }
            c
        };
        for (i, name) in names.iter().enumerate().skip(1) {
            let c = copy(&format!("rebase{i}"));
            restore(&["rebase", "--until", name, "--dir", c.to_str().unwrap()]);
            assert_same(&c.join("image"), &expect(i));
            assert_eq!(
                common::manifest_names(&c).len(),
                3 - i,
                "the manifests of the INCs rebase linked are dropped, the others kept"
            );
            common::assert_verifies(&c);
        }
        let c = copy("commit");
        restore(&["commit", "--dir", c.to_str().unwrap()]);
        assert_same(&c.join(&names[0]), &expect(2));
        common::assert_check_clean(&c.join(&names[0]));
        assert!(
            common::manifest_names(&c).is_empty(),
            "{:?}",
            common::manifest_names(&c)
        );
        common::assert_verifies(&c);
        let c = copy("snaprebase");
        restore(&["snapshotrebase", "--dir", c.to_str().unwrap()]);
        assert!(
            common::manifest_names(&c).is_empty(),
            "{:?}",
            common::manifest_names(&c)
        );
        common::assert_verifies(&c);
        let full = c.join(&names[0]);
        common::assert_check_clean(&full);
        let epoch = |n: &str| n.split('-').nth(1).unwrap().parse::<u64>().unwrap();
        let snaps = [
            "FULL-BACKUP".to_string(),
            qmpbackup::chain::snapshot_rebase::snapshot_name(epoch(&names[1])),
            qmpbackup::chain::snapshot_rebase::snapshot_name(epoch(&names[2])),
        ];
        for (i, snap) in snaps.iter().enumerate() {
            let out = dir.join(format!("{}.snap{i}.raw", d.file));
            common::run(
                Command::new("qemu-img")
                    .args(["convert", "-O", "raw", "-l"])
                    .arg(format!("snapshot.name={snap}"))
                    .arg(&full)
                    .arg(&out),
            );
            assert_same(&out, &expect(i));
        }
        assert_same(&full, &expect(2));
    }

    // The chains verify, manifests included; a flipped byte is found with file and offset.
    let verify = |dir: &Path| {
        Command::new(env!("CARGO_BIN_EXE_qmprestore"))
            .args(["verify", "--recursive", "--json", "--dir"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let o = verify(&target);
    let report = json_of(&o);
    assert_eq!(o.status.code(), Some(0), "{report}");
    assert_eq!(
        report["dirs"].as_array().unwrap().len(),
        7,
        "six disks and the read-only pflash code"
    );
    let inc = dd.join(&files(&dd)[1]);
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
    let o = verify(&dd);
    let report = json_of(&o);
    assert_eq!(o.status.code(), Some(1), "{report}");
    let problems = report["dirs"][0]["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p["file"] == files(&dd)[1].as_str() && p["offset"] == 0),
        "{report}"
    );
}

/// A VM with one qcow2 disk (`d0.qcow2` on virtio-blk `vd0`, node `disk0`).
fn vm_one(dir: &Path) -> Vm {
    common::qemu_img_create(dir, "-f qcow2 d0.qcow2 64M");
    Vm::start(dir, &one_args(dir))
}

fn one_args(dir: &Path) -> Vec<String> {
    all_args(dir)[4..10].to_vec()
}

/// Where most tests start: a temporary folder (`dir`, alive as long as `_t`) with a VM in it,
/// and the backup target `b/` (`target`), whose disk d0 gets the folder `dd`.
struct Setup {
    _t: tempfile::TempDir,
    dir: PathBuf,
    vm: Vm,
    target: PathBuf,
    dd: PathBuf,
}

impl Setup {
    /// The VM `start` makes; `None` where QEMU is missing (a loud skip, a failure in CI).
    fn new(start: fn(&Path) -> Vm) -> Option<Setup> {
        let t = needs_qemu()?;
        let dir = t.path().to_path_buf();
        let vm = start(&dir);
        let target = dir.join("b");
        let dd = target.join("d0.qcow2");
        Some(Setup {
            _t: t,
            dir,
            vm,
            target,
            dd,
        })
    }
}

/// `qmpbackup --socket <socket> <args>` started in the background, its output captured.
fn spawn_backup(socket: &str, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
        .args(["--socket", socket])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// A slow incremental into `tgt` (1 MiB/s): its job runs long enough to be interrupted.
fn slow_inc(socket: &str, tgt: &str) -> std::process::Child {
    spawn_backup(
        socket,
        &["backup", "-l", "inc", "-t", tgt, "--speed-limit", "1048576"],
    )
}

/// Guest writes injected right before and right after the fleecing switch (through a QMP
/// proxy that acts between the tool's commands): each lands in exactly one backup, the one
/// its time says. The original lost the write after the switch of a full backup (neither in
/// the snapshot nor in the new bitmap), and of an incremental backup (dirty bit cleared with
/// the old data backed up) or failed with EACCES (clean cluster outside the filter's bitmap).
#[test]
fn writes_at_the_snapshot_point_land_in_exactly_one_backup() {
    let Some(Setup {
        _t,
        dir,
        mut vm,
        target,
        dd,
    }) = Setup::new(vm_one)
    else {
        return;
    };
    vm.write(D0.io, 0x11, 0, 4 * MIB);
    let mut helper = vm.third();
    let (mut run, mut after_switch) = (0, false);
    let d = dir.clone();
    let _proxy = common::qemu::proxy(dir.join("proxy.sock"), dir.join("qmp.sock"), move |line| {
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
        if line.contains("\"qom-set\"") && line.contains("-cbw") {
            match run {
                0 => w(0x61, 0),
                1 => w(0x63, 2 * MIB),
                _ => {}
            }
            let fleece: Vec<_> = std::fs::read_dir(d.join("b/.fleece")).unwrap().collect();
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
    let sock = dir.join("proxy.sock").to_string_lossy().into_owned();
    let tgt = target.to_str().unwrap();
    for level in ["full", "inc", "inc"] {
        backup_ok(&sock, &["backup", "-l", level, "-t", tgt]);
    }
    let names = files(&dd);
    assert_eq!(names.len(), 3);
    for (i, name) in names.iter().enumerate() {
        assert_restores(&dd, Some(name), &dir.join(format!("exp{i}.raw")));
    }
}

fn json_of(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

/// Waits until QEMU runs a job of ours, then returns its id.
fn wait_for_job(vm: &mut Vm) -> String {
    for _ in 0..200 {
        let jobs = vm.exec("query-block-jobs", json!({}));
        if let Some(id) = jobs
            .as_array()
            .unwrap()
            .iter()
            .find_map(|j| j["device"].as_str())
        {
            return id.to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("no backup job started");
}

/// No node, job or temporary bitmap of ours is left in QEMU.
fn assert_graph_clean(vm: &mut Vm) {
    let nodes = vm.exec("query-named-block-nodes", json!({"flat": true}));
    for n in nodes.as_array().unwrap() {
        let name = n["node-name"].as_str().unwrap_or("");
        assert!(!name.starts_with("qmpbackup-"), "leftover node {name}");
    }
    assert_eq!(vm.exec("query-block-jobs", json!({})), json!([]));
    for d in vm.exec("query-block", json!({})).as_array().unwrap() {
        for b in d["inserted"]["dirty-bitmaps"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert!(
                !b["name"].as_str().unwrap().ends_with("-next"),
                "leftover {b}"
            );
        }
    }
}

fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".partial"))
                .collect()
        })
        .unwrap_or_default()
}

/// An incremental whose job is cancelled by someone else, or interrupted by SIGTERM, fails
/// (the original took a foreign cancel for success and had cleared the bitmap when the job
/// started); nothing of it stays, and the next incremental still holds the whole delta.
#[test]
fn a_failed_or_interrupted_incremental_keeps_its_delta() {
    let Some(Setup {
        _t,
        dir,
        mut vm,
        target,
        dd,
    }) = Setup::new(vm_one)
    else {
        return;
    };
    vm.write(D0.io, 0x11, 0, 2 * MIB);
    let tgt = target.to_str().unwrap();
    backup_ok(&vm.socket(), &["backup", "-l", "full", "-t", tgt]);
    vm.write(D0.io, 0x22, 8 * MIB, 8 * MIB);
    capture(&mut vm, &[&D0], "exp");

    // Cancelled from outside.
    let child = slow_inc(&vm.socket(), tgt);
    let job = wait_for_job(&mut vm);
    let jobs = vm.exec("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["speed"], 1048576, "--speed-limit reaches the job");
    vm.exec("block-job-cancel", json!({"device": job, "force": true}));
    let out = child.wait_with_output().unwrap();
    let log = log_of(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("cancelled by someone else"), "{log}");
    assert!(partials(&dd).is_empty());
    assert_eq!(files(&dd).len(), 1);
    assert_graph_clean(&mut vm);

    // Interrupted by SIGTERM.
    let child = slow_inc(&vm.socket(), tgt);
    wait_for_job(&mut vm);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", log_of(&out));
    assert!(partials(&dd).is_empty());
    assert_eq!(files(&dd).len(), 1);
    assert_graph_clean(&mut vm);

    backup_ok(&vm.socket(), &["backup", "-l", "inc", "-t", tgt]);
    let names = files(&dd);
    assert_eq!(names.len(), 2);
    assert_restores(&dd, None, &dir.join("d0.qcow2.exp.raw"));
    assert_graph_clean(&mut vm);
}

/// `auto` in an empty directory takes a full; then incrementals; after QEMU was killed (the
/// persistent bitmap is left inconsistent) it falls back to a full and says why. Also: QEMU
/// killed in the middle of a backup.
#[test]
fn auto_starts_chains_and_recovers_after_qemu_crashes() {
    let Some(Setup {
        _t,
        dir,
        mut vm,
        target,
        dd,
    }) = Setup::new(vm_one)
    else {
        return;
    };
    let tgt = target.to_str().unwrap();
    vm.write(D0.io, 0x11, 0, MIB);
    let log = backup_ok(&vm.socket(), &["backup", "-l", "auto", "-t", tgt]);
    assert!(
        log.contains("no chain in the target directory yet"),
        "{log}"
    );
    vm.write(D0.io, 0x12, MIB, MIB);
    backup_ok(&vm.socket(), &["backup", "-l", "auto", "-t", tgt]);
    let names = files(&dd);
    assert!(
        names[0].starts_with("FULL-") && names[1].starts_with("INC-"),
        "{names:?}"
    );

    // A clean restart keeps the persistent bitmap: the chain continues.
    let args = vm.args.clone();
    vm.quit();
    let mut vm = Vm::start(&dir, &args);
    vm.write(D0.io, 0x15, 5 * MIB, MIB);
    let log = backup_ok(&vm.socket(), &["backup", "-l", "auto", "-t", tgt]);
    assert!(!log.contains("taking a full backup"), "{log}");
    assert!(files(&dd)[2].starts_with("INC-"));

    // QEMU dies; the restarted one finds the stored bitmap inconsistent.
    vm.write(D0.io, 0x13, 2 * MIB, MIB);
    vm.io(D0.io, "flush");
    vm.kill();
    let mut vm = Vm::start(&dir, &args);
    let o = qmpbackup(&vm.socket(), &["backup", "-l", "inc", "-t", tgt]);
    assert_eq!(o.status.code(), Some(1));
    let log = log_of(&o);
    assert!(log.contains("inconsistent"), "{log}");
    let log = backup_ok(&vm.socket(), &["backup", "-l", "auto", "-t", tgt]);
    assert!(log.contains("inconsistent"), "{log}");
    let names = files(&dd);
    assert!(names[3].starts_with("FULL-"), "{names:?}");
    capture(&mut vm, &[&D0], "a");
    assert_restores(&dd, None, &dir.join("d0.qcow2.a.raw"));

    // QEMU killed during a backup: the run fails; the next auto (new QEMU) takes a full.
    vm.write(D0.io, 0x14, 3 * MIB, 8 * MIB);
    let child = spawn_backup(
        &vm.socket(),
        &[
            "backup",
            "-l",
            "auto",
            "-t",
            tgt,
            "--speed-limit",
            "1048576",
        ],
    );
    wait_for_job(&mut vm);
    let args = vm.args.clone();
    vm.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", log_of(&out));
    let mut vm = Vm::start(&dir, &args);
    let log = backup_ok(&vm.socket(), &["backup", "-l", "auto", "-t", tgt]);
    assert!(log.contains("taking a full backup"), "{log}");
    assert!(partials(&dd).is_empty());
    capture(&mut vm, &[&D0], "b");
    assert_restores(&dd, None, &dir.join("d0.qcow2.b.raw"));
    assert_graph_clean(&mut vm);
}

/// copy (outside the chain: no uuid, no bitmap), --monthly, --compress, --no-subdir,
/// --no-timestamp twice (the symlink is replaced; the original failed), include/exclude, and
/// the manifest beside each file.
#[test]
fn copy_monthly_compress_flat_and_selection() {
    let Some(Setup {
        _t, dir, mut vm, ..
    }) = Setup::new(vm_all)
    else {
        return;
    };
    vm.write(D0.io, 0x31, 0, 2 * MIB);
    vm.write(S0.io, 0x32, MIB, MIB);
    capture(&mut vm, &[&D0, &S0], "c");

    let copy = dir.join("copy");
    let logfile = dir.join("logs/sub/qmpbackup.log");
    let o = Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
        .args(["--socket", &vm.socket(), "-L", logfile.to_str().unwrap()])
        .args([
            "backup",
            "-l",
            "copy",
            "-t",
            copy.to_str().unwrap(),
            "-i",
            "disk0,disks",
        ])
        .args(["--remove-delay", "1", "--blockdev-aio", "threads"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", log_of(&o));
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
    assert_same(
        &copy.join("d0.qcow2").join(&c[0]),
        &dir.join("d0.qcow2.c.raw"),
    );
    let bitmaps = json_of(&qmpbackup(
        &vm.socket(),
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
    let m = dir.join("monthly");
    backup_ok(
        &vm.socket(),
        &[
            "backup",
            "-l",
            "auto",
            "--monthly",
            "--compress",
            "-t",
            m.to_str().unwrap(),
            "-e",
            "pflash0,pflash1,diskl,diskd",
        ],
    );
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
    assert_same(&md.join(&f[0]), &dir.join("d0.qcow2.c.raw"));
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
    let flat = dir.join("flat");
    for _ in 0..2 {
        backup_ok(
            &vm.socket(),
            &[
                "backup",
                "-l",
                "full",
                "--no-subdir",
                "--no-timestamp",
                "-t",
                flat.to_str().unwrap(),
                "-i",
                "disk0",
            ],
        );
    }
    assert_eq!(
        std::fs::read_link(flat.join("FULL-d0.qcow2")).unwrap(),
        Path::new("d0.qcow2")
    );
    assert_same(&flat.join("d0.qcow2"), &dir.join("d0.qcow2.c.raw"));

    // include and exclude together are refused as the original refuses them (exit 1, its
    // words), before anything is created.
    let o = qmpbackup(
        &vm.socket(),
        &[
            "backup", "-l", "full", "-t", "x", "-i", "disk0", "-e", "disks",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(log_of(&o).contains("Specify either included or excluded devices"));
    assert!(!Path::new("x").exists());
}

/// Node names up to QEMU's 31 characters, a TCP socket over IPv4 and IPv6, and a target
/// that cannot be written.
#[test]
fn long_node_names_tcp_sockets_and_unwritable_targets() {
    let Some(t) = needs_qemu() else { return };
    let dir = t.path();
    common::qemu_img_create(dir, "-f qcow2 long.qcow2 16M");
    let node = "drive-virtio-disk0-long-name-31";
    assert_eq!(node.len(), 31);
    let port4 = free_port("127.0.0.1:0");
    let port6 = free_port("[::1]:0");
    let mut vm = Vm::start(
        dir,
        &[
            "-blockdev".into(),
            format!(
                "driver=qcow2,node-name={node},file.driver=file,file.filename={}",
                dir.join("long.qcow2").display()
            ),
            "-device".into(),
            format!("virtio-blk-pci,drive={node},id=vd0"),
            "-qmp".into(),
            format!("tcp:127.0.0.1:{port4},server=on,wait=off"),
            "-chardev".into(),
            format!("socket,id=qmp6,host=::1,port={port6},server=on,wait=off,ipv6=on"),
            "-mon".into(),
            "chardev=qmp6,mode=control".into(),
        ],
    );
    vm.write("-d vd0/virtio-backend", 0x44, 0, MIB);
    let target = dir.join("b");
    let tgt = target.to_str().unwrap();
    // Direct I/O for the target (the original's --blockdev-disable-cache did nothing): the
    // target node asks QEMU for cache.direct, the fleece node does not.
    let log = backup_ok(
        &format!("tcp:127.0.0.1:{port4}"),
        &[
            "--debug",
            "backup",
            "-l",
            "full",
            "--blockdev-disable-cache",
            "-t",
            tgt,
        ],
    );
    let adds: Vec<&str> = log.lines().filter(|l| l.contains("blockdev-add")).collect();
    let direct = |kind: &str| {
        adds.iter()
            .filter(|l| l.contains(kind))
            .all(|l| l.contains(r#""cache":{"direct":true}"#))
    };
    assert!(
        adds.iter().any(|l| l.contains(".partial")) && direct(".partial") && !direct("fleece"),
        "{adds:#?}"
    );
    vm.write("-d vd0/virtio-backend", 0x45, MIB, MIB);
    // A relative target, from a working directory that is not QEMU's: QEMU must be given
    // absolute file names (it resolves relative ones against its own directory).
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
        .args(["--socket", &format!("tcp:[::1]:{port6}")])
        .args(["backup", "-l", "inc", "-t", "../b"])
        .current_dir(&elsewhere)
        .output()
        .unwrap();
    assert!(o.status.success(), "relative target: {}", log_of(&o));
    vm.io("-d vd0/virtio-backend", "flush");
    common::run(
        Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw", "long.qcow2", "long.raw"])
            .current_dir(dir),
    );
    assert_restores(&target.join("long.qcow2"), None, &dir.join("long.raw"));

    // A socket that already serves a client (ours, qmp2) never greets: a clear timeout.
    let busy = dir.join("qmp2.sock").to_string_lossy().into_owned();
    let o = Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
        .args([
            "--socket",
            &busy,
            "--connect-timeout",
            "1",
            "info",
            "--show",
            "blockdev",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(log_of(&o).contains("another client"), "{}", log_of(&o));

    // A target below a regular file cannot be created: clear error, VM untouched.
    std::fs::write(dir.join("file"), b"").unwrap();
    let o = qmpbackup(
        &vm.socket(),
        &[
            "backup",
            "-l",
            "full",
            "-t",
            dir.join("file/sub").to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let log = log_of(&o);
    assert!(
        log.contains("file/sub") && log.contains("Not a directory"),
        "{log}"
    );
    assert_graph_clean(&mut vm);
}

fn free_port(bind: &str) -> u16 {
    std::net::TcpListener::bind(bind)
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A guest agent for tests: answers sync, ping, info and the freeze commands, logs freezes
/// and thaws into `log`, and starts every connection with a stale reply that a client
/// without `guest-sync-delimited` would take for an answer.
fn fake_agent(path: PathBuf, log: Arc<Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut out = conn.try_clone().unwrap();
            out.write_all(b"{\"return\": 424242}\n").unwrap();
            let mut frozen = false;
            let mut reader = BufReader::new(conn);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                let text: Vec<u8> = line.drain(..).filter(|&b| b != 0xff).collect();
                let Ok(req) = serde_json::from_slice::<serde_json::Value>(&text) else {
                    continue;
                };
                let reply = match req["execute"].as_str().unwrap_or("") {
                    "guest-sync-delimited" => {
                        out.write_all(&[0xff]).unwrap();
                        json!({"return": req["arguments"]["id"]})
                    }
                    "guest-ping" => json!({"return": {}}),
                    "guest-info" => json!({"return": {"version": "10.0", "supported_commands": [
                        {"name": "guest-fsfreeze-freeze", "enabled": true},
                        {"name": "guest-fsfreeze-thaw", "enabled": true}]}}),
                    "guest-fsfreeze-status" => {
                        json!({"return": if frozen { "frozen" } else { "thawed" }})
                    }
                    "guest-fsfreeze-freeze" => {
                        frozen = true;
                        log.lock().unwrap().push("freeze".into());
                        json!({"return": 2})
                    }
                    "guest-fsfreeze-thaw" => {
                        frozen = false;
                        log.lock().unwrap().push("thaw".into());
                        json!({"return": 2})
                    }
                    other => json!({"error": {"class": "CommandNotFound", "desc": other}}),
                };
                out.write_all(format!("{reply}\n").as_bytes()).unwrap();
            }
        }
    });
}

/// A running VM is stopped only around the snapshot point and runs on; --pause keeps it
/// paused for the whole backup; a prelaunch or paused VM stays as it was, --pause or not
/// (the original started it). --quiesce freezes the guest before the switch and thaws it
/// after, through guest-sync-delimited.
#[test]
fn vm_state_pause_and_quiesce() {
    let Some(Setup {
        _t, dir, mut vm, ..
    }) = Setup::new(vm_one)
    else {
        return;
    };
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    fake_agent(dir.join("qga.sock"), log.clone());
    let mut helper = vm.third();
    let l = log.clone();
    let _proxy = common::qemu::proxy(dir.join("proxy.sock"), dir.join("qmp.sock"), move |line| {
        if line.contains("\"qom-set\"") && line.contains("-cbw") {
            let st = helper.execute("query-status", json!({})).unwrap();
            l.lock()
                .unwrap()
                .push(format!("switch:{}", st["status"].as_str().unwrap()));
        }
        if line.contains("\"blockdev-backup\"") {
            let st = helper.execute("query-status", json!({})).unwrap();
            l.lock()
                .unwrap()
                .push(format!("jobs:{}", st["status"].as_str().unwrap()));
        }
    });
    let sock = dir.join("proxy.sock").to_string_lossy().into_owned();
    let tgt = dir.join("b").to_string_lossy().into_owned();
    let agent = dir.join("qga.sock").to_string_lossy().into_owned();
    let case = |vm: &mut Vm, extra: &[&str]| -> Vec<String> {
        log.lock().unwrap().clear();
        let mut args = vec!["--agent-socket", &agent, "backup", "-l", "auto", "-t", &tgt];
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
            .arg("--socket")
            .arg(&sock)
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", log_of(&o));
        let mut events = log.lock().unwrap().clone();
        events.push(format!("after:{}", vm.status()));
        events
    };
    assert_eq!(
        case(&mut vm, &[]),
        ["switch:prelaunch", "jobs:prelaunch", "after:prelaunch"]
    );
    assert_eq!(
        case(&mut vm, &["--pause"]),
        ["switch:prelaunch", "jobs:prelaunch", "after:prelaunch"]
    );
    assert_eq!(
        case(&mut vm, &["--quiesce"]),
        [
            "freeze",
            "switch:prelaunch",
            "jobs:prelaunch",
            "thaw",
            "after:prelaunch"
        ]
    );
    vm.exec("cont", json!({}));
    assert_eq!(
        case(&mut vm, &[]),
        ["switch:paused", "jobs:paused", "after:running"]
    );
    assert_eq!(
        case(&mut vm, &["--quiesce"]),
        [
            "freeze",
            "switch:paused",
            "jobs:paused",
            "thaw",
            "after:running"
        ]
    );
    assert_eq!(
        case(&mut vm, &["--pause", "--quiesce"]),
        ["switch:paused", "jobs:paused", "after:running"]
    );
    // Data written while the VM runs is backed up and restores exactly.
    vm.write(D0.io, 0x5a, 3 * MIB, 2 * MIB);
    assert_eq!(
        case(&mut vm, &[]),
        ["switch:paused", "jobs:paused", "after:running"]
    );
    capture(&mut vm, &[&D0], "run");
    vm.exec("stop", json!({}));
    assert_eq!(
        case(&mut vm, &["--pause"]),
        ["switch:paused", "jobs:paused", "after:paused"]
    );
    let dd = dir.join("b").join("d0.qcow2");
    let names = files(&dd);
    assert_eq!(names.len(), 8);
    assert_restores(&dd, Some(&names[6]), &dir.join("d0.qcow2.run.raw"));
}

/// info and cleanup; a chain started by the original (FULL without manifest, bitmap named as
/// its versions 0.56-0.62 did) continues with our incrementals.
#[test]
fn info_cleanup_and_continuing_the_originals_chain() {
    let Some(Setup {
        _t,
        dir,
        mut vm,
        target,
        dd,
    }) = Setup::new(vm_one)
    else {
        return;
    };
    vm.write(D0.io, 0x51, 0, MIB);
    // The original's FULL of this state, and its bitmap.
    std::fs::create_dir_all(&dd).unwrap();
    std::fs::write(target.join("uuid"), "0f0e0d0c-orig").unwrap();
    vm.exec(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "qmpbackup-disk0-0f0e0d0c-orig", "persistent": true}),
    );
    vm.io(D0.io, "flush");
    common::run(
        Command::new("qemu-img")
            .args(["convert", "-U", "-O", "qcow2", "d0.qcow2"])
            .arg(dd.join("FULL-1000000000-d0.qcow2"))
            .current_dir(&dir),
    );
    vm.write(D0.io, 0x52, 4 * MIB, MIB);
    let tgt = target.to_str().unwrap();
    backup_ok(
        &vm.socket(),
        &["backup", "-l", "inc", "-t", tgt, "--link-incs"],
    );
    capture(&mut vm, &[&D0], "x");
    assert_restores(&dd, None, &dir.join("d0.qcow2.x.raw"));
    let names = files(&dd);
    let info = common::run(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(dd.join(&names[1])),
    );
    assert!(
        info.contains("\"backing-filename\": \"FULL-1000000000-d0.qcow2\""),
        "{info}"
    );

    let bitmaps = json_of(&qmpbackup(
        &vm.socket(),
        &["info", "--show", "bitmaps", "--json"],
    ));
    assert_eq!(bitmaps["disk0"][0]["name"], "qmpbackup-disk0-0f0e0d0c-orig");
    let human = common::succeeded(qmpbackup(
        &vm.socket(),
        &["info", "--show", "blockdev", "--human"],
    ));
    assert!(human.contains("disk0: node disk0, qcow2"), "{human}");
    let blockdev = json_of(&qmpbackup(
        &vm.socket(),
        &["info", "--show", "blockdev", "--json"],
    ));
    assert_eq!(blockdev[0]["inserted"]["node-name"], "disk0");

    // The original's forms on standard output, as its own test script greps them.
    let bitmaps = common::succeeded(qmpbackup(&vm.socket(), &["info", "--show", "bitmaps"]));
    assert!(
        bitmaps.contains("INFO - ")
            && bitmaps.contains(&format!("disk0 [{}]:", dir.join("d0.qcow2").display())),
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
    let blockdev = common::succeeded(qmpbackup(&vm.socket(), &["info", "--show", "blockdev"]));
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
        "filename": dir.join("d0.qcow2").to_str().unwrap(),
        "format": "qcow2",
        "has_bitmap": true,
        "node": "disk0",
        "node_safe": "disk0",
        "path": dir.to_str().unwrap(),
        "qdev": "/machine/peripheral/vd0/virtio-backend",
        "virtual_size": 64 * MIB,
    });
    assert_eq!(record, expected, "{blockdev}");

    let none = common::succeeded(qmpbackup(
        &vm.socket(),
        &["cleanup", "--remove-bitmaps", "--uuid", "other"],
    ));
    assert!(
        none.contains("Removing bitmaps matching uuid [other]")
            && !none.contains("Removing bitmap:"),
        "{none}"
    );
    let removed = common::succeeded(qmpbackup(
        &vm.socket(),
        &["cleanup", "--remove-bitmap", "--uuid", "0f0e0d0c-orig"],
    ));
    assert!(
        removed.contains("Removing bitmap: qmpbackup-disk0-0f0e0d0c-orig"),
        "{removed}"
    );
    let log = backup_ok(&vm.socket(), &["backup", "-l", "auto", "-t", tgt]);
    assert!(log.contains("is missing"), "{log}");
    assert_eq!(
        qmpbackup(&vm.socket(), &["cleanup"]).status.code(),
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

/// Stale partial files: any partial file in a disk's folder (another tool's interrupted run,
/// whose bitmap may have been cleared) makes `inc` refuse in the original's words, leaving it
/// there, while `auto` sets it aside and starts a new full chain; one of our own
/// run killed with SIGKILL (QEMU still holding its nodes and job) is cleaned up — job, nodes,
/// temporary bitmap, files — and the chain continues. The original's stale partial blocked
/// every later incremental, even after a new full.
#[test]
fn stale_partials_and_a_killed_run_are_recovered() {
    let Some(Setup {
        _t,
        dir,
        mut vm,
        target,
        dd,
    }) = Setup::new(vm_one)
    else {
        return;
    };
    let tgt = target.to_str().unwrap();
    vm.write(D0.io, 0x61, 0, MIB);
    backup_ok(&vm.socket(), &["backup", "-l", "full", "-t", tgt]);
    // Any partial file in the disk's folder, whatever its name (the original's own test
    // plants this one), blocks an incremental, and the restore commands refuse the folder:
    // one rule for both tools. Nothing is moved by the refused run.
    std::fs::write(dd.join("FULL-bar.partial"), b"").unwrap();
    vm.write(D0.io, 0x60, 2 * MIB, MIB);
    let o = qmpbackup(&vm.socket(), &["backup", "-l", "inc", "-t", tgt]);
    assert_eq!(o.status.code(), Some(1), "{}", log_of(&o));
    let refused = format!(
        "Partial backup found in [{}], possible broken backup chain. Execute new full backup",
        dd.display()
    );
    assert!(log_of(&o).contains(&refused), "{}", log_of(&o));
    assert!(dd.join("FULL-bar.partial").exists());
    assert_eq!(files(&dd).len(), 1, "no INC written");
    let rebase = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .args(["rebase", "--dry-run", "--dir"])
        .arg(&dd)
        .output()
        .unwrap();
    assert_eq!(rebase.status.code(), Some(1));
    // auto takes a full backup, says why, and sets the file aside.
    let log = backup_ok(&vm.socket(), &["backup", "-l", "auto", "-t", tgt]);
    assert!(
        log.contains("partial backup FULL-bar.partial found")
            && log.contains("taking a full backup")
            && log.contains("Auto backup mode set to: full"),
        "{log}"
    );
    assert!(dd.join(".quarantine/FULL-bar.partial").exists());
    vm.write(D0.io, 0x64, 3 * MIB, MIB);
    let log = backup_ok(&vm.socket(), &["backup", "-l", "auto", "-t", tgt]);
    assert!(log.contains("Auto backup mode set to: inc"), "{log}");
    // One named like ours, dated after the FULL: the same.
    let full_epoch: u64 = files(&dd)[1].split('-').nth(1).unwrap().parse().unwrap();
    let planted = format!("INC-{}-d0.qcow2.partial", full_epoch + 1);
    std::fs::write(dd.join(&planted), b"left by another tool").unwrap();
    let o = qmpbackup(&vm.socket(), &["backup", "-l", "inc", "-t", tgt]);
    assert_eq!(o.status.code(), Some(1));
    assert!(log_of(&o).contains(&refused), "{}", log_of(&o));
    let log = backup_ok(&vm.socket(), &["backup", "-l", "auto", "-t", tgt]);
    assert!(
        log.contains(&format!("partial backup {planted} found"))
            && log.contains("taking a full backup"),
        "{log}"
    );
    assert!(dd.join(".quarantine").join(&planted).exists());
    vm.write(D0.io, 0x62, MIB, MIB);
    backup_ok(&vm.socket(), &["backup", "-l", "inc", "-t", tgt]);

    // Our own run, killed while its job runs.
    vm.write(D0.io, 0x63, 4 * MIB, 8 * MIB);
    let mut child = slow_inc(&vm.socket(), tgt);
    wait_for_job(&mut vm);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(partials(&dd).len(), 1);
    let log = backup_ok(&vm.socket(), &["backup", "-l", "inc", "-t", tgt]);
    assert!(log.contains("interrupted run"), "{log}");
    assert!(partials(&dd).is_empty());
    assert_graph_clean(&mut vm);
    capture(&mut vm, &[&D0], "k");
    assert_restores(&dd, None, &dir.join("d0.qcow2.k.raw"));
    let names = files(&dd);
    assert_eq!(
        names.iter().filter(|n| n.starts_with("FULL-")).count(),
        3,
        "{names:?}"
    );
    let epochs: Vec<u64> = names
        .iter()
        .map(|n| n.split('-').nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(
        epochs.windows(2).all(|w| w[0] < w[1]),
        "runs within one second get distinct names: {names:?}"
    );
}

/// Two disks: cancelling one job fails the whole run and QEMU cancels the other (grouped
/// completion); a foreign job that finishes during our backup does not end our wait early
/// (the original counted every job's events); SIGTERM with a foreign job running ends
/// promptly. Disks with equal base names and names no job id may contain get distinct files.
#[test]
fn jobs_are_grouped_and_foreign_jobs_ignored() {
    let Some(t) = needs_qemu() else { return };
    let dir = t.path();
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::create_dir_all(dir.join("b")).unwrap();
    for f in [
        "a/1 disk+x.qcow2",
        "b/1 disk+x.qcow2",
        "other.qcow2",
        "scratch.qcow2",
    ] {
        common::qemu_img(dir, &["create", "-q", "-f", "qcow2", f, "64M"]);
    }
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let mut vm = Vm::start(
        dir,
        &[
            "-drive".into(),
            format!(
                "if=none,id=da,file={},format=qcow2,node-name=na",
                p("a/1 disk+x.qcow2")
            ),
            "-device".into(),
            "virtio-blk-pci,drive=da,id=vda".into(),
            "-drive".into(),
            format!(
                "if=none,id=db,file={},format=qcow2,node-name=nb",
                p("b/1 disk+x.qcow2")
            ),
            "-device".into(),
            "virtio-blk-pci,drive=db,id=vdb".into(),
            "-blockdev".into(),
            format!(
                "driver=qcow2,node-name=other,file.driver=file,file.filename={}",
                p("other.qcow2")
            ),
            "-blockdev".into(),
            format!(
                "driver=qcow2,node-name=scratch,file.driver=file,file.filename={}",
                p("scratch.qcow2")
            ),
        ],
    );
    vm.write("da", 0x71, 0, 8 * MIB);
    vm.write("db", 0x72, 0, 8 * MIB);
    let target = dir.join("t");
    let tgt = target.to_str().unwrap();
    let sock = vm.socket();
    let spawn = || {
        spawn_backup(
            &sock,
            &[
                "backup",
                "-l",
                "full",
                "-t",
                tgt,
                "-i",
                "da,db",
                "--speed-limit",
                "2097152",
            ],
        )
    };
    let child = spawn();
    let job = wait_for_job(&mut vm);
    vm.exec("block-job-cancel", json!({"device": job, "force": true}));
    let out = child.wait_with_output().unwrap();
    let log = log_of(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("da") && log.contains("db"),
        "both jobs ended as failures: {log}"
    );
    assert_graph_clean(&mut vm);
    assert!(
        !target.join("da-1 disk+x.qcow2").exists()
            || files(&target.join("da-1 disk+x.qcow2")).is_empty()
    );

    // A foreign job completes while ours run.
    vm.write("-d vda/virtio-backend", 0x73, 0, 64 << 10);
    let child = spawn();
    wait_for_job(&mut vm);
    vm.exec(
        "blockdev-backup",
        json!({"job-id": "foreign", "device": "other", "target": "scratch", "sync": "full"}),
    );
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", log_of(&out));
    for (node_dir, dev, file) in [
        ("da-1 disk+x.qcow2", "da", "a/1 disk+x.qcow2"),
        ("db-1 disk+x.qcow2", "db", "b/1 disk+x.qcow2"),
    ] {
        let exp = dir.join(format!("{dev}.raw"));
        vm.capture(dev, file, "qcow2", &exp);
        restore_merge(
            &target.join(node_dir),
            None,
            &dir.join(format!("{dev}.restored")),
        );
        assert_same(&dir.join(format!("{dev}.restored")), &exp);
    }

    // SIGTERM while a foreign job runs: ours are cancelled, the foreign one is left alone.
    vm.exec("blockdev-backup", json!({"job-id": "foreign2", "device": "other", "target": "scratch", "sync": "full", "speed": 1024}));
    vm.write("da", 0x74, 0, 8 * MIB);
    let child = spawn_backup(
        &vm.socket(),
        &[
            "backup",
            "-l",
            "inc",
            "-t",
            tgt,
            "-i",
            "da,db",
            "--speed-limit",
            "1048576",
        ],
    );
    for _ in 0..200 {
        let jobs = vm.exec("query-block-jobs", json!({}));
        if jobs.as_array().unwrap().len() >= 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let started = std::time::Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", log_of(&out));
    assert!(started.elapsed().as_secs() < 10);
    let jobs = vm.exec("query-block-jobs", json!({}));
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
    assert_eq!(jobs[0]["device"], "foreign2");
}

/// Raw disks, pflash and qcow2 v2: bitmaps can only be non-persistent, so after a QEMU restart `auto`
/// takes a full of exactly those disks (and says why) while qcow2 disks continue with
/// incrementals; `--compress` works for raw disks on every level (their INCs are qcow2). Each
/// disk's target gets its own source's options (the original accumulated them across disks).
/// The log names QEMU's version in the right order. Fleece images live in the target, never
/// next to the VM's disks.
#[test]
fn raw_disks_after_restart_compress_and_per_disk_options() {
    let Some(t) = needs_qemu() else { return };
    let dir = t.path();
    common::qemu_img_create(
        dir,
        "-f qcow2 -o cluster_size=4096,compat=0.10 d0.qcow2 64M",
    );
    common::qemu_img_create(
        dir,
        "-f qcow2 -o cluster_size=131072,lazy_refcounts=on s0.qcow2 64M",
    );
    common::qemu_img_create(dir, "-f raw r0.raw 64M");
    for f in ["code.fd", "vars.fd"] {
        std::fs::File::create(dir.join(f))
            .unwrap()
            .set_len(64 << 10)
            .unwrap();
    }
    let all = all_args(dir);
    let args: Vec<String> = all[..16].iter().chain(&all[20..24]).cloned().collect();
    let mut vm = Vm::start(dir, &args);
    let before: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let disks = [&D0, &S0, &R0, &VARS];
    for (i, d) in disks.iter().enumerate() {
        vm.write(d.io, 0x80 + i as u8, 0, 32 << 10);
    }
    let target = dir.join("b");
    let tgt = target.to_str().unwrap();
    let log = backup_ok(
        &vm.socket(),
        &[
            "backup",
            "-l",
            "auto",
            "-t",
            tgt,
            "--include-raw",
            "--compress",
        ],
    );
    let version = common::run(Command::new("qemu-img").arg("--version"));
    let version = version.split_whitespace().nth(2).unwrap();
    assert!(
        log.contains(&format!("Qemu version: [{version}] ")),
        "{log}"
    );
    let info = |f: &Path| -> serde_json::Value {
        serde_json::from_str(&common::run(
            Command::new("qemu-img")
                .args(["info", "--output=json"])
                .arg(f),
        ))
        .unwrap()
    };
    let full = |d: &str| target.join(d).join(&files(&target.join(d))[0]);
    let i0 = info(&full("d0.qcow2"));
    assert_eq!(
        (
            i0["cluster-size"].as_u64(),
            i0["format-specific"]["data"]["compat"].as_str()
        ),
        (Some(4096), Some("0.10"))
    );
    let i1 = info(&full("s0.qcow2"));
    assert_eq!(
        (
            i1["cluster-size"].as_u64(),
            i1["format-specific"]["data"]["lazy-refcounts"].as_bool()
        ),
        (Some(131072), Some(true))
    );
    assert_eq!(info(&full("r0.raw"))["format"], "raw");
    for (i, d) in disks.iter().enumerate() {
        vm.write(d.io, 0x90 + i as u8, 8 << 10, 64 << 10);
    }
    backup_ok(
        &vm.socket(),
        &[
            "backup",
            "-l",
            "inc",
            "-t",
            tgt,
            "--include-raw",
            "--compress",
        ],
    );
    let inc_r0 = target
        .join("r0.raw")
        .join(&files(&target.join("r0.raw"))[1]);
    assert_eq!(info(&inc_r0)["format"], "qcow2");
    let after: Vec<_> = std::fs::read_dir(dir)
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
    let args = vm.args.clone();
    vm.quit();
    let mut vm = Vm::start(dir, &args);
    for (i, d) in disks.iter().enumerate() {
        vm.write(d.io, 0xa0 + i as u8, 128 << 10, 64 << 10);
    }
    let log = backup_ok(
        &vm.socket(),
        &[
            "backup",
            "-l",
            "auto",
            "-t",
            tgt,
            "--include-raw",
            "--compress",
        ],
    );
    assert!(log.contains("cannot be persistent"), "{log}");
    // d0 is qcow2 v2 (compat 0.10): no persistent bitmaps either.
    for (d, level) in [
        ("d0.qcow2", "FULL-"),
        ("s0.qcow2", "INC-"),
        ("r0.raw", "FULL-"),
        ("vars.fd", "FULL-"),
        ("code.fd", "FULL-"),
    ] {
        let names = files(&target.join(d));
        assert!(names.last().unwrap().starts_with(level), "{d}: {names:?}");
    }
    capture(&mut vm, &disks, "z");
    for d in disks {
        assert_restores(
            &target.join(d.file),
            None,
            &dir.join(format!("{}.z.raw", d.file)),
        );
    }
}

/// A guest agent that never answers the freeze: the backup goes on unfrozen after the
/// timeout, and the thaw is sent anyway (the original could leave the guest frozen).
#[test]
fn a_freeze_that_times_out_is_thawed() {
    use qmpbackup::qmp::{Address, Agent};
    use std::io::{BufRead, BufReader, Write};
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("qga.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let l = log.clone();
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut out = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text: Vec<u8> = line.drain(..).filter(|&b| b != 0xff).collect();
            let req: serde_json::Value = serde_json::from_slice(&text).unwrap();
            let cmd = req["execute"].as_str().unwrap().to_string();
            l.lock().unwrap().push(cmd.clone());
            let reply = match cmd.as_str() {
                "guest-sync-delimited" => {
                    out.write_all(&[0xff]).unwrap();
                    json!({"return": req["arguments"]["id"]})
                }
                "guest-fsfreeze-freeze" => continue, // hangs
                _ => json!({"return": 0}),
            };
            out.write_all(format!("{reply}\n").as_bytes()).unwrap();
        }
    });
    let mut agent =
        Agent::connect(&Address::Unix(path), std::time::Duration::from_secs(2)).unwrap();
    let started = std::time::Instant::now();
    let err = agent
        .freeze(std::time::Duration::from_millis(300))
        .unwrap_err();
    assert!(err.to_string().contains("guest-fsfreeze-freeze"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    let calls = log.lock().unwrap().clone();
    assert_eq!(
        calls,
        [
            "guest-sync-delimited",
            "guest-fsfreeze-freeze",
            "guest-sync-delimited",
            "guest-fsfreeze-thaw"
        ]
    );
}

/// Runs the original qmprestore's procedure `mode` (its qemu-img sequence, replayed by
/// `tests/scripts/original-restore.sh`) on `dir`; returns its output, or panics with it.
fn original_restore(mode: &str, dir: &Path, target: Option<&Path>) -> std::process::Output {
    let mut cmd = Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/original-restore.sh"),
    );
    cmd.arg(mode).arg(dir);
    if let Some(t) = target {
        cmd.arg(t);
    }
    cmd.output().unwrap()
}

/// A copy of the backup files of `from` (mtimes kept: the original orders by them).
fn copy_chain(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for n in files(from) {
        common::run(Command::new("cp").arg("-a").arg(from.join(&n)).arg(to));
    }
}

/// Our default INCs are standalone deltas, as the original's: its merge, commit and
/// snapshotrebase (the qemu-img sequences it runs) restore our chains to exactly the disk at
/// the last backup, and so does ours. `--link-incs` chains (which the original's commit cannot
/// restore) and mixed chains restore with ours.
#[test]
fn the_originals_restore_procedures_restore_our_chains() {
    let Some(Setup {
        _t,
        dir,
        mut vm,
        target,
        dd,
    }) = Setup::new(vm_one)
    else {
        return;
    };
    let tgt = target.to_str().unwrap();
    vm.write(D0.io, 0x71, 0, 2 * MIB);
    backup_ok(&vm.socket(), &["backup", "-l", "full", "-t", tgt]);
    vm.write(D0.io, 0x72, MIB, 64 << 10);
    vm.io(D0.io, "write -z 32M 1M");
    backup_ok(&vm.socket(), &["backup", "-l", "inc", "-t", tgt]);
    vm.write(D0.io, 0x73, 40 * MIB, 3 * MIB);
    backup_ok(&vm.socket(), &["backup", "-l", "inc", "-t", tgt]);
    capture(&mut vm, &[&D0], "last");
    let expected = dir.join("d0.qcow2.last.raw");
    let names = files(&dd);
    assert_eq!(names.len(), 3, "{names:?}");
    for inc in &names[1..] {
        let info = common::run(
            Command::new("qemu-img")
                .args(["info", "--output=json"])
                .arg(dd.join(inc)),
        );
        assert!(
            !info.contains("backing-filename"),
            "{inc} is standalone: {info}"
        );
    }

    let merged = dir.join("orig-restore/restored.qcow2");
    std::fs::create_dir(dir.join("orig-restore")).unwrap();
    copy_chain(&dd, &dir.join("orig-merge"));
    let o = original_restore("merge", &dir.join("orig-merge"), Some(&merged));
    assert!(o.status.success(), "{}", log_of(&o));
    assert_same(&merged, &expected);
    let c = dir.join("orig-commit");
    copy_chain(&dd, &c);
    let o = original_restore("commit", &c, None);
    assert!(o.status.success(), "{}", log_of(&o));
    assert_same(&c.join(&names[0]), &expected);
    assert_eq!(files(&c), names[..1]);
    let c = dir.join("orig-snaprebase");
    copy_chain(&dd, &c);
    let o = original_restore("snapshotrebase", &c, None);
    assert!(o.status.success(), "{}", log_of(&o));
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
    assert_restores(&dd, None, &expected);

    // Linked on request: what the original's commit cannot restore (the next INC's backing
    // file is gone once the first is committed and deleted); ours restores it, and mixed.
    vm.write(D0.io, 0x74, 8 * MIB, MIB);
    backup_ok(
        &vm.socket(),
        &["backup", "-l", "inc", "-t", tgt, "--link-incs"],
    );
    vm.write(D0.io, 0x75, 9 * MIB, MIB);
    backup_ok(
        &vm.socket(),
        &["backup", "-l", "inc", "-t", tgt, "--link-incs"],
    );
    capture(&mut vm, &[&D0], "linked");
    let expected = dir.join("d0.qcow2.linked.raw");
    let names = files(&dd);
    let info = common::run(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(dd.join(&names[4])),
    );
    assert!(
        info.contains(&format!("\"backing-filename\": \"{}\"", names[3])),
        "{info}"
    );
    assert_restores(&dd, None, &expected);
    let c = dir.join("orig-commit-linked");
    copy_chain(&dd, &c);
    assert!(!original_restore("commit", &c, None).status.success());
}

/// Runs qmpbackup under umask 022 (the usual one), so the modes it creates are its own doing.
fn qmpbackup_umask_022(socket: &str, args: &[&str]) -> std::process::Output {
    let o = Command::new("sh")
        .arg("-c")
        .arg("umask 022; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_qmpbackup"))
        .args(["--socket", socket])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{args:?}: {}", log_of(&o));
    o
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
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
    let Some(Setup {
        _t,
        dir,
        mut vm,
        target,
        dd,
    }) = Setup::new(vm_one)
    else {
        return;
    };
    vm.write(D0.io, 0x81, 0, MIB);
    let logfile = dir.join("logs/q.log");
    let args = [
        "-L",
        logfile.to_str().unwrap(),
        "backup",
        "-l",
        "full",
        "-t",
        target.to_str().unwrap(),
    ];
    let o = qmpbackup_umask_022(&vm.socket(), &args);
    let full = dd.join(&files(&dd)[0]);
    for (p, m) in [
        (&target, 0o700),
        (&dd, 0o700),
        (&full, 0o600),
        (&dd.join(".manifest"), 0o700),
        (&target.join("uuid"), 0o600),
        (&target.join("d0.qcow2.config"), 0o600),
    ] {
        assert_eq!(mode(p), m, "{}", p.display());
    }
    for m in common::manifest_names(&dd) {
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
        vm.socket(),
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
            target.join("d0.qcow2.config").display()
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
    let open = dir.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let o = qmpbackup_umask_022(
        &vm.socket(),
        &[
            "--debug",
            "backup",
            "-l",
            "full",
            "-t",
            open.to_str().unwrap(),
        ],
    );
    assert!(String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .unwrap()
        .contains("Version: "));
    assert_eq!((mode(&open), mode(&open.join("d0.qcow2"))), (0o755, 0o700));
    let shared = dir.join("shared");
    qmpbackup_umask_022(
        &vm.socket(),
        &[
            "backup",
            "-l",
            "full",
            "-t",
            shared.to_str().unwrap(),
            "--group-readable",
        ],
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
