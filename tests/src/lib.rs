//! The end-to-end harness: a real `kmsd` binary on a temporary socket and data directory,
//! driven through the real client library and the real `kmsctl` binary.

pub mod scale;
pub mod softhsm;

use kms_shared::client::Client;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The directory holding the workspace's built binaries: `KMS_BIN_DIR` if set (to run the
/// tests against another build, e.g. `target/release`), else next to the test executable.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KMS_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // A test runs from target/<profile>/deps/, a binary (kms-bench) from target/<profile>/.
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary; panics with a clear message if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} not found: build the workspace first (cargo build --workspace)",
        p.display()
    );
    p
}

/// A plain key: basic protection, no automatic rotation, no memo.
pub fn key_spec(
    name: &str,
    key_type: kms_shared::model::KeyType,
) -> kms_shared::protocol::CreateKey {
    kms_shared::protocol::CreateKey::new(name, key_type)
}

/// A running kmsd in its own temporary directory.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    /// The child leads a process group of its own (a `faketime` wrapper runs kmsd as its
    /// child, and SIGKILL cannot be forwarded: killing the group reaches kmsd too).
    own_group: bool,
}

/// How to start a daemon.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// Lines of TOML for `--config`.
    pub config: Option<String>,
    /// Run under `faketime` with this offset (e.g. "+73h"): only the daemon's wall clock moves.
    pub faketime: Option<String>,
    pub extra_args: Vec<String>,
    /// Extra environment variables of the daemon (e.g. `CREDENTIALS_DIRECTORY`).
    pub env: Vec<(String, String)>,
    /// Use this data directory instead of a fresh one inside the temporary directory.
    pub data_dir: Option<PathBuf>,
    /// Run in a user namespace of its own that maps only root (`unshare --map-root-user`),
    /// as in a rootless container: every other account reads there as the overflow uid.
    pub user_namespace: bool,
}

impl TestDaemon {
    pub fn start() -> TestDaemon {
        Self::start_with(DaemonOptions::default())
    }

    pub fn start_with(opts: DaemonOptions) -> TestDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("run").join("kmsd.sock");
        let data_dir = opts
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        let log = dir.path().join("kmsd.log");
        let mut d = TestDaemon {
            dir,
            socket,
            data_dir,
            log,
            child: None,
            own_group: false,
        };
        d.spawn(&opts);
        d
    }

    fn spawn(&mut self, opts: &DaemonOptions) {
        let mut args: Vec<String> = vec![
            "--socket".into(),
            self.socket.display().to_string(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
        ];
        if let Some(cfg) = &opts.config {
            let p = self.dir.path().join("kmsd.toml");
            std::fs::write(&p, cfg).expect("write config");
            args.push("--config".into());
            args.push(p.display().to_string());
        }
        args.extend(opts.extra_args.iter().cloned());
        assert!(
            !(opts.user_namespace && opts.faketime.is_some()),
            "a test daemon runs under faketime or in a user namespace, not both"
        );
        let mut cmd = match &opts.faketime {
            Some(offset) => {
                use std::os::unix::process::CommandExt as _;
                let mut c = Command::new("faketime");
                c.arg("-f").arg(offset).arg(bin("kmsd"));
                // Shift only the wall clock; tokio's timers keep real monotonic time.
                c.env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
                c.process_group(0);
                c
            }
            None if opts.user_namespace => {
                let mut c = Command::new("unshare");
                c.args(["--user", "--map-root-user", "--"]).arg(bin("kmsd"));
                c
            }
            None => Command::new(bin("kmsd")),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        cmd.args(&args)
            .env("KMS_LOG", "debug")
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().expect("spawn kmsd");
        self.child = Some(child);
        self.own_group = opts.faketime.is_some();
        self.wait_ready();
    }

    /// Waits until the socket accepts a handshake.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("kmsd exited with {status}; log:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "kmsd not ready after 30 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = rustix::process::Pid::from_raw(child.id() as i32)?;
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        child.wait().ok().and_then(|s| s.code())
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            match rustix::process::Pid::from_raw(child.id() as i32) {
                Some(pgid) if self.own_group => {
                    let _ =
                        rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
                }
                _ => {
                    let _ = child.kill();
                }
            }
            let _ = child.wait();
        }
    }

    /// Stops and starts again on the same data directory.
    pub fn restart_with(&mut self, opts: DaemonOptions) {
        self.stop();
        self.spawn(&opts);
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await.expect("connect")
    }

    /// Runs `kmsctl --socket <this daemon> args…` with `stdin`.
    pub fn kmsctl(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.run_kmsctl(Command::new(bin("kmsctl")), args, stdin)
    }

    /// `kmsctl` as another account: see [`kmsctl_as_account`].
    pub fn kmsctl_as(&self, account: &str, args: &[&str], stdin: &[u8]) -> Output {
        self.run_kmsctl(kmsctl_as_account(account), args, stdin)
    }

    /// `command` (a kmsctl, perhaps under `setpriv`) run against this daemon.
    pub fn run_kmsctl(&self, mut command: Command, args: &[&str], stdin: &[u8]) -> Output {
        use std::io::Write;
        let mut child = command
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kmsctl");
        if let Some(mut si) = child.stdin.take() {
            let _ = si.write_all(stdin);
        }
        child.wait_with_output().expect("kmsctl output")
    }
}

/// A `kmsctl` command (no arguments yet) run as another account by `setpriv`, which
/// needs root: the account's uid, gid and groups.
pub fn kmsctl_as_account(account: &str) -> Command {
    let mut setpriv = Command::new("setpriv");
    setpriv
        .args([
            &format!("--reuid={account}"),
            &format!("--regid={account}"),
            "--init-groups",
        ])
        .arg(bin("kmsctl"));
    setpriv
}

/// Whether a Unix socket bound at `path` listens: `/proc/net/unix` lists it with
/// `__SO_ACCEPTCON` (0x10000) among its flags. The socket file appears at `bind`, before
/// `listen`, and a client connecting in between is refused.
pub fn is_listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(7).is_some_and(|p| *p == want)
            && fields
                .get(3)
                .and_then(|f| u32::from_str_radix(f, 16).ok())
                .is_some_and(|flags| flags & 0x10000 != 0)
    })
}

/// SIGSTOP to `pid`, and waits until every thread of it is stopped: `kill` returns once
/// the signal is queued, while a thread running on the other core may still answer a
/// request or two (a test of a daemon that does not answer then saw an answer).
pub fn stop_process(pid: u32) {
    let target = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    rustix::process::kill_process(target, rustix::process::Signal::STOP).expect("SIGSTOP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all_stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("the process's threads")
            .filter_map(Result::ok)
            .all(|t| {
                std::fs::read_to_string(t.path().join("stat"))
                    .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('T')))
            });
        if all_stopped {
            return;
        }
        assert!(Instant::now() < deadline, "{pid} did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGTERM to a daemon a client started, and waits until it is gone (or a zombie: its
/// parent, the client, has exited without reaping it).
pub fn stop_started_daemon(pid: i32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
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

/// The stdout of a kmsctl run that must succeed; otherwise panics with its exit code and
/// stderr.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kmsctl failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a kmsctl `--json` run that must succeed printed.
pub fn json(out: &Output) -> serde_json::Value {
    let stdout = ok(out);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// `kmsctl --json status`'s answer: the status, or the error's message. A daemon it
/// started is stopped (a test that expects none must not leave one behind when it fails).
pub fn status_or_error(out: &Output) -> Result<serde_json::Value, String> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    if let Some(pid) = v["pid"].as_u64() {
        stop_started_daemon(pid as i32);
        return Ok(v);
    }
    Err(v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// Processes whose command line names `path` (a daemon's data directory), other than
/// zombies (their command line is empty).
pub fn processes_naming(path: &Path) -> Vec<u32> {
    let needle = path.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Frames written and read by hand on a socket of the standard library, for tests that
/// play a client the client library would never be (one that stops reading, say).
pub mod raw {
    use kms_shared::protocol::{Outcome, ServerFrame};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;

    /// Writes one frame, within the socket's write timeout per write call; returns how
    /// much of it was written if a write timed out (the daemon stopped reading).
    pub fn write_within(s: &mut UnixStream, frame: &[u8]) -> Result<(), usize> {
        let mut done = 0;
        while done < frame.len() {
            match s.write(&frame[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(done),
            }
        }
        Ok(())
    }

    /// A request frame, length prefix included.
    pub fn frame(id: u64, request: kms_shared::protocol::Request) -> Vec<u8> {
        let frame = kms_shared::protocol::ClientFrame { id, request };
        kms_shared::codec::encode_frame(&frame, u32::MAX).expect("encode a request frame")
    }

    /// A connection to `socket` that has made its handshake as `client`.
    pub fn handshaken(socket: &Path, client: &str) -> UnixStream {
        use kms_shared::protocol::{PROTOCOL_VERSION, Request, Response};
        let mut s = UnixStream::connect(socket).expect("connect to kmsd");
        let hello = Request::Hello {
            protocol: PROTOCOL_VERSION,
            client: client.into(),
        };
        s.write_all(&frame(0, hello)).expect("write the hello");
        assert!(matches!(
            read_reply(&mut s),
            ServerFrame::Reply {
                result: Outcome::Ok(Response::Hello { .. }),
                ..
            }
        ));
        s
    }

    /// Encrypts 32 KiB with `key`, call after call, reading no reply, until a write has
    /// made no progress for `stall` (kmsd stopped reading). Returns how many requests
    /// went whole, and the rest of the one that did not.
    pub fn encrypt_until_unread(
        s: &mut UnixStream,
        key: &str,
        stall: std::time::Duration,
    ) -> (u64, Vec<u8>) {
        use kms_shared::protocol::Request;
        s.set_write_timeout(Some(stall))
            .expect("set a write timeout");
        let mut sent = 0u64;
        loop {
            let request = Request::Encrypt {
                key: key.into(),
                plaintext: vec![0x42u8; 32 * 1024].into(),
                context: None,
            };
            let bytes = frame(sent + 1, request);
            match write_within(s, &bytes) {
                Ok(()) => sent += 1,
                Err(done) => return (sent, bytes[done..].to_vec()),
            }
            assert!(sent < 2000, "the daemon never stopped reading");
        }
    }

    /// Writes `partial` (the rest of the cut request) and reads the replies of requests
    /// 1 to `sent + 1` of [`encrypt_until_unread`], each a ciphertext, each once. Returns
    /// the ids answered, in order.
    pub fn read_every_ciphertext(mut s: UnixStream, sent: u64, partial: Vec<u8>) -> Vec<u64> {
        use kms_shared::protocol::Response;
        let mut writer = s.try_clone().expect("clone the socket");
        let finish = std::thread::spawn(move || writer.write_all(&partial));
        s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .expect("set a read timeout");
        let mut answered = std::collections::BTreeSet::new();
        while answered.len() < sent as usize + 1 {
            match read_reply(&mut s) {
                ServerFrame::Reply {
                    id,
                    result: Outcome::Ok(Response::Ciphertext { .. }),
                } => assert!(answered.insert(id), "request {id} answered twice"),
                other => panic!("unexpected {other:?}"),
            }
        }
        finish
            .join()
            .expect("the writer thread")
            .expect("write the rest of the request");
        answered.into_iter().collect()
    }

    /// The next frame from kmsd.
    pub fn read_reply(s: &mut UnixStream) -> ServerFrame {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).expect("read a reply's length");
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).expect("read a reply's body");
        kms_shared::codec::decode::<ServerFrame>(&body).expect("decode a reply")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    /// A bound socket is not yet listening; once it listens it is.
    #[test]
    fn is_listening_waits_for_listen() {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketType, bind, listen, socket};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let fd = socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        bind(&fd, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        assert!(path.exists());
        assert!(!super::is_listening(&path));
        listen(&fd, 1).unwrap();
        assert!(super::is_listening(&path));
        assert!(!super::is_listening(&dir.path().join("other.sock")));
    }
}
