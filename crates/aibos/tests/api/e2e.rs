//! End to end (issue 22): the real `aibos` and `payment-hub` binaries as two
//! processes talking over HTTP, as they are deployed, on SQLite and on
//! PostgreSQL (the kernel's and the hub's databases both on the engine under
//! test): the seed's ten-step chain, its Day 5 gate, a kernel outage while the
//! hub takes payments, and `aibos demo` run as a newcomer runs it.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aibos_testkit::hub::{HubProcess, free_port};
use aibos_testkit::process::KernelProcess;
use aibos_testkit::{Engine, TEST_MASTER_KEY, TestDb};
use aibos_wire::assertion::{ASSERTION_LIFETIME_SECONDS, AssertionClaims, secret_kid};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::both_engines;

const AIBOS: &str = env!("CARGO_BIN_EXE_aibos");
const BOOTSTRAP_KEY: &str = "an-e2e-bootstrap-key-of-some-length";
const ROOT_EMAIL: &str = "root@platform.example";
const ROOT_PASSWORD: &str = "the bootstrap passphrase";
const ROOT_NEW_PASSWORD: &str = "a changed root passphrase";
const PASSWORD: &str = "an acme passphrase 1";
const CANON: &str = "payment-hub";

/// One answer: status, JSON body (Null when empty), headers.
struct Answer {
    status: StatusCode,
    body: Value,
    headers: reqwest::header::HeaderMap,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.body)
    }
}

/// A call to `base` + `path`; `headers` include the correlation id when a step wants one.
async fn call(
    base: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = reqwest::Client::new().request(method, format!("{base}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("the call reaches the server");
    let (status, headers) = (response.status(), response.headers().clone());
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(if text.is_empty() {
        Value::Null
    } else {
        Value::String(text)
    });
    Answer {
        status,
        body,
        headers,
    }
}

async fn login(
    base: &str,
    tenant: &str,
    email: &str,
    password: &str,
    correlation: Option<&str>,
) -> Answer {
    let headers: Vec<(&str, &str)> = correlation
        .map(|c| vec![("x-correlation-id", c)])
        .unwrap_or_default();
    call(
        base,
        Method::POST,
        "/api/kernel/auth/login",
        None,
        Some(json!({"tenant": tenant, "email": email, "password": password})),
        &headers,
    )
    .await
}

fn token(answer: &Answer) -> String {
    answer.body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("a token: {answer:?}"))
        .to_owned()
}

/// A correlation id of its own for each step (a UUID, as SPEC §3 requires).
fn correlation(step: u32) -> String {
    format!("0197e2e0-0000-7000-8000-{step:012}")
}

/// The kernel binary on `port` over `database` (None: SQLite in `cwd`).
async fn start_kernel(cwd: &Path, port: u16, database: Option<&str>) -> KernelProcess {
    let bind = format!("127.0.0.1:{port}");
    let mut env = vec![
        ("AIBOS_SERVER__BIND", bind.as_str()),
        ("AIBOS_AUTH__BOOTSTRAP_KEY", BOOTSTRAP_KEY),
        // Known, so that `aibos backup` and `restore` run beside it can open
        // its secrets.
        ("AIBOS_AUTH__MASTER_KEY", TEST_MASTER_KEY),
        ("AIBOS_GATEWAY__HEALTH_INTERVAL_SECONDS", "1"),
    ];
    if let Some(url) = database {
        env.push(("AIBOS_DATABASE__URL", url));
    }
    KernelProcess::start(Path::new(AIBOS), cwd, &env)
        .await
        .expect("the kernel starts")
}

/// A database for the hub on `engine`, and its URL (SQLite: a file in `cwd`).
async fn hub_database(engine: Engine, cwd: &Path) -> Option<(Option<TestDb>, String)> {
    match engine {
        Engine::Sqlite => Some((
            None,
            format!("sqlite://{}", cwd.join("hub/payment-hub.db").display()),
        )),
        Engine::Postgres => {
            let db = TestDb::create(Engine::Postgres).await?;
            let url = db.url().to_owned();
            Some((Some(db), url))
        }
    }
}

/// The hub's binary on `port`, a cell of the kernel at `kernel_url`.
async fn start_hub(
    port: u16,
    database_url: &str,
    secret: &str,
    kernel_url: &str,
    client: (&str, &str),
) -> HubProcess {
    let address = format!("127.0.0.1:{port}").parse().expect("an address");
    HubProcess::start(
        address,
        &[
            ("PAYMENT_HUB_DATABASE_URL", database_url),
            ("AIBOS_CANON_NAME", CANON),
            ("AIBOS_ASSERTION_SECRETS", secret),
            ("AIBOS_KERNEL_URL", kernel_url),
            ("AIBOS_CLIENT_ID", client.0),
            ("AIBOS_CLIENT_SECRET", client.1),
        ],
    )
    .await
    .expect("the hub starts")
}

/// The hub's endpoints as routes: method, path, permission, idempotency, audit every call.
const ROUTES: [(&str, &str, Option<&str>, &str, bool); 9] = [
    ("GET", "/ping", None, "off", false),
    ("GET", "/health", None, "off", false),
    (
        "POST",
        "/payments/process",
        Some("finance.payment.execute"),
        "required",
        true,
    ),
    (
        "GET",
        "/payments/status/{id}",
        Some("finance.payment.read"),
        "off",
        false,
    ),
    (
        "POST",
        "/ledger/accounts",
        Some("finance.ledger.manage"),
        "optional",
        true,
    ),
    (
        "GET",
        "/ledger/accounts/{id}",
        Some("finance.payment.read"),
        "off",
        false,
    ),
    (
        "GET",
        "/ledger/trial-balance",
        Some("finance.payment.read"),
        "off",
        false,
    ),
    (
        "POST",
        "/chaos/fail/{cell}",
        Some("finance.chaos.manage"),
        "off",
        true,
    ),
    (
        "POST",
        "/chaos/recover/{cell}",
        Some("finance.chaos.manage"),
        "off",
        true,
    ),
];

fn canon_body(hub_port: u16) -> Value {
    json!({
        "name": CANON, "base_url": format!("http://127.0.0.1:{hub_port}"), "health_path": "/ping",
        "permissions": [
            {"name": "finance.payment.execute", "description": "Post payments"},
            {"name": "finance.payment.read", "description": "Read payments and the ledger"},
            {"name": "finance.ledger.manage", "description": "Open and fund accounts"},
            {"name": "finance.chaos.manage", "description": "Fail and recover the hub's cells"},
        ],
    })
}

async fn add_routes(base: &str, root: &str, canon_id: &str, correlation: &str) {
    for (method, path, permission, idempotency, audit_calls) in ROUTES {
        let body = json!({
            "canon_id": canon_id, "method": method, "path": path,
            "required_permissions": permission.into_iter().collect::<Vec<_>>(),
            "public_to_authenticated": permission.is_none(), "idempotency": idempotency, "audit_calls": audit_calls,
        });
        let created = call(
            base,
            Method::POST,
            "/api/kernel/routes",
            Some(root),
            Some(body),
            &[("x-correlation-id", correlation)],
        )
        .await;
        assert_eq!(
            created.status,
            StatusCode::CREATED,
            "{method} {path}: {created:?}"
        );
    }
}

/// Everything deployed: both processes, the platform administrator, tenant
/// `acme` with its administrator and an operator holding the payment role,
/// the hub's service account, two funded EUR accounts.
struct Deployment {
    cwd: tempfile::TempDir,
    kernel_db: Option<TestDb>,
    kernel: KernelProcess,
    kernel_port: u16,
    _hub_db: Option<TestDb>,
    hub: HubProcess,
    acme_admin: String,
    operator: String,
    tenant_id: String,
    operator_id: String,
    canon_secret: String,
    alice: String,
    bob: String,
}

impl Deployment {
    fn base(&self) -> &str {
        &self.kernel.base_url
    }

    async fn start(engine: Engine) -> Option<Deployment> {
        let kernel_db = match engine {
            Engine::Sqlite => None,
            Engine::Postgres => Some(TestDb::create(engine).await?),
        };
        let cwd = tempfile::tempdir().unwrap();
        let (kernel_port, hub_port) = (free_port(), free_port());
        let kernel =
            start_kernel(cwd.path(), kernel_port, kernel_db.as_ref().map(TestDb::url)).await;
        let base = kernel.base_url.clone();
        let bootstrap = call(
            &base,
            Method::POST,
            "/api/kernel/bootstrap",
            None,
            Some(json!({"email": ROOT_EMAIL, "password": ROOT_PASSWORD, "name": "Root"})),
            &[("x-bootstrap-key", BOOTSTRAP_KEY)],
        )
        .await;
        assert_eq!(bootstrap.status, StatusCode::CREATED, "{bootstrap:?}");
        let root = token(&login(&base, "system", ROOT_EMAIL, ROOT_PASSWORD, None).await);
        let canon = call(
            &base,
            Method::POST,
            "/api/kernel/canons",
            Some(&root),
            Some(canon_body(hub_port)),
            &[],
        )
        .await;
        assert_eq!(canon.status, StatusCode::CREATED, "{canon:?}");
        let canon_secret = canon.body["assertion_secret"]["secret"]
            .as_str()
            .unwrap()
            .to_owned();
        add_routes(
            &base,
            &root,
            canon.body["id"].as_str().unwrap(),
            &correlation(900),
        )
        .await;
        let tenant = call(
            &base,
            Method::POST,
            "/api/kernel/tenants",
            Some(&root),
            Some(json!({"slug": "acme", "name": "Acme"})),
            &[],
        )
        .await;
        let tenant_id = tenant.body["id"].as_str().unwrap().to_owned();
        let made = call(
            &base,
            Method::POST,
            &format!("/api/kernel/tenants/{tenant_id}/admins"),
            Some(&root),
            Some(json!({"email": "admin@acme.example", "name": "Admin", "password": PASSWORD})),
            &[],
        )
        .await;
        assert_eq!(made.status, StatusCode::CREATED, "{made:?}");
        let acme_admin = token(&login(&base, "acme", "admin@acme.example", PASSWORD, None).await);
        let role = call(&base, Method::POST, "/api/kernel/roles", Some(&acme_admin), Some(json!({"name": "payments",
            "permissions": ["finance.payment.execute", "finance.payment.read", "finance.chaos.manage", "kernel.event.read", "kernel.event.publish", "kernel.audit.read"]})), &[]).await;
        let user = call(
            &base,
            Method::POST,
            "/api/kernel/users",
            Some(&acme_admin),
            Some(json!({"email": "ops@acme.example", "name": "Ops", "password": PASSWORD})),
            &[],
        )
        .await;
        let operator_id = user.body["id"].as_str().unwrap().to_owned();
        let assigned = call(
            &base,
            Method::POST,
            &format!("/api/kernel/users/{operator_id}/roles"),
            Some(&acme_admin),
            Some(json!({"role_id": role.body["id"]})),
            &[],
        )
        .await;
        assert_eq!(assigned.status, StatusCode::NO_CONTENT, "{assigned:?}");
        let operator = token(&login(&base, "acme", "ops@acme.example", PASSWORD, None).await);
        let publisher = call(
            &base,
            Method::POST,
            "/api/kernel/roles",
            Some(&acme_admin),
            Some(json!({"name": "publisher", "permissions": ["kernel.event.publish"]})),
            &[],
        )
        .await;
        let account = call(
            &base,
            Method::POST,
            "/api/kernel/service-accounts",
            Some(&acme_admin),
            Some(json!({"name": "payment-hub", "role_ids": [publisher.body["id"]]})),
            &[],
        )
        .await;
        assert_eq!(account.status, StatusCode::CREATED, "{account:?}");
        let client = (
            account.body["client_id"].as_str().unwrap().to_owned(),
            account.body["client_secret"].as_str().unwrap().to_owned(),
        );
        let (hub_db, hub_url) = hub_database(engine, cwd.path()).await?;
        let hub = start_hub(
            hub_port,
            &hub_url,
            &canon_secret,
            &base,
            (&client.0, &client.1),
        )
        .await;
        let mut deployment = Deployment {
            cwd,
            kernel_db,
            kernel,
            kernel_port,
            _hub_db: hub_db,
            hub,
            acme_admin,
            operator,
            tenant_id,
            operator_id,
            canon_secret,
            alice: String::new(),
            bob: String::new(),
        };
        deployment.wait_until_routed().await;
        deployment.alice = deployment.open_account("alice", 100_000).await;
        deployment.bob = deployment.open_account("bob", 0).await;
        Some(deployment)
    }

    /// Waits for the kernel's health check to have seen the hub.
    async fn wait_until_routed(&self) {
        for _ in 0..150 {
            let ping = call(
                self.base(),
                Method::GET,
                &format!("/api/gateway/{CANON}/ping"),
                Some(&self.operator),
                None,
                &[],
            )
            .await;
            if ping.status == StatusCode::OK {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the gateway never reached the hub:\n{}",
            self.hub.all_logs()
        );
    }

    async fn open_account(&self, name: &str, opening: i64) -> String {
        let opened = call(
            self.base(),
            Method::POST,
            &format!("/api/gateway/{CANON}/ledger/accounts"),
            Some(&self.acme_admin),
            Some(json!({"name": name, "currency": "EUR", "opening_balance_minor": opening})),
            &[("idempotency-key", &format!("open-{name}"))],
        )
        .await;
        assert_eq!(opened.status, StatusCode::CREATED, "{opened:?}");
        opened.body["id"].as_str().unwrap().to_owned()
    }

    /// Pays through the gateway with `key` under `correlation`.
    async fn pay(&self, amount: i64, key: &str, correlation: &str) -> Answer {
        call(self.base(), Method::POST, &format!("/api/gateway/{CANON}/payments/process"), Some(&self.operator),
            Some(json!({"amount_minor": amount, "currency": "EUR", "payer_account": self.alice, "payee_account": self.bob, "reference": key})),
            &[("idempotency-key", key), ("x-correlation-id", correlation)]).await
    }

    async fn balance(&self, account: &str) -> i64 {
        let read = call(
            self.base(),
            Method::GET,
            &format!("/api/gateway/{CANON}/ledger/accounts/{account}"),
            Some(&self.operator),
            None,
            &[],
        )
        .await;
        assert_eq!(read.status, StatusCode::OK, "{read:?}");
        read.body["balance_minor"].as_i64().unwrap()
    }

    /// The tenant's events of `event_type`.
    async fn events(&self, event_type: &str) -> Vec<Value> {
        let page = call(
            self.base(),
            Method::GET,
            &format!("/api/kernel/events?types={event_type}&limit=1000"),
            Some(&self.operator),
            None,
            &[],
        )
        .await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        page.body["items"].as_array().cloned().unwrap_or_default()
    }

    /// Waits (bounded) until `count` events of `event_type` are stored.
    async fn wait_for_events(&self, event_type: &str, count: usize) -> Vec<Value> {
        for _ in 0..300 {
            let events = self.events(event_type).await;
            if events.len() >= count {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "fewer than {count} {event_type} events:\n{}",
            self.hub.all_logs()
        );
    }
}

/// The audit entries of `correlation` in the chain `token` reads.
async fn audit_of(base: &str, token: &str, correlation: &str) -> Vec<String> {
    let page = call(
        base,
        Method::GET,
        &format!("/api/kernel/audit?correlation_id={correlation}&limit=1000"),
        Some(token),
        None,
        &[],
    )
    .await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    page.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect()
}

both_engines! {
    /// The seed's Day 4 chain, each step under a correlation id of its own,
    /// then the audit trail showing each step under its id. The canon comes
    /// before the role, whose permission the canon registers.
    async fn the_ten_step_chain_runs_through_the_kernel_and_the_hub_binaries(engine: Engine) {
        let kernel_db = match engine { Engine::Sqlite => None, Engine::Postgres => match TestDb::create(engine).await { Some(db) => Some(db), None => return } };
        let cwd = tempfile::tempdir().unwrap();
        let (kernel_port, hub_port) = (free_port(), free_port());
        let kernel = start_kernel(cwd.path(), kernel_port, kernel_db.as_ref().map(TestDb::url)).await;
        let base = kernel.base_url.clone();

        // 1. Bootstrap the platform administrator.
        let c1 = correlation(1);
        let boot = call(&base, Method::POST, "/api/kernel/bootstrap", None, Some(json!({"email": ROOT_EMAIL, "password": ROOT_PASSWORD, "name": "Root"})),
            &[("x-correlation-id", &c1), ("x-bootstrap-key", BOOTSTRAP_KEY)]).await;
        assert_eq!(boot.status, StatusCode::CREATED, "{boot:?}");
        let root_id = boot.body["user_id"].as_str().unwrap().to_owned();

        // 2. Set the password (the administrator replaces the bootstrap one).
        let first = token(&login(&base, "system", ROOT_EMAIL, ROOT_PASSWORD, None).await);
        let c2 = correlation(2);
        let set = call(&base, Method::POST, &format!("/api/kernel/users/{root_id}/password"), Some(&first), Some(json!({"password": ROOT_NEW_PASSWORD})), &[("x-correlation-id", &c2)]).await;
        assert_eq!(set.status, StatusCode::NO_CONTENT, "{set:?}");

        // 3. Log in with it (the old one no longer works).
        assert_eq!(login(&base, "system", ROOT_EMAIL, ROOT_PASSWORD, None).await.status, StatusCode::UNAUTHORIZED);
        let c3 = correlation(3);
        let root = token(&login(&base, "system", ROOT_EMAIL, ROOT_NEW_PASSWORD, Some(&c3)).await);

        // 4. Register the canon with its permissions; a tenant and its administrator.
        let c4 = correlation(4);
        let canon = call(&base, Method::POST, "/api/kernel/canons", Some(&root), Some(canon_body(hub_port)), &[("x-correlation-id", &c4)]).await;
        assert_eq!(canon.status, StatusCode::CREATED, "{canon:?}");
        let canon_id = canon.body["id"].as_str().unwrap().to_owned();
        let secret = canon.body["assertion_secret"]["secret"].as_str().unwrap().to_owned();
        let tenant = call(&base, Method::POST, "/api/kernel/tenants", Some(&root), Some(json!({"slug": "acme", "name": "Acme"})), &[]).await;
        let tenant_id = tenant.body["id"].as_str().unwrap().to_owned();
        call(&base, Method::POST, &format!("/api/kernel/tenants/{tenant_id}/admins"), Some(&root), Some(json!({"email": "admin@acme.example", "name": "Admin", "password": PASSWORD})), &[]).await;
        let admin = token(&login(&base, "acme", "admin@acme.example", PASSWORD, None).await);

        // 5. A role with permissions (the canon's and the kernel's).
        let c5 = correlation(5);
        let role = call(&base, Method::POST, "/api/kernel/roles", Some(&admin), Some(json!({"name": "payments",
            "permissions": ["finance.payment.execute", "finance.payment.read", "kernel.event.publish", "kernel.event.read", "kernel.audit.read"]})), &[("x-correlation-id", &c5)]).await;
        assert_eq!(role.status, StatusCode::CREATED, "{role:?}");

        // 6. Assign it to a user.
        let user = call(&base, Method::POST, "/api/kernel/users", Some(&admin), Some(json!({"email": "ops@acme.example", "name": "Ops", "password": PASSWORD})), &[]).await;
        let user_id = user.body["id"].as_str().unwrap().to_owned();
        let c6 = correlation(6);
        let assigned = call(&base, Method::POST, &format!("/api/kernel/users/{user_id}/roles"), Some(&admin), Some(json!({"role_id": role.body["id"]})), &[("x-correlation-id", &c6)]).await;
        assert_eq!(assigned.status, StatusCode::NO_CONTENT, "{assigned:?}");

        // 7. Routes with their required permissions.
        let c7 = correlation(7);
        add_routes(&base, &root, &canon_id, &c7).await;
        let publisher = call(&base, Method::POST, "/api/kernel/roles", Some(&admin), Some(json!({"name": "publisher", "permissions": ["kernel.event.publish"]})), &[]).await;
        let account = call(&base, Method::POST, "/api/kernel/service-accounts", Some(&admin), Some(json!({"name": "payment-hub", "role_ids": [publisher.body["id"]]})), &[]).await;
        let (hub_db, hub_url) = hub_database(engine, cwd.path()).await.expect("a database for the hub");
        let hub = start_hub(hub_port, &hub_url, &secret, &base, (account.body["client_id"].as_str().unwrap(), account.body["client_secret"].as_str().unwrap())).await;
        let ops = token(&login(&base, "acme", "ops@acme.example", PASSWORD, None).await);
        let deployment_check = call(&base, Method::GET, &format!("/api/gateway/{CANON}/ping"), Some(&ops), None, &[]).await;
        let mut reachable = deployment_check.status == StatusCode::OK;
        for _ in 0..150 {
            if reachable { break }
            tokio::time::sleep(Duration::from_millis(100)).await;
            reachable = call(&base, Method::GET, &format!("/api/gateway/{CANON}/ping"), Some(&ops), None, &[]).await.status == StatusCode::OK;
        }
        assert!(reachable, "the gateway reaches the hub:\n{}", hub.all_logs());
        let open = |name: &'static str, opening: i64| {
            let (base, admin) = (base.clone(), admin.clone());
            async move {
                let opened = call(&base, Method::POST, &format!("/api/gateway/{CANON}/ledger/accounts"), Some(&admin), Some(json!({"name": name, "currency": "EUR", "opening_balance_minor": opening})), &[]).await;
                assert_eq!(opened.status, StatusCode::CREATED, "{opened:?}");
                opened.body["id"].as_str().unwrap().to_owned()
            }
        };
        let (alice, bob) = (open("alice", 10_000).await, open("bob", 0).await);

        // 8. The proxied call: a payment through the gateway to the hub.
        let c8 = correlation(8);
        let paid = call(&base, Method::POST, &format!("/api/gateway/{CANON}/payments/process"), Some(&ops),
            Some(json!({"amount_minor": 1250, "currency": "EUR", "payer_account": alice, "payee_account": bob, "reference": "invoice 42"})),
            &[("x-correlation-id", &c8), ("idempotency-key", "chain-payment-1")]).await;
        assert_eq!(paid.status, StatusCode::CREATED, "{paid:?}");
        assert_eq!(paid.headers["x-correlation-id"], c8.as_str());
        assert_eq!(paid.body["correlation_id"], c8.as_str(), "the hub read the id from the assertion");
        let entries = paid.body["ledger_entries"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0]["amount_minor"], entries[1]["amount_minor"], "debits equal credits");

        // 9. Publish an event (the user, with kernel.event.publish).
        let c9 = correlation(9);
        let published = call(&base, Method::POST, "/api/kernel/events/publish", Some(&ops),
            Some(json!({"type": "finance.invoice.approved", "subject": "invoice 42", "payload": {"invoice": 42}})), &[("x-correlation-id", &c9)]).await;
        assert_eq!(published.status, StatusCode::CREATED, "{published:?}");

        // 10. The audit trail: every step under its correlation id, in its tenant's chain.
        let system_steps = [(1, "user.created"), (2, "user.password_changed"), (3, "session.created"), (4, "canon.created"), (7, "route.created")];
        for (step, action) in system_steps {
            let actions = audit_of(&base, &root, &correlation(step)).await;
            assert!(actions.iter().any(|a| a == action), "step {step}: {action} in {actions:?}");
        }
        for (step, action) in [(5, "role.created"), (6, "role.assigned"), (8, "gateway.call")] {
            let actions = audit_of(&base, &ops, &correlation(step)).await;
            assert!(actions.iter().any(|a| a == action), "step {step}: {action} in {actions:?}");
        }
        // The events carry their requests' ids: the user's own, and the hub's for the payment.
        let events = call(&base, Method::GET, "/api/kernel/events?types=finance.*&limit=1000", Some(&ops), None, &[]).await;
        let find = |kind: &str, cid: &str| events.body["items"].as_array().unwrap().iter().any(|e| e["type"] == kind && e["correlation_id"] == cid);
        assert!(find("finance.invoice.approved", &c9), "{events:?}");
        let mut processed = find("finance.payment.processed", &c8);
        for _ in 0..100 {
            if processed { break }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let again = call(&base, Method::GET, "/api/kernel/events?types=finance.payment.processed&limit=1000", Some(&ops), None, &[]).await;
            processed = again.body["items"].as_array().unwrap().iter().any(|e| e["correlation_id"] == c8.as_str());
        }
        assert!(processed, "the hub published the payment under the request's id:\n{}", hub.all_logs());
        for reader in [&root, &ops] {
            let verified = call(&base, Method::GET, "/api/kernel/audit/verify", Some(reader), None, &[]).await;
            assert_eq!(verified.body["valid"], true, "{verified:?}");
        }
        drop((hub_db, kernel_db, user_id, tenant_id));
    }
}

both_engines! {
    /// Seed 000's Day 5 gate through the gateway: ping, health, a payment, the
    /// ledger failed (503 LEDGER_DOWN, nothing moves), recovered, a payment again.
    async fn the_day_five_gate_passes_through_the_gateway(engine: Engine) {
        let Some(d) = Deployment::start(engine).await else { return };
        let gateway = |path: &str| format!("/api/gateway/{CANON}{path}");
        let ping = call(d.base(), Method::GET, &gateway("/ping"), Some(&d.operator), None, &[]).await;
        assert_eq!((ping.status, ping.body.clone()), (StatusCode::OK, json!({"message": "pong"})));
        let health = call(d.base(), Method::GET, &gateway("/health"), Some(&d.operator), None, &[]).await;
        assert_eq!(health.status, StatusCode::OK, "{health:?}");
        assert_eq!(health.body["status"], "healthy");
        for cell in ["gateway", "processor", "ledger"] {
            assert_eq!(health.body["cells"][cell]["status"], "healthy", "{health:?}");
        }
        let first = d.pay(1000, "gate-1", &correlation(51)).await;
        assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
        assert!(first.body["transaction_id"].is_string());

        let failed = call(d.base(), Method::POST, &gateway("/chaos/fail/ledger"), Some(&d.operator), None, &[]).await;
        assert_eq!(failed.status, StatusCode::OK, "{failed:?}");
        let degraded = call(d.base(), Method::GET, &gateway("/health"), Some(&d.operator), None, &[]).await;
        assert_eq!((degraded.status, degraded.body["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("degraded")), "{degraded:?}");
        let refused = d.pay(1000, "gate-2", &correlation(52)).await;
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{refused:?}");
        assert_eq!(refused.body["code"], "LEDGER_DOWN");
        let unreadable = call(d.base(), Method::GET, &gateway(&format!("/ledger/accounts/{}", d.alice)), Some(&d.operator), None, &[]).await;
        assert_eq!(unreadable.body["code"], "LEDGER_DOWN", "the ledger is down for reads too: {unreadable:?}");

        let recovered = call(d.base(), Method::POST, &gateway("/chaos/recover/ledger"), Some(&d.operator), None, &[]).await;
        assert_eq!(recovered.status, StatusCode::OK, "{recovered:?}");
        assert_eq!((d.balance(&d.alice).await, d.balance(&d.bob).await), (99_000, 1_000), "nothing moved while it was down");
        let again = d.pay(1000, "gate-2", &correlation(53)).await;
        assert_eq!(again.status, StatusCode::CREATED, "the refused key is free again: {again:?}");
        assert_eq!((d.balance(&d.alice).await, d.balance(&d.bob).await), (98_000, 2_000));
        let trial = call(d.base(), Method::GET, &gateway("/ledger/trial-balance"), Some(&d.operator), None, &[]).await;
        assert_eq!(trial.body["balanced"], true, "{trial:?}");
        let refusal = audit_of(d.base(), &d.operator, &correlation(52)).await;
        assert!(refusal.iter().any(|a| a == "gateway.call"), "the refused payment is in the trail: {refusal:?}");
    }
}

/// An assertion as the kernel signs it, for calling the hub while the kernel is down.
fn assertion(
    secret: &str,
    tenant: &str,
    user: &str,
    correlation: &str,
    method: &str,
    path: &str,
) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = AssertionClaims {
        iss: "aibos-kernel".into(),
        aud: CANON.into(),
        tid: tenant.into(),
        sub: user.into(),
        act: "user".into(),
        cid: correlation.into(),
        htm: method.into(),
        htu: path.into(),
        iat: now,
        exp: now + ASSERTION_LIFETIME_SECONDS,
        jti: uuid::Uuid::now_v7().to_string(),
    };
    aibos_wire::jws::sign(
        &claims,
        &aibos_wire::jws::SigningKey::hs256(secret.as_bytes()),
        secret_kid(secret),
    )
    .unwrap()
}

both_engines! {
    /// Payments the hub takes while the kernel is stopped lose no
    /// `finance.payment.processed`: the hub's outbox keeps them, and they are
    /// published, each once and under its request's correlation id, once the
    /// kernel is back.
    async fn a_kernel_outage_delays_the_hubs_events_but_loses_none(engine: Engine) {
        let Some(mut d) = Deployment::start(engine).await else { return };
        let before = d.wait_for_events("finance.payment.processed", 0).await.len();
        d.kernel.signal("TERM").await;
        let _ = tokio::time::timeout(Duration::from_secs(20), d.kernel.child.wait()).await;
        // The kernel is down: calls reach the hub the way the gateway makes them.
        let path = "/payments/process";
        let mut correlations = Vec::new();
        for n in 0..5 {
            let cid = correlation(700 + n);
            let signed = assertion(&d.canon_secret, &d.tenant_id, &d.operator_id, &cid, "POST", path);
            let paid = call(&d.hub.base_url, Method::POST, path, None,
                Some(json!({"amount_minor": 100, "currency": "EUR", "payer_account": d.alice, "payee_account": d.bob, "reference": format!("outage {n}")})),
                &[("x-kernel-assertion", &signed), ("x-tenant-id", &d.tenant_id), ("x-user-sub", &d.operator_id), ("x-actor-type", "user"), ("x-correlation-id", &cid), ("idempotency-key", &format!("outage-{n}"))]).await;
            assert_eq!(paid.status, StatusCode::CREATED, "{paid:?}");
            correlations.push(cid);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        d.kernel = start_kernel(d.cwd.path(), d.kernel_port, d.kernel_db.as_ref().map(TestDb::url)).await;
        d.operator = token(&login(d.base(), "acme", "ops@acme.example", PASSWORD, None).await);
        let events = d.wait_for_events("finance.payment.processed", before + 5).await;
        for cid in &correlations {
            let matching = events.iter().filter(|e| e["correlation_id"] == cid.as_str()).count();
            assert_eq!(matching, 1, "one event for {cid}: {events:?}");
        }
        assert_eq!(events.len(), before + 5, "no event twice: {events:?}");
    }
}

/// `aibos demo` as a newcomer runs it: start it, paste the printed lines,
/// see the payment, its event, its signed webhook delivery and its audit entry
/// under one correlation id; Ctrl-C; a second run reuses the data.
#[tokio::test]
async fn the_demo_prints_lines_that_pay_and_show_the_payment_everywhere() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    for tool in ["curl", "jq"] {
        let found = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is needed by the demo's printed lines (.ci/run installs it)"
        );
    }
    let data = tempfile::tempdir().unwrap();
    let (kernel_port, hub_port) = (free_port(), free_port());
    let run = |json: bool| {
        let mut command = tokio::process::Command::new(AIBOS);
        command
            .args(["demo", "--data-dir"])
            .arg(data.path())
            .args([
                "--kernel-bind",
                &format!("127.0.0.1:{kernel_port}"),
                "--hub-bind",
                &format!("127.0.0.1:{hub_port}"),
            ])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .current_dir(data.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(
                std::fs::File::create(data.path().join(if json {
                    "demo-json.err"
                } else {
                    "demo.err"
                }))
                .expect("a log file"),
            )
            .kill_on_drop(true);
        if json {
            command.arg("--json");
        }
        command.spawn().expect("start aibos demo")
    };
    let mut demo = run(false);
    let mut stdout = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let read_all = async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            let last = line.contains("/chaos/recover/ledger");
            printed.push(line);
            if last {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read_all)
        .await
        .expect("the demo prints its instructions");
    let script: Vec<&str> = printed
        .iter()
        .skip_while(|l| !l.starts_with("# 1."))
        .map(String::as_str)
        .collect();
    assert!(!script.is_empty(), "{printed:?}");
    // A person reads between the lines; the test waits a moment before
    // looking for the event the hub publishes after the payment commits.
    let mut shell = Vec::new();
    for line in &script {
        if line.starts_with("# 4.") {
            shell.push("sleep 3");
        }
        shell.push(line);
    }
    let output = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(shell.join("\n"))
        .output()
        .await
        .expect("run bash");
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{out}\n{err}");
    let cid = script
        .iter()
        .find_map(|l| l.strip_prefix("CID="))
        .and_then(|l| l.split(';').next())
        .expect("the printed CID");
    assert!(
        err.contains("\"status\":\"completed\""),
        "the payment: {err}"
    );
    assert!(
        out.contains("\"type\": \"finance.payment.processed\"") && out.contains(cid),
        "the event under the CID: {out}"
    );
    assert!(
        out.contains("\"status\": \"delivered\""),
        "a webhook delivery: {out}"
    );
    assert!(
        out.contains("\"action\": \"gateway.call\""),
        "the audit entry: {out}"
    );
    assert!(out.contains("\"code\": \"LEDGER_DOWN\""), "chaos: {out}");
    // The receiver printed the delivery it verified.
    let mut receiver_line = None;
    let seen = async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            if line.starts_with("webhook received: finance.payment.processed") {
                receiver_line = Some(line);
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), seen).await;
    let receiver_line = receiver_line.expect("the receiver prints the delivery");
    assert!(
        receiver_line.contains(cid) && receiver_line.contains("signature verified"),
        "{receiver_line}"
    );

    let pid = demo.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(30), demo.wait())
        .await
        .expect("Ctrl-C stops the demo")
        .unwrap();
    assert!(status.success(), "{status}");

    // A second run reuses the data: the same accounts, 25.00 moved once.
    let mut again = run(true);
    let mut lines = BufReader::new(again.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .expect("the JSON line")
        .unwrap()
        .unwrap_or_else(|| {
            panic!(
                "the second run printed nothing: {}",
                std::fs::read_to_string(data.path().join("demo-json.err")).unwrap_or_default()
            )
        });
    let ready: Value = serde_json::from_str(&line).expect("one JSON object");
    assert_eq!(
        (
            ready["tenant"].as_str(),
            ready["email"].as_str(),
            ready["canon"].as_str()
        ),
        (Some("demo"), Some("demo@example.com"), Some(CANON))
    );
    let balances: Vec<i64> = ready["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["balance_minor"].as_i64().unwrap())
        .collect();
    assert_eq!(balances, [10_000_000 - 2_500, 2_500_000 + 2_500, 5_000_000]);
    assert!(
        ready["kernel_url"]
            .as_str()
            .unwrap()
            .ends_with(&kernel_port.to_string())
    );
    let pid = again.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(30), again.wait())
        .await
        .expect("it stops")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// Issue 23's "done when": a backup taken while four clients post payments
/// through the gateway to the hub and publish keyed events restores from
/// SQLite into PostgreSQL and back with the same row counts and dataset
/// hashes, and `aibos audit verify` passes on each restored database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_payments_flow_restores_into_postgres_and_back() {
    use crate::backup::{aibos, datasets, manifest, run_ok};
    let audit_verifies = |cwd: &Path, url: &str| {
        let out = aibos(cwd, url, &["audit", "verify"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    };

    let Some(pg_target) = TestDb::create(Engine::Postgres).await else {
        eprintln!("skipped: AIBOS_TEST_DATABASE_URL is not set");
        return;
    };
    let d = std::sync::Arc::new(Deployment::start(Engine::Sqlite).await.expect("SQLite"));
    let cwd = d.cwd.path().to_owned();
    let source = format!("sqlite://{}/data/aibos.db", cwd.display());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4u32)
        .map(|client| {
            let (d, stop) = (d.clone(), stop.clone());
            tokio::spawn(async move {
                let mut paid = 0u64;
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let key = format!("backup-load-{client}-{n}");
                    let payment = d.pay(1, &key, &correlation(1_000_000 + client * 100_000 + n)).await;
                    assert_eq!(payment.status, StatusCode::CREATED, "{payment:?}");
                    let published = call(d.base(), Method::POST, "/api/kernel/events/publish", Some(&d.operator),
                        Some(json!({"type": "test.backup.load", "payload": {"client": client, "n": n}})),
                        &[("idempotency-key", &format!("{key}-event"))]).await;
                    assert_eq!(published.status, StatusCode::CREATED, "{published:?}");
                    paid += 1;
                }
                paid
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let backups = cwd.join("backups");
    let dir = backups.to_str().unwrap().to_owned();
    let taken = {
        let (cwd, source, dir) = (cwd.clone(), source.clone(), dir.clone());
        tokio::task::spawn_blocking(move || {
            run_ok(&cwd, &source, &["backup", "run", "--dir", &dir, "--json"])
        })
        .await
        .unwrap()
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut paid = 0;
    for client in clients {
        paid += client.await.unwrap();
    }
    assert!(paid >= 8, "the clients paid during the backup ({paid})");
    let id = taken["id"].as_str().unwrap().to_owned();
    let first = datasets(&manifest(&backups, &id));
    let rows = |name: &str| first.iter().find(|d| d.0 == name).map_or(0, |d| d.1);
    assert!(
        rows("idempotency_records") > 0 && rows("events") > 0 && rows("audit_log") > 0,
        "{first:?}"
    );

    // SQLite → PostgreSQL, verified and backed up again: the same datasets.
    run_ok(
        &cwd,
        &source,
        &[
            "restore",
            "--id",
            &id,
            "--dir",
            &dir,
            "--target-url",
            pg_target.url(),
            "--json",
        ],
    );
    audit_verifies(&cwd, pg_target.url());
    let again = run_ok(
        &cwd,
        pg_target.url(),
        &["backup", "run", "--dir", &dir, "--json"],
    );
    let again_id = again["id"].as_str().unwrap().to_owned();
    assert_eq!(datasets(&manifest(&backups, &again_id)), first);

    // PostgreSQL → a fresh SQLite file: the same datasets again.
    let back = format!("sqlite://{}/back/aibos.db", cwd.display());
    run_ok(
        &cwd,
        &source,
        &[
            "restore",
            "--id",
            &again_id,
            "--dir",
            &dir,
            "--target-url",
            &back,
            "--json",
        ],
    );
    audit_verifies(&cwd, &back);
    let third = run_ok(&cwd, &back, &["backup", "run", "--dir", &dir, "--json"]);
    assert_eq!(
        datasets(&manifest(&backups, third["id"].as_str().unwrap())),
        first
    );
}
