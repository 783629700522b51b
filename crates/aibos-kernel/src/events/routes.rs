//! `POST /api/kernel/events/publish`, `GET /api/kernel/events`,
//! `GET /api/kernel/events/{id}` and `GET /api/kernel/events/stream`.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::publisher::PublishError;
use super::{Event, NewEvent, TypeFilter, check_type, store};
use crate::authz::{Caller, perm};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{AppJson, parse_id, url_pairs};
use crate::limits;
use crate::state::AppState;
use aibos_wire::ErrorCode;

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(publish))
        .routes(routes!(list_events))
        .routes(routes!(stream))
        .routes(routes!(get_event))
}

/// `POST /api/kernel/events/publish`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    /// Dotted, lower-case, at most 128 characters, e.g. `finance.payment.processed`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// A JSON object of at most 256 KiB, stored and delivered byte for byte.
    #[schema(value_type = Object)]
    pub payload: Box<RawValue>,
    /// The payload's schema version (default 1).
    pub version: Option<i32>,
    /// What the event is about (a resource id), at most 256 characters.
    pub subject: Option<String>,
    /// Optional; must be the caller's own tenant (the tenant comes from the token).
    pub tenant_id: Option<String>,
}

/// Where a published event landed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Published {
    /// The event's id.
    pub id: String,
    /// Its place in the tenant's sequence.
    pub seq: i64,
}

/// Stores an event durably in the caller's tenant and answers with its place.
#[utoipa::path(post, path = "/api/kernel/events/publish", tag = "events", security(("bearer" = ["kernel.event.publish"])),
    request_body = PublishBody,
    responses((status = 201, body = Published), (status = 400), (status = 401), (status = 403), (status = 413), (status = 415), (status = 503)))]
pub async fn publish(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<PublishBody>,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::EVENT_PUBLISH]).await?;
    caller
        .refuse_foreign_tenant(&state, body.tenant_id.as_deref())
        .await?;
    check_type(&body.event_type).map_err(|m| ApiError::invalid_field("type", m))?;
    let version = body.version.unwrap_or(1);
    if !(1..=limits::EVENT_VERSION_MAX).contains(&version) {
        return Err(ApiError::invalid_field(
            "version",
            format!("must be 1 to {}", limits::EVENT_VERSION_MAX),
        ));
    }
    if let Some(subject) = &body.subject
        && (subject.is_empty() || subject.chars().count() > limits::EVENT_SUBJECT_CHARS_MAX)
    {
        return Err(ApiError::invalid_field(
            "subject",
            format!(
                "must be 1 to {} characters",
                limits::EVENT_SUBJECT_CHARS_MAX
            ),
        ));
    }
    let payload = body.payload.get();
    if !payload.starts_with('{') {
        return Err(ApiError::invalid_field("payload", "must be a JSON object"));
    }
    if payload.len() > limits::EVENT_PAYLOAD_BYTES_MAX {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "The payload is {} bytes; at most {} are accepted.",
                payload.len(),
                limits::EVENT_PAYLOAD_BYTES_MAX
            ),
        ));
    }
    let principal = &caller.principal;
    let event = NewEvent {
        event_type: body.event_type,
        version,
        source: match principal.actor_type {
            "service" => principal.name.clone(),
            other => other.to_owned(),
        },
        subject: body.subject,
        actor_type: principal.actor_type.to_owned(),
        actor_id: Some(principal.subject_id.clone()),
        correlation_id: Some(caller.correlation_id.clone()),
        payload: payload.to_owned(),
    };
    let appended = state
        .events()
        .publisher()
        .publish(principal.tenant_id.clone(), event)
        .await
        .map_err(|e| match e {
            PublishError::Overloaded => ApiError::new(
                ErrorCode::ServiceUnavailable,
                "Too many events are waiting to be written; retry shortly.",
            )
            .with_header(
                header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            ),
            PublishError::Stopped => {
                ApiError::new(ErrorCode::ServiceUnavailable, "The kernel is stopping.")
            }
            PublishError::Failed(cause) => ApiError::unavailable(anyhow::anyhow!("{cause}")),
        })?;
    Ok((
        StatusCode::CREATED,
        Json(Published {
            id: appended.id,
            seq: appended.seq,
        }),
    )
        .into_response())
}

/// One event of the caller's tenant.
#[utoipa::path(get, path = "/api/kernel/events/{id}", tag = "events", security(("bearer" = ["kernel.event.read"])),
    params(("id" = String, Path)),
    responses((status = 200, body = Event), (status = 400), (status = 401), (status = 403), (status = 404)))]
pub async fn get_event(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Event>> {
    caller.require(&state, &[perm::EVENT_READ]).await?;
    let id = parse_id("id", &id)?;
    store::get(state.db(), caller.tenant_id(), &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("No such event."))
}

/// A page of events read from a position.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    /// The events after `after_seq` that pass `types`, in `seq` order.
    pub items: Vec<Event>,
    /// Where to read from next (`after_seq`): the last `seq` this read looked
    /// at, including events `types` left out. Keep it even when `items` is empty.
    pub next_after_seq: i64,
    /// Whether more events were already there after `next_after_seq`.
    pub has_more: bool,
    /// `next_after_seq` as the list cursor of SPEC §3, or null when nothing more was there.
    pub next_cursor: Option<String>,
}

/// What a reader asks for: a position, types, a page size.
struct ReadQuery {
    after_seq: i64,
    filter: TypeFilter,
    limit: u32,
}

fn read_query(query: &str, default_limit: u32) -> ApiResult<ReadQuery> {
    let mut read = ReadQuery {
        after_seq: 0,
        filter: TypeFilter::default(),
        limit: default_limit,
    };
    for (key, value) in url_pairs(query)? {
        match key.as_str() {
            "after_seq" | "cursor" => {
                read.after_seq =
                    value
                        .parse::<i64>()
                        .ok()
                        .filter(|n| *n >= 0)
                        .ok_or_else(|| {
                            ApiError::invalid_field(key.clone(), "must be a whole number ≥ 0")
                        })?;
            }
            "types" => {
                read.filter = TypeFilter::parse(value.split(',').filter(|t| !t.trim().is_empty()))
                    .map_err(|m| ApiError::invalid_field("types", m))?;
            }
            "limit" => {
                read.limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=limits::LIST_LIMIT_MAX).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid_field(
                            "limit",
                            format!("must be 1 to {}", limits::LIST_LIMIT_MAX),
                        )
                    })?;
            }
            _ => {}
        }
    }
    Ok(read)
}

/// The caller's tenant's events after `after_seq`, in `seq` order. A consumer
/// that reads from its last `next_after_seq` never misses an event and never
/// sees one twice, however publishers' transactions commit.
#[utoipa::path(get, path = "/api/kernel/events", tag = "events", security(("bearer" = ["kernel.event.read"])),
    params(("after_seq" = Option<i64>, Query, description = "Read events with a larger seq (default 0)"),
           ("types" = Option<String>, Query, description = "Comma-separated event types, each exact or `prefix.*`"),
           ("limit" = Option<u32>, Query, description = "At most this many events (default 50, at most 1000)")),
    responses((status = 200, body = EventPage), (status = 400), (status = 401), (status = 403)))]
pub async fn list_events(
    State(state): State<AppState>,
    caller: Caller,
    uri: axum::http::Uri,
) -> ApiResult<Json<EventPage>> {
    caller.require(&state, &[perm::EVENT_READ]).await?;
    let read = read_query(uri.query().unwrap_or(""), limits::LIST_LIMIT_DEFAULT)?;
    let batch = store::read_after(
        state.db(),
        caller.tenant_id(),
        read.after_seq,
        &read.filter,
        read.limit,
    )
    .await?;
    Ok(Json(EventPage {
        items: batch.events,
        next_after_seq: batch.scanned_to,
        has_more: batch.more,
        next_cursor: batch.more.then(|| batch.scanned_to.to_string()),
    }))
}

/// Server-Sent Events of the caller's tenant: each event as `id: <seq>`,
/// `event: <type>`, `data: <envelope>`. Resumes after `Last-Event-ID` (or
/// `after_seq`); comments keep the connection alive. A reader that leaves its
/// buffer full for too long gets a final `event: lagged` and the stream ends,
/// so it reconnects with `Last-Event-ID` instead of holding the kernel's memory.
#[utoipa::path(get, path = "/api/kernel/events/stream", tag = "events", security(("bearer" = ["kernel.event.read"])),
    params(("after_seq" = Option<i64>, Query, description = "Start after this seq; `Last-Event-ID` wins"),
           ("types" = Option<String>, Query, description = "Comma-separated event types, each exact or `prefix.*`"),
           ("Last-Event-ID" = Option<i64>, Header, description = "The last seq received")),
    responses((status = 200, description = "A `text/event-stream` of events", content_type = "text/event-stream"),
              (status = 400), (status = 401), (status = 403), (status = 503)))]
pub async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> ApiResult<Response> {
    caller.require(&state, &[perm::EVENT_READ]).await?;
    let mut read = read_query(uri.query().unwrap_or(""), limits::SSE_PAGE_EVENTS)?;
    if let Some(last) = headers.get("last-event-id") {
        read.after_seq = last
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                ApiError::invalid_field("Last-Event-ID", "must be a seq this stream sent")
            })?;
    }
    let permit = state.events().stream_permit().ok_or_else(|| {
        ApiError::new(
            ErrorCode::ServiceUnavailable,
            "Too many event streams are open on this kernel; retry shortly.",
        )
        .with_header(
            header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("5"),
        )
    })?;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' ').map(|(_, t)| t.trim().to_owned()))
        .unwrap_or_default();
    let (events, received) = mpsc::channel(limits::SSE_BUFFER_EVENTS);
    let (lagged, lag_notice) = oneshot::channel();
    let tenant_id = caller.tenant_id().to_owned();
    tokio::spawn(async move {
        let _permit = permit;
        feed(state, token, tenant_id, read, events, lagged).await;
    });
    let body = futures_util::stream::unfold(
        (received, Some(lag_notice)),
        |(mut received, mut notice)| async move {
            match received.recv().await {
                Some(event) => Some((Ok::<_, Infallible>(event), (received, notice))),
                // The feeder stopped: say why if it was the reader's slowness.
                None => match notice.take()?.await {
                    Ok(event) => Some((Ok(event), (received, None))),
                    Err(_) => None,
                },
            }
        },
    );
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(limits::SSE_KEEP_ALIVE_SECONDS)))
        .into_response())
}

/// Reads the tenant's events from the position into the connection's buffer
/// until the reader goes away, its access ends, or it falls behind.
async fn feed(
    state: AppState,
    token: String,
    tenant_id: String,
    read: ReadQuery,
    events: mpsc::Sender<sse::Event>,
    lagged: oneshot::Sender<sse::Event>,
) {
    let bus = state.events();
    let mut commits = bus.watch();
    let stopping = bus.stopping();
    let mut position = read.after_seq;
    loop {
        // The token is checked again at every page: a stream ends when its
        // session is revoked, its token expires or its permission is taken away.
        match state.authenticate(token.as_bytes(), None).await {
            Ok(p) if !p.tenant_suspended && p.permissions.contains(perm::EVENT_READ) => {}
            _ => return,
        }
        let batch =
            match store::read_after(state.db(), &tenant_id, position, &read.filter, read.limit)
                .await
            {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(error = %e, "event stream could not read; closing it");
                    return;
                }
            };
        for event in batch.events {
            let seq = event.seq;
            let Ok(data) = serde_json::to_string(&event) else {
                return;
            };
            let message = sse::Event::default()
                .id(seq.to_string())
                .event(event.event_type.as_str())
                .data(data);
            match tokio::time::timeout(
                Duration::from_secs(limits::SSE_SLOW_READER_SECONDS),
                events.send(message),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return, // the reader hung up
                Err(_) => {
                    let notice = sse::Event::default().event("lagged").data(
                        serde_json::json!({
                            "detail": "This reader fell behind; reconnect with Last-Event-ID to resume.",
                            "last_event_id": position,
                        })
                        .to_string(),
                    );
                    let _ = lagged.send(notice);
                    return;
                }
            }
            position = seq;
        }
        position = position.max(batch.scanned_to);
        if batch.more {
            continue;
        }
        tokio::select! {
            () = super::wait_for_commit(&mut commits, Duration::from_millis(limits::EVENT_POLL_MS)) => {}
            () = events.closed() => return,
            () = stopping.cancelled() => return,
        }
    }
}
