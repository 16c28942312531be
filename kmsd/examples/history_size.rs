//! Store size after N crypto calls, each with its durable history entry (issue: history
//! retention keeps disk use bounded). Runs the engine in-process on a temporary store.
//!
//! cargo run --release -p kmsd --example history_size -- [CALLS (default 1000000)]

use kms_shared::model::KeyType;
use kms_shared::protocol::{CreateKey, PlaintextItem};
use kmsd::clock::SystemClock;
use kmsd::crypto::RootKey;
use kmsd::engine::{Caller, Engine, EngineConfig};
use kmsd::store::Store;
use std::sync::Arc;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let calls: usize = std::env::args()
        .nth(1)
        .map_or(Ok(1_000_000), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let (root, _) = RootKey::load_or_create(dir.path(), None)?;
    let path = dir.path().join("kms.redb");
    let store = Store::open(&path, &root.fingerprint())?;
    let engine = Engine::open(store, root, Arc::new(SystemClock), EngineConfig::default())?;
    let me = Caller::daemon();
    engine.create_key(
        &me,
        &CreateKey {
            name: "sizekey".into(),
            key_type: KeyType::Aes256,
            protection: Default::default(),
            convergent: false,
            auto_rotation: false,
            rotation_days: None,
            memo: String::new(),
            hsm: None,
        },
    )?;
    let items: Vec<PlaintextItem> = (0..1000)
        .map(|_| PlaintextItem {
            plaintext: (vec![1u8; 64]).into(),
            context: None,
        })
        .collect();
    let start = Instant::now();
    let mut done = 0;
    while done < calls {
        let n = (calls - done).min(items.len());
        engine.encrypt_batch(&me, "sizekey", &items[..n]).wait()?;
        done += n;
    }
    let secs = start.elapsed().as_secs_f64();
    let size = std::fs::metadata(&path)?.len();
    let entries = engine.store().history_len()?;
    println!(
        "{done} crypto calls ({entries} history entries) in {secs:.1} s: store {:.1} MiB, {:.0} bytes per entry",
        size as f64 / 1048576.0,
        size as f64 / entries as f64
    );
    engine.close();
    Ok(())
}
