//! The LUKS v1 header (592 bytes, big-endian), as QEMU writes it at the start of a raw LUKS
//! volume or in the clusters a qcow2 image's crypto header extension points to.
//!
//! Parsing validates what QEMU 10 validates on open (magic, version, stripes, slots that
//! overlap each other or the payload, a known cipher and hash), and more: key slots whose
//! PBKDF2 iteration count is above [`MAX_ITERATIONS`] are refused, since a hostile header
//! could otherwise keep an open busy for hours.

use super::cipher::{Spec, SECTOR};
use super::hash::HashAlg;

pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// Bytes of the header proper.
pub const LEN: usize = 592;
pub const SLOTS: usize = 8;
/// Anti-forensic stripes of every key slot (QEMU neither writes nor accepts another count).
pub const STRIPES: u32 = 4000;
pub const SLOT_ACTIVE: u32 = 0x00AC_71F3;
pub const SLOT_INACTIVE: u32 = 0x0000_DEAD;
/// Length of the master key digest, whatever the hash.
pub const DIGEST_LEN: usize = 20;
pub const SALT_LEN: usize = 32;
/// Alignment of key material areas and the payload.
pub const ALIGN: u64 = 4096;

/// The largest PBKDF2 iteration count a key slot or the master key digest may claim: about
/// 15 s of one core per slot at the 4.5 million SHA-256 iterations per second a 2026 server
/// core does (QEMU's default of 2 s of iterations stays far below it on any host).
pub const MAX_ITERATIONS: u32 = 1 << 26;

/// One key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    /// Where its key material starts, in sectors from the start of the LUKS header.
    pub key_offset: u32,
    pub stripes: u32,
}

/// A parsed LUKS v1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub cipher_name: String,
    pub cipher_mode: String,
    pub hash_spec: String,
    /// Where data starts, in sectors from the start of the header.
    pub payload_offset: u32,
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_salt: [u8; SALT_LEN],
    pub mk_iterations: u32,
    pub uuid: String,
    pub slots: Vec<KeySlot>,
    /// The cipher the name, mode and key size make.
    pub spec: Spec,
    pub hash: HashAlg,
}

/// Refuses a key size whose key material (`key_bytes` × 4000 stripes) is not whole sectors:
/// the slot cipher works sector by sector (QEMU aborts making such a slot).
pub fn check_key_bytes(key_bytes: u32) -> Result<(), String> {
    if (key_bytes as u64 * STRIPES as u64) % SECTOR as u64 != 0 {
        return Err(format!(
            "{key_bytes}-byte keys make key material that is not whole sectors"
        ));
    }
    Ok(())
}

fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn put_text(out: &mut [u8], s: &str) {
    out[..s.len()].copy_from_slice(s.as_bytes());
}

impl Header {
    /// Parses and validates a header; errors say what is wrong, for the caller to name the
    /// file.
    pub fn parse(b: &[u8]) -> Result<Header, String> {
        if b.len() < LEN {
            return Err("the LUKS header is truncated".into());
        }
        if &b[..6] != MAGIC {
            return Err("no LUKS header where the image says it is (bad magic)".into());
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(format!("LUKS version {version} is not supported"));
        }
        let cipher_name = text(&b[8..40]);
        let cipher_mode = text(&b[40..72]);
        let hash_spec = text(&b[72..104]);
        let key_bytes = be32(b, 108);
        if key_bytes == 0 || key_bytes > 64 {
            return Err(format!(
                "LUKS key size of {key_bytes} bytes is not supported"
            ));
        }
        let spec = Spec::parse(&cipher_name, &cipher_mode, key_bytes as usize)?;
        let hash = HashAlg::parse(&hash_spec)
            .ok_or_else(|| format!("LUKS hash '{hash_spec}' is not supported"))?;
        let mut h = Header {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset: be32(b, 104),
            key_bytes,
            mk_digest: b[112..132].try_into().expect("20 bytes"),
            mk_salt: b[132..164].try_into().expect("32 bytes"),
            mk_iterations: be32(b, 164),
            uuid: text(&b[168..208]),
            slots: Vec::with_capacity(SLOTS),
            spec,
            hash,
        };
        for i in 0..SLOTS {
            let s = &b[208 + i * 48..208 + (i + 1) * 48];
            let state = be32(s, 0);
            let active = match state {
                SLOT_ACTIVE => true,
                SLOT_INACTIVE => false,
                other => return Err(format!("key slot {i} has an invalid state {other:#x}")),
            };
            h.slots.push(KeySlot {
                active,
                iterations: be32(s, 4),
                salt: s[8..40].try_into().expect("32 bytes"),
                key_offset: be32(s, 40),
                stripes: be32(s, 44),
            });
        }
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> Result<(), String> {
        if self.mk_iterations == 0 || self.mk_iterations > MAX_ITERATIONS {
            return Err(format!(
                "the master key digest claims {} PBKDF2 iterations (allowed: 1 to {MAX_ITERATIONS})",
                self.mk_iterations
            ));
        }
        check_key_bytes(self.key_bytes)?;
        let header_sectors = ALIGN / SECTOR as u64;
        let mut areas = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            if s.stripes != STRIPES {
                return Err(format!(
                    "key slot {i} is corrupted (stripes {} != {STRIPES})",
                    s.stripes
                ));
            }
            if s.active && (s.iterations == 0 || s.iterations > MAX_ITERATIONS) {
                return Err(format!(
                    "key slot {i} claims {} PBKDF2 iterations (allowed: 1 to {MAX_ITERATIONS})",
                    s.iterations
                ));
            }
            let start = s.key_offset as u64;
            let end = start + self.material_len().div_ceil(SECTOR as u64);
            if start < header_sectors {
                return Err(format!("key slot {i}'s key material overlaps the header"));
            }
            if end > self.payload_offset as u64 {
                return Err(format!(
                    "key slot {i}'s key material overlaps the payload (sectors {start}..{end}, payload at {})",
                    self.payload_offset
                ));
            }
            if let Some(j) = areas.iter().position(|&(a, b)| start < b && a < end) {
                return Err(format!("key slots {j} and {i} overlap"));
            }
            areas.push((start, end));
        }
        Ok(())
    }

    /// Bytes of one slot's key material.
    pub fn material_len(&self) -> u64 {
        self.key_bytes as u64 * STRIPES as u64
    }

    /// Bytes from the start of the header to the data.
    pub fn payload_bytes(&self) -> u64 {
        self.payload_offset as u64 * SECTOR as u64
    }

    /// Serialises the header (592 bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; LEN];
        b[..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_text(&mut b[8..40], &self.cipher_name);
        put_text(&mut b[40..72], &self.cipher_mode);
        put_text(&mut b[72..104], &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        put_text(&mut b[168..208], &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = 208 + i * 48;
            let state = if s.active { SLOT_ACTIVE } else { SLOT_INACTIVE };
            b[o..o + 4].copy_from_slice(&state.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_offset.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// A header for a new volume with no active slot yet: QEMU's layout (header in the first
    /// 4 KiB, then the eight key material areas, each rounded up to 4 KiB, then the payload).
    pub fn new(spec: Spec, hash: HashAlg, mk_salt: [u8; SALT_LEN], uuid: String) -> Header {
        let key_bytes = spec.key_bytes as u32;
        let area = (key_bytes as u64 * STRIPES as u64).div_ceil(ALIGN) * ALIGN;
        let sector = |bytes: u64| (bytes / SECTOR as u64) as u32;
        let slots = (0..SLOTS as u64)
            .map(|i| KeySlot {
                active: false,
                iterations: 0,
                salt: [0; SALT_LEN],
                key_offset: sector(ALIGN + i * area),
                stripes: STRIPES,
            })
            .collect();
        Header {
            cipher_name: spec.alg.name().into(),
            cipher_mode: spec.mode_string(),
            hash_spec: hash.name().into(),
            payload_offset: sector(ALIGN + SLOTS as u64 * area),
            key_bytes,
            mk_digest: [0; DIGEST_LEN],
            mk_salt,
            mk_iterations: 0,
            uuid,
            slots,
            spec,
            hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let spec = Spec::parse("aes", "xts-plain64", 64).unwrap();
        let mut h = Header::new(spec, HashAlg::Sha256, [1; 32], "u".into());
        h.mk_iterations = 1000;
        h.slots[0].active = true;
        h.slots[0].iterations = 1000;
        h
    }

    #[test]
    fn layout_is_qemus() {
        let h = sample();
        assert_eq!(h.payload_bytes(), 2_068_480);
        let offsets: Vec<u64> = h.slots.iter().map(|s| s.key_offset as u64 * 512).collect();
        assert_eq!(&offsets[..3], &[4096, 262_144, 520_192]);
        let h16 = Header::new(
            Spec::parse("aes", "cbc-essiv:sha256", 16).unwrap(),
            HashAlg::Sha256,
            [0; 32],
            "u".into(),
        );
        assert_eq!(h16.payload_bytes(), 528_384);
    }

    #[test]
    fn round_trips_and_refuses_hostile_fields() {
        let h = sample();
        assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
        let bad = |f: &dyn Fn(&mut Vec<u8>), want: &str| {
            let mut b = h.to_bytes();
            f(&mut b);
            let e = Header::parse(&b).unwrap_err();
            assert!(e.contains(want), "{e}");
        };
        bad(&|b| b[0] = b'X', "bad magic");
        bad(&|b| b[7] = 2, "version 2");
        bad(
            &|b| b[208 + 4..208 + 8].copy_from_slice(&u32::MAX.to_be_bytes()),
            "iterations",
        );
        bad(
            &|b| b[164..168].copy_from_slice(&u32::MAX.to_be_bytes()),
            "iterations",
        );
        bad(
            &|b| b[208 + 44..208 + 48].copy_from_slice(&u32::MAX.to_be_bytes()),
            "stripes",
        );
        bad(
            &|b| b[108..112].copy_from_slice(&u32::MAX.to_be_bytes()),
            "key size",
        );
        bad(&|b| b[8..11].copy_from_slice(b"xyz"), "not supported");
        bad(
            &|b| b[104..108].copy_from_slice(&8u32.to_be_bytes()),
            "overlaps the payload",
        );
        bad(
            &|b| b[256 + 40..256 + 44].copy_from_slice(&8u32.to_be_bytes()),
            "overlap",
        );
        bad(
            &|b| b[208..212].copy_from_slice(&7u32.to_be_bytes()),
            "invalid state",
        );
        assert!(Header::parse(&h.to_bytes()[..100])
            .unwrap_err()
            .contains("truncated"));
    }
}
