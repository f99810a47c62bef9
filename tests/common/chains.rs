//! Backup chains made with qemu-img/qemu-io, with the live disk's contents at every backup.

use super::{qemu_img, qemu_io, Lcg};
use std::path::{Path, PathBuf};
use std::process::Output;

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

impl Backups {
    /// The folder above the disk folder (the backup target), for outputs next to the chain.
    pub fn root(&self) -> &Path {
        self.dir.parent().unwrap()
    }

    /// The disk folder, as an argument.
    pub fn d(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    /// The live disk at the newest backup (raw).
    pub fn last(&self) -> &Path {
        self.expected.last().unwrap()
    }

    /// `qmprestore <command> --dir <disk folder> <args>`, whatever its outcome.
    pub fn qmprestore(&self, command: &str, args: &[&str]) -> Output {
        let mut all = vec![command, "--dir", self.d()];
        all.extend_from_slice(args);
        super::qmprestore(&all)
    }

    /// [`Backups::qmprestore`], which must succeed; returns its standard output.
    pub fn qmprestore_ok(&self, command: &str, args: &[&str]) -> String {
        super::succeeded(self.qmprestore(command, args))
    }

    /// `qmprestore merge` of the chain (with `args`) into `target`, which must succeed.
    pub fn merge(&self, args: &[&str], target: &Path) {
        let mut all = args.to_vec();
        all.extend(["--targetfile", target.to_str().unwrap()]);
        self.qmprestore_ok("merge", &all);
    }

    /// A fresh copy of the backup files in `to` (whatever was there is removed first).
    pub fn copy_to(&self, to: &Path) -> PathBuf {
        let _ = std::fs::remove_dir_all(to);
        std::fs::create_dir_all(to).unwrap();
        for n in &self.names {
            std::fs::copy(self.dir.join(n), to.join(n)).unwrap();
        }
        to.to_path_buf()
    }

    /// Writes a manifest for each backup file, as qmpbackup does.
    pub fn write_manifests(&self) {
        use qmpbackup::store::manifest::{self, Manifest};
        let names = &self.names;
        for (i, n) in names.iter().enumerate() {
            let f = self.dir.join(n);
            let sums = manifest::checksums(&std::fs::File::open(&f).unwrap()).unwrap();
            let level = if i == 0 { "full" } else { "inc" };
            let m = Manifest {
                manifest_version: manifest::MANIFEST_VERSION,
                tool: "test".into(),
                file: n.clone(),
                level: serde_json::from_value(serde_json::Value::from(level)).unwrap(),
                epoch: n.split('-').nth(1).unwrap().parse().unwrap(),
                uuid: Some("test-chain".into()),
                bitmap: None,
                device: "disk".into(),
                node: "disk".into(),
                qdev: None,
                source_file: "live.qcow2".into(),
                qemu_version: "10.0.2".into(),
                format: "qcow2".into(),
                virtual_size: 8 << 20,
                cluster_size: Some(65536),
                parent: i.checked_sub(1).map(|p| names[p].clone()),
                sums,
            };
            m.write(&qmpbackup::store::Folder::new(&self.dir)).unwrap();
        }
    }
}
