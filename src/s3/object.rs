//! An object read at any offset, as the format engine reads a file.
//!
//! The object's size and ETag are taken once, when it is opened, and every read asks for that
//! version only (`If-Match`): if the object is replaced while a restore runs, the next read
//! fails with [`S3Error::Changed`] instead of mixing bytes of two backups into one disk.
//!
//! Small reads (qcow2 headers, L1/L2 and refcount tables, compressed clusters) go through a
//! block cache shared by all objects of a store: a store reads whole blocks anyway (Garage
//! 1 MiB), each request costs a round trip, and neighbouring tables usually share a block.
//! An object of one block (a small INC) is fetched whole by its first read. The cache has a
//! fixed byte budget, so it stays bounded however many objects a chain has.
//!
//! Large reads (data chunks) are shaped for a store that keeps objects in compressed blocks
//! (Garage: 1 MiB, zstd): each asks for whole blocks in one request, so the store decompresses
//! every block once. A chunk rarely starts on a block boundary (a qcow2 file's data follows
//! its metadata), so the block a chunk shares with its neighbour is fetched by whichever read
//! comes first and handed to the other through the cache: no byte range is fetched twice.

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

/// A cached block: when it was last used, its bytes, and whether it is kept for one more
/// reader only (see [`BlockCache::put`]).
type Cached = (u64, Arc<Vec<u8>>, bool);

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
            let data = entry.1.clone();
            if entry.2 {
                b.map.remove(&key);
            }
            return Lookup::Hit(data);
        }
        if let Some(l) = b.loading.get(&key) {
            return Lookup::Wait(l.clone());
        }
        b.loading.insert(key, Arc::default());
        Lookup::Fetch
    }

    /// Caches a fetched block and hands it to the readers waiting for it. A block fetched
    /// at the end of a data read (`once`) is wanted by one neighbouring read only: it is not
    /// kept when that reader already waits for it, and is dropped when it takes it, so data
    /// passing through leaves the cache to metadata.
    fn put(&self, key: (u64, u64), data: Arc<Vec<u8>>, once: bool) {
        let mut b = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        b.tick += 1;
        let tick = b.tick;
        let loading = b.loading.remove(&key);
        let waited = loading.as_ref().is_some_and(|l| Arc::strong_count(l) > 1);
        if !(once && waited) {
            b.map.insert(key, (tick, data.clone(), once));
        }
        while b.map.len() > BLOCKS {
            let oldest = b.map.iter().min_by_key(|(_, c)| c.0).map(|(k, _)| *k);
            if let Some(k) = oldest {
                b.map.remove(&k);
            }
        }
        Self::wake(loading, Some(data));
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
        self.cache.put(key, data.clone(), false);
        std::mem::forget(pending);
        Ok(data)
    }

    fn fetch(&self, index: u64) -> Result<Vec<u8>, S3Error> {
        let mut data = vec![0u8; self.block_len(index)];
        self.client
            .read(&self.key, &self.head.etag, &mut data, index * BLOCK)?;
        Ok(data)
    }
}

/// A block at an end of a span read that the read covers only in part.
enum Edge<'a> {
    /// In the cache, or fetched meanwhile by another reader.
    Have(Arc<Vec<u8>>),
    /// Fetched by this read's request, then cached for the neighbouring read.
    Fetch(Vec<u8>, Pending<'a>),
    /// Another reader's fetch of it failed: fetched by this read's request, not cached.
    Plain(Vec<u8>),
}

impl Edge<'_> {
    /// The buffer this read's request fills, if it fetches the block.
    fn unfilled(&mut self) -> Option<&mut [u8]> {
        match self {
            Edge::Have(_) => None,
            Edge::Fetch(v, _) | Edge::Plain(v) => Some(v),
        }
    }

    /// The block's bytes once the request is done, cached if this read fetched them.
    fn done(self) -> Arc<Vec<u8>> {
        match self {
            Edge::Have(b) => b,
            Edge::Plain(v) => Arc::new(v),
            Edge::Fetch(v, pending) => {
                let data = Arc::new(v);
                pending.cache.put(pending.key, data.clone(), true);
                std::mem::forget(pending);
                data
            }
        }
    }
}

impl Object {
    /// Bytes in block `index` (the last block of an object may be short).
    fn block_len(&self, index: u64) -> usize {
        BLOCK.min(self.head.size - index * BLOCK) as usize
    }

    fn edge(&self, index: u64) -> Edge<'_> {
        let key = (self.id, index);
        match self.cache.lookup(key) {
            Lookup::Hit(b) => Edge::Have(b),
            Lookup::Wait(l) => match l.wait() {
                Some(b) => Edge::Have(b),
                None => Edge::Plain(vec![0; self.block_len(index)]),
            },
            Lookup::Fetch => Edge::Fetch(
                vec![0; self.block_len(index)],
                Pending {
                    cache: &self.cache,
                    key,
                },
            ),
        }
    }

    /// Reads `buf` at `offset` (in more than one block) in one request whose range starts and
    /// ends on block boundaries: a store that keeps objects in compressed blocks (Garage)
    /// then decompresses each block once, not the blocks at both ends of every read again.
    /// The blocks at the ends, which the neighbouring reads need too, are cached (and read
    /// from the cache when a neighbour fetched them first).
    fn read_span(&self, buf: &mut [u8], offset: u64) -> Result<(), S3Error> {
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let mut head = (offset % BLOCK != 0).then(|| self.edge(first));
        let mut tail = (end % BLOCK != 0 && end < self.head.size).then(|| self.edge(last));
        // The bytes of `buf` outside the edge blocks come straight from the request.
        let inner_start = if head.is_some() {
            (first + 1) * BLOCK
        } else {
            offset
        };
        let inner_end = if tail.is_some() { last * BLOCK } else { end };
        let (before, rest) = buf.split_at_mut((inner_start - offset) as usize);
        let (inner, after) = rest.split_at_mut((inner_end - inner_start) as usize);
        {
            let mut start = inner_start;
            let mut parts: Vec<&mut [u8]> = Vec::with_capacity(3);
            if let Some(h) = head.as_mut().and_then(Edge::unfilled) {
                start = first * BLOCK;
                parts.push(h);
            }
            parts.push(inner);
            if let Some(t) = tail.as_mut().and_then(Edge::unfilled) {
                parts.push(t);
            }
            self.client
                .read_parts(&self.key, &self.head.etag, &mut parts, start)?;
        }
        if let Some(h) = head {
            let within = (offset % BLOCK) as usize;
            before.copy_from_slice(&h.done()[within..within + before.len()]);
        }
        if let Some(t) = tail {
            after.copy_from_slice(&t.done()[..after.len()]);
        }
        Ok(())
    }
}

impl Storage for Object {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.head.size {
            return Ok(0);
        }
        let n = buf.len().min((self.head.size - offset) as usize);
        let buf = &mut buf[..n];
        // Large reads across blocks (data) are aligned spans; small ones (metadata), reads
        // within one block and every read of a one-block object go through whole cached
        // blocks (a one-block object is read again at once: an open after a checksum pass).
        let spans_blocks = offset / BLOCK != (offset + n as u64 - 1) / BLOCK;
        if n > SMALL && self.head.size > BLOCK && spans_blocks {
            self.read_span(buf, offset)?;
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
