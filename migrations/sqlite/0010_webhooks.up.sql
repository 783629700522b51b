-- Webhook subscriptions, their deliveries and each attempt (events/webhook/).
--
-- The events table is the outbox: an event is stored in its publisher's
-- transaction, and each subscription keeps a durable cursor (delivered_seq)
-- of the tenant's events it is done with. A kernel instance delivers a
-- subscription only while it holds the subscription's lease (lease_owner,
-- lease_until), so one instance at a time sends its events, in seq order.
CREATE TABLE webhook_subscriptions (
    id                          TEXT    NOT NULL PRIMARY KEY,
    tenant_id                   TEXT    NOT NULL REFERENCES tenants (id),
    url                         TEXT    NOT NULL,
    -- JSON array of filters: exact event types or "prefix.*".
    event_types                 TEXT    NOT NULL,
    description                 TEXT    NOT NULL DEFAULT '',
    enabled                     INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    -- Why the kernel disabled it ("failing"); NULL when enabled or disabled by a user.
    disabled_reason             TEXT,
    -- whsec_… sealed under the master key (secrets/); the previous one signs
    -- too until previous_secret_expires_at (a rotation's grace period).
    secret                      TEXT    NOT NULL,
    previous_secret             TEXT,
    previous_secret_expires_at  TEXT,
    -- Every event of the tenant with seq <= delivered_seq is delivered,
    -- dead-lettered or not for this subscription.
    delivered_seq               INTEGER  NOT NULL,
    -- Bumped by a replay: a worker that read the stream before it must not
    -- write its cursor over the replay's.
    stream_generation           INTEGER NOT NULL DEFAULT 0,
    -- The head of the stream while it waits for its next attempt.
    pending_delivery_id         TEXT,
    next_attempt_at             TEXT,
    -- Start of the current run of failed attempts; NULL after a success.
    failing_since               TEXT,
    lease_owner                 TEXT,
    lease_until                 TEXT,
    version                     INTEGER  NOT NULL DEFAULT 1,
    created_at                  TEXT    NOT NULL,
    updated_at                  TEXT    NOT NULL
);
CREATE INDEX webhook_subscriptions_tenant ON webhook_subscriptions (tenant_id, id);

-- One event (or a retry of it) to one subscription.
CREATE TABLE webhook_deliveries (
    id               TEXT    NOT NULL PRIMARY KEY,
    tenant_id        TEXT    NOT NULL REFERENCES tenants (id),
    subscription_id  TEXT    NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    event_id         TEXT    NOT NULL,
    event_seq        INTEGER  NOT NULL,
    event_type       TEXT    NOT NULL,
    -- pending (attempts left), delivered, dead_letter (the last attempt
    -- failed), cancelled (a replay sent the event again as a new delivery).
    status           TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'dead_letter', 'cancelled')),
    -- A retry asked for through the API: sent beside the ordered stream.
    out_of_band      INTEGER NOT NULL DEFAULT 0 CHECK (out_of_band IN (0, 1)),
    -- Attempts made so far, and how many of them came before the last retry
    -- asked for (the schedule starts again from there).
    retry_base       INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER  NOT NULL DEFAULT 0,
    next_attempt_at  TEXT,
    last_response_status INTEGER,
    created_at       TEXT    NOT NULL,
    updated_at       TEXT    NOT NULL
);
CREATE INDEX webhook_deliveries_subscription ON webhook_deliveries (subscription_id, id);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_updated ON webhook_deliveries (updated_at);

CREATE TABLE webhook_attempts (
    id                TEXT    NOT NULL PRIMARY KEY,
    tenant_id         TEXT    NOT NULL REFERENCES tenants (id),
    delivery_id       TEXT    NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    number            INTEGER  NOT NULL,
    attempted_at      TEXT    NOT NULL,
    -- delivered, rejected, timeout, connection_failed, refused_address.
    outcome           TEXT    NOT NULL,
    response_status   INTEGER,
    latency_ms        INTEGER  NOT NULL,
    response_excerpt  TEXT,
    error             TEXT,
    -- The kernel instance that made it.
    instance          TEXT    NOT NULL
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, number);

INSERT INTO permissions (name, description, owner, created_at) VALUES
 ('kernel.subscription.read', 'Read webhook subscriptions and their delivery history.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
