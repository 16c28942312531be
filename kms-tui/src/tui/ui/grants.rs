//! Every grant: who has which role, on which key (SPEC §6), as `kmsctl grants` lists them.

use ratatui::Frame;
use ratatui::layout::{Constraint, Rect};
use ratatui::widgets::{Cell, Row};

use super::layout::{self, Tier};
use super::theme;
use crate::tui::app::{GrantsView, scroll_offset};
use crate::tui::strings as s;

pub fn render(f: &mut Frame, area: Rect, g: &GrantsView) {
    let (table_area, Some(grants)) = super::list_frame(
        f,
        area,
        s::GRANTS_TITLE,
        (&g.error, &g.grants),
        s::G_LOADING,
        s::grants_status,
    ) else {
        return;
    };

    // Wider terminals also show NCP's name of the role and the time to the second.
    let wide = layout::tier(area.width) != Tier::Compact;
    let rows_fit = usize::from(table_area.height.saturating_sub(1));
    let offset = scroll_offset(g.offset, g.selected, rows_fit, grants.len());
    let end = (offset + rows_fit).min(grants.len());
    let rows = grants[offset..end].iter().map(|gr| {
        let mut cells = vec![Cell::from(s::role_label(gr.role))];
        if wide {
            cells.push(Cell::from(gr.role.ncp_name()));
        }
        let key_style = if gr.key_tag.is_none() {
            theme::warn()
        } else {
            ratatui::style::Style::new()
        };
        cells.extend([
            Cell::from(s::principal(&gr.principal)),
            Cell::from(s::grant_key(gr)).style(key_style),
            Cell::from(if wide {
                s::datetime_secs(gr.granted_at)
            } else {
                s::datetime(gr.granted_at)
            }),
            Cell::from(gr.granted_by.clone()),
        ]);
        Row::new(cells)
    });
    let mut titles = vec![Cell::from(s::G_COL_ROLE)];
    let widths: Vec<Constraint> = if wide {
        titles.push(Cell::from(s::G_COL_NCP));
        vec![
            Constraint::Length(12),
            Constraint::Length(16),
            Constraint::Length(24),
            Constraint::Length(15),
            Constraint::Length(19),
            Constraint::Fill(1),
        ]
    } else {
        vec![
            Constraint::Length(12),
            Constraint::Length(16),
            Constraint::Length(15),
            Constraint::Length(16),
            Constraint::Fill(1),
        ]
    };
    titles.extend([
        Cell::from(s::G_COL_FOR),
        Cell::from(s::G_COL_KEY),
        Cell::from(s::G_COL_GRANTED),
        Cell::from(s::G_COL_BY),
    ]);
    super::view_table(
        f,
        table_area,
        (titles, widths),
        rows,
        (g.selected, offset, grants.len()),
        (grants.is_empty()).then_some(s::G_EMPTY),
    );
}
