//! The yes/no questions of the permissions and tokens views: what would be revoked or
//! removed, named in full, and nothing else to weigh.

use ratatui::Frame;
use ratatui::layout::{Margin, Rect};
use ratatui::text::Line;
use ratatui::widgets::{Block, Clear, Paragraph};

use super::{layout, theme, wrap};
use crate::tui::app::Ask;
use crate::tui::strings as s;

pub fn render(f: &mut Frame, area: Rect, q: &Ask) {
    let width = 72u16.min(area.width);
    let text_width = usize::from(width.saturating_sub(4));
    let (title, body) = match q {
        Ask::Revoke(g) => (s::REVOKE_TITLE.to_string(), s::revoke_body(g)),
        Ask::RemoveToken(t) => (s::remove_token_title(&t.name), s::remove_token_body(t)),
    };
    let lines: Vec<Line> = wrap(&body, text_width)
        .into_iter()
        .map(Line::from)
        .collect();
    let popup = layout::popup(area, width, lines.len() as u16 + 2);
    let block = Block::bordered()
        .border_style(theme::danger_border())
        .title(title)
        .title_bottom(Line::from(format!(" {} ", s::CONFIRM_HINT_YN)).right_aligned());
    let inner = block.inner(popup).inner(Margin::new(1, 0));
    f.render_widget(Clear, popup);
    f.render_widget(block, popup);
    f.render_widget(Paragraph::new(lines), inner);
}
