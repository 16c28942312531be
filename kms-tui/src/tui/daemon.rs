//! The task that owns the connection to kmsd. It turns effects into requests and their
//! replies, and the subscription's events, into actions; when the daemon goes away it
//! says so and reconnects, starting kmsd again when it may, with backoff
//! ([`super::retry`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use kms_shared::client::{Client, ClientError, ConnectOptions, Notification, connect_or_start};
use kms_shared::paths;
use kms_shared::protocol::{ErrorKind, HistoryQuery};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::action::{Action, Effect, Op};
use super::app::HISTORY_PAGE;
use super::retry::{Attempt, Retry};
use super::strings as s;

/// How long a read that holds up the others (the key list, a key, versions, grants,
/// tokens: they run in order) may take before the daemon is taken for lost: meanwhile no
/// view is brought up to date (a kmsd stopped with SIGSTOP, or wedged, answers nothing).
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether the dashboard may start kmsd when none answers, by the rules its launch
/// follows (`connect_or_start`): the default socket, autostart not turned off, and not
/// the system service's socket nor a default that the system service's would shadow.
fn may_start(opts: &ConnectOptions) -> bool {
    opts.autostart
        && opts.socket.is_none()
        && paths::autostart_refused_in(
            &paths::Env::current(),
            &opts.socket_path(),
            Path::new(paths::SYSTEM_SOCKET).exists(),
        )
        .is_none()
}

/// Runs until the effect channel closes (the dashboard quit).
pub async fn run(
    mut opts: ConnectOptions,
    mut effects: UnboundedReceiver<Effect>,
    actions: UnboundedSender<Action>,
) {
    let mut retry = Retry::new(may_start(&opts));
    // The launch connects as kmsctl does (starting kmsd if it may, or saying why it may
    // not); later attempts start one only when the backoff says so.
    let mut attempt = if retry.may_start() {
        Attempt::Start
    } else {
        Attempt::Connect
    };
    let mut launch = true;
    loop {
        if attempt == Attempt::Start && !launch && actions.send(Action::StartingDaemon).is_err() {
            return;
        }
        let connecting = async {
            let client = if launch || attempt == Attempt::Start {
                connect_or_start(&opts).await?
            } else {
                Client::connect(&opts.socket_path()).await?
            };
            // Subscribe before anything is loaded, so no change falls between the load
            // and the first event.
            let notes = client.subscribe().await?;
            Ok::<_, ClientError>((Arc::new(client), notes))
        };
        let Some(result) = offline(connecting, &mut effects, &actions).await else {
            return;
        };
        if attempt == Attempt::Start {
            retry.started(Instant::now());
        }
        launch = false;
        let reason = match result {
            Ok((client, notes)) => {
                retry.connected(Instant::now());
                let daemon_version = client.daemon_version();
                // Which store it serves: a failure here only loses the check. Bounded as
                // the reads are: meanwhile nothing takes the effects (a change pressed now
                // would wait unanswered).
                let status = client.call(kms_shared::protocol::Request::Status);
                let data_dir = match tokio::time::timeout(READ_TIMEOUT, status).await {
                    Ok(Ok(kms_shared::protocol::Response::Status(s))) => Some(s.data_dir),
                    _ => None,
                };
                // A daemon started again when this one is gone serves its store, not the
                // account's default one (the user started this one on a store of their
                // choosing); a directory given relative to that daemon's own working
                // directory cannot be found from here, so none is started then. (A
                // status that failed leaves what an earlier connection said.)
                if let Some(dir) = &data_dir {
                    let dir = std::path::PathBuf::from(dir);
                    retry.allow_start(may_start(&opts) && dir.is_absolute());
                    opts.data_dir = Some(dir);
                }
                let connected = Action::Connected {
                    daemon_version,
                    data_dir,
                    at: now_millis(),
                };
                if actions.send(connected).is_err() {
                    return;
                }
                let Some(reason) = serve(&client, notes, &mut effects, &actions).await else {
                    return;
                };
                retry.lost(Instant::now());
                reason
            }
            Err(e) => describe(&e),
        };
        let now = Instant::now();
        let plan = retry.plan(now);
        let next = plan.next(now);
        if actions.send(Action::Disconnected { reason, next }).is_err() {
            return;
        }
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(plan.at));
        if offline(sleep, &mut effects, &actions).await.is_none() {
            return;
        }
        attempt = plan.attempt;
    }
}

/// Whether an effect is a read of what a view shows. Reads run one at a time, in order,
/// so that the answer applied last is the one read last; and a read asked for again
/// before it has started is done once ([`ReadQueue`]).
fn is_view_read(eff: &Effect) -> bool {
    matches!(
        eff,
        Effect::LoadKeys
            | Effect::GetKey(_)
            | Effect::LoadVersions(_)
            | Effect::LoadGrants
            | Effect::LoadHsmTokens
    )
}

/// The reads waiting to run, each at most once. A read that has not started yet will see
/// every change announced so far, so asking for it again adds nothing: a flood of events
/// about one key costs one re-read per read that runs, not one per event.
#[derive(Debug, Default)]
struct ReadQueue {
    waiting: std::collections::VecDeque<Effect>,
    /// The keys of the `GetKey`s in `waiting`: a burst of events about thousands of keys
    /// queues thousands of them, which a search of `waiting` for each would make slow.
    keys_waiting: std::collections::HashSet<String>,
    /// The read under way, taken by [`ReadQueue::pop`] and not yet [`ReadQueue::done`].
    running: Option<Effect>,
}

impl ReadQueue {
    /// Queues `read` unless the same read is already waiting; whether it was queued.
    fn push(&mut self, read: Effect) -> bool {
        let waiting = match &read {
            Effect::GetKey(tag) => !self.keys_waiting.insert(tag.clone()),
            // The other reads are a handful of kinds: at most one of each waits.
            other => self.waiting.contains(other),
        };
        if waiting {
            return false;
        }
        self.waiting.push_back(read);
        true
    }

    /// The next read to run, now under way.
    fn pop(&mut self) -> Option<Effect> {
        let next = self.waiting.pop_front()?;
        if let Effect::GetKey(tag) = &next {
            self.keys_waiting.remove(tag);
        }
        self.running = Some(next.clone());
        Some(next)
    }

    /// The read under way has been answered.
    fn done(&mut self) {
        self.running = None;
    }

    /// Every read not answered: the one under way, then those waiting.
    fn unanswered(&mut self) -> impl Iterator<Item = Effect> + '_ {
        self.keys_waiting.clear();
        self.running
            .take()
            .into_iter()
            .chain(self.waiting.drain(..))
    }
}

/// Carries out effects on `client` and passes its events on, until the connection is
/// lost (the reason) or the dashboard has gone (`None`). Reads run one at a time (see
/// [`is_view_read`]); everything else runs at once, and events are passed on while a
/// read is under way.
async fn serve(
    client: &Arc<Client>,
    notes: tokio::sync::mpsc::Receiver<Notification>,
    effects: &mut UnboundedReceiver<Effect>,
    actions: &UnboundedSender<Action>,
) -> Option<String> {
    let mut reads = ReadQueue::default();
    let lost = serve_with(client, notes, effects, actions, &mut reads).await?;
    // The views waiting for these learn why they do not come (reconnecting reads them
    // again), as effects asked for while offline do.
    for eff in reads.unanswered() {
        if let Some(a) = failed(eff, &lost)
            && actions.send(a).is_err()
        {
            return None;
        }
    }
    Some(lost)
}

/// [`serve`]'s loop: the reads it has not answered when the connection is lost are left
/// in `reads`.
async fn serve_with(
    client: &Arc<Client>,
    mut notes: tokio::sync::mpsc::Receiver<Notification>,
    effects: &mut UnboundedReceiver<Effect>,
    actions: &UnboundedSender<Action>,
    reads: &mut ReadQueue,
) -> Option<String> {
    let mut reading: Option<std::pin::Pin<Box<dyn Future<Output = _> + Send + '_>>> = None;
    loop {
        if reading.is_none()
            && let Some(eff) = reads.pop()
        {
            reading = Some(Box::pin(tokio::time::timeout(
                READ_TIMEOUT,
                exec(client, eff),
            )));
        }
        tokio::select! {
            eff = effects.recv() => match eff {
                None => return None,
                Some(eff) if is_view_read(&eff) => {
                    reads.push(eff);
                }
                Some(eff) => {
                    let c = client.clone();
                    let tx = actions.clone();
                    tokio::spawn(async move {
                        if let Some(a) = exec(&c, eff).await {
                            let _ = tx.send(a);
                        }
                    });
                }
            },
            done = async { reading.as_mut().expect("guarded by the branch's condition").await },
                if reading.is_some() =>
            {
                reading = None;
                // Given up: left unanswered in `reads`, and told as such by `serve`.
                let Ok(answer) = done else {
                    return Some(s::not_answering(READ_TIMEOUT.as_secs()));
                };
                reads.done();
                if let Some(a) = answer
                    && actions.send(a).is_err()
                {
                    return None;
                }
            }
            note = notes.recv() => {
                let a = match note {
                    Some(Notification::Event(e)) => Action::DaemonEvent(e),
                    Some(Notification::Lagged(n)) => Action::Lagged {
                        missed: n,
                        at: now_millis(),
                    },
                    // What a newer client library may add: nothing to show for it.
                    Some(_) => continue,
                    // The reader ends the stream when the connection drops.
                    None => return Some("connection to kmsd closed".into()),
                };
                if actions.send(a).is_err() {
                    return None;
                }
            }
        }
    }
}

/// Runs `work` (a wait, or an attempt to connect or start kmsd), answering effects with
/// "not connected" meanwhile: nothing the user asks for is held back to be done later on
/// a daemon that may be another. `None` when the dashboard has gone.
async fn offline<T>(
    work: impl Future<Output = T>,
    effects: &mut UnboundedReceiver<Effect>,
    actions: &UnboundedSender<Action>,
) -> Option<T> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return Some(out),
            eff = effects.recv() => match eff {
                None => return None,
                Some(eff) => {
                    if let Some(a) = failed(eff, s::NOT_CONNECTED)
                        && actions.send(a).is_err()
                    {
                        return None;
                    }
                }
            },
        }
    }
}

/// What the user reads: the daemon's own kind and message, or the transport failure.
fn describe(e: &ClientError) -> String {
    match e {
        ClientError::Server(w) => format!("{}: {}", w.kind, w.message),
        other => other.to_string(),
    }
}

async fn exec(c: &Client, eff: Effect) -> Option<Action> {
    Some(match eff {
        Effect::LoadKeys => Action::KeysLoaded(
            c.list_keys(false, 0, None)
                .await
                .map(|(keys, _)| keys)
                .map_err(|e| describe(&e)),
        ),
        Effect::GetKey(tag) => {
            let result = match c.get_key(&tag).await {
                Ok(k) => Ok(Some(k)),
                // Refused: this account no longer sees the key (its role was revoked, or
                // the key was purged, which only managers of all keys see).
                Err(e)
                    if matches!(
                        e.kind(),
                        Some(ErrorKind::NotFound | ErrorKind::PermissionDenied)
                    ) =>
                {
                    Ok(None)
                }
                Err(e) => Err(describe(&e)),
            };
            Action::KeyFetched { tag, result }
        }
        Effect::Create(spec) => Action::Created(c.create_key(spec).await.map_err(|e| describe(&e))),
        Effect::Op { op, tag, name } => {
            let r = match &op {
                Op::Rotate => c.rotate(&tag).await,
                Op::Enable => c.enable(&tag).await,
                Op::Disable => c.disable(&tag).await,
                Op::RequestDeletion => c.request_deletion(&tag).await,
                Op::CancelDeletion => c.cancel_deletion(&tag).await,
                Op::DeleteNow => c.delete_now(&tag).await,
                Op::SetRotation {
                    auto_rotation,
                    rotation_days,
                } => c.set_rotation(&tag, *auto_rotation, *rotation_days).await,
                Op::SetMemo(memo) => c.set_memo(&tag, memo).await,
            };
            Action::OpDone {
                op,
                tag,
                name,
                result: r.map_err(|e| describe(&e)),
            }
        }
        Effect::LoadVersions(tag) => Action::VersionsLoaded {
            result: c.versions(&tag).await.map_err(|e| describe(&e)),
            tag,
        },
        Effect::SetVersionEnabled {
            tag,
            name,
            version,
            enabled,
        } => {
            let r = if enabled {
                c.enable_version(&tag, version).await
            } else {
                c.disable_version(&tag, version).await
            };
            Action::VersionToggled {
                tag,
                name,
                version,
                enabled,
                result: r.map_err(|e| describe(&e)),
            }
        }
        Effect::LoadHistory { tag, before_seq } => {
            let query = HistoryQuery {
                key: tag.clone(),
                limit: Some(HISTORY_PAGE),
                before_seq,
                ..HistoryQuery::default()
            };
            Action::HistoryLoaded {
                tag,
                before_seq,
                result: c.history(query).await.map_err(|e| describe(&e)),
            }
        }
        Effect::LoadImpact(tag) => Action::ImpactLoaded {
            result: c.impact(&tag, None).await.map_err(|e| describe(&e)),
            tag,
        },
        Effect::LoadGrants => Action::GrantsLoaded(c.grants().await.map_err(|e| describe(&e))),
        Effect::Grant(spec) => Action::Granted(c.grant(spec).await.map_err(|e| describe(&e))),
        Effect::Revoke(spec) => Action::Revoked {
            result: c.revoke(spec.clone()).await.map_err(|e| describe(&e)),
            spec,
        },
        Effect::LoadHsmTokens => {
            Action::HsmTokensLoaded(c.hsm_list().await.map_err(|e| describe(&e)))
        }
        Effect::HsmAdd {
            name,
            module,
            token,
            pin_file,
        } => Action::HsmAdded(
            c.hsm_add(&name, &module, &token, &pin_file)
                .await
                .map_err(|e| describe(&e)),
        ),
        Effect::HsmRemove(name) => Action::HsmRemoved {
            result: c.hsm_remove(&name).await.map_err(|e| describe(&e)),
            name,
        },
        Effect::Notify { .. } => return None,
    })
}

/// The reply an effect gets when it cannot be sent, so every waiting view learns why.
fn failed(eff: Effect, msg: &str) -> Option<Action> {
    fn e<T>(msg: &str) -> Result<T, String> {
        Err(msg.to_string())
    }
    Some(match eff {
        Effect::LoadKeys => Action::KeysLoaded(e(msg)),
        Effect::GetKey(tag) => Action::KeyFetched {
            tag,
            result: e(msg),
        },
        Effect::Create(_) => Action::Created(e(msg)),
        Effect::Op { op, tag, name } => Action::OpDone {
            op,
            tag,
            name,
            result: e(msg),
        },
        Effect::LoadVersions(tag) => Action::VersionsLoaded {
            tag,
            result: e(msg),
        },
        Effect::SetVersionEnabled {
            tag,
            name,
            version,
            enabled,
        } => Action::VersionToggled {
            tag,
            name,
            version,
            enabled,
            result: e(msg),
        },
        Effect::LoadHistory { tag, before_seq } => Action::HistoryLoaded {
            tag,
            before_seq,
            result: e(msg),
        },
        Effect::LoadImpact(tag) => Action::ImpactLoaded {
            tag,
            result: e(msg),
        },
        Effect::LoadGrants => Action::GrantsLoaded(e(msg)),
        Effect::Grant(_) => Action::Granted(e(msg)),
        Effect::Revoke(spec) => Action::Revoked {
            spec,
            result: e(msg),
        },
        Effect::LoadHsmTokens => Action::HsmTokensLoaded(e(msg)),
        Effect::HsmAdd { .. } => Action::HsmAdded(e(msg)),
        Effect::HsmRemove(name) => Action::HsmRemoved {
            name,
            result: e(msg),
        },
        Effect::Notify { .. } => return None,
    })
}

/// The wall clock as the daemon dates events (milliseconds since the epoch).
fn now_millis() -> kms_shared::model::UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kms_shared::codec;
    use kms_shared::protocol::{
        ClientFrame, DaemonStatus, Event, EventKind, Outcome, PROTOCOL_VERSION, Request, Response,
        ServerFrame, WireError,
    };
    use tokio::io::AsyncWriteExt;

    /// A daemon that answers the handshake, the subscription and `status`, and then
    /// nothing: the dashboard's first read of the key list.
    async fn silent_after_connecting(listener: tokio::net::UnixListener) {
        let (mut stream, _) = listener.accept().await.unwrap();
        while let Some(body) = codec::read_frame(&mut stream, 1 << 20).await.unwrap() {
            let frame: ClientFrame = codec::decode(&body).unwrap();
            let reply = match frame.request {
                Request::Hello { .. } => Response::Hello {
                    protocol: PROTOCOL_VERSION,
                    daemon_version: "0.0.0".into(),
                    max_frame: None,
                },
                Request::Subscribe => Response::Subscribed,
                Request::Status => Response::Status(DaemonStatus {
                    daemon_version: "0.0.0".into(),
                    protocol: PROTOCOL_VERSION,
                    pid: 1,
                    uptime_ms: 0,
                    socket: String::new(),
                    data_dir: "/d".into(),
                    keys: 0,
                    connections: 1,
                    next_due_at: None,
                }),
                _ => continue,
            };
            let out = ServerFrame::Reply {
                id: frame.id,
                result: Outcome::Ok(reply),
            };
            let bytes = codec::encode_frame(&out, u32::MAX).unwrap();
            stream.write_all(&bytes).await.unwrap();
        }
    }

    /// A read that is never answered is given up after [`READ_TIMEOUT`], as a lost
    /// connection: the dashboard says so (and reconnects) instead of waiting for ever
    /// with every other effect and event held up behind it.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_read_is_a_lost_connection() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let daemon = tokio::spawn(silent_after_connecting(listener));
        let (effects_tx, effects) = tokio::sync::mpsc::unbounded_channel();
        let (actions, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let opts = ConnectOptions {
            socket: Some(socket.clone()),
            autostart: false,
            data_dir: None,
        };
        let task = tokio::spawn(run(opts, effects, actions));
        match seen.recv().await.unwrap() {
            Action::Connected { data_dir, .. } => assert_eq!(data_dir.as_deref(), Some("/d")),
            other => panic!("{other:?}"),
        }
        effects_tx.send(Effect::LoadKeys).unwrap();
        // Queued behind it, then given up with it: both views are told why.
        effects_tx.send(Effect::LoadGrants).unwrap();
        let lost = s::not_answering(READ_TIMEOUT.as_secs());
        match seen.recv().await.unwrap() {
            Action::KeysLoaded(Err(e)) => assert_eq!(e, lost),
            other => panic!("{other:?}"),
        }
        match seen.recv().await.unwrap() {
            Action::GrantsLoaded(Err(e)) => assert_eq!(e, lost),
            other => panic!("{other:?}"),
        }
        match seen.recv().await.unwrap() {
            Action::Disconnected { reason, .. } => assert_eq!(reason, lost),
            other => panic!("{other:?}"),
        }
        drop(effects_tx);
        task.abort();
        daemon.abort();
    }

    #[test]
    fn a_read_asked_for_again_before_it_runs_is_queued_once() {
        let mut q = ReadQueue::default();
        assert!(q.push(Effect::GetKey("a".into())));
        assert!(q.push(Effect::LoadKeys));
        assert!(!q.push(Effect::GetKey("a".into())), "already waiting");
        assert!(q.push(Effect::GetKey("b".into())));
        assert_eq!(q.pop(), Some(Effect::GetKey("a".into())));
        // Started: asking again queues it, since the one under way may predate a change.
        assert!(q.push(Effect::GetKey("a".into())));
        q.done();
        assert_eq!(q.pop(), Some(Effect::LoadKeys));
        q.done();
        assert_eq!(q.pop(), Some(Effect::GetKey("b".into())));
        // Lost with the connection: the one under way, then those waiting.
        let lost: Vec<Effect> = q.unanswered().collect();
        assert_eq!(
            lost,
            [Effect::GetKey("b".into()), Effect::GetKey("a".into())]
        );
        assert_eq!(q.pop(), None);
        assert_eq!(q.unanswered().count(), 0);
    }

    /// A daemon that answers `get_key` with `not-found` (holding its first answer until
    /// `release`), `list_keys` with no keys and `impact` with an error, tells `seen` each
    /// request's kind, and sends `event` while the first `get_key` is held.
    async fn counting_daemon(
        listener: tokio::net::UnixListener,
        seen: tokio::sync::mpsc::UnboundedSender<&'static str>,
        release: tokio::sync::oneshot::Receiver<()>,
        event: Event,
    ) {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut rd, wr) = stream.into_split();
        let wr = Arc::new(tokio::sync::Mutex::new(wr));
        let send = move |frame: ServerFrame| {
            let wr = wr.clone();
            async move {
                let bytes = codec::encode_frame(&frame, u32::MAX).unwrap();
                wr.lock().await.write_all(&bytes).await.unwrap();
            }
        };
        let mut release = Some(release);
        while let Some(body) = codec::read_frame(&mut rd, 1 << 20).await.unwrap() {
            let frame: ClientFrame = codec::decode(&body).unwrap();
            let kind = frame.request.kind();
            let result = match frame.request {
                Request::Hello { .. } => Outcome::Ok(Response::Hello {
                    protocol: PROTOCOL_VERSION,
                    daemon_version: "0.0.0".into(),
                    max_frame: None,
                }),
                Request::Subscribe => Outcome::Ok(Response::Subscribed),
                Request::ListKeys { .. } => Outcome::Ok(Response::Keys {
                    keys: Vec::new(),
                    total: 0,
                }),
                _ => Outcome::Err(WireError::new(ErrorKind::NotFound, "no such key")),
            };
            let _ = seen.send(kind);
            let reply = ServerFrame::Reply {
                id: frame.id,
                result,
            };
            match release.take() {
                Some(release) if kind == "get_key" => {
                    send(ServerFrame::Event(event.clone())).await;
                    let send = send.clone();
                    tokio::spawn(async move {
                        let _ = release.await;
                        send(reply).await;
                    });
                }
                held => {
                    release = held;
                    send(reply).await;
                }
            }
        }
    }

    /// `f`'s output, or a failure after 20 s (what was awaited never came).
    async fn within<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(20), f)
            .await
            .expect("nothing came within 20 s")
    }

    /// Effects asked for while a read is under way: the same read asked for fifty times
    /// runs once more, not fifty times; other effects and events are not held up by it.
    #[tokio::test]
    async fn a_flood_of_the_same_read_runs_it_once_more() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (seen_tx, mut requests) = tokio::sync::mpsc::unbounded_channel();
        let (release, held) = tokio::sync::oneshot::channel();
        let event = Event {
            seq: 1,
            time: 0,
            kind: EventKind::Rotated,
            key_tag: Some("a".into()),
            key_name: Some("k".into()),
            version: Some(2),
            state: None,
            account: "kmsd".into(),
            message: "rotated".into(),
        };
        let daemon = tokio::spawn(counting_daemon(listener, seen_tx, held, event.clone()));
        let (effects_tx, effects) = tokio::sync::mpsc::unbounded_channel();
        let (actions, mut shown) = tokio::sync::mpsc::unbounded_channel();
        let opts = ConnectOptions {
            socket: Some(socket.clone()),
            autostart: false,
            data_dir: None,
        };
        let task = tokio::spawn(run(opts, effects, actions));
        assert!(matches!(
            within(shown.recv()).await.unwrap(),
            Action::Connected { .. }
        ));
        let mut next_request = async || loop {
            match requests.recv().await.unwrap() {
                "hello" | "subscribe" | "status" => continue,
                kind => return kind,
            }
        };
        effects_tx.send(Effect::GetKey("a".into())).unwrap();
        assert_eq!(within(next_request()).await, "get_key");
        // The held read does not hold up the event sent meanwhile.
        match within(shown.recv()).await.unwrap() {
            Action::DaemonEvent(e) => assert_eq!(e, event),
            other => panic!("{other:?}"),
        }
        for _ in 0..50 {
            effects_tx.send(Effect::GetKey("a".into())).unwrap();
        }
        // Nor an effect that is not a read: once the daemon has it, every read before it
        // has been queued.
        effects_tx.send(Effect::LoadImpact("a".into())).unwrap();
        assert_eq!(within(next_request()).await, "impact");
        release.send(()).unwrap();
        // The reads after the held one: `a` once, then the list asked for last.
        effects_tx.send(Effect::LoadKeys).unwrap();
        assert_eq!(within(next_request()).await, "get_key");
        assert_eq!(within(next_request()).await, "list_keys");
        let mut fetched = 0;
        loop {
            match within(shown.recv()).await.unwrap() {
                Action::KeyFetched { tag, result } => {
                    assert_eq!((tag.as_str(), result), ("a", Ok(None)));
                    fetched += 1;
                }
                Action::ImpactLoaded { .. } => {}
                Action::KeysLoaded(keys) => {
                    assert_eq!(keys, Ok(Vec::new()));
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(fetched, 2);
        assert!(requests.try_recv().is_err(), "no other request was sent");
        drop(effects_tx);
        task.abort();
        daemon.abort();
    }
}
