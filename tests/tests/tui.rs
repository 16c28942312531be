//! The real kms-tui binary in a real terminal (tmux) against a real kmsd, driven by key
//! presses as a person would: create a key through the form, rotate it, disable it
//! through the confirmation, open its history, see a change made by kmsctl appear live,
//! grant and revoke a role in the permissions view, quit. A second session registers a
//! SoftHSM2 token in the tokens view and creates a dedicated-hsm key on it.

#![allow(clippy::unwrap_used)]

use kms_e2e::TestDaemon;
use kms_e2e::softhsm::{self, SoftHsm};
use std::process::Command;
use std::time::{Duration, Instant};

struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux is installed (see .ci/install-deps)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-t", "tui", "-p"])
    }

    fn keys(&self, keys: &[&str]) {
        for k in keys {
            self.run(&["send-keys", "-t", "tui", k]);
            // Separate presses: sent together, Escape and a letter read as Alt-letter.
            std::thread::sleep(Duration::from_millis(80));
        }
    }

    /// Presses Escape and waits until what it closes (`title`) is gone: a key sent
    /// before kms-tui has read the Escape would arrive in the same read and be taken as
    /// Alt-key, however long the pause between the two presses.
    fn escape_from(&self, title: &str) {
        self.run(&["send-keys", "-t", "tui", "Escape"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.screen();
            if !s.contains(title) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Escape did not close {title:?}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn text(&self, text: &str) {
        self.run(&["send-keys", "-t", "tui", "-l", text]);
    }

    /// Waits until the screen contains `needle`; panics with the screen otherwise.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.screen();
            if s.contains(needle) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "never saw {needle:?}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Tmux {
    /// Starts kms-tui on `d`'s socket in a 100×30 pane and waits for its first frame.
    fn start(d: &TestDaemon, name: &str) -> Tmux {
        let cmd = format!(
            "{} --socket {} --no-autostart",
            kms_e2e::bin("kms-tui").display(),
            d.socket.display()
        );
        let t = Tmux::launch(name, &cmd);
        t.wait_for("● connected");
        t
    }

    /// Runs the shell command `cmd` in a 100×30 pane of a tmux server of its own.
    fn launch(name: &str, cmd: &str) -> Tmux {
        let t = Tmux {
            socket: format!("kms-tui-{name}-{}", std::process::id()),
        };
        t.run(&[
            "new-session",
            "-d",
            "-s",
            "tui",
            "-x",
            "100",
            "-y",
            "30",
            cmd,
        ]);
        t
    }

    /// Rows of the bordered view (not the message line, which may echo a result).
    fn view_rows(&self) -> Vec<String> {
        self.screen()
            .lines()
            .filter(|l| l.starts_with('│'))
            .map(str::to_string)
            .collect()
    }

    /// Waits until kms-tui has quit and its pane is gone.
    fn wait_quit(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.run(&["list-sessions"]).contains("tui") {
            assert!(Instant::now() < deadline, "kms-tui did not quit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

/// A person's session: create, rotate, disable with confirmation, history, live update, quit.
#[test]
fn dashboard_session_in_tmux() {
    let d = TestDaemon::start();
    let ok = d.kmsctl(&["create", "existing", "--type", "ecdsa"], b"");
    assert!(ok.status.success());
    let t = Tmux::start(&d, "session");
    t.wait_for("1 key ");
    t.wait_for("existing");

    // Create through the form; the rule is checked as we type.
    t.keys(&["c"]);
    t.wait_for("Create key");
    t.text("9xy");
    t.wait_for("starts with a letter");
    t.keys(&["BSpace", "BSpace", "BSpace"]);
    t.text("tui-key");
    t.keys(&["Enter"]);
    t.wait_for("2 keys");
    // The reply selects the new key; its event may be drawn first.
    t.wait_for("›tui-key");

    // Rotate through the confirmation.
    t.keys(&["r"]);
    t.wait_for("Rotate tui-key?");
    t.keys(&["y"]);
    t.wait_for("v2");

    // Disable: the confirmation shows the impact first.
    t.keys(&["d"]);
    t.wait_for("Disable tui-key?");
    t.wait_for("successful use");
    t.keys(&["y"]);
    t.wait_for("disabled");

    // History: newest first, with client and account.
    t.keys(&["h"]);
    t.wait_for("History of tui-key");
    // The view opens "loading…"; the entries are in once the status says so.
    let s = t.wait_for("end of history");
    let disable = s.find("disable").unwrap();
    let rotate = s.find("rotate").unwrap();
    let create = s.find("create").unwrap();
    assert!(disable < rotate && rotate < create, "newest first:\n{s}");
    assert!(s.contains("kms-tui") && s.contains("root"), "{s}");
    t.escape_from("History of tui-key");
    t.wait_for("2 keys");

    // A change made by another client appears without a key press.
    let ok = d.kmsctl(&["create", "from-cli", "--type", "aes256"], b"");
    assert!(ok.status.success());
    t.wait_for("3 keys");
    t.wait_for("from-cli");
    let ok = d.kmsctl(&["disable", "existing"], b"");
    assert!(ok.status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t
        .screen()
        .lines()
        .any(|l| l.contains("existing") && l.contains("disabled"))
    {
        assert!(
            Instant::now() < deadline,
            "state change not shown:\n{}",
            t.screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Permissions: P opens every grant; a fresh store has none.
    t.keys(&["P"]);
    t.wait_for("Permissions");
    t.wait_for("0 grants");
    // A grant for a user that does not exist: kmsd's refusal shows in the form.
    t.keys(&["n"]);
    t.wait_for("New grant");
    t.wait_for("only tui-key");
    t.keys(&["Tab", "Tab"]);
    t.text("no-such-user-x");
    t.keys(&["Enter"]);
    t.wait_for("no user named");
    for _ in 0.."no-such-user-x".len() {
        t.keys(&["BSpace"]);
    }
    // root exists everywhere; the scope is the key selected in the list.
    t.text("root");
    t.keys(&["Enter"]);
    t.wait_for("1 grant ");
    let row = t
        .view_rows()
        .into_iter()
        .find(|l| l.contains("user root"))
        .unwrap_or_else(|| panic!("grant not listed:\n{}", t.screen()));
    assert!(
        row.contains("key-user") && row.contains("tui-key"),
        "role and key: {row}"
    );
    let listed = d.kmsctl(&["grants"], b"");
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("user root") && listed.contains("tui-key"),
        "kmsd stored it: {listed}"
    );
    // Revoke through the confirmation, which names role, principal and key.
    t.keys(&["x"]);
    let s = t.wait_for("Revoke a grant?");
    assert!(
        s.contains("user root loses the role key-user") && s.contains("on tui-key"),
        "{s}"
    );
    t.keys(&["y"]);
    // Not the success message: the permission-changed event that follows replaces it,
    // sometimes before the screen is read. The list and kmsd's own answer are stable.
    t.wait_for("0 grants");
    assert!(
        !t.view_rows().iter().any(|l| l.contains("user root")),
        "grant still listed:\n{}",
        t.screen()
    );
    let listed = d.kmsctl(&["grants"], b"");
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(!listed.contains("user root"), "kmsd still has it: {listed}");
    t.escape_from("┌ Permissions");
    t.wait_for("3 keys");

    // Tokens: none registered on a daemon without dedicated tokens.
    t.keys(&["T"]);
    t.wait_for("HSM tokens");
    t.wait_for("No HSM token is registered");
    t.escape_from("┌ HSM tokens");
    t.wait_for("3 keys");

    // Events: what the dashboard received, newest first; the other client's disable of
    // `existing` is there, above its create of `from-cli`, and enter opens the key.
    t.keys(&["E"]);
    let row_of = |rows: &[String], what: &str, key: &str| {
        rows.iter()
            .position(|l| l.contains(what) && l.contains(key))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let rows = t.view_rows();
        if row_of(&rows, "state-changed", "existing").is_some()
            && row_of(&rows, "created", "from-cli").is_some()
        {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "events not listed:\n{}",
            t.screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        row_of(&rows, "state-changed", "existing") < row_of(&rows, "created", "from-cli"),
        "newest first:\n{}",
        rows.join("\n")
    );
    // Down until the selection is on the disable: an event arriving meanwhile moves the
    // rows, so the selection is read from the screen, not counted.
    // The selected row: where it is on screen, and what it says.
    let selected = || {
        t.view_rows()
            .into_iter()
            .enumerate()
            .find(|(_, l)| l.starts_with("│›"))
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = selected();
        if now.1.contains("state-changed") && now.1.contains("existing") {
            break;
        }
        assert!(Instant::now() < deadline, "never selected:\n{}", t.screen());
        t.keys(&["Down"]);
        // One row per press: the next is read once this one is drawn.
        while selected() == now {
            assert!(Instant::now() < deadline, "Down not drawn:\n{}", t.screen());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    t.keys(&["Enter"]);
    let s = t.wait_for("existing · times in UTC");
    assert!(!s.contains("┌ Events"), "{s}");
    // Back from the details to the events, and from them to the list.
    t.keys(&["Escape"]);
    t.wait_for("since the dashboard started");
    t.escape_from("┌ Events");
    t.wait_for("Used / due");

    // Quit: the program ends and tmux's pane with it.
    t.keys(&["q"]);
    t.wait_quit();
}

/// Dedicated tokens in the dashboard: register a SoftHSM2 token through the form, create
/// a dedicated-hsm key on it with the create form's token picker, see the token hold it,
/// and have kmsd's refusal to remove it shown.
#[test]
fn hsm_tokens_in_tmux() {
    let hsm = SoftHsm::new();
    let own = hsm.init_token("kms-daemon", "pin-own-5521");
    let tenant = hsm.init_token("tenant-t", "pin-t-77310");
    let d = TestDaemon::start_with(hsm.daemon_options(&own));
    let t = Tmux::start(&d, "hsm");
    t.wait_for("No keys you can see");

    // With no token registered, dedicated-hsm is refused in the form itself.
    t.keys(&["c"]);
    t.wait_for("Create key");
    t.text("on-token");
    t.keys(&["Tab", "Tab", "Left"]);
    t.wait_for("dedicated-hsm");
    t.wait_for("no HSM token is registered");
    t.escape_from("Create key");

    t.keys(&["T"]);
    t.wait_for("No HSM token is registered");
    t.keys(&["n"]);
    t.wait_for("Register HSM token");
    t.text("vault-t");
    t.keys(&["Tab"]);
    t.text(softhsm::MODULE);
    t.keys(&["Tab"]);
    t.text(&tenant.label);
    t.keys(&["Tab"]);
    t.text(tenant.pin_file.to_str().unwrap());
    t.keys(&["Enter"]);
    t.wait_for("registered HSM token vault-t");
    t.wait_for("1 token ");
    let row = t
        .view_rows()
        .into_iter()
        .find(|l| l.contains("vault-t"))
        .unwrap();
    assert!(row.contains("tenant-t") && row.contains("root"), "{row}");
    t.escape_from("┌ HSM tokens");

    // The create form now offers the token.
    t.keys(&["c"]);
    t.wait_for("Create key");
    t.text("on-token");
    t.keys(&["Tab", "Tab", "Left"]);
    t.wait_for("‹ vault-t ›");
    t.keys(&["Enter"]);
    t.wait_for("created on-token");
    let shown = d.kmsctl(&["--json", "show", "on-token"], b"");
    let key: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(key["protection"], "dedicated-hsm");
    assert_eq!(key["hsm"], "vault-t");

    // The token holds the key now; removing it is refused and the reason is shown.
    t.keys(&["T"]);
    t.wait_for("vault-t");
    t.keys(&["x"]);
    t.wait_for("Remove HSM token vault-t?");
    t.keys(&["y"]);
    t.wait_for("could not remove HSM token vault-t");
    // The token list read when T was pressed may be answered after the refusal.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = t
            .view_rows()
            .into_iter()
            .find(|l| l.contains("vault-t"))
            .unwrap_or_default();
        if row.contains(" 1 ") {
            break;
        }
        assert!(Instant::now() < deadline, "one key on it: {row}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.escape_from("┌ HSM tokens");
    t.keys(&["q"]);
    t.wait_quit();
}

/// A dashboard allowed to autostart (the default socket, here `$KMS_SOCKET` in a
/// temporary directory, as tests/tests/autostart.rs isolates it) and every kmsd it
/// started. Dropping it ends the dashboard first, so that it starts no daemon while they
/// are stopped, then stops them.
struct AutostartedTui {
    tmux: Tmux,
    dir: tempfile::TempDir,
}

impl AutostartedTui {
    fn start(name: &str) -> AutostartedTui {
        Self::start_in(name, tempfile::tempdir().unwrap())
    }

    /// As `start`, in `dir` (where a test may have started a daemon of its own first).
    fn start_in(name: &str, dir: tempfile::TempDir) -> AutostartedTui {
        let p = dir.path();
        let cmd = format!(
            "env -u STATE_DIRECTORY -u CREDENTIALS_DIRECTORY -u DBUS_SESSION_BUS_ADDRESS \
             KMS_SOCKET={} XDG_DATA_HOME={} XDG_RUNTIME_DIR={} HOME={} {}",
            p.join("run/kmsd.sock").display(),
            p.join("xdg").display(),
            p.display(),
            p.display(),
            kms_e2e::bin("kms-tui").display(),
        );
        let tmux = Tmux::launch(name, &cmd);
        AutostartedTui { tmux, dir }
    }

    /// `kmsctl --socket <the default socket> ARGS`: an explicit socket, which never
    /// autostarts, so every daemon there is the dashboard's.
    fn kmsctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(kms_e2e::bin("kmsctl"))
            .arg("--socket")
            .arg(self.dir.path().join("run/kmsd.sock"))
            .args(args)
            .output()
            .unwrap()
    }

    /// The pid of the daemon answering on the socket, if one does.
    fn daemon_pid(&self) -> Option<i32> {
        let out = self.kmsctl(&["--json", "status"]);
        if !out.status.success() {
            return None;
        }
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        status["pid"].as_u64().map(|p| p as i32)
    }

    /// The kmsd processes whose arguments name this test's directory: the ones the
    /// dashboard started, and any the test started there.
    fn daemons(&self) -> Vec<u32> {
        kms_e2e::processes_naming(self.dir.path())
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "kmsd")
            })
            .collect()
    }
}

impl Drop for AutostartedTui {
    fn drop(&mut self) {
        let pane = self
            .tmux
            .run(&["display-message", "-p", "-t", "tui", "#{pane_pid}"]);
        self.tmux.run(&["kill-server"]);
        if let Ok(pid) = pane.trim().parse::<u32>() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.contains(") Z "))
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for pid in self.daemons() {
            kms_e2e::stop_started_daemon(pid as i32);
        }
    }
}

/// The kmsd the dashboard autostarted dies (SIGKILL, as a crash or the OOM killer would):
/// the dashboard starts one again by itself, as its launch did, subscribes again and
/// shows the keys, a change made afterwards included. (It used to only retry connecting,
/// showing "disconnected" until the user quit and relaunched it.)
#[test]
fn a_killed_autostarted_daemon_is_started_again() {
    let tui = AutostartedTui::start("restart");
    let t = &tui.tmux;
    t.wait_for("● connected");
    kms_e2e::ok(&tui.kmsctl(&["create", "survivor", "--type", "aes256"]));
    t.wait_for("survivor");
    let first = tui.daemon_pid().expect("the dashboard started a daemon");
    assert_eq!(tui.daemons(), [first as u32], "one daemon, the dashboard's");

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(first).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let second = loop {
        match tui.daemon_pid() {
            Some(pid) if pid != first => break pid,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "no daemon was started again; screen:\n{}",
            t.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(tui.daemons(), [second as u32], "one daemon, the new one");
    t.wait_for("● connected");
    t.wait_for("survivor");
    // The events come again: a key made now appears without a key press.
    kms_e2e::ok(&tui.kmsctl(&["create", "after", "--type", "ecdsa"]));
    t.wait_for("2 keys");
    t.wait_for("after");
}

/// The dashboard was connected to a daemon the user started on a store of their own
/// choosing (`--data-dir`), on the dashboard's default socket. When that daemon dies, the
/// one the dashboard starts again serves the same store, with its keys: it used to start
/// one on the account's default data directory, which took the socket with a new, empty
/// store (and kept the user's daemon from starting there again).
#[test]
fn a_daemon_started_again_serves_the_store_the_lost_one_served() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/kmsd.sock");
    let chosen = dir.path().join("chosen");
    std::fs::create_dir(dir.path().join("run")).unwrap();
    std::fs::set_permissions(
        dir.path().join("run"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let mut mine = Command::new(kms_e2e::bin("kmsd"))
        .arg("--socket")
        .arg(&socket)
        .arg("--data-dir")
        .arg(&chosen)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !kms_e2e::is_listening(&socket) {
        assert!(Instant::now() < deadline, "kmsd did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let tui = AutostartedTui::start_in("chosen", dir);
    let t = &tui.tmux;
    kms_e2e::ok(&tui.kmsctl(&["create", "mine", "--type", "aes256"]));
    t.wait_for("● connected");
    t.wait_for("mine");

    let first = mine.id() as i32;
    mine.kill().unwrap();
    mine.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tui.daemon_pid().is_none_or(|pid| pid == first) {
        assert!(
            Instant::now() < deadline,
            "no daemon was started again; screen:\n{}",
            t.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status: serde_json::Value =
        serde_json::from_str(&kms_e2e::ok(&tui.kmsctl(&["--json", "status"]))).unwrap();
    assert_eq!(
        status["data_dir"].as_str(),
        Some(chosen.to_str().unwrap()),
        "{status}"
    );
    assert!(
        !tui.dir.path().join("xdg/kms/kms.redb").exists(),
        "a store was made in the default data directory"
    );
    t.wait_for("● connected");
    t.wait_for("mine");
    assert!(!t.screen().contains("another key store"), "{}", t.screen());
}

/// A kmsd that dies at every start is not started in a tight loop: the dashboard starts
/// it again 1 s after the launch's start, then 2 s after that (doubling to 30 s), and
/// the message line says when the next start is. The `kmsd` beside this copy of
/// kms-tui only records when it was started and exits.
#[test]
fn a_daemon_that_keeps_dying_is_started_with_backoff() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let tui = p.join("kms-tui");
    if std::fs::hard_link(kms_e2e::bin("kms-tui"), &tui).is_err() {
        std::fs::copy(kms_e2e::bin("kms-tui"), &tui).unwrap();
    }
    let starts = p.join("starts");
    std::fs::write(
        p.join("kmsd"),
        format!(
            "#!/bin/sh\ndate +%s.%N >> {}\necho 'kmsd: dies on purpose' >&2\nexit 3\n",
            starts.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(p.join("kmsd"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cmd = format!(
        "env -u STATE_DIRECTORY -u CREDENTIALS_DIRECTORY -u DBUS_SESSION_BUS_ADDRESS \
         KMS_SOCKET={} XDG_DATA_HOME={} {}",
        p.join("run/kmsd.sock").display(),
        p.join("xdg").display(),
        tui.display(),
    );
    let t = Tmux::launch("backoff", &cmd);
    let times = || -> Vec<f64> {
        std::fs::read_to_string(&starts)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while times().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "started {} times; screen:\n{}",
            times().len(),
            t.screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = t.wait_for("starting it again in");
    assert!(s.contains("dies on purpose"), "the reason is shown:\n{s}");
    let at = times();
    // The launch's start, then 1 s and 2 s later (measured from when each start failed,
    // so a little more).
    assert!(at[1] - at[0] >= 0.9, "starts at {at:?}");
    assert!(at[2] - at[1] >= 1.9, "starts at {at:?}");
    // Not a fourth start at once (the schedule itself, 4 s next, is retry.rs's unit
    // tests', on an injected clock): a dashboard that restarted without waiting would
    // have started several more within half a second.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(times().len(), 3, "starts at {at:?}");
}
