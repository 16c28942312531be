//! The engine's side of the HSM protection levels (SPEC §2, §9): which token a key lives
//! in, generating and loading its versions there, destroying them at purge, and the
//! registrations of dedicated tokens.

use super::{Caller, Engine, EngineError, KeyEntry, VersionEntry};
use crate::crypto::KeyMaterial;
use crate::hsm::{self, HsmError, HsmKey, HsmRef, Token};
use crate::store::Mutation;
use crate::store::records::{HsmTokenRecord, KeyRecord, VersionRecord};
use kms_shared::model::{self, KeyState, Protection, UnixMillis};
use kms_shared::protocol::{CreateKey, HsmTokenInfo};
use std::path::Path;
use std::sync::Arc;

/// Longest token label PKCS#11 allows (32 bytes, blank-padded in `CK_TOKEN_INFO`).
const MAX_LABEL: usize = 32;

impl Engine {
    /// Refuses a protection level this daemon cannot give the key.
    pub(super) fn check_protection(&self, spec: &CreateKey) -> Result<(), EngineError> {
        let p = spec.protection;
        if p != Protection::DedicatedHsm && spec.hsm.is_some() {
            return Err(EngineError::InvalidArgument(format!(
                "a token name (hsm) applies to dedicated-hsm keys only, not to {p} keys"
            )));
        }
        match p {
            Protection::Basic => return Ok(()),
            Protection::Hsm => {
                if self.hsm.daemon().is_none() {
                    return Err(EngineError::InvalidArgument(format!(
                        "protection level {p} needs a PKCS#11 token and none is configured on this kmsd"
                    )));
                }
            }
            Protection::DedicatedHsm => {
                let Some(name) = &spec.hsm else {
                    return Err(EngineError::InvalidArgument(
                        "protection level dedicated-hsm needs the name of a registered HSM token \
                         (kmsctl create … --hsm NAME; kmsctl hsm list)"
                            .into(),
                    ));
                };
                if !self.hsm.is_registered(name) {
                    return Err(EngineError::NotFound(format!(
                        "no HSM token is registered as {name:?} (kmsctl hsm list)"
                    )));
                }
            }
        }
        // SoftHSM2 and many tokens have no CKM_HKDF_DERIVE: the per-context keys would have
        // to be derived outside the token, which defeats the protection level.
        kms_shared::model::validate_convergent_protection(p, spec.convergent)
            .map_err(|e| EngineError::InvalidArgument(e.0))
    }

    /// The token a key's versions live in.
    fn token_for(&self, rec: &KeyRecord) -> Result<Arc<Token>, EngineError> {
        match rec.protection {
            Protection::Basic => Err(EngineError::InvalidState(format!(
                "key {} is a basic key and has no token",
                rec.name
            ))),
            Protection::Hsm => self
                .hsm
                .daemon()
                .cloned()
                .ok_or(EngineError::Hsm(HsmError::NotConfigured)),
            Protection::DedicatedHsm => {
                let name = rec.hsm.as_deref().ok_or_else(|| {
                    EngineError::Internal(format!(
                        "key {} is dedicated-hsm but names no token",
                        rec.name
                    ))
                })?;
                // An unregistered token here is a broken store, not a bad request.
                self.hsm.dedicated(name).map_err(|e| match e {
                    HsmError::Invalid(m) => EngineError::Internal(format!(
                        "key {} lives on a token that is not registered: {m}",
                        rec.name
                    )),
                    other => EngineError::Hsm(other),
                })
            }
        }
    }

    /// Generates version `version` of an HSM key inside its token; the record keeps
    /// only a reference to the objects.
    pub(super) fn new_hsm_version(
        &self,
        rec: &KeyRecord,
        version: u32,
        now: UnixMillis,
    ) -> Result<(u32, VersionRecord, Option<Arc<KeyMaterial>>), EngineError> {
        let token = self.token_for(rec)?;
        let mut salt = [0u8; 8];
        crate::crypto::fill_random(&mut salt)?;
        let id = hsm::fresh_object_id(&rec.tag, version, salt);
        let what = format!("version {version} of key {}", rec.name);
        let key = HsmKey::generate(
            token.clone(),
            rec.key_type,
            &rec.tag,
            version,
            id.clone(),
            what,
        )?;
        let reference = HsmRef {
            token: token.label().to_string(),
            id,
        };
        Ok((
            version,
            VersionRecord {
                created_at: now,
                enabled: true,
                wrapped: Some(reference.encode()),
            },
            Some(Arc::new(KeyMaterial::Hsm(key))),
        ))
    }

    /// Finds a stored HSM version in its token again (after a restart, or the first use).
    pub(super) fn load_hsm_material(
        &self,
        entry: &KeyEntry,
        v: &VersionEntry,
        wrapped: &[u8],
    ) -> Result<Arc<KeyMaterial>, EngineError> {
        let what = format!("version {} of key {}", v.version, entry.rec.name);
        let reference = HsmRef::decode(wrapped).ok_or_else(|| {
            EngineError::Internal(format!(
                "the store's reference to {what} is not an HSM reference"
            ))
        })?;
        let token = self.token_for(&entry.rec)?;
        if reference.token != token.label() {
            return Err(EngineError::Hsm(HsmError::Token {
                token: token.name().to_string(),
                message: format!(
                    "{what} was generated on the token labelled {:?}, not on this one",
                    reference.token
                ),
            }));
        }
        let key = HsmKey::load(token, entry.rec.key_type, reference.id, what)?;
        Ok(Arc::new(KeyMaterial::Hsm(key)))
    }

    /// Refuses `delete-now` of an HSM key while its token cannot be reached: the purge
    /// would be committed with its objects left for the scheduler to destroy later;
    /// asked now, the caller can try again once the token is back. (The purge at the end
    /// of the deletion wait, which nobody asks for, does not wait for the token.) Basic
    /// keys pass.
    pub(super) fn require_token_present(&self, e: &KeyEntry) -> Result<(), EngineError> {
        if e.rec.protection == Protection::Basic {
            return Ok(());
        }
        self.token_for(&e.rec)?.ensure_present()?;
        Ok(())
    }

    /// Destroys the token objects of every version of an HSM key (after its purge is
    /// committed, from the references the versions keep until then; destroying again
    /// what is already gone is harmless).
    pub(super) fn destroy_hsm_material(&self, e: &KeyEntry) -> Result<(), EngineError> {
        if e.rec.protection == Protection::Basic {
            return Ok(());
        }
        let token = self.token_for(&e.rec)?;
        let mut destroyed = 0;
        for v in self.versions_of(e)? {
            let Some(wrapped) = &v.record.wrapped else {
                continue;
            };
            let id = HsmRef::decode(wrapped)
                .map(|r| r.id)
                .unwrap_or_else(|| hsm::object_id(&e.rec.tag, v.version));
            destroyed += hsm::key::destroy(&token, &id)?;
        }
        tracing::info!(
            key = %e.rec.name,
            token = %token.name(),
            objects = destroyed,
            "HSM objects destroyed"
        );
        Ok(())
    }

    /// Destroys versions generated for a change that could not be committed.
    pub(super) fn discard_hsm_versions(
        &self,
        versions: &[(u32, VersionRecord, Option<Arc<KeyMaterial>>)],
    ) {
        for (_, _, material) in versions {
            if let Some(m) = material
                && let KeyMaterial::Hsm(k) = &**m
                && let Err(e) = hsm::key::destroy(k.token(), k.id())
            {
                tracing::warn!(error = %e, "cannot destroy an uncommitted HSM version");
            }
        }
    }

    /// Registers a dedicated token after checking that it can be used: the module loads,
    /// the token is present and the PIN is accepted.
    pub fn hsm_add(
        &self,
        caller: &Caller,
        name: &str,
        module: &str,
        token: &str,
        pin_file: &str,
    ) -> Result<HsmTokenInfo, EngineError> {
        let invalid = |m: String| EngineError::InvalidArgument(m);
        model::validate_name(name)
            .map_err(|r| invalid(r.0.replace("a key name", "an HSM token name")))?;
        if token.is_empty() || token.len() > MAX_LABEL {
            return Err(invalid(format!(
                "a token label has 1 to {MAX_LABEL} bytes (got {})",
                token.len()
            )));
        }
        if !Path::new(pin_file).is_absolute() {
            return Err(invalid(format!(
                "the PIN file path must be absolute (got {pin_file})"
            )));
        }
        // Registered (and loaded) as the file the path resolves to.
        let module_path = hsm::check_module_path(Path::new(module))?;
        let Some(module) = module_path.to_str() else {
            return Err(invalid(format!(
                "the PKCS#11 module path {} is not UTF-8",
                module_path.display()
            )));
        };

        // Whether the name, and the token, are free. Asked before the token is opened (a
        // quick refusal) and again under the lifecycle lock, since the token is opened and
        // logged in without it: a slow token, or a login, must not hold up every other
        // lifecycle change.
        let same = |m: &Path, label: &str| {
            label == token && std::fs::canonicalize(m).ok() == std::fs::canonicalize(module).ok()
        };
        let check_free = || -> Result<(), EngineError> {
            if self.hsm.is_registered(name) {
                return Err(EngineError::AlreadyExists(format!(
                    "an HSM token is already registered as {name:?}"
                )));
            }
            if let Some(other) = self
                .hsm
                .records()
                .into_iter()
                .find(|r| same(Path::new(&r.module), &r.token))
            {
                return Err(EngineError::AlreadyExists(format!(
                    "token {token} of {module} is already registered as {:?}",
                    other.name
                )));
            }
            if let Some(d) = self.config.pkcs11.as_ref()
                && same(&d.module, &d.token)
            {
                return Err(invalid(format!(
                    "token {token} is the daemon's own token (protection hsm); a dedicated \
                     token is another one"
                )));
            }
            Ok(())
        };
        check_free()?;
        let refused = |e: HsmError| invalid(format!("cannot register HSM token {name}: {e}"));
        // Root and kmsd's own account may name any PIN file kmsd can read; another manager
        // only one of their own (see `HsmTokenRecord::pin_owner`).
        let pin_owner = (caller.uid != 0 && caller.uid != rustix::process::geteuid().as_raw())
            .then_some(caller.uid);
        let t = Token::open(
            format!("{token} (dedicated token {name})"),
            Path::new(module),
            token,
            Path::new(pin_file),
            hsm::PinFile::Registered { owner: pin_owner },
        )
        .map_err(refused)?;
        t.check().map_err(refused)?;
        let _serial = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        check_free()?;
        let record = HsmTokenRecord {
            name: name.to_string(),
            module: module.to_string(),
            token: token.to_string(),
            pin_file: pin_file.to_string(),
            added_at: self.now(),
            added_by: caller.account.clone(),
            pin_owner,
        };
        self.writer
            .submit(vec![Mutation::PutHsmToken(record.clone())])
            .wait()?;
        self.hsm.insert(record.clone(), Arc::new(t));
        tracing::info!(name, token, module, account = %caller.account, "HSM token registered");
        Ok(info(record, 0))
    }

    /// The registered tokens, each with its number of keys not yet purged.
    pub fn hsm_list(&self) -> Vec<HsmTokenInfo> {
        self.hsm
            .records()
            .into_iter()
            .map(|r| {
                let keys = self.keys_on(&r.name).len() as u64;
                info(r, keys)
            })
            .collect()
    }

    /// Forgets a registration; refused while keys not yet purged live on the token.
    pub fn hsm_remove(&self, caller: &Caller, name: &str) -> Result<HsmTokenInfo, EngineError> {
        let _serial = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        let record = self.hsm.record(name).ok_or_else(|| {
            EngineError::NotFound(format!("no HSM token is registered as {name:?}"))
        })?;
        let keys = self.keys_on(name);
        if !keys.is_empty() {
            let shown: Vec<&str> = keys.iter().take(5).map(String::as_str).collect();
            return Err(EngineError::InvalidState(format!(
                "HSM token {name} still holds {} key(s) not purged or whose objects are not yet \
                 destroyed ({}{}); delete and purge them first",
                keys.len(),
                shown.join(", "),
                if keys.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            )));
        }
        self.writer
            .submit(vec![Mutation::RemoveHsmToken(name.to_string())])
            .wait()?;
        self.hsm.remove(name);
        tracing::info!(name, account = %caller.account, "HSM token registration removed");
        Ok(info(record, 0))
    }

    /// Names of the keys on a dedicated token not yet purged, or purged with objects
    /// still to destroy there.
    fn keys_on(&self, name: &str) -> Vec<String> {
        let ring = self.ring();
        let mut names: Vec<String> = ring
            .by_tag
            .values()
            .filter(|e| {
                e.rec.protection == Protection::DedicatedHsm
                    && e.rec.hsm.as_deref() == Some(name)
                    && (e.rec.state != KeyState::Deleted || e.rec.token_objects_left)
            })
            .map(|e| e.rec.name.clone())
            .collect();
        names.sort();
        names
    }
}

fn info(r: HsmTokenRecord, keys: u64) -> HsmTokenInfo {
    HsmTokenInfo {
        name: r.name,
        module: r.module,
        token: r.token,
        pin_file: r.pin_file,
        added_at: r.added_at,
        added_by: r.added_by,
        keys,
    }
}
