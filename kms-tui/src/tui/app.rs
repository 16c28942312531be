//! The dashboard's state. Nothing here does I/O; `update` changes it and `ui` draws it.

use kms_shared::model::{
    DEFAULT_ROTATION_DAYS, GrantInfo, HistoryEntry, Impact, KeyInfo, KeyState, KeyType, Principal,
    Protection, Role, UnixMillis, VersionInfo, validate_convergent, validate_convergent_protection,
    validate_memo, validate_name, validate_rotation_days,
};
use kms_shared::protocol::{CreateKey, Event, GrantSpec, HsmTokenInfo};

use super::keymap::Mode;
use super::strings;
use super::ui::{layout, message};

/// History entries fetched per request; scrolling near the end fetches the next page.
pub const HISTORY_PAGE: u32 = 100;
/// How close to the end of the loaded history the selection gets before the next page
/// is fetched, so that scrolling does not stall at the boundary.
pub const HISTORY_PREFETCH: usize = 10;
/// Events the events view keeps; older ones are dropped as new ones come. The daemon
/// keeps none (SPEC §8): a key's changes stay in its history.
pub const EVENT_LOG: usize = 1_000;
/// Longest text a field accepts. Past the rule's limit the validator already complains;
/// this only keeps a stuck key from growing a string without bound.
pub const MAX_INPUT: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conn {
    Connecting,
    Connected { daemon_version: String },
    Disconnected { reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgKind {
    Info,
    Success,
    Error,
    Event,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: MsgKind,
    pub text: String,
}

/// The screen under any pop-up.
#[derive(Debug, Clone, PartialEq)]
pub enum Screen {
    Main,
    Details,
    Versions(VersionsView),
    History(HistoryView),
    Grants(GrantsView),
    Tokens(TokensView),
    Events(EventsView),
}

/// Where esc from a sub-view goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    Main,
    Details,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VersionsView {
    pub tag: String,
    pub name: String,
    pub back: Base,
    /// `None` while loading.
    pub versions: Option<Vec<VersionInfo>>,
    pub selected: usize,
    pub error: Option<String>,
    /// A load is on its way (the first, or the tick's): no other is asked for by the
    /// tick until it is in (a daemon that does not answer would otherwise collect one
    /// every tick). A load that failed is asked for again at the next tick.
    pub refreshing: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HistoryView {
    pub tag: String,
    pub name: String,
    pub back: Base,
    pub entries: Vec<HistoryEntry>,
    pub loading: bool,
    /// The last page came back short: there is nothing older.
    pub exhausted: bool,
    pub selected: usize,
    pub offset: usize,
    pub error: Option<String>,
    /// An event for the key came while a page was loading: the newest page is read again
    /// once it is in (one request at a time).
    pub refresh_due: bool,
}

/// A key named by tag (what requests carry) and name (what people read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    pub tag: String,
    pub name: String,
}

/// Every grant (SPEC §6), as `kmsctl grants` lists them.
#[derive(Debug, Clone, PartialEq)]
pub struct GrantsView {
    pub back: Base,
    /// The key selected when the view was opened: the grant form offers it as the scope.
    pub key: Option<KeyRef>,
    /// `None` while loading.
    pub grants: Option<Vec<GrantInfo>>,
    pub selected: usize,
    pub offset: usize,
    pub error: Option<String>,
}

impl GrantsView {
    pub fn len(&self) -> usize {
        self.grants.as_ref().map_or(0, Vec::len)
    }

    pub fn selected_grant(&self) -> Option<&GrantInfo> {
        self.grants.as_ref().and_then(|g| g.get(self.selected))
    }
}

/// The registered PKCS#11 tokens; the list itself lives in [`App::hsm_tokens`] because
/// the create form needs it too.
#[derive(Debug, Clone, PartialEq)]
pub struct TokensView {
    pub back: Base,
    pub selected: usize,
    pub offset: usize,
}

/// The events view: the events this dashboard received, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct EventsView {
    pub back: Base,
    /// Row of the selection, 0 being the newest entry.
    pub selected: usize,
    pub offset: usize,
}

/// One row of the events view.
#[derive(Debug, Clone, PartialEq)]
pub enum Logged {
    Event(Event),
    /// The daemon dropped this many events for this dashboard, which read too slowly
    /// (0: an unknown number); the dashboard learnt it `at`.
    Missed {
        missed: u64,
        at: UnixMillis,
    },
    /// The connection was lost and made again `at`: events in between were not received.
    Reconnected {
        at: UnixMillis,
    },
    /// As `Reconnected`, to a daemon serving another key store (its data directory):
    /// the rows above are that store's.
    OtherStore {
        data_dir: String,
        at: UnixMillis,
    },
}

/// The events received since the dashboard started, oldest first, at most [`EVENT_LOG`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventLog(std::collections::VecDeque<Logged>);

impl EventLog {
    pub fn push(&mut self, entry: Logged) {
        if self.0.len() == EVENT_LOG {
            self.0.pop_front();
        }
        self.0.push_back(entry);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the oldest entries have been dropped for newer ones.
    pub fn is_full(&self) -> bool {
        self.0.len() == EVENT_LOG
    }

    /// The entries that are events (not rows saying some were missed).
    pub fn events(&self) -> usize {
        self.0
            .iter()
            .filter(|e| matches!(e, Logged::Event(_)))
            .count()
    }

    /// The `row`th entry counting from the newest (row 0).
    pub fn newest(&self, row: usize) -> Option<&Logged> {
        self.0
            .len()
            .checked_sub(row + 1)
            .and_then(|i| self.0.get(i))
    }
}

/// The dedicated-hsm tokens as last read from the daemon.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HsmTokens {
    /// `None` until the first answer.
    pub list: Option<Vec<HsmTokenInfo>>,
    /// The last load failed (the list, if any, is what an earlier load gave).
    pub error: Option<String>,
}

impl HsmTokens {
    pub fn len(&self) -> usize {
        self.list.as_ref().map_or(0, Vec::len)
    }

    /// The choices the create form offers.
    pub fn choices(&self) -> TokenChoices {
        match (&self.list, &self.error) {
            (Some(l), _) => TokenChoices::Loaded(l.iter().map(|t| t.name.clone()).collect()),
            (None, Some(e)) => TokenChoices::Failed(e.clone()),
            (None, None) => TokenChoices::Loading,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Popup {
    /// The key bindings; `scroll` is the first line shown when they do not fit.
    Help {
        scroll: usize,
    },
    Create(CreateForm),
    Confirm(Confirm),
    Prompt(Prompt),
    Grant(GrantForm),
    Token(TokenForm),
    /// A plain yes/no question about a grant or a token.
    Ask(Ask),
    /// The last message in full (`M`), for one too long for the message area.
    Message(FullMessage),
}

/// The message the pop-up shows: a copy, so that a live event arriving meanwhile does
/// not swap the text being read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullMessage {
    pub message: Message,
    /// First wrapped line shown.
    pub scroll: usize,
}

/// Yes/no questions outside the key lifecycle: nothing to weigh but the thing named.
#[derive(Debug, Clone, PartialEq)]
pub enum Ask {
    Revoke(GrantInfo),
    RemoveToken(HsmTokenInfo),
}

/// The request that revokes exactly this grant: same role, principal and key.
pub fn revoke_spec(g: &GrantInfo) -> GrantSpec {
    let (user, group) = match &g.principal {
        Principal::User(u) => (Some(u.clone()), None),
        Principal::Group(gr) => (None, Some(gr.clone())),
    };
    GrantSpec {
        role: g.role,
        user,
        group,
        key: g.key_tag.clone(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmKind {
    Rotate,
    /// Automatic rotation switched on (`true`) or off: switching it on starts a new
    /// period, so a slip of `a` twice moved the schedule.
    AutoRotation(bool),
    Disable,
    RequestDeletion,
    /// Confirmed by typing the key's name rather than `y`.
    DeleteNow,
    /// One version's own flag off (the versions view); `current` when it is the version
    /// new encryption and signing use.
    DisableVersion {
        version: u32,
        current: bool,
    },
}

impl ConfirmKind {
    /// Destructive confirmations show who would be affected before asking.
    pub fn needs_impact(self) -> bool {
        !matches!(self, ConfirmKind::Rotate | ConfirmKind::AutoRotation(_))
    }

    /// Whether enter answers yes. Destructive confirmations want an explicit `y`, so that
    /// the enter that opened something (details, then the versions view) or a key repeat
    /// cannot disable or delete anything.
    pub fn enter_confirms(self) -> bool {
        matches!(self, ConfirmKind::Rotate | ConfirmKind::AutoRotation(_))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ImpactState {
    NotNeeded,
    Loading,
    Loaded(Impact),
    Failed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Confirm {
    pub kind: ConfirmKind,
    pub key: KeyInfo,
    pub impact: ImpactState,
    /// What was typed, for `DeleteNow`.
    pub typed: String,
    /// The cursor in the text being typed, as the characters after it (0: at the end).
    pub cursor_back: usize,
    pub mismatch: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    Period,
    Memo,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub kind: PromptKind,
    pub key: KeyInfo,
    pub text: String,
    /// The cursor in the text being typed, as the characters after it (0: at the end).
    pub cursor_back: usize,
}

impl Prompt {
    /// The rule the current text breaks, if any.
    pub fn error(&self) -> Option<String> {
        match self.kind {
            PromptKind::Period => parse_days(&self.text).err(),
            PromptKind::Memo => validate_memo(&self.text).err().map(|e| e.0),
        }
    }
}

fn parse_days(s: &str) -> Result<u32, String> {
    let days: u32 = s
        .trim()
        .parse()
        .map_err(|_| strings::DAYS_NOT_A_NUMBER.to_string())?;
    validate_rotation_days(days).map_err(|e| e.0)?;
    Ok(days)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Name,
    Type,
    Protection,
    /// The registered token a dedicated-hsm key is created on.
    Token,
    Convergent,
    AutoRotation,
    Days,
    Memo,
}

impl Field {
    pub const ALL: [Field; 8] = [
        Field::Name,
        Field::Type,
        Field::Protection,
        Field::Token,
        Field::Convergent,
        Field::AutoRotation,
        Field::Days,
        Field::Memo,
    ];

    fn index(self) -> usize {
        Field::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }

    pub fn next(self) -> Field {
        Field::ALL[(self.index() + 1) % Field::ALL.len()]
    }

    pub fn prev(self) -> Field {
        Field::ALL[(self.index() + Field::ALL.len() - 1) % Field::ALL.len()]
    }

    pub fn is_text(self) -> bool {
        matches!(self, Field::Name | Field::Days | Field::Memo)
    }
}

pub const PROTECTIONS: [Protection; 3] =
    [Protection::Basic, Protection::Hsm, Protection::DedicatedHsm];

/// The tokens the create form can put a dedicated-hsm key on.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenChoices {
    Loading,
    Failed(String),
    Loaded(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct CreateForm {
    pub focus: Field,
    pub name: String,
    pub key_type: KeyType,
    pub protection: Protection,
    pub convergent: bool,
    pub auto_rotation: bool,
    pub days: String,
    pub memo: String,
    /// The cursor in the focused text field, as the characters after it (0: at the end;
    /// moving to another field puts it at that field's end).
    pub cursor_back: usize,
    /// What the token field can be set to (a copy of [`App::hsm_tokens`], refreshed when
    /// the list arrives).
    pub tokens: TokenChoices,
    /// The chosen token: always one of the loaded choices when there are any.
    pub token: Option<String>,
    /// Fields the user has changed: only those show their rule, so an empty form does
    /// not open covered in complaints.
    pub touched: [bool; 8],
    /// After a refused submit every field shows its rule.
    pub show_all: bool,
    pub submitting: bool,
    pub daemon_error: Option<String>,
}

impl Default for CreateForm {
    fn default() -> Self {
        CreateForm {
            focus: Field::Name,
            name: String::new(),
            key_type: KeyType::Aes256,
            protection: Protection::Basic,
            convergent: false,
            auto_rotation: false,
            days: DEFAULT_ROTATION_DAYS.to_string(),
            memo: String::new(),
            cursor_back: 0,
            tokens: TokenChoices::Loading,
            token: None,
            touched: [false; 8],
            show_all: false,
            submitting: false,
            daemon_error: None,
        }
    }
}

impl CreateForm {
    /// The §2 rule a field breaks, checked exactly as the daemon checks it (plus name
    /// uniqueness against the keys this dashboard knows).
    pub fn rule_error(&self, field: Field, name_taken: bool) -> Option<String> {
        match field {
            Field::Name => match validate_name(&self.name) {
                Err(e) => Some(e.0),
                Ok(()) if name_taken => Some(strings::name_taken(&self.name)),
                Ok(()) => None,
            },
            Field::Convergent => validate_convergent(self.key_type, self.convergent)
                .and_then(|()| validate_convergent_protection(self.protection, self.convergent))
                .err()
                .map(|e| e.0),
            Field::Days => parse_days(&self.days).err(),
            Field::Memo => validate_memo(&self.memo).err().map(|e| e.0),
            Field::Token => self.token_error(),
            Field::Type | Field::Protection | Field::AutoRotation => None,
        }
    }

    /// A dedicated-hsm key needs a registered token; other protections ignore the field.
    fn token_error(&self) -> Option<String> {
        if self.protection != Protection::DedicatedHsm {
            return None;
        }
        match (&self.tokens, &self.token) {
            (TokenChoices::Loading, _) => Some(strings::TOKENS_STILL_LOADING.to_string()),
            (TokenChoices::Failed(e), _) => Some(strings::tokens_failed(e)),
            (TokenChoices::Loaded(names), _) if names.is_empty() => {
                Some(strings::NO_TOKEN_REGISTERED.to_string())
            }
            (TokenChoices::Loaded(names), Some(t)) if names.contains(t) => None,
            (TokenChoices::Loaded(_), _) => Some(strings::CHOOSE_TOKEN.to_string()),
        }
    }

    /// Whether a field takes part in the form now: the token only for dedicated-hsm, so
    /// tab does not stop on a field that cannot be changed.
    pub fn applies(&self, field: Field) -> bool {
        field != Field::Token || self.protection == Protection::DedicatedHsm
    }

    pub fn focus_next(&mut self) {
        self.cursor_back = 0;
        self.focus = self.focus.next();
        while !self.applies(self.focus) {
            self.focus = self.focus.next();
        }
    }

    pub fn focus_prev(&mut self) {
        self.cursor_back = 0;
        self.focus = self.focus.prev();
        while !self.applies(self.focus) {
            self.focus = self.focus.prev();
        }
    }

    /// New token choices arrived: keep the chosen token if it is still registered,
    /// else take the first.
    pub fn set_tokens(&mut self, choices: TokenChoices) {
        if let TokenChoices::Loaded(names) = &choices {
            let keep = self.token.as_ref().is_some_and(|t| names.contains(t));
            if !keep {
                self.token = names.first().cloned();
            }
        }
        self.tokens = choices;
    }

    /// The error to show under a field now.
    pub fn shown_error(&self, field: Field, name_taken: bool) -> Option<String> {
        if self.show_all || self.touched[field.index()] {
            self.rule_error(field, name_taken)
        } else {
            None
        }
    }

    pub fn touch(&mut self, field: Field) {
        self.touched[field.index()] = true;
    }

    pub fn is_valid(&self, name_taken: bool) -> bool {
        Field::ALL
            .iter()
            .all(|f| self.rule_error(*f, name_taken).is_none())
    }

    /// The request, if every rule holds.
    pub fn spec(&self, name_taken: bool) -> Option<CreateKey> {
        if !self.is_valid(name_taken) {
            return None;
        }
        Some(CreateKey {
            name: self.name.clone(),
            key_type: self.key_type,
            protection: self.protection,
            convergent: self.convergent,
            auto_rotation: self.auto_rotation,
            rotation_days: parse_days(&self.days).ok(),
            memo: self.memo.clone(),
            hsm: match self.protection {
                Protection::DedicatedHsm => self.token.clone(),
                Protection::Basic | Protection::Hsm => None,
            },
        })
    }

    pub fn text_mut(&mut self, field: Field) -> Option<&mut String> {
        match field {
            Field::Name => Some(&mut self.name),
            Field::Days => Some(&mut self.days),
            Field::Memo => Some(&mut self.memo),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    User,
    Group,
}

impl PrincipalKind {
    pub const ALL: [PrincipalKind; 2] = [PrincipalKind::User, PrincipalKind::Group];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantField {
    Role,
    Kind,
    Name,
    Scope,
}

impl GrantField {
    pub const ALL: [GrantField; 4] = [
        GrantField::Role,
        GrantField::Kind,
        GrantField::Name,
        GrantField::Scope,
    ];
}

/// The new-grant form of the permissions view.
#[derive(Debug, Clone, PartialEq)]
pub struct GrantForm {
    pub focus: GrantField,
    pub role: Role,
    pub kind: PrincipalKind,
    pub name: String,
    /// The cursor in the name, as the characters after it (0: at the end).
    pub cursor_back: usize,
    /// The key the permissions view was opened on, offered as the scope.
    pub key: Option<KeyRef>,
    /// The grant is for `key` only (else for all keys).
    pub one_key: bool,
    pub name_touched: bool,
    pub show_all: bool,
    pub submitting: bool,
    pub daemon_error: Option<String>,
}

impl GrantForm {
    /// Starts at the least powerful role, on the selected key if there is one: the
    /// narrowest grant is the one that does least harm when submitted by mistake.
    pub fn new(key: Option<KeyRef>) -> GrantForm {
        GrantForm {
            focus: GrantField::Role,
            role: Role::KeyUser,
            kind: PrincipalKind::User,
            name: String::new(),
            cursor_back: 0,
            one_key: key.is_some(),
            key,
            name_touched: false,
            show_all: false,
            submitting: false,
            daemon_error: None,
        }
    }

    /// The daemon checks that the user or group exists; locally only that one is named.
    pub fn name_error(&self) -> Option<String> {
        let n = self.name.trim();
        if n.is_empty() {
            Some(strings::PRINCIPAL_EMPTY.to_string())
        } else if n.chars().any(char::is_whitespace) {
            Some(strings::PRINCIPAL_SPACES.to_string())
        } else {
            None
        }
    }

    pub fn shown_name_error(&self) -> Option<String> {
        if self.show_all || self.name_touched {
            self.name_error()
        } else {
            None
        }
    }

    pub fn scope_key(&self) -> Option<&KeyRef> {
        self.key.as_ref().filter(|_| self.one_key)
    }

    /// The request, if the form is complete.
    pub fn spec(&self) -> Option<GrantSpec> {
        if self.name_error().is_some() {
            return None;
        }
        let name = self.name.trim().to_string();
        let (user, group) = match self.kind {
            PrincipalKind::User => (Some(name), None),
            PrincipalKind::Group => (None, Some(name)),
        };
        Some(GrantSpec {
            role: self.role,
            user,
            group,
            key: self.scope_key().map(|k| k.tag.clone()),
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TokenField {
    #[default]
    Name,
    Module,
    Label,
    PinFile,
}

impl TokenField {
    pub const ALL: [TokenField; 4] = [
        TokenField::Name,
        TokenField::Module,
        TokenField::Label,
        TokenField::PinFile,
    ];

    fn index(self) -> usize {
        TokenField::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }
}

/// The register form of the tokens view.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenForm {
    pub focus: TokenField,
    pub name: String,
    pub module: String,
    pub token: String,
    pub pin_file: String,
    /// The cursor in the focused field, as the characters after it (0: at the end).
    pub cursor_back: usize,
    pub touched: [bool; 4],
    pub show_all: bool,
    pub submitting: bool,
    pub daemon_error: Option<String>,
}

impl TokenForm {
    pub fn text(&self, f: TokenField) -> &str {
        match f {
            TokenField::Name => &self.name,
            TokenField::Module => &self.module,
            TokenField::Label => &self.token,
            TokenField::PinFile => &self.pin_file,
        }
    }

    /// The text of a field, to be changed: the field counts as touched from now on.
    pub fn edit(&mut self, f: TokenField) -> &mut String {
        self.touched[f.index()] = true;
        match f {
            TokenField::Name => &mut self.name,
            TokenField::Module => &mut self.module,
            TokenField::Label => &mut self.token,
            TokenField::PinFile => &mut self.pin_file,
        }
    }

    /// The daemon's own checks that can be made here (it also loads the module and logs
    /// in to the token, which only it can do).
    pub fn rule_error(&self, f: TokenField) -> Option<String> {
        match f {
            TokenField::Name => validate_name(&self.name)
                .err()
                .map(|e| e.0.replace("a key name", strings::TOKEN_NAME_NOUN)),
            TokenField::Module if !self.module.starts_with('/') => {
                Some(strings::MODULE_NOT_ABSOLUTE.to_string())
            }
            TokenField::Label if self.token.is_empty() || self.token.len() > MAX_TOKEN_LABEL => {
                Some(strings::token_label_length(MAX_TOKEN_LABEL))
            }
            TokenField::PinFile if !self.pin_file.starts_with('/') => {
                Some(strings::PIN_FILE_NOT_ABSOLUTE.to_string())
            }
            TokenField::Module | TokenField::Label | TokenField::PinFile => None,
        }
    }

    pub fn shown_error(&self, f: TokenField) -> Option<String> {
        if self.show_all || self.touched[f.index()] {
            self.rule_error(f)
        } else {
            None
        }
    }

    pub fn is_valid(&self) -> bool {
        TokenField::ALL
            .iter()
            .all(|f| self.rule_error(*f).is_none())
    }
}

/// PKCS#11 token labels are 32 bytes (CK_TOKEN_INFO.label).
pub const MAX_TOKEN_LABEL: usize = 32;

#[derive(Debug, Clone, PartialEq)]
pub struct App {
    /// Terminal size; page sizes and scrolling depend on it.
    pub size: (u16, u16),
    pub conn: Conn,
    /// Every live key, ordered by name (binary search for name checks and inserts).
    /// Boxed, so that a key inserted into or removed from a list of 100,000 moves
    /// pointers, not 100,000 keys of some 300 bytes each (30 MB a time: most of the
    /// dashboard's time in a burst of keys created).
    #[allow(clippy::vec_box)]
    pub keys: Vec<Box<KeyInfo>>,
    pub loaded: bool,
    pub filter: String,
    pub filter_editing: bool,
    /// The filter's cursor: characters after it (0: at the end), as in a form's field.
    pub filter_back: usize,
    /// Keys (tags) with a change sent to kmsd and not yet answered: another change of the
    /// same key waits for the answer (a slow or stopped daemon answers both, late).
    pub changes_waiting: std::collections::HashSet<String>,
    /// Indices into `keys` of the keys the filter lets through, in list order. Recomputed
    /// only when the filter or the list changes, never per frame.
    pub visible: Vec<usize>,
    /// The (trimmed) filter `visible` was computed with.
    pub applied_filter: String,
    /// Position in `visible`.
    pub selected: usize,
    /// First row of `visible` on screen.
    pub offset: usize,
    pub screen: Screen,
    pub popup: Option<Popup>,
    pub message: Option<Message>,
    /// The registered dedicated-hsm tokens, for the tokens view and the create form.
    pub hsm_tokens: HsmTokens,
    /// What the events view lists.
    pub events: EventLog,
    /// The events view the details were opened from (`enter` on an event): esc from the
    /// details goes back to it, on the same row.
    pub details_from_events: Option<EventsView>,
    /// The data directory of the daemon last connected to: a reconnect to a daemon
    /// serving another one is said, not shown silently as the same keys.
    pub data_dir: Option<String>,
    /// Connected once already: a connection now is a reconnect, after which changes
    /// made meanwhile were not announced.
    pub was_connected: bool,
    pub should_quit: bool,
}

impl App {
    pub fn new(size: (u16, u16)) -> App {
        App {
            size,
            conn: Conn::Connecting,
            keys: Vec::new(),
            loaded: false,
            filter: String::new(),
            filter_editing: false,
            filter_back: 0,
            changes_waiting: std::collections::HashSet::new(),
            visible: Vec::new(),
            applied_filter: String::new(),
            selected: 0,
            offset: 0,
            screen: Screen::Main,
            popup: None,
            message: None,
            hsm_tokens: HsmTokens::default(),
            events: EventLog::default(),
            details_from_events: None,
            data_dir: None,
            was_connected: false,
            should_quit: false,
        }
    }

    pub fn mode(&self) -> Mode {
        match &self.popup {
            Some(Popup::Help { .. }) => Mode::Help,
            Some(Popup::Create(_)) => Mode::Form,
            Some(Popup::Confirm(c)) if c.kind == ConfirmKind::DeleteNow => Mode::Prompt,
            Some(Popup::Confirm(_)) => Mode::Confirm,
            Some(Popup::Prompt(_)) => Mode::Prompt,
            Some(Popup::Grant(_)) => Mode::GrantForm,
            Some(Popup::Token(_)) => Mode::TokenForm,
            Some(Popup::Ask(_)) => Mode::Confirm,
            Some(Popup::Message(_)) => Mode::Message,
            None if self.filter_editing => Mode::Filter,
            None => match self.screen {
                Screen::Main => Mode::Main,
                Screen::Details => Mode::Details,
                Screen::Versions(_) => Mode::Versions,
                Screen::History(_) => Mode::History,
                Screen::Grants(_) => Mode::Grants,
                Screen::Tokens(_) => Mode::Tokens,
                Screen::Events(_) => Mode::Events,
            },
        }
    }

    /// Whether keys typed now go into a text field (a paste may go there too).
    pub fn editing_text(&mut self) -> bool {
        match &mut self.popup {
            Some(Popup::Create(form)) => {
                let focus = form.focus;
                form.text_mut(focus).is_some()
            }
            Some(Popup::Grant(form)) => form.focus == GrantField::Name,
            Some(Popup::Token(_) | Popup::Prompt(_)) => true,
            Some(Popup::Confirm(c)) => c.kind == ConfirmKind::DeleteNow,
            Some(_) => false,
            None => self.filter_editing,
        }
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.conn, Conn::Connected { .. })
    }

    pub fn selected_key(&self) -> Option<&KeyInfo> {
        self.visible
            .get(self.selected)
            .and_then(|&i| self.keys.get(i))
            .map(|k| &**k)
    }

    pub fn key_by_tag(&self, tag: &str) -> Option<&KeyInfo> {
        self.keys.iter().find(|k| k.tag == tag).map(|k| &**k)
    }

    /// The key an action applies to: the one a sub-view shows, else the selected one.
    pub fn target_key(&self) -> Option<&KeyInfo> {
        match &self.screen {
            Screen::Versions(v) => self.key_by_tag(&v.tag),
            Screen::History(h) => self.key_by_tag(&h.tag),
            Screen::Main | Screen::Details => self.selected_key(),
            Screen::Grants(_) | Screen::Tokens(_) | Screen::Events(_) => None,
        }
    }

    pub fn name_taken(&self, name: &str) -> bool {
        self.keys
            .binary_search_by(|k| k.name.as_str().cmp(name))
            .is_ok()
    }

    /// Rows of keys the list shows at the current size.
    pub fn list_rows(&self) -> usize {
        layout::list_rows(self.size, self.message_rows())
    }

    /// Rows the message area takes now: as many as the message needs, wrapped to the
    /// terminal's width, up to a third of the screen; one for the filter being typed, a
    /// short message, or none.
    pub fn message_rows(&self) -> u16 {
        match &self.message {
            Some(m) if !self.filter_editing => {
                let max = layout::message_max_rows(self.size.1);
                let rows = message::area_lines(&m.text, self.size.0, max).len();
                u16::try_from(rows).unwrap_or(max).clamp(1, max)
            }
            _ => 1,
        }
    }

    pub fn info(&mut self, text: impl Into<String>) {
        self.set_message(MsgKind::Info, text);
    }

    pub fn success(&mut self, text: impl Into<String>) {
        self.set_message(MsgKind::Success, text);
    }

    pub fn error(&mut self, text: impl Into<String>) {
        self.set_message(MsgKind::Error, text);
    }

    /// Removes the message if it is `text`: a hint that no longer applies.
    pub fn clear_message_if(&mut self, text: &str) {
        if self.message.as_ref().is_some_and(|m| m.text == text) {
            self.message = None;
        }
    }

    pub fn set_message(&mut self, kind: MsgKind, text: impl Into<String>) {
        self.message = Some(Message {
            kind,
            text: text.into(),
        });
    }

    /// Replaces the whole list, keeping the selection on the same key where it can.
    pub fn set_keys(&mut self, keys: Vec<KeyInfo>) {
        let keep = self.selected_key().map(|k| k.tag.clone());
        // The boxes of the list read before hold the keys read now: a list read again
        // (after each grant or revoke, in every dashboard) allocates no new ones, where
        // 100,000 new boxes a time, allocated while the old ones were still held, left
        // the allocator's heap ever larger.
        let mut spare = std::mem::take(&mut self.keys);
        // Pushed, not collected: collecting would keep the list read (~300 bytes a key)
        // as the allocation of a list of pointers (8 bytes a key).
        let mut boxed: Vec<Box<KeyInfo>> = Vec::with_capacity(keys.len());
        for k in keys {
            if k.state == KeyState::Deleted {
                continue;
            }
            boxed.push(match spare.pop() {
                Some(mut b) => {
                    *b = k;
                    b
                }
                None => Box::new(k),
            });
        }
        drop(spare);
        let mut keys = boxed;
        keys.sort_by(|a, b| a.name.cmp(&b.name));
        self.keys = keys;
        self.loaded = true;
        self.refilter(keep.as_deref());
    }

    /// Inserts or replaces one key (removing it if it is now purged), keeping the
    /// selection on the key it was on. A key's name and tag never change, and they are
    /// all the filter looks at: a replaced key keeps its row, and a key inserted or
    /// removed only moves the rows after it. So an event costs a binary search and a
    /// shift, not a pass over every key — in a burst of events about a store of 100,000
    /// keys, that pass made the dashboard fall seconds behind.
    pub fn upsert_key(&mut self, key: KeyInfo) {
        match self.index_of(&key.name, &key.tag) {
            Some(i) if key.state == KeyState::Deleted => self.remove_at(i),
            Some(i) => *self.keys[i] = key,
            None if key.state == KeyState::Deleted => {}
            None => self.insert_key(key),
        }
    }

    pub fn remove_key(&mut self, tag: &str) {
        if let Some(i) = self.keys.iter().position(|k| k.tag == tag) {
            self.remove_at(i);
        }
    }

    /// Where the key `tag`, named `name`, is in `keys` (ordered by name).
    fn index_of(&self, name: &str, tag: &str) -> Option<usize> {
        let from = self.keys.partition_point(|k| k.name.as_str() < name);
        self.keys[from..]
            .iter()
            .take_while(|k| k.name == name)
            .position(|k| k.tag == tag)
            .map(|i| from + i)
    }

    fn insert_key(&mut self, key: KeyInfo) {
        let at = self
            .keys
            .partition_point(|k| k.name.as_str() < key.name.as_str());
        // Judged by the filter `visible` was computed with, as every other row was.
        let shown = matches_filter(&key, &self.applied_filter);
        self.keys.insert(at, Box::new(key));
        let p = self.visible.partition_point(|&i| i < at);
        for i in &mut self.visible[p..] {
            *i += 1;
        }
        if shown {
            self.visible.insert(p, at);
            // A row above the selected one (or at it) pushes it down one.
            if p <= self.selected && self.visible.len() > 1 {
                self.selected += 1;
            }
        }
        self.reselect(None);
    }

    fn remove_at(&mut self, at: usize) {
        self.keys.remove(at);
        let p = self.visible.partition_point(|&i| i < at);
        if self.visible.get(p) == Some(&at) {
            self.visible.remove(p);
            // The selected key removed, the selection stays where it was: the next key.
            if p < self.selected {
                self.selected -= 1;
            }
        }
        for i in &mut self.visible[p..] {
            *i -= 1;
        }
        self.reselect(None);
    }

    /// Recomputes `visible` from the filter. The selection stays on `keep` if that key
    /// is still visible, else stays at the same position (clamped).
    pub fn refilter(&mut self, keep: Option<&str>) {
        let needle = self.filter.trim();
        self.visible.clear();
        if needle.is_empty() {
            self.visible.extend(0..self.keys.len());
        } else {
            self.visible.extend(
                self.keys
                    .iter()
                    .enumerate()
                    .filter(|(_, k)| matches_filter(k, needle))
                    .map(|(i, _)| i),
            );
        }
        self.applied_filter = needle.to_string();
        self.reselect(keep);
    }

    /// The filter changed while the list did not. When the new filter contains the old
    /// one, every key it lets through was already visible, so only those are checked
    /// again: typing into the filter gets cheaper with every character.
    pub fn refilter_typed(&mut self, keep: Option<&str>) {
        let needle = self.filter.trim();
        if !needle.contains(self.applied_filter.as_str()) {
            self.refilter(keep);
            return;
        }
        let keys = &self.keys;
        self.visible
            .retain(|&i| keys.get(i).is_some_and(|k| matches_filter(k, needle)));
        self.applied_filter = needle.to_string();
        self.reselect(keep);
    }

    fn reselect(&mut self, keep: Option<&str>) {
        if let Some(tag) = keep
            && let Some(pos) = self
                .visible
                .iter()
                .position(|&i| self.keys.get(i).is_some_and(|k| k.tag == tag))
        {
            self.selected = pos;
        }
        self.clamp_selection();
        // Said when an action found no key; with a key selected again it is not so.
        if self.selected_key().is_some() {
            self.clear_message_if(crate::tui::strings::NO_KEY_SELECTED);
        }
    }

    pub fn clamp_selection(&mut self) {
        let n = self.visible.len();
        if self.selected >= n {
            self.selected = n.saturating_sub(1);
        }
        self.offset = scroll_offset(self.offset, self.selected, self.list_rows(), n);
    }

    pub fn move_selection(&mut self, delta: isize) {
        let n = self.visible.len();
        if n == 0 {
            return;
        }
        let target = (self.selected as isize + delta).clamp(0, n as isize - 1);
        self.selected = target as usize;
        self.clamp_selection();
    }
}

/// The first row to show so that `selected` is on screen, moving the window as little
/// as possible (the list does not jump while you walk inside it).
pub fn scroll_offset(offset: usize, selected: usize, rows: usize, len: usize) -> usize {
    if rows == 0 || len == 0 {
        return 0;
    }
    let max_offset = len.saturating_sub(rows);
    let mut off = offset.min(max_offset);
    if selected < off {
        off = selected;
    } else if selected >= off + rows {
        off = selected + 1 - rows;
    }
    off.min(max_offset)
}

fn matches_filter(k: &KeyInfo, needle: &str) -> bool {
    contains_ignore_case(&k.name, needle) || contains_ignore_case(&k.tag, needle)
}

/// ASCII case-insensitive substring test without allocating: names are ASCII by rule and
/// tags are lowercase hex, and this runs over every key on each keystroke of the filter.
pub fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    if n.is_empty() {
        return true;
    }
    if n.len() > h.len() {
        return false;
    }
    h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the list does to the keys, as events and replies make it.
    #[derive(Debug, Clone)]
    enum Change {
        /// Key `i` (its name is `i`'s, as a key's name never changes) read again in
        /// this state, with this usage count.
        Upsert(u8, KeyState, u64),
        Remove(u8),
        Filter(String),
        Select(usize),
    }

    fn change() -> impl Strategy<Value = Change> {
        let state = prop_oneof![
            Just(KeyState::Enabled),
            Just(KeyState::Disabled),
            Just(KeyState::PendingDeletion),
            Just(KeyState::Deleted),
        ];
        prop_oneof![
            4 => (0u8..24, state, 0u64..5).prop_map(|(i, s, n)| Change::Upsert(i, s, n)),
            1 => (0u8..24).prop_map(Change::Remove),
            1 => "[a-c]{0,2}".prop_map(Change::Filter),
            1 => (0usize..30).prop_map(Change::Select),
        ]
    }

    /// Key `i`: names drawn from few letters, so that filters let some through, and two
    /// keys share a name now and then (a store can hold two keys of one name, item 33).
    fn key(i: u8, state: KeyState, uses: u64) -> KeyInfo {
        let letters = ["ab", "bc", "ca", "abc", "cab", "bca"];
        let mut k = crate::tui::fake::keys()[0].clone();
        k.name = format!("{}{}", letters[usize::from(i) % letters.len()], i % 9);
        k.tag = crate::tui::fake::tag(u64::from(i));
        k.state = state;
        k.usage_count = uses;
        k
    }

    proptest! {
        /// The list kept up event by event is the list read whole: the same keys, in the
        /// same order, the same ones let through by the filter, and the selection on the
        /// key it was on whenever that key is still shown.
        #[test]
        fn a_list_kept_up_by_events_is_the_list_read_whole(
            changes in proptest::collection::vec(change(), 1..60)
        ) {
            let mut app = App::new((80, 24));
            app.set_keys(Vec::new());
            let mut all: std::collections::BTreeMap<u8, KeyInfo> = Default::default();
            for c in changes {
                let before = app.selected_key().map(|k| k.tag.clone());
                let moved = matches!(c, Change::Select(_));
                match c {
                    Change::Upsert(i, state, uses) => {
                        let k = key(i, state, uses);
                        app.upsert_key(k.clone());
                        all.insert(i, k);
                    }
                    Change::Remove(i) => {
                        app.remove_key(&crate::tui::fake::tag(u64::from(i)));
                        all.remove(&i);
                    }
                    Change::Filter(f) => {
                        app.filter = f;
                        app.refilter(before.as_deref());
                    }
                    Change::Select(n) => {
                        app.selected = n;
                        app.clamp_selection();
                    }
                }
                let mut whole = App::new((80, 24));
                whole.filter = app.filter.clone();
                whole.set_keys(all.values().cloned().collect());
                let tags = |a: &App| -> Vec<String> {
                    a.keys.iter().map(|k| format!("{}/{}", k.name, k.tag)).collect()
                };
                let shown = |a: &App| -> Vec<String> {
                    a.visible.iter().map(|&i| a.keys[i].tag.clone()).collect()
                };
                // Keys of one name may stand in either order; everything else is fixed.
                let mut mine = tags(&app);
                let mut theirs = tags(&whole);
                mine.sort();
                theirs.sort();
                prop_assert_eq!(mine, theirs);
                prop_assert!(app.keys.windows(2).all(|w| w[0].name <= w[1].name));
                prop_assert_eq!(&app.keys.iter().filter(|k| k.state == KeyState::Deleted).count(), &0);
                let mut a = shown(&app);
                let mut b = shown(&whole);
                a.sort();
                b.sort();
                prop_assert_eq!(a, b);
                prop_assert!(app.visible.windows(2).all(|w| w[0] < w[1]));
                prop_assert_eq!(
                    app.keys.iter().map(|k| k.usage_count).sum::<u64>(),
                    whole.keys.iter().map(|k| k.usage_count).sum::<u64>()
                );
                if let Some(tag) = &before
                    && !moved
                    && app.visible.iter().any(|&i| &app.keys[i].tag == tag)
                {
                    prop_assert_eq!(app.selected_key().map(|k| &k.tag), Some(tag));
                }
                prop_assert!(app.visible.is_empty() || app.selected < app.visible.len());
            }
        }
    }

    /// The scroll window follows the selection without jumping.
    #[test]
    fn scroll_window_follows_selection() {
        assert_eq!(scroll_offset(0, 5, 10, 100), 0);
        assert_eq!(scroll_offset(0, 10, 10, 100), 1);
        assert_eq!(scroll_offset(50, 49, 10, 100), 49);
        assert_eq!(scroll_offset(95, 99, 10, 100), 90);
        assert_eq!(scroll_offset(3, 2, 10, 5), 0);
    }

    /// The filter matches ignoring ASCII case, anywhere in the string.
    #[test]
    fn filter_match_ignores_case() {
        assert!(contains_ignore_case("Payments-01", "ments"));
        assert!(contains_ignore_case("Payments-01", "PAY"));
        assert!(!contains_ignore_case("Payments-01", "paz"));
        assert!(!contains_ignore_case("ab", "abc"));
    }

    /// Typing into the filter narrows incrementally and gives exactly what a full
    /// recompute gives, including after backspace and for case changes.
    #[test]
    fn typed_filter_equals_full_filter() {
        let mut a = App::new((80, 24));
        a.set_keys(crate::tui::fake::many(500));
        for f in ["k", "ke", "key-00", "KEY-001", "key-00", "1", "12", ""] {
            a.filter = f.into();
            a.refilter_typed(None);
            let typed = a.visible.clone();
            a.refilter(None);
            assert_eq!(typed, a.visible, "filter {f:?}");
        }
    }
}
