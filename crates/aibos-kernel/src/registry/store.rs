//! The registry's SQL: canons, assertion secrets, routes, and the permissions
//! canons define (rows of the shared permission registry owned by the canon).

use sqlx::FromRow;

use super::{AssertionSecretInfo, CanonPermission, Route, RouteRateLimit};
use crate::db::{Db, Tx};
use crate::identity::SYSTEM_TENANT_ID;
use crate::secrets::source::MasterKeyError;
use crate::secrets::store::assertion_secret_place;
pub use crate::secrets::store::canon_tls_key_place;
use crate::secrets::{MasterKeys, is_sealed};
use crate::{timestamp, with_db, with_tx};

/// A canon row (status and circuit come from the gateway's memory).
#[derive(Debug, Clone, FromRow)]
pub struct CanonRow {
    pub id: String,
    pub name: String,
    pub base_url: String,
    pub health_path: String,
    pub protocol: String,
    pub timeout_ms: Option<i64>,
    pub permissions: String,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
    /// PEM CA bundle that replaces the public roots for this https cell.
    pub tls_ca_pem: Option<String>,
    /// PEM client certificate chain for mutual TLS.
    pub tls_client_cert_pem: Option<String>,
    /// Its private key, sealed (`enc:v1:…`); never shown, opened only for the route table.
    pub tls_client_key: Option<String>,
}

impl CanonRow {
    /// The permissions column, parsed.
    pub fn permission_list(&self) -> Vec<CanonPermission> {
        serde_json::from_str(&self.permissions).unwrap_or_default()
    }
}

const CANON_COLUMNS: &str = "id, name, base_url, health_path, protocol, timeout_ms, permissions, version, created_at, updated_at, tls_ca_pem, tls_client_cert_pem, tls_client_key";

/// The fields of a new or changed canon.
pub struct CanonFields<'a> {
    pub base_url: &'a str,
    pub health_path: &'a str,
    pub protocol: &'a str,
    pub timeout_ms: Option<i64>,
    pub permissions: &'a [CanonPermission],
    pub tls_ca_pem: Option<&'a str>,
    pub tls_client_cert_pem: Option<&'a str>,
    /// Already sealed with [`canon_tls_key_place`] of the canon's id.
    pub tls_client_key_sealed: Option<&'a str>,
}

fn permissions_json(list: &[CanonPermission]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".to_owned())
}

/// Inserts a canon.
pub async fn insert_canon(
    tx: &mut Tx,
    id: &str,
    name: &str,
    fields: &CanonFields<'_>,
) -> Result<CanonRow, sqlx::Error> {
    let now = timestamp::now_text();
    let sql = format!(
        "INSERT INTO canons (id, tenant_id, name, base_url, health_path, timeout_ms, permissions, protocol, version, created_at, updated_at, tls_ca_pem, tls_client_cert_pem, tls_client_key) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $9, 1, $8, $8, $10, $11, $12) RETURNING {CANON_COLUMNS}"
    );
    with_tx!(tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).bind(SYSTEM_TENANT_ID).bind(name).bind(fields.base_url)
            .bind(fields.health_path).bind(fields.timeout_ms).bind(permissions_json(fields.permissions)).bind(&now)
            .bind(fields.protocol).bind(fields.tls_ca_pem).bind(fields.tls_client_cert_pem).bind(fields.tls_client_key_sealed)
            .fetch_one(&mut *conn).await
    })
}

/// Changes a canon under optimistic concurrency; `None` when missing or the version differs.
pub async fn update_canon(
    tx: &mut Tx,
    id: &str,
    fields: &CanonFields<'_>,
    expected_version: Option<i64>,
) -> Result<Option<CanonRow>, sqlx::Error> {
    let now = timestamp::now_text();
    let sql = format!(
        "UPDATE canons SET base_url = $3, health_path = $4, timeout_ms = $5, permissions = $6, protocol = $9, \
         tls_ca_pem = $10, tls_client_cert_pem = $11, tls_client_key = $12, version = version + 1, updated_at = $7 \
         WHERE tenant_id = $1 AND id = $2 AND ($8 IS NULL OR version = $8) RETURNING {CANON_COLUMNS}"
    );
    with_tx!(tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(SYSTEM_TENANT_ID).bind(id).bind(fields.base_url).bind(fields.health_path)
            .bind(fields.timeout_ms).bind(permissions_json(fields.permissions)).bind(&now).bind(expected_version)
            .bind(fields.protocol).bind(fields.tls_ca_pem).bind(fields.tls_client_cert_pem).bind(fields.tls_client_key_sealed)
            .fetch_optional(&mut *conn).await
    })
}

/// One canon.
pub async fn canon(db: &Db, id: &str) -> Result<Option<CanonRow>, sqlx::Error> {
    let sql = format!("SELECT {CANON_COLUMNS} FROM canons WHERE tenant_id = $1 AND id = $2");
    with_db!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(SYSTEM_TENANT_ID).bind(id).fetch_optional(pool).await)
}

/// A page of canons after `after_id`, by id.
pub async fn canons(db: &Db, after_id: &str, limit: u32) -> Result<Vec<CanonRow>, sqlx::Error> {
    let sql = format!(
        "SELECT {CANON_COLUMNS} FROM canons WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3"
    );
    with_db!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(SYSTEM_TENANT_ID).bind(after_id).bind(i64::from(limit)).fetch_all(pool).await)
}

/// How many canons exist.
pub async fn canon_count(tx: &mut Tx) -> Result<i64, sqlx::Error> {
    with_tx!(tx, conn => sqlx::query_scalar("SELECT COUNT(*) FROM canons WHERE tenant_id = $1").bind(SYSTEM_TENANT_ID).fetch_one(&mut *conn).await)
}

/// Deletes a canon (its secrets go with it) when it has no routes and the
/// version matches; `Ok(false)` when nothing matched.
pub async fn delete_canon(
    tx: &mut Tx,
    id: &str,
    expected_version: Option<i64>,
) -> Result<bool, sqlx::Error> {
    let done = with_tx!(tx, conn => {
        sqlx::query("DELETE FROM canons WHERE tenant_id = $1 AND id = $2 AND ($3 IS NULL OR version = $3)")
            .bind(SYSTEM_TENANT_ID).bind(id).bind(expected_version).execute(&mut *conn).await?.rows_affected()
    });
    Ok(done == 1)
}

/// Makes the permission registry hold exactly `list` for canon `owner`: rows it
/// no longer defines are removed, new ones added, descriptions updated. A name
/// owned by someone else is returned as a conflict and nothing is changed.
pub async fn sync_canon_permissions(
    tx: &mut Tx,
    owner: &str,
    list: &[CanonPermission],
) -> Result<Result<(), String>, sqlx::Error> {
    for p in list {
        let holder: Option<String> = with_tx!(tx, conn => {
            sqlx::query_scalar("SELECT owner FROM permissions WHERE name = $1").bind(&p.name).fetch_optional(&mut *conn).await?
        });
        if let Some(holder) = holder
            && holder != owner
        {
            return Ok(Err(format!("{} is already defined by {holder}", p.name)));
        }
    }
    let now = timestamp::now_text();
    with_tx!(tx, conn => {
        sqlx::query("DELETE FROM permissions WHERE owner = $1").bind(owner).execute(&mut *conn).await?;
        for p in list {
            sqlx::query("INSERT INTO permissions (name, description, owner, created_at) VALUES ($1, $2, $3, $4)")
                .bind(&p.name).bind(&p.description).bind(owner).bind(&now).execute(&mut *conn).await?;
        }
    });
    Ok(Ok(()))
}

/// Removes every permission canon `owner` defined.
pub async fn delete_canon_permissions(tx: &mut Tx, owner: &str) -> Result<(), sqlx::Error> {
    with_tx!(tx, conn => {
        sqlx::query("DELETE FROM permissions WHERE owner = $1").bind(owner).execute(&mut *conn).await?;
    });
    Ok(())
}

/// Adds an assertion secret to a canon, active or not, sealed with the master key.
pub async fn insert_secret(
    tx: &mut Tx,
    master: &MasterKeys,
    canon_id: &str,
    kid: &str,
    secret: &str,
    active: bool,
) -> Result<(), sqlx::Error> {
    let now = timestamp::now_text();
    let activated = active.then(|| now.clone());
    let sealed = master.seal(secret, &assertion_secret_place(canon_id, kid));
    with_tx!(tx, conn => {
        sqlx::query("INSERT INTO canon_assertion_secrets (canon_id, tenant_id, kid, secret, active, created_at, activated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(canon_id).bind(SYSTEM_TENANT_ID).bind(kid).bind(&sealed).bind(active).bind(&now).bind(activated)
            .execute(&mut *conn).await?;
    });
    Ok(())
}

/// How many secrets a canon holds.
pub async fn secret_count(tx: &mut Tx, canon_id: &str) -> Result<i64, sqlx::Error> {
    with_tx!(tx, conn => sqlx::query_scalar("SELECT COUNT(*) FROM canon_assertion_secrets WHERE canon_id = $1").bind(canon_id).fetch_one(&mut *conn).await)
}

#[derive(FromRow)]
struct SecretRow {
    kid: String,
    active: bool,
    created_at: String,
    activated_at: Option<String>,
}

/// A canon's secrets, without their values.
pub async fn secrets(db: &Db, canon_id: &str) -> Result<Vec<AssertionSecretInfo>, sqlx::Error> {
    let rows: Vec<SecretRow> = with_db!(db, pool => {
        sqlx::query_as("SELECT kid, active, created_at, activated_at FROM canon_assertion_secrets WHERE canon_id = $1 ORDER BY created_at, kid")
            .bind(canon_id).fetch_all(pool).await?
    });
    Ok(rows
        .into_iter()
        .map(|r| AssertionSecretInfo {
            kid: r.kid,
            state: if r.active { "active" } else { "inactive" }.to_owned(),
            created_at: r.created_at,
            activated_at: r.activated_at,
        })
        .collect())
}

/// Makes `kid` the canon's only active secret; `false` when the canon has no such kid.
pub async fn activate_secret(tx: &mut Tx, canon_id: &str, kid: &str) -> Result<bool, sqlx::Error> {
    let now = timestamp::now_text();
    let found = with_tx!(tx, conn => {
        sqlx::query("UPDATE canon_assertion_secrets SET active = $3, activated_at = $4 WHERE canon_id = $1 AND kid = $2")
            .bind(canon_id).bind(kid).bind(true).bind(&now).execute(&mut *conn).await?.rows_affected()
    });
    if found != 1 {
        return Ok(false);
    }
    with_tx!(tx, conn => {
        sqlx::query("UPDATE canon_assertion_secrets SET active = $3 WHERE canon_id = $1 AND kid <> $2")
            .bind(canon_id).bind(kid).bind(false).execute(&mut *conn).await?;
    });
    Ok(true)
}

/// What deleting a secret found.
#[derive(Debug, PartialEq, Eq)]
pub enum SecretDeletion {
    /// Deleted.
    Deleted,
    /// No such kid.
    Missing,
    /// It is the active one.
    Active,
}

/// Deletes an inactive secret.
pub async fn delete_secret(
    tx: &mut Tx,
    canon_id: &str,
    kid: &str,
) -> Result<SecretDeletion, sqlx::Error> {
    let active: Option<bool> = with_tx!(tx, conn => {
        sqlx::query_scalar("SELECT active FROM canon_assertion_secrets WHERE canon_id = $1 AND kid = $2")
            .bind(canon_id).bind(kid).fetch_optional(&mut *conn).await?
    });
    match active {
        None => Ok(SecretDeletion::Missing),
        Some(true) => Ok(SecretDeletion::Active),
        Some(false) => {
            with_tx!(tx, conn => {
                sqlx::query("DELETE FROM canon_assertion_secrets WHERE canon_id = $1 AND kid = $2")
                    .bind(canon_id).bind(kid).execute(&mut *conn).await?;
            });
            Ok(SecretDeletion::Deleted)
        }
    }
}

#[derive(FromRow)]
struct RouteRow {
    id: String,
    canon_id: String,
    method: String,
    path: String,
    required_permissions: String,
    public_to_authenticated: bool,
    idempotency: String,
    rate_limit: Option<String>,
    timeout_ms: Option<i64>,
    forward_cookies: bool,
    audit_calls: bool,
    version: i64,
    created_at: String,
    updated_at: String,
}

impl From<RouteRow> for Route {
    fn from(r: RouteRow) -> Route {
        Route {
            id: r.id,
            canon_id: r.canon_id,
            method: r.method,
            path: r.path,
            required_permissions: serde_json::from_str(&r.required_permissions).unwrap_or_default(),
            public_to_authenticated: r.public_to_authenticated,
            idempotency: r.idempotency,
            rate_limit: r.rate_limit.and_then(|t| serde_json::from_str(&t).ok()),
            timeout_ms: r.timeout_ms,
            forward_cookies: r.forward_cookies,
            audit_calls: r.audit_calls,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

const ROUTE_COLUMNS: &str = "id, canon_id, method, path, required_permissions, public_to_authenticated, idempotency, rate_limit, timeout_ms, forward_cookies, audit_calls, version, created_at, updated_at";

/// The fields of a new or changed route.
pub struct RouteFields<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub path_shape: &'a str,
    pub required_permissions: &'a [String],
    pub public_to_authenticated: bool,
    pub idempotency: &'a str,
    pub rate_limit: &'a Option<RouteRateLimit>,
    pub timeout_ms: Option<i64>,
    pub forward_cookies: bool,
    pub audit_calls: bool,
}

impl RouteFields<'_> {
    fn permissions_json(&self) -> String {
        serde_json::to_string(self.required_permissions).unwrap_or_else(|_| "[]".to_owned())
    }

    fn rate_limit_json(&self) -> Option<String> {
        self.rate_limit
            .as_ref()
            .and_then(|l| serde_json::to_string(l).ok())
    }
}

/// Inserts a route.
pub async fn insert_route(
    tx: &mut Tx,
    id: &str,
    canon_id: &str,
    f: &RouteFields<'_>,
) -> Result<Route, sqlx::Error> {
    let now = timestamp::now_text();
    let sql = format!(
        "INSERT INTO routes (id, tenant_id, canon_id, method, path, path_shape, required_permissions, idempotency, rate_limit, timeout_ms, forward_cookies, version, created_at, updated_at, public_to_authenticated, audit_calls) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 1, $12, $12, $13, $14) RETURNING {ROUTE_COLUMNS}"
    );
    let row: RouteRow = with_tx!(tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).bind(SYSTEM_TENANT_ID).bind(canon_id).bind(f.method).bind(f.path)
            .bind(f.path_shape).bind(f.permissions_json()).bind(f.idempotency).bind(f.rate_limit_json()).bind(f.timeout_ms)
            .bind(f.forward_cookies).bind(&now).bind(f.public_to_authenticated).bind(f.audit_calls).fetch_one(&mut *conn).await?
    });
    Ok(row.into())
}

/// Changes a route under optimistic concurrency; `None` when missing or the version differs.
pub async fn update_route(
    tx: &mut Tx,
    id: &str,
    f: &RouteFields<'_>,
    expected_version: Option<i64>,
) -> Result<Option<Route>, sqlx::Error> {
    let now = timestamp::now_text();
    let sql = format!(
        "UPDATE routes SET method = $3, path = $4, path_shape = $5, required_permissions = $6, idempotency = $7, rate_limit = $8, \
         timeout_ms = $9, forward_cookies = $10, public_to_authenticated = $13, audit_calls = $14, version = version + 1, updated_at = $11 \
         WHERE tenant_id = $1 AND id = $2 AND ($12 IS NULL OR version = $12) RETURNING {ROUTE_COLUMNS}"
    );
    let row: Option<RouteRow> = with_tx!(tx, conn => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(SYSTEM_TENANT_ID).bind(id).bind(f.method).bind(f.path).bind(f.path_shape)
            .bind(f.permissions_json()).bind(f.idempotency).bind(f.rate_limit_json()).bind(f.timeout_ms).bind(f.forward_cookies)
            .bind(&now).bind(expected_version).bind(f.public_to_authenticated).bind(f.audit_calls).fetch_optional(&mut *conn).await?
    });
    Ok(row.map(Route::from))
}

/// One route.
pub async fn route(db: &Db, id: &str) -> Result<Option<Route>, sqlx::Error> {
    let sql = format!("SELECT {ROUTE_COLUMNS} FROM routes WHERE tenant_id = $1 AND id = $2");
    let row: Option<RouteRow> = with_db!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(SYSTEM_TENANT_ID).bind(id).fetch_optional(pool).await?);
    Ok(row.map(Route::from))
}

/// A page of routes after `after_id`, by id, optionally of one canon.
pub async fn routes(
    db: &Db,
    canon_id: Option<&str>,
    after_id: &str,
    limit: u32,
) -> Result<Vec<Route>, sqlx::Error> {
    let sql = format!(
        "SELECT {ROUTE_COLUMNS} FROM routes WHERE tenant_id = $1 AND ($2 IS NULL OR canon_id = $2) AND id > $3 ORDER BY id LIMIT $4"
    );
    let rows: Vec<RouteRow> = with_db!(db, pool => {
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(SYSTEM_TENANT_ID).bind(canon_id).bind(after_id).bind(i64::from(limit)).fetch_all(pool).await?
    });
    Ok(rows.into_iter().map(Route::from).collect())
}

/// How many routes a canon has.
pub async fn route_count(tx: &mut Tx, canon_id: &str) -> Result<i64, sqlx::Error> {
    with_tx!(tx, conn => sqlx::query_scalar("SELECT COUNT(*) FROM routes WHERE canon_id = $1").bind(canon_id).fetch_one(&mut *conn).await)
}

/// Deletes a route when the version matches; `false` when nothing matched.
pub async fn delete_route(
    tx: &mut Tx,
    id: &str,
    expected_version: Option<i64>,
) -> Result<bool, sqlx::Error> {
    let done = with_tx!(tx, conn => {
        sqlx::query("DELETE FROM routes WHERE tenant_id = $1 AND id = $2 AND ($3 IS NULL OR version = $3)")
            .bind(SYSTEM_TENANT_ID).bind(id).bind(expected_version).execute(&mut *conn).await?.rows_affected()
    });
    Ok(done == 1)
}

/// Everything the gateway's route table is compiled from, read in one snapshot.
pub struct Snapshot {
    pub canons: Vec<CanonRow>,
    /// `(canon_id, kid, secret)` of each canon's active secret, opened.
    pub active_secrets: Vec<(String, String, String)>,
    /// `(canon_id, PEM private key)` of canons with a client certificate, opened.
    pub tls_client_keys: Vec<(String, String)>,
    pub routes: Vec<Route>,
}

/// What recording a canon's observed health found in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthRecord {
    /// The other state was stored: a change of state, recorded by this instance.
    Changed,
    /// This state was stored, but before the cut-off: no instance recorded this
    /// change (the one that recorded that state stopped before the canon
    /// changed back, unrecorded), so this instance did.
    Renewed,
    /// Nothing was stored yet: the canon's first recorded state.
    First,
    /// This state was stored already (another instance recorded this change),
    /// or the canon is gone.
    Unchanged,
}

/// Records `status` (`healthy` or `unhealthy`) as the canon's last known
/// health. With `stale_before` (a time, when this instance saw the other state
/// before), the same state recorded before then is renewed as a new change.
/// Of several instances recording the same change at once, exactly one gets
/// [`HealthRecord::Changed`] or [`HealthRecord::Renewed`]: the conditional
/// update takes the row's lock, and the others, re-reading the row after that
/// commit, find nothing left to change.
pub async fn record_health(
    tx: &mut Tx,
    canon_id: &str,
    status: &str,
    stale_before: Option<&str>,
) -> Result<HealthRecord, sqlx::Error> {
    let now = timestamp::now_text();
    let changed = with_tx!(tx, conn => {
        sqlx::query("UPDATE canon_health SET status = $2, changed_at = $3 WHERE canon_id = $1 AND status <> $2")
            .bind(canon_id).bind(status).bind(&now).execute(&mut *conn).await?.rows_affected()
    });
    if changed == 1 {
        return Ok(HealthRecord::Changed);
    }
    if let Some(cutoff) = stale_before {
        // Times are stored as fixed-width UTC text, which sorts as the time does.
        let renewed = with_tx!(tx, conn => {
            sqlx::query("UPDATE canon_health SET changed_at = $3 WHERE canon_id = $1 AND status = $2 AND changed_at < $4")
                .bind(canon_id).bind(status).bind(&now).bind(cutoff).execute(&mut *conn).await?.rows_affected()
        });
        if renewed == 1 {
            return Ok(HealthRecord::Renewed);
        }
    }
    // The canon may have been deleted since the route table was built.
    let inserted = with_tx!(tx, conn => {
        sqlx::query("INSERT INTO canon_health (canon_id, status, changed_at) SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM canons WHERE id = $1) ON CONFLICT (canon_id) DO NOTHING")
            .bind(canon_id).bind(status).bind(&now).execute(&mut *conn).await?.rows_affected()
    });
    Ok(if inserted == 1 {
        HealthRecord::First
    } else {
        HealthRecord::Unchanged
    })
}

/// The registry's rows as read by [`snapshot`] or [`snapshot_in`].
type SnapshotRows = (Vec<CanonRow>, Vec<(String, String, String)>, Vec<RouteRow>);

/// Reads the whole registry (bounded by the canon and route limits), opening
/// the active assertion secrets with the master keys; one that does not open
/// fails the snapshot (the table in force stays).
pub async fn snapshot(db: &Db, master: &MasterKeys) -> Result<Snapshot, sqlx::Error> {
    let canons_sql = format!("SELECT {CANON_COLUMNS} FROM canons WHERE tenant_id = $1 ORDER BY id");
    let routes_sql = format!("SELECT {ROUTE_COLUMNS} FROM routes WHERE tenant_id = $1 ORDER BY id");
    let rows: SnapshotRows = with_db!(db, pool => {
        let canons = sqlx::query_as(sqlx::AssertSqlSafe(canons_sql)).bind(SYSTEM_TENANT_ID).fetch_all(pool).await?;
        let secrets = sqlx::query_as("SELECT canon_id, kid, secret FROM canon_assertion_secrets WHERE tenant_id = $1 AND active = $2")
            .bind(SYSTEM_TENANT_ID).bind(true).fetch_all(pool).await?;
        let routes = sqlx::query_as(sqlx::AssertSqlSafe(routes_sql)).bind(SYSTEM_TENANT_ID).fetch_all(pool).await?;
        (canons, secrets, routes)
    });
    open_snapshot(rows, master)
}

/// [`snapshot`] through a transaction: the registry as a change leaves it,
/// before it commits (`registry_write` builds the route table from it).
pub async fn snapshot_in(tx: &mut Tx, master: &MasterKeys) -> Result<Snapshot, sqlx::Error> {
    let canons_sql = format!("SELECT {CANON_COLUMNS} FROM canons WHERE tenant_id = $1 ORDER BY id");
    let routes_sql = format!("SELECT {ROUTE_COLUMNS} FROM routes WHERE tenant_id = $1 ORDER BY id");
    let rows: SnapshotRows = with_tx!(tx, conn => {
        let canons = sqlx::query_as(sqlx::AssertSqlSafe(canons_sql)).bind(SYSTEM_TENANT_ID).fetch_all(&mut *conn).await?;
        let secrets = sqlx::query_as("SELECT canon_id, kid, secret FROM canon_assertion_secrets WHERE tenant_id = $1 AND active = $2")
            .bind(SYSTEM_TENANT_ID).bind(true).fetch_all(&mut *conn).await?;
        let routes = sqlx::query_as(sqlx::AssertSqlSafe(routes_sql)).bind(SYSTEM_TENANT_ID).fetch_all(&mut *conn).await?;
        (canons, secrets, routes)
    });
    open_snapshot(rows, master)
}

/// Opens the sealed values of a snapshot's rows.
fn open_snapshot(
    (canons, active_secrets, routes): SnapshotRows,
    master: &MasterKeys,
) -> Result<Snapshot, sqlx::Error> {
    let active_secrets = active_secrets
        .into_iter()
        .map(|(canon_id, kid, stored)| {
            let secret = if is_sealed(&stored) {
                master
                    .open(&stored, &assertion_secret_place(&canon_id, &kid))
                    .map_err(|reason| {
                        sqlx::Error::Decode(Box::new(MasterKeyError::Open {
                            place: format!("assertion secret {kid} of canon {canon_id}"),
                            reason,
                        }))
                    })?
            } else {
                stored
            };
            Ok((canon_id, kid, secret))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let tls_client_keys = canons
        .iter()
        .filter_map(|c: &CanonRow| c.tls_client_key.as_ref().map(|k| (c, k)))
        .map(|(c, sealed)| {
            master
                .open(sealed, &canon_tls_key_place(&c.id))
                .map(|key| (c.id.clone(), key))
                .map_err(|reason| {
                    sqlx::Error::Decode(Box::new(MasterKeyError::Open {
                        place: format!("TLS client key of canon {}", c.id),
                        reason,
                    }))
                })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Snapshot {
        canons,
        active_secrets,
        tls_client_keys,
        routes: routes.into_iter().map(Route::from).collect(),
    })
}
