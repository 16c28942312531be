//! The command-line surface of the two binaries, without a daemon.
//!
//! Besides checking exit codes and messages a script relies on, this integration test makes
//! `cargo test --workspace` build `kmsctl` and `kms-tui` (Cargo builds a package's binaries
//! only for its own integration tests), which the end-to-end suite in `tests/` runs.

use std::process::Command;

fn kmsctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kmsctl"))
}

#[test]
fn kmsctl_lists_every_command() {
    let out = kmsctl().arg("--help").output().expect("run kmsctl");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "create", "encrypt", "decrypt", "rotate", "delete", "history", "watch", "grant", "hsm",
    ] {
        assert!(help.contains(cmd), "kmsctl --help lacks {cmd}:\n{help}");
    }
}

#[test]
fn kmsctl_unreachable_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("absent.sock");
    let out = kmsctl()
        .arg("--socket")
        .arg(&socket)
        .arg("list")
        .output()
        .expect("run kmsctl");
    // EX_UNAVAILABLE: a script can tell "no daemon" from "bad arguments" (2).
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to kmsd"), "{err}");
    assert!(err.contains(&socket.display().to_string()), "{err}");
}

#[test]
fn kmsctl_bad_arguments_exit_2() {
    let out = kmsctl()
        .args(["list", "--bogus"])
        .output()
        .expect("run kmsctl");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn kms_tui_help_names_the_socket_option() {
    let out = Command::new(env!("CARGO_BIN_EXE_kms-tui"))
        .arg("--help")
        .output()
        .expect("run kms-tui");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--socket") && help.contains("--no-autostart"),
        "{help}"
    );
}
