//! One key version inside a token: generated there, found again by `CKA_ID`, used there.
//!
//! Outputs are byte for byte the formats of `basic` keys (SPEC §5): AES bodies are
//! nonce ‖ ciphertext ‖ tag, ECDSA signatures ASN.1 DER, RSA signatures and ciphertexts
//! raw, public keys SPKI PEM. A client cannot tell the protection level from them.

use super::der;
use super::token::{Call, OAEP_NATIVE, OAEP_RAW, OAEP_UNKNOWN, OpError, Token};
use super::{HsmError, object_label, rv_of};
use crate::crypto::{KeyType, SignScheme, fill_random};
use aws_lc_rs::rsa::{OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey};
use aws_lc_rs::signature::{ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256};
use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{DerSignature, Signature, VerifyingKey};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use sha2::{Digest, Sha256};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use zeroize::Zeroizing;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const RSA_BITS: u64 = 2048;
const RSA_LEN: usize = 256;
/// Largest OAEP-SHA-256 plaintext for RSA-2048 (256 - 2*32 - 2).
const MAX_OAEP_PLAINTEXT: usize = 190;
/// DER of the P-256 curve OID (prime256v1), the `CKA_EC_PARAMS` of the key pairs.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The public half, read once from the token.
enum Public {
    None,
    Ec {
        verifying: VerifyingKey,
        pem: String,
    },
    Rsa {
        encrypting: OaepPublicEncryptingKey,
        pss: ParsedPublicKey,
        pkcs1: ParsedPublicKey,
        pem: String,
    },
}

/// A key version in a token. Holds no secret: only where the key is and its public half.
pub struct HsmKey {
    token: Arc<Token>,
    kind: KeyType,
    id: Vec<u8>,
    /// `version N of key NAME`, for messages.
    what: String,
    public: Public,
    /// The secret or private object's handle, valid within one library generation.
    handle: Mutex<Option<(u64, ObjectHandle)>>,
}

impl HsmKey {
    /// Generates a version inside the token (sensitive, never extractable, a token
    /// object labelled after the key and version) and returns it ready for use.
    pub fn generate(
        token: Arc<Token>,
        kind: KeyType,
        tag: &str,
        version: u32,
        id: Vec<u8>,
        what: String,
    ) -> Result<HsmKey, HsmError> {
        let label = object_label(tag, version).into_bytes();
        let common = |class: ObjectClass, key_type: CkKeyType| {
            vec![
                Attribute::Class(class),
                Attribute::KeyType(key_type),
                Attribute::Token(true),
                Attribute::Id(id.clone()),
                Attribute::Label(label.clone()),
            ]
        };
        let secret = |mut t: Vec<Attribute>| {
            t.extend([
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Derive(false),
                Attribute::Unwrap(false),
            ]);
            t
        };
        token.run(|c| {
            // Objects with this id can only be left from a generation whose version was
            // never committed (a crash or a failed commit), so never used: replace them.
            destroy_on(c, &id)?;
            let s = c.session;
            let r = match kind {
                KeyType::Aes256 => {
                    let mut t = secret(common(ObjectClass::SECRET_KEY, CkKeyType::AES));
                    t.extend([
                        Attribute::ValueLen(32.into()),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::Sign(false),
                        // CKA_WRAP exists for secret and public keys only.
                        Attribute::Wrap(false),
                    ]);
                    s.generate_key(&Mechanism::AesKeyGen, &t).map(|_| ())
                }
                KeyType::Ecdsa => {
                    let mut public = common(ObjectClass::PUBLIC_KEY, CkKeyType::EC);
                    public.extend([
                        Attribute::EcParams(P256_PARAMS.to_vec()),
                        Attribute::Verify(true),
                        Attribute::Private(false),
                    ]);
                    let mut private = secret(common(ObjectClass::PRIVATE_KEY, CkKeyType::EC));
                    private.extend([Attribute::Sign(true), Attribute::Decrypt(false)]);
                    s.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
                        .map(|_| ())
                }
                KeyType::Rsa2048 => {
                    let mut public = common(ObjectClass::PUBLIC_KEY, CkKeyType::RSA);
                    public.extend([
                        Attribute::ModulusBits(RSA_BITS.into()),
                        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                        Attribute::Encrypt(true),
                        Attribute::Verify(true),
                        Attribute::Private(false),
                    ]);
                    let mut private = secret(common(ObjectClass::PRIVATE_KEY, CkKeyType::RSA));
                    private.extend([Attribute::Sign(true), Attribute::Decrypt(true)]);
                    s.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
                        .map(|_| ())
                }
            };
            r.map_err(|e| OpError::Ck("key generation", e))
        })?;
        // Objects made and not loaded (the token gone, busy, an odd public half) are
        // referenced by nothing that could destroy them later: destroyed now, if it can.
        Self::load(token.clone(), kind, id.clone(), what).inspect_err(|_| {
            let _ = token.run(|c| destroy_on(c, &id));
        })
    }

    /// Finds a version's objects in the token and reads its public half.
    pub fn load(
        token: Arc<Token>,
        kind: KeyType,
        id: Vec<u8>,
        what: String,
    ) -> Result<HsmKey, HsmError> {
        let mut key = HsmKey {
            token,
            kind,
            id,
            what,
            public: Public::None,
            handle: Mutex::new(None),
        };
        key.public = match kind {
            KeyType::Aes256 => Public::None,
            KeyType::Ecdsa => {
                let point = key.public_attrs(&[AttributeType::EcPoint])?;
                let point = match point.as_slice() {
                    [Attribute::EcPoint(p)] => p.clone(),
                    _ => return Err(key.bad("the token returned no EC point")),
                };
                let sec1 = der::ec_point(&point).ok_or_else(|| {
                    key.bad("the token's EC point is not an uncompressed P-256 point")
                })?;
                let verifying = VerifyingKey::from_sec1_bytes(sec1)
                    .map_err(|_| key.bad("the token's EC point is not on P-256"))?;
                let pem = verifying
                    .to_public_key_pem(LineEnding::LF)
                    .map_err(|_| key.bad("cannot encode the EC public key"))?;
                Public::Ec { verifying, pem }
            }
            KeyType::Rsa2048 => {
                let attrs =
                    key.public_attrs(&[AttributeType::Modulus, AttributeType::PublicExponent])?;
                let (n, e) = match attrs.as_slice() {
                    [Attribute::Modulus(n), Attribute::PublicExponent(e)] => (n, e),
                    _ => return Err(key.bad("the token returned no RSA modulus and exponent")),
                };
                let spki = der::rsa_spki(n, e);
                let pkcs1 = der::rsa_public_key(n, e);
                let public = PublicEncryptingKey::from_der(&spki)
                    .map_err(|_| key.bad("the token's RSA public key is not valid"))?;
                if public.key_size_bytes() != RSA_LEN {
                    return Err(key.bad("the token's RSA key is not 2048-bit"));
                }
                let encrypting = OaepPublicEncryptingKey::new(public)
                    .map_err(|_| key.bad("cannot build the RSA-OAEP public key"))?;
                let pss = ParsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, &pkcs1)
                    .map_err(|_| key.bad("cannot parse the RSA public key"))?;
                let pkcs1 = ParsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &pkcs1)
                    .map_err(|_| key.bad("cannot parse the RSA public key"))?;
                let pem =
                    pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, &spki)
                        .map_err(|_| key.bad("cannot encode the RSA public key"))?;
                Public::Rsa {
                    encrypting,
                    pss,
                    pkcs1,
                    pem,
                }
            }
        };
        // The secret or private object must be there too (and its handle is cached).
        key.token.run(|c| key.object(c).map(|_| ()))?;
        Ok(key)
    }

    pub fn key_type(&self) -> KeyType {
        self.kind
    }

    /// The objects' `CKA_ID`.
    pub fn id(&self) -> &[u8] {
        &self.id
    }

    pub fn token(&self) -> &Arc<Token> {
        &self.token
    }

    /// PEM "PUBLIC KEY" (SPKI) for ECDSA and RSA; `None` for AES.
    pub fn public_key_pem(&self) -> Option<&str> {
        match &self.public {
            Public::None => None,
            Public::Ec { pem, .. } | Public::Rsa { pem, .. } => Some(pem),
        }
    }

    /// AES-256-GCM in the token with a fresh random nonce: `nonce ‖ ciphertext ‖ tag`.
    pub fn encrypt_aes(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, HsmError> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce).map_err(|_| self.bad("random number generator failed"))?;
        let sealed = self.token.run(|c| {
            let h = self.object(c)?;
            let mut iv = nonce;
            let params = GcmParams::new(&mut iv, aad, ((TAG_LEN * 8) as u64).into())
                .map_err(|e| OpError::Ck("AES-GCM parameters", e))?;
            c.session
                .encrypt(&Mechanism::AesGcm(params), h, plaintext)
                .map_err(|e| self.failed("AES-GCM encryption", e))
        })?;
        if sealed.len() != plaintext.len() + TAG_LEN {
            return Err(self.bad("the token's AES-GCM output has an unexpected length"));
        }
        let mut body = Vec::with_capacity(NONCE_LEN + sealed.len());
        body.extend_from_slice(&nonce);
        body.extend_from_slice(&sealed);
        Ok(body)
    }

    /// Opens `nonce ‖ ciphertext ‖ tag` in the token; any authentication failure is
    /// `DecryptFailed`.
    pub fn decrypt_aes(&self, aad: &[u8], body: &[u8]) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        if body.len() < NONCE_LEN + TAG_LEN {
            return Err(HsmError::DecryptFailed);
        }
        let (nonce, sealed) = body.split_at(NONCE_LEN);
        self.token.run(|c| {
            let h = self.object(c)?;
            let mut iv = [0u8; NONCE_LEN];
            iv.copy_from_slice(nonce);
            let params = GcmParams::new(&mut iv, aad, ((TAG_LEN * 8) as u64).into())
                .map_err(|e| OpError::Ck("AES-GCM parameters", e))?;
            match c.session.decrypt(&Mechanism::AesGcm(params), h, sealed) {
                Ok(pt) => Ok(Zeroizing::new(pt)),
                // Tokens report a wrong tag differently (SoftHSM2: CKR_GENERAL_ERROR).
                Err(e) if is_bad_ciphertext(&e) => Err(HsmError::DecryptFailed.into()),
                Err(e) => Err(self.failed("AES-GCM decryption", e)),
            }
        })
    }

    /// Signs in the token: ECDSA over the SHA-256 digest (DER), RSA-PSS SHA-256 salt 32
    /// or PKCS#1 v1.5 SHA-256 (raw).
    pub fn sign(&self, scheme: SignScheme, msg: &[u8]) -> Result<Vec<u8>, HsmError> {
        match self.kind {
            KeyType::Ecdsa => {
                let digest = Sha256::digest(msg);
                let raw = self.token.run(|c| {
                    let h = self.object(c)?;
                    c.session
                        .sign(&Mechanism::Ecdsa, h, &digest)
                        .map_err(|e| self.failed("ECDSA signing", e))
                })?;
                let sig = Signature::from_slice(&raw)
                    .map_err(|_| self.bad("the token's ECDSA signature is not r ‖ s for P-256"))?;
                Ok(sig.to_der().as_bytes().to_vec())
            }
            KeyType::Rsa2048 => self.token.run(|c| {
                let h = self.object(c)?;
                let mech = match scheme {
                    SignScheme::Pss => Mechanism::Sha256RsaPkcsPss(PkcsPssParams {
                        hash_alg: MechanismType::SHA256,
                        mgf: PkcsMgfType::MGF1_SHA256,
                        s_len: 32u64.into(),
                    }),
                    SignScheme::Pkcs1 => Mechanism::Sha256RsaPkcs,
                };
                c.session
                    .sign(&mech, h, msg)
                    .map_err(|e| self.failed("RSA signing", e))
            }),
            KeyType::Aes256 => Err(self.bad("an AES key cannot sign")),
        }
    }

    /// Verifies with the public key, in software (nothing secret is involved).
    pub fn verify(&self, scheme: SignScheme, msg: &[u8], sig: &[u8]) -> bool {
        match &self.public {
            Public::Ec { verifying, .. } => {
                DerSignature::from_bytes(sig).is_ok_and(|s| verifying.verify(msg, &s).is_ok())
            }
            Public::Rsa { pss, pkcs1, .. } => {
                let key = match scheme {
                    SignScheme::Pss => pss,
                    SignScheme::Pkcs1 => pkcs1,
                };
                key.verify_sig(msg, sig).is_ok()
            }
            Public::None => false,
        }
    }

    /// RSA-OAEP (SHA-256, MGF1-SHA-256, no label) with the public key, in software.
    pub fn rsa_encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, HsmError> {
        let Public::Rsa { encrypting, .. } = &self.public else {
            return Err(self.bad("not an RSA key"));
        };
        if plaintext.len() > MAX_OAEP_PLAINTEXT {
            return Err(self.bad("RSA-OAEP plaintext longer than 190 bytes"));
        }
        let mut out = vec![0u8; encrypting.ciphertext_size()];
        let len = encrypting
            .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, None)
            .map_err(|_| self.bad("RSA-OAEP encryption failed"))?
            .len();
        out.truncate(len);
        Ok(out)
    }

    /// RSA-OAEP decryption with the private key in the token: natively where the token
    /// does OAEP with SHA-256, else raw RSA in the token and constant-time decoding here
    /// (see `oaep.rs`). Every failure of the ciphertext is `DecryptFailed`.
    pub fn rsa_decrypt(&self, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        if ciphertext.len() != RSA_LEN {
            return Err(HsmError::DecryptFailed);
        }
        if self.token.oaep.load(Ordering::Relaxed) != OAEP_RAW {
            let params = PkcsOaepParams::new(
                MechanismType::SHA256,
                PkcsMgfType::MGF1_SHA256,
                PkcsOaepSource::empty(),
            );
            let native = self.token.run(|c| {
                let h = self.object(c)?;
                match c
                    .session
                    .decrypt(&Mechanism::RsaPkcsOaep(params), h, ciphertext)
                {
                    Ok(pt) => Ok(Some(Zeroizing::new(pt))),
                    Err(CkError::Pkcs11(
                        RvError::ArgumentsBad
                        | RvError::MechanismParamInvalid
                        | RvError::MechanismInvalid,
                        Function::DecryptInit,
                    )) => Ok(None),
                    Err(e) if is_bad_ciphertext(&e) => Err(HsmError::DecryptFailed.into()),
                    Err(e) => Err(self.failed("RSA-OAEP decryption", e)),
                }
            });
            match native {
                Ok(Some(pt)) => {
                    self.token.oaep.store(OAEP_NATIVE, Ordering::Relaxed);
                    return Ok(pt);
                }
                Ok(None) => {
                    if self.token.oaep.swap(OAEP_RAW, Ordering::Relaxed) == OAEP_UNKNOWN {
                        tracing::info!(
                            token = %self.token.name(),
                            "the token has no RSA-OAEP with SHA-256; using raw RSA in the token \
                             and OAEP decoding in kmsd"
                        );
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let em = self.token.run(|c| {
            let h = self.object(c)?;
            match c.session.decrypt(&Mechanism::RsaX509, h, ciphertext) {
                Ok(m) => Ok(Zeroizing::new(m)),
                Err(e) if is_bad_ciphertext(&e) => Err(HsmError::DecryptFailed.into()),
                Err(e) => Err(self.failed("raw RSA decryption", e)),
            }
        })?;
        // Raw RSA may drop leading zero bytes; the encoded block is modulus-sized.
        if em.len() > RSA_LEN {
            return Err(HsmError::DecryptFailed);
        }
        let mut block = Zeroizing::new(vec![0u8; RSA_LEN]);
        block[RSA_LEN - em.len()..].copy_from_slice(&em);
        super::oaep::decode_sha256(&block).ok_or(HsmError::DecryptFailed)
    }

    /// The secret (AES) or private object, from the cache or a search by `CKA_ID`.
    fn object(&self, c: &Call<'_>) -> Result<ObjectHandle, OpError> {
        if let Some((g, h)) = *self.lock_handle()
            && g == c.generation
        {
            return Ok(h);
        }
        let class = match self.kind {
            KeyType::Aes256 => ObjectClass::SECRET_KEY,
            _ => ObjectClass::PRIVATE_KEY,
        };
        let found = c
            .session
            .find_objects(&[Attribute::Class(class), Attribute::Id(self.id.clone())])
            .map_err(|e| OpError::Ck("object search", e))?;
        let h = *found.first().ok_or_else(|| OpError::Missing {
            what: match self.kind {
                KeyType::Aes256 => "secret key",
                _ => "private key",
            },
            version: self.what.clone(),
        })?;
        *self.lock_handle() = Some((c.generation, h));
        Ok(h)
    }

    fn public_attrs(&self, attrs: &[AttributeType]) -> Result<Vec<Attribute>, HsmError> {
        self.token.run(|c| {
            let found = c
                .session
                .find_objects(&[
                    Attribute::Class(ObjectClass::PUBLIC_KEY),
                    Attribute::Id(self.id.clone()),
                ])
                .map_err(|e| OpError::Ck("object search", e))?;
            let h = *found.first().ok_or_else(|| OpError::Missing {
                what: "public key",
                version: self.what.clone(),
            })?;
            c.session
                .get_attributes(h, attrs)
                .map_err(|e| OpError::Ck("reading the public key", e))
        })
    }

    fn lock_handle(&self) -> std::sync::MutexGuard<'_, Option<(u64, ObjectHandle)>> {
        self.handle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A failed call; a stale handle is forgotten so that the retry searches again.
    fn failed(&self, op: &'static str, e: CkError) -> OpError {
        if matches!(
            rv_of(&e),
            Some(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid)
        ) {
            *self.lock_handle() = None;
        }
        OpError::Ck(op, e)
    }

    fn bad(&self, message: &str) -> HsmError {
        HsmError::Token {
            token: self.token.name().to_string(),
            message: format!("{}: {message}", self.what),
        }
    }
}

/// Destroys every object of a version (`C_DestroyObject`); returns how many there were.
/// Checks first that the token is really there: a token that went away may answer a
/// search with nothing, and "nothing to destroy" must not be mistaken for "destroyed".
pub fn destroy(token: &Token, id: &[u8]) -> Result<usize, HsmError> {
    token.ensure_present()?;
    token.run(|c| destroy_on(c, id))
}

fn destroy_on(c: &Call<'_>, id: &[u8]) -> Result<usize, OpError> {
    let found = c
        .session
        .find_objects(&[Attribute::Id(id.to_vec())])
        .map_err(|e| OpError::Ck("object search", e))?;
    for h in &found {
        c.session
            .destroy_object(*h)
            .map_err(|e| OpError::Ck("C_DestroyObject", e))?;
    }
    Ok(found.len())
}

/// What tokens answer for a ciphertext that does not decrypt (wrong key, tampered data,
/// bad tag or padding), as opposed to a token that failed.
fn is_bad_ciphertext(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::GeneralError
                | RvError::FunctionFailed
                | RvError::DataInvalid
                | RvError::DataLenRange,
            Function::Decrypt
        )
    )
}
