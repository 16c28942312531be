//! Runs the Python client (tests/python/test_protocol.py), written from PROTOCOL.md with
//! the `msgpack` package and no Rust code, against the real kmsd binary.

#[test]
fn python_client_speaks_the_protocol() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_protocol.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .env("KMSD_BIN", kms_e2e::bin("kmsd"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}); install it (see .ci/install-deps)"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "Python protocol test failed (is the msgpack package installed? pip install msgpack):\n{stderr}"
    );
    // unittest prints "Ran N tests" and "OK"; make sure tests actually ran.
    assert!(
        stderr.contains("Ran 5 tests") && stderr.trim_end().ends_with("OK"),
        "{stderr}"
    );
}
