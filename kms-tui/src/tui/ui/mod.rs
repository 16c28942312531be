//! Drawing: a pure function of the state, one widget per file.

pub mod ask;
pub mod confirm;
pub mod create_form;
pub mod details;
pub mod events;
pub mod footer;
pub mod grant_form;
pub mod grants;
pub mod header;
pub mod help;
pub mod history;
pub mod key_list;
pub mod layout;
pub mod message;
pub mod prompt;
pub mod theme;
pub mod token_form;
pub mod tokens;
pub mod versions;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Position, Rect};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Clear, HighlightSpacing, Paragraph, Row, Table, TableState};

use super::app::{App, Popup, Screen};
use super::strings as s;

pub fn draw(f: &mut Frame, app: &App) {
    let area = f.area();
    let [header_area, body, message_area, footer_area] = layout::frame(area, app.message_rows());
    header::render(f, header_area, app);
    match &app.screen {
        Screen::Main => {
            let [table, pane] = layout::main_body(body, area.height);
            key_list::render(f, table, app);
            details::render_pane(f, pane, app);
        }
        Screen::Details => details::render_screen(f, body, app),
        Screen::Versions(v) => versions::render(f, body, app, v),
        Screen::History(h) => history::render(f, body, h),
        Screen::Grants(g) => grants::render(f, body, g),
        Screen::Tokens(t) => tokens::render(f, body, t, &app.hsm_tokens),
        Screen::Events(v) => events::render(f, body, v, &app.events),
    }
    message::render(f, message_area, app);
    footer::render(
        f,
        footer_area,
        app.mode(),
        app.selected_key().map(|k| k.state),
    );
    match &app.popup {
        None => {}
        Some(Popup::Help { scroll }) => help::render(f, area, *scroll),
        Some(Popup::Create(form)) => create_form::render(f, area, app, form),
        Some(Popup::Confirm(c)) => confirm::render(f, area, c),
        Some(Popup::Prompt(p)) => prompt::render(f, area, p),
        Some(Popup::Grant(g)) => grant_form::render(f, area, g),
        Some(Popup::Token(t)) => token_form::render(f, area, t),
        Some(Popup::Ask(q)) => ask::render(f, area, q),
        Some(Popup::Message(m)) => message::render_popup(f, area, m),
    }
    drop_reordering(f.buffer_mut());
}

/// Takes the Unicode controls that reorder text out of everything drawn. ratatui drops
/// control characters but writes these (zero-width, each added to the cell before it),
/// and free text reaches the screen in many places: memos, the program and account names
/// in history (any local process names itself), event messages. A process named with
/// U+202E would make its history row read backwards.
fn drop_reordering(buf: &mut ratatui::buffer::Buffer) {
    use kms_shared::text::reorders_text;
    for cell in &mut buf.content {
        let symbol = cell.symbol();
        if symbol.is_ascii() || !symbol.chars().any(reorders_text) {
            continue;
        }
        let kept: String = symbol.chars().filter(|c| !reorders_text(*c)).collect();
        cell.set_symbol(if kept.is_empty() { " " } else { &kept });
    }
}

/// Greedy word wrap for the pop-ups' prose (whose height must be known before drawing).
/// `text` as it fits in `width` display cells: whole, or cut with a `…` in its last cell
/// (a cell that cuts silently hides that there is more).
pub fn fit_cells(text: &str, width: usize) -> String {
    use unicode_width::{UnicodeWidthChar as _, UnicodeWidthStr as _};
    if text.width() <= width {
        return text.to_string();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars() {
        let w = c.width().unwrap_or(0);
        if used + w + 1 > width {
            break;
        }
        out.push(c);
        used += w;
    }
    if width > 0 {
        out.push('…');
    }
    out
}

pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let need = if line.is_empty() {
            word.chars().count()
        } else {
            line.chars().count() + 1 + word.chars().count()
        };
        if need > width && !line.is_empty() {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Draws a form in a bordered pop-up `width` wide: its fields' `lines`, and under them
/// its `footer` (the daemon's refusal, progress, a note), and puts the terminal cursor at
/// `cursor` (column, line of `lines`) when that line is on screen.
///
/// On a screen too short for every line the fields scroll so that `focus` (the focused
/// field's lines: the field and what is said under it) is in view, and the borders say
/// which way more fields are; the footer stays in view below them, so that a refusal is
/// seen whichever field has the focus.
#[allow(clippy::too_many_arguments)]
pub fn form_popup(
    f: &mut Frame,
    area: Rect,
    width: u16,
    title: &str,
    lines: Vec<Line<'_>>,
    footer: Vec<Line<'_>>,
    focus: std::ops::Range<usize>,
    cursor: Option<(u16, u16)>,
) {
    let height = (lines.len() + footer.len()) as u16 + 2;
    let popup = layout::popup(area, width, height);
    let mut block = Block::bordered().border_style(theme::border()).title(title);
    let inner = block.inner(popup);
    // At least one row of fields. A footer that does not fit loses its spacing first.
    let footer_rows = (footer.len() as u16).min(inner.height.saturating_sub(1));
    let footer: Vec<Line> = if usize::from(footer_rows) < footer.len() {
        footer.into_iter().skip_while(|l| l.width() == 0).collect()
    } else {
        footer
    };
    let [body, foot] = inner.layout(&Layout::vertical([
        Constraint::Min(0),
        Constraint::Length(footer_rows),
    ]));
    let scroll = form_scroll(lines.len(), usize::from(body.height), focus);
    if scroll > 0 {
        block = block.title_top(Line::from(s::MORE_ABOVE).right_aligned());
    }
    if scroll + usize::from(body.height) < lines.len() {
        block = block.title_bottom(Line::from(s::MORE_BELOW).right_aligned());
    }
    f.render_widget(Clear, popup);
    f.render_widget(block, popup);
    f.render_widget(
        Paragraph::new(lines).scroll((u16::try_from(scroll).unwrap_or(u16::MAX), 0)),
        body,
    );
    f.render_widget(Paragraph::new(footer), foot);
    if let Some((x, y)) = cursor
        && let Some(y) = usize::from(y).checked_sub(scroll)
        && y < usize::from(body.height)
    {
        f.set_cursor_position(Position::new(
            (body.x + x).min(body.right().saturating_sub(1)),
            body.y + y as u16,
        ));
    }
}

/// The first line shown of a form of `total` lines in `height` rows: the least scroll
/// that shows the end of `focus`, never past its start.
fn form_scroll(total: usize, height: usize, focus: std::ops::Range<usize>) -> usize {
    if total <= height {
        return 0;
    }
    focus
        .end
        .min(total)
        .saturating_sub(height)
        .min(focus.start)
        .min(total - height)
}

/// A bordered list view with one status line on top: "loading", the load error, or what
/// `loaded` says of the list. Returns the area below the status line and the list, if
/// loaded.
pub fn list_frame<'a, T>(
    f: &mut Frame,
    area: Rect,
    title: &str,
    (error, list): (&Option<String>, &'a Option<Vec<T>>),
    loading: &str,
    loaded: impl FnOnce(usize) -> String,
) -> (Rect, Option<&'a [T]>) {
    let block = Block::bordered().border_style(theme::border()).title(title);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let [status_area, table_area] = inner.layout(&Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
    ]));
    let status = match (error, list) {
        (Some(e), _) => Line::styled(format!(" {e}"), theme::error()),
        (None, None) => Line::styled(format!(" {loading}"), theme::dim()),
        (None, Some(l)) => Line::styled(format!(" {}", loaded(l.len())), theme::dim()),
    };
    f.render_widget(Paragraph::new(status), status_area);
    (table_area, list.as_deref())
}

/// Draws a view's table: its column titles, `rows` (those on screen), the selection (row
/// `selected` of the whole list, whose first row on screen is `offset`, of `len` rows),
/// and `empty` under the titles when there is nothing to list.
pub fn view_table<'a>(
    f: &mut Frame,
    area: Rect,
    (titles, widths): (Vec<Cell<'a>>, Vec<Constraint>),
    rows: impl IntoIterator<Item = Row<'a>>,
    (selected, offset, len): (usize, usize, usize),
    empty: Option<&str>,
) {
    let table = Table::new(rows, widths)
        .header(Row::new(titles).style(theme::table_header()))
        .column_spacing(1)
        .row_highlight_style(theme::selected())
        .highlight_symbol(theme::HIGHLIGHT)
        .highlight_spacing(HighlightSpacing::Always);
    let mut state = TableState::default();
    if len > 0 {
        state.select(Some(selected.saturating_sub(offset)));
    }
    f.render_stateful_widget(table, area, &mut state);
    if let Some(text) = empty
        && area.height > 1
    {
        let at = Rect::new(area.x, area.y + 1, area.width, 1);
        f.render_widget(Paragraph::new(text).centered().style(theme::dim()), at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wrapping never exceeds the width unless one word is longer than it.
    #[test]
    fn wrap_respects_width() {
        let lines = wrap("the quick brown fox jumps over the lazy dog", 10);
        assert_eq!(
            lines,
            ["the quick", "brown fox", "jumps over", "the lazy", "dog"]
        );
        assert_eq!(wrap("", 5), Vec::<String>::new());
    }

    /// Text that fits is whole; text that does not ends with `…` in its last cell, wide
    /// characters counted as the two cells they take.
    #[test]
    fn fit_cells_marks_a_cut() {
        assert_eq!(fit_cells("nightly", 8), "nightly");
        assert_eq!(fit_cells("nightly backups", 8), "nightly…");
        assert_eq!(fit_cells("한글 메모", 6), "한글 …");
        assert_eq!(fit_cells("한글 메모", 5), "한글…");
        assert_eq!(fit_cells("abc", 1), "…");
        assert_eq!(fit_cells("abc", 0), "");
    }
}
