//! Encrypted images against qemu-img, both ways: every cipher combination qemu-img 10
//! creates reads here exactly as `qemu-img convert` renders it, and every encrypted image we
//! write opens in qemu-img with its key, reads the same and checks clean. Bad keys and
//! damaged headers fail with the file and the cause, leaving nothing behind.

mod common;

use common::*;
use qmpbackup::qcow2::Qcow2;
use std::path::Path;

const PASS: &[u8] = b"correct horse\n";
const OTHER: &[u8] = b"battery staple";

/// Key files `key` and `key2` in `dir`.
fn keys(dir: &Path) {
    std::fs::write(dir.join("key"), PASS).unwrap();
    std::fs::write(dir.join("key2"), OTHER).unwrap();
}

/// qemu-img's spelling of an image (and `depth` encrypted backing files) opened with the
/// secret `s`.
fn image_opts(file: &str, depth: usize) -> String {
    let mut o = format!("driver=qcow2,file.filename={file},encrypt.key-secret=s");
    for d in 1..=depth {
        o.push_str(&format!(",{}encrypt.key-secret=s", "backing.".repeat(d)));
    }
    o
}

/// The secret object of key file `key` (in `dir`).
fn secret(dir: &Path, key: &str) -> String {
    format!("secret,id=s,file={}", dir.join(key).display())
}

fn qemu_io_enc(dir: &Path, file: &str, depth: usize, cmds: &[&str]) {
    let mut c = std::process::Command::new("qemu-io");
    c.current_dir(dir)
        .args(["--object", &secret(dir, "key"), "--image-opts"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(image_opts(file, depth));
    let out = run(&mut c);
    assert!(!out.contains("failed"), "qemu-io {cmds:?}: {out}");
}

/// What qemu-img renders of an encrypted image (with `depth` encrypted backing files).
fn qemu_render(dir: &Path, file: &str, depth: usize, key: &str) -> Vec<u8> {
    let out = dir.join("qemu.raw");
    qemu_img(
        dir,
        &[
            "convert",
            "--object",
            &secret(dir, key),
            "--image-opts",
            &image_opts(file, depth),
            "-O",
            "raw",
            out.to_str().unwrap(),
        ],
    );
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    v
}

/// `qmprestore --key-file KEY convert -O raw SRC OUT`, whatever its outcome.
fn convert_raw(key: &Path, src: &Path, out: &Path) -> std::process::Output {
    let arg = |p: &Path| p.to_str().unwrap().to_string();
    let args = [
        "--key-file",
        &arg(key),
        "convert",
        "-O",
        "raw",
        &arg(src),
        &arg(out),
    ];
    qmprestore(&args)
}

/// What we render of an image with `--key-file`.
fn our_render(dir: &Path, file: &str, key: &str) -> Vec<u8> {
    let out = dir.join("ours.raw");
    let o = convert_raw(&dir.join(key), &dir.join(file), &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    v
}

/// `qemu-img check` of an encrypted image we wrote: clean.
fn qemu_check_clean(dir: &Path, file: &str, key: &str) {
    qemu_img(
        dir,
        &[
            "check",
            "-q",
            "--object",
            &secret(dir, key),
            "--image-opts",
            &image_opts(file, 0),
        ],
    );
}

fn create_luks(dir: &Path, file: &str, extra: &str, size: &str) {
    let o = format!("encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10{extra}");
    let s = secret(dir, "key");
    qemu_img(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "--object", &s, "-o", &o, file, size,
        ],
    );
}

/// Data at odd places: partial sectors, a cluster boundary, a zeroed range.
const WRITES: &[&str] = &[
    "write -P 0x5c 4096 70000",
    "write -P 0x11 65024 1024",
    "write -P 0x22 1M 100k",
    "write -z 1088k 4k",
];

#[test]
fn every_cipher_qemu_img_makes_reads_as_qemu_renders_it() {
    let Some(t) = needs("qemu-img") else { return };
    let dir = t.path();
    keys(dir);
    // (cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg, hash-alg)
    let variants = [
        ("aes-256", "xts", "plain64", "", "sha256"),
        ("aes-128", "xts", "plain64", "", "sha1"),
        ("aes-192", "xts", "plain64", "", "sha512"),
        ("aes-128", "cbc", "essiv", "sha256", "sha256"),
        ("aes-256", "cbc", "plain", "", "sha512"),
        ("aes-256", "ecb", "plain64", "", "md5"),
        ("twofish-256", "xts", "plain64", "", "sha256"),
        ("serpent-256", "cbc", "essiv", "sha256", "sha384"),
        ("serpent-128", "xts", "plain", "", "ripemd160"),
        ("cast5-128", "cbc", "plain64", "", "sha224"),
    ];
    for (alg, mode, iv, ivh, hash) in variants {
        let file = format!("{alg}-{mode}-{iv}-{hash}.qcow2");
        let mut extra = format!(
            ",encrypt.cipher-alg={alg},encrypt.cipher-mode={mode},encrypt.ivgen-alg={iv},encrypt.hash-alg={hash}"
        );
        if !ivh.is_empty() {
            extra.push_str(&format!(",encrypt.ivgen-hash-alg={ivh}"));
        }
        create_luks(dir, &file, &extra, "2M");
        qemu_io_enc(dir, &file, 0, WRITES);
        let want = qemu_render(dir, &file, 0, "key");
        assert!(want.contains(&0x5c));
        assert_eq!(our_render(dir, &file, "key"), want, "{file}");
        // info needs no key, and says what qemu-img says.
        let ours = json_of(&qmprestore(&[
            "info",
            "--output",
            "json",
            dir.join(&file).to_str().unwrap(),
        ]));
        let theirs: serde_json::Value =
            serde_json::from_str(&qemu_img(dir, &["info", "--output=json", &file])).unwrap();
        assert_eq!(ours["encrypted"], true);
        assert_eq!(
            ours["format-specific"]["data"]["encrypt"],
            theirs["format-specific"]["data"]["encrypt"],
            "{file}"
        );
    }
}

#[test]
fn compressed_clusters_of_a_luks_image_are_plaintext_and_read_as_qemu_reads_them() {
    let Some(t) = needs("qemu-img") else { return };
    let dir = t.path();
    keys(dir);
    create_luks(dir, "c.qcow2", "", "1M");
    qemu_io_enc(
        dir,
        "c.qcow2",
        0,
        &["write -c -P 0x77 0 64k", "write -P 0x66 64k 64k"],
    );
    let raw = std::fs::read(dir.join("c.qcow2")).unwrap();
    assert_eq!(
        our_render(dir, "c.qcow2", "key"),
        qemu_render(dir, "c.qcow2", 0, "key")
    );
    // The plain cluster's pattern is nowhere in the file; the compressed one is stored as
    // QEMU stores it, unencrypted (its deflate stream, not the pattern itself).
    assert!(!raw.windows(64).any(|w| w.iter().all(|&b| b == 0x66)));
}

#[test]
fn legacy_aes_reads_and_is_never_written() {
    let Some(t) = needs("qemu-img") else { return };
    let dir = t.path();
    keys(dir);
    let s = secret(dir, "key");
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            &s,
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s",
            "l.qcow2",
            "1M",
        ],
    );
    qemu_io_enc(dir, "l.qcow2", 0, &["write -P 0x42 512 70000"]);
    assert_eq!(
        our_render(dir, "l.qcow2", "key"),
        qemu_render(dir, "l.qcow2", 0, "key")
    );
    let info = json_of(&qmprestore(&[
        "info",
        "--output",
        "json",
        dir.join("l.qcow2").to_str().unwrap(),
    ]));
    assert_eq!(info["format-specific"]["data"]["encrypt"]["format"], "aes");
    let o = qmprestore(&[
        "create",
        "-o",
        "encrypt.format=aes",
        dir.join("n.qcow2").to_str().unwrap(),
        "1M",
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("legacy AES"));
    assert!(!dir.join("n.qcow2").exists());
}

#[test]
fn encrypted_images_we_write_open_in_qemu_img() {
    let Some(t) = needs("qemu-img") else { return };
    let dir = t.path();
    keys(dir);
    let mut pattern = vec![0u8; 3 << 20];
    for (i, b) in pattern.iter_mut().enumerate().skip(5000).take(1 << 20) {
        *b = (i % 251) as u8 + 1;
    }
    std::fs::write(dir.join("plain.raw"), &pattern).unwrap();
    let key2 = dir.join("key2");
    for (n, o) in [
        "",
        ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
        ",encrypt.cipher-alg=twofish-256,encrypt.hash-alg=sha512",
        ",encrypt.cipher-alg=serpent-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64",
        ",encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,encrypt.hash-alg=sha1",
    ]
    .iter()
    .enumerate()
    {
        let out = format!("ours{n}.qcow2");
        qmprestore_ok(&[
            "--target-key-file",
            key2.to_str().unwrap(),
            "convert",
            "-O",
            "qcow2",
            "-o",
            &format!("encrypt.format=luks,encrypt.iter-time=10{o}"),
            dir.join("plain.raw").to_str().unwrap(),
            dir.join(&out).to_str().unwrap(),
        ]);
        assert_eq!(qemu_render(dir, &out, 0, "key2"), pattern, "{out} {o}");
        qemu_check_clean(dir, &out, "key2");
        let stored = std::fs::read(dir.join(&out)).unwrap();
        assert!(!stored.windows(251).any(|w| w == &pattern[5020..5271]), "{out}: plaintext stored");
    }
    // An empty image made by `create` (qemu-img's spelling of the key), then written by QEMU.
    let s = secret(dir, "key");
    qmprestore_ok(&[
        "create",
        "--object",
        &s,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
        dir.join("new.qcow2").to_str().unwrap(),
        "2M",
    ]);
    qemu_io_enc(dir, "new.qcow2", 0, WRITES);
    qemu_check_clean(dir, "new.qcow2", "key");
    assert_eq!(
        our_render(dir, "new.qcow2", "key"),
        qemu_render(dir, "new.qcow2", 0, "key")
    );
    // Compression and encryption together are refused before anything is written.
    let o = qmprestore(&[
        "--target-key-file",
        key2.to_str().unwrap(),
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=luks",
        dir.join("plain.raw").to_str().unwrap(),
        dir.join("c.qcow2").to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("compression and encryption"));
    assert!(!dir.join("c.qcow2").exists());
}

/// A FULL and three INCs, each with its own LUKS header as QEMU makes them, in `dir/chain`.
fn encrypted_chain(dir: &Path) -> Vec<u8> {
    let chain = dir.join("chain");
    std::fs::create_dir(&chain).unwrap();
    std::fs::copy(dir.join("key"), chain.join("key")).unwrap();
    let names = [
        "FULL-1700000000-disk.qcow2",
        "INC-1700000001-disk.qcow2",
        "INC-1700000002-disk.qcow2",
        "INC-1700000003-disk.qcow2",
    ];
    create_luks(&chain, names[0], "", "4M");
    for i in 1..4 {
        let b = format!(",backing_file={},backing_fmt=qcow2", names[i - 1]);
        create_luks(&chain, names[i], &b, "4M");
    }
    qemu_io_enc(&chain, names[0], 0, &["write -P 1 0 3M"]);
    qemu_io_enc(
        &chain,
        names[1],
        1,
        &["write -P 2 1M 100k", "write -c -P 4 2M 64k"],
    );
    qemu_io_enc(
        &chain,
        names[2],
        2,
        &["write -z 1M 64k", "discard 2560k 64k"],
    );
    qemu_io_enc(&chain, names[3], 3, &["write -P 3 3M 512k"]);
    std::fs::remove_file(chain.join("key")).unwrap();
    let want = qemu_render(&chain.join(".."), &format!("chain/{}", names[3]), 3, "key");
    assert!(want.contains(&3) && want.contains(&4));
    want
}

#[test]
fn an_encrypted_chain_merges_under_the_fulls_header_or_as_asked() {
    let Some(t) = needs("qemu-img") else { return };
    let dir = t.path();
    keys(dir);
    let want = encrypted_chain(dir);
    let (key, key2) = (dir.join("key"), dir.join("key2"));
    let chain = dir.join("chain");
    let merge = |extra: &[&str], out: &str| {
        let mut args = vec![
            "--key-file",
            key.to_str().unwrap(),
            "merge",
            "--dir",
            chain.to_str().unwrap(),
        ];
        let target = dir.join(out);
        args.extend(["--targetfile", target.to_str().unwrap()]);
        args.extend(extra);
        qmprestore_ok(&args);
    };
    let uuid = |f: &str| {
        let v = json_of(&qmprestore(&[
            "info",
            "--output",
            "json",
            dir.join(f).to_str().unwrap(),
        ]));
        v["format-specific"]["data"]["encrypt"]["uuid"].clone()
    };
    // verify: without the key the structure (and a manifest) vouch for the files; with it
    // every cluster is decrypted; a wrong key is a failure.
    let v = qmprestore_ok(&["verify", "--dir", chain.to_str().unwrap()]);
    assert!(
        v.contains("restorable") && v.contains("not decrypted"),
        "{v}"
    );
    let k = key.to_str().unwrap();
    let v = qmprestore_ok(&["--key-file", k, "verify", "--dir", chain.to_str().unwrap()]);
    assert!(
        v.contains("restorable") && !v.contains("not decrypted"),
        "{v}"
    );
    let k2 = key2.to_str().unwrap();
    fails(&["--key-file", k2, "verify", "--dir", chain.to_str().unwrap()]);

    merge(&[], "m.qcow2");
    assert_eq!(qemu_render(dir, "m.qcow2", 0, "key"), want);
    qemu_check_clean(dir, "m.qcow2", "key");
    assert_eq!(uuid("m.qcow2"), uuid("chain/FULL-1700000000-disk.qcow2"));

    merge(&["--decrypt"], "d.qcow2");
    assert_eq!(render(dir, "d.qcow2", None), want);
    assert!(Qcow2::open(&dir.join("d.qcow2"))
        .unwrap()
        .encryption()
        .is_none());

    merge(&["--format", "raw"], "r.raw");
    assert_eq!(std::fs::read(dir.join("r.raw")).unwrap(), want);

    let mut args = vec!["--target-key-file", key2.to_str().unwrap()];
    args.extend([
        "--key-file",
        key.to_str().unwrap(),
        "merge",
        "--dir",
        chain.to_str().unwrap(),
    ]);
    let n = dir.join("n.qcow2");
    args.extend(["--targetfile", n.to_str().unwrap()]);
    qmprestore_ok(&args);
    assert_eq!(qemu_render(dir, "n.qcow2", 0, "key2"), want);
    assert_ne!(uuid("n.qcow2"), uuid("chain/FULL-1700000000-disk.qcow2"));
    qemu_check_clean(dir, "n.qcow2", "key2");
}

/// Runs qmprestore expecting failure; returns its stderr.
fn fails(args: &[&str]) -> String {
    let o = qmprestore(args);
    assert!(!o.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_keys_and_damaged_headers_fail_clearly_and_write_nothing() {
    let Some(t) = needs("qemu-img") else { return };
    let dir = t.path();
    keys(dir);
    create_luks(dir, "a.qcow2", "", "1M");
    qemu_io_enc(dir, "a.qcow2", 0, &["write -P 9 0 64k"]);
    let img = dir.join("a.qcow2");
    let out = dir.join("out.raw");
    let convert = |key: &Path, src: &Path| {
        let o = convert_raw(key, src, &out);
        assert!(!o.status.success(), "{src:?} converted");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = convert(&dir.join("key2"), &img);
    assert!(
        e.contains("a.qcow2") && e.contains("invalid passphrase"),
        "{e}"
    );
    let e = convert(&dir.join("nokey"), &img);
    assert!(e.contains("nokey") && e.contains("No such file"), "{e}");
    std::fs::write(dir.join("bin"), b"\xff\xfe\n").unwrap();
    let e = convert(&dir.join("bin"), &img);
    assert!(e.contains("UTF-8"), "{e}");
    let e = fails(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("--key-file"), "{e}");
    assert!(!out.exists());

    let luks = Qcow2::open(&img)
        .unwrap()
        .extensions()
        .crypto
        .unwrap()
        .offset;
    let original = std::fs::read(&img).unwrap();
    let damaged = |name: &str, at: u64, bytes: &[u8]| {
        let mut b = original.clone();
        b[(luks + at) as usize..(luks + at) as usize + bytes.len()].copy_from_slice(bytes);
        let p = dir.join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let cases = [
        (
            "stripes.qcow2",
            208 + 44,
            &u32::MAX.to_be_bytes()[..],
            "stripes",
        ),
        ("cipher.qcow2", 8, b"nosuchciph", "not supported"),
        (
            "iters.qcow2",
            208 + 4,
            &u32::MAX.to_be_bytes()[..],
            "iterations",
        ),
        ("magic.qcow2", 0, b"XXXX", "bad magic"),
        // Flipped key material: the digest no longer matches.
        (
            "material.qcow2",
            4096 + 100,
            b"\x00\x01\x02\x03",
            "invalid passphrase",
        ),
    ];
    for (name, at, bytes, want) in cases {
        let p = damaged(name, at, bytes);
        let started = std::time::Instant::now();
        let e = convert(&dir.join("key"), &p);
        assert!(e.contains(name) && e.contains(want), "{name}: {e}");
        assert!(
            started.elapsed().as_secs() < 30,
            "{name}: refused only after a long time"
        );
        assert!(!out.exists());
    }
    assert_eq!(std::fs::read(&img).unwrap(), original, "inputs untouched");
}

#[test]
fn key_rotation_keeps_the_data_and_never_removes_the_last_slot() {
    let Some(t) = needs("qemu-img") else { return };
    let dir = t.path();
    keys(dir);
    create_luks(dir, "k.qcow2", "", "1M");
    qemu_io_enc(dir, "k.qcow2", 0, &["write -P 7 0 100k"]);
    let want = qemu_render(dir, "k.qcow2", 0, "key");
    let (key, key2) = (dir.join("key"), dir.join("key2"));
    let (k, k2, img) = (
        key.to_str().unwrap(),
        key2.to_str().unwrap(),
        dir.join("k.qcow2"),
    );
    let img = img.to_str().unwrap();
    let out = qmprestore_ok(&[
        "--key-file",
        k,
        "key",
        "add",
        "--new-key-file",
        k2,
        "--iter-time",
        "10",
        img,
    ]);
    assert!(out.contains("key slot 1 added"), "{out}");
    let out = qmprestore_ok(&[
        "--key-file",
        k2,
        "key",
        "remove",
        "--remove-key-file",
        k,
        img,
    ]);
    assert!(out.contains("key slot(s) 0 removed"), "{out}");
    // QEMU opens it with the new passphrase only; the data did not change.
    assert_eq!(qemu_render(dir, "k.qcow2", 0, "key2"), want);
    qemu_check_clean(dir, "k.qcow2", "key2");
    let e = fails(&[
        "--key-file",
        k,
        "convert",
        "-O",
        "raw",
        img,
        dir.join("o.raw").to_str().unwrap(),
    ]);
    assert!(e.contains("invalid passphrase"), "{e}");
    let before = std::fs::read(dir.join("k.qcow2")).unwrap();
    let e = fails(&[
        "--key-file",
        k2,
        "key",
        "remove",
        "--remove-key-file",
        k2,
        img,
    ]);
    assert!(e.contains("every active key slot"), "{e}");
    let e = fails(&["--key-file", k, "key", "add", "--new-key-file", k2, img]);
    assert!(e.contains("invalid passphrase"), "{e}");
    assert_eq!(std::fs::read(dir.join("k.qcow2")).unwrap(), before);
}

#[test]
fn our_writer_updates_partial_sectors_of_an_encrypted_image_as_qemu_reads_them() {
    let Some(t) = needs("qemu-img") else { return };
    let dir = t.path();
    keys(dir);
    create_luks(dir, "w.qcow2", "", "1M");
    qemu_io_enc(dir, "w.qcow2", 0, &["write -P 0x33 0 256k"]);
    let mut want = qemu_render(dir, "w.qcow2", 0, "key");
    qmpbackup::qcow2::crypto::keys::add(PASS.to_vec().into());
    let mut w = qmpbackup::qcow2::write::Writer::open(&dir.join("w.qcow2")).unwrap();
    // Inside one sector, across sectors with partial ends, from a sector start to a partial
    // end, from a partial start to a sector end, across a cluster boundary, and into an
    // unallocated cluster.
    for (at, len, byte) in [
        (1000u64, 3usize, 1u8),
        (4000, 1300, 2),
        (8192, 700, 3),
        (9000, 216, 4),
        (65000, 1100, 5),
        (300_000, 777, 6),
    ] {
        w.write_at(&vec![byte; len], at).unwrap();
        want[at as usize..at as usize + len].fill(byte);
    }
    w.finish().unwrap();
    assert_eq!(qemu_render(dir, "w.qcow2", 0, "key"), want);
    qemu_check_clean(dir, "w.qcow2", "key");
}
