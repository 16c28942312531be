//! kmsctl, the scriptable client of kmsd (SPEC §11).
//!
//! Errors go to stderr as `error: <kind>: <message>`, or with `--json` to stdout as
//! `{"error":{"kind":…,"message":…}}`. `kind` is the daemon's error kind, or `connect`,
//! `io` or `usage` for errors that happen in kmsctl itself.
//!
//! Exit codes:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success; `verify`: the signature is valid |
//! | 1 | `verify`: the signature is invalid |
//! | 2 | usage error: unknown command or flag, bad value, `delete-now` without `--yes` |
//! | 3 | not-found |
//! | 4 | already-exists |
//! | 5 | invalid-argument |
//! | 6 | too-large |
//! | 7 | invalid-state |
//! | 8 | wrong-purpose |
//! | 9 | version-disabled |
//! | 10 | version-limit |
//! | 11 | decrypt-failed |
//! | 12 | permission-denied |
//! | 13 | malformed-frame |
//! | 14 | unsupported-version |
//! | 15 | internal |
//! | 69 | connect: kmsd cannot be reached or started, or the connection was lost (EX_UNAVAILABLE) |
//! | 74 | io: an input file cannot be read or the output cannot be written (EX_IOERR) |
//! | 75 | timeout: no answer within `--timeout` (EX_TEMPFAIL); the message says whether the request was sent, and so may have been carried out |
//! | 130 | interrupted: `backup` stopped by Ctrl-C or SIGTERM while it copies (its partial copy removed) |
//!
//! A `--batch` run processes every line, then exits with the code of the first failed
//! item's kind (0 if none failed). A closed stdout (`kmsctl list | head -1`) ends the run
//! quietly, with the code the run has earned so far: 0, or 1 for an invalid signature,
//! or a failed batch item's code.

/// `kmsctl --help`'s account of the exit codes (the table above, for a script author
/// without the README at hand).
const EXIT_CODES: &str = "\
KEY is a key tag or a key name. Inputs come from stdin unless --in FILE is given.

Exit codes: 0 success (verify: valid); 1 verify: invalid signature; 2 usage; 3 not-found;
4 already-exists; 5 invalid-argument; 6 too-large; 7 invalid-state; 8 wrong-purpose;
9 version-disabled; 10 version-limit; 11 decrypt-failed; 12 permission-denied;
13 malformed-frame; 14 unsupported-version; 15 internal; 69 connect (kmsd unreachable or
the connection lost); 74 io (a local file, or stdout, failed); 75 timeout (--timeout ran
out; the message says whether the request was sent); 130 interrupted (backup).
A --batch run exits with its first failed item's code. A closed stdout
(`kmsctl list | head -1`) ends the run quietly with the code earned so far.";

mod backup;
mod crypto;
mod grants;
mod history;
mod hsm;
mod keys;
mod lifecycle;
mod output;
mod secret_io;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use kms_shared::client::{Client, ClientError, ConnectOptions, connect_or_start};
use kms_shared::protocol::{ErrorKind, WireError};
use output::Printer;
use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const EX_USAGE: u8 = 2;
const EX_UNAVAILABLE: u8 = 69;
const EX_IOERR: u8 = 74;
const EX_TEMPFAIL: u8 = 75;
/// 128 + SIGINT, as a shell reports a command Ctrl-C stopped.
const EX_INTERRUPTED: u8 = 130;

#[derive(Debug, Parser)]
#[command(
    name = "kmsctl",
    version,
    about = "Scriptable client of kmsd, the local Key Management Service",
    long_about = None,
    after_help = "KEY is a key tag or a key name. Inputs come from stdin unless --in FILE is given.",
    after_long_help = EXIT_CODES
)]
pub struct Cli {
    /// The daemon's socket [default: $KMS_SOCKET, else $XDG_RUNTIME_DIR/kms/kmsd.sock, …];
    /// an explicit socket never starts a daemon
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "PATH"
    )]
    pub socket: Option<PathBuf>,
    /// Do not start kmsd when none answers on the default socket
    #[arg(long, global = true, help_heading = "Global options")]
    pub no_autostart: bool,
    /// Print JSON on stdout (errors as {"error":{"kind","message"}})
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
    /// Give up after SECONDS without an answer: for connecting (starting kmsd included),
    /// then for each request (exit 75) [default: 90 s to connect, then no limit]
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "SECONDS",
        value_parser = parse_timeout
    )]
    pub timeout: Option<Duration>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a key
    Create(keys::CreateArgs),
    /// List keys
    List(keys::ListArgs),
    /// Show one key
    Show(KeyArg),
    /// List a key's versions
    ///
    /// ENCRYPTIONS counts the AES encryptions made with each version (what the nonce
    /// budget limits); ECDSA and RSA versions show `-` (null with --json).
    Versions(KeyArg),
    /// Encrypt stdin with the key's current version
    ///
    /// Prints the `ncpkms:v{N}:…` ciphertext. With --batch, every input line is the
    /// base64 (standard, padded) of one plaintext, so that plaintexts may hold any bytes,
    /// newlines included; one ciphertext is printed per line, and a failed item prints
    /// `error: <kind>: <message>` on its line instead.
    Encrypt(crypto::CipherArgs),
    /// Decrypt an `ncpkms:` ciphertext read from stdin; writes the raw plaintext
    ///
    /// With --batch, every input line is one ciphertext and every output line the
    /// base64 of its plaintext (or `error: <kind>: <message>`).
    Decrypt(crypto::CipherArgs),
    /// Re-encrypt a ciphertext to the key's current version, inside the daemon
    ///
    /// With --batch, one ciphertext per input line, one per output line (or
    /// `error: <kind>: <message>`).
    Reencrypt(crypto::CipherArgs),
    /// Sign the message read from stdin
    Sign(crypto::SignArgs),
    /// Verify a signature of the message read from stdin (exit 0 valid, 1 invalid)
    Verify(crypto::VerifyArgs),
    /// Print the PEM public key of a version (default: current)
    PublicKey(crypto::PublicKeyArgs),
    /// Create a data key wrapped under the key's current version (envelope encryption)
    DataKey(crypto::DataKeyArgs),
    /// Add a new version and make it current
    Rotate(KeyArg),
    /// Enable a disabled key
    Enable(KeyArg),
    /// Disable a key (shows its recent usage first)
    Disable(KeyArg),
    /// Enable one version of a key
    ///
    /// A version already enabled is left so and the command succeeds (kmsd sets a
    /// version's flag idempotently), unlike `enable` of an enabled key, which is
    /// invalid-state (exit 7).
    EnableVersion(keys::VersionArgs),
    /// Disable one version of a key
    ///
    /// A version already disabled is left so and the command succeeds (kmsd sets a
    /// version's flag idempotently), unlike `disable` of a disabled key (exit 7).
    DisableVersion(keys::VersionArgs),
    /// Turn automatic rotation on or off and set its period
    ///
    /// One of --auto-rotate or --no-auto-rotate is required: `--auto-rotate
    /// --rotation-days 30` rotates every 30 days, `--no-auto-rotate --rotation-days 30` only
    /// sets the period.
    SetRotation(lifecycle::SetRotationArgs),
    /// Replace a key's memo
    SetMemo(lifecycle::SetMemoArgs),
    /// Request deletion: the key waits in pending-deletion (72 h by default)
    Delete(KeyArg),
    /// Cancel a requested deletion (the key becomes disabled)
    CancelDeletion(KeyArg),
    /// Purge a pending-deletion key at once, destroying its material
    DeleteNow(lifecycle::DeleteNowArgs),
    /// Recent usage of a key and the accounts that used it
    Impact(KeyArg),
    /// A key's history, newest first
    History(history::HistoryArgs),
    /// Print every daemon event as one JSON line until interrupted ("watching" on stderr
    /// once events are flowing)
    Watch,
    /// Show the daemon's status
    Status,
    /// Grant a role to a user or group, for all keys or one key (managers only)
    Grant(grants::GrantArgs),
    /// Revoke the grant with the same role, user or group, and key
    Revoke(grants::GrantArgs),
    /// List every grant
    Grants,
    /// Write a consistent snapshot of the running store to FILE (managers only)
    ///
    /// The key material in it stays wrapped under the daemon's root key: keep the root
    /// key (root.key or the kms-root-key credential) separately; without it the backup
    /// cannot be restored. Restore with `kmsd restore FILE` while kmsd is stopped.
    Backup(backup::BackupArgs),
    /// Register, list and remove the PKCS#11 tokens of dedicated-hsm keys (managers only)
    #[command(subcommand)]
    Hsm(hsm::HsmCommand),
}

#[derive(Debug, Args)]
pub struct KeyArg {
    /// Key tag or name
    pub key: String,
}

/// Parses one of a closed set of values by the names the shared model gives them, so
/// that `--help` lists exactly the names the daemon and the spec use.
pub fn choice<T: Copy + Send + Sync + 'static>(
    all: &'static [T],
    name: fn(T) -> &'static str,
) -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(all.iter().map(|v| name(*v))).try_map(move |s: String| {
        all.iter()
            .copied()
            // As typed, where an argument ignores case (`--type AES256`, as `list` shows it).
            .find(|v| name(*v).eq_ignore_ascii_case(&s))
            .ok_or("not one of the possible values")
    })
}

/// Why a command failed.
#[derive(Debug)]
pub enum CtlError {
    /// Refused by the daemon, or by kmsctl for a reason the daemon would give too.
    Wire(WireError),
    Connect(String),
    /// No answer within `--timeout`.
    Timeout(String),
    /// Stopped by a signal it handles (a backup removing its partial copy).
    Interrupted(String),
    Io(String),
    Usage(String),
    /// The reader of stdout went away; nobody is left to tell.
    BrokenPipe,
}

impl CtlError {
    pub fn kind(&self) -> &str {
        match self {
            CtlError::Wire(e) => e.kind.as_str(),
            CtlError::Connect(_) => "connect",
            CtlError::Timeout(_) => "timeout",
            CtlError::Interrupted(_) => "interrupted",
            CtlError::Io(_) | CtlError::BrokenPipe => "io",
            CtlError::Usage(_) => "usage",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            CtlError::Wire(e) => &e.message,
            CtlError::Connect(m)
            | CtlError::Timeout(m)
            | CtlError::Interrupted(m)
            | CtlError::Io(m)
            | CtlError::Usage(m) => m,
            CtlError::BrokenPipe => "broken pipe",
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Wire(e) => e.kind.exit_code(),
            CtlError::Connect(_) => EX_UNAVAILABLE,
            CtlError::Timeout(_) => EX_TEMPFAIL,
            CtlError::Interrupted(_) => EX_INTERRUPTED,
            CtlError::Io(_) => EX_IOERR,
            CtlError::Usage(_) => EX_USAGE,
            CtlError::BrokenPipe => 0,
        }
    }
}

pub fn invalid(message: impl Into<String>) -> CtlError {
    CtlError::Wire(WireError::new(ErrorKind::InvalidArgument, message))
}

impl From<ClientError> for CtlError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Server(w) => CtlError::Wire(w),
            ClientError::RequestTooLarge { .. } => {
                CtlError::Wire(WireError::new(ErrorKind::TooLarge, e.to_string()))
            }
            ClientError::VersionMismatch { .. } => {
                CtlError::Wire(WireError::new(ErrorKind::UnsupportedVersion, e.to_string()))
            }
            // A reply of the wrong kind is a daemon bug, not a transport problem.
            ClientError::Unexpected(_) => {
                CtlError::Wire(WireError::new(ErrorKind::Internal, e.to_string()))
            }
            ClientError::TimedOut { .. } => CtlError::Timeout(e.to_string()),
            other => CtlError::Connect(other.to_string()),
        }
    }
}

impl From<io::Error> for CtlError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe {
            CtlError::BrokenPipe
        } else if e
            .get_ref()
            .is_some_and(|inner| inner.is::<output::StdoutFailed>())
        {
            CtlError::Io(format!(
                "{e} (kmsd's answer could not be printed; what it did stands)"
            ))
        } else {
            CtlError::Io(e.to_string())
        }
    }
}

/// The exit code, or the error that ends the run.
pub type CmdResult = Result<u8, CtlError>;

/// What every command works with.
pub struct Ctx {
    pub client: Client,
    pub out: Printer,
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return ExitCode::from(bad_command_line(&e)),
    };
    let json = cli.json;
    // `backup -` writes the backup on stdout: an error there would be taken for its end.
    let stdout_is_data = matches!(&cli.command, Command::Backup(a) if a.file.as_os_str() == "-");
    let code = run(cli).unwrap_or_else(|e| {
        if json && stdout_is_data {
            report_json_on_stderr(&e)
        } else {
            report(&e, json)
        }
    });
    ExitCode::from(code)
}

/// [`report`] with `--json`, on stderr: for a command whose stdout carries data.
fn report_json_on_stderr(e: &CtlError) -> u8 {
    use std::io::Write as _;
    let line = output::error_json(e.kind(), e.message());
    let _ = writeln!(io::stderr(), "{line}");
    e.exit_code()
}

/// A command line clap refused (or `--help`, `--version`). A script that asked for
/// `--json` gets the refusal as every other error, a JSON line on stdout with kind
/// `usage`; otherwise clap prints it (with its suggestions), as it prints help.
fn bad_command_line(e: &clap::Error) -> u8 {
    use clap::error::ErrorKind as K;
    let json = std::env::args_os().any(|a| a == "--json");
    let is_help = matches!(e.kind(), K::DisplayHelp | K::DisplayVersion);
    if !json || is_help {
        let _ = e.print();
        return u8::try_from(e.exit_code()).unwrap_or(EX_USAGE);
    }
    let message = if e.kind() == K::DisplayHelpOnMissingArgumentOrSubcommand {
        // clap's "error" here is the whole help text.
        "the command needs a subcommand; its --help lists them".to_owned()
    } else {
        usage_message(e)
    };
    report(&CtlError::Usage(message), true)
}

/// clap's message as one plain line: without its `error: ` prefix, the usage lines and
/// the pointer to `--help` (the JSON consumer is a program).
fn usage_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    text.lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `code` once the output is written, or if nobody is left to read it (a broken pipe:
/// `kmsctl verify … | true` still exits 1 for an invalid signature); other errors stand.
pub fn keep_code_if_unread<E: Into<CtlError>>(code: u8, shown: Result<(), E>) -> CmdResult {
    match shown.map_err(Into::into) {
        Ok(()) | Err(CtlError::BrokenPipe) => Ok(code),
        Err(e) => Err(e),
    }
}

/// `--timeout`: a positive number of seconds (fractions allowed).
/// A rotation period, checked here by the shared model's rule: a period out of range
/// was refused by clap as "not in 0..=4294967295" (a negative or huge one, exit 2) or by
/// kmsd (0 or 731, exit 5); now each is a usage error naming the real range.
pub fn rotation_days(value: &str) -> Result<u32, String> {
    use kms_shared::model::{MAX_ROTATION_DAYS, MIN_ROTATION_DAYS};
    let out_of_range = || {
        format!("{value} is not a number of days from {MIN_ROTATION_DAYS} to {MAX_ROTATION_DAYS}")
    };
    let days: i128 = value.trim().parse().map_err(|_| out_of_range())?;
    u32::try_from(days)
        .ok()
        .filter(|d| kms_shared::model::validate_rotation_days(*d).is_ok())
        .ok_or_else(out_of_range)
}

fn parse_timeout(value: &str) -> Result<Duration, String> {
    let seconds: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number of seconds"))?;
    // NaN is neither more nor less than 0.
    if seconds.is_nan() || seconds <= 0.0 {
        return Err("the timeout must be more than 0 seconds".into());
    }
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{value} seconds is too long"))
}

fn report(e: &CtlError, json: bool) -> u8 {
    if matches!(e, CtlError::BrokenPipe) {
        return 0;
    }
    // With --json the report goes to stdout, which may be what failed (a full disk):
    // then it goes to stderr as text, not nowhere (a rotation that landed but could not
    // be printed exited 74 without a word). A closed stderr too leaves the exit code.
    let on_stdout = json
        && Printer::new(true)
            .json_line(&output::error_json(e.kind(), e.message()))
            .is_ok();
    if !on_stdout {
        use std::io::Write as _;
        let _ = writeln!(io::stderr(), "error: {}: {}", e.kind(), e.message());
    }
    e.exit_code()
}

fn run(cli: Cli) -> CmdResult {
    // Refused before connecting: an unconfirmed purge must not even start a daemon.
    if let Command::DeleteNow(a) = &cli.command
        && !a.yes
    {
        return Err(CtlError::Usage(format!(
            "delete-now destroys the material of {} at once and cannot be undone; repeat with --yes",
            a.key
        )));
    }
    if let Command::SetRotation(a) = &cli.command
        && let Some(message) = a.missing_mode()
    {
        return Err(CtlError::Usage(message));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let opts = ConnectOptions {
            socket: cli.socket,
            autostart: !cli.no_autostart,
            data_dir: None,
        };
        let client = match cli.timeout {
            None => connect_or_start(&opts).await?,
            Some(limit) => {
                let client = tokio::time::timeout(limit, connect_or_start(&opts))
                    .await
                    .map_err(|_| {
                        CtlError::Timeout(format!(
                            "kmsd did not answer within {} s while connecting; no request \
                             was sent",
                            limit.as_secs_f64()
                        ))
                    })??;
                client.set_call_timeout(Some(limit));
                client
            }
        };
        let mut ctx = Ctx {
            client,
            out: Printer::new(cli.json),
        };
        dispatch(&mut ctx, cli.command).await
    })
}

async fn dispatch(ctx: &mut Ctx, command: Command) -> CmdResult {
    use crypto::CipherOp;
    use lifecycle::Op;
    match command {
        Command::Create(a) => keys::create(ctx, a).await,
        Command::List(a) => keys::list(ctx, a).await,
        Command::Show(k) => keys::show(ctx, &k.key).await,
        Command::Versions(k) => keys::versions(ctx, &k.key).await,
        Command::EnableVersion(a) => keys::set_version(ctx, a, true).await,
        Command::DisableVersion(a) => keys::set_version(ctx, a, false).await,
        Command::Impact(k) => keys::impact(ctx, &k.key).await,
        Command::Status => keys::status(ctx).await,
        Command::Encrypt(a) => crypto::cipher(ctx, CipherOp::Encrypt, a).await,
        Command::Decrypt(a) => crypto::cipher(ctx, CipherOp::Decrypt, a).await,
        Command::Reencrypt(a) => crypto::cipher(ctx, CipherOp::Reencrypt, a).await,
        Command::Sign(a) => crypto::sign(ctx, a).await,
        Command::Verify(a) => crypto::verify(ctx, a).await,
        Command::PublicKey(a) => crypto::public_key(ctx, a).await,
        Command::DataKey(a) => crypto::data_key(ctx, a).await,
        Command::Rotate(k) => lifecycle::run(ctx, Op::Rotate, &k.key).await,
        Command::Enable(k) => lifecycle::run(ctx, Op::Enable, &k.key).await,
        Command::Disable(k) => lifecycle::run(ctx, Op::Disable, &k.key).await,
        Command::Delete(k) => lifecycle::run(ctx, Op::Delete, &k.key).await,
        Command::CancelDeletion(k) => lifecycle::run(ctx, Op::CancelDeletion, &k.key).await,
        Command::DeleteNow(a) => lifecycle::run(ctx, Op::DeleteNow, &a.key).await,
        Command::SetRotation(a) => lifecycle::set_rotation(ctx, a).await,
        Command::SetMemo(a) => lifecycle::set_memo(ctx, a).await,
        Command::History(a) => history::history(ctx, a).await,
        Command::Watch => history::watch(ctx).await,
        Command::Grant(a) => grants::grant(ctx, a).await,
        Command::Revoke(a) => grants::revoke(ctx, a).await,
        Command::Grants => grants::list(ctx).await,
        Command::Backup(a) => backup::backup(ctx, a).await,
        Command::Hsm(c) => hsm::run(ctx, c).await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kms_shared::model::{Action, KeyType, Protection, SignScheme};
    use kms_shared::protocol::ResultFilter;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kmsctl").chain(args.split_whitespace()))
    }

    /// A rotation period out of range is a usage error naming the range, wherever it is
    /// out (0 and 731 reached kmsd, -5 and 2^40 got clap's "not in 0..=4294967295").
    #[test]
    fn rotation_days_out_of_range_name_the_range() {
        for days in ["0", "731", "-5", "1099511627776", "ten"] {
            for cmd in [
                "create k01 --type aes256 --auto-rotate",
                "set-rotation k01 --auto-rotate",
            ] {
                let e = parse(&format!("{cmd} --rotation-days={days}")).unwrap_err();
                assert!(e.to_string().contains("from 1 to 730"), "{days}: {e}");
            }
        }
        assert!(parse("create k01 --type aes256 --auto-rotate --rotation-days 730").is_ok());
        assert!(parse("set-rotation k01 --no-auto-rotate --rotation-days 1").is_ok());
    }

    /// Every command of SPEC §11 parses with its flags.
    #[test]
    fn every_command_parses() {
        for args in [
            "create k01 --type aes256",
            "create k01 --type rsa2048 --protection dedicated-hsm --auto-rotate --rotation-days 30 --memo hi",
            "create k01 --type aes256 --convergent",
            "list",
            "list --deleted",
            "show k01",
            "versions k01",
            "encrypt k01",
            "encrypt k01 --context ctx --in /tmp/x",
            "encrypt k01 --batch",
            "decrypt k01 --context ctx",
            "decrypt k01 --batch --in -",
            "reencrypt k01 --context ctx --batch",
            "sign k01",
            "sign k01 --scheme pkcs1 --in msg",
            "verify k01 --signature ncpkms:v1:AA==",
            "verify k01 --signature ncpkms:v1:AA== --scheme pss",
            "public-key k01",
            "public-key k01 --version 3",
            "data-key k01",
            "data-key k01 --bits 512 --plaintext --context c",
            "rotate k01",
            "enable k01",
            "disable k01",
            "enable-version k01 2",
            "disable-version k01 2",
            "set-rotation k01 --auto-rotate",
            "set-rotation k01 --no-auto-rotate --rotation-days 7",
            "set-memo k01 text",
            "delete k01",
            "cancel-deletion k01",
            "delete-now k01 --yes",
            "delete-now k01",
            "impact k01",
            "history k01",
            "history k01 --limit 5 --action encrypt --result error --since 2024-01-01T00:00:00Z",
            "watch",
            "status",
            "--json --socket /tmp/s.sock --no-autostart status",
            "status --json",
            "backup /tmp/kms.redb",
            "backup /tmp/kms.redb --force",
            "hsm add vault-a --module /usr/lib/softhsm/libsofthsm2.so --token t --pin-file /p",
            "hsm list",
            "hsm remove vault-a",
            "create k01 --type ecdsa --protection dedicated-hsm --hsm vault-a",
        ] {
            if let Err(e) = parse(args) {
                panic!("{args}: {e}");
            }
        }
    }

    /// Wrong or missing values are usage errors (exit 2).
    #[test]
    fn bad_usage_is_refused() {
        for args in [
            "",
            "frobnicate",
            "create k01",
            "create k01 --type des",
            "create k01 --type aes256 --protection cloud",
            "verify k01",
            "sign k01 --scheme raw",
            "data-key k01 --bits 100",
            "set-rotation k01 --auto-rotate --no-auto-rotate",
            "create k01 --type aes256 --rotation-days 30",
            "enable-version k01",
            "enable-version k01 x",
            "history k01 --result maybe",
            "history k01 --since yesterday",
            "history k01 --limit 0",
            "history k01 --action nope",
            "set-memo k01",
            "hsm",
            "hsm add vault-a --token t --pin-file /p",
        ] {
            let e = parse(args).err().unwrap_or_else(|| panic!("{args} parsed"));
            assert_eq!(e.exit_code(), 2, "{args}");
        }
    }

    /// Parsed values reach the commands as the shared model's types.
    #[test]
    fn parsed_values() {
        let Command::Create(c) = parse("create k01 --type rsa2048 --protection hsm --auto-rotate")
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(
            (c.key_type, c.protection, c.auto_rotate, c.rotation_days),
            (KeyType::Rsa2048, Protection::Hsm, true, None)
        );
        let Command::Create(c) = parse("create k01 --type ecdsa").unwrap().command else {
            panic!()
        };
        assert_eq!((c.protection, c.memo.as_str()), (Protection::Basic, ""));
        // The type as `list` prints it is taken too.
        for (typed, key_type) in [
            ("AES256", KeyType::Aes256),
            ("ECDSA", KeyType::Ecdsa),
            ("Rsa2048", KeyType::Rsa2048),
        ] {
            let Command::Create(c) = parse(&format!("create k01 --type {typed}"))
                .unwrap()
                .command
            else {
                panic!()
            };
            assert_eq!(c.key_type, key_type);
        }

        let Command::Sign(s) = parse("sign k --scheme pkcs1").unwrap().command else {
            panic!()
        };
        assert_eq!(s.scheme, SignScheme::Pkcs1);
        let Command::Verify(v) = parse("verify k --signature S").unwrap().command else {
            panic!()
        };
        assert_eq!((v.scheme, v.signature.as_str()), (SignScheme::Pss, "S"));

        let Command::DataKey(d) = parse("data-key k").unwrap().command else {
            panic!()
        };
        assert_eq!((d.bits, d.plaintext), (256, false));

        let Command::History(h) =
            parse("history k --action public-key --result ok --since 1970-01-01T00:00:01.5Z")
                .unwrap()
                .command
        else {
            panic!()
        };
        assert_eq!(h.action, Some(Action::PublicKey));
        assert_eq!(h.result, Some(ResultFilter::Ok));
        assert_eq!(h.since, Some(1500));

        let Command::SetRotation(r) = parse("set-rotation k --no-auto-rotate").unwrap().command
        else {
            panic!()
        };
        assert!(!r.auto_rotate && r.no_auto_rotate);

        let cli = parse("encrypt k --batch --json --socket /s").unwrap();
        assert!(cli.json);
        assert_eq!(cli.socket, Some(PathBuf::from("/s")));
    }

    /// `delete-now` without `--yes` is refused locally, before any connection, with 2.
    #[test]
    fn delete_now_needs_yes() {
        let cli = parse("--socket /nonexistent/kms.sock delete-now k01").unwrap();
        let e = run(cli).unwrap_err();
        assert_eq!((e.kind(), e.exit_code()), ("usage", 2));
        assert!(e.message().contains("--yes"));
    }

    /// `set-rotation` without --auto-rotate or --no-auto-rotate is a usage error (2) that
    /// says which flag to add, before any connection; with --rotation-days N it names N.
    /// clap's own refusal only listed "<--auto-rotate|--no-auto-rotate>".
    #[test]
    fn set_rotation_says_which_flag_to_add() {
        let cli =
            parse("--socket /nonexistent/kms.sock set-rotation k01 --rotation-days 30").unwrap();
        let e = run(cli).unwrap_err();
        assert_eq!((e.kind(), e.exit_code()), ("usage", 2));
        assert_eq!(
            e.message(),
            "--rotation-days alone does not say whether k01 rotates: add --auto-rotate to \
             rotate it automatically every 30 days, or --no-auto-rotate to set the period \
             with automatic rotation off"
        );
        let cli = parse("--socket /nonexistent/kms.sock set-rotation k01").unwrap();
        let e = run(cli).unwrap_err();
        assert_eq!((e.kind(), e.exit_code()), ("usage", 2));
        assert!(e.message().contains("--auto-rotate"), "{}", e.message());
        assert!(e.message().contains("--no-auto-rotate"), "{}", e.message());
        // Either flag goes on to the daemon (here: none listening, 69).
        for flag in ["--auto-rotate", "--no-auto-rotate"] {
            let cli = parse(&format!(
                "--socket /nonexistent/kms.sock set-rotation k01 {flag} --rotation-days 30"
            ))
            .unwrap();
            assert_eq!(run(cli).unwrap_err().kind(), "connect", "{flag}");
        }
    }

    /// An explicit socket with nobody listening is a connect error (69), never a hang.
    #[test]
    fn unreachable_socket_is_69() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("none.sock");
        let cli = parse(&format!("--socket {} status", sock.display())).unwrap();
        let e = run(cli).unwrap_err();
        assert_eq!((e.kind(), e.exit_code()), ("connect", 69));
    }

    /// Daemon error kinds keep their documented codes; transport errors are 69.
    #[test]
    fn exit_code_mapping() {
        for kind in ErrorKind::ALL {
            let e = CtlError::from(ClientError::Server(WireError::new(kind, "m")));
            assert_eq!(e.exit_code(), kind.exit_code());
            assert_eq!(e.kind(), kind.as_str());
            assert!((3..=15).contains(&e.exit_code()));
        }
        let large = CtlError::from(ClientError::RequestTooLarge {
            len: 2_000_000,
            max: 1_048_576,
        });
        assert_eq!((large.kind(), large.exit_code()), ("too-large", 6));
        let closed = CtlError::from(ClientError::Closed {
            sent: true,
            reason: None,
        });
        assert_eq!((closed.kind(), closed.exit_code()), ("connect", 69));
        let late = CtlError::from(ClientError::TimedOut {
            after: Duration::from_millis(1500),
            sent: true,
        });
        assert_eq!((late.kind(), late.exit_code()), ("timeout", 75));
        assert!(late.message().contains("1.5 s"), "{}", late.message());
        let stopped = CtlError::Interrupted("stopped".into());
        assert_eq!((stopped.kind(), stopped.exit_code()), ("interrupted", 130));
        let mismatch = CtlError::from(ClientError::VersionMismatch {
            daemon: 2,
            client: 1,
        });
        assert_eq!(mismatch.kind(), "unsupported-version");
        let io = CtlError::from(io::Error::other("disk"));
        assert_eq!(io.exit_code(), 74);
        let pipe = CtlError::from(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(pipe.exit_code(), 0);
    }

    /// `--timeout` takes positive seconds, fractions included; anything else is a usage
    /// error before any connection.
    #[test]
    fn timeout_values() {
        let cli = parse("--timeout 2.5 status").unwrap();
        assert_eq!(cli.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(parse("status").unwrap().timeout, None);
        for bad in ["0", "-1", "soon", "NaN", "1e300"] {
            let e = parse(&format!("--timeout={bad} status")).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
        }
    }

    /// The exit-code table at the top of this file matches `ErrorKind::exit_code`.
    #[test]
    fn documented_exit_codes_match() {
        let doc = include_str!("mod.rs");
        for kind in ErrorKind::ALL {
            let row = format!("//! | {} | {} |", kind.exit_code(), kind.as_str());
            assert!(doc.contains(&row), "missing {row}");
        }
    }
}
