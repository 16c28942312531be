//! What several of the engine's integration tests share: an in-memory disk that fails on
//! command.

#![allow(clippy::unwrap_used, dead_code)]

pub mod softhsm;

use redb::StorageBackend;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// An in-memory disk. Clones share it. Its writes fail with ENOSPC while `full` is set;
/// [`Disk::fail_commit_after_header`] makes the `sync_data` that follows the next commit's
/// final header write fail with EIO, once: the commit reports a failure and is stored
/// all the same (what redb does when an fsync fails after its new header was written).
#[derive(Debug, Clone, Default)]
pub struct Disk {
    bytes: Arc<Mutex<Vec<u8>>>,
    pub full: Arc<AtomicBool>,
    /// Header writes (offset 0) still to come before a `sync_data` fails.
    header_writes_left: Arc<AtomicU64>,
    /// The next `sync_data` fails.
    fail_next_sync: Arc<AtomicBool>,
    /// That failing `sync_data` is followed by more (see [`Disk::fail_commit_after_header_then_syncs`]).
    more_failing_syncs: Arc<AtomicBool>,
    /// Every `sync_data` fails while set.
    pub syncs_fail: Arc<AtomicBool>,
    /// The next `write` fails with ENOSPC, once: a commit that fails before anything of
    /// it landed, on a disk that works again at once.
    pub fail_next_write: Arc<AtomicBool>,
    /// A real directory that goes with the disk, for the store's key slot file (a real
    /// file: clones, which reopen the store, find what the engine wrote there).
    dir: Arc<FilesBeside>,
}

/// A temporary directory (a `Default` for [`Disk`]'s).
#[derive(Debug)]
struct FilesBeside(tempfile::TempDir);

impl Default for FilesBeside {
    fn default() -> Self {
        FilesBeside(tempfile::tempdir().unwrap())
    }
}

impl Disk {
    /// The label to open the store on this disk with: a path in the disk's directory, so
    /// that its key slot file is the disk's own.
    pub fn label(&self, name: &str) -> std::path::PathBuf {
        self.dir.0.path().join(name)
    }

    /// The next commit (two-phase: its header is written twice, each write followed by
    /// an fsync) fails at the fsync after its second header write, which has landed.
    pub fn fail_commit_after_header(&self) {
        self.header_writes_left.store(2, Ordering::SeqCst);
    }

    /// As [`Disk::fail_commit_after_header`], and every `sync_data` fails from then on
    /// (until `syncs_fail` is cleared): no commit after the landed one can confirm it.
    pub fn fail_commit_after_header_then_syncs(&self) {
        self.more_failing_syncs.store(true, Ordering::SeqCst);
        self.fail_commit_after_header();
    }
}

fn enospc() -> std::io::Error {
    std::io::Error::from_raw_os_error(28)
}

impl StorageBackend for Disk {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.bytes.lock().unwrap().len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let b = self.bytes.lock().unwrap();
        let start = offset as usize;
        let src = b
            .get(start..start + out.len())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut b = self.bytes.lock().unwrap();
        if self.full.load(Ordering::SeqCst) && len as usize > b.len() {
            return Err(enospc());
        }
        b.resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        if self.fail_next_sync.swap(false, Ordering::SeqCst) {
            if self.more_failing_syncs.swap(false, Ordering::SeqCst) {
                self.syncs_fail.store(true, Ordering::SeqCst);
            }
            return Err(std::io::Error::from_raw_os_error(5));
        }
        if self.syncs_fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(5));
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        if self.full.load(Ordering::SeqCst) || self.fail_next_write.swap(false, Ordering::SeqCst) {
            return Err(enospc());
        }
        if offset == 0
            && self
                .header_writes_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                == Ok(1)
        {
            self.fail_next_sync.store(true, Ordering::SeqCst);
        }
        let mut b = self.bytes.lock().unwrap();
        let start = offset as usize;
        if b.len() < start + data.len() {
            b.resize(start + data.len(), 0);
        }
        b[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}
