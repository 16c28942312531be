//! A smoke run of kms-bench (a few hundred operations per case) so the benchmark never
//! rots. It asserts that every case ran without errors, never how fast.

#[test]
fn kms_bench_smoke_runs_every_case() {
    let out = std::process::Command::new(kms_e2e::bin("kms-bench"))
        .args(["--smoke", "--conns", "2", "--depth", "2", "--json"])
        .output()
        .expect("run kms-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kms-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(cases.len(), 15, "{stdout}");
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
    }
}
