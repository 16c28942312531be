//! What the unit tests of several modules share.

#![allow(clippy::unwrap_used)]

use std::path::Path;

/// Makes a FIFO at `path` (mode 0600): what tests put where kmsd expects a regular file.
pub(crate) fn make_fifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

/// An engine on a fresh store in a new temporary directory, on `clock`; and root, who
/// may do anything.
pub(crate) fn engine_on(
    clock: std::sync::Arc<crate::clock::ManualClock>,
) -> (
    tempfile::TempDir,
    std::sync::Arc<crate::engine::Engine>,
    crate::engine::Caller,
) {
    use crate::engine::{Caller, Engine, EngineConfig};
    let dir = tempfile::tempdir().unwrap();
    let root = crate::crypto::RootKey::from_bytes([0x44; 32]);
    let store =
        crate::store::Store::open(&dir.path().join("kms.redb"), &root.fingerprint()).unwrap();
    let engine =
        std::sync::Arc::new(Engine::open(store, root, clock, EngineConfig::default()).unwrap());
    let admin = Caller {
        uid: 0,
        gid: 0,
        pid: 1,
        account: "root".into(),
        groups: Vec::new(),
        client: "test".into(),
    };
    (dir, engine, admin)
}
