//! Backups on an object store: pushed by qmpbackup from a real QEMU 10, listed, verified,
//! merged and served by qmprestore straight from a real Garage cluster (one node, or three
//! with replication factor 3 for the fault tests); rclone as the independent client that
//! damages, replaces and inspects objects behind our back.

mod common;

use common::garage::Garage;
use common::qemu::{one_disk_vm, Vm, VD0};
use common::{have, needs_qemu, succeeded};
use qmpbackup::s3::resume::{self, Record};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn out(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn qemu_compare(a: &Path, b: &str) {
    let o = out(Command::new("qemu-img")
        .args(["compare", "-f", "raw"])
        .arg(a)
        .arg(b));
    assert!(
        o.status.success(),
        "{} differs from {b}: {}",
        a.display(),
        text(&o)
    );
}

/// Writes `n` MiB of incompressible data at `at` MiB through qemu-io in QEMU.
fn write_random(vm: &mut Vm, dir: &Path, at: u64, n: u64, seed: u64) {
    let mut rng = common::Lcg(seed);
    let data: Vec<u8> = (0..n * MIB / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let f = dir.join(format!("pattern-{seed}.bin"));
    std::fs::write(&f, &data).unwrap();
    // qemu-io cannot write a file's bytes; write them as a pattern per 64 KiB instead, varied
    // by seed and position so the store's deduplication does not collapse them.
    for k in 0..n * 16 {
        let p = data[(k * 65536) as usize] | 1;
        vm.io(
            VD0,
            &format!("write -P 0x{p:02x} {} 65536", at * MIB + k * 65536),
        );
    }
}

/// `info`, `map`, `check`, `convert` and `compare` of image `top` in the store folder
/// `folder_url` against qemu-img on a downloaded copy of the folder.
fn image_commands_read_the_store_as_qemu_img_reads_a_copy(
    g: &Garage,
    dir: &Path,
    folder_url: &str,
    top: &str,
) {
    let copy = dir.join("downloaded");
    let prefix = folder_url.strip_prefix(&g.url("")).unwrap();
    succeeded(out(&mut g.rclone(&[
        "copy",
        &g.remote(prefix),
        copy.to_str().unwrap(),
    ])));
    let image = format!("{folder_url}/{top}");
    let local = copy.join(top);
    let local = local.to_str().unwrap();

    let json = |o: String| -> serde_json::Value { serde_json::from_str(&o).unwrap() };
    let ours = json(succeeded(out(
        &mut g.qmprestore(&["info", "--output", "json", &image])
    )));
    let theirs = json(common::qemu_img(dir, &["info", "--output=json", local]));
    for field in [
        "format",
        "virtual-size",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
        "format-specific",
        "dirty-flag",
    ] {
        assert_eq!(ours[field], theirs[field], "info: {field}");
    }
    // Byte for byte what qemu-img prints (no file names in the JSON form).
    let ours = succeeded(out(&mut g.qmprestore(&["map", "--output", "json", &image])));
    assert_eq!(
        ours,
        common::qemu_img(dir, &["map", "--output=json", local])
    );

    succeeded(out(&mut g.qmprestore(&["check", &image])));
    for format in ["raw", "qcow2"] {
        let converted = dir.join(format!("converted.{format}"));
        let c = converted.to_str().unwrap();
        succeeded(out(&mut g.qmprestore(&["convert", "-O", format, &image, c])));
        common::qemu_img(dir, &["compare", local, c]);
    }
    let check = common::qemu_img(
        dir,
        &["check", dir.join("converted.qcow2").to_str().unwrap()],
    );
    assert!(check.starts_with("No errors"), "{check}");
    succeeded(out(&mut g.qmprestore(&["compare", &image, local])));
}

/// A cluster of `nodes` for a test that also uses rclone; `None` (after the loud skip) when
/// either is missing.
fn garage_with_rclone(nodes: usize) -> Option<Garage> {
    let g = Garage::start(nodes)?;
    have("rclone").then_some(g)
}

/// Serves `url` over NBD from the store until dropped; returns the URI.
struct Serve(std::process::Child, PathBuf);

impl Serve {
    /// Starts the server; its log (every GET it makes, at trace level) goes to `log`.
    fn start(g: &Garage, dir: &Path, url: &str, log: &Path) -> Serve {
        let sock = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let child = g
            .qmprestore(&["serve", "--dir", url, "--socket", sock.to_str().unwrap()])
            .env("QMPRESTORE_LOG", "warn,qmpbackup::s3=trace")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "serve did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Serve(child, sock)
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.1.display())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A chain pushed from a real backup: restore points from the store equal the disk at each
/// backup (merge and serve), verify passes, and names the file and offset of bytes changed
/// behind its back; --push-only keeps what the next incremental needs.
#[test]
fn pushed_backups_restore_verify_and_serve_from_the_store() {
    let Some(t) = needs_qemu() else { return };
    if !have("rclone") {
        return;
    }
    let Some(g) = Garage::start(1) else { return };
    let dir = t.path();
    let mut vm = one_disk_vm(dir);
    let target = dir.join("b");
    let tgt = target.to_str().unwrap();
    let url = g.url("vm1");
    let socket = vm.socket();
    let backup = |level: &str, extra: &[&str]| {
        let mut args = vec![
            "--socket", &socket, "backup", "-l", level, "-t", tgt, "--push", &url,
        ];
        args.extend(extra);
        let o = out(&mut g.qmpbackup(&args));
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
    };
    let mut expected = Vec::new();
    for (k, level) in ["full", "inc", "inc"].iter().enumerate() {
        write_random(&mut vm, dir, k as u64 * 10, 3, k as u64 + 1);
        let push_only: &[&str] = if k == 2 { &["--push-only"] } else { &[] };
        let log = backup(level, push_only);
        assert!(log.contains("Pushed"), "{log}");
        let raw = dir.join(format!("expected{k}.raw"));
        vm.capture(VD0, "d0.qcow2", "qcow2", &raw);
        expected.push(raw);
    }
    let disk_url = format!("{url}/d0.qcow2");
    // --push-only removed the backup files here and kept their manifests.
    let dd = target.join("d0.qcow2");
    let left: Vec<String> = std::fs::read_dir(&dd)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(common::manifest_names(&dd).len(), 3);
    let local = out(Command::new(env!("CARGO_BIN_EXE_qmprestore")).args([
        "merge",
        "--dir",
        dd.to_str().unwrap(),
        "--targetfile",
        dir.join("local.qcow2").to_str().unwrap(),
    ]));
    assert_eq!(local.status.code(), Some(1));
    assert!(
        text(&local).contains("restore from the object store"),
        "{}",
        text(&local)
    );
    // The chain continues: one more incremental after --push-only.
    write_random(&mut vm, dir, 40, 2, 9);
    backup("inc", &[]);
    let raw = dir.join("expected3.raw");
    vm.capture(VD0, "d0.qcow2", "qcow2", &raw);
    expected.push(raw);
    vm.quit();

    let list = succeeded(out(
        &mut g.qmprestore(&["list", "--dir", &disk_url, "--json"])
    ));
    let points: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["file"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "{list}");
    let verify = out(&mut g.qmprestore(&["verify", "--dir", &disk_url]));
    assert!(verify.status.success(), "{}", text(&verify));
    for (k, name) in names.iter().enumerate() {
        let merged = dir.join(format!("m{k}.raw"));
        succeeded(out(&mut g.qmprestore(&[
            "merge",
            "--dir",
            &disk_url,
            "--until",
            name,
            "--format",
            "raw",
            "--targetfile",
            merged.to_str().unwrap(),
        ])));
        qemu_compare(&expected[k], merged.to_str().unwrap());
    }
    {
        let s = Serve::start(&g, dir, &disk_url, &dir.join("serve1.log"));
        qemu_compare(&expected[3], &s.uri());
    }
    image_commands_read_the_store_as_qemu_img_reads_a_copy(&g, dir, &disk_url, names[3]);
    // Many requests at once over several connections (nbdcopy): each block of the store is
    // fetched once, not once per request that wants part of it.
    if have("nbdcopy") {
        let log = dir.join("serve2.log");
        let copy = dir.join("served.raw");
        {
            let s = Serve::start(&g, dir, &disk_url, &log);
            succeeded(out(Command::new("nbdcopy")
                .args(["--requests=16", "--request-size=262144"])
                .arg(s.uri())
                .arg(&copy)));
        }
        qemu_compare(&expected[3], copy.to_str().unwrap());
        let gets: Vec<String> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter_map(|l| Some(l.split_once("GET ")?.1.to_string()))
            .collect();
        let mut unique = gets.clone();
        unique.sort();
        unique.dedup();
        assert!(
            !gets.is_empty() && gets.len() <= unique.len() * 3 / 2,
            "{} GETs for {} ranges: blocks fetched again and again",
            gets.len(),
            unique.len()
        );
    }

    // Bytes changed behind our back (same size): verify names the file and the offset.
    let victim = names[1];
    let local_copy = dir.join("victim");
    succeeded(out(&mut g.rclone(&[
        "copyto",
        "--ignore-times",
        &g.remote(&format!("vm1/d0.qcow2/{victim}")),
        local_copy.to_str().unwrap(),
    ])));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&local_copy)
        .unwrap();
    let at = f.metadata().unwrap().len() - 4096;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    succeeded(out(&mut g.rclone(&[
        "copyto",
        "--ignore-times",
        local_copy.to_str().unwrap(),
        &g.remote(&format!("vm1/d0.qcow2/{victim}")),
    ])));
    let o = out(&mut g.qmprestore(&["verify", "--json", "--dir", &disk_url]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let problems = report["dirs"][0]["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p["file"] == victim && p["offset"].as_u64().is_some()),
        "{report}"
    );
}

/// A chain whose images name their predecessors as backing files (made by qemu-img),
/// uploaded by rclone: the image commands follow the backing files through the store and
/// agree with qemu-img on a downloaded copy.
#[test]
fn image_commands_follow_backing_files_in_the_store() {
    if needs_qemu().is_none() {
        return;
    }
    let Some(g) = garage_with_rclone(1) else {
        return;
    };
    let chain = common::chains::build(3, true, "", None);
    succeeded(out(&mut g.rclone(&[
        "copy",
        chain.dir.to_str().unwrap(),
        &g.remote("linked/disk.qcow2"),
    ])));
    let work = tempfile::tempdir().unwrap();
    let top = chain.names.last().unwrap();
    image_commands_read_the_store_as_qemu_img_reads_a_copy(
        &g,
        work.path(),
        &g.url("linked/disk.qcow2"),
        top,
    );
    // What the top image reads as is the live disk at the last backup.
    let raw = work.path().join("converted.raw");
    common::assert_same(&raw, chain.expected.last().unwrap());
}

/// Pushes the bundled sample chain to `prefix`; returns its disk folder's URL.
fn push_sample(g: &Garage, work: &Path, prefix: &str) -> String {
    let local = work.join(prefix);
    common::copy_sample_chain(&local);
    format!("{}/disk.qcow2", push_folder(g, &local, prefix))
}

/// `qmpbackup push` of the target folder `local` to `prefix`; returns the prefix's URL.
fn push_folder(g: &Garage, local: &Path, prefix: &str) -> String {
    let url = g.url(prefix);
    succeeded(out(&mut g.qmpbackup(&[
        "push",
        "--target",
        local.to_str().unwrap(),
        "--push",
        &url,
    ])));
    url
}

/// On a terminal a push shows a progress bar over the folder's bytes; off one, none.
#[test]
fn a_push_shows_progress_on_a_terminal_only() {
    if !have("script") {
        return;
    }
    let Some(g) = Garage::start(1) else { return };
    let work = tempfile::tempdir().unwrap();
    let local = work.path().join("vm");
    common::copy_sample_chain(&local);
    let push = format!(
        "{} push --target {} --push {}",
        env!("CARGO_BIN_EXE_qmpbackup"),
        local.display(),
        g.url("tty")
    );
    let plain = text(&out(Command::new("sh")
        .args(["-c", &push])
        .env_clear()
        .envs(g.env.iter().map(|(k, v)| (k, v)))));
    assert!(
        plain.contains("Pushed") && !plain.contains("MiB"),
        "{plain}"
    );
    // Again on a terminal (script gives the command one), into another prefix.
    let push = push.replace("/tty", "/tty2");
    let o = out(g.with_env(Command::new("script").args(["-qec", &push, "/dev/null"])));
    let shown = text(&o);
    assert!(o.status.success(), "{shown}");
    assert!(
        shown.contains("push disk.qcow2/") && shown.contains("2.69 MiB"),
        "{shown}"
    );
    // Log lines are written with the bar hidden: each starts a line of its own (after a
    // newline or the bar's erase sequence), never after a bar's text.
    let mut lines = 0;
    for (at, _) in shown.match_indices("    INFO") {
        let stamp = shown[..at].rfind("[20").unwrap();
        let before = shown[..stamp].trim_end_matches("\u{1b}[32m");
        assert!(
            before.is_empty() || before.ends_with(['\n', 'A', 'K']),
            "a log line drawn into the bar: {:?}",
            &shown[stamp.saturating_sub(80)..at]
        );
        lines += 1;
    }
    assert!(lines >= 6, "{shown}");
}

/// Wrong credentials, a missing bucket: a clear error, exit 1, nothing written.
#[test]
fn wrong_credentials_or_bucket_fail_cleanly() {
    let Some(g) = Garage::start(1) else { return };
    let work = tempfile::tempdir().unwrap();
    let disk = push_sample(&g, work.path(), "sample");
    let target = work.path().join("out.qcow2");
    let t = target.to_str().unwrap();
    let mut wrong = g.qmprestore(&["merge", "--dir", &disk, "--targetfile", t]);
    wrong.env("AWS_SECRET_ACCESS_KEY", "0".repeat(64));
    let o = out(&mut wrong);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("AWS_SECRET_ACCESS_KEY"), "{}", text(&o));
    let o = out(&mut g.qmprestore(&["merge", "--dir", "s3://no-such-bucket/x", "--targetfile", t]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("does not exist"), "{}", text(&o));
    let o = out(&mut g.qmprestore(&["commit", "--dir", &disk]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("object store cannot"), "{}", text(&o));
    assert_eq!(
        std::fs::read_dir(work.path()).unwrap().count(),
        1,
        "only the pushed copy"
    );
    // The right credentials restore what the local chain restores.
    succeeded(out(&mut g.qmprestore(&[
        "merge",
        "--dir",
        &disk,
        "--targetfile",
        t,
    ])));
    let reference = work.path().join("ref.qcow2");
    succeeded(out(Command::new(env!("CARGO_BIN_EXE_qmprestore")).args([
        "merge",
        "--dir",
        common::sample_chain().join("disk.qcow2").to_str().unwrap(),
        "--targetfile",
        reference.to_str().unwrap(),
    ])));
    common::assert_same(&target, &reference);
}

/// A folder of more than 1000 objects (the store's page size) lists completely.
#[test]
fn folders_of_more_than_a_thousand_objects_list_completely() {
    let Some(g) = garage_with_rclone(1) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let d = work.path().join("many");
    std::fs::create_dir(&d).unwrap();
    for i in 0..1100u64 {
        let level = if i == 0 { "FULL" } else { "INC" };
        std::fs::write(
            d.join(format!("{level}-{}-disk.qcow2", 1_700_000_000 + i)),
            b"x",
        )
        .unwrap();
    }
    // An interrupted backup's file: listed as partial, with its size from the listing.
    std::fs::write(
        d.join("INC-1700009999-disk.qcow2.partial"),
        vec![7u8; 12345],
    )
    .unwrap();
    succeeded(out(&mut g.rclone(&[
        "copy",
        "--transfers",
        "32",
        d.to_str().unwrap(),
        &g.remote("many"),
    ])));
    let list = succeeded(out(&mut g.qmprestore(&[
        "list",
        "--json",
        "--dir",
        &g.url("many"),
    ])));
    let points: serde_json::Value = serde_json::from_str(&list).unwrap();
    let points = points.as_array().unwrap();
    assert_eq!(points.len(), 1101);
    let partial = points.iter().find(|p| p["status"] == "partial").unwrap();
    assert_eq!(partial["file"], "INC-1700009999-disk.qcow2.partial");
    assert_eq!(partial["size"], 12345);
}

/// A chain big enough that a rate-limited merge from the store runs for seconds.
fn push_big_chain(g: &Garage, work: &Path, prefix: &str) -> (String, PathBuf) {
    let local = work.join(prefix);
    let dd = local.join("disk.qcow2");
    std::fs::create_dir_all(&dd).unwrap();
    let full = dd.join("FULL-1700000000-disk.qcow2");
    common::qemu_img_create(&dd, "-f qcow2 FULL-1700000000-disk.qcow2 64M");
    // Data at the end of the FULL too: a merge (guest order) reads from it last.
    common::qemu_io(
        &dd,
        full.file_name().unwrap().to_str().unwrap(),
        &["write -P 0x11 0 24M", "write -P 0x12 48M 16M"],
    );
    for (k, off) in [(1, 8), (2, 30)] {
        let name = format!("INC-{}-disk.qcow2", 1_700_000_000 + k * 600);
        common::qemu_img_create(&dd, &format!("-f qcow2 {name} 64M"));
        common::qemu_io(
            &dd,
            &name,
            &[format!("write -P 0x{:02x} {off}M 8M", 0x20 + k)],
        );
    }
    let url = push_folder(g, &local, prefix);
    let reference = work.join(format!("{prefix}-ref.raw"));
    succeeded(out(Command::new(env!("CARGO_BIN_EXE_qmprestore")).args([
        "merge",
        "--format",
        "raw",
        "--dir",
        dd.to_str().unwrap(),
        "--targetfile",
        reference.to_str().unwrap(),
    ])));
    (format!("{url}/disk.qcow2"), reference)
}

/// A raw merge of `disk` into `target` paced at 2 MiB/s (reads spread over about 28 s; the
/// FULL's last 16 MiB are read from about 20 s on, so a change made to the store meanwhile
/// lands before, even on a loaded 2-core machine running the other tests), still running `ms`
/// milliseconds after it started.
fn slow_merge(g: &Garage, disk: &str, target: &Path, ms: u64) -> std::process::Child {
    let mut merge = g
        .qmprestore(&[
            "merge",
            "--format",
            "raw",
            "--rate-limit",
            "2M",
            "--dir",
            disk,
            "--targetfile",
            target.to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    assert!(
        merge.try_wait().unwrap().is_none(),
        "the merge ended too soon to test anything"
    );
    merge
}

/// One of three nodes (replication factor 3) killed during a merge: the merge completes and
/// is right.
#[test]
fn a_node_killed_during_a_merge_does_not_stop_it() {
    if needs_qemu().is_none() {
        return;
    }
    let Some(g) = Garage::start(3) else { return };
    let work = tempfile::tempdir().unwrap();
    let (disk, reference) = push_big_chain(&g, work.path(), "big");
    let target = work.path().join("merged.raw");
    let merge = slow_merge(&g, &disk, &target, 1500);
    g.kill_node(3);
    let o = merge.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    common::assert_same(&target, &reference);
}

/// An object replaced during a merge: a clear error and no output left.
#[test]
fn an_object_replaced_during_a_merge_fails_and_leaves_no_output() {
    if needs_qemu().is_none() || !have("rclone") {
        return;
    }
    let Some(g) = Garage::start(1) else { return };
    let work = tempfile::tempdir().unwrap();
    let (disk, _) = push_big_chain(&g, work.path(), "big");
    let target = work.path().join("out").join("merged.raw");
    let merge = slow_merge(&g, &disk, &target, 1000);
    // The FULL replaced by another file of the same size (an older backup, say).
    let other = work.path().join("other");
    let f = std::fs::File::create(&other).unwrap();
    f.set_len(
        std::fs::metadata(
            work.path()
                .join("big/disk.qcow2/FULL-1700000000-disk.qcow2"),
        )
        .unwrap()
        .len(),
    )
    .unwrap();
    succeeded(out(&mut g.rclone(&[
        "copyto",
        "--ignore-times",
        other.to_str().unwrap(),
        &g.remote("big/disk.qcow2/FULL-1700000000-disk.qcow2"),
    ])));
    let o = merge.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("replaced since it was opened"),
        "{}",
        text(&o)
    );
    assert!(
        !work.path().join("out").exists(),
        "the merge left output behind"
    );
}

/// A folder `t/disk.qcow2` in `work` with one 384 MiB backup file (24 parts) of random bytes,
/// and the arguments that push `t` to the store.
fn big_target(g: &Garage, work: &Path, seed: u64) -> (PathBuf, [&'static str; 5]) {
    let dd = work.join("t/disk.qcow2");
    std::fs::create_dir_all(&dd).unwrap();
    let big = dd.join("FULL-1700000000-disk.qcow2");
    let mut rng = common::Lcg(seed);
    let data: Vec<u8> = (0..(384 * MIB) / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    std::fs::write(&big, &data).unwrap();
    let args = [
        "push",
        "--target",
        work.join("t").to_str().unwrap().to_string().leak(),
        "--push",
        g.url("t").leak(),
    ];
    (big, args)
}

/// Starts `args` (a push of `big`) and SIGKILLs it once the store holds a part of the upload;
/// returns the parts held then, or `None` when the push finished first.
fn kill_push_with_parts(g: &Garage, args: &[&str], big: &Path) -> Option<resume::Held> {
    let journal = journal_of(big);
    let client = g.client();
    let mut push = g.qmpbackup(args).stdout(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    let mut held = None;
    while started.elapsed() < Duration::from_secs(60) && push.try_wait().unwrap().is_none() {
        held = Record::read(&journal)
            .and_then(|r| resume::held_parts(&client, &r.key, &r.upload_id).unwrap())
            .filter(|p| !p.is_empty());
        if held.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = push.try_wait().unwrap().is_none();
    push.kill().unwrap();
    push.wait().unwrap();
    if !killed {
        // Only a machine much faster than these uploads 384 MiB before a part is listed.
        common::skip("the push finished before it could be killed: resumption not tested");
        return None;
    }
    held
}

fn journal_of(file: &Path) -> PathBuf {
    file.with_file_name(format!(
        ".{}.upload",
        file.file_name().unwrap().to_str().unwrap()
    ))
}

/// A push killed with SIGKILL mid-upload: nothing half-written is visible, and the next push
/// completes it, sending only the parts the store does not hold yet.
#[test]
fn a_killed_push_is_completed_by_the_next() {
    let Some(g) = garage_with_rclone(1) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (big, args) = big_target(&g, work.path(), 5);
    let journal = journal_of(&big);
    let killed = kill_push_with_parts(&g, &args, &big).is_some();
    if killed {
        let listed = succeeded(out(&mut g.rclone(&["lsf", "-R", &g.remote("t")])));
        assert!(
            !listed.contains("FULL-1700000000"),
            "a half-pushed file is visible: {listed}"
        );
        assert!(journal.exists(), "the unfinished upload was not recorded");
    }
    let o = out(&mut g.qmpbackup(&args));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("1 files uploaded"), "{}", text(&o));
    if killed {
        let resumed = text(&o)
            .lines()
            .find_map(|l| {
                let l = l.split("Resuming the upload of ").nth(1)?;
                let n: u64 = l.split(": ").nth(1)?.split(' ').next()?.parse().ok()?;
                Some(n)
            })
            .unwrap_or_else(|| panic!("the upload was not resumed: {}", text(&o)));
        assert!(resumed >= 1, "no part was reused: {}", text(&o));
        eprintln!("resumed with {resumed} of 24 parts in the store");
    }
    assert!(!journal.exists(), "the journal outlived the upload");
    let o = out(&mut g.qmprestore(&[
        "compare",
        &g.url("t/disk.qcow2/FULL-1700000000-disk.qcow2"),
        big.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", text(&o));
    // And once more: nothing left to do.
    let o = out(&mut g.qmpbackup(&args));
    assert!(
        text(&o).contains("0 files uploaded, 1 already there"),
        "{}",
        text(&o)
    );
}

/// A resumed upload whose parts in the store no longer match the local file (changed with
/// its size and time kept): the store refuses the completion, and the push starts over
/// rather than archive a mix.
#[test]
fn a_resumed_upload_the_store_refuses_starts_over() {
    let Some(g) = Garage::start(1) else { return };
    let work = tempfile::tempdir().unwrap();
    let (big, args) = big_target(&g, work.path(), 6);
    let Some(held) = kill_push_with_parts(&g, &args, &big) else {
        return;
    };
    let part = *held.keys().min().unwrap() as u64;
    let f = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
    let mtime = f.metadata().unwrap().modified().unwrap();
    f.write_all_at(b"changed", (part - 1) * 16 * MIB + 4096)
        .unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    let o = out(&mut g.qmpbackup(&args));
    assert!(o.status.success(), "{}", text(&o));
    let log = text(&o);
    assert!(log.contains("Resuming the upload of"), "{log}");
    assert!(log.contains("starting the upload over"), "{log}");
    assert!(
        !journal_of(&big).exists(),
        "the journal outlived the upload"
    );
    let o = out(&mut g.qmprestore(&[
        "compare",
        &g.url("t/disk.qcow2/FULL-1700000000-disk.qcow2"),
        big.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", text(&o));
}

/// A chain of qemu-img-made backups with manifests, pushed to `prefix` as a target folder
/// (`<prefix>/disk.qcow2`); returns the chain and the disk folder's URL.
fn push_chain(g: &Garage, work: &Path, prefix: &str) -> (common::chains::Backups, String) {
    let b = common::chains::build(4, true, "", None);
    b.write_manifests();
    let local = work.join(prefix);
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("uuid"), "test-chain").unwrap();
    let disk = local.join("disk.qcow2");
    b.copy_to(&disk);
    std::fs::create_dir_all(disk.join(".manifest")).unwrap();
    for n in &b.names {
        let m = format!(".manifest/{n}.json");
        std::fs::copy(b.dir.join(&m), disk.join(&m)).unwrap();
    }
    let url = push_folder(g, &local, prefix);
    (b, format!("{url}/disk.qcow2"))
}

/// The keys below `url` (recursively), relative to it.
fn objects(g: &Garage, url: &str) -> Vec<String> {
    let rest = url.strip_prefix(&g.url("")).unwrap();
    let listing = succeeded(out(&mut g.rclone(&[
        "lsf",
        "-R",
        "--files-only",
        &g.remote(rest),
    ])));
    let mut v: Vec<String> = listing.lines().map(String::from).collect();
    v.sort();
    v
}

/// Asserts that the chain in `from` (a store's folder or a local one) restores at `until` to
/// `expected`.
fn assert_restores_from(g: &Garage, from: &str, until: &str, expected: &Path, work: &Path) {
    let t = work.join("point.qcow2");
    succeeded(out(&mut g.qmprestore(&[
        "merge",
        "--force",
        "--dir",
        from,
        "--until",
        until,
        "--targetfile",
        t.to_str().unwrap(),
    ])));
    common::assert_same(&t, expected);
}

/// After a prune of the store keeping the two newest points of `b`: the store lists exactly
/// them (the FULL renamed after the older), each restores from the store, verify passes, and
/// the objects of the points that went are gone with their manifests.
fn assert_store_pruned(g: &Garage, b: &common::chains::Backups, url: &str, work: &Path) {
    let epoch = |n: &str| -> u64 { n.split('-').nth(1).unwrap().parse().unwrap() };
    let full = format!("FULL-{}-disk.qcow2", epoch(&b.names[3]));
    let mut want = vec![
        full.clone(),
        b.names[4].clone(),
        format!(".manifest/{full}.json"),
        format!(".manifest/{}.json", b.names[4]),
    ];
    want.sort();
    assert_eq!(objects(g, url), want);
    for k in [3, 4] {
        let until = epoch(&b.names[k]).to_string();
        assert_restores_from(g, url, &until, &b.expected[k], work);
    }
    succeeded(out(&mut g.qmprestore(&["verify", "--dir", url])));
}

/// prune of a folder on the store: through a local copy, new files up first, deletions last;
/// a dry run leaves the store as it was; SIGKILL at random moments leaves every kept point
/// restorable from the store, and the next run completes the prune.
#[test]
fn prune_works_on_the_store_and_converges_after_a_kill() {
    let Some(g) = garage_with_rclone(1) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (b, url) = push_chain(&g, work.path(), "pr");
    let before = objects(&g, &url);
    let dry = out(&mut g.qmprestore(&["prune", "--dir", &url, "--keep-last", "2", "--dry-run"]));
    assert!(text(&dry).contains("would fold"), "{}", text(&dry));
    assert_eq!(objects(&g, &url), before, "a dry run changed the store");
    let start = Instant::now();
    let report = succeeded(out(&mut g.qmprestore(&[
        "prune",
        "--dir",
        &url,
        "--keep-last",
        "2",
    ])));
    let full_run = start.elapsed().as_micros() as u64;
    assert!(report.contains(&url), "{report}");
    assert_store_pruned(&g, &b, &url, work.path());

    let mut rng = common::Lcg(7);
    for k in 0..6 {
        let prefix = format!("kill{k}");
        let (b, url) = push_chain(&g, work.path(), &prefix);
        let mut child = g
            .qmprestore(&["prune", "--dir", &url, "--keep-last", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(full_run)));
        let _ = child.kill();
        let status = child.wait().unwrap();
        eprintln!("prune on the store, SIGKILL {k}: {status}");
        for point in [3, 4] {
            let epoch = b.names[point].split('-').nth(1).unwrap();
            assert_restores_from(&g, &url, epoch, &b.expected[point], work.path());
        }
        succeeded(out(&mut g.qmprestore(&[
            "prune",
            "--dir",
            &url,
            "--keep-last",
            "2",
        ])));
        assert_store_pruned(&g, &b, &url, work.path());
    }
}

/// `qmpbackup backup --push URL --prune RULES` on a real QEMU: the local target and the store
/// both end with the kept points only (the FULL renamed after the older one), and both restore
/// them.
#[test]
fn backup_with_push_and_prune_prunes_the_store_too() {
    let Some(t) = needs_qemu() else { return };
    let Some(g) = garage_with_rclone(1) else {
        return;
    };
    let dir = t.path();
    let mut vm = one_disk_vm(dir);
    let target = dir.join("b");
    let url = g.url("vm2");
    let socket = vm.socket();
    let mut expected = Vec::new();
    for (k, level) in ["full", "inc", "inc", "inc"].iter().enumerate() {
        write_random(&mut vm, dir, k as u64 * 10, 3, k as u64 + 1);
        let mut args = vec![
            "--socket",
            &socket,
            "backup",
            "-l",
            level,
            "-t",
            target.to_str().unwrap(),
            "--push",
            &url,
        ];
        if k == 3 {
            args.extend(["--prune", "keep-last=2"]);
        }
        let o = out(&mut g.qmpbackup(&args));
        assert!(o.status.success(), "{}", text(&o));
        let raw = dir.join(format!("expected{k}.raw"));
        vm.capture(VD0, "d0.qcow2", "qcow2", &raw);
        expected.push(raw);
    }
    vm.quit();
    let disk_url = format!("{url}/d0.qcow2");
    let dd = target.join("d0.qcow2");
    let local: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(&dd)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        v
    };
    assert_eq!(local.len(), 2, "{local:?}");
    let mut want: Vec<String> = local
        .iter()
        .flat_map(|n| [n.clone(), format!(".manifest/{n}.json")])
        .collect();
    want.sort();
    assert_eq!(objects(&g, &disk_url), want);
    for (k, point) in [(2, &local[0]), (3, &local[1])] {
        for from in [disk_url.as_str(), dd.to_str().unwrap()] {
            assert_restores_from(&g, from, point, &expected[k], dir);
        }
    }
    succeeded(out(&mut g.qmprestore(&["verify", "--dir", &disk_url])));
}
