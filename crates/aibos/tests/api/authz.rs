//! Permissions, roles, delegation and break-glass, enforced on the next request.

use aibos_testkit::api::PASSWORD;
use aibos_testkit::spawn_kernel;
use reqwest::Method;
use serde_json::json;

use crate::expect_problem;

fn in_minutes(m: i64) -> String {
    let t = time::OffsetDateTime::now_utc() + time::Duration::minutes(m);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

crate::both_engines! {
    async fn a_missing_permission_is_403_with_the_list_and_an_audit_entry(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        kernel.user(&admin, "dave@acme.example").await;
        let dave = kernel.login("acme", "dave@acme.example", PASSWORD).await.unwrap();
        let response = kernel.as_(&dave, Method::GET, "/api/kernel/users").send().await.unwrap();
        let problem = expect_problem(response, 403, "FORBIDDEN").await;
        assert_eq!(problem["missing_permissions"], json!(["kernel.user.read"]));
        let denies = kernel.audit(&admin, "action=authz.deny").await;
        assert_eq!(denies.len(), 1);
        assert_eq!(denies[0]["outcome"], "deny");
        assert_eq!(denies[0]["actor_id"], dave.subject_id.as_str());
        assert_eq!(denies[0]["details"]["missing_permissions"], json!(["kernel.user.read"]));
        assert_eq!(denies[0]["correlation_id"], problem["correlation_id"]);

        // A tenant administrator cannot manage tenants, nor grant that to itself.
        let response = kernel.as_(&admin, Method::GET, "/api/kernel/tenants").send().await.unwrap();
        expect_problem(response, 403, "FORBIDDEN").await;
        for grant in ["kernel.tenant.manage", "kernel.*", "kernel.tenant.*"] {
            let response = kernel.as_(&admin, Method::POST, "/api/kernel/roles").json(&json!({"name": "sneaky", "permissions": [grant]})).send().await.unwrap();
            expect_problem(response, 400, "VALIDATION_ERROR").await;
        }
        let response = kernel.as_(&admin, Method::POST, "/api/kernel/roles").json(&json!({"name": "x", "permissions": ["no.such.permission"]})).send().await.unwrap();
        expect_problem(response, 400, "VALIDATION_ERROR").await;
    }

    async fn role_changes_apply_on_the_next_request(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        let user = kernel.user(&admin, "erin@acme.example").await;
        let readers = kernel.role(&admin, "readers", &["kernel.user.*"]).await;
        kernel.assign(&admin, &user, &readers).await;
        let erin = kernel.login("acme", "erin@acme.example", PASSWORD).await.unwrap();
        assert_eq!(kernel.as_(&erin, Method::GET, "/api/kernel/users").send().await.unwrap().status(), 200, "prefix grant");

        // Narrow the role: the cached principal must not keep the old grant.
        let r = kernel.as_(&admin, Method::PATCH, &format!("/api/kernel/roles/{readers}")).header("if-match", "\"1\"").json(&json!({"permissions": ["kernel.role.read"]})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["etag"], "\"2\"");
        expect_problem(kernel.as_(&erin, Method::GET, "/api/kernel/users").send().await.unwrap(), 403, "FORBIDDEN").await;
        // A stale If-Match is refused.
        let r = kernel.as_(&admin, Method::PATCH, &format!("/api/kernel/roles/{readers}")).header("if-match", "\"1\"").json(&json!({"name": "x"})).send().await.unwrap();
        expect_problem(r, 412, "PRECONDITION_FAILED").await;

        assert_eq!(kernel.as_(&erin, Method::GET, "/api/kernel/roles").send().await.unwrap().status(), 200);
        let r = kernel.as_(&admin, Method::DELETE, &format!("/api/kernel/users/{user}/roles/{readers}")).send().await.unwrap();
        assert_eq!(r.status(), 204);
        // The removal ends Erin's session; a new one holds what remains.
        expect_problem(kernel.as_(&erin, Method::GET, "/api/kernel/roles").send().await.unwrap(), 401, "UNAUTHORIZED").await;
        let erin = kernel.login("acme", "erin@acme.example", PASSWORD).await.unwrap();
        expect_problem(kernel.as_(&erin, Method::GET, "/api/kernel/roles").send().await.unwrap(), 403, "FORBIDDEN").await;

        let actions: Vec<String> = kernel.audit(&admin, "").await.iter().map(|e| e["action"].as_str().unwrap().to_owned()).collect();
        for expected in ["user.created", "role.created", "role.assigned", "role.updated", "role.unassigned", "session.created"] {
            assert!(actions.iter().any(|a| a == expected), "{expected} in {actions:?}");
        }
    }

    async fn delegation_hands_over_only_what_one_holds(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        let frank_id = kernel.user(&admin, "frank@acme.example").await;
        let grace_id = kernel.user(&admin, "grace@acme.example").await;
        let delegator = kernel.role(&admin, "delegator", &["kernel.delegation.create", "kernel.user.read"]).await;
        kernel.assign(&admin, &frank_id, &delegator).await;
        let frank = kernel.login("acme", "frank@acme.example", PASSWORD).await.unwrap();
        let grace = kernel.login("acme", "grace@acme.example", PASSWORD).await.unwrap();
        expect_problem(kernel.as_(&grace, Method::GET, "/api/kernel/users").send().await.unwrap(), 403, "FORBIDDEN").await;

        let not_held = kernel.as_(&frank, Method::POST, "/api/kernel/delegations")
            .json(&json!({"to_user_id": grace_id, "permissions": ["kernel.role.manage"], "expires_at": in_minutes(60), "reason": "holiday cover"})).send().await.unwrap();
        let problem = expect_problem(not_held, 403, "FORBIDDEN").await;
        assert_eq!(problem["missing_permissions"], json!(["kernel.role.manage"]));
        let too_long = kernel.as_(&frank, Method::POST, "/api/kernel/delegations")
            .json(&json!({"to_user_id": grace_id, "permissions": ["kernel.user.read"], "expires_at": in_minutes(31 * 24 * 60), "reason": "holiday cover"})).send().await.unwrap();
        expect_problem(too_long, 400, "VALIDATION_ERROR").await;

        let created = kernel.as_(&frank, Method::POST, "/api/kernel/delegations")
            .json(&json!({"to_user_id": grace_id, "permissions": ["kernel.user.read"], "expires_at": in_minutes(60), "reason": "holiday cover"})).send().await.unwrap();
        assert_eq!(created.status(), 201);
        let delegation: serde_json::Value = created.json().await.unwrap();
        assert_eq!(kernel.as_(&grace, Method::GET, "/api/kernel/users").send().await.unwrap().status(), 200, "in force on the next request");

        // Grace cannot pass it on (she lacks kernel.delegation.create, and delegated permissions are not delegable).
        let onward = kernel.as_(&grace, Method::POST, "/api/kernel/delegations")
            .json(&json!({"to_user_id": frank_id, "permissions": ["kernel.user.read"], "expires_at": in_minutes(30), "reason": "x"})).send().await.unwrap();
        expect_problem(onward, 403, "FORBIDDEN").await;

        let revoked = kernel.as_(&frank, Method::DELETE, &format!("/api/kernel/delegations/{}", delegation["id"].as_str().unwrap())).send().await.unwrap();
        assert_eq!(revoked.status(), 204);
        expect_problem(kernel.as_(&grace, Method::GET, "/api/kernel/users").send().await.unwrap(), 403, "FORBIDDEN").await;
    }

    async fn break_glass_elevates_briefly_and_is_audited_critical(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        let henry_id = kernel.user(&admin, "henry@acme.example").await;
        let oncall = kernel.role(&admin, "oncall", &["kernel.breakglass.request"]).await;
        kernel.assign(&admin, &henry_id, &oncall).await;
        let henry = kernel.login("acme", "henry@acme.example", PASSWORD).await.unwrap();

        for (body, why) in [
            (json!({"permissions": ["kernel.user.manage"], "reason": "too short", "duration_minutes": 30}), "short reason"),
            (json!({"permissions": ["kernel.user.manage"], "reason": "incident 4521: payroll stuck", "duration_minutes": 61}), "too long"),
            (json!({"permissions": ["kernel.*"], "reason": "incident 4521: payroll stuck", "duration_minutes": 30}), "a prefix grant"),
        ] {
            let r = kernel.as_(&henry, Method::POST, "/api/kernel/break-glass").json(&body).send().await.unwrap();
            let problem = expect_problem(r, 400, "VALIDATION_ERROR").await;
            assert!(problem["errors"].as_array().is_some_and(|e| !e.is_empty()), "{why}: {problem}");
        }
        // Never what manages identities or permissions: an elevation must not make itself lasting.
        for excluded in ["kernel.tenant.manage", "kernel.user.manage", "kernel.role.manage", "kernel.delegation.create", "kernel.service_account.manage", "kernel.breakglass.request"] {
            let r = kernel.as_(&henry, Method::POST, "/api/kernel/break-glass")
                .json(&json!({"permissions": ["kernel.user.read", excluded], "reason": "incident 4521: payroll stuck", "duration_minutes": 30})).send().await.unwrap();
            let problem = expect_problem(r, 403, "FORBIDDEN").await;
            assert_eq!(problem["missing_permissions"], json!([excluded]));
        }
        assert_eq!(kernel.audit(&admin, "action=authz.deny").await.len(), 6);
        let r = kernel.as_(&henry, Method::POST, "/api/kernel/break-glass")
            .json(&json!({"permissions": ["kernel.user.read"], "reason": "incident 4521: payroll stuck", "duration_minutes": 30})).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let grant: serde_json::Value = r.json().await.unwrap();
        assert!(grant["expires_at"].is_string());
        assert_eq!(kernel.as_(&henry, Method::GET, "/api/kernel/users").send().await.unwrap().status(), 200);
        let entries = kernel.audit(&admin, "action=breakglass.activated").await;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["severity"], "critical");
        let ended = kernel.as_(&henry, Method::DELETE, &format!("/api/kernel/break-glass/{}", grant["id"].as_str().unwrap())).send().await.unwrap();
        assert_eq!(ended.status(), 204);
        expect_problem(kernel.as_(&henry, Method::GET, "/api/kernel/users").send().await.unwrap(), 403, "FORBIDDEN").await;
    }

    async fn a_body_naming_another_tenant_is_refused_and_audited(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let a = kernel.tenant_with_admin(&platform, "tenant-a").await;
        let b = kernel.tenant_with_admin(&platform, "tenant-b").await;
        let r = kernel.as_(&a, Method::POST, "/api/kernel/users")
            .json(&json!({"email": "x@a.example", "name": "X", "password": PASSWORD, "tenant_id": b.tenant_id})).send().await.unwrap();
        expect_problem(r, 400, "VALIDATION_ERROR").await;
        let attempts = kernel.audit(&a, "action=security.cross_tenant_attempt").await;
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0]["details"]["named_tenant_id"], b.tenant_id.as_str());
        assert!(kernel.audit(&b, "action=user.created").await.iter().all(|e| e["details"]["email"] != "x@a.example"));
        // Naming one's own tenant is fine.
        let r = kernel.as_(&a, Method::POST, "/api/kernel/users")
            .json(&json!({"email": "x@a.example", "name": "X", "password": PASSWORD, "tenant_id": a.tenant_id})).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let dup = kernel.as_(&a, Method::POST, "/api/kernel/users")
            .json(&json!({"email": "X@A.example", "name": "X", "password": PASSWORD})).send().await.unwrap();
        expect_problem(dup, 409, "CONFLICT").await;
    }
}
