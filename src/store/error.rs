//! What can be wrong with a backup folder.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}", crate::qcow2::error::named(.0, .1))]
    Io(PathBuf, std::io::Error),
    /// The folder's contents do not make a restorable chain.
    #[error("{dir}: {problem}")]
    Layout { dir: PathBuf, problem: String },
    #[error(transparent)]
    Image(#[from] crate::qcow2::Error),
    /// A backup file that must not be followed or stacked, and why.
    #[error("{0}")]
    Refused(String),
}
