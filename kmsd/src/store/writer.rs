//! The single writer: one thread owns every write transaction (redb allows one at a time
//! anyway) and commits in groups.
//!
//! A submission is a list of [`Mutation`]s that must land together, plus a reply channel.
//! The thread takes the first waiting submission, drains whatever else is queued (up to
//! [`MAX_GROUP`]), applies them all in one transaction, commits durably, and only then
//! answers every submitter. One fsync covers the whole group, so a busy daemon pays one
//! commit for hundreds of history entries, and "answered" always means "durable".
//!
//! If the commit fails (disk full, I/O error), every submission of the group is answered
//! with the error and nothing of the group is visible; earlier commits are untouched.
//!
//! A group made only of crypto calls (history entries and counters) goes to the call
//! journal instead ([`super::journal`]): one record, one `fdatasync`, then the answers. The
//! journaled calls are kept here as pending [`CallOp`]s and folded into redb — in one
//! transaction that also starts a new journal generation — when enough are pending, when
//! the journal is half full, in front of any other change (in the same transaction, so
//! redb sees every change in acknowledgement order), when a reader asks
//! ([`Writer::settle`]) and when the writer stops.

use super::journal::{self, CallOp, Generation, Journal, JournalError};
use super::records::{
    DueKind, HistoryRecord, HsmTokenRecord, KeyRecord, UsageRecord, VersionRecord, encode_array,
    encode_map,
};
use super::{
    DUE, ENCRYPTIONS, GRANTS, HISTORY, HISTORY_TIME_SLACK_MS, HSM_TOKENS, KEYS, META,
    META_HISTORY_SEQ, META_JOURNAL_GENERATION, META_LAST_GRANT_ID, NAMES, StoreError, USAGE,
    VERSIONS, decode,
};
use kms_shared::model::UnixMillis;
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, WriteTransaction};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Most submissions applied in one transaction.
pub const MAX_GROUP: usize = 4096;

/// Journaled call effects kept pending before a fold is due (~2,000 calls: a fold of
/// that many takes a few milliseconds, paid once per that many calls).
const FOLD_AFTER_OPS: usize = 6_000;

/// How long after a failed fold the next is tried on its own.
const FOLD_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// One change to the store.
pub enum Mutation {
    PutKey(KeyRecord),
    PutName {
        name: String,
        tag: String,
    },
    RemoveName(String),
    PutVersion {
        tag: String,
        version: u32,
        record: VersionRecord,
    },
    AddDue {
        at: UnixMillis,
        tag: String,
        kind: DueKind,
    },
    RemoveDue {
        at: UnixMillis,
        tag: String,
        kind: DueKind,
    },
    /// Appends a history entry; the writer assigns its sequence number.
    History {
        tag: String,
        record: HistoryRecord,
    },
    /// Counts `n` successful crypto calls.
    Use {
        tag: String,
        at: UnixMillis,
        account: String,
        n: u64,
    },
    /// Adds to the encryption count of a version.
    Encryptions {
        tag: String,
        version: u32,
        n: u64,
    },
    PutGrant(kms_shared::model::GrantInfo),
    RemoveGrant(u64),
    /// Removes history entries older than `before` (retention); `now` is the time of the
    /// prune (entries dated after it are out of time order: see `prune_history`).
    PruneHistory {
        before: UnixMillis,
        now: UnixMillis,
    },
    /// One round of the history cap (SPEC §7: disk use stays bounded, whatever the call
    /// rate): if the history holds more than `keep` entries, removes old entries from
    /// `round.from` on, reading at most `scan` of them ([`CAP_SCAN`]); says in `round`
    /// how far it got. See [`cap_history`].
    CapHistory {
        keep: u64,
        calls_only: bool,
        scan: usize,
        round: Arc<Mutex<CapRound>>,
    },
    /// Removes a purged key for good (end of retention): record, versions, counters, history.
    Expunge {
        tag: String,
    },
    /// Registers (or replaces) a dedicated HSM token.
    PutHsmToken(HsmTokenRecord),
    /// Forgets a dedicated HSM token's registration.
    RemoveHsmToken(String),
    /// Changes nothing: folds the journaled calls into redb ([`Writer::settle`]).
    Settle,
    /// Changes nothing, and commits even when nothing is pending, if the store holds
    /// what it expects ([`Writer::confirm`]).
    Confirm(Option<Held>),
}

/// What a confirming commit ([`Writer::confirm`]) checks the store holds before it
/// commits: everything a change wrote that tells it apart from another attempt at it.
#[derive(Clone)]
pub enum Held {
    /// A key's record and the versions the change wrote (a new version's wrapped
    /// material is its own, so a retry's does not pass for an earlier attempt's).
    Key {
        record: KeyRecord,
        versions: Vec<(u32, VersionRecord)>,
    },
    /// A grant as given, or (`None`) no grant with that id.
    Grant {
        id: u64,
        grant: Option<kms_shared::model::GrantInfo>,
    },
}

impl Mutation {
    /// Whether this is an effect of a crypto call, which the journal can hold.
    fn is_call(&self) -> bool {
        matches!(
            self,
            Mutation::History { .. } | Mutation::Use { .. } | Mutation::Encryptions { .. }
        )
    }

    /// The journaled form; a history entry gets its sequence number here.
    fn into_call_op(self, next_seq: &mut u64) -> Option<CallOp> {
        Some(match self {
            Mutation::History { tag, record } => {
                let seq = *next_seq;
                *next_seq += 1;
                CallOp::History { tag, seq, record }
            }
            Mutation::Use {
                tag,
                at,
                account,
                n,
            } => CallOp::Use {
                tag,
                at,
                account,
                n,
            },
            Mutation::Encryptions { tag, version, n } => CallOp::Encryptions { tag, version, n },
            _ => return None,
        })
    }
}

/// Resolves when the submission's transaction has committed (or failed).
pub struct Ticket(oneshot::Receiver<Result<(), Arc<StoreError>>>);

impl Ticket {
    /// Waits on this thread (for callers outside the async runtime).
    pub fn wait(self) -> Result<(), Arc<StoreError>> {
        self.0
            .blocking_recv()
            .unwrap_or_else(|_| Err(Arc::new(StoreError::WriterGone)))
    }

    /// Waits without blocking the runtime.
    pub async fn wait_async(self) -> Result<(), Arc<StoreError>> {
        self.0
            .await
            .unwrap_or_else(|_| Err(Arc::new(StoreError::WriterGone)))
    }
}

struct Submission {
    mutations: Vec<Mutation>,
    done: oneshot::Sender<Result<(), Arc<StoreError>>>,
}

/// The handle to the writer thread. Dropping every clone stops the thread after it has
/// committed what was queued.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Submission>,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// Journaled calls not yet folded into redb (0: redb holds every acknowledged call).
    unfolded: Arc<AtomicU64>,
    /// Submissions not yet answered: [`Writer::settle`] waits for them too, so that a
    /// submission nobody waited for (a refusal's history entry) is seen by a read that
    /// follows it.
    unanswered: Arc<AtomicU64>,
    /// Set if the thread died of a panic.
    exit: Arc<WriterExit>,
    /// Tests: the next N commits report a failure after they have landed (see
    /// `State::commit`).
    #[cfg(test)]
    land_then_fail: Arc<std::sync::atomic::AtomicU32>,
    /// Tests: the thread panics on the next group it takes.
    #[cfg(test)]
    panic_next: Arc<std::sync::atomic::AtomicBool>,
    /// Tests: the next read of the stored journal generation fails.
    #[cfg(test)]
    generation_unreadable: Arc<std::sync::atomic::AtomicBool>,
    /// Tests: commits fail before anything lands while set; counts the ones tried.
    #[cfg(test)]
    commits_fail: Arc<(std::sync::atomic::AtomicBool, AtomicU64)>,
    /// Tests: commits wait, unbegun, while set ([`Writer::hold_commits`]).
    #[cfg(test)]
    commits_held: Arc<std::sync::atomic::AtomicBool>,
}

/// How the writer thread ended. A panic there is a bug (or redb meeting a page it cannot
/// read) and leaves the daemon unable to answer any call durably: every submission
/// resolves to [`StoreError::WriterGone`] from then on. The daemon waits on
/// [`Writer::failed`] and stops, so that the service manager restarts it rather than
/// leaving a process that looks healthy and refuses everything.
#[derive(Default)]
struct WriterExit {
    panicked: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

/// Where the store keeps its journal while no writer runs.
pub(super) type JournalSlot = Arc<Mutex<Option<Journal>>>;

impl Writer {
    /// Starts the writer thread; it takes the journal from `slot` (if there is one) and
    /// puts it back when it stops.
    pub(super) fn start(
        db: Arc<super::handle::DbHandle>,
        slot: JournalSlot,
    ) -> Result<Writer, StoreError> {
        let next_seq = {
            use redb::ReadableDatabase;
            let tx = db.get()?.begin_read()?;
            let meta = tx.open_table(META)?;
            match meta.get(META_HISTORY_SEQ)? {
                Some(v) => super::read_history_seq(v.value())?,
                None => 1,
            }
        };
        let (tx, rx) = mpsc::channel::<Submission>();
        let unfolded = Arc::new(AtomicU64::new(0));
        let unanswered = Arc::new(AtomicU64::new(0));
        let exit = Arc::new(WriterExit::default());
        #[cfg(test)]
        let land_then_fail = Arc::new(std::sync::atomic::AtomicU32::new(0));
        #[cfg(test)]
        let panic_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
        #[cfg(test)]
        let generation_unreadable = Arc::new(std::sync::atomic::AtomicBool::new(false));
        #[cfg(test)]
        let commits_fail = Arc::new((std::sync::atomic::AtomicBool::new(false), AtomicU64::new(0)));
        #[cfg(test)]
        let commits_held = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let journal = {
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            // Records left by a writer whose last commit failed are only in the journal: a
            // writer starting here would not hold them, and its first commit would restart
            // the journal over them. Opening the store again folds them.
            if slot.as_ref().is_some_and(|j| j.used() > 0) {
                return Err(StoreError::Db(
                    "the store's last writer stopped with calls it could not fold; open the \
                     store again to fold them"
                        .into(),
                ));
            }
            slot.take()
        };
        let state = State {
            journal,
            db,
            pending: Vec::new(),
            staged: None,
            journal_failed: false,
            fold_not_before: None,
            next_seq,
            unfolded: unfolded.clone(),
            unanswered: unanswered.clone(),
            uncertain: None,
            #[cfg(test)]
            land_then_fail: land_then_fail.clone(),
            #[cfg(test)]
            panic_next: panic_next.clone(),
            #[cfg(test)]
            generation_unreadable: generation_unreadable.clone(),
            #[cfg(test)]
            commits_fail: commits_fail.clone(),
            #[cfg(test)]
            commits_held: commits_held.clone(),
            last_failure: None,
        };
        let exited = exit.clone();
        let thread = std::thread::Builder::new()
            .name("kmsd-store-writer".into())
            .spawn(move || {
                // Unwinding drops the queue, so every submission waiting in it, and every
                // one made later, resolves to WriterGone: no call is answered as durable
                // that was not. The journal is dropped unreturned; its records stay on disk
                // for the next open to fold.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(state, rx))) {
                    Ok(journal) => *slot.lock().unwrap_or_else(|e| e.into_inner()) = journal,
                    Err(panic) => {
                        let why = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        tracing::error!(panic = %why, "the store writer thread panicked");
                        exited.panicked.store(true, Ordering::Release);
                        exited.notify.notify_one();
                    }
                }
            })
            .map_err(|e| StoreError::Db(format!("cannot start the writer thread: {e}")))?;
        Ok(Writer {
            tx,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
            unfolded,
            unanswered,
            exit,
            #[cfg(test)]
            land_then_fail,
            #[cfg(test)]
            panic_next,
            #[cfg(test)]
            generation_unreadable,
            #[cfg(test)]
            commits_fail,
            #[cfg(test)]
            commits_held,
        })
    }

    /// Tests: while `held`, the writer waits before each commit (a change submitted
    /// meanwhile is left holding its locks, as one waiting on a slow disk is).
    #[cfg(test)]
    pub(crate) fn hold_commits(&self, held: bool) {
        self.commits_held.store(held, Ordering::SeqCst);
    }

    /// Journaled calls not yet folded into redb: each holds at most one history entry.
    pub fn unfolded(&self) -> u64 {
        self.unfolded.load(Ordering::Acquire)
    }

    /// Returns once every call acknowledged so far is in redb, not only in the journal
    /// (for readers of history and counters in redb: queries, backups). Free when nothing
    /// is pending; otherwise one fold. Blocks: call it off the async runtime.
    pub fn settle(&self) -> Result<(), Arc<StoreError>> {
        // Acquire: pairs with the writer's releases: of the count before it answers a
        // journaled call, so that a call answered before this check is seen here, and of
        // `unanswered` after it answers, which it lowers only once the count is stored.
        if self.unanswered.load(Ordering::Acquire) == 0
            && self.unfolded.load(Ordering::Acquire) == 0
        {
            return Ok(());
        }
        self.submit(vec![Mutation::Settle]).wait()
    }

    /// One durable redb commit, even with nothing to write: after a commit answered with
    /// an error that reads back as landed ([`StoreError::may_have_landed`]), a commit
    /// that reports success writes a new header over what redb reads, the landed change
    /// included, as the writer's own confirmation of a landed fold does. Blocks.
    ///
    /// With `held`, the writer first checks, on its own thread, that the store reads as
    /// holding it, so that nothing commits between the check and the confirmation; if
    /// it does not, nothing is committed and the answer is [`StoreError::NotHeld`].
    pub fn confirm(&self, held: Option<Held>) -> Result<(), Arc<StoreError>> {
        self.submit(vec![Mutation::Confirm(held)]).wait()
    }

    /// Whether the writer thread died of a panic (see [`WriterExit`]).
    pub fn has_failed(&self) -> bool {
        self.exit.panicked.load(Ordering::Acquire)
    }

    /// Resolves once the writer thread has died of a panic; never if it runs or stops
    /// normally.
    pub async fn failed(&self) {
        // `notify_one` keeps a permit if no one waits yet, so a panic between the check
        // and the wait is not missed.
        while !self.has_failed() {
            self.exit.notify.notified().await;
        }
    }

    /// Queues mutations that land in one transaction; the ticket resolves when durable.
    pub fn submit(&self, mutations: Vec<Mutation>) -> Ticket {
        let (done, rx) = oneshot::channel();
        self.unanswered.fetch_add(1, Ordering::AcqRel);
        // If the thread is gone the sender is dropped with the submission and the ticket
        // resolves to WriterGone.
        if self.tx.send(Submission { mutations, done }).is_err() {
            self.unanswered.fetch_sub(1, Ordering::AcqRel);
        }
        Ticket(rx)
    }

    /// Stops the thread after the queue is drained and waits for it (the last clone to
    /// call this closes the channel; others only wait for nothing).
    pub fn shutdown(self) {
        let thread = self.thread.clone();
        drop(self);
        let handle = thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle
            && Arc::strong_count(&thread) == 1
        {
            let _ = h.join();
        }
    }
}

/// Commits with an fsync and two-phase commit, without quick repair (see the module docs).
pub(super) fn make_durable(tx: &mut WriteTransaction) -> Result<(), StoreError> {
    tx.set_durability(Durability::Immediate)?;
    tx.set_two_phase_commit(true);
    // Quick repair saves the allocator state in every commit so that a reopen after a
    // crash skips redb's full repair. kmsd verifies every page after a crash anyway (see
    // `clean_stop`), and redb's full repair is that verification, so the saved state
    // would buy nothing and cost every commit: without it, 16 clients encrypting 1 KiB
    // ran 3,994 -> 5,696 calls/s (medians of 3, side by side).
    tx.set_quick_repair(false);
    Ok(())
}

/// The writer thread's state.
struct State {
    db: Arc<super::handle::DbHandle>,
    /// `None` for stores without a file of their own (test backends): every group is then
    /// a redb commit.
    journal: Option<Journal>,
    /// Calls in the journal and not yet in redb, in acknowledgement order.
    pending: Vec<CallOp>,
    /// The next fold's transaction, open, holding the first `.1` pending calls: each
    /// journaled group is applied to it right after its answers, so that a fold is only
    /// a commit and the calls queued behind it wait less. Nothing in it is durable or
    /// visible until it commits; `pending` stays the reference (a failure drops it).
    staged: Option<(WriteTransaction, usize)>,
    /// An append failed: the journal's tail is unknown until the next fold restarts it.
    journal_failed: bool,
    /// After a fold failed (disk full, I/O error), the next one is not tried on its own
    /// before this: each failure reopens and verifies the file. Until then the journal
    /// keeps taking calls while it has room.
    fold_not_before: Option<std::time::Instant>,
    next_seq: u64,
    unfolded: Arc<AtomicU64>,
    unanswered: Arc<AtomicU64>,
    /// A fold that failed in a way that may still have committed (the store could not be
    /// read back afterwards): its generation. Until the stored generation is known, the
    /// journal takes no records and the next commit first settles the question.
    uncertain: Option<Generation>,
    #[cfg(test)]
    land_then_fail: Arc<std::sync::atomic::AtomicU32>,
    #[cfg(test)]
    panic_next: Arc<std::sync::atomic::AtomicBool>,
    #[cfg(test)]
    generation_unreadable: Arc<std::sync::atomic::AtomicBool>,
    #[cfg(test)]
    commits_fail: Arc<(std::sync::atomic::AtomicBool, AtomicU64)>,
    #[cfg(test)]
    commits_held: Arc<std::sync::atomic::AtomicBool>,
    /// Why the last commit failed, while commits are held off after it
    /// (`fold_not_before`).
    last_failure: Option<String>,
}

/// Serves submissions until every sender is gone, then folds what is pending; returns the
/// journal for the store to keep.
fn run(mut st: State, rx: mpsc::Receiver<Submission>) -> Option<Journal> {
    let mut group: Vec<Submission> = Vec::new();
    // For the log at the end: submissions per group is what group commit is for (a group
    // is one write: a journal record or a redb commit).
    let (mut groups, mut submissions, mut folds) = (0u64, 0u64, 0u64);
    // The longest fold on its own: how long calls queued behind it waited.
    let mut fold_max = std::time::Duration::ZERO;
    while let Ok(first) = rx.recv() {
        #[cfg(test)]
        if st.panic_next.swap(false, Ordering::Relaxed) {
            panic!("test: the writer panics");
        }
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(s) => group.push(s),
                Err(_) => break,
            }
        }
        groups += 1;
        submissions += group.len() as u64;
        // Confirmations whose expectation fails are answered now, and leave the group:
        // the rest of it commits without them.
        let refused = st.check_held(&mut group);
        if refused > 0 {
            st.unanswered.fetch_sub(refused, Ordering::Release);
            if group.is_empty() {
                continue;
            }
        }
        let journaled = st.journal.is_some()
            && !st.journal_failed
            && group
                .iter()
                .all(|s| s.mutations.iter().all(Mutation::is_call));
        let result = if journaled {
            st.append(&mut group)
        } else {
            folds += u64::from(!st.pending.is_empty());
            st.commit(Vec::new(), &group)
        };
        // Release: a reader that sees an answer also sees the count (see `settle`).
        st.unfolded
            .store(st.pending.len() as u64, Ordering::Release);
        let answered = group.len() as u64;
        answer(&mut group, result);
        st.unanswered.fetch_sub(answered, Ordering::Release);
        if st.fold_due() {
            folds += 1;
            // A failure is logged; the calls stay pending (and journaled) and the fold is
            // tried again a little later.
            let started = std::time::Instant::now();
            // (`commit` holds folds off for a while after a failure.)
            let _ = st.commit(Vec::new(), &[]);
            fold_max = fold_max.max(started.elapsed());
            st.unfolded
                .store(st.pending.len() as u64, Ordering::Release);
        } else if journaled {
            st.stage();
        }
    }
    // Also after a failure the journal is waiting on (a fold to confirm, a failed
    // append): a commit that succeeds settles it.
    if !st.pending.is_empty() || st.journal_failed {
        folds += 1;
        // On failure the calls stay in the journal; the next open folds them.
        let _ = st.commit(Vec::new(), &[]);
    }
    tracing::info!(
        groups,
        submissions,
        folds,
        fold_ms_max = fold_max.as_secs_f64() * 1000.0,
        "store writer stopped"
    );
    st.journal
}

fn answer(group: &mut Vec<Submission>, result: Result<(), StoreError>) {
    match result {
        Ok(()) => {
            for s in group.drain(..) {
                let _ = s.done.send(Ok(()));
            }
        }
        Err(e) => {
            let e = Arc::new(e);
            for s in group.drain(..) {
                let _ = s.done.send(Err(e.clone()));
            }
        }
    }
}

impl State {
    /// Answers and removes the confirmations ([`Mutation::Confirm`]) of `group` whose
    /// store does not read as holding what they expect; returns how many. Only this
    /// thread commits, so what it reads here is what the group's commit builds on.
    fn check_held(&self, group: &mut Vec<Submission>) -> u64 {
        let expects = |s: &Submission| {
            s.mutations
                .iter()
                .any(|m| matches!(m, Mutation::Confirm(Some(_))))
        };
        if !group.iter().any(expects) {
            return 0;
        }
        let mut refused = 0;
        let mut kept = Vec::with_capacity(group.len());
        for s in group.drain(..) {
            let verdict = s.mutations.iter().try_for_each(|m| match m {
                Mutation::Confirm(Some(held)) => match self.holds(held) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(StoreError::NotHeld),
                    Err(e) => Err(e),
                },
                _ => Ok(()),
            });
            match verdict {
                Ok(()) => kept.push(s),
                Err(e) => {
                    refused += 1;
                    let _ = s.done.send(Err(Arc::new(e)));
                }
            }
        }
        *group = kept;
        refused
    }

    /// Whether the store reads as holding `held`.
    fn holds(&self, held: &Held) -> Result<bool, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.get()?.begin_read()?;
        match held {
            Held::Key { record, versions } => {
                let keys = tx.open_table(KEYS)?;
                let stored: Option<KeyRecord> = keys
                    .get(record.tag.as_str())?
                    .map(|v| decode(v.value()))
                    .transpose()
                    .map_err(super::corrupt("keys"))?;
                if stored.as_ref() != Some(record) {
                    return Ok(false);
                }
                let table = tx.open_table(VERSIONS)?;
                for (version, want) in versions {
                    let stored: Option<VersionRecord> = table
                        .get((record.tag.as_str(), *version))?
                        .map(|v| decode(v.value()))
                        .transpose()
                        .map_err(super::corrupt("versions"))?;
                    if stored.as_ref() != Some(want) {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Held::Grant { id, grant } => {
                let grants = tx.open_table(GRANTS)?;
                let stored: Option<kms_shared::model::GrantInfo> = grants
                    .get(*id)?
                    .map(|v| decode(v.value()))
                    .transpose()
                    .map_err(super::corrupt("grants"))?;
                Ok(stored == *grant)
            }
        }
    }

    /// Journals a group of calls: one record, durable before this returns.
    fn append(&mut self, group: &mut [Submission]) -> Result<(), StoreError> {
        let mut seq = self.next_seq;
        let ops: Vec<CallOp> = group
            .iter_mut()
            .flat_map(|s| std::mem::take(&mut s.mutations))
            .filter_map(|m| m.into_call_op(&mut seq))
            .collect();
        // Sequence numbers are spent even if the append fails: history may have gaps,
        // never duplicates.
        self.next_seq = seq;
        let Some(journal) = self.journal.as_mut() else {
            return self.commit(ops, &[]);
        };
        match journal.append(&ops) {
            Ok(()) => {
                self.pending.extend(ops);
                Ok(())
            }
            // Larger than the room left (a huge group): straight to redb, with the
            // pending calls, which restarts the journal.
            Err(JournalError::Full(_)) => self.commit(ops, &[]),
            Err(e) => {
                tracing::error!(error = %e, "call journal append failed; folding into the store");
                self.journal_failed = true;
                Err(StoreError::Db(e.to_string()))
            }
        }
    }

    /// Applies the pending calls the open transaction lacks to it (opening it first). A
    /// failure only drops the transaction: the fold then starts from `pending` afresh.
    fn stage(&mut self) {
        let mut seq = self.next_seq;
        let staged = self.take_staged();
        let result = staged.and_then(|(tx, applied)| {
            apply_calls(&tx, &self.pending[applied..], &mut seq)?;
            Ok((tx, self.pending.len()))
        });
        match result {
            Ok(open) => self.staged = Some(open),
            Err(e) => tracing::warn!(error = %e, "cannot stage journaled calls; the fold will"),
        }
    }

    /// The open transaction of the next fold and how many pending calls it holds; a new
    /// one (holding none) if there is none.
    fn take_staged(&mut self) -> Result<(WriteTransaction, usize), StoreError> {
        if let Some(open) = self.staged.take() {
            // Never more than are pending (see `commit`); if it were, dropping the
            // transaction and starting afresh is always right. Dropped before the new one
            // begins: redb's `begin_write` waits for a live write transaction, on this
            // same thread for ever.
            if open.1 <= self.pending.len() {
                return Ok(open);
            }
            drop(open);
        }
        Ok((begin(&*self.db.get()?)?, 0))
    }

    fn fold_due(&self) -> bool {
        !self.pending.is_empty()
            && self
                .fold_not_before
                .is_none_or(|t| std::time::Instant::now() >= t)
            && (self.pending.len() >= FOLD_AFTER_OPS
                || self
                    .journal
                    .as_ref()
                    .is_some_and(|j| j.used() >= journal::CAPACITY / 2))
    }

    /// One redb transaction: the pending calls, then `calls`, then the group's mutations;
    /// with a journal, also a new generation, and the journal restarts under it once
    /// committed. On failure the pending calls stay pending, `calls` are dropped (their
    /// callers get the error) and the database is reopened.
    fn commit(&mut self, calls: Vec<CallOp>, group: &[Submission]) -> Result<(), StoreError> {
        if let Some(g) = self.uncertain {
            // The journal still takes no records (`journal_failed`): this commit, once it
            // reports success, restarts it (see `confirm`).
            if self.stored_generation()? == Some(g) {
                // Landed: the pending calls are in redb. A transaction staged with them
                // since (the run loop stages after every journaled group, and after a
                // group too large for the journal too) would apply them again.
                self.pending.clear();
                self.staged = None;
            }
            self.uncertain = None;
        }
        let settle_only = group
            .iter()
            .all(|s| s.mutations.iter().all(|m| matches!(m, Mutation::Settle)));
        if calls.is_empty() && settle_only && self.pending.is_empty() && !self.journal_failed {
            return Ok(());
        }
        // A settle (a history page, a backup: a dashboard asks every second) soon after a
        // failed commit is refused without trying: each failure reopens the store, which
        // checks every page, on this thread, and the calls riding the journal meanwhile
        // would wait behind it. The writer's own fold tries again after `FOLD_RETRY`.
        if calls.is_empty()
            && settle_only
            && !group.is_empty()
            && let (Some(until), Some(why)) = (self.fold_not_before, &self.last_failure)
            && std::time::Instant::now() < until
        {
            return Err(StoreError::Db(format!(
                "the key store could not commit a moment ago ({why}); it tries again shortly"
            )));
        }
        let generation = match &self.journal {
            Some(_) => Some(draw_generation()?),
            None => None,
        };
        #[cfg(test)]
        while self.commits_held.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let acknowledged = self.pending.len();
        self.pending.extend(calls);
        let mut seq = self.next_seq;
        let staged = self.take_staged();
        #[cfg(test)]
        let staged = staged.and_then(|open| {
            if !self.commits_fail.0.load(Ordering::Relaxed) {
                return Ok(open);
            }
            self.commits_fail.1.fetch_add(1, Ordering::Relaxed);
            Err(StoreError::Db("injected: the disk is full".into()))
        });
        let result = staged.and_then(|(tx, applied)| {
            apply_calls(&tx, &self.pending[applied..], &mut seq)?;
            finish(tx, group, &mut seq, generation.as_ref())
        });
        #[cfg(test)]
        let result = result.and_then(|()| self.injected_failure_after_landing());
        match result {
            Ok(()) => {
                self.next_seq = seq;
                if let Some(g) = generation {
                    self.folded(g);
                }
                self.pending.clear();
                self.fold_not_before = None;
                self.last_failure = None;
                Ok(())
            }
            Err(e) => {
                // At most one line a second: a full disk fails a commit for every call.
                static LOGGED: crate::log_limit::LogAtMostEvery =
                    crate::log_limit::LogAtMostEvery::new(std::time::Duration::from_secs(1));
                if let Some(skipped) = LOGGED.due_for(&e.to_string()) {
                    tracing::error!(error = %e, submissions = group.len(), skipped, "store commit failed");
                }
                self.fold_not_before = Some(std::time::Instant::now() + FOLD_RETRY);
                self.last_failure = Some(e.to_string());
                // The sequence numbers the transaction gave out are spent, as a failed
                // append's are: if it landed after all (below), its entries hold them,
                // and handing them out again would overwrite those entries. History may
                // have gaps, never duplicates.
                self.next_seq = seq;
                // `calls` were never acknowledged, and the journal does not hold them
                // (they came here because they did not fit).
                self.pending.truncate(acknowledged);
                // redb fails every later operation after an I/O error: reopen the file.
                self.db.recover();
                // redb can fail a commit after it became durable (an fsync error after
                // the new header was written, or a failure while freeing pages after the
                // commit). The journal generation the transaction stored tells: if it
                // landed, the pending calls are in redb and must not be applied again,
                // and the journal must go on under the stored generation, or the next
                // open would not find what it acknowledges.
                let unsettled = |e| StoreError::Unsettled(Box::new(e));
                let Some(g) = generation else {
                    return Err(unsettled(e));
                };
                match self.stored_generation() {
                    Ok(stored) if stored == Some(g) => {
                        tracing::warn!("the failed commit reads back as landed; confirming it");
                        self.pending.clear();
                        self.fold_not_before = None;
                        self.confirm().map_err(unsettled)
                    }
                    Ok(_) => Err(e),
                    Err(read) => {
                        tracing::error!(error = %read, "cannot tell whether the commit landed; the call journal waits");
                        self.uncertain = Some(g);
                        self.journal_failed = true;
                        Err(unsettled(e))
                    }
                }
            }
        }
    }

    /// After a failed commit that reads back as landed: its calls are in redb as redb now
    /// reads, and not pending. But after an `fsync` error Linux marks the pages that did
    /// not reach the disk clean, so the read-back may come from memory while the disk
    /// holds the previous header; the journal's records are then the only durable copy
    /// of those calls. So the journal is not restarted on that read-back: it takes no
    /// records (calls commit to redb one group at a time) until a commit reports success,
    /// which rewrites the header and so makes the landed commit durable, and that commit
    /// restarts it. One is tried at once, holding nothing but a new generation; the
    /// caller's answer is its result.
    fn confirm(&mut self) -> Result<(), StoreError> {
        self.journal_failed = true;
        let g = draw_generation()?;
        let mut seq = self.next_seq;
        let result = self.db.get().and_then(|db| fold(&db, &[], &mut seq, &g));
        #[cfg(test)]
        let result = result.and_then(|()| self.injected_failure_after_landing());
        self.next_seq = seq;
        match result {
            Ok(()) => {
                self.folded(g);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot confirm the landed commit; the call journal waits for the next commit");
                self.db.recover();
                Err(e)
            }
        }
    }

    /// Tests: a commit that landed reports a failure while `land_then_fail` counts down.
    #[cfg(test)]
    fn injected_failure_after_landing(&self) -> Result<(), StoreError> {
        let failed = self
            .land_then_fail
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        match failed {
            true => Err(StoreError::Db(
                "injected: the commit landed, then failed".into(),
            )),
            false => Ok(()),
        }
    }

    /// After a fold under `g` committed: nothing is pending, the journal starts over
    /// under `g`.
    fn folded(&mut self, g: Generation) {
        self.pending.clear();
        if let Some(j) = self.journal.as_mut() {
            j.restart(g);
            self.journal_failed = false;
        }
    }

    /// The journal generation redb holds now.
    fn stored_generation(&self) -> Result<Option<Generation>, StoreError> {
        use redb::ReadableDatabase;
        #[cfg(test)]
        if self.generation_unreadable.swap(false, Ordering::Relaxed) {
            return Err(StoreError::Db("injected: the store cannot be read".into()));
        }
        let tx = self.db.get()?.begin_read()?;
        let meta = tx.open_table(META)?;
        let stored = meta.get(META_JOURNAL_GENERATION)?;
        Ok(stored.and_then(|v| Generation::try_from(v.value()).ok()))
    }
}

fn draw_generation() -> Result<Generation, StoreError> {
    journal::new_generation()
        .map_err(|e| StoreError::Db(format!("cannot draw a journal generation: {e}")))
}

/// Applies journaled calls in one durable transaction that stores the journal's next
/// `generation` (the store's open folds what a previous run left).
pub(super) fn fold(
    db: &Database,
    calls: &[CallOp],
    next_seq: &mut u64,
    generation: &Generation,
) -> Result<(), StoreError> {
    commit_group(db, calls, &[], next_seq, Some(generation))
}

/// Applies journaled calls, then a group's mutations, in one durable transaction; stores
/// `generation` (the journal's next) with them.
fn commit_group(
    db: &Database,
    calls: &[CallOp],
    group: &[Submission],
    next_seq: &mut u64,
    generation: Option<&Generation>,
) -> Result<(), StoreError> {
    let tx = begin(db)?;
    apply_calls(&tx, calls, next_seq)?;
    finish(tx, group, next_seq, generation)
}

/// A write transaction that commits durably (see [`make_durable`]).
fn begin(db: &Database) -> Result<WriteTransaction, StoreError> {
    let mut tx = db.begin_write()?;
    make_durable(&mut tx)?;
    Ok(tx)
}

/// Applies journaled calls to an open transaction.
fn apply_calls(
    tx: &WriteTransaction,
    calls: &[CallOp],
    next_seq: &mut u64,
) -> Result<(), StoreError> {
    if calls.is_empty() {
        return Ok(());
    }
    let mut history = tx.open_table(HISTORY)?;
    let mut usage = tx.open_table(USAGE)?;
    let mut encryptions = tx.open_table(ENCRYPTIONS)?;
    let mut pending_uses: PendingUses = HashMap::new();
    let mut pending_encryptions: PendingEncryptions = HashMap::new();
    for op in calls {
        match op {
            CallOp::History { tag, seq, record } => {
                history.insert(
                    (tag.as_str(), *seq),
                    encode_array(record).map_err(enc)?.as_slice(),
                )?;
                *next_seq = (*next_seq).max(seq.saturating_add(1));
            }
            CallOp::Use {
                tag,
                at,
                account,
                n,
            } => add_use(&mut pending_uses, tag, *at, account, *n),
            CallOp::Encryptions { tag, version, n } => {
                let e = pending_encryptions
                    .entry((tag.as_str(), *version))
                    .or_insert(0);
                *e = e.saturating_add(*n);
            }
        }
    }
    flush_counters(
        &mut usage,
        &mut encryptions,
        &mut pending_uses,
        &mut pending_encryptions,
    )
}

/// Applies a group's mutations to `tx`, stores the history sequence (and the journal's
/// next `generation`) and commits.
fn finish(
    tx: WriteTransaction,
    group: &[Submission],
    next_seq: &mut u64,
    generation: Option<&Generation>,
) -> Result<(), StoreError> {
    {
        let mut keys = tx.open_table(KEYS)?;
        let mut names = tx.open_table(NAMES)?;
        let mut versions = tx.open_table(VERSIONS)?;
        let mut due = tx.open_table(DUE)?;
        let mut history = tx.open_table(HISTORY)?;
        let mut usage = tx.open_table(USAGE)?;
        let mut encryptions = tx.open_table(ENCRYPTIONS)?;
        let mut grants = tx.open_table(GRANTS)?;
        let mut pending_uses: PendingUses = HashMap::new();
        let mut pending_encryptions: PendingEncryptions = HashMap::new();
        let mut last_grant_id: Option<u64> = None;
        for m in group.iter().flat_map(|s| s.mutations.iter()) {
            match m {
                Mutation::PutKey(rec) => {
                    keys.insert(rec.tag.as_str(), encode_map(rec).map_err(enc)?.as_slice())?;
                }
                Mutation::PutName { name, tag } => {
                    names.insert(name.as_str(), tag.as_str())?;
                }
                Mutation::RemoveName(name) => {
                    names.remove(name.as_str())?;
                }
                Mutation::PutVersion {
                    tag,
                    version,
                    record,
                } => {
                    versions.insert(
                        (tag.as_str(), *version),
                        encode_map(record).map_err(enc)?.as_slice(),
                    )?;
                }
                Mutation::AddDue { at, tag, kind } => {
                    due.insert((*at, tag.as_str(), *kind as u8), ())?;
                }
                Mutation::RemoveDue { at, tag, kind } => {
                    due.remove((*at, tag.as_str(), *kind as u8))?;
                }
                Mutation::History { tag, record } => {
                    history.insert(
                        (tag.as_str(), *next_seq),
                        encode_array(record).map_err(enc)?.as_slice(),
                    )?;
                    *next_seq += 1;
                }
                // Counters are summed over the group and written once per key at the
                // end: a group of 500 encryptions under one key costs one update, not 500.
                Mutation::Use {
                    tag,
                    at,
                    account,
                    n,
                } => add_use(&mut pending_uses, tag, *at, account, *n),
                Mutation::Encryptions { tag, version, n } => {
                    let e = pending_encryptions
                        .entry((tag.as_str(), *version))
                        .or_insert(0);
                    *e = e.saturating_add(*n);
                }
                Mutation::PutGrant(g) => {
                    grants.insert(g.id, encode_map(g).map_err(enc)?.as_slice())?;
                    last_grant_id = last_grant_id.max(Some(g.id));
                }
                Mutation::RemoveGrant(id) => {
                    grants.remove(*id)?;
                }
                Mutation::PruneHistory { before, now } => {
                    prune_history(&keys, &mut history, *before, *now)?;
                    // Counters summed so far in this group count as stored for this.
                    flush_counters(
                        &mut usage,
                        &mut encryptions,
                        &mut pending_uses,
                        &mut pending_encryptions,
                    )?;
                    remove_orphan_counters(&keys, &mut usage, &mut encryptions)?;
                }
                Mutation::CapHistory {
                    keep,
                    calls_only,
                    scan,
                    round,
                } => {
                    let mut round = round.lock().unwrap_or_else(|e| e.into_inner());
                    let walk = CapWalk {
                        next_seq: *next_seq,
                        keep: *keep,
                        calls_only: *calls_only,
                        scan: *scan,
                    };
                    cap_history(&mut history, &walk, &mut round)?;
                }
                Mutation::Expunge { tag } => {
                    // Counters summed so far belong before the removal.
                    flush_counters(
                        &mut usage,
                        &mut encryptions,
                        &mut pending_uses,
                        &mut pending_encryptions,
                    )?;
                    keys.remove(tag.as_str())?;
                    usage.remove(tag.as_str())?;
                    let t = tag.as_str();
                    versions.retain_in((t, 0)..=(t, u32::MAX), |_, _| false)?;
                    encryptions.retain_in((t, 0)..=(t, u32::MAX), |_, _| false)?;
                    history.retain_in((t, 0)..=(t, u64::MAX), |_, _| false)?;
                }
                // Rare: the table is opened only when a registration changes.
                Mutation::PutHsmToken(rec) => {
                    tx.open_table(HSM_TOKENS)?
                        .insert(rec.name.as_str(), encode_map(rec).map_err(enc)?.as_slice())?;
                }
                Mutation::RemoveHsmToken(name) => {
                    tx.open_table(HSM_TOKENS)?.remove(name.as_str())?;
                }
                Mutation::Settle | Mutation::Confirm(_) => {}
            }
        }
        flush_counters(
            &mut usage,
            &mut encryptions,
            &mut pending_uses,
            &mut pending_encryptions,
        )?;
        let mut meta = tx.open_table(META)?;
        meta.insert(META_HISTORY_SEQ, next_seq.to_be_bytes().as_slice())?;
        if let Some(id) = last_grant_id {
            let stored = match meta.get(META_LAST_GRANT_ID)? {
                Some(v) => super::read_u64(v.value())?,
                None => 0,
            };
            meta.insert(META_LAST_GRANT_ID, id.max(stored).to_be_bytes().as_slice())?;
        }
        if let Some(g) = generation {
            meta.insert(META_JOURNAL_GENERATION, g.as_slice())?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Successful calls per key in a group: count, time and account of the latest.
type PendingUses<'a> = HashMap<&'a str, (u64, UnixMillis, &'a String)>;

fn add_use<'a>(
    uses: &mut PendingUses<'a>,
    tag: &'a str,
    at: UnixMillis,
    account: &'a String,
    n: u64,
) {
    let u = uses.entry(tag).or_insert((0, at, account));
    u.0 = u.0.saturating_add(n);
    if at >= u.1 {
        (u.1, u.2) = (at, account);
    }
}
/// Encryptions per (key, version) in a group.
type PendingEncryptions<'a> = HashMap<(&'a str, u32), u64>;

/// Adds the group's summed counters to the stored ones and empties the sums.
fn flush_counters(
    usage: &mut redb::Table<&str, &[u8]>,
    encryptions: &mut redb::Table<(&str, u32), u64>,
    pending_uses: &mut PendingUses<'_>,
    pending_encryptions: &mut PendingEncryptions<'_>,
) -> Result<(), StoreError> {
    for (tag, (n, at, account)) in pending_uses.drain() {
        let mut rec: UsageRecord = match usage.get(tag)? {
            Some(v) => decode(v.value()).map_err(|e| StoreError::Corrupt {
                table: "usage",
                message: e.to_string(),
            })?,
            None => UsageRecord::default(),
        };
        rec.count = rec.count.saturating_add(n);
        if rec.last_used_at.is_none_or(|t| at >= t) {
            rec.last_used_at = Some(at);
            if rec.last_used_by.as_deref() != Some(account.as_str()) {
                rec.last_used_by = Some(account.clone());
            }
        }
        usage.insert(tag, encode_map(&rec).map_err(enc)?.as_slice())?;
    }
    for ((tag, version), n) in pending_encryptions.drain() {
        let old = encryptions
            .get((tag, version))?
            .map(|v| v.value())
            .unwrap_or(0);
        encryptions.insert((tag, version), old.saturating_add(n))?;
    }
    Ok(())
}

/// Removes history entries older than `before`, key by key, walking the tags the history
/// table holds (not the keys table: an entry committed after its key's expiry, by a call
/// that raced it, has no key left and goes whatever its time). Entries are in sequence
/// order and their times, taken when a call starts, are not quite (see
/// [`HISTORY_TIME_SLACK_MS`]): the walk of a key stops only past `before` and the slack.
fn prune_history(
    keys: &redb::Table<&str, &[u8]>,
    history: &mut redb::Table<(&str, u64), &[u8]>,
    before: UnixMillis,
    now: UnixMillis,
) -> Result<(), StoreError> {
    let stop_at = before.saturating_add(HISTORY_TIME_SLACK_MS);
    let future = now.saturating_add(HISTORY_TIME_SLACK_MS);
    let mut next_tag = history.first()?.map(|(k, _)| k.value().0.to_string());
    while let Some(tag) = next_tag.take() {
        let t = tag.as_str();
        let orphan = keys.get(t)?.is_none();
        let mut old = Vec::new();
        for row in history.range((t, 0)..=(t, u64::MAX))? {
            let (k, v) = row?;
            if !orphan {
                let rec: HistoryRecord = decode(v.value()).map_err(|e| StoreError::Corrupt {
                    table: "history",
                    message: e.to_string(),
                })?;
                // Dated after now: written while the clock was ahead (and since set
                // back), so out of time order with the entries after it. Kept until
                // its date is old enough, and walked past: stopping there would keep
                // every later entry of the key as long as the clock was ahead.
                if rec.time > future {
                    continue;
                }
                if rec.time >= stop_at {
                    break;
                }
                if rec.time >= before {
                    continue;
                }
            }
            old.push(k.value().1);
        }
        for seq in old {
            history.remove((t, seq))?;
        }
        next_tag = tag_after(history, t)?;
    }
    Ok(())
}

/// The next tag with history after `t`: past every sequence number of `t`.
fn tag_after(
    history: &redb::Table<(&str, u64), &[u8]>,
    t: &str,
) -> Result<Option<String>, StoreError> {
    Ok(match history.range((t, u64::MAX)..)?.next() {
        Some(row) => {
            let (k, _) = row?;
            let next = k.value().0;
            match next == t {
                // (t, u64::MAX) itself: look past it.
                true => history
                    .range((t, u64::MAX)..)?
                    .nth(1)
                    .transpose()?
                    .map(|(k, _)| k.value().0.to_string()),
                false => Some(next.to_string()),
            }
        }
        None => None,
    })
}

/// History entries one round of the cap reads at most: a round is one commit, which
/// every call waits behind (a removal of millions in one held them for seconds).
pub const CAP_SCAN: usize = 100_000;

/// Where a walk of the history cap stands, from one round ([`Mutation::CapHistory`]) to
/// the next.
#[derive(Debug, Default)]
pub struct CapRound {
    /// Where the next round begins (tag, sequence number); `None` before the first.
    pub from: Option<(String, u64)>,
    /// Entries removed by the rounds so far.
    pub removed: u64,
    /// The walk reached the last key.
    pub walked: bool,
    /// History entries after the round.
    pub len: u64,
    /// Entries that could not be decoded (read as not calls).
    pub undecodable: u64,
}

/// What one round of the cap is asked to do.
struct CapWalk {
    next_seq: u64,
    keep: u64,
    calls_only: bool,
    scan: usize,
}

/// One round of the cap: with more than `keep` entries (redb keeps a table's length: this
/// check is free), walks the keys' history from `round.from`, reading at most `scan`
/// entries, and removes those numbered below `next_seq - keep` — with
/// `calls_only`, only the entries of crypto calls (refused ones included). Numbers are
/// given one per entry, in order, so at most `keep` entries have one from that cutoff on.
/// A first walk removes calls only, so that what was done to keys (creations, rotations,
/// state changes, grants) outlasts a flood of calls; a second, if the history is still
/// over its cap, removes anything below the cutoff, so that no kind of entry grows
/// without bound ([`Engine::cap_history`](crate::engine::Engine::cap_history)).
/// Within a walk keys are taken in tag order, not by age across keys.
fn cap_history(
    history: &mut redb::Table<(&str, u64), &[u8]>,
    walk: &CapWalk,
    round: &mut CapRound,
) -> Result<(), StoreError> {
    let CapWalk {
        next_seq,
        keep,
        calls_only,
        scan,
    } = *walk;
    round.len = history.len()?;
    if round.len <= keep {
        return Ok(());
    }
    let cutoff = next_seq.saturating_sub(keep);
    let (mut tag, mut seq) = match round.from.take() {
        Some(from) => (Some(from.0), from.1),
        None => (history.first()?.map(|(k, _)| k.value().0.to_string()), 0),
    };
    // Entries read, and keys visited (a key with nothing below the cutoff costs its seeks
    // too: a walk over many such keys must not be one long commit).
    let (mut read, scan) = (0usize, scan.max(1));
    while let Some(t) = tag.take() {
        if read >= scan {
            round.from = Some((t, seq));
            break;
        }
        read += 1;
        let mut gone = Vec::new();
        let mut stopped_at = None;
        for row in history.range((t.as_str(), seq)..(t.as_str(), cutoff))? {
            let (k, v) = row?;
            let s = k.value().1;
            if read >= scan {
                stopped_at = Some(s);
                break;
            }
            read += 1;
            let remove = !calls_only
                || match decode::<HistoryRecord>(v.value()) {
                    Ok(rec) => {
                        rec.action.is_crypto() || rec.action == kms_shared::model::Action::PublicKey
                    }
                    Err(_) => {
                        round.undecodable += 1;
                        false
                    }
                };
            if remove {
                gone.push(s);
            }
        }
        for s in &gone {
            history.remove((t.as_str(), *s))?;
        }
        round.removed += gone.len() as u64;
        if let Some(s) = stopped_at {
            round.from = Some((t, s));
            break;
        }
        tag = tag_after(history, &t)?;
        seq = 0;
    }
    // Stopped by the budget: `from` says where; otherwise every key was walked.
    round.walked = round.from.is_none();
    round.len = history.len()?;
    Ok(())
}

/// Removes the usage and encryption counters of tags with no key: a call that raced its
/// key's expiry folds its counters after the key's rows were removed, and nothing else
/// would ever remove them (the counters of a key that exists are left alone). Usage rows
/// are one per key; the encryptions table is walked a tag at a time, skipping each tag's
/// versions with one seek.
fn remove_orphan_counters(
    keys: &redb::Table<&str, &[u8]>,
    usage: &mut redb::Table<&str, &[u8]>,
    encryptions: &mut redb::Table<(&str, u32), u64>,
) -> Result<(), StoreError> {
    let mut orphans = Vec::new();
    for row in usage.iter()? {
        let (tag, _) = row?;
        if keys.get(tag.value())?.is_none() {
            orphans.push(tag.value().to_string());
        }
    }
    for tag in &orphans {
        usage.remove(tag.as_str())?;
    }
    let mut next_tag = encryptions.first()?.map(|(k, _)| k.value().0.to_string());
    while let Some(tag) = next_tag.take() {
        let t = tag.as_str();
        if keys.get(t)?.is_none() {
            encryptions.retain_in((t, 0)..=(t, u32::MAX), |_, _| false)?;
        }
        // (t, u32::MAX) is a valid version number: past it, or past its row if it has one.
        next_tag = encryptions
            .range((t, u32::MAX)..)?
            .map(|row| row.map(|(k, _)| k.value().0.to_string()))
            .find(|next| next.as_ref().map_or(true, |n| n != t))
            .transpose()?;
    }
    Ok(())
}

pub(super) fn enc(e: rmp_serde::encode::Error) -> StoreError {
    StoreError::Db(format!("record encoding failed: {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn uses(tag: &str, account: &str, at: UnixMillis, n: u64) -> Mutation {
        Mutation::Use {
            tag: tag.into(),
            at,
            account: account.into(),
            n,
        }
    }

    fn call_record(time: UnixMillis) -> HistoryRecord {
        HistoryRecord {
            time,
            action: kms_shared::model::Action::Encrypt,
            version: Some(1),
            result: "ok".into(),
            account: "alice".into(),
            uid: 1000,
            pid: 7,
            client: "test".into(),
            items: 1,
            failed: 0,
        }
    }

    fn call(tag: &str, time: UnixMillis) -> Vec<Mutation> {
        vec![
            Mutation::History {
                tag: tag.into(),
                record: call_record(time),
            },
            uses(tag, "alice", time, 1),
            Mutation::Encryptions {
                tag: tag.into(),
                version: 1,
                n: 1,
            },
        ]
    }

    fn version_one(tag: &str) -> Mutation {
        Mutation::PutVersion {
            tag: tag.into(),
            version: 1,
            record: crate::store::records::VersionRecord {
                created_at: 1,
                enabled: true,
                wrapped: None,
            },
        }
    }

    /// The store and its journal as a crash would leave them at this instant (a copy of
    /// both files while the writer runs), under `to`.
    fn crash_image(store: &Store, to: &std::path::Path) -> std::path::PathBuf {
        let image = to.join("kms.redb");
        std::fs::copy(store.path(), &image).unwrap();
        std::fs::copy(journal::path_for(store.path()), journal::path_for(&image)).unwrap();
        image
    }

    /// (sequence numbers and times of the key's history, oldest first; usage count;
    /// encryptions under version 1), as redb holds them.
    fn stored(store: &Store, tag: &str) -> (Vec<(u64, UnixMillis)>, u64, u64) {
        let filter = crate::store::HistoryFilter {
            limit: usize::MAX,
            ..Default::default()
        };
        let history = store
            .history(tag, &filter)
            .unwrap()
            .0
            .into_iter()
            .rev()
            .map(|(seq, r)| (seq, r.time))
            .collect();
        let usage = store
            .load()
            .unwrap()
            .usage
            .into_iter()
            .find(|(t, _)| t == tag)
            .map_or(0, |(_, u)| u.count);
        let enc = store
            .versions(tag)
            .unwrap()
            .first()
            .map_or(0, |v| v.encryptions);
        (history, usage, enc)
    }

    /// Calls answered from the journal alone (redb does not have them yet) survive a
    /// crash: the next open folds them in with their counters and sequence numbers, and
    /// only once (a second open adds nothing); calls made after that continue the
    /// sequence. A settle, and a clean stop, put them in redb without any crash.
    #[test]
    fn journaled_calls_survive_a_crash_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kms.redb"), "fp").unwrap();
        let writer = store.start_writer().unwrap();
        writer.submit(vec![version_one("a")]).wait().unwrap();
        for t in 0..10 {
            writer.submit(call("a", t)).wait().unwrap();
        }
        assert_eq!(writer.unfolded.load(Ordering::Acquire), 30);
        assert_eq!(store.history_len().unwrap(), 0, "folded too early");
        let crashed = tempfile::tempdir().unwrap();
        let image = crash_image(&store, crashed.path());

        writer.settle().unwrap();
        assert_eq!(writer.unfolded.load(Ordering::Acquire), 0);
        let want: Vec<(u64, UnixMillis)> = (0..10).map(|t| (t as u64 + 1, t)).collect();
        assert_eq!(stored(&store, "a"), (want.clone(), 10, 10));
        writer.submit(call("a", 10)).wait().unwrap();
        writer.shutdown();
        assert_eq!(stored(&store, "a").0.len(), 11, "the stop did not fold");
        drop(store);

        for open in 0..2 {
            let store = Store::open(&image, "fp").unwrap();
            assert_eq!(stored(&store, "a"), (want.clone(), 10, 10), "open {open}");
            drop(store);
        }
        let store = Store::open(&image, "fp").unwrap();
        let writer = store.start_writer().unwrap();
        writer.submit(call("a", 10)).wait().unwrap();
        writer.settle().unwrap();
        let (history, usage, _) = stored(&store, "a");
        assert_eq!((history.last().copied(), usage), (Some((11, 10)), 11));
        writer.shutdown();
    }

    /// The record a crash tore (the last group, never answered) is dropped and the ones
    /// before it are kept; a lifecycle change folds the journal first, so the key it
    /// expunges keeps nothing the journal held.
    #[test]
    fn torn_record_dropped_and_changes_fold_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kms.redb"), "fp").unwrap();
        let writer = store.start_writer().unwrap();
        writer
            .submit(vec![version_one("a"), version_one("b")])
            .wait()
            .unwrap();
        for t in 0..3 {
            writer.submit(call("a", t)).wait().unwrap();
        }
        let crashed = tempfile::tempdir().unwrap();
        let image = crash_image(&store, crashed.path());
        let journal_file = journal::path_for(&image);
        let mut bytes = std::fs::read(&journal_file).unwrap();
        let third = bytes
            .windows(4)
            .enumerate()
            .filter(|(_, w)| w == b"KMSJ")
            .nth(2)
            .unwrap()
            .0;
        bytes[third + 40] ^= 1;
        std::fs::write(&journal_file, &bytes).unwrap();
        let restored = Store::open(&image, "fp").unwrap();
        let (history, usage, enc) = stored(&restored, "a");
        assert_eq!((history.len(), usage, enc), (2, 2, 2));
        drop(restored);

        writer.submit(call("b", 5)).wait().unwrap();
        writer
            .submit(vec![Mutation::Expunge { tag: "b".into() }])
            .wait()
            .unwrap();
        assert_eq!(writer.unfolded.load(Ordering::Acquire), 0);
        assert_eq!(stored(&store, "b"), (vec![], 0, 0));
        assert_eq!(stored(&store, "a").0.len(), 3);
        writer.shutdown();
    }

    /// A fold whose commit landed but reported a failure (redb can fail after the new
    /// header is durable) is recognised by the journal generation it stored: the pending
    /// calls are not applied a second time, and the calls journaled after it carry the
    /// stored generation, so a crash keeps them.
    #[test]
    fn a_fold_that_landed_despite_an_error_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = writer_with_calls(dir.path(), 5);
        writer.land_then_fail.store(1, Ordering::Relaxed);
        writer.settle().unwrap();
        let want: Vec<(u64, UnixMillis)> = (0..5).map(|t| (t as u64 + 1, t)).collect();
        assert_eq!(stored(&store, "a"), (want, 5, 5));
        writer.submit(call("a", 5)).wait().unwrap();
        assert_eq!(writer.unfolded.load(Ordering::Acquire), 3, "not journaled");
        assert_eq!(after_crash(&store), (6, 6, 6), "after a crash");
        writer.settle().unwrap();
        let (history, usage, enc) = stored(&store, "a");
        assert_eq!((history.len(), usage, enc), (6, 6, 6), "without a crash");
        writer.shutdown();
    }

    /// A fold that failed but reads back as landed, and whose confirming commit fails
    /// too. After an `fsync` error the read-back may come from pages that never reached
    /// the disk, so until a commit reports success the journal keeps the folded calls'
    /// records (nothing is journaled over them): a disk that kept the old store header
    /// still finds every acknowledged call. Nothing counts twice either way.
    #[test]
    fn a_landed_fold_keeps_the_journal_until_a_commit_confirms_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = writer_with_calls(dir.path(), 5);
        // What the disk holds if the fold's new header never reaches it.
        let old = tempfile::tempdir().unwrap();
        let old_disk = crash_image(&store, old.path());
        writer.land_then_fail.store(2, Ordering::Relaxed);
        assert!(writer.settle().is_err(), "the fold is not confirmed");
        let want: Vec<(u64, UnixMillis)> = (0..5).map(|t| (t as u64 + 1, t)).collect();
        assert_eq!(stored(&store, "a"), (want, 5, 5), "in redb once");
        // Not journaled: committed to redb, which confirms the fold.
        writer.submit(call("a", 5)).wait().unwrap();
        assert_eq!(writer.unfolded.load(Ordering::Acquire), 0, "not journaled");
        // The old header with the journal as it is now: the five calls are there.
        std::fs::copy(
            journal::path_for(store.path()),
            journal::path_for(&old_disk),
        )
        .unwrap();
        let reopened = Store::open(&old_disk, "fp").unwrap();
        assert_eq!(stored(&reopened, "a").0.len(), 5, "kept by the journal");
        drop(reopened);
        // Journaling resumes after the confirming commit.
        writer.submit(call("a", 6)).wait().unwrap();
        assert_eq!(writer.unfolded.load(Ordering::Acquire), 3, "journaled");
        assert_eq!(after_crash(&store), (7, 7, 7), "after a crash");
        writer.settle().unwrap();
        let (history, usage, enc) = stored(&store, "a");
        let times: Vec<UnixMillis> = history.iter().map(|(_, t)| *t).collect();
        assert_eq!(times, (0..7).collect::<Vec<_>>(), "{history:?}");
        assert_eq!((usage, enc), (7, 7));
        writer.shutdown();
    }

    /// A fold that failed, landed, and could not be read back at once (the store was
    /// unreadable for a moment): the journal waits, the next commit finds that it landed,
    /// and nothing is lost or counted twice — in particular no history sequence number
    /// the landed fold used is given out again (which would overwrite its entries).
    #[test]
    fn a_fold_whose_outcome_was_unknown_is_settled_by_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = writer_with_calls(dir.path(), 5);
        writer.land_then_fail.store(1, Ordering::Relaxed);
        writer.generation_unreadable.store(true, Ordering::Relaxed);
        // A change with a history entry of its own folds the five calls and fails after
        // landing; whether it landed cannot be read back.
        let mut change = vec![version_one("a")];
        change.extend(call("a", 5));
        assert!(
            writer.submit(change).wait().is_err(),
            "the outcome was unknown"
        );
        // The journal waits, so this call is committed to redb, after the question is
        // settled: it landed, so the change's entry is there and must stay.
        writer.submit(call("a", 6)).wait().unwrap();
        let (history, usage, enc) = stored(&store, "a");
        let times: Vec<UnixMillis> = history.iter().map(|(_, t)| *t).collect();
        assert_eq!(times, (0..7).collect::<Vec<_>>(), "{history:?}");
        assert_eq!((usage, enc), (7, 7));
        // Journaling resumes, under the generation that landed.
        writer.submit(call("a", 7)).wait().unwrap();
        assert_eq!(
            writer.unfolded.load(Ordering::Acquire),
            3,
            "journaled again"
        );
        assert_eq!(after_crash(&store), (8, 8, 8), "after a crash");
        writer.shutdown();
    }

    /// The same, when the failed commit was a group of calls too large for the journal
    /// (committed to redb directly): the run loop staged the pending calls into an open
    /// transaction after the failure, and the commit that settled the question cleared
    /// them but kept that transaction, then indexed past the end of the calls it held —
    /// the writer panicked (and, had it not, would have counted the calls twice).
    #[test]
    fn an_unknown_outcome_of_an_oversized_group_is_settled_too() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = writer_with_calls(dir.path(), 5);
        // 3,000 calls with a 4 KiB client name each: ~12 MiB, more than the journal holds.
        let big: Vec<Mutation> = (5..3_005)
            .flat_map(|t| {
                let mut c = call("a", t);
                if let Mutation::History { record, .. } = &mut c[0] {
                    record.client = "c".repeat(4096);
                }
                c
            })
            .collect();
        writer.land_then_fail.store(1, Ordering::Relaxed);
        writer.generation_unreadable.store(true, Ordering::Relaxed);
        assert!(
            writer.submit(big).wait().is_err(),
            "the outcome was unknown"
        );
        writer.submit(call("a", 3_005)).wait().unwrap();
        assert!(!writer.has_failed());
        let (history, usage, enc) = stored(&store, "a");
        assert_eq!(history.len(), 3_006, "every call once");
        assert_eq!((usage, enc), (3_006, 3_006));
        writer.shutdown();
    }

    fn key_record(tag: &str) -> Mutation {
        use kms_shared::model::{KeyState, KeyType, Protection};
        Mutation::PutKey(crate::store::records::KeyRecord {
            tag: tag.into(),
            name: tag.into(),
            key_type: KeyType::Aes256,
            protection: Protection::Basic,
            hsm: None,
            state: KeyState::Enabled,
            convergent: false,
            current_version: 1,
            auto_rotation: false,
            rotation_days: 90,
            rotation_anchor: None,
            rotation_stopped: false,
            token_objects_left: false,
            slot: None,
            created_at: 0,
            deletion_due_at: None,
            deleted_at: None,
            memo: String::new(),
        })
    }

    /// Pruning goes past an entry numbered before older ones (its call started later:
    /// times are out of sequence order by up to the time a call takes), and removes the
    /// entries of a tag with no key left (committed after the key's expiry by a call
    /// that raced it), which no walk of the keys table ever reached. `since` likewise
    /// looks past such an entry.
    #[test]
    fn history_walks_allow_for_out_of_order_times() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kms.redb"), "fp").unwrap();
        let writer = store.start_writer().unwrap();
        writer
            .submit(vec![key_record("k"), version_one("k"), version_one("gone")])
            .wait()
            .unwrap();
        for t in [5_000, 6_100, 5_990, 7_000] {
            writer.submit(call("k", t)).wait().unwrap();
        }
        writer.submit(call("gone", 9_000_000)).wait().unwrap();
        writer.submit(vec![Mutation::Settle]).wait().unwrap();
        let filter = crate::store::HistoryFilter {
            since: Some(6_000),
            limit: usize::MAX,
            ..Default::default()
        };
        let recent: Vec<UnixMillis> = store
            .history("k", &filter)
            .unwrap()
            .0
            .iter()
            .map(|(_, r)| r.time)
            .collect();
        assert_eq!(recent, vec![7_000, 6_100]);

        writer
            .submit(vec![Mutation::PruneHistory {
                before: 6_050,
                now: 100_000,
            }])
            .wait()
            .unwrap();
        let kept: Vec<UnixMillis> = stored(&store, "k").0.iter().map(|(_, t)| *t).collect();
        assert_eq!(kept, vec![6_100, 7_000]);
        assert!(stored(&store, "gone").0.is_empty(), "an orphan entry stays");
        writer.shutdown();
    }

    /// Over what it may keep, the history loses its oldest call entries, of whichever
    /// keys, a bounded number read per round (each its own commit), the walk taken up
    /// where the last round stopped; entries that are not calls stay in a calls-only
    /// walk, and go in a walk of everything. At or under `keep`, nothing goes. Before,
    /// nothing but age removed history, and a call rate the retention did not foresee
    /// filled the disk.
    #[test]
    fn the_history_is_capped_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kms.redb"), "fp").unwrap();
        let writer = store.start_writer().unwrap();
        writer
            .submit(vec![key_record("a"), version_one("a")])
            .wait()
            .unwrap();
        writer
            .submit(vec![key_record("b"), version_one("b")])
            .wait()
            .unwrap();
        // Not a call: what was done to b.
        writer
            .submit(vec![Mutation::History {
                tag: "b".into(),
                record: HistoryRecord {
                    action: kms_shared::model::Action::Rotate,
                    ..call_record(-1)
                },
            }])
            .wait()
            .unwrap();
        // a is busy, b quiet: 40 and 10 calls, interleaved.
        for t in 0..50 {
            let tag = if t % 5 == 4 { "b" } else { "a" };
            writer.submit(call(tag, t)).wait().unwrap();
        }
        // Rounds of one walk until it is over (or under `keep`): (rounds, removed).
        let walk = |keep, calls_only, scan| {
            let round = Arc::new(Mutex::new(CapRound::default()));
            let mut rounds = 0;
            loop {
                rounds += 1;
                writer
                    .submit(vec![Mutation::CapHistory {
                        keep,
                        calls_only,
                        scan,
                        round: round.clone(),
                    }])
                    .wait()
                    .unwrap();
                let r = round.lock().unwrap();
                if r.walked || r.len <= keep {
                    return (rounds, r.removed);
                }
                assert!(rounds < 100, "the walk does not end");
            }
        };
        assert_eq!(walk(51, true, 100), (1, 0), "at keep: nothing goes");
        assert_eq!(store.history_len().unwrap(), 51);
        // Every call numbered below the last 36 goes, 5 reads a round (a key visited is
        // one): the 15 entries below the cutoff (the rotation among them) and the 2 keys
        // in 4 rounds.
        assert_eq!(walk(36, true, 5), (4, 14));
        assert_eq!(store.history_len().unwrap(), 37, "the rotation stays");
        let times =
            |tag| -> Vec<UnixMillis> { stored(&store, tag).0.iter().map(|e| e.1).collect() };
        let (a, b) = (times("a"), times("b"));
        // The rotation, and the 36 newest calls: times 14 to 49.
        let mut kept: Vec<UnixMillis> = a.iter().chain(b.iter()).copied().collect();
        kept.sort();
        assert_eq!(kept, std::iter::once(-1).chain(14..50).collect::<Vec<_>>());
        assert_eq!(b, vec![-1, 14, 19, 24, 29, 34, 39, 44, 49]);
        // A walk of everything takes the rotation too.
        assert_eq!(walk(36, false, 100), (1, 1));
        assert_eq!(times("b"), vec![14, 19, 24, 29, 34, 39, 44, 49]);
        writer.shutdown();
    }

    /// An entry dated after the time of the prune (made while the clock was ahead, and
    /// the clock since set back) does not stop the walk: the older entries after it go,
    /// and it stays until its own date is older than the retention. Pruning used to stop
    /// at it, keeping every later entry of the key for as long as the clock had been
    /// ahead.
    #[test]
    fn pruning_walks_past_an_entry_dated_in_the_future() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kms.redb"), "fp").unwrap();
        let writer = store.start_writer().unwrap();
        writer
            .submit(vec![key_record("k"), version_one("k")])
            .wait()
            .unwrap();
        let year = 365 * kms_shared::model::DAY_MS;
        for t in [5_000, 5_000 + year, 5_100, 5_200, 90_000] {
            writer.submit(call("k", t)).wait().unwrap();
        }
        writer.submit(vec![Mutation::Settle]).wait().unwrap();
        let prune = |before, now| {
            writer
                .submit(vec![Mutation::PruneHistory { before, now }])
                .wait()
                .unwrap();
            let (history, _, _) = stored(&store, "k");
            history.iter().map(|(_, t)| *t).collect::<Vec<_>>()
        };
        assert_eq!(prune(80_000, 100_000), vec![5_000 + year, 90_000]);
        assert_eq!(
            prune(5_000 + year, 5_000 + 2 * year),
            vec![5_000 + year],
            "kept while its date is within the retention"
        );
        assert_eq!(
            prune(5_001 + year, 5_001 + 2 * year),
            Vec::<UnixMillis>::new()
        );
        writer.shutdown();
    }

    /// Pruning also removes the usage and encryption counters of tags with no key (folded
    /// after the key's expiry by calls that raced it: nothing removed them before), and
    /// leaves those of keys that exist, whatever their age.
    #[test]
    fn pruning_removes_counters_of_keys_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kms.redb"), "fp").unwrap();
        let writer = store.start_writer().unwrap();
        writer
            .submit(vec![
                key_record("a"),
                key_record("k"),
                key_record("z"),
                version_one("a"),
                version_one("k"),
                version_one("z"),
            ])
            .wait()
            .unwrap();
        for tag in ["a", "k", "z"] {
            writer.submit(call(tag, 5_000)).wait().unwrap();
        }
        // The key "k" expires; a call that resolved it before lands after.
        writer
            .submit(vec![Mutation::Expunge { tag: "k".into() }])
            .wait()
            .unwrap();
        let mut late = call("k", 5_001);
        late.push(Mutation::Encryptions {
            tag: "k".into(),
            version: u32::MAX,
            n: 1,
        });
        writer.submit(late).wait().unwrap();
        writer.submit(vec![Mutation::Settle]).wait().unwrap();
        let counters = |tag: &str| {
            let (_, usage, _) = stored(&store, tag);
            use redb::ReadableDatabase as _;
            let tx = store.db.get().unwrap().begin_read().unwrap();
            let enc = tx
                .open_table(ENCRYPTIONS)
                .unwrap()
                .range((tag, 0)..=(tag, u32::MAX))
                .unwrap()
                .count();
            (usage, enc)
        };
        assert_eq!(counters("k"), (1, 2), "the race leaves counters behind");
        writer
            .submit(vec![Mutation::PruneHistory { before: 0, now: 0 }])
            .wait()
            .unwrap();
        assert_eq!(counters("k"), (0, 0), "the orphan counters stay");
        assert_eq!(counters("a"), (1, 1));
        assert_eq!(counters("z"), (1, 1));
        writer.shutdown();
    }

    /// A writer thread that panics answers nothing as durable, refuses every later
    /// submission, and says so, so that the daemon can stop; the calls it had journaled
    /// are still on disk for the next open.
    #[test]
    fn a_panicked_writer_refuses_and_reports_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = writer_with_calls(dir.path(), 3);
        assert!(!writer.has_failed());
        writer.panic_next.store(true, Ordering::Relaxed);
        let refused = writer.submit(call("a", 3)).wait();
        assert!(
            matches!(
                refused.as_ref().map_err(|e| &**e),
                Err(StoreError::WriterGone)
            ),
            "{refused:?}"
        );
        let later = writer.submit(call("a", 4)).wait();
        assert!(
            matches!(
                later.as_ref().map_err(|e| &**e),
                Err(StoreError::WriterGone)
            ),
            "{later:?}"
        );
        // The report follows the unwinding that refused the calls: wait for it.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(5), writer.failed())
                .await
                .expect("failed() resolves after a panic")
        });
        assert!(writer.has_failed());
        writer.shutdown();
        // Not a clean stop: the store is dropped, and the next open folds the journal.
        drop(store);
        let reopened = Store::open(&dir.path().join("kms.redb"), "fp").unwrap();
        let (history, usage, _) = stored(&reopened, "a");
        assert_eq!(
            (history.len(), usage),
            (3, 3),
            "the acknowledged calls, no more"
        );
    }

    /// A store in `dir` with key "a" (version 1) and `n` journaled calls on it.
    fn writer_with_calls(dir: &std::path::Path, n: i64) -> (Store, Writer) {
        let store = Store::open(&dir.join("kms.redb"), "fp").unwrap();
        let writer = store.start_writer().unwrap();
        writer.submit(vec![version_one("a")]).wait().unwrap();
        for t in 0..n {
            writer.submit(call("a", t)).wait().unwrap();
        }
        (store, writer)
    }

    /// (history entries, usage count, encryption count) of key "a" in a copy of `store`
    /// taken as a crash would leave it.
    fn after_crash(store: &Store) -> (usize, u64, u64) {
        let crashed = tempfile::tempdir().unwrap();
        let restored = Store::open(&crash_image(store, crashed.path()), "fp").unwrap();
        let (history, usage, enc) = stored(&restored, "a");
        (history.len(), usage, enc)
    }

    /// A submission nobody waits for (a refusal's history entry) is in redb once `settle`
    /// returns: settle waits for submissions not yet answered, not only for journaled
    /// calls not yet folded. Before, it returned at once while the writer had not yet
    /// taken the submission, and a history read missed it.
    #[test]
    fn settle_covers_submissions_not_yet_answered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kms.redb"), "fp").unwrap();
        let writer = store.start_writer().unwrap();
        writer.submit(vec![version_one("a")]).wait().unwrap();
        for round in 1..=50u64 {
            drop(writer.submit(call("a", round as i64)));
            writer.settle().unwrap();
            assert_eq!(store.history_len().unwrap(), round, "round {round}");
        }
        writer.shutdown();
    }

    /// After a failed commit, settles (a dashboard's history page every second) are
    /// refused for a while without trying: each try reopened and verified the whole store
    /// on the writer thread, and the calls riding the journal waited behind it. Calls go
    /// on meanwhile, and once commits work the writer's own fold catches up.
    #[test]
    fn settles_after_a_failed_commit_are_refused_without_trying() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = writer_with_calls(dir.path(), 3);
        writer.commits_fail.0.store(true, Ordering::Relaxed);
        for _ in 0..5 {
            assert!(writer.settle().is_err());
        }
        assert_eq!(
            writer.commits_fail.1.load(Ordering::Relaxed),
            1,
            "commits tried"
        );
        // Calls are still answered, through the journal.
        writer.submit(call("a", 3)).wait().unwrap();
        writer.commits_fail.0.store(false, Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while writer.settle().is_err() {
            assert!(std::time::Instant::now() < deadline, "never settled");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let (history, usage, _) = stored(&store, "a");
        assert_eq!((history.len(), usage), (4, 4));
        writer.shutdown();
    }

    /// A writer whose last commit failed leaves calls only in the journal: no second
    /// writer starts on them (its first commit would have restarted the journal over
    /// them, losing acknowledged calls); the store opened again folds them.
    #[test]
    fn no_writer_starts_over_calls_left_in_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = writer_with_calls(dir.path(), 3);
        writer.commits_fail.0.store(true, Ordering::Relaxed);
        writer.shutdown();
        assert!(store.start_writer().is_err());
        drop(store);
        let store = Store::open(&dir.path().join("kms.redb"), "fp").unwrap();
        let (history, usage, _) = stored(&store, "a");
        assert_eq!((history.len(), usage), (3, 3));
        let writer = store.start_writer().unwrap();
        writer.shutdown();
    }

    /// `confirm` commits even when nothing is pending (a new header, here seen as a new
    /// journal generation), where `settle` has nothing to do; a confirmation that fails
    /// is reported.
    #[test]
    fn confirm_commits_when_nothing_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = writer_with_calls(dir.path(), 0);
        let generation = || {
            use redb::ReadableDatabase;
            let tx = store.db.get().unwrap().begin_read().unwrap();
            let meta = tx.open_table(META).unwrap();
            meta.get(META_JOURNAL_GENERATION)
                .unwrap()
                .map(|v| v.value().to_vec())
        };
        let before = generation();
        writer.settle().unwrap();
        assert_eq!(
            generation(),
            before,
            "settle committed with nothing pending"
        );
        writer.confirm(None).unwrap();
        let confirmed = generation();
        assert_ne!(confirmed, before, "confirm did not commit");
        writer.land_then_fail.store(2, Ordering::Relaxed);
        assert!(writer.confirm(None).is_err());
        writer.shutdown();
    }

    /// Enough pending calls fold on their own, without a reader or a change asking.
    #[test]
    fn pending_calls_fold_when_enough() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kms.redb"), "fp").unwrap();
        let writer = store.start_writer().unwrap();
        writer.submit(vec![version_one("a")]).wait().unwrap();
        let calls = FOLD_AFTER_OPS / 3 + 10;
        let tickets: Vec<Ticket> = (0..calls)
            .map(|t| writer.submit(call("a", t as i64)))
            .collect();
        for t in tickets {
            t.wait().unwrap();
        }
        // The fold runs after the answers; this call is served after it.
        writer.submit(call("a", 0)).wait().unwrap();
        assert!(
            store.history_len().unwrap() >= (FOLD_AFTER_OPS / 3) as u64,
            "no fold after {calls} calls"
        );
        writer.shutdown();
        assert_eq!(store.history_len().unwrap(), calls as u64 + 1);
    }

    /// Counters summed within a group land once per key with the latest use; a key
    /// expunged later in the same group keeps no counter summed before its removal, while
    /// counters added after it, and other keys' counters, survive.
    #[test]
    fn group_counters_sum_and_respect_expunge() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kms.redb"), "fingerprint").unwrap();
        let writer = store.start_writer().unwrap();
        let enc = |tag: &str, version, n| Mutation::Encryptions {
            tag: tag.into(),
            version,
            n,
        };
        let version = |tag: &str| Mutation::PutVersion {
            tag: tag.into(),
            version: 1,
            record: crate::store::records::VersionRecord {
                created_at: 1,
                enabled: true,
                wrapped: None,
            },
        };
        writer
            .submit(vec![
                version("a"),
                version("gone"),
                uses("a", "alice", 10, 2),
                uses("a", "bob", 30, 1),
                uses("a", "carol", 20, 4),
                enc("a", 1, 5),
                enc("a", 1, 2),
                uses("gone", "alice", 10, 3),
                enc("gone", 1, 3),
                Mutation::Expunge { tag: "gone".into() },
                uses("b", "dave", 5, 1),
            ])
            .wait()
            .unwrap();
        writer.shutdown();
        let snap = store.load().unwrap();
        let usage: std::collections::HashMap<_, _> = snap.usage.into_iter().collect();
        let a = &usage["a"];
        assert_eq!(a.count, 7);
        assert_eq!(
            (a.last_used_at, a.last_used_by.as_deref()),
            (Some(30), Some("bob"))
        );
        assert_eq!(usage["b"].count, 1);
        assert!(!usage.contains_key("gone"), "{usage:?}");
        let counts: Vec<(u32, u64)> = store
            .versions("a")
            .unwrap()
            .iter()
            .map(|v| (v.version, v.encryptions))
            .collect();
        assert_eq!(counts, vec![(1, 7)]);
        assert!(store.versions("gone").unwrap().is_empty());
    }
}
