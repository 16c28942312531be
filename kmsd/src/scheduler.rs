//! The scheduler task: sleeps until the earliest due date in the engine's due index and
//! is woken early when a due date changes (the shape of mini-redis's purge task). It
//! never scans the keys: finding what is due is a range read of an ordered index.

use crate::engine::Engine;
use crate::shutdown::Shutdown;
use std::sync::Arc;
use std::time::Duration;

/// Longest sleep: a wall-clock jump (suspend, NTP step) is noticed within this time.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Shortest sleep when something stays due (a failing task is retried, not spun on).
const RETRY: Duration = Duration::from_secs(1);

/// How often history older than the retention period is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How often the number of history entries is compared with its cap (a read of one
/// number; entries are removed only when over it).
const CAP_EVERY: Duration = Duration::from_secs(60);

pub async fn run(engine: Arc<Engine>, shutdown: Shutdown) {
    run_telling(engine, shutdown, || {}).await;
}

/// [`run`], calling `asleep` each time it goes to sleep (tests wait for it).
async fn run_telling(engine: Arc<Engine>, mut shutdown: Shutdown, asleep: impl Fn()) {
    let wake = engine.due_changed();
    let mut last_prune: Option<tokio::time::Instant> = None;
    let mut last_cap: Option<tokio::time::Instant> = None;
    let mut first_pass = true;
    loop {
        // Due tasks first: the first pass is the start-up's catch-up on overdue rotations
        // (`Engine::run_due_deletions`), which should not wait for a prune.
        let (e, stopping) = (engine.clone(), shutdown.clone());
        let pass = move || e.run_due_until(&|| stopping.is_requested());
        match tokio::task::spawn_blocking(pass).await {
            Ok(n) if n > 0 && first_pass => {
                tracing::info!(tasks = n, "caught up on overdue rotations and other tasks")
            }
            Ok(n) if n > 0 => tracing::debug!(done = n, "scheduled tasks carried out"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "scheduler task failed"),
        }
        first_pass = false;
        if shutdown.is_requested() {
            return;
        }
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            let e = engine.clone();
            match tokio::task::spawn_blocking(move || e.prune_history()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "history pruning failed"),
                Err(e) => tracing::error!(error = %e, "history pruning task failed"),
            }
            last_prune = Some(tokio::time::Instant::now());
        }
        if last_cap.is_none_or(|t| t.elapsed() >= CAP_EVERY) {
            let (e, stopping) = (engine.clone(), shutdown.clone());
            match tokio::task::spawn_blocking(move || e.cap_history(&|| stopping.is_requested()))
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "capping the history failed"),
                Err(e) => tracing::error!(error = %e, "history capping task failed"),
            }
            last_cap = Some(tokio::time::Instant::now());
        }
        let sleep = match engine.next_wake() {
            Some(at) => {
                let ms = at.saturating_sub(engine.now());
                if ms <= 0 {
                    RETRY
                } else {
                    Duration::from_millis(ms.unsigned_abs()).min(MAX_SLEEP)
                }
            }
            None => MAX_SLEEP,
        };
        asleep();
        // A stop first: each rotation of a pass leaves a wake-up behind, which would
        // otherwise win half the time and start another pass.
        tokio::select! {
            biased;
            _ = shutdown.recv() => return,
            _ = tokio::time::sleep(sleep) => {}
            _ = wake.notified() => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use kms_shared::model::{DAY_MS, KeyType};
    use kms_shared::protocol::CreateKey;

    /// A scheduler running on `engine`, once it has made its first pass and gone to sleep.
    async fn asleep(
        engine: &Arc<Engine>,
    ) -> (
        crate::shutdown::ShutdownTrigger,
        tokio::task::JoinHandle<()>,
    ) {
        let trigger = crate::shutdown::ShutdownTrigger::new();
        let sleeps = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = sleeps.clone();
        let asleep = move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        };
        let task = tokio::spawn(run_telling(engine.clone(), trigger.handle(), asleep));
        let started = std::time::Instant::now();
        while sleeps.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(started.elapsed() < Duration::from_secs(20), "never slept");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (trigger, task)
    }

    /// Refusals counted together are recorded once their one-second window is over, by
    /// a scheduler woken for it — not at its next pass up to a minute later, which a
    /// crash meanwhile made lose them (29 of 30 refusals, killed 5 s after them). The
    /// clock is the engine's injected one; only the scheduler's wait is real.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refusals_counted_together_are_recorded_when_their_window_ends() {
        use crate::engine::Caller;
        use kms_shared::model::Action;
        use kms_shared::protocol::{ErrorKind, HistoryQuery};
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let (_dir, engine, root) = crate::test_support::engine_on(clock.clone());
        let spec = CreateKey::new("guarded", KeyType::Aes256);
        tokio::task::block_in_place(|| engine.create_key(&root, &spec).unwrap());
        let (trigger, task) = asleep(&engine).await;
        let stranger = Caller {
            uid: 4242,
            ..root.clone()
        };
        for _ in 0..30 {
            drop(engine.record_refusal(
                &stranger,
                "guarded",
                Action::Encrypt,
                ErrorKind::PermissionDenied,
            ));
        }
        assert!(
            engine.refusals_pending(),
            "29 refusals counted, not recorded"
        );
        clock.advance(1_000);
        let started = std::time::Instant::now();
        while engine.refusals_pending() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the counted refusals were not recorded when their window ended"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let query = HistoryQuery {
            key: "guarded".into(),
            ..HistoryQuery::default()
        };
        let history = tokio::task::block_in_place(|| engine.history(&query).unwrap());
        let refused: u32 = history
            .iter()
            .filter(|e| e.uid == 4242)
            .map(|e| e.items.max(1))
            .sum();
        assert_eq!(refused, 30);
        trigger.shutdown().await;
        task.await.unwrap();
    }

    /// A change that makes a rotation due now wakes the scheduler from its sleep (up to
    /// [`MAX_SLEEP`] when nothing is due soon): a period shortened so that the next date
    /// has passed rotates the key at once, not up to a minute later. The clock is the
    /// engine's injected one; only the wait for the scheduler to act is real, bounded far
    /// below the minute a scheduler that was not woken would take.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_due_date_moved_into_the_past_wakes_the_scheduler() {
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let (_dir, engine, root) = crate::test_support::engine_on(clock.clone());
        let spec = CreateKey {
            auto_rotation: true,
            rotation_days: Some(90),
            ..CreateKey::new("wakes", KeyType::Aes256)
        };
        tokio::task::block_in_place(|| engine.create_key(&root, &spec).unwrap());
        // The first pass finds nothing due and the scheduler sleeps (up to a minute).
        let (trigger, task) = asleep(&engine).await;
        clock.advance(10 * DAY_MS);
        tokio::task::block_in_place(|| engine.set_rotation(&root, "wakes", true, Some(5)).unwrap());
        let started = std::time::Instant::now();
        while engine.get_key("wakes").unwrap().current_version == 1 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the scheduler was not woken"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(engine.get_key("wakes").unwrap().current_version, 2);
        trigger.shutdown().await;
        task.await.unwrap();
    }
}
