//! The messages of the kms IPC protocol (see `shared/PROTOCOL.md` for the wire format).
//!
//! Every frame from a client is a [`ClientFrame`]: a request id chosen by the client and one
//! [`Request`]. Every frame from the daemon is a [`ServerFrame`]: either the reply to one
//! request (matched by id; replies may come in any order) or, after a `subscribe`, an
//! [`Event`]. Enums are externally tagged, so a request is a one-entry map
//! `{"encrypt": {...}}` and unit variants are plain strings such as `"status"`.

use crate::model::{
    Action, GrantInfo, HistoryEntry, Impact, KeyInfo, KeyState, KeyType, Protection, Role,
    SignScheme, UnixMillis, VersionInfo,
};
pub use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The protocol version this build speaks. A daemon refuses a different major version.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest frame body accepted by default (SPEC §10).
pub const DEFAULT_MAX_FRAME: u32 = 1024 * 1024;

/// A request with the id its reply will carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientFrame {
    pub id: u64,
    pub request: Request,
}

/// What the daemon sends: replies and, to subscribers, events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerFrame {
    Reply {
        id: u64,
        result: Outcome,
    },
    Event(Event),
    /// A subscriber fell behind and `missed` events were dropped for it (0: the daemon
    /// does not say how many, to a subscriber that does not see every key); re-read state.
    Lagged {
        missed: u64,
    },
}

/// The result of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok(Response),
    Err(WireError),
}

impl From<Result<Response, WireError>> for Outcome {
    fn from(r: Result<Response, WireError>) -> Self {
        match r {
            Ok(v) => Outcome::Ok(v),
            Err(e) => Outcome::Err(e),
        }
    }
}

impl From<Outcome> for Result<Response, WireError> {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Ok(v) => Ok(v),
            Outcome::Err(e) => Err(e),
        }
    }
}

/// Every request a client can make. Where a `key` field appears, it is a tag or a name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Must be the first request on a connection.
    Hello {
        protocol: u32,
        /// The client's own name for itself. The daemon does not use it: history and
        /// logs name the process from the kernel (`/proc/PID/comm` of the peer), which
        /// the client cannot choose.
        #[serde(default)]
        client: String,
    },
    Status,
    CreateKey(CreateKey),
    ListKeys {
        #[serde(default)]
        deleted: bool,
        #[serde(default)]
        offset: u32,
        /// At most this many keys (default: all).
        #[serde(default)]
        limit: Option<u32>,
    },
    GetKey {
        key: String,
    },
    ListVersions {
        key: String,
    },
    Encrypt {
        key: String,
        plaintext: Secret,
        #[serde(default, with = "opt_bytes")]
        context: Option<Vec<u8>>,
    },
    Decrypt {
        key: String,
        ciphertext: String,
        #[serde(default, with = "opt_bytes")]
        context: Option<Vec<u8>>,
    },
    Reencrypt {
        key: String,
        ciphertext: String,
        #[serde(default, with = "opt_bytes")]
        context: Option<Vec<u8>>,
    },
    /// Many encryptions under one key in one frame; per-item results.
    EncryptBatch {
        key: String,
        items: Vec<PlaintextItem>,
    },
    DecryptBatch {
        key: String,
        items: Vec<CiphertextItem>,
    },
    ReencryptBatch {
        key: String,
        items: Vec<CiphertextItem>,
    },
    Sign {
        key: String,
        #[serde(with = "serde_bytes")]
        message: Vec<u8>,
        #[serde(default)]
        scheme: SignScheme,
    },
    Verify {
        key: String,
        #[serde(with = "serde_bytes")]
        message: Vec<u8>,
        signature: String,
        #[serde(default)]
        scheme: SignScheme,
    },
    PublicKey {
        key: String,
        #[serde(default)]
        version: Option<u32>,
    },
    DataKey {
        key: String,
        /// 128, 256 or 512.
        bits: u32,
        /// Also return the data key in plaintext.
        #[serde(default)]
        plaintext: bool,
        #[serde(default, with = "opt_bytes")]
        context: Option<Vec<u8>>,
    },
    Rotate {
        key: String,
    },
    Enable {
        key: String,
    },
    Disable {
        key: String,
    },
    EnableVersion {
        key: String,
        version: u32,
    },
    DisableVersion {
        key: String,
        version: u32,
    },
    SetRotation {
        key: String,
        auto_rotation: bool,
        #[serde(default)]
        rotation_days: Option<u32>,
    },
    SetMemo {
        key: String,
        memo: String,
    },
    /// Request deletion: the key waits in `pending-deletion` for the deletion delay.
    RequestDeletion {
        key: String,
    },
    CancelDeletion {
        key: String,
    },
    DeleteNow {
        key: String,
    },
    History(HistoryQuery),
    /// Recent usage and the distinct accounts that used a key (the warnings before a
    /// destructive action).
    Impact {
        key: String,
        /// Window length in milliseconds (default: 30 days).
        #[serde(default)]
        window_ms: Option<i64>,
    },
    /// From now on, events are sent on this connection as `event` frames (only for keys
    /// the caller may see).
    Subscribe,
    /// Grants a role (managers only). Exactly one of `user` and `group`.
    Grant(GrantSpec),
    /// Removes the grant matching the same fields.
    Revoke(GrantSpec),
    ListGrants,
    /// Starts an online backup (managers only): the daemon snapshots the whole store in
    /// one read transaction (key material still wrapped under the root key) and answers
    /// its first `backup_chunk`.
    Backup,
    /// The next chunk of a backup snapshot: `offset` = bytes received so far.
    BackupRead {
        snapshot: String,
        offset: u64,
    },
    /// Registers a PKCS#11 token for `dedicated-hsm` keys (managers only). The daemon
    /// loads the module, finds the token by label and logs in with the PIN read from
    /// `pin_file` before it stores the registration (the file's path, never the PIN).
    HsmAdd {
        name: String,
        /// Absolute path of the PKCS#11 module (owned by root, not group/world-writable).
        module: String,
        /// The token's label.
        token: String,
        /// A file the daemon can read whose first line is the user PIN.
        pin_file: String,
    },
    /// The registered tokens (managers only).
    HsmList,
    /// Forgets a registered token; refused while keys not yet purged live on it.
    HsmRemove {
        name: String,
    },
}

impl Request {
    /// The name of the request kind as it appears on the wire, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Status => "status",
            Request::CreateKey(_) => "create_key",
            Request::ListKeys { .. } => "list_keys",
            Request::GetKey { .. } => "get_key",
            Request::ListVersions { .. } => "list_versions",
            Request::Encrypt { .. } => "encrypt",
            Request::Decrypt { .. } => "decrypt",
            Request::Reencrypt { .. } => "reencrypt",
            Request::EncryptBatch { .. } => "encrypt_batch",
            Request::DecryptBatch { .. } => "decrypt_batch",
            Request::ReencryptBatch { .. } => "reencrypt_batch",
            Request::Sign { .. } => "sign",
            Request::Verify { .. } => "verify",
            Request::PublicKey { .. } => "public_key",
            Request::DataKey { .. } => "data_key",
            Request::Rotate { .. } => "rotate",
            Request::Enable { .. } => "enable",
            Request::Disable { .. } => "disable",
            Request::EnableVersion { .. } => "enable_version",
            Request::DisableVersion { .. } => "disable_version",
            Request::SetRotation { .. } => "set_rotation",
            Request::SetMemo { .. } => "set_memo",
            Request::RequestDeletion { .. } => "request_deletion",
            Request::CancelDeletion { .. } => "cancel_deletion",
            Request::DeleteNow { .. } => "delete_now",
            Request::History(_) => "history",
            Request::Impact { .. } => "impact",
            Request::Subscribe => "subscribe",
            Request::Grant(_) => "grant",
            Request::Revoke(_) => "revoke",
            Request::ListGrants => "list_grants",
            Request::Backup => "backup",
            Request::BackupRead { .. } => "backup_read",
            Request::HsmAdd { .. } => "hsm_add",
            Request::HsmList => "hsm_list",
            Request::HsmRemove { .. } => "hsm_remove",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateKey {
    pub name: String,
    #[serde(rename = "type")]
    pub key_type: KeyType,
    #[serde(default)]
    pub protection: Protection,
    #[serde(default)]
    pub convergent: bool,
    #[serde(default)]
    pub auto_rotation: bool,
    /// Default 90.
    #[serde(default)]
    pub rotation_days: Option<u32>,
    #[serde(default)]
    pub memo: String,
    /// For `dedicated-hsm`: the name of the registered token to create the key on.
    #[serde(default)]
    pub hsm: Option<String>,
}

impl CreateKey {
    /// A key of `key_type` named `name`, every other field as a request that leaves it
    /// out gets it: basic protection, not convergent, no automatic rotation, no memo.
    pub fn new(name: impl Into<String>, key_type: KeyType) -> CreateKey {
        CreateKey {
            name: name.into(),
            key_type,
            protection: Protection::default(),
            convergent: false,
            auto_rotation: false,
            rotation_days: None,
            memo: String::new(),
            hsm: None,
        }
    }
}

/// What a grant or revoke names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantSpec {
    pub role: Role,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    /// A key (tag or name); `None` for all keys.
    #[serde(default)]
    pub key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaintextItem {
    pub plaintext: Secret,
    #[serde(default, with = "opt_bytes")]
    pub context: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CiphertextItem {
    pub ciphertext: String,
    #[serde(default, with = "opt_bytes")]
    pub context: Option<Vec<u8>>,
}

/// Filters of a history query; entries come newest first.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HistoryQuery {
    pub key: String,
    /// Default 100, at most 1000.
    #[serde(default)]
    pub limit: Option<u32>,
    /// Only entries older than this sequence number (the previous page's last `seq`).
    #[serde(default)]
    pub before_seq: Option<u64>,
    #[serde(default)]
    pub action: Option<Action>,
    #[serde(default)]
    pub result: Option<ResultFilter>,
    #[serde(default)]
    pub since: Option<UnixMillis>,
}

/// Entries in one page of history when a query sets no `limit`.
pub const HISTORY_PAGE_DEFAULT: u32 = 100;
/// The most entries one page of history holds (a larger `limit` is clamped to it).
pub const HISTORY_PAGE_MAX: u32 = 1000;

/// Entries in one page of history for a query's `limit`, as the daemon clamps it.
pub fn history_page_limit(asked: Option<u32>) -> usize {
    asked
        .unwrap_or(HISTORY_PAGE_DEFAULT)
        .clamp(1, HISTORY_PAGE_MAX) as usize
}

/// One page of a key's history, newest first, as [`crate::client::Client::history_page`]
/// returns it (the `history` reply).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryPage {
    pub entries: Vec<HistoryEntry>,
    /// Set when the daemon stopped at its bound on entries read per request before it had
    /// `limit` entries: older entries may still match; ask again with this as `before_seq`.
    pub resume_before_seq: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultFilter {
    Ok,
    Error,
}

/// Every successful reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Hello {
        protocol: u32,
        daemon_version: String,
        /// The largest request frame the daemon reads (its `max_frame`): a client sizes
        /// its requests to it. Absent from a daemon before 0.1.x sent it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_frame: Option<u32>,
    },
    Status(DaemonStatus),
    Key(KeyInfo),
    Keys {
        keys: Vec<KeyInfo>,
        /// Keys matching the query, of which `keys` is one page.
        total: u64,
    },
    Versions {
        versions: Vec<VersionInfo>,
    },
    Ciphertext {
        ciphertext: String,
    },
    Plaintext {
        plaintext: Secret,
    },
    Signature {
        signature: String,
    },
    Verified {
        valid: bool,
    },
    PublicKey {
        version: u32,
        pem: String,
    },
    DataKey {
        ciphertext: String,
        #[serde(default)]
        plaintext: Option<Secret>,
        bits: u32,
    },
    /// Per-item results of a batch request, in request order.
    Batch {
        items: Vec<ItemOutcome>,
    },
    History {
        entries: Vec<HistoryEntry>,
        /// Set when the daemon stopped reading at its bound on entries read per request
        /// before it had `limit` entries (PROTOCOL.md §5.7): older entries may still match;
        /// ask again with this as `before_seq`. `entries` may then be short, even empty.
        #[serde(default)]
        resume_before_seq: Option<u64>,
    },
    Impact(Impact),
    Subscribed,
    Grant(GrantInfo),
    Grants {
        grants: Vec<GrantInfo>,
    },
    /// Bytes `offset..offset + data.len()` of a backup snapshot of `total` bytes; read on
    /// with `backup_read` until `done` (the daemon then deletes its copy).
    BackupChunk {
        snapshot: String,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        total: u64,
        done: bool,
    },
    /// A registered token (the answer to `hsm_add` and `hsm_remove`).
    HsmToken(HsmTokenInfo),
    HsmTokens {
        tokens: Vec<HsmTokenInfo>,
    },
}

impl Response {
    /// The variant's name on the wire, e.g. `"data_key"`: for messages about a reply,
    /// which must not format the reply itself (it may carry a plaintext or a data key).
    pub fn kind(&self) -> &'static str {
        match self {
            Response::Hello { .. } => "hello",
            Response::Status(_) => "status",
            Response::Key(_) => "key",
            Response::Keys { .. } => "keys",
            Response::Versions { .. } => "versions",
            Response::Ciphertext { .. } => "ciphertext",
            Response::Plaintext { .. } => "plaintext",
            Response::Signature { .. } => "signature",
            Response::Verified { .. } => "verified",
            Response::PublicKey { .. } => "public_key",
            Response::DataKey { .. } => "data_key",
            Response::Batch { .. } => "batch",
            Response::History { .. } => "history",
            Response::Impact(_) => "impact",
            Response::Subscribed => "subscribed",
            Response::Grant(_) => "grant",
            Response::Grants { .. } => "grants",
            Response::BackupChunk { .. } => "backup_chunk",
            Response::HsmToken(_) => "hsm_token",
            Response::HsmTokens { .. } => "hsm_tokens",
        }
    }
}

/// A PKCS#11 token registered for `dedicated-hsm` keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HsmTokenInfo {
    pub name: String,
    pub module: String,
    /// The token's label.
    pub token: String,
    pub pin_file: String,
    pub added_at: UnixMillis,
    pub added_by: String,
    /// Keys on this token that are not purged.
    #[serde(default)]
    pub keys: u64,
}

/// The result of one item of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemOutcome {
    Ciphertext(String),
    Plaintext(Secret),
    Err(WireError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub daemon_version: String,
    pub protocol: u32,
    pub pid: u32,
    pub uptime_ms: i64,
    pub socket: String,
    pub data_dir: String,
    pub keys: u64,
    pub connections: u64,
    pub next_due_at: Option<UnixMillis>,
}

/// The error kinds of SPEC §10.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    TooLarge,
    InvalidState,
    WrongPurpose,
    VersionDisabled,
    VersionLimit,
    DecryptFailed,
    PermissionDenied,
    MalformedFrame,
    UnsupportedVersion,
    /// Also what a kind this client does not know decodes to (PROTOCOL.md §3: a newer
    /// kmsd may add kinds; the message still says what happened).
    #[serde(other)]
    Internal,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::InvalidArgument,
        ErrorKind::TooLarge,
        ErrorKind::InvalidState,
        ErrorKind::WrongPurpose,
        ErrorKind::VersionDisabled,
        ErrorKind::VersionLimit,
        ErrorKind::DecryptFailed,
        ErrorKind::PermissionDenied,
        ErrorKind::MalformedFrame,
        ErrorKind::UnsupportedVersion,
        ErrorKind::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::AlreadyExists => "already-exists",
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::TooLarge => "too-large",
            ErrorKind::InvalidState => "invalid-state",
            ErrorKind::WrongPurpose => "wrong-purpose",
            ErrorKind::VersionDisabled => "version-disabled",
            ErrorKind::VersionLimit => "version-limit",
            ErrorKind::DecryptFailed => "decrypt-failed",
            ErrorKind::PermissionDenied => "permission-denied",
            ErrorKind::MalformedFrame => "malformed-frame",
            ErrorKind::UnsupportedVersion => "unsupported-version",
            ErrorKind::Internal => "internal",
        }
    }

    /// The exit code kmsctl uses for this kind (documented in the README).
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::NotFound => 3,
            ErrorKind::AlreadyExists => 4,
            ErrorKind::InvalidArgument => 5,
            ErrorKind::TooLarge => 6,
            ErrorKind::InvalidState => 7,
            ErrorKind::WrongPurpose => 8,
            ErrorKind::VersionDisabled => 9,
            ErrorKind::VersionLimit => 10,
            ErrorKind::DecryptFailed => 11,
            ErrorKind::PermissionDenied => 12,
            ErrorKind::MalformedFrame => 13,
            ErrorKind::UnsupportedVersion => 14,
            ErrorKind::Internal => 15,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused or failed request: a kind to act on and a message for people. The message
/// never holds key material, plaintext or other secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct WireError {
    pub kind: ErrorKind,
    pub message: String,
}

impl WireError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        WireError {
            kind,
            message: message.into(),
        }
    }
}

/// What happened, announced to subscribers (SPEC §8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Numbers the events of one subscription: 1, 2, 3, …
    pub seq: u64,
    pub time: UnixMillis,
    pub kind: EventKind,
    pub key_tag: Option<String>,
    pub key_name: Option<String>,
    pub version: Option<u32>,
    /// The key's state after the event, where it has one.
    pub state: Option<KeyState>,
    /// The account that caused it (`kmsd` for the scheduler).
    pub account: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    Created,
    StateChanged,
    Rotated,
    DeletionRequested,
    DeletionCancelled,
    Purged,
    VersionEnabled,
    VersionDisabled,
    SettingsChanged,
    PermissionChanged,
    VersionLimitReached,
    NonceBudgetLow,
    /// A kind this client does not know (a newer kmsd's): kmsd never sends it as such.
    /// The event is kept — its key, its message and its place in the subscription's
    /// numbering — rather than dropped (PROTOCOL.md §3).
    #[serde(other)]
    Other,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::StateChanged => "state-changed",
            EventKind::Rotated => "rotated",
            EventKind::DeletionRequested => "deletion-requested",
            EventKind::DeletionCancelled => "deletion-cancelled",
            EventKind::Purged => "purged",
            EventKind::VersionEnabled => "version-enabled",
            EventKind::VersionDisabled => "version-disabled",
            EventKind::SettingsChanged => "settings-changed",
            EventKind::PermissionChanged => "permission-changed",
            EventKind::VersionLimitReached => "version-limit-reached",
            EventKind::NonceBudgetLow => "nonce-budget-low",
            EventKind::Other => "other",
        }
    }
}

/// `Option<Vec<u8>>` as MessagePack binary (serde_bytes handles only the bare `Vec`).
pub mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(serde_bytes::Bytes::new(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<serde_bytes::ByteBuf>::deserialize(d).map(|o| o.map(|b| b.into_vec()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `Response::kind` is the name the variant has on the wire (the key of its
    /// MessagePack map), for replies with and without fields.
    #[test]
    fn response_kind_is_the_wire_name() {
        let replies = [
            Response::Subscribed,
            Response::DataKey {
                ciphertext: "c".into(),
                plaintext: Some(vec![1, 2, 3].into()),
                bits: 256,
            },
            Response::Plaintext {
                plaintext: vec![9].into(),
            },
            Response::Verified { valid: true },
            Response::Grants { grants: Vec::new() },
        ];
        for r in replies {
            let bytes = crate::codec::encode(&r).unwrap();
            // A unit variant is its name; any other a one-entry map from its name.
            let name = rmp_serde::from_slice::<String>(&bytes).unwrap_or_else(|_| {
                let map: std::collections::BTreeMap<String, serde::de::IgnoredAny> =
                    rmp_serde::from_slice(&bytes).unwrap();
                map.into_keys().next().unwrap()
            });
            assert_eq!(r.kind(), name);
        }
    }

    /// PROTOCOL.md §3: an error kind a newer kmsd added reads as `internal`, its message
    /// kept; the known kinds keep their names both ways.
    #[test]
    fn an_unknown_error_kind_reads_as_internal() {
        #[derive(Serialize)]
        struct Newer {
            kind: &'static str,
            message: &'static str,
        }
        let bytes = crate::codec::encode(&Newer {
            kind: "rate-limited",
            message: "slow down",
        })
        .unwrap();
        let e: WireError = crate::codec::decode(&bytes).unwrap();
        assert_eq!(e, WireError::new(ErrorKind::Internal, "slow down"));
        for kind in ErrorKind::ALL {
            let bytes = crate::codec::encode(&kind).unwrap();
            let back: ErrorKind = crate::codec::decode(&bytes).unwrap();
            assert_eq!(back, kind);
        }
    }
}
