//! The selected key in full: a pane under the list, and the details screen (enter).

use kms_shared::model::KeyInfo;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};

use super::theme;
use crate::tui::app::App;
use crate::tui::strings as s;

/// Width of the pane's left column: its longest line, a rotation of three-digit days
/// ("on · every 730 d · next 2028-12-03", 34 columns after the 11 of the label), and
/// two columns between it and the right column, which it once ran into.
const LEFT: u16 = 47;

fn field(label: &str, value: impl Into<String>, label_width: usize) -> Line<'static> {
    Line::from(vec![
        Span::styled(format!("{label:<label_width$}"), theme::label()),
        Span::raw(value.into()),
    ])
}

fn protection(k: &KeyInfo) -> String {
    match &k.hsm {
        Some(token) => format!("{} ({token})", s::protection_label(k.protection)),
        None => s::protection_label(k.protection).to_string(),
    }
}

fn rotation_short(k: &KeyInfo) -> String {
    match (k.auto_rotation, k.next_rotation_at) {
        (true, Some(next)) => format!("on · every {} d · next {}", k.rotation_days, s::date(next)),
        (auto, _) => format!("{} · every {} d", s::on_off(auto), k.rotation_days),
    }
}

pub fn render_pane(f: &mut Frame, area: Rect, app: &App) {
    if area.height == 0 {
        return;
    }
    let Some(k) = app.selected_key() else {
        f.render_widget(
            Block::new()
                .borders(Borders::TOP)
                .border_style(theme::dim()),
            area,
        );
        return;
    };
    let block = Block::new()
        .borders(Borders::TOP)
        .border_style(theme::border())
        .title(format!(" {} · {} ", k.name, s::DETAILS_TITLE_SUFFIX));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let [top, bottom] = inner.layout(&Layout::vertical([
        Constraint::Length(6),
        Constraint::Min(0),
    ]));
    let [left, right] = top.layout(&Layout::horizontal([
        Constraint::Length(LEFT),
        Constraint::Min(0),
    ]));
    let lw = 11;
    let left_lines = vec![
        field(s::L_TAG, k.tag.clone(), lw),
        field(s::L_STATE, s::state_label(k.state), lw).style(theme::state(k.state)),
        field(s::L_PURPOSE, k.key_type.purpose(), lw),
        field(s::L_CREATED, s::datetime(k.created_at), lw),
        field(s::L_LAST_USED, s::last_used_detail(k), lw),
        field(s::L_ROTATION, rotation_short(k), lw),
    ];
    let rw = 12;
    let right_lines = vec![
        field(s::L_TYPE, s::type_label(k.key_type), rw),
        field(s::L_PROTECTION, protection(k), rw),
        field(s::L_CONVERGENT, s::yes_no(k.convergent), rw),
        field(s::L_VERSION, s::version_detail(k), rw),
        field(s::L_USES, s::count(k.usage_count), rw),
        field(s::L_DELETION, s::deletion_detail(k), rw),
    ];
    f.render_widget(Paragraph::new(left_lines), left);
    f.render_widget(Paragraph::new(right_lines), right);
    // One line: a memo longer than it is cut with a `…` (the details screen shows it
    // whole).
    let memo = super::fit_cells(
        &s::memo_detail(k),
        usize::from(bottom.width).saturating_sub(lw),
    );
    f.render_widget(Paragraph::new(field(s::L_MEMO, memo, lw)), bottom);
}

pub fn render_screen(f: &mut Frame, area: Rect, app: &App) {
    let Some(k) = app.selected_key() else {
        render_pane(f, area, app);
        return;
    };
    let block = Block::bordered()
        .border_style(theme::border())
        .title(format!(" {} · {} ", k.name, s::DETAILS_TITLE_SUFFIX))
        .title_bottom(Line::from(format!(" {} ", s::DETAILS_HINT)).right_aligned());
    let w = 14;
    let mut lines = vec![
        field(s::L_NAME, k.name.clone(), w),
        field(s::L_TAG, k.tag.clone(), w),
        field(s::L_STATE, s::state_label(k.state), w).style(theme::state(k.state)),
        field(s::L_TYPE, s::type_label(k.key_type), w),
        field(s::L_PURPOSE, k.key_type.purpose(), w),
        field(s::L_PROTECTION, protection(k), w),
        field(s::L_CONVERGENT, s::yes_no(k.convergent), w),
        field(s::L_CREATED, s::datetime(k.created_at), w),
        field(s::L_VERSION, s::version_detail(k), w),
        field(s::L_USES, s::count(k.usage_count), w),
        field(s::L_LAST_USED, s::last_used_detail(k), w),
        field(s::L_ROTATION, s::rotation_detail(k), w),
        field(s::L_DELETION, s::deletion_detail(k), w),
    ];
    if let Some(t) = k.deleted_at {
        lines.push(field(s::L_DELETED, s::datetime(t), w));
    }
    lines.push(field(s::L_MEMO, s::memo_detail(k), w));
    f.render_widget(
        Paragraph::new(lines)
            .block(block)
            .wrap(Wrap { trim: false }),
        area,
    );
}
