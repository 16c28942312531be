//! Who may do what (SPEC §6). Identity is the kernel's (the connection's peer
//! credentials, taken at accept); roles come from grants in the store. Root and the
//! daemon's own account are managers of everything.
//!
//! Pure functions: the service asks [`requirement`] what a request needs and
//! [`permits`] whether the caller's grants give it.

use crate::engine::Caller;
use kms_shared::model::{Action, GrantInfo, NO_PRINCIPAL_ID, Principal, Role};
use kms_shared::protocol::Request;

/// What a request needs, from least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing beyond a connection (handshake, status, subscribe: events are filtered).
    Connected,
    /// See a key: any role on it.
    View,
    /// History and usage of a key.
    Review,
    /// Cryptographic use of a key.
    Use,
    /// Lifecycle and settings of a key.
    Manage,
    /// Create keys, delete now, permissions, purged keys, backups.
    Admin,
}

impl Need {
    /// The roles that satisfy this need (in the order a refusal names them).
    pub fn roles(self) -> &'static [Role] {
        match self {
            Need::Connected => &[],
            Need::View => &[
                Role::Manager,
                Role::KeyManager,
                Role::KeyReviewer,
                Role::KeyUser,
            ],
            Need::Review => &[Role::Manager, Role::KeyManager, Role::KeyReviewer],
            Need::Use => &[Role::Manager, Role::KeyUser],
            Need::Manage => &[Role::Manager, Role::KeyManager],
            Need::Admin => &[Role::Manager],
        }
    }
}

/// What a request needs, the key it names (tag or name: mutable, so that the service can
/// pin it to the tag it authorized), and the history action.
pub fn requirement(req: &mut Request) -> (Need, Option<&mut String>, Option<Action>) {
    use Request as R;
    fn k(key: &mut String) -> Option<&mut String> {
        Some(key)
    }
    match req {
        R::Hello { .. } | R::Status | R::Subscribe => (Need::Connected, None, None),
        R::ListKeys { deleted: true, .. } => (Need::Admin, None, None),
        R::ListKeys { deleted: false, .. } => (Need::Connected, None, None),
        R::GetKey { key } => (Need::View, k(key), Some(Action::Show)),
        R::ListVersions { key } => (Need::View, k(key), Some(Action::Versions)),
        R::History(q) => (Need::Review, k(&mut q.key), Some(Action::History)),
        R::Impact { key, .. } => (Need::Review, k(key), Some(Action::Impact)),
        R::Encrypt { key, .. } | R::EncryptBatch { key, .. } => {
            (Need::Use, k(key), Some(Action::Encrypt))
        }
        R::Decrypt { key, .. } | R::DecryptBatch { key, .. } => {
            (Need::Use, k(key), Some(Action::Decrypt))
        }
        R::Reencrypt { key, .. } | R::ReencryptBatch { key, .. } => {
            (Need::Use, k(key), Some(Action::Reencrypt))
        }
        R::Sign { key, .. } => (Need::Use, k(key), Some(Action::Sign)),
        R::Verify { key, .. } => (Need::Use, k(key), Some(Action::Verify)),
        R::PublicKey { key, .. } => (Need::Use, k(key), Some(Action::PublicKey)),
        R::DataKey { key, .. } => (Need::Use, k(key), Some(Action::DataKey)),
        R::Rotate { key } => (Need::Manage, k(key), Some(Action::Rotate)),
        R::Enable { key } => (Need::Manage, k(key), Some(Action::Enable)),
        R::Disable { key } => (Need::Manage, k(key), Some(Action::Disable)),
        R::EnableVersion { key, .. } => (Need::Manage, k(key), Some(Action::EnableVersion)),
        R::DisableVersion { key, .. } => (Need::Manage, k(key), Some(Action::DisableVersion)),
        R::SetRotation { key, .. } => (Need::Manage, k(key), Some(Action::SetRotation)),
        R::SetMemo { key, .. } => (Need::Manage, k(key), Some(Action::SetMemo)),
        R::RequestDeletion { key } => (Need::Manage, k(key), Some(Action::Delete)),
        R::CancelDeletion { key } => (Need::Manage, k(key), Some(Action::CancelDeletion)),
        R::DeleteNow { key } => (Need::Admin, k(key), Some(Action::DeleteNow)),
        R::CreateKey(_) | R::ListGrants => (Need::Admin, None, None),
        R::Grant(g) => (Need::Admin, g.key.as_mut(), Some(Action::Grant)),
        R::Revoke(g) => (Need::Admin, g.key.as_mut(), Some(Action::Revoke)),
        R::Backup | R::BackupRead { .. } => (Need::Admin, None, None),
        R::HsmAdd { .. } | R::HsmList | R::HsmRemove { .. } => (Need::Admin, None, None),
    }
}

/// Whether the caller is a manager of everything by identity (root, the daemon's uid).
pub fn is_superuser(caller: &Caller, daemon_uid: u32) -> bool {
    caller.uid == 0 || caller.uid == daemon_uid
}

/// Whether a grant is the caller's: its name, and the uid or gid that name had when the
/// grant was made (a name given to another account since does not carry the grant).
fn applies_to(g: &GrantInfo, caller: &Caller) -> bool {
    let same_id = |id: u32| match g.principal_id {
        None => true,
        Some(NO_PRINCIPAL_ID) => false,
        Some(granted) => granted == id,
    };
    match &g.principal {
        Principal::User(u) => *u == caller.account && same_id(caller.uid),
        Principal::Group(name) => caller
            .groups
            .iter()
            .any(|(group, gid)| group == name && same_id(*gid)),
    }
}

/// Whether the grant is the caller's own (see [`applies_to`]).
pub fn is_grantee(g: &GrantInfo, caller: &Caller) -> bool {
    applies_to(g, caller)
}

/// Whether `grants` give the caller `need` on the key with this tag (or, with `None`,
/// on all keys).
pub fn permits(grants: &[GrantInfo], caller: &Caller, need: Need, key_tag: Option<&str>) -> bool {
    if need == Need::Connected {
        return true;
    }
    let roles = need.roles();
    grants.iter().any(|g| {
        roles.contains(&g.role)
            && applies_to(g, caller)
            && (g.key_tag.is_none() || (key_tag.is_some() && g.key_tag.as_deref() == key_tag))
    })
}

/// The tags of the keys `grants` give the caller `need` on one by one (grants on all keys
/// are not in it: ask [`permits`] with `None` for those).
pub fn granted_tags(
    grants: &[GrantInfo],
    caller: &Caller,
    need: Need,
) -> std::collections::BTreeSet<String> {
    let roles = need.roles();
    grants
        .iter()
        .filter(|g| roles.contains(&g.role) && applies_to(g, caller))
        .filter_map(|g| g.key_tag.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(account: &str, groups: &[&str]) -> Caller {
        Caller {
            uid: 2000,
            gid: 2000,
            pid: 1,
            account: account.into(),
            groups: groups.iter().map(|s| (s.to_string(), 3000)).collect(),
            client: "t".into(),
        }
    }

    fn grant(role: Role, p: Principal, key: Option<&str>) -> GrantInfo {
        GrantInfo {
            id: 1,
            role,
            principal: p,
            key_tag: key.map(str::to_string),
            key_name: None,
            granted_at: 0,
            granted_by: "root".into(),
            principal_id: None,
        }
    }

    /// Each role gives exactly the needs of the SPEC §6 table.
    #[test]
    fn role_table() {
        let c = caller("ann", &[]);
        let cases = [
            (Role::Manager, [true, true, true, true, true]),
            (Role::KeyManager, [true, true, false, true, false]),
            (Role::KeyReviewer, [true, true, false, false, false]),
            (Role::KeyUser, [true, false, true, false, false]),
        ];
        for (role, expect) in cases {
            let g = [grant(role, Principal::User("ann".into()), None)];
            let got = [
                Need::View,
                Need::Review,
                Need::Use,
                Need::Manage,
                Need::Admin,
            ]
            .map(|n| permits(&g, &c, n, Some("t1")));
            assert_eq!(got, expect, "{role}");
        }
    }

    /// A key-scoped grant covers that key only; a group grant covers its members only.
    #[test]
    fn scope_and_groups() {
        let g = [grant(
            Role::KeyUser,
            Principal::Group("apps".into()),
            Some("t1"),
        )];
        assert!(permits(
            &g,
            &caller("bob", &["apps"]),
            Need::Use,
            Some("t1")
        ));
        assert!(!permits(
            &g,
            &caller("bob", &["apps"]),
            Need::Use,
            Some("t2")
        ));
        assert!(!permits(&g, &caller("bob", &["apps"]), Need::Use, None));
        assert!(!permits(
            &g,
            &caller("eve", &["other"]),
            Need::Use,
            Some("t1")
        ));
    }

    /// The tags a caller's grants name one by one, for the roles that give `need`: its
    /// user and group grants, not other principals', not grants on all keys.
    #[test]
    fn granted_tags_of_a_caller() {
        let me = caller("alice", &["ops"]);
        let grants = vec![
            grant(
                Role::KeyReviewer,
                Principal::User("alice".into()),
                Some("t1"),
            ),
            grant(Role::KeyUser, Principal::Group("ops".into()), Some("t2")),
            grant(Role::KeyReviewer, Principal::User("bob".into()), Some("t3")),
            grant(
                Role::KeyReviewer,
                Principal::Group("other".into()),
                Some("t4"),
            ),
            grant(Role::KeyReviewer, Principal::User("alice".into()), None),
        ];
        let tags = granted_tags(&grants, &me, Need::View);
        assert_eq!(tags.into_iter().collect::<Vec<_>>(), vec!["t1", "t2"]);
        assert!(granted_tags(&grants, &me, Need::Admin).is_empty());
    }

    /// The key `requirement` returns is the request's own field: writing a tag through it
    /// changes the key the request runs on (what the service does once authorized).
    #[test]
    fn requirement_key_is_the_requests_field() {
        use kms_shared::protocol::{GrantSpec, HistoryQuery};
        let mut requests = vec![
            Request::GetKey { key: "name".into() },
            Request::Sign {
                key: "name".into(),
                message: b"m".to_vec(),
                scheme: Default::default(),
            },
            Request::History(HistoryQuery {
                key: "name".into(),
                ..Default::default()
            }),
            Request::DeleteNow { key: "name".into() },
            Request::Grant(GrantSpec {
                role: Role::KeyUser,
                user: Some("bob".into()),
                group: None,
                key: Some("name".into()),
            }),
        ];
        for r in &mut requests {
            let (_, key, _) = requirement(r);
            *key.expect("each of these requests names a key") = "t".repeat(32);
            assert!(format!("{r:?}").contains(&"t".repeat(32)), "{r:?}");
            assert!(!format!("{r:?}").contains("\"name\""), "{r:?}");
        }
    }

    /// A grant is its principal's by name and by the uid or gid the name had when it was
    /// granted: an account that takes the name later (its uid differs) has none of it; a
    /// grant from before ids were recorded goes by name. It used to go by name alone.
    #[test]
    fn grants_follow_the_id_the_name_had() {
        let bound = |p: Principal, id: Option<u32>| GrantInfo {
            principal_id: id,
            ..grant(Role::KeyUser, p, None)
        };
        let alice = caller("alice", &["ops"]);
        let alice_user = |id| bound(Principal::User("alice".into()), id);
        let ops = |id| bound(Principal::Group("ops".into()), id);
        for (g, applies) in [
            (alice_user(Some(2000)), true),
            (alice_user(Some(2001)), false),
            (alice_user(None), true),
            (alice_user(Some(NO_PRINCIPAL_ID)), false),
            (ops(Some(3000)), true),
            (ops(Some(3001)), false),
            (ops(None), true),
            (ops(Some(NO_PRINCIPAL_ID)), false),
        ] {
            assert_eq!(
                permits(std::slice::from_ref(&g), &alice, Need::Use, None),
                applies,
                "{g:?}"
            );
        }
    }
}
