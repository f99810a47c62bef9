//! Key slots: unlocking the master key with a passphrase, and making a slot for a new one.
//!
//! A slot holds the master key split by the anti-forensic splitter into 4000 stripes (so
//! erasing a small part of it destroys the key), encrypted with a key PBKDF2 derives from
//! the passphrase. The master key is right when PBKDF2 of it matches the header's digest.

use super::luks::{Header, KeySlot, DIGEST_LEN, SALT_LEN, STRIPES};
use zeroize::Zeroizing;

/// A secret held in memory that is wiped when dropped.
pub type Secret = Zeroizing<Vec<u8>>;

/// Reads `buf.len()` bytes of the LUKS area at `offset` (from the start of the header).
pub type ReadArea<'a> = &'a dyn Fn(u64, &mut [u8]) -> std::io::Result<()>;

/// Why no slot opened.
#[derive(Debug, thiserror::Error)]
pub enum UnlockError {
    #[error("invalid passphrase: it unlocks no active key slot")]
    NoSlot,
    #[error("cannot read key slot {slot}: {err}")]
    Io { slot: usize, err: std::io::Error },
}

/// The master key `passphrase` opens, trying the active slots in order, and the slot.
pub fn unlock(
    h: &Header,
    passphrase: &[u8],
    read: ReadArea,
) -> Result<(Secret, usize), UnlockError> {
    for (i, slot) in h.slots.iter().enumerate().filter(|(_, s)| s.active) {
        let mut material = Secret::new(vec![0u8; h.material_len() as usize]);
        read(slot.key_offset as u64 * 512, &mut material)
            .map_err(|err| UnlockError::Io { slot: i, err })?;
        let key = open_slot(h, slot, passphrase, &mut material);
        if digest_matches(h, &key) {
            return Ok((key, i));
        }
    }
    Err(UnlockError::NoSlot)
}

/// The candidate master key from one slot's material (decrypted in place).
fn open_slot(h: &Header, slot: &KeySlot, passphrase: &[u8], material: &mut [u8]) -> Secret {
    let mut slot_key = Secret::new(vec![0u8; h.key_bytes as usize]);
    h.hash
        .pbkdf2(passphrase, &slot.salt, slot.iterations, &mut slot_key);
    h.spec.keyed(&slot_key).decrypt(material, 0);
    af_merge(h, material)
}

fn digest_matches(h: &Header, key: &[u8]) -> bool {
    let mut d = [0u8; DIGEST_LEN];
    h.hash.pbkdf2(key, &h.mk_salt, h.mk_iterations, &mut d);
    d == h.mk_digest
}

/// Merges the stripes of `material` back into the key.
fn af_merge(h: &Header, material: &[u8]) -> Secret {
    let n = h.key_bytes as usize;
    let mut d = Secret::new(vec![0u8; n]);
    let stripes: Vec<&[u8]> = material.chunks(n).collect();
    let (last, rest) = stripes.split_last().expect("4000 stripes");
    for s in rest {
        xor(&mut d, s);
        h.hash.diffuse(&mut d);
    }
    xor(&mut d, last);
    d
}

fn xor(d: &mut [u8], s: &[u8]) {
    d.iter_mut().zip(s).for_each(|(a, b)| *a ^= b);
}

/// Fills `buf` with random bytes from the operating system.
pub fn random(buf: &mut [u8]) -> std::io::Result<()> {
    getrandom::fill(buf).map_err(|e| std::io::Error::other(format!("no random bytes: {e}")))
}

/// Sets the master key digest of a new header for `key`, with `iterations`.
pub fn set_digest(h: &mut Header, key: &[u8], iterations: u32) {
    h.mk_iterations = iterations;
    let mut d = [0u8; DIGEST_LEN];
    h.hash.pbkdf2(key, &h.mk_salt, iterations, &mut d);
    h.mk_digest = d;
}

/// Makes slot `i` open `key` with `passphrase`: returns the encrypted key material to write
/// at the slot's offset; the header's slot is filled in (active).
pub fn make_slot(
    h: &mut Header,
    i: usize,
    key: &[u8],
    passphrase: &[u8],
    iterations: u32,
) -> std::io::Result<Secret> {
    let n = h.key_bytes as usize;
    let mut salt = [0u8; SALT_LEN];
    random(&mut salt)?;
    let mut material = Secret::new(vec![0u8; n * STRIPES as usize]);
    random(&mut material[..n * (STRIPES as usize - 1)])?;
    let mut d = Secret::new(vec![0u8; n]);
    for s in material[..n * (STRIPES as usize - 1)].chunks(n) {
        xor(&mut d, s);
        h.hash.diffuse(&mut d);
    }
    let last = &mut material[n * (STRIPES as usize - 1)..];
    last.copy_from_slice(&d);
    xor(last, key);
    let mut slot_key = Secret::new(vec![0u8; n]);
    h.hash.pbkdf2(passphrase, &salt, iterations, &mut slot_key);
    h.spec.keyed(&slot_key).encrypt(&mut material, 0);
    let slot = &mut h.slots[i];
    slot.active = true;
    slot.iterations = iterations;
    slot.salt = salt;
    Ok(material)
}

/// PBKDF2 iterations that take about `millis` of one core with the header's hash (at least
/// 1000, as QEMU requires; at most the cap readers accept).
pub fn iterations_for(h: &Header, millis: u64) -> u32 {
    let probe = 1 << 14;
    let mut out = [0u8; 32];
    let t = std::time::Instant::now();
    h.hash
        .pbkdf2(b"benchmark", &[0u8; SALT_LEN], probe, &mut out);
    let per_ms = probe as f64 / t.elapsed().as_secs_f64().max(1e-6) / 1000.0;
    (per_ms * millis as f64).clamp(1000.0, super::luks::MAX_ITERATIONS as f64) as u32
}

#[cfg(test)]
mod tests {
    use super::super::cipher::Spec;
    use super::super::hash::HashAlg;
    use super::*;

    #[test]
    fn a_made_slot_unlocks_and_only_with_its_passphrase() {
        let spec = Spec::parse("aes", "xts-plain64", 64).unwrap();
        let mut h = Header::new(spec, HashAlg::Sha1, [9; 32], "uuid".into());
        let key = vec![0x5au8; 64];
        set_digest(&mut h, &key, 1000);
        let material = make_slot(&mut h, 2, &key, b"pw\n", 1000).unwrap();
        let at = h.slots[2].key_offset as u64 * 512;
        let read = |off: u64, buf: &mut [u8]| {
            assert_eq!(off, at);
            buf.copy_from_slice(&material[..buf.len()]);
            Ok(())
        };
        let (got, slot) = unlock(&h, b"pw\n", &read).unwrap();
        assert_eq!((&got[..], slot), (&key[..], 2));
        assert!(matches!(unlock(&h, b"pw", &read), Err(UnlockError::NoSlot)));
    }
}
