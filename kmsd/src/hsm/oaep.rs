//! EME-OAEP decoding (RFC 8017 §7.1.2) with SHA-256 and MGF1-SHA-256, no label, for
//! tokens that do RSA-OAEP only with SHA-1 (SoftHSM2): the token computes `c^d mod n`
//! with the private key that never leaves it (`CKM_RSA_X_509`), and this module removes
//! the padding.
//!
//! The checks run in constant time over the whole block (with `subtle`), and every
//! failure is the same `None`, so neither timing nor the error tells an attacker which
//! check failed (Manger's attack needs exactly that distinction). Only the length of a
//! valid message shows, as it does with any decryption.

use sha2::{Digest, Sha256};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
use zeroize::Zeroizing;

const HASH_LEN: usize = 32;

/// The message inside an encoded block `em` (as long as the modulus), or `None`.
pub fn decode_sha256(em: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let k = em.len();
    if k < 2 * HASH_LEN + 2 {
        return None;
    }
    let (y, rest) = em.split_first()?;
    let (masked_seed, masked_db) = rest.split_at(HASH_LEN);
    let seed_mask = mgf1_sha256(masked_db, HASH_LEN);
    let mut seed = Zeroizing::new([0u8; HASH_LEN]);
    for (i, b) in seed.iter_mut().enumerate() {
        *b = masked_seed[i] ^ seed_mask[i];
    }
    let db_mask = mgf1_sha256(seed.as_slice(), masked_db.len());
    let db: Zeroizing<Vec<u8>> = Zeroizing::new(
        masked_db
            .iter()
            .zip(db_mask.iter())
            .map(|(a, b)| a ^ b)
            .collect(),
    );
    let lhash = Sha256::digest(b"");
    let mut good = y.ct_eq(&0) & db[..HASH_LEN].ct_eq(lhash.as_slice());
    // Find the 0x01 after the zero padding without branching on secret bytes.
    let mut looking = Choice::from(1);
    let mut invalid = Choice::from(0);
    let mut index = 0u32;
    for (i, b) in db.iter().enumerate().skip(HASH_LEN) {
        let is_one = b.ct_eq(&1);
        let is_zero = b.ct_eq(&0);
        index.conditional_assign(&(i as u32), looking & is_one);
        invalid |= looking & !is_zero & !is_one;
        looking &= !is_one;
    }
    good &= !looking & !invalid;
    if bool::from(good) {
        Some(Zeroizing::new(db[index as usize + 1..].to_vec()))
    } else {
        None
    }
}

/// MGF1 with SHA-256 (RFC 8017 §B.2.1).
fn mgf1_sha256(seed: &[u8], len: usize) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(len + HASH_LEN));
    let mut counter = 0u32;
    while out.len() < len {
        let mut h = Sha256::new();
        h.update(seed);
        h.update(counter.to_be_bytes());
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(len);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// EME-OAEP encoding (RFC 8017 §7.1.1) with a given seed, for the tests.
    fn encode(msg: &[u8], seed: [u8; 32], k: usize) -> Vec<u8> {
        let mut db = Sha256::digest(b"").to_vec();
        db.resize(k - msg.len() - HASH_LEN - 2, 0);
        db.push(1);
        db.extend_from_slice(msg);
        let db_mask = mgf1_sha256(&seed, db.len());
        let masked_db: Vec<u8> = db.iter().zip(db_mask.iter()).map(|(a, b)| a ^ b).collect();
        let seed_mask = mgf1_sha256(&masked_db, HASH_LEN);
        let mut em = vec![0u8];
        em.extend(seed.iter().zip(seed_mask.iter()).map(|(a, b)| a ^ b));
        em.extend_from_slice(&masked_db);
        em
    }

    /// Encoded messages of 0 to 190 bytes decode to themselves.
    #[test]
    fn round_trip() {
        for len in [0usize, 1, 32, 190] {
            let msg = vec![0xa5; len];
            let em = encode(&msg, [len as u8; 32], 256);
            assert_eq!(em.len(), 256);
            assert_eq!(*decode_sha256(&em).unwrap(), msg);
        }
    }

    /// Any flipped byte fails alike: the leading zero directly, any other byte because the
    /// seed mask covers all of the masked block, so the label hash no longer matches.
    #[test]
    fn tampering_fails() {
        let em = encode(b"secret", [9; 32], 256);
        for i in [0usize, 1, 20, 33, 40, 64, 100, 200, 248, 255] {
            let mut bad = em.clone();
            bad[i] ^= 0x01;
            assert!(decode_sha256(&bad).is_none(), "byte {i}");
        }
        assert!(decode_sha256(&em[..60]).is_none());
        assert!(decode_sha256(&[0u8; 256]).is_none());
    }

    /// MGF1-SHA-256 matches a known value: the first block is SHA-256(seed ‖ 0x00000000).
    #[test]
    fn mgf1_first_block() {
        let m = mgf1_sha256(b"abc", 40);
        let mut h = Sha256::new();
        h.update(b"abc");
        h.update([0, 0, 0, 0]);
        assert_eq!(&m[..32], h.finalize().as_slice());
        assert_eq!(m.len(), 40);
    }
}
