//! Snapshot tests: every screen and pop-up drawn into a `TestBackend` at 80×24 and at
//! 160×40, from fixed data (fixed tags and times), compared as plain text.

#![allow(clippy::unwrap_used)]

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use kms_shared::model::{AccountUse, Impact};
use ratatui::Terminal;
use ratatui::backend::TestBackend;

use super::action::Action;
use super::app::App;
use super::fake;
use super::ui;
use super::update::update;

const SIZES: [(u16, u16); 2] = [(80, 24), (160, 40)];

fn draw(app: &App) -> String {
    let (w, h) = app.size;
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| ui::draw(f, app)).unwrap();
    t.backend().to_string()
}

fn ch(c: char) -> Action {
    Action::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE))
}

fn code(c: KeyCode) -> Action {
    Action::Key(KeyEvent::new(c, KeyModifiers::NONE))
}

fn keys(app: &mut App, text: &str) {
    for c in text.chars() {
        update(app, ch(c));
    }
}

/// Connected to kmsd 0.1.0, the eight fixture keys loaded, `name` selected.
fn app(size: (u16, u16), name: &str) -> App {
    let mut a = App::new(size);
    update(
        &mut a,
        Action::Connected {
            daemon_version: "0.1.0".into(),
            data_dir: Some("/home/alice/.local/share/kms".into()),
            at: fake::BASE,
        },
    );
    update(&mut a, Action::KeysLoaded(Ok(fake::keys())));
    a.message = None;
    let pos = a
        .visible
        .iter()
        .position(|&i| a.keys[i].name == name)
        .unwrap();
    a.selected = pos;
    a.clamp_selection();
    a
}

fn tag_of(a: &App, name: &str) -> String {
    a.keys.iter().find(|k| k.name == name).unwrap().tag.clone()
}

/// Draws the scenario at both sizes and compares each with its snapshot.
fn check(name: &str, scenario: impl Fn((u16, u16)) -> App) {
    for size in SIZES {
        let a = scenario(size);
        let snap = format!("{name}_{}x{}", size.0, size.1);
        insta::assert_snapshot!(snap.as_str(), draw(&a));
    }
}

/// The main list: header with count and connection, table, details pane, footer.
#[test]
fn main_list() {
    check("main_list", |s| app(s, "payments"));
}

/// A rotation period of three digits: the pane's left column once ran into the right
/// one ("next 2028-12-03Deletion").
#[test]
fn details_pane_with_a_long_rotation_period() {
    check("details_pane_730_days", |s| {
        let mut a = app(s, "payments");
        let mut k = a.selected_key().unwrap().clone();
        k.rotation_days = 730;
        a.upsert_key(k);
        a
    });
}

/// Before the daemon answers: the frame is already there, saying it is connecting.
#[test]
fn startup_connecting() {
    check("startup", App::new);
}

/// The header shows a lost daemon; the last known list stays.
#[test]
fn disconnected_header() {
    check("disconnected", |s| {
        let mut a = app(s, "payments");
        update(
            &mut a,
            Action::Disconnected {
                reason: "connection to kmsd closed".into(),
                next: super::retry::Next::Start(std::time::Duration::from_secs(4)),
            },
        );
        a
    });
}

/// A live event from another client on the message line.
#[test]
fn live_event_message() {
    check("live_event", |s| {
        let mut a = app(s, "jwt-signing");
        let k = a.selected_key().unwrap().clone();
        update(
            &mut a,
            Action::DaemonEvent(kms_shared::protocol::Event {
                seq: 42,
                time: fake::BASE + 3_723_000,
                kind: kms_shared::protocol::EventKind::Rotated,
                key_tag: Some(k.tag.clone()),
                key_name: Some(k.name.clone()),
                version: Some(2),
                state: Some(k.state),
                account: "bob".into(),
                message: "rotated to v2".into(),
            }),
        );
        a
    });
}

/// The events view (E): events of several kinds, a gap where events were missed, the
/// selection on an older row.
#[test]
fn events_view() {
    use kms_shared::protocol::{Event, EventKind};
    check("events", |s| {
        let mut a = app(s, "payments");
        let at = |name: &str| a.keys.iter().find(|k| k.name == name).unwrap().clone();
        let (pay, jwt, old) = (at("payments"), at("jwt-signing"), at("old-archive"));
        let event = |seq: u32,
                     kind,
                     k: &kms_shared::model::KeyInfo,
                     version,
                     account: &str,
                     message: &str| {
            Action::DaemonEvent(Event {
                seq: u64::from(seq),
                time: fake::BASE + i64::from(seq) * 61_000,
                kind,
                key_tag: Some(k.tag.clone()),
                key_name: Some(k.name.clone()),
                version,
                state: Some(k.state),
                account: account.into(),
                message: message.into(),
            })
        };
        update(
            &mut a,
            event(
                1,
                EventKind::Rotated,
                &pay,
                Some(4),
                "kmsd",
                "rotated to v4",
            ),
        );
        update(
            &mut a,
            event(
                2,
                EventKind::DeletionRequested,
                &old,
                None,
                "alice",
                "deletion due 2025-03-07 00:00 UTC",
            ),
        );
        update(
            &mut a,
            Action::Lagged {
                missed: 12,
                at: fake::BASE + 152_000,
            },
        );
        update(
            &mut a,
            event(3, EventKind::StateChanged, &jwt, None, "bob", "disabled"),
        );
        update(
            &mut a,
            event(
                4,
                EventKind::VersionDisabled,
                &pay,
                Some(2),
                "alice",
                "version 2 disabled",
            ),
        );
        update(&mut a, ch('E'));
        update(&mut a, ch('j'));
        a.message = None;
        a
    });
}

/// The details screen (enter) with every field.
#[test]
fn details_screen() {
    check("details", |s| {
        let mut a = app(s, "partner-sso");
        update(&mut a, code(KeyCode::Enter));
        a
    });
}

/// The help overlay.
#[test]
fn help_overlay() {
    check("help", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('?'));
        a
    });
}

/// The create form with a rule broken as typed, shown under its field.
#[test]
fn create_form_with_error() {
    check("create_form_error", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('c'));
        keys(&mut a, "9lives");
        update(&mut a, code(KeyCode::Tab));
        update(&mut a, ch(' '));
        update(&mut a, code(KeyCode::Tab));
        update(&mut a, code(KeyCode::Tab));
        update(&mut a, ch(' '));
        a
    });
}

/// The create form showing the daemon's refusal.
#[test]
fn create_form_daemon_error() {
    check("create_form_daemon_error", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('c'));
        keys(&mut a, "vault");
        update(&mut a, code(KeyCode::Tab));
        update(&mut a, code(KeyCode::Tab));
        update(&mut a, ch(' '));
        update(&mut a, code(KeyCode::Enter));
        update(
            &mut a,
            Action::Created(Err(
                "invalid-argument: hsm keys need a PKCS#11 token and none is configured".into(),
            )),
        );
        a
    });
}

/// `a` asks before switching automatic rotation off (or on: a new period).
#[test]
fn confirm_auto_rotation_off() {
    check("confirm_auto_rotation_off", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('a'));
        a
    });
}

/// Disabling asks with the impact: recent uses and the accounts behind them.
#[test]
fn confirm_disable_with_impact() {
    check("confirm_disable", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('d'));
        let tag = tag_of(&a, "payments");
        update(&mut a, fake::impact_loaded(tag));
        a
    });
}

/// Requesting deletion while the impact is still loading.
#[test]
fn confirm_request_deletion_loading() {
    check("confirm_delete_loading", |s| {
        let mut a = app(s, "legacy-db");
        update(&mut a, ch('x'));
        a
    });
}

/// Rotation asks without an impact list.
#[test]
fn confirm_rotate() {
    check("confirm_rotate", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('r'));
        a
    });
}

/// On a screen too short for the whole delete-now dialog, the name being typed stays in
/// view, with the cursor on it (found driving the dashboard at 60×9: the line was hidden
/// and the name typed blind).
#[test]
fn delete_now_on_a_short_screen_shows_the_typed_name() {
    let mut a = app((60, 9), "old-archive");
    update(&mut a, ch('D'));
    let tag = tag_of(&a, "old-archive");
    update(
        &mut a,
        Action::ImpactLoaded {
            tag: tag.clone(),
            result: Ok(Impact {
                key_tag: tag,
                since: fake::BASE - 30 * kms_shared::model::DAY_MS,
                recent_uses: 0,
                last_used_at: None,
                accounts: vec![],
                counted_back_to: None,
            }),
        },
    );
    keys(&mut a, "old-ar");
    let (screen, (x, y)) = draw_with_cursor(&a);
    let row = screen.lines().nth(usize::from(y)).unwrap_or_default();
    assert!(row.contains("> old-ar"), "cursor row {y}: {row}\n{screen}");
    assert!(x > 0, "{x}");
}

/// "Delete now" wants the key name typed; a wrong name is flagged.
#[test]
fn delete_now_prompt() {
    check("delete_now", |s| {
        let mut a = app(s, "old-archive");
        update(&mut a, ch('D'));
        let tag = tag_of(&a, "old-archive");
        update(
            &mut a,
            Action::ImpactLoaded {
                tag: tag.clone(),
                result: Ok(Impact {
                    key_tag: tag,
                    since: fake::BASE - 30 * kms_shared::model::DAY_MS,
                    recent_uses: 1,
                    last_used_at: Some(fake::BASE - 20 * kms_shared::model::DAY_MS),
                    accounts: vec![AccountUse {
                        account: "alice".into(),
                        uses: 1,
                        last_used_at: fake::BASE - 20 * kms_shared::model::DAY_MS,
                    }],
                    counted_back_to: None,
                }),
            },
        );
        keys(&mut a, "old-arch");
        update(&mut a, code(KeyCode::Enter));
        a
    });
}

/// The rotation-period prompt with an out-of-range value.
#[test]
fn period_prompt() {
    check("period_prompt", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('p'));
        keys(&mut a, "0");
        a
    });
}

/// The memo prompt.
#[test]
fn memo_prompt() {
    check("memo_prompt", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('m'));
        keys(&mut a, " v2");
        a
    });
}

/// The versions of a key, current first, one disabled.
#[test]
fn versions_view() {
    check("versions", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('v'));
        let tag = tag_of(&a, "payments");
        update(&mut a, fake::versions_loaded(tag));
        update(&mut a, ch('j'));
        a
    });
}

/// An RSA key's versions show no encryption count: only AES encryptions are counted,
/// and a 0 for a key that did encrypt misled (it showed 0 after every encryption).
#[test]
fn rsa_versions_show_no_count() {
    // The last cell of version 1's row (disabled in the fake versions).
    let v1_count = |key: &str| {
        let mut a = app((100, 24), key);
        update(&mut a, ch('v'));
        let tag = tag_of(&a, key);
        update(&mut a, fake::versions_loaded(tag));
        let screen = draw(&a);
        let row = screen
            .lines()
            .find(|l| l.contains("v1 ") && l.contains("disabled"))
            .unwrap_or_else(|| panic!("{screen}"))
            .to_string();
        row.split_whitespace()
            .rfind(|t| !t.starts_with('│'))
            .map(str::to_string)
    };
    assert_eq!(v1_count("partner-sso").as_deref(), Some("-"));
    assert_eq!(v1_count("payments").as_deref(), Some("9,100"));
}

/// Disabling the current version asks, says what stops working, and shows the impact.
#[test]
fn confirm_disable_current_version() {
    check("confirm_disable_version", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('v'));
        let tag = tag_of(&a, "payments");
        update(&mut a, fake::versions_loaded(tag.clone()));
        update(&mut a, ch(' '));
        update(&mut a, fake::impact_loaded(tag));
        a
    });
}

/// A long error (and a long account name) in a confirmation is wrapped inside the pop-up
/// at 80 columns instead of being cut off at its border.
#[test]
fn confirm_long_lines_wrap() {
    let mut a = app((80, 24), "payments");
    update(&mut a, ch('d'));
    let tag = tag_of(&a, "payments");
    update(
        &mut a,
        Action::ImpactLoaded {
            tag: tag.clone(),
            result: Err(
                "permission-denied: reading recent usage needs the key-reviewer \
                 role on payments or on all keys; ask a manager: tail-of-the-error"
                    .into(),
            ),
        },
    );
    let out = draw(&a);
    for part in ["needs the key-reviewer", "tail-of-the-error"] {
        assert!(out.contains(part), "{part} is shown:\n{out}");
    }
    insta::assert_snapshot!("confirm_long_error_80x24", out);

    let mut a = app((80, 24), "payments");
    update(&mut a, ch('x'));
    let mut impact = fake::impact();
    impact.accounts[0].account = "svc-payments-settlement-batch-nightly-eu-west".into();
    update(
        &mut a,
        Action::ImpactLoaded {
            tag,
            result: Ok(impact),
        },
    );
    let out = draw(&a);
    assert!(
        out.contains("svc-payments-settlement-batch-nightly-eu-west"),
        "{out}"
    );
    assert!(out.contains("│   2025-02-28 22:00 "), "{out}");
}

/// The daemon's refusal of a rotation: it names the key, the token and the reason, and
/// ends with what to do.
const LONG_REFUSAL: &str = "failed-precondition: HSM token vault-a (label tenant-a) refused \
     the login: the PIN file /etc/kms/hsm/vault-a.pin is not readable by kmsd; give it mode \
     0400 and owner kms";

/// A long error on a narrow terminal takes as many rows as it needs, so its end (why it
/// was refused, what to do) is on screen; the list gives up those rows and keeps the
/// selected key in view.
#[test]
fn long_error_message_wraps() {
    let mut a = app((60, 20), "payments");
    update(
        &mut a,
        Action::OpDone {
            op: super::action::Op::Rotate,
            tag: "partner-sso-tag".into(),
            name: "partner-sso".into(),
            result: Err(LONG_REFUSAL.into()),
        },
    );
    let out = draw(&a);
    for part in [
        "could not rotate partner-sso",
        "vault-a.pin",
        "0400 and owner kms",
    ] {
        assert!(out.contains(part), "{part} is shown:\n{out}");
    }
    assert!(
        out.contains("›payments"),
        "the selected key stays in view:\n{out}"
    );
    insta::assert_snapshot!("long_error_message_60x20", out);
}

/// Too long even for a third of the screen: the message area says how to see the rest,
/// and `M` shows all of it in a pop-up that scrolls to its end.
#[test]
fn long_message_popup() {
    let mut a = app((40, 12), "payments");
    update(
        &mut a,
        Action::OpDone {
            op: super::action::Op::Rotate,
            tag: "partner-sso-tag".into(),
            name: "partner-sso".into(),
            result: Err(LONG_REFUSAL.into()),
        },
    );
    let out = draw(&a);
    assert!(out.contains(super::strings::MESSAGE_MORE), "{out}");
    insta::assert_snapshot!("long_message_cut_40x12", out);

    update(&mut a, ch('M'));
    let out = draw(&a);
    assert!(out.contains("and owner kms"), "{out}");
    insta::assert_snapshot!("long_message_popup_40x12", out);

    // Shorter than the message: the pop-up scrolls, down to its last line.
    update(&mut a, Action::Resize(40, 8));
    update(&mut a, code(KeyCode::End));
    let out = draw(&a);
    assert!(out.contains("and owner kms"), "{out}");
    assert!(out.contains(super::strings::MESSAGE_SCROLL_HINT), "{out}");
    insta::assert_snapshot!("long_message_popup_scrolled_40x8", out);
}

/// The history of a key, newest first, with more to load.
#[test]
fn history_view() {
    check("history", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('h'));
        let tag = tag_of(&a, "payments");
        update(
            &mut a,
            Action::HistoryLoaded {
                tag,
                before_seq: None,
                result: Ok(fake::history(1000, 100)),
            },
        );
        update(&mut a, ch('j'));
        update(&mut a, ch('j'));
        a
    });
}

/// The filter being typed: header count, matching rows only, input on the message line.
#[test]
fn filter_active() {
    check("filter", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('/'));
        keys(&mut a, "pa");
        a
    });
}

/// A filter that matches nothing says so.
#[test]
fn filter_no_match() {
    check("filter_no_match", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('/'));
        keys(&mut a, "zzz");
        update(&mut a, code(KeyCode::Enter));
        a
    });
}

/// A long list scrolled to the end at both sizes (only visible rows are built).
#[test]
fn long_list_scrolled() {
    check("long_list", |s| {
        let mut a = App::new(s);
        update(
            &mut a,
            Action::Connected {
                daemon_version: "0.1.0".into(),
                data_dir: Some("/home/alice/.local/share/kms".into()),
                at: fake::BASE,
            },
        );
        update(&mut a, Action::KeysLoaded(Ok(fake::many(1000))));
        a.message = None;
        update(&mut a, ch('G'));
        update(&mut a, code(KeyCode::PageUp));
        a
    });
}

/// The permissions view on payments: every grant, the second selected.
fn permissions(s: (u16, u16)) -> App {
    let mut a = app(s, "payments");
    update(&mut a, ch('P'));
    update(&mut a, Action::GrantsLoaded(Ok(fake::grants())));
    update(&mut a, ch('j'));
    a
}

/// The tokens view with two registered tokens.
fn tokens(s: (u16, u16)) -> App {
    let mut a = app(s, "payments");
    update(&mut a, ch('T'));
    update(&mut a, Action::HsmTokensLoaded(Ok(fake::tokens())));
    a
}

/// Every grant: role, principal, key or all keys, when and by whom.
#[test]
fn permissions_view() {
    check("permissions", permissions);
}

/// The grant form opened on payments: a group, a name being typed, one key.
#[test]
fn grant_form() {
    check("grant_form", |s| {
        let mut a = permissions(s);
        update(&mut a, ch('n'));
        update(&mut a, code(KeyCode::Left));
        update(&mut a, code(KeyCode::Tab));
        update(&mut a, ch(' '));
        update(&mut a, code(KeyCode::Tab));
        keys(&mut a, "ops");
        a
    });
}

/// The daemon's refusal of a grant, in the form.
#[test]
fn grant_form_refused() {
    check("grant_form_refused", |s| {
        let mut a = permissions(s);
        update(&mut a, ch('n'));
        update(&mut a, code(KeyCode::Tab));
        update(&mut a, code(KeyCode::Tab));
        keys(&mut a, "carol");
        update(&mut a, code(KeyCode::Enter));
        update(
            &mut a,
            Action::Granted(Err("invalid-argument: no user named \"carol\"".into())),
        );
        a
    });
}

/// Revoking asks, naming role, principal and scope.
#[test]
fn revoke_confirmation() {
    check("revoke_confirm", |s| {
        let mut a = permissions(s);
        update(&mut a, ch('x'));
        a
    });
}

/// The registered tokens: name, label, module, keys, when and by whom.
#[test]
fn tokens_view() {
    check("tokens", tokens);
}

/// No token registered yet: the view says how to register one.
#[test]
fn tokens_view_empty() {
    check("tokens_empty", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('T'));
        update(&mut a, Action::HsmTokensLoaded(Ok(Vec::new())));
        a
    });
}

/// The register form half filled, a relative PIN file flagged.
#[test]
fn register_token_form() {
    check("token_form", |s| {
        let mut a = tokens(s);
        update(&mut a, ch('n'));
        keys(&mut a, "vault-c");
        update(&mut a, code(KeyCode::Tab));
        keys(&mut a, "/usr/lib/softhsm/libsofthsm2.so");
        update(&mut a, code(KeyCode::Tab));
        keys(&mut a, "tenant-c");
        update(&mut a, code(KeyCode::Tab));
        keys(&mut a, "tenant-c.pin");
        a
    });
}

/// Removing a token that still holds a key asks first and says kmsd will refuse.
#[test]
fn remove_token_confirmation() {
    check("remove_token_confirm", |s| {
        let mut a = tokens(s);
        update(&mut a, ch('x'));
        a
    });
}

/// The create form with dedicated-hsm protection and the second token chosen.
#[test]
fn create_form_dedicated_hsm() {
    check("create_form_token", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('c'));
        update(&mut a, Action::HsmTokensLoaded(Ok(fake::tokens())));
        keys(&mut a, "tenant-key");
        update(&mut a, code(KeyCode::Tab));
        update(&mut a, code(KeyCode::Tab));
        update(&mut a, code(KeyCode::Left));
        update(&mut a, code(KeyCode::Tab));
        update(&mut a, code(KeyCode::Right));
        a
    });
}

/// Dedicated-hsm with no token registered: the rule says where to register one.
#[test]
fn create_form_no_token() {
    check("create_form_no_token", |s| {
        let mut a = app(s, "payments");
        update(&mut a, ch('c'));
        update(&mut a, Action::HsmTokensLoaded(Ok(Vec::new())));
        keys(&mut a, "tenant-key");
        update(&mut a, code(KeyCode::Tab));
        update(&mut a, code(KeyCode::Tab));
        update(&mut a, code(KeyCode::Left));
        update(&mut a, code(KeyCode::Enter));
        a
    });
}

/// Drawing never panics at tiny or odd sizes, whatever screen or pop-up is open.
#[test]
fn odd_sizes_do_not_panic() {
    let scenarios: [&dyn Fn(&mut App); 17] = [
        &|_| {},
        &|a| {
            update(a, Action::KeysLoaded(Err(LONG_REFUSAL.repeat(20))));
        },
        &|a| {
            update(a, Action::KeysLoaded(Err(LONG_REFUSAL.repeat(20))));
            update(a, ch('M'));
            update(a, code(KeyCode::PageDown));
        },
        &|a| update(a, ch('?')).clear(),
        &|a| update(a, ch('c')).clear(),
        &|a| update(a, ch('d')).clear(),
        &|a| update(a, ch('m')).clear(),
        &|a| update(a, code(KeyCode::Enter)).clear(),
        &|a| {
            update(a, ch('h'));
            let tag = tag_of(a, "payments");
            update(
                a,
                Action::HistoryLoaded {
                    tag,
                    before_seq: None,
                    result: Ok(fake::history(1000, 100)),
                },
            );
        },
        &|a| {
            update(a, ch('v'));
            let tag = tag_of(a, "payments");
            update(
                a,
                Action::VersionsLoaded {
                    tag,
                    result: Ok(fake::versions()),
                },
            );
        },
        &|a| {
            update(a, ch('v'));
            let tag = tag_of(a, "payments");
            update(
                a,
                Action::VersionsLoaded {
                    tag: tag.clone(),
                    result: Ok(fake::versions()),
                },
            );
            update(a, ch(' '));
            update(
                a,
                Action::ImpactLoaded {
                    tag,
                    result: Err("permission-denied: ".repeat(20)),
                },
            );
        },
        &|a| {
            update(a, ch('P'));
            update(a, Action::GrantsLoaded(Ok(fake::grants())));
            update(a, ch('G'));
        },
        &|a| {
            update(a, ch('P'));
            update(a, ch('n'));
            keys(a, "someone");
        },
        &|a| {
            update(a, ch('P'));
            update(a, Action::GrantsLoaded(Ok(fake::grants())));
            update(a, ch('x'));
        },
        &|a| {
            update(a, ch('T'));
            update(a, Action::HsmTokensLoaded(Ok(fake::tokens())));
            update(a, ch('G'));
        },
        &|a| {
            update(a, ch('T'));
            update(a, ch('n'));
            keys(a, &"/very/long/path".repeat(20));
        },
        &|a| {
            update(a, ch('T'));
            update(a, Action::HsmTokensLoaded(Ok(fake::tokens())));
            update(a, ch('x'));
        },
    ];
    for size in [
        (1, 1),
        (10, 3),
        (20, 5),
        (40, 10),
        (79, 23),
        (120, 30),
        (300, 80),
    ] {
        for s in scenarios {
            let mut a = app(size, "payments");
            s(&mut a);
            draw(&a);
        }
    }
}

/// The medium width (120 columns) adds protection, created, rotation and memo.
#[test]
fn medium_width_columns() {
    let a = app((120, 30), "payments");
    let out = draw(&a);
    let header = out.lines().nth(1).unwrap();
    for col in ["Name", "Protection", "Created", "Period", "Memo"] {
        assert!(header.contains(col), "{col} in {header}");
    }
    assert!(!header.contains("Tag"), "{header}");
}

/// On a screen too small for the help (60×15), it shows one column and scrolls to its last
/// line; it used to show the first dozen bindings and cut the rest (history, permissions,
/// tokens) with no way to reach them.
#[test]
fn help_scrolls_on_a_small_screen() {
    let mut a = app((60, 15), "payments");
    update(&mut a, ch('?'));
    let first = draw(&a);
    assert!(first.contains("scroll"), "{first}");
    let last_hint = crate::tui::strings::H_TOKENS;
    assert!(!first.contains(last_hint), "{first}");
    update(&mut a, code(KeyCode::End));
    let end = draw(&a);
    assert!(end.contains(last_hint), "{end}");
    // Scrolling back up and past the top stops at the first line.
    for _ in 0..100 {
        update(&mut a, code(KeyCode::Up));
    }
    assert_eq!(draw(&a), first);
    update(&mut a, code(KeyCode::Esc));
    assert_eq!(a.popup, None);
}

/// On a screen too short for the create form (60×8), the form scrolls with the focus: the
/// memo, its last field, used to be cut off with no way to see what was typed there, and
/// the cursor was left on another field's row.
#[test]
fn the_create_form_scrolls_with_its_focus() {
    use crate::tui::app::{Field, Popup};
    use crate::tui::strings as s;
    let mut a = app((60, 8), "payments");
    update(&mut a, ch('c'));
    let (top, _) = draw_with_cursor(&a);
    assert!(top.contains(s::FORM_NAME), "{top}");
    assert!(!top.contains(s::FORM_MEMO), "{top}");
    assert!(top.contains(s::MORE_BELOW.trim()), "{top}");
    // Tab to the memo (the last of the fields) and type there.
    let focus = |a: &App| match &a.popup {
        Some(Popup::Create(form)) => form.focus,
        other => panic!("{other:?}"),
    };
    for _ in 0..8 {
        if focus(&a) == Field::Memo {
            break;
        }
        update(&mut a, code(KeyCode::Tab));
    }
    assert_eq!(focus(&a), Field::Memo);
    keys(&mut a, "quarterly");
    let (end, (_, y)) = draw_with_cursor(&a);
    assert!(end.contains(s::FORM_MEMO), "{end}");
    assert!(end.contains("quarterly"), "{end}");
    assert!(end.contains(s::MORE_ABOVE.trim()), "{end}");
    assert!(!end.contains(s::FORM_NAME), "{end}");
    let row = end.lines().nth(usize::from(y)).unwrap();
    assert!(row.contains("quarterly"), "cursor on row {y}: {end}");
    // Back to the first field: the top again.
    for _ in 0..8 {
        if focus(&a) == Field::Name {
            break;
        }
        update(&mut a, code(KeyCode::BackTab));
    }
    let (back, (_, y)) = draw_with_cursor(&a);
    assert!(back.contains(s::FORM_NAME), "{back}");
    let row = back.lines().nth(usize::from(y)).unwrap();
    assert!(row.contains(s::FORM_NAME), "cursor on row {y}: {back}");
    // The daemon's refusal stays in view under the fields, whichever has the focus.
    if let Some(Popup::Create(form)) = &mut a.popup {
        form.daemon_error = Some("invalid-argument: refused".into());
    }
    let refused = draw(&a);
    assert!(refused.contains("refused"), "{refused}");
    assert!(refused.contains(s::FORM_NAME), "{refused}");
    // Too short for the footer's spacing: the refusal, not the blank line above it.
    a.size = (60, 4);
    let tiny = draw(&a);
    assert!(tiny.contains("refused"), "{tiny}");
}

/// The screen and where the terminal cursor was left.
fn draw_with_cursor(app: &App) -> (String, (u16, u16)) {
    use ratatui::backend::Backend as _;
    let (w, h) = app.size;
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| ui::draw(f, app)).unwrap();
    let p = t.backend_mut().get_cursor_position().unwrap();
    (t.backend().to_string(), (p.x, p.y))
}

/// The column (in cells) where `needle` starts on row `y` of a drawn screen.
fn column_of(screen: &str, y: u16, needle: &str) -> u16 {
    let line = screen.lines().nth(usize::from(y)).unwrap();
    // Each row is drawn quoted: `"…"`.
    let line = line.strip_prefix('"').unwrap();
    let at = line
        .find(needle)
        .unwrap_or_else(|| panic!("{needle} in {line}"));
    line[..at].chars().count() as u16
}

/// The terminal cursor is drawn where the text cursor is, in the prompts and the forms;
/// a text longer than its field shows the part around the cursor.
#[test]
fn text_cursor_is_drawn_where_it_is() {
    let mut a = app((80, 24), "payments");
    update(&mut a, ch('m'));
    update(&mut a, code(KeyCode::Home));
    for _ in 0..4 {
        update(&mut a, code(KeyCode::Right));
    }
    let (screen, (x, y)) = draw_with_cursor(&a);
    assert_eq!(x, column_of(&screen, y, " tokens (PCI)"), "{screen}");
    update(&mut a, code(KeyCode::Esc));

    update(&mut a, ch('c'));
    keys(&mut a, &"abcdefghij".repeat(8));
    update(&mut a, code(KeyCode::Home));
    for _ in 0..3 {
        update(&mut a, code(KeyCode::Right));
    }
    let (screen, (x, y)) = draw_with_cursor(&a);
    assert_eq!(x, column_of(&screen, y, "defghij"), "{screen}");
    update(&mut a, code(KeyCode::End));
    let (screen, (x, y)) = draw_with_cursor(&a);
    let row = screen.lines().nth(usize::from(y)).unwrap();
    // The start is cut (…), the end shown, the cursor right after it.
    assert!(row.contains("Name            …"), "{screen}");
    assert!(row.contains("hij │"), "{screen}");
    assert_eq!(x, column_of(&screen, y, "hij │") + 3, "{screen}");
}

/// The date beside a key's state is its last use, or, pending deletion, when the deletion
/// is due: the title says both ("State / last use" put a due date under "last use").
#[test]
fn pending_deletion_date_is_titled_due() {
    for size in SIZES {
        let out = draw(&app(size, "payments"));
        let header = out.lines().nth(1).unwrap();
        assert!(header.contains("State            Used / due"), "{header}");
        let pending = out.lines().find(|l| l.contains("old-archive")).unwrap();
        // fake: old-archive is due 2025-03-04, under the title's column.
        assert!(pending.contains("pending-deletion 2025-03-04"), "{pending}");
        assert_eq!(header.find("Used / due"), pending.find("2025-03-04"));
    }
}

/// On a screen narrower than a tier's columns, whole columns are left out, the least
/// useful first (memo, tag, …, then the date, version and uses), rather than every
/// column cut short ("pending" for pending-deletion, "202" for a date, ",840" for
/// 12,840). The name and the state stay longest.
#[test]
fn narrow_screens_drop_whole_columns() {
    use crate::tui::strings as s;
    let titles = [
        s::COL_NAME,
        s::COL_PROTECTION,
        s::COL_TYPE,
        s::COL_STATE,
        s::COL_WHEN,
        s::COL_CREATED,
        s::COL_TAG,
        s::COL_CONVERGENT,
        s::COL_VERSION,
        s::COL_AUTO,
        s::COL_PERIOD,
        s::COL_USES,
        s::COL_MEMO,
    ];
    for w in [
        33, 40, 45, 50, 56, 60, 66, 67, 79, 80, 119, 120, 159, 160, 200,
    ] {
        let out = draw(&app((w, 24), "payments"));
        let header = out.lines().nth(1).unwrap().trim_matches('"');
        // Every word of the header belongs to a whole title.
        let mut rest = header.to_string();
        let mut shown = Vec::new();
        for t in titles {
            if let Some(at) = rest.find(&format!(" {t}")) {
                rest.replace_range(at..at + 1 + t.len(), "");
                shown.push(t);
            }
        }
        assert!(rest.trim().is_empty(), "{w}: {rest:?} left of {header:?}");
        assert!(shown.contains(&s::COL_NAME), "{w}: {header}");
        assert!(shown.contains(&s::COL_STATE), "{w}: {header}");
        let row = |name: &str| out.lines().find(|l| l.contains(name)).unwrap().to_string();
        assert!(
            row("old-archive").contains("pending-deletion"),
            "{w}\n{out}"
        );
        if shown.contains(&s::COL_WHEN) {
            assert!(row("old-archive").contains("2025-03-04"), "{w}\n{out}");
        }
        if shown.contains(&s::COL_USES) {
            assert!(row("payments").contains("12,840"), "{w}\n{out}");
            assert!(row("legacy-db").contains("1,000,000"), "{w}\n{out}");
        }
        if w >= 80 {
            for t in [s::COL_TYPE, s::COL_WHEN, s::COL_VERSION, s::COL_USES] {
                assert!(shown.contains(&t), "{w}: {t} in {header}");
            }
        }
    }
}

/// The controls that reorder text never reach the terminal, wherever free text is drawn:
/// a memo in the list and the details, a message. ratatui wrote them (zero-width, added
/// to the cell before), so a memo could make the row around it read backwards.
#[test]
fn text_reordering_controls_are_not_drawn() {
    use kms_shared::text::reorders_text;
    for size in SIZES {
        let mut a = app(size, "payments");
        let i = a.keys.iter().position(|k| k.name == "payments").unwrap();
        a.keys[i].memo = "card \u{202e}kot\u{2066} x\u{200f}".into();
        a.set_message(super::app::MsgKind::Event, "rotated by \u{202e}eve\u{202c}");
        let (w, h) = a.size;
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| ui::draw(f, &a)).unwrap();
        let buf = t.backend().buffer();
        let drawn: String = buf.content.iter().map(|c| c.symbol()).collect();
        assert!(drawn.contains("kot"), "the memo is drawn: {drawn}");
        assert!(drawn.contains("eve"), "the message is drawn: {drawn}");
        assert!(!drawn.chars().any(reorders_text), "{size:?}: {drawn:?}");
    }
}
