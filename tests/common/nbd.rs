//! A deliberately small NBD client for the tests that must send what no real client sends
//! (malformed options, oversized requests, garbage); everything a well-behaved client does is
//! tested with QEMU, qemu-img, nbdinfo and nbdcopy instead.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// The wire constants are the server's own; real clients (qemu-img, nbdinfo, QEMU) check them
// independently in tests/serve.rs.
#[allow(unused_imports)] // each test binary uses its own subset
pub use qmpbackup::serve::proto::{cmd, opt, rep, Errno, IHAVEOPT};

/// `qmprestore serve ARGS --socket DIR/nbd.sock`, running until dropped (SIGTERM).
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
}

impl Server {
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        let socket = dir.join("nbd.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
            .arg("serve")
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut s = Server { child, socket };
        s.wait_ready();
        s
    }

    /// Waits until the socket accepts connections (the server opens the exports first).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Its stderr, unless the caller sent that to a file of its own.
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("qmprestore serve exited with {status}: {err}");
            }
            assert!(Instant::now() < deadline, "the server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

pub struct Client {
    pub s: UnixStream,
}

impl Client {
    /// Connects and reads the greeting; sends the client flags `flags`.
    pub fn connect_with(socket: &Path, flags: u32) -> Client {
        let mut s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[0..8], b"NBDMAGIC");
        assert_eq!(
            u64::from_be_bytes(greeting[8..16].try_into().unwrap()),
            IHAVEOPT
        );
        s.write_all(&flags.to_be_bytes()).unwrap();
        Client { s }
    }

    pub fn connect(socket: &Path) -> Client {
        Client::connect_with(socket, 3)
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// One option reply: (reply type, data).
    pub fn reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            qmpbackup::serve::proto::OPTION_REPLY_MAGIC
        );
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (kind, d)
    }

    /// Reads replies to the last option until its final one (ACK or an error); returns that
    /// final type and the data of the replies before it.
    pub fn final_reply(&mut self) -> (u32, Vec<Vec<u8>>) {
        let mut before = Vec::new();
        loop {
            let (kind, d) = self.reply();
            if kind == rep::ACK || kind & (1 << 31) != 0 {
                return (kind, before);
            }
            before.push(d);
        }
    }

    /// Whether the server has closed the connection (EOF within the read timeout).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    /// Structured replies, `base:allocation`, then GO to `name`; returns the export size.
    pub fn go(&mut self, name: &str) -> u64 {
        self.option(opt::STRUCTURED_REPLY, &[]);
        assert_eq!(self.final_reply().0, rep::ACK);
        self.option(
            opt::SET_META_CONTEXT,
            &meta_query(name, &["base:allocation"]),
        );
        let (kind, contexts) = self.final_reply();
        assert_eq!((kind, contexts.len()), (rep::ACK, 1));
        self.option(opt::GO, &info_request(name));
        let (kind, infos) = self.final_reply();
        assert_eq!(kind, rep::ACK);
        let export = infos.iter().find(|d| d[0..2] == [0, 0]).unwrap();
        u64::from_be_bytes(export[2..10].try_into().unwrap())
    }

    pub fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut m = qmpbackup::serve::proto::REQUEST_MAGIC
            .to_be_bytes()
            .to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&m).unwrap();
    }

    /// Reads one structured chunk: (flags, type, cookie, payload).
    pub fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            qmpbackup::serve::proto::STRUCTURED_REPLY_MAGIC
        );
        let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (flags, kind, cookie, d)
    }

    /// Reads a whole structured read reply for a read of `len` bytes at `offset`: the data
    /// (holes filled with zeros), or the error code.
    pub fn read_reply(&mut self, offset: u64, len: usize) -> (u64, Result<Vec<u8>, u32>) {
        let mut data = vec![0u8; len];
        let mut covered = 0usize;
        let mut error = None;
        loop {
            let (flags, kind, cookie, p) = self.chunk();
            match kind {
                1 => {
                    let at = (u64::from_be_bytes(p[0..8].try_into().unwrap()) - offset) as usize;
                    data[at..at + p.len() - 8].copy_from_slice(&p[8..]);
                    covered += p.len() - 8;
                }
                2 => covered += u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize,
                0 => {}
                _ => error = Some(u32::from_be_bytes(p[0..4].try_into().unwrap())),
            }
            if flags & 1 != 0 {
                return match error {
                    Some(e) => (cookie, Err(e)),
                    None => {
                        assert_eq!(covered, len, "the chunks cover the read");
                        (cookie, Ok(data))
                    }
                };
            }
        }
    }

    /// The error of a reply that has no data (0 for success).
    pub fn status_reply(&mut self) -> (u64, u32) {
        let (flags, kind, cookie, p) = self.chunk();
        assert_ne!(flags & 1, 0, "a one-chunk reply");
        (
            cookie,
            if kind & (1 << 15) != 0 {
                u32::from_be_bytes(p[0..4].try_into().unwrap())
            } else {
                0
            },
        )
    }
}

/// Data of `NBD_OPT_INFO`/`NBD_OPT_GO` for `name`, asking for name and description.
pub fn info_request(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&2u16.to_be_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&2u16.to_be_bytes());
    d
}

/// Data of a meta context option.
pub fn meta_query(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Test credentials under `dir` (see tests/scripts/make-test-certs.sh); `None` after the loud
/// skip when openssl is missing (a failure in CI).
pub fn make_certificates(dir: &Path) -> Option<PathBuf> {
    if !super::have_answering("openssl", "version") {
        return None;
    }
    let pki = dir.join("pki");
    super::run(
        Command::new(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/make-test-certs.sh"),
        )
        .arg(&pki),
    );
    Some(pki)
}
