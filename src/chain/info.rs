//! `qmprestore info`: what an image is, in qemu-img's words.
//!
//! The JSON uses `qemu-img info --output=json` field names wherever the two overlap, so scripts
//! written against qemu-img keep working on hosts that only have qmprestore.

use super::units;
use crate::qcow2::crypto::EncryptInfo;
use crate::qcow2::{Image, Qcow2};
use serde::Serialize;
use std::fmt::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub filename: String,
    pub format: &'static str,
    pub virtual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<SnapshotInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
    /// qemu-img prints it for encrypted images only.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    pub dirty_flag: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_sec: u64,
    pub vm_clock_nsec: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub data: Qcow2Specific,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Specific {
    pub compat: &'static str,
    pub compression_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapInfo>>,
    pub refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<EncryptInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct BitmapInfo {
    pub flags: Vec<&'static str>,
    pub name: String,
    pub granularity: u64,
}

/// Describes one image of a chain (one entry of `--backing-chain`).
pub fn describe(disk: &Image) -> ImageInfo {
    let mut info = ImageInfo {
        filename: disk.path().display().to_string(),
        format: disk.format().name(),
        virtual_size: disk.size(),
        actual_size: disk.allocated_bytes(),
        cluster_size: None,
        backing_filename: None,
        full_backing_filename: None,
        backing_filename_format: None,
        snapshots: None,
        format_specific: None,
        encrypted: false,
        dirty_flag: false,
    };
    if let Some(q) = disk.qcow2() {
        describe_qcow2(q, &mut info);
    }
    info
}

fn describe_qcow2(q: &Qcow2, info: &mut ImageInfo) {
    let h = q.header();
    info.cluster_size = Some(h.cluster_size());
    info.dirty_flag = h.dirty();
    info.encrypted = q.encryption().is_some();
    if let Some(name) = q.backing_name() {
        info.backing_filename = Some(String::from_utf8_lossy(name.as_bytes()).into_owned());
        let full = crate::qcow2::image::resolve_relative(q.path(), Path::new(name));
        info.full_backing_filename = Some(full.display().to_string());
        info.backing_filename_format = q.backing_format().map(str::to_string);
    }
    if !q.snapshots().is_empty() {
        info.snapshots = Some(snapshots(q));
    }
    let v3 = h.version >= 3;
    let bitmaps: Vec<BitmapInfo> = q
        .bitmaps()
        .iter()
        .map(|b| BitmapInfo {
            flags: b.flag_names(),
            name: b.name.clone(),
            granularity: b.granularity(),
        })
        .collect();
    info.format_specific = Some(FormatSpecific {
        kind: "qcow2",
        data: Qcow2Specific {
            compat: if v3 { "1.1" } else { "0.10" },
            compression_type: h.compression_type.name(),
            lazy_refcounts: v3.then(|| h.lazy_refcounts()),
            bitmaps: (!bitmaps.is_empty()).then_some(bitmaps),
            refcount_bits: h.refcount_bits(),
            data_file: q
                .extensions()
                .data_file
                .as_ref()
                .map(|n| String::from_utf8_lossy(n.as_bytes()).into_owned()),
            data_file_raw: q.data_file().map(|_| h.data_file_raw()),
            encrypt: q.encryption().map(|e| e.info()),
            corrupt: v3.then(|| h.corrupt()),
            extended_l2: v3.then(|| h.extended_l2()),
        },
    });
}

/// The human-readable report, laid out like `qemu-img info`.
pub fn human(info: &ImageInfo) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "image: {}", info.filename);
    let _ = writeln!(s, "file format: {}", info.format);
    let _ = writeln!(
        s,
        "virtual size: {} ({} bytes)",
        units::size(info.virtual_size),
        info.virtual_size
    );
    if let Some(a) = info.actual_size {
        let _ = writeln!(s, "disk size: {}", units::size(a));
    }
    if info.encrypted {
        let _ = writeln!(s, "encrypted: yes");
    }
    if let Some(c) = info.cluster_size {
        let _ = writeln!(s, "cluster_size: {c}");
    }
    if let Some(b) = &info.backing_filename {
        let _ = write!(s, "backing file: {b}");
        match &info.full_backing_filename {
            Some(full) if full != b => {
                let _ = writeln!(s, " (actual path: {full})");
            }
            _ => s.push('\n'),
        }
        if let Some(f) = &info.backing_filename_format {
            let _ = writeln!(s, "backing file format: {f}");
        }
    }
    if let Some(snaps) = &info.snapshots {
        s.push_str(&snapshot_table(snaps));
    }
    if let Some(fs) = &info.format_specific {
        let d = &fs.data;
        let _ = writeln!(s, "Format specific information:");
        let _ = writeln!(s, "    compat: {}", d.compat);
        let _ = writeln!(s, "    compression type: {}", d.compression_type);
        if let Some(l) = d.lazy_refcounts {
            let _ = writeln!(s, "    lazy refcounts: {l}");
        }
        if let Some(bitmaps) = &d.bitmaps {
            let _ = writeln!(s, "    bitmaps:");
            for (i, b) in bitmaps.iter().enumerate() {
                let _ = writeln!(s, "        [{i}]:");
                let _ = writeln!(s, "            flags:");
                for (j, f) in b.flags.iter().enumerate() {
                    let _ = writeln!(s, "                [{j}]: {f}");
                }
                let _ = writeln!(s, "            name: {}", b.name);
                let _ = writeln!(s, "            granularity: {}", b.granularity);
            }
        }
        let _ = writeln!(s, "    refcount bits: {}", d.refcount_bits);
        if let Some(df) = &d.data_file {
            let _ = writeln!(s, "    data file: {df}");
        }
        if let Some(raw) = d.data_file_raw {
            let _ = writeln!(s, "    data file raw: {raw}");
        }
        if let Some(e) = &d.encrypt {
            s.push_str(&encrypt_lines(e));
        }
        if let Some(c) = d.corrupt {
            let _ = writeln!(s, "    corrupt: {c}");
        }
        if let Some(e) = d.extended_l2 {
            let _ = writeln!(s, "    extended l2: {e}");
        }
    }
    if info.dirty_flag {
        let _ = writeln!(s, "dirty flag: true");
    }
    s
}

/// The `encrypt:` block of the human report, as qemu-img lays it out.
fn encrypt_lines(e: &EncryptInfo) -> String {
    let mut s = String::from("    encrypt:\n");
    let Some(l) = &e.luks else {
        let _ = writeln!(s, "        format: {}", e.format);
        return s;
    };
    if let Some(h) = l.ivgen_hash_alg {
        let _ = writeln!(s, "        ivgen hash alg: {h}");
    }
    let _ = writeln!(s, "        ivgen alg: {}", l.ivgen_alg);
    let _ = writeln!(s, "        detached header: {}", l.detached_header);
    let _ = writeln!(s, "        hash alg: {}", l.hash_alg);
    let _ = writeln!(s, "        cipher alg: {}", l.cipher_alg);
    let _ = writeln!(s, "        uuid: {}", l.uuid);
    let _ = writeln!(s, "        format: {}", e.format);
    let _ = writeln!(s, "        cipher mode: {}", l.cipher_mode);
    let _ = writeln!(s, "        slots:");
    for (i, slot) in l.slots.iter().enumerate() {
        let _ = writeln!(s, "            [{i}]:");
        let _ = writeln!(s, "                active: {}", slot.active);
        if let Some(it) = slot.iters {
            let _ = writeln!(s, "                iters: {it}");
        }
        let _ = writeln!(s, "                key offset: {}", slot.key_offset);
        if let Some(st) = slot.stripes {
            let _ = writeln!(s, "                stripes: {st}");
        }
    }
    let _ = writeln!(s, "        payload offset: {}", l.payload_offset);
    let _ = writeln!(s, "        master key iters: {}", l.master_key_iters);
    s
}

/// The snapshot list as `qemu-img info` and `qemu-img snapshot -l` print it.
pub fn snapshot_table(snaps: &[SnapshotInfo]) -> String {
    let mut s = String::from("Snapshot list:\n");
    let _ = writeln!(
        s,
        "{:<7} {:<17} {:>7} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snaps {
        let secs = sn.vm_clock_sec;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            sn.vm_clock_nsec / 1_000_000
        );
        let icount = sn.icount.map(|i| i.to_string()).unwrap_or_default();
        let _ = writeln!(
            s,
            "{:<7} {:<17} {:>7} {:>19} {:>15} {:>10}",
            sn.id,
            sn.name,
            units::size(sn.vm_state_size),
            crate::store::time::local_time(sn.date_sec as i64),
            clock,
            icount
        );
    }
    s
}

/// Snapshot descriptions of an image, as `info` reports them.
pub fn snapshots(q: &Qcow2) -> Vec<SnapshotInfo> {
    q.snapshots()
        .iter()
        .map(|s| SnapshotInfo {
            id: s.id.clone(),
            name: s.name.clone(),
            vm_state_size: s.vm_state_size,
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            icount: s.icount.filter(|&i| i != -1),
        })
        .collect()
}
