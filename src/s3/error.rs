//! What can go wrong talking to an object store, in words that say what to do about it.

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("{0}: {1}")]
    Url(String, String),
    /// The configuration (environment, `~/.aws` files) is incomplete or unreadable.
    #[error("object store configuration: {0}")]
    Config(String),
    /// The store answered with an error status.
    #[error("{what}: {problem}")]
    Status {
        what: String,
        status: u16,
        problem: String,
    },
    /// The object changed since it was opened (its ETag no longer matches).
    #[error("{0}: the object was replaced since it was opened (ETag {1} no longer matches); refusing to mix versions of a backup file")]
    Changed(String, String),
    /// No answer, or a broken connection, after every retry.
    #[error("{0}: {1}")]
    Transport(String, String),
    /// An answer that does not say what S3 answers say.
    #[error("{0}: unexpected answer from the store: {1}")]
    Reply(String, String),
}

impl S3Error {
    pub fn status(&self) -> Option<u16> {
        match self {
            S3Error::Status { status, .. } => Some(*status),
            S3Error::Changed(..) => Some(412),
            _ => None,
        }
    }
}

impl From<S3Error> for std::io::Error {
    fn from(e: S3Error) -> std::io::Error {
        use std::io::ErrorKind;
        let kind = match e.status() {
            Some(404) => ErrorKind::NotFound,
            Some(401 | 403) => ErrorKind::PermissionDenied,
            _ => ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}
