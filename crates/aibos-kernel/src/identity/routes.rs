//! Identity endpoints: bootstrap, tenants, users, sessions, service accounts, JWKS.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::store::{self, ServiceAccount, Tenant, User};
use super::tokens::{AUDIENCE, Claims, ISSUER};
use super::{
    SYSTEM_TENANT_ID, admin, new_secret, parse_email, parse_name, parse_slug, password, secret_hash,
};
use crate::audit::{AuditContext, AuditEvent};
use crate::authz::cache::Invalidation;
use crate::authz::caller::ClientInfo;
use crate::authz::{Caller, perm, store as authz_store};
use crate::change;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::http::extract::{
    AppJson, AppJsonKeepingNul, IfMatch, ListQuery, no_store, parse_id, with_etag,
};
use crate::state::AppState;
use crate::{limits, timestamp};

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(bootstrap))
        .routes(routes!(create_tenant, list_tenants))
        .routes(routes!(get_tenant, update_tenant))
        .routes(routes!(create_tenant_admin))
        .routes(routes!(create_user, list_users))
        .routes(routes!(get_user, update_user))
        .routes(routes!(change_password))
        .routes(routes!(revoke_user_sessions))
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
        .routes(routes!(me))
        .routes(routes!(token))
        .routes(routes!(create_service_account, list_service_accounts))
        .routes(routes!(rotate_service_account_secret))
        .routes(routes!(get_service_account, update_service_account))
        .routes(routes!(jwks))
}

/// `POST /api/kernel/bootstrap` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootstrapRequest {
    email: String,
    password: String,
    name: String,
}

/// The first platform administrator.
#[derive(Serialize, ToSchema)]
pub struct BootstrapResponse {
    tenant_id: String,
    user_id: String,
}

/// Creates the first platform administrator (needs `x-bootstrap-key`; closed once one exists).
#[utoipa::path(post, path = "/api/kernel/bootstrap", tag = "identity", request_body = BootstrapRequest,
    responses((status = 201, body = BootstrapResponse), (status = 401, description = "UNAUTHORIZED: wrong key"),
              (status = 404, description = "NOT_FOUND: bootstrap disabled"), (status = 409, description = "CONFLICT: an administrator exists")))]
pub async fn bootstrap(
    State(state): State<AppState>,
    info: ClientInfo,
    headers: HeaderMap,
    AppJson(body): AppJson<BootstrapRequest>,
) -> ApiResult<Response> {
    let Some(expected) = state.config().auth.bootstrap_key.clone() else {
        return Err(ApiError::not_found(
            "Bootstrap is disabled: set auth.bootstrap_key, or use `aibos admin create`.",
        ));
    };
    let given = headers
        .get("x-bootstrap-key")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !bool::from(given.ct_eq(expected.expose().as_bytes())) {
        tracing::warn!(client_ip = ?info.client_ip, "bootstrap refused: wrong or missing x-bootstrap-key");
        return Err(ApiError::unauthorized(
            "The x-bootstrap-key header is missing or wrong.",
        ));
    }
    let email = parse_email(&body.email).map_err(|m| ApiError::invalid_field("email", m))?;
    let name = parse_name(&body.name).map_err(|m| ApiError::invalid_field("name", m))?;
    let pw = password::Password::parse(body.password)
        .map_err(|m| ApiError::invalid_field("password", m))?;
    if store::any_user_in(state.db(), SYSTEM_TENANT_ID).await? {
        return Err(ApiError::conflict(
            "A platform administrator exists already; bootstrap is closed.",
        ));
    }
    let hash = state
        .hasher()
        .hash(pw)
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
    let ctx = info.audit_context(SYSTEM_TENANT_ID, "anonymous", None);
    let user = change::write(&state, ctx, move |tx, c| {
        Box::pin(async move {
            // Serialise concurrent bootstraps on the system tenant's row, then re-check.
            store::update_tenant(tx, SYSTEM_TENANT_ID, None, None, None).await?;
            if store::count_users_tx(tx, SYSTEM_TENANT_ID).await? > 0 {
                return Err(ApiError::conflict(
                    "A platform administrator exists already; bootstrap is closed.",
                ));
            }
            admin::create_admin(tx, c, SYSTEM_TENANT_ID, &email, &name, &hash).await
        })
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(BootstrapResponse {
            tenant_id: SYSTEM_TENANT_ID.to_owned(),
            user_id: user.id,
        }),
    )
        .into_response())
}

/// `POST /api/kernel/tenants` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    slug: String,
    name: String,
}

/// Tenant management is for platform administrators, who live in the system tenant.
async fn require_platform_admin(state: &AppState, caller: &Caller) -> ApiResult<()> {
    caller.require_platform(state, &[perm::TENANT_MANAGE]).await
}

/// Creates a tenant (platform administrators).
#[utoipa::path(post, path = "/api/kernel/tenants", tag = "identity", request_body = CreateTenant,
    security(("bearer" = ["kernel.tenant.manage"])),
    responses((status = 201, body = Tenant), (status = 401), (status = 403), (status = 409, description = "CONFLICT: slug taken")))]
pub async fn create_tenant(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateTenant>,
) -> ApiResult<Response> {
    require_platform_admin(&state, &caller).await?;
    let slug = parse_slug(&body.slug).map_err(|m| ApiError::invalid_field("slug", m))?;
    let name = parse_name(&body.name).map_err(|m| ApiError::invalid_field("name", m))?;
    let tenant = change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move { admin::create_tenant(tx, c, &slug, &name).await })
    })
    .await?;
    Ok(with_etag(StatusCode::CREATED, &tenant, tenant.version))
}

/// Lists tenants (platform administrators).
#[utoipa::path(get, path = "/api/kernel/tenants", tag = "identity", security(("bearer" = ["kernel.tenant.manage"])),
    params(("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = aibos_wire::Page<Tenant>), (status = 401), (status = 403)))]
pub async fn list_tenants(
    State(state): State<AppState>,
    caller: Caller,
    page: ListQuery,
) -> ApiResult<Json<aibos_wire::Page<Tenant>>> {
    require_platform_admin(&state, &caller).await?;
    let rows = store::tenants(state.db(), &page.after, page.fetch()).await?;
    Ok(Json(page.page(rows, |t| t.id.clone())))
}

/// One tenant (platform administrators).
#[utoipa::path(get, path = "/api/kernel/tenants/{id}", tag = "identity", security(("bearer" = ["kernel.tenant.manage"])),
    responses((status = 200, body = Tenant), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn get_tenant(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    require_platform_admin(&state, &caller).await?;
    let id = parse_id("id", &id)?;
    let tenant = store::tenant(state.db(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such tenant."))?;
    Ok(with_etag(StatusCode::OK, &tenant, tenant.version))
}

/// `PATCH /api/kernel/tenants/{id}` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTenant {
    name: Option<String>,
    /// `active` or `suspended`.
    status: Option<String>,
}

fn parse_status(status: Option<&str>) -> ApiResult<Option<&'static str>> {
    match status {
        None => Ok(None),
        Some("active") => Ok(Some("active")),
        Some("suspended") => Ok(Some("suspended")),
        Some(_) => Err(ApiError::invalid_field(
            "status",
            "must be active or suspended",
        )),
    }
}

/// Renames, suspends or reactivates a tenant (platform administrators).
#[utoipa::path(patch, path = "/api/kernel/tenants/{id}", tag = "identity", request_body = UpdateTenant, security(("bearer" = ["kernel.tenant.manage"])),
    responses((status = 200, body = Tenant), (status = 400), (status = 401), (status = 403), (status = 404), (status = 412), (status = 428)))]
pub async fn update_tenant(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    if_match: IfMatch,
    AppJson(body): AppJson<UpdateTenant>,
) -> ApiResult<Response> {
    require_platform_admin(&state, &caller).await?;
    let id = parse_id("id", &id)?;
    let status = parse_status(body.status.as_deref())?;
    let name = body
        .name
        .as_deref()
        .map(parse_name)
        .transpose()
        .map_err(|m| ApiError::invalid_field("name", m))?;
    if id == SYSTEM_TENANT_ID && status == Some("suspended") {
        return Err(ApiError::conflict("The system tenant cannot be suspended."));
    }
    let tenant_id = id.clone();
    let tenant = change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let tenant = store::update_tenant(tx, &id, name.as_deref(), status, if_match.0).await?;
            let Some(tenant) = tenant else {
                return Ok(None);
            };
            let (action, event) = match status {
                Some("suspended") => ("tenant.suspended", "kernel.tenant.suspended"),
                _ => ("tenant.updated", "kernel.tenant.updated"),
            };
            c.audit(
                AuditEvent::new(action)
                    .resource("tenant", &tenant.id)
                    .details(serde_json::json!({ "name": tenant.name, "status": tenant.status })),
            )
            .publish(event);
            c.invalidate(Invalidation::Tenant(tenant.id.clone()));
            Ok(Some(tenant))
        })
    })
    .await?;
    match tenant {
        Some(t) => Ok(with_etag(StatusCode::OK, &t, t.version)),
        None => Err(missing_or_changed(
            store::tenant(state.db(), &tenant_id).await?.is_some(),
            "tenant",
        )),
    }
}

/// 404 when the resource is missing, 412 when it exists but `If-Match` did not match.
fn missing_or_changed(exists: bool, what: &str) -> ApiError {
    if exists {
        ApiError::new(
            ErrorCode::PreconditionFailed,
            format!("The {what} has changed since it was read; fetch it again."),
        )
    } else {
        ApiError::not_found(format!("No such {what}."))
    }
}

/// `POST /api/kernel/tenants/{id}/admins` and `POST /api/kernel/users` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    email: String,
    name: String,
    password: String,
    /// Optional; must be the caller's own tenant if given.
    tenant_id: Option<String>,
}

/// Creates an administrator (`tenant.admin`) in a tenant (platform administrators).
#[utoipa::path(post, path = "/api/kernel/tenants/{id}/admins", tag = "identity", request_body = CreateUser, security(("bearer" = ["kernel.tenant.manage"])),
    responses((status = 201, body = User), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409)))]
pub async fn create_tenant_admin(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    AppJson(body): AppJson<CreateUser>,
) -> ApiResult<Response> {
    require_platform_admin(&state, &caller).await?;
    let id = parse_id("id", &id)?;
    store::tenant(state.db(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such tenant."))?;
    let (email, name, pw) = parse_new_user(&body)?;
    let hash = state
        .hasher()
        .hash(pw)
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
    // Recorded in the tenant's own chain: its auditors see who created its administrators.
    let ctx = caller.audit_context().in_tenant(&id);
    let user = change::write(&state, ctx, move |tx, c| {
        Box::pin(async move { admin::create_admin(tx, c, &id, &email, &name, &hash).await })
    })
    .await?;
    Ok(with_etag(StatusCode::CREATED, &user, user.version))
}

fn parse_new_user(body: &CreateUser) -> ApiResult<(String, String, password::Password)> {
    let email = parse_email(&body.email);
    let name = parse_name(&body.name);
    let pw = password::Password::parse(body.password.clone());
    let mut error = ApiError::new(ErrorCode::ValidationError, "The request body is not valid.");
    let mut bad = false;
    if let Err(m) = &email {
        error = error.with_field("email", m.clone());
        bad = true;
    }
    if let Err(m) = &name {
        error = error.with_field("name", m.clone());
        bad = true;
    }
    if let Err(m) = &pw {
        error = error.with_field("password", m.clone());
        bad = true;
    }
    match (email, name, pw) {
        (Ok(e), Ok(n), Ok(p)) if !bad => Ok((e, n, p)),
        _ => Err(error),
    }
}

/// Creates a user in the caller's tenant.
#[utoipa::path(post, path = "/api/kernel/users", tag = "identity", request_body = CreateUser, security(("bearer" = ["kernel.user.manage"])),
    responses((status = 201, body = User), (status = 400), (status = 401), (status = 403), (status = 409, description = "CONFLICT: email taken")))]
pub async fn create_user(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateUser>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::USER_MANAGE]).await?;
    caller
        .refuse_foreign_tenant(&state, body.tenant_id.as_deref())
        .await?;
    let (email, name, pw) = parse_new_user(&body)?;
    let hash = state
        .hasher()
        .hash(pw)
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
    let tenant_id = caller.tenant_id().to_owned();
    let user = change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let id = Uuid::now_v7().to_string();
            let user = store::insert_user(tx, &id, &tenant_id, &email, &name, &hash).await?;
            c.audit(
                AuditEvent::new("user.created")
                    .resource("user", &user.id)
                    .details(serde_json::json!({ "email": user.email, "name": user.name })),
            )
            .publish("kernel.user.created");
            Ok(user)
        })
    })
    .await?;
    Ok(with_etag(StatusCode::CREATED, &user, user.version))
}

/// Lists the caller's tenant's users.
#[utoipa::path(get, path = "/api/kernel/users", tag = "identity", security(("bearer" = ["kernel.user.read"])),
    params(("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = aibos_wire::Page<User>), (status = 401), (status = 403)))]
pub async fn list_users(
    State(state): State<AppState>,
    caller: Caller,
    page: ListQuery,
) -> ApiResult<Json<aibos_wire::Page<User>>> {
    caller.require(&state, &[perm::USER_READ]).await?;
    let rows = store::users(state.db(), caller.tenant_id(), &page.after, page.fetch()).await?;
    Ok(Json(page.page(rows, |u| u.id.clone())))
}

/// One user of the caller's tenant (another tenant's user is a 404).
#[utoipa::path(get, path = "/api/kernel/users/{id}", tag = "identity", security(("bearer" = ["kernel.user.read"])),
    responses((status = 200, body = User), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn get_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::USER_READ]).await?;
    let id = parse_id("id", &id)?;
    let user = store::user(state.db(), caller.tenant_id(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such user."))?;
    Ok(with_etag(StatusCode::OK, &user, user.version))
}

/// `PATCH /api/kernel/users/{id}` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    name: Option<String>,
    /// `active` or `suspended`.
    status: Option<String>,
}

/// Renames, suspends or reactivates a user; suspension ends their sessions on the next request.
#[utoipa::path(patch, path = "/api/kernel/users/{id}", tag = "identity", request_body = UpdateUser, security(("bearer" = ["kernel.user.manage"])),
    responses((status = 200, body = User), (status = 400), (status = 401), (status = 403), (status = 404), (status = 412), (status = 428)))]
pub async fn update_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    if_match: IfMatch,
    AppJson(body): AppJson<UpdateUser>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::USER_MANAGE]).await?;
    let id = parse_id("id", &id)?;
    let status = parse_status(body.status.as_deref())?;
    let name = body
        .name
        .as_deref()
        .map(parse_name)
        .transpose()
        .map_err(|m| ApiError::invalid_field("name", m))?;
    if status.is_some() {
        // Suspending (or reactivating) someone who holds more than the caller
        // may give is acting beyond the caller's own rights.
        caller.require_over(&state, &id).await?;
    }
    let tenant_id = caller.tenant_id().to_owned();
    let (tid, uid) = (tenant_id.clone(), id.clone());
    let user = change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let Some(user) =
                store::update_user(tx, &tenant_id, &id, name.as_deref(), status, if_match.0)
                    .await?
            else {
                return Ok(None);
            };
            let (name, status) = (user.name.as_str(), user.status.as_str());
            subject_updated(
                tx,
                c,
                UpdatedSubject::User,
                &tenant_id,
                &user.id,
                name,
                status,
            )
            .await?;
            Ok(Some(user))
        })
    })
    .await?;
    match user {
        Some(u) => Ok(with_etag(StatusCode::OK, &u, u.version)),
        None => Err(missing_or_changed(
            store::user(state.db(), &tid, &uid).await?.is_some(),
            "user",
        )),
    }
}

/// A user or a service account: what `subject_updated` records about.
#[derive(Clone, Copy)]
enum UpdatedSubject {
    User,
    ServiceAccount,
}

/// What follows a change to a subject's name or status, in its transaction:
/// a suspension ends every session, so that a reactivation does not bring the
/// old ones (and their refresh tokens) back; then the audit entry, the kernel
/// event and the tenant's invalidation.
async fn subject_updated(
    tx: &mut crate::db::Tx,
    c: &mut change::Change,
    subject: UpdatedSubject,
    tenant_id: &str,
    id: &str,
    name: &str,
    status: &str,
) -> Result<(), ApiError> {
    let suspended = status == "suspended";
    let sessions = match suspended {
        true => store::revoke_subject_sessions(tx, tenant_id, id, None, "suspended").await?,
        false => 0,
    };
    let (resource, action, event) = match (subject, suspended) {
        (UpdatedSubject::User, true) => ("user", "user.suspended", "kernel.user.suspended"),
        (UpdatedSubject::User, false) => ("user", "user.updated", "kernel.user.updated"),
        (UpdatedSubject::ServiceAccount, true) => (
            "service_account",
            "service_account.suspended",
            "kernel.service_account.suspended",
        ),
        (UpdatedSubject::ServiceAccount, false) => (
            "service_account",
            "service_account.updated",
            "kernel.service_account.updated",
        ),
    };
    c.audit(AuditEvent::new(action).resource(resource, id).details(
        serde_json::json!({ "name": name, "status": status, "sessions_revoked": sessions }),
    ))
    .publish(event);
    c.invalidate(Invalidation::Tenant(tenant_id.to_owned()));
    Ok(())
}

/// `POST /api/kernel/users/{id}/password` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePassword {
    password: String,
}

/// Sets a user's password (administrators with `kernel.user.manage`).
#[utoipa::path(post, path = "/api/kernel/users/{id}/password", tag = "identity", request_body = ChangePassword, security(("bearer" = ["kernel.user.manage"])),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn change_password(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    AppJson(body): AppJson<ChangePassword>,
) -> ApiResult<StatusCode> {
    caller.require(&state, &[perm::USER_MANAGE]).await?;
    let id = parse_id("id", &id)?;
    caller.require_over(&state, &id).await?;
    let pw = password::Password::parse(body.password)
        .map_err(|m| ApiError::invalid_field("password", m))?;
    let hash = state
        .hasher()
        .hash(pw)
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
    let tenant_id = caller.tenant_id().to_owned();
    // Whoever knew the old password may hold a session: all end, but the
    // caller's own when it changes its own password.
    let keep = (id == caller.subject_id()).then(|| caller.principal.session_id.clone());
    change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            if !store::set_password(tx, &tenant_id, &id, &hash).await? {
                return Err(ApiError::not_found("No such user."));
            }
            let sessions = store::revoke_subject_sessions(
                tx,
                &tenant_id,
                &id,
                keep.as_deref(),
                "password_changed",
            )
            .await?;
            c.audit(
                AuditEvent::new("user.password_changed")
                    .resource("user", &id)
                    .details(serde_json::json!({ "sessions_revoked": sessions })),
            )
            .publish("kernel.user.password_changed");
            c.invalidate(Invalidation::Tenant(tenant_id));
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What `POST /api/kernel/users/{id}/sessions/revoke` ended.
#[derive(Serialize, ToSchema)]
pub struct RevokedSessions {
    /// How many open sessions were revoked.
    revoked_sessions: u64,
}

/// Ends every session of a user (their access and refresh tokens stop working on the next request).
#[utoipa::path(post, path = "/api/kernel/users/{id}/sessions/revoke", tag = "identity", security(("bearer" = ["kernel.user.manage"])),
    responses((status = 200, body = RevokedSessions), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn revoke_user_sessions(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<RevokedSessions>> {
    caller.require(&state, &[perm::USER_MANAGE]).await?;
    let id = parse_id("id", &id)?;
    caller.require_over(&state, &id).await?;
    store::user(state.db(), caller.tenant_id(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such user."))?;
    let revoked = revoke_all_sessions(&state, &caller, "user", id, "revoked").await?;
    Ok(Json(RevokedSessions {
        revoked_sessions: revoked,
    }))
}

/// Revokes every session of a user or service account of the caller's
/// tenant, audited as `session.revoked` on the subject, and drops their
/// cached principals here and (by NOTIFY) on every instance.
async fn revoke_all_sessions(
    state: &AppState,
    caller: &Caller,
    resource_type: &'static str,
    subject_id: String,
    reason: &'static str,
) -> ApiResult<u64> {
    let tenant_id = caller.tenant_id().to_owned();
    let revoked = change::write(state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let n =
                store::revoke_subject_sessions(tx, &tenant_id, &subject_id, None, reason).await?;
            c.audit(
                AuditEvent::new("session.revoked")
                    .resource(resource_type, &subject_id)
                    .details(serde_json::json!({ "reason": reason, "sessions_revoked": n })),
            );
            c.invalidate(Invalidation::Tenant(tenant_id));
            Ok(n)
        })
    })
    .await?;
    Ok(revoked)
}

/// `POST /api/kernel/auth/login` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// Tenant slug or id.
    tenant: String,
    email: String,
    password: String,
}

/// Tokens of a new or refreshed session.
#[derive(Serialize, ToSchema)]
pub struct TokenResponse {
    access_token: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    token_type: &'static str,
    expires_in: u64,
}

fn login_failed() -> ApiError {
    ApiError::unauthorized("The tenant, email or password is wrong.")
}

/// Signs an access token for a session.
fn issue_access_token(
    state: &AppState,
    tenant_id: &str,
    subject_id: &str,
    session_id: &str,
    actor_type: &str,
) -> ApiResult<(String, u64)> {
    let ttl = state.config_ref().auth.access_token_ttl_seconds;
    let now = timestamp::now().unix_timestamp();
    let claims = Claims {
        iss: ISSUER.to_owned(),
        aud: AUDIENCE.to_owned(),
        sub: subject_id.to_owned(),
        tid: tenant_id.to_owned(),
        sid: session_id.to_owned(),
        act: actor_type.to_owned(),
        iat: now,
        nbf: now,
        exp: now + i64::try_from(ttl).unwrap_or(900),
        jti: Uuid::now_v7().to_string(),
    };
    let token = state.keys().sign(&claims).map_err(ApiError::internal)?;
    Ok((token, ttl))
}

/// Logs in with tenant, email and password. Every failure gets the same 401.
#[utoipa::path(post, path = "/api/kernel/auth/login", tag = "identity", request_body = LoginRequest,
    responses((status = 200, body = TokenResponse), (status = 400), (status = 401, description = "UNAUTHORIZED: same body for any wrong tenant, email or password"),
              (status = 403, description = "TENANT_SUSPENDED"), (status = 429, description = "RATE_LIMITED, with Retry-After")))]
pub async fn login(
    State(state): State<AppState>,
    info: ClientInfo,
    AppJsonKeepingNul(body): AppJsonKeepingNul<LoginRequest>,
) -> ApiResult<Response> {
    if let Some(field) = [
        ("tenant", &body.tenant),
        ("email", &body.email),
        ("password", &body.password),
    ]
    .into_iter()
    .find_map(|(field, text)| text.contains('\0').then_some(field))
    {
        return Err(login_with_nul(&state, info, &body, field).await);
    }
    let tenant_key: String = body.tenant.chars().take(100).collect();
    let email = body
        .email
        .trim()
        .to_ascii_lowercase()
        .chars()
        .take(254)
        .collect::<String>();
    let found = store::login_lookup(state.db(), &tenant_key, &email).await?;
    // Counted before the password is checked: parallel guesses share one budget.
    // A tenant's slug and id are one bucket; an unknown tenant is its text's.
    let bucket = found
        .as_ref()
        .map_or_else(|| tenant_key.to_ascii_lowercase(), |f| f.tenant_id.clone());
    let attempt = state
        .login_throttle()
        .reserve(&bucket, &email, info.client_ip)
        .await
        .map_err(|retry| {
            ApiError::rate_limited("Too many failed logins; try again later.", retry.0)
        })?;
    let phc = found.as_ref().and_then(|f| f.password_hash.clone());
    // Always one Argon2 verification, against a dummy hash when there is no such user.
    let verified = state
        .hasher()
        .verify(password::Password::candidate(body.password), phc)
        .await;
    let (tenant_id, tenant_status, user_id) = match found {
        Some(store::LoginLookup {
            tenant_id,
            tenant_status,
            user_id: Some(user_id),
            user_status: Some(user_status),
            ..
        }) if verified && user_status == "active" => (tenant_id, tenant_status, user_id),
        found => return Err(login_refused(&state, info, tenant_key, email, found, verified).await),
    };
    if tenant_status != "active" {
        return Err(ApiError::new(
            ErrorCode::TenantSuspended,
            "The tenant is suspended.",
        ));
    }
    let ctx = info.audit_context(&tenant_id, "user", Some(user_id.clone()));
    let response = open_session(&state, ctx, &tenant_id, &user_id, "user", true).await?;
    attempt.succeeded();
    state.metrics().login("success");
    Ok(no_store(Json(response)))
}

/// A login whose text holds a NUL character (which no tenant, email or
/// password can): refused like any such text, 400 naming the field, and
/// audited as a failed login in the system tenant's chain, its text with the
/// NUL shown as U+FFFD (PostgreSQL stores no NUL).
async fn login_with_nul(
    state: &AppState,
    info: ClientInfo,
    body: &LoginRequest,
    field: &str,
) -> ApiError {
    let shown =
        |text: &str| -> String { text.replace('\0', "\u{FFFD}").chars().take(254).collect() };
    let ctx = info.audit_context(SYSTEM_TENANT_ID, "anonymous", None);
    let event = AuditEvent::new("auth.login_failed")
        .outcome("failure")
        .severity("warning")
        .details(serde_json::json!({
            "tenant": shown(&body.tenant), "email": shown(&body.email), "reason": "invalid_text", "field": field
        }));
    if let Err(e) = state.audit_alone(ctx, event).await {
        return e;
    }
    state.metrics().login("failure");
    crate::http::extract::nul_refused(field)
}

/// A failed login: throttled, audited with its reason (never shown to the client),
/// and answered with the one 401 body every failure shares.
async fn login_refused(
    state: &AppState,
    info: ClientInfo,
    tenant_key: String,
    email: String,
    found: Option<store::LoginLookup>,
    verified: bool,
) -> ApiError {
    let chain = found
        .as_ref()
        .map(|f| f.tenant_id.clone())
        .unwrap_or_else(|| SYSTEM_TENANT_ID.to_owned());
    let reason = match &found {
        None => "unknown_tenant",
        Some(f) if f.user_id.is_none() => "unknown_email",
        Some(_) if verified => "user_suspended",
        Some(_) => "wrong_password",
    };
    let user_id = found.and_then(|f| f.user_id);
    let ctx = info.audit_context(&chain, "anonymous", user_id);
    let event = AuditEvent::new("auth.login_failed")
        .outcome("failure")
        .severity("warning")
        .details(serde_json::json!({
            "tenant": tenant_key, "email": email, "reason": reason
        }));
    if let Err(e) = state.audit_alone(ctx, event).await {
        return e;
    }
    state.metrics().login("failure");
    login_failed()
}

/// Opens a session (and a refresh token when `with_refresh`) and signs its first access token.
async fn open_session(
    state: &AppState,
    ctx: AuditContext,
    tenant_id: &str,
    subject_id: &str,
    actor_type: &'static str,
    with_refresh: bool,
) -> ApiResult<TokenResponse> {
    let session_id = Uuid::now_v7().to_string();
    let refresh = with_refresh.then(|| new_secret("krt_"));
    let expires =
        timestamp::format(timestamp::now() + time::Duration::seconds(limits::SESSION_TTL_SECONDS));
    let (sid, tid, sub, refresh_hash) = (
        session_id.clone(),
        tenant_id.to_owned(),
        subject_id.to_owned(),
        refresh.as_deref().map(secret_hash),
    );
    change::write(state, ctx, move |tx, c| {
        Box::pin(async move {
            store::insert_session(tx, &sid, &tid, &sub, actor_type, &expires).await?;
            if let Some(hash) = refresh_hash {
                store::insert_refresh_token(tx, &hash, &sid, &tid).await?;
            }
            c.audit(
                AuditEvent::new("session.created")
                    .resource("session", &sid)
                    .details(serde_json::json!({ "actor_type": actor_type })),
            );
            Ok(())
        })
    })
    .await?;
    let (access_token, expires_in) =
        issue_access_token(state, tenant_id, subject_id, &session_id, actor_type)?;
    Ok(TokenResponse {
        access_token,
        refresh_token: refresh,
        token_type: "Bearer",
        expires_in,
    })
}

/// `POST /api/kernel/auth/refresh` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    refresh_token: String,
}

/// Trades a refresh token for a new access token and a new refresh token. A
/// rotated refresh token presented again revokes the whole session.
#[utoipa::path(post, path = "/api/kernel/auth/refresh", tag = "identity", request_body = RefreshRequest,
    responses((status = 200, body = TokenResponse), (status = 400), (status = 401)))]
pub async fn refresh(
    State(state): State<AppState>,
    info: ClientInfo,
    AppJson(body): AppJson<RefreshRequest>,
) -> ApiResult<Response> {
    if body.refresh_token.len() > 200 {
        return Err(ApiError::unauthorized("The refresh token is not valid."));
    }
    let presented = secret_hash(&body.refresh_token);
    let next = new_secret("krt_");
    let next_hash = secret_hash(&next);
    enum Outcome {
        Refreshed {
            tenant_id: String,
            subject_id: String,
            session_id: String,
            actor_type: String,
        },
        Reused,
        Invalid,
    }
    let now = timestamp::now_text();
    // The entry goes to the token's tenant, known only inside: the context
    // the helper starts with is replaced there.
    let outcome = change::write(&state, AuditContext::default(), move |tx, c| {
        Box::pin(async move {
            let Some(row) = store::refresh_token(tx, &presented).await? else {
                return Ok(Outcome::Invalid);
            };
            if row.revoked_at.is_some() || row.expires_at <= now {
                return Ok(Outcome::Invalid);
            }
            let actor_type: &'static str = if row.actor_type == "user" {
                "user"
            } else {
                "service"
            };
            c.set_context(info.audit_context(
                &row.tenant_id,
                actor_type,
                Some(row.subject_id.clone()),
            ));
            if row.status != "active" || !store::rotate_refresh_token(tx, &presented).await? {
                store::revoke_session(tx, &row.tenant_id, &row.session_id, "refresh_token_reuse")
                    .await?;
                c.audit(
                    AuditEvent::new("session.revoked")
                        .resource("session", &row.session_id)
                        .severity("critical")
                        .details(serde_json::json!({ "reason": "refresh_token_reuse" })),
                );
                c.invalidate(Invalidation::Session(row.session_id));
                return Ok(Outcome::Reused);
            }
            store::insert_refresh_token(tx, &next_hash, &row.session_id, &row.tenant_id).await?;
            c.audit(AuditEvent::new("session.refreshed").resource("session", &row.session_id));
            Ok(Outcome::Refreshed {
                tenant_id: row.tenant_id,
                subject_id: row.subject_id,
                session_id: row.session_id,
                actor_type: row.actor_type,
            })
        })
    })
    .await?;
    match outcome {
        Outcome::Refreshed {
            tenant_id,
            subject_id,
            session_id,
            actor_type,
        } => {
            let (access_token, expires_in) =
                issue_access_token(&state, &tenant_id, &subject_id, &session_id, &actor_type)?;
            Ok(no_store(Json(TokenResponse {
                access_token,
                refresh_token: Some(next),
                token_type: "Bearer",
                expires_in,
            })))
        }
        Outcome::Reused => Err(ApiError::unauthorized(
            "The refresh token was already used; the session is revoked.",
        )),
        Outcome::Invalid => Err(ApiError::unauthorized("The refresh token is not valid.")),
    }
}

/// Ends the caller's session: its access and refresh tokens stop working on the next request.
#[utoipa::path(post, path = "/api/kernel/auth/logout", tag = "identity", security(("bearer" = [])),
    responses((status = 204), (status = 401)))]
pub async fn logout(State(state): State<AppState>, caller: Caller) -> ApiResult<StatusCode> {
    let (tenant_id, session_id) = (
        caller.tenant_id().to_owned(),
        caller.principal.session_id.clone(),
    );
    change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            store::revoke_session(tx, &tenant_id, &session_id, "logout").await?;
            c.audit(
                AuditEvent::new("session.revoked")
                    .resource("session", &session_id)
                    .details(serde_json::json!({ "reason": "logout" })),
            );
            c.invalidate(Invalidation::Session(session_id));
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller as the kernel sees it.
#[derive(Serialize, ToSchema)]
pub struct Me {
    /// `user` or `service`.
    actor_type: &'static str,
    /// The user or service account.
    subject: Subject,
    /// The tenant.
    tenant: TenantRef,
    /// The session.
    session_id: String,
    /// Effective permissions right now (roles, delegations, break-glass).
    permissions: Vec<String>,
}

/// The acting user or service account.
#[derive(Serialize, ToSchema)]
pub struct Subject {
    id: String,
    name: String,
    email: Option<String>,
}

/// A tenant reference.
#[derive(Serialize, ToSchema)]
pub struct TenantRef {
    id: String,
    slug: String,
}

/// Who the caller is, in which tenant, with which permissions.
#[utoipa::path(get, path = "/api/kernel/auth/me", tag = "identity", security(("bearer" = [])),
    responses((status = 200, body = Me), (status = 401), (status = 403, description = "TENANT_SUSPENDED")))]
pub async fn me(caller: Caller) -> Response {
    let p = &caller.principal;
    no_store(Json(Me {
        actor_type: p.actor_type,
        subject: Subject {
            id: p.subject_id.clone(),
            name: p.name.clone(),
            email: p.email.clone(),
        },
        tenant: TenantRef {
            id: p.tenant_id.clone(),
            slug: p.tenant_slug.clone(),
        },
        session_id: p.session_id.clone(),
        permissions: p.permissions.grants(),
    }))
}

/// `POST /api/kernel/auth/token` body (JSON or form-encoded, as RFC 6749 allows).
#[derive(Deserialize, ToSchema)]
pub struct TokenRequest {
    grant_type: String,
    client_id: String,
    client_secret: String,
}

/// The client-credentials grant for service accounts (`actor_type: service`).
#[utoipa::path(post, path = "/api/kernel/auth/token", tag = "identity",
    request_body(content = TokenRequest, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, body = TokenResponse), (status = 400), (status = 401, description = "UNAUTHORIZED with error invalid_client")))]
pub async fn token(
    State(state): State<AppState>,
    info: ClientInfo,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let request: TokenRequest = if content_type.starts_with("application/x-www-form-urlencoded") {
        let request: TokenRequest = serde_urlencoded::from_bytes(&body)
            .map_err(|e| ApiError::invalid_field("body", e.to_string()))?;
        // As `parse_json` does for the JSON form: no NUL in any field.
        if let Some(field) = [
            ("grant_type", &request.grant_type),
            ("client_id", &request.client_id),
            ("client_secret", &request.client_secret),
        ]
        .into_iter()
        .find_map(|(field, text)| text.contains('\0').then_some(field))
        {
            return Err(crate::http::extract::nul_refused(field));
        }
        request
    } else if content_type.starts_with("application/json") {
        crate::http::extract::parse_json(&body)?
    } else {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "Send application/x-www-form-urlencoded or application/json.",
        ));
    };
    if request.grant_type != "client_credentials" {
        return Err(
            ApiError::invalid_field("grant_type", "must be client_credentials")
                .with_oauth_error("unsupported_grant_type"),
        );
    }
    let invalid_client = || {
        ApiError::unauthorized("The client credentials are not valid.")
            .with_oauth_error("invalid_client")
    };
    if request.client_id.len() > 100 || request.client_secret.len() > 200 {
        return Err(invalid_client());
    }
    let account = store::service_account_credentials(state.db(), &request.client_id).await?;
    let presented = secret_hash(&request.client_secret);
    let (id, tenant_id) = match account {
        Some((id, tenant_id, status, hash))
            if bool::from(presented.as_bytes().ct_eq(hash.as_bytes())) && status == "active" =>
        {
            (id, tenant_id)
        }
        other => {
            if let Some((id, tenant_id, ..)) = other {
                let ctx = info.audit_context(&tenant_id, "anonymous", Some(id.clone()));
                let event = AuditEvent::new("auth.login_failed")
                    .outcome("failure")
                    .severity("warning")
                    .resource("service_account", &id)
                    .details(serde_json::json!({ "grant_type": "client_credentials" }));
                state.audit_alone(ctx, event).await?;
            }
            return Err(invalid_client());
        }
    };
    let ctx = info.audit_context(&tenant_id, "service", Some(id.clone()));
    let response = open_session(&state, ctx, &tenant_id, &id, "service", false).await?;
    Ok(no_store(Json(response)))
}

/// `POST /api/kernel/service-accounts` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateServiceAccount {
    name: String,
    /// Roles of the caller's tenant to assign.
    #[serde(default)]
    role_ids: Vec<String>,
}

/// A service account with its secret, shown once.
#[derive(Serialize, ToSchema)]
pub struct ServiceAccountWithSecret {
    #[serde(flatten)]
    account: ServiceAccount,
    /// Shown only in this response; store it now.
    client_secret: String,
}

/// Creates a service account for a cell; the secret is shown once.
#[utoipa::path(post, path = "/api/kernel/service-accounts", tag = "identity", request_body = CreateServiceAccount, security(("bearer" = ["kernel.service_account.manage"])),
    responses((status = 201, body = ServiceAccountWithSecret), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409)))]
pub async fn create_service_account(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateServiceAccount>,
) -> ApiResult<Response> {
    caller
        .require(&state, &[perm::SERVICE_ACCOUNT_MANAGE])
        .await?;
    let name = parse_name(&body.name).map_err(|m| ApiError::invalid_field("name", m))?;
    if body.role_ids.len() > limits::PERMISSIONS_PER_GRANT_MAX {
        return Err(ApiError::invalid_field("role_ids", "too many roles"));
    }
    let mut role_ids = Vec::new();
    let mut gives = crate::authz::PermissionSet::default();
    for id in &body.role_ids {
        let id = parse_id("role_ids", id)?;
        let role = authz_store::role(state.db(), caller.tenant_id(), &id)
            .await?
            .ok_or_else(|| ApiError::not_found("No such role."))?;
        gives.extend(&role.gives(caller.tenant_id()));
        role_ids.push(id);
    }
    caller.require_grantable(&state, &gives).await?;
    let secret = new_secret("kcs_");
    let (hash, client_id) = (
        secret_hash(&secret),
        format!("kci_{}", Uuid::now_v7().simple()),
    );
    let tenant_id = caller.tenant_id().to_owned();
    let account = change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let id = Uuid::now_v7().to_string();
            let account =
                store::insert_service_account(tx, &id, &tenant_id, &name, &client_id, &hash)
                    .await?;
            c.audit(
                AuditEvent::new("service_account.created")
                    .resource("service_account", &account.id)
                    .details(serde_json::json!({ "name": account.name, "client_id": account.client_id, "role_ids": role_ids })),
            )
            .publish("kernel.service_account.created");
            for role_id in &role_ids {
                authz_store::assign_role(tx, &tenant_id, &account.id, role_id, None).await?;
                c.audit(
                    AuditEvent::new("role.assigned")
                        .resource("service_account", &account.id)
                        .details(serde_json::json!({ "role_id": role_id })),
                )
                .publish("kernel.role_assignment.created");
            }
            Ok(account)
        })
    })
    .await?;
    let version = account.version;
    Ok(no_store(with_etag(
        StatusCode::CREATED,
        &ServiceAccountWithSecret {
            account,
            client_secret: secret,
        },
        version,
    )))
}

/// Lists the tenant's service accounts (never their secrets).
#[utoipa::path(get, path = "/api/kernel/service-accounts", tag = "identity", security(("bearer" = ["kernel.service_account.manage"])),
    params(("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = aibos_wire::Page<ServiceAccount>), (status = 401), (status = 403)))]
pub async fn list_service_accounts(
    State(state): State<AppState>,
    caller: Caller,
    page: ListQuery,
) -> ApiResult<Json<aibos_wire::Page<ServiceAccount>>> {
    caller
        .require(&state, &[perm::SERVICE_ACCOUNT_MANAGE])
        .await?;
    let rows =
        store::service_accounts(state.db(), caller.tenant_id(), &page.after, page.fetch()).await?;
    Ok(Json(page.page(rows, |a| a.id.clone())))
}

/// Replaces a service account's secret; the new one is shown once, the old one stops working.
#[utoipa::path(post, path = "/api/kernel/service-accounts/{id}/secret", tag = "identity", security(("bearer" = ["kernel.service_account.manage"])),
    responses((status = 200, body = ServiceAccountWithSecret), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn rotate_service_account_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller
        .require(&state, &[perm::SERVICE_ACCOUNT_MANAGE])
        .await?;
    let id = parse_id("id", &id)?;
    // Whoever holds the new secret acts as the account: only for a caller who
    // may give everything it holds.
    caller.require_over(&state, &id).await?;
    let secret = new_secret("kcs_");
    let hash = secret_hash(&secret);
    let tenant_id = caller.tenant_id().to_owned();
    let account = change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let Some(account) =
                store::rotate_service_account_secret(tx, &tenant_id, &id, &hash).await?
            else {
                return Err(ApiError::not_found("No such service account."));
            };
            // A rotation answers a leaked secret: tokens it obtained end too.
            let sessions =
                store::revoke_subject_sessions(tx, &tenant_id, &id, None, "secret_rotated").await?;
            c.audit(
                AuditEvent::new("service_account.secret_rotated")
                    .resource("service_account", &account.id)
                    .details(serde_json::json!({ "sessions_revoked": sessions })),
            )
            .publish("kernel.service_account.secret_rotated");
            c.invalidate(Invalidation::Tenant(tenant_id));
            Ok(account)
        })
    })
    .await?;
    let version = account.version;
    Ok(no_store(with_etag(
        StatusCode::OK,
        &ServiceAccountWithSecret {
            account,
            client_secret: secret,
        },
        version,
    )))
}

/// One service account of the caller's tenant (never its secret).
#[utoipa::path(get, path = "/api/kernel/service-accounts/{id}", tag = "identity", security(("bearer" = ["kernel.service_account.manage"])),
    responses((status = 200, body = ServiceAccount), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn get_service_account(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller
        .require(&state, &[perm::SERVICE_ACCOUNT_MANAGE])
        .await?;
    let id = parse_id("id", &id)?;
    let account = store::service_account(state.db(), caller.tenant_id(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such service account."))?;
    Ok(with_etag(StatusCode::OK, &account, account.version))
}

/// `PATCH /api/kernel/service-accounts/{id}` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateServiceAccount {
    name: Option<String>,
    /// `active` or `suspended`.
    status: Option<String>,
}

/// Renames, suspends or reactivates a service account; a suspension ends its sessions and refuses its credentials.
#[utoipa::path(patch, path = "/api/kernel/service-accounts/{id}", tag = "identity", request_body = UpdateServiceAccount, security(("bearer" = ["kernel.service_account.manage"])),
    responses((status = 200, body = ServiceAccount), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409), (status = 412), (status = 428)))]
pub async fn update_service_account(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    if_match: IfMatch,
    AppJson(body): AppJson<UpdateServiceAccount>,
) -> ApiResult<Response> {
    caller
        .require(&state, &[perm::SERVICE_ACCOUNT_MANAGE])
        .await?;
    let id = parse_id("id", &id)?;
    let status = parse_status(body.status.as_deref())?;
    let name = body
        .name
        .as_deref()
        .map(parse_name)
        .transpose()
        .map_err(|m| ApiError::invalid_field("name", m))?;
    if status.is_some() {
        caller.require_over(&state, &id).await?;
    }
    let tenant_id = caller.tenant_id().to_owned();
    let (tid, sid) = (tenant_id.clone(), id.clone());
    let account = change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let Some(account) = store::update_service_account(
                tx,
                &tenant_id,
                &id,
                name.as_deref(),
                status,
                if_match.0,
            )
            .await?
            else {
                return Ok(None);
            };
            let (name, status) = (account.name.as_str(), account.status.as_str());
            subject_updated(
                tx,
                c,
                UpdatedSubject::ServiceAccount,
                &tenant_id,
                &account.id,
                name,
                status,
            )
            .await?;
            Ok(Some(account))
        })
    })
    .await?;
    match account {
        Some(a) => Ok(with_etag(StatusCode::OK, &a, a.version)),
        None => Err(missing_or_changed(
            store::service_account(state.db(), &tid, &sid)
                .await?
                .is_some(),
            "service account",
        )),
    }
}

/// The public keys that verify access tokens (RFC 7517).
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "identity", responses((status = 200, description = "JWK set")))]
pub async fn jwks(State(state): State<AppState>) -> Response {
    let body = Arc::new(state.keys().jwks().clone());
    let mut response = Json(body.as_ref().clone()).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}
