//! [`Secret`]: the bytes of a plaintext or a data key as requests and replies carry them.
//!
//! A decrypted plaintext or a data key passes through several copies of a request or a
//! reply: the daemon's, the client library's, the program's. Each of them is wiped when
//! dropped, and none is printed by `Debug` (a reply logged by mistake shows a length, not
//! the key). On the wire it is MessagePack binary, like any other bytes.

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Secret bytes: wiped when dropped, redacted by `Debug`. Reads as a byte slice. `==`
/// compares in constant time for inputs of one length (`subtle`): a program that checks a
/// decrypted token against what it was given must not tell an attacker, by how long the
/// comparison took, how many leading bytes matched.
#[derive(Clone, Default, Zeroize, ZeroizeOnDrop)]
pub struct Secret(Vec<u8>);

/// Equal bytes, in time that depends only on the lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    bool::from(a.ct_eq(b))
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        same(&self.0, &other.0)
    }
}

impl Eq for Secret {}

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::Deref for Secret {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Secret {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl From<Vec<u8>> for Secret {
    fn from(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }
}

impl From<&[u8]> for Secret {
    fn from(bytes: &[u8]) -> Secret {
        Secret(bytes.to_vec())
    }
}

/// Takes the buffer over: no unwiped copy is left behind.
impl From<Zeroizing<Vec<u8>>> for Secret {
    fn from(mut bytes: Zeroizing<Vec<u8>>) -> Secret {
        Secret(std::mem::take(&mut *bytes))
    }
}

impl PartialEq<[u8]> for Secret {
    fn eq(&self, other: &[u8]) -> bool {
        same(&self.0, other)
    }
}

impl PartialEq<&[u8]> for Secret {
    fn eq(&self, other: &&[u8]) -> bool {
        same(&self.0, other)
    }
}

impl PartialEq<Vec<u8>> for Secret {
    fn eq(&self, other: &Vec<u8>) -> bool {
        same(&self.0, other)
    }
}

impl<const N: usize> PartialEq<[u8; N]> for Secret {
    fn eq(&self, other: &[u8; N]) -> bool {
        same(&self.0, other)
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for Secret {
    fn eq(&self, other: &&[u8; N]) -> bool {
        same(&self.0, *other)
    }
}

impl PartialEq<Secret> for Vec<u8> {
    fn eq(&self, other: &Secret) -> bool {
        same(self, &other.0)
    }
}

impl PartialEq<Secret> for &[u8] {
    fn eq(&self, other: &Secret) -> bool {
        same(self, &other.0)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    /// Into the secret's own buffer, from MessagePack `bin` only. An array of integers
    /// (which serde_bytes' `ByteBuf` accepts too) is refused, and so is a `str`: read
    /// element by element into a growing `Vec`, every growth would free the old buffer,
    /// a partial copy of the secret, unwiped, and an error part-way would drop the
    /// partial copy unwiped. A `bin` is copied once, at its exact length, or taken over.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        d.deserialize_byte_buf(SecretVisitor)
    }
}

/// Accepts byte strings only; see `Secret`'s `Deserialize`.
struct SecretVisitor;

impl<'de> Visitor<'de> for SecretVisitor {
    type Value = Secret;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a byte string (`bin`)")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Secret, E> {
        Ok(Secret(v.to_vec()))
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Secret, E> {
        Ok(Secret(v.to_vec()))
    }

    /// Takes the buffer over: no copy is left behind.
    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Secret, E> {
        Ok(Secret(v))
    }

    /// Refused without reading a single element.
    fn visit_seq<A: de::SeqAccess<'de>>(self, _seq: A) -> Result<Secret, A::Error> {
        Err(de::Error::invalid_type(de::Unexpected::Seq, &self))
    }

    /// Refused without its content in the error: `Unexpected::Str` would print the
    /// plaintext into a message that is sent back, and logged by clients.
    fn visit_str<E: de::Error>(self, _v: &str) -> Result<Secret, E> {
        Err(E::invalid_type(de::Unexpected::Other("a string"), &self))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// On the wire a secret is the same MessagePack `bin` as plain bytes, both ways;
    /// `Debug` shows its length only.
    #[test]
    fn encodes_as_bytes_and_prints_no_content() {
        let s = Secret::from(b"key material".to_vec());
        let wire = rmp_serde::to_vec(&s).unwrap();
        let plain = rmp_serde::to_vec(&serde_bytes::Bytes::new(b"key material")).unwrap();
        assert_eq!(wire, plain);
        let back: Secret = rmp_serde::from_slice(&plain).unwrap();
        assert_eq!(back, s);
        assert_eq!(back, b"key material");
        assert_eq!(format!("{s:?}"), "Secret(12 bytes)");
        assert!(!format!("{:?}", Some(&s)).contains("107"), "no byte values");
    }

    /// An `encrypt` request whose plaintext is `bin` decodes, the same bytes come back.
    #[test]
    fn encrypt_plaintext_as_bin_round_trips() {
        use crate::protocol::{ClientFrame, Request};
        let frame = ClientFrame {
            id: 7,
            request: Request::Encrypt {
                key: "key1".into(),
                plaintext: Secret::from(&b"hi there"[..]),
                context: None,
            },
        };
        let body = crate::codec::encode(&frame).unwrap();
        let back: ClientFrame = crate::codec::decode(&body).unwrap();
        assert_eq!(back, frame);
    }

    /// An `encrypt` request whose plaintext is an array of integers (not `bin`), or a
    /// `str`, is a decode error (`malformed-frame`): a secret is never read element by
    /// element into a growing `Vec` that leaves unwiped copies behind, and the error,
    /// which goes back to the client, does not hold the plaintext.
    #[test]
    fn encrypt_plaintext_as_array_or_str_is_refused() {
        use crate::codec::FrameError;
        use crate::protocol::ClientFrame;

        // The same frame as above, but `plaintext` is a Vec<u8> without serde_bytes,
        // which rmp_serde writes as an array of integers.
        #[derive(Serialize)]
        struct EncryptArr {
            key: String,
            plaintext: Vec<u8>,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "snake_case")]
        enum Req {
            Encrypt(EncryptArr),
        }
        #[derive(Serialize)]
        struct Frame {
            id: u64,
            request: Req,
        }
        let frame = Frame {
            id: 7,
            request: Req::Encrypt(EncryptArr {
                key: "key1".into(),
                plaintext: b"hi there".to_vec(),
            }),
        };
        let body = crate::codec::encode(&frame).unwrap();
        // `a9 "plaintext"` then a fixarray of 8 (0x98), not bin8 (0xc4).
        let at = body.windows(9).position(|w| w == b"plaintext").unwrap() + 9;
        assert_eq!(body[at], 0x98, "the plaintext is an array on the wire");
        match crate::codec::decode::<ClientFrame>(&body) {
            Err(FrameError::Decode(msg)) => {
                assert!(msg.contains("byte string (`bin`)"), "{msg}")
            }
            other => panic!("expected a decode error, got {other:?}"),
        }

        // The same with the plaintext as a `str`.
        #[derive(Serialize)]
        struct EncryptStr {
            key: String,
            plaintext: String,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "snake_case")]
        enum ReqStr {
            Encrypt(EncryptStr),
        }
        #[derive(Serialize)]
        struct FrameStr {
            id: u64,
            request: ReqStr,
        }
        let body = crate::codec::encode(&FrameStr {
            id: 7,
            request: ReqStr::Encrypt(EncryptStr {
                key: "key1".into(),
                plaintext: "hi there".into(),
            }),
        })
        .unwrap();
        match crate::codec::decode::<ClientFrame>(&body) {
            Err(FrameError::Decode(msg)) => {
                assert!(msg.contains("byte string (`bin`)"), "{msg}");
                assert!(
                    !msg.contains("hi there"),
                    "the plaintext is in the error: {msg}"
                );
            }
            other => panic!("expected a decode error, got {other:?}"),
        }
    }

    /// Every comparison a program may write means what it says (the constant-time
    /// comparison is only about how long it takes).
    #[test]
    fn comparisons_mean_equal_bytes() {
        let s = Secret::from(b"token".to_vec());
        let (same, other, shorter) = (
            Secret::from(b"token".as_slice()),
            Secret::from(b"tokeN".as_slice()),
            Secret::from(b"toke".as_slice()),
        );
        assert!(s == same && s != other && s != shorter);
        assert!(s != Secret::default());
        assert!(s == *b"token".as_slice() && s == b"token".as_slice());
        assert!(s == b"token".to_vec() && b"token".to_vec() == s);
        assert!(s == *b"token" && s == b"token" && s != b"tokens");
        assert!(b"token".as_slice() == s && b"toke".as_slice() != s);
        assert!(Secret::default() == *b"".as_slice());
    }

    /// Taking over a `Zeroizing` buffer keeps its bytes and leaves it empty.
    #[test]
    fn from_zeroizing_takes_the_buffer() {
        let z = Zeroizing::new(vec![1u8, 2, 3]);
        let ptr = z.as_ptr();
        let s = Secret::from(z);
        assert_eq!(s, [1u8, 2, 3]);
        assert_eq!(s.as_ptr(), ptr, "no copy");
    }
}
