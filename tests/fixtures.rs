//! Reading the committed fixtures (made by testdata/make-fixtures.sh with QEMU's tools):
//! contents, maps and info must equal what qemu-img recorded. Runs without qemu-img.

mod common;

use common::*;
use qmpbackup::chain::info;
use qmpbackup::qcow2::Disk;
use serde_json::Value;

fn sums() -> Vec<(String, String)> {
    std::fs::read_to_string(fixtures().join("SHA256SUMS"))
        .unwrap()
        .lines()
        .map(|l| {
            let (sum, name) = l.split_once(' ').unwrap();
            (sum.to_string(), name.to_string())
        })
        .collect()
}

#[test]
fn every_fixture_reads_like_qemu_img_convert() {
    let all = sums();
    assert!(all.len() >= 25, "fixture list is incomplete");
    for (sum, name) in all {
        let (file, snap) = match name.split_once('@') {
            Some((f, s)) => (f, Some(s)),
            None => (name.as_str(), None),
        };
        let mut disk = Disk::open(&fixtures().join(file)).unwrap();
        if let Some(s) = snap {
            disk.select_snapshot(s).unwrap();
        }
        assert_eq!(sha256_of(&disk), sum, "{name}");
    }
}

#[test]
fn every_fixture_maps_like_qemu_img_map() {
    for (_, name) in sums().into_iter().filter(|(_, n)| !n.contains('@')) {
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("{name}.map.json"))).unwrap(),
        )
        .unwrap();
        let disk = Disk::open(&fixtures().join(&name)).unwrap();
        assert_eq!(our_map(&disk), expected, "{name}");
    }
}

/// Fields whose values depend on where and how the file was written, not on the image.
const VOLATILE: [&str; 4] = [
    "filename",
    "full-backing-filename",
    "actual-size",
    "children",
];

#[test]
fn every_fixture_describes_like_qemu_img_info() {
    for (_, name) in sums().into_iter().filter(|(_, n)| !n.contains('@')) {
        let mut expected: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("{name}.info.json"))).unwrap(),
        )
        .unwrap();
        let disk = Disk::open(&fixtures().join(&name)).unwrap();
        let mut ours = serde_json::to_value(info::describe(disk.top())).unwrap();
        for v in [&mut expected, &mut ours] {
            for k in VOLATILE {
                v.as_object_mut().unwrap().remove(k);
            }
        }
        assert_eq!(ours, expected, "{name}");
    }
}

#[test]
fn sample_chain_renders_the_recorded_state() {
    let line = std::fs::read_to_string(sample_chain().join("SHA256SUMS")).unwrap();
    let (sum, name) = line.trim().split_once(' ').unwrap();
    let disk = Disk::open(&sample_chain().join("disk.qcow2").join(name)).unwrap();
    assert_eq!(disk.chain().count(), 3);
    assert_eq!(sha256_of(&disk), sum);
}

#[test]
fn features_are_recognised() {
    let open = |n: &str| Disk::open(&fixtures().join(n)).unwrap();
    let d = open("extl2.qcow2");
    assert!(d.qcow2().unwrap().header().extended_l2());
    let d = open("snap.qcow2");
    let names: Vec<_> = d
        .qcow2()
        .unwrap()
        .snapshots()
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["first", "second"]);
    assert_eq!(
        open("snap.qcow2").qcow2().unwrap().snapshots()[0].disk_size,
        Some(2 << 20)
    );
    let d = open("bitmap.qcow2");
    assert_eq!(d.qcow2().unwrap().bitmaps()[0].name, "b0");
    assert!(open("dirty.qcow2").qcow2().unwrap().header().dirty());
    assert!(open("corrupt.qcow2").qcow2().unwrap().header().corrupt());
    let top = open("top.qcow2");
    let formats: Vec<_> = top.chain().map(|d| d.format().name()).collect();
    assert_eq!(formats, ["qcow2", "qcow2", "qcow2"]);
    let over = open("over-raw.qcow2");
    assert_eq!(over.chain().nth(1).unwrap().format().name(), "raw");
}

#[test]
fn refcounts_cover_every_mapped_cluster() {
    for name in [
        "v3.qcow2",
        "rc1.qcow2",
        "rc64.qcow2",
        "zlib.qcow2",
        "snap.qcow2",
        "cs512.qcow2",
    ] {
        let disk = Disk::open(&fixtures().join(name)).unwrap();
        let q = disk.qcow2().unwrap();
        let cs = q.cluster_size();
        assert_eq!(q.refcount(0).unwrap(), 1, "{name}: header cluster");
        disk.for_each_extent(0, disk.size(), |e| {
            if let (Some(off), 0) = (e.offset, e.depth) {
                let mut c = off / cs;
                while c * cs < off + e.length {
                    let rc = q.refcount(c).unwrap();
                    assert!(rc >= 1, "{name}: cluster {c} is mapped but has refcount 0");
                    c += 1;
                }
            }
            Ok(())
        })
        .unwrap();
        // Past the end of the file nothing is referenced.
        assert_eq!(q.refcount(q.file_len() / cs + 1000).unwrap(), 0, "{name}");
    }
}

/// The merged map answers for every offset of the disk and refuses one past its end with an
/// error naming the image (never an index out of bounds).
#[test]
fn extents_end_at_the_end_of_the_disk() {
    let disk = Disk::open(&fixtures().join("cs512.qcow2")).unwrap();
    let size = disk.size();
    let last = disk.extent_at(size - 1, 1).unwrap();
    assert_eq!((last.start, last.length), (size - 1, 1));
    let err = disk.extent_at(size, 1).unwrap_err().to_string();
    assert!(
        err.contains("past the end of the disk") && err.contains("cs512.qcow2"),
        "{err}"
    );
}
