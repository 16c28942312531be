//! The redb key store: the only module that knows redb.
//!
//! # Durability
//!
//! Every write goes through the [`writer`]: one thread owns all write transactions, and
//! each transaction commits with `Durability::Immediate` and two-phase commit. A write is
//! acknowledged (its [`Ticket`] resolves) only after it is durable. So:
//!
//! - a lifecycle change (create, rotate, state, version flag, settings) is committed to
//!   redb before the engine publishes it in memory or answers the caller;
//! - a history entry and the usage/encryption counters of a crypto call are durable before
//!   the call is answered; many calls share one write (group commit). Calls are first
//!   written to the [`journal`] beside the store (one `fdatasync` per group, a SHA-256 per
//!   record) and folded into redb in batches, always before any other change is committed
//!   and before history is read; opening the store folds what a crash left there;
//! - a crash at any instant leaves the last committed transaction; with two-phase commit
//!   the commit slot is never half-written (no reliance on checksums, which a crafted
//!   history entry could collide). The reopen after a crash runs redb's full repair,
//!   which verifies every page's checksum (quick repair is off: see `writer`).
//!
//! A clean stop is recorded next to the file ([`clean_stop`]) so that the next open can
//! skip redb's full integrity check when the file is untouched since; every other open
//! checks every page before anything is served.
//!
//! The root key never enters this file: versions hold only wrapped material, under a key
//! derived from the root key and the key's slot secret, which lives beside the file
//! ([`key_slots`]) so that a purge can destroy it in place; the meta table holds a
//! fingerprint of the root key so that a store is never opened with the wrong one.

pub mod backup;
pub mod clean_stop;
mod handle;
pub mod journal;
pub mod key_slots;
pub mod records;
pub mod writer;

use kms_shared::model::{Action, Protection, UnixMillis};
use records::{
    DueKind, HistoryRecord, HsmTokenRecord, KeyRecord, UsageRecord, VersionRecord, decode,
    encode_map,
};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use writer::{CapRound, Held, Mutation, Ticket, Writer};

/// redb's page cache. redb keeps every page it writes in this cache (default 1 GiB), so
/// with the default the daemon's memory would grow with its history until it held a
/// gigabyte; the hot set (the newest history pages, counters, the tree roots; keys, and
/// the versions of keys in use, live in the engine's memory) is far smaller.
const CACHE_BYTES: usize = 16 << 20;

/// The schema this build writes. Older schemas are migrated on open; newer are refused.
///
/// - 1: the first.
/// - 2: wrapped key material is bound to its key's type as well as its tag and version
///   (`engine::wrap_aad`). The records are encoded as in schema 1.
/// - 3: every `basic` key has a slot in the key slot file ([`key_slots`]) and its versions
///   are wrapped under a key derived from the root key and that slot's secret, which a
///   purge wipes (crypto-shredding). Key records gain `slot`.
///
/// A store of an older schema is re-wrapped once, when the engine opens it
/// ([`Store::upgrade_wraps`]).
pub const SCHEMA_VERSION: u64 = 3;

/// meta: small named values (schema version, root-key fingerprint, history sequence).
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// keys: tag → KeyRecord.
pub(crate) const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
/// names: name → tag, for keys not yet purged (names are unique among those).
pub(crate) const NAMES: TableDefinition<&str, &str> = TableDefinition::new("names");
/// versions: (tag, version) → VersionRecord.
pub(crate) const VERSIONS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("versions");
/// due: (due time, tag, DueKind) → (): what the scheduler must do, ordered by time.
pub(crate) const DUE: TableDefinition<(i64, &str, u8), ()> = TableDefinition::new("due");
/// history: (tag, seq) → HistoryRecord; newest last within a key.
pub(crate) const HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("history");
/// usage: tag → UsageRecord.
pub(crate) const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("usage");
/// encryptions: (tag, version) → encryptions made (the AES-GCM nonce budget).
pub(crate) const ENCRYPTIONS: TableDefinition<(&str, u32), u64> =
    TableDefinition::new("encryptions");
/// grants: id → grant record (filled by access control).
pub(crate) const GRANTS: TableDefinition<u64, &[u8]> = TableDefinition::new("grants");
/// hsm_tokens: name → HsmTokenRecord (dedicated HSM tokens managers registered).
pub(crate) const HSM_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("hsm_tokens");

const META_SCHEMA: &str = "schema_version";
const META_ROOT: &str = "root_key_fingerprint";
pub(crate) const META_HISTORY_SEQ: &str = "history_seq";
/// The highest grant id ever given: ids are not reused after a revoke (a client that
/// remembers a grant by id must never find another grant under it).
pub(crate) const META_LAST_GRANT_ID: &str = "last_grant_id";
/// Set by the commit of a schema upgrade that re-wrapped material, until the store has
/// been written afresh into a new file ([`Store::upgrade_wraps`]); absent from that file.
pub(crate) const META_REWRITE_PENDING: &str = "rewrite_pending";
/// The generation of the call journal's live records ([`journal`]). A backup leaves it
/// out, so a restored store never adopts the journal beside it.
pub(crate) const META_JOURNAL_GENERATION: &str = "journal_generation";

/// How far out of time order history entries may be. An entry's sequence number is
/// given by the writer, its time when its call started: two calls racing (or a batch
/// that took long) are numbered in another order than they began, by up to the time a
/// call takes; refusals counted together are recorded up to a window and a scheduler
/// pass (~61 s) after the last of them, which dates their entry (`engine::refusals`).
/// Two minutes cover that with room to spare; a walk that stops at the first entry
/// outside a time window goes on for that much further.
pub(crate) const HISTORY_TIME_SLACK_MS: i64 = 120_000;

/// Why the store could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the key store {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error(
        "the key store {path} was written with a different root key (fingerprint {stored}, \
         this root key is {given}); refusing to open it"
    )]
    WrongRootKey {
        path: PathBuf,
        stored: String,
        given: String,
    },
    #[error("the key store {path} has schema {found}, newer than this kmsd's {supported}")]
    TooNew {
        path: PathBuf,
        found: u64,
        supported: u64,
    },
    #[error("key store error: {0}")]
    Db(String),
    #[error("corrupt record in table {table}: {message}")]
    Corrupt {
        table: &'static str,
        message: String,
    },
    #[error("the store writer has stopped")]
    WriterGone,
    /// A schema upgrade could not re-wrap a version's material; nothing was committed.
    /// Boxed: the details would make every `StoreError` (and `Result`) larger.
    #[error(transparent)]
    Upgrade(Box<UpgradeError>),
    /// A commit failed, but it may have been stored all the same: it reads back as
    /// stored (and could not be confirmed), or whether it was could not be read back, or
    /// the store has no journal whose generation would tell (see the writer's `commit`).
    /// Whatever the change made outside the store (objects in a token) must be kept.
    #[error("{0} (the change may have been stored all the same)")]
    Unsettled(Box<StoreError>),
    /// A confirmation found the store without what it expects ([`writer::Held`]).
    #[error("the store does not hold the change to confirm")]
    NotHeld,
    #[error(transparent)]
    Slots(#[from] key_slots::SlotError),
}

/// Why a schema upgrade stopped before it committed ([`StoreError::Upgrade`]): it could
/// not re-wrap a version's material (the wrap failed, e.g. the random source did). The
/// store is still at schema `from`, untouched, and the next open tries the upgrade again.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot upgrade the key store {path} from schema {from} to {to}: version {version} of \
     key {name} ({tag}) could not be re-wrapped: {source}; nothing was changed (the store \
     is still at schema {from}), the next start tries again"
)]
pub struct UpgradeError {
    pub path: PathBuf,
    pub from: u64,
    pub to: u64,
    pub name: String,
    pub tag: String,
    pub version: u32,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl StoreError {
    /// Whether the failed change may be in the store anyway (see [`StoreError::Unsettled`]).
    pub fn may_have_landed(&self) -> bool {
        matches!(self, StoreError::Unsettled(_))
    }
}

impl StoreError {
    fn db(e: impl std::fmt::Display) -> StoreError {
        StoreError::Db(e.to_string())
    }
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::db(e) }
        }
    )*};
}
db_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError,
    journal::JournalError
);

/// Everything the engine loads at start-up: metadata, counters and indexes, not the
/// versions. Versions are read per key on first use ([`Store::versions`]): at 100,000
/// keys × 10 versions, reading them all was most of the start-up time and the memory.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub keys: Vec<KeyRecord>,
    pub usage: Vec<(String, UsageRecord)>,
    pub due: Vec<(UnixMillis, String, DueKind)>,
    pub grants: Vec<kms_shared::model::GrantInfo>,
    /// The highest grant id ever given (stored, or of a grant still there).
    pub last_grant_id: u64,
    pub hsm_tokens: Vec<HsmTokenRecord>,
}

/// What [`Store::upgrade_wraps`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WrapUpgrade {
    /// The schema the store was at.
    pub from: u64,
    /// Versions re-wrapped.
    pub rewrapped: u64,
    /// Versions whose material did not open, left as they were.
    pub unopened: u64,
}

/// One stored version of a key with the encryptions made under it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredVersion {
    pub version: u32,
    pub record: VersionRecord,
    pub encryptions: u64,
}

/// A history query as the store answers it.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    pub limit: usize,
    pub before_seq: Option<u64>,
    pub action: Option<Action>,
    /// `Some(true)`: only `ok`; `Some(false)`: only errors.
    pub ok: Option<bool>,
    pub since: Option<UnixMillis>,
    /// At most this many entries are read (matching or not); `None`: no bound. A request
    /// that may scan a long history is bounded so its cost does not grow with the key's
    /// use (a filter that matches nothing would otherwise read every entry).
    pub max_scan: Option<usize>,
}

/// Where a bounded history scan stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanEnd {
    /// The scan found `limit` entries, or reached the oldest entry (or the oldest of the
    /// `since` window): nothing left to read for this query.
    Done,
    /// `max_scan` entries were read first, and older ones remain: the query goes on with
    /// `before_seq` = this and the same filter (this is one above the newest entry not
    /// read).
    ResumeBefore(u64),
}

/// The open key store.
#[derive(Clone)]
pub struct Store {
    db: Arc<handle::DbHandle>,
    path: PathBuf,
    /// When every page of this file was last verified (Unix seconds); `None` for stores
    /// on other backends, which have no clean-stop record.
    checked_at: Option<u64>,
    /// The call journal while no writer runs (stores on other backends have none).
    journal: writer::JournalSlot,
}

impl Store {
    /// Opens (or creates) the store at `path` for the root key with this fingerprint.
    pub fn open(path: &Path, root_fingerprint: &str) -> Result<Store, StoreError> {
        refuse_panics(path, || Self::open_checked(path, root_fingerprint))
    }

    fn open_checked(path: &Path, root_fingerprint: &str) -> Result<Store, StoreError> {
        if path.exists() {
            refuse_other_root_key(path, root_fingerprint)?;
        } else {
            create_atomically(path, root_fingerprint)?;
        }
        // Read (and removed) before the open, which writes to the file.
        let record = clean_stop::CleanStop::take(path);
        let now = clean_stop::now_s();
        let (check, checked_at) = match clean_stop::CleanStop::matches(record.as_ref(), path, now) {
            Ok(at) => {
                tracing::info!(
                    last_full_check_s_ago = now.saturating_sub(at),
                    "the store is as its last clean stop left it; full page check skipped"
                );
                (None, at)
            }
            Err(why) => (Some(why), now),
        };
        Self::open_file(path, root_fingerprint, check, checked_at)
    }

    /// Opens the file; `check` says why every page must be verified (`None`: no need).
    fn open_file(
        path: &Path,
        root_fingerprint: &str,
        check: Option<clean_stop::CheckReason>,
        checked_at: u64,
    ) -> Result<Store, StoreError> {
        let repaired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let create = {
            let path = path.to_path_buf();
            let repaired = repaired.clone();
            move || -> Result<Database, StoreError> {
                let repaired = repaired.clone();
                Database::builder()
                    .set_cache_size(CACHE_BYTES)
                    .set_repair_callback(move |_| {
                        repaired.store(true, std::sync::atomic::Ordering::Relaxed);
                    })
                    .create(&path)
                    .map_err(|e| StoreError::Open {
                        path: path.clone(),
                        message: e.to_string(),
                    })
            }
        };
        let db = create()?;
        // redb's repair after an unclean stop has just verified every page; checking again
        // would read the whole file a second time.
        let db = match check {
            _ if repaired.load(std::sync::atomic::Ordering::Relaxed) => {
                tracing::info!("the store was repaired after an unclean stop; every page verified");
                db
            }
            Some(why) => {
                tracing::info!(reason = why.as_str(), "checking every page of the store");
                verified(db, path)?
            }
            None => db,
        };
        // A reopen after an I/O error always checks in full.
        let reopen = {
            let path = path.to_path_buf();
            move || verified(create()?, &path)
        };
        let store = Store {
            db: Arc::new(handle::DbHandle::new(db, Box::new(reopen))),
            path: path.to_path_buf(),
            checked_at: Some(checked_at),
            journal: writer::JournalSlot::default(),
        };
        store.init(root_fingerprint)?;
        store.open_journal()?;
        Ok(store)
    }

    /// Opens (or creates) a store on another redb storage backend (tests: simulated power
    /// loss and I/O errors). `label` names it in errors. The backend is cloned to reopen
    /// the store after a failed commit, so clones must share the same storage.
    pub fn open_with_backend<B>(
        backend: B,
        label: &Path,
        root_fingerprint: &str,
    ) -> Result<Store, StoreError>
    where
        B: redb::StorageBackend + Clone,
    {
        let open = {
            let label = label.to_path_buf();
            move || -> Result<Database, StoreError> {
                let db = Database::builder()
                    .set_cache_size(CACHE_BYTES)
                    .create_with_backend(backend.clone())
                    .map_err(|e| StoreError::Open {
                        path: label.clone(),
                        message: e.to_string(),
                    })?;
                verified(db, &label)
            }
        };
        let db = open()?;
        let store = Store {
            db: Arc::new(handle::DbHandle::new(db, Box::new(open))),
            path: label.to_path_buf(),
            checked_at: None,
            journal: writer::JournalSlot::default(),
        };
        store.init(root_fingerprint)?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates missing tables, checks the schema and the root key in one transaction.
    fn init(&self, root_fingerprint: &str) -> Result<(), StoreError> {
        let db = self.db.get()?;
        let mut tx = db.begin_write()?;
        writer::make_durable(&mut tx)?;
        {
            let mut meta = tx.open_table(META)?;
            for def in [KEYS, USAGE] {
                tx.open_table(def)?;
            }
            tx.open_table(NAMES)?;
            tx.open_table(VERSIONS)?;
            tx.open_table(DUE)?;
            tx.open_table(HISTORY)?;
            tx.open_table(ENCRYPTIONS)?;
            tx.open_table(GRANTS)?;
            tx.open_table(HSM_TOKENS)?;

            let schema = meta
                .get(META_SCHEMA)?
                .map(|v| read_u64(v.value()))
                .transpose()?;
            match schema {
                // A new store. An older one keeps its number until what changed since
                // has been brought up to date (`upgrade_wraps`).
                None => {
                    meta.insert(META_SCHEMA, SCHEMA_VERSION.to_be_bytes().as_slice())?;
                }
                Some(found) if found > SCHEMA_VERSION => {
                    return Err(StoreError::TooNew {
                        path: self.path.clone(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(_) => {}
            }
            let stored = meta
                .get(META_ROOT)?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            match stored {
                None => {
                    meta.insert(META_ROOT, root_fingerprint.as_bytes())?;
                }
                Some(stored) if stored != root_fingerprint => {
                    return Err(StoreError::WrongRootKey {
                        path: self.path.clone(),
                        stored,
                        given: root_fingerprint.to_string(),
                    });
                }
                Some(_) => {}
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Folds the calls a previous run left in the journal into redb (a crash between a
    /// call's answer and its fold), then opens the journal for the writer under a new
    /// generation, stored in the same transaction: every record already there is dead.
    fn open_journal(&self) -> Result<(), StoreError> {
        let path = journal::path_for(&self.path);
        let db = self.db.get()?;
        let (current, mut next_seq) = {
            let tx = db.begin_read()?;
            let meta = tx.open_table(META)?;
            let current = match meta.get(META_JOURNAL_GENERATION)? {
                Some(v) => Some(journal::Generation::try_from(v.value()).map_err(|_| {
                    StoreError::Corrupt {
                        table: "meta",
                        message: "journal generation is not 16 bytes".into(),
                    }
                })?),
                None => None,
            };
            let seq = match meta.get(META_HISTORY_SEQ)? {
                Some(v) => read_history_seq(v.value())?,
                None => 1,
            };
            (current, seq)
        };
        let calls = match &current {
            Some(g) => journal::recover(&path, g)?,
            None => Vec::new(),
        };
        let generation = journal::new_generation()
            .map_err(|e| StoreError::Db(format!("cannot draw a journal generation: {e}")))?;
        writer::fold(&db, &calls, &mut next_seq, &generation)?;
        if !calls.is_empty() {
            let entries = calls
                .iter()
                .filter(|c| matches!(c, journal::CallOp::History { .. }))
                .count();
            tracing::info!(
                history_entries = entries,
                "calls acknowledged before the last stop folded in from the journal"
            );
        }
        // Without a journal every call group is a redb commit: slower, as durable.
        match journal::Journal::open(&path, generation) {
            Ok(j) => *self.journal.lock().unwrap_or_else(|e| e.into_inner()) = Some(j),
            Err(e) => tracing::warn!(
                error = %e,
                "running without the call journal: every call group commits to the store"
            ),
        }
        Ok(())
    }

    /// The schema the store is at.
    pub fn schema(&self) -> Result<u64, StoreError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let meta = tx.open_table(META)?;
        let found = meta
            .get(META_SCHEMA)?
            .map(|v| read_u64(v.value()))
            .transpose()?;
        found.ok_or(StoreError::Corrupt {
            table: "meta",
            message: "no schema version".into(),
        })
    }

    /// Marks the store as of an older schema. Never called by kmsd: for tools that write a
    /// store as an older kmsd left it (`kms-bench --scale-schema 1`), to measure what the
    /// upgrade costs. Refuses a schema this build does not know.
    #[doc(hidden)]
    pub fn mark_schema(&self, schema: u64) -> Result<(), StoreError> {
        if !(1..=SCHEMA_VERSION).contains(&schema) {
            return Err(StoreError::Db(format!("no schema {schema}")));
        }
        let db = self.db.get()?;
        let mut tx = db.begin_write()?;
        writer::make_durable(&mut tx)?;
        tx.open_table(META)?
            .insert(META_SCHEMA, schema.to_be_bytes().as_slice())?;
        tx.commit()?;
        Ok(())
    }

    /// Brings a store of an older schema to [`SCHEMA_VERSION`]: every `basic` key not
    /// purged is given a slot by `assign` (called once, with all of them, before anything
    /// is written to the store; it writes the slots and returns their numbers in order),
    /// and every version of such a key is handed to `rewrap` with its key (slot set) and
    /// the schema it was wrapped under, and stored as it returns it; all in one durable
    /// transaction together with the new schema number, so a crash leaves the store all
    /// old or all new (slots given to an upgrade that did not commit are wiped at the next
    /// open, as any slot no key refers to). `rewrap` returns `Ok(None)` for material that
    /// does not open: it is left as it was (counted in [`WrapUpgrade::unopened`]), and
    /// fails on use as it would have before. An `Err` from `rewrap` (the new wrap failed:
    /// a passing fault such as the random source failing) aborts the whole transaction and
    /// is returned as [`StoreError::Upgrade`]: the store stays at its schema, untouched,
    /// and the next open tries again. Call before the writer starts. Returns `None` when
    /// the store needed nothing.
    pub fn upgrade_wraps<E>(
        &self,
        assign: impl FnOnce(&[&str]) -> Result<Vec<u64>, key_slots::SlotError>,
        mut rewrap: impl FnMut(u64, &KeyRecord, u32, &[u8]) -> Result<Option<Vec<u8>>, E>,
    ) -> Result<Option<WrapUpgrade>, StoreError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let from = self.schema()?;
        if from >= SCHEMA_VERSION {
            // An upgrade whose rewrite did not happen (a crash, a failure) tries it again.
            self.finish_rewrite();
            return Ok(None);
        }
        let db = self.db.get()?;
        let mut tx = db.begin_write()?;
        writer::make_durable(&mut tx)?;
        let mut done = WrapUpgrade::default();
        {
            let mut keys: Vec<KeyRecord> = {
                let table = tx.open_table(KEYS)?;
                let mut keys = Vec::new();
                for row in table.iter()? {
                    let (_, v) = row?;
                    let rec: KeyRecord = decode(v.value()).map_err(corrupt("keys"))?;
                    if rec.protection == Protection::Basic
                        && rec.state != kms_shared::model::KeyState::Deleted
                    {
                        keys.push(rec);
                    }
                }
                keys
            };
            let tags: Vec<&str> = keys.iter().map(|k| k.tag.as_str()).collect();
            let slots = assign(&tags)?;
            if slots.len() != keys.len() {
                return Err(StoreError::Db(format!(
                    "{} key slots given for {} keys",
                    slots.len(),
                    keys.len()
                )));
            }
            let mut key_table = tx.open_table(KEYS)?;
            for (key, slot) in keys.iter_mut().zip(slots) {
                key.slot = Some(slot);
                let bytes = encode_map(&*key).map_err(writer::enc)?;
                key_table.insert(key.tag.as_str(), bytes.as_slice())?;
            }
            let mut versions = tx.open_table(VERSIONS)?;
            for key in &keys {
                // One key's versions at a time: the memory is one key's, not the store's.
                let mut stored = Vec::new();
                for row in versions.range((key.tag.as_str(), 0)..=(key.tag.as_str(), u32::MAX))? {
                    let (k, v) = row?;
                    let rec: VersionRecord = decode(v.value()).map_err(corrupt("versions"))?;
                    stored.push((k.value().1, rec));
                }
                for (version, mut rec) in stored {
                    let Some(wrapped) = rec.wrapped.as_deref() else {
                        continue;
                    };
                    match rewrap(from, key, version, wrapped) {
                        Ok(Some(new)) => {
                            rec.wrapped = Some(new);
                            let bytes = encode_map(&rec).map_err(writer::enc)?;
                            versions.insert((key.tag.as_str(), version), bytes.as_slice())?;
                            done.rewrapped += 1;
                        }
                        Ok(None) => done.unopened += 1,
                        // Never skipped like material that does not open: the new schema
                        // reads material only under the key's slot, so a version left
                        // under the old wrap once the new schema is committed could never
                        // be opened again, its data lost for good. Returning drops `tx`
                        // uncommitted (redb aborts it): nothing of this upgrade is stored.
                        Err(e) => {
                            return Err(StoreError::Upgrade(Box::new(UpgradeError {
                                path: self.path.clone(),
                                from,
                                to: SCHEMA_VERSION,
                                name: key.name.clone(),
                                tag: key.tag.clone(),
                                version,
                                source: Box::new(e),
                            })));
                        }
                    }
                }
            }
            let mut meta = tx.open_table(META)?;
            meta.insert(META_SCHEMA, SCHEMA_VERSION.to_be_bytes().as_slice())?;
            meta.insert(META_REWRITE_PENDING, [1u8].as_slice())?;
        }
        tx.commit()?;
        drop(db);
        done.from = from;
        self.finish_rewrite();
        Ok(Some(done))
    }

    /// Writes the store afresh if an upgrade asked for it ([`META_REWRITE_PENDING`]): the
    /// upgrade's commit freed the pages that held the material as the old schema wrapped
    /// it (under the root key alone), and redb leaves them as they were, so a key purged
    /// later could be recovered from them. A new file holds none of them. A failure is
    /// logged, and the next open tries again.
    fn finish_rewrite(&self) {
        let pending = self.db.get().and_then(|db| {
            let tx = db.begin_read()?;
            Ok(tx.open_table(META)?.get(META_REWRITE_PENDING)?.is_some())
        });
        let result = match pending {
            Ok(true) => self.rewrite_file(),
            Ok(false) => {
                // A rewrite a crash cut short left its file.
                let _ = std::fs::remove_file(self.rewrite_path());
                return;
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(true) => tracing::info!("the upgraded store is written afresh"),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "the upgraded store could not be written afresh: material wrapped as before \
                 the upgrade may stay in its freed pages until it is (the next start tries again)"
            ),
        }
    }

    fn rewrite_path(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".rewrite-tmp");
        PathBuf::from(name)
    }

    /// Writes the whole store into a new file, without [`META_REWRITE_PENDING`], and puts
    /// it in place of this one. Returns whether it did: a store on another backend has no
    /// file. The journal's generation is copied with the meta table, so the journal beside
    /// the store stays its own.
    fn rewrite_file(&self) -> Result<bool, StoreError> {
        if self.checked_at.is_none() {
            return Ok(false);
        }
        let fresh = self.rewrite_path();
        let _ = std::fs::remove_file(&fresh);
        let written = {
            let db = self.db.get()?;
            let view = db.begin_read()?;
            backup::write_copy(&view, &fresh, &[META_REWRITE_PENDING])
        };
        if let Err(e) = written {
            let _ = std::fs::remove_file(&fresh);
            return Err(e);
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let fail = |what: &str, e: std::io::Error| StoreError::Open {
            path: self.path.clone(),
            message: format!("{what}: {e}"),
        };
        self.db.reopen_around(|| {
            if let Err(e) = std::fs::rename(&fresh, &self.path) {
                let _ = std::fs::remove_file(&fresh);
                return Err(fail("cannot put the rewritten store in place", e));
            }
            // In place, and it is what opens next; only its durability is in question.
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| {
                    fail(
                        "the rewritten store is in place, but its directory could not be synced",
                        e,
                    )
                })
        })?;
        Ok(true)
    }

    /// Reads everything the engine keeps in memory.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let mut snap = Snapshot::default();
        for row in tx.open_table(KEYS)?.iter()? {
            let (_, v) = row?;
            snap.keys.push(decode(v.value()).map_err(corrupt("keys"))?);
        }
        for row in tx.open_table(USAGE)?.iter()? {
            let (k, v) = row?;
            let rec: UsageRecord = decode(v.value()).map_err(corrupt("usage"))?;
            snap.usage.push((k.value().to_string(), rec));
        }
        for row in tx.open_table(GRANTS)?.iter()? {
            let (_, v) = row?;
            snap.grants
                .push(decode(v.value()).map_err(corrupt("grants"))?);
        }
        let stored_last = match tx.open_table(META)?.get(META_LAST_GRANT_ID)? {
            Some(v) => read_u64(v.value())?,
            None => 0,
        };
        snap.last_grant_id = snap.grants.iter().map(|g| g.id).fold(stored_last, u64::max);
        // Absent in a store written before HSM tokens existed (opened read-only here).
        match tx.open_table(HSM_TOKENS) {
            Ok(t) => {
                for row in t.iter()? {
                    let (_, v) = row?;
                    snap.hsm_tokens
                        .push(decode(v.value()).map_err(corrupt("hsm_tokens"))?);
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        for row in tx.open_table(DUE)?.iter()? {
            let (k, _) = row?;
            let (at, tag, kind) = k.value();
            let kind = DueKind::from_u8(kind).ok_or(StoreError::Corrupt {
                table: "due",
                message: format!("unknown due kind {kind}"),
            })?;
            snap.due.push((at, tag.to_string(), kind));
        }
        Ok(snap)
    }

    /// Every version of one key, in order, with its encryption count.
    pub fn versions(&self, tag: &str) -> Result<Vec<StoredVersion>, StoreError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let mut out = Vec::new();
        for row in tx.open_table(VERSIONS)?.range((tag, 0)..=(tag, u32::MAX))? {
            let (k, v) = row?;
            out.push(StoredVersion {
                version: k.value().1,
                record: decode(v.value()).map_err(corrupt("versions"))?,
                encryptions: 0,
            });
        }
        let counts = tx.open_table(ENCRYPTIONS)?;
        for row in counts.range((tag, 0)..=(tag, u32::MAX))? {
            let (k, n) = row?;
            let version = k.value().1;
            if let Some(v) = out.iter_mut().find(|v| v.version == version) {
                v.encryptions = n.value();
            }
        }
        Ok(out)
    }

    /// Decodes every record of the store, versions included (a restored backup is checked
    /// this way before it replaces anything: the daemon itself reads versions lazily).
    pub fn check_records(&self) -> Result<(), StoreError> {
        self.load()?;
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        for row in tx.open_table(VERSIONS)?.iter()? {
            let (_, v) = row?;
            decode::<VersionRecord>(v.value()).map_err(corrupt("versions"))?;
        }
        Ok(())
    }

    /// The key the `names` table gives `name` to: the last create of that name. It has
    /// the word when two key records carry one name (see `Keyring::from_snapshot`).
    pub fn name_holder(&self, name: &str) -> Result<Option<String>, StoreError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let names = tx.open_table(NAMES)?;
        Ok(names.get(name)?.map(|tag| tag.value().to_string()))
    }

    /// A key's history, newest first, filtered.
    pub fn history(
        &self,
        tag: &str,
        filter: &HistoryFilter,
    ) -> Result<(Vec<(u64, HistoryRecord)>, ScanEnd), StoreError> {
        let mut out = Vec::new();
        let end = self.visit_history(tag, filter, |seq, rec| out.push((seq, rec)))?;
        Ok((out, end))
    }

    /// Hands each entry [`Store::history`] would return to `visit`, without collecting
    /// them: a summary of a long window (`impact`) then costs its own size, not the
    /// window's.
    pub fn visit_history(
        &self,
        tag: &str,
        filter: &HistoryFilter,
        mut visit: impl FnMut(u64, HistoryRecord),
    ) -> Result<ScanEnd, StoreError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        let table = tx.open_table(HISTORY)?;
        let upper = filter.before_seq.unwrap_or(u64::MAX);
        let max_scan = filter.max_scan.unwrap_or(usize::MAX);
        let (mut visited, mut scanned) = (0, 0);
        for row in table.range((tag, 0)..(tag, upper))?.rev() {
            let (k, v) = row?;
            let rec: HistoryRecord = decode(v.value()).map_err(corrupt("history"))?;
            if let Some(since) = filter.since
                && rec.time < since.saturating_sub(HISTORY_TIME_SLACK_MS)
            {
                // Sequence numbers grow with time, give or take the slack: nothing
                // further can match.
                break;
            }
            if scanned == max_scan {
                // Stopped before this entry: everything newer has been looked at.
                return Ok(ScanEnd::ResumeBefore(k.value().1.saturating_add(1)));
            }
            scanned += 1;
            if filter.since.is_some_and(|since| rec.time < since) {
                continue;
            }
            if filter.action.is_some_and(|a| a != rec.action) {
                continue;
            }
            if filter.ok.is_some_and(|ok| ok != (rec.result == "ok")) {
                continue;
            }
            visit(k.value().1, rec);
            visited += 1;
            if visited >= filter.limit {
                break;
            }
        }
        Ok(ScanEnd::Done)
    }

    /// Number of history entries of all keys (free: redb keeps a table's length). Calls
    /// journaled and not yet folded are not counted.
    pub fn history_len(&self) -> Result<u64, StoreError> {
        let db = self.db.get()?;
        let tx = db.begin_read()?;
        Ok(tx.open_table(HISTORY)?.len()?)
    }

    /// Starts the single writer thread.
    pub fn start_writer(&self) -> Result<Writer, StoreError> {
        Writer::start(self.db.clone(), self.journal.clone())
    }

    /// Closes the store once nothing else uses it (stop the writer first) and records the
    /// clean stop, so that the next open can skip the full page check. A store still in
    /// use is left to be dropped, unrecorded: the next open then checks it in full.
    pub fn close(self) {
        let Some(checked_at) = self.checked_at else {
            return;
        };
        match self.db.take_exclusive() {
            Ok(db) => {
                drop(db);
                if let Err(e) = clean_stop::CleanStop::record(&self.path, checked_at) {
                    tracing::warn!(
                        error = %e,
                        "cannot record the clean stop; the next start checks every page"
                    );
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                "the store was not closed cleanly; the next start checks every page"
            ),
        }
    }

    /// Runs redb's integrity check (needs exclusive access: call with no writer running).
    pub fn check_integrity(self) -> Result<bool, StoreError> {
        let mut db = self.db.take_exclusive()?;
        db.check_integrity().map_err(StoreError::db)
    }
}

/// Creates a new store under a temporary name, initialised and durable, and renames it
/// into place: a power loss during the very first start leaves no store or a complete
/// one, never a half-written file that redb refuses to open ("not a redb database").
fn create_atomically(path: &Path, root_fingerprint: &str) -> Result<(), StoreError> {
    let fail = |message: String| StoreError::Open {
        path: path.to_path_buf(),
        message,
    };
    let name = path
        .file_name()
        .ok_or_else(|| fail("the store path has no file name".into()))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".create-tmp");
    let tmp = path.with_file_name(tmp_name);
    // Left over from a start that died while creating the store: it holds nothing.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(format!("cannot remove {}: {e}", tmp.display()))),
    }
    // Opening creates the file and commits its tables durably; dropping closes it.
    drop(
        Store::open_file(&tmp, root_fingerprint, None, clean_stop::now_s())
            .map_err(|e| fail(format!("cannot create it: {e}")))?,
    );
    // The empty journal that open made belongs to the temporary name; the store's own is
    // made by its first open under its real one.
    let _ = std::fs::remove_file(journal::path_for(&tmp));
    std::fs::rename(&tmp, path)
        .map_err(|e| fail(format!("cannot move the new store into place: {e}")))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| fail(format!("cannot sync the data directory: {e}")))?;
    }
    Ok(())
}

/// Opens a store file that no daemon holds and runs redb's integrity check on it, for
/// tools and tests (the crash harness checks the file after every SIGKILL). `Ok(true)`:
/// the file passed as found (after redb's normal crash recovery on open).
pub fn check_file(path: &Path) -> Result<bool, StoreError> {
    refuse_panics(path, || {
        let mut db = Database::open(path).map_err(|e| StoreError::Open {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        db.check_integrity().map_err(StoreError::db)
    })
}

/// redb verifies page checksums only in its integrity check and repair, and reading
/// some damaged pages makes it panic instead of returning an error. A damaged store is
/// refused with a message naming it, not a crash.
fn refuse_panics<T>(
    path: &Path,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    refuse_panics_saying(path, f, |why| {
        format!(
            "the store is corrupt (redb failed reading it: {why}); restore the last backup \
             with `kmsd restore`"
        )
    })
}

thread_local! {
    /// Set while redb reads a store that may be damaged ([`refuse_panics_saying`]): a
    /// panic there is expected, and told in the refusal, not as a crash.
    static READING_UNTRUSTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs a panic hook that leaves out the panics [`refuse_panics`] turns into
/// refusals, and reports every other panic as the default hook does. Without it, a
/// damaged store or backup was refused below redb's "thread 'main' panicked at …
/// internal error: entered unreachable code", which read as kmsd crashing. `main` calls
/// it first.
pub fn quiet_expected_panics() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !READING_UNTRUSTED.with(std::cell::Cell::get) {
            report(info);
        }
    }));
}

/// [`refuse_panics`], the refusal's message made by `said` from what redb said.
pub(super) fn refuse_panics_saying<T>(
    path: &Path,
    f: impl FnOnce() -> Result<T, StoreError>,
    said: impl FnOnce(&str) -> String,
) -> Result<T, StoreError> {
    let before = READING_UNTRUSTED.with(|r| r.replace(true));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    READING_UNTRUSTED.with(|r| r.set(before));
    outcome.unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".into());
        Err(StoreError::Open {
            path: path.to_path_buf(),
            message: said(&why),
        })
    })
}

/// Runs redb's integrity check on a freshly opened store: it verifies every page's
/// checksum, which plain reads do not, so a store whose bytes changed on disk is refused
/// instead of served. A check that fails but repairs (an allocator state rebuilt, an
/// unfinished commit rolled back) is logged; one that cannot repair refuses the store.
fn verified(mut db: Database, path: &Path) -> Result<Database, StoreError> {
    match db.check_integrity() {
        Ok(true) => Ok(db),
        Ok(false) => {
            tracing::warn!(
                store = %path.display(),
                "the key store failed redb's integrity check and was repaired to its last \
                 consistent commit"
            );
            Ok(db)
        }
        Err(e) => Err(StoreError::Open {
            path: path.to_path_buf(),
            message: format!(
                "the store is corrupt (redb's integrity check failed: {e}); restore the last \
                 backup with `kmsd restore`"
            ),
        }),
    }
}

/// Compares the root-key fingerprint through a read-only open first: a read-write open
/// writes to the file even when the transaction is then abandoned, and a store opened
/// with the wrong key must stay byte for byte as it was. A store that cannot be opened
/// read-only (one that needs repair after a crash) is left to the full check in `init`.
fn refuse_other_root_key(path: &Path, root_fingerprint: &str) -> Result<(), StoreError> {
    let Ok(db) = redb::ReadOnlyDatabase::open(path) else {
        return Ok(());
    };
    let Ok(tx) = db.begin_read() else {
        return Ok(());
    };
    let Ok(meta) = tx.open_table(META) else {
        return Ok(());
    };
    let stored = meta
        .get(META_ROOT)?
        .map(|v| String::from_utf8_lossy(v.value()).into_owned());
    match stored {
        Some(stored) if stored != root_fingerprint => Err(StoreError::WrongRootKey {
            path: path.to_path_buf(),
            stored,
            given: root_fingerprint.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The next history sequence number as stored. One far beyond any count of calls is a
/// corrupt store: counting on from it would wrap round onto existing entries.
pub(crate) fn read_history_seq(b: &[u8]) -> Result<u64, StoreError> {
    let seq = read_u64(b)?;
    if seq > 1 << 62 {
        return Err(StoreError::Corrupt {
            table: "meta",
            message: format!("the next history sequence number {seq} is impossible"),
        });
    }
    Ok(seq)
}

pub(crate) fn read_u64(b: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = b.try_into().map_err(|_| StoreError::Corrupt {
        table: "meta",
        message: "a counter is not 8 bytes".into(),
    })?;
    Ok(u64::from_be_bytes(arr))
}

fn corrupt(table: &'static str) -> impl Fn(rmp_serde::decode::Error) -> StoreError {
    move |e| StoreError::Corrupt {
        table,
        message: e.to_string(),
    }
}
