//! The persistent dirty bitmap directory (read for `info`, and so writers know what exists).

use super::be::be_struct;
use super::error::{corrupt, ErrorKind};
use super::ext::BitmapsExt;
use super::storage::{read_exact, Storage};

pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;

be_struct! {
    /// The fixed part of a bitmap directory entry; extra data and the name follow.
    pub struct Entry(24) {
        table_offset: u64 = 0, table_size: u32 = 8, flags: u32 = 12,
        kind: u8 = 16, granularity_bits: u8 = 17, name_len: u16 = 18,
        extra_len: u32 = 20,
    }
}

impl Entry {
    /// Bytes of the whole entry, padding included.
    pub fn encoded_len(&self) -> u64 {
        (Entry::LEN as u64 + self.extra_len as u64 + self.name_len as u64).div_ceil(8) * 8
    }
}

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    pub name: String,
}

impl Bitmap {
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// Flag names as `qemu-img info` prints them.
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.flags & FLAG_IN_USE != 0 {
            v.push("in-use");
        }
        if self.flags & FLAG_AUTO != 0 {
            v.push("auto");
        }
        v
    }
}

/// QEMU's limit on a bitmap table's entries.
const MAX_TABLE_ENTRIES: u32 = 0x800_0000;

/// The checks QEMU makes of each directory entry before it loads a bitmap (and refuses the
/// image when one fails): a table that exists, is cluster aligned, not larger than the
/// bitmap of a disk of `disk_size` bytes needs, and lies inside the file; known flags and type.
fn validate_entry(
    i: u32,
    e: &Entry,
    cluster_size: u64,
    disk_size: u64,
    file_len: u64,
) -> Result<(), ErrorKind> {
    let bad = |what: String| Err(corrupt(format!("bitmap {i}: {what}")));
    if e.table_size == 0 || e.table_size > MAX_TABLE_ENTRIES {
        return bad(format!("table of {} entries", e.table_size));
    }
    if e.table_offset == 0 || e.table_offset % cluster_size != 0 {
        return bad(format!(
            "table offset {:#x} is not a cluster-aligned offset past the header",
            e.table_offset
        ));
    }
    if e.flags & !(FLAG_IN_USE | FLAG_AUTO) != 0 {
        return bad(format!("reserved flags set ({:#x})", e.flags));
    }
    if e.kind != 1 {
        return bad(format!(
            "type {} (only dirty tracking bitmaps exist)",
            e.kind
        ));
    }
    let bits = disk_size.div_ceil(1 << e.granularity_bits.min(63));
    let needed = bits.div_ceil(8).div_ceil(cluster_size);
    if e.table_size as u64 > needed.max(1) {
        return bad(format!(
            "table of {} entries, more than a {disk_size}-byte disk needs",
            e.table_size
        ));
    }
    if e.table_offset.saturating_add(e.table_size as u64 * 8) > file_len {
        return bad(format!(
            "table at {:#x} extends past the end of the file",
            e.table_offset
        ));
    }
    Ok(())
}

/// Reads and validates the bitmap directory the extension points to, for a disk of
/// `disk_size` bytes.
pub fn read_directory(
    storage: &dyn Storage,
    ext: &BitmapsExt,
    cluster_size: u64,
    disk_size: u64,
) -> Result<Vec<Bitmap>, ErrorKind> {
    let file_len = storage.size()?;
    if ext.directory_offset % cluster_size != 0 {
        return Err(corrupt(format!(
            "bitmap directory offset {:#x} is not cluster aligned",
            ext.directory_offset
        )));
    }
    let mut dir = vec![0u8; ext.directory_size as usize];
    read_exact(storage, &mut dir, ext.directory_offset, "bitmap directory")?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    for i in 0..ext.nb_bitmaps {
        let fixed = dir
            .get(pos..pos + Entry::LEN)
            .ok_or_else(|| corrupt(format!("bitmap directory too short for entry {i}")))?;
        let e = Entry::read(fixed);
        let (name_len, extra_len) = (e.name_len as usize, e.extra_len as usize);
        let gran = e.granularity_bits;
        if name_len == 0 || name_len > 1023 {
            return Err(corrupt(format!("bitmap {i}: name length {name_len}")));
        }
        if !(9..=31).contains(&gran) {
            return Err(corrupt(format!("bitmap {i}: granularity bits {gran}")));
        }
        validate_entry(i, &e, cluster_size, disk_size, file_len)?;
        let name_start = pos + Entry::LEN + extra_len;
        let name = dir
            .get(name_start..name_start + name_len)
            .ok_or_else(|| corrupt(format!("bitmap {i} overruns the bitmap directory")))?;
        out.push(Bitmap {
            table_offset: e.table_offset,
            table_size: e.table_size,
            flags: e.flags,
            kind: e.kind,
            granularity_bits: gran,
            name: String::from_utf8_lossy(name).into_owned(),
        });
        pos += e.encoded_len() as usize;
    }
    Ok(out)
}
