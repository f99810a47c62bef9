//! Helpers shared by the integration tests: fixture paths, reference tools, renderings.
#![allow(dead_code)] // each test binary uses its own subset

use qmpbackup::qcow2::{Disk, Extent};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/fixtures")
}

pub fn sample_chain() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/sample-chain")
}

/// A copy of the bundled sample chain (its target folder: `disk.qcow2/`, `uuid`, sums) at
/// `dest`, for a test that changes or uploads it.
pub fn copy_sample_chain(dest: &Path) {
    run(Command::new("cp").arg("-r").arg(sample_chain()).arg(dest));
}

/// Whether a reference tool is installed; when it is not, the test [`skip`]s (a failure in
/// CI).
pub fn have(tool: &str) -> bool {
    have_answering(tool, "--version")
}

/// [`have`] for a tool that tells its version to another argument (`openssl version`).
pub fn have_answering(tool: &str, version_arg: &str) -> bool {
    let ok = Command::new(tool)
        .arg(version_arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        skip(&format!("{tool} is not installed"));
    }
    ok
}

/// The file `scripts/test` names in this variable gets a line `SKIPPED: <binary>::<test>:
/// <reason>` for every skip, so its summary counts skipped tests apart from passed ones.
pub const SKIP_LOG: &str = "QMPBACKUP_SKIP_LOG";

/// The one way a test says that its real component (a reference tool, a store, a loop
/// device, ...) is missing and what it checks did not run (all of it: the caller returns
/// early; or a part, which then says so in `reason`). Locally a loud message, and a line in
/// the file [`SKIP_LOG`] names; with `CI=true` a failure, because there every component is
/// installed and must be used.
pub fn skip(reason: &str) {
    let test = current_test();
    let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {reason}: CI=true requires it, so this is a failure, not a skip");
    }
    eprintln!("\n!!! SKIPPED: {test}: {reason} !!!\n");
    if let Some(log) = std::env::var_os(SKIP_LOG) {
        use std::io::Write;
        // One write of one line to a file opened for appending: lines of tests running at
        // once (threads or processes) never interleave.
        let line = format!("SKIPPED: {test}: {reason}\n");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .unwrap_or_else(|e| panic!("{SKIP_LOG}={}: {e}", Path::new(&log).display()));
    }
}

/// `<test binary>::<test>`: libtest runs each test on a thread named after it.
fn current_test() -> String {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("<unnamed thread>");
    format!("{}::{name}", env!("CARGO_CRATE_NAME"))
}

/// A temporary folder for a test that needs `tool`; `None` (after the [`skip`]) when it is
/// missing.
pub fn needs(tool: &str) -> Option<tempfile::TempDir> {
    have(tool).then(|| tempfile::tempdir().unwrap())
}

/// [`needs`] for the tests that run QEMU itself (and qemu-img).
pub fn needs_qemu() -> Option<tempfile::TempDir> {
    needs("qemu-system-x86_64").filter(|_| have("qemu-img"))
}

/// `cmd` with every inherited AWS_* variable removed (these machines carry some, such as
/// AWS_CA_BUNDLE, that change what S3 clients do), `vars` set and HOME at `home` (no
/// `~/.aws` files but the test's own).
pub fn aws_env<'a>(cmd: &'a mut Command, home: &Path, vars: &[(&str, &str)]) -> &'a mut Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("HOME", home);
    cmd.envs(vars.iter().copied())
}

/// `qmprestore <args>`, whatever its outcome.
pub fn qmprestore(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .args(args)
        .output()
        .unwrap()
}

/// `qmprestore <args>`, which must succeed; returns its standard output.
pub fn qmprestore_ok(args: &[&str]) -> String {
    run(Command::new(env!("CARGO_BIN_EXE_qmprestore")).args(args))
}

/// The JSON document a command printed on standard output.
pub fn json_of(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

/// Runs `bin args` under umask 022, the usual one, so the modes it creates are its own doing.
pub fn with_umask_022(bin: &str, args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg("umask 022; exec \"$0\" \"$@\"")
        .arg(bin)
        .args(args)
        .output()
        .unwrap()
}

/// The permission bits of `p` (not of what a symbolic link points at).
pub fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Runs a command, panicking with its output if it fails; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    expect_success(&format!("{cmd:?} failed: "), out)
}

/// The output of a command that must have succeeded (its stdout), or a panic showing why not.
pub fn succeeded(o: Output) -> String {
    expect_success("", o)
}

fn expect_success(what: &str, o: Output) -> String {
    assert!(
        o.status.success(),
        "{what}{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The guest-visible bytes of `image` (in `dir`), or of one of its snapshots, as
/// `qemu-img convert -O raw` renders them.
pub fn render(dir: &Path, image: &str, snapshot: Option<&str>) -> Vec<u8> {
    let out = dir.join(format!("{image}.render.raw"));
    let out_s = out.display().to_string();
    let snap = snapshot.map(|s| format!("snapshot.name={s}"));
    let mut args = vec!["convert", "-O", "raw"];
    if let Some(s) = &snap {
        args.extend(["-l", s.as_str()]);
    }
    args.extend([image, out_s.as_str()]);
    qemu_img(dir, &args);
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    v
}

pub fn sha256_bytes(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `qemu-img` with arguments, run in `dir`.
pub fn qemu_img(dir: &Path, args: &[&str]) -> String {
    run(Command::new("qemu-img").current_dir(dir).args(args))
}

/// `qemu-img create -q <spec>` in `dir`, the spec's words split at spaces (`-f qcow2 -o
/// cluster_size=512 t.qcow2 1M`).
pub fn qemu_img_create(dir: &Path, spec: &str) {
    let mut args = vec!["create", "-q"];
    args.extend(spec.split_whitespace());
    qemu_img(dir, &args);
}

/// Runs qemu-io commands on a qcow2 image (in `dir`).
pub fn qemu_io<S: AsRef<str> + std::fmt::Debug>(dir: &Path, image: &str, cmds: &[S]) {
    let mut c = Command::new("qemu-io");
    c.current_dir(dir).args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd.as_ref()]);
    }
    c.arg(image);
    let out = run(&mut c);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {cmds:?} on {image}: {out}"
    );
}

/// `qemu-img check --output=json` on `image`, run in its directory (QEMU resolves relative
/// data file names against the cwd): (exit code, corruptions, leaks).
pub fn qemu_check(image: &Path) -> (i32, u64, u64) {
    let out = Command::new("qemu-img")
        .current_dir(image.parent().unwrap())
        .args(["check", "--output=json"])
        .arg(image.file_name().unwrap())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let count = |k: &str| v[k].as_u64().unwrap_or(0);
    (
        out.status.code().unwrap_or(-1),
        count("corruptions"),
        count("leaks"),
    )
}

/// qemu-img finds nothing at all wrong with `image`.
pub fn assert_check_clean(image: &Path) {
    assert_eq!(
        qemu_check(image),
        (0, 0, 0),
        "qemu-img check {}",
        image.display()
    );
}

/// After a crash: leaked clusters are allowed, corruption is not.
pub fn assert_no_corruption(image: &Path) {
    let (code, corruptions, _) = qemu_check(image);
    assert!(
        (code == 0 || code == 3) && corruptions == 0,
        "qemu-img check {}: exit {code}, {corruptions} corruptions",
        image.display()
    );
}

/// SHA-256 of the guest-visible contents, read through our engine in 1 MiB steps.
pub fn sha256_of(disk: &Disk) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < disk.size() {
        let n = (disk.size() - off).min(buf.len() as u64) as usize;
        disk.read_at(&mut buf[..n], off).unwrap();
        h.update(&buf[..n]);
        off += n as u64;
    }
    hex(&h.finalize())
}

pub fn sha256_file(path: &Path) -> String {
    sha256_bytes(&std::fs::read(path).unwrap())
}

/// Our map of the whole disk, as qemu-img's JSON would parse.
pub fn our_map(disk: &Disk) -> serde_json::Value {
    let mut v: Vec<Extent> = Vec::new();
    disk.for_each_extent(0, disk.size(), |e| {
        v.push(e);
        Ok(())
    })
    .unwrap();
    serde_json::to_value(v).unwrap()
}

/// Asserts that our engine reads `image` exactly as `qemu-img convert -O raw` renders it, in
/// chunks so a mismatch names the first differing offset.
pub fn assert_reads_like_qemu(dir: &Path, image: &str, extra: &[&str]) {
    let raw = format!("{image}.expected.raw");
    let mut args = vec!["convert", "-O", "raw"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[image, &raw]);
    qemu_img(dir, &args);
    let expected = std::fs::read(dir.join(&raw)).unwrap();
    let mut disk = Disk::open(&dir.join(image)).unwrap();
    if let Some(snap) = extra.iter().find_map(|a| a.strip_prefix("snapshot.name=")) {
        disk.select_snapshot(snap).unwrap();
    }
    assert_eq!(disk.size(), expected.len() as u64, "{image}: size");
    let mut buf = vec![0u8; 1 << 20];
    for (i, want) in expected.chunks(buf.len()).enumerate() {
        let got = &mut buf[..want.len()];
        disk.read_at(got, (i * (1 << 20)) as u64).unwrap();
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!("{image}: contents differ at offset {}", i * (1 << 20) + at);
        }
    }
    std::fs::remove_file(dir.join(&raw)).unwrap();
}

/// Asserts that our map equals `qemu-img map --output=json`.
pub fn assert_maps_like_qemu(dir: &Path, image: &str) {
    let expected: serde_json::Value =
        serde_json::from_str(&qemu_img(dir, &["map", "--output=json", image])).unwrap();
    let disk = Disk::open(&dir.join(image)).unwrap();
    assert_eq!(
        our_map(&disk),
        expected,
        "{image}: map differs from qemu-img's"
    );
}

/// A small deterministic generator for test scenarios.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
pub mod backup_vm;
pub mod chains;
pub mod crashes;
pub mod fake_s3;
pub mod garage;
pub mod nbd;
pub mod qemu;

/// Runs `qemu-img compare` (with -U: the images may be in use) and asserts they are identical.
pub fn assert_same(a: &Path, b: &Path) {
    let o = Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{} vs {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The names in `dir`'s `.manifest/` (qmpbackup's per-file manifests), sorted.
pub fn manifest_names(dir: &Path) -> Vec<String> {
    let mut m: Vec<String> = std::fs::read_dir(dir.join(".manifest"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    m.sort();
    m
}

/// Asserts that `qmprestore verify` finds the chain in `dir` restorable.
pub fn assert_verifies(dir: &Path) {
    let o = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .args(["verify", "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}
