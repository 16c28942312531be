//! What can happen to the dashboard ([`Action`]) and what the dashboard asks the outside
//! world to do ([`Effect`]). `update` turns one into the other without doing any I/O, so
//! every behaviour can be tested by feeding actions and looking at state and effects.

use crossterm::event::KeyEvent;
use kms_shared::model::{GrantInfo, HistoryEntry, Impact, KeyInfo, UnixMillis, VersionInfo};
use kms_shared::protocol::{CreateKey, Event, EventKind, GrantSpec, HsmTokenInfo};

use super::retry::Next;

/// Everything `update` reacts to: raw input, intents the keymap derived from it, and
/// results from the daemon task.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    // Raw input.
    Key(KeyEvent),
    /// Text pasted into the terminal (bracketed paste), all at once.
    Paste(String),
    Resize(u16, u16),
    /// Periodic; refreshes the selected key's counters (usage is not an event).
    Tick,

    // Intents (from the keymap, by mode).
    Quit,
    Up,
    Down,
    PageUp,
    PageDown,
    Top,
    Bottom,
    /// enter: open details, then versions.
    Open,
    /// esc: back, close, or clear the filter.
    Back,
    StartFilter,
    Help,
    /// `M`: the last message in full, in a pop-up.
    FullMessage,
    Create,
    Rotate,
    Disable,
    Enable,
    RequestDeletion,
    CancelDeletion,
    DeleteNow,
    ToggleAutoRotation,
    EditPeriod,
    EditMemo,
    Versions,
    History,
    /// Open the permissions (grants) view.
    Permissions,
    /// Open the HSM tokens view.
    Tokens,
    /// Open the events view.
    Events,
    /// In the permissions or tokens view: a new grant, a new token.
    New,
    /// In the permissions or tokens view: revoke the grant, remove the token.
    Remove,
    ToggleVersion,
    Yes,
    No,
    Char(char),
    Backspace,
    NextField,
    PrevField,
    Left,
    Right,
    /// In a text field: the cursor to the start, to the end (Home/End, ctrl-a/ctrl-e).
    LineStart,
    LineEnd,
    /// In a text field: the character after the cursor (Delete).
    DeleteForward,
    /// In a text field: everything before the cursor (ctrl-u).
    ClearToStart,
    Submit,

    // From the daemon task.
    Connected {
        daemon_version: String,
        /// The data directory the daemon serves (from `status`), if it said.
        data_dir: Option<String>,
        /// When (the events view dates a reconnect by it).
        at: UnixMillis,
    },
    /// The connection failed or was lost, and what comes next.
    Disconnected {
        reason: String,
        next: Next,
    },
    /// kmsd is being started again (the backoff allowed it).
    StartingDaemon,
    KeysLoaded(Result<Vec<KeyInfo>, String>),
    /// `Ok(None)`: the daemon no longer knows the key, or no longer shows it to this
    /// account.
    KeyFetched {
        tag: String,
        result: Result<Option<KeyInfo>, String>,
    },
    DaemonEvent(Event),
    /// The daemon dropped `missed` events for this dashboard (0: an unknown number), as
    /// the client library learnt `at`.
    Lagged {
        missed: u64,
        at: UnixMillis,
    },
    Created(Result<KeyInfo, String>),
    OpDone {
        op: Op,
        tag: String,
        name: String,
        result: Result<KeyInfo, String>,
    },
    VersionsLoaded {
        tag: String,
        result: Result<Vec<VersionInfo>, String>,
    },
    VersionToggled {
        tag: String,
        name: String,
        version: u32,
        enabled: bool,
        result: Result<Vec<VersionInfo>, String>,
    },
    HistoryLoaded {
        tag: String,
        before_seq: Option<u64>,
        result: Result<Vec<HistoryEntry>, String>,
    },
    ImpactLoaded {
        tag: String,
        result: Result<Impact, String>,
    },
    GrantsLoaded(Result<Vec<GrantInfo>, String>),
    Granted(Result<GrantInfo, String>),
    Revoked {
        spec: GrantSpec,
        result: Result<GrantInfo, String>,
    },
    HsmTokensLoaded(Result<Vec<HsmTokenInfo>, String>),
    HsmAdded(Result<HsmTokenInfo, String>),
    HsmRemoved {
        name: String,
        result: Result<HsmTokenInfo, String>,
    },
}

/// A lifecycle change of one key that replies with the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Rotate,
    Enable,
    Disable,
    RequestDeletion,
    CancelDeletion,
    DeleteNow,
    SetRotation {
        auto_rotation: bool,
        rotation_days: Option<u32>,
    },
    SetMemo(String),
}

/// Work for the outside world. All but `Notify` become requests to the daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    LoadKeys,
    GetKey(String),
    Create(CreateKey),
    Op {
        op: Op,
        tag: String,
        name: String,
    },
    LoadVersions(String),
    SetVersionEnabled {
        tag: String,
        name: String,
        version: u32,
        enabled: bool,
    },
    LoadHistory {
        tag: String,
        before_seq: Option<u64>,
    },
    LoadImpact(String),
    LoadGrants,
    Grant(GrantSpec),
    Revoke(GrantSpec),
    LoadHsmTokens,
    HsmAdd {
        name: String,
        module: String,
        token: String,
        pin_file: String,
    },
    HsmRemove(String),
    Notify {
        /// What happened, for counting when several are shown as one.
        kind: EventKind,
        summary: String,
        body: String,
    },
}
