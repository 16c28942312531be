//! kmsd: the kms daemon as a library, so tests and benchmarks can run a real daemon
//! in-process or as the `kmsd` binary.
//!
//! The request path, top to bottom (nothing below reaches back up):
//! [`server`] (accept, peer credentials, limits) → [`connection`] (frames, pipelining) →
//! [`service`] (one handler per request) → [`engine`] (key rules, versions, states) →
//! [`crypto`] and [`store`] (the only redb writer, group commit). Beside them:
//! [`scheduler`] (rotations, purges) and [`shutdown`]. Around the daemon: [`systemd`]
//! (socket activation, sd_notify, process hardening), [`backup`] and [`restore`].
//!
//! The library exists for kmsd's own binary and tests, so its documentation is read with
//! the private items (`cargo doc --document-private-items`), which its links may name.
#![allow(rustdoc::private_intra_doc_links)]

pub mod authz;
pub mod backup;
pub mod budget;
pub mod clock;
pub mod config;
pub mod connection;
pub mod crypto;
pub mod engine;
pub mod heap;
pub mod hsm;
pub mod log_limit;
pub mod restore;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod systemd;
#[cfg(test)]
mod test_support;

use anyhow::Context as _;
use std::future::Future;
use std::sync::Arc;

/// kmsd's exit status when a restart cannot help and could do harm (`EX_CONFIG`): a
/// PKCS#11 token refused its PIN, and a token that counts failed logins locks the PIN
/// after a few. The unit file names it in `RestartPreventExitStatus=`, so
/// `Restart=on-failure` does not present the PIN again every second. That alone does not
/// stop a socket-activated restart (a client waiting in the backlog starts kmsd again), so
/// a refused PIN of the daemon's token no longer stops kmsd at all
/// ([`hsm::Registry::open`]); this status remains for any error that carries one.
pub const EXIT_NO_RESTART: u8 = 78;

/// The exit status for an error that stopped kmsd: [`EXIT_NO_RESTART`] or 1.
pub fn exit_status(e: &anyhow::Error) -> u8 {
    let refused_pin = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<engine::EngineError>(),
            Some(engine::EngineError::Hsm(hsm::HsmError::Login { .. }))
        ) || matches!(
            cause.downcast_ref::<hsm::HsmError>(),
            Some(hsm::HsmError::Login { .. })
        )
    });
    if refused_pin { EXIT_NO_RESTART } else { 1 }
}

/// Where the process is: starting, serving, or stopped while starting. Once kmsd is about
/// to serve, a stop is the graceful one `run` carries out. Before, nothing has been
/// served and the start may be long (a full page check of a large store, a PIN read from
/// a pipe), so `main` ends the process at once on a stop instead of waiting for a start
/// the service manager has given up on. One atomic, so that the two cannot both win: a
/// stop that ends the process never meets a socket bound and READY sent.
static PHASE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(STARTING);
const STARTING: u8 = 0;
const SERVING: u8 = 1;
const STOPPED_WHILE_STARTING: u8 = 2;

/// Claims the stop for the start: true if kmsd had not begun to serve, and now never
/// will in this process (`run` then only waits for its `stop`). For `main`, which ends the
/// process when this returns true.
#[doc(hidden)]
pub fn stop_while_starting() -> bool {
    use std::sync::atomic::Ordering::SeqCst;
    PHASE
        .compare_exchange(STARTING, STOPPED_WHILE_STARTING, SeqCst, SeqCst)
        .is_ok()
}

/// Moves to serving, unless a stop came first (false).
fn begin_serving() -> bool {
    use std::sync::atomic::Ordering::SeqCst;
    PHASE
        .fetch_update(SeqCst, SeqCst, |p| {
            (p != STOPPED_WHILE_STARTING).then_some(SERVING)
        })
        .is_ok()
}

/// Runs the daemon until `stop` resolves, then shuts down gracefully: stops accepting,
/// answers every request in flight, commits, closes the store, removes the socket (if
/// kmsd bound it: a socket systemd passed stays, systemd listens on it for the next start).
pub async fn run(mut config: config::Config, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    // A no-op when main already claimed it; before any file is opened either way.
    systemd::claim_listen_fds()?;
    let unmapped = server::Unmapped::detect();
    server::refuse_an_unmapped_self(unmapped)?;
    let _lock = server::lock_data_dir_to_serve(&config.data_dir)?;
    // The store, journal, slots, lock, socket, the runtime's own descriptors, a backup,
    // HSM libraries: well under this many besides the connections.
    const OWN_FILES: u64 = 64;
    let wanted = (config.max_connections as u64).saturating_add(OWN_FILES);
    if let Some(open_files) = systemd::raise_open_files_limit(wanted)
        && open_files < wanted
    {
        tracing::warn!(
            open_files,
            max_connections = config.max_connections,
            "the open files limit (its hard limit too) is below max_connections plus kmsd's own \
             files: at the limit new connections fail until others close; raise LimitNOFILE \
             or lower max_connections"
        );
    }
    backup::remove_stale(&config.data_dir);
    // First: a restore into an empty directory cut short between its renames has no
    // `kms.redb` yet, and the checks below would take it for a new directory.
    restore::finish_or_clean_up(&config.data_dir)
        .context("cannot finish a restore a crash cut short")?;
    // A store without its root key: creating a fresh key would leave a second, useless
    // key next to a store it can never open; say what is missing instead.
    if config.store_path().exists()
        && !restore::root_key_available(&config.data_dir, config.credentials_dir.as_deref())
    {
        anyhow::bail!(
            "the key store {} exists but its root key does not: neither {} nor the credential \
             kms-root-key (CREDENTIALS_DIRECTORY) is present; restore the root key that \
             wrapped this store",
            config.store_path().display(),
            config
                .data_dir
                .join(crypto::root_key::KEY_FILE_NAME)
                .display()
        );
    }
    let (root, source) =
        crypto::RootKey::load_or_create(&config.data_dir, config.credentials_dir.as_deref())
            .context("cannot load the root key")?;
    tracing::info!(?source, "root key loaded");
    let opening = std::time::Instant::now();
    // While the store opens, which may verify every page.
    let starting = systemd::StartingUp::begin("starting: opening and checking the key store");
    let store = store::Store::open(&config.store_path(), &root.fingerprint())?;
    // The rest of the start is short: bounded by the service manager's timeout again (a
    // token login or a bind that hangs is then killed and restarted, not waited on).
    drop(starting);
    tracing::info!(
        ms = opening.elapsed().as_millis() as u64,
        "store opened (pages verified unless untouched since a clean stop)"
    );
    if let Some(token) = config
        .pkcs11
        .resolve(config.credentials_dir.as_deref())
        .map_err(|e| anyhow::anyhow!(e))?
    {
        config.engine.pkcs11 = Some(token);
    }
    let loading = std::time::Instant::now();
    let engine = Arc::new(engine::Engine::open(
        store,
        root,
        Arc::new(clock::SystemClock),
        config.engine.clone(),
    )?);
    tracing::info!(
        ms = loading.elapsed().as_millis() as u64,
        keys = engine.live_keys(),
        "keyring loaded"
    );

    // Purges whose deletion wait ended while the daemon was down happen before it serves;
    // overdue rotations and the rest in the scheduler's first pass, once it is ready
    // (`Engine::run_due_deletions`).
    let e = engine.clone();
    let purged = tokio::task::spawn_blocking(move || e.run_due_deletions()).await?;
    if purged > 0 {
        tracing::info!(keys = purged, "purged keys whose deletion wait ended");
    }

    if !begin_serving() {
        // `main` is ending the process (`stop_while_starting`): serve nothing.
        stop.await;
        return Ok(());
    }
    // `_socket_lock`: held while kmsd serves a socket it bound itself (`server::bind`).
    let (listener, own_socket, _socket_lock) = match systemd::take_activated_listener()? {
        Some(activated) => {
            // The socket systemd listens on is the one to report, whatever --socket said.
            if let Some(path) = activated.path
                && path != config.socket
            {
                tracing::info!(socket = %path.display(), "using the socket systemd passed");
                config.socket = path;
            }
            (activated.listener, None, None)
        }
        None => {
            let (listener, lock) = server::bind(&config)?;
            (
                listener,
                Some(systemd::OwnSocketFile::bound(&config.socket)),
                Some(lock),
            )
        }
    };
    let config = Arc::new(config);
    let service = Arc::new(
        service::Service::new(
            engine.clone(),
            config.socket.clone(),
            config.data_dir.clone(),
            config.max_connections_per_account,
            config.max_buffered_bytes_per_account,
        )
        .context("cannot start the crypto threads")?,
    );
    let trigger = shutdown::ShutdownTrigger::new();
    let mut scheduling = tokio::spawn(scheduler::run(engine.clone(), trigger.handle()));
    _lock.tell_socket(&config.socket);
    let mut serving = tokio::spawn(server::serve(
        listener,
        engine.clone(),
        service.clone(),
        config.clone(),
        unmapped,
        trigger.handle(),
    ));
    tracing::info!(
        socket = %config.socket.display(),
        data_dir = %config.data_dir.display(),
        keys = engine.live_keys(),
        activated = own_socket.is_none(),
        "kmsd ready"
    );
    // The listener exists (bound or passed), so connections are accepted from here on.
    systemd::notify_ready(engine.live_keys(), &config.socket);
    systemd::spawn_notifier(engine.clone(), config.socket.clone(), trigger.handle());

    // A writer thread that died leaves a daemon that refuses every call while looking
    // healthy to its service manager (the watchdog is fed from the runtime): stop instead,
    // with an error, so that systemd restarts kmsd (Restart=on-failure). Every answered
    // call is in the journal or the store; the next start folds the journal and, since
    // this is not recorded as a clean stop, verifies every page of the store.
    // An accept loop that ended (it returns only when told to stop) or panicked leaves a
    // daemon serving nothing, equally healthy-looking, and a scheduler that did leaves one
    // that never rotates or purges again: the same, but the store is sound, so it is
    // closed cleanly.
    let ended = |task: &'static str, result: Result<(), tokio::task::JoinError>| {
        Some(Failure::Task {
            task,
            why: match result {
                Ok(()) => "it returned".to_string(),
                Err(e) => e.to_string(),
            },
        })
    };
    let failure = tokio::select! {
        () = stop => None,
        () = engine.writer_failed() => Some(Failure::Writer),
        result = &mut serving => ended("accept loop", result),
        result = &mut scheduling => ended("scheduler", result),
    };
    let writer_failed = matches!(failure, Some(Failure::Writer));
    match &failure {
        Some(Failure::Writer) => {
            tracing::error!("the store writer stopped: shutting down so that kmsd is restarted")
        }
        Some(Failure::Task { task, why }) => tracing::error!(
            reason = %why,
            "the {task} stopped: shutting down so that kmsd is restarted"
        ),
        None => {}
    }
    tracing::info!("shutting down: answering requests in flight");
    systemd::notify_stopping();
    trigger.shutdown().await;
    if let Some(own) = own_socket {
        own.remove();
    }
    drop(service);
    // The tasks that were told to stop drop their clones of the engine just after their
    // shutdown handle, so give them a moment: closing the store cleanly spares the next
    // start a repair (every acknowledged write is committed either way).
    let mut engine = engine;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Arc::try_unwrap(engine) {
            Ok(e) => {
                let store = e.close();
                if !writer_failed {
                    store.close();
                }
                break;
            }
            Err(still) if std::time::Instant::now() < deadline => {
                engine = still;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(_) => {
                tracing::warn!("engine still referenced at shutdown");
                break;
            }
        }
    }
    tracing::info!("stopped");
    match failure {
        Some(Failure::Writer) => {
            anyhow::bail!("the store writer thread died (see the log above); restart kmsd")
        }
        Some(Failure::Task { task, why }) => {
            anyhow::bail!("the {task} stopped ({why}); restart kmsd")
        }
        None => Ok(()),
    }
}

/// What stopped kmsd other than being asked to.
enum Failure {
    /// The store writer thread died: calls are refused, the store is not closed cleanly.
    Writer,
    /// A task that runs for the daemon's life (the accept loop, the scheduler) ended or
    /// panicked (why): nothing is served, or nothing falls due any more.
    Task { task: &'static str, why: String },
}
