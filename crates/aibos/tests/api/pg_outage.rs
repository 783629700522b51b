//! PostgreSQL going away and coming back, on a throwaway cluster of the test's own.

use std::time::{Duration, Instant};

use aibos_testkit::cluster::Cluster;
use aibos_testkit::{Engine, KernelOptions, spawn_kernel_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_503_within_two_seconds_of_an_outage_and_200_again_after_it() {
    if Cluster::binaries().is_none() {
        assert!(
            std::env::var("AIBOS_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "AIBOS_REQUIRE_POSTGRES=1 but PostgreSQL's server binaries are missing"
        );
        eprintln!("skipped: PostgreSQL server binaries are not installed");
        return;
    }
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .unwrap()
        .expect("a throwaway cluster starts");
    let options = KernelOptions {
        database_url: Some(cluster.url()),
        ..Default::default()
    };
    let kernel = spawn_kernel_with(Engine::Sqlite, options).await.unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let health = kernel.url("/api/health");

    let response = client.get(&health).send().await.unwrap();
    assert_eq!(response.status(), 200);

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop_server().expect("stop the cluster");
        cluster
    })
    .await
    .unwrap();

    let started = Instant::now();
    let response = client.get(&health).send().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 503);
    assert!(
        elapsed < Duration::from_secs(2),
        "503 came after {elapsed:?}"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["database"]["status"], "down");
    assert!(
        !body.to_string().contains("127.0.0.1"),
        "no connection details leak: {body}"
    );
    let live = client
        .get(kernel.url("/api/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        live.status(),
        200,
        "liveness does not depend on the database"
    );

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.start_server().expect("restart the cluster");
        cluster
    })
    .await
    .unwrap();

    // Readiness poll, bounded: the pool reconnects on its own, no kernel restart.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = client.get(&health).send().await.unwrap().status();
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "health did not recover; last status {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(kernel);
    drop(cluster);
}
