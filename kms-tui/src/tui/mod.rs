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
mod input;
mod keymap;
mod notify;
mod retry;
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
use ratatui::Terminal;
use ratatui::backend::Backend;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

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
    /// Do not start kmsd when none answers on the default socket (at launch, nor again
    /// when it goes away: the dashboard then only reconnects).
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
/// The shortest time between two frames while actions keep coming (30 a second).
const FRAME: Duration = Duration::from_millis(33);

pub fn main() -> ExitCode {
    let args = Args::parse();
    ui::theme::set_no_colour(ui::theme::no_colour_asked(
        std::env::var_os("NO_COLOR").as_deref(),
    ));
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
        Ok(Ended::Quit) => ExitCode::SUCCESS,
        // As a shell reports a process the signal ended: 128 + its number.
        Ok(Ended::Signal(n)) => ExitCode::from(u8::try_from(128 + n).unwrap_or(u8::MAX)),
        Err(e) => {
            eprintln!("kms-tui: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How the event loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// `q`, ctrl-c, or the input closed.
    Quit,
    /// SIGTERM, SIGHUP, SIGQUIT or SIGINT (its number).
    Signal(i32),
}

/// The signals that end the dashboard the way `q` does, so that the terminal is restored
/// before the process goes. Ctrl-C in raw mode is a key, not SIGINT, and stays one; a
/// SIGINT sent with kill is caught here like the others.
struct Signals {
    streams: [(Signal, i32); 4],
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        let on = |kind: SignalKind| -> std::io::Result<(Signal, i32)> {
            Ok((signal(kind)?, kind.as_raw_value()))
        };
        Ok(Signals {
            streams: [
                on(SignalKind::terminate())?,
                on(SignalKind::hangup())?,
                on(SignalKind::quit())?,
                on(SignalKind::interrupt())?,
            ],
        })
    }

    /// Waits for the next of the signals; returns its number.
    async fn recv(&mut self) -> i32 {
        let [(term, t), (hup, h), (quit, q), (int, i)] = &mut self.streams;
        tokio::select! {
            Some(()) = term.recv() => *t,
            Some(()) = hup.recv() => *h,
            Some(()) = quit.recv() => *q,
            Some(()) = int.recv() => *i,
            // The signal driver is gone (the runtime is shutting down): nothing to wait for.
            else => std::future::pending().await,
        }
    }
}

async fn run(args: Args) -> anyhow::Result<Ended> {
    // Before the terminal goes raw: a signal from then on restores it.
    let mut signals = Signals::new().context("cannot listen for signals")?;
    let opts = ConnectOptions {
        socket: args.socket,
        autostart: !args.no_autostart,
        data_dir: None,
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
    let notifier = notify::Notifier::start();

    event_loop(
        &mut terminal,
        &mut app,
        &mut action_rx,
        &effect_tx,
        &notifier,
        &mut signals,
    )
    .await
}

/// Applies actions, carries out their effects and redraws, until the user quits, a
/// signal says to, or nothing can send actions any more.
async fn event_loop<B: Backend>(
    terminal: &mut Terminal<B>,
    app: &mut App,
    action_rx: &mut UnboundedReceiver<Action>,
    effect_tx: &UnboundedSender<Effect>,
    notifier: &notify::Notifier,
    signals: &mut Signals,
) -> anyhow::Result<Ended>
where
    B::Error: Send + Sync + 'static,
{
    // When the screen was last drawn here (the frame drawn before is long past by the
    // first action), and whether it shows all that has happened since.
    let mut drawn_at: Option<tokio::time::Instant> = None;
    let mut behind = false;
    loop {
        let now = tokio::time::Instant::now();
        let next_frame = drawn_at.map_or(now, |at| at + FRAME);
        let action = tokio::select! {
            // A signal goes first, even behind a burst of events.
            biased;
            signo = signals.recv() => {
                update::update(app, Action::Quit);
                return Ok(Ended::Signal(signo));
            }
            () = tokio::time::sleep_until(next_frame), if behind => {
                terminal.draw(|f| ui::draw(f, app))?;
                (drawn_at, behind) = (Some(tokio::time::Instant::now()), false);
                continue;
            }
            action = action_rx.recv() => match action {
                Some(a) => a,
                None => return Ok(Ended::Quit),
            },
        };
        let mut effects = update::update(app, action);
        // A burst of events costs one frame, not one per event.
        for _ in 0..MAX_BATCH {
            match action_rx.try_recv() {
                Ok(a) => effects.extend(update::update(app, a)),
                Err(_) => break,
            }
        }
        for effect in effects {
            match effect {
                Effect::Notify {
                    kind,
                    summary,
                    body,
                } => notifier.send(notify::Note {
                    kind,
                    summary,
                    body,
                }),
                other => {
                    let _ = effect_tx.send(other);
                }
            }
        }
        if app.should_quit {
            return Ok(Ended::Quit);
        }
        // A key pressed after a quiet moment is drawn at once; events coming one after
        // another (thousands a second from a script rotating keys) are drawn at most once
        // a frame, where drawing after each was most of the dashboard's time.
        if tokio::time::Instant::now() >= next_frame {
            terminal.draw(|f| ui::draw(f, app))?;
            (drawn_at, behind) = (Some(tokio::time::Instant::now()), false);
        } else {
            behind = true;
        }
    }
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
                    Ok(TermEvent::Paste(text)) => Action::Paste(text),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use ratatui::backend::TestBackend;

    use super::*;

    /// Runs the event loop on a test terminal while `send` feeds it actions; ends when
    /// `send` is done with the channel. Returns the frames drawn meanwhile.
    async fn frames_drawn<F>(
        terminal: &mut Terminal<TestBackend>,
        app: &mut App,
        send: impl FnOnce(mpsc::UnboundedSender<Action>) -> F,
    ) -> usize
    where
        F: std::future::Future<Output = ()>,
    {
        let before = terminal.get_frame().count();
        let mut signals = Signals::new().unwrap();
        let (action_tx, mut action_rx) = mpsc::unbounded_channel();
        let (effect_tx, _effect_rx) = mpsc::unbounded_channel();
        let notifier = notify::Notifier::disabled();
        let looping = event_loop(
            terminal,
            app,
            &mut action_rx,
            &effect_tx,
            &notifier,
            &mut signals,
        );
        let (ended, ()) = tokio::join!(looping, send(action_tx));
        assert_eq!(ended.unwrap(), Ended::Quit);
        terminal.get_frame().count() - before
    }

    fn lost(reason: &str) -> Action {
        Action::Disconnected {
            reason: reason.into(),
            next: crate::tui::retry::Next::Connect(Duration::from_secs(1)),
        }
    }

    /// Actions that keep coming (an event every millisecond for a second) are drawn at
    /// most once a frame, the last of them too once they stop; an action after a quiet
    /// moment (a key pressed) is drawn at once — in one run of the loop, so that it is
    /// the time since the last frame that lets it through. Drawing after each action was
    /// most of the dashboard's time in a burst of events.
    #[tokio::test(start_paused = true)]
    async fn a_burst_is_drawn_once_a_frame_and_a_key_at_once() {
        let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
        let mut app = App::new((80, 24));
        let frames = frames_drawn(&mut terminal, &mut app, |tx| async move {
            for i in 0..1000 {
                tx.send(lost(&format!("burst {i}"))).unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // Quiet: the frame owed is drawn.
            tokio::time::sleep(Duration::from_secs(1)).await;
            tx.send(lost("a key")).unwrap();
            // Less than a frame: had it waited for one, the loop would end first.
            tokio::time::sleep(Duration::from_millis(1)).await;
        })
        .await;
        let frames_a_second = (1000 / FRAME.as_millis()) as usize;
        assert!(
            (frames_a_second / 2..=frames_a_second + 4).contains(&frames),
            "{frames} frames for 1,001 actions"
        );
        let screen = format!("{:?}", terminal.backend().buffer());
        assert!(
            screen.contains("a key"),
            "the action after a quiet moment is not drawn"
        );
    }

    /// The last action of a burst is drawn once the burst stops, within a frame.
    #[tokio::test(start_paused = true)]
    async fn the_last_action_of_a_burst_is_drawn() {
        let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
        let mut app = App::new((80, 24));
        frames_drawn(&mut terminal, &mut app, |tx| async move {
            for i in 0..100 {
                tx.send(lost(&format!("burst {i}"))).unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(FRAME).await;
        })
        .await;
        let screen = format!("{:?}", terminal.backend().buffer());
        assert!(screen.contains("burst 99"), "the last action is not drawn");
    }

    /// SIGTERM, SIGHUP, SIGQUIT and SIGINT each end the event loop the way `q` does (so
    /// the terminal guard restores the terminal), even while nothing else happens.
    #[test]
    fn signals_end_the_event_loop() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for (name, number) in [("TERM", 15), ("HUP", 1), ("QUIT", 3), ("INT", 2)] {
                let mut signals = Signals::new().unwrap();
                // Kept open: the loop must end because of the signal, not a closed channel.
                let (_action_tx, mut action_rx) = mpsc::unbounded_channel();
                let (effect_tx, _effect_rx) = mpsc::unbounded_channel();
                let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
                let mut app = App::new((80, 24));
                let status = std::process::Command::new("kill")
                    .arg(format!("-{name}"))
                    .arg(std::process::id().to_string())
                    .status()
                    .unwrap();
                assert!(status.success());
                let ended = tokio::time::timeout(
                    Duration::from_secs(10),
                    event_loop(
                        &mut terminal,
                        &mut app,
                        &mut action_rx,
                        &effect_tx,
                        &notify::Notifier::disabled(),
                        &mut signals,
                    ),
                )
                .await
                .unwrap_or_else(|_| panic!("SIG{name} did not end the loop"))
                .unwrap();
                assert_eq!(ended, Ended::Signal(number), "SIG{name}");
                assert!(app.should_quit, "SIG{name}");
            }
        });
    }
}
