//! Key slots: one secret per `basic` key, kept outside redb, so that a purge is final
//! (crypto-shredding, SPEC §3 "destroyed beyond recovery").
//!
//! # Why it exists
//!
//! redb writes copy-on-write: a commit that removes a version's wrapped material frees the
//! page that held it and leaves its bytes there until redb happens to reuse the page. On
//! an idle daemon that may be never, so a copy of `kms.redb` taken after a purge, with the
//! root key beside it, still gave the purged material back. Since store schema 3 a key's
//! versions are wrapped under a key of their own, derived from the root key *and* the
//! key's slot secret (`RootKey::key_wrapper`); the slot secret lives here, in a small file
//! overwritten in place, and a purge overwrites it with zeros and syncs it. What stays in
//! redb's freed pages then opens under nothing that still exists.
//!
//! In place means in place on the file systems kmsd is meant for (ext4, xfs): a write over
//! existing blocks goes to those blocks. A copy-on-write file system (btrfs, zfs), a
//! snapshot of the data directory, or an SSD's own remapping may keep the old block: the
//! README says so and points to `hsm` keys where that matters.
//!
//! # Format
//!
//! `kms.redb.keyslots` beside the store (mode 0600). Page 0 is a header (`KMSSLOT1`, then
//! zeros). Then pairs of 4 KiB pages: pair `p` holds slots `64p .. 64p + 63`, its first
//! page copy A of each, its second copy B. A slot is 64 bytes:
//!
//! ```text
//! secret [32] | owner [16] | check [16]
//! owner = SHA-256("kms/slot-owner/1\0" || key tag)[..16]
//! check = SHA-256("kms/slot/1\0" || slot index u64 LE || secret || owner)[..16]
//! ```
//!
//! A free slot is 64 zero bytes. The owner lets a read tell a slot of another key (a slot
//! file that does not belong to this store) from the right one; the check finds damage.
//!
//! # Order of writes
//!
//! Every write goes to copy A of the slots it changes, then `fdatasync`, then to copy B,
//! then `fdatasync`. So at any instant at most one page of a pair is being written, and a
//! write torn by power loss (which can garble the whole page, neighbours included) leaves
//! the other copy of every slot on it intact; the next open repairs the torn one from it.
//!
//! A slot is written and synced before the commit that makes a key refer to it, and wiped
//! after the commit that lets go of it (a purge). A crash between the two leaves a slot
//! no key refers to: opening wipes every such slot whose owner is a key the store knows
//! (live or purged; [`KeySlots::open`]), so nothing outlives a crash either. A slot of a
//! key the store does not know is kept: the slot file may also serve another copy of the
//! store (one moved away while kmsd started on a new one, or the newer file when an older
//! copy was put back by hand), and wiping it would destroy that copy's keys for good. The
//! price: a create whose commit a crash cut short keeps its slot (64 bytes of a key that
//! never existed; nothing was ever encrypted under it).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Length of a slot secret.
pub const SECRET_LEN: usize = 32;
/// A slot secret; zeroized when dropped.
pub type SlotSecret = Zeroizing<[u8; SECRET_LEN]>;

const SLOT_LEN: usize = 64;
const PAGE: u64 = 4096;
const SLOTS_PER_PAGE: u64 = PAGE / SLOT_LEN as u64;
const MAGIC: &[u8; 8] = b"KMSSLOT1";
/// Slots a file may have: 16,777,216 keys not yet purged, a 2 GiB file. A slot number is
/// read from the store and from backups, which a file-system writer could edit: bounded,
/// none can make the offsets overflow or the file grow without end.
pub const MAX_SLOTS: u64 = 1 << 24;
const FREE: [u8; SLOT_LEN] = [0; SLOT_LEN];

/// Overwrites `file` with zeros, synced, if it is a regular file with one name.
fn zero_if_sole_name(file: &File) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Ok(());
    }
    let zeros = vec![0u8; PAGE as usize];
    let mut at = 0;
    while at < meta.len() {
        let n = (meta.len() - at).min(PAGE);
        file.write_all_at(&zeros[..n as usize], at)?;
        at += n;
    }
    file.sync_data()
}

/// The slot file of the store at `store`: `kms.redb.keyslots` beside `kms.redb`.
pub fn path_for(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(".keyslots");
    PathBuf::from(name)
}

/// Why a slot could not be read or written. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("key slot file {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a kms key slot file", .path.display())]
    NotSlotFile { path: PathBuf },
    #[error(
        "the key slot file {} is missing, and {keys} key(s) of the store need it: their \
         material cannot be opened without it (restore it, or the whole data directory, from \
         where it was copied)",
        .path.display()
    )]
    Missing { path: PathBuf, keys: usize },
    #[error(
        "the key slot file {} does not hold the slot secret of {} key(s) (first: key tag \
         {first}, slot {index}): both copies damaged, or the file belongs to another store",
        .path.display(), .count
    )]
    Lost {
        path: PathBuf,
        count: usize,
        first: String,
        index: u64,
    },
    #[error("the random number generator failed while making a slot secret")]
    Rng,
    #[error(
        "key slot {index} is out of range (at most {max} slots){}",
        match .tags { Some((a, b)) => format!(", or given to two keys ({a} and {b})"), None => String::new() }
    )]
    BadSlot {
        index: u64,
        max: u64,
        /// Set when the slot is given to two keys.
        tags: Option<(String, String)>,
    },
    #[error("the key slot file is full ({max} slots): purge keys before creating more")]
    Full { max: u64 },
}

/// The slots `keys` (slot, key tag) refer to, by slot: refuses a slot out of range or given
/// to two keys (a purge of one would wipe the other's secret).
pub fn referenced(
    keys: impl IntoIterator<Item = (u64, String)>,
) -> Result<HashMap<u64, String>, SlotError> {
    let mut out = HashMap::new();
    for (index, tag) in keys {
        if index >= MAX_SLOTS {
            return Err(SlotError::BadSlot {
                index,
                max: MAX_SLOTS,
                tags: None,
            });
        }
        if let Some(other) = out.insert(index, tag.clone()) {
            return Err(SlotError::BadSlot {
                index,
                max: MAX_SLOTS,
                tags: Some((other, tag)),
            });
        }
    }
    Ok(out)
}

/// What opening found and did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SlotSweep {
    /// Slots no key refers to that still held something, now wiped.
    pub wiped: u64,
    /// Copies found damaged and rewritten from the other copy.
    pub repaired: u64,
    /// Slots no key refers to holding the secret of a key the store does not know: kept.
    pub kept: u64,
}

struct State {
    /// Slots the file has room for.
    capacity: u64,
    /// Slots that are zero in both copies and referred to by no key.
    free: BTreeSet<u64>,
    /// Slots whose wipe failed (an I/O error): tried again with every later wipe, before
    /// an expiry ([`KeySlots::retry_wipes`]), and by the next open (their keys' records
    /// are still in the store until the expiry).
    unwiped: BTreeSet<u64>,
}

/// The open slot file.
pub struct KeySlots {
    path: PathBuf,
    file: File,
    /// Allocation and wiping; held by [`KeySlots::pause_wipes`].
    state: Mutex<State>,
    /// Held for every write ([`KeySlots::write_both`]): two writers at once could each be
    /// writing one page of the same pair, and a torn write would then garble both copies
    /// of a neighbour. Taken after `state` when both are held, never the other way round.
    io: Mutex<()>,
    /// Tests: every write fails while set.
    #[cfg(test)]
    fail_writes: std::sync::atomic::AtomicBool,
}

/// While held, no slot is wiped or allocated: a backup reads the slots of the keys its
/// snapshot holds under it, so a purge committed after the snapshot began cannot wipe a
/// slot before the backup has read it.
pub struct WipePause<'a>(#[allow(dead_code)] MutexGuard<'a, State>);

fn owner_of(tag: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"kms/slot-owner/1\0");
    h.update(tag.as_bytes());
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

fn check_of(index: u64, body: &[u8]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"kms/slot/1\0");
    h.update(index.to_le_bytes());
    h.update(body);
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

fn encode(index: u64, tag: &str, secret: &[u8; SECRET_LEN]) -> Zeroizing<[u8; SLOT_LEN]> {
    let mut raw = Zeroizing::new([0u8; SLOT_LEN]);
    raw[..32].copy_from_slice(secret);
    raw[32..48].copy_from_slice(&owner_of(tag));
    let check = check_of(index, &raw[..48]);
    raw[48..].copy_from_slice(&check);
    raw
}

/// What one copy of a slot holds.
#[derive(Debug, PartialEq, Eq)]
enum SlotCopy {
    Free,
    Held { owner: [u8; 16] },
    Damaged,
}

fn decode(index: u64, raw: &[u8]) -> SlotCopy {
    if raw == FREE {
        return SlotCopy::Free;
    }
    if check_of(index, &raw[..48]) != raw[48..64] {
        return SlotCopy::Damaged;
    }
    let mut owner = [0u8; 16];
    owner.copy_from_slice(&raw[32..48]);
    SlotCopy::Held { owner }
}

/// Where copy `copy` (0: A, 1: B) of slot `index` is.
fn offset(index: u64, copy: u64) -> u64 {
    let pair = index / SLOTS_PER_PAGE;
    PAGE * (1 + 2 * pair + copy) + (index % SLOTS_PER_PAGE) * SLOT_LEN as u64
}

fn capacity_of(len: u64) -> u64 {
    len.saturating_sub(PAGE) / (2 * PAGE) * SLOTS_PER_PAGE
}

fn file_len_for(capacity: u64) -> u64 {
    PAGE + capacity.div_ceil(SLOTS_PER_PAGE) * 2 * PAGE
}

impl KeySlots {
    /// Opens (or creates) the slot file of a store whose keys refer to the slots in
    /// `referenced` (slot → key tag) and whose keys, live and purged, have the tags
    /// `known`, and makes it agree with them: a copy found damaged is rewritten from the
    /// other, and every slot no key refers to is wiped if it holds the secret of a key in
    /// `known` (a purge that crashed before its wipe, a create that crashed before its
    /// commit) or no secret at all (both copies damaged); one of a key not in `known` is
    /// kept (see the module's doc). Refuses, changing nothing, when a referenced slot
    /// holds no secret of its key, or when the file is missing and `referenced` is not
    /// empty: creating an empty one would lose those keys.
    pub fn open(
        path: &Path,
        referenced: &HashMap<u64, String>,
        known: &[&str],
    ) -> Result<(KeySlots, SlotSweep), SlotError> {
        if let Some(&index) = referenced.keys().find(|i| **i >= MAX_SLOTS) {
            return Err(SlotError::BadSlot {
                index,
                max: MAX_SLOTS,
                tags: None,
            });
        }
        let io_err = |source| SlotError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !referenced.is_empty() {
                    return Err(SlotError::Missing {
                        path: path.to_path_buf(),
                        keys: referenced.len(),
                    });
                }
                create(path, 0).map_err(io_err)?
            }
            Err(e) => return Err(io_err(e)),
        };
        let len = file.metadata().map_err(io_err)?.len();
        let mut header = [0u8; 8];
        if len < PAGE || file.read_exact_at(&mut header, 0).is_err() || &header != MAGIC {
            return Err(SlotError::NotSlotFile {
                path: path.to_path_buf(),
            });
        }
        let slots = KeySlots {
            path: path.to_path_buf(),
            file,
            state: Mutex::new(State {
                capacity: capacity_of(len).min(MAX_SLOTS),
                free: BTreeSet::new(),
                unwiped: BTreeSet::new(),
            }),
            io: Mutex::new(()),
            #[cfg(test)]
            fail_writes: Default::default(),
        };
        let sweep = slots.sweep(referenced, known)?;
        Ok((slots, sweep))
    }

    fn io_err(&self, source: io::Error) -> SlotError {
        SlotError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sweep(
        &self,
        referenced: &HashMap<u64, String>,
        known: &[&str],
    ) -> Result<SlotSweep, SlotError> {
        let mut state = self.lock();
        let capacity = state.capacity;
        let mut lost: Vec<(u64, &str)> = referenced
            .iter()
            .filter(|(i, _)| **i >= capacity)
            .map(|(i, t)| (*i, t.as_str()))
            .collect();
        // A repair writes only the damaged copy: the good one is never rewritten until
        // the repair is synced (a second power cut mid-repair must not take both).
        let mut repairs: Vec<(u64, u64, Zeroizing<[u8; SLOT_LEN]>)> = Vec::new();
        let mut writes: Vec<(u64, Zeroizing<[u8; SLOT_LEN]>)> = Vec::new();
        let mut sweep = SlotSweep::default();
        let mut free = BTreeSet::new();
        let mut unreferenced: Vec<(u64, [Option<[u8; 16]>; 2])> = Vec::new();
        // One page pair at a time: the whole file of 100,000 keys is 12.5 MiB.
        let mut pair = Zeroizing::new(vec![0u8; 2 * PAGE as usize]);
        for first in (0..capacity).step_by(SLOTS_PER_PAGE as usize) {
            self.file
                .read_exact_at(&mut pair, offset(first, 0))
                .map_err(|e| self.io_err(e))?;
            for index in first..first + SLOTS_PER_PAGE {
                let at = ((index - first) as usize) * SLOT_LEN;
                let a = &pair[at..at + SLOT_LEN];
                let b = &pair[PAGE as usize + at..PAGE as usize + at + SLOT_LEN];
                match referenced.get(&index) {
                    Some(tag) => {
                        let owner = owner_of(tag);
                        let held = |c: &[u8]| decode(index, c) == SlotCopy::Held { owner };
                        let (good, damaged) = match (held(a), held(b)) {
                            (true, true) => continue,
                            (true, false) => (a, 1),
                            (false, true) => (b, 0),
                            (false, false) => {
                                lost.push((index, tag));
                                continue;
                            }
                        };
                        let mut raw = Zeroizing::new([0u8; SLOT_LEN]);
                        raw.copy_from_slice(good);
                        repairs.push((index, damaged, raw));
                        sweep.repaired += 1;
                    }
                    None if a == FREE && b == FREE => {
                        free.insert(index);
                    }
                    None => {
                        let owner = |c: &[u8]| match decode(index, c) {
                            SlotCopy::Held { owner } => Some(owner),
                            SlotCopy::Free | SlotCopy::Damaged => None,
                        };
                        unreferenced.push((index, [owner(a), owner(b)]));
                    }
                }
            }
        }
        // Whose secrets the slots no key refers to hold: hashed only when there are any
        // (a tag's owner is a hash, and a store may know 100,000 tags).
        if !unreferenced.is_empty() {
            let known: HashSet<[u8; 16]> = known.iter().map(|t| owner_of(t)).collect();
            for (index, owners) in unreferenced {
                let held = owners.iter().flatten().collect::<Vec<_>>();
                if held.is_empty() || held.iter().any(|o| known.contains(*o)) {
                    writes.push((index, Zeroizing::new(FREE)));
                    sweep.wiped += 1;
                    free.insert(index);
                } else {
                    sweep.kept += 1;
                }
            }
        }
        if let Some(&(index, first)) = lost.iter().min() {
            return Err(SlotError::Lost {
                path: self.path.clone(),
                count: lost.len(),
                first: first.to_string(),
                index,
            });
        }
        let io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        for copy in 0..2 {
            let mine: Vec<_> = repairs.iter().filter(|(_, c, _)| *c == copy).collect();
            for (index, _, raw) in &mine {
                self.file
                    .write_all_at(raw.as_slice(), offset(*index, copy))
                    .map_err(|e| self.io_err(e))?;
            }
            if !mine.is_empty() {
                self.file.sync_data().map_err(|e| self.io_err(e))?;
            }
        }
        drop(io);
        self.write_both(&writes)?;
        state.free = free;
        Ok(sweep)
    }

    /// Writes slots: every copy A, sync, every copy B, sync (see the module's doc).
    fn write_both(&self, slots: &[(u64, Zeroizing<[u8; SLOT_LEN]>)]) -> Result<(), SlotError> {
        if slots.is_empty() {
            return Ok(());
        }
        let _io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        #[cfg(test)]
        if self.fail_writes.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(self.io_err(io::Error::other("injected")));
        }
        for copy in 0..2 {
            for (index, raw) in slots {
                self.file
                    .write_all_at(raw.as_slice(), offset(*index, copy))
                    .map_err(|e| self.io_err(e))?;
            }
            self.file.sync_data().map_err(|e| self.io_err(e))?;
        }
        Ok(())
    }

    /// Gives each of `tags` a free slot holding a fresh secret, written and synced before
    /// this returns. The caller then commits the keys that refer to them; if that commit
    /// certainly failed, it gives them back with [`KeySlots::wipe`] (if it may have landed,
    /// it keeps them: the next open wipes them if their key is not in the store after all
    /// but known to it, and keeps them if their key never landed).
    pub fn allocate(&self, tags: &[&str]) -> Result<Vec<(u64, SlotSecret)>, SlotError> {
        let (writes, out) = {
            let mut state = self.lock();
            if state.free.len() < tags.len() {
                let needed = (tags.len() - state.free.len()) as u64;
                let capacity = (state.capacity + needed).div_ceil(SLOTS_PER_PAGE) * SLOTS_PER_PAGE;
                if capacity > MAX_SLOTS {
                    return Err(SlotError::Full { max: MAX_SLOTS });
                }
                // The new pages read as zeros: free slots. Synced with the first write to
                // them.
                self.file
                    .set_len(file_len_for(capacity))
                    .map_err(|e| self.io_err(e))?;
                let old = state.capacity;
                state.free.extend(old..capacity);
                state.capacity = capacity;
            }
            let mut out: Vec<(u64, SlotSecret)> = Vec::with_capacity(tags.len());
            let mut writes = Vec::with_capacity(tags.len());
            for tag in tags {
                let Some(index) = state.free.pop_first() else {
                    break;
                };
                let mut secret: SlotSecret = Zeroizing::new([0u8; SECRET_LEN]);
                if getrandom::fill(secret.as_mut_slice()).is_err() {
                    // Nothing written yet: every slot taken here is free again.
                    state.free.insert(index);
                    state.free.extend(out.iter().map(|(i, _)| *i));
                    return Err(SlotError::Rng);
                }
                writes.push((index, encode(index, tag, &secret)));
                out.push((index, secret));
            }
            (writes, out)
        };
        // Written without the state's lock (under the write lock only): these slots are no
        // one else's (out of the free set, and referred to by no key yet, so no backup
        // needs them), and a backup's pause holds up only their choice, not the writes. A
        // failed write leaves them out of the free set, whatever part of them reached the
        // disk; the next open keeps them (their keys were never created: 64 bytes that
        // protect nothing) or wipes them if neither copy holds a whole secret.
        self.write_both(&writes)?;
        Ok(out)
    }

    /// The secret in `index`, which must be `tag`'s.
    pub fn read(&self, index: u64, tag: &str) -> Result<SlotSecret, SlotError> {
        let owner = owner_of(tag);
        let mut raw = Zeroizing::new([0u8; SLOT_LEN]);
        if index >= MAX_SLOTS {
            return Err(SlotError::BadSlot {
                index,
                max: MAX_SLOTS,
                tags: None,
            });
        }
        let mut failed = None;
        for copy in 0..2 {
            if let Err(e) = self
                .file
                .read_exact_at(raw.as_mut_slice(), offset(index, copy))
            {
                failed = Some(e);
                continue;
            }
            if decode(index, raw.as_slice()) == (SlotCopy::Held { owner }) {
                let mut secret: SlotSecret = Zeroizing::new([0u8; SECRET_LEN]);
                secret.copy_from_slice(&raw[..SECRET_LEN]);
                return Ok(secret);
            }
        }
        // A slot past the end reads short: no secret there, not an I/O error.
        if let Some(e) = failed.filter(|e| e.kind() != io::ErrorKind::UnexpectedEof) {
            return Err(self.io_err(e));
        }
        Err(SlotError::Lost {
            path: self.path.clone(),
            count: 1,
            first: tag.to_string(),
            index,
        })
    }

    /// Overwrites `index` with zeros in both copies, synced, and frees it: after a purge
    /// has committed (or a create certainly failed).
    pub fn wipe(&self, index: u64) -> Result<(), SlotError> {
        let mut state = self.lock();
        if index >= state.capacity {
            return Ok(());
        }
        state.unwiped.insert(index);
        self.wipe_unwiped(&mut state)
    }

    /// Tries again the wipes that failed, if any: before a purged key's record goes for
    /// good (its retention ended), since a slot whose owner the store no longer knows is
    /// kept at the next open, not wiped.
    pub fn retry_wipes(&self) -> Result<(), SlotError> {
        let mut state = self.lock();
        if state.unwiped.is_empty() {
            return Ok(());
        }
        self.wipe_unwiped(&mut state)
    }

    fn wipe_unwiped(&self, state: &mut State) -> Result<(), SlotError> {
        let wipes: Vec<_> = state
            .unwiped
            .iter()
            .map(|i| (*i, Zeroizing::new(FREE)))
            .collect();
        self.write_both(&wipes)?;
        let done = std::mem::take(&mut state.unwiped);
        state.free.extend(done);
        Ok(())
    }

    /// Holds off wipes and allocations (see [`WipePause`]).
    pub fn pause_wipes(&self) -> WipePause<'_> {
        WipePause(self.lock())
    }

    /// Writes a new slot file at `path` (which must not exist) holding `slots`
    /// (index, key tag, secret): a restore's. Synced, file and directory entry.
    pub fn write_new(path: &Path, slots: &[(u64, String, SlotSecret)]) -> Result<(), SlotError> {
        let io_err = |source| SlotError::Io {
            path: path.to_path_buf(),
            source,
        };
        let given = slots.iter().map(|(index, tag, _)| (*index, tag.clone()));
        referenced(given)?;
        let capacity = slots.iter().map(|(i, _, _)| i + 1).max().unwrap_or(0);
        let file = create(path, capacity).map_err(io_err)?;
        let written = KeySlots {
            path: path.to_path_buf(),
            file,
            state: Mutex::new(State {
                capacity,
                free: BTreeSet::new(),
                unwiped: BTreeSet::new(),
            }),
            io: Mutex::new(()),
            #[cfg(test)]
            fail_writes: Default::default(),
        };
        let writes: Vec<_> = slots
            .iter()
            .map(|(index, tag, secret)| (*index, encode(*index, tag, secret)))
            .collect();
        written.write_both(&writes)
    }

    /// Removes the slot file at `path` (one never put in place: a restore's staged file)
    /// after overwriting it with zeros, synced: its secrets are as they are, and an
    /// unlinked file's blocks keep them until reused. Absent is done.
    pub fn shred(path: &Path) -> io::Result<()> {
        // Never through a symbolic link, never blocking on a FIFO, and only a file that
        // has no other name: root runs restores in directories other accounts own, and
        // must not zero a file someone linked here. Anything else is only unlinked.
        let zeroed = match OpenOptions::new()
            .write(true)
            .custom_flags(
                rustix::fs::OFlags::NOFOLLOW.bits() as i32
                    | rustix::fs::OFlags::NONBLOCK.bits() as i32,
            )
            .open(path)
        {
            Ok(file) => zero_if_sole_name(&file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(_) => Ok(()),
        };
        // Unlinked even if zeroing failed: the name at least goes.
        let removed = match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        };
        zeroed.and(removed)
    }

    /// Tests elsewhere in the crate: makes every later write fail, or work again.
    #[cfg(test)]
    pub(crate) fn set_writes_fail(&self, fail: bool) {
        self.fail_writes
            .store(fail, std::sync::atomic::Ordering::Relaxed);
    }

    /// Tests elsewhere in the crate: the slot file's path.
    #[cfg(test)]
    pub(crate) fn file_path(&self) -> &Path {
        &self.path
    }

    /// How many slots are free (tests and the scale benchmark).
    pub fn free_slots(&self) -> usize {
        self.lock().free.len()
    }
}

/// Creates a slot file with room for `capacity` slots: written and synced under a
/// temporary name, then renamed into place and the directory synced, so a crash leaves no
/// file or a whole one (a file cut short before its header was durable would be refused at
/// every start).
fn create(path: &Path, capacity: u64) -> io::Result<File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".new");
    let tmp = PathBuf::from(name);
    let _ = std::fs::remove_file(&tmp);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let mut header = vec![0u8; PAGE as usize];
    header[..MAGIC.len()].copy_from_slice(MAGIC);
    let written = file
        .write_all_at(&header, 0)
        .and_then(|()| file.set_len(file_len_for(capacity)))
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(file)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn refs(pairs: &[(u64, &str)]) -> HashMap<u64, String> {
        pairs.iter().map(|(i, t)| (*i, t.to_string())).collect()
    }

    /// A new slot file at `path` holding slots of `tags`, closed: what each got.
    fn closed_file_with(path: &Path, tags: &[&str]) -> Vec<(u64, SlotSecret)> {
        let (slots, _) = KeySlots::open(path, &HashMap::new(), &[]).unwrap();
        slots.allocate(tags).unwrap()
    }

    #[test]
    fn allocate_read_wipe_and_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.redb.keyslots");
        let (slots, sweep) = KeySlots::open(&path, &HashMap::new(), &[]).unwrap();
        assert_eq!(sweep, SlotSweep::default());
        let tags: Vec<String> = (0..70).map(|i| format!("tag{i}")).collect();
        let refs_: Vec<&str> = tags.iter().map(String::as_str).collect();
        let got = slots.allocate(&refs_).unwrap();
        assert_eq!(got.len(), 70);
        // Two page pairs: 128 slots, 58 still free.
        assert_eq!(slots.free_slots(), 58);
        for ((index, secret), tag) in got.iter().zip(&tags) {
            assert_eq!(*slots.read(*index, tag).unwrap(), **secret);
            // Another key's tag does not read it.
            assert!(matches!(
                slots.read(*index, "someone-else"),
                Err(SlotError::Lost { .. })
            ));
        }
        let (index, secret) = &got[3];
        slots.wipe(*index).unwrap();
        assert!(slots.read(*index, &tags[3]).is_err());
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(SECRET_LEN).any(|w| w == secret.as_slice()),
            "the wiped secret is still in the file"
        );
        // The lowest free slot is reused.
        let again = slots.allocate(&["new"]).unwrap();
        assert_eq!(again[0].0, *index);
        assert_ne!(*again[0].1, **secret);
    }

    #[test]
    fn open_wipes_unreferenced_slots_and_keeps_referenced_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let got = closed_file_with(&path, &["a", "b", "c"]);
        // Only "b" refers to its slot; "a" is a key the store knows (purged, or a create
        // cut short), "c" one it does not (a key of another copy of the store).
        let (slots, sweep) = KeySlots::open(&path, &refs(&[(got[1].0, "b")]), &["a", "b"]).unwrap();
        assert_eq!((sweep.wiped, sweep.kept), (1, 1));
        assert_eq!(*slots.read(got[1].0, "b").unwrap(), *got[1].1);
        let bytes = std::fs::read(&path).unwrap();
        let in_file =
            |secret: &SlotSecret| bytes.windows(SECRET_LEN).any(|w| w == secret.as_slice());
        assert!(!in_file(&got[0].1), "the known key's slot was not wiped");
        assert!(in_file(&got[2].1), "the unknown key's slot was wiped");
        // The kept slot is not handed out again.
        assert_eq!(slots.free_slots(), 62);
        drop(slots);
        // The copy of the store it belongs to opens with it (and keeps "b"'s in turn).
        let (slots, sweep) = KeySlots::open(&path, &refs(&[(got[2].0, "c")]), &["c"]).unwrap();
        assert_eq!((sweep.wiped, sweep.kept), (0, 1));
        assert_eq!(*slots.read(got[2].0, "c").unwrap(), *got[2].1);
    }

    /// A wipe that failed is tried again by `retry_wipes` (an expiry calls it before the
    /// purged key's record goes) and by the next wipe; the slot is not handed out before.
    #[test]
    fn a_failed_wipe_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let (slots, _) = KeySlots::open(&path, &HashMap::new(), &[]).unwrap();
        let got = slots.allocate(&["a"]).unwrap();
        let free = slots.free_slots();
        slots
            .fail_writes
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(slots.wipe(got[0].0).is_err());
        assert!(slots.retry_wipes().is_err());
        assert_eq!(slots.free_slots(), free);
        slots
            .fail_writes
            .store(false, std::sync::atomic::Ordering::Relaxed);
        slots.retry_wipes().unwrap();
        assert_eq!(slots.free_slots(), free + 1);
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(SECRET_LEN).any(|w| w == got[0].1.as_slice()));
        // Nothing left to do.
        slots
            .fail_writes
            .store(true, std::sync::atomic::Ordering::Relaxed);
        slots.retry_wipes().unwrap();
    }

    /// While a backup's pause is held, a purge's wipe waits (the backup still reads the
    /// slot it needs) and no slot is handed out; both go ahead once the pause ends.
    #[test]
    fn wipes_and_allocations_wait_for_a_pause() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let (slots, _) = KeySlots::open(&path, &HashMap::new(), &[]).unwrap();
        let got = slots.allocate(&["a"]).unwrap();
        let free = slots.free_slots();
        let pause = slots.pause_wipes();
        std::thread::scope(|s| {
            let wipe = s.spawn(|| slots.wipe(got[0].0));
            let allocate = s.spawn(|| slots.allocate(&["b"]));
            // Not a timing assertion: without the pause both finish in microseconds; with
            // it they cannot finish however long this waits.
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert!(!wipe.is_finished(), "a wipe went ahead during the pause");
            assert!(
                !allocate.is_finished(),
                "a slot was handed out during the pause"
            );
            assert_eq!(*slots.read(got[0].0, "a").unwrap(), *got[0].1);
            drop(pause);
            wipe.join().unwrap().unwrap();
            allocate.join().unwrap().unwrap();
        });
        assert!(slots.read(got[0].0, "a").is_err());
        assert_eq!(slots.free_slots(), free);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever a few bytes written over the slot file (torn pages, bad sectors) do,
        /// opening it never panics, and either refuses, changing nothing, or serves every
        /// referenced key exactly its own secret, with the secrets of the known keys no
        /// one refers to gone, and a second open has nothing left to mend.
        #[test]
        fn damage_is_repaired_or_refused(
            keys in 1usize..40,
            referenced_mask in proptest::prelude::any::<u64>(),
            damage in proptest::collection::vec((0.0f64..1.0, proptest::prelude::any::<u8>(), 1usize..200), 0..6),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("s");
            let tags: Vec<String> = (0..keys).map(|i| format!("tag{i}")).collect();
            let all: Vec<&str> = tags.iter().map(String::as_str).collect();
            let got = closed_file_with(&path, &all);
            let refs_: HashMap<u64, String> = got
                .iter()
                .zip(&tags)
                .enumerate()
                .filter(|(i, _)| referenced_mask & (1 << (i % 64)) != 0)
                .map(|(_, ((index, _), tag))| (*index, tag.clone()))
                .collect();
            let file = OpenOptions::new().write(true).open(&path).unwrap();
            let len = file.metadata().unwrap().len();
            for (at, byte, run) in &damage {
                let at = ((*at * len as f64) as u64).min(len - 1);
                let run = (*run as u64).min(len - at) as usize;
                file.write_all_at(&vec![*byte; run], at).unwrap();
            }
            drop(file);
            let before = std::fs::read(&path).unwrap();
            match KeySlots::open(&path, &refs_, &all) {
                Err(e) => {
                    proptest::prop_assert!(
                        matches!(e, SlotError::Lost { .. } | SlotError::NotSlotFile { .. }),
                        "{e}"
                    );
                    proptest::prop_assert_eq!(std::fs::read(&path).unwrap(), before);
                }
                Ok((slots, _)) => {
                    for ((index, secret), tag) in got.iter().zip(&tags) {
                        if refs_.contains_key(index) {
                            proptest::prop_assert_eq!(*slots.read(*index, tag).unwrap(), **secret);
                        }
                    }
                    drop(slots);
                    let bytes = std::fs::read(&path).unwrap();
                    for (index, secret) in &got {
                        if !refs_.contains_key(index) {
                            proptest::prop_assert!(
                                !bytes.windows(SECRET_LEN).any(|w| w == secret.as_slice()),
                                "slot {} of a known key no one refers to kept its secret", index
                            );
                        }
                    }
                    let (_, sweep) = KeySlots::open(&path, &refs_, &all).unwrap();
                    proptest::prop_assert_eq!(sweep, SlotSweep::default());
                }
            }
        }
    }

    #[test]
    fn a_shredded_file_is_gone_and_was_zeroed_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let _ = closed_file_with(&path, &["a"]);
        // An open descriptor shows what the blocks held when the name went.
        let mut held = File::open(&path).unwrap();
        KeySlots::shred(&path).unwrap();
        assert!(!path.exists());
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut held, &mut bytes).unwrap();
        assert!(!bytes.is_empty() && bytes.iter().all(|b| *b == 0));
        KeySlots::shred(&path).unwrap();
    }

    /// A file with a second name (a link someone put in the staged file's place), a
    /// symbolic link or a FIFO is only unlinked: what it names is not written, and a
    /// FIFO does not block.
    #[test]
    fn shred_unlinks_but_never_writes_through_a_link_or_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let precious = dir.path().join("precious");
        std::fs::write(&precious, b"someone else's file").unwrap();
        let path = dir.path().join("s");
        std::fs::hard_link(&precious, &path).unwrap();
        KeySlots::shred(&path).unwrap();
        assert!(!path.exists());
        std::os::unix::fs::symlink(&precious, &path).unwrap();
        KeySlots::shred(&path).unwrap();
        assert!(std::fs::symlink_metadata(&path).is_err());
        assert_eq!(std::fs::read(&precious).unwrap(), b"someone else's file");
        crate::test_support::make_fifo(&path);
        KeySlots::shred(&path).unwrap();
        assert!(std::fs::symlink_metadata(&path).is_err());
    }

    /// A slot no copy of which holds a secret (both damaged, or one damaged and one free:
    /// an allocation torn by a power cut) is wiped whoever referred to it.
    #[test]
    fn an_unreferenced_slot_with_no_good_copy_is_wiped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let got = closed_file_with(&path, &["a", "b"]);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[7; SLOT_LEN], offset(got[0].0, 0))
            .unwrap();
        file.write_all_at(&[8; SLOT_LEN], offset(got[0].0, 1))
            .unwrap();
        file.write_all_at(&[9; SLOT_LEN], offset(got[1].0, 0))
            .unwrap();
        file.write_all_at(&FREE, offset(got[1].0, 1)).unwrap();
        let (slots, sweep) = KeySlots::open(&path, &HashMap::new(), &[]).unwrap();
        assert_eq!((sweep.wiped, sweep.kept), (2, 0));
        assert_eq!(slots.free_slots(), 64);
    }

    #[test]
    fn a_torn_page_is_repaired_from_the_other_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let got = closed_file_with(&path, &["a", "b"]);
        // Garble copy A's whole page (a torn write of a neighbour), then copy B of "b".
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0x5a; PAGE as usize], offset(0, 0))
            .unwrap();
        file.write_all_at(&[1; SLOT_LEN], offset(got[1].0, 1))
            .unwrap();
        let referenced = refs(&[(got[0].0, "a"), (got[1].0, "b")]);
        // "b" has no good copy left: refused, and nothing is changed.
        let before = std::fs::read(&path).unwrap();
        let err = KeySlots::open(&path, &referenced, &[]).err().unwrap();
        assert!(matches!(err, SlotError::Lost { count: 1, .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // Without "b": "a" is repaired from copy B, the rest of the page wiped to zeros.
        let (slots, sweep) = KeySlots::open(&path, &refs(&[(got[0].0, "a")]), &[]).unwrap();
        assert_eq!(sweep.repaired, 1);
        assert_eq!(*slots.read(got[0].0, "a").unwrap(), *got[0].1);
        let mut a = [0u8; SLOT_LEN];
        slots
            .file
            .read_exact_at(&mut a, offset(got[0].0, 0))
            .unwrap();
        let mut b = [0u8; SLOT_LEN];
        slots
            .file
            .read_exact_at(&mut b, offset(got[0].0, 1))
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn a_missing_or_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let err = KeySlots::open(&path, &refs(&[(0, "a")]), &[])
            .err()
            .unwrap();
        assert!(matches!(err, SlotError::Missing { keys: 1, .. }), "{err}");
        assert!(!path.exists());
        std::fs::write(&path, vec![7u8; 3 * PAGE as usize]).unwrap();
        let err = KeySlots::open(&path, &HashMap::new(), &[]).err().unwrap();
        assert!(matches!(err, SlotError::NotSlotFile { .. }), "{err}");
    }

    #[test]
    fn a_slot_out_of_range_or_given_twice_is_refused() {
        let twice = referenced([(3, "a".to_string()), (3, "b".to_string())]);
        assert!(
            matches!(
                &twice,
                Err(SlotError::BadSlot {
                    index: 3,
                    tags: Some(_),
                    ..
                })
            ),
            "{twice:?}"
        );
        let far = referenced([(MAX_SLOTS, "a".to_string())]);
        assert!(matches!(far, Err(SlotError::BadSlot { tags: None, .. })));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let secret: SlotSecret = Zeroizing::new([9u8; SECRET_LEN]);
        assert!(KeySlots::write_new(&path, &[(u64::MAX, "x".into(), secret)]).is_err());
        assert!(!path.exists());
        let (slots, _) = KeySlots::open(&path, &HashMap::new(), &[]).unwrap();
        assert!(matches!(
            slots.read(u64::MAX, "x"),
            Err(SlotError::BadSlot { .. })
        ));
    }

    #[test]
    fn a_new_file_holds_what_it_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let secret: SlotSecret = Zeroizing::new([9u8; SECRET_LEN]);
        KeySlots::write_new(&path, &[(130, "x".to_string(), secret.clone())]).unwrap();
        let (slots, sweep) = KeySlots::open(&path, &refs(&[(130, "x")]), &[]).unwrap();
        assert_eq!(sweep, SlotSweep::default());
        assert_eq!(*slots.read(130, "x").unwrap(), *secret);
        assert_eq!(slots.free_slots(), 191);
    }
}
