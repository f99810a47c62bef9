//! Property test: random sequences of writes, zero writes, discards, compressed writes and
//! snapshot creation/deletion, applied to an image and to an in-memory model, across cluster
//! sizes, refcount widths and L2 formats; afterwards contents, snapshots and `qemu-img check`
//! must all agree with the model.

mod common;

use common::*;
use qmpbackup::qcow2::create::{create, CreateOptions};
use qmpbackup::qcow2::header::CompressionType;
use qmpbackup::qcow2::write::{compress_cluster, Writer};
use qmpbackup::qcow2::Disk;
use std::path::Path;

struct Model {
    now: Vec<u8>,
    snapshots: Vec<(String, Vec<u8>)>,
}

fn run_sequence(
    dir: &Path,
    n: usize,
    cs: u64,
    refcount_bits: u32,
    extended: bool,
    comp: CompressionType,
    seed: u64,
) {
    let size = 2u64 << 20;
    let file = format!("p{n}.qcow2");
    let path = dir.join(&file);
    create(
        &path,
        &CreateOptions {
            size,
            cluster_size: cs,
            refcount_bits,
            extended_l2: extended,
            compression: comp,
            ..Default::default()
        },
    )
    .unwrap();
    let mut m = Model {
        now: vec![0; size as usize],
        snapshots: Vec::new(),
    };
    let mut rng = Lcg(seed);
    let mut w = Writer::open(&path).unwrap();
    // Snapshots share clusters: a width must hold one reference per snapshot plus the active
    // table, and packed compressed clusters take one per stream.
    let max_snapshots = if refcount_bits >= 8 { 3 } else { 0 };
    let mut next_id = 0;
    for _ in 0..120 {
        let off = rng.below(size / 512) * 512 + rng.below(3) * rng.below(512);
        let len = (1 + rng.below(2 * cs + 9000)).min(size - off);
        let r = off as usize..(off + len) as usize;
        match rng.below(20) {
            0..=9 => {
                let v = rng.below(256) as u8;
                w.write_at(&vec![v; len as usize], off).unwrap();
                m.now[r].fill(v);
            }
            10 | 11 => {
                w.write_zeroes(off, len).unwrap();
                m.now[r].fill(0);
            }
            12 => {
                // Discard drops whole units; without a backing file they read as zeros.
                let unit = if extended { cs / 32 } else { cs };
                let (a, b) = (off.div_ceil(unit) * unit, ((off + len) / unit) * unit);
                w.discard(off, len).unwrap();
                if b > a {
                    m.now[a as usize..b as usize].fill(0);
                }
            }
            13..=15 if refcount_bits > 1 => {
                let gc = rng.below(size / cs);
                let v = rng.below(256) as u8;
                let data: Vec<u8> = (0..cs)
                    .map(|i| if i % 3 == 0 { v } else { (i % 97) as u8 })
                    .collect();
                w.write_compressed(&[(gc, compress_cluster(comp, &data))])
                    .unwrap();
                m.now[(gc * cs) as usize..((gc + 1) * cs) as usize].copy_from_slice(&data);
            }
            16 | 17 if m.snapshots.len() < max_snapshots => {
                let name = format!("s{next_id}");
                next_id += 1;
                w.create_snapshot(&name).unwrap();
                m.snapshots.push((name, m.now.clone()));
            }
            18 if !m.snapshots.is_empty() => {
                let i = rng.below(m.snapshots.len() as u64) as usize;
                let (name, _) = m.snapshots.remove(i);
                w.delete_snapshot(&name).unwrap();
            }
            _ => w.flush().unwrap(),
        }
    }
    w.flush().unwrap();
    drop(w);
    let label = format!("cs={cs} refcount_bits={refcount_bits} extended={extended} {comp:?}");
    let out = std::process::Command::new("qemu-img")
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{label}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let ours = qmpbackup::qcow2::check::check(&path).unwrap();
    assert_eq!(ours.exit_code(), 0, "{label}: {:?}", ours.messages);
    assert!(
        render(dir, &file, None) == m.now,
        "{label}: contents differ (qemu-img)"
    );
    let disk = Disk::open(&path).unwrap();
    let mut buf = vec![0u8; size as usize];
    disk.read_at(&mut buf, 0).unwrap();
    assert!(buf == m.now, "{label}: contents differ (ours)");
    for (name, want) in &m.snapshots {
        assert!(
            render(dir, &file, Some(name)) == *want,
            "{label}: snapshot {name} differs"
        );
    }
}

#[test]
fn random_operation_sequences_match_the_model() {
    let Some(d) = needs("qemu-img") else { return };
    let configs = [
        (512u64, 16u32, false, CompressionType::Zlib),
        (4096, 1, false, CompressionType::Zlib),
        (4096, 4, false, CompressionType::Zstd),
        (65536, 64, false, CompressionType::Zstd),
        (16384, 16, true, CompressionType::Zlib),
        (65536, 8, true, CompressionType::Zstd),
        (1 << 21, 32, false, CompressionType::Zlib),
    ];
    for (n, (cs, rb, ext, comp)) in configs.into_iter().enumerate() {
        for seed in 0..3 {
            run_sequence(
                d.path(),
                n * 10 + seed as usize,
                cs,
                rb,
                ext,
                comp,
                1000 + seed + n as u64 * 17,
            );
        }
    }
}
