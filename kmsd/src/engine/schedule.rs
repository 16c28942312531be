//! Pure date rules: what is due, and how the rotation schedule moves. No I/O, no clock:
//! every function takes the time as an argument.

use crate::store::records::{DueKind, KeyRecord};
use kms_shared::model::{KeyState, UnixMillis};
use std::collections::{BTreeSet, HashMap};

/// One entry of the due index: at `at`, do `kind` to key `tag`.
pub type DueEntry = (UnixMillis, String, DueKind);

/// The due-index entries a key record implies. The index is always derived from the
/// records, so it cannot drift from them.
pub fn due_entries(rec: &KeyRecord, retention_ms: i64) -> Vec<(UnixMillis, DueKind)> {
    let mut out = Vec::with_capacity(2);
    if let Some(at) = rec.next_rotation_at() {
        out.push((at, DueKind::Rotation));
    }
    match rec.state {
        KeyState::PendingDeletion => {
            if let Some(at) = rec.deletion_due_at {
                out.push((at, DueKind::Deletion));
            }
        }
        KeyState::Deleted => {
            // Metadata outlives the token objects: a key forgotten with objects left
            // would leave them in the token for good.
            if let Some(at) = rec.deleted_at {
                out.push(match rec.token_objects_left {
                    true => (at, DueKind::DestroyObjects),
                    false => (at.saturating_add(retention_ms), DueKind::Expiry),
                });
            }
        }
        KeyState::Enabled | KeyState::Disabled => {}
    }
    out
}

/// Everything due at `now` (inclusive), oldest first.
pub fn due_at(index: &BTreeSet<DueEntry>, now: UnixMillis) -> Vec<DueEntry> {
    index
        .iter()
        .take_while(|(at, _, _)| *at <= now)
        .cloned()
        .collect()
}

/// The earliest due time, if any.
pub fn next_due(index: &BTreeSet<DueEntry>) -> Option<UnixMillis> {
    index.first().map(|(at, _, _)| *at)
}

/// The first retry of a failed scheduled task, doubled after each further failure.
const FIRST_RETRY_MS: i64 = 1_000;
/// The longest wait between retries: a task that keeps failing (a token that is gone, a
/// full disk) is tried, and its refusal recorded in history, at most this often.
const LAST_RETRY_MS: i64 = 3_600_000;

/// Due entries whose task failed, and when each may be tried again (exponential backoff).
/// Kept in memory: after a restart every due task is tried at once. Retry times are on the
/// clock a step of the wall clock does not move ([`crate::clock::Clock::elapsed_ms`]): by
/// the wall clock, a clock set back by a week stalled a failed task for that week.
#[derive(Debug, Default)]
pub struct Retries(HashMap<(String, DueKind), (u32, i64)>);

impl Retries {
    /// Whether the task of `tag`/`kind` may run at `elapsed`.
    pub fn ready(&self, tag: &str, kind: DueKind, elapsed: i64) -> bool {
        self.0
            .get(&(tag.to_owned(), kind))
            .is_none_or(|(_, at)| *at <= elapsed)
    }

    /// Records a failure at `elapsed`: the next try waits 1 s, 2 s, 4 s, … up to an hour.
    pub fn failed(&mut self, tag: &str, kind: DueKind, elapsed: i64) {
        let failures = self.0.get(&(tag.to_owned(), kind)).map_or(0, |(n, _)| *n);
        let wait = FIRST_RETRY_MS
            .saturating_mul(1i64 << failures.min(32))
            .min(LAST_RETRY_MS);
        self.0.insert(
            (tag.to_owned(), kind),
            (failures.saturating_add(1), elapsed.saturating_add(wait)),
        );
    }

    /// Holds a task back until `elapsed` reads `until`, without counting a failure.
    pub fn wait(&mut self, tag: &str, kind: DueKind, until: i64) {
        let failures = self.0.get(&(tag.to_owned(), kind)).map_or(0, |(n, _)| *n);
        self.0.insert((tag.to_owned(), kind), (failures, until));
    }

    /// Forgets the failures of a task that succeeded (or is no longer due).
    pub fn forget(&mut self, tag: &str, kind: DueKind) {
        self.0.remove(&(tag.to_owned(), kind));
    }

    /// The earliest wall-clock time something in `index` may run, at wall time `now` and
    /// `elapsed`: its due date, or, if it failed, its retry time as the wall clock will
    /// read it. Looks at the failed entries and the first one that did not.
    pub fn next(
        &self,
        index: &BTreeSet<DueEntry>,
        now: UnixMillis,
        elapsed: i64,
    ) -> Option<UnixMillis> {
        let mut next: Option<UnixMillis> = None;
        for (at, tag, kind) in index {
            match self.0.get(&(tag.clone(), *kind)) {
                Some((_, retry)) => {
                    let t = (*at).max(now.saturating_add(retry.saturating_sub(elapsed)));
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
                None => return Some(next.map_or(*at, |n| n.min(*at))),
            }
        }
        next
    }
}

/// How late an automatic rotation may run and keep the schedule's rhythm: the scheduler's
/// own lateness (its longest sleep is a minute, a pass over many keys takes a while).
pub const RHYTHM_SLACK_MS: i64 = 5 * 60 * 1000;

/// The new rotation anchor after an automatic rotation that was due at `due` and runs at
/// `now`. On time (within [`RHYTHM_SLACK_MS`]), the schedule keeps its rhythm (anchor =
/// due), so that it does not drift by the scheduler's lateness. Later (the daemon was
/// down, the machine suspended, the rotation failed for a while), the key is rotated
/// once and the period restarts from now (SPEC §4: next = the last automatic rotation +
/// the period): not once per missed period, and not again soon after a late one — a
/// daily key caught up 23 hours late rotated again an hour later.
pub fn anchor_after_rotation(due: UnixMillis, now: UnixMillis, period_ms: i64) -> UnixMillis {
    let late = now.saturating_sub(due);
    if late <= RHYTHM_SLACK_MS && late < period_ms {
        due
    } else {
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kms_shared::model::{DAY_MS, HOUR_MS};

    /// On time, the next rotation is one period after the previous due date.
    #[test]
    fn on_time_keeps_rhythm() {
        let due = 100 * DAY_MS;
        assert_eq!(anchor_after_rotation(due, due + 5_000, 90 * DAY_MS), due);
    }

    /// Late by more than the slack but less than a period (a daily key caught up 23 hours
    /// late): the period restarts from the rotation, which used to keep the rhythm and
    /// rotate again an hour later.
    #[test]
    fn a_late_rotation_restarts_the_period() {
        let due = 100 * DAY_MS;
        assert_eq!(
            anchor_after_rotation(due, due + RHYTHM_SLACK_MS, DAY_MS),
            due
        );
        let late = due + 23 * HOUR_MS;
        assert_eq!(anchor_after_rotation(due, late, DAY_MS), late);
        assert_eq!(
            anchor_after_rotation(due, due + RHYTHM_SLACK_MS + 1, 90 * DAY_MS),
            due + RHYTHM_SLACK_MS + 1
        );
    }

    /// After a gap of several periods there is one rotation and the period restarts.
    #[test]
    fn long_gap_restarts_period() {
        let due = 100 * DAY_MS;
        let now = due + 400 * DAY_MS;
        assert_eq!(anchor_after_rotation(due, now, 90 * DAY_MS), now);
    }

    /// A failing task waits 1 s, 2 s, 4 s, … (at most an hour) between tries, and the next
    /// wake-up is the earliest of the other due dates and the retry times.
    #[test]
    fn failed_tasks_back_off() {
        let mut idx = BTreeSet::new();
        idx.insert((10, "a".to_string(), DueKind::Deletion));
        idx.insert((5_000, "b".to_string(), DueKind::Rotation));
        let mut r = Retries::default();
        // The wall clock and `elapsed` read the same here, but where said.
        let next = |r: &Retries, t| r.next(&idx, t, t);
        assert_eq!(next(&r, 0), Some(10));
        r.failed("a", DueKind::Deletion, 100);
        assert!(!r.ready("a", DueKind::Deletion, 1_099));
        assert!(r.ready("a", DueKind::Deletion, 1_100));
        assert!(r.ready("a", DueKind::Rotation, 100), "per task");
        assert_eq!(next(&r, 100), Some(1_100));
        r.failed("a", DueKind::Deletion, 1_100);
        assert_eq!(next(&r, 1_100), Some(3_100));
        r.failed("a", DueKind::Deletion, 3_100);
        assert_eq!(next(&r, 3_100), Some(5_000), "b is due before a's retry");
        // Retry times are on `elapsed`: with the wall clock an hour ahead of it, a's
        // retry (4 s away) is an hour later by the wall clock, still after b's due date.
        assert_eq!(r.next(&idx, 3_100 + HOUR_MS, 3_100), Some(5_000));
        let only_a: BTreeSet<_> = idx.iter().filter(|e| e.1 == "a").cloned().collect();
        assert_eq!(
            r.next(&only_a, 3_100 + HOUR_MS, 3_100),
            Some(3_100 + HOUR_MS + 4_000)
        );
        for _ in 0..40 {
            r.failed("a", DueKind::Deletion, 0);
        }
        assert!(r.ready("a", DueKind::Deletion, LAST_RETRY_MS));
        r.forget("a", DueKind::Deletion);
        assert_eq!(next(&r, 0), Some(10));
    }

    /// `due_at` returns exactly the entries at or before `now`, in time order.
    #[test]
    fn due_at_is_inclusive_and_ordered() {
        let mut idx = BTreeSet::new();
        idx.insert((30, "b".to_string(), DueKind::Deletion));
        idx.insert((10, "a".to_string(), DueKind::Rotation));
        idx.insert((31, "c".to_string(), DueKind::Rotation));
        let due = due_at(&idx, 30);
        assert_eq!(due.iter().map(|d| d.0).collect::<Vec<_>>(), vec![10, 30]);
        assert_eq!(next_due(&idx), Some(10));
    }
}
