//! Autostart (SPEC §1): a client that finds no daemon on the default socket starts the
//! `kmsd` beside its own executable, as the README's first command relies on; a daemon
//! that cannot start is reported at once, with the reason from its log.

#![allow(clippy::unwrap_used)]

use kms_e2e::bin;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// `kmsctl ARGS` (the program at `kmsctl`) on the default socket of an environment inside
/// `dir`: `$KMS_SOCKET` and `$STATE_DIRECTORY` point there, so nothing outside is touched.
fn kmsctl_in(dir: &Path, kmsctl: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(kmsctl);
    cmd.args(args)
        .env("KMS_SOCKET", dir.join("run/kmsd.sock"))
        .env("STATE_DIRECTORY", dir.join("data"))
        .env_remove("CREDENTIALS_DIRECTORY")
        .env("KMS_LOG", "info");
    // A file just written may still be open in a child another test forked meanwhile
    // (until that child's exec): "text file busy" for a moment.
    for _ in 0..100 {
        match cmd.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.unwrap(),
        }
    }
    panic!("{} stayed busy", kmsctl.display());
}

#[test]
fn a_client_starts_the_daemon_on_the_default_socket() {
    let dir = tempfile::tempdir().unwrap();
    let out = kmsctl_in(dir.path(), &bin("kmsctl"), &["--json", "status"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pid = status["pid"].as_u64().unwrap() as i32;
    // The started daemon has no terminal: its log is kept in its data directory.
    let log = dir.path().join("data/kmsd.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("ready")) {
        assert!(Instant::now() < deadline, "no log at {}", log.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    // A second client finds it running and starts nothing.
    let again = kmsctl_in(dir.path(), &bin("kmsctl"), &["--json", "status"]);
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["pid"].as_u64(), Some(pid as u64));
    // An explicit socket never autostarts.
    let explicit = dir.path().join("elsewhere.sock");
    let out = kmsctl_in(
        dir.path(),
        &bin("kmsctl"),
        &["--socket", explicit.to_str().unwrap(), "status"],
    );
    assert!(!out.status.success());
    assert!(!explicit.exists());
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{pid}")).exists() {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if state.contains(") Z ") {
            break;
        }
        assert!(Instant::now() < deadline, "kmsd {pid} did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A kmsd that exits at once is reported as such, with its last words, without waiting
/// out the 10 s a slow start is given.
#[test]
fn a_daemon_that_cannot_start_is_reported_at_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let kmsctl = dir.path().join("kmsctl");
    std::fs::copy(bin("kmsctl"), &kmsctl).unwrap();
    let kmsd = dir.path().join("kmsd");
    std::fs::write(
        &kmsd,
        "#!/bin/sh\necho 'kmsd: the store is locked by a test' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&kmsd, std::fs::Permissions::from_mode(0o755)).unwrap();
    let started = Instant::now();
    let out = kmsctl_in(dir.path(), &kmsctl, &["status"]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("exited"), "{stderr}");
    assert!(stderr.contains("the store is locked by a test"), "{stderr}");
    assert!(took < Duration::from_secs(5), "took {took:?}: {stderr}");
}
