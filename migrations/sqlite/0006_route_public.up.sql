-- A route must name at least one permission, or say explicitly that every
-- authenticated caller of every tenant may call it (registry/validate.rs).
ALTER TABLE routes ADD COLUMN public_to_authenticated INTEGER NOT NULL DEFAULT 0
    CHECK (public_to_authenticated IN (0, 1));
-- Routes created before the rule with no permission were open to every
-- authenticated caller; they stay so, now explicitly, rather than silently
-- changing what existing deployments serve.
UPDATE routes SET public_to_authenticated = 1 WHERE required_permissions = '[]';
