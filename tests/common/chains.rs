//! Backup chains made with qemu-img/qemu-io, with the live disk's contents at every backup.

use super::{qemu_img, qemu_io, Lcg};
use std::path::PathBuf;

pub struct Backups {
    pub _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    /// Raw images of the live disk at each backup (FULL first).
    pub expected: Vec<PathBuf>,
    pub names: Vec<String>,
}

/// A live disk gets `rounds` rounds of writes; after each a backup is taken: a full copy
/// first, then INCs holding exactly the clusters written since (zero writes as zero
/// clusters). Writes cover whole INC clusters, as a backup job copies whole dirty clusters.
/// `linked`: INCs name their predecessor as backing file.
pub fn build(rounds: usize, linked: bool, inc_opts: &str, resize_at: Option<usize>) -> Backups {
    let align: u64 = inc_opts
        .strip_prefix("cluster_size=")
        .map(|c| qmpbackup::chain::create_opts::parse_size(c).unwrap())
        .unwrap_or(65536);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let dir = root.join("disk.qcow2");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(root.join("uuid"), "test-chain").unwrap();
    super::qemu_img_create(&root, "-f qcow2 live.qcow2 8M");
    let mut rng = Lcg(rounds as u64 * 7 + linked as u64);
    let mut expected = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut size = 8u64 << 20;
    for k in 0..=rounds {
        if resize_at == Some(k) {
            size += 4 << 20;
            qemu_img(&root, &["resize", "-q", "live.qcow2", &size.to_string()]);
        }
        let mut ops = Vec::new();
        for _ in 0..if k == 0 { 12 } else { 5 } {
            let off = rng.below(size / align) * align;
            let len = ((1 + rng.below(6)) * align).min(size - off);
            if k > 0 && rng.below(4) == 0 {
                ops.push(format!("write -z {off} {len}"));
            } else {
                ops.push(format!("write -P {} {off} {len}", 1 + rng.below(250)));
            }
        }
        qemu_io(&root, "live.qcow2", &ops);
        let epoch = 1_700_000_000 + k as u64 * 600;
        let name = if k == 0 {
            format!("FULL-{epoch}-disk.qcow2")
        } else {
            format!("INC-{epoch}-disk.qcow2")
        };
        let path = dir.join(&name);
        if k == 0 {
            qemu_img(
                &root,
                &[
                    "convert",
                    "-O",
                    "qcow2",
                    "live.qcow2",
                    path.to_str().unwrap(),
                ],
            );
        } else {
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if !inc_opts.is_empty() {
                args.extend(["-o", inc_opts]);
            }
            let prev: String = names.last().cloned().unwrap_or_default();
            if linked {
                args.extend(["-b", prev.as_str(), "-F", "qcow2"]);
            }
            let size_s = size.to_string();
            args.extend([name.as_str(), size_s.as_str()]);
            qemu_img(&dir, &args);
            qemu_io(&dir, &name, &ops);
        }
        let raw = root.join(format!("expected-{k}.raw"));
        qemu_img(
            &root,
            &["convert", "-O", "raw", "live.qcow2", raw.to_str().unwrap()],
        );
        expected.push(raw);
        names.push(name);
    }
    Backups {
        _tmp: tmp,
        dir,
        expected,
        names,
    }
}
