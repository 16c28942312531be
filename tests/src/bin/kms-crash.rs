//! kms-crash: crash safety under load (SPEC §9). Drives a real kmsd from several
//! clients — encryptions (pipelined), decryptions of earlier answers, ECDSA signatures
//! and verifications (pipelined), rotations, key creations, disable/enable, a
//! `key-reviewer` grant to `nobody` granted and revoked, history reads — kills it with
//! SIGKILL at a random moment, and before restarting it:
//!
//! - every other kill, runs redb's integrity check on the store file as the kill left it
//!   (`kmsd::store::check_file`); on the others the restarted daemon recovers the file
//!   itself (kmsd runs the same check when it opens a store, and must not log a failure);
//!
//! then, on the restarted daemon:
//!
//! - every acknowledged key exists, and its current version is exactly the last
//!   acknowledged rotation (or one more, if a rotation was in flight at the kill);
//! - every version up to the current one is listed;
//! - the state of the toggled key and the presence of the grant are the last
//!   acknowledged ones (or the one in flight);
//! - each key's usage count holds at least every acknowledged crypto call, and its
//!   history since the iteration began holds at least every acknowledged call by action;
//! - every ciphertext acknowledged in the iteration (and a sample of older ones) decrypts
//!   to its plaintext; at the end, every ciphertext ever acknowledged does.
//!
//! Any error answered while the daemon was alive (other than the connection dying with
//! it) fails the run. On failure the data directory is kept and named.
//!
//! ```text
//! cargo build --release --workspace
//! target/release/kms-crash [--kills 50] [--seed N] [--max-load-ms 300] [--json]
//! ```

use anyhow::{Context, bail, ensure};
use kms_e2e::{DaemonOptions, TestDaemon};
use kms_shared::client::{Client, ClientError};
use kms_shared::model::{Action, KeyState, KeyType, Principal, Role};
use kms_shared::protocol::{CreateKey, GrantSpec, HistoryQuery};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: kms-crash [--kills N] [--seed N] [--max-load-ms MS] [--json]";

#[derive(Debug, Clone)]
struct Opts {
    kills: u64,
    seed: u64,
    max_load_ms: u64,
    json: bool,
}

fn parse_args() -> anyhow::Result<Opts> {
    let mut o = Opts {
        kills: 50,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        max_load_ms: 300,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> anyhow::Result<u64> {
            args.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))?
                .parse()
                .with_context(|| format!("{name} needs a number\n{USAGE}"))
        };
        match a.as_str() {
            "--kills" => o.kills = value("--kills")?,
            "--seed" => o.seed = value("--seed")?,
            "--max-load-ms" => o.max_load_ms = value("--max-load-ms")?.max(1),
            "--json" => o.json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(o)
}

/// splitmix64: small, seedable, good enough to choose operations and moments.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    fn fork(&mut self) -> Rng {
        Rng(self.next())
    }
}

/// An AES key of the pool: encrypted under, rotated, its acknowledged version.
#[derive(Debug, Clone)]
struct PoolKey {
    name: String,
    version: u32,
    /// A rotation was sent and not answered (it may or may not have landed).
    rotating: bool,
}

#[derive(Debug, Clone)]
struct AckedCiphertext {
    key: String,
    plaintext: Vec<u8>,
    ciphertext: String,
}

/// Counts of acknowledged operations over the whole run.
#[derive(Debug, Default, Clone)]
struct Acked {
    encryptions: u64,
    signatures: u64,
    decryptions: u64,
    rotations: u64,
    creates: u64,
    state_changes: u64,
    grant_changes: u64,
    history_reads: u64,
}

/// What the checks after each restart covered.
#[derive(Debug, Default, Clone)]
struct Checked {
    ciphertexts_decrypted: u64,
    keys_and_versions: u64,
    state_checks: u64,
    grant_checks: u64,
    usage_checks: u64,
    history_entries_read: u64,
    integrity_checks: u64,
    /// Restarts where kmsd itself recovered the killed store (and checked it).
    daemon_recoveries: u64,
    /// Operations in flight at a kill that turned out to have landed (allowed).
    in_flight_landed: u64,
}

/// What the daemon acknowledged, and what was in flight when it died.
#[derive(Debug, Default)]
struct Model {
    keys: Vec<PoolKey>,
    next_key: u64,
    /// A creation sent and not answered.
    pending_create: Option<String>,
    state_key: String,
    state: Option<KeyState>,
    state_in_flight: Option<KeyState>,
    grant_key: String,
    granted: bool,
    grant_in_flight: Option<bool>,
    ciphertexts: Vec<AckedCiphertext>,
    /// Index of the first ciphertext acknowledged in the current iteration.
    iteration_start: usize,
    /// Acknowledged successful crypto calls per key name (usage lower bound).
    uses: HashMap<String, u64>,
    /// Acknowledged calls of the current iteration, per key name and action.
    iteration_calls: HashMap<(String, Action), u64>,
    /// Errors the daemon answered while it was alive: each fails the run.
    unexpected: Vec<String>,
    acked: Acked,
}

impl Model {
    fn count(&mut self, key: &str, action: Action) {
        *self
            .iteration_calls
            .entry((key.to_string(), action))
            .or_default() += 1;
        if matches!(
            action,
            Action::Encrypt | Action::Decrypt | Action::Sign | Action::Verify
        ) {
            *self.uses.entry(key.to_string()).or_default() += 1;
        }
    }
}

type Shared = Arc<Mutex<Model>>;

fn lock(m: &Shared) -> MutexGuard<'_, Model> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A failure of the connection (the daemon was killed), as opposed to an answered error.
fn died(e: &ClientError) -> bool {
    e.kind().is_none()
}

fn spec(name: &str) -> CreateKey {
    CreateKey {
        name: name.into(),
        key_type: KeyType::Aes256,
        protection: Default::default(),
        convergent: false,
        auto_rotation: false,
        rotation_days: None,
        memo: "kms-crash".into(),
        hsm: None,
    }
}

fn grant_spec(key: &str) -> GrantSpec {
    GrantSpec {
        role: Role::KeyReviewer,
        user: Some("nobody".into()),
        group: None,
        key: Some(key.into()),
    }
}

/// Encrypts under random pool keys (and now and then decrypts an earlier answer), with
/// `depth` requests in flight on one connection, until the daemon dies.
async fn encrypter(c: Arc<Client>, m: Shared, mut rng: Rng, label: String) {
    let mut n = 0u64;
    loop {
        let (key, earlier) = {
            let m = lock(&m);
            let key = m.keys[rng.below(m.keys.len() as u64) as usize].name.clone();
            let earlier = (rng.below(8) == 0 && !m.ciphertexts.is_empty())
                .then(|| m.ciphertexts[rng.below(m.ciphertexts.len() as u64) as usize].clone());
            (key, earlier)
        };
        if let Some(a) = earlier {
            match c.decrypt(&a.key, &a.ciphertext, None).await {
                Ok(pt) if pt == a.plaintext => {
                    let mut m = lock(&m);
                    m.count(&a.key, Action::Decrypt);
                    m.acked.decryptions += 1;
                }
                Ok(_) => {
                    lock(&m)
                        .unexpected
                        .push(format!("{}: decrypt gave other bytes", a.key));
                    return;
                }
                Err(e) if died(&e) => return,
                Err(e) => {
                    lock(&m).unexpected.push(format!("decrypt {}: {e}", a.key));
                    return;
                }
            }
            continue;
        }
        let pt = format!("{label}-{n}").into_bytes();
        n += 1;
        match c.encrypt(&key, &pt, None).await {
            Ok(ct) => {
                let mut m = lock(&m);
                m.count(&key, Action::Encrypt);
                m.acked.encryptions += 1;
                m.ciphertexts.push(AckedCiphertext {
                    key,
                    plaintext: pt,
                    ciphertext: ct,
                });
            }
            Err(e) if died(&e) => return,
            Err(e) => {
                lock(&m).unexpected.push(format!("encrypt {key}: {e}"));
                return;
            }
        }
    }
}

/// The ECDSA key the signers use.
const SIGNER: &str = "signer";

/// Signs with the ECDSA key (and now and then verifies an answer through the daemon),
/// one call at a time on a connection other signers share, until the daemon dies.
async fn signer(c: Arc<Client>, m: Shared, mut rng: Rng, label: String) {
    use kms_shared::model::SignScheme;
    for n in 0u64.. {
        let message = format!("{label}-{n}").into_bytes();
        let signature = match c.sign(SIGNER, &message, SignScheme::default()).await {
            Ok(s) => s,
            Err(e) if died(&e) => return,
            Err(e) => {
                lock(&m).unexpected.push(format!("sign: {e}"));
                return;
            }
        };
        {
            let mut m = lock(&m);
            m.count(SIGNER, Action::Sign);
            m.acked.signatures += 1;
        }
        if rng.below(8) != 0 {
            continue;
        }
        match c
            .verify(SIGNER, &message, &signature, SignScheme::default())
            .await
        {
            Ok(true) => lock(&m).count(SIGNER, Action::Verify),
            Ok(false) => {
                lock(&m).unexpected.push(format!(
                    "an acknowledged signature of {label}-{n} does not verify"
                ));
                return;
            }
            Err(e) if died(&e) => return,
            Err(e) => {
                lock(&m).unexpected.push(format!("verify: {e}"));
                return;
            }
        }
    }
}

/// Rotations (or a new key when one nears the version limit), disable/enable of the
/// state key, grant/revoke on the grant key, history reads: one at a time, until the
/// daemon dies.
async fn lifecycle(c: Client, m: Shared, mut rng: Rng) {
    loop {
        tokio::time::sleep(Duration::from_millis(2 + rng.below(8))).await;
        let r = match rng.below(10) {
            0..=3 => rotate_or_create(&c, &m, &mut rng).await,
            4..=5 => toggle_state(&c, &m).await,
            6..=7 => toggle_grant(&c, &m).await,
            _ => read_history(&c, &m, &mut rng).await,
        };
        match r {
            Ok(()) => {}
            Err(e) if died(&e) => return,
            Err(e) => {
                lock(&m).unexpected.push(format!("lifecycle: {e}"));
                return;
            }
        }
    }
}

async fn rotate_or_create(c: &Client, m: &Shared, rng: &mut Rng) -> Result<(), ClientError> {
    let (idx, key, create) = {
        let mut m = lock(m);
        let idx = rng.below(m.keys.len() as u64) as usize;
        // The basic level allows 100 versions; stay clear of the limit.
        if m.keys[idx].version >= 95 {
            let name = format!("pool{}", m.next_key);
            m.next_key += 1;
            m.pending_create = Some(name.clone());
            (idx, name, true)
        } else {
            m.keys[idx].rotating = true;
            (idx, m.keys[idx].name.clone(), false)
        }
    };
    if create {
        let info = c.create_key(spec(&key)).await?;
        let mut m = lock(m);
        m.pending_create = None;
        m.keys.push(PoolKey {
            name: key.clone(),
            version: info.current_version,
            rotating: false,
        });
        m.count(&key, Action::Create);
        m.acked.creates += 1;
    } else {
        let info = c.rotate(&key).await?;
        let mut m = lock(m);
        m.keys[idx].version = info.current_version;
        m.keys[idx].rotating = false;
        m.count(&key, Action::Rotate);
        m.acked.rotations += 1;
    }
    Ok(())
}

async fn toggle_state(c: &Client, m: &Shared) -> Result<(), ClientError> {
    let (key, target) = {
        let mut m = lock(m);
        let target = match m.state {
            Some(KeyState::Enabled) => KeyState::Disabled,
            _ => KeyState::Enabled,
        };
        m.state_in_flight = Some(target);
        (m.state_key.clone(), target)
    };
    let (info, action) = if target == KeyState::Disabled {
        (c.disable(&key).await?, Action::Disable)
    } else {
        (c.enable(&key).await?, Action::Enable)
    };
    let mut m = lock(m);
    if info.state != target {
        m.unexpected.push(format!(
            "{key}: answered state {} after {action}",
            info.state
        ));
    }
    m.state = Some(target);
    m.state_in_flight = None;
    m.count(&key, action);
    m.acked.state_changes += 1;
    Ok(())
}

async fn toggle_grant(c: &Client, m: &Shared) -> Result<(), ClientError> {
    let (key, target) = {
        let mut m = lock(m);
        let target = !m.granted;
        m.grant_in_flight = Some(target);
        (m.grant_key.clone(), target)
    };
    let action = if target {
        c.grant(grant_spec(&key)).await?;
        Action::Grant
    } else {
        c.revoke(grant_spec(&key)).await?;
        Action::Revoke
    };
    let mut m = lock(m);
    m.granted = target;
    m.grant_in_flight = None;
    m.count(&key, action);
    m.acked.grant_changes += 1;
    Ok(())
}

async fn read_history(c: &Client, m: &Shared, rng: &mut Rng) -> Result<(), ClientError> {
    let key = {
        let m = lock(m);
        m.keys[rng.below(m.keys.len() as u64) as usize].name.clone()
    };
    let entries = c
        .history(HistoryQuery {
            key: key.clone(),
            limit: Some(20),
            ..HistoryQuery::default()
        })
        .await?;
    let mut m = lock(m);
    if entries.windows(2).any(|w| w[0].seq <= w[1].seq) {
        m.unexpected
            .push(format!("{key}: history not newest first"));
    }
    m.acked.history_reads += 1;
    Ok(())
}

/// Everything a restarted daemon must show for what was acknowledged before the kill.
async fn verify(
    socket: &Path,
    m: &Shared,
    since: i64,
    rng: &mut Rng,
    checked: &mut Checked,
    all_ciphertexts: bool,
) -> anyhow::Result<()> {
    let c = Arc::new(
        Client::connect(socket)
            .await
            .context("connect after restart")?,
    );
    let mut model = std::mem::take(&mut *lock(m));
    let r = verify_model(&c, &mut model, since, rng, checked, all_ciphertexts).await;
    *lock(m) = model;
    r
}

async fn verify_model(
    c: &Arc<Client>,
    m: &mut Model,
    since: i64,
    rng: &mut Rng,
    checked: &mut Checked,
    all_ciphertexts: bool,
) -> anyhow::Result<()> {
    // Keys, rotations, versions.
    if let Some(name) = m.pending_create.take()
        && let Ok(info) = c.get_key(&name).await
    {
        checked.in_flight_landed += 1;
        m.keys.push(PoolKey {
            name,
            version: info.current_version,
            rotating: false,
        });
    }
    for k in &mut m.keys {
        let info = c
            .get_key(&k.name)
            .await
            .with_context(|| format!("acknowledged key {} lost", k.name))?;
        let v = info.current_version;
        if k.rotating {
            ensure!(
                v == k.version || v == k.version + 1,
                "{}: version {v} after a rotation in flight from {}",
                k.name,
                k.version
            );
            checked.in_flight_landed += u64::from(v > k.version);
            k.version = v;
            k.rotating = false;
        } else {
            ensure!(
                v == k.version,
                "{}: current version {v}, last acknowledged {}",
                k.name,
                k.version
            );
        }
        let versions = c.versions(&k.name).await?;
        ensure!(
            versions.len() == v as usize
                && versions
                    .iter()
                    .enumerate()
                    .all(|(i, x)| x.version as usize == i + 1),
            "{}: versions {:?} for current version {v}",
            k.name,
            versions.iter().map(|x| x.version).collect::<Vec<_>>()
        );
        let used = m.uses.get(&k.name).copied().unwrap_or(0);
        ensure!(
            info.usage_count >= used,
            "{}: usage count {} < {used} acknowledged crypto calls",
            k.name,
            info.usage_count
        );
        checked.keys_and_versions += 1;
        checked.usage_checks += 1;
    }

    // The signing key counts every acknowledged signature and verification.
    let info = c.get_key(SIGNER).await.context("the signing key lost")?;
    let used = m.uses.get(SIGNER).copied().unwrap_or(0);
    ensure!(
        info.usage_count >= used,
        "{SIGNER}: usage count {} < {used} acknowledged signatures and verifications",
        info.usage_count
    );
    checked.usage_checks += 1;

    // The toggled state.
    let state = c.get_key(&m.state_key).await?.state;
    match (m.state, m.state_in_flight.take()) {
        (Some(acked), None) => ensure!(state == acked, "state {state}, acknowledged {acked}"),
        (acked, Some(target)) => {
            ensure!(
                Some(state) == acked || state == target,
                "state {state}: neither acknowledged {acked:?} nor in-flight {target}"
            );
            checked.in_flight_landed += u64::from(Some(state) != acked);
        }
        (None, None) => {}
    }
    m.state = Some(state);
    checked.state_checks += 1;

    // The grant.
    let present = c.grants().await?.iter().any(|g| {
        g.role == Role::KeyReviewer
            && g.principal == Principal::User("nobody".into())
            && g.key_name.as_deref() == Some(m.grant_key.as_str())
    });
    match m.grant_in_flight.take() {
        None => ensure!(
            present == m.granted,
            "grant present {present}, acknowledged {}",
            m.granted
        ),
        Some(target) => {
            ensure!(
                present == m.granted || present == target,
                "grant present {present}"
            );
            checked.in_flight_landed += u64::from(present != m.granted);
        }
    }
    m.granted = present;
    checked.grant_checks += 1;

    // History since the iteration began holds every acknowledged call (by key, action).
    let mut keys: Vec<&String> = m.iteration_calls.keys().map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let mut found: HashMap<Action, u64> = HashMap::new();
        let mut before = None;
        loop {
            let page = c
                .history(HistoryQuery {
                    key: key.clone(),
                    limit: Some(1000),
                    before_seq: before,
                    since: Some(since),
                    ..HistoryQuery::default()
                })
                .await?;
            checked.history_entries_read += page.len() as u64;
            for e in &page {
                if e.result == "ok" {
                    *found.entry(e.action).or_default() += 1;
                }
            }
            match page.last() {
                Some(last) if page.len() == 1000 => before = Some(last.seq),
                _ => break,
            }
        }
        for ((k, action), n) in &m.iteration_calls {
            if k == key {
                let got = found.get(action).copied().unwrap_or(0);
                ensure!(
                    got >= *n,
                    "{key}: {got} {action:?} entries in history, {n} acknowledged"
                );
            }
        }
    }

    // Ciphertexts: this iteration's, and a sample of older ones (all at the end).
    let mut idx: Vec<usize> = (m.iteration_start..m.ciphertexts.len()).collect();
    if all_ciphertexts {
        idx = (0..m.ciphertexts.len()).collect();
    } else if m.iteration_start > 0 {
        for _ in 0..50 {
            idx.push(rng.below(m.iteration_start as u64) as usize);
        }
    }
    // Pipelined, 64 at a time: each answer waits for its history entry to be durable,
    // and many share one commit.
    for chunk in idx.chunks(64) {
        let mut calls = tokio::task::JoinSet::new();
        for &i in chunk {
            let (c, a) = (c.clone(), m.ciphertexts[i].clone());
            calls.spawn(async move {
                let pt = c
                    .decrypt(&a.key, &a.ciphertext, None)
                    .await
                    .with_context(|| {
                        format!("acknowledged ciphertext #{i} under {} lost", a.key)
                    })?;
                ensure!(
                    pt == a.plaintext,
                    "ciphertext #{i} decrypted to other bytes"
                );
                Ok(a.key)
            });
        }
        while let Some(r) = calls.join_next().await {
            let key = r??;
            m.count(&key, Action::Decrypt);
            checked.ciphertexts_decrypted += 1;
        }
    }
    Ok(())
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn options() -> DaemonOptions {
    DaemonOptions {
        // The harness restarts the daemon hundreds of times: keep its log small.
        env: vec![("KMS_LOG".into(), "warn".into())],
        ..DaemonOptions::default()
    }
}

#[derive(Debug)]
struct Report {
    ok: bool,
    kills: u64,
    seed: u64,
    elapsed_s: f64,
    acknowledged: Acked,
    checked: Checked,
    store_bytes: u64,
    error: Option<String>,
}

impl Report {
    fn json(&self) -> serde_json::Value {
        let (a, c) = (&self.acknowledged, &self.checked);
        serde_json::json!({
            "ok": self.ok,
            "kills": self.kills,
            "seed": self.seed,
            "elapsed_s": self.elapsed_s,
            "acknowledged": {
                "encryptions": a.encryptions,
                "signatures": a.signatures,
                "decryptions": a.decryptions,
                "rotations": a.rotations,
                "creates": a.creates,
                "state_changes": a.state_changes,
                "grant_changes": a.grant_changes,
                "history_reads": a.history_reads,
            },
            "checked": {
                "ciphertexts_decrypted": c.ciphertexts_decrypted,
                "keys_and_versions": c.keys_and_versions,
                "state_checks": c.state_checks,
                "grant_checks": c.grant_checks,
                "usage_checks": c.usage_checks,
                "history_entries_read": c.history_entries_read,
                "integrity_checks": c.integrity_checks,
                "daemon_recoveries": c.daemon_recoveries,
                "in_flight_landed": c.in_flight_landed,
            },
            "store_bytes": self.store_bytes,
            "error": self.error,
        })
    }
}

async fn run(o: &Opts, d: &mut TestDaemon, checked: &mut Checked) -> anyhow::Result<Acked> {
    let mut rng = Rng(o.seed);
    let m: Shared = Arc::default();
    {
        let c = d.client().await;
        for name in ["pool0", "pool1", "pool2", "toggled", "granted"] {
            c.create_key(spec(name)).await?;
        }
        c.create_key(CreateKey {
            key_type: KeyType::Ecdsa,
            ..spec(SIGNER)
        })
        .await?;
        let mut model = lock(&m);
        for i in 0..3 {
            model.keys.push(PoolKey {
                name: format!("pool{i}"),
                version: 1,
                rotating: false,
            });
        }
        model.next_key = 3;
        model.state_key = "toggled".into();
        model.state = Some(KeyState::Enabled);
        model.grant_key = "granted".into();
    }
    let store = d.data_dir.join("kms.redb");
    for kill in 0..o.kills {
        let since = wall_ms();
        {
            let mut model = lock(&m);
            model.iteration_start = model.ciphertexts.len();
            model.iteration_calls.clear();
        }
        let mut tasks = Vec::new();
        for e in 0..2 {
            let c = Arc::new(d.client().await);
            for depth in 0..4 {
                tasks.push(tokio::spawn(encrypter(
                    c.clone(),
                    m.clone(),
                    rng.fork(),
                    format!("k{kill}-c{e}-d{depth}"),
                )));
            }
        }
        let c = Arc::new(d.client().await);
        for depth in 0..4 {
            tasks.push(tokio::spawn(signer(
                c.clone(),
                m.clone(),
                rng.fork(),
                format!("k{kill}-s{depth}"),
            )));
        }
        tasks.push(tokio::spawn(lifecycle(
            d.client().await,
            m.clone(),
            rng.fork(),
        )));

        tokio::time::sleep(Duration::from_millis(rng.below(o.max_load_ms))).await;
        d.kill();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .context("a client did not notice the daemon's death")??;
        }
        let unexpected = std::mem::take(&mut lock(&m).unexpected);
        ensure!(
            unexpected.is_empty(),
            "kill {kill}: errors answered while the daemon was alive: {unexpected:?}"
        );

        // Every other kill, the harness checks the file as the kill left it; otherwise
        // the daemon meets it first (its own recovery path: kmsd runs the same integrity
        // check when it opens the store, and logs a failed one).
        if kill % 2 == 0 {
            let clean = kmsd::store::check_file(&store)
                .with_context(|| format!("kill {kill}: the store does not open after SIGKILL"))?;
            ensure!(
                clean,
                "kill {kill}: redb's integrity check failed (repaired)"
            );
            checked.integrity_checks += 1;
        } else {
            checked.daemon_recoveries += 1;
        }

        d.restart_with(options());
        ensure!(
            !d.log_text().contains("integrity check"),
            "kill {kill}: kmsd's integrity check on open failed:\n{}",
            d.log_text()
        );
        verify(&d.socket, &m, since, &mut rng, checked, false)
            .await
            .with_context(|| format!("after kill {}", kill + 1))?;
        if (kill + 1) % 50 == 0 {
            let m = lock(&m);
            eprintln!(
                "kms-crash: {} kills, {} ciphertexts acknowledged, {} decrypted in checks",
                kill + 1,
                m.ciphertexts.len(),
                checked.ciphertexts_decrypted
            );
        }
    }
    // Finally every ciphertext ever acknowledged, and a clean stop.
    lock(&m).iteration_calls.clear();
    verify(&d.socket, &m, wall_ms(), &mut rng, checked, true)
        .await
        .context("final check")?;
    ensure!(d.stop() == Some(0), "kmsd did not stop cleanly");
    ensure!(
        kmsd::store::check_file(&store)?,
        "integrity check after the clean stop"
    );
    checked.integrity_checks += 1;
    let acked = lock(&m).acked.clone();
    Ok(acked)
}

fn main() -> std::process::ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("kms-crash: {e:#}");
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
            eprintln!("kms-crash: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if !o.json {
        println!(
            "kms-crash: {} kills, seed {}, load up to {} ms per kill",
            o.kills, o.seed, o.max_load_ms
        );
    }
    let started = Instant::now();
    let mut d = TestDaemon::start_with(options());
    let mut checked = Checked::default();
    let result = runtime.block_on(run(&o, &mut d, &mut checked));
    let store_bytes = std::fs::metadata(d.data_dir.join("kms.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    let report = Report {
        ok: result.is_ok(),
        kills: o.kills,
        seed: o.seed,
        elapsed_s: started.elapsed().as_secs_f64(),
        acknowledged: result.as_ref().cloned().unwrap_or_default(),
        checked,
        store_bytes,
        error: result.as_ref().err().map(|e| format!("{e:#}")),
    };
    if let Err(e) = &result {
        // Keep the evidence.
        let keep = std::env::temp_dir().join(format!("kms-crash-failure-{}", o.seed));
        let _ = std::fs::create_dir_all(&keep);
        if let Ok(entries) = std::fs::read_dir(&d.data_dir) {
            for entry in entries.flatten() {
                let _ = std::fs::copy(entry.path(), keep.join(entry.file_name()));
            }
        }
        let _ = std::fs::copy(&d.log, keep.join("kmsd.log"));
        eprintln!(
            "kms-crash: FAILED: {e:#}\nthe data directory and log are kept in {}",
            keep.display()
        );
    }
    if o.json {
        println!("{:#}", report.json());
    } else {
        println!(
            "{} after {} kills in {:.1} s: acknowledged {:?}; checked {:?}; store {} bytes",
            if report.ok { "OK" } else { "FAILED" },
            report.kills,
            report.elapsed_s,
            report.acknowledged,
            report.checked,
            report.store_bytes
        );
    }
    if report.ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
