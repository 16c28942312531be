//! The real kms-tui binary in a real terminal (tmux) against a real kmsd, driven by key
//! presses as a person would: create a key through the form, rotate it, disable it
//! through the confirmation, open its history, see a change made by kmsctl appear live,
//! quit.

#![allow(clippy::unwrap_used)]

use kms_e2e::TestDaemon;
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
    let t = Tmux {
        socket: format!("kms-tui-test-{}", std::process::id()),
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

    // Quit: the program ends and tmux's pane with it.
    t.keys(&["q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.run(&["list-sessions"]).contains("tui") {
        assert!(Instant::now() < deadline, "kms-tui did not quit");
        std::thread::sleep(Duration::from_millis(50));
    }
}
