//! A smoke run of kms-bench (a few hundred operations per case) so the benchmark never
//! rots. It asserts that every case ran without errors, never how fast.

#[test]
fn kms_bench_smoke_runs_every_case() {
    let out = std::process::Command::new(kms_e2e::bin("kms-bench"))
        .args([
            "--smoke", "--conns", "2", "--depth", "2", "--batch", "8", "--json",
        ])
        .output()
        .expect("run kms-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kms-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (journal, cases): (Vec<serde_json::Value>, Vec<serde_json::Value>) = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .partition(|c: &serde_json::Value| c["op"] == "journal-append");
    // The cost of one durable journal record, measured before the cases.
    assert_eq!(journal.len(), 1, "{stdout}");
    for field in ["p50_us", "p99_us", "cpu_us_per_append", "direct_io"] {
        assert!(
            journal[0].get(field).is_some(),
            "{field} missing in {stdout}"
        );
    }
    assert!(journal[0]["appends"].as_u64().unwrap_or(0) > 0, "{stdout}");
    assert_eq!(cases.len(), 17, "{stdout}");
    for c in &cases {
        for field in [
            "op",
            "conns",
            "depth",
            "ops_per_s",
            "p50_us",
            "p99_us",
            "inproc_ops_per_s",
            "floor_ops_per_s",
        ] {
            assert!(c.get(field).is_some(), "{field} missing in {c}");
        }
        assert_eq!(c["errors"], 0, "{c}");
        assert!(c["ops"].as_u64().unwrap_or(0) > 0, "{c}");
        // The floor was measured (its echo server is a process of its own).
        assert!(c["floor_ops_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{c}");
    }
    // The management cases run one call in flight per connection, and say so.
    for op in ["rotate", "create"] {
        let c = cases.iter().find(|c| c["op"] == op).expect(op);
        assert_eq!(c["depth"], 1, "{c}");
    }
    // Where the daemon's CPU went, by thread: signing runs on the crypto pool, and every
    // journaled call costs the store writer something.
    let case = |op: &str| {
        cases
            .iter()
            .find(|c| c["op"] == op)
            .unwrap_or_else(|| panic!("no {op} in {stdout}"))
    };
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let sign = case("ecdsa-sign");
    assert!(num(&sign["daemon_cpu_us_per_op"]["crypto"]) > 0.0, "{sign}");
    assert!(num(&sign["inproc_all_cores_ops_per_s"]) > 0.0, "{sign}");
    let aes = case("aes-enc-1k");
    assert!(num(&aes["daemon_cpu_us_per_op"]["writer"]) > 0.0, "{aes}");
    assert!(num(&aes["daemon_cpu_us_per_op"]["reactor"]) > 0.0, "{aes}");
    assert!(num(&aes["client_cpu_us_per_op"]) > 0.0, "{aes}");
}

/// The scale mode on a small store: populated offline, served by a real daemon that lists,
/// shows and decrypts from it.
#[test]
fn kms_bench_scale_smoke() {
    scale_smoke(&[]);
}

/// The same on a store written as a kmsd of schema 1 left it (key material wrapped without
/// its type): the daemon's first start upgrades it, and every start after serves it.
#[test]
fn kms_bench_scale_smoke_upgrades_a_schema_1_store() {
    let v = scale_smoke(&["--scale-schema", "1"]);
    assert_eq!(v["schema_populated"], 1, "{v}");
    assert!(v.get("rss_mib_peak_first_start").is_some(), "{v}");
}

fn scale_smoke(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(kms_e2e::bin("kms-bench"))
        .args(["--smoke", "--scale", "300", "--json"])
        .args(args)
        .output()
        .expect("run kms-bench");
    assert!(
        out.status.success(),
        "kms-bench --scale failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["keys"], 300, "{v}");
    assert_eq!(v["history_entries"], 3000, "{v}");
    for field in [
        "startup_ms_after_clean_stop_median",
        "startup_ms_after_kill_median",
        "rss_mib_after_start",
        "list_first_page_p99_us",
        "list_all_median_ms",
        "show_p99_us",
        "idle_cpu_ms_per_s",
        "store_mib",
    ] {
        assert!(v.get(field).is_some(), "{field} missing in {v}");
    }
    v
}

/// The side-by-side script (tests/bench/side_by_side.py) drives kms-bench against the
/// daemons it alternates and summarises them, so the measurements in PERFORMANCE.md can be
/// repeated.
#[test]
fn side_by_side_script_runs() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/side_by_side.py");
    let kmsd = kms_e2e::bin("kmsd");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg("--bench")
        .arg(kms_e2e::bin("kms-bench"))
        .args(["--rounds", "1", "--cases", "aes-enc-1k"])
        .arg(&kmsd)
        .arg(&kmsd)
        .args(["--", "--smoke", "--conns", "2"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}); install it (see .ci/install-deps)"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "side_by_side.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.contains("aes-enc-1k")).count(),
        3,
        "two runs and one median line: {stdout}"
    );
    assert!(stdout.contains("medians of 1 rounds"), "{stdout}");
}
