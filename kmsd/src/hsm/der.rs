//! The few DER encodings needed to turn token attributes into the same public keys
//! `basic` keys have: the P-256 point inside `CKA_EC_POINT`, and an RSA SPKI built from
//! `CKA_MODULUS` and `CKA_PUBLIC_EXPONENT`.

/// The uncompressed SEC1 point (`04 ‖ X ‖ Y`, 65 bytes) of a P-256 `CKA_EC_POINT`, which
/// PKCS#11 defines as a DER OCTET STRING around the point (some tokens give the bare
/// point: both are accepted).
pub fn ec_point(attr: &[u8]) -> Option<&[u8]> {
    const POINT_LEN: usize = 65;
    match attr {
        [0x04, rest @ ..] if rest.len() == POINT_LEN - 1 => Some(attr),
        [0x04, len, point @ ..] if usize::from(*len) == point.len() && point.len() == POINT_LEN => {
            Some(point)
        }
        [0x04, 0x81, len, point @ ..]
            if usize::from(*len) == point.len() && point.len() == POINT_LEN =>
        {
            Some(point)
        }
        _ => None,
    }
}

/// PKCS#1 `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }`.
pub fn rsa_public_key(n: &[u8], e: &[u8]) -> Vec<u8> {
    let mut body = integer(n);
    body.extend_from_slice(&integer(e));
    tlv(0x30, &body)
}

/// X.509 `SubjectPublicKeyInfo` of an RSA key (rsaEncryption, NULL parameters), the
/// encoding aws-lc gives `basic` keys, so both PEMs look alike.
pub fn rsa_spki(n: &[u8], e: &[u8]) -> Vec<u8> {
    const ALGORITHM: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0x00];
    bits.extend_from_slice(&rsa_public_key(n, e));
    let mut body = ALGORITHM.to_vec();
    body.extend_from_slice(&tlv(0x03, &bits));
    tlv(0x30, &body)
}

/// A non-negative INTEGER from big-endian bytes: minimal, with a leading zero when the
/// high bit is set.
fn integer(bytes: &[u8]) -> Vec<u8> {
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    let mut v = Vec::with_capacity(bytes.len() - first + 1);
    match bytes.get(first) {
        None => v.push(0),
        Some(&b) if b & 0x80 != 0 => v.push(0),
        Some(_) => {}
    }
    v.extend_from_slice(&bytes[first..]);
    tlv(0x02, &v)
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = Vec::with_capacity(len + 6);
    out.push(tag);
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(bytes.len() - 1);
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::{KeyPair, KeySize, PublicEncryptingKey};
    use aws_lc_rs::signature::KeyPair as _;

    /// The SPKI built from (n, e) is byte for byte the one aws-lc encodes for the same key.
    #[test]
    fn rsa_spki_matches_aws_lc() {
        let kp = KeyPair::generate(KeySize::Rsa2048).unwrap();
        let der = kp.as_der().unwrap();
        let private = aws_lc_rs::rsa::PrivateDecryptingKey::from_pkcs8(der.as_ref()).unwrap();
        let expected = private.public_key().as_der().unwrap();
        let comps: aws_lc_rs::rsa::PublicKeyComponents<Vec<u8>> = kp.public_key().into();
        let spki = rsa_spki(&comps.n, &comps.e);
        assert_eq!(spki, expected.as_ref());
        PublicEncryptingKey::from_der(&spki).unwrap();
        // Leading zeros in the attribute do not change the encoding.
        let mut padded_n = vec![0, 0];
        padded_n.extend_from_slice(&comps.n);
        assert_eq!(rsa_spki(&padded_n, &[0, 1, 0, 1]), spki);
    }

    /// CKA_EC_POINT is accepted wrapped in an OCTET STRING or bare; anything else is refused.
    #[test]
    fn ec_point_forms() {
        let mut point = vec![0x04];
        point.extend_from_slice(&[7u8; 64]);
        let mut wrapped = vec![0x04, 65];
        wrapped.extend_from_slice(&point);
        assert_eq!(ec_point(&wrapped), Some(&point[..]));
        assert_eq!(ec_point(&point), Some(&point[..]));
        assert_eq!(ec_point(&wrapped[..40]), None);
        assert_eq!(ec_point(&[]), None);
    }
}
