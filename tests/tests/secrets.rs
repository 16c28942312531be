//! No plaintext key byte on disk, in the logs or in an error (SPEC §9). A full scenario
//! runs against a real kmsd logging at debug level; then the material of every version
//! is unwrapped with the store's own root key (the test's hook: the wrapped rows in the
//! store and `RootKey::unwrap`, nothing reachable over IPC) and searched for — raw, hex
//! and base64 — in the redb file, a backup, every file of the data directory, the
//! daemon's log and every error message the scenario got back. That the daemon is not
//! dumpable is `process_hardening` in systemd.rs.

#![allow(clippy::unwrap_used)]

use base64::Engine as _;
use kms_e2e::{DaemonOptions, TestDaemon};
use kms_shared::model::{KeyType, SignScheme};
use kms_shared::protocol::{CiphertextItem, CreateKey, PlaintextItem};
use kmsd::crypto::RootKey;
use kmsd::store::Store;
use std::collections::HashSet;

const WINDOW: usize = 16;

fn spec(name: &str, key_type: KeyType, convergent: bool) -> CreateKey {
    CreateKey {
        name: name.into(),
        key_type,
        protection: Default::default(),
        convergent,
        auto_rotation: false,
        rotation_days: None,
        memo: "secrets".into(),
        hsm: None,
    }
}

/// Every 16-byte window of a haystack, for fast lookups.
fn windows(hay: &[u8]) -> HashSet<[u8; WINDOW]> {
    hay.windows(WINDOW).map(|w| w.try_into().unwrap()).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where any 16-byte piece of `secret` (raw, hex in either case, or the whole secret in
/// base64) appears in the haystacks; `None` if nowhere.
fn find(
    secret: &[u8],
    binary: &[(String, HashSet<[u8; WINDOW]>)],
    text: &[(String, String)],
) -> Option<String> {
    for piece in secret.windows(WINDOW).step_by(4) {
        let piece: [u8; WINDOW] = piece.try_into().unwrap();
        for (name, set) in binary {
            if set.contains(&piece) {
                return Some(format!("raw bytes in {name}"));
            }
        }
        let h = hex(&piece);
        for (name, t) in text {
            let lower = t.to_lowercase();
            if lower.contains(&h) {
                return Some(format!("hex in {name}"));
            }
        }
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
    let b64 = &b64[..b64.len().min(24)];
    for (name, t) in text {
        if t.contains(b64) {
            return Some(format!("base64 in {name}"));
        }
    }
    None
}

/// A full scenario (every key type, contexts, batches, re-encryption, data keys,
/// signatures, rotation, version and key state changes, a dozen kinds of refusal, a
/// backup): no byte of any version's key material is in the store file, the backup, the
/// data directory, the debug log or any error message; the search finds a planted one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_material_in_store_logs_or_errors() {
    let mut d = TestDaemon::start_with(DaemonOptions {
        env: vec![("KMS_LOG".into(), "debug".into())],
        ..DaemonOptions::default()
    });
    let c = d.client().await;
    let mut errors: Vec<String> = Vec::new();
    let mut fail = |r: Result<(), kms_shared::client::ClientError>| match r {
        Ok(()) => panic!("a call that must fail succeeded"),
        Err(e) => errors.push(e.to_string()),
    };
    c.create_key(spec("sec-aes", KeyType::Aes256, false))
        .await
        .unwrap();
    c.create_key(spec("sec-conv", KeyType::Aes256, true))
        .await
        .unwrap();
    c.create_key(spec("sec-ec", KeyType::Ecdsa, false))
        .await
        .unwrap();
    c.create_key(spec("sec-rsa", KeyType::Rsa2048, false))
        .await
        .unwrap();

    let ct = c.encrypt("sec-aes", b"plain", Some(b"ctx")).await.unwrap();
    c.decrypt("sec-aes", &ct, Some(b"ctx")).await.unwrap();
    let conv = c.encrypt("sec-conv", b"plain", Some(b"ctx")).await.unwrap();
    let items = vec![
        PlaintextItem {
            plaintext: (b"a".to_vec()).into(),
            context: None,
        },
        PlaintextItem {
            plaintext: (b"b".to_vec()).into(),
            context: Some(b"c".to_vec()),
        },
    ];
    c.encrypt_batch("sec-aes", items).await.unwrap();
    c.rotate("sec-aes").await.unwrap();
    let re = c.reencrypt("sec-aes", &ct, Some(b"ctx")).await.unwrap();
    c.decrypt_batch(
        "sec-aes",
        vec![
            CiphertextItem {
                ciphertext: re.clone(),
                context: Some(b"ctx".to_vec()),
            },
            CiphertextItem {
                ciphertext: "ncpkms:v1:AAAA".into(),
                context: None,
            },
        ],
    )
    .await
    .unwrap();
    c.data_key("sec-aes", 256, true, None).await.unwrap();
    let rsa_ct = c.encrypt("sec-rsa", b"plain", None).await.unwrap();
    c.decrypt("sec-rsa", &rsa_ct, None).await.unwrap();
    for (key, scheme) in [
        ("sec-ec", SignScheme::Pss),
        ("sec-rsa", SignScheme::Pss),
        ("sec-rsa", SignScheme::Pkcs1),
    ] {
        let sig = c.sign(key, b"msg", scheme).await.unwrap();
        assert!(c.verify(key, b"msg", &sig, scheme).await.unwrap());
        assert!(!c.verify(key, b"other", &sig, scheme).await.unwrap());
        c.public_key(key, None).await.unwrap();
    }

    // Refusals of every kind the scenario can provoke.
    let tampered = ct.replacen("ncpkms:v1:", "ncpkms:v2:", 1);
    fail(
        c.decrypt("sec-aes", &tampered, Some(b"ctx"))
            .await
            .map(|_| ()),
    );
    fail(c.decrypt("sec-aes", &ct, Some(b"other")).await.map(|_| ()));
    fail(c.decrypt("sec-conv", &conv, None).await.map(|_| ()));
    fail(c.decrypt("sec-aes", "garbage", None).await.map(|_| ()));
    fail(
        c.encrypt("sec-aes", &vec![0u8; 40_000], None)
            .await
            .map(|_| ()),
    );
    fail(c.sign("sec-aes", b"m", SignScheme::Pss).await.map(|_| ()));
    fail(c.encrypt("sec-ec", b"m", None).await.map(|_| ()));
    fail(
        c.verify("sec-ec", b"m", "ncpkms:v1:!!", SignScheme::Pss)
            .await
            .map(|_| ()),
    );
    fail(c.encrypt("nope", b"m", None).await.map(|_| ()));
    fail(c.data_key("sec-aes", 100, true, None).await.map(|_| ()));
    c.disable_version("sec-aes", 1).await.unwrap();
    fail(c.decrypt("sec-aes", &ct, Some(b"ctx")).await.map(|_| ()));
    c.disable("sec-rsa").await.unwrap();
    fail(c.decrypt("sec-rsa", &rsa_ct, None).await.map(|_| ()));
    fail(
        c.create_key(spec("sec-aes", KeyType::Aes256, false))
            .await
            .map(|_| ()),
    );
    c.enable("sec-rsa").await.unwrap();
    c.request_deletion("sec-ec").await.unwrap();
    fail(c.sign("sec-ec", b"m", SignScheme::Pss).await.map(|_| ()));
    drop(c);
    let backup = d.dir.path().join("backup.redb");
    let out = d.kmsctl(&["backup", backup.to_str().unwrap()], b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.stop(), Some(0));
    assert!(errors.len() >= 14, "{errors:?}");

    // The material of every version, unwrapped with the store's root key.
    let secrets: Vec<(String, Vec<u8>)> = stored_material(&d.data_dir)
        .into_iter()
        .map(|(key, version, secret)| (format!("{} v{version}", key.tag), secret.to_vec()))
        .collect();
    assert_eq!(secrets.len(), 5, "4 keys, one rotated");

    // Where it must not be.
    let mut binary = Vec::new();
    for entry in std::fs::read_dir(&d.data_dir).unwrap() {
        let p = entry.unwrap().path();
        binary.push((
            p.display().to_string(),
            windows(&std::fs::read(&p).unwrap()),
        ));
    }
    binary.push((
        "the backup".into(),
        windows(&std::fs::read(&backup).unwrap()),
    ));
    let log = d.log_text();
    assert!(
        log.contains("DEBUG"),
        "the daemon did not log at debug level"
    );
    binary.push(("the log".into(), windows(log.as_bytes())));
    let all_errors = errors.join("\n");
    binary.push(("the errors".into(), windows(all_errors.as_bytes())));
    let text = vec![
        ("the log".to_string(), log.clone()),
        ("the errors".to_string(), all_errors),
    ];

    for (what, secret) in &secrets {
        assert!(secret.len() >= 32, "{what}");
        assert_eq!(
            find(secret, &binary, &text),
            None,
            "material of {what} leaked"
        );
    }

    // The search can fail: a planted piece is found, raw and hex.
    let (_, planted) = &secrets[0];
    let with_raw = vec![(
        "planted".to_string(),
        windows(&[b"xx".as_slice(), planted, b"yy"].concat()),
    )];
    assert!(find(planted, &with_raw, &[]).is_some());
    let with_hex = vec![(
        "planted".to_string(),
        format!("key={}", hex(planted).to_uppercase()),
    )];
    assert!(find(planted, &[], &with_hex).is_some());
    println!(
        "{} versions' material searched in {} files, {} log bytes, {} error messages: none found",
        secrets.len(),
        binary.len() - 2,
        log.len(),
        errors.len()
    );
}

/// The readable and writable memory of process `pid` (heap, stacks, anonymous maps), or
/// `None` if this process may not read it (not root: kmsd is not dumpable).
fn writable_memory(pid: u32) -> Option<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut all = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut region = vec![0u8; (end - start) as usize];
        // Guard pages and the like refuse a read; they hold nothing.
        if mem.seek(SeekFrom::Start(start)).is_ok() && mem.read_exact(&mut region).is_ok() {
            all.extend_from_slice(&region);
        }
    }
    Some(all)
}

/// kmsd's writable memory, read before it is stopped (once `c` is closed), or `None`
/// (said on stderr) where this process may not read it; `key`, a key's name, must be in
/// it, as in any keyring (so that what was read is kmsd's).
fn memory_then_stop(
    d: &mut TestDaemon,
    c: kms_shared::client::Client,
    key: &str,
) -> Option<Vec<u8>> {
    let memory = writable_memory(d.pid().unwrap());
    drop(c);
    assert_eq!(d.stop(), Some(0));
    let Some(memory) = memory else {
        eprintln!("cannot read kmsd's memory (not root?): not checked");
        return None;
    };
    assert!(memchr::memmem::find(&memory, key.as_bytes()).is_some());
    Some(memory)
}

/// Waits until kmsd has closed every connection but `c`'s (so their read buffers are
/// wiped); calls still finishing have let go by then too.
async fn until_only_connection(c: &kms_shared::client::Client) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while c.status().await.unwrap().connections > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection stays open"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The indexes of the `secrets` of which either 16-byte half is somewhere in `memory`:
/// either half, because freeing a small buffer writes the allocator's links over its
/// first 16 bytes.
fn found_in<S: AsRef<[u8]>>(memory: &[u8], secrets: impl IntoIterator<Item = S>) -> Vec<usize> {
    secrets
        .into_iter()
        .enumerate()
        .filter(|(_, secret)| {
            secret
                .as_ref()
                .chunks(16)
                .any(|half| memchr::memmem::find(memory, half).is_some())
        })
        .map(|(i, _)| i)
        .collect()
}

/// Data keys and plaintexts leave no copy in kmsd's memory once answered (SPEC §9: key
/// material is zeroized when dropped). kmsd generates 64 data keys and returns them in
/// plaintext, and decrypts each one's wrapped copy (so each also travels in a
/// `plaintext` reply); another connection encrypts 64 plaintexts and closes; then every
/// writable page of kmsd (heap, thread stacks) is searched for either half of any of
/// them. Replies carry them as `Secret`s, wiped when dropped, encoded into
/// frames that are wiped as they grow and once written, and the cipher's stack is
/// overwritten after each call. Without `Secret`'s wipe 5 of 64 keys were found (freed
/// reply buffers); without the stack wipe, the last two (tokio worker stacks); with
/// tokio's `BufReader` on the socket instead of `WipingBufReader`, the last plaintext
/// (its freed read buffer). Needs
/// root to read a non-dumpable process's memory; says so and passes otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_keys_leave_no_copy_in_daemon_memory() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.create_key(spec("mem-aes", KeyType::Aes256, false))
        .await
        .unwrap();
    let mut keys = Vec::new();
    for _ in 0..64 {
        let (wrapped, plaintext) = c.data_key("mem-aes", 256, true, None).await.unwrap();
        let plaintext = plaintext.unwrap();
        let again = c.decrypt("mem-aes", &wrapped, None).await.unwrap();
        assert_eq!(again, plaintext);
        keys.push(plaintext.to_vec());
    }
    // Request plaintexts, on a connection of their own that is closed before the search
    // (an open connection's read buffer holds its latest requests).
    let plaintexts: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| k.iter().map(|b| b ^ 0x5a).collect())
        .collect();
    let other = d.client().await;
    for pt in &plaintexts {
        other.encrypt("mem-aes", pt, None).await.unwrap();
    }
    drop(other);
    until_only_connection(&c).await;
    let pid = d.pid().unwrap();
    let Some(memory) = writable_memory(pid) else {
        eprintln!("cannot read kmsd's memory (not root?): not checked");
        return;
    };
    assert!(memory.len() > 1 << 20, "read {} bytes", memory.len());
    // The memory read is kmsd's: the key's name is in its keyring.
    assert!(memchr::memmem::find(&memory, b"mem-aes").is_some());
    let found = found_in(&memory, keys.iter().chain(&plaintexts));
    assert!(
        found.is_empty(),
        "{} of 128 secrets are still in kmsd's memory: {found:?} (0-63 data keys, 64-127 plaintexts)",
        found.len()
    );
}

/// The nonce of an ECDSA signature (and its inverse) is the private key to anyone who
/// also has the signature: d = (s·k − z) / r. Neither may stay in kmsd's memory once the
/// signature is answered, or the key outlives its deletion there. Likewise RSA-OAEP
/// plaintexts, encrypted and decrypted on the crypto pool. kmsd signs 64 messages with a
/// P-256 key and encrypts and decrypts 64 random 32-byte plaintexts with an RSA key; the
/// connection closes; every writable page of kmsd is searched for either half of every
/// nonce k, −k, k⁻¹ (big- and little-endian: p256 keeps scalars as little-endian limbs)
/// and every plaintext. The nonces are recomputed from the signatures and the key's
/// material, read from the store after kmsd stops, and checked against each signature's
/// r. Needs root, like the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_nonces_and_rsa_plaintexts_leave_no_copy_in_daemon_memory() {
    use p256::elliptic_curve::ops::Reduce;
    use p256::elliptic_curve::point::AffineCoordinates;
    use p256::{FieldBytes, ProjectivePoint, Scalar};
    use sha2::Digest;

    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.create_key(spec("mem-ec", KeyType::Ecdsa, false))
        .await
        .unwrap();
    c.create_key(spec("mem-rsa", KeyType::Rsa2048, false))
        .await
        .unwrap();
    let other = d.client().await;
    let mut random = vec![0u8; 64 * 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").unwrap(),
        &mut random,
    )
    .unwrap();
    let plaintexts: Vec<Vec<u8>> = random.chunks(32).map(<[u8]>::to_vec).collect();
    for pt in &plaintexts {
        let ct = other.encrypt("mem-rsa", pt, None).await.unwrap();
        assert_eq!(*other.decrypt("mem-rsa", &ct, None).await.unwrap(), **pt);
    }
    // Signatures last: nothing else runs on the pool after them.
    let mut signed = Vec::new();
    for i in 0..64 {
        let message = format!("message {i} to sign").into_bytes();
        let signature = other
            .sign("mem-ec", &message, SignScheme::Pss)
            .await
            .unwrap();
        signed.push((message, signature));
    }
    drop(other);
    until_only_connection(&c).await;
    let Some(memory) = memory_then_stop(&mut d, c, "mem-ec") else {
        return;
    };

    // The signing key, from the store.
    let (_, _, secret) = stored_material(&d.data_dir)
        .into_iter()
        .find(|(k, v, _)| k.name == "mem-ec" && *v == 1)
        .unwrap();
    let private = p256::ecdsa::SigningKey::from_slice(&secret).unwrap();
    let d_scalar: Scalar = **private.as_nonzero_scalar();

    let mut needles: Vec<Vec<u8>> = Vec::new();
    for (message, signature) in &signed {
        let (_, der) = kms_shared::ciphertext::parse(signature).unwrap();
        let sig = p256::ecdsa::Signature::from_der(&der).unwrap();
        let (r, s): (Scalar, Scalar) = (*sig.r(), *sig.s());
        let z = <Scalar as Reduce<FieldBytes>>::reduce(&sha2::Sha256::digest(message));
        let s_inv = Option::<Scalar>::from(s.invert()).unwrap();
        let k = s_inv * (z + r * d_scalar);
        // The recomputed nonce is the signature's: x(k·G) mod n = r.
        let x = (ProjectivePoint::GENERATOR * k).to_affine().x();
        assert_eq!(<Scalar as Reduce<FieldBytes>>::reduce(&x), r);
        let k_inv = Option::<Scalar>::from(k.invert()).unwrap();
        for value in [k, -k, k_inv] {
            let be = value.to_bytes().to_vec();
            let le: Vec<u8> = be.iter().rev().copied().collect();
            needles.push(be);
            needles.push(le);
        }
    }
    // Six needles per signature.
    let nonces_found: std::collections::BTreeSet<usize> = found_in(&memory, &needles)
        .into_iter()
        .map(|i| i / 6)
        .collect();
    let plaintexts_found = found_in(&memory, &plaintexts);
    assert!(
        nonces_found.is_empty() && plaintexts_found.is_empty(),
        "still in kmsd's memory: the nonces of signatures {nonces_found:?}, RSA plaintexts {plaintexts_found:?}"
    );
}

/// Keys purged leave no copy of their material in kmsd's memory (SPEC §9; README: a
/// purge destroys material "beyond recovery"). kmsd loads the material of AES and ECDSA
/// keys it did not make (created before a restart), makes more (rotations), uses every
/// version, and purges the keys; then every writable page of kmsd is searched for either
/// half of each version's material (an AES key's first two round keys are the key
/// itself, so copies of the cipher count too; P-256 scalars are searched for in both byte
/// orders). Material used to be made and unwrapped on tokio's threads and moved by value
/// from frame to frame, and the stacks of those threads were never wiped: a helper found
/// both halves of a purged AES key in 3 of 5 runs of the release build (and copies of
/// stale stack bytes in freed store-writer buffers), whole keys in the debug build. Needs
/// root, like the tests above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_keys_leave_no_copy_in_daemon_memory() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    for (name, t) in [("gone-aes", KeyType::Aes256), ("gone-ec", KeyType::Ecdsa)] {
        c.create_key(spec(name, t, false)).await.unwrap();
    }
    drop(c);
    // Loaded from the store by the next daemon, not made by it.
    d.restart_with(DaemonOptions::default());
    let c = d.client().await;
    let other = d.client().await;
    let old = other.encrypt("gone-aes", b"before", None).await.unwrap();
    other.sign("gone-ec", b"m", SignScheme::Pss).await.unwrap();
    for key in ["gone-aes", "gone-ec"] {
        c.rotate(key).await.unwrap();
    }
    assert_eq!(
        &*other.decrypt("gone-aes", &old, None).await.unwrap(),
        b"before"
    );
    other.encrypt("gone-aes", b"after", None).await.unwrap();
    other.sign("gone-ec", b"m", SignScheme::Pss).await.unwrap();
    drop(other);
    until_only_connection(&c).await;
    // Nothing writes the store now: a copy of its files reads as the store after a crash.
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&d.data_dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
        }
    }
    let material: Vec<(String, u32, Vec<u8>)> = stored_material(copy.path())
        .into_iter()
        .map(|(k, v, secret)| (k.name, v, secret))
        .collect();
    assert_eq!(material.len(), 4, "two versions of two keys");
    for key in ["gone-aes", "gone-ec"] {
        c.request_deletion(key).await.unwrap();
        c.delete_now(key).await.unwrap();
    }
    let Some(memory) = memory_then_stop(&mut d, c, "gone-ec") else {
        return;
    };
    let mut needles = Vec::new();
    for (name, version, secret) in &material {
        needles.push((format!("{name} v{version}"), secret.clone()));
        if name == "gone-ec" {
            let le: Vec<u8> = secret.iter().rev().copied().collect();
            needles.push((format!("{name} v{version}, little-endian"), le));
        }
    }
    let found: Vec<&String> = found_in(&memory, needles.iter().map(|(_, s)| s))
        .into_iter()
        .map(|i| &needles[i].0)
        .collect();
    assert!(
        found.is_empty(),
        "purged material still in kmsd's memory: {found:?}"
    );
}

/// Every version's material in the closed store of `data_dir`, unwrapped as kmsd does:
/// under the root key and the key's slot secret.
fn stored_material(
    data_dir: &std::path::Path,
) -> Vec<(kmsd::store::records::KeyRecord, u32, Vec<u8>)> {
    use kmsd::store::key_slots::{self, KeySlots};
    let (root, _) = RootKey::load_or_create(data_dir, None).unwrap();
    let path = data_dir.join("kms.redb");
    let store = Store::open(&path, &root.fingerprint()).unwrap();
    let keys = store.load().unwrap().keys;
    let referenced = keys
        .iter()
        .filter_map(|k| k.slot.map(|s| (s, k.tag.clone())))
        .collect();
    let known: Vec<&str> = keys.iter().map(|k| k.tag.as_str()).collect();
    let (slots, _) = KeySlots::open(&key_slots::path_for(&path), &referenced, &known).unwrap();
    let mut out = Vec::new();
    for key in keys {
        let slot_secret = slots.read(key.slot.unwrap(), &key.tag).unwrap();
        let wrapper = root.key_wrapper(&slot_secret, &key.tag);
        for v in store.versions(&key.tag).unwrap() {
            let aad = kmsd::engine::wrap_aad(&key.tag, v.version, key.key_type);
            let secret = wrapper
                .unwrap(&aad, v.record.wrapped.as_ref().unwrap())
                .unwrap();
            out.push((key.clone(), v.version, secret.to_vec()));
        }
    }
    out
}
