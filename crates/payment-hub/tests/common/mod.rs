//! What the hub's integration tests share: a fresh database per test on either
//! engine, a real hub on 127.0.0.1:0, and calls carrying assertions signed
//! here exactly as the kernel's gateway signs them.

#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use aibos_wire::assertion::{
    ACTOR_TYPE_HEADER, ASSERTION_HEADER, ASSERTION_LIFETIME_SECONDS, AssertionClaims,
    TENANT_HEADER, USER_HEADER, secret_kid,
};
use aibos_wire::correlation::CORRELATION_HEADER;
use aibos_wire::jws::{self, SigningKey};
use payment_hub::{Hub, HubConfig, ServiceAccountCredentials};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::Connection as _;
use tokio::sync::oneshot;
use uuid::Uuid;

/// The engine a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// A temp SQLite file.
    Sqlite,
    /// A fresh database on `AIBOS_TEST_DATABASE_URL`.
    Postgres,
}

/// Runs each named `async fn name(engine: Engine)` as two tests, `name::sqlite`
/// and `name::postgres`.
#[macro_export]
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => { $(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() { super::$name($crate::common::Engine::Sqlite).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() { super::$name($crate::common::Engine::Postgres).await }
        }
    )* };
}

/// The PostgreSQL server for tests; with `AIBOS_REQUIRE_POSTGRES=1` and no
/// URL this panics, so CI cannot skip the PostgreSQL half silently.
pub fn postgres_admin_url() -> Option<String> {
    match std::env::var("AIBOS_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("AIBOS_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "AIBOS_REQUIRE_POSTGRES=1 but AIBOS_TEST_DATABASE_URL is not set: the PostgreSQL tests cannot run"
            );
            None
        }
    }
}

fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| i + scheme_end);
    let mut out = format!("{}/{}", &base[..path_start], name);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// A database that lives as long as the test.
pub struct TestDb {
    pub url: String,
    pub engine: Engine,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
}

impl TestDb {
    /// A fresh empty database, or `None` when PostgreSQL is not configured.
    pub async fn create(engine: Engine) -> Option<TestDb> {
        match engine {
            Engine::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("data/hub.db").display());
                Some(TestDb {
                    url,
                    engine,
                    _dir: Some(dir),
                    postgres: None,
                })
            }
            Engine::Postgres => {
                let admin = postgres_admin_url()?;
                let name = format!("payment_hub_test_{}", Uuid::new_v4().simple());
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .expect("connect to AIBOS_TEST_DATABASE_URL");
                // Our own prefix and a hex UUID: nothing to inject.
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                    .execute(&mut conn)
                    .await
                    .expect("create the test database");
                let _ = conn.close().await;
                Some(TestDb {
                    url: with_database(&admin, &name),
                    engine,
                    _dir: None,
                    postgres: Some((admin, name)),
                })
            }
        }
    }

    /// PostgreSQL: drops the database under the running hub (its connections
    /// are terminated): the database no longer answers.
    pub async fn vanish(&self) {
        let (admin, name) = self.postgres.as_ref().expect("a PostgreSQL test database");
        let mut conn = sqlx::PgConnection::connect(admin).await.expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await
        .expect("drop the database");
        let _ = conn.close().await;
    }

    /// One integer from `sql` (read straight from the database, beside the hub).
    pub async fn scalar(&self, sql: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self.engine {
            Engine::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.url)
                    .await
                    .expect("connect");
                let value: i64 = sqlx::query_scalar(sql)
                    .fetch_one(&mut conn)
                    .await
                    .expect("query");
                let _ = conn.close().await;
                value
            }
            Engine::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.url)
                    .await
                    .expect("connect");
                let value: i64 = sqlx::query_scalar(sql)
                    .fetch_one(&mut conn)
                    .await
                    .expect("query");
                let _ = conn.close().await;
                value
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .ok()?;
                conn.close().await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("warning: a payment hub test database could not be dropped");
        }
    }
}

/// A fresh assertion secret (`kas_<16 hex>_<random>`), as the kernel mints them.
pub fn new_secret() -> String {
    let kid = &Uuid::new_v4().simple().to_string()[..16];
    format!(
        "kas_{kid}_{}{}",
        Uuid::new_v4().simple(),
        Uuid::new_v4().simple()
    )
}

/// The user every test call comes from.
pub const TEST_USER: &str = "0197a1b2-0000-7000-8000-000000000001";

/// The canon name the test hubs are registered under.
pub const CANON: &str = "payment-hub";

/// An answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a problem answer with `status` and `code`, and returns its body.
    #[track_caller]
    pub fn problem(&self, status: u16, code: &str) -> &Value {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.body["code"], code, "{}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{}",
            self.body
        );
        assert_eq!(self.body["status"], status);
        let kebab = code.to_ascii_lowercase().replace('_', "-");
        assert_eq!(
            self.body["type"],
            format!("https://aibos.dev/problems/payment-hub/{kebab}")
        );
        &self.body
    }
}

/// A request to build: method, path, optional JSON body, optional key.
pub struct Call<'a> {
    pub tenant: &'a str,
    pub method: Method,
    pub path: &'a str,
    pub body: Option<Value>,
    pub raw_body: Option<(&'a str, Vec<u8>)>,
    pub key: Option<&'a str>,
    pub sign: bool,
    pub secret: Option<&'a str>,
}

/// A running hub and a client that calls it as the kernel would.
pub struct TestHub {
    pub addr: std::net::SocketAddr,
    pub db: TestDb,
    pub secret: String,
    pub http: reqwest::Client,
    /// A tenant of its own for each test.
    pub tenant: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), payment_hub::HubStartError>>>,
}

impl TestHub {
    /// A hub on a fresh database; `None` when the engine is not available.
    pub async fn spawn(engine: Engine) -> Option<TestHub> {
        TestHub::spawn_with(engine, None, Vec::new()).await
    }

    /// A hub publishing to `kernel_url` as `accounts`.
    pub async fn spawn_with(
        engine: Engine,
        kernel_url: Option<String>,
        service_accounts: Vec<ServiceAccountCredentials>,
    ) -> Option<TestHub> {
        let db = TestDb::create(engine).await?;
        let secret = new_secret();
        let config = HubConfig {
            bind: "127.0.0.1:0".parse().expect("address"),
            database_url: db.url.clone(),
            canon_name: CANON.to_owned(),
            assertion_secrets: vec![secret.clone()],
            kernel_url,
            service_accounts,
            database_max_connections: 8,
        };
        let hub = Hub::build(config).await.expect("the hub builds");
        let addr = hub.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(hub.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Some(TestHub {
            addr,
            db,
            secret,
            http: reqwest::Client::new(),
            tenant: Uuid::now_v7().to_string(),
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Stops the hub gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("the hub task")
                .expect("the hub stopped cleanly");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A call of `tenant`, signed.
    pub fn call<'a>(&self, tenant: &'a str, method: Method, path: &'a str) -> Call<'a> {
        Call {
            tenant,
            method,
            path,
            body: None,
            raw_body: None,
            key: None,
            sign: true,
            secret: None,
        }
    }

    /// Sends `call` with the headers the kernel's gateway would add.
    pub async fn send(&self, call: Call<'_>) -> Answer {
        let cid = Uuid::now_v7().to_string();
        let mut request = self.http.request(call.method.clone(), self.url(call.path));
        request = request.header(CORRELATION_HEADER, &cid);
        if call.sign {
            let secret = call.secret.unwrap_or(&self.secret);
            let user = TEST_USER;
            let token = sign(
                secret,
                call.tenant,
                user,
                &cid,
                call.method.as_str(),
                call.path,
            );
            request = request
                .header(ASSERTION_HEADER, token)
                .header(TENANT_HEADER, call.tenant)
                .header(USER_HEADER, user)
                .header(ACTOR_TYPE_HEADER, "user");
        }
        if let Some(key) = call.key {
            request = request.header("idempotency-key", key);
        }
        if let Some(body) = &call.body {
            request = request.json(body);
        }
        if let Some((content_type, bytes)) = call.raw_body {
            request = request.header("content-type", content_type).body(bytes);
        }
        let response = request.send().await.expect("the hub answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("a JSON body")
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    /// `GET path` as `tenant`.
    pub async fn get(&self, tenant: &str, path: &str) -> Answer {
        self.send(self.call(tenant, Method::GET, path)).await
    }

    /// `POST path` with `body` (and `key`) as `tenant`.
    pub async fn post(&self, tenant: &str, path: &str, body: Value, key: Option<&str>) -> Answer {
        let mut call = self.call(tenant, Method::POST, path);
        call.body = Some(body);
        call.key = key;
        self.send(call).await
    }

    /// Opens a customer account and returns its id.
    pub async fn open_account(
        &self,
        tenant: &str,
        name: &str,
        currency: &str,
        opening: i64,
    ) -> String {
        let answer = self
            .post(
                tenant,
                "/ledger/accounts",
                json!({"name": name, "currency": currency, "opening_balance_minor": opening}),
                None,
            )
            .await;
        assert_eq!(answer.status, 201, "{}", answer.body);
        answer.body["id"].as_str().expect("an id").to_owned()
    }

    /// A payment with a fresh key.
    pub async fn pay(
        &self,
        tenant: &str,
        payer: &str,
        payee: &str,
        amount: i64,
        currency: &str,
        key: &str,
    ) -> Answer {
        self.post(
            tenant,
            "/payments/process",
            json!({"amount_minor": amount, "currency": currency, "payer_account": payer, "payee_account": payee, "reference": "test"}),
            Some(key),
        )
        .await
    }

    /// An account's balance.
    pub async fn balance(&self, tenant: &str, account: &str) -> i64 {
        let answer = self
            .get(tenant, &format!("/ledger/accounts/{account}"))
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        answer.body["balance_minor"].as_i64().expect("a balance")
    }

    /// The tenant's trial balance.
    pub async fn trial_balance(&self, tenant: &str) -> Value {
        let answer = self.get(tenant, "/ledger/trial-balance").await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        answer.body
    }
}

/// An `x-kernel-assertion` for one call, as the kernel's gateway signs it.
pub fn sign(
    secret: &str,
    tenant: &str,
    user: &str,
    cid: &str,
    method: &str,
    path_and_query: &str,
) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let claims = AssertionClaims {
        iss: "aibos-kernel".into(),
        aud: CANON.into(),
        tid: tenant.into(),
        sub: user.into(),
        act: "user".into(),
        cid: cid.into(),
        htm: method.into(),
        htu: path_and_query.into(),
        iat: now,
        exp: now + ASSERTION_LIFETIME_SECONDS,
        jti: Uuid::now_v7().to_string(),
    };
    jws::sign(
        &claims,
        &SigningKey::hs256(secret.as_bytes()),
        secret_kid(secret),
    )
    .expect("assertion claims serialise")
}
