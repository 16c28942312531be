//! A key's history, newest first; older pages load as the selection nears the end.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Paragraph, Row};

use super::layout::{self, Tier};
use super::theme;
use crate::tui::app::{HistoryView, scroll_offset};
use crate::tui::strings as s;

pub fn render(f: &mut Frame, area: Rect, h: &HistoryView) {
    let block = Block::bordered()
        .border_style(theme::border())
        .title(s::history_title(&h.name));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let [status_area, table_area] = inner.layout(&Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
    ]));
    let status = match &h.error {
        Some(e) => Line::styled(format!(" {e}"), theme::error()),
        None if h.loading && h.entries.is_empty() => {
            Line::styled(format!(" {}", s::HI_LOADING), theme::dim())
        }
        None => Line::styled(
            format!(
                " {}",
                s::history_status(h.entries.len(), h.loading, h.exhausted)
            ),
            theme::dim(),
        ),
    };
    f.render_widget(Paragraph::new(status), status_area);

    let wide = layout::tier(area.width) != Tier::Compact;
    let rows_fit = usize::from(table_area.height.saturating_sub(1));
    let offset = scroll_offset(h.offset, h.selected, rows_fit, h.entries.len());
    let end = (offset + rows_fit).min(h.entries.len());
    let rows = h.entries[offset..end].iter().map(|e| {
        let result_style = if e.result == "ok" {
            theme::ok()
        } else {
            theme::error()
        };
        let time = if wide {
            s::datetime_secs(e.time)
        } else {
            s::datetime(e.time)
        };
        let mut cells = vec![
            Cell::from(e.client.clone()),
            Cell::from(time),
            Cell::from(s::history_action(e.action)),
            Cell::from(e.version.map(|v| format!("v{v}")).unwrap_or_default()),
            Cell::from(s::history_result(e)).style(result_style),
            Cell::from(e.account.clone()),
        ];
        if wide {
            cells.push(Cell::from(format!("{}/{}", e.uid, e.pid)));
        }
        Row::new(cells)
    });
    let mut titles = vec![
        Cell::from(s::HI_COL_CLIENT),
        Cell::from(s::HI_COL_TIME),
        Cell::from(s::HI_COL_ACTION),
        Cell::from(s::HI_COL_VERSION),
        Cell::from(s::HI_COL_RESULT),
        Cell::from(s::HI_COL_ACCOUNT),
    ];
    let widths: Vec<Constraint> = if wide {
        titles.push(Cell::from(s::HI_COL_IDS));
        vec![
            Constraint::Length(15),
            Constraint::Length(19),
            Constraint::Length(15),
            Constraint::Length(4),
            Constraint::Length(17),
            Constraint::Length(20),
            Constraint::Fill(1),
        ]
    } else {
        vec![
            Constraint::Length(12),
            Constraint::Length(16),
            Constraint::Length(15),
            Constraint::Length(4),
            Constraint::Length(17),
            Constraint::Fill(1),
        ]
    };
    super::view_table(
        f,
        table_area,
        (titles, widths),
        rows,
        (h.selected, offset, h.entries.len()),
        (h.entries.is_empty() && !h.loading && h.error.is_none()).then_some(s::HI_EMPTY),
    );
}
