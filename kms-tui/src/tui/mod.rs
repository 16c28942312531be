//! kms-tui: the ratatui dashboard of kms (SPEC §12).
//!
//! Shape: [`app`] holds the state, [`update`] changes it in response to [`action`]s and
//! returns effects without doing I/O, [`ui`] draws it, [`daemon`] owns the connection to
//! kmsd and feeds replies and events back in over channels, [`terminal`] restores the
//! terminal on every exit including panics.

mod action;
mod app;
mod bench;
mod daemon;
mod fake;
mod keymap;
mod notify;
mod strings;
mod terminal;
mod ui;
mod update;

#[cfg(test)]
mod snapshot_tests;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use crossterm::event::{Event as TermEvent, KeyEventKind};
use kms_shared::client::ConnectOptions;
use tokio::sync::mpsc::{self, UnboundedSender};

use action::{Action, Effect};
use app::App;

/// Dashboard of kms, the local Key Management Service.
#[derive(Debug, Parser)]
#[command(name = "kms-tui", version)]
struct Args {
    /// The daemon's socket. Default: $KMS_SOCKET, else the per-user socket. A daemon
    /// is never started for an explicit socket.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Do not start kmsd when none answers on the default socket.
    #[arg(long)]
    no_autostart: bool,
    /// Draw N frames of a 100,000-key list off-screen and print the median frame time.
    #[arg(long, value_name = "N", hide = true)]
    bench_frames: Option<usize>,
}

/// How often the selected key is re-read: usage counts change without events.
const TICK: Duration = Duration::from_secs(3);
/// Actions applied before a redraw when many are queued (an event burst).
const MAX_BATCH: usize = 1024;

pub fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(frames) = args.bench_frames {
        bench::run(frames);
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kms-tui: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(args));
    // The input thread blocks in a read and notifications may wait on D-Bus: neither
    // may keep the process alive after the user quit.
    rt.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kms-tui: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let opts = ConnectOptions {
        socket: args.socket,
        autostart: !args.no_autostart,
    };
    let (action_tx, mut action_rx) = mpsc::unbounded_channel();
    let (effect_tx, effect_rx) = mpsc::unbounded_channel();

    let mut terminal = terminal::setup().context("cannot set up the terminal")?;
    let _restore = terminal::Guard;
    let size = terminal.size().context("cannot read the terminal size")?;
    let mut app = App::new((size.width, size.height));
    // The first frame goes out before the daemon answers (or is even started).
    terminal.draw(|f| ui::draw(f, &app))?;

    spawn_input(action_tx.clone());
    tokio::spawn(daemon::run(opts, effect_rx, action_tx.clone()));
    let tick_tx = action_tx.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(TICK);
        every.tick().await;
        loop {
            every.tick().await;
            if tick_tx.send(Action::Tick).is_err() {
                break;
            }
        }
    });
    drop(action_tx);

    while let Some(action) = action_rx.recv().await {
        let mut effects = update::update(&mut app, action);
        // A burst of events costs one frame, not one per event.
        for _ in 0..MAX_BATCH {
            match action_rx.try_recv() {
                Ok(a) => effects.extend(update::update(&mut app, a)),
                Err(_) => break,
            }
        }
        for effect in effects {
            match effect {
                Effect::Notify { summary, body } => notify::send(summary, body),
                other => {
                    let _ = effect_tx.send(other);
                }
            }
        }
        if app.should_quit {
            break;
        }
        terminal.draw(|f| ui::draw(f, &app))?;
    }
    Ok(())
}

/// Reads the terminal on a plain thread (crossterm's reads block) and forwards keys and
/// resizes as actions.
fn spawn_input(tx: UnboundedSender<Action>) {
    let spawned = std::thread::Builder::new()
        .name("input".into())
        .spawn(move || {
            loop {
                let action = match crossterm::event::read() {
                    Ok(TermEvent::Key(k)) if k.kind == KeyEventKind::Press => Action::Key(k),
                    Ok(TermEvent::Resize(w, h)) => Action::Resize(w, h),
                    Ok(_) => continue,
                    Err(_) => break,
                };
                if tx.send(action).is_err() {
                    break;
                }
            }
        });
    if let Err(e) = spawned {
        // Without input the dashboard can still show live state; say why keys are dead.
        eprintln!("kms-tui: cannot read the keyboard: {e}");
    }
}
