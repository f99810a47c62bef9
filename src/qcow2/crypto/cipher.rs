//! Sector ciphers: a block cipher, a chaining mode and an IV generator, as LUKS names them
//! (`aes` + `xts-plain64`, `serpent` + `cbc-essiv:sha256`, ...).
//!
//! Data is encrypted in 512-byte sectors, each with its own IV derived from a sector number
//! (which number that is, host or guest offset, is the caller's business). Every primitive
//! comes from the RustCrypto crates; this module only chooses and combines them, and the
//! combinations are the ones QEMU 10 creates (see `docs/encryption-notes.md` §6).

use super::hash::HashAlg;
use cipher::array::Array;
use cipher::{Block, BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt};
use cipher::{InnerIvInit, KeyInit};
use rayon::prelude::*;
use std::fmt;
use zeroize::Zeroizing;

/// The sector size of LUKS and legacy qcow2 encryption.
pub const SECTOR: usize = 512;

/// Buffers at least this long are split across threads (a sector's work is independent).
const PARALLEL_FROM: usize = 256 << 10;

/// A block cipher algorithm, by its LUKS name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Aes,
    Twofish,
    Serpent,
    Cast5,
}

impl Algorithm {
    pub fn parse(name: &str) -> Option<Algorithm> {
        Some(match name {
            "aes" => Algorithm::Aes,
            "twofish" => Algorithm::Twofish,
            "serpent" => Algorithm::Serpent,
            "cast5" => Algorithm::Cast5,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Aes => "aes",
            Algorithm::Twofish => "twofish",
            Algorithm::Serpent => "serpent",
            Algorithm::Cast5 => "cast5",
        }
    }

    /// The key sizes (bytes) QEMU accepts for it.
    fn key_sizes(self) -> &'static [usize] {
        match self {
            Algorithm::Cast5 => &[16],
            _ => &[16, 24, 32],
        }
    }
}

/// The chaining mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Xts,
    Cbc,
    Ecb,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Xts => "xts",
            Mode::Cbc => "cbc",
            Mode::Ecb => "ecb",
        }
    }
}

/// How a sector's IV is made from its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGen {
    /// The low 32 bits, little-endian, zero padded.
    Plain,
    /// 64 bits, little-endian, zero padded.
    Plain64,
    /// The 64-bit number encrypted under the hash of the key (the hash named here).
    Essiv(HashAlg),
}

impl IvGen {
    pub fn name(self) -> &'static str {
        match self {
            IvGen::Plain => "plain",
            IvGen::Plain64 => "plain64",
            IvGen::Essiv(_) => "essiv",
        }
    }
}

/// A full cipher specification: what a LUKS header's cipher name and mode say, with the key
/// size its key-bytes field gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    pub alg: Algorithm,
    pub mode: Mode,
    pub ivgen: Option<IvGen>,
    /// Bytes of the whole key (XTS: both halves).
    pub key_bytes: usize,
}

impl Spec {
    /// Parses a LUKS cipher name and mode (`xts-plain64`, `cbc-essiv:sha256`, `ecb`) for a
    /// key of `key_bytes`; the error says what is not supported.
    pub fn parse(alg: &str, mode: &str, key_bytes: usize) -> Result<Spec, String> {
        let unsupported =
            || format!("cipher {alg}-{mode} with a {key_bytes}-byte key is not supported");
        let a = Algorithm::parse(alg).ok_or_else(unsupported)?;
        let (m, iv) = match mode.split_once('-') {
            Some((m, iv)) => (m, Some(iv)),
            None => (mode, None),
        };
        let m = match m {
            "xts" => Mode::Xts,
            "cbc" => Mode::Cbc,
            "ecb" => Mode::Ecb,
            _ => return Err(unsupported()),
        };
        let ivgen = match iv {
            None => None,
            Some("plain") => Some(IvGen::Plain),
            Some("plain64") => Some(IvGen::Plain64),
            Some(e) => match e.strip_prefix("essiv") {
                Some("") => Some(IvGen::Essiv(HashAlg::Sha256)),
                Some(h) => match h.strip_prefix(':').and_then(HashAlg::parse) {
                    Some(h) => Some(IvGen::Essiv(h)),
                    None => return Err(unsupported()),
                },
                None => return Err(unsupported()),
            },
        };
        let spec = Spec {
            alg: a,
            mode: m,
            ivgen,
            key_bytes,
        };
        spec.validate()
            .map_err(|why| format!("{}: {why}", unsupported()))?;
        Ok(spec)
    }

    /// The mode string as LUKS stores it.
    pub fn mode_string(&self) -> String {
        match self.ivgen {
            None => self.mode.name().to_string(),
            Some(IvGen::Essiv(h)) => format!("{}-essiv:{}", self.mode.name(), h.name()),
            Some(iv) => format!("{}-{}", self.mode.name(), iv.name()),
        }
    }

    /// Bytes of the cipher's own key (half the key for XTS).
    pub fn cipher_key_bytes(&self) -> usize {
        match self.mode {
            Mode::Xts => self.key_bytes / 2,
            _ => self.key_bytes,
        }
    }

    fn validate(&self) -> Result<(), &'static str> {
        if !self.alg.key_sizes().contains(&self.cipher_key_bytes())
            || self.mode == Mode::Xts && self.key_bytes % 2 != 0
        {
            return Err("unknown key size");
        }
        if self.alg == Algorithm::Cast5 && self.mode == Mode::Xts {
            return Err("XTS needs a 128-bit block cipher");
        }
        // QEMU names an IV generator for ECB too (`ecb-plain64`), and ignores it.
        if self.mode != Mode::Ecb && self.ivgen.is_none() {
            return Err("the mode needs an IV generator");
        }
        if let Some(IvGen::Essiv(h)) = self.ivgen {
            if !self.alg.key_sizes().contains(&h.output_len()) {
                return Err("the ESSIV hash gives a key size the cipher does not take");
            }
        }
        Ok(())
    }

    /// The sector cipher keyed with `key` (`key_bytes` long).
    pub fn keyed(&self, key: &[u8]) -> Box<dyn SectorCipher> {
        assert_eq!(key.len(), self.key_bytes, "key length fixed by the spec");
        let essiv_key = match self.ivgen {
            Some(IvGen::Essiv(h)) => Some(Zeroizing::new(h.digest(key))),
            _ => None,
        };
        let k = self.cipher_key_bytes();
        let essiv = essiv_key.as_ref().map(|k| k.as_slice());
        macro_rules! with {
            ($c:ty) => {
                keyed_wide::<$c>(self, key, essiv)
            };
        }
        match (self.alg, k) {
            (Algorithm::Aes, 16) => with!(aes::Aes128),
            (Algorithm::Aes, 24) => with!(aes::Aes192),
            (Algorithm::Aes, _) => with!(aes::Aes256),
            (Algorithm::Twofish, _) => with!(twofish::Twofish),
            (Algorithm::Serpent, _) => with!(serpent::Serpent),
            // 64-bit blocks: no XTS (refused by `validate`).
            (Algorithm::Cast5, _) => keyed::<cast5::Cast5>(self, key, essiv),
        }
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}-{}",
            self.alg.name(),
            self.cipher_key_bytes() * 8,
            self.mode_string()
        )
    }
}

/// Encrypts and decrypts whole sectors in place; `sector` numbers the first one.
pub trait SectorCipher: Send + Sync {
    fn encrypt(&self, buf: &mut [u8], sector: u64);
    fn decrypt(&self, buf: &mut [u8], sector: u64);
}

/// What a block cipher must offer to serve here.
trait Primitive:
    BlockCipherEncrypt + BlockCipherDecrypt + KeyInit + Clone + Send + Sync + 'static
{
}
impl<C: BlockCipherEncrypt + BlockCipherDecrypt + KeyInit + Clone + Send + Sync + 'static> Primitive
    for C
{
}

fn new<C: Primitive>(key: &[u8]) -> C {
    C::new_from_slice(key).expect("key size validated")
}

fn ivs<C: Primitive>(spec: &Spec, essiv_key: Option<&[u8]>) -> Ivs<C> {
    Ivs {
        gen: spec.ivgen,
        essiv: essiv_key.map(|k| one_block(spec.alg, k)),
        block: std::marker::PhantomData,
    }
}

/// A cipher with 128-bit blocks: every mode.
fn keyed_wide<C>(spec: &Spec, key: &[u8], essiv_key: Option<&[u8]>) -> Box<dyn SectorCipher>
where
    C: Primitive + cipher::BlockSizeUser<BlockSize = cipher::consts::U16>,
{
    if spec.mode != Mode::Xts {
        return keyed::<C>(spec, key, essiv_key);
    }
    let half = key.len() / 2;
    Box::new(Xts {
        xts: xts_mode::Xts128::new(new::<C>(&key[..half]), new::<C>(&key[half..])),
        ivs: ivs(spec, essiv_key),
    })
}

/// CBC or ECB with any block cipher.
fn keyed<C: Primitive>(spec: &Spec, key: &[u8], essiv_key: Option<&[u8]>) -> Box<dyn SectorCipher> {
    match spec.mode {
        Mode::Cbc => Box::new(Cbc {
            cipher: new::<C>(key),
            ivs: ivs(spec, essiv_key),
        }),
        _ => Box::new(Ecb {
            cipher: new::<C>(key),
        }),
    }
}

/// Runs `f` over every sector of `buf`, on several threads when `buf` is large.
fn sectors(buf: &mut [u8], first: u64, f: impl Fn(&mut [u8], u64) + Sync) {
    if buf.len() >= PARALLEL_FROM {
        buf.par_chunks_mut(SECTOR)
            .enumerate()
            .for_each(|(i, s)| f(s, first + i as u64));
    } else {
        for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
            f(s, first + i as u64);
        }
    }
}

/// Makes IVs for cipher `C`.
struct Ivs<C> {
    gen: Option<IvGen>,
    /// ESSIV's cipher: the same algorithm, keyed with the key's hash (so possibly another
    /// key size: aes-128 with sha256 encrypts its IVs with AES-256).
    essiv: Option<Box<dyn OneBlock>>,
    block: std::marker::PhantomData<C>,
}

impl<C: Primitive> Ivs<C> {
    fn iv(&self, sector: u64) -> Block<C> {
        let mut iv = Block::<C>::default();
        match self.gen {
            None => {}
            Some(IvGen::Plain) => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            Some(IvGen::Plain64) => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            Some(IvGen::Essiv(_)) => {
                let n = 8.min(iv.len());
                iv[..n].copy_from_slice(&sector.to_le_bytes()[..n]);
                self.essiv
                    .as_ref()
                    .expect("keyed with ESSIV")
                    .encrypt(&mut iv);
            }
        }
        iv
    }
}

/// Encrypts one block, whatever the cipher's key size.
trait OneBlock: Send + Sync {
    fn encrypt(&self, block: &mut [u8]);
}

impl<C: Primitive> OneBlock for C {
    fn encrypt(&self, block: &mut [u8]) {
        let b = Array::slice_as_mut_array(block).expect("one block");
        self.encrypt_block(b);
    }
}

/// `alg` keyed with `key` (an ESSIV key: the size of a digest).
fn one_block(alg: Algorithm, key: &[u8]) -> Box<dyn OneBlock> {
    match (alg, key.len()) {
        (Algorithm::Aes, 16) => Box::new(new::<aes::Aes128>(key)),
        (Algorithm::Aes, 24) => Box::new(new::<aes::Aes192>(key)),
        (Algorithm::Aes, _) => Box::new(new::<aes::Aes256>(key)),
        (Algorithm::Twofish, _) => Box::new(new::<twofish::Twofish>(key)),
        (Algorithm::Serpent, _) => Box::new(new::<serpent::Serpent>(key)),
        (Algorithm::Cast5, _) => Box::new(new::<cast5::Cast5>(key)),
    }
}

struct Xts<C> {
    xts: xts_mode::Xts128<C>,
    ivs: Ivs<C>,
}

impl<C: Primitive + cipher::BlockSizeUser<BlockSize = cipher::consts::U16>> SectorCipher
    for Xts<C>
{
    fn encrypt(&self, buf: &mut [u8], sector: u64) {
        sectors(buf, sector, |s, n| {
            let iv = self.ivs.iv(n);
            self.xts.encrypt_sector(s, Array::from_fn(|i| iv[i]));
        })
    }

    fn decrypt(&self, buf: &mut [u8], sector: u64) {
        sectors(buf, sector, |s, n| {
            let iv = self.ivs.iv(n);
            self.xts.decrypt_sector(s, Array::from_fn(|i| iv[i]));
        })
    }
}

struct Cbc<C> {
    cipher: C,
    ivs: Ivs<C>,
}

impl<C: Primitive> SectorCipher for Cbc<C> {
    fn encrypt(&self, buf: &mut [u8], sector: u64) {
        sectors(buf, sector, |s, n| {
            let iv = self.ivs.iv(n);
            let (blocks, _) = Array::slice_as_chunks_mut(s);
            cbc::Encryptor::<C>::inner_iv_init(self.cipher.clone(), &iv).encrypt_blocks(blocks);
        })
    }

    fn decrypt(&self, buf: &mut [u8], sector: u64) {
        sectors(buf, sector, |s, n| {
            let iv = self.ivs.iv(n);
            let (blocks, _) = Array::slice_as_chunks_mut(s);
            cbc::Decryptor::<C>::inner_iv_init(self.cipher.clone(), &iv).decrypt_blocks(blocks);
        })
    }
}

struct Ecb<C> {
    cipher: C,
}

impl<C: Primitive> SectorCipher for Ecb<C> {
    fn encrypt(&self, buf: &mut [u8], sector: u64) {
        sectors(buf, sector, |s, _| {
            self.cipher.encrypt_blocks(Array::slice_as_chunks_mut(s).0)
        })
    }

    fn decrypt(&self, buf: &mut [u8], sector: u64) {
        sectors(buf, sector, |s, _| {
            self.cipher.decrypt_blocks(Array::slice_as_chunks_mut(s).0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_qemu_writes() {
        let s = Spec::parse("aes", "xts-plain64", 64).unwrap();
        assert_eq!(
            (s.alg, s.mode, s.ivgen),
            (Algorithm::Aes, Mode::Xts, Some(IvGen::Plain64))
        );
        assert_eq!(s.to_string(), "aes-256-xts-plain64");
        let s = Spec::parse("serpent", "cbc-essiv:sha256", 32).unwrap();
        assert_eq!(s.mode_string(), "cbc-essiv:sha256");
        assert!(Spec::parse("cast5", "cbc-plain64", 16).is_ok());
        // What QEMU refuses too.
        assert!(Spec::parse("aes", "cbc-essiv:sha1", 16).is_err());
        assert!(Spec::parse("cast5", "xts-plain64", 32).is_err());
        assert!(Spec::parse("aes", "xts-plain64", 20).is_err());
        assert!(Spec::parse("nosuchcipher", "xts-plain64", 32).is_err());
        assert!(Spec::parse("aes", "ctr-plain64", 32).is_err());
        assert!(Spec::parse("aes", "cbc", 32).is_err());
    }

    #[test]
    fn every_mode_round_trips_and_depends_on_the_sector() {
        for (alg, mode, kb) in [
            ("aes", "xts-plain64", 64),
            ("aes", "cbc-essiv:sha256", 16),
            ("twofish", "cbc-plain", 32),
            ("serpent", "ecb", 32),
            ("aes", "ecb-plain64", 32),
            ("cast5", "cbc-plain64", 16),
        ] {
            let spec = Spec::parse(alg, mode, kb).unwrap();
            let key: Vec<u8> = (0..kb as u8).collect();
            let c = spec.keyed(&key);
            let plain: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
            let mut a = plain.clone();
            c.encrypt(&mut a, 5);
            assert_ne!(a, plain, "{spec}");
            let mut b = plain.clone();
            c.encrypt(&mut b, 6);
            // The plaintext repeats every 256 bytes: only the IVs make sectors differ.
            assert_eq!(a[512..], b[..4096 - 512], "{spec}: sector 6 is sector 6");
            assert_eq!(
                a[..512] == b[..512],
                mode.starts_with("ecb"),
                "{spec}: IV of sector 5 vs 6"
            );
            c.decrypt(&mut a, 5);
            assert_eq!(a, plain, "{spec}");
        }
    }

    #[test]
    fn large_buffers_match_sector_by_sector() {
        let spec = Spec::parse("aes", "xts-plain64", 64).unwrap();
        let c = spec.keyed(&[7u8; 64]);
        let mut big = vec![3u8; PARALLEL_FROM * 2];
        let mut small = big.clone();
        c.encrypt(&mut big, 100);
        for (i, s) in small.chunks_mut(SECTOR).enumerate() {
            c.encrypt(s, 100 + i as u64);
        }
        assert_eq!(big, small);
    }
}
