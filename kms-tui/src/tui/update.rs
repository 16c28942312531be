//! The one place state changes: `update(state, action) -> effects`. No I/O happens here:
//! requests to the daemon and desktop notifications come out as [`Effect`]s for the
//! event loop to carry out, and their results come back in as [`Action`]s.

use kms_shared::model::{KeyInfo, KeyState};
use kms_shared::protocol::{Event, EventKind};

use super::action::{Action, Effect, Op};
use super::app::{
    App, Base, Confirm, ConfirmKind, CreateForm, Field, FullMessage, HISTORY_PAGE,
    HISTORY_PREFETCH, HistoryView, ImpactState, Logged, MAX_INPUT, MsgKind, PROTECTIONS, Popup,
    Prompt, PromptKind, Screen, TokenChoices, VersionsView, scroll_offset,
};
use super::input::{self, Edit};
use super::keymap::{self, Mode};
use super::strings as s;
use super::ui::help as ui_help;
use super::ui::layout;
use super::ui::message as ui_message;
use kms_shared::model::KeyType;

/// Up to this many keys, the periodic refresh re-reads the whole list.
const TICK_RELOAD_MAX: usize = 2_000;

/// Applies one action; returns what the outside world must do.
pub fn update(app: &mut App, action: Action) -> Vec<Effect> {
    let mut fx = Vec::new();
    let message_rows = app.message_rows();
    step(app, action, &mut fx);
    one_change_at_a_time(app, &mut fx);
    // A message that takes more (or fewer) rows than the last one changes the size of
    // every list, as a resize does.
    if app.message_rows() != message_rows {
        relayout(app);
    }
    fx
}

/// Holds back a change of a key while one sent before is not answered: with a slow or
/// stopped daemon the first press seemed to do nothing, and a second one (a rotation
/// asked for again) was carried out as well once kmsd answered. The change sent says so
/// on the message line until its answer replaces it.
fn one_change_at_a_time(app: &mut App, fx: &mut Vec<Effect>) {
    let mut kept = Vec::with_capacity(fx.len());
    for eff in fx.drain(..) {
        let (tag, name) = match &eff {
            Effect::Op { tag, name, .. } | Effect::SetVersionEnabled { tag, name, .. } => {
                (tag.clone(), name.clone())
            }
            _ => {
                kept.push(eff);
                continue;
            }
        };
        if app.changes_waiting.insert(tag) {
            app.info(s::change_sent(&name));
            kept.push(eff);
        } else {
            app.error(s::change_still_waiting(&name));
        }
    }
    *fx = kept;
}

/// Keeps every scroll window valid after the lists' heights changed.
fn relayout(app: &mut App) {
    app.clamp_selection();
    let rows = layout::history_rows(app.size, app.message_rows());
    if let Screen::History(hv) = &mut app.screen {
        hv.offset = scroll_offset(hv.offset, hv.selected, rows, hv.entries.len());
    }
    admin::on_resize(app);
    events::on_resize(app);
}

fn step(app: &mut App, action: Action, fx: &mut Vec<Effect>) {
    match action {
        Action::Key(key) => {
            if let Some(a) = keymap::map(app.mode(), key) {
                step(app, a, fx);
            }
        }
        Action::Resize(w, h) => {
            app.size = (w, h);
            relayout(app);
        }
        // Into the text field being edited, as if typed, but without the line breaks, tabs
        // and other control characters: a paste never submits a form or answers a
        // question. Anywhere else (a list, a yes/no question, a form's choice, where a
        // space would change the choice) it is no command at all.
        Action::Paste(text) => {
            if app.editing_text() {
                let pasted: Vec<char> = text.chars().filter(|c| !c.is_control()).collect();
                for &c in pasted.iter().take(MAX_INPUT) {
                    step(app, Action::Char(c), fx);
                }
                // A field takes at most MAX_INPUT characters: said, not cut silently.
                if pasted.len() > MAX_INPUT {
                    app.error(s::paste_cut(pasted.len(), MAX_INPUT));
                }
            }
        }
        // Usage counts change without events. A small list is simply re-read; of a large
        // one, the keys on screen (the selected one first: the details show it).
        Action::Tick if app.is_connected() && app.popup.is_none() => {
            if app.keys.len() <= TICK_RELOAD_MAX {
                fx.push(Effect::LoadKeys);
            } else if matches!(app.screen, Screen::Main | Screen::Details) {
                let selected = app.selected_key().map(|k| k.tag.clone());
                let on_screen = app
                    .visible
                    .iter()
                    .skip(app.offset)
                    .take(app.list_rows())
                    .filter_map(|&i| app.keys.get(i))
                    .filter(|k| Some(&k.tag) != selected.as_ref())
                    .map(|k| k.tag.clone())
                    .collect::<Vec<_>>();
                fx.extend(selected.into_iter().chain(on_screen).map(Effect::GetKey));
            }
            // So do a version's encryption count and the history's newest entries.
            match &mut app.screen {
                Screen::Versions(v) if !v.refreshing => {
                    v.refreshing = true;
                    fx.push(Effect::LoadVersions(v.tag.clone()));
                }
                Screen::History(h) => refresh_history(h, fx),
                // A token's key count drops when a purged key's objects are destroyed,
                // after the purge's event; a token registered by another client raises
                // none. (A read already waiting is not asked for twice.)
                Screen::Tokens(_) => fx.push(Effect::LoadHsmTokens),
                _ => {}
            }
        }
        Action::Tick => {}
        Action::Quit => app.should_quit = true,
        Action::FullMessage if app.popup.is_none() => {
            if let Some(message) = app.message.clone() {
                app.popup = Some(Popup::Message(FullMessage { message, scroll: 0 }));
            }
        }

        Action::Connected {
            daemon_version,
            data_dir,
            at,
        } => {
            match (&app.data_dir, &data_dir) {
                (Some(was), Some(now)) if was != now => {
                    let message = s::another_store_message(&daemon_version, now, was);
                    let data_dir = now.clone();
                    events::log(app, Logged::OtherStore { data_dir, at });
                    app.error(message);
                }
                _ if app.was_connected => {
                    events::log(app, Logged::Reconnected { at });
                    app.info(s::reconnected_message(&daemon_version));
                }
                _ => app.info(s::connected_message(&daemon_version)),
            }
            if data_dir.is_some() {
                app.data_dir = data_dir;
            }
            // A form refused for want of a connection may be sent now.
            let offline = |e: &mut Option<String>| {
                if e.as_deref() == Some(s::NOT_CONNECTED) {
                    *e = None;
                }
            };
            match &mut app.popup {
                Some(Popup::Create(f)) => offline(&mut f.daemon_error),
                Some(Popup::Grant(f)) => offline(&mut f.daemon_error),
                Some(Popup::Token(f)) => offline(&mut f.daemon_error),
                _ => {}
            }
            app.conn = super::app::Conn::Connected { daemon_version };
            app.was_connected = true;
            fx.push(Effect::LoadKeys);
            reload_view(app, fx);
        }
        Action::Disconnected { reason, next } => {
            app.error(s::disconnected_message(&reason, next));
            app.conn = super::app::Conn::Disconnected { reason };
        }
        Action::StartingDaemon => app.info(s::STARTING_DAEMON),
        Action::KeysLoaded(Ok(keys)) => app.set_keys(keys),
        Action::KeysLoaded(Err(e)) => app.error(s::load_failed(s::WHAT_KEYS, &e)),
        Action::KeyFetched { tag, result } => match result {
            Ok(Some(k)) => app.upsert_key(k),
            Ok(None) => app.remove_key(&tag),
            // A refresh that failed changes nothing; the next event or reconnect retries.
            Err(_) => {}
        },
        Action::DaemonEvent(e) => on_event(app, e, fx),
        Action::Lagged { missed, at } => {
            events::log(app, Logged::Missed { missed, at });
            app.info(s::lagged(missed));
            fx.push(Effect::LoadKeys);
            reload_view(app, fx);
        }
        Action::Created(result) => on_created(app, result),
        Action::OpDone {
            op,
            tag,
            name,
            result,
        } => match result {
            Ok(k) => {
                app.changes_waiting.remove(&tag);
                app.success(s::op_done(&op, &k));
                app.upsert_key(k);
            }
            Err(e) => {
                app.changes_waiting.remove(&tag);
                app.error(s::op_failed(&op, &name, &e));
            }
        },
        Action::VersionsLoaded { tag, result } => {
            if let Screen::Versions(v) = &mut app.screen
                && v.tag == tag
            {
                v.refreshing = false;
                set_versions(v, result);
            }
        }
        Action::VersionToggled {
            tag,
            name,
            version,
            enabled,
            result,
        } => {
            app.changes_waiting.remove(&tag);
            match result {
                Ok(versions) => {
                    app.success(s::version_toggled(&name, version, enabled));
                    if let Screen::Versions(v) = &mut app.screen
                        && v.tag == tag
                    {
                        set_versions(v, Ok(versions));
                    }
                }
                Err(e) => app.error(s::version_toggle_failed(&name, version, &e)),
            }
        }
        Action::HistoryLoaded {
            tag,
            before_seq,
            result,
        } => on_history(app, &tag, before_seq, result, fx),
        Action::ImpactLoaded { tag, result } => {
            if let Some(Popup::Confirm(c)) = &mut app.popup
                && c.key.tag == tag
            {
                c.impact = match result {
                    Ok(i) => ImpactState::Loaded(i),
                    Err(e) => ImpactState::Failed(e),
                };
            }
        }
        Action::GrantsLoaded(result) => admin::on_grants(app, result),
        Action::Granted(result) => admin::on_granted(app, result, fx),
        Action::Revoked { spec, result } => admin::on_revoked(app, &spec, result, fx),
        Action::HsmTokensLoaded(result) => admin::on_tokens(app, result),
        Action::HsmAdded(result) => admin::on_token_added(app, result, fx),
        Action::HsmRemoved { name, result } => admin::on_token_removed(app, &name, result, fx),

        intent => match app.mode() {
            Mode::Main | Mode::Details => list_intent(app, intent, fx),
            Mode::Versions => versions_intent(app, intent, fx),
            Mode::History => history_intent(app, intent, fx),
            Mode::Grants => admin::grants_intent(app, intent),
            Mode::Tokens => admin::tokens_intent(app, intent),
            Mode::Events => events::intent(app, intent),
            Mode::Filter => filter_intent(app, intent),
            Mode::Help => help_intent(app, intent),
            Mode::Message => message_intent(app, intent),
            Mode::Form => form_intent(app, intent, fx),
            Mode::GrantForm => admin::grant_form_intent(app, intent, fx),
            Mode::TokenForm => admin::token_form_intent(app, intent, fx),
            Mode::Confirm if matches!(app.popup, Some(Popup::Ask(_))) => {
                admin::ask_intent(app, intent, fx)
            }
            Mode::Confirm => confirm_intent(app, intent, fx),
            Mode::Prompt => prompt_intent(app, intent, fx),
        },
    }
}

fn list_intent(app: &mut App, a: Action, fx: &mut Vec<Effect>) {
    let page = app.list_rows().max(1) as isize;
    match a {
        Action::Up => app.move_selection(-1),
        Action::Down => app.move_selection(1),
        Action::PageUp => app.move_selection(-page),
        Action::PageDown => app.move_selection(page),
        Action::Top => app.move_selection(isize::MIN / 2),
        Action::Bottom => app.move_selection(isize::MAX / 2),
        Action::Open => match app.screen {
            Screen::Main if app.selected_key().is_some() => {
                app.details_from_events = None;
                app.screen = Screen::Details;
            }
            Screen::Details => open_versions(app, Base::Details, fx),
            _ => {}
        },
        Action::Back => match app.screen {
            Screen::Details => match app.details_from_events.take() {
                Some(view) => events::reopen(app, view),
                None => app.screen = Screen::Main,
            },
            _ if !app.filter.is_empty() => clear_filter(app),
            // Nothing left to go back from: esc dismisses the message, giving a long
            // one's rows back to the list.
            _ => app.message = None,
        },
        Action::StartFilter => {
            app.filter_editing = true;
            app.filter_back = 0;
        }
        Action::Help => app.popup = Some(Popup::Help { scroll: 0 }),
        Action::Create => open_create(app, fx),
        Action::Versions => {
            let back = base_of(&app.screen);
            open_versions(app, back, fx);
        }
        Action::History => {
            let back = base_of(&app.screen);
            open_history(app, back, fx);
        }
        Action::Permissions => {
            let back = base_of(&app.screen);
            admin::open_grants(app, back, fx);
        }
        Action::Tokens => {
            let back = base_of(&app.screen);
            admin::open_tokens(app, back, fx);
        }
        Action::Events => {
            let back = base_of(&app.screen);
            events::open(app, back);
        }
        other => key_action(app, other, fx),
    }
}

/// The create form starts with the tokens already known and asks for them afresh: the
/// token field must offer what is registered now.
fn open_create(app: &mut App, fx: &mut Vec<Effect>) {
    let mut form = CreateForm::default();
    admin::load_tokens(app, fx);
    form.set_tokens(app.hsm_tokens.choices());
    app.popup = Some(Popup::Create(form));
}

fn base_of(screen: &Screen) -> Base {
    match screen {
        Screen::Details => Base::Details,
        Screen::Versions(v) => v.back,
        Screen::History(h) => h.back,
        Screen::Grants(g) => g.back,
        Screen::Tokens(t) => t.back,
        Screen::Events(e) => e.back,
        Screen::Main => Base::Main,
    }
}

pub(super) fn back_to(app: &mut App, base: Base) {
    app.screen = match base {
        Base::Main => Screen::Main,
        Base::Details => Screen::Details,
    };
}

/// Lifecycle actions on the target key, checked against the state table of SPEC §3
/// first so the user learns at once why something cannot be done.
fn key_action(app: &mut App, a: Action, fx: &mut Vec<Effect>) {
    let Some(k) = app.target_key().cloned() else {
        if is_key_action(&a) {
            no_target(app);
        }
        return;
    };
    let refuse = |app: &mut App, what: &str, k: &KeyInfo| {
        app.error(s::not_allowed(what, &k.name, k.state));
    };
    match a {
        Action::Rotate => {
            if k.state != KeyState::Enabled {
                refuse(app, s::WHAT_ROTATE, &k);
            } else if k.current_version >= k.protection.max_versions() {
                app.error(s::at_version_limit(&k));
            } else {
                open_confirm(app, ConfirmKind::Rotate, k, fx);
            }
        }
        Action::Disable => {
            if k.state == KeyState::Enabled {
                open_confirm(app, ConfirmKind::Disable, k, fx);
            } else {
                refuse(app, s::WHAT_DISABLE, &k);
            }
        }
        Action::Enable => {
            if k.state == KeyState::Disabled {
                fx.push(op(Op::Enable, &k));
            } else {
                refuse(app, s::WHAT_ENABLE, &k);
            }
        }
        Action::RequestDeletion => {
            if matches!(k.state, KeyState::Enabled | KeyState::Disabled) {
                open_confirm(app, ConfirmKind::RequestDeletion, k, fx);
            } else {
                refuse(app, s::WHAT_DELETE, &k);
            }
        }
        Action::CancelDeletion => {
            if k.state == KeyState::PendingDeletion {
                fx.push(op(Op::CancelDeletion, &k));
            } else {
                refuse(app, s::WHAT_UNDELETE, &k);
            }
        }
        Action::DeleteNow => {
            if k.state == KeyState::PendingDeletion {
                open_confirm(app, ConfirmKind::DeleteNow, k, fx);
            } else {
                refuse(app, s::WHAT_DELETE_NOW, &k);
            }
        }
        // The daemon changes rotation settings only of a key that is enabled or disabled.
        Action::ToggleAutoRotation | Action::EditPeriod if !settings_allowed(k.state) => {
            refuse(app, s::WHAT_ROTATION_SETTINGS, &k);
        }
        Action::ToggleAutoRotation => {
            let on = !k.auto_rotation;
            open_confirm(app, ConfirmKind::AutoRotation(on), k, fx);
        }
        Action::EditPeriod => {
            app.popup = Some(Popup::Prompt(Prompt {
                kind: PromptKind::Period,
                text: k.rotation_days.to_string(),
                cursor_back: 0,
                key: k,
            }));
        }
        Action::EditMemo => {
            app.popup = Some(Popup::Prompt(Prompt {
                kind: PromptKind::Memo,
                text: k.memo.clone(),
                cursor_back: 0,
                key: k,
            }));
        }
        _ => {}
    }
}

/// The states in which the daemon changes a key's rotation settings or one version's
/// flag (`set_rotation`, `enable_version`, `disable_version`).
fn settings_allowed(state: KeyState) -> bool {
    matches!(state, KeyState::Enabled | KeyState::Disabled)
}

fn is_key_action(a: &Action) -> bool {
    matches!(
        a,
        Action::Rotate
            | Action::Disable
            | Action::Enable
            | Action::RequestDeletion
            | Action::CancelDeletion
            | Action::DeleteNow
            | Action::ToggleAutoRotation
            | Action::EditPeriod
            | Action::EditMemo
            | Action::Versions
            | Action::History
    )
}

fn op(op: Op, k: &KeyInfo) -> Effect {
    Effect::Op {
        op,
        tag: k.tag.clone(),
        name: k.name.clone(),
    }
}

fn open_confirm(app: &mut App, kind: ConfirmKind, key: KeyInfo, fx: &mut Vec<Effect>) {
    let impact = if kind.needs_impact() {
        fx.push(Effect::LoadImpact(key.tag.clone()));
        ImpactState::Loading
    } else {
        ImpactState::NotNeeded
    };
    app.popup = Some(Popup::Confirm(Confirm {
        kind,
        key,
        impact,
        typed: String::new(),
        cursor_back: 0,
        mismatch: false,
    }));
}

/// Says why a key action has no key: none is selected, or the open view's key is gone
/// from the list (purged, or no longer shown to this account).
fn no_target(app: &mut App) {
    let gone = match &app.screen {
        Screen::History(h) => Some(h.name.clone()),
        Screen::Versions(v) => Some(v.name.clone()),
        _ => None,
    };
    match gone {
        Some(name) => app.error(s::event_key_gone(&name)),
        None => app.error(s::NO_KEY_SELECTED),
    }
}

fn open_versions(app: &mut App, back: Base, fx: &mut Vec<Effect>) {
    let Some(k) = app.target_key() else {
        no_target(app);
        return;
    };
    let (tag, name) = (k.tag.clone(), k.name.clone());
    fx.push(Effect::LoadVersions(tag.clone()));
    app.screen = Screen::Versions(VersionsView {
        tag,
        name,
        back,
        versions: None,
        selected: 0,
        error: None,
        // The first load, just asked for.
        refreshing: true,
    });
}

fn open_history(app: &mut App, back: Base, fx: &mut Vec<Effect>) {
    let Some(k) = app.target_key() else {
        no_target(app);
        return;
    };
    let (tag, name) = (k.tag.clone(), k.name.clone());
    fx.push(Effect::LoadHistory {
        tag: tag.clone(),
        before_seq: None,
    });
    app.screen = Screen::History(HistoryView {
        tag,
        name,
        back,
        entries: Vec::new(),
        loading: true,
        exhausted: false,
        selected: 0,
        offset: 0,
        error: None,
        refresh_due: false,
    });
}

/// After a reconnect the open sub-view may be stale: fetch it again.
fn reload_view(app: &mut App, fx: &mut Vec<Effect>) {
    match &mut app.screen {
        Screen::Versions(v) => fx.push(Effect::LoadVersions(v.tag.clone())),
        Screen::History(h) => {
            h.entries.clear();
            h.selected = 0;
            h.offset = 0;
            h.exhausted = false;
            h.loading = true;
            h.refresh_due = false;
            h.error = None;
            fx.push(Effect::LoadHistory {
                tag: h.tag.clone(),
                before_seq: None,
            });
        }
        Screen::Grants(g) => {
            g.error = None;
            fx.push(Effect::LoadGrants);
        }
        Screen::Tokens(_) => admin::load_tokens(app, fx),
        // The log is this dashboard's own: nothing to read.
        Screen::Main | Screen::Details | Screen::Events(_) => {}
    }
    if matches!(app.popup, Some(Popup::Create(_))) {
        admin::load_tokens(app, fx);
    }
}

fn set_versions(v: &mut VersionsView, result: Result<Vec<kms_shared::model::VersionInfo>, String>) {
    match result {
        Ok(mut versions) => {
            // Newest (current) first, as the console lists them.
            versions.sort_by_key(|v| std::cmp::Reverse(v.version));
            // The selection stays on its version, not its row: a rotation adds a row on
            // top, and space on the row the cursor was on would toggle another version
            // (enabling one takes no confirmation).
            let was = v
                .versions
                .as_ref()
                .and_then(|old| old.get(v.selected))
                .map(|old| old.version);
            if let Some(at) = was.and_then(|n| versions.iter().position(|x| x.version == n)) {
                v.selected = at;
            } else if v.selected >= versions.len() {
                v.selected = versions.len().saturating_sub(1);
            }
            v.versions = Some(versions);
            v.error = None;
        }
        Err(e) => v.error = Some(e),
    }
}

fn versions_intent(app: &mut App, a: Action, fx: &mut Vec<Effect>) {
    let page = layout::versions_rows(app.size, app.message_rows()).max(1) as isize;
    let Screen::Versions(v) = &mut app.screen else {
        return;
    };
    let len = v.versions.as_ref().map_or(0, Vec::len);
    let moved = |sel: usize, d: isize| -> usize {
        if len == 0 {
            0
        } else {
            (sel as isize + d).clamp(0, len as isize - 1) as usize
        }
    };
    match a {
        Action::Up => v.selected = moved(v.selected, -1),
        Action::Down => v.selected = moved(v.selected, 1),
        Action::PageUp => v.selected = moved(v.selected, -page),
        Action::PageDown => v.selected = moved(v.selected, page),
        Action::Top => v.selected = 0,
        Action::Bottom => v.selected = len.saturating_sub(1),
        Action::Open => app.info(s::VERSIONS_ENTER),
        Action::ToggleVersion => {
            let Some(ver) = v.versions.as_ref().and_then(|vs| vs.get(v.selected)) else {
                return;
            };
            let (version, enabled, tag) = (ver.version, ver.enabled, v.tag.clone());
            // Refused here as the daemon would refuse it, before any question is asked.
            if let Some(k) = app.key_by_tag(&tag)
                && !settings_allowed(k.state)
            {
                let what = if enabled {
                    s::WHAT_DISABLE_VERSION
                } else {
                    s::WHAT_ENABLE_VERSION
                };
                let msg = s::not_allowed(what, &k.name, k.state);
                app.error(msg);
                return;
            }
            let Screen::Versions(v) = &app.screen else {
                return;
            };
            if !enabled {
                // Enabling breaks nothing: at once.
                fx.push(Effect::SetVersionEnabled {
                    tag,
                    name: v.name.clone(),
                    version,
                    enabled: true,
                });
                return;
            }
            // Disabling refuses everything that needs this version (all encryption and
            // signing when it is the current one): ask first, showing who uses the key.
            match app.key_by_tag(&tag).cloned() {
                Some(k) => {
                    let current = k.current_version == version;
                    open_confirm(app, ConfirmKind::DisableVersion { version, current }, k, fx);
                }
                None => no_target(app),
            }
        }
        Action::Back => {
            let back = v.back;
            back_to(app, back);
        }
        Action::History => {
            let back = v.back;
            open_history(app, back, fx);
        }
        Action::Help => app.popup = Some(Popup::Help { scroll: 0 }),
        Action::Rotate => key_action(app, a, fx),
        _ => {}
    }
}

fn history_intent(app: &mut App, a: Action, fx: &mut Vec<Effect>) {
    let rows = layout::history_rows(app.size, app.message_rows());
    let page = rows.max(1) as isize;
    let Screen::History(h) = &mut app.screen else {
        return;
    };
    let len = h.entries.len();
    let moved = |sel: usize, d: isize| -> usize {
        if len == 0 {
            0
        } else {
            (sel as isize + d).clamp(0, len as isize - 1) as usize
        }
    };
    match a {
        Action::Up => h.selected = moved(h.selected, -1),
        Action::Down => h.selected = moved(h.selected, 1),
        Action::PageUp => h.selected = moved(h.selected, -page),
        Action::PageDown => h.selected = moved(h.selected, page),
        Action::Top => h.selected = 0,
        Action::Bottom => h.selected = len.saturating_sub(1),
        Action::Back => {
            let back = h.back;
            back_to(app, back);
            return;
        }
        Action::Versions => {
            let back = h.back;
            open_versions(app, back, fx);
            return;
        }
        Action::Help => {
            app.popup = Some(Popup::Help { scroll: 0 });
            return;
        }
        _ => return,
    }
    h.offset = scroll_offset(h.offset, h.selected, rows, len);
    fetch_more_history(h, fx);
}

/// Asks for the next (older) page once the selection nears the end of what is loaded.
fn fetch_more_history(h: &mut HistoryView, fx: &mut Vec<Effect>) {
    if h.loading || h.exhausted || h.error.is_some() {
        return;
    }
    let Some(last) = h.entries.last() else {
        return;
    };
    if h.selected + HISTORY_PREFETCH >= h.entries.len() {
        h.loading = true;
        fx.push(Effect::LoadHistory {
            tag: h.tag.clone(),
            before_seq: Some(last.seq),
        });
    }
}

fn on_history(
    app: &mut App,
    tag: &str,
    before_seq: Option<u64>,
    result: Result<Vec<kms_shared::model::HistoryEntry>, String>,
    fx: &mut Vec<Effect>,
) {
    let rows = layout::history_rows(app.size, app.message_rows());
    let Screen::History(h) = &mut app.screen else {
        return;
    };
    if h.tag != tag {
        return;
    }
    // A page is only appended where it continues what is loaded; anything else is the
    // answer to a request that a reload has since replaced.
    let continues = match before_seq {
        None => true,
        Some(seq) => h.entries.last().map(|e| e.seq) == Some(seq),
    };
    if !continues {
        return;
    }
    h.loading = false;
    apply_history_page(h, before_seq, result, rows, fx);
    // Events that came while a page was loading: the newest page again, now.
    if h.refresh_due && !h.loading {
        h.refresh_due = false;
        h.loading = true;
        fx.push(Effect::LoadHistory {
            tag: h.tag.clone(),
            before_seq: None,
        });
    }
}

fn apply_history_page(
    h: &mut HistoryView,
    before_seq: Option<u64>,
    result: Result<Vec<kms_shared::model::HistoryEntry>, String>,
    rows: usize,
    fx: &mut Vec<Effect>,
) {
    match result {
        Ok(entries) => {
            let full_page = entries.len() >= HISTORY_PAGE as usize;
            let newest_shown = h.entries.first().map(|e| e.seq);
            if let Some(top) = newest_shown
                && before_seq.is_none()
                && entries.iter().any(|e| e.seq == top)
            {
                // A refresh after an event: the entries newer than those shown go on
                // top, and the selected entry stays selected (unless it was the newest,
                // which the newest now is).
                let newer: Vec<_> = entries.into_iter().take_while(|e| e.seq > top).collect();
                if h.selected > 0 {
                    h.selected += newer.len();
                    h.offset += newer.len();
                }
                h.entries.splice(0..0, newer);
                h.offset = scroll_offset(h.offset, h.selected, rows, h.entries.len());
                h.error = None;
                return;
            }
            h.exhausted = !full_page;
            if before_seq.is_none() {
                h.entries = entries;
                h.selected = 0;
                h.offset = 0;
            } else {
                h.entries.extend(entries);
            }
            h.error = None;
            h.offset = scroll_offset(h.offset, h.selected, rows, h.entries.len());
            fetch_more_history(h, fx);
        }
        Err(e) => h.error = Some(e),
    }
}

/// Scrolling the help (on a screen too small for it), and closing it.
fn help_intent(app: &mut App, a: Action) {
    let size = ratatui::layout::Rect::new(0, 0, app.size.0, app.size.1);
    let (last, page) = (ui_help::max_scroll(size), ui_help::page(size));
    let Some(Popup::Help { scroll }) = &mut app.popup else {
        return;
    };
    *scroll = match a {
        Action::Up => scroll.saturating_sub(1),
        Action::Down => scroll.saturating_add(1),
        Action::PageUp => scroll.saturating_sub(page),
        Action::PageDown => scroll.saturating_add(page),
        Action::Top => 0,
        Action::Bottom => last,
        Action::Back | Action::Help => {
            app.popup = None;
            return;
        }
        _ => return,
    }
    .min(last);
}

/// Scrolling the full-message pop-up, and closing it.
fn message_intent(app: &mut App, a: Action) {
    let size = app.size;
    let Some(Popup::Message(m)) = &mut app.popup else {
        return;
    };
    let text = &m.message.text;
    let last = ui_message::max_scroll(text, size);
    let page = ui_message::popup_page(text, size);
    m.scroll = match a {
        Action::Up => m.scroll.saturating_sub(1),
        Action::Down => m.scroll.saturating_add(1),
        Action::PageUp => m.scroll.saturating_sub(page),
        Action::PageDown => m.scroll.saturating_add(page),
        Action::Top => 0,
        Action::Bottom => last,
        Action::Back => {
            app.popup = None;
            return;
        }
        _ => return,
    }
    .min(last);
}

fn filter_intent(app: &mut App, a: Action) {
    let keep = app.selected_key().map(|k| k.tag.clone());
    if let Some(edit) = text_edit(&a) {
        // The same editing as a form's text field (the help says so for every one).
        if crate::tui::input::apply(&mut app.filter, &mut app.filter_back, edit) {
            app.refilter_typed(keep.as_deref());
        }
        return;
    }
    match a {
        Action::Submit => app.filter_editing = false,
        Action::Back => clear_filter(app),
        Action::Up => app.move_selection(-1),
        Action::Down => app.move_selection(1),
        _ => {}
    }
}

/// The edit an action means in a text field, if any.
pub(super) fn text_edit(a: &Action) -> Option<Edit> {
    Some(match a {
        Action::Char(c) => Edit::Insert(*c),
        Action::Backspace => Edit::Backspace,
        Action::DeleteForward => Edit::Delete,
        Action::Left => Edit::Left,
        Action::Right => Edit::Right,
        Action::LineStart => Edit::Home,
        Action::LineEnd => Edit::End,
        Action::ClearToStart => Edit::ClearToStart,
        _ => return None,
    })
}

fn clear_filter(app: &mut App) {
    let keep = app.selected_key().map(|k| k.tag.clone());
    app.filter.clear();
    app.filter_back = 0;
    app.filter_editing = false;
    app.refilter(keep.as_deref());
}

pub(super) fn cycle<T: Copy + PartialEq>(all: &[T], cur: T, forward: bool) -> T {
    let n = all.len();
    let i = all.iter().position(|x| *x == cur).unwrap_or(0);
    all[if forward {
        (i + 1) % n
    } else {
        (i + n - 1) % n
    }]
}

fn form_intent(app: &mut App, a: Action, fx: &mut Vec<Effect>) {
    let Some(Popup::Create(form)) = &mut app.popup else {
        return;
    };
    let taken = |name: &str, keys: &[Box<KeyInfo>]| {
        keys.binary_search_by(|k| k.name.as_str().cmp(name)).is_ok()
    };
    let change = |form: &mut CreateForm, forward: bool| {
        match form.focus {
            Field::Type => form.key_type = cycle(&KeyType::ALL, form.key_type, forward),
            Field::Protection => {
                form.protection = cycle(&PROTECTIONS, form.protection, forward);
                // The token's rule depends on the protection: choosing dedicated-hsm
                // with no token registered says so at once.
                form.touch(Field::Token);
            }
            Field::Token => match &form.tokens {
                TokenChoices::Loaded(names) if !names.is_empty() => {
                    form.token = cycle_name(names, form.token.as_deref(), forward);
                }
                _ => return,
            },
            Field::Convergent => form.convergent = !form.convergent,
            Field::AutoRotation => form.auto_rotation = !form.auto_rotation,
            Field::Name | Field::Days | Field::Memo => return,
        }
        let f = form.focus;
        form.touch(f);
        form.daemon_error = None;
    };
    if let Some(edit) = text_edit(&a) {
        let f = form.focus;
        let mut back = form.cursor_back;
        if let Some(text) = form.text_mut(f) {
            if input::apply(text, &mut back, edit) {
                form.touch(f);
                form.daemon_error = None;
            }
            form.cursor_back = back;
            return;
        }
    }
    match a {
        Action::NextField => form.focus_next(),
        Action::PrevField => form.focus_prev(),
        Action::Left => change(form, false),
        Action::Right => change(form, true),
        Action::Char(' ') => change(form, true),
        Action::Submit => {
            if form.submitting {
                return;
            }
            match form.spec(taken(&form.name, &app.keys)) {
                Some(spec) => {
                    form.submitting = true;
                    form.daemon_error = None;
                    fx.push(Effect::Create(spec));
                }
                None => form.show_all = true,
            }
        }
        Action::Back => app.popup = None,
        _ => {}
    }
}

/// The name after (or before) `cur` in `names`, wrapping; the first if `cur` is not there.
fn cycle_name(names: &[String], cur: Option<&str>, forward: bool) -> Option<String> {
    let n = names.len();
    let next = match cur.and_then(|c| names.iter().position(|x| x == c)) {
        Some(i) if forward => (i + 1) % n,
        Some(i) => (i + n - 1) % n,
        None => 0,
    };
    names.get(next).cloned()
}

fn on_created(app: &mut App, result: Result<KeyInfo, String>) {
    match result {
        Ok(k) => {
            if matches!(app.popup, Some(Popup::Create(_))) {
                app.popup = None;
            }
            app.success(s::created(&k));
            let tag = k.tag.clone();
            app.upsert_key(k);
            if let Some(pos) = app
                .visible
                .iter()
                .position(|&i| app.keys.get(i).is_some_and(|k| k.tag == tag))
            {
                app.selected = pos;
                app.clamp_selection();
            }
        }
        Err(e) => match &mut app.popup {
            Some(Popup::Create(form)) => {
                form.submitting = false;
                form.daemon_error = Some(e);
            }
            _ => app.error(s::daemon_refused(&e)),
        },
    }
}

fn confirm_intent(app: &mut App, a: Action, fx: &mut Vec<Effect>) {
    let Some(Popup::Confirm(c)) = &app.popup else {
        return;
    };
    match a {
        Action::Yes => {}
        Action::Submit if c.kind.enter_confirms() => {}
        Action::Submit => {
            app.info(s::CONFIRM_NEEDS_Y);
            return;
        }
        Action::No => {
            app.popup = None;
            app.clear_message_if(s::CONFIRM_NEEDS_Y);
            return;
        }
        _ => return,
    }
    // The impact is what the user is asked to weigh: no answer before it is shown.
    if c.impact == ImpactState::Loading {
        return;
    }
    let effect = match c.kind {
        ConfirmKind::Rotate => op(Op::Rotate, &c.key),
        ConfirmKind::AutoRotation(on) => op(
            Op::SetRotation {
                auto_rotation: on,
                rotation_days: None,
            },
            &c.key,
        ),
        ConfirmKind::Disable => op(Op::Disable, &c.key),
        ConfirmKind::RequestDeletion => op(Op::RequestDeletion, &c.key),
        ConfirmKind::DisableVersion { version, .. } => Effect::SetVersionEnabled {
            tag: c.key.tag.clone(),
            name: c.key.name.clone(),
            version,
            enabled: false,
        },
        ConfirmKind::DeleteNow => return,
    };
    let (tag, name) = (c.key.tag.clone(), c.key.name.clone());
    if change_must_wait(app, &tag, &name) {
        return;
    }
    fx.push(effect);
    app.popup = None;
    app.clear_message_if(s::CONFIRM_NEEDS_Y);
}

/// Whether a change of a key must wait for the answer to one sent before (see
/// [`one_change_at_a_time`]): says so, and the caller leaves its pop-up open, with what
/// was typed in it, to be sent again once the key is answered.
fn change_must_wait(app: &mut App, tag: &str, name: &str) -> bool {
    if !app.changes_waiting.contains(tag) {
        return false;
    }
    app.error(s::change_still_waiting(name));
    true
}

fn prompt_intent(app: &mut App, a: Action, fx: &mut Vec<Effect>) {
    let current_auto = |app: &App, k: &KeyInfo| {
        app.key_by_tag(&k.tag)
            .map_or(k.auto_rotation, |k| k.auto_rotation)
    };
    if let Some(edit) = text_edit(&a) {
        match &mut app.popup {
            Some(Popup::Prompt(p)) => {
                input::apply(&mut p.text, &mut p.cursor_back, edit);
            }
            Some(Popup::Confirm(c)) => {
                // A changed name is no longer the one found wrong.
                let changed = input::apply(&mut c.typed, &mut c.cursor_back, edit);
                c.mismatch &= !changed;
            }
            _ => {}
        }
        return;
    }
    match (&mut app.popup, a) {
        (Some(Popup::Prompt(p)), Action::Submit) => {
            if p.error().is_some() {
                return;
            }
            let p = p.clone();
            if change_must_wait(app, &p.key.tag, &p.key.name) {
                return;
            }
            let o = match p.kind {
                PromptKind::Period => Op::SetRotation {
                    auto_rotation: current_auto(app, &p.key),
                    rotation_days: p.text.trim().parse().ok(),
                },
                PromptKind::Memo => Op::SetMemo(p.text.clone()),
            };
            fx.push(op(o, &p.key));
            app.popup = None;
        }
        (Some(Popup::Confirm(c)), Action::Submit) => {
            if c.typed == c.key.name {
                let key = c.key.clone();
                if change_must_wait(app, &key.tag, &key.name) {
                    return;
                }
                fx.push(op(Op::DeleteNow, &key));
                app.popup = None;
            } else {
                c.mismatch = true;
            }
        }
        (_, Action::Back) => app.popup = None,
        _ => {}
    }
}

fn on_event(app: &mut App, e: Event, fx: &mut Vec<Effect>) {
    events::log_event(app, &e);
    app.set_message(MsgKind::Event, s::event_line(&e));
    if let Some(tag) = &e.key_tag {
        // A permission change reloads the whole list (below).
        if e.kind != EventKind::PermissionChanged {
            fx.push(Effect::GetKey(tag.clone()));
        }
        if let Screen::Versions(v) = &app.screen
            && &v.tag == tag
            && matches!(
                e.kind,
                EventKind::Rotated
                    | EventKind::VersionEnabled
                    | EventKind::VersionDisabled
                    | EventKind::StateChanged
            )
        {
            fx.push(Effect::LoadVersions(tag.clone()));
        }
        // Every change of a key is in its history.
        if let Screen::History(h) = &mut app.screen
            && &h.tag == tag
        {
            refresh_history(h, fx);
        }
        // A purged key's versions are gone: its view would go on listing them as they
        // were, and act on a key no longer in the list.
        if e.kind == EventKind::Purged
            && let Screen::Versions(v) = &app.screen
            && &v.tag == tag
        {
            let (name, back) = (v.name.clone(), v.back);
            back_to(app, back);
            app.set_message(MsgKind::Event, s::versions_closed_on_purge(&name));
        }
    }
    match e.kind {
        EventKind::PermissionChanged => {
            admin::reload_grants(app, fx);
            // A grant or revoke changes which keys this account sees: the list is read
            // again (which never counts as a refusal; re-reading a key whose role was
            // revoked would put a refused `show` in its history).
            fx.push(Effect::LoadKeys);
        }
        // A key created on or purged from a token changes its key count.
        EventKind::Created | EventKind::Purged if matches!(app.screen, Screen::Tokens(_)) => {
            admin::load_tokens(app, fx);
        }
        _ => {}
    }
    if notifies(e.kind) {
        fx.push(Effect::Notify {
            kind: e.kind,
            summary: s::notification_summary(&e),
            body: s::notification_body(&e),
        });
    }
}

/// Reads the newest page of the open history again, merged above what is shown
/// (`on_history`); one request at a time.
fn refresh_history(h: &mut HistoryView, fx: &mut Vec<Effect>) {
    if h.loading {
        h.refresh_due = true;
    } else {
        h.loading = true;
        fx.push(Effect::LoadHistory {
            tag: h.tag.clone(),
            before_seq: None,
        });
    }
}

/// Events worth a desktop notification: the ones that change whether a key works.
fn notifies(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::StateChanged
            | EventKind::DeletionRequested
            | EventKind::DeletionCancelled
            | EventKind::Purged
            | EventKind::Rotated
            | EventKind::VersionLimitReached
            | EventKind::NonceBudgetLow
    )
}

#[path = "update_admin.rs"]
mod admin;
#[path = "update_events.rs"]
mod events;

#[cfg(test)]
#[path = "update_tests.rs"]
mod tests;
