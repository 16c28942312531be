//! ECDSA P-256 with SHA-256 (SPEC §5). Signatures are ASN.1 DER; signing is deterministic
//! (RFC 6979) through p256's `Signer`.

use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{DerSignature, SigningKey};
use p256::elliptic_curve::Generate;
use p256::pkcs8::{EncodePublicKey, LineEnding};
use zeroize::{Zeroize, Zeroizing};

use super::CryptoError;

/// Length of the secret scalar in bytes.
pub const SCALAR_LEN: usize = 32;

/// One ECDSA P-256 key version. `SigningKey` zeroizes its scalar on drop and carries its
/// verifying key, so neither is re-derived per call. No `Debug`, no `Clone`.
pub struct EcdsaKey {
    signing: SigningKey,
    /// SPKI PEM of the public key, computed once.
    public_pem: String,
}

impl EcdsaKey {
    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let signing = SigningKey::try_generate().map_err(|_| CryptoError::Rng)?;
        Self::from_signing_key(signing)
    }

    /// A key from its 32-byte big-endian secret scalar.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != SCALAR_LEN {
            return Err(CryptoError::InvalidMaterial(
                "ECDSA P-256 scalar must be 32 bytes",
            ));
        }
        let signing = SigningKey::from_slice(bytes).map_err(|_| {
            CryptoError::InvalidMaterial("ECDSA P-256 scalar is zero or not below the group order")
        })?;
        Self::from_signing_key(signing)
    }

    fn from_signing_key(signing: SigningKey) -> Result<Self, CryptoError> {
        let public_pem = signing
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|_| CryptoError::Internal("cannot encode the ECDSA public key"))?;
        Ok(Self {
            signing,
            public_pem,
        })
    }

    /// The 32-byte secret scalar (for wrapping at rest).
    pub(crate) fn secret_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut bytes = self.signing.to_bytes();
        let out = Zeroizing::new(bytes.to_vec());
        bytes.as_mut_slice().zeroize();
        out
    }

    /// PEM "PUBLIC KEY" (SPKI).
    pub fn public_key_pem(&self) -> &str {
        &self.public_pem
    }

    /// Signs `msg` (hashed with SHA-256); returns the ASN.1 DER signature.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let sig: DerSignature = self
            .signing
            .try_sign(msg)
            .map_err(|_| CryptoError::Internal("ECDSA signing failed"))?;
        Ok(sig.as_bytes().to_vec())
    }

    /// Whether `der_sig` is a valid DER signature of `msg` under this key. Malformed input is
    /// simply `false`.
    pub fn verify(&self, msg: &[u8], der_sig: &[u8]) -> bool {
        match DerSignature::from_bytes(der_sig) {
            Ok(sig) => self.signing.verifying_key().verify(msg, &sig).is_ok(),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::{openssl, write_file};
    use super::*;

    /// Sign then verify succeeds, and the signature is DER (SEQUENCE of two INTEGERs, ≤ 72 bytes).
    #[test]
    fn sign_verify_round_trip() {
        let k = EcdsaKey::generate().unwrap();
        for msg in [&b""[..], b"hello", &[0xAB; 8192]] {
            let sig = k.sign(msg).unwrap();
            assert_eq!(sig[0], 0x30, "not a DER SEQUENCE");
            assert!(sig.len() <= 72);
            assert!(k.verify(msg, &sig));
        }
    }

    /// Verify is false for a changed message, another key, a flipped signature bit, and garbage.
    #[test]
    fn verify_rejects() {
        let k = EcdsaKey::generate().unwrap();
        let sig = k.sign(b"message").unwrap();
        assert!(!k.verify(b"messagE", &sig));
        assert!(!EcdsaKey::generate().unwrap().verify(b"message", &sig));
        for i in 0..sig.len() * 8 {
            let mut bad = sig.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(!k.verify(b"message", &bad), "bit {i} accepted");
        }
        assert!(!k.verify(b"message", b""));
        assert!(!k.verify(b"message", &[0u8; 64]));
    }

    /// Known answer: RFC 6979 A.2.5 (P-256, SHA-256, "sample") gives the published r and s.
    #[test]
    fn rfc6979_known_answer() {
        let x = [
            0xc9, 0xaf, 0xa9, 0xd8, 0x45, 0xba, 0x75, 0x16, 0x6b, 0x5c, 0x21, 0x57, 0x67, 0xb1,
            0xd6, 0x93, 0x4e, 0x50, 0xc3, 0xdb, 0x36, 0xe8, 0x9b, 0x12, 0x7b, 0x8a, 0x62, 0x2b,
            0x12, 0x0f, 0x67, 0x21,
        ];
        let k = EcdsaKey::from_slice(&x).unwrap();
        let der = k.sign(b"sample").unwrap();
        let sig = p256::ecdsa::Signature::from_der(&der).unwrap();
        assert_eq!(
            super::super::random::hex_lower(&sig.to_bytes()),
            "efd48b2aacb6a8fd1140dd9cd45e81d69d2c877b56aaf991c34d0ea84eaf3716\
             f7cb1c942d657c41d436c7a1b6e29f65f3e900dbb9aff4064dc4ab2f843acda8"
        );
    }

    /// Out-of-range or wrong-length scalars are refused with InvalidMaterial.
    #[test]
    fn bad_scalars_refused() {
        for bad in [vec![0u8; 32], vec![0xff; 32], vec![1u8; 31], vec![1u8; 33]] {
            assert!(matches!(
                EcdsaKey::from_slice(&bad),
                Err(CryptoError::InvalidMaterial(_))
            ));
        }
    }

    /// Interop: `openssl dgst -sha256 -verify` accepts our DER signature with our SPKI PEM, and rejects a changed message.
    #[test]
    fn openssl_verifies_ecdsa_signature() {
        let dir = tempfile::tempdir().unwrap();
        let k = EcdsaKey::generate().unwrap();
        let msg = b"interop message for openssl";
        let pem = write_file(dir.path(), "pub.pem", k.public_key_pem().as_bytes());
        let sig = write_file(dir.path(), "sig.bin", &k.sign(msg).unwrap());
        let good = write_file(dir.path(), "msg", msg);
        let bad = write_file(dir.path(), "msg2", b"interop message for openssL");
        let args = |m: &std::path::Path| {
            vec![
                "dgst".into(),
                "-sha256".into(),
                "-verify".into(),
                pem.clone().into_os_string(),
                "-signature".into(),
                sig.clone().into_os_string(),
                m.as_os_str().to_owned(),
            ]
        };
        let ok = openssl(&args(&good));
        assert!(ok.status.success(), "openssl refused: {ok:?}");
        assert!(String::from_utf8_lossy(&ok.stdout).contains("Verified OK"));
        let ko = openssl(&args(&bad));
        assert!(!ko.status.success(), "openssl accepted a changed message");
    }
}
