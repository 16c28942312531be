//! HSM key material against commits that fail (SPEC §9, docs/RELIABILITY.md item 26): the
//! engine on a real SoftHSM2 token and an in-memory disk that fails on command. Token
//! objects are destroyed only once the store no longer needs them: a purge is committed
//! first and its objects destroyed after it (and at the next start if that did not
//! happen), and the objects of a rotation whose commit failed but may have been stored
//! are kept.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` when the library is first initialised in the process,
//! so this file holds one test (its own process) that sets it before anything loads the
//! module.

#![allow(clippy::unwrap_used)]
// `std::env::set_var` is unsafe since edition 2024: sound here, before any other thread
// of this test reads the environment (one test in this binary, set first thing).
#![allow(unsafe_code)]

mod common;

use common::Disk;
use kms_shared::model::{KeyState, KeyType, Protection};
use kms_shared::protocol::{CreateKey, ErrorKind};
use kmsd::clock::ManualClock;
use kmsd::crypto::RootKey;
use kmsd::engine::{Caller, Engine, EngineConfig};
use kmsd::hsm::DaemonToken;
use kmsd::store::Store;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const LABEL: &str = "kms-commits";

fn me() -> Caller {
    Caller {
        uid: 0,
        gid: 0,
        pid: 1,
        account: "root".into(),
        groups: Vec::new(),
        client: "hsm-commits".into(),
    }
}

fn hsm_aes(name: &str) -> CreateKey {
    CreateKey {
        name: name.into(),
        key_type: KeyType::Aes256,
        protection: Protection::Hsm,
        convergent: false,
        auto_rotation: false,
        rotation_days: None,
        memo: String::new(),
        hsm: None,
    }
}

/// A SoftHSM2 token directory with one initialised token, and its PIN file.
struct Token {
    dir: tempfile::TempDir,
    pin_file: PathBuf,
}

impl Token {
    fn new() -> Token {
        assert!(
            Path::new(MODULE).is_file(),
            "this test needs SoftHSM2 ({MODULE}): apt-get install softhsm2 (.ci/install-deps)"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        // SAFETY: see the crate attribute above; no other thread is running yet.
        unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", LABEL])
            .args(["--pin", "1234", "--so-pin", "5678"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, "1234\n").unwrap();
        Token { dir, pin_file }
    }

    /// Key objects in the token: SoftHSM2's file store keeps one `<uuid>.object` file per
    /// object beside the token's own `token.object`.
    fn objects(&self) -> usize {
        let mut n = 0;
        for token in std::fs::read_dir(self.dir.path().join("tokens")).unwrap() {
            for f in std::fs::read_dir(token.unwrap().path()).unwrap() {
                let name = f.unwrap().file_name().into_string().unwrap();
                n += usize::from(name.ends_with(".object") && name != "token.object");
            }
        }
        n
    }

    fn engine_on(&self, disk: &Disk) -> Engine {
        let root = RootKey::from_bytes([0x44; 32]);
        let store = Store::open_with_backend(
            disk.clone(),
            Path::new("hsm-commits.redb"),
            &root.fingerprint(),
        )
        .unwrap();
        let config = EngineConfig {
            pkcs11: Some(DaemonToken {
                module: MODULE.into(),
                token: LABEL.into(),
                pin_file: self.pin_file.clone(),
            }),
            ..EngineConfig::default()
        };
        Engine::open(
            store,
            root,
            Arc::new(ManualClock::new(1_700_000_000_000)),
            config,
        )
        .unwrap()
    }
}

#[test]
fn token_objects_outlive_every_commit_that_may_need_them() {
    let token = Token::new();
    let c = me();

    // 1. A rotation whose commit fails after its header was written: the caller gets an
    //    error, but the store has the new version, so its objects must stay.
    let disk = Disk::default();
    let e = token.engine_on(&disk);
    e.create_key(&c, &hsm_aes("rot")).unwrap();
    e.rotate(&c, "rot").unwrap();
    assert_eq!(token.objects(), 2);
    disk.fail_commit_after_header();
    let err = e.rotate(&c, "rot").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert!(err.to_string().contains("may have been stored"), "{err}");
    assert_eq!(
        token.objects(),
        3,
        "the failed rotation's objects were destroyed"
    );
    drop(e.close());
    let e = token.engine_on(&disk);
    let k = e.get_key("rot").unwrap();
    assert_eq!(
        k.current_version, 3,
        "precondition: the failed commit was stored"
    );
    let ct = e.encrypt(&c, "rot", b"under v3", None).wait().unwrap();
    assert_eq!(e.decrypt(&c, "rot", &ct, None).wait().unwrap(), b"under v3");

    // 2. A purge whose commit fails and was not stored (the disk is full): the key can be
    //    cancelled back to use with all its material. It used to lose it: the objects
    //    were destroyed before the commit.
    e.create_key(&c, &hsm_aes("kept")).unwrap();
    let ct = e.encrypt(&c, "kept", b"still here", None).wait().unwrap();
    e.request_deletion(&c, "kept").unwrap();
    let objects = token.objects();
    disk.full.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        e.delete_now(&c, "kept").unwrap_err().kind(),
        ErrorKind::Internal
    );
    disk.full.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(token.objects(), objects);
    // The handle reopens the store at most every 200 ms after a failed reopen.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while let Err(err) = e.cancel_deletion(&c, "kept") {
        assert!(std::time::Instant::now() < deadline, "no recovery: {err}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    e.enable(&c, "kept").unwrap();
    assert_eq!(
        e.decrypt(&c, "kept", &ct, None).wait().unwrap(),
        b"still here"
    );

    // 3. A purge whose commit fails after its header was written: stored, but the objects
    //    were not destroyed (the caller got an error). They are still there, and the next
    //    start destroys them (the key's due task), then forgets their references.
    let kept = e.request_deletion(&c, "kept").unwrap().tag;
    let before_purge = token.objects();
    disk.fail_commit_after_header();
    let err = e.delete_now(&c, "kept").unwrap_err();
    assert!(err.to_string().contains("may have been stored"), "{err}");
    assert_eq!(token.objects(), before_purge);
    drop(e.close());
    let e = token.engine_on(&disk);
    assert_eq!(e.get_key(&kept).unwrap().state, KeyState::Deleted);
    assert_eq!(
        token.objects(),
        before_purge,
        "destroyed before the due task ran"
    );
    assert_eq!(e.run_due(), 1);
    assert_eq!(token.objects(), before_purge - 1, "kept's one AES object");
    assert_eq!(e.run_due(), 0, "the task is done once");
    drop(e.close());
    let e = token.engine_on(&disk);
    assert_eq!(e.run_due(), 0, "and stays done across a restart");

    // 4. A purge that works destroys the objects at once.
    let before = token.objects();
    e.request_deletion(&c, "rot").unwrap();
    e.delete_now(&c, "rot").unwrap();
    assert_eq!(token.objects(), before - 3, "rot's three versions");
    drop(e.close());
}
