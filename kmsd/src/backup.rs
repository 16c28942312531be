//! Online backup over the IPC (`kmsctl backup`): the daemon writes a consistent snapshot
//! of the store into its data directory ([`Store::snapshot_to`]) and streams it to the
//! client in chunks of at most [`CHUNK`] bytes.
//!
//! `backup` takes the snapshot and answers its first chunk with a snapshot id;
//! `backup_read` (id, offset) answers the following ones. The file is deleted once its
//! last byte has been sent, once no chunk of it was asked for in [`EXPIRY`] (the client
//! went away), and at shutdown; files left by a crash are removed at the next start.
//! However long the copy or the transfer takes (a large store, a slow USB stick), a
//! snapshot being read is never deleted under its reader. Only the account that took a
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
/// A snapshot none of whose chunks was asked for within this time is deleted.
pub const EXPIRY: Duration = Duration::from_secs(600);
/// Snapshots in progress at once: each is a full copy of the store on disk.
pub const MAX_SNAPSHOTS: usize = 2;

const PREFIX: &str = "backup-";
const SUFFIX: &str = ".redb.tmp";

struct Snapshot {
    path: PathBuf,
    /// Its size once the copy is complete; 0 while it is being made.
    total: u64,
    uid: u32,
    /// When the copy ended or a chunk was last asked for: [`EXPIRY`] counts from here.
    touched: tokio::time::Instant,
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
    /// Takes a new snapshot of the store into `data_dir` and answers its first chunk, if
    /// `still_permitted` says the caller may still have it once the copy is made (a copy
    /// takes seconds, in which a revoke may land; later chunks are checked as they are
    /// asked for).
    pub async fn start(
        &self,
        engine: &Arc<Engine>,
        data_dir: &Path,
        caller: &Caller,
        still_permitted: impl FnOnce() -> Result<(), WireError>,
    ) -> Reply {
        let id = random_tag().map_err(|e| internal("no random id", e))?;
        let path = data_dir.join(format!("{PREFIX}{}-{id}{SUFFIX}", engine.now()));
        {
            let mut map = self.lock();
            if map.len() >= MAX_SNAPSHOTS {
                return Err(WireError::new(
                    ErrorKind::InvalidState,
                    format!(
                        "{MAX_SNAPSHOTS} backups are already in progress; let them finish (one \
                         whose client went away is deleted {} minutes after its last chunk was \
                         read)",
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
                    touched: tokio::time::Instant::now(),
                },
            );
        }
        let engine = engine.clone();
        let p = path.clone();
        let snapshots = self.snapshots.clone();
        let copied = id.clone();
        // Settled first: every call acknowledged before the backup began is then in redb,
        // which is what the snapshot copies (the journal is not part of a backup). The
        // copy records its own end, so that the reservation of a client that went away
        // mid-copy (this handler is then dropped) still ends: released at once if the
        // copy failed, expired unread if not.
        let snapshot = move || {
            let made = match engine.settle() {
                Ok(()) => engine.snapshot_to(&p),
                Err(e) => Err(crate::store::StoreError::Db(e.to_string())),
            };
            let mut map = snapshots.lock().unwrap_or_else(|e| e.into_inner());
            match &made {
                Ok(total) => {
                    if let Some(s) = map.get_mut(&copied) {
                        s.total = *total;
                        s.touched = tokio::time::Instant::now();
                    }
                }
                Err(_) => {
                    if let Some(s) = map.remove(&copied) {
                        let _ = std::fs::remove_file(&s.path);
                    }
                }
            }
            made
        };
        self.expire_when_idle(id.clone());
        let total = match tokio::task::spawn_blocking(snapshot).await {
            Ok(Ok(total)) => total,
            Ok(Err(e)) => return Err(internal("cannot snapshot the store", e)),
            Err(e) => {
                self.forget(&id);
                return Err(internal("the snapshot task failed", e));
            }
        };
        tracing::info!(
            account = %caller.account,
            uid = caller.uid,
            bytes = total,
            "backup snapshot taken"
        );
        if let Err(refused) = still_permitted() {
            self.forget(&id);
            return Err(refused);
        }
        self.read(&id, 0, caller).await
    }

    /// The chunk of snapshot `id` at `offset`; the last one deletes the snapshot.
    pub async fn read(&self, id: &str, offset: u64, caller: &Caller) -> Reply {
        let (path, total) = {
            let mut map = self.lock();
            match map.get_mut(id) {
                // Another account's snapshot is as good as absent to this caller.
                Some(s) if s.uid == caller.uid && s.total > 0 => {
                    s.touched = tokio::time::Instant::now();
                    (s.path.clone(), s.total)
                }
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

    /// Deletes snapshot `id` once it is complete and none of its chunks was asked for in
    /// [`EXPIRY`]; never while it is being copied (the copy ends it if it fails).
    fn expire_when_idle(&self, id: String) {
        let snapshots = self.snapshots.clone();
        tokio::spawn(async move {
            let mut until = tokio::time::Instant::now() + EXPIRY;
            loop {
                tokio::time::sleep_until(until).await;
                let mut map = snapshots.lock().unwrap_or_else(|e| e.into_inner());
                let Some(s) = map.get(&id) else { return };
                let idle_until = s.touched + EXPIRY;
                if s.total == 0 || idle_until > tokio::time::Instant::now() {
                    until = idle_until.max(tokio::time::Instant::now() + Duration::from_secs(1));
                    continue;
                }
                if let Some(s) = map.remove(&id) {
                    tracing::info!(snapshot = %id, "backup snapshot expired unread");
                    let _ = std::fs::remove_file(&s.path);
                }
                return;
            }
        });
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn caller() -> Caller {
        Caller {
            uid: 0,
            gid: 0,
            pid: 42,
            account: "root".into(),
            groups: Vec::new(),
            client: "backup-test".into(),
        }
    }

    /// A snapshot of `len` bytes whose copy is still running (its size not yet known),
    /// as `start` leaves it while `snapshot_to` writes.
    fn copying(backups: &Backups, dir: &Path, id: &str, len: usize) -> PathBuf {
        let path = dir.join(format!("{PREFIX}{id}{SUFFIX}"));
        std::fs::write(&path, vec![7u8; len]).unwrap();
        backups.lock().insert(
            id.into(),
            Snapshot {
                path: path.clone(),
                total: 0,
                uid: 0,
                touched: tokio::time::Instant::now(),
            },
        );
        backups.expire_when_idle(id.into());
        path
    }

    fn copied(backups: &Backups, id: &str, len: usize) {
        let mut map = backups.lock();
        let s = map.get_mut(id).unwrap();
        s.total = len as u64;
        s.touched = tokio::time::Instant::now();
    }

    /// A snapshot is not deleted while it is copied, however long that takes, nor while
    /// it is read, however slowly (a chunk every nine minutes, longer in all than
    /// [`EXPIRY`]); one none of whose chunks was asked for in [`EXPIRY`] is deleted.
    #[tokio::test(start_paused = true)]
    async fn a_snapshot_expires_when_idle_not_while_it_is_copied_or_read() {
        let dir = tempfile::tempdir().unwrap();
        let backups = Backups::default();
        let me = caller();
        let len = 3 * CHUNK + 10;
        let slow = copying(&backups, dir.path(), "slow", len);
        tokio::time::sleep(EXPIRY * 2).await;
        copied(&backups, "slow", len);
        let mut offset = 0u64;
        loop {
            tokio::time::sleep(Duration::from_secs(9 * 60)).await;
            match backups.read("slow", offset, &me).await.unwrap() {
                Response::BackupChunk { data, done, .. } => {
                    offset += data.len() as u64;
                    if done {
                        break;
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(offset, len as u64);
        assert!(!slow.exists(), "a snapshot read to its end is deleted");

        let idle = copying(&backups, dir.path(), "idle", len);
        copied(&backups, "idle", len);
        backups.read("idle", 0, &me).await.unwrap();
        tokio::time::sleep(EXPIRY - Duration::from_secs(5)).await;
        assert!(idle.exists(), "expired before its time");
        tokio::time::sleep(Duration::from_secs(10)).await;
        let gone = backups.read("idle", CHUNK as u64, &me).await.unwrap_err();
        assert_eq!(gone.kind, ErrorKind::NotFound);
        assert!(!idle.exists(), "the expired snapshot's file is still there");
    }
}
