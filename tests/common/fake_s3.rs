//! A misbehaving object store on loopback for the hostile-store tests: it serves the files of
//! a local folder as S3 does (path-style `GET /bucket/key` with `Range`, `HEAD`, `ListObjectsV2`
//! in one page), and a test's hook may answer any request otherwise — the way a broken or
//! hostile store would. It does not check signatures; it answers one request per connection.
//! It needs no Garage, so these tests run everywhere.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// One request, as the store understood it.
#[derive(Clone)]
pub struct Req {
    pub method: String,
    pub bucket: String,
    /// The object's key (empty for bucket-level requests such as listings).
    pub key: String,
    pub query: HashMap<String, String>,
    /// `Range: bytes=A-B`.
    pub range: Option<(u64, u64)>,
    /// How many requests came before this one.
    pub seq: usize,
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn header(mut self, k: &str, v: impl Into<String>) -> Reply {
        self.headers.push((k.to_string(), v.into()));
        self
    }

    /// The reply promising its whole body but sending only `keep` bytes of it.
    pub fn cut_short(mut self, keep: usize) -> Reply {
        let full = self.body.len();
        self.body.truncate(keep);
        self.header("Content-Length", full.to_string())
    }
}

/// Answers a request differently from an honest store, or `None` to let the store answer.
pub type Hook = dyn Fn(&Req, &FakeS3Files) -> Option<Reply> + Send + Sync;

/// The folder whose subfolders are the buckets, and how an honest store answers from it.
pub struct FakeS3Files {
    pub root: PathBuf,
}

impl FakeS3Files {
    fn path(&self, req: &Req) -> PathBuf {
        self.root.join(&req.bucket).join(&req.key)
    }

    /// The ETag of an object: its size and modification time, as a store's would change.
    pub fn etag(&self, path: &Path) -> String {
        let m = std::fs::metadata(path).unwrap();
        let t = m
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        format!("\"{:x}-{:x}\"", m.len(), t.as_nanos())
    }

    /// Every object below `prefix` of `bucket`: (key, size, etag), sorted by key.
    pub fn objects(&self, bucket: &str, prefix: &str) -> Vec<(String, u64, String)> {
        let base = self.root.join(bucket);
        let mut out = Vec::new();
        let mut todo = vec![base.clone()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    todo.push(p);
                    continue;
                }
                let key = p
                    .strip_prefix(&base)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if key.starts_with(prefix) {
                    let size = std::fs::metadata(&p).unwrap().len();
                    out.push((key, size, self.etag(&p)));
                }
            }
        }
        out.sort();
        out
    }

    /// A `ListObjectsV2` page of `contents` (key, size, etag) and `folders`.
    pub fn listing(
        contents: &[(String, u64, String)],
        folders: &[String],
        next: Option<&str>,
    ) -> Reply {
        let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult>");
        for (key, size, etag) in contents {
            let etag = etag.replace('"', "&quot;");
            x += &format!(
                "<Contents><Key>{key}</Key><LastModified>2026-12-01T10:00:00.000Z</LastModified><ETag>{etag}</ETag><Size>{size}</Size></Contents>"
            );
        }
        for f in folders {
            x += &format!("<CommonPrefixes><Prefix>{f}</Prefix></CommonPrefixes>");
        }
        if let Some(t) = next {
            x += &format!(
                "<IsTruncated>true</IsTruncated><NextContinuationToken>{t}</NextContinuationToken>"
            );
        }
        x += "</ListBucketResult>";
        Reply::new(200, x)
    }

    /// What an honest store answers (to reads: this store is read-only unless a hook
    /// pretends otherwise).
    pub fn honest(&self, req: &Req) -> Reply {
        if !matches!(req.method.as_str(), "GET" | "HEAD") {
            return Reply::new(501, "<Error><Code>NotImplemented</Code></Error>");
        }
        if req.key.is_empty() {
            let prefix = req.query.get("prefix").cloned().unwrap_or_default();
            let mut contents = Vec::new();
            let mut folders = Vec::new();
            for o in self.objects(&req.bucket, &prefix) {
                let rest = &o.0[prefix.len()..];
                match rest.split_once('/') {
                    Some((f, _)) if req.query.contains_key("delimiter") => {
                        let f = format!("{prefix}{f}/");
                        if !folders.contains(&f) {
                            folders.push(f);
                        }
                    }
                    _ => contents.push(o),
                }
            }
            return FakeS3Files::listing(&contents, &folders, None);
        }
        let path = self.path(req);
        let Ok(data) = std::fs::read(&path) else {
            return Reply::new(404, "<Error><Code>NoSuchKey</Code></Error>");
        };
        let etag = self.etag(&path);
        let size = data.len() as u64;
        match (req.method.as_str(), req.range) {
            ("HEAD", _) | (_, None) => Reply::new(200, data).header("ETag", etag),
            (_, Some((a, b))) if a < size => {
                let b = b.min(size - 1);
                Reply::new(206, data[a as usize..=b as usize].to_vec())
                    .header("ETag", etag)
                    .header("Content-Range", format!("bytes {a}-{b}/{size}"))
            }
            _ => Reply::new(416, "<Error><Code>InvalidRange</Code></Error>"),
        }
    }
}

pub struct FakeS3 {
    pub port: u16,
    stop: Arc<AtomicBool>,
    home: tempfile::TempDir,
}

fn unescape(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// Reads one request's head, and its body (which this store never keeps); `None` when the
/// client went away first.
fn read_request(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 << 10 {
        if s.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let body: u64 = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    std::io::copy(&mut s.take(body), &mut std::io::sink()).ok()?;
    Some(head)
}

/// The value of header `name` in a request head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

fn parse(head: &str, seq: usize) -> Req {
    let mut first = head.lines().next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let target = first.next().unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = unescape(path.trim_start_matches('/'));
    let (bucket, key) = path.split_once('/').unwrap_or((&path, ""));
    let query = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (unescape(k), unescape(v)))
        .collect();
    let range = header(head, "range")
        .and_then(|v| v.strip_prefix("bytes=")?.split_once('-'))
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    Req {
        method,
        bucket: bucket.to_string(),
        key: key.to_string(),
        query,
        range,
        seq,
    }
}

fn answer(s: &mut TcpStream, req: &Req, reply: Reply) {
    let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", reply.status);
    for (k, v) in &reply.headers {
        head += &format!("{k}: {v}\r\n");
    }
    if !reply.headers.iter().any(|(k, _)| k == "Content-Length") {
        head += &format!("Content-Length: {}\r\n", reply.body.len());
    }
    head += "\r\n";
    let _ = s.write_all(head.as_bytes());
    if req.method != "HEAD" {
        let _ = s.write_all(&reply.body);
    }
}

impl FakeS3 {
    /// A store serving `root`'s subfolders as buckets, answering through `hook` first.
    pub fn start(root: &Path, hook: Box<Hook>) -> FakeS3 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let files = Arc::new(FakeS3Files {
            root: root.to_path_buf(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let hook: Arc<Hook> = Arc::from(hook);
        let st = stop.clone();
        std::thread::spawn(move || {
            // One request per connection: the connections' count numbers the requests.
            for (seq, conn) in listener.incoming().enumerate() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut s) = conn else { continue };
                let (f, hook) = (files.clone(), hook.clone());
                std::thread::spawn(move || {
                    let Some(head) = read_request(&mut s) else {
                        return;
                    };
                    let req = parse(&head, seq);
                    let reply = hook(&req, &f).unwrap_or_else(|| f.honest(&req));
                    answer(&mut s, &req, reply);
                });
            }
        });
        FakeS3 {
            port,
            stop,
            home: tempfile::tempdir().unwrap(),
        }
    }

    /// `cmd` with exactly the AWS_* variables that point it at this store.
    pub fn with_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        let endpoint = format!("http://127.0.0.1:{}", self.port);
        super::aws_env(
            cmd,
            self.home.path(),
            &[
                ("AWS_ENDPOINT_URL", endpoint.as_str()),
                ("AWS_REGION", "us-east-1"),
                ("AWS_ACCESS_KEY_ID", "GKfake"),
                ("AWS_SECRET_ACCESS_KEY", "fake"),
            ],
        )
    }
}

impl Drop for FakeS3 {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
