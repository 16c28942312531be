//! The message area: results, errors and live events, or the filter being typed. A message
//! that fits is one line, as given; a longer one is wrapped onto as many rows as it needs,
//! up to a third of the screen, and `M` shows the whole of it in a pop-up.

use ratatui::Frame;
use ratatui::layout::{Margin, Position, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph};

use super::{layout, theme};
use crate::tui::app::{App, FullMessage};
use crate::tui::strings as s;

/// Widest the full-message pop-up gets (as wide as the help).
const POPUP_WIDTH: u16 = 78;

pub fn render(f: &mut Frame, area: Rect, app: &App) {
    if app.filter_editing {
        let prompt = format!(" {}", s::FILTER_PROMPT);
        let prompt_cols = prompt.chars().count();
        let room = usize::from(area.width).saturating_sub(prompt_cols);
        let (shown, column) = crate::tui::input::view(&app.filter, app.filter_back, room);
        let x = area.x + (prompt_cols as u16).saturating_add(column);
        let text = format!("{prompt}{shown}");
        f.render_widget(Paragraph::new(Span::styled(text, theme::warn())), area);
        f.set_cursor_position(Position::new(x.min(area.right().saturating_sub(1)), area.y));
        return;
    }
    if let Some(m) = &app.message {
        let style = theme::message(m.kind);
        let lines: Vec<Line> = area_lines(&m.text, area.width, area.height)
            .into_iter()
            .map(|l| Line::from(Span::styled(format!(" {l}"), style)))
            .collect();
        f.render_widget(Paragraph::new(lines), area);
    }
}

/// The message as the message area shows it on a terminal `width` columns wide, in at
/// most `max_rows` rows, each row to be drawn after one space. A message that fits stays
/// one line exactly as given; a longer one is word-wrapped (a word longer than a row is
/// broken). When even `max_rows` rows are too few, the last one ends saying how to see
/// the rest.
pub fn area_lines(text: &str, width: u16, max_rows: u16) -> Vec<String> {
    let room = usize::from(width).saturating_sub(1).max(1);
    if !text.contains('\n') && cols(text) <= room {
        return vec![text.to_string()];
    }
    let max = usize::from(max_rows.max(1));
    let mut lines = wrap(text, room, max + 1);
    if lines.len() > max {
        lines.truncate(max);
        if let Some(last) = lines.last_mut() {
            *last = with_more(last, room);
        }
    }
    if lines.is_empty() {
        lines.push(String::new());
    }
    lines
}

/// `line` cut so that the "more" marker fits after it in `room` columns (or only an
/// ellipsis, when not even the marker fits).
fn with_more(line: &str, room: usize) -> String {
    let marker = cols(s::MESSAGE_MORE);
    if marker < room {
        let mut kept = prefix(line, room - marker - 1);
        // Whole words where there is a space to cut at.
        if kept.len() < line.len()
            && let Some(i) = kept.rfind(' ')
        {
            kept = &kept[..i];
        }
        let kept = kept.trim_end();
        if kept.is_empty() {
            s::MESSAGE_MORE.to_string()
        } else {
            format!("{kept} {}", s::MESSAGE_MORE)
        }
    } else {
        format!("{}…", prefix(line, room.saturating_sub(1)))
    }
}

/// Display width in terminal columns.
fn cols(text: &str) -> usize {
    Span::raw(text).width()
}

/// The longest start of `text` at most `width` columns wide (possibly empty).
fn prefix(text: &str, width: usize) -> &str {
    let mut used = 0;
    for (i, c) in text.char_indices() {
        used += cols(&text[i..i + c.len_utf8()]);
        if used > width {
            return &text[..i];
        }
    }
    text
}

/// Greedy word wrap to `width` columns, keeping the text's own line breaks and breaking
/// words longer than a line; stops after `limit` lines.
pub fn wrap(text: &str, width: usize, limit: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines = Vec::new();
    for paragraph in text.trim().split('\n') {
        let before = lines.len();
        let mut line = String::new();
        let mut used = 0;
        for word in paragraph.split_whitespace() {
            let w = cols(word);
            if !line.is_empty() && used + 1 + w <= width {
                line.push(' ');
                line.push_str(word);
                used += 1 + w;
                continue;
            }
            if !line.is_empty() {
                lines.push(std::mem::take(&mut line));
                if lines.len() >= limit {
                    return lines;
                }
            }
            let mut rest = word;
            while cols(rest) > width {
                // At least one character per line, even one wider than the line.
                let cut = match prefix(rest, width).len() {
                    0 => rest.chars().next().map_or(rest.len(), char::len_utf8),
                    n => n,
                };
                lines.push(rest[..cut].to_string());
                if lines.len() >= limit {
                    return lines;
                }
                rest = &rest[cut..];
            }
            line.push_str(rest);
            used = cols(rest);
        }
        // A blank line of the text stays; nothing is left over after a broken word.
        if !line.is_empty() || lines.len() == before {
            lines.push(line);
        }
        if lines.len() >= limit {
            return lines;
        }
    }
    lines
}

/// Where the full-message pop-up goes on `area`, its text wrapped to fit, and how many of
/// those lines show at once.
pub fn popup_layout(text: &str, area: Rect) -> (Rect, Vec<String>, usize) {
    let width = POPUP_WIDTH.min(area.width);
    // Inside the border, one column of margin each side.
    let lines = wrap(text, usize::from(width.saturating_sub(4)), usize::MAX);
    let wanted = u16::try_from(lines.len())
        .unwrap_or(u16::MAX)
        .saturating_add(2);
    let popup = layout::popup(area, width, wanted);
    let rows = usize::from(popup.height.saturating_sub(2));
    (popup, lines, rows)
}

/// The furthest the pop-up of `text` scrolls on a screen of `size`: its last line at the
/// bottom.
pub fn max_scroll(text: &str, size: (u16, u16)) -> usize {
    let (_, lines, rows) = popup_layout(text, Rect::new(0, 0, size.0, size.1));
    lines.len().saturating_sub(rows)
}

/// Lines the pop-up scrolls by with PgUp/PgDn.
pub fn popup_page(text: &str, size: (u16, u16)) -> usize {
    let (_, _, rows) = popup_layout(text, Rect::new(0, 0, size.0, size.1));
    rows.max(1)
}

pub fn render_popup(f: &mut Frame, area: Rect, m: &FullMessage) {
    let (popup, lines, rows) = popup_layout(&m.message.text, area);
    let scroll = m.scroll.min(lines.len().saturating_sub(rows));
    let hint = if lines.len() > rows {
        format!(" {} · esc {} ", s::MESSAGE_SCROLL_HINT, s::F_CLOSE)
    } else {
        format!(" esc {} ", s::F_CLOSE)
    };
    let block = Block::bordered()
        .border_style(theme::border())
        .title(s::MESSAGE_TITLE)
        .title_bottom(Line::from(hint).right_aligned());
    let inner = block.inner(popup).inner(Margin::new(1, 0));
    let style = theme::message(m.message.kind);
    let shown: Vec<Line> = lines
        .into_iter()
        .skip(scroll)
        .take(rows)
        .map(|l| Line::styled(l, style))
        .collect();
    f.render_widget(Clear, popup);
    f.render_widget(block, popup);
    f.render_widget(Paragraph::new(shown), inner);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message that fits is one line exactly as given, double spaces and all.
    #[test]
    fn short_message_is_one_line_as_given() {
        assert_eq!(
            area_lines("payments  rotated", 80, 8),
            ["payments  rotated"]
        );
        // 79 columns after the leading space: exactly full.
        let full = "x".repeat(79);
        assert_eq!(area_lines(&full, 80, 8), [full.as_str()]);
        assert_eq!(area_lines("", 80, 8), [""]);
    }

    /// A long message wraps at words onto as many rows as it needs, nothing lost.
    #[test]
    fn long_message_wraps_whole() {
        let text = "could not disable payments: permission-denied: token 4f2a needs the \
                    key-manager role on payments; tail-of-the-reason";
        let lines = area_lines(text, 40, 8);
        assert!(lines.len() > 1, "{lines:?}");
        assert!(lines.iter().all(|l| cols(l) <= 39), "{lines:?}");
        assert_eq!(lines.join(" "), text);
        assert!(lines.iter().all(|l| !l.is_empty()), "{lines:?}");
    }

    /// Words longer than a row are broken; the text's own line breaks are kept.
    #[test]
    fn long_words_break_and_newlines_stay() {
        assert_eq!(
            wrap("abcdefgh ij", 3, usize::MAX),
            ["abc", "def", "gh", "ij"]
        );
        assert_eq!(wrap("one\ntwo three", 20, usize::MAX), ["one", "two three"]);
        assert_eq!(wrap("one\n\ntwo", 20, usize::MAX), ["one", "", "two"]);
        // Wide characters count two columns; one wider than the line still goes out.
        assert_eq!(wrap("日本語", 4, usize::MAX), ["日本", "語"]);
        assert_eq!(wrap("日本", 1, usize::MAX), ["日", "本"]);
        assert_eq!(wrap("a b c d", 1, 2), ["a", "b"]);
    }

    /// Past the row limit the last row says how to see the rest, within the width.
    #[test]
    fn overflow_says_more() {
        let text = "word ".repeat(100);
        let lines = area_lines(&text, 30, 3);
        assert_eq!(lines.len(), 3);
        let last = lines.last().map(String::as_str).unwrap_or_default();
        assert!(last.ends_with(s::MESSAGE_MORE), "{lines:?}");
        assert!(lines.iter().all(|l| cols(l) <= 29), "{lines:?}");
        // Too narrow for the marker: an ellipsis.
        let lines = area_lines(&text, 8, 1);
        assert_eq!(lines, ["word…"]);
    }

    /// The pop-up scrolls only as far as its last line.
    #[test]
    fn popup_scroll_limit() {
        assert_eq!(max_scroll("short", (80, 24)), 0);
        // 200 words of 4 letters, seven to a line 36 columns wide (a 40-column pop-up):
        // 29 lines, 10 of them shown on a 12-row screen.
        let text = "word ".repeat(200);
        let (_, lines, rows) = popup_layout(&text, Rect::new(0, 0, 40, 12));
        assert_eq!((lines.len(), rows), (29, 10));
        assert_eq!(max_scroll(&text, (40, 12)), 19);
    }
}
