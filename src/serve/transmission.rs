//! The transmission phase: requests are read in order on the connection's thread and answered
//! in parallel by a shared pool of workers, replies going out whole, in any order, under the
//! connection's write lock (the cookie pairs them with their requests).
//!
//! Memory is bounded twice: a connection has at most [`MAX_IN_FLIGHT`] requests being
//! answered (the reader stops reading until one is done, which backpressures the client), and
//! read buffers across all connections come out of one [`Budget`]. The export is read-only:
//! writes are refused with `NBD_EPERM` after their payload is consumed, so the stream stays in
//! step.

use super::export::{Context, Export, Source, MAX_PAYLOAD};
use super::handshake::{read_or_eof, Session};
use super::proto::{self, cflag, chunk, cmd, Errno, Request};
use super::wire::Socket;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Requests of one connection answered at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// `NBD_CMD_CACHE` warms the range in steps of this size.
const CACHE_STEP: u64 = 1 << 20;

/// Bytes of read buffers the whole server may hold at once.
pub struct Budget {
    left: Mutex<u64>,
    freed: Condvar,
    cap: u64,
}

/// A share of the [`Budget`], returned when dropped.
pub struct Lease {
    budget: Arc<Budget>,
    n: u64,
}

impl Budget {
    pub fn new(cap: u64) -> Arc<Budget> {
        Arc::new(Budget {
            left: Mutex::new(cap),
            freed: Condvar::new(),
            cap,
        })
    }

    /// Waits until `n` bytes (at most the whole budget) are free and takes them.
    pub fn take(self: &Arc<Self>, n: u64) -> Lease {
        let n = n.min(self.cap);
        let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        while *left < n {
            left = self.freed.wait(left).unwrap_or_else(|p| p.into_inner());
        }
        *left -= n;
        Lease {
            budget: self.clone(),
            n,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut left = self.budget.left.lock().unwrap_or_else(|p| p.into_inner());
        *left += self.n;
        self.budget.freed.notify_all();
    }
}

/// What every connection shares: the workers and the buffer budget.
pub struct Workers {
    pub pool: rayon::ThreadPool,
    pub budget: Arc<Budget>,
}

/// Counts a connection's requests being answered.
#[derive(Default)]
struct InFlight {
    n: Mutex<usize>,
    changed: Condvar,
}

impl InFlight {
    fn enter(&self) {
        let mut n = self.n.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= MAX_IN_FLIGHT {
            n = self.changed.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
    }

    fn leave(&self) {
        *self.n.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.changed.notify_all();
    }

    fn wait_idle(&self) {
        let mut n = self.n.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            n = self.changed.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The replying side of one connection.
struct Conn {
    export: Arc<Export>,
    structured: bool,
    contexts: Vec<Context>,
    out: Mutex<Box<dyn Write + Send>>,
    /// Set once a reply could not be written: the client is gone.
    broken: AtomicBool,
    /// To end the connection when writing fails.
    ctl: Option<Socket>,
    /// The socket, when replies go to it unencrypted: file data is then sent with
    /// `sendfile`, page cache to socket, never through a buffer of ours.
    direct: Option<RawFd>,
}

/// Serves requests until the client disconnects (`NBD_CMD_DISC` or EOF) or breaks the
/// protocol; every request read is answered before this returns.
pub fn transmit(session: Session, workers: &Arc<Workers>, ctl: Option<Socket>) -> io::Result<()> {
    let Session {
        stream,
        export,
        structured,
        contexts,
    } = session;
    let direct = ctl
        .as_ref()
        .filter(|_| !stream.is_tls())
        .map(Socket::as_raw_fd);
    let (mut reader, writer) = stream.split()?;
    let conn = Arc::new(Conn {
        direct,
        export,
        structured,
        contexts,
        out: Mutex::new(writer),
        broken: AtomicBool::new(false),
        ctl,
    });
    let in_flight = Arc::new(InFlight::default());
    let result = serve_requests(&mut reader, &conn, workers, &in_flight);
    in_flight.wait_idle();
    result
}

fn serve_requests(
    reader: &mut dyn Read,
    conn: &Arc<Conn>,
    workers: &Arc<Workers>,
    in_flight: &Arc<InFlight>,
) -> io::Result<()> {
    let mut head = [0u8; Request::LEN];
    loop {
        if conn.broken.load(Ordering::Relaxed) || !read_or_eof(reader, &mut head)? {
            return Ok(());
        }
        let Some(req) = Request::parse(&head) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request without the request magic",
            ));
        };
        match req.kind {
            cmd::DISC => return Ok(()),
            cmd::WRITE => {
                if req.length > MAX_PAYLOAD {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("write payload of {} bytes", req.length),
                    ));
                }
                io::copy(&mut reader.take(u64::from(req.length)), &mut io::sink())?;
                conn.fail(&req, Errno::Perm, "the export is read-only");
            }
            cmd::TRIM | cmd::WRITE_ZEROES => {
                conn.fail(&req, Errno::Perm, "the export is read-only")
            }
            cmd::FLUSH if req.flags == 0 => conn.send(&proto::simple_reply(None, req.cookie)),
            cmd::READ | cmd::BLOCK_STATUS | cmd::CACHE | cmd::FLUSH => {
                if let Err((errno, msg)) = conn.check(&req) {
                    conn.fail(&req, errno, &msg);
                    continue;
                }
                let cost = match req.kind {
                    cmd::READ => u64::from(req.length),
                    cmd::CACHE => CACHE_STEP.min(u64::from(req.length)),
                    _ => 0,
                };
                in_flight.enter();
                let lease = workers.budget.take(cost);
                let (conn, in_flight) = (conn.clone(), in_flight.clone());
                workers.pool.spawn(move || {
                    conn.answer(&req);
                    drop(lease);
                    in_flight.leave();
                });
            }
            _ => conn.fail(&req, Errno::Inval, "unknown command"),
        }
    }
}

impl Conn {
    /// Checks a request's flags and range before any work is queued.
    fn check(&self, req: &Request) -> Result<(), (Errno, String)> {
        let allowed = match req.kind {
            cmd::READ if self.structured => cflag::DF,
            cmd::BLOCK_STATUS => cflag::REQ_ONE,
            _ => 0,
        };
        if req.flags & !allowed != 0 {
            return Err((
                Errno::Inval,
                format!("flags {:#x} not valid here", req.flags),
            ));
        }
        if req.kind == cmd::BLOCK_STATUS && self.contexts.is_empty() {
            return Err((
                Errno::Inval,
                "no metadata context was negotiated for this export".into(),
            ));
        }
        if req.kind == cmd::BLOCK_STATUS && req.length == 0 {
            return Err((Errno::Inval, "block status of an empty range".into()));
        }
        if req.kind == cmd::READ && req.length > MAX_PAYLOAD {
            return Err((
                Errno::Overflow,
                format!("reads are limited to {MAX_PAYLOAD} bytes"),
            ));
        }
        let size = self.export.size();
        if req.offset > size || u64::from(req.length) > size - req.offset {
            return Err((
                Errno::Inval,
                format!(
                    "range {}+{} lies beyond the end of the export ({size} bytes)",
                    req.offset, req.length
                ),
            ));
        }
        Ok(())
    }

    /// Answers a checked request (on a worker).
    fn answer(&self, req: &Request) {
        let done = match req.kind {
            cmd::READ => self.read(req),
            cmd::BLOCK_STATUS => self.block_status(req),
            cmd::CACHE => self.cache(req),
            _ => {
                self.send(&proto::simple_reply(None, req.cookie));
                Ok(())
            }
        };
        if let Err(e) = done {
            tracing::warn!("NBD request {:?} failed: {e}", req);
            self.fail(req, Errno::Io, &e.to_string());
        }
    }

    fn read(&self, req: &Request) -> crate::qcow2::Result<()> {
        let (off, len) = (req.offset, u64::from(req.length));
        if let (Some(fd), true, false) = (self.direct, self.structured, req.flags & cflag::DF != 0)
        {
            return self.read_direct(req, fd);
        }
        let mut buf = vec![0u8; len as usize];
        if !self.structured {
            self.export.read(&mut buf, off)?;
            self.write_parts(|w| {
                w.write_all(&proto::simple_reply(None, req.cookie))?;
                w.write_all(&buf)
            });
            return Ok(());
        }
        let pieces = if req.flags & cflag::DF != 0 || len == 0 {
            vec![super::export::Piece {
                offset: off,
                len,
                hole: false,
            }]
        } else {
            self.export.pieces(off, len)?
        };
        for p in pieces.iter().filter(|p| !p.hole) {
            let at = (p.offset - off) as usize;
            self.export
                .read(&mut buf[at..at + p.len as usize], p.offset)?;
        }
        let last = pieces.len() - 1;
        self.write_parts(|w| {
            for (i, p) in pieces.iter().enumerate() {
                let flags = if i == last { chunk::FLAG_DONE } else { 0 };
                if p.len == 0 {
                    w.write_all(&proto::chunk_header(flags, chunk::NONE, req.cookie, 0))?;
                } else if p.hole {
                    let mut m =
                        proto::chunk_header(flags, chunk::OFFSET_HOLE, req.cookie, 12).to_vec();
                    m.extend_from_slice(&p.offset.to_be_bytes());
                    m.extend_from_slice(&(p.len as u32).to_be_bytes());
                    w.write_all(&m)?;
                } else {
                    let mut m = proto::chunk_header(
                        flags,
                        chunk::OFFSET_DATA,
                        req.cookie,
                        8 + p.len as u32,
                    )
                    .to_vec();
                    m.extend_from_slice(&p.offset.to_be_bytes());
                    w.write_all(&m)?;
                    let at = (p.offset - off) as usize;
                    w.write_all(&buf[at..at + p.len as usize])?;
                }
            }
            Ok(())
        });
        Ok(())
    }

    /// A structured read whose file data goes out with `sendfile`. Every content chunk is
    /// sent whole even if the file fails under it (padded with zeros, as the spec requires),
    /// so the reply ends with a separate chunk: `NBD_REPLY_TYPE_NONE`, or the error.
    fn read_direct(&self, req: &Request, fd: RawFd) -> crate::qcow2::Result<()> {
        let runs = self.export.runs(req.offset, u64::from(req.length))?;
        let mut reads: Vec<Vec<u8>> = Vec::new();
        for r in runs.iter().filter(|r| matches!(r.source, Source::Read)) {
            let mut buf = vec![0u8; r.len as usize];
            self.export.read(&mut buf, r.offset)?;
            reads.push(buf);
        }
        self.write_parts(|w| {
            let mut reads = reads.iter();
            let mut failed = None;
            for r in &runs {
                let hole = matches!(r.source, Source::Hole);
                let (kind, len) = if hole {
                    (chunk::OFFSET_HOLE, 12)
                } else {
                    (chunk::OFFSET_DATA, 8 + r.len as u32)
                };
                let mut m = proto::chunk_header(0, kind, req.cookie, len).to_vec();
                m.extend_from_slice(&r.offset.to_be_bytes());
                if hole {
                    m.extend_from_slice(&(r.len as u32).to_be_bytes());
                }
                w.write_all(&m)?;
                match r.source {
                    Source::Hole => {}
                    Source::Read => w.write_all(reads.next().expect("one buffer per read run"))?,
                    Source::File(f, host) => {
                        let sent = send_file(fd, f, host, r.len);
                        if let Err((_, e)) = &sent {
                            failed.get_or_insert(format!("reading the backup failed: {e}"));
                        }
                        let done = sent.unwrap_or_else(|(n, _)| n);
                        pad_zeros(w, r.len - done)?;
                    }
                }
            }
            match failed {
                None => w.write_all(&proto::chunk_header(
                    chunk::FLAG_DONE,
                    chunk::NONE,
                    req.cookie,
                    0,
                )),
                Some(msg) => w.write_all(&error_chunk(req.cookie, Errno::Io, &msg)),
            }
        });
        Ok(())
    }

    fn block_status(&self, req: &Request) -> crate::qcow2::Result<()> {
        let one = req.flags & cflag::REQ_ONE != 0;
        let all = self
            .export
            .status(req.offset, u64::from(req.length), &self.contexts, one)?;
        let mut m = Vec::new();
        let last = all.len() - 1;
        for (i, (ctx, descs)) in self.contexts.iter().zip(&all).enumerate() {
            let flags = if i == last { chunk::FLAG_DONE } else { 0 };
            let len = 4 + 8 * descs.len() as u32;
            m.extend_from_slice(&proto::chunk_header(
                flags,
                chunk::BLOCK_STATUS,
                req.cookie,
                len,
            ));
            m.extend_from_slice(&ctx.id().to_be_bytes());
            for (n, f) in descs {
                m.extend_from_slice(&n.to_be_bytes());
                m.extend_from_slice(&f.to_be_bytes());
            }
        }
        self.write_parts(|w| w.write_all(&m));
        Ok(())
    }

    /// Reads the range so that the chain's metadata and data are cached for what follows.
    fn cache(&self, req: &Request) -> crate::qcow2::Result<()> {
        let end = req.offset + u64::from(req.length);
        let mut buf = vec![0u8; CACHE_STEP.min(u64::from(req.length)) as usize];
        let mut pos = req.offset;
        while pos < end {
            let n = CACHE_STEP.min(end - pos) as usize;
            self.export.read(&mut buf[..n], pos)?;
            pos += n as u64;
        }
        self.send(&proto::simple_reply(None, req.cookie));
        Ok(())
    }

    /// Refuses a request: a structured error chunk with a message when structured replies
    /// were negotiated (required for reads), else a simple reply.
    fn fail(&self, req: &Request, errno: Errno, message: &str) {
        if !self.structured {
            return self.send(&proto::simple_reply(Some(errno), req.cookie));
        }
        let msg = &message.as_bytes()[..message.len().min(proto::MAX_STRING)];
        let mut m = proto::chunk_header(
            chunk::FLAG_DONE,
            chunk::ERROR,
            req.cookie,
            6 + msg.len() as u32,
        )
        .to_vec();
        m.extend_from_slice(&(errno as u32).to_be_bytes());
        m.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        m.extend_from_slice(msg);
        self.send(&m);
    }

    fn send(&self, bytes: &[u8]) {
        self.write_parts(|w| w.write_all(bytes));
    }

    /// Writes one whole reply under the write lock. A failed write means the client is gone:
    /// the connection is shut down so that its reader stops too.
    fn write_parts(&self, f: impl FnOnce(&mut dyn Write) -> io::Result<()>) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f(&mut **out) {
            tracing::debug!("NBD client gone while replying: {e}");
            self.broken.store(true, Ordering::Relaxed);
            if let Some(s) = &self.ctl {
                s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// A final error chunk with a message for the person at the client.
fn error_chunk(cookie: u64, errno: Errno, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(proto::MAX_STRING)];
    let mut m =
        proto::chunk_header(chunk::FLAG_DONE, chunk::ERROR, cookie, 6 + msg.len() as u32).to_vec();
    m.extend_from_slice(&(errno as u32).to_be_bytes());
    m.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    m.extend_from_slice(msg);
    m
}

/// Sends `len` bytes of `file` at `offset` to the socket `fd` in the kernel. Returns how many
/// were sent: fewer than `len` at the end of the file (the rest reads as zeros), or with the
/// error that stopped it.
fn send_file(
    fd: RawFd,
    file: &std::fs::File,
    offset: u64,
    len: u64,
) -> Result<u64, (u64, io::Error)> {
    let mut off = offset as libc::off_t;
    let mut sent = 0u64;
    while sent < len {
        let want = (len - sent).min(1 << 30) as usize;
        // SAFETY: both descriptors are open for the call; `off` is a valid off_t the kernel
        // advances.
        let n = unsafe { libc::sendfile(fd, file.as_raw_fd(), &mut off, want) };
        match n {
            0 => break,
            n if n > 0 => sent += n as u64,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err((sent, e));
                }
            }
        }
    }
    Ok(sent)
}

/// Writes `n` zero bytes.
fn pad_zeros(w: &mut dyn Write, mut n: u64) -> io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}
