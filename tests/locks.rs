//! Image locks against a real QEMU: we refuse to modify an image a running QEMU has open (and
//! warn before reading it), and while we modify one, QEMU cannot open it.

mod common;

use common::needs_qemu;

use common::qemu::Vm;
use std::process::Command;

fn qmprestore(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn images_in_use_by_qemu_are_not_modified_and_ours_are_not_opened_by_qemu() {
    let Some(t) = needs_qemu() else { return };
    let dir = t.path();
    common::qemu_img_create(dir, "-f qcow2 d0.qcow2 16M");
    let disk = dir.join("d0.qcow2");
    let args: Vec<String> = vec![
        "-blockdev".into(),
        format!(
            "driver=qcow2,node-name=disk0,file.driver=file,file.filename={}",
            disk.display()
        ),
        "-device".into(),
        "virtio-blk-pci,drive=disk0,id=vd0".into(),
    ];
    let vm = Vm::start(dir, &args);
    let before = common::sha256_file(&disk);
    let o = qmprestore(&["snapshot", "-c", "s1", disk.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("in use") && err.contains("d0.qcow2"), "{err}");
    assert_eq!(
        common::sha256_file(&disk),
        before,
        "an image in use stays untouched"
    );
    let o = qmprestore(&["info", disk.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use by a running QEMU"));
    vm.quit();

    // While we hold the image for writing, QEMU cannot open it.
    let w = qmpbackup::qcow2::write::Writer::open(&disk).unwrap();
    let o = Command::new("qemu-system-x86_64")
        .args([
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "q35",
            "-accel",
            "tcg",
        ])
        .args(&args)
        .arg("-daemonize")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Failed to get") && err.contains("lock"),
        "{err}"
    );
    drop(w);
}
