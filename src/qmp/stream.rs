//! One connection to a QMP or guest-agent socket: newline-delimited JSON with a deadline on
//! every read.
//!
//! Reads go through our own line buffer, so a read that times out halfway through a line loses
//! nothing: the next read continues the same line.

use super::addr::Address;
use super::error::{QmpError, Result};
use crate::net::Socket;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The longest line accepted from QEMU (query-qmp-schema is a few hundred KiB).
const MAX_LINE: usize = 16 << 20;

pub(super) struct Conn {
    pub addr: String,
    reader: BufReader<Socket>,
    writer: Socket,
    pending: Vec<u8>,
}

impl Conn {
    pub fn connect(addr: &Address, timeout: Duration) -> Result<Conn> {
        let name = addr.to_string();
        let io_err = QmpError::io(&name);
        let socket = match addr {
            Address::Unix(path) => Socket::Unix(UnixStream::connect(path).map_err(io_err)?),
            Address::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
                let mut found = None;
                for sa in (host.as_str(), *port).to_socket_addrs().map_err(io_err)? {
                    match TcpStream::connect_timeout(&sa, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                Socket::Tcp(found.ok_or_else(|| io_err(last))?)
            }
        };
        Conn::over(socket, name, timeout)
    }

    /// A connection over one end of a socket pair (the fuzz target feeds the other end).
    pub fn over_unix(stream: UnixStream, name: &str, timeout: Duration) -> Result<Conn> {
        Conn::over(Socket::Unix(stream), name.to_string(), timeout)
    }

    fn over(socket: Socket, name: String, timeout: Duration) -> Result<Conn> {
        let io_err = QmpError::io(&name);
        socket.set_write_timeout(timeout).map_err(io_err)?;
        let writer = socket.try_clone().map_err(io_err)?;
        Ok(Conn {
            addr: name,
            reader: BufReader::new(socket),
            writer,
            pending: Vec::new(),
        })
    }

    fn io(&self, err: io::Error) -> QmpError {
        QmpError::io(&self.addr)(err)
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer
            .write_all(bytes)
            .map_err(QmpError::io(&self.addr))
    }

    /// Reads up to and including `delim`, or returns `None` when `deadline` passes first.
    /// Returns the bytes before `delim`.
    pub fn read_until(
        &mut self,
        delim: u8,
        deadline: Instant,
        what: &str,
    ) -> Result<Option<Vec<u8>>> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).max(Duration::from_millis(1));
            self.reader
                .get_ref()
                .set_read_timeout(wait)
                .map_err(|e| self.io(e))?;
            match self.reader.read_until(delim, &mut self.pending) {
                Ok(0) => {
                    return Err(QmpError::Closed {
                        addr: self.addr.clone(),
                        what: what.to_string(),
                    })
                }
                Ok(_) if self.pending.last() == Some(&delim) => {
                    let mut line = std::mem::take(&mut self.pending);
                    line.pop();
                    return Ok(Some(line));
                }
                // EOF in the middle of a line: the next read reports the close.
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(self.io(e)),
            }
            if self.pending.len() > MAX_LINE {
                return Err(QmpError::Protocol {
                    addr: self.addr.clone(),
                    problem: format!("message longer than {MAX_LINE} bytes"),
                });
            }
        }
    }

    /// Reads one line, failing with [`QmpError::Timeout`] at `deadline`.
    pub fn line(&mut self, deadline: Instant, what: &str, waited: Duration) -> Result<Vec<u8>> {
        self.read_until(b'\n', deadline, what)?
            .ok_or_else(|| QmpError::Timeout {
                addr: self.addr.clone(),
                what: what.to_string(),
                after: waited,
            })
    }
}
