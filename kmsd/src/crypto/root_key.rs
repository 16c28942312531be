//! The root key (SPEC §9): wraps every key version's material at rest.
//!
//! Source, in order: the systemd credential `$CREDENTIALS_DIRECTORY/kms-root-key` (e.g.
//! `LoadCredentialEncrypted=` bound to the TPM), else `data_dir/root.key` (mode 0600, created
//! with 32 CSPRNG bytes on first start). The root key is never stored in the redb file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::KeyInit;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rustix::fs::{Mode, OFlags};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use super::CryptoError;
use super::aes::{NONCE_LEN, open, seal};
use super::random::{fill_random, hex_lower};

/// Root key length in bytes.
pub const ROOT_KEY_LEN: usize = 32;
/// File name of the credential inside `$CREDENTIALS_DIRECTORY`.
pub const CREDENTIAL_NAME: &str = "kms-root-key";
/// File name of the key file inside the data directory.
pub const KEY_FILE_NAME: &str = "root.key";

const WRAP_INFO: &[u8] = b"kms/wrap/v1";
/// The base of every key's own wrapping key (store schema 3, [`RootKey::key_wrapper`]).
const KEY_WRAP_BASE_INFO: &[u8] = b"kms/key-wrap-base/v1";
const KEY_WRAP_INFO: &[u8] = b"kms/key-wrap/v1\0";
const CHECK_INFO: &[u8] = b"kms/root-key-check/v1";
/// Longest accepted file: 64 hex chars + "\r\n".
const MAX_FILE_LEN: usize = 2 * ROOT_KEY_LEN + 2;

/// Where the root key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootKeySource {
    /// `$CREDENTIALS_DIRECTORY/kms-root-key`.
    Credential(PathBuf),
    /// An existing `data_dir/root.key`.
    File(PathBuf),
    /// `data_dir/root.key`, created by this call.
    Created(PathBuf),
}

/// Why the root key could not be loaded or created. Never contains key bytes.
#[derive(Debug, thiserror::Error)]
pub enum RootKeyError {
    #[error("cannot read root key {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create root key {}: {source}", .path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "root key {} is malformed ({len} bytes): expected exactly 32 raw bytes or 64 hex \
         characters with an optional trailing newline",
        .path.display()
    )]
    Malformed { path: PathBuf, len: usize },
    #[error(
        "root key {} has mode {mode:04o}: it must not be accessible by group or others \
         (chmod 600 it)",
        .path.display()
    )]
    BadPermissions { path: PathBuf, mode: u32 },
    #[error("root key {} is not a regular file", .path.display())]
    NotAFile { path: PathBuf },
    #[error("random number generator failed while creating the root key")]
    Rng,
}

/// The root key. Zeroized on drop; no `Debug`, no `Clone`.
pub struct RootKey {
    /// AES-256-GCM under HKDF(root, info "kms/wrap/v1"), built once.
    wrap_cipher: Aes256Gcm,
    /// HKDF(root, info "kms/key-wrap-base/v1"): what every key's own wrapping key is
    /// derived from, together with the key's slot secret.
    key_wrap_base: Zeroizing<[u8; 32]>,
    /// Public check value, see [`RootKey::fingerprint`].
    fingerprint: String,
    /// Tests: a wrap to come fails as if the random source had (see
    /// [`RootKey::fail_a_wrap`]). 0: none.
    wrap_fault: AtomicU32,
}

impl RootKey {
    /// Loads the root key: the credential if `credentials_dir` is given and holds
    /// `kms-root-key`, else `data_dir/root.key`, created (0600) if missing. The caller passes
    /// `std::env::var_os("CREDENTIALS_DIRECTORY")` as `credentials_dir`.
    pub fn load_or_create(
        data_dir: &Path,
        credentials_dir: Option<&Path>,
    ) -> Result<(Self, RootKeySource), RootKeyError> {
        if let Some(dir) = credentials_dir {
            let path = dir.join(CREDENTIAL_NAME);
            match File::open(&path) {
                Ok(file) => {
                    let key = read_key(file, &path, false)?;
                    return Ok((key, RootKeySource::Credential(path)));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(RootKeyError::Read { path, source }),
            }
        }
        remove_temporary_key_files(data_dir);
        let path = data_dir.join(KEY_FILE_NAME);
        let opened = rustix::fs::open(
            &path,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        );
        match opened {
            Ok(fd) => {
                let key = read_key(File::from(fd), &path, true)?;
                Ok((key, RootKeySource::File(path)))
            }
            Err(rustix::io::Errno::NOENT) => {
                let key = create_key_file(data_dir, &path)?;
                Ok((key, RootKeySource::Created(path)))
            }
            Err(rustix::io::Errno::LOOP) => Err(RootKeyError::NotAFile { path }),
            Err(e) => Err(RootKeyError::Read {
                path,
                source: e.into(),
            }),
        }
    }

    /// A root key from its 32 bytes.
    pub fn from_bytes(mut bytes: [u8; ROOT_KEY_LEN]) -> Self {
        let key = Self::from_slice(&bytes);
        bytes.zeroize();
        key
    }

    fn from_slice(root: &[u8; ROOT_KEY_LEN]) -> Self {
        let mut wrap_key = Zeroizing::new([0u8; 32]);
        let hkdf = Hkdf::<Sha256>::new(None, root);
        // None of these can fail: fixed lengths (HKDF-SHA256 expands up to 255 * 32 bytes,
        // AES-256 takes 32, HMAC takes any key length), independent of any input.
        hkdf.expand(WRAP_INFO, wrap_key.as_mut_slice())
            .expect("HKDF-SHA256 expands 32 bytes");
        let wrap_cipher =
            Aes256Gcm::new_from_slice(wrap_key.as_slice()).expect("AES-256 key is 32 bytes");
        let mut key_wrap_base = Zeroizing::new([0u8; 32]);
        hkdf.expand(KEY_WRAP_BASE_INFO, key_wrap_base.as_mut_slice())
            .expect("HKDF-SHA256 expands 32 bytes");
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(root)
            .expect("HMAC accepts keys of any length");
        mac.update(CHECK_INFO);
        let digest = mac.finalize().into_bytes();
        let fingerprint = hex_lower(&digest[..8]);
        Self {
            wrap_cipher,
            key_wrap_base,
            fingerprint,
            wrap_fault: AtomicU32::new(0),
        }
    }

    /// A short public check value: the first 8 bytes, in hex, of
    /// `HMAC-SHA256(root, "kms/root-key-check/v1")`. The store records it so that opening
    /// it with a different root key fails with a clear error instead of `decrypt-failed`.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// Wraps `secret` under the root key: AES-256-GCM with a fresh random nonce; returns
    /// `nonce || ciphertext || tag`. `aad` must bind the key tag and version.
    pub fn wrap(&self, aad: &[u8], secret: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if self.injected_wrap_fault() {
            return Err(CryptoError::Rng);
        }
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        seal(&self.wrap_cipher, &nonce, aad, secret)
    }

    /// Makes one wrap to come fail with [`CryptoError::Rng`], as if the random source had
    /// failed: the one after `after` more that succeed. Never called by kmsd: for tests
    /// (kmsd/tests/engine.rs) of what a failed wrap must leave behind, which the OS
    /// CSPRNG cannot be made to do on demand. Public (not `cfg(test)`) because the
    /// integration tests build the library without it.
    #[doc(hidden)]
    pub fn fail_a_wrap(&self, after: u32) {
        self.wrap_fault
            .store(after.saturating_add(1), Ordering::Relaxed);
    }

    /// Whether this wrap is the one [`RootKey::fail_a_wrap`] asked to fail. A plain load
    /// when no failure is asked for.
    fn injected_wrap_fault(&self) -> bool {
        self.wrap_fault
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            == Ok(1)
    }

    /// Unwraps what [`RootKey::wrap`] produced with the same `aad`; anything else is
    /// [`CryptoError::DecryptFailed`].
    pub fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        open(&self.wrap_cipher, aad, wrapped)
    }

    /// The wrapping key of one key (store schema 3): AES-256-GCM under
    /// HKDF-SHA256(salt = the key's slot secret, ikm = HKDF(root, "kms/key-wrap-base/v1"),
    /// info = "kms/key-wrap/v1\0" || tag). Both halves are needed: the root key alone
    /// opens nothing once the slot secret is wiped (`store::key_slots`), which is what
    /// makes a purge final.
    pub fn key_wrapper(&self, slot_secret: &[u8; 32], tag: &str) -> KeyWrapper<'_> {
        let hkdf = Hkdf::<Sha256>::new(Some(slot_secret), self.key_wrap_base.as_slice());
        let mut key = Zeroizing::new([0u8; 32]);
        // Fixed lengths, as in `from_slice`: cannot fail.
        hkdf.expand_multi_info(&[KEY_WRAP_INFO, tag.as_bytes()], key.as_mut_slice())
            .expect("HKDF-SHA256 expands 32 bytes");
        KeyWrapper {
            root: self,
            cipher: Aes256Gcm::new_from_slice(key.as_slice()).expect("AES-256 key is 32 bytes"),
        }
    }
}

/// One key's wrapping key ([`RootKey::key_wrapper`]). No `Debug`, no `Clone`.
pub struct KeyWrapper<'a> {
    root: &'a RootKey,
    cipher: Aes256Gcm,
}

impl KeyWrapper<'_> {
    /// As [`RootKey::wrap`], under this key's wrapping key (a fault asked for with
    /// [`RootKey::fail_a_wrap`] applies here too).
    pub fn wrap(&self, aad: &[u8], secret: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if self.root.injected_wrap_fault() {
            return Err(CryptoError::Rng);
        }
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        seal(&self.cipher, &nonce, aad, secret)
    }

    /// Unwraps what [`KeyWrapper::wrap`] produced with the same `aad`.
    pub fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        open(&self.cipher, aad, wrapped)
    }
}

/// Reads and parses an opened key file. `private`: refuse group/other permission bits.
fn read_key(mut file: File, path: &Path, private: bool) -> Result<RootKey, RootKeyError> {
    let read_err = |source| RootKeyError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(RootKeyError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if private && mode & 0o077 != 0 {
        return Err(RootKeyError::BadPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    // Fixed buffer (no reallocation leaves copies behind); one spare byte detects overlong files.
    let mut buf = Zeroizing::new([0u8; MAX_FILE_LEN + 1]);
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
    }
    let malformed = || RootKeyError::Malformed {
        path: path.to_owned(),
        len,
    };
    let key = parse_key(&buf[..len]).ok_or_else(malformed)?;
    Ok(RootKey::from_slice(&key))
}

/// 32 raw bytes, or 64 hex chars (either case) with an optional trailing `\n` or `\r\n`.
fn parse_key(data: &[u8]) -> Option<Zeroizing<[u8; ROOT_KEY_LEN]>> {
    let mut key = Zeroizing::new([0u8; ROOT_KEY_LEN]);
    if data.len() == ROOT_KEY_LEN {
        key.copy_from_slice(data);
        return Some(key);
    }
    let hex = data
        .strip_suffix(b"\r\n")
        .or_else(|| data.strip_suffix(b"\n"))
        .unwrap_or(data);
    if hex.len() != 2 * ROOT_KEY_LEN {
        return None;
    }
    let mut ok = true;
    for (out, pair) in key.iter_mut().zip(hex.chunks_exact(2)) {
        let (hi, lo) = (hex_value(pair[0]), hex_value(pair[1]));
        ok &= hi.is_some() & lo.is_some();
        *out = (hi.unwrap_or(0) << 4) | lo.unwrap_or(0);
    }
    ok.then_some(key)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Removes what a creation cut short by a crash or a kill left ([`create_key_file`]'s
/// temporary names): a copy of a key, or a second name of the key itself, that nothing
/// would ever remove. Best effort; the data directory is locked by the caller.
fn remove_temporary_key_files(data_dir: &Path) {
    let prefix = format!("{KEY_FILE_NAME}.tmp-");
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix))
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Creates `path` (mode 0600) with 32 CSPRNG bytes: written and fsynced under a temporary
/// name, then linked into place (which fails if `path` exists) and the directory fsynced.
/// A crash or power loss leaves either no key file or a whole one; a key file created in
/// place could be left empty, and every later start refused it as malformed.
fn create_key_file(dir: &Path, path: &Path) -> Result<RootKey, RootKeyError> {
    let create_err = |source| RootKeyError::Create {
        path: path.to_owned(),
        source,
    };
    let mut key = Zeroizing::new([0u8; ROOT_KEY_LEN]);
    fill_random(key.as_mut_slice()).map_err(|_| RootKeyError::Rng)?;
    // A name of its own (two creators, should they ever race, never share a file; the
    // link decides which key is the key).
    let mut tmp = path.as_os_str().to_owned();
    let suffix = crate::crypto::random_tag().map_err(|_| RootKeyError::Rng)?;
    tmp.push(format!(".tmp-{suffix}"));
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(create_err)?;
    let written = file
        .write_all(key.as_slice())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::hard_link(&tmp, path));
    drop(file);
    let _ = std::fs::remove_file(&tmp);
    written.map_err(create_err)?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(create_err)?;
    Ok(RootKey::from_slice(&key))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::fs;

    /// A temporary name of the key file left by a creation cut short (a kill between its
    /// link and its unlink) is removed at the next start: a second name of the root key
    /// that nothing else would ever remove.
    #[test]
    fn a_creation_cut_short_leaves_no_key_copy_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = RootKey::load_or_create(dir.path(), None).unwrap();
        let left = dir.path().join(format!("{KEY_FILE_NAME}.tmp-0123abcd"));
        fs::hard_link(dir.path().join(KEY_FILE_NAME), &left).unwrap();
        let (again, _) = RootKey::load_or_create(dir.path(), None).unwrap();
        assert_eq!(key.fingerprint(), again.fingerprint());
        assert!(!left.exists(), "the temporary name of the key stayed");
        assert!(dir.path().join(KEY_FILE_NAME).exists());
    }

    /// A key's wrapping key needs both the root key and the slot secret (and its tag):
    /// neither the root key alone nor another slot secret opens what it wrapped.
    #[test]
    fn a_key_wrapper_needs_its_slot_secret() {
        let root = RootKey::from_bytes([3u8; 32]);
        let w = root
            .key_wrapper(&[1u8; 32], "tag1")
            .wrap(b"aad", b"material")
            .unwrap();
        assert_eq!(
            &*root
                .key_wrapper(&[1u8; 32], "tag1")
                .unwrap(b"aad", &w)
                .unwrap(),
            b"material"
        );
        assert!(root.unwrap(b"aad", &w).is_err());
        assert!(
            root.key_wrapper(&[2u8; 32], "tag1")
                .unwrap(b"aad", &w)
                .is_err()
        );
        assert!(
            root.key_wrapper(&[1u8; 32], "tag2")
                .unwrap(b"aad", &w)
                .is_err()
        );
        let other = RootKey::from_bytes([4u8; 32]);
        assert!(
            other
                .key_wrapper(&[1u8; 32], "tag1")
                .unwrap(b"aad", &w)
                .is_err()
        );
    }

    fn write_mode(path: &Path, data: &[u8], mode: u32) {
        fs::write(path, data).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A missing root.key is created with mode 0600 and 32 bytes, and reloading gives the same fingerprint.
    #[test]
    fn created_file_is_0600_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, src) = RootKey::load_or_create(dir.path(), None).unwrap();
        let path = dir.path().join("root.key");
        assert_eq!(src, RootKeySource::Created(path.clone()));
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let (k2, src2) = RootKey::load_or_create(dir.path(), None).unwrap();
        assert_eq!(src2, RootKeySource::File(path.clone()));
        assert_eq!(k1.fingerprint(), k2.fingerprint());
        assert_eq!(k1.fingerprint().len(), 16);
        // Data wrapped by the first load unwraps with the second.
        let w = k1.wrap(b"aad", b"material").unwrap();
        assert_eq!(*k2.unwrap(b"aad", &w).unwrap(), b"material");
        // The file holds the key that from_bytes would build.
        let bytes: [u8; 32] = fs::read(&path).unwrap().try_into().unwrap();
        assert_eq!(RootKey::from_bytes(bytes).fingerprint(), k1.fingerprint());
        // Written under a temporary name and linked into place: only the key is left.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["root.key"]);
    }

    /// Two fresh data dirs get different root keys (the key is random, not constant).
    #[test]
    fn created_keys_differ() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (ka, _) = RootKey::load_or_create(a.path(), None).unwrap();
        let (kb, _) = RootKey::load_or_create(b.path(), None).unwrap();
        assert_ne!(ka.fingerprint(), kb.fingerprint());
    }

    /// An existing root.key readable (or writable) by group or others is refused with BadPermissions.
    #[test]
    fn loose_permissions_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
            write_mode(&path, &[7u8; 32], mode);
            let err = RootKey::load_or_create(dir.path(), None).err().unwrap();
            match err {
                RootKeyError::BadPermissions { path: p, mode: m } => {
                    assert_eq!(p, path);
                    assert_eq!(m, mode);
                }
                other => panic!("mode {mode:o}: {other}"),
            }
            assert!(err_text(dir.path()).contains("root.key"));
        }
        write_mode(&path, &[7u8; 32], 0o400);
        assert!(RootKey::load_or_create(dir.path(), None).is_ok());
    }

    fn err_text(dir: &Path) -> String {
        RootKey::load_or_create(dir, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    /// Malformed key files are refused with a message naming the path and length, never the bytes.
    #[test]
    fn malformed_files_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        for data in [
            &b""[..],
            &[0x41; 31],
            &[0x41; 33],
            &[b'a'; 63],
            &[b'g'; 64],
            &[b'a'; 66],
            &[0x41; 200],
        ] {
            write_mode(&path, data, 0o600);
            let err = RootKey::load_or_create(dir.path(), None).err().unwrap();
            assert!(
                matches!(&err, RootKeyError::Malformed { path: p, .. } if *p == path),
                "{err}"
            );
            assert!(!err.to_string().contains("AAAA"));
        }
    }

    /// A symlinked root.key is refused (O_NOFOLLOW), and a missing data dir is a Create error naming the path.
    #[test]
    fn symlink_and_missing_dir_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        write_mode(&target, &[1u8; 32], 0o600);
        std::os::unix::fs::symlink(&target, dir.path().join("root.key")).unwrap();
        assert!(matches!(
            RootKey::load_or_create(dir.path(), None),
            Err(RootKeyError::NotAFile { .. })
        ));
        let missing = dir.path().join("no-such-dir");
        let err = RootKey::load_or_create(&missing, None).err().unwrap();
        assert!(matches!(err, RootKeyError::Create { .. }), "{err}");
        assert!(err.to_string().contains("no-such-dir"), "{err}");
    }

    /// The credential wins over the data dir (raw and hex forms); a credential dir without the file falls back.
    #[test]
    fn credential_wins() {
        let data = tempfile::tempdir().unwrap();
        let creds = tempfile::tempdir().unwrap();
        let (file_key, _) = RootKey::load_or_create(data.path(), None).unwrap();
        // Credential dir without kms-root-key: falls back to the file.
        let (k, src) = RootKey::load_or_create(data.path(), Some(creds.path())).unwrap();
        assert!(matches!(src, RootKeySource::File(_)));
        assert_eq!(k.fingerprint(), file_key.fingerprint());

        let cred = creds.path().join("kms-root-key");
        let raw = [0x42u8; 32];
        let expected = RootKey::from_bytes(raw).fingerprint();
        assert_ne!(expected, file_key.fingerprint());
        let hex = hex_lower(&raw);
        let forms: [Vec<u8>; 5] = [
            raw.to_vec(),
            hex.clone().into_bytes(),
            format!("{hex}\n").into_bytes(),
            format!("{hex}\r\n").into_bytes(),
            hex.to_uppercase().into_bytes(),
        ];
        for form in forms {
            // Credentials may be 0644 or 0400: their directory is private, so no mode check.
            write_mode(&cred, &form, 0o644);
            let (k, src) = RootKey::load_or_create(data.path(), Some(creds.path())).unwrap();
            assert_eq!(src, RootKeySource::Credential(cred.clone()));
            assert_eq!(k.fingerprint(), expected);
        }
        // A malformed credential is an error, not a silent fallback to the file.
        write_mode(&cred, b"short", 0o600);
        assert!(matches!(
            RootKey::load_or_create(data.path(), Some(creds.path())),
            Err(RootKeyError::Malformed { .. })
        ));
    }

    /// wrap/unwrap round-trips; a different root key, a different aad, or a tampered blob fails with DecryptFailed.
    #[test]
    fn wrap_unwrap() {
        let k = RootKey::from_bytes([1u8; 32]);
        let w = k.wrap(b"tag:v1", b"secret material").unwrap();
        assert_eq!(w.len(), 15 + 28);
        assert_eq!(*k.unwrap(b"tag:v1", &w).unwrap(), b"secret material");
        assert_ne!(k.wrap(b"tag:v1", b"secret material").unwrap(), w);
        assert!(matches!(
            RootKey::from_bytes([2u8; 32]).unwrap(b"tag:v1", &w),
            Err(CryptoError::DecryptFailed)
        ));
        assert!(matches!(
            k.unwrap(b"tag:v2", &w),
            Err(CryptoError::DecryptFailed)
        ));
        let mut bad = w.clone();
        bad[20] ^= 1;
        assert!(matches!(
            k.unwrap(b"tag:v1", &bad),
            Err(CryptoError::DecryptFailed)
        ));
        assert!(matches!(
            k.unwrap(b"tag:v1", &w[..27]),
            Err(CryptoError::DecryptFailed)
        ));
    }

    /// `fail_a_wrap(n)` fails exactly the wrap after the next `n`, with `Rng`, and no other.
    #[test]
    fn an_injected_wrap_failure_hits_one_wrap() {
        let k = RootKey::from_bytes([1u8; 32]);
        k.fail_a_wrap(1);
        let w = k.wrap(b"aad", b"s").unwrap();
        assert!(matches!(k.wrap(b"aad", b"s"), Err(CryptoError::Rng)));
        assert_eq!(*k.unwrap(b"aad", &w).unwrap(), b"s");
        for _ in 0..3 {
            assert!(k.wrap(b"aad", b"s").is_ok());
        }
        k.fail_a_wrap(0);
        assert!(matches!(k.wrap(b"aad", b"s"), Err(CryptoError::Rng)));
        assert!(k.wrap(b"aad", b"s").is_ok());
    }

    /// The fingerprint is stable, 16 hex chars, differs between keys, and does not reveal the wrap subkey.
    #[test]
    fn fingerprint_known_answer() {
        let a = RootKey::from_bytes([0u8; 32]).fingerprint();
        assert_eq!(a, RootKey::from_bytes([0u8; 32]).fingerprint());
        assert_ne!(a, RootKey::from_bytes([1u8; 32]).fingerprint());
        // HMAC-SHA256(key = 0^32, "kms/root-key-check/v1"), computed independently with openssl.
        let expected = super::super::test_support::openssl_hmac_sha256_hex(
            &"00".repeat(32),
            "kms/root-key-check/v1",
        );
        assert_eq!(a, expected[..16]);
    }
}
