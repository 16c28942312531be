//! The open redb database behind a handle that can replace it.
//!
//! redb latches the first I/O error of a database (a full disk, an EIO): from then on
//! every operation of that `Database` fails with "previous I/O error; close and re-open
//! the database", even after the disk has room again. A daemon that kept the same
//! `Database` would refuse every write until restarted. So the writer, after a failed
//! commit, asks the handle to [`DbHandle::recover`]: it waits for readers in progress to
//! let go of the old `Database`, drops it (closing the file) and opens the file again,
//! which rolls back to the last durable commit (redb's repair). If that open fails too
//! (the disk is still full), the handle stays empty and every later use tries again, at
//! most every [`RETRY`].
//!
//! Acknowledged writes are never at stake here: a commit that failed was answered with
//! the error, and everything acknowledged before it is in the last durable commit.

use super::StoreError;
use redb::Database;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Least time between two attempts to reopen a store that failed to reopen.
const RETRY: Duration = Duration::from_millis(200);
/// How long recovery waits for readers still holding the old database.
const READERS_GRACE: Duration = Duration::from_secs(2);

type Opener = Box<dyn Fn() -> Result<Database, StoreError> + Send + Sync>;

/// The current database, or none while a reopen is failing.
pub(crate) struct DbHandle {
    current: RwLock<Option<Arc<Database>>>,
    open: Opener,
    /// When the last reopen was tried, and why it failed.
    last_failure: Mutex<Option<(Instant, String)>>,
}

impl DbHandle {
    pub(crate) fn new(db: Database, open: Opener) -> DbHandle {
        DbHandle {
            current: RwLock::new(Some(Arc::new(db))),
            open,
            last_failure: Mutex::new(None),
        }
    }

    /// The database to use for one read or one write transaction. Hold the `Arc` no
    /// longer than that transaction: recovery waits for it.
    pub(crate) fn get(&self) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Ok(db.clone());
        }
        let mut slot = self.current.write().unwrap_or_else(|e| e.into_inner());
        if let Some(db) = slot.as_ref() {
            return Ok(db.clone());
        }
        let mut failure = self.last_failure.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, why)) = failure.as_ref()
            && at.elapsed() < RETRY
        {
            return Err(unavailable(why));
        }
        match (self.open)() {
            Ok(db) => {
                tracing::info!("the key store is open again");
                *failure = None;
                let db = Arc::new(db);
                *slot = Some(db.clone());
                Ok(db)
            }
            Err(e) => {
                let why = e.to_string();
                let err = unavailable(&why);
                *failure = Some((Instant::now(), why));
                Err(err)
            }
        }
    }

    /// After a failed commit: closes the database and opens the file again, so that a
    /// transient I/O error (a full disk) does not fail every later write.
    pub(crate) fn recover(&self) {
        let mut slot = self.current.write().unwrap_or_else(|e| e.into_inner());
        let Some(db) = slot.take() else {
            // Already closed by an earlier failure; `get` reopens it.
            return;
        };
        close_after_readers(db);
        let mut failure = self.last_failure.lock().unwrap_or_else(|e| e.into_inner());
        match (self.open)() {
            Ok(db) => {
                tracing::warn!("the key store was reopened after a failed commit");
                *failure = None;
                *slot = Some(Arc::new(db));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reopen the key store; retrying on next use");
                *failure = Some((Instant::now(), e.to_string()));
            }
        }
    }

    /// Closes the database, runs `between` (which may put another file in its place), and
    /// opens the file again. Returns `between`'s error, else the reopen's.
    pub(crate) fn reopen_around(
        &self,
        between: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut slot = self.current.write().unwrap_or_else(|e| e.into_inner());
        if let Some(db) = slot.take() {
            close_after_readers(db);
        }
        let done = between();
        match (self.open)() {
            Ok(db) => *slot = Some(Arc::new(db)),
            Err(e) => {
                *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((Instant::now(), e.to_string()));
                done?;
                return Err(e);
            }
        }
        done
    }

    /// Takes the database out for an operation that needs it alone (the integrity check).
    pub(crate) fn take_exclusive(&self) -> Result<Database, StoreError> {
        let mut slot = self.current.write().unwrap_or_else(|e| e.into_inner());
        let db = slot
            .take()
            .ok_or_else(|| StoreError::Db("the key store is not open".into()))?;
        Arc::try_unwrap(db).map_err(|db| {
            *slot = Some(db);
            StoreError::Db("the store is still in use".into())
        })
    }
}

/// Drops the database once no reader holds it (or after [`READERS_GRACE`]).
fn close_after_readers(db: Arc<Database>) {
    // Readers clone the Arc under the lock the caller holds, so the count only goes down.
    let deadline = Instant::now() + READERS_GRACE;
    while Arc::strong_count(&db) > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if Arc::strong_count(&db) > 1 {
        tracing::warn!("a reader still holds the key store; reopening after it lets go");
    }
    drop(db);
}

fn unavailable(why: &str) -> StoreError {
    StoreError::Db(format!(
        "the key store is closed after an I/O error and cannot be reopened yet: {why}"
    ))
}
