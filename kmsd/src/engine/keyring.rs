//! The in-memory keyring: every key's metadata, its versions with lazily unwrapped and
//! cached material, its counters, and the due index mirrored from the store.
//!
//! Entries are immutable behind `Arc`s: a change builds a new entry and swaps it in.
//! Counters and the material cache are shared between an entry and its successors, so a
//! swap loses no count and unwraps nothing twice.

use super::schedule::DueEntry;
use crate::crypto::KeyMaterial;
use crate::store::Snapshot;
use crate::store::records::{DueKind, KeyRecord, UsageRecord, VersionRecord};
use kms_shared::model::{KeyInfo, KeyState, UnixMillis, VersionInfo, is_tag};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Usage of a key, shared by all generations of its entry.
#[derive(Debug, Default)]
pub struct UsageCell {
    count: AtomicU64,
    last: Mutex<(Option<UnixMillis>, Option<String>)>,
}

impl UsageCell {
    fn from_record(r: UsageRecord) -> Self {
        UsageCell {
            count: AtomicU64::new(r.count),
            last: Mutex::new((r.last_used_at, r.last_used_by)),
        }
    }

    /// Counts `n` durable successful calls.
    pub fn record(&self, at: UnixMillis, account: String, n: u64) {
        self.count.fetch_add(n, Ordering::Relaxed);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.0.is_none_or(|t| t <= at) {
            *last = (Some(at), Some(account));
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn last_used_at(&self) -> Option<UnixMillis> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn last_used_by(&self) -> Option<String> {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }
}

/// One version of a key.
pub struct VersionEntry {
    pub version: u32,
    pub record: VersionRecord,
    /// The unwrapped material, filled on first use and shared with later generations.
    pub material: Arc<OnceLock<Arc<KeyMaterial>>>,
    /// Encryptions made with this version (nonce budget), shared likewise.
    pub encryptions: Arc<AtomicU64>,
}

impl VersionEntry {
    pub fn new(version: u32, record: VersionRecord) -> Self {
        VersionEntry {
            version,
            record,
            material: Arc::default(),
            encryptions: Arc::default(),
        }
    }

    /// The same version with another record (flag change, purge), sharing caches.
    pub fn with_record(&self, record: VersionRecord) -> Self {
        let material = if record.wrapped.is_some() {
            self.material.clone()
        } else {
            // Purged: drop the cache so the material is zeroized once the last reader
            // of the old entry lets go.
            Arc::default()
        };
        VersionEntry {
            version: self.version,
            record,
            material,
            encryptions: self.encryptions.clone(),
        }
    }

    pub fn info(&self) -> VersionInfo {
        VersionInfo {
            version: self.version,
            enabled: self.record.enabled,
            created_at: self.record.created_at,
            encryptions: self.encryptions.load(Ordering::Relaxed),
        }
    }
}

/// One key: metadata, versions (index = version - 1), usage.
pub struct KeyEntry {
    pub rec: KeyRecord,
    pub versions: Vec<Arc<VersionEntry>>,
    pub usage: Arc<UsageCell>,
}

impl KeyEntry {
    pub fn version(&self, v: u32) -> Option<&Arc<VersionEntry>> {
        v.checked_sub(1).and_then(|i| self.versions.get(i as usize))
    }

    pub fn current(&self) -> Option<&Arc<VersionEntry>> {
        self.version(self.rec.current_version)
    }

    pub fn info(&self) -> KeyInfo {
        let r = &self.rec;
        KeyInfo {
            name: r.name.clone(),
            tag: r.tag.clone(),
            key_type: r.key_type,
            protection: r.protection,
            hsm: r.hsm.clone(),
            state: r.state,
            convergent: r.convergent,
            current_version: r.current_version,
            auto_rotation: r.auto_rotation,
            rotation_days: r.rotation_days,
            next_rotation_at: r.next_rotation_at(),
            usage_count: self.usage.count(),
            last_used_at: self.usage.last_used_at(),
            last_used_by: self.usage.last_used_by(),
            created_at: r.created_at,
            deletion_due_at: r.deletion_due_at,
            deleted_at: r.deleted_at,
            memo: r.memo.clone(),
        }
    }

    pub fn version_infos(&self) -> Vec<VersionInfo> {
        self.versions.iter().map(|v| v.info()).collect()
    }
}

/// All keys, by tag and by name, and the due index.
#[derive(Default)]
pub struct Keyring {
    pub by_tag: HashMap<String, Arc<KeyEntry>>,
    /// Names of keys not purged, ordered (the list order).
    pub by_name: BTreeMap<String, String>,
    /// Purged keys still within retention, by (name, tag).
    pub deleted: BTreeSet<(String, String)>,
    pub due: BTreeSet<DueEntry>,
}

impl Keyring {
    pub fn from_snapshot(s: Snapshot) -> Keyring {
        let mut versions: HashMap<String, Vec<Arc<VersionEntry>>> =
            HashMap::with_capacity(s.version_groups.len());
        let mut rows = s.versions.into_iter();
        for (tag, n) in s.version_groups {
            let entries = rows
                .by_ref()
                .take(n)
                .map(|(v, rec)| Arc::new(VersionEntry::new(v, rec)))
                .collect();
            versions.insert(tag, entries);
        }
        for (tag, v, n) in s.encryptions {
            if let Some(e) = versions
                .get(&tag)
                .and_then(|vs| vs.iter().find(|e| e.version == v))
            {
                e.encryptions.store(n, Ordering::Relaxed);
            }
        }
        let mut usage: HashMap<String, UsageRecord> = s.usage.into_iter().collect();
        let mut ring = Keyring::default();
        for rec in s.keys {
            let mut vs = versions.remove(&rec.tag).unwrap_or_default();
            vs.sort_by_key(|v| v.version);
            let u = usage.remove(&rec.tag).unwrap_or_default();
            let entry = KeyEntry {
                versions: vs,
                usage: Arc::new(UsageCell::from_record(u)),
                rec,
            };
            ring.put(Arc::new(entry));
        }
        ring.due = s.due.into_iter().collect();
        ring
    }

    pub fn resolve(&self, key: &str) -> Option<Arc<KeyEntry>> {
        let tag = if is_tag(key) {
            key
        } else {
            self.by_name.get(key)?.as_str()
        };
        self.by_tag.get(tag).cloned()
    }

    /// Inserts or replaces an entry, keeping the name indexes right.
    pub fn put(&mut self, entry: Arc<KeyEntry>) {
        let rec = &entry.rec;
        if let Some(old) = self.by_tag.get(&rec.tag)
            && old.rec.name != rec.name
        {
            self.by_name.remove(&old.rec.name);
        }
        if rec.state == KeyState::Deleted {
            if self.by_name.get(&rec.name) == Some(&rec.tag) {
                self.by_name.remove(&rec.name);
            }
            self.deleted.insert((rec.name.clone(), rec.tag.clone()));
        } else {
            self.by_name.insert(rec.name.clone(), rec.tag.clone());
        }
        self.by_tag.insert(rec.tag.clone(), entry);
    }

    /// Forgets a key entirely (end of retention).
    pub fn remove(&mut self, tag: &str) {
        if let Some(old) = self.by_tag.remove(tag) {
            self.deleted
                .remove(&(old.rec.name.clone(), tag.to_string()));
            if self.by_name.get(&old.rec.name).is_some_and(|t| t == tag) {
                self.by_name.remove(&old.rec.name);
            }
        }
        self.due.retain(|(_, t, _)| t != tag);
    }

    /// A page of keys ordered by name: live keys, or with `deleted` the purged ones too.
    pub fn list(&self, deleted: bool, offset: usize, limit: usize) -> (Vec<KeyInfo>, u64) {
        let live = self.by_name.values();
        let purged = self.deleted.iter().map(|(_, t)| t);
        let total = self.by_name.len() + if deleted { self.deleted.len() } else { 0 };
        let tags: Box<dyn Iterator<Item = &String>> = if deleted {
            Box::new(live.chain(purged))
        } else {
            Box::new(live)
        };
        let page = tags
            .skip(offset)
            .take(limit)
            .filter_map(|t| self.by_tag.get(t))
            .map(|e| e.info())
            .collect();
        (page, total as u64)
    }

    /// Moves the due entries of `tag` from `old` to `new` (both derived from records).
    pub fn replace_due(
        &mut self,
        tag: &str,
        old: &[(UnixMillis, DueKind)],
        new: &[(UnixMillis, DueKind)],
    ) {
        for (at, kind) in old {
            self.due.remove(&(*at, tag.to_string(), *kind));
        }
        for (at, kind) in new {
            self.due.insert((*at, tag.to_string(), *kind));
        }
    }
}
