//! The in-memory keyring: every key's metadata and counters, the due index mirrored from
//! the store, and the versions of the keys used since start (read from the store on a
//! key's first use, their material unwrapped on a version's first use, both then kept).
//!
//! Entries are immutable behind `Arc`s: a change builds a new entry and swaps it in.
//! Counters, the loaded versions and the material cache are shared between an entry and
//! its successors, so a swap loses no count, reads nothing twice and, while the key stays
//! usable, unwraps nothing twice (a key that is disabled or pending deletion lets go of
//! its material: [`VersionsCell::without_material`]).

use super::schedule::DueEntry;
use crate::crypto::KeyMaterial;
use crate::store::records::{DueKind, KeyRecord, UsageRecord, VersionRecord};
use crate::store::{Snapshot, StoredVersion};
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

    /// A version as read from the store, with its encryption count.
    pub fn from_stored(s: StoredVersion) -> Self {
        let e = VersionEntry::new(s.version, s.record);
        e.encryptions.store(s.encryptions, Ordering::Relaxed);
        e
    }

    /// The same version with another record (flag change, purge), sharing caches.
    pub fn with_record(&self, record: VersionRecord) -> Self {
        let material = if record.wrapped.is_some() && record.enabled {
            self.material.clone()
        } else {
            // Purged or disabled: drop the cache so the material is zeroized once the
            // last reader of the old entry lets go (a re-enabled version unwraps again).
            Arc::default()
        };
        VersionEntry {
            version: self.version,
            record,
            material,
            encryptions: self.encryptions.clone(),
        }
    }

    /// The same version without its unwrapped material (see
    /// [`VersionsCell::without_material`]).
    fn without_material(&self) -> Self {
        VersionEntry {
            version: self.version,
            record: self.record.clone(),
            material: Arc::default(),
            encryptions: self.encryptions.clone(),
        }
    }

    /// Whether the unwrapped material is cached.
    pub fn has_material(&self) -> bool {
        self.material.get().is_some()
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

/// A key's versions (index = version - 1), empty until first read from the store.
///
/// Why loading once per cell is safe against concurrent changes: a change that touches
/// versions runs under the key's lock and loads the cell of the entry it replaces before
/// committing, and its successor gets a new, already loaded cell; changes that leave the
/// versions alone pass the same cell on (or, for a key left unusable, a loaded copy
/// without material that shares the counters: [`VersionsCell::without_material`]). So a
/// cell is never first loaded after a commit that changed its versions, and every
/// generation shares its counters.
///
/// Why a first load never misses encryption counts still in the call journal (not yet in
/// redb): a call counts encryptions only after its key's cell was loaded, and unloaded
/// cells are made only at start-up, after opening the store folded the journal in.
#[derive(Default)]
pub struct VersionsCell(OnceLock<Vec<Arc<VersionEntry>>>);

impl VersionsCell {
    pub fn loaded(versions: Vec<Arc<VersionEntry>>) -> Self {
        VersionsCell(OnceLock::from(versions))
    }

    /// The versions, reading them with `load` if this cell has not been loaded yet (if two
    /// threads race, both read the same committed rows and the first to finish wins).
    pub fn get_or_load<E>(
        &self,
        load: impl FnOnce() -> Result<Vec<Arc<VersionEntry>>, E>,
    ) -> Result<&[Arc<VersionEntry>], E> {
        if let Some(v) = self.0.get() {
            return Ok(v);
        }
        let loaded = load()?;
        Ok(self.0.get_or_init(|| loaded))
    }

    /// The versions, if this cell has been loaded.
    pub fn get(&self) -> Option<&[Arc<VersionEntry>]> {
        self.0.get().map(Vec::as_slice)
    }

    /// For a key that can no longer be used (disabled, pending deletion): the same
    /// versions, loaded and sharing their counters, without the unwrapped material, which
    /// is zeroized once the last call holding the old entry lets go; the key's next use
    /// after it is enabled again unwraps again. An unloaded cell holds no material and is
    /// passed on as it is (a call that resolved the key just before the change can still
    /// load it and cache material there: a call racing a lifecycle change, docs/RELIABILITY.md).
    pub fn without_material(self: &Arc<Self>) -> Arc<VersionsCell> {
        match self.0.get() {
            None => self.clone(),
            Some(versions) => Arc::new(VersionsCell::loaded(
                versions
                    .iter()
                    .map(|v| Arc::new(v.without_material()))
                    .collect(),
            )),
        }
    }
}

/// Version `v` in a key's versions.
pub fn find_version(versions: &[Arc<VersionEntry>], v: u32) -> Option<&Arc<VersionEntry>> {
    let at = v.checked_sub(1)? as usize;
    match versions.get(at) {
        Some(e) if e.version == v => Some(e),
        // Not dense (never written so, but a store is read, not trusted): search.
        _ => versions.iter().find(|e| e.version == v),
    }
}

/// One key: metadata, versions, usage.
pub struct KeyEntry {
    pub rec: KeyRecord,
    pub versions: Arc<VersionsCell>,
    pub usage: Arc<UsageCell>,
}

impl KeyEntry {
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
    /// The keyring of a store's snapshot. The due index is derived from the key records
    /// (with this run's retention), not taken from the stored one: an expiry stored under
    /// another retention setting, or a row left behind, would otherwise be retried every
    /// second for ever. [`Engine::open`](super::Engine::open) then makes the stored index
    /// match.
    ///
    /// Two live keys can carry one name only after a create was answered with an error
    /// although it had landed, and was then made again (docs/RELIABILITY.md): the name
    /// stays with the key `name_holder` (the store's `names` table) gives it, the one its
    /// caller was told of. The other stays reachable by its tag.
    pub fn from_snapshot<E>(
        s: Snapshot,
        retention_ms: i64,
        name_holder: impl Fn(&str) -> Result<Option<String>, E>,
    ) -> Result<Keyring, E> {
        let mut usage: HashMap<String, UsageRecord> = s.usage.into_iter().collect();
        let mut ring = Keyring::default();
        let mut shared_names = BTreeSet::new();
        for rec in s.keys {
            if rec.state != KeyState::Deleted
                && ring.by_name.get(&rec.name).is_some_and(|t| *t != rec.tag)
            {
                shared_names.insert(rec.name.clone());
            }
            for (at, kind) in super::schedule::due_entries(&rec, retention_ms) {
                ring.due.insert((at, rec.tag.clone(), kind));
            }
            let u = usage.remove(&rec.tag).unwrap_or_default();
            let entry = KeyEntry {
                versions: Arc::default(),
                usage: Arc::new(UsageCell::from_record(u)),
                rec,
            };
            ring.put(Arc::new(entry));
        }
        for name in shared_names {
            let (Some(current), Some(tag)) = (ring.by_name.get(&name), name_holder(&name)?) else {
                continue;
            };
            let named = ring
                .by_tag
                .get(&tag)
                .is_some_and(|e| e.rec.name == name && e.rec.state != KeyState::Deleted);
            let holder = if named { tag } else { current.clone() };
            tracing::warn!(
                name = %name,
                tag = %holder,
                "two keys carry this name; it stays with this one (the names table's), the \
                 other is reachable by its tag"
            );
            ring.by_name.insert(name, holder);
        }
        Ok(ring)
    }

    pub fn resolve(&self, key: &str) -> Option<Arc<KeyEntry>> {
        let tag = if is_tag(key) {
            key
        } else {
            self.by_name.get(key)?.as_str()
        };
        self.by_tag.get(tag).cloned()
    }

    /// Inserts or replaces an entry, keeping the name indexes right. A name another live
    /// key holds stays with it: two keys carry one name only after a create that landed
    /// despite its error was made again (see [`Keyring::from_snapshot`]), and a change to
    /// the key without the name must not take it back.
    pub fn put(&mut self, entry: Arc<KeyEntry>) {
        let rec = &entry.rec;
        if let Some(old) = self.by_tag.get(&rec.tag)
            && old.rec.name != rec.name
            && self.by_name.get(&old.rec.name) == Some(&rec.tag)
        {
            self.by_name.remove(&old.rec.name);
        }
        if rec.state == KeyState::Deleted {
            if self.by_name.get(&rec.name) == Some(&rec.tag) {
                self.by_name.remove(&rec.name);
            }
            self.deleted.insert((rec.name.clone(), rec.tag.clone()));
        } else if self
            .by_name
            .get(&rec.name)
            .is_none_or(|holder| *holder == rec.tag)
        {
            self.by_name.insert(rec.name.clone(), rec.tag.clone());
        }
        self.by_tag.insert(rec.tag.clone(), entry);
    }

    /// Forgets a key entirely (end of retention), with its entries `due` in the due index
    /// (what `due_entries` derives from its record: the index holds nothing else of it),
    /// so that an expiry does not walk the whole index under the keyring's lock.
    pub fn remove(&mut self, tag: &str, due: &[(UnixMillis, DueKind)]) {
        if let Some(old) = self.by_tag.remove(tag) {
            self.deleted
                .remove(&(old.rec.name.clone(), tag.to_string()));
            if self.by_name.get(&old.rec.name).is_some_and(|t| t == tag) {
                self.by_name.remove(&old.rec.name);
            }
        }
        self.replace_due(tag, due, &[]);
    }

    /// A page of keys ordered by name: live keys, or with `deleted` the purged ones too.
    /// Entries, not their infos: a long page's infos are built after the keyring's lock is
    /// released, so that a change waiting for it does not hold up every reader meanwhile.
    pub fn list(&self, deleted: bool, offset: usize, limit: usize) -> (Vec<Arc<KeyEntry>>, u64) {
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
            .cloned()
            .collect();
        (page, total as u64)
    }

    /// A page of the live keys among `tags`, ordered by name like [`Keyring::list`], and
    /// how many there are. Costs the size of `tags`, not of the keyring: what a caller
    /// with grants on a few keys lists.
    pub fn list_of(
        &self,
        tags: &BTreeSet<String>,
        offset: usize,
        limit: usize,
    ) -> (Vec<Arc<KeyEntry>>, u64) {
        let mut live: Vec<&Arc<KeyEntry>> = tags
            .iter()
            .filter_map(|t| self.by_tag.get(t))
            .filter(|e| self.by_name.get(&e.rec.name) == Some(&e.rec.tag))
            .collect();
        live.sort_unstable_by(|a, b| a.rec.name.cmp(&b.rec.name));
        let total = live.len() as u64;
        let page = live.into_iter().skip(offset).take(limit).cloned().collect();
        (page, total)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(enabled: bool, wrapped: bool) -> VersionRecord {
        VersionRecord {
            created_at: 0,
            enabled,
            wrapped: wrapped.then(|| vec![1, 2, 3]),
        }
    }

    /// A flag change keeps the unwrapped material (and the encryption count) shared; a
    /// disabled or purged version lets go of it, so it is zeroized once no call holds it.
    #[test]
    fn material_is_kept_only_while_usable() {
        let v = VersionEntry::new(1, record(true, true));
        let aes = crate::crypto::AesKey::generate().unwrap();
        assert!(v.material.set(Arc::new(KeyMaterial::Aes(aes))).is_ok());
        v.encryptions.store(7, Ordering::Relaxed);

        let same = v.with_record(record(true, true));
        assert!(same.material.get().is_some());
        assert!(Arc::ptr_eq(&same.material, &v.material));
        let disabled = v.with_record(record(false, true));
        assert!(disabled.material.get().is_none());
        assert_eq!(disabled.encryptions.load(Ordering::Relaxed), 7);
        assert!(v.with_record(record(true, false)).material.get().is_none());
    }

    /// A key that can no longer be used keeps its versions and their counters, not their
    /// material; a cell never loaded has none and is passed on.
    #[test]
    fn without_material_keeps_versions_and_counters() {
        let v = VersionEntry::new(1, record(true, true));
        let aes = crate::crypto::AesKey::generate().unwrap();
        assert!(v.material.set(Arc::new(KeyMaterial::Aes(aes))).is_ok());
        let cell = Arc::new(VersionsCell::loaded(vec![Arc::new(v)]));
        let without = cell.without_material();
        let (old, new) = (&cell.get().unwrap()[0], &without.get().unwrap()[0]);
        assert!(old.has_material() && !new.has_material());
        assert_eq!(new.record, old.record);
        new.encryptions.fetch_add(3, Ordering::Relaxed);
        assert_eq!(old.encryptions.load(Ordering::Relaxed), 3, "shared");
        let unloaded = Arc::new(VersionsCell::default());
        assert!(Arc::ptr_eq(&unloaded.without_material(), &unloaded));
    }
}
