//! `update` tests: each binding in each mode, and each daemon reply, gives the right state
//! and effects. No terminal, no daemon.

#![allow(clippy::unwrap_used)]

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use kms_shared::model::{KeyInfo, KeyState, KeyType, Protection};
use kms_shared::protocol::{CreateKey, Event, EventKind};

use super::update;
use crate::tui::action::{Action, Effect, Op};
use crate::tui::app::{
    App, ConfirmKind, Conn, Field, ImpactState, MsgKind, Popup, PromptKind, Screen,
};
use crate::tui::fake;

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
        assert_eq!(a.popup, Some(Popup::Help));
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
            protection: Protection::Hsm,
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

/// d shows the impact before y can disable; y is ignored until the impact is in.
#[test]
fn d_shows_impact_then_disables() {
    let mut a = app();
    let k = select(&mut a, "payments");
    assert_eq!(update(&mut a, ch('d')), [Effect::LoadImpact(k.tag.clone())]);
    assert!(update(&mut a, ch('y')).is_empty(), "impact still loading");
    assert!(a.popup.is_some());
    update(
        &mut a,
        Action::ImpactLoaded {
            tag: k.tag.clone(),
            result: Ok(fake::impact()),
        },
    );
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
    assert_eq!(
        update(&mut a, code(KeyCode::Enter)),
        [op(Op::RequestDeletion, &k)]
    );
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
    update(
        &mut a,
        Action::ImpactLoaded {
            tag: k.tag.clone(),
            result: Ok(fake::impact()),
        },
    );
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

/// a flips auto rotation, keeping the period.
#[test]
fn a_toggles_auto_rotation() {
    let mut a = app();
    let k = select(&mut a, "payments");
    assert_eq!(
        update(&mut a, ch('a')),
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

/// v lists versions newest first; space/enter toggles the selected one's flag.
#[test]
fn v_lists_and_toggles_versions() {
    let mut a = app();
    let k = select(&mut a, "payments");
    assert_eq!(
        update(&mut a, ch('v')),
        [Effect::LoadVersions(k.tag.clone())]
    );
    update(
        &mut a,
        Action::VersionsLoaded {
            tag: k.tag.clone(),
            result: Ok(fake::versions()),
        },
    );
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
    assert_eq!(update(&mut a, ch(' ')), [toggle(1, true)]);
    update(&mut a, ch('k'));
    assert_eq!(update(&mut a, code(KeyCode::Enter)), [toggle(2, false)]);
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

/// Lagging behind the event stream reloads the whole list.
#[test]
fn lagged_reloads() {
    let mut a = app();
    assert_eq!(update(&mut a, Action::Lagged(12)), [Effect::LoadKeys]);
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
        },
    );
    assert!(matches!(a.conn, Conn::Disconnected { .. }));
    assert_eq!(a.message.as_ref().unwrap().kind, MsgKind::Error);
    assert_eq!(a.keys.len(), 8, "the last known list stays on screen");
    let fx = update(
        &mut a,
        Action::Connected {
            daemon_version: "0.1.1".into(),
        },
    );
    assert_eq!(fx, [Effect::LoadKeys, Effect::LoadVersions(k.tag.clone())]);
    assert!(a.is_connected());
}

/// The tick re-reads a small list whole, a large one only for the selected key, and
/// nothing while disconnected or while a pop-up is open.
#[test]
fn tick_refreshes_usage() {
    let mut a = app();
    assert_eq!(update(&mut a, Action::Tick), [Effect::LoadKeys]);
    let mut big = App::new((80, 24));
    update(
        &mut big,
        Action::Connected {
            daemon_version: "0.1.0".into(),
        },
    );
    update(&mut big, Action::KeysLoaded(Ok(fake::many(2_001))));
    update(&mut big, ch('j'));
    let tag = big.selected_key().unwrap().tag.clone();
    assert_eq!(update(&mut big, Action::Tick), [Effect::GetKey(tag)]);
    update(&mut a, ch('?'));
    assert!(update(&mut a, Action::Tick).is_empty());
    update(&mut a, code(KeyCode::Esc));
    update(&mut a, Action::Disconnected { reason: "x".into() });
    assert!(update(&mut a, Action::Tick).is_empty());
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
