-- Idempotency records (idempotency/, SPEC §8): one per tenant and key. A
-- request with a new key takes its record in flight with one atomic
-- INSERT … ON CONFLICT DO UPDATE … WHERE (the existing record expired), so of
-- several kernels on one database exactly one executes it; the response is
-- then stored (completed) for idempotency.ttl_seconds, or the record deleted
-- (released) after a 5xx, a transport failure or an oversized response.
--
-- expires_at is when the record stops counting: for an in-flight record its
-- lock (a crashed kernel's record can be taken again after it), for a
-- completed one the end of its TTL. The background purge deletes by it.
CREATE TABLE idempotency_records (
    tenant_id         TEXT    NOT NULL REFERENCES tenants (id),
    idempotency_key   TEXT    NOT NULL,
    -- The user or service account that used the key: another principal of
    -- the tenant sending it is refused, never served this one's response.
    subject_id        TEXT    NOT NULL,
    -- Lowercase hex SHA-256 over method, path and query, and body.
    fingerprint       TEXT    NOT NULL,
    -- Who holds the record: completing or releasing it checks this, so a
    -- kernel whose lock expired cannot overwrite the next holder's record.
    claim_id          TEXT    NOT NULL,
    state             TEXT    NOT NULL CHECK (state IN ('in_flight', 'completed')),
    locked_until      TEXT,
    response_status   INTEGER,
    -- JSON array of [name, value] pairs: the replayed headers.
    response_headers  TEXT,
    -- The body (at most 1 MiB, limits::IDEMPOTENCY_RESPONSE_BYTES_MAX),
    -- base64url-encoded and sealed under the master key (secrets/), bound to
    -- the tenant and key: answers carry one-time secrets (a service
    -- account's client_secret) and cells' payment data.
    response_body     TEXT,
    created_at        TEXT    NOT NULL,
    expires_at        TEXT    NOT NULL,
    PRIMARY KEY (tenant_id, idempotency_key)
);
CREATE INDEX idempotency_records_expires ON idempotency_records (expires_at);
