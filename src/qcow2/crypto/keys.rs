//! The passphrases this process was given, and the master keys they unlocked.
//!
//! Images are opened in many places (every layer of a chain, backing files of a writer,
//! verify, serve), always for the same command line; so the binaries register the
//! passphrases of `--key-file` (and qemu-img's `--object secret`) once, and every open of an
//! encrypted image tries them. A master key, once unlocked, is remembered by its header's
//! digest and salt: the images of a chain that share one LUKS header (a merge result and its
//! FULL) pay PBKDF2 once. Everything is wiped when the process ends or [`forget`] is called.

pub use super::keyslot::Secret;
use super::luks::{DIGEST_LEN, SALT_LEN};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Largest key file read (a passphrase, not a disk image given by mistake).
const MAX_KEY_FILE: u64 = 64 << 10;

#[derive(Default)]
struct Ring {
    passphrases: Vec<Secret>,
    /// qemu-img's secret objects, by id (`encrypt.key-secret=ID` names one).
    by_id: HashMap<String, Secret>,
    /// The passphrase of new encrypted outputs (`--target-key-file`).
    target: Option<Secret>,
    unlocked: HashMap<([u8; DIGEST_LEN], [u8; SALT_LEN]), Secret>,
}

fn ring() -> MutexGuard<'static, Ring> {
    static RING: OnceLock<Mutex<Ring>> = OnceLock::new();
    RING.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Reads a key file: its bytes are the passphrase, a trailing newline included (as QEMU's
/// `secret,file=`). The error names the file and the cause.
pub fn read_key_file(path: &Path) -> Result<Secret, String> {
    use std::io::Read;
    let name = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("key file {name}: {e}"))?;
    let mut bytes = Secret::new(Vec::new());
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("key file {name}: {e}"))?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(format!("key file {name}: larger than {MAX_KEY_FILE} bytes"));
    }
    check_passphrase(&bytes).map_err(|why| format!("key file {name}: {why}"))?;
    Ok(bytes)
}

/// What QEMU requires of a passphrase: UTF-8, not empty.
pub fn check_passphrase(bytes: &[u8]) -> Result<(), &'static str> {
    if bytes.is_empty() {
        return Err("the passphrase is empty");
    }
    if std::str::from_utf8(bytes).is_err() {
        return Err("the passphrase is not valid UTF-8");
    }
    Ok(())
}

/// Adds a passphrase for the images this process opens.
pub fn add(passphrase: Secret) {
    let mut r = ring();
    if !r.passphrases.contains(&passphrase) {
        r.passphrases.push(passphrase);
    }
}

/// Adds a named secret (qemu-img's `--object secret,id=ID,...`); it opens images too.
pub fn add_named(id: &str, secret: Secret) {
    add(secret.clone());
    ring().by_id.insert(id.to_string(), secret);
}

/// The secret named `id`.
pub fn named(id: &str) -> Option<Secret> {
    ring().by_id.get(id).cloned()
}

/// Sets the passphrase of new encrypted outputs.
pub fn set_target(secret: Secret) {
    ring().target = Some(secret);
}

/// The passphrase of new encrypted outputs, when one was given.
pub fn target() -> Option<Secret> {
    ring().target.clone()
}

/// The passphrases given, in order.
pub fn passphrases() -> Vec<Secret> {
    ring().passphrases.clone()
}

/// A master key unlocked before for a header with this digest and salt.
pub fn unlocked(digest: &[u8; DIGEST_LEN], salt: &[u8; SALT_LEN]) -> Option<Secret> {
    ring().unlocked.get(&(*digest, *salt)).cloned()
}

/// Remembers an unlocked master key.
pub fn remember(digest: &[u8; DIGEST_LEN], salt: &[u8; SALT_LEN], key: &Secret) {
    ring().unlocked.insert((*digest, *salt), key.clone());
}

/// Wipes every passphrase and key.
pub fn forget() {
    let mut r = ring();
    r.passphrases.clear();
    r.by_id.clear();
    r.target = None;
    r.unlocked.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_keep_their_newline_and_must_be_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, b"pw\n").unwrap();
        assert_eq!(&read_key_file(&p).unwrap()[..], b"pw\n");
        std::fs::write(&p, b"\xff\xfe").unwrap();
        assert!(read_key_file(&p).unwrap_err().contains("UTF-8"));
        std::fs::write(&p, b"").unwrap();
        assert!(read_key_file(&p).unwrap_err().contains("empty"));
        let e = read_key_file(&dir.path().join("missing")).unwrap_err();
        assert!(e.contains("missing") && e.contains("No such file"), "{e}");
    }
}
