-- The tamper-evident audit trail: one hash chain per tenant, append-only.
CREATE TABLE audit_log (
    id             TEXT    NOT NULL PRIMARY KEY,
    tenant_id      TEXT    NOT NULL REFERENCES tenants (id),
    seq            INTEGER NOT NULL CHECK (seq >= 1),
    occurred_at    TEXT    NOT NULL,
    actor_type     TEXT    NOT NULL CHECK (actor_type IN ('user', 'service', 'system', 'anonymous')),
    actor_id       TEXT,
    action         TEXT    NOT NULL,
    resource_type  TEXT,
    resource_id    TEXT,
    outcome        TEXT    NOT NULL CHECK (outcome IN ('success', 'failure', 'deny')),
    severity       TEXT    NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    client_ip      TEXT,
    user_agent     TEXT,
    correlation_id TEXT,
    details        TEXT    NOT NULL,
    prev_hash      TEXT    NOT NULL,
    hash           TEXT    NOT NULL,
    UNIQUE (tenant_id, seq)
);
CREATE INDEX audit_log_tenant_action ON audit_log (tenant_id, action, seq);
CREATE INDEX audit_log_tenant_correlation ON audit_log (tenant_id, correlation_id);
CREATE INDEX audit_log_tenant_resource ON audit_log (tenant_id, resource_type, resource_id);

-- The head of each tenant's chain. Writers of one tenant serialise on its row;
-- writers of different tenants do not wait on each other (beyond SQLite's single writer).
CREATE TABLE audit_heads (
    tenant_id      TEXT    NOT NULL PRIMARY KEY REFERENCES tenants (id),
    seq            INTEGER NOT NULL,
    hash           TEXT    NOT NULL
);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;

CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
