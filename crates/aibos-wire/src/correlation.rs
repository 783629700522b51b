//! Correlation ids and W3C trace context, parsed once at the edge.

use std::fmt;
use uuid::Uuid;

/// The header that carries a request's correlation id in and out.
pub const CORRELATION_HEADER: &str = "x-correlation-id";
/// The W3C Trace Context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// A request's correlation id: a UUID, carried into logs, audit entries,
/// events and upstream calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CorrelationId(Uuid);

impl CorrelationId {
    /// A fresh id for a request that did not bring one (UUIDv7: sortable by time).
    ///
    /// Not `Uuid::now_v7()`: that orders ids within a millisecond by a counter
    /// behind one process-wide mutex, which every request would take. Ids of
    /// the same millisecond are ordered by chance instead, and stay unique by
    /// their 74 random bits (from uuid's thread-local generator).
    pub fn generate() -> CorrelationId {
        CorrelationId(Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext)))
    }

    /// Parses a client-supplied id; only UUIDs in any standard text form are accepted.
    pub fn parse(text: &str) -> Option<CorrelationId> {
        // The hyphenated form is 36 characters; braced/urn forms are longer but bounded.
        if text.len() > 45 {
            return None;
        }
        Uuid::try_parse(text).ok().map(CorrelationId)
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// The hyphenated form, written into `buf` without the formatting machinery.
    pub fn encode<'b>(&self, buf: &'b mut [u8; 36]) -> &'b str {
        self.0.hyphenated().encode_lower(buf)
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// A parsed W3C `traceparent` (version 00): trace id, parent span id, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// 8 bytes, never all zero.
    pub span_id: [u8; 8],
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; anything else is `None` and is
    /// replaced by a new trace, as the W3C specification asks.
    pub fn parse(text: &str) -> Option<TraceParent> {
        let bytes = text.as_bytes();
        if bytes.len() < 55 {
            return None;
        }
        let mut parts = text.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        // Version 00 has exactly four fields; future versions may append more.
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let _version = u8::from_str_radix(version, 16).ok()?;
        let trace_id: [u8; 16] = decode_hex(trace)?;
        let span_id: [u8; 8] = decode_hex(span)?;
        let [flags]: [u8; 1] = decode_hex(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    /// Derives a child context: same trace, new span id from `span_seed`.
    pub fn child(&self, span_seed: [u8; 8]) -> TraceParent {
        TraceParent {
            span_id: non_zero(span_seed),
            ..*self
        }
    }

    /// A new root context from random bytes (taken from a UUIDv4 by the caller).
    pub fn root(trace_seed: [u8; 16], span_seed: [u8; 8]) -> TraceParent {
        let mut trace_id = trace_seed;
        if trace_id == [0; 16] {
            trace_id[15] = 1;
        }
        TraceParent {
            trace_id,
            span_id: non_zero(span_seed),
            flags: 0x01,
        }
    }

    /// The trace id as 32 lowercase hex characters.
    pub fn trace_id_hex(&self) -> String {
        encode_hex(&self.trace_id)
    }

    /// The trace id, displayed as hex without allocating (for log fields).
    pub fn trace_id_display(&self) -> TraceIdDisplay<'_> {
        TraceIdDisplay(&self.trace_id)
    }

    /// The `traceparent` header's 55 characters, written without the
    /// formatting machinery or an allocation (the gateway sends one per call).
    pub fn encode<'b>(&self, buf: &'b mut [u8; TRACEPARENT_LEN]) -> &'b str {
        buf[..3].copy_from_slice(b"00-");
        hex_into(&self.trace_id, &mut buf[3..35]);
        buf[35] = b'-';
        hex_into(&self.span_id, &mut buf[36..52]);
        buf[52] = b'-';
        hex_into(&[self.flags], &mut buf[53..55]);
        std::str::from_utf8(buf).expect("hex digits and dashes are ASCII")
    }
}

/// Length of a version-00 `traceparent`.
pub const TRACEPARENT_LEN: usize = 55;

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.encode(&mut [0; TRACEPARENT_LEN]))
    }
}

/// Displays a trace id as 32 lowercase hex characters.
pub struct TraceIdDisplay<'a>(&'a [u8; 16]);

impl fmt::Display for TraceIdDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", u128::from_be_bytes(*self.0))
    }
}

fn non_zero(mut span: [u8; 8]) -> [u8; 8] {
    if span == [0; 8] {
        span[7] = 1;
    }
    span
}

fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let bytes = text.as_bytes();
    if bytes.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = hex_value(pair[0])?;
        let lo = hex_value(pair[1])?;
        out[i] = (hi << 4) | lo;
    }
    Some(out)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        // W3C requires lowercase; uppercase is invalid.
        _ => None,
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    let mut out = vec![0; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Lowercase hex of `bytes` into `out`, which is twice as long.
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[(b >> 4) as usize];
        pair[1] = DIGITS[(b & 0x0f) as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn correlation_ids_accept_uuids_only() {
        assert!(CorrelationId::parse("0190f3c4-7e2a-7c4e-9d1a-2b3c4d5e6f70").is_some());
        for bad in [
            "not-a-uuid",
            "",
            "' OR 1=1 --",
            "0190f3c4-7e2a-7c4e-9d1a-2b3c4d5e6f7",
        ] {
            assert!(CorrelationId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn traceparent_table() {
        let check =
            |input: &str, ok: bool| assert_eq!(TraceParent::parse(input).is_some(), ok, "{input}");
        check(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            true,
        );
        check(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            false,
        );
        check(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            false,
        );
        check(
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            false,
        );
        check(
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            false,
        );
        check(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            false,
        );
        check("garbage", false);
    }

    proptest! {
        #[test]
        fn trace_id_display_matches_hex(trace in any::<[u8; 16]>(), span in any::<[u8; 8]>()) {
            let tp = TraceParent::root(trace, span);
            prop_assert_eq!(tp.trace_id_display().to_string(), tp.trace_id_hex());
        }

        #[test]
        fn traceparent_round_trips(trace in any::<[u8; 16]>(), span in any::<[u8; 8]>(), flags in any::<u8>()) {
            let tp = TraceParent::root(trace, span);
            let tp = TraceParent { flags, ..tp };
            prop_assert_eq!(TraceParent::parse(&tp.to_string()), Some(tp));
        }

        #[test]
        fn traceparent_encodes_as_the_w3c_text(trace in any::<[u8; 16]>(), span in any::<[u8; 8]>(), flags in any::<u8>()) {
            let tp = TraceParent { flags, ..TraceParent::root(trace, span) };
            let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
            let expected = format!("00-{}-{}-{flags:02x}", hex(&tp.trace_id), hex(&tp.span_id));
            let mut buf = [0; TRACEPARENT_LEN];
            prop_assert_eq!(tp.encode(&mut buf), expected.as_str());
            prop_assert_eq!(tp.to_string(), expected);
        }

        #[test]
        fn correlation_ids_encode_hyphenated(bytes in any::<[u8; 16]>()) {
            let id = CorrelationId(Uuid::from_bytes(bytes));
            let mut buf = [0; 36];
            prop_assert_eq!(id.encode(&mut buf), id.as_uuid().hyphenated().to_string());
        }

        #[test]
        fn traceparent_parse_never_panics(s in ".{0,80}") {
            let _ = TraceParent::parse(&s);
            let _ = CorrelationId::parse(&s);
        }
    }
}
