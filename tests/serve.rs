//! `qmprestore serve` read by clients no one here wrote: qemu-img, nbdinfo, nbdcopy, QEMU 10
//! itself (a virtio-blk drive on the export, TLS with tls-creds-x509, and the live-restore
//! flow: overlay on the export, block-stream, then the overlay stands alone).

mod common;

use common::nbd::{make_certificates, Server};
use common::qemu::Vm;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sample_dir() -> PathBuf {
    common::sample_chain().join("disk.qcow2")
}

fn sample_top() -> String {
    sample_dir()
        .join("INC-1700001200-disk.qcow2")
        .display()
        .to_string()
}

/// `(start, length, data, zero)` runs of a `qemu-img map --output=json`, neighbours with the
/// same data/zero merged (an NBD client sees no layers or host offsets).
fn allocation_runs(map_json: &str) -> Vec<(u64, u64, bool, bool)> {
    let v: Value = serde_json::from_str(map_json).unwrap();
    let mut runs: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let (data, zero) = (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap());
        match runs.last_mut() {
            Some(r) if r.2 == data && r.3 == zero => r.1 += len,
            _ => runs.push((start, len, data, zero)),
        }
    }
    runs
}

#[test]
fn qemu_img_and_libnbd_read_the_restore_point() {
    let Some(dir) = common::needs("qemu-img").filter(|_| common::have("nbdinfo")) else {
        return;
    };
    let d = dir.path();
    let chain = sample_dir();
    let server = Server::start(d, &["--dir", chain.to_str().unwrap(), "--name", "disk"]);
    let uri = server.uri("");
    let top = sample_top();
    let cmp = common::run(Command::new("qemu-img").args(["compare", &uri, &top]));
    assert!(cmp.contains("Images are identical"), "{cmp}");
    // Holes and zeros come through block status exactly as the chain maps them.
    let ours = common::qemu_img(
        d,
        &["map", "--output=json", "-f", "raw", &server.uri("disk")],
    );
    let theirs = common::qemu_img(d, &["map", "--output=json", &top]);
    assert_eq!(allocation_runs(&ours), allocation_runs(&theirs));
    assert!(
        allocation_runs(&ours).iter().any(|r| !r.2),
        "the sample has holes"
    );

    let list = common::run(Command::new("nbdinfo").args(["--list", "--json", &uri]));
    let list: Value = serde_json::from_str(&list).unwrap();
    let exports = list["exports"].as_array().unwrap();
    let names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["", "disk"]);
    assert_eq!(exports[0]["is_read_only"], json!(true));
    assert_eq!(exports[0]["can_multi_conn"], json!(true));
    assert!(exports[0]["description"]
        .as_str()
        .unwrap()
        .contains("INC-1700001200-disk.qcow2"));
    // nbdinfo --map: the same holes; with qemu:allocation-depth, the layer of each range.
    let map = common::run(Command::new("nbdinfo").args(["--map", "--json", &uri]));
    let map: Value = serde_json::from_str(&map).unwrap();
    let holes: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64().unwrap() & 1 != 0)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    let want: u64 = allocation_runs(&theirs)
        .iter()
        .filter(|r| !r.2)
        .map(|r| r.1)
        .sum();
    assert_eq!(holes, want);
    let depth =
        common::run(Command::new("nbdinfo").args(["--map=qemu:allocation-depth", "--json", &uri]));
    let depths: Vec<u64> = serde_json::from_str::<Value>(&depth)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_u64().unwrap())
        .collect();
    assert!(depths.contains(&1) && depths.contains(&3) && depths.contains(&0));
    // nbdcopy: parallel reads over several connections.
    let out = d.join("copy.raw");
    common::run(Command::new("nbdcopy").args([&uri, out.to_str().unwrap()]));
    let cmp = common::qemu_img(
        d,
        &["compare", "-f", "raw", "-F", "qcow2", "copy.raw", &top],
    );
    assert!(cmp.contains("Images are identical"));
    assert!(server.stop().success());
}

#[test]
fn a_backup_target_exports_each_disk_at_the_restore_point() {
    let Some(_tmp) = common::needs("qemu-img").filter(|_| common::have("nbdinfo")) else {
        return;
    };
    let b = common::chains::build(3, false, "", None);
    // A target with two disk folders: the chain, and a copy of it under another name.
    let target = b.dir.parent().unwrap().join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::rename(&b.dir, target.join("disk0.qcow2")).unwrap();
    common::run(
        Command::new("cp")
            .args(["-a"])
            .arg(target.join("disk0.qcow2"))
            .arg(target.join("disk1.qcow2")),
    );
    let until = &b.names[2][..b.names[2].find('-').unwrap() + 11];
    let server = Server::start(
        _tmp.path(),
        &["--dir", target.to_str().unwrap(), "--until", until],
    );
    let list =
        common::run(Command::new("nbdinfo").args(["--list", "--json", &server.uri("disk0.qcow2")]));
    let list: Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["disk0.qcow2", "disk1.qcow2"]);
    for name in names {
        let cmp = common::run(Command::new("qemu-img").args([
            "compare",
            "-F",
            "raw",
            &server.uri(name),
            b.expected[2].to_str().unwrap(),
        ]));
        assert!(cmp.contains("Images are identical"), "{name}: {cmp}");
    }
    // Several disks: no default export.
    let o = Command::new("nbdinfo")
        .arg(server.uri(""))
        .output()
        .unwrap();
    assert!(!o.status.success());
}

/// `qmprestore serve ARGS --listen 127.0.0.1:0`; returns the server and its port (read from
/// the start-up line).
fn serve_tcp(args: &[&str]) -> (Server, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .arg("serve")
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let server = Server {
        child,
        socket: PathBuf::new(),
    };
    (server, port)
}

#[test]
fn qemu_reads_over_tls_and_clients_without_credentials_are_refused() {
    let Some(dir) = common::needs("qemu-img").filter(|_| common::have("nbdinfo")) else {
        return;
    };
    let Some(pki) = make_certificates(dir.path()) else {
        return;
    };
    let chain = sample_dir();
    let (server, port) = serve_tcp(&[
        "--dir",
        chain.to_str().unwrap(),
        "--tls-creds",
        pki.join("server").to_str().unwrap(),
        "--tls-verify-peer",
    ]);
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0,export="
    );
    let qemu_img_tls = |creds: &Path| {
        Command::new("qemu-img")
            .args(["convert", "--object"])
            .arg(format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                creds.display()
            ))
            .args(["--image-opts", &opts, "-O", "raw"])
            .arg(dir.path().join("tls.raw"))
            .output()
            .unwrap()
    };
    common::succeeded(qemu_img_tls(&pki.join("client")));
    let cmp = common::qemu_img(
        dir.path(),
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            "tls.raw",
            &sample_top(),
        ],
    );
    assert!(cmp.contains("Images are identical"));
    // No client certificate: refused (--tls-verify-peer).
    let o = qemu_img_tls(&pki.join("anon"));
    assert!(
        !o.status.success(),
        "a client without a certificate was served"
    );
    // In the clear: TLS is required before anything else.
    let o = Command::new("nbdinfo")
        .arg(format!("nbd://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    // libnbd over TLS with the client certificate.
    let o = Command::new("nbdinfo")
        .arg("--size")
        .arg(format!(
            "nbds://127.0.0.1:{port}/?tls-certificates={}",
            pki.join("client").display()
        ))
        .output()
        .unwrap();
    assert_eq!(common::succeeded(o).trim(), (8u64 << 20).to_string());
    assert!(server.stop().success());
}

#[test]
fn socket_activation_serves_the_inherited_socket() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let Some(dir) = common::needs("qemu-img") else {
        return;
    };
    let sock = dir.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" serve --dir \"$1\" --once")
        .arg(env!("CARGO_BIN_EXE_qmprestore"))
        .arg(sample_dir());
    // SAFETY: dup2 and fcntl are async-signal-safe. dup2 gives a descriptor 3 without
    // CLOEXEC; when the listener already is descriptor 3, dup2 does nothing, so its CLOEXEC
    // flag is cleared instead.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // In a guard, so that a failing assertion still stops the server.
    let mut server = Server {
        child: cmd.spawn().unwrap(),
        socket: sock.clone(),
    };
    drop(listener);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let cmp = common::run(Command::new("qemu-img").args(["compare", &uri, &sample_top()]));
    assert!(cmp.contains("Images are identical"));
    // --once: the last client left, the server exits by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "--once did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.child.wait().unwrap().success());
    assert!(
        sock.exists(),
        "an inherited socket belongs to systemd and stays"
    );
}

/// Live restore with stock QEMU: the VM runs on an overlay whose backing is the export at
/// once; block-stream copies the rest while the guest writes; then the overlay stands alone
/// and equals the restore point plus exactly the guest's writes.
#[test]
fn live_restore_with_block_stream() {
    let Some(dir) = common::needs_qemu() else {
        return;
    };
    let d = dir.path();
    let chain = sample_dir();
    let server = Server::start(d, &["--dir", chain.to_str().unwrap()]);
    // The expected disk: the restore point, as qemu-img renders it, plus the guest's writes.
    common::qemu_img(d, &["convert", "-O", "raw", &sample_top(), "expected.raw"]);
    let created = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .args(["create", "-u", "-b", &server.uri(""), "-F", "raw"])
        .arg(d.join("overlay.qcow2"))
        .arg("8M")
        .output()
        .unwrap();
    common::succeeded(created);
    let mut vm = Vm::start(
        d,
        &[
            "-blockdev".into(),
            "driver=qcow2,node-name=disk0,file.driver=file,file.filename=overlay.qcow2".into(),
            "-device".into(),
            "virtio-blk-pci,drive=disk0,id=vd0".into(),
        ],
    );
    let dev = "-d vd0/virtio-backend";
    // The guest reads its disk before anything was copied: from the export.
    vm.io(dev, "read 0 1M");
    vm.exec(
        "block-stream",
        json!({"job-id": "restore", "device": "disk0", "speed": 2 << 20}),
    );
    let writes = [
        (0xcdu8, 6u64 << 20, 65536u64),
        (0xce, 100_000, 4096),
        (0xcf, 7 << 20, 1 << 20),
    ];
    let mut expected = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("expected.raw"))
        .unwrap();
    for (pattern, off, len) in writes {
        vm.write(dev, pattern, off, len);
        use std::io::{Seek, SeekFrom, Write};
        expected.seek(SeekFrom::Start(off)).unwrap();
        expected.write_all(&vec![pattern; len as usize]).unwrap();
    }
    let jobs = vm.exec("query-block-jobs", json!({}));
    assert_eq!(
        jobs.as_array().unwrap().len(),
        1,
        "the writes landed during the stream"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !vm
        .exec("query-block-jobs", json!({}))
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "block-stream did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The export is no longer needed: the overlay stands alone.
    assert!(server.stop().success());
    vm.io(dev, "flush");
    let info = common::qemu_img(d, &["info", "-U", "--output=json", "overlay.qcow2"]);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    vm.io(dev, "read 7M 1M");
    vm.quit();
    let out = std::fs::read_to_string(d.join("qemu.out")).unwrap();
    assert!(
        out.contains("read 1048576/1048576 bytes at offset 0"),
        "{out}"
    );
    assert!(
        out.contains("read 1048576/1048576 bytes at offset 7340032"),
        "{out}"
    );
    let cmp = common::qemu_img(
        d,
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "overlay.qcow2",
            "expected.raw",
        ],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");
    common::assert_check_clean(&d.join("overlay.qcow2"));
}
