//! Malformed and hostile images: each must fail with a clear error that names the file and
//! the problem, never panic or allocate without bound, and leave the file as it was.
//! Built by patching committed fixtures, so no qemu-img is needed.

mod common;

use byteorder::{BigEndian, ByteOrder};
use common::*;
use qmpbackup::qcow2::header::Header;
use qmpbackup::qcow2::Disk;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A change to an image's bytes, given its parsed header.
type HeaderPatch = fn(&mut Vec<u8>, &Header);
type Patch = Box<dyn Fn(&mut Vec<u8>, &Header)>;

/// Opens, maps and reads everything; the error text if any step fails.
fn outcome(path: &Path) -> Result<(), String> {
    outcome_as(path, None)
}

/// [`outcome`] with the format given instead of probed.
fn outcome_as(path: &Path, format: Option<qmpbackup::qcow2::Format>) -> Result<(), String> {
    let opts = qmpbackup::qcow2::OpenOptions {
        format,
        ..Default::default()
    };
    let disk = Disk::open_with(path, &opts).map_err(|e| e.to_string())?;
    disk.for_each_extent(0, disk.size(), |_| Ok(()))
        .map_err(|e| e.to_string())?;
    disk.read_stored(u64::MAX).map_err(|e| e.to_string())?;
    Ok(())
}

/// Copies a fixture into `dir` under `name` and applies `patch` to its bytes.
fn patched(
    dir: &Path,
    fixture: &str,
    name: &str,
    patch: impl FnOnce(&mut Vec<u8>, &Header),
) -> PathBuf {
    let mut bytes = std::fs::read(fixtures().join(fixture)).unwrap();
    let h = Header::parse(&bytes).unwrap();
    patch(&mut bytes, &h);
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn expect_error(path: &Path, needle: &str) {
    let before = sha256_file(path);
    let err = outcome(path).expect_err(&format!("{} should be refused", path.display()));
    assert!(
        err.contains(needle),
        "{}: error `{err}` should mention `{needle}`",
        path.display()
    );
    assert!(
        err.contains(&path.display().to_string())
            || err.contains(path.file_name().unwrap().to_str().unwrap()),
        "error `{err}` should name the file"
    );
    // The CLI reports it too, with exit code 1, within a 512 MiB address space; `check`
    // (which, like qemu-img's, looks at metadata only) ends with a verdict, never a crash.
    let tmp = tempfile::tempdir().unwrap();
    let out = limited_as(
        Command::new(env!("CARGO_BIN_EXE_qmprestore"))
            .args(["convert", "-O", "raw"])
            .arg(path)
            .arg(tmp.path().join("out.raw")),
    );
    let check = limited_as(
        Command::new(env!("CARGO_BIN_EXE_qmprestore"))
            .arg("check")
            .arg(path),
    );
    assert!(
        matches!(check.status.code(), Some(0..=3)),
        "check of {} ended with {:?}: {}",
        path.display(),
        check.status,
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{}", path.display());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(needle),
        "CLI stderr `{stderr}` should mention `{needle}`"
    );
    assert!(
        !tmp.path().join("out.raw").exists(),
        "a failed convert must not leave output"
    );
    // To qcow2 too, whose in-kernel copies check their sources as reads do.
    let out = limited_as(
        Command::new(env!("CARGO_BIN_EXE_qmprestore"))
            .args(["convert", "-O", "qcow2"])
            .arg(path)
            .arg(tmp.path().join("out.qcow2")),
    );
    assert_eq!(out.status.code(), Some(1), "{} to qcow2", path.display());
    assert!(!tmp.path().join("out.qcow2").exists());
    assert_eq!(sha256_file(path), before, "{} was modified", path.display());
}

/// Runs `cmd` with its address space limited to 512 MiB: a hostile image must not make the
/// tool allocate without bound.
fn limited_as(cmd: &mut Command) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let r = libc::rlimit {
                rlim_cur: 512 << 20,
                rlim_max: 512 << 20,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

fn set_u32(b: &mut [u8], off: usize, v: u32) {
    BigEndian::write_u32(&mut b[off..], v);
}

fn set_u64(b: &mut [u8], off: usize, v: u64) {
    BigEndian::write_u64(&mut b[off..], v);
}

/// Byte offset of the first L2 table's entry for guest cluster `index`.
fn l2_entry_offset(b: &[u8], h: &Header, index: u64) -> usize {
    let l1 = BigEndian::read_u64(&b[h.l1_table_offset as usize..]) & 0x00ff_ffff_ffff_fe00;
    (l1 + index * h.l2_entry_size()) as usize
}

#[test]
fn header_problems() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let cases: Vec<(&str, HeaderPatch, &str)> = vec![
        ("short", |b, _| b.truncate(50), "too short"),
        ("short-v3", |b, _| b.truncate(90), "too short"),
        ("tables-cut", |b, _| b.truncate(0x10200), "past the end"),
        (
            "bits-low",
            |b, _| set_u32(b, 20, 8),
            "cluster_bits 8 out of range",
        ),
        (
            "bits-high",
            |b, _| set_u32(b, 20, 22),
            "cluster_bits 22 out of range",
        ),
        (
            "bits-huge",
            |b, _| set_u32(b, 20, 63),
            "cluster_bits 63 out of range",
        ),
        ("l1-huge", |b, _| set_u32(b, 36, u32::MAX), "32 MiB limit"),
        ("l1-small", |b, _| set_u32(b, 36, 0), "too small"),
        ("l1-eof", |b, _| set_u64(b, 40, 0x7fff_0000), "past the end"),
        (
            "l1-unaligned",
            |b, _| set_u64(b, 40, 0x3_0001),
            "L1 table offset 0x30001 is not cluster aligned",
        ),
        (
            "l1-on-header",
            |b, _| set_u64(b, 40, 0),
            "L1 table offset 0x0 overlaps the image header",
        ),
        ("rt-huge", |b, _| set_u32(b, 56, u32::MAX), "8 MiB limit"),
        ("rt-eof", |b, _| set_u64(b, 48, 0x7fff_0000), "past the end"),
        (
            "snapshots-many",
            |b, _| set_u32(b, 60, 1 << 20),
            "snapshots",
        ),
        (
            "snapshots-eof",
            |b, _| {
                set_u32(b, 60, 3);
                set_u64(b, 64, 0x7fff_0000);
            },
            "past the end",
        ),
        ("version", |b, _| set_u32(b, 4, 4), "version 4"),
        ("refcount-order", |b, _| set_u32(b, 96, 7), "refcount_order"),
        (
            "header-length",
            |b, _| set_u32(b, 100, 20000000),
            "header length",
        ),
        (
            "incompat",
            |b, _| b[79] |= 1 << 5,
            "unsupported incompatible feature bit 5",
        ),
        (
            "encrypted",
            |b, _| set_u32(b, 32, 1),
            "give its passphrase with --key-file",
        ),
        (
            "crypt-method-7",
            |b, _| set_u32(b, 32, 7),
            "unsupported encryption method 7",
        ),
        (
            "luks-without-header",
            |b, _| set_u32(b, 32, 2),
            "missing crypto header extension",
        ),
        (
            "ext-overrun",
            |b, h| set_u32(b, h.header_length as usize + 4, 0x100_0000),
            "overruns",
        ),
        ("size-huge", |b, _| set_u64(b, 24, u64::MAX), "too large"),
        (
            "ext-max",
            |b, h| set_u32(b, h.header_length as usize + 4, u32::MAX),
            "overruns",
        ),
        (
            "backing-name-huge",
            |b, _| {
                set_u64(b, 8, 0x200);
                set_u32(b, 16, u32::MAX);
            },
            "at most 1023",
        ),
        (
            "backing-name-far",
            |b, _| {
                set_u64(b, 8, u64::MAX - 0xffff);
                set_u32(b, 16, 10);
            },
            "outside the header cluster",
        ),
    ];
    for (name, patch, needle) in cases {
        expect_error(
            &patched(p, "v3.qcow2", &format!("{name}.qcow2"), patch),
            needle,
        );
    }
}

#[test]
fn unknown_feature_named_from_the_feature_table() {
    let d = tempfile::tempdir().unwrap();
    let p = patched(d.path(), "v3.qcow2", "named.qcow2", |b, _| {
        // Turn the table's entry for incompatible bit 0 into one for bit 6, then set bit 6.
        let magic = 0x6803_f857u32.to_be_bytes();
        let ext = b.windows(4).position(|w| w == magic).unwrap();
        let entry = ext + 8;
        assert_eq!((b[entry], b[entry + 1]), (0, 0));
        b[entry + 1] = 6;
        b[79] |= 1 << 6;
    });
    expect_error(&p, "unsupported incompatible feature bit 6 (dirty bit)");
}

#[test]
fn table_and_cluster_problems() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let l1 = |h: &Header| h.l1_table_offset as usize;
    let cases: Vec<(&str, &str, Patch, &str)> = vec![
        (
            "l2-eof",
            "v3.qcow2",
            Box::new(move |b, h| set_u64(b, l1(h), (1 << 63) | 0x7fff_0000)),
            "past the end",
        ),
        (
            "l2-unaligned",
            "v3.qcow2",
            Box::new(move |b, h| set_u64(b, l1(h), (1 << 63) | 0x3_0200)),
            "not cluster aligned",
        ),
        (
            "l2-shared",
            "cs512.qcow2",
            Box::new(move |b, h| {
                let first = BigEndian::read_u64(&b[l1(h)..]);
                set_u64(b, l1(h) + 8, first);
            }),
            "both point to the L2 table",
        ),
        (
            "data-eof",
            "v3.qcow2",
            Box::new(|b, h| {
                let e = l2_entry_offset(b, h, 0);
                set_u64(b, e, (1 << 63) | 0x7fff_0000);
            }),
            "data cluster at host offset 0x7fff0000 lies past the end",
        ),
        (
            "data-unaligned",
            "v3.qcow2",
            Box::new(|b, h| {
                let e = l2_entry_offset(b, h, 0);
                set_u64(b, e, (1 << 63) | 0x5_0200);
            }),
            "not cluster aligned",
        ),
        (
            "compressed-eof",
            "zlib.qcow2",
            Box::new(|b, h| {
                let e = l2_entry_offset(b, h, 0);
                set_u64(b, e, (1 << 62) | 0x7fff_0000);
            }),
            "compressed cluster at host offset 0x7fff0000 lies past the end",
        ),
        (
            "compressed-garbage",
            "zlib.qcow2",
            Box::new(|b, h| {
                let e = l2_entry_offset(b, h, 0);
                let w = BigEndian::read_u64(&b[e..]);
                let off = (w & ((1 << 54) - 1)) as usize;
                b[off..off + 64].fill(0xff);
            }),
            "invalid deflate stream",
        ),
        (
            "zstd-garbage",
            "zstd.qcow2",
            Box::new(|b, h| {
                let e = l2_entry_offset(b, h, 0);
                let w = BigEndian::read_u64(&b[e..]);
                let off = (w & ((1 << 54) - 1)) as usize;
                b[off + 4..off + 64].fill(0xff);
            }),
            "zstd",
        ),
        (
            "data-on-l1",
            "v3.qcow2",
            Box::new(|b, h| {
                let e = l2_entry_offset(b, h, 0);
                set_u64(b, e, (1 << 63) | h.l1_table_offset);
            }),
            "overlaps the L1 table",
        ),
        (
            "data-on-refcount-table",
            "v3.qcow2",
            Box::new(|b, h| {
                let e = l2_entry_offset(b, h, 0);
                set_u64(b, e, (1 << 63) | h.refcount_table_offset);
            }),
            "overlaps the refcount table",
        ),
        (
            "data-on-l2",
            "v3.qcow2",
            Box::new(|b, h| {
                let l2 = BigEndian::read_u64(&b[h.l1_table_offset as usize..]) & ((1 << 56) - 512);
                let e = l2_entry_offset(b, h, 0);
                set_u64(b, e, (1 << 63) | l2);
            }),
            "overlaps an L2 table",
        ),
        (
            "compressed-on-header",
            "zlib.qcow2",
            Box::new(|b, h| {
                let e = l2_entry_offset(b, h, 0);
                set_u64(b, e, (1 << 62) | 0x100);
            }),
            "overlaps the header",
        ),
        (
            "l2-on-refcount-table",
            "v3.qcow2",
            Box::new(move |b, h| set_u64(b, l1(h), (1 << 63) | h.refcount_table_offset)),
            "L2 table at 0x10000 (L1 index 0) overlaps the refcount table",
        ),
        (
            "l2-on-l1",
            "v3.qcow2",
            Box::new(move |b, h| set_u64(b, l1(h), (1 << 63) | h.l1_table_offset)),
            "overlaps the L1 table",
        ),
        (
            "subcluster-both",
            "extl2.qcow2",
            Box::new(|b, h| {
                let e = l2_entry_offset(b, h, 0);
                set_u64(b, e + 8, 1 | (1 << 32));
            }),
            "both allocated and zero",
        ),
    ];
    for (name, fixture, patch, needle) in cases {
        expect_error(
            &patched(p, fixture, &format!("{name}.qcow2"), |b, h| patch(b, h)),
            needle,
        );
    }
    // The commands say so too: convert read the refcount table as guest data (exit 0) and now
    // refuses the image (exit 1); check reports it as a corruption (exit 2, as qemu-img check).
    let img = p.join("l2-on-refcount-table.qcow2");
    for args in [vec!["convert", "-O", "raw"], vec!["check"]] {
        let out = p.join("out.raw");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qmprestore"));
        cmd.args(&args).arg(&img);
        if args[0] == "convert" {
            cmd.arg(&out);
        }
        let o = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let expected = if args[0] == "check" { 2 } else { 1 };
        assert_eq!(o.status.code(), Some(expected), "{args:?}: {err}");
        assert!(
            err.contains("overlaps the refcount table"),
            "{args:?}: {err}"
        );
        assert!(!out.exists());
    }
}

/// Writes a backing file name into cluster 0 of a copy of v3.qcow2.
fn with_backing(dir: &Path, name: &str, backing: &str) -> PathBuf {
    let backing = backing.to_string();
    patched(dir, "v3.qcow2", name, move |b, _| {
        let off = 0xf000;
        b[off..off + backing.len()].copy_from_slice(backing.as_bytes());
        set_u64(b, 8, off as u64);
        set_u32(b, 16, backing.len() as u32);
    })
}

#[test]
fn backing_problems() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    expect_error(
        &with_backing(p, "self.qcow2", "self.qcow2"),
        "backing file loop",
    );
    with_backing(p, "a.qcow2", "b.qcow2");
    expect_error(&with_backing(p, "b.qcow2", "a.qcow2"), "backing file loop");
    expect_error(
        &with_backing(p, "missing.qcow2", "nowhere.qcow2"),
        "does not exist",
    );
    expect_error(
        &with_backing(p, "proto.qcow2", "nbd:localhost:10809"),
        "protocol",
    );
    expect_error(
        &with_backing(p, "json.qcow2", "json:{\"driver\":\"null-co\"}"),
        "json:",
    );
    // A chain deeper than the limit.
    let depth = qmpbackup::qcow2::disk::MAX_CHAIN_DEPTH + 2;
    std::fs::copy(fixtures().join("v3.qcow2"), p.join("deep0.qcow2")).unwrap();
    for i in 1..depth {
        with_backing(
            p,
            &format!("deep{i}.qcow2"),
            &format!("deep{}.qcow2", i - 1),
        );
    }
    let top = p.join(format!("deep{}.qcow2", depth - 1));
    let err = outcome(&top).unwrap_err();
    assert!(err.contains("deeper than"), "{err}");
    // Just within the limit it opens.
    let ok = p.join(format!("deep{}.qcow2", depth - 3));
    assert_eq!(Disk::open(&ok).unwrap().chain().count(), depth - 2);
}

#[test]
fn dirty_and_corrupt_images_are_readable() {
    for name in ["dirty.qcow2", "corrupt.qcow2"] {
        outcome(&fixtures().join(name)).unwrap();
    }
}

/// Offset of the `n`-th entry of snap.qcow2's snapshot table (each entry padded to 8 bytes).
fn snapshot_entry(b: &[u8], h: &Header, n: usize) -> usize {
    let mut off = h.snapshots_offset as usize;
    for _ in 0..n {
        let id = BigEndian::read_u16(&b[off + 12..]) as usize;
        let name = BigEndian::read_u16(&b[off + 14..]) as usize;
        let extra = BigEndian::read_u32(&b[off + 36..]) as usize;
        off += (40 + extra + id + name).div_ceil(8) * 8;
    }
    off
}

/// Offset of the data of the header extension `magic`.
fn extension(b: &[u8], h: &Header, magic: u32) -> usize {
    let mut off = h.header_length as usize;
    loop {
        let (m, len) = (
            BigEndian::read_u32(&b[off..]),
            BigEndian::read_u32(&b[off + 4..]),
        );
        assert_ne!(m, 0, "extension {magic:#x} not found");
        if m == magic {
            return off + 8;
        }
        off += 8 + (len as usize).div_ceil(8) * 8;
    }
}

#[test]
fn snapshot_table_and_bitmap_directory_problems() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    const BITMAPS: u32 = 0x2385_2875;
    let cases: Vec<(&str, &str, HeaderPatch, &str)> = vec![
        (
            "snap-extra-huge",
            "snap.qcow2",
            |b, h| {
                let o = snapshot_entry(b, h, 0) + 36;
                set_u32(b, o, u32::MAX)
            },
            "bytes of extra data",
        ),
        (
            "snap-name-huge",
            "snap.qcow2",
            |b, h| {
                let e = snapshot_entry(b, h, 0);
                b[e + 14..e + 16].copy_from_slice(&[0xff, 0xff]);
            },
            "snapshot 1",
        ),
        (
            "snap-l1-huge",
            "snap.qcow2",
            |b, h| {
                let o = snapshot_entry(b, h, 0) + 8;
                set_u32(b, o, 0x7fff_ffff)
            },
            "32 MiB limit",
        ),
        (
            "bitmaps-many",
            "bitmap.qcow2",
            |b, h| {
                let o = extension(b, h, BITMAPS);
                set_u32(b, o, u32::MAX)
            },
            "4294967295 bitmaps",
        ),
        (
            "bitmap-dir-huge",
            "bitmap.qcow2",
            |b, h| {
                let o = extension(b, h, BITMAPS) + 8;
                set_u64(b, o, 1 << 40)
            },
            "at most 64 MiB",
        ),
        (
            "bitmap-dir-eof",
            "bitmap.qcow2",
            |b, h| {
                let o = extension(b, h, BITMAPS) + 16;
                set_u64(b, o, 0x7fff_0000)
            },
            "past the end",
        ),
    ];
    for (name, fixture, patch, needle) in cases {
        expect_error(
            &patched(p, fixture, &format!("{name}.qcow2"), patch),
            needle,
        );
    }
}

/// Points guest cluster 0 of a copy of `fixture` (a compressed image) at `stream`, appended
/// at the end of the file, as a compressed cluster of `sectors` 512-byte sectors.
fn with_stream(dir: &Path, fixture: &str, name: &str, stream: &[u8], sectors: u64) -> PathBuf {
    patched(dir, fixture, name, |b, h| {
        let off = b.len() as u64;
        b.extend_from_slice(stream);
        b.resize(b.len().next_multiple_of(512), 0);
        let shift = 62 - (h.cluster_bits - 8);
        let e = l2_entry_offset(b, h, 0);
        set_u64(b, e, (1 << 62) | ((sectors - 1) << shift) | off);
    })
}

#[test]
fn compressed_bombs_and_overruns() {
    use flate2::{Compress, Compression, FlushCompress};
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    // 16 MiB of zeros in a 16 KiB deflate stream: QEMU fills the cluster and ignores the rest,
    // so do we, without inflating past the cluster.
    let mut c = Compress::new(Compression::best(), false);
    let mut bomb = Vec::with_capacity(64 << 10);
    c.compress_vec(&vec![0; 16 << 20], &mut bomb, FlushCompress::Finish)
        .unwrap();
    let sectors = (bomb.len() as u64).div_ceil(512);
    let img = with_stream(p, "zlib.qcow2", "bomb-zlib.qcow2", &bomb, sectors);
    let before = sha256_file(&img);
    let out = limited_as(
        Command::new(env!("CARGO_BIN_EXE_qmprestore"))
            .args(["convert", "-O", "raw"])
            .arg(&img)
            .arg(p.join("bomb.raw")),
    );
    assert!(out.status.success(), "{out:?}");
    let raw = std::fs::read(p.join("bomb.raw")).unwrap();
    assert!(raw[..65536].iter().all(|&b| b == 0));
    let reference = Disk::open(&fixtures().join("zlib.qcow2")).unwrap();
    let mut rest = vec![0; raw.len() - 65536];
    reference.read_at(&mut rest, 65536).unwrap();
    assert!(raw[65536..] == rest[..], "clusters after the bomb changed");
    assert_eq!(sha256_file(&img), before);
    // zstd knows the frame's length: one that does not end within the cluster is refused.
    let bomb = zstd::bulk::compress(&vec![0; 16 << 20], 19).unwrap();
    let sectors = (bomb.len() as u64).div_ceil(512);
    expect_error(
        &with_stream(p, "zstd.qcow2", "bomb-zstd.qcow2", &bomb, sectors),
        "longer than one cluster",
    );
    // A descriptor whose sectors run past the end of the file.
    expect_error(
        &with_stream(p, "zlib.qcow2", "overrun.qcow2", &[0x55; 512], 255),
        "compressed cluster",
    );
}

/// Refcount blocks placed on other structures, or shared: reading does not depend on
/// refcounts, but `check` must report corruption and no command may write to the image (each
/// allocation would overwrite the structure the block sits on).
#[test]
fn overlapping_refcount_structures_are_never_written() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let rt = |h: &Header| h.refcount_table_offset as usize;
    let cases: Vec<(&str, Patch)> = vec![
        (
            "rb-on-itself",
            Box::new(move |b, h| set_u64(b, rt(h), h.refcount_table_offset)),
        ),
        ("rb-on-header", Box::new(move |b, h| set_u64(b, rt(h), 0))),
        (
            "rb-on-l1",
            Box::new(move |b, h| set_u64(b, rt(h), h.l1_table_offset)),
        ),
        (
            "rb-on-l2",
            Box::new(move |b, h| {
                let l2 = BigEndian::read_u64(&b[h.l1_table_offset as usize..]) & ((1 << 56) - 512);
                set_u64(b, rt(h), l2);
            }),
        ),
        (
            "rb-shared",
            Box::new(move |b, h| {
                let first = BigEndian::read_u64(&b[rt(h)..]);
                set_u64(b, rt(h) + 8, first);
            }),
        ),
    ];
    for (name, patch) in cases {
        let img = patched(p, "v3.qcow2", &format!("{name}.qcow2"), |b, h| patch(b, h));
        let before = sha256_file(&img);
        let check = limited_as(
            Command::new(env!("CARGO_BIN_EXE_qmprestore"))
                .arg("check")
                .arg(&img),
        );
        assert_eq!(check.status.code(), Some(2), "{name}: {check:?}");
        let out = limited_as(
            Command::new(env!("CARGO_BIN_EXE_qmprestore"))
                .args(["snapshot", "-c", "s1"])
                .arg(&img),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains("refusing to write") && stderr.contains(name),
            "{name}: {stderr}"
        );
        let err = qmpbackup::qcow2::write::Writer::open(&img)
            .err()
            .unwrap_or_else(|| panic!("{name} opened for writing"));
        assert!(err.to_string().contains("corruption"), "{err}");
        assert_eq!(sha256_file(&img), before, "{name} was modified");
        outcome(&img).unwrap_or_else(|e| panic!("{name} should still read: {e}"));
    }
}

#[test]
fn every_sector_cut_of_every_fixture_fails_cleanly() {
    // Every metadata structure starts and ends on a 512-byte boundary or inside the header
    // cluster, so cutting at every sector (and every byte of the first KiB) cuts at every
    // metadata boundary. Each cut, opened as qcow2 (probing would call a 3-byte file raw, as
    // QEMU does), must read or fail with an error naming the file, and check must end with a
    // verdict; a cut before the end of the L1 or refcount table must fail.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("cut.qcow2");
    for fixture in [
        "v3.qcow2",
        "snap.qcow2",
        "bitmap.qcow2",
        "zlib.qcow2",
        "zstd.qcow2",
        "extl2.qcow2",
        "cs512.qcow2",
    ] {
        let bytes = std::fs::read(fixtures().join(fixture)).unwrap();
        let h = Header::parse(&bytes).unwrap();
        let tables_end = (h.l1_table_offset + h.l1_size as u64 * 8)
            .max(h.refcount_table_offset + h.refcount_table_clusters as u64 * h.cluster_size());
        // Longest first, so each cut is a truncation of the previous one.
        std::fs::write(&p, &bytes).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let cuts = (1024..bytes.len())
            .step_by(512)
            .rev()
            .chain((0..1024).rev());
        for len in cuts {
            file.set_len(len as u64).unwrap();
            match outcome_as(&p, Some(qmpbackup::qcow2::Format::Qcow2)) {
                Ok(()) => assert!(
                    len as u64 >= tables_end,
                    "{fixture} cut at {len} (tables end at {tables_end}) was accepted"
                ),
                Err(e) => assert!(e.contains("cut.qcow2"), "{fixture} cut at {len}: {e}"),
            }
            let _ = qmpbackup::qcow2::check::check(&p);
        }
    }
}

/// A file may claim any length: a sparse one costs nothing. Checking (which every writing
/// command does first) counts references per host cluster, within a bound: a 60 GiB sparse
/// tail is checked in bounded memory, a 1 TiB one of 512-byte clusters is refused cleanly.
#[test]
fn sparse_files_of_absurd_length_are_checked_within_bounds() {
    let d = tempfile::tempdir().unwrap();
    for (len, refused) in [(60u64 << 30, false), (1 << 40, true)] {
        let img = d.path().join(format!("sparse-{len}.qcow2"));
        std::fs::copy(fixtures().join("cs512.qcow2"), &img).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(len)
            .unwrap();
        let out = limited_as(
            Command::new(env!("CARGO_BIN_EXE_qmprestore"))
                .arg("check")
                .arg(&img),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        if refused {
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert!(stderr.contains("a check can count"), "{stderr}");
            let err = qmpbackup::qcow2::write::Writer::open(&img)
                .err()
                .expect("refused for writing");
            assert!(err.to_string().contains("a check can count"), "{err}");
        } else {
            assert_eq!(out.status.code(), Some(0), "{stderr}");
        }
        // Reading needs no per-cluster state: it works either way.
        outcome(&img).unwrap();
    }
}

/// A refcount block claiming every cluster of a long file: each is a leak, but the report
/// keeps at most `MAX_MESSAGES` lines and counts the rest.
#[test]
fn a_flood_of_leaks_is_counted_not_listed() {
    use qmpbackup::qcow2::check::{check, MAX_MESSAGES};
    let d = tempfile::tempdir().unwrap();
    let img = patched(d.path(), "rc1.qcow2", "flood.qcow2", |b, h| {
        // One-bit refcounts: the first block covers cs * 8 clusters.
        let block = BigEndian::read_u64(&b[h.refcount_table_offset as usize..]) as usize;
        let cs = h.cluster_size() as usize;
        b[block..block + cs].fill(0xff);
    });
    let cs = 16384;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len((MAX_MESSAGES as u64 + 5000) * cs)
        .unwrap();
    let r = check(&img).unwrap();
    assert!(r.leaks > MAX_MESSAGES as u64, "{}", r.leaks);
    assert_eq!(r.messages.len(), MAX_MESSAGES + 1);
    assert!(r
        .messages
        .last()
        .unwrap()
        .contains("more messages not shown"));
}

/// A new 4 MiB qcow2 image made by qemu-img with `options` (`-o ...` or nothing), written
/// to by `io` (qemu-io commands), in a temporary directory; `None` without qemu-img.
fn fresh(options: &str, io: &[&str]) -> Option<(tempfile::TempDir, PathBuf)> {
    let d = needs("qemu-img")?;
    qemu_img_create(d.path(), &format!("-f qcow2 {options} t.qcow2 4M"));
    if !io.is_empty() {
        qemu_io(d.path(), "t.qcow2", io);
    }
    let img = d.path().join("t.qcow2");
    Some((d, img))
}

/// A writer that refuses leaves the file byte for byte as it was: 64-bit refcounts at their
/// maximum cannot take a snapshot's extra reference, and `snapshot -c` used to set the dirty
/// bit before finding out (and called it a refcount dropping below zero). The image carries a
/// persistent bitmap, whose in-use flag a writer sets before its first write: that must not
/// happen before the refusal either.
#[test]
fn a_writer_that_refuses_changes_nothing() {
    let Some((d, img)) = fresh("-o refcount_bits=64", &["write -P 7 0 64k"]) else {
        return;
    };
    qemu_img(d.path(), &["bitmap", "--add", "t.qcow2", "b0"]);
    let mut bytes = std::fs::read(&img).unwrap();
    let h = Header::parse(&bytes).unwrap();
    let block = BigEndian::read_u64(&bytes[h.refcount_table_offset as usize..]) as usize;
    let data = BigEndian::read_u64(&bytes[l2_entry_offset(&bytes, &h, 0)..]) & ((1 << 56) - 512);
    let cluster = (data / h.cluster_size()) as usize;
    set_u64(&mut bytes, block + cluster * 8, u64::MAX);
    // Shared that often, the cluster is no longer COPIED: a consistent (if leaky) image.
    let entry = l2_entry_offset(&bytes, &h, 0);
    set_u64(&mut bytes, entry, data);
    std::fs::write(&img, &bytes).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .args(["snapshot", "-c", "s1"])
        .arg(&img)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("would overflow the image's 64-bit refcounts"),
        "{err}"
    );
    assert!(
        std::fs::read(&img).unwrap() == bytes,
        "snapshot -c changed the file"
    );
}

/// Header faults QEMU refuses at open: a snapshot table offset that is not cluster aligned
/// (even with no snapshots), a header extension longer than the header cluster, no refcount
/// table (check examines that one and reports it, exit 2, as qemu-img's). Built the way
/// QEMU's tests build them (qemu-img, then bytes poked); qemu-img and we both refuse to open
/// them and `check` ends with the same exit code, and nothing is written.
#[test]
fn header_faults_are_refused_where_qemu_refuses_them() {
    let Some((d, fresh_img)) = fresh("", &[]) else {
        return;
    };
    let p = d.path();
    let base = std::fs::read(&fresh_img).unwrap();
    let h = Header::parse(&base).unwrap();
    let ext_len = h.header_length as usize + 4;
    let cases: Vec<(&str, Patch, &str)> = vec![
        (
            "snapshot-offset",
            Box::new(|b, _| set_u64(b, 64, 0x3_0200)),
            "snapshot table offset 0x30200 is not cluster aligned",
        ),
        (
            "extension-too-large",
            Box::new(move |b, _| set_u32(b, ext_len, 65536)),
            "header extension too large",
        ),
        (
            "no-refcount-table",
            Box::new(|b, _| set_u32(b, 56, 0)),
            "does not contain a reference count table",
        ),
        (
            "data-file-raw-alone",
            Box::new(|b, _| b[95] |= 2),
            "data-file-raw requires a data file",
        ),
        (
            "empty-l1-unaligned",
            Box::new(|b, _| {
                set_u64(b, 24, 0);
                set_u32(b, 36, 0);
                set_u64(b, 40, 0x3_0200);
            }),
            "L1 table offset 0x30200 is not cluster aligned",
        ),
        (
            "extension-head-cut",
            Box::new(move |b, h| {
                set_u64(b, 8, h.header_length as u64 + 4);
                set_u32(b, 16, 1);
            }),
            "header extension too large",
        ),
        (
            // The feature name table (first extension, 384 bytes) retyped as a backing format.
            "backing-format-too-long",
            Box::new(move |b, _| set_u32(b, ext_len - 4, 0xe279_2aca)),
            "backing format name of 384 bytes",
        ),
    ];
    for (name, patch, needle) in cases {
        let mut bytes = base.clone();
        patch(&mut bytes, &h);
        let img = p.join(format!("{name}.qcow2"));
        std::fs::write(&img, &bytes).unwrap();
        let qemu = |cmd: &str| {
            Command::new("qemu-img")
                .args([cmd])
                .arg(&img)
                .output()
                .unwrap()
        };
        let ours = |cmd: &str| {
            Command::new(env!("CARGO_BIN_EXE_qmprestore"))
                .args([cmd])
                .arg(&img)
                .output()
                .unwrap()
        };
        // `qemu-img info` opens without I/O, which skips the data-file-raw rule: qemu-io reads.
        let qemu_reads = match name {
            "data-file-raw-alone" => Command::new("qemu-io")
                .args(["-c", "read 0 512"])
                .arg(&img)
                .output()
                .unwrap()
                .status
                .success(),
            _ => qemu("info").status.success(),
        };
        assert!(!qemu_reads, "{name}: QEMU opens it");
        let o = ours("info");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.code() == Some(1) && err.contains(needle),
            "{name}: {err}"
        );
        assert_eq!(
            ours("check").status.code(),
            qemu("check").status.code(),
            "{name}"
        );
        assert!(std::fs::read(&img).unwrap() == bytes, "{name} was changed");
    }
}

/// Requests that cannot succeed are refused before anything is written, also where opening for
/// writing would repair first (a dirty image) or flag bitmaps in use; internal snapshots of an
/// image with an external data file are refused, as QEMU refuses them.
#[test]
fn refused_snapshot_requests_change_nothing() {
    let Some((d, img)) = fresh("", &["write -P 7 0 64k"]) else {
        return;
    };
    let p = d.path();
    qemu_img(p, &["snapshot", "-c", "s", "t.qcow2"]);
    qemu_img(p, &["bitmap", "--add", "t.qcow2", "b0"]);
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[79] |= 1; // dirty
    std::fs::write(&img, &bytes).unwrap();
    qemu_img_create(p, "-f qcow2 -o data_file=x.raw df.qcow2 4M");
    let df = p.join("df.qcow2");
    let df_bytes = std::fs::read(&df).unwrap();
    let refused = |image: &Path, args: &[&str], needle: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
            .args(args)
            .arg(image)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    };
    refused(&img, &["snapshot", "-c", "s"], "already exists");
    refused(&img, &["snapshot", "-a", "nope"], "no snapshot");
    refused(&img, &["snapshot", "-d", "nope"], "no snapshot");
    assert!(
        std::fs::read(&img).unwrap() == bytes,
        "the dirty image changed"
    );
    refused(&df, &["snapshot", "-c", "s"], "external data file");
    assert!(
        std::fs::read(&df).unwrap() == df_bytes,
        "the data-file image changed"
    );
    // QEMU refuses it too.
    let q = Command::new("qemu-img")
        .args(["snapshot", "-c", "s"])
        .arg(&df)
        .output()
        .unwrap();
    assert!(!q.status.success());
}

/// A bitmaps extension that a program without bitmap support left behind (autoclear bit 0
/// clear) is ignored unchecked, as QEMU ignores it: the image opens and reads, with a warning.
#[test]
fn a_stale_bitmaps_extension_is_ignored_unchecked() {
    let Some((d, img)) = fresh("", &["write -P 7 0 64k"]) else {
        return;
    };
    qemu_img(d.path(), &["bitmap", "--add", "t.qcow2", "b0"]);
    let mut bytes = std::fs::read(&img).unwrap();
    let h = Header::parse(&bytes).unwrap();
    let pos = bitmaps_extension(&bytes, &h);
    set_u32(&mut bytes, pos + 12, 7); // the reserved field
    bytes[95] &= !1;
    std::fs::write(&img, &bytes).unwrap();
    let info = Command::new("qemu-img")
        .arg("info")
        .arg(&img)
        .output()
        .unwrap();
    assert!(info.status.success());
    let ours = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .arg("info")
        .arg(&img)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&ours.stderr);
    assert!(ours.status.success(), "{err}");
    assert!(err.contains("bitmaps are inconsistent"), "{err}");
    outcome(&img).unwrap();
}

/// Bitmap directory entries QEMU refuses to load (and so refuses the image): a table of 2^32-1
/// entries (it used to make `check` allocate 32 GiB), reserved flags, another type, an
/// unaligned table. We refuse the same images at open, naming the bitmap and the fault.
#[test]
fn bitmap_entries_are_validated_like_qemu() {
    let Some((d, img)) = fresh("", &[]) else {
        return;
    };
    qemu_img(d.path(), &["bitmap", "--add", "t.qcow2", "b0"]);
    let base = std::fs::read(&img).unwrap();
    let h = Header::parse(&base).unwrap();
    let pos = bitmaps_extension(&base, &h);
    let dir = BigEndian::read_u64(&base[pos + 24..]) as usize;
    type Poke = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Poke, &str)> = vec![
        (
            "table-size",
            Box::new(move |b| set_u32(b, dir + 8, u32::MAX)),
            "table of 4294967295 entries",
        ),
        (
            "flags",
            Box::new(move |b| b[dir + 15] |= 4),
            "reserved flags",
        ),
        ("type", Box::new(move |b| b[dir + 16] = 2), "type 2"),
        (
            "table-offset",
            Box::new(move |b| {
                let t = BigEndian::read_u64(&b[dir..]);
                set_u64(b, dir, t + 0x200);
            }),
            "not a cluster-aligned offset",
        ),
    ];
    for (name, poke, needle) in cases {
        let mut bytes = base.clone();
        poke(&mut bytes);
        let f = d.path().join(format!("{name}.qcow2"));
        std::fs::write(&f, &bytes).unwrap();
        let q = Command::new("qemu-img")
            .arg("info")
            .arg(&f)
            .output()
            .unwrap();
        assert!(!q.status.success(), "{name}: qemu-img opens it");
        let o = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
            .arg("info")
            .arg(&f)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains("bitmap 0:") && err.contains(needle),
            "{name}: {err}"
        );
    }
}

/// Where the bitmaps header extension's record starts in an image's first cluster.
fn bitmaps_extension(bytes: &[u8], h: &Header) -> usize {
    let mut pos = h.header_length as usize;
    while BigEndian::read_u32(&bytes[pos..]) != 0x2385_2875 {
        pos += 8 + (BigEndian::read_u32(&bytes[pos + 4..]) as usize).div_ceil(8) * 8;
    }
    pos
}
