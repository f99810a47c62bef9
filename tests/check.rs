//! Our `check` against `qemu-img check` on damaged images, and repairs verified by qemu-img.

mod common;

use byteorder::{BigEndian, ByteOrder};
use common::*;
use qmpbackup::qcow2::check::{check, repair, Repair};
use qmpbackup::qcow2::header::Header;

/// Offset of the refcount entry (16-bit refcounts) of host cluster `c`.
fn refcount_entry(b: &[u8], c: u64) -> usize {
    let h = Header::parse(b).unwrap();
    let block = BigEndian::read_u64(&b[h.refcount_table_offset as usize..]) & !0x1ff;
    (block + c * 2) as usize
}

fn l2_entry(b: &[u8], index: u64) -> usize {
    let h = Header::parse(b).unwrap();
    let l2 = BigEndian::read_u64(&b[h.l1_table_offset as usize..]) & 0x00ff_ffff_ffff_fe00;
    (l2 + index * 8) as usize
}

/// Offset of the first snapshot table entry.
fn snapshot_entry(b: &[u8]) -> usize {
    Header::parse(b).unwrap().snapshots_offset as usize
}

fn qmprestore(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn damaged_images_are_classified_like_qemu_img() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    qemu_img_create(p, "-f qcow2 base.qcow2 8M");
    qemu_io(p, "base.qcow2", &["write -P 1 0 1M", "write -P 2 4M 64k"]);
    qemu_img(p, &["snapshot", "-c", "s", "base.qcow2"]);
    qemu_io(p, "base.qcow2", &["write -P 3 0 64k"]);
    let pristine = std::fs::read(p.join("base.qcow2")).unwrap();
    let data_cluster = |b: &[u8], i: u64| {
        (BigEndian::read_u64(&b[l2_entry(b, i)..]) & 0x00ff_ffff_ffff_fe00) / 65536
    };
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Damage)> = vec![
        ("clean", Box::new(|_| {})),
        (
            "refcount-low",
            Box::new(move |b| {
                let c = data_cluster(b, 5);
                let e = refcount_entry(b, c);
                let v = BigEndian::read_u16(&b[e..]);
                BigEndian::write_u16(&mut b[e..], v - 1);
            }),
        ),
        (
            "refcount-high",
            Box::new(move |b| {
                let c = data_cluster(b, 5);
                let e = refcount_entry(b, c);
                let v = BigEndian::read_u16(&b[e..]);
                BigEndian::write_u16(&mut b[e..], v + 1);
            }),
        ),
        (
            "leak",
            Box::new(|b| {
                let n = b.len() as u64 / 65536;
                b.extend(vec![0u8; 65536]);
                let e = refcount_entry(b, n);
                BigEndian::write_u16(&mut b[e..], 1);
            }),
        ),
        (
            "referenced-twice",
            Box::new(move |b| {
                let a = l2_entry(b, 6);
                let w = BigEndian::read_u64(&b[l2_entry(b, 64)..]);
                BigEndian::write_u64(&mut b[a..], w);
            }),
        ),
        (
            "l2-entry-past-eof",
            Box::new(move |b| {
                let a = l2_entry(b, 7);
                BigEndian::write_u64(&mut b[a..], (1 << 63) | (1 << 30));
            }),
        ),
        // Snapshot tables a normal open refuses; check reports them (as QEMU's does).
        (
            "snapshot-table-past-eof",
            Box::new(|b| {
                let past = (b.len() as u64 / 65536 + 4) * 65536;
                BigEndian::write_u64(&mut b[64..], past);
            }),
        ),
        (
            "snapshot-l1-unaligned",
            Box::new(|b| {
                let e = snapshot_entry(b);
                let l1 = BigEndian::read_u64(&b[e..]);
                BigEndian::write_u64(&mut b[e..], l1 + 0x200);
            }),
        ),
        (
            "snapshot-l1-oversized",
            Box::new(|b| {
                let e = snapshot_entry(b);
                BigEndian::write_u32(&mut b[e + 8..], 0x1000_0000);
            }),
        ),
        // Refcount structures only a new one repairs (QEMU rebuilds them too).
        (
            "refcount-table-on-header",
            Box::new(|b| BigEndian::write_u64(&mut b[48..], 0)),
        ),
        (
            "refcount-table-on-header-2-clusters",
            Box::new(|b| {
                BigEndian::write_u64(&mut b[48..], 0);
                BigEndian::write_u32(&mut b[56..], 2);
            }),
        ),
        (
            "refcount-table-on-l1",
            Box::new(|b| {
                let l1 = BigEndian::read_u64(&b[40..]);
                BigEndian::write_u64(&mut b[48..], l1);
            }),
        ),
        (
            "refcount-entry-reserved-bits",
            Box::new(|b| {
                let t = Header::parse(b).unwrap().refcount_table_offset as usize;
                b[t + 7] |= 0x01;
            }),
        ),
        (
            "refcount-block-unaligned",
            Box::new(|b| {
                let t = Header::parse(b).unwrap().refcount_table_offset as usize;
                let e = BigEndian::read_u64(&b[t..]);
                BigEndian::write_u64(&mut b[t..], e + 0x200);
            }),
        ),
        (
            "refcount-block-on-l1",
            Box::new(|b| {
                let t = Header::parse(b).unwrap().refcount_table_offset as usize;
                let l1 = BigEndian::read_u64(&b[40..]);
                BigEndian::write_u64(&mut b[t..], l1);
            }),
        ),
        (
            "no-refcount-table",
            Box::new(|b| BigEndian::write_u32(&mut b[56..], 0)),
        ),
        // Version 3 entries need 16 bytes of extra data; this one is cut to 8.
        (
            "v3-snapshot-entry-incomplete",
            Box::new(|b| {
                let e = snapshot_entry(b);
                let extra = BigEndian::read_u32(&b[e + 36..]) as usize;
                let id_name = (BigEndian::read_u16(&b[e + 12..])
                    + BigEndian::read_u16(&b[e + 14..])) as usize;
                let old_len = (40 + extra + id_name).div_ceil(8) * 8;
                let mut entry = b[e..e + 48].to_vec();
                BigEndian::write_u32(&mut entry[36..], 8);
                entry.extend_from_slice(&b[e + 40 + extra..e + 40 + extra + id_name]);
                entry.resize(old_len, 0);
                b[e..e + old_len].copy_from_slice(&entry);
            }),
        ),
        (
            "l1-entry-reserved-bits",
            Box::new(|b| {
                let l1 = BigEndian::read_u64(&b[40..]) as usize;
                b[l1 + 7] |= 0x01;
            }),
        ),
        (
            "l2-entry-reserved-bits",
            Box::new(|b| {
                let e = l2_entry(b, 5);
                b[e + 7] |= 0x02;
            }),
        ),
    ];
    for (name, damage) in cases {
        let file = format!("{name}.qcow2");
        let mut bytes = pristine.clone();
        damage(&mut bytes);
        std::fs::write(p.join(&file), &bytes).unwrap();
        let (code, corruptions, leaks) = qemu_check(&p.join(&file));
        let ours = check(&p.join(&file)).unwrap();
        // The one deliberate difference: behind a refcount table entry it cannot follow (an
        // unaligned block; on the L1 table, an entry with bit 63 set) QEMU cannot read
        // refcounts and exits 1 ("Can't get refcount", "Check failed"); we count what lies
        // behind it as corruptions (exit 2), and a repair rebuilds the structure.
        let code = match name {
            "refcount-block-unaligned" | "refcount-table-on-l1" => {
                assert_eq!((code, corruptions > 0), (1, true), "{name}: qemu-img");
                2
            }
            _ => code,
        };
        assert_eq!(
            ours.exit_code() as i32,
            code,
            "{name}: exit code; ours {:?}",
            ours.messages
        );
        assert_eq!(
            (ours.corruptions > 0, ours.leaks > 0),
            (corruptions > 0, leaks > 0),
            "{name}: ours {:?}",
            ours.messages
        );
        // Repairs leave what qemu-img check calls clean, except for damage no refcount repair
        // can undo (a cluster mapped twice, a mapping past the end of the file).
        if name.starts_with("snapshot-") {
            // Reading refuses these images, and so does every writer.
            let img = p.join(&file).display().to_string();
            assert!(!ours.messages.is_empty() && ours.messages[0].contains("snapshot"));
            assert_eq!(qmprestore(&["info", &img]).status.code(), Some(1), "{name}");
            assert_eq!(
                qmprestore(&["snapshot", "-c", "x", &img]).status.code(),
                Some(1)
            );
            assert!(
                std::fs::read(p.join(&file)).unwrap() == bytes,
                "{name} changed"
            );
            continue;
        }
        if ours.corruptions > 0 {
            // Writers refuse what check finds corrupt and leave it as it was.
            let img = p.join(&file).display().to_string();
            let out = qmprestore(&["snapshot", "-c", "x", &img]);
            assert_eq!(out.status.code(), Some(1), "{name}: snapshot -c");
            assert!(
                std::fs::read(p.join(&file)).unwrap() == bytes,
                "{name} changed"
            );
        }
        // Damage no refcount repair undoes: L2 entries (a cluster mapped twice, a mapping past
        // the end of the file, reserved bits) are left for a copy to sort out, as QEMU does.
        if !matches!(
            name,
            "l2-entry-past-eof"
                | "referenced-twice"
                | "l1-entry-reserved-bits"
                | "l2-entry-reserved-bits"
        ) {
            let mode = if corruptions > 0 {
                Repair::All
            } else {
                Repair::Leaks
            };
            repair(&p.join(&file), mode).unwrap();
            assert_eq!(qemu_check(&p.join(&file)), (0, 0, 0), "{name} after repair");
            assert_eq!(check(&p.join(&file)).unwrap().exit_code(), 0);
            // The guest data is what it was.
            let cmp = std::process::Command::new("qemu-img")
                .args(["compare", "-q"])
                .arg(p.join("base.qcow2"))
                .arg(p.join(&file))
                .status()
                .unwrap();
            assert!(cmp.success(), "{name}: data changed by the repair");
        }
    }
}

#[test]
fn dirty_images_are_repaired_before_writing() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    for (name, how) in [("explicit.qcow2", 0), ("on-open.qcow2", 1)] {
        std::fs::copy(fixtures().join("dirty.qcow2"), p.join(name)).unwrap();
        let path = p.join(name);
        if how == 0 {
            assert_eq!(repair(&path, Repair::All).unwrap().exit_code(), 0);
        } else {
            // Opening for writing rebuilds the refcounts first, as QEMU does.
            let mut w = qmpbackup::qcow2::write::Writer::open(&path).unwrap();
            w.write_at(&[9u8; 4096], 8192).unwrap();
            w.flush().unwrap();
        }
        let h = Header::parse(&std::fs::read(&path).unwrap()).unwrap();
        assert!(!h.dirty(), "{name}");
        assert_eq!(qemu_check(&p.join(name)), (0, 0, 0), "{name}");
    }
}

#[test]
fn qemu_made_fixtures_check_clean() {
    for name in [
        "v2.qcow2",
        "v3.qcow2",
        "zlib.qcow2",
        "zstd-convert.qcow2",
        "extl2.qcow2",
        "cs512.qcow2",
        "rc1.qcow2",
        "rc64.qcow2",
        "snap.qcow2",
        "bitmap.qcow2",
        "datafile.qcow2",
        "top.qcow2",
    ] {
        let r = check(&fixtures().join(name)).unwrap();
        assert_eq!(r.exit_code(), 0, "{name}: {:?}", r.messages);
    }
}
