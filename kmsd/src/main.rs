//! `kmsd`: starts on embedded defaults with no arguments (SPEC §1); `kmsd restore`
//! brings a backup back while the daemon is stopped (SPEC §9).

use clap::{Parser, Subcommand};
use kmsd::config::Config;
use std::io::Write as _;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "kmsd",
    version,
    about = "kms daemon: local Key Management Service"
)]
struct Args {
    /// Unix socket to serve (default: $KMS_SOCKET, $XDG_RUNTIME_DIR/kms/kmsd.sock, …).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Directory of the key store and the root key file.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// TOML configuration file (optional; flags override it).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Share the socket with this group: 0660 in a 0750 directory.
    #[arg(long)]
    socket_group: Option<String>,
    /// PKCS#11 module of the daemon's token, for `hsm` keys
    #[arg(long, value_name = "PATH")]
    pkcs11_module: Option<PathBuf>,
    /// Label of the daemon's PKCS#11 token
    #[arg(long, value_name = "LABEL")]
    pkcs11_token: Option<String>,
    /// File holding the token's user PIN [default: the credential kms-pkcs11-pin]
    #[arg(long, value_name = "FILE")]
    pkcs11_pin_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Restore a backup made by `kmsctl backup` into the data directory (kmsd stopped)
    ///
    /// The backup must open with the root key of this data directory (root.key or the
    /// kms-root-key credential): copy the original root.key first when restoring into a
    /// fresh directory. Nothing changes unless the backup passes redb's integrity check
    /// and loads.
    Restore {
        /// The backup file
        file: PathBuf,
        /// Replace an existing store (it is kept as kms.redb.before-restore-<millis>)
        #[arg(long)]
        force: bool,
    },
}

fn main() -> std::process::ExitCode {
    // First, before any file is opened: fd 3 must still be the socket systemd passed.
    let activation = kmsd::systemd::claim_listen_fds();
    kmsd::store::quiet_expected_panics();
    // While kmsd has one thread.
    kmsd::heap::give_back_freed_memory();
    // Only when a client that started kmsd asks: a kmsd run by hand may be given files
    // on purpose (`--config <(…)`, `restore <(gpg -d …)` name `/dev/fd/N`).
    if std::env::var_os(kmsd::systemd::CLOSE_INHERITED_FDS).is_some_and(|v| v == "1") {
        kmsd::systemd::close_inherited_descriptors();
    }
    let args = Args::parse();
    // Nothing kmsd creates (store, root key, lock, socket) is for other users' eyes.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KMS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // A log line that cannot be written (a full disk under an autostarted kmsd's
        // `kmsd.log`, a closed pipe) is dropped. By default the subscriber reported it
        // with `eprintln!`, which panics when stderr is what failed: kmsd aborted.
        .log_internal_errors(false)
        .init();
    // Before the root key is read.
    kmsd::systemd::harden_process();
    let result = activation
        .map_err(anyhow::Error::from)
        .and_then(|()| start(args));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let said = told(&e);
            // Not `eprintln!`, which panics on a stderr that cannot be written.
            let _ = writeln!(std::io::stderr(), "kmsd: error: {said}");
            kmsd::systemd::notify_failed(&said);
            std::process::ExitCode::from(kmsd::exit_status(&e))
        }
    }
}

/// The error and its causes, each said once: many of kmsd's errors already quote their
/// cause in their own message, which `{:#}` would then repeat.
fn told(e: &anyhow::Error) -> String {
    let mut said = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !said.contains(&cause) {
            said.push_str(": ");
            said.push_str(&cause);
        }
    }
    said
}

fn start(args: Args) -> anyhow::Result<()> {
    let mut config = Config::defaults();
    if let Some(path) = &args.config {
        config.apply_file(path)?;
    }
    if let Some(Cmd::Restore { file, force }) = args.command {
        if let Some(v) = args.data_dir {
            config.data_dir = v;
        }
        return restore(&config, file, force);
    }
    if let Some(v) = args.socket {
        config.socket = v;
    }
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    if args.socket_group.is_some() {
        config.socket_group = args.socket_group;
    }
    if args.pkcs11_module.is_some() {
        config.pkcs11.module = args.pkcs11_module;
    }
    if args.pkcs11_token.is_some() {
        config.pkcs11.token = args.pkcs11_token;
    }
    if args.pkcs11_pin_file.is_some() {
        config.pkcs11.pin_file = args.pkcs11_pin_file;
    }
    // As the log and `status` say it: a client that restarts this daemon (the dashboard)
    // finds the store from its own working directory.
    config.data_dir = std::path::absolute(&config.data_dir).unwrap_or(config.data_dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kmsd")
        .build()?;
    // The handlers are installed before `run` binds the socket.
    runtime.block_on(async {
        let signals = stop_signal();
        // Watched on a worker thread: `run`'s start blocks the thread it runs on.
        let (stopped, stop) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            signals.await;
            if kmsd::stop_while_starting() {
                exit_while_starting();
            }
            let _ = stopped.send(());
        });
        kmsd::run(config, async {
            let _ = stop.await;
        })
        .await
    })
}

/// A stop that arrives before kmsd serves: nothing has been answered, so ending the
/// process is safe (as a crash at that point: every store write is crash-safe, and the
/// next start checks the store again). Waiting instead would keep `systemctl stop` or a
/// shutdown waiting on a start that may take minutes (the service manager's start
/// timeout is extended meanwhile) or never end (a PIN read from a pipe with no writer).
#[allow(unsafe_code)]
fn exit_while_starting() -> ! {
    tracing::warn!("stop requested while starting: exiting before serving");
    kmsd::systemd::notify_stopping();
    // SAFETY: `_exit` ends the process without running `atexit` handlers or C++ static
    // destructors. `exit` would run them on this thread while the start goes on in
    // another, say inside a PKCS#11 module's `C_Login`, whose library they tear down.
    // Nothing needs flushing: the log is written unbuffered, and no store write is
    // pending that a crash would not equally leave.
    unsafe { libc::_exit(0) }
}

/// A line on stdout, or on stderr if stdout cannot take it: what it reports is done, and
/// `println!` would panic and make it look failed (exit 101).
fn say(line: std::fmt::Arguments<'_>) {
    if writeln!(std::io::stdout(), "{line}").is_err() {
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}

/// `kmsd restore`: prints what it did, or fails; a failure changed nothing unless it says
/// the backup is restored (a step after the store was replaced failed).
fn restore(config: &Config, file: PathBuf, force: bool) -> anyhow::Result<()> {
    let done = kmsd::restore::restore(&kmsd::restore::RestoreOptions {
        file: file.clone(),
        data_dir: config.data_dir.clone(),
        credentials_dir: config.credentials_dir.clone(),
        force,
    })?;
    say(format_args!(
        "restored {} ({} keys, {} versions, {} history entries) into {}",
        file.display(),
        done.info.keys,
        done.info.versions,
        done.info.history,
        done.store.display()
    ));
    if done.budgets_spent > 0 {
        say(format_args!(
            "{} AES key(s) will rotate at their next encryption: the backup cannot count \
             the encryptions made since it was taken",
            done.budgets_spent
        ));
    }
    if done.info.hsm_keys > 0 {
        say(format_args!(
            "{} key(s) keep their material in an HSM token, which a backup does not hold: \
             keys of the token purged since the backup was taken are back in the store \
             without it (their calls fail), and objects of keys made since stay on the \
             token with nothing to destroy them (pkcs11-tool --list-objects shows them, \
             labelled kms-<tag>-v<N>)",
            done.info.hsm_keys
        ));
    }
    if let Some(slots) = &done.orphan_slots {
        say(format_args!(
            "a key slot file without a store was there; it is kept as {} (the store it \
             belongs to opens only with it)",
            slots.display()
        ));
    }
    if let Some(previous) = done.previous {
        say(format_args!(
            "the replaced store is kept as {}",
            previous.display()
        ));
    }
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers at once and resolves on either. Installed
/// when this is called, not when first awaited: a stop sent as soon as the socket answers
/// (a service manager, a test) must be the clean one, never the signal's default exit.
/// SIGHUP, which daemons conventionally take as "reload" (`systemctl reload`, log
/// rotation scripts, a closed terminal), is logged and otherwise ignored: its default
/// action ended kmsd without a clean stop, and kmsd has nothing to reload.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    );
    async move {
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = handlers else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => tracing::info!(
                    "SIGHUP ignored: kmsd has nothing to reload; restart it to apply a changed \
                     configuration"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// A cause the message already quotes is not said again; one it does not is added.
    #[test]
    fn each_cause_is_told_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("{path} is not a backup: {source}")]
        struct Quoting {
            path: &'static str,
            source: std::io::Error,
        }
        let e = anyhow::Error::from(Quoting {
            path: "b.redb",
            source: std::io::Error::other("magic number mismatch"),
        });
        assert_eq!(
            super::told(&e),
            "b.redb is not a backup: magic number mismatch"
        );
        let e = anyhow::Error::from(std::io::Error::other("disk on fire")).context("cannot start");
        assert_eq!(super::told(&e), "cannot start: disk on fire");
    }
}
