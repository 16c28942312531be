//! Property tests of the wire format (SPEC §10, §14): every protocol message — a
//! `ClientFrame` with each `Request` variant, a `ServerFrame` with each `Response`,
//! `ItemOutcome`, error kind and `Event` — survives encode → frame → decode unchanged,
//! and so does the `ncpkms:v{N}:{base64}` ciphertext format. The `*_variant` functions
//! match exhaustively, so a new message variant does not compile here until it has a
//! strategy, and the coverage tests prove each strategy reaches every variant.

#![allow(clippy::unwrap_used)]

use kms_shared::ciphertext;
use kms_shared::codec;
use kms_shared::model::{
    ACTIONS, AccountUse, Action, GrantInfo, HistoryEntry, Impact, KeyInfo, KeyState, KeyType,
    Principal, Protection, Role, SignScheme, VersionInfo,
};
use kms_shared::protocol::{
    CiphertextItem, ClientFrame, CreateKey, DaemonStatus, ErrorKind, Event, EventKind, GrantSpec,
    HistoryQuery, HsmTokenInfo, ItemOutcome, Outcome, PlaintextItem, Request, Response,
    ResultFilter, ServerFrame, WireError,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::{BoxedStrategy, Strategy, ValueTree};
use proptest::test_runner::TestRunner;

fn text() -> BoxedStrategy<String> {
    prop_oneof![".{0,12}", "[a-z][a-z0-9_-]{2,14}"].boxed()
}

fn bytes() -> BoxedStrategy<Vec<u8>> {
    vec(any::<u8>(), 0..48).boxed()
}

fn opt_bytes() -> BoxedStrategy<Option<Vec<u8>>> {
    proptest::option::of(bytes()).boxed()
}

fn key_type() -> BoxedStrategy<KeyType> {
    prop_oneof![
        Just(KeyType::Aes256),
        Just(KeyType::Ecdsa),
        Just(KeyType::Rsa2048)
    ]
    .boxed()
}

fn protection() -> BoxedStrategy<Protection> {
    prop_oneof![
        Just(Protection::Basic),
        Just(Protection::Hsm),
        Just(Protection::DedicatedHsm)
    ]
    .boxed()
}

fn key_state() -> BoxedStrategy<KeyState> {
    prop_oneof![
        Just(KeyState::Enabled),
        Just(KeyState::Disabled),
        Just(KeyState::PendingDeletion),
        Just(KeyState::Deleted)
    ]
    .boxed()
}

fn scheme() -> BoxedStrategy<SignScheme> {
    prop_oneof![Just(SignScheme::Pss), Just(SignScheme::Pkcs1)].boxed()
}

fn role() -> BoxedStrategy<Role> {
    proptest::sample::select(Role::ALL.to_vec()).boxed()
}

/// How many variants `Action` has: what `action_variant` numbers.
const ACTION_VARIANTS: usize = 26;

/// Exhaustive: a new action must be added here and to `model::ACTIONS`, which the
/// strategy samples (its coverage test fails if that list misses one).
fn action_variant(a: Action) -> usize {
    match a {
        Action::Create => 0,
        Action::Show => 1,
        Action::Versions => 2,
        Action::Encrypt => 3,
        Action::Decrypt => 4,
        Action::Reencrypt => 5,
        Action::Sign => 6,
        Action::Verify => 7,
        Action::PublicKey => 8,
        Action::DataKey => 9,
        Action::Rotate => 10,
        Action::AutoRotate => 11,
        Action::Enable => 12,
        Action::Disable => 13,
        Action::EnableVersion => 14,
        Action::DisableVersion => 15,
        Action::SetRotation => 16,
        Action::SetMemo => 17,
        Action::Delete => 18,
        Action::CancelDeletion => 19,
        Action::DeleteNow => 20,
        Action::Purge => 21,
        Action::History => 22,
        Action::Impact => 23,
        Action::Grant => 24,
        Action::Revoke => 25,
    }
}

fn action() -> BoxedStrategy<Action> {
    proptest::sample::select(ACTIONS.to_vec()).boxed()
}

const EVENT_KINDS: [EventKind; 13] = [
    EventKind::Created,
    EventKind::StateChanged,
    EventKind::Rotated,
    EventKind::DeletionRequested,
    EventKind::DeletionCancelled,
    EventKind::Purged,
    EventKind::VersionEnabled,
    EventKind::VersionDisabled,
    EventKind::SettingsChanged,
    EventKind::PermissionChanged,
    EventKind::VersionLimitReached,
    EventKind::NonceBudgetLow,
    EventKind::Other,
];

/// Exhaustive: a new event kind must be added to `EVENT_KINDS` (and here).
fn event_kind_variant(k: EventKind) -> usize {
    match k {
        EventKind::Created => 0,
        EventKind::StateChanged => 1,
        EventKind::Rotated => 2,
        EventKind::DeletionRequested => 3,
        EventKind::DeletionCancelled => 4,
        EventKind::Purged => 5,
        EventKind::VersionEnabled => 6,
        EventKind::VersionDisabled => 7,
        EventKind::SettingsChanged => 8,
        EventKind::PermissionChanged => 9,
        EventKind::VersionLimitReached => 10,
        EventKind::NonceBudgetLow => 11,
        EventKind::Other => 12,
    }
}

fn wire_error() -> BoxedStrategy<WireError> {
    (proptest::sample::select(ErrorKind::ALL.to_vec()), text())
        .prop_map(|(kind, message)| WireError { kind, message })
        .boxed()
}

fn millis() -> BoxedStrategy<i64> {
    any::<i64>().boxed()
}

fn key_info() -> BoxedStrategy<KeyInfo> {
    (
        (
            text(),
            text(),
            key_type(),
            protection(),
            proptest::option::of(text()),
        ),
        (
            key_state(),
            any::<bool>(),
            any::<u32>(),
            any::<bool>(),
            any::<u32>(),
        ),
        (
            proptest::option::of(millis()),
            any::<u64>(),
            proptest::option::of(millis()),
        ),
        (
            proptest::option::of(text()),
            millis(),
            proptest::option::of(millis()),
        ),
        (proptest::option::of(millis()), text()),
    )
        .prop_map(|(a, b, c, d, e)| KeyInfo {
            name: a.0,
            tag: a.1,
            key_type: a.2,
            protection: a.3,
            hsm: a.4,
            state: b.0,
            convergent: b.1,
            current_version: b.2,
            auto_rotation: b.3,
            rotation_days: b.4,
            next_rotation_at: c.0,
            usage_count: c.1,
            last_used_at: c.2,
            last_used_by: d.0,
            created_at: d.1,
            deletion_due_at: d.2,
            deleted_at: e.0,
            memo: e.1,
        })
        .boxed()
}

fn version_info() -> BoxedStrategy<VersionInfo> {
    (any::<u32>(), any::<bool>(), millis(), any::<u64>())
        .prop_map(|(version, enabled, created_at, encryptions)| VersionInfo {
            version,
            enabled,
            created_at,
            encryptions,
        })
        .boxed()
}

fn history_entry() -> BoxedStrategy<HistoryEntry> {
    (
        (
            any::<u64>(),
            millis(),
            text(),
            action(),
            proptest::option::of(any::<u32>()),
        ),
        (text(), text(), any::<u32>(), any::<u32>(), text()),
        (any::<u32>(), any::<u32>()),
    )
        .prop_map(|(a, b, c)| HistoryEntry {
            seq: a.0,
            time: a.1,
            key_tag: a.2,
            action: a.3,
            version: a.4,
            result: b.0,
            account: b.1,
            uid: b.2,
            pid: b.3,
            client: b.4,
            items: c.0,
            failed: c.1,
        })
        .boxed()
}

fn principal() -> BoxedStrategy<Principal> {
    prop_oneof![
        text().prop_map(Principal::User),
        text().prop_map(Principal::Group)
    ]
    .boxed()
}

fn grant_info() -> BoxedStrategy<GrantInfo> {
    (
        any::<u64>(),
        role(),
        principal(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        millis(),
        text(),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(
            |(id, role, principal, key_tag, key_name, granted_at, granted_by, principal_id)| {
                GrantInfo {
                    id,
                    role,
                    principal,
                    key_tag,
                    key_name,
                    granted_at,
                    granted_by,
                    principal_id,
                }
            },
        )
        .boxed()
}

fn hsm_token() -> BoxedStrategy<HsmTokenInfo> {
    (
        text(),
        text(),
        text(),
        text(),
        millis(),
        text(),
        any::<u64>(),
    )
        .prop_map(
            |(name, module, token, pin_file, added_at, added_by, keys)| HsmTokenInfo {
                name,
                module,
                token,
                pin_file,
                added_at,
                added_by,
                keys,
            },
        )
        .boxed()
}

fn impact() -> BoxedStrategy<Impact> {
    (
        text(),
        millis(),
        any::<u64>(),
        proptest::option::of(millis()),
        vec(
            (text(), any::<u64>(), millis()).prop_map(|(account, uses, last_used_at)| AccountUse {
                account,
                uses,
                last_used_at,
            }),
            0..3,
        ),
        proptest::option::of(millis()),
    )
        .prop_map(
            |(key_tag, since, recent_uses, last_used_at, accounts, counted_back_to)| Impact {
                key_tag,
                since,
                recent_uses,
                last_used_at,
                accounts,
                counted_back_to,
            },
        )
        .boxed()
}

fn status() -> BoxedStrategy<DaemonStatus> {
    (
        (text(), any::<u32>(), any::<u32>(), millis(), text()),
        (
            text(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(millis()),
        ),
    )
        .prop_map(|(a, b)| DaemonStatus {
            daemon_version: a.0,
            protocol: a.1,
            pid: a.2,
            uptime_ms: a.3,
            socket: a.4,
            data_dir: b.0,
            keys: b.1,
            connections: b.2,
            next_due_at: b.3,
        })
        .boxed()
}

fn create_key() -> BoxedStrategy<CreateKey> {
    (
        text(),
        key_type(),
        protection(),
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(any::<u32>()),
        text(),
        proptest::option::of(text()),
    )
        .prop_map(
            |(name, key_type, protection, convergent, auto_rotation, rotation_days, memo, hsm)| {
                CreateKey {
                    name,
                    key_type,
                    protection,
                    convergent,
                    auto_rotation,
                    rotation_days,
                    memo,
                    hsm,
                }
            },
        )
        .boxed()
}

fn grant_spec() -> BoxedStrategy<GrantSpec> {
    (
        role(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(text()),
    )
        .prop_map(|(role, user, group, key)| GrantSpec {
            role,
            user,
            group,
            key,
        })
        .boxed()
}

fn history_query() -> BoxedStrategy<HistoryQuery> {
    (
        text(),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(action()),
        proptest::option::of(prop_oneof![
            Just(ResultFilter::Ok),
            Just(ResultFilter::Error)
        ]),
        proptest::option::of(millis()),
    )
        .prop_map(
            |(key, limit, before_seq, action, result, since)| HistoryQuery {
                key,
                limit,
                before_seq,
                action,
                result,
                since,
            },
        )
        .boxed()
}

fn plaintext_items() -> BoxedStrategy<Vec<PlaintextItem>> {
    vec(
        (bytes(), opt_bytes()).prop_map(|(plaintext, context)| PlaintextItem {
            plaintext: plaintext.into(),
            context,
        }),
        0..4,
    )
    .boxed()
}

fn ciphertext_items() -> BoxedStrategy<Vec<CiphertextItem>> {
    vec(
        (text(), opt_bytes()).prop_map(|(ciphertext, context)| CiphertextItem {
            ciphertext,
            context,
        }),
        0..4,
    )
    .boxed()
}

/// Exhaustive: a new request does not compile here until `request()` generates it.
fn request_variant(r: &Request) -> usize {
    match r {
        Request::Hello { .. } => 0,
        Request::Status => 1,
        Request::CreateKey(_) => 2,
        Request::ListKeys { .. } => 3,
        Request::GetKey { .. } => 4,
        Request::ListVersions { .. } => 5,
        Request::Encrypt { .. } => 6,
        Request::Decrypt { .. } => 7,
        Request::Reencrypt { .. } => 8,
        Request::EncryptBatch { .. } => 9,
        Request::DecryptBatch { .. } => 10,
        Request::ReencryptBatch { .. } => 11,
        Request::Sign { .. } => 12,
        Request::Verify { .. } => 13,
        Request::PublicKey { .. } => 14,
        Request::DataKey { .. } => 15,
        Request::Rotate { .. } => 16,
        Request::Enable { .. } => 17,
        Request::Disable { .. } => 18,
        Request::EnableVersion { .. } => 19,
        Request::DisableVersion { .. } => 20,
        Request::SetRotation { .. } => 21,
        Request::SetMemo { .. } => 22,
        Request::RequestDeletion { .. } => 23,
        Request::CancelDeletion { .. } => 24,
        Request::DeleteNow { .. } => 25,
        Request::History(_) => 26,
        Request::Impact { .. } => 27,
        Request::Subscribe => 28,
        Request::Grant(_) => 29,
        Request::Revoke(_) => 30,
        Request::ListGrants => 31,
        Request::Backup => 32,
        Request::BackupRead { .. } => 33,
        Request::HsmAdd { .. } => 34,
        Request::HsmList => 35,
        Request::HsmRemove { .. } => 36,
    }
}
const REQUEST_VARIANTS: usize = 37;

fn request() -> BoxedStrategy<Request> {
    let key = text;
    prop_oneof![
        (any::<u32>(), text()).prop_map(|(protocol, client)| Request::Hello { protocol, client }),
        Just(Request::Status),
        create_key().prop_map(Request::CreateKey),
        (
            any::<bool>(),
            any::<u32>(),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(deleted, offset, limit)| Request::ListKeys {
                deleted,
                offset,
                limit
            }),
        key().prop_map(|key| Request::GetKey { key }),
        key().prop_map(|key| Request::ListVersions { key }),
        (key(), bytes(), opt_bytes()).prop_map(|(key, plaintext, context)| Request::Encrypt {
            key,
            plaintext: plaintext.into(),
            context
        }),
        (key(), text(), opt_bytes()).prop_map(|(key, ciphertext, context)| Request::Decrypt {
            key,
            ciphertext,
            context
        }),
        (key(), text(), opt_bytes()).prop_map(|(key, ciphertext, context)| Request::Reencrypt {
            key,
            ciphertext,
            context
        }),
        (key(), plaintext_items()).prop_map(|(key, items)| Request::EncryptBatch { key, items }),
        (key(), ciphertext_items()).prop_map(|(key, items)| Request::DecryptBatch { key, items }),
        (key(), ciphertext_items()).prop_map(|(key, items)| Request::ReencryptBatch { key, items }),
        (key(), bytes(), scheme()).prop_map(|(key, message, scheme)| Request::Sign {
            key,
            message,
            scheme
        }),
        (key(), bytes(), text(), scheme()).prop_map(|(key, message, signature, scheme)| {
            Request::Verify {
                key,
                message,
                signature,
                scheme,
            }
        }),
        (key(), proptest::option::of(any::<u32>()))
            .prop_map(|(key, version)| Request::PublicKey { key, version }),
        (key(), any::<u32>(), any::<bool>(), opt_bytes()).prop_map(
            |(key, bits, plaintext, context)| Request::DataKey {
                key,
                bits,
                plaintext,
                context
            }
        ),
        key().prop_map(|key| Request::Rotate { key }),
        key().prop_map(|key| Request::Enable { key }),
        key().prop_map(|key| Request::Disable { key }),
        (key(), any::<u32>()).prop_map(|(key, version)| Request::EnableVersion { key, version }),
        (key(), any::<u32>()).prop_map(|(key, version)| Request::DisableVersion { key, version }),
        (key(), any::<bool>(), proptest::option::of(any::<u32>())).prop_map(
            |(key, auto_rotation, rotation_days)| Request::SetRotation {
                key,
                auto_rotation,
                rotation_days
            }
        ),
        (key(), text()).prop_map(|(key, memo)| Request::SetMemo { key, memo }),
        key().prop_map(|key| Request::RequestDeletion { key }),
        key().prop_map(|key| Request::CancelDeletion { key }),
        key().prop_map(|key| Request::DeleteNow { key }),
        history_query().prop_map(Request::History),
        (key(), proptest::option::of(millis()))
            .prop_map(|(key, window_ms)| Request::Impact { key, window_ms }),
        Just(Request::Subscribe),
        grant_spec().prop_map(Request::Grant),
        grant_spec().prop_map(Request::Revoke),
        Just(Request::ListGrants),
        Just(Request::Backup),
        (text(), any::<u64>())
            .prop_map(|(snapshot, offset)| Request::BackupRead { snapshot, offset }),
        (text(), text(), text(), text()).prop_map(|(name, module, token, pin_file)| {
            Request::HsmAdd {
                name,
                module,
                token,
                pin_file,
            }
        }),
        Just(Request::HsmList),
        text().prop_map(|name| Request::HsmRemove { name }),
    ]
    .boxed()
}

/// Exhaustive: a new response does not compile here until `response()` generates it.
fn response_variant(r: &Response) -> usize {
    match r {
        Response::Hello { .. } => 0,
        Response::Status(_) => 1,
        Response::Key(_) => 2,
        Response::Keys { .. } => 3,
        Response::Versions { .. } => 4,
        Response::Ciphertext { .. } => 5,
        Response::Plaintext { .. } => 6,
        Response::Signature { .. } => 7,
        Response::Verified { .. } => 8,
        Response::PublicKey { .. } => 9,
        Response::DataKey { .. } => 10,
        Response::Batch { .. } => 11,
        Response::History { .. } => 12,
        Response::Impact(_) => 13,
        Response::Subscribed => 14,
        Response::Grant(_) => 15,
        Response::Grants { .. } => 16,
        Response::BackupChunk { .. } => 17,
        Response::HsmToken(_) => 18,
        Response::HsmTokens { .. } => 19,
    }
}
const RESPONSE_VARIANTS: usize = 20;

fn item_outcome() -> BoxedStrategy<ItemOutcome> {
    prop_oneof![
        text().prop_map(ItemOutcome::Ciphertext),
        bytes().prop_map(|p| ItemOutcome::Plaintext(p.into())),
        wire_error().prop_map(ItemOutcome::Err),
    ]
    .boxed()
}

/// Exhaustive over `ItemOutcome`.
fn item_variant(i: &ItemOutcome) -> usize {
    match i {
        ItemOutcome::Ciphertext(_) => 0,
        ItemOutcome::Plaintext(_) => 1,
        ItemOutcome::Err(_) => 2,
    }
}

fn response() -> BoxedStrategy<Response> {
    prop_oneof![
        (any::<u32>(), text(), any::<Option<u32>>()).prop_map(
            |(protocol, daemon_version, max_frame)| Response::Hello {
                protocol,
                daemon_version,
                max_frame
            }
        ),
        status().prop_map(Response::Status),
        key_info().prop_map(Response::Key),
        (vec(key_info(), 0..3), any::<u64>())
            .prop_map(|(keys, total)| Response::Keys { keys, total }),
        vec(version_info(), 0..4).prop_map(|versions| Response::Versions { versions }),
        text().prop_map(|ciphertext| Response::Ciphertext { ciphertext }),
        bytes().prop_map(|plaintext| Response::Plaintext {
            plaintext: plaintext.into()
        }),
        text().prop_map(|signature| Response::Signature { signature }),
        any::<bool>().prop_map(|valid| Response::Verified { valid }),
        (any::<u32>(), text()).prop_map(|(version, pem)| Response::PublicKey { version, pem }),
        (text(), opt_bytes(), any::<u32>()).prop_map(|(ciphertext, plaintext, bits)| {
            Response::DataKey {
                ciphertext,
                plaintext: plaintext.map(Into::into),
                bits,
            }
        }),
        vec(item_outcome(), 0..6).prop_map(|items| Response::Batch { items }),
        (
            vec(history_entry(), 0..3),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(entries, resume_before_seq)| Response::History {
                entries,
                resume_before_seq
            }),
        impact().prop_map(Response::Impact),
        Just(Response::Subscribed),
        grant_info().prop_map(Response::Grant),
        vec(grant_info(), 0..3).prop_map(|grants| Response::Grants { grants }),
        (text(), any::<u64>(), bytes(), any::<u64>(), any::<bool>()).prop_map(
            |(snapshot, offset, data, total, done)| Response::BackupChunk {
                snapshot,
                offset,
                data,
                total,
                done
            }
        ),
        hsm_token().prop_map(Response::HsmToken),
        vec(hsm_token(), 0..3).prop_map(|tokens| Response::HsmTokens { tokens }),
    ]
    .boxed()
}

fn event() -> BoxedStrategy<Event> {
    (
        (
            any::<u64>(),
            millis(),
            proptest::sample::select(EVENT_KINDS.to_vec()),
        ),
        (proptest::option::of(text()), proptest::option::of(text())),
        (
            proptest::option::of(any::<u32>()),
            proptest::option::of(key_state()),
        ),
        (text(), text()),
    )
        .prop_map(|(a, b, c, d)| Event {
            seq: a.0,
            time: a.1,
            kind: a.2,
            key_tag: b.0,
            key_name: b.1,
            version: c.0,
            state: c.1,
            account: d.0,
            message: d.1,
        })
        .boxed()
}

/// Exhaustive over `ServerFrame` (with the outcome's two sides).
fn server_variant(f: &ServerFrame) -> usize {
    match f {
        ServerFrame::Reply {
            result: Outcome::Ok(_),
            ..
        } => 0,
        ServerFrame::Reply {
            result: Outcome::Err(_),
            ..
        } => 1,
        ServerFrame::Event(_) => 2,
        ServerFrame::Lagged { .. } => 3,
    }
}

fn server_frame() -> BoxedStrategy<ServerFrame> {
    prop_oneof![
        (any::<u64>(), response()).prop_map(|(id, r)| ServerFrame::Reply {
            id,
            result: Outcome::Ok(r)
        }),
        (any::<u64>(), wire_error()).prop_map(|(id, e)| ServerFrame::Reply {
            id,
            result: Outcome::Err(e)
        }),
        event().prop_map(ServerFrame::Event),
        any::<u64>().prop_map(|missed| ServerFrame::Lagged { missed }),
    ]
    .boxed()
}

/// Encodes with its length prefix, reads the frame back as the peer would, decodes.
fn through_the_wire<T>(msg: &T) -> T
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let frame = codec::encode_frame(msg, u32::MAX).unwrap();
    let mut rd = &frame[..];
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let body = rt
        .block_on(codec::read_frame(&mut rd, u32::MAX))
        .unwrap()
        .unwrap();
    assert!(rd.is_empty(), "the frame's length prefix is wrong");
    codec::decode(&body).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every request, in a client frame, round-trips unchanged.
    #[test]
    fn client_frames_round_trip(id in any::<u64>(), request in request()) {
        let frame = ClientFrame { id, request };
        prop_assert_eq!(through_the_wire(&frame), frame);
    }

    /// Every reply (each response, each error kind), event and lag notice round-trips.
    #[test]
    fn server_frames_round_trip(frame in server_frame()) {
        prop_assert_eq!(through_the_wire(&frame), frame);
    }

    /// Every version and body of the ciphertext/signature format round-trips, with the
    /// trailing newline a shell adds, and the formatted text is canonical.
    #[test]
    fn ciphertext_format_round_trips(version in 1u32.., body in vec(any::<u8>(), 0..300)) {
        let s = ciphertext::format(version, &body);
        prop_assert_eq!(ciphertext::parse(&s), Ok((version, body.clone())));
        prop_assert_eq!(ciphertext::parse(&format!("{s}\n")), Ok((version, body.clone())));
        let (v, b) = ciphertext::parse(&s).unwrap();
        prop_assert_eq!(ciphertext::format(v, &b), s);
    }

    /// Any string that parses formats back to itself (trimmed): no two strings name the
    /// same ciphertext, so a modified one cannot pass for the original.
    #[test]
    fn ciphertext_parse_is_canonical(s in "ncpkms:v[0-9]{1,11}:[A-Za-z0-9+/=]{0,12}\\s?") {
        if let Ok((v, b)) = ciphertext::parse(&s) {
            prop_assert_eq!(ciphertext::format(v, &b), s.trim());
        }
    }
}

/// Draws `n` values and returns which variants appeared.
fn coverage<T: std::fmt::Debug>(
    s: BoxedStrategy<T>,
    n: usize,
    variants: usize,
    index: impl Fn(&T) -> usize,
) -> Vec<usize> {
    let mut runner = TestRunner::deterministic();
    let mut seen = vec![0usize; variants];
    for _ in 0..n {
        let v = s.new_tree(&mut runner).unwrap().current();
        seen[index(&v)] += 1;
    }
    (0..variants).filter(|i| seen[*i] == 0).collect()
}

/// The strategies above reach every request, response, outcome, item, error kind,
/// event kind and action (so the round trips cover every message).
#[test]
fn strategies_cover_every_variant() {
    assert_eq!(
        coverage(request(), 4000, REQUEST_VARIANTS, request_variant),
        Vec::<usize>::new()
    );
    assert_eq!(
        coverage(response(), 3000, RESPONSE_VARIANTS, response_variant),
        Vec::<usize>::new()
    );
    assert_eq!(
        coverage(server_frame(), 500, 4, server_variant),
        Vec::<usize>::new()
    );
    assert_eq!(
        coverage(item_outcome(), 300, 3, item_variant),
        Vec::<usize>::new()
    );
    assert_eq!(
        coverage(action(), 2000, ACTION_VARIANTS, |a| action_variant(*a)),
        Vec::<usize>::new()
    );
    assert_eq!(
        coverage(
            event().prop_map(|e| e.kind).boxed(),
            1000,
            EVENT_KINDS.len(),
            |k| { event_kind_variant(*k) }
        ),
        Vec::<usize>::new()
    );
    let kinds = coverage(wire_error(), 1000, ErrorKind::ALL.len(), |e| {
        ErrorKind::ALL.iter().position(|k| *k == e.kind).unwrap()
    });
    assert_eq!(kinds, Vec::<usize>::new());
}
