//! Times on the wire and in the database: UTC RFC 3339 with milliseconds.

use time::OffsetDateTime;
use time::format_description::FormatItem;
use time::macros::format_description;

const FORMAT: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// Now, in UTC.
pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// `2026-11-23T01:02:03.456Z`. The text sorts like the time it names.
pub fn format(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(FORMAT)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_owned())
}

/// Now, formatted.
pub fn now_text() -> String {
    format(now())
}

/// Parses any RFC 3339 time (clients may send offsets or other precisions).
pub fn parse(text: &str) -> Option<OffsetDateTime> {
    if text.len() > 64 {
        return None;
    }
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_milliseconds_in_utc() {
        let t = parse("2026-11-23T03:04:05.6789+02:00").unwrap();
        assert_eq!(format(t), "2026-11-23T01:04:05.678Z");
        assert!(parse("yesterday").is_none());
    }
}
