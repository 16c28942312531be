//! Fixed, made-up data for the snapshot tests and the frame-time benchmark: no clock,
//! no randomness, so every run draws the same screens.

#[cfg(test)]
use kms_shared::model::{
    AccountUse, Action as HistoryAction, GrantInfo, HOUR_MS, HistoryEntry, Impact, Principal, Role,
    VersionInfo,
};
use kms_shared::model::{DAY_MS, KeyInfo, KeyState, KeyType, Protection};
#[cfg(test)]
use kms_shared::protocol::HsmTokenInfo;

/// 2025-03-01T00:00:00Z.
pub const BASE: i64 = 1_740_787_200_000;

/// A tag that looks real and is the same on every run (splitmix64 of the index).
pub fn tag(i: u64) -> String {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    format!("{:016x}{:016x}", mix(i), mix(i ^ 0xdead_beef))
}

fn key(i: u64, name: &str, key_type: KeyType, state: KeyState) -> KeyInfo {
    KeyInfo {
        name: name.into(),
        tag: tag(i),
        key_type,
        protection: Protection::Basic,
        hsm: None,
        state,
        convergent: false,
        current_version: 1,
        auto_rotation: false,
        rotation_days: 90,
        next_rotation_at: None,
        usage_count: 0,
        last_used_at: None,
        last_used_by: None,
        created_at: BASE - 100 * DAY_MS,
        deletion_due_at: None,
        deleted_at: None,
        memo: String::new(),
    }
}

#[cfg(test)]
/// Eight keys covering every type, protection and live state.
pub fn keys() -> Vec<KeyInfo> {
    let mut v = Vec::new();

    let mut k = key(1, "payments", KeyType::Aes256, KeyState::Enabled);
    k.current_version = 3;
    k.auto_rotation = true;
    k.next_rotation_at = Some(BASE + 40 * DAY_MS);
    k.usage_count = 12_840;
    k.last_used_at = Some(BASE - 2 * HOUR_MS);
    k.last_used_by = Some("billing".into());
    k.created_at = BASE - 230 * DAY_MS;
    k.memo = "card tokens (PCI)".into();
    v.push(k);

    let mut k = key(2, "jwt-signing", KeyType::Ecdsa, KeyState::Enabled);
    k.usage_count = 53_211;
    k.last_used_at = Some(BASE - 5 * 60_000);
    k.last_used_by = Some("auth".into());
    k.memo = "ES256 tokens of the API gateway".into();
    v.push(k);

    let mut k = key(3, "backup-rsa", KeyType::Rsa2048, KeyState::Enabled);
    k.protection = Protection::Hsm;
    k.current_version = 2;
    k.auto_rotation = true;
    k.rotation_days = 180;
    k.next_rotation_at = Some(BASE + 120 * DAY_MS);
    k.usage_count = 87;
    k.last_used_at = Some(BASE - DAY_MS);
    k.last_used_by = Some("root".into());
    k.memo = "nightly backup wrap".into();
    v.push(k);

    let mut k = key(4, "legacy-db", KeyType::Aes256, KeyState::Disabled);
    k.current_version = 5;
    k.usage_count = 1_000_000;
    k.last_used_at = Some(BASE - 45 * DAY_MS);
    k.last_used_by = Some("dbadmin".into());
    k.created_at = BASE - 700 * DAY_MS;
    v.push(k);

    let mut k = key(5, "old-archive", KeyType::Aes256, KeyState::PendingDeletion);
    k.usage_count = 4;
    k.last_used_at = Some(BASE - 90 * DAY_MS);
    k.last_used_by = Some("alice".into());
    k.deletion_due_at = Some(BASE + 3 * DAY_MS);
    k.memo = "2019 archive, replaced".into();
    v.push(k);

    let mut k = key(6, "partner-sso", KeyType::Rsa2048, KeyState::Enabled);
    k.protection = Protection::DedicatedHsm;
    k.hsm = Some("vault-a".into());
    k.auto_rotation = true;
    k.rotation_days = 30;
    k.next_rotation_at = Some(BASE + 12 * DAY_MS);
    k.usage_count = 310;
    k.last_used_at = Some(BASE - 3 * HOUR_MS);
    k.last_used_by = Some("sso".into());
    v.push(k);

    let mut k = key(7, "tokens-conv", KeyType::Aes256, KeyState::Enabled);
    k.convergent = true;
    k.current_version = 2;
    k.usage_count = 7;
    k.last_used_at = Some(BASE - 6 * DAY_MS);
    k.last_used_by = Some("search".into());
    k.memo = "searchable e-mail addresses".into();
    v.push(k);

    let mut k = key(8, "ci-artifacts", KeyType::Ecdsa, KeyState::Enabled);
    k.current_version = 4;
    k.auto_rotation = true;
    k.rotation_days = 365;
    k.next_rotation_at = Some(BASE + 200 * DAY_MS);
    k.usage_count = 2_345;
    k.last_used_at = Some(BASE - 30 * 60_000);
    k.last_used_by = Some("ci".into());
    k.memo = "release signing".into();
    v.push(k);

    v
}

/// `n` keys for the 100,000-key benchmark.
pub fn many(n: usize) -> Vec<KeyInfo> {
    let types = KeyType::ALL;
    let states = [
        KeyState::Enabled,
        KeyState::Enabled,
        KeyState::Disabled,
        KeyState::PendingDeletion,
    ];
    (0..n)
        .map(|i| {
            let mut k = key(
                i as u64,
                &format!("key-{i:06}"),
                types[i % 3],
                states[i % 4],
            );
            k.usage_count = (i as u64).wrapping_mul(7919) % 1_000_000;
            k.last_used_at = Some(BASE - (i as i64 % 90) * DAY_MS);
            k.memo = format!("bulk key number {i}");
            if k.state == KeyState::PendingDeletion {
                k.deletion_due_at = Some(BASE + DAY_MS);
            }
            k
        })
        .collect()
}

#[cfg(test)]
pub fn versions() -> Vec<VersionInfo> {
    vec![
        VersionInfo {
            version: 1,
            enabled: false,
            created_at: BASE - 230 * DAY_MS,
            encryptions: 9_100,
        },
        VersionInfo {
            version: 2,
            enabled: true,
            created_at: BASE - 140 * DAY_MS,
            encryptions: 3_500,
        },
        VersionInfo {
            version: 3,
            enabled: true,
            created_at: BASE - 50 * DAY_MS,
            encryptions: 240,
        },
    ]
}

#[cfg(test)]
/// `n` entries, newest first, with sequence numbers counting down from `top_seq`.
pub fn history(top_seq: u64, n: usize) -> Vec<HistoryEntry> {
    let actions = [
        (HistoryAction::Encrypt, "ok", "billing", "billing-svc"),
        (HistoryAction::Decrypt, "ok", "billing", "billing-svc"),
        (HistoryAction::Rotate, "ok", "alice", "kms-tui"),
        (HistoryAction::Decrypt, "decrypt-failed", "bob", "python3"),
        (HistoryAction::Disable, "permission-denied", "bob", "kmsctl"),
        (HistoryAction::SetRotation, "ok", "alice", "kmsctl"),
        (HistoryAction::AutoRotate, "ok", "kmsd", "kmsd"),
    ];
    (0..n)
        .map(|i| {
            let (action, result, account, client) = actions[i % actions.len()];
            HistoryEntry {
                seq: top_seq - i as u64,
                time: BASE - (i as i64) * 17 * 60_000 - 3_000,
                key_tag: tag(1),
                action,
                version: Some(3 - (i as u32 / 3) % 3),
                result: result.into(),
                account: account.into(),
                uid: 1000 + (i as u32 % 3),
                pid: 4000 + i as u32,
                client: client.into(),
                items: 1,
                failed: u32::from(result != "ok"),
            }
        })
        .collect()
}

/// The versions of `tag` loaded, as the daemon task reports them.
#[cfg(test)]
pub fn versions_loaded(tag: String) -> super::action::Action {
    super::action::Action::VersionsLoaded {
        tag,
        result: Ok(versions()),
    }
}

/// The impact of `tag` loaded, as the daemon task reports it.
#[cfg(test)]
pub fn impact_loaded(tag: String) -> super::action::Action {
    super::action::Action::ImpactLoaded {
        tag,
        result: Ok(impact()),
    }
}

#[cfg(test)]
pub fn impact() -> Impact {
    Impact {
        key_tag: tag(1),
        since: BASE - 30 * DAY_MS,
        recent_uses: 1_523,
        last_used_at: Some(BASE - 2 * HOUR_MS),
        accounts: vec![
            AccountUse {
                account: "billing".into(),
                uses: 1_400,
                last_used_at: BASE - 2 * HOUR_MS,
            },
            AccountUse {
                account: "alice".into(),
                uses: 120,
                last_used_at: BASE - 3 * DAY_MS,
            },
            AccountUse {
                account: "ci".into(),
                uses: 3,
                last_used_at: BASE - 20 * DAY_MS,
            },
        ],
        counted_back_to: None,
    }
}

#[cfg(test)]
/// Five grants: roles for users and groups, on all keys and on one key (payments is
/// key 1, partner-sso key 6).
pub fn grants() -> Vec<GrantInfo> {
    let grant =
        |id: u64, role, principal, key: Option<(u64, &str)>, days: i64, by: &str| GrantInfo {
            id,
            role,
            principal,
            key_tag: key.map(|(i, _)| tag(i)),
            key_name: key.map(|(_, n)| n.to_string()),
            granted_at: BASE - days * DAY_MS + 9 * HOUR_MS,
            granted_by: by.into(),
            principal_id: Some(2000 + id as u32),
        };
    vec![
        grant(
            1,
            Role::Manager,
            Principal::Group("kms-admins".into()),
            None,
            300,
            "root",
        ),
        grant(
            2,
            Role::KeyUser,
            Principal::User("billing".into()),
            Some((1, "payments")),
            230,
            "alice",
        ),
        grant(
            3,
            Role::KeyReviewer,
            Principal::Group("auditors".into()),
            None,
            120,
            "alice",
        ),
        grant(
            4,
            Role::KeyManager,
            Principal::User("alice".into()),
            Some((6, "partner-sso")),
            90,
            "root",
        ),
        grant(
            5,
            Role::KeyUser,
            Principal::User("sso".into()),
            Some((6, "partner-sso")),
            30,
            "alice",
        ),
    ]
}

#[cfg(test)]
/// Two registered tokens; partner-sso lives on vault-a.
pub fn tokens() -> Vec<HsmTokenInfo> {
    vec![
        HsmTokenInfo {
            name: "vault-a".into(),
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token: "tenant-a".into(),
            pin_file: "/etc/kms/hsm/vault-a.pin".into(),
            added_at: BASE - 60 * DAY_MS + 14 * HOUR_MS,
            added_by: "root".into(),
            keys: 1,
        },
        HsmTokenInfo {
            name: "vault-b".into(),
            module: "/opt/safenet/lunaclient/lib/libCryptoki2_64.so".into(),
            token: "payments-hsm".into(),
            pin_file: "/etc/kms/hsm/vault-b.pin".into(),
            added_at: BASE - 5 * DAY_MS + 10 * HOUR_MS,
            added_by: "alice".into(),
            keys: 0,
        },
    ]
}
