//! Webhook subscriptions: the API (versions, secrets shown once and sealed,
//! tenancy, permissions, audit), the SSRF guard at creation, and delivery.

use aibos_kernel::db::Db;
use aibos_testkit::api::Session;
use aibos_testkit::{KernelOptions, TestKernel, spawn_kernel, spawn_kernel_with};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{both_engines, expect_problem};

/// `AIBOS_EVENTS__WEBHOOK_ALLOW_PRIVATE_NETWORKS=true` plus `extra`: the test
/// receivers listen on loopback.
fn private_networks(extra: &[(&str, &str)]) -> KernelOptions {
    let mut env = vec![(
        "AIBOS_EVENTS__WEBHOOK_ALLOW_PRIVATE_NETWORKS".to_owned(),
        "true".to_owned(),
    )];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    KernelOptions {
        env,
        ..KernelOptions::default()
    }
}

/// Creates a subscription; asserts 201 and returns the body (with its secret).
async fn subscribe(k: &TestKernel, admin: &Session, url: &str, types: &[&str]) -> Value {
    let response = k
        .as_(admin, Method::POST, "/api/kernel/subscriptions")
        .json(&json!({ "url": url, "event_types": types, "description": "test" }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    body
}

/// The stored (sealed) secret columns of a subscription.
async fn stored_secrets(db: &Db, id: &str) -> (String, Option<String>) {
    let sql = "SELECT secret, previous_secret FROM webhook_subscriptions WHERE id = $1";
    match db {
        Db::Sqlite(pool) => sqlx::query_as(sql).bind(id).fetch_one(pool).await.unwrap(),
        Db::Postgres(pool) => sqlx::query_as(sql).bind(id).fetch_one(pool).await.unwrap(),
    }
}

both_engines! {
    async fn subscriptions_are_created_read_changed_rotated_and_deleted(engine: Engine) {
        let Some(k) = spawn_kernel_with(engine, private_networks(&[])).await else { return };
        let root = k.platform_admin().await;
        let admin = k.tenant_with_admin(&root, "acme").await;

        let response = k.as_(&admin, Method::POST, "/api/kernel/subscriptions")
            .json(&json!({ "url": "http://127.0.0.1:9/hook", "event_types": ["finance.*", "kernel.user.created"], "description": "ledger sync" }))
            .send().await.unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(response.headers()["etag"], "\"1\"");
        assert_eq!(response.headers()["cache-control"], "no-store");
        let created: Value = response.json().await.unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        let secret = created["secret"].as_str().unwrap().to_owned();
        assert!(aibos_kernel::events::webhook::signature::SigningKey::parse(&secret).is_ok(), "{secret}");
        assert_eq!(created["event_types"], json!(["finance.*", "kernel.user.created"]));
        assert_eq!(created["enabled"], true);
        assert_eq!(created["version"], 1);

        // Shown once: never in a read, a list or the audit trail; sealed at rest.
        let read = k.as_(&admin, Method::GET, &format!("/api/kernel/subscriptions/{id}")).send().await.unwrap();
        assert_eq!(read.headers()["etag"], "\"1\"");
        let text = read.text().await.unwrap();
        assert!(!text.contains(&secret) && !text.contains("whsec_"), "{text}");
        let (stored, previous) = stored_secrets(k.state.db(), &id).await;
        assert!(stored.starts_with("enc:v1:") && !stored.contains(&secret[6..]), "{stored}");
        assert_eq!(previous, None);
        let entries = k.audit(&admin, "action=subscription.created").await;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["resource_id"], id.as_str());
        assert!(!entries[0].to_string().contains(&secret));

        // Lists page with a cursor.
        subscribe(&k, &admin, "http://127.0.0.1:9/other", &["a.b"]).await;
        let page: Value = k.as_(&admin, Method::GET, "/api/kernel/subscriptions?limit=1").send().await.unwrap().json().await.unwrap();
        assert_eq!(page["items"].as_array().unwrap().len(), 1);
        let cursor = page["next_cursor"].as_str().unwrap();
        let rest: Value = k.as_(&admin, Method::GET, &format!("/api/kernel/subscriptions?limit=1&cursor={cursor}")).send().await.unwrap().json().await.unwrap();
        assert_eq!(rest["items"].as_array().unwrap().len(), 1);
        assert_eq!(rest["next_cursor"], Value::Null);
        assert_ne!(page["items"][0]["id"], rest["items"][0]["id"]);

        // Changes carry versions; a stale If-Match is refused.
        let patch = |version: &str, body: Value| k.as_(&admin, Method::PATCH, &format!("/api/kernel/subscriptions/{id}"))
            .header("if-match", version.to_owned()).json(&body).send();
        let changed = patch("\"1\"", json!({ "enabled": false, "description": "paused" })).await.unwrap();
        assert_eq!(changed.status(), 200);
        assert_eq!(changed.headers()["etag"], "\"2\"");
        let changed: Value = changed.json().await.unwrap();
        assert_eq!((changed["enabled"].clone(), changed["description"].clone()), (json!(false), json!("paused")));
        expect_problem(patch("\"1\"", json!({ "enabled": true })).await.unwrap(), 412, "PRECONDITION_FAILED").await;

        // Validation names the field.
        for (body, field) in [
            (json!({ "url": "ftp://127.0.0.1/x", "event_types": ["a.b"] }), "url"),
            (json!({ "url": "http://u:p@127.0.0.1/x", "event_types": ["a.b"] }), "url"),
            (json!({ "url": "http://127.0.0.1/x", "event_types": [] }), "event_types"),
            (json!({ "url": "http://127.0.0.1/x", "event_types": ["Not A Type"] }), "event_types"),
            (json!({ "url": "http://127.0.0.1/x", "event_types": ["a.b"], "description": "x".repeat(501) }), "description"),
        ] {
            let problem = expect_problem(k.as_(&admin, Method::POST, "/api/kernel/subscriptions").json(&body).send().await.unwrap(), 400, "VALIDATION_ERROR").await;
            assert_eq!(problem["errors"][0]["field"], field, "{problem}");
        }
        // The tenant comes from the token.
        let foreign = json!({ "url": "http://127.0.0.1/x", "event_types": ["a.b"], "tenant_id": root.tenant_id });
        expect_problem(k.as_(&admin, Method::POST, "/api/kernel/subscriptions").json(&foreign).send().await.unwrap(), 400, "VALIDATION_ERROR").await;
        assert_eq!(k.audit(&admin, "action=security.cross_tenant_attempt").await.len(), 1);

        // Rotation: a new secret, shown once; the old one sealed as the previous one.
        let rotated = k.as_(&admin, Method::POST, &format!("/api/kernel/subscriptions/{id}/rotate-secret")).send().await.unwrap();
        assert_eq!(rotated.status(), 200);
        assert_eq!(rotated.headers()["cache-control"], "no-store");
        let rotated: Value = rotated.json().await.unwrap();
        let new_secret = rotated["secret"].as_str().unwrap();
        assert!(new_secret.starts_with("whsec_") && new_secret != secret);
        let read: Value = k.as_(&admin, Method::GET, &format!("/api/kernel/subscriptions/{id}")).send().await.unwrap().json().await.unwrap();
        assert_eq!(read["previous_secret_expires_at"], rotated["previous_secret_expires_at"]);
        assert_eq!(read["version"], 3);
        let (stored, previous) = stored_secrets(k.state.db(), &id).await;
        let previous = previous.unwrap();
        assert!(stored.starts_with("enc:v1:") && previous.starts_with("enc:v1:"));
        let keys = k.state.master_keys();
        assert_eq!(keys.open(&stored, &format!("webhook_subscriptions.secret:{id}")).unwrap(), new_secret);
        assert_eq!(keys.open(&previous, &format!("webhook_subscriptions.previous_secret:{id}")).unwrap(), secret);
        let entry = &k.audit(&admin, "action=subscription.secret_rotated").await[0];
        assert!(!entry.to_string().contains("whsec_"), "{entry}");

        // Another tenant sees nothing: 404 exactly as for a missing one.
        let other = k.tenant_with_admin(&root, "other").await;
        for (method, path) in [
            (Method::GET, format!("/api/kernel/subscriptions/{id}")),
            (Method::DELETE, format!("/api/kernel/subscriptions/{id}")),
            (Method::POST, format!("/api/kernel/subscriptions/{id}/rotate-secret")),
            (Method::GET, format!("/api/kernel/subscriptions/{id}/deliveries")),
        ] {
            expect_problem(k.as_(&other, method, &path).send().await.unwrap(), 404, "NOT_FOUND").await;
        }
        let theirs: Value = k.as_(&other, Method::GET, "/api/kernel/subscriptions").send().await.unwrap().json().await.unwrap();
        assert_eq!(theirs["items"], json!([]));

        // Deleting: stale version refused, then gone.
        let delete = |version: &str| k.as_(&admin, Method::DELETE, &format!("/api/kernel/subscriptions/{id}")).header("if-match", version.to_owned()).send();
        expect_problem(delete("\"2\"").await.unwrap(), 412, "PRECONDITION_FAILED").await;
        assert_eq!(delete("\"3\"").await.unwrap().status(), 204);
        expect_problem(k.as_(&admin, Method::GET, &format!("/api/kernel/subscriptions/{id}")).send().await.unwrap(), 404, "NOT_FOUND").await;
        assert_eq!(k.audit(&admin, "action=subscription.deleted").await.len(), 1);
    }

    async fn managing_subscriptions_takes_its_permissions(engine: Engine) {
        let Some(k) = spawn_kernel_with(engine, private_networks(&[])).await else { return };
        let root = k.platform_admin().await;
        let admin = k.tenant_with_admin(&root, "acme").await;
        let created = subscribe(&k, &admin, "http://127.0.0.1:9/hook", &["a.b"]).await;
        let id = created["id"].as_str().unwrap();

        let reader = k.user(&admin, "reader@example.com").await;
        let role = k.role(&admin, "hook-readers", &["kernel.subscription.read"]).await;
        k.assign(&admin, &reader, &role).await;
        let reader = k.login("acme", "reader@example.com", aibos_testkit::api::PASSWORD).await.unwrap();
        assert_eq!(k.as_(&reader, Method::GET, "/api/kernel/subscriptions").send().await.unwrap().status(), 200);
        assert_eq!(k.as_(&reader, Method::GET, &format!("/api/kernel/subscriptions/{id}/deliveries")).send().await.unwrap().status(), 200);
        let denied = expect_problem(
            k.as_(&reader, Method::POST, "/api/kernel/subscriptions").json(&json!({ "url": "http://127.0.0.1:9/x", "event_types": ["a.b"] })).send().await.unwrap(),
            403, "FORBIDDEN").await;
        assert_eq!(denied["missing_permissions"], json!(["kernel.subscription.manage"]));
        expect_problem(k.as_(&reader, Method::POST, &format!("/api/kernel/subscriptions/{id}/rotate-secret")).send().await.unwrap(), 403, "FORBIDDEN").await;
        expect_problem(k.as_(&reader, Method::POST, &format!("/api/kernel/subscriptions/{id}/replay")).json(&json!({ "since_seq": 1 })).send().await.unwrap(), 403, "FORBIDDEN").await;

        k.user(&admin, "nobody@example.com").await;
        let nobody = k.login("acme", "nobody@example.com", aibos_testkit::api::PASSWORD).await.unwrap();
        let denied = expect_problem(k.as_(&nobody, Method::GET, "/api/kernel/subscriptions").send().await.unwrap(), 403, "FORBIDDEN").await;
        assert_eq!(denied["missing_permissions"], json!(["kernel.subscription.read"]));
    }

    async fn private_link_local_and_loopback_receivers_are_refused_by_default(engine: Engine) {
        let Some(k) = spawn_kernel(engine).await else { return };
        let root = k.platform_admin().await;
        let admin = k.tenant_with_admin(&root, "acme").await;
        // A real listener, so nothing but the guard can refuse "localhost".
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let urls = [
            "http://169.254.169.254/latest/meta-data/".to_owned(),
            "http://10.0.0.1/hook".to_owned(),
            format!("http://localhost:{port}/hook"),
            "http://[::ffff:127.0.0.1]/hook".to_owned(),
        ];
        for url in &urls {
            let response = k.as_(&admin, Method::POST, "/api/kernel/subscriptions")
                .json(&json!({ "url": url, "event_types": ["a.b"] })).send().await.unwrap();
            let problem = expect_problem(response, 400, "VALIDATION_ERROR").await;
            assert_eq!(problem["errors"][0]["field"], "url", "{url}: {problem}");
        }
        // Changing a subscription's URL to one is refused the same way.
        let public = subscribe(&k, &admin, "https://93.184.216.34/hook", &["a.b"]).await;
        let response = k.as_(&admin, Method::PATCH, &format!("/api/kernel/subscriptions/{}", public["id"].as_str().unwrap()))
            .json(&json!({ "url": "http://10.0.0.1/hook" })).send().await.unwrap();
        expect_problem(response, 400, "VALIDATION_ERROR").await;

        // With the switch on, the same URLs are accepted.
        let Some(open) = spawn_kernel_with(engine, private_networks(&[])).await else { return };
        let root = open.platform_admin().await;
        let admin = open.tenant_with_admin(&root, "acme").await;
        for url in &urls {
            subscribe(&open, &admin, url, &["a.b"]).await;
        }
    }
}
