//! Errors of a backup run.

use crate::qmp::QmpError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error(transparent)]
    Image(#[from] crate::qcow2::Error),
    /// The run will not start, and says why; nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// A backup job failed or was cancelled; the run was rolled back.
    #[error("{0}")]
    Failed(String),
    /// Uploading to an object store failed; the local backup files are untouched.
    #[error(transparent)]
    Push(#[from] crate::s3::S3Error),
    #[error("interrupted by a signal: the backup jobs were cancelled and everything they created was removed")]
    Interrupted,
}

impl BackupError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> BackupError {
        let path = path.into();
        move |e| BackupError::Io(path, e)
    }
}

pub type Result<T, E = BackupError> = std::result::Result<T, E>;
