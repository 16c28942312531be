//! The dashboard's state. Nothing here does I/O; `update` changes it and `ui` draws it.

use kms_shared::model::{
    DEFAULT_ROTATION_DAYS, HistoryEntry, Impact, KeyInfo, KeyState, KeyType, Protection,
    VersionInfo, validate_convergent, validate_memo, validate_name, validate_rotation_days,
};
use kms_shared::protocol::CreateKey;

use super::keymap::Mode;
use super::strings;
use super::ui::layout;

/// History entries fetched per request; scrolling near the end fetches the next page.
pub const HISTORY_PAGE: u32 = 100;
/// How close to the end of the loaded history the selection gets before the next page
/// is fetched, so that scrolling does not stall at the boundary.
pub const HISTORY_PREFETCH: usize = 10;
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
}

#[derive(Debug, Clone, PartialEq)]
pub enum Popup {
    Help,
    Create(CreateForm),
    Confirm(Confirm),
    Prompt(Prompt),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmKind {
    Rotate,
    Disable,
    RequestDeletion,
    /// Confirmed by typing the key's name rather than `y`.
    DeleteNow,
}

impl ConfirmKind {
    /// Destructive confirmations show who would be affected before asking.
    pub fn needs_impact(self) -> bool {
        !matches!(self, ConfirmKind::Rotate)
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
    Convergent,
    AutoRotation,
    Days,
    Memo,
}

impl Field {
    pub const ALL: [Field; 7] = [
        Field::Name,
        Field::Type,
        Field::Protection,
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
    /// Fields the user has changed: only those show their rule, so an empty form does
    /// not open covered in complaints.
    pub touched: [bool; 7],
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
            touched: [false; 7],
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
                .err()
                .map(|e| e.0),
            Field::Days => parse_days(&self.days).err(),
            Field::Memo => validate_memo(&self.memo).err().map(|e| e.0),
            Field::Type | Field::Protection | Field::AutoRotation => None,
        }
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
            hsm: None,
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

#[derive(Debug, Clone, PartialEq)]
pub struct App {
    /// Terminal size; page sizes and scrolling depend on it.
    pub size: (u16, u16),
    pub conn: Conn,
    /// Every live key, ordered by name (binary search for name checks and inserts).
    pub keys: Vec<KeyInfo>,
    pub loaded: bool,
    pub filter: String,
    pub filter_editing: bool,
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
            visible: Vec::new(),
            applied_filter: String::new(),
            selected: 0,
            offset: 0,
            screen: Screen::Main,
            popup: None,
            message: None,
            should_quit: false,
        }
    }

    pub fn mode(&self) -> Mode {
        match &self.popup {
            Some(Popup::Help) => Mode::Help,
            Some(Popup::Create(_)) => Mode::Form,
            Some(Popup::Confirm(c)) if c.kind == ConfirmKind::DeleteNow => Mode::Prompt,
            Some(Popup::Confirm(_)) => Mode::Confirm,
            Some(Popup::Prompt(_)) => Mode::Prompt,
            None if self.filter_editing => Mode::Filter,
            None => match self.screen {
                Screen::Main => Mode::Main,
                Screen::Details => Mode::Details,
                Screen::Versions(_) => Mode::Versions,
                Screen::History(_) => Mode::History,
            },
        }
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.conn, Conn::Connected { .. })
    }

    pub fn selected_key(&self) -> Option<&KeyInfo> {
        self.visible
            .get(self.selected)
            .and_then(|&i| self.keys.get(i))
    }

    pub fn key_by_tag(&self, tag: &str) -> Option<&KeyInfo> {
        self.keys.iter().find(|k| k.tag == tag)
    }

    /// The key an action applies to: the one a sub-view shows, else the selected one.
    pub fn target_key(&self) -> Option<&KeyInfo> {
        match &self.screen {
            Screen::Versions(v) => self.key_by_tag(&v.tag),
            Screen::History(h) => self.key_by_tag(&h.tag),
            Screen::Main | Screen::Details => self.selected_key(),
        }
    }

    pub fn name_taken(&self, name: &str) -> bool {
        self.keys
            .binary_search_by(|k| k.name.as_str().cmp(name))
            .is_ok()
    }

    /// Rows of keys the list shows at the current size.
    pub fn list_rows(&self) -> usize {
        layout::list_rows(self.size)
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

    pub fn set_message(&mut self, kind: MsgKind, text: impl Into<String>) {
        self.message = Some(Message {
            kind,
            text: text.into(),
        });
    }

    /// Replaces the whole list, keeping the selection on the same key where it can.
    pub fn set_keys(&mut self, mut keys: Vec<KeyInfo>) {
        let keep = self.selected_key().map(|k| k.tag.clone());
        keys.retain(|k| k.state != KeyState::Deleted);
        keys.sort_by(|a, b| a.name.cmp(&b.name));
        self.keys = keys;
        self.loaded = true;
        self.refilter(keep.as_deref());
    }

    /// Inserts or replaces one key (removing it if it is now purged), keeping the
    /// selection on the key it was on.
    pub fn upsert_key(&mut self, key: KeyInfo) {
        let keep = self.selected_key().map(|k| k.tag.clone());
        if let Some(i) = self.keys.iter().position(|k| k.tag == key.tag) {
            self.keys.remove(i);
        }
        if key.state != KeyState::Deleted {
            let at = self
                .keys
                .partition_point(|k| k.name.as_str() < key.name.as_str());
            self.keys.insert(at, key);
        }
        self.refilter(keep.as_deref());
    }

    pub fn remove_key(&mut self, tag: &str) {
        let keep = self.selected_key().map(|k| k.tag.clone());
        let before = self.keys.len();
        self.keys.retain(|k| k.tag != tag);
        if self.keys.len() != before {
            self.refilter(keep.as_deref());
        }
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
mod tests {
    use super::*;

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
