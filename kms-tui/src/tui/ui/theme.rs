//! Colours and styles, so the widgets agree.
//!
//! `NO_COLOR` (no-color.org), set and not empty, turns colours off for the run: the
//! styles keep their bold, underline and reverse, and nothing the dashboard says is told
//! by colour alone (states are written out, the selected row has its marker).

use std::sync::atomic::{AtomicBool, Ordering};

use kms_shared::model::KeyState;
use ratatui::style::{Color, Modifier, Style};

use crate::tui::app::MsgKind;

static NO_COLOUR: AtomicBool = AtomicBool::new(false);

/// Whether `NO_COLOR`'s value asks for no colour: any value but an empty one.
pub fn no_colour_asked(value: Option<&std::ffi::OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty())
}

/// Turns colours off (or on) for every style from here on.
pub fn set_no_colour(off: bool) {
    NO_COLOUR.store(off, Ordering::Relaxed);
}

/// `style`, without its colours when they are off.
fn painted(style: Style) -> Style {
    if NO_COLOUR.load(Ordering::Relaxed) {
        without_colour(style)
    } else {
        style
    }
}

fn without_colour(mut style: Style) -> Style {
    style.fg = None;
    style.bg = None;
    style.underline_color = None;
    style
}

pub fn title() -> Style {
    if NO_COLOUR.load(Ordering::Relaxed) {
        // The title bar keeps a bar's look.
        return Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED);
    }
    Style::new()
        .fg(Color::Black)
        .bg(Color::Cyan)
        .add_modifier(Modifier::BOLD)
}

pub fn dim() -> Style {
    painted(Style::new().fg(Color::DarkGray))
}

pub fn label() -> Style {
    painted(Style::new().fg(Color::Cyan))
}

pub fn key_hint() -> Style {
    painted(Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD))
}

pub fn table_header() -> Style {
    Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED)
}

pub fn selected() -> Style {
    Style::new().add_modifier(Modifier::REVERSED)
}

pub fn error() -> Style {
    painted(Style::new().fg(Color::Red))
}

pub fn ok() -> Style {
    painted(Style::new().fg(Color::Green))
}

pub fn warn() -> Style {
    painted(Style::new().fg(Color::Yellow))
}

pub fn border() -> Style {
    painted(Style::new().fg(Color::Cyan))
}

pub fn danger_border() -> Style {
    painted(Style::new().fg(Color::Red))
}

pub fn state(s: KeyState) -> Style {
    painted(match s {
        KeyState::Enabled => Style::new(),
        KeyState::Disabled => Style::new().fg(Color::DarkGray),
        KeyState::PendingDeletion => Style::new().fg(Color::Red),
        KeyState::Deleted => Style::new()
            .fg(Color::DarkGray)
            .add_modifier(Modifier::CROSSED_OUT),
    })
}

pub fn message(kind: MsgKind) -> Style {
    match kind {
        MsgKind::Info => Style::new(),
        MsgKind::Success => ok(),
        MsgKind::Error => error(),
        MsgKind::Event => painted(Style::new().fg(Color::Magenta)),
    }
}

/// The symbol before the selected row (also visible in plain-text snapshots).
pub const HIGHLIGHT: &str = "›";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_color_is_any_value_but_an_empty_one() {
        assert!(!no_colour_asked(None));
        assert!(!no_colour_asked(Some(std::ffi::OsStr::new(""))));
        assert!(no_colour_asked(Some(std::ffi::OsStr::new("1"))));
        assert!(
            no_colour_asked(Some(std::ffi::OsStr::new("0"))),
            "any value"
        );
    }

    fn every_style() -> [Style; 12] {
        [
            title(),
            dim(),
            label(),
            key_hint(),
            error(),
            ok(),
            warn(),
            border(),
            danger_border(),
            state(KeyState::Deleted),
            state(KeyState::PendingDeletion),
            message(MsgKind::Event),
        ]
    }

    /// The only test that turns colours off: no other test looks at colours.
    #[test]
    fn no_colour_leaves_no_colour_and_keeps_the_modifiers() {
        let coloured = every_style();
        assert!(coloured.iter().all(|s| s.fg.is_some() || s.bg.is_some()));
        set_no_colour(true);
        let plain = every_style();
        set_no_colour(false);
        for (c, p) in coloured.iter().zip(&plain) {
            assert_eq!((p.fg, p.bg), (None, None), "{c:?}");
            assert!(p.add_modifier.contains(c.add_modifier), "{c:?} -> {p:?}");
        }
        assert!(
            plain[0].add_modifier.contains(Modifier::REVERSED),
            "the title bar"
        );
    }
}
