//! Secrets at rest: signing seeds and assertion secrets are sealed under the
//! master key in the database; a restart with the same key serves the same
//! tokens; a wrong or missing key refuses to start; clear values of an older
//! kernel are sealed on start; `aibos keys rotate-master` re-seals everything.

use std::path::Path;

use aibos_kernel::config::{Config, ConfigSources};
use aibos_kernel::db::Db;
use aibos_kernel::identity::tokens::StoredKey;
use aibos_kernel::{App, AppOptions, StartError};
use aibos_testkit::process::KernelProcess;
use aibos_testkit::{Engine, KernelOptions, TestDb, TestKernel, spawn_kernel_with};
use base64::Engine as _;

const BINARY: &str = env!("CARGO_BIN_EXE_aibos");

fn new_key() -> String {
    aibos_kernel::secrets::MasterKey::generate().1
}

fn key_id(text: &str) -> String {
    aibos_kernel::secrets::MasterKey::parse(text)
        .unwrap()
        .id()
        .to_owned()
}

async fn kernel(url: &str, env: &[(&str, &str)]) -> TestKernel {
    let options = KernelOptions {
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        database_url: Some(url.to_owned()),
        ..KernelOptions::default()
    };
    spawn_kernel_with(Engine::Sqlite, options).await.unwrap()
}

/// Builds a kernel on `url` with `env` without serving it: the start-up error, if any.
async fn build(url: &str, env: &[(&str, &str)]) -> Result<App, StartError> {
    let cwd = tempfile::tempdir().unwrap();
    let mut vars = vec![
        ("AIBOS_SERVER__BIND".to_owned(), "127.0.0.1:0".to_owned()),
        ("AIBOS_DATABASE__URL".to_owned(), url.to_owned()),
    ];
    vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let sources = ConfigSources::new(cwd.path(), vars);
    let config = Config::load(&sources).unwrap();
    App::build(config, AppOptions::new(sources)).await
}

/// Every stored seed and assertion secret, read raw: `(kid, private_key)` and `(kid, secret)`.
async fn raw_rows(db: &Db) -> (Vec<(String, String)>, Vec<(String, String)>) {
    match db {
        Db::Sqlite(aibos_kernel::db::SqliteDb { pool, .. }) => (
            sqlx::query_as("SELECT kid, private_key FROM signing_keys")
                .fetch_all(pool)
                .await
                .unwrap(),
            sqlx::query_as("SELECT kid, secret FROM canon_assertion_secrets")
                .fetch_all(pool)
                .await
                .unwrap(),
        ),
        Db::Postgres(pool) => (
            sqlx::query_as("SELECT kid, private_key FROM signing_keys")
                .fetch_all(pool)
                .await
                .unwrap(),
            sqlx::query_as("SELECT kid, secret FROM canon_assertion_secrets")
                .fetch_all(pool)
                .await
                .unwrap(),
        ),
    }
}

async fn exec(db: &Db, sql: String) {
    let sql = sqlx::AssertSqlSafe(sql);
    match db {
        Db::Sqlite(aibos_kernel::db::SqliteDb { pool, .. }) => {
            sqlx::raw_sql(sql).execute(pool).await.map(|_| ())
        }
        Db::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
    }
    .unwrap();
}

fn active_key(kernel: &TestKernel) -> StoredKey {
    kernel
        .state
        .keys()
        .active_key()
        .cloned()
        .expect("EdDSA has an active key")
}

/// What the canon's signer in the route table makes of a fixed payload (an HMAC: equal iff the secret is).
fn signature_of(kernel: &TestKernel, canon: &str) -> String {
    let table = kernel.state.gateway().table();
    table
        .canon(canon)
        .expect("the canon is routed")
        .signer
        .as_ref()
        .expect("it has a signer")
        .sign(b"{}")
}

fn expected_signature(kid: &str, secret: &str) -> String {
    aibos_kernel::gateway::table::Signer::new(kid.to_owned(), secret).sign(b"{}")
}

async fn me_status(kernel: &TestKernel, token: &str) -> u16 {
    kernel
        .client
        .get(kernel.url("/api/kernel/auth/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn jwks(kernel: &TestKernel) -> serde_json::Value {
    kernel
        .client
        .get(kernel.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Asserts no stored value holds `seed` or `secret` in clear, and every one is sealed under `key_id`.
async fn assert_sealed(db: &Db, key: &StoredKey, secret: &str, key_id: &str) {
    let (keys, secrets) = raw_rows(db).await;
    assert!(!keys.is_empty() && !secrets.is_empty());
    let seed_b64 = key.seed_text();
    let seed_url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.seed);
    let seed_hex: String = key.seed.iter().map(|b| format!("{b:02x}")).collect();
    for (kid, value) in keys.iter().chain(secrets.iter()) {
        for clear in [
            seed_b64.as_str(),
            seed_url.as_str(),
            seed_hex.as_str(),
            secret,
        ] {
            assert!(!value.contains(clear), "{kid}: a secret is stored in clear");
        }
        assert!(
            value.starts_with(&format!("enc:v1:{key_id}:")),
            "{kid}: {value} is not sealed under {key_id}"
        );
    }
}

crate::both_engines! {
    async fn stored_secrets_are_sealed_and_a_restart_with_the_same_key_serves_the_same_tokens(engine: Engine) {
        let test_db = TestDb::create(engine).await.unwrap();
        let folder = tempfile::tempdir().unwrap();
        let key_file = folder.path().join("keys/master.key");
        let key_file = key_file.to_string_lossy().into_owned();
        let env = [("AIBOS_AUTH__MASTER_KEY_FILE", key_file.as_str())];

        // First start: no key anywhere, so one is generated into the file, private.
        let first = kernel(test_db.url(), &env).await;
        let generated = std::fs::read_to_string(&key_file).expect("the key file was generated");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(first.state.master_keys().current().id(), key_id(&generated));
        let admin = first.platform_admin().await;
        let (_canon_id, secret) = first.canon(&admin, "ledger", "http://127.0.0.1:9", &[]).await;
        let key = active_key(&first);
        assert_sealed(first.state.db(), &key, &secret, &key_id(&generated)).await;
        let (_, secrets) = raw_rows(first.state.db()).await;
        let kid = secrets[0].0.clone();
        assert_eq!(signature_of(&first, "ledger"), expected_signature(&kid, &secret));
        let published = jwks(&first).await;
        first.shutdown().await.unwrap();

        // Same key: same signing key, same published keys, the old token still works,
        // the canon's assertions are signed with the same secret.
        let second = kernel(test_db.url(), &env).await;
        assert_eq!(std::fs::read_to_string(&key_file).unwrap(), generated, "the key file is never rewritten");
        assert_eq!(active_key(&second).public, key.public);
        assert_eq!(jwks(&second).await, published);
        assert_eq!(me_status(&second, &admin.access_token).await, 200);
        assert_eq!(signature_of(&second, "ledger"), expected_signature(&kid, &secret));
        second.shutdown().await.unwrap();

        // A configured key of its own (the environment, as several instances would
        // have it) instead of the file: the same refusal/acceptance by key id.
        let err = build(test_db.url(), &[("AIBOS_AUTH__MASTER_KEY", &new_key())]).await.err().expect("a wrong key refuses to start");
        let message = err.to_string();
        assert!(matches!(err, StartError::MasterKey(_)), "{message}");
        assert!(message.contains("auth.master_key"), "names the key's source: {message}");
        assert!(message.contains(&key_id(&generated)), "names the key the secrets were sealed with: {message}");
        assert!(!message.contains(generated.trim()), "never the key itself");
        let ok = build(test_db.url(), &[("AIBOS_AUTH__MASTER_KEY", generated.trim())]).await;
        assert!(ok.is_ok(), "the right key given as auth.master_key starts: {:?}", ok.err().map(|e| e.to_string()));
    }

    async fn without_its_key_file_a_kernel_with_sealed_secrets_refuses_to_generate_one(engine: Engine) {
        let test_db = TestDb::create(engine).await.unwrap();
        let folder = tempfile::tempdir().unwrap();
        let key_file = folder.path().join("master.key").to_string_lossy().into_owned();
        let first = kernel(test_db.url(), &[("AIBOS_AUTH__MASTER_KEY_FILE", &key_file)]).await;
        let id = first.state.master_keys().current().id().to_owned();
        first.shutdown().await.unwrap();
        let elsewhere = folder.path().join("other.key").to_string_lossy().into_owned();
        let err = build(test_db.url(), &[("AIBOS_AUTH__MASTER_KEY_FILE", &elsewhere)]).await.err().expect("refused");
        let message = err.to_string();
        assert!(message.contains("no master key") && message.contains(&elsewhere) && message.contains(&id), "{message}");
        assert!(!Path::new(&elsewhere).exists(), "no key was generated");
    }

    async fn secrets_an_older_kernel_stored_in_clear_are_sealed_on_start(engine: Engine) {
        let test_db = TestDb::create(engine).await.unwrap();
        let master = new_key();
        let env = [("AIBOS_AUTH__MASTER_KEY", master.as_str())];
        let first = kernel(test_db.url(), &env).await;
        let admin = first.platform_admin().await;
        let (canon_id, secret) = first.canon(&admin, "ledger", "http://127.0.0.1:9", &[]).await;
        let key = active_key(&first);
        let db = first.state.db().clone();
        // What a kernel from before sealing left behind: values in clear.
        exec(&db, format!("UPDATE signing_keys SET private_key = '{}' WHERE kid = '{}'", key.seed_text(), key.kid)).await;
        exec(&db, format!("UPDATE canon_assertion_secrets SET secret = '{secret}' WHERE canon_id = '{canon_id}'")).await;
        let (keys, _) = raw_rows(&db).await;
        assert!(keys.iter().any(|(_, v)| v == &key.seed_text()));
        first.shutdown().await.unwrap();

        let second = kernel(test_db.url(), &env).await;
        assert_sealed(second.state.db(), &key, &secret, &key_id(&master)).await;
        assert_eq!(active_key(&second).public, key.public);
        assert_eq!(me_status(&second, &admin.access_token).await, 200);
        let (_, secrets) = raw_rows(second.state.db()).await;
        assert_eq!(signature_of(&second, "ledger"), expected_signature(&secrets[0].0, &secret));
    }

    async fn a_ciphertext_copied_to_another_row_does_not_open(engine: Engine) {
        let test_db = TestDb::create(engine).await.unwrap();
        let master = new_key();
        let env = [("AIBOS_AUTH__MASTER_KEY", master.as_str())];
        let first = kernel(test_db.url(), &env).await;
        let admin = first.platform_admin().await;
        let (ledger, _) = first.canon(&admin, "ledger", "http://127.0.0.1:9", &[]).await;
        let (billing, _) = first.canon(&admin, "billing", "http://127.0.0.1:9", &[]).await;
        // Someone with database access gives billing the ledger's (sealed) secret.
        exec(first.state.db(), format!("UPDATE canon_assertion_secrets SET secret = (SELECT secret FROM canon_assertion_secrets WHERE canon_id = '{ledger}') WHERE canon_id = '{billing}'")).await;
        first.shutdown().await.unwrap();
        let message = build(test_db.url(), &env).await.err().expect("refused").to_string();
        assert!(message.contains(&billing) && message.contains("copied from another row"), "{message}");
    }

    async fn rotate_master_reseals_every_secret_under_the_new_key(engine: Engine) {
        let test_db = TestDb::create(engine).await.unwrap();
        let folder = tempfile::tempdir().unwrap();
        let old_file = folder.path().join("old.key").to_string_lossy().into_owned();
        let new_file = folder.path().join("new.key").to_string_lossy().into_owned();
        let first = kernel(test_db.url(), &[("AIBOS_AUTH__MASTER_KEY_FILE", &old_file)]).await;
        let admin = first.platform_admin().await;
        let (_, secret) = first.canon(&admin, "ledger", "http://127.0.0.1:9", &[]).await;
        let key = active_key(&first);
        // A canon with a client certificate for mutual TLS: its key is sealed too.
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api/fixtures/tls");
        let pem = |name: &str| std::fs::read_to_string(format!("{fixtures}/{name}")).unwrap();
        let created = first
            .as_(&admin, reqwest::Method::POST, "/api/kernel/canons")
            .json(&serde_json::json!({ "name": "mutual", "base_url": "https://cell.example",
                "tls": { "client_cert_pem": pem("client.pem"), "client_key_pem": pem("client.key") } }))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        first.shutdown().await.unwrap();

        let out = std::process::Command::new(BINARY)
            .args(["keys", "rotate-master", "--new-key-file", &new_file, "--json"])
            .current_dir(folder.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AIBOS_DATABASE__URL", test_db.url())
            .env("AIBOS_AUTH__MASTER_KEY_FILE", &old_file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let new_text = std::fs::read_to_string(&new_file).expect("the new key file was created");
        assert_eq!(report["key_id"], key_id(&new_text));
        assert_eq!(report["resealed"], 4, "one signing key, two assertion secrets, one TLS client key: {report}");

        // Only the new key opens them now; during the switch the old one may stay as previous.
        let second = kernel(test_db.url(), &[("AIBOS_AUTH__MASTER_KEY_FILE", &new_file)]).await;
        assert_sealed(second.state.db(), &key, &secret, &key_id(&new_text)).await;
        let tls_key: String = match second.state.db() {
            Db::Sqlite(aibos_kernel::db::SqliteDb { pool, .. }) => sqlx::query_scalar("SELECT tls_client_key FROM canons WHERE name = 'mutual'").fetch_one(pool).await.unwrap(),
            Db::Postgres(pool) => sqlx::query_scalar("SELECT tls_client_key FROM canons WHERE name = 'mutual'").fetch_one(pool).await.unwrap(),
        };
        assert!(tls_key.starts_with(&format!("enc:v1:{}:", key_id(&new_text))), "{tls_key}");
        assert!(second.state.gateway().table().canon("mutual").is_some_and(|c| c.tls.is_some()), "the re-sealed key opens");
        assert_eq!(me_status(&second, &admin.access_token).await, 200);
        let rotated = second.audit(&admin, "action=secrets.resealed").await;
        assert_eq!(rotated.len(), 1, "{rotated:?}");
        second.shutdown().await.unwrap();
        let err = build(test_db.url(), &[("AIBOS_AUTH__MASTER_KEY_FILE", &old_file)]).await.err().expect("the old key alone is refused");
        assert!(err.to_string().contains(&key_id(&new_text)), "{err}");
        let old_text = std::fs::read_to_string(&old_file).unwrap();
        let both = build(test_db.url(), &[("AIBOS_AUTH__MASTER_KEY", new_text.trim()), ("AIBOS_AUTH__PREVIOUS_MASTER_KEY", old_text.trim())]).await;
        assert!(both.is_ok(), "{:?}", both.err().map(|e| e.to_string()));
    }

    async fn an_online_rotation_opens_both_keys_then_finishes_under_the_new_one(engine: Engine) {
        let test_db = TestDb::create(engine).await.unwrap();
        let (old, new) = (new_key(), new_key());
        let first = kernel(test_db.url(), &[("AIBOS_AUTH__MASTER_KEY", &old)]).await;
        let admin = first.platform_admin().await;
        let (_, ledger_secret) = first.canon(&admin, "ledger", "http://127.0.0.1:9", &[]).await;
        first.shutdown().await.unwrap();

        // Step 1: every instance gets the new key, the old one as previous.
        let switching = [("AIBOS_AUTH__MASTER_KEY", new.as_str()), ("AIBOS_AUTH__PREVIOUS_MASTER_KEY", old.as_str())];
        let second = kernel(test_db.url(), &switching).await;
        assert_eq!(me_status(&second, &admin.access_token).await, 200, "values sealed by the old key open");
        let (_, billing_secret) = second.canon(&admin, "billing", "http://127.0.0.1:9", &[]).await;
        let (_, secrets) = raw_rows(second.state.db()).await;
        let ids: Vec<Option<&str>> = secrets.iter().map(|(_, v)| aibos_kernel::secrets::sealed_by(v)).collect();
        assert!(ids.contains(&Some(key_id(&old).as_str())) && ids.contains(&Some(key_id(&new).as_str())), "{ids:?}");
        assert_eq!(signature_of(&second, "ledger"), expected_signature(&secrets.iter().find(|(_, v)| aibos_kernel::secrets::sealed_by(v) == Some(key_id(&old).as_str())).unwrap().0, &ledger_secret));

        // Step 2: rotate-master with the same configuration re-seals what the old key still holds.
        let out = std::process::Command::new(BINARY)
            .args(["keys", "rotate-master", "--json"])
            .current_dir(tempfile::tempdir().unwrap().path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AIBOS_DATABASE__URL", test_db.url())
            .env("AIBOS_AUTH__MASTER_KEY", &new)
            .env("AIBOS_AUTH__PREVIOUS_MASTER_KEY", &old)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["resealed"], 2, "the signing key and the ledger's secret, not billing's: {report}");
        let key = active_key(&second);
        second.shutdown().await.unwrap();

        // Step 3: the new key alone.
        let third = kernel(test_db.url(), &[("AIBOS_AUTH__MASTER_KEY", &new)]).await;
        assert_sealed(third.state.db(), &key, &ledger_secret, &key_id(&new)).await;
        assert_sealed(third.state.db(), &key, &billing_secret, &key_id(&new)).await;
        assert_eq!(me_status(&third, &admin.access_token).await, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_a_wrong_master_key_exits_1_naming_the_key_source() {
    let cwd = tempfile::tempdir().unwrap();
    let right = new_key();
    let env = [
        ("AIBOS_SERVER__BIND", "127.0.0.1:0"),
        ("AIBOS_AUTH__MASTER_KEY", right.as_str()),
    ];
    let mut kernel = KernelProcess::start(Path::new(BINARY), cwd.path(), &env)
        .await
        .unwrap();
    kernel.signal("TERM").await;
    let _ = kernel.child.wait().await;

    let wrong = new_key();
    let out = std::process::Command::new(BINARY)
        .arg("serve")
        .current_dir(cwd.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AIBOS_SERVER__BIND", "127.0.0.1:0")
        .env("AIBOS_AUTH__MASTER_KEY", &wrong)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("auth.master_key"), "{error}");
    assert!(error.contains(&key_id(&right)), "{error}");
    assert!(
        !error.contains(&wrong) && !error.contains(&right),
        "the keys are never printed"
    );
}
