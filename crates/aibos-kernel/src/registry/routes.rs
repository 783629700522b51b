//! Registry endpoints: canons, their assertion secrets, and gateway routes.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::store::{self, CanonFields, CanonRow, RouteFields, SecretDeletion};
use super::validate::{self, FieldProblem};
use super::{
    AssertionSecretInfo, Canon, CanonPermission, CanonTls, CanonTlsInput, NewAssertionSecret,
    Route, RouteRateLimit, new_assertion_secret,
};
use crate::audit::AuditEvent;
use crate::authz::cache::Invalidation;
use crate::authz::{Caller, perm};
use crate::change::{self, Change};
use crate::db::{Tx, TxFuture};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::gateway::state::Health;
use crate::gateway::table;
use crate::http::extract::{AppJson, IfMatch, ListQuery, no_store, parse_id, url_pairs, with_etag};
use crate::limits;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_canon, list_canons))
        .routes(routes!(get_canon, update_canon, delete_canon))
        .routes(routes!(create_secret, list_secrets))
        .routes(routes!(activate_secret))
        .routes(routes!(delete_secret))
        .routes(routes!(create_route, list_routes))
        .routes(routes!(get_route, update_route, delete_route))
}

/// Runs a registry change through [`change::write_db`]: the change, its audit
/// entry, its `kernel.*` event and a `NOTIFY aibos_authz 'registry'` in one
/// transaction, in which this instance's route table is also built from the
/// registry as the transaction leaves it, before it commits; the table is
/// swapped in after. Fail closed: if the registry cannot be read back, or the
/// table built from it would leave out something the table in force serves (a
/// canon whose base URL does not parse or whose routes conflict, a route
/// without permission that is not public; see `RouteTable::compile`), the
/// transaction rolls back and the change is refused (500 for a failed read, 409
/// `CONFLICT` naming what would be left out, logged as a warning), never
/// answered 2xx with the old table serving.
///
/// The audit entry is written first ([`Change::flush`]): it takes the system
/// tenant's chain head lock, which serialises registry changes across
/// instances, so the registry read after it holds every committed change
/// (PostgreSQL reads each statement afresh under READ COMMITTED; SQLite has
/// one writer).
async fn registry_write<T, F>(state: &AppState, caller: &Caller, change: F) -> ApiResult<T>
where
    T: Send + 'static,
    F: for<'t> FnOnce(&'t mut Tx, &'t mut Change) -> TxFuture<'t, T, ApiError> + Send + 'static,
{
    let ctx = caller.audit_context();
    let state = state.clone();
    // Spawned: a client hanging up after the commit must not keep its table
    // out of force.
    let task = tokio::spawn(async move {
        let gateway = state.gateway();
        let exclusive = gateway.exclusive().await;
        let building = state.clone();
        let ((value, candidate), done) =
            change::write_db(state.db(), ctx, state.redact_keys(), move |tx, c| {
                Box::pin(async move {
                    let value = change(tx, c).await?;
                    c.flush(tx).await?;
                    let snapshot = store::snapshot_in(tx, building.master_keys()).await?;
                    let gateway = building.gateway();
                    let candidate = gateway.candidate(snapshot, building.metrics());
                    let added = gateway.new_problems(&candidate);
                    if !added.is_empty() {
                        tracing::warn!(problems = ?added, "registry change refused: the route table built from it would leave something out");
                        return Err(ApiError::conflict(format!(
                            "The change is refused and nothing was changed: the gateway's route table built from the registry it leaves would not be complete: {}.",
                            added.join("; ")
                        )));
                    }
                    c.invalidate(Invalidation::Registry);
                    Ok((value, candidate))
                })
            })
            .await?;
        gateway.install(&exclusive, candidate);
        done.apply(&state);
        Ok::<_, ApiError>(value)
    });
    task.await.map_err(|e| {
        ApiError::internal(anyhow::anyhow!("the registry change's task failed: {e}"))
    })?
}

fn invalid(problem: FieldProblem) -> ApiError {
    ApiError::invalid_field(problem.0, problem.1)
}

fn stale(what: &str) -> ApiError {
    ApiError::new(
        ErrorCode::PreconditionFailed,
        format!("The {what} has changed since it was read; fetch it again."),
    )
}

/// The API view of a canon row, with this instance's health and circuit state.
fn canon_view(state: &AppState, row: CanonRow) -> Canon {
    let runtime = state.gateway().canon_state(&row.id);
    let tls = (row.tls_ca_pem.is_some() || row.tls_client_cert_pem.is_some()).then(|| CanonTls {
        ca_bundle_pem: row.tls_ca_pem.clone(),
        client_cert_pem: row.tls_client_cert_pem.clone(),
        client_key: row.tls_client_key.is_some(),
    });
    Canon {
        permissions: row.permission_list(),
        tls,
        status: runtime
            .as_ref()
            .map_or(Health::Unknown, |s| s.health())
            .as_str()
            .to_owned(),
        circuit: runtime
            .as_ref()
            .map_or("closed", |s| s.breaker.state_name())
            .to_owned(),
        id: row.id,
        name: row.name,
        base_url: row.base_url,
        health_path: row.health_path,
        protocol: row.protocol,
        timeout_ms: row.timeout_ms,
        version: row.version,
        created_at: row.created_at,
        updated_at: row.updated_at,
    }
}

async fn existing_canon(state: &AppState, id: &str) -> ApiResult<CanonRow> {
    let id = parse_id("id", id)?;
    store::canon(state.db(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such canon."))
}

/// `POST /api/kernel/canons` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCanon {
    name: String,
    base_url: String,
    /// Default `/health`.
    health_path: Option<String>,
    /// `http1` (default) or `h2c`.
    protocol: Option<String>,
    /// Default: `gateway.default_timeout_ms` (10 000).
    timeout_ms: Option<i64>,
    /// Permissions the canon defines, registered with it.
    #[serde(default)]
    permissions: Vec<CanonPermission>,
    /// TLS settings of its own (https cells): a CA bundle, a client certificate.
    tls: Option<CanonTlsInput>,
}

/// The stored form of TLS settings: `(ca_bundle_pem, client_cert_pem, sealed client key)`.
type StoredTls = (Option<String>, Option<String>, Option<String>);

/// Seals the client key of `input` for canon `canon_id`.
fn stored_tls(state: &AppState, canon_id: &str, input: Option<CanonTlsInput>) -> StoredTls {
    match input {
        None => (None, None, None),
        Some(t) => {
            let key = t.client_key_pem.map(|k| {
                state
                    .master_keys()
                    .seal(&k, &store::canon_tls_key_place(canon_id))
            });
            (t.ca_bundle_pem, t.client_cert_pem, key)
        }
    }
}

/// What an audit entry says of TLS settings: which parts are there, never a key.
fn tls_details(tls: &StoredTls) -> serde_json::Value {
    match tls {
        (None, None, _) => serde_json::Value::Null,
        (ca, cert, _) => {
            serde_json::json!({ "ca_bundle": ca.is_some(), "client_certificate": cert.is_some() })
        }
    }
}

/// A created canon, with its first assertion secret (shown only now).
#[derive(Serialize, ToSchema)]
pub struct CreatedCanon {
    #[serde(flatten)]
    canon: Canon,
    /// The active assertion secret: configure the cell with it.
    assertion_secret: NewAssertionSecret,
}

/// Registers a canon, its permissions and its first (active) assertion secret.
#[utoipa::path(post, path = "/api/kernel/canons", tag = "registry", request_body = CreateCanon, security(("bearer" = ["kernel.canon.manage"])),
    responses((status = 201, body = CreatedCanon), (status = 400), (status = 401), (status = 403), (status = 409, description = "CONFLICT: name taken, a permission owned by someone else, or too many canons")))]
pub async fn create_canon(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateCanon>,
) -> ApiResult<Response> {
    caller
        .require_platform(&state, &[perm::CANON_MANAGE])
        .await?;
    validate::canon_name(&body.name).map_err(invalid)?;
    let base_url = validate::base_url(&body.base_url).map_err(invalid)?;
    let health_path = body.health_path.unwrap_or_else(|| "/health".to_owned());
    validate::health_path(&health_path).map_err(invalid)?;
    let protocol = body.protocol.unwrap_or_else(|| "http1".to_owned());
    validate::protocol(&protocol, &base_url).map_err(invalid)?;
    validate::timeout_ms("timeout_ms", body.timeout_ms).map_err(invalid)?;
    validate::canon_permissions(&body.permissions).map_err(invalid)?;
    if let Some(tls) = &body.tls {
        validate::tls(tls, &base_url).map_err(invalid)?;
    }
    let canon_id = Uuid::now_v7().to_string();
    let tls = stored_tls(&state, &canon_id, body.tls);
    let secret = new_assertion_secret();
    let (name, permissions, timeout_ms) = (body.name, body.permissions, body.timeout_ms);
    let shown = secret.clone();
    let master = state.master_keys().clone();
    let row = registry_write(&state, &caller, move |tx, c| {
        Box::pin(async move {
            if store::canon_count(tx).await? >= limits::CANONS_MAX {
                return Err(ApiError::conflict(format!("At most {} canons can be registered.", limits::CANONS_MAX)));
            }
            let fields = CanonFields { base_url: &base_url, health_path: &health_path, protocol: &protocol, timeout_ms, permissions: &permissions,
                tls_ca_pem: tls.0.as_deref(), tls_client_cert_pem: tls.1.as_deref(), tls_client_key_sealed: tls.2.as_deref() };
            let row = store::insert_canon(tx, &canon_id, &name, &fields).await?;
            store::sync_canon_permissions(tx, &name, &permissions).await?.map_err(ApiError::conflict)?;
            store::insert_secret(tx, &master, &row.id, &secret.kid, &secret.secret, true).await?;
            c.audit(AuditEvent::new("canon.created").resource("canon", &row.id).details(serde_json::json!({
                "name": row.name, "base_url": row.base_url, "health_path": row.health_path, "protocol": row.protocol, "timeout_ms": row.timeout_ms,
                "permissions": permissions.iter().map(|p| &p.name).collect::<Vec<_>>(), "assertion_kid": secret.kid, "tls": tls_details(&tls),
            }))).publish("kernel.canon.created");
            Ok(row)
        })
    })
    .await?;
    let version = row.version;
    let created = CreatedCanon {
        canon: canon_view(&state, row),
        assertion_secret: shown,
    };
    Ok(no_store(with_etag(StatusCode::CREATED, &created, version)))
}

/// Lists canons.
#[utoipa::path(get, path = "/api/kernel/canons", tag = "registry", security(("bearer" = ["kernel.canon.read"])),
    params(("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = aibos_wire::Page<Canon>), (status = 401), (status = 403)))]
pub async fn list_canons(
    State(state): State<AppState>,
    caller: Caller,
    page: ListQuery,
) -> ApiResult<Json<aibos_wire::Page<Canon>>> {
    caller.require_platform(&state, &[perm::CANON_READ]).await?;
    let rows = store::canons(state.db(), &page.after, page.fetch()).await?;
    let views = rows.into_iter().map(|r| canon_view(&state, r)).collect();
    Ok(Json(page.page(views, |c: &Canon| c.id.clone())))
}

/// One canon, with its health and circuit state.
#[utoipa::path(get, path = "/api/kernel/canons/{id}", tag = "registry", security(("bearer" = ["kernel.canon.read"])),
    responses((status = 200, body = Canon), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn get_canon(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require_platform(&state, &[perm::CANON_READ]).await?;
    let row = existing_canon(&state, &id).await?;
    let version = row.version;
    Ok(with_etag(StatusCode::OK, &canon_view(&state, row), version))
}

/// Distinguishes a field that is absent from one sent as `null`.
fn double_option<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `PATCH /api/kernel/canons/{id}` body. The name cannot change: it is in every
/// gateway URL and the audience of every assertion.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateCanon {
    base_url: Option<String>,
    health_path: Option<String>,
    protocol: Option<String>,
    /// `null` returns to the default.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    timeout_ms: Option<Option<i64>>,
    /// Replaces the canon's permissions (removed ones leave the registry).
    permissions: Option<Vec<CanonPermission>>,
    /// Replaces the canon's TLS settings whole; `null` removes them.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<CanonTlsInput>)]
    tls: Option<Option<CanonTlsInput>>,
}

/// Changes a canon; calls in flight finish on the old table, new calls use the new one.
#[utoipa::path(patch, path = "/api/kernel/canons/{id}", tag = "registry", request_body = UpdateCanon, security(("bearer" = ["kernel.canon.manage"])),
    responses((status = 200, body = Canon), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409), (status = 412), (status = 428)))]
pub async fn update_canon(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    if_match: IfMatch,
    AppJson(body): AppJson<UpdateCanon>,
) -> ApiResult<Response> {
    caller
        .require_platform(&state, &[perm::CANON_MANAGE])
        .await?;
    let current = existing_canon(&state, &id).await?;
    let base_url = match &body.base_url {
        Some(u) => validate::base_url(u).map_err(invalid)?,
        None => current.base_url.clone(),
    };
    let health_path = body
        .health_path
        .unwrap_or_else(|| current.health_path.clone());
    validate::health_path(&health_path).map_err(invalid)?;
    let protocol = body.protocol.unwrap_or_else(|| current.protocol.clone());
    validate::protocol(&protocol, &base_url).map_err(invalid)?;
    let timeout_ms = body.timeout_ms.unwrap_or(current.timeout_ms);
    validate::timeout_ms("timeout_ms", timeout_ms).map_err(invalid)?;
    let permissions = body
        .permissions
        .unwrap_or_else(|| current.permission_list());
    validate::canon_permissions(&permissions).map_err(invalid)?;
    let tls = match body.tls {
        None => (
            current.tls_ca_pem.clone(),
            current.tls_client_cert_pem.clone(),
            current.tls_client_key.clone(),
        ),
        Some(input) => {
            if let Some(t) = &input {
                validate::tls(t, &base_url).map_err(invalid)?;
            }
            stored_tls(&state, &current.id, input)
        }
    };
    // Settings kept from before must still fit a changed base URL.
    if (tls.0.is_some() || tls.1.is_some()) && !base_url.starts_with("https://") {
        return Err(invalid((
            "tls",
            "is only for https:// cells; remove the canon's TLS settings with \"tls\": null".into(),
        )));
    }
    let row = registry_write(&state, &caller, move |tx, c| {
        Box::pin(async move {
            let fields = CanonFields { base_url: &base_url, health_path: &health_path, protocol: &protocol, timeout_ms, permissions: &permissions,
                tls_ca_pem: tls.0.as_deref(), tls_client_cert_pem: tls.1.as_deref(), tls_client_key_sealed: tls.2.as_deref() };
            let row = store::update_canon(tx, &current.id, &fields, if_match.0).await?.ok_or_else(|| stale("canon"))?;
            store::sync_canon_permissions(tx, &row.name, &permissions).await?.map_err(ApiError::conflict)?;
            c.audit(AuditEvent::new("canon.updated").resource("canon", &row.id).details(serde_json::json!({
                "name": row.name, "base_url": row.base_url, "health_path": row.health_path, "protocol": row.protocol, "timeout_ms": row.timeout_ms,
                "permissions": permissions.iter().map(|p| &p.name).collect::<Vec<_>>(), "version": row.version, "tls": tls_details(&tls),
            }))).publish("kernel.canon.updated");
            Ok(row)
        })
    })
    .await?;
    let version = row.version;
    Ok(with_etag(StatusCode::OK, &canon_view(&state, row), version))
}

/// Deletes a canon that has no routes left, with its secrets and permissions.
#[utoipa::path(delete, path = "/api/kernel/canons/{id}", tag = "registry", security(("bearer" = ["kernel.canon.manage"])),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409, description = "CONFLICT: the canon still has routes"), (status = 412), (status = 428)))]
pub async fn delete_canon(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    if_match: IfMatch,
) -> ApiResult<StatusCode> {
    caller
        .require_platform(&state, &[perm::CANON_MANAGE])
        .await?;
    let current = existing_canon(&state, &id).await?;
    registry_write(&state, &caller, move |tx, c| {
        Box::pin(async move {
            let routes = store::route_count(tx, &current.id).await?;
            if routes > 0 {
                return Err(ApiError::conflict(format!(
                    "The canon still has {routes} route(s); delete them first."
                )));
            }
            if !store::delete_canon(tx, &current.id, if_match.0).await? {
                return Err(stale("canon"));
            }
            store::delete_canon_permissions(tx, &current.name).await?;
            c.audit(
                AuditEvent::new("canon.deleted")
                    .resource("canon", &current.id)
                    .details(serde_json::json!({ "name": current.name })),
            )
            .publish("kernel.canon.deleted");
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Adds a new, inactive assertion secret (the kernel keeps signing with the active one).
#[utoipa::path(post, path = "/api/kernel/canons/{id}/assertion-secrets", tag = "registry", security(("bearer" = ["kernel.canon.manage"])),
    responses((status = 201, body = NewAssertionSecret), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409, description = "CONFLICT: too many secrets")))]
pub async fn create_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller
        .require_platform(&state, &[perm::CANON_MANAGE])
        .await?;
    let canon = existing_canon(&state, &id).await?;
    let secret = new_assertion_secret();
    let shown = secret.clone();
    let master = state.master_keys().clone();
    registry_write(&state, &caller, move |tx, c| {
        Box::pin(async move {
            if store::secret_count(tx, &canon.id).await? >= limits::ASSERTION_SECRETS_PER_CANON_MAX
            {
                return Err(ApiError::conflict(format!(
                    "A canon holds at most {} secrets; delete a retired one first.",
                    limits::ASSERTION_SECRETS_PER_CANON_MAX
                )));
            }
            store::insert_secret(tx, &master, &canon.id, &secret.kid, &secret.secret, false)
                .await?;
            c.audit(
                AuditEvent::new("canon.secret_created")
                    .resource("canon", &canon.id)
                    .details(serde_json::json!({ "name": canon.name, "kid": secret.kid })),
            )
            .publish("kernel.canon.secret_created");
            Ok(())
        })
    })
    .await?;
    Ok(no_store((StatusCode::CREATED, Json(shown))))
}

/// Lists a canon's secrets: kids and states, never the secrets.
#[utoipa::path(get, path = "/api/kernel/canons/{id}/assertion-secrets", tag = "registry", security(("bearer" = ["kernel.canon.read"])),
    responses((status = 200, body = Vec<AssertionSecretInfo>), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn list_secrets(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<AssertionSecretInfo>>> {
    caller.require_platform(&state, &[perm::CANON_READ]).await?;
    let canon = existing_canon(&state, &id).await?;
    Ok(Json(store::secrets(state.db(), &canon.id).await?))
}

/// Makes a secret the active one: the kernel signs with it from the next request.
#[utoipa::path(post, path = "/api/kernel/canons/{id}/assertion-secrets/{kid}/activate", tag = "registry", security(("bearer" = ["kernel.canon.manage"])),
    responses((status = 200, body = Vec<AssertionSecretInfo>), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn activate_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, kid)): Path<(String, String)>,
) -> ApiResult<Json<Vec<AssertionSecretInfo>>> {
    caller
        .require_platform(&state, &[perm::CANON_MANAGE])
        .await?;
    let canon = existing_canon(&state, &id).await?;
    let canon_id = canon.id.clone();
    registry_write(&state, &caller, move |tx, c| {
        Box::pin(async move {
            if !store::activate_secret(tx, &canon.id, &kid).await? {
                return Err(ApiError::not_found("No such secret."));
            }
            c.audit(
                AuditEvent::new("canon.secret_activated")
                    .resource("canon", &canon.id)
                    .details(serde_json::json!({ "name": canon.name, "kid": kid })),
            )
            .publish("kernel.canon.secret_activated");
            Ok(())
        })
    })
    .await?;
    Ok(Json(store::secrets(state.db(), &canon_id).await?))
}

/// Deletes (retires) an inactive secret; the active one cannot be deleted.
#[utoipa::path(delete, path = "/api/kernel/canons/{id}/assertion-secrets/{kid}", tag = "registry", security(("bearer" = ["kernel.canon.manage"])),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409, description = "CONFLICT: the active secret")))]
pub async fn delete_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, kid)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller
        .require_platform(&state, &[perm::CANON_MANAGE])
        .await?;
    let canon = existing_canon(&state, &id).await?;
    registry_write(&state, &caller, move |tx, c| {
        Box::pin(async move {
            match store::delete_secret(tx, &canon.id, &kid).await? {
                SecretDeletion::Missing => return Err(ApiError::not_found("No such secret.")),
                SecretDeletion::Active => {
                    return Err(ApiError::conflict(
                        "The active secret cannot be deleted; activate another one first.",
                    ));
                }
                SecretDeletion::Deleted => {}
            }
            c.audit(
                AuditEvent::new("canon.secret_deleted")
                    .resource("canon", &canon.id)
                    .details(serde_json::json!({ "name": canon.name, "kid": kid })),
            )
            .publish("kernel.canon.secret_deleted");
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/kernel/routes` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRoute {
    canon_id: String,
    method: String,
    path: String,
    /// At least one, unless `public_to_authenticated` is true.
    #[serde(default)]
    required_permissions: Vec<String>,
    /// `true` opens the route to every authenticated caller of every tenant:
    /// then `required_permissions` must be empty. Default `false`.
    #[serde(default)]
    public_to_authenticated: bool,
    /// Default `off`.
    idempotency: Option<String>,
    rate_limit: Option<RouteRateLimit>,
    timeout_ms: Option<i64>,
    #[serde(default)]
    forward_cookies: bool,
    /// `true` records every call in the caller's tenant audit trail
    /// (`gateway.call`). Default `false`.
    #[serde(default)]
    audit_calls: bool,
}

/// A route checked in full: fields, registry membership, matcher conflicts.
struct CheckedRoute {
    method: String,
    path: String,
    path_shape: String,
    required_permissions: Vec<String>,
    public_to_authenticated: bool,
    idempotency: String,
    rate_limit: Option<RouteRateLimit>,
    timeout_ms: Option<i64>,
    forward_cookies: bool,
    audit_calls: bool,
}

impl CheckedRoute {
    fn fields(&self) -> RouteFields<'_> {
        RouteFields {
            method: &self.method,
            path: &self.path,
            path_shape: &self.path_shape,
            required_permissions: &self.required_permissions,
            public_to_authenticated: self.public_to_authenticated,
            idempotency: &self.idempotency,
            rate_limit: &self.rate_limit,
            timeout_ms: self.timeout_ms,
            forward_cookies: self.forward_cookies,
            audit_calls: self.audit_calls,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn check_route(
    state: &AppState,
    id: &str,
    canon_id: &str,
    method: &str,
    path: &str,
    mut required_permissions: Vec<String>,
    public_to_authenticated: bool,
    idempotency: String,
    rate_limit: Option<RouteRateLimit>,
    timeout_ms: Option<i64>,
    forward_cookies: bool,
    audit_calls: bool,
) -> ApiResult<CheckedRoute> {
    let method = validate::route_method(method).map_err(invalid)?;
    let path_shape = validate::route_path(path).map_err(invalid)?;
    validate::required_permissions(&required_permissions).map_err(invalid)?;
    validate::idempotency(&idempotency).map_err(invalid)?;
    validate::rate_limit(&rate_limit).map_err(invalid)?;
    validate::timeout_ms("timeout_ms", timeout_ms).map_err(invalid)?;
    validate::route_access(&required_permissions, public_to_authenticated).map_err(invalid)?;
    required_permissions.sort();
    required_permissions.dedup();
    let unknown =
        crate::authz::store::unknown_permissions(state.db(), &required_permissions).await?;
    if !unknown.is_empty() {
        return Err(ApiError::invalid_field(
            "required_permissions",
            format!("not in the permission registry: {}", unknown.join(", ")),
        ));
    }
    let checked = CheckedRoute {
        method,
        path: path.to_owned(),
        path_shape,
        required_permissions,
        public_to_authenticated,
        idempotency,
        rate_limit,
        timeout_ms,
        forward_cookies,
        audit_calls,
    };
    let candidate = Route {
        id: id.to_owned(),
        canon_id: canon_id.to_owned(),
        method: checked.method.clone(),
        path: checked.path.clone(),
        required_permissions: vec![],
        public_to_authenticated: false,
        idempotency: checked.idempotency.clone(),
        rate_limit: None,
        timeout_ms: None,
        forward_cookies: false,
        audit_calls: false,
        version: 0,
        created_at: String::new(),
        updated_at: String::new(),
    };
    let existing = store::routes(
        state.db(),
        Some(canon_id),
        "",
        limits::ROUTES_PER_CANON_MAX as u32 + 1,
    )
    .await?;
    table::check_routes(&existing, &candidate).map_err(|e| {
        ApiError::conflict(format!(
            "The route conflicts with another route of the canon: {e}"
        ))
    })?;
    Ok(checked)
}

fn route_details(route: &Route) -> serde_json::Value {
    serde_json::json!({
        "canon_id": route.canon_id, "method": route.method, "path": route.path,
        "required_permissions": route.required_permissions, "public_to_authenticated": route.public_to_authenticated,
        "idempotency": route.idempotency,
        "rate_limit": route.rate_limit, "timeout_ms": route.timeout_ms, "forward_cookies": route.forward_cookies,
        "audit_calls": route.audit_calls, "version": route.version,
    })
}

/// Adds a route to a canon.
#[utoipa::path(post, path = "/api/kernel/routes", tag = "registry", request_body = CreateRoute, security(("bearer" = ["kernel.route.manage"])),
    responses((status = 201, body = Route), (status = 400), (status = 401), (status = 403), (status = 404, description = "NOT_FOUND: no such canon"), (status = 409, description = "CONFLICT: same method and path shape, or too many routes")))]
pub async fn create_route(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateRoute>,
) -> ApiResult<Response> {
    caller
        .require_platform(&state, &[perm::ROUTE_MANAGE])
        .await?;
    let canon_id = parse_id("canon_id", &body.canon_id)?;
    let canon = store::canon(state.db(), &canon_id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such canon."))?;
    let id = Uuid::now_v7().to_string();
    let checked = check_route(
        &state,
        &id,
        &canon.id,
        &body.method,
        &body.path,
        body.required_permissions,
        body.public_to_authenticated,
        body.idempotency.unwrap_or_else(|| "off".to_owned()),
        body.rate_limit,
        body.timeout_ms,
        body.forward_cookies,
        body.audit_calls,
    )
    .await?;
    let route = registry_write(&state, &caller, move |tx, c| {
        Box::pin(async move {
            if store::route_count(tx, &canon.id).await? >= limits::ROUTES_PER_CANON_MAX {
                return Err(ApiError::conflict(format!(
                    "A canon has at most {} routes.",
                    limits::ROUTES_PER_CANON_MAX
                )));
            }
            let route = store::insert_route(tx, &id, &canon.id, &checked.fields()).await?;
            c.audit(
                AuditEvent::new("route.created")
                    .resource("route", &route.id)
                    .details(route_details(&route)),
            )
            .publish("kernel.route.created");
            Ok(route)
        })
    })
    .await?;
    Ok(with_etag(StatusCode::CREATED, &route, route.version))
}

/// Lists routes, optionally of one canon (`?canon_id=`).
#[utoipa::path(get, path = "/api/kernel/routes", tag = "registry", security(("bearer" = ["kernel.route.read"])),
    params(("canon_id" = Option<String>, Query), ("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = aibos_wire::Page<Route>), (status = 400), (status = 401), (status = 403)))]
pub async fn list_routes(
    State(state): State<AppState>,
    caller: Caller,
    page: ListQuery,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<aibos_wire::Page<Route>>> {
    caller.require_platform(&state, &[perm::ROUTE_READ]).await?;
    let canon_id = url_pairs(query.as_deref().unwrap_or(""))?
        .into_iter()
        .find(|(k, _)| k == "canon_id")
        .map(|(_, v)| parse_id("canon_id", &v))
        .transpose()?;
    let rows = store::routes(state.db(), canon_id.as_deref(), &page.after, page.fetch()).await?;
    Ok(Json(page.page(rows, |r| r.id.clone())))
}

async fn existing_route(state: &AppState, id: &str) -> ApiResult<Route> {
    let id = parse_id("id", id)?;
    store::route(state.db(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such route."))
}

/// One route.
#[utoipa::path(get, path = "/api/kernel/routes/{id}", tag = "registry", security(("bearer" = ["kernel.route.read"])),
    responses((status = 200, body = Route), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn get_route(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require_platform(&state, &[perm::ROUTE_READ]).await?;
    let route = existing_route(&state, &id).await?;
    Ok(with_etag(StatusCode::OK, &route, route.version))
}

/// `PATCH /api/kernel/routes/{id}` body; the canon cannot change.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateRoute {
    method: Option<String>,
    path: Option<String>,
    required_permissions: Option<Vec<String>>,
    public_to_authenticated: Option<bool>,
    idempotency: Option<String>,
    /// `null` removes the override.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<RouteRateLimit>)]
    rate_limit: Option<Option<RouteRateLimit>>,
    /// `null` returns to the canon's timeout.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    timeout_ms: Option<Option<i64>>,
    forward_cookies: Option<bool>,
    audit_calls: Option<bool>,
}

/// Changes a route.
#[utoipa::path(patch, path = "/api/kernel/routes/{id}", tag = "registry", request_body = UpdateRoute, security(("bearer" = ["kernel.route.manage"])),
    responses((status = 200, body = Route), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409), (status = 412), (status = 428)))]
pub async fn update_route(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    if_match: IfMatch,
    AppJson(body): AppJson<UpdateRoute>,
) -> ApiResult<Response> {
    caller
        .require_platform(&state, &[perm::ROUTE_MANAGE])
        .await?;
    let current = existing_route(&state, &id).await?;
    let checked = check_route(
        &state,
        &current.id,
        &current.canon_id,
        body.method.as_deref().unwrap_or(&current.method),
        body.path.as_deref().unwrap_or(&current.path),
        body.required_permissions
            .unwrap_or_else(|| current.required_permissions.clone()),
        body.public_to_authenticated
            .unwrap_or(current.public_to_authenticated),
        body.idempotency
            .unwrap_or_else(|| current.idempotency.clone()),
        body.rate_limit
            .unwrap_or_else(|| current.rate_limit.clone()),
        body.timeout_ms.unwrap_or(current.timeout_ms),
        body.forward_cookies.unwrap_or(current.forward_cookies),
        body.audit_calls.unwrap_or(current.audit_calls),
    )
    .await?;
    let route = registry_write(&state, &caller, move |tx, c| {
        Box::pin(async move {
            let route = store::update_route(tx, &current.id, &checked.fields(), if_match.0)
                .await?
                .ok_or_else(|| stale("route"))?;
            c.audit(
                AuditEvent::new("route.updated")
                    .resource("route", &route.id)
                    .details(route_details(&route)),
            )
            .publish("kernel.route.updated");
            Ok(route)
        })
    })
    .await?;
    Ok(with_etag(StatusCode::OK, &route, route.version))
}

/// Deletes a route; calls to it answer 404 `ROUTE_NOT_FOUND` from the next request.
#[utoipa::path(delete, path = "/api/kernel/routes/{id}", tag = "registry", security(("bearer" = ["kernel.route.manage"])),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404), (status = 412), (status = 428)))]
pub async fn delete_route(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    if_match: IfMatch,
) -> ApiResult<StatusCode> {
    caller
        .require_platform(&state, &[perm::ROUTE_MANAGE])
        .await?;
    let current = existing_route(&state, &id).await?;
    registry_write(&state, &caller, move |tx, c| {
        Box::pin(async move {
            if !store::delete_route(tx, &current.id, if_match.0).await? {
                return Err(stale("route"));
            }
            c.audit(
                AuditEvent::new("route.deleted")
                    .resource("route", &current.id)
                    .details(route_details(&current)),
            )
            .publish("kernel.route.deleted");
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
