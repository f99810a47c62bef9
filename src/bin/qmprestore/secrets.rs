//! Passphrases of encrypted images, spelled as ours (`--key-file`, `--target-key-file`) and
//! as qemu-img's (`--object secret,...`, `--image-opts`, `-o encrypt.key-secret=ID`), so a
//! command line written for qemu-img works here too.
//!
//! Every passphrase given is tried on every encrypted image the command opens (a chain whose
//! layers have different passphrases needs each of them once); `--target-key-file` (or the
//! secret `-o encrypt.key-secret=ID` names) keys a new encrypted output.

use anyhow::{bail, Context, Result};
use base64::Engine;
use qmpbackup::qcow2::crypto::keys;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct KeyArgs {
    /// A file whose bytes are the passphrase of encrypted images (a trailing newline is part
    /// of it, as in QEMU's secret,file=). Repeat it for layers with other passphrases.
    #[arg(long, global = true, value_name = "FILE")]
    pub key_file: Vec<PathBuf>,
    /// Passphrase file of a new encrypted output, which then gets a new LUKS header (merge
    /// keeps the FULL's header and passphrases by default).
    #[arg(long, global = true, value_name = "FILE")]
    pub target_key_file: Option<PathBuf>,
    /// qemu-img's secret object: secret,id=ID,file=FILE or secret,id=ID,data=TEXT
    /// [,format=raw|base64]. Its passphrase opens images too.
    #[arg(long, global = true, value_name = "OBJECT")]
    pub object: Vec<String>,
    /// qemu-img's --image-opts: image arguments are option lists
    /// (driver=qcow2,file.filename=FILE,encrypt.key-secret=ID); their file.filename is used.
    #[arg(long, global = true)]
    pub image_opts: bool,
}

/// Registers the passphrases of the command line with the library.
pub fn install(a: &KeyArgs) -> Result<()> {
    for f in &a.key_file {
        keys::add(keys::read_key_file(f).map_err(anyhow::Error::msg)?);
    }
    for o in &a.object {
        let (id, secret) = secret_object(o).with_context(|| format!("--object {o}"))?;
        keys::add_named(&id, secret);
    }
    if let Some(f) = &a.target_key_file {
        keys::set_target(keys::read_key_file(f).map_err(anyhow::Error::msg)?);
    }
    Ok(())
}

/// Parses `secret,id=ID,file=F|data=D[,format=raw|base64]`.
fn secret_object(spec: &str) -> Result<(String, keys::Secret)> {
    let mut parts = spec.split(',');
    match parts.next() {
        Some("secret") => {}
        Some(other) => bail!("only secret objects are supported, not '{other}'"),
        None => bail!("empty object"),
    }
    let (mut id, mut file, mut data, mut base64) = (None, None, None, false);
    for p in parts {
        match p.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("file", v)) => file = Some(PathBuf::from(v)),
            Some(("data", v)) => data = Some(keys::Secret::new(v.as_bytes().to_vec())),
            Some(("format", "raw")) => base64 = false,
            Some(("format", "base64")) => base64 = true,
            _ => bail!("unknown secret property '{p}'"),
        }
    }
    let id = id.context("a secret needs id=ID")?;
    let mut secret = match (file, data) {
        (Some(f), None) => read_raw(&f)?,
        (None, Some(d)) => d,
        _ => bail!("a secret needs exactly one of file=FILE and data=TEXT"),
    };
    if base64 {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(secret.trim_ascii())
            .context("the secret is not valid base64")?;
        secret = keys::Secret::new(decoded);
    }
    keys::check_passphrase(&secret).map_err(anyhow::Error::msg)?;
    Ok((id, secret))
}

/// A secret file's bytes (checked as a passphrase by the caller, after any decoding).
fn read_raw(path: &Path) -> Result<keys::Secret> {
    let bytes = std::fs::read(path).with_context(|| format!("secret file {}", path.display()))?;
    Ok(keys::Secret::new(bytes))
}

/// With `--image-opts` anywhere on the command line, each argument that is an option list
/// naming `file.filename` becomes that file name (the format is probed, the secrets are
/// all tried); without it, the arguments are returned unchanged.
pub fn image_opts_args(args: Vec<OsString>) -> Vec<OsString> {
    if !args.iter().any(|a| a == "--image-opts") {
        return args;
    }
    args.into_iter()
        .map(|a| {
            let Some(s) = a.to_str() else { return a };
            if s.starts_with('-') || !s.contains('=') {
                return a;
            }
            s.split(',')
                .find_map(|kv| kv.strip_prefix("file.filename="))
                .map(OsString::from)
                .unwrap_or(a)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_opts_become_file_names() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let got = image_opts_args(args(&[
            "qmprestore",
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=/b/x.qcow2,encrypt.key-secret=s",
        ]));
        assert_eq!(got[3], "/b/x.qcow2");
        let untouched = args(&[
            "qmprestore",
            "create",
            "-o",
            "encrypt.format=luks",
            "x",
            "1M",
        ]);
        assert_eq!(image_opts_args(untouched.clone()), untouched);
    }

    #[test]
    fn secret_objects() {
        let (id, s) = secret_object("secret,id=s0,data=pw").unwrap();
        assert_eq!((id.as_str(), &s[..]), ("s0", &b"pw"[..]));
        let (_, s) = secret_object("secret,id=s1,data=cHc=,format=base64").unwrap();
        assert_eq!(&s[..], b"pw");
        assert!(secret_object("tls-creds-x509,id=t").is_err());
        assert!(secret_object("secret,data=pw").is_err());
        assert!(secret_object("secret,id=a,file=/nonexistent/k").is_err());
    }
}
