//! The key engine against real redb files in temporary directories, with an injected
//! clock: the rules of SPEC §2–§5, §7 and §9 for the `basic` protection level.

#![allow(clippy::unwrap_used)]

use kms_shared::model::{Action, DAY_MS, HOUR_MS, KeyInfo, KeyState, KeyType, SignScheme};
use kms_shared::protocol::{
    CiphertextItem, CreateKey, ErrorKind, HistoryQuery, ItemOutcome, PlaintextItem,
};
use kms_shared::{ciphertext, model::Protection};
use kmsd::clock::ManualClock;
use kmsd::crypto::RootKey;
use kmsd::engine::{Caller, Engine, EngineConfig, EngineError};
use kmsd::store::Store;
use std::path::Path;
use std::sync::Arc;

const T0: i64 = 1_700_000_000_000;

fn caller(account: &str) -> Caller {
    Caller {
        uid: 1000,
        gid: 1000,
        pid: 42,
        account: account.into(),
        groups: Vec::new(),
        client: "engine-test".into(),
    }
}

fn open_with(dir: &Path, clock: Arc<ManualClock>, config: EngineConfig) -> Engine {
    let (root, _) = RootKey::load_or_create(dir, None).unwrap();
    let store = Store::open(&dir.join("kms.redb"), &root.fingerprint()).unwrap();
    Engine::open(store, root, clock, config).unwrap()
}

struct Fx {
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    engine: Option<Engine>,
    me: Caller,
}

impl Fx {
    fn new() -> Fx {
        Fx::with_config(EngineConfig::default())
    }

    fn with_config(config: EngineConfig) -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(T0));
        let engine = open_with(dir.path(), clock.clone(), config);
        Fx {
            dir,
            clock,
            engine: Some(engine),
            me: caller("alice"),
        }
    }

    fn e(&self) -> &Engine {
        self.engine.as_ref().unwrap()
    }

    /// Closes the store and opens it again from disk.
    fn reopen(&mut self) {
        let config = self.e().config().clone();
        self.reopen_with(config);
    }

    /// Closes the store and opens it again with another configuration.
    fn reopen_with(&mut self, config: EngineConfig) {
        self.engine.take().unwrap().close();
        self.engine = Some(open_with(self.dir.path(), self.clock.clone(), config));
    }

    fn create(&self, name: &str, t: KeyType) -> KeyInfo {
        self.create_with(name, t, |_| {})
    }

    fn create_with(&self, name: &str, t: KeyType, f: impl FnOnce(&mut CreateKey)) -> KeyInfo {
        let mut spec = CreateKey {
            name: name.into(),
            key_type: t,
            protection: Protection::Basic,
            convergent: false,
            auto_rotation: false,
            rotation_days: None,
            memo: String::new(),
            hsm: None,
        };
        f(&mut spec);
        self.e().create_key(&self.me, &spec).unwrap()
    }

    fn enc(&self, key: &str, pt: &[u8]) -> Result<String, EngineError> {
        self.e().encrypt(&self.me, key, pt, None).wait()
    }

    fn dec(&self, key: &str, ct: &str) -> Result<kms_shared::protocol::Secret, EngineError> {
        self.e().decrypt(&self.me, key, ct, None).wait()
    }
}

/// The newest 1,000 entries of a key's history (the most one page holds).
fn history_page(e: &Engine, key: &str) -> Vec<kms_shared::model::HistoryEntry> {
    e.history(&HistoryQuery {
        key: key.into(),
        limit: Some(1000),
        ..Default::default()
    })
    .unwrap()
}

fn kind<T: std::fmt::Debug>(r: Result<T, EngineError>) -> ErrorKind {
    r.unwrap_err().kind()
}

/// Every cell of the SPEC §3 state table, allowed and refused, for each state.
#[test]
fn state_table() {
    let fx = Fx::new();
    let e = fx.e();
    let me = &fx.me;
    let probe = |name: &str| {
        // (rotate, disable, enable, request deletion, cancel, crypto, history)
        (
            e.rotate(me, name).map(|_| ()),
            fx.enc(name, b"x").map(|_| ()),
            e.history(&HistoryQuery {
                key: name.into(),
                ..Default::default()
            })
            .map(|_| ()),
        )
    };

    // enabled: rotate yes, disable yes, enable no, request deletion yes, cancel no, crypto yes.
    fx.create("enk", KeyType::Aes256);
    let (rot, cry, hist) = probe("enk");
    assert!(rot.is_ok() && cry.is_ok() && hist.is_ok());
    assert_eq!(kind(e.enable(me, "enk")), ErrorKind::InvalidState);
    assert_eq!(kind(e.cancel_deletion(me, "enk")), ErrorKind::InvalidState);
    assert_eq!(kind(e.delete_now(me, "enk")), ErrorKind::InvalidState);
    assert_eq!(e.disable(me, "enk").unwrap().state, KeyState::Disabled);

    // disabled: rotate no, enable yes, disable no, request deletion yes, crypto no, history yes.
    let (rot, cry, hist) = probe("enk");
    assert_eq!(kind(rot), ErrorKind::InvalidState);
    assert_eq!(kind(cry), ErrorKind::InvalidState);
    assert!(hist.is_ok());
    assert_eq!(kind(e.disable(me, "enk")), ErrorKind::InvalidState);
    assert_eq!(kind(e.cancel_deletion(me, "enk")), ErrorKind::InvalidState);
    assert!(e.set_rotation(me, "enk", true, Some(30)).is_ok());
    assert_eq!(e.enable(me, "enk").unwrap().state, KeyState::Enabled);
    assert_eq!(e.disable(me, "enk").unwrap().state, KeyState::Disabled);
    let k = e.request_deletion(me, "enk").unwrap();
    assert_eq!(k.state, KeyState::PendingDeletion);

    // pending-deletion: everything but cancel and delete-now refused; history readable.
    let (rot, cry, hist) = probe("enk");
    assert_eq!(kind(rot), ErrorKind::InvalidState);
    assert_eq!(kind(cry), ErrorKind::InvalidState);
    assert!(hist.is_ok());
    assert_eq!(kind(e.enable(me, "enk")), ErrorKind::InvalidState);
    assert_eq!(kind(e.disable(me, "enk")), ErrorKind::InvalidState);
    assert_eq!(kind(e.request_deletion(me, "enk")), ErrorKind::InvalidState);
    assert_eq!(
        kind(e.set_version_enabled(me, "enk", 1, false)),
        ErrorKind::InvalidState
    );
    assert_eq!(
        kind(e.set_rotation(me, "enk", false, None)),
        ErrorKind::InvalidState
    );
    assert_eq!(
        e.cancel_deletion(me, "enk").unwrap().state,
        KeyState::Disabled
    );
    e.request_deletion(me, "enk").unwrap();
    let gone = e.delete_now(me, "enk").unwrap();
    assert_eq!(gone.state, KeyState::Deleted);

    // deleted: the name is free, the tag still shows the key; nothing else works.
    assert_eq!(kind(e.get_key("enk")), ErrorKind::NotFound);
    let tag = gone.tag.clone();
    assert_eq!(e.get_key(&tag).unwrap().state, KeyState::Deleted);
    for r in [
        e.rotate(me, &tag).map(|_| ()),
        e.enable(me, &tag).map(|_| ()),
        e.disable(me, &tag).map(|_| ()),
        e.request_deletion(me, &tag).map(|_| ()),
        e.cancel_deletion(me, &tag).map(|_| ()),
        fx.enc(&tag, b"x").map(|_| ()),
    ] {
        assert_eq!(kind(r), ErrorKind::InvalidState);
    }
    let hist = history_page(e, &tag);
    // The refusals after the purge are recorded too, newest first.
    assert_eq!(
        (hist[0].action, hist[0].result.as_str()),
        (Action::Encrypt, "invalid-state")
    );
    assert!(
        hist.iter()
            .any(|h| h.action == Action::DeleteNow && h.result == "ok")
    );
    assert_eq!(hist.last().unwrap().action, Action::Create);
    // The name can be used again.
    assert_ne!(fx.create("enk", KeyType::Aes256).tag, tag);
}

/// Versions inherit the key's state; each version's own flag survives a disable/enable.
#[test]
fn version_flags_and_inheritance() {
    let fx = Fx::new();
    let (e, me) = (fx.e(), &fx.me);
    fx.create("verk", KeyType::Aes256);
    let c1 = fx.enc("verk", b"one").unwrap();
    e.rotate(me, "verk").unwrap();
    let c2 = fx.enc("verk", b"two").unwrap();
    assert!(c2.starts_with("ncpkms:v2:"));
    let vs = e.set_version_enabled(me, "verk", 1, false).unwrap();
    assert!(!vs[0].enabled && vs[1].enabled);
    assert_eq!(kind(fx.dec("verk", &c1)), ErrorKind::VersionDisabled);
    assert_eq!(fx.dec("verk", &c2).unwrap(), b"two");
    e.disable(me, "verk").unwrap();
    assert_eq!(kind(fx.dec("verk", &c2)), ErrorKind::InvalidState);
    e.enable(me, "verk").unwrap();
    // Restored as they were: v1 still disabled, v2 usable.
    assert_eq!(kind(fx.dec("verk", &c1)), ErrorKind::VersionDisabled);
    assert_eq!(fx.dec("verk", &c2).unwrap(), b"two");
    e.set_version_enabled(me, "verk", 1, true).unwrap();
    assert_eq!(fx.dec("verk", &c1).unwrap(), b"one");
    assert_eq!(
        kind(e.set_version_enabled(me, "verk", 9, true)),
        ErrorKind::NotFound
    );
    // A failed call is recorded with the version its ciphertext named, if the key has
    // it: the entry an operator looks for after disabling an old version.
    e.set_version_enabled(me, "verk", 1, false).unwrap();
    assert_eq!(kind(fx.dec("verk", &c1)), ErrorKind::VersionDisabled);
    let unknown = c1.replacen("ncpkms:v1:", "ncpkms:v9:", 1);
    assert_eq!(kind(fx.dec("verk", &unknown)), ErrorKind::DecryptFailed);
    let history = history_page(e, "verk");
    let (unknown, disabled) = (&history[0], &history[1]);
    assert_eq!(
        (disabled.result.as_str(), disabled.version),
        ("version-disabled", Some(1))
    );
    assert_eq!(
        (unknown.result.as_str(), unknown.version),
        ("decrypt-failed", None)
    );
}

/// 100 versions all decrypt after the store is closed and reopened; the 101st is refused.
#[test]
fn hundred_versions_survive_reopen() {
    let mut fx = Fx::new();
    fx.create("many", KeyType::Aes256);
    let mut cts = vec![fx.enc("many", b"v1").unwrap()];
    for v in 2..=100u32 {
        let k = fx.e().rotate(&fx.me, "many").unwrap();
        assert_eq!(k.current_version, v);
        cts.push(fx.enc("many", format!("v{v}").as_bytes()).unwrap());
    }
    assert_eq!(kind(fx.e().rotate(&fx.me, "many")), ErrorKind::VersionLimit);
    fx.reopen();
    assert_eq!(fx.e().get_key("many").unwrap().current_version, 100);
    for (i, ct) in cts.iter().enumerate() {
        assert_eq!(
            fx.dec("many", ct).unwrap(),
            format!("v{}", i + 1).as_bytes()
        );
    }
    assert_eq!(kind(fx.e().rotate(&fx.me, "many")), ErrorKind::VersionLimit);
}

/// Convergent: deterministic per context and plaintext; distinct nonces for distinct
/// plaintexts; the wrong context fails.
/// Versions are read from the store on a key's first use after a restart. Changes made
/// before that first use (one that leaves versions alone, one that edits a version, a
/// rotation, a purge by the scheduler) start from the stored versions and their
/// encryption counts, and lose nothing.
#[test]
fn versions_read_on_first_use_after_reopen() {
    let mut fx = Fx::new();
    fx.create("lazy", KeyType::Aes256);
    fx.create("doomed", KeyType::Aes256);
    let old_ct = fx.enc("lazy", b"v1 data").unwrap();
    fx.enc("lazy", b"x").unwrap();
    fx.enc("lazy", b"x").unwrap();
    fx.e().rotate(&fx.me, "lazy").unwrap();
    fx.enc("lazy", b"x").unwrap();
    fx.enc("lazy", b"x").unwrap();
    let doomed_ct = fx.enc("doomed", b"gone soon").unwrap();
    fx.reopen();

    let (e, me) = (fx.e(), &fx.me);
    let counts = |key: &str| -> Vec<(u32, bool, u64)> {
        e.versions(key)
            .unwrap()
            .iter()
            .map(|v| (v.version, v.enabled, v.encryptions))
            .collect()
    };
    // A change that leaves the versions alone, before anything read them.
    e.set_memo(me, "lazy", "still lazy").unwrap();
    // A change to one version of a key whose versions were never read.
    let infos = e.set_version_enabled(me, "lazy", 1, false).unwrap();
    let seen: Vec<_> = infos
        .iter()
        .map(|v| (v.version, v.enabled, v.encryptions))
        .collect();
    assert_eq!(seen, vec![(1, false, 3), (2, true, 2)]);
    assert_eq!(kind(fx.dec("lazy", &old_ct)), ErrorKind::VersionDisabled);
    e.set_version_enabled(me, "lazy", 1, true).unwrap();
    assert_eq!(fx.dec("lazy", &old_ct).unwrap(), b"v1 data");
    e.rotate(me, "lazy").unwrap();
    fx.enc("lazy", b"x").unwrap();
    assert_eq!(
        counts("lazy"),
        vec![(1, true, 3), (2, true, 2), (3, true, 1)]
    );

    // A purge by the scheduler of a key whose versions were never read destroys them all.
    e.request_deletion(me, "doomed").unwrap();
    fx.clock.advance(72 * HOUR_MS);
    assert_eq!(e.run_due(), 1);
    assert_eq!(kind(fx.dec("doomed", &doomed_ct)), ErrorKind::NotFound);

    fx.reopen();
    assert_eq!(
        fx.e()
            .versions("lazy")
            .unwrap()
            .iter()
            .map(|v| (v.version, v.enabled, v.encryptions))
            .collect::<Vec<_>>(),
        vec![(1, true, 3), (2, true, 2), (3, true, 1)]
    );
    let store = fx.e().store().clone();
    let doomed = store
        .load()
        .unwrap()
        .keys
        .into_iter()
        .find(|k| k.name == "doomed")
        .unwrap();
    assert_eq!(doomed.state, KeyState::Deleted);
    let stored = store.versions(&doomed.tag).unwrap();
    assert_eq!(stored.len(), 1);
    assert!(stored.iter().all(|v| v.record.wrapped.is_none()));
}

#[test]
fn convergent_encryption() {
    let fx = Fx::new();
    let (e, me) = (fx.e(), &fx.me);
    fx.create_with("conv", KeyType::Aes256, |s| s.convergent = true);
    let enc = |pt: &[u8], ctx: &[u8]| e.encrypt(me, "conv", pt, Some(ctx)).wait().unwrap();
    assert_eq!(enc(b"same", b"ctx-a"), enc(b"same", b"ctx-a"));
    assert_ne!(enc(b"same", b"ctx-a"), enc(b"same", b"ctx-b"));
    // No context, or an empty one (the same in the associated data): refused alike. An
    // empty one used to be taken.
    for none in [None, Some(&b""[..])] {
        assert_eq!(
            kind(e.encrypt(me, "conv", b"x", none).wait()),
            ErrorKind::InvalidArgument,
            "{none:?}"
        );
    }
    let ct = enc(b"secret", b"ctx-a");
    assert_eq!(
        e.decrypt(me, "conv", &ct, Some(b"ctx-a")).wait().unwrap(),
        b"secret"
    );
    assert_eq!(
        kind(e.decrypt(me, "conv", &ct, Some(b"ctx-b")).wait()),
        ErrorKind::DecryptFailed
    );
    // Decryption still takes an empty context (what was encrypted under it before it was
    // refused must open): it is tried, not refused.
    assert_eq!(
        kind(e.decrypt(me, "conv", &ct, Some(b"")).wait()),
        ErrorKind::DecryptFailed
    );

    let items: Vec<_> = (0..10_000u32)
        .map(|i| kms_shared::protocol::PlaintextItem {
            plaintext: (i.to_be_bytes().to_vec()).into(),
            context: Some(b"one-context".to_vec()),
        })
        .collect();
    let mut nonces = std::collections::HashSet::new();
    for chunk in items.chunks(1000) {
        for out in e.encrypt_batch(me, "conv", chunk).wait().unwrap() {
            let ItemOutcome::Ciphertext(ct) = out else {
                panic!("batch item failed: {out:?}")
            };
            let (_, body) = ciphertext::parse(&ct).unwrap();
            nonces.insert(body[..12].to_vec());
        }
    }
    assert_eq!(nonces.len(), 10_000);
}

/// Every single-bit flip, a changed version prefix, and another key's ciphertext all fail
/// with decrypt-failed — never with wrong plaintext.
#[test]
fn tampering_fails_closed() {
    let fx = Fx::new();
    let (e, me) = (fx.e(), &fx.me);
    fx.create("tamper", KeyType::Aes256);
    fx.create("other", KeyType::Aes256);
    fx.create("rsak", KeyType::Rsa2048);
    e.rotate(me, "tamper").unwrap();
    let ct = fx.enc("tamper", b"attack at dawn").unwrap();
    let (v, body) = ciphertext::parse(&ct).unwrap();
    for bit in 0..body.len() * 8 {
        let mut b = body.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        let r = fx.dec("tamper", &ciphertext::format(v, &b));
        assert_eq!(kind(r), ErrorKind::DecryptFailed, "bit {bit}");
    }
    assert_eq!(
        kind(fx.dec("tamper", &ciphertext::format(1, &body))),
        ErrorKind::DecryptFailed
    );
    assert_eq!(
        kind(fx.dec("tamper", &ciphertext::format(7, &body))),
        ErrorKind::DecryptFailed
    );
    assert_eq!(kind(fx.dec("other", &ct)), ErrorKind::DecryptFailed);
    assert_eq!(
        kind(fx.dec("tamper", "not a ciphertext")),
        ErrorKind::InvalidArgument
    );

    let rct = fx.enc("rsak", b"rsa secret").unwrap();
    let (rv, rbody) = ciphertext::parse(&rct).unwrap();
    let mut flipped = rbody.clone();
    flipped[10] ^= 0x40;
    assert_eq!(
        kind(fx.dec("rsak", &ciphertext::format(rv, &flipped))),
        ErrorKind::DecryptFailed
    );
    e.rotate(me, "rsak").unwrap();
    assert_eq!(
        kind(fx.dec("rsak", &ciphertext::format(2, &rbody))),
        ErrorKind::DecryptFailed
    );
    assert_eq!(fx.dec("rsak", &rct).unwrap(), b"rsa secret");
}

/// Purpose, size and context limits each give their own typed error.
#[test]
fn purposes_and_limits() {
    let fx = Fx::new();
    let (e, me) = (fx.e(), &fx.me);
    fx.create("aes", KeyType::Aes256);
    fx.create("eck", KeyType::Ecdsa);
    fx.create("rsa", KeyType::Rsa2048);
    assert_eq!(kind(fx.enc("eck", b"x")), ErrorKind::WrongPurpose);
    assert_eq!(
        kind(e.sign(me, "aes", b"x", SignScheme::Pss).wait()),
        ErrorKind::WrongPurpose
    );
    assert_eq!(
        kind(e.public_key(me, "aes", None).wait()),
        ErrorKind::WrongPurpose
    );
    assert!(fx.enc("aes", &vec![0; 32 * 1024]).is_ok());
    assert_eq!(
        kind(fx.enc("aes", &vec![0; 32 * 1024 + 1])),
        ErrorKind::TooLarge
    );
    assert!(fx.enc("rsa", &[0; 190]).is_ok());
    assert_eq!(kind(fx.enc("rsa", &[0; 191])), ErrorKind::TooLarge);
    assert_eq!(
        kind(e.sign(me, "eck", &vec![0; 8193], SignScheme::Pss).wait()),
        ErrorKind::TooLarge
    );
    assert_eq!(
        kind(e.encrypt(me, "aes", b"x", Some(&[0; 51])).wait()),
        ErrorKind::TooLarge
    );
    assert_eq!(
        kind(e.encrypt(me, "rsa", b"x", Some(b"c")).wait()),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(e.data_key(me, "aes", 100, false, None).wait()),
        ErrorKind::InvalidArgument
    );
    let bad_name = CreateKey {
        name: "1bad".into(),
        key_type: KeyType::Aes256,
        protection: Protection::Basic,
        convergent: false,
        auto_rotation: false,
        rotation_days: None,
        memo: String::new(),
        hsm: None,
    };
    assert_eq!(
        kind(e.create_key(me, &bad_name)),
        ErrorKind::InvalidArgument
    );
    let conv_rsa = CreateKey {
        name: "convrsa".into(),
        key_type: KeyType::Rsa2048,
        convergent: true,
        ..bad_name.clone()
    };
    assert_eq!(
        kind(e.create_key(me, &conv_rsa)),
        ErrorKind::InvalidArgument
    );
    let dup = CreateKey {
        name: "aes".into(),
        ..bad_name.clone()
    };
    assert_eq!(kind(e.create_key(me, &dup)), ErrorKind::AlreadyExists);
    let hsm = CreateKey {
        name: "hsmkey".into(),
        protection: Protection::Hsm,
        ..bad_name.clone()
    };
    assert_eq!(kind(e.create_key(me, &hsm)), ErrorKind::InvalidArgument);
    let days = CreateKey {
        name: "days".into(),
        rotation_days: Some(731),
        ..bad_name
    };
    assert_eq!(kind(e.create_key(me, &days)), ErrorKind::InvalidArgument);
}

/// Sign/verify for both signing types, old versions still verify, public keys are PEM,
/// data keys unwrap to the plaintext returned, re-encrypt moves to the current version.
#[test]
fn signatures_data_keys_reencrypt() {
    let fx = Fx::new();
    let (e, me) = (fx.e(), &fx.me);
    for (name, t) in [("eck", KeyType::Ecdsa), ("rsa", KeyType::Rsa2048)] {
        fx.create(name, t);
        for scheme in [SignScheme::Pss, SignScheme::Pkcs1] {
            let sig = e.sign(me, name, b"artifact", scheme).wait().unwrap();
            assert!(
                e.verify(me, name, b"artifact", &sig, scheme)
                    .wait()
                    .unwrap()
            );
            assert!(
                !e.verify(me, name, b"artifacT", &sig, scheme)
                    .wait()
                    .unwrap()
            );
        }
        let old = e.sign(me, name, b"m", SignScheme::Pss).wait().unwrap();
        e.rotate(me, name).unwrap();
        assert!(
            e.verify(me, name, b"m", &old, SignScheme::Pss)
                .wait()
                .unwrap()
        );
        let (v, pem) = e.public_key(me, name, None).wait().unwrap();
        assert_eq!(v, 2);
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(
            kind(e.public_key(me, name, Some(5)).wait()),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind(e.verify(me, name, b"m", "garbage", SignScheme::Pss).wait()),
            ErrorKind::InvalidArgument
        );
    }
    fx.create("aes", KeyType::Aes256);
    let (ct, pt) = e.data_key(me, "aes", 256, true, None).wait().unwrap();
    let pt = pt.unwrap();
    assert_eq!(pt.len(), 32);
    assert_eq!(fx.dec("aes", &ct).unwrap(), pt);
    let (_, none) = e.data_key(me, "aes", 512, false, None).wait().unwrap();
    assert!(none.is_none());

    let c1 = fx.enc("aes", b"keep me").unwrap();
    e.rotate(me, "aes").unwrap();
    let c2 = e.reencrypt(me, "aes", &c1, None).wait().unwrap();
    assert!(c2.starts_with("ncpkms:v2:"));
    assert_eq!(fx.dec("aes", &c2).unwrap(), b"keep me");
    let batch = e
        .decrypt_batch(
            me,
            "aes",
            &[
                CiphertextItem {
                    ciphertext: c1.clone(),
                    context: None,
                },
                CiphertextItem {
                    ciphertext: "ncpkms:v1:AAAA".into(),
                    context: None,
                },
            ],
        )
        .wait()
        .unwrap();
    assert_eq!(batch[0], ItemOutcome::Plaintext(b"keep me".to_vec().into()));
    assert!(matches!(&batch[1], ItemOutcome::Err(w) if w.kind == ErrorKind::DecryptFailed));
}

/// What kmsd catches up on before it serves is the purges whose wait ended
/// (`run_due_deletions`); an overdue rotation is left to the scheduler's first pass, and
/// carried out there once.
#[test]
fn start_up_catches_up_on_purges_only() {
    let fx = Fx::new();
    let (e, me) = (fx.e(), &fx.me);
    fx.create_with("daily", KeyType::Aes256, |s| {
        s.auto_rotation = true;
        s.rotation_days = Some(1);
    });
    let doomed = fx.create("doomed", KeyType::Aes256).tag;
    e.request_deletion(me, "doomed").unwrap();
    fx.clock.set(T0 + 73 * HOUR_MS);
    assert_eq!(e.run_due_deletions(), 1);
    assert_eq!(e.get_key(&doomed).unwrap().state, KeyState::Deleted);
    assert_eq!(e.get_key("daily").unwrap().current_version, 1);
    assert_eq!(e.run_due(), 1);
    assert_eq!(e.get_key("daily").unwrap().current_version, 2);
    assert_eq!(e.run_due(), 0);
}

/// A scheduled task whose key changed after the pass listed it is skipped, not recorded:
/// a rotation that fell due on a key the same catch-up purged first. Before, the key's
/// history ended with a refused `auto-rotate` by kmsd after its purge, and the task was
/// counted as failed and retried.
#[test]
fn a_task_the_key_no_longer_calls_for_is_not_recorded() {
    let fx = Fx::new();
    let (e, me) = (fx.e(), &fx.me);
    let tag = fx
        .create_with("short-lived", KeyType::Aes256, |s| {
            s.auto_rotation = true;
            s.rotation_days = Some(10);
        })
        .tag;
    fx.clock.set(T0 + 24 * HOUR_MS);
    e.request_deletion(me, "short-lived").unwrap();
    fx.clock.set(T0 + 20 * 24 * HOUR_MS);
    assert_eq!(e.run_due(), 1, "the purge, and nothing else");
    assert_eq!(e.get_key(&tag).unwrap().state, KeyState::Deleted);
    let refused: Vec<_> = history_page(e, &tag)
        .into_iter()
        .filter(|h| h.result != "ok")
        .map(|h| (h.action, h.result))
        .collect();
    assert!(refused.is_empty(), "refusals recorded: {refused:?}");
    assert_eq!(e.run_due(), 0);
}

/// A rotation period that began while the wall clock ran ahead (a year fast, then
/// corrected) starts again at the next scheduler pass, instead of waiting out the year;
/// a `set-rotation` by kmsd says so, and the key rotates one period later.
#[test]
fn a_rotation_dated_ahead_restarts_when_the_clock_is_set_back() {
    let fx = Fx::new();
    let e = fx.e();
    assert_eq!(e.run_due(), 0);
    let year_ahead = T0 + 365 * DAY_MS;
    fx.clock.step(year_ahead);
    let tag = fx
        .create_with("fast-clock", KeyType::Aes256, |s| {
            s.auto_rotation = true;
            s.rotation_days = Some(30);
        })
        .tag;
    assert_eq!(e.run_due(), 0);
    fx.clock.step(T0 + DAY_MS);
    // A period begun after the clock was set back is left as it is.
    let steady = fx
        .create_with("steady", KeyType::Aes256, |s| {
            s.auto_rotation = true;
            s.rotation_days = Some(30);
        })
        .tag;
    let k = e.get_key(&tag).unwrap();
    assert_eq!(k.next_rotation_at, Some(year_ahead + 30 * DAY_MS));
    assert_eq!(e.run_due(), 0);
    let k = e.get_key(&tag).unwrap();
    assert_eq!(
        k.next_rotation_at,
        Some(T0 + DAY_MS + 30 * DAY_MS),
        "still a year ahead"
    );
    let restarts: Vec<_> = history_page(e, &tag)
        .into_iter()
        .filter(|h| h.action == Action::SetRotation)
        .map(|h| (h.account, h.result))
        .collect();
    assert_eq!(restarts, [("kmsd".to_string(), "ok".to_string())]);
    // Once: a later pass finds nothing to restart.
    assert_eq!(e.run_due(), 0);
    assert_eq!(
        history_page(e, &tag)
            .iter()
            .filter(|h| h.action == Action::SetRotation)
            .count(),
        1
    );
    assert!(
        !history_page(e, &steady)
            .iter()
            .any(|h| h.action == Action::SetRotation)
    );
    fx.clock.advance(30 * DAY_MS);
    assert_eq!(
        e.run_due(),
        2,
        "both keys rotate one period after the restart"
    );
    assert_eq!(e.get_key(&tag).unwrap().current_version, 2);
    assert_eq!(e.get_key(&steady).unwrap().current_version, 2);
}

/// The 72-hour wait: nothing happens before it, the purge happens at it, material is gone
/// and the metadata stays; a cancelled request leaves the key disabled and never purges.
#[test]
fn deletion_wait_with_injected_clock() {
    let fx = Fx::new();
    let (e, me) = (fx.e(), &fx.me);
    fx.create("doomed", KeyType::Aes256);
    fx.create("saved", KeyType::Aes256);
    let ct = fx.enc("doomed", b"x").unwrap();
    let k = e.request_deletion(me, "doomed").unwrap();
    assert_eq!(k.deletion_due_at, Some(T0 + 72 * HOUR_MS));
    e.request_deletion(me, "saved").unwrap();
    e.cancel_deletion(me, "saved").unwrap();

    fx.clock.set(T0 + 72 * HOUR_MS - 1);
    assert_eq!(e.run_due(), 0);
    assert_eq!(
        e.get_key("doomed").unwrap().state,
        KeyState::PendingDeletion
    );
    fx.clock.set(T0 + 72 * HOUR_MS);
    assert_eq!(e.run_due(), 1);
    let tag = k.tag;
    let gone = e.get_key(&tag).unwrap();
    assert_eq!(gone.state, KeyState::Deleted);
    assert_eq!(gone.deleted_at, Some(T0 + 72 * HOUR_MS));
    assert_eq!(kind(fx.dec(&tag, &ct)), ErrorKind::InvalidState);
    assert_eq!(e.get_key("saved").unwrap().state, KeyState::Disabled);
    let (all, _) = e.list_keys(true, 0, None);
    assert!(all.iter().any(|k| k.tag == tag));
    let (live, _) = e.list_keys(false, 0, None);
    assert!(!live.iter().any(|k| k.tag == tag));

    // A year later the metadata and history expire.
    fx.clock.set(T0 + 72 * HOUR_MS + 365 * DAY_MS);
    assert_eq!(e.run_due(), 1);
    assert_eq!(kind(e.get_key(&tag)), ErrorKind::NotFound);
}

/// Once the 72-hour wait is over, a deletion can no longer be cancelled, though the purge
/// has not run yet (a long scheduler pass, a suspended machine): the
/// cancel is refused (`invalid-state`, recorded) and the key is purged at the next pass.
/// Before, the key came back, disabled, days after its wait had ended. One second
/// before the end it is still cancelled; a request made again right after a cancel keeps
/// its own wait.
#[test]
fn a_deletion_whose_wait_is_over_cannot_be_cancelled() {
    let fx = Fx::new();
    let (e, me) = (fx.e(), &fx.me);
    fx.create("doomed", KeyType::Aes256);
    fx.create("saved", KeyType::Aes256);
    let tag = e.request_deletion(me, "doomed").unwrap().tag;
    e.request_deletion(me, "saved").unwrap();
    fx.clock.advance(72 * HOUR_MS - 1_000);
    e.cancel_deletion(me, "saved").unwrap();
    e.request_deletion(me, "saved").unwrap();
    fx.clock.advance(1_000);
    let refused = e.cancel_deletion(me, "doomed");
    assert_eq!(kind(refused), ErrorKind::InvalidState);
    assert_eq!(e.get_key(&tag).unwrap().state, KeyState::PendingDeletion);
    let history = e
        .history(&HistoryQuery {
            key: tag.clone(),
            action: Some(Action::CancelDeletion),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(history[0].result, "invalid-state", "{history:?}");
    assert_eq!(e.run_due(), 1);
    assert_eq!(e.get_key(&tag).unwrap().state, KeyState::Deleted);
    // The one requested again has the whole wait before it, stepped clock or not.
    fx.clock.step(T0 + 30 * DAY_MS);
    assert_eq!(e.run_due(), 0);
    e.cancel_deletion(me, "saved").unwrap();
}

/// A wall clock stepped forward past the deletion date (a machine without a real-time
/// clock setting its time after the request) does not purge the key: the whole 72-hour
/// wait must pass, and the key can be cancelled meanwhile. The due date stays the one
/// stored; once the wait has passed the key is purged as usual. Before, the step alone
/// destroyed the key at the next scheduler pass.
#[test]
fn a_wall_clock_step_does_not_cut_the_deletion_wait_short() {
    let fx = Fx::new();
    let (e, me) = (fx.e(), &fx.me);
    fx.create("doomed", KeyType::Aes256);
    fx.create("kept", KeyType::Aes256);
    let tag = e.request_deletion(me, "doomed").unwrap().tag;
    e.request_deletion(me, "kept").unwrap();
    fx.clock.advance(HOUR_MS);
    // Stepped a week ahead, with one hour of the wait passed.
    fx.clock.step(T0 + 7 * DAY_MS);
    assert_eq!(e.run_due(), 0);
    assert_eq!(e.get_key(&tag).unwrap().state, KeyState::PendingDeletion);
    // Not spun on: the next wake-up is when the rest of the wait has passed.
    assert_eq!(e.next_due(), Some(T0 + 7 * DAY_MS + 71 * HOUR_MS));
    e.cancel_deletion(me, "kept").unwrap();
    fx.clock.advance(71 * HOUR_MS - 1);
    assert_eq!(e.run_due(), 0);
    fx.clock.advance(1);
    assert_eq!(e.run_due(), 1);
    assert_eq!(e.get_key(&tag).unwrap().state, KeyState::Deleted);
    assert_eq!(e.get_key("kept").unwrap().state, KeyState::Disabled);
}

/// A scheduled task held back (or failed) waits its time on the clock a wall-clock step
/// does not move: a wall clock stepped ahead and then set right again does not stall the
/// purge by the size of the step. Before, its retry time was a wall-clock date, a week
/// later than meant once the clock was set back.
#[test]
fn a_wall_clock_set_back_does_not_stall_a_held_purge() {
    let fx = Fx::new();
    let (e, me) = (fx.e(), &fx.me);
    fx.create("doomed", KeyType::Aes256);
    let tag = e.request_deletion(me, "doomed").unwrap().tag;
    fx.clock.advance(HOUR_MS);
    fx.clock.step(T0 + 7 * DAY_MS);
    assert_eq!(e.run_due(), 0);
    fx.clock.step(T0 + HOUR_MS);
    fx.clock.advance(71 * HOUR_MS);
    assert_eq!(e.next_due(), Some(T0 + 72 * HOUR_MS));
    assert_eq!(e.run_due(), 1);
    assert_eq!(e.get_key(&tag).unwrap().state, KeyState::Deleted);
}

/// Refusals of one account's action on one key are recorded together: the first of a
/// second at once, the others of that second as one entry counting them (`items`, dated
/// at the last), written by the scheduler's pass, at the stop, or before history is read.
/// 1,000 refusals in a second were 1,000 durable entries, which any account that may
/// connect could write at the journal's speed with no role at all.
#[test]
fn refusals_in_a_burst_are_recorded_together() {
    let mut fx = Fx::new();
    let tag = fx.create("guarded", KeyType::Aes256).tag;
    let mallory = caller("mallory");
    let refuse = |e: &Engine, n: usize| {
        for _ in 0..n {
            if let Some(t) = e.record_refusal(
                &mallory,
                "guarded",
                Action::Encrypt,
                ErrorKind::PermissionDenied,
            ) {
                t.wait().unwrap();
            }
        }
    };
    let refusals = |e: &Engine| {
        let hist = history_page(e, &tag);
        let denied: Vec<_> = hist
            .iter()
            .filter(|h| h.result == "permission-denied" && h.account == "mallory")
            .collect();
        assert!(denied.iter().all(|h| h.items == h.failed));
        (denied.len(), denied.iter().map(|h| h.items).sum::<u32>())
    };
    // Reading history records what was counted so far: it shows every refusal.
    refuse(fx.e(), 1000);
    assert_eq!(refusals(fx.e()), (2, 1000));
    // Counted, then recorded as the engine closes.
    refuse(fx.e(), 5);
    fx.reopen();
    assert_eq!(refusals(fx.e()), (3, 1005));
    // A new second opens a new window, whose first refusal is recorded at once.
    fx.clock.advance(1000);
    refuse(fx.e(), 3);
    fx.e().run_due();
    assert_eq!(refusals(fx.e()), (5, 1008));
}

/// Listing the keys of a set of tags (what a caller with grants on some keys sees): live
/// keys only, ordered by name, paged, with the total; unknown and deleted tags left out.
#[test]
fn list_keys_of_tags() {
    let fx = Fx::new();
    let e = fx.e();
    let tag = |n: &str| fx.create(n, KeyType::Aes256).tag;
    let (c, a, b) = (tag("key-c"), tag("key-a"), tag("key-b"));
    let (gone, other) = (tag("key-gone"), tag("key-other"));
    e.request_deletion(&fx.me, "key-gone").unwrap();
    fx.clock.set(T0 + 72 * HOUR_MS);
    assert_eq!(e.run_due(), 1);
    let tags: std::collections::BTreeSet<String> = [c, a.clone(), b, gone, "f".repeat(32)]
        .into_iter()
        .collect();
    let names = |keys: Vec<KeyInfo>| keys.into_iter().map(|k| k.name).collect::<Vec<_>>();

    let (keys, total) = e.list_keys_of(&tags, 0, usize::MAX);
    assert_eq!(names(keys), ["key-a", "key-b", "key-c"]);
    assert_eq!(total, 3);
    let (keys, total) = e.list_keys_of(&tags, 1, 1);
    assert_eq!((names(keys), total), (vec!["key-b".to_string()], 3));
    let (keys, total) = e.list_keys_of(&tags, 5, 10);
    assert_eq!((keys.len(), total), (0, 3));
    let (keys, _) = e.list_keys_of(&[a].into_iter().collect(), 0, 10);
    assert_eq!(names(keys), ["key-a"]);
    // A key whose tag is not in the set is not listed, though it is live.
    assert!(e.list_keys(false, 0, None).0.iter().any(|k| k.tag == other));
}

/// The deletion delay has a floor of one hour even if configured lower.
#[test]
fn deletion_delay_floor() {
    let fx = Fx::with_config(EngineConfig {
        deletion_delay_ms: 1,
        ..EngineConfig::default()
    });
    fx.create("quick", KeyType::Aes256);
    let k = fx.e().request_deletion(&fx.me, "quick").unwrap();
    assert_eq!(k.deletion_due_at, Some(T0 + HOUR_MS));
}

/// Auto rotation follows the period; a manual rotation does not move it; it continues
/// while disabled and pending deletion; a long gap gives one catch-up rotation; changing
/// the period moves the next date at once.
#[test]
fn rotation_schedule_with_injected_clock() {
    let mut fx = Fx::new();
    fx.create_with("auto", KeyType::Aes256, |s| {
        s.auto_rotation = true;
        s.rotation_days = Some(10);
    });
    let e = fx.e();
    let me = fx.me.clone();
    assert_eq!(
        e.get_key("auto").unwrap().next_rotation_at,
        Some(T0 + 10 * DAY_MS)
    );

    // Manual rotation on day 3 leaves the schedule alone.
    fx.clock.set(T0 + 3 * DAY_MS);
    e.rotate(&me, "auto").unwrap();
    assert_eq!(
        e.get_key("auto").unwrap().next_rotation_at,
        Some(T0 + 10 * DAY_MS)
    );

    // Day 10: rotated to v3 while disabled; next is day 20.
    e.disable(&me, "auto").unwrap();
    fx.clock.set(T0 + 10 * DAY_MS);
    assert_eq!(e.run_due(), 1);
    let k = e.get_key("auto").unwrap();
    assert_eq!((k.current_version, k.state), (3, KeyState::Disabled));
    assert_eq!(k.next_rotation_at, Some(T0 + 20 * DAY_MS));
    assert_eq!(e.run_due(), 0);

    // Pending deletion still rotates (deletion is 72 h away, so set it just before day 20).
    fx.clock.set(T0 + 19 * DAY_MS);
    e.request_deletion(&me, "auto").unwrap();
    fx.clock.set(T0 + 20 * DAY_MS);
    e.run_due();
    assert_eq!(e.get_key("auto").unwrap().current_version, 4);
    e.cancel_deletion(&me, "auto").unwrap();
    e.enable(&me, "auto").unwrap();

    // Down for 100 days: one catch-up rotation at restart, and the period restarts.
    fx.reopen();
    fx.clock.set(T0 + 130 * DAY_MS);
    assert_eq!(fx.e().run_due(), 1);
    let k = fx.e().get_key("auto").unwrap();
    assert_eq!(k.current_version, 5);
    assert_eq!(k.next_rotation_at, Some(T0 + 140 * DAY_MS));
    assert_eq!(fx.e().run_due(), 0);

    // Period change: next = anchor + new period, at once.
    let k = fx.e().set_rotation(&me, "auto", true, Some(30)).unwrap();
    assert_eq!(k.next_rotation_at, Some(T0 + 160 * DAY_MS));
    let k = fx.e().set_rotation(&me, "auto", false, None).unwrap();
    assert_eq!(k.next_rotation_at, None);
    assert_eq!(fx.e().next_due(), None);
}

/// At the version limit auto rotation stops and the refusal is in the history.
#[test]
fn auto_rotation_stops_at_limit() {
    let fx = Fx::new();
    let (e, me) = (fx.e(), &fx.me);
    fx.create_with("full", KeyType::Aes256, |s| {
        s.auto_rotation = true;
        s.rotation_days = Some(1);
    });
    let mut events = e.subscribe();
    for _ in 2..=100 {
        e.rotate(me, "full").unwrap();
    }
    // Reaching the last version says so at once (not when the next rotation falls due,
    // which may be two years away) and drops the schedule that could only fail.
    let limit_events = |events: &mut tokio::sync::broadcast::Receiver<kmsd::engine::Published>| {
        let mut n = Vec::new();
        while let Ok(ev) = events.try_recv() {
            let ev: kms_shared::protocol::Event = ev.event;
            if ev.kind == kms_shared::protocol::EventKind::VersionLimitReached {
                n.push(ev.version);
            }
        }
        n
    };
    assert_eq!(limit_events(&mut events), [Some(100)]);
    let k = e.get_key("full").unwrap();
    assert_eq!(k.current_version, 100);
    assert_eq!(k.next_rotation_at, None);
    assert_eq!(
        e.rotate(me, "full").unwrap_err().kind(),
        ErrorKind::VersionLimit
    );
    fx.clock.set(T0 + DAY_MS);
    e.run_due();
    assert_eq!(e.get_key("full").unwrap().current_version, 100);
    let h = e
        .history(&HistoryQuery {
            key: "full".into(),
            limit: Some(2),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        h.iter()
            .map(|h| (h.action, h.result.as_str()))
            .collect::<Vec<_>>(),
        [(Action::Rotate, "version-limit"), (Action::Rotate, "ok")]
    );
    // Nothing more is announced for a refused rotation, nor by the scheduler.
    assert!(limit_events(&mut events).is_empty());
}

/// The forced rotation also works when the encryption runs inside a single-threaded
/// tokio runtime (a program embedding the engine), where a blocking wait would panic.
#[tokio::test(flavor = "current_thread")]
async fn nonce_budget_rotation_inside_a_single_threaded_runtime() {
    let fx = Fx::with_config(EngineConfig {
        nonce_budget: 2,
        ..EngineConfig::default()
    });
    // Lifecycle calls block on their commit: off the runtime, as kmsd runs them.
    std::thread::scope(|s| {
        s.spawn(|| fx.create("inrt", KeyType::Aes256))
            .join()
            .unwrap()
    });
    let mut versions = Vec::new();
    for _ in 0..5 {
        let ct = fx
            .e()
            .encrypt(&fx.me, "inrt", b"p", None)
            .wait_async()
            .await;
        versions.push(ciphertext::parse(&ct.unwrap()).unwrap().0);
    }
    assert_eq!(versions, [1, 1, 2, 2, 3]);
}

/// A key that spends its last version's nonce budget: encryptions are refused with
/// `version-limit`, and that is announced once per run of kmsd, not once per refused
/// call: again after a restart, and also when the count is already past the budget at
/// start (what a restore does: it was never announced there).
#[test]
fn nonce_budget_at_the_version_limit_is_announced_once() {
    let budget = |nonce_budget| EngineConfig {
        nonce_budget,
        ..EngineConfig::default()
    };
    let mut fx = Fx::with_config(budget(2));
    fx.create("spent", KeyType::Aes256);
    for _ in 2..=100 {
        fx.e().rotate(&fx.me, "spent").unwrap();
    }
    let mut events = fx.e().subscribe();
    for _ in 0..2 {
        fx.enc("spent", b"p").unwrap();
    }
    for _ in 0..4 {
        assert_eq!(
            fx.enc("spent", b"p").unwrap_err().kind(),
            ErrorKind::VersionLimit
        );
    }
    let low = |events: &mut tokio::sync::broadcast::Receiver<kmsd::engine::Published>| {
        let mut low = 0;
        while let Ok(ev) = events.try_recv() {
            low += usize::from(ev.kind == kms_shared::protocol::EventKind::NonceBudgetLow);
        }
        low
    };
    assert_eq!(low(&mut events), 1);
    let dir = fx.dir.path().to_path_buf();
    for nonce_budget in [2, 1] {
        fx.engine.take().unwrap().close().close();
        fx.engine = Some(open_with(&dir, fx.clock.clone(), budget(nonce_budget)));
        let mut events = fx.e().subscribe();
        for _ in 0..3 {
            assert_eq!(
                fx.enc("spent", b"p").unwrap_err().kind(),
                ErrorKind::VersionLimit
            );
        }
        assert_eq!(low(&mut events), 1, "budget {nonce_budget}");
    }
}

/// The nonce budget: at the threshold the version is retired by a rotation, with an event.
#[test]
fn nonce_budget_forces_rotation() {
    let fx = Fx::with_config(EngineConfig {
        nonce_budget: 5,
        ..EngineConfig::default()
    });
    fx.create("budget", KeyType::Aes256);
    let mut events = fx.e().subscribe();
    let cts: Vec<_> = (0..12).map(|_| fx.enc("budget", b"p").unwrap()).collect();
    let versions: Vec<u32> = cts
        .iter()
        .map(|c| ciphertext::parse(c).unwrap().0)
        .collect();
    assert_eq!(versions, vec![1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3]);
    // Each spent version counts the encryptions made under it, not the one that found
    // its budget spent and went to the next version (it showed one more than was made,
    // until a restart read the store's count).
    let vs = fx.e().versions("budget").unwrap();
    assert_eq!(
        vs.iter().map(|v| v.encryptions).collect::<Vec<_>>(),
        [5, 5, 2]
    );
    for c in &cts {
        assert_eq!(fx.dec("budget", c).unwrap(), b"p");
    }
    let mut low = 0;
    while let Ok(ev) = events.try_recv() {
        low += usize::from(ev.kind == kms_shared::protocol::EventKind::NonceBudgetLow);
    }
    assert_eq!(low, 2);
}

/// History records allowed and refused calls with the caller; usage counts only
/// successful crypto; both survive a reopen; filters and paging work.
#[test]
fn history_and_usage() {
    let mut fx = Fx::new();
    fx.create("histk", KeyType::Aes256);
    let bob = caller("bob");
    for _ in 0..3 {
        fx.enc("histk", b"x").unwrap();
    }
    fx.e().encrypt(&bob, "histk", b"y", None).wait().unwrap();
    fx.e().disable(&bob, "histk").unwrap();
    assert!(fx.e().encrypt(&bob, "histk", b"z", None).wait().is_err());
    fx.reopen();
    let e = fx.e();
    let k = e.get_key("histk").unwrap();
    assert_eq!(k.usage_count, 4);
    assert_eq!(k.last_used_by.as_deref(), Some("bob"));
    let all = e
        .history(&HistoryQuery {
            key: "histk".into(),
            limit: Some(100),
            ..Default::default()
        })
        .unwrap();
    let summary: Vec<_> = all
        .iter()
        .map(|h| (h.action.as_str(), h.result.as_str(), h.account.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("encrypt", "invalid-state", "bob"),
            ("disable", "ok", "bob"),
            ("encrypt", "ok", "bob"),
            ("encrypt", "ok", "alice"),
            ("encrypt", "ok", "alice"),
            ("encrypt", "ok", "alice"),
            ("create", "ok", "alice"),
        ]
    );
    assert!(all.windows(2).all(|w| w[0].seq > w[1].seq));
    let errors = e
        .history(&HistoryQuery {
            key: "histk".into(),
            result: Some(kms_shared::protocol::ResultFilter::Error),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(errors.len(), 1);
    let page2 = e
        .history(&HistoryQuery {
            key: "histk".into(),
            limit: Some(2),
            before_seq: Some(all[1].seq),
            action: Some(Action::Encrypt),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        page2.iter().map(|h| h.seq).collect::<Vec<_>>(),
        vec![all[2].seq, all[3].seq]
    );
    let impact = e.impact("histk", None).unwrap();
    assert_eq!(impact.recent_uses, 4);
    assert_eq!(impact.accounts[0].account, "alice");
    assert_eq!(impact.accounts[0].uses, 3);
}

/// A batch is one call (SPEC §7): one history entry carrying its item and failure counts,
/// while usage, the impact query and the nonce budget count every successful item. Many
/// concurrent calls whose counters the writer sums within one group lose no count.
#[test]
fn batch_is_one_history_entry_and_counters_add_up() {
    let mut fx = Fx::new();
    fx.create("batchk", KeyType::Aes256);
    let items: Vec<PlaintextItem> = (0..5u8)
        .map(|i| PlaintextItem {
            plaintext: (vec![i; 16]).into(),
            context: None,
        })
        .collect();
    let out = fx
        .e()
        .encrypt_batch(&fx.me, "batchk", &items)
        .wait()
        .unwrap();
    let cts: Vec<String> = out
        .iter()
        .map(|o| match o {
            ItemOutcome::Ciphertext(c) => c.clone(),
            other => panic!("item failed: {other:?}"),
        })
        .collect();
    let mut back: Vec<CiphertextItem> = cts
        .iter()
        .map(|c| CiphertextItem {
            ciphertext: c.clone(),
            context: None,
        })
        .collect();
    back[3].ciphertext = "ncpkms:v1:AAAA".into();
    let out = fx
        .e()
        .decrypt_batch(&fx.me, "batchk", &back)
        .wait()
        .unwrap();
    assert_eq!(
        out.iter()
            .filter(|o| matches!(o, ItemOutcome::Err(_)))
            .count(),
        1
    );

    // 64 single calls from 8 threads at once: they share group commits.
    std::thread::scope(|s| {
        for t in 0..8 {
            let (e, me) = (fx.e(), caller(&format!("user{t}")));
            s.spawn(move || {
                for _ in 0..8 {
                    e.encrypt(&me, "batchk", b"x", None).wait().unwrap();
                }
            });
        }
    });
    fx.reopen();
    let e = fx.e();
    let hist = history_page(e, "batchk");
    // 64 singles + 2 batches + create.
    assert_eq!(hist.len(), 67);
    let batches: Vec<_> = hist.iter().filter(|h| h.items > 1).collect();
    assert_eq!(batches.len(), 2);
    let (dec, enc) = (batches[0], batches[1]);
    assert_eq!((dec.action, dec.items, dec.failed), (Action::Decrypt, 5, 1));
    assert_eq!(dec.result, "decrypt-failed");
    assert_eq!(dec.version, Some(1));
    assert_eq!((enc.action, enc.items, enc.failed), (Action::Encrypt, 5, 0));
    assert_eq!(enc.result, "ok");
    assert!(hist.iter().filter(|h| h.items == 1).all(|h| h.failed == 0));

    let k = e.get_key("batchk").unwrap();
    // 5 encrypted + 4 decrypted + 64 singles.
    assert_eq!(k.usage_count, 73);
    assert_eq!(e.impact("batchk", None).unwrap().recent_uses, 73);
    let v1 = e.versions("batchk").unwrap().remove(0);
    assert_eq!(v1.encryptions, 69, "nonce budget counts every encryption");
}

/// The root key file is 0600; the store refuses another root key; wrapped rows do not
/// open without the right root key.
#[test]
fn root_key_protects_the_store() {
    use std::os::unix::fs::PermissionsExt;
    let mut fx = Fx::new();
    fx.create("rsak", KeyType::Aes256);
    let ct = fx.enc("rsak", b"data").unwrap();
    let dir = fx.dir.path().to_path_buf();
    fx.engine.take().unwrap().close();
    let mode = std::fs::metadata(dir.join("root.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let other = RootKey::from_bytes([7u8; 32]);
    match Store::open(&dir.join("kms.redb"), &other.fingerprint()) {
        Err(kmsd::store::StoreError::WrongRootKey { .. }) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened with the wrong root key"),
    }
    // Every wrapped row opens under its key's wrapping key (root key and slot secret),
    // and fails under another root key, or under the root key alone.
    let (root, _) = RootKey::load_or_create(&dir, None).unwrap();
    let store = Store::open(&dir.join("kms.redb"), &root.fingerprint()).unwrap();
    let snap = store.load().unwrap();
    let slots = open_slots(&dir, &snap.keys);
    let mut rows = 0;
    for key in &snap.keys {
        let secret = slots.read(key.slot.unwrap(), &key.tag).unwrap();
        for v in store.versions(&key.tag).unwrap() {
            let aad = kmsd::engine::wrap_aad(&key.tag, v.version, key.key_type);
            let wrapped = v.record.wrapped.as_ref().unwrap();
            assert!(
                root.key_wrapper(&secret, &key.tag)
                    .unwrap(&aad, wrapped)
                    .is_ok()
            );
            assert!(
                other
                    .key_wrapper(&secret, &key.tag)
                    .unwrap(&aad, wrapped)
                    .is_err()
            );
            assert!(root.unwrap(&aad, wrapped).is_err());
            rows += 1;
        }
    }
    assert!(rows > 0);
    drop((store, slots));
    fx.engine = Some(open_with(&dir, fx.clock.clone(), EngineConfig::default()));
    assert_eq!(fx.dec("rsak", &ct).unwrap(), b"data");
}

/// Opens the key slot file of the closed store in `dir`, whose keys are `keys`.
fn open_slots(
    dir: &Path,
    keys: &[kmsd::store::records::KeyRecord],
) -> kmsd::store::key_slots::KeySlots {
    use kmsd::store::key_slots::{self, KeySlots};
    let referenced = keys
        .iter()
        .filter_map(|k| k.slot.map(|s| (s, k.tag.clone())))
        .collect();
    let known: Vec<&str> = keys.iter().map(|k| k.tag.as_str()).collect();
    KeySlots::open(
        &key_slots::path_for(&dir.join("kms.redb")),
        &referenced,
        &known,
    )
    .unwrap()
    .0
}

/// Whether any 32 bytes of the files in `dir`, taken as a slot secret, open `wrapped`
/// under `root`: what someone holding a copy of the data directory can try.
fn opens_from_any_file(dir: &Path, root: &RootKey, tag: &str, aad: &[u8], wrapped: &[u8]) -> bool {
    if root.unwrap(aad, wrapped).is_ok() {
        return true;
    }
    let slot_file = kmsd::store::key_slots::path_for(&dir.join("kms.redb"));
    let bytes = std::fs::read(slot_file).unwrap();
    bytes.windows(32).any(|w| {
        root.key_wrapper(w.try_into().unwrap(), tag)
            .unwrap(aad, wrapped)
            .is_ok()
    })
}

/// SPEC §3: a purged key's material is destroyed beyond recovery. redb keeps what a
/// commit replaced in freed pages, so a copy of the data directory taken after the purge
/// may still hold the version's wrapped material; the slot secret it was wrapped under is
/// gone from the slot file, and the root key alone opens nothing. The same search finds
/// the material before the purge, so the test can tell the difference.
#[test]
fn a_purged_keys_material_cannot_be_recovered_from_the_data_directory() {
    let mut fx = Fx::new();
    fx.create("gone", KeyType::Aes256);
    fx.create("kept", KeyType::Aes256);
    let dir = fx.dir.path().to_path_buf();
    fx.engine.take().unwrap().close().close();
    let (root, _) = RootKey::load_or_create(&dir, None).unwrap();
    let (tag, aad, wrapped) = {
        let store = Store::open(&dir.join("kms.redb"), &root.fingerprint()).unwrap();
        let key = store
            .load()
            .unwrap()
            .keys
            .into_iter()
            .find(|k| k.name == "gone")
            .unwrap();
        let v = store.versions(&key.tag).unwrap().remove(0);
        let aad = kmsd::engine::wrap_aad(&key.tag, v.version, key.key_type);
        (key.tag, aad, v.record.wrapped.unwrap())
    };
    assert!(
        opens_from_any_file(&dir, &root, &tag, &aad, &wrapped),
        "before the purge the data directory opens the material"
    );

    fx.engine = Some(open_with(&dir, fx.clock.clone(), EngineConfig::default()));
    fx.e().request_deletion(&fx.me, "gone").unwrap();
    fx.e().delete_now(&fx.me, "gone").unwrap();
    assert!(
        !opens_from_any_file(&dir, &root, &tag, &aad, &wrapped),
        "the purged material opens from the data directory"
    );
    // The other key is untouched.
    let ct = fx.enc("kept", b"still here").unwrap();
    fx.engine.take().unwrap().close().close();
    fx.engine = Some(open_with(&dir, fx.clock.clone(), EngineConfig::default()));
    assert_eq!(fx.dec("kept", &ct).unwrap(), b"still here");
    assert!(!opens_from_any_file(&dir, &root, &tag, &aad, &wrapped));
}

/// kmsd started once while the store was away (moved aside by hand, or back from an older
/// copy) makes a new store beside the same slot file: that start must not wipe the slots
/// of the keys it does not know. They were wiped, and the real store, put back, was
/// refused for good (`Lost`): its keys destroyed.
#[test]
fn a_start_without_the_store_wipes_none_of_its_key_slots() {
    let mut fx = Fx::new();
    fx.create("precious", KeyType::Aes256);
    let ct = fx.enc("precious", b"keep me").unwrap();
    let dir = fx.dir.path().to_path_buf();
    fx.engine.take().unwrap().close().close();
    // Moved by hand after a clean stop (its journal holds nothing not in it).
    let store = dir.join("kms.redb");
    let away = fx.dir.path().join("kms.redb.away");
    std::fs::rename(&store, &away).unwrap();

    // A start on a new, empty store: it serves, and its own keys work.
    fx.engine = Some(open_with(&dir, fx.clock.clone(), EngineConfig::default()));
    fx.create("stopgap", KeyType::Aes256);
    assert_eq!(
        fx.dec("stopgap", &fx.enc("stopgap", b"x").unwrap())
            .unwrap(),
        b"x"
    );
    fx.engine.take().unwrap().close().close();

    // The real store back: its key opens, and the stopgap's slot is kept in turn.
    std::fs::rename(&away, &store).unwrap();
    fx.engine = Some(open_with(&dir, fx.clock.clone(), EngineConfig::default()));
    assert_eq!(fx.dec("precious", &ct).unwrap(), b"keep me");
    fx.e().request_deletion(&fx.me, "precious").unwrap();
    fx.e().delete_now(&fx.me, "precious").unwrap();
    assert_eq!(kind(fx.dec("precious", &ct)), ErrorKind::NotFound);
}

/// A slot that cannot be read when a call first needs its key is reported as such, not
/// as a store that "could not record the change".
#[test]
fn an_unreadable_slot_says_so() {
    let mut fx = Fx::new();
    fx.create("slotted", KeyType::Aes256);
    let ct = fx.enc("slotted", b"x").unwrap();
    let dir = fx.dir.path().to_path_buf();
    fx.engine.take().unwrap().close().close();
    fx.engine = Some(open_with(&dir, fx.clock.clone(), EngineConfig::default()));
    // Both copies of every slot garbled under the open engine (the material is unwrapped
    // on first use, after this).
    let path = kmsd::store::key_slots::path_for(&dir.join("kms.redb"));
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096..len].fill(0x5a);
    std::fs::write(&path, &bytes).unwrap();
    let err = fx.dec("slotted", &ct).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(
        err.to_string()
            .contains("the key slot of key slotted cannot be read"),
        "{err}"
    );
}

/// SPEC §7's bounded disk use, whatever the call rate: over `history_max_entries` the
/// oldest entries of crypto calls go (of any key), down to nine tenths of it, and the
/// newest stay, as do entries that are not calls; under it, `cap_history` only looks.
#[test]
fn history_is_capped_at_its_most_entries() {
    let fx = Fx::with_config(EngineConfig {
        history_max_entries: 20,
        ..EngineConfig::default()
    });
    let e = fx.e();
    fx.create("busy", KeyType::Aes256);
    let history = || {
        e.history(&HistoryQuery {
            key: "busy".into(),
            limit: Some(1000),
            ..Default::default()
        })
        .unwrap()
    };
    for i in 0..10 {
        fx.clock.advance(1_000);
        fx.enc("busy", format!("{i}").as_bytes()).unwrap();
    }
    let never = || false;
    assert_eq!(e.cap_history(&never).unwrap(), 0);
    assert_eq!(history().len(), 11, "under the cap: nothing goes");
    for i in 10..30 {
        fx.clock.advance(1_000);
        fx.enc("busy", format!("{i}").as_bytes()).unwrap();
    }
    assert_eq!(e.cap_history(&never).unwrap(), 12);
    let kept = history();
    assert_eq!(kept.len(), 19, "{kept:?}");
    // Newest first: the 18 newest encryptions, none of the first ones; and the creation,
    // which is not a call (19 entries are under the cap).
    assert_eq!(kept[0].time, T0 + 30_000);
    assert_eq!(kept[17].time, T0 + 13_000);
    assert_eq!(kept[18].action, Action::Create);
    // Entries that are not calls past the cap on their own go too, the oldest first.
    for i in 0..25 {
        fx.clock.advance(1_000);
        e.set_memo(&fx.me, "busy", &format!("memo {i}")).unwrap();
    }
    assert_eq!(e.cap_history(&never).unwrap(), 44 - 18);
    let kept = history();
    assert_eq!(kept.len(), 18, "{kept:?}");
    assert!(kept.iter().all(|h| h.action == Action::SetMemo), "{kept:?}");
    // A stop asked for ends it before its first round.
    for _ in 0..5 {
        fx.enc("busy", b"x").unwrap();
    }
    assert_eq!(e.cap_history(&|| true).unwrap(), 0);
    assert_eq!(history().len(), 23);
}

/// History older than the retention period is pruned; newer entries stay.
#[test]
fn history_retention_prunes_old_entries() {
    let fx = Fx::with_config(EngineConfig {
        retention_ms: 10 * DAY_MS,
        ..EngineConfig::default()
    });
    fx.create("oldhist", KeyType::Aes256);
    for _ in 0..5 {
        fx.enc("oldhist", b"x").unwrap();
    }
    fx.clock.set(T0 + 11 * DAY_MS);
    fx.enc("oldhist", b"new").unwrap();
    fx.e().prune_history().unwrap();
    let h = fx
        .e()
        .history(&HistoryQuery {
            key: "oldhist".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].time, T0 + 11 * DAY_MS);
    // Usage counts are not history: they stay.
    assert_eq!(fx.e().get_key("oldhist").unwrap().usage_count, 6);
}

/// Grants: stored durably, duplicates refused, revoke removes, unknown users refused.
#[test]
fn grants_persist() {
    use kms_shared::model::{Principal, Role};
    use kms_shared::protocol::GrantSpec;
    let mut fx = Fx::new();
    fx.create("gkey", KeyType::Aes256);
    let spec = GrantSpec {
        role: Role::KeyUser,
        user: Some("nobody".into()),
        group: None,
        key: Some("gkey".into()),
    };
    let g = fx.e().grant(&fx.me, &spec).unwrap();
    assert_eq!(g.principal, Principal::User("nobody".into()));
    assert_eq!(kind(fx.e().grant(&fx.me, &spec)), ErrorKind::AlreadyExists);
    let bad = GrantSpec {
        user: Some("no-such-user-xyz".into()),
        ..spec.clone()
    };
    assert_eq!(kind(fx.e().grant(&fx.me, &bad)), ErrorKind::InvalidArgument);
    fx.reopen();
    assert_eq!(fx.e().grants().len(), 1);
    fx.e().revoke(&fx.me, &spec).unwrap();
    assert_eq!(kind(fx.e().revoke(&fx.me, &spec)), ErrorKind::NotFound);
    fx.reopen();
    assert!(fx.e().grants().is_empty());
}

/// The due index follows the keys under the retention of this run: a purged key's expiry
/// moves when the retention setting changes between runs (it was kept at the old date, and
/// a longer retention made the scheduler retry the expiry every second for a year), and
/// an expired key leaves no due entry behind.
#[test]
fn expiry_follows_the_retention_setting() {
    let mut fx = Fx::new();
    fx.create("old", KeyType::Aes256);
    let e = fx.e();
    e.request_deletion(&fx.me, "old").unwrap();
    let tag = e.delete_now(&fx.me, "old").unwrap().tag;
    let retention = |days| EngineConfig {
        retention_ms: days * DAY_MS,
        ..EngineConfig::default()
    };
    assert_eq!(fx.e().next_due(), Some(T0 + 365 * DAY_MS));
    // Opened from the daemon's runtime, as kmsd does: the repair's wait for its commit
    // panicked there ("Cannot block the current thread from within a runtime"), so kmsd
    // could not start after a retention change.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    runtime.block_on(async { fx.reopen_with(retention(730)) });
    assert_eq!(fx.e().next_due(), Some(T0 + 730 * DAY_MS));
    fx.clock.set(T0 + 400 * DAY_MS);
    assert_eq!(fx.e().run_due(), 0);
    assert!(fx.e().resolve(&tag).is_ok(), "kept for 730 days");
    fx.reopen_with(retention(30));
    assert_eq!(fx.e().next_due(), Some(T0 + 30 * DAY_MS));
    assert_eq!(fx.e().run_due(), 1);
    assert!(fx.e().resolve(&tag).is_err(), "expired");
    assert_eq!(fx.e().next_due(), None);
    fx.reopen_with(retention(730));
    assert_eq!(fx.e().next_due(), None, "a stored row outlived its key");
}

/// A grant id is never given twice: not after the highest grant is revoked, and not
/// after a restart (ids were the highest present plus one, so a revoked grant's id went
/// to the next grant, and a client remembering grants by id mixed them up).
#[test]
fn grant_ids_are_never_reused() {
    use kms_shared::model::Role;
    use kms_shared::protocol::GrantSpec;
    let mut fx = Fx::new();
    fx.create("ids", KeyType::Aes256);
    let spec = |role| GrantSpec {
        role,
        user: Some("nobody".into()),
        group: None,
        key: Some("ids".into()),
    };
    let e = fx.e();
    let first = e.grant(&fx.me, &spec(Role::KeyUser)).unwrap().id;
    let second = e.grant(&fx.me, &spec(Role::KeyReviewer)).unwrap().id;
    assert!(second > first);
    e.revoke(&fx.me, &spec(Role::KeyReviewer)).unwrap();
    let third = e.grant(&fx.me, &spec(Role::KeyManager)).unwrap().id;
    assert!(third > second, "{third} reuses {second}");
    e.revoke(&fx.me, &spec(Role::KeyManager)).unwrap();
    fx.reopen();
    let fourth = fx.e().grant(&fx.me, &spec(Role::KeyManager)).unwrap().id;
    assert!(fourth > third, "{fourth} reuses {third} after a restart");
}

/// A subscriber sees the events its grants allowed when they were published: the
/// holder of a grant on a key sees the key's purge and the removal of its grants with
/// it, and the revoke of its own grant — all of which it missed when events were judged
/// by the grants at the time they were forwarded, a moment after those were gone.
#[test]
fn subscribers_see_what_their_grants_allowed_when_it_happened() {
    use kms_shared::model::Role;
    use kms_shared::protocol::{EventKind, GrantSpec};
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let e = Arc::new(open_with(dir.path(), clock, EngineConfig::default()));
    let service =
        kmsd::service::Service::new(e.clone(), "s".into(), "d".into(), 64, 64 << 20).unwrap();
    let root = caller("root");
    let root = Caller { uid: 0, ..root };
    let nobody = Caller {
        uid: 65534,
        gid: 65534,
        account: "nobody".into(),
        ..caller("nobody")
    };
    let spec = |role, key: &str| GrantSpec {
        role,
        user: Some("nobody".into()),
        group: None,
        key: Some(key.into()),
    };
    let aes = |name: &str| CreateKey {
        name: name.into(),
        key_type: KeyType::Aes256,
        protection: kms_shared::model::Protection::Basic,
        convergent: false,
        auto_rotation: false,
        rotation_days: None,
        memo: String::new(),
        hsm: None,
    };
    e.create_key(&root, &aes("watched")).unwrap();
    e.create_key(&root, &aes("revoked")).unwrap();
    let mut events = e.subscribe();
    e.grant(&root, &spec(Role::KeyUser, "watched")).unwrap();
    e.grant(&root, &spec(Role::KeyUser, "revoked")).unwrap();
    e.revoke(&root, &spec(Role::KeyUser, "revoked")).unwrap();
    // Another account's role on the key: that the key's permissions changed is nobody's
    // to see, who got which role is not (it may not list grants).
    let to_daemon = GrantSpec {
        user: Some("daemon".into()),
        ..spec(Role::KeyReviewer, "watched")
    };
    e.grant(&root, &to_daemon).unwrap();
    e.request_deletion(&root, "watched").unwrap();
    e.delete_now(&root, "watched").unwrap();
    let mut seen = Vec::new();
    let mut messages = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let Some(ev) = service.shown_to(&nobody, ev) {
            seen.push((ev.kind, ev.key_name.clone().unwrap_or_default()));
            messages.push(ev.message);
        }
    }
    assert!(
        messages
            .iter()
            .any(|m| m == "key-user on watched granted to user nobody"),
        "its own grant in full: {messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m == "permissions on key watched changed"),
        "another's grant, without who or what: {messages:?}"
    );
    assert!(
        !messages.iter().any(|m| m.contains("daemon")),
        "{messages:?}"
    );
    let has = |kind, key: &str| seen.iter().any(|(k, n)| *k == kind && n == key);
    assert!(
        has(EventKind::PermissionChanged, "revoked"),
        "its revoke: {seen:?}"
    );
    assert!(has(EventKind::Purged, "watched"), "the purge: {seen:?}");
    let permission_events = seen
        .iter()
        .filter(|(k, n)| *k == EventKind::PermissionChanged && n == "watched")
        .count();
    assert_eq!(
        permission_events, 3,
        "its grant, daemon's, and their removal: {seen:?}"
    );
}

/// Grants follow the key's states (SPEC §3): no new grant once deletion is requested,
/// revoke in any state, the key's grants removed with its purge (in the store too); and
/// every refused grant or revoke that names a key is in that key's history.
#[test]
fn grants_follow_the_key_states() {
    use kms_shared::model::Role;
    use kms_shared::protocol::{EventKind, GrantSpec};
    let mut fx = Fx::new();
    fx.create("gone", KeyType::Aes256);
    fx.create("kept", KeyType::Aes256);
    let spec = |role, key: &str| GrantSpec {
        role,
        user: Some("nobody".into()),
        group: None,
        key: Some(key.into()),
    };
    let e = fx.e();
    e.grant(&fx.me, &spec(Role::KeyUser, "gone")).unwrap();
    e.grant(&fx.me, &spec(Role::KeyReviewer, "gone")).unwrap();
    e.grant(&fx.me, &spec(Role::KeyUser, "kept")).unwrap();
    assert_eq!(
        kind(e.grant(&fx.me, &spec(Role::KeyUser, "gone"))),
        ErrorKind::AlreadyExists
    );
    let mut nobody_such = spec(Role::KeyUser, "gone");
    nobody_such.user = Some("no-such-user-xyz".into());
    assert_eq!(
        kind(e.grant(&fx.me, &nobody_such)),
        ErrorKind::InvalidArgument
    );
    e.request_deletion(&fx.me, "gone").unwrap();
    assert_eq!(
        kind(e.grant(&fx.me, &spec(Role::KeyManager, "gone"))),
        ErrorKind::InvalidState
    );
    e.revoke(&fx.me, &spec(Role::KeyReviewer, "gone")).unwrap();
    let refused = e
        .history(&HistoryQuery {
            key: "gone".into(),
            ..Default::default()
        })
        .unwrap()
        .iter()
        .filter(|h| h.action == Action::Grant && h.result != "ok")
        .map(|h| h.result.clone())
        .collect::<Vec<_>>();
    assert_eq!(
        refused,
        ["invalid-state", "invalid-argument", "already-exists"]
    );

    let mut events = e.subscribe();
    let tag = e.delete_now(&fx.me, "gone").unwrap().tag;
    let keys_of = |e: &Engine| {
        e.grants()
            .iter()
            .map(|g| g.key_name.clone().unwrap_or_default())
            .collect::<Vec<_>>()
    };
    assert_eq!(keys_of(e), ["kept"]);
    let mut changed = 0;
    while let Ok(ev) = events.try_recv() {
        changed += usize::from(ev.kind == EventKind::PermissionChanged);
    }
    assert_eq!(changed, 1);
    assert_eq!(
        kind(e.revoke(&fx.me, &spec(Role::KeyUser, &tag))),
        ErrorKind::NotFound
    );
    fx.reopen();
    assert_eq!(keys_of(fx.e()), ["kept"]);
}

/// A key that cannot be used (disabled, pending deletion) keeps no unwrapped material in
/// memory: it is dropped with the change and unwrapped again when the key is next used
/// after it is enabled. Encryption counts carry across.
#[test]
fn unusable_keys_hold_no_unwrapped_material() {
    let fx = Fx::new();
    let e = fx.e();
    let tag = fx
        .create_with("idle", KeyType::Aes256, |s| {
            s.auto_rotation = true;
            s.rotation_days = Some(1);
        })
        .tag;
    let cached = |e: &Engine| {
        let entry = e.resolve(&tag).unwrap();
        let versions = entry.versions.get().map(<[_]>::to_vec).unwrap_or_default();
        versions.iter().filter(|v| v.has_material()).count()
    };
    let ct = fx.enc("idle", b"before").unwrap();
    assert_eq!(cached(e), 1, "unwrapped on first use");
    e.disable(&fx.me, "idle").unwrap();
    assert_eq!(cached(e), 0, "dropped when disabled");
    e.set_memo(&fx.me, "idle", "still disabled").unwrap();
    assert_eq!(cached(e), 0);
    // Rotation goes on while the key is disabled; the new version's fresh material is
    // not kept either.
    fx.clock.set(T0 + DAY_MS);
    assert_eq!(e.run_due(), 1);
    assert_eq!(e.versions(&tag).unwrap().len(), 2);
    assert_eq!(cached(e), 0, "not kept after a rotation while disabled");
    e.enable(&fx.me, "idle").unwrap();
    assert_eq!(fx.dec("idle", &ct).unwrap(), b"before");
    assert_eq!(cached(e), 1, "unwrapped again");
    fx.enc("idle", b"after").unwrap();
    assert_eq!(cached(e), 2, "the new version too");
    let encryptions: Vec<u64> = e
        .versions(&tag)
        .unwrap()
        .iter()
        .map(|v| v.encryptions)
        .collect();
    assert_eq!(encryptions, [1, 1], "counts kept across the changes");
    e.request_deletion(&fx.me, "idle").unwrap();
    assert_eq!(cached(e), 0, "dropped when pending deletion");
}

/// A backup cannot know how many encryptions were made under a version after it was
/// taken: a restored count would let that version go on past its budget with random
/// nonces, once per restore. The restore counts every AES key's current version as spent
/// (the largest budget kmsd accepts), so its next encryption rotates; convergent keys
/// (no budget) and other purposes are left alone, and the restored ciphertexts still
/// decrypt. (It used to restore the count as it was: the key went on under version 1.)
#[test]
fn a_restored_store_rotates_its_aes_keys_before_encrypting() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let config = EngineConfig {
        nonce_budget: 10,
        ..EngineConfig::default()
    };
    let me = caller("root");
    let aes = |name: &str, convergent| CreateKey {
        name: name.into(),
        key_type: KeyType::Aes256,
        protection: kms_shared::model::Protection::Basic,
        convergent,
        auto_rotation: false,
        rotation_days: None,
        memo: String::new(),
        hsm: None,
    };
    let backup = dir.path().join("backup.redb");
    let old = {
        let e = open_with(&src, clock.clone(), config.clone());
        e.create_key(&me, &aes("random", false)).unwrap();
        e.create_key(&me, &aes("dedupe", true)).unwrap();
        let old = e.encrypt(&me, "random", b"before", None).wait().unwrap();
        e.encrypt(&me, "dedupe", b"d", Some(b"ctx")).wait().unwrap();
        e.snapshot_to(&backup).unwrap();
        // Made after the backup: the restored store cannot count these.
        for _ in 0..8 {
            e.encrypt(&me, "random", b"after", None).wait().unwrap();
        }
        e.close().close();
        old
    };
    let dst = dir.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    std::fs::copy(src.join("root.key"), dst.join("root.key")).unwrap();
    let done = kmsd::restore::restore(&kmsd::restore::RestoreOptions {
        file: backup.clone(),
        data_dir: dst.clone(),
        credentials_dir: None,
        force: false,
    })
    .unwrap();
    assert_eq!(done.budgets_spent, 1, "only the random-nonce AES key");
    // The backup carries both keys' slot secrets; the restored store holds none of them
    // (they are in its new slot file), not even in a freed page.
    let tables = |path: &Path| -> Vec<String> {
        use redb::TableHandle as _;
        let db = redb::Database::create(path).unwrap();
        let tx = db.begin_read().unwrap();
        tx.list_tables()
            .unwrap()
            .map(|t| t.name().to_string())
            .collect()
    };
    assert!(tables(&backup).contains(&"slot_secrets".to_string()));
    assert!(!tables(&dst.join("kms.redb")).contains(&"slot_secrets".to_string()));
    assert!(kmsd::store::key_slots::path_for(&dst.join("kms.redb")).exists());

    let e = open_with(&dst, clock, config);
    let ct = e.encrypt(&me, "random", b"again", None).wait().unwrap();
    assert!(
        ct.starts_with("ncpkms:v2:"),
        "{ct}: encrypted under the restored version"
    );
    assert_eq!(e.get_key("random").unwrap().current_version, 2);
    let plain = e.decrypt(&me, "random", &old, None).wait().unwrap();
    assert_eq!(&plain[..], b"before");
    let dedupe = e.encrypt(&me, "dedupe", b"d", Some(b"ctx")).wait().unwrap();
    assert!(dedupe.starts_with("ncpkms:v1:"), "{dedupe}");
    e.close().close();
}

// The store's tables as redb names them, for tests that edit a closed store the way
// someone with write access to the file (and no root key) could.
use redb::{ReadableDatabase as _, ReadableTable as _};
const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
const KEYS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("keys");
const VERSIONS: redb::TableDefinition<(&str, u32), &[u8]> = redb::TableDefinition::new("versions");

/// Schema 1's wrapping AAD (tag and version), written out here rather than taken from the
/// engine so that the test holds the old format fixed.
fn schema1_aad(tag: &str, version: u32) -> Vec<u8> {
    [
        b"kms/wrap\0".as_slice(),
        tag.as_bytes(),
        &version.to_be_bytes(),
    ]
    .concat()
}

/// Takes a closed store back to schema 1 or 2, as a kmsd of that schema left it: every
/// version's material wrapped under the root key alone (with schema 1's AAD for 1), no key
/// with a slot, and the schema number. Returns how many versions it re-wrapped. The slot
/// file stays as it was: the next open wipes the slots no key refers to.
fn back_to_schema(dir: &Path, root: &RootKey, schema: u64) -> usize {
    use kmsd::store::key_slots::{self, KeySlots};
    use kmsd::store::records::{KeyRecord, VersionRecord, decode, encode_map};
    let mut rewrapped = 0;
    {
        let db = redb::Database::create(dir.join("kms.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut keys: Vec<KeyRecord> = tx
                .open_table(KEYS)
                .unwrap()
                .iter()
                .unwrap()
                .map(|row| decode(row.unwrap().1.value()).unwrap())
                .collect();
            let referenced = keys
                .iter()
                .filter_map(|k| k.slot.map(|s| (s, k.tag.clone())))
                .collect();
            let known: Vec<&str> = keys.iter().map(|k| k.tag.as_str()).collect();
            let (slots, _) = KeySlots::open(
                &key_slots::path_for(&dir.join("kms.redb")),
                &referenced,
                &known,
            )
            .unwrap();
            let mut versions = tx.open_table(VERSIONS).unwrap();
            for key in &keys {
                let mut stored: Vec<(u32, VersionRecord)> = Vec::new();
                for row in versions
                    .range((key.tag.as_str(), 0)..=(key.tag.as_str(), u32::MAX))
                    .unwrap()
                {
                    let (k, v) = row.unwrap();
                    stored.push((k.value().1, decode(v.value()).unwrap()));
                }
                let secret = slots.read(key.slot.unwrap(), &key.tag).unwrap();
                let wrapper = root.key_wrapper(&secret, &key.tag);
                for (version, mut rec) in stored {
                    let aad = kmsd::engine::wrap_aad(&key.tag, version, key.key_type);
                    let material = wrapper.unwrap(&aad, rec.wrapped.as_ref().unwrap()).unwrap();
                    let old_aad = match schema {
                        1 => schema1_aad(&key.tag, version),
                        _ => aad,
                    };
                    rec.wrapped = Some(root.wrap(&old_aad, &material).unwrap());
                    versions
                        .insert(
                            (key.tag.as_str(), version),
                            encode_map(&rec).unwrap().as_slice(),
                        )
                        .unwrap();
                    rewrapped += 1;
                }
            }
            let mut key_table = tx.open_table(KEYS).unwrap();
            for key in &mut keys {
                key.slot = None;
                key_table
                    .insert(key.tag.as_str(), encode_map(&*key).unwrap().as_slice())
                    .unwrap();
            }
            let mut meta = tx.open_table(META).unwrap();
            meta.insert("schema_version", schema.to_be_bytes().as_slice())
                .unwrap();
        }
        tx.commit().unwrap();
    }
    rewrapped
}

/// A store written before schema 3 (material under the root key alone; in schema 1 bound
/// to its key's tag and version only) is re-wrapped once when the engine opens it: every
/// key still decrypts, signs and gives the same public key, and the material is then
/// bound to the key's type and wrapped under its slot.
#[test]
fn stores_of_schemas_1_and_2_are_rewrapped_and_their_keys_still_work() {
    for schema in [1, 2] {
        an_old_store_is_rewrapped(schema);
    }
}

fn an_old_store_is_rewrapped(schema: u64) {
    let mut fx = Fx::new();
    fx.create("aes", KeyType::Aes256);
    let before = fx.enc("aes", b"kept").unwrap();
    fx.e().rotate(&fx.me, "aes").unwrap();
    fx.create_with("dedupe", KeyType::Aes256, |k| k.convergent = true);
    let deduped = fx
        .e()
        .encrypt(&fx.me, "dedupe", b"d", Some(b"c"))
        .wait()
        .unwrap();
    let mut public = Vec::new();
    for (name, t) in [("ecc", KeyType::Ecdsa), ("rsa", KeyType::Rsa2048)] {
        fx.create(name, t);
        public.push(fx.e().public_key(&fx.me, name, None).wait().unwrap());
    }
    let dir = fx.dir.path().to_path_buf();
    fx.engine.take().unwrap().close().close();

    let (root, _) = RootKey::load_or_create(&dir, None).unwrap();
    let rewrapped = back_to_schema(&dir, &root, schema);
    assert_eq!(rewrapped, 5, "aes v1 and v2, dedupe, ecc, rsa");
    let store = Store::open(&dir.join("kms.redb"), &root.fingerprint()).unwrap();
    assert_eq!(store.schema().unwrap(), schema);
    drop(store);
    let old_rows = stored_versions(&dir);

    for round in 0..2 {
        fx.engine = Some(open_with(&dir, fx.clock.clone(), EngineConfig::default()));
        assert_eq!(
            fx.e().store().schema().unwrap(),
            kmsd::store::SCHEMA_VERSION
        );
        // The upgraded store is a new file: no freed page keeps a version as the old
        // schema wrapped it (under the root key alone).
        let file = std::fs::read(dir.join("kms.redb")).unwrap();
        for (at, row) in &old_rows {
            assert!(
                !file.windows(row.len()).any(|w| w == row.as_slice()),
                "schema {schema}: {at:?} as the old schema stored it is still in the file"
            );
        }
        assert_eq!(fx.dec("aes", &before).unwrap(), b"kept", "round {round}");
        let again = fx
            .e()
            .encrypt(&fx.me, "dedupe", b"d", Some(b"c"))
            .wait()
            .unwrap();
        assert_eq!(again, deduped, "the convergent key is the same key");
        for (name, want) in ["ecc", "rsa"].into_iter().zip(&public) {
            assert_eq!(&fx.e().public_key(&fx.me, name, None).wait().unwrap(), want);
        }
        fx.e()
            .sign(&fx.me, "ecc", b"m", SignScheme::Pss)
            .wait()
            .unwrap();
        fx.engine.take().unwrap().close().close();
    }
}

/// An upgrade whose rewrite into a new file failed (here: its temporary file's name is
/// taken by a directory) is committed all the same, and the next start writes the store
/// afresh: until then the old wrapping may stay in freed pages, after it none does.
#[test]
fn an_upgrade_whose_rewrite_failed_is_rewritten_at_the_next_start() {
    let mut fx = Fx::new();
    fx.create("aes", KeyType::Aes256);
    let ct = fx.enc("aes", b"kept").unwrap();
    let dir = fx.dir.path().to_path_buf();
    fx.engine.take().unwrap().close().close();
    let (root, _) = RootKey::load_or_create(&dir, None).unwrap();
    back_to_schema(&dir, &root, 2);
    let old_rows = stored_versions(&dir);
    let blocker = dir.join("kms.redb.rewrite-tmp");
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("x"), b"x").unwrap();

    fx.engine = Some(open_with(&dir, fx.clock.clone(), EngineConfig::default()));
    assert_eq!(
        fx.e().store().schema().unwrap(),
        kmsd::store::SCHEMA_VERSION
    );
    assert_eq!(fx.dec("aes", &ct).unwrap(), b"kept");
    fx.engine.take().unwrap().close().close();
    // The upgrade is committed with the rewrite still to do, in the same file.
    let state = || {
        use std::os::unix::fs::MetadataExt as _;
        let inode = std::fs::metadata(dir.join("kms.redb")).unwrap().ino();
        let db = redb::Database::create(dir.join("kms.redb")).unwrap();
        let tx = db.begin_read().unwrap();
        let pending = tx
            .open_table(META)
            .unwrap()
            .get("rewrite_pending")
            .unwrap()
            .is_some();
        (inode, pending)
    };
    let (inode, pending) = state();
    assert!(pending, "the failed rewrite is not marked as still to do");

    std::fs::remove_dir_all(&blocker).unwrap();
    fx.engine = Some(open_with(&dir, fx.clock.clone(), EngineConfig::default()));
    assert_eq!(fx.dec("aes", &ct).unwrap(), b"kept");
    fx.engine.take().unwrap().close().close();
    let (new_inode, pending) = state();
    assert!(
        !pending && new_inode != inode,
        "the next start did not write the store afresh"
    );
    let file = std::fs::read(dir.join("kms.redb")).unwrap();
    for (at, row) in &old_rows {
        assert!(
            !file.windows(row.len()).any(|w| w == row.as_slice()),
            "{at:?}"
        );
    }
    assert!(!blocker.exists());
}

/// The stored versions, row by row, as bytes.
fn stored_versions(dir: &Path) -> Vec<((String, u32), Vec<u8>)> {
    let db = redb::Database::create(dir.join("kms.redb")).unwrap();
    let tx = db.begin_read().unwrap();
    tx.open_table(VERSIONS)
        .unwrap()
        .iter()
        .unwrap()
        .map(|row| {
            let (k, v) = row.unwrap();
            let (tag, version) = k.value();
            ((tag.to_string(), version), v.value().to_vec())
        })
        .collect()
}

/// A wrap that fails while a schema-1 store is re-wrapped (here: as if the random source
/// failed) fails the open and changes nothing: the store stays at schema 1 with every
/// version's material as it was, and the next open upgrades it, every key still working.
/// Skipping that version and writing schema 3 anyway (as for material that does not open)
/// would leave it under the root key alone, which a schema-3 store never reads: lost for
/// good.
#[test]
fn a_wrap_failing_during_the_schema_upgrade_fails_the_open_and_loses_nothing() {
    let mut fx = Fx::new();
    fx.create("aes", KeyType::Aes256);
    let first = fx.enc("aes", b"first").unwrap();
    fx.e().rotate(&fx.me, "aes").unwrap();
    let second = fx.enc("aes", b"second").unwrap();
    fx.create("ecc", KeyType::Ecdsa);
    let public = fx.e().public_key(&fx.me, "ecc", None).wait().unwrap();
    let dir = fx.dir.path().to_path_buf();
    fx.engine.take().unwrap().close().close();
    let (root, _) = RootKey::load_or_create(&dir, None).unwrap();
    assert_eq!(back_to_schema(&dir, &root, 1), 3, "aes v1 and v2, ecc");
    let before = stored_versions(&dir);

    // The second of the three re-wraps fails: one version is re-wrapped in the upgrade's
    // transaction before it, which must not be kept either.
    let store = Store::open(&dir.join("kms.redb"), &root.fingerprint()).unwrap();
    assert_eq!(store.schema().unwrap(), 1);
    root.fail_a_wrap(1);
    let err = match Engine::open(store, root, fx.clock.clone(), EngineConfig::default()) {
        Ok(e) => {
            let schema = e.store().schema().unwrap();
            e.close().close();
            panic!("the open succeeded though a re-wrap failed (store now at schema {schema})");
        }
        Err(e) => e,
    };
    match &err {
        EngineError::Store(e) => assert!(
            matches!(&**e, kmsd::store::StoreError::Upgrade(u) if u.from == 1 && u.to == 3),
            "{e}"
        ),
        other => panic!("not a store upgrade error: {other}"),
    }
    assert!(err.to_string().contains("re-wrapped"), "{err}");
    let (root, _) = RootKey::load_or_create(&dir, None).unwrap();
    let store = Store::open(&dir.join("kms.redb"), &root.fingerprint()).unwrap();
    assert_eq!(store.schema().unwrap(), 1, "nothing committed");
    drop(store);
    assert_eq!(
        stored_versions(&dir),
        before,
        "the wrapped material is unchanged"
    );

    // The next start, with a working random source, upgrades the store.
    for round in 0..2 {
        fx.engine = Some(open_with(&dir, fx.clock.clone(), EngineConfig::default()));
        assert_eq!(
            fx.e().store().schema().unwrap(),
            kmsd::store::SCHEMA_VERSION
        );
        assert_eq!(fx.dec("aes", &first).unwrap(), b"first", "round {round}");
        assert_eq!(fx.dec("aes", &second).unwrap(), b"second", "round {round}");
        assert_eq!(
            fx.e().public_key(&fx.me, "ecc", None).wait().unwrap(),
            public
        );
        fx.e()
            .sign(&fx.me, "ecc", b"m", SignScheme::Pss)
            .wait()
            .unwrap();
        fx.engine.take().unwrap().close().close();
    }
}

/// Wrapped material is bound to its key's type: an AES key relabelled ECDSA in the store
/// (by someone who can write the file but has no root key) does not open, rather than
/// serving its bytes as a P-256 scalar and publishing k·G.
#[test]
fn a_key_relabelled_in_the_store_does_not_open_as_another_type() {
    use kmsd::store::records::{KeyRecord, decode, encode_map};
    let mut fx = Fx::new();
    fx.create("aes", KeyType::Aes256);
    let dir = fx.dir.path().to_path_buf();
    fx.engine.take().unwrap().close().close();
    {
        let db = redb::Database::create(dir.join("kms.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut keys = tx.open_table(KEYS).unwrap();
            let (tag, mut rec) = {
                let row = keys.first().unwrap().unwrap();
                let rec: KeyRecord = decode(row.1.value()).unwrap();
                (row.0.value().to_string(), rec)
            };
            rec.key_type = KeyType::Ecdsa;
            keys.insert(tag.as_str(), encode_map(&rec).unwrap().as_slice())
                .unwrap();
        }
        tx.commit().unwrap();
    }
    fx.engine = Some(open_with(&dir, fx.clock.clone(), EngineConfig::default()));
    let got = fx.e().public_key(&fx.me, "aes", None).wait();
    assert_eq!(kind(got), ErrorKind::Internal);
    assert_eq!(
        kind(fx.e().sign(&fx.me, "aes", b"m", SignScheme::Pss).wait()),
        ErrorKind::Internal
    );
}

/// A grant records the uid (or gid) its name has when it is made; a grant stored before
/// kmsd recorded ids is bound to the name's id when the engine opens the store, once.
#[test]
fn grants_are_bound_to_the_id_of_their_name() {
    use kms_shared::model::{GrantInfo, NO_PRINCIPAL_ID, Principal, Role};
    use kms_shared::protocol::GrantSpec;
    let nobody = uzers::get_user_by_name("nobody").unwrap().uid();
    let mut fx = Fx::new();
    let spec = GrantSpec {
        role: Role::KeyReviewer,
        user: Some("nobody".into()),
        group: None,
        key: None,
    };
    let g = fx.e().grant(&fx.me, &spec).unwrap();
    assert_eq!(g.principal_id, Some(nobody));

    // A grant as a kmsd before ids left it in the store.
    let legacy = GrantInfo {
        id: 77,
        role: Role::KeyUser,
        principal: Principal::User("nobody".into()),
        key_tag: None,
        key_name: None,
        granted_at: T0,
        granted_by: "root".into(),
        principal_id: None,
    };
    let dir = fx.dir.path().to_path_buf();
    let store = fx.engine.take().unwrap().close();
    let writer = store.start_writer().unwrap();
    // And one whose name no account has now (deleted since): it must not go to whoever
    // is given the name next.
    let orphan = GrantInfo {
        id: 78,
        principal: Principal::User("gone-user-xyz".into()),
        ..legacy.clone()
    };
    writer
        .submit(vec![
            kmsd::store::Mutation::PutGrant(legacy),
            kmsd::store::Mutation::PutGrant(orphan),
        ])
        .wait()
        .unwrap();
    writer.shutdown();
    store.close();
    fx.engine = Some(open_with(&dir, fx.clock.clone(), EngineConfig::default()));
    let grants = fx.e().grants();
    let legacy = grants.iter().find(|g| g.id == 77).unwrap();
    assert_eq!(legacy.principal_id, Some(nobody), "bound at open");
    let orphan = grants.iter().find(|g| g.id == 78).unwrap();
    assert_eq!(
        orphan.principal_id,
        Some(NO_PRINCIPAL_ID),
        "bound to no one"
    );
    fx.engine.take().unwrap().close().close();
    let (root, _) = RootKey::load_or_create(&dir, None).unwrap();
    let stored = Store::open(&dir.join("kms.redb"), &root.fingerprint())
        .unwrap()
        .load()
        .unwrap()
        .grants;
    let ids: Vec<_> = stored.iter().map(|g| (g.id, g.principal_id)).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(
        ids.iter()
            .all(|(id, p)| *p == Some(if *id == 78 { NO_PRINCIPAL_ID } else { nobody })),
        "{ids:?}"
    );
}

fn scan_bounded_at(history_scan: usize) -> Fx {
    Fx::with_config(EngineConfig {
        history_scan,
        ..EngineConfig::default()
    })
}

fn encrypt_times(fx: &Fx, key: &str, n: usize) {
    for _ in 0..n {
        fx.enc(key, b"x").unwrap();
    }
}

/// A history query or an impact reads at most `history_scan` entries: one that would
/// have to read a long history (a filter that matches nothing old) stops there and says
/// where to go on, and going on from there finds what a full read would have found.
#[test]
fn history_scans_are_bounded_and_resumable() {
    let fx = scan_bounded_at(10);
    let e = fx.e();
    fx.create("scank", KeyType::Aes256);
    encrypt_times(&fx, "scank", 25);
    // The one `create` entry lies under 25 encryptions: three bounded reads away.
    let mut query = HistoryQuery {
        key: "scank".into(),
        action: Some(Action::Create),
        ..Default::default()
    };
    let mut pages = Vec::new();
    let found = loop {
        let page = e.history_page(&query).unwrap();
        pages.push(page.entries.len());
        match page.resume_before_seq {
            Some(seq) => query.before_seq = Some(seq),
            None => break page.entries,
        }
        assert!(pages.len() < 10, "no end: {pages:?}");
    };
    assert_eq!(pages, vec![0, 0, 1], "entries per bounded read");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].action, Action::Create);
    // A page filled before the bound ends without a resume point.
    let newest = e
        .history_page(&HistoryQuery {
            key: "scank".into(),
            limit: Some(5),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(newest.entries.len(), 5);
    assert_eq!(newest.resume_before_seq, None);
    // Impact counts the entries it read and says how far back that was.
    let impact = e.impact("scank", None).unwrap();
    assert_eq!(impact.recent_uses, 10);
    assert_eq!(impact.counted_back_to, Some(T0));
    // With the whole history under the bound, nothing is cut short.
    let fx = Fx::new();
    fx.create("fullk", KeyType::Aes256);
    encrypt_times(&fx, "fullk", 25);
    let impact = fx.e().impact("fullk", None).unwrap();
    assert_eq!((impact.recent_uses, impact.counted_back_to), (25, None));
    let page = fx
        .e()
        .history_page(&HistoryQuery {
            key: "fullk".into(),
            action: Some(Action::Create),
            ..Default::default()
        })
        .unwrap();
    assert_eq!((page.entries.len(), page.resume_before_seq), (1, None));
    // A window whose entries fill the bound exactly, with only older ones after them, was
    // counted whole: no resume point, no "counted back to".
    let fx = scan_bounded_at(10);
    fx.create("windowk", KeyType::Aes256);
    encrypt_times(&fx, "windowk", 5);
    fx.clock.advance(40 * DAY_MS);
    encrypt_times(&fx, "windowk", 10);
    let impact = fx.e().impact("windowk", None).unwrap();
    assert_eq!((impact.recent_uses, impact.counted_back_to), (10, None));
    let page = fx
        .e()
        .history_page(&HistoryQuery {
            key: "windowk".into(),
            since: Some(T0 + 30 * DAY_MS),
            ..Default::default()
        })
        .unwrap();
    assert_eq!((page.entries.len(), page.resume_before_seq), (10, None));
}

/// Two live keys carrying one name (a create answered with an error although it had
/// landed, then made again): at open, the name stays with the key the names table gave
/// it last, whatever order the key records are read in; the other is reachable by tag.
#[test]
fn a_name_two_keys_carry_stays_with_the_names_table() {
    use kmsd::store::records::{KeyRecord, decode, encode_map};
    const NAMES: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("names");
    // The key records are read in tag order: the names table gives the name to the first
    // read, then to the last.
    for holder_read_first in [true, false] {
        let mut fx = Fx::new();
        let a = fx.create("dup", KeyType::Aes256).tag;
        let b = fx.create("other", KeyType::Aes256).tag;
        let (first, second) = if a < b { (a, b) } else { (b, a) };
        let (holder, stray) = match holder_read_first {
            true => (first, second),
            false => (second, first),
        };
        let dir = fx.dir.path().to_path_buf();
        fx.engine.take().unwrap().close().close();
        {
            let db = redb::Database::create(dir.join("kms.redb")).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut keys = tx.open_table(KEYS).unwrap();
                for tag in [&holder, &stray] {
                    let mut rec: KeyRecord =
                        decode(keys.get(tag.as_str()).unwrap().unwrap().value()).unwrap();
                    rec.name = "dup".into();
                    keys.insert(tag.as_str(), encode_map(&rec).unwrap().as_slice())
                        .unwrap();
                }
                let mut names = tx.open_table(NAMES).unwrap();
                names.remove("other").unwrap();
                names.insert("dup", holder.as_str()).unwrap();
            }
            tx.commit().unwrap();
        }
        fx.engine = Some(open_with(&dir, fx.clock.clone(), EngineConfig::default()));
        let case = format!("holder read first: {holder_read_first}");
        assert_eq!(fx.e().get_key("dup").unwrap().tag, holder, "{case}");
        assert_eq!(fx.e().get_key(&stray).unwrap().name, "dup", "{case}");
        let (listed, total) = fx.e().list_keys(false, 0, None);
        assert_eq!(total, 1, "{case}");
        assert_eq!(listed[0].tag, holder, "{case}");
        // A change to the other key, by its tag, does not take the name back.
        fx.e().set_memo(&fx.me, &stray, "the stray one").unwrap();
        fx.e().request_deletion(&fx.me, &stray).unwrap();
        assert_eq!(fx.e().get_key("dup").unwrap().tag, holder, "{case}");
        assert_eq!(
            fx.e().get_key(&stray).unwrap().state,
            KeyState::PendingDeletion,
            "{case}"
        );
    }
}

/// A stop asked for during a scheduler pass ends it before the next task, and what is
/// left stays due for the next pass. A stop used to wait for the whole pass (thousands
/// of overdue rotations after a long downtime), past a service manager's stop timeout.
#[test]
fn a_pass_stops_before_the_next_task_when_asked() {
    let fx = Fx::new();
    for name in ["auto1", "auto2", "auto3"] {
        fx.create_with(name, KeyType::Aes256, |spec| {
            spec.auto_rotation = true;
            spec.rotation_days = Some(1);
        });
    }
    fx.clock.advance(2 * DAY_MS);
    let asked = std::sync::atomic::AtomicUsize::new(0);
    let stop_after_one = || asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 1;
    assert_eq!(fx.e().run_due_until(&stop_after_one), 1);
    assert_eq!(fx.e().run_due_until(&|| true), 0);
    assert_eq!(fx.e().run_due(), 2);
    for name in ["auto1", "auto2", "auto3"] {
        assert_eq!(fx.e().get_key(name).unwrap().current_version, 2, "{name}");
    }
}

/// A start with the wall clock behind (a machine without a real-time clock, before its
/// time is set) leaves rotation periods as they are: once the clock is right, no key
/// rotates early. The first pass used to take such a start for a clock set back, and
/// restart every period at the wrong "now", so every automatic key rotated a period
/// early after each such boot.
#[test]
fn a_start_with_the_clock_behind_restarts_no_period() {
    let mut fx = Fx::new();
    let tag = fx
        .create_with("boot", KeyType::Aes256, |s| {
            s.auto_rotation = true;
            s.rotation_days = Some(30);
        })
        .tag;
    let next = fx.e().get_key(&tag).unwrap().next_rotation_at;
    fx.clock.step(T0 - 200 * DAY_MS);
    fx.reopen();
    assert_eq!(fx.e().run_due(), 0);
    assert_eq!(fx.e().get_key(&tag).unwrap().next_rotation_at, next);
    fx.clock.step(T0 + DAY_MS);
    assert_eq!(fx.e().run_due(), 0, "rotated early");
    assert_eq!(fx.e().get_key(&tag).unwrap().current_version, 1);
    assert!(
        !history_page(fx.e(), &tag)
            .iter()
            .any(|h| h.action == Action::SetRotation)
    );
}
