//! The negotiation phase: greeting, client flags, then option haggling until the client picks
//! an export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! Every option is read whole into a bounded buffer before it is answered, so a hostile client
//! costs at most [`MAX_OPTION`] bytes; anything that puts the two sides out of step (a wrong
//! magic, unknown client flags, an unknown export after `NBD_OPT_EXPORT_NAME`) ends the
//! connection, as the spec requires. With TLS configured, nothing but `NBD_OPT_STARTTLS` and
//! `NBD_OPT_ABORT` is answered before TLS runs: no export names or sizes leak in the clear.

use super::export::{Context, Export, Exports};
use super::proto::{self, info, opt, rep, Fields};
use super::wire::Stream;
use rustls::ServerConfig;
use std::io::{self, Read, Write};
use std::sync::Arc;

/// The largest option the server reads (names and meta context queries fit many times).
pub const MAX_OPTION: u32 = 64 << 10;
/// Options up to this size are read and refused with `NBD_REP_ERR_TOO_BIG`; larger ones end
/// the connection.
const DRAIN_LIMIT: u32 = 1 << 20;

/// What a successful negotiation agreed on.
pub struct Session {
    pub stream: Stream,
    pub export: Arc<Export>,
    pub structured: bool,
    pub contexts: Vec<Context>,
}

/// How the server negotiates.
pub struct Policy<'a> {
    pub exports: &'a Exports,
    /// TLS credentials: when set, TLS is required.
    pub tls: Option<&'a Arc<ServerConfig>>,
    /// The server is stopping: options are refused with `NBD_REP_ERR_SHUTDOWN`.
    pub stopping: &'a dyn Fn() -> bool,
}

fn violation(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Negotiates on `stream`; `Ok(None)` when the client ended it (`NBD_OPT_ABORT` or EOF).
pub fn negotiate(mut stream: Stream, policy: &Policy) -> io::Result<Option<Session>> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting)?;
    let mut flags = [0u8; 4];
    if !read_or_eof(&mut stream, &mut flags)? {
        return Ok(None);
    }
    let flags = u32::from_be_bytes(flags);
    let known = u32::from(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    if flags & !known != 0 {
        return Err(violation(format!("unknown client flags {flags:#x}")));
    }
    let fixed = flags & u32::from(proto::FLAG_FIXED_NEWSTYLE) != 0;
    let no_zeroes = flags & u32::from(proto::FLAG_NO_ZEROES) != 0;
    let mut state = State {
        structured: false,
        meta: None,
    };
    loop {
        let mut head = [0u8; 16];
        if !read_or_eof(&mut stream, &mut head)? {
            return Ok(None);
        }
        if u64::from_be_bytes(head[0..8].try_into().unwrap()) != proto::IHAVEOPT {
            return Err(violation("option without IHAVEOPT magic"));
        }
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
        if !fixed && option != opt::EXPORT_NAME {
            return Err(violation(format!(
                "option {option} from a client without fixed newstyle"
            )));
        }
        if len > MAX_OPTION {
            if len > DRAIN_LIMIT || option == opt::EXPORT_NAME {
                return Err(violation(format!("option {option} of {len} bytes")));
            }
            io::copy(&mut (&mut stream).take(u64::from(len)), &mut io::sink())?;
            error(
                &mut stream,
                option,
                rep::ERR_TOO_BIG,
                "option data too large",
            )?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data)?;
        let mut reply = Replies {
            stream: &mut stream,
            option,
        };
        let tls_missing = policy.tls.is_some() && !reply.stream.is_tls();
        match option {
            opt::ABORT => {
                // The client may already be gone; either way the session ends.
                let _ = reply.ack();
                return Ok(None);
            }
            opt::STARTTLS => {
                let Some(config) = policy.tls else {
                    reply.error(rep::ERR_UNSUP, "this server is not configured for TLS")?;
                    continue;
                };
                if !data.is_empty() || reply.stream.is_tls() {
                    reply.error(rep::ERR_INVALID, "TLS is already running or data was sent")?;
                    continue;
                }
                reply.ack()?;
                stream = stream.start_tls(config)?;
                // Nothing negotiated in the clear survives the upgrade.
                state = State {
                    structured: false,
                    meta: None,
                };
            }
            opt::EXPORT_NAME => {
                let export = (!tls_missing && !(policy.stopping)())
                    .then(|| policy.exports.find(&data))
                    .flatten()
                    .ok_or_else(|| violation("NBD_OPT_EXPORT_NAME of an unavailable export"))?
                    .clone();
                let mut r = Vec::with_capacity(134);
                r.extend_from_slice(&export.size().to_be_bytes());
                r.extend_from_slice(&export.flags().to_be_bytes());
                if !no_zeroes {
                    r.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&r)?;
                return Ok(Some(state.session(stream, export)));
            }
            _ if tls_missing => reply.error(
                rep::ERR_TLS_REQD,
                "this server requires TLS (NBD_OPT_STARTTLS)",
            )?,
            _ if (policy.stopping)() => {
                reply.error(rep::ERR_SHUTDOWN, "the server is shutting down")?
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply.error(rep::ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for e in policy.exports.iter() {
                    for name in e.names() {
                        let mut d = Vec::new();
                        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        d.extend_from_slice(name.as_bytes());
                        d.extend_from_slice(e.description().as_bytes());
                        reply.send(rep::SERVER, &d)?;
                    }
                }
                reply.ack()?;
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply.error(rep::ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")?;
                    continue;
                }
                state.structured = true;
                reply.ack()?;
            }
            opt::INFO | opt::GO => {
                if let Some(export) = info_or_go(&mut reply, policy.exports, &data)? {
                    if option == opt::GO {
                        return Ok(Some(state.session(stream, export)));
                    }
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                meta_context(&mut reply, policy.exports, &data, &mut state)?
            }
            _ => reply.error(rep::ERR_UNSUP, "option not supported")?,
        }
    }
}

/// Negotiation state that `NBD_OPT_STARTTLS` resets.
struct State {
    structured: bool,
    /// The export and contexts of the last `NBD_OPT_SET_META_CONTEXT`.
    meta: Option<(Arc<Export>, Vec<Context>)>,
}

impl State {
    fn session(self, stream: Stream, export: Arc<Export>) -> Session {
        // Contexts count only for the export they were selected on.
        let contexts = match self.meta {
            Some((e, c)) if Arc::ptr_eq(&e, &export) => c,
            _ => Vec::new(),
        };
        Session {
            stream,
            export,
            structured: self.structured,
            contexts,
        }
    }
}

/// Option replies to one option.
struct Replies<'a> {
    stream: &'a mut Stream,
    option: u32,
}

impl Replies<'_> {
    fn send(&mut self, kind: u32, data: &[u8]) -> io::Result<()> {
        send(self.stream, self.option, kind, data)
    }

    fn ack(&mut self) -> io::Result<()> {
        self.send(rep::ACK, &[])
    }

    fn error(&mut self, kind: u32, message: &str) -> io::Result<()> {
        error(self.stream, self.option, kind, message)
    }
}

fn send(stream: &mut Stream, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut m = proto::option_reply_header(option, kind, data.len() as u32).to_vec();
    m.extend_from_slice(data);
    stream.write_all(&m)
}

/// An error reply carrying a message for the person at the client.
fn error(stream: &mut Stream, option: u32, kind: u32, message: &str) -> io::Result<()> {
    send(stream, option, kind, message.as_bytes())
}

/// Answers `NBD_OPT_INFO`/`NBD_OPT_GO`; returns the export when the answer was a success.
fn info_or_go(
    reply: &mut Replies,
    exports: &Exports,
    data: &[u8],
) -> io::Result<Option<Arc<Export>>> {
    let mut f = Fields(data);
    let parsed = (|| {
        let name = f.string()?;
        let n = f.u16()?;
        let items: Vec<u16> = (0..n).map(|_| f.u16()).collect::<Option<_>>()?;
        f.is_empty().then_some((name, items))
    })();
    let Some((name, items)) = parsed else {
        reply.error(rep::ERR_INVALID, "malformed NBD_OPT_INFO/NBD_OPT_GO data")?;
        return Ok(None);
    };
    let Some(export) = exports.find(name) else {
        let names: Vec<&str> = exports
            .iter()
            .flat_map(|e| e.names())
            .map(|n| if n.is_empty() { "(default)" } else { n })
            .collect();
        let msg = format!(
            "no export named '{}'; exports: {}",
            String::from_utf8_lossy(name),
            names.join(", ")
        );
        reply.error(rep::ERR_UNKNOWN, &msg)?;
        return Ok(None);
    };
    let mut ex = info::EXPORT.to_be_bytes().to_vec();
    ex.extend_from_slice(&export.size().to_be_bytes());
    ex.extend_from_slice(&export.flags().to_be_bytes());
    reply.send(rep::INFO, &ex)?;
    // Block sizes are always sent: the minimum of 1 is the default, so a client that did not
    // ask loses nothing, and one that did learns the preferred and maximum sizes.
    let (min, pref, max) = export.block_sizes();
    let mut bs = info::BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, pref, max] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    reply.send(rep::INFO, &bs)?;
    if items.contains(&info::NAME) {
        let mut d = info::NAME.to_be_bytes().to_vec();
        d.extend_from_slice(name);
        reply.send(rep::INFO, &d)?;
    }
    if items.contains(&info::DESCRIPTION) {
        let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(export.description().as_bytes());
        reply.send(rep::INFO, &d)?;
    }
    reply.ack()?;
    Ok(Some(export.clone()))
}

/// Answers `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
fn meta_context(
    reply: &mut Replies,
    exports: &Exports,
    data: &[u8],
    state: &mut State,
) -> io::Result<()> {
    let set = reply.option == opt::SET_META_CONTEXT;
    if set {
        // Even a failing SET replaces the selection.
        state.meta = None;
    }
    if !state.structured {
        return reply.error(
            rep::ERR_INVALID,
            "negotiate NBD_OPT_STRUCTURED_REPLY before metadata contexts",
        );
    }
    let mut f = Fields(data);
    let parsed = (|| {
        let name = f.string()?;
        let n = f.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(f.string()?);
        }
        f.is_empty().then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return reply.error(rep::ERR_INVALID, "malformed metadata context data");
    };
    let Some(export) = exports.find(name) else {
        return reply.error(rep::ERR_UNKNOWN, "no such export");
    };
    let mut found: Vec<Context> = Vec::new();
    if set {
        found.extend(queries.iter().filter_map(|q| Context::selected_by(q)));
    } else if queries.is_empty() {
        found.extend(Context::ALL);
    } else {
        found.extend(queries.iter().flat_map(|q| Context::listed_by(q)));
    }
    found.sort_by_key(|c| c.id());
    found.dedup();
    for c in &found {
        // LIST's ids are reserved and sent as zero.
        let id = if set { c.id() } else { 0 };
        let mut d = id.to_be_bytes().to_vec();
        d.extend_from_slice(c.name().as_bytes());
        reply.send(rep::META_CONTEXT, &d)?;
    }
    if set {
        state.meta = Some((export.clone(), found));
    }
    reply.ack()
}

/// Fills `buf`; `false` on EOF before its first byte (the client left between messages).
pub fn read_or_eof(r: &mut (impl Read + ?Sized), buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}
