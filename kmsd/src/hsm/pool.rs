//! A small pool of logged-in R/W sessions of one token.
//!
//! A PKCS#11 session is not thread-safe: one caller at a time. A [`Lease`] is that one
//! caller's exclusive use of a session; dropping it returns the session to the pool. At
//! most `max` sessions exist; a caller who finds none free waits (bounded) for one.
//!
//! Sessions are opened without close-on-drop: a session of an older library generation
//! (see `module.rs`) or one that failed is simply forgotten, never closed, because its
//! handle number may by then belong to another session.

use super::HsmError;
use cryptoki::context::Pkcs11;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a caller waits for a free session before giving up.
const LEASE_TIMEOUT: Duration = Duration::from_secs(30);

struct Pooled {
    session: Session,
    generation: u64,
}

struct Inner {
    idle: Vec<Pooled>,
    /// Sessions in existence: idle plus leased (plus those being opened).
    open: usize,
}

pub struct Pool {
    inner: Mutex<Inner>,
    freed: Condvar,
    max: usize,
}

/// Exclusive use of one session until dropped.
pub struct Lease<'a> {
    pool: &'a Pool,
    session: Option<Pooled>,
}

impl Lease<'_> {
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref().map(|p| &p.session)
    }

    /// The session failed in a way that suggests it is dead: forget it.
    pub fn discard(mut self) {
        if self.session.take().is_some() {
            self.pool.forget_one();
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.session.take() {
            let mut inner = self.pool.lock();
            inner.idle.push(p);
            drop(inner);
            self.pool.freed.notify_one();
        }
    }
}

impl Pool {
    pub fn new(max: usize) -> Pool {
        Pool {
            inner: Mutex::new(Inner {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
            max: max.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget_one(&self) {
        let mut inner = self.lock();
        inner.open = inner.open.saturating_sub(1);
        drop(inner);
        self.freed.notify_one();
    }

    /// Forgets every idle session (after the token went away; leased ones are forgotten
    /// as their callers fail).
    pub fn clear(&self) {
        let mut inner = self.lock();
        let n = inner.idle.len();
        inner.idle.clear();
        inner.open = inner.open.saturating_sub(n);
        drop(inner);
        self.freed.notify_all();
    }

    /// Closes the idle sessions of library generation `generation` (the live ones) when the
    /// token is let go of; older ones are dead handles and are only forgotten.
    pub fn close_idle(&self, generation: u64) {
        let mut inner = self.lock();
        let idle = std::mem::take(&mut inner.idle);
        inner.open = inner.open.saturating_sub(idle.len());
        drop(inner);
        for p in idle {
            if p.generation == generation {
                let _ = p.session.close();
            }
        }
    }

    /// A session of library generation `generation` on `slot`: an idle one, or a new one
    /// opened and passed to `login`, or the next one freed.
    pub fn lease(
        &self,
        ctx: &Pkcs11,
        slot: Slot,
        generation: u64,
        login: impl Fn(&Session) -> Result<(), HsmError>,
        busy: impl Fn() -> HsmError,
        open_failed: impl Fn(cryptoki::error::Error) -> HsmError,
    ) -> Result<Lease<'_>, HsmError> {
        let deadline = Instant::now() + LEASE_TIMEOUT;
        let mut inner = self.lock();
        loop {
            while let Some(p) = inner.idle.pop() {
                if p.generation == generation {
                    return Ok(Lease {
                        pool: self,
                        session: Some(p),
                    });
                }
                // A dead handle of an older generation.
                inner.open = inner.open.saturating_sub(1);
            }
            if inner.open < self.max {
                inner.open += 1;
                drop(inner);
                let opened = ctx
                    .open_rw_session_no_drop(slot)
                    .map_err(&open_failed)
                    .and_then(|s| match login(&s) {
                        Ok(()) => Ok(s),
                        Err(e) => {
                            // Healthy but useless: close it rather than leak it.
                            let _ = s.close();
                            Err(e)
                        }
                    });
                return match opened {
                    Ok(session) => Ok(Lease {
                        pool: self,
                        session: Some(Pooled {
                            session,
                            generation,
                        }),
                    }),
                    Err(e) => {
                        self.forget_one();
                        Err(e)
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(busy());
            }
            inner = self
                .freed
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
