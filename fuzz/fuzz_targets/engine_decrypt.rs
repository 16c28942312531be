//! The engine's decrypt and verify paths with an arbitrary ciphertext or signature string
//! against real keys (AES-256-GCM random-nonce and convergent, RSA-2048 OAEP, ECDSA P-256
//! and RSA signatures) in a real store: never a panic; a decrypt is refused only with
//! `decrypt-failed` or `invalid-argument`, and one that succeeds returns exactly the
//! plaintext that was encrypted (never other bytes); a verify answers valid/invalid or
//! `invalid-argument`.
#![no_main]

use kms_shared::ciphertext;
use kms_shared::model::{KeyType, Protection, SignScheme};
use kms_shared::protocol::{CreateKey, ErrorKind};
use kmsd::clock::ManualClock;
use kmsd::crypto::RootKey;
use kmsd::engine::{Caller, Engine, EngineConfig};
use kmsd::store::Store;
use libfuzzer_sys::fuzz_target;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

const PLAINTEXT: &[u8] = b"fuzz plaintext";
const CONTEXT: &[u8] = b"fuzz context";

struct Fixture {
    engine: Engine,
    clock: Arc<ManualClock>,
    caller: Caller,
    calls: AtomicU64,
    /// Real ciphertexts of PLAINTEXT under fuzz-aes v2 and fuzz-conv, for the tamper ops.
    real: [String; 2],
    _dir: tempfile::TempDir,
}

static FX: LazyLock<Fixture> = LazyLock::new(|| {
    // tmpfs: every call commits its history entry durably, and fsync there is free.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir");
    let root = RootKey::from_bytes([0x42; 32]);
    let store = Store::open(&dir.path().join("kms.redb"), &root.fingerprint()).expect("store");
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let engine = Engine::open(store, root, clock.clone(), EngineConfig::default()).expect("engine");
    let caller = Caller {
        uid: 0,
        gid: 0,
        pid: 1,
        account: "fuzz".into(),
        groups: Vec::new(),
        client: "fuzz".into(),
    };
    for (name, key_type, convergent) in [
        ("fuzz-aes", KeyType::Aes256, false),
        ("fuzz-conv", KeyType::Aes256, true),
        ("fuzz-rsa", KeyType::Rsa2048, false),
        ("fuzz-ec", KeyType::Ecdsa, false),
    ] {
        let spec = CreateKey {
            name: name.into(),
            key_type,
            protection: Protection::Basic,
            convergent,
            auto_rotation: false,
            rotation_days: None,
            memo: String::new(),
            hsm: None,
        };
        engine.create_key(&caller, &spec).expect("create key");
    }
    // A second version, so that version prefixes 1 and 2 both name real material.
    engine.rotate(&caller, "fuzz-aes").expect("rotate");
    let real = [
        engine.encrypt(&caller, "fuzz-aes", PLAINTEXT, None).wait(),
        engine
            .encrypt(&caller, "fuzz-conv", PLAINTEXT, Some(CONTEXT))
            .wait(),
    ]
    .map(|r| r.expect("encrypt"));
    Fixture {
        engine,
        clock,
        caller,
        calls: AtomicU64::new(0),
        real,
        _dir: dir,
    }
});

fuzz_target!(|data: &[u8]| {
    let fx = &*FX;
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let e = &fx.engine;
    let me = &fx.caller;
    match selector % 8 {
        op @ 0..=2 => {
            let (key, ctx) = match op {
                0 => ("fuzz-aes", None),
                1 => ("fuzz-conv", Some(CONTEXT)),
                _ => ("fuzz-rsa", None),
            };
            match e.decrypt(me, key, &text, ctx).wait() {
                Ok(pt) => assert_eq!(pt, PLAINTEXT, "decrypt returned other bytes"),
                Err(err) => assert!(
                    matches!(
                        err.kind(),
                        ErrorKind::DecryptFailed | ErrorKind::InvalidArgument
                    ),
                    "decrypt refused with {:?}: {err}",
                    err.kind()
                ),
            }
        }
        op @ 6..=7 => {
            // Tampering with a real ciphertext: the input is a list of (offset, xor) edits
            // of its body; any change must fail authentication, no change must decrypt.
            let (key, ctx) = if op == 6 {
                ("fuzz-aes", None)
            } else {
                ("fuzz-conv", Some(CONTEXT))
            };
            let real = &fx.real[usize::from(op - 6)];
            let (version, mut body) = ciphertext::parse(real).expect("real ciphertext");
            let len = body.len().max(1);
            for edit in rest.chunks_exact(3) {
                let at = usize::from(u16::from_le_bytes([edit[0], edit[1]]));
                if let Some(b) = body.get_mut(at % len) {
                    *b ^= edit[2];
                }
            }
            let tampered = ciphertext::format(version, &body);
            match e.decrypt(me, key, &tampered, ctx).wait() {
                Ok(pt) => {
                    assert_eq!(&tampered, real, "a modified ciphertext decrypted");
                    assert_eq!(pt, PLAINTEXT);
                }
                Err(err) => {
                    assert_ne!(&tampered, real, "the real ciphertext failed: {err}");
                    assert_eq!(err.kind(), ErrorKind::DecryptFailed, "{err}");
                }
            }
        }
        op => {
            let (key, scheme) = match op {
                3 => ("fuzz-ec", SignScheme::default()),
                4 => ("fuzz-rsa", SignScheme::Pss),
                _ => ("fuzz-rsa", SignScheme::Pkcs1),
            };
            if let Err(err) = e.verify(me, key, PLAINTEXT, &text, scheme).wait() {
                assert_eq!(
                    err.kind(),
                    ErrorKind::InvalidArgument,
                    "verify refused: {err}"
                );
            }
        }
    }
    // Every call leaves a history entry; prune them now and then so that a long run
    // measures the decrypt path, not a growing store.
    if fx.calls.fetch_add(1, Ordering::Relaxed) % 50_000 == 49_999 {
        fx.clock.advance(400 * 86_400_000);
        e.prune_history().expect("prune");
    }
});
