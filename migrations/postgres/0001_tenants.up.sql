-- Tenants: the unit of isolation. Every tenant-owned row references one.
-- Ids are hyphenated UUID text and times RFC 3339 UTC text with milliseconds,
-- so rows read the same on SQLite and PostgreSQL.
CREATE TABLE tenants (
    id          TEXT    NOT NULL PRIMARY KEY,
    slug        TEXT    NOT NULL UNIQUE CHECK (length(slug) BETWEEN 2 AND 63),
    name        TEXT    NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    status      TEXT    NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    version     BIGINT  NOT NULL DEFAULT 1 CHECK (version >= 1),
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL
);

-- The system tenant exists from the first migration; its administrators manage tenants.
INSERT INTO tenants (id, slug, name, status, version, created_at, updated_at)
VALUES ('00000000-0000-7000-8000-000000000001', 'system', 'System', 'active', 1,
        to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
        to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'));
