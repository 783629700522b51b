//! The OpenAPI 3.1 document, generated from the handlers' annotations.

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};

use aibos_wire::{ErrorCode, FieldError, Problem};

use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "AI-BOS Kernel",
        description = "Control plane for multi-tenant finance services. Every error is an RFC 9457 \
                       application/problem+json body whose `code` is one of the ErrorCode values.",
    ),
    components(schemas(Problem, FieldError, ErrorCode)),
    tags(
        (name = "health", description = "Liveness, readiness and metrics."),
    )
)]
struct ApiDoc;

/// The document's fixed part: info, shared schemas and the problem responses
/// every endpoint may answer (listed with their codes).
pub fn base_document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    let problem = |description: String| {
        ResponseBuilder::new()
            .description(description)
            .content(
                aibos_wire::error::PROBLEM_CONTENT_TYPE,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build()
    };
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        utoipa::openapi::security::SecurityScheme::Http(
            utoipa::openapi::security::HttpBuilder::new()
                .scheme(utoipa::openapi::security::HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .description(Some("An access token from POST /api/kernel/auth/login or /api/kernel/auth/token. The scopes listed on each operation are the permissions it requires."))
                .build(),
        ),
    );
    for (name, codes) in [
        ("BadRequest", [ErrorCode::ValidationError].as_slice()),
        ("PayloadTooLarge", &[ErrorCode::PayloadTooLarge]),
        ("UnsupportedMediaType", &[ErrorCode::UnsupportedMediaType]),
        ("NotFound", &[ErrorCode::NotFound]),
        ("RateLimited", &[ErrorCode::RateLimited]),
        (
            "InternalError",
            &[ErrorCode::InternalError, ErrorCode::ServiceUnavailable],
        ),
    ] {
        let list: Vec<&str> = codes.iter().map(|c| c.as_str()).collect();
        components.responses.insert(
            name.to_owned(),
            problem(format!("Problem with code {}.", list.join(" or "))).into(),
        );
    }
    doc
}

/// What a response of `status` means, for one the handler's annotation left
/// without a description (OpenAPI 3.1 requires one): for an error, the problem
/// codes answered with that status.
fn description_of(status: &str) -> String {
    let Ok(status) = status.parse::<u16>() else {
        return "Any other answer.".to_owned();
    };
    if status >= 400 {
        let codes: Vec<&str> = ErrorCode::ALL
            .iter()
            .filter(|c| c.status() == status)
            .map(|c| c.as_str())
            .collect();
        if !codes.is_empty() {
            return format!("Problem with code {}.", codes.join(" or "));
        }
        return format!("Problem (HTTP {status}).");
    }
    match status {
        200 => "Success.".to_owned(),
        201 => "Created.".to_owned(),
        202 => "Accepted.".to_owned(),
        204 => "Done; no body.".to_owned(),
        _ => format!("HTTP {status}."),
    }
}

/// Gives every response the description OpenAPI 3.1 requires, and every
/// error response without content the problem body it is answered with.
fn describe_responses(op: &mut utoipa::openapi::path::Operation) {
    for (status, response) in op.responses.responses.iter_mut() {
        let utoipa::openapi::RefOr::T(response) = response else {
            continue;
        };
        if response.description.trim().is_empty() {
            response.description = description_of(status);
        }
        let is_error = status.parse::<u16>().is_ok_and(|s| s >= 400);
        if is_error && response.content.is_empty() {
            response.content.insert(
                aibos_wire::error::PROBLEM_CONTENT_TYPE.to_owned(),
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build()
                    .into(),
            );
        }
    }
}

/// Adds to every operation the problem responses the middleware can produce
/// (400 for a bad correlation id, 413, 500), so clients see every code they
/// may get, and describes every response (see [`describe_responses`]).
pub fn add_common_problems(doc: &mut utoipa::openapi::OpenApi) {
    let mut seen_ids = std::collections::HashMap::<String, usize>::new();
    for (path, item) in doc.paths.paths.iter_mut() {
        // Rate limits (ratelimit/) apply to every path but the probes and the scrape.
        let limited = !crate::ratelimit::is_exempt(path);
        describe_idempotency(path, item);
        for (method, op) in [
            ("get", &mut item.get),
            ("put", &mut item.put),
            ("post", &mut item.post),
            ("delete", &mut item.delete),
            ("options", &mut item.options),
            ("head", &mut item.head),
            ("patch", &mut item.patch),
            ("trace", &mut item.trace),
        ] {
            let Some(op) = op else { continue };
            for (status, name) in [
                ("400", "BadRequest"),
                ("413", "PayloadTooLarge"),
                ("500", "InternalError"),
            ] {
                op.responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| Ref::from_response_name(name).into());
            }
            if limited {
                op.responses
                    .responses
                    .entry("429".to_owned())
                    .or_insert_with(|| Ref::from_response_name("RateLimited").into());
            }
            describe_responses(op);
            // One handler serving several methods (the gateway's) is one
            // operation per method, and operation ids must be unique.
            if let Some(id) = &mut op.operation_id {
                let n = seen_ids.entry(id.clone()).or_default();
                *n += 1;
                if *n > 1 {
                    *id = format!("{id}_{method}");
                }
            }
        }
    }
}

/// `Idempotency-Key` on every kernel mutation that honours it
/// (`idempotency::kernel`), with the answers it adds.
fn describe_idempotency(path: &str, item: &mut utoipa::openapi::PathItem) {
    use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
    if !path.starts_with("/api/kernel/")
        || crate::idempotency::kernel::BODY_CREDENTIAL_PATHS.contains(&path)
    {
        return;
    }
    for op in [
        &mut item.post,
        &mut item.put,
        &mut item.patch,
        &mut item.delete,
    ]
    .into_iter()
    .flatten()
    {
        op.parameters.get_or_insert_with(Vec::new).push(
            ParameterBuilder::new()
                .name("Idempotency-Key")
                .parameter_in(ParameterIn::Header)
                .description(Some("1–255 printable ASCII characters: the request runs once per key and tenant; a repeat gets the stored response with `Idempotent-Replayed: true` (docs/idempotency.md)."))
                .schema(Some(utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::String).min_length(Some(1)).max_length(Some(255))))
                .build()
                .into(),
        );
        for status in ["409", "422"] {
            let response = op
                .responses
                .responses
                .entry(status.to_owned())
                .or_insert_with(|| ResponseBuilder::new().build().into());
            if let utoipa::openapi::RefOr::T(response) = response
                && !response.description.trim().is_empty()
                && status == "409"
            {
                response
                    .description
                    .push_str(" Or IDEMPOTENCY_IN_FLIGHT: the request with this Idempotency-Key is still executing (with Retry-After).");
            }
        }
    }
}

/// This document, as JSON.
#[utoipa::path(get, path = "/api/openapi.json", tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document of every endpoint.", content_type = "application/json")))]
pub async fn serve(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        state.openapi_json().to_string(),
    )
        .into_response()
}
