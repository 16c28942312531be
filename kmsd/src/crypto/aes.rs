//! AES-256-GCM (SPEC §5): random-nonce and convergent encryption.
//!
//! Body format for both modes: `nonce (12) || ciphertext || tag (16)`.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use super::CryptoError;
use super::random::fill_random;

/// AES-256 key length in bytes.
pub const KEY_LEN: usize = 32;
/// GCM nonce length in bytes.
pub const NONCE_LEN: usize = 12;
/// GCM tag length in bytes.
pub const TAG_LEN: usize = 16;
/// Bytes an AES body adds to the plaintext (nonce + tag).
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// HKDF info prefix for convergent encryption; the context follows it.
const CONVERGENT_INFO: &[u8] = b"kms/convergent/v1";

/// One AES-256 key version. The cipher (expanded key schedule) is built once;
/// everything secret is zeroized on drop. No `Debug`, no `Clone`.
pub struct AesKey {
    /// Expanded AES-256-GCM state for random-nonce encryption (zeroized on drop by aes-gcm).
    cipher: Aes256Gcm,
    /// The raw key, kept only for `to_secret_bytes` (wrapping at rest).
    raw: Zeroizing<[u8; KEY_LEN]>,
    /// HKDF-Extract(salt = none, ikm = raw): the convergent derivation's PRK, computed once.
    convergent_prk: Zeroizing<[u8; 32]>,
}

impl AesKey {
    /// A fresh random key from the OS CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut raw = Zeroizing::new([0u8; KEY_LEN]);
        fill_random(raw.as_mut_slice())?;
        Self::from_array(raw)
    }

    /// A key from its 32 raw bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        let mut raw = Zeroizing::new([0u8; KEY_LEN]);
        if bytes.len() != KEY_LEN {
            return Err(CryptoError::InvalidMaterial("AES-256 key must be 32 bytes"));
        }
        raw.copy_from_slice(bytes);
        Self::from_array(raw)
    }

    fn from_array(raw: Zeroizing<[u8; KEY_LEN]>) -> Result<Self, CryptoError> {
        let cipher = Aes256Gcm::new_from_slice(raw.as_slice())
            .map_err(|_| CryptoError::InvalidMaterial("AES-256 key must be 32 bytes"))?;
        let (mut prk, _) = Hkdf::<Sha256>::extract(None, raw.as_slice());
        let mut convergent_prk = Zeroizing::new([0u8; 32]);
        convergent_prk.copy_from_slice(prk.as_slice());
        prk.as_mut_slice().zeroize();
        Ok(Self {
            cipher,
            raw,
            convergent_prk,
        })
    }

    /// The raw key bytes (for wrapping at rest).
    pub(crate) fn raw_bytes(&self) -> &[u8; KEY_LEN] {
        &self.raw
    }

    /// Encrypts with a fresh random 96-bit nonce from the OS CSPRNG.
    /// Returns `nonce || ciphertext || tag`.
    pub fn encrypt_random(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        seal(&self.cipher, &nonce, aad, plaintext)
    }

    /// Convergent (deterministic) encryption, SPEC §5.
    ///
    /// HKDF-SHA256 over the version key with info `b"kms/convergent/v1" || context` gives
    /// 64 bytes: a per-context encryption key (32) and a MAC key (32). The nonce is the first
    /// 12 bytes of `HMAC-SHA256(mac key, be64(len(aad)) || aad || plaintext)`, so the same
    /// context + AAD + plaintext always gives the same body, and two different plaintexts
    /// (or AADs) under one context get different nonces (up to a 2^-96 collision chance),
    /// so GCM's nonce uniqueness holds per derived key.
    pub fn encrypt_convergent(
        &self,
        context: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let (cipher, mac) = self.convergent_keys(context)?;
        let nonce = convergent_nonce(mac, aad, plaintext);
        seal(&cipher, &nonce, aad, plaintext)
    }

    /// Decrypts a body produced by [`AesKey::encrypt_random`]. Any failure (wrong key, AAD,
    /// truncated or tampered body) is [`CryptoError::DecryptFailed`].
    pub fn decrypt(&self, aad: &[u8], body: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        open(&self.cipher, aad, body)
    }

    /// Decrypts a body produced by [`AesKey::encrypt_convergent`] with the same context.
    pub fn decrypt_convergent(
        &self,
        context: &[u8],
        aad: &[u8],
        body: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if body.len() < OVERHEAD {
            return Err(CryptoError::DecryptFailed);
        }
        let (cipher, _) = self.convergent_keys(context)?;
        open(&cipher, aad, body)
    }

    /// Per-context encryption cipher and keyed MAC (HKDF-Expand from the cached PRK).
    fn convergent_keys(&self, context: &[u8]) -> Result<(Aes256Gcm, Hmac<Sha256>), CryptoError> {
        let hkdf = Hkdf::<Sha256>::from_prk(self.convergent_prk.as_slice())
            .map_err(|_| CryptoError::Internal("HKDF PRK has the wrong length"))?;
        let mut okm = Zeroizing::new([0u8; 2 * KEY_LEN]);
        hkdf.expand_multi_info(&[CONVERGENT_INFO, context], okm.as_mut_slice())
            .map_err(|_| CryptoError::Internal("HKDF expand failed"))?;
        let (enc_key, mac_key) = okm.split_at(KEY_LEN);
        let cipher = Aes256Gcm::new_from_slice(enc_key)
            .map_err(|_| CryptoError::Internal("derived AES key has the wrong length"))?;
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(mac_key)
            .map_err(|_| CryptoError::Internal("derived MAC key has the wrong length"))?;
        Ok((cipher, mac))
    }
}

/// First 12 bytes of HMAC(mac key, be64(len(aad)) || aad || plaintext).
fn convergent_nonce(mut mac: Hmac<Sha256>, aad: &[u8], plaintext: &[u8]) -> [u8; NONCE_LEN] {
    mac.update(&(aad.len() as u64).to_be_bytes());
    mac.update(aad);
    mac.update(plaintext);
    let mut full = mac.finalize().into_bytes();
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&full[..NONCE_LEN]);
    full.as_mut_slice().zeroize();
    nonce
}

/// Stack overwritten after each seal or open: 8 KiB, the cipher's frames with room to
/// spare, ~0.1 µs. A debug build's unoptimised frames go deeper, and left copies of the
/// key schedule 70 KiB down (`purged_keys_leave_no_copy_in_daemon_memory`): 128 KiB
/// there.
const AES_STACK_WORDS: usize = if cfg!(debug_assertions) { 16384 } else { 1024 };

/// AES-GCM encryption to `nonce || ciphertext || tag` in one allocation.
pub(crate) fn seal(
    cipher: &Aes256Gcm,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.extend_from_slice(nonce);
    out.extend_from_slice(plaintext);
    let nonce = Nonce::from(*nonce);
    let sealed = encrypt_in_place(cipher, &nonce, aad, &mut out[NONCE_LEN..]);
    super::wipe_stack::<AES_STACK_WORDS>();
    match sealed {
        Ok(tag) => {
            out.extend_from_slice(tag.as_slice());
            Ok(out)
        }
        Err(_) => {
            // The buffer still holds (part of) the plaintext.
            out.zeroize();
            Err(CryptoError::Internal("AES-GCM input too long"))
        }
    }
}

/// AES-GCM decryption of `nonce || ciphertext || tag`; the tag is checked before any
/// plaintext is produced. Every failure is `DecryptFailed`.
pub(crate) fn open(
    cipher: &Aes256Gcm,
    aad: &[u8],
    body: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if body.len() < OVERHEAD {
        return Err(CryptoError::DecryptFailed);
    }
    let (nonce, rest) = body.split_at(NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let nonce = Nonce::try_from(nonce).map_err(|_| CryptoError::DecryptFailed)?;
    let tag = Tag::try_from(tag).map_err(|_| CryptoError::DecryptFailed)?;
    let mut out = Zeroizing::new(ciphertext.to_vec());
    let opened = decrypt_in_place(cipher, &nonce, aad, &mut out, &tag);
    super::wipe_stack::<AES_STACK_WORDS>();
    opened.map_err(|_| CryptoError::DecryptFailed)?;
    Ok(out)
}

/// The cipher, in a frame of its own below its caller's (never inlined into it), so that
/// [`super::wipe_stack`], called next by the same caller, covers everything it left.
///
/// AES-GCM works on blocks of the plaintext in stack arrays, and those stay behind until
/// later calls happen to overwrite them: the last data keys a thread encrypted or
/// decrypted were found there (`data_keys_leave_no_copy_in_daemon_memory`,
/// tests/tests/secrets.rs).
#[inline(never)]
fn encrypt_in_place(
    cipher: &Aes256Gcm,
    nonce: &aes_gcm::aead::Nonce<Aes256Gcm>,
    aad: &[u8],
    buf: &mut [u8],
) -> Result<Tag, aes_gcm::Error> {
    cipher.encrypt_inout_detached(nonce, aad, buf.into())
}

/// See [`encrypt_in_place`].
#[inline(never)]
fn decrypt_in_place(
    cipher: &Aes256Gcm,
    nonce: &aes_gcm::aead::Nonce<Aes256Gcm>,
    aad: &[u8],
    buf: &mut [u8],
    tag: &Tag,
) -> Result<(), aes_gcm::Error> {
    cipher.decrypt_inout_detached(nonce, aad, buf.into(), tag)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn key() -> AesKey {
        AesKey::generate().unwrap()
    }

    fn nonce_of(body: &[u8]) -> [u8; NONCE_LEN] {
        body[..NONCE_LEN].try_into().unwrap()
    }

    /// Random-nonce encryption round-trips (empty, short and 32 KiB plaintexts) with the stated body size.
    #[test]
    fn random_round_trip() {
        let k = key();
        for len in [0usize, 1, 15, 16, 17, 1000, 32 * 1024] {
            let pt: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let body = k.encrypt_random(b"aad", &pt).unwrap();
            assert_eq!(body.len(), pt.len() + OVERHEAD);
            assert_eq!(*k.decrypt(b"aad", &body).unwrap(), pt);
        }
    }

    /// The ciphertext is not the plaintext, and two encryptions of the same message use different nonces.
    #[test]
    fn random_nonces_are_fresh() {
        let k = key();
        let pt = b"attack at dawn, attack at dawn!!";
        let a = k.encrypt_random(b"", pt).unwrap();
        let b = k.encrypt_random(b"", pt).unwrap();
        assert_ne!(nonce_of(&a), nonce_of(&b));
        assert_ne!(a, b);
        assert!(!a.windows(pt.len()).any(|w| w == pt));
    }

    /// The right AAD decrypts; a different AAD fails with DecryptFailed.
    #[test]
    fn wrong_aad_fails() {
        let k = key();
        let body = k.encrypt_random(b"tag1:v1", b"secret").unwrap();
        assert_eq!(*k.decrypt(b"tag1:v1", &body).unwrap(), b"secret");
        assert!(matches!(
            k.decrypt(b"tag1:v2", &body),
            Err(CryptoError::DecryptFailed)
        ));
        assert!(matches!(
            k.decrypt(b"", &body),
            Err(CryptoError::DecryptFailed)
        ));
    }

    /// Decrypting with a different key fails with DecryptFailed.
    #[test]
    fn wrong_key_fails() {
        let body = key().encrypt_random(b"a", b"secret").unwrap();
        assert!(matches!(
            key().decrypt(b"a", &body),
            Err(CryptoError::DecryptFailed)
        ));
    }

    /// Every single-bit flip anywhere in the body (nonce, ciphertext, tag) is rejected.
    #[test]
    fn every_bit_flip_fails() {
        let k = key();
        let body = k
            .encrypt_random(b"aad", b"thirty-two bytes of plaintext!!!")
            .unwrap();
        for i in 0..body.len() * 8 {
            let mut bad = body.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                matches!(k.decrypt(b"aad", &bad), Err(CryptoError::DecryptFailed)),
                "bit {i} accepted"
            );
        }
    }

    /// Every single-bit flip of a convergent body is rejected too.
    #[test]
    fn every_bit_flip_fails_convergent() {
        let k = key();
        let body = k.encrypt_convergent(b"ctx", b"aad", b"hello").unwrap();
        for i in 0..body.len() * 8 {
            let mut bad = body.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(matches!(
                k.decrypt_convergent(b"ctx", b"aad", &bad),
                Err(CryptoError::DecryptFailed)
            ));
        }
    }

    /// Truncated bodies (shorter than nonce + tag, or cut anywhere) are DecryptFailed, never a panic.
    #[test]
    fn truncated_bodies_fail() {
        let k = key();
        let body = k.encrypt_random(b"", b"0123456789").unwrap();
        for n in 0..body.len() {
            assert!(matches!(
                k.decrypt(b"", &body[..n]),
                Err(CryptoError::DecryptFailed)
            ));
            assert!(matches!(
                k.decrypt_convergent(b"c", b"", &body[..n]),
                Err(CryptoError::DecryptFailed)
            ));
        }
    }

    /// Convergent: same context + plaintext gives identical output, and it round-trips.
    #[test]
    fn convergent_is_deterministic() {
        let k = key();
        let a = k
            .encrypt_convergent(b"user-42", b"aad", b"4111 1111 1111 1111")
            .unwrap();
        let b = k
            .encrypt_convergent(b"user-42", b"aad", b"4111 1111 1111 1111")
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(
            *k.decrypt_convergent(b"user-42", b"aad", &a).unwrap(),
            b"4111 1111 1111 1111"
        );
        // The same key reloaded from its bytes gives the same output.
        let k2 = AesKey::from_slice(k.raw_bytes()).unwrap();
        assert_eq!(
            k2.encrypt_convergent(b"user-42", b"aad", b"4111 1111 1111 1111")
                .unwrap(),
            a
        );
    }

    /// Convergent: a different context gives a different output, and decrypting with the wrong context fails.
    #[test]
    fn convergent_context_separates() {
        let k = key();
        let a = k
            .encrypt_convergent(b"ctx-a", b"aad", b"same plaintext")
            .unwrap();
        let b = k
            .encrypt_convergent(b"ctx-b", b"aad", b"same plaintext")
            .unwrap();
        assert_ne!(a, b);
        assert_ne!(a[NONCE_LEN..], b[NONCE_LEN..]);
        assert!(matches!(
            k.decrypt_convergent(b"ctx-b", b"aad", &a),
            Err(CryptoError::DecryptFailed)
        ));
        // A convergent body is not decryptable as a random-mode body under the version key.
        assert!(matches!(
            k.decrypt(b"aad", &a),
            Err(CryptoError::DecryptFailed)
        ));
        // Nor with a different AAD.
        assert!(matches!(
            k.decrypt_convergent(b"ctx-a", b"other", &a),
            Err(CryptoError::DecryptFailed)
        ));
    }

    /// Convergent output depends on the version key: two keys give different bodies for the same input.
    #[test]
    fn convergent_depends_on_key() {
        let a = key().encrypt_convergent(b"c", b"", b"p").unwrap();
        let b = key().encrypt_convergent(b"c", b"", b"p").unwrap();
        assert_ne!(a, b);
    }

    /// Convergent: 10,000 different plaintexts under one context get 10,000 distinct nonces.
    #[test]
    fn convergent_nonces_distinct_for_distinct_plaintexts() {
        let k = key();
        let mut nonces = HashSet::with_capacity(10_000);
        for i in 0u32..10_000 {
            let body = k
                .encrypt_convergent(b"one-context", b"aad", &i.to_le_bytes())
                .unwrap();
            assert!(nonces.insert(nonce_of(&body)), "nonce reused at {i}");
        }
        assert_eq!(nonces.len(), 10_000);
    }

    /// Convergent: the same plaintext with a different AAD gets a different nonce (no GCM nonce reuse).
    #[test]
    fn convergent_nonce_depends_on_aad() {
        let k = key();
        let a = k.encrypt_convergent(b"c", b"aad-1", b"p").unwrap();
        let b = k.encrypt_convergent(b"c", b"aad-2", b"p").unwrap();
        assert_ne!(nonce_of(&a), nonce_of(&b));
    }

    /// Known answer: `seal` matches the GCM spec's AES-256 test case 14 (zero key, zero IV, one zero block).
    #[test]
    fn aes_gcm_known_answer() {
        // From the GCM spec (McGrew & Viega), test case 14: K = 0^256, IV = 0^96, P = 0^128.
        let k = AesKey::from_slice(&[0u8; 32]).unwrap();
        let body = seal(&k.cipher, &[0u8; 12], b"", &[0u8; 16]).unwrap();
        let hex = super::super::random::hex_lower(&body[NONCE_LEN..]);
        assert_eq!(
            hex,
            "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"
        );
    }

    /// A key of the wrong length is refused with InvalidMaterial.
    #[test]
    fn wrong_key_length_refused() {
        for n in [0usize, 16, 31, 33, 64] {
            assert!(matches!(
                AesKey::from_slice(&vec![7u8; n]),
                Err(CryptoError::InvalidMaterial(_))
            ));
        }
    }
}
