//! Cryptographic calls (SPEC §5): encrypt, decrypt, re-encrypt (single and batched),
//! sign, verify, public key, data keys. None takes a lock beyond cloning the key's entry;
//! each returns a [`Pending`] that resolves once its history entry is durable.

use super::{Caller, Engine, EngineError, KeyEntry, Pending, history_mutation, require_enabled};
use crate::crypto::KeyMaterial;
use crate::store::Mutation;
use kms_shared::ciphertext;
use kms_shared::model::{
    Action, KeyType, MAX_AES_PLAINTEXT, MAX_BATCH_ITEMS, MAX_CONTEXT, MAX_RSA_PLAINTEXT,
    MAX_SIGN_MESSAGE, SignScheme,
};
use kms_shared::protocol::{CiphertextItem, ErrorKind, ItemOutcome, PlaintextItem, Secret};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use zeroize::Zeroizing;

/// How many times one encryption may find its version's budget spent and rotate (or wait
/// for another call's rotation) before it is refused as `invalid-state`.
const FORCED_ROTATIONS_PER_CALL: usize = 4;

/// AAD of data ciphertexts: binds the key tag, the version and the context, so a changed
/// prefix, another key or another context fails authentication.
fn data_aad(tag: &str, version: u32, context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(10 + tag.len() + 4 + context.len());
    aad.extend_from_slice(b"ncpkms/v1\0");
    aad.extend_from_slice(tag.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    // Last, so it needs no length prefix (the tag is fixed-length).
    aad.extend_from_slice(context);
    aad
}

/// One audited operation: what goes into the history for it.
struct Audit {
    action: Action,
    /// The version used; for a batch, the one every successful item used (else none).
    version: Option<u32>,
    /// The error of a failed single call, or of a batch's first failed item.
    error: Option<ErrorKind>,
    /// Items of the call (1 unless a batch) and how many failed.
    items: u32,
    failed: u32,
    /// Encryptions made, per version (the nonce budget); empty for other calls.
    encryptions: Vec<(u32, u64)>,
}

impl Audit {
    /// The audit of one call; a failed call is recorded with `named`, the version its
    /// ciphertext or signature names, if the key has such a version (so that "decrypt of
    /// v1: version-disabled" shows which version was asked for).
    fn of<T>(action: Action, r: &Result<(u32, T), EngineError>, named: Option<u32>) -> Audit {
        Audit {
            action,
            version: match r {
                Ok((v, _)) => Some(*v),
                Err(_) => named,
            },
            error: r.as_ref().err().map(EngineError::kind),
            items: 1,
            failed: u32::from(r.is_err()),
            encryptions: Vec::new(),
        }
    }

    /// The audit of a batch call: one history entry for all its items.
    fn batch(action: Action, items: usize) -> Audit {
        Audit {
            action,
            version: None,
            error: None,
            items: u32::try_from(items).unwrap_or(u32::MAX),
            failed: 0,
            encryptions: Vec::new(),
        }
    }

    fn count_encryption(&mut self, version: u32) {
        match self.encryptions.iter_mut().find(|(v, _)| *v == version) {
            Some((_, n)) => *n += 1,
            None => self.encryptions.push((version, 1)),
        }
    }
}

impl Engine {
    /// Records several operations on one key in one submission.
    fn audited<T>(
        &self,
        caller: &Caller,
        entry: &Arc<KeyEntry>,
        audits: Vec<Audit>,
        result: Result<T, EngineError>,
    ) -> Pending<T> {
        let now = self.now();
        let tag = &entry.rec.tag;
        let mut m = Vec::with_capacity(audits.len() + 2);
        let mut uses = 0u64;
        for a in &audits {
            let mut h = history_mutation(tag, now, caller, a.action, a.version, a.error);
            if let Mutation::History { record, .. } = &mut h {
                record.items = a.items;
                record.failed = a.failed;
            }
            m.push(h);
            if a.action.is_crypto() {
                uses += u64::from(a.items.saturating_sub(a.failed));
            }
            for &(version, n) in &a.encryptions {
                m.push(Mutation::Encryptions {
                    tag: tag.clone(),
                    version,
                    n,
                });
            }
        }
        let mut on_durable: Option<Box<dyn FnOnce() + Send>> = None;
        if uses > 0 {
            m.push(Mutation::Use {
                tag: tag.clone(),
                at: now,
                account: caller.account.clone(),
                n: uses,
            });
            let usage = entry.usage.clone();
            let account = caller.account.clone();
            on_durable = Some(Box::new(move || usage.record(now, account, uses)));
        }
        Pending {
            result,
            ticket: Some(self.writer.submit(m)),
            on_durable,
        }
    }

    /// Runs `op` on a resolved key and records it as one call.
    fn single<T>(
        &self,
        caller: &Caller,
        key: &str,
        action: Action,
        op: impl FnOnce(&Arc<KeyEntry>) -> Result<(u32, T), EngineError>,
    ) -> Pending<T> {
        self.single_naming(caller, key, action, None, op)
    }

    /// [`Engine::single`] for a call whose input names a version (`ncpkms:v{N}:…`), in
    /// `input`: recorded with that version if the call fails.
    fn single_naming<T>(
        &self,
        caller: &Caller,
        key: &str,
        action: Action,
        input: Option<&str>,
        op: impl FnOnce(&Arc<KeyEntry>) -> Result<(u32, T), EngineError>,
    ) -> Pending<T> {
        let entry = match self.resolve(key) {
            Ok(e) => e,
            Err(e) => return Pending::ready(Err(e)),
        };
        let r = op(&entry);
        let named = input
            .filter(|_| r.is_err())
            .and_then(ciphertext::named_version)
            .filter(|v| (1..=entry.rec.current_version).contains(v));
        let mut audit = Audit::of(action, &r, named);
        if let Ok((version, _)) = &r
            && matches!(
                action,
                Action::Encrypt | Action::Reencrypt | Action::DataKey
            )
            && entry.rec.key_type == KeyType::Aes256
        {
            audit.count_encryption(*version);
        }
        self.audited(caller, &entry, vec![audit], r.map(|(_, v)| v))
    }

    pub fn encrypt(
        &self,
        caller: &Caller,
        key: &str,
        plaintext: &[u8],
        context: Option<&[u8]>,
    ) -> Pending<String> {
        self.single(caller, key, Action::Encrypt, |e| {
            self.encrypt_with(e, plaintext, context)
        })
    }

    pub fn decrypt(
        &self,
        caller: &Caller,
        key: &str,
        ciphertext: &str,
        context: Option<&[u8]>,
    ) -> Pending<Secret> {
        self.single_naming(caller, key, Action::Decrypt, Some(ciphertext), |e| {
            self.decrypt_with(e, ciphertext, context)
                .map(|(v, p)| (v, Secret::from(p)))
        })
    }

    /// Decrypts and encrypts again under the current version; the plaintext stays here.
    pub fn reencrypt(
        &self,
        caller: &Caller,
        key: &str,
        ciphertext: &str,
        context: Option<&[u8]>,
    ) -> Pending<String> {
        self.single_naming(caller, key, Action::Reencrypt, Some(ciphertext), |e| {
            let (_, pt) = self.decrypt_with(e, ciphertext, context)?;
            self.encrypt_with(e, &pt, context)
        })
    }

    pub fn encrypt_batch(
        &self,
        caller: &Caller,
        key: &str,
        items: &[PlaintextItem],
    ) -> Pending<Vec<ItemOutcome>> {
        self.batch(caller, key, Action::Encrypt, items, |e, it| {
            self.encrypt_with(e, &it.plaintext, it.context.as_deref())
                .map(|(v, c)| (v, ItemOutcome::Ciphertext(c)))
        })
    }

    pub fn decrypt_batch(
        &self,
        caller: &Caller,
        key: &str,
        items: &[CiphertextItem],
    ) -> Pending<Vec<ItemOutcome>> {
        self.batch(caller, key, Action::Decrypt, items, |e, it| {
            self.decrypt_with(e, &it.ciphertext, it.context.as_deref())
                .map(|(v, p)| (v, ItemOutcome::Plaintext(p.into())))
        })
    }

    pub fn reencrypt_batch(
        &self,
        caller: &Caller,
        key: &str,
        items: &[CiphertextItem],
    ) -> Pending<Vec<ItemOutcome>> {
        self.batch(caller, key, Action::Reencrypt, items, |e, it| {
            let ctx = it.context.as_deref();
            let (_, pt) = self.decrypt_with(e, &it.ciphertext, ctx)?;
            self.encrypt_with(e, &pt, ctx)
                .map(|(v, c)| (v, ItemOutcome::Ciphertext(c)))
        })
    }

    /// A batch: per-item results, one history entry for the call (with its item and
    /// failure counts: SPEC §7 counts a batch as one call), one durable submission.
    fn batch<I>(
        &self,
        caller: &Caller,
        key: &str,
        action: Action,
        items: &[I],
        mut op: impl FnMut(&Arc<KeyEntry>, &I) -> Result<(u32, ItemOutcome), EngineError>,
    ) -> Pending<Vec<ItemOutcome>> {
        let entry = match self.resolve(key) {
            Ok(e) => e,
            Err(e) => return Pending::ready(Err(e)),
        };
        if items.len() > MAX_BATCH_ITEMS {
            let err = EngineError::TooLarge(format!(
                "a batch has at most {MAX_BATCH_ITEMS} items (this one has {})",
                items.len()
            ));
            let mut audit = Audit::batch(action, items.len());
            audit.error = Some(err.kind());
            audit.failed = audit.items;
            return self.audited(caller, &entry, vec![audit], Err(err));
        }
        let counts_encryptions = action != Action::Decrypt && entry.rec.key_type == KeyType::Aes256;
        let mut audit = Audit::batch(action, items.len());
        // The version shared by every successful item, if they share one.
        let mut common: Option<Option<u32>> = None;
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            out.push(match op(&entry, it) {
                Ok((version, o)) => {
                    common = match common {
                        None => Some(Some(version)),
                        Some(Some(v)) if v == version => Some(Some(v)),
                        Some(_) => Some(None),
                    };
                    if counts_encryptions {
                        audit.count_encryption(version);
                    }
                    o
                }
                Err(e) => {
                    audit.failed += 1;
                    audit.error.get_or_insert(e.kind());
                    ItemOutcome::Err(e.to_wire())
                }
            });
        }
        audit.version = common.flatten();
        self.audited(caller, &entry, vec![audit], Ok(out))
    }

    pub fn sign(
        &self,
        caller: &Caller,
        key: &str,
        message: &[u8],
        scheme: SignScheme,
    ) -> Pending<String> {
        self.single(caller, key, Action::Sign, |e| {
            check_sign_input(e, message)?;
            let v = self.current_of(e)?;
            check_version_enabled(e, v.version, v.record.enabled)?;
            let sig = match &*self.material(e, v)? {
                KeyMaterial::Ecdsa(k) => k.sign(message)?,
                KeyMaterial::Rsa(k) => k.sign(scheme, message)?,
                KeyMaterial::Aes(_) => return Err(wrong_purpose(e, "sign")),
                KeyMaterial::Hsm(k) => k.sign(scheme, message)?,
            };
            Ok((v.version, ciphertext::format(v.version, &sig)))
        })
    }

    /// Verifies a signature: `valid` true or false; errors only for bad input.
    pub fn verify(
        &self,
        caller: &Caller,
        key: &str,
        message: &[u8],
        signature: &str,
        scheme: SignScheme,
    ) -> Pending<bool> {
        self.single_naming(caller, key, Action::Verify, Some(signature), |e| {
            check_sign_input(e, message)?;
            let (version, sig) = ciphertext::parse(signature)
                .map_err(|f| EngineError::InvalidArgument(format!("signature: {f}")))?;
            let Some(v) = self.version_of(e, version)? else {
                // A signature naming a version this key never had cannot be valid.
                return Ok((version, false));
            };
            check_version_enabled(e, version, v.record.enabled)?;
            let valid = match &*self.material(e, v)? {
                KeyMaterial::Ecdsa(k) => k.verify(message, &sig),
                KeyMaterial::Rsa(k) => k.verify(scheme, message, &sig),
                KeyMaterial::Aes(_) => return Err(wrong_purpose(e, "verify")),
                KeyMaterial::Hsm(k) => k.verify(scheme, message, &sig),
            };
            Ok((version, valid))
        })
    }

    /// The PEM public key of a version (default current) of an ECDSA or RSA key.
    pub fn public_key(
        &self,
        caller: &Caller,
        key: &str,
        version: Option<u32>,
    ) -> Pending<(u32, String)> {
        self.single(caller, key, Action::PublicKey, |e| {
            require_enabled(e)?;
            if !e.rec.key_type.can_sign() {
                return Err(wrong_purpose(e, "have a public key"));
            }
            let n = version.unwrap_or(e.rec.current_version);
            let v = self.version_of(e, n)?.ok_or_else(|| {
                EngineError::NotFound(format!("key {} has no version {n}", e.rec.name))
            })?;
            check_version_enabled(e, n, v.record.enabled)?;
            let pem = self
                .material(e, v)?
                .public_key_pem()
                .ok_or_else(|| wrong_purpose(e, "have a public key"))?;
            Ok((n, (n, pem)))
        })
    }

    /// A fresh data key of `bits`, wrapped under the current version; returned in
    /// plaintext only if asked (envelope encryption).
    pub fn data_key(
        &self,
        caller: &Caller,
        key: &str,
        bits: u32,
        with_plaintext: bool,
        context: Option<&[u8]>,
    ) -> Pending<(String, Option<Secret>)> {
        self.single(caller, key, Action::DataKey, |e| {
            if !matches!(bits, 128 | 256 | 512) {
                return Err(EngineError::InvalidArgument(format!(
                    "a data key has 128, 256 or 512 bits, not {bits}"
                )));
            }
            let dk = crate::crypto::random_bytes(bits as usize / 8)?;
            let (v, ct) = self.encrypt_with(e, &dk, context)?;
            Ok((v, (ct, with_plaintext.then(|| Secret::from(dk)))))
        })
    }

    /// Encrypts under the current version (rotating first if its nonce budget is spent).
    fn encrypt_with(
        &self,
        entry: &Arc<KeyEntry>,
        plaintext: &[u8],
        context: Option<&[u8]>,
    ) -> Result<(u32, String), EngineError> {
        check_crypto_input(entry, context, Direction::Encrypt)?;
        let limit = match entry.rec.key_type {
            KeyType::Aes256 => MAX_AES_PLAINTEXT,
            KeyType::Rsa2048 => MAX_RSA_PLAINTEXT,
            KeyType::Ecdsa => return Err(wrong_purpose(entry, "encrypt")),
        };
        if plaintext.len() > limit {
            return Err(EngineError::TooLarge(format!(
                "{} plaintext is at most {limit} bytes (got {})",
                entry.rec.key_type,
                plaintext.len()
            )));
        }
        let mut entry = entry.clone();
        // A bounded number of forced rotations per call. After a rotation the new version
        // has a fresh budget, but the calls that waited on the same rotation (each blocked
        // on the key's lock, on a thread of its own) may spend it before this one runs
        // again; each pass needs a whole budget spent by others, so with any real budget
        // the first pass is the last.
        for _ in 0..=FORCED_ROTATIONS_PER_CALL {
            let v = self.current_of(&entry)?.clone();
            check_version_enabled(&entry, v.version, v.record.enabled)?;
            let material = self.material(&entry, &v)?;
            let body = match &*material {
                KeyMaterial::Aes(k) => {
                    let used = v.encryptions.fetch_add(1, Ordering::Relaxed);
                    if !entry.rec.convergent && used >= self.config.nonce_budget {
                        // Not made under this version: the count (what `versions` shows,
                        // as the store does) is of encryptions made.
                        v.encryptions.fetch_sub(1, Ordering::Relaxed);
                        self.rotate_for_budget(&entry.rec.tag, v.version)?;
                        entry = self.resolve(&entry.rec.tag)?;
                        require_enabled(&entry)?;
                        continue;
                    }
                    let aad = data_aad(&entry.rec.tag, v.version, context.unwrap_or_default());
                    match context.filter(|_| entry.rec.convergent) {
                        Some(ctx) => k.encrypt_convergent(ctx, &aad, plaintext)?,
                        None => k.encrypt_random(&aad, plaintext)?,
                    }
                }
                KeyMaterial::Rsa(k) => k.encrypt(plaintext)?,
                KeyMaterial::Ecdsa(_) => return Err(wrong_purpose(&entry, "encrypt")),
                // AES in the token: the same nonce budget, the same AAD, a random nonce
                // (convergent keys are refused at creation for HSM levels).
                KeyMaterial::Hsm(k) if entry.rec.key_type == KeyType::Aes256 => {
                    let used = v.encryptions.fetch_add(1, Ordering::Relaxed);
                    if used >= self.config.nonce_budget {
                        v.encryptions.fetch_sub(1, Ordering::Relaxed);
                        self.rotate_for_budget(&entry.rec.tag, v.version)?;
                        entry = self.resolve(&entry.rec.tag)?;
                        require_enabled(&entry)?;
                        continue;
                    }
                    let aad = data_aad(&entry.rec.tag, v.version, context.unwrap_or_default());
                    k.encrypt_aes(&aad, plaintext)?
                }
                KeyMaterial::Hsm(k) => k.rsa_encrypt(plaintext)?,
            };
            return Ok((v.version, ciphertext::format(v.version, &body)));
        }
        Err(EngineError::InvalidState(format!(
            "the key was rotated {FORCED_ROTATIONS_PER_CALL} times for its encryption budget \
             during this call and its current version is spent again"
        )))
    }

    /// Decrypts with the version named in the ciphertext.
    fn decrypt_with(
        &self,
        entry: &KeyEntry,
        ct: &str,
        context: Option<&[u8]>,
    ) -> Result<(u32, Zeroizing<Vec<u8>>), EngineError> {
        check_crypto_input(entry, context, Direction::Decrypt)?;
        if entry.rec.key_type == KeyType::Ecdsa {
            return Err(wrong_purpose(entry, "decrypt"));
        }
        let (version, body) = ciphertext::parse(ct)
            .map_err(|f| EngineError::InvalidArgument(format!("ciphertext: {f}")))?;
        // A prefix naming a version this key does not have is a modified ciphertext.
        let v = self
            .version_of(entry, version)?
            .ok_or(EngineError::DecryptFailed)?;
        check_version_enabled(entry, version, v.record.enabled)?;
        let pt = match &*self.material(entry, v)? {
            KeyMaterial::Aes(k) => {
                let aad = data_aad(&entry.rec.tag, version, context.unwrap_or_default());
                match context.filter(|_| entry.rec.convergent) {
                    Some(ctx) => k.decrypt_convergent(ctx, &aad, &body)?,
                    None => k.decrypt(&aad, &body)?,
                }
            }
            KeyMaterial::Rsa(k) => k.decrypt(&body)?,
            KeyMaterial::Ecdsa(_) => return Err(wrong_purpose(entry, "decrypt")),
            KeyMaterial::Hsm(k) if entry.rec.key_type == KeyType::Aes256 => {
                let aad = data_aad(&entry.rec.tag, version, context.unwrap_or_default());
                k.decrypt_aes(&aad, &body)?
            }
            KeyMaterial::Hsm(k) => k.rsa_decrypt(&body)?,
        };
        Ok((version, pt))
    }
}

/// Checks shared by encrypt and decrypt: state, purpose, context rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Encrypt,
    Decrypt,
}

/// An empty context is no context, as it is in the associated data: a convergent key
/// encrypts under a context that is not empty (it took `""`, though it refused none at
/// all). Decryption still takes `""`, so that what was encrypted under it before opens.
fn check_crypto_input(
    entry: &KeyEntry,
    context: Option<&[u8]>,
    direction: Direction,
) -> Result<(), EngineError> {
    require_enabled(entry)?;
    if !entry.rec.key_type.can_encrypt() {
        return Err(wrong_purpose(entry, "encrypt or decrypt"));
    }
    let given = match direction {
        Direction::Encrypt => context.filter(|c| !c.is_empty()),
        Direction::Decrypt => context,
    };
    if let Some(ctx) = given.filter(|c| !c.is_empty()) {
        if ctx.len() > MAX_CONTEXT {
            return Err(EngineError::TooLarge(format!(
                "a context is at most {MAX_CONTEXT} bytes (got {})",
                ctx.len()
            )));
        }
        if entry.rec.key_type == KeyType::Rsa2048 {
            return Err(EngineError::InvalidArgument(
                "a context applies to AES256 keys only (RSA-OAEP here uses no label)".into(),
            ));
        }
    } else if entry.rec.convergent && given.is_none() {
        // Decryption takes "" (see above), so its refusal does not say "not empty".
        let needs = match direction {
            Direction::Encrypt => "a context (not empty)",
            Direction::Decrypt => "the context it was encrypted under",
        };
        return Err(EngineError::InvalidArgument(format!(
            "key {} uses convergent encryption and needs {needs}",
            entry.rec.name
        )));
    }
    Ok(())
}

fn check_sign_input(entry: &KeyEntry, message: &[u8]) -> Result<(), EngineError> {
    require_enabled(entry)?;
    if !entry.rec.key_type.can_sign() {
        return Err(wrong_purpose(entry, "sign or verify"));
    }
    if message.len() > MAX_SIGN_MESSAGE {
        return Err(EngineError::TooLarge(format!(
            "a message to sign or verify is at most {MAX_SIGN_MESSAGE} bytes (got {})",
            message.len()
        )));
    }
    Ok(())
}

fn check_version_enabled(entry: &KeyEntry, version: u32, enabled: bool) -> Result<(), EngineError> {
    if enabled {
        Ok(())
    } else {
        Err(EngineError::VersionDisabled(format!(
            "version {version} of key {} is disabled",
            entry.rec.name
        )))
    }
}

fn wrong_purpose(entry: &KeyEntry, what: &str) -> EngineError {
    EngineError::WrongPurpose(format!(
        "key {} is {} ({}) and cannot {what}",
        entry.rec.name,
        entry.rec.key_type,
        entry.rec.key_type.purpose()
    ))
}
