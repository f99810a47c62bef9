//! The hashes LUKS names (`sha256`, ...): for PBKDF2, the anti-forensic diffuser and ESSIV.
//!
//! One enum dispatches to the RustCrypto implementation of each; nothing here is a hash
//! written by hand.

use digest::Digest;

/// A hash algorithm by its LUKS name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
    Ripemd160,
}

macro_rules! dispatch {
    ($alg:expr, $f:ident $(, $arg:expr)*) => {
        match $alg {
            HashAlg::Md5 => $f::<md5::Md5>($($arg),*),
            HashAlg::Sha1 => $f::<sha1::Sha1>($($arg),*),
            HashAlg::Sha224 => $f::<sha2::Sha224>($($arg),*),
            HashAlg::Sha256 => $f::<sha2::Sha256>($($arg),*),
            HashAlg::Sha384 => $f::<sha2::Sha384>($($arg),*),
            HashAlg::Sha512 => $f::<sha2::Sha512>($($arg),*),
            HashAlg::Ripemd160 => $f::<ripemd::Ripemd160>($($arg),*),
        }
    };
}

impl HashAlg {
    pub fn parse(name: &str) -> Option<HashAlg> {
        Some(match name {
            "md5" => HashAlg::Md5,
            "sha1" => HashAlg::Sha1,
            "sha224" => HashAlg::Sha224,
            "sha256" => HashAlg::Sha256,
            "sha384" => HashAlg::Sha384,
            "sha512" => HashAlg::Sha512,
            "ripemd160" => HashAlg::Ripemd160,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Md5 => "md5",
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
            HashAlg::Ripemd160 => "ripemd160",
        }
    }

    /// Digest length in bytes.
    pub fn output_len(self) -> usize {
        dispatch!(self, output_len)
    }

    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        dispatch!(self, digest, data)
    }

    /// PBKDF2 with HMAC of this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        dispatch!(self, pbkdf2, password, salt, iterations, out)
    }

    /// The anti-forensic diffusion of `buf` in place: each digest-sized piece `j` becomes
    /// H(be32(j) || piece), cut to the piece's length.
    pub fn diffuse(self, buf: &mut [u8]) {
        dispatch!(self, diffuse, buf)
    }
}

fn output_len<D: Digest>() -> usize {
    <D as Digest>::output_size()
}

fn digest<D: Digest>(data: &[u8]) -> Vec<u8> {
    D::digest(data).to_vec()
}

fn pbkdf2<D: pbkdf2::hmac::EagerHash + Digest>(
    password: &[u8],
    salt: &[u8],
    rounds: u32,
    out: &mut [u8],
) {
    pbkdf2::pbkdf2_hmac::<D>(password, salt, rounds, out)
}

fn diffuse<D: Digest>(buf: &mut [u8]) {
    let n = <D as Digest>::output_size();
    for (j, piece) in buf.chunks_mut(n).enumerate() {
        let mut h = D::new();
        h.update((j as u32).to_be_bytes());
        h.update(&*piece);
        let out = h.finalize();
        let len = piece.len();
        piece.copy_from_slice(&out[..len]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_matches_rfc_6070() {
        let mut out = [0u8; 20];
        HashAlg::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        assert_eq!(
            out,
            [
                0xea, 0x6c, 0x01, 0x4d, 0xc7, 0x2d, 0x6f, 0x8c, 0xcd, 0x1e, 0xd9, 0x2a, 0xce, 0x1d,
                0x41, 0xf0, 0xd8, 0xde, 0x89, 0x57
            ]
        );
    }

    #[test]
    fn names_round_trip_and_sizes_are_known() {
        for name in [
            "md5",
            "sha1",
            "sha224",
            "sha256",
            "sha384",
            "sha512",
            "ripemd160",
        ] {
            let h = HashAlg::parse(name).unwrap();
            assert_eq!(h.name(), name);
            assert_eq!(h.digest(b"x").len(), h.output_len());
        }
        assert_eq!(HashAlg::parse("sm3"), None);
    }
}
