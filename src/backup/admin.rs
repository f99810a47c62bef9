//! `qmpbackup info` and `qmpbackup cleanup`: look at the VM's disks and bitmaps, and remove
//! the bitmaps of backup chains that are no longer wanted.

use super::device::{parse_query_block, Device};
use super::error::{BackupError, Result};
use crate::qmp::Qmp;
use serde_json::{json, Value};

/// Every disk with a medium, raw ones included, with its `query-block` record.
pub fn devices(qmp: &mut Qmp) -> Result<Vec<(Device, Value)>> {
    let reply = qmp.execute("query-block", json!({}))?;
    let records: Vec<Value> = reply
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e.get("inserted").is_some())
        .cloned()
        .collect();
    let out: Vec<(Device, Value)> = parse_query_block(&reply)
        .into_iter()
        .zip(records)
        .filter_map(|(d, r)| d.ok().map(|d| (d, r)))
        .collect();
    if out.is_empty() {
        return Err(BackupError::Refused(
            "VM has no block devices with a medium".into(),
        ));
    }
    Ok(out)
}

/// Removes the bitmaps qmpbackup created (names containing `qmpbackup`, as the original); with `uuid`, only
/// those of that chain. Logs each in the original's words; returns (device, bitmap) of each
/// one removed.
pub fn remove_bitmaps(qmp: &mut Qmp, uuid: Option<&str>) -> Result<Vec<(String, String)>> {
    match uuid {
        Some(u) => tracing::info!("Removing bitmaps matching uuid [{u}]"),
        None => tracing::info!("Removing all existent bitmaps."),
    }
    let mut removed = Vec::new();
    for (dev, _) in devices(qmp)? {
        if dev.bitmaps.is_empty() {
            tracing::info!("No bitmap set for device {}", dev.node);
            continue;
        }
        for b in &dev.bitmaps {
            let ours = b.name.contains("qmpbackup");
            if !ours || uuid.is_some_and(|u| !b.name.ends_with(u)) {
                continue;
            }
            tracing::info!("Removing bitmap: {}", b.name);
            qmp.execute(
                "block-dirty-bitmap-remove",
                json!({"node": dev.node, "name": b.name}),
            )?;
            removed.push((dev.name.clone(), b.name.clone()));
        }
    }
    Ok(removed)
}

/// The original's record of a device (its `BlockDev`), from the `query-block` entry: what
/// `info --show blockdev` prints for each device.
pub fn original_record(dev: &Device, entry: &Value) -> Value {
    let ins = &entry["inserted"];
    let backing = ins["image"].get("backing-image").cloned();
    let format = match &backing {
        Some(b) => b["format"].clone(),
        None => ins["image"]["format"].clone(),
    };
    let bitmaps = ins
        .get("dirty-bitmaps")
        .cloned()
        .unwrap_or_else(|| json!([]));
    let path = std::path::Path::new(&dev.filename)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A `json:` file name names its protocol driver (rbd, ...); plain files have none.
    let driver = ins["image"]["filename"]
        .as_str()
        .and_then(|f| f.strip_prefix("json:"))
        .and_then(|j| serde_json::from_str::<Value>(j).ok())
        .map(|j| j["file"]["driver"].clone())
        .unwrap_or(Value::Null);
    json!({
        "device": dev.name,
        "format": format,
        "filename": dev.filename,
        "backing_image": backing.unwrap_or(Value::Bool(false)),
        "has_bitmap": !dev.bitmaps.is_empty(),
        "bitmaps": bitmaps,
        "virtual_size": dev.virtual_size,
        "driver": driver,
        "node": dev.node,
        "node_safe": dev.node.replace('#', ""),
        "path": path,
        "qdev": entry.get("qdev").cloned().unwrap_or(Value::Null),
        "child_device": Value::Null,
    })
}

/// JSON as the original prints it (Python's `json.dumps(v, indent=4, sort_keys=True)`):
/// four-space indent, sorted keys, non-ASCII escaped as `\uXXXX`.
pub fn python_json(v: &Value) -> String {
    let mut out = String::new();
    write_python(v, 0, &mut out);
    out
}

fn write_python(v: &Value, depth: usize, out: &mut String) {
    let indent = |out: &mut String, d: usize| {
        out.push('\n');
        out.push_str(&"    ".repeat(d));
    };
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                write_python(x, depth + 1, out);
            }
            indent(out, depth);
            out.push(']');
        }
        Value::Object(m) if !m.is_empty() => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                write_python_str(k, out);
                out.push_str(": ");
                write_python(&m[k], depth + 1, out);
            }
            indent(out, depth);
            out.push('}');
        }
        Value::Array(_) => out.push_str("[]"),
        Value::Object(_) => out.push_str("{}"),
        Value::String(s) => write_python_str(s, out),
        other => out.push_str(&other.to_string()),
    }
}

fn write_python_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e && c != '\u{7f}' => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_printed_as_python_prints_it() {
        // json.dumps({"b": [1, {"z": None, "a": "é\"\n\U0001F600"}], "a": [], "c": {}, "d": True},
        //            indent=4, sort_keys=True)
        let v = json!({"b": [1, {"z": null, "a": "é\"\n\u{1F600}"}], "a": [], "c": {}, "d": true});
        assert_eq!(
            python_json(&v),
            "{\n    \"a\": [],\n    \"b\": [\n        1,\n        {\n            \"a\": \"\\u00e9\\\"\\n\\ud83d\\ude00\",\n            \"z\": null\n        }\n    ],\n    \"c\": {},\n    \"d\": true\n}"
        );
    }
}
