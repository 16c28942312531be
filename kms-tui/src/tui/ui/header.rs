//! The top line: service name, key count, filter, connection and daemon version.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use super::theme;
use crate::tui::app::{App, Conn};
use crate::tui::strings as s;

pub fn render(f: &mut Frame, area: Rect, app: &App) {
    let filtered = !app.filter.is_empty();
    let mut left = vec![
        Span::styled(format!(" {} ", s::SERVICE_NAME), theme::title()),
        Span::raw(" "),
    ];
    if app.loaded {
        left.push(Span::raw(s::key_count(
            app.visible.len(),
            app.keys.len(),
            filtered,
        )));
    }
    if filtered && !app.filter_editing {
        left.push(Span::styled(
            format!("  {}{}", s::FILTER_PROMPT, app.filter),
            theme::warn(),
        ));
    }
    let (text, style) = match &app.conn {
        Conn::Connecting => (s::CONNECTING.to_string(), theme::warn()),
        Conn::Connected { daemon_version } => (s::connected(daemon_version), theme::ok()),
        Conn::Disconnected { .. } => (s::DISCONNECTED.to_string(), theme::error()),
    };
    // On a narrow terminal the state's first words (its symbol and word) are what
    // matters, and a space keeps them apart from the name, however cut.
    let wanted = Line::from(left.clone()).width() + text.chars().count() + 2;
    let text = if wanted > usize::from(area.width) {
        text.split(" · ").next().unwrap_or_default().to_string()
    } else {
        text
    };
    let right = Line::from(Span::styled(format!("{text} "), style)).right_aligned();
    let right_width = right.width() as u16;
    let [l, r] = area.layout(
        &Layout::horizontal([Constraint::Min(0), Constraint::Length(right_width)]).spacing(1),
    );
    f.render_widget(Paragraph::new(Line::from(left)), l);
    f.render_widget(Paragraph::new(right), r);
}
