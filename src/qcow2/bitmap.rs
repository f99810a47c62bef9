//! The persistent dirty bitmap directory (read for `info`, and so writers know what exists).

use super::error::{corrupt, ErrorKind};
use super::ext::BitmapsExt;
use super::storage::{read_exact, Storage};
use byteorder::{BigEndian, ByteOrder};

pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const FIXED: usize = 24;

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

/// Reads and validates the bitmap directory the extension points to.
pub fn read_directory(
    storage: &dyn Storage,
    ext: &BitmapsExt,
    cluster_size: u64,
) -> Result<Vec<Bitmap>, ErrorKind> {
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
            .get(pos..pos + FIXED)
            .ok_or_else(|| corrupt(format!("bitmap directory too short for entry {i}")))?;
        let name_len = BigEndian::read_u16(&fixed[18..]) as usize;
        let extra_len = BigEndian::read_u32(&fixed[20..]) as usize;
        let gran = fixed[17];
        if name_len == 0 || name_len > 1023 {
            return Err(corrupt(format!("bitmap {i}: name length {name_len}")));
        }
        if !(9..=31).contains(&gran) {
            return Err(corrupt(format!("bitmap {i}: granularity bits {gran}")));
        }
        let name_start = pos + FIXED + extra_len;
        let name = dir
            .get(name_start..name_start + name_len)
            .ok_or_else(|| corrupt(format!("bitmap {i} overruns the bitmap directory")))?;
        out.push(Bitmap {
            table_offset: BigEndian::read_u64(fixed),
            table_size: BigEndian::read_u32(&fixed[8..]),
            flags: BigEndian::read_u32(&fixed[12..]),
            kind: fixed[16],
            granularity_bits: gran,
            name: String::from_utf8_lossy(name).into_owned(),
        });
        pos = (name_start + name_len).div_ceil(8) * 8;
    }
    Ok(out)
}
