//! Refusals recorded together. Every refusal goes into the key's history (SPEC §6), but
//! one entry per refusal let any account that may connect, with no role at all, write
//! durable history as fast as the journal takes it (tens of thousands of entries a
//! second, kept for the retention period) by asking for a key it may not use, over and
//! over. So the refusals of one account, for one action on one key, are counted in
//! windows of [`WINDOW_MS`]: the first of a window is recorded at once (a refusal for a
//! missing role is answered without waiting for it: PROTOCOL.md §1), the others of the
//! window only counted, and their count is
//! recorded as one entry (`items` = `failed` = the count, dated at the last of them) once
//! the window is over: by the next such refusal, by the scheduler, which wakes for it
//! within a window's length of its end ([`Refusals::next_over`], [`Refusals::take_wake`]),
//! or when the daemon stops. A crash loses the counts not yet recorded: the refusals of
//! the last two seconds at most per account, key and action.

use super::Caller;
use kms_shared::model::{Action, UnixMillis};
use kms_shared::protocol::ErrorKind;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// How long the refusals after the first of a window are only counted.
pub const WINDOW_MS: i64 = 1_000;

/// Windows kept at most; past it, windows that are over are recorded and dropped, and a
/// refusal that still finds no room is recorded on its own.
const MAX_WINDOWS: usize = 16_384;

/// Refusals of one account, action and key, counted since the window opened.
pub struct Counted {
    pub tag: String,
    pub action: Action,
    pub kind: ErrorKind,
    /// The last refusal counted: who (its process and program), and when.
    pub caller: Caller,
    pub at: UnixMillis,
    pub n: u32,
}

struct Window {
    /// When the window opened, in [`crate::clock::Clock::elapsed_ms`].
    opened: i64,
    counted: Option<Counted>,
}

type WindowKey = (u32, String, Action, ErrorKind);

#[derive(Default)]
pub struct Refusals {
    windows: Mutex<HashMap<WindowKey, Window>>,
    /// Windows holding counts not yet recorded (changed with `windows` locked).
    counting: AtomicUsize,
    /// A window began counting while none other was: the scheduler must learn of it
    /// ([`Refusals::take_wake`]). While another window holds counts, the scheduler
    /// already wakes for that one's end, and then finds the others, so a flood of
    /// refusals wakes it once in a while, not once a refusal. The price: a window opened
    /// before the one the scheduler waits for, which began counting after it, is
    /// recorded at that one's end — under a window's length (1 s) after its own.
    wake: AtomicBool,
}

impl Refusals {
    /// A refusal of `caller`'s `action` on the key `tag`, at wall time `at` and `elapsed`.
    /// `Some` with the counts to record now if this refusal opens a window (the caller
    /// records it too, and waits for it); `None` if it was only counted.
    pub fn refused(
        &self,
        caller: &Caller,
        tag: &str,
        action: Action,
        kind: ErrorKind,
        at: UnixMillis,
        elapsed: i64,
    ) -> Option<Vec<Counted>> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let key = (caller.uid, tag.to_owned(), action, kind);
        let mut over = Vec::new();
        if let Some(w) = windows.get_mut(&key) {
            if elapsed.saturating_sub(w.opened) < WINDOW_MS {
                if w.counted.is_none() && self.counting.fetch_add(1, Ordering::AcqRel) == 0 {
                    self.wake.store(true, Ordering::Release);
                }
                let n = w.counted.as_ref().map_or(0, |c| c.n);
                w.counted = Some(Counted {
                    tag: tag.to_owned(),
                    action,
                    kind,
                    caller: caller.clone(),
                    at,
                    n: n.saturating_add(1),
                });
                return None;
            }
            over.extend(self.took(w.counted.take()));
        }
        if windows.len() >= MAX_WINDOWS && !windows.contains_key(&key) {
            over.extend(self.take_over(&mut windows, elapsed));
            if windows.len() >= MAX_WINDOWS {
                return Some(over);
            }
        }
        windows.insert(
            key,
            Window {
                opened: elapsed,
                counted: None,
            },
        );
        Some(over)
    }

    /// How long after `elapsed` the first window holding counts is over (0: already),
    /// if one is: when the scheduler should record them.
    pub fn next_over(&self, elapsed: i64) -> Option<i64> {
        let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if self.counting.load(Ordering::Acquire) == 0 {
            return None;
        }
        windows
            .values()
            .filter(|w| w.counted.is_some())
            .map(|w| (w.opened.saturating_add(WINDOW_MS) - elapsed).max(0))
            .min()
    }

    /// The counts of the windows that are over at `elapsed`, which are dropped.
    pub fn over(&self, elapsed: i64) -> Vec<Counted> {
        self.take_over(
            &mut self.windows.lock().unwrap_or_else(|e| e.into_inner()),
            elapsed,
        )
    }

    /// Whether the scheduler must be woken for a window that began counting (once).
    pub fn take_wake(&self) -> bool {
        self.wake.swap(false, Ordering::AcqRel)
    }

    /// `counted`, taken from its window: one window fewer holding counts.
    fn took(&self, counted: Option<Counted>) -> Option<Counted> {
        if counted.is_some() {
            self.counting.fetch_sub(1, Ordering::AcqRel);
        }
        counted
    }

    fn take_over(&self, windows: &mut HashMap<WindowKey, Window>, elapsed: i64) -> Vec<Counted> {
        let mut counts = Vec::new();
        windows.retain(|_, w| {
            let open = elapsed.saturating_sub(w.opened) < WINDOW_MS;
            if !open {
                counts.extend(self.took(w.counted.take()));
            }
            open
        });
        counts
    }

    /// Every count not yet recorded (the daemon stops).
    pub fn all(&self) -> Vec<Counted> {
        self.over(i64::MAX)
    }

    /// Every count not yet recorded, the windows still open staying open (history is
    /// about to be read, and must show every refusal made before).
    pub fn counts(&self, elapsed: i64) -> Vec<Counted> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let mut counts = self.take_over(&mut windows, elapsed);
        counts.extend(
            windows
                .values_mut()
                .filter_map(|w| self.took(w.counted.take())),
        );
        counts
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn caller(uid: u32) -> Caller {
        Caller {
            uid,
            gid: uid,
            pid: 7,
            account: format!("u{uid}"),
            groups: Vec::new(),
            client: "probe".into(),
        }
    }

    /// The first refusal of a window is recorded, the others counted; the count comes
    /// out once the window is over (or with the next refusal after it), and other
    /// accounts, keys and actions have windows of their own.
    #[test]
    fn a_window_records_its_first_refusal_and_counts_the_rest() {
        let r = Refusals::default();
        let deny = ErrorKind::PermissionDenied;
        let refuse = |uid, tag, action, elapsed| {
            r.refused(&caller(uid), tag, action, deny, 1_000 + elapsed, elapsed)
        };
        assert_eq!(refuse(1, "t", Action::Encrypt, 0).unwrap().len(), 0);
        for ms in 1..=9 {
            assert!(refuse(1, "t", Action::Encrypt, ms * 100).is_none());
        }
        assert!(refuse(2, "t", Action::Encrypt, 500).is_some());
        assert!(refuse(1, "u", Action::Encrypt, 500).is_some());
        assert!(refuse(1, "t", Action::Decrypt, 500).is_some());
        assert!(r.over(999).is_empty());
        let over = r.over(1_000);
        assert_eq!(over.len(), 1);
        assert_eq!(
            (over[0].n, over[0].at, over[0].tag.as_str()),
            (9, 1_900, "t")
        );
        // Without a pass of the scheduler, the next refusal after the window carries it.
        assert!(refuse(1, "t", Action::Encrypt, 2_000).unwrap().is_empty());
        assert!(refuse(1, "t", Action::Encrypt, 2_001).is_none());
        let carried = refuse(1, "t", Action::Encrypt, 3_000).unwrap();
        assert_eq!(carried.len(), 1);
        assert_eq!(carried[0].n, 1);
        assert!(refuse(1, "t", Action::Encrypt, 3_001).is_none());
        // History about to be read: counted so far, the window staying open.
        assert_eq!(r.counts(3_002).iter().map(|c| c.n).sum::<u32>(), 1);
        assert!(refuse(1, "t", Action::Encrypt, 3_003).is_none());
        assert_eq!(r.all().iter().map(|c| c.n).sum::<u32>(), 1);
        assert!(r.all().is_empty());
        assert_eq!(r.next_over(3_004), None);
    }

    /// The scheduler is woken when a window begins counting while no other is, and not
    /// for every refusal of a flood: it wakes for the first window's end anyway, and
    /// finds the others then.
    #[test]
    fn a_flood_of_refusals_wakes_the_scheduler_once_a_window() {
        let r = Refusals::default();
        let deny = ErrorKind::PermissionDenied;
        let refuse = |tag: &str, elapsed| {
            r.refused(&caller(1), tag, Action::Encrypt, deny, elapsed, elapsed)
        };
        assert!(refuse("a", 0).is_some());
        assert!(!r.take_wake(), "a refusal recorded at once needs no wake");
        assert!(refuse("a", 1).is_none());
        assert!(
            r.take_wake(),
            "the first count of a window, none other counting"
        );
        for ms in 2..100 {
            assert!(refuse("a", ms).is_none());
        }
        assert!(refuse("b", 100).is_some());
        assert!(refuse("b", 101).is_none());
        assert!(!r.take_wake(), "woken once, for the first window");
        assert_eq!(r.next_over(500), Some(500));
        assert_eq!(r.over(1_000).len(), 1);
        assert_eq!(r.next_over(1_000), Some(100));
        assert_eq!(r.over(1_100).len(), 1);
        assert_eq!(r.next_over(1_100), None);
        assert!(refuse("c", 1_200).is_some());
        assert!(refuse("c", 1_201).is_none());
        assert!(r.take_wake(), "counting again after none was");
    }
}
