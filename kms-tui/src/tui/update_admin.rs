//! The permissions and HSM tokens views, their forms and their yes/no questions. Part of
//! `update`: state changes and effects only, no I/O.

use kms_shared::model::{GrantInfo, Role};
use kms_shared::protocol::{GrantSpec, HsmTokenInfo};

use super::{back_to, cycle, text_edit};
use crate::tui::action::{Action, Effect};
use crate::tui::app::{
    App, Ask, Base, GrantField, GrantForm, GrantsView, KeyRef, Popup, PrincipalKind, Screen,
    TokenField, TokenForm, TokensView, revoke_spec, scroll_offset,
};
use crate::tui::input;
use crate::tui::strings as s;
use crate::tui::ui::layout;

/// The selection after a movement intent, or `None` if `a` does not move.
pub(super) fn moved(a: &Action, selected: usize, len: usize, page: usize) -> Option<usize> {
    let last = len.saturating_sub(1) as isize;
    let by = |d: isize| (selected as isize + d).clamp(0, last.max(0)) as usize;
    let page = page.max(1) as isize;
    Some(match a {
        Action::Up => by(-1),
        Action::Down => by(1),
        Action::PageUp => by(-page),
        Action::PageDown => by(page),
        Action::Top => 0,
        Action::Bottom => len.saturating_sub(1),
        _ => return None,
    })
}

/// Asks for the token list. A failure from an earlier load is cleared so that views show
/// "loading" rather than an old error while the new answer is on its way.
pub(super) fn load_tokens(app: &mut App, fx: &mut Vec<Effect>) {
    app.hsm_tokens.error = None;
    fx.push(Effect::LoadHsmTokens);
}

pub(super) fn open_grants(app: &mut App, back: Base, fx: &mut Vec<Effect>) {
    // The key the user was on becomes the form's scope choice, so granting a role on
    // one key is: select it, P, n.
    let key = app.selected_key().map(|k| KeyRef {
        tag: k.tag.clone(),
        name: k.name.clone(),
    });
    fx.push(Effect::LoadGrants);
    app.screen = Screen::Grants(GrantsView {
        back,
        key,
        grants: None,
        selected: 0,
        offset: 0,
        error: None,
    });
}

pub(super) fn open_tokens(app: &mut App, back: Base, fx: &mut Vec<Effect>) {
    load_tokens(app, fx);
    app.screen = Screen::Tokens(TokensView {
        back,
        selected: 0,
        offset: 0,
    });
}

pub(super) fn grants_intent(app: &mut App, a: Action) {
    let rows = layout::grants_rows(app.size, app.message_rows());
    let Screen::Grants(g) = &mut app.screen else {
        return;
    };
    if let Some(sel) = moved(&a, g.selected, g.len(), rows) {
        g.selected = sel;
        g.offset = scroll_offset(g.offset, sel, rows, g.len());
        return;
    }
    match a {
        Action::New => app.popup = Some(Popup::Grant(GrantForm::new(g.key.clone()))),
        Action::Remove => match g.selected_grant() {
            Some(grant) => app.popup = Some(Popup::Ask(Ask::Revoke(grant.clone()))),
            None => app.error(s::NO_GRANT_SELECTED),
        },
        Action::Back => {
            let back = g.back;
            back_to(app, back);
        }
        Action::Help => app.popup = Some(Popup::Help { scroll: 0 }),
        _ => {}
    }
}

pub(super) fn tokens_intent(app: &mut App, a: Action) {
    let rows = layout::tokens_rows(app.size, app.message_rows());
    let len = app.hsm_tokens.len();
    let Screen::Tokens(t) = &mut app.screen else {
        return;
    };
    if let Some(sel) = moved(&a, t.selected, len, rows) {
        t.selected = sel;
        t.offset = scroll_offset(t.offset, sel, rows, len);
        return;
    }
    match a {
        Action::New => app.popup = Some(Popup::Token(TokenForm::default())),
        Action::Remove => {
            let chosen = app
                .hsm_tokens
                .list
                .as_ref()
                .and_then(|l| l.get(t.selected))
                .cloned();
            match chosen {
                Some(token) => app.popup = Some(Popup::Ask(Ask::RemoveToken(token))),
                None => app.error(s::NO_TOKEN_SELECTED),
            }
        }
        Action::Back => {
            let back = t.back;
            back_to(app, back);
        }
        Action::Help => app.popup = Some(Popup::Help { scroll: 0 }),
        _ => {}
    }
}

pub(super) fn grant_form_intent(app: &mut App, a: Action, fx: &mut Vec<Effect>) {
    let Some(Popup::Grant(form)) = &mut app.popup else {
        return;
    };
    let change = |form: &mut GrantForm, forward: bool| {
        match form.focus {
            GrantField::Role => form.role = cycle(&Role::ALL, form.role, forward),
            GrantField::Kind => form.kind = cycle(&PrincipalKind::ALL, form.kind, forward),
            // Without a selected key "all keys" is the only scope there is.
            GrantField::Scope if form.key.is_some() => form.one_key = !form.one_key,
            GrantField::Scope | GrantField::Name => return,
        }
        form.daemon_error = None;
    };
    if form.focus == GrantField::Name
        && let Some(edit) = text_edit(&a)
    {
        if input::apply(&mut form.name, &mut form.cursor_back, edit) {
            form.name_touched = true;
            form.daemon_error = None;
        }
        return;
    }
    match a {
        Action::NextField => {
            form.focus = cycle(&GrantField::ALL, form.focus, true);
            form.cursor_back = 0;
        }
        Action::PrevField => {
            form.focus = cycle(&GrantField::ALL, form.focus, false);
            form.cursor_back = 0;
        }
        Action::Left => change(form, false),
        Action::Right => change(form, true),
        Action::Char(' ') => change(form, true),
        Action::Submit => {
            if form.submitting {
                return;
            }
            match form.spec() {
                Some(spec) => {
                    form.submitting = true;
                    form.daemon_error = None;
                    fx.push(Effect::Grant(spec));
                }
                None => form.show_all = true,
            }
        }
        Action::Back => app.popup = None,
        _ => {}
    }
}

pub(super) fn token_form_intent(app: &mut App, a: Action, fx: &mut Vec<Effect>) {
    let Some(Popup::Token(form)) = &mut app.popup else {
        return;
    };
    if let Some(edit) = text_edit(&a) {
        let mut back = form.cursor_back;
        let mut text = form.text(form.focus).to_string();
        if input::apply(&mut text, &mut back, edit) {
            // Only a change counts as touching the field (a cursor move does not).
            *form.edit(form.focus) = text;
            form.daemon_error = None;
        }
        form.cursor_back = back;
        return;
    }
    match a {
        Action::NextField => {
            form.focus = cycle(&TokenField::ALL, form.focus, true);
            form.cursor_back = 0;
        }
        Action::PrevField => {
            form.focus = cycle(&TokenField::ALL, form.focus, false);
            form.cursor_back = 0;
        }
        Action::Submit => {
            if form.submitting {
                return;
            }
            if form.is_valid() {
                form.submitting = true;
                form.daemon_error = None;
                fx.push(Effect::HsmAdd {
                    name: form.name.clone(),
                    module: form.module.clone(),
                    token: form.token.clone(),
                    pin_file: form.pin_file.clone(),
                });
            } else {
                form.show_all = true;
            }
        }
        Action::Back => app.popup = None,
        _ => {}
    }
}

/// The yes/no of a revoke or a token removal. Like the key confirmations, the question
/// closes at once and the answer lands on the message line.
pub(super) fn ask_intent(app: &mut App, a: Action, fx: &mut Vec<Effect>) {
    let Some(Popup::Ask(q)) = &app.popup else {
        return;
    };
    match a {
        Action::Yes => {
            fx.push(match q {
                Ask::Revoke(g) => Effect::Revoke(revoke_spec(g)),
                Ask::RemoveToken(t) => Effect::HsmRemove(t.name.clone()),
            });
            app.popup = None;
            app.clear_message_if(s::CONFIRM_NEEDS_Y);
        }
        // Revoking and removing take something away: enter is not yes.
        Action::Submit => app.info(s::CONFIRM_NEEDS_Y),
        Action::No => {
            app.popup = None;
            app.clear_message_if(s::CONFIRM_NEEDS_Y);
        }
        _ => {}
    }
}

pub(super) fn on_grants(app: &mut App, result: Result<Vec<GrantInfo>, String>) {
    let rows = layout::grants_rows(app.size, app.message_rows());
    let Screen::Grants(g) = &mut app.screen else {
        return;
    };
    match result {
        Ok(grants) => {
            // The selection stays on the same grant across reloads (another manager's
            // change must not move it under the user's cursor).
            let keep = g.selected_grant().map(|x| x.id);
            g.selected = keep
                .and_then(|id| grants.iter().position(|x| x.id == id))
                .unwrap_or(g.selected)
                .min(grants.len().saturating_sub(1));
            g.offset = scroll_offset(g.offset, g.selected, rows, grants.len());
            g.grants = Some(grants);
            g.error = None;
        }
        Err(e) => g.error = Some(e),
    }
}

pub(super) fn on_granted(app: &mut App, result: Result<GrantInfo, String>, fx: &mut Vec<Effect>) {
    match result {
        Ok(g) => {
            if matches!(app.popup, Some(Popup::Grant(_))) {
                app.popup = None;
            }
            app.success(s::granted(&g));
            reload_grants(app, fx);
        }
        Err(e) => match &mut app.popup {
            Some(Popup::Grant(form)) => {
                form.submitting = false;
                form.daemon_error = Some(e);
            }
            _ => app.error(s::grant_failed(&e)),
        },
    }
}

pub(super) fn on_revoked(
    app: &mut App,
    spec: &GrantSpec,
    result: Result<GrantInfo, String>,
    fx: &mut Vec<Effect>,
) {
    match result {
        Ok(g) => {
            app.success(s::revoked(&g));
            reload_grants(app, fx);
        }
        Err(e) => {
            let key = spec
                .key
                .as_deref()
                .and_then(|t| app.key_by_tag(t))
                .map(|k| k.name.clone());
            let what = s::grant_spec_label(spec, key.as_deref());
            app.error(s::revoke_failed(&what, &e));
        }
    }
}

/// The grants changed (here or elsewhere): re-read them if they are on screen.
pub(super) fn reload_grants(app: &App, fx: &mut Vec<Effect>) {
    if matches!(app.screen, Screen::Grants(_)) {
        fx.push(Effect::LoadGrants);
    }
}

pub(super) fn on_tokens(app: &mut App, result: Result<Vec<HsmTokenInfo>, String>) {
    let keep = selected_token(app).map(|t| t.name.clone());
    match result {
        Ok(list) => {
            app.hsm_tokens.list = Some(list);
            app.hsm_tokens.error = None;
        }
        Err(e) => app.hsm_tokens.error = Some(e),
    }
    let choices = app.hsm_tokens.choices();
    if let Some(Popup::Create(form)) = &mut app.popup {
        form.set_tokens(choices);
    }
    let rows = layout::tokens_rows(app.size, app.message_rows());
    let list = app.hsm_tokens.list.as_deref().unwrap_or_default();
    if let Screen::Tokens(t) = &mut app.screen {
        t.selected = keep
            .and_then(|name| list.iter().position(|x| x.name == name))
            .unwrap_or(t.selected)
            .min(list.len().saturating_sub(1));
        t.offset = scroll_offset(t.offset, t.selected, rows, list.len());
    }
}

fn selected_token(app: &App) -> Option<&HsmTokenInfo> {
    let Screen::Tokens(t) = &app.screen else {
        return None;
    };
    app.hsm_tokens.list.as_ref().and_then(|l| l.get(t.selected))
}

pub(super) fn on_token_added(
    app: &mut App,
    result: Result<HsmTokenInfo, String>,
    fx: &mut Vec<Effect>,
) {
    match result {
        Ok(t) => {
            if matches!(app.popup, Some(Popup::Token(_))) {
                app.popup = None;
            }
            app.success(s::token_added(&t));
            // The list is kept even off screen: the create form offers it.
            load_tokens(app, fx);
        }
        Err(e) => match &mut app.popup {
            Some(Popup::Token(form)) => {
                form.submitting = false;
                form.daemon_error = Some(e);
            }
            _ => app.error(s::token_add_failed(&e)),
        },
    }
}

pub(super) fn on_token_removed(
    app: &mut App,
    name: &str,
    result: Result<HsmTokenInfo, String>,
    fx: &mut Vec<Effect>,
) {
    match result {
        Ok(t) => {
            app.success(s::token_removed(&t));
            load_tokens(app, fx);
        }
        Err(e) => app.error(s::token_remove_failed(name, &e)),
    }
}

/// Keeps the scroll windows of these views valid after a resize (or a message that
/// changed the height of the message area).
pub(super) fn on_resize(app: &mut App) {
    let len = app.hsm_tokens.len();
    let (size, message_rows) = (app.size, app.message_rows());
    match &mut app.screen {
        Screen::Grants(g) => {
            let rows = layout::grants_rows(size, message_rows);
            g.offset = scroll_offset(g.offset, g.selected, rows, g.len());
        }
        Screen::Tokens(t) => {
            let rows = layout::tokens_rows(size, message_rows);
            t.offset = scroll_offset(t.offset, t.selected, rows, len);
        }
        _ => {}
    }
}
