//! A backup folder in an object store: `s3://BUCKET/PREFIX` as a [`Place`].
//!
//! The folder's files are the objects directly below `PREFIX/`; sub-folders (`.manifest/`) are
//! the next level of key prefixes. Reading is what restores need: listings (paginated, so
//! folders of any size list completely) and objects opened with their version pinned (see
//! [`crate::s3::object`]). Writing is whole objects (`write`, `delete`); an object store cannot
//! rename, so the commands that change a backup folder in place refuse `s3://` before they
//! start (see [`refuse_in_place`]).
//!
//! [`register`] makes the format engine open `s3://` names through the same clients, so an
//! image in a bucket opens wherever a local image does.

use super::place::{Entry, Kind, Place};
use crate::qcow2::protocol::{self, Protocol};
use crate::qcow2::storage::Storage;
use crate::s3::client::Head;
use crate::s3::object::BlockCache;
use crate::s3::url::{is_s3, SCHEME};
use crate::s3::{Client, Config, Object, S3Error, S3Url};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The clients of this process: one configuration (from the environment), one client per
/// bucket, one block cache for all objects, and what listings said of each object
/// (`s3://bucket/key` → size, ETag): an object opened after a listing is pinned to the
/// version the listing showed, with no request of its own; and an object missing from a
/// folder listed whole is missing, with no request either (verify asks for a manifest of
/// every file, and a chain without manifests would cost a HEAD per file).
struct Stores {
    config: OnceLock<Result<Config, String>>,
    clients: Mutex<HashMap<String, Arc<Client>>>,
    cache: Arc<BlockCache>,
    listed: Mutex<Listed>,
}

#[derive(Default)]
struct Listed {
    objects: HashMap<String, Head>,
    /// Folders (`s3://bucket/prefix/`) listed whole, each with the count of writes its
    /// client had sent before (see [`crate::s3::client::Traffic::writes`]): the listing tells what is missing
    /// only while this process has written nothing since.
    folders: HashMap<String, u64>,
}

/// The folder `url` lies in, as [`Listed::folders`] names it.
fn folder_of(url: &S3Url) -> String {
    let prefix = url.key.rsplit_once('/').map_or("", |(p, _)| p);
    format!("{SCHEME}{}/{prefix}/", url.bucket)
}

fn stores() -> &'static Stores {
    static STORES: OnceLock<Stores> = OnceLock::new();
    STORES.get_or_init(|| Stores {
        config: OnceLock::new(),
        clients: Mutex::new(HashMap::new()),
        cache: Arc::new(BlockCache::default()),
        listed: Mutex::new(Listed::default()),
    })
}

/// This process's store configuration, read from the environment on first use.
fn config() -> Result<&'static Config, S3Error> {
    stores()
        .config
        .get_or_init(|| Config::from_env().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| S3Error::Config(e.clone()))
}

/// The client for `bucket`, made on first use.
pub fn client(bucket: &str) -> Result<Arc<Client>, S3Error> {
    let s = stores();
    let config = config()?;
    let mut clients = s.clients.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = clients.get(bucket) {
        return Ok(c.clone());
    }
    let c = Arc::new(Client::new(config, bucket)?);
    clients.insert(bucket.to_string(), c.clone());
    Ok(c)
}

/// Logs (at debug level) what this process asked of each store it used: the number of
/// requests of each kind and the bytes moved. Called when a command ends.
pub fn log_traffic() {
    let clients = stores().clients.lock().unwrap_or_else(|p| p.into_inner());
    let mut buckets: Vec<_> = clients.iter().collect();
    buckets.sort_by(|a, b| a.0.cmp(b.0));
    for (bucket, client) in buckets {
        tracing::debug!("s3://{bucket}: {}", client.traffic.summary());
    }
}

/// Opens the object `url` names, pinned to the version a listing showed if there was one.
fn open_object(url: &S3Url) -> Result<Object, S3Error> {
    let client = client(&url.bucket)?;
    let s = stores();
    let (known, folder_listed) = {
        let listed = s.listed.lock().unwrap_or_else(|p| p.into_inner());
        (
            listed.objects.get(&url.to_string()).cloned(),
            listed.folders.get(&folder_of(url)) == Some(&client.traffic.writes()),
        )
    };
    Ok(match known {
        Some(head) => Object::pinned(client, &url.key, head, s.cache.clone()),
        None if folder_listed => {
            return Err(S3Error::Status {
                what: url.to_string(),
                status: 404,
                problem: "no such object (not in the folder's listing)".into(),
            })
        }
        None => Object::open(client, &url.key, s.cache.clone())?,
    })
}

/// Opens `s3://` names for the format engine.
struct S3Protocol;

impl Protocol for S3Protocol {
    fn open(&self, name: &Path) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(open_object(&S3Url::of_path(name)?)?))
    }

    fn in_flight(&self) -> usize {
        requests()
    }

    /// The objects listed beside `name` whose names sort before it, nearest first: backup
    /// files sort by time, so an INC's backing chain is the files before it. The listing
    /// also pins their versions, so opening them costs no HEAD.
    fn neighbours(&self, name: &Path, limit: usize) -> Vec<PathBuf> {
        let Ok(url) = S3Url::of_path(name) else {
            return Vec::new();
        };
        let Some((folder, file)) = url.key.rsplit_once('/') else {
            return Vec::new();
        };
        let folder = S3Url {
            bucket: url.bucket.clone(),
            key: folder.to_string(),
        };
        let Some(entries) = Prefix::new(folder).ok().and_then(|p| p.list("").ok()) else {
            return Vec::new();
        };
        let mut before: Vec<String> = entries
            .into_iter()
            .filter(|e| e.kind == Kind::File && !e.name.starts_with('.') && *e.name < *file)
            .map(|e| e.name)
            .collect();
        before.sort();
        let parent = name.parent().unwrap_or(Path::new(""));
        before
            .into_iter()
            .rev()
            .take(limit)
            .map(|n| parent.join(n))
            .collect()
    }
}

/// Requests to keep in flight when many objects are wanted at once (the configuration's, or
/// the default when the configuration is broken: the command then fails on its first request
/// with the configuration's own error).
pub fn requests() -> usize {
    config().map_or(crate::s3::config::REQUESTS, |c| c.requests)
}

/// Makes `s3://BUCKET/KEY` names open as images everywhere (call once, early).
pub fn register() {
    protocol::register(SCHEME, Arc::new(S3Protocol));
}

/// Refuses `dir` when it is in an object store: `command` changes backup files in place.
pub fn refuse_in_place(dir: &Path, command: &str) -> Result<(), super::StoreError> {
    if is_s3(dir) {
        return Err(super::StoreError::Refused(format!(
            "{}: {command} changes backup files in place, which an object store cannot do; restore from it with merge (or serve), or run {command} on a local copy",
            dir.display()
        )));
    }
    Ok(())
}

/// A folder in a bucket.
pub struct Prefix {
    client: Arc<Client>,
    url: S3Url,
}

impl Prefix {
    pub fn new(url: S3Url) -> Result<Prefix, S3Error> {
        Ok(Prefix {
            client: client(&url.bucket)?,
            url,
        })
    }

    pub fn url(&self) -> &S3Url {
        &self.url
    }

    fn key(&self, name: &str) -> io::Result<String> {
        Ok(self.url.join(name)?.key)
    }

    /// Forgets what listings said of `key` (it is being written or deleted).
    fn unlist(&self, key: &str) {
        let url = S3Url {
            bucket: self.url.bucket.clone(),
            key: key.to_string(),
        };
        let mut listed = stores().listed.lock().unwrap_or_else(|p| p.into_inner());
        listed.objects.remove(&url.to_string());
    }
}

impl Place for Prefix {
    fn locate(&self, name: &str) -> PathBuf {
        match self.url.join(name) {
            Ok(u) => PathBuf::from(u.to_string()),
            Err(_) => PathBuf::from(format!("{}/{name}", self.url)),
        }
    }

    fn list(&self, sub: &str) -> io::Result<Vec<Entry>> {
        let dir = self.url.join(sub)?;
        let prefix = dir.folder_prefix();
        let writes = self.client.traffic.writes();
        let listing = self.client.list(&prefix, true)?;
        let mut listed = stores().listed.lock().unwrap_or_else(|p| p.into_inner());
        listed.folders.insert(format!("{dir}/"), writes);
        let mut out = Vec::new();
        for o in listing.objects {
            let Some(name) = o.key.strip_prefix(&prefix).filter(|n| !n.is_empty()) else {
                continue;
            };
            out.push(Entry {
                name: name.to_string(),
                kind: Kind::File,
                size: o.size,
                mtime: parse_mtime(&o.last_modified),
            });
            let url = S3Url {
                bucket: self.url.bucket.clone(),
                key: o.key.clone(),
            };
            listed.objects.insert(
                url.to_string(),
                Head {
                    size: o.size,
                    etag: o.etag,
                },
            );
        }
        for f in listing.folders {
            if let Some(name) = f.strip_prefix(&prefix) {
                out.push(Entry {
                    name: name.trim_end_matches('/').to_string(),
                    kind: Kind::Folder,
                    size: 0,
                    mtime: 0,
                });
            }
        }
        Ok(out)
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(open_object(&self.url.join(name)?)?))
    }

    fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let key = self.key(name)?;
        self.unlist(&key);
        Ok(self.client.put(&key, bytes, &[])?)
    }

    fn rename(&self, from: &str, _to: &str) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{}: an object store cannot rename",
                self.locate(from).display()
            ),
        ))
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        let key = self.key(name)?;
        self.unlist(&key);
        Ok(self.client.delete(&key)?)
    }

    fn sync(&self, _name: &str) -> io::Result<()> {
        // A completed PUT or DELETE is durable as far as the store promises anything.
        Ok(())
    }
}

/// `2026-12-01T17:19:40.000Z` → epoch seconds (0 when unreadable: it only breaks ties).
fn parse_mtime(s: &str) -> u64 {
    let whole = match s.split_once('.') {
        Some((head, _)) => format!("{head}Z"),
        None => s.to_string(),
    };
    super::time::parse_time(&whole).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn listing_times_read_as_epochs() {
        assert_eq!(
            super::parse_mtime("2023-11-14T22:13:20.000Z"),
            1_700_000_000
        );
        assert_eq!(super::parse_mtime("garbage"), 0);
    }
}
