//! `aibos demo`: the kernel and the payment hub in one process on the embedded
//! database, seeded so that a newcomer pays through the gateway in minutes and
//! sees the payment in the events, the webhooks and the audit trail.
//!
//! The kernel runs exactly as `aibos serve` runs it; the hub is the
//! `payment-hub` crate's own server, which speaks to the kernel only over
//! HTTP, as an outside team's cell would. Seeding goes through the kernel's
//! public API (`seed.rs`), so every step is an audited API call, and each step
//! first looks for what an earlier run made: a second run over the same
//! `--data-dir` reuses everything (the secrets the kernel shows only once are
//! kept in `demo.json`, `state.rs`). The webhook subscription points at a small
//! receiver that checks signatures (`receiver.rs`). This is the one command
//! whose behaviour lives in the binary crate: it composes the kernel and a
//! cell, which the kernel library must never depend on; the end-to-end tests
//! run it as a process.

mod receiver;
mod seed;
mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use aibos_kernel::config::ConfigSources;
use aibos_kernel::telemetry;
use aibos_kernel::{App, AppOptions};
use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::Args;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use self::receiver::Receiver;
use self::seed::KernelApi;
use self::state::{AccountState, Credentials, DemoState, SubscriptionState};
use super::{EXIT_FAILURE, EXIT_OK, load_config};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the demo keeps its databases, keys and generated credentials; a
    /// second run over the same directory reuses them.
    #[arg(long, value_name = "DIR", default_value = "data/demo")]
    data_dir: PathBuf,
    /// The kernel's address.
    #[arg(long, value_name = "ADDRESS", default_value = "127.0.0.1:3001")]
    kernel_bind: SocketAddr,
    /// The payment hub's address.
    #[arg(long, value_name = "ADDRESS", default_value = "127.0.0.1:4000")]
    hub_bind: SocketAddr,
    /// The webhook receiver's address (port 0: any free port).
    #[arg(long, value_name = "ADDRESS", default_value = "127.0.0.1:0")]
    receiver_bind: SocketAddr,
    /// Print, once ready, one line holding a JSON object (SPEC §10) instead of
    /// the instructions.
    #[arg(long)]
    json: bool,
}

/// The demo tenant's slug.
const TENANT: &str = "demo";
/// The user whose role can pay, read and break things.
const USER_EMAIL: &str = "demo@example.com";
/// The tenant's administrator, who seeds the tenant's side.
const TENANT_ADMIN_EMAIL: &str = "demo-admin@example.com";
/// The platform administrator, who registers the canon and its routes.
const PLATFORM_ADMIN_EMAIL: &str = "platform-admin@example.com";
/// The canon's name: the hub's URL prefix under `/api/gateway/`.
const CANON: &str = "payment-hub";
/// The demo user's role (SPEC §10's list, and reading webhook deliveries).
const ROLE: &str = "demo-payments";
const ROLE_PERMISSIONS: [&str; 6] = [
    "finance.payment.execute",
    "finance.payment.read",
    "finance.chaos.manage",
    "kernel.event.read",
    "kernel.audit.read",
    "kernel.subscription.read",
];
/// The hub's service account's role: it publishes its events.
const PUBLISHER_ROLE: &str = "payment-hub-publisher";
const PUBLISHER_ACCOUNT: &str = "payment-hub";
/// The permissions the hub's canon registers.
const HUB_PERMISSIONS: [(&str, &str); 4] = [
    ("finance.payment.execute", "Post payments"),
    (
        "finance.payment.read",
        "Read payments, ledger accounts and the trial balance",
    ),
    ("finance.ledger.manage", "Open and fund ledger accounts"),
    ("finance.chaos.manage", "Fail and recover the hub's cells"),
];

/// One endpoint of the hub as a route: method, path, permission (`None`: any
/// authenticated caller), idempotency, audit every call.
type HubRoute = (
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
    bool,
);
const HUB_ROUTES: [HubRoute; 11] = [
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
        "/payments",
        Some("finance.payment.read"),
        "off",
        false,
    ),
    (
        "GET",
        "/payments/status/{id}",
        Some("finance.payment.read"),
        "off",
        false,
    ),
    (
        "GET",
        "/ledger/accounts",
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
/// The funded accounts: name, currency, opening balance in minor units.
const ACCOUNTS: [(&str, &str, i64); 3] = [
    ("alice", "EUR", 10_000_000), // 100,000.00
    ("bob", "EUR", 2_500_000),    // 25,000.00
    ("carol", "USD", 5_000_000),  // 50,000.00
];
/// How long the gateway may take to see the hub healthy after start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the kernel and the hub get to finish in-flight work on Ctrl-C.
const STOP_GRACE: Duration = Duration::from_secs(15);

pub async fn run(mut sources: ConfigSources, args: DemoArgs) -> u8 {
    // Before anything is printed: a Ctrl-C right after the ready line stops
    // the demo cleanly instead of killing it.
    let stop_signal = super::serve::shutdown_signal();
    let data_dir = match prepare_data_dir(&args.data_dir) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("error: {e:#}");
            return EXIT_FAILURE;
        }
    };
    let bootstrap_key = random_text(32);
    let env = &mut sources.env;
    let database = format!("sqlite://{}", data_dir.join("aibos.db").display());
    env.insert("AIBOS_DATABASE__URL".into(), database);
    env.insert("AIBOS_SERVER__BIND".into(), args.kernel_bind.to_string());
    env.insert("AIBOS_AUTH__BOOTSTRAP_KEY".into(), bootstrap_key.clone());
    // The receiver listens on the loopback interface.
    env.insert(
        "AIBOS_EVENTS__WEBHOOK_ALLOW_PRIVATE_NETWORKS".into(),
        "true".into(),
    );
    // The hub starts after the kernel (it needs the canon's secret), so the
    // first health check finds it down: check often, so the gateway routes to
    // it within a couple of seconds, not the default ten.
    env.entry("AIBOS_GATEWAY__HEALTH_INTERVAL_SECONDS".into())
        .or_insert_with(|| "2".into());
    // The instructions are the output; the kernel's logs only when asked.
    env.entry("AIBOS_LOG__LEVEL".into())
        .or_insert_with(|| "warn".into());
    let config = match load_config(&sources, false) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let log = telemetry::init_logging(&config.log);
    let options = AppOptions {
        log,
        ..AppOptions::new(sources)
    };
    let app = match App::build(config, options).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("error: the kernel could not start: {e}");
            return EXIT_FAILURE;
        }
    };
    let kernel_url = format!("http://{}", app.local_addr());
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut kernel = tokio::spawn(app.run_until_stopped(stopped(stopping.clone())));
    let outcome = tokio::select! {
        outcome = serve(&args, &data_dir, &kernel_url, &bootstrap_key, &stop, stop_signal) => outcome,
        ended = &mut kernel => Err(anyhow::anyhow!("the kernel stopped: {}", describe_end(ended))),
    };
    let _ = stop.send(true);
    if !kernel.is_finished() && tokio::time::timeout(STOP_GRACE, &mut kernel).await.is_err() {
        eprintln!(
            "warning: the kernel did not stop within {} s",
            STOP_GRACE.as_secs()
        );
    }
    match outcome {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_FAILURE
        }
    }
}

/// Completes once `stop` is sent (or its sender is gone).
async fn stopped(mut stopping: tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// How a server's task ended, for the error that follows it.
fn describe_end<E: std::fmt::Display>(
    ended: Result<Result<(), E>, tokio::task::JoinError>,
) -> String {
    match ended {
        Ok(Ok(())) => "it returned".to_owned(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    }
}

fn prepare_data_dir(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    dir.canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))
}

/// Seeds, starts the hub and the receiver, prints how to try it, and waits
/// for Ctrl-C (or the hub stopping).
async fn serve(
    args: &DemoArgs,
    data_dir: &std::path::Path,
    kernel_url: &str,
    bootstrap_key: &str,
    stop: &tokio::sync::watch::Sender<bool>,
    stop_signal: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut state = DemoState::load(data_dir)?;
    let api = KernelApi::new(kernel_url);

    let root = platform_admin(&api, &mut state, data_dir, bootstrap_key).await?;
    let tenant_id = tenant(&api, &root).await?;
    let admin = tenant_admin(&api, &mut state, data_dir, &root, &tenant_id).await?;
    let canon = canon(&api, &mut state, data_dir, &root, args.hub_bind).await?;
    let user_password = demo_user(&api, &mut state, data_dir, &admin).await?;
    let publisher = publisher(&api, &mut state, data_dir, &admin).await?;

    let (receiver, receiver_task) =
        Receiver::start(args.receiver_bind, !args.json, stopped(stop.subscribe()))
            .await
            .with_context(|| format!("cannot listen on {} for webhooks", args.receiver_bind))?;
    let subscription = subscription(&api, &mut state, data_dir, &admin, &receiver.url()).await?;
    anyhow::ensure!(
        receiver.set_secret(&subscription.secret),
        "the subscription's secret is not a whsec_ secret"
    );

    let hub_config = payment_hub::HubConfig {
        bind: args.hub_bind,
        database_url: format!("sqlite://{}", data_dir.join("payment-hub.db").display()),
        canon_name: CANON.to_owned(),
        assertion_secrets: vec![canon.secret.clone()],
        kernel_url: Some(kernel_url.to_owned()),
        service_accounts: vec![payment_hub::ServiceAccountCredentials {
            client_id: publisher.client_id.clone(),
            client_secret: publisher.client_secret.clone(),
        }],
        database_max_connections: payment_hub::config::DEFAULT_DATABASE_MAX_CONNECTIONS,
    };
    let hub = payment_hub::Hub::build(hub_config)
        .await
        .context("the payment hub could not start")?;
    let hub_url = format!("http://{}", hub.local_addr());
    let mut hub_task = tokio::spawn(hub.run_until_stopped(stopped(stop.subscribe())));

    point_canon_at(&api, &root, &canon, &hub_url).await?;
    routes(&api, &root, &canon.id).await?;
    // The administrator's calls, so that the demo user's rate-limit budget is
    // whole when the newcomer starts.
    wait_until_routed(&api, &admin).await?;
    let user = api.login(TENANT, USER_EMAIL, &user_password).await?;
    let accounts = accounts(&api, &mut state, data_dir, &admin, &user).await?;

    let ready = Ready {
        kernel_url: kernel_url.to_owned(),
        hub_url,
        receiver_url: receiver.url(),
        password: user_password,
        subscription_id: subscription.id,
        accounts,
        correlation_id: uuid::Uuid::now_v7().to_string(),
        idempotency_key: format!("demo-payment-{}", random_text(6)),
    };
    if args.json {
        println!("{}", ready.json());
    } else {
        println!("{}", ready.instructions(data_dir));
    }

    let outcome = tokio::select! {
        () = stop_signal => Ok(()),
        ended = &mut hub_task => Err(anyhow::anyhow!("the payment hub stopped: {}", describe_end(ended))),
    };
    if !args.json {
        println!("stopping the payment hub, the webhook receiver and the kernel");
    }
    // One signal stops the hub, the receiver and the kernel together: the
    // kernel drains the calls it is forwarding while the hub finishes them.
    let _ = stop.send(true);
    let drained = async {
        if !hub_task.is_finished() {
            let _ = (&mut hub_task).await;
        }
        let _ = receiver_task.await;
    };
    if tokio::time::timeout(STOP_GRACE, drained).await.is_err() {
        eprintln!(
            "warning: the payment hub did not stop within {} s",
            STOP_GRACE.as_secs()
        );
    }
    outcome
}

/// `n` random bytes as base64url text.
fn random_text(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A generated password (24 random bytes: 32 characters).
fn random_password() -> String {
    random_text(24)
}

/// Fills `slot` with a new password if empty and saves the state before the
/// kernel sees it, so a crash in between never loses a password in use.
fn password(
    slot: fn(&mut DemoState) -> &mut Option<String>,
    state: &mut DemoState,
    data_dir: &std::path::Path,
) -> anyhow::Result<(String, bool)> {
    if let Some(existing) = slot(state).clone() {
        return Ok((existing, false));
    }
    let new = random_password();
    *slot(state) = Some(new.clone());
    state.save(data_dir)?;
    Ok((new, true))
}

/// The platform administrator's token: bootstrapped on a first run.
async fn platform_admin(
    api: &KernelApi,
    state: &mut DemoState,
    data_dir: &std::path::Path,
    bootstrap_key: &str,
) -> anyhow::Result<String> {
    let (password, _) = password(|s| &mut s.platform_admin_password, state, data_dir)?;
    let body = json!({"email": PLATFORM_ADMIN_EMAIL, "password": password, "name": "Platform administrator"});
    let answer = api
        .call(
            "bootstrap the platform administrator",
            Method::POST,
            "/api/kernel/bootstrap",
            None,
            Some(&body),
            &[("x-bootstrap-key", bootstrap_key)],
        )
        .await?;
    match answer.status {
        StatusCode::CREATED | StatusCode::CONFLICT => {}
        other => anyhow::bail!(
            "bootstrap the platform administrator: the kernel answered {other}: {}",
            answer.body
        ),
    }
    api.login("system", PLATFORM_ADMIN_EMAIL, &password).await.map_err(|e| {
        anyhow::anyhow!("{e}; this data directory's kernel has an administrator the demo did not make (or {} was lost): use another --data-dir", state::STATE_FILE)
    })
}

/// The demo tenant's id, created on a first run.
async fn tenant(api: &KernelApi, root: &str) -> anyhow::Result<String> {
    const STEP: &str = "create the demo tenant";
    if let Some(found) = api
        .find(STEP, "/api/kernel/tenants", root, "slug", TENANT)
        .await?
    {
        return Ok(found["id"].as_str().unwrap_or_default().to_owned());
    }
    let body = json!({"slug": TENANT, "name": "Demo Finance"});
    Ok(api
        .expect(
            STEP,
            Method::POST,
            "/api/kernel/tenants",
            Some(root),
            Some(&body),
            &[StatusCode::CREATED],
        )
        .await?
        .text(STEP, "id")?)
}

/// The tenant administrator's token.
async fn tenant_admin(
    api: &KernelApi,
    state: &mut DemoState,
    data_dir: &std::path::Path,
    root: &str,
    tenant_id: &str,
) -> anyhow::Result<String> {
    const STEP: &str = "create the demo tenant's administrator";
    let (password, new) = password(|s| &mut s.tenant_admin_password, state, data_dir)?;
    if new {
        let body = json!({"email": TENANT_ADMIN_EMAIL, "name": "Demo administrator", "password": password});
        api.expect(
            STEP,
            Method::POST,
            &format!("/api/kernel/tenants/{tenant_id}/admins"),
            Some(root),
            Some(&body),
            &[StatusCode::CREATED, StatusCode::CONFLICT],
        )
        .await?;
    }
    Ok(api.login(TENANT, TENANT_ADMIN_EMAIL, &password).await?)
}

/// The hub's canon as registered.
struct Canon {
    id: String,
    base_url: String,
    version: i64,
    /// The assertion secret the hub verifies with.
    secret: String,
}

/// Registers the canon on a first run; on a later one finds it, and makes a
/// new assertion secret only if the kept one was lost.
async fn canon(
    api: &KernelApi,
    state: &mut DemoState,
    data_dir: &std::path::Path,
    root: &str,
    hub_bind: SocketAddr,
) -> anyhow::Result<Canon> {
    const STEP: &str = "register the payment hub's canon";
    let found = api
        .find(STEP, "/api/kernel/canons", root, "name", CANON)
        .await?;
    let canon = match found {
        Some(canon) => canon,
        None => {
            let permissions: Vec<Value> = HUB_PERMISSIONS
                .iter()
                .map(|(name, description)| json!({"name": name, "description": description}))
                .collect();
            // The hub's own /ping: a degraded ledger must not make the kernel
            // refuse every call, the chaos switches included.
            let body = json!({"name": CANON, "base_url": format!("http://{hub_bind}"), "health_path": "/ping", "permissions": permissions});
            let created = api
                .expect(
                    STEP,
                    Method::POST,
                    "/api/kernel/canons",
                    Some(root),
                    Some(&body),
                    &[StatusCode::CREATED],
                )
                .await?;
            let secret = created.body["assertion_secret"]["secret"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            state.canon_secret = Some(secret);
            state.save(data_dir)?;
            created.body
        }
    };
    let id = canon["id"].as_str().unwrap_or_default().to_owned();
    if state.canon_secret.is_none() {
        const ROTATE: &str = "make a new assertion secret for the payment hub";
        let made = api
            .expect(
                ROTATE,
                Method::POST,
                &format!("/api/kernel/canons/{id}/assertion-secrets"),
                Some(root),
                Some(&json!({})),
                &[StatusCode::CREATED],
            )
            .await?;
        let kid = made.text(ROTATE, "kid")?;
        state.canon_secret = Some(made.text(ROTATE, "secret")?);
        state.save(data_dir)?;
        api.expect(
            ROTATE,
            Method::POST,
            &format!("/api/kernel/canons/{id}/assertion-secrets/{kid}/activate"),
            Some(root),
            Some(&json!({})),
            &[StatusCode::OK, StatusCode::NO_CONTENT],
        )
        .await?;
    }
    let current = api
        .expect(
            STEP,
            Method::GET,
            &format!("/api/kernel/canons/{id}"),
            Some(root),
            None,
            &[StatusCode::OK],
        )
        .await?;
    Ok(Canon {
        id,
        base_url: current.text(STEP, "base_url")?,
        version: current.body["version"].as_i64().unwrap_or(1),
        secret: state.canon_secret.clone().unwrap_or_default(),
    })
}

/// Points the canon at the hub's actual address (a port chosen at start, or
/// another `--hub-bind` than last time).
async fn point_canon_at(
    api: &KernelApi,
    root: &str,
    canon: &Canon,
    hub_url: &str,
) -> anyhow::Result<()> {
    if canon.base_url.trim_end_matches('/') == hub_url {
        return Ok(());
    }
    let answer = api
        .call(
            "point the canon at the hub",
            Method::PATCH,
            &format!("/api/kernel/canons/{}", canon.id),
            Some(root),
            Some(&json!({"base_url": hub_url})),
            &[("if-match", &format!("\"{}\"", canon.version))],
        )
        .await?;
    anyhow::ensure!(
        answer.status == StatusCode::OK,
        "point the canon at the hub: the kernel answered {}: {}",
        answer.status,
        answer.body
    );
    Ok(())
}

/// A route for every endpoint of the hub that has none yet.
async fn routes(api: &KernelApi, root: &str, canon_id: &str) -> anyhow::Result<()> {
    const STEP: &str = "add the payment hub's routes";
    let existing = api
        .list_all(
            STEP,
            &format!("/api/kernel/routes?canon_id={canon_id}"),
            root,
        )
        .await?;
    for (method, path, permission, idempotency, audit_calls) in HUB_ROUTES {
        let present = existing
            .iter()
            .any(|r| r["method"] == method && r["path"] == path);
        if present {
            continue;
        }
        let body = json!({
            "canon_id": canon_id, "method": method, "path": path,
            "required_permissions": permission.into_iter().collect::<Vec<_>>(),
            "public_to_authenticated": permission.is_none(),
            "idempotency": idempotency, "audit_calls": audit_calls,
        });
        api.expect(
            STEP,
            Method::POST,
            "/api/kernel/routes",
            Some(root),
            Some(&body),
            &[StatusCode::CREATED],
        )
        .await?;
    }
    Ok(())
}

/// The id of the tenant's role `name`, created with `permissions` if missing.
async fn role(
    api: &KernelApi,
    admin: &str,
    name: &str,
    permissions: &[&str],
) -> anyhow::Result<String> {
    const STEP: &str = "create a role";
    if let Some(found) = api
        .find(STEP, "/api/kernel/roles", admin, "name", name)
        .await?
    {
        return Ok(found["id"].as_str().unwrap_or_default().to_owned());
    }
    let body = json!({"name": name, "permissions": permissions});
    Ok(api
        .expect(
            STEP,
            Method::POST,
            "/api/kernel/roles",
            Some(admin),
            Some(&body),
            &[StatusCode::CREATED],
        )
        .await?
        .text(STEP, "id")?)
}

/// The demo user with its role; its password.
async fn demo_user(
    api: &KernelApi,
    state: &mut DemoState,
    data_dir: &std::path::Path,
    admin: &str,
) -> anyhow::Result<String> {
    const STEP: &str = "create the demo user";
    let role_id = role(api, admin, ROLE, &ROLE_PERMISSIONS).await?;
    let (password, _) = password(|s| &mut s.user_password, state, data_dir)?;
    let user_id = match api
        .find(STEP, "/api/kernel/users", admin, "email", USER_EMAIL)
        .await?
    {
        Some(user) => user["id"].as_str().unwrap_or_default().to_owned(),
        None => {
            let body = json!({"email": USER_EMAIL, "name": "Demo user", "password": password});
            api.expect(
                STEP,
                Method::POST,
                "/api/kernel/users",
                Some(admin),
                Some(&body),
                &[StatusCode::CREATED],
            )
            .await?
            .text(STEP, "id")?
        }
    };
    let body = json!({"role_id": role_id});
    api.expect(
        "give the demo user its role",
        Method::POST,
        &format!("/api/kernel/users/{user_id}/roles"),
        Some(admin),
        Some(&body),
        &[StatusCode::NO_CONTENT, StatusCode::CONFLICT],
    )
    .await?;
    Ok(password)
}

/// The hub's service account (it publishes `finance.payment.processed`).
async fn publisher(
    api: &KernelApi,
    state: &mut DemoState,
    data_dir: &std::path::Path,
    admin: &str,
) -> anyhow::Result<Credentials> {
    const STEP: &str = "create the payment hub's service account";
    if let Some(credentials) = &state.service_account {
        return Ok(credentials.clone());
    }
    let role_id = role(api, admin, PUBLISHER_ROLE, &["kernel.event.publish"]).await?;
    let credentials = match api
        .find(
            STEP,
            "/api/kernel/service-accounts",
            admin,
            "name",
            PUBLISHER_ACCOUNT,
        )
        .await?
    {
        // Made by a run whose state was lost: a new secret.
        Some(account) => {
            let id = account["id"].as_str().unwrap_or_default();
            let rotated = api
                .expect(
                    STEP,
                    Method::POST,
                    &format!("/api/kernel/service-accounts/{id}/secret"),
                    Some(admin),
                    Some(&json!({})),
                    &[StatusCode::OK, StatusCode::CREATED],
                )
                .await?;
            Credentials {
                client_id: rotated.text(STEP, "client_id")?,
                client_secret: rotated.text(STEP, "client_secret")?,
            }
        }
        None => {
            let body = json!({"name": PUBLISHER_ACCOUNT, "role_ids": [role_id]});
            let created = api
                .expect(
                    STEP,
                    Method::POST,
                    "/api/kernel/service-accounts",
                    Some(admin),
                    Some(&body),
                    &[StatusCode::CREATED],
                )
                .await?;
            Credentials {
                client_id: created.text(STEP, "client_id")?,
                client_secret: created.text(STEP, "client_secret")?,
            }
        }
    };
    state.service_account = Some(credentials.clone());
    state.save(data_dir)?;
    Ok(credentials)
}

/// The webhook subscription to the receiver at `url` (moved there if an
/// earlier run's receiver listened elsewhere).
async fn subscription(
    api: &KernelApi,
    state: &mut DemoState,
    data_dir: &std::path::Path,
    admin: &str,
    url: &str,
) -> anyhow::Result<SubscriptionState> {
    const STEP: &str = "subscribe the webhook receiver";
    if let Some(kept) = state.subscription.clone() {
        let current = api
            .call(
                STEP,
                Method::GET,
                &format!("/api/kernel/subscriptions/{}", kept.id),
                Some(admin),
                None,
                &[],
            )
            .await?;
        if current.status == StatusCode::OK {
            if current.body["url"] != url {
                let version = current.body["version"].as_i64().unwrap_or(1).to_string();
                api.call(
                    STEP,
                    Method::PATCH,
                    &format!("/api/kernel/subscriptions/{}", kept.id),
                    Some(admin),
                    Some(&json!({"url": url})),
                    &[("if-match", &format!("\"{version}\""))],
                )
                .await
                .and_then(|a| {
                    if a.status == StatusCode::OK {
                        Ok(a)
                    } else {
                        Err(seed::SeedError::Refused {
                            step: STEP,
                            status: a.status,
                            body: a.body.to_string(),
                        })
                    }
                })?;
            }
            return Ok(kept);
        }
    }
    let body = json!({"url": url, "event_types": ["finance.payment.*"], "description": "aibos demo receiver"});
    let created = api
        .expect(
            STEP,
            Method::POST,
            "/api/kernel/subscriptions",
            Some(admin),
            Some(&body),
            &[StatusCode::CREATED],
        )
        .await?;
    let subscription = SubscriptionState {
        id: created.text(STEP, "id")?,
        secret: created.text(STEP, "secret")?,
    };
    state.subscription = Some(subscription.clone());
    state.save(data_dir)?;
    Ok(subscription)
}

/// Waits until a call through the gateway reaches the hub (the kernel's
/// health check has seen it up).
async fn wait_until_routed(api: &KernelApi, token: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        let answer = api
            .call(
                "reach the hub through the gateway",
                Method::GET,
                &format!("/api/gateway/{CANON}/ping"),
                Some(token),
                None,
                &[],
            )
            .await?;
        if answer.status == StatusCode::OK {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the gateway did not reach the payment hub within {} s: {} {}",
            READY_TIMEOUT.as_secs(),
            answer.status,
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// An account as printed: id, currency, balance now.
#[derive(serde::Serialize)]
struct AccountShown {
    #[serde(skip)]
    name: String,
    id: String,
    currency: String,
    balance_minor: i64,
}

/// Opens and funds the demo's accounts through the gateway on a first run
/// (each with an idempotency key of its own); reads their balances.
async fn accounts(
    api: &KernelApi,
    state: &mut DemoState,
    data_dir: &std::path::Path,
    admin: &str,
    user: &str,
) -> anyhow::Result<Vec<AccountShown>> {
    const STEP: &str = "open and fund the demo accounts";
    for (name, currency, opening) in ACCOUNTS {
        if state.accounts.iter().any(|a| a.name == name) {
            continue;
        }
        let body = json!({"name": name, "currency": currency, "opening_balance_minor": opening});
        let key = format!("demo-account-{name}");
        let answer = api
            .call(
                STEP,
                Method::POST,
                &format!("/api/gateway/{CANON}/ledger/accounts"),
                Some(admin),
                Some(&body),
                &[("idempotency-key", &key)],
            )
            .await?;
        anyhow::ensure!(
            answer.status == StatusCode::CREATED,
            "{STEP}: the hub answered {}: {}",
            answer.status,
            answer.body
        );
        state.accounts.push(AccountState {
            name: name.to_owned(),
            id: answer.text(STEP, "id")?,
            currency: currency.to_owned(),
        });
        state.save(data_dir)?;
    }
    let mut shown = Vec::with_capacity(state.accounts.len());
    for account in &state.accounts {
        let answer = api
            .expect(
                "read the demo accounts",
                Method::GET,
                &format!("/api/gateway/{CANON}/ledger/accounts/{}", account.id),
                Some(user),
                None,
                &[StatusCode::OK],
            )
            .await?;
        shown.push(AccountShown {
            name: account.name.clone(),
            id: account.id.clone(),
            currency: account.currency.clone(),
            balance_minor: answer.body["balance_minor"].as_i64().unwrap_or_default(),
        });
    }
    Ok(shown)
}

/// What a ready demo prints.
struct Ready {
    kernel_url: String,
    hub_url: String,
    receiver_url: String,
    password: String,
    subscription_id: String,
    accounts: Vec<AccountShown>,
    /// Suggested for the printed payment: the id to find it by everywhere.
    correlation_id: String,
    /// Suggested for the printed payment: sending it again replays.
    idempotency_key: String,
}

impl Ready {
    /// SPEC §10's one line for scripts.
    fn json(&self) -> Value {
        json!({
            "kernel_url": self.kernel_url,
            "hub_url": self.hub_url,
            "tenant": TENANT,
            "email": USER_EMAIL,
            "password": self.password,
            "canon": CANON,
            "accounts": self.accounts,
        })
    }

    fn account(&self, name: &str) -> &str {
        self.accounts
            .iter()
            .find(|a| a.name == name)
            .map_or("", |a| a.id.as_str())
    }

    /// The instructions: where everything runs, then shell lines to paste, in order.
    fn instructions(&self, data_dir: &std::path::Path) -> String {
        let k = &self.kernel_url;
        let gateway = format!("$K/api/gateway/{CANON}");
        let mut accounts = String::new();
        for a in &self.accounts {
            accounts.push_str(&format!(
                "  {:<6} {}  {} {}.{:02}\n",
                a.name,
                a.id,
                a.currency,
                a.balance_minor / 100,
                (a.balance_minor % 100).abs()
            ));
        }
        let login =
            json!({"tenant": TENANT, "email": USER_EMAIL, "password": self.password}).to_string();
        let payment = json!({
            "amount_minor": 2500, "currency": "EUR", "payer_account": self.account("alice"),
            "payee_account": self.account("bob"), "reference": "Invoice 2026-001",
        })
        .to_string();
        format!(
            r#"AI-BOS demo is running (data in {data}; Ctrl-C stops everything).

  kernel        {k}
  payment hub   {hub}  (called through the gateway at {k}/api/gateway/{CANON})
  webhooks      {receiver}  (a receiver that checks every delivery's signature)
  tenant {TENANT}, user {USER_EMAIL}, password {password}
{accounts}
Try it in another terminal (needs curl and jq); paste the lines in order:

# 1. Log in as the demo user.
K={k}
TOKEN=$(curl -s $K/api/kernel/auth/login -H 'content-type: application/json' -d '{login}' | jq -r .access_token)
# 2. Pay 25.00 EUR from alice to bob. CID follows the payment everywhere; the route requires an
#    Idempotency-Key, and the same KEY sent again replays the answer without moving money twice.
CID={cid}; KEY={key}
PAYMENT=$(curl -s {gateway}/payments/process -H "authorization: Bearer $TOKEN" -H "x-correlation-id: $CID" -H "idempotency-key: $KEY" -H 'content-type: application/json' -d '{payment}' | tee /dev/stderr | jq -r .transaction_id); echo
# 3. The payment's status, alice's balance and the trial balance (debits equal credits).
curl -s {gateway}/payments/status/$PAYMENT -H "authorization: Bearer $TOKEN" | jq .
curl -s {gateway}/ledger/accounts/{alice} -H "authorization: Bearer $TOKEN" | jq .
curl -s {gateway}/ledger/trial-balance -H "authorization: Bearer $TOKEN" | jq .
# 4. The finance.payment.processed event the hub published, under the same correlation id.
curl -s "$K/api/kernel/events?types=finance.payment.processed&limit=1000" -H "authorization: Bearer $TOKEN" | jq --arg cid "$CID" '.items[] | select(.correlation_id == $cid)'
# 5. Its signed webhook deliveries (the receiver above also prints each one it verifies).
curl -s $K/api/kernel/subscriptions/{subscription}/deliveries -H "authorization: Bearer $TOKEN" | jq '.items[:3]'
# 6. The audit trail of the payment: the gateway's record of the call, under the same correlation id.
curl -s "$K/api/kernel/audit?correlation_id=$CID" -H "authorization: Bearer $TOKEN" | jq '.items[] | {{seq, action, outcome, correlation_id, details}}'
# 7. Break the ledger: payments get 503 LEDGER_DOWN and nothing moves; recover, and they go through again.
curl -s -X POST {gateway}/chaos/fail/ledger -H "authorization: Bearer $TOKEN" | jq .
curl -s {gateway}/payments/process -H "authorization: Bearer $TOKEN" -H "idempotency-key: $KEY-chaos" -H 'content-type: application/json' -d '{payment}' | jq .
curl -s -X POST {gateway}/chaos/recover/ledger -H "authorization: Bearer $TOKEN" | jq .
"#,
            data = data_dir.display(),
            hub = self.hub_url,
            receiver = self.receiver_url,
            password = self.password,
            cid = self.correlation_id,
            key = self.idempotency_key,
            alice = self.account("alice"),
            subscription = self.subscription_id,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> Ready {
        Ready {
            kernel_url: "http://127.0.0.1:3001".into(),
            hub_url: "http://127.0.0.1:4000".into(),
            receiver_url: "http://127.0.0.1:40000/webhooks".into(),
            password: "generated-password".into(),
            subscription_id: "0197-sub".into(),
            accounts: vec![
                AccountShown {
                    name: "alice".into(),
                    id: "0197-alice".into(),
                    currency: "EUR".into(),
                    balance_minor: 10_000_000,
                },
                AccountShown {
                    name: "bob".into(),
                    id: "0197-bob".into(),
                    currency: "EUR".into(),
                    balance_minor: 5,
                },
            ],
            correlation_id: "0197-cid".into(),
            idempotency_key: "demo-payment-x".into(),
        }
    }

    #[test]
    fn the_json_line_holds_exactly_the_keys_of_spec_section_10() {
        let line = ready().json();
        let mut keys: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "accounts",
                "canon",
                "email",
                "hub_url",
                "kernel_url",
                "password",
                "tenant"
            ]
        );
        assert_eq!(
            line["accounts"][0],
            json!({"id": "0197-alice", "currency": "EUR", "balance_minor": 10_000_000})
        );
        assert!(!line.to_string().contains('\n'), "one line");
    }

    #[test]
    fn the_instructions_name_the_accounts_the_payment_and_each_place_to_look() {
        let text = ready().instructions(std::path::Path::new("/data/demo"));
        assert!(text.contains("alice  0197-alice  EUR 100000.00"), "{text}");
        assert!(text.contains("bob    0197-bob  EUR 0.05"), "{text}");
        assert!(
            text.contains(r#""payee_account":"0197-bob","payer_account":"0197-alice""#),
            "{text}"
        );
        for place in [
            "/payments/process",
            "/payments/status/$PAYMENT",
            "/api/kernel/events?",
            "/subscriptions/0197-sub/deliveries",
            "/api/kernel/audit?correlation_id=$CID",
            "/chaos/fail/ledger",
            "/chaos/recover/ledger",
        ] {
            assert!(text.contains(place), "{place} in {text}");
        }
        assert!(text.contains("CID=0197-cid; KEY=demo-payment-x"), "{text}");
    }
}
