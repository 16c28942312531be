//! One handler per request kind: authorise, call the engine off the reactor where the
//! work is heavy, wait until the call's history entry is durable, map errors to the wire.
//!
//! Where work runs: AES on at most 32 KiB costs microseconds and runs inline; RSA and
//! ECDSA (tens to hundreds of microseconds) and batches run on the crypto pool, one thread
//! per core, so that 16 clients signing at once are 2 threads taking turns rather than 16
//! threads the scheduler switches between; calls of keys in a PKCS#11 token run on a pool
//! of their own (a token's call may wait milliseconds on the device, and must not hold up
//! the software keys' crypto behind it); key generation and everything
//! that waits on a commit run on tokio's blocking pool. No client can stall the reactor,
//! and no account can queue more than its share of work on the pool (`PoolShares`).
//!
//! A connection starts its crypto calls with [`Service::start`] where it can: no task per
//! call, the reply waiting on the call's record and queued by the thread that learns it
//! is durable. Everything else, and every refusal, goes through [`Service::handle`].

use crate::authz::{self, Need};
use crate::crypto::in_own_frames;
use crate::engine::{Caller, Durable, Engine, EngineError, Pending, Published};
use crate::log_limit::LogAtMostEvery;
use crate::server::ConnectionsPerAccount;
use kms_shared::model::{Action, KeyType, MAX_AES_PLAINTEXT, MAX_BATCH_ITEMS};
use kms_shared::protocol::{
    DaemonStatus, ErrorKind, ItemOutcome, PROTOCOL_VERSION, Request, Response, WireError,
};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};

pub struct Service {
    engine: Arc<Engine>,
    started_at: i64,
    socket: PathBuf,
    data_dir: PathBuf,
    connections: AtomicU64,
    /// Open connections per account, against `max_connections_per_account` (the server
    /// takes a place for each connection it accepts).
    pub(crate) per_account: ConnectionsPerAccount,
    /// The daemon's own uid: it and root are managers (SPEC §6).
    daemon_uid: u32,
    /// Online backups being streamed (see `backup.rs`).
    backups: crate::backup::Backups,
    /// CPU-bound crypto: one thread per core. Nothing on it waits for a commit.
    crypto: rayon::ThreadPool,
    /// Calls of keys in a PKCS#11 token, which wait on the token ([`TOKEN_THREADS`]).
    token: rayon::ThreadPool,
    /// Calls that ran on a token pool thread, counted where they ran.
    token_thread_calls: Arc<AtomicU64>,
    /// Each account's share of the work queued on `crypto`.
    pool_shares: PoolShares,
    /// History scans (`history`, `impact`) take turns per account: one at a time each, so
    /// that one account's queries, however many it sends, keep at most one core busy
    /// reading history (each is bounded too: `EngineConfig::history_scan`).
    scan_turns: PoolShares,
}

type Reply = Result<Response, WireError>;

/// An engine batch call: `Engine::encrypt_batch` and its siblings.
type BatchOp<I> = fn(&Engine, &Caller, &str, &[I]) -> Pending<Vec<ItemOutcome>>;

impl Service {
    pub fn new(
        engine: Arc<Engine>,
        socket: PathBuf,
        data_dir: PathBuf,
        max_connections_per_account: usize,
        max_buffered_bytes_per_account: usize,
    ) -> Result<Service, rayon::ThreadPoolBuildError> {
        let crypto = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("kmsd-crypto-{i}"))
            // A panic is a bug, never input (SPEC §14): the call answers `internal` (its
            // reply channel is dropped) and the thread keeps serving.
            .panic_handler(|_| tracing::error!("a crypto task panicked"))
            .build()?;
        let token = rayon::ThreadPoolBuilder::new()
            .num_threads(TOKEN_THREADS)
            .thread_name(|i| format!("{TOKEN_THREAD}{i}"))
            .panic_handler(|_| tracing::error!("a token task panicked"))
            .build()?;
        Ok(Service {
            started_at: engine.now(),
            engine,
            socket,
            data_dir,
            connections: AtomicU64::new(0),
            per_account: ConnectionsPerAccount::new(
                max_connections_per_account,
                max_buffered_bytes_per_account,
            ),
            daemon_uid: rustix::process::geteuid().as_raw(),
            backups: crate::backup::Backups::default(),
            crypto,
            token,
            token_thread_calls: Arc::default(),
            pool_shares: PoolShares::new(POOL_SHARE),
            scan_turns: PoolShares::new(1),
        })
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Answers one request.
    pub async fn handle(&self, caller: &Caller, req: Request) -> Reply {
        let kind = req.kind();
        let r = self.dispatch(caller, req).await;
        if let Err(e) = &r {
            tracing::debug!(request = kind, account = %caller.account, error = %e.kind, "refused");
        }
        r
    }

    async fn dispatch(&self, caller: &Caller, mut req: Request) -> Reply {
        let (need, key, action) = authz::requirement(&mut req);
        let named = key.as_deref().cloned();
        let authorized = self
            .authorize(caller, need, named.as_deref(), action)
            .await?;
        // The call runs on the key it was authorized for: by tag, not by a name that a
        // purge and a new key could give to another key while the call waits its turn.
        let checked = authorized.clone().or_else(|| named.clone());
        if let (Some(key), Some(tag)) = (key, authorized) {
            *key = tag;
        }
        let permit = &Permit {
            caller,
            need,
            key: checked,
            named,
            action,
            daemon_uid: self.daemon_uid,
        };
        let e = &self.engine;
        match req {
            // Handled by the connection; harmless if repeated.
            Request::Hello { .. } => Ok(Response::Hello {
                protocol: PROTOCOL_VERSION,
                daemon_version: env!("CARGO_PKG_VERSION").into(),
                // Said once, in the handshake's answer.
                max_frame: None,
            }),
            Request::Subscribe => Ok(Response::Subscribed),
            Request::Status => Ok(Response::Status(self.status(caller))),
            Request::ListKeys {
                deleted,
                offset,
                limit,
            } => {
                let (offset, limit) = (offset as usize, limit.map_or(usize::MAX, |l| l as usize));
                let superuser = authz::is_superuser(caller, self.daemon_uid);
                // Off the reactor: a whole list of 100,000 keys takes tens of milliseconds
                // to build, which every other connection on a worker would wait out.
                self.blocking(permit, move |e, caller| {
                    if superuser || deleted {
                        let (keys, total) = e.list_keys(deleted, offset, Some(limit));
                        return Ok(Response::Keys { keys, total });
                    }
                    // Others see the keys they have a role on: all of them with a grant on
                    // all keys, else those their grants name (looked up by tag: never a
                    // walk of every key).
                    let grants = e.grants();
                    let (keys, total) = if authz::permits(&grants, caller, Need::View, None) {
                        e.list_keys(false, offset, Some(limit))
                    } else {
                        e.list_keys_of(
                            &authz::granted_tags(&grants, caller, Need::View),
                            offset,
                            limit,
                        )
                    };
                    Ok(Response::Keys { keys, total })
                })
                .await
            }
            Request::GetKey { key } => e.get_key(&key).map(Response::Key).map_err(wire),
            // Off the reactor: a key's versions are read from the store on its first use.
            Request::ListVersions { key } => {
                self.blocking(permit, move |e, _| {
                    e.versions(&key)
                        .map(|versions| Response::Versions { versions })
                })
                .await
            }
            req @ (Request::Encrypt { .. }
            | Request::Decrypt { .. }
            | Request::Reencrypt { .. }) => {
                let inline = self.runs_inline(&req);
                let (c, in_token) = (caller.clone(), self.runs_on_token_pool(&req));
                self.run(permit, in_token, inline, 1, move |e| {
                    cipher_call(e, &c, req)
                })
                .await
            }
            Request::EncryptBatch { key, items } => {
                self.batch(permit, key, items, Engine::encrypt_batch).await
            }
            Request::DecryptBatch { key, items } => {
                self.batch(permit, key, items, Engine::decrypt_batch).await
            }
            Request::ReencryptBatch { key, items } => {
                self.batch(permit, key, items, Engine::reencrypt_batch)
                    .await
            }
            req @ (Request::Sign { .. }
            | Request::Verify { .. }
            | Request::PublicKey { .. }
            | Request::DataKey { .. }) => {
                let (c, in_token) = (caller.clone(), self.runs_on_token_pool(&req));
                self.run(permit, in_token, false, 1, move |e| pool_call(e, &c, req))
                    .await
            }
            Request::CreateKey(spec) => {
                self.blocking(permit, move |e, c| {
                    e.create_key(c, &spec).map(Response::Key)
                })
                .await
            }
            Request::Rotate { key } => {
                self.blocking(permit, move |e, c| e.rotate(c, &key).map(Response::Key))
                    .await
            }
            Request::Enable { key } => {
                self.blocking(permit, move |e, c| e.enable(c, &key).map(Response::Key))
                    .await
            }
            Request::Disable { key } => {
                self.blocking(permit, move |e, c| e.disable(c, &key).map(Response::Key))
                    .await
            }
            Request::EnableVersion { key, version } => {
                self.blocking(permit, move |e, c| {
                    e.set_version_enabled(c, &key, version, true)
                        .map(|versions| Response::Versions { versions })
                })
                .await
            }
            Request::DisableVersion { key, version } => {
                self.blocking(permit, move |e, c| {
                    e.set_version_enabled(c, &key, version, false)
                        .map(|versions| Response::Versions { versions })
                })
                .await
            }
            Request::SetRotation {
                key,
                auto_rotation,
                rotation_days,
            } => {
                self.blocking(permit, move |e, c| {
                    e.set_rotation(c, &key, auto_rotation, rotation_days)
                        .map(Response::Key)
                })
                .await
            }
            Request::SetMemo { key, memo } => {
                self.blocking(permit, move |e, c| {
                    e.set_memo(c, &key, &memo).map(Response::Key)
                })
                .await
            }
            Request::RequestDeletion { key } => {
                self.blocking(permit, move |e, c| {
                    e.request_deletion(c, &key).map(Response::Key)
                })
                .await
            }
            Request::CancelDeletion { key } => {
                self.blocking(permit, move |e, c| {
                    e.cancel_deletion(c, &key).map(Response::Key)
                })
                .await
            }
            Request::DeleteNow { key } => {
                self.blocking(permit, move |e, c| e.delete_now(c, &key).map(Response::Key))
                    .await
            }
            Request::History(q) => {
                let _turn = self.scan_turns.acquire(caller.uid, 1).await;
                self.blocking(permit, move |e, _| {
                    e.history_page(&q).map(|page| Response::History {
                        entries: page.entries,
                        resume_before_seq: page.resume_before_seq,
                    })
                })
                .await
            }
            Request::Grant(spec) => {
                self.blocking(permit, move |e, c| e.grant(c, &spec).map(Response::Grant))
                    .await
            }
            Request::Revoke(spec) => {
                self.blocking(permit, move |e, c| e.revoke(c, &spec).map(Response::Grant))
                    .await
            }
            Request::ListGrants => Ok(Response::Grants {
                grants: e.grants().to_vec(),
            }),
            Request::Impact { key, window_ms } => {
                let _turn = self.scan_turns.acquire(caller.uid, 1).await;
                self.blocking(permit, move |e, _| {
                    e.impact(&key, window_ms).map(Response::Impact)
                })
                .await
            }
            // Managers only (authz: Need::Admin): a snapshot holds every wrapped key.
            Request::Backup => {
                let recheck = permit.recheck();
                let still_permitted = || recheck.still_permitted(e).map_err(wire);
                self.backups
                    .start(e, &self.data_dir, caller, still_permitted)
                    .await
            }
            Request::BackupRead { snapshot, offset } => {
                self.backups.read(&snapshot, offset, caller).await
            }
            // Managers only (authz: Need::Admin); loading a module and logging in blocks.
            Request::HsmAdd {
                name,
                module,
                token,
                pin_file,
            } => {
                self.blocking(permit, move |e, c| {
                    e.hsm_add(c, &name, &module, &token, &pin_file)
                        .map(Response::HsmToken)
                })
                .await
            }
            Request::HsmList => Ok(Response::HsmTokens {
                tokens: e.hsm_list(),
            }),
            Request::HsmRemove { name } => {
                self.blocking(permit, move |e, c| {
                    e.hsm_remove(c, &name).map(Response::HsmToken)
                })
                .await
            }
        }
    }

    /// Refuses a request the caller's roles do not cover, naming the missing role, and
    /// records the refusal in the key's history. Permitted on a key it resolved (a caller
    /// who is not a manager by identity), returns that key's tag.
    async fn authorize(
        &self,
        caller: &Caller,
        need: Need,
        key: Option<&str>,
        action: Option<Action>,
    ) -> Result<Option<String>, WireError> {
        if let Some(permitted) = self.permitted(caller, need, key) {
            return Ok(permitted);
        }
        let err = WireError::new(
            ErrorKind::PermissionDenied,
            denial(&self.engine, caller, need, key),
        );
        if let (Some(k), Some(a)) = (key, action) {
            // Recorded in the key's history, but not waited for: a refusal that waited for
            // its durable entry took ~0.1 ms longer than one for a name no key has, which
            // told an account without a role which keys exist. History read after the
            // answer still has it (`Writer::settle` waits for it); a crash in the next
            // tenth of a millisecond may lose it, as it may lose the refusals counted
            // together with it (engine::refusals), and one that cannot be written is logged
            // by the store.
            drop(
                self.engine
                    .record_refusal(caller, k, a, ErrorKind::PermissionDenied),
            );
        }
        Err(err)
    }

    /// `Some` if the caller's roles permit the request, with the tag of the key it resolved
    /// (a caller who is not a manager by identity); `None` if they do not.
    fn permitted(&self, caller: &Caller, need: Need, key: Option<&str>) -> Option<Option<String>> {
        permitted(&self.engine, self.daemon_uid, caller, need, key)
    }

    /// Starts a call without a task of its own, for a caller whose roles permit it:
    ///
    /// - an AES encrypt, decrypt or re-encrypt of at most [`ON_READER_MAX`] bytes with a
    ///   software key runs here, on the reader, and `answer` is called before this returns;
    /// - a signature, a verification, a public key or a data key goes to the crypto pool
    ///   if the caller's account has room in its share of it, and `answer` is called on
    ///   the pool thread once the call is computed.
    ///
    /// `answer` gets the reply, which may be sent once the [`Durable`] half succeeds. Every
    /// other request — one the caller's roles do not permit (its refusal is recorded by
    /// [`Service::handle`]), or one whose account must wait for its share of the pool — is
    /// handed back with `answer`.
    ///
    /// This is how a connection answers its calls without a task each: the reply waits on
    /// the store writer's answer and is queued by the thread that delivers it. A task
    /// spawned per call, woken again when the call was durable, cost the reactor a spawn
    /// and a second poll per call.
    pub fn start<A>(
        &self,
        caller: &Arc<Caller>,
        mut req: Request,
        answer: A,
    ) -> Result<(), (Request, A)>
    where
        A: FnOnce(Reply, Durable) + Send + 'static,
    {
        let inline = self.is_aes_call_within(&req, ON_READER_MAX);
        if !inline && !runs_on_pool(&req) {
            return Err((req, answer));
        }
        // Taken before the request is changed (below), so that it can be handed back as
        // it came; given back at once if the roles do not permit the call.
        let share = if inline {
            None
        } else {
            match self.pool_shares.try_acquire(caller.uid, 1) {
                Some(share) => Some(share),
                None => return Err((req, answer)),
            }
        };
        let (need, key, action) = authz::requirement(&mut req);
        let Some(permitted) = self.permitted(caller, need, key.as_deref().map(String::as_str))
        else {
            return Err((req, answer));
        };
        // For the recheck on the pool (not needed inline: nothing waits in between).
        let (named, checked) = if inline {
            (None, None)
        } else {
            let named = key.as_deref().cloned();
            (named.clone(), permitted.clone().or(named))
        };
        if let (Some(key), Some(tag)) = (key, permitted) {
            *key = tag;
        }
        let kind = req.kind();
        if inline {
            let (result, durable) = cipher_call(&self.engine, caller, req).split();
            answer(logged(kind, caller, result), durable);
            return Ok(());
        }
        let recheck = Permit {
            caller,
            need,
            key: checked,
            named,
            action,
            daemon_uid: self.daemon_uid,
        }
        .recheck();
        let pool = self.pool_for(self.runs_on_token_pool(&req));
        let (engine, caller) = (self.engine.clone(), caller.clone());
        let counted = self.token_thread_calls.clone();
        pool.spawn(move || {
            count_token_thread(&counted);
            // A panic is a bug, never input (SPEC §14); the call is still answered.
            let pending = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match recheck
                .still_permitted(&engine)
            {
                Ok(()) => in_own_frames(|| pool_call(&engine, &caller, req)),
                Err(refused) => Pending::failed(refused),
            }))
            .unwrap_or_else(|_| {
                tracing::error!(request = kind, "a crypto call panicked");
                Pending::failed(EngineError::Crypto(crate::crypto::CryptoError::Internal(
                    "the call failed",
                )))
            });
            crate::crypto::wipe_stack::<POOL_STACK_WORDS>();
            drop(share);
            let (result, durable) = pending.split();
            answer(logged(kind, &caller, result), durable);
        });
        Ok(())
    }

    /// At most how many bytes the reply to `req` encodes to, where that can be far more
    /// than the request: a key list, a history page, a batch, the grants. A connection
    /// counts this against its buffer budget from the moment it reads the request
    /// (`connection.rs`), so a client that pipelines such requests and does not read is
    /// stopped being read once their replies would fill the budget, not 256 requests
    /// later (256 full lists of 100,000 keys are ~7 GiB). 0 for every other request: its
    /// own size bounds its reply.
    pub fn reply_estimate(&self, req: &Request) -> usize {
        match req {
            Request::ListKeys { limit, .. } => {
                let limit = limit.map_or(usize::MAX, |l| l as usize);
                limit.min(self.engine.all_keys()) * REPLY_BYTES_PER_KEY
            }
            Request::History(q) => {
                kms_shared::protocol::history_page_limit(q.limit) * REPLY_BYTES_PER_HISTORY_ENTRY
            }
            Request::EncryptBatch { items, .. } => items.len() * REPLY_BYTES_PER_ITEM,
            Request::DecryptBatch { items, .. } | Request::ReencryptBatch { items, .. } => {
                items.len() * REPLY_BYTES_PER_ITEM
            }
            Request::ListGrants => self.engine.grants().len() * REPLY_BYTES_PER_GRANT,
            _ => 0,
        }
    }

    /// Whether a request is an AES call cheap enough for the reactor (microseconds).
    fn runs_inline(&self, req: &Request) -> bool {
        self.is_aes_call_within(req, MAX_AES_PLAINTEXT)
    }

    /// Whether a request is an AES encrypt, decrypt or re-encrypt with a software key of at
    /// most `max` bytes of plaintext.
    fn is_aes_call_within(&self, req: &Request, max: usize) -> bool {
        match req {
            Request::Encrypt { key, plaintext, .. } => plaintext.len() <= max && self.is_aes(key),
            Request::Decrypt {
                key, ciphertext, ..
            }
            | Request::Reencrypt {
                key, ciphertext, ..
            } => ciphertext.len() <= 2 * max && self.is_aes(key),
            _ => false,
        }
    }

    /// Whether a subscriber sees every event: root, kmsd's account, a role on all keys.
    pub fn sees_every_event(&self, caller: &Caller) -> bool {
        authz::is_superuser(caller, self.daemon_uid)
            || authz::permits(&self.engine.grants(), caller, Need::View, None)
    }

    /// The event as a subscriber sees it, if at all: managers see all, others the events
    /// of keys they have a role on (and global ones if they hold a role on all keys).
    /// Who was given or lost which role is told to those who may list grants (a manager
    /// of all keys) and to the grantee; anyone else reads that the key's permissions
    /// changed. Judged by the grants in force when the event was published
    /// ([`Published`]).
    pub fn shown_to(
        &self,
        caller: &Caller,
        published: Published,
    ) -> Option<kms_shared::protocol::Event> {
        let Published {
            mut event,
            grants,
            grant,
        } = published;
        let superuser = authz::is_superuser(caller, self.daemon_uid);
        if !superuser && !authz::permits(&grants, caller, Need::View, event.key_tag.as_deref()) {
            return None;
        }
        if let Some(grant) = grant
            && !superuser
            && !authz::permits(&grants, caller, Need::Admin, None)
            && !authz::is_grantee(&grant, caller)
        {
            event.message = match &event.key_name {
                Some(name) => format!("permissions on key {name} changed"),
                None => "permissions on all keys changed".to_string(),
            };
        }
        Some(event)
    }

    /// Whether a request is a crypto call of a key in a PKCS#11 token, which runs on the
    /// token pool when it does not run inline; every other call that leaves the reactor
    /// runs on the crypto pool (a key that does not resolve is refused there, cheaply).
    pub fn runs_on_token_pool(&self, req: &Request) -> bool {
        crypto_call_key(req).is_some_and(|key| self.in_token(key))
    }

    fn in_token(&self, key: &str) -> bool {
        self.engine
            .resolve(key)
            .is_ok_and(|k| k.rec.protection != kms_shared::model::Protection::Basic)
    }

    fn pool_for(&self, in_token: bool) -> &rayon::ThreadPool {
        if in_token { &self.token } else { &self.crypto }
    }

    /// How many calls have run on a token pool thread: what shows that token calls reach
    /// that pool, not only that they are meant to (kmsd/tests/hsm_pool.rs).
    #[doc(hidden)]
    pub fn calls_run_on_token_threads(&self) -> u64 {
        self.token_thread_calls.load(Ordering::Relaxed)
    }

    fn is_aes(&self, key: &str) -> bool {
        // Software AES only: an HSM key waits on a token session, never on the reactor.
        // And one whose versions are in memory: its first call reads them from the store,
        // which waits out a recovery of the store after a failed commit (seconds), and
        // runs on the pool.
        self.engine.resolve(key).is_ok_and(|k| {
            k.rec.key_type == KeyType::Aes256
                && k.rec.protection == kms_shared::model::Protection::Basic
                && k.versions.get().is_some()
        })
    }

    /// Runs a crypto call inline or on the crypto pool and waits until its history entry
    /// is durable; returns its result.
    ///
    /// A call on the pool wakes this task once, when its answer is final: the pool thread
    /// hands the wait for durability to [`complete_on_wake`], so the writer thread, whose
    /// answer is what the call waits for, finishes it and sends the result here. Handing
    /// the pending call back first and then waiting here cost a second wake-up of the
    /// reactor per call.
    async fn run<T: Send + 'static>(
        &self,
        permit: &Permit<'_>,
        in_token: bool,
        inline: bool,
        work: usize,
        f: impl FnOnce(&Engine) -> Pending<T> + Send + 'static,
    ) -> Result<T, WireError> {
        if inline {
            return f(&self.engine).wait_async().await.map_err(wire);
        }
        let pool = self.pool_for(in_token);
        // The pool serves accounts in turn: one cannot queue more than its share of work
        // (items) ahead of everyone else's.
        let share = self.pool_shares.acquire(permit.caller.uid, work).await;
        let engine = self.engine.clone();
        let (done, result) = tokio::sync::oneshot::channel();
        let counted = self.token_thread_calls.clone();
        let recheck = permit.recheck();
        pool.spawn(move || {
            count_token_thread(&counted);
            let pending = match recheck.still_permitted(&engine) {
                Ok(()) => in_own_frames(|| f(&engine)),
                Err(refused) => Pending::failed(refused),
            };
            crate::crypto::wipe_stack::<POOL_STACK_WORDS>();
            drop(share);
            complete_on_wake(async move {
                let _ = done.send(pending.wait_async().await);
            });
        });
        match result.await {
            Ok(r) => r.map_err(wire),
            Err(_) => {
                tracing::error!("a crypto task ended without an answer");
                Err(WireError::new(
                    ErrorKind::Internal,
                    "the request could not be completed",
                ))
            }
        }
    }

    /// A batch call on the crypto pool, one share item per batch item; an oversized
    /// batch is refused inline, without waiting for the pool.
    async fn batch<I: Send + Sync + 'static>(
        &self,
        permit: &Permit<'_>,
        key: String,
        items: Vec<I>,
        op: BatchOp<I>,
    ) -> Reply {
        let c = permit.caller.clone();
        let (oversized, work) = (items.len() > MAX_BATCH_ITEMS, items.len());
        let in_token = self.in_token(&key);
        self.run(permit, in_token, oversized, work, move |e| {
            op(e, &c, &key, &items)
        })
        .await
        .map(|items| Response::Batch { items })
    }

    /// Runs a call that may wait on a commit or read the store, on the blocking pool.
    async fn blocking(
        &self,
        permit: &Permit<'_>,
        f: impl FnOnce(&Engine, &Caller) -> Result<Response, EngineError> + Send + 'static,
    ) -> Reply {
        let engine = self.engine.clone();
        let recheck = permit.recheck();
        let caller = permit.caller.clone();
        let gate = permit.gate();
        tokio::task::spawn_blocking(move || {
            // Checked and done with no grant change in between (what `gate` says).
            let _in_force = (gate == Gate::InForce).then(|| engine.grants_in_force());
            let _changing = (gate == Gate::Changing).then(|| engine.grants_changing());
            recheck.still_permitted(&engine)?;
            f(&engine, &caller)
        })
        .await
        .map_err(join_error)?
        .map_err(wire)
    }

    /// The daemon's status. Its counts describe the whole store only for a caller with a
    /// role on all keys (or the daemon's own account and root); anyone else who may
    /// connect learns what is theirs: the live keys they have a role on, the next
    /// scheduled change of one of them, and their own account's connections.
    fn status(&self, caller: &Caller) -> DaemonStatus {
        let grants = self.engine.grants();
        let (keys, connections, next_due_at) = if authz::is_superuser(caller, self.daemon_uid)
            || authz::permits(&grants, caller, Need::View, None)
        {
            (
                self.engine.live_keys(),
                self.connections.load(Ordering::Relaxed),
                self.engine.next_due(),
            )
        } else {
            let tags = authz::granted_tags(&grants, caller, Need::View);
            let (own, _) = self.engine.list_keys_of(&tags, 0, usize::MAX);
            let next_due = own
                .iter()
                .flat_map(|k| [k.next_rotation_at, k.deletion_due_at])
                .flatten()
                .min();
            (
                own.len() as u64,
                self.per_account.open(caller.uid),
                next_due,
            )
        };
        DaemonStatus {
            daemon_version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL_VERSION,
            pid: std::process::id(),
            uptime_ms: self.engine.now() - self.started_at,
            socket: self.socket.display().to_string(),
            data_dir: self.data_dir.display().to_string(),
            keys,
            connections,
            next_due_at,
        }
    }
}

/// Encrypt, decrypt or re-encrypt; any other request is refused as an invalid argument
/// (only these three are ever passed here).
fn cipher_call(e: &Engine, caller: &Caller, req: Request) -> Pending<Response> {
    match req {
        Request::Encrypt {
            key,
            plaintext,
            context,
        } => e
            .encrypt(caller, &key, &plaintext, context.as_deref())
            .map(|ciphertext| Response::Ciphertext { ciphertext }),
        Request::Decrypt {
            key,
            ciphertext,
            context,
        } => e
            .decrypt(caller, &key, &ciphertext, context.as_deref())
            .map(|plaintext| Response::Plaintext { plaintext }),
        Request::Reencrypt {
            key,
            ciphertext,
            context,
        } => e
            .reencrypt(caller, &key, &ciphertext, context.as_deref())
            .map(|ciphertext| Response::Ciphertext { ciphertext }),
        other => Pending::failed(EngineError::InvalidArgument(format!(
            "{} is not encrypt, decrypt or re-encrypt",
            other.kind()
        ))),
    }
}

/// The key a crypto call names (`None` for any other request).
fn crypto_call_key(req: &Request) -> Option<&str> {
    match req {
        Request::Encrypt { key, .. }
        | Request::Decrypt { key, .. }
        | Request::Reencrypt { key, .. }
        | Request::EncryptBatch { key, .. }
        | Request::DecryptBatch { key, .. }
        | Request::ReencryptBatch { key, .. }
        | Request::Sign { key, .. }
        | Request::Verify { key, .. }
        | Request::PublicKey { key, .. }
        | Request::DataKey { key, .. } => Some(key),
        _ => None,
    }
}

/// Whether a request is one of the single calls [`pool_call`] makes.
fn runs_on_pool(req: &Request) -> bool {
    matches!(
        req,
        Request::Sign { .. }
            | Request::Verify { .. }
            | Request::PublicKey { .. }
            | Request::DataKey { .. }
    )
}

/// A signature, a verification, a public key or a data key: the single calls that run on
/// the crypto pool. Any other request is refused as an invalid argument (only these four
/// are ever passed here).
fn pool_call(e: &Engine, caller: &Caller, req: Request) -> Pending<Response> {
    match req {
        Request::Sign {
            key,
            message,
            scheme,
        } => e
            .sign(caller, &key, &message, scheme)
            .map(|signature| Response::Signature { signature }),
        Request::Verify {
            key,
            message,
            signature,
            scheme,
        } => e
            .verify(caller, &key, &message, &signature, scheme)
            .map(|valid| Response::Verified { valid }),
        Request::PublicKey { key, version } => e
            .public_key(caller, &key, version)
            .map(|(version, pem)| Response::PublicKey { version, pem }),
        Request::DataKey {
            key,
            bits,
            plaintext,
            context,
        } => e
            .data_key(caller, &key, bits, plaintext, context.as_deref())
            .map(move |(ciphertext, plaintext)| Response::DataKey {
                ciphertext,
                plaintext,
                bits,
            }),
        other => Pending::failed(EngineError::InvalidArgument(format!(
            "{} is not a signature, verification, public key or data key",
            other.kind()
        ))),
    }
}

/// `Some` if the caller's roles permit the request, with the tag of the key it resolved
/// (a caller who is not a manager by identity); `None` if they do not.
fn permitted(
    engine: &Engine,
    daemon_uid: u32,
    caller: &Caller,
    need: Need,
    key: Option<&str>,
) -> Option<Option<String>> {
    if need == Need::Connected || authz::is_superuser(caller, daemon_uid) {
        return Some(None);
    }
    let entry = key.and_then(|k| engine.resolve(k).ok());
    let need = need_on(need, entry.as_deref());
    let tag = entry.as_ref().map(|e| e.rec.tag.clone());
    authz::permits(&engine.grants(), caller, need, tag.as_deref()).then_some(tag)
}

/// Why `caller` may not make a request that needs `need` on `key` (as the caller named
/// it, known or not: a refusal tells nothing about a key the caller may not see, not its
/// name when asked by tag, nor that it exists).
fn denial(engine: &Engine, caller: &Caller, need: Need, key: Option<&str>) -> String {
    let resolved = key.and_then(|k| engine.resolve(k).ok());
    // The manager's role a purged key needs is named only to a caller the request's own
    // need permits there (a role on all keys): to anyone else a purged tag reads as a
    // live or unknown one does (PROTOCOL.md §5: a refusal never says a key exists).
    let tag = resolved.as_ref().map(|e| e.rec.tag.as_str());
    let need = if authz::permits(&engine.grants(), caller, need, tag) {
        need_on(need, resolved.as_deref())
    } else {
        need
    };
    let roles: Vec<&str> = need.roles().iter().map(|r| r.as_str()).collect();
    let scope = match key {
        Some(k) => format!("key {k}"),
        None => "all keys".to_string(),
    };
    format!(
        "account {} needs the role {} on {scope}",
        caller.account,
        roles.join(" or ")
    )
}

/// A request the caller's roles permitted when it was read. Its work may begin much
/// later — after the account's turn at the crypto pool, the pool's queue, a history
/// scan's turn — and by then a `revoke` may have been acknowledged: so the roles are
/// checked again where the work begins ([`Recheck::still_permitted`]), and a request
/// they no longer permit is refused as if it had come after the revoke (PROTOCOL.md
/// §5.11: a change applies to the next request of every connection at once). A
/// computation already running finishes, as one racing a `disable` does.
struct Permit<'a> {
    caller: &'a Caller,
    need: Need,
    /// The key as authorized: its tag once resolved, else as named.
    key: Option<String>,
    /// The key as the caller named it, for the refusal's message.
    named: Option<String>,
    action: Option<Action>,
    daemon_uid: u32,
}

/// How a call's work stands with grant changes: a change that needs a manager's role
/// is done under the grants that permitted it, a grant change alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Reads, and calls by anyone's role: checked again where the work begins, and a
    /// computation already running when a revoke lands finishes.
    Open,
    /// A change needing a manager's role ([`Engine::grants_in_force`]).
    InForce,
    /// `grant` and `revoke` ([`Engine::grants_changing`]).
    Changing,
}

impl Permit<'_> {
    fn gate(&self) -> Gate {
        match (self.action, self.need) {
            (Some(Action::Grant | Action::Revoke), _) => Gate::Changing,
            (_, Need::Manage | Need::Admin) => Gate::InForce,
            _ => Gate::Open,
        }
    }

    /// What the thread that begins the work checks.
    fn recheck(&self) -> Recheck {
        // A manager by identity (root, the daemon's account) holds no grant to lose, and
        // a request that needs only a connection needs none.
        let exempt =
            self.need == Need::Connected || authz::is_superuser(self.caller, self.daemon_uid);
        Recheck {
            caller: (!exempt).then(|| self.caller.clone()),
            need: self.need,
            key: self.key.clone(),
            named: self.named.clone(),
            action: self.action,
            daemon_uid: self.daemon_uid,
        }
    }
}

/// A [`Permit`] carried to the thread that begins the work.
struct Recheck {
    /// `None` when nothing is to be checked again.
    caller: Option<Caller>,
    need: Need,
    key: Option<String>,
    named: Option<String>,
    action: Option<Action>,
    daemon_uid: u32,
}

impl Recheck {
    /// `Ok` if the caller's roles still permit the request; else its refusal, recorded
    /// in the key's history as any refusal is.
    fn still_permitted(&self, engine: &Engine) -> Result<(), EngineError> {
        let Some(caller) = &self.caller else {
            return Ok(());
        };
        let key = self.key.as_deref();
        if permitted(engine, self.daemon_uid, caller, self.need, key).is_some() {
            return Ok(());
        }
        if let (Some(key), Some(action)) = (key, self.action) {
            drop(engine.record_refusal(caller, key, action, ErrorKind::PermissionDenied));
        }
        let named = self.named.as_deref().or(key);
        Err(EngineError::PermissionDenied(denial(
            engine, caller, self.need, named,
        )))
    }
}

/// What a request that needs `need` needs on this key. A purged key's metadata and
/// history are the managers' (SPEC §3: `list --deleted`): a role to view or review all
/// keys does not reach the keys purged. (A crypto call on one is refused by its state.)
fn need_on(need: Need, key: Option<&crate::engine::KeyEntry>) -> Need {
    let purged = key.is_some_and(|e| e.rec.state == kms_shared::model::KeyState::Deleted);
    match need {
        Need::View | Need::Review if purged => Need::Admin,
        other => other,
    }
}

/// The reply to a call started by [`Service::start`], its refusal logged as
/// [`Service::handle`] logs one.
fn logged(kind: &'static str, caller: &Caller, result: Result<Response, EngineError>) -> Reply {
    let reply = result.map_err(wire);
    if let Err(e) = &reply {
        tracing::debug!(request = kind, account = %caller.account, error = %e.kind, "refused");
    }
    reply
}

/// Polls `fut` now and then on whichever thread wakes it, until it completes: no executor
/// and no thread of its own. For futures whose wake-ups come from cheap events (here, the
/// store writer answering a submission), so that what follows the event runs right there.
pub(crate) fn complete_on_wake(fut: impl Future<Output = ()> + Send + 'static) {
    struct Task {
        fut: Mutex<Option<Pin<Box<dyn Future<Output = ()> + Send>>>>,
    }
    impl Task {
        fn poll(self: &Arc<Self>) {
            let waker = Waker::from(self.clone());
            let mut slot = self.fut.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(f) = slot.as_mut()
                && f.as_mut().poll(&mut Context::from_waker(&waker)).is_ready()
            {
                *slot = None;
            }
        }
    }
    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.poll();
        }
    }
    Arc::new(Task {
        fut: Mutex::new(Some(Box::pin(fut))),
    })
    .poll();
}

pub(crate) fn wire(e: EngineError) -> WireError {
    // A failing disk fails every call the same way: one line a second says so. Another
    // failure (a wrapped key that does not open under the root key) is logged at once.
    static LOGGED: LogAtMostEvery = LogAtMostEvery::new(std::time::Duration::from_secs(1));
    if e.kind() == ErrorKind::Internal
        && let Some(skipped) = LOGGED.due_for(&e.to_string())
    {
        tracing::error!(error = %e, skipped, "internal error");
    }
    e.to_wire()
}

/// The largest AES call (plaintext bytes) a connection's reader runs itself
/// ([`Service::start`]). A 1 KiB call costs about a microsecond, less than the task
/// it would otherwise be spawned as; a 32 KiB call costs tens, and run one after another
/// on the reader, a pipelining client's calls used one core where tasks use all of them
/// (1 × 32 decrypt 32 KiB: 7,406 -> 5,948/s, medians of 3 side by side).
const ON_READER_MAX: usize = 4 * 1024;

/// Upper estimates of reply sizes ([`Service::reply_estimate`]), generous on purpose: a
/// key's entry with a 256-byte memo and a PEM public key, a history entry with its account,
/// program and error message, a batch item's ciphertext or error beside what the request
/// already brought, a grant.
const REPLY_BYTES_PER_KEY: usize = 1024;
const REPLY_BYTES_PER_HISTORY_ENTRY: usize = 512;
const REPLY_BYTES_PER_ITEM: usize = 512;
const REPLY_BYTES_PER_GRANT: usize = 256;

/// Items of crypto work one account may have queued or running on the pool at once: two
/// full batches (RSA: ~0.9 s of both threads), far more than its single calls need (one
/// each) however many connections make them.
const POOL_SHARE: usize = 2 * MAX_BATCH_ITEMS;

/// The name of the token pool's threads, before their number.
const TOKEN_THREAD: &str = "kmsd-token-";

/// Counts a call on the thread it runs on, if that is a token pool thread.
fn count_token_thread(counted: &AtomicU64) {
    if std::thread::current()
        .name()
        .is_some_and(|n| n.starts_with(TOKEN_THREAD))
    {
        counted.fetch_add(1, Ordering::Relaxed);
    }
}

/// Threads for calls of keys in PKCS#11 tokens: as many as one token has sessions, so that a token's calls go on in parallel as far as it allows. They
/// spend most of their time waiting on the token, so they take no core from the crypto
/// pool while a token is slow; with a token as fast as SoftHSM they share the cores.
const TOKEN_THREADS: usize = crate::hsm::token::SESSIONS;

/// Per-account budgets: of pool work, and of history scans (one at a time). The pool
/// itself is first come, first served; without a budget one account with many large
/// batches in flight would put minutes of work ahead of every other account's signature.
struct PoolShares {
    per_account: usize,
    accounts: Mutex<std::collections::HashMap<u32, Arc<tokio::sync::Semaphore>>>,
    /// Tests: calls in [`PoolShares::acquire`].
    #[cfg(test)]
    waiting: std::sync::atomic::AtomicUsize,
}

impl PoolShares {
    fn new(per_account: usize) -> Self {
        PoolShares {
            per_account,
            accounts: Mutex::default(),
            #[cfg(test)]
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// One item of `uid`'s share if it has room now; `None` if it must wait.
    fn try_acquire(&self, uid: u32, work: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let n = u32::try_from(work.clamp(1, self.per_account)).unwrap_or(u32::MAX);
        self.budget(uid).try_acquire_many_owned(n).ok()
    }

    fn budget(&self, uid: u32) -> Arc<tokio::sync::Semaphore> {
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        accounts
            .entry(uid)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.per_account)))
            .clone()
    }

    /// Waits until `uid` may add `work` items (at most its whole share) to the pool; the
    /// permit gives them back when dropped. (`None` only if the budget were closed, which
    /// nothing does: the work then goes ahead unbudgeted.)
    async fn acquire(&self, uid: u32, work: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let n = u32::try_from(work.clamp(1, self.per_account)).unwrap_or(u32::MAX);
        #[cfg(test)]
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let permit = self.budget(uid).acquire_many_owned(n).await.ok();
        #[cfg(test)]
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        permit
    }
}

/// Stack overwritten on a pool thread after each call (32 KiB, ~1 µs beside a signature's
/// 60–300 µs): an ECDSA signature leaves its nonce there, which with the signature gives
/// away the private key (`signing_nonces_and_rsa_plaintexts_leave_no_copy_in_daemon_memory`,
/// tests/tests/secrets.rs). Four times the AES wipe, because how deep aws-lc's RSA or a
/// PKCS#11 module goes is not known here.
const POOL_STACK_WORDS: usize = 4096;

fn join_error(e: tokio::task::JoinError) -> WireError {
    tracing::error!(error = %e, "request task failed");
    WireError::new(ErrorKind::Internal, "the request could not be completed")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::complete_on_wake;
    use std::sync::mpsc;
    use std::time::Duration;

    /// An account that holds its whole share waits for more; another account does not;
    /// the share comes back when the permit is dropped.
    #[tokio::test]
    async fn pool_shares_are_per_account() {
        let shares = std::sync::Arc::new(super::PoolShares::new(10));
        let big = shares.acquire(1, 1_000).await.unwrap();
        assert_eq!(
            big.num_permits(),
            10,
            "work beyond the share takes the whole share"
        );
        let s = shares.clone();
        let waiting = tokio::spawn(async move { s.acquire(1, 1).await.map(|p| p.num_permits()) });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "account 1 is over its share");
        assert_eq!(shares.acquire(2, 3).await.unwrap().num_permits(), 3);
        drop(big);
        assert_eq!(waiting.await.unwrap(), Some(1));
    }

    /// Work the caller's roles permitted when it was read, but which waited — for the
    /// account's share of the crypto pool, for its turn at a history scan — is refused
    /// once a revoke was acknowledged meanwhile, and the refusal is recorded. Before, it
    /// ran: a revoked account's queued batches went on decrypting for as long as it had
    /// queued them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revoke_reaches_work_that_waited_its_turn() {
        use kms_shared::model::{Action, Role};
        use kms_shared::protocol::{ErrorKind, HistoryQuery, PlaintextItem, Request};
        use tokio::task::block_in_place as blocking;
        let (_dir, engine, admin, user) = engine_with_a_user();
        let grant = grant_to_nobody;
        use std::sync::Arc;
        for role in [Role::KeyUser, Role::KeyReviewer] {
            blocking(|| engine.grant(&admin, &grant(role)).unwrap());
        }
        let service = Arc::new(
            super::Service::new(engine.clone(), "s".into(), "d".into(), 64, 64 << 20).unwrap(),
        );
        let batch = || Request::EncryptBatch {
            key: "shared".into(),
            items: vec![
                PlaintextItem {
                    plaintext: b"x".to_vec().into(),
                    context: None,
                };
                4
            ],
        };
        assert!(service.handle(&user, batch()).await.is_ok());

        // The account's whole share and its scan turn are taken: its next batch and its
        // next history read wait, both already authorized.
        let share = service
            .pool_shares
            .acquire(user.uid, super::POOL_SHARE)
            .await;
        let turn = service.scan_turns.acquire(user.uid, 1).await;
        let (s, u) = (service.clone(), user.clone());
        let waiting_batch = tokio::spawn(async move { s.handle(&u, batch()).await });
        let (s, u) = (service.clone(), user.clone());
        let waiting_history = tokio::spawn(async move {
            let query = HistoryQuery {
                key: "shared".into(),
                ..Default::default()
            };
            s.handle(&u, Request::History(query)).await
        });
        let waiting =
            |shares: &super::PoolShares| shares.waiting.load(std::sync::atomic::Ordering::SeqCst);
        until("both wait for their turns", || {
            waiting(&service.pool_shares) == 1 && waiting(&service.scan_turns) == 1
        })
        .await;
        assert!(!waiting_batch.is_finished() && !waiting_history.is_finished());
        for role in [Role::KeyUser, Role::KeyReviewer] {
            blocking(|| engine.revoke(&admin, &grant(role)).unwrap());
        }
        drop((share, turn));
        for waited in [waiting_batch.await.unwrap(), waiting_history.await.unwrap()] {
            match waited {
                Err(e) => assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e}"),
                Ok(r) => panic!("answered after the revoke: {r:?}"),
            }
        }
        let refusals = blocking(|| {
            engine.history(&HistoryQuery {
                key: "shared".into(),
                action: Some(Action::Encrypt),
                ..Default::default()
            })
        })
        .unwrap();
        assert_eq!(refusals[0].result, "permission-denied", "{refusals:?}");
    }

    /// An engine on a fresh store with one AES key, `shared`; root, and `nobody` (an
    /// account that exists here, as grants name accounts) with no role yet.
    fn engine_with_a_user() -> (
        tempfile::TempDir,
        std::sync::Arc<crate::engine::Engine>,
        crate::engine::Caller,
        crate::engine::Caller,
    ) {
        use crate::engine::Caller;
        use kms_shared::model::KeyType;
        use kms_shared::protocol::CreateKey;
        let clock = std::sync::Arc::new(crate::clock::ManualClock::new(1_700_000_000_000));
        let (dir, engine, admin) = crate::test_support::engine_on(clock);
        let user = Caller {
            uid: 65534,
            gid: 65534,
            account: "nobody".into(),
            ..admin.clone()
        };
        tokio::task::block_in_place(|| {
            engine
                .create_key(&admin, &CreateKey::new("shared", KeyType::Aes256))
                .unwrap()
        });
        (dir, engine, admin, user)
    }

    /// A small AES call runs on the reactor only once its key's versions are in memory:
    /// the first call after a start reads them from the store, which may wait out a
    /// recovery of the store (seconds, with every connection of that reactor thread
    /// waiting too), so it runs on the pool.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_keys_first_call_after_a_start_is_not_run_on_the_reactor() {
        use kms_shared::model::KeyType;
        use kms_shared::protocol::{CreateKey, Request};
        use tokio::task::block_in_place as blocking;
        let clock = std::sync::Arc::new(crate::clock::ManualClock::new(1_700_000_000_000));
        let (dir, engine, admin) = crate::test_support::engine_on(clock.clone());
        blocking(|| {
            engine
                .create_key(&admin, &CreateKey::new("fresh", KeyType::Aes256))
                .unwrap()
        });
        let Ok(engine) = std::sync::Arc::try_unwrap(engine) else {
            panic!("the engine is shared")
        };
        blocking(|| drop(engine.close()));
        let root = crate::crypto::RootKey::from_bytes([0x44; 32]);
        let store =
            crate::store::Store::open(&dir.path().join("kms.redb"), &root.fingerprint()).unwrap();
        let engine = std::sync::Arc::new(
            crate::engine::Engine::open(store, root, clock, Default::default()).unwrap(),
        );
        let service =
            super::Service::new(engine.clone(), "s".into(), "d".into(), 64, 64 << 20).unwrap();
        let encrypt = Request::Encrypt {
            key: "fresh".into(),
            plaintext: b"x".to_vec().into(),
            context: None,
        };
        assert!(!service.runs_inline(&encrypt), "versions not read yet");
        blocking(|| engine.versions("fresh").unwrap());
        assert!(service.runs_inline(&encrypt), "versions in memory");
    }

    /// Waits until `reached` (a point a spawned call has got to), for at most 30 s.
    async fn until(what: &str, reached: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !reached() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    fn grant_to_nobody(role: kms_shared::model::Role) -> kms_shared::protocol::GrantSpec {
        kms_shared::protocol::GrantSpec {
            role,
            user: Some("nobody".into()),
            group: None,
            key: Some("shared".into()),
        }
    }

    /// A manager's change that passed its check while a revoke of that manager held the
    /// key's locks used to run once the revoke was acknowledged: a `grant` of the revoked
    /// role among them, which gave it back. Now a change is checked and done with no
    /// grant change in between, so it is refused against the grants as revoked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_waiting_behind_a_revoke_is_checked_against_it() {
        use kms_shared::model::{Principal, Role};
        use kms_shared::protocol::{ErrorKind, Request};
        use std::sync::Arc;
        use tokio::task::block_in_place as blocking;
        let (_dir, engine, admin, user) = engine_with_a_user();
        blocking(|| {
            engine
                .grant(&admin, &grant_to_nobody(Role::Manager))
                .unwrap()
        });
        let service = Arc::new(
            super::Service::new(engine.clone(), "s".into(), "d".into(), 64, 64 << 20).unwrap(),
        );

        // The revoke takes its locks and waits on its commit (a slow disk).
        engine.hold_commits(true);
        let (s, a) = (service.clone(), admin.clone());
        let revoke = tokio::spawn(async move {
            s.handle(&a, Request::Revoke(grant_to_nobody(Role::Manager)))
                .await
        });
        until("the revoke holds the gate", || engine.gate_state().0).await;
        // Meanwhile the manager grants itself the role again, and rotates.
        let (s, u) = (service.clone(), user.clone());
        let regrant = tokio::spawn(async move {
            s.handle(&u, Request::Grant(grant_to_nobody(Role::Manager)))
                .await
        });
        let (s, u) = (service.clone(), user.clone());
        let rotate = tokio::spawn(async move {
            s.handle(
                &u,
                Request::Rotate {
                    key: "shared".into(),
                },
            )
            .await
        });
        until("both wait at the gate", || engine.gate_state() == (true, 2)).await;
        engine.hold_commits(false);
        revoke.await.unwrap().unwrap();
        for (what, waited) in [
            ("grant", regrant.await.unwrap()),
            ("rotate", rotate.await.unwrap()),
        ] {
            match waited {
                Err(e) => assert_eq!(e.kind, ErrorKind::PermissionDenied, "{what}: {e}"),
                Ok(r) => panic!("{what} answered after the revoke: {r:?}"),
            }
        }
        assert!(
            !engine
                .grants()
                .iter()
                .any(|g| g.principal == Principal::User("nobody".into())),
            "{:?}",
            engine.grants()
        );
        assert_eq!(engine.get_key("shared").unwrap().current_version, 1);
    }

    /// A backup whose caller is no longer permitted once its copy is made (a revoke that
    /// landed during the copy) answers the refusal, not the first chunk, and leaves no
    /// snapshot behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backup_refused_after_its_copy_leaves_nothing() {
        use kms_shared::protocol::{ErrorKind, WireError};
        let (dir, engine, admin, _) = engine_with_a_user();
        let backups = crate::backup::Backups::default();
        let refused = backups
            .start(&engine, dir.path(), &admin, || {
                Err(WireError::new(ErrorKind::PermissionDenied, "revoked"))
            })
            .await;
        assert_eq!(refused.unwrap_err().kind, ErrorKind::PermissionDenied);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("backup-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // A permitted one answers its first chunk.
        let first = backups.start(&engine, dir.path(), &admin, || Ok(())).await;
        assert!(
            matches!(
                first,
                Ok(kms_shared::protocol::Response::BackupChunk { .. })
            ),
            "{first:?}"
        );
    }

    /// A refusal does not tell an account with no role whether a tag is a purged key's:
    /// it read "needs the role manager" for a purged tag, and named every role for a live
    /// or unknown one. An account with a role on all keys is still told a manager's is
    /// needed there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_does_not_tell_a_purged_tag_from_an_unknown_one() {
        use kms_shared::model::Role;
        use kms_shared::protocol::{ErrorKind, Request};
        use tokio::task::block_in_place as blocking;
        let (_dir, engine, admin, user) = engine_with_a_user();
        let tag = engine.get_key("shared").unwrap().tag;
        blocking(|| {
            engine.request_deletion(&admin, "shared").unwrap();
            engine.delete_now(&admin, "shared").unwrap()
        });
        let service =
            super::Service::new(engine.clone(), "s".into(), "d".into(), 64, 64 << 20).unwrap();
        let refusal = |key: String| {
            let (service, user) = (&service, &user);
            async move {
                let e = service
                    .handle(user, Request::GetKey { key: key.clone() })
                    .await
                    .unwrap_err();
                assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e}");
                e.message.replace(&key, "KEY")
            }
        };
        let unknown = "0123456789abcdef0123456789abcdef".to_string();
        assert_eq!(refusal(tag.clone()).await, refusal(unknown).await);

        let on_all_keys = kms_shared::protocol::GrantSpec {
            key: None,
            ..grant_to_nobody(Role::KeyUser)
        };
        blocking(|| engine.grant(&admin, &on_all_keys).unwrap());
        let told = refusal(tag).await;
        assert!(told.contains("needs the role manager on"), "{told}");
    }

    /// Only a subscriber that sees every event is told how many were dropped for it
    /// (their number counts every key's): root, or a role on all keys; not a role on one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_who_sees_every_event_is_told_how_many_were_dropped() {
        use kms_shared::model::Role;
        use tokio::task::block_in_place as blocking;
        let (_dir, engine, admin, user) = engine_with_a_user();
        let service =
            super::Service::new(engine.clone(), "s".into(), "d".into(), 64, 64 << 20).unwrap();
        assert!(service.sees_every_event(&admin));
        blocking(|| {
            engine
                .grant(&admin, &grant_to_nobody(Role::KeyUser))
                .unwrap()
        });
        assert!(!service.sees_every_event(&user));
        let on_all_keys = kms_shared::protocol::GrantSpec {
            key: None,
            ..grant_to_nobody(Role::KeyReviewer)
        };
        blocking(|| engine.grant(&admin, &on_all_keys).unwrap());
        assert!(service.sees_every_event(&user));
    }

    /// The future finishes on the thread that wakes it, with the value sent there.
    #[test]
    fn completes_when_woken_from_another_thread() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let (out_tx, out_rx) = mpsc::channel();
        complete_on_wake(async move {
            let _ = out_tx.send((rx.await, std::thread::current().name().map(String::from)));
        });
        assert!(out_rx.try_recv().is_err(), "nothing to complete with yet");
        std::thread::Builder::new()
            .name("waker".into())
            .spawn(move || tx.send(7).unwrap())
            .unwrap()
            .join()
            .unwrap();
        let (value, thread) = out_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(value, Ok(7));
        assert_eq!(thread.as_deref(), Some("waker"));
    }

    /// A sender that goes away still completes the future (with the error), and one that
    /// is ready at once completes on the spot.
    #[test]
    fn completes_on_drop_and_when_ready_at_once() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let (out_tx, out_rx) = mpsc::channel();
        complete_on_wake(async move {
            let _ = out_tx.send(rx.await.is_err());
        });
        drop(tx);
        assert!(out_rx.recv_timeout(Duration::from_secs(5)).unwrap());
        let (out_tx, out_rx) = mpsc::channel();
        complete_on_wake(async move {
            let _ = out_tx.send(1);
        });
        assert_eq!(out_rx.try_recv(), Ok(1));
    }
}
