-- The service registry: canons (cells), their assertion secrets, and gateway routes.
-- Canons and routes are platform resources: tenant_id is always the system tenant,
-- and only its administrators manage them (see docs/security.md).

CREATE TABLE canons (
    id            TEXT    NOT NULL PRIMARY KEY,
    tenant_id     TEXT    NOT NULL REFERENCES tenants (id),
    name          TEXT    NOT NULL,
    base_url      TEXT    NOT NULL,
    health_path   TEXT    NOT NULL,
    -- 'http1', or 'h2c' for a plain-http cell that speaks HTTP/2 with prior knowledge.
    protocol      TEXT    NOT NULL DEFAULT 'http1',
    timeout_ms    INTEGER,
    -- The permissions this canon defines, as a JSON list of {name, description};
    -- the same names are rows of `permissions` with owner = the canon's name.
    permissions   TEXT    NOT NULL,
    version       INTEGER  NOT NULL DEFAULT 1,
    created_at    TEXT    NOT NULL,
    updated_at    TEXT    NOT NULL
);
CREATE UNIQUE INDEX canons_tenant_name ON canons (tenant_id, name);

-- HMAC secrets of x-kernel-assertion. The kernel must sign with them, so they are
-- stored as they are (like the token-signing key) and never returned after creation.
CREATE TABLE canon_assertion_secrets (
    canon_id      TEXT    NOT NULL REFERENCES canons (id) ON DELETE CASCADE,
    tenant_id     TEXT    NOT NULL REFERENCES tenants (id),
    kid           TEXT    NOT NULL,
    secret        TEXT    NOT NULL,
    active        INTEGER NOT NULL DEFAULT 0 CHECK (active IN (0, 1)),
    created_at    TEXT    NOT NULL,
    activated_at  TEXT,
    PRIMARY KEY (canon_id, kid)
);

CREATE TABLE routes (
    id                    TEXT    NOT NULL PRIMARY KEY,
    tenant_id             TEXT    NOT NULL REFERENCES tenants (id),
    canon_id              TEXT    NOT NULL REFERENCES canons (id),
    method                TEXT    NOT NULL,
    path                  TEXT    NOT NULL,
    -- The path with every {param} written {}: two routes of one canon and method
    -- with the same shape would match the same requests.
    path_shape            TEXT    NOT NULL,
    required_permissions  TEXT    NOT NULL,
    idempotency           TEXT    NOT NULL DEFAULT 'off',
    rate_limit            TEXT,
    timeout_ms            INTEGER,
    forward_cookies       INTEGER NOT NULL DEFAULT 0 CHECK (forward_cookies IN (0, 1)),
    version               INTEGER  NOT NULL DEFAULT 1,
    created_at            TEXT    NOT NULL,
    updated_at            TEXT    NOT NULL
);
CREATE UNIQUE INDEX routes_canon_method_shape ON routes (tenant_id, canon_id, method, path_shape);
