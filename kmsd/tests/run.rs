//! The daemon as `kmsd::run` runs it: what makes it stop on its own.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

/// An accept loop that dies leaves a daemon serving nothing while its service manager
/// sees it running: kmsd must stop with an error instead (exit 1, so that systemd's
/// `Restart=on-failure` starts it again). Here it panics as it starts, on a connection
/// limit beyond what tokio's semaphore holds — a value the config file refuses since, but
/// a `Config` built in code can still carry. It used to run on until told to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_stops_when_its_accept_loop_dies() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = kmsd::config::Config::defaults();
    config.data_dir = dir.path().join("data");
    config.socket = dir.path().join("run").join("kmsd.sock");
    config.credentials_dir = None;
    config.max_connections = usize::MAX;
    let ran = tokio::time::timeout(
        Duration::from_secs(10),
        kmsd::run(config, std::future::pending()),
    )
    .await
    .expect("kmsd ran on without its accept loop");
    let err = ran.unwrap_err();
    assert!(
        format!("{err:#}").contains("accept loop stopped"),
        "{err:#}"
    );
    assert_eq!(kmsd::exit_status(&err), 1);
    // The store was closed cleanly (nothing was wrong with it): a clean-stop record.
    assert!(
        dir.path().join("data").join("kms.redb.clean").exists(),
        "no clean stop recorded"
    );
}
