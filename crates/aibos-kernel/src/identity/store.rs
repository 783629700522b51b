//! Identity's SQL: tenants, users, service accounts, sessions, refresh tokens, signing keys.

use serde::Serialize;
use sqlx::FromRow;
use utoipa::ToSchema;

use super::tokens::StoredKey;
use crate::db::{Db, Tx};
use crate::{timestamp, with_db, with_tx};

/// A tenant as the API shows it.
#[derive(Debug, Clone, Serialize, FromRow, ToSchema)]
pub struct Tenant {
    /// UUIDv7.
    pub id: String,
    /// Unique, `^[a-z0-9][a-z0-9-]{1,62}$`.
    pub slug: String,
    /// Display name.
    pub name: String,
    /// `active` or `suspended`.
    pub status: String,
    /// Optimistic-concurrency version.
    pub version: i64,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
}

/// A user as the API shows it (never the password hash).
#[derive(Debug, Clone, Serialize, FromRow, ToSchema)]
pub struct User {
    /// UUIDv7.
    pub id: String,
    /// The user's tenant.
    pub tenant_id: String,
    /// Lowercased email, unique per tenant.
    pub email: String,
    /// Display name.
    pub name: String,
    /// `active` or `suspended`.
    pub status: String,
    /// Optimistic-concurrency version.
    pub version: i64,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
}

const TENANT_COLUMNS: &str = "id, slug, name, status, version, created_at, updated_at";
const USER_COLUMNS: &str = "id, tenant_id, email, name, status, version, created_at, updated_at";

/// Inserts a tenant.
pub async fn insert_tenant(
    tx: &mut Tx,
    id: &str,
    slug: &str,
    name: &str,
) -> Result<Tenant, sqlx::Error> {
    let now = timestamp::now_text();
    with_tx!(tx, conn => {
        sqlx::query_as(
            "INSERT INTO tenants (id, slug, name, status, version, created_at, updated_at) VALUES ($1, $2, $3, 'active', 1, $4, $4) \
             RETURNING id, slug, name, status, version, created_at, updated_at",
        )
        .bind(id).bind(slug).bind(name).bind(&now)
        .fetch_one(&mut *conn).await
    })
}

/// One tenant by id.
pub async fn tenant(db: &Db, id: &str) -> Result<Option<Tenant>, sqlx::Error> {
    let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1");
    with_db!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(pool).await)
}

/// One tenant by slug or id.
pub async fn tenant_by_slug_or_id(db: &Db, key: &str) -> Result<Option<Tenant>, sqlx::Error> {
    let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE slug = $1 OR id = $1");
    with_db!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(key).fetch_optional(pool).await)
}

/// A page of tenants after `after_id`, by id.
pub async fn tenants(db: &Db, after_id: &str, limit: u32) -> Result<Vec<Tenant>, sqlx::Error> {
    let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id > $1 ORDER BY id LIMIT $2");
    with_db!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(after_id).bind(i64::from(limit)).fetch_all(pool).await)
}

/// Changes name and/or status when `expected_version` matches (or is `None`);
/// `Ok(None)` when the tenant is missing or the version differs.
pub async fn update_tenant(
    tx: &mut Tx,
    id: &str,
    name: Option<&str>,
    status: Option<&str>,
    expected_version: Option<i64>,
) -> Result<Option<Tenant>, sqlx::Error> {
    let now = timestamp::now_text();
    let sql = format!(
        "UPDATE tenants SET name = COALESCE($2, name), status = COALESCE($3, status), version = version + 1, updated_at = $4 \
         WHERE id = $1 AND ($5 IS NULL OR version = $5) RETURNING {TENANT_COLUMNS}"
    );
    with_tx!(tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).bind(name).bind(status).bind(&now).bind(expected_version)
            .fetch_optional(&mut *conn).await
    })
}

/// Inserts a user (email already lowercased).
pub async fn insert_user(
    tx: &mut Tx,
    id: &str,
    tenant_id: &str,
    email: &str,
    name: &str,
    password_hash: &str,
) -> Result<User, sqlx::Error> {
    let now = timestamp::now_text();
    let sql = format!(
        "INSERT INTO users (id, tenant_id, email, name, password_hash, status, version, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, 'active', 1, $6, $6) RETURNING {USER_COLUMNS}"
    );
    with_tx!(tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).bind(tenant_id).bind(email).bind(name).bind(password_hash).bind(&now)
            .fetch_one(&mut *conn).await
    })
}

/// One user of `tenant_id` (another tenant's user is `None`, like a missing one).
pub async fn user(db: &Db, tenant_id: &str, id: &str) -> Result<Option<User>, sqlx::Error> {
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE tenant_id = $1 AND id = $2");
    with_db!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(id).fetch_optional(pool).await)
}

/// A page of `tenant_id`'s users after `after_id`.
pub async fn users(
    db: &Db,
    tenant_id: &str,
    after_id: &str,
    limit: u32,
) -> Result<Vec<User>, sqlx::Error> {
    let sql = format!(
        "SELECT {USER_COLUMNS} FROM users WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3"
    );
    with_db!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(after_id).bind(i64::from(limit)).fetch_all(pool).await)
}

/// What a login needs, in one query: the tenant (by slug or id) and, when the
/// tenant exists, the user with that email in it.
#[derive(Debug, FromRow)]
pub struct LoginLookup {
    pub tenant_id: String,
    pub tenant_status: String,
    pub user_id: Option<String>,
    pub user_status: Option<String>,
    pub password_hash: Option<String>,
}

/// One round trip instead of two on the login path (each costs a hand-off to the
/// database's thread, measurable beside the hash).
pub async fn login_lookup(
    db: &Db,
    tenant_key: &str,
    email: &str,
) -> Result<Option<LoginLookup>, sqlx::Error> {
    with_db!(db, pool => {
        sqlx::query_as(
            "SELECT t.id AS tenant_id, t.status AS tenant_status, u.id AS user_id, u.status AS user_status, u.password_hash \
             FROM tenants t LEFT JOIN users u ON u.tenant_id = t.id AND u.email = $2 \
             WHERE t.slug = $1 OR t.id = $1",
        )
        .bind(tenant_key).bind(email).fetch_optional(pool).await
    })
}

/// Changes a user's name and/or status under optimistic concurrency.
pub async fn update_user(
    tx: &mut Tx,
    tenant_id: &str,
    id: &str,
    name: Option<&str>,
    status: Option<&str>,
    expected_version: Option<i64>,
) -> Result<Option<User>, sqlx::Error> {
    let now = timestamp::now_text();
    let sql = format!(
        "UPDATE users SET name = COALESCE($3, name), status = COALESCE($4, status), version = version + 1, updated_at = $5 \
         WHERE tenant_id = $1 AND id = $2 AND ($6 IS NULL OR version = $6) RETURNING {USER_COLUMNS}"
    );
    with_tx!(tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(id).bind(name).bind(status).bind(&now).bind(expected_version)
            .fetch_optional(&mut *conn).await
    })
}

/// Replaces a user's password hash; `false` when no such user in the tenant.
pub async fn set_password(
    tx: &mut Tx,
    tenant_id: &str,
    id: &str,
    password_hash: &str,
) -> Result<bool, sqlx::Error> {
    let now = timestamp::now_text();
    let done = with_tx!(tx, conn => {
        sqlx::query("UPDATE users SET password_hash = $3, version = version + 1, updated_at = $4 WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id).bind(id).bind(password_hash).bind(&now).execute(&mut *conn).await?.rows_affected()
    });
    Ok(done == 1)
}

/// Whether the system tenant has any user (bootstrap is then closed).
pub async fn any_user_in(db: &Db, tenant_id: &str) -> Result<bool, sqlx::Error> {
    let n: i64 = with_db!(db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE tenant_id = $1").bind(tenant_id).fetch_one(pool).await?);
    Ok(n > 0)
}

/// Users of a tenant, counted inside a transaction (bootstrap's re-check).
pub async fn count_users_tx(tx: &mut Tx, tenant_id: &str) -> Result<i64, sqlx::Error> {
    with_tx!(tx, conn => sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE tenant_id = $1").bind(tenant_id).fetch_one(&mut *conn).await)
}

/// A service account's login view: id, tenant, status, secret hash.
pub async fn service_account_credentials(
    db: &Db,
    client_id: &str,
) -> Result<Option<(String, String, String, String)>, sqlx::Error> {
    with_db!(db, pool => {
        sqlx::query_as("SELECT id, tenant_id, status, secret_hash FROM service_accounts WHERE client_id = $1")
            .bind(client_id).fetch_optional(pool).await
    })
}

/// A service account as the API shows it.
#[derive(Debug, Clone, Serialize, FromRow, ToSchema)]
pub struct ServiceAccount {
    /// UUIDv7.
    pub id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// Unique per tenant.
    pub name: String,
    /// Public identifier for the client-credentials grant.
    pub client_id: String,
    /// `active` or `suspended`.
    pub status: String,
    /// Optimistic-concurrency version.
    pub version: i64,
    /// Creation time.
    pub created_at: String,
}

/// Inserts a service account.
pub async fn insert_service_account(
    tx: &mut Tx,
    id: &str,
    tenant_id: &str,
    name: &str,
    client_id: &str,
    secret_hash: &str,
) -> Result<ServiceAccount, sqlx::Error> {
    let now = timestamp::now_text();
    with_tx!(tx, conn => {
        sqlx::query_as(
            "INSERT INTO service_accounts (id, tenant_id, name, client_id, secret_hash, status, version, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, 'active', 1, $6, $6) RETURNING id, tenant_id, name, client_id, status, version, created_at",
        )
        .bind(id).bind(tenant_id).bind(name).bind(client_id).bind(secret_hash).bind(&now)
        .fetch_one(&mut *conn).await
    })
}

/// A page of a tenant's service accounts.
pub async fn service_accounts(
    db: &Db,
    tenant_id: &str,
    after_id: &str,
    limit: u32,
) -> Result<Vec<ServiceAccount>, sqlx::Error> {
    with_db!(db, pool => {
        sqlx::query_as("SELECT id, tenant_id, name, client_id, status, version, created_at FROM service_accounts \
                        WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3")
            .bind(tenant_id).bind(after_id).bind(i64::from(limit)).fetch_all(pool).await
    })
}

/// Replaces a service account's secret hash; `None` when not in the tenant.
pub async fn rotate_service_account_secret(
    tx: &mut Tx,
    tenant_id: &str,
    id: &str,
    secret_hash: &str,
) -> Result<Option<ServiceAccount>, sqlx::Error> {
    let now = timestamp::now_text();
    with_tx!(tx, conn => {
        sqlx::query_as("UPDATE service_accounts SET secret_hash = $3, version = version + 1, updated_at = $4 WHERE tenant_id = $1 AND id = $2 \
                        RETURNING id, tenant_id, name, client_id, status, version, created_at")
            .bind(tenant_id).bind(id).bind(secret_hash).bind(&now).fetch_optional(&mut *conn).await
    })
}

/// Opens a session.
pub async fn insert_session(
    tx: &mut Tx,
    id: &str,
    tenant_id: &str,
    subject_id: &str,
    actor_type: &str,
    expires_at: &str,
) -> Result<(), sqlx::Error> {
    let now = timestamp::now_text();
    with_tx!(tx, conn => {
        sqlx::query("INSERT INTO sessions (id, tenant_id, subject_id, actor_type, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(id).bind(tenant_id).bind(subject_id).bind(actor_type).bind(&now).bind(expires_at)
            .execute(&mut *conn).await?;
    });
    Ok(())
}

/// Revokes a session; `false` when it was not live in that tenant.
pub async fn revoke_session(
    tx: &mut Tx,
    tenant_id: &str,
    id: &str,
    reason: &str,
) -> Result<bool, sqlx::Error> {
    let now = timestamp::now_text();
    let n = with_tx!(tx, conn => {
        sqlx::query("UPDATE sessions SET revoked_at = $3, revoked_reason = $4 WHERE tenant_id = $1 AND id = $2 AND revoked_at IS NULL")
            .bind(tenant_id).bind(id).bind(&now).bind(reason).execute(&mut *conn).await?.rows_affected()
    });
    Ok(n == 1)
}

/// Revokes every open session of a subject but `keep` (its refresh tokens die
/// with them: a refresh needs an unrevoked session); returns how many.
pub async fn revoke_subject_sessions(
    tx: &mut Tx,
    tenant_id: &str,
    subject_id: &str,
    keep: Option<&str>,
    reason: &str,
) -> Result<u64, sqlx::Error> {
    let now = timestamp::now_text();
    let n = with_tx!(tx, conn => {
        sqlx::query("UPDATE sessions SET revoked_at = $3, revoked_reason = $4 WHERE tenant_id = $1 AND subject_id = $2 AND revoked_at IS NULL AND ($5 IS NULL OR id <> $5)")
            .bind(tenant_id).bind(subject_id).bind(&now).bind(reason).bind(keep).execute(&mut *conn).await?.rows_affected()
    });
    Ok(n)
}

/// Renames, suspends or reactivates a service account under optimistic concurrency.
pub async fn update_service_account(
    tx: &mut Tx,
    tenant_id: &str,
    id: &str,
    name: Option<&str>,
    status: Option<&str>,
    expected_version: Option<i64>,
) -> Result<Option<ServiceAccount>, sqlx::Error> {
    let now = timestamp::now_text();
    with_tx!(tx, conn => {
        sqlx::query_as("UPDATE service_accounts SET name = COALESCE($3, name), status = COALESCE($4, status), version = version + 1, updated_at = $5 \
                        WHERE tenant_id = $1 AND id = $2 AND ($6 IS NULL OR version = $6) \
                        RETURNING id, tenant_id, name, client_id, status, version, created_at")
            .bind(tenant_id).bind(id).bind(name).bind(status).bind(&now).bind(expected_version).fetch_optional(&mut *conn).await
    })
}

/// One service account of the tenant.
pub async fn service_account(
    db: &Db,
    tenant_id: &str,
    id: &str,
) -> Result<Option<ServiceAccount>, sqlx::Error> {
    with_db!(db, pool => {
        sqlx::query_as("SELECT id, tenant_id, name, client_id, status, version, created_at FROM service_accounts WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id).bind(id).fetch_optional(pool).await
    })
}

/// Stores a refresh token's hash as the session's current one.
pub async fn insert_refresh_token(
    tx: &mut Tx,
    token_hash: &str,
    session_id: &str,
    tenant_id: &str,
) -> Result<(), sqlx::Error> {
    let now = timestamp::now_text();
    with_tx!(tx, conn => {
        sqlx::query("INSERT INTO refresh_tokens (token_hash, session_id, tenant_id, status, created_at) VALUES ($1, $2, $3, 'active', $4)")
            .bind(token_hash).bind(session_id).bind(tenant_id).bind(&now).execute(&mut *conn).await?;
    });
    Ok(())
}

/// What a presented refresh token is.
#[derive(Debug, FromRow)]
pub struct RefreshTokenRow {
    /// The session it belongs to.
    pub session_id: String,
    /// That session's tenant.
    pub tenant_id: String,
    /// `active` or `rotated`.
    pub status: String,
    /// The session's subject.
    pub subject_id: String,
    /// `user` or `service`.
    pub actor_type: String,
    /// When the session ends.
    pub expires_at: String,
    /// Set when the session was revoked.
    pub revoked_at: Option<String>,
}

/// Looks up a refresh token by hash, inside the transaction that will rotate it.
pub async fn refresh_token(
    tx: &mut Tx,
    token_hash: &str,
) -> Result<Option<RefreshTokenRow>, sqlx::Error> {
    with_tx!(tx, conn => {
        sqlx::query_as("SELECT r.session_id, r.tenant_id, r.status, s.subject_id, s.actor_type, s.expires_at, s.revoked_at \
                        FROM refresh_tokens r JOIN sessions s ON s.id = r.session_id WHERE r.token_hash = $1")
            .bind(token_hash).fetch_optional(&mut *conn).await
    })
}

/// Marks a refresh token rotated; `false` when it already was (a concurrent use).
pub async fn rotate_refresh_token(tx: &mut Tx, token_hash: &str) -> Result<bool, sqlx::Error> {
    let n = with_tx!(tx, conn => {
        sqlx::query("UPDATE refresh_tokens SET status = 'rotated' WHERE token_hash = $1 AND status = 'active'")
            .bind(token_hash).execute(&mut *conn).await?.rows_affected()
    });
    Ok(n == 1)
}

/// Every signing key that may still verify tokens (active, or retired less than a
/// day ago), their seeds opened with the master keys. A seed that does not open
/// is an error, never a key silently left out (that would make a new one).
pub async fn signing_keys(
    db: &Db,
    master: &crate::secrets::MasterKeys,
) -> Result<Vec<StoredKey>, sqlx::Error> {
    let rows: Vec<(String, String, String)> = with_db!(db, pool => {
        sqlx::query_as("SELECT kid, private_key, status FROM signing_keys WHERE status = 'active' OR retired_at > $1 ORDER BY created_at DESC")
            .bind(timestamp::format(timestamp::now() - time::Duration::seconds(i64::try_from(crate::limits::ACCESS_TOKEN_TTL_SECONDS_MAX).unwrap_or(86_400))))
            .fetch_all(pool).await?
    });
    let mut keys = Vec::with_capacity(rows.len());
    for (kid, stored, status) in rows {
        use base64::Engine as _;
        // Before the first start with a master key, seeds were stored in clear;
        // start-up seals them (secrets::source::seal_and_check).
        let seed_text = if crate::secrets::is_sealed(&stored) {
            master
                .open(&stored, &crate::secrets::store::signing_key_place(&kid))
                .map_err(|reason| {
                    sqlx::Error::Decode(Box::new(crate::secrets::source::MasterKeyError::Open {
                        place: format!("token-signing key {kid}"),
                        reason,
                    }))
                })?
        } else {
            stored
        };
        let Some(seed) = base64::engine::general_purpose::STANDARD
            .decode(seed_text)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
        else {
            tracing::error!(%kid, "a stored signing key's seed is not 32 bytes of base64; it is skipped");
            continue;
        };
        keys.push(StoredKey::from_seed(kid, seed, status == "active"));
    }
    Ok(keys)
}

/// The public half of every signing key the kernel ever had (checkpoints may be old).
pub async fn all_public_keys(db: &Db) -> Result<Vec<String>, sqlx::Error> {
    with_db!(db, pool => sqlx::query_scalar("SELECT public_key FROM signing_keys ORDER BY created_at").fetch_all(pool).await)
}

/// Tenants by slug, for the operator CLI.
pub async fn all_tenants(db: &Db) -> Result<Vec<Tenant>, sqlx::Error> {
    let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants ORDER BY slug");
    with_db!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await)
}

/// Adds `key` as the active signing key (its seed sealed with the master key)
/// and retires the previous one.
pub async fn rotate_signing_key(
    tx: &mut Tx,
    master: &crate::secrets::MasterKeys,
    key: &StoredKey,
) -> Result<(), sqlx::Error> {
    let now = timestamp::now_text();
    let sealed = master.seal(
        &key.seed_text(),
        &crate::secrets::store::signing_key_place(&key.kid),
    );
    with_tx!(tx, conn => {
        sqlx::query("UPDATE signing_keys SET status = 'retired', retired_at = $1 WHERE status = 'active'").bind(&now).execute(&mut *conn).await?;
        sqlx::query("INSERT INTO signing_keys (kid, algorithm, private_key, public_key, status, created_at) VALUES ($1, 'EdDSA', $2, $3, 'active', $4)")
            .bind(&key.kid).bind(&sealed).bind(key.public_text()).bind(&now).execute(&mut *conn).await?;
    });
    Ok(())
}
