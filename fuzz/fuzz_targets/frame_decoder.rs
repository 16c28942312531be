//! The daemon's framing layer on a hostile byte stream: `codec::read_frame` splits the
//! stream into frames (a length over the maximum is refused before any allocation), each
//! body goes through the `ClientFrame` decoder, and whatever decodes must survive an
//! encode/decode round trip unchanged. Nothing may panic, hang or allocate beyond the
//! maximum frame size.
#![no_main]

use kms_shared::codec::{self, FrameError};
use kms_shared::protocol::ClientFrame;
use libfuzzer_sys::fuzz_target;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// Small enough for the fuzzer to reach the limit, large enough for real requests.
const MAX: u32 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    // Each frame consumes at least its 4-byte prefix, so this ends.
    loop {
        let fut = pin!(codec::read_frame(&mut stream, MAX));
        // A byte slice never returns Pending: one poll completes the read.
        let Poll::Ready(r) = fut.poll(&mut Context::from_waker(Waker::noop())) else {
            panic!("read_frame on a byte slice returned Pending");
        };
        match r {
            Ok(None) => break,
            Ok(Some(body)) => {
                assert!(body.len() <= MAX as usize);
                if let Ok(frame) = codec::decode::<ClientFrame>(&body) {
                    let again = codec::encode_frame(&frame, u32::MAX).expect("re-encode");
                    let back: ClientFrame = codec::decode(&again[4..]).expect("decode re-encoded");
                    assert_eq!(back, frame);
                }
            }
            Err(FrameError::TooLarge { len, max }) => {
                assert!(len > max);
                break;
            }
            Err(FrameError::Truncated) => break,
            Err(e) => panic!("unexpected error on a byte slice: {e}"),
        }
    }
});
