//! Where the socket and the data live (SPEC §1). The daemon and every client resolve the
//! socket with [`default_socket_path`], so they cannot disagree.

use std::path::{Path, PathBuf};

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
    /// Whether the system service is installed (its units in a system unit directory),
    /// whether or not it runs.
    pub system_service_installed: bool,
}

/// Where the system service's units are installed (systemd/install.sh, or a package).
const SYSTEM_UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

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
            system_service_installed: SYSTEM_UNIT_DIRS.iter().any(|dir| {
                ["kmsd.socket", "kmsd.service"]
                    .iter()
                    .any(|unit| Path::new(dir).join(unit).exists())
            }),
        }
    }
}

/// The socket of the system service (systemd/kmsd.socket): root's default when no
/// runtime directory is set, everyone else's by `--socket` or `$KMS_SOCKET`.
pub const SYSTEM_SOCKET: &str = "/run/kms/kmsd.sock";

/// The store's file in a data directory.
pub const STORE_FILE: &str = "kms.redb";

/// Why a client starts no daemon of its own where no daemon answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAutostart {
    /// The socket is the system service's ([`SYSTEM_SOCKET`]), however it was chosen
    /// (root's default, `$KMS_SOCKET`), and the service is installed, or the client is
    /// not root: a daemon started there by a client would run as that client's account
    /// on the service's store (root's data directory is `/var/lib/kms`), e.g. while an
    /// administrator has stopped the service to restore it. On a machine without the
    /// service, root's client starts root's own daemon there (SPEC §1's defaults: the
    /// README's first command, run as root).
    SystemSocket,
    /// The system service's socket exists and `$KMS_SOCKET` does not say otherwise: a kms
    /// group member would silently get a private daemon instead of the shared one.
    SystemServiceListens,
}

/// Whether clients may start a daemon of their own on `socket` for `env`, and if not,
/// why not (see [`NoAutostart`]).
pub fn autostart_refused_in(
    env: &Env,
    socket: &Path,
    system_socket_exists: bool,
) -> Option<NoAutostart> {
    if is_system_socket(socket) && (env.uid != 0 || env.system_service_installed) {
        return Some(NoAutostart::SystemSocket);
    }
    // Not where root's own daemon is the one on that socket (no service installed): a
    // socket file left by its crash would keep it from ever being started again.
    if env.kms_socket.is_none() && system_socket_exists && !is_system_socket(socket) {
        return Some(NoAutostart::SystemServiceListens);
    }
    None
}

/// Whether `path` names the system service's socket: spelled differently
/// (`/run/kms/./kmsd.sock`, a relative path from `/run`) or through a link to its
/// directory (`/var/run/kms/kmsd.sock`, `/var/run` being a link to `/run`).
pub fn is_system_socket(path: &Path) -> bool {
    let system = Path::new(SYSTEM_SOCKET);
    let Some(normal) = lexically_normal(path) else {
        return false;
    };
    if normal == system {
        return true;
    }
    // The same directory reached another way: compare where both directories lead.
    let same_name = normal.file_name() == system.file_name();
    let resolved = |p: &Path| p.parent().and_then(|d| std::fs::canonicalize(d).ok());
    same_name && resolved(&normal).is_some_and(|d| Some(d) == resolved(system))
}

/// `path` made absolute, without `.` components, and with `..` applied to the component
/// before it (as the kernel would, unless that component is a link).
fn lexically_normal(path: &Path) -> Option<PathBuf> {
    use std::path::Component;
    let absolute = std::path::absolute(path).ok()?;
    let mut out = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    Some(out)
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

/// The data directory of a daemon a client starts (autostart) for `env`: as
/// [`data_dir_in`], without `$STATE_DIRECTORY`. In a client's environment that variable
/// is the state directory of the client's own service (systemd sets it for a unit with
/// `StateDirectory=`), not kmsd's: a daemon started from such a service would have kept
/// its keys among that service's files, and a second client of the same account outside
/// it would have started another daemon on another store.
pub fn autostart_data_dir_in(env: &Env) -> PathBuf {
    data_dir_in(&Env {
        state_directory: None,
        ..env.clone()
    })
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
        let own = socket_path_in(&env);
        assert_eq!(autostart_refused_in(&env, &own, false), None);
        assert_eq!(
            autostart_refused_in(&env, &own, true),
            Some(NoAutostart::SystemServiceListens)
        );
        env.uid = 0;
        assert_eq!(
            autostart_refused_in(&env, &socket_path_in(&env), true),
            Some(NoAutostart::SystemServiceListens)
        );
        env.kms_socket = Some("/tmp/mine.sock".into());
        assert_eq!(
            autostart_refused_in(&env, &socket_path_in(&env), true),
            None
        );
    }

    /// No daemon is started on the system service's socket where the service is
    /// installed: not for root, whose default it is without a session, while the service
    /// is stopped (its socket gone), nor when `$KMS_SOCKET` names it, however spelled;
    /// and never by another account. On a machine without the service, root's client
    /// starts root's daemon there, as SPEC §1's defaults say (the README's first command).
    #[test]
    fn no_autostart_on_the_system_socket_where_the_service_is_installed() {
        let mut env = Env {
            uid: 0,
            system_service_installed: true,
            ..Env::default()
        };
        let root_default = socket_path_in(&env);
        assert_eq!(root_default, Path::new(SYSTEM_SOCKET));
        for exists in [false, true] {
            assert_eq!(
                autostart_refused_in(&env, &root_default, exists),
                Some(NoAutostart::SystemSocket)
            );
        }
        env.system_service_installed = false;
        // Root's own daemon, where no service is installed, also over the socket file its
        // crash left (it was refused as "the system service's socket exists").
        for exists in [false, true] {
            assert_eq!(autostart_refused_in(&env, &root_default, exists), None);
        }
        env.uid = 1000;
        for spelled in [
            "/run/kms/kmsd.sock",
            "/run/kms/./kmsd.sock",
            "//run/kms/kmsd.sock",
            "/run/kms/../kms/kmsd.sock",
        ] {
            env.kms_socket = Some(spelled.into());
            assert_eq!(
                autostart_refused_in(&env, &socket_path_in(&env), false),
                Some(NoAutostart::SystemSocket),
                "{spelled}"
            );
        }
        assert!(!is_system_socket(Path::new("/run/kms/other.sock")));
        assert!(!is_system_socket(Path::new("/run/kmsd.sock")));
    }

    /// The data directory of an autostarted daemon never comes from the client's
    /// `$STATE_DIRECTORY` (the client's own service's), and is otherwise kmsd's default.
    #[test]
    fn autostart_data_dir_ignores_the_clients_state_directory() {
        let mut env = Env {
            uid: 1000,
            home: Some("/home/u".into()),
            state_directory: Some("/var/lib/some-app".into()),
            ..Env::default()
        };
        assert_eq!(
            autostart_data_dir_in(&env),
            PathBuf::from("/home/u/.local/share/kms")
        );
        env.xdg_data_home = Some("/xdg".into());
        assert_eq!(autostart_data_dir_in(&env), PathBuf::from("/xdg/kms"));
        // Without the variable (as in the daemon's environment, where the client removes
        // it), kmsd's own default is the same directory.
        env.state_directory = None;
        assert_eq!(autostart_data_dir_in(&env), data_dir_in(&env));
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
