//! Errors of the restore-side commands.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Image(#[from] crate::qcow2::Error),
    /// The command will not do what was asked, and says why (nothing was changed).
    #[error("{0}")]
    Refused(String),
}

pub type Result<T, E = ChainError> = std::result::Result<T, E>;
