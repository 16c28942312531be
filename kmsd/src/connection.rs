//! One client connection: reads frames, answers many requests at once (pipelining), and
//! forwards events after a `subscribe`.
//!
//! Three kinds of tasks share the socket: the reader (this task), one task per request in
//! flight, and a writer that owns the write half. Crypto calls are the exception: the
//! reader computes a small AES call itself and hands a signature (and the other single
//! pool calls) to the crypto pool, and the thread that makes the call's history entry
//! durable queues the reply ([`queue_when_durable`]). Replies and events reach the writer over
//! a bounded channel, so a client that stops reading slows only itself: its requests wait
//! for the channel, its reader stops taking new ones once `max_in_flight` are pending or
//! the connection holds `max_buffered_bytes` of requests and replies ([`Buffered`]), and
//! its event forwarder falls behind the broadcast and is told how many events it missed.
//!
//! A stopping daemon answers what its connections have read, within bounds: a client that
//! does not read its replies is given [`SHUTDOWN_WRITE_GRACE`] per write, and no connection
//! takes longer than [`SHUTDOWN_DRAIN_LIMIT`] to close, so that kmsd stops (and records a
//! clean stop) well inside the service manager's stop timeout. Replies dropped then were
//! never sent: every call answered before was durable first, as always.

use crate::budget::{Budget, Buffered, Held, SMALL_CALL};
use crate::config::Config;
use crate::engine::{Caller, Durable, Engine};
use crate::log_limit::LogAtMostEvery;
use crate::service::Service;
use crate::shutdown::Shutdown;
use kms_shared::codec::{self, WipingBufReader};
use kms_shared::protocol::{
    ClientFrame, ErrorKind, Outcome, PROTOCOL_VERSION, Request, Response, ServerFrame, WireError,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio::time::timeout;
use zeroize::Zeroize;

/// When a refused protocol version was last logged.
static MISMATCH_LOGGED: LogAtMostEvery = LogAtMostEvery::new(Duration::from_secs(10));

/// Once the daemon stops, how long one write may wait for a client that does not read.
/// A client reading its replies takes far less per write (at most 64 KiB, or one frame);
/// one that does not read would otherwise keep the daemon for the writer's stall timeout
/// (`idle_timeout`, 300 s), past systemd's `TimeoutStopSec=30s`, which then kills kmsd
/// without a clean stop (and the next start verifies every page).
pub const SHUTDOWN_WRITE_GRACE: Duration = Duration::from_secs(2);

/// Once the daemon stops, the longest a connection takes to answer its calls in flight
/// and write the replies, however slowly its client reads. A call that takes longer is
/// not answered (its effects are durable or not, as for a client that went away); with
/// the 5 s kmsd then waits for the engine, the stop stays well inside `TimeoutStopSec`.
pub const SHUTDOWN_DRAIN_LIMIT: Duration = Duration::from_secs(10);

pub struct Connection {
    stream: UnixStream,
    caller: Caller,
    engine: Arc<Engine>,
    service: Arc<Service>,
    config: Arc<Config>,
    /// What the caller's account holds in all its connections.
    account_bytes: Arc<Budget>,
    shutdown: Shutdown,
}

/// Why the reader stopped.
enum ReadEnd {
    Closed,
    Fatal(WireError),
}

impl Connection {
    pub fn new(
        stream: UnixStream,
        caller: Caller,
        engine: Arc<Engine>,
        service: Arc<Service>,
        config: Arc<Config>,
        account_bytes: Arc<Budget>,
        shutdown: Shutdown,
    ) -> Self {
        Connection {
            stream,
            caller,
            engine,
            service,
            config,
            account_bytes,
            shutdown,
        }
    }

    pub async fn run(self) {
        let Connection {
            stream,
            caller,
            engine,
            service,
            config,
            account_bytes,
            mut shutdown,
        } = self;
        service.connection_opened();
        // Counted closed however this ends (a panic included), after everything below.
        let _opened = Opened(service.clone());
        tracing::debug!(account = %caller.account, pid = caller.pid, client = %caller.client, "connected");
        let (rd, wr) = stream.into_split();
        let mut rd = WipingBufReader::with_capacity(READ_BUFFER, rd);
        // Config refuses more than this; a Config built in code could still hold any
        // count, and tokio's semaphore and channel panic on huge ones.
        let max_in_flight = config.max_in_flight.clamp(1, crate::config::MAX_IN_FLIGHT);
        let (tx, rx) = mpsc::channel::<Queued>(max_in_flight.max(16) * 2);
        let buffered = Buffered::new(config.max_buffered_bytes, account_bytes);
        let tx = Outbox {
            tx,
            buffered: buffered.clone(),
        };
        let mut writer = tokio::spawn(write_loop(wr, rx, config.idle_timeout, shutdown.clone()));
        let in_flight = Arc::new(Semaphore::new(max_in_flight));
        let caller = Arc::new(caller);
        let mut handshaken = false;
        let mut forwarder: Option<Forwarder> = None;

        let end = loop {
            let idle = if forwarder.is_some() {
                // Subscribers may stay quiet for as long as they like.
                std::time::Duration::from_secs(u64::from(u32::MAX))
            } else {
                config.idle_timeout
            };
            // A client that sends and does not read stops being read here: its requests and
            // replies stay within the budget (plus one frame), not `max_in_flight` of each.
            // A writer that gave up on this client (it stopped reading) ends the reader too.
            // Shutdown and a writer that gave up come first: a client that writes faster
            // than it is answered always has a frame ready, and must not keep a stopping
            // daemon (or a connection whose client stopped reading) reading for ever.
            tokio::select! {
                biased;
                _ = shutdown.recv() => break ReadEnd::Closed,
                () = tx.closed() => break ReadEnd::Closed,
                () = buffered.ready_to_read() => {}
            }
            let len = tokio::select! {
                biased;
                _ = shutdown.recv() => break ReadEnd::Closed,
                () = tx.closed() => break ReadEnd::Closed,
                r = read_len(&mut rd, config.max_frame, idle, config.frame_timeout) => r,
            };
            let (len, begun) = match len {
                Ok(Some(n)) => n,
                Ok(None) => break ReadEnd::Closed,
                Err(end) => break end,
            };
            let waiting = tokio::time::Instant::now();
            // A large body stays in the kernel's socket buffer (the client's writes block)
            // until the account has room for it: its other connections, each just past the
            // check above, could otherwise each read a frame over the account's budget. A
            // connection holding nothing reads a small one at once (budget.rs).
            let small = len <= SMALL_CALL && buffered.is_empty();
            let mut request = if small {
                buffered.hold(len)
            } else {
                tokio::select! {
                    biased;
                    _ = shutdown.recv() => break ReadEnd::Closed,
                    () = tx.closed() => break ReadEnd::Closed,
                    held = buffered.reserve(len) => held,
                }
            };
            // The frame's time runs from its first byte, the wait for room aside.
            let deadline = begun + config.frame_timeout + waiting.elapsed();
            let body = tokio::select! {
                biased;
                _ = shutdown.recv() => break ReadEnd::Closed,
                () = tx.closed() => break ReadEnd::Closed,
                r = read_exact_body(&mut rd, len, deadline) => r,
            };
            let body = match body {
                Ok(Some(b)) => b,
                Ok(None) => break ReadEnd::Closed,
                Err(end) => break end,
            };
            // The id of an undecodable request, if it can be read, to answer it by.
            let decoded = codec::decode::<ClientFrame>(&body)
                .map_err(|e| (e, codec::decode::<IdOnly>(&body).map_or(0, |f| f.id)));
            // The body may hold a plaintext; the decoded request has its own copy.
            let mut body = body;
            body.zeroize();
            let frame: ClientFrame = match decoded {
                Ok(f) => f,
                Err((e, id)) => {
                    // The framing is intact, so answer (with the id if it can be read) and go
                    // on; before the handshake there is no protocol to stay in step with.
                    let err = WireError::new(
                        ErrorKind::MalformedFrame,
                        format!("undecodable request: {e}"),
                    );
                    if !reply_unless_stopping(&tx, &mut shutdown, id, Outcome::Err(err)).await
                        || !handshaken
                    {
                        break ReadEnd::Closed;
                    }
                    continue;
                }
            };
            let id = frame.id;
            if !handshaken {
                match frame.request {
                    Request::Hello { protocol, .. } if protocol == PROTOCOL_VERSION => {
                        handshaken = true;
                        let hello = Response::Hello {
                            protocol: PROTOCOL_VERSION,
                            daemon_version: env!("CARGO_PKG_VERSION").to_string(),
                            max_frame: Some(config.max_frame),
                        };
                        if !reply_unless_stopping(&tx, &mut shutdown, id, Outcome::Ok(hello)).await
                        {
                            break ReadEnd::Closed;
                        }
                        continue;
                    }
                    Request::Hello { protocol, .. } => {
                        // SPEC §10: a mismatch is a clear error on both sides; the
                        // daemon's side is its log (at most one line in a while: any peer
                        // can send a wrong hello as often as it likes).
                        if let Some(skipped) = MISMATCH_LOGGED.due() {
                            tracing::info!(
                                skipped,
                                account = %caller.account,
                                pid = caller.pid,
                                client = %caller.client,
                                protocol,
                                "refused a client of another protocol version (kmsd speaks \
                                 {PROTOCOL_VERSION}); more such refusals in the next 10 s are \
                                 not logged"
                            );
                        }
                        let err = WireError::new(
                            ErrorKind::UnsupportedVersion,
                            format!(
                                "kmsd speaks protocol {PROTOCOL_VERSION}, the client {protocol}"
                            ),
                        );
                        reply_unless_stopping(&tx, &mut shutdown, id, Outcome::Err(err)).await;
                        break ReadEnd::Closed;
                    }
                    _ => {
                        let err = WireError::new(
                            ErrorKind::UnsupportedVersion,
                            "the first request on a connection must be hello (version handshake)",
                        );
                        reply_unless_stopping(&tx, &mut shutdown, id, Outcome::Err(err)).await;
                        break ReadEnd::Closed;
                    }
                }
            }
            if let Request::Subscribe = frame.request {
                if forwarder.is_none() {
                    forwarder = Some(Forwarder(tokio::spawn(forward_events(
                        engine.subscribe(),
                        tx.clone(),
                        service.clone(),
                        caller.clone(),
                    ))));
                }
                let subscribed = Outcome::Ok(Response::Subscribed);
                if !reply_unless_stopping(&tx, &mut shutdown, id, subscribed).await {
                    break ReadEnd::Closed;
                }
                continue;
            }
            // Backpressure: stop reading while this client has too many requests pending.
            // Their replies may be waiting for a client that does not read: shutdown (and a
            // writer that gave up) must not wait for them here.
            let permit = tokio::select! {
                biased;
                _ = shutdown.recv() => break ReadEnd::Closed,
                () = tx.closed() => break ReadEnd::Closed,
                p = in_flight.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break ReadEnd::Closed,
                },
            };
            // The request counts until its reply is queued (which then counts instead); a
            // request whose reply can be far larger (a key list, a history page, a batch)
            // counts as that reply, so that the reader stops while they fill the budget.
            let reply = service.reply_estimate(&frame.request);
            if small && reply > SMALL_CALL {
                // Not a small call after all (a key list, a history page, a batch): it
                // waits for the account's room like a large frame, uncounted meanwhile so
                // that calls waiting so never hold up each other.
                drop(request);
                request = tokio::select! {
                    biased;
                    _ = shutdown.recv() => break ReadEnd::Closed,
                    () = tx.closed() => break ReadEnd::Closed,
                    held = buffered.reserve(len.max(reply)) => held,
                };
            } else {
                request.grow_to(reply);
            }
            let answer = {
                let owed = ReplyOwed {
                    id,
                    owed: Some((tx.clone(), (request, permit))),
                };
                move |reply, durable| owed.send(reply, durable)
            };
            // The reader runs engine code itself (small AES calls): a panic there (a bug,
            // never input) costs that request an `internal` answer, not the connection.
            // The request handed back is moved, not copied: its size costs nothing.
            #[allow(clippy::result_large_err)]
            let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                service.start(&caller, frame.request, answer)
            }));
            let (request, answer) = match started {
                Ok(Ok(())) => continue,
                Ok(Err(not_started)) => not_started,
                Err(_) => {
                    tracing::error!(account = %caller.account, "a request panicked on the reader");
                    continue;
                }
            };
            let (service, caller) = (service.clone(), caller.clone());
            tokio::spawn(async move {
                let reply = service.handle(&caller, request).await;
                answer(reply, Durable::done());
            });
        };

        // The read buffer held requests (plaintexts): wiped now, not when the replies
        // still in flight are done.
        drop(rd);
        // Answer everything in flight before closing (graceful shutdown included).
        let drain = async {
            if let ReadEnd::Fatal(err) = end {
                tracing::debug!(account = %caller.account, error = %err, "closing connection");
                let _ = tx.reply(0, Outcome::Err(err)).await;
            }
            let all = u32::try_from(max_in_flight).unwrap_or(u32::MAX);
            let _ = in_flight.acquire_many(all).await;
            // The forwarder holds a sender: stopped first, so that the writer sees the end.
            drop(forwarder);
            drop(tx);
            let _ = (&mut writer).await;
        };
        // The writer gives up on a client that does not read (SHUTDOWN_WRITE_GRACE); this
        // bounds what remains: calls still running, a client reading a trickle.
        let stopped_long_ago = async {
            shutdown.recv().await;
            tokio::time::sleep(SHUTDOWN_DRAIN_LIMIT).await;
        };
        tokio::select! {
            () = drain => {}
            () = stopped_long_ago => {
                tracing::warn!(
                    account = %caller.account,
                    "shutting down: closing a connection whose replies were not all written"
                );
                // Dropping its queue wipes the replies in it; its buffer wipes itself.
                writer.abort();
                let _ = writer.await;
            }
        }
    }
}

/// The event forwarder of a subscribed connection, stopped when the connection ends
/// however it ends: left running, it would keep the connection's writer (and the socket)
/// open, so its client would never see the end.
struct Forwarder(tokio::task::JoinHandle<()>);

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts the connection closed when dropped.
struct Opened(Arc<Service>);

impl Drop for Opened {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

/// One request's reply, owed. `send` queues it once its record is durable; dropped unsent
/// (a panic in the code computing the reply: a bug, never input), it answers `internal`,
/// so that no request goes unanswered — a client would wait for it for ever — and its
/// in-flight permit and byte count (`held`) are given back either way.
struct ReplyOwed<H: Send + 'static> {
    id: u64,
    owed: Option<(Outbox, H)>,
}

impl<H: Send + 'static> ReplyOwed<H> {
    fn send(mut self, reply: Result<Response, WireError>, durable: Durable) {
        if let Some((tx, held)) = self.owed.take() {
            queue_when_durable(self.id, reply, durable, tx, held);
        }
    }
}

impl<H: Send + 'static> Drop for ReplyOwed<H> {
    fn drop(&mut self) {
        if let Some((tx, held)) = self.owed.take() {
            tracing::error!(
                id = self.id,
                "a request ended without its reply; answered internal"
            );
            let err = WireError::new(ErrorKind::Internal, "the request could not be completed");
            queue_when_durable(self.id, Err(err), Durable::done(), tx, held);
        }
    }
}

/// Queues the reply of a call once its history entry is durable, from the thread that
/// learns it is: for a call started without a task ([`Service::start`]: an AES call on the
/// reader, a signature on the pool) the store writer, which answers a whole group of calls
/// at once. A task per call, woken one by one, cost a spawn and a wake-up of the reactor
/// per call; here the writer's answers only wake the connection's writer task, once for
/// all of them. `held` (the request's byte count and in-flight permit) is released when
/// the reply is queued.
///
/// The reply is encoded now, on the thread that computed it, so that the writer thread
/// only moves it; if the entry cannot be made durable, it is wiped and the store's error
/// sent instead.
fn queue_when_durable<H: Send + 'static>(
    id: u64,
    reply: Result<Response, WireError>,
    durable: Durable,
    tx: Outbox,
    held: H,
) {
    // Wiped however the future ends (a decrypt's reply holds the plaintext).
    let mut encoded = encode(&ServerFrame::Reply {
        id,
        result: reply.into(),
    })
    .map(zeroize::Zeroizing::new);
    // Unconstrained: the first poll runs here, on a reactor thread (or a pool thread), where
    // tokio's cooperative budget could make it wake itself while it is being polled.
    crate::service::complete_on_wake(tokio::task::unconstrained(async move {
        let frame = match durable.wait().await {
            Ok(()) => match &mut encoded {
                Ok(f) => Ok(std::mem::take(&mut **f)),
                Err(()) => Err(()),
            },
            Err(e) => encode(&ServerFrame::Reply {
                id,
                result: Outcome::Err(crate::service::wire(e)),
            }),
        };
        if let Ok(frame) = frame {
            let _ = tx.send(frame).await;
        }
        drop(held);
    }));
}

/// Queues a reply from the reader, unless the daemon stops first: a client that does not
/// read fills the queue, and the reader must then stop, not wait for it. False if the
/// reply was not queued.
async fn reply_unless_stopping(
    tx: &Outbox,
    shutdown: &mut Shutdown,
    id: u64,
    result: Outcome,
) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.recv() => false,
        r = tx.reply(id, result) => r.is_ok(),
    }
}

#[derive(serde::Deserialize)]
struct IdOnly {
    id: u64,
}

/// Answers a connection the daemon will not serve: its first request (the hello, read
/// within `wait`) gets `err` by its id, then the connection is closed.
pub async fn refuse(stream: UnixStream, err: WireError, wait: std::time::Duration) {
    /// A hello is a few dozen bytes; a larger first frame is not read.
    const MAX_HELLO: u32 = 4096;
    let (rd, mut wr) = stream.into_split();
    let mut rd = WipingBufReader::with_capacity(1024, rd);
    let id = match read_body(&mut rd, MAX_HELLO, wait, wait).await {
        Ok(Some(body)) => codec::decode::<IdOnly>(&body).map_or(0, |f| f.id),
        _ => 0,
    };
    if let Ok(frame) = encode(&ServerFrame::Reply {
        id,
        result: Outcome::Err(err),
    }) {
        let _ = timeout(wait, wr.write_all(&frame)).await;
    }
    let _ = wr.shutdown().await;
}

/// Bytes read from the socket at a time. One read takes every frame that has arrived (a
/// 1 KiB request and the next ones a pipelining client sent), where reading the length
/// and then the body cost two reads per frame and a third that found nothing. Larger
/// bodies are read straight into their own buffer.
const READ_BUFFER: usize = 16 * 1024;

/// Reads one frame body: the length within `idle`, the body within `frame_timeout`.
async fn read_body(
    rd: &mut WipingBufReader<OwnedReadHalf>,
    max: u32,
    idle: std::time::Duration,
    frame_timeout: std::time::Duration,
) -> Result<Option<Vec<u8>>, ReadEnd> {
    match read_len(rd, max, idle, frame_timeout).await? {
        Some((n, begun)) => read_exact_body(rd, n, begun + frame_timeout).await,
        None => Ok(None),
    }
}

/// Reads a frame's length, and when its first byte came: that byte within `idle`, the
/// others within `frame_timeout`; `None` if the client closed (or failed) before a frame
/// began.
async fn read_len(
    rd: &mut WipingBufReader<OwnedReadHalf>,
    max: u32,
    idle: std::time::Duration,
    frame_timeout: std::time::Duration,
) -> Result<Option<(usize, tokio::time::Instant)>, ReadEnd> {
    let mut len = [0u8; 4];
    let first = match timeout(idle, rd.read(&mut len)).await {
        Err(_) => return Err(ReadEnd::Closed),
        Ok(Err(_)) | Ok(Ok(0)) => return Ok(None),
        Ok(Ok(n)) => n,
    };
    let begun = tokio::time::Instant::now();
    match timeout(frame_timeout, rd.read_exact(&mut len[first..])).await {
        Err(_) => return Err(incomplete()),
        Ok(Err(_)) => return Err(ReadEnd::Closed),
        Ok(Ok(_)) => {}
    }
    let n = u32::from_be_bytes(len);
    if n > max {
        return Err(ReadEnd::Fatal(WireError::new(
            ErrorKind::MalformedFrame,
            format!("frame of {n} bytes exceeds the maximum of {max}"),
        )));
    }
    Ok(Some((n as usize, begun)))
}

/// Reads a frame's body of `n` bytes by `deadline`.
async fn read_exact_body(
    rd: &mut WipingBufReader<OwnedReadHalf>,
    n: usize,
    deadline: tokio::time::Instant,
) -> Result<Option<Vec<u8>>, ReadEnd> {
    // A body cut short by an error or the timeout is wiped too.
    let mut body = zeroize::Zeroizing::new(vec![0u8; n]);
    match tokio::time::timeout_at(deadline, rd.read_exact(&mut body)).await {
        Err(_) => Err(incomplete()),
        Ok(Err(_)) => Err(ReadEnd::Closed),
        Ok(Ok(_)) => Ok(Some(std::mem::take(&mut *body))),
    }
}

fn incomplete() -> ReadEnd {
    ReadEnd::Fatal(WireError::new(
        ErrorKind::MalformedFrame,
        "incomplete frame: timed out waiting for the rest",
    ))
}

/// A frame on its way to the client: counted in the connection's [`Buffered`], and wiped
/// (a reply may hold a plaintext or a data key) when dropped, wherever that happens:
/// written, copied into the write buffer, or never taken because the writer gave up.
struct Queued {
    bytes: Vec<u8>,
    _held: Held,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

/// The way to the connection's writer.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<Queued>,
    buffered: Arc<Buffered>,
}

impl Outbox {
    async fn reply(&self, id: u64, result: Outcome) -> Result<(), ()> {
        let frame = encode(&ServerFrame::Reply { id, result })?;
        self.send(frame).await
    }

    /// Queues a frame; if the writer is gone it is dropped (wiped, not counted).
    async fn send(&self, frame: Vec<u8>) -> Result<(), ()> {
        let queued = Queued {
            _held: self.buffered.hold(frame.len()),
            bytes: frame,
        };
        self.tx.send(queued).await.map_err(|_| ())
    }

    /// Resolves once the writer has given up on the client.
    async fn closed(&self) {
        self.tx.closed().await
    }
}

fn encode(frame: &ServerFrame) -> Result<Vec<u8>, ()> {
    // Replies are bounded by the daemon's own limits; u32::MAX only guards the prefix.
    codec::encode_frame(frame, u32::MAX).map_err(|e| {
        tracing::error!(error = %e, "cannot encode a reply");
    })
}

/// Bytes of queued replies coalesced into one write.
const WRITE_BUFFER: usize = 64 * 1024;

/// Writes frames as they come, coalescing whatever is queued into one write. A client
/// that does not read for `stall` is disconnected; once the daemon stops, one that does
/// not read for [`SHUTDOWN_WRITE_GRACE`].
///
/// Replies carry plaintexts and data keys, and the coalescing buffer lives as long as the
/// connection: every frame and every byte of the buffer is zeroized once written, and the
/// buffer never grows (a reallocation would free a copy unwiped). A frame larger than the
/// buffer is written on its own. The buffer is wiped also when this task is aborted in
/// the middle of a write (a stopping connection past [`SHUTDOWN_DRAIN_LIMIT`]).
async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Queued>,
    stall: Duration,
    mut shutdown: Shutdown,
) {
    let mut buf = zeroize::Zeroizing::new(Vec::<u8>::with_capacity(WRITE_BUFFER));
    let (buf, shutdown) = (&mut *buf, &mut shutdown);
    let mut next = rx.recv().await;
    // A frame is dropped (wiped, no longer counted) once written or copied into `buf`,
    // which is bounded and wiped after each write.
    'frames: while let Some(mut frame) = next.take() {
        loop {
            if frame.bytes.len() > WRITE_BUFFER - buf.len() {
                // The buffer first, then this frame where it fits; a large one directly.
                if !buf.is_empty() && !write_wiped(&mut wr, buf, stall, shutdown).await {
                    break 'frames;
                }
                if frame.bytes.len() > WRITE_BUFFER {
                    if !write_wiped(&mut wr, &mut frame.bytes, stall, shutdown).await {
                        break 'frames;
                    }
                    break;
                }
            }
            buf.extend_from_slice(&frame.bytes);
            match rx.try_recv() {
                Ok(f) => frame = f,
                Err(_) => break,
            }
        }
        // Taken (copied or written): wiped and no longer counted now, not when the next
        // frame comes — the reader may be waiting on the count to go down.
        drop(frame);
        if !buf.is_empty() && !write_wiped(&mut wr, buf, stall, shutdown).await {
            break;
        }
        next = rx.recv().await;
    }
    // Replies that will never be written are dropped, so wiped; so are any sent after
    // this (their senders get an error, or `rx` drops them).
    rx.close();
    while let Ok(frame) = rx.try_recv() {
        drop(frame);
    }
    let _ = wr.shutdown().await;
}

/// Writes `bytes` within `stall` (within [`SHUTDOWN_WRITE_GRACE`] of the daemon's stop, if
/// that comes first), then zeroizes and empties them (keeping the capacity). False when
/// the client is gone or stalled.
async fn write_wiped(
    wr: &mut OwnedWriteHalf,
    bytes: &mut Vec<u8>,
    stall: Duration,
    shutdown: &mut Shutdown,
) -> bool {
    let grace_after_stop = async {
        shutdown.recv().await;
        tokio::time::sleep(SHUTDOWN_WRITE_GRACE).await;
    };
    let written = tokio::select! {
        r = timeout(stall, wr.write_all(bytes)) => matches!(r, Ok(Ok(()))),
        () = grace_after_stop => false,
    };
    bytes.as_mut_slice().zeroize();
    bytes.clear();
    written
}

/// Forwards engine events to a subscriber; tells it when it lagged behind. Each event
/// is numbered in this subscription (1, 2, …): the daemon's own numbers count every
/// event of every key, so their gaps told a subscriber how much happened on keys it may
/// not see.
async fn forward_events(
    mut events: broadcast::Receiver<crate::engine::Published>,
    tx: Outbox,
    service: Arc<Service>,
    caller: Arc<Caller>,
) {
    let mut next_seq = 1u64;
    loop {
        let frame = match events.recv().await {
            Ok(published) => match service.shown_to(&caller, published) {
                Some(mut event) => {
                    event.seq = next_seq;
                    next_seq += 1;
                    ServerFrame::Event(event)
                }
                None => continue,
            },
            // How many of the dropped events this subscriber would have seen is not known,
            // and their number counts every key's: told only to one who sees them all.
            Err(broadcast::error::RecvError::Lagged(missed)) => ServerFrame::Lagged {
                missed: if service.sees_every_event(&caller) {
                    missed
                } else {
                    0
                },
            },
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Ok(bytes) = encode(&frame) else { continue };
        if tx.send(bytes).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A reply owed and dropped unsent (the code computing it panicked) answers `internal`
    /// by its id, and gives back what the request held; one sent answers as sent, once.
    #[tokio::test]
    async fn a_reply_dropped_unsent_answers_internal() {
        let (tx, mut rx) = mpsc::channel(4);
        let buffered = Buffered::unlimited();
        let outbox = Outbox {
            tx,
            buffered: buffered.clone(),
        };
        let owe = |id| ReplyOwed {
            id,
            owed: Some((outbox.clone(), buffered.hold(100))),
        };
        let panicked = owe(7);
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _owed = panicked;
            panic!("a bug");
        }));
        assert!(unwound.is_err());
        owe(8).send(Ok(Response::Subscribed), Durable::done());
        let mut replies = Vec::new();
        for _ in 0..2 {
            let frame = timeout(std::time::Duration::from_secs(10), rx.recv())
                .await
                .unwrap()
                .unwrap();
            let body = &frame.bytes[4..];
            match codec::decode::<ServerFrame>(body).unwrap() {
                ServerFrame::Reply { id, result } => replies.push((id, result)),
                other => panic!("{other:?}"),
            }
        }
        replies.sort_by_key(|r| r.0);
        assert!(matches!(&replies[0], (7, Outcome::Err(e)) if e.kind == ErrorKind::Internal));
        assert!(matches!(
            &replies[1],
            (8, Outcome::Ok(Response::Subscribed))
        ));
        assert!(rx.try_recv().is_err(), "answered twice");
    }

    /// A frame the writer has taken counts no longer, and is wiped, at once — not when
    /// the next frame comes (the reader may be waiting on the count to go down).
    #[tokio::test]
    async fn a_written_frame_stops_counting_at_once() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (_rd, wr) = ours.into_split();
        let (tx, rx) = mpsc::channel::<Queued>(8);
        let buffered = Buffered::unlimited();
        let tx = Outbox {
            tx,
            buffered: buffered.clone(),
        };
        let running = crate::shutdown::ShutdownTrigger::new();
        let writer = tokio::spawn(write_loop(
            wr,
            rx,
            Duration::from_secs(10),
            running.handle(),
        ));
        tx.send(vec![7u8; 100]).await.unwrap();
        let mut got = [0u8; 100];
        theirs.read_exact(&mut got).await.unwrap();
        let uncounted = async {
            while buffered.held() != 0 {
                tokio::task::yield_now().await;
            }
        };
        timeout(std::time::Duration::from_secs(10), uncounted)
            .await
            .expect("the written frame is still counted");
        drop(tx);
        writer.await.unwrap();
    }

    /// Frames of every size relative to the coalescing buffer — small ones that share a
    /// write, one that fills the rest exactly, one that does not fit beside queued ones,
    /// ones larger than the buffer — reach the peer whole and in order.
    #[tokio::test]
    async fn write_loop_keeps_frames_whole_and_in_order() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (_rd, wr) = ours.into_split();
        let (tx, rx) = mpsc::channel::<Queued>(64);
        let buffered = Buffered::unlimited();
        let tx = Outbox {
            tx,
            buffered: buffered.clone(),
        };
        let sizes = [
            10,
            WRITE_BUFFER - 10,
            1,
            WRITE_BUFFER / 2,
            WRITE_BUFFER / 2 + 1,
            3 * WRITE_BUFFER + 7,
            5,
            WRITE_BUFFER,
            2,
        ];
        let frames: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        let expected: Vec<u8> = frames.concat();
        for f in frames {
            tx.send(f).await.unwrap();
        }
        drop(tx);
        let running = crate::shutdown::ShutdownTrigger::new();
        let writer = tokio::spawn(write_loop(
            wr,
            rx,
            Duration::from_secs(10),
            running.handle(),
        ));
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes differ");
        assert_eq!(buffered.held(), 0, "all counted out");
    }
}
