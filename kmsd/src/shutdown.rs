//! Graceful shutdown, in the shape of mini-redis: a watch channel tells every task to
//! stop; each connection holds a clone of a completion sender, so the daemon knows when
//! the last one has answered its in-flight requests and closed.

use tokio::sync::{mpsc, watch};

/// A task's view of the shutdown signal.
#[derive(Debug, Clone)]
pub struct Shutdown {
    signal: watch::Receiver<bool>,
    /// Dropped when the holder finishes; the daemon waits for all of them.
    _done: mpsc::Sender<()>,
}

impl Shutdown {
    /// Waits until shutdown has been requested (returns at once if it already was).
    pub async fn recv(&mut self) {
        // An error means the trigger is gone, which also means: stop.
        let _ = self.signal.wait_for(|stop| *stop).await;
    }

    pub fn is_requested(&self) -> bool {
        *self.signal.borrow()
    }
}

/// The daemon's side: request shutdown, then wait for every task to finish.
#[derive(Debug)]
pub struct ShutdownTrigger {
    signal: watch::Sender<bool>,
    done_tx: Option<mpsc::Sender<()>>,
    done_rx: mpsc::Receiver<()>,
}

impl ShutdownTrigger {
    pub fn new() -> ShutdownTrigger {
        let (signal, _) = watch::channel(false);
        let (done_tx, done_rx) = mpsc::channel(1);
        ShutdownTrigger {
            signal,
            done_tx: Some(done_tx),
            done_rx,
        }
    }

    /// A handle for a task that must finish before the daemon exits.
    pub fn handle(&self) -> Shutdown {
        Shutdown {
            signal: self.signal.subscribe(),
            _done: self.done_tx.clone().unwrap_or_else(|| mpsc::channel(1).0),
        }
    }

    /// Signals every task and waits until all handles are dropped.
    pub async fn shutdown(mut self) {
        let _ = self.signal.send(true);
        self.done_tx.take();
        let _ = self.done_rx.recv().await;
    }
}

impl Default for ShutdownTrigger {
    fn default() -> Self {
        Self::new()
    }
}
