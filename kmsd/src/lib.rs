//! kmsd: the kms daemon as a library, so tests and benchmarks can run a real daemon
//! in-process or as the `kmsd` binary.
//!
//! The request path, top to bottom (nothing below reaches back up):
//! [`server`] (accept, peer credentials, limits) → [`connection`] (frames, pipelining) →
//! [`service`] (one handler per request) → [`engine`] (key rules, versions, states) →
//! [`crypto`] and [`store`] (the only redb writer, group commit). Beside them:
//! [`scheduler`] (rotations, purges) and [`shutdown`].

pub mod authz;
pub mod clock;
pub mod config;
pub mod connection;
pub mod crypto;
pub mod engine;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod store;

use anyhow::Context as _;
use std::future::Future;
use std::sync::Arc;

/// Runs the daemon until `stop` resolves, then shuts down gracefully: stops accepting,
/// answers every request in flight, commits, closes the store, removes the socket.
pub async fn run(config: config::Config, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    let _lock = server::lock_data_dir(&config.data_dir)?;
    let (root, source) =
        crypto::RootKey::load_or_create(&config.data_dir, config.credentials_dir.as_deref())
            .context("cannot load the root key")?;
    tracing::info!(?source, "root key loaded");
    let store = store::Store::open(&config.store_path(), &root.fingerprint())?;
    let engine = Arc::new(engine::Engine::open(
        store,
        root,
        Arc::new(clock::SystemClock),
        config.engine.clone(),
    )?);

    // Catch up on rotations and purges that fell due while the daemon was down, once.
    let e = engine.clone();
    let caught_up = tokio::task::spawn_blocking(move || e.run_due()).await?;
    if caught_up > 0 {
        tracing::info!(
            tasks = caught_up,
            "caught up on overdue rotations and deletions"
        );
    }

    let listener = server::bind(&config)?;
    let config = Arc::new(config);
    let service = Arc::new(service::Service::new(
        engine.clone(),
        config.socket.clone(),
        config.data_dir.clone(),
    ));
    let trigger = shutdown::ShutdownTrigger::new();
    tokio::spawn(scheduler::run(engine.clone(), trigger.handle()));
    tokio::spawn(server::serve(
        listener,
        engine.clone(),
        service.clone(),
        config.clone(),
        trigger.handle(),
    ));
    tracing::info!(
        socket = %config.socket.display(),
        data_dir = %config.data_dir.display(),
        keys = engine.live_keys(),
        "kmsd ready"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    stop.await;
    tracing::info!("shutting down: answering requests in flight");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    trigger.shutdown().await;
    let _ = std::fs::remove_file(&config.socket);
    drop(service);
    match Arc::try_unwrap(engine) {
        Ok(engine) => engine.close(),
        // A blocking task still holds it; every acknowledged write is committed already.
        Err(_) => tracing::warn!("engine still referenced at shutdown"),
    }
    tracing::info!("stopped");
    Ok(())
}
