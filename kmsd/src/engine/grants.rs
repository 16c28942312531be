//! Grants: roles given to users and groups, for all keys or one key (SPEC §6). Kept in
//! the store's grants table and mirrored in memory for the per-request check.

use super::{Caller, Engine, EngineError, history_mutation, keyring::KeyEntry};
use crate::store::{Held, Mutation};
use kms_shared::model::{Action, GrantInfo, KeyState, NO_PRINCIPAL_ID, Principal};
use kms_shared::protocol::{EventKind, GrantSpec};
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl Engine {
    /// The current grants (cheap: a shared snapshot).
    pub fn grants(&self) -> Arc<Vec<GrantInfo>> {
        self.grants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Held by a change made under a manager's role from the check of that role until
    /// the change is done, so that no `grant` or `revoke` lands in between
    /// ([`Engine::grants_changing`] waits for it). Without it a change that passed its
    /// check, then waited for a key's lock held by a revoke, ran after the revoke was
    /// acknowledged — a `grant` among them, giving the revoked role back.
    pub fn grants_in_force(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        #[cfg(test)]
        let _waiting = GateWaiter::new(&self.gate_waiting);
        self.grants_gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Held by a `grant` or `revoke` from the check of the caller's role until the change
    /// is published: it waits for the changes begun under the grants as they were, and
    /// holds back those not yet checked, which are then checked against the new grants.
    pub fn grants_changing(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        #[cfg(test)]
        let _waiting = GateWaiter::new(&self.gate_waiting);
        self.grants_gate.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Tests: whether a grant change holds the gate, and how many callers wait for it
    /// (so that a test knows its calls have reached the gate, without sleeping).
    #[cfg(test)]
    pub(crate) fn gate_state(&self) -> (bool, usize) {
        let changing = matches!(
            self.grants_gate.try_read(),
            Err(std::sync::TryLockError::WouldBlock)
        );
        let waiting = self.gate_waiting.load(std::sync::atomic::Ordering::SeqCst);
        (changing, waiting)
    }

    /// The principal a spec names, and the uid or gid its name has now.
    fn grant_principal(spec: &GrantSpec) -> Result<(Principal, u32), EngineError> {
        let principal = match (&spec.user, &spec.group) {
            (Some(u), None) => Principal::User(u.clone()),
            (None, Some(g)) => Principal::Group(g.clone()),
            _ => {
                return Err(EngineError::InvalidArgument(
                    "a grant names exactly one of a user or a group".into(),
                ));
            }
        };
        let id = principal_id(&principal).ok_or_else(|| {
            EngineError::InvalidArgument(match &principal {
                Principal::User(u) => format!("no user named {u:?}"),
                Principal::Group(g) => format!("no group named {g:?}"),
            })
        })?;
        Ok((principal, id))
    }

    /// Binds grants made before kmsd recorded the uid or gid of their name (at start-up,
    /// once per grant): to the id the name has now, or, for a name no account or group
    /// has, to [`NO_PRINCIPAL_ID`], which no caller has. Left unbound, such a grant would
    /// go to whoever is next given the name. (A lookup that fails because the user
    /// database cannot be reached looks the same: the grant then applies to no one, the
    /// safe side, and is granted again.) Returns what to store.
    pub(super) fn bind_principal_ids(grants: &mut [GrantInfo]) -> Vec<Mutation> {
        grants
            .iter_mut()
            .filter(|g| g.principal_id.is_none())
            .map(|g| {
                g.principal_id = Some(principal_id(&g.principal).unwrap_or(NO_PRINCIPAL_ID));
                Mutation::PutGrant(g.clone())
            })
            .collect()
    }

    /// Runs a grant or revoke under the change lock of the key it names (so that it cannot
    /// cross a deletion request or a purge), and records a refusal in that key's history
    /// as every refused call that names a key is (SPEC §6, §7). `check` gets the key as it
    /// is under the lock and returns what to commit, or why not.
    fn on_grant_key<T>(
        &self,
        caller: &Caller,
        spec: &GrantSpec,
        action: Action,
        check: impl FnOnce(Option<&KeyEntry>) -> Result<(Mutation, GrantInfo, T), EngineError>,
    ) -> Result<T, EngineError> {
        let entry = match &spec.key {
            None => None,
            Some(k) => match self.resolve(k) {
                Ok(e) => Some(e),
                // A grant left on a key that no longer exists at all (a store from before
                // grants were removed with their key's purge) can still be revoked by tag.
                Err(_)
                    if action == Action::Revoke
                        && self
                            .grants()
                            .iter()
                            .any(|g| g.key_tag.as_deref() == Some(k)) =>
                {
                    None
                }
                Err(e) => return Err(e),
            },
        };
        let Some(entry) = entry else {
            let (m, grant, out) = check(None)?;
            self.change_grants(caller, action, m, &grant)?;
            return Ok(out);
        };
        let lock = self.key_lock(&entry.rec.tag);
        let _serial = lock.lock().unwrap_or_else(|e| e.into_inner());
        let entry = self.resolve(&entry.rec.tag)?;
        match check(Some(&entry)) {
            Ok((m, grant, out)) => {
                self.change_grants(caller, action, m, &grant)?;
                Ok(out)
            }
            Err(e) => Err(self.refuse(caller, &entry, action, None, e)),
        }
    }

    /// Grants a role; a duplicate is `already-exists`. A key-scoped grant needs the key
    /// enabled or disabled (SPEC §3: no permission changes once deletion is requested).
    pub fn grant(&self, caller: &Caller, spec: &GrantSpec) -> Result<GrantInfo, EngineError> {
        let _serial = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        self.on_grant_key(caller, spec, Action::Grant, |entry| {
            let (principal, id) = Self::grant_principal(spec)?;
            if let Some(e) = entry
                && !matches!(e.rec.state, KeyState::Enabled | KeyState::Disabled)
            {
                return Err(EngineError::InvalidState(format!(
                    "key {} is {}; permissions can be changed on an enabled or disabled key",
                    e.rec.name, e.rec.state
                )));
            }
            let key_tag = entry.map(|e| e.rec.tag.clone());
            let key_name = entry.map(|e| e.rec.name.clone());
            let current = self.grants();
            if let Some(held) = current
                .iter()
                .find(|g| g.role == spec.role && g.principal == principal && g.key_tag == key_tag)
            {
                let on = key_name.as_deref().unwrap_or("all keys");
                return Err(EngineError::AlreadyExists(match held.principal_id {
                    Some(NO_PRINCIPAL_ID) => format!(
                        "{principal} already has {} on {on}, granted before kmsd recorded ids, \
                         when no account or group had that name (it applies to no one): \
                         revoke it first",
                        spec.role
                    ),
                    Some(other) if other != id => format!(
                        "{principal} already has {} on {on}, granted when that name was id \
                         {other} (it is {id} now, so that grant applies to no one): revoke \
                         it first",
                        spec.role
                    ),
                    _ => format!("{principal} already has {} on {on}", spec.role),
                }));
            }
            let grant = GrantInfo {
                // Never an id given before, even to a grant since revoked.
                id: current
                    .iter()
                    .map(|g| g.id)
                    .fold(self.last_grant_id.load(Ordering::Acquire), u64::max)
                    .saturating_add(1),
                role: spec.role,
                principal,
                key_tag,
                key_name,
                granted_at: self.now(),
                granted_by: caller.account.clone(),
                principal_id: Some(id),
            };
            Ok((Mutation::PutGrant(grant.clone()), grant.clone(), grant))
        })
    }

    /// Removes the grant with the same role, principal and key, in any state of the key:
    /// taking access away is always allowed.
    pub fn revoke(&self, caller: &Caller, spec: &GrantSpec) -> Result<GrantInfo, EngineError> {
        let _serial = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        self.on_grant_key(caller, spec, Action::Revoke, |entry| {
            let principal = match (&spec.user, &spec.group) {
                // A user or group deleted from the system since may still hold a grant.
                (Some(u), None) => Principal::User(u.clone()),
                (None, Some(g)) => Principal::Group(g.clone()),
                _ => Self::grant_principal(spec)?.0,
            };
            let key_tag = entry
                .map(|e| e.rec.tag.clone())
                .or_else(|| spec.key.clone());
            let found = self
                .grants()
                .iter()
                .find(|g| g.role == spec.role && g.principal == principal && g.key_tag == key_tag)
                .cloned()
                .ok_or_else(|| {
                    EngineError::NotFound(format!(
                        "{principal} has no {} grant on {}",
                        spec.role,
                        entry.map_or("all keys", |e| e.rec.name.as_str())
                    ))
                })?;
            Ok((Mutation::RemoveGrant(found.id), found.clone(), found))
        })
    }

    /// The grants on one key: removed with its purge.
    pub(super) fn grants_on(&self, tag: &str) -> Vec<GrantInfo> {
        self.grants()
            .iter()
            .filter(|g| g.key_tag.as_deref() == Some(tag))
            .cloned()
            .collect()
    }

    /// Drops grants from the in-memory list once their removal is durable.
    pub(super) fn forget_grants(&self, ids: &[u64]) {
        let mut guard = self.grants.write().unwrap_or_else(|e| e.into_inner());
        let mut next = (**guard).clone();
        next.retain(|g| !ids.contains(&g.id));
        *guard = Arc::new(next);
    }

    /// Commits a grant change, then swaps the in-memory list and announces it.
    fn change_grants(
        &self,
        caller: &Caller,
        action: Action,
        mutation: Mutation,
        grant: &GrantInfo,
    ) -> Result<(), EngineError> {
        let now = self.now();
        let mut m = vec![mutation];
        // In the key's history, if it still has one: a grant can outlive its key (revoked
        // by tag), and an entry for no key would never be pruned with it.
        if let Some(tag) = &grant.key_tag
            && self.resolve(tag).is_ok()
        {
            m.push(history_mutation(tag, now, caller, action, None, None));
        }
        if let Err(e) = self.writer.submit(m).wait() {
            // As for a key's change (`Engine::apply`): in force, and a success, once a
            // commit confirms that it landed. Left out of memory, a revoke that landed
            // left its grantee the role until the next start.
            let held = Held::Grant {
                id: grant.id,
                grant: (action == Action::Grant).then(|| grant.clone()),
            };
            if !e.may_have_landed() || self.writer.confirm(Some(held)).is_err() {
                return Err(e.into());
            }
            tracing::warn!(
                grant = grant.id,
                "a grant change answered with an error was stored after all, and is now confirmed"
            );
        }
        let swap = || {
            let mut guard = self.grants.write().unwrap_or_else(|e| e.into_inner());
            let mut next = (**guard).clone();
            next.retain(|g| g.id != grant.id);
            if action == Action::Grant {
                next.push(grant.clone());
                self.last_grant_id.fetch_max(grant.id, Ordering::AcqRel);
            }
            *guard = Arc::new(next);
        };
        let verb = if action == Action::Grant {
            "granted to"
        } else {
            "revoked from"
        };
        let message = format!(
            "{} on {} {verb} {}",
            grant.role,
            grant.key_name.as_deref().unwrap_or("all keys"),
            grant.principal
        );
        // An event is shown to whom the grants it names allow (`Published`): a grant's
        // are those with it, so its grantee sees it; a revoke's those before it, so the
        // account it is taken from learns of it. Either is in force before it is
        // published: a client reacting to a revoke (a dashboard reading its keys again)
        // is answered under the grants without it.
        let seen_by = if action == Action::Grant {
            swap();
            self.grants()
        } else {
            let before = self.grants();
            swap();
            before
        };
        let entry = grant.key_tag.as_deref().and_then(|t| self.resolve(t).ok());
        self.publish_about(
            EventKind::PermissionChanged,
            entry.as_deref(),
            None,
            caller,
            message,
            Some((grant.clone(), seen_by)),
        );
        Ok(())
    }
}

/// The uid of a user's name, or the gid of a group's, as the system resolves it now.
fn principal_id(principal: &Principal) -> Option<u32> {
    match principal {
        Principal::User(u) => uzers::get_user_by_name(u).map(|u| u.uid()),
        Principal::Group(g) => uzers::get_group_by_name(g).map(|g| g.gid()),
    }
}

/// Tests: counts a caller as waiting for the grants gate while it lives.
#[cfg(test)]
struct GateWaiter<'a>(&'a std::sync::atomic::AtomicUsize);

#[cfg(test)]
impl<'a> GateWaiter<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        GateWaiter(count)
    }
}

#[cfg(test)]
impl Drop for GateWaiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
