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

/// Adds to every operation the problem responses the middleware can produce
/// (400 for a bad correlation id, 413, 500), so clients see every code they may get.
pub fn add_common_problems(doc: &mut utoipa::openapi::OpenApi) {
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
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
