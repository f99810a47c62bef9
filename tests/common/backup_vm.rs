//! A VM for backup tests and its backup target: the kinds of disk a backup meets, qmpbackup
//! runs on the VM, the disks' contents captured at a backup's instant, and restores of the
//! target's chains compared with them (qemu-img compare).

use super::qemu::{backup_ok, log_of, one_disk_args, one_disk_vm, qmpbackup, Vm, VD0};
use super::{assert_same, qmprestore_ok};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub const MIB: u64 = 1 << 20;

/// One disk of the test VM: how QEMU attaches it and how the test reaches it.
pub struct Disk {
    /// Device name in the backup layout (the image's base name).
    pub file: &'static str,
    pub fmt: &'static str,
    /// How qemu-io reaches the device: `-d <qdev>` or a legacy drive name.
    pub io: &'static str,
}

const fn disk(file: &'static str, fmt: &'static str, io: &'static str) -> Disk {
    Disk { file, fmt, io }
}

/// The disks of [`all_disks_vm`]; D0 is also [`one_disk_vm`]'s.
pub const D0: Disk = disk("d0.qcow2", "qcow2", VD0);
pub const S0: Disk = disk("s0.qcow2", "qcow2", "-d sd0");
pub const L0: Disk = disk("l0.qcow2", "qcow2", "drive-l");
pub const R0: Disk = disk("r0.raw", "raw", "-d vd2/virtio-backend");
pub const DF: Disk = disk("df.qcow2", "qcow2", "-d vd3/virtio-backend");
pub const VARS: Disk = disk("vars.fd", "raw", "pflash1");

/// Creates the images and starts a VM with: a -blockdev qcow2 on virtio-blk, one on scsi-hd,
/// a legacy -drive, a raw disk, a qcow2 with a raw data file, and pflash code + vars.
pub fn all_disks_vm(dir: &Path) -> Vm {
    for f in ["d0.qcow2", "s0.qcow2", "l0.qcow2"] {
        super::qemu_img_create(dir, &format!("-f qcow2 {f} 64M"));
    }
    super::qemu_img_create(dir, "-f raw r0.raw 64M");
    super::qemu_img_create(
        dir,
        "-f qcow2 -o data_file=df.raw,data_file_raw=on df.qcow2 64M",
    );
    create_pflash(dir);
    Vm::start(dir, &all_disks_args(dir, &[&D0, &S0, &L0, &R0, &DF]))
}

/// Empty 64 KiB pflash images `code.fd` and `vars.fd` in `dir`.
pub fn create_pflash(dir: &Path) {
    for f in ["code.fd", "vars.fd"] {
        std::fs::File::create(dir.join(f))
            .unwrap()
            .set_len(64 << 10)
            .unwrap();
    }
}

/// QEMU's arguments for the pflash pair and `disks` (of D0, S0, L0, R0, DF), whose images
/// are in `dir`.
pub fn all_disks_args(dir: &Path, disks: &[&Disk]) -> Vec<String> {
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let mut args = vec![
        "-drive".into(),
        format!("if=pflash,format=raw,file={},readonly=on", p("code.fd")),
        "-drive".into(),
        format!("if=pflash,format=raw,file={}", p("vars.fd")),
    ];
    for d in disks {
        let attach: Vec<String> = match d.file {
            "d0.qcow2" => one_disk_args(dir),
            "s0.qcow2" => vec![
                "-blockdev".into(),
                format!(
                    "driver=qcow2,node-name=disks,file.driver=file,file.filename={}",
                    p("s0.qcow2")
                ),
                "-device".into(),
                "virtio-scsi-pci,id=scsi0".into(),
                "-device".into(),
                "scsi-hd,drive=disks,bus=scsi0.0,id=sd0".into(),
            ],
            "l0.qcow2" => vec![
                "-drive".into(),
                format!(
                    "if=none,id=drive-l,file={},format=qcow2,node-name=diskl",
                    p("l0.qcow2")
                ),
                "-device".into(),
                "virtio-blk-pci,drive=drive-l,id=vd1".into(),
            ],
            "r0.raw" => vec![
                "-blockdev".into(),
                format!(
                    "driver=raw,node-name=diskr,file.driver=file,file.filename={}",
                    p("r0.raw")
                ),
                "-device".into(),
                "virtio-blk-pci,drive=diskr,id=vd2".into(),
            ],
            "df.qcow2" => vec![
                "-blockdev".into(),
                format!(
                    "driver=qcow2,node-name=diskd,file.driver=file,file.filename={}",
                    p("df.qcow2")
                ),
                "-device".into(),
                "virtio-blk-pci,drive=diskd,id=vd3".into(),
            ],
            other => panic!("no QEMU arguments for {other}"),
        };
        args.extend(attach);
    }
    args
}

/// Where most backup tests start: a temporary folder (`dir`) with a VM in it, and the backup
/// target `dir/b` (`target`), whose disk d0 gets the folder `dd`.
pub struct BackupVm {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub vm: Vm,
    pub target: PathBuf,
    pub dd: PathBuf,
}

impl BackupVm {
    /// The VM `start` makes in a new folder; `None` where QEMU is missing (after the skip, a
    /// failure in CI).
    pub fn new(start: impl FnOnce(&Path) -> Vm) -> Option<BackupVm> {
        let tmp = super::needs_qemu()?;
        let dir = tmp.path().to_path_buf();
        let vm = start(&dir);
        let target = dir.join("b");
        let dd = target.join("d0.qcow2");
        Some(BackupVm {
            _tmp: tmp,
            dir,
            vm,
            target,
            dd,
        })
    }

    /// [`BackupVm::new`] with [`one_disk_vm`].
    pub fn one_disk() -> Option<BackupVm> {
        Self::new(one_disk_vm)
    }

    /// [`BackupVm::new`] with [`all_disks_vm`].
    pub fn all_disks() -> Option<BackupVm> {
        Self::new(all_disks_vm)
    }

    /// The target, as an argument.
    pub fn tgt(&self) -> &str {
        self.target.to_str().unwrap()
    }

    /// `qmpbackup backup -l <level> -t <target> <extra>` on the VM's socket, which must
    /// succeed; returns its log.
    pub fn backup(&self, level: &str, extra: &[&str]) -> String {
        self.backup_into(&self.target, level, extra)
    }

    /// [`BackupVm::backup`] into another target.
    pub fn backup_into(&self, target: &Path, level: &str, extra: &[&str]) -> String {
        backup_ok(
            &self.vm.socket(),
            &backup_args(target.to_str().unwrap(), level, extra),
        )
    }

    /// [`BackupVm::backup`], whatever its outcome.
    pub fn try_backup(&self, level: &str, extra: &[&str]) -> Output {
        qmpbackup(&self.vm.socket(), &backup_args(self.tgt(), level, extra))
    }

    /// [`BackupVm::backup`] started in the background, its output captured.
    pub fn spawn_backup(&self, level: &str, extra: &[&str]) -> Child {
        spawn_backup(&self.vm.socket(), &backup_args(self.tgt(), level, extra))
    }

    /// A slow incremental (1 MiB/s): its job runs long enough to be interrupted.
    pub fn slow_inc(&self) -> Child {
        self.spawn_backup("inc", &["--speed-limit", "1048576"])
    }

    /// Captures each disk's current contents as `<file>.<tag>.raw` ([`BackupVm::captured`]).
    pub fn capture(&mut self, disks: &[&Disk], tag: &str) {
        for d in disks {
            let out = self.captured(d, tag);
            self.vm.capture(d.io, d.file, d.fmt, &out);
        }
    }

    /// Where [`BackupVm::capture`] put `disk`'s contents under `tag`.
    pub fn captured(&self, disk: &Disk, tag: &str) -> PathBuf {
        self.dir.join(format!("{}.{tag}.raw", disk.file))
    }

    /// Asserts that `disk`'s chain in the target, up to `until`, restores to its contents
    /// captured under `tag`.
    pub fn assert_restores(&self, disk: &Disk, until: Option<&str>, tag: &str) {
        assert_restores(
            &self.target.join(disk.file),
            until,
            &self.captured(disk, tag),
        );
    }

    /// The backup files of d0, oldest first.
    pub fn files(&self) -> Vec<String> {
        files(&self.dd)
    }

    /// A QMP proxy in front of the VM's socket that calls `hook` with every line the tool
    /// sends ([`super::qemu::proxy`]); returns the proxy's socket.
    pub fn proxy(&self, hook: impl FnMut(&str) + Send + 'static) -> String {
        let listen = self.dir.join("proxy.sock");
        super::qemu::proxy(listen.clone(), self.dir.join("qmp.sock"), hook);
        listen.to_string_lossy().into_owned()
    }
}

/// Whether the tool's QMP line is the fleecing switch: a device moved onto its
/// copy-before-write filter, the backup's instant.
pub fn is_switch(line: &str) -> bool {
    line.contains("\"qom-set\"") && line.contains("-cbw")
}

/// Sends SIGTERM to a background run.
pub fn terminate(child: &Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

/// `backup -l <level> -t <target> <extra>`.
pub fn backup_args<'a>(target: &'a str, level: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["backup", "-l", level, "-t", target];
    args.extend_from_slice(extra);
    args
}

/// `qmpbackup --socket <socket> <args>` started in the background, its output captured.
pub fn spawn_backup(socket: &str, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
        .args(["--socket", socket])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a background run to end; asserts its exit code, and returns its log.
pub fn assert_exit(child: Child, code: i32) -> String {
    let out = child.wait_with_output().unwrap();
    let log = log_of(&out);
    assert_eq!(out.status.code(), Some(code), "{log}");
    log
}

/// Merges the chain in `disk_dir` (up to `until`) and asserts it equals `expected`.
pub fn assert_restores(disk_dir: &Path, until: Option<&str>, expected: &Path) {
    let out = expected.with_extension("restored.qcow2");
    restore_merge(disk_dir, until, &out);
    assert_same(&out, expected);
}

/// `qmprestore merge --force` of the chain in `disk_dir` (up to `until`) into `out`.
pub fn restore_merge(disk_dir: &Path, until: Option<&str>, out: &Path) {
    let (dir, out) = (disk_dir.to_str().unwrap(), out.to_str().unwrap());
    let mut args = vec!["merge", "--force", "--dir", dir, "--targetfile", out];
    if let Some(u) = until {
        args.extend(["--until", u]);
    }
    qmprestore_ok(&args);
}

/// The backup files of a disk directory (which must exist), oldest first.
pub fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = names_in(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .into_iter()
        .filter(|n| n.starts_with("FULL-") || n.starts_with("INC-") || n.starts_with("COPY-"))
        .filter(|n| !n.ends_with(".partial"))
        .collect();
    v.sort_by_key(|n| epoch(n));
    v
}

/// The epoch in a backup file's name (`INC-<epoch>-<disk>`).
pub fn epoch(name: &str) -> Option<u64> {
    name.split('-').nth(1).and_then(|e| e.parse().ok())
}

/// The partial files in a disk directory (none where it does not exist).
pub fn partials(dir: &Path) -> Vec<String> {
    names_in(dir)
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.ends_with(".partial"))
        .collect()
}

fn names_in(dir: &Path) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect())
}

/// Waits until QEMU runs at least `n` block jobs.
pub fn wait_for_jobs(vm: &mut Vm, n: usize) -> serde_json::Value {
    for _ in 0..200 {
        let jobs = vm.exec("query-block-jobs", json!({}));
        if jobs.as_array().unwrap().len() >= n {
            return jobs;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("fewer than {n} block jobs started");
}

/// Waits until QEMU runs a job of ours, then returns its id.
pub fn wait_for_job(vm: &mut Vm) -> String {
    wait_for_jobs(vm, 1)[0]["device"]
        .as_str()
        .unwrap()
        .to_string()
}

/// No node, job or temporary bitmap of ours is left in QEMU.
pub fn assert_graph_clean(vm: &mut Vm) {
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

/// `qemu-img info --output=json` of `image`.
pub fn qemu_info(image: &Path) -> serde_json::Value {
    let info = super::run(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(image),
    );
    serde_json::from_str(&info).unwrap()
}
