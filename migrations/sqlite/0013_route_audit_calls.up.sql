-- A route whose every call leaves a gateway.call entry in the caller's tenant
-- chain (money-moving routes): the kernel's own record of what the cell was asked.
ALTER TABLE routes ADD COLUMN audit_calls INTEGER NOT NULL DEFAULT 0;
