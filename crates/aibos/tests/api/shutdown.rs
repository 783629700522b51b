//! Graceful shutdown: in-flight requests finish, new ones are refused.

use std::sync::Arc;
use std::time::Duration;

use aibos_testkit::axum_free::Router;
use aibos_testkit::{Engine, KernelOptions, spawn_kernel_with};
use tokio::sync::{Notify, oneshot};

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() {
    let entered = Arc::new(Notify::new());
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let release_rx = Arc::new(tokio::sync::Mutex::new(Some(release_rx)));
    let routes: Router = Router::new().route(
        "/api/test/slow",
        axum::routing::get({
            let entered = entered.clone();
            move || async move {
                entered.notify_one();
                if let Some(rx) = release_rx.lock().await.take() {
                    let _ = rx.await;
                }
                "done"
            }
        }),
    );
    let mut kernel = spawn_kernel_with(
        Engine::Sqlite,
        KernelOptions {
            extra_routes: Some(routes),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let client = kernel.client.clone();
    let url = kernel.url("/api/test/slow");
    let slow = tokio::spawn(async move { client.get(url).send().await });

    entered.notified().await;
    kernel.begin_shutdown();
    let server = kernel.take_server().unwrap();
    // Shutdown has begun while the request is inside its handler; let it finish.
    tokio::task::yield_now().await;
    assert!(
        !server.is_finished(),
        "the server waits for the in-flight request"
    );
    release_tx.send(()).unwrap();

    let response = slow
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "done");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops")
        .unwrap()
        .expect("cleanly");
    assert!(
        kernel
            .client
            .get(kernel.url("/api/health/live"))
            .send()
            .await
            .is_err(),
        "new connections are refused"
    );
}
