//! A store at scale for `kms-bench --scale`: N AES keys with V versions each and one
//! history entry per version (its create or rotation), written through the store's own
//! writer with the engine's record formats, as N keys' lifetimes would have left it.
//! Going through the daemon instead would take hours of durable commits to set up.

use kms_shared::model::{Action, DAY_MS, KeyState, KeyType, Protection, UnixMillis};
use kmsd::crypto::{KeyMaterial, RootKey, random_tag};
use kmsd::engine::{wrap_aad, wrap_aad_schema1};
use kmsd::store::key_slots::{self, KeySlots, SlotSecret};
use kmsd::store::records::{DueKind, HistoryRecord, KeyRecord, VersionRecord};
use kmsd::store::{Mutation, SCHEMA_VERSION, Store};
use std::path::Path;

/// Keys written per transaction.
const KEYS_PER_COMMIT: usize = 1000;

/// The name of key `i` of a populated store.
pub fn key_name(i: usize) -> String {
    format!("scale-{i:07}")
}

/// Creates `data_dir` (root key and store) holding `keys` keys of `versions` versions, as
/// a kmsd of store schema `schema` would have left it (1: material wrapped under the root
/// key without its key's type; 2: under the root key alone; both upgraded by the next
/// start; 3: today's, under each key's slot).
pub fn populate(data_dir: &Path, keys: usize, versions: u32, schema: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        matches!(schema, 1..=3),
        "kms-bench writes stores of schema 1, 2 or 3"
    );
    std::fs::create_dir_all(data_dir)?;
    let (root, _) = RootKey::load_or_create(data_dir, None)?;
    let store = Store::open(&data_dir.join("kms.redb"), &root.fingerprint())?;
    // Marked first: a populate cut short leaves a store that reads as what it holds.
    if schema < SCHEMA_VERSION {
        store.mark_schema(schema)?;
    }
    let slots = match schema {
        3 => Some(
            KeySlots::open(
                &key_slots::path_for(store.path()),
                &std::collections::HashMap::new(),
                &[],
            )?
            .0,
        ),
        _ => None,
    };
    let writer = store.start_writer()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as UnixMillis;
    let mut in_flight = std::collections::VecDeque::new();
    let mut i = 0;
    while i < keys {
        let end = (i + KEYS_PER_COMMIT).min(keys);
        let mut m = Vec::with_capacity((end - i) * (2 * versions as usize + 2));
        let tags = (i..end)
            .map(|_| random_tag())
            .collect::<Result<Vec<_>, _>>()?;
        // Written before the commit that refers to them, as the daemon does.
        let given = match &slots {
            Some(slots) => {
                let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
                slots.allocate(&refs)?.into_iter().map(Some).collect()
            }
            None => vec![None; tags.len()],
        };
        for ((k, tag), slot) in (i..end).zip(tags).zip(given) {
            // Every other key rotates automatically, so the scheduler has a due index of
            // keys/2 entries to keep (none due for a year).
            key_mutations(
                &root,
                &mut m,
                tag,
                slot,
                &key_name(k),
                versions,
                now,
                k % 2 == 0,
                schema,
            )?;
        }
        in_flight.push_back(writer.submit(m));
        // A few transactions queued keep the writer busy while the next is built.
        if in_flight.len() > 4
            && let Some(t) = in_flight.pop_front()
        {
            t.wait().map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        i = end;
    }
    for t in in_flight {
        t.wait().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    writer.shutdown();
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn key_mutations(
    root: &RootKey,
    m: &mut Vec<Mutation>,
    tag: String,
    slot: Option<(u64, SlotSecret)>,
    name: &str,
    versions: u32,
    now: UnixMillis,
    auto_rotation: bool,
    schema: u64,
) -> anyhow::Result<()> {
    let rotation_days = kms_shared::model::DEFAULT_ROTATION_DAYS;
    if auto_rotation {
        m.push(Mutation::AddDue {
            at: now + i64::from(rotation_days) * DAY_MS,
            tag: tag.clone(),
            kind: DueKind::Rotation,
        });
    }
    for v in 1..=versions {
        let material = KeyMaterial::generate(KeyType::Aes256)?;
        let aad = match schema {
            1 => wrap_aad_schema1(&tag, v),
            _ => wrap_aad(&tag, v, KeyType::Aes256),
        };
        let wrapped = match &slot {
            Some((_, secret)) => root
                .key_wrapper(secret, &tag)
                .wrap(&aad, &material.to_secret_bytes())?,
            None => root.wrap(&aad, &material.to_secret_bytes())?,
        };
        m.push(Mutation::PutVersion {
            tag: tag.clone(),
            version: v,
            record: VersionRecord {
                created_at: now,
                enabled: true,
                wrapped: Some(wrapped),
            },
        });
        m.push(Mutation::History {
            tag: tag.clone(),
            record: HistoryRecord {
                time: now,
                action: if v == 1 {
                    Action::Create
                } else {
                    Action::Rotate
                },
                version: Some(v),
                result: "ok".into(),
                account: "kms-bench".into(),
                uid: 0,
                pid: std::process::id(),
                client: "kms-bench".into(),
                items: 1,
                failed: 0,
            },
        });
    }
    m.push(Mutation::PutName {
        name: name.into(),
        tag: tag.clone(),
    });
    m.push(Mutation::PutKey(KeyRecord {
        tag,
        name: name.into(),
        key_type: KeyType::Aes256,
        protection: Protection::Basic,
        hsm: None,
        state: KeyState::Enabled,
        convergent: false,
        current_version: versions,
        auto_rotation,
        rotation_days,
        rotation_anchor: auto_rotation.then_some(now),
        rotation_stopped: false,
        token_objects_left: false,
        slot: slot.map(|(i, _)| i),
        created_at: now,
        deletion_due_at: None,
        deleted_at: None,
        memo: String::new(),
    }));
    Ok(())
}
