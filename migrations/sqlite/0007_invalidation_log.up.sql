-- Cache invalidations of committed changes, for kernels on SQLite: they have no
-- NOTIFY, and the offline command line (`aibos tenant suspend`, `keys rotate`)
-- writes from another process. A change's transaction appends its invalidation
-- here; every kernel reads new rows each second (authz/listener.rs) and prunes
-- rows older than an hour.
CREATE TABLE invalidation_log (
    seq         INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    payload     TEXT    NOT NULL,
    created_at  TEXT    NOT NULL
);
