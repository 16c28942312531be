//! Power loss at the storage layer (SPEC §9), the way redb's own crash tests simulate it:
//! the engine runs on a redb `StorageBackend` that records every write, length change
//! and `sync_data`. A power loss after the k-th sync leaves on "disk" exactly what the
//! first k syncs made durable; everything written since is lost (or, in the harsher
//! variant, an arbitrary subset of it reached the disk anyway). For every cut point the
//! store must reopen, pass redb's integrity check, and show exactly the state of the last
//! acknowledged operation, or of the one whose commit was under way, never anything
//! older, newer or in between; and every ciphertext acknowledged by then must decrypt.

#![allow(clippy::unwrap_used)]

use kms_shared::model::{KeyState, KeyType, Protection, Role};
use kms_shared::protocol::{CreateKey, GrantSpec};
use kmsd::clock::ManualClock;
use kmsd::crypto::RootKey;
use kmsd::engine::{Caller, Engine, EngineConfig};
use kmsd::store::Store;
use redb::StorageBackend;
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
enum Op {
    Write { offset: usize, data: Vec<u8> },
    SetLen(usize),
    Sync,
}

#[derive(Debug, Default)]
struct DiskState {
    live: Vec<u8>,
    /// Every change, in order, with the syncs between them.
    log: Vec<Op>,
    syncs: u64,
}

/// An in-memory disk that records what happens to it. Clones share the disk.
#[derive(Debug, Clone, Default)]
struct Disk(Arc<Mutex<DiskState>>);

impl Disk {
    fn with_image(image: Vec<u8>) -> Disk {
        Disk(Arc::new(Mutex::new(DiskState {
            live: image,
            ..DiskState::default()
        })))
    }

    fn syncs(&self) -> u64 {
        self.0.lock().unwrap().syncs
    }

    fn log(&self) -> Vec<Op> {
        self.0.lock().unwrap().log.clone()
    }
}

impl StorageBackend for Disk {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.0.lock().unwrap().live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let s = self.0.lock().unwrap();
        let start = offset as usize;
        let src = s
            .live
            .get(start..start + out.len())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut s = self.0.lock().unwrap();
        s.live.resize(len as usize, 0);
        s.log.push(Op::SetLen(len as usize));
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut s = self.0.lock().unwrap();
        s.syncs += 1;
        s.log.push(Op::Sync);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut s = self.0.lock().unwrap();
        let start = offset as usize;
        if s.live.len() < start + data.len() {
            s.live.resize(start + data.len(), 0);
        }
        s.live[start..start + data.len()].copy_from_slice(data);
        s.log.push(Op::Write {
            offset: start,
            data: data.to_vec(),
        });
        Ok(())
    }
}

fn apply(image: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, data } => {
            if image.len() < offset + data.len() {
                image.resize(offset + data.len(), 0);
            }
            image[*offset..offset + data.len()].copy_from_slice(data);
        }
        Op::SetLen(len) => image.resize(*len, 0),
        Op::Sync => {}
    }
}

const ROOT: [u8; 32] = [0x5a; 32];
/// The store's name, which its key slot file is named after.
const STORE: &str = "power-loss.redb";

fn caller() -> Caller {
    Caller {
        uid: 0,
        gid: 0,
        pid: 1,
        account: "root".into(),
        groups: Vec::new(),
        client: "power-loss".into(),
    }
}

/// Opens the engine on `disk`, its key slot file in `dir` (a real file: what the engine
/// writes there before a commit outlives any cut of the disk, as on a real machine).
fn open_engine(disk: Disk, dir: &Path) -> Engine {
    let root = RootKey::from_bytes(ROOT);
    let store = Store::open_with_backend(disk, &dir.join(STORE), &root.fingerprint())
        .expect("the store reopens after the power loss");
    Engine::open(
        store,
        root,
        Arc::new(ManualClock::new(1_700_000_000_000)),
        EngineConfig::default(),
    )
    .unwrap()
}

/// What a client can see of the whole store.
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    /// (name, state, current version, usage count, versions listed)
    keys: Vec<(String, KeyState, u32, u64, usize)>,
    grants: Vec<(Role, String, Option<String>)>,
    history: u64,
}

fn observe(e: &Engine) -> Observed {
    let (keys, _) = e.list_keys(true, 0, None);
    Observed {
        keys: keys
            .iter()
            .map(|k| {
                let versions = e.versions(&k.tag).unwrap().len();
                (
                    k.name.clone(),
                    k.state,
                    k.current_version,
                    k.usage_count,
                    versions,
                )
            })
            .collect(),
        grants: e
            .grants()
            .iter()
            .map(|g| (g.role, g.principal.to_string(), g.key_name.clone()))
            .collect(),
        history: e.store().history_len().unwrap(),
    }
}

/// The workload's record: after each acknowledged operation, how many syncs the disk
/// had seen and what the store showed; and each acknowledged ciphertext with the
/// operation index that acknowledged it.
struct Run {
    /// The created store, closed: where the recorded log starts. (kmsd creates the store
    /// file under another name and renames it into place, so no power loss can leave a
    /// half-created store; `Store::open` tests that below.)
    base: Vec<u8>,
    disk: Disk,
    /// Where the run's key slot file is. The workload purges nothing, so its last state
    /// holds every slot any cut refers to.
    dir: tempfile::TempDir,
    /// (syncs completed when the operation was acknowledged, state after it); entry 0 is
    /// the fresh store, before any operation.
    acks: Vec<(u64, Observed)>,
    ciphertexts: Vec<(usize, Vec<u8>, String)>,
}

fn spec(name: &str, key_type: KeyType) -> CreateKey {
    CreateKey {
        name: name.into(),
        key_type,
        protection: Protection::Basic,
        convergent: false,
        auto_rotation: false,
        rotation_days: None,
        memo: String::new(),
        hsm: None,
    }
}

/// Creates, encrypts, rotates, disables and enables, grants and revokes: one operation
/// at a time, each acknowledged (durable) before the next starts.
fn workload() -> Run {
    let dir = tempfile::tempdir().unwrap();
    let created = Disk::default();
    open_engine(created.clone(), dir.path()).close();
    let base = created.0.lock().unwrap().live.clone();
    let disk = Disk::with_image(base.clone());
    let e = open_engine(disk.clone(), dir.path());
    let me = caller();
    let mut run = Run {
        base,
        disk: disk.clone(),
        dir,
        acks: vec![(disk.syncs(), observe(&e))],
        ciphertexts: Vec::new(),
    };
    let ack = |e: &Engine, run: &mut Run| {
        run.acks.push((disk.syncs(), observe(e)));
        run.acks.len() - 1
    };
    e.create_key(&me, &spec("pl-aes", KeyType::Aes256)).unwrap();
    ack(&e, &mut run);
    e.create_key(&me, &spec("pl-ec", KeyType::Ecdsa)).unwrap();
    ack(&e, &mut run);
    let review = GrantSpec {
        role: Role::KeyReviewer,
        user: Some("nobody".into()),
        group: None,
        key: Some("pl-ec".into()),
    };
    for i in 0..24u32 {
        let pt = format!("message {i}").into_bytes();
        let ct = e.encrypt(&me, "pl-aes", &pt, None).wait().unwrap();
        let n = ack(&e, &mut run);
        run.ciphertexts.push((n, pt, ct));
        match i % 6 {
            1 => {
                e.rotate(&me, "pl-aes").unwrap();
            }
            2 => {
                e.disable(&me, "pl-ec").unwrap();
            }
            3 => {
                e.enable(&me, "pl-ec").unwrap();
            }
            4 => {
                e.grant(&me, &review).unwrap();
            }
            5 => {
                e.revoke(&me, &review).unwrap();
            }
            _ => {
                e.sign(&me, "pl-ec", b"m", Default::default())
                    .wait()
                    .unwrap();
            }
        }
        ack(&e, &mut run);
    }
    e.close();
    run
}

/// Opens the image, checks it and compares it with the acknowledged states.
fn check_cut(run: &Run, syncs: u64, image: Vec<u8>, what: &str) {
    // Acknowledged when `syncs` syncs had completed: everything up to `last`.
    let last = run.acks.iter().rposition(|(s, _)| *s <= syncs).unwrap_or(0);
    let disk = Disk::with_image(image);
    {
        let root = RootKey::from_bytes(ROOT);
        let store =
            Store::open_with_backend(disk.clone(), Path::new("cut.redb"), &root.fingerprint())
                .unwrap_or_else(|e| panic!("{what}: the store does not reopen: {e}"));
        assert!(
            store.check_integrity().unwrap(),
            "{what}: redb's integrity check failed"
        );
    }
    // A copy of the run's slot file for each cut: opening wipes the slots this cut's store
    // does not refer to, which later cuts do.
    let cut_dir = tempfile::tempdir().unwrap();
    let slots = kmsd::store::key_slots::path_for(&run.dir.path().join(STORE));
    std::fs::copy(
        &slots,
        kmsd::store::key_slots::path_for(&cut_dir.path().join(STORE)),
    )
    .unwrap();
    let e = open_engine(disk, cut_dir.path());
    let seen = observe(&e);
    let acked = &run.acks[last].1;
    let next = run.acks.get(last + 1).map(|(_, o)| o);
    assert!(
        &seen == acked || Some(&seen) == next,
        "{what}: the store shows neither the last acknowledged state (op {last}) nor the \
         one in flight:\n seen  {seen:?}\n acked {acked:?}\n next  {next:?}"
    );
    let me = caller();
    for (n, pt, ct) in run.ciphertexts.iter().filter(|(n, _, _)| *n <= last) {
        let got = e.decrypt(&me, "pl-aes", ct, None).wait();
        assert_eq!(
            got.as_deref().ok(),
            Some(pt.as_slice()),
            "{what}: ciphertext acknowledged by op {n} does not decrypt"
        );
    }
    e.close();
}

/// Power loss after every sync of the workload: all unsynced writes are lost. The store
/// reopens to the last acknowledged operation (or the one being committed) every time.
#[test]
fn every_cut_point_reopens_to_the_last_acknowledged_commit() {
    let run = workload();
    let log = run.disk.log();
    let total = log.iter().filter(|o| matches!(o, Op::Sync)).count() as u64;
    assert!(total > 100, "only {total} syncs");
    let mut image = run.base.clone();
    let mut syncs = 0u64;
    check_cut(&run, 0, image.clone(), "before the first sync");
    for op in &log {
        apply(&mut image, op);
        if matches!(op, Op::Sync) {
            syncs += 1;
            check_cut(
                &run,
                syncs,
                image.clone(),
                &format!("cut after sync {syncs}"),
            );
        }
    }
    println!(
        "{total} cut points checked, {} operations acknowledged",
        run.acks.len() - 1
    );
}

/// The harsher power loss: between two syncs, an arbitrary subset of the writes reached
/// the disk (each whole write kept or lost, as a drive may reorder its cache). The store
/// still reopens to the last acknowledged operation or the one being committed.
#[test]
fn unsynced_writes_partly_on_disk() {
    let run = workload();
    let log = run.disk.log();
    // Durable image after each sync, and the writes that followed it.
    let mut image = run.base.clone();
    let mut syncs = 0u64;
    let mut pending: Vec<&Op> = Vec::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut checked = 0;
    for op in &log {
        if !matches!(op, Op::Sync) {
            pending.push(op);
            continue;
        }
        // The power fails just before this sync: three random subsets of the writes
        // since the last one reached the disk.
        if !pending.is_empty() {
            for _ in 0..3 {
                let mut torn = image.clone();
                for p in &pending {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    // Length changes are file-system metadata: journaled, in order.
                    if matches!(p, Op::SetLen(_)) || seed & 1 == 1 {
                        apply(&mut torn, p);
                    }
                }
                check_cut(
                    &run,
                    syncs,
                    torn,
                    &format!(
                        "torn cut before sync {}, {} writes",
                        syncs + 1,
                        pending.len()
                    ),
                );
                checked += 1;
            }
        }
        for p in pending.drain(..) {
            apply(&mut image, p);
        }
        syncs += 1;
    }
    assert!(checked > 100, "only {checked} torn cuts");
    println!("{checked} torn cut points checked");
}

/// A new store is created under a temporary name and renamed into place (a power loss
/// after the first sync of a fresh redb file leaves a file redb refuses: "not a redb
/// database"); a temporary file left by a start that died is replaced, not trusted.
#[test]
fn store_creation_is_atomic() {
    // What atomic creation prevents: the first sync of a new file is not a store yet.
    let dir = tempfile::tempdir().unwrap();
    let created = Disk::default();
    open_engine(created.clone(), dir.path()).close();
    let first_sync = created
        .log()
        .iter()
        .position(|o| matches!(o, Op::Sync))
        .unwrap();
    let mut image = Vec::new();
    for op in &created.log()[..first_sync] {
        apply(&mut image, op);
    }
    let root = RootKey::from_bytes(ROOT);
    assert!(
        redb::Database::builder()
            .create_with_backend(Disk::with_image(image))
            .is_err(),
        "a half-created redb file opened"
    );

    // kmsd never leaves such a file under the store's name.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kms.redb");
    let tmp = dir.path().join("kms.redb.create-tmp");
    std::fs::write(&tmp, b"half-created").unwrap();
    let store = Store::open(&path, &root.fingerprint()).unwrap();
    assert!(!tmp.exists(), "the leftover temporary file is still there");
    assert!(path.exists());
    drop(store);
    assert!(kmsd::store::check_file(&path).unwrap());
}
