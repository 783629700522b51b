//! Every cap the hub enforces, with why this number.

use std::time::Duration;

/// The largest request body read, in bytes. A payment or an account opening is
/// a few hundred bytes; 64 KiB refuses junk early without ever refusing a real one.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// The smallest amount a payment moves, in minor units.
pub const AMOUNT_MINOR_MIN: i64 = 1;

/// The largest amount a payment moves or an opening posts, in minor units
/// (10^18): far above any real payment, and small enough that a few of them
/// cannot overflow a 64-bit balance unnoticed (each update also checks).
pub const AMOUNT_MINOR_MAX: i64 = 1_000_000_000_000_000_000;

/// The longest payment reference, in characters (the ISO 20022 remittance line).
pub const REFERENCE_CHARS_MAX: usize = 140;

/// The longest account name, in characters.
pub const ACCOUNT_NAME_CHARS_MAX: usize = 200;

/// The longest `Idempotency-Key`, in bytes (the kernel's own bound).
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;

/// Items per list page when `limit` is not given (SPEC §3).
pub const LIST_LIMIT_DEFAULT: u32 = 50;

/// The most items per list page (SPEC §3); more is a 400.
pub const LIST_LIMIT_MAX: u32 = 1000;

const _: () = assert!(LIST_LIMIT_DEFAULT <= LIST_LIMIT_MAX);

/// The longest a health probe waits for the database before calling the
/// ledger failed: the kernel's checker probes every few seconds.
pub const HEALTH_DB_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a request waits for a pooled connection before the hub answers
/// 503: long enough to ride out a burst, short enough that a client's own
/// timeout does not fire first.
pub const DB_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most write jobs one SQLite group commit runs in its transaction: one
/// fsync is shared by all of them, yet a batch stays short enough (tens of
/// milliseconds) that the first job's answer is not held back for long.
pub const GROUP_COMMIT_JOBS_MAX: usize = 64;

/// Write jobs queued for the SQLite writer at most; a caller finding the queue
/// full waits for room (up to [`DB_ACQUIRE_TIMEOUT`], then 503), so a burst is
/// pushed back onto the clients instead of growing memory without bound.
/// Sixteen batches: far more than the writer's backlog under a normal load.
pub const GROUP_COMMIT_QUEUE_JOBS_MAX: usize = 16 * GROUP_COMMIT_JOBS_MAX;

/// SQLite's busy timeout: a second process (a backup, the CLI) holding the
/// write lock briefly does not fail a payment.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The most connections of either pool.
pub const DB_CONNECTIONS_MAX: u32 = 256;

/// Outbox rows read per publisher pass: bounds memory and how long a shutdown
/// waits for the pass in hand.
pub const OUTBOX_BATCH_ROWS_MAX: i64 = 256;

/// Publishes in flight at once: enough to keep up with the hub's payment rate
/// over a few kernel connections, few enough not to flood the kernel.
pub const OUTBOX_PUBLISH_CONCURRENCY: usize = 16;

/// How often the publisher looks for due rows when nothing woke it.
pub const OUTBOX_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The first retry delay of a row whose publish failed; doubled per attempt.
pub const OUTBOX_BACKOFF_BASE: Duration = Duration::from_millis(500);

/// The longest delay between two attempts of one row (the contract's cap).
pub const OUTBOX_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The longest `last_error` kept on an outbox row, in characters.
pub const OUTBOX_ERROR_CHARS_MAX: usize = 500;

/// The most service accounts configured: one per tenant served.
pub const SERVICE_ACCOUNTS_MAX: usize = 1024;

/// How long a graceful shutdown waits for the publisher's pass in hand.
pub const SHUTDOWN_PUBLISHER_WAIT: Duration = Duration::from_secs(15);

/// Tenants that may have a part failed by the chaos switches at once: a bound
/// on the switches' memory (a tenant all healthy again holds none).
pub const CHAOS_TENANTS_MAX: usize = 10_000;
