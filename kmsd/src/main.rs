//! `kmsd`: starts on embedded defaults with no arguments (SPEC §1).

use clap::Parser;
use kmsd::config::Config;
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
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML configuration file (optional; flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Share the socket with this group: 0660 in a 0750 directory.
    #[arg(long)]
    socket_group: Option<String>,
}

fn main() -> std::process::ExitCode {
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
        .init();
    match start(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmsd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn start(args: Args) -> anyhow::Result<()> {
    let mut config = Config::defaults();
    if let Some(path) = &args.config {
        config.apply_file(path)?;
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kmsd")
        .build()?;
    runtime.block_on(kmsd::run(config, stop_signal()))
}

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
