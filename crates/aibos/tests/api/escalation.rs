//! No escalation, complete revocation: each case a security review reproduced
//! against the kernel before SPEC §4's **No escalation** rule, through the API.

use aibos_testkit::api::{PASSWORD, Session};
use aibos_testkit::{TestKernel, spawn_kernel};
use reqwest::Method;
use serde_json::{Value, json};

use crate::expect_problem;

fn in_minutes(m: i64) -> String {
    let t = time::OffsetDateTime::now_utc() + time::Duration::minutes(m);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A user of `admin`'s tenant holding a new role of `permissions`, logged in.
async fn user_with(
    kernel: &TestKernel,
    admin: &Session,
    email: &str,
    permissions: &[&str],
) -> Session {
    let id = kernel.user(admin, email).await;
    if !permissions.is_empty() {
        let role = kernel.role(admin, &format!("role-{id}"), permissions).await;
        kernel.assign(admin, &id, &role).await;
    }
    kernel
        .login(
            if admin.tenant_id == aibos_kernel::identity::SYSTEM_TENANT_ID {
                "system"
            } else {
                "acme"
            },
            email,
            PASSWORD,
        )
        .await
        .unwrap()
}

async fn status_of(kernel: &TestKernel, session: &Session, method: Method, path: &str) -> u16 {
    kernel
        .as_(session, method, path)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The `tenant.admin` role's id in `admin`'s tenant.
async fn tenant_admin_role(kernel: &TestKernel, admin: &Session) -> String {
    let roles: Value = kernel
        .as_(admin, Method::GET, "/api/kernel/roles?limit=1000")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    roles["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "tenant.admin")
        .expect("the built-in role")["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

crate::both_engines! {
    // Reproduced 1: a role manager made themselves user manager and auditor, or tenant administrator.
    async fn a_role_manager_cannot_give_what_they_do_not_hold(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        let mallory = user_with(&kernel, &admin, "mallory@acme.example", &["kernel.role.manage", "kernel.role.read"]).await;

        let r = kernel.as_(&mallory, Method::POST, "/api/kernel/roles")
            .json(&json!({"name": "more", "permissions": ["kernel.user.manage", "kernel.audit.read"]})).send().await.unwrap();
        let problem = expect_problem(r, 403, "FORBIDDEN").await;
        assert_eq!(problem["missing_permissions"], json!(["kernel.audit.read", "kernel.user.manage"]));
        // Nor a prefix that reaches them, nor a wider one.
        for grant in ["kernel.user.*", "kernel.role.*", "finance.*"] {
            let r = kernel.as_(&mallory, Method::POST, "/api/kernel/roles").json(&json!({"name": "wide", "permissions": [grant]})).send().await.unwrap();
            expect_problem(r, 403, "FORBIDDEN").await;
        }
        // The built-in administrator role is refused too.
        let admin_role = tenant_admin_role(&kernel, &admin).await;
        let r = kernel.as_(&mallory, Method::POST, &format!("/api/kernel/users/{}/roles", mallory.subject_id))
            .json(&json!({"role_id": admin_role})).send().await.unwrap();
        expect_problem(r, 403, "FORBIDDEN").await;
        // A role of the admin's making that holds more cannot be assigned, widened or deleted by Mallory.
        let auditors = kernel.role(&admin, "auditors", &["kernel.audit.read"]).await;
        let r = kernel.as_(&mallory, Method::POST, &format!("/api/kernel/users/{}/roles", mallory.subject_id))
            .json(&json!({"role_id": auditors})).send().await.unwrap();
        expect_problem(r, 403, "FORBIDDEN").await;
        let own = kernel.role(&mallory, "own", &["kernel.role.read"]).await;
        let r = kernel.as_(&mallory, Method::PATCH, &format!("/api/kernel/roles/{own}"))
            .json(&json!({"permissions": ["kernel.role.read", "kernel.audit.read"]})).send().await.unwrap();
        expect_problem(r, 403, "FORBIDDEN").await;
        assert_eq!(status_of(&kernel, &mallory, Method::DELETE, &format!("/api/kernel/roles/{auditors}")).await, 403);

        // Nor put an end date on what a stronger user holds, even a role Mallory may give.
        kernel.assign(&admin, &admin.subject_id, &own).await;
        let r = kernel.as_(&mallory, Method::POST, &format!("/api/kernel/users/{}/roles", admin.subject_id))
            .json(&json!({"role_id": own, "expires_at": in_minutes(1)})).send().await.unwrap();
        expect_problem(r, 403, "FORBIDDEN").await;

        // What Mallory holds, Mallory may give.
        let r = kernel.as_(&mallory, Method::POST, &format!("/api/kernel/users/{}/roles", mallory.subject_id))
            .json(&json!({"role_id": own})).send().await.unwrap();
        assert_eq!(r.status(), 204);
        let mallory = kernel.login("acme", "mallory@acme.example", PASSWORD).await.unwrap();
        assert_eq!(status_of(&kernel, &mallory, Method::GET, "/api/kernel/users").await, 403, "still no user.read");
        assert_eq!(status_of(&kernel, &mallory, Method::GET, "/api/kernel/audit").await, 403, "still no audit.read");
        let denies = kernel.audit(&admin, "action=authz.deny").await;
        assert!(denies.len() >= 8, "every refusal audited: {}", denies.len());

        // The tenant administrator gives what it holds, canon permissions and prefixes included.
        let r = kernel.as_(&admin, Method::POST, "/api/kernel/roles").json(&json!({"name": "users", "permissions": ["kernel.user.*"]})).send().await.unwrap();
        assert_eq!(r.status(), 201);
    }

    // Reproduced 2: a user manager reset the administrator's password and logged in as them.
    async fn a_user_manager_cannot_take_over_a_stronger_account(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        let mallory = user_with(&kernel, &admin, "mallory@acme.example", &["kernel.user.manage", "kernel.user.read"]).await;
        let target = &admin.subject_id;

        let r = kernel.as_(&mallory, Method::POST, &format!("/api/kernel/users/{target}/password"))
            .json(&json!({"password": "mallory owns this now"})).send().await.unwrap();
        let problem = expect_problem(r, 403, "FORBIDDEN").await;
        assert!(problem["missing_permissions"].as_array().is_some_and(|m| !m.is_empty()));
        assert!(kernel.login("acme", "admin@acme.example", "mallory owns this now").await.is_err());
        for (method, path, body) in [
            (Method::PATCH, format!("/api/kernel/users/{target}"), json!({"status": "suspended"})),
            (Method::POST, format!("/api/kernel/users/{target}/sessions/revoke"), json!({})),
        ] {
            let r = kernel.as_(&mallory, method, &path).json(&body).send().await.unwrap();
            expect_problem(r, 403, "FORBIDDEN").await;
        }
        assert_eq!(status_of(&kernel, &admin, Method::GET, "/api/kernel/users").await, 200, "the administrator's session stands");

        // A peer whose permissions Mallory could give is within reach.
        let peer = user_with(&kernel, &admin, "peer@acme.example", &["kernel.user.read"]).await;
        let r = kernel.as_(&mallory, Method::POST, &format!("/api/kernel/users/{}/password", peer.subject_id))
            .json(&json!({"password": "a new long passphrase"})).send().await.unwrap();
        assert_eq!(r.status(), 204);
        // ...but not one holding a delegation Mallory could not give.
        let audit_reader = kernel.user(&admin, "delegate@acme.example").await;
        let r = kernel.as_(&admin, Method::POST, "/api/kernel/delegations")
            .json(&json!({"to_user_id": audit_reader, "permissions": ["kernel.audit.read"], "expires_at": in_minutes(60), "reason": "quarter close"})).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let r = kernel.as_(&mallory, Method::POST, &format!("/api/kernel/users/{audit_reader}/password"))
            .json(&json!({"password": "a new long passphrase"})).send().await.unwrap();
        let problem = expect_problem(r, 403, "FORBIDDEN").await;
        assert_eq!(problem["missing_permissions"], json!(["kernel.audit.read"]));
    }

    // Reproduced 3: break-glass to kernel.role.manage, then a lasting role.
    async fn break_glass_cannot_reach_identity_or_permission_management(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        let henry = user_with(&kernel, &admin, "henry@acme.example", &["kernel.breakglass.request"]).await;
        let r = kernel.as_(&henry, Method::POST, "/api/kernel/break-glass")
            .json(&json!({"permissions": ["kernel.role.manage"], "reason": "incident 4521: payroll stuck", "duration_minutes": 60})).send().await.unwrap();
        expect_problem(r, 403, "FORBIDDEN").await;
        // Elevated to something allowed, Henry still cannot give it away.
        let r = kernel.as_(&henry, Method::POST, "/api/kernel/break-glass")
            .json(&json!({"permissions": ["kernel.audit.read", "kernel.role.read"], "reason": "incident 4521: payroll stuck", "duration_minutes": 60})).send().await.unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(status_of(&kernel, &henry, Method::GET, "/api/kernel/audit").await, 200);

        // In the system tenant the same path reached platform.admin.
        let root_roles: Value = kernel.as_(&platform, Method::GET, "/api/kernel/roles?limit=1000").send().await.unwrap().json().await.unwrap();
        let platform_role = root_roles["items"].as_array().unwrap().iter().find(|r| r["name"] == "platform.admin").unwrap()["id"].as_str().unwrap().to_owned();
        let operator = user_with(&kernel, &platform, "oncall@example.com", &["kernel.breakglass.request"]).await;
        let r = kernel.as_(&operator, Method::POST, "/api/kernel/break-glass")
            .json(&json!({"permissions": ["kernel.role.manage"], "reason": "incident 4521: payroll stuck", "duration_minutes": 60})).send().await.unwrap();
        expect_problem(r, 403, "FORBIDDEN").await;
        let r = kernel.as_(&operator, Method::POST, &format!("/api/kernel/users/{}/roles", operator.subject_id))
            .json(&json!({"role_id": platform_role})).send().await.unwrap();
        expect_problem(r, 403, "FORBIDDEN").await;
        assert_eq!(status_of(&kernel, &operator, Method::GET, "/api/kernel/tenants").await, 403);
    }

    // Reproduced 4: a delegation outlived its delegator's role (and suspension).
    async fn a_delegation_ends_with_its_delegators_rights(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        let frank_id = kernel.user(&admin, "frank@acme.example").await;
        let grace_id = kernel.user(&admin, "grace@acme.example").await;
        let delegator = kernel.role(&admin, "delegator", &["kernel.delegation.create", "kernel.user.read"]).await;
        kernel.assign(&admin, &frank_id, &delegator).await;
        let frank = kernel.login("acme", "frank@acme.example", PASSWORD).await.unwrap();
        let grace = kernel.login("acme", "grace@acme.example", PASSWORD).await.unwrap();
        let delegate = || kernel.as_(&frank, Method::POST, "/api/kernel/delegations")
            .json(&json!({"to_user_id": grace_id, "permissions": ["kernel.user.read"], "expires_at": in_minutes(60 * 24 * 20), "reason": "holiday cover"}));
        assert_eq!(delegate().send().await.unwrap().status(), 201);
        assert_eq!(status_of(&kernel, &grace, Method::GET, "/api/kernel/users").await, 200);

        let r = kernel.as_(&admin, Method::DELETE, &format!("/api/kernel/users/{frank_id}/roles/{delegator}")).send().await.unwrap();
        assert_eq!(r.status(), 204);
        assert_eq!(status_of(&kernel, &grace, Method::GET, "/api/kernel/users").await, 403, "the delegator no longer holds it");
        kernel.assign(&admin, &frank_id, &delegator).await;
        assert_eq!(status_of(&kernel, &grace, Method::GET, "/api/kernel/users").await, 200, "held again, in force again");

        let r = kernel.as_(&admin, Method::PATCH, &format!("/api/kernel/users/{frank_id}")).json(&json!({"status": "suspended"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(status_of(&kernel, &grace, Method::GET, "/api/kernel/users").await, 403, "a suspended delegator's delegation is not in force");
    }

    // Reproduced 5: sessions survived a reset by an administrator and a suspension.
    async fn a_reset_or_a_suspension_ends_every_session(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        let ivy = user_with(&kernel, &admin, "ivy@acme.example", &["kernel.user.read"]).await;
        let refresh = |token: String| kernel.client.post(kernel.url("/api/kernel/auth/refresh")).json(&json!({"refresh_token": token}));

        let r = kernel.as_(&admin, Method::POST, &format!("/api/kernel/users/{}/password", ivy.subject_id))
            .json(&json!({"password": "reset by the administrator"})).send().await.unwrap();
        assert_eq!(r.status(), 204);
        assert_eq!(status_of(&kernel, &ivy, Method::GET, "/api/kernel/users").await, 401, "access token");
        assert_eq!(refresh(ivy.refresh_token.clone().unwrap()).send().await.unwrap().status(), 401, "refresh token");
        let entries = kernel.audit(&admin, "action=user.password_changed").await;
        assert_eq!(entries[0]["details"]["sessions_revoked"], 1);

        let ivy = kernel.login("acme", "ivy@acme.example", "reset by the administrator").await.unwrap();
        let path = format!("/api/kernel/users/{}", ivy.subject_id);
        let r = kernel.as_(&admin, Method::PATCH, &path).json(&json!({"status": "suspended"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = kernel.as_(&admin, Method::PATCH, &path).json(&json!({"status": "active"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(status_of(&kernel, &ivy, Method::GET, "/api/kernel/users").await, 401, "not back after reactivation");
        assert_eq!(refresh(ivy.refresh_token.clone().unwrap()).send().await.unwrap().status(), 401);

        // Changing one's own password keeps the session it is changed from, and ends the others.
        let here = kernel.login("acme", "ivy@acme.example", "reset by the administrator").await.unwrap();
        let elsewhere = kernel.login("acme", "ivy@acme.example", "reset by the administrator").await.unwrap();
        let own_role = kernel.role(&admin, "self-service", &["kernel.user.manage"]).await;
        kernel.assign(&admin, &here.subject_id, &own_role).await;
        let r = kernel.as_(&here, Method::POST, &format!("/api/kernel/users/{}/password", here.subject_id))
            .json(&json!({"password": "changed by ivy herself"})).send().await.unwrap();
        assert_eq!(r.status(), 204);
        assert_eq!(status_of(&kernel, &here, Method::GET, "/api/kernel/users").await, 200);
        assert_eq!(status_of(&kernel, &elsewhere, Method::GET, "/api/kernel/auth/me").await, 401);

        // On demand: every session, refresh tokens included.
        let r = kernel.as_(&admin, Method::POST, &format!("/api/kernel/users/{}/sessions/revoke", here.subject_id)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["revoked_sessions"], 1);
        assert_eq!(status_of(&kernel, &here, Method::GET, "/api/kernel/auth/me").await, 401);
        assert_eq!(refresh(here.refresh_token.clone().unwrap()).send().await.unwrap().status(), 401);
        let entries = kernel.audit(&admin, &format!("action=session.revoked&resource_id={}", here.subject_id)).await;
        assert_eq!(entries.len(), 1);
    }

    async fn service_accounts_can_be_suspended_and_their_secrets_guarded(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        let auditors = kernel.role(&admin, "auditors", &["kernel.audit.read"]).await;
        let created: Value = kernel.as_(&admin, Method::POST, "/api/kernel/service-accounts")
            .json(&json!({"name": "ledger", "role_ids": [auditors]})).send().await.unwrap().json().await.unwrap();
        let (id, client_id, secret) = (created["id"].as_str().unwrap(), created["client_id"].as_str().unwrap(), created["client_secret"].as_str().unwrap());
        let grant = |secret: &str| kernel.client.post(kernel.url("/api/kernel/auth/token"))
            .json(&json!({"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}));
        let token: Value = grant(secret).send().await.unwrap().json().await.unwrap();
        let service = Session { access_token: token["access_token"].as_str().unwrap().to_owned(), refresh_token: None, tenant_id: admin.tenant_id.clone(), subject_id: id.to_owned() };
        assert_eq!(status_of(&kernel, &service, Method::GET, "/api/kernel/audit").await, 200);

        // A service-account manager who lacks what the account holds can neither give it roles nor take it over.
        let sam = user_with(&kernel, &admin, "sam@acme.example", &["kernel.service_account.manage"]).await;
        let r = kernel.as_(&sam, Method::POST, "/api/kernel/service-accounts").json(&json!({"name": "mine", "role_ids": [auditors]})).send().await.unwrap();
        expect_problem(r, 403, "FORBIDDEN").await;
        let r = kernel.as_(&sam, Method::POST, &format!("/api/kernel/service-accounts/{id}/secret")).send().await.unwrap();
        expect_problem(r, 403, "FORBIDDEN").await;
        let r = kernel.as_(&sam, Method::PATCH, &format!("/api/kernel/service-accounts/{id}")).json(&json!({"status": "suspended"})).send().await.unwrap();
        expect_problem(r, 403, "FORBIDDEN").await;

        let r = kernel.as_(&admin, Method::PATCH, &format!("/api/kernel/service-accounts/{id}")).header("if-match", "\"1\"").json(&json!({"status": "suspended"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["etag"], "\"2\"");
        assert_eq!(status_of(&kernel, &service, Method::GET, "/api/kernel/audit").await, 401, "its token ends");
        assert_eq!(grant(secret).send().await.unwrap().status(), 401, "its credentials are refused");
        let r = kernel.as_(&admin, Method::PATCH, &format!("/api/kernel/service-accounts/{id}")).header("if-match", "\"1\"").json(&json!({"status": "active"})).send().await.unwrap();
        expect_problem(r, 412, "PRECONDITION_FAILED").await;
        let r = kernel.as_(&admin, Method::PATCH, &format!("/api/kernel/service-accounts/{id}")).json(&json!({"status": "active"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let token: Value = grant(secret).send().await.unwrap().json().await.unwrap();
        let service = Session { access_token: token["access_token"].as_str().unwrap().to_owned(), ..service };
        assert_eq!(status_of(&kernel, &service, Method::GET, "/api/kernel/audit").await, 200);

        // A rotation ends the tokens the old secret obtained.
        let r = kernel.as_(&admin, Method::POST, &format!("/api/kernel/service-accounts/{id}/secret")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(status_of(&kernel, &service, Method::GET, "/api/kernel/audit").await, 401);
        assert_eq!(grant(secret).send().await.unwrap().status(), 401);
        let actions: Vec<String> = kernel.audit(&admin, "resource_type=service_account").await.iter().map(|e| e["action"].as_str().unwrap().to_owned()).collect();
        for expected in ["service_account.suspended", "service_account.updated", "service_account.secret_rotated"] {
            assert!(actions.iter().any(|a| a == expected), "{expected} in {actions:?}");
        }

        let r = kernel.as_(&admin, Method::PATCH, &format!("/api/kernel/service-accounts/{id}")).json(&json!({"status": "gone"})).send().await.unwrap();
        expect_problem(r, 400, "VALIDATION_ERROR").await;
        let r = kernel.as_(&admin, Method::GET, "/api/kernel/service-accounts/not-a-uuid").send().await.unwrap();
        expect_problem(r, 400, "VALIDATION_ERROR").await;
    }

    async fn another_tenants_subjects_are_not_found(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let a = kernel.tenant_with_admin(&platform, "acme").await;
        let b = kernel.tenant_with_admin(&platform, "globex").await;
        let b_user = kernel.user(&b, "bob@globex.example").await;
        let b_account: Value = kernel.as_(&b, Method::POST, "/api/kernel/service-accounts").json(&json!({"name": "ledger"})).send().await.unwrap().json().await.unwrap();
        let b_account = b_account["id"].as_str().unwrap();
        for (method, path, body) in [
            (Method::POST, format!("/api/kernel/users/{b_user}/sessions/revoke"), json!({})),
            (Method::POST, format!("/api/kernel/users/{b_user}/password"), json!({"password": "a new long passphrase"})),
            (Method::PATCH, format!("/api/kernel/users/{b_user}"), json!({"status": "suspended"})),
            (Method::GET, format!("/api/kernel/service-accounts/{b_account}"), json!({})),
            (Method::PATCH, format!("/api/kernel/service-accounts/{b_account}"), json!({"status": "suspended"})),
            (Method::POST, format!("/api/kernel/service-accounts/{b_account}/secret"), json!({})),
        ] {
            let r = kernel.as_(&a, method.clone(), &path).json(&body).send().await.unwrap();
            expect_problem(r, 404, "NOT_FOUND").await;
        }
        assert_eq!(status_of(&kernel, &b, Method::GET, "/api/kernel/users").await, 200);
    }
}

crate::both_engines! {
    async fn fifty_parallel_guesses_get_at_most_five_verifications(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        kernel.user(&admin, "ivy@acme.example").await;
        // Concurrent logins with the right password take turns, none is refused.
        kernel.user(&admin, "svc@acme.example").await;
        let logins = (0..12).map(|_| {
            let request = kernel.client.post(kernel.url("/api/kernel/auth/login"))
                .json(&json!({"tenant": "acme", "email": "svc@acme.example", "password": PASSWORD}));
            async move { request.send().await.unwrap().status().as_u16() }
        });
        assert_eq!(futures_join_all(logins).await, vec![200; 12]);

        let guesses = (0..50).map(|i| {
            let request = kernel.client.post(kernel.url("/api/kernel/auth/login"))
                .json(&json!({"tenant": "acme", "email": "ivy@acme.example", "password": format!("guess number {i:04}")}));
            async move { request.send().await.unwrap().status().as_u16() }
        });
        let statuses = futures_join_all(guesses).await;
        let verified = statuses.iter().filter(|s| **s == 401).count();
        let throttled = statuses.iter().filter(|s| **s == 429).count();
        assert!(verified <= 5, "{verified} guesses were verified: {statuses:?}");
        assert_eq!(verified + throttled, 50, "{statuses:?}");
        let failures = kernel.audit(&admin, "action=auth.login_failed").await;
        assert!(failures.len() <= 5, "{} failures audited", failures.len());

        // The tenant's slug and its id are one bucket: the right password is refused too.
        let by_id = kernel.client.post(kernel.url("/api/kernel/auth/login"))
            .json(&json!({"tenant": admin.tenant_id, "email": "ivy@acme.example", "password": PASSWORD})).send().await.unwrap();
        expect_problem(by_id, 429, "RATE_LIMITED").await;
    }
}

/// Joins futures without a dependency: each is spawned on the test's runtime.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<u16>
where
    F: std::future::Future<Output = u16> + Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

/// SPEC §4 **Client address**: `X-Forwarded-For` is believed from trusted proxies only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_address_comes_from_trusted_proxies_only() {
    use aibos_testkit::{Engine, KernelOptions, spawn_kernel_with};
    let login_from = |kernel: &TestKernel, forwarded: &'static str| {
        kernel.client.post(kernel.url("/api/kernel/auth/login"))
            .header("x-forwarded-for", forwarded)
            .json(&json!({"tenant": "system", "email": "root@example.com", "password": "not the password"}))
            .send()
    };
    // The test client connects from 127.0.0.1: trusted here…
    let behind_proxy = spawn_kernel_with(
        Engine::Sqlite,
        KernelOptions {
            env: vec![(
                "AIBOS_SERVER__TRUSTED_PROXIES".into(),
                "[\"127.0.0.0/8\", \"10.0.0.0/8\"]".into(),
            )],
            ..KernelOptions::default()
        },
    )
    .await
    .unwrap();
    let admin = behind_proxy.platform_admin().await;
    login_from(&behind_proxy, "6.6.6.6, 198.51.100.7, 10.1.1.1")
        .await
        .unwrap();
    let entries = behind_proxy.audit(&admin, "action=auth.login_failed").await;
    assert_eq!(entries[0]["client_ip"], "198.51.100.7");

    // …and an ordinary peer otherwise, whatever it claims.
    let direct = spawn_kernel(Engine::Sqlite).await.unwrap();
    let admin = direct.platform_admin().await;
    login_from(&direct, "198.51.100.7").await.unwrap();
    let entries = direct.audit(&admin, "action=auth.login_failed").await;
    assert_eq!(entries[0]["client_ip"], "127.0.0.1");
}

crate::both_engines! {
    // SQLite has no NOTIFY: the offline command line's changes travel by the invalidation log.
    async fn offline_command_line_changes_reach_a_running_kernel_within_seconds(engine: Engine) {
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        assert_eq!(status_of(&kernel, &admin, Method::GET, "/api/kernel/auth/me").await, 200, "cached");
        let cwd = tempfile::tempdir().unwrap();
        let cli = |args: &[&str]| {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_aibos"))
                .args(args)
                .current_dir(cwd.path())
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("AIBOS_DATABASE__URL", kernel.db.url())
                .env("AIBOS_AUTH__MASTER_KEY", aibos_testkit::TEST_MASTER_KEY)
                .output()
                .unwrap();
            assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        };
        let within = |seconds: u64| std::time::Instant::now() + std::time::Duration::from_secs(seconds);

        cli(&["tenant", "suspend", "acme"]);
        let deadline = within(5);
        loop {
            let r = kernel.as_(&admin, Method::GET, "/api/kernel/auth/me").send().await.unwrap();
            if r.status() == 403 {
                expect_problem(r, 403, "TENANT_SUSPENDED").await;
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the suspension did not reach the kernel");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }

        cli(&["keys", "rotate"]);
        let deadline = within(5);
        loop {
            let jwks: Value = kernel.client.get(kernel.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
            if jwks["keys"].as_array().unwrap().len() == 2 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the rotation did not reach the kernel");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// The property of SPEC §4 **No escalation**, over random role sets,
/// delegations, break-glass grants and calls: whatever a user does through the
/// API, their own grantable permissions do not grow, and no other subject ends
/// up holding anything outside what the user could give (or held already).
mod no_escalation_property {
    use aibos_kernel::authz::store::subject_permissions;
    use aibos_testkit::Engine;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    use super::*;

    const POOL: &[&str] = &[
        "kernel.user.read",
        "kernel.user.manage",
        "kernel.role.read",
        "kernel.role.manage",
        "kernel.audit.read",
        "kernel.delegation.create",
        "kernel.breakglass.request",
        "kernel.service_account.manage",
        "kernel.event.read",
    ];
    const PREFIXES: &[&str] = &["kernel.user.*", "kernel.role.*", "kernel.event.*"];

    fn pick(mask: u16) -> Vec<&'static str> {
        POOL.iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, p)| *p)
            .collect()
    }

    #[derive(Debug, Clone)]
    enum Op {
        CreateRole(u16, Option<usize>),
        UpdateRole(usize, u16),
        AssignToSelf(usize),
        AssignToVictim(usize),
        UnassignFromVictim(usize),
        Delegate(u16),
        BreakGlass(u16),
        ResetVictimPassword,
        SuspendVictim,
        RevokeVictimSessions,
        ServiceAccount(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u16>(), proptest::option::of(0..PREFIXES.len()))
                .prop_map(|(m, p)| Op::CreateRole(m, p)),
            (0..8usize, any::<u16>()).prop_map(|(r, m)| Op::UpdateRole(r, m)),
            (0..8usize).prop_map(Op::AssignToSelf),
            (0..8usize).prop_map(Op::AssignToVictim),
            (0..8usize).prop_map(Op::UnassignFromVictim),
            any::<u16>().prop_map(Op::Delegate),
            any::<u16>().prop_map(Op::BreakGlass),
            Just(Op::ResetVictimPassword),
            Just(Op::SuspendVictim),
            Just(Op::RevokeVictimSessions),
            (0..8usize).prop_map(Op::ServiceAccount),
        ]
    }

    async fn held(
        kernel: &TestKernel,
        tenant: &str,
        subject: &str,
    ) -> aibos_kernel::authz::store::SubjectPermissions {
        subject_permissions(
            kernel.state.db(),
            tenant,
            subject,
            time::OffsetDateTime::now_utc(),
        )
        .await
        .unwrap()
    }

    async fn case(
        engine: Engine,
        masks: (u16, u16, u16, u16),
        ops: Vec<Op>,
    ) -> Result<(), TestCaseError> {
        let (attacker_mask, victim_mask, other_mask, delegated_mask) = masks;
        let kernel = spawn_kernel(engine).await.unwrap();
        let platform = kernel.platform_admin().await;
        let admin = kernel.tenant_with_admin(&platform, "acme").await;
        let attacker = user_with(&kernel, &admin, "a@acme.example", &pick(attacker_mask)).await;
        let victim_id = kernel.user(&admin, "v@acme.example").await;
        let mut roles = vec![tenant_admin_role(&kernel, &admin).await];
        for (name, mask) in [("victim", victim_mask), ("other", other_mask)] {
            if !pick(mask).is_empty() {
                roles.push(kernel.role(&admin, name, &pick(mask)).await);
            }
        }
        if let Some(victim_role) = roles
            .get(1)
            .cloned()
            .filter(|_| !pick(victim_mask).is_empty())
        {
            kernel.assign(&admin, &victim_id, &victim_role).await;
        }
        if !pick(delegated_mask).is_empty() {
            let r = kernel.as_(&admin, Method::POST, "/api/kernel/delegations")
                .json(&json!({"to_user_id": attacker.subject_id, "permissions": pick(delegated_mask), "expires_at": in_minutes(60), "reason": "cover"})).send().await.unwrap();
            prop_assert_eq!(r.status().as_u16(), 201);
        }
        // The user acts with the session it has, refreshed after its own
        // session-ending calls (it may remove its own role, say).
        let attacker = kernel
            .login("acme", "a@acme.example", PASSWORD)
            .await
            .unwrap();
        let tenant = admin.tenant_id.clone();
        let before = held(&kernel, &tenant, &attacker.subject_id).await;
        let grantable = before.own;
        let victim_before = held(&kernel, &tenant, &victim_id).await;
        let mut victim_may_hold = victim_before.all.clone();
        victim_may_hold.extend(&grantable);
        let mut accounts = Vec::new();

        for op in ops {
            let role = |i: usize| roles[i % roles.len()].clone();
            let send = |method: Method, path: String, body: Value| {
                kernel.as_(&attacker, method, &path).json(&body).send()
            };
            let status = match &op {
                Op::CreateRole(mask, prefix) => {
                    let mut permissions: Vec<&str> = pick(*mask);
                    permissions.extend(prefix.map(|p| PREFIXES[p]));
                    let r = send(Method::POST, "/api/kernel/roles".into(), json!({"name": format!("r{}", roles.len()), "permissions": permissions})).await.unwrap();
                    let status = r.status().as_u16();
                    if status == 201 {
                        let body: Value = r.json().await.unwrap();
                        roles.push(body["id"].as_str().unwrap().to_owned());
                    }
                    status
                }
                Op::UpdateRole(i, mask) => send(Method::PATCH, format!("/api/kernel/roles/{}", role(*i)), json!({"permissions": pick(*mask)})).await.unwrap().status().as_u16(),
                Op::AssignToSelf(i) => send(Method::POST, format!("/api/kernel/users/{}/roles", attacker.subject_id), json!({"role_id": role(*i)})).await.unwrap().status().as_u16(),
                Op::AssignToVictim(i) => send(Method::POST, format!("/api/kernel/users/{victim_id}/roles"), json!({"role_id": role(*i)})).await.unwrap().status().as_u16(),
                Op::UnassignFromVictim(i) => send(Method::DELETE, format!("/api/kernel/users/{victim_id}/roles/{}", role(*i)), json!({})).await.unwrap().status().as_u16(),
                Op::Delegate(mask) => send(Method::POST, "/api/kernel/delegations".into(), json!({"to_user_id": victim_id, "permissions": pick(*mask), "expires_at": in_minutes(60), "reason": "cover"})).await.unwrap().status().as_u16(),
                Op::BreakGlass(mask) => send(Method::POST, "/api/kernel/break-glass".into(), json!({"permissions": pick(*mask), "reason": "incident 4521: payroll stuck", "duration_minutes": 30})).await.unwrap().status().as_u16(),
                Op::ResetVictimPassword => {
                    let victim_now = held(&kernel, &tenant, &victim_id).await;
                    let status = send(Method::POST, format!("/api/kernel/users/{victim_id}/password"), json!({"password": "taken over by the user"})).await.unwrap().status().as_u16();
                    if status == 204 {
                        prop_assert!(victim_now.all.outside(&grantable).is_empty(), "took over an account holding {:?} with {:?}", victim_now.all.grants(), grantable.grants());
                    }
                    status
                }
                Op::SuspendVictim => send(Method::PATCH, format!("/api/kernel/users/{victim_id}"), json!({"status": "suspended"})).await.unwrap().status().as_u16(),
                Op::RevokeVictimSessions => send(Method::POST, format!("/api/kernel/users/{victim_id}/sessions/revoke"), json!({})).await.unwrap().status().as_u16(),
                Op::ServiceAccount(i) => {
                    let r = send(Method::POST, "/api/kernel/service-accounts".into(), json!({"name": format!("sa{}", accounts.len()), "role_ids": [role(*i)]})).await.unwrap();
                    let status = r.status().as_u16();
                    if status == 201 {
                        let body: Value = r.json().await.unwrap();
                        accounts.push(body["id"].as_str().unwrap().to_owned());
                    }
                    status
                }
            };
            prop_assert!(status < 500, "{op:?} answered {status}");

            let now = held(&kernel, &tenant, &attacker.subject_id).await;
            prop_assert!(
                now.own.outside(&grantable).is_empty(),
                "after {:?} the user's grantable set grew to {:?} from {:?}",
                op,
                now.own.grants(),
                grantable.grants()
            );
            let victim_now = held(&kernel, &tenant, &victim_id).await;
            prop_assert!(
                victim_now.all.outside(&victim_may_hold).is_empty(),
                "after {:?} the other user holds {:?}",
                op,
                victim_now.all.grants()
            );
            for account in &accounts {
                let sa = held(&kernel, &tenant, account).await;
                prop_assert!(
                    sa.all.outside(&grantable).is_empty(),
                    "a service account holds {:?}",
                    sa.all.grants()
                );
            }
        }
        Ok(())
    }

    fn run(engine: Engine, cases: u32) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = (
            (any::<u16>(), any::<u16>(), any::<u16>(), any::<u16>()),
            proptest::collection::vec(op(), 1..8),
        );
        runner
            .run(&strategy, |(masks, ops)| {
                runtime.block_on(case(engine, masks, ops))
            })
            .unwrap();
    }

    #[test]
    fn sqlite() {
        run(Engine::Sqlite, 24);
    }

    #[test]
    fn postgres() {
        if Engine::postgres_admin_url().is_none() {
            eprintln!("skipped: AIBOS_TEST_DATABASE_URL is not set");
            return;
        }
        run(Engine::Postgres, 8);
    }
}
