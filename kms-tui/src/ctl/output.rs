//! How kmsctl shows daemon records: JSON for programs, tables and `field: value` lines for
//! people. Each record type has one function that lists its fields in display order; the
//! JSON object and the text lines are both made from that list, so they cannot disagree.

use kms_shared::model::{
    HistoryEntry, Impact, KeyInfo, KeyType, UnixMillis, VersionInfo, format_time,
};
use kms_shared::protocol::{DaemonStatus, Event, WireError};
use serde_json::{Map, Value, json};
use std::io::{self, Write};

/// A record's fields in display order.
pub type Record = Vec<(&'static str, Value)>;

/// RFC 3339 UTC, or null when the time is absent.
pub fn time(t: Option<UnixMillis>) -> Value {
    t.map_or(Value::Null, |t| Value::String(format_time(t)))
}

// The record functions destructure exhaustively so that a field added to a shared type
// fails to compile here instead of silently missing from the output.

pub fn key_record(k: &KeyInfo) -> Record {
    let KeyInfo {
        name,
        tag,
        key_type,
        protection,
        hsm,
        state,
        convergent,
        current_version,
        auto_rotation,
        rotation_days,
        next_rotation_at,
        usage_count,
        last_used_at,
        last_used_by,
        created_at,
        deletion_due_at,
        deleted_at,
        memo,
    } = k;
    vec![
        ("name", json!(name)),
        ("tag", json!(tag)),
        ("type", json!(key_type.as_str())),
        ("protection", json!(protection.as_str())),
        ("hsm", json!(hsm)),
        ("state", json!(state.as_str())),
        ("convergent", json!(convergent)),
        ("current_version", json!(current_version)),
        ("auto_rotation", json!(auto_rotation)),
        ("rotation_days", json!(rotation_days)),
        ("next_rotation_at", time(*next_rotation_at)),
        ("usage_count", json!(usage_count)),
        ("last_used_at", time(*last_used_at)),
        ("last_used_by", json!(last_used_by)),
        ("created_at", time(Some(*created_at))),
        ("deletion_due_at", time(*deletion_due_at)),
        ("deleted_at", time(*deleted_at)),
        ("memo", json!(memo)),
    ]
}

/// A version of a key of `key_type`. Only AES encryptions are counted (they spend the
/// nonce budget): for the other types the count is null (`-` in text), not a 0 that reads
/// as "never used".
pub fn version_record(v: &VersionInfo, key_type: KeyType) -> Record {
    let VersionInfo {
        version,
        enabled,
        created_at,
        encryptions,
    } = v;
    let encryptions = match key_type {
        KeyType::Aes256 => json!(encryptions),
        KeyType::Ecdsa | KeyType::Rsa2048 => Value::Null,
    };
    vec![
        ("version", json!(version)),
        ("enabled", json!(enabled)),
        ("created_at", time(Some(*created_at))),
        ("encryptions", encryptions),
    ]
}

pub fn history_record(h: &HistoryEntry) -> Record {
    let HistoryEntry {
        seq,
        time: at,
        key_tag,
        action,
        version,
        result,
        account,
        uid,
        pid,
        client,
        items,
        failed,
    } = h;
    vec![
        ("seq", json!(seq)),
        ("time", time(Some(*at))),
        ("key_tag", json!(key_tag)),
        ("action", json!(action.as_str())),
        ("version", json!(version)),
        ("result", json!(result)),
        ("account", json!(account)),
        ("uid", json!(uid)),
        ("pid", json!(pid)),
        ("client", json!(client)),
        ("items", json!(items)),
        ("failed", json!(failed)),
    ]
}

pub fn status_record(s: &DaemonStatus) -> Record {
    let DaemonStatus {
        daemon_version,
        protocol,
        pid,
        uptime_ms,
        socket,
        data_dir,
        keys,
        connections,
        next_due_at,
    } = s;
    vec![
        ("daemon_version", json!(daemon_version)),
        ("protocol", json!(protocol)),
        ("pid", json!(pid)),
        ("uptime_ms", json!(uptime_ms)),
        ("socket", json!(socket)),
        ("data_dir", json!(data_dir)),
        ("keys", json!(keys)),
        ("connections", json!(connections)),
        ("next_due_at", time(*next_due_at)),
    ]
}

pub fn impact_record(i: &Impact) -> Record {
    let Impact {
        key_tag,
        since,
        recent_uses,
        last_used_at,
        accounts,
        counted_back_to,
    } = i;
    let accounts: Vec<Value> = accounts
        .iter()
        .map(|a| json!({"account": a.account, "uses": a.uses, "last_used_at": time(Some(a.last_used_at))}))
        .collect();
    vec![
        ("key_tag", json!(key_tag)),
        ("since", time(Some(*since))),
        ("recent_uses", json!(recent_uses)),
        ("last_used_at", time(*last_used_at)),
        ("accounts", Value::Array(accounts)),
        ("counted_back_to", time(*counted_back_to)),
    ]
}

pub fn event_record(e: &Event) -> Record {
    let Event {
        seq,
        time: at,
        kind,
        key_tag,
        key_name,
        version,
        state,
        account,
        message,
    } = e;
    vec![
        ("seq", json!(seq)),
        ("time", time(Some(*at))),
        ("kind", json!(kind.as_str())),
        ("key_tag", json!(key_tag)),
        ("key_name", json!(key_name)),
        ("version", json!(version)),
        ("state", json!(state.map(|s| s.as_str()))),
        ("account", json!(account)),
        ("message", json!(message)),
    ]
}

pub fn error_json(kind: &str, message: &str) -> Value {
    json!({"error": {"kind": kind, "message": message}})
}

pub fn wire_error_line(e: &WireError) -> String {
    format!("error: {}: {}", e.kind, e.message)
}

pub fn to_json(record: Record) -> Value {
    Value::Object(
        record
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect::<Map<_, _>>(),
    )
}

/// Writes `items` as one JSON array and a newline, record by record.
fn write_json_list<W: Write, T>(
    mut out: W,
    items: &[T],
    record: fn(&T) -> Record,
) -> io::Result<()> {
    out.write_all(b"[")?;
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        serde_json::to_writer(&mut out, &to_json(record(item)))?;
    }
    out.write_all(b"]\n")?;
    out.flush()
}

pub use kms_shared::text::printable;

/// A JSON value as a table cell or a `field: value` value: strings unquoted, null and the
/// empty string (a key without memo) as `-`.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => printable(s),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(", "),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", cell(v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

pub fn lines(record: &Record) -> String {
    record
        .iter()
        .map(|(k, v)| format!("{k}: {}\n", cell(v)))
        .collect()
}

/// Columns padded to their widest cell, two spaces apart; the last column is not padded
/// so that lines carry no trailing blanks.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let last = row.len().saturating_sub(1);
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push('\n');
    }
    out
}

pub fn keys_table(keys: &[KeyInfo]) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            // At its version limit a key rotates no more, whatever its setting says: a
            // period there read as rotation still going on.
            let auto = if k.auto_rotation && k.current_version >= k.protection.max_versions() {
                "limit".into()
            } else if k.auto_rotation {
                format!("{}d", k.rotation_days)
            } else {
                "off".into()
            };
            vec![
                k.name.clone(),
                k.key_type.display_name().into(),
                k.protection.as_str().into(),
                k.state.as_str().into(),
                k.current_version.to_string(),
                auto,
                k.usage_count.to_string(),
                k.tag.clone(),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "TYPE", "PROT", "STATE", "VER", "AUTO", "USES", "TAG",
        ],
        &rows,
    )
}

/// A table of some of a record's fields: `(header, field)` per column.
fn record_table<T>(items: &[T], record: impl Fn(&T) -> Record, columns: &[(&str, &str)]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            let r = record(i);
            columns
                .iter()
                .map(|(_, field)| {
                    r.iter()
                        .find(|(k, _)| k == field)
                        .map_or_else(String::new, |(_, v)| cell(v))
                })
                .collect()
        })
        .collect();
    let headers: Vec<&str> = columns.iter().map(|(h, _)| *h).collect();
    table(&headers, &rows)
}

pub fn versions_table(versions: &[VersionInfo], key_type: KeyType) -> String {
    record_table(
        versions,
        |v| version_record(v, key_type),
        &[
            ("VERSION", "version"),
            ("ENABLED", "enabled"),
            ("CREATED", "created_at"),
            ("ENCRYPTIONS", "encryptions"),
        ],
    )
}

pub fn history_table(entries: &[HistoryEntry]) -> String {
    record_table(
        entries,
        history_record,
        &[
            ("TIME", "time"),
            ("ACTION", "action"),
            ("VER", "version"),
            ("RESULT", "result"),
            ("ITEMS", "items"),
            ("ACCOUNT", "account"),
            ("UID", "uid"),
            ("PID", "pid"),
            ("CLIENT", "client"),
        ],
    )
}

/// "alice (12), bob (3)": who used a key, for the impact text and warnings.
pub fn accounts_summary(i: &Impact) -> String {
    if i.accounts.is_empty() {
        return "-".into();
    }
    i.accounts
        .iter()
        .map(|a| format!("{} ({})", a.account, a.uses))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn impact_text(i: &Impact) -> String {
    let mut record = impact_record(i);
    record.retain(|(k, _)| *k != "accounts");
    record.push(("accounts", Value::String(accounts_summary(i))));
    lines(&record)
}

/// Where results go: JSON (one value per line) with `--json`, the text form otherwise.
/// A write to standard output that failed, told apart from other I/O errors: what it
/// was to print is kmsd's answer, so what kmsd did stands (a rotation, a deletion).
#[derive(Debug, thiserror::Error)]
#[error("standard output: {0}")]
pub struct StdoutFailed(io::Error);

impl StdoutFailed {
    /// `e`, of the same kind (a broken pipe stays one), marked as standard output's.
    fn wrap(e: io::Error) -> io::Error {
        io::Error::new(e.kind(), StdoutFailed(e))
    }
}

#[derive(Debug)]
pub struct Printer {
    pub json: bool,
    out: io::Stdout,
}

impl Printer {
    pub fn new(json: bool) -> Printer {
        Printer {
            json,
            out: io::stdout(),
        }
    }

    /// Builds only the form that was asked for: a full key list is not rendered twice.
    pub fn emit<T: AsRef<[u8]>>(
        &mut self,
        json: impl FnOnce() -> Value,
        text: impl FnOnce() -> T,
    ) -> io::Result<()> {
        if self.json {
            self.json_line(&json())
        } else {
            self.raw(text().as_ref())
        }
    }

    /// A list: in JSON one array, written record by record as it is made (a list of
    /// 100,000 keys built whole as JSON values first took 8 times its output in memory,
    /// 343 MB); in text, `text`.
    pub fn emit_list<T, U: AsRef<[u8]>>(
        &mut self,
        items: &[T],
        record: fn(&T) -> Record,
        text: impl FnOnce() -> U,
    ) -> io::Result<()> {
        if !self.json {
            return self.raw(text().as_ref());
        }
        write_json_list(io::BufWriter::new(self.out.lock()), items, record)
            .map_err(StdoutFailed::wrap)
    }

    pub fn json_line(&mut self, v: &Value) -> io::Result<()> {
        let mut out = self.out.lock();
        serde_json::to_writer(&mut out, v)
            .map_err(io::Error::from)
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush())
            .map_err(StdoutFailed::wrap)
    }

    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut out = self.out.lock();
        out.write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(StdoutFailed::wrap)
    }

    pub fn key(&mut self, k: &KeyInfo) -> io::Result<()> {
        self.record(key_record(k))
    }

    pub fn record(&mut self, r: Record) -> io::Result<()> {
        if self.json {
            self.json_line(&to_json(r))
        } else {
            self.raw(lines(&r).as_bytes())
        }
    }

    /// The versions of a key of `key_type`.
    pub fn versions(&mut self, v: &[VersionInfo], key_type: KeyType) -> io::Result<()> {
        self.emit(
            || {
                Value::Array(
                    v.iter()
                        .map(|x| to_json(version_record(x, key_type)))
                        .collect(),
                )
            },
            || versions_table(v, key_type),
        )
    }

    /// An `ncpkms:` string: the bare line, or `{"<field>": value}`.
    pub fn ncpkms(&mut self, field: &str, value: &str) -> io::Result<()> {
        self.emit(|| json!({ field: value }), || format!("{value}\n"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kms_shared::model::{KeyState, KeyType, Protection};
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    fn sample_key() -> KeyInfo {
        KeyInfo {
            name: "payments".into(),
            tag: "0123456789abcdef0123456789abcdef".into(),
            key_type: KeyType::Aes256,
            protection: Protection::Basic,
            hsm: None,
            state: KeyState::Enabled,
            convergent: false,
            current_version: 2,
            auto_rotation: true,
            rotation_days: 90,
            next_rotation_at: Some(1_700_000_000_000),
            usage_count: 7,
            last_used_at: Some(1_700_000_001_500),
            last_used_by: Some("alice".into()),
            created_at: 1_690_000_000_000,
            deletion_due_at: None,
            deleted_at: None,
            memo: "for the billing service".into(),
        }
    }

    /// A list written record by record is the JSON array of its records, and an empty
    /// list `[]`.
    #[test]
    fn lists_are_written_as_one_json_array() {
        let keys = [
            sample_key(),
            KeyInfo {
                name: "second".into(),
                ..sample_key()
            },
        ];
        let mut out = Vec::new();
        write_json_list(&mut out, &keys, key_record).unwrap();
        let whole = Value::Array(keys.iter().map(|k| to_json(key_record(k))).collect());
        assert_eq!(String::from_utf8(out).unwrap(), format!("{whole}\n"));
        let mut out = Vec::new();
        write_json_list(&mut out, &keys[..0], key_record).unwrap();
        assert_eq!(out, b"[]\n");
    }

    /// Every field SPEC §11 requires is present, times are RFC 3339 UTC, absent times null.
    #[test]
    fn key_json_has_required_fields_and_rfc3339_times() {
        let v = to_json(key_record(&sample_key()));
        for f in [
            "name",
            "tag",
            "type",
            "protection",
            "state",
            "convergent",
            "current_version",
            "auto_rotation",
            "rotation_days",
            "next_rotation_at",
            "usage_count",
            "last_used_at",
            "created_at",
            "deletion_due_at",
            "memo",
            "hsm",
            "last_used_by",
            "deleted_at",
        ] {
            assert!(v.get(f).is_some(), "missing {f}");
        }
        for f in ["next_rotation_at", "last_used_at", "created_at"] {
            let s = v[f].as_str().unwrap();
            assert!(s.ends_with('Z'), "{f} = {s}");
            OffsetDateTime::parse(s, &Rfc3339).unwrap();
        }
        assert_eq!(v["created_at"], "2023-07-22T04:26:40Z");
        assert_eq!(v["deletion_due_at"], Value::Null);
        assert_eq!(v["type"], "aes256");
        assert_eq!(v["state"], "enabled");
        assert_eq!(v["current_version"], 2);
    }

    /// Text forms: `field: value` lines with `-` for null, and aligned tables.
    #[test]
    fn text_forms() {
        let k = sample_key();
        let text = lines(&key_record(&k));
        assert!(text.starts_with("name: payments\ntag: "));
        assert!(text.contains("\ndeletion_due_at: -\n"));
        // An empty memo is `-` like the other empty fields (it printed "memo: "), in text
        // only: JSON keeps the empty string.
        let no_memo = KeyInfo {
            memo: String::new(),
            ..k.clone()
        };
        assert!(lines(&key_record(&no_memo)).ends_with("\nmemo: -\n"));
        assert_eq!(to_json(key_record(&no_memo))["memo"], "");
        let t = keys_table(std::slice::from_ref(&k));
        let mut rows = t.lines();
        let header = rows.next().unwrap();
        let row = rows.next().unwrap();
        assert!(header.starts_with("NAME      TYPE    PROT   STATE    VER  AUTO  USES  TAG"));
        assert_eq!(header.find("TAG"), row.find("0123"));
        assert!(row.contains(" 90d "));
        assert!(!t.lines().any(|l| l.ends_with(' ')));
        let at_limit = KeyInfo {
            current_version: Protection::Basic.max_versions(),
            next_rotation_at: None,
            ..k.clone()
        };
        let t = keys_table(&[at_limit]);
        assert!(t.lines().nth(1).unwrap().contains(" limit "), "{t}");
    }

    /// Only AES encryptions are counted: an RSA or ECDSA version shows `-` (null in
    /// JSON), not the 0 kmsd reports, which read as "never used" after encrypting.
    #[test]
    fn versions_count_only_aes_encryptions() {
        let v = VersionInfo {
            version: 1,
            enabled: true,
            created_at: 1_690_000_000_000,
            encryptions: 0,
        };
        for key_type in [KeyType::Rsa2048, KeyType::Ecdsa] {
            let t = versions_table(std::slice::from_ref(&v), key_type);
            assert_eq!(
                t.lines().nth(1).unwrap(),
                "1        true     2023-07-22T04:26:40Z  -"
            );
            let json = to_json(version_record(&v, key_type));
            assert_eq!(json["encryptions"], Value::Null);
        }
        let aes = VersionInfo {
            encryptions: 12,
            ..v
        };
        let t = versions_table(std::slice::from_ref(&aes), KeyType::Aes256);
        assert!(t.lines().nth(1).unwrap().ends_with("  12"), "{t}");
        assert_eq!(
            to_json(version_record(&aes, KeyType::Aes256))["encryptions"],
            12
        );
    }

    /// Text from the daemon reaches the terminal with its control characters escaped: a
    /// program named `a\r\x1b[K` could otherwise blank its own line in `kmsctl history`.
    #[test]
    fn control_characters_are_escaped_in_text_output() {
        let entry = HistoryEntry {
            seq: 1,
            time: 1_690_000_000_000,
            key_tag: "0123456789abcdef0123456789abcdef".into(),
            version: Some(1),
            action: kms_shared::model::Action::Encrypt,
            result: "ok".into(),
            account: "mallory".into(),
            uid: 1001,
            pid: 7,
            client: "a\r\u{1b}[K\u{202e}x".into(),
            items: 1,
            failed: 0,
        };
        let text = history_table(std::slice::from_ref(&entry));
        assert!(!text.contains(['\r', '\u{1b}', '\u{202e}']), "{text:?}");
        assert!(text.contains("a\\u{d}\\u{1b}[K\\u{202e}x"), "{text}");
        let mut record = history_record(&entry);
        record.retain(|(k, _)| *k == "client");
        assert_eq!(lines(&record), "client: a\\u{d}\\u{1b}[K\\u{202e}x\n");
        // JSON keeps the string as it is (escaped by JSON itself).
        let json = to_json(history_record(&entry));
        assert_eq!(json["client"], "a\r\u{1b}[K\u{202e}x");
        assert_eq!(printable("plain — ünïcode"), "plain — ünïcode");
    }
}
