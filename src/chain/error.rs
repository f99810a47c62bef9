//! Errors of the restore-side commands.

use super::dir::DirError;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error(transparent)]
    Image(#[from] crate::qcow2::Error),
    /// The command will not do what was asked, and says why (nothing was changed).
    #[error("{0}")]
    Refused(String),
}

pub type Result<T, E = ChainError> = std::result::Result<T, E>;
