//! Errors of the format engine.
//!
//! Every error names the file it is about: a restore that fails on the worst day must tell the
//! admin which of thirty backup files is damaged and how, not just "invalid data". Parsers of
//! single on-disk structures return an [`ErrorKind`] (they do not know the file); the image
//! layer attaches the path with [`ErrorKind::at`].

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, without the file it happened in.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    /// The operating system refused a read or an open.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The image violates the qcow2 specification or QEMU's limits.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// A valid image that uses something this tool does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// The backing chain cannot be followed (missing file, loop, too deep).
    #[error("backing chain: {0}")]
    Backing(String),
    /// The caller asked for something the image does not have (e.g. a snapshot name).
    #[error("{0}")]
    NotFound(String),
    /// The image is encrypted and cannot be opened as asked (no key, a wrong key, a header
    /// that cannot be used).
    #[error("encryption: {0}")]
    Encryption(String),
    /// Another process (a running QEMU) holds the image's write lock.
    #[error("{0}")]
    InUse(String),
}

impl ErrorKind {
    /// Attaches the file this error concerns.
    pub fn at(self, path: impl AsRef<Path>) -> Error {
        Error {
            path: path.as_ref().to_path_buf(),
            kind: self,
        }
    }
}

impl ErrorKind {
    /// The problem alone, without the "corrupt image: " that says what kind it is: for
    /// reports that list problems (`check`'s), where every line is one.
    pub fn detail(&self) -> String {
        match self {
            ErrorKind::Corrupt(m) => m.clone(),
            other => other.to_string(),
        }
    }
}

/// Shorthand for a [`ErrorKind::Corrupt`] with a formatted message.
pub(crate) fn corrupt(msg: impl Into<String>) -> ErrorKind {
    ErrorKind::Corrupt(msg.into())
}

/// An error about one image file.
#[derive(Debug)]
pub struct Error {
    pub path: PathBuf,
    pub kind: ErrorKind,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&named(&self.path, &self.kind))
    }
}

/// `path: detail`, or `detail` alone when it already starts by naming `path` (an object
/// store's errors name the object they are about; the name twice helps nobody).
pub fn named(path: &Path, detail: &dyn fmt::Display) -> String {
    let name = path.display().to_string();
    let detail = detail.to_string();
    match detail.strip_prefix(name.as_str()) {
        Some(rest) if rest.starts_with(": ") || rest.starts_with("/: ") => detail,
        _ => format!("{name}: {detail}"),
    }
}

/// The kind is part of the message, so there is no separate source: error chains printed by
/// the binaries would otherwise repeat it.
impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;
