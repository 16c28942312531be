//! The create form: every SPEC §2 rule checked as you type, the daemon's refusal shown
//! in the form if it still says no.

use kms_shared::model::{KeyType, Protection};
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Modifier;
use ratatui::text::{Line, Span};

use super::{theme, wrap};
use crate::tui::app::{App, CreateForm, Field, TokenChoices};
use crate::tui::input;
use crate::tui::strings as s;

const LABEL: usize = 15;

fn label(f: Field) -> &'static str {
    match f {
        Field::Name => s::FORM_NAME,
        Field::Type => s::FORM_TYPE,
        Field::Protection => s::FORM_PROTECTION,
        Field::Token => s::FORM_TOKEN,
        Field::Convergent => s::FORM_CONVERGENT,
        Field::AutoRotation => s::FORM_AUTO,
        Field::Days => s::FORM_DAYS,
        Field::Memo => s::FORM_MEMO,
    }
}

fn checkbox(on: bool) -> String {
    format!("[{}] {}", if on { "x" } else { " " }, s::yes_no(on))
}

fn value(form: &CreateForm, f: Field) -> String {
    match f {
        Field::Name => form.name.clone(),
        Field::Type => format!(
            "‹ {} ›  {}",
            s::type_label(form.key_type),
            form.key_type.purpose()
        ),
        Field::Protection => format!("‹ {} ›", s::protection_label(form.protection)),
        Field::Token if form.protection != Protection::DedicatedHsm => {
            s::FORM_NOT_APPLICABLE.to_string()
        }
        Field::Token => match (&form.tokens, &form.token) {
            (TokenChoices::Loading, _) => s::FORM_TOKENS_LOADING.to_string(),
            (TokenChoices::Loaded(_), Some(t)) => format!("‹ {t} ›"),
            (TokenChoices::Loaded(_), None) => s::FORM_NO_TOKENS.to_string(),
            (TokenChoices::Failed(_), _) => s::FORM_NOT_APPLICABLE.to_string(),
        },
        Field::Convergent if form.key_type != KeyType::Aes256 && !form.convergent => {
            format!("{}  {}", checkbox(false), s::FORM_AES_ONLY)
        }
        Field::Convergent => checkbox(form.convergent),
        Field::AutoRotation => checkbox(form.auto_rotation),
        // Text fields are drawn by `input::field`, around the cursor.
        Field::Days => form.days.clone(),
        Field::Memo => form.memo.clone(),
    }
}

pub fn render(f: &mut Frame, area: Rect, app: &App, form: &CreateForm) {
    let width = 76u16.min(area.width);
    let text_width = usize::from(width.saturating_sub(4));
    // Inside the border: the marker, the label and a space come before the value.
    let value_width = usize::from(width.saturating_sub(2)).saturating_sub(LABEL + 2);
    let taken = app.name_taken(&form.name);
    let mut lines: Vec<Line> = Vec::new();
    let mut cursor: Option<(u16, u16)> = None;
    let mut focus = 0..0;
    for field in Field::ALL {
        let focused = form.focus == field;
        let first_line = lines.len();
        let marker = if focused { "›" } else { " " };
        let label_style = if focused {
            theme::label().add_modifier(Modifier::BOLD | Modifier::REVERSED)
        } else {
            theme::label()
        };
        let mut v = value(form, field);
        if field.is_text() {
            let (shown, x) = input::field(&v, form.cursor_back, focused, value_width);
            if focused {
                cursor = Some((x + (LABEL + 2) as u16, lines.len() as u16));
            }
            v = shown;
        }
        lines.push(Line::from(vec![
            Span::raw(marker),
            Span::styled(format!("{:<LABEL$}", label(field)), label_style),
            Span::raw(" "),
            Span::raw(v),
        ]));
        if let Some(err) = form.shown_error(field, taken) {
            for l in wrap(&format!("✗ {err}"), text_width.saturating_sub(LABEL + 2)) {
                lines.push(Line::styled(
                    format!("{:w$}{l}", "", w = LABEL + 2),
                    theme::error(),
                ));
            }
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
        footer.push(Line::styled(s::FORM_SUBMITTING, theme::dim()));
    } else if form.show_all && !form.is_valid(taken) {
        footer.push(Line::styled(s::FORM_FIX_FIRST, theme::error()));
    }
    super::form_popup(f, area, width, s::FORM_TITLE, lines, footer, focus, cursor);
}
