//! The operating system's CSPRNG (`getrandom`), and the small helpers built on it.

use zeroize::Zeroizing;

use super::CryptoError;

/// Fills `buf` from the OS CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|_| CryptoError::Rng)
}

/// A fresh key tag: 16 CSPRNG bytes as 32 lowercase hex chars (SPEC §2).
pub fn random_tag() -> Result<String, CryptoError> {
    let mut bytes = [0u8; 16];
    fill_random(&mut bytes)?;
    Ok(hex_lower(&bytes))
}

/// `n` fresh CSPRNG bytes, zeroized when dropped (data keys, nonces, key material).
pub fn random_bytes(n: usize) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let mut out = Zeroizing::new(vec![0u8; n]);
    fill_random(&mut out)?;
    Ok(out)
}

/// Lowercase hex of public bytes (tags, fingerprints). Not for secrets.
pub(crate) fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// A tag is 32 lowercase hex chars, and 1,000 tags are all distinct.
    #[test]
    fn random_tag_format_and_uniqueness() {
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let tag = random_tag().unwrap();
            assert_eq!(tag.len(), 32);
            assert!(
                tag.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
                "{tag}"
            );
            assert!(seen.insert(tag));
        }
    }

    /// random_bytes returns exactly n bytes and is not constant (two 32-byte draws differ).
    #[test]
    fn random_bytes_length_and_freshness() {
        assert_eq!(random_bytes(0).unwrap().len(), 0);
        let a = random_bytes(32).unwrap();
        let b = random_bytes(32).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(*a, *b);
        assert_ne!(*a, vec![0u8; 32]);
    }

    /// hex_lower encodes every nibble correctly.
    #[test]
    fn hex_lower_known_vector() {
        assert_eq!(hex_lower(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex_lower(&[]), "");
    }
}
