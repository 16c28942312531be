//! The bottom line: the bindings of the current mode, as many as fit.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use super::theme;
use crate::tui::keymap::{self, Mode};
use kms_shared::model::KeyState;

/// `key`: the state of the selected key, whose actions the list and details show.
pub fn render(f: &mut Frame, area: Rect, mode: Mode, key: Option<KeyState>) {
    let hints = match mode {
        Mode::Main | Mode::Details => keymap::key_footer(key),
        other => keymap::footer(other).to_vec(),
    };
    let mut spans = vec![Span::raw(" ")];
    let mut used = 1usize;
    for (key, what) in hints {
        let w = key.chars().count() + 1 + what.chars().count() + 2;
        // Whole hints only: a cut-off hint would name the wrong thing.
        if used + w > usize::from(area.width) + 2 {
            break;
        }
        spans.push(Span::styled(key, theme::key_hint()));
        spans.push(Span::raw(format!(" {what}  ")));
        used += w;
    }
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}
