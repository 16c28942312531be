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
        let t = Tmux {
            socket: format!("kms-tui-{name}-{}", std::process::id()),
        };
        let cmd = format!(
            "{} --socket {} --no-autostart",
            kms_e2e::bin("kms-tui").display(),
            d.socket.display()
        );
        t.run(&[
            "new-session",
            "-d",
            "-s",
            "tui",
            "-x",
            "100",
            "-y",
            "30",
            &cmd,
        ]);
        t.wait_for("● connected");
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
    let s = t.wait_for("tui-key");
    assert!(s.contains("›tui-key"), "the new key is selected:\n{s}");

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
    let s = t.wait_for("History of tui-key");
    let disable = s.find("disable").unwrap();
    let rotate = s.find("rotate").unwrap();
    let create = s.find("create").unwrap();
    assert!(disable < rotate && rotate < create, "newest first:\n{s}");
    assert!(s.contains("kms-tui") && s.contains("root"), "{s}");
    t.keys(&["Escape"]);
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
    t.keys(&["Escape"]);
    t.wait_for("3 keys");

    // Tokens: none registered on a daemon without dedicated tokens.
    t.keys(&["T"]);
    t.wait_for("HSM tokens");
    t.wait_for("No HSM token is registered");
    t.keys(&["Escape"]);
    t.wait_for("3 keys");

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
    t.wait_for("No keys yet");

    // With no token registered, dedicated-hsm is refused in the form itself.
    t.keys(&["c"]);
    t.wait_for("Create key");
    t.text("on-token");
    t.keys(&["Tab", "Tab", "Left"]);
    t.wait_for("dedicated-hsm");
    t.wait_for("no HSM token is registered");
    t.keys(&["Escape"]);

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
    t.keys(&["Escape"]);

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
    let row = t
        .view_rows()
        .into_iter()
        .find(|l| l.contains("vault-t"))
        .unwrap();
    assert!(row.contains(" 1 "), "one key on it: {row}");
    t.keys(&["Escape"]);
    t.keys(&["q"]);
    t.wait_quit();
}
