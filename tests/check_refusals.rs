//! `check` opens what the reader refuses (issue #25): one test per refusal the reader makes of
//! an image's metadata. Each image is built as QEMU's own tests build corrupt images (qemu-img
//! create, qemu-io writes, then bytes poked), and on each:
//!
//! - the reader still refuses it (`convert`, or the library where no command reaches the
//!   refusal), and that message, offset included, is an `ERROR` line of `qmprestore check`;
//! - `check` exits as `qemu-img check -f qcow2` does on the same file (2 for corruptions; 1
//!   where QEMU cannot open the image either), except for the two refusals where QEMU finds
//!   nothing wrong, which are named as such;
//! - the human summary and the JSON count every error the check met;
//! - `check -r leaks` and `check -r all` write nothing (exit 1, the file byte for byte as it
//!   was), except where a new refcount structure repairs the fault, which qemu-img must then
//!   find clean with the guest data unchanged.

mod common;

use byteorder::{BigEndian, ByteOrder};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const COPIED: u64 = 1 << 63;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

fn be64(b: &[u8], at: u64) -> u64 {
    BigEndian::read_u64(&b[at as usize..])
}

fn set64(b: &mut [u8], at: u64, v: u64) {
    BigEndian::write_u64(&mut b[at as usize..], v);
}

/// Where the metadata of a qemu-img made image is.
struct Layout {
    l1: u64,
    refcount_table: u64,
    snapshot_table: u64,
}

impl Layout {
    fn of(b: &[u8]) -> Layout {
        Layout {
            l1: be64(b, 40),
            refcount_table: be64(b, 48),
            snapshot_table: be64(b, 64),
        }
    }

    /// The L2 table active L1 entry `i` points to.
    fn l2(&self, b: &[u8], i: u64) -> u64 {
        be64(b, self.l1 + i * 8) & OFFSET_MASK
    }

    /// The first snapshot's L1 table.
    fn snapshot_l1(&self, b: &[u8]) -> u64 {
        be64(b, self.snapshot_table)
    }

    /// The bitmap directory, and the first bitmap's table.
    fn bitmaps(&self, b: &[u8]) -> (u64, u64) {
        let mut pos = BigEndian::read_u32(&b[100..]) as usize;
        while BigEndian::read_u32(&b[pos..]) != 0x2385_2875 {
            pos += 8 + (BigEndian::read_u32(&b[pos + 4..]) as usize).div_ceil(8) * 8;
        }
        let dir = be64(b, pos as u64 + 8 + 16);
        (dir, be64(b, dir))
    }
}

/// A qcow2 image made by qemu-img in `dir` (`size`, options before it when given:
/// `-o cluster_size=4k 64M`), written by qemu-io `io`, then, when `after` is given, with a
/// snapshot `s1` and the writes `after`.
fn image(dir: &Path, name: &str, size: &str, io: &[&str], after: Option<&[&str]>) -> PathBuf {
    let (options, size) = size.rsplit_once(' ').unwrap_or(("", size));
    qemu_img_create(dir, &format!("-f qcow2 {options} {name} {size}"));
    if !io.is_empty() {
        qemu_io(dir, name, io);
    }
    if let Some(after) = after {
        qemu_img(dir, &["snapshot", "-c", "s1", name]);
        if !after.is_empty() {
            qemu_io(dir, name, after);
        }
    }
    dir.join(name)
}

/// The image every test damages: 64 MiB with data at 0 and 32 MiB, a snapshot `s1` taken
/// before cluster 0 was written again (so the active L2 table is a copy), and with
/// `bitmap` a persistent bitmap `b0`.
fn rich(dir: &Path, name: &str, bitmap: bool) -> PathBuf {
    let img = image(
        dir,
        name,
        "64M",
        &["write -P 1 0 1M", "write -P 2 32M 1M"],
        Some(&["write -P 3 0 64k"]),
    );
    if bitmap {
        qemu_img(dir, &["bitmap", "--add", name, "b0"]);
    }
    img
}

/// A copy of `src` as `name`, with `damage` applied to its bytes.
fn damaged(src: &Path, name: &str, damage: impl FnOnce(&mut Vec<u8>, &Layout)) -> PathBuf {
    let mut b = std::fs::read(src).unwrap();
    let layout = Layout::of(&b);
    damage(&mut b, &layout);
    let img = src.with_file_name(name);
    std::fs::write(&img, b).unwrap();
    img
}

/// `qmprestore args`: (exit code, stdout, stderr).
fn qmprestore(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .args(args)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (
        o.status.code().unwrap_or(-1),
        text(&o.stdout),
        text(&o.stderr),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img check -f qcow2`'s exit code (in the image's folder).
fn qemu_check_code(img: &Path) -> i32 {
    Command::new("qemu-img")
        .current_dir(img.parent().unwrap())
        .args(["check", "-f", "qcow2"])
        .arg(img.file_name().unwrap())
        .output()
        .unwrap()
        .status
        .code()
        .unwrap_or(-1)
}

/// What the reader says when asked for the guest data of `img` (of its snapshot when
/// given): `convert` must fail with exit 1; the message after "corrupt image: ".
fn reader_refusal(img: &Path, snapshot: Option<&str>) -> String {
    let out = img.with_extension("out.raw");
    let mut args = vec!["convert", "-O", "raw"];
    if let Some(snap) = snapshot {
        args.extend(["-l", snap]);
    }
    args.extend([s(img), s(&out)]);
    let (code, _, err) = qmprestore(&args);
    assert_eq!(code, 1, "{}: the reader accepts it: {err}", img.display());
    assert!(!out.exists(), "a refused convert left output");
    let (_, refusal) = err
        .trim_end()
        .split_once("corrupt image: ")
        .unwrap_or_else(|| panic!("{}: not a corruption: {err}", img.display()));
    refusal.to_string()
}

/// What QEMU makes of an image whose refusal `check` walks past.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Qemu {
    /// qemu-img check exits as ours does.
    Agrees,
    /// qemu-img check finds nothing (exit 0) where our reader refuses the image: our check
    /// reports the refusal (exit 2), which is what `check` is for.
    FindsNothing,
}

/// The contract for a refusal `check` walks past; returns check's stderr.
fn assert_walked_past(img: &Path, refusal: &str, qemu: Qemu) -> String {
    let name = img.display();
    let before = std::fs::read(img).unwrap();
    let (code, human, err) = qmprestore(&["check", s(img)]);
    assert!(
        err.lines().any(|l| l == format!("ERROR {refusal}")),
        "{name}: check does not report `{refusal}`:\n{err}"
    );
    assert_eq!(code, 2, "{name}: {err}");
    match qemu {
        Qemu::Agrees => assert_eq!(qemu_check_code(img), code, "{name}: qemu-img check"),
        Qemu::FindsNothing => assert_eq!(qemu_check_code(img), 0, "{name}: qemu-img check"),
    }
    // The summary and the JSON count what the check met.
    assert!(
        human.contains("errors were found on the image."),
        "{name}: {human}"
    );
    assert!(!human.contains("No errors"), "{name}: {human}");
    let (_, json, _) = qmprestore(&["check", "--output", "json", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["corruptions"].as_u64().unwrap() > 0, "{name}: {json}");
    assert!(std::fs::read(img).unwrap() == before, "{name}: check wrote");
    err
}

/// Both repairs refuse and write nothing.
fn assert_not_repaired(img: &Path) {
    let before = std::fs::read(img).unwrap();
    for mode in ["leaks", "all"] {
        let (code, _, err) = qmprestore(&["check", "-r", mode, s(img)]);
        assert_eq!(code, 1, "{}: -r {mode}: {err}", img.display());
        assert!(
            err.contains("not repaired, nothing was written"),
            "{}: -r {mode}: {err}",
            img.display()
        );
        assert!(
            std::fs::read(img).unwrap() == before,
            "{}: -r {mode} wrote",
            img.display()
        );
    }
}

/// The reader refuses `img` with `expected`, check reports it and exits as qemu-img check,
/// and no repair writes.
fn assert_refusal_reported(img: &Path, expected: &str) {
    assert_eq!(reader_refusal(img, None), expected);
    assert_walked_past(img, expected, Qemu::Agrees);
    assert_not_repaired(img);
}

/// The regression behind the issue: qemu-iotests 060 points L1 entry 0 at the L1 table
/// itself. `check` exited 1 with the reader's refusal; qemu-img check reports the corruption
/// and exits 2, and so must we.
#[test]
fn l2_table_on_the_l1_table_as_iotests_060() {
    let Some(d) = needs("qemu-img") else { return };
    let base = image(
        d.path(),
        "base.qcow2",
        "64M",
        &["write -P 0x2a 0 512"],
        None,
    );
    let img = damaged(&base, "060.qcow2", |b, l| {
        assert_eq!(l.l1, 0x30000);
        set64(b, l.l1, COPIED | l.l1);
    });
    let refusal = "L2 table at 0x30000 (L1 index 0) overlaps the L1 table";
    assert_refusal_reported(&img, refusal);
    // The other commands keep refusing.
    assert_eq!(qmprestore(&["info", s(&img)]).0, 1);
}

/// An L2 table on each other structure the reader places: the refcount table, the snapshot
/// table, a snapshot's L1 table, the bitmap directory, a bitmap table.
#[test]
fn l2_table_on_other_metadata() {
    let Some(d) = needs("qemu-img") else { return };
    let base = rich(d.path(), "base.qcow2", true);
    type Target = fn(&[u8], &Layout) -> (u64, &'static str);
    let targets: [(&str, Target); 5] = [
        ("rt", |_, l| (l.refcount_table, "the refcount table")),
        ("st", |_, l| (l.snapshot_table, "the snapshot table")),
        ("sl1", |b, l| (l.snapshot_l1(b), "a snapshot's L1 table")),
        ("bd", |b, l| (l.bitmaps(b).0, "the bitmap directory")),
        ("bt", |b, l| (l.bitmaps(b).1, "a bitmap table")),
    ];
    for (name, target) in targets {
        let mut refusal = String::new();
        let img = damaged(&base, &format!("{name}.qcow2"), |b, l| {
            let (at, what) = target(b, l);
            set64(b, l.l1, COPIED | at);
            refusal = format!("L2 table at {at:#x} (L1 index 0) overlaps {what}");
        });
        assert_refusal_reported(&img, &refusal);
    }
}

/// Two entries of one L1 table pointing to the same L2 table: the active table's and a
/// snapshot's (refused when the snapshot is read).
#[test]
fn l1_entries_sharing_an_l2_table() {
    let Some(d) = needs("qemu-img") else { return };
    let io = ["write -P 1 0 1M", "write -P 2 600M 1M"];
    let base = image(
        d.path(),
        "base.qcow2",
        "1G",
        &io,
        Some(&["write -P 3 0 64k"]),
    );
    let mut shared = 0;
    let img = damaged(&base, "active.qcow2", |b, l| {
        shared = l.l2(b, 0);
        let first = be64(b, l.l1);
        set64(b, l.l1 + 8, first);
    });
    let refusal = format!("L1 entries 0 and 1 both point to the L2 table at {shared:#x}");
    assert_refusal_reported(&img, &refusal);
    let img = damaged(&base, "snapshot.qcow2", |b, l| {
        let sl1 = l.snapshot_l1(b);
        shared = be64(b, sl1) & OFFSET_MASK;
        let first = be64(b, sl1);
        set64(b, sl1 + 8, first);
    });
    let refusal = format!("L1 entries 0 and 1 both point to the L2 table at {shared:#x}");
    assert_eq!(reader_refusal(&img, Some("s1")), refusal);
    assert_walked_past(&img, &format!("snapshot 's1': {refusal}"), Qemu::Agrees);
    assert_not_repaired(&img);
}

/// An L2 table offset that is not cluster aligned, and one past the end of the file.
#[test]
fn l2_table_unaligned_or_past_the_end() {
    let Some(d) = needs("qemu-img") else { return };
    let base = rich(d.path(), "base.qcow2", false);
    let len = std::fs::metadata(&base).unwrap().len();
    let mut l2 = 0;
    let img = damaged(&base, "unaligned.qcow2", |b, l| {
        l2 = l.l2(b, 0);
        set64(b, l.l1, COPIED | (l2 + 0x200));
    });
    let refusal = format!(
        "L2 table offset {:#x} is not cluster aligned (L1 index 0)",
        l2 + 0x200
    );
    assert_refusal_reported(&img, &refusal);
    let img = damaged(&base, "past-end.qcow2", |b, l| {
        set64(b, l.l1, COPIED | 0x7fff_0000)
    });
    let refusal =
        format!("L2 table at 0x7fff0000 (L1 index 0) lies past the end of the file ({len} bytes)");
    assert_refusal_reported(&img, &refusal);
}

/// The issue's report: a 64 MiB image with data cut inside its L2 table (bytes 262144 to
/// 327679) was "No errors were found" with exit 0, while qemu-img check counts every data
/// cluster now past the end and exits 2. Cut after the first byte of the table, the entries
/// that remain map nothing: qemu-img finds nothing wrong, but the reader refuses the table
/// and the mapping it lost, so check reports it.
#[test]
fn truncated_inside_an_l2_table() {
    let Some(d) = needs("qemu-img") else { return };
    let io = ["write -P 1 0 1M", "write -P 2 32M 1M"];
    let base = image(d.path(), "base.qcow2", "64M", &io, None);
    let b = std::fs::read(&base).unwrap();
    assert_eq!(
        Layout::of(&b).l2(&b, 0),
        0x40000,
        "the layout this test cuts"
    );
    for cut in [262145u64, 262152, 266248, 300000, 327679] {
        let img = damaged(&base, &format!("cut-{cut}.qcow2"), |b, _| {
            b.truncate(cut as usize)
        });
        let refusal =
            format!("L2 table at 0x40000 (L1 index 0) lies past the end of the file ({cut} bytes)");
        assert_eq!(reader_refusal(&img, None), refusal);
        let qemu = if cut == 262145 {
            Qemu::FindsNothing
        } else {
            Qemu::Agrees
        };
        let err = assert_walked_past(&img, &refusal, qemu);
        if cut > 262152 {
            // Each data cluster the remaining entries map past the end, with its offset.
            let past = format!("ERROR data cluster at host offset 0x50000 lies past the end of the file ({cut} bytes)");
            assert!(err.lines().any(|l| l == past), "{cut}: {err}");
        }
        assert_not_repaired(&img);
    }
}

/// The active L1 table past the end of the file, or cut by it.
#[test]
fn l1_table_past_or_cut_by_the_end() {
    let Some(d) = needs("qemu-img") else { return };
    let base = image(d.path(), "base.qcow2", "64M", &["write -P 1 0 1M"], None);
    let len = std::fs::metadata(&base).unwrap().len();
    let img = damaged(&base, "past.qcow2", |b, _| set64(b, 40, 0x7fff_0000));
    let refusal =
        format!("L1 table at 0x7fff0000 (8 bytes) extends past the end of the file ({len} bytes)");
    assert_refusal_reported(&img, &refusal);
    let img = damaged(&base, "cut.qcow2", |b, l| b.truncate(l.l1 as usize + 4));
    let refusal = "L1 table at 0x30000 (8 bytes) extends past the end of the file (196612 bytes)";
    assert_refusal_reported(&img, refusal);
}

/// Tables QEMU opens where the reader refuses their place: on the header (offset 0) or
/// beyond the largest host offset qcow2 can address (QEMU only asks for 63 bits).
#[test]
fn tables_on_the_header_or_beyond_host_offsets() {
    let Some(d) = needs("qemu-img") else { return };
    let base = rich(d.path(), "base.qcow2", false);
    let far = 1u64 << 60;
    let cases: [(&str, usize, u64, &str); 5] = [
        ("l1-0", 40, 0, "L1 table offset 0x0 overlaps the image header"),
        (
            "st-0",
            64,
            0,
            "snapshot table offset 0x0 overlaps the image header",
        ),
        ("l1-far", 40, far, "L1 table offset 0x1000000000000000 lies beyond the largest host offset qcow2 can address"),
        ("rt-far", 48, far, "refcount table offset 0x1000000000000000 lies beyond the largest host offset qcow2 can address"),
        ("st-far", 64, far, "snapshot table offset 0x1000000000000000 lies beyond the largest host offset qcow2 can address"),
    ];
    for (name, field, value, refusal) in cases {
        let img = damaged(&base, &format!("{name}.qcow2"), |b, _| {
            set64(b, field as u64, value)
        });
        assert_refusal_reported(&img, refusal);
    }
}

/// Refcount structures the reader refuses are rebuilt by `-r all`, as QEMU rebuilds them: the
/// refcount table past the end of the file, a refcount block cut by it. `-r leaks` refuses.
#[test]
fn refcount_structures_past_the_end_are_rebuilt() {
    let Some(d) = needs("qemu-img") else { return };
    let base = rich(d.path(), "base.qcow2", false);
    let len = std::fs::metadata(&base).unwrap().len();
    let rt = damaged(&base, "rt.qcow2", |b, _| set64(b, 48, 0x7fff_0000));
    let refusal = format!(
        "refcount table at 0x7fff0000 (65536 bytes) extends past the end of the file ({len} bytes)"
    );
    assert_eq!(reader_refusal(&rt, None), refusal);
    assert_walked_past(&rt, &refusal, Qemu::Agrees);
    // The block moved to a new last cluster, cut after 4 KiB (which still hold every
    // refcount of this small file).
    let moved = len.next_multiple_of(65536);
    let rb = damaged(&base, "rb.qcow2", |b, l| {
        let old = be64(b, l.refcount_table);
        let block = b[old as usize..old as usize + 4096].to_vec();
        b.resize(moved as usize, 0);
        b.extend(block);
        set64(b, l.refcount_table, moved);
    });
    let refusal = format!("refcount block at {moved:#x} is unaligned or past the end of the file");
    let q = qmpbackup::qcow2::Qcow2::open(&rb).unwrap();
    let err = q.refcount(0).unwrap_err().to_string();
    assert!(err.ends_with(&refusal), "{err}");
    assert_walked_past(&rb, &refusal, Qemu::Agrees);
    for img in [rt, rb] {
        let before = std::fs::read(&img).unwrap();
        let (code, _, err) = qmprestore(&["check", "-r", "leaks", s(&img)]);
        assert!(
            code == 1 && err.contains("repair it with --repair all"),
            "{err}"
        );
        assert!(std::fs::read(&img).unwrap() == before);
        let (code, _, err) = qmprestore(&["check", "-r", "all", s(&img)]);
        assert_eq!(code, 0, "{}: {err}", img.display());
        assert_check_clean(&img);
        assert_same(&base, &img);
    }
}

/// A snapshot's L1 table past the end of the file: refused when the snapshot is read.
#[test]
fn snapshot_l1_table_outside_the_file() {
    let Some(d) = needs("qemu-img") else { return };
    let base = rich(d.path(), "base.qcow2", false);
    let img = damaged(&base, "snap-l1.qcow2", |b, l| {
        set64(b, l.snapshot_table, 0x7fff_0000)
    });
    let refusal = "snapshot 's1': L1 table at 0x7fff0000 lies outside the file";
    assert_eq!(reader_refusal(&img, Some("s1")), refusal);
    assert_walked_past(&img, refusal, Qemu::Agrees);
    assert_not_repaired(&img);
}

/// Guest data the reader refuses to read: on metadata, past the end of the file, at an
/// unaligned offset; compressed clusters on metadata or past the end.
#[test]
fn data_clusters_the_reader_refuses() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    let plain = image(p, "plain.qcow2", "64M", &["write -P 1 0 1M"], None);
    let packed = image(p, "packed.qcow2", "64M", &["write -c -P 5 0 64k"], None);
    let len = |img: &Path| std::fs::metadata(img).unwrap().len();
    type Entry = fn(&Layout) -> u64;
    let cases: [(&str, &Path, Entry, String); 5] = [
        (
            "data-on-l1",
            &plain,
            |l| COPIED | l.l1,
            "data cluster at host offset 0x30000 overlaps the L1 table".into(),
        ),
        (
            "data-past-end",
            &plain,
            |_| COPIED | 0x7fff_0000,
            format!(
                "data cluster at host offset 0x7fff0000 lies past the end of the file ({} bytes)",
                len(&plain)
            ),
        ),
        (
            "data-unaligned",
            &plain,
            |_| COPIED | 0x5_0200,
            "guest offset 0x0: data cluster offset 0x50200 is not cluster aligned".into(),
        ),
        (
            "compressed-on-l1",
            &packed,
            |l| (1 << 62) | l.l1,
            "compressed cluster at host offset 0x30000 overlaps the L1 table".into(),
        ),
        (
            "compressed-past-end",
            &packed,
            |_| (1 << 62) | 0x7fff_0000,
            format!(
                "compressed cluster at host offset 0x7fff0000 lies past the end of the file ({} bytes)",
                len(&packed)
            ),
        ),
    ];
    for (name, base, entry, refusal) in cases {
        let img = damaged(base, &format!("{name}.qcow2"), |b, l| {
            let l2 = l.l2(b, 0);
            set64(b, l2, entry(l));
        });
        let reader = reader_refusal(&img, None);
        assert!(reader.ends_with(&refusal), "{name}: {reader}");
        assert_walked_past(&img, &refusal, Qemu::Agrees);
        assert_not_repaired(&img);
    }
}

/// A backing file name offset inside the header: QEMU reads no extensions and a name from
/// the header's own bytes (here an empty one) and finds nothing wrong; the reader refuses the
/// image, so check reports it.
#[test]
fn backing_name_inside_the_header() {
    let Some(d) = needs("qemu-img") else { return };
    let base = image(d.path(), "base.qcow2", "64M", &["write -P 1 0 64k"], None);
    let img = damaged(&base, "backing.qcow2", |b, _| {
        set64(b, 8, 50);
        BigEndian::write_u32(&mut b[16..], 5);
    });
    let refusal =
        "backing file name offset 0x32 lies inside the header or past the end of the file";
    let (code, _, err) = qmprestore(&["info", s(&img)]);
    assert!(code == 1 && err.trim_end().ends_with(refusal), "{err}");
    assert_walked_past(&img, refusal, Qemu::FindsNothing);
    assert_not_repaired(&img);
}

/// Headers QEMU cannot open either: check cannot check them and exits 1, as qemu-img check
/// does, writing nothing (with a repair asked too).
#[test]
fn headers_qemu_cannot_open_either() {
    let Some(d) = needs("qemu-img") else { return };
    let base = rich(d.path(), "base.qcow2", true);
    let small = image(d.path(), "small.qcow2", "-o cluster_size=4k 64M", &[], None);
    let set32 = |b: &mut Vec<u8>, at: usize, v: u32| BigEndian::write_u32(&mut b[at..], v);
    type Poke = Box<dyn Fn(&mut Vec<u8>, &Layout)>;
    let cases: Vec<(&str, &Path, Poke)> = vec![
        (
            "magic",
            &base,
            Box::new(move |b, _| set32(b, 0, 0x1234_5678)),
        ),
        ("version", &base, Box::new(move |b, _| set32(b, 4, 4))),
        ("incompatible", &base, Box::new(|b, _| b[79] |= 1 << 5)),
        (
            "cluster-bits",
            &base,
            Box::new(move |b, _| set32(b, 20, 22)),
        ),
        (
            "header-length",
            &base,
            Box::new(move |b, _| set32(b, 100, 100)),
        ),
        (
            "refcount-order",
            &base,
            Box::new(move |b, _| set32(b, 96, 7)),
        ),
        ("compression-type", &base, Box::new(|b, _| b[104] = 1)),
        (
            "extended-l2-small",
            &small,
            Box::new(|b, _| b[79] |= 1 << 4),
        ),
        (
            "backing-name-long",
            &base,
            Box::new(move |b, _| {
                set64(b, 8, 0x2000);
                set32(b, 16, 2000);
            }),
        ),
        (
            "snapshots-many",
            &base,
            Box::new(move |b, _| set32(b, 60, 70000)),
        ),
        (
            "l1-too-large",
            &base,
            Box::new(move |b, _| set32(b, 36, 5 << 20)),
        ),
        ("l1-too-small", &base, Box::new(move |b, _| set32(b, 36, 0))),
        ("size-huge", &base, Box::new(|b, _| set64(b, 24, 1 << 62))),
        (
            "l1-unaligned",
            &base,
            Box::new(|b, l| set64(b, 40, l.l1 + 0x200)),
        ),
        (
            "rt-unaligned",
            &base,
            Box::new(|b, l| set64(b, 48, l.refcount_table + 0x200)),
        ),
        (
            "st-unaligned",
            &base,
            Box::new(|b, l| set64(b, 64, l.snapshot_table + 0x200)),
        ),
        (
            "rt-too-large",
            &base,
            Box::new(move |b, _| set32(b, 56, 200)),
        ),
        (
            "extension-overrun",
            &base,
            Box::new(move |b, _| set32(b, 116, 1 << 20)),
        ),
        ("data-file-unnamed", &base, Box::new(|b, _| b[79] |= 1 << 2)),
        (
            "bitmap-directory-cut",
            &base,
            Box::new(|b, l| {
                let (dir, _) = l.bitmaps(b);
                b.truncate(dir as usize + 4);
            }),
        ),
    ];
    // qemu-img check wants the key of an encrypted image; ours checks its metadata without
    // one (verify relies on it), so a header that says "legacy AES" is checked, not refused.
    let img = damaged(&base, "encrypted.qcow2", |b, _| set32(b, 32, 1));
    assert_eq!(qemu_check_code(&img), 1, "encrypted: qemu-img check");
    assert_eq!(qmprestore(&["check", s(&img)]).0, 0, "encrypted: our check");
    for (name, base, poke) in cases {
        let img = damaged(base, &format!("{name}.qcow2"), |b, l| poke(b, l));
        let before = std::fs::read(&img).unwrap();
        assert_eq!(qemu_check_code(&img), 1, "{name}: qemu-img check");
        for args in [vec!["check"], vec!["check", "-r", "all"]] {
            let (code, _, err) = qmprestore(&[&args[..], &[s(&img)]].concat());
            assert_eq!(code, 1, "{name}: {args:?}: {err}");
            assert!(!err.contains("ERROR"), "{name}: walked: {err}");
        }
        assert!(std::fs::read(&img).unwrap() == before, "{name} was changed");
    }
}
