//! Colours and styles, so the widgets agree.

use kms_shared::model::KeyState;
use ratatui::style::{Color, Modifier, Style};

use crate::tui::app::MsgKind;

pub fn title() -> Style {
    Style::new()
        .fg(Color::Black)
        .bg(Color::Cyan)
        .add_modifier(Modifier::BOLD)
}

pub fn dim() -> Style {
    Style::new().fg(Color::DarkGray)
}

pub fn label() -> Style {
    Style::new().fg(Color::Cyan)
}

pub fn key_hint() -> Style {
    Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)
}

pub fn table_header() -> Style {
    Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED)
}

pub fn selected() -> Style {
    Style::new().add_modifier(Modifier::REVERSED)
}

pub fn error() -> Style {
    Style::new().fg(Color::Red)
}

pub fn ok() -> Style {
    Style::new().fg(Color::Green)
}

pub fn warn() -> Style {
    Style::new().fg(Color::Yellow)
}

pub fn border() -> Style {
    Style::new().fg(Color::Cyan)
}

pub fn danger_border() -> Style {
    Style::new().fg(Color::Red)
}

pub fn state(s: KeyState) -> Style {
    match s {
        KeyState::Enabled => Style::new(),
        KeyState::Disabled => Style::new().fg(Color::DarkGray),
        KeyState::PendingDeletion => Style::new().fg(Color::Red),
        KeyState::Deleted => Style::new()
            .fg(Color::DarkGray)
            .add_modifier(Modifier::CROSSED_OUT),
    }
}

pub fn message(kind: MsgKind) -> Style {
    match kind {
        MsgKind::Info => Style::new(),
        MsgKind::Success => ok(),
        MsgKind::Error => error(),
        MsgKind::Event => Style::new().fg(Color::Magenta),
    }
}

/// The symbol before the selected row (also visible in plain-text snapshots).
pub const HIGHLIGHT: &str = "›";
