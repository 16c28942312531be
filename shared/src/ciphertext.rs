//! The self-describing output format `ncpkms:v{N}:{base64}` of ciphertexts and signatures
//! (NCP's own format). Parsing and formatting only; no cryptography here.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

const PREFIX: &str = "ncpkms:v";

/// Why a string is not a well-formed `ncpkms:` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    #[error("not an ncpkms value: it must start with \"ncpkms:v\"")]
    Prefix,
    #[error("the version in the prefix is not a number from 1 to 4294967295")]
    Version,
    #[error("the body after the prefix is not standard base64")]
    Base64,
}

/// Formats a version and a body as `ncpkms:v{N}:{base64}`.
pub fn format(version: u32, body: &[u8]) -> String {
    let mut s = String::with_capacity(PREFIX.len() + 12 + body.len().div_ceil(3) * 4);
    s.push_str(PREFIX);
    s.push_str(&version.to_string());
    s.push(':');
    STANDARD.encode_string(body, &mut s);
    s
}

/// Splits `ncpkms:v{N}:{base64}` into the version and the decoded body. Surrounding
/// whitespace (a trailing newline from a shell) is ignored.
pub fn parse(s: &str) -> Result<(u32, Vec<u8>), FormatError> {
    let (version, b64) = split(s)?;
    let body = STANDARD.decode(b64).map_err(|_| FormatError::Base64)?;
    Ok((version, body))
}

/// The version an `ncpkms:v{N}:…` value names, without decoding its body; `None` if its
/// prefix is malformed.
pub fn named_version(s: &str) -> Option<u32> {
    split(s).ok().map(|(version, _)| version)
}

/// The version and the still encoded body.
fn split(s: &str) -> Result<(u32, &str), FormatError> {
    let s = s.trim();
    let rest = s.strip_prefix(PREFIX).ok_or(FormatError::Prefix)?;
    let (ver, b64) = rest.split_once(':').ok_or(FormatError::Prefix)?;
    // Digits only: `u32::from_str` would also accept a leading '+'.
    if ver.is_empty() || ver.len() > 10 || !ver.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FormatError::Version);
    }
    let version: u32 = ver.parse().map_err(|_| FormatError::Version)?;
    if version == 0 || (ver.len() > 1 && ver.starts_with('0')) {
        return Err(FormatError::Version);
    }
    Ok((version, b64))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The documented example shape.
    #[test]
    fn known_value() {
        assert_eq!(format(3, b"hi"), "ncpkms:v3:aGk=");
        assert_eq!(parse("ncpkms:v3:aGk=\n").unwrap(), (3, b"hi".to_vec()));
    }

    /// Malformed prefixes, versions and bodies are each refused with their own error.
    #[test]
    fn malformed() {
        assert_eq!(parse("kms:v1:aGk="), Err(FormatError::Prefix));
        assert_eq!(parse("ncpkms:v1aGk="), Err(FormatError::Prefix));
        assert_eq!(parse("ncpkms:v0:aGk="), Err(FormatError::Version));
        assert_eq!(parse("ncpkms:v01:aGk="), Err(FormatError::Version));
        assert_eq!(parse("ncpkms:v+1:aGk="), Err(FormatError::Version));
        assert_eq!(parse("ncpkms:v99999999999:aGk="), Err(FormatError::Version));
        assert_eq!(parse("ncpkms:v1:a*k="), Err(FormatError::Base64));
        // The version of a value whose body is damaged is still known.
        assert_eq!(named_version("ncpkms:v7:a*k="), Some(7));
        assert_eq!(named_version("ncpkms:v01:aGk="), None);
    }

    proptest! {
        /// Every version and body round-trips.
        #[test]
        fn round_trip(v in 1u32.., body in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert_eq!(parse(&format(v, &body)).unwrap(), (v, body));
        }

        /// No input string panics the parser.
        #[test]
        fn never_panics(s in ".{0,80}") {
            let _ = parse(&s);
        }
    }
}
