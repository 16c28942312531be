//! Pure date rules: what is due, and how the rotation schedule moves. No I/O, no clock:
//! every function takes the time as an argument.

use crate::store::records::{DueKind, KeyRecord};
use kms_shared::model::{KeyState, UnixMillis};
use std::collections::BTreeSet;

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
            if let Some(at) = rec.deleted_at {
                out.push((at.saturating_add(retention_ms), DueKind::Expiry));
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

/// The new rotation anchor after an automatic rotation that was due at `due` and runs at
/// `now`. On time, the schedule keeps its rhythm (anchor = due). After a gap longer than
/// a period (the daemon was down), the key is rotated once and the period restarts from
/// now, instead of rotating once per missed period.
pub fn anchor_after_rotation(due: UnixMillis, now: UnixMillis, period_ms: i64) -> UnixMillis {
    if due.saturating_add(period_ms) > now {
        due
    } else {
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kms_shared::model::DAY_MS;

    /// On time, the next rotation is one period after the previous due date.
    #[test]
    fn on_time_keeps_rhythm() {
        let due = 100 * DAY_MS;
        assert_eq!(anchor_after_rotation(due, due + 5_000, 90 * DAY_MS), due);
    }

    /// After a gap of several periods there is one rotation and the period restarts.
    #[test]
    fn long_gap_restarts_period() {
        let due = 100 * DAY_MS;
        let now = due + 400 * DAY_MS;
        assert_eq!(anchor_after_rotation(due, now, 90 * DAY_MS), now);
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
