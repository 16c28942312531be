//! PKCS#11 tokens for the `hsm` and `dedicated-hsm` protection levels (SPEC §2, §9).
//!
//! - [`module`]: a PKCS#11 library, loaded and `C_Initialize`d once per process (the
//!   library's state is process-wide, so two tokens of one library share it).
//! - [`token`]: one token: its slot (found by label), its PIN, a [`pool`] of logged-in R/W
//!   sessions, and the reconnection rules.
//! - [`key`]: one key version living in a token: generation, lookup, operations.
//! - [`oaep`], [`der`]: the little software glue that keeps outputs identical to `basic`.
//!
//! # What runs where
//!
//! Every private or secret operation runs in the token on a non-extractable, sensitive
//! object (`CKA_TOKEN`, `CKA_SENSITIVE`, `CKA_EXTRACTABLE=false`): AES-GCM encryption and
//! decryption, ECDSA signing (`CKM_ECDSA` over a SHA-256 digest computed here), RSA-PSS and
//! PKCS#1 v1.5 signing (`CKM_SHA256_RSA_PKCS_PSS`, `CKM_SHA256_RSA_PKCS`) and RSA-OAEP
//! decryption. Public-key operations (verification, RSA-OAEP encryption) run in software
//! on the public key read from the token, exactly as for `basic` keys: there is nothing
//! secret in them, and the output is the same byte format.
//!
//! # What SoftHSM2 (2.6) lacks, and what is done instead
//!
//! - `CKM_AES_GCM` works through cryptoki (caller-supplied 96-bit IV, AAD, 128-bit tag;
//!   the token returns ciphertext ‖ tag), so AES bodies are nonce ‖ ciphertext ‖ tag as
//!   for `basic` keys. The nonce comes from the OS CSPRNG, as for `basic` keys.
//! - `CKM_RSA_PKCS_OAEP` accepts only SHA-1 (SHA-256 parameters → `CKR_ARGUMENTS_BAD`).
//!   A token that refuses OAEP-SHA-256 gets raw RSA (`CKM_RSA_X_509`) inside the token,
//!   `c^d mod n` with the key never leaving it, and the OAEP-SHA-256 decoding here, in
//!   constant time ([`oaep`]), with every failure reported alike as `decrypt-failed`. A
//!   token that supports OAEP-SHA-256 does the whole decryption itself. Which one a token
//!   is, is probed on its first RSA decryption.
//! - `CKM_ECDSA_SHA256` is missing: the digest is computed here and signed with `CKM_ECDSA`.
//! - `CKM_HKDF_DERIVE` is missing, so convergent encryption, which derives per-context
//!   keys with HKDF, cannot keep its derived keys inside the token; convergent keys are
//!   refused at creation for both HSM levels rather than derived in software.
//!
//! # What the store keeps
//!
//! No key material: a version's `wrapped` field holds an [`HsmRef`] (a magic prefix, the
//! token label and the object's `CKA_ID`), and purge destroys the token objects before
//! the store forgets the reference.

pub mod der;
pub mod key;
pub mod module;
pub mod oaep;
pub mod pool;
pub mod token;

pub use key::HsmKey;
pub use token::{PinFile, Token};

use crate::store::records::HsmTokenRecord;
use cryptoki::error::{Error as CkError, RvError};
use kms_shared::protocol::ErrorKind;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// Name of the systemd credential holding the daemon token's PIN.
pub const PIN_CREDENTIAL: &str = "kms-pkcs11-pin";

/// A failure of a PKCS#11 token or of its configuration. Messages name the module, the
/// token and the operation; never the PIN.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    #[error("no PKCS#11 token is configured on this kmsd")]
    NotConfigured,
    #[error("cannot load the PKCS#11 module {path}: {message}")]
    Module { path: PathBuf, message: String },
    #[error("cannot read the PIN file {path}: {message}")]
    PinFile { path: PathBuf, message: String },
    #[error("PKCS#11 token {token} is not present (module {module})")]
    TokenAbsent { token: String, module: PathBuf },
    /// The token refused the PIN. It is not presented again until the PIN file holds
    /// another: tokens that count failed logins lock the PIN after a few.
    #[error(
        "PKCS#11 token {token} refused the PIN ({rv}); kmsd does not present it again (tokens \
         lock their PIN after a few failed logins) until the PIN file {} holds another",
        pin_file.display()
    )]
    Login {
        token: String,
        rv: String,
        pin_file: PathBuf,
    },
    #[error("PKCS#11 token {token}: {op} failed: {rv}")]
    Pkcs11 {
        token: String,
        op: &'static str,
        rv: String,
    },
    #[error("PKCS#11 token {token} has no {what} for {version}")]
    ObjectMissing {
        token: String,
        what: &'static str,
        version: String,
    },
    #[error("PKCS#11 token {token} is busy: no session became free in time")]
    Busy { token: String },
    #[error("PKCS#11 token {token}: {message}")]
    Token { token: String, message: String },
    /// A refused request (bad registration, bad protection choice).
    #[error("{0}")]
    Invalid(String),
    #[error("decryption failed")]
    DecryptFailed,
}

impl HsmError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            HsmError::Invalid(_) => ErrorKind::InvalidArgument,
            HsmError::DecryptFailed => ErrorKind::DecryptFailed,
            _ => ErrorKind::Internal,
        }
    }
}

/// A PKCS#11 return value as a short name (`DeviceRemoved`), not cryptoki's paragraph.
pub(crate) fn rv_name(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, _) => format!("{rv:?}"),
        other => other.to_string(),
    }
}

/// The return value of a failed call, if the token answered one.
pub(crate) fn rv_of(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// The daemon token as given by flags and the config file (all optional).
#[derive(Debug, Clone, Default)]
pub struct Pkcs11Settings {
    pub module: Option<PathBuf>,
    pub token: Option<String>,
    pub pin_file: Option<PathBuf>,
}

/// The daemon's token, complete.
#[derive(Debug, Clone)]
pub struct DaemonToken {
    pub module: PathBuf,
    pub token: String,
    pub pin_file: PathBuf,
}

impl Pkcs11Settings {
    /// The daemon token, or `None` when none is configured. The PIN file defaults to the
    /// credential `kms-pkcs11-pin` when systemd passed one.
    pub fn resolve(&self, credentials_dir: Option<&Path>) -> Result<Option<DaemonToken>, String> {
        let (module, token) = match (&self.module, &self.token) {
            (None, None) => {
                if self.pin_file.is_some() {
                    return Err("--pkcs11-pin-file needs --pkcs11-module and --pkcs11-token".into());
                }
                return Ok(None);
            }
            (Some(m), Some(t)) => (m.clone(), t.clone()),
            (Some(_), None) => return Err("--pkcs11-module needs --pkcs11-token LABEL".into()),
            (None, Some(_)) => return Err("--pkcs11-token needs --pkcs11-module PATH".into()),
        };
        let credential = credentials_dir
            .map(|d| d.join(PIN_CREDENTIAL))
            .filter(|p| p.is_file());
        let pin_file = self.pin_file.clone().or(credential).ok_or_else(|| {
            format!(
                "the PKCS#11 token {token} needs a PIN: --pkcs11-pin-file FILE or the credential \
                 {PIN_CREDENTIAL}"
            )
        })?;
        Ok(Some(DaemonToken {
            module,
            token,
            pin_file,
        }))
    }
}

/// What the store keeps for an HSM key version instead of wrapped material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HsmRef {
    /// The token's label when the version was generated (for error messages).
    pub token: String,
    /// The objects' `CKA_ID`.
    pub id: Vec<u8>,
}

/// Starts every encoded [`HsmRef`]; no wrapped material (nonce ‖ AES-GCM) is mistaken for it
/// because HSM references are only read for keys whose protection is not `basic`.
const REF_MAGIC: &[u8] = b"kms-pkcs11-ref\0";

impl HsmRef {
    pub fn encode(&self) -> Vec<u8> {
        let label = self.token.as_bytes();
        let mut out = Vec::with_capacity(REF_MAGIC.len() + 2 + label.len() + self.id.len());
        out.extend_from_slice(REF_MAGIC);
        // Labels are at most 32 bytes (PKCS#11), so one byte of length is enough.
        out.push(label.len().min(255) as u8);
        out.extend_from_slice(&label[..label.len().min(255)]);
        out.extend_from_slice(&self.id);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<HsmRef> {
        let rest = bytes.strip_prefix(REF_MAGIC)?;
        let (&n, rest) = rest.split_first()?;
        let n = usize::from(n);
        if rest.len() < n {
            return None;
        }
        let token = String::from_utf8(rest[..n].to_vec()).ok()?;
        let id = rest[n..].to_vec();
        if id.is_empty() {
            return None;
        }
        Some(HsmRef { token, id })
    }
}

/// The `CKA_ID` of a new key version: [`object_id`] and 8 random bytes (`salt`), so that no two
/// generations share an id. Generation replaces objects with its id (leftovers of a
/// version never committed), and with ids fixed by tag and version a store restored from
/// a backup, rotating to a version number the live store already had, destroyed that
/// version's objects — data under it lost, even for the store kept aside. The id is kept
/// in the version's reference ([`HsmRef`]).
pub fn fresh_object_id(tag: &str, version: u32, salt: [u8; 8]) -> Vec<u8> {
    let mut id = object_id(tag, version);
    id.extend_from_slice(&salt);
    id
}

/// The `CKA_ID` of a key version made before ids had a random part: the 16 bytes of the
/// tag, then the version (big endian); still how such versions are found.
pub fn object_id(tag: &str, version: u32) -> Vec<u8> {
    let mut id = Vec::with_capacity(20);
    let bytes = tag.as_bytes();
    for pair in bytes.chunks(2) {
        let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
        let hi = hex(pair[0]);
        let lo = pair.get(1).map_or(0, |&c| hex(c));
        id.push(hi << 4 | lo);
    }
    id.extend_from_slice(&version.to_be_bytes());
    id
}

/// The `CKA_LABEL` of a key version's objects (for people listing the token).
pub fn object_label(tag: &str, version: u32) -> String {
    format!("kms-{tag}-v{version}")
}

/// A registered dedicated token: its registration and, once used, its open token.
struct Dedicated {
    record: HsmTokenRecord,
    token: Mutex<Option<Arc<Token>>>,
}

/// One registration of a dedicated token as it stands: equal only to itself, so a token
/// removed and registered again (even with the same record) is another. Held, it keeps
/// the registration's memory, so its identity cannot be reused meanwhile.
#[derive(Clone)]
pub struct Registration(Arc<Dedicated>);

impl PartialEq for Registration {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Registration")
            .field(&self.0.record.name)
            .finish()
    }
}

/// The daemon's token and the dedicated tokens managers registered.
pub struct Registry {
    daemon: Option<Arc<Token>>,
    dedicated: RwLock<BTreeMap<String, Arc<Dedicated>>>,
}

impl Registry {
    /// Opens the daemon token (a PIN file that cannot be read or a module that cannot be
    /// loaded stop the daemon; a module that loads but does not initialise, a token that
    /// is absent or one that refuses the PIN do not: hsm calls fail with a clear error
    /// until it is back, or until the PIN file holds another PIN). Dedicated tokens open
    /// on first use.
    ///
    /// A refused PIN must not stop the daemon: under socket activation the client waiting
    /// in the backlog starts kmsd again at once, whatever `RestartPreventExitStatus=`
    /// says, and each start would present the PIN once more until systemd's start limit
    /// (five in ten seconds) — enough to lock a token that allows three tries.
    pub fn open(
        daemon: Option<&DaemonToken>,
        registered: Vec<HsmTokenRecord>,
    ) -> Result<Registry, HsmError> {
        let daemon = match daemon {
            Some(d) => {
                let t = Token::open(
                    format!("{} (the daemon's token)", d.token),
                    &d.module,
                    &d.token,
                    &d.pin_file,
                    PinFile::Daemon,
                )?;
                match t.check() {
                    Ok(()) => {
                        tracing::info!(token = %d.token, module = %d.module.display(), "PKCS#11 token ready")
                    }
                    Err(e @ HsmError::Login { .. }) => tracing::error!(
                        error = %e,
                        "hsm keys fail until the PIN file holds another PIN; basic keys are served"
                    ),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "the daemon's PKCS#11 token is not available; hsm keys fail until it is"
                    ),
                }
                Some(Arc::new(t))
            }
            None => None,
        };
        let dedicated = registered
            .into_iter()
            .map(|record| {
                (
                    record.name.clone(),
                    Arc::new(Dedicated {
                        record,
                        token: Mutex::new(None),
                    }),
                )
            })
            .collect();
        Ok(Registry {
            daemon,
            dedicated: RwLock::new(dedicated),
        })
    }

    /// A registry with no token at all.
    pub fn empty() -> Registry {
        Registry {
            daemon: None,
            dedicated: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn daemon(&self) -> Option<&Arc<Token>> {
        self.daemon.as_ref()
    }

    /// The dedicated token registered as `name`, opened on first use.
    pub fn dedicated(&self, name: &str) -> Result<Arc<Token>, HsmError> {
        let d = self
            .dedicated
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| HsmError::Invalid(format!("no HSM token is registered as {name:?}")))?;
        let mut slot = d.token.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let r = &d.record;
        // Checked again: the module was checked when registered, but what is there now is
        // what would be loaded.
        let module = check_module_path(Path::new(&r.module))?;
        let t = Arc::new(Token::open(
            format!("{} (dedicated token {})", r.token, r.name),
            &module,
            &r.token,
            Path::new(&r.pin_file),
            PinFile::Registered { owner: r.pin_owner },
        )?);
        *slot = Some(t.clone());
        Ok(t)
    }

    pub fn is_registered(&self, name: &str) -> bool {
        self.dedicated
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
    }

    /// The registration named `name` as it stands, if there is one.
    pub fn registration(&self, name: &str) -> Option<Registration> {
        self.dedicated
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .map(Registration)
    }

    pub fn records(&self) -> Vec<HsmTokenRecord> {
        self.dedicated
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|d| d.record.clone())
            .collect()
    }

    pub fn record(&self, name: &str) -> Option<HsmTokenRecord> {
        self.dedicated
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|d| d.record.clone())
    }

    /// Adds a registration whose token was already opened and checked.
    pub fn insert(&self, record: HsmTokenRecord, token: Arc<Token>) {
        self.dedicated
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                record.name.clone(),
                Arc::new(Dedicated {
                    record,
                    token: Mutex::new(Some(token)),
                }),
            );
    }

    pub fn remove(&self, name: &str) {
        let removed = self
            .dedicated
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        // Dropped (closing the token's sessions, which may wait for its library) after
        // the registry's lock is released: readers of the registry (`hsm list`, every
        // dedicated key's call) do not wait for the token.
        drop(removed);
    }
}

/// Checks a module path a manager names before the daemon loads it, and returns the
/// path to load: the file it resolves to. Loading a library runs its code inside kmsd, so
/// it must be a regular file that only root (or kmsd's own account) can change — and so
/// must every directory above it, and the path must be the file itself, not a link: the
/// check once looked through a link the manager owned, who could then point it at a
/// library of their own before the next start loaded it. Checked at registration and
/// again before every load of a dedicated token.
pub fn check_module_path(path: &Path) -> Result<PathBuf, HsmError> {
    use std::os::unix::fs::MetadataExt;
    if !path.is_absolute() {
        return Err(HsmError::Invalid(format!(
            "the PKCS#11 module path must be absolute (got {})",
            path.display()
        )));
    }
    let unusable = |e: std::io::Error| {
        HsmError::Invalid(format!(
            "cannot use the PKCS#11 module {}: {e}",
            path.display()
        ))
    };
    let canonical = std::fs::canonicalize(path).map_err(unusable)?;
    let meta = std::fs::metadata(&canonical).map_err(unusable)?;
    if !meta.is_file() {
        return Err(HsmError::Invalid(format!(
            "the PKCS#11 module {} is not a regular file",
            path.display()
        )));
    }
    let me = rustix::process::geteuid().as_raw();
    let trusted = |m: &std::fs::Metadata| (m.uid() == 0 || m.uid() == me) && m.mode() & 0o022 == 0;
    if !trusted(&meta) {
        return Err(HsmError::Invalid(format!(
            "the PKCS#11 module {} must be owned by root or by kmsd's account (uid {me}) and \
             writable by no one else: kmsd runs its code",
            canonical.display()
        )));
    }
    for dir in canonical.ancestors().skip(1) {
        let m = std::fs::metadata(dir).map_err(unusable)?;
        if !trusted(&m) {
            return Err(HsmError::Invalid(format!(
                "the PKCS#11 module {} is in {}, which others than root and kmsd's account \
                 can change: kmsd runs its code",
                canonical.display(),
                dir.display()
            )));
        }
    }
    Ok(canonical)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A reference round-trips; wrapped material and truncated references do not decode.
    #[test]
    fn hsm_ref_round_trip() {
        let r = HsmRef {
            token: "kms".into(),
            id: object_id("00112233445566778899aabbccddeeff", 7),
        };
        let bytes = r.encode();
        assert_eq!(HsmRef::decode(&bytes), Some(r.clone()));
        assert_eq!(HsmRef::decode(&bytes[..REF_MAGIC.len() + 2]), None);
        assert_eq!(HsmRef::decode(&[0u8; 60]), None);
        assert_eq!(r.id.len(), 20);
        assert_eq!(&r.id[..2], &[0x00, 0x11]);
        assert_eq!(&r.id[16..], &7u32.to_be_bytes());
    }

    /// The daemon token needs module and label together, and a PIN from a file or the credential.
    #[test]
    fn settings_resolve() {
        let none = Pkcs11Settings::default();
        assert!(none.resolve(None).unwrap().is_none());
        let half = Pkcs11Settings {
            module: Some("/m.so".into()),
            ..Default::default()
        };
        assert!(half.resolve(None).is_err());
        let no_pin = Pkcs11Settings {
            module: Some("/m.so".into()),
            token: Some("t".into()),
            pin_file: None,
        };
        assert!(no_pin.resolve(None).unwrap_err().contains(PIN_CREDENTIAL));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(PIN_CREDENTIAL), "1234\n").unwrap();
        let d = no_pin.resolve(Some(dir.path())).unwrap().unwrap();
        assert_eq!(d.pin_file, dir.path().join(PIN_CREDENTIAL));
    }

    /// Relative, missing and group-writable module paths are refused, and so is a module in
    /// a directory others can write to (a link there could be pointed elsewhere later); a
    /// link is resolved to the file it names, which is what gets loaded.
    #[test]
    fn module_path_checks() {
        use std::os::unix::fs::PermissionsExt;
        assert!(check_module_path(Path::new("lib.so")).is_err());
        assert!(check_module_path(Path::new("/nonexistent/lib.so")).is_err());
        // A system file (root's, in root's directories) passes, as a module there would.
        let system = std::fs::canonicalize("/bin/sh").unwrap();
        assert_eq!(check_module_path(Path::new("/bin/sh")).unwrap(), system);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.so");
        std::fs::write(&p, b"x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(check_module_path(&p).is_err());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        // The file is fine, but it sits in a directory others may write to (here the temp
        // directory, or /tmp above it when the temp directory is private).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_module_path(&p).unwrap_err().to_string();
        assert!(err.contains("which others"), "{err}");
        // A link the manager controls, to a module root owns: what passes (and is stored
        // and loaded) is the file it names, so pointing the link elsewhere later changes
        // nothing; pointed at their own file, it is refused.
        let link = dir.path().join("lib.so");
        std::os::unix::fs::symlink(&system, &link).unwrap();
        assert_eq!(check_module_path(&link).ok(), Some(system));
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(check_module_path(&link).is_err());
    }
}
