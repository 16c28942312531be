//! Every user-facing string of the dashboard, kept in one place so the wording can be
//! reviewed as a whole. Times are shown in UTC so that what two operators in different
//! time zones read off the screen is the same.

use kms_shared::model::{
    Action as HistoryAction, GrantInfo, HistoryEntry, KeyInfo, KeyState, KeyType, Principal,
    Protection, Role, UnixMillis,
};
use kms_shared::protocol::{Event, EventKind, GrantSpec, HsmTokenInfo};

use std::time::Duration;

use super::action::Op;
use super::retry::Next;

pub const SERVICE_NAME: &str = "Key Management Service";
pub const CONNECTING: &str = "◌ connecting…";
pub const DISCONNECTED: &str = "○ disconnected · reconnecting";

pub fn connected(daemon_version: &str) -> String {
    format!("● connected · kmsd {daemon_version}")
}

pub fn key_count(shown: usize, total: usize, filtered: bool) -> String {
    let noun = if total == 1 { "key" } else { "keys" };
    if filtered {
        format!("{} of {} {noun}", count(shown as u64), count(total as u64))
    } else {
        format!("{} {noun}", count(total as u64))
    }
}

pub const LOADING_KEYS: &str = "loading keys…";
/// No key this account may see: none exists, or it holds no role on any (kmsd lists only
/// what the caller may see, and does not say which).
pub const NO_KEYS: &str = "No keys you can see: press c to create one (managers may).";
pub const NO_MATCH: &str = "No key matches the filter (esc clears it).";
pub const NO_KEY_SELECTED: &str = "no key selected";
pub const NO_GRANT_SELECTED: &str = "no grant selected";
pub const NO_TOKEN_SELECTED: &str = "no HSM token selected";

// Key list columns, in the seed console's order.
pub const COL_NAME: &str = "Name";
pub const COL_PROTECTION: &str = "Protection";
pub const COL_TYPE: &str = "Type";
pub const COL_STATE: &str = "State";
/// The date beside the state: the last use, or when a pending deletion is due.
pub const COL_WHEN: &str = "Used / due";
pub const COL_CREATED: &str = "Created";
pub const COL_TAG: &str = "Tag";
pub const COL_CONVERGENT: &str = "Conv";
pub const COL_VERSION: &str = "Ver";
pub const COL_AUTO: &str = "Auto";
pub const COL_PERIOD: &str = "Period (next)";
pub const COL_USES: &str = "Uses";
pub const COL_MEMO: &str = "Memo";

// Details.
pub const DETAILS_TITLE_SUFFIX: &str = "times in UTC";
pub const L_TAG: &str = "Tag";
pub const L_NAME: &str = "Name";
pub const L_TYPE: &str = "Type";
pub const L_STATE: &str = "State";
pub const L_PROTECTION: &str = "Protection";
pub const L_PURPOSE: &str = "Purpose";
pub const L_CONVERGENT: &str = "Convergent";
pub const L_CREATED: &str = "Created";
pub const L_VERSION: &str = "Version";
pub const L_LAST_USED: &str = "Last used";
pub const L_USES: &str = "Uses";
pub const L_ROTATION: &str = "Rotation";
pub const L_DELETION: &str = "Deletion";
pub const L_DELETED: &str = "Deleted";
pub const L_MEMO: &str = "Memo";
pub const DETAILS_HINT: &str = "enter/v versions · h history · esc back";

pub fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

pub fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

pub fn state_label(s: KeyState) -> &'static str {
    s.as_str()
}

/// The state column: the state, then the date that matters for it (last use, or when a
/// pending deletion becomes final), as the seed console shows it.
/// The list's date beside the state ([`COL_WHEN`]): when a pending deletion is due (or a
/// purge happened), else the last use.
pub fn when_cell(k: &KeyInfo) -> String {
    let when = match k.state {
        KeyState::PendingDeletion => k.deletion_due_at.map(date),
        KeyState::Deleted => k.deleted_at.map(date),
        KeyState::Enabled | KeyState::Disabled => k.last_used_at.map(date),
    };
    when.unwrap_or_else(|| "-".into())
}

pub fn protection_label(p: Protection) -> &'static str {
    p.as_str()
}

pub fn type_label(t: KeyType) -> &'static str {
    t.display_name()
}

/// Whether a key rotates automatically no more because it has all the versions it may
/// (its setting says on: a period shown alone would read as rotation going on).
fn rotation_stopped(k: &KeyInfo) -> bool {
    k.auto_rotation && k.current_version >= k.protection.max_versions()
}

pub fn period_cell(k: &KeyInfo) -> String {
    match (k.auto_rotation, k.next_rotation_at) {
        (true, Some(next)) => format!("{}d {}", k.rotation_days, date(next)),
        _ if rotation_stopped(k) => format!("{}d limit", k.rotation_days),
        _ => format!("{}d", k.rotation_days),
    }
}

pub fn version_detail(k: &KeyInfo) -> String {
    format!(
        "v{} of max {}",
        k.current_version,
        k.protection.max_versions()
    )
}

pub fn last_used_detail(k: &KeyInfo) -> String {
    match (k.last_used_at, &k.last_used_by) {
        (Some(t), Some(by)) => format!("{} by {by}", datetime(t)),
        (Some(t), None) => datetime(t),
        _ => "never".into(),
    }
}

pub fn rotation_detail(k: &KeyInfo) -> String {
    match (k.auto_rotation, k.next_rotation_at) {
        (true, Some(next)) => format!(
            "auto every {} days · next {}",
            k.rotation_days,
            datetime(next)
        ),
        (true, None) if rotation_stopped(k) => format!(
            "auto every {} days · stopped: the key has all the versions it may",
            k.rotation_days
        ),
        (true, None) => format!("auto every {} days", k.rotation_days),
        (false, _) => format!("manual (period {} days when on)", k.rotation_days),
    }
}

pub fn deletion_detail(k: &KeyInfo) -> String {
    match (k.state, k.deletion_due_at, k.deleted_at) {
        (_, _, Some(t)) => format!("purged {}", datetime(t)),
        (KeyState::PendingDeletion, Some(t), _) => format!("due {}", datetime(t)),
        _ => "-".into(),
    }
}

pub fn memo_detail(k: &KeyInfo) -> String {
    if k.memo.is_empty() {
        "-".into()
    } else {
        k.memo.clone()
    }
}

// Footer and help.
pub const H_UP_DOWN: &str = "move";
pub const H_PAGE: &str = "page up / down";
pub const H_TOP_BOTTOM: &str = "first / last";
pub const H_ENTER: &str = "details, then versions";
pub const H_ESC: &str = "back, close, clear filter, then the message";
pub const H_FILTER: &str = "filter by name or tag";
pub const H_HELP: &str = "this help";
pub const H_QUIT: &str = "quit";
pub const H_MESSAGE: &str = "last message in full";
pub const H_CREATE: &str = "create a key";
pub const H_ROTATE: &str = "rotate now";
pub const H_DISABLE: &str = "disable";
pub const H_ENABLE: &str = "enable";
pub const H_DELETE: &str = "request deletion";
pub const H_UNDELETE: &str = "cancel deletion";
pub const H_DELETE_NOW: &str = "delete now";
pub const H_AUTO: &str = "auto rotation on/off";
pub const H_PERIOD: &str = "rotation period";
pub const H_MEMO: &str = "memo";
pub const H_VERSIONS: &str = "versions";
pub const H_HISTORY: &str = "history";
pub const H_TOGGLE_VERSION: &str = "enable; disable asks y/n";
pub const H_FIELD: &str = "next / previous field";
pub const H_CHANGE: &str = "change choice";
pub const H_TEXT_KEYS: &str = "start, end, clear before";
pub const H_SUBMIT: &str = "submit";
pub const H_YES: &str = "yes (enter: rotations)";
pub const H_NO: &str = "no, cancel";
pub const H_PERMISSIONS: &str = "permissions (grants)";
pub const H_TOKENS: &str = "HSM tokens";
pub const H_EVENTS: &str = "events received";
pub const H_NEW: &str = "new grant, register token";
pub const H_REMOVE: &str = "revoke grant, remove token";

pub const F_HELP: &str = "help";
pub const F_FILTER: &str = "filter";
pub const F_DETAILS: &str = "details";
pub const F_CREATE: &str = "create";
pub const F_ROTATE: &str = "rotate";
pub const F_DISABLE: &str = "disable";
pub const F_ENABLE: &str = "enable";
pub const F_DELETE: &str = "delete";
pub const F_UNDELETE: &str = "cancel deletion";
pub const F_DELETE_NOW: &str = "delete now";
pub const F_AUTO: &str = "auto-rot";
pub const F_PERIOD: &str = "period";
pub const F_MEMO: &str = "memo";
pub const F_VERSIONS: &str = "versions";
pub const F_HISTORY: &str = "history";
pub const F_QUIT: &str = "quit";
pub const F_BACK: &str = "back";
pub const F_TOGGLE: &str = "toggle";
pub const F_MOVE: &str = "move";
pub const F_APPLY: &str = "apply";
pub const F_CLEAR: &str = "clear";
pub const F_FIELD: &str = "field";
pub const F_CHANGE: &str = "change";
pub const F_SUBMIT: &str = "create";
pub const F_CANCEL: &str = "cancel";
pub const F_YES: &str = "yes";
pub const F_NO: &str = "no";
pub const F_CONFIRM: &str = "confirm";
pub const F_CLOSE: &str = "close";
pub const F_PERMISSIONS: &str = "permissions";
pub const F_TOKENS: &str = "tokens";
pub const F_EVENTS: &str = "events";
pub const F_GO_TO_KEY: &str = "open key";
pub const F_NEW_GRANT: &str = "new grant";
pub const F_REVOKE: &str = "revoke";
pub const F_REGISTER: &str = "register";
pub const F_REMOVE: &str = "remove";
pub const F_GRANT: &str = "grant";
pub const F_SCROLL: &str = "scroll";

pub const HELP_TITLE: &str = " Help — key bindings ";
pub const HELP_SECTION_MOVE: &str = "Moving around";
pub const HELP_SECTION_KEYS: &str = "Key actions";
pub const HELP_SECTION_VIEWS: &str = "Views, forms and prompts";
pub const HELP_SECTION_ADMIN: &str = "Permissions and HSM tokens";
pub const HELP_SECTION_TEXT: &str = "Text fields: ← → home end del";

pub const FILTER_PROMPT: &str = "/";

// The message area and its pop-up.
/// Ends the last row of a message too long for the message area.
pub const MESSAGE_MORE: &str = "… (M shows all)";
pub const MESSAGE_TITLE: &str = " Last message ";
pub const MESSAGE_SCROLL_HINT: &str = "↑↓ scroll";

// Create form.
pub const FORM_TITLE: &str = " Create key ";
pub const FORM_NAME: &str = "Name";
pub const FORM_TYPE: &str = "Type";
pub const FORM_PROTECTION: &str = "Protection";
pub const FORM_CONVERGENT: &str = "Convergent";
pub const FORM_AUTO: &str = "Auto rotation";
pub const FORM_DAYS: &str = "Period (days)";
pub const FORM_MEMO: &str = "Memo";
pub const FORM_TOKEN: &str = "HSM token";
/// The token field when the protection is not dedicated-hsm.
pub const FORM_NOT_APPLICABLE: &str = "—";
pub const FORM_TOKENS_LOADING: &str = "loading tokens…";
pub const FORM_NO_TOKENS: &str = "none registered";
pub const TOKENS_STILL_LOADING: &str = "the list of HSM tokens is still loading";
pub const NO_TOKEN_REGISTERED: &str =
    "no HSM token is registered: register one in the tokens view (esc, then T)";
pub const CHOOSE_TOKEN: &str = "choose the HSM token to create the key on";

pub fn tokens_failed(msg: &str) -> String {
    format!("could not load the HSM tokens: {msg}")
}
pub const FORM_AES_ONLY: &str = "(AES256 only)";
pub const FORM_FIX_FIRST: &str = "Fix the marked fields first.";
pub const FORM_SUBMITTING: &str = "creating…";
/// A form taller than the screen: more fields above or below the ones shown.
pub const MORE_ABOVE: &str = " ↑ more ";
pub const MORE_BELOW: &str = " ↓ more ";
pub const DAYS_NOT_A_NUMBER: &str = "the rotation period is a whole number of days (1 to 730)";

pub fn name_taken(name: &str) -> String {
    format!("a key named {name:?} already exists")
}

/// A failed action as the user reads it: a refusal is the daemon's, but with no daemon
/// connected nothing refused it.
pub fn daemon_refused(msg: &str) -> String {
    if msg == NOT_CONNECTED {
        return format!("{NOT_CONNECTED}: nothing was done (reconnecting)");
    }
    format!("kmsd refused: {msg}")
}

// Confirmations.
pub fn confirm_rotate_title(name: &str) -> String {
    format!(" Rotate {name}? ")
}
pub fn confirm_rotate_body(k: &KeyInfo) -> String {
    format!(
        "Version v{} becomes current and is used for all new encryption and signing; \
         older versions still decrypt and verify. The auto-rotation schedule does not move.",
        k.current_version + 1
    )
}
pub fn confirm_auto_rotation_title(name: &str, on: bool) -> String {
    if on {
        format!(" Rotate {name} automatically? ")
    } else {
        format!(" Stop rotating {name} automatically? ")
    }
}
pub fn confirm_auto_rotation_body(k: &KeyInfo, on: bool) -> String {
    // A key at its version limit gets no new version from a schedule either.
    if on && k.current_version >= k.protection.max_versions() {
        return format!(
            "{}. Switched on, the schedule makes no version either.",
            at_version_limit(k)
        );
    }
    if on {
        format!(
            "A new version every {} days, the first {} days from now (a new period starts \
             now).",
            k.rotation_days, k.rotation_days
        )
    } else {
        "No version is made on a schedule until it is switched on again, which starts a \
         new period."
            .to_string()
    }
}
pub fn confirm_disable_title(name: &str) -> String {
    format!(" Disable {name}? ")
}
pub const CONFIRM_DISABLE_BODY: &str = "Every program that uses this key will get errors until \
     it is enabled again. Check who uses it:";
pub fn confirm_delete_title(name: &str) -> String {
    format!(" Request deletion of {name}? ")
}
pub const CONFIRM_DELETE_BODY: &str = "The key stops working now and is destroyed for good \
     after the deletion wait (72 hours by default); until then the request can be cancelled. \
     Check who uses it:";
pub fn confirm_delete_now_title(name: &str) -> String {
    format!(" Delete {name} now? ")
}
pub const CONFIRM_DELETE_NOW_BODY: &str = "The key material is destroyed at once and cannot be \
     recovered: anything still encrypted under it is lost. Check who used it:";
pub fn confirm_disable_version_title(name: &str, version: u32) -> String {
    format!(" Disable v{version} of {name}? ")
}
pub fn confirm_disable_version_body(version: u32, current: bool) -> String {
    if current {
        format!(
            "v{version} is the current version: encryption and signing are refused until \
             v{version} is enabled again or the key is rotated, and data encrypted or signed \
             under v{version} cannot be decrypted or verified meanwhile. Check who uses the key:"
        )
    } else {
        format!(
            "Data encrypted or signed under v{version} cannot be decrypted or verified until \
             v{version} is enabled again; the other versions keep working. Check who uses \
             the key:"
        )
    }
}
pub const TYPE_NAME_PROMPT: &str = "Type the key name to confirm:";
pub const TYPE_NAME_MISMATCH: &str = "that is not the key's name";
pub const CONFIRM_HINT_YN: &str = "y confirm · n/esc cancel";
/// The hint of a confirmation that destroys nothing (rotation), where enter is yes too.
pub const CONFIRM_HINT_YN_ENTER: &str = "y/enter confirm · n/esc cancel";
/// Enter in a destructive confirmation.
pub const CONFIRM_NEEDS_Y: &str = "press y to confirm (enter does not), n or esc to cancel";
pub const CONFIRM_HINT_TYPE: &str = "enter delete · esc cancel";
pub const IMPACT_LOADING: &str = "loading recent usage…";

pub fn impact_failed(msg: &str) -> String {
    format!("could not load recent usage: {msg}")
}

/// `counted_back_to`: the daemon stopped reading history there, short of `since`.
pub fn impact_summary(
    uses: u64,
    accounts: usize,
    since: UnixMillis,
    counted_back_to: Option<UnixMillis>,
) -> String {
    // What was counted is exact back to where the daemon stopped reading.
    let (since, partial) = match counted_back_to {
        Some(t) => (t, " (older history not read)"),
        None => (since, ""),
    };
    if uses == 0 {
        format!("No successful use since {}{partial}.", date(since))
    } else {
        let acc = if accounts == 1 { "account" } else { "accounts" };
        let times = if uses == 1 { "time" } else { "times" };
        format!(
            "Used {} {times} since {}{partial} by {accounts} {acc}:",
            count(uses),
            date(since)
        )
    }
}

pub fn impact_account(account: &str, uses: u64, last: UnixMillis) -> String {
    let noun = if uses == 1 { "use " } else { "uses" };
    format!(
        "  {account:<16} {:>9} {noun}   last {}",
        count(uses),
        datetime(last)
    )
}

pub fn impact_more(n: usize) -> String {
    format!("  … and {n} more")
}

// Prompts.
pub fn period_prompt_title(name: &str) -> String {
    format!(" Rotation period of {name} ")
}
pub const PERIOD_PROMPT: &str = "Days between automatic rotations (1 to 730):";
pub fn memo_prompt_title(name: &str) -> String {
    format!(" Memo of {name} ")
}
pub const MEMO_PROMPT: &str = "At most 100 characters:";
pub const PROMPT_HINT: &str = "enter save · esc cancel";

// Versions view.
pub fn versions_title(name: &str) -> String {
    format!(" Versions of {name} ")
}
pub const V_COL_VERSION: &str = "Version";
pub const V_COL_STATUS: &str = "Status";
pub const V_COL_CREATED: &str = "Created (UTC)";
pub const V_COL_ENCRYPTIONS: &str = "Encryptions";
pub const V_CURRENT: &str = "current";
pub const V_ENABLED: &str = "enabled";
pub const V_DISABLED: &str = "disabled";
pub const V_LOADING: &str = "loading versions…";

pub fn versions_state_note(state: KeyState) -> Option<String> {
    match state {
        KeyState::Enabled => None,
        s => Some(format!(
            "The key is {s}: no version works until the key is enabled again."
        )),
    }
}

// History view.
pub fn history_title(name: &str) -> String {
    format!(" History of {name} ")
}
pub const HI_COL_CLIENT: &str = "Client";
pub const HI_COL_TIME: &str = "Time (UTC)";
pub const HI_COL_ACTION: &str = "Action";
pub const HI_COL_VERSION: &str = "Ver";
pub const HI_COL_RESULT: &str = "Result";
pub const HI_COL_ACCOUNT: &str = "Account";
pub const HI_COL_IDS: &str = "Uid/Pid";
pub const HI_LOADING: &str = "loading history…";
pub const HI_EMPTY: &str = "No history entries.";

pub fn history_status(n: usize, loading: bool, exhausted: bool) -> String {
    let more = if loading {
        " · loading more…"
    } else if exhausted {
        " · end of history"
    } else {
        " · scroll down for more"
    };
    format!("newest first · {} entries{more}", count(n as u64))
}

pub fn history_action(a: HistoryAction) -> &'static str {
    a.as_str()
}

/// The result column: a batch call (one entry for many items) shows its item count, and
/// how many of them failed.
pub fn history_result(e: &HistoryEntry) -> String {
    match (e.items, e.failed) {
        (1, _) => e.result.clone(),
        (n, 0) => format!("{} ×{n}", e.result),
        (n, f) => format!("{} {f}/{n}", e.result),
    }
}

// Permissions view.
pub const GRANTS_TITLE: &str = " Permissions ";
pub const G_COL_ROLE: &str = "Role";
pub const G_COL_NCP: &str = "NCP role";
pub const G_COL_FOR: &str = "For";
pub const G_COL_KEY: &str = "Key";
pub const G_COL_GRANTED: &str = "Granted (UTC)";
pub const G_COL_BY: &str = "By";
pub const G_LOADING: &str = "loading grants…";
pub const G_EMPTY: &str =
    "No grants: only root and kmsd's own account can use kms. Press n to grant a role.";
pub const ALL_KEYS: &str = "all keys";

pub fn grants_status(n: usize) -> String {
    let noun = if n == 1 { "grant" } else { "grants" };
    format!(
        "{} {noun} · roles of users and groups, for all keys or one key",
        count(n as u64)
    )
}

pub fn role_label(r: Role) -> &'static str {
    r.as_str()
}

/// What a role allows, in a few words (SPEC §6).
pub fn role_summary(r: Role) -> &'static str {
    match r {
        Role::Manager => "everything, including create and permissions",
        Role::KeyManager => "enable/disable, rotate, settings, deletion, history",
        Role::KeyReviewer => "see keys and history",
        Role::KeyUser => "encrypt, decrypt, sign, verify, data keys",
    }
}

/// "user alice", "group ops".
pub fn principal(p: &Principal) -> String {
    p.to_string()
}

/// The key a grant is for: its name, or "all keys".
pub fn grant_key(g: &GrantInfo) -> String {
    match (&g.key_name, &g.key_tag) {
        (Some(n), _) => n.clone(),
        (None, Some(t)) => t.clone(),
        (None, None) => ALL_KEYS.into(),
    }
}

/// "key-user for user alice on payments".
pub fn grant_label(g: &GrantInfo) -> String {
    format!(
        "{} for {} on {}",
        g.role,
        principal(&g.principal),
        grant_key(g)
    )
}

/// The same for a request; `key` is the key's name where known.
pub fn grant_spec_label(spec: &GrantSpec, key: Option<&str>) -> String {
    let who = match (&spec.user, &spec.group) {
        (Some(u), _) => format!("user {u}"),
        (None, Some(g)) => format!("group {g}"),
        (None, None) => "-".into(),
    };
    let on = match (key, &spec.key) {
        (Some(name), _) => name.to_string(),
        (None, Some(k)) => k.clone(),
        (None, None) => ALL_KEYS.into(),
    };
    format!("{} for {who} on {on}", spec.role)
}

// Grant form.
pub const GRANT_FORM_TITLE: &str = " New grant ";
pub const GF_ROLE: &str = "Role";
pub const GF_KIND: &str = "For a";
pub const GF_NAME: &str = "Name";
pub const GF_SCOPE: &str = "Keys";
pub const GF_USER: &str = "user";
pub const GF_GROUP: &str = "group";
pub fn gf_one_key(name: &str) -> String {
    format!("only {name}")
}
pub const GF_NOTE: &str = "The user or group must exist on this machine; kmsd checks it.";
pub const GF_SUBMITTING: &str = "granting…";
pub const PRINCIPAL_EMPTY: &str = "name the user or group";
pub const PRINCIPAL_SPACES: &str = "a user or group name has no spaces";

// Revoke confirmation.
pub const REVOKE_TITLE: &str = " Revoke a grant? ";
pub fn revoke_body(g: &GrantInfo) -> String {
    format!(
        "{} loses the role {} ({}) on {}. Requests that rely on it are refused from now on.",
        principal(&g.principal),
        g.role,
        g.role.ncp_name(),
        grant_key(g)
    )
}

// Events view.
pub const EVENTS_TITLE: &str = " Events · times in UTC ";
pub const E_COL_TIME: &str = "Time (UTC)";
/// The time-of-day column of narrow terminals.
pub const E_COL_TIME_SHORT: &str = "Time";
pub const E_COL_EVENT: &str = "Event";
pub const E_COL_KEY: &str = "Key";
pub const E_COL_VERSION: &str = "Ver";
pub const E_COL_BY: &str = "By";
pub const E_COL_MESSAGE: &str = "Message";
pub const E_EMPTY: &str = "No event since the dashboard started. Changes to keys appear here.";

/// `events` of the log's rows are events; `full`: older rows were dropped.
pub fn events_status(events: usize, full: bool) -> String {
    let noun = if events == 1 { "event" } else { "events" };
    if full {
        format!(
            "{} {noun} in the newest {} rows, newest first",
            count(events as u64),
            count(crate::tui::app::EVENT_LOG as u64)
        )
    } else {
        format!(
            "{} {noun} since the dashboard started, newest first",
            count(events as u64)
        )
    }
}

/// The event column of a row that says events were missed.
pub fn events_missed_label(missed: u64) -> String {
    match missed {
        0 => "missed ?".to_string(),
        n => format!("missed {}", count(n)),
    }
}

pub fn events_missed(missed: u64) -> String {
    match missed {
        0 => "events were missed here: the dashboard read them too slowly".to_string(),
        1 => "1 event was missed here: the dashboard read it too slowly".to_string(),
        n => format!(
            "{} events were missed here: the dashboard read them too slowly",
            count(n)
        ),
    }
}

/// The event column of a row where the connection was made again.
pub const EVENTS_RECONNECTED_LABEL: &str = "reconnected";
/// ... to a daemon serving another store.
pub const EVENTS_OTHER_STORE_LABEL: &str = "other store";

pub fn events_other_store(data_dir: &str) -> String {
    format!(
        "connected to a daemon serving another key store ({data_dir}): the rows above are \
         that store's; events until then were not received"
    )
}

pub const EVENTS_RECONNECTED: &str =
    "the connection was lost: events until it was made again were not received";

/// A row of the events view that is no event, as the message line shows it: its time
/// first, as an event's line has.
pub fn gap_line(at: UnixMillis, text: &str) -> String {
    format!("{} {text}", time_of_day(at))
}

pub fn event_key_gone(key: &str) -> String {
    format!("key {key} is no longer in the list (purged, or no longer visible to you)")
}

pub const EVENT_HAS_NO_KEY: &str = "this row is about no one key";

// Tokens view.
pub const TOKENS_TITLE: &str = " HSM tokens ";
pub const T_COL_NAME: &str = "Name";
pub const T_COL_LABEL: &str = "Token label";
pub const T_COL_MODULE: &str = "Module";
pub const T_COL_PIN: &str = "PIN file";
pub const T_COL_KEYS: &str = "Keys";
pub const T_COL_ADDED: &str = "Added (UTC)";
/// The date-only column of narrow terminals.
pub const T_COL_ADDED_SHORT: &str = "Added";
pub const T_COL_BY: &str = "By";
pub const T_LOADING: &str = "loading HSM tokens…";
pub const T_EMPTY: &str = "No HSM token is registered. Press n to register one.";

pub fn tokens_status(n: usize) -> String {
    let noun = if n == 1 { "token" } else { "tokens" };
    format!(
        "{} {noun} · PKCS#11 tokens that dedicated-hsm keys are created on",
        count(n as u64)
    )
}

// Register form.
pub const TOKEN_FORM_TITLE: &str = " Register HSM token ";
pub const TF_NAME: &str = "Name";
pub const TF_MODULE: &str = "Module";
pub const TF_LABEL: &str = "Token label";
pub const TF_PIN_FILE: &str = "PIN file";
pub const TF_NOTE: &str = "kmsd loads the module, finds the token by its label and logs in \
     with the PIN read from the file before it saves the registration. It keeps the file's \
     path, never the PIN.";
pub const TF_SUBMITTING: &str = "registering…";
pub const TOKEN_NAME_NOUN: &str = "an HSM token name";
pub const MODULE_NOT_ABSOLUTE: &str = "the module is an absolute path (/usr/lib/…/*.so)";
pub const PIN_FILE_NOT_ABSOLUTE: &str = "the PIN file is an absolute path";
pub fn token_label_length(max: usize) -> String {
    format!("a token label has 1 to {max} bytes")
}

// Remove-token confirmation.
pub fn remove_token_title(name: &str) -> String {
    format!(" Remove HSM token {name}? ")
}
pub fn remove_token_body(t: &HsmTokenInfo) -> String {
    let keys = match t.keys {
        0 => "No key lives on it.".to_string(),
        1 => "1 key not yet purged lives on it: kmsd refuses until it is purged.".to_string(),
        n => format!(
            "{} keys not yet purged live on it: kmsd refuses until they are purged.",
            count(n)
        ),
    };
    format!(
        "kmsd forgets the registration of token {} ({}); the token and its objects are not \
         touched. {keys}",
        t.token, t.module
    )
}

// Messages.
pub fn not_allowed(what: &str, name: &str, state: KeyState) -> String {
    format!("{what} is not possible while {name} is {state}")
}
pub fn at_version_limit(k: &KeyInfo) -> String {
    format!(
        "{} is at v{}, the most a key may have ({}): it cannot be rotated; create a new key",
        k.name,
        k.current_version,
        k.protection.max_versions()
    )
}
pub fn versions_closed_on_purge(name: &str) -> String {
    format!("{name} was purged: its versions are destroyed")
}
pub const WHAT_ROTATE: &str = "rotation";
pub const WHAT_DISABLE: &str = "disabling";
pub const WHAT_ENABLE: &str = "enabling";
pub const WHAT_DELETE: &str = "a deletion request";
pub const WHAT_UNDELETE: &str = "cancelling deletion";
pub const WHAT_DELETE_NOW: &str = "deleting now";
pub const VERSIONS_ENTER: &str = "space enables or disables the selected version";
pub const WHAT_ROTATION_SETTINGS: &str = "changing automatic rotation or its period";
pub const WHAT_ENABLE_VERSION: &str = "enabling a version";
pub const WHAT_DISABLE_VERSION: &str = "disabling a version";

pub fn paste_cut(pasted: usize, max: usize) -> String {
    format!("the paste had {pasted} characters; a field takes at most {max}")
}

/// Why the connection is given up when a read is not answered.
pub fn not_answering(secs: u64) -> String {
    format!("kmsd did not answer within {secs} s")
}

pub fn connected_message(daemon_version: &str) -> String {
    format!("connected to kmsd {daemon_version}")
}

/// A reconnect: what changed meanwhile raised no event here (no message, no desktop
/// notification); the list and the view are read again.
pub fn reconnected_message(daemon_version: &str) -> String {
    format!(
        "connected to kmsd {daemon_version} again; changes made while disconnected were \
         not announced here: the key list is read again"
    )
}

/// A reconnect reached a daemon serving another store (another kmsd was started on the
/// socket, with another data directory): the keys shown now are not the same keys.
pub fn another_store_message(daemon_version: &str, data_dir: &str, was: &str) -> String {
    format!(
        "connected to kmsd {daemon_version}, which serves another key store: {data_dir} \
         (was {was}); the keys shown are that store's"
    )
}

pub fn disconnected_message(reason: &str, next: Next) -> String {
    match next {
        Next::Connect(d) => format!(
            "kmsd is not reachable ({reason}); reconnecting {}",
            within(d)
        ),
        Next::Start(d) => format!(
            "kmsd is not reachable ({reason}); starting it again {}",
            within(d)
        ),
    }
}

/// "now", or "in N s" (whole seconds, rounded up).
fn within(d: Duration) -> String {
    if d.is_zero() {
        return "now".into();
    }
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    format!("in {secs} s")
}

pub const STARTING_DAEMON: &str = "starting kmsd again…";

pub const NOT_CONNECTED: &str = "not connected to kmsd";

/// `missed` is 0 when the daemon does not say how many (a subscriber that does not see
/// every key).
pub fn lagged(missed: u64) -> String {
    match missed {
        0 => "missed events; reloading the key list".to_string(),
        n => format!("missed {n} events; reloading the key list"),
    }
}

pub fn load_failed(what: &str, msg: &str) -> String {
    format!("could not load {what}: {msg}")
}
pub const WHAT_KEYS: &str = "the key list";

pub fn granted(g: &GrantInfo) -> String {
    format!("granted {}", grant_label(g))
}

pub fn grant_failed(msg: &str) -> String {
    format!("could not grant: {msg}")
}

pub fn revoked(g: &GrantInfo) -> String {
    format!("revoked {}", grant_label(g))
}

pub fn revoke_failed(what: &str, msg: &str) -> String {
    format!("could not revoke {what}: {msg}")
}

pub fn token_added(t: &HsmTokenInfo) -> String {
    format!("registered HSM token {} (token {})", t.name, t.token)
}

pub fn token_add_failed(msg: &str) -> String {
    format!("could not register the HSM token: {msg}")
}

pub fn token_removed(t: &HsmTokenInfo) -> String {
    format!("removed HSM token {}", t.name)
}

pub fn token_remove_failed(name: &str, msg: &str) -> String {
    format!("could not remove HSM token {name}: {msg}")
}

pub fn created(k: &KeyInfo) -> String {
    format!("created {} ({}, tag {})", k.name, k.key_type, k.tag)
}

pub fn op_done(op: &Op, k: &KeyInfo) -> String {
    match op {
        Op::Rotate => format!("rotated {}: v{} is current", k.name, k.current_version),
        Op::Enable => format!("enabled {}", k.name),
        Op::Disable => format!("disabled {}", k.name),
        Op::RequestDeletion => match k.deletion_due_at {
            Some(t) => format!("{} will be deleted at {} UTC", k.name, datetime(t)),
            None => format!("deletion of {} requested", k.name),
        },
        Op::CancelDeletion => format!("deletion of {} cancelled; the key is disabled", k.name),
        Op::DeleteNow => format!("{} deleted", k.name),
        Op::SetRotation { .. } => format!("{}: rotation {}", k.name, rotation_detail(k)),
        Op::SetMemo(_) => format!("{}: memo saved", k.name),
    }
}

/// A change of a key sent to kmsd, until its answer replaces this.
pub fn change_sent(name: &str) -> String {
    format!("changing {name}: waiting for kmsd…")
}

/// A change of a key held back: one sent before is not answered yet.
pub fn change_still_waiting(name: &str) -> String {
    format!(
        "a change of {name} sent before is still waiting for kmsd: nothing more is sent for \
         {name} until it is answered"
    )
}

pub fn op_failed(op: &Op, name: &str, msg: &str) -> String {
    let what = match op {
        Op::Rotate => "rotate",
        Op::Enable => "enable",
        Op::Disable => "disable",
        Op::RequestDeletion => "request deletion of",
        Op::CancelDeletion => "cancel deletion of",
        Op::DeleteNow => "delete",
        Op::SetRotation { .. } => "change the rotation of",
        Op::SetMemo(_) => "save the memo of",
    };
    format!("could not {what} {name}: {msg}")
}

pub fn version_toggled(name: &str, version: u32, enabled: bool) -> String {
    let s = if enabled { "enabled" } else { "disabled" };
    format!("{name} v{version} {s}")
}

pub fn version_toggle_failed(name: &str, version: u32, msg: &str) -> String {
    format!("could not change {name} v{version}: {msg}")
}

/// The message line for an event from the daemon.
pub fn event_line(e: &Event) -> String {
    let key = e
        .key_name
        .as_deref()
        .or(e.key_tag.as_deref())
        .unwrap_or("-");
    let mut s = format!("{} {} {key}", time_of_day(e.time), e.kind.as_str());
    if let Some(v) = e.version {
        s.push_str(&format!(" v{v}"));
    }
    if !e.message.is_empty() {
        s.push_str(": ");
        s.push_str(&e.message);
    }
    s.push_str(&format!(" (by {})", e.account));
    s
}

pub fn notification_summary(e: &Event) -> String {
    let key = e
        .key_name
        .as_deref()
        .or(e.key_tag.as_deref())
        .unwrap_or("-");
    let what = match e.kind {
        EventKind::StateChanged => match e.state {
            Some(s) => format!("is now {s}"),
            None => "changed state".into(),
        },
        EventKind::DeletionRequested => "is pending deletion".into(),
        EventKind::Purged => "was deleted".into(),
        EventKind::Rotated => match e.version {
            Some(v) => format!("rotated to v{v}"),
            None => "rotated".into(),
        },
        EventKind::VersionLimitReached => "reached its version limit".into(),
        EventKind::NonceBudgetLow => "is running out of nonces".into(),
        other => other.as_str().into(),
    };
    format!("kms: {key} {what}")
}

pub fn notification_body(e: &Event) -> String {
    if e.message.is_empty() {
        format!("by {}", e.account)
    } else {
        format!("{} (by {})", e.message, e.account)
    }
}

/// The one notification for events that queued up while another was being shown.
pub fn notification_batch_summary(events: u64) -> String {
    format!("kms: {} events", count(events))
}

/// "10 rotated, 2 state-changed", and how many were dropped without being counted.
pub fn notification_batch_body(kinds: &[(EventKind, u64)], dropped: u64) -> String {
    let mut parts: Vec<String> = kinds
        .iter()
        .map(|(k, n)| format!("{} {}", count(*n), k.as_str()))
        .collect();
    if dropped > 0 {
        parts.push(format!(
            "{} more not shown (too many at once)",
            count(dropped)
        ));
    }
    parts.join(", ")
}

#[cfg(feature = "desktop-notifications")]
pub const NOTIFY_APP: &str = "kms";

// Numbers and times.

/// A path cut to `width` characters from the left ("…/lib/libsofthsm2.so"): its end
/// says which file it is.
pub fn path_tail(path: &str, width: usize) -> String {
    let n = path.chars().count();
    if n <= width {
        return path.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let tail: String = path.chars().skip(n - (width - 1)).collect();
    format!("…{tail}")
}

/// 1234567 → "1,234,567".
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// [`count`] if it fits in `width` cells, else the count to three significant digits
/// with its SI prefix ("162M", "2.15G"): a table cell cuts what does not fit, and a
/// right-aligned count cut on the left read as another number (`,147,483,648`).
pub fn count_within(n: u64, width: usize) -> String {
    let full = count(n);
    if full.len() <= width {
        return full;
    }
    let mut scaled = n as f64;
    let mut prefix = "";
    for p in ["k", "M", "G", "T", "P", "E"] {
        if scaled < 999.5 {
            break;
        }
        scaled /= 1000.0;
        prefix = p;
    }
    let digits = if scaled < 9.995 {
        2
    } else if scaled < 99.95 {
        1
    } else {
        0
    };
    format!("{scaled:.digits$}{prefix}")
}

fn utc(t: UnixMillis) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(t.div_euclid(1000)).ok()
}

/// "2025-03-01"
pub fn date(t: UnixMillis) -> String {
    match utc(t) {
        Some(d) => format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day()),
        None => "?".into(),
    }
}

/// "2025-03-01 14:05"
pub fn datetime(t: UnixMillis) -> String {
    match utc(t) {
        Some(d) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}",
            d.year(),
            u8::from(d.month()),
            d.day(),
            d.hour(),
            d.minute()
        ),
        None => "?".into(),
    }
}

/// "2025-03-01 14:05:09"
pub fn datetime_secs(t: UnixMillis) -> String {
    match utc(t) {
        Some(d) => format!(
            "{} {:02}:{:02}:{:02}",
            date(t),
            d.hour(),
            d.minute(),
            d.second()
        ),
        None => "?".into(),
    }
}

/// "14:05:09"
pub fn time_of_day(t: UnixMillis) -> String {
    match utc(t) {
        Some(d) => format!("{:02}:{:02}:{:02}", d.hour(), d.minute(), d.second()),
        None => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Switching automatic rotation on for a key at its version limit does not promise a
    /// new version it will not get (found driving the dashboard: "a new version every 90
    /// days" for a key at v100).
    #[test]
    fn auto_rotation_on_at_the_version_limit_promises_nothing() {
        let mut k = crate::tui::fake::keys()[0].clone();
        k.protection = Protection::Basic;
        k.current_version = 3;
        assert!(confirm_auto_rotation_body(&k, true).starts_with("A new version every"));
        k.current_version = kms_shared::model::MAX_VERSIONS;
        let body = confirm_auto_rotation_body(&k, true);
        assert!(
            body.contains("cannot be rotated") && body.contains("makes no version"),
            "{body}"
        );
        assert!(!body.contains("A new version every"), "{body}");
    }

    /// A key at its version limit with automatic rotation on is shown as stopped, in the
    /// list and the details, not as rotating every N days (found by a helper checking
    /// kmsctl's list against the protocol).
    #[test]
    fn automatic_rotation_stopped_at_the_version_limit_is_shown_so() {
        let mut k = crate::tui::fake::keys()[0].clone();
        k.protection = Protection::Basic;
        k.auto_rotation = true;
        k.rotation_days = 200;
        k.current_version = kms_shared::model::MAX_VERSIONS;
        k.next_rotation_at = None;
        assert_eq!(period_cell(&k), "200d limit");
        assert!(
            rotation_detail(&k).contains("stopped"),
            "{}",
            rotation_detail(&k)
        );
        k.current_version = 3;
        assert_eq!(period_cell(&k), "200d");
        assert_eq!(rotation_detail(&k), "auto every 200 days");
    }

    /// A count that fits its cell is shown whole; one that does not, shortened with its
    /// SI prefix, never cut (a cut count read as another number).
    #[test]
    fn counts_fit_their_cells() {
        assert_eq!(count_within(9_100, 9), "9,100");
        assert_eq!(count_within(99_999_999, 10), "99,999,999");
        assert_eq!(count_within(162_345_678, 9), "162M");
        assert_eq!(count_within(2_147_483_648, 9), "2.15G");
        assert_eq!(count_within(12_345_678, 9), "12.3M");
        assert_eq!(count_within(999_600, 5), "1.00M");
        assert_eq!(count_within(u64::MAX, 9), "18.4E");
        for n in [0, 7, 1_234, 99_999_999, 123_456_789, 1 << 31, u64::MAX] {
            assert!(count_within(n, 9).len() <= 9, "{n}");
        }
    }

    /// With no daemon connected, a failed action does not claim kmsd refused it.
    #[test]
    fn not_connected_is_not_a_refusal() {
        assert_eq!(
            daemon_refused("not-found: no key x"),
            "kmsd refused: not-found: no key x"
        );
        let offline = daemon_refused(NOT_CONNECTED);
        assert!(!offline.contains("refused"), "{offline}");
        assert!(offline.starts_with(NOT_CONNECTED), "{offline}");
    }

    /// A batch entry says how many items it covered and how many failed.
    #[test]
    fn history_result_shows_batches() {
        let mut e = crate::tui::fake::history(1, 1).remove(0);
        e.result = "ok".into();
        assert_eq!(history_result(&e), "ok");
        e.items = 64;
        assert_eq!(history_result(&e), "ok ×64");
        e.failed = 3;
        e.result = "decrypt-failed".into();
        assert_eq!(history_result(&e), "decrypt-failed 3/64");
    }

    /// Thousands separators land every three digits from the right.
    #[test]
    fn counts_group_digits() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
    }

    /// Long paths keep their end, marked with an ellipsis, within the width.
    #[test]
    fn paths_keep_their_tail() {
        assert_eq!(path_tail("/usr/lib/x.so", 20), "/usr/lib/x.so");
        assert_eq!(
            path_tail("/usr/lib/softhsm/libsofthsm2.so", 12),
            "…softhsm2.so"
        );
        assert_eq!(path_tail("abc", 0), "");
    }

    /// An impact the daemon counted only part of says so, from where it stopped.
    #[test]
    fn a_partial_impact_says_how_far_back() {
        // 2025-03-01T00:00:00Z and ten days later.
        let (since, stopped) = (1_740_787_200_000, 1_740_787_200_000 + 10 * 86_400_000);
        assert_eq!(
            impact_summary(1500, 2, since, None),
            "Used 1,500 times since 2025-03-01 by 2 accounts:"
        );
        assert_eq!(
            impact_summary(1500, 2, since, Some(stopped)),
            "Used 1,500 times since 2025-03-11 (older history not read) by 2 accounts:"
        );
        assert_eq!(
            impact_summary(0, 0, since, Some(stopped)),
            "No successful use since 2025-03-11 (older history not read)."
        );
    }

    /// Times are formatted in UTC, independent of the machine's zone.
    #[test]
    fn times_are_utc() {
        // 2025-03-01T00:00:00Z
        let t = 1_740_787_200_000;
        assert_eq!(date(t), "2025-03-01");
        assert_eq!(datetime(t + 61_000), "2025-03-01 00:01");
        assert_eq!(time_of_day(t + 3_723_000), "01:02:03");
    }
}
