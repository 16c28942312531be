//! Lifecycle changes (SPEC §3, §4): create, rotate, enable/disable, version flags,
//! rotation settings, memo, the deletion queue, and the scheduler's rotations, purges and
//! expiries. Each is built as a [`Change`] without side effects, then [`Engine::apply`]
//! commits it durably and only then publishes it.

use super::schedule::{anchor_after_rotation, due_entries};
use super::{Caller, Engine, EngineError, KeyEntry, VersionEntry, VersionsCell, history_mutation};
use crate::crypto::{self, KeyMaterial, RootKey};
use crate::store::key_slots::{KeySlots, SlotSecret};
use crate::store::records::{DueKind, KeyRecord, VersionRecord};
use crate::store::{Held, Mutation, StoreError};
use kms_shared::model::{
    self, Action, DAY_MS, DEFAULT_ROTATION_DAYS, KeyInfo, KeyState, KeyType, Protection,
    UnixMillis, VersionInfo,
};
use kms_shared::protocol::{CreateKey, EventKind};
use std::sync::Arc;

/// A change to one key, complete before anything is written.
struct Change {
    rec: KeyRecord,
    /// Versions added or changed: (version, record, fresh material for a new version).
    versions: Vec<(u32, VersionRecord, Option<Arc<KeyMaterial>>)>,
    action: Action,
    version: Option<u32>,
    /// Recorded in history instead of `ok` (a scheduled rotation stopped by the limit).
    refusal: Option<EngineError>,
    events: Vec<(EventKind, Option<u32>, String)>,
    /// Whether the change is an entry of the key's history (housekeeping is not).
    recorded: bool,
    /// The key's deletion wait to remember once the change is durable, under the key's
    /// lock (`Some(None)`: none any more); see [`Engine::run_due`].
    deletion_wait: Option<Option<i64>>,
}

impl Change {
    fn new(rec: KeyRecord, action: Action) -> Self {
        Change {
            rec,
            versions: Vec::new(),
            action,
            version: None,
            refusal: None,
            events: Vec::new(),
            recorded: true,
            deletion_wait: None,
        }
    }

    /// Remembers (`Some`: when it ends on [`Clock::elapsed_ms`]) or forgets the key's
    /// deletion wait once the change is durable.
    ///
    /// [`Clock::elapsed_ms`]: crate::clock::Clock::elapsed_ms
    fn deletion_wait(mut self, ends: Option<i64>) -> Self {
        self.deletion_wait = Some(ends);
        self
    }

    /// A change that is no entry of the key's history: the daemon's own housekeeping.
    fn unrecorded(mut self) -> Self {
        self.recorded = false;
        self
    }

    fn event(mut self, kind: EventKind, version: Option<u32>, message: String) -> Self {
        self.events.push((kind, version, message));
        self
    }
}

/// AAD binding wrapped material to its key, version and type (public so that tools which
/// write a store the way the engine would, such as the scale benchmark, cannot drift from
/// it). The type is bound since store schema 2: without it, someone who can edit the store
/// (not knowing the root key) could relabel an AES key as ECDSA and have the daemon use
/// its bytes as a signing scalar, publishing k·G.
pub fn wrap_aad(tag: &str, version: u32, key_type: KeyType) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64);
    aad.extend_from_slice(b"kms/wrap/2\0");
    // Tags have a fixed form today; the length keeps the encoding unambiguous anyway.
    aad.extend_from_slice(&(tag.len() as u32).to_be_bytes());
    aad.extend_from_slice(tag.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(key_type.as_str().as_bytes());
    aad
}

/// The AAD of store schema 1 (tag and version only), read once to re-wrap a store
/// written before schema 2 ([`crate::store::Store::upgrade_wraps`]). Public for tools
/// that write a store as a kmsd of schema 1 left it (`kms-bench --scale-schema 1`, which
/// measures the upgrade).
pub fn wrap_aad_schema1(tag: &str, version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(48);
    aad.extend_from_slice(b"kms/wrap\0");
    aad.extend_from_slice(tag.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// Re-wraps a version's material of a store of schema `from` (1 or 2: under the root key
/// alone) for schema 3: under the key's own wrapping key, from its slot
/// ([`crate::store::Store::upgrade_wraps`]). `Ok(None)` if it does not open under this
/// root key (for good: it is left as it is), `Err` if the slot cannot be read or the new
/// wrap failed (the upgrade must not go on without this version).
pub(super) fn rewrap_for_slots(
    root: &RootKey,
    slots: &KeySlots,
    from: u64,
    rec: &KeyRecord,
    version: u32,
    wrapped: &[u8],
) -> Result<Option<Vec<u8>>, EngineError> {
    // The material passes through this thread's stack: wiped as it returns.
    crypto::with_wiped_stack(|| {
        let aad = wrap_aad(&rec.tag, version, rec.key_type);
        let old_aad = match from {
            1 => wrap_aad_schema1(&rec.tag, version),
            _ => aad.clone(),
        };
        let secret = match root.unwrap(&old_aad, wrapped) {
            Ok(secret) => secret,
            Err(crypto::CryptoError::DecryptFailed) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let slot = rec
            .slot
            .ok_or_else(|| EngineError::Internal(format!("key {} has no slot", rec.name)))?;
        let slot_secret = slots.read(slot, &rec.tag).map_err(StoreError::from)?;
        Ok(Some(
            root.key_wrapper(&slot_secret, &rec.tag)
                .wrap(&aad, &secret)?,
        ))
    })
}

impl Engine {
    /// Unwraps (once) and returns a version's material.
    pub(super) fn material(
        &self,
        entry: &KeyEntry,
        v: &VersionEntry,
    ) -> Result<Arc<KeyMaterial>, EngineError> {
        if let Some(m) = v.material.get() {
            return Ok(m.clone());
        }
        // A purged HSM key keeps its references until its token objects are destroyed
        // (`token_objects_left`); they are never to be used again.
        let purged = entry.rec.state == KeyState::Deleted;
        let wrapped = v
            .record
            .wrapped
            .as_ref()
            .filter(|_| !purged)
            .ok_or_else(|| {
                EngineError::InvalidState(format!(
                    "version {} of key {} has been destroyed",
                    v.version, entry.rec.name
                ))
            })?;
        if entry.rec.protection != Protection::Basic {
            let m = self.load_hsm_material(entry, v, wrapped)?;
            return Ok(v.material.get_or_init(|| m).clone());
        }
        // On the thread of the call that first needs it: a tokio worker for AES.
        let m = crypto::with_wiped_stack(|| {
            let slot_secret = self.slot_secret(&entry.rec)?;
            let secret = self
                .root
                .key_wrapper(&slot_secret, &entry.rec.tag)
                .unwrap(
                    &wrap_aad(&entry.rec.tag, v.version, entry.rec.key_type),
                    wrapped,
                )
                .map_err(|_| {
                    EngineError::Crypto(crypto::CryptoError::Internal(
                        "wrapped key material does not open under this root key",
                    ))
                })?;
            Ok::<_, EngineError>(Arc::new(KeyMaterial::from_secret_bytes(
                entry.rec.key_type,
                &secret,
            )?))
        })?;
        // Another thread may have won the race; either value is the same key.
        Ok(v.material.get_or_init(|| m).clone())
    }

    /// The secret of a `basic` key's slot, which its versions are wrapped under.
    fn slot_secret(&self, rec: &KeyRecord) -> Result<SlotSecret, EngineError> {
        let slot = rec
            .slot
            .ok_or_else(|| EngineError::Internal(format!("key {} has no key slot", rec.name)))?;
        self.slots.read(slot, &rec.tag).map_err(|e| {
            // A purge may have wiped it since the calling operation resolved the key: that
            // call then fails as one on the key as it is now.
            match self.resolve(&rec.tag) {
                Err(gone) => gone,
                Ok(now) if now.rec.state == KeyState::Deleted => {
                    EngineError::InvalidState(format!("key {} has been destroyed", rec.name))
                }
                Ok(_) => EngineError::Internal(format!(
                    "the key slot of key {} cannot be read: {e}",
                    rec.name
                )),
            }
        })
    }

    /// Wipes a slot no key refers to any more (after a purge committed, or a create that
    /// certainly did not). A failure is logged; the wipe is tried again with every later
    /// one, before an expiry removes a purged key's record, and at the next start.
    fn wipe_slot(&self, slot: u64, name: &str) {
        if let Err(e) = self.slots.wipe(slot) {
            tracing::error!(
                key = %name,
                slot,
                error = %e,
                "the key's slot could not be wiped; copies of the store keep its material \
                 recoverable until a later wipe or the next start succeeds"
            );
        }
    }

    /// Generates and wraps the material of a new version.
    fn new_version(
        &self,
        rec: &KeyRecord,
        version: u32,
        now: UnixMillis,
    ) -> Result<(u32, VersionRecord, Option<Arc<KeyMaterial>>), EngineError> {
        #[cfg(test)]
        generation_hold::reached(&rec.name);
        if rec.protection != Protection::Basic {
            return self.new_hsm_version(rec, version, now);
        }
        let (material, wrapped) = crypto::with_wiped_stack(|| {
            let material = Arc::new(KeyMaterial::generate(rec.key_type)?);
            let slot_secret = self.slot_secret(rec)?;
            let wrapped = self.root.key_wrapper(&slot_secret, &rec.tag).wrap(
                &wrap_aad(&rec.tag, version, rec.key_type),
                &material.to_secret_bytes(),
            )?;
            Ok::<_, EngineError>((material, wrapped))
        })?;
        Ok((
            version,
            VersionRecord {
                created_at: now,
                enabled: true,
                wrapped: Some(wrapped),
            },
            Some(material),
        ))
    }

    /// Commits a change, then publishes it in memory and as events.
    fn apply(
        &self,
        caller: &Caller,
        old: Option<&Arc<KeyEntry>>,
        change: Change,
    ) -> Result<Arc<KeyEntry>, EngineError> {
        let now = self.now();
        let retention = self.config.retention_ms;
        let rec = &change.rec;
        let tag = rec.tag.clone();
        let old_due = old
            .map(|o| due_entries(&o.rec, retention))
            .unwrap_or_default();
        let new_due = due_entries(rec, retention);

        let mut m = vec![Mutation::PutKey(rec.clone())];
        for (v, vrec, _) in &change.versions {
            m.push(Mutation::PutVersion {
                tag: tag.clone(),
                version: *v,
                record: vrec.clone(),
            });
        }
        for (at, kind) in old_due.iter().filter(|d| !new_due.contains(d)) {
            m.push(Mutation::RemoveDue {
                at: *at,
                tag: tag.clone(),
                kind: *kind,
            });
        }
        for (at, kind) in new_due.iter().filter(|d| !old_due.contains(d)) {
            m.push(Mutation::AddDue {
                at: *at,
                tag: tag.clone(),
                kind: *kind,
            });
        }
        let was_live = old.is_some_and(|o| o.rec.state != KeyState::Deleted);
        if old.is_none() {
            m.push(Mutation::PutName {
                name: rec.name.clone(),
                tag: tag.clone(),
            });
        }
        // A purge takes the key's grants with it, in the same commit: a purged key is
        // visible to managers only (SPEC §3), and a grant left on it could never be
        // changed again. Grants on a key change only under its lock (held here).
        let mut purged_grants = Vec::new();
        if was_live && rec.state == KeyState::Deleted {
            m.push(Mutation::RemoveName(rec.name.clone()));
            purged_grants = self.grants_on(&tag);
            m.extend(purged_grants.iter().map(|g| Mutation::RemoveGrant(g.id)));
        }
        if change.recorded {
            m.push(history_mutation(
                &tag,
                now,
                caller,
                change.action,
                change.version,
                change.refusal.as_ref().map(EngineError::kind),
            ));
        }

        // The versions this change edits, read before the commit (see `VersionsCell`).
        let base = match old {
            Some(o) if !change.versions.is_empty() => match self.versions_of(o) {
                Ok(vs) => Some(vs.to_vec()),
                Err(e) => {
                    self.discard_hsm_versions(&change.versions);
                    return Err(e);
                }
            },
            _ => None,
        };
        if let Err(e) = self.writer.submit(m).wait() {
            // Versions generated in a token for this change would be orphans there —
            // unless the change may have been stored after all: then they may be what
            // the store refers to, and an orphan is the lesser harm.
            if !e.may_have_landed() {
                self.discard_hsm_versions(&change.versions);
                if let (None, Some(slot)) = (old, change.rec.slot) {
                    self.wipe_slot(slot, &change.rec.name);
                }
                return Err(e.into());
            }
            // Memory holds only what is durable. A change the store reads as holding
            // (its key record and every version it wrote) is made durable by a commit
            // that succeeds after it (`Writer::confirm`, which checks and commits on the
            // writer's thread): then it is published and its caller told of success, as
            // for any other. Left out of memory, a disabled or purged key stayed usable
            // until the next start, and a retried create made a second key of its name.
            let held = Held::Key {
                record: change.rec.clone(),
                versions: change
                    .versions
                    .iter()
                    .map(|(v, record, _)| (*v, record.clone()))
                    .collect(),
            };
            if let Err(not) = self.writer.confirm(Some(held)) {
                tracing::warn!(
                    key = %change.rec.name,
                    versions = change.versions.len(),
                    error = %not,
                    "a change that may have been stored is not confirmed; keeping its token objects"
                );
                return Err(e.into());
            }
            tracing::warn!(
                key = %change.rec.name,
                "a change answered with an error was stored after all, and is now confirmed"
            );
        }

        // Durable: a purged key's slot goes now, and with it every copy of its material
        // that redb's freed pages may still hold.
        if was_live
            && change.rec.state == KeyState::Deleted
            && let Some(slot) = old.and_then(|o| o.rec.slot)
        {
            self.wipe_slot(slot, &change.rec.name);
        }
        let versions = match old {
            Some(o) if change.versions.is_empty() => o.versions.clone(),
            _ => Arc::new(VersionsCell::loaded(edited_versions(
                base.unwrap_or_default(),
                change.versions,
            ))),
        };
        // A key that cannot be used (disabled, pending deletion; also when such a key is
        // rotated) keeps no unwrapped material.
        let versions = match change.rec.state {
            KeyState::Enabled => versions,
            _ => versions.without_material(),
        };
        let entry = Arc::new(KeyEntry {
            rec: change.rec,
            versions,
            usage: old.map(|o| o.usage.clone()).unwrap_or_default(),
        });
        {
            let mut ring = self.ring_mut();
            ring.put(entry.clone());
            ring.replace_due(&tag, &old_due, &new_due);
        }
        // Under the key's lock, as the change: a cancel and a new request that follow
        // each other at once leave the wait of the last.
        if let Some(wait) = change.deletion_wait {
            self.set_deletion_wait(&tag, wait);
        }
        if old_due != new_due {
            self.due_changed.notify_one();
        }
        for (kind, version, message) in change.events {
            self.publish(kind, &entry, version, caller, message);
        }
        if !purged_grants.is_empty() {
            // Announced while the grants are still in force, so that their holders learn
            // of it (see `Published`). How many there were is for managers of all keys
            // (`list_grants`), not for everyone with a role on the key: the log has it.
            tracing::info!(key = %entry.rec.tag, grants = purged_grants.len(), "grants removed with the key's purge");
            let message = format!(
                "the grants on key {} were removed with its purge",
                entry.rec.name
            );
            self.publish(EventKind::PermissionChanged, &entry, None, caller, message);
            self.forget_grants(&purged_grants.iter().map(|g| g.id).collect::<Vec<_>>());
        }
        Ok(entry)
    }

    /// Records a refused lifecycle call in the history and returns the refusal.
    pub(super) fn refuse(
        &self,
        caller: &Caller,
        entry: &KeyEntry,
        action: Action,
        version: Option<u32>,
        err: EngineError,
    ) -> EngineError {
        let m = history_mutation(
            &entry.rec.tag,
            self.now(),
            caller,
            action,
            version,
            Some(err.kind()),
        );
        match self.writer.submit(vec![m]).wait() {
            Ok(()) => err,
            Err(store) => EngineError::Store(store),
        }
    }

    /// The common shape of a lifecycle call on an existing key.
    fn change_key(
        &self,
        caller: &Caller,
        key: &str,
        action: Action,
        version: Option<u32>,
        build: impl FnOnce(&Arc<KeyEntry>, UnixMillis) -> Result<Change, EngineError>,
    ) -> Result<Arc<KeyEntry>, EngineError> {
        let tag = self.resolve(key)?.rec.tag.clone();
        // `None` only when the key went (expunged) between the two reads.
        self.change_key_if(caller, &tag, action, version, |_, _| true, build)?
            .ok_or_else(|| super::not_found(key))
    }

    /// [`Engine::change_key`] by tag, if `applies` to the key as it is under its lock;
    /// `None`, with nothing recorded, if it does not or the key is gone. For the
    /// scheduler's tasks: a key changed since the pass listed its task (a rotation due on
    /// a key purged earlier in the same pass, a purge after a cancel) is not a refusal
    /// of a `kmsd` action to put in its history, only a task that no longer exists.
    fn change_key_if(
        &self,
        caller: &Caller,
        tag: &str,
        action: Action,
        version: Option<u32>,
        applies: impl FnOnce(&KeyEntry, UnixMillis) -> bool,
        build: impl FnOnce(&Arc<KeyEntry>, UnixMillis) -> Result<Change, EngineError>,
    ) -> Result<Option<Arc<KeyEntry>>, EngineError> {
        let lock = self.key_lock(tag);
        let _serial = lock.lock().unwrap_or_else(|e| e.into_inner());
        // Read again under the lock: another change may have landed meanwhile. By tag: a
        // name may have passed to a new key meanwhile (the old one purged), whose changes
        // take another lock; building on it here could write back a stale version count.
        let entry = match self.resolve(tag) {
            Ok(entry) => entry,
            Err(EngineError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let now = self.now();
        if !applies(&entry, now) {
            return Ok(None);
        }
        match build(&entry, now) {
            Ok(change) => self.apply(caller, Some(&entry), change).map(Some),
            Err(e) => Err(self.refuse(caller, &entry, action, version, e)),
        }
    }

    /// Creates a key with version 1, enabled at once.
    pub fn create_key(&self, caller: &Caller, spec: &CreateKey) -> Result<KeyInfo, EngineError> {
        let invalid = |e: model::RuleViolation| EngineError::InvalidArgument(e.0);
        model::validate_name(&spec.name).map_err(invalid)?;
        model::validate_memo(&spec.memo).map_err(invalid)?;
        model::validate_convergent(spec.key_type, spec.convergent).map_err(invalid)?;
        let days = spec.rotation_days.unwrap_or(DEFAULT_ROTATION_DAYS);
        model::validate_rotation_days(days).map_err(invalid)?;
        self.check_protection(spec)?;

        // Asked before anything is generated (a quick refusal), and again under the
        // lifecycle lock, which the generation does not hold: an `hsm` key made on a slow
        // token must not hold up every other lifecycle change, grants and revokes among
        // them (which wait for this lock holding the grants gate).
        let name_taken = || self.ring().by_name.contains_key(&spec.name);
        let taken =
            || EngineError::AlreadyExists(format!("a key named {:?} already exists", spec.name));
        if name_taken() {
            return Err(taken());
        }
        let tag = crypto::random_tag()?;
        // Written and synced before the commit that refers to it (`store::key_slots`), and
        // before the lifecycle lock: creates made at once write their slots together.
        let slot = match spec.protection {
            Protection::Basic => Some(
                self.slots
                    .allocate(&[tag.as_str()])
                    .map_err(StoreError::from)?[0]
                    .0,
            ),
            _ => None,
        };
        let now = self.now();
        let rec = KeyRecord {
            tag,
            name: spec.name.clone(),
            key_type: spec.key_type,
            protection: spec.protection,
            // Only for dedicated-hsm (check_protection refused it elsewhere).
            hsm: spec.hsm.clone(),
            state: KeyState::Enabled,
            convergent: spec.convergent,
            current_version: 1,
            auto_rotation: spec.auto_rotation,
            rotation_days: days,
            rotation_anchor: spec.auto_rotation.then_some(now),
            rotation_stopped: false,
            token_objects_left: false,
            slot,
            created_at: now,
            deletion_due_at: None,
            deleted_at: None,
            memo: spec.memo.clone(),
        };
        // The registration of a dedicated token, as the key is generated on it: a token
        // removed (or removed and registered again) before the commit would leave a key
        // on a token the daemon no longer knows.
        let registration = || {
            spec.hsm
                .as_deref()
                .and_then(|name| self.hsm.registration(name))
        };
        let removed = || {
            EngineError::NotFound(format!(
                "HSM token {:?} was removed while key {} was being generated on it",
                spec.hsm.as_deref().unwrap_or_default(),
                rec.name
            ))
        };
        let generated_on = registration();
        let version = match self.new_version(&rec, 1, now) {
            Ok(v) => v,
            Err(e) => {
                if let Some(slot) = slot {
                    self.wipe_slot(slot, &rec.name);
                }
                // Removed since it was checked: said as such, not as a broken store.
                if spec.hsm.is_some() && (generated_on.is_none() || registration().is_none()) {
                    return Err(removed());
                }
                return Err(e);
            }
        };
        let serial = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        let refusal = if name_taken() {
            // Made by another create meanwhile.
            Some(taken())
        } else if registration() != generated_on {
            Some(removed())
        } else {
            None
        };
        if let Some(refusal) = refusal {
            // What this create generated goes.
            drop(serial);
            self.discard_hsm_versions(std::slice::from_ref(&version));
            if let Some(slot) = slot {
                self.wipe_slot(slot, &rec.name);
            }
            return Err(refusal);
        }
        let mut change = Change::new(rec.clone(), Action::Create).event(
            EventKind::Created,
            Some(1),
            format!("key {} ({}) created", rec.name, rec.key_type),
        );
        change.versions.push(version);
        change.version = Some(1);
        Ok(self.apply(caller, None, change)?.info())
    }

    /// Manual rotation: a new current version; the auto-rotation schedule does not move.
    pub fn rotate(&self, caller: &Caller, key: &str) -> Result<KeyInfo, EngineError> {
        self.change_key(caller, key, Action::Rotate, None, |e, now| {
            if e.rec.state != KeyState::Enabled {
                return Err(EngineError::InvalidState(format!(
                    "key {} is {}; only an enabled key can be rotated by hand",
                    e.rec.name, e.rec.state
                )));
            }
            self.rotation_change(e, now, Action::Rotate, e.rec.rotation_anchor)
        })
        .map(|e| e.info())
    }

    /// Builds a rotation to version N+1 with the given new anchor.
    fn rotation_change(
        &self,
        e: &KeyEntry,
        now: UnixMillis,
        action: Action,
        anchor: Option<UnixMillis>,
    ) -> Result<Change, EngineError> {
        // A purged key has no material to rotate to, and takes no new one: a rotation
        // decided on an entry read before the purge (a batch's, a forced rotation's) stops
        // here.
        if e.rec.state == KeyState::Deleted {
            return Err(EngineError::InvalidState(format!(
                "key {} is deleted",
                e.rec.name
            )));
        }
        let max = e.rec.protection.max_versions();
        if e.rec.current_version >= max {
            return Err(EngineError::VersionLimit(format!(
                "key {} has {max} versions, the limit for {} keys; create a new key instead",
                e.rec.name, e.rec.protection
            )));
        }
        let v = e.rec.current_version + 1;
        let mut rec = e.rec.clone();
        rec.current_version = v;
        rec.rotation_anchor = anchor;
        let mut change = Change::new(rec, action).event(
            EventKind::Rotated,
            Some(v),
            format!("key {} rotated to version {v}", e.rec.name),
        );
        change.version = Some(v);
        change.versions.push(self.new_version(&e.rec, v, now)?);
        if v == max {
            // The last version the key may have: say so now, not when the next rotation
            // (up to 730 days away, or a forced one for the nonce budget) is refused, and
            // drop the schedule that could only fail (SPEC §4).
            change.rec.rotation_stopped = true;
            let stopped = if e.rec.auto_rotation {
                "; automatic rotation stopped"
            } else {
                ""
            };
            change = change.event(
                EventKind::VersionLimitReached,
                Some(v),
                format!(
                    "key {} now has version {v}, the last of the {max} allowed for {} keys{stopped}; \
                     create a new key before it needs rotating again",
                    e.rec.name, e.rec.protection
                ),
            );
        }
        Ok(change)
    }

    /// A scheduled rotation: runs in any state but deleted; at the version limit, auto
    /// rotation stops and an event asks for a new key.
    pub(super) fn auto_rotate(
        &self,
        tag: &str,
        due: UnixMillis,
        now: UnixMillis,
    ) -> Result<Option<Arc<KeyEntry>>, EngineError> {
        let caller = Caller::daemon();
        let still_due = |e: &KeyEntry, _| e.rec.next_rotation_at() == Some(due);
        self.change_key_if(&caller, tag, Action::AutoRotate, None, still_due, |e, _| {
            let period = i64::from(e.rec.rotation_days) * DAY_MS;
            match self.rotation_change(
                e,
                now,
                Action::AutoRotate,
                Some(anchor_after_rotation(due, now, period)),
            ) {
                Err(EngineError::VersionLimit(msg)) => {
                    let mut rec = e.rec.clone();
                    rec.rotation_stopped = true;
                    let mut change = Change::new(rec, Action::AutoRotate).event(
                        EventKind::VersionLimitReached,
                        None,
                        format!("{msg}; automatic rotation stopped"),
                    );
                    change.refusal = Some(EngineError::VersionLimit(msg));
                    Ok(change)
                }
                other => other,
            }
        })
    }

    /// Restarts, now, the rotation periods that began later than now by the wall clock
    /// (more than a minute): periods started while the clock ran ahead, which once it is
    /// set back would wait out the time it was ahead before the next rotation. Each is a
    /// `set-rotation` by kmsd in the key's history, with the dates in its event. Returns
    /// how many were restarted.
    pub(super) fn restart_rotations_dated_ahead(&self) -> usize {
        const SLACK_MS: i64 = 60_000;
        let ahead = |e: &KeyEntry, now: UnixMillis| {
            e.rec.next_rotation_at().is_some()
                && e.rec
                    .rotation_anchor
                    .is_some_and(|a| a > now.saturating_add(SLACK_MS))
        };
        let now = self.now();
        let tags: Vec<String> = self
            .ring()
            .by_tag
            .values()
            .filter(|e| ahead(e, now))
            .map(|e| e.rec.tag.clone())
            .collect();
        let caller = Caller::daemon();
        let mut restarted = 0;
        for tag in tags {
            let restart = |e: &Arc<KeyEntry>, now| {
                let mut rec = e.rec.clone();
                let began = rec
                    .rotation_anchor
                    .map(model::format_time)
                    .unwrap_or_default();
                rec.rotation_anchor = Some(now);
                let next = rec
                    .next_rotation_at()
                    .map(model::format_time)
                    .unwrap_or_default();
                Ok(Change::new(rec, Action::SetRotation).event(
                    EventKind::SettingsChanged,
                    None,
                    format!(
                        "key {}: its rotation period began {began}, later than the clock now \
                         reads (it was set back); the period starts again now, next {next}",
                        e.rec.name
                    ),
                ))
            };
            match self.change_key_if(&caller, &tag, Action::SetRotation, None, ahead, restart) {
                Ok(Some(_)) => restarted += 1,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(key = %tag, error = %e, "cannot restart a rotation period dated ahead")
                }
            }
        }
        if restarted > 0 {
            tracing::warn!(
                keys = restarted,
                "the wall clock is behind rotation periods it started; they start again now"
            );
        }
        restarted
    }

    /// Rotation forced by the nonce budget of `exhausted` (if still current). When the
    /// rotation is impossible (the version limit), the first refused call of this run
    /// announces it, not every refused call after it (`budget_announced`).
    pub(super) fn rotate_for_budget(&self, tag: &str, exhausted: u32) -> Result<(), EngineError> {
        // The encryption that crosses the budget may run on a tokio worker (the
        // connection's reader runs small AES calls itself), and this waits for a commit.
        super::blocking_section(|| self.rotate_for_budget_now(tag, exhausted))
    }

    fn rotate_for_budget_now(&self, tag: &str, exhausted: u32) -> Result<(), EngineError> {
        let caller = Caller::daemon();
        let lock = self.key_lock(tag);
        let _serial = lock.lock().unwrap_or_else(|e| e.into_inner());
        let entry = self.resolve(tag)?;
        if entry.rec.state == KeyState::Deleted {
            // Purged while the call that crossed the budget ran (a batch resolves its key
            // once): the call fails as a call on a deleted key, with no event about it.
            return Err(EngineError::InvalidState(format!(
                "key {} is deleted",
                entry.rec.name
            )));
        }
        if entry.rec.current_version != exhausted {
            return Ok(());
        }
        let now = self.now();
        let change = match self.rotation_change(
            &entry,
            now,
            Action::AutoRotate,
            entry.rec.rotation_anchor,
        ) {
            Ok(c) => c.event(
                EventKind::NonceBudgetLow,
                Some(exhausted),
                format!(
                    "version {exhausted} of key {} reached its encryption budget and was retired",
                    entry.rec.name
                ),
            ),
            Err(e) => {
                let first = self
                    .budget_announced
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((entry.rec.tag.clone(), exhausted));
                if !first {
                    return Err(e);
                }
                self.publish(
                    EventKind::NonceBudgetLow,
                    &entry,
                    Some(exhausted),
                    &caller,
                    format!(
                        "version {exhausted} of key {} reached its encryption budget and cannot be rotated: {e}",
                        entry.rec.name
                    ),
                );
                return Err(e);
            }
        };
        self.apply(&caller, Some(&entry), change).map(|_| ())
    }

    pub fn enable(&self, caller: &Caller, key: &str) -> Result<KeyInfo, EngineError> {
        self.set_state(
            caller,
            key,
            Action::Enable,
            KeyState::Disabled,
            KeyState::Enabled,
        )
    }

    pub fn disable(&self, caller: &Caller, key: &str) -> Result<KeyInfo, EngineError> {
        self.set_state(
            caller,
            key,
            Action::Disable,
            KeyState::Enabled,
            KeyState::Disabled,
        )
    }

    fn set_state(
        &self,
        caller: &Caller,
        key: &str,
        action: Action,
        from: KeyState,
        to: KeyState,
    ) -> Result<KeyInfo, EngineError> {
        self.change_key(caller, key, action, None, |e, _| {
            if e.rec.state != from {
                return Err(EngineError::InvalidState(format!(
                    "key {} is {}; {action} applies only to a key that is {from}",
                    e.rec.name, e.rec.state
                )));
            }
            let mut rec = e.rec.clone();
            rec.state = to;
            Ok(Change::new(rec, action).event(
                EventKind::StateChanged,
                None,
                format!("key {} is now {to}", e.rec.name),
            ))
        })
        .map(|e| e.info())
    }

    /// Enables or disables one version (its own flag; the key's state applies on top).
    pub fn set_version_enabled(
        &self,
        caller: &Caller,
        key: &str,
        version: u32,
        enabled: bool,
    ) -> Result<Vec<VersionInfo>, EngineError> {
        let action = if enabled {
            Action::EnableVersion
        } else {
            Action::DisableVersion
        };
        self.change_key(caller, key, action, Some(version), |e, _| {
            if !matches!(e.rec.state, KeyState::Enabled | KeyState::Disabled) {
                return Err(EngineError::InvalidState(format!(
                    "key {} is {}; versions can be changed only on an enabled or disabled key",
                    e.rec.name, e.rec.state
                )));
            }
            let v = self.version_of(e, version)?.ok_or_else(|| {
                EngineError::NotFound(format!("key {} has no version {version}", e.rec.name))
            })?;
            let mut change = Change::new(e.rec.clone(), action);
            change.version = Some(version);
            if v.record.enabled != enabled {
                let mut vrec = v.record.clone();
                vrec.enabled = enabled;
                change.versions.push((version, vrec, None));
                let (kind, word) = if enabled {
                    (EventKind::VersionEnabled, "enabled")
                } else {
                    (EventKind::VersionDisabled, "disabled")
                };
                change = change.event(
                    kind,
                    Some(version),
                    format!("version {version} of key {} {word}", e.rec.name),
                );
            }
            Ok(change)
        })
        .and_then(|e| self.version_infos(&e))
    }

    /// Auto rotation on/off and its period. Switching on starts the period now; changing
    /// the period moves the next date at once (next = anchor + period).
    pub fn set_rotation(
        &self,
        caller: &Caller,
        key: &str,
        auto_rotation: bool,
        rotation_days: Option<u32>,
    ) -> Result<KeyInfo, EngineError> {
        self.change_key(caller, key, Action::SetRotation, None, |e, now| {
            if let Some(d) = rotation_days {
                model::validate_rotation_days(d).map_err(|r| EngineError::InvalidArgument(r.0))?;
            }
            if !matches!(e.rec.state, KeyState::Enabled | KeyState::Disabled) {
                return Err(EngineError::InvalidState(format!(
                    "key {} is {}; rotation settings change only on an enabled or disabled key",
                    e.rec.name, e.rec.state
                )));
            }
            let mut rec = e.rec.clone();
            rec.rotation_days = rotation_days.unwrap_or(rec.rotation_days);
            rec.rotation_anchor = match (auto_rotation, e.rec.auto_rotation) {
                (false, _) => None,
                (true, false) => Some(now),
                (true, true) => e.rec.rotation_anchor.or(Some(now)),
            };
            rec.auto_rotation = auto_rotation;
            let next = rec
                .next_rotation_at()
                .map(model::format_time)
                .unwrap_or_else(|| "none".into());
            Ok(Change::new(rec, Action::SetRotation).event(
                EventKind::SettingsChanged,
                None,
                format!(
                    "key {}: auto rotation {}, every {} days, next {next}",
                    e.rec.name,
                    if auto_rotation { "on" } else { "off" },
                    rotation_days.unwrap_or(e.rec.rotation_days)
                ),
            ))
        })
        .map(|e| e.info())
    }

    pub fn set_memo(&self, caller: &Caller, key: &str, memo: &str) -> Result<KeyInfo, EngineError> {
        self.change_key(caller, key, Action::SetMemo, None, |e, _| {
            model::validate_memo(memo).map_err(|r| EngineError::InvalidArgument(r.0))?;
            if e.rec.state == KeyState::Deleted {
                return Err(EngineError::InvalidState(format!(
                    "key {} is deleted",
                    e.rec.name
                )));
            }
            let mut rec = e.rec.clone();
            rec.memo = memo.to_string();
            Ok(Change::new(rec, Action::SetMemo).event(
                EventKind::SettingsChanged,
                None,
                format!("key {}: memo changed", e.rec.name),
            ))
        })
        .map(|e| e.info())
    }

    /// Deletion request: `pending-deletion` until now + the deletion delay.
    pub fn request_deletion(&self, caller: &Caller, key: &str) -> Result<KeyInfo, EngineError> {
        let delay = self.config.effective_deletion_delay();
        let ends = self.clock.elapsed_ms().saturating_add(delay);
        self.change_key(caller, key, Action::Delete, None, |e, now| {
            if !matches!(e.rec.state, KeyState::Enabled | KeyState::Disabled) {
                return Err(EngineError::InvalidState(format!(
                    "key {} is {}; deletion can be requested for an enabled or disabled key",
                    e.rec.name, e.rec.state
                )));
            }
            let mut rec = e.rec.clone();
            rec.state = KeyState::PendingDeletion;
            let due = now.saturating_add(delay);
            rec.deletion_due_at = Some(due);
            Ok(Change::new(rec, Action::Delete)
                .event(
                    EventKind::DeletionRequested,
                    None,
                    format!(
                        "deletion of key {} requested; it will be purged at {}",
                        e.rec.name,
                        model::format_time(due)
                    ),
                )
                .deletion_wait(Some(ends)))
        })
        .map(|e| e.info())
    }

    /// Cancels a deletion request: the key becomes `disabled`. Refused once the wait is
    /// over (NCP: a deletion is cancelled before its wait ends), though the purge has
    /// not run yet — held up by a long scheduler pass, a suspended machine, a failed
    /// commit. A wait the wall clock's step forward cut short (the clock a step does not
    /// move still has time left) may still be cancelled, as it is not purged either.
    pub fn cancel_deletion(&self, caller: &Caller, key: &str) -> Result<KeyInfo, EngineError> {
        self.change_key(caller, key, Action::CancelDeletion, None, |e, now| {
            require_pending(e)?;
            if let Some(due) = e.rec.deletion_due_at
                && due <= now
                && self.deletion_wait_left(&e.rec.tag).is_none()
            {
                // The purge is due: the scheduler is told to look again.
                self.due_changed.notify_one();
                return Err(EngineError::InvalidState(format!(
                    "the deletion wait of key {} ended at {}: it can no longer be \
                     cancelled, and is due to be purged",
                    e.rec.name,
                    model::format_time(due)
                )));
            }
            let mut rec = e.rec.clone();
            rec.state = KeyState::Disabled;
            rec.deletion_due_at = None;
            Ok(Change::new(rec, Action::CancelDeletion)
                .event(
                    EventKind::DeletionCancelled,
                    None,
                    format!(
                        "deletion of key {} cancelled; the key is disabled",
                        e.rec.name
                    ),
                )
                .deletion_wait(None))
        })
        .map(|e| e.info())
    }

    /// Purges a key waiting for deletion at once.
    pub fn delete_now(&self, caller: &Caller, key: &str) -> Result<KeyInfo, EngineError> {
        self.change_key(caller, key, Action::DeleteNow, None, |e, now| {
            require_pending(e)?;
            self.require_token_present(e)?;
            Ok(purge_change(
                e,
                self.versions_of(e)?,
                now,
                Action::DeleteNow,
            ))
        })
        .map(|e| self.destroy_token_objects_after_purge(e).info())
    }

    /// The scheduled purge at the end of the deletion wait.
    pub(super) fn purge_due(&self, tag: &str) -> Result<Option<Arc<KeyEntry>>, EngineError> {
        let still_due = |e: &KeyEntry, now| {
            e.rec.state == KeyState::PendingDeletion
                && e.rec.deletion_due_at.is_some_and(|d| d <= now)
        };
        let purged = self.change_key_if(
            &Caller::daemon(),
            tag,
            Action::Purge,
            None,
            still_due,
            // Not held up by an absent token (NCP: a key is deleted when its wait ends):
            // the purge is committed, and the key's token objects are destroyed once the
            // token is back (`DueKind::DestroyObjects`, which keeps the metadata until
            // then). Held up, the key stayed `pending-deletion` past its wait, which
            // could no longer be cancelled either.
            |e, now| Ok(purge_change(e, self.versions_of(e)?, now, Action::Purge)),
        )?;
        Ok(purged.map(|e| self.destroy_token_objects_after_purge(e)))
    }

    /// Right after a purge: destroys the key's token objects, and on failure leaves them to
    /// the scheduler (`DueKind::DestroyObjects`, retried with backoff). Returns the entry
    /// as it stands afterwards.
    fn destroy_token_objects_after_purge(&self, purged: Arc<KeyEntry>) -> Arc<KeyEntry> {
        if !purged.rec.token_objects_left {
            return purged;
        }
        match self.destroy_token_objects(&purged.rec.tag) {
            Ok(Some(entry)) => entry,
            Ok(None) => purged,
            Err(e) => {
                tracing::warn!(
                    key = %purged.rec.name,
                    error = %e,
                    "the purged key's token objects are not destroyed yet; the scheduler tries again"
                );
                purged
            }
        }
    }

    /// Destroys the token objects of a purged HSM key, then forgets its references. A
    /// purge is committed before its objects are destroyed: destroyed first, a purge
    /// whose commit failed (or may have failed) left a key that could be cancelled back
    /// to use with no material. Returns the entry afterwards, or `None` if there was
    /// nothing left to destroy.
    pub(super) fn destroy_token_objects(
        &self,
        tag: &str,
    ) -> Result<Option<Arc<KeyEntry>>, EngineError> {
        let lock = self.key_lock(tag);
        let _serial = lock.lock().unwrap_or_else(|e| e.into_inner());
        let entry = self.resolve(tag)?;
        if !entry.rec.token_objects_left {
            return Ok(None);
        }
        self.destroy_hsm_material(&entry)?;
        let mut rec = entry.rec.clone();
        rec.token_objects_left = false;
        let mut change = Change::new(rec, Action::Purge).unrecorded();
        for v in self.versions_of(&entry)? {
            let mut vrec = v.record.clone();
            vrec.wrapped = None;
            change.versions.push((v.version, vrec, None));
        }
        self.apply(&Caller::daemon(), Some(&entry), change)
            .map(Some)
    }

    /// Forgets a purged key whose retention has ended: metadata, counters and history.
    pub(super) fn expire(&self, tag: &str) -> Result<(), EngineError> {
        let lock = self.key_lock(tag);
        let _serial = lock.lock().unwrap_or_else(|e| e.into_inner());
        let entry = self.resolve(tag)?;
        let due = due_entries(&entry.rec, self.config.retention_ms);
        let Some((at, DueKind::Expiry)) = due.first().copied() else {
            return Err(EngineError::InvalidState("expiry not due".into()));
        };
        if at > self.now() {
            return Err(EngineError::InvalidState("expiry not yet due".into()));
        }
        // A slot wipe that failed (its purge's, or another's) is tried again first: once
        // the record is gone, the next start no longer knows whose that slot was and keeps
        // it. Failing, the expiry waits for the next pass.
        self.slots.retry_wipes().map_err(StoreError::from)?;
        self.writer
            .submit(vec![
                Mutation::RemoveDue {
                    at,
                    tag: tag.to_string(),
                    kind: DueKind::Expiry,
                },
                Mutation::Expunge {
                    tag: tag.to_string(),
                },
            ])
            .wait()?;
        self.ring_mut().remove(tag, &due);
        self.set_deletion_wait(tag, None);
        // The key's lock goes with it (held here; whoever waits on it finds no key).
        self.key_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(tag);
        Ok(())
    }
}

fn require_pending(e: &KeyEntry) -> Result<(), EngineError> {
    if e.rec.state != KeyState::PendingDeletion {
        return Err(EngineError::InvalidState(format!(
            "key {} is {}; this needs a key pending deletion",
            e.rec.name, e.rec.state
        )));
    }
    Ok(())
}

/// A key's versions after a committed change: edited ones replaced (sharing their
/// caches), new ones appended with their fresh material.
fn edited_versions(
    mut versions: Vec<Arc<VersionEntry>>,
    edits: Vec<(u32, VersionRecord, Option<Arc<KeyMaterial>>)>,
) -> Vec<Arc<VersionEntry>> {
    for (v, vrec, material) in edits {
        // Versions count from 1; a version 0 can only come from a corrupt store.
        let Some(idx) = v.checked_sub(1).map(|i| i as usize) else {
            tracing::warn!(version = v, "a version 0 in the store is ignored");
            continue;
        };
        let entry = match (versions.get(idx), material) {
            (Some(existing), _) => existing.with_record(vrec),
            (None, material) => {
                let e = VersionEntry::new(v, vrec);
                if let Some(mat) = material {
                    let _ = e.material.set(mat);
                }
                e
            }
        };
        if idx < versions.len() {
            versions[idx] = Arc::new(entry);
        } else {
            versions.push(Arc::new(entry));
        }
    }
    versions
}

/// Destroys the material of every version; keeps metadata and history.
fn purge_change(
    e: &KeyEntry,
    versions: &[Arc<VersionEntry>],
    now: UnixMillis,
    action: Action,
) -> Change {
    let mut rec = e.rec.clone();
    rec.state = KeyState::Deleted;
    rec.deleted_at = Some(now);
    // Wiped once this commits (`Engine::apply`).
    rec.slot = None;
    rec.deletion_due_at = None;
    // An HSM key's versions keep their references (no material) until the objects are
    // destroyed, right after this commit (`destroy_token_objects`).
    let in_token = rec.protection != Protection::Basic;
    rec.token_objects_left = in_token && versions.iter().any(|v| v.record.wrapped.is_some());
    let message = if rec.token_objects_left && action == Action::Purge {
        // Destroyed after the commit, or, with the token away, once it is back (a
        // `delete-now` is refused while it is away).
        format!(
            "key {} purged; its objects in the token are destroyed as soon as the token can be reached",
            e.rec.name
        )
    } else {
        format!("key {} purged; its material is destroyed", e.rec.name)
    };
    let mut change = Change::new(rec, action)
        .event(EventKind::Purged, None, message)
        .deletion_wait(None);
    if !in_token {
        for v in versions {
            let mut vrec = v.record.clone();
            vrec.wrapped = None;
            change.versions.push((v.version, vrec, None));
        }
    }
    change
}

/// Holds the generation of a version of one key name (at the start of `new_version`, which
/// every create and rotation generates with), until the test lets it go: what shows
/// which locks the generation runs under.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod generation_hold {
    use std::sync::{Mutex, mpsc};

    struct Hold {
        name: String,
        reached: mpsc::Sender<()>,
        go: mpsc::Receiver<()>,
    }

    static HOLD: Mutex<Option<Hold>> = Mutex::new(None);

    /// The next generation for key `name` says so on the first channel when it starts,
    /// and waits there for a message (or a hang-up) on the second.
    pub(crate) fn set(name: &str) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (reached, reached_rx) = mpsc::channel();
        let (go_tx, go) = mpsc::channel();
        *HOLD.lock().unwrap() = Some(Hold {
            name: name.into(),
            reached,
            go,
        });
        (reached_rx, go_tx)
    }

    pub(super) fn reached(name: &str) {
        let hold = {
            let mut hold = HOLD.lock().unwrap_or_else(|e| e.into_inner());
            match &*hold {
                Some(h) if h.name == name => hold.take(),
                _ => None,
            }
        };
        if let Some(h) = hold {
            let _ = h.reached.send(());
            let _ = h.go.recv();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A key is generated outside the lifecycle lock: a create whose generation takes
    /// long (an `hsm` key on a slow token, an RSA key) holds up no grant, revoke or other
    /// create meanwhile. Fails with the generation moved under the lock: the grant waits.
    #[test]
    fn a_keys_generation_holds_no_lifecycle_lock() {
        use kms_shared::model::Role;
        use kms_shared::protocol::GrantSpec;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let clock = std::sync::Arc::new(crate::clock::ManualClock::new(1_700_000_000_000));
        let engine = engine_in(dir.path(), clock);
        let admin = Caller::daemon();
        engine
            .create_key(&admin, &CreateKey::new("shared", KeyType::Aes256))
            .unwrap();
        let (reached, go) = generation_hold::set("held-gen");
        let (engine, admin) = (&engine, &admin);
        std::thread::scope(|s| {
            // Moved in, so that a failing assertion below drops it on its way out and
            // the held create, let go by the hang-up, ends: the scope waits for it.
            let go = go;
            let create = s.spawn(move || {
                engine.create_key(admin, &CreateKey::new("held-gen", KeyType::Aes256))
            });
            reached
                .recv_timeout(Duration::from_secs(30))
                .expect("the create never reached its generation");
            // On threads of their own, so that a wait for the held create shows as a
            // timeout rather than a test that never ends.
            let (done_tx, done) = std::sync::mpsc::channel();
            let done_other = done_tx.clone();
            s.spawn(move || {
                let grant = GrantSpec {
                    role: Role::KeyUser,
                    user: Some("root".into()),
                    group: None,
                    key: Some("shared".into()),
                };
                let _ = done_tx.send(engine.grant(admin, &grant).map(|_| ()));
            });
            s.spawn(move || {
                let other = CreateKey::new("made-meanwhile", KeyType::Aes256);
                let _ = done_other.send(engine.create_key(admin, &other).map(|_| ()));
            });
            for _ in 0..2 {
                let finished = done.recv_timeout(Duration::from_secs(10));
                if finished.is_err() {
                    // Let the create go, so that the scope can end and the test fail.
                    let _ = go.send(());
                }
                finished
                    .expect("a lifecycle change waited for another key's generation")
                    .unwrap();
            }
            let _ = go.send(());
            let held = create.join().unwrap().unwrap();
            assert_eq!(held.name, "held-gen");
        });
        assert!(engine.resolve("made-meanwhile").is_ok());
    }

    fn engine_in(
        dir: &std::path::Path,
        clock: std::sync::Arc<crate::clock::ManualClock>,
    ) -> Engine {
        let root = crate::crypto::RootKey::from_bytes([0x55; 32]);
        let store = crate::store::Store::open(&dir.join("kms.redb"), &root.fingerprint()).unwrap();
        Engine::open(store, root, clock, super::super::EngineConfig::default()).unwrap()
    }

    fn slot_file_holds(engine: &Engine, secret: &[u8]) -> bool {
        let bytes = std::fs::read(engine.slots.file_path()).unwrap();
        bytes.windows(secret.len()).any(|w| w == secret)
    }

    /// An expiry whose key's slot could not be wiped at its purge (or any other failed
    /// wipe) waits until the wipe succeeds: once the record is gone the next start no
    /// longer knows whose slot that was, and keeps it with the material it unwraps.
    #[test]
    fn an_expiry_waits_for_a_failed_slot_wipe() {
        let dir = tempfile::tempdir().unwrap();
        let clock = std::sync::Arc::new(crate::clock::ManualClock::new(1_700_000_000_000));
        let engine = engine_in(dir.path(), clock.clone());
        let admin = Caller::daemon();
        let key = engine
            .create_key(&admin, &CreateKey::new("gone", KeyType::Aes256))
            .unwrap();
        let slot = engine.resolve(&key.tag).unwrap().rec.slot.unwrap();
        let secret = engine.slots.read(slot, &key.tag).unwrap();
        assert!(slot_file_holds(&engine, secret.as_slice()));
        let free = engine.slots.free_slots();

        engine.request_deletion(&admin, "gone").unwrap();
        engine.slots.set_writes_fail(true);
        // The purge itself lands; its wipe fails and is left for later.
        engine.delete_now(&admin, "gone").unwrap();
        assert!(slot_file_holds(&engine, secret.as_slice()));
        assert_eq!(engine.slots.free_slots(), free);

        clock.advance(engine.config.retention_ms + 1);
        assert!(
            engine.expire(&key.tag).is_err(),
            "the record went while its slot still held the secret"
        );
        assert_eq!(
            engine.resolve(&key.tag).unwrap().rec.state,
            KeyState::Deleted
        );

        engine.slots.set_writes_fail(false);
        engine.expire(&key.tag).unwrap();
        assert!(engine.resolve(&key.tag).is_err());
        assert!(!slot_file_holds(&engine, secret.as_slice()));
        assert_eq!(engine.slots.free_slots(), free + 1);
    }

    /// A call that resolved its key before a purge wiped the key's slot fails as a call on
    /// a destroyed key (or, once the key has expired, an unknown one), not as a store
    /// failure.
    #[test]
    fn a_call_racing_a_purge_fails_on_the_key_as_it_is_now() {
        use kms_shared::protocol::ErrorKind;
        let dir = tempfile::tempdir().unwrap();
        let clock = std::sync::Arc::new(crate::clock::ManualClock::new(1_700_000_000_000));
        let engine = engine_in(dir.path(), clock.clone());
        let admin = Caller::daemon();
        let key = engine
            .create_key(&admin, &CreateKey::new("raced", KeyType::Aes256))
            .unwrap();
        let before = engine.resolve(&key.tag).unwrap();
        engine.slot_secret(&before.rec).unwrap();

        engine.request_deletion(&admin, "raced").unwrap();
        engine.delete_now(&admin, "raced").unwrap();
        let e = engine.slot_secret(&before.rec).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidState, "{e}");
        assert!(e.to_string().contains("destroyed"), "{e}");

        clock.advance(engine.config.retention_ms + 1);
        engine.expire(&key.tag).unwrap();
        let e = engine.slot_secret(&before.rec).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    }

    /// A forced rotation decided on an entry read before a purge (an encryption batch
    /// resolves its key once, and an item crossed the nonce budget after `delete-now`)
    /// gives the purged key no new version, event or history entry. It gave it a version
    /// 2, wrapped material a purged key must not have, and `rotated` after `purged`.
    #[test]
    fn a_purged_key_is_not_rotated_for_its_budget() {
        use kms_shared::protocol::{ErrorKind, HistoryQuery};
        let dir = tempfile::tempdir().unwrap();
        let root = crate::crypto::RootKey::from_bytes([0x55; 32]);
        let store =
            crate::store::Store::open(&dir.path().join("kms.redb"), &root.fingerprint()).unwrap();
        let engine = Engine::open(
            store,
            root,
            std::sync::Arc::new(crate::clock::ManualClock::new(1_700_000_000_000)),
            super::super::EngineConfig::default(),
        )
        .unwrap();
        let admin = Caller::daemon();
        let key = engine
            .create_key(&admin, &CreateKey::new("gone", KeyType::Aes256))
            .unwrap();
        engine.request_deletion(&admin, "gone").unwrap();
        engine.delete_now(&admin, "gone").unwrap();
        let mut events = engine.subscribe();
        let refused = engine.rotate_for_budget(&key.tag, 1);
        assert_eq!(refused.unwrap_err().kind(), ErrorKind::InvalidState);
        let purged = engine.get_key(&key.tag).unwrap();
        assert_eq!(
            (purged.state, purged.current_version),
            (KeyState::Deleted, 1)
        );
        assert!(events.try_recv().is_err(), "an event about the purged key");
        let history = engine
            .history(&HistoryQuery {
                key: key.tag.clone(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(history[0].action, Action::DeleteNow, "{history:?}");
    }
}
