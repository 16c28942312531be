//! Desktop notifications (SPEC §8) through notify-rust, behind the default
//! `desktop-notifications` feature. Without a D-Bus session bus there is nobody to show
//! them: the event is already on the message line, so nothing else is done, and a
//! failing notification daemon is ignored for the same reason.
//!
//! One thread shows them, fed by a bounded queue: a D-Bus that is slow or never answers
//! holds up that one thread, never the UI, and never costs more than [`QUEUE`] waiting
//! notes. What does not fit is counted and dropped; whatever queued up while the thread
//! was busy goes out as one notification. The thread is never joined: quitting does not
//! wait for D-Bus.
//!
//! A session bus is no promise of a notification server (an SSH login often has one
//! without a desktop): the thread first asks the server what it can do, and stops for
//! the session if none answers, or after [`GIVE_UP_AFTER`] failures in a row, instead of
//! trying (and perhaps having D-Bus try to start a server) for every event.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use kms_shared::protocol::EventKind;

use super::strings as s;

/// Notifications that may wait while one is being shown.
pub const QUEUE: usize = 64;

/// The least time between two notifications: what comes sooner waits, and goes out with
/// whatever else came meanwhile, as one. A burst (twenty rotations by a script) is then
/// one notification, not twenty, even when D-Bus answers at once.
pub const MIN_GAP: Duration = Duration::from_secs(1);

/// Failed notifications in a row after which none is tried again in this session.
pub const GIVE_UP_AFTER: u32 = 3;

/// What became of one notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    Yes,
    Failed,
    /// No notification server answers: nothing more is tried.
    NoServer,
}

/// One notification asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub kind: EventKind,
    pub summary: String,
    pub body: String,
}

/// Whether notifications can be shown at all in this session.
pub fn available() -> bool {
    cfg!(feature = "desktop-notifications")
        && std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some_and(|v| !v.is_empty())
}

/// The sending end; cheap, never blocks.
#[derive(Debug)]
pub struct Notifier {
    /// `None` when notifications are not available (or the thread could not start).
    tx: Option<SyncSender<Note>>,
    /// Notes dropped because the queue was full, since the thread last looked.
    dropped: Arc<AtomicU64>,
}

impl Notifier {
    /// The notifier of this session: a thread showing desktop notifications when a
    /// D-Bus session bus is there, else one that does nothing.
    pub fn start() -> Notifier {
        if available() {
            Notifier::spawn(QUEUE, MIN_GAP, desktop())
        } else {
            Notifier::disabled()
        }
    }

    /// Shows nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            tx: None,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// One thread calling `show` for each (coalesced) notification, at most one per
    /// `gap`, with up to `queue` notes waiting.
    pub fn spawn(
        queue: usize,
        gap: Duration,
        show: impl FnMut(String, String) -> Shown + Send + 'static,
    ) -> Notifier {
        let (tx, rx) = mpsc::sync_channel(queue);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&dropped);
        let spawned = std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || run(&rx, &counter, gap, show));
        match spawned {
            Ok(_) => Notifier {
                tx: Some(tx),
                dropped,
            },
            // Nobody to show them: the message line still has every event.
            Err(_) => Notifier::disabled(),
        }
    }

    /// Queues a notification without blocking; drops it (counted) when the queue is full.
    pub fn send(&self, note: Note) {
        let Some(tx) = &self.tx else {
            return;
        };
        match tx.try_send(note) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// Shows desktop notifications; each call blocks for as long as D-Bus takes. The first
/// asks the server for its capabilities: none answering is [`Shown::NoServer`], and a
/// server that reads markup in bodies gets the body escaped (account names and token
/// errors are free text: `<b>` or a stray `&` would be taken as markup).
#[cfg(feature = "desktop-notifications")]
fn desktop() -> impl FnMut(String, String) -> Shown {
    let mut markup: Option<bool> = None;
    move |summary, body| {
        let markup = match markup {
            Some(m) => m,
            None => match notify_rust::get_capabilities() {
                Ok(caps) => *markup.insert(caps.iter().any(|c| c == "body-markup")),
                Err(_) => return Shown::NoServer,
            },
        };
        let body = if markup { escape_markup(&body) } else { body };
        let shown = notify_rust::Notification::new()
            .appname(s::NOTIFY_APP)
            .summary(&summary)
            .body(&body)
            .show();
        if shown.is_ok() {
            Shown::Yes
        } else {
            Shown::Failed
        }
    }
}

/// Without the feature [`available`] is false and nothing is ever shown.
#[cfg(not(feature = "desktop-notifications"))]
fn desktop() -> impl FnMut(String, String) -> Shown {
    |_, _| Shown::NoServer
}

/// `text` as the notification spec's body markup shows it literally.
pub fn escape_markup(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// The notifier thread: waits for a note, and for `gap` to have passed since the last
/// notification, takes everything queued by then, shows one notification for the lot.
/// Ends when no server answers or after [`GIVE_UP_AFTER`] failures in a row; later notes
/// then find the queue closed and are dropped where they are sent.
fn run(
    rx: &Receiver<Note>,
    dropped: &AtomicU64,
    gap: Duration,
    mut show: impl FnMut(String, String) -> Shown,
) {
    let mut last: Option<Instant> = None;
    let mut failed = 0;
    while let Ok(first) = rx.recv() {
        if let Some(wait) = last.and_then(|t| gap.checked_sub(t.elapsed())) {
            std::thread::sleep(wait);
        }
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let lost = dropped.swap(0, Ordering::Relaxed);
        let (summary, body) = coalesce(batch, lost);
        match show(summary, body) {
            Shown::Yes => failed = 0,
            Shown::Failed => failed += 1,
            Shown::NoServer => return,
        }
        if failed >= GIVE_UP_AFTER {
            return;
        }
        last = Some(Instant::now());
    }
}

/// One notification for `batch` plus `lost` dropped notes: a single note as it is, else
/// the number of events and how many of each kind.
pub fn coalesce(mut batch: Vec<Note>, lost: u64) -> (String, String) {
    if batch.len() == 1 && lost == 0 {
        let n = batch.remove(0);
        return (n.summary, n.body);
    }
    let mut kinds: Vec<(EventKind, u64)> = Vec::new();
    for n in &batch {
        match kinds.iter_mut().find(|(k, _)| *k == n.kind) {
            Some((_, c)) => *c += 1,
            None => kinds.push((n.kind, 1)),
        }
    }
    let total = batch.len() as u64 + lost;
    (
        s::notification_batch_summary(total),
        s::notification_batch_body(&kinds, lost),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    fn note(kind: EventKind, summary: &str) -> Note {
        Note {
            kind,
            summary: summary.into(),
            body: "by alice".into(),
        }
    }

    /// A lone event is shown as it is; several become one notification counting kinds.
    #[test]
    fn batches_are_coalesced() {
        let one = coalesce(vec![note(EventKind::Rotated, "kms: a rotated to v2")], 0);
        assert_eq!(one, ("kms: a rotated to v2".into(), "by alice".into()));
        let mut batch = vec![note(EventKind::Rotated, "r"); 10];
        batch.push(note(EventKind::StateChanged, "s"));
        batch.push(note(EventKind::StateChanged, "s"));
        assert_eq!(
            coalesce(batch, 0),
            (
                "kms: 12 events".into(),
                "10 rotated, 2 state-changed".into()
            )
        );
        assert_eq!(
            coalesce(vec![note(EventKind::Purged, "p")], 5),
            (
                "kms: 6 events".into(),
                "1 purged, 5 more not shown (too many at once)".into()
            )
        );
    }

    /// With a D-Bus that never answers, events queue behind the one being shown on a
    /// single thread; past the queue's bound they are dropped and counted, and what
    /// queued up goes out as one notification when the thread is free again.
    #[test]
    fn one_thread_bounded_queue() {
        let (shown_tx, shown) = mpsc::channel();
        let (release, gate) = mpsc::channel::<()>();
        let notifier = Notifier::spawn(4, Duration::ZERO, move |summary, body| {
            shown_tx
                .send((std::thread::current().id(), summary, body))
                .unwrap();
            // The "D-Bus" answers only when the test says so.
            let _ = gate.recv();
            Shown::Yes
        });
        notifier.send(note(EventKind::Rotated, "kms: first"));
        let wait = Duration::from_secs(10);
        let (first_thread, summary, _) = shown.recv_timeout(wait).unwrap();
        assert_eq!(summary, "kms: first");
        // The thread is stuck in "D-Bus": 4 fit in the queue, 36 are dropped.
        for _ in 0..38 {
            notifier.send(note(EventKind::Rotated, "r"));
        }
        notifier.send(note(EventKind::StateChanged, "s"));
        notifier.send(note(EventKind::StateChanged, "s"));
        assert_eq!(notifier.dropped.load(Ordering::Relaxed), 36);
        release.send(()).unwrap();
        let (thread, summary, body) = shown.recv_timeout(wait).unwrap();
        assert_eq!(thread, first_thread, "one thread shows everything");
        assert_eq!(summary, "kms: 40 events");
        assert_eq!(body, "4 rotated, 36 more not shown (too many at once)");
        release.send(()).unwrap();
        assert!(
            shown.recv_timeout(Duration::from_millis(200)).is_err(),
            "nothing else was queued"
        );
        // Sending after the thread is idle again shows the single event as it is.
        notifier.send(note(EventKind::Purged, "kms: gone"));
        let (thread, summary, _) = shown.recv_timeout(wait).unwrap();
        assert_eq!((thread, summary.as_str()), (first_thread, "kms: gone"));
        release.send(()).unwrap();
    }

    /// A burst sent faster than notifications go out is shown as at most two: the first at
    /// once, the rest together once the gap has passed. With a D-Bus that answered at once
    /// (or failed at once: no notification server), each event was its own notification.
    #[test]
    fn a_burst_is_one_notification_after_the_first() {
        let (shown_tx, shown) = mpsc::channel();
        let notifier = Notifier::spawn(64, Duration::from_secs(2), move |summary, _| {
            shown_tx.send(summary).unwrap();
            Shown::Yes
        });
        // A script's pace (~0.1 s in all), not all at once: without the gap the thread
        // shows each before the next comes.
        for _ in 0..20 {
            notifier.send(note(EventKind::Rotated, "kms: k rotated"));
            std::thread::sleep(Duration::from_millis(5));
        }
        let wait = Duration::from_secs(10);
        let mut events = 0;
        let mut notifications = 0;
        while events < 20 {
            let summary = shown.recv_timeout(wait).unwrap();
            notifications += 1;
            events += match summary.strip_prefix("kms: ") {
                Some("k rotated") => 1,
                Some(many) => many.trim_end_matches(" events").parse::<u32>().unwrap(),
                None => panic!("{summary}"),
            };
        }
        assert_eq!(events, 20);
        assert!(
            notifications <= 2,
            "{notifications} notifications for one burst"
        );
    }

    /// No server answering ends the thread at the first note; failures end it after
    /// [`GIVE_UP_AFTER`] in a row (a success in between starts the count again). Every
    /// event used to be tried, each perhaps with D-Bus starting a server that cannot run.
    #[test]
    fn a_missing_or_failing_server_is_given_up() {
        for (answers, tried) in [
            (vec![Shown::NoServer], 1),
            (vec![Shown::Failed; 3], 3),
            (
                vec![
                    Shown::Failed,
                    Shown::Yes,
                    Shown::Failed,
                    Shown::Failed,
                    Shown::Failed,
                ],
                5,
            ),
        ] {
            let (tried_tx, tried_rx) = mpsc::channel();
            let mut answers_left = answers.clone().into_iter();
            let notifier = Notifier::spawn(64, Duration::ZERO, move |summary, _| {
                tried_tx.send(summary).unwrap();
                answers_left.next().unwrap_or(Shown::Yes)
            });
            // One at a time, each taken before the next is sent: one try each.
            let mut seen = 0;
            for i in 0..8 {
                notifier.send(note(EventKind::Rotated, &format!("n{i}")));
                match tried_rx.recv_timeout(Duration::from_millis(if i < tried {
                    10_000
                } else {
                    300
                })) {
                    Ok(_) => seen += 1,
                    Err(_) => break,
                }
            }
            assert_eq!(seen, tried, "{answers:?}");
        }
    }

    #[test]
    fn bodies_are_escaped_for_markup() {
        assert_eq!(
            escape_markup("by <b>eve</b> & co"),
            "by &lt;b&gt;eve&lt;/b&gt; &amp; co"
        );
        assert_eq!(escape_markup("plain"), "plain");
    }

    /// Without a session bus nothing is queued and no thread waits on anything.
    #[test]
    fn disabled_does_nothing() {
        let n = Notifier::disabled();
        for _ in 0..1000 {
            n.send(note(EventKind::Rotated, "r"));
        }
        assert!(n.tx.is_none());
        assert_eq!(n.dropped.load(Ordering::Relaxed), 0);
    }
}
