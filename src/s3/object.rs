//! An object read at any offset, as the format engine reads a file.
//!
//! The object's size and ETag are taken once, when it is opened, and every read asks for that
//! version only (`If-Match`): if the object is replaced while a restore runs, the next read
//! fails with [`S3Error::Changed`] instead of mixing bytes of two backups into one disk.
//!
//! Small reads (qcow2 headers, L1/L2 and refcount tables, compressed clusters) go through a
//! block cache shared by all objects of a store: a store reads whole blocks anyway (Garage
//! 1 MiB), each request costs a round trip, and neighbouring tables usually share a block.
//! The cache has a fixed byte budget, so it stays bounded however many objects a chain has.
//! Large reads (data chunks) go straight to the store.

use super::client::{Client, Head};
use super::error::S3Error;
use crate::qcow2::storage::Storage;
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex};

/// Reads up to this size are served by whole cached blocks.
const SMALL: usize = 256 << 10;
/// The cached unit (and the store's own read unit on Garage).
const BLOCK: u64 = 1 << 20;
/// The cache's budget, in blocks: 32 MiB.
const BLOCKS: usize = 32;

/// Recently read blocks of any object of one store, least recently used evicted first.
///
/// A block is fetched once however many readers want it at the same time: an NBD client
/// reading a disk sends neighbouring requests at once (nbdcopy: four 256 KiB reads of one
/// MiB), and without this every one of them fetched the whole block.
#[derive(Default)]
pub struct BlockCache {
    inner: Mutex<Blocks>,
    /// A number for each object version opened (`s3://bucket/key` and ETag): every open of
    /// one version shares its blocks (verify opens a file three times: checksums, structure,
    /// check), and a replaced object's new version gets blocks of its own.
    ids: Mutex<HashMap<(String, String), u64>>,
}

impl BlockCache {
    fn id_of(&self, url: String, etag: &str) -> u64 {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let next = ids.len() as u64;
        *ids.entry((url, etag.to_string())).or_insert(next)
    }
}

/// A cached block: when it was last used, and its bytes.
type Cached = (u64, Arc<Vec<u8>>);

/// A block being fetched: its readers wait for `done`; `None` after a failed fetch (each
/// waiter then reads for itself and gets its own error).
#[derive(Default)]
struct Loading {
    result: Mutex<Option<Option<Arc<Vec<u8>>>>>,
    done: Condvar,
}

#[derive(Default)]
struct Blocks {
    /// (object id, block index) → the block.
    map: HashMap<(u64, u64), Cached>,
    loading: HashMap<(u64, u64), Arc<Loading>>,
    tick: u64,
}

/// What a reader of a block is to do.
enum Lookup {
    Hit(Arc<Vec<u8>>),
    /// Another reader fetches it: wait for that.
    Wait(Arc<Loading>),
    /// Fetch it, then [`BlockCache::put`] or [`BlockCache::failed`].
    Fetch,
}

impl BlockCache {
    fn lookup(&self, key: (u64, u64)) -> Lookup {
        let mut b = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        b.tick += 1;
        let tick = b.tick;
        if let Some(entry) = b.map.get_mut(&key) {
            entry.0 = tick;
            return Lookup::Hit(entry.1.clone());
        }
        if let Some(l) = b.loading.get(&key) {
            return Lookup::Wait(l.clone());
        }
        b.loading.insert(key, Arc::default());
        Lookup::Fetch
    }

    fn put(&self, key: (u64, u64), data: Arc<Vec<u8>>) {
        let mut b = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        b.tick += 1;
        let tick = b.tick;
        b.map.insert(key, (tick, data.clone()));
        while b.map.len() > BLOCKS {
            let oldest = b.map.iter().min_by_key(|(_, (t, _))| *t).map(|(k, _)| *k);
            if let Some(k) = oldest {
                b.map.remove(&k);
            }
        }
        Self::wake(b.loading.remove(&key), Some(data));
    }

    fn failed(&self, key: (u64, u64)) {
        let mut b = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::wake(b.loading.remove(&key), None);
    }

    fn wake(loading: Option<Arc<Loading>>, data: Option<Arc<Vec<u8>>>) {
        if let Some(l) = loading {
            *l.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(data);
            l.done.notify_all();
        }
    }
}

/// A fetch in progress; dropped unfinished, it tells the waiters it failed.
struct Pending<'a> {
    cache: &'a BlockCache,
    key: (u64, u64),
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.cache.failed(self.key);
    }
}

impl Loading {
    fn wait(&self) -> Option<Arc<Vec<u8>>> {
        let mut r = self.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match &*r {
                Some(data) => return data.clone(),
                None => r = self.done.wait(r).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

pub struct Object {
    client: Arc<Client>,
    key: String,
    head: Head,
    cache: Arc<BlockCache>,
    /// This object's name in the cache.
    id: u64,
}

impl Object {
    /// Opens `key`, pinning its current version.
    pub fn open(client: Arc<Client>, key: &str, cache: Arc<BlockCache>) -> Result<Object, S3Error> {
        let head = client.head(key)?.ok_or_else(|| S3Error::Status {
            what: client.url(key),
            status: 404,
            problem: "no such object".into(),
        })?;
        Ok(Object::pinned(client, key, head, cache))
    }

    /// An object whose size and ETag are known already (from a listing).
    pub fn pinned(client: Arc<Client>, key: &str, head: Head, cache: Arc<BlockCache>) -> Object {
        let id = cache.id_of(client.url(key), &head.etag);
        Object {
            client,
            key: key.to_string(),
            head,
            cache,
            id,
        }
    }

    pub fn etag(&self) -> &str {
        &self.head.etag
    }

    fn block(&self, index: u64) -> Result<Arc<Vec<u8>>, S3Error> {
        let key = (self.id, index);
        match self.cache.lookup(key) {
            Lookup::Hit(b) => return Ok(b),
            Lookup::Wait(l) => {
                if let Some(b) = l.wait() {
                    return Ok(b);
                }
                // The fetch failed; this reader's own attempt reports its own error.
                return self.fetch(index).map(Arc::new);
            }
            Lookup::Fetch => {}
        }
        // Whatever ends this fetch (an error, a panic) wakes the readers waiting for it.
        let pending = Pending {
            cache: &self.cache,
            key,
        };
        let data = Arc::new(self.fetch(index)?);
        self.cache.put(key, data.clone());
        std::mem::forget(pending);
        Ok(data)
    }

    fn fetch(&self, index: u64) -> Result<Vec<u8>, S3Error> {
        let start = index * BLOCK;
        let mut data = vec![0u8; BLOCK.min(self.head.size - start) as usize];
        self.client
            .read(&self.key, &self.head.etag, &mut data, start)?;
        Ok(data)
    }
}

impl Storage for Object {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.head.size {
            return Ok(0);
        }
        let n = buf.len().min((self.head.size - offset) as usize);
        let buf = &mut buf[..n];
        // An object of one block is cached whole whatever the read: the next read of it (an
        // open after a checksum pass) is on its way.
        if n > SMALL && self.head.size > BLOCK {
            self.client.read(&self.key, &self.head.etag, buf, offset)?;
            return Ok(n);
        }
        let mut done = 0;
        while done < n {
            let pos = offset + done as u64;
            let block = self.block(pos / BLOCK)?;
            let within = (pos % BLOCK) as usize;
            let take = (n - done).min(block.len() - within);
            buf[done..done + take].copy_from_slice(&block[within..within + take]);
            done += take;
        }
        Ok(n)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.head.size)
    }

    fn is_remote(&self) -> bool {
        true
    }
}
