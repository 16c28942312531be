//! The message line: results, errors and live events, or the filter being typed.

use ratatui::Frame;
use ratatui::layout::{Position, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use super::theme;
use crate::tui::app::App;
use crate::tui::strings as s;

pub fn render(f: &mut Frame, area: Rect, app: &App) {
    if app.filter_editing {
        let text = format!(" {}{}", s::FILTER_PROMPT, app.filter);
        let x = area.x + (text.chars().count() as u16).min(area.width.saturating_sub(1));
        f.render_widget(Paragraph::new(Span::styled(text, theme::warn())), area);
        f.set_cursor_position(Position::new(x, area.y));
        return;
    }
    if let Some(m) = &app.message {
        let line = Line::from(Span::styled(format!(" {}", m.text), theme::message(m.kind)));
        f.render_widget(Paragraph::new(line), area);
    }
}
