//! The events this dashboard received, newest first.

use kms_shared::model::UnixMillis;
use kms_shared::protocol::{Event, EventKind};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Paragraph, Row};

use super::layout::{self, Tier};
use super::theme;
use crate::tui::app::{EventLog, EventsView, Logged, scroll_offset};
use crate::tui::strings as s;

pub fn render(f: &mut Frame, area: Rect, v: &EventsView, log: &EventLog) {
    let block = Block::bordered()
        .border_style(theme::border())
        .title(s::EVENTS_TITLE);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let [status_area, table_area] = inner.layout(&Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
    ]));
    let status = Line::styled(
        format!(" {}", s::events_status(log.events(), log.is_full())),
        theme::dim(),
    );
    f.render_widget(Paragraph::new(status), status_area);

    let wide = layout::tier(area.width) != Tier::Compact;
    let rows_fit = usize::from(table_area.height.saturating_sub(1));
    let offset = scroll_offset(v.offset, v.selected, rows_fit, log.len());
    let end = (offset + rows_fit).min(log.len());
    let rows = (offset..end)
        .filter_map(|row| log.newest(row))
        .map(|entry| match entry {
            Logged::Event(e) => event_row(e, wide),
            Logged::Missed { missed, at } => gap_row(
                *at,
                s::events_missed_label(*missed),
                s::events_missed(*missed),
                wide,
            ),
            Logged::Reconnected { at } => gap_row(
                *at,
                s::EVENTS_RECONNECTED_LABEL.to_string(),
                s::EVENTS_RECONNECTED.to_string(),
                wide,
            ),
            Logged::OtherStore { data_dir, at } => gap_row(
                *at,
                s::EVENTS_OTHER_STORE_LABEL.to_string(),
                s::events_other_store(data_dir),
                wide,
            ),
        });
    let mut titles = vec![
        Cell::from(if wide {
            s::E_COL_TIME
        } else {
            s::E_COL_TIME_SHORT
        }),
        Cell::from(s::E_COL_EVENT),
        Cell::from(s::E_COL_KEY),
        Cell::from(s::E_COL_VERSION),
    ];
    let widths: Vec<Constraint> = if wide {
        titles.push(Cell::from(s::E_COL_BY));
        vec![
            Constraint::Length(19),
            Constraint::Length(21),
            Constraint::Length(15),
            Constraint::Length(4),
            Constraint::Length(12),
            Constraint::Fill(1),
        ]
    } else {
        vec![
            Constraint::Length(8),
            Constraint::Length(21),
            Constraint::Length(15),
            Constraint::Length(4),
            Constraint::Fill(1),
        ]
    };
    titles.push(Cell::from(s::E_COL_MESSAGE));
    super::view_table(
        f,
        table_area,
        (titles, widths),
        rows,
        (v.selected, offset, log.len()),
        (log.is_empty()).then_some(s::E_EMPTY),
    );
}

/// A row's time: the date too where there is room.
fn time_cell(at: UnixMillis, wide: bool) -> String {
    if wide {
        s::datetime_secs(at)
    } else {
        s::time_of_day(at)
    }
}

fn event_row(e: &Event, wide: bool) -> Row<'static> {
    let time = time_cell(e.time, wide);
    let key = e
        .key_name
        .clone()
        .or_else(|| e.key_tag.clone())
        .unwrap_or_default();
    let mut cells = vec![
        Cell::from(time),
        Cell::from(e.kind.as_str()).style(kind_style(e)),
        Cell::from(key),
        Cell::from(e.version.map(|v| format!("v{v}")).unwrap_or_default()),
    ];
    if wide {
        cells.push(Cell::from(e.account.clone()));
    }
    cells.push(Cell::from(e.message.clone()));
    Row::new(cells)
}

/// Events that take a key, or some of its data, out of use stand out.
fn kind_style(e: &Event) -> Style {
    match e.kind {
        EventKind::StateChanged => e.state.map(theme::state).unwrap_or_default(),
        EventKind::DeletionRequested
        | EventKind::Purged
        | EventKind::VersionLimitReached
        | EventKind::NonceBudgetLow => theme::warn(),
        _ => Style::new(),
    }
}

/// A row that says events are missing here, dated when the dashboard learnt it: what
/// happened in the event column (what a narrow terminal shows of it), why in the message
/// column.
fn gap_row(at: UnixMillis, label: String, text: String, wide: bool) -> Row<'static> {
    let mut cells = vec![Cell::from(time_cell(at, wide)), Cell::from(label)];
    cells.extend(std::iter::repeat_n(
        Cell::from(""),
        if wide { 3 } else { 2 },
    ));
    cells.push(Cell::from(text));
    Row::new(cells).style(theme::warn())
}
