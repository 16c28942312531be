//! kms-bench: drives a real kmsd over its socket and prints figures (SPEC §13).
//!
//! For each case: ops/s and p50/p99/p99.9 latency of the calls that succeeded (failures
//! count only as errors) with C connections × D requests in flight for S seconds; the
//! same primitive measured in-process in the same run; the echo round trip over the same
//! kind of socket (the floor: the case's request frame, a reply of kmsd's size, the same
//! calls in flight, to an echo server in a process of its own); and the daemon's CPU time
//! and peak RSS. `--compare-ssh-agent` measures ssh-agent's P-256 and RSA-2048 signing
//! over its socket with the same connection counts, each right after its kms case.
//!
//! ```text
//! cargo build --release --workspace
//! target/release/kms-bench [--conns 16] [--depth 1] [--seconds 3] [--cases aes-enc-1k,…]
//!                          [--json] [--smoke] [--socket PATH] [--compare-ssh-agent]
//!                          [--batch ITEMS] [--scale KEYS [--data-dir DIR] [--scale-schema 1]]
//! ```
//!
//! The `*-batch` cases send ITEMS (default 64) operations per call; their ops/s count
//! operations (items), their latencies are per call, and their echo floor moves the same
//! batch frames. CPU is the daemon's user+system time during the case (the echo floor's
//! server is another process).

use anyhow::{Context, bail};
use kms_e2e::{DaemonOptions, TestDaemon};
use kms_shared::client::Client;
use kms_shared::codec;
use kms_shared::model::{KeyType, MAX_BATCH_ITEMS, SignScheme};
use kms_shared::protocol::{
    CiphertextItem, ClientFrame, CreateKey, ItemOutcome, Outcome, PlaintextItem, Request,
    ServerFrame,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone)]
struct Opts {
    conns: usize,
    depth: usize,
    seconds: f64,
    cases: Vec<String>,
    json: bool,
    smoke: bool,
    socket: Option<PathBuf>,
    ssh_agent: bool,
    scale: Option<usize>,
    /// Items per call of the `*-batch` cases.
    batch: usize,
    /// Scale mode: the data directory to populate (kept), or to reuse if it has a store.
    data_dir: Option<PathBuf>,
    /// Scale mode: the store schema to populate (1: the first start measures the upgrade).
    scale_schema: u64,
    /// Internal: run as the echo floor's server on this socket ([`echo_server`]).
    echo_server: Option<PathBuf>,
    /// Internal: the echo server's reply size.
    reply_len: usize,
}

const USAGE: &str = "\
kms-bench: drives a real kmsd over its socket and prints ops/s, p50/p99/p99.9 latency,
the primitive in-process, the echo floor, the daemon's CPU and peak RSS per case, and
what one durable journal record costs on this machine.

usage: kms-bench [--conns 16] [--depth 1] [--seconds 3] [--cases CASE,...] [--json]
                 [--smoke] [--socket PATH] [--compare-ssh-agent] [--batch ITEMS]
       kms-bench --scale KEYS [--data-dir DIR] [--scale-schema 1]
";

const ALL_CASES: &[&str] = &[
    "aes-enc-1k",
    "aes-dec-1k",
    "aes-enc-1k-batch",
    "aes-dec-1k-batch",
    "aes-enc-32k",
    "aes-dec-32k",
    "conv-enc-1k",
    "ecdsa-sign",
    "ecdsa-verify",
    "rsa-sign",
    "rsa-dec",
    "rsa-enc",
    "data-key",
    "reencrypt",
    "mixed",
    "rotate",
    "create",
];

fn parse_args() -> anyhow::Result<Opts> {
    let mut o = Opts {
        conns: 16,
        depth: 1,
        seconds: 3.0,
        cases: ALL_CASES.iter().map(|s| s.to_string()).collect(),
        json: false,
        smoke: false,
        socket: None,
        ssh_agent: false,
        scale: None,
        batch: 64,
        data_dir: None,
        scale_schema: kmsd::store::SCHEMA_VERSION,
        echo_server: None,
        reply_len: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--conns" => o.conns = val()?.parse()?,
            // The echo floor keeps that many frames queued in its server (1,024 at most).
            "--depth" => o.depth = val()?.parse::<usize>()?.clamp(1, 512),
            "--seconds" => o.seconds = val()?.parse()?,
            "--cases" => o.cases = val()?.split(',').map(str::to_string).collect(),
            "--json" => o.json = true,
            "--smoke" => o.smoke = true,
            "--socket" => o.socket = Some(PathBuf::from(val()?)),
            "--compare-ssh-agent" => o.ssh_agent = true,
            "--scale" => o.scale = Some(val()?.parse()?),
            "--scale-schema" => o.scale_schema = val()?.parse()?,
            "--data-dir" => o.data_dir = Some(PathBuf::from(val()?)),
            "--batch" => o.batch = val()?.parse::<usize>()?.clamp(1, MAX_BATCH_ITEMS),
            "--echo-server" => o.echo_server = Some(PathBuf::from(val()?)),
            "--reply-len" => o.reply_len = val()?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}cases: {}", ALL_CASES.join(","));
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    for c in &o.cases {
        if !ALL_CASES.contains(&c.as_str()) {
            bail!("unknown case {c}; cases: {}", ALL_CASES.join(","));
        }
    }
    Ok(o)
}

/// Latency samples in microseconds of the calls that succeeded, and the wall time they
/// took. A failed call is counted in `errors` and nowhere else: it adds nothing to ops/s
/// or to the percentiles.
struct Run {
    lat_us: Vec<u32>,
    elapsed: Duration,
    errors: u64,
    /// CPU time of this benchmark process while it drove the case: the client's share
    /// of the two cores it and the daemon compete for.
    client_cpu_s: f64,
}

impl Run {
    fn ops_per_s(&self) -> f64 {
        self.lat_us.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn pct(&mut self, p: f64) -> u32 {
        if self.lat_us.is_empty() {
            return 0;
        }
        self.lat_us.sort_unstable();
        let i = ((self.lat_us.len() as f64 - 1.0) * p).round() as usize;
        self.lat_us[i]
    }
}

/// Runs `op` from `conns` connections with `depth` calls in flight each, for `limit`.
async fn drive<F, Fut>(clients: &[Arc<Client>], depth: usize, limit: Limit, op: F) -> Run
where
    F: Fn(Arc<Client>, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let start = Instant::now();
    let cpu_before = own_cpu_s();
    let mut tasks = tokio::task::JoinSet::new();
    let per_task_ops = limit.per_task(clients.len() * depth);
    let deadline = limit.deadline(start);
    for (ci, c) in clients.iter().enumerate() {
        for di in 0..depth {
            let (c, op) = (c.clone(), op.clone());
            let seed = (ci * depth + di) as u64 * 1_000_003;
            tasks.spawn(async move {
                let mut lat = Vec::with_capacity(4096);
                let mut errors = 0;
                let mut i = 0u64;
                while i < per_task_ops && deadline.is_none_or(|d| Instant::now() < d) {
                    let t = Instant::now();
                    match op(c.clone(), seed + i).await {
                        Ok(()) => {
                            lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32)
                        }
                        Err(_) => errors += 1,
                    }
                    i += 1;
                }
                (lat, errors)
            });
        }
    }
    let mut run = Run {
        lat_us: Vec::new(),
        elapsed: Duration::ZERO,
        errors: 0,
        client_cpu_s: 0.0,
    };
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((lat, errors)) => {
                run.lat_us.extend(lat);
                run.errors += errors;
            }
            // A client task that panicked: its calls are lost, and counted as one error
            // so that the run does not look clean.
            Err(_) => run.errors += 1,
        }
    }
    run.elapsed = start.elapsed();
    run.client_cpu_s = own_cpu_s() - cpu_before;
    run
}

/// CPU seconds of this process so far, threads that have exited included (a sum over
/// `/proc/self/task` loses a thread's time when it ends and can go backwards).
fn own_cpu_s() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// CPU seconds of one thread (`/proc/PID/task/TID`): schedstat's first field, in ns.
fn thread_cpu_s(task: &std::path::Path) -> f64 {
    std::fs::read_to_string(task.join("schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |ns| ns / 1e9)
}

#[derive(Debug, Clone, Copy)]
enum Limit {
    Time(Duration),
    Ops(u64),
    /// At most this many operations, within this time.
    OpsWithin(u64, Duration),
}

impl Limit {
    /// Operations each of `tasks` loops may do.
    fn per_task(self, tasks: usize) -> u64 {
        match self {
            Limit::Ops(n) | Limit::OpsWithin(n, _) => (n / tasks.max(1) as u64).max(1),
            Limit::Time(_) => u64::MAX,
        }
    }

    /// When the loops stop starting operations.
    fn deadline(self, start: Instant) -> Option<Instant> {
        match self {
            Limit::Time(d) | Limit::OpsWithin(_, d) => Some(start + d),
            Limit::Ops(_) => None,
        }
    }
}

/// A primitive measured in-process, in the same run as the daemon case.
#[derive(Debug, Clone, Copy)]
struct InProc {
    /// Ops/s on one thread.
    one: f64,
    /// Ops/s of `threads` threads running it at once: what this machine's cores give
    /// together, which on a shared or virtual machine is less than `one × threads`.
    all: f64,
    threads: usize,
}

/// Runs `f` for `seconds` on one thread, then for `seconds` on every core at once.
fn inproc(seconds: f64, f: impl Fn(u64) + Sync) -> InProc {
    let run = |f: &(dyn Fn(u64) + Sync)| {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            for _ in 0..16 {
                f(n);
                n += 1;
            }
        }
        n as f64 / start.elapsed().as_secs_f64()
    };
    let one = run(&f);
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let all = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(|| run(&f))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(0.0))
            .sum::<f64>()
    });
    InProc { one, all, threads }
}

/// The echo server of the floor (`--echo-server PATH --reply-len N`, run as a process of
/// its own, as kmsd is): it reads frames as kmsd reads them (buffered, 16 KiB at a time)
/// and answers each with a frame of N bytes, the size of kmsd's reply, from a writer task
/// of its own, as kmsd's connections do.
async fn echo_server(path: PathBuf, reply_len: usize) -> anyhow::Result<()> {
    let listener = tokio::net::UnixListener::bind(&path)?;
    // Its stdin is a pipe from the benchmark: closed, the benchmark is gone.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let mut reply = (reply_len as u32).to_be_bytes().to_vec();
    reply.resize(4 + reply_len, 0x5a);
    let reply = Arc::new(reply);
    loop {
        let (s, _) = listener.accept().await?;
        let reply = reply.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut r = tokio::io::BufReader::with_capacity(16 * 1024, r);
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Arc<Vec<u8>>>(1024);
            tokio::spawn(async move {
                while let Some(f) = rx.recv().await {
                    if w.write_all(&f).await.is_err() {
                        break;
                    }
                }
            });
            while let Ok(Some(_)) = codec::read_frame(&mut r, u32::MAX).await {
                if tx.send(reply.clone()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// The echo floor: round trips of the case's request frame and a reply frame of kmsd's
/// reply size, over the same kind of socket to a server in a process of its own
/// ([`echo_server`]), with the case's connections and calls in flight on each (pipelined
/// on one connection, as the client library does). What it leaves out is the client
/// library's own work (encoding, matching replies to calls) and everything kmsd does.
async fn echo_floor(
    conns: usize,
    depth: usize,
    frame_len: usize,
    reply_len: usize,
    limit: Limit,
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("echo.sock");
    // Killed when dropped; and it exits by itself when its stdin closes, should this
    // process be killed first.
    let _server = KillOnDrop(
        std::process::Command::new(std::env::current_exe()?)
            .arg("--echo-server")
            .arg(&path)
            .args(["--reply-len", &reply_len.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting the echo server")?,
    );
    async {
        let mut waited = 0;
        while tokio::net::UnixStream::connect(&path).await.is_err() {
            anyhow::ensure!(waited < 500, "the echo server did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        let mut frame = (frame_len as u32).to_be_bytes().to_vec();
        frame.resize(4 + frame_len, 0x5a);
        let frame = Arc::new(frame);
        let start = Instant::now();
        let per_conn = limit.per_task(conns);
        let deadline = limit.deadline(start);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..conns {
            let (path, frame) = (path.clone(), frame.clone());
            tasks.spawn(async move {
                let s = tokio::net::UnixStream::connect(&path).await?;
                let (mut r, mut w) = s.into_split();
                let more =
                    |sent: u64| sent < per_conn && deadline.is_none_or(|d| Instant::now() < d);
                let mut sent = 0u64;
                while sent < depth as u64 && more(sent) {
                    w.write_all(&frame).await?;
                    sent += 1;
                }
                let mut reply = vec![0u8; 4 + reply_len];
                let mut answered = 0u64;
                while answered < sent {
                    r.read_exact(&mut reply).await?;
                    answered += 1;
                    if more(sent) {
                        w.write_all(&frame).await?;
                        sent += 1;
                    }
                }
                Ok::<_, std::io::Error>(answered)
            });
        }
        let mut total = 0u64;
        while let Some(r) = tasks.join_next().await {
            total += r??;
        }
        Ok(total as f64 / start.elapsed().as_secs_f64())
    }
    .await
}

/// A child process killed (and reaped) when this is dropped, on every way out.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one durable group of calls costs on this machine: kmsd's own call journal
/// appending records of `CALLS_PER_RECORD` encrypt calls (history entry and counters each)
/// on a file in the system's temporary directory, timed by wall clock and by this thread's
/// CPU clock. Every answered crypto call waits for one such append, shared with the other
/// calls of its group; the wall time bounds calls/s at a given number in flight, the CPU
/// time is what the group pays before any crypto or IPC.
fn journal_cost(o: &Opts, seconds: f64) -> anyhow::Result<()> {
    use kmsd::store::journal::{self, CallOp, Journal};
    const CALLS_PER_RECORD: usize = 8;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kms.redb.journal");
    let generation = journal::new_generation()?;
    let mut j = Journal::open(&path, generation)?;
    let ops: Vec<CallOp> = (0..CALLS_PER_RECORD as u64)
        .flat_map(|i| {
            let tag = format!("{:032x}", i % 2);
            let record = kmsd::store::records::HistoryRecord {
                time: 1_764_000_000_000,
                action: kms_shared::model::Action::Encrypt,
                version: Some(1),
                result: "ok".into(),
                account: "bench".into(),
                uid: 1000,
                pid: 4242,
                client: "kms-bench".into(),
                items: 1,
                failed: 0,
            };
            [
                CallOp::History {
                    tag: tag.clone(),
                    seq: i,
                    record,
                },
                CallOp::Use {
                    tag: tag.clone(),
                    at: 1_764_000_000_000,
                    account: "bench".into(),
                    n: 1,
                },
                CallOp::Encryptions {
                    tag,
                    version: 1,
                    n: 1,
                },
            ]
        })
        .collect();
    let thread_cpu = || {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    };
    let (start, cpu_start) = (Instant::now(), thread_cpu());
    let mut lat = Vec::new();
    while start.elapsed().as_secs_f64() < seconds {
        if j.used() >= journal::CAPACITY / 2 {
            j.restart(generation);
        }
        let t = Instant::now();
        j.append(&ops)?;
        lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    let appends = lat.len();
    let cpu_us = (thread_cpu() - cpu_start).as_secs_f64() * 1e6 / appends as f64;
    let mut run = Run::from(lat);
    let (p50, p99) = (run.pct(0.50), run.pct(0.99));
    if o.json {
        println!(
            "{}",
            serde_json::json!({
                "op": "journal-append",
                "calls_per_record": CALLS_PER_RECORD,
                "appends": appends,
                "direct_io": j.is_direct(),
                "p50_us": p50,
                "p99_us": p99,
                "cpu_us_per_append": cpu_us,
            })
        );
    } else {
        println!(
            "journal append ({CALLS_PER_RECORD} calls, durable{}): p50 {p50} µs  p99 {p99} µs  \
             cpu {cpu_us:.1} µs per append  ({appends} appends)",
            if j.is_direct() { ", direct I/O" } else { "" }
        );
    }
    Ok(())
}

/// A batch call succeeds when every item did.
fn all_ok(items: Vec<ItemOutcome>) -> anyhow::Result<()> {
    match items.iter().find(|i| matches!(i, ItemOutcome::Err(_))) {
        Some(e) => bail!("batch item failed: {e:?}"),
        None => Ok(()),
    }
}

/// The size of an encoded request frame, for the echo floor.
fn frame_len(request: Request) -> usize {
    codec::encode(&ClientFrame { id: 1, request })
        .map(|b| b.len())
        .unwrap_or(64)
}

/// The size of kmsd's reply frame to `request`, for the echo floor: the request made once
/// more and its answer encoded as kmsd encodes it (the request's own size if it fails).
async fn reply_len(client: &Client, request: Request) -> usize {
    let fallback = frame_len(request.clone());
    match client.call(request).await {
        Ok(resp) => codec::encode(&ServerFrame::Reply {
            id: 1,
            result: Outcome::Ok(resp),
        })
        .map_or(fallback, |b| b.len()),
        Err(_) => fallback,
    }
}

fn spec(name: &str, t: KeyType, convergent: bool) -> CreateKey {
    CreateKey {
        name: name.into(),
        key_type: t,
        protection: Default::default(),
        convergent,
        auto_rotation: false,
        rotation_days: None,
        memo: String::new(),
        hsm: None,
    }
}

/// utime+stime of a `/proc/.../stat` line, in seconds.
fn stat_cpu_s(stat: &str) -> f64 {
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // USER_HZ is 100 on every Linux ABI kmsd targets.
    let ticks = 100.0;
    fields
        .get(11)
        .zip(fields.get(12))
        .and_then(|(u, s)| Some(u.parse::<f64>().ok()? + s.parse::<f64>().ok()?))
        .map_or(0.0, |t| t / ticks)
}

/// (utime+stime in seconds, peak RSS in KiB) of a process.
fn proc_usage(pid: u32) -> (f64, u64) {
    let cpu = stat_cpu_s(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (cpu, hwm)
}

/// CPU seconds of kmsd's threads by role (the names kmsd gives them): the tokio workers
/// that read, decode and answer requests, the crypto pool, and the store writer (journal
/// records and folds). Where a call's CPU goes is what decides what to make cheaper.
#[derive(Debug, Clone, Copy, Default)]
struct ThreadCpu {
    reactor: f64,
    crypto: f64,
    writer: f64,
    other: f64,
}

impl ThreadCpu {
    fn read(pid: u32) -> ThreadCpu {
        let mut t = ThreadCpu::default();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return t;
        };
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            // Nanoseconds (schedstat): clock-tick precision (10 ms) would read zero for
            // the writer over a smoke run.
            let cpu = thread_cpu_s(&task.path());
            match comm.trim() {
                "kmsd" => t.reactor += cpu,
                // The crypto pool, and the token pool (calls of keys in a PKCS#11 token).
                c if c.starts_with("kmsd-crypto") || c.starts_with("kmsd-token") => t.crypto += cpu,
                c if c.starts_with("kmsd-store-wri") => t.writer += cpu,
                _ => t.other += cpu,
            }
        }
        t
    }

    fn since(self, before: ThreadCpu) -> ThreadCpu {
        ThreadCpu {
            reactor: self.reactor - before.reactor,
            crypto: self.crypto - before.crypto,
            writer: self.writer - before.writer,
            other: self.other - before.other,
        }
    }

    /// Microseconds per operation, by role.
    fn per_op_us(self, ops: f64) -> [(&'static str, f64); 4] {
        let us = |s: f64| if ops > 0.0 { s * 1e6 / ops } else { 0.0 };
        [
            ("reactor", us(self.reactor)),
            ("crypto", us(self.crypto)),
            ("writer", us(self.writer)),
            ("other", us(self.other)),
        ]
    }
}

/// The pid of the process serving `socket`, from the connection's peer credentials
/// (`SO_PEERCRED`): how `--socket` runs find the daemon to read its CPU time.
fn peer_pid(socket: &std::path::Path) -> Option<u32> {
    let stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    let cred = rustix::net::sockopt::socket_peercred(&stream).ok()?;
    u32::try_from(cred.pid.as_raw_nonzero().get()).ok()
}

struct Case<'a> {
    name: &'a str,
    /// Calls in flight per connection (1 for the management cases and ssh-agent).
    depth: usize,
    run: Run,
    /// Operations per call: the item count of a batch case, else 1.
    per_call: usize,
    inproc: Option<InProc>,
    floor: f64,
    cpu_s: f64,
    /// The daemon's CPU during the case, by thread role.
    threads: ThreadCpu,
    rss_kib: u64,
}

fn report(o: &Opts, c: &mut Case) {
    let ops = c.run.ops_per_s() * c.per_call as f64;
    let (p50, p99, p999) = (c.run.pct(0.5), c.run.pct(0.99), c.run.pct(0.999));
    let done = (c.run.lat_us.len() * c.per_call) as f64;
    let per_op: serde_json::Map<String, serde_json::Value> = c
        .threads
        .per_op_us(done)
        .into_iter()
        .map(|(role, us)| (role.to_string(), ((us * 10.0).round() / 10.0).into()))
        .collect();
    if o.json {
        println!(
            "{}",
            serde_json::json!({
                "op": c.name, "conns": o.conns, "depth": c.depth, "items_per_call": c.per_call,
                "ops": c.run.lat_us.len() * c.per_call, "errors": c.run.errors,
                "ops_per_s": ops.round(), "p50_us": p50, "p99_us": p99, "p999_us": p999,
                "inproc_ops_per_s": c.inproc.map(|i| i.one.round()),
                "inproc_all_cores_ops_per_s": c.inproc.map(|i| i.all.round()),
                "inproc_threads": c.inproc.map(|i| i.threads),
                // null where there is no floor (ssh-agent): not measured, not zero.
                "floor_ops_per_s": (!c.floor.is_nan()).then(|| c.floor.round()),
                "pct_of_floor": (!c.floor.is_nan()).then(|| (100.0 * ops / c.floor).round()),
                "daemon_cpu_s": c.cpu_s, "daemon_peak_rss_kib": c.rss_kib,
                "daemon_cpu_us_per_op": per_op,
                "client_cpu_us_per_op": if done > 0.0 { (c.run.client_cpu_s * 1e7 / done).round() / 10.0 } else { 0.0 },
            })
        );
    } else {
        println!(
            "{:<13} {:>9.0} ops/s  p50 {:>6} µs  p99 {:>6} µs  p99.9 {:>6} µs  in-proc {:>9} ({} on all cores)  floor {:>8} ({:>3.0}%)  errors {}  cpu {:.1}s  rss {} MiB",
            c.name,
            ops,
            p50,
            p99,
            p999,
            c.inproc.map_or("-".into(), |v| format!("{:.0}/s", v.one)),
            c.inproc.map_or("-".into(), |v| format!("{:.0}/s", v.all)),
            if c.floor.is_nan() {
                "-".to_string()
            } else {
                format!("{:.0}", c.floor)
            },
            if c.floor.is_nan() {
                0.0
            } else {
                100.0 * ops / c.floor
            },
            c.run.errors,
            c.cpu_s,
            c.rss_kib / 1024
        );
        if c.cpu_s > 0.0 {
            let roles: Vec<String> = c
                .threads
                .per_op_us(done)
                .iter()
                .map(|(role, us)| format!("{role} {us:.1}"))
                .collect();
            println!(
                "{:<13} CPU per op, µs: daemon {}; client {:.1}",
                "",
                roles.join(", "),
                c.run.client_cpu_s * 1e6 / done.max(1.0)
            );
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = parse_args()?;
    if let Some(path) = o.echo_server.clone() {
        return echo_server(path, o.reply_len).await;
    }
    if let Some(n) = o.scale {
        return scale(&o, n).await;
    }
    let daemon = match &o.socket {
        Some(_) => None,
        None => Some(TestDaemon::start_with(DaemonOptions {
            env: vec![("KMS_LOG".into(), "warn".into())],
            ..DaemonOptions::default()
        })),
    };
    let socket = o
        .socket
        .clone()
        .or_else(|| daemon.as_ref().map(|d| d.socket.clone()))
        .context("no socket")?;
    let pid = daemon
        .as_ref()
        .and_then(TestDaemon::pid)
        .or_else(|| peer_pid(&socket));
    let admin = Client::connect(&socket).await?;
    let tag = std::process::id() % 100_000;
    let k = |s: &str| format!("b{tag}{s}");
    for (name, t, conv) in [
        ("aes", KeyType::Aes256, false),
        ("conv", KeyType::Aes256, true),
        ("ec", KeyType::Ecdsa, false),
        ("rsa", KeyType::Rsa2048, false),
        ("rot", KeyType::Aes256, false),
    ] {
        if admin.get_key(&k(name)).await.is_err() {
            admin.create_key(spec(&k(name), t, conv)).await?;
        }
    }
    let mut clients = Vec::new();
    for _ in 0..o.conns {
        clients.push(Arc::new(Client::connect(&socket).await?));
    }
    let limit = if o.smoke {
        Limit::Ops(200)
    } else {
        Limit::Time(Duration::from_secs_f64(o.seconds))
    };
    let inproc_s = if o.smoke { 0.05 } else { 0.5 };

    // Inputs prepared once.
    let pt1k = vec![7u8; 1024];
    let pt32k = vec![7u8; 32 * 1024];
    let ct1k = admin.encrypt(&k("aes"), &pt1k, None).await?;
    let ct32k = admin.encrypt(&k("aes"), &pt32k, None).await?;
    let rsa_ct = admin.encrypt(&k("rsa"), &[9u8; 64], None).await?;
    let msg = b"benchmark message to sign".to_vec();
    let ec_sig = admin.sign(&k("ec"), &msg, SignScheme::Pss).await?;

    // In-process primitives (one thread).
    let aes = kmsd::crypto::KeyMaterial::generate(KeyType::Aes256)?;
    let ec = kmsd::crypto::KeyMaterial::generate(KeyType::Ecdsa)?;
    let rsa = kmsd::crypto::KeyMaterial::generate(KeyType::Rsa2048)?;
    let (aes, ec, rsa) = (
        aes.as_aes().context("aes")?,
        ec.as_ecdsa().context("ec")?,
        rsa.as_rsa().context("rsa")?,
    );
    let aes_body1k = aes.encrypt_random(b"aad", &pt1k)?;
    let aes_body32k = aes.encrypt_random(b"aad", &pt32k)?;
    let ec_der = ec.sign(&msg)?;
    let rsa_body = rsa.encrypt(&[9u8; 64])?;

    if !o.json {
        println!(
            "kms-bench: {} conns × depth {}, {} per case{}",
            o.conns,
            o.depth,
            if o.smoke {
                "200 ops".to_string()
            } else {
                format!("{} s", o.seconds)
            },
            if o.socket.is_some() {
                " (external daemon)"
            } else {
                ""
            }
        );
    }
    if !o.smoke || o.json {
        journal_cost(&o, inproc_s * 2.0)?;
    }
    // ssh-agent is measured right after the kms case it is compared with, so that the
    // ratio is of two figures taken in the same minute.
    let agent = match o.ssh_agent {
        true => Some(ssh_agent::Agent::start().await?),
        false => None,
    };
    let mut agent_done = Vec::new();
    let mut cpu_before = pid.map_or(0.0, |p| proc_usage(p).0);
    let mut threads_before = pid.map(ThreadCpu::read).unwrap_or_default();
    for case in o.cases.clone() {
        let c = &clients;
        let per_call = if case.ends_with("-batch") { o.batch } else { 1 };
        let (run, inp, request) = match case.as_str() {
            "aes-enc-1k-batch" | "aes-dec-1k-batch" => {
                let encrypt = case == "aes-enc-1k-batch";
                let key = k("aes");
                let plain: Vec<PlaintextItem> = (0..o.batch)
                    .map(|_| PlaintextItem {
                        plaintext: (pt1k.clone()).into(),
                        context: None,
                    })
                    .collect();
                let sealed: Vec<CiphertextItem> = (0..o.batch)
                    .map(|_| CiphertextItem {
                        ciphertext: ct1k.clone(),
                        context: None,
                    })
                    .collect();
                let req = if encrypt {
                    Request::EncryptBatch {
                        key: key.clone(),
                        items: plain.clone(),
                    }
                } else {
                    Request::DecryptBatch {
                        key: key.clone(),
                        items: sealed.clone(),
                    }
                };
                let inp = inproc(inproc_s, |_| {
                    if encrypt {
                        let _ = aes.encrypt_random(b"aad", &pt1k);
                    } else {
                        let _ = aes.decrypt(b"aad", &aes_body1k);
                    }
                });
                let (plain, sealed) = (Arc::new(plain), Arc::new(sealed));
                let run = drive(c, o.depth, limit, move |cl, _| {
                    let (key, plain, sealed) = (key.clone(), plain.clone(), sealed.clone());
                    async move {
                        let out = if encrypt {
                            cl.encrypt_batch(&key, (*plain).clone()).await?
                        } else {
                            cl.decrypt_batch(&key, (*sealed).clone()).await?
                        };
                        all_ok(out)
                    }
                })
                .await;
                (run, Some(inp), req)
            }
            "aes-enc-1k" | "aes-enc-32k" => {
                let pt = if case == "aes-enc-1k" {
                    pt1k.clone()
                } else {
                    pt32k.clone()
                };
                let key = k("aes");
                let req = Request::Encrypt {
                    key: key.clone(),
                    plaintext: (pt.clone()).into(),
                    context: None,
                };
                let inp = inproc(inproc_s, |_| {
                    let _ = aes.encrypt_random(b"aad", &pt);
                });
                let pt = Arc::new(pt);
                let run = drive(c, o.depth, limit, move |cl, _| {
                    let (key, pt) = (key.clone(), pt.clone());
                    async move {
                        cl.encrypt(&key, &pt, None)
                            .await
                            .map(|_| ())
                            .map_err(Into::into)
                    }
                })
                .await;
                (run, Some(inp), req)
            }
            "aes-dec-1k" | "aes-dec-32k" => {
                let (ct, body) = if case == "aes-dec-1k" {
                    (ct1k.clone(), aes_body1k.clone())
                } else {
                    (ct32k.clone(), aes_body32k.clone())
                };
                let key = k("aes");
                let req = Request::Decrypt {
                    key: key.clone(),
                    ciphertext: ct.clone(),
                    context: None,
                };
                let inp = inproc(inproc_s, |_| {
                    let _ = aes.decrypt(b"aad", &body);
                });
                let ct = Arc::new(ct);
                let run = drive(c, o.depth, limit, move |cl, _| {
                    let (key, ct) = (key.clone(), ct.clone());
                    async move {
                        cl.decrypt(&key, &ct, None)
                            .await
                            .map(|_| ())
                            .map_err(Into::into)
                    }
                })
                .await;
                (run, Some(inp), req)
            }
            "conv-enc-1k" => {
                let key = k("conv");
                let req = Request::Encrypt {
                    key: key.clone(),
                    plaintext: (pt1k.clone()).into(),
                    context: Some(b"ctx".to_vec()),
                };
                // The same 1 KiB the daemon's case encrypts, distinct each time.
                let inp = inproc(inproc_s, |i| {
                    let mut pt = [0u8; 1024];
                    pt[..8].copy_from_slice(&i.to_le_bytes());
                    let _ = aes.encrypt_convergent(b"ctx", b"aad", &pt);
                });
                let run = drive(c, o.depth, limit, move |cl, i| {
                    let key = key.clone();
                    async move {
                        let mut pt = vec![0u8; 1024];
                        pt[..8].copy_from_slice(&i.to_le_bytes());
                        cl.encrypt(&key, &pt, Some(b"ctx"))
                            .await
                            .map(|_| ())
                            .map_err(Into::into)
                    }
                })
                .await;
                (run, Some(inp), req)
            }
            "ecdsa-sign" | "rsa-sign" => {
                let key = if case == "ecdsa-sign" {
                    k("ec")
                } else {
                    k("rsa")
                };
                let req = Request::Sign {
                    key: key.clone(),
                    message: msg.clone(),
                    scheme: SignScheme::Pss,
                };
                let inp = if case == "ecdsa-sign" {
                    inproc(inproc_s, |_| {
                        let _ = ec.sign(&msg);
                    })
                } else {
                    inproc(inproc_s, |_| {
                        let _ = rsa.sign(SignScheme::Pss, &msg);
                    })
                };
                let m = Arc::new(msg.clone());
                let run = drive(c, o.depth, limit, move |cl, _| {
                    let (key, m) = (key.clone(), m.clone());
                    async move {
                        cl.sign(&key, &m, SignScheme::Pss)
                            .await
                            .map(|_| ())
                            .map_err(Into::into)
                    }
                })
                .await;
                (run, Some(inp), req)
            }
            "ecdsa-verify" => {
                let key = k("ec");
                let req = Request::Verify {
                    key: key.clone(),
                    message: msg.clone(),
                    signature: ec_sig.clone(),
                    scheme: SignScheme::Pss,
                };
                let inp = inproc(inproc_s, |_| {
                    let _ = ec.verify(&msg, &ec_der);
                });
                let (m, s) = (Arc::new(msg.clone()), Arc::new(ec_sig.clone()));
                let run = drive(c, o.depth, limit, move |cl, _| {
                    let (key, m, s) = (key.clone(), m.clone(), s.clone());
                    async move {
                        anyhow::ensure!(cl.verify(&key, &m, &s, SignScheme::Pss).await?);
                        Ok(())
                    }
                })
                .await;
                (run, Some(inp), req)
            }
            "rsa-dec" => {
                let key = k("rsa");
                let req = Request::Decrypt {
                    key: key.clone(),
                    ciphertext: rsa_ct.clone(),
                    context: None,
                };
                let inp = inproc(inproc_s, |_| {
                    let _ = rsa.decrypt(&rsa_body);
                });
                let ct = Arc::new(rsa_ct.clone());
                let run = drive(c, o.depth, limit, move |cl, _| {
                    let (key, ct) = (key.clone(), ct.clone());
                    async move {
                        cl.decrypt(&key, &ct, None)
                            .await
                            .map(|_| ())
                            .map_err(Into::into)
                    }
                })
                .await;
                (run, Some(inp), req)
            }
            "rsa-enc" => {
                let key = k("rsa");
                let req = Request::Encrypt {
                    key: key.clone(),
                    plaintext: (vec![9; 64]).into(),
                    context: None,
                };
                let inp = inproc(inproc_s, |_| {
                    let _ = rsa.encrypt(&[9u8; 64]);
                });
                let run = drive(c, o.depth, limit, move |cl, _| {
                    let key = key.clone();
                    async move {
                        cl.encrypt(&key, &[9u8; 64], None)
                            .await
                            .map(|_| ())
                            .map_err(Into::into)
                    }
                })
                .await;
                (run, Some(inp), req)
            }
            "data-key" => {
                let key = k("aes");
                let req = Request::DataKey {
                    key: key.clone(),
                    bits: 256,
                    plaintext: true,
                    context: None,
                };
                let run = drive(c, o.depth, limit, move |cl, _| {
                    let key = key.clone();
                    async move {
                        cl.data_key(&key, 256, true, None)
                            .await
                            .map(|_| ())
                            .map_err(Into::into)
                    }
                })
                .await;
                (run, None, req)
            }
            "reencrypt" => {
                let key = k("aes");
                let req = Request::Reencrypt {
                    key: key.clone(),
                    ciphertext: ct1k.clone(),
                    context: None,
                };
                let ct = Arc::new(ct1k.clone());
                let run = drive(c, o.depth, limit, move |cl, _| {
                    let (key, ct) = (key.clone(), ct.clone());
                    async move {
                        cl.reencrypt(&key, &ct, None)
                            .await
                            .map(|_| ())
                            .map_err(Into::into)
                    }
                })
                .await;
                (run, None, req)
            }
            "mixed" => {
                // 60 % AES encrypt/decrypt, 20 % ECDSA sign, 10 % RSA sign, 10 % show.
                let (aes_k, ec_k, rsa_k) = (k("aes"), k("ec"), k("rsa"));
                let req = Request::Encrypt {
                    key: aes_k.clone(),
                    plaintext: (pt1k.clone()).into(),
                    context: None,
                };
                let (pt, ct, m) = (
                    Arc::new(pt1k.clone()),
                    Arc::new(ct1k.clone()),
                    Arc::new(msg.clone()),
                );
                let run = drive(c, o.depth, limit, move |cl, i| {
                    let (aes_k, ec_k, rsa_k, pt, ct, m) = (
                        aes_k.clone(),
                        ec_k.clone(),
                        rsa_k.clone(),
                        pt.clone(),
                        ct.clone(),
                        m.clone(),
                    );
                    async move {
                        match i % 10 {
                            0..=2 => cl.encrypt(&aes_k, &pt, None).await.map(|_| ())?,
                            3..=5 => cl.decrypt(&aes_k, &ct, None).await.map(|_| ())?,
                            6 | 7 => cl.sign(&ec_k, &m, SignScheme::Pss).await.map(|_| ())?,
                            8 => cl.sign(&rsa_k, &m, SignScheme::Pss).await.map(|_| ())?,
                            _ => cl.get_key(&aes_k).await.map(|_| ())?,
                        }
                        Ok(())
                    }
                })
                .await;
                (run, None, req)
            }
            "rotate" => {
                // Keys of their own, at most 90 rotations each (a key holds at most 100
                // versions), made before the run: as many as the run could use at 20,000
                // rotations/s, rotated in turn, so that the run lasts its time.
                const PER_KEY: u64 = 90;
                let wanted = match limit {
                    Limit::Ops(x) | Limit::OpsWithin(x, _) => x,
                    Limit::Time(d) => (d.as_secs_f64() * 20_000.0) as u64,
                };
                let keys = (wanted.div_ceil(PER_KEY) as usize).max(clients.len());
                let mut names = Vec::new();
                for i in 0..keys {
                    let name = format!("r{tag}x{i}");
                    if admin.get_key(&name).await.is_err() {
                        admin
                            .create_key(spec(&name, KeyType::Aes256, false))
                            .await?;
                    }
                    names.push(name);
                }
                let names = Arc::new(names);
                // Making them is not the case's: its CPU is counted from here.
                cpu_before = pid.map_or(0.0, |p| proc_usage(p).0);
                threads_before = pid.map(ThreadCpu::read).unwrap_or_default();
                let req = Request::Rotate { key: k("rot") };
                let most = keys as u64 * PER_KEY;
                let lim = match limit {
                    Limit::Ops(x) => Limit::Ops(x.min(most)),
                    Limit::Time(d) | Limit::OpsWithin(_, d) => Limit::OpsWithin(most, d),
                };
                let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let run = drive(c, 1, lim, move |cl, _| {
                    let i =
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % names.len();
                    let name = names[i].clone();
                    async move { cl.rotate(&name).await.map(|_| ()).map_err(Into::into) }
                })
                .await;
                (run, None, req)
            }
            "create" => {
                // Its reply probe (for the floor) creates this key.
                let req = Request::CreateKey(spec(&format!("c{tag}p"), KeyType::Aes256, false));
                let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let lim = match limit {
                    Limit::Ops(x) => Limit::Ops(x),
                    Limit::Time(d) => Limit::Time(d.min(Duration::from_secs(2))),
                    Limit::OpsWithin(x, d) => Limit::OpsWithin(x, d.min(Duration::from_secs(2))),
                };
                let run = drive(c, 1, lim, move |cl, _| {
                    let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    async move {
                        cl.create_key(spec(&format!("c{tag}y{i}"), KeyType::Aes256, false))
                            .await
                            .map(|_| ())
                            .map_err(Into::into)
                    }
                })
                .await;
                (run, None, req)
            }
            _ => unreachable!("checked in parse_args"),
        };
        // The management cases run one call per connection at a time.
        let depth = if matches!(case.as_str(), "rotate" | "create") {
            1
        } else {
            o.depth
        };
        // The floor moves the same frames, so it counts the same operations per frame;
        // its replies are the size of kmsd's reply to the case's request.
        let reply_len = reply_len(&admin, request.clone()).await;
        let floor = per_call as f64
            * echo_floor(
                o.conns,
                depth,
                frame_len(request),
                reply_len,
                if o.smoke {
                    Limit::Ops(200)
                } else {
                    Limit::Time(Duration::from_secs_f64(o.seconds.min(2.0)))
                },
            )
            .await?;
        let (cpu_now, rss_kib) = pid.map(proc_usage).unwrap_or_default();
        let cpu_s = cpu_now - cpu_before;
        cpu_before = cpu_now;
        let threads_now = pid.map(ThreadCpu::read).unwrap_or_default();
        let threads = threads_now.since(threads_before);
        threads_before = threads_now;
        let case_name = case.clone();
        let mut case = Case {
            name: &case,
            depth,
            run,
            per_call,
            inproc: inp,
            floor,
            cpu_s,
            threads,
            rss_kib,
        };
        report(&o, &mut case);
        if let (Some(agent), Some(beside)) = (&agent, ssh_agent::case_beside(&case_name)) {
            agent.measure(&o, beside).await?;
            agent_done.push(beside);
            // Not the daemon's: the next case's CPU starts here.
            cpu_before = pid.map_or(0.0, |p| proc_usage(p).0);
            threads_before = pid.map(ThreadCpu::read).unwrap_or_default();
        }
    }
    if let Some(agent) = &agent {
        for case in ssh_agent::CASES {
            if !agent_done.contains(&case) {
                agent.measure(&o, case).await?;
            }
        }
    }
    Ok(())
}

/// Scale mode: N keys × 10 versions (and as many history entries), written offline, then
/// a real kmsd started on them seven times: start-up to READY (kmsd's `READY=1` on its
/// notify socket), RSS, store size, `list` first page and whole-list latency, `show`
/// latency, and the daemon's CPU when idle (the scheduler with N/2 rotations scheduled,
/// none due).
async fn scale(o: &Opts, n: usize) -> anyhow::Result<()> {
    const VERSIONS: u32 = 10;
    let dir = tempfile::tempdir()?;
    let data = o
        .data_dir
        .clone()
        .unwrap_or_else(|| dir.path().join("data"));
    let t = Instant::now();
    if !data.join("kms.redb").exists() {
        let data = data.clone();
        let schema = o.scale_schema;
        tokio::task::spawn_blocking(move || kms_e2e::scale::populate(&data, n, VERSIONS, schema))
            .await??;
    }
    let populate_s = t.elapsed().as_secs_f64();
    let store_bytes = std::fs::metadata(data.join("kms.redb"))?.len();
    // Start-up is timed to kmsd's `READY=1` (sd_notify), as systemd sees it: after the
    // socket is bound, once the keyring is built and the daemon serves.
    let notify_path = dir.path().join("notify.sock");
    let notify = Arc::new(std::os::unix::net::UnixDatagram::bind(&notify_path)?);
    let opts = DaemonOptions {
        env: vec![
            ("KMS_LOG".into(), "warn".into()),
            ("NOTIFY_SOCKET".into(), notify_path.display().to_string()),
        ],
        data_dir: Some(data.clone()),
        ..DaemonOptions::default()
    };
    // Start-up is measured three ways: on the store as found (the first start after
    // populating has no record of a clean stop), three times after a SIGKILL (redb's
    // repair and kmsd's full page check), and three times after a clean stop (no full
    // check: see kmsd/src/store/clean_stop.rs). The last daemon serves the queries.
    let start = |opts: DaemonOptions| {
        let notify = notify.clone();
        async move {
            // What earlier daemons said (STOPPING=1, …) is not this start's.
            notify.set_nonblocking(true)?;
            let mut buf = [0u8; 4096];
            while notify.recv(&mut buf).is_ok() {}
            notify.set_nonblocking(false)?;
            let t = Instant::now();
            // Listening before kmsd starts, and timed when READY=1 arrives.
            let ready = tokio::task::spawn_blocking(move || ready_after(&notify, t));
            let d = tokio::task::spawn_blocking(move || TestDaemon::start_with(opts)).await?;
            let ms = ready.await??;
            anyhow::Ok((d, ms))
        }
    };
    let (mut daemon, first_ms) = start(opts.clone()).await?;
    // Of a store of schema 1, the first start includes its upgrade (every version
    // re-wrapped in one transaction): its memory is the peak of that start.
    let rss_peak_first = daemon.pid().map_or(0, |pid| status_kib(pid, "VmHWM:"));
    let (mut after_kill, mut after_clean) = (Vec::new(), Vec::new());
    let mut rss_after_kill = 0;
    for _ in 0..3 {
        daemon.kill();
        let (d, ms) = start(opts.clone()).await?;
        rss_after_kill = rss_after_kill.max(d.pid().map_or(0, rss_kib));
        after_kill.push(ms);
        daemon = d;
    }
    for _ in 0..3 {
        anyhow::ensure!(daemon.stop() == Some(0), "kmsd did not stop cleanly");
        let (d, ms) = start(opts.clone()).await?;
        after_clean.push(ms);
        daemon = d;
    }
    let mut d = daemon;
    let pid = d.pid().context("no pid")?;
    let rss_after_start = rss_kib(pid);
    let c = Client::connect(&d.socket).await?;
    let (first, total) = c.list_keys(false, 0, Some(50)).await?;
    anyhow::ensure!(
        total as usize == n && first.len() == 50.min(n),
        "list saw {total} keys"
    );
    let rounds = if o.smoke { 20 } else { 200 };
    let mut list_us = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        c.list_keys(false, 0, Some(50)).await?;
        list_us.push(t.elapsed().as_micros() as u32);
    }
    // The whole list, as `kmsctl list` and the dashboard ask for it.
    let mut list_all_ms = Vec::new();
    for _ in 0..if o.smoke { 3 } else { 10 } {
        let t = Instant::now();
        let (all, _) = c.list_keys(false, 0, None).await?;
        list_all_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(all.len() == n, "the whole list has {} keys", all.len());
    }
    let mut show_us = Vec::new();
    for i in 0..rounds {
        let name = kms_e2e::scale::key_name((i * 7919) % n);
        let t = Instant::now();
        let k = c.get_key(&name).await?;
        show_us.push(t.elapsed().as_micros() as u32);
        anyhow::ensure!(
            k.current_version == VERSIONS,
            "{name} has {}",
            k.current_version
        );
    }
    // A key from the middle still decrypts what it encrypts: the store is real.
    let probe = kms_e2e::scale::key_name(n / 2);
    let ct = c.encrypt(&probe, b"scale probe", None).await?;
    anyhow::ensure!(c.decrypt(&probe, &ct, None).await? == b"scale probe");
    let idle_s = if o.smoke { 1.0 } else { 10.0 };
    let cpu0 = proc_usage(pid).0;
    tokio::time::sleep(Duration::from_secs_f64(idle_s)).await;
    let idle_cpu_ms_per_s = (proc_usage(pid).0 - cpu0) * 1000.0 / idle_s;
    let rss_after_queries = rss_kib(pid);
    drop(c);
    // Stopped cleanly, so a later run on the same --data-dir finds a clean store.
    d.stop();
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };

    let (mut l, mut s) = (Run::from(list_us), Run::from(show_us));
    let out = serde_json::json!({
        "op": "scale", "keys": n, "versions_per_key": VERSIONS,
        "history_entries": n * VERSIONS as usize,
        "populate_s": (populate_s * 10.0).round() / 10.0,
        "store_mib": store_bytes / (1 << 20),
        "schema_populated": o.scale_schema,
        "startup_ms_first": first_ms.round(),
        "rss_mib_peak_first_start": rss_peak_first / 1024,
        "startup_ms_after_kill": after_kill.iter().map(|v| v.round()).collect::<Vec<_>>(),
        "startup_ms_after_kill_median": med(&mut after_kill.clone()).round(),
        "startup_ms_after_clean_stop": after_clean.iter().map(|v| v.round()).collect::<Vec<_>>(),
        "startup_ms_after_clean_stop_median": med(&mut after_clean.clone()).round(),
        "rss_mib_after_start": rss_after_start / 1024,
        "rss_mib_after_start_with_full_check": rss_after_kill / 1024,
        "rss_mib_after_queries": rss_after_queries / 1024,
        "list_first_page_p50_us": l.pct(0.5), "list_first_page_p99_us": l.pct(0.99),
        "list_all_median_ms": med(&mut list_all_ms).round(),
        "show_p50_us": s.pct(0.5), "show_p99_us": s.pct(0.99),
        "idle_cpu_ms_per_s": (idle_cpu_ms_per_s * 100.0).round() / 100.0,
    });
    if o.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// Milliseconds from `t` to the first `READY=1` on `notify` (kmsd's sd_notify socket).
fn ready_after(notify: &std::os::unix::net::UnixDatagram, t: Instant) -> anyhow::Result<f64> {
    notify.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut buf = [0u8; 4096];
    loop {
        let n = notify.recv(&mut buf).context("no READY=1 from kmsd")?;
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1")
        {
            return Ok(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
}

impl From<Vec<u32>> for Run {
    fn from(lat_us: Vec<u32>) -> Run {
        Run {
            lat_us,
            elapsed: Duration::ZERO,
            errors: 0,
            client_cpu_s: 0.0,
        }
    }
}

/// Current resident set of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A KiB figure of `/proc/PID/status` (`VmRSS:`, `VmHWM:` the peak resident set).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

mod ssh_agent {
    //! Minimal ssh-agent protocol client (draft-miller-ssh-agent): list identities, sign.
    use super::*;

    fn put_string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s);
    }

    async fn call(s: &mut tokio::net::UnixStream, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut f = (msg.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(msg);
        s.write_all(&f).await?;
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).await?;
        Ok(body)
    }

    /// Key blobs of the agent's identities.
    async fn identities(s: &mut tokio::net::UnixStream) -> anyhow::Result<Vec<Vec<u8>>> {
        let body = call(s, &[11]).await?;
        anyhow::ensure!(body.first() == Some(&12), "unexpected identities answer");
        let mut p = 1;
        let rd = |p: &mut usize, b: &[u8]| -> anyhow::Result<Vec<u8>> {
            let n = u32::from_be_bytes(b.get(*p..*p + 4).context("short")?.try_into()?) as usize;
            let v = b.get(*p + 4..*p + 4 + n).context("short")?.to_vec();
            *p += 4 + n;
            Ok(v)
        };
        let count = u32::from_be_bytes(body.get(1..5).context("short")?.try_into()?);
        p += 4;
        let mut keys = Vec::new();
        for _ in 0..count {
            keys.push(rd(&mut p, &body)?);
            rd(&mut p, &body)?; // comment
        }
        Ok(keys)
    }

    /// An ssh-agent of its own, holding a P-256 and an RSA-2048 key; stopped when dropped.
    pub struct Agent {
        _dir: tempfile::TempDir,
        sock: std::path::PathBuf,
        child: std::process::Child,
        /// (case name, key blob, signature flags).
        keys: Vec<(&'static str, Vec<u8>, u32)>,
    }

    impl Drop for Agent {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The ssh-agent case measured side by side with a kms case.
    pub fn case_beside(kms_case: &str) -> Option<&'static str> {
        match kms_case {
            "ecdsa-sign" => Some("ssh-agent-ec-sign"),
            "rsa-sign" => Some("ssh-agent-rsa-sign"),
            _ => None,
        }
    }

    pub const CASES: [&str; 2] = ["ssh-agent-ec-sign", "ssh-agent-rsa-sign"];

    impl Agent {
        pub async fn start() -> anyhow::Result<Agent> {
            let dir = tempfile::tempdir()?;
            let sock = dir.path().join("agent.sock");
            let child = std::process::Command::new("ssh-agent")
                .arg("-D")
                .arg("-a")
                .arg(&sock)
                .stdout(std::process::Stdio::null())
                .spawn()
                .context("ssh-agent")?;
            let mut agent = Agent {
                sock,
                child,
                keys: Vec::new(),
                _dir: dir,
            };
            for _ in 0..100 {
                if agent.sock.exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for (t, bits) in [("ecdsa", "256"), ("rsa", "2048")] {
                let key = agent._dir.path().join(t);
                let st = std::process::Command::new("ssh-keygen")
                    .args(["-q", "-N", "", "-t", t, "-b", bits, "-f"])
                    .arg(&key)
                    .status()?;
                anyhow::ensure!(st.success(), "ssh-keygen failed");
                let st = std::process::Command::new("ssh-add")
                    .arg("-q")
                    .arg(&key)
                    .env("SSH_AUTH_SOCK", &agent.sock)
                    .stderr(std::process::Stdio::null())
                    .status()?;
                anyhow::ensure!(st.success(), "ssh-add failed");
            }
            let mut probe = tokio::net::UnixStream::connect(&agent.sock).await?;
            for blob in identities(&mut probe).await? {
                // rsa-sha2-256 (flag 2) for RSA; ECDSA P-256 signs with SHA-256 anyway.
                agent
                    .keys
                    .push(if blob.windows(7).any(|w| w == b"ssh-rsa") {
                        ("ssh-agent-rsa-sign", blob, 2u32)
                    } else {
                        ("ssh-agent-ec-sign", blob, 0)
                    });
            }
            Ok(agent)
        }

        /// Measures one of [`CASES`] with the run's connection count, one call in flight
        /// on each (the agent answers one request at a time per connection), and the
        /// agent's own CPU and peak RSS.
        pub async fn measure(&self, o: &Opts, case: &'static str) -> anyhow::Result<()> {
            let (_, blob, flags) = self
                .keys
                .iter()
                .find(|(name, _, _)| *name == case)
                .context("the agent has no key for this case")?
                .clone();
            let limit = if o.smoke {
                Limit::Ops(200)
            } else {
                Limit::Time(Duration::from_secs_f64(o.seconds))
            };
            let pid = self.child.id();
            let cpu_before = proc_usage(pid).0;
            let start = Instant::now();
            let (per, deadline) = (limit.per_task(o.conns), limit.deadline(start));
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..o.conns {
                let (sock, blob) = (self.sock.clone(), blob.clone());
                tasks.spawn(async move {
                    let mut lat = Vec::new();
                    let Ok(mut s) = tokio::net::UnixStream::connect(&sock).await else {
                        return (lat, 1);
                    };
                    let mut msg = vec![13u8];
                    put_string(&mut msg, &blob);
                    put_string(&mut msg, b"benchmark message to sign");
                    msg.extend_from_slice(&flags.to_be_bytes());
                    while (lat.len() as u64) < per && deadline.is_none_or(|d| Instant::now() < d) {
                        let t = Instant::now();
                        match call(&mut s, &msg).await {
                            Ok(r) if r.first() == Some(&14) => {
                                lat.push(t.elapsed().as_micros() as u32)
                            }
                            // The connection's state is unknown after a failure: its
                            // successful calls are kept, and it stops.
                            _ => return (lat, 1),
                        }
                    }
                    (lat, 0)
                });
            }
            let mut run = Run {
                lat_us: Vec::new(),
                elapsed: Duration::ZERO,
                errors: 0,
                client_cpu_s: 0.0,
            };
            while let Some(r) = tasks.join_next().await {
                match r {
                    Ok((lat, errors)) => {
                        run.lat_us.extend(lat);
                        run.errors += errors;
                    }
                    Err(_) => run.errors += 1,
                }
            }
            run.elapsed = start.elapsed();
            let (cpu_after, rss_kib) = proc_usage(pid);
            let mut case = Case {
                name: case,
                depth: 1,
                run,
                per_call: 1,
                inproc: None,
                floor: f64::NAN,
                cpu_s: cpu_after - cpu_before,
                threads: ThreadCpu::default(),
                rss_kib,
            };
            report(o, &mut case);
            Ok(())
        }
    }
}
