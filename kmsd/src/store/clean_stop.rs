//! The record of a clean stop, which decides whether an open runs the full integrity check.
//!
//! redb verifies page checksums only in its integrity check and in its repair after an
//! unclean shutdown; plain reads trust the file. The check reads every page (about 1 s per
//! 500 MiB of store on the reference machine, mostly copying pages), so running it on every
//! open made start-up grow with the history. kmsd runs it when it cannot show that the
//! file is exactly what its last clean stop left:
//!
//! - after a clean stop, once the store is closed, kmsd writes `kms.redb.clean` (0600, in
//!   the data directory) with the file's device, inode, size, modification and change
//!   times to the nanosecond, and when its pages were last all verified;
//! - an open reads and deletes that record first. It skips the check only when the record
//!   matches the file and the last full check is less than [`FULL_CHECK_EVERY_S`] old.
//!
//! Any write to the file through the file system (another program, a restore, a copy, a
//! crash part way through kmsd's own writes) changes its change time, which no program
//! can set back, so such a file is always checked in full before it is served. What the
//! record cannot see is damage below the file system (a disk returning other bytes than
//! it was given); the weekly full check bounds how long that goes unnoticed, and redb's
//! repair checks every page after any unclean stop anyway.

use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The longest time a store is served without a full integrity check at open.
pub const FULL_CHECK_EVERY_S: u64 = 7 * 24 * 3600;

/// The file as a clean stop left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanStop {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    /// When every page was last verified (Unix seconds).
    pub checked_at: u64,
}

/// Why an open runs the full check, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckReason {
    /// No record: first open, unclean stop, or a record that could not be read.
    NoCleanStop,
    /// The file changed after the clean stop.
    FileChanged,
    /// The last full check is older than [`FULL_CHECK_EVERY_S`].
    Due,
}

impl CheckReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckReason::NoCleanStop => "no record of a clean stop",
            CheckReason::FileChanged => "the file changed after the last clean stop",
            CheckReason::Due => "the last full check is more than 7 days old",
        }
    }
}

/// Where the record of `store` lives.
pub fn record_path(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_os_string();
    name.push(".clean");
    PathBuf::from(name)
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl CleanStop {
    fn of(meta: &std::fs::Metadata, checked_at: u64) -> CleanStop {
        CleanStop {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            checked_at,
        }
    }

    /// Reads and removes the record of `store` (a record is good for one open only).
    pub fn take(store: &Path) -> Option<CleanStop> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let path = record_path(store);
        // A record is a few dozen bytes; a link (to /dev/zero, say) is not followed.
        let mut bytes = Vec::new();
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(super::journal::NOFOLLOW)
            .open(&path)
            .ok()?
            .take(4096)
            .read_to_end(&mut bytes)
            .ok()?;
        // If the record cannot be removed, the next open must not trust it: refuse it now.
        std::fs::remove_file(&path).ok()?;
        super::records::decode(&bytes).ok()
    }

    /// `Ok(checked_at)` if the store file is as recorded and was checked recently enough.
    pub fn matches(record: Option<&CleanStop>, store: &Path, now: u64) -> Result<u64, CheckReason> {
        let record = record.ok_or(CheckReason::NoCleanStop)?;
        let meta = std::fs::metadata(store).map_err(|_| CheckReason::FileChanged)?;
        if CleanStop::of(&meta, record.checked_at) != *record {
            return Err(CheckReason::FileChanged);
        }
        if now.saturating_sub(record.checked_at) >= FULL_CHECK_EVERY_S || record.checked_at > now {
            return Err(CheckReason::Due);
        }
        Ok(record.checked_at)
    }

    /// Records that the closed `store` was stopped cleanly (written to a temporary file,
    /// then renamed, so a crash leaves either no record or a whole one).
    pub fn record(store: &Path, checked_at: u64) -> std::io::Result<()> {
        use std::io::Write;
        let meta = std::fs::metadata(store)?;
        let bytes = rmp_serde::to_vec(&CleanStop::of(&meta, checked_at))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let path = record_path(store);
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(super::journal::NOFOLLOW)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_record_matches_only_the_untouched_file_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("kms.redb");
        std::fs::write(&store, b"pages").unwrap();
        let now = now_s();

        CleanStop::record(&store, now - 10).unwrap();
        let rec = CleanStop::take(&store);
        assert!(rec.is_some());
        assert_eq!(CleanStop::matches(rec.as_ref(), &store, now), Ok(now - 10));
        assert_eq!(
            CleanStop::take(&store),
            None,
            "a record is good for one open"
        );
        assert_eq!(
            CleanStop::matches(None, &store, now),
            Err(CheckReason::NoCleanStop)
        );

        // Same size, same bytes length, written again: the change time moved.
        CleanStop::record(&store, now).unwrap();
        // Written until the change time moves: file times come from the kernel's coarse
        // clock (a tick of up to 10 ms), so one write a few ms later may keep it.
        let changed = || {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(&store).unwrap();
            (m.ctime(), m.ctime_nsec())
        };
        let recorded = changed();
        while changed() == recorded {
            std::thread::sleep(std::time::Duration::from_millis(2));
            std::fs::write(&store, b"PAGES").unwrap();
        }
        let rec = CleanStop::take(&store);
        assert_eq!(
            CleanStop::matches(rec.as_ref(), &store, now),
            Err(CheckReason::FileChanged)
        );

        // Untouched, but the last full check is a week old.
        CleanStop::record(&store, now - FULL_CHECK_EVERY_S).unwrap();
        let rec = CleanStop::take(&store);
        assert_eq!(
            CleanStop::matches(rec.as_ref(), &store, now),
            Err(CheckReason::Due)
        );

        // A record that does not decode is no record.
        std::fs::write(record_path(&store), b"\xc1garbage").unwrap();
        assert_eq!(CleanStop::take(&store), None);
        assert!(!record_path(&store).exists());
    }
}
