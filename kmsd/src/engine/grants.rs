//! Grants: roles given to users and groups, for all keys or one key (SPEC §6). Kept in
//! the store's grants table and mirrored in memory for the per-request check.

use super::{Caller, Engine, EngineError, history_mutation};
use crate::store::Mutation;
use kms_shared::model::{Action, GrantInfo, KeyState, Principal};
use kms_shared::protocol::{EventKind, GrantSpec};
use std::sync::Arc;

impl Engine {
    /// The current grants (cheap: a shared snapshot).
    pub fn grants(&self) -> Arc<Vec<GrantInfo>> {
        self.grants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Validates a spec into (principal, key tag, key name).
    fn grant_target(
        &self,
        spec: &GrantSpec,
    ) -> Result<(Principal, Option<String>, Option<String>), EngineError> {
        let principal = match (&spec.user, &spec.group) {
            (Some(u), None) => {
                if uzers::get_user_by_name(u).is_none() {
                    return Err(EngineError::InvalidArgument(format!("no user named {u:?}")));
                }
                Principal::User(u.clone())
            }
            (None, Some(g)) => {
                if uzers::get_group_by_name(g).is_none() {
                    return Err(EngineError::InvalidArgument(format!(
                        "no group named {g:?}"
                    )));
                }
                Principal::Group(g.clone())
            }
            _ => {
                return Err(EngineError::InvalidArgument(
                    "a grant names exactly one of a user or a group".into(),
                ));
            }
        };
        let (tag, name) = match &spec.key {
            Some(k) => {
                let e = self.resolve(k)?;
                if e.rec.state == KeyState::Deleted {
                    return Err(EngineError::InvalidState(format!(
                        "key {} is deleted",
                        e.rec.name
                    )));
                }
                (Some(e.rec.tag.clone()), Some(e.rec.name.clone()))
            }
            None => (None, None),
        };
        Ok((principal, tag, name))
    }

    /// Grants a role; a duplicate is `already-exists`.
    pub fn grant(&self, caller: &Caller, spec: &GrantSpec) -> Result<GrantInfo, EngineError> {
        let _serial = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        let (principal, key_tag, key_name) = self.grant_target(spec)?;
        let current = self.grants();
        if current
            .iter()
            .any(|g| g.role == spec.role && g.principal == principal && g.key_tag == key_tag)
        {
            return Err(EngineError::AlreadyExists(format!(
                "{principal} already has {} on {}",
                spec.role,
                key_name.as_deref().unwrap_or("all keys")
            )));
        }
        let grant = GrantInfo {
            id: current.iter().map(|g| g.id).max().unwrap_or(0) + 1,
            role: spec.role,
            principal,
            key_tag,
            key_name,
            granted_at: self.now(),
            granted_by: caller.account.clone(),
        };
        self.change_grants(
            caller,
            Action::Grant,
            Mutation::PutGrant(grant.clone()),
            &grant,
            |v| v.push(grant.clone()),
        )?;
        Ok(grant)
    }

    /// Removes the grant with the same role, principal and key.
    pub fn revoke(&self, caller: &Caller, spec: &GrantSpec) -> Result<GrantInfo, EngineError> {
        let _serial = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        let (principal, key_tag, key_name) = self.grant_target(spec)?;
        let found = self
            .grants()
            .iter()
            .find(|g| g.role == spec.role && g.principal == principal && g.key_tag == key_tag)
            .cloned()
            .ok_or_else(|| {
                EngineError::NotFound(format!(
                    "{principal} has no {} grant on {}",
                    spec.role,
                    key_name.as_deref().unwrap_or("all keys")
                ))
            })?;
        let id = found.id;
        self.change_grants(
            caller,
            Action::Revoke,
            Mutation::RemoveGrant(id),
            &found,
            |v| v.retain(|g| g.id != id),
        )?;
        Ok(found)
    }

    /// Commits a grant change, then swaps the in-memory list and announces it.
    fn change_grants(
        &self,
        caller: &Caller,
        action: Action,
        mutation: Mutation,
        grant: &GrantInfo,
        edit: impl FnOnce(&mut Vec<GrantInfo>),
    ) -> Result<(), EngineError> {
        let now = self.now();
        let mut m = vec![mutation];
        if let Some(tag) = &grant.key_tag {
            m.push(history_mutation(tag, now, caller, action, None, None));
        }
        self.writer.submit(m).wait()?;
        {
            let mut guard = self.grants.write().unwrap_or_else(|e| e.into_inner());
            let mut next = (**guard).clone();
            edit(&mut next);
            *guard = Arc::new(next);
        }
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
        match grant.key_tag.as_deref().and_then(|t| self.resolve(t).ok()) {
            Some(entry) => {
                self.publish(EventKind::PermissionChanged, &entry, None, caller, message)
            }
            None => self.publish_global(EventKind::PermissionChanged, caller, message),
        }
        Ok(())
    }
}
