//! One PKCS#11 token: found by label in its module, logged in with its PIN, used through
//! a [`Pool`] of sessions, and reconnected when it comes back after going away.
//!
//! [`Token::run`] is the only way in. It runs an operation on a leased session and, when
//! the failure says the token or the session is gone (removed device, invalid session or
//! handle, library not initialised, an object that vanished), forgets the slot and the
//! idle sessions and tries once more: the slot is looked up again and, if the token is not
//! listed, the library is re-initialised (rate-limited), which is what SoftHSM2 needs to
//! see a token directory that came back. A second failure is returned as an `internal`
//! error naming the token.

use super::module::{Module, State};
use super::pool::Pool;
use super::{HsmError, rv_name, rv_of};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::RawAuthPin;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Sessions per token: enough to keep both cores busy, few enough for small tokens.
pub(crate) const SESSIONS: usize = 4;

/// Longest PIN file read (a PIN is a few dozen bytes at most).
const MAX_PIN_FILE: u64 = 1024;

/// Whether a token decrypts RSA-OAEP with SHA-256 itself (probed on first use).
pub(crate) const OAEP_UNKNOWN: u8 = 0;
pub(crate) const OAEP_NATIVE: u8 = 1;
pub(crate) const OAEP_RAW: u8 = 2;

/// The session a call runs on, and the library generation it belongs to (object handles
/// are valid within one generation).
pub struct Call<'a> {
    pub session: &'a Session,
    pub generation: u64,
}

/// Why one attempt of an operation failed.
pub enum OpError {
    /// The library refused a call: `op` names it for the message.
    Ck(&'static str, CkError),
    /// The object a version needs is not on the token (or the token silently went away).
    Missing { what: &'static str, version: String },
    /// A failure already decided (decrypt-failed, bad output).
    Hsm(HsmError),
}

impl From<HsmError> for OpError {
    fn from(e: HsmError) -> Self {
        OpError::Hsm(e)
    }
}

pub struct Token {
    /// How messages name it, e.g. `kms-a (the daemon's token)`.
    name: String,
    label: String,
    module: Arc<Module>,
    pin: Mutex<Pin>,
    pin_file: PathBuf,
    pin_rule: PinFile,
    /// The slot found for the label, and the library generation it was found in.
    slot: Mutex<Option<(u64, Slot)>>,
    pool: Pool,
    pub(crate) oaep: AtomicU8,
    /// When this token, not listed, may next have its library re-initialised.
    absent: Mutex<AbsentBackoff>,
}

/// The longest wait between re-initialisations for a token that stays away.
const ABSENT_MAX_WAIT: Duration = Duration::from_secs(60);

/// How often a token that is not listed may have its library re-initialised: at once the
/// first time, then after 1 s, 2 s, 4 s, … up to [`ABSENT_MAX_WAIT`]. A re-initialisation
/// finalises the whole library, so every other token of it (the daemon's own among them)
/// loses its sessions and logs in again; a dedicated token unplugged for good must not
/// make that happen every second. Seeing the token again starts over.
#[derive(Debug, Default)]
struct AbsentBackoff {
    /// Re-initialisations that did not bring the token back, in a row.
    misses: u32,
    not_before: Option<Instant>,
}

impl AbsentBackoff {
    fn allows(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|t| now >= t)
    }

    /// A re-initialisation at `now` did not bring the token back.
    fn missed(&mut self, now: Instant) {
        let wait = Duration::from_secs(1)
            .saturating_mul(1 << self.misses.min(16))
            .min(ABSENT_MAX_WAIT);
        self.misses = self.misses.saturating_add(1);
        self.not_before = Some(now + wait);
    }

    fn found(&mut self) {
        *self = AbsentBackoff::default();
    }
}

/// The PIN presented at login, and whether the token refused it.
///
/// A refused PIN is never presented again to the token that refused it. Tokens that
/// count failed logins lock the user PIN after a few (three on many smart cards), and
/// without this every new session, every reconnection and every call that needs one
/// would present it once more. The PIN file is read again when a login is needed: only a
/// different PIN is tried — or the same one to another token with the label (another
/// serial number: the real token back where an impostor, or a re-initialised one, had
/// refused it), for which it is a first try.
struct Pin {
    /// Zeroized on drop; each login gets its own `RawAuthPin` copy (zeroized as well).
    current: Zeroizing<Vec<u8>>,
    /// The token's answer to `current` (`CKR_PIN_INCORRECT`, …) once it refused it, and
    /// that token's serial number ("" if it could not be read).
    refused: Option<(String, String)>,
}

impl Token {
    /// Reads the PIN and loads the module; does not talk to the token yet.
    /// `pin_rule` says how the PIN file is read ([`PinFile`]).
    pub fn open(
        name: String,
        module: &Path,
        label: &str,
        pin_file: &Path,
        pin_rule: PinFile,
    ) -> Result<Token, HsmError> {
        let pin = read_pin(pin_file, pin_rule)?;
        let module = Module::get(module)?;
        Ok(Token {
            name,
            label: label.to_string(),
            module,
            pin: Mutex::new(Pin {
                current: pin,
                refused: None,
            }),
            pin_file: pin_file.to_path_buf(),
            pin_rule,
            slot: Mutex::new(None),
            pool: Pool::new(SESSIONS),
            oaep: AtomicU8::new(OAEP_UNKNOWN),
            absent: Mutex::new(AbsentBackoff::default()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Finds the token and logs in (one session), so configuration errors show at once.
    pub fn check(&self) -> Result<(), HsmError> {
        self.run(|_| Ok(()))
    }

    /// Whether the token is listed right now (not from the cache). A token that went
    /// away may still answer searches with nothing, so destructive calls ask this first.
    pub fn ensure_present(&self) -> Result<(), HsmError> {
        let mut attempt = 0;
        loop {
            let st = self.module.read();
            match self.find_slot(&st) {
                Ok(slot) => {
                    *self.lock_slot() = Some((st.generation, slot));
                    self.token_found();
                    return Ok(());
                }
                Err(e) => {
                    let generation = st.generation;
                    drop(st);
                    attempt += 1;
                    if attempt > 1 || !self.reinit_for_absence(generation) {
                        return Err(e);
                    }
                    self.forget();
                }
            }
        }
    }

    /// Runs `op` on a logged-in session, retrying once after reconnecting when the
    /// failure says the token or session went away.
    pub fn run<T>(
        &self,
        mut op: impl FnMut(&Call<'_>) -> Result<T, OpError>,
    ) -> Result<T, HsmError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = attempt >= 2;
            let st = self.module.read();
            let generation = st.generation;
            let slot = match self.slot(&st) {
                Ok(s) => s,
                Err(e) => {
                    drop(st);
                    if !last && self.reinit_for_absence(generation) {
                        self.forget();
                        continue;
                    }
                    return Err(e);
                }
            };
            let lease = match self.pool.lease(
                &st.ctx,
                slot,
                generation,
                |s| self.login(s, || serial_of(&st, slot)),
                || HsmError::Busy {
                    token: self.name.clone(),
                },
                |e| self.ck_error("C_OpenSession", &e),
            ) {
                Ok(l) => l,
                Err(e @ HsmError::Pkcs11 { .. }) if !last => {
                    tracing::debug!(token = %self.name, error = %e, "reconnecting");
                    drop(st);
                    self.forget();
                    continue;
                }
                Err(e) => return Err(e),
            };
            let Some(session) = lease.session() else {
                return Err(HsmError::Busy {
                    token: self.name.clone(),
                });
            };
            match op(&Call {
                session,
                generation,
            }) {
                Ok(v) => return Ok(v),
                Err(OpError::Ck(what, e)) if is_gone(&e) => {
                    let err = self.ck_error(what, &e);
                    lease.discard();
                    drop(st);
                    self.forget();
                    if last {
                        return Err(err);
                    }
                    tracing::debug!(token = %self.name, error = %err, "reconnecting");
                }
                Err(OpError::Missing { what, version }) => {
                    // The session is sound (the token answered it): back to the pool, and
                    // the idle ones closed before they are let go of — dropped unclosed,
                    // each miss leaked sessions in the module, without bound.
                    // Closed under the library's read lock, as every call into it: let go
                    // first, a re-initialisation could come in between, and these handle
                    // numbers would then name the new generation's sessions.
                    drop(lease);
                    self.pool.close_idle(generation);
                    drop(st);
                    *self.lock_slot() = None;
                    if last {
                        return Err(HsmError::ObjectMissing {
                            token: self.name.clone(),
                            what,
                            version,
                        });
                    }
                }
                Err(OpError::Ck(what, e)) => return Err(self.ck_error(what, &e)),
                Err(OpError::Hsm(e)) => return Err(e),
            }
        }
    }

    /// The error for a refused library call.
    pub fn ck_error(&self, op: &'static str, e: &CkError) -> HsmError {
        HsmError::Pkcs11 {
            token: self.name.clone(),
            op,
            rv: rv_name(e),
        }
    }

    fn lock_slot(&self) -> std::sync::MutexGuard<'_, Option<(u64, Slot)>> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-initialises the library because this token is not listed, if its backoff
    /// allows ([`AbsentBackoff`]); whether the generation moved on. The retry that follows
    /// finds the token or not, which [`Token::slot`] and [`Token::ensure_present`] record.
    fn reinit_for_absence(&self, seen: u64) -> bool {
        let now = Instant::now();
        let mut backoff = self.absent.lock().unwrap_or_else(|e| e.into_inner());
        if !backoff.allows(now) {
            return false;
        }
        // Counted as a miss until the token is seen again (`found`).
        backoff.missed(now);
        drop(backoff);
        self.module.reinit(seen)
    }

    fn token_found(&self) {
        self.absent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .found();
    }

    /// Forgets the slot and the idle sessions: the next call looks the token up again.
    fn forget(&self) {
        *self.lock_slot() = None;
        self.pool.clear();
    }

    /// The slot holding the token (cached for the library generation).
    fn slot(&self, st: &State) -> Result<Slot, HsmError> {
        if let Some((g, s)) = *self.lock_slot()
            && g == st.generation
        {
            return Ok(s);
        }
        let slot = self.find_slot(st)?;
        *self.lock_slot() = Some((st.generation, slot));
        self.token_found();
        Ok(slot)
    }

    fn find_slot(&self, st: &State) -> Result<Slot, HsmError> {
        let absent = || HsmError::TokenAbsent {
            token: self.name.clone(),
            module: self.module.path().to_path_buf(),
        };
        let slots = st.ctx.get_slots_with_token().map_err(|_| absent())?;
        slots
            .into_iter()
            .find(|s| {
                st.ctx
                    .get_token_info(*s)
                    .is_ok_and(|info| info.label() == self.label)
            })
            .ok_or_else(absent)
    }

    /// Logs a new session in. Login state is per token, so a session opened while another
    /// is logged in is already logged in: that answer is success too. A PIN the token
    /// refused is not presented again (see [`Pin`]).
    fn login(
        &self,
        s: &Session,
        serial: impl Fn() -> Result<String, CkError>,
    ) -> Result<(), HsmError> {
        let mut pin = self.pin.lock().unwrap_or_else(|e| e.into_inner());
        let refused_by = pin.refused.as_ref().map(|(_, by)| by.clone());
        // Which token this session is on: one whose serial cannot be read now has gone
        // from its slot (the library still lists it until it is re-initialised), and the
        // call reconnects; one that could not be read then counts as the same token.
        let another_token = match refused_by {
            Some(by) => {
                let now = serial().map_err(|e| self.ck_error("C_GetTokenInfo", &e))?;
                !by.is_empty() && now != by
            }
            None => false,
        };
        if another_token {
            tracing::info!(
                token = %self.name,
                "another token (another serial number) has the label of the one that refused \
                 the PIN; presenting it"
            );
            pin.refused = None;
        }
        if let Some((rv, _)) = &pin.refused {
            let refused = || self.login_refused(rv.clone());
            // A failure to read the file is the same answer: the refused PIN stays. Read
            // without waiting: this runs on a token thread, under the PIN's lock, and a
            // pipe given at start (`<(pass show …)`) has no writer any more.
            let fresh = read_pin(&self.pin_file, self.pin_rule.again()).map_err(|_| refused())?;
            if bool::from(fresh.as_slice().ct_eq(pin.current.as_slice())) {
                return Err(refused());
            }
            tracing::info!(token = %self.name, "the PIN file holds another PIN; presenting it");
            pin.current = fresh;
            pin.refused = None;
        }
        let raw = RawAuthPin::new(Box::new(pin.current.to_vec()));
        match s.login_with_raw(UserType::User, &raw) {
            Ok(()) => Ok(()),
            Err(e) => match rv_of(&e) {
                Some(RvError::UserAlreadyLoggedIn) => Ok(()),
                Some(
                    RvError::PinIncorrect
                    | RvError::PinInvalid
                    | RvError::PinLenRange
                    | RvError::PinLocked
                    | RvError::PinExpired,
                ) => {
                    let rv = rv_name(&e);
                    tracing::warn!(
                        token = %self.name,
                        rv = %rv,
                        pin_file = %self.pin_file.display(),
                        "the token refused the PIN; it is not presented again until the PIN file holds another"
                    );
                    pin.refused = Some((rv.clone(), serial().unwrap_or_default()));
                    Err(self.login_refused(rv))
                }
                _ => Err(self.ck_error("C_Login", &e)),
            },
        }
    }

    fn login_refused(&self, rv: String) -> HsmError {
        HsmError::Login {
            token: self.name.clone(),
            rv,
            pin_file: self.pin_file.clone(),
        }
    }
}

impl Drop for Token {
    /// A token let go of (a removed registration) closes its sessions, which also logs
    /// kmsd out of it once the last one is closed.
    fn drop(&mut self) {
        let st = self.module.read();
        self.pool.close_idle(st.generation);
    }
}

/// The serial number of the token in `slot`.
fn serial_of(st: &State, slot: Slot) -> Result<String, CkError> {
    st.ctx
        .get_token_info(slot)
        .map(|info| info.serial_number().to_string())
}

/// Failures after which the session, the slot or the library state cannot be trusted.
fn is_gone(e: &CkError) -> bool {
    matches!(
        rv_of(e),
        Some(
            RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::SlotIdInvalid
                | RvError::CryptokiNotInitialized
                | RvError::UserNotLoggedIn
                | RvError::ObjectHandleInvalid
                | RvError::KeyHandleInvalid
        )
    )
}

/// Whose PIN file it is, which decides how it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinFile {
    /// The daemon's own token, named by its administrator at start: any file kmsd can
    /// read, a pipe included.
    Daemon,
    /// A dedicated token registered over the socket: a regular file, opened without
    /// blocking (a FIFO would hold the registration until someone wrote to it), and
    /// with `owner` one that account owns.
    Registered { owner: Option<u32> },
    /// The daemon's own PIN file read again, after the token refused the PIN it held:
    /// opened without blocking, so that a pipe with no writer (process substitution at
    /// start) answers at once, as a failure, instead of holding the token's threads.
    DaemonAgain,
}

impl PinFile {
    /// How the file is read again once the token has refused its PIN.
    fn again(self) -> PinFile {
        match self {
            PinFile::Daemon => PinFile::DaemonAgain,
            other => other,
        }
    }
}

/// Reads a PIN file: the first line, without its line ending. The buffer is allocated
/// once at full size (so no copy is left behind by a reallocation) and zeroized on drop,
/// and so is the PIN, in a vector of exactly its length.
///
/// For a registered token the file opened (symlinks followed) must be a regular file
/// (with an owner, one that uid owns), checked on the open file itself so that nothing
/// can be swapped in between; with an owner every failure gives the same message, so
/// that a manager cannot probe which files exist through kmsd.
fn read_pin(path: &Path, rule: PinFile) -> Result<Zeroizing<Vec<u8>>, HsmError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let fail = |message: String| HsmError::PinFile {
        path: PathBuf::from(path),
        message,
    };
    let open_nonblocking = || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)
    };
    let file = match rule {
        PinFile::Daemon => std::fs::File::open(path).map_err(|e| fail(e.kind().to_string()))?,
        PinFile::DaemonAgain => open_nonblocking().map_err(|e| fail(e.kind().to_string()))?,
        PinFile::Registered { owner: None } => {
            let file = open_nonblocking().map_err(|e| fail(e.kind().to_string()))?;
            if !file.metadata().is_ok_and(|m| m.is_file()) {
                return Err(fail("not a regular file".into()));
            }
            file
        }
        PinFile::Registered { owner: Some(uid) } => open_nonblocking()
            .ok()
            .filter(|f| f.metadata().is_ok_and(|m| m.is_file() && m.uid() == uid))
            .ok_or_else(|| {
                fail(format!(
                    "not a regular file owned by uid {uid}, the account that registered \
                     the token (kmsd reads it with its own rights)"
                ))
            })?,
    };
    // Read all the same (refusing would stop tokens that work), but said: a PIN any
    // account may read is anyone's to present.
    if let Ok(m) = file.metadata()
        && m.mode() & 0o077 != 0
    {
        tracing::warn!(
            pin_file = %path.display(),
            mode = format_args!("{:o}", m.mode() & 0o7777),
            "the PIN file is open to other accounts; make it readable by its owner only \
             (chmod 600)"
        );
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_PIN_FILE as usize + 1));
    file.take(MAX_PIN_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| fail(e.kind().to_string()))?;
    if buf.len() as u64 > MAX_PIN_FILE {
        return Err(fail(format!("longer than {MAX_PIN_FILE} bytes")));
    }
    let end = buf
        .iter()
        .position(|&b| b == b'\n' || b == b'\r')
        .unwrap_or(buf.len());
    if end == 0 {
        return Err(fail("the PIN is empty".into()));
    }
    let mut pin = Zeroizing::new(Vec::with_capacity(end));
    pin.extend_from_slice(&buf[..end]);
    Ok(pin)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A token that stays away has its library re-initialised at once, then after 1 s,
    /// 2 s, 4 s, … up to a minute; seeing it again starts over.
    #[test]
    fn an_absent_token_backs_off() {
        let t0 = Instant::now();
        let mut b = AbsentBackoff::default();
        assert!(b.allows(t0));
        b.missed(t0);
        assert!(!b.allows(t0 + Duration::from_millis(999)));
        assert!(b.allows(t0 + Duration::from_secs(1)));
        let t1 = t0 + Duration::from_secs(1);
        b.missed(t1);
        assert!(!b.allows(t1 + Duration::from_millis(1_999)));
        assert!(b.allows(t1 + Duration::from_secs(2)));
        for _ in 0..40 {
            b.missed(t1);
        }
        assert!(!b.allows(t1 + ABSENT_MAX_WAIT - Duration::from_millis(1)));
        assert!(b.allows(t1 + ABSENT_MAX_WAIT));
        b.found();
        assert!(b.allows(t1));
    }

    /// The first read of the daemon's own PIN file may wait for its writer (a pipe at
    /// start); reading it again, after the token refused the PIN, never does: it ran on
    /// a token thread under the PIN's lock, and waited for ever on a pipe with no writer.
    #[test]
    fn a_pipe_without_a_writer_is_not_waited_for_when_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pin");
        crate::test_support::make_fifo(&fifo);
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read_pin(&path, PinFile::Daemon.again()).is_err());
        });
        // A generous bound: the read either answers at once or waits for ever.
        let failed = rx.recv_timeout(Duration::from_secs(30));
        if failed.is_err() {
            // Unblocks the waiting open before the test fails.
            drop(std::fs::OpenOptions::new().write(true).open(&fifo));
        }
        assert_eq!(failed, Ok(true), "reading the PIN again waited on the pipe");
    }

    /// A PIN file's first line is the PIN; empty and oversized files are refused, and the
    /// message names the file but not its content.
    #[test]
    fn pin_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        std::fs::write(&p, "s3cret\n").unwrap();
        assert_eq!(*read_pin(&p, PinFile::Daemon).unwrap(), b"s3cret");
        std::fs::write(&p, "s3cret").unwrap();
        assert_eq!(*read_pin(&p, PinFile::Daemon).unwrap(), b"s3cret");
        std::fs::write(&p, "\n").unwrap();
        let e = read_pin(&p, PinFile::Daemon).err().unwrap().to_string();
        assert!(e.contains("empty") && e.contains("pin"), "{e}");
        std::fs::write(&p, vec![b'1'; 2000]).unwrap();
        let e = read_pin(&p, PinFile::Daemon).err().unwrap().to_string();
        assert!(!e.contains("1111"), "{e}");
        let e = read_pin(&dir.path().join("none"), PinFile::Daemon)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot read the PIN file"), "{e}");
    }

    /// A PIN file read for a manager who is not root or kmsd's account must be a regular
    /// file that manager owns; a file of another owner, a missing file, a directory and
    /// a symlink to another's file all get the same refusal.
    #[test]
    fn pin_file_owner_rule() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        std::fs::write(&p, "s3cret\n").unwrap();
        let mine = std::fs::metadata(&p).unwrap().uid();
        assert_eq!(
            *read_pin(&p, PinFile::Registered { owner: Some(mine) }).unwrap(),
            b"s3cret"
        );
        let other = mine.wrapping_add(4242);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let refusals: Vec<String> = [
            (p.clone(), other),
            (dir.path().join("none"), other),
            (dir.path().to_path_buf(), mine),
            (link, other),
        ]
        .into_iter()
        .map(|(path, uid)| {
            let e = read_pin(&path, PinFile::Registered { owner: Some(uid) })
                .err()
                .unwrap()
                .to_string();
            e.replace(&path.display().to_string(), "PATH")
                .replace(&format!("uid {uid}"), "uid N")
        })
        .collect();
        assert!(
            refusals[0].contains("not a regular file owned by uid"),
            "{}",
            refusals[0]
        );
        assert!(refusals.iter().all(|r| *r == refusals[0]), "{refusals:?}");
    }
}
