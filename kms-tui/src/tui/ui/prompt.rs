//! One-line inputs: the rotation period and the memo, validated as you type.

use ratatui::Frame;
use ratatui::layout::{Margin, Position, Rect};
use ratatui::text::Line;
use ratatui::widgets::{Block, Clear, Paragraph};

use super::{layout, theme, wrap};
use crate::tui::app::{Prompt, PromptKind};
use crate::tui::input;
use crate::tui::strings as s;

pub fn render(f: &mut Frame, area: Rect, p: &Prompt) {
    let width = 72u16.min(area.width);
    let text_width = usize::from(width.saturating_sub(4));
    let (title, label) = match p.kind {
        PromptKind::Period => (s::period_prompt_title(&p.key.name), s::PERIOD_PROMPT),
        PromptKind::Memo => (s::memo_prompt_title(&p.key.name), s::MEMO_PROMPT),
    };
    // "> " and the text, with a cell left for the cursor.
    let (shown, column) = input::view(&p.text, p.cursor_back, text_width.saturating_sub(2));
    let mut lines = vec![
        Line::from(label),
        Line::styled(format!("> {shown}"), theme::warn()),
    ];
    if let Some(e) = p.error() {
        for l in wrap(&format!("✗ {e}"), text_width) {
            lines.push(Line::styled(l, theme::error()));
        }
    }
    let popup = layout::popup(area, width, lines.len() as u16 + 2);
    let block = Block::bordered()
        .border_style(theme::border())
        .title(title)
        .title_bottom(Line::from(format!(" {} ", s::PROMPT_HINT)).right_aligned());
    let inner = block.inner(popup).inner(Margin::new(1, 0));
    f.render_widget(Clear, popup);
    f.render_widget(block, popup);
    f.render_widget(Paragraph::new(lines), inner);
    if inner.height > 1 {
        let x = (inner.x + 2 + column).min(inner.right().saturating_sub(1));
        f.set_cursor_position(Position::new(x, inner.y + 1));
    }
}
