-- The last health state a kernel instance recorded for each canon. With several
-- instances, each checks every canon; one change of state is audited once, by
-- the first instance to record it (gateway/health.rs).
CREATE TABLE canon_health (
    canon_id    TEXT NOT NULL PRIMARY KEY REFERENCES canons (id) ON DELETE CASCADE,
    status      TEXT NOT NULL CHECK (status IN ('healthy', 'unhealthy')),
    changed_at  TEXT NOT NULL
);
