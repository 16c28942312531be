//! End to end: the real kmsd binary on a temporary socket, driven by the real kmsctl
//! binary and the client library (SPEC §1, §3–§5, §10, §11, §14).

#![allow(clippy::unwrap_used)]

use kms_e2e::{DaemonOptions, TestDaemon, json, ok};
use kms_shared::model::{Action, KeyState, SignScheme};
use kms_shared::protocol::{ErrorKind, HistoryQuery};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

/// Runs kmsctl expecting an error of `kind`; checks stderr format and exit code.
fn fails(d: &TestDaemon, args: &[&str], stdin: &[u8], kind: ErrorKind) {
    let out = d.kmsctl(args, stdin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(i32::from(kind.exit_code())),
        "{args:?}: stderr {stderr}"
    );
    // Warnings (the impact of a disable or delete) may come first; the error is a line.
    let prefix = format!("error: {}: ", kind.as_str());
    assert!(
        stderr.lines().any(|l| l.starts_with(&prefix)),
        "{args:?}: stderr {stderr}"
    );
}

/// The seed's scenario with kmsctl: create each type, use it, rotate, re-encrypt,
/// disable/enable, request deletion, cancel, delete now, list --deleted.
#[test]
fn seed_scenario_with_kmsctl() {
    let d = TestDaemon::start();
    for (name, t) in [
        ("app-aes", "aes256"),
        ("app-ec", "ecdsa"),
        ("app-rsa", "rsa2048"),
    ] {
        let k = json(&d.kmsctl(
            &["--json", "create", name, "--type", t, "--memo", "seed"],
            b"",
        ));
        assert_eq!(k["state"], "enabled");
        assert_eq!(k["type"], t);
        assert_eq!(k["current_version"], 1);
        for field in [
            "name",
            "tag",
            "type",
            "protection",
            "state",
            "convergent",
            "current_version",
            "auto_rotation",
            "rotation_days",
            "next_rotation_at",
            "usage_count",
            "last_used_at",
            "created_at",
            "deletion_due_at",
            "memo",
        ] {
            assert!(k.get(field).is_some(), "missing {field}");
        }
    }
    // Binary-safe encrypt/decrypt through stdin/stdout.
    let secret: Vec<u8> = (0..=255u8).chain([0, 10, 13]).collect();
    let ct1 = ok(&d.kmsctl(&["encrypt", "app-aes"], &secret));
    assert!(ct1.starts_with("ncpkms:v1:") && ct1.ends_with('\n'));
    let out = d.kmsctl(&["decrypt", "app-aes"], ct1.as_bytes());
    assert!(out.status.success());
    assert_eq!(out.stdout, secret);

    let rsa_ct = ok(&d.kmsctl(&["encrypt", "app-rsa"], b"short secret"));
    assert_eq!(
        d.kmsctl(&["decrypt", "app-rsa"], rsa_ct.as_bytes()).stdout,
        b"short secret"
    );
    for key in ["app-ec", "app-rsa"] {
        let sig = ok(&d.kmsctl(&["sign", key], b"release.tar.gz"));
        let sig = sig.trim();
        assert!(
            d.kmsctl(&["verify", key, "--signature", sig], b"release.tar.gz")
                .status
                .success()
        );
        let bad = d.kmsctl(&["verify", key, "--signature", sig], b"tampered");
        assert_eq!(bad.status.code(), Some(1));
        assert!(ok(&d.kmsctl(&["public-key", key], b"")).starts_with("-----BEGIN PUBLIC KEY-----"));
    }

    // Rotate: old ciphertexts still decrypt; re-encrypt moves them to v2.
    let k = json(&d.kmsctl(&["--json", "rotate", "app-aes"], b""));
    assert_eq!(k["current_version"], 2);
    assert_eq!(
        d.kmsctl(&["decrypt", "app-aes"], ct1.as_bytes()).stdout,
        secret
    );
    let ct2 = ok(&d.kmsctl(&["reencrypt", "app-aes"], ct1.as_bytes()));
    assert!(ct2.starts_with("ncpkms:v2:"));
    assert_eq!(
        d.kmsctl(&["decrypt", "app-aes"], ct2.as_bytes()).stdout,
        secret
    );
    let versions = json(&d.kmsctl(&["--json", "versions", "app-aes"], b""));
    assert_eq!(versions.as_array().unwrap().len(), 2);

    // Disable → crypto refused; enable → works again.
    ok(&d.kmsctl(&["disable", "app-aes"], b""));
    fails(&d, &["encrypt", "app-aes"], b"x", ErrorKind::InvalidState);
    ok(&d.kmsctl(&["enable", "app-aes"], b""));
    ok(&d.kmsctl(&["encrypt", "app-aes"], b"x"));

    // Request deletion → everything but cancel refused; cancel → disabled.
    let k = json(&d.kmsctl(&["--json", "delete", "app-aes"], b""));
    assert_eq!(k["state"], "pending-deletion");
    assert!(k["deletion_due_at"].is_string());
    fails(&d, &["encrypt", "app-aes"], b"x", ErrorKind::InvalidState);
    fails(&d, &["rotate", "app-aes"], b"", ErrorKind::InvalidState);
    fails(&d, &["enable", "app-aes"], b"", ErrorKind::InvalidState);
    fails(&d, &["disable", "app-aes"], b"", ErrorKind::InvalidState);
    let k = json(&d.kmsctl(&["--json", "cancel-deletion", "app-aes"], b""));
    assert_eq!(k["state"], "disabled");

    // Delete now needs --yes; then the key is purged and listed only with --deleted.
    ok(&d.kmsctl(&["delete", "app-aes"], b""));
    assert_eq!(
        d.kmsctl(&["delete-now", "app-aes"], b"").status.code(),
        Some(2)
    );
    let k = json(&d.kmsctl(&["--json", "delete-now", "app-aes", "--yes"], b""));
    assert_eq!(k["state"], "deleted");
    let live = json(&d.kmsctl(&["--json", "list"], b""));
    assert!(
        !live
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["name"] == "app-aes")
    );
    let all = json(&d.kmsctl(&["--json", "list", "--deleted"], b""));
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|k| k["name"] == "app-aes" && k["state"] == "deleted")
    );

    // History of the RSA key with kmsctl's JSON fields.
    let hist = json(&d.kmsctl(&["--json", "history", "app-rsa"], b""));
    let first = &hist.as_array().unwrap()[0];
    for field in [
        "time", "action", "version", "result", "account", "uid", "pid", "client",
    ] {
        assert!(first.get(field).is_some(), "history lacks {field}");
    }
    assert_eq!(first["client"], "kmsctl");
}

/// `kmsctl history` cut at its limit says so on stderr, with the `--before` that shows the
/// next page back; paging so walks the whole history, each entry once, and the last page
/// says nothing. (It stopped at 100 entries in silence, with no way to the next page
/// but a larger `--limit`.)
#[test]
fn history_pages_back_with_before() {
    let d = TestDaemon::start();
    ok(&d.kmsctl(&["create", "paged", "--type", "aes256"], b""));
    for _ in 0..4 {
        ok(&d.kmsctl(&["encrypt", "paged"], b"x"));
    }
    let mut seen: Vec<u64> = Vec::new();
    let mut before: Option<String> = None;
    for page in 0.. {
        assert!(page < 5, "paging never ended: {seen:?}");
        let mut args = vec!["--json", "history", "paged", "--limit", "2"];
        if let Some(b) = &before {
            args.extend(["--before", b.as_str()]);
        }
        let out = d.kmsctl(&args, b"");
        let rows = json(&out);
        let seqs: Vec<u64> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        seen.extend(&seqs);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        match stderr.split("--before ").nth(1) {
            Some(rest) => {
                let next = rest.split_whitespace().next().unwrap().to_string();
                assert_eq!(next, seqs.last().unwrap().to_string(), "{stderr}");
                assert_eq!(seqs.len(), 2, "{stderr}");
                before = Some(next);
            }
            None => {
                assert!(stderr.is_empty(), "{stderr}");
                break;
            }
        }
    }
    // One create and four encryptions, newest first, each once.
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "{seen:?}");
    // A history that fits its limit says nothing more.
    let whole = d.kmsctl(&["history", "paged", "--limit", "5"], b"");
    assert!(whole.status.success());
    assert!(
        whole.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&whole.stderr)
    );
}

/// `disable` and `delete` warn that a key is in use before they act, and only when the
/// action applies: a second `disable` is refused without a warning first.
#[test]
fn impact_warnings_only_before_actions_that_apply() {
    let d = TestDaemon::start();
    ok(&d.kmsctl(&["create", "inuse", "--type", "aes256"], b""));
    ok(&d.kmsctl(&["encrypt", "inuse"], b"x"));
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let first = d.kmsctl(&["disable", "inuse"], b"");
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(
        stderr(&first).starts_with("warning: inuse was used 1 times"),
        "{}",
        stderr(&first)
    );
    let again = d.kmsctl(&["disable", "inuse"], b"");
    assert!(!again.status.success());
    assert!(
        stderr(&again).starts_with("error: invalid-state"),
        "{}",
        stderr(&again)
    );
    let delete = d.kmsctl(&["delete", "inuse"], b"");
    assert!(
        stderr(&delete).starts_with("warning: "),
        "{}",
        stderr(&delete)
    );
    let again = d.kmsctl(&["delete", "inuse"], b"");
    assert!(
        stderr(&again).starts_with("error: invalid-state"),
        "{}",
        stderr(&again)
    );
}

/// A command line kmsctl refuses follows `--json` like every other error: one JSON line
/// on stdout with kind `usage`, exit 2; without `--json`, clap's message on stderr.
#[test]
fn usage_errors_follow_json() {
    let kmsctl = |args: &[&str]| {
        std::process::Command::new(kms_e2e::bin("kmsctl"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = kmsctl(&["--json", "--no-autostart", "create", "payments"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "usage");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("--type"), "{message}");
    let out = kmsctl(&["--no-autostart", "create", "payments"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--type"));
    let out = kmsctl(&["--json", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
}

/// Each error kind through kmsctl, with its exit code and `error: <kind>:` on stderr;
/// the two protocol-level kinds through a raw socket (kmsctl cannot send bad frames).
#[test]
fn every_error_kind() {
    let d = TestDaemon::start();
    ok(&d.kmsctl(&["create", "errkey", "--type", "aes256"], b""));
    ok(&d.kmsctl(&["create", "errsig", "--type", "ecdsa"], b""));
    fails(&d, &["encrypt", "nokey"], b"x", ErrorKind::NotFound);
    fails(
        &d,
        &["create", "errkey", "--type", "aes256"],
        b"",
        ErrorKind::AlreadyExists,
    );
    fails(
        &d,
        &["create", "9bad", "--type", "aes256"],
        b"",
        ErrorKind::InvalidArgument,
    );
    fails(
        &d,
        &["encrypt", "errkey"],
        &vec![0u8; 32 * 1024 + 1],
        ErrorKind::TooLarge,
    );
    // Beyond what a frame carries, the client refuses before sending: too-large as well,
    // not a lost connection (it was exit 69, "connection to kmsd lost").
    for cmd in ["encrypt", "sign"] {
        fails(
            &d,
            &[cmd, "errkey"],
            &vec![0u8; 1_100_000],
            ErrorKind::TooLarge,
        );
    }
    fails(&d, &["sign", "errkey"], b"x", ErrorKind::WrongPurpose);
    let ct = ok(&d.kmsctl(&["encrypt", "errkey"], b"x"));
    ok(&d.kmsctl(&["rotate", "errkey"], b""));
    ok(&d.kmsctl(&["disable-version", "errkey", "1"], b""));
    fails(
        &d,
        &["decrypt", "errkey"],
        ct.as_bytes(),
        ErrorKind::VersionDisabled,
    );
    let tampered = ct.replacen("ncpkms:v1:", "ncpkms:v2:", 1);
    fails(
        &d,
        &["decrypt", "errkey"],
        tampered.as_bytes(),
        ErrorKind::DecryptFailed,
    );
    ok(&d.kmsctl(&["disable", "errkey"], b""));
    fails(&d, &["encrypt", "errkey"], b"x", ErrorKind::InvalidState);

    // version-limit: 99 rotations through the client, the 100th through kmsctl.
    ok(&d.kmsctl(&["create", "fullkey", "--type", "aes256"], b""));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = d.client().await;
        for _ in 2..=100 {
            c.rotate("fullkey").await.unwrap();
        }
    });
    fails(&d, &["rotate", "fullkey"], b"", ErrorKind::VersionLimit);

    // JSON error form on stdout.
    let out = d.kmsctl(&["--json", "show", "nokey"], b"");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "not-found");

    // permission-denied: another account, reaching a group-shared socket.
    let mut shared = TestDaemon::start_with(DaemonOptions {
        extra_args: vec!["--socket-group".into(), "nogroup".into()],
        ..DaemonOptions::default()
    });
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(shared.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(kms_e2e::bin("kmsctl"))
        .arg("--socket")
        .arg(&shared.socket)
        .args(["create", "theirs", "--type", "aes256"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(12), "{stderr}");
    assert!(stderr.starts_with("error: permission-denied: "), "{stderr}");
    shared.stop();

    // malformed-frame and unsupported-version over a raw socket.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    let reply = raw_call(&mut s, &hello(999));
    assert_eq!(reply_error_kind(&reply), "unsupported-version");
    // ... and said on the daemon's side too (SPEC §10), once in a while.
    let log = d.log_text();
    assert!(
        log.contains("refused a client of another protocol version")
            && log.contains("protocol=999"),
        "{log}"
    );
    let mut s = UnixStream::connect(&d.socket).unwrap();
    raw_call(&mut s, &hello(998));
    assert!(
        !d.log_text().contains("protocol=998"),
        "logged again within 10 s"
    );
    let mut s = UnixStream::connect(&d.socket).unwrap();
    raw_call(&mut s, &hello(1));
    let reply = raw_call(&mut s, &[0xc1, 0xc1]);
    assert_eq!(reply_error_kind(&reply), "malformed-frame");
}

fn hello(version: u32) -> Vec<u8> {
    use kms_shared::protocol::{ClientFrame, Request};
    kms_shared::codec::encode(&ClientFrame {
        id: 1,
        request: Request::Hello {
            protocol: version,
            client: "raw".into(),
        },
    })
    .unwrap()
}

fn raw_call(s: &mut UnixStream, body: &[u8]) -> kms_shared::protocol::ServerFrame {
    s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    s.write_all(body).unwrap();
    read_frame(s).unwrap()
}

fn read_frame(s: &mut UnixStream) -> Option<kms_shared::protocol::ServerFrame> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    kms_shared::codec::decode(&body).ok()
}

fn reply_error_kind(f: &kms_shared::protocol::ServerFrame) -> String {
    use kms_shared::protocol::{Outcome, ServerFrame};
    match f {
        ServerFrame::Reply {
            result: Outcome::Err(e),
            ..
        } => e.kind.as_str().to_string(),
        other => panic!("expected an error reply, got {other:?}"),
    }
}

/// Keys, versions, states, usage counts and history survive a restart.
#[tokio::test(flavor = "multi_thread")]
async fn restart_persistence() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.create_key(spec("keep", "aes256")).await.unwrap();
    c.create_key(spec("off", "ecdsa")).await.unwrap();
    let ct = c.encrypt("keep", b"persist", None).await.unwrap();
    c.rotate("keep").await.unwrap();
    c.encrypt("keep", b"again", None).await.unwrap();
    c.disable("off").await.unwrap();
    c.disable_version("keep", 1).await.unwrap();
    let before = c.history(hq("keep")).await.unwrap();
    drop(c);
    assert_eq!(d.stop(), Some(0));
    d.restart_with(DaemonOptions::default());
    let c = d.client().await;
    let k = c.get_key("keep").await.unwrap();
    assert_eq!((k.current_version, k.usage_count), (2, 2));
    assert_eq!(c.get_key("off").await.unwrap().state, KeyState::Disabled);
    assert!(!c.versions("keep").await.unwrap()[0].enabled);
    c.enable_version("keep", 1).await.unwrap();
    assert_eq!(c.decrypt("keep", &ct, None).await.unwrap(), b"persist");
    let after = c.history(hq("keep")).await.unwrap();
    assert_eq!(&after[after.len() - before.len()..], &before[..]);
}

fn spec(name: &str, t: &str) -> kms_shared::protocol::CreateKey {
    kms_e2e::key_spec(name, t.parse().unwrap())
}

fn hq(key: &str) -> HistoryQuery {
    HistoryQuery {
        key: key.into(),
        limit: Some(1000),
        ..HistoryQuery::default()
    }
}

/// A restart 73 hours later (the daemon under faketime) purges the pending key before it
/// serves, and rotates a due key exactly once, in the scheduler's first pass.
#[tokio::test(flavor = "multi_thread")]
async fn restart_73_hours_later() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.create_key(spec("doomed", "aes256")).await.unwrap();
    let mut auto = spec("daily", "aes256");
    auto.auto_rotation = true;
    auto.rotation_days = Some(1);
    c.create_key(auto).await.unwrap();
    let doomed = c.request_deletion("doomed").await.unwrap();
    drop(c);
    d.restart_with(DaemonOptions {
        faketime: Some("+73h".into()),
        ..DaemonOptions::default()
    });
    let c = d.client().await;
    let gone = c.get_key(&doomed.tag).await.unwrap();
    assert_eq!(gone.state, KeyState::Deleted, "log:\n{}", d.log_text());
    // Three periods passed; one catch-up rotation, after kmsd is ready.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut daily = c.get_key("daily").await.unwrap();
    while daily.current_version == 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "no catch-up rotation; log:\n{}",
            d.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        daily = c.get_key("daily").await.unwrap();
    }
    assert_eq!(daily.current_version, 2);
    // Once: one automatic rotation in the history, and still version 2 once the
    // scheduler has settled (its next pass waits for the next due date, a day on).
    let rotations = |h: Vec<kms_shared::model::HistoryEntry>| {
        h.iter()
            .filter(|e| e.action == kms_shared::model::Action::AutoRotate)
            .count()
    };
    assert_eq!(rotations(c.history(hq("daily")).await.unwrap()), 1);
    let status = c.status().await.unwrap();
    assert!(
        status
            .next_due_at
            .is_none_or(|at| at > daily.created_at + 73 * 3_600_000)
    );
    assert_eq!(c.get_key("daily").await.unwrap().current_version, 2);
    let next = daily.next_rotation_at.unwrap();
    let created = daily.created_at;
    assert!(
        next > created + 73 * 3_600_000,
        "next rotation restarts from the restart"
    );
    // Killing the daemon kills kmsd, not only the faketime wrapper it runs under.
    drop(c);
    d.kill();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !kms_e2e::processes_naming(&d.data_dir).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "kmsd outlived its faketime wrapper: {:?}",
            kms_e2e::processes_naming(&d.data_dir)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// 16 clients × 1,000 pipelined requests are all answered correctly.
#[tokio::test(flavor = "multi_thread")]
async fn sixteen_clients_pipelined() {
    let d = TestDaemon::start();
    let setup = d.client().await;
    setup.create_key(spec("busy", "aes256")).await.unwrap();
    setup.create_key(spec("busysig", "ecdsa")).await.unwrap();
    let mut clients = tokio::task::JoinSet::new();
    for ci in 0..16u32 {
        let c = Arc::new(d.client().await);
        clients.spawn(async move {
            let mut calls = tokio::task::JoinSet::new();
            for i in 0..1000u32 {
                let c = c.clone();
                calls.spawn(async move {
                    let msg = format!("client {ci} message {i}");
                    if i % 10 == 0 {
                        let sig = c.sign("busysig", msg.as_bytes(), SignScheme::Pss).await?;
                        anyhow::ensure!(
                            c.verify("busysig", msg.as_bytes(), &sig, SignScheme::Pss)
                                .await?
                        );
                    } else {
                        let ct = c.encrypt("busy", msg.as_bytes(), None).await?;
                        anyhow::ensure!(c.decrypt("busy", &ct, None).await? == msg.as_bytes());
                    }
                    Ok(())
                });
            }
            let mut n = 0;
            while let Some(r) = calls.join_next().await {
                r??;
                n += 1;
            }
            Ok::<_, anyhow::Error>(n)
        });
    }
    let mut total = 0;
    while let Some(r) = clients.join_next().await {
        total += r.unwrap().unwrap();
    }
    assert_eq!(total, 16_000);
    let k = setup.get_key("busy").await.unwrap();
    assert_eq!(k.usage_count, 16 * 900 * 2);
}

/// When the daemon dies, every call on the client ends with an error, promptly: those in
/// flight, and those made after the connection ended, however many are made at once. A
/// call made after the reader had stopped used to wait for ever when another call's
/// combined write took its frame along (and failed): nothing was left to answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_after_the_daemon_dies_fail_promptly() {
    for round in 0..10u32 {
        let mut d = TestDaemon::start();
        let c = Arc::new(d.client().await);
        c.create_key(spec("dies", "aes256")).await.unwrap();
        let mut callers = Vec::new();
        for i in 0..8u32 {
            let c = c.clone();
            callers.push(tokio::spawn(async move {
                // Calls until one fails, then four more at once.
                while c.encrypt("dies", b"x", None).await.is_ok() {}
                let after: Vec<_> = (0..4)
                    .map(|_| {
                        let c = c.clone();
                        tokio::spawn(async move { c.encrypt("dies", b"x", None).await })
                    })
                    .collect();
                for a in after {
                    assert!(
                        a.await.unwrap().is_err(),
                        "call {i}: answered by a dead daemon"
                    );
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20 + 7 * u64::from(round))).await;
        d.kill();
        for (i, caller) in callers.into_iter().enumerate() {
            tokio::time::timeout(std::time::Duration::from_secs(20), caller)
                .await
                .unwrap_or_else(|_| panic!("round {round} caller {i}: a call never ended"))
                .unwrap();
        }
    }
}

/// Calls abandoned by their callers (a timeout, a dropped future) while other calls are in
/// flight on the same client leave it usable: a frame queued by an abandoned call goes out
/// whole with the next write or not at all, and every call that is awaited gets its own
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_calls_leave_the_client_usable() {
    let d = TestDaemon::start();
    let c = Arc::new(d.client().await);
    c.create_key(spec("abandon", "aes256")).await.unwrap();
    for round in 0..20u32 {
        let mut calls = Vec::new();
        for i in 0..32u32 {
            let c = c.clone();
            calls.push(tokio::spawn(async move {
                let msg = format!("round {round} call {i}");
                let ct = c.encrypt("abandon", msg.as_bytes(), None).await?;
                anyhow::ensure!(c.decrypt("abandon", &ct, None).await? == msg.as_bytes());
                Ok(())
            }));
        }
        // Every other call is dropped at a different point: before it runs, while its
        // frame waits in the queue, or while its answer is on the way.
        for _ in 0..round % 4 {
            tokio::task::yield_now().await;
        }
        for (i, call) in calls.iter().enumerate() {
            if i % 2 == 1 {
                call.abort();
            }
        }
        for (i, call) in calls.into_iter().enumerate() {
            let answered = tokio::time::timeout(std::time::Duration::from_secs(20), call).await;
            match answered.unwrap_or_else(|_| panic!("round {round} call {i}: no answer")) {
                Ok(r) => r.unwrap(),
                Err(e) => assert!(i % 2 == 1 && e.is_cancelled(), "call {i}: {e}"),
            }
        }
    }
    for i in 0..50u32 {
        let msg = format!("after {i}");
        let ct = c.encrypt("abandon", msg.as_bytes(), None).await.unwrap();
        assert_eq!(
            c.decrypt("abandon", &ct, None).await.unwrap(),
            msg.as_bytes()
        );
    }
}

/// A call given up before its frame was written (another call holds the socket, which
/// the daemon is not reading) is never sent: it used to go out later with some other
/// call's write, so a `rotate` that timed out still rotated the key, at a moment nobody
/// chose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_given_up_before_it_was_sent_is_never_sent() {
    use kms_shared::protocol::PlaintextItem;
    use std::future::Future;
    use std::task::Poll;
    let mut d = TestDaemon::start();
    let c = Arc::new(d.client().await);
    c.create_key(spec("unsent", "aes256")).await.unwrap();
    let pid = rustix::process::Pid::from_raw(d.pid().unwrap() as i32).unwrap();
    kms_e2e::stop_process(d.pid().unwrap());
    // One frame of ~960 KiB, more than a Unix socket holds (~200 KiB by default): its
    // first poll takes the connection's write lock, writes what fits, and waits in the
    // write, holding the lock. No timing: the rotate below is queued only after that.
    let items: Vec<PlaintextItem> = (0..30u8)
        .map(|i| PlaintextItem {
            plaintext: vec![i; 32 * 1024].into(),
            context: None,
        })
        .collect();
    let mut filler = Box::pin(c.encrypt_batch("unsent", items));
    let first = std::future::poll_fn(|cx| Poll::Ready(filler.as_mut().poll(cx))).await;
    assert!(first.is_pending(), "answered while the daemon was stopped");
    let rotate = tokio::time::timeout(Duration::from_millis(300), c.rotate("unsent")).await;
    assert!(rotate.is_err(), "answered while the daemon was stopped");
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    // The filler's write goes on and is answered; the rotate was never sent.
    let outcomes = tokio::time::timeout(Duration::from_secs(20), filler)
        .await
        .expect("the batch was not answered")
        .unwrap();
    assert_eq!(outcomes.len(), 30);
    for i in 0..4u8 {
        let ct = c.encrypt("unsent", &[i], None).await.unwrap();
        assert_eq!(&c.decrypt("unsent", &ct, None).await.unwrap()[..], [i]);
    }
    // A rotate sent by mistake was read before these calls (a connection's frames are
    // read in order), and a clean stop answers every request read first: after a
    // restart the store says whether it ran, with no race against its commit.
    drop(c);
    d.restart_with(DaemonOptions::default());
    let c = d.client().await;
    assert_eq!(c.get_key("unsent").await.unwrap().current_version, 1);
}

/// Calls abandoned while one of them is writing — the daemon is not reading, the socket
/// is full — leave the connection whole: the bytes the writer had not written yet go out
/// first with the next write, so the daemon never sees a frame cut short followed by
/// another one (which would turn the stream into garbage for it and fail every call on
/// the connection), and later calls are answered.
#[tokio::test(flavor = "current_thread")]
async fn calls_abandoned_mid_write_leave_the_stream_whole() {
    let d = TestDaemon::start();
    let c = Arc::new(d.client().await);
    c.create_key(spec("midwrite", "aes256")).await.unwrap();
    let pid = rustix::process::Pid::from_raw(d.pid().unwrap() as i32).unwrap();
    let call = |i: u32| {
        let c = c.clone();
        async move {
            let msg = vec![i as u8; 32 * 1024];
            let ct = c.encrypt("midwrite", &msg, None).await?;
            anyhow::ensure!(c.decrypt("midwrite", &ct, None).await? == msg);
            Ok::<_, anyhow::Error>(())
        }
    };
    kms_e2e::stop_process(pid.as_raw_nonzero().get() as u32);
    // 40 calls of 32 KiB, more than the socket holds, all given up after 500 ms: one of
    // them is writing (blocked, part of it written) when it is dropped.
    let abandoned: Vec<_> = (0..40)
        .map(|i| {
            let call = call(i);
            tokio::spawn(tokio::time::timeout(Duration::from_millis(500), call))
        })
        .collect();
    for a in abandoned {
        assert!(
            a.await.unwrap().is_err(),
            "answered while the daemon was stopped"
        );
    }
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    let later: Vec<_> = (100..104).map(|i| tokio::spawn(call(i))).collect();
    for (i, call) in later.into_iter().enumerate() {
        let answered = tokio::time::timeout(Duration::from_secs(20), call).await;
        answered
            .unwrap_or_else(|_| panic!("call {i}: no answer"))
            .unwrap()
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
    }
}

/// Garbage, an oversized length, a truncated frame and an idle connection are refused or
/// closed while a well-behaved client keeps being served.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_leaves_others_served() {
    let d = TestDaemon::start_with(DaemonOptions {
        config: Some("idle_timeout_secs = 1\nframe_timeout_secs = 1\n".into()),
        ..DaemonOptions::default()
    });
    let setup = d.client().await;
    setup.create_key(spec("steady", "aes256")).await.unwrap();
    drop(setup);

    // A well-behaved client keeps working, with no idle gap, during everything below.
    let good = d.client().await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let worker = tokio::spawn(async move {
        let mut n = 0u32;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let msg = format!("steady {n}");
            let ct = good.encrypt("steady", msg.as_bytes(), None).await?;
            anyhow::ensure!(good.decrypt("steady", &ct, None).await? == msg.as_bytes());
            n += 1;
        }
        Ok::<_, anyhow::Error>(n)
    });

    let hostile = tokio::task::spawn_blocking({
        let socket = d.socket.clone();
        move || {
            // Oversized length: refused with malformed-frame, then closed.
            let mut big = UnixStream::connect(&socket).unwrap();
            big.write_all(&u32::MAX.to_be_bytes()).unwrap();
            let f = read_frame(&mut big).unwrap();
            assert_eq!(reply_error_kind(&f), "malformed-frame");
            assert!(
                read_frame(&mut big).is_none(),
                "closed after an oversized frame"
            );

            // Random bytes instead of a handshake: answered malformed-frame, then closed.
            let mut junk = UnixStream::connect(&socket).unwrap();
            junk.write_all(&[0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0xff, 0xfe])
                .unwrap();
            junk.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let f = read_frame(&mut junk).unwrap();
            assert_eq!(reply_error_kind(&f), "malformed-frame");
            assert!(
                read_frame(&mut junk).is_none(),
                "closed after a bad handshake"
            );

            // Truncated frame (half a body, then silence) and an idle connection: both are
            // closed after their timeouts (1 s here).
            let mut half = UnixStream::connect(&socket).unwrap();
            half.write_all(&[0, 0, 0, 100, 1, 2, 3]).unwrap();
            let mut idle = UnixStream::connect(&socket).unwrap();
            for s in [&mut half, &mut idle] {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = Vec::new();
                let r = s.read_to_end(&mut buf);
                assert!(r.is_ok(), "connection not closed by the daemon: {r:?}");
            }
        }
    });
    hostile.await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = worker.await.unwrap().unwrap();
    assert!(served > 10, "the good client was served {served} times");
}

/// SIGTERM: the daemon exits 0 and removes its socket; a second daemon on the same data
/// directory is refused while the first runs.
#[test]
fn sigterm_and_single_instance() {
    let mut d = TestDaemon::start();
    let second = std::process::Command::new(kms_e2e::bin("kmsd"))
        .arg("--socket")
        .arg(d.dir.path().join("other.sock"))
        .arg("--data-dir")
        .arg(&d.data_dir)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("holds the data directory"));
    let again = std::process::Command::new(kms_e2e::bin("kmsd"))
        .arg("--socket")
        .arg(&d.socket)
        .arg("--data-dir")
        .arg(d.dir.path().join("data2"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stderr).contains("another kmsd is serving"));
    assert_eq!(d.stop(), Some(0));
    assert!(!d.socket.exists());
}

/// The client library's example (shared/examples/envelope.rs), run as a user would run
/// it against a real daemon: it creates its key, seals data under a data key from kms,
/// and opens it again with the data key kms unwraps; a second run finds the key there.
/// Built by `cargo test --workspace` (or `cargo build --examples`).
#[test]
fn the_envelope_example_runs_against_a_real_daemon() {
    let d = TestDaemon::start();
    let example = kms_e2e::bin_dir().join("examples").join("envelope");
    assert!(
        example.is_file(),
        "{} not found: cargo build --workspace --examples",
        example.display()
    );
    let run = |text: &str| {
        let out = std::process::Command::new(&example)
            .arg("--socket")
            .arg(&d.socket)
            .arg(text)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let first = run("attack at dawn");
    assert!(first.contains("created key envelope-demo"), "{first}");
    assert!(first.contains("wrapped data key: ncpkms:v1:"), "{first}");
    assert!(
        first.lines().any(|l| l == "opened: attack at dawn"),
        "{first}"
    );
    let second = run("ünïcödé too");
    assert!(!second.contains("created key"), "{second}");
    assert!(
        second.lines().any(|l| l == "opened: ünïcödé too"),
        "{second}"
    );
    let info = json(&d.kmsctl(&["show", "envelope-demo", "--json"], b""));
    assert_eq!(info["usage_count"], 4, "{info}");
}

/// The daemon reads a bounded number of history entries per request (`history_scan`):
/// a query whose matches lie deeper is answered short with a place to go on, and the
/// client library and kmsctl follow it, so callers still get what they asked for.
#[tokio::test(flavor = "multi_thread")]
async fn history_queries_past_the_scan_bound_are_followed() {
    let d = TestDaemon::start_with(DaemonOptions {
        config: Some("history_scan = 10\n".into()),
        ..DaemonOptions::default()
    });
    let c = d.client().await;
    c.create_key(spec("deep", "aes256")).await.unwrap();
    for i in 0..25 {
        c.encrypt("deep", format!("m{i}").as_bytes(), None)
            .await
            .unwrap();
    }
    let creates = HistoryQuery {
        action: Some(Action::Create),
        ..hq("deep")
    };
    let first = c.history_page(creates.clone()).await.unwrap();
    assert!(first.entries.is_empty(), "{first:?}");
    assert!(first.resume_before_seq.is_some(), "{first:?}");
    let found = c.history(creates).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].action, Action::Create);
    let out = json(&d.kmsctl(&["--json", "history", "deep", "--action", "create"], b""));
    let rows = out.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["action"], "create", "{out}");
    // Impact says it counted only back so far.
    let impact = c.impact("deep", None).await.unwrap();
    assert_eq!(impact.recent_uses, 10);
    assert!(impact.counted_back_to.is_some(), "{impact:?}");
}
