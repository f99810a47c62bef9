//! The internal snapshot table.
//!
//! Entries are variable length (fixed part, extra data, id, name), each padded to 8 bytes.
//! QEMU's limits bound what a hostile table can make us allocate: 65536 entries, 64 MiB in
//! total, 1024 bytes of extra data per entry.

use super::error::{corrupt, ErrorKind};
use super::storage::{read_exact, Storage};
use byteorder::{BigEndian, ByteOrder};

pub const MAX_TABLE_BYTES: u64 = 64 << 20;
pub const MAX_EXTRA_DATA: u32 = 1024;
const FIXED: usize = 40;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    /// VM state size (the 64-bit extra field when present, else the 32-bit one).
    pub vm_state_size: u64,
    /// Virtual disk size at the time of the snapshot, when recorded.
    pub disk_size: Option<u64>,
    /// Instruction count, when recorded (-1 = icount disabled).
    pub icount: Option<i64>,
    /// Extra data beyond the fields above, preserved verbatim.
    pub extra_unknown: Vec<u8>,
}

impl Snapshot {
    /// Size of this entry on disk, padding included.
    pub fn encoded_len(&self) -> usize {
        (FIXED + self.extra_len() + self.id.len() + self.name.len()).div_ceil(8) * 8
    }

    fn extra_len(&self) -> usize {
        24 + self.extra_unknown.len()
    }

    /// Serialises the entry with full extra data (vm state size, disk size, icount).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.encoded_len()];
        BigEndian::write_u64(&mut b[0..], self.l1_table_offset);
        BigEndian::write_u32(&mut b[8..], self.l1_size);
        BigEndian::write_u16(&mut b[12..], self.id.len() as u16);
        BigEndian::write_u16(&mut b[14..], self.name.len() as u16);
        BigEndian::write_u32(&mut b[16..], self.date_sec);
        BigEndian::write_u32(&mut b[20..], self.date_nsec);
        BigEndian::write_u64(&mut b[24..], self.vm_clock_nsec);
        BigEndian::write_u32(&mut b[32..], self.vm_state_size.min(u32::MAX as u64) as u32);
        BigEndian::write_u32(&mut b[36..], self.extra_len() as u32);
        BigEndian::write_u64(&mut b[40..], self.vm_state_size);
        BigEndian::write_u64(&mut b[48..], self.disk_size.unwrap_or(0));
        BigEndian::write_u64(&mut b[56..], self.icount.unwrap_or(-1) as u64);
        let mut p = 64;
        for part in [
            &self.extra_unknown[..],
            self.id.as_bytes(),
            self.name.as_bytes(),
        ] {
            b[p..p + part.len()].copy_from_slice(part);
            p += part.len();
        }
        b
    }
}

/// Reads `count` snapshot entries starting at `offset`. `max_l1_entries` bounds each
/// snapshot's L1 table (QEMU's 32 MiB limit).
pub fn read_table(
    storage: &dyn Storage,
    offset: u64,
    count: u32,
    cluster_size: u64,
    max_l1_entries: u64,
) -> Result<Vec<Snapshot>, ErrorKind> {
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut pos = offset;
    for i in 0..count {
        let mut fixed = [0u8; FIXED];
        read_exact(storage, &mut fixed, pos, "snapshot table entry")?;
        let l1_table_offset = BigEndian::read_u64(&fixed[0..]);
        let l1_size = BigEndian::read_u32(&fixed[8..]);
        let id_len = BigEndian::read_u16(&fixed[12..]) as usize;
        let name_len = BigEndian::read_u16(&fixed[14..]) as usize;
        let extra_len = BigEndian::read_u32(&fixed[36..]);
        if extra_len > MAX_EXTRA_DATA {
            return Err(corrupt(format!(
                "snapshot {i}: {extra_len} bytes of extra data (QEMU allows {MAX_EXTRA_DATA})"
            )));
        }
        if l1_table_offset % cluster_size != 0 {
            return Err(corrupt(format!(
                "snapshot {i}: L1 table offset {l1_table_offset:#x} is not cluster aligned"
            )));
        }
        if l1_size as u64 > max_l1_entries {
            return Err(corrupt(format!(
                "snapshot {i}: L1 table of {l1_size} entries exceeds QEMU's 32 MiB limit"
            )));
        }
        let var_len = extra_len as usize + id_len + name_len;
        let entry_len = (FIXED + var_len).div_ceil(8) as u64 * 8;
        if pos + entry_len - offset > MAX_TABLE_BYTES {
            return Err(corrupt("snapshot table exceeds QEMU's 64 MiB limit"));
        }
        let mut var = vec![0u8; var_len];
        read_exact(
            storage,
            &mut var,
            pos + FIXED as u64,
            "snapshot table entry",
        )?;
        let (extra, rest) = var.split_at(extra_len as usize);
        let (id, name) = rest.split_at(id_len);
        let field = |o: usize| (extra.len() >= o + 8).then(|| BigEndian::read_u64(&extra[o..]));
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            date_sec: BigEndian::read_u32(&fixed[16..]),
            date_nsec: BigEndian::read_u32(&fixed[20..]),
            vm_clock_nsec: BigEndian::read_u64(&fixed[24..]),
            vm_state_size: field(0).unwrap_or(BigEndian::read_u32(&fixed[32..]) as u64),
            disk_size: field(8),
            icount: field(16).map(|v| v as i64),
            extra_unknown: extra.get(24..).unwrap_or_default().to_vec(),
        });
        pos += entry_len;
    }
    Ok(out)
}

/// Finds a snapshot by id first, then by name, as `qemu-img convert -l` does.
pub fn find<'a>(snapshots: &'a [Snapshot], key: &str) -> Option<&'a Snapshot> {
    snapshots
        .iter()
        .find(|s| s.id == key)
        .or_else(|| snapshots.iter().find(|s| s.name == key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, name: &str) -> Snapshot {
        Snapshot {
            l1_table_offset: 0x50000,
            l1_size: 1,
            id: id.into(),
            name: name.into(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 7,
            vm_state_size: 0,
            disk_size: Some(1 << 20),
            icount: Some(0),
            extra_unknown: Vec::new(),
        }
    }

    #[test]
    fn round_trip_two_entries() {
        let a = snap("1", "first");
        let b = snap("2", "a-longer-name");
        let mut table = vec![0u8; 0x1000];
        let bytes: Vec<u8> = [a.to_bytes(), b.to_bytes()].concat();
        table[0x100..0x100 + bytes.len()].copy_from_slice(&bytes);
        let got = read_table(&table, 0x100, 2, 512, 1 << 22).unwrap();
        assert_eq!(got, vec![a, b]);
        assert_eq!(find(&got, "2").unwrap().name, "a-longer-name");
        assert_eq!(find(&got, "first").unwrap().id, "1");
    }

    #[test]
    fn truncated_table_is_an_error() {
        let bytes = snap("1", "x").to_bytes();
        let table = bytes[..bytes.len() - 8].to_vec();
        assert!(read_table(&table, 0, 1, 512, 1 << 22).is_err());
    }
}
