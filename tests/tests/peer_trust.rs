//! Who serves the socket (SPEC §1). Without `$XDG_RUNTIME_DIR` a user's default socket is
//! `/tmp/kms-$UID/kmsd.sock`, and any other local user can create that directory first
//! and serve a daemon of their own there. A client trusts a daemon only if it runs as the
//! client's account or root, or owns the directory holding its socket in a root-owned
//! parent closed to others (as `/run/kms` for the system service's account); kmsd puts
//! its socket only in a directory of its own account or root's, and serves only a data
//! directory of its own account.
//!
//! The other account is `kmstest` (created by .ci/install-deps); the tests run as root.

#![allow(clippy::unwrap_used)]

use kms_e2e::bin;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const OTHER: &str = "kmstest";

/// The uid of `account`, or `None` (the test is then skipped) when it is missing or the
/// tests do not run as root (needed to act as another account).
fn other_uid() -> Option<u32> {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run a daemon as {OTHER}");
        return None;
    }
    let out = Command::new("id").args(["-u", OTHER]).output().ok()?;
    assert!(
        out.status.success(),
        "the test account {OTHER} is missing: run .ci/install-deps as root"
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32) {
    rustix::fs::chown(p, Some(rustix::fs::Uid::from_raw(uid)), None).unwrap();
}

/// A directory `path` (made here) of `uid`, with `mode`.
fn dir_of(path: &Path, uid: u32, mode: u32) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    chmod(path, mode);
    chown(path, uid);
    path.to_path_buf()
}

/// A kmsd run by `OTHER` on `socket`, stopped when dropped.
struct OthersDaemon {
    child: Child,
    log: PathBuf,
}

impl OthersDaemon {
    /// Starts it and waits until its socket accepts.
    fn start(socket: &Path, data_dir: &Path, log: &Path) -> OthersDaemon {
        let child = Command::new("setpriv")
            .args([
                &format!("--reuid={OTHER}"),
                &format!("--regid={OTHER}"),
                "--init-groups",
            ])
            .arg(bin("kmsd"))
            .arg("--socket")
            .arg(socket)
            .arg("--data-dir")
            .arg(data_dir)
            .env("KMS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut d = OthersDaemon {
            child,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(socket).is_err() {
            assert!(
                d.child.try_wait().unwrap().is_none(),
                "kmsd as {OTHER} exited:\n{}",
                d.log()
            );
            assert!(Instant::now() < deadline, "not ready:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OthersDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Root's `kmsctl --json ARGS` with `$KMS_SOCKET` = `socket` (a default socket: autostart
/// allowed), its data directory under `dir`.
fn kmsctl_on(dir: &Path, socket: &Path, args: &[&str]) -> Output {
    Command::new(bin("kmsctl"))
        .arg("--json")
        .args(args)
        .env("KMS_SOCKET", socket)
        .env("XDG_DATA_HOME", dir.join("xdg"))
        .env_remove("STATE_DIRECTORY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Another account made the victim's `/tmp/kms-$UID` first (its own directory, 0755, in
/// a world-writable sticky directory, as /tmp) and serves a kmsd there. The victim's
/// client refuses it, by `$KMS_SOCKET` and by `--socket`, naming the socket, the daemon's
/// uid and why, and starts no daemon of its own. (It used to connect, and send it every
/// plaintext.) The same account's daemon in a directory a root-owned, closed parent gave
/// it (the shape of /run/kms for the system service's account) is trusted.
#[test]
fn a_daemon_of_another_account_is_trusted_only_in_a_directory_root_gave_it() {
    let Some(uid) = other_uid() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    // Other accounts must be able to reach the directories below.
    chmod(t.path(), 0o755);
    let tmp = dir_of(&t.path().join("tmp"), 0, 0o1777);
    let squat = dir_of(&tmp.join("kms-0"), uid, 0o755);
    let socket = squat.join("kmsd.sock");
    let squatter = OthersDaemon::start(&socket, &squat.join("data"), &t.path().join("squat.log"));

    for out in [
        kmsctl_on(t.path(), &socket, &["status"]),
        kmsctl_on(
            t.path(),
            &t.path().join("unused.sock"),
            &["--socket", socket.to_str().unwrap(), "status"],
        ),
        kmsctl_on(t.path(), &socket, &["encrypt", "any-key"]),
    ] {
        let message =
            kms_e2e::status_or_error(&out).expect_err("the squatter's daemon was trusted");
        assert!(
            message.contains(&format!("refusing the kmsd on {}", socket.display())),
            "{message}"
        );
        assert!(message.contains(&format!("uid {uid}")), "{message}");
        assert!(message.contains("writable by others"), "{message}");
        assert_eq!(out.status.code(), Some(69), "{message}");
    }
    // No daemon of root's was started beside it.
    assert!(!t.path().join("xdg").exists());
    drop(squatter);

    // /run/kms's shape: root's /run (0755) holds the account's own directory.
    let run = dir_of(&t.path().join("run"), 0, 0o755);
    let kms = dir_of(&run.join("kms"), uid, 0o750);
    let socket = kms.join("kmsd.sock");
    let _service = OthersDaemon::start(&socket, &kms.join("data"), &t.path().join("run.log"));
    let out = kmsctl_on(t.path(), &socket, &["status"]);
    let status = kms_e2e::status_or_error(&out).expect("the service-shaped daemon was refused");
    assert_eq!(status["socket"].as_str(), socket.to_str());
}

/// kmsd puts its socket only in a directory of its own account or root's: root's client,
/// finding no daemon in a `/tmp/kms-$UID` another account made, starts a kmsd that
/// refuses that directory, says whose it is, and leaves it as it was. (kmsd used to
/// accept any directory others could not write, and serve there.)
#[test]
fn kmsd_refuses_a_socket_directory_another_account_made() {
    let Some(uid) = other_uid() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let tmp = dir_of(&t.path().join("tmp"), 0, 0o1777);
    let squat = dir_of(&tmp.join("kms-0"), uid, 0o755);
    let socket = squat.join("kmsd.sock");
    let out = kmsctl_on(t.path(), &socket, &["status"]);
    let message =
        kms_e2e::status_or_error(&out).expect_err("kmsd served in the other account's directory");
    assert!(message.contains("exited"), "{message}");
    assert!(
        message.contains(&format!("belongs to {OTHER} (uid {uid})")),
        "{message}"
    );
    assert!(!socket.exists());
    let meta = std::fs::metadata(&squat).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (uid, 0o755));
}

/// A root kmsd refuses to serve a data directory of another account (root's default,
/// /var/lib/kms, is the system service's store, owned by kms): it exits with an error
/// naming the directory's owner, and its socket never accepts. (It used to serve it.)
#[test]
fn kmsd_refuses_to_serve_another_accounts_data_directory() {
    let Some(uid) = other_uid() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let data = dir_of(&t.path().join("data"), uid, 0o700);
    let socket = t.path().join("run/kmsd.sock");
    let log = t.path().join("kmsd.log");
    let mut child = Command::new(bin("kmsd"))
        .arg("--socket")
        .arg(&socket)
        .arg("--data-dir")
        .arg(&data)
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if UnixStream::connect(&socket).is_ok() || Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kmsd serves another account's data directory:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(
        text.contains(&format!("belongs to {OTHER} (uid {uid})")),
        "{text}"
    );
    assert!(!socket.exists(), "{text}");
}
