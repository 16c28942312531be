//! The MessagePack decoders of both directions on arbitrary bytes: `ClientFrame` (what the
//! daemon decodes from every client), `Request` alone, and `ServerFrame` (what every
//! client decodes from the daemon). Nothing may panic; whatever decodes must encode and
//! decode back to an equal value.
#![no_main]

use kms_shared::codec;
use kms_shared::protocol::{ClientFrame, Request, ServerFrame};
use libfuzzer_sys::fuzz_target;

fn round_trip<T>(data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = codec::decode::<T>(data) {
        let bytes = codec::encode(&v).expect("re-encode");
        let back: T = codec::decode(&bytes).expect("decode re-encoded");
        assert_eq!(back, v);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<ClientFrame>(data);
    round_trip::<Request>(data);
    round_trip::<ServerFrame>(data);
});
