//! Restores from an object store ask it as little as the data allows, many requests at once:
//! a chain of a FULL and 999 INCs in a real Garage merges, verifies and serves right with one
//! GET per object, and the data reads of a large object are whole-block ranges that never
//! overlap. The counts come from `--debug` (each command's closing line of requests) and the
//! trace of each GET, so parallel metadata fetches, whole-object reads and aligned ranges
//! cannot silently go away.

mod common;

use common::garage::Garage;
use common::{have, succeeded};
use qmpbackup::qcow2::create::CreateOptions;
use qmpbackup::qcow2::write::Writer;
use qmpbackup::qcow2::Format;
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 65536;
/// Objects in the deep chain: the FULL and 999 INCs.
const DEPTH: u64 = 1000;
/// Requests a command makes besides one per object: listings of the folder and its
/// side folders, a HEAD or two for names no listing showed.
const SLACK: u64 = 12;

/// A cluster and rclone, or `None` after the loud skip (a failure in CI).
fn garage_with_rclone() -> Option<Garage> {
    let g = Garage::start(1)?;
    have("rclone").then_some(g)
}

/// The name of image `i` of the deep chain (0 is the FULL), hourly backups.
fn name(i: u64) -> String {
    match i {
        0 => "FULL-1700000000-disk.qcow2".to_string(),
        _ => format!("INC-{}-disk.qcow2", 1_700_000_000 + i * 3600),
    }
}

/// Where image `i` writes, and what: the FULL fills the disk, each INC one 64 KiB cluster
/// over its predecessor (as hourly backups of a small disk).
fn change(i: u64) -> (u64, Vec<u8>) {
    if i == 0 {
        let mut rng = common::Lcg(7);
        (0, (0..MIB).map(|_| rng.next() as u8).collect())
    } else {
        (
            (i * 7 % 16) * CLUSTER,
            vec![(i % 251 + 1) as u8; CLUSTER as usize],
        )
    }
}

/// Calls `f` with every image number of the deep chain, 16 at a time.
fn each_image(f: impl Fn(u64) + Sync) {
    let next = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= DEPTH {
                    break;
                }
                f(i);
            });
        }
    });
}

/// Writes a chain of `DEPTH` images of a 1 MiB disk into `dir` and returns the disk's bytes
/// at the newest point. The images are written many at a time: each one syncs its metadata
/// several times, and one after the other that took half a minute.
fn deep_chain(dir: &Path) -> Vec<u8> {
    // First every image on its own, then each linked to its (now existing) predecessor.
    each_image(|i| {
        let mut w = Writer::create(
            &dir.join(name(i)),
            &CreateOptions {
                size: MIB,
                cluster_size: CLUSTER,
                ..Default::default()
            },
        )
        .unwrap();
        let (at, data) = change(i);
        w.write_at(&data, at).unwrap();
        w.finish().unwrap();
    });
    each_image(|i| {
        if let Some(p) = i.checked_sub(1) {
            let mut w = Writer::open(&dir.join(name(i))).unwrap();
            w.set_backing(Some((&name(p), Some(Format::Qcow2))))
                .unwrap();
            w.finish().unwrap();
        }
    });
    let mut disk = vec![0u8; MIB as usize];
    for i in 0..DEPTH {
        let (at, data) = change(i);
        disk[at as usize..at as usize + data.len()].copy_from_slice(&data);
    }
    disk
}

/// The counts in a command's `--debug` closing line ("s3://b: 1000 GETs (1.2 MiB), 2
/// listings, 1 HEAD"): kind → number.
fn requests(stderr: &str) -> HashMap<String, u64> {
    let line = stderr
        .lines()
        .rfind(|l| l.contains("DEBUG s3://") && l.contains("GET"))
        .unwrap_or_else(|| panic!("no request summary in:\n{stderr}"));
    let counts = line.split_once(": ").unwrap().1;
    counts
        .split(", ")
        .map(|part| {
            let mut words = part.split_whitespace();
            let n = words.next().unwrap().parse().unwrap();
            let kind = words.next().unwrap().trim_end_matches('s');
            (kind.to_string(), n)
        })
        .collect()
}

/// Runs a command that must succeed; returns its stderr.
fn stderr_of(mut cmd: Command) -> String {
    let o: Output = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    succeeded(o);
    err
}

fn assert_one_get_per_object(what: &str, counts: &HashMap<String, u64>, per_object: u64) {
    let gets = counts.get("GET").copied().unwrap_or(0);
    assert!(
        gets >= DEPTH && gets <= per_object * DEPTH + SLACK,
        "{what}: {gets} GETs for {DEPTH} objects (bound {per_object} per object + {SLACK}): {counts:?}"
    );
    for kind in ["listing", "HEAD"] {
        let n = counts.get(kind).copied().unwrap_or(0);
        assert!(n <= SLACK, "{what}: {n} {kind}s: {counts:?}");
    }
}

/// The guest bytes of image `path` as qemu-img renders them.
fn raw_of(path: &Path, work: &Path) -> Vec<u8> {
    let raw = work.join("rendered.raw");
    succeeded(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(path)
            .arg(&raw)
            .output()
            .unwrap(),
    );
    std::fs::read(&raw).unwrap()
}

#[test]
fn a_thousand_object_chain_restores_with_one_get_per_object() {
    let Some(g) = garage_with_rclone() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let local = work.path().join("deep");
    std::fs::create_dir(&local).unwrap();
    let expected = deep_chain(&local);
    succeeded(
        g.rclone(&[
            "copy",
            "--transfers",
            "32",
            local.to_str().unwrap(),
            &g.remote("deep"),
        ])
        .output()
        .unwrap(),
    );
    let url = g.url("deep");

    // merge: each object's one block fetched once, the opens many at a time.
    let target = work.path().join("merged.qcow2");
    let err = stderr_of(g.qmprestore(&[
        "--debug",
        "merge",
        "--dir",
        &url,
        "--targetfile",
        target.to_str().unwrap(),
    ]));
    assert_one_get_per_object("merge", &requests(&err), 1);
    if have("qemu-img") {
        assert!(
            raw_of(&target, work.path()) == expected,
            "merged image differs"
        );
    }

    // verify: the checksum-less path reads every stored cluster, structure and check of
    // each file, all from that one block.
    let err = stderr_of(g.qmprestore(&["--debug", "verify", "--dir", &url]));
    assert_one_get_per_object("verify", &requests(&err), 1);

    // info --backing-chain and compare follow the backing files from the newest image: the
    // images before it are opened ahead, many at a time, from one listing.
    let top = format!("{url}/{}", name(DEPTH - 1));
    let err = stderr_of(g.qmprestore(&["--debug", "info", "--backing-chain", &top]));
    assert_one_get_per_object("info --backing-chain", &requests(&err), 1);
    let local_top = local.join(name(DEPTH - 1));
    let err = stderr_of(g.qmprestore(&["--debug", "compare", &top, local_top.to_str().unwrap()]));
    assert_one_get_per_object("compare", &requests(&err), 1);

    // serve, read whole by nbdcopy.
    if !have("nbdcopy") {
        return;
    }
    let sock = work.path().join("nbd.sock");
    let log = work.path().join("serve.log");
    let child = g
        .qmprestore(&[
            "--debug",
            "serve",
            "--dir",
            &url,
            "--socket",
            sock.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Stopped by its drop if anything below fails.
    let mut serve = common::nbd::Server {
        child,
        socket: sock.clone(),
    };
    serve.wait_ready();
    let copy = work.path().join("served.raw");
    let copied = Command::new("nbdcopy")
        .arg(serve.uri(""))
        .arg(&copy)
        .output()
        .unwrap();
    // SIGTERM: serve stops cleanly and prints its request summary.
    assert!(serve.stop().success(), "serve did not stop cleanly");
    succeeded(copied);
    assert!(
        std::fs::read(&copy).unwrap() == expected,
        "served disk differs"
    );
    let err = std::fs::read_to_string(&log).unwrap();
    assert_one_get_per_object("serve", &requests(&err), 1);
}

/// Every GET of `object` in a trace log: (first byte, end).
fn ranges_of(trace: &str, object: &str) -> Vec<(u64, u64)> {
    trace
        .lines()
        .filter_map(|l| l.split_once(&format!("GET {object} bytes=")))
        .map(|(_, r)| {
            let (a, b) = r.trim().split_once('-').unwrap();
            (a.parse().unwrap(), b.parse::<u64>().unwrap() + 1)
        })
        .collect()
}

#[test]
fn data_reads_are_whole_blocks_and_never_overlap() {
    let Some(g) = garage_with_rclone() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let local = work.path().join("big");
    std::fs::create_dir(&local).unwrap();
    // A FULL with 40 MiB of data in a 64 MiB disk: its data clusters follow its metadata, so
    // no 4 MiB chunk of the disk starts on a 1 MiB boundary of the object.
    let full = local.join("FULL-1700000000-disk.qcow2");
    let mut w = Writer::create(
        &full,
        &CreateOptions {
            size: 64 * MIB,
            cluster_size: CLUSTER,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = common::Lcg(11);
    let data: Vec<u8> = (0..40 * MIB / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    w.write_at(&data, 3 * MIB).unwrap();
    w.finish().unwrap();
    let size = std::fs::metadata(&full).unwrap().len();
    succeeded(
        g.rclone(&["copy", local.to_str().unwrap(), &g.remote("big")])
            .output()
            .unwrap(),
    );
    let target = work.path().join("merged.raw");
    let mut merge = g.qmprestore(&[
        "merge",
        "--format",
        "raw",
        "--dir",
        &g.url("big"),
        "--targetfile",
        target.to_str().unwrap(),
    ]);
    merge.env("QMPRESTORE_LOG", "warn,qmpbackup::s3=trace");
    let err = stderr_of(merge);
    let merged = std::fs::read(&target).unwrap();
    assert!(
        merged[3 * MIB as usize..43 * MIB as usize] == data[..],
        "merged data differs"
    );

    let mut ranges = ranges_of(&err, &g.url("big/FULL-1700000000-disk.qcow2"));
    assert!(ranges.len() > 3, "too few GETs to judge: {ranges:?}");
    ranges.sort();
    for &(a, b) in &ranges {
        assert!(
            a % MIB == 0 && (b % MIB == 0 || b == size),
            "GET of bytes {a}..{b} is not whole 1 MiB blocks: {ranges:?}"
        );
    }
    for w in ranges.windows(2) {
        assert!(w[0].1 <= w[1].0, "bytes fetched twice: {ranges:?}");
    }
    let fetched: u64 = ranges.iter().map(|(a, b)| b - a).sum();
    assert!(
        fetched <= size,
        "{fetched} bytes fetched of a {size}-byte object"
    );
}
