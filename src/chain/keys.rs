//! `qmprestore key add|remove`: the key slots of a LUKS-encrypted qcow2 image (what
//! `qemu-img amend -o encrypt.state=...` does), so a passphrase can be rotated without
//! rewriting any data: the master key stays, only a slot's copy of it changes.
//!
//! Order on disk, so a crash leaves either the old or the new set of working slots: adding
//! writes the new key material into an unused slot area and syncs before the header marks
//! the slot active; removing marks the slot inactive and syncs before its material is
//! overwritten with random bytes. The last slot that opens the image is never removed.

use crate::qcow2::crypto::keyslot::{self, Secret};
use crate::qcow2::crypto::luks::{self, Header};
use crate::qcow2::fault::pwrite;
use crate::qcow2::storage::read_exact;
use crate::qcow2::{ErrorKind, Qcow2, Result};
use std::fs::File;
use std::path::Path;

/// The opened image: its LUKS header, where it lies, the file (write-locked), the master key.
struct Slots {
    header: Header,
    area: u64,
    file: File,
    key: Secret,
    _ours: crate::qcow2::lock::Ours,
}

fn open(path: &Path) -> Result<Slots> {
    let at = |m: String| ErrorKind::Encryption(m).at(path);
    if let Ok((place, name)) = crate::store::place::of_file(path) {
        if crate::store::manifest::exists(&*place, &name) {
            return Err(ErrorKind::Unsupported(
                "a backup file with a manifest: changing its key slots would make verify report it damaged"
                    .into(),
            )
            .at(path));
        }
    }
    let q = Qcow2::open(path)?;
    let e = q
        .encryption()
        .ok_or_else(|| at("the image is not encrypted".into()))?;
    let (Some(header), Some((area, _))) = (e.luks.clone(), e.area) else {
        return Err(at("legacy AES images have no key slots".into()));
    };
    e.crypt().map_err(at)?;
    let key = e
        .master_key()
        .expect("an unlocked LUKS image keeps its master key")
        .clone();
    let (file, ours) = crate::qcow2::lock::open_for_write(path).map_err(|k| k.at(path))?;
    Ok(Slots {
        header,
        area,
        file,
        key,
        _ours: ours,
    })
}

impl Slots {
    fn write(&self, bytes: &[u8], at: u64, path: &Path) -> Result<()> {
        pwrite(&self.file, bytes, self.area + at)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| ErrorKind::Io(e).at(path))
    }

    fn slot_at(&self, i: usize) -> u64 {
        self.header.slots[i].key_offset as u64 * 512
    }

    /// Whether `passphrase` opens slot `i`.
    fn opens(&self, i: usize, passphrase: &[u8]) -> bool {
        let mut one = self.header.clone();
        for (j, s) in one.slots.iter_mut().enumerate() {
            s.active &= j == i;
        }
        let read =
            |at: u64, buf: &mut [u8]| read_exact(&self.file, buf, self.area + at, "key slot");
        keyslot::unlock(&one, passphrase, &read).is_ok()
    }
}

/// Adds a key slot that `passphrase` opens, with PBKDF2 iterations for `iter_time_ms`;
/// returns its number.
pub fn add(path: &Path, passphrase: &[u8], iter_time_ms: u64) -> Result<usize> {
    let mut s = open(path)?;
    let i = s
        .header
        .slots
        .iter()
        .position(|slot| !slot.active)
        .ok_or_else(|| ErrorKind::Encryption("all 8 key slots are in use".into()).at(path))?;
    let iterations = keyslot::iterations_for(&s.header, iter_time_ms);
    let mut header = s.header.clone();
    let material = keyslot::make_slot(&mut header, i, &s.key, passphrase, iterations)
        .map_err(|e| ErrorKind::Io(e).at(path))?;
    s.write(&material, s.slot_at(i), path)?;
    s.write(&header.to_bytes(), 0, path)?;
    s.header = header;
    Ok(i)
}

/// Removes every key slot `passphrase` opens; refuses when no other slot would remain.
/// Returns the slots removed.
pub fn remove(path: &Path, passphrase: &[u8]) -> Result<Vec<usize>> {
    let mut s = open(path)?;
    let active: Vec<usize> = (0..luks::SLOTS)
        .filter(|&i| s.header.slots[i].active)
        .collect();
    let gone: Vec<usize> = active
        .iter()
        .copied()
        .filter(|&i| s.opens(i, passphrase))
        .collect();
    if gone.is_empty() {
        return Err(ErrorKind::Encryption("that passphrase opens no key slot".into()).at(path));
    }
    if gone.len() == active.len() {
        return Err(ErrorKind::Encryption(
            "that passphrase opens every active key slot: removing them would lock the image for good"
                .into(),
        )
        .at(path));
    }
    for &i in &gone {
        s.header.slots[i].active = false;
        s.header.slots[i].iterations = 0;
        s.header.slots[i].salt = [0; luks::SALT_LEN];
    }
    s.write(&s.header.to_bytes(), 0, path)?;
    for &i in &gone {
        let mut noise = vec![0u8; s.header.material_len() as usize];
        keyslot::random(&mut noise).map_err(|e| ErrorKind::Io(e).at(path))?;
        s.write(&noise, s.slot_at(i), path)?;
    }
    Ok(gone)
}
