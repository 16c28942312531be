//! Time as an input. Every date rule of the engine (rotation periods, the deletion wait,
//! retention) reads the time from a [`Clock`], so tests move time instead of sleeping.

use kms_shared::model::UnixMillis;
use std::sync::atomic::{AtomicI64, Ordering};

pub trait Clock: Send + Sync {
    /// The wall clock: what dates are stored in.
    fn now(&self) -> UnixMillis;

    /// Milliseconds of time passed, on a clock that a step of the wall clock (a machine
    /// without a real-time clock setting its time, an operator's `date`) does not move;
    /// only differences mean anything. It counts suspend, as the wall clock does.
    fn elapsed_ms(&self) -> i64;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixMillis {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
    }

    fn elapsed_ms(&self) -> i64 {
        // CLOCK_BOOTTIME: monotonic, and unlike CLOCK_MONOTONIC it goes on while the
        // machine sleeps, so a deletion wait spent in suspend still counts.
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        t.tv_sec
            .saturating_mul(1000)
            .saturating_add(t.tv_nsec / 1_000_000)
    }
}

/// A clock that only moves when told to (tests). `advance` and a forward `set` are time
/// passing; `step` is the wall clock being set without time passing.
#[derive(Debug)]
pub struct ManualClock {
    wall: AtomicI64,
    passed: AtomicI64,
}

impl ManualClock {
    pub fn new(start: UnixMillis) -> Self {
        ManualClock {
            wall: AtomicI64::new(start),
            passed: AtomicI64::new(0),
        }
    }

    /// Time passes until the wall clock reads `t` (if `t` is earlier, the wall clock is
    /// set back and no time passes).
    pub fn set(&self, t: UnixMillis) {
        let before = self.wall.swap(t, Ordering::SeqCst);
        self.passed
            .fetch_add(t.saturating_sub(before).max(0), Ordering::SeqCst);
    }

    pub fn advance(&self, ms: i64) {
        self.wall.fetch_add(ms, Ordering::SeqCst);
        self.passed.fetch_add(ms.max(0), Ordering::SeqCst);
    }

    /// The wall clock is set to `t` and no time passes (a clock step).
    pub fn step(&self, t: UnixMillis) {
        self.wall.store(t, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixMillis {
        self.wall.load(Ordering::SeqCst)
    }

    fn elapsed_ms(&self) -> i64 {
        self.passed.load(Ordering::SeqCst)
    }
}
