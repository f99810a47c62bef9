//! `qmprestore serve` against a hostile or merely unusual client: every malformed handshake,
//! option and request is answered as the NBD spec says or ends that connection, and never
//! disturbs other clients. Needs no reference tool (the well-behaved clients are in
//! tests/serve.rs); expected bytes come from the engine, itself tested against qemu-img.

mod common;

use common::nbd::*;
use qmpbackup::qcow2::Disk;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn sample_top() -> std::path::PathBuf {
    common::sample_chain().join("disk.qcow2/INC-1700001200-disk.qcow2")
}

fn expected(offset: u64, len: usize) -> Vec<u8> {
    let disk = Disk::open(&sample_top()).unwrap();
    let mut buf = vec![0u8; len];
    disk.read_at(&mut buf, offset).unwrap();
    buf
}

fn serve_sample(dir: &std::path::Path, extra: &[&str]) -> Server {
    let chain = common::sample_chain().join("disk.qcow2");
    let mut args = vec!["--dir", chain.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start(dir, &args)
}

#[test]
fn negotiation_errors_are_answered_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_sample(dir.path(), &["--name", "disk"]);
    let mut c = Client::connect(&server.socket);
    c.option(99, b"whatever");
    assert_eq!(c.final_reply().0, rep::ERR_UNSUP);
    // A large option is read and refused; the session stays in step.
    c.option(opt::INFO, &vec![7u8; 100 << 10]);
    assert_eq!(c.final_reply().0, rep::ERR_TOO_BIG);
    c.option(opt::INFO, &info_request("nosuch"));
    let (kind, _) = c.final_reply();
    assert_eq!(kind, rep::ERR_UNKNOWN);
    // A name length that runs past the option's data.
    let mut bad = info_request("disk");
    bad[3] = 200;
    c.option(opt::GO, &bad);
    assert_eq!(c.final_reply().0, rep::ERR_INVALID);
    // Meta contexts need structured replies first.
    c.option(
        opt::SET_META_CONTEXT,
        &meta_query("disk", &["base:allocation"]),
    );
    assert_eq!(c.final_reply().0, rep::ERR_INVALID);
    c.option(opt::INFO, &info_request("disk"));
    let (kind, infos) = c.final_reply();
    assert_eq!(kind, rep::ACK);
    let export = infos.iter().find(|d| d[0..2] == [0, 0]).unwrap();
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().unwrap()),
        8 << 20
    );
    let flags = u16::from_be_bytes(export[10..12].try_into().unwrap());
    assert_ne!(flags & 2, 0, "read-only");
    assert_ne!(flags & (1 << 8), 0, "multi-conn");
    assert_eq!(c.go("disk"), 8 << 20);
    c.request(cmd::READ, 0, 1, 0, 4096);
    assert_eq!(c.read_reply(0, 4096), (1, Ok(expected(0, 4096))));
}

#[test]
fn protocol_violations_end_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_sample(dir.path(), &[]);
    // Unknown client flags.
    let mut c = Client::connect_with(&server.socket, 1 << 7);
    assert!(c.closed());
    // An option without IHAVEOPT.
    let mut c = Client::connect(&server.socket);
    c.s.write_all(&[0xAB; 16]).unwrap();
    assert!(c.closed());
    // An option claiming 1 GiB of data.
    let mut c = Client::connect(&server.socket);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt::INFO.to_be_bytes());
    m.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.s.write_all(&m).unwrap();
    assert!(c.closed());
    // A request without the request magic.
    let mut c = Client::connect(&server.socket);
    c.go("");
    c.s.write_all(&[0x55; 28]).unwrap();
    assert!(c.closed());
    // Garbage after NBD_CMD_DISC is never read.
    let mut c = Client::connect(&server.socket);
    c.go("");
    c.request(cmd::DISC, 0, 9, 0, 0);
    let _ = c.s.write_all(&[0xFF; 4096]);
    assert!(c.closed());
    // After all of that, a good client is served.
    let mut c = Client::connect(&server.socket);
    c.go("");
    c.request(cmd::READ, 0, 2, 1 << 20, 65536);
    assert_eq!(
        c.read_reply(1 << 20, 65536),
        (2, Ok(expected(1 << 20, 65536)))
    );
    assert!(server.stop().success());
}

#[test]
fn bad_requests_get_the_spec_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_sample(dir.path(), &[]);
    let mut c = Client::connect(&server.socket);
    let size = c.go("");
    // Past the end, straddling the end, oversized.
    c.request(cmd::READ, 0, 1, size, 512);
    assert_eq!(c.read_reply(size, 512), (1, Err(Errno::Inval as u32)));
    c.request(cmd::READ, 0, 2, size - 512, 1024);
    assert_eq!(
        c.read_reply(size - 512, 1024),
        (2, Err(Errno::Inval as u32))
    );
    c.request(cmd::READ, 0, 3, 0, (32 << 20) + 1);
    assert_eq!(c.read_reply(0, 0), (3, Err(Errno::Overflow as u32)));
    c.request(cmd::READ, 0, 3, u64::MAX - 10, 100);
    assert_eq!(c.read_reply(0, 0), (3, Err(Errno::Inval as u32)));
    // An unknown flag, an unknown command.
    c.request(cmd::READ, 1 << 9, 4, 0, 512);
    assert_eq!(c.read_reply(0, 0), (4, Err(Errno::Inval as u32)));
    c.request(42, 0, 5, 0, 512);
    assert_eq!(c.status_reply(), (5, Errno::Inval as u32));
    // A write is refused after its payload is consumed: the next request is in step.
    c.request(cmd::WRITE, 0, 6, 0, 4096);
    c.s.write_all(&[0xEE; 4096]).unwrap();
    assert_eq!(c.status_reply(), (6, Errno::Perm as u32));
    c.request(cmd::BLOCK_STATUS, 0, 7, 0, 0);
    assert_eq!(c.status_reply(), (7, Errno::Inval as u32));
    c.request(cmd::READ, 0, 8, 0, 512);
    assert_eq!(c.read_reply(0, 512), (8, Ok(expected(0, 512))));
    // Nothing was written.
    drop(c);
    assert_eq!(
        expected(0, 4096),
        Disk::open(&sample_top())
            .map(|d| {
                let mut b = vec![0u8; 4096];
                d.read_at(&mut b, 0).unwrap();
                b
            })
            .unwrap()
    );
}

#[test]
fn many_requests_in_flight_are_answered_by_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_sample(dir.path(), &[]);
    let mut c = Client::connect(&server.socket);
    let size = c.go("");
    let mut want = std::collections::HashMap::new();
    let writer = c.s.try_clone().unwrap();
    // Write all 300 requests from another thread while replies come back.
    let reqs: Vec<(u64, u64, u32)> = (0..300u64)
        .map(|i| {
            (
                i,
                (i * 37 * 65536) % (size - (1 << 20)),
                65536 + (i as u32 % 5) * 100_000,
            )
        })
        .collect();
    for &(cookie, off, len) in &reqs {
        want.insert(cookie, (off, len));
    }
    let sender = std::thread::spawn(move || {
        let mut w = Client { s: writer };
        for (cookie, off, len) in reqs {
            w.request(cmd::READ, 0, cookie, off, len);
        }
    });
    for _ in 0..300 {
        // Replies may come in any order; each is read whole.
        let (flags, kind, cookie, p) = c.chunk();
        let (off, len) = want[&cookie];
        let mut data = vec![0u8; len as usize];
        let mut chunks = vec![(flags, kind, p)];
        while chunks.last().unwrap().0 & 1 == 0 {
            let (f, k, ck, p) = c.chunk();
            assert_eq!(ck, cookie, "the chunks of one reply come together");
            chunks.push((f, k, p));
        }
        for (_, kind, p) in chunks {
            if kind == 1 {
                let at = (u64::from_be_bytes(p[0..8].try_into().unwrap()) - off) as usize;
                data[at..at + p.len() - 8].copy_from_slice(&p[8..]);
            } else {
                assert!(kind == 2 || kind == 0, "no error");
            }
        }
        assert_eq!(data, expected(off, len as usize), "cookie {cookie}");
        want.remove(&cookie);
    }
    sender.join().unwrap();
    assert!(want.is_empty());
}

#[test]
fn a_thousand_idle_connections_do_not_stop_a_client() {
    // The test holds the client ends: it needs the descriptors too.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let dir = tempfile::tempdir().unwrap();
    let server = serve_sample(dir.path(), &["--handshake-limit", "2"]);
    let mut idle = Vec::new();
    for i in 0..1000 {
        let mut s = UnixStream::connect(&server.socket).unwrap();
        // Some stop in the middle of the client flags, some say nothing at all.
        if i % 2 == 0 {
            s.write_all(&[0, 0]).unwrap();
        }
        idle.push(s);
    }
    let started = Instant::now();
    let mut c = Client::connect(&server.socket);
    c.go("");
    c.request(cmd::READ, 0, 1, 0, 65536);
    assert_eq!(c.read_reply(0, 65536), (1, Ok(expected(0, 65536))));
    assert!(started.elapsed() < Duration::from_secs(5));
    let rss = std::fs::read_to_string(format!("/proc/{}/status", server.child.id()))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().unwrap())
        })
        .unwrap();
    assert!(
        rss < 256 << 10,
        "server RSS with 1000 idle clients: {rss} KiB"
    );
    // The handshake limit closes the idle ones; the client in transmission stays.
    std::thread::sleep(Duration::from_millis(3000));
    let mut b = [0u8; 64];
    idle[1]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = Vec::new();
    loop {
        match idle[1].read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&b[..n]),
        }
    }
    assert_eq!(got.len(), 18, "only the greeting, then the close");
    c.request(cmd::READ, 0, 2, 4096, 4096);
    assert_eq!(c.read_reply(4096, 4096), (2, Ok(expected(4096, 4096))));
    assert!(server.stop().success());
}

#[test]
fn sigterm_answers_what_is_in_flight_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("serve.pid");
    let server = serve_sample(dir.path(), &["--pidfile", pidfile.to_str().unwrap()]);
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, server.child.id());
    let mut c = Client::connect(&server.socket);
    c.go("");
    for i in 0..20 {
        c.request(cmd::READ, 0, i, 0, 1 << 20);
    }
    // The replies are taken while the server stops (20 MiB do not fit in the socket).
    let mut r = Client {
        s: c.s.try_clone().unwrap(),
    };
    let replies = std::thread::spawn(move || {
        let answers: Vec<_> = (0..20).map(|_| r.read_reply(0, 1 << 20).1).collect();
        (answers, r.closed())
    });
    std::thread::sleep(Duration::from_millis(200));
    let socket = server.socket.clone();
    let status = server.stop();
    assert!(status.success(), "{status}");
    let (answers, closed) = replies.join().unwrap();
    for a in answers {
        assert_eq!(a, Ok(expected(0, 1 << 20)));
    }
    assert!(closed);
    assert!(!socket.exists(), "the socket is removed");
    assert!(!pidfile.exists(), "the pidfile is removed");
}

#[test]
fn once_exits_when_the_last_client_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = serve_sample(dir.path(), &["--once"]);
    let mut a = Client::connect(&server.socket);
    a.go("");
    let mut b = Client::connect(&server.socket);
    b.go("");
    drop(a);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "one client is still there"
    );
    b.request(cmd::DISC, 0, 0, 0, 0);
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "--once did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
}

#[test]
fn tls_required_before_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pki) = make_certificates(dir.path()) else {
        return;
    };
    let creds = pki.join("server");
    let server = serve_sample(dir.path(), &["--tls-creds", creds.to_str().unwrap()]);
    let mut c = Client::connect(&server.socket);
    c.option(opt::INFO, &info_request(""));
    assert_eq!(c.final_reply(), (rep::ERR_TLS_REQD, vec![]));
    c.option(opt::GO, &info_request(""));
    assert_eq!(c.final_reply(), (rep::ERR_TLS_REQD, vec![]));
    // NBD_OPT_EXPORT_NAME cannot be refused in-band: the connection ends.
    c.option(1, b"");
    assert!(c.closed());
}

/// STARTTLS, then `NBD_OPT_INFO` of the default export over TLS with the client certificate
/// in `pki/<who>/`; the final reply type, or the error that ended the session.
fn info_over_tls(
    socket: &std::path::Path,
    pki: &std::path::Path,
    who: &str,
) -> Result<u32, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::Arc;
    let mut c = Client::connect(socket);
    c.option(5, &[]);
    assert_eq!(c.final_reply().0, rep::ACK);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.join("server/ca-cert.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let certs: Vec<_> = CertificateDer::pem_file_iter(pki.join(who).join("client-cert.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(pki.join(who).join("client-key.pem")).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, c.s);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt::INFO.to_be_bytes());
    let info = info_request("");
    m.extend_from_slice(&(info.len() as u32).to_be_bytes());
    m.extend_from_slice(&info);
    let mut last = 0;
    tls.write_all(&m).map_err(|e| e.to_string())?;
    while last != rep::ACK && last & (1 << 31) == 0 {
        let mut h = [0u8; 20];
        tls.read_exact(&mut h).map_err(|e| e.to_string())?;
        last = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        tls.read_exact(&mut d).map_err(|e| e.to_string())?;
    }
    Ok(last)
}

#[test]
fn tls_verify_peer_refuses_a_certificate_from_another_ca() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pki) = make_certificates(dir.path()) else {
        return;
    };
    let creds = pki.join("server");
    let server = serve_sample(
        dir.path(),
        &["--tls-creds", creds.to_str().unwrap(), "--tls-verify-peer"],
    );
    assert_eq!(info_over_tls(&server.socket, &pki, "client"), Ok(rep::ACK));
    let rogue = info_over_tls(&server.socket, &pki, "rogue");
    assert!(rogue.is_err(), "a certificate from another CA was accepted");
    assert_eq!(info_over_tls(&server.socket, &pki, "client"), Ok(rep::ACK));
}
