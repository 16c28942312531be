//! Every key binding, in one place: how keys become actions in each mode, and the tables
//! the footer and the help overlay are drawn from (so what is shown is what is bound).
//!
//! The bindings follow k9s and gitui: arrows or j/k to move, enter to open, esc to go
//! back, `/` to filter, `?` for help, `q` to quit, single letters for actions.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use kms_shared::model::KeyState;

use super::action::Action;
use super::strings as s;

/// What the keyboard currently drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Main,
    Details,
    Versions,
    History,
    /// The permissions (grants) view.
    Grants,
    /// The HSM tokens view.
    Tokens,
    /// The events view.
    Events,
    /// Typing the filter.
    Filter,
    Help,
    /// The create form.
    Form,
    /// The new-grant form.
    GrantForm,
    /// The register-token form.
    TokenForm,
    /// A yes/no confirmation.
    Confirm,
    /// A one-line text input: period, memo, or the key name for "delete now".
    Prompt,
    /// The last message in full.
    Message,
}

/// The action a key means in a mode, if any.
pub fn map(mode: Mode, key: KeyEvent) -> Option<Action> {
    use KeyCode::*;
    if key.modifiers.contains(KeyModifiers::CONTROL) {
        return match key.code {
            Char('c') => Some(Action::Quit),
            Char('a') if has_text(mode) => Some(Action::LineStart),
            Char('e') if has_text(mode) => Some(Action::LineEnd),
            Char('u') if has_text(mode) => Some(Action::ClearToStart),
            _ => None,
        };
    }
    match mode {
        Mode::Main | Mode::Details => match key.code {
            Enter => Some(Action::Open),
            Char('/') => Some(Action::StartFilter),
            Char('c') => Some(Action::Create),
            Char('r') => Some(Action::Rotate),
            Char('d') => Some(Action::Disable),
            Char('e') => Some(Action::Enable),
            Char('x') => Some(Action::RequestDeletion),
            Char('u') => Some(Action::CancelDeletion),
            Char('D') => Some(Action::DeleteNow),
            Char('a') => Some(Action::ToggleAutoRotation),
            Char('p') => Some(Action::EditPeriod),
            Char('m') => Some(Action::EditMemo),
            Char('v') => Some(Action::Versions),
            Char('h') => Some(Action::History),
            Char('P') => Some(Action::Permissions),
            Char('T') => Some(Action::Tokens),
            Char('E') => Some(Action::Events),
            other => screen_key(other),
        },
        Mode::Grants | Mode::Tokens => match key.code {
            Char('n') => Some(Action::New),
            Char('x') | Delete => Some(Action::Remove),
            other => screen_key(other),
        },
        Mode::Versions => match key.code {
            Char(' ') => Some(Action::ToggleVersion),
            // Not a toggle: enter opens things elsewhere, and here it would enable a
            // disabled version at once. It says which key toggles.
            Enter => Some(Action::Open),
            Char('r') => Some(Action::Rotate),
            Char('h') => Some(Action::History),
            other => screen_key(other),
        },
        Mode::Events => match key.code {
            Enter => Some(Action::Open),
            other => screen_key(other),
        },
        Mode::History => match key.code {
            Char('v') => Some(Action::Versions),
            other => screen_key(other),
        },
        Mode::Filter => match key.code {
            Up => Some(Action::Up),
            Down => Some(Action::Down),
            Enter => Some(Action::Submit),
            Esc => Some(Action::Back),
            other => text_key(other),
        },
        Mode::Help => match key.code {
            Esc | Enter | Char('?') | Char('q') => Some(Action::Back),
            other => move_key(other),
        },
        Mode::Message => match key.code {
            Esc | Enter | Char('M') | Char('q') => Some(Action::Back),
            other => move_key(other),
        },
        Mode::Form | Mode::GrantForm | Mode::TokenForm => match key.code {
            Tab | Down => Some(Action::NextField),
            BackTab | Up => Some(Action::PrevField),
            Enter => Some(Action::Submit),
            Esc => Some(Action::Back),
            other => text_key(other),
        },
        // Enter is not yes: only confirmations that destroy nothing take it as yes
        // (`ConfirmKind::enter_confirms`); the others want `y`.
        Mode::Confirm => match key.code {
            Char('y') | Char('Y') => Some(Action::Yes),
            Enter => Some(Action::Submit),
            Char('n') | Char('N') | Esc => Some(Action::No),
            _ => None,
        },
        Mode::Prompt => match key.code {
            Enter => Some(Action::Submit),
            Esc => Some(Action::Back),
            other => text_key(other),
        },
    }
}

/// The keys every screen (not a pop-up) shares: moving in its list, back, help, the
/// message in full, quit.
fn screen_key(code: KeyCode) -> Option<Action> {
    use KeyCode::*;
    match code {
        Esc => Some(Action::Back),
        Char('?') => Some(Action::Help),
        Char('M') => Some(Action::FullMessage),
        Char('q') => Some(Action::Quit),
        other => move_key(other),
    }
}

/// Moving in a list or scrolling a pop-up: arrows or j/k, a page, the first or last.
fn move_key(code: KeyCode) -> Option<Action> {
    use KeyCode::*;
    match code {
        Up | Char('k') => Some(Action::Up),
        Down | Char('j') => Some(Action::Down),
        PageUp => Some(Action::PageUp),
        PageDown => Some(Action::PageDown),
        Home | Char('g') => Some(Action::Top),
        End | Char('G') => Some(Action::Bottom),
        _ => None,
    }
}

/// The modes whose pop-up has a text field (forms and one-line prompts).
fn has_text(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::Form | Mode::GrantForm | Mode::TokenForm | Mode::Prompt | Mode::Filter
    )
}

/// Editing keys of a text field. In a form, ←/→ on a field that is not text change its
/// value instead (`update` decides by the focused field).
fn text_key(code: KeyCode) -> Option<Action> {
    use KeyCode::*;
    match code {
        Left => Some(Action::Left),
        Right => Some(Action::Right),
        Home => Some(Action::LineStart),
        End => Some(Action::LineEnd),
        Backspace => Some(Action::Backspace),
        Delete => Some(Action::DeleteForward),
        Char(c) => Some(Action::Char(c)),
        _ => None,
    }
}

/// One line of the footer or the help: the key(s) as shown, and what they do.
pub type Hint = (&'static str, &'static str);

/// The footer of each mode, most useful first (the footer drops what does not fit; the
/// help overlay has everything).
pub fn footer(mode: Mode) -> &'static [Hint] {
    match mode {
        Mode::Main | Mode::Details => &[
            ("?", s::F_HELP),
            ("/", s::F_FILTER),
            ("c", s::F_CREATE),
            ("r", s::F_ROTATE),
            ("d", s::F_DISABLE),
            ("e", s::F_ENABLE),
            ("x", s::F_DELETE),
            ("q", s::F_QUIT),
            ("enter", s::F_DETAILS),
            ("u", s::F_UNDELETE),
            ("D", s::F_DELETE_NOW),
            ("a", s::F_AUTO),
            ("p", s::F_PERIOD),
            ("m", s::F_MEMO),
            ("v", s::F_VERSIONS),
            ("h", s::F_HISTORY),
            ("P", s::F_PERMISSIONS),
            ("T", s::F_TOKENS),
            ("E", s::F_EVENTS),
        ],
        Mode::Grants => &[
            ("esc", s::F_BACK),
            ("n", s::F_NEW_GRANT),
            ("x", s::F_REVOKE),
            ("↑↓", s::F_MOVE),
            ("?", s::F_HELP),
            ("q", s::F_QUIT),
        ],
        Mode::Tokens => &[
            ("esc", s::F_BACK),
            ("n", s::F_REGISTER),
            ("x", s::F_REMOVE),
            ("↑↓", s::F_MOVE),
            ("?", s::F_HELP),
            ("q", s::F_QUIT),
        ],
        Mode::Versions => &[
            ("esc", s::F_BACK),
            ("space", s::F_TOGGLE),
            ("↑↓", s::F_MOVE),
            ("r", s::F_ROTATE),
            ("h", s::F_HISTORY),
            ("?", s::F_HELP),
            ("q", s::F_QUIT),
        ],
        Mode::Events => &[
            ("esc", s::F_BACK),
            ("enter", s::F_GO_TO_KEY),
            ("↑↓", s::F_MOVE),
            ("?", s::F_HELP),
            ("q", s::F_QUIT),
        ],
        Mode::History => &[
            ("esc", s::F_BACK),
            ("↑↓", s::F_MOVE),
            ("PgUp/PgDn", s::F_MOVE),
            ("v", s::F_VERSIONS),
            ("?", s::F_HELP),
            ("q", s::F_QUIT),
        ],
        Mode::Filter => &[
            ("enter", s::F_APPLY),
            ("esc", s::F_CLEAR),
            ("↑↓", s::F_MOVE),
        ],
        Mode::Help => &[("esc", s::F_CLOSE), ("↑↓", s::F_SCROLL)],
        Mode::Message => &[("esc", s::F_CLOSE), ("↑↓", s::F_SCROLL)],
        Mode::Form => &[
            ("tab/↑↓", s::F_FIELD),
            ("←→/space", s::F_CHANGE),
            ("enter", s::F_SUBMIT),
            ("esc", s::F_CANCEL),
        ],
        Mode::GrantForm => &[
            ("tab/↑↓", s::F_FIELD),
            ("←→/space", s::F_CHANGE),
            ("enter", s::F_GRANT),
            ("esc", s::F_CANCEL),
        ],
        Mode::TokenForm => &[
            ("tab/↑↓", s::F_FIELD),
            ("enter", s::F_REGISTER),
            ("esc", s::F_CANCEL),
        ],
        Mode::Confirm => &[("y", s::F_YES), ("n/esc", s::F_NO)],
        Mode::Prompt => &[("enter", s::F_CONFIRM), ("esc", s::F_CANCEL)],
    }
}

/// The footer of the key list and the details for the selected key's state (SPEC §12: the
/// action letters in the footer): the lifecycle actions that state allows first (SPEC
/// §3), then create and quit, the views, and the rest, as many as fit. [`footer`] of
/// those modes is the whole set (for the tests that check every hint is bound).
pub fn key_footer(state: Option<KeyState>) -> Vec<Hint> {
    let actions: &[Hint] = match state {
        Some(KeyState::Enabled) => &[("r", s::F_ROTATE), ("d", s::F_DISABLE), ("x", s::F_DELETE)],
        Some(KeyState::Disabled) => &[("e", s::F_ENABLE), ("x", s::F_DELETE)],
        Some(KeyState::PendingDeletion) => &[("u", s::F_UNDELETE), ("D", s::F_DELETE_NOW)],
        Some(KeyState::Deleted) | None => &[],
    };
    // What the state allows of the key's views and settings.
    let key: &[Hint] = match state {
        Some(KeyState::Enabled | KeyState::Disabled) => &[
            ("v", s::F_VERSIONS),
            ("h", s::F_HISTORY),
            ("enter", s::F_DETAILS),
            ("a", s::F_AUTO),
            ("p", s::F_PERIOD),
            ("m", s::F_MEMO),
        ],
        Some(KeyState::PendingDeletion) => &[
            ("v", s::F_VERSIONS),
            ("h", s::F_HISTORY),
            ("enter", s::F_DETAILS),
            ("m", s::F_MEMO),
        ],
        Some(KeyState::Deleted) | None => &[],
    };
    let mut hints = vec![("?", s::F_HELP), ("/", s::F_FILTER)];
    hints.extend_from_slice(actions);
    hints.extend_from_slice(&[("c", s::F_CREATE), ("q", s::F_QUIT)]);
    hints.extend_from_slice(key);
    hints.extend_from_slice(&[
        ("P", s::F_PERMISSIONS),
        ("T", s::F_TOKENS),
        ("E", s::F_EVENTS),
    ]);
    hints
}

/// The help overlay: sections of bindings.
pub const HELP: &[(&str, &[Hint])] = &[
    (
        s::HELP_SECTION_MOVE,
        &[
            ("↑↓ / k j", s::H_UP_DOWN),
            ("PgUp PgDn", s::H_PAGE),
            ("g G", s::H_TOP_BOTTOM),
            ("enter", s::H_ENTER),
            ("esc", s::H_ESC),
            ("/", s::H_FILTER),
            ("?", s::H_HELP),
            ("M", s::H_MESSAGE),
            ("q  ctrl-c", s::H_QUIT),
        ],
    ),
    (
        s::HELP_SECTION_KEYS,
        &[
            ("c", s::H_CREATE),
            ("r", s::H_ROTATE),
            ("d", s::H_DISABLE),
            ("e", s::H_ENABLE),
            ("x", s::H_DELETE),
            ("u", s::H_UNDELETE),
            ("D", s::H_DELETE_NOW),
            ("a", s::H_AUTO),
            ("p", s::H_PERIOD),
            ("m", s::H_MEMO),
        ],
    ),
    (
        s::HELP_SECTION_VIEWS,
        &[
            ("v", s::H_VERSIONS),
            ("h", s::H_HISTORY),
            ("E", s::H_EVENTS),
            ("space", s::H_TOGGLE_VERSION),
            ("tab ↑↓", s::H_FIELD),
            ("← → space", s::H_CHANGE),
            ("enter", s::H_SUBMIT),
            ("y", s::H_YES),
            ("n  esc", s::H_NO),
        ],
    ),
    (
        s::HELP_SECTION_ADMIN,
        &[
            ("P", s::H_PERMISSIONS),
            ("T", s::H_TOKENS),
            ("n", s::H_NEW),
            ("x  del", s::H_REMOVE),
        ],
    ),
    (s::HELP_SECTION_TEXT, &[("^A ^E ^U", s::H_TEXT_KEYS)]),
];

#[cfg(test)]
mod tests {
    use super::*;

    const MODES: [Mode; 15] = [
        Mode::Main,
        Mode::Details,
        Mode::Versions,
        Mode::History,
        Mode::Grants,
        Mode::Tokens,
        Mode::Events,
        Mode::Filter,
        Mode::Help,
        Mode::Form,
        Mode::GrantForm,
        Mode::TokenForm,
        Mode::Confirm,
        Mode::Prompt,
        Mode::Message,
    ];

    /// The keys a footer hint names ("tab/↑↓" is tab, up and down).
    fn keys_of(hint: &str) -> Vec<KeyCode> {
        // A lone character is that key, even the `/` that separates the others.
        if hint.chars().count() == 1 {
            return hint.chars().map(KeyCode::Char).collect();
        }
        hint.split('/')
            .flat_map(|part| match part {
                "↑↓" => vec![KeyCode::Up, KeyCode::Down],
                "←→" => vec![KeyCode::Left, KeyCode::Right],
                "tab" => vec![KeyCode::Tab],
                "esc" => vec![KeyCode::Esc],
                "enter" => vec![KeyCode::Enter],
                "space" => vec![KeyCode::Char(' ')],
                "PgUp" => vec![KeyCode::PageUp],
                "PgDn" => vec![KeyCode::PageDown],
                single if single.chars().count() == 1 => {
                    single.chars().map(KeyCode::Char).collect()
                }
                other => panic!("footer key {other:?} not understood by this test"),
            })
            .collect()
    }

    /// Every key a footer shows does something in that mode.
    #[test]
    fn footer_hints_are_bound() {
        for mode in MODES {
            for (hint, what) in footer(mode) {
                for code in keys_of(hint) {
                    let key = KeyEvent::new(code, KeyModifiers::NONE);
                    assert!(
                        map(mode, key).is_some(),
                        "{mode:?}: {hint} ({what}) is shown but not bound"
                    );
                }
            }
        }
    }

    /// The key list's footer offers the lifecycle actions the selected key's state allows
    /// (SPEC §3), and no other; every hint is bound. It once offered r, d, e and x on a
    /// key pending deletion, all refused, and not u or D.
    #[test]
    fn the_key_footer_follows_the_state() {
        let letters = |state| -> String {
            key_footer(state)
                .iter()
                .filter(|(k, _)| k.chars().count() == 1)
                .map(|(k, _)| *k)
                .collect()
        };
        let has = |state, all: &str, none: &str| {
            let shown = letters(state);
            for c in all.chars() {
                assert!(shown.contains(c), "{state:?}: {c} missing from {shown}");
            }
            for c in none.chars() {
                assert!(!shown.contains(c), "{state:?}: {c} offered in {shown}");
            }
        };
        has(Some(KeyState::Enabled), "rdx", "euD");
        has(Some(KeyState::Disabled), "ex", "rduD");
        has(Some(KeyState::PendingDeletion), "uD", "rdexap");
        has(None, "c", "rdexuDapmvh");
        for state in [
            None,
            Some(KeyState::Enabled),
            Some(KeyState::Disabled),
            Some(KeyState::PendingDeletion),
            Some(KeyState::Deleted),
        ] {
            for (hint, what) in &key_footer(state) {
                assert!(
                    footer(Mode::Main).contains(&(*hint, *what)),
                    "{hint} ({what}) is not among the list's bindings"
                );
                for code in keys_of(hint) {
                    let key = KeyEvent::new(code, KeyModifiers::NONE);
                    assert!(map(Mode::Main, key).is_some(), "{hint} is not bound");
                }
            }
        }
    }

    /// M shows the last message from every view, closes its own pop-up, and stays a
    /// letter where text is typed.
    #[test]
    fn m_shows_the_message() {
        let key = KeyEvent::new(KeyCode::Char('M'), KeyModifiers::NONE);
        for mode in [
            Mode::Main,
            Mode::Details,
            Mode::Versions,
            Mode::History,
            Mode::Grants,
            Mode::Tokens,
            Mode::Events,
        ] {
            assert_eq!(map(mode, key), Some(Action::FullMessage), "{mode:?}");
        }
        assert_eq!(map(Mode::Message, key), Some(Action::Back));
        for mode in [Mode::Filter, Mode::Form, Mode::Prompt] {
            assert_eq!(map(mode, key), Some(Action::Char('M')), "{mode:?}");
        }
    }

    /// P, T and E open their views from the list and the details, and nowhere they would
    /// shadow typing.
    #[test]
    fn permissions_tokens_and_events_keys() {
        let key = |c| KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE);
        for mode in [Mode::Main, Mode::Details] {
            assert_eq!(map(mode, key('P')), Some(Action::Permissions));
            assert_eq!(map(mode, key('T')), Some(Action::Tokens));
            assert_eq!(map(mode, key('E')), Some(Action::Events));
        }
        let enter = KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE);
        assert_eq!(map(Mode::Events, enter), Some(Action::Open));
        for mode in [Mode::Grants, Mode::Tokens] {
            assert_eq!(map(mode, key('n')), Some(Action::New));
            assert_eq!(map(mode, key('x')), Some(Action::Remove));
            let del = KeyEvent::new(KeyCode::Delete, KeyModifiers::NONE);
            assert_eq!(map(mode, del), Some(Action::Remove));
        }
        for mode in [Mode::Filter, Mode::Form, Mode::GrantForm, Mode::TokenForm] {
            assert_eq!(map(mode, key('P')), Some(Action::Char('P')));
            assert_eq!(map(mode, key('T')), Some(Action::Char('T')));
            assert_eq!(map(mode, key('E')), Some(Action::Char('E')));
        }
    }
}
