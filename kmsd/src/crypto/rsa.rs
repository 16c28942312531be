//! RSA-2048 on aws-lc-rs (SPEC §5): OAEP (SHA-256, MGF1-SHA-256, no label) encrypt/decrypt,
//! RSASSA-PSS (SHA-256, salt 32) and PKCS#1 v1.5 (SHA-256) sign/verify.
//!
//! The RustCrypto `rsa` crate is deliberately not used (RUSTSEC-2023-0071, Marvin): every
//! private-key operation runs in aws-lc, which is constant-time.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{
    KeyPair, KeySize, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey, OaepPublicEncryptingKey,
    PrivateDecryptingKey,
};
use aws_lc_rs::signature::{
    KeyPair as _, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256,
    RSA_PSS_2048_8192_SHA256, RSA_PSS_SHA256,
};
use pem_rfc7468::LineEnding;
use zeroize::Zeroizing;

use super::{CryptoError, SignScheme};

/// Modulus length in bytes (RSA-2048); also the length of every signature and ciphertext.
pub const MODULUS_LEN: usize = 256;
/// Largest OAEP-SHA-256 plaintext for a 2048-bit key: 256 - 2*32 - 2.
pub const MAX_OAEP_PLAINTEXT: usize = MODULUS_LEN - 2 * 32 - 2;

/// One RSA-2048 key version, parsed once into every aws-lc object an operation needs.
/// aws-lc frees (and clears) its key structures on drop; the PKCS#8 copy is zeroized.
/// No `Debug`, no `Clone`.
pub struct RsaKey {
    /// PKCS#8 DER of the private key, kept for wrapping at rest.
    pkcs8: Zeroizing<Vec<u8>>,
    /// Signing key.
    key_pair: KeyPair,
    /// OAEP decryption key.
    decrypting: OaepPrivateDecryptingKey,
    /// OAEP encryption key (public).
    encrypting: OaepPublicEncryptingKey,
    /// Parsed public key for PSS verification (salt length = digest length = 32).
    pss_verify: ParsedPublicKey,
    /// Parsed public key for PKCS#1 v1.5 verification.
    pkcs1_verify: ParsedPublicKey,
    /// SPKI PEM of the public key.
    public_pem: String,
}

impl RsaKey {
    /// A fresh 2048-bit key (e = 65537) generated inside aws-lc.
    pub fn generate() -> Result<Self, CryptoError> {
        let key_pair = KeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| CryptoError::Internal("RSA key generation failed"))?;
        let der = key_pair
            .as_der()
            .map_err(|_| CryptoError::Internal("cannot encode the RSA private key"))?;
        Self::from_pkcs8(der.as_ref())
    }

    /// A key from its PKCS#8 DER encoding. Only 2048-bit keys are accepted.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, CryptoError> {
        let key_pair = KeyPair::from_pkcs8(der)
            .map_err(|_| CryptoError::InvalidMaterial("not a valid RSA PKCS#8 private key"))?;
        if key_pair.public_modulus_len() != MODULUS_LEN {
            return Err(CryptoError::InvalidMaterial("RSA key is not 2048-bit"));
        }
        let private = PrivateDecryptingKey::from_pkcs8(der)
            .map_err(|_| CryptoError::InvalidMaterial("not a valid RSA PKCS#8 private key"))?;
        let encrypting = OaepPublicEncryptingKey::new(private.public_key())
            .map_err(|_| CryptoError::Internal("cannot build the RSA-OAEP public key"))?;
        let decrypting = OaepPrivateDecryptingKey::new(private)
            .map_err(|_| CryptoError::Internal("cannot build the RSA-OAEP private key"))?;
        let public = key_pair.public_key();
        let pss_verify = ParsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, public.as_ref())
            .map_err(|_| CryptoError::Internal("cannot parse the RSA public key"))?;
        let pkcs1_verify = ParsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public.as_ref())
            .map_err(|_| CryptoError::Internal("cannot parse the RSA public key"))?;
        let spki = public
            .as_der()
            .map_err(|_| CryptoError::Internal("cannot encode the RSA public key"))?;
        let public_pem = pem_rfc7468::encode_string("PUBLIC KEY", LineEnding::LF, spki.as_ref())
            .map_err(|_| CryptoError::Internal("cannot encode the RSA public key"))?;
        Ok(Self {
            pkcs8: Zeroizing::new(der.to_vec()),
            key_pair,
            decrypting,
            encrypting,
            pss_verify,
            pkcs1_verify,
            public_pem,
        })
    }

    /// The PKCS#8 DER (for wrapping at rest).
    pub(crate) fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// PEM "PUBLIC KEY" (SPKI).
    pub fn public_key_pem(&self) -> &str {
        &self.public_pem
    }

    /// Signs `msg` (SHA-256) with PSS (salt 32) or PKCS#1 v1.5; returns the raw 256-byte signature.
    pub fn sign(&self, scheme: SignScheme, msg: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut sig = vec![0u8; self.key_pair.public_modulus_len()];
        // aws-lc-rs ignores the rng argument (aws-lc draws the PSS salt itself).
        let rng = SystemRandom::new();
        let padding = match scheme {
            SignScheme::Pss => &RSA_PSS_SHA256,
            SignScheme::Pkcs1 => &RSA_PKCS1_SHA256,
        };
        self.key_pair
            .sign(padding, &rng, msg, &mut sig)
            .map_err(|_| CryptoError::Internal("RSA signing failed"))?;
        Ok(sig)
    }

    /// Whether `sig` is a valid signature of `msg` under `scheme`. Malformed input is `false`.
    pub fn verify(&self, scheme: SignScheme, msg: &[u8], sig: &[u8]) -> bool {
        let key = match scheme {
            SignScheme::Pss => &self.pss_verify,
            SignScheme::Pkcs1 => &self.pkcs1_verify,
        };
        key.verify_sig(msg, sig).is_ok()
    }

    /// RSA-OAEP (SHA-256, MGF1-SHA-256, no label) encryption; at most 190 bytes of plaintext.
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if plaintext.len() > MAX_OAEP_PLAINTEXT {
            return Err(CryptoError::Internal(
                "RSA-OAEP plaintext longer than 190 bytes",
            ));
        }
        let mut out = vec![0u8; self.encrypting.ciphertext_size()];
        let len = self
            .encrypting
            .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, None)
            .map_err(|_| CryptoError::Internal("RSA-OAEP encryption failed"))?
            .len();
        out.truncate(len);
        Ok(out)
    }

    /// RSA-OAEP decryption. Every failure (wrong length, wrong key, bad padding) is
    /// [`CryptoError::DecryptFailed`], with no distinction a caller could time or observe.
    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if ciphertext.len() != MODULUS_LEN {
            return Err(CryptoError::DecryptFailed);
        }
        let mut out = Zeroizing::new(vec![0u8; self.decrypting.min_output_size()]);
        let len = self
            .decrypting
            .decrypt(&OAEP_SHA256_MGF1SHA256, ciphertext, &mut out, None)
            .map_err(|_| CryptoError::DecryptFailed)?
            .len();
        out.truncate(len);
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::{openssl, write_file};
    use super::*;
    use std::ffi::OsString;
    use std::sync::OnceLock;

    /// One generated key shared by the tests (RSA key generation is slow).
    fn key() -> &'static RsaKey {
        static KEY: OnceLock<RsaKey> = OnceLock::new();
        KEY.get_or_init(|| RsaKey::generate().unwrap())
    }

    /// OAEP round-trips for 0, 1, 32 and 190-byte plaintexts; ciphertexts are 256 bytes and randomized.
    #[test]
    fn oaep_round_trip() {
        let k = key();
        for len in [0usize, 1, 32, MAX_OAEP_PLAINTEXT] {
            let pt = vec![0x5a; len];
            let ct = k.encrypt(&pt).unwrap();
            assert_eq!(ct.len(), MODULUS_LEN);
            assert_eq!(*k.decrypt(&ct).unwrap(), pt);
            assert_ne!(k.encrypt(&pt).unwrap(), ct, "OAEP must be randomized");
        }
    }

    /// A 191-byte plaintext is refused.
    #[test]
    fn oaep_191_bytes_refused() {
        assert_eq!(MAX_OAEP_PLAINTEXT, 190);
        assert!(key().encrypt(&[1u8; 191]).is_err());
    }

    /// A corrupted ciphertext (any byte flipped, truncated, extended, or another key's) is DecryptFailed.
    #[test]
    fn oaep_corrupted_fails() {
        let k = key();
        let ct = k.encrypt(b"secret").unwrap();
        for i in [0usize, 1, 100, 200, 255] {
            let mut bad = ct.clone();
            bad[i] ^= 0x01;
            assert!(
                matches!(k.decrypt(&bad), Err(CryptoError::DecryptFailed)),
                "byte {i}"
            );
        }
        assert!(matches!(
            k.decrypt(&ct[..255]),
            Err(CryptoError::DecryptFailed)
        ));
        let mut long = ct.clone();
        long.push(0);
        assert!(matches!(k.decrypt(&long), Err(CryptoError::DecryptFailed)));
        assert!(matches!(k.decrypt(&[]), Err(CryptoError::DecryptFailed)));
        assert!(matches!(
            k.decrypt(&[0xff; 256]),
            Err(CryptoError::DecryptFailed)
        ));
        let other = RsaKey::generate().unwrap();
        assert!(matches!(
            other.decrypt(&ct),
            Err(CryptoError::DecryptFailed)
        ));
    }

    /// PSS and PKCS#1 v1.5 sign/verify round-trip; a changed message, the other scheme, or a flipped bit verify false.
    #[test]
    fn sign_verify_both_schemes() {
        let k = key();
        for scheme in [SignScheme::Pss, SignScheme::Pkcs1] {
            let sig = k.sign(scheme, b"message").unwrap();
            assert_eq!(sig.len(), MODULUS_LEN);
            assert!(k.verify(scheme, b"message", &sig));
            assert!(!k.verify(scheme, b"messagE", &sig));
            let other = match scheme {
                SignScheme::Pss => SignScheme::Pkcs1,
                SignScheme::Pkcs1 => SignScheme::Pss,
            };
            assert!(!k.verify(other, b"message", &sig));
            let mut bad = sig.clone();
            bad[17] ^= 0x40;
            assert!(!k.verify(scheme, b"message", &bad));
            assert!(!k.verify(scheme, b"message", &sig[..255]));
            assert!(!k.verify(scheme, b"message", b""));
        }
        // PKCS#1 v1.5 is deterministic, PSS is randomized (fresh salt).
        assert_eq!(
            k.sign(SignScheme::Pkcs1, b"m").unwrap(),
            k.sign(SignScheme::Pkcs1, b"m").unwrap()
        );
        assert_ne!(
            k.sign(SignScheme::Pss, b"m").unwrap(),
            k.sign(SignScheme::Pss, b"m").unwrap()
        );
    }

    /// Only 2048-bit PKCS#8 RSA keys are accepted; garbage is InvalidMaterial.
    #[test]
    fn from_pkcs8_rejects() {
        assert!(matches!(
            RsaKey::from_pkcs8(b"not der"),
            Err(CryptoError::InvalidMaterial(_))
        ));
        let k3072 = KeyPair::generate(KeySize::Rsa3072).unwrap();
        let der = k3072.as_der().unwrap();
        assert!(matches!(
            RsaKey::from_pkcs8(der.as_ref()),
            Err(CryptoError::InvalidMaterial("RSA key is not 2048-bit"))
        ));
        let mut truncated = key().pkcs8_der().to_vec();
        truncated.truncate(truncated.len() / 2);
        assert!(RsaKey::from_pkcs8(&truncated).is_err());
    }

    fn openssl_verify(
        pem: &std::path::Path,
        sig: &std::path::Path,
        msg: &std::path::Path,
        pss: bool,
    ) -> std::process::Output {
        let mut args: Vec<OsString> = vec!["dgst".into(), "-sha256".into()];
        if pss {
            for opt in ["rsa_padding_mode:pss", "rsa_pss_saltlen:32"] {
                args.push("-sigopt".into());
                args.push(opt.into());
            }
        }
        args.extend([
            "-verify".into(),
            pem.as_os_str().to_owned(),
            "-signature".into(),
            sig.as_os_str().to_owned(),
            msg.as_os_str().to_owned(),
        ]);
        openssl(&args)
    }

    /// Interop: openssl verifies our PSS (salt 32) and PKCS#1 v1.5 signatures with our SPKI PEM, and rejects a changed message.
    #[test]
    fn openssl_verifies_rsa_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let k = key();
        let msg = b"interop message for openssl";
        let pem = write_file(dir.path(), "pub.pem", k.public_key_pem().as_bytes());
        let good = write_file(dir.path(), "msg", msg);
        let bad = write_file(dir.path(), "msg2", b"interop message for openssL");
        for (scheme, pss) in [(SignScheme::Pss, true), (SignScheme::Pkcs1, false)] {
            let sig = write_file(dir.path(), "sig.bin", &k.sign(scheme, msg).unwrap());
            let ok = openssl_verify(&pem, &sig, &good, pss);
            assert!(ok.status.success(), "openssl refused {scheme:?}: {ok:?}");
            assert!(String::from_utf8_lossy(&ok.stdout).contains("Verified OK"));
            let ko = openssl_verify(&pem, &sig, &bad, pss);
            assert!(!ko.status.success(), "openssl accepted a changed message");
        }
    }

    /// Interop: a message OAEP-encrypted by `openssl pkeyutl` with our public PEM decrypts with RsaKey::decrypt.
    #[test]
    fn openssl_oaep_encrypts_for_us() {
        let dir = tempfile::tempdir().unwrap();
        let k = key();
        let msg: Vec<u8> = (0u8..190).collect();
        let pem = write_file(dir.path(), "pub.pem", k.public_key_pem().as_bytes());
        let input = write_file(dir.path(), "msg", &msg);
        let output = dir.path().join("ct.bin");
        let mut args: Vec<OsString> = vec![
            "pkeyutl".into(),
            "-encrypt".into(),
            "-pubin".into(),
            "-inkey".into(),
            pem.into_os_string(),
        ];
        for opt in [
            "rsa_padding_mode:oaep",
            "rsa_oaep_md:sha256",
            "rsa_mgf1_md:sha256",
        ] {
            args.push("-pkeyopt".into());
            args.push(opt.into());
        }
        args.extend([
            "-in".into(),
            input.into_os_string(),
            "-out".into(),
            output.clone().into_os_string(),
        ]);
        let out = openssl(&args);
        assert!(out.status.success(), "openssl pkeyutl failed: {out:?}");
        let ct = std::fs::read(&output).unwrap();
        assert_eq!(ct.len(), MODULUS_LEN);
        assert_eq!(*k.decrypt(&ct).unwrap(), msg);
    }
}
