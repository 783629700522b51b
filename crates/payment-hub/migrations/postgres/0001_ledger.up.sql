-- The payment hub's ledger on PostgreSQL. Ids are hyphenated UUIDv7 text and times
-- RFC 3339 text (UTC, milliseconds), so rows read the same on both engines.

CREATE TABLE accounts (
    id                  TEXT PRIMARY KEY NOT NULL,
    tenant_id           TEXT NOT NULL,
    name                TEXT NOT NULL,
    kind                TEXT NOT NULL CHECK (kind IN ('customer', 'funding')),
    currency            TEXT NOT NULL,
    -- Credits minus debits. Only a funding account may go below zero: the
    -- database refuses any change that would make a customer's negative.
    balance_minor       BIGINT NOT NULL CHECK (kind = 'funding' OR balance_minor >= 0),
    -- Set when the opening came with an Idempotency-Key (NULLs never collide).
    idempotency_key     TEXT,
    request_fingerprint TEXT,
    created_at          TEXT NOT NULL,
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX accounts_tenant_id ON accounts (tenant_id, id);
-- One funding account per tenant and currency, created on first use.
CREATE UNIQUE INDEX accounts_tenant_funding ON accounts (tenant_id, currency) WHERE kind = 'funding';

-- The account references are checked at commit: the payment row is written
-- first (it claims the idempotency key), the accounts are checked by the
-- balance updates that follow, and a refused payment never commits.
CREATE TABLE payments (
    id                  TEXT PRIMARY KEY NOT NULL,
    tenant_id           TEXT NOT NULL,
    idempotency_key     TEXT NOT NULL,
    request_fingerprint TEXT NOT NULL,
    amount_minor        BIGINT NOT NULL CHECK (amount_minor > 0),
    currency            TEXT NOT NULL,
    payer_account       TEXT NOT NULL REFERENCES accounts (id) DEFERRABLE INITIALLY DEFERRED,
    payee_account       TEXT NOT NULL REFERENCES accounts (id) DEFERRABLE INITIALLY DEFERRED,
    reference           TEXT NOT NULL,
    status              TEXT NOT NULL,
    correlation_id      TEXT NOT NULL,
    actor               TEXT NOT NULL,
    created_at          TEXT NOT NULL,
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX payments_tenant_id ON payments (tenant_id, id);

-- Each transaction (a payment or an account opening) is two rows: one debit,
-- one credit, of the same amount and currency. The account reference is
-- checked at commit, so a payment can write its entries before it takes the
-- balance row locks (shorter lock holds under contention).
CREATE TABLE ledger_entries (
    id             TEXT PRIMARY KEY NOT NULL,
    tenant_id      TEXT NOT NULL,
    transaction_id TEXT NOT NULL,
    account_id     TEXT NOT NULL REFERENCES accounts (id) DEFERRABLE INITIALLY DEFERRED,
    direction      TEXT NOT NULL CHECK (direction IN ('debit', 'credit')),
    amount_minor   BIGINT NOT NULL CHECK (amount_minor > 0),
    currency       TEXT NOT NULL,
    created_at     TEXT NOT NULL
);
CREATE INDEX ledger_entries_tenant_transaction ON ledger_entries (tenant_id, transaction_id);
CREATE INDEX ledger_entries_tenant_currency ON ledger_entries (tenant_id, currency);

-- Events to publish, written in the same transaction as the payment.
CREATE TABLE outbox (
    id              TEXT PRIMARY KEY NOT NULL,
    tenant_id       TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    subject         TEXT NOT NULL,
    payload         TEXT NOT NULL,
    correlation_id  TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- Epoch milliseconds: compared on every poll.
    next_attempt_at BIGINT NOT NULL,
    published_at    TEXT,
    last_error      TEXT
);
CREATE INDEX outbox_pending ON outbox (next_attempt_at) WHERE published_at IS NULL;
CREATE INDEX outbox_tenant_created ON outbox (tenant_id, created_at);
