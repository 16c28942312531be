//! A PKCS#11 library, loaded and initialised once per process.
//!
//! `C_Initialize`/`C_Finalize` act on the whole library, whichever token they are meant
//! for, so every token of one library shares one [`Module`] (a process-wide map keyed by
//! the canonical path). Some libraries (SoftHSM2 among them) notice a token that comes
//! back only after the library is finalised and initialised again: [`Module::reinit`]
//! does that, under the write half of a lock whose read half every call into the
//! library holds, so no call is ever in flight across a re-initialisation. Sessions carry
//! the generation they were opened in; those of an older generation are dead handles and
//! are dropped without `C_CloseSession` (their numbers may belong to new sessions).

use super::HsmError;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

/// A library is re-initialised at most this often (a token that stays away must not turn
/// every call into a finalise/initialise cycle of every other token of the library).
const REINIT_INTERVAL: Duration = Duration::from_secs(1);

pub struct Module {
    path: PathBuf,
    state: RwLock<State>,
}

/// The library's context and how many times it was re-initialised.
pub struct State {
    pub ctx: Pkcs11,
    pub generation: u64,
    last_reinit: Option<Instant>,
}

static MODULES: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();

impl Module {
    /// The module at `path`, loaded and initialised on first use.
    pub fn get(path: &Path) -> Result<Arc<Module>, HsmError> {
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let mut map = MODULES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(m) = map.get(&key) {
            return Ok(m.clone());
        }
        let load_err = |e: &dyn std::fmt::Display| HsmError::Module {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let ctx = Pkcs11::new(&key).map_err(|e| load_err(&e))?;
        // A library that loads but does not start (SoftHSM2 whose token directory is
        // on a volume not mounted yet, a network HSM's client that cannot reach it) is
        // kept, as one whose token went away is: its tokens fail until a later call's
        // re-initialisation succeeds ([`Module::reinit`]). Refusing it stopped kmsd, so
        // a restart loop kept basic keys down too.
        if let Err(e) = initialize(&ctx) {
            tracing::warn!(
                module = %path.display(),
                error = %super::rv_name(&e),
                "the PKCS#11 module loaded but did not initialise; its tokens fail until it does"
            );
        }
        let m = Arc::new(Module {
            path: path.to_path_buf(),
            state: RwLock::new(State {
                ctx,
                generation: 0,
                last_reinit: None,
            }),
        });
        map.insert(key, m.clone());
        Ok(m)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Held while calling into the library.
    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Finalises and initialises the library again, unless someone already did since
    /// generation `seen` or it was done less than [`REINIT_INTERVAL`] ago. Returns whether
    /// the generation moved on (by this call or another).
    pub fn reinit(&self, seen: u64) -> bool {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if st.generation != seen {
            return true;
        }
        if st
            .last_reinit
            .is_some_and(|t| t.elapsed() < REINIT_INTERVAL)
        {
            return false;
        }
        st.last_reinit = Some(Instant::now());
        // Errors are expected here (a library in a bad state is why we are here); the
        // initialisation that follows is what counts.
        let _ = st.ctx.clone().finalize();
        match initialize(&st.ctx) {
            Ok(()) => {
                st.generation += 1;
                tracing::info!(module = %self.path.display(), "PKCS#11 module re-initialised");
                true
            }
            Err(e) => {
                tracing::warn!(
                    module = %self.path.display(),
                    error = %super::rv_name(&e),
                    "PKCS#11 module re-initialisation failed"
                );
                // Sessions of the old generation are dead either way.
                st.generation += 1;
                true
            }
        }
    }
}

/// `C_Initialize` with OS locking (kmsd calls from many threads); a library another part
/// of the process already initialised is fine.
fn initialize(ctx: &Pkcs11) -> Result<(), CkError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}
