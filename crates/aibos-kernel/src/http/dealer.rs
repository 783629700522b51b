//! One listening socket whose connections are dealt to the event loops: packed
//! onto the first loop with room, and spread when a loop is saturated while
//! another has room.
//!
//! Why pack rather than deal evenly (docs/performance.md, gateway): while the
//! load fits on one loop, two half-busy loops sleep and wake each other's
//! peers far more often than one busy loop does; an even split of 64
//! connections on 2 shared cores cost 25 µs of CPU per gateway call instead of
//! 20 µs. nginx gets the same effect by accident: the worker first in the wait
//! queue takes nearly every connection. Why not one `SO_REUSEPORT` socket per
//! loop: the kernel then picks the loop by a hash of the client's address,
//! blind to how busy the loops are.
//!
//! Why spread whatever else the machine runs: an earlier dealer spread only
//! while the host had idle cores (from `/proc/stat`), to spare a second loop
//! competing with the clients and cells for a core. That held the kernel on
//! one core exactly when the host was loaded: with the benchmark's client and
//! cell on the same 2 cores one loop ran 97 % busy beside an idle one, while
//! nginx used both workers, and the ratio to nginx fell from 0.78× to 0.50× as
//! the host's steal rose (issue 21). The loops the kernel was given (one per
//! core it may use, `server.event_loops`) are its to use; the scheduler shares
//! the cores between them and the other processes, as it does nginx's workers.
//!
//! How: every [`limits::EVENT_LOOP_SAMPLE_MS`] the dealer reads how busy each
//! loop's runtime was (Tokio's busy time). A new connection goes to the first
//! loop (in order) that is not full ([`limits::EVENT_LOOP_FULL_PERCENT`] busy,
//! and holding connections); when all are full, to the least busy. Keep-alive
//! connections dealt in a burst would stay on the first loop for good, so a
//! saturated loop ([`limits::EVENT_LOOP_SATURATED_PERCENT`]), while another
//! loop has room, is asked to close a few of its connections after their
//! current response (`Connection: close`, see [`Shedding`]) once that has held
//! for a second; their clients reconnect and are dealt to the loop with room.
//! The gap between "full" and "saturated" keeps the two rules from undoing
//! each other. A connection lives on one loop from accept to close (one
//! channel message per connection, none per request).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::RuntimeMetrics;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::http::conn::{ConnectionWatch, PendingByAddress, PendingSlot};
use crate::limits;

/// A connection on its way from the acceptor to its event loop.
type HandedOver = (std::net::TcpStream, SocketAddr, LiveCount, PendingSlot);

/// Accepts on the listening socket and deals the connections out.
pub struct Dealer {
    listener: std::net::TcpListener,
    loops: Vec<LoopSeat>,
    /// Connections still awaiting their first request, per client address.
    pending: Arc<PendingByAddress>,
}

/// The dealer's side of one event loop.
struct LoopSeat {
    handover: mpsc::Sender<HandedOver>,
    live: Arc<AtomicUsize>,
    shedding: Shedding,
    load: LoopLoad,
    /// Consecutive samples in which this loop should have shed.
    shed_streak: u32,
}

/// An event loop's side: what `axum::serve` accepts from.
pub struct DealtConnections {
    handover: mpsc::Receiver<HandedOver>,
    local_addr: SocketAddr,
    shedding: Shedding,
}

/// How many of its connections an event loop is asked to close, each after its
/// current response, so that their clients reconnect to a loop with room. Set
/// by the dealer at each sample; taken by the loop's front door.
#[derive(Clone, Default)]
pub struct Shedding(Arc<AtomicUsize>);

impl Shedding {
    /// True when this response should close its connection (and counts it).
    /// One relaxed load per response when nothing is asked.
    pub fn take_one(&self) -> bool {
        if self.0.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Asks for `connections` closes, replacing what was asked before.
    pub(crate) fn ask(&self, connections: usize) {
        self.0.store(connections, Ordering::Relaxed);
    }
}

/// How busy one event loop's runtime was over the last sample.
struct LoopLoad {
    metrics: RuntimeMetrics,
    busy_until_now: Duration,
    busy_percent: u32,
}

impl LoopLoad {
    fn sample(&mut self, elapsed: Duration) {
        // A current-thread runtime has one worker: index 0.
        let busy = self.metrics.worker_total_busy_duration(0);
        let added = busy.saturating_sub(self.busy_until_now);
        self.busy_until_now = busy;
        self.busy_percent = busy_percent(added, elapsed);
    }
}

fn busy_percent(busy: Duration, elapsed: Duration) -> u32 {
    if elapsed.is_zero() {
        return 0;
    }
    let percent = busy.as_secs_f64() / elapsed.as_secs_f64() * 100.0;
    // Bounded: the busy time may include a slice of the previous sample.
    percent.clamp(0.0, 100.0) as u32
}

/// The dealer and one [`DealtConnections`] per event loop, each loop given by
/// its runtime's metrics.
pub fn deal(
    listener: std::net::TcpListener,
    loop_runtimes: Vec<RuntimeMetrics>,
    pending: Arc<PendingByAddress>,
) -> io::Result<(Dealer, Vec<DealtConnections>)> {
    if loop_runtimes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "at least one event loop is needed",
        ));
    }
    let local_addr = listener.local_addr()?;
    let (loops, receivers) = loop_runtimes
        .into_iter()
        .map(|metrics| {
            let (handover, receiver) = mpsc::channel(limits::CONNECTION_HANDOVER_QUEUE);
            let shedding = Shedding::default();
            let seat = LoopSeat {
                handover,
                live: Arc::new(AtomicUsize::new(0)),
                shedding: shedding.clone(),
                shed_streak: 0,
                load: LoopLoad {
                    busy_until_now: metrics.worker_total_busy_duration(0),
                    metrics,
                    busy_percent: 0,
                },
            };
            let connections = DealtConnections {
                handover: receiver,
                local_addr,
                shedding,
            };
            (seat, connections)
        })
        .unzip();
    let dealer = Dealer {
        listener,
        loops,
        pending,
    };
    Ok((dealer, receivers))
}

impl Dealer {
    /// Accepts until `stop`. Must run inside a Tokio runtime (not an event loop's:
    /// a loop busy with its own connections would accept late).
    pub async fn run(mut self, stop: CancellationToken) -> io::Result<()> {
        let mut listener = TcpListener::from_std(self.listener)?;
        let mut sampling =
            tokio::time::interval(Duration::from_millis(limits::EVENT_LOOP_SAMPLE_MS));
        sampling.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sampled_at = Instant::now();
        loop {
            let (stream, remote) = tokio::select! {
                // axum's accept retries what can be retried (and waits out EMFILE).
                accepted = axum::serve::Listener::accept(&mut listener) => accepted,
                _ = sampling.tick() => {
                    let now = Instant::now();
                    sample(&mut self.loops, now - sampled_at);
                    sampled_at = now;
                    continue;
                }
                () = stop.cancelled() => return Ok(()),
            };
            // A client already holding its cap of connections that have not
            // sent a request is not given another (`http::conn`): closed now.
            let Some(slot) = self.pending.admit(remote.ip()) else {
                tracing::debug!(client = %remote, "refused a connection: too many from this address without a request");
                continue;
            };
            // Leaves this runtime's reactor; the event loop registers it with its own.
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "could not hand over an accepted connection");
                    continue;
                }
            };
            let mut handed_over = (stream, remote, slot);
            loop {
                // A loop that has ended (its server failed, or the server is
                // stopping) takes no more; the others still do.
                let Some(index) = choose_loop(&views(&self.loops)) else {
                    return Ok(());
                };
                let seat = &self.loops[index];
                let live = LiveCount::new(&seat.live);
                // A full queue (its loop is not accepting) holds the acceptor
                // back; the listening socket's backlog holds new clients meanwhile.
                let (stream, remote, slot) = handed_over;
                match seat.handover.send((stream, remote, live, slot)).await {
                    Ok(()) => break,
                    Err(mpsc::error::SendError((stream, remote, _live, slot))) => {
                        handed_over = (stream, remote, slot);
                    }
                }
            }
        }
    }
}

/// Measures the loops, and asks saturated loops to shed.
fn sample(loops: &mut [LoopSeat], elapsed: Duration) {
    for seat in loops.iter_mut() {
        seat.load.sample(elapsed);
    }
    let views = views(loops);
    for (seat, wanted) in loops.iter_mut().zip(connections_to_shed(&views)) {
        if let Some(connections) = shed_request(&mut seat.shed_streak, wanted) {
            seat.shedding.ask(connections);
        }
    }
}

/// What to ask of a loop at this sample, given the `wanted` closes: `Some(0)`
/// (stop) as soon as it should no longer shed; `Some(wanted)` once it should
/// have shed for [`limits::EVENT_LOOP_SHED_AFTER_SAMPLES`] samples in a row,
/// after which the count starts over, so that the next step is decided on a
/// window of idle time measured after this one took effect (no overshoot);
/// `None` (leave what was asked) in between.
fn shed_request(streak: &mut u32, wanted: usize) -> Option<usize> {
    if wanted == 0 {
        *streak = 0;
        return Some(0);
    }
    *streak += 1;
    if *streak >= limits::EVENT_LOOP_SHED_AFTER_SAMPLES {
        *streak = 0;
        Some(wanted)
    } else {
        None
    }
}

/// What the dealing rules look at for one loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LoopView {
    open: bool,
    live: usize,
    busy_percent: u32,
}

impl LoopView {
    fn has_room(&self) -> bool {
        self.open && (self.live == 0 || self.busy_percent < limits::EVENT_LOOP_FULL_PERCENT)
    }
}

fn views(loops: &[LoopSeat]) -> Vec<LoopView> {
    loops
        .iter()
        .map(|seat| LoopView {
            open: !seat.handover.is_closed(),
            live: seat.live.load(Ordering::Relaxed),
            busy_percent: seat.load.busy_percent,
        })
        .collect()
}

/// The loop for a new connection: the first with room, else the least busy
/// (then the one with the fewest connections); `None` when every loop has ended.
fn choose_loop(loops: &[LoopView]) -> Option<usize> {
    if let Some(first) = loops.iter().position(LoopView::has_room) {
        return Some(first);
    }
    loops
        .iter()
        .enumerate()
        .filter(|(_, view)| view.open)
        .min_by_key(|(_, view)| (view.busy_percent, view.live))
        .map(|(index, _)| index)
}

/// How many connections each loop should close at its next step (see
/// [`shed_request`]): while some loop has room, from each saturated loop
/// holding more than one connection, `1/EVENT_LOOP_SHED_FRACTION` of them (at
/// least one). Whatever else the machine runs: a loop the kernel was given is
/// the kernel's to use (below).
fn connections_to_shed(loops: &[LoopView]) -> Vec<usize> {
    let spreading = loops.iter().any(LoopView::has_room);
    loops
        .iter()
        .map(|view| {
            let saturated = view.open
                && view.live > 1
                && view.busy_percent >= limits::EVENT_LOOP_SATURATED_PERCENT;
            if spreading && saturated {
                (view.live / limits::EVENT_LOOP_SHED_FRACTION).max(1)
            } else {
                0
            }
        })
        .collect()
}

impl DealtConnections {
    /// This loop's [`Shedding`], for its front door.
    pub fn shedding(&self) -> Shedding {
        self.shedding.clone()
    }
}

impl axum::serve::Listener for DealtConnections {
    type Io = LiveConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (LiveConnection, SocketAddr) {
        loop {
            let Some((stream, remote, live, slot)) = self.handover.recv().await else {
                // The dealer stopped: so does the server, by its shutdown signal.
                return std::future::pending().await;
            };
            match TcpStream::from_std(stream) {
                Ok(stream) => {
                    return (
                        LiveConnection {
                            stream,
                            _live: live,
                            watch: Arc::new(ConnectionWatch::new(slot)),
                        },
                        remote,
                    );
                }
                Err(e) => tracing::warn!(error = %e, "could not take over an accepted connection"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}

/// One connection counted among its loop's live ones until dropped.
struct LiveCount(Arc<AtomicUsize>);

impl LiveCount {
    fn new(live: &Arc<AtomicUsize>) -> LiveCount {
        live.fetch_add(1, Ordering::Relaxed);
        LiveCount(Arc::clone(live))
    }
}

impl Drop for LiveCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A served connection: the socket, counted while it is open, and watched
/// (`http::conn`: its first request, its idleness; it counts its writes).
pub struct LiveConnection {
    stream: TcpStream,
    _live: LiveCount,
    watch: Arc<ConnectionWatch>,
}

impl LiveConnection {
    /// What its watchdog and front door share.
    pub fn watch(&self) -> Arc<ConnectionWatch> {
        Arc::clone(&self.watch)
    }
}

impl AsyncRead for LiveConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LiveConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(1..)) = written {
            self.watch.wrote();
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(1..)) = written {
            self.watch.wrote();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener as _;
    use tokio::task::JoinHandle;

    const WAIT: Duration = Duration::from_secs(5);

    fn view(live: usize, busy_percent: u32) -> LoopView {
        LoopView {
            open: true,
            live,
            busy_percent,
        }
    }

    #[test]
    fn connections_go_to_the_first_loop_with_room() {
        assert_eq!(choose_loop(&[view(0, 0), view(0, 0)]), Some(0), "packed");
        assert_eq!(choose_loop(&[view(40, 74), view(0, 0)]), Some(0));
        assert_eq!(choose_loop(&[view(40, 75), view(3, 10)]), Some(1), "full");
        // Busy without connections (its last ones just closed): room again.
        assert_eq!(choose_loop(&[view(0, 95), view(3, 10)]), Some(0));
        let ended = LoopView {
            open: false,
            ..view(0, 0)
        };
        assert_eq!(choose_loop(&[ended, view(9, 99), view(9, 80)]), Some(2));
        // All full: the least busy, then the one with the fewest connections.
        assert_eq!(choose_loop(&[view(9, 99), view(9, 80)]), Some(1));
        assert_eq!(choose_loop(&[view(9, 90), view(4, 90)]), Some(1));
        assert_eq!(choose_loop(&[ended, ended]), None);
    }

    #[test]
    fn a_saturated_loop_sheds_while_a_loop_has_room() {
        assert_eq!(connections_to_shed(&[view(64, 97), view(0, 0)]), [4, 0]);
        assert_eq!(
            connections_to_shed(&[view(64, 97), view(30, 95)]),
            [0, 0],
            "no loop has room"
        );
        assert_eq!(
            connections_to_shed(&[view(1, 100), view(0, 0)]),
            [0, 0],
            "one connection busy on its own stays"
        );
        assert_eq!(connections_to_shed(&[view(5, 90), view(2, 30)]), [1, 0]);
        assert_eq!(
            connections_to_shed(&[view(40, 89), view(0, 0)]),
            [0, 0],
            "full but not saturated: new connections go elsewhere, none is closed"
        );
    }

    #[test]
    fn shedding_waits_for_a_streak_of_samples() {
        let mut streak = 0;
        for _ in 0..2 {
            for _ in 1..limits::EVENT_LOOP_SHED_AFTER_SAMPLES {
                assert_eq!(shed_request(&mut streak, 4), None, "what was asked stays");
            }
            assert_eq!(shed_request(&mut streak, 4), Some(4), "then waits again");
        }
        assert_eq!(shed_request(&mut streak, 4), None);
        assert_eq!(shed_request(&mut streak, 0), Some(0), "stops at once");
        for _ in 1..limits::EVENT_LOOP_SHED_AFTER_SAMPLES {
            assert_eq!(shed_request(&mut streak, 4), None, "a break starts over");
        }
        assert_eq!(shed_request(&mut streak, 4), Some(4));
    }

    #[test]
    fn shedding_counts_down_what_was_asked() {
        let shedding = Shedding::default();
        assert!(!shedding.take_one());
        shedding.ask(2);
        assert!(shedding.take_one() && shedding.take_one());
        assert!(!shedding.take_one());
        shedding.ask(5);
        shedding.ask(0);
        assert!(
            !shedding.take_one(),
            "each sample replaces the last request"
        );
    }

    #[test]
    fn busy_time_is_a_bounded_share_of_the_sample() {
        let ms = Duration::from_millis;
        assert_eq!(busy_percent(ms(50), ms(100)), 50);
        assert_eq!(busy_percent(ms(130), ms(100)), 100);
        assert_eq!(busy_percent(ms(5), Duration::ZERO), 0);
    }

    /// Metrics of idle loops: runtimes that never run (dropped on a thread of
    /// their own; their metrics stay readable).
    fn idle_loops(n: usize) -> Vec<RuntimeMetrics> {
        std::thread::spawn(move || {
            (0..n)
                .map(|_| {
                    tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap()
                        .metrics()
                })
                .collect()
        })
        .join()
        .unwrap()
    }

    fn listener() -> (std::net::TcpListener, SocketAddr) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    #[tokio::test]
    async fn idle_loops_get_every_connection_on_the_first_counted_while_open() {
        let (listener, addr) = listener();
        let (dealer, mut loops) =
            deal(listener, idle_loops(2), PendingByAddress::new(1_000)).unwrap();
        let seats: Vec<_> = dealer.loops.iter().map(|s| Arc::clone(&s.live)).collect();
        let stop = CancellationToken::new();
        let acceptor = tokio::spawn(dealer.run(stop.clone()));
        let counts = || {
            seats
                .iter()
                .map(|s| s.load(Ordering::Relaxed))
                .collect::<Vec<_>>()
        };

        let mut clients = Vec::new();
        let mut served = Vec::new();
        for _ in 0..4 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let accepted = tokio::time::timeout(WAIT, loops[0].accept()).await;
            served.push(accepted.expect("the first loop has room").0);
        }
        assert_eq!(counts(), [4, 0]);
        served.truncate(1);
        assert_eq!(counts(), [1, 0], "closed connections are no longer counted");

        stop.cancel();
        acceptor.await.unwrap().unwrap();
        assert_eq!(loops[1].local_addr().unwrap(), addr);
    }

    #[tokio::test]
    async fn a_loop_that_has_ended_is_skipped() {
        let (listener, addr) = listener();
        let (dealer, mut loops) =
            deal(listener, idle_loops(2), PendingByAddress::new(1_000)).unwrap();
        let acceptor = tokio::spawn(dealer.run(CancellationToken::new()));
        let mut survivor = loops.pop().unwrap();
        drop(loops);

        let mut clients = Vec::new();
        let mut served = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let accepted = tokio::time::timeout(WAIT, survivor.accept()).await;
            served.push(
                accepted
                    .expect("the remaining loop is dealt every connection")
                    .0,
            );
        }
        assert!(!acceptor.is_finished(), "the dealer keeps accepting");

        // With no loop left, the dealer ends at the next connection.
        drop(survivor);
        clients.push(TcpStream::connect(addr).await.unwrap());
        tokio::time::timeout(WAIT, acceptor)
            .await
            .expect("the dealer ends when no loop is left")
            .unwrap()
            .unwrap();
    }

    /// Two event loops serving on threads of their own, reporting each
    /// connection they are dealt (and keeping it open) on `dealt`.
    struct RunningLoops {
        addr: SocketAddr,
        handles: Vec<tokio::runtime::Handle>,
        sheddings: Vec<Shedding>,
        dealt: mpsc::UnboundedReceiver<(usize, LiveConnection)>,
        stop: CancellationToken,
        acceptor: JoinHandle<io::Result<()>>,
        threads: Vec<std::thread::JoinHandle<()>>,
    }

    fn run_two_loops() -> RunningLoops {
        let (listener, addr) = listener();
        let runtimes: Vec<_> = (0..2)
            .map(|_| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
            })
            .collect();
        let handles = runtimes.iter().map(|r| r.handle().clone()).collect();
        let (dealer, loops) = deal(
            listener,
            runtimes.iter().map(|r| r.metrics()).collect(),
            PendingByAddress::new(1_000),
        )
        .unwrap();
        let sheddings = loops.iter().map(DealtConnections::shedding).collect();
        let (report, dealt) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let threads = loops
            .into_iter()
            .zip(runtimes)
            .enumerate()
            .map(|(index, (mut connections, runtime))| {
                let (report, stop) = (report.clone(), stop.clone());
                std::thread::spawn(move || {
                    runtime.block_on(async move {
                        loop {
                            tokio::select! {
                                (connection, _) = connections.accept() => {
                                    let _ = report.send((index, connection));
                                }
                                () = stop.cancelled() => return,
                            }
                        }
                    });
                })
            })
            .collect();
        let acceptor = tokio::spawn(dealer.run(stop.clone()));
        RunningLoops {
            addr,
            handles,
            sheddings,
            dealt,
            stop,
            acceptor,
            threads,
        }
    }

    #[tokio::test]
    async fn a_busy_loop_is_passed_over_for_the_next() {
        let RunningLoops {
            addr,
            handles,
            mut dealt,
            stop,
            acceptor,
            threads,
            ..
        } = run_two_loops();
        let (first_client, first, connection) = connect_and_deal(addr, &mut dealt).await;
        assert_eq!(first, 0, "idle loops: the first one");

        // The first loop, holding a connection, becomes busy nearly all the time.
        keep_busy(&handles[0], Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(4 * limits::EVENT_LOOP_SAMPLE_MS)).await;
        let (_second_client, second, _) = connect_and_deal(addr, &mut dealt).await;
        assert_eq!(second, 1, "the busy loop is full: the next loop takes it");

        drop((first_client, connection));
        shut_down(stop, acceptor, threads).await;
    }

    /// Connects a client; returns it, the loop its connection was dealt to,
    /// and the loop's side of the connection (counted while held).
    async fn connect_and_deal(
        addr: SocketAddr,
        dealt: &mut mpsc::UnboundedReceiver<(usize, LiveConnection)>,
    ) -> (TcpStream, usize, LiveConnection) {
        let client = TcpStream::connect(addr).await.unwrap();
        let (index, connection) = tokio::time::timeout(WAIT, dealt.recv())
            .await
            .expect("the connection is dealt")
            .unwrap();
        (client, index, connection)
    }

    async fn shut_down(
        stop: CancellationToken,
        acceptor: JoinHandle<io::Result<()>>,
        threads: Vec<std::thread::JoinHandle<()>>,
    ) {
        stop.cancel();
        acceptor.await.unwrap().unwrap();
        for thread in threads {
            thread.join().unwrap();
        }
    }

    /// Keeps an event loop busy for `how_long` in slices of 5 ms, yielding in
    /// between so that its runtime records the busy time as it goes.
    fn keep_busy(handle: &tokio::runtime::Handle, how_long: Duration) {
        let busy_until = Instant::now() + how_long;
        handle.spawn(async move {
            while Instant::now() < busy_until {
                std::thread::sleep(Duration::from_millis(5));
                tokio::task::yield_now().await;
            }
        });
    }

    /// The loop is asked to shed whatever the machine's other processes do:
    /// the test's own machine may be busy (a build, other tests), and before
    /// the dealer counted the host's idle cores, that is exactly when a
    /// saturated loop was left alone beside an idle one (issue 21).
    #[tokio::test]
    async fn a_saturated_loop_is_asked_to_shed_to_a_loop_with_room() {
        let RunningLoops {
            addr,
            handles,
            sheddings,
            mut dealt,
            stop,
            acceptor,
            threads,
        } = run_two_loops();
        let mut held = Vec::new();
        for _ in 0..2 {
            let (client, index, connection) = connect_and_deal(addr, &mut dealt).await;
            assert_eq!(index, 0, "idle loops: the first one");
            held.push((client, connection));
        }
        assert!(!sheddings[0].take_one(), "nothing asked while idle");

        keep_busy(&handles[0], Duration::from_secs(8));
        // A streak of saturated samples.
        let asked = async {
            while !sheddings[0].take_one() {
                tokio::time::sleep(Duration::from_millis(limits::EVENT_LOOP_SAMPLE_MS)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(6), asked)
            .await
            .expect("the saturated loop is asked to close a connection");
        assert!(!sheddings[1].take_one(), "the loop with room is not");

        drop(held);
        shut_down(stop, acceptor, threads).await;
    }
}
