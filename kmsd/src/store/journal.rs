//! The call journal: how a crypto call's history entry and counters become durable with
//! one synchronous write of a small record, instead of a redb commit per group.
//!
//! # Why it exists
//!
//! Every answered call is durably in the history (SPEC §7). Through redb alone, each group
//! of calls cost a two-phase commit: two `fsync`s and ~0.6 ms of CPU on the writer thread,
//! so 16 clients made ~1,000 commits/s of ~8 calls each (docs/PERFORMANCE.md). Here a group
//! of calls is one record written in place into a preallocated file and made durable with
//! one synchronous write: the file's blocks already exist, so no metadata has to be written
//! (0.25 ms per synchronous 4 KiB overwrite on the reference disk, against 0.4–0.5 ms for a
//! write that grows a file). Lifecycle changes never go through the journal: they commit to
//! redb directly, and the journal's pending calls are folded into that same transaction
//! first, so the store sees every change in the order it was acknowledged.
//!
//! # Format
//!
//! `kms.redb.journal`, beside the store, preallocated with zeros to [`CAPACITY`] and
//! written from its start. If it cannot be allocated (a full disk), kmsd runs without it:
//! every group of calls is then a redb commit, as lifecycle changes are. One record per group of calls:
//!
//! ```text
//! "KMSJ" | payload length u32 LE | generation [16] | index u64 LE | payload | SHA-256
//! ```
//!
//! The payload is MessagePack of the group's [`CallOp`]s; the digest covers everything
//! before it. The generation is a random 128-bit value kept in the store's meta table and
//! replaced by every fold. A record counts only if it carries the store's generation, the
//! next index in order, and a matching digest; reading stops at the first that does not.
//!
//! # Recovery and folding
//!
//! A record is appended and synced before any call of its group is answered. Opening the
//! store reads the records of its generation from the start ([`recover`]) and folds them
//! into redb in one transaction that also stores a new generation. The writer folds the
//! same way when the journal is half full, when enough calls are pending, before a
//! lifecycle change, before a reader needs history in redb ([`super::writer::Writer::settle`])
//! and when it stops. After a fold has committed, the journal restarts at offset 0 under the
//! new generation, and every older record is dead: its generation no longer matches. A
//! crash can tear only the record being written, which no one was answered for.
//!
//! # How a record reaches the disk
//!
//! Where the file system allows it (ext4, xfs, btrfs), the journal is opened `O_DIRECT`
//! and each record written with one `pwritev2(RWF_DSYNC)`, which both writes and makes
//! durable, and nothing passes through the page cache, so there is no dirty page to find and write back. Measured on
//! the reference VM with `kms-bench`'s journal line (records of 8 calls, medians of 3):
//! CPU per durable append 72 -> 44 µs, p50 wall 154 -> 121 µs. Where `O_DIRECT` is
//! refused (tmpfs), records are written through the page cache and `fdatasync`ed.
//!
//! Every record starts on a block boundary and is written as whole blocks, zeros after
//! it to the end of its last block (the zeros are where reading stops). So no write ever
//! covers a block of an earlier record: a write torn by power loss (a disk that writes a
//! 4 KiB block as eight 512-byte sectors) can only damage its own record, which no one
//! was answered for. Records used to be packed, each written together with the start of
//! the block it began in, so a torn write could also take the acknowledged records
//! before it in that block. A reader that finds no record where the last one ended looks
//! once more at the next block boundary, which also reads journals written packed (by an
//! older kmsd that then crashed). A record takes at least one block, hence the larger
//! file. Writing two records at once (they no longer share blocks) was measured and
//! dropped: docs/PERFORMANCE.md.
//!
//! Why SHA-256 and not a CRC: history holds caller-chosen text (program names). A torn
//! record must not pass as whole even if its content was chosen to make it (the reason
//! kmsd keeps redb's two-phase commit rather than its checksum-only commit). A copy of the
//! store (a backup) carries no generation, so a restored store never adopts a journal.

use super::records::HistoryRecord;
use kms_shared::model::UnixMillis;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// Size of the journal file. A fold is due at half of it (1,024 records of one block), or
/// sooner (the writer folds every ~2,000 calls, a few hundred records); the other half
/// takes the largest group the writer forms (4,096 calls, ~450 KiB).
pub const CAPACITY: u64 = 8 << 20;
const MAGIC: [u8; 4] = *b"KMSJ";
const HEADER_LEN: usize = 4 + 4 + 16 + 8;
const DIGEST_LEN: usize = 32;

/// `O_NOFOLLOW` for `OpenOptions::custom_flags`.
pub(crate) const NOFOLLOW: i32 = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
/// `O_NONBLOCK`: no effect on a regular file; an open of a FIFO returns at once.
const NONBLOCK: i32 = rustix::fs::OFlags::NONBLOCK.bits() as i32;

/// Which fold period a record belongs to (random, stored in the meta table).
pub type Generation = [u8; 16];

/// The unit of a direct write: a multiple of every logical block size Linux uses.
const BLOCK: usize = 4096;

/// One block of a direct write; the alignment is what `O_DIRECT` asks of a buffer.
#[derive(Clone)]
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

impl Block {
    const ZERO: Block = Block([0; BLOCK]);
}

/// One effect of a crypto call, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallOp {
    /// A history entry with the sequence number the writer gave it.
    History {
        tag: String,
        seq: u64,
        record: HistoryRecord,
    },
    /// `n` successful calls, the latest at `at` by `account`.
    Use {
        tag: String,
        at: UnixMillis,
        account: String,
        n: u64,
    },
    /// `n` encryptions under a version (the nonce budget).
    Encryptions { tag: String, version: u32, n: u64 },
}

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("call journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("call journal: cannot encode a record: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("call journal {path}: record {index} is whole but unreadable: {message}")]
    Corrupt {
        path: PathBuf,
        index: u64,
        message: String,
    },
    /// The record does not fit in what is left of the file: fold first.
    #[error("call journal: no room for a record of {0} bytes")]
    Full(usize),
}

/// The journal file of the store at `store`.
pub fn path_for(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(".journal");
    PathBuf::from(name)
}

/// A fresh generation from the OS CSPRNG.
pub fn new_generation() -> Result<Generation, std::io::Error> {
    let mut g = [0u8; 16];
    getrandom::fill(&mut g).map_err(std::io::Error::other)?;
    Ok(g)
}

/// The calls journaled under `generation`, in order (empty if there is no file).
pub fn recover(path: &Path, generation: &Generation) -> Result<Vec<CallOp>, JournalError> {
    // Non-blocking: a FIFO put in the journal's place must not hold the start up for
    // ever in `open` (it is then refused, as not a regular file).
    match OpenOptions::new()
        .read(true)
        .custom_flags(NOFOLLOW | NONBLOCK)
        .open(path)
    {
        Ok(f) if !f.metadata().is_ok_and(|m| m.is_file()) => Err(JournalError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("not a regular file"),
        }),
        Ok(f) => recover_from(&f, path, generation),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(JournalError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// How much of the journal is read at a time while looking for its records.
const READ_CHUNK: usize = 256 * 1024;

/// [`recover`] from an open file. The file is read from its start only as far as the
/// records of `generation` go: the rest (most of the file, after a clean stop all of it)
/// holds nothing live, so an unreadable sector there must not keep the store from
/// opening, as it did when the whole file was read first.
fn recover_from(
    file: &impl std::os::unix::fs::FileExt,
    path: &Path,
    generation: &Generation,
) -> Result<Vec<CallOp>, JournalError> {
    let mut buf = Vec::new();
    loop {
        let (_, end) = scan(&buf, generation);
        if !may_continue_past(&buf, end, generation) {
            break;
        }
        let at = buf.len();
        if at as u64 >= CAPACITY {
            break;
        }
        buf.resize(at + READ_CHUNK, 0);
        match file.read_at(&mut buf[at..], at as u64) {
            Ok(0) => {
                buf.truncate(at);
                break;
            }
            Ok(n) => buf.truncate(at + n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => buf.truncate(at),
            Err(source) => {
                return Err(JournalError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
    let mut ops = Vec::new();
    for (index, payload) in scan(&buf, generation).0.into_iter().enumerate() {
        let mut group: Vec<CallOp> =
            super::records::decode(payload).map_err(|e| JournalError::Corrupt {
                path: path.to_path_buf(),
                index: index as u64,
                message: e.to_string(),
            })?;
        ops.append(&mut group);
    }
    Ok(ops)
}

/// The payloads of the whole records of `generation` at the start of `buf`, in order,
/// and the offset where the last of them ends.
fn scan<'a>(buf: &'a [u8], generation: &Generation) -> (Vec<&'a [u8]>, usize) {
    let (mut payloads, mut offset) = (Vec::new(), 0usize);
    loop {
        let index = payloads.len() as u64;
        // Where the last record ended (journals written before records were aligned),
        // else the next block boundary.
        let found = match whole_record_at(buf, offset, generation, index) {
            Some(r) => Some((offset, r)),
            None => offset.checked_next_multiple_of(BLOCK).and_then(|aligned| {
                whole_record_at(buf, aligned, generation, index).map(|r| (aligned, r))
            }),
        };
        let Some((at, record)) = found else {
            return (payloads, offset);
        };
        offset = at + record.len();
        payloads.push(&record[HEADER_LEN..record.len() - DIGEST_LEN]);
    }
}

/// Whether a record of `generation` might follow the one that ends at `end` beyond what
/// `buf` holds: where the scan looks next (`end`, then the next block boundary), `buf`
/// ends before a header, or holds the header of the next record with its body cut off.
fn may_continue_past(buf: &[u8], end: usize, generation: &Generation) -> bool {
    let aligned = end.checked_next_multiple_of(BLOCK).unwrap_or(end);
    [end, aligned].into_iter().any(|at| {
        let Some(header) = buf.get(at..at.saturating_add(HEADER_LEN)) else {
            return true;
        };
        header[..4] == MAGIC && header[8..24] == generation[..] && {
            let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            at + HEADER_LEN + len as usize + DIGEST_LEN > buf.len()
        }
    })
}

/// The record at `offset` if it is whole, of `generation` and has `index`.
fn whole_record_at<'a>(
    buf: &'a [u8],
    offset: usize,
    generation: &Generation,
    index: u64,
) -> Option<&'a [u8]> {
    let rest = buf.get(offset..)?;
    let header = rest.get(..HEADER_LEN)?;
    if header[..4] != MAGIC || header[8..24] != generation[..] {
        return None;
    }
    let len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    let at = u64::from_le_bytes(header[24..32].try_into().ok()?);
    if at != index {
        return None;
    }
    let body_end = HEADER_LEN.checked_add(len)?;
    let record = rest.get(..body_end.checked_add(DIGEST_LEN)?)?;
    let digest = Sha256::digest(&record[..body_end]);
    (digest.as_slice() == &record[body_end..]).then_some(record)
}

/// The open journal, written by the store's writer thread only.
pub struct Journal {
    file: File,
    /// Written with `O_DIRECT | O_DSYNC` (see the module docs); otherwise through the page
    /// cache with an `fdatasync` per record.
    direct: bool,
    path: PathBuf,
    generation: Generation,
    /// Index of the next record in this generation.
    index: u64,
    /// Where the last record ends (the next starts at the next block boundary).
    offset: u64,
    /// Tests: every append writes its record, then reports an I/O error.
    #[cfg(test)]
    fail_after_writing: bool,
}

impl Journal {
    /// Opens (or creates, mode 0600) the journal and makes sure all of it is allocated,
    /// so that appending never has to write file metadata. Writing starts at the start,
    /// under `generation`.
    pub fn open(path: &Path, generation: Generation) -> Result<Journal, JournalError> {
        Journal::open_with(path, generation, true)
    }

    /// [`Journal::open`], with direct I/O only if `allow_direct` (tests compare the two).
    fn open_with(
        path: &Path,
        generation: Generation,
        allow_direct: bool,
    ) -> Result<Journal, JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        // A journal that shares its file with another name (a hard link: `kmsd restore`
        // keeps the replaced store's journal under the aside name by linking it, and a
        // crash before the old name is unlinked leaves both) belongs to that other store:
        // writing here would overwrite its calls. This store gets a file of its own.
        if let Ok(meta) = std::fs::symlink_metadata(path)
            && meta.is_file()
            && std::os::unix::fs::MetadataExt::nlink(&meta) > 1
        {
            std::fs::remove_file(path).map_err(io)?;
        }
        let existed = path.exists();
        // Never through a link: kmsd may run as root on a directory another account can
        // write (a restore), and growing the file a link names would write 8 MiB of zeros
        // over it.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(NOFOLLOW | NONBLOCK)
            .open(path)
            .map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(io(std::io::Error::other("not a regular file")));
        }
        let len = meta.len();
        // A file of the full length may still have holes (copied with `cp --sparse`,
        // `rsync -S`, `tar -S`): its blocks are written again, all of them (what it held
        // was folded into the store before this opens it).
        let holes = std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < len.min(CAPACITY);
        let from = if holes { 0 } else { len };
        if from < CAPACITY {
            // Real zeros rather than a sparse or fallocated range: an overwrite of
            // written blocks is the cheap case for fdatasync, and a full disk finds the
            // blocks already taken.
            let zeros = vec![0u8; (CAPACITY - from) as usize];
            let allocated = file
                .write_all_at(&zeros, from)
                .and_then(|()| file.sync_all());
            if let Err(e) = allocated {
                // Give back what was taken: on a full disk the store needs it more.
                let _ = file.set_len(len);
                if !existed {
                    let _ = std::fs::remove_file(path);
                }
                return Err(io(e));
            }
            if let Some(dir) = path.parent() {
                File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            }
        }
        let direct_file = match allow_direct {
            true => open_direct(path),
            false => Err(std::io::ErrorKind::Unsupported.into()),
        };
        let (file, direct) = match direct_file {
            Ok(direct_file) => (direct_file, true),
            // tmpfs and some other file systems refuse O_DIRECT: keep the buffered file.
            Err(e) => {
                tracing::debug!(error = %e, path = %path.display(), "call journal without direct I/O");
                (file, false)
            }
        };
        Ok(Journal {
            file,
            direct,
            path: path.to_path_buf(),
            generation,
            index: 0,
            offset: 0,
            #[cfg(test)]
            fail_after_writing: false,
        })
    }

    /// Whether records bypass the page cache (see the module docs).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Bytes written since the last restart.
    pub fn used(&self) -> u64 {
        self.offset
    }

    /// Appends one record holding `ops`, at the next block boundary, and waits until it
    /// is durable. A record that does not fit is refused ([`JournalError::Full`]) before
    /// anything is written.
    pub fn append(&mut self, ops: &[CallOp]) -> Result<(), JournalError> {
        let payload = rmp_serde::to_vec(ops)?;
        let len = u32::try_from(payload.len()).map_err(|_| JournalError::Full(payload.len()))?;
        let total = HEADER_LEN + payload.len() + DIGEST_LEN;
        let start = self.offset.next_multiple_of(BLOCK as u64);
        if start + total as u64 > CAPACITY {
            return Err(JournalError::Full(total));
        }
        let mut record = Vec::with_capacity(total);
        record.extend_from_slice(&MAGIC);
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&self.generation);
        record.extend_from_slice(&self.index.to_le_bytes());
        record.extend_from_slice(&payload);
        let digest = Sha256::digest(&record);
        record.extend_from_slice(&digest);
        // The record, then zeros to the end of its last block.
        let mut blocks = vec![Block::ZERO; total.div_ceil(BLOCK)];
        for (block, chunk) in blocks.iter_mut().zip(record.chunks(BLOCK)) {
            block.0[..chunk.len()].copy_from_slice(chunk);
        }
        let written = self.write_blocks(&blocks, start);
        #[cfg(test)]
        let written = written.and_then(|()| match self.fail_after_writing {
            true => Err(std::io::Error::other(
                "injected: the record was written, then failed",
            )),
            false => Ok(()),
        });
        if let Err(source) = written {
            // A write that reported an error may still have reached the disk, whole: a
            // record whose calls were answered with the error, which the next open would
            // adopt as done. Zeros over its first block end the journal before it (see
            // `scan`); if they cannot be written either, the disk is failing and
            // the record stays, on the side of too much history rather than too little.
            if let Err(e) = self.write_blocks(&[Block::ZERO], start) {
                tracing::error!(error = %e, "cannot erase a failed call journal record");
            }
            return Err(JournalError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.offset = start + total as u64;
        self.index += 1;
        Ok(())
    }

    /// One durable write of whole `blocks` at `offset`: direct, or through the page cache
    /// and `fdatasync`.
    fn write_blocks(&self, blocks: &[Block], offset: u64) -> std::io::Result<()> {
        if self.direct {
            return self.write_direct(blocks, offset);
        }
        let bytes: Vec<u8> = blocks.iter().flat_map(|b| b.0).collect();
        self.file
            .write_all_at(&bytes, offset)
            .and_then(|()| self.file.sync_data())
    }

    /// One durable direct write of whole `blocks` at `offset` (repeated if the kernel
    /// writes fewer).
    fn write_direct(&self, blocks: &[Block], offset: u64) -> std::io::Result<()> {
        let mut done = 0;
        while done < blocks.len() {
            let slices: Vec<std::io::IoSlice<'_>> = blocks[done..]
                .iter()
                .map(|b| std::io::IoSlice::new(&b.0))
                .collect();
            let n = rustix::io::pwritev2(
                &self.file,
                &slices,
                offset + (done * BLOCK) as u64,
                rustix::io::ReadWriteFlags::DSYNC,
            )?;
            // A short direct write ends on a block boundary; anything else is an error.
            if n == 0 || !n.is_multiple_of(BLOCK) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!(
                        "direct write of {} blocks wrote {n} bytes",
                        blocks.len() - done
                    ),
                ));
            }
            done += n / BLOCK;
        }
        Ok(())
    }

    /// Starts over at the beginning under `generation` (after a fold has committed it).
    pub fn restart(&mut self, generation: Generation) {
        self.generation = generation;
        self.index = 0;
        self.offset = 0;
    }
}

/// The journal opened for direct, synchronous writes, after one such write has worked:
/// tmpfs refuses `O_DIRECT` at open, but a file system that needs a larger alignment, or
/// a kernel without `RWF_DSYNC`, would refuse only the write, and every record would then
/// fail. The probe writes zeros over the first block, which holds nothing live: the
/// journal is opened after the open's fold, under a generation no record carries yet.
fn open_direct(path: &Path) -> std::io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::RDWR | OFlags::DIRECT | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )?;
    let zero = Box::new(Block::ZERO);
    let n = rustix::io::pwritev2(
        &fd,
        &[std::io::IoSlice::new(&zero.0)],
        0,
        rustix::io::ReadWriteFlags::DSYNC,
    )?;
    if n != BLOCK {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("direct write of one block wrote {n} bytes"),
        ));
    }
    Ok(File::from(fd))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kms_shared::model::Action;

    fn call(tag: &str, seq: u64, client: &str) -> Vec<CallOp> {
        vec![
            CallOp::History {
                tag: tag.into(),
                seq,
                record: HistoryRecord {
                    time: 7,
                    action: Action::Encrypt,
                    version: Some(1),
                    result: "ok".into(),
                    account: "alice".into(),
                    uid: 1000,
                    pid: 42,
                    client: client.into(),
                    items: 1,
                    failed: 0,
                },
            },
            CallOp::Use {
                tag: tag.into(),
                at: 7,
                account: "alice".into(),
                n: 1,
            },
            CallOp::Encryptions {
                tag: tag.into(),
                version: 1,
                n: 1,
            },
        ]
    }

    /// A journal of the full length with holes (a data directory copied with `cp
    /// --sparse=always`) gets its blocks written: on a full disk an append would otherwise
    /// need a block the disk no longer has.
    #[test]
    fn a_sparse_journal_is_allocated_when_opened() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        File::create(&path).unwrap().set_len(CAPACITY).unwrap();
        if std::fs::metadata(&path).unwrap().blocks() * 512 >= CAPACITY {
            eprintln!("skipped: this file system has no holes");
            return;
        }
        let _journal = Journal::open(&path, new_generation().unwrap()).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), CAPACITY);
        assert!(meta.blocks() * 512 >= CAPACITY, "{} blocks", meta.blocks());
    }

    /// A FIFO in the journal's place is refused at once: reading it blocked the start in
    /// `open` until something wrote to it.
    #[test]
    fn a_fifo_in_the_journals_place_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        crate::test_support::make_fifo(&path);
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let recovered = recover(&p, &[1; 16]).map(|_| ()).map_err(|e| e.to_string());
            let opened = Journal::open(&p, [1; 16])
                .map(|_| ())
                .map_err(|e| e.to_string());
            let _ = tx.send((recovered, opened));
        });
        let (recovered, opened) = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("opening a FIFO as the journal blocked");
        assert!(recovered.unwrap_err().contains("not a regular file"));
        assert!(opened.unwrap_err().contains("not a regular file"));
        // Unblock a thread still stuck in open, if any (a failing run).
        drop(
            OpenOptions::new()
                .write(true)
                .custom_flags(NONBLOCK)
                .open(&path),
        );
    }

    /// A new journal under `g` in a temporary directory (kept alive by the first value).
    fn fresh(g: Generation) -> (tempfile::TempDir, PathBuf, Journal) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let journal = Journal::open(&path, g).unwrap();
        (dir, path, journal)
    }

    /// Records read back in order; a restart under a new generation makes every older
    /// record dead, even the ones not overwritten; the old generation still reads its own.
    /// A journal file with a second name (the replaced store's journal, linked aside by a
    /// restore that crashed before unlinking the old name) is left to that name: the
    /// store opening here gets a new file, and the other keeps its records.
    #[test]
    fn a_journal_linked_elsewhere_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.redb.journal");
        let aside = dir.path().join("kms.redb.before-restore-1.journal");
        let g = new_generation().unwrap();
        let mut j = Journal::open(&path, g).unwrap();
        j.append(&[CallOp::Encryptions {
            tag: "k".into(),
            version: 1,
            n: 1,
        }])
        .unwrap();
        drop(j);
        let before = std::fs::read(&path).unwrap();
        std::fs::hard_link(&path, &aside).unwrap();
        let _fresh = Journal::open(&path, new_generation().unwrap()).unwrap();
        assert_eq!(
            std::fs::read(&aside).unwrap(),
            before,
            "the other store's journal"
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&aside).unwrap().nlink(), 1);
        assert_eq!(std::fs::metadata(&path).unwrap().nlink(), 1);
    }

    #[test]
    fn records_of_the_current_generation_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.redb.journal");
        let (g1, g2) = ([1u8; 16], [2u8; 16]);
        let mut j = Journal::open(&path, g1).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CAPACITY);
        let (a, b, c) = (call("a", 1, "x"), call("b", 2, "y"), call("c", 3, "z"));
        j.append(&a).unwrap();
        j.append(&b).unwrap();
        assert_eq!(
            recover(&path, &g1).unwrap(),
            [a.clone(), b.clone()].concat()
        );
        j.restart(g2);
        assert!(recover(&path, &g2).unwrap().is_empty());
        j.append(&c).unwrap();
        assert_eq!(recover(&path, &g2).unwrap(), c);
        // The first g1 record was overwritten; the second is intact but out of order.
        assert!(recover(&path, &g1).unwrap().is_empty());
        assert!(recover(&dir.path().join("absent"), &g1).unwrap().is_empty());
    }

    /// The journal file with reads failing (`EIO`) at and after an offset: a bad sector.
    struct BadSectorsFrom(File, u64);

    impl std::os::unix::fs::FileExt for BadSectorsFrom {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            if offset >= self.1 {
                return Err(std::io::Error::from_raw_os_error(5));
            }
            let end = buf.len().min((self.1 - offset) as usize);
            self.0.read_at(&mut buf[..end], offset)
        }

        fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<usize> {
            unreachable!("recovery only reads")
        }
    }

    /// An unreadable sector after the live records (the dead rest of the file, most of it)
    /// does not keep the journal from being recovered: it is read only as far as its
    /// records go. Before, the whole file was read first and any error failed the open.
    /// A sector that cuts a live record off still fails it, as it must.
    #[test]
    fn an_unreadable_sector_past_the_records_is_not_read() {
        let g = [3u8; 16];
        let (_dir, path, mut j) = fresh(g);
        let (a, big) = (call("a", 1, "x"), call("b", 2, &"c".repeat(300 * 1024)));
        j.append(&a).unwrap();
        j.append(&big).unwrap();
        drop(j);
        let open = || File::open(&path).unwrap();
        let recovered = recover_from(&BadSectorsFrom(open(), 1 << 20), &path, &g).unwrap();
        assert_eq!(recovered, [a.clone(), big].concat());
        // The second record starts at 4 KiB and runs past 256 KiB: cut off there.
        let err = recover_from(&BadSectorsFrom(open(), 256 * 1024), &path, &g).unwrap_err();
        assert!(matches!(err, JournalError::Io { .. }), "{err}");
        // Nothing live: nothing beyond the first block is needed.
        let empty = recover_from(&BadSectorsFrom(open(), 4096), &path, &[9u8; 16]).unwrap();
        assert!(empty.is_empty());
    }

    /// A record whose write reported an error, though it reached the disk whole, is not
    /// adopted: its calls were answered with the error. Its first block is zeroed, so the
    /// journal ends before it, whether it took one block or several, written directly or
    /// through the page cache; the records before it stay.
    #[test]
    fn a_record_whose_write_failed_is_not_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let g = [6u8; 16];
        for (name, allow_direct) in [("direct", true), ("buffered", false)] {
            for failed in [call("f", 9, "small"), call("f", 9, &"c".repeat(3 * BLOCK))] {
                let path = dir.path().join(name);
                let _ = std::fs::remove_file(&path);
                let mut j = Journal::open_with(&path, g, allow_direct).unwrap();
                let kept = [call("a", 1, "x"), call("b", 2, "y")].concat();
                j.append(&kept[..3]).unwrap();
                j.append(&kept[3..]).unwrap();
                j.fail_after_writing = true;
                assert!(j.append(&failed).is_err());
                assert_eq!(recover(&path, &g).unwrap(), kept, "{name}");
            }
        }
    }

    /// A record torn anywhere (any byte changed, or cut short) ends the journal there:
    /// the records before it are kept, it and everything after are not.
    #[test]
    fn a_torn_record_ends_the_journal() {
        let g = [9u8; 16];
        let (_dir, path, mut j) = fresh(g);
        let first = call("a", 1, "first");
        j.append(&first).unwrap();
        // The second record starts on the next block boundary.
        let start = (j.used() as usize).next_multiple_of(BLOCK);
        j.append(&call("b", 2, "second")).unwrap();
        let end = j.used() as usize;
        j.append(&call("c", 3, "third")).unwrap();
        let good = std::fs::read(&path).unwrap();
        for at in start..end {
            let mut torn = good.clone();
            torn[at] ^= 0x40;
            std::fs::write(&path, &torn).unwrap();
            assert_eq!(recover(&path, &g).unwrap(), first, "byte {at} changed");
        }
        std::fs::write(&path, &good[..end - 1]).unwrap();
        assert_eq!(recover(&path, &g).unwrap(), first);
    }

    /// Direct and buffered journals write the same bytes: records that start and end
    /// inside a block, span several blocks, or end exactly on a block's end (the next
    /// record then starts a fresh block) read back in order, also after a restart, and
    /// nothing follows the last record but zeros.
    #[test]
    fn direct_and_buffered_writes_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let g = [5u8; 16];
        // Each is one record; sizes chosen so that records land across block boundaries.
        let groups: Vec<Vec<CallOp>> = (0..40u64)
            .map(|i| {
                (0..(1 + i * 7 % 23))
                    .flat_map(|k| call("k", i * 100 + k, &"c".repeat((i % 9) as usize)))
                    .collect()
            })
            .collect();
        let mut files = Vec::new();
        for allow_direct in [true, false] {
            let path = dir.path().join(format!("j-{allow_direct}"));
            let mut j = Journal::open_with(&path, g, allow_direct).unwrap();
            assert!(!j.is_direct() || allow_direct);
            // Fill past several blocks, restart, then write again over the old records.
            for group in &groups {
                j.append(group).unwrap();
            }
            assert_eq!(recover(&path, &g).unwrap(), groups.concat());
            j.restart([6u8; 16]);
            let mut written = 0;
            for group in &groups[..10] {
                j.append(group).unwrap();
                written = j.used() as usize;
                assert_eq!(
                    recover(&path, &[6u8; 16]).unwrap().len(),
                    groups[..10]
                        .iter()
                        .take_while(|g| !std::ptr::eq(*g, group))
                        .map(Vec::len)
                        .sum::<usize>()
                        + group.len()
                );
            }
            let bytes = std::fs::read(&path).unwrap();
            files.push((j.is_direct(), written, bytes));
        }
        let (direct, written, direct_bytes) = &files[0];
        let (_, _, buffered_bytes) = &files[1];
        // The second generation's records are the same bytes either way, each followed by
        // zeros to the end of its last block.
        assert_eq!(direct_bytes[..*written], buffered_bytes[..*written]);
        let block_end = written.div_ceil(BLOCK) * BLOCK;
        assert!(direct_bytes[*written..block_end].iter().all(|b| *b == 0));
        assert!(buffered_bytes[*written..block_end].iter().all(|b| *b == 0));
        if !*direct {
            eprintln!("the temporary directory refuses O_DIRECT: only the buffered path ran");
        }
    }

    /// A record that ends exactly on a block's end leaves no tail: the next record starts
    /// a fresh block and both read back.
    #[test]
    fn record_ending_on_a_block_boundary() {
        let g = [7u8; 16];
        let (_dir, path, mut j) = fresh(g);
        // Grow a record's client name until the record is exactly one block.
        let mut name = String::new();
        let first = loop {
            let ops = call("a", 1, &name);
            let len = rmp_serde::to_vec(&ops).unwrap().len() + HEADER_LEN + DIGEST_LEN;
            if len == BLOCK {
                break ops;
            }
            assert!(len < BLOCK);
            name.push('x');
        };
        j.append(&first).unwrap();
        assert_eq!(j.used() as usize, BLOCK);
        let second = call("b", 2, "after");
        j.append(&second).unwrap();
        assert_eq!(recover(&path, &g).unwrap(), [first, second].concat());
    }

    /// A write torn anywhere in the blocks it covers (power lost mid-write: any mix of old,
    /// new and garbage sectors) leaves every record before it whole: no write covers a
    /// block of an earlier record.
    #[test]
    fn a_torn_write_leaves_the_records_before_it_whole() {
        let g = [2u8; 16];
        let (_dir, path, mut j) = fresh(g);
        let before: Vec<CallOp> = (0..5).flat_map(|i| call("a", i, "acknowledged")).collect();
        for i in 0..5 {
            j.append(&call("a", i, "acknowledged")).unwrap();
        }
        let prior_end = j.used() as usize;
        let start = prior_end.next_multiple_of(BLOCK);
        // A record of two blocks and a bit: its write covers three.
        let torn: Vec<CallOp> = (0..120).flat_map(|i| call("b", i, "torn")).collect();
        j.append(&torn).unwrap();
        let (record_end, end) = (
            j.used() as usize,
            (j.used() as usize).next_multiple_of(BLOCK),
        );
        assert!(
            record_end - start > 2 * BLOCK && end - start == 3 * BLOCK,
            "{}",
            record_end - start
        );
        let good = std::fs::read(&path).unwrap();
        // Its write starts where the record does: on a fresh block.
        assert_eq!(good[start..start + 4], MAGIC);
        assert!(good[prior_end..start].iter().all(|b| *b == 0));
        let mut x = 0x2545_f491_4f6c_dd1du64;
        // Every sector that holds part of the record.
        for sector in 0..(record_end - start).div_ceil(512) {
            let mut torn = good.clone();
            // This sector and every one after it in the write: garbage.
            for b in &mut torn[start + sector * 512..end] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            std::fs::write(&path, &torn).unwrap();
            assert_eq!(recover(&path, &g).unwrap(), before, "sector {sector} on");
        }
    }

    /// A journal written before records were aligned (each record right after the last)
    /// still reads back whole, so calls journaled by an older kmsd that crashed are folded
    /// by the next one.
    #[test]
    fn a_journal_of_packed_records_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let g = [8u8; 16];
        let groups: Vec<Vec<CallOp>> = (0..60u64).map(|i| call("k", i, "packed")).collect();
        let mut bytes = Vec::new();
        for (index, ops) in groups.iter().enumerate() {
            let payload = rmp_serde::to_vec(ops).unwrap();
            let start = bytes.len();
            bytes.extend_from_slice(&MAGIC);
            bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&g);
            bytes.extend_from_slice(&(index as u64).to_le_bytes());
            bytes.extend_from_slice(&payload);
            let digest = Sha256::digest(&bytes[start..]);
            bytes.extend_from_slice(&digest);
        }
        assert!(bytes.len() > 2 * BLOCK, "records cross block boundaries");
        bytes.resize(CAPACITY as usize, 0);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(recover(&path, &g).unwrap(), groups.concat());
    }

    /// A record that does not fit is refused before anything is written.
    #[test]
    fn full_journal_refuses_without_writing() {
        let g = [3u8; 16];
        let (_dir, path, mut j) = fresh(g);
        let huge: Vec<CallOp> = (0..300_000).flat_map(|i| call("k", i, "big")).collect();
        assert!(matches!(j.append(&huge), Err(JournalError::Full(_))));
        assert_eq!(j.used(), 0);
        assert!(recover(&path, &g).unwrap().is_empty());
    }
}
