//! The async Rust client: one typed method per request, many requests in flight on one
//! connection (each call waits only for its own reply), and an event stream after
//! [`Client::subscribe`].
//!
//! The connection is an `interprocess` local socket with a file-path name (never an
//! abstract socket: those have no permissions).

use crate::codec::{self, FrameError};
use crate::model::{GrantInfo, HistoryEntry, Impact, KeyInfo, SignScheme, VersionInfo};
use crate::paths;
use crate::protocol::{
    CiphertextItem, ClientFrame, CreateKey, DEFAULT_MAX_FRAME, DaemonStatus, ErrorKind, Event,
    GrantSpec, HistoryPage, HistoryQuery, HsmTokenInfo, ItemOutcome, Outcome, PROTOCOL_VERSION,
    PlaintextItem, Request, Response, Secret, ServerFrame, WireError, history_page_limit,
};
use interprocess::local_socket::tokio::{Stream, prelude::*};
use interprocess::local_socket::{GenericFilePath, ToFsName};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, mpsc, oneshot};
use zeroize::Zeroizing;

/// Why a call did not get a reply from the daemon, or got an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot connect to kmsd at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the daemon refused the request: {0}")]
    Server(#[from] WireError),
    /// The request does not fit in a frame: refused before anything was sent (the
    /// connection is unaffected). Its kind is `too-large`, as the daemon's own refusals
    /// of oversized inputs.
    #[error(
        "the request is {len} bytes, more than the {max} one frame may carry; nothing was \
         sent (AES-256 plaintexts are at most {aes} bytes, messages to sign {sign}: split \
         the data, or encrypt it under a data key)",
        aes = crate::model::MAX_AES_PLAINTEXT,
        sign = crate::model::MAX_SIGN_MESSAGE
    )]
    RequestTooLarge { len: u64, max: u32 },
    #[error("connection to kmsd lost: {0}")]
    Frame(#[from] FrameError),
    /// The connection ended. If the request had been sent, kmsd may have carried it out
    /// before it went away (as for [`ClientError::TimedOut`]). `reason` is what kmsd said
    /// as it closed the connection, if it said anything (a frame it refused unread: over
    /// its `max_frame`, or cut short).
    #[error(
        "connection to kmsd closed{}{}",
        match reason {
            Some(r) => format!(" by kmsd ({r})"),
            None => String::new(),
        },
        if *sent {
            " before it answered; the request was sent and may have been carried out"
        } else {
            "; the request was not sent"
        }
    )]
    Closed {
        sent: bool,
        reason: Option<WireError>,
    },
    /// No reply within the time set by [`Client::set_call_timeout`]. If the request was
    /// sent, the daemon may still carry it out (or have done so): a caller that must know
    /// looks (`get_key`, the history) before it repeats a change.
    #[error(
        "kmsd did not answer within {} s; {}",
        after.as_secs_f64(),
        if *sent {
            "the request was sent and may have been carried out"
        } else {
            "the request was not sent"
        }
    )]
    TimedOut { after: Duration, sent: bool },
    #[error("kmsd speaks protocol {daemon}, this client speaks {client}")]
    VersionMismatch { daemon: u32, client: u32 },
    #[error("unexpected reply from kmsd: {0}")]
    Unexpected(String),
    #[error("could not start kmsd: {0}")]
    Autostart(String),
    /// The daemon on the socket is not one this client may trust with its data: nothing
    /// was sent to it (see [`Distrust`]).
    #[error(
        "refusing the kmsd on {path}: it runs as uid {uid}, which is neither yours (uid {me}) \
         nor root's, and {reason}; nothing was sent to it"
    )]
    UntrustedDaemon {
        path: PathBuf,
        uid: u32,
        me: u32,
        reason: Distrust,
    },
    /// The kernel would not say who serves the socket: refused like an untrusted daemon.
    #[error("refusing the kmsd on {path}: cannot read its credentials: {source}")]
    PeerCredentials {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Nothing answers on the system service's socket, and no client starts a daemon
    /// there (see [`paths::NoAutostart::SystemSocket`]).
    #[error(
        "the system kmsd is not running: nothing answers on {path}. Start it with \
         `systemctl start kmsd.socket` (as root); clients never start a daemon of their \
         own on the system service's socket"
    )]
    SystemServiceDown { path: PathBuf },
    /// The data directory a started daemon would use belongs to another account (root's
    /// session while the system service, whose store is root's default data directory,
    /// is stopped): no daemon is started on it.
    #[error(
        "no kmsd answers on {socket}, and none is started: its data directory {data_dir} \
         belongs to uid {owner}, not to you (uid {me}). If that is the system service's \
         store, start the service (`systemctl start kmsd.socket`); otherwise set \
         XDG_DATA_HOME to a directory of your own"
    )]
    ForeignDataDir {
        socket: PathBuf,
        data_dir: PathBuf,
        owner: u32,
        me: u32,
    },
}

/// Why the directory holding a socket does not vouch for the daemon serving it. A daemon
/// that runs as neither the client's account nor root is trusted only when it owns that
/// directory and the directory's parent is root's and closed to others (as `/run/kms`,
/// which systemd creates for the system service's account, in `/run`): only root could
/// have given it that directory. A directory in `/tmp` proves nothing — any user can
/// create `/tmp/kms-1000` before its owner does, and serve a daemon there that would
/// receive the plaintexts meant for the real one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Distrust {
    #[error("the directory holding the socket, {dir}, belongs to uid {owner}, not to it")]
    ForeignDirectory { dir: PathBuf, owner: u32 },
    #[error("the directory holding the socket, {dir}, is a symbolic link")]
    LinkedDirectory { dir: PathBuf },
    #[error(
        "{parent}, the directory holding its socket directory {dir}, belongs to uid {owner}, \
         not root: any account able to write there could have made {dir}"
    )]
    ParentNotRoot {
        dir: PathBuf,
        parent: PathBuf,
        owner: u32,
    },
    #[error(
        "{parent}, the directory holding its socket directory {dir}, is writable by others \
         (mode {mode:o}): any user could have created {dir}"
    )]
    ParentWritable {
        dir: PathBuf,
        parent: PathBuf,
        mode: u32,
    },
    #[error("the socket has no directory to vouch for it")]
    NoDirectory,
    #[error("{dir} cannot be inspected: {source}")]
    Inspect {
        dir: PathBuf,
        source: std::io::Error,
    },
}

impl ClientError {
    /// The error kind, for errors the daemon answered; `None` for transport errors.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Server(e) => Some(e.kind),
            ClientError::RequestTooLarge { .. } => Some(ErrorKind::TooLarge),
            ClientError::VersionMismatch { .. } => Some(ErrorKind::UnsupportedVersion),
            _ => None,
        }
    }

    /// The daemon on the socket is not one this client trusts: someone else's got there
    /// first, and waiting (or starting another) cannot make it this client's.
    fn is_untrusted_daemon(&self) -> bool {
        matches!(
            self,
            ClientError::UntrustedDaemon { .. } | ClientError::PeerCredentials { .. }
        )
    }
}

/// A message that arrived on a subscription.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Notification {
    Event(Event),
    /// Events were dropped because this client read too slowly: this many, or, with 0,
    /// a number the daemon does not tell a subscriber that does not see every key.
    Lagged(u64),
}

/// Replies can be larger than requests (a full key list); still bounded.
const MAX_REPLY_FRAME: u32 = 256 * 1024 * 1024;

/// Calls waiting for their reply, by id.
type Pending = Arc<StdMutex<PendingCalls>>;

#[derive(Default)]
struct PendingCalls {
    calls: HashMap<u64, oneshot::Sender<Delivery>>,
    /// The connection has ended (set by the reader as it stops, with `calls` emptied):
    /// a call made after that fails at once. Without it such a call could wait for ever:
    /// its frame written (and failed) by another call's combined write, its own write had
    /// nothing left to write, and no reader was left to drop its sender.
    closed: bool,
    /// What the daemon said about the whole connection (a reply with id 0) before it
    /// closed it: given to every call the close ends.
    reason: Option<WireError>,
    /// Calls whose frames were in a write the socket took no byte of, as the connection
    /// ended: they went nowhere, and go again on a new connection.
    unsent: std::collections::HashSet<u64>,
}

/// The events sender [`Client::subscribe`] took, put back when it did not subscribe.
struct GiveBack<'a> {
    slot: &'a StdMutex<Option<mpsc::Sender<Notification>>>,
    held: Option<mpsc::Sender<Notification>>,
}

impl Drop for GiveBack<'_> {
    fn drop(&mut self) {
        if let Some(tx) = self.held.take() {
            *lock(self.slot) = Some(tx);
        }
    }
}

/// Why [`Connection::send_and_wait`] did not get a reply.
enum Refused {
    /// The connection had ended before the request was queued on it: the request, unsent,
    /// and what kmsd said as it closed the connection.
    Closed(Request, Option<WireError>),
    Failed(ClientError),
}

impl From<ClientError> for Refused {
    fn from(e: ClientError) -> Refused {
        Refused::Failed(e)
    }
}

impl Refused {
    fn into_error(self) -> ClientError {
        match self {
            Refused::Closed(_, reason) => ClientError::Closed {
                sent: false,
                reason,
            },
            Refused::Failed(e) => e,
        }
    }
}

/// What the reader hands a waiting call.
enum Delivery {
    Reply(Outcome),
    /// A reply this client cannot decode (a kind or value a newer kmsd added): only its
    /// own call fails, with the decoder's message.
    Undecodable(String),
}

/// A client of kmsd: one connection at a time, many calls in flight on it.
///
/// kmsd closes a connection that has sent nothing for its idle timeout (300 s by
/// default; not a subscribed one), and a restarted kmsd starts with no connections. A
/// call that finds its connection gone before sending anything connects again (the same
/// socket, the same checks of who serves it) and goes ahead, so a long-lived client
/// survives both; a call that was sent when the connection went fails with
/// [`ClientError::Closed`] `{ sent: true }`, since kmsd may have carried it out. Once
/// [`Client::subscribe`] has been called the client never connects again: the
/// subscription belongs to the connection, and its end is how the subscriber learns it
/// is over.
pub struct Client {
    path: PathBuf,
    conn: StdMutex<Arc<Connection>>,
    /// Held while a closed connection is replaced: one new connection at a time.
    reconnecting: Mutex<()>,
    /// The attempts to connect again that failed, and how the last one did: calls that
    /// waited while one failed fail with it rather than each trying for as long again (a
    /// daemon that does not answer its handshake takes [`HANDSHAKE_TIMEOUT`] to give up
    /// on).
    reconnect_failures: StdMutex<(u64, Option<(std::io::ErrorKind, String)>)>,
    /// Held by [`Client::subscribe`]: one at a time.
    subscribing: Mutex<()>,
    events: StdMutex<Option<mpsc::Receiver<Notification>>>,
    /// The sending end of `events` for the next connection's reader; taken by
    /// [`Client::subscribe`] (after which the client does not connect again).
    events_tx: StdMutex<Option<mpsc::Sender<Notification>>>,
    /// How long a call waits for its reply, in nanoseconds; 0: as long as the connection
    /// lasts.
    call_timeout_nanos: AtomicU64,
    /// The id of the next call, on whichever connection (0 is kmsd's, for what concerns
    /// a whole connection).
    ids: Arc<AtomicU64>,
}

/// One connection to kmsd, and the calls on it.
struct Connection {
    stream: Arc<Stream>,
    /// Held while frames are written, so frames of concurrent calls never interleave.
    write_lock: Arc<Mutex<()>>,
    /// Frames waiting for the socket. A call queues its frame, then whichever call next
    /// holds `write_lock` writes every frame queued by then in one write: calls made
    /// together (a pipelining client) cost one system call here and one read in the
    /// daemon, not one each. Wiped once written.
    queued: Arc<StdMutex<Vec<Queued>>>,
    pending: Pending,
    /// Tasks finishing writes cut short ([`flush`]).
    flushes: Flushes,
    /// The client's ids ([`Client::ids`]).
    ids: Arc<AtomicU64>,
    reader: tokio::task::JoinHandle<()>,
    daemon_version: String,
    /// The largest request frame the daemon reads (its hello's `max_frame`; the default
    /// from a daemon that does not say): a larger request is refused here, unsent, as
    /// [`ClientError::RequestTooLarge`], where kmsd would close the connection on it.
    max_frame: u32,
}

impl Drop for Connection {
    /// Stops the tasks finishing writes cut short ([`flush`]) too.
    fn drop(&mut self) {
        self.reader.abort();
        self.flushes.end();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("path", &self.path)
            .field("daemon_version", &self.daemon_version())
            .finish_non_exhaustive()
    }
}

/// How long [`Client::connect`] waits for the daemon's answer to its handshake.
/// Long enough for a socket-activated kmsd that is still starting (systemd holds the
/// connection in the socket's backlog meanwhile; its default start timeout is 90 s).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(90);

impl Client {
    /// Connects to the daemon at `path` and does the version handshake (within
    /// [`HANDSHAKE_TIMEOUT`]).
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let ids = Arc::new(AtomicU64::new(1));
        let conn = Connection::open(path, events_tx.clone(), ids.clone()).await?;
        Ok(Client {
            path: path.to_path_buf(),
            conn: StdMutex::new(Arc::new(conn)),
            reconnecting: Mutex::new(()),
            reconnect_failures: StdMutex::new((0, None)),
            subscribing: Mutex::new(()),
            events: StdMutex::new(Some(events)),
            events_tx: StdMutex::new(Some(events_tx)),
            call_timeout_nanos: AtomicU64::new(0),
            ids,
        })
    }

    /// The daemon's version as it announced it in the handshake of the current
    /// connection.
    pub fn daemon_version(&self) -> String {
        lock(&self.conn).daemon_version.clone()
    }

    /// The largest request frame the daemon reads (what it said in its hello, else the
    /// default): a request over it is refused here, unsent, as
    /// [`ClientError::RequestTooLarge`]. A client that splits its data into batches sizes
    /// them to it.
    pub fn max_request_frame(&self) -> u32 {
        lock(&self.conn).max_frame
    }

    /// The current connection has ended (the next call connects again, unless the client
    /// has subscribed).
    pub fn is_closed(&self) -> bool {
        lock(&lock(&self.conn).pending).closed
    }

    /// Bounds how long each later call waits for its reply (`None`, the default: as long
    /// as the connection lasts, since a backup or a large batch may take minutes). A call
    /// that runs out fails with [`ClientError::TimedOut`], which says whether its request
    /// had been sent; the connection stays usable, and a late reply is dropped. May be
    /// changed while calls are made from other tasks.
    pub fn set_call_timeout(&self, limit: Option<Duration>) {
        // 0 is "none"; a limit too long for u64 nanoseconds (584 years) is none as well.
        let nanos = limit.map_or(0, |l| u64::try_from(l.as_nanos()).unwrap_or(0).max(1));
        self.call_timeout_nanos.store(nanos, Ordering::Relaxed);
    }

    fn call_timeout(&self) -> Option<Duration> {
        match self.call_timeout_nanos.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }

    /// The connection to use: the current one, or a new one if it has ended and the
    /// client may connect again (see [`Client`]).
    async fn connection(&self) -> Result<Arc<Connection>, ClientError> {
        let conn = lock(&self.conn).clone();
        if !lock(&conn.pending).closed {
            return Ok(conn);
        }
        let failures_seen = lock(&self.reconnect_failures).0;
        let _one = self.reconnecting.lock().await;
        let conn = lock(&self.conn).clone();
        if !lock(&conn.pending).closed {
            // Another call connected meanwhile.
            return Ok(conn);
        }
        if let (failures, Some((kind, message))) = &*lock(&self.reconnect_failures)
            && *failures > failures_seen
        {
            // An attempt failed while this call waited for it: so does this call.
            return Err(ClientError::Connect {
                path: self.path.clone(),
                source: std::io::Error::new(*kind, message.clone()),
            });
        }
        let Some(events_tx) = lock(&self.events_tx).clone() else {
            // Subscribed: the subscription ended with its connection.
            let reason = lock(&conn.pending).reason.clone();
            return Err(ClientError::Closed {
                sent: false,
                reason,
            });
        };
        match Connection::open(&self.path, events_tx, self.ids.clone()).await {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                *lock(&self.conn) = fresh.clone();
                Ok(fresh)
            }
            Err(e) => {
                if let ClientError::Connect { source, .. } = &e {
                    let mut failures = lock(&self.reconnect_failures);
                    failures.0 += 1;
                    failures.1 = Some((source.kind(), source.to_string()));
                }
                Err(e)
            }
        }
    }

    /// Sends one request and waits for its reply (within the call timeout, if one is
    /// set). Other calls may be in flight meanwhile.
    pub async fn call(&self, request: Request) -> Result<Response, ClientError> {
        let sent = AtomicBool::new(false);
        let Some(limit) = self.call_timeout() else {
            return self.send_and_wait(request, &sent).await;
        };
        match tokio::time::timeout(limit, self.send_and_wait(request, &sent)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(ClientError::TimedOut {
                after: limit,
                sent: sent.load(Ordering::Relaxed),
            }),
        }
    }

    /// [`Client::call`] without a bound; `sent` is set once the request's frame has been
    /// taken by a write (from then on the daemon may receive it).
    async fn send_and_wait(
        &self,
        request: Request,
        sent: &AtomicBool,
    ) -> Result<Response, ClientError> {
        let mut request = request;
        // Once more if the connection turns out to have ended before the request was
        // queued on it (a close racing this call): it then went nowhere.
        for last in [false, true] {
            let conn = self.connection().await?;
            match conn.send_and_wait(request, sent).await {
                Ok(reply) => return Ok(reply),
                Err(Refused::Closed(unsent, reason)) if last => {
                    drop(unsent);
                    return Err(ClientError::Closed {
                        sent: false,
                        reason,
                    });
                }
                Err(Refused::Closed(unsent, _)) => request = unsent,
                Err(Refused::Failed(e)) => return Err(e),
            }
        }
        unreachable!("the loop returns on its last turn")
    }

    /// Subscribes to events; returns the stream of notifications (once per client). It
    /// ends when the connection does; the client then connects no more (see [`Client`]).
    /// A subscription that failed may be tried again.
    pub async fn subscribe(&self) -> Result<mpsc::Receiver<Notification>, ClientError> {
        let already = || ClientError::Unexpected("already subscribed".into());
        let _one_at_a_time = self.subscribing.lock().await;
        if lock(&self.events).is_none() {
            return Err(already());
        }
        // A live connection first; then no new one is made (and handed a sender of the
        // events) while the subscription is: the reader of the connection that answers
        // must hold the last sender, so that its end is the subscription's.
        self.connection().await?;
        let held = {
            let _one = self.reconnecting.lock().await;
            lock(&self.events_tx).take()
        };
        // Given back unless subscribed, also if this future is dropped (a timeout).
        let mut give_back = GiveBack {
            slot: &self.events_tx,
            held,
        };
        match self.call(Request::Subscribe).await? {
            Response::Subscribed => {
                give_back.held = None;
                lock(&self.events).take().ok_or_else(already)
            }
            other => Err(unexpected(&other)),
        }
    }

    pub async fn status(&self) -> Result<DaemonStatus, ClientError> {
        match self.call(Request::Status).await? {
            Response::Status(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn create_key(&self, spec: CreateKey) -> Result<KeyInfo, ClientError> {
        self.key_call(Request::CreateKey(spec)).await
    }

    /// One page of keys and the number of keys in all.
    pub async fn list_keys(
        &self,
        deleted: bool,
        offset: u32,
        limit: Option<u32>,
    ) -> Result<(Vec<KeyInfo>, u64), ClientError> {
        match self
            .call(Request::ListKeys {
                deleted,
                offset,
                limit,
            })
            .await?
        {
            Response::Keys { keys, total } => Ok((keys, total)),
            other => Err(unexpected(&other)),
        }
    }

    /// A key's metadata, by tag or name.
    pub async fn get_key(&self, key: &str) -> Result<KeyInfo, ClientError> {
        self.key_call(Request::GetKey { key: key.into() }).await
    }

    /// A key's versions, oldest first.
    pub async fn versions(&self, key: &str) -> Result<Vec<VersionInfo>, ClientError> {
        match self.call(Request::ListVersions { key: key.into() }).await? {
            Response::Versions { versions } => Ok(versions),
            other => Err(unexpected(&other)),
        }
    }

    /// Encrypts under the key's current version: an `ncpkms:v{N}:…` string. AES256 keys
    /// (at most 32 KiB, `context` bound to it as associated data; required by a convergent
    /// key) and RSA2048 keys (RSA-OAEP, at most 190 bytes, no context). Refusals:
    /// `not-found`, `invalid-state` (key not enabled), `wrong-purpose` (ECDSA),
    /// `too-large`, `version-disabled`, `version-limit`. Not a change: safe to repeat.
    pub async fn encrypt(
        &self,
        key: &str,
        plaintext: &[u8],
        context: Option<&[u8]>,
    ) -> Result<String, ClientError> {
        self.ciphertext_call(Request::Encrypt {
            key: key.into(),
            plaintext: plaintext.to_vec().into(),
            context: context.map(<[u8]>::to_vec),
        })
        .await
    }

    /// Decrypts a ciphertext of any version of the key this key still has, with the
    /// context it was encrypted under. A wrong key, context or a damaged ciphertext is
    /// `decrypt-failed` (which of them is not said). Not a change: safe to repeat.
    ///
    /// The plaintext, wiped from memory when the returned value is dropped.
    pub async fn decrypt(
        &self,
        key: &str,
        ciphertext: &str,
        context: Option<&[u8]>,
    ) -> Result<Secret, ClientError> {
        match self
            .call(Request::Decrypt {
                key: key.into(),
                ciphertext: ciphertext.into(),
                context: context.map(<[u8]>::to_vec),
            })
            .await?
        {
            Response::Plaintext { plaintext } => Ok(plaintext),
            other => Err(unexpected(&other)),
        }
    }

    /// Decrypts and encrypts again under the key's current version (after a rotation),
    /// the plaintext never leaving kmsd. Not a change to the key: safe to repeat.
    pub async fn reencrypt(
        &self,
        key: &str,
        ciphertext: &str,
        context: Option<&[u8]>,
    ) -> Result<String, ClientError> {
        self.ciphertext_call(Request::Reencrypt {
            key: key.into(),
            ciphertext: ciphertext.into(),
            context: context.map(<[u8]>::to_vec),
        })
        .await
    }

    /// Up to 1,024 items in one call, one history entry for all. Each item has its own
    /// outcome: `Ok` with one [`ItemOutcome`] per item, in order, where an item kmsd
    /// refused is [`ItemOutcome::Err`] — so a key that is disabled, of the wrong purpose
    /// or at its version limit answers `Ok` with every item failed, not `Err` (only an
    /// unknown key, too many items, a refused caller and a lost connection are `Err`).
    /// Encryptions come back as [`ItemOutcome::Ciphertext`].
    pub async fn encrypt_batch(
        &self,
        key: &str,
        items: Vec<PlaintextItem>,
    ) -> Result<Vec<ItemOutcome>, ClientError> {
        self.batch_call(Request::EncryptBatch {
            key: key.into(),
            items,
        })
        .await
    }

    /// [`Client::encrypt_batch`]'s rules; decryptions come back as
    /// [`ItemOutcome::Plaintext`], wiped when dropped.
    pub async fn decrypt_batch(
        &self,
        key: &str,
        items: Vec<CiphertextItem>,
    ) -> Result<Vec<ItemOutcome>, ClientError> {
        self.batch_call(Request::DecryptBatch {
            key: key.into(),
            items,
        })
        .await
    }

    /// [`Client::encrypt_batch`]'s rules; each item comes back as
    /// [`ItemOutcome::Ciphertext`] under the current version.
    pub async fn reencrypt_batch(
        &self,
        key: &str,
        items: Vec<CiphertextItem>,
    ) -> Result<Vec<ItemOutcome>, ClientError> {
        self.batch_call(Request::ReencryptBatch {
            key: key.into(),
            items,
        })
        .await
    }

    /// Signs `message` with the key's current version. kmsd hashes the message with
    /// SHA-256 and signs the hash, so `message` is the message itself (at most 8 KiB), not
    /// a digest: to sign a file, pass its SHA-256 digest as the message, and a verifier
    /// then checks the signature over those 32 bytes (`openssl dgst -sha256 -verify … digest`;
    /// p256's `verify`, not `verify_prehash`). ECDSA signatures are ASN.1 DER; RSA keys use
    /// `scheme` (PSS by default, or PKCS#1 v1.5), which ECDSA keys ignore. Not a change:
    /// safe to repeat.
    pub async fn sign(
        &self,
        key: &str,
        message: &[u8],
        scheme: SignScheme,
    ) -> Result<String, ClientError> {
        match self
            .call(Request::Sign {
                key: key.into(),
                message: message.to_vec(),
                scheme,
            })
            .await?
        {
            Response::Signature { signature } => Ok(signature),
            other => Err(unexpected(&other)),
        }
    }

    /// Whether `signature` is a valid signature of `message` (as [`Client::sign`] made it)
    /// by the version it names. A wrong signature, scheme or version is `Ok(false)`, not
    /// an error.
    pub async fn verify(
        &self,
        key: &str,
        message: &[u8],
        signature: &str,
        scheme: SignScheme,
    ) -> Result<bool, ClientError> {
        match self
            .call(Request::Verify {
                key: key.into(),
                message: message.to_vec(),
                signature: signature.into(),
                scheme,
            })
            .await?
        {
            Response::Verified { valid } => Ok(valid),
            other => Err(unexpected(&other)),
        }
    }

    /// The PEM public key of a version (default: current) and that version's number.
    pub async fn public_key(
        &self,
        key: &str,
        version: Option<u32>,
    ) -> Result<(u32, String), ClientError> {
        match self
            .call(Request::PublicKey {
                key: key.into(),
                version,
            })
            .await?
        {
            Response::PublicKey { version, pem } => Ok((version, pem)),
            other => Err(unexpected(&other)),
        }
    }

    /// A fresh data key wrapped under the key's current version, and in plaintext if asked
    /// (wiped from memory when dropped).
    pub async fn data_key(
        &self,
        key: &str,
        bits: u32,
        plaintext: bool,
        context: Option<&[u8]>,
    ) -> Result<(String, Option<Secret>), ClientError> {
        match self
            .call(Request::DataKey {
                key: key.into(),
                bits,
                plaintext,
                context: context.map(<[u8]>::to_vec),
            })
            .await?
        {
            Response::DataKey {
                ciphertext,
                plaintext,
                ..
            } => Ok((ciphertext, plaintext)),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn rotate(&self, key: &str) -> Result<KeyInfo, ClientError> {
        self.key_call(Request::Rotate { key: key.into() }).await
    }

    pub async fn enable(&self, key: &str) -> Result<KeyInfo, ClientError> {
        self.key_call(Request::Enable { key: key.into() }).await
    }

    pub async fn disable(&self, key: &str) -> Result<KeyInfo, ClientError> {
        self.key_call(Request::Disable { key: key.into() }).await
    }

    pub async fn enable_version(
        &self,
        key: &str,
        version: u32,
    ) -> Result<Vec<VersionInfo>, ClientError> {
        self.versions_call(Request::EnableVersion {
            key: key.into(),
            version,
        })
        .await
    }

    pub async fn disable_version(
        &self,
        key: &str,
        version: u32,
    ) -> Result<Vec<VersionInfo>, ClientError> {
        self.versions_call(Request::DisableVersion {
            key: key.into(),
            version,
        })
        .await
    }

    pub async fn set_rotation(
        &self,
        key: &str,
        auto_rotation: bool,
        rotation_days: Option<u32>,
    ) -> Result<KeyInfo, ClientError> {
        self.key_call(Request::SetRotation {
            key: key.into(),
            auto_rotation,
            rotation_days,
        })
        .await
    }

    pub async fn set_memo(&self, key: &str, memo: &str) -> Result<KeyInfo, ClientError> {
        self.key_call(Request::SetMemo {
            key: key.into(),
            memo: memo.into(),
        })
        .await
    }

    pub async fn request_deletion(&self, key: &str) -> Result<KeyInfo, ClientError> {
        self.key_call(Request::RequestDeletion { key: key.into() })
            .await
    }

    pub async fn cancel_deletion(&self, key: &str) -> Result<KeyInfo, ClientError> {
        self.key_call(Request::CancelDeletion { key: key.into() })
            .await
    }

    pub async fn delete_now(&self, key: &str) -> Result<KeyInfo, ClientError> {
        self.key_call(Request::DeleteNow { key: key.into() }).await
    }

    /// One page of history as the daemon answers it: it reads a bounded number of
    /// entries per request, so a page may be short (even empty) with
    /// `resume_before_seq` saying where to go on.
    pub async fn history_page(&self, query: HistoryQuery) -> Result<HistoryPage, ClientError> {
        match self.call(Request::History(query)).await? {
            Response::History {
                entries,
                resume_before_seq,
            } => Ok(HistoryPage {
                entries,
                resume_before_seq,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Up to `limit` entries (100 unless set, at most 1,000) matching the query, newest
    /// first: the pages the daemon stopped short at its scan bound are followed, so this
    /// returns fewer only when no older entry matches.
    pub async fn history(&self, mut query: HistoryQuery) -> Result<Vec<HistoryEntry>, ClientError> {
        let mut entries: Vec<HistoryEntry> = Vec::new();
        let asked = query.limit;
        loop {
            let page = self.history_page(query.clone()).await?;
            entries.extend(page.entries);
            let Some(resume) = page.resume_before_seq else {
                return Ok(entries);
            };
            // Each resume point must be older than the last: a daemon that answered
            // otherwise would keep this loop going for ever.
            if query.before_seq.is_some_and(|before| resume >= before) {
                return Err(ClientError::Unexpected(format!(
                    "history resumed at {resume}, not before {}",
                    query.before_seq.unwrap_or_default()
                )));
            }
            let want = history_page_limit(asked);
            if entries.len() >= want {
                return Ok(entries);
            }
            query.limit = u32::try_from(want - entries.len()).ok();
            query.before_seq = Some(resume);
        }
    }

    pub async fn impact(&self, key: &str, window_ms: Option<i64>) -> Result<Impact, ClientError> {
        match self
            .call(Request::Impact {
                key: key.into(),
                window_ms,
            })
            .await?
        {
            Response::Impact(i) => Ok(i),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn grant(&self, spec: GrantSpec) -> Result<GrantInfo, ClientError> {
        match self.call(Request::Grant(spec)).await? {
            Response::Grant(g) => Ok(g),
            other => Err(unexpected(&other)),
        }
    }

    /// Removes the grant with the same role, principal and key; returns it.
    pub async fn revoke(&self, spec: GrantSpec) -> Result<GrantInfo, ClientError> {
        match self.call(Request::Revoke(spec)).await? {
            Response::Grant(g) => Ok(g),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn grants(&self) -> Result<Vec<GrantInfo>, ClientError> {
        match self.call(Request::ListGrants).await? {
            Response::Grants { grants } => Ok(grants),
            other => Err(unexpected(&other)),
        }
    }

    /// Registers a PKCS#11 token for `dedicated-hsm` keys (managers only).
    pub async fn hsm_add(
        &self,
        name: &str,
        module: &str,
        token: &str,
        pin_file: &str,
    ) -> Result<HsmTokenInfo, ClientError> {
        let req = Request::HsmAdd {
            name: name.into(),
            module: module.into(),
            token: token.into(),
            pin_file: pin_file.into(),
        };
        match self.call(req).await? {
            Response::HsmToken(t) => Ok(t),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn hsm_list(&self) -> Result<Vec<HsmTokenInfo>, ClientError> {
        match self.call(Request::HsmList).await? {
            Response::HsmTokens { tokens } => Ok(tokens),
            other => Err(unexpected(&other)),
        }
    }

    /// Forgets a registered token; refused while it holds keys not yet purged.
    pub async fn hsm_remove(&self, name: &str) -> Result<HsmTokenInfo, ClientError> {
        match self.call(Request::HsmRemove { name: name.into() }).await? {
            Response::HsmToken(t) => Ok(t),
            other => Err(unexpected(&other)),
        }
    }

    async fn key_call(&self, req: Request) -> Result<KeyInfo, ClientError> {
        match self.call(req).await? {
            Response::Key(k) => Ok(k),
            other => Err(unexpected(&other)),
        }
    }

    async fn versions_call(&self, req: Request) -> Result<Vec<VersionInfo>, ClientError> {
        match self.call(req).await? {
            Response::Versions { versions } => Ok(versions),
            other => Err(unexpected(&other)),
        }
    }

    async fn ciphertext_call(&self, req: Request) -> Result<String, ClientError> {
        match self.call(req).await? {
            Response::Ciphertext { ciphertext } => Ok(ciphertext),
            other => Err(unexpected(&other)),
        }
    }

    async fn batch_call(&self, req: Request) -> Result<Vec<ItemOutcome>, ClientError> {
        match self.call(req).await? {
            Response::Batch { items } => Ok(items),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(resp: &Response) -> ClientError {
    ClientError::Unexpected(format!("reply of kind {}", resp.kind()))
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned map only means another task panicked mid-insert; the map is still valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bytes read from the socket at a time by [`read_loop`].
const READ_BUFFER: usize = 16 * 1024;

/// What writing to a connection needs, owned: a write cut short finishes in a task of its
/// own ([`Unwritten`]).
#[derive(Clone)]
struct WriteSide {
    stream: Arc<Stream>,
    queued: Arc<StdMutex<Vec<Queued>>>,
    write_lock: Arc<Mutex<()>>,
    pending: Pending,
    flushes: Flushes,
}

/// The [`flush`] tasks of a connection, ended with it.
#[derive(Clone, Default)]
struct Flushes(Arc<StdMutex<FlushTasks>>);

#[derive(Default)]
struct FlushTasks {
    /// The connection is gone: no task is started any more.
    ended: bool,
    running: Vec<tokio::task::AbortHandle>,
}

impl Flushes {
    /// Starts `task` unless the connection has ended.
    fn start(
        &self,
        runtime: &tokio::runtime::Handle,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let mut tasks = lock(&self.0);
        if tasks.ended {
            return;
        }
        tasks.running.retain(|t| !t.is_finished());
        tasks.running.push(runtime.spawn(task).abort_handle());
    }

    /// Stops them: a request its caller gave up on is not finished, and carried out,
    /// after the client that made it is gone.
    fn end(&self) {
        let running = {
            let mut tasks = lock(&self.0);
            tasks.ended = true;
            std::mem::take(&mut tasks.running)
        };
        for task in running {
            task.abort();
        }
    }
}

/// Writes queued frames in one write, wiping every copy.
///
/// If the calling future is dropped part way (a caller's timeout while the daemon is not
/// reading), the bytes not yet written — the rest of a frame cut short, and frames of
/// other calls taken along — are put back at the head of the queue, and a task writes
/// them (with whatever was queued behind) as soon as it holds `write_lock`: the daemon
/// never sees half a frame followed by another, no other call's frame is lost, and the
/// half frame does not wait for some later call to send it (kmsd would give up on it
/// after its frame timeout and close the connection, failing every call on it). Callers
/// hold `write_lock` around this, so nothing is queued ahead of them meanwhile.
async fn write_frames(side: WriteSide, frames: Vec<Queued>) -> Result<(), WriteFailed> {
    let bytes = match frames.len() {
        0 => return Ok(()),
        1 => frames
            .into_iter()
            .next()
            .map(|q| q.frame)
            .unwrap_or_default(),
        _ => {
            let mut all = Zeroizing::new(Vec::with_capacity(
                frames.iter().map(|q| q.frame.len()).sum(),
            ));
            for q in &frames {
                all.extend_from_slice(&q.frame);
            }
            all
        }
    };
    let stream = side.stream.clone();
    let mut unwritten = Unwritten {
        side,
        bytes,
        written: 0,
    };
    while unwritten.written < unwritten.bytes.len() {
        match (&*stream)
            .write(&unwritten.bytes[unwritten.written..])
            .await
        {
            Ok(0) => {
                let none_sent = unwritten.written == 0;
                unwritten.written = unwritten.bytes.len();
                return Err(WriteFailed {
                    error: std::io::ErrorKind::WriteZero.into(),
                    none_sent,
                });
            }
            Ok(n) => unwritten.written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The connection is gone; nothing is put back.
            Err(error) => {
                let none_sent = unwritten.written == 0;
                unwritten.written = unwritten.bytes.len();
                return Err(WriteFailed { error, none_sent });
            }
        }
    }
    Ok(())
}

/// A write that failed.
struct WriteFailed {
    error: std::io::Error,
    /// The socket took no byte of the write: none of its frames can have reached kmsd.
    none_sent: bool,
}

/// Takes the queued frames and writes them, holding `write_lock` (the caller's guard):
/// unless the connection has ended meanwhile, when nothing is written on it. On failure
/// the connection is closed, and the calls whose frames went nowhere are recorded as
/// unsent ([`PendingCalls::unsent`]). Returns the calls whose frames it took.
async fn write_queued(side: WriteSide) -> (Result<(), WriteFailed>, Vec<u64>) {
    let frames = std::mem::take(&mut *lock(&side.queued));
    let carried: Vec<u64> = frames.iter().map(|q| q.call).filter(|&c| c != 0).collect();
    let pending = side.pending.clone();
    let written = if frames.is_empty() {
        Ok(())
    } else if lock(&pending).closed {
        // Ended while this write waited for the socket (kmsd closed it, the reader
        // stopped): not written, since no reply could be read now.
        Err(WriteFailed {
            error: std::io::ErrorKind::NotConnected.into(),
            none_sent: true,
        })
    } else {
        write_frames(side, frames).await
    };
    if let Err(failed) = &written {
        let unsent = if failed.none_sent {
            carried.clone()
        } else {
            Vec::new()
        };
        close_pending(&pending, unsent);
    }
    (written, carried)
}

/// Bytes being written; what is left of them when dropped goes back to the queue's head,
/// and a task is started to write it.
struct Unwritten {
    side: WriteSide,
    bytes: Zeroizing<Vec<u8>>,
    written: usize,
}

impl Drop for Unwritten {
    fn drop(&mut self) {
        let Some(rest) = self.bytes.get(self.written..).filter(|r| !r.is_empty()) else {
            return;
        };
        // Part of a frame, or frames of several calls: no longer any one call's.
        lock(&self.side.queued).insert(
            0,
            Queued {
                call: 0,
                frame: Zeroizing::new(rest.to_vec()),
            },
        );
        // Outside a runtime (the client dropped after its runtime) there is nothing to
        // write with; the connection goes with it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.side.flushes.start(&runtime, flush(self.side.clone()));
        }
    }
}

/// Writes whatever is queued, once it holds the write lock: the rest of a write cut short
/// ([`Unwritten`]). A failed write ends the connection, as a call's would.
async fn flush(side: WriteSide) {
    let _guard = side.write_lock.clone().lock_owned().await;
    // A failure closed the connection: the calls it carried learn it from there.
    let _ = write_queued(side).await;
}

impl Connection {
    fn write_side(&self) -> WriteSide {
        WriteSide {
            stream: self.stream.clone(),
            queued: self.queued.clone(),
            write_lock: self.write_lock.clone(),
            pending: self.pending.clone(),
            flushes: self.flushes.clone(),
        }
    }

    /// Connects to `path`, checks who serves it, and does the handshake.
    async fn open(
        path: &Path,
        events: mpsc::Sender<Notification>,
        ids: Arc<AtomicU64>,
    ) -> Result<Connection, ClientError> {
        let connect_err = |source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let name = path
            .as_os_str()
            .to_fs_name::<GenericFilePath>()
            .map_err(connect_err)?;
        let stream = Stream::connect(name).await.map_err(connect_err)?;
        // Before a single byte is sent: the first request could be an encryption.
        check_daemon(path, &stream)?;
        let stream = Arc::new(stream);
        let pending: Pending = Arc::default();
        let reader = tokio::spawn(read_loop(stream.clone(), pending.clone(), events));
        let mut conn = Connection {
            stream,
            write_lock: Arc::default(),
            queued: Arc::default(),
            pending,
            flushes: Flushes::default(),
            ids,
            reader,
            daemon_version: String::new(),
            max_frame: DEFAULT_MAX_FRAME,
        };
        let sent = AtomicBool::new(false);
        let hello = async {
            let hello = Request::Hello {
                protocol: PROTOCOL_VERSION,
                client: format!("kms-shared/{}", env!("CARGO_PKG_VERSION")),
            };
            conn.send_and_wait(hello, &sent)
                .await
                .map_err(Refused::into_error)
        };
        // A daemon that accepts and never answers (stopped with SIGSTOP, wedged) or one at
        // its connection limit, whose new connections wait in the listen backlog, would
        // otherwise keep every client waiting for ever.
        let Ok(hello) = tokio::time::timeout(HANDSHAKE_TIMEOUT, hello).await else {
            return Err(connect_err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "kmsd accepted the connection but did not answer within {} s (it may be \
                     still starting and checking its store, at its connection limit, stopped \
                     or wedged)",
                    HANDSHAKE_TIMEOUT.as_secs()
                ),
            )));
        };
        match hello {
            Ok(Response::Hello {
                protocol,
                daemon_version,
                max_frame,
            }) => {
                if protocol != PROTOCOL_VERSION {
                    return Err(ClientError::VersionMismatch {
                        daemon: protocol,
                        client: PROTOCOL_VERSION,
                    });
                }
                conn.daemon_version = daemon_version;
                conn.max_frame = max_frame.unwrap_or(DEFAULT_MAX_FRAME);
                Ok(conn)
            }
            Ok(other) => Err(unexpected(&other)),
            // Only the greeting had been sent, whatever call this connection was opened
            // for: that call's request went nowhere. (It said "the request was sent and
            // may have been carried out", sending users to look for a change never made.)
            Err(ClientError::Closed { reason, .. }) => Err(ClientError::Closed {
                sent: false,
                reason,
            }),
            Err(e) => Err(e),
        }
    }

    /// Sends one request and waits for its reply; `sent` is set once the request's frame
    /// has been taken by a write (from then on the daemon may receive it).
    async fn send_and_wait(
        &self,
        request: Request,
        sent: &AtomicBool,
    ) -> Result<Response, Refused> {
        let message = ClientFrame {
            id: self.ids.fetch_add(1, Ordering::Relaxed),
            request,
        };
        let id = message.id;
        // The frame may hold a plaintext: wiped once written.
        let frame =
            Zeroizing::new(
                codec::encode_frame(&message, self.max_frame).map_err(|e| match e {
                    FrameError::TooLarge { len, max } => ClientError::RequestTooLarge {
                        len: u64::from(len),
                        max,
                    },
                    other => ClientError::Frame(other),
                })?,
            );
        let (tx, rx) = oneshot::channel();
        let in_flight = {
            let mut pending = lock(&self.pending);
            if pending.closed {
                // Nothing of it went anywhere: the request may go on another connection.
                return Err(Refused::Closed(message.request, pending.reason.clone()));
            }
            pending.calls.insert(id, tx);
            pending.calls.len()
        };
        lock(&self.queued).push(Queued { call: id, frame });
        // Dropped before its frame is taken by a write (a caller's timeout while the
        // socket is busy), the call takes its frame back: a call given up is not sent.
        let mut unsent = Unsent {
            conn: self,
            id,
            taken: false,
            answered: false,
            sent,
        };
        if in_flight > 1 {
            // Other calls are in flight on this connection: let those ready to run queue
            // their frames first, so that one write takes them all. A lone call writes at
            // once.
            tokio::task::yield_now().await;
        }
        let (written, carried) = {
            let _guard = self.write_lock.lock().await;
            // Taken (by this write or an earlier one): from here it is sent, or failed.
            unsent.taken = true;
            sent.store(true, Ordering::Relaxed);
            // Empty if an earlier writer took this call's frame along.
            write_queued(self.write_side()).await
        };
        // A failed write closed the connection (a Unix socket's write fails when its peer
        // is gone): every call waiting on it ends now, and later calls fail at once.
        // A call whose frame went nowhere — kmsd had closed the connection before the
        // write, an idle one as the call began — goes again on a new connection, whoever
        // wrote it (before, it failed with a broken pipe, which said nothing of whether
        // it was sent). The request is kept until then for that; its plaintext, if any,
        // is wiped when it is dropped (a `Secret`).
        let went_nowhere = || lock(&self.pending).unsent.remove(&id);
        let nowhere = written.is_err() && went_nowhere();
        if let Err(failed) = written
            && carried.contains(&id)
            && !nowhere
        {
            return Err(ClientError::from(FrameError::Io(failed.error)).into());
        }
        // `None`: this call's frame went nowhere; `Some`: the connection ended first.
        let reply = if nowhere {
            Err(None)
        } else {
            rx.await.map_err(Some)
        };
        unsent.answered = true;
        let outcome = match reply {
            Ok(Delivery::Reply(Outcome::Ok(resp))) => Ok(resp),
            Ok(Delivery::Reply(Outcome::Err(e))) => Err(ClientError::Server(e)),
            Ok(Delivery::Undecodable(e)) => Err(ClientError::Unexpected(format!(
                "a reply this client cannot decode ({e}); kmsd may be newer than this \
                 client. The request was sent and may have been carried out"
            ))),
            Err(ended) => {
                let reason = lock(&self.pending).reason.clone();
                if ended.is_none() || went_nowhere() {
                    sent.store(false, Ordering::Relaxed);
                    return Err(Refused::Closed(message.request, reason));
                }
                Err(ClientError::Closed { sent: true, reason })
            }
        };
        Ok(outcome?)
    }
}

/// Events held for a subscriber that has not taken them yet. Beyond, they are dropped
/// and counted, and the subscriber is told as by the daemon ([`Notification::Lagged`]):
/// a subscriber that stops taking them (a dashboard whose terminal blocks) holds at most
/// this many, while replies go on reaching their calls.
const EVENT_QUEUE: usize = 1024;

/// Events the reader dropped for a full subscriber queue, not yet told.
#[derive(Default)]
struct Lag {
    dropped: u64,
    /// A number kmsd did not tell is among them (its `lagged 0`): the subscriber is
    /// told 0 too, "some, how many not known".
    unknown: bool,
    /// A [`tell_lag`] task waits for room to tell them.
    telling: bool,
}

impl Lag {
    fn add(&mut self, missed: u64) {
        self.dropped = self.dropped.saturating_add(missed);
        self.unknown |= missed == 0;
    }
}

/// Tells the subscriber how many events were dropped as soon as its queue has room:
/// not only before the next event (a burst followed by quiet, a connection that ends,
/// would otherwise never be told).
async fn tell_lag(events: mpsc::Sender<Notification>, lag: Arc<StdMutex<Lag>>) {
    // Err: the subscription was dropped; nobody is left to tell.
    if let Ok(room) = events.reserve().await {
        let mut l = lock(&lag);
        let told = if l.unknown { 0 } else { l.dropped };
        *l = Lag::default();
        room.send(Notification::Lagged(told));
    }
}

/// Reads frames until the connection ends, routing replies to their callers and
/// notifications to the subscription. Dropping the pending senders on exit wakes every
/// caller with `Closed`.
async fn read_loop(stream: Arc<Stream>, pending: Pending, events: mpsc::Sender<Notification>) {
    let lag = Arc::new(StdMutex::new(Lag::default()));
    let notify = |note: Notification| {
        let missed = match &note {
            Notification::Lagged(n) => *n,
            Notification::Event(_) => 1,
        };
        let mut l = lock(&lag);
        // While a count waits to be told, later events are dropped too: the subscriber
        // learns of the gap before it sees anything after it.
        if l.telling {
            return l.add(missed);
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = events.try_send(note) {
            l.add(missed);
            l.telling = true;
            tokio::spawn(tell_lag(events.clone(), lag.clone()));
        }
    };
    // Buffered: one read takes a reply and whatever else has arrived, instead of a read
    // for the length, one for the body and one that finds nothing.
    let mut recv = codec::WipingBufReader::with_capacity(READ_BUFFER, &*stream);
    loop {
        // The body may hold a plaintext or a data key; the decoded reply has its own copy
        // (a `Secret`), and this one is wiped.
        let body = match codec::read_frame(&mut recv, MAX_REPLY_FRAME).await {
            Ok(Some(body)) => Zeroizing::new(body),
            Ok(None) | Err(_) => break,
        };
        match codec::decode::<ServerFrame>(&body) {
            // About the whole connection: kmsd closes it next (a frame it refused unread).
            Ok(ServerFrame::Reply {
                id: 0,
                result: Outcome::Err(e),
            }) => lock(&pending).reason = Some(e),
            Ok(ServerFrame::Reply { id, result }) => deliver(&pending, id, Delivery::Reply(result)),
            Ok(ServerFrame::Event(e)) => notify(Notification::Event(e)),
            Ok(ServerFrame::Lagged { missed }) => notify(Notification::Lagged(missed)),
            // PROTOCOL.md §3: a frame of a newer kmsd that this client cannot read (a kind
            // or value added since) fails only the call it answers; an event is skipped
            // (one of a new kind is not: it decodes as `EventKind::Other`).
            // The frames around it are unaffected: each has its own length.
            Err(e) => {
                if let Ok(FrameHead::Reply { id }) = codec::decode::<FrameHead>(&body) {
                    deliver(&pending, id, Delivery::Undecodable(e.to_string()));
                }
            }
        }
    }
    close_pending(&pending, []);
}

/// Hands `id`'s call what the reader has for it (nothing if the call was given up).
fn deliver(pending: &Pending, id: u64, what: Delivery) {
    if let Some(tx) = lock(pending).calls.remove(&id) {
        let _ = tx.send(what);
    }
}

/// As much of a frame as the reader needs to route one it cannot decode whole.
#[derive(serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum FrameHead {
    Reply { id: u64 },
}

/// Ends every call waiting on the connection (each sees `Closed`) and makes later calls
/// fail at once; `unsent` are calls whose frames went nowhere.
fn close_pending(pending: &Pending, unsent: impl IntoIterator<Item = u64>) {
    let mut pending = lock(pending);
    pending.closed = true;
    pending.calls.clear();
    pending.unsent.extend(unsent);
}

/// A frame waiting for the socket, and the call it belongs to (0: the rest of a write cut
/// short, which belongs to no one call and is always sent).
struct Queued {
    call: u64,
    frame: Zeroizing<Vec<u8>>,
}

/// A call whose frame is queued and not yet taken by a write. Dropped so (the caller gave
/// up), it removes its frame and its pending entry: a call given up before it was sent is
/// never sent later, with some other call's write.
struct Unsent<'a> {
    conn: &'a Connection,
    id: u64,
    /// The frame has been taken by a write.
    taken: bool,
    /// The reader has delivered the reply (or the connection's end).
    answered: bool,
    /// Set if the frame turns out to have been taken along by another call's write.
    sent: &'a AtomicBool,
}

/// A call given up (its future dropped: a timeout) before its reply: its frame, if still
/// queued, is not sent, and its place among the pending calls is freed, so that a daemon
/// that never answers does not make a long-lived client accumulate them.
impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        if !self.taken {
            let mut queued = lock(&self.conn.queued);
            let before = queued.len();
            queued.retain(|q| q.call != self.id);
            if queued.len() == before {
                self.sent.store(true, Ordering::Relaxed);
            }
        }
        lock(&self.conn.pending).calls.remove(&self.id);
    }
}

/// Accepts the daemon on `stream`, just connected to `path`, only if this client may
/// trust it with its requests (the rule is [`Distrust`]'s). Every connection is checked,
/// whatever chose the path (`--socket`, `$KMS_SOCKET`, a default): the kernel's record of
/// who listens is the only thing a squatter cannot forge.
fn check_daemon(path: &Path, stream: &Stream) -> Result<(), ClientError> {
    let unknown = |source| ClientError::PeerCredentials {
        path: path.to_path_buf(),
        source,
    };
    // SO_PEERCRED: the credentials of the process that listened (systemd, for a socket
    // it passes to kmsd: root for the system service, the user for a user service).
    let creds = stream.peer_creds().map_err(unknown)?;
    let uid = creds
        .euid()
        .ok_or_else(|| unknown(std::io::Error::other("the system does not report it")))?;
    let me = rustix::process::getuid().as_raw();
    let effective = rustix::process::geteuid().as_raw();
    trust_daemon(path, uid, &[me, effective]).map_err(|reason| ClientError::UntrustedDaemon {
        path: path.to_path_buf(),
        uid,
        me,
        reason,
    })
}

/// Opens a directory only to inspect it: no read permission needed (a group member may
/// only search `/run/kms`), and never a directory of its own choosing behind a link.
#[cfg(any(target_os = "linux", target_os = "android"))]
const INSPECT_ONLY: rustix::fs::OFlags = rustix::fs::OFlags::PATH;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const INSPECT_ONLY: rustix::fs::OFlags = rustix::fs::OFlags::RDONLY;

/// Whether a daemon running as `peer`, serving `socket`, may be trusted by a client whose
/// own uids are `mine` (real and effective): see [`Distrust`].
fn trust_daemon(socket: &Path, peer: u32, mine: &[u32]) -> Result<(), Distrust> {
    use rustix::fs::{Mode, OFlags};
    use std::os::unix::fs::MetadataExt as _;
    if peer == 0 || mine.contains(&peer) {
        return Ok(());
    }
    let dir = std::path::absolute(socket)
        .ok()
        .and_then(|s| s.parent().map(Path::to_path_buf))
        .ok_or(Distrust::NoDirectory)?;
    let inspect = |dir: &Path, source: std::io::Error| Distrust::Inspect {
        dir: dir.to_path_buf(),
        source,
    };
    // The directory itself (O_NOFOLLOW), never where a link there leads: a link made in
    // /tmp may lead to any directory its maker owns in a root-owned parent (their home in
    // /home, their runtime directory in /run/user).
    let flags = INSPECT_ONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(&dir, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) => {
            if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(Distrust::LinkedDirectory { dir });
            }
            return Err(inspect(&dir, e.into()));
        }
    };
    // The parent the kernel knows (`..` of the directory opened), however the path was
    // spelled; opened before the directory's descriptor becomes a File below.
    let parent_fd = rustix::fs::openat(
        &fd,
        "..",
        INSPECT_ONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| inspect(&dir, e.into()))?;
    let owner = std::fs::File::from(fd)
        .metadata()
        .map_err(|e| inspect(&dir, e))?
        .uid();
    if owner != peer {
        return Err(Distrust::ForeignDirectory { dir, owner });
    }
    let parent = dir.parent().unwrap_or(&dir).to_path_buf();
    let meta = std::fs::File::from(parent_fd)
        .metadata()
        .map_err(|e| inspect(&parent, e))?;
    if meta.uid() != 0 {
        return Err(Distrust::ParentNotRoot {
            dir,
            parent,
            owner: meta.uid(),
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(Distrust::ParentWritable {
            dir,
            parent,
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// How a client finds (and, if allowed, starts) its daemon (SPEC §1).
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// An explicit socket; `None` means the default path (and allows autostart).
    pub socket: Option<PathBuf>,
    /// Start a user-mode kmsd when none answers on the default socket.
    pub autostart: bool,
    /// The data directory a kmsd started here serves; `None`: the account's default
    /// (SPEC §1). A client that was connected to a daemon serving another directory
    /// (the dashboard, reconnecting) names that one, so that the daemon it starts again
    /// serves the same store rather than the default one on the same socket. Must be
    /// absolute; the same checks apply (not another account's directory), and it must
    /// hold a store already: one that is gone (deleted, an unmounted volume) is not made
    /// afresh, empty, in its place.
    pub data_dir: Option<PathBuf>,
}

/// The user's own daemon on the default socket, started if none answers (as kmsctl does).
/// Other settings are made over it, so that a program keeps compiling when a setting is
/// added (a struct literal without `..ConnectOptions::default()` did not, when `data_dir`
/// was):
///
/// ```no_run
/// use kms_shared::client::{ConnectOptions, connect_or_start};
/// # async fn run() -> Result<(), kms_shared::client::ClientError> {
/// let kms = connect_or_start(&ConnectOptions::default()).await?;
/// let ciphertext = kms.encrypt("my-key", b"secret", None).await?; // "ncpkms:v1:..."
/// let plaintext = kms.decrypt("my-key", &ciphertext, None).await?; // a Secret
/// assert_eq!(&*plaintext, b"secret");
///
/// // The system service, never started from here.
/// let service = connect_or_start(&ConnectOptions {
///     socket: Some("/run/kms/kmsd.sock".into()),
///     autostart: false,
///     ..ConnectOptions::default()
/// })
/// .await?;
/// # drop(service);
/// # Ok(())
/// # }
/// ```
impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            socket: None,
            autostart: true,
            data_dir: None,
        }
    }
}

impl ConnectOptions {
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(paths::default_socket_path)
    }
}

/// Connects as the options say; with autostart, launches `kmsd` (the one next to this
/// executable, else on `PATH`) in the background when no daemon answers on the default
/// socket, and waits up to 10 s for it to accept. Never on the system service's socket
/// (that is the service's to serve), and never on another account's data directory.
pub async fn connect_or_start(opts: &ConnectOptions) -> Result<Client, ClientError> {
    let path = opts.socket_path();
    match Client::connect(&path).await {
        Ok(c) => return Ok(c),
        Err(e) if !(opts.autostart && opts.socket.is_none()) => return Err(e),
        Err(ClientError::Connect { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) => {}
        Err(e) => return Err(e),
    }
    let env = paths::Env::current();
    let system = Path::new(paths::SYSTEM_SOCKET);
    match paths::autostart_refused_in(&env, &path, system.exists()) {
        None => {}
        Some(paths::NoAutostart::SystemSocket) => {
            return Err(ClientError::SystemServiceDown { path });
        }
        Some(paths::NoAutostart::SystemServiceListens) => {
            return Err(ClientError::Autostart(format!(
                "no kmsd answers on {}, and none is started there because the system kmsd \
                 listens on {}: use --socket {} (or set KMS_SOCKET) to reach it, or set \
                 KMS_SOCKET to where a daemon of your own should listen",
                path.display(),
                system.display(),
                system.display()
            )));
        }
    }
    let data_dir = autostart_data_dir(&env, &path, opts.data_dir.as_deref())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // One client at a time starts a daemon for this data directory; one that waited
    // here finds the daemon the other started. Without it, two clients started at once
    // both spawned kmsd: the second lost the data directory's lock and exited at once,
    // before the first bound the socket, and its client reported a failed start (having
    // truncated the log the first daemon was writing).
    let _starting = lock_autostart(&data_dir, deadline).await?;
    match Client::connect(&path).await {
        Ok(c) => return Ok(c),
        Err(e) if e.is_untrusted_daemon() => return Err(e),
        Err(_) => {}
    }
    // A kmsd already holds the data directory (one a client started and gave up waiting
    // for, still checking a large store): another would only fail on its lock, after
    // truncating the log the first is writing. Wait for the first instead.
    if data_dir_in_use(&data_dir) {
        return wait_for_daemon(&path, &data_dir, deadline).await;
    }
    let mut started = spawn_daemon(&path, &data_dir)?;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let exited = started.child.try_wait().ok().flatten();
        match Client::connect(&path).await {
            Ok(c) => {
                started.reap();
                return Ok(c);
            }
            // Someone else's daemon got the socket first: waiting cannot make it ours.
            Err(e) if e.is_untrusted_daemon() => {
                started.reap();
                return Err(e);
            }
            // Ended without answering: say why now, not after the 10 s (another kmsd
            // that won a race would have answered above).
            Err(_) if exited.is_some() => {
                return Err(ClientError::Autostart(format!(
                    "kmsd exited ({}) before it answered{}",
                    exited.map_or_else(String::new, |s| s.to_string()),
                    started.log_tail()
                )));
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                let tail = started.log_tail();
                started.reap();
                return Err(ClientError::Autostart(format!(
                    "kmsd did not answer on {} within 10 s: {e}{tail}",
                    path.display()
                )));
            }
            Err(_) => {}
        }
    }
}

/// Takes the autostart lock of `data_dir` (`kmsd.autostart.lock`, created 0600 with the
/// directory if need be), waiting for another client that holds it until `deadline`.
async fn lock_autostart(
    data_dir: &Path,
    deadline: tokio::time::Instant,
) -> Result<std::fs::File, ClientError> {
    use rustix::fs::{FlockOperation, flock};
    let failed = |e: std::io::Error| {
        ClientError::Autostart(format!(
            "cannot lock {} to start kmsd: {e}",
            data_dir.display()
        ))
    };
    let (_, file) = open_in_data_dir(data_dir, "kmsd.autostart.lock", false).map_err(failed)?;
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(ClientError::Autostart(format!(
                    "another client is starting kmsd for {}, and it did not answer within 10 s",
                    data_dir.display()
                )));
            }
            Err(e) => return Err(failed(e.into())),
        }
    }
}

/// Whether a kmsd holds `data_dir`'s lock (`kmsd.lock`, taken exclusively by the daemon
/// that serves it).
fn data_dir_in_use(data_dir: &Path) -> bool {
    use rustix::fs::{FlockOperation, flock};
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(lock) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(data_dir.join("kmsd.lock"))
    else {
        return false;
    };
    flock(&lock, FlockOperation::NonBlockingLockShared) == Err(rustix::io::Errno::WOULDBLOCK)
}

/// Waits until `deadline` for the kmsd that holds `data_dir` to answer on `path`.
async fn wait_for_daemon(
    path: &Path,
    data_dir: &Path,
    deadline: tokio::time::Instant,
) -> Result<Client, ClientError> {
    loop {
        match Client::connect(path).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_untrusted_daemon() => return Err(e),
            Err(_) if tokio::time::Instant::now() >= deadline => {
                // The daemon writes the socket it serves into its lock file.
                let told = std::fs::read(data_dir.join("kmsd.lock"))
                    .ok()
                    .filter(|b| !b.is_empty() && b.len() <= 4096)
                    .map(|b| {
                        PathBuf::from(
                            <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(b),
                        )
                    })
                    .filter(|s| s != path);
                return Err(ClientError::Autostart(match told {
                    Some(socket) => format!(
                        "a kmsd holds {} (its kmsd.lock) and listens on {}, not on {}: use \
                         --socket {} (or set KMS_SOCKET) to reach it",
                        data_dir.display(),
                        socket.display(),
                        path.display(),
                        socket.display()
                    ),
                    None => format!(
                        "a kmsd holds {} (its kmsd.lock) but did not answer on {}: it may still \
                         be starting, or serve another socket",
                        data_dir.display(),
                        path.display()
                    ),
                }));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The data directory of the daemon about to be started for `socket`: what kmsd itself
/// would choose in the environment it is given (the client's, without
/// `$STATE_DIRECTORY`), made absolute here since kmsd runs from `/`. Refused when it
/// exists and belongs to another account: root's default is `/var/lib/kms`, the system
/// service's store, and a root daemon there would take it from the service (and leave
/// root's files in it).
fn autostart_data_dir(
    env: &paths::Env,
    socket: &Path,
    chosen: Option<&Path>,
) -> Result<PathBuf, ClientError> {
    use std::os::unix::fs::MetadataExt as _;
    let dir = match chosen {
        Some(dir) if !dir.join(paths::STORE_FILE).exists() => {
            return Err(ClientError::Autostart(format!(
                "the store the daemon on {} served, in {}, is not there any more; no daemon \
                 is started on a new, empty store in its place",
                socket.display(),
                dir.display()
            )));
        }
        Some(dir) => dir.to_path_buf(),
        None => paths::autostart_data_dir_in(env),
    };
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let me = rustix::process::geteuid().as_raw();
    match std::fs::metadata(&dir) {
        Ok(meta) if meta.uid() != me => Err(ClientError::ForeignDataDir {
            socket: socket.to_path_buf(),
            data_dir: dir,
            owner: meta.uid(),
            me,
        }),
        _ => Ok(dir),
    }
}

/// A kmsd started by [`connect_or_start`].
struct Started {
    child: std::process::Child,
    /// Where its output goes (it has no terminal), if that file could be opened.
    log: Option<PathBuf>,
}

impl Started {
    /// The last lines of its log, to quote in an error: why it did not start.
    fn log_tail(&self) -> String {
        const LINES: usize = 5;
        let Some(log) = &self.log else {
            return String::new();
        };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(LINES)..].join("\n  ");
        if tail.is_empty() {
            format!(" (its log, {}, is empty)", log.display())
        } else {
            format!("; its log ({}) ends:\n  {tail}", log.display())
        }
    }

    /// Reaps it in the background when it exits while this process runs.
    fn reap(self) {
        let mut child = self.child;
        std::thread::spawn(move || {
            let _ = child.wait();
        });
    }
}

/// The log of a kmsd a client started: `kmsd.log` in its data directory `dir`, begun
/// anew at each autostart (such a daemon has no terminal and no journal to write to).
fn open_autostart_log(dir: &Path) -> Option<(PathBuf, std::fs::File)> {
    open_in_data_dir(dir, "kmsd.log", true).ok()
}

/// Opens (creating it 0600, and `dir` 0700 if need be) the file `name` in the data
/// directory `dir`, for writing, emptied if `truncate`; never through a link.
fn open_in_data_dir(
    dir: &Path,
    name: &str,
    truncate: bool,
) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)?;
    Ok((path, file))
}

/// What systemd tells the process it starts, about that service. A client run by a
/// service passes it on to the kmsd it starts unless removed, and kmsd would take it for
/// its own: `STATE_DIRECTORY` as its data directory (the client service's state, see
/// [`paths::autostart_data_dir_in`]), `CREDENTIALS_DIRECTORY` as where its root key comes
/// from, `NOTIFY_SOCKET`/`WATCHDOG_*` to report to the client's service manager (as if
/// it were the client's main process), `LISTEN_*` to take a socket passed to the client.
const SERVICE_ENVIRONMENT: &[&str] = &[
    "STATE_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "CACHE_DIRECTORY",
    "LOGS_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// Starts kmsd for the default socket `socket`, on the data directory `data_dir`.
fn spawn_daemon(socket: &Path, data_dir: &Path) -> Result<Started, ClientError> {
    use std::os::unix::process::CommandExt;
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("kmsd")))
        .filter(|p| p.is_file());
    let program = beside.unwrap_or_else(|| PathBuf::from("kmsd"));
    let (log, stderr) = match open_autostart_log(data_dir) {
        Some((path, file)) => (Some(path), std::process::Stdio::from(file)),
        None => (None, std::process::Stdio::null()),
    };
    let mut cmd = std::process::Command::new(&program);
    for name in SERVICE_ENVIRONMENT {
        cmd.env_remove(name);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        // The directory the client resolved, where its log already is: the daemon does
        // not resolve it again from an environment it might read differently.
        .arg("--data-dir")
        .arg(data_dir)
        // Not holding the client's working directory (a mount it would keep busy); a
        // relative `$KMS_SOCKET` is passed on as the path it means here.
        .current_dir("/")
        .env(
            "KMS_SOCKET",
            std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf()),
        )
        // Not holding the client's other open files (a script's pipe would never end):
        // kmsd closes what it inherited above stderr (kmsd's systemd::CLOSE_INHERITED_FDS).
        .env("KMS_CLOSE_INHERITED_FDS", "1")
        // Its own process group, so a Ctrl-C in the client's terminal does not stop it.
        .process_group(0);
    let child = cmd.spawn().map_err(|e| {
        // Say where it looked: "kmsd: No such file or directory" alone does not.
        let looked = match std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            Some(dir) if program == Path::new("kmsd") => format!(
                " (looked for kmsd beside this program, in {}, then on PATH; install kmsd \
                 there or on PATH, or start it yourself)",
                dir.display()
            ),
            _ => String::new(),
        };
        ClientError::Autostart(format!("{}: {e}{looked}", program.display()))
    })?;
    Ok(Started { child, log })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A daemon started again on a chosen data directory (the dashboard's restart of the
    /// store it was connected to) needs that store to be there: a directory that is gone
    /// or empty gets no new store in its place; with it there, it is the one used.
    #[test]
    fn a_chosen_data_directory_must_hold_a_store() {
        let dir = Scratch::new("chosen");
        let env = paths::Env::current();
        let socket = dir.0.join("kmsd.sock");
        let chosen = dir.0.join("data");
        let refused = autostart_data_dir(&env, &socket, Some(&chosen)).unwrap_err();
        assert!(
            refused.to_string().contains("not there any more"),
            "{refused}"
        );
        std::fs::create_dir(&chosen).unwrap();
        assert!(autostart_data_dir(&env, &socket, Some(&chosen)).is_err());
        std::fs::write(chosen.join(paths::STORE_FILE), b"").unwrap();
        assert_eq!(
            autostart_data_dir(&env, &socket, Some(&chosen)).unwrap(),
            chosen
        );
    }

    /// A daemon that accepts and never answers the handshake (stopped, wedged, or at its
    /// connection limit) is reported after [`HANDSHAKE_TIMEOUT`], not waited for for ever.
    #[tokio::test(start_paused = true)]
    async fn a_daemon_that_never_answers_the_handshake_is_reported() {
        let dir = Scratch::new("handshake");
        let path = dir.0.join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let silent = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
            drop(stream);
        });
        match Client::connect(&path).await {
            Err(ClientError::Connect { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::TimedOut, "{source}");
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        silent.abort();
    }

    /// A daemon that answers the handshake, then reads nothing more: with a call timeout,
    /// a call whose frame went (in part) onto the socket says it was sent, one still
    /// waiting to be written says it was not, and neither stays among the pending calls.
    #[tokio::test(start_paused = true)]
    async fn a_call_timeout_says_whether_the_request_was_sent() {
        let dir = Scratch::new("call-timeout");
        let path = dir.0.join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let daemon = tokio::spawn(async move {
            let stream = accept_and_greet(&listener).await;
            std::future::pending::<()>().await;
            drop(stream);
        });
        let client = Client::connect(&path).await.unwrap();
        let conn = lock(&client.conn).clone();
        let limit = Duration::from_secs(5);
        client.set_call_timeout(Some(limit));
        // More than the socket's buffer holds: its write stalls part way, holding the
        // connection's write lock, so the next call's frame cannot be taken.
        let memo = "m".repeat(900 * 1024);
        let large = Request::SetMemo {
            key: "k01".into(),
            memo,
        };
        let taken = AtomicBool::new(false);
        let unsent = {
            let stalled = client.send_and_wait(large, &taken);
            tokio::pin!(stalled);
            tokio::select! {
                biased;
                _ = &mut stalled => panic!("a write the daemon never reads finished"),
                waited = client.get_key("k01") => waited,
            }
        };
        match unsent {
            Err(e @ ClientError::TimedOut { sent: false, .. }) => {
                assert!(e.to_string().contains("not sent"), "{e}");
            }
            other => panic!("expected a timeout before sending, got {other:?}"),
        }
        assert!(taken.load(Ordering::Relaxed));
        // The stalled call was given up; the rest of its frame goes first (here taken by
        // the next call's write, before the task that would write it runs), with the
        // next call's frame behind it, and stalls again.
        match client.get_key("k01").await {
            Err(ClientError::TimedOut { after, sent: true }) => assert_eq!(after, limit),
            other => panic!("expected a timeout after sending, got {other:?}"),
        }
        assert!(lock(&conn.pending).calls.is_empty());
        assert!(lock(&conn.queued).iter().all(|q| q.call == 0));
        daemon.abort();
    }

    /// A call given up part way through writing its frame leaves the rest to a task that
    /// writes it as soon as the daemon reads again, with no other call needed: the daemon
    /// gets the whole frame. The rest used to wait in the queue for the next call's write;
    /// with none, kmsd gave up on the half frame after its frame timeout and closed the
    /// connection, failing every call on it.
    #[tokio::test(start_paused = true)]
    async fn a_frame_cut_short_by_a_timeout_is_finished_without_another_call() {
        let dir = Scratch::new("cut-short");
        let path = dir.0.join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (go, reading) = tokio::sync::oneshot::channel::<()>();
        let daemon = tokio::spawn(async move {
            let mut stream = accept_and_greet(&listener).await;
            reading.await.unwrap();
            let body = tokio::time::timeout(
                Duration::from_secs(60),
                codec::read_frame(&mut stream, 2 << 20),
            )
            .await
            .expect("the rest of the frame never came")
            .unwrap()
            .unwrap();
            codec::decode::<crate::protocol::ClientFrame>(&body).unwrap()
        });
        let client = Client::connect(&path).await.unwrap();
        client.set_call_timeout(Some(Duration::from_secs(5)));
        let memo = "m".repeat(900 * 1024);
        let large = Request::SetMemo {
            key: "k01".into(),
            memo: memo.clone(),
        };
        match client.call(large).await {
            Err(ClientError::TimedOut { sent: true, .. }) => {}
            other => panic!("expected a timeout after sending, got {other:?}"),
        }
        go.send(()).unwrap();
        let frame = daemon.await.unwrap();
        assert_eq!(
            frame.request,
            Request::SetMemo {
                key: "k01".into(),
                memo
            }
        );
    }

    /// Accepts one client on `listener` and answers its handshake.
    async fn accept_and_greet(listener: &tokio::net::UnixListener) -> tokio::net::UnixStream {
        use crate::protocol::{ClientFrame, Outcome, ServerFrame};
        use tokio::io::AsyncWriteExt;
        let (mut stream, _) = listener.accept().await.unwrap();
        let body = codec::read_frame(&mut stream, 1 << 20)
            .await
            .unwrap()
            .unwrap();
        let hello: ClientFrame = codec::decode(&body).unwrap();
        let reply = ServerFrame::Reply {
            id: hello.id,
            result: Outcome::Ok(Response::Hello {
                protocol: PROTOCOL_VERSION,
                daemon_version: "0".into(),
                max_frame: None,
            }),
        };
        stream
            .write_all(&codec::encode_frame(&reply, u32::MAX).unwrap())
            .await
            .unwrap();
        stream
    }

    /// A daemon that goes away after reading a request: that call is told its request
    /// was sent (it may have been carried out); a later call connects again, and with
    /// nothing listening is told so (its request was not sent).
    #[tokio::test]
    async fn a_lost_connection_says_whether_the_request_was_sent() {
        let dir = Scratch::new("closed");
        let path = dir.0.join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let daemon = tokio::spawn(async move {
            let mut stream = accept_and_greet(&listener).await;
            codec::read_frame(&mut stream, 1 << 20)
                .await
                .unwrap()
                .unwrap();
        });
        let client = Client::connect(&path).await.unwrap();
        match client.rotate("k01").await {
            Err(e @ ClientError::Closed { sent: true, .. }) => {
                assert!(e.to_string().contains("may have been carried out"), "{e}");
            }
            other => panic!("expected a lost connection after sending, got {other:?}"),
        }
        daemon.await.unwrap();
        assert!(client.is_closed());
        match client.rotate("k01").await {
            Err(ClientError::Connect { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
            }
            other => panic!("expected no daemon to connect to, got {other:?}"),
        }
    }

    /// A connection closed during its greeting took no request along: neither the
    /// `connect` nor a call that opened a new connection says its request may have been
    /// carried out (both did: only the greeting had been sent).
    #[tokio::test]
    async fn a_connection_closed_in_its_greeting_sent_no_request() {
        let dir = Scratch::new("greeting");
        let path = dir.0.join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        // Reads the greeting and closes.
        async fn hang_up(listener: &tokio::net::UnixListener) {
            let (mut stream, _) = listener.accept().await.unwrap();
            codec::read_frame(&mut stream, 1 << 20)
                .await
                .unwrap()
                .unwrap();
        }
        let daemon = tokio::spawn(async move {
            hang_up(&listener).await;
            // Then one connection served and closed, and one hung up again.
            drop(accept_and_greet(&listener).await);
            hang_up(&listener).await;
        });
        match Client::connect(&path).await {
            Err(e @ ClientError::Closed { sent: false, .. }) => {
                assert!(e.to_string().contains("not sent"), "{e}");
            }
            other => panic!("expected a connection closed unsent, got {other:?}"),
        }
        let client = Client::connect(&path).await.unwrap();
        while !client.is_closed() {
            tokio::task::yield_now().await;
        }
        match client.rotate("k01").await {
            Err(e @ ClientError::Closed { sent: false, .. }) => {
                assert!(e.to_string().contains("not sent"), "{e}");
            }
            other => panic!("expected the rotation unsent, got {other:?}"),
        }
        daemon.await.unwrap();
    }

    /// A call whose write finds the connection already closed by kmsd (an idle close
    /// racing the call, before the client's reader has seen it) goes ahead on a new
    /// connection: nothing of it was sent. It failed with a broken pipe, which says
    /// nothing of whether the request was sent (found by a helper writing a service with
    /// the library: 2 calls in 120 made about as kmsd closed idle connections failed).
    /// kmsd's side here stops reading at once, so the client's reader sees no end.
    #[tokio::test]
    async fn a_call_that_finds_its_connection_closed_goes_ahead_on_a_new_one() {
        use crate::protocol::{Outcome, ServerFrame};
        let dir = Scratch::new("epipe");
        let path = dir.0.join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (shut, shut_rx) = tokio::sync::oneshot::channel();
        let daemon = tokio::spawn(async move {
            let first = accept_and_greet(&listener).await.into_std().unwrap();
            first.shutdown(std::net::Shutdown::Read).unwrap();
            shut.send(()).unwrap();
            let mut stream = accept_and_greet(&listener).await;
            let id = next_id(&mut stream).await;
            let result = Outcome::Ok(Response::Verified { valid: true });
            send_raw(&mut stream, &ServerFrame::Reply { id, result }).await;
            (first, stream)
        });
        let client = Client::connect(&path).await.unwrap();
        // kmsd's side has stopped reading: a write now fails at once.
        shut_rx.await.unwrap();
        assert!(!client.is_closed());
        let scheme = crate::model::SignScheme::default();
        match client.verify("k01", b"m", "s", scheme).await {
            Ok(valid) => assert!(valid),
            Err(e) => panic!("the call did not go ahead on a new connection: {e:?}"),
        }
        let _streams = daemon.await.unwrap();
    }

    /// Calls written together go ahead on a new connection, all of them, when the write
    /// that carried their frames finds the connection closed: before, only the call that
    /// wrote did, and the others failed with `Closed { sent: true }` ("may have been
    /// carried out") or a broken pipe (found by reviewing the fix above). A call already
    /// sent and unanswered still fails with `Closed { sent: true }`.
    #[tokio::test]
    async fn calls_written_together_all_go_ahead_on_a_new_connection() {
        use crate::protocol::{Outcome, ServerFrame};
        let dir = Scratch::new("epipe-many");
        let path = dir.0.join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (shut, shut_rx) = tokio::sync::oneshot::channel();
        let daemon = tokio::spawn(async move {
            let mut first = accept_and_greet(&listener).await;
            // The call in flight: read, never answered.
            next_id(&mut first).await;
            let first = first.into_std().unwrap();
            first.shutdown(std::net::Shutdown::Read).unwrap();
            shut.send(()).unwrap();
            let mut stream = accept_and_greet(&listener).await;
            for _ in 0..6 {
                let id = next_id(&mut stream).await;
                let result = Outcome::Ok(Response::Verified { valid: true });
                send_raw(&mut stream, &ServerFrame::Reply { id, result }).await;
            }
            (first, stream)
        });
        let client = Arc::new(Client::connect(&path).await.unwrap());
        let scheme = crate::model::SignScheme::default();
        let c = client.clone();
        let in_flight = tokio::spawn(async move { c.verify("k00", b"m", "s", scheme).await });
        shut_rx.await.unwrap();
        let mut calls = tokio::task::JoinSet::new();
        for i in 1..=6 {
            let c = client.clone();
            calls.spawn(async move { c.verify(&format!("k0{i}"), b"m", "s", scheme).await });
        }
        while let Some(outcome) = calls.join_next().await {
            match outcome.unwrap() {
                Ok(valid) => assert!(valid),
                Err(e) => panic!("a call did not go ahead on a new connection: {e:?}"),
            }
        }
        match in_flight.await.unwrap() {
            Err(ClientError::Closed { sent: true, .. }) => {}
            other => panic!("the call in flight should have been lost, sent: {other:?}"),
        }
        let _streams = daemon.await.unwrap();
    }

    /// A connection kmsd closed (its idle timeout, a restart) is replaced by the next
    /// call, which goes ahead on the new one: a long-lived client survives both. Before,
    /// every later call failed with "closed" for good. A subscribed client does not
    /// connect again: its subscription ended with the connection.
    #[tokio::test]
    async fn a_closed_connection_is_replaced_by_the_next_call() {
        use crate::protocol::{Outcome, ServerFrame};
        let dir = Scratch::new("reconnect");
        let path = dir.0.join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let daemon = tokio::spawn(async move {
            // The first connection is closed at once, as an idle one is.
            drop(accept_and_greet(&listener).await);
            let mut stream = accept_and_greet(&listener).await;
            let id = next_id(&mut stream).await;
            let result = Outcome::Ok(Response::Verified { valid: true });
            send_raw(&mut stream, &ServerFrame::Reply { id, result }).await;
            // Subscribed, then closed again.
            let id = next_id(&mut stream).await;
            let result = Outcome::Ok(Response::Subscribed);
            send_raw(&mut stream, &ServerFrame::Reply { id, result }).await;
            drop(stream);
            listener
        });
        let client = Client::connect(&path).await.unwrap();
        while !client.is_closed() {
            tokio::task::yield_now().await;
        }
        let scheme = crate::model::SignScheme::default();
        assert!(client.verify("k01", b"m", "s", scheme).await.unwrap());
        let mut events = client.subscribe().await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
        assert!(
            matches!(ended, Ok(None)),
            "the subscription did not end with its connection"
        );
        let _listener = daemon.await.unwrap();
        match client.verify("k01", b"m", "s", scheme).await {
            Err(ClientError::Closed { sent: false, .. }) => {}
            other => panic!("a subscribed client connected again: {other:?}"),
        }
    }

    /// Calls that wait for the same attempt to connect again fail with it when it fails,
    /// rather than each trying for as long again: behind a daemon that never answers the
    /// handshake, the k-th of them waited k × 90 s.
    #[tokio::test(start_paused = true)]
    async fn calls_waiting_for_a_reconnect_share_its_failure() {
        let dir = Scratch::new("reconnect-fails");
        let path = dir.0.join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let daemon = tokio::spawn(async move {
            drop(accept_and_greet(&listener).await);
            // Then accepts and never answers.
            let mut silent = Vec::new();
            loop {
                silent.push(listener.accept().await.unwrap());
            }
        });
        let client = Client::connect(&path).await.unwrap();
        while !client.is_closed() {
            tokio::task::yield_now().await;
        }
        let started = tokio::time::Instant::now();
        let (a, b, c) = tokio::join!(client.status(), client.status(), client.status());
        for r in [a, b, c] {
            match r {
                Err(ClientError::Connect { source, .. }) => {
                    assert_eq!(source.kind(), std::io::ErrorKind::TimedOut, "{source}")
                }
                other => panic!("expected the reconnect's timeout, got {other:?}"),
            }
        }
        let took = started.elapsed();
        assert!(took < HANDSHAKE_TIMEOUT * 2, "took {took:?}");
        daemon.abort();
    }

    /// A subscription given up before its answer (a caller's timeout) leaves the client
    /// able to connect again. It took the events sender with it, and the client then
    /// treated itself as subscribed: after the connection ended, every call failed.
    #[tokio::test(start_paused = true)]
    async fn a_subscribe_given_up_leaves_the_client_able_to_reconnect() {
        use crate::protocol::{Outcome, ServerFrame};
        let dir = Scratch::new("subscribe-given-up");
        let path = dir.0.join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (close, closing) = tokio::sync::oneshot::channel::<()>();
        let daemon = tokio::spawn(async move {
            let mut stream = accept_and_greet(&listener).await;
            next_id(&mut stream).await;
            // No answer to the subscription; the connection ends when the test says.
            closing.await.unwrap();
            drop(stream);
            let mut stream = accept_and_greet(&listener).await;
            let id = next_id(&mut stream).await;
            let result = Outcome::Ok(Response::Verified { valid: true });
            send_raw(&mut stream, &ServerFrame::Reply { id, result }).await;
            stream
        });
        let client = Client::connect(&path).await.unwrap();
        let given_up = tokio::time::timeout(Duration::from_secs(1), client.subscribe()).await;
        assert!(given_up.is_err(), "{given_up:?}");
        close.send(()).unwrap();
        while !client.is_closed() {
            tokio::task::yield_now().await;
        }
        let scheme = crate::model::SignScheme::default();
        assert!(client.verify("k01", b"m", "s", scheme).await.unwrap());
        drop(daemon.await.unwrap());
    }

    /// A call made after an attempt to connect again failed tries for itself: only calls
    /// that waited while an attempt failed share its failure. (With the time of the
    /// failure as the test, a clock that had not moved shared it with later calls too.)
    #[tokio::test(start_paused = true)]
    async fn a_call_after_a_failed_reconnect_tries_again() {
        use crate::protocol::{Outcome, ServerFrame};
        let dir = Scratch::new("reconnect-later");
        let path = dir.0.join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let first = tokio::spawn(async move {
            drop(accept_and_greet(&listener).await);
            // Gone: the socket file stays, nothing listens.
        });
        let client = Client::connect(&path).await.unwrap();
        first.await.unwrap();
        while !client.is_closed() {
            tokio::task::yield_now().await;
        }
        let scheme = crate::model::SignScheme::default();
        match client.verify("k01", b"m", "s", scheme).await {
            Err(ClientError::Connect { .. }) => {}
            other => panic!("expected no daemon, got {other:?}"),
        }
        // The daemon is back.
        std::fs::remove_file(&path).unwrap();
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let second = tokio::spawn(async move {
            let mut stream = accept_and_greet(&listener).await;
            let id = next_id(&mut stream).await;
            let result = Outcome::Ok(Response::Verified { valid: true });
            send_raw(&mut stream, &ServerFrame::Reply { id, result }).await;
            stream
        });
        assert!(client.verify("k01", b"m", "s", scheme).await.unwrap());
        drop(second.await.unwrap());
    }

    /// Writes `frame` (any serializable shape: a newer daemon's) to `stream`.
    async fn send_raw<T: serde::Serialize>(stream: &mut tokio::net::UnixStream, frame: &T) {
        use tokio::io::AsyncWriteExt;
        stream
            .write_all(&codec::encode_frame(frame, u32::MAX).unwrap())
            .await
            .unwrap();
    }

    /// Reads the next request's id.
    async fn next_id(stream: &mut tokio::net::UnixStream) -> u64 {
        let body = codec::read_frame(stream, 1 << 20).await.unwrap().unwrap();
        codec::decode::<crate::protocol::ClientFrame>(&body)
            .unwrap()
            .id
    }

    /// The shapes of a newer daemon's frames: a reply kind, an error kind and an event
    /// kind this client does not know.
    #[derive(serde::Serialize)]
    #[serde(rename_all = "snake_case")]
    enum NewerFrame {
        Reply { id: u64, result: NewerOutcome },
        Event(NewerEvent),
    }

    #[derive(serde::Serialize)]
    #[serde(rename_all = "snake_case")]
    enum NewerOutcome {
        Ok(NewerResponse),
        Err { kind: String, message: String },
    }

    #[derive(serde::Serialize)]
    #[serde(rename_all = "snake_case")]
    enum NewerResponse {
        Quota { left: u64 },
    }

    #[derive(serde::Serialize)]
    struct NewerEvent {
        seq: u64,
        time: i64,
        kind: &'static str,
        key_tag: Option<String>,
        key_name: Option<String>,
        version: Option<u32>,
        state: Option<String>,
        account: &'static str,
        message: &'static str,
    }

    /// PROTOCOL.md §3: what a newer kmsd may send that this client cannot read — a reply
    /// kind, an error kind — fails at most the call it answers, and the connection goes
    /// on; an event of a new kind is kept as `other`. Before, any one of them ended the connection and failed every
    /// call on it as "closed", the daemon's own message lost.
    #[tokio::test]
    async fn what_a_newer_daemon_adds_fails_at_most_its_own_call() {
        use crate::protocol::{Outcome, ServerFrame};
        let dir = Scratch::new("newer");
        let path = dir.0.join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let daemon = tokio::spawn(async move {
            let mut stream = accept_and_greet(&listener).await;
            // An event of a kind added since, before the reply to `subscribe`.
            let id = next_id(&mut stream).await;
            let event = NewerEvent {
                seq: 1,
                time: 0,
                kind: "quota-exceeded",
                key_tag: None,
                key_name: None,
                version: None,
                state: None,
                account: "kmsd",
                message: "m",
            };
            send_raw(&mut stream, &NewerFrame::Event(event)).await;
            let subscribed = ServerFrame::Reply {
                id,
                result: Outcome::Ok(Response::Subscribed),
            };
            send_raw(&mut stream, &subscribed).await;
            // A reply of a kind added since.
            let id = next_id(&mut stream).await;
            let result = NewerOutcome::Ok(NewerResponse::Quota { left: 1 });
            send_raw(&mut stream, &NewerFrame::Reply { id, result }).await;
            // An error kind added since.
            let id = next_id(&mut stream).await;
            let result = NewerOutcome::Err {
                kind: "rate-limited".into(),
                message: "too many calls".into(),
            };
            send_raw(&mut stream, &NewerFrame::Reply { id, result }).await;
            // And an ordinary reply.
            let id = next_id(&mut stream).await;
            let result = Outcome::Ok(Response::Verified { valid: true });
            send_raw(&mut stream, &ServerFrame::Reply { id, result }).await;
            stream
        });
        let client = Client::connect(&path).await.unwrap();
        let mut events = client.subscribe().await.unwrap();
        match client.status().await {
            Err(e @ ClientError::Unexpected(_)) => {
                assert!(e.to_string().contains("cannot decode"), "{e}")
            }
            other => panic!("expected an undecodable reply, got {other:?}"),
        }
        match client.rotate("k01").await {
            Err(ClientError::Server(e)) => {
                assert_eq!(e, WireError::new(ErrorKind::Internal, "too many calls"))
            }
            other => panic!("expected the daemon's refusal, got {other:?}"),
        }
        let scheme = crate::model::SignScheme::default();
        assert!(client.verify("k01", b"m", "s", scheme).await.unwrap());
        // The event of an unknown kind is kept, as `other`, with its number and message
        // (it used to be skipped: a gap in the subscription's numbers, nothing shown).
        match events.try_recv() {
            Ok(Notification::Event(e)) => {
                assert_eq!(
                    (e.kind, e.seq, e.message.as_str()),
                    (crate::protocol::EventKind::Other, 1, "m")
                )
            }
            other => panic!("expected the event, got {other:?}"),
        }
        drop(daemon.await.unwrap());
    }

    /// What kmsd says about the whole connection before it closes it (a reply with id 0:
    /// here a frame over its `max_frame`, refused unread) is the reason every call the
    /// close ends is given. Before, they were told only "closed".
    #[tokio::test]
    async fn the_daemons_reason_for_closing_reaches_the_calls() {
        use crate::protocol::{Outcome, ServerFrame};
        let dir = Scratch::new("refused");
        let path = dir.0.join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let refusal = WireError::new(
            ErrorKind::MalformedFrame,
            "frame of 5000 bytes exceeds the maximum of 1024",
        );
        let said = refusal.clone();
        let daemon = tokio::spawn(async move {
            let mut stream = accept_and_greet(&listener).await;
            next_id(&mut stream).await;
            let result = Outcome::Err(said);
            send_raw(&mut stream, &ServerFrame::Reply { id: 0, result }).await;
        });
        let client = Client::connect(&path).await.unwrap();
        match client.rotate("k01").await {
            Err(e @ ClientError::Closed { sent: true, .. }) => {
                let ClientError::Closed { reason, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(reason.as_ref(), Some(&refusal));
                assert!(e.to_string().contains("exceeds the maximum of 1024"), "{e}");
            }
            other => panic!("expected the daemon's reason, got {other:?}"),
        }
        daemon.await.unwrap();
        assert!(client.is_closed());
    }

    /// Messages are single-spaced lines (a continuation without its backslash once put
    /// ten spaces into one).
    #[test]
    fn messages_have_no_runs_of_spaces() {
        let messages = [
            ClientError::RequestTooLarge { len: 2, max: 1 }.to_string(),
            ClientError::TimedOut {
                after: Duration::from_secs(1),
                sent: true,
            }
            .to_string(),
            ClientError::Closed {
                sent: true,
                reason: None,
            }
            .to_string(),
            ClientError::Closed {
                sent: false,
                reason: Some(WireError::new(ErrorKind::MalformedFrame, "m")),
            }
            .to_string(),
        ];
        for m in messages {
            assert!(!m.contains("  ") && !m.contains('\n'), "{m}");
        }
    }

    /// A subscriber that does not take its events holds at most [`EVENT_QUEUE`] of them;
    /// the rest are counted and it is told how many it missed as soon as it makes room,
    /// before any later event, as the daemon tells a connection that reads too slowly
    /// (it used to be told only when another event came). Replies are never held up.
    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_what_it_missed() {
        use crate::protocol::{ClientFrame, Event, EventKind, Outcome, ServerFrame};
        use tokio::io::AsyncWriteExt;
        const SENT: usize = EVENT_QUEUE + 500;
        let dir = Scratch::new("lagging");
        let path = dir.0.join("kmsd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let event = |seq: u64| {
            ServerFrame::Event(Event {
                seq,
                time: 0,
                kind: EventKind::Rotated,
                key_tag: None,
                key_name: None,
                version: None,
                state: None,
                account: "a".into(),
                message: String::new(),
            })
        };
        // Answers hello and subscribe; each `status` is answered after a burst of events
        // (SENT for the first, one for the next), so that its reply marks them all read.
        let daemon = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut seq = 0;
            // The third burst ends with a `lagged 0` (kmsd dropped some, how many not said).
            let mut bursts = [SENT, 1, SENT, 1].into_iter().enumerate();
            while let Some(body) = codec::read_frame(&mut stream, 1 << 20).await.unwrap() {
                let frame: ClientFrame = codec::decode(&body).unwrap();
                let mut out = Vec::new();
                let reply = match frame.request {
                    Request::Hello { .. } => Response::Hello {
                        protocol: PROTOCOL_VERSION,
                        daemon_version: "0".into(),
                        max_frame: None,
                    },
                    Request::Subscribe => Response::Subscribed,
                    _ => {
                        let (i, n) = bursts.next().unwrap_or((9, 0));
                        for _ in 0..n {
                            seq += 1;
                            out.extend(codec::encode_frame(&event(seq), u32::MAX).unwrap());
                        }
                        if i == 2 {
                            let unknown = ServerFrame::Lagged { missed: 0 };
                            out.extend(codec::encode_frame(&unknown, u32::MAX).unwrap());
                        }
                        Response::Subscribed
                    }
                };
                let reply = ServerFrame::Reply {
                    id: frame.id,
                    result: Outcome::Ok(reply),
                };
                out.extend(codec::encode_frame(&reply, u32::MAX).unwrap());
                stream.write_all(&out).await.unwrap();
            }
        });
        let client = Client::connect(&path).await.unwrap();
        let mut events = client.subscribe().await.unwrap();
        // Takes events until the count of those dropped comes, with nothing sent after
        // the burst: the count must not wait for a later event.
        async fn until_lagged(events: &mut mpsc::Receiver<Notification>) -> (usize, u64) {
            let mut held = 0;
            loop {
                let next = tokio::time::timeout(Duration::from_secs(30), events.recv());
                match next.await.expect("never told of the dropped events") {
                    Some(Notification::Event(_)) => held += 1,
                    Some(Notification::Lagged(n)) => return (held, n),
                    None => panic!("subscription ended"),
                }
            }
        }
        client.call(Request::Status).await.unwrap();
        let (held, missed) = until_lagged(&mut events).await;
        assert_eq!(held, EVENT_QUEUE, "held beyond the queue");
        assert_eq!(missed, (SENT - EVENT_QUEUE) as u64);
        client.call(Request::Status).await.unwrap();
        match events.recv().await.unwrap() {
            Notification::Event(e) => assert_eq!(e.seq, SENT as u64 + 1),
            other => panic!("{other:?}"),
        }
        // Dropped here with kmsd's `lagged 0` among them: told 0, "how many not known",
        // not a count (it used to be lost, then a made-up number).
        client.call(Request::Status).await.unwrap();
        let (held, missed) = until_lagged(&mut events).await;
        assert_eq!((held, missed), (EVENT_QUEUE, 0));
        client.call(Request::Status).await.unwrap();
        match events.recv().await.unwrap() {
            Notification::Event(e) => assert_eq!(e.seq, 2 * SENT as u64 + 2),
            other => panic!("{other:?}"),
        }
        drop(client);
        daemon.abort();
    }

    /// A fresh directory in the system's temporary directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!(
                "kms-shared-{name}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::create_dir(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn chown(p: &Path, uid: u32) {
        rustix::fs::chown(p, Some(rustix::fs::Uid::from_raw(uid)), None).unwrap();
    }

    /// Giving directories to other accounts needs root (as the tests run in CI).
    fn root() -> bool {
        let root = rustix::process::geteuid().is_root();
        if !root {
            eprintln!("skipped: needs root to give directories to other uids");
        }
        root
    }

    const ME: u32 = 1000;
    const OTHER: u32 = 4242;

    /// The squatted default socket: another user made `/tmp/kms-1000` (their own
    /// directory, 0755) before its owner and serves a daemon there. Refused, because
    /// /tmp lets anyone create that directory; accepted only if the daemon is the
    /// client's own account or root. (Clients used to connect to it and send it
    /// plaintexts.)
    #[test]
    fn a_daemon_in_a_directory_squatted_in_tmp_is_refused() {
        if !root() {
            return;
        }
        let squat = Scratch::new("squat");
        chmod(&squat.0, 0o755);
        chown(&squat.0, OTHER);
        let socket = squat.0.join("kmsd.sock");
        let err = trust_daemon(&socket, OTHER, &[ME]).unwrap_err();
        assert!(
            matches!(&err, Distrust::ParentWritable { parent, .. } if *parent == std::env::temp_dir()),
            "{err}"
        );
        assert!(err.to_string().contains("writable by others"), "{err}");
        // The client's own daemon, or root's, is trusted wherever it listens.
        trust_daemon(&socket, ME, &[ME]).unwrap();
        trust_daemon(&socket, 0, &[ME]).unwrap();
        // The error a client reports names the socket, the daemon's uid and why.
        let shown = ClientError::UntrustedDaemon {
            path: socket.clone(),
            uid: OTHER,
            me: ME,
            reason: err,
        }
        .to_string();
        assert!(shown.contains(&socket.display().to_string()), "{shown}");
        assert!(shown.contains("uid 4242"), "{shown}");
        assert!(shown.contains("uid 1000"), "{shown}");
    }

    /// The system service's layout: `/run/kms` belongs to the daemon's account, in
    /// root's `/run` (0755). Such a directory vouches for its owner only: another
    /// account serving there, a parent that is not root's, one others may write, or a
    /// link in place of the directory, and it does not.
    #[test]
    fn only_a_directory_root_gave_the_daemon_vouches_for_it() {
        if !root() {
            return;
        }
        let base = Scratch::new("vouch");
        chmod(&base.0, 0o755);
        let run = base.0.join("run");
        std::fs::create_dir(&run).unwrap();
        chmod(&run, 0o750);
        chown(&run, OTHER);
        let socket = run.join("kmsd.sock");
        trust_daemon(&socket, OTHER, &[ME]).unwrap();
        // However the path is spelled.
        trust_daemon(&base.0.join("run/../run/./kmsd.sock"), OTHER, &[ME]).unwrap();

        let err = trust_daemon(&socket, OTHER + 1, &[ME]).unwrap_err();
        assert!(
            matches!(err, Distrust::ForeignDirectory { owner: OTHER, .. }),
            "{err}"
        );

        let link = base.0.join("link");
        std::os::unix::fs::symlink(&run, &link).unwrap();
        let err = trust_daemon(&link.join("kmsd.sock"), OTHER, &[ME]).unwrap_err();
        assert!(matches!(err, Distrust::LinkedDirectory { .. }), "{err}");

        chmod(&base.0, 0o775);
        let err = trust_daemon(&socket, OTHER, &[ME]).unwrap_err();
        assert!(
            matches!(err, Distrust::ParentWritable { mode: 0o775, .. }),
            "{err}"
        );
        chmod(&base.0, 0o755);
        chown(&base.0, OTHER);
        let err = trust_daemon(&socket, OTHER, &[ME]).unwrap_err();
        assert!(
            matches!(err, Distrust::ParentNotRoot { owner: OTHER, .. }),
            "{err}"
        );
        chown(&base.0, 0);
    }
}
