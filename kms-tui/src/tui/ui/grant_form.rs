//! The new-grant form: role, user or group, its name, and all keys or the selected one.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Modifier;
use ratatui::text::{Line, Span};

use super::{theme, wrap};
use crate::tui::app::{GrantField, GrantForm, PrincipalKind};
use crate::tui::input;
use crate::tui::strings as s;

const LABEL: usize = 15;

fn label(f: GrantField) -> &'static str {
    match f {
        GrantField::Role => s::GF_ROLE,
        GrantField::Kind => s::GF_KIND,
        GrantField::Name => s::GF_NAME,
        GrantField::Scope => s::GF_SCOPE,
    }
}

fn value(form: &GrantForm, f: GrantField) -> String {
    match f {
        GrantField::Role => format!("‹ {} ›  {}", s::role_label(form.role), form.role.ncp_name()),
        GrantField::Kind => format!(
            "‹ {} ›",
            match form.kind {
                PrincipalKind::User => s::GF_USER,
                PrincipalKind::Group => s::GF_GROUP,
            }
        ),
        GrantField::Name => form.name.clone(),
        GrantField::Scope => match (&form.key, form.scope_key()) {
            (_, Some(k)) => format!("‹ {} ›", s::gf_one_key(&k.name)),
            (Some(_), None) => format!("‹ {} ›", s::ALL_KEYS),
            // Nothing to choose from: no arrows.
            (None, _) => s::ALL_KEYS.to_string(),
        },
    }
}

pub fn render(f: &mut Frame, area: Rect, form: &GrantForm) {
    let width = 70u16.min(area.width);
    let text_width = usize::from(width.saturating_sub(4));
    // Inside the border: the marker, the label and a space come before the value.
    let value_width = usize::from(width.saturating_sub(2)).saturating_sub(LABEL + 2);
    let indent = " ".repeat(LABEL + 2);
    let mut lines: Vec<Line> = Vec::new();
    let mut cursor: Option<(u16, u16)> = None;
    let mut focus = 0..0;
    for field in GrantField::ALL {
        let focused = form.focus == field;
        let first_line = lines.len();
        let label_style = if focused {
            theme::label().add_modifier(Modifier::BOLD | Modifier::REVERSED)
        } else {
            theme::label()
        };
        let mut v = value(form, field);
        if field == GrantField::Name {
            let (shown, x) = input::field(&v, form.cursor_back, focused, value_width);
            if focused {
                cursor = Some((x + (LABEL + 2) as u16, lines.len() as u16));
            }
            v = shown;
        }
        lines.push(Line::from(vec![
            Span::raw(if focused { "›" } else { " " }),
            Span::styled(format!("{:<LABEL$}", label(field)), label_style),
            Span::raw(" "),
            Span::raw(v),
        ]));
        match field {
            // What the role allows, so the choice is made knowing it.
            GrantField::Role => lines.push(Line::styled(
                format!("{indent}{}", s::role_summary(form.role)),
                theme::dim(),
            )),
            GrantField::Name => {
                if let Some(err) = form.shown_name_error() {
                    for l in wrap(&format!("✗ {err}"), text_width.saturating_sub(LABEL + 2)) {
                        lines.push(Line::styled(format!("{indent}{l}"), theme::error()));
                    }
                }
            }
            GrantField::Kind | GrantField::Scope => {}
        }
        if focused {
            focus = first_line..lines.len();
        }
    }
    // Under the fields, always in view: the daemon's refusal, progress, the note.
    let mut footer: Vec<Line> = vec![Line::default()];
    if let Some(e) = &form.daemon_error {
        for l in wrap(&format!("✗ {}", s::daemon_refused(e)), text_width) {
            footer.push(Line::styled(l, theme::error()));
        }
    } else if form.submitting {
        footer.push(Line::styled(s::GF_SUBMITTING, theme::dim()));
    } else {
        for l in wrap(s::GF_NOTE, text_width) {
            footer.push(Line::styled(l, theme::dim()));
        }
    }
    super::form_popup(
        f,
        area,
        width,
        s::GRANT_FORM_TITLE,
        lines,
        footer,
        focus,
        cursor,
    );
}
