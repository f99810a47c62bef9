//! A bounded, thread-safe cache of decoded L2 tables, shared by the images of a chain.
//!
//! Readers on many rayon threads share one image; each L2 table is loaded once and handed out
//! as an `Arc`. Loading happens outside the lock, so threads that miss on different tables read
//! in parallel (two threads missing on the same table both load it; the result is identical).
//! The bound is in bytes and covers every image that shares the cache: a chain of a thousand
//! files holds what its budget allows, not a thousand per-file caches. When full, the least
//! recently used tables are evicted: a linear scan, cheap at the few hundred entries a cache
//! holds, and only paid on a miss.

use super::l2::L2Table;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes of decoded tables a cache holds (at least one table is always kept).
pub const BUDGET: usize = 16 << 20;

/// Identifies one image's tables in a shared cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageId(u64);

impl ImageId {
    /// A key no other image of this process has.
    pub fn unique() -> ImageId {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        ImageId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

pub struct L2Cache {
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    tick: u64,
    bytes: usize,
    tables: HashMap<(ImageId, u64), (Arc<L2Table>, u64)>,
}

impl L2Cache {
    /// A cache holding at most `budget` bytes of tables (and always the last one loaded).
    pub fn new(budget: usize) -> L2Cache {
        L2Cache {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The table at host offset `offset` of image `image`, loading it with `load` on a miss.
    pub fn get_or_load<E>(
        &self,
        image: ImageId,
        offset: u64,
        load: impl FnOnce() -> Result<L2Table, E>,
    ) -> Result<Arc<L2Table>, E> {
        let key = (image, offset);
        {
            let mut g = self.lock();
            g.tick += 1;
            let tick = g.tick;
            if let Some((t, used)) = g.tables.get_mut(&key) {
                *used = tick;
                return Ok(t.clone());
            }
        }
        let table = Arc::new(load()?);
        let cost = table.bytes();
        let mut g = self.lock();
        while g.bytes + cost > self.budget && !g.tables.is_empty() {
            let victim = g
                .tables
                .iter()
                .min_by_key(|(_, (_, u))| *u)
                .map(|(k, _)| *k)
                .expect("not empty");
            if let Some((t, _)) = g.tables.remove(&victim) {
                g.bytes -= t.bytes();
            }
        }
        let tick = g.tick;
        if let Some((old, _)) = g.tables.insert(key, (table.clone(), tick)) {
            g.bytes -= old.bytes();
        }
        g.bytes += cost;
        Ok(table)
    }

    /// Forgets the tables of `image` (its view changed).
    pub fn forget(&self, image: ImageId) {
        let mut g = self.lock();
        let gone: Vec<(ImageId, u64)> = g.tables.keys().filter(|k| k.0 == image).copied().collect();
        for k in gone {
            if let Some((t, _)) = g.tables.remove(&k) {
                g.bytes -= t.bytes();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().tables.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map inconsistent (every update is a
        // single insert or remove with its byte count), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_within_the_byte_budget() {
        // Tables of 4 entries: 32 bytes each; room for two.
        let c = L2Cache::new(64);
        let a = ImageId::unique();
        let load = || Ok::<_, ()>(L2Table::empty(4, false));
        c.get_or_load(a, 1, load).unwrap();
        c.get_or_load(a, 2, load).unwrap();
        c.get_or_load(a, 1, load).unwrap();
        c.get_or_load(a, 3, load).unwrap();
        assert_eq!(c.len(), 2);
        let mut loaded = false;
        c.get_or_load(a, 1, || {
            loaded = true;
            load()
        })
        .unwrap();
        assert!(
            !loaded,
            "table 1 was used recently and must still be cached"
        );
        c.get_or_load(a, 2, || {
            loaded = true;
            load()
        })
        .unwrap();
        assert!(
            loaded,
            "table 2 was the least recently used and must be evicted"
        );
    }

    #[test]
    fn images_share_the_budget_and_keep_their_own_keys() {
        let c = L2Cache::new(64);
        let (a, b) = (ImageId::unique(), ImageId::unique());
        let load = |n| move || Ok::<_, ()>(L2Table::empty(n, false));
        c.get_or_load(a, 1, load(4)).unwrap();
        c.get_or_load(b, 1, load(4)).unwrap();
        assert_eq!(c.len(), 2, "same offset, different images");
        c.get_or_load(b, 2, load(4)).unwrap();
        assert_eq!(c.len(), 2, "the budget covers both images");
        // b's second table pushed a's out; forgetting b leaves nothing.
        c.forget(b);
        assert!(c.is_empty());
        // A table larger than the whole budget is still kept alone.
        c.get_or_load(a, 9, load(64)).unwrap();
        assert_eq!(c.len(), 1);
    }
}
