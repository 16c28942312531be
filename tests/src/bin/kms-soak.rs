//! kms-soak: long mixed load against a real kmsd (SPEC §14). Several clients encrypt,
//! decrypt, re-encrypt, make data keys, sign and verify (ECDSA and RSA), read keys,
//! versions and history; one reconnects every 20 calls; every 30 s a key is rotated and
//! another created, used, deleted and purged. Every 10 s the daemon's RSS (`VmRSS` of /proc/PID/status)
//! and open file descriptors (/proc/PID/fd) are sampled. At the end it prints the RSS
//! after warm-up and at the end (growth %), the descriptor counts, and the errors, and
//! fails if any call failed, descriptors drifted or RSS grew more than allowed.
//!
//! ```text
//! cargo build --release --workspace
//! target/release/kms-soak [--minutes 30] [--seconds S] [--warmup-secs 180]
//!                         [--sample-secs 10] [--max-rss-growth 10] [--json]
//! ```

use anyhow::{Context, bail};
use kms_e2e::{DaemonOptions, TestDaemon};
use kms_shared::client::Client;
use kms_shared::model::{KeyType, SignScheme};
use kms_shared::protocol::{CreateKey, HistoryQuery};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: kms-soak [--minutes M | --seconds S] [--warmup-secs S] \
                     [--sample-secs S] [--max-rss-growth PCT] [--json]";

#[derive(Debug, Clone)]
struct Opts {
    duration: Duration,
    warmup: Duration,
    sample: Duration,
    max_rss_growth: f64,
    json: bool,
}

fn parse_args() -> anyhow::Result<Opts> {
    let mut o = Opts {
        duration: Duration::from_secs(30 * 60),
        // The store's page cache (16 MiB) fills in about two minutes of this load.
        warmup: Duration::from_secs(180),
        sample: Duration::from_secs(10),
        max_rss_growth: 10.0,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> anyhow::Result<f64> {
            args.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))?
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .with_context(|| format!("{name} needs a non-negative number\n{USAGE}"))
        };
        match a.as_str() {
            "--minutes" => o.duration = Duration::from_secs_f64(value("--minutes")? * 60.0),
            "--seconds" => o.duration = Duration::from_secs_f64(value("--seconds")?),
            "--warmup-secs" => o.warmup = Duration::from_secs_f64(value("--warmup-secs")?),
            "--sample-secs" => {
                o.sample = Duration::from_secs_f64(value("--sample-secs")?.max(0.1));
            }
            "--max-rss-growth" => o.max_rss_growth = value("--max-rss-growth")?,
            "--json" => o.json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if o.warmup >= o.duration {
        o.warmup = o.duration / 4;
    }
    Ok(o)
}

/// One sample of the daemon process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_s: f64,
    rss_kb: u64,
    fds: u64,
    ops: u64,
}

fn sample(pid: u32, started: Instant, ops: u64) -> anyhow::Result<Sample> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).context("the daemon is gone")?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .context("cannot list the daemon's descriptors")?
        .count() as u64;
    Ok(Sample {
        at_s: started.elapsed().as_secs_f64(),
        rss_kb,
        fds,
        ops,
    })
}

#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    errors: AtomicU64,
    first_errors: Mutex<Vec<String>>,
}

impl Counters {
    fn ok(&self) {
        self.ops.fetch_add(1, Ordering::Relaxed);
    }

    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_errors.lock().unwrap_or_else(|e| e.into_inner());
        if first.len() < 10 {
            first.push(what);
        }
    }
}

fn create(name: &str, key_type: KeyType) -> CreateKey {
    CreateKey {
        memo: "kms-soak".into(),
        ..kms_e2e::key_spec(name, key_type)
    }
}

/// One client's mix; `churn`: reconnect after every few calls.
async fn worker(
    socket: PathBuf,
    id: u64,
    churn: bool,
    stop: Arc<AtomicBool>,
    n: Arc<Counters>,
) -> anyhow::Result<()> {
    let mut c = Client::connect(&socket).await?;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        if churn && i.is_multiple_of(20) {
            // The old connection goes first: opening the new one while the old one was
            // still open put a third descriptor in the daemon for a moment, and a sample
            // taken then read as descriptor drift.
            drop(c);
            c = Client::connect(&socket).await?;
        }
        let r = one_call(&c, id, i).await;
        match r {
            Ok(()) => n.ok(),
            Err(e) => n.error(format!("client {id} call {i}: {e:#}")),
        }
    }
    Ok(())
}

async fn one_call(c: &Client, id: u64, i: u64) -> anyhow::Result<()> {
    let msg = format!("soak client {id} call {i}").into_bytes();
    match i % 10 {
        0..=3 => {
            let ct = c.encrypt("soak-aes", &msg, None).await?;
            anyhow::ensure!(c.decrypt("soak-aes", &ct, None).await? == msg, "decrypt");
            if i % 10 == 3 {
                let again = c.reencrypt("soak-aes", &ct, None).await?;
                anyhow::ensure!(c.decrypt("soak-aes", &again, None).await? == msg);
            }
        }
        4 => {
            let (ct, pt) = c.data_key("soak-aes", 256, true, None).await?;
            let pt = pt.context("no plaintext data key")?;
            anyhow::ensure!(c.decrypt("soak-aes", &ct, None).await? == pt);
        }
        5 | 6 => {
            let sig = c.sign("soak-ec", &msg, SignScheme::Pss).await?;
            anyhow::ensure!(c.verify("soak-ec", &msg, &sig, SignScheme::Pss).await?);
        }
        7 => {
            if i % 50 == 7 {
                let sig = c.sign("soak-rsa", &msg, SignScheme::Pss).await?;
                anyhow::ensure!(c.verify("soak-rsa", &msg, &sig, SignScheme::Pss).await?);
            } else {
                c.get_key("soak-rsa").await?;
            }
        }
        8 => {
            c.history(HistoryQuery {
                key: "soak-aes".into(),
                limit: Some(50),
                ..HistoryQuery::default()
            })
            .await?;
        }
        _ => {
            c.versions("soak-aes").await?;
            c.list_keys(false, 0, Some(50)).await?;
        }
    }
    Ok(())
}

/// Every 30 s: rotate soak-aes (while under 90 versions), create a key, use it, request
/// its deletion and purge it. (A purged key's metadata stays for the retention period,
/// in memory too, so a faster churn would grow the data the daemon must hold.)
async fn lifecycle(socket: PathBuf, stop: Arc<AtomicBool>, n: Arc<Counters>) -> anyhow::Result<()> {
    let c = Client::connect(&socket).await?;
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // Short sleeps, so that the end of the run is noticed at once.
        for _ in 0..300 {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        round += 1;
        let r: anyhow::Result<()> = async {
            let v = c.get_key("soak-aes").await?.current_version;
            if v < 90 {
                c.rotate("soak-aes").await?;
            }
            let name = format!("tmp{round}");
            c.create_key(create(&name, KeyType::Aes256)).await?;
            let ct = c.encrypt(&name, b"short-lived", None).await?;
            anyhow::ensure!(c.decrypt(&name, &ct, None).await? == b"short-lived");
            c.request_deletion(&name).await?;
            c.delete_now(&name).await?;
            Ok(())
        }
        .await;
        match r {
            Ok(()) => n.ok(),
            Err(e) => n.error(format!("lifecycle round {round}: {e:#}")),
        }
    }
    Ok(())
}

async fn run(o: &Opts, d: &TestDaemon) -> anyhow::Result<serde_json::Value> {
    let pid = d.pid().context("no daemon")?;
    {
        let c = d.client().await;
        c.create_key(create("soak-aes", KeyType::Aes256)).await?;
        c.create_key(create("soak-ec", KeyType::Ecdsa)).await?;
        c.create_key(create("soak-rsa", KeyType::Rsa2048)).await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let n = Arc::new(Counters::default());
    let mut tasks = Vec::new();
    for id in 0..4 {
        tasks.push(tokio::spawn(worker(
            d.socket.clone(),
            id,
            id == 3,
            stop.clone(),
            n.clone(),
        )));
    }
    tasks.push(tokio::spawn(lifecycle(
        d.socket.clone(),
        stop.clone(),
        n.clone(),
    )));

    let started = Instant::now();
    let mut samples = vec![sample(pid, started, 0)?];
    let mut warm: Option<Sample> = None;
    while started.elapsed() < o.duration {
        let next = o.sample.min(o.duration.saturating_sub(started.elapsed()));
        tokio::time::sleep(next).await;
        let s = sample(pid, started, n.ops.load(Ordering::Relaxed))?;
        if !o.json {
            println!(
                "{:7.1} s  rss {:7} kB  fds {:3}  ops {}  errors {}",
                s.at_s,
                s.rss_kb,
                s.fds,
                s.ops,
                n.errors.load(Ordering::Relaxed)
            );
        }
        if warm.is_none() && started.elapsed() >= o.warmup {
            warm = Some(s);
        }
        samples.push(s);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let end = *samples.last().context("no sample")?;
    let warm = warm.unwrap_or(end);
    let after_warm: Vec<&Sample> = samples.iter().filter(|s| s.at_s >= warm.at_s).collect();
    let fd_min = after_warm.iter().map(|s| s.fds).min().unwrap_or(0);
    let fd_max = after_warm.iter().map(|s| s.fds).max().unwrap_or(0);
    let rss_max = samples.iter().map(|s| s.rss_kb).max().unwrap_or(0);
    let growth = (end.rss_kb as f64 - warm.rss_kb as f64) * 100.0 / warm.rss_kb.max(1) as f64;
    let errors = n.errors.load(Ordering::Relaxed);
    let ops = n.ops.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    // One client reconnects every 20 calls: at a sample kmsd may have closed the old
    // connection and not yet accepted the new one (one fewer), or accepted the new one
    // before it saw the old one close (one more). A leak of one descriptor per reconnect
    // (hundreds in a run) still shows at once.
    let fds_constant = fd_max - fd_min <= 2;
    let ok = errors == 0 && fds_constant && growth <= o.max_rss_growth;
    Ok(serde_json::json!({
        "ok": ok,
        "seconds": secs,
        "warmup_s": warm.at_s,
        "ops": ops,
        "ops_per_s": ops as f64 / secs,
        "errors": errors,
        "first_errors": *n.first_errors.lock().unwrap_or_else(|e| e.into_inner()),
        "rss_kb": {
            "start": samples[0].rss_kb,
            "after_warmup": warm.rss_kb,
            "end": end.rss_kb,
            "max": rss_max,
        },
        "rss_growth_pct": growth,
        "max_rss_growth_pct": o.max_rss_growth,
        "fds": {
            "start": samples[0].fds,
            "after_warmup": warm.fds,
            "end": end.fds,
            "min_after_warmup": fd_min,
            "max_after_warmup": fd_max,
            "constant": fds_constant,
        },
        "samples": samples.iter().map(|s| serde_json::json!([s.at_s, s.rss_kb, s.fds, s.ops])).collect::<Vec<_>>(),
    }))
}

fn main() -> std::process::ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("kms-soak: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kms-soak: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let options = DaemonOptions {
        env: vec![("KMS_LOG".into(), "warn".into())],
        ..DaemonOptions::default()
    };
    let mut d = TestDaemon::start_with(options.clone());
    match runtime.block_on(run(&o, &d)) {
        Ok(mut report) => {
            // What the store grew to, and what a restart on it costs (kmsd verifies
            // every page of the store when it opens it).
            let store_bytes = std::fs::metadata(d.data_dir.join("kms.redb"))
                .map(|m| m.len())
                .unwrap_or(0);
            let stopped = d.stop();
            let t = Instant::now();
            d.restart_with(options);
            let restart_ms = t.elapsed().as_secs_f64() * 1000.0;
            if let Some(m) = report.as_object_mut() {
                m.insert("store_bytes".into(), store_bytes.into());
                m.insert("stop_exit".into(), stopped.into());
                m.insert("restart_ms".into(), restart_ms.into());
            }
            if o.json {
                println!("{report:#}");
            } else {
                let mut short = report.clone();
                if let Some(m) = short.as_object_mut() {
                    m.remove("samples");
                }
                println!("{short:#}");
            }
            if report["ok"] == true {
                std::process::ExitCode::SUCCESS
            } else {
                eprintln!(
                    "kms-soak: FAILED (errors, descriptor drift or RSS growth); log {}",
                    d.log.display()
                );
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("kms-soak: {e:#}\nlog: {}", log_tail(&d.log));
            std::process::ExitCode::FAILURE
        }
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
