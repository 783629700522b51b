ALTER TABLE routes DROP COLUMN audit_calls;
