//! A real QEMU 10 for backup tests, with no guest OS: started with `-S` (prelaunch), disks
//! written through HMP `qemu-io` on a second QMP socket (the tool under test gets the first;
//! a QMP socket serves one client at a time).

use qmpbackup::qmp::{Address, Qmp};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How [`Vm::stop`] ends QEMU.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Stop {
    /// QMP `quit`: persistent bitmaps are written.
    Quit,
    /// SIGKILL: persistent bitmaps stay flagged in-use.
    Kill,
}

/// qemu-io's way to the disk of [`one_disk_args`]: its virtio-blk device `vd0`.
pub const VD0: &str = "-d vd0/virtio-backend";

/// QEMU arguments for one disk: the qcow2 image `dir/d0.qcow2` through -blockdev (file node
/// `file0`, format node `disk0`) on virtio-blk `vd0`.
pub fn one_disk_args(dir: &Path) -> Vec<String> {
    vec![
        "-blockdev".into(),
        format!(
            "driver=file,filename={},node-name=file0",
            dir.join("d0.qcow2").display()
        ),
        "-blockdev".into(),
        "driver=qcow2,file=file0,node-name=disk0".into(),
        "-device".into(),
        "virtio-blk-pci,drive=disk0,id=vd0".into(),
    ]
}

/// A VM with one new 64 MiB qcow2 disk, `d0.qcow2` (see [`one_disk_args`]), in `dir`.
pub fn one_disk_vm(dir: &Path) -> Vm {
    super::qemu_img_create(dir, "-f qcow2 d0.qcow2 64M");
    Vm::start(dir, &one_disk_args(dir))
}

pub struct Vm {
    pub dir: PathBuf,
    pub args: Vec<String>,
    child: Option<Child>,
    pub qmp: Qmp,
}

impl Vm {
    /// Starts QEMU in `dir` with the sockets `qmp.sock` (for the tool) and `qmp2.sock` (ours).
    pub fn start(dir: &Path, args: &[String]) -> Vm {
        let _ = std::fs::remove_file(dir.join("qmp.sock"));
        let _ = std::fs::remove_file(dir.join("qmp2.sock"));
        let _ = std::fs::remove_file(dir.join("qmp3.sock"));
        let out = std::fs::File::create(dir.join("qemu.out")).unwrap();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-S", "-nodefaults", "-display", "none", "-machine", "q35"])
            .args(["-accel", "kvm", "-accel", "tcg", "-m", "128"])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join("qmp.sock").display()
            ))
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join("qmp2.sock").display()
            ))
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join("qmp3.sock").display()
            ))
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let mut child = cmd.spawn().expect("qemu-system-x86_64 starts");
        let addr = Address::Unix(dir.join("qmp2.sock"));
        let deadline = Instant::now() + Duration::from_secs(20);
        let qmp = loop {
            match Qmp::connect(&addr, Duration::from_secs(10)) {
                Ok(q) => break q,
                Err(e) if Instant::now() > deadline || child.try_wait().unwrap().is_some() => {
                    panic!(
                        "QEMU did not come up: {e}\n{}",
                        std::fs::read_to_string(dir.join("qemu.out")).unwrap_or_default()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        Vm {
            dir: dir.to_path_buf(),
            args: args.to_vec(),
            child: Some(child),
            qmp,
        }
    }

    pub fn socket(&self) -> String {
        self.dir.join("qmp.sock").to_string_lossy().into_owned()
    }

    pub fn exec(&mut self, cmd: &str, args: Value) -> Value {
        self.qmp
            .execute(cmd, args)
            .unwrap_or_else(|e| panic!("{cmd}: {e}"))
    }

    /// A third QMP connection (for a helper thread such as a proxy hook).
    pub fn third(&self) -> Qmp {
        Qmp::connect(
            &Address::Unix(self.dir.join("qmp3.sock")),
            Duration::from_secs(10),
        )
        .unwrap()
    }

    /// Runs a qemu-io command through a device's block backend (where guest I/O enters);
    /// `dev` is `-d <qdev path>` or a legacy drive name such as `drive-l` or `pflash1`.
    pub fn io(&mut self, dev: &str, command: &str) {
        hmp_io(&mut self.qmp, dev, command)
    }

    pub fn write(&mut self, dev: &str, pattern: u8, offset: u64, len: u64) {
        hmp_io(
            &mut self.qmp,
            dev,
            &format!("write -P 0x{pattern:02x} {offset} {len}"),
        );
    }

    pub fn status(&mut self) -> String {
        self.exec("query-status", json!({}))["status"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The guest-visible bytes of `image` now, rendered by qemu-img into `out` (raw).
    pub fn capture(&mut self, dev: &str, image: &str, fmt: &str, out: &Path) {
        self.io(dev, "flush");
        super::run(
            Command::new("qemu-img")
                .args(["convert", "-U", "-f", fmt, "-O", "raw", image])
                .arg(out)
                .current_dir(&self.dir),
        );
    }

    /// Shuts QEMU down cleanly (persistent bitmaps are written).
    pub fn quit(mut self) {
        self.stop(Stop::Quit);
    }

    /// Kills QEMU with SIGKILL (persistent bitmaps stay flagged in-use).
    pub fn kill(mut self) {
        self.stop(Stop::Kill);
    }

    /// Ends QEMU as `how` says; [`Vm::start_again`] brings it back.
    pub fn stop(&mut self, how: Stop) {
        if how == Stop::Quit {
            let _ = self.qmp.execute("quit", json!({}));
        }
        if let Some(mut c) = self.child.take() {
            if how == Stop::Kill {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    /// Starts QEMU again in the same folder with the same arguments (after [`Vm::stop`]).
    pub fn start_again(&mut self) {
        *self = Vm::start(&self.dir.clone(), &self.args.clone());
    }

    /// [`Vm::stop`], then [`Vm::start_again`].
    pub fn restart(&mut self, how: Stop) {
        self.stop(how);
        self.start_again();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
}

/// HMP `qemu-io` over any QMP connection; HMP reports errors as a non-empty string.
pub fn hmp_io(qmp: &mut Qmp, dev: &str, command: &str) {
    let line = format!("qemu-io {dev} \"{command}\"");
    let r = qmp
        .execute("human-monitor-command", json!({ "command-line": line }))
        .unwrap_or_else(|e| panic!("{line}: {e}"));
    assert_eq!(r, json!(""), "{line}");
}

/// A QMP proxy between the tool and QEMU: serves `listen`, forwards to `upstream`, and calls
/// `hook` with every line the tool sends before forwarding it, so a test can act at an exact
/// point of the tool's dialogue (e.g. write to a disk right after the fleecing switch).
pub fn proxy(
    listen: PathBuf,
    upstream: PathBuf,
    mut hook: impl FnMut(&str) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let _ = std::fs::remove_file(&listen);
    let listener = UnixListener::bind(&listen).unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let server = UnixStream::connect(&upstream).unwrap();
            let (mut to_client, mut from_server) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let down = std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_server, &mut to_client);
                let _ = to_client.shutdown(std::net::Shutdown::Both);
            });
            let mut to_server = server;
            for line in BufReader::new(client).lines() {
                let Ok(line) = line else { break };
                hook(&line);
                if to_server.write_all(format!("{line}\n").as_bytes()).is_err() {
                    break;
                }
            }
            let _ = to_server.shutdown(std::net::Shutdown::Both);
            let _ = down.join();
        }
    })
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `qmpbackup --socket <socket> <args>` and returns its output.
pub fn qmpbackup(socket: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

/// What a qmpbackup run printed: its log (standard output, as the original's) followed by
/// anything on standard error.
pub fn log_of(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Like [`qmpbackup`], panicking with the log unless it succeeded; returns the log.
pub fn backup_ok(socket: &str, args: &[&str]) -> String {
    let o = qmpbackup(socket, args);
    let log = log_of(&o);
    assert!(
        o.status.success(),
        "qmpbackup {args:?} failed ({}):\n{log}",
        o.status
    );
    log
}
