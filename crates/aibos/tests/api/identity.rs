//! Identity: bootstrap, login, tokens, sessions, service accounts, tenant isolation.

use std::time::{Duration, Instant};

use aibos_kernel::identity::tokens::{AUDIENCE, Claims, ISSUER, KeyRing, StoredKey};
use aibos_testkit::api::PASSWORD;
use aibos_testkit::{Engine, KernelOptions, spawn_kernel, spawn_kernel_with};
use base64::Engine as _;
use reqwest::Method;
use serde_json::{Value, json};

use crate::expect_problem;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn in_one_day() -> String {
    let at = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// The `id` of a 201 answer.
async fn created_id(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 201, "created");
    let body: Value = response.json().await.unwrap();
    body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("an id: {body}"))
        .to_owned()
}

crate::both_engines! {
    async fn bootstrap_creates_the_first_administrator_once(engine: Engine) {
        let key = "a-bootstrap-key-long-enough-0123";
        let kernel = spawn_kernel_with(engine, KernelOptions { env: vec![("AIBOS_AUTH__BOOTSTRAP_KEY".into(), key.into())], ..Default::default() }).await.unwrap();
        let body = json!({ "email": "root@example.com", "password": PASSWORD, "name": "Root" });
        let wrong = kernel.client.post(kernel.url("/api/kernel/bootstrap")).header("x-bootstrap-key", "wrong-key-wrong-key-wrong").json(&body).send().await.unwrap();
        expect_problem(wrong, 401, "UNAUTHORIZED").await;
        let ok = kernel.client.post(kernel.url("/api/kernel/bootstrap")).header("x-bootstrap-key", key).json(&body).send().await.unwrap();
        assert_eq!(ok.status(), 201);
        let created: serde_json::Value = ok.json().await.unwrap();
        assert_eq!(created["tenant_id"], "00000000-0000-7000-8000-000000000001");
        assert!(created["user_id"].is_string());
        let again = kernel.client.post(kernel.url("/api/kernel/bootstrap")).header("x-bootstrap-key", key).json(&body).send().await.unwrap();
        expect_problem(again, 409, "CONFLICT").await;
        assert!(kernel.login("system", "root@example.com", PASSWORD).await.is_ok());

        let disabled = spawn_kernel(engine).await.unwrap();
        let response = disabled.client.post(disabled.url("/api/kernel/bootstrap")).header("x-bootstrap-key", key).json(&body).send().await.unwrap();
        expect_problem(response, 404, "NOT_FOUND").await;
    }

    async fn another_tenants_objects_answer_404_and_never_appear_in_lists(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let a = kernel.tenant_with_admin(&platform, "tenant-a").await;
        let b = kernel.tenant_with_admin(&platform, "tenant-b").await;
        // Every id A aims at below is a real, live object of B's: a 404 says
        // the tenant filter held, not that the object was never there.
        let b_user = kernel.user(&b, "bob@b.example").await;
        let b_role = kernel.role(&b, "b-readers", &["kernel.user.read", "kernel.breakglass.request"]).await;
        kernel.assign(&b, &b_user, &b_role).await;
        let bob = kernel.login("tenant-b", "bob@b.example", PASSWORD).await.unwrap();
        let b_delegation = created_id(kernel.as_(&b, Method::POST, "/api/kernel/delegations")
            .json(&json!({"to_user_id": b_user, "permissions": ["kernel.role.read"], "expires_at": in_one_day(), "reason": "holiday cover"})).send().await.unwrap()).await;
        let b_account: Value = kernel.as_(&b, Method::POST, "/api/kernel/service-accounts").json(&json!({"name": "b-ledger"})).send().await.unwrap().json().await.unwrap();
        let (b_account_id, b_client_id) = (b_account["id"].as_str().unwrap().to_owned(), b_account["client_id"].as_str().unwrap().to_owned());
        let b_secret = b_account["client_secret"].as_str().unwrap().to_owned();
        let b_break_glass = created_id(kernel.as_(&bob, Method::POST, "/api/kernel/break-glass")
            .json(&json!({"permissions": ["kernel.audit.read"], "reason": "incident 77: ledger feed stalled", "duration_minutes": 30})).send().await.unwrap()).await;

        for (method, path, body) in [
            (Method::GET, format!("/api/kernel/users/{b_user}"), None),
            (Method::PATCH, format!("/api/kernel/users/{b_user}"), Some(json!({"name": "pwned"}))),
            (Method::POST, format!("/api/kernel/users/{b_user}/password"), Some(json!({"password": "another long password"}))),
            (Method::GET, format!("/api/kernel/roles/{b_role}"), None),
            (Method::PATCH, format!("/api/kernel/roles/{b_role}"), Some(json!({"name": "pwned"}))),
            (Method::DELETE, format!("/api/kernel/roles/{b_role}"), None),
            (Method::DELETE, format!("/api/kernel/users/{b_user}/roles/{b_role}"), None),
            (Method::DELETE, format!("/api/kernel/delegations/{b_delegation}"), None),
            (Method::POST, format!("/api/kernel/service-accounts/{b_account_id}/secret"), None),
            (Method::DELETE, format!("/api/kernel/break-glass/{b_break_glass}"), None),
        ] {
            let mut request = kernel.as_(&a, method.clone(), &path);
            if let Some(body) = body {
                request = request.json(&body);
            }
            let response = request.send().await.unwrap();
            let problem = expect_problem(response, 404, "NOT_FOUND").await;
            assert!(!problem.to_string().contains(&b.tenant_id), "{method} {path}: {problem}");
        }
        // A's admin assigning its role to B's user: 404 like a missing user.
        let a_role = kernel.role(&a, "a-readers", &["kernel.user.read"]).await;
        let response = kernel.as_(&a, Method::POST, &format!("/api/kernel/users/{b_user}/roles")).json(&json!({"role_id": a_role})).send().await.unwrap();
        expect_problem(response, 404, "NOT_FOUND").await;
        // A tenant's administrators are made by platform administrators only:
        // A's administrator cannot give B (nor A) one.
        for tenant in [&b.tenant_id, &a.tenant_id] {
            let response = kernel.as_(&a, Method::POST, &format!("/api/kernel/tenants/{tenant}/admins"))
                .json(&json!({"email": "mallory@b.example", "name": "Mallory", "password": PASSWORD})).send().await.unwrap();
            expect_problem(response, 403, "FORBIDDEN").await;
        }
        assert!(kernel.login("tenant-b", "mallory@b.example", PASSWORD).await.is_err(), "no administrator was made in B");

        // Lists: A sees its own objects, none of B's.
        let a_user = kernel.user(&a, "alice@a.example").await;
        let a_delegation = created_id(kernel.as_(&a, Method::POST, "/api/kernel/delegations")
            .json(&json!({"to_user_id": a_user, "permissions": ["kernel.role.read"], "expires_at": in_one_day(), "reason": "holiday cover"})).send().await.unwrap()).await;
        let a_account = created_id(kernel.as_(&a, Method::POST, "/api/kernel/service-accounts").json(&json!({"name": "a-ledger"})).send().await.unwrap()).await;
        for (path, own) in [
            ("/api/kernel/users", vec![a_user.as_str(), a.subject_id.as_str()]),
            ("/api/kernel/roles", vec![a_role.as_str()]),
            ("/api/kernel/delegations", vec![a_delegation.as_str()]),
            ("/api/kernel/service-accounts", vec![a_account.as_str()]),
        ] {
            let response = kernel.as_(&a, Method::GET, path).send().await.unwrap();
            assert_eq!(response.status(), 200, "GET {path}");
            let list: Value = response.json().await.unwrap();
            let ids: Vec<&str> = list["items"].as_array().unwrap_or_else(|| panic!("{path}: {list}")).iter().filter_map(|i| i["id"].as_str()).collect();
            for id in own {
                assert!(ids.contains(&id), "GET {path} lists A's own {id}: {list}");
            }
            let text = list.to_string();
            for foreign in [&b_user, &b_role, &b_delegation, &b_account_id, &b.subject_id, &b.tenant_id] {
                assert!(!text.contains(foreign.as_str()), "GET {path} shows B's {foreign}: {text}");
            }
        }
        let audit = kernel.audit(&a, "").await;
        assert!(audit.iter().any(|e| e["resource_id"] == a_user.as_str()), "A's audit holds its own entries");
        let text = Value::Array(audit).to_string();
        assert!(!text.contains(&b_user) && !text.contains(&b_role) && !text.contains(&b.tenant_id), "{text}");

        // B's objects are unharmed.
        let still: Value = kernel.as_(&b, Method::GET, &format!("/api/kernel/users/{b_user}")).send().await.unwrap().json().await.unwrap();
        assert_eq!(still["name"], "bob@b.example");
        assert!(kernel.login("tenant-b", "bob@b.example", PASSWORD).await.is_ok(), "B's user keeps the password");
        // Bob's session, the role it holds, the delegation and the break-glass all stand.
        let me: Value = kernel.as_(&bob, Method::GET, "/api/kernel/auth/me").send().await.unwrap().json().await.unwrap();
        assert_eq!(me["permissions"], json!(["kernel.audit.read", "kernel.breakglass.request", "kernel.role.read", "kernel.user.read"]), "{me}");
        let grant = kernel.client.post(kernel.url("/api/kernel/auth/token"))
            .json(&json!({"grant_type": "client_credentials", "client_id": b_client_id, "client_secret": b_secret})).send().await.unwrap();
        assert_eq!(grant.status(), 200, "B's service account keeps its secret");
    }

    async fn forged_tokens_are_refused(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let admin = kernel.platform_admin().await;
        let me = |token: String| {
            let kernel = &kernel;
            async move { kernel.client.get(kernel.url("/api/kernel/auth/me")).bearer_auth(token).send().await.unwrap() }
        };
        assert_eq!(me(admin.access_token.clone()).await.status(), 200);
        let parts: Vec<&str> = admin.access_token.split('.').collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: serde_json::Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();

        // alg: none.
        let none = format!("{}.{}.", b64.encode(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
        // A changed tid under the old signature.
        claims["tid"] = json!("01a20000-0000-7000-8000-000000000000");
        let changed = format!("{}.{}.{}", parts[0], b64.encode(serde_json::to_vec(&claims).unwrap()), parts[2]);
        // HS256 signed with the kernel's public key (key confusion).
        let header: serde_json::Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
        let jwks: serde_json::Value = kernel.client.get(kernel.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
        let public = jwks["keys"][0]["x"].as_str().unwrap().to_owned();
        let original: serde_json::Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        let confused = aibos_wire::jws::sign(&original, &aibos_wire::jws::SigningKey::hs256(public.as_bytes()), header["kid"].as_str()).unwrap();
        // Another kernel's key.
        let config = aibos_kernel::Config::defaults();
        let other = KeyRing::new(&config.auth, &[StoredKey::generate()]).unwrap();
        let claims_with = |f: &dyn Fn(&mut Claims)| {
            let mut c = Claims {
                iss: ISSUER.into(), aud: AUDIENCE.into(), sub: admin.subject_id.clone(), tid: admin.tenant_id.clone(),
                sid: original["sid"].as_str().unwrap().into(), act: "user".into(), iat: now(), nbf: now(), exp: now() + 600, jti: "x".into(),
            };
            f(&mut c);
            c
        };
        let foreign = other.sign(&claims_with(&|_| {})).unwrap();
        // Expired, and for another audience, signed with the kernel's own key.
        let expired = kernel.state.keys().sign(&claims_with(&|c| { c.iat = now() - 3600; c.nbf = now() - 3600; c.exp = now() - 60; })).unwrap();
        let wrong_aud = kernel.state.keys().sign(&claims_with(&|c| c.aud = "another-service".into())).unwrap();
        // And the kernel's own key with correct claims works: the refusals above are about the forgery.
        let genuine = kernel.state.keys().sign(&claims_with(&|_| {})).unwrap();
        assert_eq!(me(genuine).await.status(), 200);

        for (name, token) in [("alg none", none), ("changed tid", changed), ("HS256 with the public key", confused), ("foreign key", foreign), ("expired", expired), ("wrong aud", wrong_aud), ("garbage", "not.a.jwt".into())] {
            let response = me(token).await;
            assert_eq!(response.status(), 401, "{name}");
            assert_eq!(response.headers()["www-authenticate"], "Bearer", "{name}");
            expect_problem(response, 401, "UNAUTHORIZED").await;
        }
        let response = kernel.client.get(kernel.url("/api/kernel/auth/me")).send().await.unwrap();
        expect_problem(response, 401, "UNAUTHORIZED").await;
    }

    async fn logout_revokes_the_access_token_on_the_next_request(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let admin = kernel.platform_admin().await;
        assert_eq!(kernel.as_(&admin, Method::GET, "/api/kernel/auth/me").send().await.unwrap().status(), 200);
        assert_eq!(kernel.as_(&admin, Method::POST, "/api/kernel/auth/logout").send().await.unwrap().status(), 204);
        let response = kernel.as_(&admin, Method::GET, "/api/kernel/auth/me").send().await.unwrap();
        expect_problem(response, 401, "UNAUTHORIZED").await;
        let refreshed = kernel.client.post(kernel.url("/api/kernel/auth/refresh")).json(&json!({"refresh_token": admin.refresh_token.clone().unwrap()})).send().await.unwrap();
        expect_problem(refreshed, 401, "UNAUTHORIZED").await;
    }

    async fn refresh_token_reuse_revokes_the_whole_session(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let admin = kernel.platform_admin().await;
        let first = admin.refresh_token.clone().unwrap();
        let response = kernel.client.post(kernel.url("/api/kernel/auth/refresh")).json(&json!({"refresh_token": first})).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["cache-control"], "no-store");
        let rotated: serde_json::Value = response.json().await.unwrap();
        let newer_access = rotated["access_token"].as_str().unwrap().to_owned();
        let newer_refresh = rotated["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(newer_refresh, first);
        assert_eq!(kernel.client.get(kernel.url("/api/kernel/auth/me")).bearer_auth(&newer_access).send().await.unwrap().status(), 200);

        // The rotated token comes back: the session dies, newer tokens included.
        let reuse = kernel.client.post(kernel.url("/api/kernel/auth/refresh")).json(&json!({"refresh_token": first})).send().await.unwrap();
        expect_problem(reuse, 401, "UNAUTHORIZED").await;
        let response = kernel.client.get(kernel.url("/api/kernel/auth/me")).bearer_auth(&newer_access).send().await.unwrap();
        expect_problem(response, 401, "UNAUTHORIZED").await;
        let response = kernel.client.post(kernel.url("/api/kernel/auth/refresh")).json(&json!({"refresh_token": newer_refresh})).send().await.unwrap();
        expect_problem(response, 401, "UNAUTHORIZED").await;
        let revoked = kernel.audit(&kernel.login("system", "root@example.com", PASSWORD).await.unwrap(), "action=session.revoked").await;
        assert_eq!(revoked[0]["details"]["reason"], "refresh_token_reuse");
        assert_eq!(revoked[0]["severity"], "critical");
    }

    async fn suspension_takes_effect_on_the_next_request(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        let user_id = kernel.user(&admin, "carol@acme.example").await;
        let carol = kernel.login("acme", "carol@acme.example", PASSWORD).await.unwrap();
        assert_eq!(kernel.as_(&carol, Method::GET, "/api/kernel/auth/me").send().await.unwrap().status(), 200);
        let r = kernel.as_(&admin, Method::PATCH, &format!("/api/kernel/users/{user_id}")).json(&json!({"status": "suspended"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        expect_problem(kernel.as_(&carol, Method::GET, "/api/kernel/auth/me").send().await.unwrap(), 401, "UNAUTHORIZED").await;

        let r = kernel.as_(&platform, Method::PATCH, &format!("/api/kernel/tenants/{}", admin.tenant_id)).json(&json!({"status": "suspended"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        expect_problem(kernel.as_(&admin, Method::GET, "/api/kernel/auth/me").send().await.unwrap(), 403, "TENANT_SUSPENDED").await;
        let login = kernel.login("acme", "admin@acme.example", PASSWORD).await.unwrap_err();
        assert_eq!(login.0, 403);
        assert_eq!(login.1["code"], "TENANT_SUSPENDED");
    }

    async fn login_failures_look_alike_and_are_throttled(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let admin = kernel.platform_admin().await;
        let unknown_tenant = kernel.login("no-such-tenant", "root@example.com", PASSWORD).await.unwrap_err();
        let unknown_email = kernel.login("system", "nobody@example.com", PASSWORD).await.unwrap_err();
        let wrong_password = kernel.login("system", "root@example.com", "wrong password here").await.unwrap_err();
        let strip = |mut v: serde_json::Value| { v.as_object_mut().unwrap().remove("correlation_id"); v };
        assert_eq!(unknown_tenant.0, 401);
        assert_eq!(strip(unknown_tenant.1.clone()), strip(unknown_email.1.clone()));
        assert_eq!(strip(unknown_email.1), strip(wrong_password.1));

        // Four more wrong passwords reach the limit of five; the sixth attempt is throttled,
        // even with the right password.
        for _ in 0..4 {
            assert_eq!(kernel.login("system", "root@example.com", "wrong password here").await.unwrap_err().0, 401);
        }
        let response = kernel.client.post(kernel.url("/api/kernel/auth/login"))
            .json(&json!({"tenant": "system", "email": "root@example.com", "password": PASSWORD})).send().await.unwrap();
        assert!(response.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() > 0);
        expect_problem(response, 429, "RATE_LIMITED").await;

        let failures = kernel.audit(&admin, "action=auth.login_failed").await;
        assert!(failures.len() >= 6, "{failures:?}");
        assert!(failures.iter().all(|e| e["outcome"] == "failure" && e["correlation_id"].is_string()));
        assert!(!serde_json::Value::Array(failures).to_string().contains("wrong password here"));
    }

    async fn service_accounts_use_the_client_credentials_grant(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "payments").await;
        let role = kernel.role(&admin, "publisher", &["kernel.event.publish"]).await;
        let created: serde_json::Value = kernel.as_(&admin, Method::POST, "/api/kernel/service-accounts")
            .json(&json!({"name": "payment-hub", "role_ids": [role]})).send().await.unwrap().json().await.unwrap();
        let client_id = created["client_id"].as_str().unwrap().to_owned();
        let secret = created["client_secret"].as_str().unwrap().to_owned();
        assert!(secret.starts_with("kcs_"));

        let form = kernel.client.post(kernel.url("/api/kernel/auth/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("grant_type=client_credentials&client_id={client_id}&client_secret={secret}")).send().await.unwrap();
        assert_eq!(form.status(), 200);
        let token: serde_json::Value = form.json().await.unwrap();
        let me: serde_json::Value = kernel.client.get(kernel.url("/api/kernel/auth/me")).bearer_auth(token["access_token"].as_str().unwrap()).send().await.unwrap().json().await.unwrap();
        assert_eq!(me["actor_type"], "service");
        assert_eq!(me["tenant"]["id"], admin.tenant_id.as_str());
        assert_eq!(me["permissions"], json!(["kernel.event.publish"]));

        let json_grant = kernel.client.post(kernel.url("/api/kernel/auth/token"))
            .json(&json!({"grant_type": "client_credentials", "client_id": client_id, "client_secret": "kcs_wrong"})).send().await.unwrap();
        let problem = expect_problem(json_grant, 401, "UNAUTHORIZED").await;
        assert_eq!(problem["error"], "invalid_client");

        // Rotation: the old secret stops working, the new one works.
        let rotated: serde_json::Value = kernel.as_(&admin, Method::POST, &format!("/api/kernel/service-accounts/{}/secret", created["id"].as_str().unwrap())).send().await.unwrap().json().await.unwrap();
        let grant = |s: String| kernel.client.post(kernel.url("/api/kernel/auth/token")).json(&json!({"grant_type": "client_credentials", "client_id": client_id, "client_secret": s})).send();
        assert_eq!(grant(secret).await.unwrap().status(), 401);
        assert_eq!(grant(rotated["client_secret"].as_str().unwrap().to_owned()).await.unwrap().status(), 200);
    }

    async fn key_rotation_keeps_old_tokens_valid(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let admin = kernel.platform_admin().await;
        aibos_kernel::identity::admin::rotate_keys(kernel.state.db(), kernel.state.master_keys(), kernel.state.redact_keys()).await.unwrap();
        kernel.state.refresh_keys().await;
        let jwks: serde_json::Value = kernel.client.get(kernel.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
        assert_eq!(kernel.as_(&admin, Method::GET, "/api/kernel/auth/me").send().await.unwrap().status(), 200, "the old key still verifies");
        let fresh = kernel.login("system", "root@example.com", PASSWORD).await.unwrap();
        assert_ne!(fresh.access_token.split('.').next(), admin.access_token.split('.').next(), "new tokens name the new kid");
        let rotated = kernel.audit(&fresh, "action=key.rotated").await;
        assert_eq!(rotated.len(), 1);
    }

    async fn path_ids_that_are_not_uuids_are_400(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let admin = kernel.platform_admin().await;
        for path in ["/api/kernel/users/not-a-uuid", "/api/kernel/roles/1%27%20OR%201=1", "/api/kernel/tenants/..%2f..%2fetc"] {
            let response = kernel.as_(&admin, Method::GET, path).send().await.unwrap();
            expect_problem(response, 400, "VALIDATION_ERROR").await;
        }
        let response = kernel.as_(&admin, Method::GET, "/api/kernel/users?limit=1001").send().await.unwrap();
        expect_problem(response, 400, "VALIDATION_ERROR").await;
        let response = kernel.as_(&admin, Method::GET, "/api/kernel/users?cursor=%%%").send().await.unwrap();
        expect_problem(response, 400, "VALIDATION_ERROR").await;
    }
}

/// Medians of 20 unknown-email and 20 wrong-password logins differ by less than 20 %:
/// both pay one Argon2id verification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_failure_timing_does_not_tell_unknown_emails_from_wrong_passwords() {
    let kernel = spawn_kernel(Engine::Sqlite).await.unwrap();
    let admin = kernel.platform_admin().await;
    // Four users × five attempts per round stays under the per-account throttle,
    // and two rounds of forty failures under the per-address one (100).
    for i in 0..8 {
        kernel.user(&admin, &format!("user{i}@example.com")).await;
    }
    let time = |email: String, password: &'static str| {
        let kernel = &kernel;
        async move {
            let started = Instant::now();
            let status = kernel
                .client
                .post(kernel.url("/api/kernel/auth/login"))
                .json(&json!({"tenant": "system", "email": email, "password": password}))
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status, 401);
            started.elapsed()
        }
    };
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    // A second round when the first is further apart: other tests share the
    // machine and can load one series more than the other. A real difference
    // (an unknown email skipping Argon2 is several times faster) fails both.
    let mut apart = Vec::new();
    for round in 0..2 {
        let mut unknown = Vec::new();
        let mut wrong = Vec::new();
        for i in 0..20 {
            unknown.push(
                time(
                    format!("nobody{round}-{i}@example.com"),
                    "wrong password here",
                )
                .await,
            );
            wrong.push(
                time(
                    format!("user{}@example.com", round * 4 + i % 4),
                    "wrong password here",
                )
                .await,
            );
        }
        let (u, w) = (median(unknown).as_secs_f64(), median(wrong).as_secs_f64());
        let difference = (u - w).abs() / u.max(w);
        if difference < 0.2 {
            return;
        }
        apart.push(format!(
            "unknown email {u:.4}s vs wrong password {w:.4}s: {:.0}% apart",
            difference * 100.0
        ));
    }
    panic!("{apart:?}");
}

#[tokio::test]
async fn hs256_tokens_work_when_configured() {
    let env = vec![
        ("AIBOS_AUTH__JWT_ALGORITHM".to_owned(), "HS256".to_owned()),
        (
            "AIBOS_AUTH__JWT_SECRET".to_owned(),
            "an-hs256-secret-of-at-least-32-bytes!".to_owned(),
        ),
    ];
    let kernel = spawn_kernel_with(
        Engine::Sqlite,
        KernelOptions {
            env,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let admin = kernel.platform_admin().await;
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(admin.access_token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "HS256");
    assert_eq!(
        kernel
            .as_(&admin, Method::GET, "/api/kernel/auth/me")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let jwks: serde_json::Value = kernel
        .client
        .get(kernel.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        jwks["keys"],
        json!([]),
        "a shared secret is never published"
    );
}

/// Two kernel instances on one PostgreSQL database: a logout or a role removal on
/// one is in force on the other's very next request (LISTEN/NOTIFY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_every_instance_on_postgres() {
    if Engine::postgres_admin_url().is_none() {
        eprintln!("skipped: AIBOS_TEST_DATABASE_URL is not set");
        return;
    }
    let first = spawn_kernel(Engine::Postgres).await.unwrap();
    let second = spawn_kernel_with(
        Engine::Sqlite,
        KernelOptions {
            database_url: Some(first.db.url().to_owned()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let platform = first.platform_admin().await;
    let admin = first.tenant_with_admin(&platform, "acme").await;
    let user = first.user(&admin, "ivy@acme.example").await;
    let role = first.role(&admin, "readers", &["kernel.user.read"]).await;
    first.assign(&admin, &user, &role).await;
    let ivy = first
        .login("acme", "ivy@acme.example", PASSWORD)
        .await
        .unwrap();
    // Warm the second instance's cache with Ivy's principal.
    assert_eq!(
        second
            .as_(&ivy, Method::GET, "/api/kernel/users")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let r = first
        .as_(
            &admin,
            Method::DELETE,
            &format!("/api/kernel/users/{user}/roles/{role}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    // A role removal ends the holder's sessions, on every instance.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let status = second
            .as_(&ivy, Method::GET, "/api/kernel/users")
            .send()
            .await
            .unwrap()
            .status();
        if status == 401 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second instance still accepts a session whose role was removed ({status})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ivy = first
        .login("acme", "ivy@acme.example", PASSWORD)
        .await
        .unwrap();
    assert_eq!(
        second
            .as_(&ivy, Method::GET, "/api/kernel/users")
            .send()
            .await
            .unwrap()
            .status(),
        403,
        "the new session holds what remains"
    );

    assert_eq!(
        second
            .as_(&ivy, Method::GET, "/api/kernel/auth/me")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        first
            .as_(&ivy, Method::POST, "/api/kernel/auth/logout")
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while second
        .as_(&ivy, Method::GET, "/api/kernel/auth/me")
        .send()
        .await
        .unwrap()
        .status()
        != 401
    {
        assert!(
            Instant::now() < deadline,
            "the second instance still accepts a logged-out token"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

crate::both_engines! {
    // PostgreSQL stores no NUL in text or jsonb: such text is refused where it
    // enters (400 naming the field), never a 500 from the database.
    async fn text_holding_nul_is_refused_at_the_boundary(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let admin = kernel.platform_admin().await;
        let post = |path: &str, body: String| kernel.client.post(kernel.url(path)).header("content-type", "application/json").body(body).send();
        for (body, field) in [
            (r#"{"tenant":"system","email":"root\u0000@example.com","password":"x"}"#, "email"),
            (r#"{"tenant":"sys\u0000tem","email":"root@example.com","password":"x"}"#, "tenant"),
            (r#"{"tenant":"system","email":"root@example.com","password":"correct horse\u0000"}"#, "password"),
        ] {
            let problem = expect_problem(post("/api/kernel/auth/login", body.to_owned()).await.unwrap(), 400, "VALIDATION_ERROR").await;
            assert_eq!(problem["errors"][0]["field"], field, "{problem}");
        }
        // Still audited as failed logins, the NUL shown as U+FFFD, never the password.
        let failures = kernel.audit(&admin, "action=auth.login_failed").await;
        assert_eq!(failures.len(), 3);
        assert!(failures.iter().all(|e| e["details"]["reason"] == "invalid_text"));
        assert!(failures.iter().any(|e| e["details"]["email"] == "root\u{FFFD}@example.com"));
        assert!(!Value::Array(failures).to_string().contains("correct horse"));

        let problem = expect_problem(post("/api/kernel/auth/token", r#"{"grant_type":"client_credentials","client_id":"kci_\u0000","client_secret":"x"}"#.to_owned()).await.unwrap(), 400, "VALIDATION_ERROR").await;
        assert_eq!(problem["errors"][0]["field"], "client_id");
        let form = kernel.client.post(kernel.url("/api/kernel/auth/token")).header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials&client_id=kci_%00&client_secret=x").send().await.unwrap();
        let problem = expect_problem(form, 400, "VALIDATION_ERROR").await;
        assert_eq!(problem["errors"][0]["field"], "client_id");
        // Nested fields and keys are named by their path; queries too.
        let r = kernel.as_(&admin, Method::POST, "/api/kernel/tenants").header("content-type", "application/json")
            .body(r#"{"slug":"acme","name":"Acme\u0000 Corp"}"#).send().await.unwrap();
        let problem = expect_problem(r, 400, "VALIDATION_ERROR").await;
        assert_eq!(problem["errors"][0]["field"], "name");
        for query in ["action=user%00.created", "limit=10&cursor=%00", "resource_type=x&%00=1"] {
            let r = kernel.as_(&admin, Method::GET, &format!("/api/kernel/audit?{query}")).send().await.unwrap();
            expect_problem(r, 400, "VALIDATION_ERROR").await;
        }
        // A lone surrogate escape is not text at all: 400 as malformed JSON.
        let r = post("/api/kernel/auth/login", r#"{"tenant":"system","email":"\ud800","password":"x"}"#.to_owned()).await.unwrap();
        expect_problem(r, 400, "VALIDATION_ERROR").await;
        // Nothing of it was stored.
        let tenants: Value = kernel.as_(&admin, Method::GET, "/api/kernel/tenants").send().await.unwrap().json().await.unwrap();
        assert_eq!(tenants["items"].as_array().unwrap().len(), 1, "only the system tenant");
    }
}
