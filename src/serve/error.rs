//! What can keep `serve` from starting. Once it serves, a client's misbehaviour never becomes
//! an error of the server: that connection is answered or closed, and the others go on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Image(#[from] crate::qcow2::Error),
    /// TLS credentials that cannot be used, naming the file.
    #[error("{0}: {1}")]
    Tls(PathBuf, String),
    /// A request the server will not carry out (unsafe listen address, name clash, ...).
    #[error("{0}")]
    Refused(String),
}
