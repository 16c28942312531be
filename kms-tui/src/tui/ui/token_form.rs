//! The register-token form: four text fields, the daemon's checks that can be made
//! here shown as you type, its refusal (module, label, PIN) shown in the form.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Modifier;
use ratatui::text::{Line, Span};

use super::{theme, wrap};
use crate::tui::app::{TokenField, TokenForm};
use crate::tui::input;
use crate::tui::strings as s;

const LABEL: usize = 12;

fn label(f: TokenField) -> &'static str {
    match f {
        TokenField::Name => s::TF_NAME,
        TokenField::Module => s::TF_MODULE,
        TokenField::Label => s::TF_LABEL,
        TokenField::PinFile => s::TF_PIN_FILE,
    }
}

pub fn render(f: &mut Frame, area: Rect, form: &TokenForm) {
    let width = 76u16.min(area.width);
    let text_width = usize::from(width.saturating_sub(4));
    let value_width = text_width.saturating_sub(LABEL + 2);
    let mut lines: Vec<Line> = Vec::new();
    let mut cursor: Option<(u16, u16)> = None;
    let mut focus = 0..0;
    for field in TokenField::ALL {
        let focused = form.focus == field;
        let first_line = lines.len();
        let label_style = if focused {
            theme::label().add_modifier(Modifier::BOLD | Modifier::REVERSED)
        } else {
            theme::label()
        };
        // A long path shows its end, where typing happens, or the part around the cursor
        // moved back into it.
        let back = if focused { form.cursor_back } else { 0 };
        let (v, x) = input::view(form.text(field), back, value_width);
        if focused {
            cursor = Some((x + (LABEL + 2) as u16, lines.len() as u16));
        }
        lines.push(Line::from(vec![
            Span::raw(if focused { "›" } else { " " }),
            Span::styled(format!("{:<LABEL$}", label(field)), label_style),
            Span::raw(" "),
            Span::raw(v),
        ]));
        if let Some(err) = form.shown_error(field) {
            for l in wrap(&format!("✗ {err}"), value_width) {
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
        footer.push(Line::styled(s::TF_SUBMITTING, theme::dim()));
    } else if form.show_all && !form.is_valid() {
        footer.push(Line::styled(s::FORM_FIX_FIRST, theme::error()));
    } else {
        for l in wrap(s::TF_NOTE, text_width) {
            footer.push(Line::styled(l, theme::dim()));
        }
    }
    super::form_popup(
        f,
        area,
        width,
        s::TOKEN_FORM_TITLE,
        lines,
        footer,
        focus,
        cursor,
    );
}
