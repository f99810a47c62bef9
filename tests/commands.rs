//! The writing commands of qmprestore (create, convert -O qcow2, snapshot, check), with
//! qemu-img as the judge.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn qmprestore(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn qemu_info(dir: &Path, name: &str) -> Value {
    serde_json::from_str(&qemu_img(dir, &["info", "--output=json", name])).unwrap()
}

#[test]
fn create_gives_exactly_the_requested_options() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    succeeded(qmprestore(p, &["create", "base.qcow2", "64M"]));
    let cases: Vec<(&str, Vec<&str>, Value)> = vec![
        ("default.qcow2", vec!["1G"], serde_json::json!({"compat": "1.1", "compression-type": "zlib", "lazy-refcounts": false, "refcount-bits": 16, "corrupt": false, "extended-l2": false})),
        ("v2.qcow2", vec!["-o", "compat=0.10,cluster_size=512", "10M"], serde_json::json!({"compat": "0.10", "compression-type": "zlib", "refcount-bits": 16})),
        ("rich.qcow2", vec!["-o", "cluster_size=2M,refcount_bits=64,lazy_refcounts=on,extended_l2=on,compression_type=zstd", "100G"], serde_json::json!({"compat": "1.1", "compression-type": "zstd", "lazy-refcounts": true, "refcount-bits": 64, "corrupt": false, "extended-l2": true})),
        ("rc1.qcow2", vec!["-o", "refcount_bits=1,cluster_size=4k", "3T"], serde_json::json!({"compat": "1.1", "compression-type": "zlib", "lazy-refcounts": false, "refcount-bits": 1, "corrupt": false, "extended-l2": false})),
        ("df.qcow2", vec!["-o", "data_file=df.data,data_file_raw=on", "8M"], serde_json::json!({"compat": "1.1", "compression-type": "zlib", "lazy-refcounts": false, "refcount-bits": 16, "data-file": "df.data", "data-file-raw": true, "corrupt": false, "extended-l2": false})),
    ];
    for (name, args, specific) in cases {
        let mut full = vec!["create"];
        full.extend(args.iter().copied().take(args.len() - 1));
        full.push(name);
        full.push(args[args.len() - 1]);
        succeeded(qmprestore(p, &full));
        let info = qemu_info(p, name);
        assert_eq!(info["format-specific"]["data"], specific, "{name}");
        assert_eq!(
            qemu_img(p, &["check", name]).lines().next(),
            Some("No errors were found on the image."),
            "{name}"
        );
    }
    assert_eq!(qemu_info(p, "rich.qcow2")["cluster-size"], 2 << 20);
    assert_eq!(qemu_info(p, "rc1.qcow2")["virtual-size"], 3u64 << 40);
    // A raw data file maps the whole disk 1:1, as qemu-img's does.
    assert_maps_like_qemu(p, "df.qcow2");
    // A backing file with its format; the size comes from it.
    succeeded(qmprestore(
        p,
        &["create", "-b", "base.qcow2", "-F", "qcow2", "over.qcow2"],
    ));
    let info = qemu_info(p, "over.qcow2");
    assert_eq!(
        (
            info["backing-filename"].as_str(),
            info["backing-filename-format"].as_str(),
            info["virtual-size"].as_u64()
        ),
        (Some("base.qcow2"), Some("qcow2"), Some(64 << 20))
    );
    // Refusals: an existing file, impossible combinations.
    for args in [
        vec!["create", "base.qcow2", "1M"],
        vec![
            "create",
            "-o",
            "compat=0.10,extended_l2=on",
            "x.qcow2",
            "1M",
        ],
        vec!["create", "-o", "cluster_size=4M", "y.qcow2", "1M"],
        vec![
            "create",
            "-o",
            "extended_l2=on,cluster_size=4k",
            "z.qcow2",
            "1M",
        ],
    ] {
        let o = qmprestore(p, &args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
    }
    assert!(!p.join("x.qcow2").exists());
}

#[test]
fn convert_to_qcow2_plain_and_compressed() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    for f in [
        "base.qcow2",
        "mid.qcow2",
        "top.qcow2",
        "snap.qcow2",
        "zstd.qcow2",
        "extl2.qcow2",
    ] {
        std::fs::copy(fixtures().join(f), p.join(f)).unwrap();
    }
    let runs: Vec<(&str, Vec<&str>, &str)> = vec![
        ("top.qcow2", vec![], "plain.qcow2"),
        ("top.qcow2", vec!["-c"], "zlib.qcow2"),
        (
            "top.qcow2",
            vec!["-c", "--compression-type", "zstd", "--cluster-size", "4k"],
            "zstd.qcow2",
        ),
        ("extl2.qcow2", vec!["--cluster-size", "512"], "small.qcow2"),
        (
            "zstd.qcow2",
            vec!["--cluster-size", "2M", "-c"],
            "big.qcow2",
        ),
    ];
    for (src, extra, dst) in runs {
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend(extra);
        args.extend([src, dst]);
        succeeded(qmprestore(p, &args));
        assert!(
            qemu_img(p, &["compare", src, dst]).contains("identical"),
            "{dst}"
        );
        assert!(
            qemu_img(p, &["check", dst]).starts_with("No errors"),
            "{dst}"
        );
        assert!(qemu_img(p, &["info", dst]).contains("file format: qcow2"));
    }
    let map = qemu_img(p, &["map", "--output=json", "zstd.qcow2"]);
    assert!(
        map.contains("\"compressed\": true"),
        "zstd output has no compressed clusters"
    );
    assert_eq!(
        qemu_info(p, "zstd.qcow2")["format-specific"]["data"]["compression-type"],
        "zstd"
    );
    // A snapshot's state, converted.
    succeeded(qmprestore(
        p,
        &[
            "convert",
            "-O",
            "qcow2",
            "-l",
            "first",
            "snap.qcow2",
            "first.qcow2",
        ],
    ));
    qemu_img(
        p,
        &[
            "convert",
            "-O",
            "raw",
            "-l",
            "snapshot.name=first",
            "snap.qcow2",
            "first.raw",
        ],
    );
    assert!(
        qemu_img(p, &["compare", "-F", "raw", "first.qcow2", "first.raw"]).contains("identical")
    );
}

#[test]
fn snapshot_command_round_trip() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    std::fs::copy(fixtures().join("v3.qcow2"), p.join("v.qcow2")).unwrap();
    succeeded(qmprestore(p, &["snapshot", "-c", "before", "v.qcow2"]));
    assert!(qemu_img(p, &["snapshot", "-l", "v.qcow2"]).contains("before"));
    let listed = succeeded(qmprestore(p, &["snapshot", "-l", "v.qcow2"]));
    assert!(
        listed.contains("before") && listed.starts_with("Snapshot list:"),
        "{listed}"
    );
    qemu_io(p, "v.qcow2", &["write -P 0x77 0 1M"]);
    succeeded(qmprestore(p, &["snapshot", "-a", "before", "v.qcow2"]));
    qemu_img(p, &["convert", "-O", "raw", "v.qcow2", "now.raw"]);
    let disk = qmpbackup::qcow2::Disk::open(&fixtures().join("v3.qcow2")).unwrap();
    assert_eq!(sha256_file(&p.join("now.raw")), sha256_of(&disk));
    succeeded(qmprestore(p, &["snapshot", "-d", "before", "v.qcow2"]));
    assert!(!qemu_img(p, &["snapshot", "-l", "v.qcow2"]).contains("before"));
    assert!(qemu_img(p, &["check", "v.qcow2"]).starts_with("No errors"));
    let o = qmprestore(p, &["snapshot", "-d", "nope", "v.qcow2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope"));
}

#[test]
fn check_command_exit_codes_and_json() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let o = qmprestore(
        p,
        &[
            "check",
            "--output",
            "json",
            fixtures().join("snap.qcow2").to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["check-errors"], 0);
    let o = qmprestore(p, &["check", "/nonexistent.qcow2"]);
    assert_eq!(o.status.code(), Some(1));
}
