//! backup: an online, consistent snapshot of the daemon's store written to a file
//! (SPEC §9; managers only). Key material in it stays wrapped under the root key, so the
//! file is useless without that key; `kmsd restore FILE` brings it back.
//!
//! The daemon streams the snapshot in chunks; kmsctl writes them to a new temporary file
//! beside FILE (`.FILE.XXXXXX.tmp`, 0600, a name no other file has), fsyncs it and only
//! then renames it to FILE, so FILE is either absent or complete. `--force` replaces
//! only a regular file: a device, a FIFO, a directory or a symbolic link is refused, not
//! swapped for the backup. `-` writes it to standard output (for a pipe: `kmsctl backup -
//! | gpg -e …`), never to a terminal.

use super::{CmdResult, CtlError, Ctx};
use kms_shared::protocol::{ErrorKind, Request, Response, WireError};
use serde_json::json;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// Where to write the backup; `-` for standard output (not a terminal)
    pub file: PathBuf,
    /// Replace FILE if it is an existing regular file
    #[arg(long)]
    pub force: bool,
}

/// Why an existing FILE is not one `--force` replaces, if it is not.
fn not_replaceable(file: &Path) -> Option<String> {
    let kind = std::fs::symlink_metadata(file).ok()?.file_type();
    use std::os::unix::fs::FileTypeExt as _;
    let what = if kind.is_file() {
        return None;
    } else if kind.is_symlink() {
        "a symbolic link (name the file it points to)"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (to write into a pipe, use - for standard output)"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    };
    Some(format!(
        "{} is {what}; --force replaces only a regular file, and nothing was written",
        file.display()
    ))
}

fn io(path: &Path, e: std::io::Error) -> CtlError {
    CtlError::Io(format!("{}: {e}", path.display()))
}

fn protocol(message: String) -> CtlError {
    CtlError::Wire(WireError::new(ErrorKind::Internal, message))
}

pub async fn backup(ctx: &mut Ctx, a: BackupArgs) -> CmdResult {
    if a.file.as_os_str() == "-" {
        return to_stdout(ctx).await;
    }
    if !a.force && std::fs::symlink_metadata(&a.file).is_ok() {
        return Err(CtlError::Wire(WireError::new(
            ErrorKind::AlreadyExists,
            format!("{} exists; use --force to replace it", a.file.display()),
        )));
    }
    if let Some(why) = not_replaceable(&a.file) {
        return Err(CtlError::Wire(WireError::new(
            ErrorKind::InvalidArgument,
            why,
        )));
    }
    let dir = match a.file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = a.file.file_name().unwrap_or_default().to_string_lossy();
    // Created exclusively under a random name (0600): never someone else's file, nor a
    // link planted in a shared directory; removed when dropped unless it was put in place.
    // Made before kmsd is asked: a directory that cannot take it is found before the
    // daemon copies its store into a snapshot that would wait out its expiry unread.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| io(dir, e))?;
    let tmp_path = tmp.path().to_path_buf();
    // Ctrl-C or SIGTERM ends the copy here, so that the temporary file is removed (a
    // process killed by the signal would leave one the size of the store each time).
    let bytes = tokio::select! {
        fetched = fetch(ctx, tmp.as_file_mut(), &tmp_path) => fetched?,
        signal = interrupted() => {
            signal?;
            return Err(CtlError::Interrupted(
                "the backup was interrupted; its partial copy is removed".into(),
            ));
        }
    };
    tmp.as_file().sync_all().map_err(|e| io(&tmp_path, e))?;
    let tmp = tmp.into_temp_path();
    let placed = if a.force {
        // Checked again: what came in FILE's place during the copy is not replaced either.
        match not_replaceable(&a.file) {
            Some(why) => {
                return Err(CtlError::Wire(WireError::new(
                    ErrorKind::InvalidArgument,
                    why,
                )));
            }
            None => std::fs::rename(&tmp, &a.file),
        }
    } else {
        place_new(&tmp, &a.file)
    };
    if let Err(e) = placed {
        return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
            CtlError::Wire(WireError::new(
                ErrorKind::AlreadyExists,
                format!("{} exists; use --force to replace it", a.file.display()),
            ))
        } else {
            io(&a.file, e)
        });
    }
    // In place: its temporary name is no longer the backup's to remove.
    let _ = tmp.keep();
    // The rename itself must survive a crash too.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))?;
    let file = a.file.display().to_string();
    ctx.out.emit(
        || json!({"file": file, "bytes": bytes}),
        || format!("backup written to {file} ({bytes} bytes)\n"),
    )?;
    Ok(0)
}

/// Puts `tmp` in place as `file`, which must not exist when it is made, not only when
/// the backup began: renamed with `RENAME_NOREPLACE` (fails if `file` exists); where the
/// filesystem does not take that flag (some FUSE filesystems), linked into place and
/// unlinked; where it has no links either, renamed after checking that `file` is absent,
/// the best such a filesystem allows. FAT and exFAT, the usual USB sticks, have no hard
/// links, so linking alone failed there with "Operation not permitted".
fn place_new(tmp: &Path, file: &Path) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    use rustix::io::Errno;
    match renameat_with(CWD, tmp, CWD, file, RenameFlags::NOREPLACE) {
        Err(e) if [Errno::INVAL, Errno::NOSYS, Errno::NOTSUP].contains(&e) => {}
        done => return done.map_err(std::io::Error::from),
    }
    match std::fs::hard_link(tmp, file) {
        Ok(()) => return std::fs::remove_file(tmp),
        Err(e)
            if [Errno::PERM, Errno::NOTSUP, Errno::MLINK]
                .iter()
                .any(|n| e.raw_os_error() == Some(n.raw_os_error())) => {}
        Err(e) => return Err(e),
    }
    if std::fs::symlink_metadata(file).is_ok() {
        return Err(std::io::ErrorKind::AlreadyExists.into());
    }
    std::fs::rename(tmp, file)
}

/// `backup -`: the snapshot streamed to standard output, what was written said on
/// standard error (standard output is the backup's).
async fn to_stdout(ctx: &mut Ctx) -> CmdResult {
    use std::io::IsTerminal as _;
    let stdout = std::io::stdout();
    if stdout.is_terminal() {
        return Err(CtlError::Wire(WireError::new(
            ErrorKind::InvalidArgument,
            "standard output is a terminal; send the backup to a file or a pipe \
             (kmsctl backup - > FILE)",
        )));
    }
    let stdout_path = Path::new("standard output");
    // Written by a thread of its own: a pipe whose reader stalls blocks that thread, not
    // this one, which goes on waiting for Ctrl-C or SIGTERM (it used to sit in the write,
    // deaf to both, until the reader went away).
    let mut out = StdoutThread::start();
    let copied = async {
        let bytes = fetch(ctx, &mut out, stdout_path).await?;
        out.finish().await.map_err(|e| io(stdout_path, e))?;
        Ok::<_, CtlError>(bytes)
    };
    let bytes = tokio::select! {
        copied = copied => copied?,
        signal = interrupted() => {
            signal?;
            return Err(CtlError::Interrupted(
                "the backup was interrupted; what was written to standard output is \
                 incomplete"
                    .into(),
            ));
        }
    };
    if ctx.out.json {
        eprintln!("{}", json!({"file": "-", "bytes": bytes}));
    } else {
        eprintln!("backup written to standard output ({bytes} bytes)");
    }
    Ok(0)
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM.
async fn interrupted() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

/// Where the chunks of a backup go.
trait ChunkSink {
    async fn put(&mut self, data: Vec<u8>) -> std::io::Result<()>;
}

/// A file, written in place (a local disk does not stall as a pipe can).
impl ChunkSink for File {
    async fn put(&mut self, data: Vec<u8>) -> std::io::Result<()> {
        self.write_all(&data)
    }
}

/// Standard output, written by a thread of its own.
struct StdoutThread {
    chunks: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    /// What the thread's writes came to, once it ends (all written and flushed, or the
    /// first error).
    ended: Option<tokio::sync::oneshot::Receiver<std::io::Result<()>>>,
}

impl StdoutThread {
    fn start() -> StdoutThread {
        // Two chunks queued at most: the backup is not read faster than it is written.
        let (chunks, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
        let (tell, ended) = tokio::sync::oneshot::channel();
        // Not joined: on an interruption the process ends with this thread perhaps
        // still in a write.
        std::thread::spawn(move || {
            let mut out = std::io::stdout().lock();
            let written = (|| {
                while let Some(chunk) = rx.blocking_recv() {
                    out.write_all(&chunk)?;
                }
                out.flush()
            })();
            let _ = tell.send(written);
        });
        StdoutThread {
            chunks: Some(chunks),
            ended: Some(ended),
        }
    }

    /// Waits until everything queued is written; the thread's error if a write failed.
    async fn finish(&mut self) -> std::io::Result<()> {
        self.chunks = None;
        match self.ended.take() {
            Some(ended) => ended
                .await
                .unwrap_or_else(|_| Err(std::io::Error::other("the writing thread died"))),
            None => Ok(()),
        }
    }
}

impl ChunkSink for StdoutThread {
    async fn put(&mut self, data: Vec<u8>) -> std::io::Result<()> {
        let sent = match &self.chunks {
            Some(chunks) => chunks.send(data).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The thread stopped taking chunks: its write failed (a reader gone).
        self.finish().await?;
        Err(std::io::Error::other("standard output was closed"))
    }
}

/// Streams the daemon's snapshot into `out` (at `tmp`); returns its size once it is
/// complete.
async fn fetch(ctx: &mut Ctx, out: &mut impl ChunkSink, tmp: &Path) -> Result<u64, CtlError> {
    let mut written: u64 = 0;
    let mut reply = ctx.client.call(Request::Backup).await?;
    loop {
        let Response::BackupChunk {
            snapshot,
            offset,
            data,
            total,
            done,
        } = reply
        else {
            // Not printed: a wrong reply could in principle carry secrets.
            return Err(protocol("unexpected reply to a backup request".into()));
        };
        if offset != written {
            return Err(protocol(format!(
                "backup chunk at offset {offset}, expected {written}"
            )));
        }
        let len = data.len() as u64;
        out.put(data).await.map_err(|e| io(tmp, e))?;
        written += len;
        if done {
            if written != total {
                return Err(protocol(format!(
                    "backup ended after {written} of {total} bytes"
                )));
            }
            break;
        }
        if len == 0 {
            return Err(protocol("empty backup chunk before the end".into()));
        }
        reply = ctx
            .client
            .call(Request::BackupRead {
                snapshot,
                offset: written,
            })
            .await?;
    }
    Ok(written)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A backup is put in place only where nothing is: an existing file is left as it
    /// was, and so is the finished copy (for the caller to remove).
    #[test]
    fn place_new_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, file) = (dir.path().join("b.tmp"), dir.path().join("b"));
        std::fs::write(&tmp, b"new").unwrap();
        place_new(&tmp, &file).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        assert!(!tmp.exists());
        std::fs::write(&tmp, b"newer").unwrap();
        let e = place_new(&tmp, &file).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        assert_eq!(std::fs::read(&tmp).unwrap(), b"newer");
    }
}
