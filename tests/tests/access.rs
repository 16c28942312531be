//! Access control, events and impact end to end (SPEC §6–§8): a second Unix account
//! (`kmstest`, created by .ci/install-deps) reaches a group-shared daemon; roles decide.

#![allow(clippy::unwrap_used)]

use kms_e2e::{DaemonOptions, TestDaemon};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const OTHER: &str = "kmstest";
const GROUP: &str = "kmsclients";

/// A daemon whose socket the `kmsclients` group can reach.
fn shared_daemon() -> TestDaemon {
    shared_daemon_with(None)
}

/// `shared_daemon` with these lines of configuration.
fn shared_daemon_with(config: Option<&str>) -> TestDaemon {
    assert!(
        uzers_exists(OTHER),
        "the test account {OTHER} is missing: run .ci/install-deps as root"
    );
    let d = TestDaemon::start_with(DaemonOptions {
        extra_args: vec!["--socket-group".into(), GROUP.into()],
        config: config.map(str::to_string),
        ..DaemonOptions::default()
    });
    // The temporary directory is 0700; let the other account traverse to the socket.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn uzers_exists(user: &str) -> bool {
    Command::new("id")
        .arg(user)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// kmsctl run as the other account.
fn as_other(d: &TestDaemon, args: &[&str], stdin: &[u8]) -> Output {
    d.kmsctl_as(OTHER, args, stdin)
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn root_ok(d: &TestDaemon, args: &[&str]) -> String {
    let o = d.kmsctl(args, b"");
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn denied(o: &Output, role: &str) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        code(o),
        Some(12),
        "expected permission-denied, got: {stderr}"
    );
    assert!(stderr.contains("error: permission-denied: "), "{stderr}");
    assert!(
        stderr.contains(role),
        "the refusal names the missing role {role}: {stderr}"
    );
}

/// A group grant follows the groups the kernel gives the calling process, not those the
/// user database lists for its account: `kmstest` is not a member of `daemon`, yet a
/// process of it started with `daemon` among its groups (as systemd's
/// `SupplementaryGroups=` starts one) holds `daemon`'s grant, and one without does not.
/// Before, the database decided both ways.
#[test]
fn group_grants_follow_the_processes_groups() {
    let d = shared_daemon();
    root_ok(&d, &["create", "gkey", "--type", "aes256"]);
    root_ok(
        &d,
        &["grant", "key-user", "--group", "daemon", "--key", "gkey"],
    );
    denied(&as_other(&d, &["encrypt", "gkey"], b"x"), "key-user");
    let mut with_daemon = Command::new("setpriv");
    with_daemon
        .args([
            &format!("--reuid={OTHER}"),
            &format!("--regid={OTHER}"),
            &format!("--groups={GROUP},daemon"),
        ])
        .arg(kms_e2e::bin("kmsctl"));
    let o = d.run_kmsctl(with_daemon, &["encrypt", "gkey"], b"x");
    assert_eq!(code(&o), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
}

/// kmsd in a user namespace (a rootless container) sees every account the namespace does
/// not map as one uid, the kernel's overflow uid (`nobody`): it refuses such peers with a
/// reason, rather than serving all of them as `nobody`, whom a grant would then cover.
/// Accounts the namespace maps (root here) are served as before.
#[test]
fn peers_a_user_namespace_does_not_map_are_refused() {
    assert!(
        uzers_exists(OTHER),
        "the test account {OTHER} is missing: run .ci/install-deps as root"
    );
    user_namespaces_work();
    let d = TestDaemon::start_with(DaemonOptions {
        user_namespace: true,
        ..DaemonOptions::default()
    });
    // The namespace maps no group for `--socket-group`: the socket is opened to everyone
    // instead, from outside, so that the other account reaches kmsd at all.
    for (path, mode) in [
        (d.dir.path(), 0o755),
        (d.socket.parent().unwrap(), 0o755),
        (d.socket.as_path(), 0o666),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    root_ok(&d, &["create", "shared", "--type", "aes256"]);
    root_ok(
        &d,
        &["grant", "key-user", "--user", "nobody", "--key", "shared"],
    );
    let o = as_other(&d, &["encrypt", "shared"], b"x");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && stderr.contains("permission-denied")
            && stderr.contains("user namespace"),
        "{OTHER}, unmapped, was not refused ({:?}): {stderr}",
        o.status.code()
    );
    let ct = d.kmsctl(&["encrypt", "shared"], b"root is mapped");
    assert!(
        ct.status.success(),
        "{}",
        String::from_utf8_lossy(&ct.stderr)
    );
    assert!(d.log_text().contains("peers it does not map are refused"));
}

/// This machine lets root make a user namespace (util-linux's `unshare`, a kernel and a
/// seccomp filter that allow it), or the tests that need one say why they cannot run.
fn user_namespaces_work() {
    let probe = Command::new("unshare")
        .args(["--user", "--map-root-user", "true"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "cannot make a user namespace here (`unshare --user --map-root-user true`: {probe:?}); \
         run .ci/install-deps as root on a machine that allows user namespaces"
    );
}

/// kmsd started in a user namespace that maps no uid reads its own uid as the overflow
/// uid, the one every unmapped peer has: it refuses to start, and says why.
#[test]
fn kmsd_whose_own_uid_is_unmapped_does_not_start() {
    user_namespaces_work();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("unshare")
        .arg("--user")
        .arg(kms_e2e::bin("kmsd"))
        .arg("--socket")
        .arg(dir.path().join("kmsd.sock"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("not mapped in its user namespace"),
        "{stderr}"
    );
    assert!(!dir.path().join("kmsd.sock").exists());
}

/// Refused before a grant; a key-scoped grant works on that key only; key-reviewer reads
/// history but cannot encrypt; key-manager disables but cannot create; a group grant
/// works for its members; revoke takes effect at once on an open connection; every
/// refusal is in the history with the account.
#[test]
fn roles_for_a_second_user() {
    let d = shared_daemon();
    root_ok(&d, &["create", "payroll", "--type", "aes256"]);
    root_ok(&d, &["create", "billing", "--type", "aes256"]);
    root_ok(&d, &["create", "signing", "--type", "ecdsa"]);

    // No grant: refused, and nothing listed.
    denied(&as_other(&d, &["encrypt", "payroll"], b"x"), "key-user");
    let listed = as_other(&d, &["--json", "list"], b"");
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "[]");

    // key-user on payroll only.
    root_ok(
        &d,
        &["grant", "key-user", "--user", OTHER, "--key", "payroll"],
    );
    let ct = as_other(&d, &["encrypt", "payroll"], b"salary");
    assert!(
        ct.status.success(),
        "{}",
        String::from_utf8_lossy(&ct.stderr)
    );
    let pt = as_other(&d, &["decrypt", "payroll"], &ct.stdout);
    assert_eq!(pt.stdout, b"salary");
    denied(&as_other(&d, &["encrypt", "billing"], b"x"), "key-user");
    let listed: serde_json::Value =
        serde_json::from_slice(&as_other(&d, &["--json", "list"], b"").stdout).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["payroll"]);
    // key-user cannot read history.
    denied(&as_other(&d, &["history", "payroll"], b""), "key-reviewer");

    // key-reviewer (NCP alias) on billing: history yes, encrypt no.
    root_ok(
        &d,
        &[
            "grant",
            "KMS_KEY_REVIEWER",
            "--user",
            OTHER,
            "--key",
            "billing",
        ],
    );
    assert!(as_other(&d, &["history", "billing"], b"").status.success());
    denied(&as_other(&d, &["encrypt", "billing"], b"x"), "key-user");

    // key-manager on all keys: disable and request deletion yes, create no, delete-now no.
    root_ok(&d, &["grant", "key-manager", "--user", OTHER]);
    let o = as_other(&d, &["disable", "billing"], b"");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    denied(
        &as_other(&d, &["create", "mine", "--type", "aes256"], b""),
        "manager",
    );
    let o = as_other(&d, &["delete", "billing"], b"");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    denied(
        &as_other(&d, &["delete-now", "billing", "--yes"], b""),
        "manager",
    );
    let o = as_other(&d, &["cancel-deletion", "billing"], b"");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    root_ok(&d, &["enable", "billing"]);

    // A group grant covers the group's members.
    denied(&as_other(&d, &["sign", "signing"], b"m"), "key-user");
    root_ok(
        &d,
        &["grant", "key-user", "--group", GROUP, "--key", "signing"],
    );
    assert!(as_other(&d, &["sign", "signing"], b"m").status.success());

    // Revoke takes effect at once, even on a connection opened before it.
    let mut persistent = Command::new("setpriv")
        .args([
            &format!("--reuid={OTHER}"),
            &format!("--regid={OTHER}"),
            "--init-groups",
        ])
        .arg(kms_e2e::bin("kms-probe"))
        .arg(&d.socket)
        .arg("payroll")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = persistent.stdin.take().unwrap();
    let mut output = BufReader::new(persistent.stdout.take().unwrap());
    let mut ask = |input: &mut std::process::ChildStdin| {
        writeln!(input, "go").unwrap();
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    assert_eq!(ask(&mut input), "ok");
    root_ok(
        &d,
        &["revoke", "key-user", "--user", OTHER, "--key", "payroll"],
    );
    assert_eq!(ask(&mut input), "permission-denied");
    drop(input);
    let _ = persistent.wait();

    // Every refusal is in the history, with the account.
    let hist: serde_json::Value = serde_json::from_str(&root_ok(
        &d,
        &["--json", "history", "billing", "--result", "error"],
    ))
    .unwrap();
    let refusals: Vec<_> = hist
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["result"] == "permission-denied")
        .collect();
    assert!(refusals.len() >= 2, "{hist}");
    assert!(refusals.iter().all(|h| h["account"] == OTHER));
    let payroll: serde_json::Value = serde_json::from_str(&root_ok(
        &d,
        &["--json", "history", "payroll", "--result", "error"],
    ))
    .unwrap();
    assert!(
        payroll
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["account"] == OTHER
                && h["action"] == "encrypt"
                && h["result"] == "permission-denied")
    );
}

/// A purged key's metadata and history are the managers' (SPEC §3): a key-reviewer on all
/// keys reads a live key and its history, but not a purged key's, asked by its tag; a
/// manager still does. Before, a role on all keys reached the purged keys too.
#[test]
fn a_purged_key_is_for_managers_to_see() {
    let d = shared_daemon();
    root_ok(&d, &["create", "live", "--type", "aes256"]);
    let created: serde_json::Value = serde_json::from_str(&root_ok(
        &d,
        &["--json", "create", "gone", "--type", "aes256"],
    ))
    .unwrap();
    let tag = created["tag"].as_str().unwrap().to_string();
    root_ok(&d, &["delete", "gone"]);
    root_ok(&d, &["delete-now", "--yes", "gone"]);
    root_ok(&d, &["grant", "key-reviewer", "--user", OTHER]);
    assert!(as_other(&d, &["show", "live"], b"").status.success());
    assert!(as_other(&d, &["history", "live"], b"").status.success());
    denied(&as_other(&d, &["show", &tag], b""), "manager");
    denied(&as_other(&d, &["history", &tag], b""), "manager");
    let shown: serde_json::Value =
        serde_json::from_str(&root_ok(&d, &["--json", "show", &tag])).unwrap();
    assert_eq!(shown["state"], "deleted");
}

fn python_helper() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/peer_identity.py")
}

/// A connection's identity is fixed at connect: a socket opened by the other account and
/// handed to a root process still acts as the other account.
#[test]
fn identity_survives_fd_passing() {
    let d = shared_daemon();
    let o = Command::new("python3")
        .arg(python_helper())
        .arg("pass-fd")
        .arg(&d.socket)
        .arg(OTHER)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("permission-denied"), "{out}");
    assert!(
        lines
            .next()
            .unwrap_or("")
            .contains(&format!("account {OTHER}")),
        "{out}"
    );
}

/// `kmsctl watch` (`kmsctl` is the command to run it as) on `d`, its output lines sent
/// on the channel as they come; returned once it says on stderr that it is watching
/// (kmsd has acknowledged the subscription: every later change is seen).
fn watch_lines(
    d: &TestDaemon,
    kmsctl: Command,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut watch = watching(d, kmsctl);
    let rx = lines_of(watch.stdout.take().unwrap());
    (watch, rx)
}

/// The lines of `out`, sent on the channel as they come.
fn lines_of(out: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `kmsctl watch` (`kmsctl` is the command to run it as) on `d`, its stdout a pipe left
/// to the caller; returned once it says on stderr that it is watching.
fn watching(d: &TestDaemon, mut kmsctl: Command) -> std::process::Child {
    let mut watch = kmsctl
        .arg("--socket")
        .arg(&d.socket)
        .arg("watch")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(watch.stderr.take().unwrap());
    let (said_tx, said) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut first = String::new();
        let _ = stderr.read_line(&mut first);
        let _ = said_tx.send(first);
        // Drained, so that a later message cannot block kmsctl on a full pipe.
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
    });
    let first = said
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_default();
    assert!(first.starts_with("watching"), "kmsctl watch said {first:?}");
    watch
}

/// `kmsctl watch` sees created, rotated, state-changed, deletion-requested, purged and
/// permission-changed events caused by another client.
#[test]
fn watch_sees_other_clients_events() {
    let d = TestDaemon::start();
    let (mut watch, rx) = watch_lines(&d, Command::new(kms_e2e::bin("kmsctl")));
    root_ok(&d, &["create", "watched", "--type", "aes256"]);
    root_ok(&d, &["rotate", "watched"]);
    root_ok(&d, &["disable", "watched"]);
    root_ok(&d, &["delete", "watched"]);
    root_ok(&d, &["delete-now", "watched", "--yes"]);
    root_ok(&d, &["grant", "key-reviewer", "--user", "nobody"]);

    let want = [
        "created",
        "rotated",
        "state-changed",
        "deletion-requested",
        "purged",
        "permission-changed",
    ];
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < want.len() && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            seen.push(v["kind"].as_str().unwrap_or("?").to_string());
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(seen, want);
}

/// A subscriber's events are numbered 1, 2, … in its subscription: the events of keys it
/// may not see leave no gaps. The daemon's own numbers, counting every event, told a
/// key-user how much happened on the keys it has no role on.
#[test]
fn event_numbers_tell_nothing_of_unseen_keys() {
    let d = shared_daemon();
    root_ok(&d, &["create", "seen01", "--type", "aes256"]);
    root_ok(&d, &["create", "hidden01", "--type", "aes256"]);
    root_ok(
        &d,
        &["grant", "key-user", "--user", OTHER, "--key", "seen01"],
    );
    let (mut watch, rx) = watch_lines(&d, kms_e2e::kmsctl_as_account(OTHER));
    root_ok(&d, &["rotate", "hidden01"]);
    root_ok(&d, &["rotate", "seen01"]);
    root_ok(&d, &["rotate", "hidden01"]);
    root_ok(&d, &["rotate", "hidden01"]);
    root_ok(&d, &["disable", "seen01"]);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            seen.push((
                v["seq"].as_u64().unwrap_or(0),
                v["kind"].as_str().unwrap_or("?").to_string(),
                v["key_name"].as_str().unwrap_or("?").to_string(),
            ));
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(
        seen,
        [
            (1, "rotated".to_string(), "seen01".to_string()),
            (2, "state-changed".to_string(), "seen01".to_string())
        ]
    );
}

/// A subscriber that never reads does not block key operations: the daemon buffers a
/// bounded amount for it, keeps serving, and tells it how many events it missed.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_subscriber_does_not_block() {
    use kms_shared::protocol::{ClientFrame, Request, ServerFrame};
    use std::io::Read;
    let d = TestDaemon::start();
    let c = d.client().await;
    c.create_key(kms_e2e::key_spec(
        "noisy",
        kms_shared::model::KeyType::Aes256,
    ))
    .await
    .unwrap();

    let ops = 3000;
    let run = |c: std::sync::Arc<kms_shared::client::Client>| async move {
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..ops {
            let c = c.clone();
            set.spawn(async move { c.set_memo("noisy", &format!("memo {i}")).await.map(|_| ()) });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
        start.elapsed()
    };
    let c = std::sync::Arc::new(c);
    let unloaded = run(c.clone()).await;

    // A subscriber that never reads a byte.
    let mut stalled = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    for (id, request) in [
        (
            1,
            Request::Hello {
                protocol: 1,
                client: "stalled".into(),
            },
        ),
        (2, Request::Subscribe),
    ] {
        let body = kms_shared::codec::encode(&ClientFrame { id, request }).unwrap();
        stalled
            .write_all(&(body.len() as u32).to_be_bytes())
            .unwrap();
        stalled.write_all(&body).unwrap();
    }
    let loaded = tokio::time::timeout(Duration::from_secs(120), run(c.clone()))
        .await
        .expect("operations blocked behind a stalled subscriber");
    println!(
        "{ops} memo changes: {:.0} ops/s without, {:.0} ops/s with a stalled subscriber",
        f64::from(ops) / unloaded.as_secs_f64(),
        f64::from(ops) / loaded.as_secs_f64()
    );

    // When it finally reads, it learns that it lagged.
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut lagged = false;
    let mut len = [0u8; 4];
    while stalled.read_exact(&mut len).is_ok() {
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        stalled.read_exact(&mut body).unwrap();
        if let Ok(ServerFrame::Lagged { missed }) = kms_shared::codec::decode(&body) {
            assert!(missed > 0);
            lagged = true;
            break;
        }
    }
    assert!(lagged, "the stalled subscriber was never told it lagged");
}

/// One account holds at most `max_connections_per_account` connections at once, so that
/// no local user can take every connection: the next is refused `permission-denied`,
/// naming the limit, while root (exempt) still connects; a closed connection gives its
/// place back.
#[test]
fn connections_per_account_are_capped() {
    let d = shared_daemon_with(Some("max_connections_per_account = 2\n"));
    let connections = || -> u64 {
        let status: serde_json::Value =
            serde_json::from_str(&root_ok(&d, &["--json", "status"])).unwrap();
        status["connections"].as_u64().unwrap()
    };
    let base = connections();
    // Two subscribers as the other account hold two connections.
    let watch = || {
        kms_e2e::kmsctl_as_account(OTHER)
            .arg("--socket")
            .arg(&d.socket)
            .arg("watch")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut watchers = vec![watch(), watch()];
    let deadline = Instant::now() + Duration::from_secs(20);
    while connections() < base + 2 {
        assert!(Instant::now() < deadline, "the watchers never connected");
        std::thread::sleep(Duration::from_millis(50));
    }

    let refused = as_other(&d, &["status"], b"");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("permission-denied") && stderr.contains("2 connections"),
        "{stderr}"
    );
    root_ok(&d, &["status"]);

    let mut gone = watchers.remove(0);
    gone.kill().unwrap();
    gone.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = as_other(&d, &["status"], b"");
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed connection's place was not given back: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for mut w in watchers {
        let _ = w.kill();
        let _ = w.wait();
    }
}

/// `status` tells the whole store's counts only to holders of a role on all keys: an
/// account with a role on one key learns of that key, its own connections, and that
/// key's next scheduled change; with a grant on all keys it sees everything.
#[test]
fn status_counts_what_the_caller_may_see() {
    let d = shared_daemon();
    for name in ["mine", "theirs1", "theirs2"] {
        root_ok(&d, &["create", name, "--type", "aes256"]);
    }
    root_ok(
        &d,
        &[
            "set-rotation",
            "theirs1",
            "--auto-rotate",
            "--rotation-days",
            "1",
        ],
    );
    root_ok(
        &d,
        &[
            "set-rotation",
            "mine",
            "--auto-rotate",
            "--rotation-days",
            "2",
        ],
    );
    root_ok(&d, &["grant", "key-user", "--user", OTHER, "--key", "mine"]);
    let status_of = |o: Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    // Root holds a connection open meanwhile: counted for root, not for the other account.
    let _held = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let all = status_of(d.kmsctl(&["--json", "status"], b""));
    assert_eq!(all["keys"], 3, "{all}");
    assert_eq!(all["connections"], 2, "{all}");
    assert!(all["next_due_at"].is_string(), "{all}");
    let own = status_of(as_other(&d, &["--json", "status"], b""));
    assert_eq!(own["keys"], 1, "{own}");
    // Its own kmsctl's connection, not root's held one.
    assert_eq!(own["connections"], 1, "{own}");
    // The rotation of its key in 2 days, not the other key's tomorrow.
    assert!(own["next_due_at"].is_string(), "{own}");
    assert!(
        own["next_due_at"].as_str() > all["next_due_at"].as_str(),
        "{own} {all}"
    );
    root_ok(&d, &["grant", "key-reviewer", "--user", OTHER]);
    let widened = status_of(as_other(&d, &["--json", "status"], b""));
    assert_eq!(widened["keys"], 3, "{widened}");
    assert_eq!(widened["next_due_at"], all["next_due_at"], "{widened}");
}

/// `kmsctl watch` whose reader pauses longer than kmsd waits on a connection that stopped
/// reading (`idle_timeout_secs = 1` here; 300 s by default): kmsctl goes on reading the
/// socket, and the reader learns what was dropped (`lagged`) when it reads again, then
/// sees later events. kmsctl used to write from the only thread of its runtime, so a
/// paused reader stopped the socket's reading too, and kmsd closed the connection.
#[tokio::test(flavor = "multi_thread")]
async fn watch_outlasts_a_reader_that_pauses() {
    let d = TestDaemon::start_with(DaemonOptions {
        config: Some("idle_timeout_secs = 1\n".into()),
        ..DaemonOptions::default()
    });
    root_ok(&d, &["create", "paused", "--type", "aes256"]);
    let mut watch = watching(&d, Command::new(kms_e2e::bin("kmsctl")));
    // Far more events than the pipe, kmsctl's queues and the socket hold, nobody reading.
    let c = std::sync::Arc::new(d.client().await);
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let c = c.clone();
            tokio::spawn(async move {
                for i in 0..200 {
                    c.set_memo("paused", &format!("{w}-{i}")).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    // Past kmsd's wait for a connection that does not read, several times over.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(watch.try_wait().unwrap().is_none(), "kmsctl watch ended");
    let rx = lines_of(watch.stdout.take().unwrap());
    let next = |what: &str| {
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no more lines before {what}"))
    };
    let mut lagged = None;
    while lagged.is_none() {
        let v: serde_json::Value = serde_json::from_str(&next("lagged")).unwrap();
        lagged = v["lagged"].as_u64();
    }
    assert!(lagged.unwrap() > 0, "{lagged:?}");
    root_ok(&d, &["rotate", "paused"]);
    loop {
        let v: serde_json::Value = serde_json::from_str(&next("the rotation")).unwrap();
        if v["kind"] == "rotated" {
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
}

/// `kmsctl watch | head -n1`: once the reader is gone, watch ends at once (exit 0, as on
/// any closed pipe), not at the next event, which on a quiet daemon may never come.
#[test]
fn watch_ends_when_its_reader_goes() {
    let d = TestDaemon::start();
    let mut watch = watching(&d, Command::new(kms_e2e::bin("kmsctl")));
    root_ok(&d, &["create", "once", "--type", "aes256"]);
    let mut stdout = BufReader::new(watch.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("\"created\""), "{first}");
    // `head` exits: the pipe's read end closes. A second event makes the write fail; the
    // writer then ends, and watch with it, with no third event.
    drop(stdout);
    root_ok(&d, &["rotate", "once"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = watch.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = watch.kill();
            panic!("kmsctl watch kept running with its reader gone");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}

/// All connections of one account share one budget of kmsd's memory
/// (`max_buffered_bytes_per_account`, here 2 MiB): eight connections that pipeline 32 KiB
/// encryptions and read nothing stop being read once together they hold it — each
/// held up to its own 8 MiB before, 1,660 requests in all, where now ~170 are taken
/// (the kernel's socket buffers hold a few of each). Root is held to it like any account;
/// another account, and root's small calls on connections of their own, are served
/// meanwhile; and once the connections read again every request they sent is answered.
#[test]
fn an_accounts_connections_share_one_memory_budget() {
    use kms_e2e::raw::{encrypt_until_unread, handshaken, read_every_ciphertext};
    const CONNECTIONS: usize = 8;
    let d = shared_daemon_with(Some("max_buffered_bytes_per_account = 2097152\n"));
    root_ok(&d, &["create", "sink", "--type", "aes256"]);
    let socket = d.socket.clone();
    // Each connection sends until a write has made no progress for 3 s.
    let senders: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut s = handshaken(&socket, &format!("non-reader-{c}"));
                let (sent, partial) = encrypt_until_unread(&mut s, "sink", Duration::from_secs(3));
                (s, sent, partial)
            })
        })
        .collect();
    let stalled: Vec<_> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    let taken: u64 = stalled.iter().map(|(_, sent, _)| sent).sum();
    eprintln!(
        "kmsd stopped reading one account's {CONNECTIONS} connections after {taken} requests"
    );
    assert!(
        taken < 400,
        "{taken} requests of 32 KiB were taken from one account's connections that read nothing"
    );
    // Another account has its own budget: it is served while root's is full. So are
    // root's small calls on a connection of their own (a hello, a status, an encryption
    // of a record): one program hoarding the account's budget does not lock out the rest.
    let other = as_other(&d, &["status"], b"");
    assert!(
        other.status.success(),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    root_ok(&d, &["--timeout", "20", "status"]);
    let sealed = root_ok(&d, &["--timeout", "20", "encrypt", "sink"]);
    assert!(sealed.starts_with("ncpkms:v1:"), "{sealed}");
    // Read again: the rest of each cut frame goes out, and every request is answered.
    let readers: Vec<_> = stalled
        .into_iter()
        .map(|(s, sent, partial)| {
            std::thread::spawn(move || {
                let answered = read_every_ciphertext(s, sent, partial);
                assert_eq!(answered.len(), sent as usize + 1);
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
}
