//! The writer against qemu-img: every image we write must pass `qemu-img check` and hold
//! exactly what we meant to write (compared with an in-memory model and with qemu-img).

mod common;

use common::*;
use qmpbackup::qcow2::create::{create, CreateOptions};
use qmpbackup::qcow2::header::CompressionType;
use qmpbackup::qcow2::write::{compress_cluster, Writer};
use qmpbackup::qcow2::Disk;
use std::path::Path;

/// What the guest should read: a plain byte vector.
struct Model(Vec<u8>);

fn check_clean(path: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success() && v["leaks"].as_u64().unwrap_or(0) == 0,
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_contents(path: &Path, model: &Model) {
    let disk = Disk::open(path).unwrap();
    let mut buf = vec![0u8; model.0.len()];
    disk.read_at(&mut buf, 0).unwrap();
    if let Some(i) = buf.iter().zip(&model.0).position(|(a, b)| a != b) {
        panic!("{}: our read differs from the model at {i}", path.display());
    }
    // And QEMU reads the same.
    let raw = path.with_extension("check.raw");
    qemu_img(path.parent().unwrap(), &["convert", "-O", "raw", path.to_str().unwrap(), raw.to_str().unwrap()]);
    let theirs = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    if let Some(i) = theirs.iter().zip(&model.0).position(|(a, b)| a != b) {
        panic!("{}: qemu-img reads differently from the model at {i}", path.display());
    }
}

#[test]
fn random_writes_zeroes_discards_and_compressed_clusters() {
    if !have("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let configs = [
        (65536u64, 16u32, false, CompressionType::Zlib),
        (4096, 1, false, CompressionType::Zlib),
        (512, 64, false, CompressionType::Zstd),
        (65536, 2, true, CompressionType::Zstd),
        (16384, 8, true, CompressionType::Zlib),
    ];
    for (n, (cs, rb, ext, comp)) in configs.into_iter().enumerate() {
        let size = 4u64 << 20;
        let path = d.path().join(format!("w{n}.qcow2"));
        create(&path, &CreateOptions { size, cluster_size: cs, refcount_bits: rb, extended_l2: ext, compression: comp, ..Default::default() }).unwrap();
        let mut model = Model(vec![0; size as usize]);
        let mut w = Writer::open(&path).unwrap();
        let mut rng = Lcg(n as u64 + 100);
        for step in 0..300 {
            let off = rng.below(size / 512) * 512 + rng.below(2) * rng.below(512);
            let len = (1 + rng.below(3 * cs + 5000)).min(size - off);
            match rng.below(10) {
                0 => {
                    w.write_zeroes(off, len).unwrap();
                    model.0[off as usize..(off + len) as usize].fill(0);
                }
                1 if rb > 1 => {
                    let gc = rng.below(size / cs);
                    let byte = rng.below(256) as u8;
                    let data: Vec<u8> = (0..cs).map(|i| if i % 7 == 0 { byte } else { (i / 100) as u8 }).collect();
                    w.write_compressed(&[(gc, compress_cluster(comp, &data))]).unwrap();
                    model.0[(gc * cs) as usize..((gc + 1) * cs) as usize].copy_from_slice(&data);
                }
                _ => {
                    let byte = rng.below(256) as u8;
                    let data = vec![byte; len as usize];
                    w.write_at(&data, off).unwrap();
                    model.0[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
            }
            if step % 50 == 49 {
                w.flush().unwrap();
            }
        }
        w.flush().unwrap();
        drop(w);
        check_clean(&path);
        assert_contents(&path, &model);
    }
}
