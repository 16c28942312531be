//! The `?` overlay, drawn from the keymap's own table.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph};

use super::{layout, theme};
use crate::tui::keymap::{self, Hint};
use crate::tui::strings as s;

const KEY_WIDTH: usize = 11;

/// A section of the help in a column `width` cells wide: a hint longer than the column
/// has left after its key goes on over more lines, under itself, not cut off.
fn section(title: &str, hints: &[Hint], width: usize, out: &mut Vec<Line<'static>>) {
    out.push(Line::styled(title.to_string(), theme::table_header()));
    let room = width.saturating_sub(KEY_WIDTH).max(12);
    for (key, what) in hints {
        for (i, part) in wrap_words(what, room).into_iter().enumerate() {
            let key = if i == 0 { *key } else { "" };
            out.push(Line::from(vec![
                Span::styled(format!("{key:<KEY_WIDTH$}"), theme::key_hint()),
                Span::raw(part),
            ]));
        }
    }
}

/// `text` in lines of at most `room` characters, broken between words (a word longer
/// than that gets a line of its own).
fn wrap_words(text: &str, room: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split(' ') {
        let last = lines.last_mut().map_or(0, |l| l.chars().count());
        if last > 0 && last + 1 + word.chars().count() > room {
            lines.push(String::new());
        }
        if let Some(line) = lines.last_mut() {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

/// Width of the two-column help; narrower screens get one column.
const TWO_COLUMNS: u16 = 78;
/// Width of the one-column help.
const ONE_COLUMN: u16 = 40;

/// The help's lines as laid out on `area`: two columns (each section in the shorter one,
/// so that the whole list fits an 80×24 terminal) when the screen is wide enough, else one.
fn columns(area: Rect) -> (Vec<Line<'static>>, Vec<Line<'static>>) {
    let two = area.width >= TWO_COLUMNS;
    // Inside the borders: two halves, the left one between margins (as `render` lays
    // them out), or one column between margins.
    let inner = usize::from(popup_rect(area, 0).0.width.saturating_sub(2));
    let (left_width, right_width) = if two {
        ((inner / 2).saturating_sub(2), inner - inner / 2)
    } else {
        (inner.saturating_sub(2), 0)
    };
    let mut left = Vec::new();
    let mut right = Vec::new();
    for (title, hints) in keymap::HELP {
        let (col, width) = if two && right.len() < left.len() {
            (&mut right, right_width)
        } else {
            (&mut left, left_width)
        };
        if !col.is_empty() {
            col.push(Line::default());
        }
        section(title, hints, width, col);
    }
    (left, right)
}

/// The pop-up on `area` and how many lines of it show at once, for `lines` lines.
fn popup_rect(area: Rect, lines: usize) -> (Rect, usize) {
    let width = if area.width >= TWO_COLUMNS {
        TWO_COLUMNS
    } else {
        ONE_COLUMN.max(area.width.min(TWO_COLUMNS))
    };
    let wanted = u16::try_from(lines).unwrap_or(u16::MAX).saturating_add(2);
    let popup = layout::popup(area, width, wanted);
    (popup, usize::from(popup.height.saturating_sub(2)))
}

fn lines_and_rows(area: Rect) -> (usize, usize) {
    let (left, right) = columns(area);
    let lines = left.len().max(right.len());
    (lines, popup_rect(area, lines).1)
}

/// The furthest the help scrolls on `area`: its last line at the bottom.
pub fn max_scroll(area: Rect) -> usize {
    let (lines, rows) = lines_and_rows(area);
    lines.saturating_sub(rows)
}

/// Lines the help scrolls by with PgUp/PgDn.
pub fn page(area: Rect) -> usize {
    lines_and_rows(area).1.max(1)
}

pub fn render(f: &mut Frame, area: Rect, scroll: usize) {
    let (left, right) = columns(area);
    let lines = left.len().max(right.len());
    let (popup, rows) = popup_rect(area, lines);
    let scroll = scroll.min(lines.saturating_sub(rows));
    let hint = if lines > rows {
        format!(" ↑↓ {} · esc {} ", s::F_SCROLL, s::F_CLOSE)
    } else {
        format!(" esc {} ", s::F_CLOSE)
    };
    let block = Block::bordered()
        .border_style(theme::border())
        .title(s::HELP_TITLE)
        .title_bottom(Line::from(hint).right_aligned());
    let inner = block.inner(popup);
    f.render_widget(Clear, popup);
    f.render_widget(block, popup);
    let shown = |col: Vec<Line<'static>>| -> Vec<Line<'static>> {
        col.into_iter().skip(scroll).take(rows).collect()
    };
    if right.is_empty() {
        f.render_widget(
            Paragraph::new(shown(left)),
            inner.inner(ratatui::layout::Margin::new(1, 0)),
        );
        return;
    }
    let [l, r] = inner.layout(&Layout::horizontal([
        Constraint::Percentage(50),
        Constraint::Percentage(50),
    ]));
    f.render_widget(
        Paragraph::new(shown(left)),
        l.inner(ratatui::layout::Margin::new(1, 0)),
    );
    f.render_widget(Paragraph::new(shown(right)), r);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_wrap_between_words() {
        assert_eq!(
            wrap_words("back, close, clear filter, then the message", 25),
            ["back, close, clear", "filter, then the message"]
        );
        assert_eq!(wrap_words("quit", 25), ["quit"]);
        assert_eq!(
            wrap_words("a verylongword b", 5),
            ["a", "verylongword", "b"]
        );
    }
}
