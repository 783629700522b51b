//! Kernel events: every change of users, roles, assignments, delegations,
//! break-glass, service accounts, tenants, canons and routes is published as
//! `kernel.<resource>.<past participle>` in the change's own transaction, into
//! the tenant whose audit chain records it; a refused change publishes nothing.

use aibos_testkit::api::{PASSWORD, Session};
use aibos_testkit::{TestKernel, spawn_kernel};
use reqwest::Method;
use serde_json::{Value, json};

use crate::expect_problem;

/// Reads the events of `session`'s tenant after `*position` and moves it past
/// them; asserts their `(type, subject)` are `expected`, in order.
async fn expect_events(
    kernel: &TestKernel,
    session: &Session,
    position: &mut i64,
    expected: &[(&str, &str)],
) -> Vec<Value> {
    let response = kernel
        .as_(
            session,
            Method::GET,
            &format!("/api/kernel/events?after_seq={position}&limit=1000"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let page: Value = response.json().await.unwrap();
    let events = page["items"].as_array().unwrap().clone();
    let got: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["subject"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(got, expected, "{page}");
    for event in &events {
        assert_eq!(event["source"], "kernel");
        assert_eq!(event["tenant_id"], session.tenant_id.as_str());
        assert_eq!(
            event["seq"].as_i64().unwrap(),
            *position + 1,
            "gap-free: {event}"
        );
        *position += 1;
    }
    events
}

async fn created(response: reqwest::Response) -> Value {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    body
}

fn id(body: &Value) -> String {
    body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("an id: {body}"))
        .to_owned()
}

fn in_one_day() -> String {
    let at = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

crate::both_engines! {
    async fn tenant_changes_are_published_in_their_tenant_and_refusals_publish_nothing(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let mut system = 0;
        // The offline administrator creation published too.
        expect_events(&kernel, &platform, &mut system, &[
            ("kernel.user.created", &platform.subject_id),
            ("kernel.role_assignment.created", &platform.subject_id),
            ("kernel.role_assignment.created", &platform.subject_id),
        ]).await;

        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        let mut acme = 0;
        let tenant = expect_events(&kernel, &platform, &mut system, &[("kernel.tenant.created", &admin.tenant_id)]).await;
        assert_eq!(tenant[0]["payload"], json!({"slug": "acme", "name": "acme"}));
        assert_eq!(tenant[0]["actor_type"], "user");
        assert_eq!(tenant[0]["actor_id"], platform.subject_id.as_str());
        // The tenant's administrator is a change of the tenant's own: its events are there.
        let made = expect_events(&kernel, &admin, &mut acme, &[
            ("kernel.user.created", &admin.subject_id),
            ("kernel.role_assignment.created", &admin.subject_id),
        ]).await;
        assert_eq!(made[0]["payload"]["email"], "admin@acme.example");
        assert_eq!(made[0]["actor_id"], platform.subject_id.as_str());

        // Users.
        let response = kernel.as_(&admin, Method::POST, "/api/kernel/users")
            .json(&json!({"email": "ivy@acme.example", "name": "Ivy", "password": PASSWORD})).send().await.unwrap();
        let correlation = response.headers()["x-correlation-id"].to_str().unwrap().to_owned();
        let ivy = id(&created(response).await);
        let events = expect_events(&kernel, &admin, &mut acme, &[("kernel.user.created", &ivy)]).await;
        assert_eq!(events[0]["payload"], json!({"email": "ivy@acme.example", "name": "Ivy"}));
        assert_eq!(events[0]["correlation_id"], correlation.as_str());
        assert_eq!(events[0]["actor_id"], admin.subject_id.as_str());
        assert_eq!(events[0]["version"], 1);
        // Refused: a taken email (409), a stale If-Match (412).
        let r = kernel.as_(&admin, Method::POST, "/api/kernel/users")
            .json(&json!({"email": "ivy@acme.example", "name": "Ivy", "password": PASSWORD})).send().await.unwrap();
        expect_problem(r, 409, "CONFLICT").await;
        let r = kernel.as_(&admin, Method::PATCH, &format!("/api/kernel/users/{ivy}")).header("if-match", "\"7\"")
            .json(&json!({"name": "Ivy B."})).send().await.unwrap();
        expect_problem(r, 412, "PRECONDITION_FAILED").await;
        expect_events(&kernel, &admin, &mut acme, &[]).await;
        let r = kernel.as_(&admin, Method::PATCH, &format!("/api/kernel/users/{ivy}")).json(&json!({"name": "Ivy B."})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = kernel.as_(&admin, Method::POST, &format!("/api/kernel/users/{ivy}/password")).json(&json!({"password": "a brand new passphrase"})).send().await.unwrap();
        assert_eq!(r.status(), 204);
        let events = expect_events(&kernel, &admin, &mut acme, &[("kernel.user.updated", &ivy), ("kernel.user.password_changed", &ivy)]).await;
        assert_eq!(events[0]["payload"]["name"], "Ivy B.");
        assert!(!events[1].to_string().contains("brand new passphrase"));

        // Roles and their assignments.
        let role = id(&created(kernel.as_(&admin, Method::POST, "/api/kernel/roles")
            .json(&json!({"name": "readers", "permissions": ["kernel.user.read"]})).send().await.unwrap()).await);
        kernel.assign(&admin, &ivy, &role).await;
        let r = kernel.as_(&admin, Method::PATCH, &format!("/api/kernel/roles/{role}")).header("if-match", "\"9\"")
            .json(&json!({"permissions": ["kernel.user.read", "kernel.role.read"]})).send().await.unwrap();
        expect_problem(r, 412, "PRECONDITION_FAILED").await;
        let r = kernel.as_(&admin, Method::POST, "/api/kernel/roles").json(&json!({"name": "readers", "permissions": []})).send().await.unwrap();
        expect_problem(r, 409, "CONFLICT").await;
        let r = kernel.as_(&admin, Method::PATCH, &format!("/api/kernel/roles/{role}"))
            .json(&json!({"permissions": ["kernel.user.read", "kernel.role.read"]})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let events = expect_events(&kernel, &admin, &mut acme, &[
            ("kernel.role.created", &role), ("kernel.role_assignment.created", &ivy), ("kernel.role.updated", &role),
        ]).await;
        assert_eq!(events[1]["payload"]["role_id"], role.as_str());
        assert_eq!(events[2]["payload"]["permissions"], json!(["kernel.role.read", "kernel.user.read"]));
        let r = kernel.as_(&admin, Method::DELETE, &format!("/api/kernel/users/{ivy}/roles/{role}")).send().await.unwrap();
        assert_eq!(r.status(), 204);
        let r = kernel.as_(&admin, Method::DELETE, &format!("/api/kernel/users/{ivy}/roles/{role}")).send().await.unwrap();
        expect_problem(r, 404, "NOT_FOUND").await;
        let r = kernel.as_(&admin, Method::DELETE, &format!("/api/kernel/roles/{role}")).send().await.unwrap();
        assert_eq!(r.status(), 204);
        expect_events(&kernel, &admin, &mut acme, &[("kernel.role_assignment.deleted", &ivy), ("kernel.role.deleted", &role)]).await;

        // Delegations and break-glass.
        let delegation = id(&created(kernel.as_(&admin, Method::POST, "/api/kernel/delegations")
            .json(&json!({"to_user_id": ivy, "permissions": ["kernel.user.read"], "expires_at": in_one_day(), "reason": "holiday cover"})).send().await.unwrap()).await);
        let r = kernel.as_(&admin, Method::DELETE, &format!("/api/kernel/delegations/{delegation}")).send().await.unwrap();
        assert_eq!(r.status(), 204);
        let glass = id(&created(kernel.as_(&admin, Method::POST, "/api/kernel/break-glass")
            .json(&json!({"permissions": ["kernel.audit.read"], "reason": "incident 9: ledger feed stalled", "duration_minutes": 10})).send().await.unwrap()).await);
        let r = kernel.as_(&admin, Method::DELETE, &format!("/api/kernel/break-glass/{glass}")).send().await.unwrap();
        assert_eq!(r.status(), 204);
        let events = expect_events(&kernel, &admin, &mut acme, &[
            ("kernel.delegation.created", &delegation), ("kernel.delegation.revoked", &delegation),
            ("kernel.breakglass.activated", &glass), ("kernel.security.breakglass_activated", &glass), ("kernel.breakglass.ended", &glass),
        ]).await;
        assert_eq!(events[0]["payload"]["to_user_id"], ivy.as_str());
        assert_eq!(events[2]["payload"]["permissions"], json!(["kernel.audit.read"]));

        // Service accounts: never their secret, in no event.
        let publisher = kernel.role(&admin, "publisher", &["kernel.event.publish"]).await;
        let account = created(kernel.as_(&admin, Method::POST, "/api/kernel/service-accounts")
            .json(&json!({"name": "payment-hub", "role_ids": [publisher]})).send().await.unwrap()).await;
        let account_id = id(&account);
        let rotated: Value = kernel.as_(&admin, Method::POST, &format!("/api/kernel/service-accounts/{account_id}/secret")).send().await.unwrap().json().await.unwrap();
        let r = kernel.as_(&admin, Method::PATCH, &format!("/api/kernel/service-accounts/{account_id}")).json(&json!({"status": "suspended"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let events = expect_events(&kernel, &admin, &mut acme, &[
            ("kernel.role.created", &publisher),
            ("kernel.service_account.created", &account_id), ("kernel.role_assignment.created", &account_id),
            ("kernel.service_account.secret_rotated", &account_id), ("kernel.service_account.suspended", &account_id),
        ]).await;
        assert_eq!(events[1]["payload"]["client_id"], account["client_id"]);
        let text = Value::Array(events).to_string();
        for secret in [&account["client_secret"], &rotated["client_secret"]] {
            assert!(!text.contains(secret.as_str().unwrap()), "a secret in an event: {text}");
        }

        // Suspending the tenant is a platform change: published in the system tenant.
        let r = kernel.as_(&platform, Method::PATCH, &format!("/api/kernel/tenants/{}", admin.tenant_id)).header("if-match", "\"5\"").json(&json!({"status": "suspended"})).send().await.unwrap();
        expect_problem(r, 412, "PRECONDITION_FAILED").await;
        let r = kernel.as_(&platform, Method::PATCH, &format!("/api/kernel/tenants/{}", admin.tenant_id)).json(&json!({"status": "suspended"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let events = expect_events(&kernel, &platform, &mut system, &[("kernel.tenant.suspended", &admin.tenant_id)]).await;
        assert_eq!(events[0]["payload"]["status"], "suspended");

    }

    async fn registry_changes_are_published_in_the_system_tenant(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let mut system = 0;
        expect_events(&kernel, &platform, &mut system, &[
            ("kernel.user.created", &platform.subject_id),
            ("kernel.role_assignment.created", &platform.subject_id),
            ("kernel.role_assignment.created", &platform.subject_id),
        ]).await;

        let canon = created(kernel.as_(&platform, Method::POST, "/api/kernel/canons")
            .json(&json!({"name": "ledger", "base_url": "http://127.0.0.1:9", "permissions": [{"name": "ledger.entry.read", "description": "read"}]})).send().await.unwrap()).await;
        let canon_id = id(&canon);
        let first_secret = canon["assertion_secret"]["secret"].as_str().unwrap().to_owned();
        // Refused: a taken name (409), a stale If-Match (412).
        let r = kernel.as_(&platform, Method::POST, "/api/kernel/canons").json(&json!({"name": "ledger", "base_url": "http://127.0.0.1:9"})).send().await.unwrap();
        expect_problem(r, 409, "CONFLICT").await;
        let r = kernel.as_(&platform, Method::PATCH, &format!("/api/kernel/canons/{canon_id}")).header("if-match", "\"4\"").json(&json!({"timeout_ms": 2000})).send().await.unwrap();
        expect_problem(r, 412, "PRECONDITION_FAILED").await;
        let r = kernel.as_(&platform, Method::PATCH, &format!("/api/kernel/canons/{canon_id}")).json(&json!({"timeout_ms": 2000})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let events = expect_events(&kernel, &platform, &mut system, &[("kernel.canon.created", &canon_id), ("kernel.canon.updated", &canon_id)]).await;
        assert_eq!(events[0]["payload"]["name"], "ledger");
        assert_eq!(events[1]["payload"]["timeout_ms"], 2000);

        // Assertion secrets: rotated in three steps, never shown in an event.
        let secret = created(kernel.as_(&platform, Method::POST, &format!("/api/kernel/canons/{canon_id}/assertion-secrets")).send().await.unwrap()).await;
        let kid = secret["kid"].as_str().unwrap().to_owned();
        let old_kid = canon["assertion_secret"]["kid"].as_str().unwrap().to_owned();
        let r = kernel.as_(&platform, Method::POST, &format!("/api/kernel/canons/{canon_id}/assertion-secrets/{kid}/activate")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = kernel.as_(&platform, Method::DELETE, &format!("/api/kernel/canons/{canon_id}/assertion-secrets/{kid}")).send().await.unwrap();
        expect_problem(r, 409, "CONFLICT").await;
        let r = kernel.as_(&platform, Method::DELETE, &format!("/api/kernel/canons/{canon_id}/assertion-secrets/{old_kid}")).send().await.unwrap();
        assert_eq!(r.status(), 204);
        let events = expect_events(&kernel, &platform, &mut system, &[
            ("kernel.canon.secret_created", &canon_id), ("kernel.canon.secret_activated", &canon_id), ("kernel.canon.secret_deleted", &canon_id),
        ]).await;
        assert_eq!(events[1]["payload"]["kid"], kid.as_str());
        let text = Value::Array(events).to_string();
        for shown in [first_secret.as_str(), secret["secret"].as_str().unwrap()] {
            assert!(!text.contains(shown), "a secret in an event: {text}");
        }

        // Routes.
        let route = kernel.route(&platform, &canon_id, "GET", "/entries/{id}", &["ledger.entry.read"], json!({})).await;
        let r = kernel.as_(&platform, Method::PATCH, &format!("/api/kernel/routes/{route}")).header("if-match", "\"3\"").json(&json!({"timeout_ms": 500})).send().await.unwrap();
        expect_problem(r, 412, "PRECONDITION_FAILED").await;
        let r = kernel.as_(&platform, Method::DELETE, &format!("/api/kernel/canons/{canon_id}")).send().await.unwrap();
        expect_problem(r, 409, "CONFLICT").await;
        let r = kernel.as_(&platform, Method::PATCH, &format!("/api/kernel/routes/{route}")).json(&json!({"timeout_ms": 500})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = kernel.as_(&platform, Method::DELETE, &format!("/api/kernel/routes/{route}")).send().await.unwrap();
        assert_eq!(r.status(), 204);
        let r = kernel.as_(&platform, Method::DELETE, &format!("/api/kernel/canons/{canon_id}")).send().await.unwrap();
        assert_eq!(r.status(), 204);
        let events = expect_events(&kernel, &platform, &mut system, &[
            ("kernel.route.created", &route), ("kernel.route.updated", &route), ("kernel.route.deleted", &route), ("kernel.canon.deleted", &canon_id),
        ]).await;
        assert_eq!(events[0]["payload"]["path"], "/entries/{id}");
        assert_eq!(events[1]["payload"]["timeout_ms"], 500);
    }
}
