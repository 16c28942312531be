//! The redb key store: the only module that knows redb.
//!
//! # Durability
//!
//! Every write goes through the [`writer`]: one thread owns all write transactions, and
//! each transaction commits with `Durability::Immediate`, two-phase commit and quick
//! repair. A write is acknowledged (its [`Ticket`] resolves) only after the transaction
//! holding it has committed, i.e. after redb's `fsync` returned. So:
//!
//! - a lifecycle change (create, rotate, state, version flag, settings) is durable before
//!   the engine publishes it in memory or answers the caller;
//! - a history entry and the usage/encryption counters of a crypto call are durable before
//!   the call is answered; many calls share one commit (group commit);
//! - a crash at any instant leaves the last committed transaction; with two-phase commit
//!   the commit slot is never half-written, and quick repair makes the reopen fast.
//!
//! The root key never enters this file: versions hold only wrapped material, and the meta
//! table holds a fingerprint of the root key so that a store is never opened with the
//! wrong one.

pub mod backup;
pub mod records;
pub mod writer;

use kms_shared::model::{Action, UnixMillis};
use records::{DueKind, HistoryRecord, KeyRecord, UsageRecord, VersionRecord, decode};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use writer::{Mutation, Ticket, Writer};

/// The schema this build writes. Older schemas are migrated on open; newer are refused.
pub const SCHEMA_VERSION: u64 = 1;

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

const META_SCHEMA: &str = "schema_version";
const META_ROOT: &str = "root_key_fingerprint";
pub(crate) const META_HISTORY_SEQ: &str = "history_seq";

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
    redb::SetDurabilityError
);

/// Everything the engine loads at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub keys: Vec<KeyRecord>,
    /// (tag, version, record), ordered by tag then version.
    pub versions: Vec<(String, u32, VersionRecord)>,
    pub usage: Vec<(String, UsageRecord)>,
    pub encryptions: Vec<(String, u32, u64)>,
    pub due: Vec<(UnixMillis, String, DueKind)>,
    pub grants: Vec<kms_shared::model::GrantInfo>,
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
}

/// The open key store.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the store at `path` for the root key with this fingerprint.
    pub fn open(path: &Path, root_fingerprint: &str) -> Result<Store, StoreError> {
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        if path.exists() {
            refuse_other_root_key(path, root_fingerprint)?;
        }
        let db = Database::builder().create(path).map_err(|e| open_err(&e))?;
        let store = Store {
            db: Arc::new(db),
            path: path.to_path_buf(),
        };
        store.init(root_fingerprint)?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates missing tables, checks the schema and the root key in one transaction.
    fn init(&self, root_fingerprint: &str) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write()?;
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

            let schema = meta
                .get(META_SCHEMA)?
                .map(|v| read_u64(v.value()))
                .transpose()?;
            match schema {
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

    /// Reads everything the engine keeps in memory.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let tx = self.db.begin_read()?;
        let mut snap = Snapshot::default();
        for row in tx.open_table(KEYS)?.iter()? {
            let (_, v) = row?;
            snap.keys.push(decode(v.value()).map_err(corrupt("keys"))?);
        }
        for row in tx.open_table(VERSIONS)?.iter()? {
            let (k, v) = row?;
            let (tag, ver) = k.value();
            let rec: VersionRecord = decode(v.value()).map_err(corrupt("versions"))?;
            snap.versions.push((tag.to_string(), ver, rec));
        }
        for row in tx.open_table(USAGE)?.iter()? {
            let (k, v) = row?;
            let rec: UsageRecord = decode(v.value()).map_err(corrupt("usage"))?;
            snap.usage.push((k.value().to_string(), rec));
        }
        for row in tx.open_table(ENCRYPTIONS)?.iter()? {
            let (k, v) = row?;
            let (tag, ver) = k.value();
            snap.encryptions.push((tag.to_string(), ver, v.value()));
        }
        for row in tx.open_table(GRANTS)?.iter()? {
            let (_, v) = row?;
            snap.grants
                .push(decode(v.value()).map_err(corrupt("grants"))?);
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

    /// A key's history, newest first, filtered.
    pub fn history(
        &self,
        tag: &str,
        filter: &HistoryFilter,
    ) -> Result<Vec<(u64, HistoryRecord)>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(HISTORY)?;
        let upper = filter.before_seq.unwrap_or(u64::MAX);
        let mut out = Vec::new();
        for row in table.range((tag, 0)..(tag, upper))?.rev() {
            let (k, v) = row?;
            let rec: HistoryRecord = decode(v.value()).map_err(corrupt("history"))?;
            if filter.since.is_some_and(|s| rec.time < s) {
                // Sequence numbers grow with time, so nothing older can match.
                break;
            }
            if filter.action.is_some_and(|a| a != rec.action) {
                continue;
            }
            if filter.ok.is_some_and(|ok| ok != (rec.result == "ok")) {
                continue;
            }
            out.push((k.value().1, rec));
            if out.len() >= filter.limit {
                break;
            }
        }
        Ok(out)
    }

    /// Number of history entries of all keys (for status and tests).
    pub fn history_len(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(HISTORY)?.len()?)
    }

    /// Starts the single writer thread.
    pub fn start_writer(&self) -> Result<Writer, StoreError> {
        Writer::start(self.db.clone())
    }

    /// Runs redb's integrity check (needs exclusive access: call with no writer running).
    pub fn check_integrity(self) -> Result<bool, StoreError> {
        let mut db = Arc::try_unwrap(self.db)
            .map_err(|_| StoreError::Db("the store is still in use".into()))?;
        db.check_integrity().map_err(StoreError::db)
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

fn read_u64(b: &[u8]) -> Result<u64, StoreError> {
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
