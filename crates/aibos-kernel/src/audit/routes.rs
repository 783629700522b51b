//! `GET /api/kernel/audit` and `GET /api/kernel/audit/verify`.

use axum::Json;
use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::store::{self, AuditFilter};
use super::{AuditEntry, Verification};
use crate::authz::{Caller, perm};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{ListQuery, url_pairs};
use crate::state::AppState;
use crate::timestamp;

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_entries))
        .routes(routes!(verify))
}

/// Reads the filters from the query string; values are bounded and times must parse.
fn filter_from_query(query: &str) -> ApiResult<AuditFilter> {
    let mut filter = AuditFilter::default();
    for (key, value) in url_pairs(query)? {
        if value.len() > 200 {
            return Err(ApiError::invalid_field(key, "is too long"));
        }
        let time = |field: &str, v: &str| {
            timestamp::parse(v)
                .map(timestamp::format)
                .ok_or_else(|| ApiError::invalid_field(field, "must be an RFC 3339 time"))
        };
        match key.as_str() {
            "action" => filter.action = Some(value),
            "actor_id" => filter.actor_id = Some(value),
            "resource_type" => filter.resource_type = Some(value),
            "resource_id" => filter.resource_id = Some(value),
            "correlation_id" => filter.correlation_id = Some(value),
            "outcome" => {
                if !["success", "failure", "deny"].contains(&value.as_str()) {
                    return Err(ApiError::invalid_field(
                        "outcome",
                        "must be success, failure or deny",
                    ));
                }
                filter.outcome = Some(value);
            }
            "from" => filter.from = Some(time("from", &value)?),
            "to" => filter.to = Some(time("to", &value)?),
            _ => {}
        }
    }
    Ok(filter)
}

/// The caller's tenant's audit entries in `seq` order, filtered, paginated.
#[utoipa::path(get, path = "/api/kernel/audit", tag = "audit", security(("bearer" = ["kernel.audit.read"])),
    params(("action" = Option<String>, Query), ("actor_id" = Option<String>, Query), ("resource_type" = Option<String>, Query),
           ("resource_id" = Option<String>, Query), ("correlation_id" = Option<String>, Query), ("outcome" = Option<String>, Query),
           ("from" = Option<String>, Query), ("to" = Option<String>, Query), ("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = aibos_wire::Page<AuditEntry>), (status = 400), (status = 401), (status = 403)))]
pub async fn list_entries(
    State(state): State<AppState>,
    caller: Caller,
    page: ListQuery,
    uri: axum::http::Uri,
) -> ApiResult<Json<aibos_wire::Page<AuditEntry>>> {
    caller.require(&state, &[perm::AUDIT_READ]).await?;
    let filter = filter_from_query(uri.query().unwrap_or(""))?;
    let after: i64 = if page.after.is_empty() {
        0
    } else {
        page.after
            .parse()
            .map_err(|_| ApiError::invalid_field("cursor", "is not a cursor this API returned"))?
    };
    let rows = store::list(state.db(), caller.tenant_id(), &filter, after, page.fetch()).await?;
    Ok(Json(page.page(rows, |e| e.seq.to_string())))
}

/// Recomputes the caller's tenant's chain and names the first entry that does not verify.
#[utoipa::path(get, path = "/api/kernel/audit/verify", tag = "audit", security(("bearer" = ["kernel.audit.read"])),
    responses((status = 200, body = Verification), (status = 401), (status = 403)))]
pub async fn verify(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Verification>> {
    caller.require(&state, &[perm::AUDIT_READ]).await?;
    Ok(Json(
        store::verify_tenant(state.db(), caller.tenant_id(), None).await?,
    ))
}
