//! Chain commands (merge, rebase, list) on backup directories built with qemu-img/qemu-io in
//! the original tool's layout (standalone INCs) and in the linked layout; every result is
//! compared with the live disk at each backup instant by `qemu-img compare`.

mod common;

use common::chains::{build, Backups};
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// `qmprestore merge --format raw` of the chain into `target` (a file or a device).
fn merge_raw(b: &Backups, target: &str) -> String {
    b.qmprestore_ok("merge", &["--format", "raw", "--targetfile", target])
}

fn sums(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.display().to_string(), sha256_file(&p)))
        .collect();
    v.sort();
    v
}

/// A merge of the whole chain into `<root>/<name>` equals the disk at the newest backup.
fn assert_merges_to_last(b: &Backups, name: &str) {
    let m = b.root().join(name);
    b.merge(&[], &m);
    assert_same(&m, b.last());
}

/// `qmprestore <command> --dir <chain>` with the fault hook aborting it after its `n`-th
/// write; whether it finished before that.
fn finishes_before_write(b: &Backups, command: &str, n: u64) -> bool {
    Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .env(qmpbackup::qcow2::fault::ENV, n.to_string())
        .args([command, "--dir", b.d()])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn merge_every_restore_point_in_both_layouts() {
    if !have("qemu-img") {
        return;
    }
    for linked in [false, true] {
        let b = build(5, linked, "", None);
        let before = sums(&b.dir);
        let out = b.root().join("out");
        std::fs::create_dir(&out).unwrap();
        for (k, name) in b.names.iter().enumerate() {
            let target = out.join(format!("m{k}.qcow2"));
            b.merge(&["--until", name], &target);
            assert_same(&target, &b.expected[k]);
            assert_check_clean(&target);
        }
        // Raw and compressed outputs, and --until by prefix and by time.
        let raw = out.join("m.raw");
        merge_raw(&b, raw.to_str().unwrap());
        assert_eq!(sha256_file(&raw), sha256_file(b.last()));
        let z = out.join("z.qcow2");
        b.merge(&["--compress", "zstd", "--until", "INC-1700001200"], &z);
        assert_same(&z, &b.expected[2]);
        let t = out.join("t.qcow2");
        b.merge(&["--until", "2023-11-14T22:43:20Z"], &t);
        assert_same(&t, &b.expected[3]);
        // An existing target is refused without --force.
        let o = b.qmprestore("merge", &["--targetfile", t.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1));
        b.merge(&["--force"], &t);
        assert_same(&t, b.last());
        assert_eq!(
            sums(&b.dir),
            before,
            "merge must not change any backup file"
        );
    }
}

#[test]
fn long_chains_mixed_cluster_sizes_and_grown_disks_merge_exactly() {
    if !have("qemu-img") {
        return;
    }
    let b = build(32, false, "cluster_size=16k", None);
    assert_merges_to_last(&b, "long.qcow2");
    let b = build(4, true, "cluster_size=2M", Some(2));
    assert_merges_to_last(&b, "resized.qcow2");
    assert_eq!(
        qmpbackup::qcow2::Disk::open(&b.root().join("resized.qcow2"))
            .unwrap()
            .size(),
        12 << 20
    );
}

#[test]
fn rebase_links_the_chain_and_points_image_at_the_restore_point() {
    if !have("qemu-img") {
        return;
    }
    let b = build(3, false, "", None);
    let plan = b.qmprestore_ok("rebase", &["--until", &b.names[2], "--dry-run"]);
    assert_eq!(plan.lines().count(), 3, "{plan}");
    assert!(plan.contains("would set backing file"));
    assert!(!b.dir.join("image").exists(), "dry run changed something");
    b.qmprestore_ok("rebase", &["--until", &b.names[2]]);
    assert_eq!(
        std::fs::read_link(b.dir.join("image")).unwrap(),
        Path::new(&b.names[2])
    );
    assert_same(&b.dir.join("image"), &b.expected[2]);
    for name in &b.names[1..3] {
        assert_check_clean(&b.dir.join(name));
    }
    let info: Value =
        serde_json::from_str(&qemu_img(&b.dir, &["info", "--output=json", &b.names[2]])).unwrap();
    assert_eq!(info["backing-filename"], b.names[1].as_str());
    assert_eq!(info["backing-filename-format"], "qcow2");
    // Run again for the same point (as after an interruption once `image` was made): done,
    // nothing to change, no --force needed.
    let again = b.qmprestore_ok("rebase", &["--until", &b.names[2]]);
    assert_eq!(again, "", "{again}");
    // `image` names another point: refused without --force, then the whole chain.
    assert_eq!(b.qmprestore("rebase", &[]).status.code(), Some(1));
    b.qmprestore_ok("rebase", &["--force"]);
    assert_same(&b.dir.join("image"), b.last());
}

/// `list` and `merge` take the chain from the newest FULL (older files are listed as such), a
/// relative --dir works; a partial backup, a raw INC, or a flat folder of several disks
/// without --filter are refused with a clear message.
#[test]
fn list_and_merge_follow_the_newest_full_and_refuse_partial_raw_or_ambiguous_folders() {
    if !have("qemu-img") {
        return;
    }
    let b = build(2, false, "", None);
    let statuses = |b: &Backups| -> Vec<String> {
        let list: Value = serde_json::from_str(&b.qmprestore_ok("list", &["--json"])).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|p| p["status"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(statuses(&b), ["restore-point"; 3]);
    // A relative --dir works.
    let o = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .current_dir(b.root())
        .args(["merge", "--dir", "disk.qcow2", "--targetfile", "rel.qcow2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&b.root().join("rel.qcow2"), b.last());
    // A newer FULL starts the chain; the older one is reported.
    std::fs::copy(&b.expected[1], b.dir.join("FULL-1700000900-disk.qcow2")).unwrap();
    // INC-1700000600 predates the newer FULL: it belongs to the old chain.
    assert_eq!(
        statuses(&b),
        ["older-full", "older-inc", "restore-point", "restore-point"]
    );
    let m = b.root().join("newfull.qcow2");
    b.merge(&[], &m);
    // FULL (raw, = state 1) + INC 2 = state 2.
    assert_same(&m, &b.expected[2]);
    let refused = |b: &Backups| -> String {
        let o = b.qmprestore("merge", &["--targetfile", "/tmp/never.qcow2"]);
        assert_eq!(o.status.code(), Some(1));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // A partial backup blocks restores with a clear message.
    std::fs::write(b.dir.join("INC-1700001300-disk.qcow2.partial"), b"").unwrap();
    assert!(refused(&b).contains("partial backup"));
    std::fs::remove_file(b.dir.join("INC-1700001300-disk.qcow2.partial")).unwrap();
    // A raw INC cannot be laid over its predecessor.
    std::fs::write(b.dir.join("INC-1700001400-disk.qcow2"), vec![0u8; 8 << 20]).unwrap();
    let err = refused(&b);
    assert!(err.contains("raw incremental"), "{err}");
    // Several disks in a flat directory need --filter.
    std::fs::remove_file(b.dir.join("INC-1700001400-disk.qcow2")).unwrap();
    std::fs::copy(&b.expected[0], b.dir.join("FULL-1700000000-other.raw")).unwrap();
    assert!(refused(&b).contains("--filter"));
    let f = b.root().join("filtered.raw");
    b.merge(&["--filter", "other", "--format", "raw"], &f);
    assert_eq!(sha256_file(&f), sha256_file(&b.expected[0]));
}

#[test]
fn commit_folds_into_the_full_and_keeps_later_incs_valid() {
    if !have("qemu-img") {
        return;
    }
    for linked in [false, true] {
        let b = build(4, linked, "", None);
        let before = sums(&b.dir);
        let plan = b.qmprestore_ok("commit", &["--until", &b.names[2], "--dry-run"]);
        assert!(plan.contains("would fold"), "{plan}");
        assert_eq!(sums(&b.dir), before, "dry run changed files");
        b.qmprestore_ok("commit", &["--until", &b.names[2]]);
        let full = b.dir.join(&b.names[0]);
        assert_same(&full, &b.expected[2]);
        assert_check_clean(&full);
        assert!(!b.dir.join(&b.names[1]).exists() && !b.dir.join(&b.names[2]).exists());
        // The INCs after the restore point still restore the later states.
        assert_merges_to_last(&b, "after.qcow2");
        if linked {
            assert_same(&b.dir.join(&b.names[4]), b.last());
        }
        b.qmprestore_ok("commit", &[]);
        assert_same(&full, b.last());
        assert_eq!(std::fs::read_dir(&b.dir).unwrap().count(), 1);
    }
}

#[test]
fn interrupted_commits_converge_when_run_again() {
    if !have("qemu-img") {
        return;
    }
    for n in [0u64, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89] {
        let b = build(3, n % 2 == 1, "", None);
        let crashed = !finishes_before_write(&b, "commit", n);
        // Whatever was left restores the newest state: by merge, and by completing the commit.
        assert_merges_to_last(&b, "m.qcow2");
        b.qmprestore_ok("commit", &[]);
        let full = b.dir.join(&b.names[0]);
        assert_same(&full, b.last());
        assert_no_corruption(&full);
        if !crashed {
            break;
        }
    }
}

#[test]
fn snapshotrebase_keeps_every_backup_as_a_snapshot() {
    if !have("qemu-img") {
        return;
    }
    for linked in [false, true] {
        let b = build(3, linked, "", None);
        b.qmprestore_ok("snapshotrebase", &["--until", &b.names[2]]);
        let full = b.dir.join(&b.names[0]);
        assert_check_clean(&full);
        let listed = qemu_img(&b.dir, &["snapshot", "-l", &b.names[0]]);
        let mut names = vec!["FULL-BACKUP".to_string()];
        for k in 1..=2 {
            names.push(qmpbackup::chain::snapshot_rebase::snapshot_name(
                1_700_000_000 + k * 600,
            ));
        }
        for (k, n) in names.iter().enumerate() {
            assert!(listed.contains(n.as_str()), "{n} not in {listed}");
            assert_eq!(
                sha256_bytes(&render(&b.dir, &b.names[0], Some(n))),
                sha256_file(&b.expected[k]),
                "snapshot {n}"
            );
        }
        assert_same(&full, &b.expected[2]);
        // The rest of the chain still restores, and a second run finishes it.
        assert_merges_to_last(&b, "m.qcow2");
        b.qmprestore_ok("snapshotrebase", &[]);
        assert_same(&full, b.last());
        assert_check_clean(&full);
        assert_eq!(std::fs::read_dir(&b.dir).unwrap().count(), 1);
    }
}

#[test]
fn interrupted_snapshotrebase_converges_when_run_again() {
    if !have("qemu-img") {
        return;
    }
    for n in [0u64, 2, 4, 7, 11, 16, 23, 35, 50, 70, 100, 150, 220] {
        let b = build(2, n % 2 == 0, "", None);
        let finished = finishes_before_write(&b, "snapshotrebase", n);
        b.qmprestore_ok("snapshotrebase", &[]);
        let full = b.dir.join(&b.names[0]);
        assert_same(&full, b.last());
        assert_no_corruption(&full);
        let last = qmpbackup::chain::snapshot_rebase::snapshot_name(1_700_001_200);
        assert_eq!(
            sha256_bytes(&render(&b.dir, &b.names[0], Some(&last))),
            sha256_file(b.last()),
            "crash after {n}"
        );
        if finished {
            break;
        }
    }
}

#[test]
fn verify_finds_bit_rot_with_file_and_offset() {
    if !have("qemu-img") {
        return;
    }
    let b = build(3, true, "", None);
    let o = b.qmprestore("verify", &["--json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let v = json_of(&o);
    assert_eq!(v["restorable"], true);
    assert!(v["dirs"][0]["bytes_read"].as_u64().unwrap() > 0);
    // Point one of INC 2's data clusters past the end of its file.
    let inc = b.dir.join(&b.names[2]);
    let mut bytes = std::fs::read(&inc).unwrap();
    let h = qmpbackup::qcow2::header::Header::parse(&bytes).unwrap();
    let l2 = u64::from_be_bytes(bytes[h.l1_table_offset as usize..][..8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00;
    let entry = (0..h.l2_entries())
        .map(|i| (l2 + i * 8) as usize)
        .find(|&e| {
            u64::from_be_bytes(bytes[e..e + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00 != 0
        })
        .expect("INC 2 maps some data");
    bytes[entry..entry + 8].copy_from_slice(&((1u64 << 63) | (1 << 34)).to_be_bytes());
    std::fs::write(&inc, bytes).unwrap();
    let o = b.qmprestore("verify", &["--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v = json_of(&o);
    let problems = v["dirs"][0]["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|p| p["file"] == b.names[2].as_str()
            && p["problem"].as_str().unwrap().contains("0x400000000")),
        "{problems:?}"
    );
    // Several directories at once, a partial backup, and a directory that is not there.
    std::fs::write(b.dir.join("INC-1700009999-disk.qcow2.partial"), b"").unwrap();
    let o = qmprestore(&["verify", "--recursive", "--dir", b.root().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("NOT restorable") && text.contains("partial backup"),
        "{text}"
    );
    assert_eq!(
        qmprestore(&["verify", "--dir", "/nonexistent/backup"])
            .status
            .code(),
        Some(2)
    );
}

/// Verify with manifests reads each file once (the checksums prove every byte); the restore
/// commands rewrite the manifests of the files they change and drop those of the files they
/// delete, so a chain they changed still verifies every byte, and a flipped byte is caught in
/// a changed file as in an untouched one.
#[test]
fn manifests_are_read_once_and_rewritten_for_changed_files() {
    if !have("qemu-img") {
        return;
    }
    let b = build(3, false, "", None);
    b.write_manifests();
    let total: u64 = b
        .names
        .iter()
        .map(|n| std::fs::metadata(b.dir.join(n)).unwrap().len())
        .sum();
    let o = b.qmprestore("verify", &["--json"]);
    let v = json_of(&o);
    assert_eq!(o.status.code(), Some(0), "{v}");
    assert_eq!(v["dirs"][0]["bytes_read"].as_u64().unwrap(), total);

    // The original's layout: rebase writes a backing file name into every INC.
    let all: Vec<String> = b.names.iter().map(|n| format!("{n}.json")).collect();
    b.qmprestore_ok("rebase", &["--until", &b.names[2]]);
    assert_eq!(manifest_names(&b.dir), all);
    let o = b.qmprestore("verify", &["--json"]);
    let v = json_of(&o);
    assert_eq!(o.status.code(), Some(0), "{v}");
    assert_eq!(v["dirs"][0]["bytes_read"].as_u64().unwrap(), total, "{v}");
    // Running it again changes nothing.
    let before = sums(&b.dir);
    b.qmprestore_ok("rebase", &["--force", "--until", &b.names[2]]);
    assert_eq!(sums(&b.dir), before);

    // Bit rot in the last INC, whose header rebase changed: found by the new checksums.
    let last = b.dir.join(&b.names[3]);
    let len = std::fs::metadata(&last).unwrap().len();
    let mut bytes = std::fs::read(&last).unwrap();
    bytes[len as usize - 1] ^= 1;
    std::fs::write(&last, &bytes).unwrap();
    let o = b.qmprestore("verify", &["--json"]);
    let v = json_of(&o);
    assert_eq!(o.status.code(), Some(1), "{v}");
    assert!(
        v["dirs"][0]["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["file"] == b.names[3].as_str()
                && p["problem"].as_str().unwrap().contains("checksum")),
        "{v}"
    );
    bytes[len as usize - 1] ^= 1;
    std::fs::write(&last, &bytes).unwrap();

    // commit changes the FULL and re-links the next INC: both get new manifests, the
    // folded INCs' go with them.
    b.qmprestore_ok("commit", &["--until", &b.names[2]]);
    assert_eq!(manifest_names(&b.dir), vec![all[0].clone(), all[3].clone()]);
    assert_verifies(&b.dir);
    assert_same(&b.dir.join(&b.names[0]), &b.expected[2]);
}

/// A disk that grew between backups: commit grows the FULL, snapshotrebase keeps each backup
/// at its own size, and both equal the disk at each point.
#[test]
fn commit_and_snapshotrebase_across_a_resize_restore_every_size() {
    if !have("qemu-img") {
        return;
    }
    for linked in [false, true] {
        let b = build(4, linked, "", Some(2));
        let copy = b.copy_to(&b.root().join("copy"));
        qmprestore_ok(&["commit", "--dir", copy.to_str().unwrap()]);
        let full = copy.join(&b.names[0]);
        assert_check_clean(&full);
        assert_same(&full, b.last());
        assert_eq!(
            qmpbackup::qcow2::Disk::open(&full).unwrap().size(),
            12 << 20
        );

        b.qmprestore_ok("snapshotrebase", &[]);
        let full = b.dir.join(&b.names[0]);
        assert_check_clean(&full);
        // qemu-img renders a snapshot at the image's current size (zeros beyond the size it
        // was taken at); reverting to it restores that size.
        for k in 1..=4u64 {
            let snap = qmpbackup::chain::snapshot_rebase::snapshot_name(1_700_000_000 + k * 600);
            let got = render(&b.dir, &b.names[0], Some(&snap));
            let want = std::fs::read(&b.expected[k as usize]).unwrap();
            assert_eq!(got.len(), 12 << 20);
            assert!(got[..want.len()] == want[..], "snapshot {snap}");
            assert!(got[want.len()..].iter().all(|&x| x == 0), "snapshot {snap}");
        }
        let reverted = b.root().join("reverted.qcow2");
        std::fs::copy(&full, &reverted).unwrap();
        let snap1 = qmpbackup::chain::snapshot_rebase::snapshot_name(1_700_000_600);
        qemu_img(
            &b.dir,
            &["snapshot", "-a", &snap1, reverted.to_str().unwrap()],
        );
        assert_same(&reverted, &b.expected[1]);
        assert_eq!(
            qmpbackup::qcow2::Disk::open(&reverted).unwrap().size(),
            8 << 20
        );
        assert_same(&full, b.last());
    }
}

/// The command lines of the restore commands on directory `d` (merge into `out`).
fn chain_commands<'a>(d: &'a str, out: &'a str) -> Vec<Vec<&'a str>> {
    vec![
        vec!["merge", "--dir", d, "--targetfile", out],
        vec!["commit", "--dir", d],
        vec!["snapshotrebase", "--dir", d],
        vec!["rebase", "--dir", d],
    ]
}

/// Backing file names that lead out of the backup directory (`..`, absolute, or a symlink to
/// elsewhere) are refused by every chain command, naming the file, unless
/// --allow-outside-backing; nothing is changed.
#[test]
fn backing_names_outside_the_backup_directory_are_refused() {
    if !have("qemu-img") {
        return;
    }
    let b = build(2, true, "", None);
    let root = b.root();
    qemu_img_create(root, "-f qcow2 outside.qcow2 8M");
    std::os::unix::fs::symlink(root.join("outside.qcow2"), b.dir.join("link.qcow2")).unwrap();
    let inc = &b.names[2];
    let absolute = root.join("outside.qcow2").to_string_lossy().into_owned();
    for name in ["../outside.qcow2", absolute.as_str(), "link.qcow2"] {
        qemu_img(&b.dir, &["rebase", "-u", "-F", "qcow2", "-b", name, inc]);
        let before = sums(&b.dir);
        let out = root.join("m.qcow2");
        for args in chain_commands(b.d(), out.to_str().unwrap()) {
            let o = qmprestore(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{name} {args:?}: {err}");
            assert!(
                err.contains(inc.as_str()) && err.contains("outside the backup directory"),
                "{err}"
            );
            assert_eq!(sums(&b.dir), before, "{args:?} changed something");
        }
        let v = b.qmprestore("verify", &[]);
        assert_eq!(v.status.code(), Some(1), "verify reports the foreign link");
        b.merge(&["--allow-outside-backing"], &out);
        assert_same(&out, b.last());
        std::fs::remove_file(&out).unwrap();
    }
}

/// A backup file that is a symbolic link (here to a file outside the directory) is refused by
/// every chain command, naming it.
#[test]
fn symlinked_backup_files_are_refused() {
    if !have("qemu-img") {
        return;
    }
    let b = build(1, true, "", None);
    let root = b.root();
    let inc = b.dir.join(&b.names[1]);
    std::fs::rename(&inc, root.join("elsewhere.qcow2")).unwrap();
    std::os::unix::fs::symlink(root.join("elsewhere.qcow2"), &inc).unwrap();
    let out = root.join("m.qcow2");
    let mut commands = chain_commands(b.d(), out.to_str().unwrap());
    commands.push(vec!["list", "--dir", b.d()]);
    for args in commands {
        let o = qmprestore(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&b.names[1]) && err.contains("symbolic link"),
            "{err}"
        );
    }
    assert_eq!(b.qmprestore("verify", &[]).status.code(), Some(1));
}

/// A loop device over a file, detached on drop.
struct LoopDevice {
    dev: String,
}

impl LoopDevice {
    /// Attaches `file`; `None` (after the skip, a failure in CI, where the tests run as root)
    /// where that is not permitted.
    fn attach(file: &Path) -> Option<LoopDevice> {
        let o = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output();
        match o {
            Ok(o) if o.status.success() => Some(LoopDevice {
                dev: String::from_utf8_lossy(&o.stdout).trim().to_string(),
            }),
            o => {
                let why = match o {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                skip(&format!(
                    "cannot attach a loop device ({why}); merge onto a block device was not tested"
                ));
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

#[test]
fn merge_restores_straight_onto_a_block_device() {
    if !have("qemu-img") {
        return;
    }
    let b = build(4, false, "", None);
    let expected = std::fs::read(b.last()).unwrap();
    // A device larger than the disk, full of old data: every byte of the disk must be written
    // (zeros too: a device has no holes), and nothing past it.
    let backing = b.root().join("device.img");
    std::fs::write(&backing, vec![0xAAu8; expected.len() + (1 << 20)]).unwrap();
    let Some(dev) = LoopDevice::attach(&backing) else {
        return;
    };
    merge_raw(&b, &dev.dev);
    // A qcow2 merge needs a file.
    let o = b.qmprestore("merge", &["--targetfile", &dev.dev]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not a block device"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let on_device = std::fs::read(&dev.dev).unwrap();
    assert_eq!(
        sha256_bytes(&on_device[..expected.len()]),
        sha256_bytes(&expected),
        "the device does not hold the disk"
    );
    assert!(
        on_device[expected.len()..].iter().all(|&x| x == 0xAA),
        "merge wrote past the disk's end"
    );
}
