//! The key table. Only the rows on screen are built: with 100,000 keys a frame costs
//! the same as with twenty.

use kms_shared::model::{KeyInfo, KeyState};
use ratatui::Frame;
use ratatui::layout::{Constraint, Rect};
use ratatui::text::Line;
use ratatui::widgets::{Cell, HighlightSpacing, Paragraph, Row, Table, TableState};

use super::layout::{self, Tier};
use super::theme;
use crate::tui::app::{App, scroll_offset};
use crate::tui::strings as s;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    Name,
    Protection,
    Type,
    State,
    /// Last use, or when a pending deletion is due.
    When,
    Created,
    Tag,
    Convergent,
    Version,
    Auto,
    Period,
    Uses,
    Memo,
}

/// Cells of the usage count column.
const USES_WIDTH: usize = 9;

fn columns(tier: Tier) -> &'static [Col] {
    use Col::*;
    match tier {
        Tier::Compact => &[Name, Type, State, When, Version, Uses],
        Tier::Medium => &[
            Name, Protection, Type, State, When, Created, Version, Auto, Period, Uses, Memo,
        ],
        Tier::Full => &[
            Name, Protection, Type, State, When, Created, Tag, Convergent, Version, Auto, Period,
            Uses, Memo,
        ],
    }
}

/// Which columns go first when the screen is too narrow for a tier's columns (the
/// smallest tier needs 67): higher numbers are dropped first, whole, rather than every
/// column being cut short. The name is always kept.
fn priority(c: Col) -> u8 {
    match c {
        Col::Name => 0,
        Col::State => 1,
        Col::Type => 2,
        Col::Uses => 3,
        Col::Version => 4,
        Col::When => 5,
        Col::Protection => 6,
        Col::Period => 7,
        Col::Auto => 8,
        Col::Created => 9,
        Col::Memo => 10,
        Col::Tag => 11,
        Col::Convergent => 12,
    }
}

/// The narrowest a column is shown: its width, or for the memo (which takes what is
/// left) its title.
fn min_width(c: Col) -> usize {
    match width(c) {
        Constraint::Length(n) => usize::from(n),
        _ => s::COL_MEMO.chars().count(),
    }
}

/// `cols` without the lowest-priority ones that do not fit in `width` (the highlight
/// column and one space between columns included).
fn fit(cols: &[Col], width: u16) -> Vec<Col> {
    let need = |cs: &[Col]| {
        theme::HIGHLIGHT.chars().count()
            + cs.iter().map(|c| min_width(*c)).sum::<usize>()
            + cs.len().saturating_sub(1)
    };
    let mut kept = cols.to_vec();
    while kept.len() > 1 && need(&kept) > usize::from(width) {
        let Some(last) = kept.iter().copied().max_by_key(|c| priority(*c)) else {
            break;
        };
        kept.retain(|c| *c != last);
    }
    kept
}

fn width(c: Col) -> Constraint {
    match c {
        Col::Name => Constraint::Length(15),
        Col::Protection => Constraint::Length(13),
        Col::Type => Constraint::Length(7),
        Col::State => Constraint::Length(16),
        Col::When => Constraint::Length(10),
        Col::Created => Constraint::Length(10),
        Col::Tag => Constraint::Length(32),
        Col::Convergent => Constraint::Length(4),
        Col::Version => Constraint::Length(4),
        Col::Auto => Constraint::Length(4),
        Col::Period => Constraint::Length(15),
        Col::Uses => Constraint::Length(USES_WIDTH as u16),
        Col::Memo => Constraint::Fill(1),
    }
}

fn title(c: Col) -> Cell<'static> {
    let t = match c {
        Col::Name => s::COL_NAME,
        Col::Protection => s::COL_PROTECTION,
        Col::Type => s::COL_TYPE,
        Col::State => s::COL_STATE,
        Col::When => s::COL_WHEN,
        Col::Created => s::COL_CREATED,
        Col::Tag => s::COL_TAG,
        Col::Convergent => s::COL_CONVERGENT,
        Col::Version => s::COL_VERSION,
        Col::Auto => s::COL_AUTO,
        Col::Period => s::COL_PERIOD,
        Col::Uses => return Cell::from(Line::from(s::COL_USES).right_aligned()),
        Col::Memo => s::COL_MEMO,
    };
    Cell::from(t)
}

/// The memo column's width: what the others and the spaces between them leave of `width`.
fn memo_width(cols: &[Col], width: u16) -> usize {
    let fixed: usize = cols
        .iter()
        .filter(|c| **c != Col::Memo)
        .map(|c| min_width(*c))
        .sum();
    usize::from(width)
        .saturating_sub(theme::HIGHLIGHT.chars().count())
        .saturating_sub(fixed)
        .saturating_sub(cols.len().saturating_sub(1))
}

fn cell(c: Col, k: &KeyInfo, memo_width: usize) -> Cell<'static> {
    match c {
        Col::Name => Cell::from(k.name.clone()),
        Col::Protection => Cell::from(s::protection_label(k.protection)),
        Col::Type => Cell::from(s::type_label(k.key_type)),
        Col::State => Cell::from(k.state.as_str()).style(theme::state(k.state)),
        // A deletion date goes with its state.
        Col::When if k.state == KeyState::PendingDeletion => {
            Cell::from(s::when_cell(k)).style(theme::state(k.state))
        }
        Col::When => Cell::from(s::when_cell(k)),
        Col::Created => Cell::from(s::date(k.created_at)),
        Col::Tag => Cell::from(k.tag.clone()),
        Col::Convergent => Cell::from(s::yes_no(k.convergent)),
        Col::Version => Cell::from(format!("v{}", k.current_version)),
        Col::Auto => Cell::from(s::on_off(k.auto_rotation)),
        Col::Period => Cell::from(s::period_cell(k)),
        Col::Uses => {
            Cell::from(Line::from(s::count_within(k.usage_count, USES_WIDTH)).right_aligned())
        }
        Col::Memo => Cell::from(super::fit_cells(&k.memo, memo_width)),
    }
}

pub fn render(f: &mut Frame, area: Rect, app: &App) {
    let cols = fit(columns(layout::tier(area.width)), area.width);
    let header = Row::new(cols.iter().map(|c| title(*c))).style(theme::table_header());
    let rows_fit = usize::from(area.height.saturating_sub(1));
    // The offset is kept by `update`; recomputed here only as a guard against a size
    // that changed since.
    let offset = scroll_offset(app.offset, app.selected, rows_fit, app.visible.len());
    let end = (offset + rows_fit).min(app.visible.len());
    let memo = memo_width(&cols, area.width);
    let rows = app.visible[offset..end].iter().filter_map(|&i| {
        let k = app.keys.get(i)?;
        Some(Row::new(cols.iter().map(|c| cell(*c, k, memo))))
    });
    let table = Table::new(rows, cols.iter().map(|c| width(*c)))
        .header(header)
        .column_spacing(1)
        .row_highlight_style(theme::selected())
        .highlight_symbol(theme::HIGHLIGHT)
        .highlight_spacing(HighlightSpacing::Always);
    let mut state = TableState::default();
    if !app.visible.is_empty() {
        state.select(Some(app.selected.saturating_sub(offset)));
    }
    f.render_stateful_widget(table, area, &mut state);

    let empty = if !app.loaded {
        Some(s::LOADING_KEYS)
    } else if app.keys.is_empty() {
        Some(s::NO_KEYS)
    } else if app.visible.is_empty() {
        Some(s::NO_MATCH)
    } else {
        None
    };
    if let Some(text) = empty
        && area.height > 2
    {
        let at = Rect::new(area.x, area.y + 2, area.width, 1);
        f.render_widget(Paragraph::new(text).centered().style(theme::dim()), at);
    }
}
