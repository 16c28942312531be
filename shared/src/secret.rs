//! [`Secret`]: the bytes of a plaintext or a data key as requests and replies carry them.
//!
//! A decrypted plaintext or a data key passes through several copies of a request or a
//! reply: the daemon's, the client library's, the program's. Each of them is wiped when
//! dropped, and none is printed by `Debug` (a reply logged by mistake shows a length, not
//! the key). On the wire it is MessagePack binary, like any other bytes.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Secret bytes: wiped when dropped, redacted by `Debug`. Reads as a byte slice.
#[derive(Clone, Default, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Secret(Vec<u8>);

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
        self.0 == other
    }
}

impl PartialEq<&[u8]> for Secret {
    fn eq(&self, other: &&[u8]) -> bool {
        self.0 == *other
    }
}

impl PartialEq<Vec<u8>> for Secret {
    fn eq(&self, other: &Vec<u8>) -> bool {
        &self.0 == other
    }
}

impl<const N: usize> PartialEq<[u8; N]> for Secret {
    fn eq(&self, other: &[u8; N]) -> bool {
        self.0 == other
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for Secret {
    fn eq(&self, other: &&[u8; N]) -> bool {
        self.0 == *other
    }
}

impl PartialEq<Secret> for Vec<u8> {
    fn eq(&self, other: &Secret) -> bool {
        *self == other.0
    }
}

impl PartialEq<Secret> for &[u8] {
    fn eq(&self, other: &Secret) -> bool {
        *self == other.0
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    /// Into the secret's own buffer (MessagePack `bin`; an array of integers is accepted
    /// too, as serde_bytes does).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        serde_bytes::ByteBuf::deserialize(d).map(|b| Secret(b.into_vec()))
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
