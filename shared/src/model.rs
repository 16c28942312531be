//! The key model shared by the daemon, the dashboard and the CLI: key types, states,
//! protection levels, the records clients see, and the validation rules of SPEC §2.
//!
//! The validation functions live here (and not in the daemon) so that the dashboard's
//! create form checks exactly the rules the daemon enforces.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Milliseconds since the Unix epoch, UTC. Every time on the wire has this type.
pub type UnixMillis = i64;

/// One hour in milliseconds.
pub const HOUR_MS: i64 = 3_600_000;
/// One day in milliseconds.
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// Longest AES plaintext (NCP: 32 KB).
pub const MAX_AES_PLAINTEXT: usize = 32 * 1024;
/// Longest RSA-OAEP plaintext for a 2048-bit key with SHA-256: 256 - 2*32 - 2.
pub const MAX_RSA_PLAINTEXT: usize = 190;
/// Longest message for sign and verify (NCP: 8 KB).
pub const MAX_SIGN_MESSAGE: usize = 8 * 1024;
/// Longest context (NCP's limit).
pub const MAX_CONTEXT: usize = 50;
/// Most versions a `basic` or `dedicated-hsm` key may have.
pub const MAX_VERSIONS: u32 = 100;
/// Most versions an `hsm` key may have (NCP's general HSM).
pub const MAX_VERSIONS_HSM: u32 = 10;
/// Longest memo, in characters.
pub const MAX_MEMO_CHARS: usize = 100;
/// Rotation period bounds and default, in days.
pub const MIN_ROTATION_DAYS: u32 = 1;
pub const MAX_ROTATION_DAYS: u32 = 730;
pub const DEFAULT_ROTATION_DAYS: u32 = 90;
/// Items in one batch request.
pub const MAX_BATCH_ITEMS: usize = 1024;

/// The three key types; each fixes the key's purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    /// AES-256-GCM, encrypt/decrypt.
    Aes256,
    /// ECDSA P-256 with SHA-256, sign/verify.
    Ecdsa,
    /// RSA-2048: OAEP-SHA256 encrypt/decrypt and PSS (or PKCS#1 v1.5) sign/verify.
    Rsa2048,
}

impl KeyType {
    pub const ALL: [KeyType; 3] = [KeyType::Aes256, KeyType::Ecdsa, KeyType::Rsa2048];

    /// The lowercase name used on the wire and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Aes256 => "aes256",
            KeyType::Ecdsa => "ecdsa",
            KeyType::Rsa2048 => "rsa2048",
        }
    }

    /// The name as the console shows it.
    pub fn display_name(self) -> &'static str {
        match self {
            KeyType::Aes256 => "AES256",
            KeyType::Ecdsa => "ECDSA",
            KeyType::Rsa2048 => "RSA2048",
        }
    }

    /// The purpose as the console describes it.
    pub fn purpose(self) -> &'static str {
        match self {
            KeyType::Aes256 => "encrypt/decrypt",
            KeyType::Ecdsa => "sign/verify",
            KeyType::Rsa2048 => "encrypt/decrypt, sign/verify",
        }
    }

    pub fn can_encrypt(self) -> bool {
        matches!(self, KeyType::Aes256 | KeyType::Rsa2048)
    }

    pub fn can_sign(self) -> bool {
        matches!(self, KeyType::Ecdsa | KeyType::Rsa2048)
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.display_name())
    }
}

impl FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "aes256" | "aes-256" | "aes" => Ok(KeyType::Aes256),
            "ecdsa" | "ecdsa-p256" | "p256" => Ok(KeyType::Ecdsa),
            "rsa2048" | "rsa-2048" | "rsa" => Ok(KeyType::Rsa2048),
            _ => Err(format!("unknown key type {s:?} (aes256, ecdsa or rsa2048)")),
        }
    }
}

/// Where a key's material lives (SPEC §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protection {
    /// Software keys wrapped at rest under the root key.
    #[default]
    Basic,
    /// The daemon's PKCS#11 token.
    Hsm,
    /// A PKCS#11 token a manager registered.
    DedicatedHsm,
}

impl Protection {
    pub fn as_str(self) -> &'static str {
        match self {
            Protection::Basic => "basic",
            Protection::Hsm => "hsm",
            Protection::DedicatedHsm => "dedicated-hsm",
        }
    }

    /// The version limit of this protection level.
    pub fn max_versions(self) -> u32 {
        match self {
            Protection::Hsm => MAX_VERSIONS_HSM,
            Protection::Basic | Protection::DedicatedHsm => MAX_VERSIONS,
        }
    }
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "basic" => Ok(Protection::Basic),
            "hsm" => Ok(Protection::Hsm),
            "dedicated-hsm" => Ok(Protection::DedicatedHsm),
            _ => Err(format!(
                "unknown protection {s:?} (basic, hsm or dedicated-hsm)"
            )),
        }
    }
}

/// The lifecycle state of a key (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    Enabled,
    Disabled,
    PendingDeletion,
    /// Purged: material destroyed, metadata and history kept for the retention period.
    Deleted,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "enabled",
            KeyState::Disabled => "disabled",
            KeyState::PendingDeletion => "pending-deletion",
            KeyState::Deleted => "deleted",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// RSA signature scheme. ECDSA keys ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignScheme {
    /// RSASSA-PSS with SHA-256 (salt length 32): the default.
    #[default]
    Pss,
    /// RSASSA-PKCS1-v1_5 with SHA-256, for verifiers that need it.
    Pkcs1,
}

/// What a client sees of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub name: String,
    pub tag: String,
    #[serde(rename = "type")]
    pub key_type: KeyType,
    pub protection: Protection,
    /// For `dedicated-hsm` keys: the registered token's name.
    #[serde(default)]
    pub hsm: Option<String>,
    pub state: KeyState,
    pub convergent: bool,
    pub current_version: u32,
    pub auto_rotation: bool,
    pub rotation_days: u32,
    pub next_rotation_at: Option<UnixMillis>,
    pub usage_count: u64,
    pub last_used_at: Option<UnixMillis>,
    pub last_used_by: Option<String>,
    pub created_at: UnixMillis,
    pub deletion_due_at: Option<UnixMillis>,
    pub deleted_at: Option<UnixMillis>,
    pub memo: String,
}

/// What a client sees of one version of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: u32,
    /// The version's own flag; the key's state applies on top of it.
    pub enabled: bool,
    pub created_at: UnixMillis,
    /// Encryptions made with this version (the AES-GCM nonce budget counts these).
    pub encryptions: u64,
}

/// The action recorded in a history entry: the kmsctl command name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Create,
    Show,
    Versions,
    Encrypt,
    Decrypt,
    Reencrypt,
    Sign,
    Verify,
    PublicKey,
    DataKey,
    Rotate,
    /// A rotation made by the scheduler (or forced by the nonce budget).
    AutoRotate,
    Enable,
    Disable,
    EnableVersion,
    DisableVersion,
    SetRotation,
    SetMemo,
    Delete,
    CancelDeletion,
    DeleteNow,
    /// The scheduled purge at the end of the deletion wait.
    Purge,
    History,
    Impact,
    Grant,
    Revoke,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Show => "show",
            Action::Versions => "versions",
            Action::Encrypt => "encrypt",
            Action::Decrypt => "decrypt",
            Action::Reencrypt => "reencrypt",
            Action::Sign => "sign",
            Action::Verify => "verify",
            Action::PublicKey => "public-key",
            Action::DataKey => "data-key",
            Action::Rotate => "rotate",
            Action::AutoRotate => "auto-rotate",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::EnableVersion => "enable-version",
            Action::DisableVersion => "disable-version",
            Action::SetRotation => "set-rotation",
            Action::SetMemo => "set-memo",
            Action::Delete => "delete",
            Action::CancelDeletion => "cancel-deletion",
            Action::DeleteNow => "delete-now",
            Action::Purge => "purge",
            Action::History => "history",
            Action::Impact => "impact",
            Action::Grant => "grant",
            Action::Revoke => "revoke",
        }
    }

    /// Whether a successful call of this action counts as usage (SPEC §7).
    pub fn is_crypto(self) -> bool {
        matches!(
            self,
            Action::Encrypt
                | Action::Decrypt
                | Action::Reencrypt
                | Action::Sign
                | Action::Verify
                | Action::DataKey
        )
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ACTIONS
            .iter()
            .copied()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown action {s:?}"))
    }
}

/// Every action, for parsing and for the dashboard's filters.
pub const ACTIONS: [Action; 26] = [
    Action::Create,
    Action::Show,
    Action::Versions,
    Action::Encrypt,
    Action::Decrypt,
    Action::Reencrypt,
    Action::Sign,
    Action::Verify,
    Action::PublicKey,
    Action::DataKey,
    Action::Rotate,
    Action::AutoRotate,
    Action::Enable,
    Action::Disable,
    Action::EnableVersion,
    Action::DisableVersion,
    Action::SetRotation,
    Action::SetMemo,
    Action::Delete,
    Action::CancelDeletion,
    Action::DeleteNow,
    Action::Purge,
    Action::History,
    Action::Impact,
    Action::Grant,
    Action::Revoke,
];

/// One entry of a key's history (SPEC §7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Position in the daemon's history; larger is newer.
    pub seq: u64,
    pub time: UnixMillis,
    pub key_tag: String,
    pub action: Action,
    pub version: Option<u32>,
    /// `ok`, or the error kind of a refused or failed call.
    pub result: String,
    pub account: String,
    pub uid: u32,
    pub pid: u32,
    /// The client's program name (from `/proc/PID/comm`), the local stand-in for NCP's IP.
    pub client: String,
    /// Items of the call: 1, or the item count of a batch call (a batch is one call and
    /// one entry; its per-item results went to the caller).
    #[serde(default = "one_item")]
    pub items: u32,
    /// How many of the items failed; `result` is then the first failure's kind.
    #[serde(default)]
    pub failed: u32,
}

fn one_item() -> u32 {
    1
}

/// Who used a key recently: the data behind the "this key is in use" warnings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Impact {
    pub key_tag: String,
    /// Start of the window looked at.
    pub since: UnixMillis,
    /// Successful crypto calls in the window.
    pub recent_uses: u64,
    pub last_used_at: Option<UnixMillis>,
    /// Distinct accounts with successful crypto calls in the window, most active first.
    pub accounts: Vec<AccountUse>,
    /// Set when the daemon stopped counting at its bound on history entries read per
    /// request (PROTOCOL.md §5.7) before the window's start: the figures above then count
    /// only the newest entries, back to one dated this, and are lower bounds.
    #[serde(default)]
    pub counted_back_to: Option<UnixMillis>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountUse {
    pub account: String,
    pub uses: u64,
    pub last_used_at: UnixMillis,
}

/// The roles of SPEC §6; NCP's names are accepted as aliases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything, including create and permissions (`NCP_KMS_MANAGER`).
    Manager,
    /// Enable/disable, rotate, rotation settings, memo, request/cancel deletion, history
    /// (`KMS_KEY_MANAGER`).
    KeyManager,
    /// See keys and history (`KMS_KEY_REVIEWER`).
    KeyReviewer,
    /// Encrypt, decrypt, re-encrypt, sign, verify, public key, data keys.
    KeyUser,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::Manager,
        Role::KeyManager,
        Role::KeyReviewer,
        Role::KeyUser,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::KeyManager => "key-manager",
            Role::KeyReviewer => "key-reviewer",
            Role::KeyUser => "key-user",
        }
    }

    /// NCP's name for the role.
    pub fn ncp_name(self) -> &'static str {
        match self {
            Role::Manager => "NCP_KMS_MANAGER",
            Role::KeyManager => "KMS_KEY_MANAGER",
            Role::KeyReviewer => "KMS_KEY_REVIEWER",
            Role::KeyUser => "KMS_KEY_USER",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s || r.ncp_name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown role {s:?} (manager, key-manager, key-reviewer or key-user)")
            })
    }
}

/// Who a grant is for: a user or a group, by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Principal {
    User(String),
    Group(String),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::User(u) => write!(f, "user {u}"),
            Principal::Group(g) => write!(f, "group {g}"),
        }
    }
}

/// A role granted to a principal, for all keys or one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantInfo {
    pub id: u64,
    pub role: Role,
    pub principal: Principal,
    /// The key's tag; `None` for all keys.
    pub key_tag: Option<String>,
    pub key_name: Option<String>,
    pub granted_at: UnixMillis,
    pub granted_by: String,
    /// The uid (a user) or gid (a group) the name had when the grant was made: the grant
    /// applies to that account or group only, never to one that takes the name later (an
    /// account deleted and its name given to a new uid). `None` on a grant made before
    /// kmsd recorded it, until kmsd binds it at its next start: to the id the name has
    /// then, or to [`NO_PRINCIPAL_ID`] if no account or group has the name.
    #[serde(default)]
    pub principal_id: Option<u32>,
}

/// The `principal_id` of a grant whose name belonged to no account or group when kmsd
/// bound it: `(uid_t)-1`, which is no one's id (to the kernel it means "no change"), so
/// the grant applies to no one.
pub const NO_PRINCIPAL_ID: u32 = u32::MAX;

/// A rule of SPEC §2 that an input breaks. The message names the rule, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuleViolation(pub String);

/// Key names: 3–15 characters, a letter first, then letters, digits, `-` or `_`.
pub fn validate_name(name: &str) -> Result<(), RuleViolation> {
    let len = name.chars().count();
    if !(3..=15).contains(&len) {
        return Err(RuleViolation(format!(
            "a key name has 3 to 15 characters (this one has {len})"
        )));
    }
    let mut chars = name.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphabetic()) {
        return Err(RuleViolation(
            "a key name starts with a letter (A-Z or a-z)".into(),
        ));
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
        return Err(RuleViolation(format!(
            "a key name has only letters, digits, '-' and '_' (not {bad:?})"
        )));
    }
    Ok(())
}

/// Memos: at most 100 characters.
pub fn validate_memo(memo: &str) -> Result<(), RuleViolation> {
    let len = memo.chars().count();
    if len > MAX_MEMO_CHARS {
        return Err(RuleViolation(format!(
            "a memo has at most {MAX_MEMO_CHARS} characters (this one has {len})"
        )));
    }
    // A memo is one line: U+2028 and U+2029 are no control characters, but break it.
    if memo
        .chars()
        .any(|c| c.is_control() || crate::text::breaks_line(c))
    {
        return Err(RuleViolation(
            "a memo is one line, without control characters or line separators".into(),
        ));
    }
    Ok(())
}

/// Rotation periods: 1 to 730 days.
pub fn validate_rotation_days(days: u32) -> Result<(), RuleViolation> {
    if !(MIN_ROTATION_DAYS..=MAX_ROTATION_DAYS).contains(&days) {
        return Err(RuleViolation(format!(
            "the rotation period is {MIN_ROTATION_DAYS} to {MAX_ROTATION_DAYS} days (not {days})"
        )));
    }
    Ok(())
}

/// Convergent encryption exists for AES256 keys only.
pub fn validate_convergent(key_type: KeyType, convergent: bool) -> Result<(), RuleViolation> {
    if convergent && key_type != KeyType::Aes256 {
        return Err(RuleViolation(format!(
            "convergent encryption is for AES256 keys only, not {key_type}"
        )));
    }
    Ok(())
}

/// Convergent encryption is for `basic` keys only: it derives a key per context with
/// HKDF, which would have to run inside the token of an `hsm` or `dedicated-hsm` key (and
/// SoftHSM2, like many tokens, has no `CKM_HKDF_DERIVE`).
pub fn validate_convergent_protection(
    protection: Protection,
    convergent: bool,
) -> Result<(), RuleViolation> {
    if convergent && protection != Protection::Basic {
        return Err(RuleViolation(format!(
            "convergent encryption is not available for {protection} keys: it derives a key \
             per context with HKDF, which would have to run inside the token"
        )));
    }
    Ok(())
}

/// Whether a string looks like a key tag (32 lowercase hex digits) rather than a name.
pub fn is_tag(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Formats a time as RFC 3339 UTC with second precision.
pub fn format_time(t: UnixMillis) -> String {
    let secs = t.div_euclid(1000);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(dt) => dt
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| t.to_string()),
        Err(_) => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name rule accepts exactly the NCP pattern `[A-Za-z][A-Za-z0-9_-]{2,14}`.
    #[test]
    fn name_rule() {
        for ok in ["abc", "A1_", "key-01", "abcdefghijklmno"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ab",
            "1abc",
            "_abc",
            "abcdefghijklmnop",
            "ab c",
            "ключ",
            "a.b",
            "",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    /// Memo and period limits are the console's.
    #[test]
    fn memo_and_period_rules() {
        assert!(validate_memo(&"x".repeat(100)).is_ok());
        assert!(validate_memo(&"x".repeat(101)).is_err());
        assert!(validate_memo("한글 메모").is_ok());
        // One line of text: a memo is shown in tables and on one line of the dashboard,
        // where a newline or an escape sequence would break (or forge) what is drawn.
        for bad in [
            "two\nlines",
            "tab\there",
            "\u{1b}[31mred",
            "nul\0",
            "line\u{2028}sep",
            "para\u{2029}sep",
        ] {
            assert!(validate_memo(bad).is_err(), "{bad:?}");
        }
        assert!(validate_rotation_days(0).is_err());
        assert!(validate_rotation_days(1).is_ok());
        assert!(validate_rotation_days(730).is_ok());
        assert!(validate_rotation_days(731).is_err());
    }

    /// Action names round-trip through their string form.
    #[test]
    fn action_names_round_trip() {
        for a in ACTIONS {
            assert_eq!(a.as_str().parse::<Action>(), Ok(a));
        }
        assert!("nope".parse::<Action>().is_err());
    }

    /// Roles parse from their names and from NCP's names.
    #[test]
    fn role_aliases() {
        assert_eq!("key-manager".parse::<Role>(), Ok(Role::KeyManager));
        assert_eq!("NCP_KMS_MANAGER".parse::<Role>(), Ok(Role::Manager));
        assert_eq!("kms_key_reviewer".parse::<Role>(), Ok(Role::KeyReviewer));
        assert!("admin".parse::<Role>().is_err());
    }

    /// Tags are recognised only as 32 lowercase hex digits.
    #[test]
    fn tag_shape() {
        assert!(is_tag("0123456789abcdef0123456789abcdef"));
        assert!(!is_tag("0123456789ABCDEF0123456789abcdef"));
        assert!(!is_tag("mykey"));
    }
}
