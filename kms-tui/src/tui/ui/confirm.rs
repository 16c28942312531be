//! Confirmations. The destructive ones show the impact first (who used the key lately,
//! the seed console's warning pop-ups); "delete now" wants the key name typed.

use ratatui::Frame;
use ratatui::layout::{Position, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph, Wrap};

use super::{layout, theme, wrap};
use crate::tui::app::{Confirm, ConfirmKind, ImpactState};
use crate::tui::input;
use crate::tui::strings as s;

/// Accounts listed before "… and N more".
const MAX_ACCOUNTS: usize = 5;

pub fn render(f: &mut Frame, area: Rect, c: &Confirm) {
    let width = 72u16.min(area.width);
    let text_width = usize::from(width.saturating_sub(4));
    let k = &c.key;
    let (title, body) = match c.kind {
        ConfirmKind::Rotate => (s::confirm_rotate_title(&k.name), s::confirm_rotate_body(k)),
        ConfirmKind::AutoRotation(on) => (
            s::confirm_auto_rotation_title(&k.name, on),
            s::confirm_auto_rotation_body(k, on),
        ),
        ConfirmKind::Disable => (
            s::confirm_disable_title(&k.name),
            s::CONFIRM_DISABLE_BODY.to_string(),
        ),
        ConfirmKind::RequestDeletion => (
            s::confirm_delete_title(&k.name),
            s::CONFIRM_DELETE_BODY.to_string(),
        ),
        ConfirmKind::DeleteNow => (
            s::confirm_delete_now_title(&k.name),
            s::CONFIRM_DELETE_NOW_BODY.to_string(),
        ),
        ConfirmKind::DisableVersion { version, current } => (
            s::confirm_disable_version_title(&k.name, version),
            s::confirm_disable_version_body(version, current),
        ),
    };
    let mut lines: Vec<Line> = wrap(&body, text_width)
        .into_iter()
        .map(Line::from)
        .collect();
    match &c.impact {
        ImpactState::NotNeeded => {}
        ImpactState::Loading => {
            lines.push(Line::default());
            lines.push(Line::styled(s::IMPACT_LOADING, theme::dim()));
        }
        ImpactState::Failed(e) => {
            lines.push(Line::default());
            push_wrapped(&mut lines, s::impact_failed(e), text_width, theme::error());
        }
        ImpactState::Loaded(i) => {
            lines.push(Line::default());
            let style = if i.recent_uses > 0 {
                theme::warn()
            } else {
                theme::ok()
            };
            push_wrapped(
                &mut lines,
                s::impact_summary(i.recent_uses, i.accounts.len(), i.since, i.counted_back_to),
                text_width,
                style,
            );
            for a in i.accounts.iter().take(MAX_ACCOUNTS) {
                push_wrapped(
                    &mut lines,
                    s::impact_account(&a.account, a.uses, a.last_used_at),
                    text_width,
                    Style::new(),
                );
            }
            if i.accounts.len() > MAX_ACCOUNTS {
                lines.push(Line::from(s::impact_more(i.accounts.len() - MAX_ACCOUNTS)));
            }
        }
    }
    lines.push(Line::default());
    let mut cursor = None;
    if c.kind == ConfirmKind::DeleteNow {
        lines.push(Line::from(s::TYPE_NAME_PROMPT));
        let (shown, column) = input::view(&c.typed, c.cursor_back, text_width.saturating_sub(2));
        cursor = Some((2 + column, lines.len() as u16));
        lines.push(Line::from(Span::styled(
            format!("> {shown}"),
            theme::warn(),
        )));
        if c.mismatch {
            push_wrapped(
                &mut lines,
                s::TYPE_NAME_MISMATCH.to_string(),
                text_width,
                theme::error(),
            );
        }
    }
    let hint = if c.kind == ConfirmKind::DeleteNow {
        s::CONFIRM_HINT_TYPE
    } else if c.kind.enter_confirms() {
        s::CONFIRM_HINT_YN_ENTER
    } else {
        s::CONFIRM_HINT_YN
    };
    let height = lines.len() as u16 + 2;
    let popup = layout::popup(area, width, height);
    let border = if c.kind.needs_impact() {
        theme::danger_border()
    } else {
        theme::border()
    };
    let block = Block::bordered()
        .border_style(border)
        .title(title)
        .title_bottom(Line::from(format!(" {hint} ")).right_aligned());
    let inner = block.inner(popup).inner(ratatui::layout::Margin::new(1, 0));
    f.render_widget(Clear, popup);
    f.render_widget(block, popup);
    // On a screen too short for all of it, the name being typed stays in view (its
    // lines are the last): the text above it scrolls off instead.
    let skip = match cursor {
        Some(_) => (lines.len() as u16).saturating_sub(inner.height),
        None => 0,
    };
    let cursor = cursor.map(|(x, y)| (x, y.saturating_sub(skip)));
    // The lines are wrapped to the width already (the height depends on it); a word
    // longer than the whole width is still broken rather than cut off.
    f.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .scroll((skip, 0)),
        inner,
    );
    if let Some((x, y)) = cursor
        && y < inner.height
    {
        f.set_cursor_position(Position::new(
            (inner.x + x).min(inner.right().saturating_sub(1)),
            inner.y + y,
        ));
    }
}

/// Adds `text` in `style`: as one line when it fits (keeping its column layout), else
/// word-wrapped to `width` under its own indentation, so that an error or a long account
/// name is read in full.
fn push_wrapped(lines: &mut Vec<Line<'static>>, text: String, width: usize, style: Style) {
    if text.chars().count() <= width {
        lines.push(Line::styled(text, style));
        return;
    }
    let body = text.trim_start();
    let indent = &text[..text.len() - body.len()];
    let indent = if indent.len() * 2 > width { "" } else { indent };
    for l in wrap(body, width - indent.len()) {
        lines.push(Line::styled(format!("{indent}{l}"), style));
    }
}
