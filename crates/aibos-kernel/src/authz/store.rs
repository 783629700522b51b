//! Authorization's SQL: the permission registry, roles, assignments, delegations,
//! break-glass, and loading a session's principal.

use serde::Serialize;
use sqlx::FromRow;
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::PermissionSet;
use super::cache::{IdHeaders, Principal};
use crate::db::{Db, Tx};
use crate::identity::tokens::Claims;
use crate::{timestamp, with_db, with_tx};

/// A role as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Role {
    /// UUIDv7.
    pub id: String,
    /// Unique per tenant.
    pub name: String,
    /// Exact permission names and `prefix.*` grants.
    pub permissions: Vec<String>,
    /// Built-in roles (`tenant.admin`) cannot be changed or deleted.
    pub builtin: bool,
    /// Optimistic-concurrency version.
    pub version: i64,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
}

impl Role {
    /// What holding this role gives in `tenant_id`.
    pub fn gives(&self, tenant_id: &str) -> PermissionSet {
        super::role_permissions(tenant_id, &self.name, self.builtin, &self.permissions)
    }
}

#[derive(FromRow)]
struct RoleRow {
    id: String,
    name: String,
    permissions: String,
    builtin: bool,
    version: i64,
    created_at: String,
    updated_at: String,
}

impl From<RoleRow> for Role {
    fn from(r: RoleRow) -> Role {
        Role {
            id: r.id,
            name: r.name,
            permissions: serde_json::from_str(&r.permissions).unwrap_or_default(),
            builtin: r.builtin,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

const ROLE_COLUMNS: &str = "id, name, permissions, builtin, version, created_at, updated_at";

/// Loads the principal of a verified token's session; `None` when the session
/// is unknown, revoked or expired, belongs to another tenant or subject, or the
/// subject is suspended.
pub async fn load_principal(
    db: &Db,
    claims: &Claims,
    now: OffsetDateTime,
) -> Result<Option<Principal>, sqlx::Error> {
    let now_text = timestamp::format(now);
    let session: Option<(String, String, String, String, Option<String>)> = with_db!(db, pool => {
        sqlx::query_as("SELECT tenant_id, subject_id, actor_type, expires_at, revoked_at FROM sessions WHERE id = $1")
            .bind(&claims.sid).fetch_optional(pool).await?
    });
    let Some((tenant_id, subject_id, actor_type, expires_at, revoked_at)) = session else {
        return Ok(None);
    };
    if revoked_at.is_some()
        || expires_at <= now_text
        || tenant_id != claims.tid
        || subject_id != claims.sub
    {
        return Ok(None);
    }
    let Some((tenant_slug, tenant_status)): Option<(String, String)> = with_db!(db, pool => {
        sqlx::query_as("SELECT slug, status FROM tenants WHERE id = $1").bind(&tenant_id).fetch_optional(pool).await?
    }) else {
        return Ok(None);
    };
    let subject: Option<(String, String, Option<String>)> = if actor_type == "user" {
        with_db!(db, pool => sqlx::query_as("SELECT name, status, email FROM users WHERE tenant_id = $1 AND id = $2")
            .bind(&tenant_id).bind(&subject_id).fetch_optional(pool).await?)
    } else {
        with_db!(db, pool => sqlx::query_as("SELECT name, status, NULL FROM service_accounts WHERE tenant_id = $1 AND id = $2")
            .bind(&tenant_id).bind(&subject_id).fetch_optional(pool).await?)
    };
    let Some((name, status, email)) = subject else {
        return Ok(None);
    };
    if status != "active" {
        return Ok(None);
    }
    // Ids are UUIDs the kernel made; one that could not be forwarded as a
    // header is refused rather than forwarded without it.
    let Some(id_headers) = IdHeaders::new(&tenant_id, &subject_id) else {
        return Ok(None);
    };

    let held = subject_permissions(db, &tenant_id, &subject_id, now).await?;
    let valid_until = earliest(timestamp::parse(&expires_at), held.valid_until);
    let mut all = held.all;
    if held.own.contains_everything_but_some() {
        // The built-in administrator: list what the registry holds, so that
        // `/auth/me` shows names rather than "everything".
        let names: Vec<String> = with_db!(db, pool => sqlx::query_scalar("SELECT name FROM permissions").fetch_all(pool).await?);
        for name in names.iter().filter(|n| held.own.contains(n)) {
            all.add(name);
        }
    }
    Ok(Some(Principal {
        tenant_id,
        tenant_slug,
        tenant_suspended: tenant_status != "active",
        subject_id,
        actor_type: if actor_type == "user" {
            "user"
        } else {
            "service"
        },
        session_id: claims.sid.clone(),
        email,
        name,
        permissions: all,
        grantable: held.own,
        valid_until,
        id_headers,
    }))
}

/// What a subject holds at `now`.
#[derive(Debug, Default)]
pub struct SubjectPermissions {
    /// Through its own role assignments: what it may give (its grantable set).
    pub own: PermissionSet,
    /// Everything in force: its roles, delegations it received (while each
    /// delegator is active and still holds them as grantable), break-glass.
    pub all: PermissionSet,
    /// When the earliest time-bound part of `all` ends.
    pub valid_until: Option<OffsetDateTime>,
}

fn earliest(a: Option<OffsetDateTime>, b: Option<OffsetDateTime>) -> Option<OffsetDateTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A subject's permissions through its own unexpired role assignments, and
/// when the first of those assignments ends.
async fn own_permissions(
    db: &Db,
    tenant_id: &str,
    subject_id: &str,
    now_text: &str,
) -> Result<(PermissionSet, Option<OffsetDateTime>), sqlx::Error> {
    let roles: Vec<(String, String, bool, Option<String>)> = with_db!(db, pool => {
        sqlx::query_as("SELECT r.permissions, r.name, r.builtin, a.expires_at FROM role_assignments a JOIN roles r ON r.id = a.role_id \
                        WHERE a.tenant_id = $1 AND a.subject_id = $2 AND (a.expires_at IS NULL OR a.expires_at > $3)")
            .bind(tenant_id).bind(subject_id).bind(now_text).fetch_all(pool).await?
    });
    let mut own = PermissionSet::default();
    let mut until = None;
    for (permissions, name, builtin, expires) in roles {
        let grants = serde_json::from_str::<Vec<String>>(&permissions).unwrap_or_default();
        own.extend(&super::role_permissions(tenant_id, &name, builtin, &grants));
        until = earliest(until, expires.as_deref().and_then(timestamp::parse));
    }
    Ok((own, until))
}

/// Everything `subject_id` (a user or service account of `tenant_id`) holds at
/// `now`. A delegation counts only while its delegator is an active user who
/// still holds each delegated permission through their own roles; it ends with
/// the first of the delegator's assignments to end.
pub async fn subject_permissions(
    db: &Db,
    tenant_id: &str,
    subject_id: &str,
    now: OffsetDateTime,
) -> Result<SubjectPermissions, sqlx::Error> {
    let now_text = timestamp::format(now);
    let (own, mut valid_until) = own_permissions(db, tenant_id, subject_id, &now_text).await?;
    let mut all = own.clone();
    let delegations: Vec<(String, String, String, Option<String>)> = with_db!(db, pool => {
        sqlx::query_as("SELECT d.from_user_id, d.permissions, d.expires_at, u.status FROM delegations d LEFT JOIN users u ON u.tenant_id = d.tenant_id AND u.id = d.from_user_id \
                        WHERE d.tenant_id = $1 AND d.to_user_id = $2 AND d.revoked_at IS NULL AND d.expires_at > $3")
            .bind(tenant_id).bind(subject_id).bind(&now_text).fetch_all(pool).await?
    });
    for (from_user_id, permissions, expires, delegator_status) in delegations {
        if delegator_status.as_deref() != Some("active") {
            continue;
        }
        let (delegator, delegator_until) =
            own_permissions(db, tenant_id, &from_user_id, &now_text).await?;
        let mut in_force = false;
        for grant in serde_json::from_str::<Vec<String>>(&permissions).unwrap_or_default() {
            if delegator.covers(&grant) {
                all.add(&grant);
                in_force = true;
            }
        }
        if in_force {
            valid_until = earliest(valid_until, timestamp::parse(&expires));
            valid_until = earliest(valid_until, delegator_until);
        }
    }
    let elevations: Vec<(String, String)> = with_db!(db, pool => {
        sqlx::query_as("SELECT permissions, expires_at FROM break_glass WHERE tenant_id = $1 AND user_id = $2 AND ended_at IS NULL AND expires_at > $3")
            .bind(tenant_id).bind(subject_id).bind(&now_text).fetch_all(pool).await?
    });
    for (permissions, expires) in elevations {
        for grant in serde_json::from_str::<Vec<String>>(&permissions).unwrap_or_default() {
            all.add(&grant);
        }
        valid_until = earliest(valid_until, timestamp::parse(&expires));
    }
    Ok(SubjectPermissions {
        own,
        all,
        valid_until,
    })
}

/// The names among `names` that are not in the registry.
pub async fn unknown_permissions(db: &Db, names: &[String]) -> Result<Vec<String>, sqlx::Error> {
    let known: Vec<String> = with_db!(db, pool => sqlx::query_scalar("SELECT name FROM permissions").fetch_all(pool).await?);
    Ok(names
        .iter()
        .filter(|n| !n.ends_with(".*") && !known.contains(n))
        .cloned()
        .collect())
}

/// One registered permission.
#[derive(Debug, Clone, Serialize, FromRow, ToSchema)]
pub struct Permission {
    /// Canonical dotted name.
    pub name: String,
    /// What it allows.
    pub description: String,
    /// `kernel` or the canon that registered it.
    pub owner: String,
}

/// The whole registry, by name.
pub async fn permissions(db: &Db) -> Result<Vec<Permission>, sqlx::Error> {
    with_db!(db, pool => sqlx::query_as("SELECT name, description, owner FROM permissions ORDER BY name").fetch_all(pool).await)
}

/// Inserts a role.
pub async fn insert_role(
    tx: &mut Tx,
    id: &str,
    tenant_id: &str,
    name: &str,
    permissions: &[String],
    builtin: bool,
) -> Result<Role, sqlx::Error> {
    let now = timestamp::now_text();
    let grants = serde_json::to_string(permissions).unwrap_or_else(|_| "[]".to_owned());
    let sql = format!(
        "INSERT INTO roles (id, tenant_id, name, permissions, builtin, version, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, 1, $6, $6) RETURNING {ROLE_COLUMNS}"
    );
    let row: RoleRow = with_tx!(tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).bind(tenant_id).bind(name).bind(&grants).bind(builtin).bind(&now)
            .fetch_one(&mut *conn).await?
    });
    Ok(row.into())
}

/// One role of the tenant.
pub async fn role(db: &Db, tenant_id: &str, id: &str) -> Result<Option<Role>, sqlx::Error> {
    let sql = format!("SELECT {ROLE_COLUMNS} FROM roles WHERE tenant_id = $1 AND id = $2");
    let row: Option<RoleRow> = with_db!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(id).fetch_optional(pool).await?);
    Ok(row.map(Role::from))
}

/// A role of the tenant by name (built-in roles are found this way).
pub async fn role_by_name(
    tx: &mut Tx,
    tenant_id: &str,
    name: &str,
) -> Result<Option<Role>, sqlx::Error> {
    let sql = format!("SELECT {ROLE_COLUMNS} FROM roles WHERE tenant_id = $1 AND name = $2");
    let row: Option<RoleRow> = with_tx!(tx, conn => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(name).fetch_optional(&mut *conn).await?);
    Ok(row.map(Role::from))
}

/// A page of the tenant's roles.
pub async fn roles(
    db: &Db,
    tenant_id: &str,
    after_id: &str,
    limit: u32,
) -> Result<Vec<Role>, sqlx::Error> {
    let sql = format!(
        "SELECT {ROLE_COLUMNS} FROM roles WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3"
    );
    let rows: Vec<RoleRow> = with_db!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(after_id).bind(i64::from(limit)).fetch_all(pool).await?);
    Ok(rows.into_iter().map(Role::from).collect())
}

/// Changes a non-built-in role under optimistic concurrency.
pub async fn update_role(
    tx: &mut Tx,
    tenant_id: &str,
    id: &str,
    name: Option<&str>,
    permissions: Option<&[String]>,
    expected_version: Option<i64>,
) -> Result<Option<Role>, sqlx::Error> {
    let now = timestamp::now_text();
    let grants = permissions.map(|p| serde_json::to_string(p).unwrap_or_else(|_| "[]".to_owned()));
    let sql = format!(
        "UPDATE roles SET name = COALESCE($3, name), permissions = COALESCE($4, permissions), version = version + 1, updated_at = $5 \
         WHERE tenant_id = $1 AND id = $2 AND builtin = $6 AND ($7 IS NULL OR version = $7) RETURNING {ROLE_COLUMNS}"
    );
    let row: Option<RoleRow> = with_tx!(tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(id).bind(name).bind(grants).bind(&now).bind(false).bind(expected_version)
            .fetch_optional(&mut *conn).await?
    });
    Ok(row.map(Role::from))
}

/// Deletes a non-built-in role (its assignments go with it); `false` when none matched.
pub async fn delete_role(
    tx: &mut Tx,
    tenant_id: &str,
    id: &str,
    expected_version: Option<i64>,
) -> Result<bool, sqlx::Error> {
    let n = with_tx!(tx, conn => {
        sqlx::query("DELETE FROM role_assignments WHERE tenant_id = $1 AND role_id = $2").bind(tenant_id).bind(id).execute(&mut *conn).await?;
        sqlx::query("DELETE FROM roles WHERE tenant_id = $1 AND id = $2 AND builtin = $3 AND ($4 IS NULL OR version = $4)")
            .bind(tenant_id).bind(id).bind(false).bind(expected_version).execute(&mut *conn).await?.rows_affected()
    });
    Ok(n == 1)
}

/// Assigns a role (replacing an earlier assignment of the same role).
pub async fn assign_role(
    tx: &mut Tx,
    tenant_id: &str,
    subject_id: &str,
    role_id: &str,
    expires_at: Option<&str>,
) -> Result<(), sqlx::Error> {
    let now = timestamp::now_text();
    with_tx!(tx, conn => {
        sqlx::query("INSERT INTO role_assignments (tenant_id, subject_id, role_id, expires_at, created_at) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (subject_id, role_id) DO UPDATE SET expires_at = excluded.expires_at")
            .bind(tenant_id).bind(subject_id).bind(role_id).bind(expires_at).bind(&now).execute(&mut *conn).await?;
    });
    Ok(())
}

/// Whether the subject has an assignment of the role (expired or not).
pub async fn holds_role(
    db: &Db,
    tenant_id: &str,
    subject_id: &str,
    role_id: &str,
) -> Result<bool, sqlx::Error> {
    let n: i64 = with_db!(db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM role_assignments WHERE tenant_id = $1 AND subject_id = $2 AND role_id = $3")
        .bind(tenant_id).bind(subject_id).bind(role_id).fetch_one(pool).await?);
    Ok(n > 0)
}

/// Removes a role assignment; `false` when there was none.
pub async fn unassign_role(
    tx: &mut Tx,
    tenant_id: &str,
    subject_id: &str,
    role_id: &str,
) -> Result<bool, sqlx::Error> {
    let n = with_tx!(tx, conn => {
        sqlx::query("DELETE FROM role_assignments WHERE tenant_id = $1 AND subject_id = $2 AND role_id = $3")
            .bind(tenant_id).bind(subject_id).bind(role_id).execute(&mut *conn).await?.rows_affected()
    });
    Ok(n == 1)
}

/// A delegation or a break-glass grant as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Grant {
    /// UUIDv7.
    pub id: String,
    /// Who granted (delegations) or requested (break-glass).
    pub from_user_id: String,
    /// Who holds it.
    pub to_user_id: String,
    /// The permissions.
    pub permissions: Vec<String>,
    /// Why.
    pub reason: String,
    /// When it ends by itself.
    pub expires_at: String,
    /// When it was ended early, if it was.
    pub revoked_at: Option<String>,
    /// Creation time.
    pub created_at: String,
}

type GrantRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    String,
);

fn grant(r: GrantRow) -> Grant {
    Grant {
        id: r.0,
        from_user_id: r.1,
        to_user_id: r.2,
        permissions: serde_json::from_str(&r.3).unwrap_or_default(),
        reason: r.4,
        expires_at: r.5,
        revoked_at: r.6,
        created_at: r.7,
    }
}

/// Inserts a delegation.
#[allow(clippy::too_many_arguments)]
pub async fn insert_delegation(
    tx: &mut Tx,
    id: &str,
    tenant_id: &str,
    from: &str,
    to: &str,
    permissions: &[String],
    reason: &str,
    expires_at: &str,
) -> Result<Grant, sqlx::Error> {
    let now = timestamp::now_text();
    let grants = serde_json::to_string(permissions).unwrap_or_else(|_| "[]".to_owned());
    let row: GrantRow = with_tx!(tx, conn => {
        sqlx::query_as("INSERT INTO delegations (id, tenant_id, from_user_id, to_user_id, permissions, reason, expires_at, created_at) \
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                        RETURNING id, from_user_id, to_user_id, permissions, reason, expires_at, revoked_at, created_at")
            .bind(id).bind(tenant_id).bind(from).bind(to).bind(&grants).bind(reason).bind(expires_at).bind(&now)
            .fetch_one(&mut *conn).await?
    });
    Ok(grant(row))
}

/// Delegations the user gave or received, newest first.
pub async fn delegations(
    db: &Db,
    tenant_id: &str,
    user_id: &str,
    after_id: &str,
    limit: u32,
) -> Result<Vec<Grant>, sqlx::Error> {
    let rows: Vec<GrantRow> = with_db!(db, pool => {
        sqlx::query_as("SELECT id, from_user_id, to_user_id, permissions, reason, expires_at, revoked_at, created_at FROM delegations \
                        WHERE tenant_id = $1 AND (from_user_id = $2 OR to_user_id = $2) AND id > $3 ORDER BY id LIMIT $4")
            .bind(tenant_id).bind(user_id).bind(after_id).bind(i64::from(limit)).fetch_all(pool).await?
    });
    Ok(rows.into_iter().map(grant).collect())
}

/// Revokes a delegation given or received by `user_id`; `None` when not found.
pub async fn revoke_delegation(
    tx: &mut Tx,
    tenant_id: &str,
    id: &str,
    user_id: &str,
) -> Result<Option<Grant>, sqlx::Error> {
    let now = timestamp::now_text();
    let row: Option<GrantRow> = with_tx!(tx, conn => {
        sqlx::query_as("UPDATE delegations SET revoked_at = COALESCE(revoked_at, $4) WHERE tenant_id = $1 AND id = $2 AND (from_user_id = $3 OR to_user_id = $3) \
                        RETURNING id, from_user_id, to_user_id, permissions, reason, expires_at, revoked_at, created_at")
            .bind(tenant_id).bind(id).bind(user_id).bind(&now).fetch_optional(&mut *conn).await?
    });
    Ok(row.map(grant))
}

/// Inserts a break-glass elevation.
pub async fn insert_break_glass(
    tx: &mut Tx,
    id: &str,
    tenant_id: &str,
    user_id: &str,
    permissions: &[String],
    reason: &str,
    expires_at: &str,
) -> Result<Grant, sqlx::Error> {
    let now = timestamp::now_text();
    let grants = serde_json::to_string(permissions).unwrap_or_else(|_| "[]".to_owned());
    let row: GrantRow = with_tx!(tx, conn => {
        sqlx::query_as("INSERT INTO break_glass (id, tenant_id, user_id, permissions, reason, expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                        RETURNING id, user_id, user_id, permissions, reason, expires_at, ended_at, created_at")
            .bind(id).bind(tenant_id).bind(user_id).bind(&grants).bind(reason).bind(expires_at).bind(&now)
            .fetch_one(&mut *conn).await?
    });
    Ok(grant(row))
}

/// Ends a break-glass elevation of `user_id` early; `None` when not found.
pub async fn end_break_glass(
    tx: &mut Tx,
    tenant_id: &str,
    id: &str,
    user_id: &str,
) -> Result<Option<Grant>, sqlx::Error> {
    let now = timestamp::now_text();
    let row: Option<GrantRow> = with_tx!(tx, conn => {
        sqlx::query_as("UPDATE break_glass SET ended_at = COALESCE(ended_at, $4) WHERE tenant_id = $1 AND id = $2 AND user_id = $3 \
                        RETURNING id, user_id, user_id, permissions, reason, expires_at, ended_at, created_at")
            .bind(tenant_id).bind(id).bind(user_id).bind(&now).fetch_optional(&mut *conn).await?
    });
    Ok(row.map(grant))
}

/// The newest entry of the invalidation log (SQLite), 0 when empty.
pub async fn last_invalidation(db: &Db) -> Result<i64, sqlx::Error> {
    with_db!(db, pool => sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM invalidation_log").fetch_one(pool).await)
}

/// Invalidation-log entries after `seq`, oldest first, at most `limit`.
pub async fn invalidations_after(
    db: &Db,
    seq: i64,
    limit: u32,
) -> Result<Vec<(i64, String)>, sqlx::Error> {
    with_db!(db, pool => sqlx::query_as("SELECT seq, payload FROM invalidation_log WHERE seq > $1 ORDER BY seq LIMIT $2")
        .bind(seq).bind(i64::from(limit)).fetch_all(pool).await)
}

/// Forgets invalidation-log entries written before `before` (RFC 3339).
pub async fn prune_invalidations(db: &Db, before: &str) -> Result<u64, sqlx::Error> {
    with_db!(db, pool => Ok(sqlx::query("DELETE FROM invalidation_log WHERE created_at < $1").bind(before).execute(pool).await?.rows_affected()))
}
