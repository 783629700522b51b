//! Per-canon TLS for https cells: a CA bundle instead of the public roots, a
//! client certificate for mutual TLS whose key is stored sealed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aibos_kernel::db::Db;
use aibos_testkit::{TestKernel, spawn_kernel};
use reqwest::Method;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::expect_problem;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/api/fixtures/tls/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// An https cell with the fixtures' server certificate. With `client_ca`, it
/// requires a client certificate signed by it. Answers every request with
/// `mtls` (a client certificate was presented) or `tls`, and counts the
/// proxied calls (not the health checks).
async fn tls_cell(client_ca: Option<&str>) -> (SocketAddr, Arc<AtomicUsize>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(fixture("server.pem").as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(fixture("server.key").as_bytes()).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(cert.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = if stream.get_ref().1.peer_certificates().is_some() {
                    "mtls"
                } else {
                    "tls"
                };
                if head.starts_with(b"GET /hello ") {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, served)
}

/// Registers canon `name` at `https://addr` with `tls`, and a `GET /hello` route open to any caller.
async fn https_canon(
    k: &TestKernel,
    root: &aibos_testkit::api::Session,
    name: &str,
    addr: SocketAddr,
    tls: Value,
) -> String {
    let response = k
        .as_(root, Method::POST, "/api/kernel/canons")
        .json(&json!({ "name": name, "base_url": format!("https://127.0.0.1:{}", addr.port()), "tls": tls }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_owned();
    k.route(
        root,
        &id,
        "GET",
        "/hello",
        &[],
        json!({ "public_to_authenticated": true }),
    )
    .await;
    id
}

/// `GET /api/gateway/{canon}/hello`: (status, body).
async fn call(k: &TestKernel, root: &aibos_testkit::api::Session, canon: &str) -> (u16, String) {
    let response = k
        .as_(root, Method::GET, &format!("/api/gateway/{canon}/hello"))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn raw_client_key(db: &Db, canon_id: &str) -> Option<String> {
    match db {
        Db::Sqlite(aibos_kernel::db::SqliteDb { pool, .. }) => {
            sqlx::query_scalar("SELECT tls_client_key FROM canons WHERE id = $1")
                .bind(canon_id)
                .fetch_one(pool)
                .await
                .unwrap()
        }
        Db::Postgres(pool) => sqlx::query_scalar("SELECT tls_client_key FROM canons WHERE id = $1")
            .bind(canon_id)
            .fetch_one(pool)
            .await
            .unwrap(),
    }
}

crate::both_engines! {
    async fn an_https_cell_is_reached_through_its_ca_bundle_and_client_certificate(engine: Engine) {
        let Some(k) = spawn_kernel(engine).await else { return };
        let root = k.platform_admin().await;

        // A cell whose certificate a private CA signed: the public roots refuse it.
        let (cell, served) = tls_cell(None).await;
        https_canon(&k, &root, "public-roots", cell, Value::Null).await;
        let (status, _) = call(&k, &root, "public-roots").await;
        assert_eq!(status, 503, "an unknown issuer is a failed connection");
        assert_eq!(served.load(Ordering::SeqCst), 0);
        https_canon(&k, &root, "private-ca", cell, json!({ "ca_bundle_pem": fixture("ca.pem") })).await;
        assert_eq!(call(&k, &root, "private-ca").await, (200, "tls".to_owned()));

        // A cell that requires a client certificate.
        let (mutual_cell, mutual_served) = tls_cell(Some(&fixture("client-ca.pem"))).await;
        https_canon(&k, &root, "no-client-cert", mutual_cell, json!({ "ca_bundle_pem": fixture("ca.pem") })).await;
        assert!(call(&k, &root, "no-client-cert").await.0 >= 500);
        let key_pem = fixture("client.key");
        let mutual = https_canon(&k, &root, "mutual", mutual_cell, json!({
            "ca_bundle_pem": fixture("ca.pem"), "client_cert_pem": fixture("client.pem"), "client_key_pem": key_pem,
        })).await;
        assert_eq!(call(&k, &root, "mutual").await, (200, "mtls".to_owned()));
        assert_eq!(mutual_served.load(Ordering::SeqCst), 1);

        // The key is stored sealed and never shown or audited; the certificates are shown.
        let key_body: String = key_pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let stored = raw_client_key(k.state.db(), &mutual).await.expect("a stored key");
        assert!(stored.starts_with("enc:v1:"), "{stored}");
        for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!stored.contains(line));
        }
        let shown = k.as_(&root, Method::GET, &format!("/api/kernel/canons/{mutual}")).send().await.unwrap().text().await.unwrap();
        assert!(!shown.contains("PRIVATE KEY") && !shown.contains(&key_body[..40]), "{shown}");
        let view: Value = serde_json::from_str(&shown).unwrap();
        assert_eq!(view["tls"]["client_key"], true);
        assert_eq!(view["tls"]["client_cert_pem"], fixture("client.pem"));
        let audit = serde_json::to_string(&k.audit(&root, "action=canon.created").await).unwrap();
        assert!(!audit.contains("PRIVATE KEY") && !audit.contains(&key_body[..40]));
        assert!(audit.contains("client_certificate"), "{audit}");

        // Removing the settings: back to the public roots, refused again.
        let response = k.as_(&root, Method::PATCH, &format!("/api/kernel/canons/{mutual}")).json(&json!({ "tls": null })).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let view: Value = response.json().await.unwrap();
        assert_eq!(view["tls"], Value::Null);
        assert_eq!(raw_client_key(k.state.db(), &mutual).await, None);
        assert_eq!(call(&k, &root, "mutual").await.0, 503);
    }

    async fn tls_settings_are_validated_field_by_field(engine: Engine) {
        let Some(k) = spawn_kernel(engine).await else { return };
        let root = k.platform_admin().await;
        let create = |tls: Value, base: &str| {
            k.as_(&root, Method::POST, "/api/kernel/canons").json(&json!({ "name": "cell", "base_url": base, "tls": tls })).send()
        };
        let https = "https://cell.example";
        let cases = [
            (json!({ "ca_bundle_pem": fixture("ca.pem") }), "http://cell.example", "tls"),
            (json!({}), https, "tls"),
            (json!({ "ca_bundle_pem": "not a pem" }), https, "tls.ca_bundle_pem"),
            (json!({ "client_cert_pem": fixture("client.pem") }), https, "tls.client_key_pem"),
            (json!({ "client_key_pem": fixture("client.key") }), https, "tls.client_cert_pem"),
            (json!({ "client_cert_pem": fixture("client.pem"), "client_key_pem": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n" }), https, "tls.client_key_pem"),
            // A key that is not the certificate's.
            (json!({ "client_cert_pem": fixture("client.pem"), "client_key_pem": fixture("server.key") }), https, "tls.client_key_pem"),
            (json!({ "ca_bundle_pem": "x".repeat(aibos_kernel::limits::CANON_TLS_PEM_BYTES_MAX + 1) }), https, "tls.ca_bundle_pem"),
        ];
        for (tls, base, field) in cases {
            let problem = expect_problem(create(tls.clone(), base).await.unwrap(), 400, "VALIDATION_ERROR").await;
            assert_eq!(problem["errors"][0]["field"], field, "{tls} → {problem}");
            assert!(!problem.to_string().contains("PRIVATE KEY"), "{problem}");
        }

        // Kept settings must fit a changed base URL.
        let response = create(json!({ "ca_bundle_pem": fixture("ca.pem") }), https).await.unwrap();
        assert_eq!(response.status(), 201);
        let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
        let problem = expect_problem(
            k.as_(&root, Method::PATCH, &format!("/api/kernel/canons/{id}")).json(&json!({ "base_url": "http://cell.example" })).send().await.unwrap(),
            400, "VALIDATION_ERROR",
        ).await;
        assert_eq!(problem["errors"][0]["field"], "tls", "{problem}");
    }
}
