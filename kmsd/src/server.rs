//! The listening side: the data-directory lock, the socket directory and file with their
//! permissions, stale-socket detection, and the accept loop with its connection limit.
//!
//! The listener is tokio's `UnixListener`, not `interprocess`: the daemon needs the
//! kernel's peer credentials (`SO_PEERCRED`) of every connection, which interprocess does
//! not expose for its tokio streams (the clients do use interprocess).

use crate::budget::Budget;
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
    /// kmsd's own uid reads as its user namespace's overflow uid.
    #[error(
        "kmsd's own uid is not mapped in its user namespace (it reads as {0}, as every \
         unmapped account does): it could not tell its own files and peers from theirs; \
         run it where its uid is mapped"
    )]
    UnmappedSelf(u32),
    /// A data directory of another account: kmsd serves only its own account's store.
    #[error(
        "the data directory {path} belongs to {owner}, not to {me} that kmsd runs as: \
         refusing to serve another account's store (run kmsd as {owner}; for the system \
         service: systemctl start kmsd.socket)"
    )]
    ForeignDataDir {
        path: PathBuf,
        owner: String,
        me: String,
    },
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
    file: File,
}

impl DataDirLock {
    /// Writes the socket this daemon serves into the lock file, for a client that finds
    /// the store held and nothing answering on its own socket (the same account with and
    /// without a login session has two default sockets) to say where the daemon is.
    /// Nothing depends on it: a failure is only logged.
    pub fn tell_socket(&self, socket: &Path) {
        use std::os::unix::ffi::OsStrExt as _;
        use std::os::unix::fs::FileExt as _;
        let written = self
            .file
            .set_len(0)
            .and_then(|()| self.file.write_all_at(socket.as_os_str().as_bytes(), 0));
        if let Err(e) = written {
            tracing::debug!(error = %e, "cannot write the socket into kmsd.lock");
        }
    }
}

/// The account name of `uid` for messages, or the number.
fn account_name(uid: u32) -> String {
    uzers::get_user_by_uid(uid)
        .map(|u| format!("{} (uid {uid})", u.name().to_string_lossy()))
        .unwrap_or_else(|| format!("uid {uid}"))
}

/// Refuses a data directory that exists and belongs to another account than kmsd's
/// effective one. Root's default data directory is `/var/lib/kms`, the system service's
/// store (owned by `kms`): a root kmsd there, started by hand or by a root client while
/// the service was stopped, served the service's keys under other rules and left root's
/// files in its directory, which the service could no longer open.
pub fn check_data_dir_owner(dir: &Path) -> Result<(), ServerError> {
    let me = rustix::process::geteuid().as_raw();
    match std::fs::metadata(dir) {
        Ok(meta) if meta.uid() != me => Err(ServerError::ForeignDataDir {
            path: dir.to_path_buf(),
            owner: account_name(meta.uid()),
            me: account_name(me),
        }),
        _ => Ok(()),
    }
}

/// [`lock_data_dir`] for a daemon about to serve the directory: refused, before anything
/// is created or opened in it, unless it belongs to kmsd's account
/// ([`check_data_dir_owner`]).
pub fn lock_data_dir_to_serve(dir: &Path) -> Result<DataDirLock, ServerError> {
    check_data_dir_owner(dir)?;
    lock_data_dir(dir)
}

/// Creates the data directory (0700) and takes its exclusive lock: one daemon per store.
///
/// A directory of another account is refused, except to root: `kmsd restore` run by root
/// restores into the service's directory (owned by `kms`) and hands the files it writes
/// over to that account. A daemon locks with [`lock_data_dir_to_serve`], which refuses
/// such a directory to root as well.
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
    let me = rustix::process::geteuid();
    if !me.is_root() {
        check_data_dir_owner(dir)?;
    }
    if meta.uid() == me.as_raw() && meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| path_err(dir, format!("cannot restrict to 0700: {e}")))?;
    }
    match lock_file(&dir.join("kmsd.lock"))? {
        Some(file) => Ok(DataDirLock { file }),
        None => Err(ServerError::DataDirLocked(dir.to_path_buf())),
    }
}

/// Opens (creating it) and locks a lock file, exclusively and without waiting; `None` if
/// another process holds it.
fn lock_file(lock_path: &Path) -> Result<Option<File>, ServerError> {
    // Not through a link: kmsd (or `kmsd restore`) run by root on a directory another
    // account can write would otherwise open, and a restore hand over, any file.
    use std::os::unix::fs::OpenOptionsExt as _;
    let open = |write: bool| {
        std::fs::OpenOptions::new()
            .create(write)
            .truncate(false)
            .write(write)
            .read(!write)
            .custom_flags(crate::store::journal::NOFOLLOW)
            .open(lock_path)
    };
    // A lock file left by root (kmsd once run as root on the same directory) cannot be
    // opened for writing by the service's account; locking needs only a descriptor.
    let file = match open(true) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => open(false),
        opened => opened,
    }
    .map_err(|e| path_err(lock_path, e))?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(path_err(lock_path, "is not a regular file"));
    }
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(path_err(lock_path, e)),
    }
}

/// Locks the socket's lock file ([`bind`]); refused as served if another process holds
/// it. Held through a file another account made (not root, which may have left it), the
/// holder need not be a kmsd: in a directory others can write (a socket in /tmp), any
/// account can make and hold that file to keep this path from being served; said so
/// rather than "another kmsd". (The data directory's lock is not judged so: it may be
/// the service account's, held by the service, when root runs `kmsd restore`.)
fn lock_socket(lock_path: &Path, socket: &Path) -> Result<File, ServerError> {
    if let Some(file) = lock_file(lock_path)? {
        return Ok(file);
    }
    let me = rustix::process::geteuid().as_raw();
    match std::fs::symlink_metadata(lock_path).map(|m| m.uid()) {
        Ok(owner) if owner != me && owner != 0 => Err(path_err(
            lock_path,
            format!(
                "is held by a process of uid {owner}, another account: it may be a kmsd, \
                 or someone keeping this path from being served (in a directory others can \
                 write, any account can); use a directory only this account can write"
            ),
        )),
        _ => Err(ServerError::AlreadyServing(socket.to_path_buf())),
    }
}

/// Held while kmsd serves the socket it bound: see [`bind`].
pub struct SocketLock {
    _file: File,
}

/// `.<socket name>.lock` beside the socket: hidden, and never the data directory's
/// `kmsd.lock`, even with the socket inside the data directory and named `kmsd`.
fn socket_lock_path(socket: &Path, dir: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(socket.file_name().unwrap_or_default());
    name.push(".lock");
    dir.join(name)
}

/// Binds the socket: a private directory (0700, or 0750 with the group), a stale socket
/// file replaced, a live one refused, the socket 0600 (or 0660 with the group).
///
/// The probe for a live socket, the removal of a stale one and the bind are made under a
/// lock beside the socket (`.<socket name>.lock`), held while the socket is served: two kmsd
/// starting at once on one socket path (with different data directories) could otherwise
/// both find it stale, and the second remove the socket the first had just bound.
///
/// Refuses first a data directory of another account ([`check_data_dir_owner`]): kmsd
/// never serves another account's store, even where its caller locked the directory
/// without that check.
pub fn bind(config: &Config) -> Result<(UnixListener, SocketLock), ServerError> {
    check_data_dir_owner(&config.data_dir)?;
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
    let lock = lock_socket(&socket_lock_path(path, dir), path)?;

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
    let listener = bind_with_mode(path, sock_mode)?;
    // From here an error removes the socket file again (the one just bound, only).
    let bound = crate::systemd::OwnSocketFile::bound(path);
    set_group(path, group)?;
    // A default ACL on the directory overrides the umask: never a socket more open than
    // asked.
    let meta = std::fs::symlink_metadata(path).map_err(|e| path_err(path, e))?;
    if meta.mode() & 0o777 & !sock_mode != 0 {
        return Err(path_err(
            path,
            format!(
                "was created with mode {:o} instead of {sock_mode:o} (a default ACL on its \
                 directory?); refusing to serve it",
                meta.mode() & 0o777
            ),
        ));
    }
    bound.keep();
    Ok((listener, SocketLock { _file: lock }))
}

/// Binds `path` so that the socket file is created with `mode` (0600 or 0660) and is
/// never chmod'ed by path afterwards: a chmod through the path follows a link put there
/// in between, and Linux has no chmod that does not follow (`fchmodat`'s
/// `AT_SYMLINK_NOFOLLOW` is refused; a socket's descriptor does not reach its file). So
/// the umask is narrowed around the bind, to give the file `mode` from the start, and put
/// back at once. The umask is the process's: this runs at start-up, before kmsd has
/// threads that create files (the store writer is idle, nothing else runs yet), and the
/// umask it sets is no wider for owners than kmsd's own 077.
fn bind_with_mode(path: &Path, mode: u32) -> Result<UnixListener, ServerError> {
    let previous = rustix::process::umask(Mode::from_raw_mode(0o777 & !mode));
    let bound = UnixListener::bind(path);
    rustix::process::umask(previous);
    bound.map_err(|e| path_err(path, format!("cannot bind: {e}")))
}

/// Gives the socket file `path` the group `gid`, unless it has it already: under the
/// system unit (`Group=kms`) it always has, and the unit's syscall filter refuses `chown`
/// (@privileged) — kmsd binding its socket itself, without the socket unit, then failed
/// to start. The file itself, never what a link in its place names (`fchownat` with
/// `AT_SYMLINK_NOFOLLOW`).
fn set_group(path: &Path, group: Option<u32>) -> Result<(), ServerError> {
    let Some(gid) = group else {
        return Ok(());
    };
    let meta = std::fs::symlink_metadata(path).map_err(|e| path_err(path, e))?;
    if meta.gid() == gid {
        return Ok(());
    }
    rustix::fs::chownat(
        rustix::fs::CWD,
        path,
        None,
        Some(rustix::fs::Gid::from_raw(gid)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| path_err(path, format!("cannot set the group: {e}")))
}

/// Makes the socket directory, or checks an existing one. Only a directory kmsd creates
/// here gets the socket's mode (0700, or 0750 with `group`) and group: an existing one
/// (a home directory, `$XDG_RUNTIME_DIR`, a directory an administrator prepared) is
/// refused if it lets others in, never changed — kmsd once made a 0700 home directory
/// 0750 and gave it to the socket's group.
fn prepare_socket_dir(dir: &Path, mode: u32, group: Option<u32>) -> Result<(), ServerError> {
    match std::fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| path_err(parent, format!("cannot create: {e}")))?;
            }
            match rustix::fs::mkdir(dir, Mode::from_raw_mode(0o700)) {
                Ok(()) => return adopt_created_dir(dir, mode, group),
                // Made by someone else meanwhile: checked as any existing directory.
                Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(path_err(dir, format!("cannot create: {e}"))),
            }
        }
        Err(e) => return Err(path_err(dir, e)),
    }
    check_existing_socket_dir(dir, group)
}

/// Gives the directory kmsd just made its mode and group, through a descriptor of the
/// directory itself (not a link, and the same one kmsd made): it must be a directory
/// of kmsd's account that group and others cannot enter. In a directory others may write (the `/tmp/kms-$UID`
/// fallback), anything found otherwise was put there by someone else.
fn adopt_created_dir(dir: &Path, mode: u32, group: Option<u32>) -> Result<(), ServerError> {
    use rustix::fs::OFlags;
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| path_err(dir, format!("cannot open the directory just created: {e}")))?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| path_err(dir, e))?;
    let me = rustix::process::geteuid().as_raw();
    // Made 0700, less what the umask takes away: the owner's bits may be fewer (the
    // umask is the process's, and `bind_with_mode` narrows it for a moment), never the
    // group's or others' more.
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(path_err(
            dir,
            "is not the private directory kmsd just created (replaced meanwhile?); \
             refusing to put the socket there",
        ));
    }
    if let Some(gid) = group
        && meta.gid() != gid
    {
        rustix::fs::fchown(&file, None, Some(rustix::fs::Gid::from_raw(gid)))
            .map_err(|e| path_err(dir, format!("cannot set the group: {e}")))?;
    }
    if meta.mode() & 0o777 != mode {
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))
            .map_err(|e| path_err(dir, format!("cannot set mode {mode:o}: {e}")))?;
    }
    Ok(())
}

/// Checks, without changing it, a socket directory that already existed: a directory (not
/// a link) of kmsd's account or root's, which group and others cannot write unless it is
/// sticky. A directory another account made (say `/tmp/kms-1000`, before its owner) could
/// be used to intercept clients or replace the socket.
fn check_existing_socket_dir(dir: &Path, group: Option<u32>) -> Result<(), ServerError> {
    let meta = std::fs::symlink_metadata(dir).map_err(|e| path_err(dir, e))?;
    if meta.file_type().is_symlink() {
        return Err(path_err(
            dir,
            "is a symbolic link; refusing to put the socket behind it",
        ));
    }
    if !meta.is_dir() {
        return Err(path_err(dir, "is not a directory"));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(path_err(
            dir,
            format!(
                "belongs to {}, neither kmsd's account nor root; refusing to put the socket \
                 there (another account may have created it to intercept clients)",
                account_name(meta.uid())
            ),
        ));
    }
    if meta.mode() & STICKY != 0 {
        // A shared directory such as /tmp (kmsd run by root with `--socket /tmp/x.sock`):
        // the socket file's own mode (0600 or 0660, given at bind) keeps other users
        // out; the sticky bit keeps them from replacing it.
        return Ok(());
    }
    if meta.mode() & 0o022 != 0 {
        return Err(path_err(
            dir,
            format!(
                "is writable by group or others (mode {:o}); refusing to put the socket \
                 there (kmsd does not change a directory it did not create)",
                meta.mode() & 0o7777
            ),
        ));
    }
    if let Some(gid) = group {
        let group_searches = meta.gid() == gid && meta.mode() & 0o010 != 0;
        if !group_searches && meta.mode() & 0o001 == 0 {
            tracing::warn!(
                dir = %dir.display(),
                mode = format!("{:o}", meta.mode() & 0o7777),
                "the socket group cannot reach the socket through this directory, which kmsd \
                 did not create and leaves as it is"
            );
        }
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
    unmapped: Unmapped,
    mut shutdown: Shutdown,
) {
    let limit = Arc::new(Semaphore::new(config.max_connections));
    // Connections being refused (for their account's limit, or a uid the user namespace
    // does not map): a refusal waits (briefly) for the client's hello to answer it,
    // without holding one of the `limit` slots.
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let daemon_uid = rustix::process::geteuid().as_raw();
    if let Some(overflow_uid) = unmapped.uid {
        tracing::info!(
            overflow_uid,
            "kmsd's user namespace does not map every account: peers it does not map are refused"
        );
    }
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
        // Before anything is looked up for the peer.
        let unmapped_peer = stream
            .peer_cred()
            .ok()
            .and_then(|c| unmapped.uid.filter(|&overflow| overflow == c.uid()));
        if let Some(overflow) = unmapped_peer {
            drop(permit);
            tracing::debug!(
                uid = overflow,
                "refused a peer the user namespace does not map"
            );
            let why = format!(
                "kmsd runs in a user namespace that does not map your uid: it reads as \
                 {overflow}, as every unmapped account does, so kmsd cannot tell who you are; \
                 connect from inside the namespace"
            );
            refuse_in_turn(stream, why, &refusing, config.frame_timeout);
            continue;
        }
        let caller = match identify(&stream, unmapped) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read peer credentials; closing");
                continue;
            }
        };
        let exempt = crate::authz::is_superuser(&caller, daemon_uid);
        let Some(account_slot) = service.per_account.take(caller.uid, exempt) else {
            drop(permit);
            tracing::debug!(account = %caller.account, "connection limit of the account reached");
            let why = format!(
                "account {} already has {} connections to kmsd, the most one account may hold",
                caller.account, config.max_connections_per_account
            );
            refuse_in_turn(stream, why, &refusing, config.frame_timeout);
            continue;
        };
        let conn = Connection::new(
            stream,
            caller,
            engine.clone(),
            service.clone(),
            config.clone(),
            account_slot.bytes.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            conn.run().await;
            drop(account_slot);
            drop(permit);
        });
    }
}

/// Answers a refused connection's hello (read within `wait`) with `permission-denied` and
/// `why`, in a task of its own holding one of the `refusing` permits; with none left, the
/// connection is just closed.
fn refuse_in_turn(
    stream: UnixStream,
    why: String,
    refusing: &Arc<Semaphore>,
    wait: std::time::Duration,
) {
    let Ok(refusal) = refusing.clone().try_acquire_owned() else {
        return;
    };
    let err = WireError::new(ErrorKind::PermissionDenied, why);
    tokio::spawn(async move {
        crate::connection::refuse(stream, err, wait).await;
        drop(refusal);
    });
}

/// Refusals answered at once at most; beyond them a refused connection is just closed.
const REFUSING: usize = 64;

/// Open connections per account (uid), against `max_connections_per_account`, and the
/// bytes each account's connections hold, against `max_buffered_bytes_per_account`.
#[derive(Clone)]
pub(crate) struct ConnectionsPerAccount {
    max: usize,
    max_bytes: usize,
    open: Arc<std::sync::Mutex<std::collections::HashMap<u32, Account>>>,
}

/// One account's open connections and what they hold.
struct Account {
    connections: usize,
    bytes: Arc<Budget>,
}

/// One connection of an account; gives its place back when dropped.
struct AccountSlot {
    uid: u32,
    of: ConnectionsPerAccount,
    /// The account's byte budget, shared by its connections.
    bytes: Arc<Budget>,
}

impl ConnectionsPerAccount {
    pub(crate) fn new(max: usize, max_bytes: usize) -> Self {
        ConnectionsPerAccount {
            max,
            max_bytes,
            open: Arc::default(),
        }
    }

    /// The connections `uid` holds open now.
    pub(crate) fn open(&self, uid: u32) -> u64 {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&uid).map_or(0, |a| a.connections as u64)
    }

    /// A place for one more connection of `uid`, unless it holds the most already
    /// (`exempt` accounts are counted but never refused). Every account's connections
    /// share one byte budget, root's and kmsd's own included: they may open any number
    /// of connections, which must not mean any amount of kmsd's memory.
    fn take(&self, uid: u32, exempt: bool) -> Option<AccountSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let account = open.entry(uid).or_insert_with(|| Account {
            connections: 0,
            bytes: Arc::new(Budget::new(self.max_bytes)),
        });
        if account.connections >= self.max && !exempt {
            return None;
        }
        account.connections += 1;
        Some(AccountSlot {
            uid,
            of: self.clone(),
            bytes: account.bytes.clone(),
        })
    }
}

impl Drop for AccountSlot {
    fn drop(&mut self) {
        let mut open = self.of.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = open.get_mut(&self.uid) {
            a.connections -= 1;
            // The slot is dropped once its connection has answered its calls (but for
            // one given up at a stop), so nothing counts in the budget any more.
            if a.connections == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// The ids the kernel reports for peers that kmsd's user namespace does not map (its
/// `overflowuid` and `overflowgid`, 65534 unless changed), when kmsd runs in a user
/// namespace that does not map every id (a rootless container): every account outside
/// the mapping then reads as that one uid, and every unmapped group as that one gid, so
/// neither names anybody. In the initial namespace every id is mapped, and 65534 is an
/// account like any other (`nobody`). The uid and gid maps are read apart (a namespace
/// may map every uid and not every gid), once, at start, as are the overflow ids.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unmapped {
    /// The overflow uid, if the uid map leaves some uid unmapped.
    pub uid: Option<u32>,
    /// The overflow gid, if the gid map leaves some gid unmapped.
    pub gid: Option<u32>,
}

impl Unmapped {
    pub fn detect() -> Unmapped {
        Unmapped {
            uid: unmapped_id("/proc/self/uid_map", "/proc/sys/kernel/overflowuid"),
            gid: unmapped_id("/proc/self/gid_map", "/proc/sys/kernel/overflowgid"),
        }
    }
}

/// The overflow id (read from `overflow`) if the id map at `map` does not map every id.
/// A map that cannot be read (no `/proc`) counts as not mapping every id: refusing a
/// peer that reads as 65534 costs little, serving every unmapped account as one would
/// not.
fn unmapped_id(map: &str, overflow: &str) -> Option<u32> {
    match std::fs::read_to_string(map) {
        Ok(text) if maps_every_id(&text) => return None,
        Ok(_) => {}
        Err(e) => tracing::warn!(
            error = %e,
            map,
            "cannot read kmsd's user namespace map; peers that read as the overflow id are refused"
        ),
    }
    Some(
        std::fs::read_to_string(overflow)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(65534),
    )
}

/// Whether `map` (the text of `/proc/self/uid_map` or `gid_map`) maps every id: the
/// initial namespace's single identity range (or a child namespace's copy of it).
fn maps_every_id(map: &str) -> bool {
    let mut lines = map
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>());
    lines.next().is_some_and(|l| l == ["0", "0", "4294967295"]) && lines.next().is_none()
}

/// Refuses to serve where kmsd's own uid is one its user namespace does not map (a
/// namespace made without a map): it would read as the overflow uid, as every unmapped
/// peer does, and the checks that compare an owner or a peer with kmsd's own account
/// would pass for all of them.
pub(crate) fn refuse_an_unmapped_self(unmapped: Unmapped) -> Result<(), ServerError> {
    let me = rustix::process::geteuid().as_raw();
    match unmapped.uid {
        Some(overflow) if overflow == me => Err(ServerError::UnmappedSelf(me)),
        _ => Ok(()),
    }
}

/// The peer as the kernel reports it at accept time. The identity is fixed for the
/// connection's life: passing the socket to another process does not change it. Groups
/// the user namespace does not map (`unmapped`) are left out: they name no group.
fn identify(stream: &UnixStream, unmapped: Unmapped) -> std::io::Result<Caller> {
    let cred = stream.peer_cred()?;
    let uid = cred.uid();
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
    let account = uzers::get_user_by_uid(uid)
        .map(|u| u.name().to_string_lossy().into_owned())
        .unwrap_or_else(|| uid.to_string());
    // Group names for group grants: the peer's gid and the supplementary groups the
    // kernel gives the peer process (SPEC §6: what the kernel says), not those the user
    // database lists for its account: a process that dropped a group (a sandboxed
    // service, `setpriv --clear-groups`) no longer holds that group's grants, and one
    // given a group at start (systemd's `SupplementaryGroups=`) holds them.
    let gids = match peer_groups(stream) {
        Ok(gids) => gids,
        // Linux before 4.13 has no SO_PEERGROUPS: the account's groups, as before.
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => uzers::get_user_by_uid(uid)
            .and_then(|u| uzers::get_user_groups(u.name(), cred.gid()))
            .unwrap_or_default()
            .iter()
            .map(|g| g.gid())
            .collect(),
        // Any other failure: no supplementary group, rather than groups the process may
        // have dropped.
        Err(e) => {
            tracing::warn!(error = %e, uid, "cannot read a peer's groups; using its gid only");
            Vec::new()
        }
    };
    let mut gids: Vec<u32> = std::iter::once(cred.gid()).chain(gids).collect();
    gids.retain(|&g| unmapped.gid != Some(g));
    gids.sort_unstable();
    gids.dedup();
    let groups = gids
        .into_iter()
        .filter_map(|gid| {
            uzers::get_group_by_gid(gid).map(|g| (g.name().to_string_lossy().into_owned(), gid))
        })
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

/// The supplementary groups of the peer process, as the kernel recorded them when it
/// connected (`SO_PEERGROUPS`).
#[allow(unsafe_code)]
fn peer_groups(stream: &impl std::os::fd::AsRawFd) -> std::io::Result<Vec<u32>> {
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut gids: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = libc::socklen_t::try_from(gids.len() * GID)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
        // SAFETY: `gids` is `len` writable bytes of `gid_t`s; the kernel writes at most
        // `len` bytes there and sets `len` to what it wrote (or, with ERANGE, needs).
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                gids.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / GID;
        if r == 0 {
            gids.truncate(needed);
            return Ok(gids);
        }
        let e = std::io::Error::last_os_error();
        // Too small a buffer: the kernel said how large (at most NGROUPS_MAX, 65,536).
        if e.raw_os_error() == Some(libc::ERANGE) && needed > gids.len() && needed <= 65_536 {
            gids.resize(needed, 0);
            continue;
        }
        return Err(e);
    }
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

    /// The groups of a peer are the process's own, as the kernel has them: here the
    /// test's process at both ends of a socket pair.
    #[test]
    fn peer_groups_are_the_processes() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut seen = peer_groups(&a).unwrap();
        seen.sort_unstable();
        let mut own: Vec<u32> = rustix::process::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        own.sort_unstable();
        own.dedup();
        seen.dedup();
        assert_eq!(seen, own);
    }

    #[test]
    fn only_the_identity_map_maps_every_id() {
        assert!(maps_every_id("         0          0 4294967295\n"));
        // `unshare --map-root-user` run by root, and by an account.
        assert!(!maps_every_id("         0          0          1\n"));
        assert!(!maps_every_id("         0       1000          1\n"));
        // A container's usual map, in two ranges.
        assert!(!maps_every_id("0 1000 1\n1 100000 65536\n"));
        assert!(!maps_every_id(""));
    }

    #[test]
    fn kmsd_refuses_to_serve_as_an_unmapped_uid() {
        let me = rustix::process::geteuid().as_raw();
        let as_overflow = Unmapped {
            uid: Some(me),
            gid: None,
        };
        assert!(matches!(
            refuse_an_unmapped_self(as_overflow),
            Err(ServerError::UnmappedSelf(uid)) if uid == me
        ));
        let other = Unmapped {
            uid: Some(me.wrapping_add(1)),
            gid: None,
        };
        assert!(refuse_an_unmapped_self(other).is_ok());
        assert!(refuse_an_unmapped_self(Unmapped::default()).is_ok());
    }

    /// The group a user namespace gives every group it does not map is no group of the
    /// peer's: its grants must not apply.
    #[tokio::test]
    async fn groups_the_namespace_does_not_map_are_left_out() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let gid = rustix::process::getegid().as_raw();
        let group = uzers::get_group_by_gid(gid).expect("the test's own group has a name");
        let name = group.name().to_string_lossy().into_owned();
        let seen = identify(&a, Unmapped::default()).unwrap();
        assert!(
            seen.groups.iter().any(|(n, _)| *n == name),
            "{:?}",
            seen.groups
        );
        let unmapped = Unmapped {
            uid: Some(u32::MAX - 1),
            gid: Some(gid),
        };
        let seen = identify(&a, unmapped).unwrap();
        assert!(
            seen.groups.iter().all(|(n, g)| *n != name && *g != gid),
            "{:?}",
            seen.groups
        );
    }

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

    /// A lock file made by another account and held by its process (a socket in /tmp,
    /// another user holding `/tmp/.x.sock.lock`) is reported as that, with the uid, not as
    /// "another kmsd is serving". (Needs root, to give the file to another uid.)
    #[test]
    fn a_lock_held_through_another_accounts_file_is_named() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(".kmsd.sock.lock");
        std::fs::write(&path, b"").unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let socket = tmp.path().join("kmsd.sock");
        let _held = lock_file(&path).unwrap().unwrap();
        let refused = lock_socket(&path, &socket).map(|_| ()).unwrap_err();
        assert!(refused.to_string().contains("uid 65534"), "{refused}");
        // One's own (or root's) file held by another process stays "already serving".
        let own = tmp.path().join(".own.sock.lock");
        let _own = lock_file(&own).unwrap().unwrap();
        let refused = lock_socket(&own, &socket).map(|_| ()).unwrap_err();
        assert!(
            matches!(refused, ServerError::AlreadyServing(_)),
            "{refused}"
        );
        // The data directory's lock, the service account's, held by the service, stays
        // "another kmsd holds the data directory" for root's `kmsd restore`.
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("kmsd.lock"), b"").unwrap();
        std::os::unix::fs::chown(data.join("kmsd.lock"), Some(65534), Some(65534)).unwrap();
        let _service = lock_file(&data.join("kmsd.lock")).unwrap().unwrap();
        let refused = lock_data_dir(&data).map(|_| ()).unwrap_err();
        assert!(
            matches!(refused, ServerError::DataDirLocked(_)),
            "{refused}"
        );
    }

    /// The probe for a live socket, the removal of a stale one and the bind happen under
    /// the socket's lock: while another kmsd holds it (between its own probe and bind, or
    /// serving), a second refuses the socket as served and leaves the file alone. Two
    /// starting at once could both find the socket stale, and the second remove the one
    /// the first had just bound.
    #[tokio::test]
    async fn the_socket_is_probed_and_replaced_under_its_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = Config::defaults();
        config.socket = tmp.path().join("run/kmsd.sock");
        config.data_dir = tmp.path().join("data");
        std::fs::create_dir_all(tmp.path().join("run")).unwrap();
        chmod(&tmp.path().join("run"), 0o700);
        drop(std::os::unix::net::UnixListener::bind(&config.socket).unwrap());
        let answers = |p: &Path| std::os::unix::net::UnixStream::connect(p).is_ok();
        assert!(!answers(&config.socket), "precondition: a stale socket");

        let other = lock_file(&tmp.path().join("run/.kmsd.sock.lock"))
            .unwrap()
            .unwrap();
        let refused = bind(&config).map(|_| ()).unwrap_err();
        assert!(
            matches!(refused, ServerError::AlreadyServing(_)),
            "{refused}"
        );
        assert!(
            std::fs::symlink_metadata(&config.socket).is_ok(),
            "the socket file was removed under another daemon's lock"
        );
        drop(other);

        let (_listener, _lock) = bind(&config).unwrap();
        assert!(answers(&config.socket), "the stale socket was replaced");
        let refused = bind(&config).map(|_| ()).unwrap_err();
        assert!(
            matches!(refused, ServerError::AlreadyServing(_)),
            "{refused}"
        );
        assert!(answers(&config.socket));
    }

    /// A socket inside the data directory named `kmsd` has its lock beside it, not in the
    /// data directory's `kmsd.lock`, which the daemon already holds: such a kmsd refused to
    /// start, "another kmsd is serving".
    #[tokio::test]
    async fn a_socket_named_kmsd_in_the_data_directory_is_served() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = Config::defaults();
        config.data_dir = tmp.path().join("data");
        config.socket = config.data_dir.join("kmsd");
        let _data = lock_data_dir_to_serve(&config.data_dir).unwrap();
        let (_listener, _lock) = bind(&config).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&config.socket).is_ok());
    }

    /// A program name with control characters is recorded with `?` in their place.
    #[test]
    fn program_names_lose_their_control_characters() {
        assert_eq!(program_name("kmsctl\n"), "kmsctl");
        assert_eq!(program_name("a\r\u{1b}[K\n"), "a??[K");
        assert_eq!(program_name("tab\there "), "tab?here ");
    }
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn chown(p: &Path, uid: u32) {
        rustix::fs::chown(p, Some(rustix::fs::Uid::from_raw(uid)), None).unwrap();
    }

    /// Giving files to other accounts needs root (as the tests run in CI).
    fn root() -> bool {
        let root = rustix::process::geteuid().is_root();
        if !root {
            eprintln!("skipped: needs root to give directories to other uids");
        }
        root
    }

    /// `kmsd --socket /tmp/kmsd.sock` once made /tmp 0700 when run by root. A shared
    /// (sticky) directory keeps its mode; the data directory may not be one.
    #[test]
    fn shared_directories_keep_their_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        chmod(&shared, 0o1777);

        prepare_socket_dir(&shared, 0o700, None).unwrap();
        assert_eq!(mode_of(&shared), 0o1777);

        let err = lock_data_dir(&shared).unwrap_err().to_string();
        assert!(err.contains("shared directory"), "{err}");
        assert_eq!(mode_of(&shared), 0o1777);
    }

    /// A socket directory that existed is checked, never changed: kmsd once made a 0700
    /// home directory 0750 and gave it to the `--socket-group`, and opened a 0755 one's
    /// mode to its own idea. One that group or others may write is refused as it is.
    #[test]
    fn existing_socket_directories_are_never_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        std::fs::create_dir(&home).unwrap();
        chmod(&home, 0o700);
        let gid = std::fs::metadata(&home).unwrap().gid();
        // Any group other than the directory's, for `--socket-group`.
        let other_gid = if gid == 4242 { 4243 } else { 4242 };
        if root() {
            prepare_socket_dir(&home, 0o750, Some(other_gid)).unwrap();
            assert_eq!(mode_of(&home), 0o700);
            assert_eq!(std::fs::metadata(&home).unwrap().gid(), gid);
        }
        chmod(&home, 0o755);
        prepare_socket_dir(&home, 0o700, None).unwrap();
        assert_eq!(mode_of(&home), 0o755);

        for open in [0o775, 0o757] {
            chmod(&home, open);
            let err = prepare_socket_dir(&home, 0o700, None)
                .unwrap_err()
                .to_string();
            assert!(err.contains("writable by group or others"), "{err}");
            assert_eq!(mode_of(&home), open);
        }
    }

    /// A directory kmsd creates gets the socket's mode and group; missing parents are
    /// made on the way.
    #[test]
    fn created_socket_directories_get_their_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let private = tmp.path().join("a/b/run");
        prepare_socket_dir(&private, 0o700, None).unwrap();
        assert_eq!(mode_of(&private), 0o700);
        if root() {
            let shared = tmp.path().join("shared-run");
            prepare_socket_dir(&shared, 0o750, Some(4242)).unwrap();
            assert_eq!(mode_of(&shared), 0o750);
            assert_eq!(std::fs::metadata(&shared).unwrap().gid(), 4242);
        }
    }

    /// The `/tmp/kms-$UID` fallback taken by someone else first: a directory of another
    /// account (not writable by others, so it used to be accepted), or a link in its
    /// place, is refused and left alone.
    #[test]
    fn a_socket_directory_of_another_account_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        chmod(tmp.path(), 0o1777);
        let target = tmp.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        chmod(&target, 0o700);
        let link = tmp.path().join("kms-1000");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = prepare_socket_dir(&link, 0o700, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");
        std::fs::remove_file(&link).unwrap();
        if !root() {
            return;
        }
        let squat = tmp.path().join("kms-1000");
        std::fs::create_dir(&squat).unwrap();
        chmod(&squat, 0o755);
        chown(&squat, 4242);
        let err = prepare_socket_dir(&squat, 0o700, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("uid 4242"), "{err}");
        assert_eq!(mode_of(&squat), 0o755);
        assert_eq!(std::fs::metadata(&squat).unwrap().uid(), 4242);
        // Root's own directories (systemd's, /run) are accepted.
        chown(&squat, 0);
        prepare_socket_dir(&squat, 0o700, None).unwrap();
    }

    /// A data directory of another account is not served: checked before anything is
    /// created in it. (A root kmsd used to serve, and fill with root's files, the system
    /// service's `/var/lib/kms`.) `kmsd restore` as root still locks it: it hands over
    /// what it writes there to the directory's owner.
    #[test]
    fn a_data_directory_of_another_account_is_not_served() {
        if !root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        chmod(&data, 0o700);
        chown(&data, 4242);
        let err = lock_data_dir_to_serve(&data).unwrap_err();
        assert!(matches!(err, ServerError::ForeignDataDir { .. }), "{err}");
        assert!(err.to_string().contains("uid 4242"), "{err}");
        assert!(!data.join("kmsd.lock").exists());
        let err = check_data_dir_owner(&data).unwrap_err();
        assert!(matches!(err, ServerError::ForeignDataDir { .. }), "{err}");
        // The restore's lock.
        drop(lock_data_dir(&data).unwrap());
        // The daemon's own directory.
        let own = tmp.path().join("own");
        drop(lock_data_dir_to_serve(&own).unwrap());
    }
}
