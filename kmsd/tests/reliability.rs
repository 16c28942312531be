//! The engine under injected storage faults and at volume (SPEC §5, §9): a storage
//! backend that fails every write while "the disk is full", and a million encryptions
//! under one version with no nonce repeated. (The forced rotation at the nonce budget is
//! `nonce_budget_forces_rotation` in engine.rs.)

#![allow(clippy::unwrap_used)]

use kms_shared::ciphertext;
use kms_shared::model::{KeyType, MAX_BATCH_ITEMS, Protection};
use kms_shared::protocol::{CreateKey, ErrorKind, ItemOutcome, PlaintextItem};
use kmsd::clock::ManualClock;
use kmsd::crypto::RootKey;
use kmsd::engine::{Caller, Engine, EngineConfig};
use kmsd::store::Store;
use redb::StorageBackend;
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// An in-memory disk whose writes fail with ENOSPC while `full` is set. Clones share it.
#[derive(Debug, Clone, Default)]
struct Disk {
    bytes: Arc<Mutex<Vec<u8>>>,
    full: Arc<AtomicBool>,
}

fn enospc() -> std::io::Error {
    std::io::Error::from_raw_os_error(28)
}

impl StorageBackend for Disk {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.bytes.lock().unwrap().len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let b = self.bytes.lock().unwrap();
        let start = offset as usize;
        let src = b
            .get(start..start + out.len())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut b = self.bytes.lock().unwrap();
        if self.full.load(Ordering::SeqCst) && len as usize > b.len() {
            return Err(enospc());
        }
        b.resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        if self.full.load(Ordering::SeqCst) {
            return Err(enospc());
        }
        let mut b = self.bytes.lock().unwrap();
        let start = offset as usize;
        if b.len() < start + data.len() {
            b.resize(start + data.len(), 0);
        }
        b[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}

fn me() -> Caller {
    Caller {
        uid: 0,
        gid: 0,
        pid: 1,
        account: "root".into(),
        groups: Vec::new(),
        client: "reliability".into(),
    }
}

fn aes(name: &str) -> CreateKey {
    CreateKey {
        name: name.into(),
        key_type: KeyType::Aes256,
        protection: Protection::Basic,
        convergent: false,
        auto_rotation: false,
        rotation_days: None,
        memo: String::new(),
        hsm: None,
    }
}

fn engine_on(disk: Disk) -> Engine {
    let root = RootKey::from_bytes([0x33; 32]);
    let store =
        Store::open_with_backend(disk, Path::new("faulty.redb"), &root.fingerprint()).unwrap();
    Engine::open(
        store,
        root,
        Arc::new(ManualClock::new(1_700_000_000_000)),
        EngineConfig::default(),
    )
    .unwrap()
}

/// While every write fails, lifecycle and crypto calls fail with `internal` (a call is
/// answered only once its history entry is durable) and nothing of them becomes
/// visible; metadata reads go on; once writes work again the store is reopened and
/// calls succeed without a restart; nothing acknowledged before was lost.
#[test]
fn failing_writes_fail_internal_and_the_store_recovers() {
    let disk = Disk::default();
    let e = engine_on(disk.clone());
    let c = me();
    e.create_key(&c, &aes("sturdy")).unwrap();
    let acked: Vec<(Vec<u8>, String)> = (0..10)
        .map(|i| {
            let pt = format!("acked {i}").into_bytes();
            let ct = e.encrypt(&c, "sturdy", &pt, None).wait().unwrap();
            (pt, ct)
        })
        .collect();
    let before = e.get_key("sturdy").unwrap();

    disk.full.store(true, Ordering::SeqCst);
    assert_eq!(
        e.rotate(&c, "sturdy").unwrap_err().kind(),
        ErrorKind::Internal
    );
    assert_eq!(
        e.create_key(&c, &aes("never")).unwrap_err().kind(),
        ErrorKind::Internal
    );
    let enc = e.encrypt(&c, "sturdy", b"x", None).wait();
    assert_eq!(enc.unwrap_err().kind(), ErrorKind::Internal);
    // Nothing of the failed calls is visible; metadata is still served.
    let during = e.get_key("sturdy").unwrap();
    assert_eq!(during.current_version, before.current_version);
    assert_eq!(during.usage_count, before.usage_count);
    assert!(e.get_key("never").is_err());
    assert_eq!(e.versions("sturdy").unwrap().len(), 1);

    disk.full.store(false, Ordering::SeqCst);
    // The handle reopens the store at most every 200 ms after a failed reopen.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let rotated = loop {
        match e.rotate(&c, "sturdy") {
            Ok(k) => break k,
            Err(err) => {
                assert_eq!(err.kind(), ErrorKind::Internal);
                assert!(std::time::Instant::now() < deadline, "no recovery: {err}");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    };
    assert_eq!(rotated.current_version, 2);
    for (pt, ct) in &acked {
        assert_eq!(&e.decrypt(&c, "sturdy", ct, None).wait().unwrap(), pt);
    }
    e.close();

    // From the disk alone: everything acknowledged, nothing refused.
    let e = engine_on(disk);
    let k = e.get_key("sturdy").unwrap();
    assert_eq!(k.current_version, 2);
    assert_eq!(k.usage_count, before.usage_count + acked.len() as u64);
    assert!(e.get_key("never").is_err());
    for (pt, ct) in &acked {
        assert_eq!(&e.decrypt(&c, "sturdy", ct, None).wait().unwrap(), pt);
    }
    e.close();
}

/// 1,000,000 AES-GCM encryptions under one version through the engine (in batches, as
/// clients send them): all under version 1, the version counts exactly 1,000,000, and
/// no 96-bit nonce repeats.
///
/// 8 s in a release build, about 30 s in a debug one (the dependencies are optimised),
/// so it stays in the normal suite; see docs/RELIABILITY.md.
#[test]
fn a_million_encryptions_repeat_no_nonce() {
    const N: usize = 1_000_000;
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let root = RootKey::from_bytes([0x44; 32]);
    let store = Store::open(&dir.path().join("kms.redb"), &root.fingerprint()).unwrap();
    let e = Engine::open(
        store,
        root,
        Arc::new(ManualClock::new(1_700_000_000_000)),
        EngineConfig::default(),
    )
    .unwrap();
    let c = me();
    e.create_key(&c, &aes("million")).unwrap();
    let items: Vec<PlaintextItem> = (0..MAX_BATCH_ITEMS)
        .map(|_| PlaintextItem {
            plaintext: (b"n".to_vec()).into(),
            context: None,
        })
        .collect();
    let started = std::time::Instant::now();
    let mut nonces: HashSet<[u8; 12]> = HashSet::with_capacity(N);
    let mut done = 0;
    while done < N {
        let n = (N - done).min(MAX_BATCH_ITEMS);
        let out = e.encrypt_batch(&c, "million", &items[..n]).wait().unwrap();
        for item in out {
            let ItemOutcome::Ciphertext(ct) = item else {
                panic!("an encryption failed: {item:?}");
            };
            let (version, body) = ciphertext::parse(&ct).unwrap();
            assert_eq!(version, 1);
            let nonce: [u8; 12] = body[..12].try_into().unwrap();
            assert!(
                nonces.insert(nonce),
                "nonce repeated after {} encryptions",
                nonces.len()
            );
        }
        done += n;
    }
    let v1 = &e.versions("million").unwrap()[0];
    assert_eq!(v1.encryptions, N as u64);
    assert_eq!(nonces.len(), N);
    println!(
        "{N} encryptions under one version, {} distinct nonces, in {:.1} s",
        nonces.len(),
        started.elapsed().as_secs_f64()
    );
    e.close();
}
