-- Identity and access: users, service accounts, sessions, signing keys,
-- the permission registry, roles, assignments, delegations and break-glass.

CREATE TABLE users (
    id            TEXT    NOT NULL PRIMARY KEY,
    tenant_id     TEXT    NOT NULL REFERENCES tenants (id),
    email         TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    password_hash TEXT    NOT NULL,
    status        TEXT    NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    version       INTEGER NOT NULL DEFAULT 1,
    created_at    TEXT    NOT NULL,
    updated_at    TEXT    NOT NULL
);
-- Email is unique per tenant, case-insensitively: stored lowercased.
CREATE UNIQUE INDEX users_tenant_email ON users (tenant_id, email);

CREATE TABLE service_accounts (
    id            TEXT    NOT NULL PRIMARY KEY,
    tenant_id     TEXT    NOT NULL REFERENCES tenants (id),
    name          TEXT    NOT NULL,
    client_id     TEXT    NOT NULL UNIQUE,
    secret_hash   TEXT    NOT NULL,
    status        TEXT    NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    version       INTEGER NOT NULL DEFAULT 1,
    created_at    TEXT    NOT NULL,
    updated_at    TEXT    NOT NULL
);
CREATE UNIQUE INDEX service_accounts_tenant_name ON service_accounts (tenant_id, name);

-- A session is one login (or one client-credentials grant); access tokens carry its id.
CREATE TABLE sessions (
    id            TEXT    NOT NULL PRIMARY KEY,
    tenant_id     TEXT    NOT NULL REFERENCES tenants (id),
    subject_id    TEXT    NOT NULL,
    actor_type    TEXT    NOT NULL CHECK (actor_type IN ('user', 'service')),
    created_at    TEXT    NOT NULL,
    expires_at    TEXT    NOT NULL,
    revoked_at    TEXT,
    revoked_reason TEXT
);
CREATE INDEX sessions_tenant_subject ON sessions (tenant_id, subject_id);

-- Refresh tokens are stored as SHA-256 hashes; a rotated one that comes back revokes its session.
CREATE TABLE refresh_tokens (
    token_hash    TEXT    NOT NULL PRIMARY KEY,
    session_id    TEXT    NOT NULL REFERENCES sessions (id),
    tenant_id     TEXT    NOT NULL REFERENCES tenants (id),
    status        TEXT    NOT NULL CHECK (status IN ('active', 'rotated')),
    created_at    TEXT    NOT NULL
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

CREATE TABLE signing_keys (
    kid           TEXT    NOT NULL PRIMARY KEY,
    algorithm     TEXT    NOT NULL CHECK (algorithm IN ('EdDSA')),
    private_key   TEXT    NOT NULL,
    public_key    TEXT    NOT NULL,
    status        TEXT    NOT NULL CHECK (status IN ('active', 'retired')),
    created_at    TEXT    NOT NULL,
    retired_at    TEXT
);

CREATE TABLE permissions (
    name          TEXT    NOT NULL PRIMARY KEY,
    description   TEXT    NOT NULL,
    owner         TEXT    NOT NULL,
    created_at    TEXT    NOT NULL
);

CREATE TABLE roles (
    id            TEXT    NOT NULL PRIMARY KEY,
    tenant_id     TEXT    NOT NULL REFERENCES tenants (id),
    name          TEXT    NOT NULL,
    permissions   TEXT    NOT NULL,
    builtin       INTEGER NOT NULL DEFAULT 0 CHECK (builtin IN (0, 1)),
    version       INTEGER NOT NULL DEFAULT 1,
    created_at    TEXT    NOT NULL,
    updated_at    TEXT    NOT NULL
);
CREATE UNIQUE INDEX roles_tenant_name ON roles (tenant_id, name);

CREATE TABLE role_assignments (
    tenant_id     TEXT    NOT NULL REFERENCES tenants (id),
    subject_id    TEXT    NOT NULL,
    role_id       TEXT    NOT NULL REFERENCES roles (id) ON DELETE CASCADE,
    expires_at    TEXT,
    created_at    TEXT    NOT NULL,
    PRIMARY KEY (subject_id, role_id)
);
CREATE INDEX role_assignments_tenant_subject ON role_assignments (tenant_id, subject_id);
CREATE INDEX role_assignments_role ON role_assignments (role_id);

CREATE TABLE delegations (
    id            TEXT    NOT NULL PRIMARY KEY,
    tenant_id     TEXT    NOT NULL REFERENCES tenants (id),
    from_user_id  TEXT    NOT NULL REFERENCES users (id),
    to_user_id    TEXT    NOT NULL REFERENCES users (id),
    permissions   TEXT    NOT NULL,
    reason        TEXT    NOT NULL,
    expires_at    TEXT    NOT NULL,
    revoked_at    TEXT,
    created_at    TEXT    NOT NULL
);
CREATE INDEX delegations_tenant_to ON delegations (tenant_id, to_user_id);

CREATE TABLE break_glass (
    id            TEXT    NOT NULL PRIMARY KEY,
    tenant_id     TEXT    NOT NULL REFERENCES tenants (id),
    user_id       TEXT    NOT NULL REFERENCES users (id),
    permissions   TEXT    NOT NULL,
    reason        TEXT    NOT NULL,
    expires_at    TEXT    NOT NULL,
    ended_at      TEXT,
    created_at    TEXT    NOT NULL
);
CREATE INDEX break_glass_tenant_user ON break_glass (tenant_id, user_id);

-- The kernel's own permissions.
INSERT INTO permissions (name, description, owner, created_at) VALUES
 ('kernel.tenant.manage', 'Create, change and suspend tenants (platform administrators).', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
 ('kernel.user.read', 'Read users of the tenant.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
 ('kernel.user.manage', 'Create and change users, their passwords and their roles.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
 ('kernel.role.read', 'Read roles and permissions.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
 ('kernel.role.manage', 'Create, change and delete roles.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
 ('kernel.canon.read', 'Read registered canons.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
 ('kernel.canon.manage', 'Register and change canons.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
 ('kernel.route.read', 'Read gateway routes.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
 ('kernel.route.manage', 'Create and change gateway routes.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
 ('kernel.event.publish', 'Publish events.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
 ('kernel.event.read', 'Read events.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
 ('kernel.subscription.manage', 'Manage webhook subscriptions.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
 ('kernel.audit.read', 'Read and verify the audit trail.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
 ('kernel.delegation.create', 'Delegate one''s own permissions for a bounded time.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
 ('kernel.breakglass.request', 'Request time-bound emergency elevation.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
 ('kernel.service_account.manage', 'Create service accounts and rotate their secrets.', 'kernel', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
