//! Terminal setup and restore. A panic hook restores the terminal before the panic
//! message is printed, so a crash never leaves the shell in raw mode on the alternate
//! screen.

use std::io::{self, Stdout, stdout};

use crossterm::cursor::Show;
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
    let term = execute!(stdout(), EnterAlternateScreen)
        .and_then(|()| Terminal::new(CrosstermBackend::new(stdout())));
    if term.is_err() {
        restore();
    }
    term
}

/// Leaves raw mode and the alternate screen; safe to call more than once.
pub fn restore() {
    let _ = disable_raw_mode();
    let _ = execute!(stdout(), LeaveAlternateScreen, Show);
}

fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
    }));
}

/// Restores the terminal when dropped, on every way out of the event loop.
pub struct Guard;

impl Drop for Guard {
    fn drop(&mut self) {
        restore();
    }
}
