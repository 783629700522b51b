//! Serving one event loop's connections, with the three defences against
//! clients that hold connections without using them:
//!
//! - **header-read timeout** (`server.header_read_timeout_seconds`): a new
//!   connection whose first request's head has not arrived in time is closed,
//!   whether it sent nothing or drips its headers (slowloris).
//! - **keep-alive idle timeout** (`server.keep_alive_idle_seconds`): a
//!   connection on which nothing happens for that long (no request's response
//!   pending, no request head completed, no byte written to the client) is
//!   closed. A request in flight, however slow its cell, or a response body
//!   still streaming, keeps it open; a later request whose head drips in (reads
//!   alone do not count) or a client that stops reading its response (its
//!   writes stall) does not. HTTP/1.1 and HTTP/2 alike.
//! - **pending connections per client address**
//!   (`server.max_pending_connections_per_address`): the acceptor counts, per
//!   client address (an IPv6 /64, what one client can easily hold), the
//!   connections that have not sent their first request's head yet, and closes
//!   a new one beyond the cap at once. This is the per-address connection
//!   limit careful proxies put in front of a slow-headers attack (nginx's
//!   `limit_conn` keyed by `$binary_remote_addr`, HAProxy's `src_conn_cur` in
//!   a stick table), here applied only to connections that have not proved
//!   they speak HTTP: a global cap would let one client lock everyone out,
//!   and counting established connections would penalise clients behind one
//!   NAT or balancer for their ordinary keep-alive connections.
//!
//! The two timeouts are checked by timers of the connection's own (see
//! [`ConnectionWatch`]: counters the front door and the socket bump), not per
//! request: hyper's HTTP/1.1 header-read timer is armed and cancelled around
//! every request, about 2 % of a gateway call's instructions; and they are
//! polled only when they fire (`Alarm`), not at every wake-up of the
//! connection.
//!
//! Graceful shutdown is axum's: stop accepting, ask every connection to close
//! after its current exchange, wait for them.

use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::http::dealer::DealtConnections;
use crate::http::front::FrontDoorMaker;
use crate::limits;

/// What happens on one connection, for its watchdog: kept by the front door
/// (requests) and the socket (writes), read by the connection's own task.
pub struct ConnectionWatch {
    pending: PendingSlot,
    /// Request heads completed.
    requests: AtomicU64,
    /// Requests whose response has not been produced yet.
    in_flight: AtomicU32,
    /// Writes to the client that moved bytes; only the socket writes it.
    written: AtomicU64,
}

impl ConnectionWatch {
    /// The watch of a connection holding `pending`.
    pub fn new(pending: PendingSlot) -> ConnectionWatch {
        ConnectionWatch {
            pending,
            requests: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            written: AtomicU64::new(0),
        }
    }

    /// A request head arrived; its response is pending until the guard drops.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.pending.first_request_arrived();
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Bytes were written to the client. One writer (the socket), so a plain
    /// load and store: no locked instruction per write.
    pub fn wrote(&self) {
        let n = self.written.load(Ordering::Relaxed);
        self.written.store(n.wrapping_add(1), Ordering::Relaxed);
    }

    /// Requests started and writes, to compare between two checks.
    fn activity(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.written.load(Ordering::Relaxed),
        )
    }

    fn responding(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }
}

/// A request whose response is pending ([`ConnectionWatch::request_started`]).
pub struct InFlight(Arc<ConnectionWatch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection timeouts, read from the configuration at start.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionTimeouts {
    /// Until the first request's head is complete.
    pub header_read: Duration,
    /// With nothing happening (see the module documentation).
    pub keep_alive_idle: Duration,
}

impl ConnectionTimeouts {
    /// How often a connection is checked for idleness: the idle timeout in
    /// [`limits::KEEP_ALIVE_IDLE_CHECKS`] parts (never under 100 ms).
    fn idle_check_period(&self) -> Duration {
        (self.keep_alive_idle / limits::KEEP_ALIVE_IDLE_CHECKS).max(Duration::from_millis(100))
    }

    /// From `[server]`.
    pub fn from_config(server: &crate::config::ServerConfig) -> ConnectionTimeouts {
        ConnectionTimeouts {
            header_read: Duration::from_secs(server.header_read_timeout_seconds),
            keep_alive_idle: Duration::from_secs(server.keep_alive_idle_seconds),
        }
    }
}

/// Connections awaiting their first request's head, counted per client
/// address in [`limits::PENDING_ADDRESS_BUCKETS`] counters (addresses are
/// hashed with a per-process random key, so no client can aim at another's
/// counter; two addresses share one rarely, and then share its cap).
pub struct PendingByAddress {
    buckets: Box<[AtomicU32]>,
    key: std::collections::hash_map::RandomState,
    cap: u32,
}

impl PendingByAddress {
    /// At most `cap` pending connections per address.
    pub fn new(cap: u64) -> Arc<PendingByAddress> {
        Arc::new(PendingByAddress {
            buckets: (0..limits::PENDING_ADDRESS_BUCKETS)
                .map(|_| AtomicU32::new(0))
                .collect(),
            key: std::collections::hash_map::RandomState::new(),
            cap: u32::try_from(cap).unwrap_or(u32::MAX),
        })
    }

    /// A slot for a new connection from `address`, or `None` when that
    /// address already holds its cap of pending connections.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Option<PendingSlot> {
        let bucket = self.bucket(address);
        self.buckets[bucket]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.cap).then_some(n + 1)
            })
            .ok()?;
        Some(PendingSlot {
            table: Arc::clone(self),
            bucket,
            released: AtomicBool::new(false),
        })
    }

    /// The counter of `address`: IPv4 by address, IPv6 by its /64 (one host
    /// usually holds a whole /64, and could otherwise take 2^64 caps), as
    /// login throttling counts them.
    fn bucket(&self, address: IpAddr) -> usize {
        let mut hasher = self.key.build_hasher();
        crate::authz::caller::address_key(address).hash(&mut hasher);
        let hash = std::hash::Hasher::finish(&hasher);
        usize::try_from(hash % limits::PENDING_ADDRESS_BUCKETS as u64).unwrap_or(0)
    }

    #[cfg(test)]
    fn count(&self, address: IpAddr) -> u32 {
        self.buckets[self.bucket(address)].load(Ordering::Acquire)
    }
}

/// One connection's place among its address's pending connections, given
/// back when its first request's head arrives or when it closes.
pub struct PendingSlot {
    table: Arc<PendingByAddress>,
    bucket: usize,
    released: AtomicBool,
}

impl PendingSlot {
    /// The first request's head arrived (the front door calls this on every
    /// request: after the first, one relaxed load).
    pub fn first_request_arrived(&self) {
        if !self.released.load(Ordering::Relaxed) && !self.released.swap(true, Ordering::AcqRel) {
            self.table.buckets[self.bucket].fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether a request's head has arrived on this connection.
    fn has_first_request(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.first_request_arrived();
    }
}

/// What woke a connection's task.
enum Event {
    Ended(Result<(), Box<dyn std::error::Error + Send + Sync>>),
    FirstHeadDue,
    CheckDue,
    Stop,
}

/// The waker a connection's timers and stop signal are polled with: it notes
/// that one of them fired, then wakes the connection's task. Polling them at
/// every wake-up of the connection (several per request), as `select!` does,
/// cost ~600 instructions per gateway call (callgrind: each `Sleep` re-registers
/// its waker); now a wake-up costs a pointer comparison and a flag.
struct Alarm {
    shared: Arc<AlarmShared>,
    waker: Waker,
}

struct AlarmShared {
    fired: AtomicBool,
    /// Kept, not taken, by a wake (unlike an `AtomicWaker`), so that it is
    /// registered only when the task's waker changes; locked only then and
    /// when a timer fires, a few times a minute.
    task: std::sync::Mutex<Option<Waker>>,
}

impl Wake for AlarmShared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        if let Some(task) = &*self.task.lock().unwrap_or_else(|p| p.into_inner()) {
            task.wake_by_ref();
        }
    }
}

impl Alarm {
    /// Rung at first, so that the timers are polled (and registered) once.
    fn new() -> Alarm {
        let shared = Arc::new(AlarmShared {
            fired: AtomicBool::new(true),
            task: std::sync::Mutex::new(None),
        });
        Alarm {
            waker: Waker::from(Arc::clone(&shared)),
            shared,
        }
    }

    /// Makes sure a firing wakes the task polling with `cx`; `registered` is
    /// the waker registered last, so the same one is not registered again.
    fn follow(&self, registered: &mut Option<Waker>, cx: &Context<'_>) {
        if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *self.shared.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
            *registered = Some(cx.waker().clone());
        }
    }

    /// Whether something fired since the last call (and forgets it).
    fn take(&self) -> bool {
        if self.shared.fired.load(Ordering::Acquire) {
            self.shared.fired.store(false, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Marks it fired: the timers are polled at the next wake-up.
    fn ring(&self) {
        self.shared.fired.store(true, Ordering::Relaxed);
    }

    /// The context to poll the timers with.
    fn context(&self) -> Context<'_> {
        Context::from_waker(&self.waker)
    }
}

/// Serves the connections dealt to this loop until `stop`, then waits for them
/// to finish their current exchange.
pub async fn serve(
    mut connections: DealtConnections,
    doors: FrontDoorMaker,
    timeouts: ConnectionTimeouts,
    stop: CancellationToken,
) -> std::io::Result<()> {
    // Every connection task holds a receiver; `closed` completes with the last.
    let (all_closed, open) = tokio::sync::watch::channel(());
    loop {
        let (io, remote) = tokio::select! {
            accepted = axum::serve::Listener::accept(&mut connections) => accepted,
            () = stop.cancelled() => break,
        };
        let watch = io.watch();
        let door = doors.door(remote, Arc::clone(&watch));
        let stop = stop.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let service = TowerToHyperService::new(
                door.map_request(|request: Request<Incoming>| request.map(Body::new)),
            );
            let mut builder = Builder::new(TokioExecutor::new());
            builder.http2().enable_connect_protocol();
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let mut connection = pin!(connection);
            // Dropping the connection (breaking out) closes the socket.
            let mut first_head = pin!(tokio::time::sleep(timeouts.header_read));
            let check_every = timeouts.idle_check_period();
            let mut check = pin!(tokio::time::sleep(check_every));
            let mut stopped = pin!(stop.cancelled());
            let alarm = Alarm::new();
            let mut registered = None;
            let mut last_activity = watch.activity();
            let mut quiet_checks = 0;
            let (mut awaiting_first, mut stopping) = (true, false);
            loop {
                // The connection is polled at every wake-up; the timers and the
                // stop signal only when one of them woke the task (see `Alarm`).
                let event = std::future::poll_fn(|cx| {
                    alarm.follow(&mut registered, cx);
                    if let Poll::Ready(served) = connection.as_mut().poll(cx) {
                        return Poll::Ready(Event::Ended(served));
                    }
                    if !alarm.take() {
                        return Poll::Pending;
                    }
                    let mut cx = alarm.context();
                    if awaiting_first && first_head.as_mut().poll(&mut cx).is_ready() {
                        return Poll::Ready(Event::FirstHeadDue);
                    }
                    if check.as_mut().poll(&mut cx).is_ready() {
                        return Poll::Ready(Event::CheckDue);
                    }
                    if !stopping && stopped.as_mut().poll(&mut cx).is_ready() {
                        return Poll::Ready(Event::Stop);
                    }
                    Poll::Pending
                })
                .await;
                // Whatever fired, the others are looked at again next time.
                alarm.ring();
                match event {
                    Event::Ended(served) => {
                        if let Err(e) = served {
                            tracing::trace!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    Event::FirstHeadDue => {
                        awaiting_first = false;
                        if !watch.pending.has_first_request() {
                            tracing::debug!(client = %remote, "closed a connection that sent no request head in time");
                            break;
                        }
                    }
                    Event::CheckDue => {
                        check
                            .as_mut()
                            .reset(tokio::time::Instant::now() + check_every);
                        let activity = watch.activity();
                        if watch.responding() || activity != last_activity {
                            quiet_checks = 0;
                        } else {
                            quiet_checks += 1;
                        }
                        last_activity = activity;
                        if quiet_checks >= limits::KEEP_ALIVE_IDLE_CHECKS {
                            tracing::debug!(client = %remote, "closed an idle connection");
                            break;
                        }
                    }
                    Event::Stop => {
                        stopping = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(open);
        });
    }
    drop(open);
    all_closed.closed().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_connections_are_capped_per_address_and_given_back() {
        let table = PendingByAddress::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = table.admit(a).expect("1 of 2");
        let second = table.admit(a).expect("2 of 2");
        assert!(table.admit(a).is_none(), "a third is refused");
        if table.bucket(a) != table.bucket(b) {
            assert!(table.admit(b).is_some(), "another address has its own cap");
        }
        first.first_request_arrived();
        first.first_request_arrived();
        assert!(first.has_first_request());
        assert_eq!(table.count(a), 1, "given back once, however often called");
        let third = table.admit(a).expect("room again");
        drop(first);
        assert_eq!(
            table.count(a),
            2,
            "a started connection's drop gives back nothing more"
        );
        drop(second);
        drop(third);
        assert_eq!(table.count(a), 0, "closing gives a pending slot back");
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64() {
        let table = PendingByAddress::new(1);
        let _held = table.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(
            table
                .admit("2001:db8:1:2:ffff::9".parse().unwrap())
                .is_none()
        );
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let _v4 = table.admit("192.0.2.7".parse().unwrap()).unwrap();
        assert!(
            table.admit(mapped).is_none(),
            "an IPv4-mapped address is its IPv4 address"
        );
    }
}
