//! Online backup over the IPC (`kmsctl backup`): the daemon writes a consistent snapshot
//! of the store into its data directory ([`Store::snapshot_to`]) and streams it to the
//! client in chunks of at most [`CHUNK`] bytes.
//!
//! `backup` takes the snapshot and answers its first chunk with a snapshot id;
//! `backup_read` (id, offset) answers the following ones. The file is deleted once its
//! last byte has been sent, after [`EXPIRY`] if the client goes away, and at shutdown;
//! files left by a crash are removed at the next start. Only the account that took a
//! snapshot may read it.
//!
//! [`Store::snapshot_to`]: crate::store::Store::snapshot_to

use crate::crypto::random::random_tag;
use crate::engine::{Caller, Engine};
use kms_shared::protocol::{ErrorKind, Response, WireError};
use std::collections::HashMap;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest chunk in one reply (well under the 1 MiB default frame limit of clients).
pub const CHUNK: usize = 512 * 1024;
/// A snapshot not read to its end within this time is deleted.
pub const EXPIRY: Duration = Duration::from_secs(600);
/// Snapshots in progress at once: each is a full copy of the store on disk.
pub const MAX_SNAPSHOTS: usize = 2;

const PREFIX: &str = "backup-";
const SUFFIX: &str = ".redb.tmp";

struct Snapshot {
    path: PathBuf,
    total: u64,
    uid: u32,
}

/// The snapshots being streamed. Dropping it deletes their files.
#[derive(Default)]
pub struct Backups {
    snapshots: Arc<Mutex<HashMap<String, Snapshot>>>,
}

type Reply = Result<Response, WireError>;

fn internal(what: &str, e: impl std::fmt::Display) -> WireError {
    tracing::error!(error = %e, "backup: {what}");
    WireError::new(ErrorKind::Internal, format!("backup failed: {what}"))
}

impl Backups {
    /// Takes a new snapshot of the store into `data_dir` and answers its first chunk.
    pub async fn start(&self, engine: &Arc<Engine>, data_dir: &Path, caller: &Caller) -> Reply {
        let id = random_tag().map_err(|e| internal("no random id", e))?;
        let path = data_dir.join(format!("{PREFIX}{}-{id}{SUFFIX}", engine.now()));
        {
            let mut map = self.lock();
            if map.len() >= MAX_SNAPSHOTS {
                return Err(WireError::new(
                    ErrorKind::InvalidState,
                    format!(
                        "{MAX_SNAPSHOTS} backups are already in progress; let them finish or wait {} minutes",
                        EXPIRY.as_secs() / 60
                    ),
                ));
            }
            // Reserved now, so concurrent starts cannot exceed the limit; total set below.
            map.insert(
                id.clone(),
                Snapshot {
                    path: path.clone(),
                    total: 0,
                    uid: caller.uid,
                },
            );
        }
        // Armed before the copy starts, so that a reservation whose client went away
        // mid-copy (the handler is then dropped) is released too.
        let snapshots = self.snapshots.clone();
        let expiring = id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(EXPIRY).await;
            let gone = snapshots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&expiring);
            if let Some(s) = gone {
                tracing::info!(snapshot = %expiring, "backup snapshot expired unread");
                let _ = std::fs::remove_file(&s.path);
            }
        });
        let engine = engine.clone();
        let p = path.clone();
        // Settled first: every call acknowledged before the backup began is then in redb,
        // which is what the snapshot copies (the journal is not part of a backup).
        let snapshot = move || match engine.settle() {
            Ok(()) => engine.store().snapshot_to(&p),
            Err(e) => Err(crate::store::StoreError::Db(e.to_string())),
        };
        let total = match tokio::task::spawn_blocking(snapshot).await {
            Ok(Ok(total)) => total,
            Ok(Err(e)) => {
                self.forget(&id);
                return Err(internal("cannot snapshot the store", e));
            }
            Err(e) => {
                self.forget(&id);
                return Err(internal("the snapshot task failed", e));
            }
        };
        if let Some(s) = self.lock().get_mut(&id) {
            s.total = total;
        }
        tracing::info!(
            account = %caller.account,
            uid = caller.uid,
            bytes = total,
            "backup snapshot taken"
        );
        self.read(&id, 0, caller).await
    }

    /// The chunk of snapshot `id` at `offset`; the last one deletes the snapshot.
    pub async fn read(&self, id: &str, offset: u64, caller: &Caller) -> Reply {
        let (path, total) = {
            let map = self.lock();
            match map.get(id) {
                // Another account's snapshot is as good as absent to this caller.
                Some(s) if s.uid == caller.uid && s.total > 0 => (s.path.clone(), s.total),
                _ => {
                    return Err(WireError::new(
                        ErrorKind::NotFound,
                        format!("no backup snapshot {id:?} (finished, expired, or never taken)"),
                    ));
                }
            }
        };
        if offset > total {
            return Err(WireError::new(
                ErrorKind::InvalidArgument,
                format!("offset {offset} is past the end of the snapshot ({total} bytes)"),
            ));
        }
        let data = tokio::task::spawn_blocking(move || read_chunk(&path, offset))
            .await
            .map_err(|e| internal("the read task failed", e))?
            .map_err(|e| internal("cannot read the snapshot", e))?;
        let end = offset + data.len() as u64;
        let done = end >= total;
        if done {
            tracing::info!(snapshot = %id, bytes = total, "backup sent");
            self.forget(id);
        } else if data.is_empty() {
            return Err(internal(
                "the snapshot file is shorter than recorded",
                format!("{end} < {total}"),
            ));
        }
        Ok(Response::BackupChunk {
            snapshot: id.to_string(),
            offset,
            data,
            total,
            done,
        })
    }

    fn forget(&self, id: &str) {
        if let Some(s) = self.lock().remove(id) {
            let _ = std::fs::remove_file(&s.path);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Snapshot>> {
        self.snapshots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Backups {
    fn drop(&mut self) {
        for (_, s) in self.lock().drain() {
            let _ = std::fs::remove_file(&s.path);
        }
    }
}

fn read_chunk(path: &Path, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut data = Vec::with_capacity(CHUNK);
    f.take(CHUNK as u64).read_to_end(&mut data)?;
    Ok(data)
}

/// Deletes snapshot files a previous kmsd left behind (a crash mid-backup). Called at
/// start, with the data directory locked, so none of them is in use.
pub fn remove_stale(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(PREFIX) && name.ends_with(SUFFIX) {
            tracing::info!(file = %name, "removing a backup snapshot left by an earlier run");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
