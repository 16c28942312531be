//! Byte budgets of the memory kmsd holds for its clients: requests read and not yet
//! answered, replies and events not yet written. Each connection has one
//! (`max_buffered_bytes`), and so has each account, shared by all its connections
//! (`max_buffered_bytes_per_account`): without the second, an account's connections that
//! never read their replies held the first budget each, up to 256 × 8 MiB (RELIABILITY.md
//! item 53).
//!
//! Tasks only count, never wait, so nothing can deadlock on a budget; only a connection's
//! reader waits — before it reads a frame while its connection is at its limit, or its
//! account is and the connection holds something; and before it reads a large frame's
//! body (or serves a call whose reply will be large) until the account has room — so a
//! client over budget finds its writes blocking in the kernel, not its requests piling up
//! in kmsd.
//!
//! A connection's first [`OWN`] bytes are its own: its account's budget counts what each
//! connection holds beyond them. A small call's request and reply thus never touch the
//! count all the account's connections share — a cache line the cores would pass back
//! and forth on every call (on this project's 2-core machine no cost of it could be told
//! from the noise, docs/PERFORMANCE.md; more cores pay more) — and the account's
//! connection cap (for root and kmsd's own account, which have none, `max_connections`)
//! bounds what is held outside its budget.
//!
//! A connection that holds nothing may always make a small call ([`SMALL_CALL`]): a
//! program of the account that hoards its budget must not keep the account's other
//! programs from saying hello, asking `status` or encrypting a record. Each connection
//! holds at most one such call's request and reply beyond the account's budget (its next
//! frame waits while it holds them), so the account's connection cap bounds them.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use tokio::sync::Notify;

/// The most bytes a request and its reply may each take to be a small call, which a
/// connection holding nothing makes whatever its account holds.
pub const SMALL_CALL: usize = 64 << 10;

/// What each connection holds outside its account's budget: a small call's request and
/// its reply.
pub const OWN: usize = 2 * SMALL_CALL;

/// The part of a connection's `held` bytes its account counts.
fn beyond_own(held: usize) -> usize {
    held.saturating_sub(OWN)
}

/// A count of bytes against a limit. Going over is possible (a frame whose reply turns out
/// larger, the events of a subscriber): the limit stops the readers, not the counting.
///
/// Signed: a connection's share of its account's count is added and taken away by
/// whichever of its tasks moves the connection's own count across [`OWN`], so one task's
/// subtraction may land before another's addition. The account's count can then be
/// below zero for a moment — read as not full, never as a wrapped huge number a reader
/// would wait on with no subtraction left to wake it.
pub struct Budget {
    bytes: AtomicI64,
    limit: i64,
    /// Woken (every waiter: an account's budget has one per connection) when the count
    /// falls below the limit, or to nothing.
    drained: Notify,
}

fn signed(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget {
            bytes: AtomicI64::new(0),
            limit: signed(limit),
            drained: Notify::new(),
        }
    }

    /// The bytes counted now.
    pub fn held(&self) -> usize {
        usize::try_from(self.bytes.load(Ordering::Acquire)).unwrap_or(0)
    }

    fn full(&self) -> bool {
        self.bytes.load(Ordering::Acquire) >= self.limit
    }

    /// Counts `n` more bytes; returns the count before (0 if it was below).
    fn add(&self, n: usize) -> usize {
        let before = self.bytes.fetch_add(signed(n), Ordering::AcqRel);
        usize::try_from(before).unwrap_or(0)
    }

    /// Counts `n` bytes fewer; returns the count before (0 if it was below).
    fn sub(&self, n: usize) -> usize {
        let n = signed(n);
        let before = self.bytes.fetch_sub(n, Ordering::AcqRel);
        let after = before.saturating_sub(n);
        // Empty matters too: a connection holding nothing may read whatever its account
        // holds (its hello's reply, just written, must not leave it waiting on others).
        if (before >= self.limit && after < self.limit) || after == 0 {
            self.drained.notify_waiters();
        }
        usize::try_from(before).unwrap_or(0)
    }

    /// Counts `n` more bytes if the budget is below its limit now (so that readers
    /// reserving at once go over by one frame at most, not one frame each).
    fn try_add(&self, n: usize) -> bool {
        let n = signed(n);
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b < self.limit).then(|| b.saturating_add(n))
            })
            .is_ok()
    }
}

/// What one connection holds: counted in its own budget and in its account's.
pub struct Buffered {
    connection: Budget,
    account: Arc<Budget>,
}

impl Buffered {
    pub fn new(limit: usize, account: Arc<Budget>) -> Arc<Buffered> {
        Arc::new(Buffered {
            connection: Budget::new(limit),
            account,
        })
    }

    /// `n` bytes counted until the returned guard is dropped.
    pub fn hold(self: &Arc<Self>, n: usize) -> Held {
        self.count(n);
        Held(self.clone(), n)
    }

    fn count(&self, n: usize) {
        let before = self.connection.add(n);
        let share = beyond_own(before + n) - beyond_own(before);
        if share > 0 {
            self.account.add(share);
        }
    }

    fn uncount(&self, n: usize) {
        let before = self.connection.sub(n);
        let share = beyond_own(before) - beyond_own(before.saturating_sub(n));
        if share > 0 {
            self.account.sub(share);
        }
    }

    /// Returns once the connection may read a frame: it holds less than its limit, and
    /// either nothing at all or its account less than the account's limit.
    pub async fn ready_to_read(&self) {
        // The usual case costs two loads: registering with the account's `Notify` takes
        // a lock every connection of the account shares, paid only when about to wait.
        while !self.may_read() {
            // Registered before the check, so that a drain between the two is not missed
            // (`notify_waiters` keeps no permit for a waiter that comes later).
            let connection = self.connection.drained.notified();
            let account = self.account.drained.notified();
            tokio::pin!(connection, account);
            connection.as_mut().enable();
            account.as_mut().enable();
            if self.may_read() {
                return;
            }
            tokio::select! {
                () = connection => {}
                () = account => {}
            }
        }
    }

    fn may_read(&self) -> bool {
        !self.connection.full() && (self.is_empty() || !self.account.full())
    }

    /// Whether the connection holds nothing now.
    pub fn is_empty(&self) -> bool {
        self.connection.held() == 0
    }

    /// Waits until the account has room, then counts `n` bytes (a frame about to be read)
    /// until the returned guard is dropped. The account's room is taken atomically, so
    /// that its connections reading at once cannot each go over by a frame.
    pub async fn reserve(self: &Arc<Self>, n: usize) -> Held {
        loop {
            if self.try_reserve(n) {
                return Held(self.clone(), n);
            }
            let account = self.account.drained.notified();
            tokio::pin!(account);
            account.as_mut().enable();
            if self.try_reserve(n) {
                return Held(self.clone(), n);
            }
            account.await;
        }
    }

    /// Counts `n` bytes if the account is below its limit, taking its share of them from
    /// the account in one step with that check.
    fn try_reserve(&self, n: usize) -> bool {
        let now = self.connection.held();
        let share = beyond_own(now + n) - beyond_own(now);
        // Within the connection's own bytes the account has no say: a frame that fits
        // there goes ahead (and wakes for nothing the account does).
        if share > 0 && !self.account.try_add(share) {
            return false;
        }
        // The connection's count may have moved meanwhile (a reply queued or written):
        // the account's share follows what it was when counted.
        let before = self.connection.add(n);
        let actual = beyond_own(before + n) - beyond_own(before);
        if actual > share {
            self.account.add(actual - share);
        } else if share > actual {
            self.account.sub(share - actual);
        }
        true
    }
}

impl Buffered {
    /// The bytes the connection holds now.
    pub fn held(&self) -> usize {
        self.connection.held()
    }

    /// A connection with no limits, for tests of what counts.
    #[cfg(test)]
    pub fn unlimited() -> Arc<Buffered> {
        Buffered::new(usize::MAX, Arc::new(Budget::new(usize::MAX)))
    }
}

/// Bytes counted in a [`Buffered`] while this lives.
pub struct Held(Arc<Buffered>, usize);

impl Held {
    /// Counts `n` bytes in all, if that is more than now, without waiting: a request whose
    /// reply will be larger than the request counts as its reply from the start.
    pub fn grow_to(&mut self, n: usize) {
        if n > self.1 {
            self.0.count(n - self.1);
            self.1 = n;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.uncount(self.1);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn waits<F: std::future::Future>(f: F) -> std::pin::Pin<Box<F>> {
        Box::pin(f)
    }

    /// Whether `f` is still waiting after a short while (it is polled, not consumed).
    async fn still_waiting<F: std::future::Future + Unpin>(f: &mut F) -> bool {
        tokio::time::timeout(Duration::from_millis(50), f)
            .await
            .is_err()
    }

    /// `f`'s output, which must come within seconds: `why` it should.
    async fn finishes<F: std::future::Future>(f: F, why: &str) -> F::Output {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect(why)
    }

    /// The reader waits while the connection holds its limit or more, and goes on once
    /// enough is written or answered; counting never waits.
    #[tokio::test]
    async fn the_reader_waits_while_the_connection_is_over_its_budget() {
        let short = std::time::Duration::from_millis(50);
        let b = Buffered::new(100, Arc::new(Budget::new(usize::MAX)));
        let request = b.hold(60);
        tokio::time::timeout(short, b.ready_to_read())
            .await
            .unwrap();
        let reply = b.hold(60);
        assert!(
            tokio::time::timeout(short, b.ready_to_read())
                .await
                .is_err(),
            "120 of 100"
        );
        let reader = tokio::spawn({
            let b = b.clone();
            async move { b.ready_to_read().await }
        });
        drop(request);
        tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .unwrap()
            .unwrap();
        drop(reply);
        assert_eq!(b.held(), 0);
    }

    #[tokio::test]
    async fn a_connection_holding_something_waits_while_its_account_is_over_budget() {
        let account = Arc::new(Budget::new(100));
        let full = Buffered::new(usize::MAX, account.clone());
        let idle = Buffered::new(1000, account.clone());
        let busy = Buffered::new(1000, account.clone());
        let held = full.hold(OWN + 100);
        assert_eq!(account.held(), 100);
        // A connection holding nothing may read (a small call) whatever its account holds.
        finishes(idle.ready_to_read(), "a connection holding nothing waited").await;
        // One holding something waits: its account is at its limit.
        let one = busy.hold(1);
        let mut wait = waits(busy.ready_to_read());
        assert!(still_waiting(&mut wait).await);
        drop(held);
        finishes(wait, "woken once the account drained").await;
        drop(one);
        assert_eq!(account.held(), 0);
    }

    #[tokio::test]
    async fn a_connection_whose_last_bytes_are_written_reads_over_a_full_account() {
        let account = Arc::new(Budget::new(100));
        let hog = Buffered::new(usize::MAX, account.clone());
        let _held = hog.hold(OWN + 100);
        let b = Buffered::new(1000, account.clone());
        let reply = b.hold(10);
        let reader = tokio::spawn({
            let b = b.clone();
            async move { b.ready_to_read().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !reader.is_finished(),
            "it holds a reply, its account is full"
        );
        drop(reply);
        finishes(reader, "woken once it holds nothing")
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn every_waiting_connection_of_an_account_is_woken() {
        let account = Arc::new(Budget::new(10));
        let hog = Buffered::new(usize::MAX, account.clone());
        let held = hog.hold(OWN + 10);
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let b = Buffered::new(1000, account.clone());
                let one = b.hold(1);
                tokio::spawn(async move {
                    b.ready_to_read().await;
                    drop(one);
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        drop(held);
        for w in waiters {
            finishes(w, "every waiter woken").await.unwrap();
        }
    }

    #[tokio::test]
    async fn readers_reserving_at_once_go_over_by_one_frame_at_most() {
        let account = Arc::new(Budget::new(100));
        let a = Buffered::new(usize::MAX, account.clone());
        let b = Buffered::new(usize::MAX, account.clone());
        let c = Buffered::new(usize::MAX, account.clone());
        // Each counts 80 in the account, beyond its connection's own bytes.
        let first = a.reserve(OWN + 80).await;
        let second = b.reserve(OWN + 80).await; // 80 < 100: taken, now 160
        assert_eq!(account.held(), 160);
        let mut third = waits(c.reserve(OWN + 80));
        assert!(
            still_waiting(&mut third).await,
            "a reservation went ahead over the limit"
        );
        drop(first);
        let third = finishes(third, "reserved once below the limit").await;
        assert_eq!(account.held(), 160);
        drop((second, third));
        assert_eq!(account.held(), 0);
    }

    /// A connection's tasks move its share of the account's count in any order: a
    /// subtraction that lands first takes the count below zero for a moment, which reads
    /// as room, not as a wrapped count no later subtraction would wake a reader from.
    #[test]
    fn an_account_count_taken_below_zero_for_a_moment_reads_as_room() {
        let account = Budget::new(100);
        account.sub(50);
        assert!(!account.full());
        assert_eq!(account.held(), 0);
        assert!(account.try_add(10));
        account.add(40);
        assert_eq!(account.held(), 0);
        account.add(100);
        assert!(account.full());
    }

    /// A frame that fits in its connection's own bytes is reserved whatever the account
    /// holds: the account neither counts it nor would wake its reader.
    #[tokio::test]
    async fn a_frame_within_the_connections_own_bytes_does_not_wait_for_its_account() {
        let account = Arc::new(Budget::new(100));
        let hog = Buffered::new(usize::MAX, account.clone());
        let _held = hog.hold(OWN + 100);
        let b = Buffered::new(usize::MAX, account.clone());
        let _reply = b.hold(10);
        let frame = finishes(b.reserve(OWN - 10), "waited for the account").await;
        assert_eq!(account.held(), 100);
        let mut over = waits(b.reserve(1));
        assert!(
            still_waiting(&mut over).await,
            "a byte beyond its own went ahead of a full account"
        );
        drop(frame);
    }

    /// A connection's first `OWN` bytes are its own: its account counts only what it
    /// holds beyond them, whichever of its guards holds what.
    #[test]
    fn an_account_counts_what_its_connections_hold_beyond_their_own() {
        let account = Arc::new(Budget::new(usize::MAX));
        let b = Buffered::new(usize::MAX, account.clone());
        let small = b.hold(OWN - 10);
        assert_eq!(account.held(), 0);
        let more = b.hold(30);
        assert_eq!(account.held(), 20);
        drop(small);
        assert_eq!((b.held(), account.held()), (30, 0));
        let big = b.hold(OWN);
        assert_eq!(account.held(), 30);
        drop(more);
        drop(big);
        assert_eq!((b.held(), account.held()), (0, 0));
    }

    #[tokio::test]
    async fn a_held_count_grows_in_both_budgets_and_is_given_back_whole() {
        let account = Arc::new(Budget::new(100));
        let b = Buffered::new(OWN + 50, account.clone());
        let mut held = b.hold(10);
        held.grow_to(5); // smaller: no change
        assert_eq!((b.connection.held(), account.held()), (10, 0));
        held.grow_to(OWN + 60);
        assert_eq!((b.connection.held(), account.held()), (OWN + 60, 60));
        let mut wait = waits(b.ready_to_read());
        assert!(
            still_waiting(&mut wait).await,
            "the connection is over its own limit"
        );
        drop(held);
        finishes(wait, "woken once the connection drained").await;
        assert_eq!((b.connection.held(), account.held()), (0, 0));
    }
}
