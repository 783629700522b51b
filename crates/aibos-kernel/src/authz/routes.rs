//! RBAC endpoints: the permission registry, roles, role assignments, delegations, break-glass.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::cache::Invalidation;
use super::store::{self, Grant, Permission, Role};
use super::{BREAK_GLASS_EXCLUDED, Caller, PermissionSet, is_grant, perm};
use crate::audit::AuditEvent;
use crate::change;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::http::extract::{AppJson, IfMatch, ListQuery, parse_id, with_etag};
use crate::identity::SYSTEM_TENANT_ID;
use crate::identity::store as identity_store;
use crate::state::AppState;
use crate::{limits, timestamp};

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_permissions))
        .routes(routes!(create_role, list_roles))
        .routes(routes!(get_role, update_role, delete_role))
        .routes(routes!(assign_role))
        .routes(routes!(unassign_role))
        .routes(routes!(create_delegation, list_delegations))
        .routes(routes!(revoke_delegation))
        .routes(routes!(activate_break_glass))
        .routes(routes!(end_break_glass))
}

/// The permission registry.
#[utoipa::path(get, path = "/api/kernel/permissions", tag = "authz", security(("bearer" = ["kernel.role.read"])),
    responses((status = 200, body = Vec<Permission>), (status = 401), (status = 403)))]
pub async fn list_permissions(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<Permission>>> {
    caller.require(&state, &[perm::ROLE_READ]).await?;
    Ok(Json(store::permissions(state.db()).await?))
}

/// Checks grants: canonical form, registered (exact names), bounded, and no
/// platform permissions outside the system tenant.
async fn check_grants(
    state: &AppState,
    tenant_id: &str,
    grants: &[String],
    field: &str,
) -> ApiResult<Vec<String>> {
    if grants.len() > limits::PERMISSIONS_PER_GRANT_MAX {
        return Err(ApiError::invalid_field(
            field,
            format!("at most {} permissions", limits::PERMISSIONS_PER_GRANT_MAX),
        ));
    }
    let mut error = ApiError::new(
        ErrorCode::ValidationError,
        "Some permissions are not valid.",
    );
    let mut bad = false;
    for g in grants {
        if !is_grant(g) {
            error = error.with_field(
                field,
                format!(
                    "{:?} is not a permission name or a prefix grant such as finance.*",
                    g.chars().take(80).collect::<String>()
                ),
            );
            bad = true;
        } else if tenant_id != SYSTEM_TENANT_ID && super::covers_platform_permission(g) {
            error = error.with_field(
                field,
                format!("{g} would grant a platform permission (tenants, canons, routes), which only the system tenant may hold"),
            );
            bad = true;
        }
    }
    if bad {
        return Err(error);
    }
    let unknown = store::unknown_permissions(state.db(), grants).await?;
    if !unknown.is_empty() {
        return Err(ApiError::invalid_field(
            field,
            format!("not in the permission registry: {}", unknown.join(", ")),
        ));
    }
    let mut sorted = grants.to_vec();
    sorted.sort();
    sorted.dedup();
    Ok(sorted)
}

/// `POST /api/kernel/roles` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRole {
    name: String,
    permissions: Vec<String>,
}

fn parse_role_name(name: &str) -> ApiResult<String> {
    let ok = (1..=100).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(ApiError::invalid_field(
            "name",
            "must be 1 to 100 letters, digits, '.', '_' or '-'",
        ))
    }
}

/// Creates a role in the caller's tenant.
#[utoipa::path(post, path = "/api/kernel/roles", tag = "authz", request_body = CreateRole, security(("bearer" = ["kernel.role.manage"])),
    responses((status = 201, body = Role), (status = 400), (status = 401), (status = 403), (status = 409)))]
pub async fn create_role(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateRole>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::ROLE_MANAGE]).await?;
    let name = parse_role_name(&body.name)?;
    let grants = check_grants(&state, caller.tenant_id(), &body.permissions, "permissions").await?;
    caller
        .require_grantable(&state, &PermissionSet::of(&grants))
        .await?;
    let tenant_id = caller.tenant_id().to_owned();
    let role = change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let id = Uuid::now_v7().to_string();
            let role = store::insert_role(tx, &id, &tenant_id, &name, &grants, false).await?;
            c.audit(
                AuditEvent::new("role.created")
                    .resource("role", &role.id)
                    .details(
                        serde_json::json!({ "name": role.name, "permissions": role.permissions }),
                    ),
            )
            .publish("kernel.role.created");
            Ok(role)
        })
    })
    .await?;
    Ok(with_etag(StatusCode::CREATED, &role, role.version))
}

/// Lists the caller's tenant's roles.
#[utoipa::path(get, path = "/api/kernel/roles", tag = "authz", security(("bearer" = ["kernel.role.read"])),
    params(("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = aibos_wire::Page<Role>), (status = 401), (status = 403)))]
pub async fn list_roles(
    State(state): State<AppState>,
    caller: Caller,
    page: ListQuery,
) -> ApiResult<Json<aibos_wire::Page<Role>>> {
    caller.require(&state, &[perm::ROLE_READ]).await?;
    let rows = store::roles(state.db(), caller.tenant_id(), &page.after, page.fetch()).await?;
    Ok(Json(page.page(rows, |r| r.id.clone())))
}

/// One role of the caller's tenant.
#[utoipa::path(get, path = "/api/kernel/roles/{id}", tag = "authz", security(("bearer" = ["kernel.role.read"])),
    responses((status = 200, body = Role), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn get_role(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::ROLE_READ]).await?;
    let id = parse_id("id", &id)?;
    let role = store::role(state.db(), caller.tenant_id(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such role."))?;
    Ok(with_etag(StatusCode::OK, &role, role.version))
}

/// `PATCH /api/kernel/roles/{id}` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateRole {
    name: Option<String>,
    permissions: Option<Vec<String>>,
}

/// Changes a role; holders see the change on their next request.
#[utoipa::path(patch, path = "/api/kernel/roles/{id}", tag = "authz", request_body = UpdateRole, security(("bearer" = ["kernel.role.manage"])),
    responses((status = 200, body = Role), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409, description = "CONFLICT: built-in role"), (status = 412), (status = 428)))]
pub async fn update_role(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    if_match: IfMatch,
    AppJson(body): AppJson<UpdateRole>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::ROLE_MANAGE]).await?;
    let id = parse_id("id", &id)?;
    let name = body.name.as_deref().map(parse_role_name).transpose()?;
    let grants = match &body.permissions {
        Some(p) => Some(check_grants(&state, caller.tenant_id(), p, "permissions").await?),
        None => None,
    };
    let existing = store::role(state.db(), caller.tenant_id(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such role."))?;
    if existing.builtin {
        return Err(ApiError::conflict("Built-in roles cannot be changed."));
    }
    // Changing a role changes what its holders hold: both what it gave and what
    // it will give must be the caller's to give.
    let mut gives = existing.gives(caller.tenant_id());
    if let Some(grants) = &grants {
        gives.extend(&PermissionSet::of(grants));
    }
    caller.require_grantable(&state, &gives).await?;
    let tenant_id = caller.tenant_id().to_owned();
    let role = change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let grants = grants.as_deref();
            let Some(role) =
                store::update_role(tx, &tenant_id, &id, name.as_deref(), grants, if_match.0)
                    .await?
            else {
                return Ok(None);
            };
            c.audit(
                AuditEvent::new("role.updated")
                    .resource("role", &role.id)
                    .details(
                        serde_json::json!({ "name": role.name, "permissions": role.permissions }),
                    ),
            )
            .publish("kernel.role.updated");
            c.invalidate(Invalidation::Tenant(tenant_id));
            Ok(Some(role))
        })
    })
    .await?;
    match role {
        Some(r) => Ok(with_etag(StatusCode::OK, &r, r.version)),
        None => Err(ApiError::new(
            ErrorCode::PreconditionFailed,
            "The role has changed since it was read; fetch it again.",
        )),
    }
}

/// Deletes a role and its assignments.
#[utoipa::path(delete, path = "/api/kernel/roles/{id}", tag = "authz", security(("bearer" = ["kernel.role.manage"])),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409), (status = 412), (status = 428)))]
pub async fn delete_role(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    if_match: IfMatch,
) -> ApiResult<StatusCode> {
    caller.require(&state, &[perm::ROLE_MANAGE]).await?;
    let id = parse_id("id", &id)?;
    let existing = store::role(state.db(), caller.tenant_id(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such role."))?;
    if existing.builtin {
        return Err(ApiError::conflict("Built-in roles cannot be deleted."));
    }
    caller
        .require_grantable(&state, &existing.gives(caller.tenant_id()))
        .await?;
    let tenant_id = caller.tenant_id().to_owned();
    change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            if !store::delete_role(tx, &tenant_id, &id, if_match.0).await? {
                return Err(ApiError::new(
                    ErrorCode::PreconditionFailed,
                    "The role has changed since it was read; fetch it again.",
                ));
            }
            c.audit(
                AuditEvent::new("role.deleted")
                    .resource("role", &id)
                    .details(serde_json::json!({ "name": existing.name })),
            )
            .publish("kernel.role.deleted");
            c.invalidate(Invalidation::Tenant(tenant_id));
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/kernel/users/{id}/roles` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignRole {
    role_id: String,
    /// RFC 3339; the assignment ends by itself then.
    expires_at: Option<String>,
}

/// Assigns a role to a user of the caller's tenant, optionally until a time.
#[utoipa::path(post, path = "/api/kernel/users/{id}/roles", tag = "authz", request_body = AssignRole, security(("bearer" = ["kernel.role.manage"])),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn assign_role(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    AppJson(body): AppJson<AssignRole>,
) -> ApiResult<StatusCode> {
    caller.require(&state, &[perm::ROLE_MANAGE]).await?;
    let user_id = parse_id("id", &id)?;
    let role_id = parse_id("role_id", &body.role_id)?;
    let expires_at = match body.expires_at.as_deref() {
        None => None,
        Some(text) => {
            let t = timestamp::parse(text)
                .ok_or_else(|| ApiError::invalid_field("expires_at", "must be an RFC 3339 time"))?;
            if t <= timestamp::now() {
                return Err(ApiError::invalid_field(
                    "expires_at",
                    "must be in the future",
                ));
            }
            Some(timestamp::format(t))
        }
    };
    identity_store::user(state.db(), caller.tenant_id(), &user_id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such user."))?;
    let role = store::role(state.db(), caller.tenant_id(), &role_id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such role."))?;
    caller
        .require_grantable(&state, &role.gives(caller.tenant_id()))
        .await?;
    if store::holds_role(state.db(), caller.tenant_id(), &user_id, &role_id).await? {
        // Assigning again replaces the assignment's end: giving a stronger
        // user an expiry is taking something from them.
        caller.require_over(&state, &user_id).await?;
    }
    let tenant_id = caller.tenant_id().to_owned();
    change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let expires_at = expires_at.as_deref();
            store::assign_role(tx, &tenant_id, &user_id, &role_id, expires_at).await?;
            c.audit(
                AuditEvent::new("role.assigned")
                    .resource("user", &user_id)
                    .details(serde_json::json!({ "role_id": role_id, "expires_at": expires_at })),
            )
            .publish("kernel.role_assignment.created");
            c.invalidate(Invalidation::Tenant(tenant_id));
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a role from a user; their sessions end with it (they log in again with what remains).
#[utoipa::path(delete, path = "/api/kernel/users/{id}/roles/{role_id}", tag = "authz", security(("bearer" = ["kernel.role.manage"])),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn unassign_role(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, role_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.require(&state, &[perm::ROLE_MANAGE]).await?;
    let user_id = parse_id("id", &id)?;
    let role_id = parse_id("role_id", &role_id)?;
    caller.require_over(&state, &user_id).await?;
    let tenant_id = caller.tenant_id().to_owned();
    change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            if !store::unassign_role(tx, &tenant_id, &user_id, &role_id).await? {
                return Err(ApiError::not_found("The user does not hold that role."));
            }
            // Its sessions end with it: what they were opened with is gone.
            let sessions = identity_store::revoke_subject_sessions(
                tx,
                &tenant_id,
                &user_id,
                None,
                "role_removed",
            )
            .await?;
            c.audit(
                AuditEvent::new("role.unassigned")
                    .resource("user", &user_id)
                    .details(
                        serde_json::json!({ "role_id": role_id, "sessions_revoked": sessions }),
                    ),
            )
            .publish("kernel.role_assignment.deleted");
            c.invalidate(Invalidation::Tenant(tenant_id));
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/kernel/delegations` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDelegation {
    to_user_id: String,
    permissions: Vec<String>,
    /// RFC 3339, at most 30 days ahead.
    expires_at: String,
    reason: String,
}

fn parse_reason(reason: &str, min_chars: usize) -> ApiResult<String> {
    let reason = reason.trim();
    let n = reason.chars().count();
    if n < min_chars.max(1) || n > limits::TEXT_CHARS_MAX {
        return Err(ApiError::invalid_field(
            "reason",
            format!(
                "must be {} to {} characters",
                min_chars.max(1),
                limits::TEXT_CHARS_MAX
            ),
        ));
    }
    Ok(reason.to_owned())
}

/// Hands a subset of the caller's own (role) permissions to another user of the tenant for a bounded time.
#[utoipa::path(post, path = "/api/kernel/delegations", tag = "authz", request_body = CreateDelegation, security(("bearer" = ["kernel.delegation.create"])),
    responses((status = 201, body = Grant), (status = 400), (status = 401), (status = 403, description = "FORBIDDEN with missing_permissions"), (status = 404)))]
pub async fn create_delegation(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateDelegation>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::DELEGATION_CREATE]).await?;
    let to = parse_id("to_user_id", &body.to_user_id)?;
    if to == caller.subject_id() {
        return Err(ApiError::invalid_field(
            "to_user_id",
            "cannot delegate to oneself",
        ));
    }
    let grants = check_grants(&state, caller.tenant_id(), &body.permissions, "permissions").await?;
    if grants.is_empty() {
        return Err(ApiError::invalid_field(
            "permissions",
            "must name at least one permission",
        ));
    }
    let reason = parse_reason(&body.reason, 1)?;
    let expires = timestamp::parse(&body.expires_at)
        .ok_or_else(|| ApiError::invalid_field("expires_at", "must be an RFC 3339 time"))?;
    let now = timestamp::now();
    if expires <= now || expires > now + time::Duration::days(limits::DELEGATION_DAYS_MAX) {
        return Err(ApiError::invalid_field(
            "expires_at",
            format!(
                "must be in the future and at most {} days ahead",
                limits::DELEGATION_DAYS_MAX
            ),
        ));
    }
    // Only what one holds through one's own roles: delegated permissions cannot be delegated again.
    caller
        .require_grantable(&state, &PermissionSet::of(&grants))
        .await?;
    identity_store::user(state.db(), caller.tenant_id(), &to)
        .await?
        .ok_or_else(|| ApiError::not_found("No such user."))?;
    let (tenant_id, from) = (
        caller.tenant_id().to_owned(),
        caller.subject_id().to_owned(),
    );
    let expires_at = timestamp::format(expires);
    let grant = change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let id = Uuid::now_v7().to_string();
            let grant = store::insert_delegation(
                tx,
                &id,
                &tenant_id,
                &from,
                &to,
                &grants,
                &reason,
                &expires_at,
            )
            .await?;
            c.audit(
                AuditEvent::new("delegation.created")
                    .resource("delegation", &grant.id)
                    .details(serde_json::json!({ "to_user_id": grant.to_user_id, "permissions": grant.permissions, "expires_at": grant.expires_at, "reason": grant.reason })),
            )
            .publish("kernel.delegation.created");
            c.invalidate(Invalidation::Tenant(tenant_id));
            Ok(grant)
        })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(grant)).into_response())
}

/// Delegations the caller gave or received.
#[utoipa::path(get, path = "/api/kernel/delegations", tag = "authz", security(("bearer" = [])),
    params(("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = aibos_wire::Page<Grant>), (status = 401)))]
pub async fn list_delegations(
    State(state): State<AppState>,
    caller: Caller,
    page: ListQuery,
) -> ApiResult<Json<aibos_wire::Page<Grant>>> {
    let rows = store::delegations(
        state.db(),
        caller.tenant_id(),
        caller.subject_id(),
        &page.after,
        page.fetch(),
    )
    .await?;
    Ok(Json(page.page(rows, |g| g.id.clone())))
}

/// Revokes a delegation the caller gave or received; effective on the next request.
#[utoipa::path(delete, path = "/api/kernel/delegations/{id}", tag = "authz", security(("bearer" = [])),
    responses((status = 204), (status = 400), (status = 401), (status = 404)))]
pub async fn revoke_delegation(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = parse_id("id", &id)?;
    let (tenant_id, user_id) = (
        caller.tenant_id().to_owned(),
        caller.subject_id().to_owned(),
    );
    change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let Some(grant) = store::revoke_delegation(tx, &tenant_id, &id, &user_id).await? else {
                return Err(ApiError::not_found("No such delegation."));
            };
            c.audit(AuditEvent::new("delegation.revoked").resource("delegation", &grant.id))
                .publish("kernel.delegation.revoked");
            c.invalidate(Invalidation::Tenant(tenant_id));
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/kernel/break-glass` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakGlassRequest {
    permissions: Vec<String>,
    /// At least 20 characters.
    reason: String,
    /// 1 to 60.
    duration_minutes: i64,
}

/// Time-bound emergency elevation to permissions of the caller's tenant (never tenant management), audited critical.
#[utoipa::path(post, path = "/api/kernel/break-glass", tag = "authz", request_body = BreakGlassRequest, security(("bearer" = ["kernel.breakglass.request"])),
    responses((status = 201, body = Grant), (status = 400), (status = 401), (status = 403)))]
pub async fn activate_break_glass(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<BreakGlassRequest>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::BREAKGLASS_REQUEST]).await?;
    if caller.principal.actor_type != "user" {
        return Err(ApiError::forbidden(vec![
            perm::BREAKGLASS_REQUEST.to_owned(),
        ]));
    }
    let reason = parse_reason(&body.reason, limits::BREAK_GLASS_REASON_CHARS_MIN)?;
    if !(1..=limits::BREAK_GLASS_MINUTES_MAX).contains(&body.duration_minutes) {
        return Err(ApiError::invalid_field(
            "duration_minutes",
            format!("must be between 1 and {}", limits::BREAK_GLASS_MINUTES_MAX),
        ));
    }
    if body.permissions.iter().any(|p| p.ends_with(".*")) {
        return Err(ApiError::invalid_field(
            "permissions",
            "break-glass names exact permissions, not prefix grants",
        ));
    }
    // Never what manages identities or permissions, whichever tenant: through
    // those a 60-minute elevation could give itself lasting rights.
    let excluded: Vec<&str> = BREAK_GLASS_EXCLUDED
        .iter()
        .copied()
        .filter(|p| body.permissions.iter().any(|asked| asked == p))
        .collect();
    if !excluded.is_empty() {
        let event = AuditEvent::new("authz.deny").outcome("deny").severity("warning").details(serde_json::json!({ "required_permissions": body.permissions, "missing_permissions": excluded, "reason": "break-glass never grants these" }));
        state.audit_alone(caller.audit_context(), event).await?;
        return Err(
            ApiError::forbidden(excluded.iter().map(|p| p.to_string()).collect()).with_detail(
                "Break-glass never grants permissions that manage identities or permissions.",
            ),
        );
    }
    let grants = check_grants(&state, caller.tenant_id(), &body.permissions, "permissions").await?;
    if grants.is_empty() {
        return Err(ApiError::invalid_field(
            "permissions",
            "must name at least one permission",
        ));
    }
    let expires_at =
        timestamp::format(timestamp::now() + time::Duration::minutes(body.duration_minutes));
    let (tenant_id, user_id) = (
        caller.tenant_id().to_owned(),
        caller.subject_id().to_owned(),
    );
    let grant = change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let id = Uuid::now_v7().to_string();
            let grant = store::insert_break_glass(
                tx,
                &id,
                &tenant_id,
                &user_id,
                &grants,
                &reason,
                &expires_at,
            )
            .await?;
            // Announced twice: as the change it is, and to whoever watches
            // `kernel.security.*` for what must be looked at now (SPEC §4).
            c.audit(
                AuditEvent::new("breakglass.activated")
                    .resource("break_glass", &grant.id)
                    .severity("critical")
                    .details(serde_json::json!({ "permissions": grant.permissions, "reason": grant.reason, "expires_at": grant.expires_at })),
            )
            .publish("kernel.breakglass.activated")
            .publish("kernel.security.breakglass_activated");
            c.invalidate(Invalidation::Tenant(tenant_id));
            Ok(grant)
        })
    })
    .await?;
    tracing::warn!(break_glass_id = %grant.id, user_id = %grant.to_user_id, permissions = ?grant.permissions, "break-glass activated");
    Ok((StatusCode::CREATED, Json(grant)).into_response())
}

/// Ends the caller's break-glass elevation early.
#[utoipa::path(delete, path = "/api/kernel/break-glass/{id}", tag = "authz", security(("bearer" = [])),
    responses((status = 204), (status = 400), (status = 401), (status = 404)))]
pub async fn end_break_glass(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = parse_id("id", &id)?;
    let (tenant_id, user_id) = (
        caller.tenant_id().to_owned(),
        caller.subject_id().to_owned(),
    );
    change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let Some(grant) = store::end_break_glass(tx, &tenant_id, &id, &user_id).await? else {
                return Err(ApiError::not_found("No such break-glass elevation."));
            };
            c.audit(
                AuditEvent::new("breakglass.ended")
                    .resource("break_glass", &grant.id)
                    .severity("warning"),
            )
            .publish("kernel.breakglass.ended");
            c.invalidate(Invalidation::Tenant(tenant_id));
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
