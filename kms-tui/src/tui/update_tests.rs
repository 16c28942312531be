//! `update` tests: each binding in each mode, and each daemon reply, gives the right state
//! and effects. No terminal, no daemon.

#![allow(clippy::unwrap_used)]

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use kms_shared::model::{KeyInfo, KeyState, KeyType, Protection, Role};
use kms_shared::protocol::{CreateKey, Event, EventKind, GrantSpec};

use super::update;
use std::time::Duration;

use crate::tui::action::{Action, Effect, Op};
use crate::tui::app::{
    App, Ask, Base, ConfirmKind, Conn, Field, GrantField, GrantForm, GrantsView, ImpactState,
    MsgKind, Popup, PrincipalKind, PromptKind, Screen, TokenChoices, TokenField, TokenForm,
};
use crate::tui::fake;
use crate::tui::keymap::Mode;
use crate::tui::retry::Next;

fn ch(c: char) -> Action {
    Action::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE))
}

fn code(c: KeyCode) -> Action {
    Action::Key(KeyEvent::new(c, KeyModifiers::NONE))
}

fn typed(app: &mut App, text: &str) -> Vec<Effect> {
    text.chars().flat_map(|c| update(app, ch(c))).collect()
}

fn app() -> App {
    let mut a = App::new((80, 24));
    update(
        &mut a,
        Action::Connected {
            daemon_version: "0.1.0".into(),
            data_dir: Some("/home/alice/.local/share/kms".into()),
            at: fake::BASE,
        },
    );
    update(&mut a, Action::KeysLoaded(Ok(fake::keys())));
    a
}

/// Puts the selection on the named key.
fn select(app: &mut App, name: &str) -> KeyInfo {
    let pos = app
        .visible
        .iter()
        .position(|&i| app.keys[i].name == name)
        .unwrap();
    app.selected = pos;
    app.selected_key().unwrap().clone()
}

fn selected_name(app: &App) -> &str {
    &app.selected_key().unwrap().name
}

fn op(o: Op, k: &KeyInfo) -> Effect {
    Effect::Op {
        op: o,
        tag: k.tag.clone(),
        name: k.name.clone(),
    }
}

fn event(kind: EventKind, k: &KeyInfo) -> Event {
    Event {
        seq: 7,
        time: fake::BASE,
        kind,
        key_tag: Some(k.tag.clone()),
        key_name: Some(k.name.clone()),
        version: None,
        state: Some(KeyState::Disabled),
        account: "alice".into(),
        message: "disabled by alice".into(),
    }
}

/// The list is sorted by name whatever order the daemon sent it in.
#[test]
fn keys_are_listed_by_name() {
    let a = app();
    let names: Vec<&str> = a.visible.iter().map(|&i| a.keys[i].name.as_str()).collect();
    assert_eq!(
        names,
        [
            "backup-rsa",
            "ci-artifacts",
            "jwt-signing",
            "legacy-db",
            "old-archive",
            "partner-sso",
            "payments",
            "tokens-conv"
        ]
    );
}

/// j/↓ and k/↑ move one row and stop at the ends.
#[test]
fn j_k_and_arrows_move() {
    let mut a = app();
    assert_eq!(selected_name(&a), "backup-rsa");
    update(&mut a, ch('j'));
    assert_eq!(selected_name(&a), "ci-artifacts");
    update(&mut a, code(KeyCode::Down));
    assert_eq!(selected_name(&a), "jwt-signing");
    update(&mut a, ch('k'));
    update(&mut a, code(KeyCode::Up));
    update(&mut a, code(KeyCode::Up));
    assert_eq!(selected_name(&a), "backup-rsa");
}

/// g/Home go to the first key, G/End to the last.
#[test]
fn g_and_shift_g_jump() {
    let mut a = app();
    update(&mut a, ch('G'));
    assert_eq!(selected_name(&a), "tokens-conv");
    update(&mut a, ch('g'));
    assert_eq!(selected_name(&a), "backup-rsa");
    update(&mut a, code(KeyCode::End));
    assert_eq!(a.selected, 7);
    update(&mut a, code(KeyCode::Home));
    assert_eq!(a.selected, 0);
}

/// PgDn/PgUp move by the visible page and the scroll window follows.
#[test]
fn page_keys_move_a_page() {
    let mut a = App::new((80, 24));
    update(&mut a, Action::KeysLoaded(Ok(fake::many(100))));
    let page = a.list_rows();
    assert_eq!(page, 12);
    update(&mut a, code(KeyCode::PageDown));
    assert_eq!(a.selected, 12);
    assert_eq!(a.offset, 1);
    update(&mut a, code(KeyCode::PageDown));
    assert_eq!(a.selected, 24);
    update(&mut a, code(KeyCode::PageUp));
    assert_eq!(a.selected, 12);
    assert_eq!(a.offset, 12);
    update(&mut a, Action::Resize(80, 40));
    assert_eq!(a.list_rows(), 28);
}

/// enter opens the details, enter again the versions; esc walks back.
#[test]
fn enter_and_esc_walk_screens() {
    let mut a = app();
    let k = select(&mut a, "payments");
    assert!(update(&mut a, code(KeyCode::Enter)).is_empty());
    assert_eq!(a.screen, Screen::Details);
    let fx = update(&mut a, code(KeyCode::Enter));
    assert_eq!(fx, [Effect::LoadVersions(k.tag.clone())]);
    assert!(matches!(&a.screen, Screen::Versions(v) if v.tag == k.tag));
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.screen, Screen::Details);
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.screen, Screen::Main);
}

/// On the list, with nothing to go back from, esc dismisses the message: a long one
/// gives its rows back to the list. Esc clears a filter before the message.
#[test]
fn esc_dismisses_the_message_last() {
    let mut a = app();
    let rows = a.list_rows();
    a.error("a refusal long enough to wrap over several rows of the message area: ".repeat(8));
    assert!(a.message_rows() > 1);
    assert!(a.list_rows() < rows);
    update(&mut a, ch('/'));
    typed(&mut a, "pa");
    update(&mut a, code(KeyCode::Enter));
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.filter, "");
    assert!(a.message.is_some(), "the filter goes first");
    update(&mut a, code(KeyCode::Esc));
    assert!(a.message.is_none());
    assert_eq!(a.list_rows(), rows);
}

/// `/` filters live by name as you type; enter keeps the filter; esc clears it.
#[test]
fn slash_filters_live() {
    let mut a = app();
    update(&mut a, ch('/'));
    assert!(a.filter_editing);
    typed(&mut a, "pa");
    assert_eq!(a.visible.len(), 2, "partner-sso and payments");
    typed(&mut a, "y");
    assert_eq!(a.visible.len(), 1);
    assert_eq!(selected_name(&a), "payments");
    update(&mut a, code(KeyCode::Backspace));
    assert_eq!(a.visible.len(), 2);
    update(&mut a, code(KeyCode::Enter));
    assert!(!a.filter_editing);
    assert_eq!(a.filter, "pa");
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.filter, "");
    assert_eq!(a.visible.len(), 8);
}

/// The filter also matches tags, and esc while typing clears it.
#[test]
fn filter_matches_tags_and_esc_clears() {
    let mut a = app();
    let tag = a
        .keys
        .iter()
        .find(|k| k.name == "legacy-db")
        .unwrap()
        .tag
        .clone();
    update(&mut a, ch('/'));
    typed(&mut a, &tag[..12]);
    assert_eq!(a.visible.len(), 1);
    assert_eq!(selected_name(&a), "legacy-db");
    update(&mut a, code(KeyCode::Esc));
    assert!(!a.filter_editing);
    assert!(a.filter.is_empty());
    assert_eq!(a.visible.len(), 8);
    assert_eq!(selected_name(&a), "legacy-db", "selection stays on the key");
}

/// A key action in the history of a key that is gone from the list (purged) says so,
/// not "no key selected" (found driving the dashboard).
#[test]
fn a_key_action_on_a_gone_keys_history_says_it_is_gone() {
    let mut a = app();
    let k = select(&mut a, "payments");
    update(&mut a, ch('h'));
    update(
        &mut a,
        Action::KeyFetched {
            tag: k.tag.clone(),
            result: Ok(None),
        },
    );
    update(&mut a, ch('v'));
    let m = &a.message.as_ref().unwrap().text;
    assert!(m.contains("payments is no longer in the list"), "{m}");
}

/// "no key selected", said when a filter hid every key, goes once a key is selected
/// again (found driving the dashboard: it stayed after the filter was cleared).
#[test]
fn no_key_selected_goes_with_a_selection() {
    let mut a = app();
    update(&mut a, ch('/'));
    typed(&mut a, "zzz");
    update(&mut a, code(KeyCode::Enter));
    update(&mut a, ch('r'));
    assert_eq!(a.message.as_ref().unwrap().text, "no key selected");
    update(&mut a, code(KeyCode::Esc));
    assert!(a.selected_key().is_some());
    assert_eq!(a.message, None);
}

/// The filter is edited as every text field is (the help says so): ← → home end del,
/// ctrl-a ctrl-e ctrl-u. It used to take typing at its end and backspace only: ← did
/// nothing and the next letter went to the end.
#[test]
fn the_filter_edits_at_its_cursor() {
    let mut a = app();
    update(&mut a, ch('/'));
    typed(&mut a, "paymnts");
    assert_eq!(a.visible.len(), 0);
    update(&mut a, code(KeyCode::Left));
    update(&mut a, code(KeyCode::Left));
    update(&mut a, code(KeyCode::Left));
    typed(&mut a, "e");
    assert_eq!(a.filter, "payments");
    assert_eq!(selected_name(&a), "payments");
    update(&mut a, code(KeyCode::Home));
    update(&mut a, code(KeyCode::Delete));
    assert_eq!(a.filter, "ayments");
    update(&mut a, ctrl('e'));
    typed(&mut a, "!");
    assert_eq!(a.filter, "ayments!");
    update(&mut a, code(KeyCode::Left));
    update(&mut a, ctrl('u'));
    assert_eq!(a.filter, "!");
    update(&mut a, ctrl('a'));
    update(&mut a, code(KeyCode::Delete));
    assert_eq!(a.filter, "");
    assert_eq!(a.visible.len(), 8);
    // A new filter starts with its cursor at the end.
    update(&mut a, code(KeyCode::Esc));
    update(&mut a, ch('/'));
    typed(&mut a, "pa");
    update(&mut a, code(KeyCode::Backspace));
    assert_eq!(a.filter, "p");
}

/// Letters typed into the filter are text, not commands (q does not quit).
#[test]
fn filter_swallows_command_letters() {
    let mut a = app();
    update(&mut a, ch('/'));
    let fx = typed(&mut a, "qdxr");
    assert!(fx.is_empty());
    assert!(!a.should_quit);
    assert!(a.popup.is_none());
    assert_eq!(a.filter, "qdxr");
}

/// `?` opens the help; esc, `?` or q close it without quitting.
#[test]
fn question_mark_toggles_help() {
    let mut a = app();
    for close in [code(KeyCode::Esc), ch('?'), ch('q')] {
        update(&mut a, ch('?'));
        assert_eq!(a.popup, Some(Popup::Help { scroll: 0 }));
        update(&mut a, close);
        assert_eq!(a.popup, None);
        assert!(!a.should_quit);
    }
}

/// q quits from the list; ctrl-c quits from anywhere, even a form.
#[test]
fn q_and_ctrl_c_quit() {
    let mut a = app();
    update(&mut a, ch('q'));
    assert!(a.should_quit);
    let mut a = app();
    update(&mut a, ch('c'));
    update(
        &mut a,
        Action::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
    );
    assert!(a.should_quit);
}

fn form(a: &App) -> &crate::tui::app::CreateForm {
    match &a.popup {
        Some(Popup::Create(f)) => f,
        other => panic!("no form: {other:?}"),
    }
}

/// A paste goes into the text being edited without its line breaks and tabs (it never
/// submits the form); on the list it is no command at all, whatever letters it holds.
#[test]
fn a_paste_is_text_not_keys() {
    let mut a = app();
    select(&mut a, "payments");
    assert!(update(&mut a, Action::Paste("xyd\n".into())).is_empty());
    assert!(a.popup.is_none(), "a paste ran commands: {:?}", a.popup);
    update(&mut a, ch('c'));
    let fx = update(&mut a, Action::Paste("abc\ndef\tghi".into()));
    assert!(fx.is_empty(), "{fx:?}");
    assert_eq!(form(&a).name, "abcdefghi");
    // On a choice (the key type), where a space changes the choice, a paste does nothing.
    update(&mut a, code(KeyCode::Tab));
    let before = form(&a).clone();
    update(&mut a, Action::Paste("a b c".into()));
    assert_eq!(*form(&a), before);
    // Longer than a field takes: cut, and said.
    update(&mut a, code(KeyCode::BackTab));
    update(&mut a, Action::Paste("y".repeat(250)));
    assert_eq!(form(&a).name.chars().count(), crate::tui::app::MAX_INPUT);
    let m = a.message.clone().unwrap();
    assert_eq!(m.kind, MsgKind::Error);
    assert!(m.text.contains("250 characters"), "{}", m.text);
}

/// c opens the form; rules are checked as you type and a valid form submits a create.
#[test]
fn create_form_validates_and_submits() {
    let mut a = app();
    update(&mut a, ch('c'));
    assert_eq!(form(&a).focus, Field::Name);
    assert_eq!(form(&a).shown_error(Field::Name, false), None, "untouched");
    typed(&mut a, "1x");
    let err = form(&a).shown_error(Field::Name, false).unwrap();
    assert!(err.contains("3 to 15"), "{err}");
    // Enter refuses while invalid and marks every field.
    assert!(update(&mut a, code(KeyCode::Enter)).is_empty());
    assert!(form(&a).show_all);
    update(&mut a, code(KeyCode::Backspace));
    update(&mut a, code(KeyCode::Backspace));
    typed(&mut a, "orders");
    assert_eq!(form(&a).shown_error(Field::Name, false), None);
    update(&mut a, code(KeyCode::Tab));
    assert_eq!(form(&a).focus, Field::Type);
    update(&mut a, ch(' '));
    assert_eq!(form(&a).key_type, KeyType::Ecdsa);
    update(&mut a, code(KeyCode::Left));
    assert_eq!(form(&a).key_type, KeyType::Aes256);
    update(&mut a, code(KeyCode::Down));
    update(&mut a, code(KeyCode::Right));
    assert_eq!(form(&a).protection, Protection::Hsm);
    // Convergent keys are basic (the next test): back to basic.
    update(&mut a, code(KeyCode::Left));
    assert_eq!(form(&a).protection, Protection::Basic);
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, ch(' '));
    assert!(form(&a).convergent);
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, ch(' '));
    assert!(form(&a).auto_rotation);
    update(&mut a, code(KeyCode::Tab));
    assert_eq!(form(&a).focus, Field::Days);
    update(&mut a, code(KeyCode::Backspace));
    update(&mut a, code(KeyCode::Backspace));
    typed(&mut a, "30");
    update(&mut a, code(KeyCode::Tab));
    typed(&mut a, "order ids");
    update(&mut a, code(KeyCode::BackTab));
    assert_eq!(form(&a).focus, Field::Days);
    let fx = update(&mut a, code(KeyCode::Enter));
    assert_eq!(
        fx,
        [Effect::Create(CreateKey {
            name: "orders".into(),
            key_type: KeyType::Aes256,
            protection: Protection::Basic,
            convergent: true,
            auto_rotation: true,
            rotation_days: Some(30),
            memo: "order ids".into(),
            hsm: None,
        })]
    );
    assert!(form(&a).submitting);
    assert!(
        update(&mut a, code(KeyCode::Enter)).is_empty(),
        "no double submit"
    );
}

/// A form sent while the dashboard was disconnected says so; once it is connected again
/// the form no longer says it (found driving the dashboard: "not connected to kmsd"
/// stayed under a form that could be sent again), while a refusal by kmsd stays.
#[test]
fn a_reconnect_clears_a_forms_not_connected() {
    let mut a = app();
    update(&mut a, ch('c'));
    typed(&mut a, "orders");
    update(&mut a, code(KeyCode::Enter));
    update(
        &mut a,
        Action::Created(Err(crate::tui::strings::NOT_CONNECTED.into())),
    );
    assert_eq!(
        form(&a).daemon_error.as_deref(),
        Some(crate::tui::strings::NOT_CONNECTED)
    );
    let connected = || Action::Connected {
        daemon_version: "0.1.0".into(),
        data_dir: Some("/home/alice/.local/share/kms".into()),
        at: fake::BASE,
    };
    update(&mut a, connected());
    assert_eq!(form(&a).daemon_error, None);
    update(&mut a, code(KeyCode::Enter));
    update(
        &mut a,
        Action::Created(Err("invalid-argument: refused".into())),
    );
    update(&mut a, connected());
    assert_eq!(
        form(&a).daemon_error.as_deref(),
        Some("invalid-argument: refused")
    );
}

/// The daemon's refusal shows in the form; success closes it and selects the new key.
#[test]
fn create_reply_goes_to_the_form() {
    let mut a = app();
    update(&mut a, ch('c'));
    typed(&mut a, "orders");
    update(&mut a, code(KeyCode::Enter));
    update(
        &mut a,
        Action::Created(Err("permission-denied: only managers create keys".into())),
    );
    assert_eq!(
        form(&a).daemon_error.as_deref(),
        Some("permission-denied: only managers create keys")
    );
    assert!(!form(&a).submitting);
    let fx = update(&mut a, code(KeyCode::Enter));
    assert_eq!(fx.len(), 1);
    let mut k = fake::keys()[0].clone();
    k.name = "orders".into();
    k.tag = fake::tag(99);
    update(&mut a, Action::Created(Ok(k)));
    assert_eq!(a.popup, None);
    assert_eq!(selected_name(&a), "orders");
    assert_eq!(a.keys.len(), 9);
    assert_eq!(a.message.as_ref().unwrap().kind, MsgKind::Success);
}

/// A convergent key at an HSM protection level is refused in the form as the daemon
/// refuses it (it used to be found out only on submitting).
#[test]
fn create_form_refuses_convergent_hsm_keys() {
    use kms_shared::model::Protection;
    let mut a = app();
    update(&mut a, ch('c'));
    let Some(Popup::Create(f)) = &mut a.popup else {
        panic!("no form")
    };
    f.convergent = true;
    f.protection = Protection::Hsm;
    let e = f.rule_error(Field::Convergent, false).unwrap();
    assert!(e.contains("not available for hsm keys"), "{e}");
    f.protection = Protection::Basic;
    assert_eq!(f.rule_error(Field::Convergent, false), None);
}

/// Every §2 rule is in the form: unique names, convergent for AES only, 1–730 days, memo.
#[test]
fn create_form_rules() {
    let mut a = app();
    update(&mut a, ch('c'));
    typed(&mut a, "payments");
    assert!(
        form(&a)
            .shown_error(Field::Name, a.name_taken("payments"))
            .unwrap()
            .contains("already exists")
    );
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, ch(' ')); // ECDSA
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, ch(' ')); // convergent on
    assert!(
        form(&a)
            .shown_error(Field::Convergent, false)
            .unwrap()
            .contains("AES256")
    );
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, code(KeyCode::Backspace));
    update(&mut a, code(KeyCode::Backspace));
    typed(&mut a, "731");
    assert!(
        form(&a)
            .shown_error(Field::Days, false)
            .unwrap()
            .contains("730")
    );
    update(&mut a, code(KeyCode::Backspace));
    assert_eq!(form(&a).shown_error(Field::Days, false), None);
    typed(&mut a, "x");
    assert!(form(&a).shown_error(Field::Days, false).is_some());
    update(&mut a, code(KeyCode::Tab));
    typed(&mut a, &"m".repeat(101));
    assert!(
        form(&a)
            .shown_error(Field::Memo, false)
            .unwrap()
            .contains("100")
    );
    assert!(update(&mut a, code(KeyCode::Enter)).is_empty());
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.popup, None);
}

/// r asks first (no impact needed); y rotates, n cancels.
#[test]
fn r_confirms_then_rotates() {
    let mut a = app();
    let k = select(&mut a, "payments");
    assert!(update(&mut a, ch('r')).is_empty());
    assert!(
        matches!(&a.popup, Some(Popup::Confirm(c)) if c.kind == ConfirmKind::Rotate && c.impact == ImpactState::NotNeeded)
    );
    assert!(update(&mut a, ch('n')).is_empty());
    assert_eq!(a.popup, None);
    update(&mut a, ch('r'));
    assert_eq!(update(&mut a, ch('y')), [op(Op::Rotate, &k)]);
    assert_eq!(a.popup, None);
}

/// Actions the state table forbids are refused at once with the reason.
#[test]
fn forbidden_actions_explain() {
    let mut a = app();
    select(&mut a, "legacy-db"); // disabled
    for c in ['r', 'd', 'u', 'D'] {
        assert!(update(&mut a, ch(c)).is_empty(), "{c}");
        assert_eq!(a.popup, None, "{c}");
        let m = a.message.clone().unwrap();
        assert_eq!(m.kind, MsgKind::Error);
        assert!(m.text.contains("legacy-db is disabled"), "{}", m.text);
    }
    select(&mut a, "old-archive"); // pending deletion
    for c in ['e', 'x', 'r', 'd'] {
        assert!(update(&mut a, ch(c)).is_empty(), "{c}");
        assert_eq!(a.popup, None, "{c}");
    }
}

/// A key pending deletion keeps its rotation settings and its versions' flags: the daemon
/// refuses `set_rotation` and `enable_version`/`disable_version` then. `p` opened the
/// period dialog anyway (and `a`, space in the versions view sent or asked for what would
/// be refused); they are refused at once, naming the state. The memo may still change.
#[test]
fn pending_deletion_refuses_rotation_and_version_changes() {
    let mut a = app();
    let k = select(&mut a, "old-archive");
    assert_eq!(k.state, KeyState::PendingDeletion);
    for c in ['p', 'a'] {
        assert!(update(&mut a, ch(c)).is_empty(), "{c}");
        assert_eq!(a.popup, None, "{c}");
        let m = a.message.clone().unwrap();
        assert_eq!(m.kind, MsgKind::Error, "{c}");
        assert_eq!(
            m.text,
            "changing automatic rotation or its period is not possible while old-archive is pending-deletion"
        );
    }
    update(&mut a, ch('v'));
    update(&mut a, fake::versions_loaded(k.tag.clone()));
    // v3 (on top) is enabled, v1 (the last, after G) disabled: neither way is sent.
    for (moved, what) in [(None, "disabling"), (Some(ch('G')), "enabling")] {
        if let Some(m) = moved {
            update(&mut a, m);
        }
        assert!(update(&mut a, ch(' ')).is_empty(), "{what}");
        assert_eq!(a.popup, None, "{what}");
        let m = a.message.clone().unwrap();
        assert_eq!(m.kind, MsgKind::Error);
        assert_eq!(
            m.text,
            format!("{what} a version is not possible while old-archive is pending-deletion")
        );
    }
    update(&mut a, code(KeyCode::Esc));
    update(&mut a, ch('m'));
    assert!(matches!(&a.popup, Some(Popup::Prompt(p)) if p.kind == PromptKind::Memo));
}

/// d shows the impact before y can disable; y is ignored until the impact is in.
#[test]
fn d_shows_impact_then_disables() {
    let mut a = app();
    let k = select(&mut a, "payments");
    assert_eq!(update(&mut a, ch('d')), [Effect::LoadImpact(k.tag.clone())]);
    assert!(update(&mut a, ch('y')).is_empty(), "impact still loading");
    assert!(a.popup.is_some());
    update(&mut a, fake::impact_loaded(k.tag.clone()));
    assert!(
        matches!(&a.popup, Some(Popup::Confirm(c)) if matches!(c.impact, ImpactState::Loaded(_)))
    );
    assert_eq!(update(&mut a, ch('y')), [op(Op::Disable, &k)]);
}

/// A failed impact load still lets the user decide (and says why it is missing).
#[test]
fn impact_failure_is_shown() {
    let mut a = app();
    let k = select(&mut a, "payments");
    update(&mut a, ch('x'));
    update(
        &mut a,
        Action::ImpactLoaded {
            tag: k.tag.clone(),
            result: Err("permission-denied: reviewers only".into()),
        },
    );
    assert!(
        matches!(&a.popup, Some(Popup::Confirm(c)) if matches!(c.impact, ImpactState::Failed(_)))
    );
    assert_eq!(update(&mut a, ch('y')), [op(Op::RequestDeletion, &k)]);
}

/// Enter is not yes in a destructive confirmation (disable, request deletion, disable a
/// version, revoke, remove a token): it says to press y and leaves the question open.
/// Rotation destroys nothing and still takes enter.
#[test]
fn enter_does_not_confirm_destructive_actions() {
    let enter_refused = |a: &mut App, what: &str| {
        assert!(update(a, code(KeyCode::Enter)).is_empty(), "{what}");
        assert!(a.popup.is_some(), "{what}: still asking");
        assert_eq!(
            a.message.as_ref().unwrap().text,
            crate::tui::strings::CONFIRM_NEEDS_Y,
            "{what}"
        );
        update(a, code(KeyCode::Esc));
        assert_eq!(a.popup, None, "{what}: esc cancels");
        // The hint went with the question (it stayed on screen after it).
        assert_eq!(a.message, None, "{what}: the hint outlived the question");
    };
    let mut a = app();
    let k = select(&mut a, "payments");
    for key in ['d', 'x'] {
        update(&mut a, ch(key));
        update(&mut a, fake::impact_loaded(k.tag.clone()));
        enter_refused(&mut a, &format!("{key}"));
    }
    update(&mut a, ch('v'));
    update(&mut a, fake::versions_loaded(k.tag.clone()));
    update(&mut a, ch(' '));
    update(&mut a, fake::impact_loaded(k.tag.clone()));
    enter_refused(&mut a, "disable version");
    update(&mut a, code(KeyCode::Esc));

    let mut a = permissions_on("payments");
    update(&mut a, ch('x'));
    enter_refused(&mut a, "revoke");
    let mut a = tokens_open();
    update(&mut a, ch('x'));
    enter_refused(&mut a, "remove token");

    let mut a = app();
    let k = select(&mut a, "payments");
    update(&mut a, ch('r'));
    assert_eq!(
        update(&mut a, code(KeyCode::Enter)),
        [op(Op::Rotate, &k)],
        "rotation takes enter"
    );
    assert_eq!(a.popup, None);
}

/// e enables a disabled key at once (not destructive, no confirmation).
#[test]
fn e_enables() {
    let mut a = app();
    let k = select(&mut a, "legacy-db");
    assert_eq!(update(&mut a, ch('e')), [op(Op::Enable, &k)]);
    assert_eq!(a.popup, None);
}

/// x asks with the impact, then requests deletion.
#[test]
fn x_requests_deletion() {
    let mut a = app();
    let k = select(&mut a, "legacy-db");
    assert_eq!(update(&mut a, ch('x')), [Effect::LoadImpact(k.tag.clone())]);
    assert!(matches!(&a.popup, Some(Popup::Confirm(c)) if c.kind == ConfirmKind::RequestDeletion));
    update(&mut a, fake::impact_loaded(k.tag.clone()));
    assert_eq!(update(&mut a, ch('Y')), [op(Op::RequestDeletion, &k)]);
}

/// u cancels a pending deletion.
#[test]
fn u_cancels_deletion() {
    let mut a = app();
    let k = select(&mut a, "old-archive");
    assert_eq!(update(&mut a, ch('u')), [op(Op::CancelDeletion, &k)]);
}

/// D wants the key name typed: y is just a letter, a wrong name is refused.
#[test]
fn shift_d_requires_the_name() {
    let mut a = app();
    let k = select(&mut a, "old-archive");
    assert_eq!(update(&mut a, ch('D')), [Effect::LoadImpact(k.tag.clone())]);
    assert!(typed(&mut a, "y").is_empty());
    assert!(update(&mut a, code(KeyCode::Enter)).is_empty());
    assert!(matches!(&a.popup, Some(Popup::Confirm(c)) if c.mismatch && c.typed == "y"));
    update(&mut a, code(KeyCode::Backspace));
    typed(&mut a, "old-archiv");
    assert!(update(&mut a, code(KeyCode::Enter)).is_empty());
    typed(&mut a, "e");
    assert_eq!(
        update(&mut a, code(KeyCode::Enter)),
        [op(Op::DeleteNow, &k)]
    );
    assert_eq!(a.popup, None);
}

/// esc abandons the delete-now prompt without deleting.
#[test]
fn shift_d_esc_cancels() {
    let mut a = app();
    select(&mut a, "old-archive");
    update(&mut a, ch('D'));
    typed(&mut a, "old-archive");
    assert!(update(&mut a, code(KeyCode::Esc)).is_empty());
    assert_eq!(a.popup, None);
}

/// a flips auto rotation, keeping the period, once confirmed (enter or y); esc leaves it
/// as it was. It flipped at once: switching it on starts a new period, so `a` pressed
/// twice by a slip moved the schedule.
#[test]
fn a_toggles_auto_rotation() {
    let mut a = app();
    let k = select(&mut a, "payments");
    assert!(update(&mut a, ch('a')).is_empty());
    assert!(
        matches!(&a.popup, Some(Popup::Confirm(c)) if c.kind == ConfirmKind::AutoRotation(false))
    );
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.popup, None);
    update(&mut a, ch('a'));
    assert_eq!(
        update(&mut a, code(KeyCode::Enter)),
        [op(
            Op::SetRotation {
                auto_rotation: false,
                rotation_days: None
            },
            &k
        )]
    );
}

/// p edits the period with live validation; only a valid period is sent.
#[test]
fn p_sets_the_period() {
    let mut a = app();
    let k = select(&mut a, "payments");
    update(&mut a, ch('p'));
    assert!(
        matches!(&a.popup, Some(Popup::Prompt(p)) if p.kind == PromptKind::Period && p.text == "90")
    );
    update(&mut a, code(KeyCode::Backspace));
    update(&mut a, code(KeyCode::Backspace));
    typed(&mut a, "999");
    assert!(update(&mut a, code(KeyCode::Enter)).is_empty());
    assert!(matches!(&a.popup, Some(Popup::Prompt(p)) if p.error().is_some()));
    update(&mut a, code(KeyCode::Backspace));
    assert_eq!(
        update(&mut a, code(KeyCode::Enter)),
        [op(
            Op::SetRotation {
                auto_rotation: true,
                rotation_days: Some(99)
            },
            &k
        )]
    );
    assert_eq!(a.popup, None);
}

/// m edits the memo, prefilled with the current one; esc discards.
#[test]
fn m_sets_the_memo() {
    let mut a = app();
    let k = select(&mut a, "payments");
    update(&mut a, ch('m'));
    assert!(matches!(&a.popup, Some(Popup::Prompt(p)) if p.text == "card tokens (PCI)"));
    typed(&mut a, "!");
    assert_eq!(
        update(&mut a, code(KeyCode::Enter)),
        [op(Op::SetMemo("card tokens (PCI)!".into()), &k)]
    );
    update(&mut a, ch('m'));
    typed(&mut a, "zzz");
    assert!(update(&mut a, code(KeyCode::Esc)).is_empty());
    assert_eq!(a.popup, None);
}

/// v lists versions newest first; space enables the selected one at once, or asks
/// before disabling it.
#[test]
fn v_lists_and_toggles_versions() {
    let mut a = app();
    let k = select(&mut a, "payments");
    assert_eq!(
        update(&mut a, ch('v')),
        [Effect::LoadVersions(k.tag.clone())]
    );
    update(&mut a, fake::versions_loaded(k.tag.clone()));
    let Screen::Versions(v) = &a.screen else {
        panic!()
    };
    let order: Vec<u32> = v
        .versions
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(order, [3, 2, 1]);
    update(&mut a, ch('G'));
    let toggle = |version, enabled| Effect::SetVersionEnabled {
        tag: k.tag.clone(),
        name: k.name.clone(),
        version,
        enabled,
    };
    // Enabling is at once.
    assert_eq!(update(&mut a, ch(' ')), [toggle(1, true)]);
    assert_eq!(a.popup, None);
    let mut vs = fake::versions();
    vs[0].enabled = true;
    update(
        &mut a,
        Action::VersionToggled {
            tag: k.tag.clone(),
            name: k.name.clone(),
            version: 1,
            enabled: true,
            result: Ok(vs),
        },
    );
    // Disabling asks first, with the impact; y is ignored until the impact is in.
    update(&mut a, ch('k'));
    assert_eq!(update(&mut a, ch(' ')), [Effect::LoadImpact(k.tag.clone())]);
    assert!(matches!(
        &a.popup,
        Some(Popup::Confirm(c)) if c.kind == ConfirmKind::DisableVersion { version: 2, current: false }
    ));
    assert!(update(&mut a, ch('y')).is_empty(), "impact still loading");
    update(&mut a, fake::impact_loaded(k.tag.clone()));
    assert_eq!(update(&mut a, ch('y')), [toggle(2, false)]);
    assert_eq!(a.popup, None);
    assert!(
        matches!(a.screen, Screen::Versions(_)),
        "back in the versions"
    );
    let mut vs = fake::versions();
    vs[1].enabled = false;
    update(
        &mut a,
        Action::VersionToggled {
            tag: k.tag.clone(),
            name: k.name.clone(),
            version: 2,
            enabled: false,
            result: Ok(vs),
        },
    );
    let Screen::Versions(v) = &a.screen else {
        panic!()
    };
    assert!(!v.versions.as_ref().unwrap()[1].enabled);
    assert_eq!(a.message.as_ref().unwrap().text, "payments v2 disabled");
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.screen, Screen::Main);
}

/// Enter in the versions view toggled the version as space does, though the footer and
/// the help name only space: on a disabled version it enabled it at once. It toggles
/// nothing now and says which key does.
#[test]
fn enter_in_the_versions_view_does_not_toggle() {
    let mut a = app();
    let k = select(&mut a, "payments");
    update(&mut a, ch('v'));
    update(&mut a, fake::versions_loaded(k.tag.clone()));
    for at in [ch('g'), ch('G')] {
        // v3 (enabled, current) and v1 (disabled).
        update(&mut a, at);
        assert!(update(&mut a, code(KeyCode::Enter)).is_empty());
        assert_eq!(a.popup, None);
        assert!(matches!(a.screen, Screen::Versions(_)));
        let m = a.message.clone().unwrap();
        assert_eq!(m.kind, MsgKind::Info);
        assert_eq!(m.text, "space enables or disables the selected version");
    }
    assert!(
        crate::tui::keymap::footer(Mode::Versions)
            .iter()
            .all(|(key, _)| !key.contains("enter"))
    );
}

/// Disabling the current version asks, and says it is the current one; n or esc leave
/// it enabled.
#[test]
fn disabling_the_current_version_asks() {
    let mut a = app();
    let k = select(&mut a, "payments");
    assert_eq!(k.current_version, 3);
    update(&mut a, ch('v'));
    update(&mut a, fake::versions_loaded(k.tag.clone()));
    for cancel in [ch('n'), code(KeyCode::Esc)] {
        assert_eq!(
            update(&mut a, ch(' ')),
            [Effect::LoadImpact(k.tag.clone())],
            "asks instead of disabling"
        );
        assert!(matches!(
            &a.popup,
            Some(Popup::Confirm(c)) if c.kind == ConfirmKind::DisableVersion { version: 3, current: true }
                && c.key.tag == k.tag
        ));
        assert!(update(&mut a, cancel).is_empty());
        assert_eq!(a.popup, None);
    }
    let body = crate::tui::strings::confirm_disable_version_body(3, true);
    assert!(body.contains("current version"), "{body}");
    assert!(
        body.contains("encryption and signing are refused"),
        "{body}"
    );
    assert!(body.contains("rotated"), "{body}");
    let body = crate::tui::strings::confirm_disable_version_body(2, false);
    assert!(!body.contains("current"), "{body}");
}

/// h loads the newest page; scrolling near its end loads the next with before_seq.
#[test]
fn h_pages_history() {
    let mut a = app();
    let k = select(&mut a, "payments");
    assert_eq!(
        update(&mut a, ch('h')),
        [Effect::LoadHistory {
            tag: k.tag.clone(),
            before_seq: None
        }]
    );
    let fx = update(
        &mut a,
        Action::HistoryLoaded {
            tag: k.tag.clone(),
            before_seq: None,
            result: Ok(fake::history(1000, 100)),
        },
    );
    assert!(fx.is_empty());
    assert!(update(&mut a, ch('j')).is_empty());
    let fx = update(&mut a, ch('G'));
    assert_eq!(
        fx,
        [Effect::LoadHistory {
            tag: k.tag.clone(),
            before_seq: Some(901)
        }]
    );
    assert!(update(&mut a, ch('k')).is_empty(), "one request at a time");
    // A page that does not continue the list (stale) is dropped.
    update(
        &mut a,
        Action::HistoryLoaded {
            tag: k.tag.clone(),
            before_seq: Some(5),
            result: Ok(fake::history(4, 3)),
        },
    );
    let Screen::History(h) = &a.screen else {
        panic!()
    };
    assert_eq!(h.entries.len(), 100);
    update(
        &mut a,
        Action::HistoryLoaded {
            tag: k.tag.clone(),
            before_seq: Some(901),
            result: Ok(fake::history(900, 40)),
        },
    );
    let Screen::History(h) = &a.screen else {
        panic!()
    };
    assert_eq!(h.entries.len(), 140);
    assert!(h.exhausted);
    assert!(update(&mut a, ch('G')).is_empty(), "nothing older");
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.screen, Screen::Main);
}

/// An event for the key whose history is shown loads its newest page again (once at a
/// time); the entries newer than those shown go on top, and the selected entry stays
/// selected.
#[test]
fn history_follows_events() {
    let mut a = app();
    let k = select(&mut a, "payments");
    update(&mut a, ch('h'));
    update(
        &mut a,
        Action::HistoryLoaded {
            tag: k.tag.clone(),
            before_seq: None,
            result: Ok(fake::history(50, 50)),
        },
    );
    update(&mut a, ch('j'));
    update(&mut a, ch('j'));
    let reload = Effect::LoadHistory {
        tag: k.tag.clone(),
        before_seq: None,
    };
    let fx = update(&mut a, Action::DaemonEvent(event(EventKind::Rotated, &k)));
    assert!(fx.contains(&reload), "{fx:?}");
    let fx = update(&mut a, Action::DaemonEvent(event(EventKind::Rotated, &k)));
    assert!(!fx.contains(&reload), "one request at a time: {fx:?}");
    // The page answers the first request; the second event's entry may not be in it, so
    // the newest page is read once more.
    let fx = update(
        &mut a,
        Action::HistoryLoaded {
            tag: k.tag.clone(),
            before_seq: None,
            result: Ok(fake::history(52, 52)),
        },
    );
    assert_eq!(
        fx,
        std::slice::from_ref(&reload),
        "the event that came meanwhile is lost"
    );
    let Screen::History(h) = &a.screen else {
        panic!()
    };
    assert_eq!(h.entries.len(), 52);
    assert_eq!(h.entries[0].seq, 52);
    assert_eq!(h.entries[h.selected].seq, 48, "the selection moved");
    let fx = update(
        &mut a,
        Action::HistoryLoaded {
            tag: k.tag.clone(),
            before_seq: None,
            result: Ok(fake::history(53, 53)),
        },
    );
    assert!(fx.is_empty(), "{fx:?}");
    let Screen::History(h) = &a.screen else {
        panic!()
    };
    assert_eq!(h.entries[0].seq, 53);
    assert_eq!(h.entries[h.selected].seq, 48, "the selection moved");
    assert!(!h.loading && h.exhausted);
}

/// An event re-reads its key and raises a notification for state changes.
#[test]
fn events_refetch_and_notify() {
    let mut a = app();
    let k = select(&mut a, "payments");
    let fx = update(
        &mut a,
        Action::DaemonEvent(event(EventKind::StateChanged, &k)),
    );
    assert_eq!(fx.len(), 2);
    assert_eq!(fx[0], Effect::GetKey(k.tag.clone()));
    assert!(
        matches!(&fx[1], Effect::Notify { summary, .. } if summary == "kms: payments is now disabled")
    );
    assert_eq!(a.message.as_ref().unwrap().kind, MsgKind::Event);
    let fx = update(
        &mut a,
        Action::DaemonEvent(event(EventKind::SettingsChanged, &k)),
    );
    assert_eq!(fx, [Effect::GetKey(k.tag.clone())], "no notification");
}

/// A re-read key replaces the old one in place; a vanished or purged key leaves the list.
#[test]
fn fetched_keys_update_the_list() {
    let mut a = app();
    let mut k = select(&mut a, "payments");
    k.state = KeyState::Disabled;
    update(
        &mut a,
        Action::KeyFetched {
            tag: k.tag.clone(),
            result: Ok(Some(k.clone())),
        },
    );
    assert_eq!(a.selected_key().unwrap().state, KeyState::Disabled);
    let gone = a
        .keys
        .iter()
        .find(|k| k.name == "backup-rsa")
        .unwrap()
        .tag
        .clone();
    update(
        &mut a,
        Action::KeyFetched {
            tag: gone,
            result: Ok(None),
        },
    );
    assert_eq!(a.keys.len(), 7);
    assert_eq!(selected_name(&a), "payments", "selection follows the key");
    k.state = KeyState::Deleted;
    update(
        &mut a,
        Action::KeyFetched {
            tag: k.tag.clone(),
            result: Ok(Some(k)),
        },
    );
    assert_eq!(a.keys.len(), 6);
}

/// Lagging behind the event stream reloads the whole list, and the screen open on top
/// of it (its versions may have changed with the events missed).
#[test]
fn lagged_reloads() {
    let mut a = app();
    assert_eq!(
        update(
            &mut a,
            Action::Lagged {
                missed: 12,
                at: fake::BASE
            }
        ),
        [Effect::LoadKeys]
    );
    let k = select(&mut a, "payments");
    update(&mut a, ch('v'));
    assert_eq!(
        update(
            &mut a,
            Action::Lagged {
                missed: 3,
                at: fake::BASE
            }
        ),
        [Effect::LoadKeys, Effect::LoadVersions(k.tag.clone())]
    );
}

/// Losing the daemon shows in the header state; reconnecting reloads the list and view.
#[test]
fn disconnect_and_reconnect() {
    let mut a = app();
    let k = select(&mut a, "payments");
    update(&mut a, ch('v'));
    update(
        &mut a,
        Action::Disconnected {
            reason: "connection closed".into(),
            next: Next::Connect(Duration::from_millis(250)),
        },
    );
    assert!(matches!(a.conn, Conn::Disconnected { .. }));
    let m = a.message.clone().unwrap();
    assert_eq!(m.kind, MsgKind::Error);
    assert_eq!(
        m.text,
        "kmsd is not reachable (connection closed); reconnecting in 1 s"
    );
    assert_eq!(a.keys.len(), 8, "the last known list stays on screen");
    let fx = update(
        &mut a,
        Action::Connected {
            daemon_version: "0.1.1".into(),
            data_dir: Some("/home/alice/.local/share/kms".into()),
            at: fake::BASE,
        },
    );
    assert_eq!(fx, [Effect::LoadKeys, Effect::LoadVersions(k.tag.clone())]);
    assert!(a.is_connected());
}

/// A first connection that follows failed attempts (a daemon not up yet) is no
/// reconnect: nothing was missed, and the message does not say so.
#[test]
fn a_first_connection_after_failures_is_not_a_reconnect() {
    let mut a = App::new((100, 30));
    update(
        &mut a,
        Action::Disconnected {
            reason: "no daemon".into(),
            next: Next::Connect(Duration::from_millis(250)),
        },
    );
    let connected = Action::Connected {
        daemon_version: "0.1.1".into(),
        data_dir: None,
        at: fake::BASE,
    };
    update(&mut a, connected.clone());
    assert_eq!(a.message.as_ref().unwrap().text, "connected to kmsd 0.1.1");
    update(&mut a, lost());
    update(&mut a, connected);
    let said = &a.message.as_ref().unwrap().text;
    assert!(said.contains("while disconnected"), "{said}");
}

/// A reconnect that reaches a daemon serving another data directory (another kmsd was
/// started on the socket) says so, as an error, instead of showing that store's keys as
/// if they were the same; the next reconnect to that daemon is an ordinary one.
#[test]
fn a_reconnect_to_another_store_is_said() {
    let mut a = app();
    let lost = Action::Disconnected {
        reason: "connection closed".into(),
        next: Next::Connect(Duration::from_millis(250)),
    };
    update(&mut a, lost.clone());
    update(
        &mut a,
        Action::Connected {
            daemon_version: "0.1.0".into(),
            data_dir: Some("/var/lib/kms".into()),
            at: fake::BASE,
        },
    );
    let m = a.message.clone().unwrap();
    assert_eq!(m.kind, MsgKind::Error);
    assert!(
        m.text.contains("another key store: /var/lib/kms"),
        "{}",
        m.text
    );
    assert!(
        m.text.contains("was /home/alice/.local/share/kms"),
        "{}",
        m.text
    );
    update(&mut a, lost);
    update(
        &mut a,
        Action::Connected {
            daemon_version: "0.1.0".into(),
            data_dir: Some("/var/lib/kms".into()),
            at: fake::BASE,
        },
    );
    assert_eq!(a.message.clone().unwrap().kind, MsgKind::Info);
}

/// A dashboard that may start kmsd says when it will, and when it does.
#[test]
fn restarting_the_daemon_is_shown() {
    let mut a = app();
    update(
        &mut a,
        Action::Disconnected {
            reason: "connection closed".into(),
            next: Next::Start(Duration::from_millis(3_900)),
        },
    );
    assert_eq!(
        a.message.as_ref().unwrap().text,
        "kmsd is not reachable (connection closed); starting it again in 4 s"
    );
    update(
        &mut a,
        Action::Disconnected {
            reason: "connection closed".into(),
            next: Next::Start(Duration::ZERO),
        },
    );
    assert!(
        a.message
            .as_ref()
            .unwrap()
            .text
            .ends_with("starting it again now"),
        "{:?}",
        a.message
    );
    assert!(update(&mut a, Action::StartingDaemon).is_empty());
    let m = a.message.clone().unwrap();
    assert_eq!(
        (m.kind, m.text.as_str()),
        (MsgKind::Info, "starting kmsd again…")
    );
    assert!(matches!(a.conn, Conn::Disconnected { .. }));
    let fx = update(
        &mut a,
        Action::Connected {
            daemon_version: "0.1.0".into(),
            data_dir: Some("/home/alice/.local/share/kms".into()),
            at: fake::BASE,
        },
    );
    assert_eq!(fx, [Effect::LoadKeys], "the list is loaded again");
}

/// The connection lost, reconnecting soon.
fn lost() -> Action {
    Action::Disconnected {
        reason: "x".into(),
        next: Next::Connect(Duration::from_millis(250)),
    }
}

/// The tick re-reads a small list whole; of a large one the keys on screen, the selected
/// one first (only the selected one was, and the usage counts of the other rows shown
/// stayed as they were until the list was read whole); nothing while disconnected or while
/// a pop-up is open.
#[test]
fn tick_refreshes_usage() {
    let mut a = app();
    assert_eq!(update(&mut a, Action::Tick), [Effect::LoadKeys]);
    let mut big = App::new((80, 24));
    update(
        &mut big,
        Action::Connected {
            daemon_version: "0.1.0".into(),
            data_dir: Some("/home/alice/.local/share/kms".into()),
            at: fake::BASE,
        },
    );
    update(&mut big, Action::KeysLoaded(Ok(fake::many(2_001))));
    for _ in 0..30 {
        update(&mut big, ch('j'));
    }
    let tag = big.selected_key().unwrap().tag.clone();
    let rows = big.list_rows();
    let on_screen: Vec<String> = big.visible[big.offset..big.offset + rows]
        .iter()
        .map(|&i| big.keys[i].tag.clone())
        .collect();
    assert!(
        rows > 5 && big.offset > 0,
        "{rows} rows from {}",
        big.offset
    );
    let read = update(&mut big, Action::Tick);
    assert_eq!(read[0], Effect::GetKey(tag.clone()));
    let mut read: Vec<String> = read
        .into_iter()
        .map(|e| match e {
            Effect::GetKey(t) => t,
            other => panic!("{other:?}"),
        })
        .collect();
    read.sort();
    let mut expected = on_screen;
    expected.sort();
    assert_eq!(read, expected, "every row on screen, each once");
    update(&mut a, ch('?'));
    assert!(update(&mut a, Action::Tick).is_empty());
    update(&mut a, code(KeyCode::Esc));
    update(&mut a, lost());
    assert!(update(&mut a, Action::Tick).is_empty());
}

/// The versions view's selection stays on its version when the list is read again: a
/// rotation puts a new row on top, and space on the row position the cursor had would
/// have toggled the version below the one chosen (found driving the dashboard: a version
/// disabled on purpose was enabled, enabling asks nothing).
#[test]
fn the_versions_selection_follows_its_version() {
    let mut a = app();
    let k = select(&mut a, "payments");
    update(&mut a, ch('v'));
    let loaded = |versions| Action::VersionsLoaded {
        tag: k.tag.clone(),
        result: Ok(versions),
    };
    update(&mut a, loaded(fake::versions()));
    update(&mut a, ch('G'));
    let selected = |a: &App| match &a.screen {
        Screen::Versions(v) => v.versions.as_ref().unwrap()[v.selected].version,
        other => panic!("{other:?}"),
    };
    assert_eq!(selected(&a), 1);
    let mut rotated = fake::versions();
    rotated.push(kms_shared::model::VersionInfo {
        version: 4,
        enabled: true,
        created_at: fake::BASE,
        encryptions: 0,
    });
    update(&mut a, loaded(rotated));
    assert_eq!(selected(&a), 1, "the cursor moved to another version");
    // Space now toggles v1 (disabled: enabled again), not v2.
    assert!(
        update(&mut a, ch(' '))
            .iter()
            .any(|e| matches!(e, Effect::SetVersionEnabled { version: 1, .. })),
        "{:?}",
        a.screen
    );
}

/// Usage changes without events, so the tick also re-reads the open versions view (a
/// version's encryption count) and the newest page of the open history (one request at
/// a time). Before, both stayed as they were opened while the list's counts moved on.
#[test]
fn tick_refreshes_the_open_versions_and_history() {
    let mut a = app();
    let k = select(&mut a, "payments");
    update(&mut a, ch('v'));
    let loaded = || Action::VersionsLoaded {
        tag: k.tag.clone(),
        result: Ok(Vec::new()),
    };
    // Not while the view's first load is on its way, and one refresh at a time; a load
    // that failed is asked for again.
    assert_eq!(update(&mut a, Action::Tick), [Effect::LoadKeys]);
    update(
        &mut a,
        Action::VersionsLoaded {
            tag: k.tag.clone(),
            result: Err("internal: the store is busy".into()),
        },
    );
    assert_eq!(
        update(&mut a, Action::Tick),
        [Effect::LoadKeys, Effect::LoadVersions(k.tag.clone())]
    );
    update(&mut a, loaded());
    assert_eq!(
        update(&mut a, Action::Tick),
        [Effect::LoadKeys, Effect::LoadVersions(k.tag.clone())]
    );
    assert_eq!(update(&mut a, Action::Tick), [Effect::LoadKeys]);
    update(&mut a, loaded());
    assert_eq!(
        update(&mut a, Action::Tick),
        [Effect::LoadKeys, Effect::LoadVersions(k.tag.clone())]
    );
    update(&mut a, code(KeyCode::Esc));
    update(&mut a, ch('h'));
    let newest = Effect::LoadHistory {
        tag: k.tag.clone(),
        before_seq: None,
    };
    // The first page is still loading: read again once it is in.
    assert_eq!(update(&mut a, Action::Tick), [Effect::LoadKeys]);
    let fx = update(
        &mut a,
        Action::HistoryLoaded {
            tag: k.tag.clone(),
            before_seq: None,
            result: Ok(fake::history(10, 10)),
        },
    );
    assert_eq!(fx, std::slice::from_ref(&newest));
    update(
        &mut a,
        Action::HistoryLoaded {
            tag: k.tag.clone(),
            before_seq: None,
            result: Ok(fake::history(11, 11)),
        },
    );
    assert_eq!(update(&mut a, Action::Tick), [Effect::LoadKeys, newest]);
}

/// A purge of the key whose versions are open closes the view and says why: it went on
/// listing versions that no longer exist, and acting on a key no longer in the list.
#[test]
fn a_purge_closes_its_keys_versions_view() {
    let mut a = app();
    let k = select(&mut a, "payments");
    update(&mut a, ch('v'));
    update(&mut a, Action::DaemonEvent(event(EventKind::Purged, &k)));
    assert_eq!(a.screen, Screen::Main);
    let m = a.message.as_ref().unwrap();
    assert!(m.text.contains("payments was purged"), "{}", m.text);
    // Another key's purge leaves the view open.
    let other = select(&mut a, "jwt-signing");
    update(&mut a, ch('v'));
    update(&mut a, Action::DaemonEvent(event(EventKind::Purged, &k)));
    assert!(matches!(&a.screen, Screen::Versions(v) if v.tag == other.tag));
}

/// Rotating a key already at its version limit is refused at once, saying why, instead
/// of asking to confirm a rotation the daemon then refuses.
#[test]
fn rotation_at_the_version_limit_is_refused_up_front() {
    let mut a = app();
    let mut k = select(&mut a, "payments");
    k.current_version = k.protection.max_versions();
    a.upsert_key(k.clone());
    select(&mut a, "payments");
    assert!(update(&mut a, ch('r')).is_empty());
    assert!(a.popup.is_none());
    let m = a.message.as_ref().unwrap();
    assert!(m.text.contains("cannot be rotated"), "{}", m.text);
    k.current_version -= 1;
    a.upsert_key(k);
    select(&mut a, "payments");
    update(&mut a, ch('r'));
    assert!(matches!(a.popup, Some(Popup::Confirm(_))));
}

/// A change of a key waits for the answer to the one sent before (a slow or stopped daemon
/// seemed to ignore the first press, and carried out both once it answered): the second
/// is held back and says why; once the first is answered, the key takes changes again.
#[test]
fn a_key_takes_one_change_at_a_time() {
    let mut a = app();
    let k = select(&mut a, "payments");
    let rotate = |a: &mut App| {
        update(a, ch('r'));
        update(a, ch('y'))
    };
    assert_eq!(rotate(&mut a), [op(Op::Rotate, &k)]);
    assert_eq!(
        a.message.as_ref().unwrap().text,
        "changing payments: waiting for kmsd…"
    );
    assert!(rotate(&mut a).is_empty(), "a second rotation was sent");
    let m = a.message.as_ref().unwrap();
    assert_eq!(m.kind, MsgKind::Error);
    assert!(m.text.contains("still waiting for kmsd"), "{}", m.text);
    // A pop-up asking for a change of the key stays open, with what was typed in it.
    update(&mut a, code(KeyCode::Esc));
    update(&mut a, ch('m'));
    typed(&mut a, "held");
    assert!(update(&mut a, code(KeyCode::Enter)).is_empty());
    assert!(
        matches!(&a.popup, Some(Popup::Prompt(p)) if p.text.ends_with("held")),
        "{:?}",
        a.popup
    );
    update(&mut a, code(KeyCode::Esc));
    // Another key is not held up.
    let other = select(&mut a, "jwt-signing");
    assert_eq!(rotate(&mut a), [op(Op::Rotate, &other)]);
    // Answered (a failure counts): payments takes changes again.
    select(&mut a, "payments");
    update(
        &mut a,
        Action::OpDone {
            op: Op::Rotate,
            tag: k.tag.clone(),
            name: k.name.clone(),
            result: Err("internal: the disk is full".into()),
        },
    );
    assert_eq!(rotate(&mut a), [op(Op::Rotate, &k)]);
}

/// A finished operation updates the key and says so; a failure says why.
#[test]
fn op_results_reach_the_message_line() {
    let mut a = app();
    let mut k = select(&mut a, "payments");
    k.current_version = 4;
    update(
        &mut a,
        Action::OpDone {
            op: Op::Rotate,
            tag: k.tag.clone(),
            name: k.name.clone(),
            result: Ok(k.clone()),
        },
    );
    assert_eq!(a.selected_key().unwrap().current_version, 4);
    assert_eq!(
        a.message.as_ref().unwrap().text,
        "rotated payments: v4 is current"
    );
    update(
        &mut a,
        Action::OpDone {
            op: Op::Disable,
            tag: k.tag.clone(),
            name: k.name.clone(),
            result: Err("permission-denied: key-reviewer may not disable".into()),
        },
    );
    let m = a.message.as_ref().unwrap();
    assert_eq!(m.kind, MsgKind::Error);
    assert_eq!(
        m.text,
        "could not disable payments: permission-denied: key-reviewer may not disable"
    );
}

/// With no keys, key actions say there is nothing selected instead of doing anything.
#[test]
fn actions_without_keys() {
    let mut a = App::new((80, 24));
    update(&mut a, Action::KeysLoaded(Ok(Vec::new())));
    for c in ['r', 'd', 'e', 'x', 'u', 'D', 'a', 'p', 'm', 'v', 'h'] {
        assert!(update(&mut a, ch(c)).is_empty(), "{c}");
        assert_eq!(a.popup, None);
        assert_eq!(a.screen, Screen::Main);
    }
    assert_eq!(a.message.as_ref().unwrap().kind, MsgKind::Error);
}

// Permissions (grants) view.

fn grants_view(a: &App) -> &GrantsView {
    match &a.screen {
        Screen::Grants(g) => g,
        other => panic!("not the permissions view: {other:?}"),
    }
}

fn grant_form(a: &App) -> &GrantForm {
    match &a.popup {
        Some(Popup::Grant(f)) => f,
        other => panic!("no grant form: {other:?}"),
    }
}

/// The permissions view opened with P on `name`, its grants loaded.
fn permissions_on(name: &str) -> App {
    let mut a = app();
    select(&mut a, name);
    update(&mut a, ch('P'));
    update(&mut a, Action::GrantsLoaded(Ok(fake::grants())));
    a
}

/// P opens the permissions view and loads the grants; they show once they arrive, the
/// selection moves over them, esc goes back where P was pressed.
#[test]
fn p_opens_permissions_and_loads_grants() {
    let mut a = app();
    let k = select(&mut a, "payments");
    assert_eq!(update(&mut a, ch('P')), [Effect::LoadGrants]);
    let g = grants_view(&a);
    assert_eq!(g.grants, None, "loading");
    assert_eq!(g.back, Base::Main);
    assert_eq!(g.key.as_ref().map(|k| k.tag.as_str()), Some(k.tag.as_str()));
    update(&mut a, Action::GrantsLoaded(Ok(fake::grants())));
    assert_eq!(grants_view(&a).len(), 5);
    update(&mut a, ch('j'));
    update(&mut a, code(KeyCode::Down));
    assert_eq!(grants_view(&a).selected_grant().unwrap().id, 3);
    update(&mut a, ch('G'));
    assert_eq!(grants_view(&a).selected, 4);
    update(&mut a, code(KeyCode::PageUp));
    update(&mut a, ch('k'));
    assert_eq!(grants_view(&a).selected, 0, "stops at the top");
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.screen, Screen::Main);
    // From the details screen esc returns to the details.
    update(&mut a, code(KeyCode::Enter));
    update(&mut a, ch('P'));
    assert_eq!(grants_view(&a).back, Base::Details);
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.screen, Screen::Details);
}

/// A reload keeps the selection on the same grant; a failed load says why in the view.
#[test]
fn grants_reload_keeps_selection_and_shows_errors() {
    let mut a = permissions_on("payments");
    update(&mut a, ch('j'));
    update(&mut a, ch('j'));
    let mut fewer = fake::grants();
    fewer.remove(0);
    update(&mut a, Action::GrantsLoaded(Ok(fewer)));
    assert_eq!(grants_view(&a).selected_grant().unwrap().id, 3);
    update(
        &mut a,
        Action::GrantsLoaded(Err("permission-denied: list_grants needs manager".into())),
    );
    let g = grants_view(&a);
    assert_eq!(
        g.error.as_deref(),
        Some("permission-denied: list_grants needs manager")
    );
    assert_eq!(g.len(), 4, "the last list stays");
}

/// The grant form starts at key-user for the selected key; ←→ cycle the role, and the
/// spec names the user and the key's tag.
#[test]
fn grant_form_grants_a_user_on_the_selected_key() {
    let mut a = permissions_on("payments");
    let tag = a.key_by_tag(&fake::tag(1)).unwrap().tag.clone();
    assert!(update(&mut a, ch('n')).is_empty());
    let f = grant_form(&a);
    assert_eq!(
        (f.focus, f.role, f.kind),
        (GrantField::Role, Role::KeyUser, PrincipalKind::User)
    );
    assert!(f.one_key);
    update(&mut a, code(KeyCode::Right));
    assert_eq!(grant_form(&a).role, Role::Manager, "wraps around Role::ALL");
    update(&mut a, code(KeyCode::Left));
    update(&mut a, code(KeyCode::Left));
    assert_eq!(grant_form(&a).role, Role::KeyReviewer);
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, code(KeyCode::Tab));
    assert_eq!(grant_form(&a).focus, GrantField::Name);
    typed(&mut a, "alice");
    let fx = update(&mut a, code(KeyCode::Enter));
    assert_eq!(
        fx,
        [Effect::Grant(GrantSpec {
            role: Role::KeyReviewer,
            user: Some("alice".into()),
            group: None,
            key: Some(tag),
        })]
    );
    assert!(grant_form(&a).submitting);
    assert!(
        update(&mut a, code(KeyCode::Enter)).is_empty(),
        "no double submit"
    );
    let mut g = fake::grants()[1].clone();
    g.role = Role::KeyReviewer;
    g.principal = kms_shared::model::Principal::User("alice".into());
    let fx = update(&mut a, Action::Granted(Ok(g)));
    assert_eq!(fx, [Effect::LoadGrants], "the list is re-read");
    assert_eq!(a.popup, None);
    let m = a.message.as_ref().unwrap();
    assert_eq!(m.kind, MsgKind::Success);
    assert_eq!(m.text, "granted key-reviewer for user alice on payments");
}

/// A group on all keys: the kind and the scope are cycled with space.
#[test]
fn grant_form_grants_a_group_on_all_keys() {
    let mut a = permissions_on("payments");
    update(&mut a, ch('n'));
    update(&mut a, code(KeyCode::Down));
    update(&mut a, ch(' '));
    assert_eq!(grant_form(&a).kind, PrincipalKind::Group);
    update(&mut a, code(KeyCode::Down));
    typed(&mut a, "ops");
    update(&mut a, code(KeyCode::Down));
    assert_eq!(grant_form(&a).focus, GrantField::Scope);
    update(&mut a, ch(' '));
    assert!(!grant_form(&a).one_key);
    let fx = update(&mut a, code(KeyCode::Enter));
    assert_eq!(
        fx,
        [Effect::Grant(GrantSpec {
            role: Role::KeyUser,
            user: None,
            group: Some("ops".into()),
            key: None,
        })]
    );
}

/// Without keys there is no key to offer: the scope is all keys and cannot change.
#[test]
fn grant_form_without_a_key_is_for_all_keys() {
    let mut a = App::new((80, 24));
    update(&mut a, Action::KeysLoaded(Ok(Vec::new())));
    assert_eq!(update(&mut a, ch('P')), [Effect::LoadGrants]);
    update(&mut a, ch('n'));
    assert!(!grant_form(&a).one_key);
    update(&mut a, code(KeyCode::BackTab));
    assert_eq!(grant_form(&a).focus, GrantField::Scope);
    update(&mut a, ch(' '));
    assert!(grant_form(&a).scope_key().is_none());
    update(&mut a, code(KeyCode::BackTab));
    typed(&mut a, "root");
    let fx = update(&mut a, code(KeyCode::Enter));
    assert!(
        matches!(&fx[..], [Effect::Grant(GrantSpec { key: None, user: Some(u), .. })] if u == "root")
    );
}

/// An empty name is refused locally and flagged; the daemon's refusal lands in the form,
/// or on the message line if the form was closed meanwhile.
#[test]
fn grant_errors_land_in_the_form() {
    let mut a = permissions_on("payments");
    update(&mut a, ch('n'));
    assert_eq!(grant_form(&a).shown_name_error(), None, "untouched");
    assert!(update(&mut a, code(KeyCode::Enter)).is_empty());
    assert!(
        grant_form(&a)
            .shown_name_error()
            .unwrap()
            .contains("name the user")
    );
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, code(KeyCode::Tab));
    typed(&mut a, "a b");
    assert!(update(&mut a, code(KeyCode::Enter)).is_empty());
    update(&mut a, code(KeyCode::Backspace));
    update(&mut a, code(KeyCode::Backspace));
    typed(&mut a, "nobody");
    assert_eq!(update(&mut a, code(KeyCode::Enter)).len(), 1);
    update(
        &mut a,
        Action::Granted(Err("invalid-argument: no user named \"anobody\"".into())),
    );
    let f = grant_form(&a);
    assert_eq!(
        f.daemon_error.as_deref(),
        Some("invalid-argument: no user named \"anobody\"")
    );
    assert!(!f.submitting);
    update(&mut a, code(KeyCode::Enter));
    update(&mut a, code(KeyCode::Esc));
    assert!(
        matches!(a.screen, Screen::Grants(_)),
        "esc closes only the form"
    );
    update(
        &mut a,
        Action::Granted(Err("permission-denied: grant needs manager".into())),
    );
    let m = a.message.as_ref().unwrap();
    assert_eq!(m.kind, MsgKind::Error);
    assert_eq!(
        m.text,
        "could not grant: permission-denied: grant needs manager"
    );
}

/// x (or Delete) asks, naming role, principal and scope; y revokes exactly that grant.
#[test]
fn x_confirms_then_revokes_the_grant() {
    let mut a = permissions_on("jwt-signing");
    update(&mut a, ch('j'));
    let billing = fake::grants()[1].clone();
    assert!(update(&mut a, ch('x')).is_empty());
    assert_eq!(a.popup, Some(Popup::Ask(Ask::Revoke(billing.clone()))));
    let body = crate::tui::strings::revoke_body(&billing);
    for part in ["key-user", "user billing", "payments"] {
        assert!(body.contains(part), "{part} in {body}");
    }
    assert!(update(&mut a, ch('n')).is_empty());
    assert_eq!(a.popup, None);
    update(&mut a, code(KeyCode::Delete));
    let fx = update(&mut a, ch('y'));
    assert_eq!(
        fx,
        [Effect::Revoke(GrantSpec {
            role: Role::KeyUser,
            user: Some("billing".into()),
            group: None,
            key: Some(fake::tag(1)),
        })]
    );
    assert_eq!(a.popup, None);
    let fx = update(
        &mut a,
        Action::Revoked {
            spec: GrantSpec {
                role: Role::KeyUser,
                user: Some("billing".into()),
                group: None,
                key: Some(fake::tag(1)),
            },
            result: Ok(billing),
        },
    );
    assert_eq!(fx, [Effect::LoadGrants]);
    assert_eq!(
        a.message.as_ref().unwrap().text,
        "revoked key-user for user billing on payments"
    );
}

/// A group's grant on all keys revokes with the group and no key; a refusal says why.
#[test]
fn revoking_a_group_grant_and_its_refusal() {
    let mut a = permissions_on("payments");
    update(&mut a, ch('x'));
    let fx = update(&mut a, ch('y'));
    let spec = GrantSpec {
        role: Role::Manager,
        user: None,
        group: Some("kms-admins".into()),
        key: None,
    };
    assert_eq!(fx, [Effect::Revoke(spec.clone())]);
    let fx = update(
        &mut a,
        Action::Revoked {
            spec,
            result: Err("permission-denied: revoke needs manager".into()),
        },
    );
    assert!(fx.is_empty());
    let m = a.message.as_ref().unwrap();
    assert_eq!(m.kind, MsgKind::Error);
    assert_eq!(
        m.text,
        "could not revoke manager for group kms-admins on all keys: permission-denied: revoke needs manager"
    );
}

/// x with nothing loaded says there is nothing to revoke.
#[test]
fn x_without_grants() {
    let mut a = app();
    update(&mut a, ch('P'));
    assert!(update(&mut a, ch('x')).is_empty());
    assert_eq!(a.popup, None);
    assert_eq!(a.message.as_ref().unwrap().kind, MsgKind::Error);
}

fn permission_event() -> Event {
    Event {
        seq: 9,
        time: fake::BASE,
        kind: EventKind::PermissionChanged,
        key_tag: None,
        key_name: None,
        version: None,
        state: None,
        account: "bob".into(),
        message: "granted key-user to user carol".into(),
    }
}

/// Another manager's grant or revoke reloads the open permissions view, and only it.
#[test]
fn permission_event_reloads_the_grants() {
    let mut a = permissions_on("payments");
    let fx = update(&mut a, Action::DaemonEvent(permission_event()));
    assert!(fx.contains(&Effect::LoadGrants), "{fx:?}");
    update(&mut a, code(KeyCode::Esc));
    let fx = update(&mut a, Action::DaemonEvent(permission_event()));
    assert!(!fx.contains(&Effect::LoadGrants), "{fx:?}");
}

/// A grant or revoke changes which keys this account sees: the list is read again (it
/// kept keys whose role was revoked until the next full reload). Not the key alone: a
/// revoked account's re-read of it would be refused, and the refusal recorded in the
/// key's history as if it had tried to get in.
#[test]
fn permission_events_reload_the_list() {
    let mut a = app();
    let fx = update(&mut a, Action::DaemonEvent(permission_event()));
    assert!(fx.contains(&Effect::LoadKeys), "{fx:?}");
    let k = select(&mut a, "payments");
    let on_key = Event {
        key_tag: Some(k.tag.clone()),
        key_name: Some(k.name.clone()),
        ..permission_event()
    };
    let fx = update(&mut a, Action::DaemonEvent(on_key));
    assert!(fx.contains(&Effect::LoadKeys), "{fx:?}");
    assert!(!fx.contains(&Effect::GetKey(k.tag.clone())), "{fx:?}");
}

/// A reconnect re-reads the open view: grants, or tokens.
#[test]
fn reconnect_reloads_grants_and_tokens() {
    let mut a = permissions_on("payments");
    let connected = || Action::Connected {
        daemon_version: "0.1.1".into(),
        data_dir: Some("/home/alice/.local/share/kms".into()),
        at: fake::BASE,
    };
    update(&mut a, lost());
    assert_eq!(
        update(&mut a, connected()),
        [Effect::LoadKeys, Effect::LoadGrants]
    );
    // Events of the time away were not seen: the message says so.
    let said = &a.message.as_ref().unwrap().text;
    assert!(said.contains("while disconnected"), "{said}");
    update(&mut a, code(KeyCode::Esc));
    update(&mut a, ch('T'));
    update(&mut a, lost());
    assert_eq!(
        update(&mut a, connected()),
        [Effect::LoadKeys, Effect::LoadHsmTokens]
    );
}

// HSM tokens view.

fn token_form(a: &App) -> &TokenForm {
    match &a.popup {
        Some(Popup::Token(f)) => f,
        other => panic!("no register form: {other:?}"),
    }
}

fn tokens_open() -> App {
    let mut a = app();
    update(&mut a, ch('T'));
    update(&mut a, Action::HsmTokensLoaded(Ok(fake::tokens())));
    a
}

/// T opens the tokens view and loads the list, which the app keeps; esc goes back.
#[test]
fn t_opens_tokens_and_loads_them() {
    let mut a = app();
    assert_eq!(update(&mut a, ch('T')), [Effect::LoadHsmTokens]);
    assert!(matches!(&a.screen, Screen::Tokens(t) if t.back == Base::Main));
    assert_eq!(a.hsm_tokens.list, None);
    update(&mut a, Action::HsmTokensLoaded(Ok(fake::tokens())));
    assert_eq!(a.hsm_tokens.len(), 2);
    update(&mut a, ch('j'));
    assert!(matches!(&a.screen, Screen::Tokens(t) if t.selected == 1));
    update(
        &mut a,
        Action::HsmTokensLoaded(Err("permission-denied: hsm_list needs manager".into())),
    );
    assert!(a.hsm_tokens.error.as_deref().unwrap().contains("hsm_list"));
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.screen, Screen::Main);
}

/// The tick reads the open tokens view again: a purged key's token objects are destroyed
/// after the purge's event (whose re-read showed the count before), and a token another
/// client registers raises no event (found driving the dashboard: a stale count of 1,
/// and `x` claiming the token still held a key).
#[test]
fn tick_refreshes_the_open_tokens_view() {
    let mut a = tokens_open();
    assert!(update(&mut a, Action::Tick).contains(&Effect::LoadHsmTokens));
    update(&mut a, code(KeyCode::Esc));
    assert!(!update(&mut a, Action::Tick).contains(&Effect::LoadHsmTokens));
}

/// n opens the register form; its four fields go into HsmAdd; success closes the form
/// and re-reads the list.
#[test]
fn register_form_adds_a_token() {
    let mut a = tokens_open();
    update(&mut a, ch('n'));
    assert_eq!(token_form(&a).focus, TokenField::Name);
    typed(&mut a, "vault-c");
    update(&mut a, code(KeyCode::Tab));
    typed(&mut a, "/usr/lib/softhsm/libsofthsm2.so");
    update(&mut a, code(KeyCode::Down));
    typed(&mut a, "tenant c");
    update(&mut a, code(KeyCode::Tab));
    typed(&mut a, "/etc/kms/c.pin");
    assert_eq!(token_form(&a).focus, TokenField::PinFile);
    let fx = update(&mut a, code(KeyCode::Enter));
    assert_eq!(
        fx,
        [Effect::HsmAdd {
            name: "vault-c".into(),
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token: "tenant c".into(),
            pin_file: "/etc/kms/c.pin".into(),
        }]
    );
    assert!(token_form(&a).submitting);
    let mut t = fake::tokens()[0].clone();
    t.name = "vault-c".into();
    t.token = "tenant c".into();
    let fx = update(&mut a, Action::HsmAdded(Ok(t)));
    assert_eq!(fx, [Effect::LoadHsmTokens]);
    assert_eq!(a.popup, None);
    assert_eq!(
        a.message.as_ref().unwrap().text,
        "registered HSM token vault-c (token tenant c)"
    );
}

/// What can be checked here is checked before sending; the daemon's refusal (a wrong
/// PIN, say) shows in the form.
#[test]
fn register_form_rules_and_refusal() {
    let mut a = tokens_open();
    update(&mut a, ch('n'));
    assert!(update(&mut a, code(KeyCode::Enter)).is_empty());
    let f = token_form(&a);
    assert!(f.show_all);
    assert!(
        f.shown_error(TokenField::Name)
            .unwrap()
            .contains("HSM token name")
    );
    assert!(
        f.shown_error(TokenField::Module)
            .unwrap()
            .contains("absolute")
    );
    assert!(f.shown_error(TokenField::Label).is_some());
    assert!(
        f.shown_error(TokenField::PinFile)
            .unwrap()
            .contains("absolute")
    );
    typed(&mut a, "vault-c");
    update(&mut a, code(KeyCode::Tab));
    typed(&mut a, "/m.so");
    update(&mut a, code(KeyCode::Tab));
    typed(&mut a, "t");
    update(&mut a, code(KeyCode::Tab));
    typed(&mut a, "pin");
    assert!(
        update(&mut a, code(KeyCode::Enter)).is_empty(),
        "relative PIN file"
    );
    for _ in 0..3 {
        update(&mut a, code(KeyCode::Backspace));
    }
    typed(&mut a, "/pin");
    assert_eq!(update(&mut a, code(KeyCode::Enter)).len(), 1);
    update(
        &mut a,
        Action::HsmAdded(Err(
            "invalid-argument: cannot register HSM token vault-c: the PIN is wrong".into(),
        )),
    );
    let f = token_form(&a);
    assert!(!f.submitting);
    assert!(f.daemon_error.as_deref().unwrap().contains("PIN is wrong"));
}

/// x asks before removing; y sends the removal; the daemon's refusal (keys still on the
/// token) reaches the message line.
#[test]
fn x_confirms_then_removes_the_token() {
    let mut a = tokens_open();
    assert!(update(&mut a, ch('x')).is_empty());
    assert_eq!(
        a.popup,
        Some(Popup::Ask(Ask::RemoveToken(fake::tokens()[0].clone())))
    );
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.popup, None);
    update(&mut a, code(KeyCode::Delete));
    assert_eq!(
        update(&mut a, ch('y')),
        [Effect::HsmRemove("vault-a".into())]
    );
    let fx = update(
        &mut a,
        Action::HsmRemoved {
            name: "vault-a".into(),
            result: Err("invalid-state: HSM token vault-a still holds 1 key(s) not purged".into()),
        },
    );
    assert!(fx.is_empty());
    let m = a.message.as_ref().unwrap();
    assert_eq!(m.kind, MsgKind::Error);
    assert!(
        m.text
            .starts_with("could not remove HSM token vault-a: invalid-state"),
        "{}",
        m.text
    );
    update(&mut a, ch('j'));
    update(&mut a, ch('x'));
    update(&mut a, ch('y'));
    let fx = update(
        &mut a,
        Action::HsmRemoved {
            name: "vault-b".into(),
            result: Ok(fake::tokens()[1].clone()),
        },
    );
    assert_eq!(fx, [Effect::LoadHsmTokens]);
    assert_eq!(
        a.message.as_ref().unwrap().text,
        "removed HSM token vault-b"
    );
}

/// The create form loads the tokens when it opens; with dedicated-hsm ←→ pick one and
/// the request carries it. Other protections skip the field and send no token.
#[test]
fn create_form_picks_a_token_for_dedicated_hsm() {
    let mut a = app();
    assert_eq!(update(&mut a, ch('c')), [Effect::LoadHsmTokens]);
    assert_eq!(form(&a).tokens, TokenChoices::Loading);
    update(&mut a, Action::HsmTokensLoaded(Ok(fake::tokens())));
    assert_eq!(
        form(&a).tokens,
        TokenChoices::Loaded(vec!["vault-a".into(), "vault-b".into()])
    );
    assert_eq!(form(&a).token.as_deref(), Some("vault-a"));
    typed(&mut a, "orders");
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, code(KeyCode::Tab));
    assert_eq!(form(&a).focus, Field::Protection);
    update(&mut a, code(KeyCode::Tab));
    assert_eq!(form(&a).focus, Field::Convergent, "no token for basic keys");
    update(&mut a, code(KeyCode::BackTab));
    update(&mut a, code(KeyCode::Left));
    assert_eq!(form(&a).protection, Protection::DedicatedHsm);
    assert_eq!(form(&a).shown_error(Field::Token, false), None);
    update(&mut a, code(KeyCode::Tab));
    assert_eq!(form(&a).focus, Field::Token);
    update(&mut a, code(KeyCode::Right));
    assert_eq!(form(&a).token.as_deref(), Some("vault-b"));
    update(&mut a, ch(' '));
    update(&mut a, code(KeyCode::Left));
    assert_eq!(
        form(&a).token.as_deref(),
        Some("vault-b"),
        "wraps both ways"
    );
    let fx = update(&mut a, code(KeyCode::Enter));
    assert_eq!(
        fx,
        [Effect::Create(CreateKey {
            name: "orders".into(),
            key_type: KeyType::Aes256,
            protection: Protection::DedicatedHsm,
            convergent: false,
            auto_rotation: false,
            rotation_days: Some(90),
            memo: String::new(),
            hsm: Some("vault-b".into()),
        })]
    );
    // The same form with hsm protection sends no token.
    let mut a = app();
    update(&mut a, ch('c'));
    update(&mut a, Action::HsmTokensLoaded(Ok(fake::tokens())));
    typed(&mut a, "orders");
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, code(KeyCode::Right));
    let fx = update(&mut a, code(KeyCode::Enter));
    assert!(
        matches!(&fx[..], [Effect::Create(c)] if c.protection == Protection::Hsm && c.hsm.is_none()),
        "{fx:?}"
    );
}

/// With no token registered, dedicated-hsm shows the rule at once and submit is refused
/// locally; a token registered meanwhile is picked up when the list arrives.
#[test]
fn create_form_without_tokens_refuses_dedicated_hsm() {
    let mut a = app();
    update(&mut a, ch('c'));
    update(&mut a, Action::HsmTokensLoaded(Ok(Vec::new())));
    typed(&mut a, "orders");
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, code(KeyCode::Left));
    assert_eq!(form(&a).protection, Protection::DedicatedHsm);
    let err = form(&a).shown_error(Field::Token, false).unwrap();
    assert!(err.contains("register one in the tokens view"), "{err}");
    assert!(err.contains('T'), "{err}");
    assert!(update(&mut a, code(KeyCode::Enter)).is_empty());
    assert!(form(&a).show_all);
    update(&mut a, Action::HsmTokensLoaded(Ok(fake::tokens())));
    assert_eq!(form(&a).shown_error(Field::Token, false), None);
    let fx = update(&mut a, code(KeyCode::Enter));
    assert!(
        matches!(&fx[..], [Effect::Create(c)] if c.hsm.as_deref() == Some("vault-a")),
        "{fx:?}"
    );
}

/// A failed token load is a rule error of dedicated-hsm, not a silent empty list.
#[test]
fn create_form_token_load_failure() {
    let mut a = app();
    update(&mut a, ch('c'));
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, code(KeyCode::Left));
    let err = form(&a).shown_error(Field::Token, false).unwrap();
    assert!(err.contains("still loading"), "{err}");
    update(
        &mut a,
        Action::HsmTokensLoaded(Err("not connected to kmsd".into())),
    );
    let err = form(&a).shown_error(Field::Token, false).unwrap();
    assert!(err.contains("not connected"), "{err}");
}

/// A refusal long enough to wrap onto three rows at 80 columns.
const LONG_ERROR: &str = "failed-precondition: HSM token vault-a (label tenant-a) refused the \
     login: the PIN file /etc/kms/hsm/vault-a.pin is not readable by kmsd; give it mode 0400 \
     and owner kms";

fn refuse_rotation(a: &mut App) {
    update(
        a,
        Action::OpDone {
            op: Op::Rotate,
            tag: "partner-sso-tag".into(),
            name: "partner-sso".into(),
            result: Err(LONG_ERROR.into()),
        },
    );
}

/// A long message takes the rows it needs from the list (up to a third of the screen),
/// and the list scrolls so that the selected key stays in view; a short one gives them
/// back.
#[test]
fn long_message_takes_rows_from_the_list() {
    let mut a = App::new((80, 24));
    update(&mut a, Action::KeysLoaded(Ok(fake::many(100))));
    assert_eq!(a.message_rows(), 1);
    assert_eq!(a.list_rows(), 12);
    // The last row of the page.
    for _ in 0..11 {
        update(&mut a, ch('j'));
    }
    assert_eq!((a.selected, a.offset), (11, 0));

    refuse_rotation(&mut a);
    assert_eq!(a.message_rows(), 3);
    assert_eq!(a.list_rows(), 10);
    assert_eq!(
        (a.selected, a.offset),
        (11, 2),
        "the selection stays in view"
    );

    // The filter being typed is one row; the message comes back after it.
    update(&mut a, ch('/'));
    assert_eq!(a.message_rows(), 1);
    update(&mut a, code(KeyCode::Enter));
    assert_eq!(a.message_rows(), 3);

    // At most a third of the screen, however narrow.
    update(&mut a, Action::Resize(30, 12));
    assert_eq!(a.message_rows(), 4);

    update(&mut a, Action::Resize(80, 24));
    update(
        &mut a,
        Action::Lagged {
            missed: 3,
            at: fake::BASE,
        },
    );
    assert_eq!(a.message_rows(), 1);
    assert_eq!(a.list_rows(), 12);
}

/// M shows the last message in full: a copy that a live event does not replace, scrolled
/// with the movement keys no further than its end, closed with esc or M.
#[test]
fn m_shows_the_last_message_in_full() {
    let mut a = app();
    a.message = None;
    update(&mut a, ch('M'));
    assert_eq!(a.popup, None, "nothing to show");

    refuse_rotation(&mut a);
    let shown = a.message.clone().unwrap();
    update(&mut a, ch('M'));
    let full = |a: &App| match &a.popup {
        Some(Popup::Message(m)) => m.clone(),
        other => panic!("no message pop-up: {other:?}"),
    };
    assert_eq!(full(&a).message, shown);
    assert_eq!(a.mode(), Mode::Message);

    let k = select(&mut a, "payments");
    update(
        &mut a,
        Action::DaemonEvent(event(EventKind::StateChanged, &k)),
    );
    assert_eq!(full(&a).message, shown, "the text being read stays");

    // Fits at 80×24: nothing to scroll.
    update(&mut a, ch('j'));
    assert_eq!(full(&a).scroll, 0);
    // On a small screen it scrolls down to its last line and back.
    update(&mut a, Action::Resize(30, 8));
    update(&mut a, code(KeyCode::Down));
    assert_eq!(full(&a).scroll, 1);
    update(&mut a, code(KeyCode::End));
    let last = full(&a).scroll;
    assert!(last > 1);
    update(&mut a, code(KeyCode::PageDown));
    update(&mut a, ch('j'));
    assert_eq!(full(&a).scroll, last, "no further than the end");
    update(&mut a, ch('g'));
    assert_eq!(full(&a).scroll, 0);

    for close in [code(KeyCode::Esc), ch('M')] {
        update(&mut a, close);
        assert_eq!(a.popup, None);
        update(&mut a, ch('M'));
        assert!(matches!(a.popup, Some(Popup::Message(_))));
    }
}

fn ctrl(c: char) -> Action {
    Action::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL))
}

/// Text fields edit at a cursor: ←/→, Home/End and ctrl-a/ctrl-e move it, Delete removes
/// the character after it, ctrl-u everything before it. They used to take only typing and
/// Backspace at the end. In the create form ←/→ still change the fields that are not text.
#[test]
fn text_fields_edit_at_the_cursor() {
    let mut a = app();
    update(&mut a, ch('c'));
    typed(&mut a, "pamnts");
    for _ in 0..4 {
        update(&mut a, code(KeyCode::Left));
    }
    typed(&mut a, "y");
    assert_eq!(form(&a).name, "paymnts");
    update(&mut a, code(KeyCode::Right));
    typed(&mut a, "e");
    assert_eq!(form(&a).name, "payments");
    update(&mut a, code(KeyCode::Home));
    update(&mut a, code(KeyCode::Delete));
    typed(&mut a, "P");
    assert_eq!(form(&a).name, "Payments");
    update(&mut a, code(KeyCode::End));
    typed(&mut a, "1");
    update(&mut a, ctrl('a'));
    typed(&mut a, "k");
    update(&mut a, ctrl('e'));
    typed(&mut a, "2");
    assert_eq!(form(&a).name, "kPayments12");
    for _ in 0..2 {
        update(&mut a, code(KeyCode::Left));
    }
    update(&mut a, ctrl('u'));
    assert_eq!(form(&a).name, "12");
    assert_eq!(form(&a).cursor_back, 2);
    // Another field starts with the cursor at its end; ←/→ on a choice change it.
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, code(KeyCode::Right));
    assert_eq!(form(&a).key_type, KeyType::Ecdsa);
    for _ in 0..5 {
        update(&mut a, code(KeyCode::Tab));
    }
    assert_eq!(form(&a).focus, Field::Memo);
    assert_eq!(form(&a).cursor_back, 0);
    update(&mut a, code(KeyCode::Esc));

    // The one-line prompts, the typed name of "delete now", the grant and token forms.
    select(&mut a, "payments");
    update(&mut a, ch('m'));
    update(&mut a, ctrl('a'));
    update(&mut a, code(KeyCode::Delete));
    typed(&mut a, "C");
    assert!(matches!(&a.popup, Some(Popup::Prompt(p)) if p.text == "Card tokens (PCI)"));
    update(&mut a, code(KeyCode::Esc));
    select(&mut a, "old-archive");
    update(&mut a, ch('D'));
    typed(&mut a, "old-archve");
    for _ in 0..2 {
        update(&mut a, code(KeyCode::Left));
    }
    typed(&mut a, "i");
    let k = a.selected_key().unwrap().clone();
    assert_eq!(
        update(&mut a, code(KeyCode::Enter)),
        [op(Op::DeleteNow, &k)]
    );
    let mut a = permissions_on("payments");
    update(&mut a, ch('n'));
    update(&mut a, code(KeyCode::Tab));
    update(&mut a, code(KeyCode::Tab));
    typed(&mut a, "alce");
    update(&mut a, code(KeyCode::Left));
    update(&mut a, code(KeyCode::Left));
    typed(&mut a, "i");
    assert_eq!(grant_form(&a).name, "alice");
    let mut a = tokens_open();
    update(&mut a, ch('n'));
    typed(&mut a, "vault");
    update(&mut a, code(KeyCode::Home));
    typed(&mut a, "a-");
    assert_eq!(token_form(&a).name, "a-vault");
}

/// Characters of several bytes are moved over and deleted whole: nothing panics and
/// nothing is split.
#[test]
fn text_fields_take_non_ascii() {
    let mut a = app();
    select(&mut a, "payments");
    update(&mut a, ch('m'));
    update(&mut a, ctrl('u'));
    typed(&mut a, "ключ 🔑 日本");
    update(&mut a, code(KeyCode::Left));
    update(&mut a, code(KeyCode::Backspace));
    update(&mut a, code(KeyCode::Home));
    update(&mut a, code(KeyCode::Delete));
    update(&mut a, code(KeyCode::Right));
    typed(&mut a, "é");
    let Some(Popup::Prompt(p)) = &a.popup else {
        panic!()
    };
    assert_eq!(p.text, "лéюч 🔑 本");
    update(&mut a, code(KeyCode::End));
    for _ in 0..3 {
        update(&mut a, code(KeyCode::Left));
    }
    update(&mut a, ctrl('u'));
    assert!(matches!(&a.popup, Some(Popup::Prompt(p)) if p.text == "🔑 本"));
    for _ in 0..5 {
        update(&mut a, code(KeyCode::Delete));
        update(&mut a, code(KeyCode::Backspace));
    }
    assert!(matches!(&a.popup, Some(Popup::Prompt(p)) if p.text.is_empty()));
}

fn events_view(a: &App) -> &crate::tui::app::EventsView {
    let Screen::Events(v) = &a.screen else {
        panic!("not the events view: {:?}", a.screen)
    };
    v
}

/// The row's key name, or what kind of gap it is.
fn event_row(a: &App, row: usize) -> String {
    use crate::tui::app::Logged;
    match a.events.newest(row).unwrap() {
        Logged::Event(e) => format!("{} {}", e.kind.as_str(), e.key_name.as_deref().unwrap()),
        Logged::Missed { missed, .. } => format!("missed {missed}"),
        Logged::Reconnected { .. } => "reconnected".into(),
        Logged::OtherStore { data_dir, .. } => format!("other store {data_dir}"),
    }
}

/// Every event received is kept for the events view (E), newest first, with the places
/// where events were missed (the daemon dropped some, the connection was lost); the log
/// keeps the newest `EVENT_LOG`.
#[test]
fn e_lists_the_events_received() {
    use crate::tui::app::EVENT_LOG;
    let mut a = app();
    let pay = select(&mut a, "payments");
    let jwt = select(&mut a, "jwt-signing");
    update(&mut a, Action::DaemonEvent(event(EventKind::Rotated, &pay)));
    update(
        &mut a,
        Action::Lagged {
            missed: 3,
            at: fake::BASE + 30_000,
        },
    );
    update(
        &mut a,
        Action::DaemonEvent(event(EventKind::StateChanged, &jwt)),
    );
    update(
        &mut a,
        Action::Disconnected {
            reason: "gone".into(),
            next: Next::Start(Duration::from_secs(1)),
        },
    );
    update(
        &mut a,
        Action::Connected {
            daemon_version: "0.1.0".into(),
            data_dir: Some("/home/alice/.local/share/kms".into()),
            at: fake::BASE + 61_000,
        },
    );
    // A daemon serving another store: the rows before are the other store's.
    update(
        &mut a,
        Action::Connected {
            daemon_version: "0.1.0".into(),
            data_dir: Some("/srv/kms".into()),
            at: fake::BASE + 122_000,
        },
    );
    update(&mut a, ch('E'));
    assert_eq!(a.mode(), Mode::Events);
    let rows: Vec<String> = (0..a.events.len()).map(|r| event_row(&a, r)).collect();
    assert_eq!(
        rows,
        [
            "other store /srv/kms",
            "reconnected",
            "state-changed jwt-signing",
            "missed 3",
            "rotated payments"
        ]
    );
    assert_eq!(a.events.events(), 2);
    assert!(!a.events.is_full());
    // Rows that are no event carry the time the dashboard learnt of the gap (UTC).
    for (row, line) in [
        (
            0,
            "00:02:02 connected to a daemon serving another key store (/srv/kms)",
        ),
        (1, "00:01:01 the connection was lost"),
        (3, "00:00:30 3 events were missed here"),
    ] {
        update(&mut a, ch('g'));
        for _ in 0..row {
            update(&mut a, ch('j'));
        }
        let m = &a.message.as_ref().unwrap().text;
        assert!(m.starts_with(line), "row {row}: {m}");
    }
    // Bounded: the oldest go first.
    for _ in 0..EVENT_LOG {
        update(&mut a, Action::DaemonEvent(event(EventKind::Rotated, &jwt)));
    }
    assert_eq!(a.events.len(), EVENT_LOG);
    assert!(a.events.is_full());
    assert_eq!(event_row(&a, EVENT_LOG - 1), "rotated jwt-signing");
    // Esc goes back where E was pressed.
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.screen, Screen::Main);
    update(&mut a, code(KeyCode::Enter));
    update(&mut a, ch('E'));
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.screen, Screen::Details);
}

/// On the newest row the view follows new events; on an older one the selection stays
/// on that row's event as new ones arrive above it.
#[test]
fn the_events_view_keeps_its_place() {
    let mut a = app();
    let pay = select(&mut a, "payments");
    for _ in 0..3 {
        update(&mut a, Action::DaemonEvent(event(EventKind::Rotated, &pay)));
    }
    update(&mut a, ch('E'));
    assert_eq!(events_view(&a).selected, 0);
    update(
        &mut a,
        Action::DaemonEvent(event(EventKind::StateChanged, &pay)),
    );
    assert_eq!(events_view(&a).selected, 0, "the newest row is followed");
    assert_eq!(event_row(&a, 0), "state-changed payments");
    update(&mut a, ch('G'));
    assert_eq!(events_view(&a).selected, 3);
    update(&mut a, ch('k'));
    assert_eq!(events_view(&a).selected, 2);
    // The selected row in full on the message line (a narrow terminal cuts the row).
    let m = a.message.as_ref().unwrap();
    assert_eq!(m.kind, MsgKind::Event);
    assert!(
        m.text.contains("rotated payments") && m.text.contains("disabled by alice"),
        "{}",
        m.text
    );
    let before = event_row(&a, 2);
    let jwt = select(&mut a, "jwt-signing");
    update(&mut a, Action::DaemonEvent(event(EventKind::Created, &jwt)));
    assert_eq!(
        events_view(&a).selected,
        3,
        "the selection moved with its row"
    );
    assert_eq!(event_row(&a, 3), before);

    // Deeper than a screen: the window moves with the rows, so the same rows stay in
    // view under a selection that stays on its event.
    let rows = crate::tui::ui::layout::events_rows(a.size, a.message_rows());
    for _ in 0..rows * 2 {
        update(&mut a, Action::DaemonEvent(event(EventKind::Rotated, &jwt)));
    }
    update(&mut a, ch('G'));
    let (selected, offset) = (events_view(&a).selected, events_view(&a).offset);
    assert_eq!(selected, a.events.len() - 1);
    assert_eq!(offset, selected + 1 - rows, "the last row at the bottom");
    update(&mut a, ch('k'));
    update(&mut a, ch('k'));
    let (selected, offset) = (events_view(&a).selected, events_view(&a).offset);
    let before = event_row(&a, selected);
    update(&mut a, Action::DaemonEvent(event(EventKind::Rotated, &pay)));
    assert_eq!(event_row(&a, events_view(&a).selected), before);
    assert_eq!(events_view(&a).selected, selected + 1);
    assert_eq!(
        events_view(&a).offset,
        offset + 1,
        "the window moved with it"
    );
}

/// Enter on an event opens its key's details, clearing a filter that hides the key; on
/// a key no longer listed, or a row about no key, it says why and stays.
#[test]
fn enter_on_an_event_opens_its_key() {
    let mut a = app();
    let pay = select(&mut a, "payments");
    let jwt = select(&mut a, "jwt-signing");
    update(&mut a, Action::DaemonEvent(event(EventKind::Rotated, &pay)));
    update(&mut a, ch('/'));
    typed(&mut a, "jwt");
    update(&mut a, code(KeyCode::Enter));
    assert_eq!(selected_name(&a), "jwt-signing");
    update(&mut a, ch('E'));
    update(&mut a, code(KeyCode::Enter));
    assert_eq!(a.screen, Screen::Details);
    assert_eq!(selected_name(&a), "payments");
    assert!(a.filter.is_empty(), "the filter hid the key");

    // Purged meanwhile.
    update(&mut a, Action::DaemonEvent(event(EventKind::Purged, &jwt)));
    a.remove_key(&jwt.tag);
    update(&mut a, ch('E'));
    update(&mut a, code(KeyCode::Enter));
    assert_eq!(a.mode(), Mode::Events);
    let m = a.message.as_ref().unwrap();
    assert_eq!(m.kind, MsgKind::Error);
    assert!(m.text.contains("jwt-signing"), "{}", m.text);

    update(
        &mut a,
        Action::Lagged {
            missed: 0,
            at: fake::BASE,
        },
    );
    update(&mut a, code(KeyCode::Home));
    update(&mut a, code(KeyCode::Enter));
    assert_eq!(a.mode(), Mode::Events);
    assert_eq!(a.message.as_ref().unwrap().kind, MsgKind::Error);

    // An empty log: enter does nothing.
    let mut a = app();
    update(&mut a, ch('E'));
    a.message = None;
    update(&mut a, code(KeyCode::Enter));
    assert_eq!(a.mode(), Mode::Events);
    assert_eq!(a.message, None);
}

/// Esc from the details opened by enter on an event goes back to the events view, on
/// the same event even when others came in meanwhile; details opened from the list, or
/// after the events view was opened afresh, go back to the list.
#[test]
fn esc_from_an_events_details_goes_back_to_the_events() {
    let mut a = app();
    let pay = select(&mut a, "payments");
    let jwt = select(&mut a, "jwt-signing");
    update(&mut a, Action::DaemonEvent(event(EventKind::Rotated, &pay)));
    update(&mut a, Action::DaemonEvent(event(EventKind::Rotated, &jwt)));
    update(&mut a, ch('E'));
    update(&mut a, ch('j'));
    assert_eq!(event_row(&a, events_view(&a).selected), "rotated payments");
    update(&mut a, code(KeyCode::Enter));
    assert_eq!(a.screen, Screen::Details);
    assert_eq!(selected_name(&a), "payments");
    // An event while the details are shown: the row the view was on moves down one.
    update(&mut a, Action::DaemonEvent(event(EventKind::Created, &jwt)));
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.mode(), Mode::Events);
    assert_eq!(events_view(&a).selected, 2);
    assert_eq!(event_row(&a, 2), "rotated payments");

    // Esc from the events view goes where E was pressed (the list).
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.screen, Screen::Main);
    // Details opened from the list go back to the list.
    update(&mut a, code(KeyCode::Enter));
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.screen, Screen::Main);

    // From the details of an event, a new events view (E) and esc twice: the details,
    // then the list (the first view was left for the second).
    update(&mut a, ch('E'));
    update(&mut a, code(KeyCode::Enter));
    assert_eq!(a.screen, Screen::Details);
    update(&mut a, ch('E'));
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.screen, Screen::Details);
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.screen, Screen::Main);
}
