//! kmsd's memory after large replies (docs/PERFORMANCE.md, "The heap fix").

#![allow(clippy::unwrap_used)]

use kms_e2e::{DaemonOptions, TestDaemon};
use kms_shared::client::Client;
use kms_shared::codec;
use kms_shared::protocol::{Outcome, Response, ServerFrame};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Whole lists of many keys (what `kmsctl list` and the dashboard ask for) do not leave
/// their replies' memory resident: ten lists grow kmsd by less than three replies' size
/// (room for the arenas of the blocking threads that build them). Before kmsd fixed
/// malloc's trim threshold, glibc's growing mmap threshold kept the replies' blocks on the
/// heap: 100,000 keys grew kmsd from 122 to 272 MiB over ten lists (this test's 30,000
/// keys, replies of 8 MiB: by about 75 MiB; with the fix, by about 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_lists_do_not_stay_resident() {
    const KEYS: usize = 30_000;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("data");
    let populated = dir.clone();
    tokio::task::spawn_blocking(move || {
        kms_e2e::scale::populate(&populated, KEYS, 1, kmsd::store::SCHEMA_VERSION)
    })
    .await
    .unwrap()
    .unwrap();
    let d = TestDaemon::start_with(DaemonOptions {
        data_dir: Some(dir),
        ..DaemonOptions::default()
    });
    let pid = d.pid().unwrap();
    let c = Client::connect(&d.socket).await.unwrap();
    // The start-up's passes over the store (on the blocking threads) are over: the memory
    // a list leaves is measured from here.
    // Settled: the same for a second (four samples), or after 10 s.
    let mut before = rss_kib(pid);
    let mut same = 0;
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let now = rss_kib(pid);
        same = if now == before { same + 1 } else { 0 };
        before = now;
        if same == 4 {
            break;
        }
    }
    let mut reply = 0;
    for _ in 0..10 {
        let (keys, total) = c.list_keys(false, 0, None).await.unwrap();
        assert_eq!((keys.len(), total as usize), (KEYS, KEYS));
        reply = codec::encode(&ServerFrame::Reply {
            id: 1,
            result: Outcome::Ok(Response::Keys { keys, total }),
        })
        .unwrap()
        .len() as u64;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let after = rss_kib(pid);
    let grown = after.saturating_sub(before);
    println!(
        "{KEYS} keys, reply {} KiB: {before} KiB before the lists, {after} KiB after ten",
        reply / 1024
    );
    assert!(
        grown * 1024 < 3 * reply,
        "kmsd grew by {grown} KiB over ten lists of {} KiB each",
        reply / 1024
    );
}
