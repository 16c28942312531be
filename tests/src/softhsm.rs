//! A SoftHSM2 fixture: a private token directory and `softhsm2.conf` per test, tokens
//! initialised with `softhsm2-util`, objects inspected with `pkcs11-tool` (opensc).
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` when the library is initialised, so a daemon started
//! with [`SoftHsm::env`] sees exactly this fixture's tokens.

use crate::DaemonOptions;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's `softhsm2` package puts the PKCS#11 module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

pub struct SoftHsm {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
}

/// One initialised token.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub label: String,
    pub pin: String,
    pub pin_file: PathBuf,
}

impl SoftHsm {
    /// A fresh token directory; panics (fails the test, never skips) without SoftHSM2.
    pub fn new() -> SoftHsm {
        assert!(
            Path::new(MODULE).is_file(),
            "the hsm tests need SoftHSM2 ({MODULE}): apt-get install softhsm2 opensc \
             (.ci/install-deps does)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("token dir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("softhsm2.conf");
        SoftHsm { dir, conf }
    }

    /// The directory SoftHSM2 keeps its tokens in (one subdirectory per token).
    pub fn token_dir(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    /// Initialises a token in a free slot and writes its PIN to a 0600 file.
    pub fn init_token(&self, label: &str, pin: &str) -> TokenInfo {
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                pin,
                "--so-pin",
                "so-pin-5678",
            ])
            .output()
            .expect("softhsm2-util (apt-get install softhsm2)");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pin_file = self.dir.path().join(format!("{label}.pin"));
        std::fs::write(&pin_file, format!("{pin}\n")).expect("pin file");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600))
            .expect("pin file mode");
        TokenInfo {
            label: label.into(),
            pin: pin.into(),
            pin_file,
        }
    }

    /// The environment a process needs to see these tokens.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("SOFTHSM2_CONF".into(), self.conf.display().to_string())]
    }

    /// Daemon options with `token` as the daemon's token (flags on the command line).
    pub fn daemon_options(&self, token: &TokenInfo) -> DaemonOptions {
        DaemonOptions {
            extra_args: vec![
                "--pkcs11-module".into(),
                MODULE.into(),
                "--pkcs11-token".into(),
                token.label.clone(),
                "--pkcs11-pin-file".into(),
                token.pin_file.display().to_string(),
            ],
            env: self.env(),
            ..DaemonOptions::default()
        }
    }

    /// `pkcs11-tool --list-objects` of a token, logged in (so private objects show).
    pub fn list_objects(&self, token: &TokenInfo) -> String {
        let out = Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &self.conf)
            .args([
                "--module",
                MODULE,
                "--token-label",
                &token.label,
                "--login",
                "--pin",
            ])
            .arg(&token.pin)
            .arg("--list-objects")
            .output()
            .expect("pkcs11-tool (apt-get install opensc)");
        assert!(
            out.status.success(),
            "pkcs11-tool --list-objects failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Default for SoftHsm {
    fn default() -> Self {
        Self::new()
    }
}

/// One object of a `pkcs11-tool --list-objects` listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// `Secret Key Object`, `Private Key Object`, `Public Key Object`, …
    pub class: String,
    pub label: String,
    /// The `Access:` line (`sensitive, always sensitive, never extract, local`).
    pub access: String,
}

/// Parses a `pkcs11-tool --list-objects` listing: a line that does not start with white
/// space opens an object; `label:` and `Access:` lines describe it.
pub fn parse_objects(listing: &str) -> Vec<ListedObject> {
    let mut out: Vec<ListedObject> = Vec::new();
    for line in listing.lines() {
        if line.contains("Object;") && !line.starts_with(char::is_whitespace) {
            out.push(ListedObject {
                class: line
                    .split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
                label: String::new(),
                access: String::new(),
            });
            continue;
        }
        let Some(obj) = out.last_mut() else { continue };
        let t = line.trim();
        if let Some(v) = t.strip_prefix("label:") {
            obj.label = v.trim().to_string();
        } else if let Some(v) = t.strip_prefix("Access:") {
            obj.access = v.trim().to_string();
        }
    }
    out
}
