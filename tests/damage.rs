//! What `verify` reports about damage: the guest bytes that damaged extents of a backup file
//! held, the metadata they held, and the restore points that read them. Judged against the
//! reference: every restore point of the damaged chain is restored and compared with the disk
//! at that backup by `qemu-img compare`; the points that come out wrong are exactly the ones
//! verify names, and every wrong byte lies in a guest range it names.

mod common;

use common::chains::{build, Backups};
use common::*;
use qmpbackup::qcow2::Disk;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

/// XORs `len` bytes of `path` at `at` with 0xff (applied twice, it undoes itself).
fn flip(path: &Path, at: u64, len: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, at).unwrap();
    buf.iter_mut().for_each(|b| *b ^= 0xff);
    f.write_all_at(&buf, at).unwrap();
}

/// The data extents of a backup file alone: (guest start, length, host offset).
fn data_extents(path: &Path) -> Vec<(u64, u64, u64)> {
    let disk = Disk::open_alone(path).unwrap();
    let mut out = Vec::new();
    disk.for_each_extent(0, disk.size(), |e| {
        if e.data && !e.compressed {
            out.push((e.start, e.length, e.offset.unwrap()));
        }
        Ok(())
    })
    .unwrap();
    out
}

/// The verify report's problems (JSON), checking the exit code.
fn problems(b: &Backups) -> Vec<Value> {
    let o = b.qmprestore("verify", &["--json"]);
    let v = json_of(&o);
    assert_eq!(o.status.code(), Some(1), "{v}");
    v["dirs"][0]["problems"].as_array().unwrap().clone()
}

/// The restore points of `b` that no longer restore to the disk at their backup, with the
/// guest offsets of the first differing bytes, by merging each and asking qemu-img.
fn points_restoring_wrong(b: &Backups) -> Vec<(String, u64)> {
    let mut wrong = Vec::new();
    for (j, name) in b.names.iter().enumerate() {
        let out = b.root().join("point.qcow2");
        b.merge(&["--force", "--until", name], &out);
        let o = Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&out)
            .arg(&b.expected[j])
            .output()
            .unwrap();
        match o.status.code() {
            Some(0) => {}
            Some(1) => {
                // "Content mismatch at offset N!"
                let text = String::from_utf8_lossy(&o.stdout);
                let at = text
                    .split("offset ")
                    .nth(1)
                    .and_then(|t| {
                        t.trim_end_matches(|c: char| !c.is_ascii_digit())
                            .parse()
                            .ok()
                    })
                    .unwrap_or_else(|| panic!("qemu-img compare said: {text}"));
                wrong.push((name.clone(), at));
            }
            _ => panic!("qemu-img compare failed: {o:?}"),
        }
    }
    wrong
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// In each file of a chain, every data byte of one damaged MiB: verify names the guest
/// ranges (each within the damaged extent's data) and exactly the restore points that
/// restore wrong, and each first wrong byte lies in a named range. Restored, the chain
/// verifies again.
#[test]
fn damaged_data_names_its_guest_bytes_and_exactly_the_points_that_restore_wrong() {
    if !have("qemu-img") {
        return;
    }
    let b = build(4, false, "", None);
    b.write_manifests();
    for name in &b.names {
        let path = b.dir.join(name);
        // The MiB of the file that holds its first data cluster; every data byte of it.
        let extents = data_extents(&path);
        let first = extents.first().expect("every backup file holds data").2;
        let mib = first / MIB * MIB;
        let hit: Vec<(u64, u64)> = extents
            .iter()
            .filter_map(|&(_, len, host)| {
                let (lo, hi) = (host.max(mib), (host + len).min(mib + MIB));
                (lo < hi).then(|| (lo, hi - lo))
            })
            .collect();
        hit.iter().for_each(|&(at, len)| flip(&path, at, len));

        let found = problems(&b);
        let data: Vec<&Value> = found.iter().filter(|p| p["kind"] == "data").collect();
        assert!(!data.is_empty(), "{name}: {found:?}");
        let mut named = Vec::new();
        for p in &data {
            assert_eq!(p["file"], name.as_str());
            assert_eq!(p["offset"], mib, "{p}");
            assert!(
                p["problem"].as_str().unwrap().contains("checksum mismatch"),
                "{p}"
            );
            assert!(p["guest_length"].as_u64().unwrap() <= MIB, "{p}");
            for point in strings(&p["affected_restore_points"]) {
                if !named.contains(&point) {
                    named.push(point);
                }
            }
        }
        let ranges: Vec<(u64, u64)> = data
            .iter()
            .map(|p| {
                let s = p["guest_start"].as_u64().unwrap();
                (s, s + p["guest_length"].as_u64().unwrap())
            })
            .collect();
        let wrong = points_restoring_wrong(&b);
        let wrong_names: Vec<String> = wrong.iter().map(|(n, _)| n.clone()).collect();
        named.sort_by_key(|n| b.names.iter().position(|x| x == n));
        assert_eq!(
            named, wrong_names,
            "{name}: verify named {named:?}; restoring shows {wrong:?}"
        );
        assert_eq!(
            named.first(),
            Some(name),
            "the damaged file's own point is hit"
        );
        for (point, at) in &wrong {
            assert!(
                ranges.iter().any(|&(s, e)| (s..e).contains(at)),
                "{point}: byte {at} restores wrong, outside the named ranges {ranges:?}"
            );
        }
        hit.iter().for_each(|&(at, len)| flip(&path, at, len));
        assert_verifies(&b.dir);
    }
}

/// Damaged metadata is named as such with the structures its extent held, and affects the file's
/// restore point and every later one; the human report says the guest bytes and the points.
#[test]
fn damaged_metadata_is_named_and_affects_every_later_point() {
    if !have("qemu-img") {
        return;
    }
    let b = build(3, false, "", None);
    b.write_manifests();
    // The padding at the end of the INC's header cluster: the image still opens.
    let inc = b.dir.join(&b.names[1]);
    flip(&inc, 65535, 1);
    let found = problems(&b);
    let meta: Vec<&Value> = found.iter().filter(|p| p["kind"] == "metadata").collect();
    assert_eq!(meta.len(), 1, "{found:?}");
    assert_eq!(meta[0]["file"], b.names[1].as_str());
    // Everything a small image keeps in its first MiB: the damaged extent held all of it.
    assert!(
        strings(&meta[0]["holds"]).contains(&"header".to_string()),
        "{meta:?}"
    );
    assert_eq!(strings(&meta[0]["affected_restore_points"]), b.names[1..]);
    assert!(meta[0].get("guest_start").is_none());
    flip(&inc, 65535, 1);

    // An L2 table of the FULL.
    let full = b.dir.join(&b.names[0]);
    let l2 = {
        let bytes = std::fs::read(&full).unwrap();
        let h = qmpbackup::qcow2::header::Header::parse(&bytes).unwrap();
        let at = h.l1_table_offset as usize;
        u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00
    };
    flip(&full, l2 + 8 * 1000, 1);
    let o = b.qmprestore("verify", &[]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{text}");
    let holding = text
        .lines()
        .find(|l| l.contains("holding: "))
        .unwrap_or_default();
    assert!(
        text.contains("damaged metadata") && holding.contains("L2 table"),
        "{text}"
    );
    assert!(
        text.contains(&format!("affected restore points: {}", b.names.join(", "))),
        "{text}"
    );
    flip(&full, l2 + 8 * 1000, 1);

    // Guest data, in words: the range and the points.
    let (guest, _, host) = data_extents(&b.dir.join(&b.names[2]))[0];
    flip(&b.dir.join(&b.names[2]), host, 1);
    let o = b.qmprestore("verify", &[]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("damaged guest data"), "{text}");
    assert!(text.contains(&format!("guest bytes {guest}..")), "{text}");
    assert!(text.contains("affected restore points: "), "{text}");
}

/// Manifests written before this version (64 MiB extents, a list of CRCs) still verify, and
/// damage under them is still told in guest ranges.
#[test]
fn version_1_manifests_still_verify() {
    if !have("qemu-img") {
        return;
    }
    let b = build(2, false, "", None);
    b.write_manifests();
    for name in &b.names {
        let path = b.dir.join(".manifest").join(format!("{name}.json"));
        let mut m: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let data = std::fs::read(b.dir.join(name)).unwrap();
        let crcs: Vec<String> = data
            .chunks(64 << 20)
            .map(|c| format!("{:08x}", crc32fast::hash(c)))
            .collect();
        let o = m.as_object_mut().unwrap();
        o.remove("crc32s");
        o.insert("manifest_version".into(), 1.into());
        o.insert("extent_size".into(), (64u64 << 20).into());
        o.insert("crc32".into(), crcs.into());
        std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    }
    assert_verifies(&b.dir);
    let (_, _, host) = data_extents(&b.dir.join(&b.names[1]))[0];
    flip(&b.dir.join(&b.names[1]), host, 1);
    let found = problems(&b);
    assert!(
        found
            .iter()
            .any(|p| p["kind"] == "data" && p["file"] == b.names[1].as_str() && p["offset"] == 0),
        "{found:?}"
    );
}
