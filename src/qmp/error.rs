//! Errors of the QMP and guest-agent clients.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed (the cause is in the message, not chained again: callers print
    /// error chains, which would say it twice).
    #[error("{addr}: {err}")]
    Io { addr: String, err: std::io::Error },
    #[error("{addr}: no answer within {} s while waiting for {what} (is another client connected to this socket?)", .after.as_secs_f64())]
    Timeout {
        addr: String,
        what: String,
        after: Duration,
    },
    #[error("{addr}: connection closed by QEMU while waiting for {what}")]
    Closed { addr: String, what: String },
    #[error("{addr}: protocol error: {problem}")]
    Protocol { addr: String, problem: String },
    /// QEMU refused a command; `class` is QMP's error class (e.g. `GenericError`).
    #[error("{command} failed: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("invalid socket address {0:?}: {1}")]
    Address(String, String),
}

impl QmpError {
    /// Turns an I/O error on the socket at `addr` into [`QmpError::Io`].
    pub fn io(addr: &str) -> impl Fn(std::io::Error) -> QmpError + Copy + '_ {
        move |err| QmpError::Io {
            addr: addr.to_string(),
            err,
        }
    }

    /// The text QEMU gave for a refused command, if this is one.
    pub fn desc(&self) -> Option<&str> {
        match self {
            QmpError::Command { desc, .. } => Some(desc),
            _ => None,
        }
    }
}

pub type Result<T, E = QmpError> = std::result::Result<T, E>;
