//! Where the server accepts connections: a unix socket it creates, TCP addresses, or sockets
//! handed over by systemd (`LISTEN_FDS`).
//!
//! Backups are precious and often private, so the defaults are the safe ones: a unix socket
//! is created mode 0600 and never replaces a file that is not a stale socket (qemu-nbd removes
//! whatever is at the path); TCP binds only where told, and an address other than loopback
//! needs TLS or an explicit `--insecure`.

use super::error::ServeError;
use super::wire::Socket;
use std::io;
use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// A listening socket.
pub enum Listener {
    /// `path` is the socket file this server created (removed when the listener is dropped).
    Unix {
        listener: UnixListener,
        path: Option<PathBuf>,
    },
    Tcp(TcpListener),
}

impl Listener {
    /// Creates the unix socket `path` (mode 0600), replacing only a stale socket.
    pub fn unix(path: &Path) -> Result<Listener, ServeError> {
        let io_err = |e| ServeError::Io(path.to_path_buf(), e);
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(ServeError::Refused(format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                )))
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(ServeError::Refused(format!(
                        "{} is in use by a running server",
                        path.display()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(io_err)?
                }
                Err(e) => return Err(io_err(e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        // The socket is born owner-only: no moment exists in which others could connect.
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        unsafe { libc::umask(old) };
        Ok(Listener::Unix {
            listener: bound.map_err(io_err)?,
            path: Some(path.to_path_buf()),
        })
    }

    /// Binds every address `addr` (HOST:PORT) resolves to. Addresses other than loopback are
    /// refused unless the connection will be encrypted or `insecure` says the network is
    /// trusted.
    pub fn tcp(addr: &str, encrypted: bool, insecure: bool) -> Result<Vec<Listener>, ServeError> {
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .map_err(|e| ServeError::Refused(format!("--listen {addr}: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(ServeError::Refused(format!("--listen {addr}: no address")));
        }
        if let Some(open) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            if !encrypted && !insecure {
                return Err(ServeError::Refused(format!(
                    "refusing to serve backups in the clear on {open}, which is not a loopback address: pass --tls-creds DIR, or --insecure if the network is trusted"
                )));
            }
        }
        addrs
            .iter()
            .map(|a| {
                TcpListener::bind(a)
                    .map(Listener::Tcp)
                    .map_err(|e| ServeError::Refused(format!("--listen {a}: {e}")))
            })
            .collect()
    }

    /// The sockets systemd passed (`LISTEN_PID` is this process, `LISTEN_FDS` of them from
    /// fd 3), or `None` when not socket-activated.
    pub fn inherited() -> Result<Option<Vec<Listener>>, ServeError> {
        let pid = std::env::var("LISTEN_PID").ok();
        let fds = std::env::var("LISTEN_FDS").ok();
        let (Some(pid), Some(fds)) = (pid, fds) else {
            return Ok(None);
        };
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return Ok(None);
        }
        let n: RawFd = fds
            .parse()
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| ServeError::Refused(format!("LISTEN_FDS={fds} is not a count")))?;
        (3..3 + n)
            .map(Listener::from_fd)
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn from_fd(fd: RawFd) -> Result<Listener, ServeError> {
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: getsockname writes at most `len` bytes into `addr`.
        let r = unsafe {
            libc::getsockname(
                fd,
                (&mut addr as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(ServeError::Refused(format!(
                "LISTEN_FDS: fd {fd} is not a socket: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: systemd hands these descriptors to this process alone; each is owned once.
        Ok(match i32::from(addr.ss_family) {
            libc::AF_UNIX => Listener::Unix {
                listener: unsafe { UnixListener::from_raw_fd(fd) },
                path: None,
            },
            _ => Listener::Tcp(unsafe { TcpListener::from_raw_fd(fd) }),
        })
    }

    pub fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Unix { listener, .. } => listener.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }

    /// Accepts one waiting connection (the listener is non-blocking; the socket is not).
    pub fn accept(&self) -> io::Result<Socket> {
        let sock = match self {
            Listener::Unix { listener, .. } => Socket::Unix(listener.accept()?.0),
            Listener::Tcp(l) => Socket::Tcp(l.accept()?.0),
        };
        match &sock {
            Socket::Unix(s) => s.set_nonblocking(false)?,
            Socket::Tcp(s) => s.set_nonblocking(false)?,
        }
        sock.set_nodelay();
        Ok(sock)
    }

    /// The NBD URI of export `name` here, for the start-up message.
    pub fn uri(&self, name: &str, tls: bool) -> String {
        let s = if tls { "s" } else { "" };
        match self {
            Listener::Unix { listener, path: _ } => {
                let at = listener
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                    .unwrap_or_default();
                format!("nbd{s}+unix:///{name}?socket={at}")
            }
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("nbd{s}://{a}/{name}"),
                Err(_) => String::new(),
            },
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix { listener, .. } => listener.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix {
            path: Some(path), ..
        } = self
        {
            if std::fs::symlink_metadata(&*path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(&*path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_socket_is_private_and_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("precious");
        std::fs::write(&file, b"data").unwrap();
        assert!(matches!(Listener::unix(&file), Err(ServeError::Refused(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"data");

        let sock = dir.path().join("nbd.sock");
        let live = Listener::unix(&sock).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Listener::unix(&sock);
        assert!(
            matches!(&again, Err(ServeError::Refused(m)) if m.contains("in use")),
            "a live socket is not replaced"
        );
        drop(live);
        assert!(!sock.exists(), "the server removes its socket");
        // A stale socket (its server gone without cleaning up) is replaced.
        let stale = UnixListener::bind(dir.path().join("other.sock")).unwrap();
        drop(stale);
        Listener::unix(&dir.path().join("other.sock")).unwrap();
    }

    #[test]
    fn clear_text_only_on_loopback() {
        let open = Listener::tcp("0.0.0.0:0", false, false);
        assert!(matches!(open, Err(ServeError::Refused(m)) if m.contains("--insecure")));
        assert_eq!(Listener::tcp("127.0.0.1:0", false, false).unwrap().len(), 1);
        assert_eq!(Listener::tcp("0.0.0.0:0", true, false).unwrap().len(), 1);
        assert_eq!(Listener::tcp("0.0.0.0:0", false, true).unwrap().len(), 1);
    }
}
