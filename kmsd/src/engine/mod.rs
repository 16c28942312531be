//! The key engine: the rules of SPEC §2–§5 and §7 over the store, the root key and an
//! in-memory keyring. It never sees a socket; the service layer calls it.
//!
//! Reads (crypto, show, list) take a read lock on the keyring only long enough to clone an
//! `Arc` of the key's entry, then run without locks. Changes to one key are serialised by
//! that key's lock (creation, grants and token registrations by one global lock), so
//! changes to different keys share group commits. All follow one pattern (as Vault's transit engine does): build the
//! new record, commit it durably, and only then publish it in memory and as an event —
//! never mutate memory first and roll back after.
//!
//! Every call that names an existing key leaves a history entry, allowed or refused; its
//! reply waits for that entry to be durable (see [`Pending`]).

mod crypto_ops;
mod error;
mod grants;
mod hsm;
mod keyring;
mod lifecycle;
mod refusals;
pub mod schedule;

pub use error::EngineError;
pub use keyring::{KeyEntry, VersionEntry, VersionsCell};
pub use lifecycle::{wrap_aad, wrap_aad_schema1};

use crate::clock::Clock;
use crate::crypto::RootKey;
use crate::store::key_slots::{self, KeySlots};
use crate::store::records::{DueKind, HistoryRecord};
use crate::store::{HistoryFilter, Mutation, ScanEnd, Store, StoreError, Ticket, Writer};
use keyring::Keyring;
use kms_shared::model::{
    AccountUse, Action, DAY_MS, GrantInfo, HOUR_MS, HistoryEntry, Impact, KeyInfo, KeyState,
    UnixMillis, VersionInfo,
};
use kms_shared::protocol::{
    ErrorKind, Event, EventKind, HistoryPage, HistoryQuery, ResultFilter, history_page_limit,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::{Notify, broadcast};

/// Tunables of the engine. Defaults follow SPEC §3–§5.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Wait between a deletion request and the purge (72 h; never below 1 h).
    pub deletion_delay_ms: i64,
    /// How long a purged key's metadata and history are kept (1 year).
    pub retention_ms: i64,
    /// Encryptions one AES version may make before it is rotated (or, at the version
    /// limit, refused). Far below the 2^32 random-nonce bound of AES-GCM.
    pub nonce_budget: u64,
    /// Buffered events per subscriber before it is told it lagged.
    pub event_buffer: usize,
    /// The daemon's PKCS#11 token for `hsm` keys (none: `hsm` keys are refused).
    pub pkcs11: Option<crate::hsm::DaemonToken>,
    /// History entries one `history` or `impact` request reads at most, matching or not
    /// (PROTOCOL.md §5.7): what bounds the cost of a query on a long history.
    pub history_scan: usize,
    /// The most history entries the store keeps, of all keys: beyond, the oldest go
    /// ([`Engine::cap_history`]), so that a call rate the retention did not foresee does
    /// not fill the disk.
    pub history_max_entries: u64,
}

/// The default of [`EngineConfig::history_max_entries`]: ten million entries, about
/// 5 GB of store as the soak run wrote them (docs/RELIABILITY.md), a year of 0.3 calls a
/// second — or some four minutes at the most this daemon answers.
pub const DEFAULT_HISTORY_MAX_ENTRIES: u64 = 10_000_000;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            deletion_delay_ms: 72 * HOUR_MS,
            retention_ms: 365 * DAY_MS,
            nonce_budget: 1 << 30,
            event_buffer: 1024,
            pkcs11: None,
            history_scan: DEFAULT_HISTORY_SCAN,
            history_max_entries: DEFAULT_HISTORY_MAX_ENTRIES,
        }
    }
}

impl EngineConfig {
    /// The deletion delay actually applied (the 1-hour floor of SPEC §3).
    pub fn effective_deletion_delay(&self) -> i64 {
        self.deletion_delay_ms.max(HOUR_MS)
    }
}

/// Who is calling, as the kernel told the server (never as the client claims).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// The user name of `uid` (or the number if it has no name).
    pub account: String,
    /// Names and gids of the groups the uid belongs to (for group grants), read at
    /// connect time.
    pub groups: Vec<(String, u32)>,
    /// The program name from `/proc/PID/comm`.
    pub client: String,
}

impl Caller {
    /// The daemon itself (the scheduler's rotations and purges).
    pub fn daemon() -> Caller {
        Caller {
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            pid: std::process::id(),
            account: "kmsd".into(),
            groups: Vec::new(),
            client: "kmsd".into(),
        }
    }
}

/// A result whose history entry may not be durable yet. The reply must wait for it:
/// [`Pending::wait`] on a plain thread, [`Pending::wait_async`] in async code.
#[must_use = "the result is not durable until waited for"]
pub struct Pending<T> {
    result: Result<T, EngineError>,
    ticket: Option<Ticket>,
    on_durable: Option<Box<dyn FnOnce() + Send>>,
}

impl<T> Pending<T> {
    fn ready(result: Result<T, EngineError>) -> Self {
        Pending {
            result,
            ticket: None,
            on_durable: None,
        }
    }

    /// A call refused before it ran: nothing to record.
    pub fn failed(e: EngineError) -> Self {
        Pending::ready(Err(e))
    }

    /// The result mapped, the wait unchanged.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Pending<U> {
        Pending {
            result: self.result.map(f),
            ticket: self.ticket,
            on_durable: self.on_durable,
        }
    }

    pub fn wait(self) -> Result<T, EngineError> {
        if let Some(t) = self.ticket {
            t.wait()?;
        }
        if let Some(f) = self.on_durable {
            f();
        }
        self.result
    }

    pub async fn wait_async(self) -> Result<T, EngineError> {
        if let Some(t) = self.ticket {
            t.wait_async().await?;
        }
        if let Some(f) = self.on_durable {
            f();
        }
        self.result
    }

    /// The result now, and what it waits for apart: a reply can be prepared while its
    /// history entry is being written, and sent only once [`Durable::wait`] succeeds.
    pub fn split(self) -> (Result<T, EngineError>, Durable) {
        let durable = Durable {
            ticket: self.ticket,
            on_durable: self.on_durable,
        };
        (self.result, durable)
    }
}

/// The durability half of a [`Pending`] (see [`Pending::split`]).
#[must_use = "the result is not durable until waited for"]
pub struct Durable {
    ticket: Option<Ticket>,
    on_durable: Option<Box<dyn FnOnce() + Send>>,
}

impl Durable {
    /// Nothing to wait for: the reply of a call that wrote nothing, or that waited for
    /// its record itself.
    pub fn done() -> Durable {
        Durable {
            ticket: None,
            on_durable: None,
        }
    }

    pub async fn wait(self) -> Result<(), EngineError> {
        Pending {
            result: Ok(()),
            ticket: self.ticket,
            on_durable: self.on_durable,
        }
        .wait_async()
        .await
    }
}

/// Runs `f`, which waits for a commit, on whatever thread calls. The engine's blocking
/// calls run on the blocking or crypto pools, but a few are reached from code that runs
/// on a tokio worker (the rotation forced by an AES version's nonce budget, inside an AES
/// call on the connection's reader), where tokio refuses a blocking wait with a panic: on
/// the multi-threaded runtime the worker hands its other tasks over first
/// (`block_in_place`); on a single-threaded one `f` runs on a thread of its own while this
/// one waits. Rare (once per 2^30 encryptions of a version), so its cost does not matter;
/// that it never panics and never stalls other connections does.
fn blocking_section<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Err(_) => f(),
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        Ok(_) => std::thread::scope(|s| {
            s.spawn(f)
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }),
    }
}

/// An event as published, with the grants in force then. Who may see it is decided by
/// those, not by the grants when a subscriber's connection gets round to forwarding it:
/// a purge removes the key's grants right after announcing it, and a revoke is announced
/// to the account it was revoked from (see `grants::change_grants`).
#[derive(Debug, Clone)]
pub struct Published {
    pub event: Event,
    pub grants: Arc<Vec<GrantInfo>>,
    /// What a `permission-changed` event is about: who holds which role is told in full
    /// only to those who may list grants and to its grantee.
    pub grant: Option<GrantInfo>,
}

impl std::ops::Deref for Published {
    type Target = Event;

    fn deref(&self) -> &Event {
        &self.event
    }
}

/// The engine. Cheap to share: wrap it in an `Arc`.
pub struct Engine {
    store: Store,
    writer: Writer,
    root: RootKey,
    /// The slot secrets of `basic` keys (`store::key_slots`).
    slots: KeySlots,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    keyring: RwLock<Keyring>,
    /// Serialises lifecycle changes (build → commit → publish).
    lifecycle: Mutex<()>,
    /// One lock per key for changes to that key: changes to different keys run at once
    /// and share group commits; changes to one key stay serialised.
    key_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    events: broadcast::Sender<Published>,
    event_seq: AtomicU64,
    /// Versions (tag, version) whose spent nonce budget could not be rotated away (the
    /// version limit), announced in this run: once each per run, at the first refused
    /// encryption, whatever the count (a restore sets it past the budget). Events are
    /// not kept, so a dashboard that connects after a restart hears it again then.
    budget_announced: Mutex<std::collections::HashSet<(String, u32)>>,
    /// Woken whenever the earliest due date may have changed.
    due_changed: Arc<Notify>,
    /// Scheduled tasks that failed, and when each may be tried again.
    due_retries: Mutex<schedule::Retries>,
    /// Deletions requested in this run, by tag: when their wait ends on the clock a step
    /// of the wall clock does not move ([`Clock::elapsed_ms`]). See [`Engine::run_due`].
    deletion_waits: Mutex<HashMap<String, i64>>,
    /// The wall clock's lead over the clock a step does not move (`now - elapsed`) at the
    /// last scheduler pass: a drop is the wall clock set back ([`Engine::run_due`]).
    wall_lead: Mutex<Option<i64>>,
    /// Refusals counted, to be recorded together ([`refusals`]).
    refusals: refusals::Refusals,
    /// Grants, swapped whole on change so checks never wait.
    grants: RwLock<Arc<Vec<GrantInfo>>>,
    /// Orders changes made under a manager's role against grant changes: see
    /// [`Engine::grants_in_force`].
    grants_gate: RwLock<()>,
    /// Tests: callers waiting for `grants_gate`.
    #[cfg(test)]
    gate_waiting: std::sync::atomic::AtomicUsize,
    /// The highest grant id ever given (ids are never reused; see the store's meta).
    last_grant_id: AtomicU64,
    /// The daemon's PKCS#11 token and the dedicated ones managers registered.
    hsm: crate::hsm::Registry,
}

impl Engine {
    /// Opens the engine on a store: loads every key's metadata (material is unwrapped on
    /// first use) and starts the writer.
    pub fn open(
        store: Store,
        root: RootKey,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
    ) -> Result<Engine, EngineError> {
        let mut snapshot = store.load()?;
        // The slot file agrees with the keys before anything else: a slot no key refers
        // to (a purge or a create that a crash cut short) is wiped here, if it is one of
        // this store's keys (see `KeySlots::open`).
        let referenced = key_slots::referenced(
            snapshot
                .keys
                .iter()
                .filter_map(|k| k.slot.map(|slot| (slot, k.tag.clone()))),
        )
        .map_err(StoreError::from)?;
        let known: Vec<&str> = snapshot.keys.iter().map(|k| k.tag.as_str()).collect();
        let (slots, sweep) =
            KeySlots::open(&key_slots::path_for(store.path()), &referenced, &known)
                .map_err(StoreError::from)?;
        drop(known);
        if sweep.wiped > 0 || sweep.repaired > 0 {
            tracing::info!(
                wiped = sweep.wiped,
                repaired = sweep.repaired,
                "key slot file brought in line with the keys"
            );
        }
        if sweep.kept > 0 {
            tracing::warn!(
                slots = sweep.kept,
                "the key slot file holds secrets of keys this store does not know (another \
                 copy of this store, or creates a crash cut short): kept, not wiped"
            );
        }
        // A wrap that fails here fails the open (`StoreError::Upgrade`) with the store
        // untouched, at its old schema: the next start tries again. Going on without that
        // version would lose it for good (see `Store::upgrade_wraps`).
        let upgraded = store.upgrade_wraps(
            |tags| {
                slots
                    .allocate(tags)
                    .map(|got| got.into_iter().map(|(i, _)| i).collect())
            },
            |from, rec, version, wrapped| {
                lifecycle::rewrap_for_slots(&root, &slots, from, rec, version, wrapped)
            },
        )?;
        if let Some(done) = upgraded {
            tracing::info!(
                from = done.from,
                rewrapped = done.rewrapped,
                unopened = done.unopened,
                "store upgraded to schema 3: every basic key's material re-wrapped under its own \
                 slot, so that a purge destroys it"
            );
            snapshot = store.load()?;
        }
        let mut grants = std::mem::take(&mut snapshot.grants);
        let bound = Engine::bind_principal_ids(&mut grants);
        let last_grant_id = snapshot.last_grant_id;
        let hsm = crate::hsm::Registry::open(
            config.pkcs11.as_ref(),
            std::mem::take(&mut snapshot.hsm_tokens),
        )?;
        let stored_due: std::collections::BTreeSet<_> =
            std::mem::take(&mut snapshot.due).into_iter().collect();
        let keyring = Keyring::from_snapshot(snapshot, config.retention_ms, |name| {
            store.name_holder(name)
        })?;
        let writer = store.start_writer()?;
        let repair: Vec<Mutation> =
            stored_due
                .difference(&keyring.due)
                .map(|(at, tag, kind)| Mutation::RemoveDue {
                    at: *at,
                    tag: tag.clone(),
                    kind: *kind,
                })
                .chain(keyring.due.difference(&stored_due).map(|(at, tag, kind)| {
                    Mutation::AddDue {
                        at: *at,
                        tag: tag.clone(),
                        kind: *kind,
                    }
                }))
                .collect();
        if !repair.is_empty() {
            tracing::info!(
                entries = repair.len(),
                "due index brought in line with the keys (retention changed, or rows left over)"
            );
            // Engine::open runs on kmsd's runtime, where a blocking wait panics.
            blocking_section(|| writer.submit(repair).wait())?;
        }
        if !bound.is_empty() {
            tracing::info!(
                grants = bound.len(),
                "grants bound to the uid or gid their name has (made before kmsd recorded it)"
            );
            blocking_section(|| writer.submit(bound).wait())?;
        }
        let (events, _) = broadcast::channel(config.event_buffer.max(16));
        Ok(Engine {
            store,
            writer,
            root,
            slots,
            clock,
            config,
            keyring: RwLock::new(keyring),
            lifecycle: Mutex::new(()),
            key_locks: Mutex::default(),
            events,
            event_seq: AtomicU64::new(1),
            budget_announced: Mutex::default(),
            due_changed: Arc::new(Notify::new()),
            due_retries: Mutex::default(),
            deletion_waits: Mutex::default(),
            wall_lead: Mutex::default(),
            refusals: refusals::Refusals::default(),
            grants: RwLock::new(Arc::new(grants)),
            grants_gate: RwLock::new(()),
            #[cfg(test)]
            gate_waiting: std::sync::atomic::AtomicUsize::new(0),
            last_grant_id: AtomicU64::new(last_grant_id),
            hsm,
        })
    }

    /// Stops the writer after it has committed everything queued, and returns the store
    /// (to [`Store::close`] it; dropping it closes it too, without recording a clean stop).
    pub fn close(self) -> Store {
        // Queued, not waited for (this may run on the async runtime): the writer commits
        // everything queued before it stops.
        let counted = self.refusals.all();
        if !counted.is_empty() {
            drop(
                self.writer
                    .submit(counted.into_iter().map(counted_refusals).collect()),
            );
        }
        let Engine { store, writer, .. } = self;
        writer.shutdown();
        store
    }

    /// Resolves if the store's writer thread dies (a bug): from then on no call can be
    /// answered durably, and the daemon stops rather than refuse everything.
    pub async fn writer_failed(&self) {
        self.writer.failed().await
    }

    pub fn now(&self) -> UnixMillis {
        self.clock.now()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Writes a backup of the store to `path` ([`Store::snapshot_to`]), with every key's
    /// slot secret wrapped under the root key. Call [`Engine::settle`] first. Blocks.
    pub fn snapshot_to(&self, path: &std::path::Path) -> Result<u64, StoreError> {
        let seal = |tag: &str, secret: &key_slots::SlotSecret| {
            self.root
                .wrap(
                    &crate::store::backup::slot_secret_aad(tag),
                    secret.as_slice(),
                )
                .map_err(|e| format!("cannot wrap the slot secret of key {tag}: {e}"))
        };
        self.store.snapshot_to(path, &self.slots, &seal)
    }

    /// Waits until every call acknowledged so far is in the store's redb file, not only in
    /// its journal: before reading history from the store or copying it. Blocks.
    pub fn settle(&self) -> Result<(), EngineError> {
        self.writer.settle().map_err(EngineError::from)
    }

    /// A new subscription to the engine's events.
    pub fn subscribe(&self) -> broadcast::Receiver<Published> {
        self.events.subscribe()
    }

    /// Notified when the earliest due date may have changed.
    pub fn due_changed(&self) -> Arc<Notify> {
        self.due_changed.clone()
    }

    /// The earliest due date of any scheduled rotation, purge or expiry (for one that
    /// failed, when it may be tried again).
    pub fn next_due(&self) -> Option<UnixMillis> {
        let ring = self.ring();
        self.due_retries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next(&ring.due, self.now(), self.clock.elapsed_ms())
    }

    /// When the scheduler should wake next: the earliest due date ([`Engine::next_due`]),
    /// or the end of a window of refusals counted and not yet recorded, if sooner.
    pub fn next_wake(&self) -> Option<UnixMillis> {
        let refusals = self
            .refusals
            .next_over(self.clock.elapsed_ms())
            // At least a millisecond on: a window over now is recorded by a pass right
            // after, not after the scheduler's retry pause (`RETRY`) for a date passed.
            .map(|ms| self.now().saturating_add(ms.max(1)));
        match (self.next_due(), refusals) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Tests: whether refusals are counted and not yet recorded.
    #[cfg(test)]
    pub(crate) fn refusals_pending(&self) -> bool {
        self.refusals.next_over(self.clock.elapsed_ms()).is_some()
    }

    /// Tests: holds every commit back while `held` ([`Writer::hold_commits`]).
    #[cfg(test)]
    pub(crate) fn hold_commits(&self, held: bool) {
        self.writer.hold_commits(held);
    }

    /// Number of keys not purged.
    pub fn live_keys(&self) -> u64 {
        self.ring().by_name.len() as u64
    }

    /// Keys of every state, purged ones within retention included: the most a list holds.
    pub fn all_keys(&self) -> usize {
        self.ring().by_tag.len()
    }

    /// The change lock of one key (by tag).
    fn key_lock(&self, tag: &str) -> Arc<Mutex<()>> {
        self.key_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tag.to_string())
            .or_default()
            .clone()
    }

    fn ring(&self) -> std::sync::RwLockReadGuard<'_, Keyring> {
        self.keyring.read().unwrap_or_else(|e| e.into_inner())
    }

    fn ring_mut(&self) -> std::sync::RwLockWriteGuard<'_, Keyring> {
        self.keyring.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds a key by tag or name. Purged keys are found by tag only (their name is free).
    pub fn resolve(&self, key: &str) -> Result<Arc<KeyEntry>, EngineError> {
        self.ring().resolve(key).ok_or_else(|| not_found(key))
    }

    /// The key as clients see it.
    pub fn info(&self, entry: &KeyEntry) -> KeyInfo {
        entry.info()
    }

    /// `show`: one key.
    pub fn get_key(&self, key: &str) -> Result<KeyInfo, EngineError> {
        Ok(self.resolve(key)?.info())
    }

    /// `list`: keys ordered by name, one page, and the number of matching keys.
    pub fn list_keys(
        &self,
        deleted: bool,
        offset: usize,
        limit: Option<usize>,
    ) -> (Vec<KeyInfo>, u64) {
        let (page, total) = self
            .ring()
            .list(deleted, offset, limit.unwrap_or(usize::MAX));
        (page.iter().map(|e| e.info()).collect(), total)
    }

    /// `list` for a caller who may see only the keys with these tags.
    pub fn list_keys_of(
        &self,
        tags: &std::collections::BTreeSet<String>,
        offset: usize,
        limit: usize,
    ) -> (Vec<KeyInfo>, u64) {
        let (page, total) = self.ring().list_of(tags, offset, limit);
        (page.iter().map(|e| e.info()).collect(), total)
    }

    /// `versions`: every version of a key.
    pub fn versions(&self, key: &str) -> Result<Vec<VersionInfo>, EngineError> {
        let entry = self.resolve(key)?;
        self.version_infos(&entry)
    }

    fn version_infos(&self, entry: &KeyEntry) -> Result<Vec<VersionInfo>, EngineError> {
        Ok(self.versions_of(entry)?.iter().map(|v| v.info()).collect())
    }

    /// A key's versions (index = version - 1), read from the store on the key's first use.
    fn versions_of<'a>(&self, e: &'a KeyEntry) -> Result<&'a [Arc<VersionEntry>], EngineError> {
        e.versions.get_or_load(|| {
            let stored = self.store.versions(&e.rec.tag)?;
            Ok::<_, EngineError>(
                stored
                    .into_iter()
                    .map(|s| Arc::new(VersionEntry::from_stored(s)))
                    .collect(),
            )
        })
    }

    /// Version `v` of a key, if it has one.
    fn version_of<'a>(
        &self,
        e: &'a KeyEntry,
        v: u32,
    ) -> Result<Option<&'a Arc<VersionEntry>>, EngineError> {
        Ok(keyring::find_version(self.versions_of(e)?, v))
    }

    /// The current version of a key (`None` only in a store damaged past decoding).
    fn current_of<'a>(&self, e: &'a KeyEntry) -> Result<&'a Arc<VersionEntry>, EngineError> {
        self.version_of(e, e.rec.current_version)?
            .ok_or_else(|| EngineError::InvalidState("key has no current version".into()))
    }

    /// `history`: the entries of one page ([`Engine::history_page`]).
    pub fn history(&self, q: &HistoryQuery) -> Result<Vec<HistoryEntry>, EngineError> {
        self.history_page(q).map(|page| page.entries)
    }

    /// `history`: newest first, paged, filtered; at most `history_scan` entries are read,
    /// and if that stops the page short, it says where to go on.
    pub fn history_page(&self, q: &HistoryQuery) -> Result<HistoryPage, EngineError> {
        self.record_counted_refusals(self.refusals.counts(self.clock.elapsed_ms()));
        let entry = self.resolve(&q.key)?;
        let filter = HistoryFilter {
            limit: history_page_limit(q.limit),
            before_seq: q.before_seq,
            action: q.action,
            ok: q.result.map(|r| r == ResultFilter::Ok),
            since: q.since,
            max_scan: Some(self.config.history_scan.max(1)),
        };
        let tag = &entry.rec.tag;
        self.settle()?;
        let (rows, end) = self.store.history(tag, &filter)?;
        let entries = rows
            .into_iter()
            .map(|(seq, r)| HistoryEntry {
                seq,
                time: r.time,
                key_tag: tag.clone(),
                action: r.action,
                version: r.version,
                result: r.result,
                account: r.account,
                uid: r.uid,
                pid: r.pid,
                client: r.client,
                items: r.items,
                failed: r.failed,
            })
            .collect();
        Ok(HistoryPage {
            entries,
            resume_before_seq: match end {
                ScanEnd::Done => None,
                ScanEnd::ResumeBefore(seq) => Some(seq),
            },
        })
    }

    /// Recent successful crypto use of a key and who made it (the warning before a
    /// disable or a deletion request).
    pub fn impact(&self, key: &str, window_ms: Option<i64>) -> Result<Impact, EngineError> {
        let entry = self.resolve(key)?;
        let since = self.now() - window_ms.unwrap_or(30 * DAY_MS).max(0);
        // Not filtered on `ok`: a batch with one failed item still made successful calls.
        let filter = HistoryFilter {
            limit: usize::MAX,
            since: Some(since),
            max_scan: Some(self.config.history_scan.max(1)),
            ..HistoryFilter::default()
        };
        let mut per_account: HashMap<String, (u64, UnixMillis)> = HashMap::new();
        let mut recent = 0;
        let mut oldest_read = None;
        self.settle()?;
        // Visited, not collected: a busy key's 30 days can be millions of entries.
        let end = self.store.visit_history(&entry.rec.tag, &filter, |_, r| {
            oldest_read = Some(oldest_read.map_or(r.time, |t: UnixMillis| t.min(r.time)));
            let uses = r.succeeded();
            if !r.action.is_crypto() || uses == 0 {
                return;
            }
            recent += uses;
            let e = per_account.entry(r.account).or_insert((0, r.time));
            e.0 += uses;
            e.1 = e.1.max(r.time);
        })?;
        let mut accounts: Vec<AccountUse> = per_account
            .into_iter()
            .map(|(account, (uses, last_used_at))| AccountUse {
                account,
                uses,
                last_used_at,
            })
            .collect();
        accounts.sort_by(|a, b| b.uses.cmp(&a.uses).then(a.account.cmp(&b.account)));
        Ok(Impact {
            key_tag: entry.rec.tag.clone(),
            since,
            recent_uses: recent,
            last_used_at: entry.usage.last_used_at(),
            accounts,
            counted_back_to: match end {
                ScanEnd::Done => None,
                // Stopped at the bound: the window was counted back to the oldest entry
                // counted (none: only entries of the slack before `since` were read).
                ScanEnd::ResumeBefore(_) => Some(oldest_read.unwrap_or(since)),
            },
        })
    }

    /// Carries out everything due at the engine clock's `now`: automatic rotations,
    /// purges at the end of the deletion wait, expiry of purged keys' metadata. Returns
    /// how many entries were handled. A failed task is logged and tried again after 1 s,
    /// 2 s, 4 s, … up to an hour ([`schedule::Retries`]), not on every call.
    ///
    /// At the first pass after the wall clock was seen set back while kmsd runs, rotation
    /// periods that started while it ran ahead start again now
    /// ([`Engine::restart_rotations_dated_ahead`]): left as they were, each would stall for
    /// as long as the clock had been ahead. (Not at the first pass after a start: see
    /// `wall_clock_set_back`.)
    pub fn run_due(&self) -> usize {
        self.run_due_until(&|| false)
    }

    /// [`Engine::run_due`], stopping before the next task once `stop` says so: a stop
    /// requested during a long catch-up (thousands of overdue rotations) is not held up
    /// past the service manager's stop timeout. What is left stays due for the next run.
    pub fn run_due_until(&self, stop: &dyn Fn() -> bool) -> usize {
        if self.wall_clock_set_back() {
            self.restart_rotations_dated_ahead();
        }
        self.run_due_of(|_| true, stop)
    }

    /// Whether the wall clock was set back (by more than a minute) since the last call.
    /// False at the first, which cannot tell a clock that was ahead and has been
    /// corrected from one that is behind now (a machine without a real-time clock,
    /// started before its time is set): restarting periods then would make every
    /// automatic key rotate early once the clock is right, at every such start. So a
    /// period begun while the clock ran ahead and corrected while kmsd was down still
    /// waits out the difference (docs/RELIABILITY.md, known limits).
    fn wall_clock_set_back(&self) -> bool {
        const STEP_MS: i64 = 60_000;
        let lead = self.now().saturating_sub(self.clock.elapsed_ms());
        let mut last = self.wall_lead.lock().unwrap_or_else(|e| e.into_inner());
        let back = last.is_some_and(|before| lead < before.saturating_sub(STEP_MS));
        *last = Some(lead);
        back
    }

    /// [`Engine::run_due`] for the purges at the end of the deletion wait only: what kmsd
    /// catches up on before it serves, so that no client can cancel (or see as pending)
    /// a deletion whose wait ended while kmsd was down. Overdue rotations and the rest
    /// wait for the scheduler's first pass, after kmsd is ready: thousands of them take
    /// tens of seconds, and a service manager would time the start out.
    pub fn run_due_deletions(&self) -> usize {
        self.run_due_of(|kind| kind == DueKind::Deletion, &|| false)
    }

    fn run_due_of(&self, pick: impl Fn(DueKind) -> bool, stop: &dyn Fn() -> bool) -> usize {
        self.record_counted_refusals(self.refusals.over(self.clock.elapsed_ms()));
        let (now, elapsed) = (self.now(), self.clock.elapsed_ms());
        let due = schedule::due_at(&self.ring().due, now);
        let retries = || self.due_retries.lock().unwrap_or_else(|e| e.into_inner());
        let mut done = 0;
        for (at, tag, kind) in due.into_iter().filter(|(_, _, kind)| pick(*kind)) {
            if stop() {
                break;
            }
            if !retries().ready(&tag, kind, elapsed) {
                continue;
            }
            // A deletion requested in this run is purged only once its whole wait has
            // passed, not when the wall clock says so: a clock stepped forward (a machine
            // without a real-time clock setting its time after the request) would
            // otherwise destroy the key at once, with no time left to cancel. Deletions
            // from an earlier run have only their stored date to go by.
            if kind == DueKind::Deletion
                && let Some(left) = self.deletion_wait_left(&tag)
            {
                tracing::info!(key = %tag, left_ms = left, "the wall clock moved ahead of the deletion wait; the purge waits it out");
                retries().wait(&tag, kind, elapsed.saturating_add(left));
                continue;
            }
            // `Ok(false)`: the key changed since this pass listed the task (see
            // `change_key_if`); nothing to do, nothing recorded.
            let r = match kind {
                DueKind::Rotation => self.auto_rotate(&tag, at, now).map(|e| e.is_some()),
                DueKind::Deletion => self.purge_due(&tag).map(|e| e.is_some()),
                DueKind::Expiry => self.expire(&tag).map(|()| true),
                DueKind::DestroyObjects => self.destroy_token_objects(&tag).map(|_| true),
            };
            match r {
                Ok(carried_out) => {
                    retries().forget(&tag, kind);
                    if kind == DueKind::Deletion && carried_out {
                        self.set_deletion_wait(&tag, None);
                    }
                    done += usize::from(carried_out);
                }
                Err(e) => {
                    tracing::warn!(key = %tag, ?kind, error = %e, "scheduled task failed");
                    retries().failed(&tag, kind, elapsed);
                }
            }
        }
        done
    }

    /// How much of the deletion wait of `tag`, requested in this run, is still to pass
    /// on the clock a wall-clock step does not move; `None` if none is (or it was not
    /// requested in this run).
    fn deletion_wait_left(&self, tag: &str) -> Option<i64> {
        let ends = *self
            .deletion_waits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tag)?;
        let left = ends.saturating_sub(self.clock.elapsed_ms());
        (left > 0).then_some(left)
    }

    /// Remembers (`Some`: when it ends) or forgets the deletion wait of `tag`.
    fn set_deletion_wait(&self, tag: &str, ends: Option<i64>) {
        let mut waits = self
            .deletion_waits
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match ends {
            Some(at) => waits.insert(tag.to_owned(), at),
            None => waits.remove(tag),
        };
    }

    /// Brings the history under [`EngineConfig::history_max_entries`] if it holds more:
    /// down to nine tenths of it, old entries of crypto calls first, then, if that left
    /// more than the cap, any old entries ([`Mutation::CapHistory`]); a cheap look when it
    /// clearly holds less. In rounds of one commit each, so that calls go on between them; stops
    /// between rounds when `stopping` says so. Returns how many entries were removed.
    /// Blocks.
    pub fn cap_history(&self, stopping: &dyn Fn() -> bool) -> Result<u64, EngineError> {
        let max = self.config.history_max_entries;
        // Calls still in the journal may hold entries too (each commit folds them first,
        // then counts exactly).
        if self
            .store
            .history_len()?
            .saturating_add(self.writer.unfolded())
            <= max
        {
            return Ok(0);
        }
        let keep = max - max / 10;
        let (mut removed, mut undecodable) = (0, 0);
        let walked = self.cap_walks(keep, max, stopping, &mut removed, &mut undecodable);
        // Logged whatever happened: rounds that committed before a failure removed entries.
        if removed > 0 {
            tracing::warn!(
                removed,
                max_entries = max,
                "the history held more than history_max_entries entries: its oldest were \
                 removed, crypto calls first"
            );
        }
        if undecodable > 0 {
            tracing::warn!(undecodable, "history entries that could not be decoded");
        }
        walked.map(|()| removed)
    }

    /// The walks of [`Engine::cap_history`]: calls first, down to `keep`; then, if that
    /// left the history above the middle of `keep` and `max` (what was done to keys, on
    /// its own, fills it), anything old, down to `keep` — so that a history of mostly
    /// such entries is not walked again every minute for the few calls among them.
    fn cap_walks(
        &self,
        keep: u64,
        max: u64,
        stopping: &dyn Fn() -> bool,
        removed: &mut u64,
        undecodable: &mut u64,
    ) -> Result<(), EngineError> {
        let middle = keep + (max - keep) / 2;
        for calls_only in [true, false] {
            let round = Arc::new(Mutex::new(crate::store::CapRound::default()));
            let len = loop {
                let stop = stopping();
                let done = if stop {
                    Ok(())
                } else {
                    self.writer
                        .submit(vec![Mutation::CapHistory {
                            keep,
                            calls_only,
                            scan: crate::store::writer::CAP_SCAN,
                            round: round.clone(),
                        }])
                        .wait()
                        .map_err(EngineError::from)
                };
                let r = round.lock().unwrap_or_else(|e| e.into_inner());
                if stop || done.is_err() || r.walked || r.len <= keep {
                    *removed += r.removed;
                    *undecodable += r.undecodable;
                    done?;
                    if stop {
                        return Ok(());
                    }
                    break r.len;
                }
            };
            if len <= middle {
                break;
            }
        }
        Ok(())
    }

    /// Drops history entries older than the retention period (SPEC §7: disk use stays
    /// bounded). Purged keys' own history goes with their expiry.
    pub fn prune_history(&self) -> Result<(), EngineError> {
        let now = self.now();
        let before = now.saturating_sub(self.config.retention_ms);
        self.writer
            .submit(vec![Mutation::PruneHistory { before, now }])
            .wait()
            .map_err(EngineError::from)
    }

    /// Records a refusal decided outside the engine (access control) in the key's
    /// history; resolves when durable. Unknown keys have no history to write to.
    pub fn record_refusal(
        &self,
        caller: &Caller,
        key: &str,
        action: Action,
        kind: ErrorKind,
    ) -> Option<Ticket> {
        let entry = self.resolve(key).ok()?;
        let tag = &entry.rec.tag;
        let now = self.now();
        let Some(over) =
            self.refusals
                .refused(caller, tag, action, kind, now, self.clock.elapsed_ms())
        else {
            // Counted: the scheduler records the count once its window is over, not at
            // its next pass up to a minute on, which a crash meanwhile made lose it.
            if self.refusals.take_wake() {
                self.due_changed.notify_one();
            }
            return None;
        };
        let mut batch: Vec<Mutation> = over.into_iter().map(counted_refusals).collect();
        batch.push(history_mutation(tag, now, caller, action, None, Some(kind)));
        Some(self.writer.submit(batch))
    }

    /// Records refusals that were counted, not recorded one by one ([`refusals`]), and
    /// waits until they are durable (so that history read afterwards has them). Blocks:
    /// call it off the async runtime (the scheduler's pass is).
    fn record_counted_refusals(&self, counted: Vec<refusals::Counted>) {
        if counted.is_empty() {
            return;
        }
        let batch = counted.into_iter().map(counted_refusals).collect();
        if let Err(e) = self.writer.submit(batch).wait() {
            tracing::warn!(error = %e, "refusals counted together could not be recorded");
        }
    }

    /// Publishes an event; never waits (a full subscriber lags instead).
    fn publish(
        &self,
        kind: EventKind,
        entry: &KeyEntry,
        version: Option<u32>,
        caller: &Caller,
        message: String,
    ) {
        self.publish_about(kind, Some(entry), version, caller, message, None);
    }

    /// Publishes an event about a key, or (`None`) about none in particular. A grant
    /// change gives the grant it is about and the grants that decide who is shown it
    /// (else those in force now).
    fn publish_about(
        &self,
        kind: EventKind,
        entry: Option<&KeyEntry>,
        version: Option<u32>,
        caller: &Caller,
        message: String,
        grant: Option<(GrantInfo, Arc<Vec<GrantInfo>>)>,
    ) {
        let event = Event {
            seq: self.event_seq.fetch_add(1, Ordering::Relaxed),
            time: self.now(),
            kind,
            key_tag: entry.map(|e| e.rec.tag.clone()),
            key_name: entry.map(|e| e.rec.name.clone()),
            version,
            state: entry.map(|e| e.rec.state),
            account: caller.account.clone(),
            message,
        };
        tracing::info!(
            event = kind.as_str(),
            key = event.key_name.as_deref(),
            tag = event.key_tag.as_deref(),
            version,
            account = %caller.account,
            "{}",
            event.message
        );
        let (grant, grants) = match grant {
            Some((grant, seen_by)) => (Some(grant), seen_by),
            None => (None, self.grants()),
        };
        // No subscribers is not an error.
        let _ = self.events.send(Published {
            event,
            grants,
            grant,
        });
    }
}

/// `not-found` for a key named `key`: quoted with control characters escaped, cut at
/// 80 characters (a 100 KB name came back whole), and saying where a purged key is.
pub(crate) fn not_found(key: &str) -> EngineError {
    const SHOWN: usize = 80;
    let shown: String = key.chars().take(SHOWN).collect();
    let cut = if shown.len() < key.len() { "…" } else { "" };
    EngineError::NotFound(format!(
        "no key named or tagged {shown:?}{cut} (a purged key is found by its tag only: \
         list --deleted)"
    ))
}

/// The history entry of one call; `error` is `None` for success.
fn history_mutation(
    tag: &str,
    now: UnixMillis,
    caller: &Caller,
    action: Action,
    version: Option<u32>,
    error: Option<ErrorKind>,
) -> Mutation {
    Mutation::History {
        tag: tag.to_string(),
        record: HistoryRecord {
            time: now,
            action,
            version,
            result: error.map_or("ok", ErrorKind::as_str).to_string(),
            account: caller.account.clone(),
            uid: caller.uid,
            pid: caller.pid,
            client: caller.client.clone(),
            items: 1,
            failed: u32::from(error.is_some()),
        },
    }
}

/// The history entry of refusals counted together: one entry, `items` and `failed` the
/// count.
fn counted_refusals(c: refusals::Counted) -> Mutation {
    let mut m = history_mutation(&c.tag, c.at, &c.caller, c.action, None, Some(c.kind));
    if let Mutation::History { record, .. } = &mut m {
        (record.items, record.failed) = (c.n, c.n);
    }
    m
}

/// A key is usable for crypto only when enabled (SPEC §3).
fn require_enabled(entry: &KeyEntry) -> Result<(), EngineError> {
    match entry.rec.state {
        KeyState::Enabled => Ok(()),
        other => Err(EngineError::InvalidState(format!(
            "key {} is {other}; cryptographic operations need an enabled key",
            entry.rec.name
        ))),
    }
}

/// History entries a `history` or `impact` request reads at most, unless configured
/// (`history_scan`). Reading one costs ~0.3 µs on the reference VM, decoding included
/// (an `impact` reading 100,000 took 30 ms), so a request costs at most ~0.3 s of one
/// core however long the key's history; an `impact` on a key used once a second sees
/// about 11 days of it.
pub const DEFAULT_HISTORY_SCAN: usize = 1_000_000;
