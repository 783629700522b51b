//! Every cap the kernel enforces, in one place, with its unit last and its reason.
//!
//! Configurable limits take their bounds from here, so a configuration can never
//! lift a cap past what the code was written and tested for.

/// Upper bound of `server.shutdown_grace_seconds`: an orchestrator's own kill
/// timeout is rarely longer than ten minutes, and a longer drain hides a stuck request.
pub const SHUTDOWN_GRACE_SECONDS_MAX: u64 = 600;

/// Upper bound of `database.max_connections`: PostgreSQL's default `max_connections`
/// is 100, and several kernel instances share it.
pub const DB_CONNECTIONS_MAX: u64 = 500;

/// Upper bound of every database timeout: beyond ten minutes a request is lost anyway.
pub const DB_TIMEOUT_MS_MAX: u64 = 600_000;

/// Writes waiting for a group-commit writer (`db/group.rs`): a full queue
/// makes writers wait (backpressure) instead of growing memory. A waiting
/// write may hold an idempotent answer to store (up to 1 MiB sealed), so the
/// queue is kept to what a few batches need: 1,024 × 1.4 MiB at worst.
pub const GROUP_COMMIT_QUEUE_MAX: usize = 1024;

/// Writes committed together by the group-commit writer at most: enough that
/// one fsync serves a busy kernel's burst, few enough that the first write of a
/// batch does not wait on a long tail of others.
pub const GROUP_COMMIT_JOBS_MAX: usize = 64;

/// `/api/health` gives the database this long to answer its probe before it
/// reports it down; well under the 2 s within which an outage must show.
pub const HEALTH_DB_TIMEOUT_MS: u64 = 1_000;

/// HS256 secrets shorter than the hash output weaken the MAC (RFC 7518 §3.2).
pub const JWT_SECRET_BYTES_MIN: usize = 32;

/// A bootstrap key guards the first administrator: make guessing it hopeless.
pub const BOOTSTRAP_KEY_BYTES_MIN: usize = 16;

/// Upper bound of `auth.access_token_ttl_seconds`: one day. Revocation is
/// immediate anyway, but a shorter life limits a stolen token's reach.
pub const ACCESS_TOKEN_TTL_SECONDS_MAX: u64 = 86_400;

/// Upper bound of `http.max_body_bytes`: 64 MiB. Bodies are buffered for JSON
/// parsing, so this bounds memory per request.
pub const BODY_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Upper bound of every per-minute rate and burst: a hundred million per minute
/// (1.7 million a second), beyond what one tenant of a fleet of kernels sends;
/// a million a minute (17 000 a second) was below what one kernel serves, so a
/// limit meant never to refuse (benchmarks, a large tenant) could not be set.
/// On Redis, whose arithmetic is in microseconds, a rate is at most 60 million
/// per minute (one request per microsecond).
pub const RATE_PER_MINUTE_MAX: u64 = 100_000_000;

// Rate limits (ratelimit/).
/// Upper bound of `rate_limit.instances`: the share of a budget each instance
/// takes while Redis is down is budget / instances, at least one request.
pub const RATE_LIMIT_INSTANCES_MAX: u64 = 1_000;
/// Upper bound of `rate_limit.redis_timeout_ms`: a decision is on every
/// request's path, so Redis gets at most a second before the kernel decides alone.
pub const RATE_LIMIT_REDIS_TIMEOUT_MS_MAX: u64 = 1_000;
/// Characters of `rate_limit.redis_prefix`.
pub const RATE_LIMIT_PREFIX_CHARS_MAX: usize = 64;
/// Keys (users, tenants, addresses, route overrides) the in-process limiter
/// tracks at once: 16 bytes and a map slot each, ~40 MiB at most. A full
/// shard first drops the keys whose bucket is full again (what an absent key
/// means); a key that still finds no room is decided as a new one and not
/// stored (the limiter fails open rather than refuse clients it cannot track).
pub const RATE_LIMIT_KEYS_MAX: usize = 1 << 20;
/// Shards of the in-process limiter's map: a decision locks only its keys' shards.
pub const RATE_LIMIT_SHARDS: usize = 64;
const _: () = assert!(RATE_LIMIT_KEYS_MAX.is_multiple_of(RATE_LIMIT_SHARDS));
/// How often idle keys are dropped from the in-process limiter (and its map shrunk).
pub const RATE_LIMIT_SWEEP_SECONDS: u64 = 10;
/// How often the Redis backend is probed (PING): detects an outage without
/// traffic, and ends the degraded mode when Redis answers again.
pub const RATE_LIMIT_PROBE_MS: u64 = 500;

/// Upper bound of `idempotency.ttl_seconds`: 30 days of stored responses.
pub const IDEMPOTENCY_TTL_SECONDS_MAX: u64 = 30 * 86_400;

/// Upper bound of `gateway.health_interval_seconds`: one hour.
pub const HEALTH_INTERVAL_SECONDS_MAX: u64 = 3_600;

/// Upper bound of any upstream timeout (`gateway.*_timeout_ms`, canon and route
/// `timeout_ms`): ten minutes.
pub const UPSTREAM_TIMEOUT_MS_MAX: u64 = 600_000;

/// Largest circuit-breaker window: outcomes are kept as bits of one `u64`.
pub const BREAKER_WINDOW_MAX: u64 = 64;

/// A reused upstream connection idle at least this long gets a copy of a
/// body-less idempotent request sent on it, to send again on a fresh connection
/// if the cell closes the old one unanswered (cells close idle connections
/// after their own keep-alive timeout, often 5 s). A connection reused sooner
/// is not at risk, so the hot path copies nothing.
pub const UPSTREAM_RESEND_AFTER_IDLE_MS: u64 = 1_000;

/// Most retries of one gateway call.
pub const GATEWAY_RETRIES_MAX: u64 = 5;

// Webhook delivery (events::webhook). Grouped here, away from the end of the
// file, so that other sections can grow without touching these lines.

/// Bytes of a new webhook signing secret (`whsec_` + base64): 256 bits, as
/// Standard Webhooks' reference libraries generate.
pub const WEBHOOK_SECRET_BYTES: usize = 32;
/// Smallest and largest secret Standard Webhooks accepts (24–64 bytes).
pub const WEBHOOK_SECRET_BYTES_MIN: usize = 24;
/// See [`WEBHOOK_SECRET_BYTES_MIN`].
pub const WEBHOOK_SECRET_BYTES_MAX: usize = 64;
const _: () = assert!(
    WEBHOOK_SECRET_BYTES_MIN <= WEBHOOK_SECRET_BYTES
        && WEBHOOK_SECRET_BYTES <= WEBHOOK_SECRET_BYTES_MAX
);

/// Most entries of `events.webhook_retry_schedule_seconds`, so attempts per
/// delivery: the default has 8; beyond 20 a dead endpoint is kept alive for
/// nobody.
pub const WEBHOOK_ATTEMPTS_MAX: usize = 20;
/// Longest single wait of the retry schedule: a week.
pub const WEBHOOK_RETRY_DELAY_SECONDS_MAX: u64 = 7 * 86_400;
/// Longest `Retry-After` of a receiver (429/503) that is honoured; a longer
/// one waits this long, so a receiver cannot park a subscription for a year.
pub const WEBHOOK_RETRY_AFTER_SECONDS_MAX: u64 = 86_400;
/// Upper bound of `events.webhook_secret_grace_seconds`: 30 days of two secrets.
pub const WEBHOOK_SECRET_GRACE_SECONDS_MAX: u64 = 30 * 86_400;
/// Upper bound of `events.webhook_disable_after_hours`: 30 days.
pub const WEBHOOK_DISABLE_AFTER_HOURS_MAX: f64 = 720.0;
/// Bounds of `events.webhook_timeout_seconds`, one attempt from connect to the
/// last byte read: a receiver that needs a minute should answer 202 and work later.
pub const WEBHOOK_TIMEOUT_SECONDS_MIN: u64 = 1;
/// See [`WEBHOOK_TIMEOUT_SECONDS_MIN`].
pub const WEBHOOK_TIMEOUT_SECONDS_MAX: u64 = 60;
/// Upper bound of `events.webhook_max_concurrent_deliveries` per kernel
/// instance: each is a socket and a task; subscriptions beyond it wait their turn.
pub const WEBHOOK_CONCURRENT_DELIVERIES_MAX: u64 = 1_024;
/// Bytes of a receiver's response read into the attempt's excerpt; the rest is
/// never read (the connection is dropped instead of drained).
pub const WEBHOOK_RESPONSE_EXCERPT_BYTES: usize = 1_024;
/// How long resolving a webhook URL's host may take when a subscription is
/// created or changed (an unresolved host is accepted; delivery checks again).
pub const WEBHOOK_URL_RESOLVE_TIMEOUT_MS: u64 = 2_000;
/// Subscriptions per tenant: each costs the worker a query per wake-up.
pub const WEBHOOK_SUBSCRIPTIONS_PER_TENANT_MAX: i64 = 100;
/// A subscription's lease outlives one attempt by this much: an instance that
/// stalls longer than the lease loses the subscription to another one, which
/// then makes the attempt again (at least once).
pub const WEBHOOK_LEASE_MARGIN_SECONDS: u64 = 10;
/// Events read per database round trip while delivering one subscription's stream.
pub const WEBHOOK_BATCH_EVENTS_MAX: u32 = 256;
/// Delivery history and the subscription's cursor are written at least this
/// often while a stream is delivered (and at the end of each batch): what a
/// crash can make the kernel deliver again.
pub const WEBHOOK_FLUSH_INTERVAL_MS: u64 = 250;
/// How long one subscription keeps a delivery slot before it yields to others
/// waiting for one (it takes the slot again at the next turn).
pub const WEBHOOK_SLICE_MS: u64 = 2_000;
/// Period of the worker's look for due retries and leases left by a stopped
/// instance, when no event wakes it sooner.
pub const WEBHOOK_POLL_MS: u64 = 1_000;
/// Retries asked for through the API read per round trip (each is one
/// attempt; more wait for the next turn of the subscription).
pub const WEBHOOK_DUE_RETRIES_PER_READ: u32 = 16;
/// Idle keep-alive connections the delivery client keeps per receiver: one
/// per subscription in flight is what in-order delivery uses; a few more
/// absorb retries.
pub const WEBHOOK_POOL_IDLE_PER_HOST: usize = 32;
/// How long an idle connection to a receiver is kept.
pub const WEBHOOK_POOL_IDLE_SECONDS: u64 = 60;
/// How often finished deliveries older than the retention are purged.
pub const WEBHOOK_PURGE_INTERVAL_SECONDS: u64 = 60;
/// Subscriptions leased per claim query.
pub const WEBHOOK_CLAIM_BATCH_MAX: u32 = 64;
/// Delivery history (deliveries and their attempts) is kept this long, then
/// purged in the background, [`WEBHOOK_PURGE_BATCH_MAX`] rows at a time.
pub const WEBHOOK_HISTORY_RETENTION_DAYS: u64 = 30;
/// See [`WEBHOOK_HISTORY_RETENTION_DAYS`].
pub const WEBHOOK_PURGE_BATCH_MAX: u32 = 5_000;

/// Upper bound of HTTP event loops (one per core): beyond this, more threads only
/// add contention on the shared database pool.
pub const HTTP_EVENT_LOOPS_MAX: usize = 64;

/// Bounds of `server.header_read_timeout_seconds`, the time a new connection
/// has to send its first request's whole head: at least a second (a client on
/// a slow mobile link still sends a few hundred bytes in one), at most two
/// minutes (nginx's `client_header_timeout` defaults to one; beyond, a
/// slow-headers client holds a connection for free).
pub const HEADER_READ_TIMEOUT_SECONDS_MIN: u64 = 1;
/// See [`HEADER_READ_TIMEOUT_SECONDS_MIN`].
pub const HEADER_READ_TIMEOUT_SECONDS_MAX: u64 = 120;

/// Bounds of `server.keep_alive_idle_seconds`, how long a keep-alive
/// connection may sit with no request in flight (and how long the head of each
/// later request may take): at least a second, at most an hour (an idle
/// connection costs a socket and a few KiB; load balancers keep theirs for
/// minutes, nginx's `keepalive_timeout` defaults to 75 s).
pub const KEEP_ALIVE_IDLE_SECONDS_MIN: u64 = 1;
/// See [`KEEP_ALIVE_IDLE_SECONDS_MIN`].
pub const KEEP_ALIVE_IDLE_SECONDS_MAX: u64 = 3_600;

/// A connection is idle after this many consecutive checks, one every
/// `server.keep_alive_idle_seconds` / this, found nothing happening on it (no
/// request pending, none started, no byte written): it is closed between the
/// idle timeout and a quarter more. One timer per connection, re-armed a few
/// times a minute, instead of one per request (a timer costs ~2 % of a gateway
/// call's instructions; `http::conn`).
pub const KEEP_ALIVE_IDLE_CHECKS: u32 = 4;

/// Upper bound of `server.max_pending_connections_per_address`, connections
/// from one client address (an IPv6 /64) that have not yet sent their first
/// request's head: more than a browser (6) or a pooling client opens at once,
/// with room for a load balancer or NAT in front of many clients.
pub const PENDING_CONNECTIONS_PER_ADDRESS_MAX: u64 = 10_000;

/// Counters of pending connections, each shared by the client addresses that
/// hash to it (with a per-process random key, so no client can aim at
/// another's): fixed memory whatever the number of clients (16 KiB), and two
/// addresses share one with a probability of 1 in 4096.
pub const PENDING_ADDRESS_BUCKETS: usize = 4_096;

/// Connections the operating system queues for the acceptor (`listen` backlog).
pub const LISTEN_BACKLOG: i32 = 1024;

/// Accepted connections that may wait for one event loop to take them over;
/// beyond this the acceptor waits and new clients wait in the listen backlog.
pub const CONNECTION_HANDOVER_QUEUE: usize = 1024;

/// How often the acceptor measures how busy each event loop and the machine
/// are, to deal new connections (`http::dealer`).
pub const EVENT_LOOP_SAMPLE_MS: u64 = 100;

/// An event loop busy this share of the time (and holding connections) is
/// full: new connections go to the next loop with room.
pub const EVENT_LOOP_FULL_PERCENT: u32 = 75;

/// An event loop busy this share of the time is saturated: while another loop
/// has room, it closes some connections so
/// that they reconnect to that loop. Above [`EVENT_LOOP_FULL_PERCENT`], so that
/// a loop that sheds is not dealt the same connections back.
pub const EVENT_LOOP_SATURATED_PERCENT: u32 = 90;

/// Samples in a row (of [`EVENT_LOOP_SAMPLE_MS`]) in which a loop must be
/// saturated beside a loop with room before it sheds: one sample is too noisy.
pub const EVENT_LOOP_SHED_AFTER_SAMPLES: u32 = 10;

/// A shedding loop closes this fraction of its connections per sample (at
/// least one), so that load moves over in steps rather than all at once.
pub const EVENT_LOOP_SHED_FRACTION: usize = 16;

/// Default page size of every list.
pub const LIST_LIMIT_DEFAULT: u32 = 50;
/// Largest page a client may ask for; more is a 400, not a silent cut.
pub const LIST_LIMIT_MAX: u32 = 1_000;
const _: () = assert!(LIST_LIMIT_DEFAULT <= LIST_LIMIT_MAX);

/// Length cap of a cursor parameter; cursors are short opaque strings.
pub const CURSOR_CHARS_MAX: usize = 512;

/// Interval at which the metrics recorder folds histogram buckets; keeps memory flat.
pub const METRICS_UPKEEP_SECONDS: u64 = 5;

/// Interval of the background database probe behind `aibos_database_up`
/// (`health/probe.rs`): one probe every 5 s, so a scrape every 15 s
/// (Prometheus's usual interval) sees an outage at its next scrape.
pub const DATABASE_PROBE_INTERVAL_SECONDS: u64 = 5;

/// Seconds the `metrics.bind` listener gets at shutdown to finish a scrape in
/// flight: a scrape takes milliseconds, so this only bounds a client that
/// holds its connection open.
pub const METRICS_LISTENER_DRAIN_SECONDS: u64 = 5;

/// Upper bound of `audit.verify_interval_seconds`: a week. Rarer than that, a
/// tampered entry goes unnoticed for longer than an audit cycle of most teams.
pub const AUDIT_VERIFY_INTERVAL_SECONDS_MAX: u64 = 7 * 86_400;
/// Seconds after start before the periodic audit verification's first run (or
/// the interval, when shorter): start-up settles first, and a kernel that
/// restarts in a loop does not re-verify on every start.
pub const AUDIT_VERIFY_FIRST_DELAY_SECONDS: u64 = 60;
/// Bounds of `audit.verify_entries_per_run`, the entries one run of the
/// periodic verification recomputes at most. Below 1,000 a run is mostly
/// overhead; 100 million entries take about 5 minutes of every core
/// (`bench/audit_verify.sh`: 350,000 entries/s on 2 cores), which is as long as
/// a background task should compete with requests.
pub const AUDIT_VERIFY_ENTRIES_PER_RUN_MIN: u64 = 1_000;
/// See [`AUDIT_VERIFY_ENTRIES_PER_RUN_MIN`].
pub const AUDIT_VERIFY_ENTRIES_PER_RUN_MAX: u64 = 100_000_000;

/// Buckets of every latency histogram, in seconds.
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of `aibos_event_publish_batch_size`: events per group commit, up
/// to the publisher's batch of 512 (`events::publisher::PUBLISH_BATCH_MAX`);
/// the latency buckets above would put every batch in `+Inf`.
pub const PUBLISH_BATCH_SIZE_BUCKETS: &[f64] =
    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Migrations a single `migrate down --steps` may revert: guards against a typo
/// wiping a schema. Reverting more takes several commands.
pub const MIGRATE_DOWN_STEPS_MAX: u32 = 1_000;

/// Longest access token accepted: ours are ~400 bytes; refuse megabyte headers early.
pub const ACCESS_TOKEN_BYTES_MAX: usize = 4_096;

/// Shortest password a user may have (SPEC §4).
pub const PASSWORD_CHARS_MIN: usize = 12;
/// Longest password accepted: Argon2 hashes anything, but a megabyte password is an attack.
pub const PASSWORD_BYTES_MAX: usize = 1_024;

/// Password hashes waiting for a worker; further requests wait to enqueue. At
/// ~60 hashes per second per core a full queue is a few seconds of work.
pub const PASSWORD_HASH_QUEUE: usize = 256;

/// Refresh tokens live this long after their session starts (rotation does not extend it).
pub const SESSION_TTL_SECONDS: i64 = 30 * 86_400;

/// Authenticated principals kept in memory (one per live session).
pub const PRINCIPAL_CACHE_ENTRIES_MAX: usize = 100_000;
/// Verified access tokens kept in memory, so a repeated token skips the signature check.
pub const VERIFIED_TOKEN_CACHE_ENTRIES_MAX: usize = 100_000;
/// Tokens each event loop resolves from its own front cache (see `authz::cache::LoopAuthCache`).
pub const LOOP_AUTH_CACHE_ENTRIES_MAX: usize = 4_096;

/// Login failures kept per (tenant, email) and per address before the oldest are forgotten.
pub const LOGIN_THROTTLE_KEYS_MAX: usize = 100_000;
/// Failures of one (tenant, email) within the window that trigger throttling.
pub const LOGIN_FAILURES_PER_ACCOUNT_MAX: u32 = 5;
/// Failures from one client address within the window that trigger throttling.
pub const LOGIN_FAILURES_PER_ADDRESS_MAX: u32 = 100;
/// The throttling window.
pub const LOGIN_FAILURE_WINDOW_SECONDS: u64 = 15 * 60;
/// How long a login waits for a place in a full failure budget (held by
/// attempts being verified) before it is refused with 429: a few Argon2
/// verifications' time, so concurrent logins of one account take turns.
pub const LOGIN_ATTEMPT_WAIT_MS: u64 = 5_000;
/// How often a kernel on SQLite reads the invalidation log: the delay before a
/// change made by the offline command line (another process, no NOTIFY) is
/// seen; one indexed read of nothing, most of the time.
pub const INVALIDATION_POLL_MS: u64 = 1_000;
/// Invalidation-log entries applied per poll; more wait for the next.
pub const INVALIDATION_POLL_BATCH_MAX: u32 = 1_000;
/// How long invalidation-log entries are kept: far longer than any poll gap.
pub const INVALIDATION_LOG_RETENTION_SECONDS: i64 = 3_600;
/// Ranges in `server.trusted_proxies`: each request walks them per
/// `X-Forwarded-For` hop, and a deployment has a handful of proxy ranges.
pub const TRUSTED_PROXIES_MAX: usize = 64;
/// `X-Forwarded-For` hops read, from the right, before the client address is
/// taken as the leftmost one read: a header of thousands of hops costs no more.
pub const FORWARDED_HOPS_MAX: usize = 16;

/// Longest a delegation may last.
pub const DELEGATION_DAYS_MAX: i64 = 30;
/// Longest a break-glass elevation may last.
pub const BREAK_GLASS_MINUTES_MAX: i64 = 60;
/// Shortest reason a break-glass request must give.
pub const BREAK_GLASS_REASON_CHARS_MIN: usize = 20;
/// Permissions one role, delegation or break-glass may name.
pub const PERMISSIONS_PER_GRANT_MAX: usize = 200;
/// Longest name, email or free-text reason accepted.
pub const TEXT_CHARS_MAX: usize = 500;
/// Longest `User-Agent` kept in an audit entry.
pub const USER_AGENT_CHARS_MAX: usize = 256;

/// How often each kernel re-reads the signing keys (to pick up `aibos keys rotate`).
pub const KEY_REFRESH_SECONDS: u64 = 30;

/// Longest `base_url` of a canon.
pub const URL_BYTES_MAX: usize = 2_048;

/// Longest PEM field of a canon's TLS settings (CA bundle, client certificate
/// chain, client key), in bytes: a bundle of a few dozen certificates fits; the
/// whole public root store does not belong here (the default roots cover it).
pub const CANON_TLS_PEM_BYTES_MAX: usize = 64 * 1024;

/// Longest route path or health path.
pub const ROUTE_PATH_BYTES_MAX: usize = 1_024;

/// Most segments of a route path.
pub const ROUTE_SEGMENTS_MAX: usize = 32;

/// Most permissions one canon defines.
pub const CANON_PERMISSIONS_MAX: usize = 500;

/// Longest permission description.
pub const DESCRIPTION_CHARS_MAX: usize = 500;

/// Most routes per canon (the route table is held in memory).
pub const ROUTES_PER_CANON_MAX: i64 = 2_000;

/// Most canons (each has a health check and a breaker).
pub const CANONS_MAX: i64 = 1_000;

/// Assertion secrets a canon may hold at once (the active one and those in rotation).
pub const ASSERTION_SECRETS_PER_CANON_MAX: i64 = 5;

/// Longest request path the gateway forwards.
pub const GATEWAY_PATH_BYTES_MAX: usize = 4_096;

/// Largest event payload (SPEC §7): a JSON object of at most 256 KiB.
pub const EVENT_PAYLOAD_BYTES_MAX: usize = 256 * 1024;
/// Largest payload schema version an event may carry.
pub const EVENT_VERSION_MAX: i32 = 1_000_000;
/// Longest event `subject`.
pub const EVENT_SUBJECT_CHARS_MAX: usize = 256;
/// How often readers waiting for events look again when no commit was
/// signalled (another process on the same SQLite file, a lost notification).
pub const EVENT_POLL_MS: u64 = 1_000;
/// Events an SSE connection reads from the database at a time.
pub const SSE_PAGE_EVENTS: u32 = 256;
/// Events buffered per SSE connection, waiting for the reader to take them.
pub const SSE_BUFFER_EVENTS: usize = 512;
/// A reader that takes none of its buffered events for this long is told it
/// fell behind, and its stream ends (it resumes with `Last-Event-ID`).
pub const SSE_SLOW_READER_SECONDS: u64 = 10;
/// Keep-alive comments on an idle SSE connection, so proxies keep it open.
pub const SSE_KEEP_ALIVE_SECONDS: u64 = 15;
/// Open SSE connections per kernel; more are answered 503.
pub const SSE_STREAMS_MAX: usize = 1_024;
/// Longest configurable event retention (ten years).
pub const EVENT_RETENTION_DAYS_MAX: u64 = 3_650;

/// Events the JetStream relay reads and publishes for one tenant at a time
/// (their acknowledgements awaited together): large enough that the round trip
/// to NATS is paid per batch, not per event; small enough that a batch of
/// largest payloads (256 KiB each) stays near 32 MiB of memory, and that the
/// PostgreSQL row lock of the tenant's position is held briefly.
pub const RELAY_BATCH_EVENTS_MAX: u32 = 128;
/// Tenants the relay looks at per pass, least recently relayed first (a bound
/// on one query's rows; the next pass takes the rest).
pub const RELAY_TENANTS_PER_PASS_MAX: u32 = 1_000;
/// How long the relay waits for a JetStream acknowledgement (and for a request
/// to NATS) before it counts the batch as failed and retries from its position.
pub const RELAY_ACK_TIMEOUT_MS: u64 = 5_000;
/// How long one attempt to connect to NATS may take.
pub const RELAY_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// First pause after a failed relay attempt; doubled after each further
/// failure up to [`RELAY_BACKOFF_MAX_MS`], so an outage costs NATS (and the
/// log) a few attempts a minute, and a short one is over within a second.
pub const RELAY_BACKOFF_BASE_MS: u64 = 250;
/// Longest pause between relay attempts during an outage.
pub const RELAY_BACKOFF_MAX_MS: u64 = 30_000;
/// The duplicate window of the stream the relay creates: a message whose
/// `Nats-Msg-Id` JetStream saw within it is acknowledged as a duplicate and not
/// stored again. It must outlast the gap between a send and its resend after a
/// failure (a batch's acknowledgements time out, a kernel restarts); it is
/// JetStream's own default, and each id held costs the server memory.
pub const RELAY_DUPLICATE_WINDOW_SECONDS: u64 = 120;
const _: () = assert!(RELAY_BACKOFF_BASE_MS <= RELAY_BACKOFF_MAX_MS);
const _: () = assert!(RELAY_ACK_TIMEOUT_MS * 4 < RELAY_DUPLICATE_WINDOW_SECONDS * 1_000);
/// How often the event retention purge runs.
pub const EVENT_RETENTION_INTERVAL_SECONDS: u64 = 3_600;
/// How long after start the first retention purge runs (not in the start-up path).
pub const EVENT_RETENTION_FIRST_DELAY_SECONDS: u64 = 60;

// Idempotency (idempotency/).

/// Default of `idempotency.lock_timeout_seconds`: how long an in-flight key
/// stays locked when the kernel executing it dies; longer than the default
/// upstream timeout (10 s) with room for retries and storing the response.
pub const IDEMPOTENCY_LOCK_TIMEOUT_SECONDS_DEFAULT: u64 = 120;
/// Upper bound of `idempotency.lock_timeout_seconds`: one hour. A client is
/// refused with 409 this long after a crash, at worst.
pub const IDEMPOTENCY_LOCK_TIMEOUT_SECONDS_MAX: u64 = 3_600;
/// Largest response body stored for replay (SPEC §8); a larger one is passed
/// through and its key released.
pub const IDEMPOTENCY_RESPONSE_BYTES_MAX: usize = 1024 * 1024;
/// Most headers a cell may name in `Idempotency-Replay-Headers`.
pub const IDEMPOTENCY_REPLAY_HEADERS_MAX: usize = 16;
/// Most bytes of stored header names and values of one response.
pub const IDEMPOTENCY_HEADER_BYTES_MAX: usize = 8 * 1024;
/// Weight capacity of the in-process cache of completed responses (bytes of
/// bodies and headers): replays served from memory without a query.
pub const IDEMPOTENCY_CACHE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Items the cache is sized for (small responses; the weight bounds it).
pub const IDEMPOTENCY_CACHE_ITEMS_ESTIMATE: usize = 16 * 1024;
/// Attempts to take a key whose record vanished or expired between the take
/// and the read (a release or purge racing this request).
pub const IDEMPOTENCY_TAKE_ATTEMPTS_MAX: u32 = 3;
/// Seconds between background purges of expired records. Expiry is checked
/// on every read, so the purge only keeps the table small: every ten minutes,
/// in chunks, bounds both the backlog and each statement.
pub const IDEMPOTENCY_PURGE_INTERVAL_SECONDS: u64 = 600;
/// Seconds after start before the first purge.
pub const IDEMPOTENCY_PURGE_FIRST_DELAY_SECONDS: u64 = 60;
/// Records deleted per purge statement.
pub const IDEMPOTENCY_PURGE_CHUNK_ROWS: i64 = 1_000;
/// Most chunks of one purge run; the rest waits for the next interval.
pub const IDEMPOTENCY_PURGE_CHUNKS_MAX: u32 = 1_000;
const _: () =
    assert!(IDEMPOTENCY_LOCK_TIMEOUT_SECONDS_DEFAULT <= IDEMPOTENCY_LOCK_TIMEOUT_SECONDS_MAX);

// --- Backups (backup/) ---------------------------------------------------------
/// Encoded rows handed from the database side to a dataset's writer thread at
/// once, in bytes (a row larger than this goes alone).
pub const BACKUP_CHUNK_BYTES: usize = 1024 * 1024;
/// Chunks or row batches in flight between the database and a file: with
/// [`BACKUP_CHUNK_BYTES`], what bounds a backup's or a restore's memory.
pub const BACKUP_CHUNKS_IN_FLIGHT: usize = 4;
/// Longest row a backup file may hold (an idempotency record carries a stored
/// answer of up to 1 MiB, sealed and base64-encoded): a longer line is damage.
pub const BACKUP_ROW_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Largest manifest read (one entry per table and per tenant's chain head).
pub const BACKUP_MANIFEST_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Rows a restore inserts per statement or COPY batch.
pub const BACKUP_INSERT_ROWS_MAX: usize = 500;
/// Bytes of rows a restore batches before inserting (whichever of this and
/// [`BACKUP_INSERT_ROWS_MAX`] comes first).
pub const BACKUP_INSERT_BYTES_MAX: usize = 4 * 1024 * 1024;
/// `maintenance_work_mem` of a PostgreSQL restore's transaction while it
/// rebuilds the indexes it dropped, in MB: a million keys of the audit trail's
/// widest index sort in memory (the server's default, 64 MB, spills them to
/// disk). Held only while one index is built.
pub const BACKUP_RESTORE_INDEX_MEMORY_MB: u32 = 256;
/// Parameters of one SQLite statement, under SQLite's own 32,766.
pub const BACKUP_SQLITE_PARAMETERS_MAX: usize = 30_000;
/// Backups `backup list` and retention look at in one folder.
pub const BACKUP_LIST_MAX: usize = 10_000;
/// Shortest schedule of `backup.interval_seconds` (other than 0). A backup
/// that takes longer than the interval is followed by the next at once.
pub const BACKUP_INTERVAL_SECONDS_MIN: u64 = 1;
/// Longest schedule: 31 days.
pub const BACKUP_INTERVAL_SECONDS_MAX: u64 = 31 * 86_400;
