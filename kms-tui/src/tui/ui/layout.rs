//! Where everything goes. Pure functions of the terminal size and of the height of the
//! message area (which grows with a long message), shared by drawing and by `update`
//! (which needs page sizes without touching the terminal).

use ratatui::layout::{Constraint, Layout, Rect};

/// Height of the details pane under the key list (a top border and seven lines).
const DETAILS_PANE: u16 = 8;
/// Below this height the details pane gives its rows to the list.
const DETAILS_MIN_HEIGHT: u16 = 18;

/// The most rows the message area takes on a screen `height` rows high: a third of it,
/// so that a long message never hides the list it is about.
pub fn message_max_rows(height: u16) -> u16 {
    (height / 3).max(1)
}

/// header, body, message area (`message_rows` high, as `App::message_rows` says), footer.
pub fn frame(area: Rect, message_rows: u16) -> [Rect; 4] {
    area.layout(&Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(message_rows),
        Constraint::Length(1),
    ]))
}

/// The main screen's body: key table, details pane.
pub fn main_body(body: Rect, total_height: u16) -> [Rect; 2] {
    let pane = if total_height >= DETAILS_MIN_HEIGHT {
        DETAILS_PANE
    } else {
        0
    };
    body.layout(&Layout::vertical([
        Constraint::Min(0),
        Constraint::Length(pane),
    ]))
}

fn body_of(size: (u16, u16), message_rows: u16) -> Rect {
    let [_, body, _, _] = frame(Rect::new(0, 0, size.0, size.1), message_rows);
    body
}

/// Key rows visible in the list (the table's header row excluded).
pub fn list_rows(size: (u16, u16), message_rows: u16) -> usize {
    let [table, _] = main_body(body_of(size, message_rows), size.1);
    usize::from(table.height.saturating_sub(1))
}

/// Rows of a bordered sub-view with a status line and a column header.
fn view_rows(size: (u16, u16), message_rows: u16) -> usize {
    usize::from(body_of(size, message_rows).height.saturating_sub(4))
}

pub fn versions_rows(size: (u16, u16), message_rows: u16) -> usize {
    view_rows(size, message_rows)
}

pub fn history_rows(size: (u16, u16), message_rows: u16) -> usize {
    view_rows(size, message_rows)
}

pub fn grants_rows(size: (u16, u16), message_rows: u16) -> usize {
    view_rows(size, message_rows)
}

pub fn tokens_rows(size: (u16, u16), message_rows: u16) -> usize {
    view_rows(size, message_rows)
}

pub fn events_rows(size: (u16, u16), message_rows: u16) -> usize {
    view_rows(size, message_rows)
}

/// A pop-up of at most `w`×`h`, centred, never larger than the screen.
pub fn popup(area: Rect, w: u16, h: u16) -> Rect {
    area.centered(
        Constraint::Length(w.min(area.width)),
        Constraint::Length(h.min(area.height)),
    )
}

/// Which key-list columns fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// name, type, state, version, uses (80 columns).
    Compact,
    /// Adds protection, created, rotation and memo.
    Medium,
    /// Every column of the seed console (160 columns and more).
    Full,
}

pub fn tier(width: u16) -> Tier {
    match width {
        0..120 => Tier::Compact,
        120..160 => Tier::Medium,
        _ => Tier::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At 80×24 the list shows twelve keys above the details pane.
    #[test]
    fn list_rows_at_80x24() {
        assert_eq!(list_rows((80, 24), 1), 12);
        assert_eq!(list_rows((80, 10), 1), 6);
    }

    /// A message on three rows takes two rows from the list; the message area never
    /// takes more than a third of the screen, nor less than one row.
    #[test]
    fn message_rows_take_from_the_list() {
        assert_eq!(list_rows((80, 24), 3), 10);
        assert_eq!(message_max_rows(24), 8);
        assert_eq!(message_max_rows(40), 13);
        assert_eq!(message_max_rows(2), 1);
        assert_eq!(message_max_rows(0), 1);
    }
}
