//! Replays the fuzz target on every kept input: findings of past fuzzing runs (each once made
//! the reader panic, hang or over-allocate) and the fixtures the fuzzer was seeded with.

mod common;

use qmpbackup::qcow2::fuzz::open_read;
use std::path::Path;

#[test]
fn fuzz_findings_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/open_read");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        open_read(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n > 0, "no regression inputs in {}", dir.display());
}

#[test]
fn fuzz_seeds_open() {
    for entry in std::fs::read_dir(common::fixtures()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // Images with a backing file or an external data file need other files to be read.
        let standalone = name.ends_with(".qcow2")
            && !["mid", "top", "over-raw", "short-over", "datafile"]
                .iter()
                .any(|p| name.starts_with(p));
        if standalone {
            assert!(
                open_read(&std::fs::read(&path).unwrap()),
                "{name} should open"
            );
        }
    }
}

#[test]
fn qmp_fuzz_findings_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/qmp_message");
    let mut valid = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        valid += qmpbackup::backup::fuzz::qmp_lines(&std::fs::read(entry.unwrap().path()).unwrap());
    }
    assert!(valid >= 4, "the corpus samples parse");
}

#[test]
fn check_and_dir_names_fuzz_inputs_stay_fixed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut checked = 0;
    for entry in std::fs::read_dir(root.join("check_image")).unwrap() {
        checked +=
            qmpbackup::qcow2::fuzz::check_bytes(&std::fs::read(entry.unwrap().path()).unwrap())
                as usize;
    }
    assert!(checked > 0, "the seed image is checked");
    let mut created = 0;
    for entry in std::fs::read_dir(root.join("dir_names")).unwrap() {
        created +=
            qmpbackup::store::fuzz::dir_names(&std::fs::read(entry.unwrap().path()).unwrap());
    }
    assert!(created >= 10, "the seed names become files");
}

#[test]
fn guest_agent_fuzz_inputs_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/guest_agent");
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    // A well-behaved agent answers all six steps; one with stale replies, refusals and a
    // frozen guest gets through the sync and is refused where it refuses.
    assert_eq!(
        qmpbackup::qmp::fuzz::agent_stream(&read("corpus-conversation")),
        6
    );
    let n = qmpbackup::qmp::fuzz::agent_stream(&read("corpus-stale-and-errors"));
    assert!((1..6).contains(&n), "{n}");
    for entry in std::fs::read_dir(&dir).unwrap() {
        qmpbackup::qmp::fuzz::agent_stream(&std::fs::read(entry.unwrap().path()).unwrap());
    }
}

#[test]
fn nbd_session_findings_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/nbd_session");
    let mut answered = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        answered += qmpbackup::serve::fuzz::session(&std::fs::read(entry.unwrap().path()).unwrap());
    }
    // The seed sessions get their greetings, option replies and read data back.
    assert!(
        answered > 65536,
        "the corpus samples are served ({answered} bytes)"
    );
}

#[test]
fn manifest_fuzz_inputs_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/manifest");
    let mut found = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        found.insert(
            name,
            qmpbackup::store::fuzz::manifest(&std::fs::read(&path).unwrap()),
        );
    }
    // The seeds: both versions match their file, a flipped byte is one extent, a hostile
    // record is refused.
    assert_eq!(found["corpus-v1"], Some(0));
    assert_eq!(found["corpus-v2"], Some(0));
    assert_eq!(found["corpus-v2-damaged"], Some(1));
    assert_eq!(found["corpus-hostile"], None);
}

#[test]
fn luks_header_fuzz_inputs_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/luks_header");
    let mut parsed = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        parsed +=
            qmpbackup::qcow2::fuzz::luks_header(&std::fs::read(entry.unwrap().path()).unwrap())
                as u32;
    }
    assert!(parsed >= 2, "QEMU's headers parse");
}
