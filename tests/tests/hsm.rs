//! The HSM protection levels end to end (SPEC §2, §5, §9): a real kmsd on real SoftHSM2
//! tokens through the real PKCS#11 module, driven by the client library and kmsctl, the
//! token inspected with pkcs11-tool and the store read back after the daemon stopped.

#![allow(clippy::unwrap_used)]

use base64::Engine as _;
use kms_e2e::softhsm::{self, SoftHsm, TokenInfo, parse_objects};
use kms_e2e::{DaemonOptions, TestDaemon, bin, json, ok};
use kms_shared::client::{Client, ClientError};
use kms_shared::model::{KeyInfo, KeyType, Protection, SignScheme};
use kms_shared::protocol::{CreateKey, ErrorKind};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const PIN: &str = "pin-7Xq93kZ";

fn spec(name: &str, t: KeyType, protection: Protection) -> CreateKey {
    CreateKey {
        name: name.into(),
        key_type: t,
        protection,
        convergent: false,
        auto_rotation: false,
        rotation_days: None,
        memo: String::new(),
        hsm: None,
    }
}

/// A daemon whose own token is a fresh SoftHSM2 token.
fn hsm_daemon() -> (SoftHsm, TokenInfo, TestDaemon) {
    let hsm = SoftHsm::new();
    let token = hsm.init_token("kms-daemon", PIN);
    let d = TestDaemon::start_with(hsm.daemon_options(&token));
    (hsm, token, d)
}

/// `call`'s result once it succeeds: it fails with `internal` while a token or its
/// library is away, and the library is re-initialised at most once a second (less often
/// while the token stays away), so it is tried for up to 20 s. `what` says what changed,
/// for the failure, which shows the daemon's log.
async fn until_recovered<T, F: std::future::Future<Output = Result<T, ClientError>>>(
    d: &TestDaemon,
    what: &str,
    mut call: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.kind(), Some(ErrorKind::Internal), "{e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("{what} but kmsd did not recover: {e}\n{}", d.log_text()),
        }
    }
}

fn kind_of<T: std::fmt::Debug>(r: Result<T, kms_shared::client::ClientError>) -> ErrorKind {
    r.unwrap_err().kind().unwrap()
}

fn message_of<T: std::fmt::Debug>(r: Result<T, kms_shared::client::ClientError>) -> String {
    match r.unwrap_err() {
        kms_shared::client::ClientError::Server(w) => w.message,
        other => panic!("not a daemon error: {other}"),
    }
}

fn fails(out: &Output, kind: ErrorKind) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(i32::from(kind.exit_code())),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains(&format!("error: {}: ", kind.as_str())),
        "{stderr}"
    );
    stderr
}

fn openssl(args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// The body of an `ncpkms:v{N}:` string.
fn body(s: &str) -> Vec<u8> {
    let b64 = s.trim().splitn(3, ':').nth(2).unwrap();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

/// Verifies a signature with openssl against the PEM the daemon exported.
fn openssl_verifies(dir: &Path, pem: &str, msg: &[u8], sig: &[u8], pss: bool) -> bool {
    let pem_path = dir.join("pub.pem");
    let sig_path = dir.join("sig.bin");
    std::fs::write(&pem_path, pem).unwrap();
    std::fs::write(&sig_path, sig).unwrap();
    let pem_s = pem_path.to_str().unwrap();
    let sig_s = sig_path.to_str().unwrap();
    let mut args = vec!["dgst", "-sha256", "-verify", pem_s, "-signature", sig_s];
    if pss {
        args.extend([
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:32",
        ]);
    }
    openssl(&args, msg).status.success()
}

/// RSA-OAEP SHA-256 encryption by openssl with the exported PEM.
fn openssl_oaep_encrypt(dir: &Path, pem: &str, pt: &[u8]) -> Vec<u8> {
    let pem_path = dir.join("rsa.pem");
    std::fs::write(&pem_path, pem).unwrap();
    let out = openssl(
        &[
            "pkeyutl",
            "-encrypt",
            "-pubin",
            "-inkey",
            pem_path.to_str().unwrap(),
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha256",
            "-pkeyopt",
            "rsa_mgf1_md:sha256",
        ],
        pt,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// One output of each operation of a key, to check again later.
struct Outputs {
    /// A ciphertext and its plaintext.
    ciphertext: Option<(String, Vec<u8>)>,
    signature: Option<String>,
    pem: Option<String>,
}

async fn use_key(c: &Client, k: &KeyInfo, msg: &[u8]) -> Outputs {
    match k.key_type {
        KeyType::Aes256 => {
            let ct = c.encrypt(&k.name, msg, None).await.unwrap();
            assert_eq!(c.decrypt(&k.name, &ct, None).await.unwrap(), msg);
            Outputs {
                ciphertext: Some((ct, msg.to_vec())),
                signature: None,
                pem: None,
            }
        }
        _ => {
            let sig = c.sign(&k.name, msg, SignScheme::Pss).await.unwrap();
            assert!(c.verify(&k.name, msg, &sig, SignScheme::Pss).await.unwrap());
            let ciphertext = if k.key_type == KeyType::Rsa2048 {
                let pt = &msg[..msg.len().min(190)];
                let ct = c.encrypt(&k.name, pt, None).await.unwrap();
                assert_eq!(c.decrypt(&k.name, &ct, None).await.unwrap(), pt);
                Some((ct, pt.to_vec()))
            } else {
                None
            };
            Outputs {
                ciphertext,
                signature: Some(sig),
                pem: Some(c.public_key(&k.name, None).await.unwrap().1),
            }
        }
    }
}

/// Checks outputs made earlier still decrypt/verify.
async fn still_works(c: &Client, name: &str, msg: &[u8], o: &Outputs) {
    if let Some((ct, pt)) = &o.ciphertext {
        assert_eq!(&c.decrypt(name, ct, None).await.unwrap(), pt, "{name}");
    }
    if let Some(sig) = &o.signature {
        assert!(
            c.verify(name, msg, sig, SignScheme::Pss).await.unwrap(),
            "{name}"
        );
    }
}

/// All three types at `hsm`: create, use, nine rotations, every old version still works,
/// the eleventh version is refused with version-limit, and outputs interoperate with
/// OpenSSL exactly as basic keys' do (DER ECDSA, PSS salt 32, PKCS#1 v1.5, OAEP SHA-256).
#[tokio::test(flavor = "multi_thread")]
async fn hsm_keys_work_rotate_and_stop_at_ten_versions() {
    let (_hsm, _token, d) = hsm_daemon();
    let c = d.client().await;
    let tmp = tempfile::tempdir().unwrap();
    let msg = vec![0x42u8; 300];
    for (name, t) in [
        ("h-aes", KeyType::Aes256),
        ("h-ec", KeyType::Ecdsa),
        ("h-rsa", KeyType::Rsa2048),
    ] {
        let k = c.create_key(spec(name, t, Protection::Hsm)).await.unwrap();
        assert_eq!(k.protection, Protection::Hsm);
        assert_eq!(k.current_version, 1);
        let first = use_key(&c, &k, &msg).await;
        if let Some(pem) = &first.pem {
            assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
            let sig = body(first.signature.as_ref().unwrap());
            if t == KeyType::Ecdsa {
                assert_eq!(sig[0], 0x30, "ECDSA signatures are DER");
            } else {
                assert_eq!(sig.len(), 256);
            }
            assert!(openssl_verifies(
                tmp.path(),
                pem,
                &msg,
                &sig,
                t == KeyType::Rsa2048
            ));
        }
        if t == KeyType::Rsa2048 {
            let pem = first.pem.as_ref().unwrap();
            let pkcs1 = c.sign(name, &msg, SignScheme::Pkcs1).await.unwrap();
            assert!(
                c.verify(name, &msg, &pkcs1, SignScheme::Pkcs1)
                    .await
                    .unwrap()
            );
            assert!(!c.verify(name, &msg, &pkcs1, SignScheme::Pss).await.unwrap());
            assert!(openssl_verifies(
                tmp.path(),
                pem,
                &msg,
                &body(&pkcs1),
                false
            ));
            let ct = openssl_oaep_encrypt(tmp.path(), pem, b"from openssl");
            let wire = format!(
                "ncpkms:v1:{}",
                base64::engine::general_purpose::STANDARD.encode(&ct)
            );
            assert_eq!(c.decrypt(name, &wire, None).await.unwrap(), b"from openssl");
            let mut bad = ct.clone();
            bad[100] ^= 1;
            let wire = format!(
                "ncpkms:v1:{}",
                base64::engine::general_purpose::STANDARD.encode(&bad)
            );
            assert_eq!(
                kind_of(c.decrypt(name, &wire, None).await),
                ErrorKind::DecryptFailed
            );
        }
        if t == KeyType::Aes256 {
            // Tampering and a wrong context fail as for basic keys.
            let (ct, _) = first.ciphertext.as_ref().unwrap();
            let mut b = body(ct);
            b[20] ^= 1;
            let bad = format!(
                "ncpkms:v1:{}",
                base64::engine::general_purpose::STANDARD.encode(&b)
            );
            assert_eq!(
                kind_of(c.decrypt(name, &bad, None).await),
                ErrorKind::DecryptFailed
            );
            let with_ctx = c.encrypt(name, b"x", Some(b"ctx")).await.unwrap();
            assert_eq!(
                kind_of(c.decrypt(name, &with_ctx, Some(b"other")).await),
                ErrorKind::DecryptFailed
            );
            assert_eq!(
                c.decrypt(name, &with_ctx, Some(b"ctx")).await.unwrap(),
                b"x"
            );
            let (dk_ct, dk) = c.data_key(name, 256, true, None).await.unwrap();
            assert_eq!(c.decrypt(name, &dk_ct, None).await.unwrap(), dk.unwrap());
        }
        let mut outputs = vec![first];
        for v in 2..=10 {
            let k = c.rotate(name).await.unwrap();
            assert_eq!(k.current_version, v);
            outputs.push(use_key(&c, &k, &msg).await);
        }
        for (i, o) in outputs.iter().enumerate() {
            still_works(&c, name, &msg, o).await;
            if let Some((ct, _)) = &o.ciphertext {
                assert!(ct.starts_with(&format!("ncpkms:v{}:", i + 1)), "{ct}");
            }
        }
        // Every version has its own key pair.
        let pems: std::collections::HashSet<_> =
            outputs.iter().filter_map(|o| o.pem.clone()).collect();
        assert!(pems.is_empty() || pems.len() == 10);
        let limit = c.rotate(name).await;
        assert_eq!(kind_of(limit), ErrorKind::VersionLimit);
        assert_eq!(c.get_key(name).await.unwrap().current_version, 10);
    }
}

/// Token objects are sensitive and never extractable, the redb file keeps only references
/// (no key material), and a purge destroys every object of the key in the token.
#[tokio::test(flavor = "multi_thread")]
async fn hsm_objects_stay_in_the_token_and_purge_destroys_them() {
    let (hsm, token, mut d) = hsm_daemon();
    let c = d.client().await;
    let mut keys = Vec::new();
    for (name, t) in [
        ("o-aes", KeyType::Aes256),
        ("o-ec", KeyType::Ecdsa),
        ("o-rsa", KeyType::Rsa2048),
    ] {
        c.create_key(spec(name, t, Protection::Hsm)).await.unwrap();
        let k = c.rotate(name).await.unwrap();
        keys.push(k);
    }
    // A basic key beside them: its versions are wrapped material, not references.
    c.create_key(spec("o-basic", KeyType::Aes256, Protection::Basic))
        .await
        .unwrap();

    let objects = parse_objects(&hsm.list_objects(&token));
    for k in &keys {
        let mine: Vec<_> = objects
            .iter()
            .filter(|o| o.label.starts_with(&format!("kms-{}-v", k.tag)))
            .collect();
        let per_version = if k.key_type == KeyType::Aes256 { 1 } else { 2 };
        assert_eq!(mine.len(), 2 * per_version, "{}: {objects:?}", k.name);
        for o in mine.iter().filter(|o| !o.class.starts_with("Public")) {
            let flags: Vec<&str> = o.access.split(", ").collect();
            assert!(flags.contains(&"sensitive"), "{o:?}");
            assert!(flags.contains(&"never extractable"), "{o:?}");
            assert!(!flags.contains(&"extractable"), "{o:?}");
        }
    }
    let pems: Vec<String> = {
        let mut v = Vec::new();
        for k in keys.iter().filter(|k| k.key_type != KeyType::Aes256) {
            for version in 1..=2 {
                v.push(c.public_key(&k.name, Some(version)).await.unwrap().1);
            }
        }
        v
    };

    // The store, read back with the daemon stopped: every hsm version is a short
    // reference to its token objects, and no public half of those keys (which every
    // private-key encoding carries) is anywhere in the file.
    drop(c);
    d.stop();
    let store_path = d.data_dir.join("kms.redb");
    let raw = std::fs::read(&store_path).unwrap();
    for pem in &pems {
        let der = base64::engine::general_purpose::STANDARD
            .decode(
                pem.lines()
                    .filter(|l| !l.starts_with("-----"))
                    .collect::<String>(),
            )
            .unwrap();
        let public_half = &der[der.len() - 64..];
        assert!(
            !raw.windows(public_half.len()).any(|w| w == public_half),
            "public key bytes found in the store"
        );
    }
    {
        let (root, _) = kmsd::crypto::RootKey::load_or_create(&d.data_dir, None).unwrap();
        let copy = d.dir.path().join("copy.redb");
        std::fs::copy(&store_path, &copy).unwrap();
        let store = kmsd::store::Store::open(&copy, &root.fingerprint()).unwrap();
        let snap = store.load().unwrap();
        for k in &keys {
            let versions = store.versions(&k.tag).unwrap();
            assert_eq!(versions.len(), 2);
            for v in versions {
                let wrapped = v.record.wrapped.as_ref().unwrap();
                let r = kmsd::hsm::HsmRef::decode(wrapped).expect("an HSM reference");
                // The tag and version, then 8 random bytes of this generation.
                assert_eq!(r.id.len(), 28);
                assert_eq!(r.id[..20], kmsd::hsm::object_id(&k.tag, v.version));
                assert_eq!(r.token, token.label);
                assert!(wrapped.len() < 64, "{} bytes", wrapped.len());
            }
        }
        let basic = snap.keys.iter().find(|k| k.name == "o-basic").unwrap();
        let v1 = &store.versions(&basic.tag).unwrap()[0];
        assert!(kmsd::hsm::HsmRef::decode(v1.record.wrapped.as_ref().unwrap()).is_none());
    }

    d.restart_with(hsm.daemon_options(&token));
    let c = d.client().await;
    for k in &keys {
        c.request_deletion(&k.name).await.unwrap();
        let purged = c.delete_now(&k.tag).await.unwrap();
        assert_eq!(purged.state, kms_shared::model::KeyState::Deleted);
    }
    let after = parse_objects(&hsm.list_objects(&token));
    for k in &keys {
        assert!(
            !after.iter().any(|o| o.label.contains(&k.tag)),
            "objects of {} survived the purge: {after:?}",
            k.name
        );
    }
    assert!(after.is_empty(), "{after:?}");
}

/// After a restart the daemon finds every version's objects again by CKA_ID: old outputs
/// still decrypt and verify, public keys are unchanged, new operations work.
#[tokio::test(flavor = "multi_thread")]
async fn restart_finds_hsm_objects_again() {
    let (hsm, token, mut d) = hsm_daemon();
    let c = d.client().await;
    let msg = b"survives a restart".to_vec();
    let mut before = Vec::new();
    for (name, t) in [
        ("r-aes", KeyType::Aes256),
        ("r-ec", KeyType::Ecdsa),
        ("r-rsa", KeyType::Rsa2048),
    ] {
        let k = c.create_key(spec(name, t, Protection::Hsm)).await.unwrap();
        before.push((name, use_key(&c, &k, &msg).await));
    }
    drop(c);
    d.restart_with(hsm.daemon_options(&token));
    let c = d.client().await;
    for (name, o) in &before {
        still_works(&c, name, &msg, o).await;
        if let Some(pem) = &o.pem {
            assert_eq!(&c.public_key(name, None).await.unwrap().1, pem);
        }
        let k = c.get_key(name).await.unwrap();
        use_key(&c, &k, &msg).await;
    }
}

/// A store restored from a backup shares the token with the store it came from. When it
/// rotates a key to a version number the other store already has, it must make objects of
/// its own: with ids fixed by tag and version it destroyed the other store's objects of
/// that version (generation replaces objects with its id), and what was encrypted under
/// them could never be decrypted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_store_never_destroys_the_other_stores_objects() {
    let (hsm, token, a) = hsm_daemon();
    let c = a.client().await;
    c.create_key(spec("shared", KeyType::Aes256, Protection::Hsm))
        .await
        .unwrap();
    let backup = a.dir.path().join("backup.redb");
    ok(&a.kmsctl(&["backup", backup.to_str().unwrap()], b""));
    c.rotate("shared").await.unwrap();
    let under_v2 = c
        .encrypt("shared", b"made by A under v2", None)
        .await
        .unwrap();
    assert!(under_v2.starts_with("ncpkms:v2:"), "{under_v2}");

    // B: the backup restored into a fresh directory with A's root key, on the same token.
    let b_dir = tempfile::tempdir().unwrap();
    let b_data = b_dir.path().join("data");
    std::fs::create_dir(&b_data).unwrap();
    std::fs::copy(a.data_dir.join("root.key"), b_data.join("root.key")).unwrap();
    let out = Command::new(bin("kmsd"))
        .arg("restore")
        .arg(&backup)
        .arg("--data-dir")
        .arg(&b_data)
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The restore says what a backup of HSM keys cannot bring back.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("1 key(s) keep their material in an HSM token"),
        "{said}"
    );
    let b = TestDaemon::start_with(DaemonOptions {
        data_dir: Some(b_data),
        ..hsm.daemon_options(&token)
    });
    let cb = b.client().await;
    assert_eq!(cb.get_key("shared").await.unwrap().current_version, 1);
    cb.rotate("shared").await.unwrap();
    let b_v2 = cb.encrypt("shared", b"made by B", None).await.unwrap();
    assert_eq!(
        &cb.decrypt("shared", &b_v2, None).await.unwrap()[..],
        b"made by B"
    );

    // A's version 2 is A's still.
    assert_eq!(
        &c.decrypt("shared", &under_v2, None).await.unwrap()[..],
        b"made by A under v2"
    );
    assert_eq!(
        kind_of(c.decrypt("shared", &b_v2, None).await),
        ErrorKind::DecryptFailed
    );
}

/// A dedicated token end to end with kmsctl: register a second SoftHSM2 token, create keys
/// on it with --hsm, use them, objects live on that token only, removing it is refused
/// while keys live there, then allowed once they are purged.
#[test]
fn dedicated_hsm_on_a_second_token_with_kmsctl() {
    let (hsm, daemon_token, d) = hsm_daemon();
    let second = hsm.init_token("tenant-b", "pin-b-4471");
    let pin_file = second.pin_file.to_str().unwrap();

    // A wrong PIN is refused before anything is stored, and the PIN is not echoed.
    let wrong = hsm.dir.path().join("wrong.pin");
    std::fs::write(&wrong, "0000-not-it\n").unwrap();
    let err = fails(
        &d.kmsctl(
            &[
                "hsm",
                "add",
                "vault-b",
                "--module",
                softhsm::MODULE,
                "--token",
                "tenant-b",
                "--pin-file",
                wrong.to_str().unwrap(),
            ],
            b"",
        ),
        ErrorKind::InvalidArgument,
    );
    assert!(
        err.contains("tenant-b") && !err.contains("0000-not-it"),
        "{err}"
    );
    // An unknown label, and the daemon's own token, are refused too.
    fails(
        &d.kmsctl(
            &[
                "hsm",
                "add",
                "vault-x",
                "--module",
                softhsm::MODULE,
                "--token",
                "nope",
                "--pin-file",
                pin_file,
            ],
            b"",
        ),
        ErrorKind::InvalidArgument,
    );
    fails(
        &d.kmsctl(
            &[
                "hsm",
                "add",
                "vault-d",
                "--module",
                softhsm::MODULE,
                "--token",
                &daemon_token.label,
                "--pin-file",
                daemon_token.pin_file.to_str().unwrap(),
            ],
            b"",
        ),
        ErrorKind::InvalidArgument,
    );

    let added = json(&d.kmsctl(
        &[
            "--json",
            "hsm",
            "add",
            "vault-b",
            "--module",
            softhsm::MODULE,
            "--token",
            "tenant-b",
            "--pin-file",
            pin_file,
        ],
        b"",
    ));
    assert_eq!(added["name"], "vault-b");
    assert_eq!(added["token"], "tenant-b");
    assert_eq!(added["pin_file"], pin_file);
    fails(
        &d.kmsctl(
            &[
                "hsm",
                "add",
                "vault-b",
                "--module",
                softhsm::MODULE,
                "--token",
                "tenant-b",
                "--pin-file",
                pin_file,
            ],
            b"",
        ),
        ErrorKind::AlreadyExists,
    );

    // Creation needs a registered token name.
    fails(
        &d.kmsctl(
            &[
                "create",
                "d-none",
                "--type",
                "aes256",
                "--protection",
                "dedicated-hsm",
            ],
            b"",
        ),
        ErrorKind::InvalidArgument,
    );
    fails(
        &d.kmsctl(
            &[
                "create",
                "d-none",
                "--type",
                "aes256",
                "--protection",
                "dedicated-hsm",
                "--hsm",
                "vault-z",
            ],
            b"",
        ),
        ErrorKind::NotFound,
    );
    let aes = json(&d.kmsctl(
        &[
            "--json",
            "create",
            "d-aes",
            "--type",
            "aes256",
            "--protection",
            "dedicated-hsm",
            "--hsm",
            "vault-b",
        ],
        b"",
    ));
    assert_eq!(aes["protection"], "dedicated-hsm");
    assert_eq!(aes["hsm"], "vault-b");
    let ec = json(&d.kmsctl(
        &[
            "--json",
            "create",
            "d-ec",
            "--type",
            "ecdsa",
            "--protection",
            "dedicated-hsm",
            "--hsm",
            "vault-b",
        ],
        b"",
    ));
    let ct = ok(&d.kmsctl(&["encrypt", "d-aes"], b"tenant secret"));
    assert!(ct.starts_with("ncpkms:v1:"), "{ct}");
    assert_eq!(
        ok(&d.kmsctl(&["decrypt", "d-aes"], ct.trim().as_bytes())),
        "tenant secret"
    );
    let sig = ok(&d.kmsctl(&["sign", "d-ec"], b"artifact"));
    assert_eq!(
        d.kmsctl(&["verify", "d-ec", "--signature", sig.trim()], b"artifact")
            .status
            .code(),
        Some(0)
    );
    ok(&d.kmsctl(&["rotate", "d-aes"], b""));
    assert_eq!(
        ok(&d.kmsctl(&["decrypt", "d-aes"], ct.trim().as_bytes())),
        "tenant secret"
    );

    // The objects are on tenant-b, none on the daemon's token.
    let on_b = parse_objects(&hsm.list_objects(&second));
    for tag in [aes["tag"].as_str().unwrap(), ec["tag"].as_str().unwrap()] {
        assert!(on_b.iter().any(|o| o.label.contains(tag)), "{on_b:?}");
    }
    assert_eq!(on_b.len(), 2 + 2, "{on_b:?}");
    assert!(parse_objects(&hsm.list_objects(&daemon_token)).is_empty());

    let list = json(&d.kmsctl(&["--json", "hsm", "list"], b""));
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["keys"], 2);
    let table = ok(&d.kmsctl(&["hsm", "list"], b""));
    assert!(
        table.contains("vault-b") && table.contains("tenant-b"),
        "{table}"
    );

    let err = fails(
        &d.kmsctl(&["hsm", "remove", "vault-b"], b""),
        ErrorKind::InvalidState,
    );
    assert!(err.contains("d-aes") && err.contains("d-ec"), "{err}");
    for k in ["d-aes", "d-ec"] {
        ok(&d.kmsctl(&["delete", k], b""));
        ok(&d.kmsctl(&["delete-now", k, "--yes"], b""));
    }
    assert!(parse_objects(&hsm.list_objects(&second)).is_empty());
    let removed = json(&d.kmsctl(&["--json", "hsm", "remove", "vault-b"], b""));
    assert_eq!(removed["name"], "vault-b");
    assert_eq!(
        json(&d.kmsctl(&["--json", "hsm", "list"], b"")),
        serde_json::json!([])
    );
    fails(
        &d.kmsctl(&["hsm", "remove", "vault-b"], b""),
        ErrorKind::NotFound,
    );
}

/// `hsm` keys are refused with a clear invalid-argument error when no token is configured;
/// with one, convergent HSM keys and misplaced token names are refused too.
#[tokio::test(flavor = "multi_thread")]
async fn hsm_refusals() {
    let d = TestDaemon::start();
    let c = d.client().await;
    let r = c
        .create_key(spec("no-token", KeyType::Aes256, Protection::Hsm))
        .await;
    let m = message_of(r);
    assert!(
        m.contains("needs a PKCS#11 token and none is configured"),
        "{m}"
    );
    let out = d.kmsctl(
        &[
            "create",
            "no-token",
            "--type",
            "ecdsa",
            "--protection",
            "hsm",
        ],
        b"",
    );
    fails(&out, ErrorKind::InvalidArgument);
    drop(c);
    drop(d);

    let (hsm, _token, d) = hsm_daemon();
    let c = d.client().await;
    let mut conv = spec("conv", KeyType::Aes256, Protection::Hsm);
    conv.convergent = true;
    let m = message_of(c.create_key(conv).await);
    assert!(m.contains("convergent"), "{m}");
    let mut named = spec("named", KeyType::Aes256, Protection::Hsm);
    named.hsm = Some("vault".into());
    assert_eq!(
        kind_of(c.create_key(named).await),
        ErrorKind::InvalidArgument
    );
    let mut basic = spec("named", KeyType::Aes256, Protection::Basic);
    basic.hsm = Some("vault".into());
    assert_eq!(
        kind_of(c.create_key(basic).await),
        ErrorKind::InvalidArgument
    );

    // A FIFO as a registered token's PIN file is refused at once: opened blocking, it held
    // the registration (and every lifecycle change behind its lock) until someone wrote
    // to it.
    let second = hsm.init_token("kms-fifo", PIN);
    let fifo = hsm.dir.path().join("pin.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let fifo = fifo.display().to_string();
    let add = c.hsm_add("fifo", softhsm::MODULE, &second.label, &fifo);
    let r = tokio::time::timeout(Duration::from_secs(20), add)
        .await
        .expect("hsm_add hangs on a FIFO PIN file");
    let m = message_of(r);
    assert!(m.contains("not a regular file"), "{m}");
    c.create_key(spec("after-fifo", KeyType::Aes256, Protection::Basic))
        .await
        .unwrap();
}

/// A token that goes away gives internal errors naming it (never the PIN), a purge then is
/// refused rather than forgetting objects it could not destroy, and everything works
/// again once the token is back, without restarting the daemon.
#[tokio::test(flavor = "multi_thread")]
async fn token_that_goes_away_fails_clearly_and_recovers() {
    let (hsm, token, d) = hsm_daemon();
    let c = d.client().await;
    c.create_key(spec("g-aes", KeyType::Aes256, Protection::Hsm))
        .await
        .unwrap();
    c.create_key(spec("g-ec", KeyType::Ecdsa, Protection::Hsm))
        .await
        .unwrap();
    let ct = c.encrypt("g-aes", b"before", None).await.unwrap();
    c.request_deletion("g-ec").await.unwrap();

    // SoftHSM2 keeps each token in a directory: moving it away removes the token.
    let dirs: Vec<_> = std::fs::read_dir(hsm.token_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1);
    let away = hsm.dir.path().join("away");
    std::fs::rename(&dirs[0], &away).unwrap();

    let err = c.decrypt("g-aes", &ct, None).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::Internal), "{err}");
    let m = err.to_string();
    assert!(m.contains(&token.label), "{m}");
    assert!(!m.contains(PIN), "{m}");
    let purge = c.delete_now("g-ec").await;
    assert_eq!(kind_of(purge), ErrorKind::Internal);
    assert_eq!(
        c.get_key("g-ec").await.unwrap().state,
        kms_shared::model::KeyState::PendingDeletion
    );

    std::fs::rename(&away, &dirs[0]).unwrap();
    let pt = until_recovered(&d, "the token came back", || c.decrypt("g-aes", &ct, None)).await;
    assert_eq!(pt, b"before");
    let again = c.encrypt("g-aes", b"after", None).await.unwrap();
    assert_eq!(c.decrypt("g-aes", &again, None).await.unwrap(), b"after");
    c.delete_now("g-ec").await.unwrap();
    let left = parse_objects(&hsm.list_objects(&token));
    assert_eq!(left.len(), 1, "only g-aes's secret key remains: {left:?}");
    assert!(
        !d.log_text().contains(PIN),
        "the PIN is in the daemon's log"
    );
}

/// A PKCS#11 library that loads but does not initialise (SoftHSM2 without its token
/// directory: a volume not mounted yet) does not stop kmsd: basic keys are served, hsm
/// calls fail with `internal` naming the token, and once the library can start they
/// work, without a restart. Before, kmsd exited 1 ("cannot load the PKCS#11 module"), and
/// the unit's `Restart=on-failure` kept every key down (found by a helper).
#[tokio::test(flavor = "multi_thread")]
async fn a_library_that_does_not_start_yet_does_not_stop_kmsd() {
    let hsm = SoftHsm::new();
    let token = hsm.init_token("kms-late", PIN);
    let away = hsm.dir.path().join("tokens-away");
    std::fs::rename(hsm.token_dir(), &away).unwrap();
    let d = TestDaemon::start_with(hsm.daemon_options(&token));
    let c = d.client().await;
    c.create_key(spec("late-basic", KeyType::Aes256, Protection::Basic))
        .await
        .unwrap();
    let refused = c
        .create_key(spec("late-hsm", KeyType::Aes256, Protection::Hsm))
        .await;
    let m = message_of(refused);
    assert!(m.contains(&token.label), "{m}");
    assert!(
        d.log_text().contains("did not initialise"),
        "{}",
        d.log_text()
    );

    std::fs::rename(&away, hsm.token_dir()).unwrap();
    let key = until_recovered(&d, "the library can start now", || {
        c.create_key(spec("late-hsm", KeyType::Aes256, Protection::Hsm))
    })
    .await;
    let ct = c.encrypt(&key.tag, b"late", None).await.unwrap();
    assert_eq!(&*c.decrypt(&key.tag, &ct, None).await.unwrap(), b"late");
    assert!(
        !d.log_text().contains(PIN),
        "the PIN is in the daemon's log"
    );
}

/// A PIN file other accounts may read is used, and said to be so (it was accepted
/// silently; found by a helper).
#[tokio::test(flavor = "multi_thread")]
async fn a_pin_file_open_to_others_is_said_to_be() {
    use std::os::unix::fs::PermissionsExt;
    let hsm = SoftHsm::new();
    let token = hsm.init_token("kms-open", PIN);
    std::fs::set_permissions(&token.pin_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let d = TestDaemon::start_with(hsm.daemon_options(&token));
    let c = d.client().await;
    c.create_key(spec("open-hsm", KeyType::Aes256, Protection::Hsm))
        .await
        .unwrap();
    let log = d.log_text();
    assert!(log.contains("open to other accounts"), "{log}");
    assert!(log.contains("mode=644"), "{log}");
}

/// A PIN refused by one token is presented to another token with the same label, once:
/// an impostor (or a re-initialised token) that refused it must not lock kmsd out of the
/// real token when it is back. Before, kmsd presented no PIN until the PIN file held
/// another one or it restarted (the refusal was remembered per PIN; found by a helper).
/// The token that refused it is still never asked again (the other tests).
#[tokio::test(flavor = "multi_thread")]
async fn a_pin_refused_by_an_impostor_is_presented_to_the_real_token() {
    let hsm = SoftHsm::new();
    let token = hsm.init_token("kms-swap", PIN);
    let d = TestDaemon::start_with(hsm.daemon_options(&token));
    let c = d.client().await;
    c.create_key(spec("swap-aes", KeyType::Aes256, Protection::Hsm))
        .await
        .unwrap();
    let ct = c.encrypt("swap-aes", b"real", None).await.unwrap();

    // The real token away; an impostor with its label and another PIN in its place.
    let real: Vec<_> = std::fs::read_dir(hsm.token_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(real.len(), 1);
    let away = hsm.dir.path().join("away");
    std::fs::rename(&real[0], &away).unwrap();
    let pin_file = std::fs::read(&token.pin_file).unwrap();
    hsm.init_token("kms-swap", "0000-impostor");
    // The daemon's PIN file is the real token's still.
    std::fs::write(&token.pin_file, &pin_file).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = message_of(c.decrypt("swap-aes", &ct, None).await);
        if m.contains("refused the PIN") || m.contains("CKR_PIN_INCORRECT") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the impostor was never asked: {m}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The impostor gone, the real token back: the same PIN is presented to it.
    for dir in std::fs::read_dir(hsm.token_dir()).unwrap() {
        std::fs::remove_dir_all(dir.unwrap().path()).unwrap();
    }
    std::fs::rename(&away, &real[0]).unwrap();
    let pt = until_recovered(&d, "the real token is back", || {
        c.decrypt("swap-aes", &ct, None)
    })
    .await;
    assert_eq!(&*pt, b"real");
    assert!(
        !d.log_text().contains(PIN),
        "the PIN is in the daemon's log"
    );
}

/// The daemon's token can come from the config file with the PIN from the systemd
/// credential kms-pkcs11-pin. A wrong PIN does not stop kmsd: it presents it once, says
/// so naming the token but not the PIN, serves basic keys, and refuses hsm calls at once
/// without presenting the PIN again. Before, it exited (78); under socket activation the
/// client waiting in the backlog started it again at once, and every start presented the
/// refused PIN once more, up to systemd's start limit: enough to lock many tokens.
#[tokio::test(flavor = "multi_thread")]
async fn pin_from_credential_and_wrong_pin() {
    let hsm = SoftHsm::new();
    let token = hsm.init_token("kms-cred", PIN);
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("kms-pkcs11-pin"), format!("{PIN}\n")).unwrap();
    let config = format!(
        "pkcs11_module = \"{}\"\npkcs11_token = \"{}\"\n",
        softhsm::MODULE,
        token.label
    );
    let mut env = hsm.env();
    env.push((
        "CREDENTIALS_DIRECTORY".into(),
        creds.path().display().to_string(),
    ));
    let mut d = TestDaemon::start_with(DaemonOptions {
        config: Some(config.clone()),
        env: env.clone(),
        ..DaemonOptions::default()
    });
    let c = d.client().await;
    let k = c
        .create_key(spec("cred-ec", KeyType::Ecdsa, Protection::Hsm))
        .await
        .unwrap();
    use_key(&c, &k, b"m").await;
    drop(c);

    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.pin");
    std::fs::write(&wrong, "9999-wrong\n").unwrap();
    d.restart_with(DaemonOptions {
        extra_args: vec![
            "--pkcs11-module".into(),
            softhsm::MODULE.into(),
            "--pkcs11-token".into(),
            token.label.clone(),
            "--pkcs11-pin-file".into(),
            wrong.display().to_string(),
        ],
        env: hsm.env(),
        ..DaemonOptions::default()
    });
    let c = d.client().await;
    let basic = c
        .create_key(spec("cred-aes", KeyType::Aes256, Protection::Basic))
        .await
        .unwrap();
    use_key(&c, &basic, b"m").await;
    for _ in 0..3 {
        let m = message_of(c.sign("cred-ec", b"m", SignScheme::default()).await);
        assert!(m.contains("kms-cred") && m.contains("PIN"), "{m}");
        assert!(!m.contains("9999-wrong"), "{m}");
    }
    let log = d.log_text();
    let presented = log.matches("the token refused the PIN").count();
    assert_eq!(
        presented, 1,
        "the refused PIN was presented {presented} times"
    );
    assert!(!log.contains("9999-wrong") && !log.contains(PIN), "{log}");
}

/// A PIN the token refused is presented once, not on every call, new session or
/// reconnection (tokens that count failed logins lock the PIN after a few): later calls
/// fail at once saying so, and once the PIN file holds another PIN the next call
/// presents it and works, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_pin_is_presented_once_until_the_pin_file_changes() {
    let hsm = SoftHsm::new();
    let daemon_token = hsm.init_token("kms-daemon", PIN);
    let vault = hsm.init_token("kms-vault", PIN);
    let mut d = TestDaemon::start_with(hsm.daemon_options(&daemon_token));
    let c = d.client().await;
    c.hsm_add(
        "vault",
        softhsm::MODULE,
        &vault.label,
        &vault.pin_file.display().to_string(),
    )
    .await
    .unwrap();
    let mut dk = spec("pin-dk", KeyType::Aes256, Protection::DedicatedHsm);
    dk.hsm = Some("vault".into());
    c.create_key(dk).await.unwrap();
    let ct = c.encrypt("pin-dk", b"behind a pin", None).await.unwrap();
    drop(c);

    // The PIN file now holds a wrong PIN; the dedicated token opens on first use.
    std::fs::write(&vault.pin_file, "0000-wrong\n").unwrap();
    d.restart_with(hsm.daemon_options(&daemon_token));
    let c = d.client().await;
    for _ in 0..5 {
        let m = message_of(c.decrypt("pin-dk", &ct, None).await);
        assert!(
            m.contains("kms-vault") && m.contains("does not present it again"),
            "{m}"
        );
        assert!(!m.contains("0000-wrong") && !m.contains(PIN), "{m}");
    }
    let presented = d.log_text().matches("the token refused the PIN").count();
    assert_eq!(
        presented, 1,
        "the refused PIN was presented {presented} times"
    );

    std::fs::write(&vault.pin_file, format!("{PIN}\n")).unwrap();
    assert_eq!(
        c.decrypt("pin-dk", &ct, None).await.unwrap(),
        b"behind a pin"
    );
    assert!(
        !d.log_text().contains(PIN),
        "the PIN is in the daemon's log"
    );
}

/// kmsd reads a dedicated token's PIN file with its own rights. A manager who is not root
/// or kmsd's account (`kmstest`, created by .ci/install-deps, granted manager on all keys)
/// may register a token only with a PIN file of their own: a root-owned file holding the
/// right PIN and kmsd's root key are refused alike, naming neither content nor whether
/// the file exists; the same PIN in a file the manager owns is accepted.
#[test]
fn a_manager_registers_a_token_only_with_their_own_pin_file() {
    const OTHER: &str = "kmstest";
    let hsm = SoftHsm::new();
    let token = hsm.init_token("kms-daemon", PIN);
    let mut options = hsm.daemon_options(&token);
    options
        .extra_args
        .extend(["--socket-group".to_string(), "kmsclients".to_string()]);
    let d = TestDaemon::start_with(options);
    // The temporary directories are 0700; let the other account traverse to the socket.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    ok(&d.kmsctl(&["grant", "manager", "--user", OTHER], b""));
    let second = hsm.init_token("tenant-c", "pin-c-9182");
    let add = |pin_file: &std::path::Path| {
        d.kmsctl_as(
            OTHER,
            &[
                "hsm",
                "add",
                "vault-c",
                "--module",
                softhsm::MODULE,
                "--token",
                "tenant-c",
                "--pin-file",
                pin_file.to_str().unwrap(),
            ],
            b"",
        )
    };

    let root_key = d.data_dir.join("root.key");
    assert!(root_key.exists(), "the test expects kmsd's root key there");
    let mut refusals = Vec::new();
    for file in [
        &second.pin_file,
        &root_key,
        &d.data_dir.join("no-such-file"),
    ] {
        let err = fails(&add(file), ErrorKind::InvalidArgument);
        assert!(err.contains("owned by uid"), "{err}");
        assert!(!err.contains("pin-c-9182"), "{err}");
        refusals.push(err.replace(file.to_str().unwrap(), "PATH"));
    }
    assert!(refusals.iter().all(|r| *r == refusals[0]), "{refusals:?}");

    let theirs = d.dir.path().join("tenant-c.pin");
    std::fs::copy(&second.pin_file, &theirs).unwrap();
    let uid = Command::new("id").args(["-u", OTHER]).output().unwrap();
    let uid: u32 = String::from_utf8(uid.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::os::unix::fs::chown(&theirs, Some(uid), None).unwrap();
    let added = ok(&add(&theirs));
    assert!(added.contains("vault-c"), "{added}");
}
