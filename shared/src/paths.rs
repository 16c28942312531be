//! Where the socket and the data live (SPEC §1). The daemon and every client resolve the
//! socket with [`default_socket_path`], so they cannot disagree.

use std::path::PathBuf;

/// The environment a resolution depends on, so the rules can be tested without touching
/// the process environment.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub kms_socket: Option<String>,
    pub xdg_runtime_dir: Option<String>,
    pub state_directory: Option<String>,
    pub xdg_data_home: Option<String>,
    pub home: Option<String>,
    pub uid: u32,
}

impl Env {
    /// Reads the process environment and the real uid.
    pub fn current() -> Env {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Env {
            kms_socket: var("KMS_SOCKET"),
            xdg_runtime_dir: var("XDG_RUNTIME_DIR"),
            state_directory: var("STATE_DIRECTORY"),
            xdg_data_home: var("XDG_DATA_HOME"),
            home: var("HOME"),
            uid: rustix::process::getuid().as_raw(),
        }
    }
}

/// The socket of the system service (systemd/kmsd.socket): root's default when no
/// runtime directory is set, everyone else's by `--socket` or `$KMS_SOCKET`.
pub const SYSTEM_SOCKET: &str = "/run/kms/kmsd.sock";

/// Whether clients may start a daemon of their own for `env`: not when the system
/// service's socket exists and `$KMS_SOCKET` does not say otherwise. A kms group member
/// would silently get a private daemon instead of the shared one, and root (whose data
/// directory is the system store, `/var/lib/kms`) would take that store from the service.
pub fn autostart_allowed_in(env: &Env, system_socket_exists: bool) -> bool {
    env.kms_socket.is_some() || !system_socket_exists
}

/// `$KMS_SOCKET`, else `$XDG_RUNTIME_DIR/kms/kmsd.sock`, else `/run/kms/kmsd.sock` for root,
/// else `/tmp/kms-$UID/kmsd.sock`.
pub fn socket_path_in(env: &Env) -> PathBuf {
    if let Some(p) = &env.kms_socket {
        return PathBuf::from(p);
    }
    if let Some(d) = &env.xdg_runtime_dir {
        return PathBuf::from(d).join("kms").join("kmsd.sock");
    }
    if env.uid == 0 {
        return PathBuf::from(SYSTEM_SOCKET);
    }
    PathBuf::from(format!("/tmp/kms-{}/kmsd.sock", env.uid))
}

/// `$STATE_DIRECTORY` (systemd; the first entry if several), else `$XDG_DATA_HOME/kms`,
/// else `/var/lib/kms` for root, else `~/.local/share/kms`.
pub fn data_dir_in(env: &Env) -> PathBuf {
    if let Some(d) = &env.state_directory {
        let first = d.split(':').next().unwrap_or(d);
        return PathBuf::from(first);
    }
    if let Some(d) = &env.xdg_data_home {
        return PathBuf::from(d).join("kms");
    }
    if env.uid == 0 {
        return PathBuf::from("/var/lib/kms");
    }
    let home = env.home.clone().unwrap_or_else(|| "/".into());
    PathBuf::from(home).join(".local/share/kms")
}

/// The socket path for this process's environment.
pub fn default_socket_path() -> PathBuf {
    socket_path_in(&Env::current())
}

/// The data directory for this process's environment.
pub fn default_data_dir() -> PathBuf {
    data_dir_in(&Env::current())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the system service's socket present, clients start no daemon of their own
    /// unless `$KMS_SOCKET` names where they want one.
    #[test]
    fn no_autostart_beside_the_system_service() {
        let mut env = Env {
            uid: 1000,
            xdg_runtime_dir: Some("/run/user/1000".into()),
            ..Env::default()
        };
        assert!(autostart_allowed_in(&env, false));
        assert!(!autostart_allowed_in(&env, true));
        env.uid = 0;
        assert!(!autostart_allowed_in(&env, true));
        env.kms_socket = Some("/tmp/mine.sock".into());
        assert!(autostart_allowed_in(&env, true));
    }

    /// Each rule of SPEC §1 in order of precedence.
    #[test]
    fn socket_precedence() {
        let mut env = Env {
            uid: 1000,
            ..Env::default()
        };
        assert_eq!(
            socket_path_in(&env),
            PathBuf::from("/tmp/kms-1000/kmsd.sock")
        );
        env.uid = 0;
        assert_eq!(socket_path_in(&env), PathBuf::from("/run/kms/kmsd.sock"));
        env.xdg_runtime_dir = Some("/run/user/1000".into());
        assert_eq!(
            socket_path_in(&env),
            PathBuf::from("/run/user/1000/kms/kmsd.sock")
        );
        env.kms_socket = Some("/x/y.sock".into());
        assert_eq!(socket_path_in(&env), PathBuf::from("/x/y.sock"));
    }

    /// Data directory: systemd's, then XDG, then root's, then the home directory.
    #[test]
    fn data_dir_precedence() {
        let mut env = Env {
            uid: 1000,
            home: Some("/home/u".into()),
            ..Env::default()
        };
        assert_eq!(data_dir_in(&env), PathBuf::from("/home/u/.local/share/kms"));
        env.uid = 0;
        assert_eq!(data_dir_in(&env), PathBuf::from("/var/lib/kms"));
        env.xdg_data_home = Some("/xdg".into());
        assert_eq!(data_dir_in(&env), PathBuf::from("/xdg/kms"));
        env.state_directory = Some("/var/lib/kms:/other".into());
        assert_eq!(data_dir_in(&env), PathBuf::from("/var/lib/kms"));
    }
}
