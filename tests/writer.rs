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

fn assert_contents(path: &Path, model: &Model) {
    let disk = Disk::open(path).unwrap();
    let mut buf = vec![0u8; model.0.len()];
    disk.read_at(&mut buf, 0).unwrap();
    if let Some(i) = buf.iter().zip(&model.0).position(|(a, b)| a != b) {
        panic!("{}: our read differs from the model at {i}", path.display());
    }
    // And QEMU reads the same.
    let raw = path.with_extension("check.raw");
    let name = path.file_name().unwrap().to_str().unwrap();
    qemu_img(
        path.parent().unwrap(),
        &["convert", "-O", "raw", name, raw.to_str().unwrap()],
    );
    let theirs = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    if let Some(i) = theirs.iter().zip(&model.0).position(|(a, b)| a != b) {
        panic!(
            "{}: qemu-img reads differently from the model at {i}",
            path.display()
        );
    }
}

#[test]
fn random_writes_zeroes_discards_and_compressed_clusters() {
    let Some(d) = needs("qemu-img") else { return };
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
        create(
            &path,
            &CreateOptions {
                size,
                cluster_size: cs,
                refcount_bits: rb,
                extended_l2: ext,
                compression: comp,
                ..Default::default()
            },
        )
        .unwrap();
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
                    let data: Vec<u8> = (0..cs)
                        .map(|i| if i % 7 == 0 { byte } else { (i / 100) as u8 })
                        .collect();
                    w.write_compressed(&[(gc, compress_cluster(comp, &data))])
                        .unwrap();
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
        assert_check_clean(&path);
        assert_contents(&path, &model);
    }
}

/// Random writes into an image QEMU made; returns the model of what it must now read.
fn scribble(path: &Path, seed: u64, ops: usize) -> Model {
    let dir = path.parent().unwrap();
    let raw = path.with_extension("before.raw");
    let name = path.file_name().unwrap().to_str().unwrap();
    qemu_img(dir, &["convert", "-O", "raw", name, raw.to_str().unwrap()]);
    let mut model = Model(std::fs::read(&raw).unwrap());
    std::fs::remove_file(&raw).unwrap();
    let size = model.0.len() as u64;
    let mut w = Writer::open(path).unwrap();
    let mut rng = Lcg(seed);
    for _ in 0..ops {
        let off = rng.below(size / 512) * 512;
        let len = (1 + rng.below(200_000)).min(size - off);
        match rng.below(6) {
            0 => {
                w.write_zeroes(off, len).unwrap();
                model.0[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                let data = vec![rng.below(256) as u8; len as usize];
                w.write_at(&data, off).unwrap();
                model.0[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
    }
    w.flush().unwrap();
    model
}

fn snapshot_sums(dir: &Path, image: &str, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .map(|s| sha256_bytes(&render(dir, image, Some(s))))
        .collect()
}

#[test]
fn writes_into_images_with_internal_snapshots_copy_on_write() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    for (name, opts) in [
        ("s64k.qcow2", "cluster_size=64k"),
        ("s4k.qcow2", "cluster_size=4k,refcount_bits=8"),
        ("sext.qcow2", "extended_l2=on,cluster_size=32k"),
    ] {
        qemu_img_create(p, &format!("-f qcow2 -o {opts} {name} 4M"));
        qemu_io(p, name, &["write -P 1 0 3M", "write -c -P 2 3M 64k"]);
        qemu_img(p, &["snapshot", "-c", "a", name]);
        qemu_io(p, name, &["write -P 3 1M 1M"]);
        qemu_img(p, &["snapshot", "-c", "b", name]);
        let before = snapshot_sums(p, name, &["a", "b"]);
        let model = scribble(&p.join(name), 7, 60);
        assert_check_clean(&p.join(name));
        assert_contents(&p.join(name), &model);
        assert_eq!(
            snapshot_sums(p, name, &["a", "b"]),
            before,
            "{name}: snapshots changed"
        );
    }
}

#[test]
fn writes_over_backing_files_and_into_data_files() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    qemu_img_create(p, "-f qcow2 base.qcow2 4M");
    qemu_io(p, "base.qcow2", &["write -P 9 0 4M"]);
    let base_sum = sha256_file(&p.join("base.qcow2"));
    for (name, opts) in [
        ("over.qcow2", "cluster_size=64k"),
        ("over-ext.qcow2", "extended_l2=on,cluster_size=64k"),
        ("over-v2.qcow2", "compat=0.10"),
    ] {
        qemu_img_create(
            p,
            &format!("-f qcow2 -o {opts} -b base.qcow2 -F qcow2 {name}"),
        );
        let model = scribble(&p.join(name), 11, 60);
        assert_check_clean(&p.join(name));
        assert_contents(&p.join(name), &model);
    }
    assert_eq!(
        sha256_file(&p.join("base.qcow2")),
        base_sum,
        "the backing file must not change"
    );
    for (name, opts) in [
        ("df.qcow2", "data_file=df.data"),
        ("dfr.qcow2", "data_file=dfr.data,data_file_raw=on"),
    ] {
        qemu_img_create(p, &format!("-f qcow2 -o {opts} {name} 4M"));
        qemu_io(p, name, &["write -P 5 0 1M"]);
        let model = scribble(&p.join(name), 13, 40);
        assert_check_clean(&p.join(name));
        assert_contents(&p.join(name), &model);
    }
}

#[test]
fn internal_snapshots_created_applied_and_deleted() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    for (name, opts) in [
        ("snap.qcow2", "cluster_size=64k"),
        ("snap-ext.qcow2", "extended_l2=on,cluster_size=16k"),
        ("snap-small.qcow2", "cluster_size=512"),
    ] {
        qemu_img_create(p, &format!("-f qcow2 -o {opts} {name} 2M"));
        qemu_io(p, name, &["write -P 1 0 1M", "write -c -P 2 1M 64k"]);
        let path = p.join(name);
        // Ours: snapshot, write, snapshot, write.
        let mut w = Writer::open(&path).unwrap();
        let s1 = w.create_snapshot("one").unwrap();
        w.write_at(&vec![3u8; 300_000], 100_000).unwrap();
        w.write_zeroes(500_000, 200_000).unwrap();
        w.flush().unwrap();
        let s2 = w.create_snapshot("two").unwrap();
        assert_eq!((s1.id.as_str(), s2.id.as_str()), ("1", "2"));
        w.write_at(&vec![4u8; 70_000], 1_000_000).unwrap();
        w.flush().unwrap();
        drop(w);
        assert_check_clean(&path);
        let listed = qemu_img(p, &["snapshot", "-l", name]);
        assert!(listed.contains("one") && listed.contains("two"), "{listed}");
        // Each snapshot renders the state at its creation, per qemu-img and per us.
        let mut expected_one = vec![1u8; 1 << 20];
        expected_one.resize(2 << 20, 0);
        expected_one[1 << 20..(1 << 20) + 65536].fill(2);
        let mut expected_two = expected_one.clone();
        expected_two[100_000..400_000].fill(3);
        expected_two[500_000..700_000].fill(0);
        let mut expected_now = expected_two.clone();
        expected_now[1_000_000..1_070_000].fill(4);
        for (snap, want) in [("one", &expected_one), ("two", &expected_two)] {
            let out = p.join("s.raw");
            qemu_img(
                p,
                &[
                    "convert",
                    "-O",
                    "raw",
                    "-l",
                    &format!("snapshot.name={snap}"),
                    name,
                    out.to_str().unwrap(),
                ],
            );
            assert!(
                std::fs::read(&out).unwrap() == *want,
                "{name}@{snap} per qemu-img"
            );
            let mut disk = Disk::open(&path).unwrap();
            disk.select_snapshot(snap).unwrap();
            let mut buf = vec![0u8; 2 << 20];
            disk.read_at(&mut buf, 0).unwrap();
            assert!(buf == *want, "{name}@{snap} per us");
        }
        assert_contents(&path, &Model(expected_now));
        // Apply "one", then delete both: clean at every step.
        let mut w = Writer::open(&path).unwrap();
        w.apply_snapshot("one").unwrap();
        drop(w);
        assert_check_clean(&path);
        assert_contents(&path, &Model(expected_one.clone()));
        let mut w = Writer::open(&path).unwrap();
        w.delete_snapshot("two").unwrap();
        w.delete_snapshot("1").unwrap();
        w.write_at(&[5u8; 4096], 0).unwrap();
        w.flush().unwrap();
        drop(w);
        assert_check_clean(&path);
        expected_one[..4096].fill(5);
        assert_contents(&path, &Model(expected_one));
        assert!(!qemu_img(p, &["snapshot", "-l", name]).contains("one"));
    }
}

#[test]
fn snapshots_made_by_qemu_applied_and_deleted_by_us() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    qemu_img_create(p, "-f qcow2 q.qcow2 4M");
    qemu_io(p, "q.qcow2", &["write -P 1 0 2M"]);
    qemu_img(p, &["snapshot", "-c", "a", "q.qcow2"]);
    qemu_io(p, "q.qcow2", &["write -P 2 1M 2M"]);
    qemu_img(p, &["snapshot", "-c", "b", "q.qcow2"]);
    qemu_io(p, "q.qcow2", &["write -P 3 0 64k"]);
    let a = snapshot_sums(p, "q.qcow2", &["a"]);
    let path = p.join("q.qcow2");
    let mut w = Writer::open(&path).unwrap();
    w.delete_snapshot("b").unwrap();
    drop(w);
    assert_check_clean(&path);
    let mut w = Writer::open(&path).unwrap();
    w.apply_snapshot("a").unwrap();
    drop(w);
    assert_check_clean(&path);
    let now = p.join("now.raw");
    qemu_img(
        p,
        &["convert", "-O", "raw", "q.qcow2", now.to_str().unwrap()],
    );
    assert_eq!(vec![sha256_file(&now)], a);
}

#[test]
fn backing_file_name_changes_in_place() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    qemu_img_create(p, "-f qcow2 a.qcow2 4M");
    qemu_io(p, "a.qcow2", &["write -P 1 0 4M"]);
    let long =
        "a-much-longer-backing-file-name-than-before-with-more-than-sixty-four-characters.qcow2";
    std::fs::copy(p.join("a.qcow2"), p.join(long)).unwrap();
    qemu_img_create(p, "-f qcow2 b.qcow2 4M");
    qemu_io(p, "b.qcow2", &["write -P 2 1M 64k"]);
    let path = p.join("b.qcow2");
    let info = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&qemu_img(p, &["info", "--output=json", "b.qcow2"])).unwrap()
    };
    let mut expected = vec![1u8; 4 << 20];
    expected[1 << 20..(1 << 20) + 65536].fill(2);
    for (name, fmt) in [
        ("a.qcow2", Some(qmpbackup::qcow2::Format::Qcow2)),
        (long, Some(qmpbackup::qcow2::Format::Qcow2)),
        ("a.qcow2", None),
    ] {
        let mut w = Writer::open(&path).unwrap();
        w.set_backing(Some((name, fmt))).unwrap();
        drop(w);
        let i = info(p);
        assert_eq!(i["backing-filename"], name);
        assert_eq!(i["backing-filename-format"].as_str(), fmt.map(|f| f.name()));
        assert_check_clean(&path);
        assert_contents(&path, &Model(expected.clone()));
    }
    // Removing it: unallocated clusters read as zeros again.
    let mut w = Writer::open(&path).unwrap();
    w.set_backing(None).unwrap();
    w.write_at(&[3u8; 512], 0).unwrap();
    w.flush().unwrap();
    drop(w);
    assert!(info(p).get("backing-filename").is_none());
    let mut now = vec![0u8; 4 << 20];
    now[1 << 20..(1 << 20) + 65536].fill(2);
    now[..512].fill(3);
    assert_check_clean(&path);
    assert_contents(&path, &Model(now));
    // A backing file that does not exist is refused and nothing changes.
    let before = sha256_file(&path);
    assert!(Writer::open(&path)
        .unwrap()
        .set_backing(Some(("missing.qcow2", None)))
        .is_err());
    assert_eq!(sha256_file(&path), before);
}

#[test]
fn persistent_bitmaps_are_never_left_silently_stale() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    qemu_img_create(p, "-f qcow2 bm.qcow2 4M");
    run(std::process::Command::new("qemu-img")
        .current_dir(p)
        .args(["bitmap", "--add", "bm.qcow2", "b0"]));
    // An unknown autoclear bit (5) must be cleared by a writer that does not know it.
    let path = p.join("bm.qcow2");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[95] |= 1 << 5;
    std::fs::write(&path, &bytes).unwrap();
    let info = || -> serde_json::Value {
        serde_json::from_str(&qemu_img(p, &["info", "--output=json", "bm.qcow2"])).unwrap()
    };
    assert_eq!(
        info()["format-specific"]["data"]["bitmaps"][0]["flags"],
        serde_json::json!(["auto"])
    );
    let mut w = Writer::open(&path).unwrap();
    w.write_at(&[7u8; 65536], 0).unwrap();
    w.flush().unwrap();
    drop(w);
    // QEMU now sees the bitmap as in use (inconsistent), not as a valid record of changes.
    let flags = info()["format-specific"]["data"]["bitmaps"][0]["flags"].clone();
    assert!(
        flags
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("in-use")),
        "{flags}"
    );
    let h = qmpbackup::qcow2::header::Header::parse(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(h.autoclear_features & (1 << 5), 0);
    assert_check_clean(&path);
}

#[test]
fn refcount_table_growth_is_consistent_after_every_flush() {
    if !have("qemu-img") {
        return;
    }
    // 512-byte clusters with 64-bit refcounts: one refcount block covers 32 KiB and the first
    // table 2 MiB, so this write creates many blocks and moves the table several times.
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("g.qcow2");
    create(
        &path,
        &CreateOptions {
            size: 16 << 20,
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        },
    )
    .unwrap();
    let mut w = Writer::open(&path).unwrap();
    let mut model = Model(vec![0u8; 16 << 20]);
    for i in 0..40u64 {
        let off = i * 300_000 + 7;
        let data = vec![(i + 1) as u8; 250_000];
        w.write_at(&data, off).unwrap();
        model.0[off as usize..off as usize + data.len()].copy_from_slice(&data);
        w.flush().unwrap();
        let r = qmpbackup::qcow2::check::check(&path).unwrap();
        assert_eq!(
            (r.corruptions, r.leaks),
            (0, 0),
            "after write {i}: {:?}",
            &r.messages[..r.messages.len().min(4)]
        );
    }
    drop(w);
    let h = qmpbackup::qcow2::header::Header::parse(&std::fs::read(&path).unwrap()).unwrap();
    assert!(h.refcount_table_clusters > 1, "the table should have grown");
    assert_check_clean(&path);
    assert_contents(&path, &model);
}

/// Growing the virtual size, with and without a larger L1 table, with an internal snapshot
/// (which keeps its own size): qemu-img check is clean and the image equals one qemu-img
/// resized and wrote the same way.
#[test]
fn growing_the_virtual_size_matches_qemu_img_resize() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    for (cluster, from, to) in [(512u64, 1u64 << 20, 5u64 << 20), (65536, 8 << 20, 12 << 20)] {
        for f in ["ours.qcow2", "theirs.qcow2"] {
            let _ = std::fs::remove_file(dir.join(f));
            qemu_img(
                dir,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("cluster_size={cluster}"),
                    f,
                    &from.to_string(),
                ],
            );
            qemu_io(
                dir,
                f,
                &[
                    format!("write -P 0x31 0 {}", from / 2),
                    format!("write -P 0x32 {} 4096", from - 4096),
                ],
            );
            qemu_img(dir, &["snapshot", "-c", "before", f]);
        }
        let mut w = Writer::open(&dir.join("ours.qcow2")).unwrap();
        w.grow(to).unwrap();
        w.write_at(&vec![0x33; 8192], to - 8192).unwrap();
        w.write_at(&vec![0x34; 4096], from).unwrap();
        w.finish().unwrap();
        qemu_img(dir, &["resize", "-q", "theirs.qcow2", &to.to_string()]);
        qemu_io(
            dir,
            "theirs.qcow2",
            &[
                format!("write -P 0x33 {} 8192", to - 8192),
                format!("write -P 0x34 {from} 4096"),
            ],
        );
        assert_check_clean(&dir.join("ours.qcow2"));
        let info = qemu_img(dir, &["info", "--output=json", "ours.qcow2"]);
        assert!(info.contains(&format!("\"virtual-size\": {to}")), "{info}");
        assert_eq!(
            render(dir, "ours.qcow2", None),
            render(dir, "theirs.qcow2", None)
        );
        assert_eq!(
            render(dir, "ours.qcow2", Some("before")),
            render(dir, "theirs.qcow2", Some("before"))
        );
        assert!(
            Writer::open(&dir.join("ours.qcow2"))
                .unwrap()
                .grow(from)
                .is_err(),
            "no shrinking"
        );
    }
}
