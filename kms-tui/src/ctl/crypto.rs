//! Cryptographic commands. Inputs come from stdin or `--in FILE` byte for byte; only the
//! `ncpkms:` strings (ciphertexts, signatures) are trimmed, since a shell adds newlines.

use super::output;
use super::secret_io::{self, SecretBuf};
use super::{CmdResult, CtlError, Ctx, choice};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::Args;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use kms_shared::model::{MAX_BATCH_ITEMS, SignScheme};
use kms_shared::protocol::{
    CiphertextItem, DEFAULT_MAX_FRAME, ErrorKind, ItemOutcome, PlaintextItem, WireError,
};
use serde::Serialize;
use serde_json::json;
use std::io;
use std::path::PathBuf;
use zeroize::Zeroizing;

const SCHEMES: [SignScheme; 2] = [SignScheme::Pss, SignScheme::Pkcs1];

fn scheme_name(s: SignScheme) -> &'static str {
    match s {
        SignScheme::Pss => "pss",
        SignScheme::Pkcs1 => "pkcs1",
    }
}

#[derive(Debug, Args)]
pub struct InputArg {
    /// Read the input from FILE instead of stdin ("-" is stdin)
    #[arg(long = "in", value_name = "FILE")]
    pub in_file: Option<PathBuf>,
}

impl InputArg {
    fn name(&self) -> String {
        match &self.in_file {
            Some(p) if p.as_os_str() != "-" => p.display().to_string(),
            _ => "stdin".into(),
        }
    }

    fn read_error(&self, e: io::Error) -> CtlError {
        CtlError::Io(format!("cannot read {}: {e}", self.name()))
    }

    /// The input, unbuffered (see [`secret_io`]).
    fn open(&self) -> Result<std::fs::File, CtlError> {
        match &self.in_file {
            Some(p) if p.as_os_str() != "-" => std::fs::File::open(p),
            _ => secret_io::unbuffered_stdin(),
        }
        .map_err(|e| self.read_error(e))
    }

    /// The whole input, in a buffer that is wiped when dropped. More than one request
    /// may carry is refused once that much has come, without reading on.
    fn read(&self) -> Result<SecretBuf, CtlError> {
        const LIMIT: usize = DEFAULT_MAX_FRAME as usize;
        secret_io::read_all(&mut self.open()?, LIMIT)
            .map_err(|e| self.read_error(e))?
            .ok_or_else(|| {
                CtlError::Wire(WireError::new(
                    ErrorKind::TooLarge,
                    format!(
                        "{} holds more than {LIMIT} bytes, more than one request may carry; \
                         nothing was sent (AES-256 plaintexts are at most {} bytes, \
                         messages to sign {})",
                        self.name(),
                        kms_shared::model::MAX_AES_PLAINTEXT,
                        kms_shared::model::MAX_SIGN_MESSAGE
                    ),
                ))
            })
    }

    fn read_text(&self) -> Result<String, CtlError> {
        let bytes = self.read()?;
        let text = std::str::from_utf8(bytes.as_slice())
            .map_err(|_| super::invalid(format!("{} is not an ncpkms: string", self.name())))?;
        Ok(text.trim().to_owned())
    }
}

#[derive(Debug, Args)]
pub struct CipherArgs {
    /// Key tag or name
    pub key: String,
    /// Context bound to the ciphertext: required for convergent keys, at most 50 bytes
    #[arg(long, value_name = "TEXT")]
    pub context: Option<String>,
    /// One item per input line, one result per output line, in order (formats: --help);
    /// with --json each output line is {"ciphertext"|"plaintext"|"error": …}
    ///
    /// Every line is processed; the exit code is that of the first failed item (0 if
    /// none failed). An input without lines sends nothing, so nothing about KEY is
    /// checked, and exits 0, as a filter does on empty input.
    #[arg(long)]
    pub batch: bool,
    #[command(flatten)]
    pub input: InputArg,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// Key tag or name
    pub key: String,
    /// RSA signature scheme (ECDSA keys ignore it)
    #[arg(long, default_value = "pss", value_parser = choice(&SCHEMES, scheme_name))]
    pub scheme: SignScheme,
    #[command(flatten)]
    pub input: InputArg,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Key tag or name
    pub key: String,
    /// The ncpkms:v{N}:… signature
    #[arg(long, value_name = "SIG")]
    pub signature: String,
    /// RSA signature scheme (ECDSA keys ignore it)
    #[arg(long, default_value = "pss", value_parser = choice(&SCHEMES, scheme_name))]
    pub scheme: SignScheme,
    #[command(flatten)]
    pub input: InputArg,
}

#[derive(Debug, Args)]
pub struct PublicKeyArgs {
    /// Key tag or name
    pub key: String,
    /// Version number [default: current]
    #[arg(long, value_name = "N")]
    pub version: Option<u32>,
}

#[derive(Debug, Args)]
pub struct DataKeyArgs {
    /// Key tag or name
    pub key: String,
    /// Size of the data key
    #[arg(
        long,
        default_value = "256",
        value_parser = PossibleValuesParser::new(["128", "256", "512"]).try_map(|s| s.parse::<u32>())
    )]
    pub bits: u32,
    /// Also print the data key itself (base64), on a second line
    #[arg(long)]
    pub plaintext: bool,
    /// Context bound to the wrapped data key
    #[arg(long, value_name = "TEXT")]
    pub context: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherOp {
    Encrypt,
    Decrypt,
    Reencrypt,
}

pub async fn cipher(ctx: &mut Ctx, op: CipherOp, a: CipherArgs) -> CmdResult {
    let context = a.context.as_deref().map(str::as_bytes);
    if a.batch {
        return batch(ctx, op, &a.key, context, &a.input).await;
    }
    let c = &ctx.client;
    match op {
        CipherOp::Encrypt => {
            let ct = c
                .encrypt(&a.key, a.input.read()?.as_slice(), context)
                .await?;
            ctx.out.ncpkms("ciphertext", &ct)?;
        }
        CipherOp::Reencrypt => {
            let ct = c.reencrypt(&a.key, &a.input.read_text()?, context).await?;
            ctx.out.ncpkms("ciphertext", &ct)?;
        }
        CipherOp::Decrypt => {
            let pt = c.decrypt(&a.key, &a.input.read_text()?, context).await?;
            if ctx.out.json {
                let plaintext = secret_b64(&pt);
                secret_io::json_line(&Plaintext {
                    plaintext: &plaintext,
                })?;
            } else {
                secret_io::write_stdout(&pt)?;
            }
        }
    }
    Ok(0)
}

pub async fn sign(ctx: &mut Ctx, a: SignArgs) -> CmdResult {
    let sig = ctx
        .client
        .sign(&a.key, a.input.read()?.as_slice(), a.scheme)
        .await?;
    ctx.out.ncpkms("signature", &sig)?;
    Ok(0)
}

pub async fn verify(ctx: &mut Ctx, a: VerifyArgs) -> CmdResult {
    let message = a.input.read()?;
    let valid = ctx
        .client
        .verify(&a.key, message.as_slice(), a.signature.trim(), a.scheme)
        .await?;
    let code = if valid { 0 } else { 1 };
    let shown = ctx.out.emit(
        || json!({ "valid": valid }),
        || if valid { "valid\n" } else { "invalid\n" },
    );
    // A script that only reads the exit code (`… | true`) still learns the verdict.
    super::keep_code_if_unread(code, shown)
}

pub async fn public_key(ctx: &mut Ctx, a: PublicKeyArgs) -> CmdResult {
    let (version, pem) = ctx.client.public_key(&a.key, a.version).await?;
    ctx.out.emit(
        || json!({"version": version, "pem": pem}),
        || {
            if pem.ends_with('\n') {
                pem.clone()
            } else {
                format!("{pem}\n")
            }
        },
    )?;
    Ok(0)
}

pub async fn data_key(ctx: &mut Ctx, a: DataKeyArgs) -> CmdResult {
    let context = a.context.as_deref().map(str::as_bytes);
    let (ciphertext, plaintext) = ctx
        .client
        .data_key(&a.key, a.bits, a.plaintext, context)
        .await?;
    let plaintext = plaintext.map(|p| secret_b64(&p));
    if ctx.out.json {
        secret_io::json_line(&DataKey {
            bits: a.bits,
            ciphertext: &ciphertext,
            plaintext: plaintext.as_deref().map(String::as_str),
        })?;
    } else {
        let mut text = SecretBuf::default();
        text.push_str(&ciphertext);
        text.push_str("\n");
        if let Some(p) = &plaintext {
            text.push_str(p);
            text.push_str("\n");
        }
        secret_io::write_stdout(text.as_slice())?;
    }
    Ok(0)
}

/// The base64 of a plaintext or data key, wiped when dropped (the encoder sizes the
/// string once, so no outgrown copy is left behind).
fn secret_b64(bytes: &[u8]) -> Zeroizing<String> {
    Zeroizing::new(STANDARD.encode(bytes))
}

/// `decrypt --json`'s line, serialised without an owned copy of the plaintext.
#[derive(Serialize)]
struct Plaintext<'a> {
    plaintext: &'a str,
}

/// `data-key --json`'s line (fields in the order `json!` sorts them, as before).
#[derive(Serialize)]
struct DataKey<'a> {
    bits: u32,
    ciphertext: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext: Option<&'a str>,
}

/// Payload bytes per batch request: half the daemon's default frame limit, which leaves
/// room for the MessagePack framing; less to a daemon that says it reads less
/// ([`batch_bytes`]).
const BATCH_BYTES: usize = DEFAULT_MAX_FRAME as usize / 2;

/// Payload bytes per batch request to a daemon that reads frames of up to `max_frame`
/// bytes (a daemon configured lower closed the connection on every batch): its frame
/// less room for the request around the items (the key's name, the frame's own fields;
/// each item's own framing is counted with it, [`ITEM_OVERHEAD`]).
fn batch_bytes(max_frame: u32) -> usize {
    const ENVELOPE: usize = 1024;
    BATCH_BYTES.min((max_frame as usize).saturating_sub(ENVELOPE))
}
/// A generous bound on the MessagePack bytes around one item (map keys, length prefixes).
const ITEM_OVERHEAD: usize = 48;

/// One input line of a batch, ready to send.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    Plain(Vec<u8>),
    Cipher(String),
}

impl Item {
    fn cost(&self, context_len: usize) -> usize {
        ITEM_OVERHEAD
            + context_len
            + match self {
                Item::Plain(b) => b.len(),
                Item::Cipher(s) => s.len(),
            }
    }
}

/// Reads one batch line: base64 of a plaintext for encrypt, a ciphertext otherwise. An
/// item too big for any request is refused here, since no request could carry it.
pub fn parse_line(
    op: CipherOp,
    line: &[u8],
    context_len: usize,
    limit: usize,
) -> Result<Item, WireError> {
    let line = line.trim_ascii();
    let item = match op {
        CipherOp::Encrypt => STANDARD.decode(line).map(Item::Plain).map_err(|_| {
            WireError::new(
                ErrorKind::InvalidArgument,
                "an encrypt --batch line is the standard base64 of one plaintext",
            )
        })?,
        CipherOp::Decrypt | CipherOp::Reencrypt => std::str::from_utf8(line)
            .map(|s| Item::Cipher(s.to_owned()))
            .map_err(|_| {
                WireError::new(ErrorKind::InvalidArgument, "the line is not UTF-8 text")
            })?,
    };
    if item.cost(context_len) > limit {
        return Err(item_too_large(limit));
    }
    Ok(item)
}

fn item_too_large(limit: usize) -> WireError {
    WireError::new(
        ErrorKind::TooLarge,
        format!("the item is larger than one request may carry ({limit} bytes)"),
    )
}

/// The lines read since the last request.
#[derive(Debug, Default)]
struct Chunk {
    /// Payload bytes a request may carry.
    limit: usize,
    /// One per line, in order: `None` where the item was queued, else why it was not.
    slots: Vec<Option<WireError>>,
    // Only the vector of the batch's operation is ever filled.
    plain: Vec<PlaintextItem>,
    cipher: Vec<CiphertextItem>,
    bytes: usize,
}

impl Chunk {
    fn new(limit: usize) -> Chunk {
        Chunk {
            limit,
            ..Chunk::default()
        }
    }

    fn has_room(&self, next: &Result<Item, WireError>, context_len: usize) -> bool {
        self.slots.len() < MAX_BATCH_ITEMS
            && match next {
                Ok(item) => self.bytes + item.cost(context_len) <= self.limit,
                Err(_) => true,
            }
    }

    fn push(&mut self, next: Result<Item, WireError>, context: Option<&[u8]>) {
        let item = match next {
            Ok(item) => item,
            Err(e) => return self.slots.push(Some(e)),
        };
        self.bytes += item.cost(context.map_or(0, <[u8]>::len));
        self.slots.push(None);
        let context = context.map(<[u8]>::to_vec);
        match item {
            Item::Plain(plaintext) => self.plain.push(PlaintextItem {
                plaintext: plaintext.into(),
                context,
            }),
            Item::Cipher(ciphertext) => self.cipher.push(CiphertextItem {
                ciphertext,
                context,
            }),
        }
    }
}

/// Streams the input in requests of at most [`MAX_BATCH_ITEMS`] items and
/// [`batch_bytes`] bytes, printing each request's results before reading on.
async fn batch(
    ctx: &mut Ctx,
    op: CipherOp,
    key: &str,
    context: Option<&[u8]>,
    input: &InputArg,
) -> CmdResult {
    let limit = batch_bytes(ctx.client.max_request_frame());
    // A line is the base64 of an item for encrypt: a third longer than the item.
    let mut lines = secret_io::LineReader::new(input.open()?, limit / 3 * 4 + 8);
    let context_len = context.map_or(0, <[u8]>::len);
    let mut chunk = Chunk::new(limit);
    let mut first_failure = None;
    let mut line = SecretBuf::default();
    loop {
        let next = match lines
            .next_line(&mut line)
            .map_err(|e| input.read_error(e))?
        {
            secret_io::Next::Line => Some(parse_line(op, line.as_slice(), context_len, limit)),
            secret_io::Next::TooLong => Some(Err(item_too_large(limit))),
            secret_io::Next::End => None,
        };
        if next
            .as_ref()
            .is_none_or(|next| !chunk.has_room(next, context_len))
        {
            let full = std::mem::replace(&mut chunk, Chunk::new(limit));
            if let Err(e) = flush(ctx, op, key, full, &mut first_failure).await {
                // Nobody reads the results (a broken pipe): stop, keeping the exit code
                // of the first failed item.
                return super::keep_code_if_unread(first_failure.unwrap_or(0), Err(e));
            }
        }
        match next {
            Some(next) => chunk.push(next, context),
            None => return Ok(first_failure.unwrap_or(0)),
        }
    }
}

/// Sends a chunk's items and prints one line per input line; records the exit code of
/// the first failed item in `first_failure`, unless one is there already.
async fn flush(
    ctx: &mut Ctx,
    op: CipherOp,
    key: &str,
    chunk: Chunk,
    first_failure: &mut Option<u8>,
) -> Result<(), CtlError> {
    if chunk.slots.is_empty() {
        return Ok(());
    }
    let c = &ctx.client;
    let results = match op {
        _ if chunk.plain.is_empty() && chunk.cipher.is_empty() => Vec::new(),
        CipherOp::Encrypt => c.encrypt_batch(key, chunk.plain).await?,
        CipherOp::Decrypt => c.decrypt_batch(key, chunk.cipher).await?,
        CipherOp::Reencrypt => c.reencrypt_batch(key, chunk.cipher).await?,
    };
    let mut results = results.into_iter();
    let mut text = SecretBuf::default();
    for slot in chunk.slots {
        let outcome = match slot {
            Some(e) => ItemOutcome::Err(e),
            None => results.next().unwrap_or_else(|| {
                ItemOutcome::Err(WireError::new(
                    ErrorKind::Internal,
                    "kmsd returned fewer results than items",
                ))
            }),
        };
        if let ItemOutcome::Err(e) = &outcome {
            *first_failure = first_failure.or(Some(e.kind.exit_code()));
        }
        push_outcome_line(&mut text, ctx.out.json, &outcome)?;
        text.push_str("\n");
    }
    secret_io::write_stdout(text.as_slice())?;
    Ok(())
}

/// One batch result as its output line (without the newline), onto `out`.
pub fn push_outcome_line(out: &mut SecretBuf, json: bool, outcome: &ItemOutcome) -> io::Result<()> {
    match outcome {
        ItemOutcome::Ciphertext(c) if !json => out.push_str(c),
        ItemOutcome::Plaintext(p) if !json => out.push_str(&secret_b64(p)),
        ItemOutcome::Err(e) if !json => out.push_str(&output::wire_error_line(e)),
        ItemOutcome::Ciphertext(c) => out.push_str(&json!({ "ciphertext": c }).to_string()),
        ItemOutcome::Plaintext(p) => serde_json::to_writer(
            &mut *out,
            &Plaintext {
                plaintext: &secret_b64(p),
            },
        )?,
        ItemOutcome::Err(e) => {
            out.push_str(&output::error_json(e.kind.as_str(), &e.message).to_string())
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn outcome_line(json: bool, outcome: &ItemOutcome) -> String {
        let mut line = SecretBuf::default();
        push_outcome_line(&mut line, json, outcome).unwrap();
        String::from_utf8(line.as_slice().to_vec()).unwrap()
    }

    /// Encrypt lines are base64 of any bytes; ciphertext lines are trimmed text; bad
    /// lines become per-item errors instead of aborting the batch.
    #[test]
    fn batch_lines() {
        use CipherOp::*;
        assert_eq!(
            parse_line(Encrypt, b"aGk=\n", 0, BATCH_BYTES),
            Ok(Item::Plain(b"hi".to_vec()))
        );
        assert_eq!(
            parse_line(Encrypt, b"AAEK/w==\r\n", 0, BATCH_BYTES),
            Ok(Item::Plain(vec![0, 1, 10, 255]))
        );
        assert_eq!(
            parse_line(Encrypt, b"\n", 0, BATCH_BYTES),
            Ok(Item::Plain(vec![]))
        );
        let bad = parse_line(Encrypt, b"hello world\n", 0, BATCH_BYTES).unwrap_err();
        assert_eq!(bad.kind, ErrorKind::InvalidArgument);
        assert_eq!(
            parse_line(Decrypt, b"  ncpkms:v1:AA==\t\n", 0, BATCH_BYTES),
            Ok(Item::Cipher("ncpkms:v1:AA==".into()))
        );
        assert_eq!(
            parse_line(Reencrypt, b"\xff\xfe\n", 0, BATCH_BYTES)
                .unwrap_err()
                .kind,
            ErrorKind::InvalidArgument
        );
        let huge = STANDARD.encode(vec![0u8; BATCH_BYTES]);
        assert_eq!(
            parse_line(Encrypt, huge.as_bytes(), 0, BATCH_BYTES)
                .unwrap_err()
                .kind,
            ErrorKind::TooLarge
        );
    }

    /// A chunk closes at MAX_BATCH_ITEMS lines or BATCH_BYTES of payload.
    #[test]
    fn chunk_limits() {
        let mut chunk = Chunk::new(BATCH_BYTES);
        let small = || Ok(Item::Cipher("ncpkms:v1:AA==".into()));
        for _ in 0..MAX_BATCH_ITEMS {
            assert!(chunk.has_room(&small(), 10));
            chunk.push(small(), Some(b"0123456789"));
        }
        assert!(!chunk.has_room(&small(), 10));
        assert_eq!(chunk.cipher.len(), MAX_BATCH_ITEMS);
        assert!(chunk.plain.is_empty());

        let mut chunk = Chunk::new(BATCH_BYTES);
        let big = || Ok(Item::Plain(vec![0; 32 * 1024]));
        let mut n = 0;
        while chunk.has_room(&big(), 0) {
            chunk.push(big(), None);
            n += 1;
        }
        assert_eq!(n, BATCH_BYTES / (32 * 1024 + ITEM_OVERHEAD));
        assert!(chunk.has_room(&Err(WireError::new(ErrorKind::TooLarge, "x")), 0));
    }

    /// Result lines: bare values, `error: kind: message`, or one JSON object per line.
    #[test]
    fn result_lines() {
        let ct = ItemOutcome::Ciphertext("ncpkms:v2:AA==".into());
        let pt = ItemOutcome::Plaintext(b"hi".to_vec().into());
        let err = ItemOutcome::Err(WireError::new(ErrorKind::DecryptFailed, "tampered"));
        assert_eq!(outcome_line(false, &ct), "ncpkms:v2:AA==");
        assert_eq!(outcome_line(false, &pt), "aGk=");
        assert_eq!(outcome_line(false, &err), "error: decrypt-failed: tampered");
        assert_eq!(
            outcome_line(true, &ct),
            r#"{"ciphertext":"ncpkms:v2:AA=="}"#
        );
        assert_eq!(outcome_line(true, &pt), r#"{"plaintext":"aGk="}"#);
        assert_eq!(
            outcome_line(true, &err),
            r#"{"error":{"kind":"decrypt-failed","message":"tampered"}}"#
        );
    }
}
