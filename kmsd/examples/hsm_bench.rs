//! Per-operation throughput of `hsm` keys (SoftHSM2 through cryptoki) against `basic`
//! keys (RustCrypto / aws-lc in process), measured on the primitives kmsd calls, without
//! the socket or the history commit.
//!
//! ```text
//! cargo run --release -p kmsd --example hsm_bench [SECONDS_PER_OP]
//! ```
//!
//! Needs `softhsm2-util` and `/usr/lib/softhsm/libsofthsm2.so` (Debian `softhsm2`). With no
//! `SOFTHSM2_CONF` set, it initialises a token in a temporary directory and runs itself
//! again with `SOFTHSM2_CONF` pointing there (SoftHSM2 reads it at initialisation).

use kmsd::crypto::{KeyMaterial, KeyType, SignScheme};
use kmsd::hsm::{HsmKey, Token, object_id};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const LABEL: &str = "kms-bench";
const TAG: &str = "0123456789abcdef0123456789abcdef";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hsm_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let secs: f64 = std::env::args()
        .nth(1)
        .map(|s| {
            s.parse()
                .map_err(|_| format!("not a number of seconds: {s}"))
        })
        .transpose()?
        .unwrap_or(2.0);
    let Some(pin_file) = std::env::var_os("KMS_BENCH_PIN_FILE") else {
        return respawn();
    };
    let token = Arc::new(
        Token::open(
            LABEL.into(),
            Path::new(MODULE),
            LABEL,
            Path::new(&pin_file),
            kmsd::hsm::PinFile::Daemon,
        )
        .map_err(|e| e.to_string())?,
    );
    token.check().map_err(|e| e.to_string())?;
    let per = Duration::from_secs_f64(secs);

    let hsm = |kind: KeyType, version: u32| {
        HsmKey::generate(
            token.clone(),
            kind,
            TAG,
            version,
            object_id(TAG, version),
            format!("bench key {version}"),
        )
        .map_err(|e| e.to_string())
    };
    let basic = |kind| KeyMaterial::generate(kind).map_err(|e| e.to_string());

    let aes_b = basic(KeyType::Aes256)?;
    let aes_b = aes_b.as_aes().ok_or("no AES key")?;
    let aes_h = hsm(KeyType::Aes256, 1)?;
    let ec_b = basic(KeyType::Ecdsa)?;
    let ec_b = ec_b.as_ecdsa().ok_or("no ECDSA key")?;
    let ec_h = hsm(KeyType::Ecdsa, 2)?;
    let rsa_b = basic(KeyType::Rsa2048)?;
    let rsa_b = rsa_b.as_rsa().ok_or("no RSA key")?;
    let rsa_h = hsm(KeyType::Rsa2048, 3)?;

    let aad = b"ncpkms/v1\0bench";
    let pt = vec![0x5a; 1024];
    let msg = vec![0x42; 256];
    let aes_ct_b = aes_b.encrypt_random(aad, &pt).map_err(|e| e.to_string())?;
    let aes_ct_h = aes_h.encrypt_aes(aad, &pt).map_err(|e| e.to_string())?;
    let rsa_ct = rsa_b.encrypt(&msg[..190]).map_err(|e| e.to_string())?;
    let rsa_ct_h = rsa_h.rsa_encrypt(&msg[..190]).map_err(|e| e.to_string())?;
    let ec_sig_b = ec_b.sign(&msg).map_err(|e| e.to_string())?;
    let ec_sig_h = ec_h
        .sign(SignScheme::Pss, &msg)
        .map_err(|e| e.to_string())?;

    println!("operation (one thread)         basic ops/s    hsm ops/s   hsm/basic");
    let row = |name: &str, b: &mut dyn FnMut() -> bool, h: &mut dyn FnMut() -> bool| {
        let rb = rate(per, b);
        let rh = rate(per, h);
        println!("{name:<30} {rb:>11.0} {rh:>12.0} {:>10.3}", rh / rb);
    };
    row(
        "AES-256-GCM encrypt 1 KiB",
        &mut || aes_b.encrypt_random(aad, &pt).is_ok(),
        &mut || aes_h.encrypt_aes(aad, &pt).is_ok(),
    );
    row(
        "AES-256-GCM decrypt 1 KiB",
        &mut || aes_b.decrypt(aad, &aes_ct_b).is_ok(),
        &mut || aes_h.decrypt_aes(aad, &aes_ct_h).is_ok(),
    );
    row(
        "ECDSA P-256 sign",
        &mut || ec_b.sign(&msg).is_ok(),
        &mut || ec_h.sign(SignScheme::Pss, &msg).is_ok(),
    );
    row(
        "ECDSA P-256 verify (software)",
        &mut || ec_b.verify(&msg, &ec_sig_b),
        &mut || ec_h.verify(SignScheme::Pss, &msg, &ec_sig_h),
    );
    row(
        "RSA-2048 PSS sign",
        &mut || rsa_b.sign(SignScheme::Pss, &msg).is_ok(),
        &mut || rsa_h.sign(SignScheme::Pss, &msg).is_ok(),
    );
    row(
        "RSA-2048 PKCS#1 v1.5 sign",
        &mut || rsa_b.sign(SignScheme::Pkcs1, &msg).is_ok(),
        &mut || rsa_h.sign(SignScheme::Pkcs1, &msg).is_ok(),
    );
    row(
        "RSA-2048 OAEP encrypt (public)",
        &mut || rsa_b.encrypt(&msg[..190]).is_ok(),
        &mut || rsa_h.rsa_encrypt(&msg[..190]).is_ok(),
    );
    row(
        "RSA-2048 OAEP decrypt",
        &mut || rsa_b.decrypt(&rsa_ct).is_ok(),
        &mut || rsa_h.rsa_decrypt(&rsa_ct_h).is_ok(),
    );
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed() < per {
        hsm(KeyType::Aes256, 10 + n)?;
        n += 1;
    }
    println!(
        "{:<30} {:>11} {:>12.1}",
        "key generation AES (token)",
        "-",
        f64::from(n) / t.elapsed().as_secs_f64()
    );
    for v in [1, 2, 3].into_iter().chain(10..10 + n) {
        kmsd::hsm::key::destroy(&token, &object_id(TAG, v)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Calls `f` for `per` and returns calls per second; a failed call aborts the run.
fn rate(per: Duration, f: &mut dyn FnMut() -> bool) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < per {
        for _ in 0..16 {
            assert!(f(), "an operation failed");
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Initialises a SoftHSM2 token in a temporary directory and runs this program again
/// with `SOFTHSM2_CONF` set (the environment of this process is not changed: that would
/// need `unsafe`).
fn respawn() -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("kms-hsm-bench-{}", std::process::id()));
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(|e| e.to_string())?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let pin = dir.join("pin");
    std::fs::write(&pin, "bench-1234\n").map_err(|e| e.to_string())?;
    let init = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args(["--init-token", "--free", "--label", LABEL])
        .args(["--pin", "bench-1234", "--so-pin", "bench-so-5678"])
        .output()
        .map_err(|e| format!("softhsm2-util (apt-get install softhsm2): {e}"))?;
    if !init.status.success() {
        return Err(String::from_utf8_lossy(&init.stderr).into_owned());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let status = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("SOFTHSM2_CONF", &conf)
        .env("KMS_BENCH_PIN_FILE", &pin)
        .status()
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    if status.success() {
        Ok(())
    } else {
        Err(format!("the benchmark exited with {status}"))
    }
}
