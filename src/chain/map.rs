//! `qmprestore map`: where every guest byte comes from, in `qemu-img map`'s formats.

use crate::qcow2::{Disk, Extent, Result};
use std::io::Write;

/// Output forms of `map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapFormat {
    /// qemu-img's table: only data extents with a host offset, and the file holding them.
    Human,
    /// qemu-img's JSON array, one extent per line.
    Json,
}

/// Writes the map of the whole disk to `out`, streaming extent by extent.
pub fn write_map(disk: &Disk, format: MapFormat, out: &mut dyn Write) -> Result<()> {
    let io = |e: std::io::Error| crate::qcow2::ErrorKind::Io(e).at("<stdout>");
    let files: Vec<String> = disk
        .chain()
        .map(|d| match d.qcow2().and_then(|q| q.data_file()) {
            Some(df) => df.path.display().to_string(),
            None => d.path().display().to_string(),
        })
        .collect();
    let mut first = true;
    if format == MapFormat::Human {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )
        .map_err(io)?;
    }
    disk.for_each_extent(0, disk.size(), |e| {
        match format {
            MapFormat::Json => {
                let sep = if first { "[" } else { ",\n" };
                write!(out, "{sep}{}", json_line(&e)).map_err(io)?;
            }
            MapFormat::Human => {
                // Like qemu-img: data extents with a host offset (compressed ones have none).
                if let (true, false, Some(off)) = (e.data, e.zero, e.offset) {
                    writeln!(
                        out,
                        "{:<16}{:<16}{:<16}{}",
                        hex(e.start),
                        hex(e.length),
                        hex(off),
                        files[e.depth as usize]
                    )
                    .map_err(io)?;
                }
            }
        }
        first = false;
        Ok(())
    })?;
    if format == MapFormat::Json {
        writeln!(out, "{}]", if first { "[" } else { "" }).map_err(io)?;
    }
    Ok(())
}

/// C's `%#x`: no prefix for zero.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// One extent exactly as qemu-img prints it.
pub fn json_line(e: &Extent) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}
