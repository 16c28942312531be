//! Cryptography of kmsd (SPEC §5, §9).
//!
//! - [`aes`]: AES-256-GCM, random-nonce and convergent (RustCrypto `aes-gcm`).
//! - [`ecdsa`]: ECDSA P-256 / SHA-256, DER signatures (RustCrypto `p256`).
//! - [`rsa`]: RSA-2048 OAEP / PSS / PKCS#1 v1.5 on aws-lc-rs (never the `rsa` crate: Marvin).
//! - [`root_key`]: the root key that wraps every version's material at rest.
//! - [`random`]: the OS CSPRNG.
//!
//! Secret types zeroize on drop and implement neither `Debug`, `Clone` nor `Serialize`. Keys
//! are parsed once (in `generate` / `from_secret_bytes`) and are `Send + Sync`, for sharing
//! through `Arc` across threads.

pub mod aes;
pub mod ecdsa;
pub mod random;
pub mod root_key;
pub mod rsa;

use zeroize::Zeroizing;

pub use self::aes::AesKey;
pub use self::ecdsa::EcdsaKey;
pub use self::random::{fill_random, random_bytes, random_tag};
pub use self::root_key::{RootKey, RootKeyError, RootKeySource};
pub use self::rsa::RsaKey;
pub use kms_shared::model::{KeyType, SignScheme};

/// A cryptographic failure. Messages never include key or plaintext bytes.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("decryption failed: wrong key, version, context or tampered ciphertext")]
    DecryptFailed,
    #[error("invalid key material: {0}")]
    InvalidMaterial(&'static str),
    #[error("random number generator failed")]
    Rng,
    #[error("{0}")]
    Internal(&'static str),
}

/// Secret material of one key version. Zeroized on drop. Deliberately not `Debug`, `Clone`
/// or `Serialize`: the only way out is [`KeyMaterial::to_secret_bytes`], for wrapping.
#[allow(
    clippy::large_enum_variant,
    reason = "held once per version behind an Arc; boxing the hot AES variant adds a pointer chase"
)]
pub enum KeyMaterial {
    Aes(AesKey),
    Ecdsa(EcdsaKey),
    Rsa(RsaKey),
    /// A version of an `hsm` or `dedicated-hsm` key: only where it lives in the token and
    /// its public half; the secret never leaves the token.
    Hsm(crate::hsm::HsmKey),
}

impl KeyMaterial {
    /// Fresh material of the given type (AES/ECDSA from the OS CSPRNG, RSA inside aws-lc).
    pub fn generate(kind: KeyType) -> Result<Self, CryptoError> {
        Ok(match kind {
            KeyType::Aes256 => KeyMaterial::Aes(AesKey::generate()?),
            KeyType::Ecdsa => KeyMaterial::Ecdsa(EcdsaKey::generate()?),
            KeyType::Rsa2048 => KeyMaterial::Rsa(RsaKey::generate()?),
        })
    }

    pub fn key_type(&self) -> KeyType {
        match self {
            KeyMaterial::Aes(_) => KeyType::Aes256,
            KeyMaterial::Ecdsa(_) => KeyType::Ecdsa,
            KeyMaterial::Rsa(_) => KeyType::Rsa2048,
            KeyMaterial::Hsm(k) => k.key_type(),
        }
    }

    /// Serialized secret for wrapping at rest: AES = 32 raw bytes; ECDSA = the 32-byte
    /// big-endian scalar; RSA = PKCS#8 DER. Empty for an HSM key: its secret cannot leave
    /// the token, and HSM versions are never wrapped (the store keeps a reference).
    pub fn to_secret_bytes(&self) -> Zeroizing<Vec<u8>> {
        match self {
            KeyMaterial::Aes(k) => Zeroizing::new(k.raw_bytes().to_vec()),
            KeyMaterial::Ecdsa(k) => k.secret_bytes(),
            KeyMaterial::Rsa(k) => Zeroizing::new(k.pkcs8_der().to_vec()),
            KeyMaterial::Hsm(_) => Zeroizing::new(Vec::new()),
        }
    }

    /// Parses what [`KeyMaterial::to_secret_bytes`] produced.
    pub fn from_secret_bytes(kind: KeyType, bytes: &[u8]) -> Result<Self, CryptoError> {
        Ok(match kind {
            KeyType::Aes256 => KeyMaterial::Aes(AesKey::from_slice(bytes)?),
            KeyType::Ecdsa => KeyMaterial::Ecdsa(EcdsaKey::from_slice(bytes)?),
            KeyType::Rsa2048 => KeyMaterial::Rsa(RsaKey::from_pkcs8(bytes)?),
        })
    }

    /// PEM "PUBLIC KEY" (SPKI) for ECDSA and RSA; `None` for AES.
    pub fn public_key_pem(&self) -> Option<String> {
        match self {
            KeyMaterial::Aes(_) => None,
            KeyMaterial::Ecdsa(k) => Some(k.public_key_pem().to_owned()),
            KeyMaterial::Rsa(k) => Some(k.public_key_pem().to_owned()),
            KeyMaterial::Hsm(k) => k.public_key_pem().map(str::to_owned),
        }
    }

    pub fn as_aes(&self) -> Option<&AesKey> {
        match self {
            KeyMaterial::Aes(k) => Some(k),
            _ => None,
        }
    }

    pub fn as_ecdsa(&self) -> Option<&EcdsaKey> {
        match self {
            KeyMaterial::Ecdsa(k) => Some(k),
            _ => None,
        }
    }

    pub fn as_rsa(&self) -> Option<&RsaKey> {
        match self {
            KeyMaterial::Rsa(k) => Some(k),
            _ => None,
        }
    }
}

/// Overwrites `WORDS` × 8 bytes of stack below the caller's frame, where a call it made
/// has just returned. Ciphers and signers keep secrets in stack arrays (AES-GCM's blocks
/// of plaintext, an ECDSA signature's nonce), and those stay behind until later calls
/// happen to overwrite them; the caller runs the call in a frame of its own (never
/// inlined into the caller's), so that this covers what it left.
#[inline(never)]
pub(crate) fn wipe_stack<const WORDS: usize>() {
    let mut scratch = [0u64; WORDS];
    // Opaque to the optimiser, so the zeros are really written where the call's frames were.
    std::hint::black_box(&mut scratch);
}

/// How much stack [`with_wiped_stack`] overwrites: 128 KiB, more than making or
/// unwrapping any material takes in a debug build (whose frames are the larger).
const MATERIAL_STACK_WORDS: usize = 16 * 1024;

/// Runs `f`, which makes, unwraps or wraps key material, in frames below its caller's,
/// then overwrites the stack those frames used. Material moves by value from frame to
/// frame as it is made (a `Result`, a `KeyMaterial`, an `Arc::new`), and every move leaves
/// a copy behind that nothing wipes: on tokio's threads, which make and load material,
/// those copies outlived the key's purge, and stale stack bytes were later copied into
/// heap buffers too. `f` should return the material behind a pointer (an `Arc`), never by
/// value, so that no copy lands in the caller's frame.
pub(crate) fn with_wiped_stack<T>(f: impl FnOnce() -> T) -> T {
    let out = in_own_frames(f);
    wipe_stack::<MATERIAL_STACK_WORDS>();
    out
}

/// Runs `f` in frames below its caller's, never inlined into it, so that a
/// [`wipe_stack`] right after covers all of them.
#[inline(never)]
pub(crate) fn in_own_frames<T>(f: impl FnOnce() -> T) -> T {
    f()
}

/// Helpers shared by the module's tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_support {
    use std::ffi::OsString;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    /// Runs the real `openssl` CLI; panics (fails the test, never skips) if it is missing.
    pub fn openssl(args: &[OsString]) -> Output {
        match Command::new("openssl").args(args).output() {
            Ok(out) => out,
            Err(e) => panic!(
                "the interop tests need the `openssl` command-line tool (expected at \
                 /usr/bin/openssl; install the `openssl` package): cannot run it: {e}"
            ),
        }
    }

    pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, data).unwrap();
        path
    }

    /// HMAC-SHA256(hex key, msg) in lowercase hex, computed by `openssl dgst`.
    pub fn openssl_hmac_sha256_hex(hex_key: &str, msg: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let input = write_file(dir.path(), "msg", msg.as_bytes());
        let out = openssl(&[
            "dgst".into(),
            "-sha256".into(),
            "-mac".into(),
            "HMAC".into(),
            "-macopt".into(),
            format!("hexkey:{hex_key}").into(),
            input.into_os_string(),
        ]);
        assert!(out.status.success(), "openssl dgst -mac failed: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        text.split_whitespace().last().unwrap().to_owned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// All key types and the root key are Send + Sync (shared through Arc across threads).
    #[test]
    fn types_are_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<KeyMaterial>();
        check::<AesKey>();
        check::<EcdsaKey>();
        check::<RsaKey>();
        check::<RootKey>();
        let k = Arc::new(KeyMaterial::generate(KeyType::Ecdsa).unwrap());
        let k2 = Arc::clone(&k);
        let sig = std::thread::spawn(move || k2.as_ecdsa().unwrap().sign(b"x").unwrap())
            .join()
            .unwrap();
        assert!(k.as_ecdsa().unwrap().verify(b"x", &sig));
    }

    /// generate gives the requested type; public_key_pem is SPKI PEM for ECDSA/RSA and None for AES.
    #[test]
    fn generate_types_and_pem() {
        for kind in KeyType::ALL {
            let m = KeyMaterial::generate(kind).unwrap();
            assert_eq!(m.key_type(), kind);
            match (kind, m.public_key_pem()) {
                (KeyType::Aes256, None) => {}
                (KeyType::Aes256, Some(_)) => panic!("AES has no public key"),
                (_, Some(pem)) => {
                    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
                    assert!(
                        pem.trim_end().ends_with("-----END PUBLIC KEY-----"),
                        "{pem}"
                    );
                }
                (_, None) => panic!("{kind} must have a public key"),
            }
        }
    }

    /// to_secret_bytes/from_secret_bytes round-trips for each type: sizes as specified, and the
    /// reloaded key decrypts/verifies what the original produced and has the same public key.
    #[test]
    fn secret_bytes_round_trip() {
        // AES
        let aes = KeyMaterial::generate(KeyType::Aes256).unwrap();
        let bytes = aes.to_secret_bytes();
        assert_eq!(bytes.len(), 32);
        let body = aes.as_aes().unwrap().encrypt_random(b"a", b"pt").unwrap();
        let conv = aes
            .as_aes()
            .unwrap()
            .encrypt_convergent(b"c", b"a", b"pt")
            .unwrap();
        let aes2 = KeyMaterial::from_secret_bytes(KeyType::Aes256, &bytes).unwrap();
        assert_eq!(*aes2.to_secret_bytes(), *bytes);
        let a2 = aes2.as_aes().unwrap();
        assert_eq!(*a2.decrypt(b"a", &body).unwrap(), b"pt");
        assert_eq!(a2.encrypt_convergent(b"c", b"a", b"pt").unwrap(), conv);

        // ECDSA
        let ec = KeyMaterial::generate(KeyType::Ecdsa).unwrap();
        let bytes = ec.to_secret_bytes();
        assert_eq!(bytes.len(), 32);
        let sig = ec.as_ecdsa().unwrap().sign(b"m").unwrap();
        let ec2 = KeyMaterial::from_secret_bytes(KeyType::Ecdsa, &bytes).unwrap();
        assert_eq!(*ec2.to_secret_bytes(), *bytes);
        assert_eq!(ec2.public_key_pem(), ec.public_key_pem());
        assert!(ec2.as_ecdsa().unwrap().verify(b"m", &sig));
        // RFC 6979 is deterministic: the reloaded key signs identically.
        assert_eq!(ec2.as_ecdsa().unwrap().sign(b"m").unwrap(), sig);

        // RSA
        let rsa = KeyMaterial::generate(KeyType::Rsa2048).unwrap();
        let bytes = rsa.to_secret_bytes();
        assert_eq!(bytes[0], 0x30, "PKCS#8 is a DER SEQUENCE");
        assert!(bytes.len() > 1000);
        let ct = rsa.as_rsa().unwrap().encrypt(b"pt").unwrap();
        let sig = rsa.as_rsa().unwrap().sign(SignScheme::Pss, b"m").unwrap();
        let rsa2 = KeyMaterial::from_secret_bytes(KeyType::Rsa2048, &bytes).unwrap();
        assert_eq!(*rsa2.to_secret_bytes(), *bytes);
        assert_eq!(rsa2.public_key_pem(), rsa.public_key_pem());
        let r2 = rsa2.as_rsa().unwrap();
        assert_eq!(*r2.decrypt(&ct).unwrap(), b"pt");
        assert!(r2.verify(SignScheme::Pss, b"m", &sig));
    }

    /// from_secret_bytes refuses material of the wrong type or shape with InvalidMaterial.
    #[test]
    fn from_secret_bytes_refuses_wrong_material() {
        let ec = KeyMaterial::generate(KeyType::Ecdsa)
            .unwrap()
            .to_secret_bytes();
        let aes = KeyMaterial::generate(KeyType::Aes256)
            .unwrap()
            .to_secret_bytes();
        assert!(matches!(
            KeyMaterial::from_secret_bytes(KeyType::Rsa2048, &ec),
            Err(CryptoError::InvalidMaterial(_))
        ));
        assert!(matches!(
            KeyMaterial::from_secret_bytes(KeyType::Aes256, &aes[..16]),
            Err(CryptoError::InvalidMaterial(_))
        ));
        assert!(matches!(
            KeyMaterial::from_secret_bytes(KeyType::Ecdsa, &[]),
            Err(CryptoError::InvalidMaterial(_))
        ));
        let msg = KeyMaterial::from_secret_bytes(KeyType::Ecdsa, &[0u8; 32])
            .err()
            .unwrap()
            .to_string();
        assert!(msg.starts_with("invalid key material: "), "{msg}");
    }

    /// The at-rest flow: material wrapped under the root key with aad (tag, version) unwraps to the
    /// same key; another version's aad or another root key fails.
    #[test]
    fn wrap_material_at_rest() {
        let root = RootKey::from_bytes([9u8; 32]);
        for kind in KeyType::ALL {
            let m = KeyMaterial::generate(kind).unwrap();
            let wrapped = root.wrap(b"0123abcd:v1", &m.to_secret_bytes()).unwrap();
            let plain = root.unwrap(b"0123abcd:v1", &wrapped).unwrap();
            let back = KeyMaterial::from_secret_bytes(kind, &plain).unwrap();
            assert_eq!(back.public_key_pem(), m.public_key_pem());
            assert_eq!(*back.to_secret_bytes(), *m.to_secret_bytes());
            assert!(matches!(
                root.unwrap(b"0123abcd:v2", &wrapped),
                Err(CryptoError::DecryptFailed)
            ));
            assert!(
                RootKey::from_bytes([8u8; 32])
                    .unwrap(b"0123abcd:v1", &wrapped)
                    .is_err()
            );
        }
    }
}
