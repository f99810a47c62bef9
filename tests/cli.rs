//! The qmprestore binary: outputs, exit codes and files, on the committed fixtures.

mod common;

use common::*;
use serde_json::Value;
use std::process::{Command, Output};

fn fixture(name: &str) -> String {
    fixtures().join(name).display().to_string()
}

/// `qmprestore convert -O raw SRC DST`, which must succeed.
fn to_raw(src: &str, dst: &std::path::Path) {
    stdout(&qmprestore(&[
        "convert",
        "-O",
        "raw",
        src,
        dst.to_str().unwrap(),
    ]));
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn convert_renders_fixtures_and_snapshots() {
    let d = tempfile::tempdir().unwrap();
    let sums = std::fs::read_to_string(fixtures().join("SHA256SUMS")).unwrap();
    for line in sums.lines() {
        let (sum, name) = line.split_once(' ').unwrap();
        let (file, snap) = match name.split_once('@') {
            Some((f, s)) => (f, Some(s)),
            None => (name, None),
        };
        let out = d.path().join("out.raw");
        let out_s = out.display().to_string();
        let src = fixture(file);
        let mut args = vec!["convert", "-O", "raw"];
        if let Some(s) = snap {
            args.extend(["-l", s]);
        }
        args.extend([src.as_str(), out_s.as_str()]);
        stdout(&qmprestore(&args));
        assert_eq!(sha256_file(&out), sum, "{name}");
    }
}

#[test]
fn convert_leaves_holes_for_zero_ranges() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("top.raw");
    to_raw(&fixture("snap.qcow2"), &out);
    let m = std::fs::metadata(&out).unwrap();
    // 2 MiB disk, about 400 KiB of data.
    assert_eq!(m.len(), 2 << 20);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "{} bytes allocated",
        m.blocks() * 512
    );
}

#[test]
fn convert_refuses_to_overwrite_its_own_source() {
    let d = tempfile::tempdir().unwrap();
    for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        std::fs::copy(fixtures().join(f), d.path().join(f)).unwrap();
    }
    let base = d.path().join("base.qcow2");
    let before = sha256_file(&base);
    let o = qmprestore(&[
        "convert",
        "-O",
        "raw",
        d.path().join("top.qcow2").to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to overwrite"));
    assert_eq!(sha256_file(&base), before);
}

#[test]
fn compare_exit_codes() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("v3.raw");
    to_raw(&fixture("v3.qcow2"), &raw);
    let o = qmprestore(&["compare", &fixture("v3.qcow2"), raw.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "Images are identical.\n"
    );
    // Change one byte in the middle: exit 1 and the exact offset.
    let mut bytes = std::fs::read(&raw).unwrap();
    bytes[1_234_567] ^= 1;
    std::fs::write(&raw, &bytes).unwrap();
    let o = qmprestore(&["compare", &fixture("v3.qcow2"), raw.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "Content mismatch at offset 1234567!\n"
    );
    // A longer image whose excess is zero compares identical; a missing one is an error.
    let longer = d.path().join("longer.raw");
    let mut b = std::fs::read(&raw).unwrap();
    b[1_234_567] ^= 1;
    b.resize(b.len() + 65536, 0);
    std::fs::write(&longer, &b).unwrap();
    let o = qmprestore(&["compare", &fixture("v3.qcow2"), longer.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("size mismatch"));
    let o = qmprestore(&["compare", &fixture("v3.qcow2"), "/nonexistent.qcow2"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent.qcow2"));
}

#[test]
fn info_json_and_backing_chain() {
    let v: Value = serde_json::from_str(&stdout(&qmprestore(&[
        "info",
        "--output",
        "json",
        &fixture("zstd.qcow2"),
    ])))
    .unwrap();
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["virtual-size"], 4 << 20);
    assert_eq!(v["format-specific"]["data"]["compression-type"], "zstd");
    let chain: Value = serde_json::from_str(&stdout(&qmprestore(&[
        "info",
        "--backing-chain",
        "--output",
        "json",
        &fixture("top.qcow2"),
    ])))
    .unwrap();
    let names: Vec<&str> = chain
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["backing-filename"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(names, ["mid.qcow2", "base.qcow2", "-"]);
    let human = stdout(&qmprestore(&["info", &fixture("snap.qcow2")]));
    for needle in [
        "file format: qcow2",
        "virtual size: 2 MiB (2097152 bytes)",
        "cluster_size: 16384",
        "Snapshot list:",
        "second",
        "compat: 1.1",
    ] {
        assert!(human.contains(needle), "{needle} missing in:\n{human}");
    }
}

/// The warning is plain text where stderr is no terminal, coloured on one, and plain again
/// with NO_COLOR.
#[test]
fn corrupt_images_read_with_a_warning() {
    let o = qmprestore(&["info", &fixture("corrupt.qcow2")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("marked corrupt") && !err.contains('\u{1b}'),
        "{err:?}"
    );
    assert!(stdout(&o).contains("corrupt: true"));
    let cmd = format!(
        "{} info {} >/dev/null",
        env!("CARGO_BIN_EXE_qmprestore"),
        fixture("corrupt.qcow2")
    );
    let tty = on_a_terminal(&cmd);
    assert!(
        tty.contains("marked corrupt") && tty.contains('\u{1b}'),
        "{tty:?}"
    );
    let plain = on_a_terminal(&format!("NO_COLOR=1 {cmd}"));
    assert!(
        plain.contains("marked corrupt") && !plain.contains('\u{1b}'),
        "{plain:?}"
    );
}

#[test]
fn map_outputs() {
    let json = stdout(&qmprestore(&[
        "map",
        "--output",
        "json",
        &fixture("top.qcow2"),
    ]));
    let recorded = std::fs::read_to_string(fixtures().join("top.qcow2.map.json")).unwrap();
    assert_eq!(
        json, recorded,
        "byte-identical to qemu-img map --output=json"
    );
    let human = stdout(&qmprestore(&["map", &fixture("v2.qcow2")]));
    let first = human.lines().nth(1).unwrap();
    assert!(
        first.starts_with("0               0x40000         0x"),
        "{human}"
    );
    assert!(first.ends_with("v2.qcow2"));
}

#[test]
fn help_has_examples_and_exit_codes() {
    let top = stdout(&qmprestore(&["--help"]));
    assert!(top.contains("Exit codes"));
    for cmd in ["info", "map", "convert", "compare"] {
        let h = stdout(&qmprestore(&[cmd, "--help"]));
        assert!(h.contains("Example"), "{cmd} --help has no example");
    }
}

/// `cmd` (a shell command line) run under a pseudo-terminal by util-linux `script`: what the
/// terminal showed.
fn on_a_terminal(cmd: &str) -> String {
    let o = Command::new("script")
        .args(["-qec", cmd, "/dev/null"])
        .output()
        .expect("script (util-linux) runs commands on a pseudo-terminal");
    assert!(o.status.success(), "{cmd}: {o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A copy of the bundled sample chain in a new temporary directory.
fn sample_copy() -> (tempfile::TempDir, String) {
    let t = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(sample_chain().join("disk.qcow2")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, t.path().join(p.file_name().unwrap())).unwrap();
    }
    let d = t.path().display().to_string();
    (t, d)
}

#[test]
fn progress_bars_show_on_a_terminal_only() {
    let bin = env!("CARGO_BIN_EXE_qmprestore");
    let (_t, d) = sample_copy();
    let o = tempfile::tempdir().unwrap();
    let out = o.path().join("m.qcow2").display().to_string();
    let shown = on_a_terminal(&format!("{bin} merge -p --dir {d} --targetfile {out}"));
    assert!(
        shown.contains("convert [") && shown.contains("MiB"),
        "{shown:?}"
    );
    let shown = on_a_terminal(&format!("{bin} commit -p --dir {d}"));
    assert!(
        shown.contains("commit [") && shown.contains("folded"),
        "{shown:?}"
    );
    let (_t, d) = sample_copy();
    let shown = on_a_terminal(&format!("{bin} snapshotrebase -p --dir {d}"));
    assert!(shown.contains("snapshotrebase ["), "{shown:?}");
    // Piped: no bar, even when asked for. Nor a warning that the FULL, which commit itself
    // holds the write lock on while relinking the INCs, is in use by a running QEMU.
    let (_t, d) = sample_copy();
    let o = qmprestore(&["commit", "-p", "--dir", &d]);
    stdout(&o);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(!log.contains('[') && !log.contains("running QEMU"), "{log}");
}

/// merge and convert create the target's missing folders (durably, private under any umask),
/// like the original's merge; outputs are 0600 (0640 with --group-readable); an existing
/// folder keeps its mode; a convert that fails takes the folders it made away again.
#[test]
fn outputs_get_their_folders_and_stay_private() {
    let d = tempfile::tempdir().unwrap();
    let sample =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/sample-chain/disk.qcow2");
    let bin = env!("CARGO_BIN_EXE_qmprestore");
    let src = sample.to_str().unwrap();
    let target = d.path().join("restore/sub/disk.qcow2");
    let t = target.to_str().unwrap();
    stdout(&with_umask_022(
        bin,
        &["merge", "--dir", src, "--targetfile", t],
    ));
    let newest = sample.join("INC-1700001200-disk.qcow2");
    stdout(&qmprestore(&["compare", t, newest.to_str().unwrap()]));
    assert_eq!(mode(&target), 0o600);
    assert_eq!(mode(&d.path().join("restore")), 0o700);
    assert_eq!(mode(&d.path().join("restore/sub")), 0o700);

    let raw = d.path().join("raw/disk.raw");
    let r = raw.to_str().unwrap();
    let shared = ["--group-readable", "merge", "--format", "raw"];
    let args = [&shared[..], &["--dir", src, "--targetfile", r]].concat();
    stdout(&with_umask_022(bin, &args));
    assert_eq!((mode(&raw), mode(&d.path().join("raw"))), (0o640, 0o750));

    std::fs::create_dir(d.path().join("open")).unwrap();
    std::fs::set_permissions(
        d.path().join("open"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for (fmt, name) in [("qcow2", "c.qcow2"), ("raw", "c.raw")] {
        let out = d.path().join("open/new").join(name);
        let (from, to) = (newest.to_str().unwrap(), out.to_str().unwrap());
        stdout(&with_umask_022(bin, &["convert", "-O", fmt, from, to]));
        assert_eq!(
            (mode(&out), mode(&d.path().join("open/new"))),
            (0o600, 0o700)
        );
    }
    assert_eq!(
        mode(&d.path().join("open")),
        0o755,
        "an existing folder keeps its mode"
    );

    // A source that fails halfway (a data cluster past its end): no output, no new folder.
    let bad = d.path().join("bad.qcow2");
    let mut bytes = std::fs::read(fixtures().join("v3.qcow2")).unwrap();
    let h = qmpbackup::qcow2::header::Header::parse(&bytes).unwrap();
    let l2 = u64::from_be_bytes(bytes[h.l1_table_offset as usize..][..8].try_into().unwrap())
        & ((1 << 56) - 512);
    bytes[l2 as usize..][..8].copy_from_slice(&((1u64 << 63) | 0x7fff_0000).to_be_bytes());
    std::fs::write(&bad, bytes).unwrap();
    for fmt in ["raw", "qcow2"] {
        let out = d.path().join("failed/deeper/out.img");
        let o = qmprestore(&[
            "convert",
            "-O",
            fmt,
            bad.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!d.path().join("failed").exists(), "{fmt}");
    }
}

/// Shell completions and manual pages of both binaries, generated from their options.
#[test]
fn completions_and_manual_pages() {
    for bin in [
        env!("CARGO_BIN_EXE_qmprestore"),
        env!("CARGO_BIN_EXE_qmpbackup"),
    ] {
        let name = std::path::Path::new(bin)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap();
        let o = Command::new(bin)
            .args(["completions", "bash"])
            .output()
            .unwrap();
        let bash = stdout(&o);
        assert!(bash.contains(&format!("_{name}()")), "{bash}");
        let sub = if name == "qmprestore" {
            "merge"
        } else {
            "backup"
        };
        assert!(
            bash.contains(sub) && bash.contains("--group-readable"),
            "{bash}"
        );
        for shell in ["zsh", "fish"] {
            let o = Command::new(bin)
                .args(["completions", shell])
                .output()
                .unwrap();
            assert!(stdout(&o).contains(sub), "{shell}");
        }
        let man = stdout(&Command::new(bin).arg("man").output().unwrap());
        assert!(
            man.contains(&format!(".TH {name} 1")) && man.contains(sub),
            "{man}"
        );
        // Every page the main page names in SUBCOMMANDS exists, with that command's options.
        let t = tempfile::tempdir().unwrap();
        let o = Command::new(bin)
            .args(["man", "--dir"])
            .arg(t.path())
            .output()
            .unwrap();
        let listed = stdout(&o);
        let main_page = std::fs::read_to_string(t.path().join(format!("{name}.1"))).unwrap();
        assert_eq!(main_page, man);
        let named: Vec<&str> = main_page
            .split(&format!("{name}\\-"))
            .skip(1)
            .filter_map(|rest| rest.split_once("(1)").map(|(s, _)| s))
            .collect();
        assert!(named.contains(&sub), "{named:?}");
        for s in &named {
            let page = t.path().join(format!("{name}-{s}.1"));
            assert!(listed.contains(page.to_str().unwrap()), "{listed}");
            let text = std::fs::read_to_string(&page).unwrap();
            assert!(text.contains(&format!(".TH {name}-{s} 1")), "{text}");
        }
        let sub_page = std::fs::read_to_string(t.path().join(format!("{name}-{sub}.1"))).unwrap();
        let option = if sub == "merge" {
            "targetfile"
        } else {
            "level"
        };
        assert!(sub_page.contains(option), "{sub_page}");
    }
}

/// The version lives in Cargo.toml only: `--version` of both programs says it, with the commit
/// the binary was built from when the source is a git checkout, and CHANGELOG.md's newest
/// release is that version.
#[test]
fn one_version_everywhere() {
    let version = env!("CARGO_PKG_VERSION");
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| stdout(&o).trim().to_string());
    let expected = match &commit {
        Some(c) => format!("{version} (commit {c})"),
        None => version.to_string(),
    };
    for (name, bin) in [
        ("qmprestore", env!("CARGO_BIN_EXE_qmprestore")),
        ("qmpbackup", env!("CARGO_BIN_EXE_qmpbackup")),
    ] {
        let o = Command::new(bin).arg("--version").output().unwrap();
        assert_eq!(stdout(&o), format!("{name} {expected}\n"));
    }
    let read = |path: &str| {
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
            .unwrap()
    };
    let newest = read("CHANGELOG.md")
        .lines()
        .find_map(|l| l.strip_prefix("## "))
        .map(String::from);
    assert_eq!(
        newest.as_deref(),
        Some(version),
        "CHANGELOG.md's newest release"
    );
    // Examples that name an artifact (the package's file name, the image's tag) name this one.
    for doc in ["README.md", "deploy/kubernetes/qmprestore-job.yaml"] {
        let text = read(doc);
        for artifact in ["qmpbackup_", "qmprestore:"] {
            for (at, _) in text.match_indices(artifact) {
                let named: String = text[at + artifact.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.')
                    .collect();
                let named = named.trim_end_matches('.');
                assert!(
                    named.is_empty() || named == version,
                    "{doc} names {artifact}{named}, not version {version}"
                );
            }
        }
    }
}
