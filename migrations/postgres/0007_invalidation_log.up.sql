-- Cache invalidations of committed changes, for kernels on SQLite (which has no
-- NOTIFY). On PostgreSQL invalidations travel by NOTIFY aibos_authz and this
-- table stays empty; it exists so that both engines have the same schema (and
-- a backup of one restores into the other).
CREATE TABLE invalidation_log (
    seq         BIGSERIAL NOT NULL PRIMARY KEY,
    payload     TEXT      NOT NULL,
    created_at  TEXT      NOT NULL
);
