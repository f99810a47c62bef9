//! Many blocking calls in flight at once, for work that waits on round trips.
//!
//! Opening a chain of a thousand images in an object store costs one request per image for
//! its header and tables; one after the other that is a thousand times the store's latency,
//! while the store could answer dozens at once. The rayon pools keep one worker per core
//! (they are for CPU work); this runs up to `limit` plain threads that each take the next item
//! as they finish one, so the slowest answer holds up no batch. Results keep the items' order.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Calls `f` on every item of `items` with at most `limit` calls running at a time, and
/// returns the results in item order. With `limit` 1 (or one item) it runs on the calling
/// thread. A panic in `f` is raised again on the calling thread.
pub fn map<T: Sync, R: Send>(items: &[T], limit: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = limit.min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                })
            })
            .collect();
        for w in workers {
            if let Err(panic) = w.join() {
                // The others stop at the next item: nothing is left for them to take.
                next.store(items.len(), Ordering::Relaxed);
                std::panic::resume_unwind(panic);
            }
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.expect("every item was mapped: a worker that panicked re-raised it"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[test]
    fn results_keep_their_order_and_the_limit_holds() {
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let items: Vec<u64> = (0..200).collect();
        let out = map(&items, 16, |&i| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            // Later items finish first: order must come from the index, not the finish.
            std::thread::sleep(Duration::from_micros(200 - i));
            running.fetch_sub(1, Ordering::SeqCst);
            i * 2
        });
        assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        let most = most.load(Ordering::SeqCst);
        assert!(most <= 16, "{most} calls ran at once");
        assert!(most > 1, "the calls never overlapped");
    }

    #[test]
    fn one_at_a_time_runs_on_the_calling_thread() {
        let me = std::thread::current().id();
        let out = map(&[1, 2, 3], 1, |&i| (i, std::thread::current().id() == me));
        assert_eq!(out, vec![(1, true), (2, true), (3, true)]);
    }

    #[test]
    #[should_panic(expected = "item 7")]
    fn a_panic_reaches_the_caller() {
        let items: Vec<u32> = (0..20).collect();
        map(&items, 4, |&i| {
            if i == 7 {
                panic!("item 7");
            }
            i
        });
    }
}
