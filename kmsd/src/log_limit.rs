//! Log lines whose cause someone else decides how often happens — a peer sending a wrong
//! greeting, a full disk failing every call — written at most once per interval, each
//! saying how many were left out before it. A daemon that logged every one wrote ~400
//! lines a second on a full disk, into the log that needed the room.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct LogAtMostEvery {
    every: Duration,
    /// A hash of what the last line said ([`LogAtMostEvery::due_for`]).
    what: AtomicU64,
    /// Milliseconds since `START` of the last line written, plus one (0: none yet).
    last: AtomicU64,
    /// Lines left out since the last one written.
    skipped: AtomicU64,
}

impl LogAtMostEvery {
    pub const fn new(every: Duration) -> Self {
        LogAtMostEvery {
            every,
            what: AtomicU64::new(0),
            last: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// [`LogAtMostEvery::due`] for a line saying `what`, except that a line saying
    /// something else than the last is due at once: a flood of one failure does not hide
    /// another.
    pub fn due_for(&self, what: &str) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        what.hash(&mut hasher);
        let hash = hasher.finish();
        if self.what.swap(hash, Ordering::Relaxed) != hash {
            self.last.store(now_millis(), Ordering::Relaxed);
            return Some(self.skipped.swap(0, Ordering::Relaxed));
        }
        self.due()
    }

    /// `Some(n)` if a line is due now (the next is then due `every` from now), `n` being
    /// how many were left out since the last; `None` if not, and this one is counted as
    /// left out.
    pub fn due(&self) -> Option<u64> {
        let now = now_millis();
        let last = self.last.load(Ordering::Relaxed);
        let every = self.every.as_millis() as u64;
        let due = (last == 0 || now.saturating_sub(last) >= every)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if due {
            Some(self.skipped.swap(0, Ordering::Relaxed))
        } else {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Milliseconds since the first call, plus one (0 means "never").
fn now_millis() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line logged at most once per period is due once, then not again within it; the
    /// next says how many were left out.
    #[test]
    fn log_at_most_every_is_due_once_per_period() {
        let hourly = LogAtMostEvery::new(Duration::from_secs(3600));
        assert_eq!(hourly.due(), Some(0));
        assert_eq!(hourly.due(), None);
        assert_eq!(hourly.due(), None);
        let always = LogAtMostEvery::new(Duration::ZERO);
        assert_eq!(always.due(), Some(0));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(always.due(), Some(0));
        let often = LogAtMostEvery::new(Duration::from_millis(300));
        assert_eq!(often.due(), Some(0));
        assert_eq!((often.due(), often.due()), (None, None));
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(often.due(), Some(2));
    }

    /// A line saying something else is due at once, and says how many were left out.
    #[test]
    fn another_line_is_due_at_once() {
        let hourly = LogAtMostEvery::new(Duration::from_secs(3600));
        assert_eq!(hourly.due_for("disk full"), Some(0));
        assert_eq!(hourly.due_for("disk full"), None);
        assert_eq!(hourly.due_for("wrapped key does not open"), Some(1));
        assert_eq!(hourly.due_for("wrapped key does not open"), None);
        assert_eq!(hourly.due_for("disk full"), Some(1));
    }
}
