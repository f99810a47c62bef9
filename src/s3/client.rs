//! One bucket of one store: signed requests, sent with retries, answered with typed results.
//!
//! Every request is presigned by `rusty-s3` just before it is sent (headers the store must
//! check, such as `If-Match` and `x-amz-checksum-crc32`, are part of the signature) and sent
//! by a `ureq` agent that keeps connections open for the rayon workers that share it. What is
//! transient (5xx, 429, 408, timeouts, resets, a body cut short) is retried with exponential
//! backoff; what is not (403, 404, 412, …) fails at once with the store's own code and words.

use super::config::Config;
use super::error::S3Error;
use rusty_s3::actions::{DeleteObject, GetObject, HeadObject, ListObjectsV2, PutObject, S3Action};
use rusty_s3::{Bucket, Credentials, UrlStyle};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a signed request stays valid: long enough for a slow upload of one part.
const VALIDITY: Duration = Duration::from_secs(3600);
/// The most entries (objects and folders) a listing takes: a backup folder holds a few
/// thousand; a store that pages on without end is hostile or broken, and is not followed
/// into unbounded memory.
const MAX_LISTED: usize = 1_000_000;
/// The most pages in a row that bring nothing and still promise more.
const MAX_EMPTY_PAGES: usize = 100;
/// Attempts per request; the waits between them double from [`FIRST_WAIT`] up to 5 s.
const ATTEMPTS: u32 = 8;
const FIRST_WAIT: Duration = Duration::from_millis(100);

/// What [`Client::head`] learns of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub size: u64,
    pub etag: String,
}

/// A [`Head`] with the object's CRC-32 as qmpbackup's uploads record it (user metadata), if
/// it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub head: Head,
    pub crc32: Option<String>,
}

/// One object of a listing.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub etag: String,
    /// When it was stored, as the store writes it (ISO 8601, UTC).
    pub last_modified: String,
}

/// A listing below a prefix: objects, and the sub-prefixes ("folders") when asked with a
/// delimiter.
#[derive(Debug, Default)]
pub struct Listing {
    pub objects: Vec<Listed>,
    pub folders: Vec<String>,
}

/// How one attempt ended, when it did not succeed.
pub(crate) enum Failure {
    Retry(S3Error),
    Fatal(S3Error),
}

pub struct Client {
    pub(crate) bucket: Bucket,
    pub(crate) credentials: Credentials,
    agent: ureq::Agent,
    pub traffic: Traffic,
}

/// The kinds of request a client sends, as [`Traffic`] counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A GET of an object's bytes.
    Get,
    /// A GET of a listing page (objects, or unfinished uploads).
    List,
    Head,
    Put,
    /// Starting or completing a multipart upload.
    Post,
    Delete,
}

impl Op {
    fn method(self) -> &'static str {
        match self {
            Op::Get | Op::List => "GET",
            Op::Head => "HEAD",
            Op::Put => "PUT",
            Op::Post => "POST",
            Op::Delete => "DELETE",
        }
    }
}

/// What a client has asked of its store, retries included: `--debug` prints it when a command
/// ends, and the benchmarks and tests bound it, so a change that reads an object twice or
/// one round trip at a time where it could read many shows as a number.
#[derive(Debug, Default)]
pub struct Traffic {
    requests: [AtomicU64; 6],
    /// Object bytes received (GET bodies) and sent (PUT bodies and parts).
    received: AtomicU64,
    sent: AtomicU64,
}

impl Traffic {
    fn count(&self, op: Op) {
        self.requests[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Object bytes received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Requests that change the store (PUT, POST, DELETE) sent so far.
    pub fn writes(&self) -> u64 {
        [Op::Put, Op::Post, Op::Delete]
            .into_iter()
            .map(|op| self.requests(op))
            .sum()
    }

    /// Requests of kind `op` sent so far.
    pub fn requests(&self, op: Op) -> u64 {
        self.requests[op as usize].load(Ordering::Relaxed)
    }

    /// One line for a log: `1051 GETs (12.3 MiB), 2 listings, …`, only the kinds sent.
    pub fn summary(&self) -> String {
        let mib = |n: &AtomicU64| n.load(Ordering::Relaxed) as f64 / (1 << 20) as f64;
        let mut parts = Vec::new();
        for (op, one, many) in [
            (Op::Get, "GET", "GETs"),
            (Op::List, "listing", "listings"),
            (Op::Head, "HEAD", "HEADs"),
            (Op::Put, "PUT", "PUTs"),
            (Op::Post, "POST", "POSTs"),
            (Op::Delete, "DELETE", "DELETEs"),
        ] {
            let n = self.requests(op);
            let mut part = format!("{n} {}", if n == 1 { one } else { many });
            match op {
                Op::Get => part += &format!(" ({:.1} MiB)", mib(&self.received)),
                Op::Put => part += &format!(" ({:.1} MiB)", mib(&self.sent)),
                _ => {}
            }
            if n > 0 {
                parts.push(part);
            }
        }
        if parts.is_empty() {
            "no requests".into()
        } else {
            parts.join(", ")
        }
    }
}

fn tls_config(config: &Config) -> Result<Arc<rustls::ClientConfig>, S3Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_bundle {
        Some(path) => {
            let bad = |e: &dyn std::fmt::Display| {
                S3Error::Config(format!("AWS_CA_BUNDLE {}: {e}", path.display()))
            };
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
                roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            }
            if roots.is_empty() {
                return Err(bad(&"no certificate in the file"));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| S3Error::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(tls))
}

/// The code and message of an S3 error document (`<Error><Code>…</Code><Message>…`).
fn error_words(body: &str) -> (String, String) {
    let field = |name: &str| {
        let open = format!("<{name}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&format!("</{name}>"))? + start;
        Some(body[start..end].to_string())
    };
    (
        field("Code").unwrap_or_default(),
        field("Message").unwrap_or_default(),
    )
}

/// What a status answer means for the user.
fn explain(status: u16, code: &str, message: &str, bucket: &str) -> String {
    let said = match (code.is_empty(), message.is_empty()) {
        (true, true) => format!("HTTP {status}"),
        (false, true) => format!("{code} (HTTP {status})"),
        (true, false) => format!("{message} (HTTP {status})"),
        (false, false) => format!("{code}: {message} (HTTP {status})"),
    };
    let hint = match (status, code) {
        (_, "NoSuchBucket") => format!("; bucket '{bucket}' does not exist"),
        (403, _) | (_, "InvalidAccessKeyId" | "SignatureDoesNotMatch") => {
            "; check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the key's rights on the bucket".into()
        }
        (_, "AuthorizationHeaderMalformed" | "PermanentRedirect") | (301, _) => {
            "; check AWS_REGION: the bucket may live in another region".into()
        }
        (404, _) => "; no such object".into(),
        _ => String::new(),
    };
    format!("{said}{hint}")
}

impl Client {
    pub fn new(config: &Config, bucket: &str) -> Result<Client, S3Error> {
        if config.plain_http_off_host() {
            tracing::warn!(
                "object store endpoint {} is plain http on another host: data and signatures travel unencrypted",
                config.endpoint
            );
        }
        let style = if config.path_style || bucket.contains('.') {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(
            config.endpoint.clone(),
            style,
            bucket.to_string(),
            config.region.clone(),
        )
        .map_err(|e| S3Error::Config(format!("bucket {bucket}: {e}")))?;
        let credentials = match &config.session_token {
            Some(t) => Credentials::new_with_token(&config.access_key, &config.secret_key, t),
            None => Credentials::new(&config.access_key, &config.secret_key),
        };
        let agent = ureq::AgentBuilder::new()
            .tls_config(tls_config(config)?)
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(60))
            .timeout_write(Duration::from_secs(60))
            .max_idle_connections(256)
            .max_idle_connections_per_host(64)
            .redirects(0)
            .build();
        Ok(Client {
            bucket,
            credentials,
            agent,
            traffic: Traffic::default(),
        })
    }

    /// `s3://bucket/key`, for messages.
    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket.name())
    }

    /// A request for a signed URL, counted in [`Client::traffic`].
    pub(crate) fn request<'a>(&self, op: Op, action: &impl S3Action<'a>) -> ureq::Request {
        self.traffic.count(op);
        self.agent
            .request(op.method(), action.sign(VALIDITY).as_str())
    }

    /// Classifies a failed request for [`Client::call`].
    pub(crate) fn failure(&self, what: &str, e: ureq::Error) -> Failure {
        match e {
            ureq::Error::Status(status, resp) => {
                let mut body = String::new();
                // An error document is small; a bigger one is not worth reading.
                let _ = resp.into_reader().take(64 << 10).read_to_string(&mut body);
                let (code, message) = error_words(&body);
                let err = S3Error::Status {
                    what: what.to_string(),
                    status,
                    problem: explain(status, &code, &message, self.bucket.name()),
                };
                if status >= 500 || status == 429 || status == 408 || code == "SlowDown" {
                    Failure::Retry(err)
                } else {
                    Failure::Fatal(err)
                }
            }
            ureq::Error::Transport(t) => {
                // Not `t.to_string()`: that holds the presigned URL, a credential for an hour.
                let detail = match (t.message(), std::error::Error::source(&t)) {
                    (_, Some(src)) => src.to_string(),
                    (Some(m), None) => m.to_string(),
                    (None, None) => String::new(),
                };
                let err = S3Error::Transport(what.to_string(), format!("{}: {detail}", t.kind()));
                match t.kind() {
                    ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => {
                        Failure::Fatal(err)
                    }
                    _ => Failure::Retry(err),
                }
            }
        }
    }

    /// The body of an answer, read up to `limit` bytes; a connection that breaks while it is
    /// read is a transient failure.
    pub(crate) fn text(resp: ureq::Response, limit: u64, what: &str) -> Result<String, Failure> {
        let mut body = String::new();
        resp.into_reader()
            .take(limit)
            .read_to_string(&mut body)
            .map_err(|e| Failure::Retry(S3Error::Transport(what.to_string(), e.to_string())))?;
        Ok(body)
    }

    /// Runs `attempt` until it succeeds, fails for good, or has failed [`ATTEMPTS`] times.
    pub(crate) fn call<T>(
        &self,
        mut attempt: impl FnMut() -> Result<T, Failure>,
    ) -> Result<T, S3Error> {
        let mut wait = FIRST_WAIT;
        for n in 1.. {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(e)) if n >= ATTEMPTS => return Err(e),
                Err(Failure::Retry(e)) => {
                    tracing::debug!("{e}; retrying in {wait:?} (attempt {n} of {ATTEMPTS})");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
        unreachable!("the loop returns")
    }

    /// Size and ETag of `key`, or `None` when there is no such object.
    pub fn head(&self, key: &str) -> Result<Option<Head>, S3Error> {
        Ok(self.describe(key)?.map(|d| d.head))
    }

    /// What [`Client::head`] says, with the recorded CRC-32.
    pub fn describe(&self, key: &str) -> Result<Option<Described>, S3Error> {
        let what = self.url(key);
        let action = HeadObject::new(&self.bucket, Some(&self.credentials), key);
        tracing::trace!("HEAD {what}");
        let got = self.call(|| match self.request(Op::Head, &action).call() {
            Ok(r) => Ok(Some(r)),
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(self.failure(&what, e)),
        })?;
        let Some(resp) = got else { return Ok(None) };
        let size = resp
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| S3Error::Reply(what.clone(), "no Content-Length".into()))?;
        let etag = resp
            .header("etag")
            .ok_or_else(|| S3Error::Reply(what.clone(), "no ETag".into()))?
            .to_string();
        let crc32 = resp.header(CRC_META).map(str::to_string);
        Ok(Some(Described {
            head: Head { size, etag },
            crc32,
        }))
    }

    /// Reads `buf.len()` bytes of `key` at `offset` (all inside the object), only from the
    /// object version `etag` names.
    pub fn read(&self, key: &str, etag: &str, buf: &mut [u8], offset: u64) -> Result<(), S3Error> {
        self.read_parts(key, etag, &mut [buf], offset)
    }

    /// [`Client::read`] of consecutive bytes into several buffers, in one request: the bytes
    /// at `offset` fill `parts[0]`, the next ones `parts[1]`, and so on.
    pub fn read_parts(
        &self,
        key: &str,
        etag: &str,
        parts: &mut [&mut [u8]],
        offset: u64,
    ) -> Result<(), S3Error> {
        let what = self.url(key);
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if len == 0 {
            return Ok(());
        }
        let mut action = GetObject::new(&self.bucket, Some(&self.credentials), key);
        action.headers_mut().insert("if-match", etag);
        let range = format!("bytes={}-{}", offset, offset + len - 1);
        tracing::trace!("GET {what} {range}");
        self.call(|| {
            let resp = match self
                .request(Op::Get, &action)
                .set("If-Match", etag)
                .set("Range", &range)
                .call()
            {
                Ok(r) => r,
                Err(ureq::Error::Status(412, _)) => {
                    return Err(Failure::Fatal(S3Error::Changed(what.clone(), etag.into())))
                }
                Err(e) => return Err(self.failure(&what, e)),
            };
            // A store that ignores If-Match must still not hand us another version.
            if resp.header("etag").is_some_and(|t| t != etag) {
                return Err(Failure::Fatal(S3Error::Changed(what.clone(), etag.into())));
            }
            if let Err(problem) = range_answered(&resp, offset, len) {
                return Err(Failure::Fatal(S3Error::Reply(what.clone(), problem)));
            }
            // A body cut short is a broken connection: read it again.
            let mut body = resp.into_reader();
            for part in parts.iter_mut() {
                body.read_exact(part)
                    .map_err(|e| Failure::Retry(S3Error::Transport(what.clone(), e.to_string())))?;
            }
            self.traffic.add_received(len);
            Ok(())
        })
    }

    /// Every object below `prefix` (all pages); with `folders`, only one level down, the
    /// deeper ones summarised as folder prefixes.
    pub fn list(&self, prefix: &str, folders: bool) -> Result<Listing, S3Error> {
        let what = self.url(prefix);
        let mut out = Listing::default();
        let mut token: Option<String> = None;
        let mut empty_pages = 0;
        loop {
            let mut action = ListObjectsV2::new(&self.bucket, Some(&self.credentials));
            action.with_prefix(prefix);
            if folders {
                action.with_delimiter("/");
            }
            if let Some(t) = &token {
                action.with_continuation_token(t.clone());
            }
            let page = self.call(|| {
                let resp = self
                    .request(Op::List, &action)
                    .call()
                    .map_err(|e| self.failure(&what, e))?;
                let body = Client::text(resp, 64 << 20, &what)?;
                // Any XML parses as an empty page (every field is optional): a proxy's or
                // portal's page must not read as an empty folder.
                if !body.contains("<ListBucketResult") {
                    let start: String = body.chars().take(80).collect();
                    return Err(Failure::Fatal(S3Error::Reply(
                        what.clone(),
                        format!("not an object listing: {start:?}"),
                    )));
                }
                ListObjectsV2::parse_response(&body)
                    .map_err(|e| Failure::Fatal(S3Error::Reply(what.clone(), e.to_string())))
            })?;
            let found = page.contents.len() + page.common_prefixes.len();
            if out.objects.len() + out.folders.len() + found > MAX_LISTED {
                return Err(S3Error::Reply(
                    what,
                    format!("the listing goes on past {MAX_LISTED} entries; refusing to read more"),
                ));
            }
            empty_pages = if found == 0 { empty_pages + 1 } else { 0 };
            for c in page.contents {
                out.objects.push(Listed {
                    key: decode(&what, &c.key)?,
                    size: c.size,
                    etag: c.etag,
                    last_modified: c.last_modified,
                });
            }
            for p in page.common_prefixes {
                out.folders.push(decode(&what, &p.prefix)?);
            }
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => {
                    if token.as_deref() == Some(t.as_str()) {
                        return Err(S3Error::Reply(
                            what,
                            "the listing repeats its continuation token (it would never end)"
                                .into(),
                        ));
                    }
                    if empty_pages >= MAX_EMPTY_PAGES {
                        return Err(S3Error::Reply(
                            what,
                            format!(
                                "{empty_pages} listing pages in a row were empty and promised more"
                            ),
                        ));
                    }
                    token = Some(t)
                }
                _ => return Ok(out),
            }
        }
    }

    /// Stores `body` as `key` in one request, the server checking its CRC-32, with user
    /// metadata `meta` (`x-amz-meta-…` headers).
    pub fn put(&self, key: &str, body: &[u8], meta: &[(&str, String)]) -> Result<(), S3Error> {
        let what = self.url(key);
        let crc = crc32_header(body);
        let mut action = PutObject::new(&self.bucket, Some(&self.credentials), key);
        action
            .headers_mut()
            .insert("x-amz-checksum-crc32", crc.clone());
        for (k, v) in meta {
            action.headers_mut().insert(*k, v.clone());
        }
        self.call(|| {
            let mut req = self
                .request(Op::Put, &action)
                .set("x-amz-checksum-crc32", &crc);
            for (k, v) in meta {
                req = req.set(k, v);
            }
            req.send_bytes(body)
                .map(drop)
                .map_err(|e| self.failure(&what, e))?;
            self.traffic.add_sent(body.len() as u64);
            Ok(())
        })
    }

    pub fn delete(&self, key: &str) -> Result<(), S3Error> {
        let what = self.url(key);
        let action = DeleteObject::new(&self.bucket, Some(&self.credentials), key);
        self.call(|| {
            self.request(Op::Delete, &action)
                .call()
                .map(drop)
                .map_err(|e| self.failure(&what, e))
        })
    }
}

/// Whether `resp` answers a request for `len` bytes at `offset`: 206 with a `Content-Range`
/// that starts there and covers them, or 200 (a store that ignores `Range` sends the whole
/// object) only when they start the object. Anything else (a redirect's page, a range that
/// is not the one asked for) would be read as the object's bytes.
fn range_answered(resp: &ureq::Response, offset: u64, len: u64) -> Result<(), String> {
    match resp.status() {
        200 if offset == 0 => Ok(()),
        206 => {
            let header = resp.header("content-range").unwrap_or("");
            let range = header
                .strip_prefix("bytes ")
                .and_then(|r| r.split_once('/'))
                .and_then(|(r, _)| r.split_once('-'))
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
            match range {
                Some((first, last)) if first == offset && last >= offset + len - 1 => Ok(()),
                _ => Err(format!(
                    "Content-Range \"{header}\" to a request for bytes {offset}-{}",
                    offset + len - 1
                )),
            }
        }
        status => Err(format!("HTTP {status} to a range request")),
    }
}

/// The `x-amz-checksum-crc32` value of `data`: its CRC-32 big-endian, in base64.
pub fn crc32_header(data: &[u8]) -> String {
    crc32_value(crc32fast::hash(data))
}

/// The `x-amz-checksum-crc32` value of a CRC-32: big-endian, in base64.
pub fn crc32_value(crc: u32) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

/// The user metadata where uploads record the object's CRC-32 (8 hex digits, as manifests).
pub const CRC_META: &str = "x-amz-meta-qmpbackup-crc32";

/// A key of a listing asked with `encoding-type=url`.
fn decode(what: &str, key: &str) -> Result<String, S3Error> {
    percent_encoding::percent_decode_str(key)
        .decode_utf8()
        .map(|k| k.into_owned())
        .map_err(|e| S3Error::Reply(what.to_string(), format!("key {key}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_error_words() {
        // The value Garage computed for 5 MiB of 0x03 (checked against a live server).
        assert_eq!(crc32_header(&vec![3u8; 5 << 20]), "rqkipg==");
        let (code, msg) = error_words(
            "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>Bucket not found: x</Message></Error>",
        );
        assert_eq!(
            (code.as_str(), msg.as_str()),
            ("NoSuchBucket", "Bucket not found: x")
        );
        assert!(explain(404, &code, &msg, "x").ends_with("bucket 'x' does not exist"));
        assert!(explain(403, "AccessDenied", "", "x").contains("AWS_ACCESS_KEY_ID"));
        assert_eq!(decode("", "a%20b/INC-1").unwrap(), "a b/INC-1");
    }
}
