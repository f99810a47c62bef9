//! `qmprestore serve`: any restore point, read-only, over NBD — so a VM boots from its backup
//! at once (live restore with stock QEMU) and qemu-img, nbdcopy or the kernel read it without
//! a merge first.
//!
//! Written against the NBD protocol spec (NetworkBlockDevice/nbd `doc/proto.md`): fixed
//! newstyle negotiation ([`handshake`]), STARTTLS ([`tls`], [`wire`]), structured replies and
//! block status in `base:allocation` and `qemu:allocation-depth` ([`transmission`],
//! [`export`]). No crate does this: the Rust NBD crates are clients, or servers without
//! structured replies or block status, which clients need to skip holes.
//!
//! Threads: one per connection reads requests (and negotiates), a shared pool answers them in
//! parallel, and the accepting thread also enforces the handshake time limit and the shutdown:
//! on SIGINT/SIGTERM it stops accepting, ends negotiations, stops reading requests, and
//! returns once every request already read has been answered.
//!
//! Layering: `serve → store, qcow2`; the binary opens the exports and the listeners, so the
//! socket accepts connections only once every export is open.

pub mod error;
pub mod export;
pub mod fuzz;
pub mod handshake;
pub mod listen;
pub mod proto;
pub mod tls;
pub mod transmission;
pub mod wire;

pub use error::ServeError;
pub use export::Exports;
pub use listen::Listener;

use rustls::ServerConfig;
use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use transmission::{Budget, Workers};
use wire::{Socket, Stream};

/// How long a client may take to negotiate (qemu-nbd's default handshake limit).
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// Connections beyond this many at once are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 4096;
/// Read buffers the whole server may hold at once.
const READ_BUDGET: u64 = 256 << 20;
/// Threads answering requests.
const WORKERS: usize = 8;
/// How long a stopping server waits for replies to be taken before it drops the clients.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often the accepting thread looks at the clock, the stop flag and `--once`.
const TICK_MS: i32 = 100;

/// How the server runs.
pub struct Options {
    /// TLS credentials: when set, every client must start TLS before anything else.
    pub tls: Option<Arc<ServerConfig>>,
    /// Stop when the last client leaves (after the first one came).
    pub once: bool,
    pub handshake_limit: Duration,
}

/// What every connection thread shares.
struct Shared {
    exports: Exports,
    tls: Option<Arc<ServerConfig>>,
    workers: Arc<Workers>,
    stopping: AtomicBool,
    /// Live connections: a clone of each socket (to end it from here), and the deadline of
    /// its negotiation while it negotiates.
    live: Mutex<HashMap<u64, (Socket, Option<Instant>)>>,
}

impl Shared {
    fn new(exports: Exports, tls: Option<Arc<ServerConfig>>) -> io::Result<Shared> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(WORKERS)
            .thread_name(|i| format!("nbd-worker-{i}"))
            .build()
            .map_err(io::Error::other)?;
        Ok(Shared {
            exports,
            tls,
            workers: Arc::new(Workers {
                pool,
                budget: Budget::new(READ_BUDGET),
            }),
            stopping: AtomicBool::new(false),
            live: Mutex::new(HashMap::new()),
        })
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Socket, Option<Instant>)>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Serves `exports` on `listeners` until `stop` is set (or, with `once`, the last client has
/// left). Returns the number of connections accepted.
pub fn serve(
    listeners: &[Listener],
    exports: Exports,
    opts: &Options,
    stop: &AtomicBool,
) -> io::Result<u64> {
    raise_fd_limit();
    let shared = Arc::new(Shared::new(exports, opts.tls.clone())?);
    for l in listeners {
        l.set_nonblocking()?;
    }
    let mut fds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut accepted = 0u64;
    loop {
        if stop.load(Ordering::Relaxed) || (opts.once && accepted > 0 && shared.live().is_empty()) {
            break;
        }
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, TICK_MS) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for (l, fd) in listeners.iter().zip(&fds) {
            if fd.revents == 0 {
                continue;
            }
            loop {
                let sock = match l.accept() {
                    Ok(s) => s,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // Out of descriptors, a client that reset before accept, ...: the
                        // next tick tries again.
                        tracing::warn!("accepting an NBD connection failed: {e}");
                        break;
                    }
                };
                accepted += 1;
                if let Some(t) = start_connection(&shared, accepted, sock, opts.handshake_limit) {
                    threads.push(t);
                }
            }
        }
        let now = Instant::now();
        for (sock, deadline) in shared.live().values_mut() {
            if deadline.is_some_and(|d| d <= now) {
                sock.shutdown(Shutdown::Both);
                *deadline = None;
            }
        }
        threads.retain(|t| !t.is_finished());
    }
    shared.stopping.store(true, Ordering::Relaxed);
    for (sock, deadline) in shared.live().values() {
        // Negotiations end now; a client in transmission gets the answers to what it sent.
        sock.shutdown(if deadline.is_some() {
            Shutdown::Both
        } else {
            Shutdown::Read
        });
    }
    // A client that sent requests but reads no replies must not hold the server forever.
    let grace = Instant::now() + SHUTDOWN_GRACE;
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(TICK_MS as u64));
    }
    for (sock, _) in shared.live().values() {
        sock.shutdown(Shutdown::Both);
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(accepted)
}

/// Registers the connection and starts its thread; `None` when it was refused.
fn start_connection(
    shared: &Arc<Shared>,
    id: u64,
    sock: Socket,
    limit: Duration,
) -> Option<JoinHandle<()>> {
    let ctl = sock.try_clone().ok()?;
    {
        let mut live = shared.live();
        if live.len() >= MAX_CONNECTIONS {
            tracing::warn!("{MAX_CONNECTIONS} NBD connections are open; refusing another");
            return None;
        }
        live.insert(id, (ctl, Some(Instant::now() + limit)));
    }
    let s = shared.clone();
    let started = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .stack_size(512 << 10)
        .spawn(move || {
            connection(&s, id, sock);
            s.live().remove(&id);
        });
    match started {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!("cannot start a thread for an NBD connection: {e}");
            shared.live().remove(&id);
            None
        }
    }
}

/// Negotiates and serves one client.
fn connection(shared: &Shared, id: u64, sock: Socket) {
    let ctl = sock.try_clone().ok();
    let stopping = || shared.stopping.load(Ordering::Relaxed);
    let policy = handshake::Policy {
        exports: &shared.exports,
        tls: shared.tls.as_ref(),
        stopping: &stopping,
    };
    let result = match handshake::negotiate(Stream::Plain(sock), &policy) {
        Ok(Some(session)) => {
            if let Some((_, deadline)) = shared.live().get_mut(&id) {
                *deadline = None;
            }
            tracing::debug!(
                "NBD connection {id}: serving '{}'",
                session.export.names().last().map_or("", |n| n.as_str())
            );
            transmission::transmit(session, &shared.workers, ctl)
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => tracing::debug!("NBD connection {id} closed"),
        Err(e) => tracing::debug!("NBD connection {id} ended: {e}"),
    }
}

/// Many idle clients each hold a descriptor: use the whole hard limit.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
