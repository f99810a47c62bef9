use crate::common;
use crate::common::backup_vm::*;
use crate::common::qemu::{backup_ok, log_of, qmpbackup, Vm};
use serde_json::json;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

/// Node names up to QEMU's 31 characters, a TCP socket over IPv4 and IPv6, a relative
/// target, and direct I/O for the target (`--blockdev-disable-cache`) all work; a socket that
/// never greets and a target that cannot be written fail with a clear error.
#[test]
fn long_node_names_and_tcp_sockets_work_and_busy_sockets_or_bad_targets_fail_clearly() {
    let node = "drive-virtio-disk0-long-name-31";
    assert_eq!(node.len(), 31);
    let port4 = free_port("127.0.0.1:0");
    let port6 = free_port("[::1]:0");
    let Some(mut s) = BackupVm::new(|dir| {
        common::qemu_img_create(dir, "-f qcow2 long.qcow2 16M");
        Vm::start(
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
        )
    }) else {
        return;
    };
    s.vm.write(D0.io, 0x44, 0, MIB);
    // Direct I/O for the target (the original's --blockdev-disable-cache did nothing): the
    // target node asks QEMU for cache.direct, the fleece node does not.
    let mut args = vec!["--debug"];
    args.extend(backup_args(s.tgt(), "full", &["--blockdev-disable-cache"]));
    let log = backup_ok(&format!("tcp:127.0.0.1:{port4}"), &args);
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
    s.vm.write(D0.io, 0x45, MIB, MIB);
    // A relative target, from a working directory that is not QEMU's: QEMU must be given
    // absolute file names (it resolves relative ones against its own directory).
    let elsewhere = s.dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
        .args(["--socket", &format!("tcp:[::1]:{port6}")])
        .args(backup_args("../b", "inc", &[]))
        .current_dir(&elsewhere)
        .output()
        .unwrap();
    assert!(o.status.success(), "relative target: {}", log_of(&o));
    let long = s.dir.join("long.raw");
    s.vm.capture(D0.io, "long.qcow2", "qcow2", &long);
    assert_restores(&s.target.join("long.qcow2"), None, &long);

    // A socket that already serves a client (ours, qmp2) never greets: a clear timeout.
    let busy = s.dir.join("qmp2.sock").to_string_lossy().into_owned();
    let o = qmpbackup(
        &busy,
        &["--connect-timeout", "1", "info", "--show", "blockdev"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(log_of(&o).contains("another client"), "{}", log_of(&o));

    // A target below a regular file cannot be created: clear error, VM untouched.
    std::fs::write(s.dir.join("file"), b"").unwrap();
    let below_file = s.dir.join("file/sub");
    let o = qmpbackup(
        &s.vm.socket(),
        &backup_args(below_file.to_str().unwrap(), "full", &[]),
    );
    assert_eq!(o.status.code(), Some(1));
    let log = log_of(&o);
    assert!(
        log.contains("file/sub") && log.contains("Not a directory"),
        "{log}"
    );
    assert_graph_clean(&mut s.vm);
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
fn the_vm_state_is_kept_and_quiesce_freezes_around_the_switch() {
    let Some(mut s) = BackupVm::one_disk() else {
        return;
    };
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    fake_agent(s.dir.join("qga.sock"), log.clone());
    let mut helper = s.vm.third();
    let l = log.clone();
    let sock = s.proxy(move |line| {
        let point = if is_switch(line) {
            "switch"
        } else if line.contains("\"blockdev-backup\"") {
            "jobs"
        } else {
            return;
        };
        let st = helper.execute("query-status", json!({})).unwrap();
        l.lock()
            .unwrap()
            .push(format!("{point}:{}", st["status"].as_str().unwrap()));
    });
    let tgt = s.tgt().to_string();
    let agent = s.dir.join("qga.sock").to_string_lossy().into_owned();
    let case = |vm: &mut Vm, extra: &[&str]| -> Vec<String> {
        log.lock().unwrap().clear();
        let mut args = vec!["--agent-socket", &agent];
        args.extend(backup_args(&tgt, "auto", extra));
        backup_ok(&sock, &args);
        let mut events = log.lock().unwrap().clone();
        events.push(format!("after:{}", vm.status()));
        events
    };
    assert_eq!(
        case(&mut s.vm, &[]),
        ["switch:prelaunch", "jobs:prelaunch", "after:prelaunch"]
    );
    assert_eq!(
        case(&mut s.vm, &["--pause"]),
        ["switch:prelaunch", "jobs:prelaunch", "after:prelaunch"]
    );
    assert_eq!(
        case(&mut s.vm, &["--quiesce"]),
        [
            "freeze",
            "switch:prelaunch",
            "jobs:prelaunch",
            "thaw",
            "after:prelaunch"
        ]
    );
    s.vm.exec("cont", json!({}));
    assert_eq!(
        case(&mut s.vm, &[]),
        ["switch:paused", "jobs:paused", "after:running"]
    );
    assert_eq!(
        case(&mut s.vm, &["--quiesce"]),
        [
            "freeze",
            "switch:paused",
            "jobs:paused",
            "thaw",
            "after:running"
        ]
    );
    assert_eq!(
        case(&mut s.vm, &["--pause", "--quiesce"]),
        ["switch:paused", "jobs:paused", "after:running"]
    );
    // Data written while the VM runs is backed up and restores exactly.
    s.vm.write(D0.io, 0x5a, 3 * MIB, 2 * MIB);
    assert_eq!(
        case(&mut s.vm, &[]),
        ["switch:paused", "jobs:paused", "after:running"]
    );
    s.capture(&[&D0], "run");
    s.vm.exec("stop", json!({}));
    assert_eq!(
        case(&mut s.vm, &["--pause"]),
        ["switch:paused", "jobs:paused", "after:paused"]
    );
    let names = s.files();
    assert_eq!(names.len(), 8);
    s.assert_restores(&D0, Some(&names[6]), "run");
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
