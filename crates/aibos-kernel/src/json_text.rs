//! JSON written by hand where serde's serializer is the cost: the audit chain's
//! canonical form and the gateway's assertion claims. Only strings need care;
//! this is the one place they are escaped.

use serde::Serialize as _;

/// Appends `s` as a JSON string exactly as serde_json (and RFC 8785) writes it:
/// `"` and `\` escaped, control characters as `\b \t \n \f \r` or `\u00xx`,
/// everything else, UTF-8 included, as is.
pub fn push_string(out: &mut Vec<u8>, s: &str) {
    // The usual case (ids, hashes, times, names, a path): nothing to escape.
    // A fold of bytes without an early exit, which the compiler turns into
    // wide compares.
    let needs_escape = s.bytes().fold(0u8, |any, b| {
        any | u8::from(b < 0x20) | u8::from(b == b'"') | u8::from(b == b'\\')
    });
    if needs_escape == 0 {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    // serde_json's escaping is the JCS one; reuse it rather than re-implement.
    let _ = s.serialize(&mut serde_json::Serializer::new(&mut *out));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn strings_are_written_as_serde_writes_them(s in any::<String>()) {
            let mut written = Vec::new();
            push_string(&mut written, &s);
            prop_assert_eq!(String::from_utf8(written).unwrap(), serde_json::to_string(&s).unwrap());
        }
    }

    #[test]
    fn every_ascii_character_is_written_as_serde_writes_it() {
        let all: String = (0u8..=0x7f).map(char::from).collect();
        for s in [all.as_str(), "plain-0190f3c4", ""] {
            let mut written = Vec::new();
            push_string(&mut written, s);
            assert_eq!(
                String::from_utf8(written).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
    }
}
