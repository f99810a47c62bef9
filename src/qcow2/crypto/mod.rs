//! Encrypted images: LUKS v1 inside qcow2 (crypt method 2), raw LUKS volumes, and legacy
//! qcow2 AES (crypt method 1, read only).
//!
//! This is the one place that knows a cipher. The rest of the engine sees an [`Encryption`]
//! (what an image says about its encryption, readable without a key, for `info`) and its
//! [`Crypt`] (present once a passphrase unlocked it), which the cluster read and write paths
//! call with a buffer, its host offset and its guest offset:
//!
//! - LUKS numbers sectors by their HOST offset (in the image or its data file, or from the
//!   payload start of a raw volume): a cluster that keeps its host offset can be copied as
//!   ciphertext, one that moves must be decrypted and encrypted again.
//! - Legacy AES numbers them by GUEST offset and has no key check at all: its key is the
//!   passphrase's first 16 bytes.
//! - Compressed clusters are never encrypted (QEMU stores them in plaintext even in a LUKS
//!   image), so nothing here is called for them, and writers refuse to compress into an
//!   encrypted image.
//!
//! Facts checked against QEMU 10: `docs/encryption-notes.md` of the shared notes.

pub mod cipher;
pub mod hash;
pub mod keys;
pub mod keyslot;
pub mod luks;

use super::storage::{read_zero_padded, Storage};
use cipher::{SectorCipher, Spec, SECTOR};
use hash::HashAlg;
use keyslot::Secret;
use serde::Serialize;
use std::sync::Arc;

/// The qcow2 header's `crypt_method` values.
pub const METHOD_AES: u32 = 1;
pub const METHOD_LUKS: u32 = 2;

/// The largest LUKS area copied into a new image (QEMU's, for 64-byte keys, is 2 MiB).
const MAX_SHARED_AREA: u64 = 16 << 20;

/// Iteration time of new key slots when none is asked for: QEMU's default.
pub const DEFAULT_ITER_TIME_MS: u64 = 2000;

/// How an image is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Legacy qcow2 AES-128-CBC.
    Aes,
    Luks,
}

/// Which offset numbers a sector for its IV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IvBase {
    Host,
    Guest,
}

/// An unlocked cipher for an image's data.
pub struct Crypt {
    cipher: Box<dyn SectorCipher>,
    base: IvBase,
}

impl Crypt {
    /// Decrypts `buf` (whole sectors) stored at `host`, guest offset `guest`, in place.
    pub fn decrypt(&self, buf: &mut [u8], host: u64, guest: u64) {
        self.cipher.decrypt(buf, self.sector(host, guest));
    }

    /// Encrypts `buf` (whole sectors) to be stored at `host`, guest offset `guest`.
    pub fn encrypt(&self, buf: &mut [u8], host: u64, guest: u64) {
        self.cipher.encrypt(buf, self.sector(host, guest));
    }

    fn sector(&self, host: u64, guest: u64) -> u64 {
        let at = match self.base {
            IvBase::Host => host,
            IvBase::Guest => guest,
        };
        debug_assert_eq!(at % SECTOR as u64, 0, "sector aligned");
        at / SECTOR as u64
    }
}

/// What an image says about its encryption, and its cipher once unlocked.
pub struct Encryption {
    pub method: Method,
    /// The LUKS header (none for legacy AES).
    pub luks: Option<luks::Header>,
    /// Where the LUKS header and key material are (offset, length) in the image file.
    pub area: Option<(u64, u64)>,
    crypt: Option<Arc<Crypt>>,
    /// The LUKS master key, once unlocked (for outputs that keep this header).
    key: Option<Secret>,
}

/// How an image's encryption is opened: the storage holding the LUKS area.
pub type ReadAt<'a> = &'a dyn Fn(u64, &mut [u8]) -> std::io::Result<()>;

impl Encryption {
    /// The encryption of a qcow2 image, from its header's `crypt_method` and crypto
    /// extension, unlocked with the passphrases given to this process (locked when none
    /// were given). The error is the problem, for the caller to name the file.
    pub fn of_qcow2(
        crypt_method: u32,
        ext: Option<(u64, u64)>,
        file_len: u64,
        read: ReadAt,
    ) -> Result<Option<Encryption>, String> {
        match (crypt_method, ext) {
            (0, None) => Ok(None),
            (0, Some(_)) => Err("crypto header extension in an image that is not encrypted".into()),
            (METHOD_AES, None) => Ok(Some(Encryption::legacy_aes())),
            (METHOD_AES, Some(_)) => Err("crypto header extension in a legacy AES image".into()),
            (METHOD_LUKS, None) => {
                Err("missing crypto header extension for crypt method 2 (LUKS)".into())
            }
            (METHOD_LUKS, Some((offset, length))) => {
                if offset == 0 || offset >= file_len {
                    return Err(format!(
                        "LUKS header at {offset:#x} lies outside the file ({file_len} bytes)"
                    ));
                }
                let area_read = |at: u64, buf: &mut [u8]| -> std::io::Result<()> {
                    if at + buf.len() as u64 > length.min(file_len - offset) {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "key material lies past the end of the LUKS area",
                        ));
                    }
                    read(offset + at, buf)
                };
                let mut e = Encryption::luks(&area_read)?;
                e.area = Some((offset, length));
                Ok(Some(e))
            }
            (m, _) => Err(format!("unsupported encryption method {m}")),
        }
    }

    fn luks(read: ReadAt) -> Result<Encryption, String> {
        let mut bytes = [0u8; luks::LEN];
        read(0, &mut bytes).map_err(|e| format!("cannot read the LUKS header: {e}"))?;
        let h = luks::Header::parse(&bytes)?;
        let key = unlock(&h, read)?;
        let crypt = key.as_ref().map(|key| {
            Arc::new(Crypt {
                cipher: h.spec.keyed(key),
                base: IvBase::Host,
            })
        });
        Ok(Encryption {
            method: Method::Luks,
            luks: Some(h),
            area: None,
            crypt,
            key,
        })
    }

    fn legacy_aes() -> Encryption {
        let crypt = keys::passphrases().first().map(|p| {
            let mut key = Secret::new(vec![0u8; 16]);
            let n = p.len().min(16);
            key[..n].copy_from_slice(&p[..n]);
            let spec = Spec::parse("aes", "cbc-plain64", 16).expect("a known cipher");
            Arc::new(Crypt {
                cipher: spec.keyed(&key),
                base: IvBase::Guest,
            })
        });
        Encryption {
            method: Method::Aes,
            luks: None,
            area: None,
            crypt,
            key: None,
        }
    }

    /// The unlocked cipher, or the error a read without the key gets.
    pub fn crypt(&self) -> Result<&Arc<Crypt>, String> {
        self.crypt.as_ref().ok_or_else(|| {
            "the image is encrypted: give its passphrase with --key-file FILE".to_string()
        })
    }

    /// How a new image keeps this LUKS header (its passphrases, its master key): `read`
    /// reads the header and key material. `None` for legacy AES, which has no header.
    pub fn keying_to_share(&self, read: ReadAt) -> Result<Option<Keying>, String> {
        let (Some(h), Some(key)) = (&self.luks, &self.key) else {
            return match self.method {
                Method::Aes => Ok(None),
                Method::Luks => self.crypt().map(|_| None),
            };
        };
        let len = h.payload_bytes();
        if len > MAX_SHARED_AREA {
            return Err(format!(
                "the LUKS header claims a payload offset of {len} bytes (more than {MAX_SHARED_AREA})"
            ));
        }
        let mut area = vec![0u8; len as usize];
        read(0, &mut area).map_err(|e| format!("cannot read the LUKS key material: {e}"))?;
        Ok(Some(Keying::Reuse {
            area,
            key: key.clone(),
        }))
    }

    /// The LUKS master key, once unlocked.
    pub fn master_key(&self) -> Option<&Secret> {
        self.key.as_ref()
    }

    /// Whether a passphrase unlocked it.
    pub fn unlocked(&self) -> bool {
        self.crypt.is_some()
    }

    /// What `info` shows (qemu-img's `format-specific.data.encrypt`).
    pub fn info(&self) -> EncryptInfo {
        match &self.luks {
            None => EncryptInfo {
                format: "aes",
                luks: None,
            },
            Some(h) => EncryptInfo {
                format: "luks",
                luks: Some(LuksInfo {
                    cipher_alg: format!("{}-{}", h.cipher_name, h.spec.cipher_key_bytes() * 8),
                    cipher_mode: h.spec.mode.name(),
                    ivgen_alg: h.spec.ivgen.map_or("plain64", cipher::IvGen::name),
                    ivgen_hash_alg: match h.spec.ivgen {
                        Some(cipher::IvGen::Essiv(x)) => Some(x.name()),
                        _ => None,
                    },
                    hash_alg: h.hash_spec.clone(),
                    detached_header: false,
                    payload_offset: h.payload_bytes(),
                    master_key_iters: h.mk_iterations,
                    uuid: h.uuid.clone(),
                    slots: h
                        .slots
                        .iter()
                        .map(|s| SlotInfo {
                            active: s.active,
                            iters: s.active.then_some(s.iterations),
                            stripes: s.active.then_some(s.stripes),
                            key_offset: s.key_offset as u64 * SECTOR as u64,
                        })
                        .collect(),
                }),
            },
        }
    }
}

/// The master key of `h` from the passphrases this process has (`None`: none given).
fn unlock(h: &luks::Header, read: ReadAt) -> Result<Option<Secret>, String> {
    if let Some(key) = keys::unlocked(&h.mk_digest, &h.mk_salt) {
        return Ok(Some(key));
    }
    let passphrases = keys::passphrases();
    if passphrases.is_empty() {
        return Ok(None);
    }
    for p in &passphrases {
        match keyslot::unlock(h, p, read) {
            Ok((key, _)) => {
                keys::remember(&h.mk_digest, &h.mk_salt, &key);
                return Ok(Some(key));
            }
            Err(keyslot::UnlockError::NoSlot) => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(match passphrases.len() {
        1 => "invalid passphrase: it unlocks no active key slot".into(),
        n => format!("invalid passphrases: none of the {n} given unlocks an active key slot"),
    })
}

/// `format-specific.data.encrypt` as qemu-img prints it.
#[derive(Debug, Clone, Serialize)]
pub struct EncryptInfo {
    pub format: &'static str,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub luks: Option<LuksInfo>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LuksInfo {
    pub cipher_alg: String,
    pub cipher_mode: &'static str,
    pub ivgen_alg: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ivgen_hash_alg: Option<&'static str>,
    pub hash_alg: String,
    pub detached_header: bool,
    pub payload_offset: u64,
    pub master_key_iters: u32,
    pub uuid: String,
    pub slots: Vec<SlotInfo>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SlotInfo {
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iters: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripes: Option<u32>,
    pub key_offset: u64,
}

/// What `-o encrypt.*` asks of a new LUKS image (qemu-img's option names); unset fields
/// take QEMU's defaults (aes-256, xts, plain64, sha256, 2000 ms).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LuksRequest {
    /// The secret object (`--object secret,id=ID`) whose bytes are the passphrase; without
    /// it, `--target-key-file`'s.
    pub key_secret: Option<String>,
    /// `aes-256`, `twofish-128`, `cast5-128`, ...
    pub cipher_alg: Option<String>,
    pub cipher_mode: Option<String>,
    pub ivgen_alg: Option<String>,
    pub ivgen_hash_alg: Option<String>,
    pub hash_alg: Option<String>,
    /// Milliseconds of PBKDF2 per unlock.
    pub iter_time: Option<u64>,
}

impl LuksRequest {
    /// Applies one `encrypt.KEY=VALUE` option (KEY without the prefix); `false` when the key
    /// is not one of ours.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let v = Some(value.to_string());
        match key {
            "key-secret" => self.key_secret = v,
            "cipher-alg" => self.cipher_alg = v,
            "cipher-mode" => self.cipher_mode = v,
            "ivgen-alg" => self.ivgen_alg = v,
            "ivgen-hash-alg" => self.ivgen_hash_alg = v,
            "hash-alg" => self.hash_alg = v,
            "iter-time" => {
                self.iter_time = Some(
                    value
                        .parse()
                        .map_err(|_| format!("invalid encrypt.iter-time '{value}'"))?,
                )
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The cipher and hash asked for, checked as QEMU checks them.
    pub fn spec(&self) -> Result<(Spec, HashAlg), String> {
        let alg = self.cipher_alg.as_deref().unwrap_or("aes-256");
        let (name, bits) = alg
            .rsplit_once('-')
            .and_then(|(n, b)| Some((n, b.parse::<usize>().ok()?)))
            .ok_or_else(|| format!("unknown cipher algorithm '{alg}'"))?;
        let mode = self.cipher_mode.as_deref().unwrap_or("xts");
        let ivgen = match (
            self.ivgen_alg.as_deref().unwrap_or("plain64"),
            &self.ivgen_hash_alg,
        ) {
            ("essiv", h) => format!("essiv:{}", h.as_deref().unwrap_or("sha256")),
            (_, Some(_)) => {
                return Err("encrypt.ivgen-hash-alg needs encrypt.ivgen-alg=essiv".into())
            }
            (iv, None) => iv.to_string(),
        };
        let mode = format!("{mode}-{ivgen}");
        let key_bytes = bits / 8 * if mode.starts_with("xts") { 2 } else { 1 };
        let spec = Spec::parse(name, &mode, key_bytes)?;
        let hash_name = self.hash_alg.as_deref().unwrap_or("sha256");
        let hash = HashAlg::parse(hash_name)
            .ok_or_else(|| format!("unknown hash algorithm '{hash_name}'"))?;
        if (spec.key_bytes * luks::STRIPES as usize) % SECTOR != 0 {
            return Err(format!(
                "{alg} with {} is not supported",
                spec.mode_string()
            ));
        }
        Ok((spec, hash))
    }

    /// The passphrase: the named secret, else the target key.
    fn passphrase(&self) -> Result<Secret, String> {
        match &self.key_secret {
            Some(id) => keys::named(id).ok_or_else(|| format!("no secret with id '{id}' (--object secret,id={id},file=FILE)")),
            None => keys::target().ok_or_else(|| {
                "an encrypted output needs a passphrase: --target-key-file FILE (or encrypt.key-secret=ID)".to_string()
            }),
        }
    }
}

/// How a new encrypted image gets its LUKS header.
#[derive(Clone)]
pub enum Keying {
    /// A new master key and header, slot 0 opened by the request's passphrase.
    Fresh(LuksRequest),
    /// Another image's LUKS area as it is (same passphrases, same master key): no PBKDF2 to
    /// pay, and clusters at the same host offset can be copied as ciphertext.
    Reuse { area: Vec<u8>, key: Secret },
}

impl std::fmt::Debug for Keying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Keying::Fresh(r) => write!(f, "Fresh({r:?})"),
            Keying::Reuse { area, .. } => write!(f, "Reuse({} bytes)", area.len()),
        }
    }
}

/// A LUKS area ready to be written into a new image, and the cipher of its data.
pub struct NewArea {
    pub bytes: Vec<u8>,
    pub crypt: Crypt,
}

impl Keying {
    /// Checks what can be checked before anything is written: the cipher, the passphrase.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Keying::Fresh(r) => r.spec().and(r.passphrase()).map(drop),
            Keying::Reuse { .. } => Ok(()),
        }
    }

    /// Builds the area (header and all key material, `payload_offset` bytes).
    pub fn build(&self) -> Result<NewArea, String> {
        match self {
            Keying::Reuse { area, key } => {
                let h = luks::Header::parse(area)?;
                Ok(NewArea {
                    bytes: area.clone(),
                    crypt: Crypt {
                        cipher: h.spec.keyed(key),
                        base: IvBase::Host,
                    },
                })
            }
            Keying::Fresh(request) => {
                let (spec, hash) = request.spec()?;
                let passphrase = request.passphrase()?;
                let io = |e: std::io::Error| e.to_string();
                let mut salt = [0u8; luks::SALT_LEN];
                keyslot::random(&mut salt).map_err(io)?;
                let mut h = luks::Header::new(spec, hash, salt, new_uuid().map_err(io)?);
                let mut key = Secret::new(vec![0u8; spec.key_bytes]);
                keyslot::random(&mut key).map_err(io)?;
                let millis = request.iter_time.unwrap_or(DEFAULT_ITER_TIME_MS);
                let iterations = keyslot::iterations_for(&h, millis);
                keyslot::set_digest(&mut h, &key, (iterations / 8).max(1000));
                let material =
                    keyslot::make_slot(&mut h, 0, &key, &passphrase, iterations).map_err(io)?;
                let mut bytes = vec![0u8; h.payload_bytes() as usize];
                // Unused key material areas hold random bytes.
                keyslot::random(&mut bytes[luks::ALIGN as usize..]).map_err(io)?;
                let at = h.slots[0].key_offset as usize * SECTOR;
                bytes[at..at + material.len()].copy_from_slice(&material);
                bytes[..luks::LEN].copy_from_slice(&h.to_bytes());
                keys::remember(&h.mk_digest, &h.mk_salt, &key);
                Ok(NewArea {
                    bytes,
                    crypt: Crypt {
                        cipher: h.spec.keyed(&key),
                        base: IvBase::Host,
                    },
                })
            }
        }
    }
}

/// A random (version 4) UUID in its text form.
fn new_uuid() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    keyslot::random(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// Reads `buf.len()` bytes of guest data (guest offset `guest`) stored at `host` in
/// `storage`, zero padded past its end, decrypted when `crypt` is given: a range that is not
/// whole sectors is read widened to them.
pub fn read_stored(
    crypt: Option<&Crypt>,
    storage: &dyn Storage,
    buf: &mut [u8],
    host: u64,
    guest: u64,
) -> std::io::Result<()> {
    let Some(crypt) = crypt else {
        return read_zero_padded(storage, buf, host);
    };
    let s = SECTOR as u64;
    let lead = host % s;
    let end = host + buf.len() as u64;
    if lead == 0 && end % s == 0 {
        read_zero_padded(storage, buf, host)?;
        crypt.decrypt(buf, host, guest);
        return Ok(());
    }
    let start = host - lead;
    let mut wide = vec![0u8; (end.div_ceil(s) * s - start) as usize];
    read_zero_padded(storage, &mut wide, start)?;
    crypt.decrypt(&mut wide, start, guest - lead);
    buf.copy_from_slice(&wide[lead as usize..lead as usize + buf.len()]);
    Ok(())
}
