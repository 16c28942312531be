//! The `?` overlay, drawn from the keymap's own table.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph};

use super::{layout, theme};
use crate::tui::keymap::{self, Hint};
use crate::tui::strings as s;

const KEY_WIDTH: usize = 11;

fn section(title: &str, hints: &[Hint], out: &mut Vec<Line<'static>>) {
    out.push(Line::styled(title.to_string(), theme::table_header()));
    for (key, what) in hints {
        out.push(Line::from(vec![
            Span::styled(format!("{key:<KEY_WIDTH$}"), theme::key_hint()),
            Span::raw(*what),
        ]));
    }
}

pub fn render(f: &mut Frame, area: Rect) {
    // Two columns, sections alternating between them, so the whole list fits an 80×24
    // terminal.
    let mut left = Vec::new();
    let mut right = Vec::new();
    for (i, (title, hints)) in keymap::HELP.iter().enumerate() {
        let col = if i % 2 == 1 { &mut right } else { &mut left };
        if !col.is_empty() {
            col.push(Line::default());
        }
        section(title, hints, col);
    }
    let height = left.len().max(right.len()) as u16 + 2;
    let popup = layout::popup(area, 78, height);
    let block = Block::bordered()
        .border_style(theme::border())
        .title(s::HELP_TITLE)
        .title_bottom(Line::from(format!(" esc {} ", s::F_CLOSE)).right_aligned());
    let inner = block.inner(popup);
    f.render_widget(Clear, popup);
    f.render_widget(block, popup);
    let [l, r] = inner.layout(&Layout::horizontal([
        Constraint::Percentage(50),
        Constraint::Percentage(50),
    ]));
    f.render_widget(
        Paragraph::new(left),
        l.inner(ratatui::layout::Margin::new(1, 0)),
    );
    f.render_widget(Paragraph::new(right), r);
}
