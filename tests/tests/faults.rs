//! Faults of the machine under a real kmsd (SPEC §9, §14): a read-only data directory, a
//! full disk in the middle of writes, a truncated or corrupted store file, a broken root
//! key. A wrong or missing root key (refused, store byte for byte unchanged) is covered
//! by `root_key_from_credentials_directory` in systemd.rs; an injected storage error at
//! the redb layer by kmsd/tests/reliability.rs.
//!
//! The read-only and disk-full cases mount a tmpfs, so they need root (CI runs as root);
//! as another user they say so and return.

#![allow(clippy::unwrap_used)]

use kms_e2e::{DaemonOptions, TestDaemon, bin};
use kms_shared::client::Client;
use kms_shared::model::KeyType;
use kms_shared::protocol::{CreateKey, ErrorKind};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A mount that is undone when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg("tmpfs")
            .arg(dir));
        Mount(dir.to_path_buf())
    }

    /// `dir` itself, read-only from now on.
    fn read_only(dir: &Path) -> Mount {
        run(Command::new("mount").arg("--bind").arg(dir).arg(dir));
        let m = Mount(dir.to_path_buf());
        run(Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(dir));
        m
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs kmsd on `data` until it exits (it must, within 30 s); returns (code, stderr).
fn kmsd_exits(tmp: &Path, data: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(bin("kmsd"))
        .arg("--socket")
        .arg(tmp.join("refused.sock"))
        .arg("--data-dir")
        .arg(data)
        .env("KMS_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("kmsd kept running on a store it should refuse");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn aes(name: &str) -> CreateKey {
    CreateKey {
        name: name.into(),
        key_type: KeyType::Aes256,
        protection: Default::default(),
        convergent: false,
        auto_rotation: false,
        rotation_days: None,
        memo: "m".repeat(100),
        hsm: None,
    }
}

/// A store with two keys and some ciphertexts, stopped cleanly; returns the ciphertexts.
async fn populated(d: &mut TestDaemon) -> Vec<(Vec<u8>, String)> {
    let cts = {
        let c = d.client().await;
        c.create_key(aes("faulty")).await.unwrap();
        c.create_key(aes("other")).await.unwrap();
        let mut cts = Vec::new();
        for i in 0..40 {
            let pt = format!("secret {i}").into_bytes();
            cts.push((pt.clone(), c.encrypt("faulty", &pt, None).await.unwrap()));
            if i % 10 == 9 {
                c.rotate("faulty").await.unwrap();
            }
        }
        cts
    };
    assert_eq!(d.stop(), Some(0));
    cts
}

/// A read-only data directory, empty or holding a store: kmsd exits non-zero at once
/// with an error naming the directory and the cause, and changes nothing.
#[test]
fn read_only_data_directory_is_refused() {
    if !is_root() {
        println!("skipped: mounting a read-only directory needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Empty.
    let empty = tmp.path().join("empty");
    let _m = Mount::tmpfs(&empty, "1m");
    let _ro = Mount::read_only(&empty);
    let (code, err) = kmsd_exits(tmp.path(), &empty);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("kmsd: error:"), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(err.contains(&empty.display().to_string()), "{err}");

    // Holding a store.
    let mut d = TestDaemon::start();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(populated(&mut d));
    let store = d.data_dir.join("kms.redb");
    let before = std::fs::read(&store).unwrap();
    let _ro = Mount::read_only(&d.data_dir);
    let (code, err) = kmsd_exits(tmp.path(), &d.data_dir);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(
        std::fs::read(&store).unwrap() == before,
        "the store changed"
    );
    println!(
        "read-only data directory: {}",
        err.lines().last().unwrap_or("")
    );
}

/// The disk fills up while keys are created: the failing call is answered `internal`,
/// reads go on, nothing acknowledged is lost, and once space returns writes succeed
/// again without a restart; after a restart everything acknowledged is there and the
/// store passes redb's integrity check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_internal_and_recovers() {
    if !is_root() {
        println!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("small");
    // Room for the call journal (8 MiB, allocated at start) and a little store.
    let _m = Mount::tmpfs(&data, "12m");
    let mut d = TestDaemon::start_with(DaemonOptions {
        data_dir: Some(data.clone()),
        ..DaemonOptions::default()
    });
    // The journal fitted: the calls below go through it, as on a disk with room.
    assert!(
        !d.log_text().contains("running without the call journal"),
        "{}",
        d.log_text()
    );
    let c = d.client().await;
    c.create_key(aes("full")).await.unwrap();
    let mut acked = Vec::new();
    for i in 0..20 {
        let pt = format!("before {i}").into_bytes();
        acked.push((pt.clone(), c.encrypt("full", &pt, None).await.unwrap()));
    }

    // Fill the file system.
    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[0u8; 16 * 1024]).is_ok() {}
        while f.write_all(&[0u8; 512]).is_ok() {}
    }
    // Create keys until the store cannot grow; everything acknowledged is remembered.
    let mut created = Vec::new();
    let mut refused = None;
    for i in 0..5000 {
        let name = format!("key{i}");
        match c.create_key(aes(&name)).await {
            Ok(_) => created.push(name),
            Err(e) => {
                assert_eq!(e.kind(), Some(ErrorKind::Internal), "{e}");
                refused = Some((name, e.to_string()));
                break;
            }
        }
    }
    let (lost, message) = refused.expect("the disk never filled");
    println!("disk full after {} keys: {message}", created.len());
    // Reads go on; the refused key does not exist; crypto calls either answer right
    // or fail `internal` (their history entry cannot be made durable), never wrongly.
    assert!(c.get_key("full").await.is_ok());
    assert_eq!(
        c.list_keys(false, 0, None).await.unwrap().1,
        1 + created.len() as u64
    );
    assert_eq!(
        c.get_key(&lost).await.unwrap_err().kind(),
        Some(ErrorKind::NotFound)
    );
    for (pt, ct) in &acked {
        match c.decrypt("full", ct, None).await {
            Ok(back) => assert_eq!(&back, pt),
            Err(e) => assert_eq!(e.kind(), Some(ErrorKind::Internal), "{e}"),
        }
    }

    // Space returns: writes succeed again, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.create_key(aes("after")).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.kind(), Some(ErrorKind::Internal), "{e}");
                assert!(Instant::now() < deadline, "no recovery: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    for (pt, ct) in &acked {
        assert_eq!(&c.decrypt("full", ct, None).await.unwrap(), pt);
    }
    drop(c);
    assert!(d.log_text().contains("reopened"), "{}", d.log_text());

    // After a restart: everything acknowledged, and a sound store.
    assert_eq!(d.stop(), Some(0));
    assert!(kmsd::store::check_file(&data.join("kms.redb")).unwrap());
    d.restart_with(DaemonOptions {
        data_dir: Some(data.clone()),
        ..DaemonOptions::default()
    });
    let c = Client::connect(&d.socket).await.unwrap();
    for name in created.iter().chain([&"after".to_string()]) {
        c.get_key(name).await.unwrap();
    }
    assert!(c.get_key(&lost).await.is_err());
    for (pt, ct) in &acked {
        assert_eq!(&c.decrypt("full", ct, None).await.unwrap(), pt);
    }
    drop(c);
    d.stop();
}

/// A data directory with no room for the call journal (an 8 MiB file the store keeps
/// beside it) still serves: kmsd says it runs without the journal, and every call is then
/// committed to the store itself — answered, counted and in the history, also after a
/// SIGKILL and a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_room_for_the_journal_still_serves() {
    if !is_root() {
        println!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("small");
    let _m = Mount::tmpfs(&data, "2m");
    let opts = DaemonOptions {
        data_dir: Some(data.clone()),
        ..DaemonOptions::default()
    };
    let mut d = TestDaemon::start_with(opts.clone());
    assert!(
        d.log_text().contains("running without the call journal"),
        "{}",
        d.log_text()
    );
    let c = d.client().await;
    c.create_key(aes("nojournal")).await.unwrap();
    let mut acked = Vec::new();
    for i in 0..20 {
        let pt = format!("call {i}").into_bytes();
        acked.push((pt.clone(), c.encrypt("nojournal", &pt, None).await.unwrap()));
    }
    drop(c);
    d.kill();
    d.restart_with(opts);
    let c = Client::connect(&d.socket).await.unwrap();
    assert_eq!(c.get_key("nojournal").await.unwrap().usage_count, 20);
    let history = c
        .history(kms_shared::protocol::HistoryQuery {
            key: "nojournal".into(),
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap();
    let encrypts = history
        .iter()
        .filter(|h| h.action == kms_shared::model::Action::Encrypt)
        .count();
    assert_eq!(encrypts, 20);
    for (pt, ct) in &acked {
        assert_eq!(&c.decrypt("nojournal", ct, None).await.unwrap(), pt);
    }
    drop(c);
    d.stop();
}

/// Every page is verified at open unless the file is untouched since a clean stop: not
/// after SIGTERM; after SIGKILL by redb's repair (and not a second time); when the file
/// changed after a clean stop, by the full check. The data is served the same either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_page_check_unless_untouched_since_a_clean_stop() {
    const SKIPPED: &str = "full page check skipped";
    const CHECKED: &str = "checking every page of the store";
    const REPAIRED: &str = "repaired after an unclean stop; every page verified";
    let mut d = TestDaemon::start();
    assert!(d.log_text().contains(CHECKED), "{}", d.log_text());
    let cts = populated(&mut d).await;
    let since = |d: &TestDaemon, from: usize| d.log_text()[from..].to_string();

    let mark = d.log_text().len();
    d.restart_with(DaemonOptions::default());
    let log = since(&d, mark);
    assert!(log.contains(SKIPPED) && !log.contains(CHECKED), "{log}");
    let c = d.client().await;
    assert_eq!(
        c.decrypt("faulty", &cts[0].1, None).await.unwrap(),
        cts[0].0
    );
    drop(c);

    d.kill();
    let mark = d.log_text().len();
    d.restart_with(DaemonOptions::default());
    let log = since(&d, mark);
    assert!(log.contains(REPAIRED), "{log}");
    assert!(!log.contains(SKIPPED) && !log.contains(CHECKED), "{log}");
    assert_eq!(d.stop(), Some(0));

    // The same bytes written back: the file changed in the kernel's eyes.
    let store = d.data_dir.join("kms.redb");
    let bytes = std::fs::read(&store).unwrap();
    std::fs::write(&store, &bytes).unwrap();
    let mark = d.log_text().len();
    d.restart_with(DaemonOptions::default());
    let log = since(&d, mark);
    assert!(
        log.contains("reason=\"the file changed after the last clean stop\""),
        "{log}"
    );
    let c = d.client().await;
    for (pt, ct) in &cts {
        assert_eq!(&c.decrypt("faulty", ct, None).await.unwrap(), pt);
    }
    drop(c);
    d.stop();
}

/// A truncated store and a store with a damaged page: kmsd refuses to start with a
/// clear message naming the store, or (a page no commit uses) starts and serves exactly
/// the data it had — never other data. A root key file of the wrong size is refused
/// with a clear error and the store is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_store_is_refused_never_served_wrong() {
    let mut d = TestDaemon::start();
    let cts = populated(&mut d).await;
    let store = d.data_dir.join("kms.redb");
    let good = std::fs::read(&store).unwrap();
    let tmp = d.dir.path().to_path_buf();

    // Truncated to half.
    std::fs::write(&store, &good[..good.len() / 2]).unwrap();
    let (code, err) = kmsd_exits(&tmp, &d.data_dir);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("cannot open the key store"), "{err}");
    assert!(err.contains(&store.display().to_string()), "{err}");
    println!("truncated: {}", err.lines().last().unwrap_or(""));

    // One 4 KiB page overwritten with garbage, for every page of the file (sampled).
    let pages = good.len() / 4096;
    let step = pages.div_ceil(64).max(1);
    let (mut refused, mut served) = (0, 0);
    for page in (0..pages).step_by(step) {
        let mut bad = good.clone();
        for (i, b) in bad[page * 4096..(page + 1) * 4096].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(page as u8) ^ 0x5a;
        }
        std::fs::write(&store, &bad).unwrap();
        let mut probe = std::process::Command::new(bin("kmsd"))
            .arg("--socket")
            .arg(tmp.join("probe.sock"))
            .arg("--data-dir")
            .arg(&d.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let up = loop {
            if let Some(status) = probe.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                probe
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                assert_ne!(status.code(), Some(0));
                assert!(
                    err.contains("cannot open the key store") || err.contains("corrupt"),
                    "page {page}: unclear refusal: {err}"
                );
                break false;
            }
            if std::os::unix::net::UnixStream::connect(tmp.join("probe.sock")).is_ok() {
                break true;
            }
            assert!(
                Instant::now() < deadline,
                "page {page}: kmsd neither served nor exited"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        if up {
            // It started: the damage hit no live page. It must serve exactly the data.
            let c = Client::connect(&tmp.join("probe.sock")).await.unwrap();
            assert_eq!(c.get_key("faulty").await.unwrap().current_version, 5);
            for (pt, ct) in &cts {
                assert_eq!(
                    &c.decrypt("faulty", ct, None).await.unwrap(),
                    pt,
                    "page {page}"
                );
            }
            drop(c);
            served += 1;
        } else {
            refused += 1;
        }
        let _ = probe.kill();
        let _ = probe.wait();
        let _ = std::fs::remove_file(tmp.join("probe.sock"));
    }
    println!("damaged page: refused {refused} times, served correctly {served} times");
    assert!(refused > 0);

    // A root key file of the wrong size: refused, store untouched.
    std::fs::write(&store, &good).unwrap();
    let key = d.data_dir.join("root.key");
    let real_key = std::fs::read(&key).unwrap();
    std::fs::write(&key, &real_key[..16]).unwrap();
    let (code, err) = kmsd_exits(&tmp, &d.data_dir);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("root key"), "{err}");
    assert!(std::fs::read(&store).unwrap() == good, "the store changed");
    println!("short root key: {}", err.lines().last().unwrap_or(""));

    // Repaired by hand: the daemon serves everything again.
    std::fs::write(&key, &real_key).unwrap();
    d.restart_with(DaemonOptions::default());
    let c = d.client().await;
    for (pt, ct) in &cts {
        assert_eq!(&c.decrypt("faulty", ct, None).await.unwrap(), pt);
    }
}

/// A log that cannot be written does not stop kmsd: its lines are dropped. kmsd aborted
/// as soon as one failed — on a full disk under an autostarted daemon's `kmsd.log`, or a
/// log pipe whose reader went away (`kmsd 2>&1 | head`) — because the log's own error
/// report went through `eprintln!`, which panics when stderr is what failed; started with
/// `2>/dev/full`, it exited 101 before it was ready. Both kinds of stderr, each serving
/// calls that log (a create logs a line).
#[test]
fn a_log_that_cannot_be_written_does_not_stop_kmsd() {
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .map(Stdio::from)
            .unwrap()
    };
    for (what, stderr) in [
        ("/dev/full", full as fn() -> Stdio),
        ("a pipe nobody reads", Stdio::piped),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kmsd.sock");
        let mut kmsd = KilledOnDrop(
            Command::new(bin("kmsd"))
                .arg("--socket")
                .arg(&socket)
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .env("KMS_LOG", "debug")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr())
                .spawn()
                .unwrap(),
        );
        let kmsd = &mut kmsd.0;
        // Its reader gone: every later write is EPIPE.
        drop(kmsd.stderr.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while !kms_e2e::is_listening(&socket) {
            assert!(
                kmsd.try_wait().unwrap().is_none(),
                "{what}: kmsd exited before it was ready"
            );
            assert!(Instant::now() < deadline, "{what}: kmsd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        for name in ["k01", "k02", "k03"] {
            let out = Command::new(bin("kmsctl"))
                .arg("--socket")
                .arg(&socket)
                .args(["create", name, "--type", "aes256"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{what}: {out:?}");
        }
        assert!(kmsd.try_wait().unwrap().is_none(), "{what}: kmsd is gone");
        let pid = rustix::process::Pid::from_raw(kmsd.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let status = kmsd.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{what}: {status:?}");
    }
}

/// A child process killed if the test ends before it stops it (a failed assertion).
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `kmsd restore` of a backup with a damaged page refuses it with a message, never as a
/// crash: redb panics reading some damaged pages, and that panic was printed above the
/// refusal ("thread 'main' panicked at … entered unreachable code"; before item 50 it
/// was the whole outcome, exit 101). Every page of a backup is damaged in turn; at least
/// one of them must have made redb panic (its message is in the refusal), or the test
/// would prove nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_backup_is_refused_without_a_crash_report() {
    let mut d = TestDaemon::start();
    {
        let c = d.client().await;
        c.create_key(aes("faulty")).await.unwrap();
        let items: Vec<kms_shared::protocol::PlaintextItem> = (0..50)
            .map(|i| kms_shared::protocol::PlaintextItem {
                plaintext: format!("item {i}").into_bytes().into(),
                context: None,
            })
            .collect();
        for _ in 0..300 {
            c.encrypt_batch("faulty", items.clone()).await.unwrap();
        }
    }
    let backup = d.dir.path().join("good.redb");
    let out = d.kmsctl(&["backup", backup.to_str().unwrap()], b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(d.stop(), Some(0));
    let good = std::fs::read(&backup).unwrap();
    let bad = d.dir.path().join("bad.redb");
    let mut told_by_redb = 0;
    for offset in (0..good.len()).step_by(4096) {
        let mut damaged = good.clone();
        let end = (offset + 4).min(damaged.len());
        damaged[offset..end].copy_from_slice(&[0xa5, 0x5a, 0xff, 0x00][..end - offset]);
        std::fs::write(&bad, &damaged).unwrap();
        let out = Command::new(bin("kmsd"))
            .args(["restore", "--force", "--data-dir"])
            .arg(&d.data_dir)
            .arg(&bad)
            .env_remove("CREDENTIALS_DIRECTORY")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            !said.contains("panicked"),
            "offset {offset}: a crash report, not a refusal: {said}"
        );
        if !out.status.success() {
            assert_eq!(out.status.code(), Some(1), "offset {offset}: {said}");
            told_by_redb += usize::from(said.contains("redb failed reading it"));
        }
    }
    assert!(told_by_redb > 0, "no damaged page made redb panic");
}
