//! The internal snapshot table.
//!
//! Entries are variable length (fixed part, extra data, id, name), each padded to 8 bytes.
//! QEMU's limits bound what a hostile table can make us allocate: 65536 entries, 64 MiB in
//! total, 1024 bytes of extra data per entry.

use super::be::be_struct;
use super::error::{corrupt, ErrorKind};
use super::storage::{read_exact, Storage};

pub const MAX_TABLE_BYTES: u64 = 64 << 20;
pub const MAX_EXTRA_DATA: u32 = 1024;

be_struct! {
    /// The fixed part of a snapshot table entry; extra data, id and name follow.
    pub struct Entry(40) {
        l1_table_offset: u64 = 0, l1_size: u32 = 8, id_len: u16 = 12,
        name_len: u16 = 14, date_sec: u32 = 16, date_nsec: u32 = 20,
        vm_clock_nsec: u64 = 24,
        /// The VM state size, cut to 32 bits (the extra data has all 64).
        vm_state_size_32: u32 = 32, extra_len: u32 = 36,
    }
}

be_struct! {
    /// The extra data this version knows (version 3 writes all of it; older entries may
    /// carry only a prefix).
    pub struct Extra(24) {
        vm_state_size: u64 = 0, disk_size: u64 = 8, icount: u64 = 16,
    }
}

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
    /// Why the reader refuses this snapshot's L1 table in a file of `file_len` bytes: on the
    /// header, or not wholly inside the file.
    pub fn l1_refusal(&self, file_len: u64) -> Option<String> {
        let end = self.l1_table_offset.checked_add(self.l1_size as u64 * 8);
        (self.l1_table_offset == 0 || end.is_none_or(|end| end > file_len)).then(|| {
            format!(
                "snapshot '{}': L1 table at {:#x} lies outside the file",
                self.name, self.l1_table_offset
            )
        })
    }

    /// Size of this entry on disk, padding included.
    pub fn encoded_len(&self) -> usize {
        (Entry::LEN + self.extra_len() + self.id.len() + self.name.len()).div_ceil(8) * 8
    }

    fn extra_len(&self) -> usize {
        Extra::LEN + self.extra_unknown.len()
    }

    /// Serialises the entry with full extra data (vm state size, disk size, icount).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.encoded_len()];
        Entry {
            l1_table_offset: self.l1_table_offset,
            l1_size: self.l1_size,
            id_len: self.id.len() as u16,
            name_len: self.name.len() as u16,
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            vm_state_size_32: self.vm_state_size.min(u32::MAX as u64) as u32,
            extra_len: self.extra_len() as u32,
        }
        .write(&mut b);
        Extra {
            vm_state_size: self.vm_state_size,
            disk_size: self.disk_size.unwrap_or_default(),
            icount: self.icount.unwrap_or(-1) as u64,
        }
        .write(&mut b[Entry::LEN..]);
        let mut p = Entry::LEN + Extra::LEN;
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

/// The table as written: every entry with full extra data, a disk size missing from an old
/// entry filled in with `disk_size` (the image's virtual size, as QEMU assumes on reading).
pub fn encode_table(snapshots: &[Snapshot], disk_size: u64) -> Vec<u8> {
    snapshots
        .iter()
        .flat_map(|s| {
            Snapshot {
                disk_size: s.disk_size.or(Some(disk_size)),
                ..s.clone()
            }
            .to_bytes()
        })
        .collect()
}

/// Where the table is and what bounds it: `count` entries from `offset`; `max_l1_entries`
/// bounds each snapshot's L1 table (QEMU's 32 MiB limit).
#[derive(Debug, Clone, Copy)]
pub struct TableAt {
    pub offset: u64,
    pub count: u32,
    pub cluster_size: u64,
    pub max_l1_entries: u64,
}

/// What was read of a snapshot table.
#[derive(Debug, Default)]
pub struct Table {
    pub snapshots: Vec<Snapshot>,
    /// Bytes of the table that were read, entries left out included.
    pub len: u64,
    /// The faults an open for `check` left out.
    pub problems: Vec<String>,
}

/// Reads the snapshot table; any fault is an error.
pub fn read_table(storage: &dyn Storage, at: TableAt) -> Result<Table, ErrorKind> {
    let mut t = Table::default();
    t.len = read_into(storage, at, &mut t.snapshots, &mut |problem| {
        Err(corrupt(problem))
    })?;
    Ok(t)
}

/// Reads the snapshot table as `check` needs it: every entry that can be read, and the
/// problems found (as QEMU's check does, an entry whose L1 table is unaligned or too large is
/// reported and left out; a table that cannot be read further ends there).
pub fn read_table_for_check(storage: &dyn Storage, at: TableAt) -> Table {
    let mut t = Table::default();
    let mut problems = Vec::new();
    match read_into(storage, at, &mut t.snapshots, &mut |problem| {
        problems.push(problem);
        Ok(())
    }) {
        Ok(len) => t.len = len,
        Err(e) => problems.push(e.to_string()),
    }
    t.problems = problems;
    t
}

/// Reads entries into `out` and returns the table's length; an entry with an unusable L1
/// table goes to `bad_l1`, which decides whether that ends the reading (its error) or only
/// leaves the entry out.
fn read_into(
    storage: &dyn Storage,
    at: TableAt,
    out: &mut Vec<Snapshot>,
    bad_l1: &mut dyn FnMut(String) -> Result<(), ErrorKind>,
) -> Result<u64, ErrorKind> {
    let TableAt {
        offset,
        count,
        cluster_size,
        max_l1_entries,
    } = at;
    let mut pos = offset;
    for i in 0..count {
        let mut fixed = [0u8; Entry::LEN];
        read_exact(storage, &mut fixed, pos, "snapshot table entry")?;
        let e = Entry::read(&fixed);
        let (l1_table_offset, l1_size, extra_len) = (e.l1_table_offset, e.l1_size, e.extra_len);
        let (id_len, name_len) = (e.id_len as usize, e.name_len as usize);
        if extra_len > MAX_EXTRA_DATA {
            return Err(corrupt(format!(
                "snapshot {i}: {extra_len} bytes of extra data (QEMU allows {MAX_EXTRA_DATA})"
            )));
        }
        let var_len = extra_len as usize + id_len + name_len;
        let entry_len = (Entry::LEN + var_len).div_ceil(8) as u64 * 8;
        if pos + entry_len - offset > MAX_TABLE_BYTES {
            return Err(corrupt("snapshot table exceeds QEMU's 64 MiB limit"));
        }
        let l1_problem = if l1_table_offset % cluster_size != 0 {
            Some(format!(
                "snapshot {i}: L1 table offset {l1_table_offset:#x} is not cluster aligned"
            ))
        } else if l1_size as u64 > max_l1_entries {
            Some(format!(
                "snapshot {i}: L1 table of {l1_size} entries exceeds QEMU's 32 MiB limit"
            ))
        } else {
            None
        };
        if let Some(problem) = l1_problem {
            bad_l1(problem)?;
            pos += entry_len;
            continue;
        }
        let mut var = vec![0u8; var_len];
        read_exact(
            storage,
            &mut var,
            pos + Entry::LEN as u64,
            "snapshot table entry",
        )?;
        let (extra, rest) = var.split_at(extra_len as usize);
        let (id, name) = rest.split_at(id_len);
        // Which fields of the known extra data the entry has: a prefix, maybe none.
        let mut known = [0u8; Extra::LEN];
        let have = extra.len().min(Extra::LEN);
        known[..have].copy_from_slice(&extra[..have]);
        let x = Extra::read(&known);
        let has = |end: usize| extra.len() >= end;
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            date_sec: e.date_sec,
            date_nsec: e.date_nsec,
            vm_clock_nsec: e.vm_clock_nsec,
            vm_state_size: if has(8) {
                x.vm_state_size
            } else {
                e.vm_state_size_32 as u64
            },
            disk_size: has(16).then_some(x.disk_size),
            icount: has(24).then_some(x.icount as i64),
            extra_unknown: extra.get(Extra::LEN..).unwrap_or_default().to_vec(),
        });
        pos += entry_len;
    }
    Ok(pos - offset)
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
        let got = read_table(&table, at(0x100, 2)).unwrap().snapshots;
        assert_eq!(got, vec![a, b]);
        assert_eq!(find(&got, "2").unwrap().name, "a-longer-name");
        assert_eq!(find(&got, "first").unwrap().id, "1");
    }

    fn at(offset: u64, count: u32) -> TableAt {
        TableAt {
            offset,
            count,
            cluster_size: 512,
            max_l1_entries: 1 << 22,
        }
    }

    #[test]
    fn truncated_table_is_an_error() {
        let bytes = snap("1", "x").to_bytes();
        let table = bytes[..bytes.len() - 8].to_vec();
        assert!(read_table(&table, at(0, 1)).is_err());
    }
}
