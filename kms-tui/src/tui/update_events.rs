//! The events view: what the dashboard logs of the events it receives, and moving in the
//! log. Part of `update`: state changes only, no I/O.

use kms_shared::protocol::Event;

use super::back_to;
use crate::tui::action::Action;
use crate::tui::app::{App, Base, EventsView, Logged, MsgKind, Popup, Screen, scroll_offset};
use crate::tui::strings as s;
use crate::tui::ui::layout;

pub(super) fn open(app: &mut App, back: Base) {
    // A new view: the one the details came from is not gone back to any more.
    app.details_from_events = None;
    app.screen = Screen::Events(EventsView {
        back,
        selected: 0,
        offset: 0,
    });
}

/// Back to `view`, the one the details were opened from.
pub(super) fn reopen(app: &mut App, view: EventsView) {
    app.screen = Screen::Events(view);
    on_resize(app);
}

/// Adds `entry` to the log. A view (open, or the one the details came from) keeps its
/// selection on the row it was on; one on the newest row stays there and so follows new
/// events, as `tail -f` does.
pub(super) fn log(app: &mut App, entry: Logged) {
    app.events.push(entry);
    let rows = layout::events_rows(app.size, app.message_rows());
    let len = app.events.len();
    if let Screen::Events(v) = &mut app.screen {
        follow(v, rows, len);
    }
    if let Some(v) = &mut app.details_from_events {
        follow(v, rows, len);
    }
}

/// Keeps `v` on its row when a new one comes in on top.
fn follow(v: &mut EventsView, rows: usize, len: usize) {
    if v.selected > 0 {
        v.selected = (v.selected + 1).min(len.saturating_sub(1));
        // Every row moves down one, and the window with them: it shows the same rows.
        v.offset = (v.offset + 1).min(v.selected);
    }
    v.offset = scroll_offset(v.offset, v.selected, rows, len);
}

pub(super) fn log_event(app: &mut App, e: &Event) {
    log(app, Logged::Event(e.clone()));
}

pub(super) fn intent(app: &mut App, a: Action) {
    let rows = layout::events_rows(app.size, app.message_rows());
    let len = app.events.len();
    let Screen::Events(v) = &mut app.screen else {
        return;
    };
    if let Some(sel) = super::admin::moved(&a, v.selected, len, rows) {
        v.selected = sel;
        v.offset = scroll_offset(v.offset, sel, rows, len);
        // The row in full, which a narrow terminal cuts.
        if let Some(entry) = app.events.newest(sel) {
            let line = row_line(entry);
            app.set_message(MsgKind::Event, line);
        }
        return;
    }
    match a {
        Action::Back => {
            let back = v.back;
            back_to(app, back);
        }
        Action::Open if !app.events.is_empty() => {
            let view = v.clone();
            go_to_key(app, view);
        }
        Action::Help => app.popup = Some(Popup::Help { scroll: 0 }),
        _ => {}
    }
}

/// Opens the details of the key of the event selected in `view`, showing it in the list
/// (the filter is cleared if it hides the key); esc from them comes back to `view`.
fn go_to_key(app: &mut App, view: EventsView) {
    let Some(Logged::Event(e)) = app.events.newest(view.selected) else {
        app.error(s::EVENT_HAS_NO_KEY);
        return;
    };
    let Some(tag) = e.key_tag.clone() else {
        app.error(s::EVENT_HAS_NO_KEY);
        return;
    };
    if app.key_by_tag(&tag).is_none() {
        let name = e.key_name.clone().unwrap_or_else(|| tag.clone());
        app.error(s::event_key_gone(&name));
        return;
    }
    let shown = app
        .visible
        .iter()
        .any(|&i| app.keys.get(i).is_some_and(|k| k.tag == tag));
    if !shown {
        app.filter.clear();
        app.filter_editing = false;
    }
    app.refilter(Some(&tag));
    app.details_from_events = Some(view);
    app.screen = Screen::Details;
}

/// A row of the log as one line: what the message line shows of the selected row.
fn row_line(entry: &Logged) -> String {
    match entry {
        Logged::Event(e) => s::event_line(e),
        Logged::Missed { missed, at } => s::gap_line(*at, &s::events_missed(*missed)),
        Logged::Reconnected { at } => s::gap_line(*at, s::EVENTS_RECONNECTED),
        Logged::OtherStore { data_dir, at } => s::gap_line(*at, &s::events_other_store(data_dir)),
    }
}

/// Keeps the window valid after a resize.
pub(super) fn on_resize(app: &mut App) {
    let rows = layout::events_rows(app.size, app.message_rows());
    let len = app.events.len();
    if let Screen::Events(v) = &mut app.screen {
        v.offset = scroll_offset(v.offset, v.selected, rows, len);
    }
}
