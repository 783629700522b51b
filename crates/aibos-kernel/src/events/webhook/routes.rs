//! `/api/kernel/subscriptions…`: webhook subscriptions, their secrets and
//! their delivery history, for the caller's tenant only.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::store::{self, RetryOutcome, SubscriptionFields, SubscriptionRow};
use super::{CreatedSubscription, Delivery, RotatedSecret, Subscription, signature, ssrf};
use crate::audit::AuditEvent;
use crate::authz::{Caller, perm};
use crate::change;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::http::extract::{AppJson, IfMatch, ListQuery, no_store, parse_id, url_pairs, with_etag};
use crate::limits;
use crate::state::AppState;

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_subscription, list_subscriptions))
        .routes(routes!(
            get_subscription,
            update_subscription,
            delete_subscription
        ))
        .routes(routes!(rotate_secret))
        .routes(routes!(list_deliveries))
        .routes(routes!(retry_delivery))
        .routes(routes!(retry_delivery_by_id))
        .routes(routes!(replay))
}

fn stale() -> ApiError {
    ApiError::new(
        ErrorCode::PreconditionFailed,
        "The subscription has changed since it was read; fetch it again.",
    )
}

fn missing() -> ApiError {
    ApiError::not_found("No such subscription.")
}

async fn existing(state: &AppState, caller: &Caller, id: &str) -> ApiResult<SubscriptionRow> {
    let id = parse_id("id", id)?;
    store::subscription(state.db(), caller.tenant_id(), &id)
        .await?
        .ok_or_else(missing)
}

fn check_description(text: &str) -> ApiResult<()> {
    if text.chars().count() > limits::DESCRIPTION_CHARS_MAX {
        return Err(ApiError::invalid_field(
            "description",
            format!(
                "must be at most {} characters",
                limits::DESCRIPTION_CHARS_MAX
            ),
        ));
    }
    Ok(())
}

async fn check_url(state: &AppState, url: &str) -> ApiResult<String> {
    let allow = state
        .config_ref()
        .events
        .webhook
        .webhook_allow_private_networks;
    ssrf::check_url(url, allow)
        .await
        .map(|_| url.to_owned())
        .map_err(|why| ApiError::invalid_field("url", why))
}

fn event_types(types: &[String]) -> ApiResult<Vec<String>> {
    super::parse_event_types(types).map_err(|why| ApiError::invalid_field("event_types", why))
}

/// What audit entries and events say of a subscription: never a secret.
fn details(row: &SubscriptionRow) -> serde_json::Value {
    serde_json::json!({
        "url": row.url, "event_types": row.filters(), "description": row.description,
        "enabled": row.enabled, "version": row.version,
    })
}

/// `POST /api/kernel/subscriptions` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubscription {
    /// `http` or `https`, no user-info. Private, loopback and link-local
    /// receivers are refused unless `events.webhook_allow_private_networks`.
    url: String,
    /// Exact event types, or `prefix.*`.
    event_types: Vec<String>,
    /// Free text (at most 500 characters).
    description: Option<String>,
    /// Default `true`.
    enabled: Option<bool>,
    /// Must be the caller's own tenant when sent: the tenant comes from the token.
    tenant_id: Option<String>,
}

/// Subscribes a URL to the tenant's events from now on; the signing secret is shown only in this answer.
#[utoipa::path(post, path = "/api/kernel/subscriptions", tag = "events", request_body = CreateSubscription,
    security(("bearer" = ["kernel.subscription.manage"])),
    responses((status = 201, body = CreatedSubscription), (status = 400), (status = 401), (status = 403),
        (status = 409, description = "CONFLICT: the tenant has the most subscriptions allowed")))]
pub async fn create_subscription(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateSubscription>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::SUBSCRIPTION_MANAGE]).await?;
    caller
        .refuse_foreign_tenant(&state, body.tenant_id.as_deref())
        .await?;
    let description = body.description.unwrap_or_default();
    check_description(&description)?;
    let fields = SubscriptionFields {
        event_types: event_types(&body.event_types)?,
        url: check_url(&state, &body.url).await?,
        description,
        enabled: body.enabled.unwrap_or(true),
    };
    let id = Uuid::now_v7().to_string();
    let secret = signature::new_secret();
    let sealed = state.master_keys().seal(&secret, &store::secret_place(&id));
    let tenant_id = caller.tenant_id().to_owned();
    let row = change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            if store::subscription_count(tx, &tenant_id).await?
                >= limits::WEBHOOK_SUBSCRIPTIONS_PER_TENANT_MAX
            {
                return Err(ApiError::conflict(format!(
                    "A tenant has at most {} subscriptions.",
                    limits::WEBHOOK_SUBSCRIPTIONS_PER_TENANT_MAX
                )));
            }
            let head = super::worker::stream_head(tx, &tenant_id).await?;
            let row =
                store::insert_subscription(tx, &id, &tenant_id, &fields, &sealed, head).await?;
            c.audit(
                AuditEvent::new("subscription.created")
                    .resource("subscription", &row.id)
                    .details(details(&row)),
            )
            .publish("kernel.subscription.created");
            Ok(row)
        })
    })
    .await?;
    state.webhooks().nudge();
    let created = CreatedSubscription {
        subscription: row.view(),
        secret,
    };
    Ok(no_store(with_etag(
        StatusCode::CREATED,
        &created,
        row.version,
    )))
}

/// Lists the tenant's subscriptions.
#[utoipa::path(get, path = "/api/kernel/subscriptions", tag = "events", security(("bearer" = ["kernel.subscription.read"])),
    params(("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = aibos_wire::Page<Subscription>), (status = 400), (status = 401), (status = 403)))]
pub async fn list_subscriptions(
    State(state): State<AppState>,
    caller: Caller,
    page: ListQuery,
) -> ApiResult<Json<aibos_wire::Page<Subscription>>> {
    caller.require(&state, &[perm::SUBSCRIPTION_READ]).await?;
    let rows =
        store::subscriptions(state.db(), caller.tenant_id(), &page.after, page.fetch()).await?;
    let views = rows.iter().map(SubscriptionRow::view).collect();
    Ok(Json(page.page(views, |s: &Subscription| s.id.clone())))
}

/// One subscription.
#[utoipa::path(get, path = "/api/kernel/subscriptions/{id}", tag = "events", security(("bearer" = ["kernel.subscription.read"])),
    responses((status = 200, body = Subscription), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn get_subscription(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::SUBSCRIPTION_READ]).await?;
    let row = existing(&state, &caller, &id).await?;
    Ok(with_etag(StatusCode::OK, &row.view(), row.version))
}

/// `PATCH /api/kernel/subscriptions/{id}` body: the fields to change.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSubscription {
    url: Option<String>,
    event_types: Option<Vec<String>>,
    description: Option<String>,
    /// `true` re-enables a subscription the kernel disabled; it resumes from its cursor.
    enabled: Option<bool>,
}

/// Changes a subscription.
#[utoipa::path(patch, path = "/api/kernel/subscriptions/{id}", tag = "events", request_body = UpdateSubscription,
    security(("bearer" = ["kernel.subscription.manage"])),
    responses((status = 200, body = Subscription), (status = 400), (status = 401), (status = 403), (status = 404), (status = 412), (status = 428)))]
pub async fn update_subscription(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    if_match: IfMatch,
    AppJson(body): AppJson<UpdateSubscription>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::SUBSCRIPTION_MANAGE]).await?;
    let current = existing(&state, &caller, &id).await?;
    let url = match &body.url {
        Some(url) => check_url(&state, url).await?,
        None => current.url.clone(),
    };
    let event_types = match &body.event_types {
        Some(t) => event_types(t)?,
        None => current.filters(),
    };
    let description = body
        .description
        .unwrap_or_else(|| current.description.clone());
    check_description(&description)?;
    let fields = SubscriptionFields {
        url,
        event_types,
        description,
        enabled: body.enabled.unwrap_or(current.enabled),
    };
    let tenant_id = caller.tenant_id().to_owned();
    let row = change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let row = store::update_subscription(tx, &tenant_id, &current.id, &fields, if_match.0)
                .await?
                .ok_or_else(stale)?;
            c.audit(
                AuditEvent::new("subscription.updated")
                    .resource("subscription", &row.id)
                    .details(details(&row)),
            )
            .publish("kernel.subscription.updated");
            Ok(row)
        })
    })
    .await?;
    state.webhooks().nudge();
    Ok(with_etag(StatusCode::OK, &row.view(), row.version))
}

/// Deletes a subscription and its delivery history; nothing more is sent to it.
#[utoipa::path(delete, path = "/api/kernel/subscriptions/{id}", tag = "events", security(("bearer" = ["kernel.subscription.manage"])),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404), (status = 412), (status = 428)))]
pub async fn delete_subscription(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    if_match: IfMatch,
) -> ApiResult<StatusCode> {
    caller.require(&state, &[perm::SUBSCRIPTION_MANAGE]).await?;
    let current = existing(&state, &caller, &id).await?;
    let tenant_id = caller.tenant_id().to_owned();
    change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            if !store::delete_subscription(tx, &tenant_id, &current.id, if_match.0).await? {
                return Err(stale());
            }
            c.audit(
                AuditEvent::new("subscription.deleted")
                    .resource("subscription", &current.id)
                    .details(details(&current)),
            )
            .publish("kernel.subscription.deleted");
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Replaces the signing secret; the new one is shown only in this answer.
/// Until `previous_secret_expires_at` (`events.webhook_secret_grace_seconds`
/// from now) deliveries carry both signatures, so the receiver can switch at
/// leisure; a secret from an earlier rotation stops signing now.
#[utoipa::path(post, path = "/api/kernel/subscriptions/{id}/rotate-secret", tag = "events", security(("bearer" = ["kernel.subscription.manage"])),
    responses((status = 200, body = RotatedSecret), (status = 400), (status = 401), (status = 403), (status = 404),
        (status = 409, description = "CONFLICT: rotated by another request at the same time")))]
pub async fn rotate_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::SUBSCRIPTION_MANAGE]).await?;
    let current = existing(&state, &caller, &id).await?;
    let master = state.master_keys().clone();
    let old = master
        .open(&current.secret, &store::secret_place(&current.id))
        .map_err(|e| {
            ApiError::internal(anyhow::anyhow!(
                "the subscription's secret does not open: {e}"
            ))
        })?;
    let secret = signature::new_secret();
    let sealed = master.seal(&secret, &store::secret_place(&current.id));
    let sealed_previous = master.seal(&old, &store::previous_secret_place(&current.id));
    let grace = std::time::Duration::from_secs(
        state
            .config_ref()
            .events
            .webhook
            .webhook_secret_grace_seconds,
    );
    let expires_at = crate::timestamp::format(crate::timestamp::now() + grace);
    let tenant_id = caller.tenant_id().to_owned();
    let shown_expiry = expires_at.clone();
    change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let row = store::rotate_secret(tx, &tenant_id, &current.id, &current.secret, &sealed, &sealed_previous, &expires_at)
                .await?
                .ok_or_else(|| ApiError::conflict("The secret was rotated by another request at the same time; rotate again."))?;
            c.audit(AuditEvent::new("subscription.secret_rotated").resource("subscription", &row.id)
                .details(serde_json::json!({ "previous_secret_expires_at": expires_at, "version": row.version })))
                .publish("kernel.subscription.secret_rotated");
            Ok(())
        })
    })
    .await?;
    Ok(no_store(Json(RotatedSecret {
        secret,
        previous_secret_expires_at: shown_expiry,
    })))
}

/// A subscription's deliveries, newest first, each with its attempts.
#[utoipa::path(get, path = "/api/kernel/subscriptions/{id}/deliveries", tag = "events", security(("bearer" = ["kernel.subscription.read"])),
    params(("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query),
        ("status" = Option<String>, Query, description = "pending, delivered, dead_letter or cancelled")),
    responses((status = 200, body = aibos_wire::Page<Delivery>), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn list_deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    page: ListQuery,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<aibos_wire::Page<Delivery>>> {
    caller.require(&state, &[perm::SUBSCRIPTION_READ]).await?;
    let mut status = None;
    for (key, value) in url_pairs(query.as_deref().unwrap_or(""))? {
        if key == "status" {
            if !["pending", "delivered", "dead_letter", "cancelled"].contains(&value.as_str()) {
                return Err(ApiError::invalid_field(
                    "status",
                    "must be pending, delivered, dead_letter or cancelled",
                ));
            }
            status = Some(value);
        }
    }
    let row = existing(&state, &caller, &id).await?;
    let deliveries = store::deliveries(
        state.db(),
        caller.tenant_id(),
        &row.id,
        &page.after,
        status.as_deref(),
        page.fetch(),
    )
    .await?;
    Ok(Json(page.page(deliveries, |d: &Delivery| d.id.clone())))
}

async fn retry(
    state: &AppState,
    caller: &Caller,
    subscription_id: String,
    delivery_id: String,
) -> ApiResult<Response> {
    let tenant_id = caller.tenant_id().to_owned();
    let (sid, did) = (subscription_id.clone(), delivery_id.clone());
    change::write(state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            match store::retry_delivery(tx, &tenant_id, &sid, &did).await? {
                RetryOutcome::Missing => Err(ApiError::not_found("No such delivery.")),
                RetryOutcome::Cancelled => Err(ApiError::conflict("A replay cancelled this delivery and sent its event again as a new one; retry that one.")),
                RetryOutcome::Scheduled => {
                    c.audit(AuditEvent::new("subscription.delivery_retried").resource("subscription", &sid)
                        .details(serde_json::json!({ "delivery_id": did })));
                    Ok(())
                }
            }
        })
    })
    .await?;
    state.webhooks().nudge();
    let delivery = store::delivery(
        state.db(),
        caller.tenant_id(),
        &subscription_id,
        &delivery_id,
    )
    .await?
    .ok_or_else(|| ApiError::not_found("No such delivery."))?;
    Ok((StatusCode::ACCEPTED, Json(delivery)).into_response())
}

/// Sends a delivery again now: a delivered or dead-lettered one beside the
/// ordered stream, with the retry schedule starting over; a pending one has
/// its next attempt brought forward.
#[utoipa::path(post, path = "/api/kernel/subscriptions/{id}/deliveries/{delivery_id}/retry", tag = "events",
    security(("bearer" = ["kernel.subscription.manage"])),
    responses((status = 202, body = Delivery), (status = 400), (status = 401), (status = 403), (status = 404),
        (status = 409, description = "CONFLICT: a replay cancelled this delivery")))]
pub async fn retry_delivery(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, delivery_id)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::SUBSCRIPTION_MANAGE]).await?;
    let subscription = existing(&state, &caller, &id).await?;
    let delivery_id = parse_id("delivery_id", &delivery_id)?;
    retry(&state, &caller, subscription.id, delivery_id).await
}

/// The same as `…/subscriptions/{id}/deliveries/{delivery_id}/retry`, by the
/// delivery's id alone (SPEC §7 writes it `POST …/deliveries/{id}/retry`).
#[utoipa::path(post, path = "/api/kernel/deliveries/{id}/retry", tag = "events",
    security(("bearer" = ["kernel.subscription.manage"])),
    responses((status = 202, body = Delivery), (status = 400), (status = 401), (status = 403), (status = 404),
        (status = 409, description = "CONFLICT: a replay cancelled this delivery")))]
pub async fn retry_delivery_by_id(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::SUBSCRIPTION_MANAGE]).await?;
    let delivery_id = parse_id("id", &id)?;
    let subscription_id =
        store::delivery_subscription(state.db(), caller.tenant_id(), &delivery_id)
            .await?
            .ok_or_else(|| ApiError::not_found("No such delivery."))?;
    retry(&state, &caller, subscription_id, delivery_id).await
}

/// `POST /api/kernel/subscriptions/{id}/replay` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Replay {
    /// The first event (by `seq`) to send again; later matching events follow
    /// in order. 0 or 1: from the tenant's first event.
    since_seq: i64,
}

/// Sends the subscription's matching events from `since_seq` on again, in
/// order, ahead of newer ones (its cursor moves back; never forward).
#[utoipa::path(post, path = "/api/kernel/subscriptions/{id}/replay", tag = "events", request_body = Replay,
    security(("bearer" = ["kernel.subscription.manage"])),
    responses((status = 202, body = Subscription), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn replay(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    AppJson(body): AppJson<Replay>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::SUBSCRIPTION_MANAGE]).await?;
    // 0 and 1 both mean "from the tenant's first event".
    if body.since_seq < 0 {
        return Err(ApiError::invalid_field("since_seq", "must be 0 or more"));
    }
    let current = existing(&state, &caller, &id).await?;
    let tenant_id = caller.tenant_id().to_owned();
    let since_seq = body.since_seq;
    let sid = current.id.clone();
    change::write(&state, caller.audit_context(), move |tx, c| {
        Box::pin(async move {
            let cursor = store::replay(tx, &tenant_id, &sid, since_seq)
                .await?
                .ok_or_else(missing)?;
            c.audit(
                AuditEvent::new("subscription.replayed")
                    .resource("subscription", &sid)
                    .details(
                        serde_json::json!({ "since_seq": since_seq, "delivered_seq": cursor }),
                    ),
            );
            Ok(())
        })
    })
    .await?;
    state.webhooks().nudge();
    let row = existing(&state, &caller, &current.id).await?;
    Ok((StatusCode::ACCEPTED, Json(row.view())).into_response())
}
