//! The byte stream under a connection: a unix or TCP socket, in the clear or, after
//! `NBD_OPT_STARTTLS`, inside TLS.
//!
//! Negotiation runs on one [`Stream`]. The transmission phase reads requests on the
//! connection's thread while worker threads write replies, so the stream is then split: in the
//! clear both halves are clones of the socket; under TLS both share the rustls connection
//! state behind a mutex, and the reader holds it only to decrypt what it has already received,
//! never while it waits on the socket, so replies are not held up by an idle client.

pub use crate::net::Socket;
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

/// The negotiation phase's stream.
pub enum Stream {
    Plain(Socket),
    Tls(Box<StreamOwned<ServerConnection, Socket>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Runs the TLS handshake as the server (after `NBD_REP_ACK` to `NBD_OPT_STARTTLS`).
    pub fn start_tls(self, config: &Arc<ServerConfig>) -> io::Result<Stream> {
        let Stream::Plain(mut sock) = self else {
            return Err(io::Error::other("TLS is already running"));
        };
        let mut conn = ServerConnection::new(config.clone()).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        Ok(Stream::Tls(Box::new(StreamOwned::new(conn, sock))))
    }

    /// Splits the stream into a reading half and a shareable writing half.
    pub fn split(self) -> io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
        match self {
            Stream::Plain(sock) => Ok((Box::new(sock.try_clone()?), Box::new(sock))),
            Stream::Tls(s) => {
                let StreamOwned { conn, sock } = *s;
                let out = sock.try_clone()?;
                let conn = Arc::new(Mutex::new(conn));
                let reader = TlsReader {
                    conn: conn.clone(),
                    sock,
                    out: out.try_clone()?,
                    raw: vec![0; 1 << 14],
                };
                Ok((Box::new(reader), Box::new(TlsWriter { conn, sock: out })))
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

fn lock(conn: &Mutex<ServerConnection>) -> std::sync::MutexGuard<'_, ServerConnection> {
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

/// Decrypts what the client sends.
struct TlsReader {
    conn: Arc<Mutex<ServerConnection>>,
    sock: Socket,
    /// For TLS records the reader must answer (alerts, key updates).
    out: Socket,
    raw: Vec<u8>,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match lock(&self.conn).reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Ok(0) is the client's close_notify; a plain EOF without it is an error.
                other => return other,
            }
            // Nothing decrypted is waiting: read ciphertext without holding the state.
            let n = self.sock.read(&mut self.raw)?;
            if n == 0 {
                return Ok(0);
            }
            let mut c = lock(&self.conn);
            let mut rest = &self.raw[..n];
            while !rest.is_empty() {
                c.read_tls(&mut rest)?;
                c.process_new_packets().map_err(io::Error::other)?;
            }
            while c.wants_write() {
                c.write_tls(&mut self.out)?;
            }
        }
    }
}

/// Encrypts replies; each `write` is sent before the state is released.
struct TlsWriter {
    conn: Arc<Mutex<ServerConnection>>,
    sock: Socket,
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut c = lock(&self.conn);
        let n = c.writer().write(buf)?;
        while c.wants_write() {
            c.write_tls(&mut self.sock)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
