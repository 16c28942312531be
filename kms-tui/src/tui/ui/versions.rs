//! The versions of one key; space or enter enables a version at once, or asks before
//! disabling it.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, HighlightSpacing, Paragraph, Row, Table, TableState};

use super::theme;
use crate::tui::app::{App, VersionsView, scroll_offset};
use crate::tui::strings as s;

/// Cells of the encryptions column: a version's count up to 2^31 (the mark a restore
/// sets on an AES version, docs/service.md) shown whole.
const ENCRYPTIONS_WIDTH: usize = 13;

pub fn render(f: &mut Frame, area: Rect, app: &App, v: &VersionsView) {
    let block = Block::bordered()
        .border_style(theme::border())
        .title(s::versions_title(&v.name));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let [note_area, table_area] = inner.layout(&Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
    ]));
    let key = app.key_by_tag(&v.tag);
    let note = match (&v.error, key) {
        (Some(e), _) => Line::styled(format!(" {e}"), theme::error()),
        (None, Some(k)) => match s::versions_state_note(k.state) {
            Some(n) => Line::styled(format!(" {n}"), theme::warn()),
            None => Line::styled(format!(" {}", s::version_detail(k)), theme::dim()),
        },
        (None, None) => Line::default(),
    };
    f.render_widget(Paragraph::new(note), note_area);

    let Some(versions) = &v.versions else {
        f.render_widget(Paragraph::new(s::V_LOADING).style(theme::dim()), table_area);
        return;
    };
    let current = key.map(|k| k.current_version);
    // Only AES encryptions are counted (they spend the nonce budget): a count of 0 for an
    // RSA key that did encrypt would mislead.
    let counted = key.is_none_or(|k| k.key_type == kms_shared::model::KeyType::Aes256);
    let rows_fit = usize::from(table_area.height.saturating_sub(1));
    let offset = scroll_offset(0, v.selected, rows_fit, versions.len());
    let end = (offset + rows_fit).min(versions.len());
    let rows = versions[offset..end].iter().map(|ver| {
        let mut status = if ver.enabled {
            s::V_ENABLED
        } else {
            s::V_DISABLED
        }
        .to_string();
        if Some(ver.version) == current {
            status.push_str(" · ");
            status.push_str(s::V_CURRENT);
        }
        let style = if ver.enabled {
            ratatui::style::Style::new()
        } else {
            theme::dim()
        };
        Row::new(vec![
            Cell::from(format!("v{}", ver.version)),
            Cell::from(status),
            Cell::from(s::datetime(ver.created_at)),
            Cell::from(
                Line::from(if counted {
                    s::count_within(ver.encryptions, ENCRYPTIONS_WIDTH)
                } else {
                    "-".to_string()
                })
                .right_aligned(),
            ),
        ])
        .style(style)
    });
    let header = Row::new(vec![
        Cell::from(s::V_COL_VERSION),
        Cell::from(s::V_COL_STATUS),
        Cell::from(s::V_COL_CREATED),
        Cell::from(Line::from(s::V_COL_ENCRYPTIONS).right_aligned()),
    ])
    .style(theme::table_header());
    let table = Table::new(
        rows,
        [
            Constraint::Length(8),
            Constraint::Length(18),
            Constraint::Length(17),
            Constraint::Length(ENCRYPTIONS_WIDTH as u16),
        ],
    )
    .header(header)
    .column_spacing(2)
    .row_highlight_style(theme::selected())
    .highlight_symbol(theme::HIGHLIGHT)
    .highlight_spacing(HighlightSpacing::Always);
    let mut state = TableState::default();
    if !versions.is_empty() {
        state.select(Some(v.selected.saturating_sub(offset)));
    }
    f.render_stateful_widget(table, table_area, &mut state);
}
