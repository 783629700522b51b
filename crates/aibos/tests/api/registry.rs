//! The service registry: canons, assertion secrets, routes — validation,
//! optimistic concurrency, audit, and who may manage them.

use aibos_testkit::spawn_kernel;
use reqwest::Method;
use serde_json::{Value, json};

use crate::{both_engines, expect_problem};

both_engines! {
    async fn canons_are_created_validated_changed_and_audited(engine: Engine) {
        let Some(k) = spawn_kernel(engine).await else { return };
        let root = k.platform_admin().await;
        let create = |body: Value| k.as_(&root, Method::POST, "/api/kernel/canons").json(&body).send();

        let response = create(json!({
            "name": "payments", "base_url": "http://127.0.0.1:9/", "timeout_ms": 2500,
            "permissions": [{ "name": "finance.payment.execute", "description": "Execute payments" }]
        })).await.unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(response.headers()["etag"], "\"1\"");
        assert_eq!(response.headers()["cache-control"], "no-store");
        let created: Value = response.json().await.unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        assert_eq!(created["base_url"], "http://127.0.0.1:9", "{created}");
        assert_eq!(created["health_path"], "/health");
        // Nothing listens on port 9: not checked yet, or already found unhealthy.
        assert!(created["status"] == "unknown" || created["status"] == "unhealthy", "{created}");
        assert_eq!(created["circuit"], "closed");
        let secret = created["assertion_secret"]["secret"].as_str().unwrap();
        let kid = created["assertion_secret"]["kid"].as_str().unwrap();
        assert_eq!(aibos_wire::assertion::secret_kid(secret), Some(kid));

        // The secret is shown once: never in reads, lists or the audit trail.
        let read = k.as_(&root, Method::GET, &format!("/api/kernel/canons/{id}")).send().await.unwrap();
        assert_eq!(read.headers()["etag"], "\"1\"");
        let text = read.text().await.unwrap();
        assert!(!text.contains(secret), "{text}");
        let secrets: Value = k.as_(&root, Method::GET, &format!("/api/kernel/canons/{id}/assertion-secrets")).send().await.unwrap().json().await.unwrap();
        assert_eq!(secrets, json!([{ "kid": kid, "state": "active", "created_at": secrets[0]["created_at"], "activated_at": secrets[0]["activated_at"] }]));
        let entries = k.audit(&root, "action=canon.created").await;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["resource_id"], id.as_str());
        assert!(!entries[0].to_string().contains(secret));

        // Its permission joined the registry and can be granted.
        let permissions: Value = k.as_(&root, Method::GET, "/api/kernel/permissions").send().await.unwrap().json().await.unwrap();
        let owned = permissions.as_array().unwrap().iter().find(|p| p["name"] == "finance.payment.execute").cloned();
        assert_eq!(owned.map(|p| p["owner"].clone()), Some(json!("payments")));
        let tenant_admin = k.tenant_with_admin(&root, "acme").await;
        k.role(&tenant_admin, "payers", &["finance.payment.execute"]).await;

        // Validation: every field names itself.
        for (body, field) in [
            (json!({ "name": "Bad Name", "base_url": "http://x" }), "name"),
            (json!({ "name": "x1", "base_url": "ftp://x" }), "base_url"),
            (json!({ "name": "x2", "base_url": "http://u:p@x" }), "base_url"),
            (json!({ "name": "x3", "base_url": "http://x/#f" }), "base_url"),
            (json!({ "name": "x4", "base_url": "http://x", "health_path": "../x" }), "health_path"),
            (json!({ "name": "x5", "base_url": "http://x", "timeout_ms": 0 }), "timeout_ms"),
            (json!({ "name": "x6", "base_url": "http://x", "permissions": [{ "name": "kernel.user.read", "description": "mine" }] }), "permissions"),
        ] {
            let problem = expect_problem(create(body.clone()).await.unwrap(), 400, "VALIDATION_ERROR").await;
            assert_eq!(problem["errors"][0]["field"], field, "{body} → {problem}");
        }
        expect_problem(create(json!({ "name": "x7", "base_url": 5 })).await.unwrap(), 400, "VALIDATION_ERROR").await;
        expect_problem(create(json!({ "name": "payments", "base_url": "http://x" })).await.unwrap(), 409, "CONFLICT").await;
        expect_problem(
            create(json!({ "name": "thief", "base_url": "http://x", "permissions": [{ "name": "finance.payment.execute", "description": "mine now" }] })).await.unwrap(),
            409, "CONFLICT",
        ).await;

        // Optimistic concurrency.
        let patch = |etag: &str, body: Value| k.as_(&root, Method::PATCH, &format!("/api/kernel/canons/{id}")).header("if-match", etag).json(&body).send();
        let changed = patch("\"1\"", json!({ "base_url": "http://127.0.0.1:10", "timeout_ms": null })).await.unwrap();
        assert_eq!(changed.status(), 200);
        assert_eq!(changed.headers()["etag"], "\"2\"");
        let changed: Value = changed.json().await.unwrap();
        assert_eq!(changed["timeout_ms"], Value::Null);
        assert_eq!(changed["base_url"], "http://127.0.0.1:10");
        expect_problem(patch("\"1\"", json!({ "health_path": "/ready" })).await.unwrap(), 412, "PRECONDITION_FAILED").await;
        expect_problem(patch("\"2\"", json!({ "name": "renamed" })).await.unwrap(), 400, "VALIDATION_ERROR").await;
        assert_eq!(k.audit(&root, "action=canon.updated").await.len(), 1);

        // A canon with routes cannot be deleted; without, it can, and its permissions go.
        let route = k.route(&root, &id, "GET", "/payments/{id}", &["finance.payment.execute"], json!({})).await;
        expect_problem(k.as_(&root, Method::DELETE, &format!("/api/kernel/canons/{id}")).send().await.unwrap(), 409, "CONFLICT").await;
        assert_eq!(k.as_(&root, Method::DELETE, &format!("/api/kernel/routes/{route}")).send().await.unwrap().status(), 204);
        assert_eq!(k.as_(&root, Method::DELETE, &format!("/api/kernel/canons/{id}")).send().await.unwrap().status(), 204);
        let permissions: Value = k.as_(&root, Method::GET, "/api/kernel/permissions").send().await.unwrap().json().await.unwrap();
        assert!(!permissions.to_string().contains("finance.payment.execute"));
        expect_problem(k.as_(&root, Method::GET, &format!("/api/kernel/canons/{id}")).send().await.unwrap(), 404, "NOT_FOUND").await;
        expect_problem(k.as_(&root, Method::GET, "/api/kernel/canons/not-a-uuid").send().await.unwrap(), 400, "VALIDATION_ERROR").await;
        assert_eq!(k.audit(&root, "action=canon.deleted").await.len(), 1);
        assert_eq!(k.audit(&root, "action=route.deleted").await.len(), 1);
    }

    async fn routes_are_validated_unique_per_shape_and_audited(engine: Engine) {
        let Some(k) = spawn_kernel(engine).await else { return };
        let root = k.platform_admin().await;
        let (canon, _) = k.canon(&root, "ledger", "http://127.0.0.1:9", &["finance.ledger.read"]).await;
        let create = |body: Value| k.as_(&root, Method::POST, "/api/kernel/routes").json(&body).send();
        let response = create(json!({
            "canon_id": canon, "method": "get", "path": "/entries/{entry_id}",
            "required_permissions": ["finance.ledger.read"], "timeout_ms": 1000,
            "rate_limit": { "per_minute": 60 }, "idempotency": "optional"
        })).await.unwrap();
        assert_eq!(response.status(), 201);
        let route: Value = response.json().await.unwrap();
        assert_eq!(route["method"], "GET");
        assert_eq!(route["forward_cookies"], false);
        assert_eq!(route["public_to_authenticated"], false);
        assert_eq!(route["rate_limit"], json!({ "per_minute": 60, "burst": null }));
        let id = route["id"].as_str().unwrap().to_owned();

        for (body, field) in [
            (json!({ "canon_id": canon, "method": "TRACE", "path": "/x" }), "method"),
            (json!({ "canon_id": canon, "method": "GET", "path": "/a/../b" }), "path"),
            (json!({ "canon_id": canon, "method": "GET", "path": "/a/%2e%2e" }), "path"),
            (json!({ "canon_id": canon, "method": "GET", "path": "no-slash" }), "path"),
            (json!({ "canon_id": canon, "method": "GET", "path": "/x", "required_permissions": ["finance.nothing.here"] }), "required_permissions"),
            (json!({ "canon_id": canon, "method": "GET", "path": "/x", "idempotency": "always" }), "idempotency"),
            (json!({ "canon_id": canon, "method": "GET", "path": "/x", "rate_limit": { "per_minute": 0 } }), "rate_limit"),
            (json!({ "canon_id": "nope", "method": "GET", "path": "/x" }), "canon_id"),
            // No permission by oversight is refused; open to every caller only when said.
            (json!({ "canon_id": canon, "method": "GET", "path": "/x" }), "required_permissions"),
            (json!({ "canon_id": canon, "method": "GET", "path": "/x", "required_permissions": [] }), "required_permissions"),
            (json!({ "canon_id": canon, "method": "GET", "path": "/x", "public_to_authenticated": false }), "required_permissions"),
            (json!({ "canon_id": canon, "method": "GET", "path": "/x", "required_permissions": ["finance.ledger.read"], "public_to_authenticated": true }), "public_to_authenticated"),
            (json!({ "canon_id": canon, "method": "GET", "path": "/x", "public_to_authenticated": "yes" }), "public_to_authenticated"),
        ] {
            let problem = expect_problem(create(body.clone()).await.unwrap(), 400, "VALIDATION_ERROR").await;
            assert_eq!(problem["errors"][0]["field"], field, "{body} → {problem}");
        }
        // Same method and shape (parameter names aside) → 409; another method is fine.
        let ledger = json!(["finance.ledger.read"]);
        expect_problem(create(json!({ "canon_id": canon, "method": "GET", "path": "/entries/{id}", "required_permissions": ledger })).await.unwrap(), 409, "CONFLICT").await;
        let public: Value = create(json!({ "canon_id": canon, "method": "DELETE", "path": "/entries/{id}", "public_to_authenticated": true })).await.unwrap().json().await.unwrap();
        assert_eq!((public["public_to_authenticated"].clone(), public["required_permissions"].clone()), (json!(true), json!([])));
        expect_problem(create(json!({ "canon_id": uuid::Uuid::now_v7().to_string(), "method": "GET", "path": "/x", "required_permissions": ledger })).await.unwrap(), 404, "NOT_FOUND").await;
        // PATCH changes it, under the same rule.
        let public_id = public["id"].as_str().unwrap();
        let patch = |body: Value| k.as_(&root, Method::PATCH, &format!("/api/kernel/routes/{public_id}")).json(&body).send();
        let problem = expect_problem(patch(json!({ "public_to_authenticated": false })).await.unwrap(), 400, "VALIDATION_ERROR").await;
        assert_eq!(problem["errors"][0]["field"], "required_permissions");
        let closed: Value = patch(json!({ "public_to_authenticated": false, "required_permissions": ledger })).await.unwrap().json().await.unwrap();
        assert_eq!((closed["public_to_authenticated"].clone(), closed["required_permissions"].clone()), (json!(false), ledger.clone()));
        let reopened: Value = patch(json!({ "public_to_authenticated": true, "required_permissions": [] })).await.unwrap().json().await.unwrap();
        assert_eq!(reopened["public_to_authenticated"], true);
        assert!(k.audit(&root, "action=route.updated").await.iter().any(|e| e["details"]["public_to_authenticated"] == true));

        let list: Value = k.as_(&root, Method::GET, &format!("/api/kernel/routes?canon_id={canon}&limit=1")).send().await.unwrap().json().await.unwrap();
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
        assert!(list["next_cursor"].is_string());
        let patched = k.as_(&root, Method::PATCH, &format!("/api/kernel/routes/{id}")).header("if-match", "\"1\"")
            .json(&json!({ "timeout_ms": null, "forward_cookies": true })).send().await.unwrap();
        assert_eq!(patched.status(), 200);
        let patched: Value = patched.json().await.unwrap();
        assert_eq!((patched["timeout_ms"].clone(), patched["forward_cookies"].clone(), patched["version"].clone()), (Value::Null, json!(true), json!(2)));
        expect_problem(k.as_(&root, Method::DELETE, &format!("/api/kernel/routes/{id}")).header("if-match", "\"1\"").send().await.unwrap(), 412, "PRECONDITION_FAILED").await;
        assert_eq!(k.audit(&root, "action=route.created").await.len(), 2);
        assert_eq!(k.audit(&root, "action=route.updated").await.len(), 3);
    }

    async fn only_platform_administrators_manage_the_registry(engine: Engine) {
        let Some(k) = spawn_kernel(engine).await else { return };
        let root = k.platform_admin().await;
        let (canon, _) = k.canon(&root, "payments", "http://127.0.0.1:9", &[]).await;
        let tenant_admin = k.tenant_with_admin(&root, "acme").await;
        let me: Value = k.as_(&tenant_admin, Method::GET, "/api/kernel/auth/me").send().await.unwrap().json().await.unwrap();
        assert!(!me.to_string().contains("kernel.canon"), "a tenant's administrator holds no platform permission: {me}");
        let attempts = [
            k.as_(&tenant_admin, Method::GET, "/api/kernel/canons").send().await.unwrap(),
            k.as_(&tenant_admin, Method::GET, &format!("/api/kernel/canons/{canon}")).send().await.unwrap(),
            k.as_(&tenant_admin, Method::POST, "/api/kernel/canons").json(&json!({ "name": "evil", "base_url": "http://x" })).send().await.unwrap(),
            k.as_(&tenant_admin, Method::POST, "/api/kernel/routes").json(&json!({ "canon_id": canon, "method": "GET", "path": "/x" })).send().await.unwrap(),
            k.as_(&tenant_admin, Method::DELETE, &format!("/api/kernel/canons/{canon}")).send().await.unwrap(),
        ];
        for response in attempts {
            let problem = expect_problem(response, 403, "FORBIDDEN").await;
            assert!(problem["missing_permissions"].is_array(), "{problem}");
        }
        // Nor can a tenant grant itself a platform permission.
        let problem = expect_problem(
            k.as_(&tenant_admin, Method::POST, "/api/kernel/roles").json(&json!({ "name": "sneaky", "permissions": ["kernel.canon.*"] })).send().await.unwrap(),
            400, "VALIDATION_ERROR",
        ).await;
        assert!(problem.to_string().contains("platform"), "{problem}");
        let unauthenticated = k.client.get(k.url("/api/kernel/canons")).send().await.unwrap();
        expect_problem(unauthenticated, 401, "UNAUTHORIZED").await;
    }

    async fn assertion_secrets_rotate_create_activate_retire(engine: Engine) {
        let Some(k) = spawn_kernel(engine).await else { return };
        let root = k.platform_admin().await;
        let (canon, first) = k.canon(&root, "payments", "http://127.0.0.1:9", &[]).await;
        let first_kid = aibos_wire::assertion::secret_kid(&first).unwrap().to_owned();
        let base = format!("/api/kernel/canons/{canon}/assertion-secrets");
        let created = k.as_(&root, Method::POST, &base).send().await.unwrap();
        assert_eq!(created.status(), 201);
        let created: Value = created.json().await.unwrap();
        let kid = created["kid"].as_str().unwrap().to_owned();
        assert!(created["secret"].as_str().unwrap().starts_with("kas_"));
        expect_problem(k.as_(&root, Method::DELETE, &format!("{base}/{first_kid}")).send().await.unwrap(), 409, "CONFLICT").await;
        let activated = k.as_(&root, Method::POST, &format!("{base}/{kid}/activate")).send().await.unwrap();
        assert_eq!(activated.status(), 200);
        let states: Value = activated.json().await.unwrap();
        let state_of = |k: &str| states.as_array().unwrap().iter().find(|s| s["kid"] == k).map(|s| s["state"].clone());
        assert_eq!(state_of(&kid), Some(json!("active")));
        assert_eq!(state_of(&first_kid), Some(json!("inactive")));
        assert_eq!(k.as_(&root, Method::DELETE, &format!("{base}/{first_kid}")).send().await.unwrap().status(), 204);
        expect_problem(k.as_(&root, Method::DELETE, &format!("{base}/{first_kid}")).send().await.unwrap(), 404, "NOT_FOUND").await;
        expect_problem(k.as_(&root, Method::POST, &format!("{base}/nope/activate")).send().await.unwrap(), 404, "NOT_FOUND").await;
        for action in ["canon.secret_created", "canon.secret_activated", "canon.secret_deleted"] {
            assert_eq!(k.audit(&root, &format!("action={action}")).await.len(), 1, "{action}");
        }
    }
}
