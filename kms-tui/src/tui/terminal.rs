//! Terminal setup and restore. A panic hook restores the terminal before the panic
//! message is printed and then ends the process, so a crash never leaves the shell in
//! raw mode on the alternate screen, nor the dashboard drawing on a restored terminal.

use std::io::{self, Stdout, stdout};

use crossterm::cursor::Show;
use crossterm::event::{DisableBracketedPaste, EnableBracketedPaste};
use crossterm::execute;
use crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;

pub type Term = Terminal<CrosstermBackend<Stdout>>;

pub fn setup() -> io::Result<Term> {
    install_panic_hook();
    enable_raw_mode()?;
    // Bracketed paste: a paste arrives as one event, not as keys (a line break in it
    // would otherwise submit a form, and the rest run as commands).
    let term = execute!(stdout(), EnterAlternateScreen, EnableBracketedPaste)
        .and_then(|()| Terminal::new(CrosstermBackend::new(stdout())));
    if term.is_err() {
        restore();
    }
    term
}

/// Leaves raw mode and the alternate screen; safe to call more than once.
pub fn restore() {
    let _ = disable_raw_mode();
    let _ = execute!(stdout(), DisableBracketedPaste, LeaveAlternateScreen, Show);
}

/// Exit status of a process that panicked, as Rust's own for a panic in `main`.
const PANIC_EXIT: i32 = 101;

/// A panic anywhere (the event loop, a tokio task, the input or notifier thread) restores
/// the terminal, prints the panic, and ends the process: after a panic in a spawned task
/// the runtime would carry on and the dashboard keep drawing on a terminal no longer
/// raw, or wait for answers that never come.
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
        std::process::exit(PANIC_EXIT);
    }));
}

/// Restores the terminal when dropped, on every way out of the event loop.
pub struct Guard;

impl Drop for Guard {
    fn drop(&mut self) {
        restore();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::process::Command;

    /// Set in the child process of [`task_panic_ends_the_process`].
    const CHILD: &str = "KMS_TUI_PANIC_HOOK_CHILD";

    /// In the child only: installs the hook, panics in a spawned tokio task (which tokio
    /// would otherwise catch), then carries on as the event loop would.
    #[test]
    fn panic_hook_child() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        super::install_panic_hook();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let task = tokio::spawn(async { panic!("boom in a task") });
            let _ = task.await;
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        });
        println!("still running after the panic");
    }

    /// A panic in a spawned task restores the terminal, prints the panic and ends the
    /// process with 101 instead of leaving the dashboard running.
    #[test]
    fn task_panic_ends_the_process() {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tui::terminal::tests::panic_hook_child",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(101),
            "stdout {stdout}\nstderr {stderr}"
        );
        // Left the alternate screen, showed the cursor; printed the panic.
        assert!(stdout.contains("\x1b[?1049l"), "{stdout:?}");
        assert!(!stdout.contains("still running"), "{stdout}");
        assert!(stderr.contains("boom in a task"), "{stderr}");
    }
}
