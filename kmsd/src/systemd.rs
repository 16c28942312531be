//! Life under systemd (SPEC §1, §9), none of which needs systemd to be running:
//!
//! - socket activation: the listening socket systemd passes as fd 3 (`LISTEN_FDS`);
//! - `sd_notify`: `READY=1` once the socket accepts, `STATUS=` lines, `STOPPING=1`,
//!   `WATCHDOG=1` pings at half of `WATCHDOG_USEC`, and `EXTEND_TIMEOUT_USEC` while a
//!   long start-up is still working ([`StartingUp`]);
//! - the hardening the process applies to itself: not dumpable (no core file, no ptrace
//!   or `/proc/PID/mem` by the same user) and, where the memory-lock limit allows, every
//!   page locked in RAM so key material never reaches swap.
//!
//! Every notification is best effort: without `NOTIFY_SOCKET` they are no-ops, and a
//! service manager that went away must not take the daemon with it.

use crate::engine::Engine;
use crate::shutdown::Shutdown;
use sd_notify::NotifyState;
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why socket activation could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("socket activation: {0}")]
    Activation(String),
}

/// The state of the activation socket: claimed at most once per process.
enum Activation {
    Unclaimed,
    Claimed(Option<StdUnixListener>),
}

/// Process-wide, because the file descriptor systemd passed is.
static ACTIVATION: Mutex<Activation> = Mutex::new(Activation::Unclaimed);

/// How many sockets systemd passed beyond the one kmsd serves.
static EXTRA_SOCKETS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Takes ownership of the listening socket systemd passed, if `LISTEN_PID`/`LISTEN_FDS`
/// name this process. Call it first thing in `main`, before any file is opened: a process
/// started with `LISTEN_FDS` but without fd 3 would otherwise find one of its own files
/// there. Later calls do nothing; [`take_activated_listener`] hands the socket out.
pub fn claim_listen_fds() -> Result<(), SystemdError> {
    let mut state = ACTIVATION.lock().unwrap_or_else(|e| e.into_inner());
    if let Activation::Claimed(_) = *state {
        return Ok(());
    }
    // Marked claimed before anything can fail: fd 3 is wrapped at most once, so it is
    // never closed twice, even if validating it fails below.
    *state = Activation::Claimed(None);
    let mut fds = sd_notify::listen_fds()
        .map_err(|e| SystemdError::Activation(format!("invalid LISTEN_FDS/LISTEN_PID: {e}")))?;
    let Some(fd) = fds.next() else {
        return Ok(());
    };
    // Said once logging is set up (this runs before it): see `take_activated_listener`.
    // They stay open: the descriptors belong to the service manager's socket units, and
    // closing one here would free its number for kmsd's own files.
    EXTRA_SOCKETS.store(fds.len(), std::sync::atomic::Ordering::Relaxed);
    let owned = own_passed_fd(fd);
    let listener = validate_listener(owned)?;
    *state = Activation::Claimed(Some(listener));
    Ok(())
}

/// The environment variable (value `1`) by which a client that starts kmsd asks it to
/// [`close_inherited_descriptors`]. Its name is the client library's too.
pub const CLOSE_INHERITED_FDS: &str = "KMS_CLOSE_INHERITED_FDS";

/// Closes every descriptor above stderr that kmsd inherited, except the socket claimed by
/// [`claim_listen_fds`]. A kmsd started by a client (autostart) would otherwise hold the
/// client's other open files for as long as it runs: a pipe a script opened as fd 3
/// (`( kmsctl status 3>&1 ) | cat`) would never see its end, and the script would hang.
/// Called (when [`CLOSE_INHERITED_FDS`] asks) right after [`claim_listen_fds`], before
/// kmsd opens anything. Best effort: without `/proc` nothing is closed.
#[allow(unsafe_code)]
pub fn close_inherited_descriptors() {
    use std::os::fd::{AsRawFd as _, RawFd};
    let keep = match &*ACTIVATION.lock().unwrap_or_else(|e| e.into_inner()) {
        Activation::Claimed(Some(listener)) => Some(listener.as_raw_fd()),
        _ => None,
    };
    let Ok(dir_fd) = rustix::fs::open(
        "/proc/self/fd",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) else {
        return;
    };
    let listing = dir_fd.as_raw_fd();
    let Ok(mut dir) = rustix::fs::Dir::new(dir_fd) else {
        return;
    };
    let mut inherited: Vec<RawFd> = Vec::new();
    while let Some(Ok(entry)) = dir.read() {
        if let Some(fd) = entry.file_name().to_str().ok().and_then(|n| n.parse().ok()) {
            inherited.push(fd);
        }
    }
    // Closes the listing's own descriptor, which is therefore skipped below.
    drop(dir);
    for fd in inherited {
        if fd <= 2 || fd == listing || Some(fd) == keep {
            continue;
        }
        // SAFETY: `fd` was open in this process a moment ago (it was listed, and it is
        // not the listing's own descriptor, the only one closed since), and nothing in
        // kmsd owns it: this runs first thing in `main`, single-threaded, before kmsd
        // opens any file, and the one inherited descriptor kmsd keeps (the activation
        // socket) is skipped. So this OwnedFd is its only owner and closes it once.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// Wraps the descriptor systemd passed in an [`OwnedFd`].
#[allow(unsafe_code)]
fn own_passed_fd(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `fd` is the first descriptor of the socket-activation protocol: LISTEN_PID
    // names this process and LISTEN_FDS is at least 1, so the service manager opened fd 3
    // and passed it to us across exec, and `sd_notify::listen_fds` has just set FD_CLOEXEC
    // on it, which fails on a closed descriptor, so it is open. Nothing else in kmsd owns
    // it: this runs before kmsd opens any file, and only once per process (the caller
    // holds ACTIVATION and has marked it claimed), so this OwnedFd is its only owner and
    // closes it exactly once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Accepts only what kmsd can serve: a listening AF_UNIX stream socket.
fn validate_listener(fd: OwnedFd) -> Result<StdUnixListener, SystemdError> {
    let bad = |what: String| SystemdError::Activation(what);
    let kind = rustix::net::sockopt::socket_type(&fd)
        .map_err(|e| bad(format!("fd 3 is not a socket: {e}")))?;
    if kind != rustix::net::SocketType::STREAM {
        return Err(bad("fd 3 is not a stream socket (use ListenStream=)".into()));
    }
    let family = rustix::net::sockopt::socket_domain(&fd)
        .map_err(|e| bad(format!("fd 3: cannot read its address family: {e}")))?;
    if family != rustix::net::AddressFamily::UNIX {
        return Err(bad(
            "fd 3 is not a Unix socket (kmsd serves only local clients)".into(),
        ));
    }
    if !rustix::net::sockopt::socket_acceptconn(&fd).unwrap_or(false) {
        return Err(bad("fd 3 is not listening".into()));
    }
    let listener = StdUnixListener::from(fd);
    // tokio requires it: its reactor never blocks on accept.
    listener
        .set_nonblocking(true)
        .map_err(|e| bad(format!("cannot make fd 3 non-blocking: {e}")))?;
    Ok(listener)
}

/// The socket systemd passed, ready for the accept loop.
pub struct ActivatedSocket {
    pub listener: tokio::net::UnixListener,
    /// Its file system path (`None` for an unnamed or abstract socket).
    pub path: Option<PathBuf>,
}

/// The activation socket claimed by [`claim_listen_fds`], once; `None` when kmsd was not
/// socket-activated (it then binds its socket itself). Must run inside the runtime.
pub fn take_activated_listener() -> Result<Option<ActivatedSocket>, SystemdError> {
    let listener = {
        let mut state = ACTIVATION.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *state {
            Activation::Claimed(l) => l.take(),
            Activation::Unclaimed => None,
        }
    };
    let Some(listener) = listener else {
        return Ok(None);
    };
    let extra = EXTRA_SOCKETS.load(std::sync::atomic::Ordering::Relaxed);
    if extra > 0 {
        tracing::warn!(
            extra,
            "systemd passed more than one socket; kmsd serves the first (fd 3) only"
        );
    }
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    let listener = tokio::net::UnixListener::from_std(listener)
        .map_err(|e| SystemdError::Activation(format!("cannot register fd 3: {e}")))?;
    Ok(Some(ActivatedSocket { listener, path }))
}

/// The socket file kmsd bound itself, so that shutdown removes that file and nothing
/// else: not a socket systemd owns (it keeps listening there for the next activation),
/// and not a file that replaced ours in the meantime. Dropped without [`Self::keep`],
/// it removes the file as [`Self::remove`] does: a start that fails after the bind
/// (the socket's group, the crypto threads) leaves no socket file behind.
#[derive(Debug)]
pub struct OwnSocketFile {
    path: PathBuf,
    identity: Option<(u64, u64)>,
}

impl OwnSocketFile {
    /// Records the file at `path` as the one we just bound.
    pub fn bound(path: &Path) -> OwnSocketFile {
        OwnSocketFile {
            path: path.to_path_buf(),
            identity: file_identity(path),
        }
    }

    /// Removes the socket file if it is still the one we bound.
    pub fn remove(self) {
        drop(self);
    }

    /// Leaves the file in place: its removal is someone else's now (another
    /// `OwnSocketFile` that outlives this one).
    pub fn keep(mut self) {
        self.identity = None;
    }
}

impl Drop for OwnSocketFile {
    fn drop(&mut self) {
        if self.identity.is_some() && file_identity(&self.path) == self.identity {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn file_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The `STATUS=` line shown by `systemctl status kmsd`.
fn status_line(keys: u64, socket: &Path) -> String {
    let s = if keys == 1 { "" } else { "s" };
    format!("serving {keys} key{s} on {}", socket.display())
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// How long each `EXTEND_TIMEOUT_USEC` extends the start-up timeout by, and how often it
/// is sent: a third of it, so that a late wake-up of the thread still comes in time.
const START_EXTENSION: Duration = Duration::from_secs(30);
const START_EXTEND_EVERY: Duration = Duration::from_secs(10);
/// No extension after this long: a check of the largest store this daemon is made for
/// takes minutes; one still going after this is taken for hung, and the service
/// manager's own timeout ends it.
const START_EXTEND_LIMIT: Duration = Duration::from_secs(30 * 60);

/// While this lives, the service manager is told every [`START_EXTEND_EVERY`] that the
/// start is still working (`EXTEND_TIMEOUT_USEC`, with a `STATUS=` line). Opening the
/// store verifies every page after an unclean stop and once a week (~0.7–1.7 s per
/// 500 MiB here, more on a slow disk): a large store would outlast `TimeoutStartSec`
/// (90 s by default), systemd would kill kmsd, and the next start, unclean again, would
/// begin the same check — a restart loop that never serves. Extensions stop after
/// [`START_EXTEND_LIMIT`], so a start that hangs for good is still timed out.
pub struct StartingUp {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StartingUp {
    /// Starts the notifications, with `what` in the status line; nothing without
    /// `NOTIFY_SOCKET`.
    pub fn begin(what: &'static str) -> StartingUp {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return StartingUp {
                done: None,
                thread: None,
            };
        }
        let (done, until_done) = std::sync::mpsc::channel::<()>();
        let extension = u32::try_from(START_EXTENSION.as_micros()).unwrap_or(u32::MAX);
        let thread = std::thread::Builder::new()
            .name("kmsd-starting".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                while started.elapsed() < START_EXTEND_LIMIT {
                    let status = format!("{what} ({} s)", started.elapsed().as_secs());
                    notify(&[
                        NotifyState::ExtendTimeoutUsec(extension),
                        NotifyState::Status(&status),
                    ]);
                    // A message or a disconnect (the guard dropped) ends it.
                    if until_done.recv_timeout(START_EXTEND_EVERY)
                        != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    {
                        return;
                    }
                }
                tracing::warn!(
                    minutes = START_EXTEND_LIMIT.as_secs() / 60,
                    "the start is still not done; no more start timeout extensions"
                );
            })
            .map_err(|e| tracing::warn!(error = %e, "cannot start the start-up notifier"))
            .ok();
        StartingUp {
            done: Some(done),
            thread,
        }
    }
}

impl Drop for StartingUp {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `READY=1` with a status line. Call only once the socket accepts connections.
pub fn notify_ready(keys: u64, socket: &Path) {
    let status = status_line(keys, socket);
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// `STOPPING=1`: kmsd is answering the requests in flight and closing the store.
pub fn notify_stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: answering requests in flight"),
    ]);
}

/// A `STATUS=` line telling why kmsd could not start (shown by `systemctl status`).
pub fn notify_failed(message: &str) {
    let status = format!("failed: {message}");
    notify(&[NotifyState::Status(&status)]);
}

/// How often the notifier wakes: at half the watchdog interval (systemd's advice), at
/// most every 10 ms; every 30 s without a watchdog (for the `STATUS=` line).
fn notify_period(watchdog: Option<Duration>) -> Duration {
    watchdog.map_or(Duration::from_secs(30), |w| {
        (w / 2).max(Duration::from_millis(10))
    })
}

/// While the daemon runs under a service manager: `WATCHDOG=1` at half the watchdog
/// interval (if `WATCHDOG_USEC` names this process) and a fresh `STATUS=` line when the
/// number of keys changes. The ping comes from the runtime and reads the keyring, so a
/// wedged runtime or a deadlocked keyring stops the pings and systemd restarts kmsd.
pub fn spawn_notifier(engine: Arc<Engine>, socket: PathBuf, mut shutdown: Shutdown) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    let period = notify_period(watchdog);
    if let Some(w) = watchdog {
        tracing::info!(
            interval_ms = w.as_millis() as u64,
            "systemd watchdog enabled"
        );
    }
    tokio::spawn(async move {
        let mut last_keys = engine.live_keys();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.recv() => return,
            }
            let keys = engine.live_keys();
            let status = status_line(keys, &socket);
            let mut states = Vec::with_capacity(2);
            if watchdog.is_some() {
                states.push(NotifyState::Watchdog);
            }
            if keys != last_keys {
                states.push(NotifyState::Status(&status));
                last_keys = keys;
            }
            if !states.is_empty() {
                notify(&states);
            }
        }
    });
}

/// Raises the soft limit on open files to `wanted` (at most the hard limit), and returns
/// the soft limit in force. Every connection is a descriptor, and the usual soft limit
/// (1,024, systemd's default too) is below `max_connections` (1,024) plus the daemon's own
/// files: at the limit `accept` fails for everyone, root included. Not to the hard limit
/// itself (often 524,288): descriptors stay near what the connections need, past 1,024
/// only while that many clients are connected (a PKCS#11 module that still used `select`
/// would be in trouble then, not at every start).
pub fn raise_open_files_limit(wanted: u64) -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let target = limit.maximum.map_or(wanted, |hard| wanted.min(hard));
    if limit.current.is_some_and(|soft| soft < target) {
        let raised = rustix::process::Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open files limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// What [`harden_process`] achieved, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryLock {
    /// Every current and future page is locked (on first touch).
    Locked,
    /// Not attempted: without CAP_IPC_LOCK the kernel caps locked memory at this many
    /// bytes, and `MCL_FUTURE` would then make later allocations fail once it is reached.
    LimitTooLow(u64),
    /// The kernel refused.
    Failed(String),
}

/// Makes the process non-dumpable and locks its memory where the limit allows; logs
/// what it did. Called once at start, before the root key is read.
pub fn harden_process() -> MemoryLock {
    // No core file, no ptrace or /proc/PID/mem by other processes of the same user:
    // the process holds the root key and unwrapped key material.
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!(error = %e, "cannot make the process non-dumpable");
    }
    let lock = lock_memory();
    match &lock {
        MemoryLock::Locked => tracing::info!("memory locked: key material is never swapped"),
        MemoryLock::LimitTooLow(limit) => tracing::warn!(
            memlock_limit = limit,
            "memory not locked: key material may be swapped; raise LimitMEMLOCK (infinity) \
             or use encrypted swap"
        ),
        MemoryLock::Failed(e) => tracing::warn!(
            error = %e,
            "memory not locked: key material may be swapped; raise LimitMEMLOCK (infinity)"
        ),
    }
    lock
}

fn lock_memory() -> MemoryLock {
    use rustix::mm::{MlockAllFlags, mlockall};
    let privileged = rustix::thread::capabilities(None).is_ok_and(|c| {
        c.effective
            .contains(rustix::thread::CapabilitySet::IPC_LOCK)
    });
    if !privileged
        && let Some(limit) = rustix::process::getrlimit(rustix::process::Resource::Memlock).current
    {
        return MemoryLock::LimitTooLow(limit);
    }
    // ONFAULT: lock pages as they are touched, not the whole reserved address space
    // (thread stacks, allocator arenas), so the daemon's resident size stays what it was.
    match mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT) {
        Ok(()) => MemoryLock::Locked,
        Err(e) => MemoryLock::Failed(e.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The watchdog is pinged at half its interval (systemd restarts a service that
    /// misses the whole interval), never more often than every 10 ms.
    #[test]
    fn the_watchdog_is_pinged_at_half_its_interval() {
        let ms = Duration::from_millis;
        assert_eq!(notify_period(Some(ms(30_000))), ms(15_000));
        assert_eq!(notify_period(Some(ms(201))), Duration::from_micros(100_500));
        assert_eq!(notify_period(Some(ms(4))), ms(10));
        assert_eq!(notify_period(None), ms(30_000));
    }

    /// Without LISTEN_PID naming this process nothing is claimed, and claiming twice is harmless.
    #[test]
    fn no_activation_without_listen_pid() {
        // The test harness is not socket-activated (LISTEN_PID, if any, names another pid).
        claim_listen_fds().unwrap();
        claim_listen_fds().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { assert!(take_activated_listener().unwrap().is_none()) });
    }

    /// A listening Unix stream socket passes validation; a datagram socket and a non-listening one do not.
    #[test]
    fn validation() {
        let dir = tempfile::tempdir().unwrap();
        let l = StdUnixListener::bind(dir.path().join("s")).unwrap();
        assert!(validate_listener(OwnedFd::from(l)).is_ok());
        let d = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let e = validate_listener(OwnedFd::from(d)).err().unwrap();
        assert!(e.to_string().contains("stream"), "{e}");
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = validate_listener(OwnedFd::from(a)).err().unwrap();
        assert!(e.to_string().contains("not listening"), "{e}");
    }

    /// The socket file is removed only while it is still the one that was bound.
    #[test]
    fn own_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        // The listener stays open, so its inode cannot be recycled for the replacement.
        let _l = StdUnixListener::bind(&p).unwrap();
        let own = OwnSocketFile::bound(&p);
        // Replaced by someone else's file: left alone.
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"not ours").unwrap();
        own.remove();
        assert!(p.exists());
        std::fs::remove_file(&p).unwrap();
        let _l2 = StdUnixListener::bind(&p).unwrap();
        OwnSocketFile::bound(&p).remove();
        assert!(!p.exists());
    }

    /// Dropped without `remove` (an error after the bind), the file bound is removed all
    /// the same; a file that replaced it is not, and `keep` leaves it. (There was no
    /// Drop: a start that failed after its bind left the socket file behind.)
    #[test]
    fn own_socket_file_removed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let _l = StdUnixListener::bind(&p).unwrap();
        let own = OwnSocketFile::bound(&p);
        let failed_start = || -> Result<(), String> {
            let _own = own;
            Err("the crypto threads did not start".into())
        };
        assert!(failed_start().is_err());
        assert!(!p.exists(), "the socket file outlived the failed start");

        let _l2 = StdUnixListener::bind(&p).unwrap();
        let own = OwnSocketFile::bound(&p);
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"not ours").unwrap();
        drop(own);
        assert!(p.exists());
        std::fs::remove_file(&p).unwrap();

        let _l3 = StdUnixListener::bind(&p).unwrap();
        OwnSocketFile::bound(&p).keep();
        assert!(p.exists());
    }

    /// The status line counts keys in plain words.
    #[test]
    fn status_lines() {
        assert_eq!(
            status_line(1, Path::new("/run/kms/kmsd.sock")),
            "serving 1 key on /run/kms/kmsd.sock"
        );
        assert_eq!(status_line(0, Path::new("/s")), "serving 0 keys on /s");
    }
}
