//! What is kept in the store, one record type per table.
//!
//! Records are MessagePack (rmp-serde). Every field added later must carry
//! `#[serde(default)]` so that a newer daemon reads an older store (SPEC §9); the tests
//! keep an encoded record of each schema version to prove it.

use kms_shared::model::{Action, KeyState, KeyType, Protection, UnixMillis};
use serde::{Deserialize, Serialize};

/// A key's metadata: everything but its material and counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub tag: String,
    pub name: String,
    pub key_type: KeyType,
    pub protection: Protection,
    #[serde(default)]
    pub hsm: Option<String>,
    pub state: KeyState,
    pub convergent: bool,
    pub current_version: u32,
    pub auto_rotation: bool,
    pub rotation_days: u32,
    /// The point the auto-rotation period counts from: the last automatic rotation, or
    /// when auto rotation was switched on. `None` while auto rotation is off.
    pub rotation_anchor: Option<UnixMillis>,
    /// Set when the version limit stopped auto rotation (an event asked for a new key).
    #[serde(default)]
    pub rotation_stopped: bool,
    /// Set by the purge of an HSM key until its token objects are destroyed: the purge is
    /// committed first and the objects destroyed after it, retried by the scheduler
    /// (`DueKind::DestroyObjects`) while the token cannot be reached. Until then the
    /// versions keep their references (never used again), so nothing is forgotten.
    #[serde(default)]
    pub token_objects_left: bool,
    /// The key's slot in the key slot file (`store::key_slots`, store schema 3): its
    /// versions are wrapped under a key derived from the root key and that slot's secret,
    /// which a purge wipes. `None` for `hsm`/`dedicated-hsm` keys, once purged, and in a
    /// store not yet upgraded to schema 3.
    #[serde(default)]
    pub slot: Option<u64>,
    pub created_at: UnixMillis,
    pub deletion_due_at: Option<UnixMillis>,
    pub deleted_at: Option<UnixMillis>,
    pub memo: String,
}

impl KeyRecord {
    /// When the next automatic rotation is due, if one is scheduled.
    pub fn next_rotation_at(&self) -> Option<UnixMillis> {
        if !self.auto_rotation || self.rotation_stopped || self.state == KeyState::Deleted {
            return None;
        }
        self.rotation_anchor
            .map(|a| a.saturating_add(i64::from(self.rotation_days) * kms_shared::model::DAY_MS))
    }
}

/// One version: its flag and its wrapped material (gone once the key is purged).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub created_at: UnixMillis,
    pub enabled: bool,
    /// AES-256-GCM under the key's own wrapping key (`RootKey::key_wrapper`: the root key
    /// and the key's slot secret; under the root key alone before schema 3), AAD = key tag,
    /// version and type (`engine::wrap_aad`; tag and version only in a store of schema
    /// 1). `None` after purge.
    /// For `hsm` and `dedicated-hsm` keys: only a reference to the token objects
    /// (`hsm::HsmRef`); the material never leaves the token.
    #[serde(with = "kms_shared::protocol::opt_bytes")]
    pub wrapped: Option<Vec<u8>>,
}

// Not derived: even wrapped material has no business in a log line.
impl std::fmt::Debug for VersionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionRecord")
            .field("created_at", &self.created_at)
            .field("enabled", &self.enabled)
            .field("wrapped", &self.wrapped.as_ref().map(|_| "<wrapped>"))
            .finish()
    }
}

/// A dedicated HSM token a manager registered (SPEC §9): where it is and the path of its
/// PIN file. The PIN itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HsmTokenRecord {
    pub name: String,
    /// Absolute path of the PKCS#11 module.
    pub module: String,
    /// The token's label.
    pub token: String,
    pub pin_file: String,
    pub added_at: UnixMillis,
    pub added_by: String,
    /// The account (uid) that must own the PIN file, when a manager other than root or
    /// kmsd's own account registered the token: kmsd reads the file with its own rights,
    /// and must not read, for such a manager, a file that manager could not (the root
    /// key, say). Absent in records written before the rule existed.
    #[serde(default)]
    pub pin_owner: Option<u32>,
}

/// Usage of a key: successful crypto calls and the last of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub count: u64,
    pub last_used_at: Option<UnixMillis>,
    pub last_used_by: Option<String>,
}

/// One history entry as stored; the key tag and sequence number are the table key.
/// Encoded as a MessagePack array (not a map): millions of these are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    pub time: UnixMillis,
    pub action: Action,
    pub version: Option<u32>,
    /// `ok` or the error kind.
    pub result: String,
    pub account: String,
    pub uid: u32,
    pub pid: u32,
    pub client: String,
    /// Items of the call: 1, or the item count of a batch (one entry per call, SPEC §7).
    /// Absent in entries written before batches were recorded as one call.
    #[serde(default = "one")]
    pub items: u32,
    /// How many of those items failed (1 for a refused single call).
    #[serde(default)]
    pub failed: u32,
}

fn one() -> u32 {
    1
}

impl HistoryRecord {
    /// Items that succeeded: what the usage count and the impact query count.
    pub fn succeeded(&self) -> u64 {
        // An entry written before the counts existed has `failed` 0 even when refused.
        if self.failed == 0 && self.result != "ok" {
            return 0;
        }
        u64::from(self.items.saturating_sub(self.failed))
    }
}

/// What a due-index entry asks the scheduler to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DueKind {
    Rotation = 1,
    Deletion = 2,
    /// End of the retention of a purged key's metadata and history.
    Expiry = 3,
    /// The token objects of a purged HSM key are still to be destroyed.
    DestroyObjects = 4,
}

impl DueKind {
    pub fn from_u8(v: u8) -> Option<DueKind> {
        match v {
            1 => Some(DueKind::Rotation),
            2 => Some(DueKind::Deletion),
            3 => Some(DueKind::Expiry),
            4 => Some(DueKind::DestroyObjects),
            _ => None,
        }
    }
}

/// Encodes a record as a MessagePack map (records evolve by adding named fields).
pub fn encode_map<T: Serialize>(v: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(v)
}

/// Encodes a record as a MessagePack array (compact; for history).
pub fn encode_array<T: Serialize>(v: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec(v)
}

/// Decodes a record, its nesting bounded (`kms_shared::codec::MAX_DEPTH`): a damaged
/// store must be refused as corrupt, not overflow the stack of the thread reading it.
pub fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, rmp_serde::decode::Error> {
    kms_shared::codec::decode_bounded(b)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// History written before batches carried counts (eight fields) still reads, as one
    /// call of one item with no failed item.
    #[test]
    fn history_without_counts_reads_as_one_item() {
        let old = (
            5i64,
            Action::Encrypt,
            Some(2u32),
            "ok",
            "alice",
            1000u32,
            42u32,
            "app",
        );
        let bytes = encode_array(&old).unwrap();
        let rec: HistoryRecord = decode(&bytes).unwrap();
        assert_eq!((rec.items, rec.failed, rec.succeeded()), (1, 0, 1));
        assert_eq!(rec.client, "app");
        let new = HistoryRecord {
            items: 9,
            failed: 2,
            ..rec
        };
        let back: HistoryRecord = decode(&encode_array(&new).unwrap()).unwrap();
        assert_eq!(back, new);
        assert_eq!(back.succeeded(), 7);
        let refused = (
            5i64,
            Action::Encrypt,
            None::<u32>,
            "invalid-state",
            "a",
            0u32,
            0u32,
            "c",
        );
        let rec: HistoryRecord = decode(&encode_array(&refused).unwrap()).unwrap();
        assert_eq!(rec.succeeded(), 0);
    }
}
