//! The listening side: the data-directory lock, the socket directory and file with their
//! permissions, stale-socket detection, and the accept loop with its connection limit.
//!
//! The listener is tokio's `UnixListener`, not `interprocess`: the daemon needs the
//! kernel's peer credentials (`SO_PEERCRED`) of every connection, which interprocess does
//! not expose for its tokio streams (the clients do use interprocess).

use crate::config::Config;
use crate::connection::Connection;
use crate::engine::{Caller, Engine};
use crate::service::Service;
use crate::shutdown::Shutdown;
use kms_shared::protocol::{ErrorKind, WireError};
use rustix::fs::{FlockOperation, Mode, flock};
use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another kmsd is serving {0}")]
    AlreadyServing(PathBuf),
    #[error("another kmsd holds the data directory {0} (lock file kmsd.lock)")]
    DataDirLocked(PathBuf),
    #[error("{path}: {message}")]
    Path { path: PathBuf, message: String },
    #[error("unknown group {0:?} for --socket-group")]
    UnknownGroup(String),
}

fn path_err(path: &Path, message: impl std::fmt::Display) -> ServerError {
    ServerError::Path {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The sticky bit: a directory shared by users (/tmp), whose mode kmsd must not change.
const STICKY: u32 = 0o1000;

/// Holds the data directory's lock for the daemon's lifetime (released on drop/exit).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Creates the data directory (0700) and takes its exclusive lock: one daemon per store.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, ServerError> {
    std::fs::create_dir_all(dir).map_err(|e| path_err(dir, format!("cannot create: {e}")))?;
    let meta = std::fs::metadata(dir).map_err(|e| path_err(dir, e))?;
    if meta.mode() & STICKY != 0 {
        // A shared directory such as /tmp: making it 0700 would break every other user
        // of it, and keys do not belong in a directory others can add files to.
        return Err(path_err(
            dir,
            "is a shared directory (sticky bit, like /tmp); use a private subdirectory",
        ));
    }
    if meta.uid() == rustix::process::geteuid().as_raw() && meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| path_err(dir, format!("cannot restrict to 0700: {e}")))?;
    }
    let lock_path = dir.join("kmsd.lock");
    // Not through a link: kmsd (or `kmsd restore`) run by root on a directory another
    // account can write would otherwise open, and a restore hand over, any file.
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(crate::store::journal::NOFOLLOW)
        .open(&lock_path)
        .map_err(|e| path_err(&lock_path, e))?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(path_err(&lock_path, "is not a regular file"));
    }
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(DataDirLock { _file: file }),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(ServerError::DataDirLocked(dir.to_path_buf())),
        Err(e) => Err(path_err(&lock_path, e)),
    }
}

/// Binds the socket: a private directory (0700, or 0750 with the group), a stale socket
/// file replaced, a live one refused, the socket 0600 (or 0660 with the group).
pub fn bind(config: &Config) -> Result<UnixListener, ServerError> {
    let path = &config.socket;
    let group = match &config.socket_group {
        Some(name) => Some(
            uzers::get_group_by_name(name)
                .ok_or_else(|| ServerError::UnknownGroup(name.clone()))?
                .gid(),
        ),
        None => None,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| path_err(path, "the socket path has no directory"))?;
    let (dir_mode, sock_mode) = if group.is_some() {
        (0o750, 0o660)
    } else {
        (0o700, 0o600)
    };
    prepare_socket_dir(dir, dir_mode, group)?;

    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(path_err(
                path,
                "exists and is not a socket; refusing to replace it",
            ));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ServerError::AlreadyServing(path.clone())),
            Err(_) => {
                tracing::info!(socket = %path.display(), "removing stale socket");
                std::fs::remove_file(path).map_err(|e| path_err(path, e))?;
            }
        }
    }
    let listener =
        UnixListener::bind(path).map_err(|e| path_err(path, format!("cannot bind: {e}")))?;
    set_group(path, group)?;
    rustix::fs::chmod(path, Mode::from_raw_mode(sock_mode))
        .map_err(|e| path_err(path, format!("cannot set the mode: {e}")))?;
    Ok(listener)
}

/// Gives `path` the group `gid`, unless it has it already: under the system unit
/// (`Group=kms`) it always has, and the unit's syscall filter refuses `chown` (@privileged)
/// — kmsd binding its socket itself, without the socket unit, then failed to start.
fn set_group(path: &Path, group: Option<u32>) -> Result<(), ServerError> {
    let Some(gid) = group else {
        return Ok(());
    };
    let meta = std::fs::symlink_metadata(path).map_err(|e| path_err(path, e))?;
    if meta.gid() == gid {
        return Ok(());
    }
    rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
        .map_err(|e| path_err(path, format!("cannot set the group: {e}")))
}

/// Creates the socket directory or checks that an existing one is ours and private: a
/// directory another user created (say in /tmp) could be used to intercept clients.
fn prepare_socket_dir(dir: &Path, mode: u32, group: Option<u32>) -> Result<(), ServerError> {
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| path_err(dir, format!("cannot create: {e}")))?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| path_err(dir, e))?;
    if !meta.is_dir() {
        return Err(path_err(dir, "is not a directory"));
    }
    if meta.mode() & STICKY != 0 {
        // A shared directory such as /tmp (kmsd run by root with `--socket /tmp/x.sock`):
        // its mode is not ours to change. The socket file's own mode (0600 or 0660, and
        // created under umask 077) keeps other users out; the sticky bit keeps them from
        // replacing it.
        return Ok(());
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        // A directory owned by someone else (e.g. systemd's RuntimeDirectory owned by root
        // for a system daemon) is acceptable only if others cannot write to it.
        if meta.mode() & 0o022 != 0 {
            return Err(path_err(
                dir,
                "is owned by another user and writable by others; refusing to put the socket there",
            ));
        }
        return Ok(());
    }
    set_group(dir, group)?;
    if meta.mode() & 0o777 != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| path_err(dir, format!("cannot set mode {mode:o}: {e}")))?;
    }
    Ok(())
}

/// Accepts connections until shutdown; each runs in its own task, at most
/// `max_connections` at once (further clients wait in the kernel's backlog).
pub async fn serve(
    listener: UnixListener,
    engine: Arc<Engine>,
    service: Arc<Service>,
    config: Arc<Config>,
    mut shutdown: Shutdown,
) {
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let per_account = ConnectionsPerAccount::new(config.max_connections_per_account);
    // Connections being refused for their account's limit: a refusal waits (briefly) for
    // the client's hello to answer it, without holding one of the `limit` slots.
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let daemon_uid = rustix::process::geteuid().as_raw();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.recv() => return,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.recv() => return,
        };
        let caller = match identify(&stream) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read peer credentials; closing");
                continue;
            }
        };
        let exempt = crate::authz::is_superuser(&caller, daemon_uid);
        let Some(account_slot) = per_account.take(caller.uid, exempt) else {
            drop(permit);
            tracing::debug!(account = %caller.account, "connection limit of the account reached");
            if let Ok(refusal) = refusing.clone().try_acquire_owned() {
                let err = WireError::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "account {} already has {} connections to kmsd, the most one account \
                         may hold",
                        caller.account, config.max_connections_per_account
                    ),
                );
                let wait = config.frame_timeout;
                tokio::spawn(async move {
                    crate::connection::refuse(stream, err, wait).await;
                    drop(refusal);
                });
            }
            continue;
        };
        let conn = Connection::new(
            stream,
            caller,
            engine.clone(),
            service.clone(),
            config.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            conn.run().await;
            drop(account_slot);
            drop(permit);
        });
    }
}

/// Refusals answered at once at most; beyond them a refused connection is just closed.
const REFUSING: usize = 64;

/// Open connections per account (uid), against `max_connections_per_account`.
#[derive(Clone)]
struct ConnectionsPerAccount {
    max: usize,
    open: Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>>,
}

/// One connection of an account; gives its place back when dropped.
struct AccountSlot {
    uid: u32,
    of: ConnectionsPerAccount,
}

impl ConnectionsPerAccount {
    fn new(max: usize) -> Self {
        ConnectionsPerAccount {
            max,
            open: Arc::default(),
        }
    }

    /// A place for one more connection of `uid`, unless it holds the most already
    /// (`exempt` accounts are counted but never refused).
    fn take(&self, uid: u32, exempt: bool) -> Option<AccountSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(uid).or_insert(0);
        if *n >= self.max && !exempt {
            return None;
        }
        *n += 1;
        Some(AccountSlot {
            uid,
            of: self.clone(),
        })
    }
}

impl Drop for AccountSlot {
    fn drop(&mut self) {
        let mut open = self.of.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// The peer as the kernel reports it at accept time. The identity is fixed for the
/// connection's life: passing the socket to another process does not change it.
fn identify(stream: &UnixStream) -> std::io::Result<Caller> {
    let cred = stream.peer_cred()?;
    let uid = cred.uid();
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
    let account = uzers::get_user_by_uid(uid)
        .map(|u| u.name().to_string_lossy().into_owned())
        .unwrap_or_else(|| uid.to_string());
    // Group names for group grants: the primary group and the supplementary ones.
    let groups = uzers::get_user_by_uid(uid)
        .and_then(|u| uzers::get_user_groups(u.name(), cred.gid()))
        .unwrap_or_default()
        .into_iter()
        .map(|g| g.name().to_string_lossy().into_owned())
        .collect();
    let client = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| program_name(&s))
        .unwrap_or_else(|_| "?".into());
    Ok(Caller {
        uid,
        gid: cred.gid(),
        pid,
        account,
        groups,
        client,
    })
}

/// The program name as history records it: `comm` without its newline, control
/// characters as `?`. A process names itself, so the name is the caller's text: kept out
/// of every reader's terminal as control sequences (kmsctl escapes them as well).
fn program_name(comm: &str) -> String {
    comm.trim_end_matches('\n')
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A `kmsd.lock` that is a link is refused, and the file it names left alone: kmsd
    /// (or a restore) run by root in a directory another account can write must not
    /// open, lock or hand over a file of someone else's choosing.
    #[test]
    fn a_linked_lock_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, data.join("kmsd.lock")).unwrap();
        assert!(lock_data_dir(&data).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        std::fs::remove_file(data.join("kmsd.lock")).unwrap();
        let _lock = lock_data_dir(&data).unwrap();
    }

    /// A program name with control characters is recorded with `?` in their place.
    #[test]
    fn program_names_lose_their_control_characters() {
        assert_eq!(program_name("kmsctl\n"), "kmsctl");
        assert_eq!(program_name("a\r\u{1b}[K\n"), "a??[K");
        assert_eq!(program_name("tab\there "), "tab?here ");
    }
    use std::os::unix::fs::PermissionsExt;

    /// `kmsd --socket /tmp/kmsd.sock` once made /tmp 0700 when run by root. A shared
    /// (sticky) directory keeps its mode; the data directory may not be one.
    #[test]
    fn shared_directories_keep_their_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();

        prepare_socket_dir(&shared, 0o700, None).unwrap();
        let mode = std::fs::metadata(&shared).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o1777);

        let err = lock_data_dir(&shared).unwrap_err().to_string();
        assert!(err.contains("shared directory"), "{err}");
        let mode = std::fs::metadata(&shared).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o1777);

        // A private directory of ours is still made private.
        let own = tmp.path().join("own");
        std::fs::create_dir(&own).unwrap();
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_socket_dir(&own, 0o700, None).unwrap();
        assert_eq!(std::fs::metadata(&own).unwrap().mode() & 0o7777, 0o700);
    }
}
