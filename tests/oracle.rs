//! Oracle tests: images freshly made by qemu-img/qemu-io across the format's parameters must
//! read byte for byte as `qemu-img convert -O raw` renders them, and map exactly as
//! `qemu-img map --output=json` does.

mod common;

use common::*;
use std::collections::HashSet;
use std::path::Path;

#[derive(Clone, Copy)]
struct Mix {
    zero: bool,
    discard: bool,
    compress: bool,
}

const ALL: Mix = Mix {
    zero: true,
    discard: true,
    compress: true,
};
const NO_COMPRESS: Mix = Mix {
    compress: false,
    ..ALL
};

/// `n` random qemu-io operations over a disk of `size` bytes with `cs`-byte clusters.
fn random_ops(rng: &mut Lcg, size: u64, cs: u64, n: usize, mix: Mix) -> Vec<String> {
    let mut touched = HashSet::new();
    let mut ops = Vec::new();
    let span = |rng: &mut Lcg| {
        let off = rng.below(size / 512) * 512;
        let len = ((1 + rng.below(4 * cs / 512 + 8)) * 512).min(size - off);
        (off, len)
    };
    for _ in 0..n {
        let pat = 1 + rng.below(255);
        let kind = rng.below(10);
        let (off, len) = span(rng);
        let mark = |touched: &mut HashSet<u64>, off: u64, len: u64| {
            touched.extend(off / cs..(off + len).div_ceil(cs));
        };
        match kind {
            5 | 6 if mix.zero => {
                ops.push(format!("write -z {off} {len}"));
                mark(&mut touched, off, len);
            }
            7 if mix.discard => ops.push(format!("discard {off} {len}")),
            8 | 9 if mix.compress => {
                let c = rng.below(size / cs);
                if (c + 1) * cs <= size && !touched.contains(&c) {
                    ops.push(format!("write -c -P {pat} {} {cs}", c * cs));
                    mark(&mut touched, c * cs, cs);
                }
            }
            _ => {
                ops.push(format!("write -P {pat} {off} {len}"));
                mark(&mut touched, off, len);
            }
        }
    }
    ops
}

/// Creates `name` with `qemu-img create -f qcow2 -o OPTS`, applies random operations, then
/// checks reading and mapping against qemu-img.
fn scenario(dir: &Path, name: &str, opts: &str, size: u64, cs: u64, seed: u64, mix: Mix) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let size_s = size.to_string();
    args.extend([name, size_s.as_str()]);
    qemu_img(dir, &args);
    let ops = random_ops(&mut Lcg(seed), size, cs, 60, mix);
    qemu_io(dir, name, &ops);
    assert_reads_like_qemu(dir, name, &[]);
    assert_maps_like_qemu(dir, name);
}

#[test]
fn cluster_sizes_from_512_bytes_to_2_mib() {
    let Some(d) = needs("qemu-img") else { return };
    for (i, cs) in [512u64, 4096, 65536, 1 << 21].into_iter().enumerate() {
        let (name, opts) = (format!("cs{cs}.qcow2"), format!("cluster_size={cs}"));
        let size = (cs * 64).max(8 << 20);
        scenario(d.path(), &name, &opts, size, cs, i as u64, ALL);
    }
}

#[test]
fn compat_0_10_and_1_1() {
    let Some(d) = needs("qemu-img") else { return };
    scenario(
        d.path(),
        "v2.qcow2",
        "compat=0.10",
        16 << 20,
        65536,
        11,
        ALL,
    );
    scenario(d.path(), "v3.qcow2", "compat=1.1", 16 << 20, 65536, 12, ALL);
}

#[test]
fn zlib_and_zstd_compressed_clusters() {
    let Some(d) = needs("qemu-img") else { return };
    let dense = Mix {
        zero: false,
        discard: false,
        compress: true,
    };
    scenario(d.path(), "zlib.qcow2", "", 8 << 20, 65536, 21, dense);
    scenario(
        d.path(),
        "zstd.qcow2",
        "compression_type=zstd",
        8 << 20,
        65536,
        22,
        dense,
    );
    scenario(
        d.path(),
        "zstd4k.qcow2",
        "compression_type=zstd,cluster_size=4k",
        4 << 20,
        4096,
        23,
        ALL,
    );
    // Whole images compressed by qemu-img convert: many streams share host clusters and
    // sectors, and the last one may end exactly at the end of the file.
    for (name, opts) in [
        ("c-zlib.qcow2", "cluster_size=8k"),
        ("c-zstd.qcow2", "compression_type=zstd,cluster_size=8k"),
    ] {
        qemu_img(
            d.path(),
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                opts,
                "zlib.qcow2",
                name,
            ],
        );
        assert_reads_like_qemu(d.path(), name, &[]);
        assert_maps_like_qemu(d.path(), name);
    }
}

#[test]
fn extended_l2_subclusters() {
    let Some(d) = needs("qemu-img") else { return };
    for (i, cs) in [16384u64, 65536, 1 << 21].into_iter().enumerate() {
        let name = format!("ext{cs}.qcow2");
        let opts = format!("extended_l2=on,cluster_size={cs}");
        let size = (cs * 32).max(8 << 20);
        scenario(d.path(), &name, &opts, size, cs, 31 + i as u64, ALL);
    }
    // Subclusters over a backing file: unallocated subclusters must read through.
    let p = d.path();
    qemu_img_create(p, "-f qcow2 eb.qcow2 4M");
    qemu_io(p, "eb.qcow2", &["write -P 7 0 4M"]);
    qemu_img_create(
        p,
        "-f qcow2 -o extended_l2=on,cluster_size=64k -b eb.qcow2 -F qcow2 eo.qcow2",
    );
    let ops = random_ops(&mut Lcg(39), 4 << 20, 65536, 40, NO_COMPRESS);
    qemu_io(p, "eo.qcow2", &ops);
    assert_reads_like_qemu(p, "eo.qcow2", &[]);
    assert_maps_like_qemu(p, "eo.qcow2");
}

#[test]
fn refcount_widths() {
    let Some(d) = needs("qemu-img") else { return };
    for bits in [1u64, 2, 4, 8, 16, 32, 64] {
        let name = format!("rc{bits}.qcow2");
        scenario(
            d.path(),
            &name,
            &format!("refcount_bits={bits},cluster_size=4k"),
            4 << 20,
            4096,
            bits,
            ALL,
        );
        let disk = qmpbackup::qcow2::Disk::open(&d.path().join(&name)).unwrap();
        let q = disk.qcow2().unwrap();
        assert_eq!(q.header().refcount_bits() as u64, bits);
        for c in 0..q.file_len() / 4096 {
            // Every cluster qemu wrote is in use; with 1-bit refcounts the width caps it.
            assert!(
                q.refcount(c).unwrap() >= 1,
                "{name}: cluster {c} refcount 0"
            );
        }
    }
}

#[test]
fn internal_snapshots_with_writes_after_them() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    qemu_img_create(p, "-f qcow2 -o cluster_size=16k s.qcow2 4M");
    let mut rng = Lcg(41);
    // Compressed writes need unallocated clusters: only the first round may use them.
    for (snap, mix) in [("one", ALL), ("two", NO_COMPRESS), ("three", NO_COMPRESS)] {
        qemu_io(p, "s.qcow2", &random_ops(&mut rng, 4 << 20, 16384, 30, mix));
        qemu_img(p, &["snapshot", "-c", snap, "s.qcow2"]);
    }
    qemu_io(
        p,
        "s.qcow2",
        &random_ops(&mut rng, 4 << 20, 16384, 30, NO_COMPRESS),
    );
    qemu_img(p, &["snapshot", "-d", "two", "s.qcow2"]);
    qemu_img(p, &["resize", "s.qcow2", "6M"]);
    qemu_io(p, "s.qcow2", &["write -P 9 5M 64k"]);
    assert_reads_like_qemu(p, "s.qcow2", &[]);
    assert_maps_like_qemu(p, "s.qcow2");
    for snap in ["one", "three"] {
        assert_reads_like_qemu(p, "s.qcow2", &["-l", &format!("snapshot.name={snap}")]);
    }
}

#[test]
fn qcow2_over_qcow2_over_raw_chain() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    qemu_img_create(p, "-f raw base.raw 8M");
    run(std::process::Command::new("qemu-io").current_dir(p).args([
        "-f",
        "raw",
        "-c",
        "write -P 1 0 3M",
        "-c",
        "write -P 2 6M 1M",
        "base.raw",
    ]));
    qemu_img_create(p, "-f qcow2 -b base.raw -F raw mid.qcow2 8M");
    qemu_io(
        p,
        "mid.qcow2",
        &random_ops(&mut Lcg(51), 8 << 20, 65536, 40, ALL),
    );
    qemu_img_create(
        p,
        "-f qcow2 -o cluster_size=4k -b mid.qcow2 -F qcow2 top.qcow2 8M",
    );
    qemu_io(
        p,
        "top.qcow2",
        &random_ops(&mut Lcg(52), 8 << 20, 4096, 40, ALL),
    );
    assert_reads_like_qemu(p, "top.qcow2", &[]);
    assert_maps_like_qemu(p, "top.qcow2");
    assert_maps_like_qemu(p, "base.raw");
    // A chain reached through a subdirectory and an absolute backing name.
    std::fs::create_dir(p.join("sub")).unwrap();
    let abs = p.join("top.qcow2").display().to_string();
    qemu_img(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &abs,
            "-F",
            "qcow2",
            "sub/abs.qcow2",
            "8M",
        ],
    );
    assert_reads_like_qemu(p, "sub/abs.qcow2", &[]);
    // A relative name is resolved against the directory of the image that holds it.
    qemu_img_create(p, "-f qcow2 -b ../mid.qcow2 -F qcow2 sub/rel.qcow2 8M");
    assert_reads_like_qemu(p, "sub/rel.qcow2", &[]);
    // The backing format extension is honoured: a qcow2 file declared raw is read as raw.
    qemu_img_create(p, "-f qcow2 -b mid.qcow2 -F raw as-raw.qcow2 8M");
    assert_reads_like_qemu(p, "as-raw.qcow2", &[]);
    assert_maps_like_qemu(p, "as-raw.qcow2");
}

#[test]
fn backing_files_shorter_and_longer_than_the_overlay() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    qemu_img_create(p, "-f qcow2 small.qcow2 1M");
    qemu_io(p, "small.qcow2", &["write -P 3 0 1M"]);
    qemu_img_create(p, "-f qcow2 -b small.qcow2 -F qcow2 big-over.qcow2 4M");
    qemu_io(
        p,
        "big-over.qcow2",
        &["write -P 4 512k 64k", "write -P 5 3M 64k"],
    );
    qemu_img_create(p, "-f qcow2 large.qcow2 8M");
    qemu_io(p, "large.qcow2", &["write -P 6 0 8M"]);
    qemu_img_create(p, "-f qcow2 -b large.qcow2 -F qcow2 small-over.qcow2 2M");
    qemu_io(p, "small-over.qcow2", &["write -P 7 1M 64k"]);
    // An odd-sized raw backing file: reads as zeros up to the next sector and beyond.
    std::fs::write(p.join("odd.raw"), vec![0x5a; 1000]).unwrap();
    qemu_img_create(p, "-f qcow2 -b odd.raw -F raw odd-over.qcow2 1M");
    for img in ["big-over.qcow2", "small-over.qcow2", "odd-over.qcow2"] {
        assert_reads_like_qemu(p, img, &[]);
        assert_maps_like_qemu(p, img);
    }
}

#[test]
fn external_data_files_raw_and_not_raw() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    for (name, opts) in [
        ("df-raw.qcow2", "data_file=df-raw.data,data_file_raw=on"),
        ("df.qcow2", "data_file=df.data"),
        ("df-ext.qcow2", "data_file=df-ext.data,extended_l2=on"),
    ] {
        scenario(
            p,
            name,
            opts,
            8 << 20,
            65536,
            name.len() as u64,
            NO_COMPRESS,
        );
    }
}

#[test]
fn odd_virtual_sizes() {
    let Some(d) = needs("qemu-img") else { return };
    for (i, size) in [1000u64, (1 << 20) + 512, 123_456_789]
        .into_iter()
        .enumerate()
    {
        let name = format!("odd{i}.qcow2");
        qemu_img(
            d.path(),
            &["create", "-q", "-f", "qcow2", &name, &size.to_string()],
        );
        let rounded = size.div_ceil(512) * 512;
        let last = rounded - 512;
        qemu_io(
            d.path(),
            &name,
            &[
                "write -P 9 0 512".to_string(),
                format!("write -P 8 {last} 512"),
            ],
        );
        assert_reads_like_qemu(d.path(), &name, &[]);
        assert_maps_like_qemu(d.path(), &name);
    }
}

#[test]
fn two_tib_sparse_image() {
    let Some(d) = needs("qemu-img") else { return };
    let p = d.path();
    qemu_img_create(p, "-f qcow2 huge.qcow2 2T");
    let far = (2u64 << 40) - 65536;
    qemu_io(
        p,
        "huge.qcow2",
        &[
            "write -P 1 0 64k".to_string(),
            format!("write -P 2 {} 128k", 1u64 << 40),
            format!("write -c -P 3 {} 64k", 1u64 << 39),
            format!("write -P 4 {far} 64k"),
        ],
    );
    assert_maps_like_qemu(p, "huge.qcow2");
    // The CLI renders it sparsely; qemu-img compares the result with the image.
    let out = p.join("huge.raw");
    run(std::process::Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .args(["convert", "-O", "raw"])
        .arg(p.join("huge.qcow2"))
        .arg(&out));
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), 2 << 40);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 64 << 20, "output is not sparse");
    qemu_img(
        p,
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "huge.qcow2",
            "huge.raw",
        ],
    );
}
