//! A bounded, thread-safe cache of decoded L2 tables.
//!
//! Readers on many rayon threads share one image; each L2 table is loaded once and handed out
//! as an `Arc`. Loading happens outside the lock, so threads that miss on different tables read
//! in parallel (two threads missing on the same table both load it; the result is identical).
//! When full, the least recently used table is evicted: a linear scan, cheap at the few
//! hundred entries a cache holds, and only paid on a miss.

use super::l2::L2Table;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct L2Cache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    tick: u64,
    tables: HashMap<u64, (Arc<L2Table>, u64)>,
}

impl L2Cache {
    /// A cache holding at most `capacity` tables (at least one).
    pub fn new(capacity: usize) -> L2Cache {
        L2Cache {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The table at host offset `offset`, loading it with `load` on a miss.
    pub fn get_or_load<E>(
        &self,
        offset: u64,
        load: impl FnOnce() -> Result<L2Table, E>,
    ) -> Result<Arc<L2Table>, E> {
        {
            let mut g = self.lock();
            g.tick += 1;
            let tick = g.tick;
            if let Some((t, used)) = g.tables.get_mut(&offset) {
                *used = tick;
                return Ok(t.clone());
            }
        }
        let table = Arc::new(load()?);
        let mut g = self.lock();
        if g.tables.len() >= self.capacity {
            if let Some(&victim) = g.tables.iter().min_by_key(|(_, (_, u))| *u).map(|(k, _)| k) {
                g.tables.remove(&victim);
            }
        }
        let tick = g.tick;
        g.tables.insert(offset, (table.clone(), tick));
        Ok(table)
    }

    pub fn len(&self) -> usize {
        self.lock().tables.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map inconsistent (every update is a
        // single insert or remove), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let c = L2Cache::new(2);
        let load = || Ok::<_, ()>(L2Table::empty(4, false));
        c.get_or_load(1, load).unwrap();
        c.get_or_load(2, load).unwrap();
        c.get_or_load(1, load).unwrap();
        c.get_or_load(3, load).unwrap();
        assert_eq!(c.len(), 2);
        let mut loaded = false;
        c.get_or_load(1, || {
            loaded = true;
            load()
        })
        .unwrap();
        assert!(
            !loaded,
            "table 1 was used recently and must still be cached"
        );
        c.get_or_load(2, || {
            loaded = true;
            load()
        })
        .unwrap();
        assert!(
            loaded,
            "table 2 was the least recently used and must be evicted"
        );
    }
}
