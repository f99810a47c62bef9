//! An object store's answers are untrusted input: a store that pages its listing without end,
//! answers a range request with other bytes than asked, cuts bodies short, redirects, or
//! serves garbage makes a command fail with a message naming the object and the problem —
//! never hang, never allocate without bound, never write a restore from the wrong bytes —
//! and leaves no output behind. The store is `common::fake_s3` on loopback, serving the
//! bundled sample chain honestly except where a test's hook says otherwise.

mod common;

use common::fake_s3::{FakeS3, FakeS3Files, Reply, Req};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const DISK: &str = "s3://bkt/vm/disk.qcow2";

struct Case {
    _tmp: tempfile::TempDir,
    store: FakeS3,
    out: PathBuf,
}

/// The sample chain in bucket `bkt` below `vm/`, served with `hook`.
fn case(hook: impl Fn(&Req, &FakeS3Files) -> Option<Reply> + Send + Sync + 'static) -> Case {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("root/bkt")).unwrap();
    common::copy_sample_chain(&tmp.path().join("root/bkt/vm"));
    let store = FakeS3::start(&tmp.path().join("root"), Box::new(hook));
    let out = tmp.path().join("restored.raw");
    Case {
        _tmp: tmp,
        store,
        out,
    }
}

impl Case {
    /// `qmprestore args`, killed (and the test failed) if it runs for a minute.
    fn qmprestore(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qmprestore"));
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        self.store.with_env(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("qmprestore {args:?} hung on a hostile store");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

    fn merge(&self) -> Output {
        self.qmprestore(&[
            "merge",
            "--dir",
            DISK,
            "--format",
            "raw",
            "--targetfile",
            self.out.to_str().unwrap(),
        ])
    }

    /// The command failed with exit 1, saying `words`, and left no output.
    fn refused(&self, o: &Output, words: &str) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(words), "wanted {words:?} in: {err}");
        assert!(!self.out.exists(), "output left behind: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// The raw disk the local sample chain restores to.
fn local_restore(dir: &Path) -> Vec<u8> {
    let out = dir.join("local.raw");
    common::succeeded(
        Command::new(env!("CARGO_BIN_EXE_qmprestore"))
            .args(["merge", "--dir"])
            .arg(common::sample_chain().join("disk.qcow2"))
            .args(["--format", "raw", "--targetfile"])
            .arg(&out)
            .output()
            .unwrap(),
    );
    std::fs::read(out).unwrap()
}

fn is_full(req: &Req) -> bool {
    req.key.contains("FULL-")
}

/// A ranged read of the FULL backup.
fn read_of_full(req: &Req) -> bool {
    req.range.is_some() && is_full(req)
}

/// The store itself is faithful: an honest answer restores what the local chain restores,
/// and so does one whose first answer to every range is cut short (a retry reads it again).
#[test]
fn an_honest_store_and_a_flaky_one_restore_the_chain() {
    let c = case(|_, _| None);
    common::succeeded(c.merge());
    let want = local_restore(c._tmp.path());
    assert!(std::fs::read(&c.out).unwrap() == want);

    let cut = std::sync::Mutex::new(std::collections::HashSet::new());
    let c = case(move |req, files| {
        let range = req.range?;
        if !cut.lock().unwrap().insert((req.key.clone(), range)) {
            return None;
        }
        let r = files.honest(req);
        let half = r.body.len() / 2;
        Some(r.cut_short(half))
    });
    common::succeeded(c.merge());
    assert!(std::fs::read(&c.out).unwrap() == want);
}

#[test]
fn a_listing_that_repeats_its_continuation_token_fails() {
    let c = case(|req, _| {
        req.key
            .is_empty()
            .then(|| FakeS3Files::listing(&[], &[], Some("again")))
    });
    c.refused(&c.merge(), "repeats its continuation token");
}

#[test]
fn a_listing_that_never_ends_fails_within_bounds() {
    // Pages of 1000 objects, each promising another page: stopped at the listing bound.
    let c = case(|req, _| {
        if !req.key.is_empty() {
            return None;
        }
        let page = req.seq;
        let objects: Vec<(String, u64, String)> = (0..1000)
            .map(|k| (format!("vm/disk.qcow2/x{page}-{k}"), 1, "\"e\"".to_string()))
            .collect();
        Some(FakeS3Files::listing(
            &objects,
            &[],
            Some(&format!("t{page}")),
        ))
    });
    c.refused(&c.merge(), "past 1000000 entries");
    // Empty pages that promise more are not followed for ever either.
    let c = case(|req, _| {
        req.key
            .is_empty()
            .then(|| FakeS3Files::listing(&[], &[], Some(&format!("t{}", req.seq))))
    });
    c.refused(&c.merge(), "were empty and promised more");
}

#[test]
fn a_listing_that_is_not_a_listing_fails() {
    let c = case(|req, _| {
        req.key
            .is_empty()
            .then(|| Reply::new(200, "<html>captive portal</html>"))
    });
    c.refused(&c.merge(), "not an object listing: \"<html>captive portal");
}

#[test]
fn a_range_answered_with_other_bytes_fails() {
    // The whole object for a range that does not start it.
    let c = case(|req, files| {
        let (a, _) = req.range?;
        (a > 0).then(|| {
            let mut r = files.honest(req);
            r.status = 200;
            r.headers.retain(|(k, _)| k != "Content-Range");
            r
        })
    });
    c.refused(&c.merge(), "HTTP 200 to a range request");
    // A range shifted by one byte.
    let c = case(|req, files| {
        let (a, b) = req.range?;
        let mut shifted = req.clone();
        shifted.range = Some((a + 1, b + 1));
        Some(files.honest(&shifted))
    });
    c.refused(&c.merge(), "Content-Range");
    // A redirect's page where the first bytes of an object should be.
    let c = case(|req, _| {
        req.range
            .map(|_| Reply::new(301, vec![b'Q'; 1 << 20]).header("Location", "http://127.0.0.1:1/"))
    });
    c.refused(&c.merge(), "HTTP 301 to a range request");
}

#[test]
fn bodies_cut_short_every_time_fail_after_the_retries() {
    let c = case(|req, files| read_of_full(req).then(|| files.honest(req).cut_short(10)));
    c.refused(&c.merge(), "FULL-1700000000-disk.qcow2");
}

#[test]
fn an_object_of_garbage_or_of_a_size_it_does_not_have_fails() {
    let c = case(|req, files| {
        read_of_full(req).then(|| {
            // The qcow2 magic and version stay (or it would read as a raw image), the rest
            // is noise.
            let mut r = files.honest(req);
            let keep = 8u64.saturating_sub(req.range.unwrap().0) as usize;
            r.body
                .iter_mut()
                .skip(keep)
                .enumerate()
                .for_each(|(i, b)| *b = (i * 7) as u8);
            r
        })
    });
    c.refused(
        &c.merge(),
        "s3://bkt/vm/disk.qcow2/FULL-1700000000-disk.qcow2",
    );
    // The listing claims an exabyte-sized FULL: reads past its real end are refused by the
    // store, and nothing sized by the claim is allocated.
    let c = case(|req, files| {
        if req.method == "HEAD" && is_full(req) {
            return Some(
                files
                    .honest(req)
                    .header("Content-Length", (1u64 << 60).to_string()),
            );
        }
        if !req.key.is_empty() {
            return None;
        }
        let mut objects = files.objects(&req.bucket, &req.query["prefix"]);
        objects
            .iter_mut()
            .filter(|o| o.0.contains("FULL-"))
            .for_each(|o| o.1 = 1 << 60);
        Some(FakeS3Files::listing(&objects, &[], None))
    });
    let o = c.merge();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("FULL-1700000000-disk.qcow2"), "{err}");
    assert!(!c.out.exists());
    for args in [
        &["check", "s3://bkt/vm/disk.qcow2/FULL-1700000000-disk.qcow2"][..],
        &["verify", "--dir", DISK][..],
    ] {
        let o = c.qmprestore(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

/// A store that answers 200 to every upload and keeps nothing: the push fails naming the
/// object, and the backup folder is left exactly as it was.
#[test]
fn a_store_that_loses_what_it_accepted_fails_the_push_and_keeps_the_files() {
    let c =
        case(|req, _| (req.method == "PUT").then(|| Reply::new(200, "").header("ETag", "\"x\"")));
    let target = c._tmp.path().join("target");
    common::copy_sample_chain(&target);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qmpbackup"));
    cmd.args([
        "push",
        "--target",
        target.to_str().unwrap(),
        "--push",
        "s3://bkt/pushed",
    ]);
    c.store.with_env(&mut cmd);
    let o = cmd.output().unwrap();
    // qmpbackup logs to stdout, as the original does.
    let err = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("after the upload the store does not hold"),
        "{err}"
    );
    assert!(err.contains("s3://bkt/pushed/"), "{err}");
    let sums = std::fs::read_to_string(target.join("SHA256SUMS")).unwrap();
    assert_eq!(
        sums,
        std::fs::read_to_string(common::sample_chain().join("SHA256SUMS")).unwrap()
    );
    for e in std::fs::read_dir(common::sample_chain().join("disk.qcow2")).unwrap() {
        let e = e.unwrap();
        let kept = target.join("disk.qcow2").join(e.file_name());
        assert!(std::fs::read(kept).unwrap() == std::fs::read(e.path()).unwrap());
    }
}
