//! The `ncpkms:v{N}:{base64}` parser of ciphertexts and signatures on arbitrary strings:
//! no panic; what parses is canonical (formatting the parsed value gives back the trimmed
//! input, so no two strings name the same ciphertext) and parses again to the same value.
#![no_main]

use kms_shared::ciphertext;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok((version, body)) = ciphertext::parse(&s) {
        assert!(version >= 1);
        let formatted = ciphertext::format(version, &body);
        assert_eq!(formatted, s.trim());
        assert_eq!(ciphertext::parse(&formatted), Ok((version, body)));
    }
});
