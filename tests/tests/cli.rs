//! kmsctl against a real kmsd, for what a person meets at the prompt: the text output
//! and the command-line conveniences found wanting in a walkthrough as a user.

#![allow(clippy::unwrap_used)]

use kms_e2e::{TestDaemon, json, ok};
use std::time::{Duration, Instant};

/// `grant --user 0` grants to the account of uid 0 (grants name accounts: kmsd refused
/// "no user named \"0\""), `--group 0` to its group; `revoke` takes the number as well; a
/// uid with no account is refused before anything is sent, with invalid-argument (5).
#[test]
fn grant_accepts_a_numeric_uid_or_gid() {
    let d = TestDaemon::start();
    ok(&d.kmsctl(&["create", "shared", "--type", "aes256"], b""));
    let g = json(&d.kmsctl(
        &[
            "--json", "grant", "key-user", "--user", "0", "--key", "shared",
        ],
        b"",
    ));
    assert_eq!(
        (&g["principal_type"], &g["principal"]),
        (&"user".into(), &"root".into())
    );
    let g = json(&d.kmsctl(&["--json", "grant", "key-reviewer", "--group", "0"], b""));
    assert_eq!(
        (&g["principal_type"], &g["principal"]),
        (&"group".into(), &"root".into())
    );
    let listed = ok(&d.kmsctl(&["grants"], b""));
    assert!(listed.contains("user root"), "{listed}");
    assert!(listed.contains("group root"), "{listed}");
    ok(&d.kmsctl(
        &["revoke", "key-user", "--user", "0", "--key", "shared"],
        b"",
    ));
    ok(&d.kmsctl(&["revoke", "key-reviewer", "--group", "root"], b""));
    assert_eq!(
        json(&d.kmsctl(&["--json", "grants"], b"")),
        serde_json::json!([])
    );

    let out = d.kmsctl(&["grant", "key-user", "--user", "4242424"], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert_eq!(
        stderr,
        "error: invalid-argument: no account has uid 4242424\n"
    );
}

/// `kmsctl versions` shows `-` for the encryptions of RSA and ECDSA versions (kmsd counts
/// only AES encryptions, and reports 0 for the others: RSA showed 0 after encrypting),
/// null with --json; AES versions keep their count. `enable-version` prints the same.
#[test]
fn versions_count_only_aes_encryptions() {
    let d = TestDaemon::start();
    for (name, t) in [("aes", "aes256"), ("rsa", "rsa2048"), ("ecc", "ecdsa")] {
        ok(&d.kmsctl(&["create", name, "--type", t], b""));
    }
    ok(&d.kmsctl(&["encrypt", "aes"], b"x"));
    ok(&d.kmsctl(&["encrypt", "rsa"], b"x"));
    let count_of = |key: &str| {
        let text = ok(&d.kmsctl(&["versions", key], b""));
        let row = text.lines().nth(1).unwrap().to_string();
        let v = json(&d.kmsctl(&["--json", "versions", key], b""));
        (
            row.split_whitespace().last().unwrap().to_string(),
            v[0]["encryptions"].clone(),
        )
    };
    assert_eq!(count_of("aes"), ("1".into(), 1.into()));
    assert_eq!(count_of("rsa"), ("-".into(), serde_json::Value::Null));
    assert_eq!(count_of("ecc"), ("-".into(), serde_json::Value::Null));
    let enabled = ok(&d.kmsctl(&["enable-version", "rsa", "1"], b""));
    assert!(
        enabled.lines().nth(1).unwrap().ends_with("  -"),
        "{enabled}"
    );
}

/// `kmsctl show` prints `memo: -` for a key without memo, as for every other empty field
/// (it printed `memo: ` with nothing after it); JSON keeps `""`.
#[test]
fn show_prints_an_empty_memo_as_a_dash() {
    let d = TestDaemon::start();
    ok(&d.kmsctl(&["create", "plain", "--type", "aes256"], b""));
    let text = ok(&d.kmsctl(&["show", "plain"], b""));
    assert!(text.ends_with("\nmemo: -\n"), "{text}");
    assert!(text.contains("\nhsm: -\n"), "{text}");
    assert_eq!(
        json(&d.kmsctl(&["--json", "show", "plain"], b""))["memo"],
        ""
    );
    ok(&d.kmsctl(&["set-memo", "plain", "card vault"], b""));
    let text = ok(&d.kmsctl(&["show", "plain"], b""));
    assert!(text.ends_with("\nmemo: card vault\n"), "{text}");
}

/// What `enable-version --help` says: kmsd sets a version's flag idempotently (PROTOCOL
/// §5.6), so enabling an enabled version (or disabling a disabled one) exits 0, while
/// enabling an enabled key is invalid-state, exit 7. kmsctl passes both answers on.
#[test]
fn version_flags_are_idempotent_unlike_key_states() {
    let d = TestDaemon::start();
    ok(&d.kmsctl(&["create", "vkey", "--type", "aes256"], b""));
    ok(&d.kmsctl(&["enable-version", "vkey", "1"], b""));
    ok(&d.kmsctl(&["disable-version", "vkey", "1"], b""));
    ok(&d.kmsctl(&["disable-version", "vkey", "1"], b""));
    ok(&d.kmsctl(&["enable-version", "vkey", "1"], b""));
    let out = d.kmsctl(&["enable", "vkey"], b"");
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: invalid-state: "));
    let help = d.kmsctl(&["enable-version", "--help"], b"");
    assert!(String::from_utf8_lossy(&help.stdout).contains("idempotently"));
    // A disabled key's versions keep their own flags; a note on standard error says
    // that none works (SPEC §3: the key's state is every version's).
    ok(&d.kmsctl(&["disable", "vkey"], b""));
    let listed = d.kmsctl(&["versions", "vkey"], b"");
    assert!(listed.status.success());
    let note = String::from_utf8_lossy(&listed.stderr);
    assert!(
        note.contains("key vkey is disabled: no version works"),
        "{note}"
    );
    assert!(!String::from_utf8_lossy(&listed.stdout).contains("note"));
}

/// `--timeout` bounds a run against a daemon that does not answer (here stopped with
/// SIGSTOP: the kernel still queues the connection): exit 75, kind `timeout`, saying that
/// nothing was sent; without a stopped daemon the same command answers at once.
#[test]
fn a_timeout_ends_a_run_on_a_daemon_that_does_not_answer() {
    use rustix::process::{Pid, Signal, kill_process};
    let d = TestDaemon::start();
    ok(&d.kmsctl(&["create", "k01", "--type", "aes256"], b""));
    ok(&d.kmsctl(&["--timeout", "5", "show", "k01"], b""));
    let pid = Pid::from_raw(d.pid().unwrap() as i32).unwrap();
    kms_e2e::stop_process(d.pid().unwrap());
    let started = std::time::Instant::now();
    let out = d.kmsctl(&["--json", "--timeout", "0.3", "show", "k01"], b"");
    let waited = started.elapsed();
    kill_process(pid, Signal::CONT).unwrap();
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["error"]["kind"], "timeout", "{e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("no request was sent"), "{message}");
    // The time given, and not much more: not the 90 s the handshake would otherwise
    // wait (the upper bound leaves room for a loaded machine starting the process).
    assert!(
        waited >= std::time::Duration::from_millis(300),
        "{waited:?}"
    );
    assert!(waited < std::time::Duration::from_secs(10), "{waited:?}");
    ok(&d.kmsctl(&["--timeout", "5", "show", "k01"], b""));
}

/// `kmsctl backup FILE` writes through a temporary file of its own: a `FILE.tmp` that
/// was there before is left as it was (it used to be deleted), and no temporary file is
/// left behind, after a backup or after a refusal.
#[test]
fn backup_leaves_other_files_alone() {
    let d = TestDaemon::start();
    ok(&d.kmsctl(&["create", "k01", "--type", "aes256"], b""));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kms.backup");
    let precious = dir.path().join("kms.backup.tmp");
    std::fs::write(&precious, b"precious").unwrap();
    let names = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    ok(&d.kmsctl(&["backup", file.to_str().unwrap()], b""));
    assert_eq!(std::fs::read(&precious).unwrap(), b"precious");
    assert_eq!(names(), ["kms.backup", "kms.backup.tmp"]);
    let again = d.kmsctl(&["backup", file.to_str().unwrap()], b"");
    assert_eq!(again.status.code(), Some(4), "{again:?}");
    assert_eq!(names(), ["kms.backup", "kms.backup.tmp"]);
}

/// `backup --force` replaces a regular file only: a FIFO, a symbolic link and a directory
/// are refused (exit 5) and left as they were — it used to rename the backup over them
/// (`/dev/null` became a regular file holding the store). `backup -` writes the backup to
/// standard output, what was written said on standard error.
#[test]
fn backup_replaces_only_regular_files_and_streams_to_stdout() {
    let d = TestDaemon::start();
    ok(&d.kmsctl(&["create", "k01", "--type", "aes256"], b""));
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let target = dir.path().join("target");
    std::fs::write(&target, b"kept").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let subdir = dir.path().join("subdir");
    std::fs::create_dir(&subdir).unwrap();
    for path in [&fifo, &link, &subdir] {
        let out = d.kmsctl(&["backup", "--force", path.to_str().unwrap()], b"");
        assert_eq!(out.status.code(), Some(5), "{path:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("replaces only a regular file"), "{stderr}");
    }
    let kind = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().file_type();
    use std::os::unix::fs::FileTypeExt as _;
    assert!(kind(&fifo).is_fifo());
    assert!(kind(&link).is_symlink());
    assert!(kind(&subdir).is_dir());
    assert_eq!(std::fs::read(&target).unwrap(), b"kept");
    // A regular file is replaced.
    ok(&d.kmsctl(&["backup", "--force", target.to_str().unwrap()], b""));
    let file = std::fs::read(&target).unwrap();
    assert!(file.len() > 4096, "{}", file.len());

    let streamed = d.kmsctl(&["backup", "-"], b"");
    assert_eq!(streamed.status.code(), Some(0), "{streamed:?}");
    let said = String::from_utf8_lossy(&streamed.stderr);
    assert!(
        said.contains(&format!("({} bytes)", streamed.stdout.len())),
        "{said}"
    );
    // A store like the one in the file (redb's header first).
    assert_eq!(streamed.stdout[..9], file[..9]);
    // With --json, an error goes to stderr too: stdout is the backup's.
    let gone = dir.path().join("no.sock");
    let failed = std::process::Command::new(kms_e2e::bin("kmsctl"))
        .args(["--json", "--socket", gone.to_str().unwrap(), "backup", "-"])
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(69), "{failed:?}");
    assert!(failed.stdout.is_empty(), "{failed:?}");
    let e: serde_json::Value = serde_json::from_slice(&failed.stderr).unwrap();
    assert_eq!(e["error"]["kind"], "connect", "{e}");
}

/// `backup -` into a pipe whose reader has stalled still ends on SIGTERM (or Ctrl-C)
/// with exit 130, as documented: kmsctl sat in the write, deaf to both, until the reader
/// went away, and then ended with 74 (found following the README as a new user).
#[test]
fn a_backup_to_a_stalled_pipe_ends_on_sigterm() {
    let d = TestDaemon::start();
    // A store well over what a pipe holds (64 KiB), so that the write blocks.
    let store = || {
        std::fs::metadata(d.data_dir.join("kms.redb"))
            .unwrap()
            .len()
    };
    let mut n = 0;
    while store() < 192 * 1024 {
        n += 1;
        assert!(n < 400, "the store stays at {} bytes", store());
        ok(&d.kmsctl(
            &[
                "create",
                &format!("k{n:03}"),
                "--type",
                "aes256",
                "--memo",
                &"m".repeat(90),
            ],
            b"",
        ));
    }
    let mut child = std::process::Command::new(kms_e2e::bin("kmsctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["backup", "-"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody reads its stdout: wait until it has filled the pipe (its write blocks).
    let pipe = child.stdout.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // FIONREAD: bytes waiting in the pipe.
        let queued = rustix::io::ioctl_fionread(&pipe).unwrap();
        if queued >= 60 * 1024 {
            break;
        }
        assert!(Instant::now() < deadline, "kmsctl wrote {queued} bytes");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "kmsctl did not end on SIGTERM while its output stalled"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(pipe);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
}

/// A daemon configured with a smaller `max_frame` (64 KiB) says so in its hello, and
/// kmsctl sizes its batches to it: four 32 KiB plaintexts go in requests that fit. Before,
/// every batch over the limit ended with the daemon closing the connection, reported as
/// a connection failure (exit 69) that "may have been carried out".
#[test]
fn batches_fit_a_daemon_with_a_smaller_max_frame() {
    use base64::Engine as _;
    let d = TestDaemon::start_with(kms_e2e::DaemonOptions {
        config: Some("max_frame = 65536\n".into()),
        ..Default::default()
    });
    ok(&d.kmsctl(&["create", "k01", "--type", "aes256"], b""));
    let line = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 32 * 1024]);
    let input = format!("{line}\n{line}\n{line}\n{line}\n");
    let out = ok(&d.kmsctl(&["encrypt", "k01", "--batch"], input.as_bytes()));
    let ciphertexts: Vec<&str> = out.lines().collect();
    assert_eq!(ciphertexts.len(), 4, "{out}");
    assert!(
        ciphertexts.iter().all(|c| c.starts_with("ncpkms:v1:")),
        "{out}"
    );
}

/// kmsctl with nobody reading its output (`… | true`: the pipe's reader is gone, the
/// write fails with EPIPE): the exit code still tells. `verify` of a wrong signature
/// exits 1 and a batch with a failed item that item's code; they exited 0.
#[test]
fn an_unread_output_keeps_the_exit_code() {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let d = TestDaemon::start();
    let unread = |args: &[&str], stdin: &[u8]| {
        let mut child = Command::new(kms_e2e::bin("kmsctl"))
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait().unwrap().code()
    };
    ok(&d.kmsctl(&["create", "ec1", "--type", "ecdsa"], b""));
    ok(&d.kmsctl(&["create", "aes1", "--type", "aes256"], b""));
    let signature = ok(&d.kmsctl(&["sign", "ec1"], b"message"));
    let signature = signature.trim();
    let verify = ["verify", "ec1", "--signature", signature];
    assert_eq!(unread(&verify, b"message"), Some(0));
    assert_eq!(unread(&verify, b"another message"), Some(1));
    let json_verify = ["--json", "verify", "ec1", "--signature", signature];
    assert_eq!(unread(&json_verify, b"another message"), Some(1));
    let ciphertext = ok(&d.kmsctl(&["encrypt", "aes1"], b"hi"));
    let lines = format!("{}ncpkms:v1:AAAA\n", ciphertext);
    assert_eq!(
        unread(&["decrypt", "aes1", "--batch"], lines.as_bytes()),
        Some(11)
    );
    assert_eq!(
        unread(&["decrypt", "aes1", "--batch"], ciphertext.as_bytes()),
        Some(0)
    );
}

/// An input larger than any request is refused once a request's worth has been read:
/// `kmsctl encrypt k < /dev/zero` exits 6 (too-large) instead of reading until memory
/// runs out.
#[test]
fn an_endless_input_is_refused_not_read() {
    use std::process::{Command, Stdio};
    let d = TestDaemon::start();
    ok(&d.kmsctl(&["create", "aes1", "--type", "aes256"], b""));
    for command in ["encrypt", "sign"] {
        let out = Command::new(kms_e2e::bin("kmsctl"))
            .arg("--socket")
            .arg(&d.socket)
            .args(["--json", command, "aes1"])
            .stdin(Stdio::from(std::fs::File::open("/dev/zero").unwrap()))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(6), "{out:?}");
        let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(e["error"]["kind"], "too-large", "{e}");
    }
}

/// With `--json` the error report goes to stdout; when stdout is what failed (a full
/// disk), it goes to stderr instead. `kmsctl --json rotate k >/dev/full` exited 74
/// without a word although the rotation landed, so a script retried it.
#[test]
fn a_json_report_that_cannot_be_written_goes_to_stderr() {
    let d = TestDaemon::start();
    ok(&d.kmsctl(&["create", "k01", "--type", "AES256"], b""));
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = std::process::Command::new(kms_e2e::bin("kmsctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["--json", "rotate", "k01"])
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(74), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.starts_with("error: io: standard output: "), "{said}");
    assert!(said.contains("what it did stands"), "{said}");
    // The rotation it could not print landed, as the message's reader must know.
    assert_eq!(
        json(&d.kmsctl(&["--json", "show", "k01"], b""))["current_version"],
        2
    );
}

/// A convergent key refuses a decryption without a context by saying what it needs:
/// the refusal said "not empty", yet an empty context is taken for decryption.
#[test]
fn a_convergent_decryption_without_a_context_says_what_it_needs() {
    let d = TestDaemon::start();
    ok(&d.kmsctl(
        &["create", "dedupe", "--type", "aes256", "--convergent"],
        b"",
    ));
    let ct = ok(&d.kmsctl(&["encrypt", "dedupe", "--context", "c"], b"x"));
    let out = d.kmsctl(&["decrypt", "dedupe"], ct.as_bytes());
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("the context it was encrypted under"),
        "{said}"
    );
    assert!(!said.contains("not empty"), "{said}");
}
