//! The disks of a VM as QMP's `query-block` describes them, and which of them a run backs up.
//!
//! QEMU names the same disk in several ways: a legacy `-drive` has a device name (`drive-l`,
//! `pflash0`), a `-blockdev` disk has only a node name (`disk0`, or an automatic `#block123`),
//! and the guest-visible device is a qdev path. This module reduces each entry to one
//! [`Device`] with the names every later step needs, so the quirks stay here.

use serde_json::Value;

/// One dirty bitmap of a disk's top node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    pub name: String,
    pub recording: bool,
    pub persistent: bool,
    pub busy: bool,
    /// Left flagged in-use by a QEMU that did not shut down cleanly: unusable.
    pub inconsistent: bool,
    pub count: u64,
}

/// A disk attached to the VM.
#[derive(Debug, Clone)]
pub struct Device {
    /// `query-block`'s `device`, or the node name when that is empty (`-blockdev` disks).
    pub name: String,
    /// The node the device reads and writes through: bitmaps live here and the fleecing
    /// filter is put on top of it.
    pub node: String,
    /// The qdev path for `qom-set` of the device's `drive`.
    pub qdev: Option<String>,
    /// Block driver of the top node (`qcow2`, `raw`, ...).
    pub format: String,
    /// The image file (for an active external snapshot: its backing file, which names the
    /// disk for good).
    pub filename: String,
    pub virtual_size: u64,
    pub cluster_size: Option<u64>,
    pub compat: Option<String>,
    pub lazy_refcounts: bool,
    pub read_only: bool,
    pub bitmaps: Vec<Bitmap>,
    /// `inserted.image`: QEMU's description of the image, saved as `<disk>.config`.
    pub image: Value,
}

impl Device {
    pub fn is_pflash(&self) -> bool {
        self.name.starts_with("pflash")
            || self
                .qdev
                .as_deref()
                .is_some_and(|q| q.contains("system.flash"))
    }

    pub fn is_raw(&self) -> bool {
        self.format == "raw"
    }

    /// Whether QEMU can store dirty bitmaps in the image: qcow2 version 3 only. Others get
    /// bitmaps that vanish when QEMU restarts.
    pub fn can_persist_bitmaps(&self) -> bool {
        self.format == "qcow2" && self.compat.as_deref() != Some("0.10")
    }

    /// The file name the backups of this disk are named after.
    pub fn basename(&self) -> String {
        let base = self.filename.rsplit('/').next().unwrap_or("");
        if base.is_empty() {
            self.node.trim_start_matches('#').to_string()
        } else {
            base.to_string()
        }
    }

    pub fn bitmap(&self, name: &str) -> Option<&Bitmap> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
}

/// Parses `query-block`'s reply. Entries without a medium (empty CD-ROMs) are left out;
/// entries the tool cannot describe are returned as `Err` with the reason, for a warning.
pub fn parse_query_block(reply: &Value) -> Vec<Result<Device, String>> {
    reply
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e.get("inserted").is_some())
        .map(parse_entry)
        .collect()
}

fn parse_entry(entry: &Value) -> Result<Device, String> {
    let ins = &entry["inserted"];
    let device = entry["device"].as_str().unwrap_or("");
    let node = ins["node-name"]
        .as_str()
        .ok_or_else(|| format!("device {device:?} has no node name"))?
        .to_string();
    let name = if device.is_empty() {
        node.clone()
    } else {
        device.to_string()
    };
    let image = ins["image"].clone();
    let (filename, format) = match image.get("backing-image") {
        // An active external snapshot: the disk is named after its base image.
        Some(backing) => (
            backing["filename"].as_str().unwrap_or("").to_string(),
            ins["drv"].as_str().unwrap_or("").to_string(),
        ),
        None => (
            image["filename"]
                .as_str()
                .or(ins["file"].as_str())
                .unwrap_or("")
                .to_string(),
            ins["drv"].as_str().unwrap_or("").to_string(),
        ),
    };
    let filename = plain_filename(&filename)
        .ok_or_else(|| format!("{name}: cannot tell the image file from {filename:?}"))?;
    let virtual_size = image["virtual-size"]
        .as_u64()
        .ok_or_else(|| format!("{name}: no virtual size"))?;
    let specific = &image["format-specific"]["data"];
    let bitmaps = ins["dirty-bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| Bitmap {
            name: b["name"].as_str().unwrap_or("").to_string(),
            recording: b["recording"].as_bool().unwrap_or(true),
            persistent: b["persistent"].as_bool().unwrap_or(false),
            busy: b["busy"].as_bool().unwrap_or(false),
            inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
            count: b["count"].as_u64().unwrap_or(0),
        })
        .collect();
    Ok(Device {
        name,
        node,
        qdev: entry["qdev"]
            .as_str()
            .filter(|q| !q.is_empty())
            .map(str::to_string),
        format,
        filename,
        virtual_size,
        cluster_size: image["cluster-size"].as_u64(),
        compat: specific["compat"].as_str().map(str::to_string),
        lazy_refcounts: specific["lazy-refcounts"].as_bool().unwrap_or(false),
        read_only: ins["ro"].as_bool().unwrap_or(false),
        bitmaps,
        image,
    })
}

/// The file behind a `json:{...}` pseudo file name (rbd: the image name), or the name itself.
fn plain_filename(name: &str) -> Option<String> {
    let Some(json) = name.strip_prefix("json:") else {
        return Some(name.to_string());
    };
    let v: Value = serde_json::from_str(json).ok()?;
    fn find(v: &Value, depth: usize) -> Option<String> {
        if depth > 16 {
            return None;
        }
        let obj = v.as_object()?;
        if obj.get("driver").and_then(Value::as_str) == Some("rbd") {
            if let Some(image) = obj.get("image").and_then(Value::as_str) {
                return Some(image.to_string());
            }
        }
        if let Some(f) = obj.get("filename").and_then(Value::as_str) {
            return Some(f.to_string());
        }
        ["file", "next", "backing"]
            .iter()
            .find_map(|k| obj.get(*k).and_then(|c| find(c, depth + 1)))
    }
    find(&v, 0)
}

/// Which devices a command works on.
#[derive(Debug, Default, Clone)]
pub struct Selection {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Include raw-format disks (pflash is always included).
    pub include_raw: bool,
}

impl Selection {
    pub fn wants(&self, d: &Device) -> bool {
        self.left_out(d).is_none()
    }

    /// Why `d` is not backed up, in the original's log words (a raw disk's reason is worth a
    /// warning: it is data left out by default), or `None` when it is.
    pub fn left_out(&self, d: &Device) -> Option<(tracing::Level, String)> {
        let named = |list: &[String]| list.iter().any(|n| *n == d.name || *n == d.node);
        let what = format!("[{}:{}]", d.name, d.filename);
        if !self.include.is_empty() && !named(&self.include) {
            return Some((
                tracing::Level::INFO,
                format!("Device not in included disk list, ignoring: {what}"),
            ));
        }
        if named(&self.exclude) {
            return Some((
                tracing::Level::INFO,
                format!("Excluding device from backup: {what}"),
            ));
        }
        if d.is_raw() && !self.include_raw && !d.is_pflash() && !named(&self.include) {
            return Some((
                tracing::Level::WARN,
                format!("Excluding device with raw format from backup: {what}"),
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply() -> Value {
        json!([
            {"device": "pflash0", "qdev": "/machine/system.flash0",
             "inserted": {"node-name": "#block141", "drv": "raw", "ro": true,
                          "image": {"virtual-size": 65536, "filename": "/fw/code.fd", "format": "raw"}}},
            {"device": "", "qdev": "/machine/peripheral/vd0/virtio-backend",
             "inserted": {"node-name": "disk0", "drv": "qcow2", "file": "/vm/d0.qcow2",
                          "image": {"virtual-size": 67108864, "filename": "/vm/d0.qcow2", "cluster-size": 65536,
                                    "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "lazy-refcounts": true}}},
                          "dirty-bitmaps": [{"name": "qmpbackup-u", "recording": false, "persistent": true,
                                             "busy": false, "count": 3, "inconsistent": true}]}},
            {"device": "ide1-cd0", "qdev": "cd"},
            {"device": "drive-r", "qdev": "vd2",
             "inserted": {"node-name": "diskr", "drv": "raw",
                          "image": {"virtual-size": 1024, "filename": "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"file\",\"filename\":\"/vm/r.raw\"}}"}}}
        ])
    }

    #[test]
    fn parses_devices_and_selects() {
        let devs: Vec<Device> = parse_query_block(&reply())
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(devs.len(), 3);
        assert_eq!(
            (
                devs[0].name.as_str(),
                devs[0].is_pflash(),
                devs[0].basename().as_str()
            ),
            ("pflash0", true, "code.fd")
        );
        assert_eq!(
            (devs[1].name.as_str(), devs[1].node.as_str()),
            ("disk0", "disk0")
        );
        assert_eq!(devs[1].cluster_size, Some(65536));
        assert!(devs[1].lazy_refcounts);
        assert!(devs[1].bitmap("qmpbackup-u").unwrap().inconsistent);
        assert_eq!(devs[2].filename, "/vm/r.raw");
        let all = Selection::default();
        assert_eq!(
            devs.iter().filter(|d| all.wants(d)).count(),
            2,
            "raw left out, pflash kept"
        );
        let raw = Selection {
            include_raw: true,
            ..Default::default()
        };
        assert_eq!(devs.iter().filter(|d| raw.wants(d)).count(), 3);
        let only = Selection {
            include: vec!["diskr".into()],
            ..Default::default()
        };
        assert_eq!(
            devs.iter()
                .filter(|d| only.wants(d))
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>(),
            ["drive-r"]
        );
        let ex = Selection {
            exclude: vec!["disk0".into()],
            ..Default::default()
        };
        assert_eq!(devs.iter().filter(|d| ex.wants(d)).count(), 1);
    }
}
