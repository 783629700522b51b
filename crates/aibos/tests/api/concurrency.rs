//! Optimistic concurrency (SPEC §3): `version`, `ETag`, `If-Match` → 412, and
//! `http.require_if_match` → 428 on updates sent without it.

use aibos_testkit::{KernelOptions, spawn_kernel_with};
use reqwest::Method;
use serde_json::json;

use crate::expect_problem;

fn requiring_if_match() -> KernelOptions {
    KernelOptions {
        env: vec![("AIBOS_HTTP__REQUIRE_IF_MATCH".into(), "true".into())],
        ..Default::default()
    }
}

crate::both_engines! {
    async fn updates_without_if_match_are_refused_when_the_kernel_requires_it(engine: Engine) {
        let kernel = spawn_kernel_with(engine, requiring_if_match()).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        let role = kernel.role(&admin, "readers", &["kernel.user.read"]).await;
        let user = kernel.user(&admin, "erin@acme.example").await;
        let role_path = format!("/api/kernel/roles/{role}");

        // Without If-Match: 428, and nothing changed.
        let r = kernel.as_(&admin, Method::PATCH, &role_path).json(&json!({"name": "renamed"})).send().await.unwrap();
        let problem = expect_problem(r, 428, "PRECONDITION_REQUIRED").await;
        assert!(problem["detail"].as_str().unwrap().contains("If-Match"), "{problem}");
        let r = kernel.as_(&admin, Method::GET, &role_path).send().await.unwrap();
        assert_eq!(r.headers()["etag"], "\"1\"");
        assert_eq!(r.json::<serde_json::Value>().await.unwrap()["name"], "readers");
        let r = kernel.as_(&admin, Method::DELETE, &role_path).send().await.unwrap();
        expect_problem(r, 428, "PRECONDITION_REQUIRED").await;
        let r = kernel.as_(&admin, Method::PATCH, &format!("/api/kernel/users/{user}")).json(&json!({"name": "Erin"})).send().await.unwrap();
        expect_problem(r, 428, "PRECONDITION_REQUIRED").await;

        // A stale one: 412; the current one: the update, and the next version.
        let r = kernel.as_(&admin, Method::PATCH, &role_path).header("if-match", "\"7\"").json(&json!({"name": "renamed"})).send().await.unwrap();
        expect_problem(r, 412, "PRECONDITION_FAILED").await;
        let r = kernel.as_(&admin, Method::PATCH, &role_path).header("if-match", "\"1\"").json(&json!({"name": "renamed"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["etag"], "\"2\"");
        let r = kernel.as_(&admin, Method::DELETE, &role_path).header("if-match", "\"1\"").send().await.unwrap();
        expect_problem(r, 412, "PRECONDITION_FAILED").await;
        let r = kernel.as_(&admin, Method::DELETE, &role_path).header("if-match", "\"2\"").send().await.unwrap();
        assert_eq!(r.status(), 204);

        // Reads and creations are not updates.
        assert_eq!(kernel.as_(&admin, Method::GET, "/api/kernel/roles").send().await.unwrap().status(), 200);
        kernel.role(&admin, "writers", &["kernel.user.read"]).await;
    }

    async fn if_match_is_optional_by_default_and_checked_when_sent(engine: Engine) {
        let kernel = spawn_kernel_with(engine, KernelOptions::default()).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        let role = kernel.role(&admin, "readers", &["kernel.user.read"]).await;
        let role_path = format!("/api/kernel/roles/{role}");
        let r = kernel.as_(&admin, Method::PATCH, &role_path).json(&json!({"name": "renamed"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["etag"], "\"2\"");
        let r = kernel.as_(&admin, Method::PATCH, &role_path).header("if-match", "\"1\"").json(&json!({"name": "again"})).send().await.unwrap();
        expect_problem(r, 412, "PRECONDITION_FAILED").await;
        let r = kernel.as_(&admin, Method::PATCH, &role_path).header("if-match", "not-an-etag").json(&json!({"name": "again"})).send().await.unwrap();
        expect_problem(r, 400, "VALIDATION_ERROR").await;
    }
}
