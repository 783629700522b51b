//! The path of a gateway call: split into canon and remainder, and refused when
//! it could escape the canon's base path or match another route than it seems to.
//!
//! The remainder is forwarded exactly as the client encoded it; it is matched
//! against routes once percent-decoded. Refused outright: `.` and `..` segments
//! (encoded or not), encoded `/` and `\` (which would split a segment at the
//! cell but not here), backslashes, empty segments, control characters, a
//! `%` left after decoding (double encoding: the cell might decode again), and
//! `;`, plain or encoded: Spring, Tomcat, Jetty and others strip a segment's
//! `;…` "path parameters" before routing, so `/reports/export;x` would match
//! the route `/reports/{id}` here and be served as `/reports/export` there.

use std::borrow::Cow;

/// Why a path was refused.
pub type PathProblem = &'static str;

/// The refusal of a `;` anywhere in a gateway path.
pub const SEMICOLON: PathProblem =
    "';' (plain or %3B) is not forwarded: servers differ on whether it ends a path segment";

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
    let mut parts = segments.split('/').peekable();
    while let Some(segment) = parts.next() {
        if segment.is_empty() && parts.peek().is_some() {
            return Err("empty path segments ('//') are not forwarded");
        }
        let plain = percent_decode(segment)?;
        if plain == "." || plain == ".." {
            return Err("'.' and '..' segments are not forwarded");
        }
        // One scan of the decoded segment for the three characters that would
        // make the cell see other segments than the matcher: a segment with no
        // escape is its own decoded form, so this covers `;` and `%3B` alike.
        match plain.bytes().find(|b| matches!(b, b'/' | b'\\' | b';')) {
            Some(b';') => return Err(SEMICOLON),
            Some(b'/') => return Err("an encoded '/' inside a segment is not forwarded"),
            Some(_) => return Err("backslashes, plain or encoded, are not forwarded"),
            None => {}
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
/// (A backslash, plain or encoded, is refused by the caller's scan.)
fn percent_decode(segment: &str) -> Result<Cow<'_, str>, PathProblem> {
    if !segment.contains('%') {
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

    #[test]
    fn semicolons_plain_or_encoded_are_refused_anywhere() {
        for raw in [
            "/reports/export;x",
            "/reports/export%3Bx",
            "/reports/export%3bx",
            "/reports;/export",
            "/;",
            "/%3B",
            "/a;b/c",
            "/a/b;",
            "/caf%C3%A9;x",
            "/a/%3B%2e%2e",
        ] {
            assert_eq!(decode_checked(raw), Err(SEMICOLON), "{raw}");
        }
        // Only the `;` itself: `%3` + `B` split across an escape is not one.
        assert_eq!(decode_checked("/a%20B").unwrap(), "/a B");
    }

    #[test]
    fn a_trailing_slash_is_the_only_empty_segment() {
        assert!(decode_checked("/a/b/").is_ok());
        assert!(decode_checked("/a//").is_err());
        assert!(decode_checked("//a").is_err());
    }
}
