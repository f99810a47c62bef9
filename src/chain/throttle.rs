//! `--rate-limit`: keeps a long restore from saturating a shared disk or network.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Paces work to at most `rate` bytes per second on average, across threads.
pub struct Throttle {
    rate: Option<u64>,
    start: Instant,
    done: AtomicU64,
}

impl Throttle {
    pub fn new(rate: Option<u64>) -> Throttle {
        Throttle {
            rate: rate.filter(|&r| r > 0),
            start: Instant::now(),
            done: AtomicU64::new(0),
        }
    }

    /// Accounts `bytes` and sleeps until the average rate is back under the limit.
    pub fn pace(&self, bytes: u64) {
        let Some(rate) = self.rate else { return };
        let total = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let due = Duration::from_secs_f64(total as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn paces_to_the_rate() {
        let t = super::Throttle::new(Some(10 << 20));
        let start = std::time::Instant::now();
        for _ in 0..4 {
            t.pace(1 << 20);
        }
        // 4 MiB at 10 MiB/s: at least 0.4 s.
        assert!(start.elapsed().as_secs_f64() >= 0.39);
        let free = super::Throttle::new(None);
        let start = std::time::Instant::now();
        free.pace(1 << 40);
        assert!(start.elapsed().as_secs_f64() < 0.1);
    }
}
