//! Envelope encryption with kms from a Rust program.
//!
//! kms keeps the key-encryption key; the program asks it for a fresh data key, encrypts
//! its data locally with that data key (AES-256-GCM), and stores only the data key's
//! wrapped form beside the data. To read the data back it asks kms to unwrap the data key.
//! kms never sees the data, and a plaintext data key lives in the program only as a
//! [`Secret`], wiped from memory when dropped.
//!
//! ```sh
//! cargo run -p kms-shared --example envelope -- "some text"
//! cargo run -p kms-shared --example envelope -- --socket /run/kms/kmsd.sock "some text"
//! ```
//!
//! Without `--socket` it connects to the user's own daemon, starting one if none answers,
//! as `kmsctl` does. It creates the AES key `envelope-demo` if there is none, which
//! needs the manager role (the daemon's own account, root, or a grant); using the key
//! needs only key-user.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use kms_shared::client::{ConnectOptions, connect_or_start};
use kms_shared::model::{KeyType, Protection};
use kms_shared::protocol::{CreateKey, ErrorKind, Secret};
use std::path::PathBuf;
use zeroize::Zeroizing;

const KEY: &str = "envelope-demo";
/// Binds the wrapped data key to what it is for: unwrapping it needs the same context.
const CONTEXT: &[u8] = b"example:envelope";
const NONCE_LEN: usize = 12;

type Error = Box<dyn std::error::Error>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Error> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let socket = match args.iter().position(|a| a == "--socket") {
        Some(i) if i + 1 < args.len() => {
            args.remove(i);
            Some(PathBuf::from(args.remove(i)))
        }
        Some(_) => return Err("--socket needs a path".into()),
        None => None,
    };
    let message = args.pop().unwrap_or_else(|| "hello, envelope".into());

    let client = connect_or_start(&ConnectOptions {
        autostart: socket.is_none(),
        socket,
        data_dir: None,
    })
    .await?;
    match client.get_key(KEY).await {
        Ok(_) => {}
        Err(e) if e.kind() == Some(ErrorKind::NotFound) => {
            client
                .create_key(CreateKey {
                    name: KEY.into(),
                    key_type: KeyType::Aes256,
                    protection: Protection::Basic,
                    convergent: false,
                    auto_rotation: true,
                    rotation_days: None,
                    memo: "made by the envelope example".into(),
                    hsm: None,
                })
                .await?;
            println!("created key {KEY}");
        }
        Err(e) => return Err(e.into()),
    }

    // Writing: a fresh data key, used once, then dropped (and wiped).
    let (wrapped_key, data_key) = client.data_key(KEY, 256, true, Some(CONTEXT)).await?;
    let data_key = data_key.ok_or("kmsd sent no plaintext data key")?;
    let sealed = seal(&data_key, message.as_bytes())?;
    drop(data_key);
    println!("wrapped data key: {wrapped_key}");
    println!("sealed data: {} bytes", sealed.len());

    // Reading: kms unwraps the data key (under whichever version of the key wrapped it,
    // even after rotations), the data is opened locally.
    let data_key = client.decrypt(KEY, &wrapped_key, Some(CONTEXT)).await?;
    let opened = open(&data_key, &sealed)?;
    if opened.as_slice() != message.as_bytes() {
        return Err("the data did not survive the round trip".into());
    }
    println!("opened: {}", String::from_utf8_lossy(&opened));
    Ok(())
}

/// AES-256-GCM under the data key: `nonce || ciphertext || tag`, with a random nonce (a
/// data key seals one message here, so a random nonce never repeats under it).
fn seal(data_key: &Secret, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
    let cipher = Aes256Gcm::new_from_slice(data_key).map_err(|_| "a data key of 256 bits")?;
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| format!("no randomness: {e}"))?;
    let payload = Payload {
        msg: plaintext,
        aad: KEY.as_bytes(),
    };
    let sealed = cipher
        .encrypt(&Nonce::from(nonce), payload)
        .map_err(|_| "AES-GCM refused the input")?;
    Ok([nonce.as_slice(), &sealed].concat())
}

/// The inverse of [`seal`]; fails if anything was changed.
fn open(data_key: &Secret, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
    let cipher = Aes256Gcm::new_from_slice(data_key).map_err(|_| "a data key of 256 bits")?;
    if sealed.len() < NONCE_LEN {
        return Err("sealed data too short".into());
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_from(nonce).map_err(|_| "a nonce of 12 bytes")?;
    let payload = Payload {
        msg: body,
        aad: KEY.as_bytes(),
    };
    let plaintext = cipher
        .decrypt(&nonce, payload)
        .map_err(|_| "the sealed data does not open under this data key")?;
    Ok(Zeroizing::new(plaintext))
}
