//! The front door: the service each event loop runs for every request of a
//! connection. Gateway calls go straight to the proxy, wrapped in the same edge
//! as everything else; every other request goes through the axum router.
//!
//! Why a door in front of the router: the gateway is the hot path of the whole
//! product, and axum's layers cost it more than any one thing the gateway does
//! (docs/performance.md): per request, a route match on the whole API, a boxed
//! middleware future, a boxed handler future, and each of them moving the
//! request and its future across a dozen nested polls. Here a gateway call is
//! one boxed future around the edge, a panic guard and the proxy.
//!
//! The liveness probe (`GET /api/health/live`) is answered here too, inside the
//! same edge: it is the one endpoint an orchestrator or a load balancer calls
//! on every instance every few seconds, and its answer never depends on
//! anything, so it need not pay for the router's match and layers (they were
//! about a tenth of its CPU, `perf`, docs/performance.md).
//!
//! With CORS configured the router serves both, so that its layer answers
//! preflights and adds its headers to their responses alike.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use futures_util::FutureExt;
use tower::Service;

use crate::gateway;
use crate::http::conn::ConnectionWatch;
use crate::http::edge;
use crate::state::{AppState, EventLoopLocal};

/// The gateway's path prefix; the router serves [`GATEWAY_CANON_ROUTE`] and
/// [`GATEWAY_PATH_ROUTE`], the door everything under the prefix.
const GATEWAY_PREFIX: &str = "/api/gateway/";
/// The liveness probe, answered by the door (see the module documentation).
const LIVE_PATH: &str = "/api/health/live";
/// The router's gateway route for a canon's root.
pub const GATEWAY_CANON_ROUTE: &str = "/api/gateway/{canon}";
/// The router's gateway route for a path under a canon.
pub const GATEWAY_PATH_ROUTE: &str = "/api/gateway/{canon}/{*path}";

/// What one event loop serves its connections with (see the module documentation).
#[derive(Clone)]
pub struct FrontDoor {
    shared: Arc<Shared>,
    /// The connection's peer, for `ConnectInfo` (the caller's address).
    remote: SocketAddr,
    /// Told of every request and when its response is ready (`http::conn`).
    watch: Arc<ConnectionWatch>,
}

struct Shared {
    router: Router,
    state: AppState,
    local: Arc<EventLoopLocal>,
    /// False when CORS is configured: the router's layer must see gateway calls.
    gateway_direct: bool,
}

/// Makes the [`FrontDoor`] of each accepted connection (`http::conn::serve`).
#[derive(Clone)]
pub struct FrontDoorMaker {
    shared: Arc<Shared>,
}

impl FrontDoorMaker {
    /// The doors of one event loop; `router` already carries `local` as an extension.
    pub fn new(router: Router, state: AppState, local: Arc<EventLoopLocal>) -> FrontDoorMaker {
        let gateway_direct = state.config_ref().server.cors_allowed_origins.is_empty();
        FrontDoorMaker {
            shared: Arc::new(Shared {
                router,
                state,
                local,
                gateway_direct,
            }),
        }
    }

    /// The door of the connection from `remote`.
    pub fn door(&self, remote: SocketAddr, watch: Arc<ConnectionWatch>) -> FrontDoor {
        FrontDoor {
            shared: self.shared.clone(),
            remote,
            watch,
        }
    }
}

type Served = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl Service<Request> for FrontDoor {
    type Response = Response;
    type Error = Infallible;
    type Future = Served;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request) -> Served {
        // Pending until the response is ready: the connection is not idle.
        let in_flight = self.watch.request_started();
        request.extensions_mut().insert(ConnectInfo(self.remote));
        let shared = self.shared.clone();
        let closing = closes_to_shed(&shared.local, &request);
        let path = request.uri().path();
        let direct = shared.gateway_direct && path.starts_with(GATEWAY_PREFIX);
        if !direct {
            if shared.gateway_direct
                && path == LIVE_PATH
                && request.method() == axum::http::Method::GET
            {
                return Box::pin(async move {
                    let _in_flight = in_flight;
                    let response = edge::around(&shared.state, request, LIVE_PATH, |_| async {
                        crate::health::routes::liveness()
                    })
                    .await;
                    Ok(if closing {
                        close_connection(response)
                    } else {
                        response
                    })
                });
            }
            // The router is always ready (axum's `Router::poll_ready`).
            let routed = shared.router.clone().call(request);
            return Box::pin(routed.map(move |response| {
                drop(in_flight);
                if closing {
                    response.map(close_connection)
                } else {
                    response
                }
            }));
        }
        Box::pin(async move {
            let _in_flight = in_flight;
            let Shared { state, local, .. } = &*shared;
            let label = gateway_route_label(request.uri().path());
            let response = edge::around(state, request, label, |request| {
                AssertUnwindSafe(gateway::proxy::forward(state, local, request))
                    .catch_unwind()
                    .map(|served| served.unwrap_or_else(edge::panic_to_problem))
            })
            .await;
            Ok(if closing {
                close_connection(response)
            } else {
                response
            })
        })
    }
}

/// Whether this request's response closes its connection because the dealer
/// asked this loop to shed one (`http::dealer`). HTTP/1.1 only: an HTTP/2
/// connection carries many clients' streams and has no `Connection` header.
fn closes_to_shed(local: &EventLoopLocal, request: &Request) -> bool {
    request.version() == axum::http::Version::HTTP_11 && local.shedding.take_one()
}

/// Marks a response as the connection's last: hyper closes it once sent, and
/// the client's next request reconnects, to a loop with room.
fn close_connection(mut response: Response) -> Response {
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

/// The router's pattern for a gateway path, so that metrics label the door's
/// calls as the router would.
fn gateway_route_label(path: &str) -> &'static str {
    let rest = &path[GATEWAY_PREFIX.len().min(path.len())..];
    if rest.contains('/') {
        GATEWAY_PATH_ROUTE
    } else {
        GATEWAY_CANON_ROUTE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Version;

    #[test]
    fn a_shedding_loop_closes_http1_connections_as_asked() {
        let local = EventLoopLocal {
            upstream: gateway::client::build(&crate::config::Config::defaults().gateway),
            auth: crate::authz::cache::LoopAuthCache::default(),
            shedding: crate::http::dealer::Shedding::default(),
        };
        let request = |version| {
            Request::builder()
                .version(version)
                .uri("/api/gateway/bench/ping")
                .body(axum::body::Body::empty())
                .unwrap()
        };
        assert!(
            !closes_to_shed(&local, &request(Version::HTTP_11)),
            "not asked"
        );
        local.shedding.ask(1);
        assert!(
            !closes_to_shed(&local, &request(Version::HTTP_2)),
            "an HTTP/2 connection is not closed, and does not count"
        );
        assert!(closes_to_shed(&local, &request(Version::HTTP_11)));
        assert!(
            !closes_to_shed(&local, &request(Version::HTTP_11)),
            "one asked, one closed"
        );
        let closed = close_connection(Response::new(axum::body::Body::empty()));
        assert_eq!(closed.headers()[axum::http::header::CONNECTION], "close");
    }

    #[test]
    fn gateway_calls_are_labelled_by_the_routers_patterns() {
        assert_eq!(
            gateway_route_label("/api/gateway/bench/ping"),
            "/api/gateway/{canon}/{*path}"
        );
        assert_eq!(
            gateway_route_label("/api/gateway/bench"),
            "/api/gateway/{canon}"
        );
        assert_eq!(gateway_route_label("/api/gateway/"), "/api/gateway/{canon}");
    }
}
