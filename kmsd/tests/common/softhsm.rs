//! A real SoftHSM2 token for the engine's HSM tests.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` when the library is first initialised in the process, so
//! a test binary that uses this holds one test (its own process), which makes its
//! [`Token`] first thing, before anything loads the module.

use super::Disk;
use kms_shared::model::{KeyType, Protection};
use kms_shared::protocol::CreateKey;
use kmsd::clock::ManualClock;
use kmsd::crypto::RootKey;
use kmsd::engine::{Caller, Engine, EngineConfig};
use kmsd::hsm::DaemonToken;
use kmsd::store::Store;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

pub fn me() -> Caller {
    Caller {
        uid: 0,
        gid: 0,
        pid: 1,
        account: "root".into(),
        groups: Vec::new(),
        client: "hsm-commits".into(),
    }
}

pub fn hsm_key(name: &str, key_type: KeyType) -> CreateKey {
    CreateKey {
        name: name.into(),
        key_type,
        protection: Protection::Hsm,
        convergent: false,
        auto_rotation: false,
        rotation_days: None,
        memo: String::new(),
        hsm: None,
    }
}

/// Initialises a token labelled `label` in the free slot (user PIN 1234), in the token
/// directory `SOFTHSM2_CONF` names.
fn init_token(label: &str) {
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", label])
        .args(["--pin", "1234", "--so-pin", "5678"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A SoftHSM2 token directory with one initialised token, and its PIN file.
pub struct Token {
    dir: tempfile::TempDir,
    pin_file: PathBuf,
    label: &'static str,
}

impl Token {
    /// Sets `SOFTHSM2_CONF` for this process: see the module's documentation.
    #[allow(unsafe_code)]
    pub fn new(label: &'static str) -> Token {
        assert!(
            Path::new(MODULE).is_file(),
            "this test needs SoftHSM2 ({MODULE}): apt-get install softhsm2 (.ci/install-deps)"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        // SAFETY: `set_var` is unsound only while another thread reads the environment;
        // the test that calls this is its process's only one, and calls it first.
        unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
        init_token(label);
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, "1234\n").unwrap();
        Token {
            dir,
            pin_file,
            label,
        }
    }

    /// Initialises another token beside this one (same PIN), for dedicated-hsm keys;
    /// returns the module and PIN file to register it with.
    pub fn another(&self, label: &str) -> (&'static str, PathBuf) {
        init_token(label);
        (MODULE, self.pin_file.clone())
    }

    /// Key objects in the token, taken away or not: SoftHSM2's file store keeps one
    /// `<uuid>.object` file per object beside the token's own `token.object`.
    pub fn objects(&self) -> usize {
        let mut n = 0;
        for dir in [self.dir.path().join("tokens"), self.away()] {
            let Ok(tokens) = std::fs::read_dir(dir) else {
                continue;
            };
            for token in tokens {
                for f in std::fs::read_dir(token.unwrap().path()).unwrap() {
                    let name = f.unwrap().file_name().into_string().unwrap();
                    n += usize::from(name.ends_with(".object") && name != "token.object");
                }
            }
        }
        n
    }

    fn away(&self) -> PathBuf {
        self.dir.path().join("away")
    }

    /// Takes the token away (SoftHSM2 keeps each token in a directory of its own), as if
    /// it were unplugged.
    pub fn take_away(&self) {
        std::fs::rename(self.dir.path().join("tokens"), self.away()).unwrap();
        std::fs::create_dir(self.dir.path().join("tokens")).unwrap();
    }

    /// Puts back the token [`Token::take_away`] took.
    pub fn put_back(&self) {
        std::fs::remove_dir(self.dir.path().join("tokens")).unwrap();
        std::fs::rename(self.away(), self.dir.path().join("tokens")).unwrap();
    }

    pub fn engine_on(&self, disk: &Disk) -> Engine {
        self.engine_and_clock_on(disk).0
    }

    /// An engine on this token and `disk`, and the clock it reads.
    pub fn engine_and_clock_on(&self, disk: &Disk) -> (Engine, Arc<ManualClock>) {
        let root = RootKey::from_bytes([0x44; 32]);
        let store =
            Store::open_with_backend(disk.clone(), &disk.label(self.label), &root.fingerprint())
                .unwrap();
        let config = EngineConfig {
            pkcs11: Some(DaemonToken {
                module: MODULE.into(),
                token: self.label.into(),
                pin_file: self.pin_file.clone(),
            }),
            ..EngineConfig::default()
        };
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let engine = Engine::open(store, root, clock.clone(), config).unwrap();
        (engine, clock)
    }
}
