//! The client library's `history` against a stand-in daemon on a real Unix socket: it
//! follows the daemon's resume points, and one that makes no progress is an error rather
//! than a loop without end.

#![allow(clippy::unwrap_used)]

use kms_shared::client::{Client, ClientError};
use kms_shared::codec;
use kms_shared::protocol::{
    ClientFrame, DEFAULT_MAX_FRAME, HistoryQuery, Outcome, PROTOCOL_VERSION, Request, Response,
    ServerFrame,
};
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

/// Serves one connection: the handshake, then every `history` request with an empty
/// page resuming where `resume` says, given the request's `before_seq`, which it sends
/// on `asked` (before answering).
fn stand_in(
    listener: UnixListener,
    resume: fn(Option<u64>) -> Option<u64>,
    asked: std::sync::mpsc::Sender<Option<u64>>,
) {
    let (mut s, _) = listener.accept().unwrap();
    loop {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            return;
        }
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        let frame: ClientFrame = codec::decode(&body).unwrap();
        let reply = match frame.request {
            Request::Hello { .. } => Response::Hello {
                protocol: PROTOCOL_VERSION,
                daemon_version: "stand-in".into(),
                max_frame: None,
            },
            Request::History(q) => {
                asked.send(q.before_seq).unwrap();
                Response::History {
                    entries: Vec::new(),
                    resume_before_seq: resume(q.before_seq),
                }
            }
            other => panic!("unexpected {other:?}"),
        };
        let out = ServerFrame::Reply {
            id: frame.id,
            result: Outcome::Ok(reply),
        };
        s.write_all(&codec::encode_frame(&out, DEFAULT_MAX_FRAME).unwrap())
            .unwrap();
    }
}

/// The client's `history` against [`stand_in`]: its result, and the `before_seq` of
/// each request it sent.
async fn history_from(
    resume: fn(Option<u64>) -> Option<u64>,
) -> (Result<usize, ClientError>, Vec<Option<u64>>) {
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kms-client-history-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // Ends when the client's connection closes.
    let (asked, told) = std::sync::mpsc::channel();
    std::thread::spawn(move || stand_in(listener, resume, asked));
    let client = Client::connect(&path).await.unwrap();
    let got = client
        .history(HistoryQuery {
            key: "k".into(),
            ..Default::default()
        })
        .await
        .map(|entries| entries.len());
    // Every request was answered, so sent on the channel, before the call returned.
    let asked = told.try_iter().collect();
    std::fs::remove_dir_all(&dir).unwrap();
    (got, asked)
}

#[tokio::test]
async fn resume_points_are_followed_and_must_make_progress() {
    // Three bounded reads further down, then the end.
    let down = |before: Option<u64>| match before {
        None => Some(300),
        Some(s) if s > 100 => Some(s - 100),
        Some(_) => None,
    };
    let (got, asked) = history_from(down).await;
    assert_eq!(got.unwrap(), 0);
    assert_eq!(asked, [None, Some(300), Some(200), Some(100)]);
    // The same point again: no progress, an error instead of a loop.
    let stuck = |before: Option<u64>| Some(before.unwrap_or(300));
    let (got, asked) = history_from(stuck).await;
    let err = got.unwrap_err();
    assert!(matches!(err, ClientError::Unexpected(_)), "{err}");
    assert_eq!(asked, [None, Some(300)]);
}
