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
    make_cells_safe(f.buffer_mut());
}

/// Makes every cell drawn safe for the terminal, after everything is drawn: free text
/// reaches the screen in many places (memos, the program and account names in history —
/// any local process names itself —, event messages).
///
/// - The Unicode controls that reorder text are taken out: ratatui drops control
///   characters but writes these (zero-width, each added to the cell before it), and a
///   process named with U+202E would make its history row read backwards.
/// - A cell whose width terminals disagree on is drawn as something they agree on
///   ([`steady_in`]): ratatui gives an emoji sequence its width by Unicode's rules, a
///   terminal that draws the sequence's parts one by one (tmux 3.3) takes more cells,
///   and the rest of the line moves right and leaves stray halves behind.
fn make_cells_safe(buf: &mut ratatui::buffer::Buffer) {
    use kms_shared::text::reorders_text;
    use unicode_width::UnicodeWidthStr as _;
    let row = usize::from(buf.area.width).max(1);
    for i in 0..buf.content.len() {
        let symbol = buf.content[i].symbol();
        // Borders and other text with nothing to change cost no allocation.
        if symbol.is_ascii() || !symbol.chars().any(|c| reorders_text(c) || unsteady(c)) {
            continue;
        }
        // The columns ratatui laid this cell out in, whatever is taken out of it.
        let assigned = symbol.width().max(1);
        let kept: String = symbol.chars().filter(|c| !reorders_text(*c)).collect();
        let Some(safe) = steady_in(&kept, assigned) else {
            buf.content[i].set_symbol(if kept.is_empty() { " " } else { &kept });
            continue;
        };
        // Each character with a width (and the marks on it) in a cell of its own — the
        // cells after a wide one are blanks ratatui keeps — so that what ratatui writes
        // next time in those cells is what the terminal shows ("KR" in one cell left an
        // "R" it never overwrote), in the first cell's style; never past the columns
        // ratatui laid out, the row's end, or a cell something else was drawn in since
        // (a pop-up's border over the second half of a flag).
        let style = buf.content[i].style();
        let end = (i + assigned).min((i / row + 1) * row);
        let mut cell = i;
        let mut parts = cells_of(&safe).into_iter();
        let first = parts.next().unwrap_or_else(|| " ".into());
        buf.content[i].set_symbol(&first);
        cell += first.width().max(1);
        for part in parts {
            let w = part.width().max(1);
            if cell + w > end || buf.content[cell].symbol() != " " {
                break;
            }
            buf.content[cell].set_symbol(&part).set_style(style);
            cell += w;
        }
    }
}

/// `text` cut into what each cell holds: a character with a width, with the zero-width
/// marks around it (those before the first such character go with it).
fn cells_of(text: &str) -> Vec<String> {
    use unicode_width::UnicodeWidthChar as _;
    let mut cells: Vec<String> = Vec::new();
    let mut leading = String::new();
    for c in text.chars() {
        let wide = c.width().unwrap_or(0) > 0;
        match cells.last_mut() {
            Some(last) if !wide => last.push(c),
            None if !wide => leading.push(c),
            _ => {
                let mut cell = std::mem::take(&mut leading);
                cell.push(c);
                cells.push(cell);
            }
        }
    }
    cells
}

/// Whether `c` is an emoji, as far as joining goes: U+200D between emoji joins them into
/// one picture some terminals draw and others draw part by part; between the letters of
/// an Indic script it is writing, and stays.
fn emoji(c: char) -> bool {
    c >= '\u{1f000}' || ('\u{2300}'..='\u{2bff}').contains(&c)
}

/// Characters that make a cell's width depend on the terminal: regional indicators
/// (flags), U+200D, variation selectors, the keycap mark, tags and skin-tone modifiers.
fn unsteady(c: char) -> bool {
    ('\u{1f1e6}'..='\u{1f1ff}').contains(&c)
        || matches!(c, '\u{200d}' | '\u{fe0e}' | '\u{fe0f}' | '\u{20e3}')
        || ('\u{1f3fb}'..='\u{1f3ff}').contains(&c)
        || ('\u{e0020}'..='\u{e007f}').contains(&c)
}

/// A cell's text (one grapheme) as something every terminal draws in the same width,
/// if it is not that already: the width ratatui gave it (Unicode's), made of characters
/// that are that wide alone. A flag (two regional indicators) becomes its two letters
/// (🇰🇷 → `KR`); a sequence of emoji joined by U+200D (👨‍👩‍👧) its first emoji;
/// variation selectors, keycap marks, tags and skin-tone modifiers are dropped, and what
/// is left narrower than the cell padded with spaces (❤️ → `❤ `). U+200D in other
/// scripts (Sinhala, Devanagari) is left as it is.
/// The cell is laid out `width` columns wide (ratatui's width of it as drawn).
fn steady_in(grapheme: &str, width: usize) -> Option<String> {
    use unicode_width::{UnicodeWidthChar as _, UnicodeWidthStr as _};
    let regional = |c: char| ('\u{1f1e6}'..='\u{1f1ff}').contains(&c);
    let has_emoji = grapheme.chars().any(emoji);
    let drop = |c: char| unsteady(c) && (c != '\u{200d}' || has_emoji);
    if !grapheme.chars().any(drop) {
        return None;
    }
    let mut out: String = if grapheme.chars().any(regional) {
        grapheme
            .chars()
            .filter(|&c| regional(c))
            .map(|c| char::from(b'A' + (u32::from(c) - 0x1f1e6) as u8))
            .take(width)
            .collect()
    } else {
        // The first character with a width, and the marks on it; not what it joins.
        let mut seen_wide = false;
        grapheme
            .chars()
            .filter(|&c| !drop(c))
            .take_while(|&c| {
                let wide = c.width().unwrap_or(0) > 0;
                let go_on = !(wide && seen_wide);
                seen_wide |= wide;
                go_on
            })
            .collect()
    };
    if out.width() > width {
        out = "?".repeat(width);
    }
    let pad = width - out.width();
    out.extend(std::iter::repeat_n(' ', pad));
    Some(out)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod cell_tests {
    use super::*;

    /// [`steady_in`] for a cell as wide as Unicode makes its text.
    fn steady(grapheme: &str) -> Option<String> {
        use unicode_width::UnicodeWidthStr as _;
        steady_in(grapheme, grapheme.width())
    }
    use unicode_width::{UnicodeWidthChar as _, UnicodeWidthStr as _};

    /// Each grapheme terminals disagree on becomes what they agree on, as wide as ratatui
    /// counted it; the others stay as they are.
    #[test]
    fn unsteady_graphemes_become_steady_ones_of_the_same_width() {
        for (g, want) in [
            ("\u{1f1f0}\u{1f1f7}", Some("KR")),
            (
                "\u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467}",
                Some("\u{1f468}"),
            ),
            ("\u{1f44d}\u{1f3fd}", Some("\u{1f44d}")),
            ("\u{2764}\u{fe0f}", Some("\u{2764} ")),
            ("1\u{fe0f}\u{20e3}", Some("1 ")),
            ("\u{1f511}", None),
            ("e\u{301}", None),
            // Sinhala's "shri": U+200D between letters is writing, not an emoji join.
            ("\u{0dc1}\u{0dca}\u{200d}\u{0dbb}\u{0dd3}", None),
            // A mark on a base that loses its variation selector stays on it.
            ("e\u{301}\u{fe0e}", Some("e\u{301}")),
            ("\u{ac00}", None),
        ] {
            assert_eq!(steady(g).as_deref(), want, "{g:?}");
            if let Some(s) = steady(g) {
                assert_eq!(s.width(), g.width(), "{g:?} → {s:?}");
                // Made only of characters with one width everywhere.
                assert!(steady(&s).is_none(), "{s:?}");
            }
        }
    }

    /// A memo of emoji sequences drawn into a row: every cell is steady afterwards, and
    /// the row's cells add up to its width, so nothing after them moves.
    #[test]
    fn a_row_of_emoji_sequences_keeps_its_width() {
        use ratatui::buffer::Buffer;
        use ratatui::layout::Rect;
        use ratatui::text::Line;
        use ratatui::widgets::Widget;
        let memo =
            "A\u{1f1f0}\u{1f1f7}B\u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467}C\u{2764}\u{fe0f}D|";
        let area = Rect::new(0, 0, 20, 1);
        let mut buf = Buffer::empty(area);
        Line::raw(memo).render(area, &mut buf);
        make_cells_safe(&mut buf);
        let mut row = String::new();
        let mut cells = 0;
        let mut x = 0;
        while x < 20 {
            let symbol = buf[(x, 0)].symbol().to_string();
            assert!(steady(&symbol).is_none(), "cell {x}: {symbol:?}");
            let w = symbol.width().max(1) as u16;
            row.push_str(&symbol);
            cells += w;
            x += w;
        }
        assert_eq!(cells, 20);
        assert!(row.starts_with("AKRB\u{1f468}C\u{2764} D|"), "{row:?}");
        // The flag's letters are two cells of one character each, not one of two.
        assert_eq!((buf[(1, 0)].symbol(), buf[(2, 0)].symbol()), ("K", "R"));
    }

    /// What is written never passes the columns ratatui laid the cell out in: a heart
    /// whose variation selector a reordering control separated (one column), a mark
    /// before a heart (two), a flag in the last column of a row.
    #[test]
    fn cells_are_rewritten_within_their_columns() {
        use ratatui::buffer::Buffer;
        use ratatui::layout::Rect;
        use ratatui::text::Line;
        use ratatui::widgets::Widget;
        let area = Rect::new(0, 0, 6, 2);
        let mut buf = Buffer::empty(area);
        Line::raw("\u{2764}\u{202e}\u{fe0f}XY").render(Rect::new(0, 0, 6, 1), &mut buf);
        make_cells_safe(&mut buf);
        let row: Vec<&str> = (0..3).map(|x| buf[(x, 0)].symbol()).collect();
        assert_eq!(row, ["\u{2764}", "X", "Y"]);
        let mut buf = Buffer::empty(area);
        buf[(5, 0)].set_symbol("\u{1f1f0}\u{1f1f7}");
        buf[(0, 1)].set_symbol("Z");
        make_cells_safe(&mut buf);
        assert_eq!((buf[(5, 0)].symbol(), buf[(0, 1)].symbol()), ("K", "Z"));
        assert_eq!(cells_of("\u{301}\u{2764} "), ["\u{301}\u{2764}", " "]);
    }

    /// A mark stays in its base's cell and the next cell keeps its character; the cells
    /// written keep the span's style.
    #[test]
    fn marks_stay_on_their_base_and_styles_carry_over() {
        use ratatui::buffer::Buffer;
        use ratatui::layout::Rect;
        use ratatui::style::{Color, Style};
        use ratatui::text::{Line, Span};
        use ratatui::widgets::Widget;
        let area = Rect::new(0, 0, 10, 1);
        let mut buf = Buffer::empty(area);
        let red = Style::default().fg(Color::Red);
        Line::from(vec![Span::styled(
            "e\u{301}\u{fe0e}X\u{1f1f0}\u{1f1f7}Y",
            red,
        )])
        .render(area, &mut buf);
        make_cells_safe(&mut buf);
        let cells: Vec<&str> = (0..5).map(|x| buf[(x, 0)].symbol()).collect();
        assert_eq!(cells, ["e\u{301}", "X", "K", "R", "Y"]);
        assert!((0..5).all(|x| buf[(x, 0)].fg == Color::Red));
        assert_eq!('\u{1f468}'.width(), Some(2));
    }
}
