-- A route must name at least one permission, or say explicitly that every
-- authenticated caller of every tenant may call it (registry/validate.rs).
ALTER TABLE routes ADD COLUMN public_to_authenticated BOOLEAN NOT NULL DEFAULT FALSE;
-- Routes created before the rule with no permission were open to every
-- authenticated caller; they stay so, now explicitly, rather than silently
-- changing what existing deployments serve.
UPDATE routes SET public_to_authenticated = TRUE WHERE required_permissions = '[]';
