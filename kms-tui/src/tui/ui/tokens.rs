//! The PKCS#11 tokens registered for dedicated-hsm keys.

use ratatui::Frame;
use ratatui::layout::{Constraint, Rect};
use ratatui::text::Line;
use ratatui::widgets::{Cell, Row};

use super::layout::{self, Tier};
use super::theme;
use crate::tui::app::{HsmTokens, TokensView, scroll_offset};
use crate::tui::strings as s;

/// Fixed columns (name, label, keys, added, by) and the gaps between all columns at
/// each width; the paths get the rest.
const COMPACT_FIXED: u16 = 15 + 16 + 4 + 10 + 8 + 5;
const WIDE_FIXED: u16 = 15 + 20 + 5 + 19 + 12 + 6;

pub fn render(f: &mut Frame, area: Rect, t: &TokensView, tokens: &HsmTokens) {
    let (table_area, Some(list)) = super::list_frame(
        f,
        area,
        s::TOKENS_TITLE,
        (&tokens.error, &tokens.list),
        s::T_LOADING,
        s::tokens_status,
    ) else {
        return;
    };

    let wide = layout::tier(area.width) != Tier::Compact;
    // The highlight column takes one more.
    let paths = table_area
        .width
        .saturating_sub(1 + if wide { WIDE_FIXED } else { COMPACT_FIXED });
    let (module_w, pin_w) = if wide {
        (paths - paths / 2, paths / 2)
    } else {
        (paths, 0)
    };
    let rows_fit = usize::from(table_area.height.saturating_sub(1));
    let offset = scroll_offset(t.offset, t.selected, rows_fit, list.len());
    let end = (offset + rows_fit).min(list.len());
    let rows = list[offset..end].iter().map(|tok| {
        let mut cells = vec![
            Cell::from(tok.name.clone()),
            Cell::from(tok.token.clone()),
            // Module paths share a long prefix: the end names the library.
            Cell::from(s::path_tail(&tok.module, usize::from(module_w))),
        ];
        if wide {
            cells.push(Cell::from(s::path_tail(&tok.pin_file, usize::from(pin_w))));
        }
        let keys_style = if tok.keys > 0 {
            theme::warn()
        } else {
            ratatui::style::Style::new()
        };
        cells.extend([
            Cell::from(Line::from(s::count(tok.keys)).right_aligned()).style(keys_style),
            Cell::from(if wide {
                s::datetime_secs(tok.added_at)
            } else {
                s::date(tok.added_at)
            }),
            Cell::from(tok.added_by.clone()),
        ]);
        Row::new(cells)
    });
    let mut titles = vec![
        Cell::from(s::T_COL_NAME),
        Cell::from(s::T_COL_LABEL),
        Cell::from(s::T_COL_MODULE),
    ];
    let widths: Vec<Constraint> = if wide {
        titles.push(Cell::from(s::T_COL_PIN));
        vec![
            Constraint::Length(15),
            Constraint::Length(20),
            Constraint::Length(module_w),
            Constraint::Length(pin_w),
            Constraint::Length(5),
            Constraint::Length(19),
            Constraint::Length(12),
        ]
    } else {
        vec![
            Constraint::Length(15),
            Constraint::Length(16),
            Constraint::Length(module_w),
            Constraint::Length(4),
            Constraint::Length(10),
            Constraint::Length(8),
        ]
    };
    titles.extend([
        Cell::from(Line::from(s::T_COL_KEYS).right_aligned()),
        Cell::from(if wide {
            s::T_COL_ADDED
        } else {
            s::T_COL_ADDED_SHORT
        }),
        Cell::from(s::T_COL_BY),
    ]);
    super::view_table(
        f,
        table_area,
        (titles, widths),
        rows,
        (t.selected, offset, list.len()),
        (list.is_empty()).then_some(s::T_EMPTY),
    );
}
