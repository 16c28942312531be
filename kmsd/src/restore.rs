//! `kmsd restore FILE`: brings a backup made by `kmsctl backup` back into a data
//! directory, with the daemon stopped (SPEC §9).
//!
//! Nothing is changed until the backup has been proven good: it is copied next to the
//! store, and the copy must pass redb's integrity check, name a schema this kmsd reads,
//! carry the fingerprint of the root key found for this data directory, and load. Only
//! then is it renamed into place; a store already there is refused, or with `--force`
//! kept beside it as `kms.redb.before-restore-<millis>` (its call journal with it).
//!
//! Putting the restored store and its key slot file in place takes two renames. Between
//! them the directory holds a store and slots that do not belong together, so once both
//! are staged and the names set aside are durable, a marker (`kms.redb.restore-commit`)
//! is written and synced: a crash from then on is finished forward by the next start of
//! kmsd (or the next restore), never undone by throwing the staged files away
//! ([`finish_interrupted`]).

use crate::crypto::RootKey;
use crate::crypto::root_key::{CREDENTIAL_NAME, KEY_FILE_NAME, RootKeyError};
use crate::server::{self, ServerError};
use crate::store::StoreError;
use crate::store::backup::{self, BackupInfo, verify_backup};
use crate::store::key_slots::{self, KeySlots, SlotSecret};
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// What to restore where.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub file: PathBuf,
    pub data_dir: PathBuf,
    /// `$CREDENTIALS_DIRECTORY`, where the root key may come from (as for the daemon).
    pub credentials_dir: Option<PathBuf>,
    /// Replace an existing store (kept beside it).
    pub force: bool,
}

/// What was done.
#[derive(Debug, Clone)]
pub struct Restored {
    pub info: BackupInfo,
    /// AES versions counted as having spent their encryption budget (see
    /// [`crate::store::backup::spend_restored_budgets`]): each rotates at its next
    /// encryption.
    pub budgets_spent: u64,
    pub store: PathBuf,
    /// Where the store that was replaced now is.
    pub previous: Option<PathBuf>,
    /// A key slot file found without a store (the store moved away by hand), kept here.
    pub orphan_slots: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("kmsd is running on {0} (it holds kmsd.lock); stop it before restoring")]
    DaemonRunning(PathBuf),
    #[error(transparent)]
    DataDir(ServerError),
    #[error(
        "no root key for {0}: a backup opens only with the root key of the store it was taken \
         from; copy that root.key into the data directory (mode 0600) or provide it as the \
         credential kms-root-key"
    )]
    NoRootKey(PathBuf),
    #[error(transparent)]
    RootKey(#[from] RootKeyError),
    #[error(
        "a key store already exists at {0}; repeat with --force to replace it (the old one is \
         kept as kms.redb.before-restore-<time>)"
    )]
    StoreExists(PathBuf),
    #[error("cannot read the backup {path}: {source}")]
    ReadBackup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a backup this data directory can use: {source}")]
    Invalid { path: PathBuf, source: StoreError },
    /// The verified copy could not be prepared (a write to it failed: the data
    /// directory's disk, not the backup).
    #[error("cannot prepare the restored copy {path}: {source}")]
    Staging { path: PathBuf, source: StoreError },
    /// The store was replaced, and a step after it failed: the restore happened.
    #[error(
        "the backup is restored into {store}{previous}, but {step} failed: {source}; {remedy}",
        previous = match previous {
            Some(p) => format!(" (the replaced store is kept as {})", p.display()),
            None => String::new(),
        }
    )]
    Unfinished {
        store: PathBuf,
        previous: Option<PathBuf>,
        step: String,
        source: std::io::Error,
        remedy: &'static str,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A rename that puts the restored files in place failed, and undoing it did not
    /// complete for certain: the next start finishes the restore, or finds it undone.
    #[error(
        "the restore failed while putting its files in place ({source}), and undoing it did \
         not complete: the next start of kmsd, or the next `kmsd restore`, finishes it (or \
         finds the old store and its slots in place, if the undoing reached the disk)"
    )]
    Interrupted { source: std::io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The marker that a restore's renames have begun (see the module's doc). It holds the
/// name the replaced store was set aside under, or nothing when there was none.
const COMMIT_MARKER: &str = "kms.redb.restore-commit";

/// The marker's content: never through a link, never blocking on a FIFO, a regular file
/// of at most a name's length.
fn read_marker(path: &Path) -> std::io::Result<String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(crate::store::journal::NOFOLLOW | rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut aside = String::new();
    file.take(128).read_to_string(&mut aside)?;
    Ok(aside)
}

/// Syncs `dir`'s entries.
fn sync_dir(dir: &Path) -> Result<(), RestoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Finishes a restore a crash cut short after it began putting its files in place (its
/// marker is there): the staged slot file and store are renamed into place, in that
/// order, and the replaced store's journal name goes. Returns the store restored, or
/// `None` when there was nothing to finish. Called with the data directory locked.
pub fn finish_interrupted(data_dir: &Path) -> Result<Option<PathBuf>, RestoreError> {
    let marker = data_dir.join(COMMIT_MARKER);
    let aside = match read_marker(&marker) {
        Ok(aside) => aside,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&marker)(e)),
    };
    let store = data_dir.join("kms.redb");
    let staged = data_dir.join("kms.redb.restore-tmp");
    for (from, to) in [
        (key_slots::path_for(&staged), key_slots::path_for(&store)),
        (staged, store.clone()),
    ] {
        if std::fs::symlink_metadata(&from).is_ok() {
            std::fs::rename(&from, &to).map_err(io_err(&to))?;
        }
    }
    // The old journal's name goes only if the store was replaced (its set-aside name is
    // not the store in place) and the set-aside journal is the same file: a marker naming
    // anything else changes nothing more.
    if let Some(aside) = aside
        .strip_prefix("kms.redb.before-restore-")
        .filter(|millis| !millis.is_empty() && millis.bytes().all(|b| b.is_ascii_digit()))
        .map(|millis| data_dir.join(format!("kms.redb.before-restore-{millis}")))
    {
        use std::os::unix::fs::MetadataExt as _;
        let journal = crate::store::journal::path_for(&store);
        let inode = |p: &Path| std::fs::symlink_metadata(p).map(|m| (m.dev(), m.ino()));
        let replaced = matches!((inode(&store), inode(&aside)), (Ok(a), Ok(b)) if a != b);
        if let (true, Ok(a), Ok(b)) = (
            replaced,
            inode(&journal),
            inode(&crate::store::journal::path_for(&aside)),
        ) && a == b
        {
            std::fs::remove_file(&journal).map_err(io_err(&journal))?;
        }
    }
    sync_dir(data_dir)?;
    std::fs::remove_file(&marker).map_err(io_err(&marker))?;
    sync_dir(data_dir)?;
    Ok(Some(store))
}

/// Whether a root key exists for this data directory (the credential or root.key), i.e.
/// whether loading it would not create a new one.
pub fn root_key_available(data_dir: &Path, credentials_dir: Option<&Path>) -> bool {
    credentials_dir.is_some_and(|d| d.join(CREDENTIAL_NAME).exists())
        || std::fs::symlink_metadata(data_dir.join(KEY_FILE_NAME)).is_ok()
}

/// Restores `opts.file` into `opts.data_dir` (see the module docs).
pub fn restore(opts: &RestoreOptions) -> Result<Restored, RestoreError> {
    restore_renaming(opts, &|from, to| std::fs::rename(from, to))
}

/// [`restore`], with the renames that put the staged files in place done by `rename`:
/// tests make one of them fail to check what is undone.
fn restore_renaming(
    opts: &RestoreOptions,
    rename: &dyn Fn(&Path, &Path) -> std::io::Result<()>,
) -> Result<Restored, RestoreError> {
    let dir = &opts.data_dir;
    // The daemon's own lock: held for the whole restore, so no kmsd can start meanwhile.
    let _lock = server::lock_data_dir(dir).map_err(|e| match e {
        ServerError::DataDirLocked(d) => RestoreError::DaemonRunning(d),
        other => RestoreError::DataDir(other),
    })?;
    // At once, not after the backup is verified: run as root, a restore that fails
    // leaves the lock behind, and the daemon's account could not open it again.
    give_to_dir_owner(dir, &dir.join("kmsd.lock"))?;

    // A restore a crash cut short midway is finished first: this one then replaces its
    // store and slots together, as a pair.
    if let Some(store) = finish_interrupted(dir)? {
        tracing::warn!(store = %store.display(), "finished an earlier restore a crash had cut short");
    }
    // Never create a root key here: a fresh one could not open the backup anyway.
    if !root_key_available(dir, opts.credentials_dir.as_deref()) {
        return Err(RestoreError::NoRootKey(dir.clone()));
    }
    let (root, _) = RootKey::load_or_create(dir, opts.credentials_dir.as_deref())?;

    let store = dir.join("kms.redb");
    let exists = std::fs::symlink_metadata(&store).is_ok();
    if exists && !opts.force {
        return Err(RestoreError::StoreExists(store));
    }

    let staged = dir.join("kms.redb.restore-tmp");
    let staged_slots = key_slots::path_for(&staged);
    let remove_staged = || {
        let _ = std::fs::remove_file(&staged);
        let _ = KeySlots::shred(&staged_slots);
    };
    remove_staged();
    let result = stage_and_verify(&opts.file, dir, &staged, &root);
    let (info, budgets_spent) = match result {
        Ok(done) => done,
        Err(e) => {
            remove_staged();
            return Err(e);
        }
    };

    // Run as root on a service's directory (owned by kms): the files must stay usable
    // by the daemon's account. Done first: nothing has changed yet if it fails.
    if let Err(e) =
        give_to_dir_owner(dir, &staged).and_then(|()| give_to_dir_owner(dir, &staged_slots))
    {
        remove_staged();
        return Err(e);
    }
    // The old store is never missing: kept under a second name (a link) first, then
    // replaced in one rename. A failure or a crash anywhere leaves `kms.redb` the old
    // store or the restored one — never nothing, which the next start would have taken
    // for a new data directory and served empty.
    let journal = crate::store::journal::path_for(&store);
    let slots = key_slots::path_for(&store);
    let millis = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let aside = dir.join(format!("kms.redb.before-restore-{millis}"));
    // Calls a crash left in the old store's journal go with it: opened under its new name,
    // it folds them in. Its key slots go with it too: its keys open with nothing else. A
    // slot file without a store (the store moved away by hand) is kept aside as well: the
    // store it belongs to opens only with it.
    let aside_slots = key_slots::path_for(&aside);
    let mut beside = vec![(&slots, aside_slots.clone())];
    if exists {
        beside.insert(0, (&store, aside.clone()));
        beside.push((&journal, crate::store::journal::path_for(&aside)));
    }
    let mut linked = Vec::new();
    for (from, to) in &beside {
        if std::fs::symlink_metadata(from).is_err() {
            continue;
        }
        if let Err(e) = std::fs::hard_link(from, to) {
            for to in &linked {
                let _ = std::fs::remove_file(to);
            }
            remove_staged();
            return Err(io_err(from)(e));
        }
        linked.push(to.clone());
    }
    let slots_aside = linked.contains(&aside_slots);
    let marker = dir.join(COMMIT_MARKER);
    let undo_links = || {
        for to in &linked {
            let _ = std::fs::remove_file(to);
        }
        remove_staged();
    };
    // The names set aside are durable before the marker is (a start finishing this
    // restore relies on them), and the marker before anything is renamed.
    let aside_name = if exists {
        aside
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    } else {
        ""
    };
    if let Err(e) = sync_dir(dir).and_then(|()| {
        write_synced(&marker, aside_name.as_bytes())?;
        give_to_dir_owner(dir, &marker)?;
        sync_dir(dir)
    }) {
        let _ = std::fs::remove_file(&marker);
        undo_links();
        return Err(e);
    }
    // Undoing a rename that failed: the marker goes last, once what was renamed is back,
    // so that a crash at any point is finished forward by the next start.
    let unmark = || {
        std::fs::remove_file(&marker)
            .map_err(io_err(&marker))
            .and_then(|()| sync_dir(dir))
    };
    // The slots first, then the store; a crash before, between or after is finished
    // forward by the next start (`finish_interrupted`).
    if let Err(e) = rename(&staged_slots, &slots) {
        if unmark().is_err() {
            return Err(RestoreError::Interrupted { source: e });
        }
        undo_links();
        return Err(io_err(&slots)(e));
    }
    if let Err(e) = rename(&staged, &store) {
        // The restored slots go back to their staged name, and the old slot file gets
        // its name back as a second name of the one set aside (a link, not a rename: if
        // the marker outlives this, finishing forward renames over that name).
        let undone = rename(&slots, &staged_slots).and_then(|()| match slots_aside {
            true => std::fs::hard_link(&aside_slots, &slots),
            false => Ok(()),
        });
        if undone.is_err() || unmark().is_err() {
            return Err(RestoreError::Interrupted { source: e });
        }
        // Every name set aside is now a second name of a file in place.
        undo_links();
        return Err(io_err(&store)(e));
    }
    let previous = exists.then_some(aside);
    let orphan_slots = (!exists && slots_aside).then_some(aside_slots);
    // The old journal's name goes (its content stays under the old store's new name): the
    // restored store must not take over that file. A backup carries no journal
    // generation, so it would ignore the records, but it would write over them.
    // Past the rename the backup is restored: a failure says so, and what is left to do.
    let unfinished = |step: String, source, remedy| RestoreError::Unfinished {
        store: store.clone(),
        previous: previous.clone(),
        step,
        source,
        remedy,
    };
    if previous.is_some() {
        match std::fs::remove_file(&journal) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(unfinished(
                    format!("removing the old journal's name {}", journal.display()),
                    e,
                    "remove that file before starting kmsd (it refuses a journal with two \
                     names; the replaced store keeps its own)",
                ));
            }
            _ => {}
        }
    }
    // A marker left (its removal failed or was not synced) only makes the next start
    // look for staged files that are no longer there.
    let _ = std::fs::remove_file(&marker);
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| {
        unfinished(
            format!("syncing {}", dir.display()),
            e,
            "run `sync` before the machine stops, or the restore may be undone",
        )
    })?;
    Ok(Restored {
        info,
        budgets_spent,
        store,
        previous,
        orphan_slots,
    })
}

/// The files a restore works with before they are in place, in `data_dir`: the checked
/// copy of the backup (its key slot secrets wrapped under the root key), the staged store
/// and its slot file (slot secrets as they are), and their journals.
fn staging_files(data_dir: &Path) -> Vec<PathBuf> {
    let checked = data_dir.join("kms.redb.restore-check");
    let staged = data_dir.join("kms.redb.restore-tmp");
    vec![
        crate::store::journal::path_for(&checked),
        crate::store::journal::path_for(&staged),
        key_slots::path_for(&staged),
        checked,
        staged,
    ]
}

/// Writes `bytes` into a new file at `path` (replacing one there), synced.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), RestoreError> {
    let _ = std::fs::remove_file(path);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(io_err(path))
}

/// What kmsd does at start, with the data directory locked, about restores a crash cut
/// short: one that had begun putting its files in place is finished
/// ([`finish_interrupted`]); what one left before that is removed (a copy of the data
/// directory must not find slot secrets in it after their keys are purged).
pub fn finish_or_clean_up(data_dir: &Path) -> Result<(), RestoreError> {
    if let Some(store) = finish_interrupted(data_dir)? {
        tracing::warn!(store = %store.display(), "finished a restore a crash had cut short");
    }
    remove_leftovers(data_dir);
    Ok(())
}

fn remove_leftovers(data_dir: &Path) {
    for path in staging_files(data_dir) {
        if std::fs::symlink_metadata(&path).is_err() {
            continue;
        }
        // The staged slot file holds slot secrets as they are: zeroed before it goes.
        let removed = if path == key_slots::path_for(&data_dir.join("kms.redb.restore-tmp")) {
            KeySlots::shred(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {
                tracing::info!(file = %path.display(), "removed what a restore cut short left")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove what a restore cut short left")
            }
        }
    }
    remove_second_names(data_dir);
}

/// Removes `kms.redb.before-restore-*` names that are second names of the live store,
/// journal or slot file: left by a restore a crash cut short after it linked them aside
/// but before its marker. Kept, they would follow the live files, not hold the old ones.
fn remove_second_names(data_dir: &Path) {
    use std::os::unix::fs::MetadataExt as _;
    let store = data_dir.join("kms.redb");
    let live: Vec<(u64, u64)> = [
        store.clone(),
        crate::store::journal::path_for(&store),
        key_slots::path_for(&store),
    ]
    .iter()
    .filter_map(|p| std::fs::symlink_metadata(p).ok())
    .map(|m| (m.dev(), m.ino()))
    .collect();
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let named_aside = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with("kms.redb.before-restore-"));
        let second_name = entry
            .metadata()
            .is_ok_and(|m| m.is_file() && live.contains(&(m.dev(), m.ino())));
        if named_aside && second_name {
            let path = entry.path();
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(
                    file = %path.display(),
                    "removed a second name of a live file a restore cut short left"
                ),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot remove a second name a restore cut short left")
                }
            }
        }
    }
}

/// When root restores into a directory another account owns, hands `path` to that
/// account (kmsd under systemd runs as kms and could not open a root-owned store).
fn give_to_dir_owner(dir: &Path, path: &Path) -> Result<(), RestoreError> {
    use std::os::unix::fs::MetadataExt as _;
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let meta = std::fs::metadata(dir).map_err(io_err(dir))?;
    if meta.uid() == 0 {
        return Ok(());
    }
    // The file itself, never what a link there names: the directory's owner could put
    // a link to any file in its place, and root would hand that file over.
    rustix::fs::chownat(
        rustix::fs::CWD,
        path,
        Some(rustix::fs::Uid::from_raw(meta.uid())),
        Some(rustix::fs::Gid::from_raw(meta.gid())),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| RestoreError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// Copies the backup into the data directory (0600, fsynced) and verifies the copy;
/// builds from it the store to put in place, `staged`, without the backup's slot secrets,
/// and writes those into the slot file beside `staged`; and counts the staged store's AES
/// versions' encryption budgets as spent (returned: how many).
fn stage_and_verify(
    file: &Path,
    dir: &Path,
    staged: &Path,
    root: &RootKey,
) -> Result<(BackupInfo, u64), RestoreError> {
    let checked = dir.join("kms.redb.restore-check");
    let _ = std::fs::remove_file(&checked);
    let result = copy_and_verify(file, &checked, root);
    let staged_store = result.and_then(|info| {
        let staging = |source| RestoreError::Staging {
            path: staged.to_path_buf(),
            source,
        };
        let sealed = backup::rebuild_without_slot_secrets(&checked, staged).map_err(staging)?;
        let invalid = |message: String| RestoreError::Invalid {
            path: file.to_path_buf(),
            source: StoreError::Corrupt {
                table: "slot_secrets",
                message,
            },
        };
        let mut slots = Vec::with_capacity(sealed.len());
        for (tag, slot, wrapped) in sealed {
            let opened = root
                .unwrap(&backup::slot_secret_aad(&tag), &wrapped)
                .map_err(|_| invalid(format!("the slot secret of key {tag} does not open")))?;
            let secret: SlotSecret = opened
                .as_slice()
                .try_into()
                .map(zeroize::Zeroizing::new)
                .map_err(|_| invalid(format!("the slot secret of key {tag} is malformed")))?;
            slots.push((slot, tag, secret));
        }
        key_slots::referenced(slots.iter().map(|(slot, tag, _)| (*slot, tag.clone())))
            .map_err(|e| invalid(e.to_string()))?;
        KeySlots::write_new(&key_slots::path_for(staged), &slots).map_err(|e| staging(e.into()))?;
        Ok(info)
    });
    let _ = std::fs::remove_file(&checked);
    let info = staged_store?;
    let spent = backup::spend_restored_budgets(staged, crate::config::MAX_NONCE_BUDGET).map_err(
        |source| RestoreError::Staging {
            path: staged.to_path_buf(),
            source,
        },
    )?;
    Ok((info, spent))
}

/// Copies the backup to `checked` (0600, fsynced) and verifies the copy.
fn copy_and_verify(
    file: &Path,
    checked: &Path,
    root: &RootKey,
) -> Result<BackupInfo, RestoreError> {
    let read_err = |source| RestoreError::ReadBackup {
        path: file.to_path_buf(),
        source,
    };
    let mut src = File::open(file).map_err(read_err)?;
    if !src.metadata().map_err(read_err)?.is_file() {
        return Err(read_err(std::io::Error::other("not a regular file")));
    }
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(checked)
        .map_err(io_err(checked))?;
    // Read and write failures told apart: a full data directory is not a bad backup.
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        dst.write_all(&buf[..n]).map_err(io_err(checked))?;
    }
    dst.sync_all().map_err(io_err(checked))?;
    drop(dst);
    verify_backup(checked, &root.fingerprint()).map_err(|source| RestoreError::Invalid {
        path: file.to_path_buf(),
        source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn setup() -> (tempfile::TempDir, PathBuf, String) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let (root, _) = RootKey::load_or_create(&src, None).unwrap();
        let fp = root.fingerprint();
        let store = Store::open(&src.join("kms.redb"), &fp).unwrap();
        crate::store::backup::snapshot_without_slots(&store, &dir.path().join("b.redb")).unwrap();
        (dir, src, fp)
    }

    fn opts(dir: &Path, data: &Path, force: bool) -> RestoreOptions {
        RestoreOptions {
            file: dir.join("b.redb"),
            data_dir: data.to_path_buf(),
            credentials_dir: None,
            force,
        }
    }

    /// Restore needs the root key, refuses to replace a store without --force, keeps the old one with it.
    #[test]
    fn restore_rules() {
        let (dir, src, _) = setup();
        let fresh = dir.path().join("fresh");
        let err = restore(&opts(dir.path(), &fresh, false)).unwrap_err();
        assert!(matches!(err, RestoreError::NoRootKey(_)), "{err}");
        assert!(!fresh.join("root.key").exists());
        std::fs::copy(src.join("root.key"), fresh.join("root.key")).unwrap();
        let r = restore(&opts(dir.path(), &fresh, false)).unwrap();
        assert!(r.previous.is_none() && r.store.exists());
        let err = restore(&opts(dir.path(), &fresh, false)).unwrap_err();
        assert!(matches!(err, RestoreError::StoreExists(_)), "{err}");
        // The daemon ran on it: its call journal exists, and goes aside with it.
        let fp = RootKey::load_or_create(&fresh, None)
            .unwrap()
            .0
            .fingerprint();
        drop(Store::open(&r.store, &fp).unwrap());
        let journal = crate::store::journal::path_for(&r.store);
        assert!(journal.exists());
        // Its key slots too: the restore wrote a slot file, replaced by the next.
        let slots = key_slots::path_for(&r.store);
        assert!(slots.exists());
        std::fs::write(&slots, b"the old store's slots").unwrap();
        let r = restore(&opts(dir.path(), &fresh, true)).unwrap();
        let previous = r.previous.unwrap();
        assert!(previous.exists());
        assert!(crate::store::journal::path_for(&previous).exists());
        assert!(!journal.exists());
        assert_eq!(
            std::fs::read(key_slots::path_for(&previous)).unwrap(),
            b"the old store's slots"
        );
        assert_ne!(std::fs::read(&slots).unwrap(), b"the old store's slots");
        // Nothing left of the staged copies, their journal and slots included.
        let left: Vec<_> = std::fs::read_dir(&fresh)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains("restore-tmp") || n.contains("restore-check"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A backup taken under another root key is refused and the existing store is left as it was.
    #[test]
    fn wrong_root_key_changes_nothing() {
        let (dir, _, _) = setup();
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        let (root, _) = RootKey::load_or_create(&other, None).unwrap();
        drop(Store::open(&other.join("kms.redb"), &root.fingerprint()).unwrap());
        let before = std::fs::read(other.join("kms.redb")).unwrap();
        let err = restore(&opts(dir.path(), &other, true)).unwrap_err();
        assert!(err.to_string().contains("different root key"), "{err}");
        assert_eq!(std::fs::read(other.join("kms.redb")).unwrap(), before);
        let names: Vec<_> = std::fs::read_dir(&other)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("kms.redb") && n != "kms.redb.journal")
            .collect();
        assert_eq!(names, vec!["kms.redb".to_string()]);
    }

    /// Root restoring into a directory of another account: a restore that fails still
    /// leaves the lock to that account (it was handed over only after the backup was
    /// verified, so a bad backup left a root-owned lock the daemon could not open).
    /// Needs root (CI runs as root); as another user there is nothing to hand over.
    #[test]
    fn a_failed_restore_leaves_the_lock_to_the_directory_owner() {
        use std::os::unix::fs::MetadataExt;
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root to hand files to another account");
            return;
        }
        let (dir, src, _) = setup();
        let nobody = |p: &Path| {
            rustix::fs::chown(
                p,
                Some(rustix::fs::Uid::from_raw(65534)),
                Some(rustix::fs::Gid::from_raw(65534)),
            )
            .unwrap()
        };
        nobody(&src);
        std::fs::write(dir.path().join("b.redb"), b"not a store").unwrap();
        assert!(restore(&opts(dir.path(), &src, true)).is_err());
        let lock = std::fs::metadata(src.join("kmsd.lock")).unwrap();
        assert_eq!((lock.uid(), lock.gid()), (65534, 65534));
    }

    /// A data directory a daemon has run on (store, journal, slots), and the names in it.
    fn used_dir(dir: &Path, src: &Path) -> (PathBuf, Vec<(String, Vec<u8>)>) {
        let data = dir.join("used");
        std::fs::create_dir(&data).unwrap();
        std::fs::copy(src.join("root.key"), data.join("root.key")).unwrap();
        let r = restore(&opts(dir, &data, false)).unwrap();
        let fp = RootKey::load_or_create(&data, None)
            .unwrap()
            .0
            .fingerprint();
        drop(Store::open(&r.store, &fp).unwrap());
        std::fs::write(key_slots::path_for(&r.store), b"the old store's slots").unwrap();
        (data.clone(), contents(&data))
    }

    /// Every file of `dir` but the lock, by name, with its bytes.
    fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut all: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name() != "kmsd.lock")
            .map(|e| {
                let name = e.file_name().into_string().unwrap();
                (name, std::fs::read(e.path()).unwrap())
            })
            .collect();
        all.sort();
        all
    }

    /// A rename that fails for the files whose new name ends in `failing` (the rest are
    /// done).
    fn failing_rename(
        failing: &'static [&'static str],
    ) -> impl Fn(&Path, &Path) -> std::io::Result<()> {
        move |from, to| {
            let name = to.file_name().unwrap().to_str().unwrap();
            if failing.contains(&name) {
                return Err(std::io::Error::other(format!("injected: {name}")));
            }
            std::fs::rename(from, to)
        }
    }

    /// The store's rename failing after the slots' leaves the directory as it was: the old
    /// slot file back under its name, the names set aside and the staged files gone.
    #[test]
    fn a_failed_store_rename_puts_the_old_slots_back() {
        let (dir, src, _) = setup();
        let (data, before) = used_dir(dir.path(), &src);
        assert!(
            before.iter().any(|(n, _)| n == "kms.redb.journal"),
            "{before:?}"
        );
        let err = restore_renaming(
            &opts(dir.path(), &data, true),
            &failing_rename(&["kms.redb"]),
        )
        .unwrap_err();
        assert!(matches!(err, RestoreError::Io { .. }), "{err}");
        assert!(err.to_string().contains("injected: kms.redb"), "{err}");
        assert_eq!(contents(&data), before);

        // The slots' own rename failing changes nothing either.
        let err = restore_renaming(
            &opts(dir.path(), &data, true),
            &failing_rename(&["kms.redb.keyslots"]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert_eq!(contents(&data), before);
    }

    /// When the undoing of a failed store rename fails too, the marker stays and the
    /// error says so; the next start finishes the restore: the restored store with its
    /// slots, the old store set aside with its own.
    #[test]
    fn a_restore_that_cannot_be_undone_is_finished_at_the_next_start() {
        let (dir, src, _) = setup();
        let (data, before) = used_dir(dir.path(), &src);
        let err = restore_renaming(
            &opts(dir.path(), &data, true),
            &failing_rename(&["kms.redb", "kms.redb.restore-tmp.keyslots"]),
        )
        .unwrap_err();
        assert!(matches!(err, RestoreError::Interrupted { .. }), "{err}");
        assert!(data.join(COMMIT_MARKER).exists());
        finish_or_clean_up(&data).unwrap();
        let old = |name: &str| before.iter().find(|(n, _)| n == name).unwrap().1.clone();
        let aside = names(&data, "kms.redb.before-restore-");
        assert_eq!(aside.len(), 3, "{aside:?}");
        assert_eq!(
            std::fs::read(data.join(&aside[0])).unwrap(),
            old("kms.redb")
        );
        assert_eq!(
            std::fs::read(data.join(&aside[2])).unwrap(),
            old("kms.redb.keyslots")
        );
        assert_ne!(
            std::fs::read(data.join("kms.redb.keyslots")).unwrap(),
            old("kms.redb.keyslots")
        );
        assert!(!data.join(COMMIT_MARKER).exists());
    }

    /// A marker that is a FIFO or a link is refused at once, not read.
    #[test]
    fn a_marker_that_is_not_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join(COMMIT_MARKER);
        std::os::unix::fs::symlink("/dev/zero", &marker).unwrap();
        assert!(finish_interrupted(dir.path()).is_err());
        std::fs::remove_file(&marker).unwrap();
        crate::test_support::make_fifo(&marker);
        assert!(finish_interrupted(dir.path()).is_err());
    }

    /// A marker left while the store was never replaced (its set-aside name is the store
    /// in place) does not take the live store's journal.
    #[test]
    fn a_stale_marker_leaves_the_live_journal() {
        let (dir, src, _) = setup();
        let (data, _) = used_dir(dir.path(), &src);
        let store = data.join("kms.redb");
        let journal = crate::store::journal::path_for(&store);
        let aside = data.join("kms.redb.before-restore-1");
        std::fs::hard_link(&store, &aside).unwrap();
        std::fs::hard_link(&journal, crate::store::journal::path_for(&aside)).unwrap();
        std::fs::write(data.join(COMMIT_MARKER), "kms.redb.before-restore-1").unwrap();
        finish_or_clean_up(&data).unwrap();
        assert!(journal.exists());
        assert!(!data.join(COMMIT_MARKER).exists());
    }

    /// A restore that "crashes" (panics, so nothing of it is undone) when it renames the
    /// store, after the slot file's rename: the state a power cut there leaves.
    fn crash_between_the_renames(dir: &Path, data: &Path) {
        let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            restore_renaming(&opts(dir, data, true), &|from: &Path, to: &Path| {
                if to.ends_with("kms.redb") {
                    panic!("a crash before the store's rename");
                }
                std::fs::rename(from, to)
            })
        }));
        assert!(crashed.is_err());
        assert!(data.join(COMMIT_MARKER).exists());
    }

    /// The names of `dir` that start with `prefix`.
    fn names(dir: &Path, prefix: &str) -> Vec<String> {
        let mut out: Vec<_> = contents(dir)
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with(prefix))
            .collect();
        out.sort();
        out
    }

    /// A crash between a restore's two renames is finished forward at the next start: the
    /// restored store goes in place beside the slots already there. The start threw the
    /// staged store away and served the old store with the new slots (or an empty store,
    /// restoring into an empty directory), and its sweep could wipe restored slots.
    #[test]
    fn a_restore_cut_short_between_its_renames_is_finished_at_start() {
        let (dir, src, _) = setup();
        // Into an empty directory.
        let fresh = dir.path().join("fresh");
        std::fs::create_dir(&fresh).unwrap();
        std::fs::copy(src.join("root.key"), fresh.join("root.key")).unwrap();
        crash_between_the_renames(dir.path(), &fresh);
        assert!(!fresh.join("kms.redb").exists());
        finish_or_clean_up(&fresh).unwrap();
        assert!(fresh.join("kms.redb").exists());
        assert!(key_slots::path_for(&fresh.join("kms.redb")).exists());
        assert_eq!(
            names(&fresh, "kms.redb"),
            vec!["kms.redb".to_string(), "kms.redb.keyslots".to_string()]
        );
        let fp = RootKey::load_or_create(&fresh, None)
            .unwrap()
            .0
            .fingerprint();
        drop(Store::open(&fresh.join("kms.redb"), &fp).unwrap());

        // Over a store a daemon ran on: its store, journal and slots go aside together.
        let (data, before) = used_dir(dir.path(), &src);
        crash_between_the_renames(dir.path(), &data);
        finish_or_clean_up(&data).unwrap();
        let aside = names(&data, "kms.redb.before-restore-");
        assert_eq!(aside.len(), 3, "{aside:?}");
        let old = |name: &str| before.iter().find(|(n, _)| n == name).unwrap().1.clone();
        let now = contents(&data);
        let now_of = |name: &str| now.iter().find(|(n, _)| *n == name).map(|(_, b)| b.clone());
        assert_eq!(now_of(&aside[0]).unwrap(), old("kms.redb"));
        assert_eq!(now_of(&aside[1]).unwrap(), old("kms.redb.journal"));
        assert_eq!(now_of(&aside[2]).unwrap(), old("kms.redb.keyslots"));
        assert_ne!(
            now_of("kms.redb.keyslots").unwrap(),
            old("kms.redb.keyslots")
        );
        assert_ne!(now_of("kms.redb").unwrap(), old("kms.redb"));
        assert!(now_of("kms.redb.journal").is_none());
        assert!(now_of(COMMIT_MARKER).is_none());
        // Nothing is left to finish.
        assert_eq!(finish_interrupted(&data).unwrap(), None);
    }

    /// A second restore after the first was cut short between its renames finishes the
    /// first, then sets its store aside with its own slots: every pair set aside matches.
    #[test]
    fn a_second_restore_finishes_the_first() {
        let (dir, src, _) = setup();
        let (data, before) = used_dir(dir.path(), &src);
        crash_between_the_renames(dir.path(), &data);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let r = restore(&opts(dir.path(), &data, true)).unwrap();
        let aside = names(&data, "kms.redb.before-restore-");
        // The old store's pair and the first restore's pair.
        let slot_files: Vec<_> = aside.iter().filter(|n| n.ends_with(".keyslots")).collect();
        assert_eq!(slot_files.len(), 2, "{aside:?}");
        let old_slots = &before
            .iter()
            .find(|(n, _)| n == "kms.redb.keyslots")
            .unwrap()
            .1;
        let first = std::fs::read(data.join(slot_files[0])).unwrap();
        let second = std::fs::read(data.join(slot_files[1])).unwrap();
        assert_eq!(&first, old_slots);
        assert_ne!(&second, old_slots);
        // The second pair is the first restore's: its store is not the old one.
        let old_store = &before.iter().find(|(n, _)| n == "kms.redb").unwrap().1;
        let second_store = slot_files[1].trim_end_matches(".keyslots");
        assert_ne!(&std::fs::read(data.join(second_store)).unwrap(), old_store);
        assert_eq!(
            r.previous.unwrap().file_name().unwrap().to_str().unwrap(),
            slot_files[1].trim_end_matches(".keyslots")
        );
        assert!(!data.join(COMMIT_MARKER).exists());
    }

    /// Names set aside by a restore that a crash cut short before its marker are second
    /// names of the live files: removed at start. A store really set aside stays.
    #[test]
    fn second_names_of_live_files_are_removed_at_start() {
        let (dir, src, _) = setup();
        let (data, before) = used_dir(dir.path(), &src);
        let store = data.join("kms.redb");
        let real_aside = data.join("kms.redb.before-restore-1");
        std::fs::copy(&store, &real_aside).unwrap();
        for (from, to) in [
            (store.clone(), data.join("kms.redb.before-restore-2")),
            (
                crate::store::journal::path_for(&store),
                data.join("kms.redb.before-restore-2.journal"),
            ),
            (
                key_slots::path_for(&store),
                data.join("kms.redb.before-restore-2.keyslots"),
            ),
        ] {
            std::fs::hard_link(from, to).unwrap();
        }
        finish_or_clean_up(&data).unwrap();
        assert_eq!(
            names(&data, "kms.redb.before-restore-"),
            vec!["kms.redb.before-restore-1"]
        );
        let kept: Vec<_> = contents(&data)
            .into_iter()
            .filter(|(n, _)| !n.starts_with("kms.redb.before-restore-"))
            .collect();
        assert_eq!(kept, before);
    }

    /// A held data-directory lock (a running kmsd) refuses the restore.
    #[test]
    fn running_daemon_refuses() {
        let (dir, src, _) = setup();
        let _held = server::lock_data_dir(&src).unwrap();
        let err = restore(&opts(dir.path(), &src, true)).unwrap_err();
        assert!(matches!(err, RestoreError::DaemonRunning(_)), "{err}");
    }
}
