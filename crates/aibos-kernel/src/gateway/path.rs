//! The path of a gateway call: split into canon and remainder, and refused when
//! it could escape the canon's base path or match another route than it seems to.
//!
//! The remainder is forwarded exactly as the client encoded it; it is matched
//! against routes once percent-decoded. Refused outright: `.` and `..` segments
//! (encoded or not), encoded `/` and `\` (which would split a segment at the
//! cell but not here), backslashes, empty segments, control characters, and a
//! `%` left after decoding (double encoding: the cell might decode again).

use std::borrow::Cow;

/// Why a path was refused.
pub type PathProblem = &'static str;

/// `/api/gateway/{canon}{remainder}` split; the remainder starts with `/`
/// (`/` alone when the call names only the canon).
pub fn split(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/api/gateway/")?;
    match rest.find('/') {
        Some(i) => Some((&rest[..i], &rest[i..])),
        None => Some((rest, "/")),
    }
}

/// Checks the raw remainder and returns it decoded for route matching.
pub fn decode_checked(raw: &str) -> Result<Cow<'_, str>, PathProblem> {
    if raw.len() > crate::limits::GATEWAY_PATH_BYTES_MAX {
        return Err("the path is too long");
    }
    if raw == "/" {
        return Ok(Cow::Borrowed(raw));
    }
    let segments = raw
        .strip_prefix('/')
        .ok_or("the path must start with '/'")?;
    let mut decoded = String::with_capacity(raw.len());
    let mut changed = false;
    for (i, segment) in segments.split('/').enumerate() {
        let last = i == segments.split('/').count() - 1;
        if segment.is_empty() && !last {
            return Err("empty path segments ('//') are not forwarded");
        }
        let plain = percent_decode(segment)?;
        if plain == "." || plain == ".." {
            return Err("'.' and '..' segments are not forwarded");
        }
        if plain.contains(['/', '\\']) {
            return Err("encoded '/' or '\\' inside a segment is not forwarded");
        }
        if plain.contains('%') {
            return Err("double percent-encoding is not forwarded");
        }
        if plain.chars().any(char::is_control) {
            return Err("control characters are not forwarded");
        }
        changed |= matches!(plain, Cow::Owned(_));
        decoded.push('/');
        decoded.push_str(&plain);
    }
    if changed {
        Ok(Cow::Owned(decoded))
    } else {
        Ok(Cow::Borrowed(raw))
    }
}

/// Decodes `%XX` escapes; a `%` not followed by two hex digits is refused.
fn percent_decode(segment: &str) -> Result<Cow<'_, str>, PathProblem> {
    if !segment.contains('%') {
        if segment.contains('\\') {
            return Err("backslashes are not forwarded");
        }
        return Ok(Cow::Borrowed(segment));
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or("a '%' must be followed by two hex digits")?;
            let text =
                std::str::from_utf8(hex).map_err(|_| "a '%' must be followed by two hex digits")?;
            let byte = u8::from_str_radix(text, 16)
                .map_err(|_| "a '%' must be followed by two hex digits")?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| "the path is not UTF-8 once decoded")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_canon_and_remainder() {
        assert_eq!(split("/api/gateway/pay/a/b"), Some(("pay", "/a/b")));
        assert_eq!(split("/api/gateway/pay"), Some(("pay", "/")));
        assert_eq!(split("/api/gateway/pay/"), Some(("pay", "/")));
        assert_eq!(split("/api/other"), None);
    }

    #[test]
    fn plain_paths_pass_and_escapes_decode() {
        assert_eq!(decode_checked("/payments/42").unwrap(), "/payments/42");
        assert_eq!(decode_checked("/").unwrap(), "/");
        assert_eq!(decode_checked("/a/").unwrap(), "/a/");
        assert_eq!(decode_checked("/caf%C3%A9/x%20y").unwrap(), "/café/x y");
    }

    #[test]
    fn traversal_tricks_are_refused() {
        for raw in [
            "/a/../../x",
            "/..",
            "/./a",
            "/a/%2e%2e/x",
            "/a/%2E%2E/x",
            "/a/.%2e/x",
            "/a/%2e%2e%2fx",
            "/a%2fb",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "/a/%252e%252e/x",
            "/a/%25",
            "/a//b",
            "/a/%zz",
            "/a/%2",
            "/a/%00",
            "/a/%ff",
        ] {
            assert!(decode_checked(raw).is_err(), "{raw} was accepted");
        }
    }
}
