//! Configuration: embedded defaults (SPEC §1: no file needed), an optional TOML file
//! (`--config`), and command-line flags, in increasing precedence.

use crate::engine::EngineConfig;
use kms_shared::model::{DAY_MS, HOUR_MS};
use kms_shared::paths;
use kms_shared::protocol::DEFAULT_MAX_FRAME;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything the daemon needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    /// Share the socket with this group (0660 in a 0750 directory) instead of 0600/0700.
    pub socket_group: Option<String>,
    pub max_frame: u32,
    pub max_connections: usize,
    /// Connections one account may hold at once (root and kmsd's own account excepted),
    /// so that no local user can take every connection and lock the others out.
    pub max_connections_per_account: usize,
    /// Requests in flight on one connection before the daemon stops reading from it.
    pub max_in_flight: usize,
    /// Bytes one connection may hold in the daemon's memory (requests read and not yet
    /// answered, replies not yet written) before the daemon stops reading from it.
    pub max_buffered_bytes: usize,
    /// Bytes all connections of one account may hold together (root's and kmsd's own
    /// account's too) before the daemon stops reading from them.
    pub max_buffered_bytes_per_account: usize,
    /// A connection with no complete frame for this long is closed (not subscribers).
    pub idle_timeout: Duration,
    /// A frame whose length has arrived must be complete within this time.
    pub frame_timeout: Duration,
    pub engine: EngineConfig,
    /// Where the root key comes from under systemd (`$CREDENTIALS_DIRECTORY`).
    pub credentials_dir: Option<PathBuf>,
    /// The daemon's PKCS#11 token for `hsm` keys, as given (resolved in `kmsd::run`).
    pub pkcs11: crate::hsm::Pkcs11Settings,
}

impl Config {
    /// The embedded defaults for this process's environment.
    pub fn defaults() -> Config {
        Config {
            socket: paths::default_socket_path(),
            data_dir: paths::default_data_dir(),
            socket_group: None,
            max_frame: DEFAULT_MAX_FRAME,
            max_connections: 1024,
            max_connections_per_account: 256,
            max_in_flight: 256,
            max_buffered_bytes: 8 << 20,
            max_buffered_bytes_per_account: 64 << 20,
            idle_timeout: Duration::from_secs(300),
            frame_timeout: Duration::from_secs(10),
            engine: EngineConfig::default(),
            credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            pkcs11: Default::default(),
        }
    }

    /// The store file inside the data directory.
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join(kms_shared::paths::STORE_FILE)
    }

    /// Applies a TOML file on top of the current values.
    pub fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        let f: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        self.apply(f)
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                message,
            })
    }

    /// Applies the file's values; a value no daemon could run with (a deletion delay of
    /// `inf` hours, a timeout of -1 s, 2^63 connections, no retention) is refused with its
    /// key, never clamped into something else: `inf` once overflowed the deletion due date
    /// into the past, which purged a key at once, and a count beyond what tokio's
    /// semaphores hold panicked the accept loop or every connection after kmsd said it was
    /// ready. Only the two byte sizes are still raised to their floor, as documented.
    fn apply(&mut self, f: FileConfig) -> Result<(), (&'static str, String)> {
        if let Some(v) = f.socket {
            self.socket = v;
        }
        if let Some(v) = f.data_dir {
            self.data_dir = v;
        }
        if f.socket_group.is_some() {
            self.socket_group = f.socket_group;
        }
        if let Some(v) = f.max_frame {
            self.max_frame = at_most("max_frame", v, MAX_FRAME)?.max(1024);
        }
        if let Some(v) = f.max_connections {
            self.max_connections = count("max_connections", v, MAX_CONNECTIONS)?;
        }
        if let Some(v) = f.max_connections_per_account {
            self.max_connections_per_account =
                count("max_connections_per_account", v, MAX_CONNECTIONS)?;
        }
        if let Some(v) = f.max_in_flight {
            self.max_in_flight = count("max_in_flight", v, MAX_IN_FLIGHT)?;
        }
        if let Some(v) = f.max_buffered_bytes {
            self.max_buffered_bytes =
                at_most("max_buffered_bytes", v, MAX_BUFFERED_BYTES)?.max(64 << 10);
        }
        if let Some(v) = f.max_buffered_bytes_per_account {
            self.max_buffered_bytes_per_account = at_most(
                "max_buffered_bytes_per_account",
                v,
                MAX_BUFFERED_BYTES_PER_ACCOUNT,
            )?
            .max(64 << 10);
        }
        if let Some(v) = f.idle_timeout_secs {
            self.idle_timeout = seconds("idle_timeout_secs", v)?;
        }
        if let Some(v) = f.frame_timeout_secs {
            self.frame_timeout = seconds("frame_timeout_secs", v)?;
        }
        if let Some(v) = f.deletion_delay_hours {
            if !(0.0..=MAX_DELETION_DELAY_HOURS).contains(&v) {
                return Err((
                    "deletion_delay_hours",
                    format!("{v} is not a number of hours from 1 to {MAX_DELETION_DELAY_HOURS}"),
                ));
            }
            // Below 1 hour is raised to it when applied (SPEC §3).
            self.engine.deletion_delay_ms = (v * HOUR_MS as f64) as i64;
        }
        if let Some(v) = f.retention_days {
            // 0 would prune all history at once and forget purged keys the moment they go.
            let days = count("retention_days", v, MAX_RETENTION_DAYS)?;
            self.engine.retention_ms = i64::from(days) * DAY_MS;
        }
        if let Some(v) = f.nonce_budget {
            self.engine.nonce_budget = count("nonce_budget", v, MAX_NONCE_BUDGET)?;
        }
        if let Some(v) = f.history_scan {
            self.engine.history_scan = count("history_scan", v, MAX_HISTORY_SCAN)?;
        }
        if let Some(v) = f.history_max_entries {
            self.engine.history_max_entries =
                count("history_max_entries", v, MAX_HISTORY_MAX_ENTRIES)?;
        }
        if f.pkcs11_module.is_some() {
            self.pkcs11.module = f.pkcs11_module;
        }
        if f.pkcs11_token.is_some() {
            self.pkcs11.token = f.pkcs11_token;
        }
        if f.pkcs11_pin_file.is_some() {
            self.pkcs11.pin_file = f.pkcs11_pin_file;
        }
        Ok(())
    }
}

/// The most connections (`max_connections`, `max_connections_per_account`) a config may
/// allow. tokio's semaphores hold at most `usize::MAX >> 3` permits and panic beyond; a
/// daemon runs out of file descriptors long before this anyway.
pub const MAX_CONNECTIONS: usize = 65_536;

/// The most requests in flight per connection (`max_in_flight`): a semaphore's permits, a
/// reply queue of twice as many frames, and `acquire_many` takes a `u32`.
pub const MAX_IN_FLIGHT: usize = 65_536;

/// The largest client frame a config may allow: a full batch (1,024 items of 32 KiB) with
/// room to spare. The reader allocates a frame's body as its length says, so each
/// connection could otherwise make kmsd allocate up to 4 GiB on a client's word.
const MAX_FRAME: u32 = 64 << 20;

/// The most bytes one connection may hold (`max_buffered_bytes`); beyond this the budget
/// bounds nothing a machine has.
const MAX_BUFFERED_BYTES: usize = 1 << 30;

/// The most bytes one account's connections may hold (`max_buffered_bytes_per_account`).
const MAX_BUFFERED_BYTES_PER_ACCOUNT: usize = 16 << 30;

/// The longest retention a config may set: a hundred years.
const MAX_RETENTION_DAYS: u32 = 100 * 365;

/// The largest nonce budget a config may set. SPEC §5: a version must stop encrypting
/// well before 2^32 random 96-bit nonces (NIST SP 800-38D's bound for a collision
/// chance of 2^-32); the default is 2^30.
pub const MAX_NONCE_BUDGET: u64 = 1 << 31;

/// The largest history cap a config may set (some 500 GB of store).
const MAX_HISTORY_MAX_ENTRIES: u64 = 1_000_000_000;

/// The most history entries a config may let one query read: ~3 s of one core.
const MAX_HISTORY_SCAN: usize = 10_000_000;

/// `v` if it is at most `max`, else refused by `key`.
fn at_most<T: PartialOrd + std::fmt::Display>(
    key: &'static str,
    v: T,
    max: T,
) -> Result<T, (&'static str, String)> {
    if v > max {
        return Err((key, format!("{v} is more than the maximum of {max}")));
    }
    Ok(v)
}

/// `v` if it is from 1 to `max`, else refused by `key` (0 could as well mean "none" as
/// "no limit"; it is neither).
fn count<T: PartialOrd + std::fmt::Display + From<u8>>(
    key: &'static str,
    v: T,
    max: T,
) -> Result<T, (&'static str, String)> {
    if v < T::from(1) || v > max {
        return Err((key, format!("{v} is not a number from 1 to {max}")));
    }
    Ok(v)
}

/// The longest deletion wait a config may set: ten years.
const MAX_DELETION_DELAY_HOURS: f64 = 10.0 * 365.0 * 24.0;

/// The longest timeout a config may set: a year (a subscriber's idle time is unlimited
/// anyway).
const MAX_TIMEOUT_SECS: f64 = 365.0 * 86_400.0;

/// A timeout from the config file: at least 10 ms, at most [`MAX_TIMEOUT_SECS`].
fn seconds(key: &'static str, v: f64) -> Result<Duration, (&'static str, String)> {
    if !(0.0..=MAX_TIMEOUT_SECS).contains(&v) {
        return Err((
            key,
            format!("{v} is not a number of seconds from 0.01 to {MAX_TIMEOUT_SECS}"),
        ));
    }
    Ok(Duration::from_secs_f64(v.max(0.01)))
}

/// The config file's keys; every one optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    socket: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    socket_group: Option<String>,
    max_frame: Option<u32>,
    max_connections: Option<usize>,
    max_connections_per_account: Option<usize>,
    max_in_flight: Option<usize>,
    max_buffered_bytes: Option<usize>,
    max_buffered_bytes_per_account: Option<usize>,
    idle_timeout_secs: Option<f64>,
    frame_timeout_secs: Option<f64>,
    /// Never below 1 hour, whatever is written here (SPEC §3).
    deletion_delay_hours: Option<f64>,
    retention_days: Option<u32>,
    nonce_budget: Option<u64>,
    /// History entries one `history` or `impact` request reads at most.
    history_scan: Option<usize>,
    /// History entries the store keeps at most, of all keys (the oldest go beyond).
    history_max_entries: Option<u64>,
    /// The daemon's PKCS#11 token (SPEC §9): module path, token label, PIN file.
    pkcs11_module: Option<PathBuf>,
    pkcs11_token: Option<String>,
    pkcs11_pin_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A file overrides only the keys it names; unknown keys are an error.
    #[test]
    fn file_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kmsd.toml");
        std::fs::write(&p, "data_dir = \"/x\"\nidle_timeout_secs = 2\n").unwrap();
        let mut c = Config::defaults();
        let socket = c.socket.clone();
        c.apply_file(&p).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/x"));
        assert_eq!(c.idle_timeout, Duration::from_secs(2));
        assert_eq!(c.socket, socket);
        std::fs::write(
            &p,
            "pkcs11_module = \"/m.so\"\npkcs11_token = \"t\"\npkcs11_pin_file = \"/pin\"\n",
        )
        .unwrap();
        c.apply_file(&p).unwrap();
        assert_eq!(c.pkcs11.module, Some(PathBuf::from("/m.so")));
        assert_eq!(c.pkcs11.token.as_deref(), Some("t"));
        assert_eq!(c.pkcs11.pin_file, Some(PathBuf::from("/pin")));
        std::fs::write(&p, "bogus = 1\n").unwrap();
        assert!(matches!(c.apply_file(&p), Err(ConfigError::Parse { .. })));
    }

    /// Values no daemon could run with are refused by name, and change nothing; `inf`
    /// hours once made a deletion due in the past.
    #[test]
    fn impossible_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kmsd.toml");
        for text in [
            "deletion_delay_hours = inf",
            "deletion_delay_hours = nan",
            "deletion_delay_hours = 1e18",
            "deletion_delay_hours = -5",
            "idle_timeout_secs = inf",
            "frame_timeout_secs = -1",
            "frame_timeout_secs = nan",
        ] {
            std::fs::write(&p, text).unwrap();
            let mut c = Config::defaults();
            let err = c.apply_file(&p).unwrap_err();
            let key = text.split(' ').next().unwrap();
            assert!(
                matches!(&err, ConfigError::Invalid { key: k, .. } if *k == key),
                "{text}: {err}"
            );
            assert_eq!(c.engine.deletion_delay_ms, 72 * HOUR_MS, "{text}");
        }
        std::fs::write(&p, "deletion_delay_hours = 0.25\nframe_timeout_secs = 0\n").unwrap();
        let mut c = Config::defaults();
        c.apply_file(&p).unwrap();
        assert_eq!(c.engine.effective_deletion_delay(), HOUR_MS);
        assert_eq!(c.frame_timeout, Duration::from_millis(10));
        std::fs::write(&p, "deletion_delay_hours = 87600\n").unwrap();
        c.apply_file(&p).unwrap();
        assert_eq!(c.engine.effective_deletion_delay(), 87_600 * HOUR_MS);
    }

    /// Counts beyond what the daemon can hold, and counts of zero, are refused by name:
    /// 2^63 connections or requests in flight passed the config and panicked tokio's
    /// semaphore in the accept loop or in every connection (after READY), more than 2^32
    /// in flight broke `acquire_many`, a nonce budget could pass SPEC §5's bound, and a
    /// retention of 0 days pruned all history at once. The largest allowed values are taken.
    #[test]
    fn out_of_range_counts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kmsd.toml");
        let huge = i64::MAX;
        for text in [
            format!("max_connections = {huge}"),
            "max_connections = 65537".into(),
            "max_connections = 0".into(),
            format!("max_connections_per_account = {huge}"),
            "max_connections_per_account = 0".into(),
            format!("max_in_flight = {huge}"),
            "max_in_flight = 4294967296".into(),
            "max_in_flight = 0".into(),
            "max_frame = 4294967295".into(),
            format!("max_buffered_bytes = {huge}"),
            "max_buffered_bytes_per_account = 17179869185".into(),
            "retention_days = 0".into(),
            "history_max_entries = 0".into(),
            "history_max_entries = 1000000001".into(),
            "retention_days = 4294967295".into(),
            "nonce_budget = 0".into(),
            "nonce_budget = 2147483649".into(),
            "nonce_budget = 4294967296".into(),
            "history_scan = 0".into(),
            "history_scan = 10000001".into(),
        ] {
            std::fs::write(&p, &text).unwrap();
            let mut c = Config::defaults();
            let err = c.apply_file(&p).unwrap_err();
            let key = text.split(' ').next().unwrap();
            assert!(
                matches!(&err, ConfigError::Invalid { key: k, .. } if *k == key),
                "{text}: {err}"
            );
            assert_eq!(c.max_connections, 1024, "{text}");
            assert_eq!(c.max_in_flight, 256, "{text}");
            assert_eq!(c.engine.retention_ms, 365 * DAY_MS, "{text}");
            assert_eq!(c.engine.nonce_budget, 1 << 30, "{text}");
            assert_eq!(c.engine.history_scan, 1_000_000, "{text}");
        }
        std::fs::write(
            &p,
            "max_connections = 65536\nmax_connections_per_account = 65536\n\
             max_in_flight = 65536\nmax_frame = 67108864\nmax_buffered_bytes = 1073741824\n\
             max_buffered_bytes_per_account = 17179869184\n\
             retention_days = 1\nnonce_budget = 2147483648\nhistory_scan = 10000000\n\
             history_max_entries = 1000000000\n",
        )
        .unwrap();
        let mut c = Config::defaults();
        c.apply_file(&p).unwrap();
        assert_eq!(c.max_connections, 65_536);
        assert_eq!(c.max_connections_per_account, 65_536);
        assert_eq!(c.max_in_flight, 65_536);
        assert_eq!(c.max_frame, 64 << 20);
        assert_eq!(c.max_buffered_bytes, 1 << 30);
        assert_eq!(c.max_buffered_bytes_per_account, 16 << 30);
        assert_eq!(c.engine.retention_ms, DAY_MS);
        assert_eq!(c.engine.nonce_budget, 1 << 31);
        assert_eq!(c.engine.history_scan, 10_000_000);
        assert_eq!(c.engine.history_max_entries, 1_000_000_000);
        // The byte sizes are still raised to their floor, as documented.
        std::fs::write(
            &p,
            "max_frame = 1\nmax_buffered_bytes = 1\nmax_buffered_bytes_per_account = 1\n",
        )
        .unwrap();
        c.apply_file(&p).unwrap();
        assert_eq!(c.max_frame, 1024);
        assert_eq!(c.max_buffered_bytes, 64 << 10);
        assert_eq!(c.max_buffered_bytes_per_account, 64 << 10);
    }
}
