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
    GrantSpec, HistoryQuery, HsmTokenInfo, ItemOutcome, Outcome, PROTOCOL_VERSION, PlaintextItem,
    Request, Response, Secret, ServerFrame, WireError,
};
use interprocess::local_socket::tokio::{Stream, prelude::*};
use interprocess::local_socket::{GenericFilePath, ToFsName};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, mpsc, oneshot};
use zeroize::Zeroizing;

/// Why a call did not get a reply from the daemon, or got an error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to kmsd at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the daemon refused the request: {0}")]
    Server(#[from] WireError),
    #[error("connection to kmsd lost: {0}")]
    Frame(#[from] FrameError),
    #[error("connection to kmsd closed")]
    Closed,
    #[error("kmsd speaks protocol {daemon}, this client speaks {client}")]
    VersionMismatch { daemon: u32, client: u32 },
    #[error("unexpected reply from kmsd: {0}")]
    Unexpected(String),
    #[error("could not start kmsd: {0}")]
    Autostart(String),
}

impl ClientError {
    /// The error kind, for errors the daemon answered; `None` for transport errors.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Server(e) => Some(e.kind),
            ClientError::VersionMismatch { .. } => Some(ErrorKind::UnsupportedVersion),
            _ => None,
        }
    }
}

/// A message that arrived on a subscription.
#[derive(Debug, Clone, PartialEq)]
pub enum Notification {
    Event(Event),
    /// The daemon dropped this many events because this client read too slowly.
    Lagged(u64),
}

/// Replies can be larger than requests (a full key list); still bounded.
const MAX_REPLY_FRAME: u32 = 256 * 1024 * 1024;

/// Calls waiting for their reply, by id.
type Pending = Arc<StdMutex<PendingCalls>>;

#[derive(Default)]
struct PendingCalls {
    calls: HashMap<u64, oneshot::Sender<Outcome>>,
    /// The connection has ended (set by the reader as it stops, with `calls` emptied):
    /// a call made after that fails at once. Without it such a call could wait for ever:
    /// its frame written (and failed) by another call's combined write, its own write had
    /// nothing left to write, and no reader was left to drop its sender.
    closed: bool,
}

/// A connection to kmsd.
pub struct Client {
    stream: Arc<Stream>,
    /// Held while frames are written, so frames of concurrent calls never interleave.
    write_lock: Mutex<()>,
    /// Frames waiting for the socket. A call queues its frame, then whichever call next
    /// holds `write_lock` writes every frame queued by then in one write: calls made
    /// together (a pipelining client) cost one system call here and one read in the
    /// daemon, not one each. Wiped once written.
    queued: StdMutex<Vec<Queued>>,
    pending: Pending,
    next_id: AtomicU64,
    events: StdMutex<Option<mpsc::UnboundedReceiver<Notification>>>,
    reader: tokio::task::JoinHandle<()>,
    daemon_version: String,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("daemon_version", &self.daemon_version)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the daemon at `path` and does the version handshake.
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let connect_err = |source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let name = path
            .as_os_str()
            .to_fs_name::<GenericFilePath>()
            .map_err(connect_err)?;
        let stream = Stream::connect(name).await.map_err(connect_err)?;
        let stream = Arc::new(stream);
        let pending: Pending = Arc::default();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(stream.clone(), pending.clone(), ev_tx));
        let mut client = Client {
            stream,
            write_lock: Mutex::new(()),
            queued: StdMutex::default(),
            pending,
            next_id: AtomicU64::new(1),
            events: StdMutex::new(Some(ev_rx)),
            reader,
            daemon_version: String::new(),
        };
        let hello = client
            .call(Request::Hello {
                protocol: PROTOCOL_VERSION,
                client: format!("kms-shared/{}", env!("CARGO_PKG_VERSION")),
            })
            .await;
        match hello {
            Ok(Response::Hello {
                protocol,
                daemon_version,
            }) => {
                if protocol != PROTOCOL_VERSION {
                    return Err(ClientError::VersionMismatch {
                        daemon: protocol,
                        client: PROTOCOL_VERSION,
                    });
                }
                client.daemon_version = daemon_version;
                Ok(client)
            }
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(e),
        }
    }

    /// The daemon's version as it announced it in the handshake.
    pub fn daemon_version(&self) -> &str {
        &self.daemon_version
    }

    /// Sends one request and waits for its reply. Other calls may be in flight meanwhile.
    pub async fn call(&self, request: Request) -> Result<Response, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // The frame may hold a plaintext: wiped once written.
        let frame = Zeroizing::new(codec::encode_frame(
            &ClientFrame { id, request },
            DEFAULT_MAX_FRAME,
        )?);
        let (tx, rx) = oneshot::channel();
        let in_flight = {
            let mut pending = lock(&self.pending);
            if pending.closed {
                return Err(ClientError::Closed);
            }
            pending.calls.insert(id, tx);
            pending.calls.len()
        };
        lock(&self.queued).push(Queued { call: id, frame });
        // Dropped before its frame is taken by a write (a caller's timeout while the
        // socket is busy), the call takes its frame back: a call given up is not sent.
        let mut unsent = Unsent {
            client: self,
            id: Some(id),
        };
        if in_flight > 1 {
            // Other calls are in flight on this connection: let those ready to run queue
            // their frames first, so that one write takes them all. A lone call writes at
            // once.
            tokio::task::yield_now().await;
        }
        let written = {
            let _guard = self.write_lock.lock().await;
            // Empty if an earlier writer took this call's frame along.
            let frames = std::mem::take(&mut *lock(&self.queued));
            // Taken (by this write or an earlier one): from here it is sent, or failed.
            unsent.id = None;
            write_frames(&self.stream, &self.queued, frames).await
        };
        if let Err(e) = written {
            // The connection is broken (a Unix socket's write fails when its peer is
            // gone): every call waiting on it ends now, those whose frames this write took
            // along included, and later calls fail at once.
            close_pending(&self.pending);
            return Err(FrameError::Io(e).into());
        }
        match rx.await {
            Ok(Outcome::Ok(resp)) => Ok(resp),
            Ok(Outcome::Err(e)) => Err(ClientError::Server(e)),
            Err(_) => Err(ClientError::Closed),
        }
    }

    /// Subscribes to events; returns the stream of notifications (once per client).
    pub async fn subscribe(&self) -> Result<mpsc::UnboundedReceiver<Notification>, ClientError> {
        let rx = lock(&self.events)
            .take()
            .ok_or_else(|| ClientError::Unexpected("already subscribed".into()))?;
        match self.call(Request::Subscribe).await? {
            Response::Subscribed => Ok(rx),
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

    pub async fn get_key(&self, key: &str) -> Result<KeyInfo, ClientError> {
        self.key_call(Request::GetKey { key: key.into() }).await
    }

    pub async fn versions(&self, key: &str) -> Result<Vec<VersionInfo>, ClientError> {
        match self.call(Request::ListVersions { key: key.into() }).await? {
            Response::Versions { versions } => Ok(versions),
            other => Err(unexpected(&other)),
        }
    }

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

    pub async fn history(&self, query: HistoryQuery) -> Result<Vec<HistoryEntry>, ClientError> {
        match self.call(Request::History(query)).await? {
            Response::History { entries } => Ok(entries),
            other => Err(unexpected(&other)),
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

/// Writes queued frames in one write, wiping every copy.
///
/// If the calling future is dropped part way (a caller's timeout while the daemon is not
/// reading), the bytes not yet written — the rest of a frame cut short, and frames of
/// other calls taken along — are put back at the head of the queue, so that the next write
/// sends them first: the daemon never sees half a frame followed by another, and no other
/// call's frame is lost. Callers hold `write_lock` around this, so nothing is queued ahead
/// of them meanwhile.
async fn write_frames(
    stream: &Stream,
    queued: &StdMutex<Vec<Queued>>,
    frames: Vec<Queued>,
) -> std::io::Result<()> {
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
    let mut unwritten = Unwritten {
        queued,
        bytes,
        written: 0,
    };
    while unwritten.written < unwritten.bytes.len() {
        match (&*stream)
            .write(&unwritten.bytes[unwritten.written..])
            .await
        {
            Ok(0) => {
                unwritten.written = unwritten.bytes.len();
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            Ok(n) => unwritten.written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The connection is gone; nothing is put back.
            Err(e) => {
                unwritten.written = unwritten.bytes.len();
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Bytes being written; what is left of them when dropped goes back to the queue's head.
struct Unwritten<'a> {
    queued: &'a StdMutex<Vec<Queued>>,
    bytes: Zeroizing<Vec<u8>>,
    written: usize,
}

impl Drop for Unwritten<'_> {
    fn drop(&mut self) {
        if let Some(rest) = self.bytes.get(self.written..).filter(|r| !r.is_empty()) {
            // Part of a frame, or frames of several calls: no longer any one call's.
            lock(self.queued).insert(
                0,
                Queued {
                    call: 0,
                    frame: Zeroizing::new(rest.to_vec()),
                },
            );
        }
    }
}

/// Reads frames until the connection ends, routing replies to their callers and
/// notifications to the subscription. Dropping the pending senders on exit wakes every
/// caller with `Closed`.
async fn read_loop(
    stream: Arc<Stream>,
    pending: Pending,
    events: mpsc::UnboundedSender<Notification>,
) {
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
            Ok(ServerFrame::Reply { id, result }) => {
                if let Some(tx) = lock(&pending).calls.remove(&id) {
                    let _ = tx.send(result);
                }
            }
            Ok(ServerFrame::Event(e)) => {
                let _ = events.send(Notification::Event(e));
            }
            Ok(ServerFrame::Lagged { missed }) => {
                let _ = events.send(Notification::Lagged(missed));
            }
            Err(_) => break,
        }
    }
    close_pending(&pending);
}

/// Ends every call waiting on the connection (each sees `Closed`) and makes later calls
/// fail at once.
fn close_pending(pending: &Pending) {
    let mut pending = lock(pending);
    pending.closed = true;
    pending.calls.clear();
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
    client: &'a Client,
    /// `None` once the frame has been taken by a write.
    id: Option<u64>,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            lock(&self.client.queued).retain(|q| q.call != id);
            lock(&self.client.pending).calls.remove(&id);
        }
    }
}

/// How a client finds (and, if allowed, starts) its daemon (SPEC §1).
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// An explicit socket; `None` means the default path (and allows autostart).
    pub socket: Option<PathBuf>,
    /// Start a user-mode kmsd when none answers on the default socket.
    pub autostart: bool,
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
/// socket, and waits up to 10 s for it to accept.
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
    let system = Path::new(paths::SYSTEM_SOCKET);
    if path != system && !paths::autostart_allowed_in(&paths::Env::current(), system.exists()) {
        return Err(ClientError::Autostart(format!(
            "no kmsd answers on {}, and none is started there because the system kmsd \
             listens on {}: use --socket {} (or set KMS_SOCKET) to reach it, or set \
             KMS_SOCKET to where a daemon of your own should listen",
            path.display(),
            system.display(),
            system.display()
        )));
    }
    let mut started = spawn_daemon(&path)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let exited = started.child.try_wait().ok().flatten();
        match Client::connect(&path).await {
            Ok(c) => {
                started.reap();
                return Ok(c);
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

/// The log of a kmsd a client started: `kmsd.log` in its data directory, begun anew at
/// each autostart (such a daemon has no terminal and no journal to write to).
fn open_autostart_log() -> Option<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = paths::default_data_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .ok()?;
    let path = dir.join("kmsd.log");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .ok()?;
    Some((path, file))
}

/// Starts kmsd for the default socket `socket`.
fn spawn_daemon(socket: &Path) -> Result<Started, ClientError> {
    use std::os::unix::process::CommandExt;
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("kmsd")))
        .filter(|p| p.is_file());
    let program = beside.unwrap_or_else(|| PathBuf::from("kmsd"));
    let (log, stderr) = match open_autostart_log() {
        Some((path, file)) => (Some(path), std::process::Stdio::from(file)),
        None => (None, std::process::Stdio::null()),
    };
    let mut cmd = std::process::Command::new(&program);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        // Not holding the client's working directory (a mount it would keep busy); a
        // relative `$KMS_SOCKET` is passed on as the path it means here.
        .current_dir("/")
        .env(
            "KMS_SOCKET",
            std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf()),
        )
        // Its own process group, so a Ctrl-C in the client's terminal does not stop it.
        .process_group(0);
    let child = cmd
        .spawn()
        .map_err(|e| ClientError::Autostart(format!("{}: {e}", program.display())))?;
    Ok(Started { child, log })
}
