//! One listening socket whose connections are dealt to the event loops, each new
//! connection to the loop that holds the fewest.
//!
//! Why not one `SO_REUSEPORT` socket per loop: the kernel then picks the loop by a
//! hash of the client's address and port, and a client's connections split
//! unevenly — 64 connections came out 38/27 on two loops. The busier loop's
//! callers wait longer, and that loop sets the p99 (docs/performance.md,
//! gateway). Counting live connections keeps the loops within one of each
//! other. The hand-off costs one channel message per connection, not per
//! request: a connection still lives on one loop from accept to close.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::limits;

/// A connection on its way from the acceptor to its event loop.
type HandedOver = (std::net::TcpStream, SocketAddr, LiveCount);

/// Accepts on the listening socket and deals the connections out.
pub struct Dealer {
    listener: std::net::TcpListener,
    loops: Vec<LoopSeat>,
}

/// The dealer's side of one event loop.
struct LoopSeat {
    handover: mpsc::Sender<HandedOver>,
    live: Arc<AtomicUsize>,
}

/// An event loop's side: what `axum::serve` accepts from.
pub struct DealtConnections {
    handover: mpsc::Receiver<HandedOver>,
    local_addr: SocketAddr,
}

/// The dealer and one [`DealtConnections`] per event loop.
pub fn deal(
    listener: std::net::TcpListener,
    event_loops: usize,
) -> io::Result<(Dealer, Vec<DealtConnections>)> {
    let local_addr = listener.local_addr()?;
    let (loops, receivers) = (0..event_loops.max(1))
        .map(|_| {
            let (handover, receiver) = mpsc::channel(limits::CONNECTION_HANDOVER_QUEUE);
            let seat = LoopSeat {
                handover,
                live: Arc::new(AtomicUsize::new(0)),
            };
            let connections = DealtConnections {
                handover: receiver,
                local_addr,
            };
            (seat, connections)
        })
        .unzip();
    Ok((Dealer { listener, loops }, receivers))
}

impl Dealer {
    /// Accepts until `stop`. Must run inside a Tokio runtime (not an event loop's:
    /// a loop busy with its own connections would accept late).
    pub async fn run(self, stop: CancellationToken) -> io::Result<()> {
        let mut listener = TcpListener::from_std(self.listener)?;
        let mut next = 0;
        loop {
            let (stream, remote) = tokio::select! {
                // axum's accept retries what can be retried (and waits out EMFILE).
                accepted = axum::serve::Listener::accept(&mut listener) => accepted,
                () = stop.cancelled() => return Ok(()),
            };
            // Leaves this runtime's reactor; the event loop registers it with its own.
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "could not hand over an accepted connection");
                    continue;
                }
            };
            let mut handed_over = (stream, remote);
            loop {
                // A loop that has ended (its server failed, or the server is
                // stopping) takes no more; the others still do.
                let Some(seat) = least_busy(&self.loops, next) else {
                    return Ok(());
                };
                next = (next + 1) % self.loops.len();
                let live = LiveCount::new(&seat.live);
                // A full queue (its loop is not accepting) holds the acceptor
                // back; the listening socket's backlog holds new clients meanwhile.
                match seat
                    .handover
                    .send((handed_over.0, handed_over.1, live))
                    .await
                {
                    Ok(()) => break,
                    Err(mpsc::error::SendError((stream, remote, _live))) => {
                        handed_over = (stream, remote);
                    }
                }
            }
        }
    }
}

/// The open seat with the fewest live connections, the first found from `start`
/// on ties, so that an idle server deals round the loops.
fn least_busy(loops: &[LoopSeat], start: usize) -> Option<&LoopSeat> {
    let n = loops.len();
    (0..n)
        .map(|i| &loops[(start + i) % n])
        .filter(|seat| !seat.handover.is_closed())
        .min_by_key(|seat| seat.live.load(Ordering::Relaxed))
}

impl axum::serve::Listener for DealtConnections {
    type Io = LiveConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (LiveConnection, SocketAddr) {
        loop {
            let Some((stream, remote, live)) = self.handover.recv().await else {
                // The dealer stopped: so does the server, by its shutdown signal.
                return std::future::pending().await;
            };
            match TcpStream::from_std(stream) {
                Ok(stream) => {
                    return (
                        LiveConnection {
                            stream,
                            _live: live,
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

/// A served connection: the socket, counted while it is open.
pub struct LiveConnection {
    stream: TcpStream,
    _live: LiveCount,
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
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
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

    /// A dealer for two loops on a free port, running until `stop`.
    struct Running {
        addr: SocketAddr,
        loops: Vec<DealtConnections>,
        seats: Vec<Arc<AtomicUsize>>,
        stop: CancellationToken,
        acceptor: JoinHandle<io::Result<()>>,
    }

    fn start_dealing() -> Running {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (dealer, loops) = deal(listener, 2).unwrap();
        let seats = dealer.loops.iter().map(|s| Arc::clone(&s.live)).collect();
        let stop = CancellationToken::new();
        let acceptor = tokio::spawn(dealer.run(stop.clone()));
        Running {
            addr,
            loops,
            seats,
            stop,
            acceptor,
        }
    }

    #[tokio::test]
    async fn connections_are_dealt_evenly_and_counted_while_open() {
        let Running {
            addr,
            mut loops,
            seats,
            stop,
            acceptor,
        } = start_dealing();

        let mut clients = Vec::new();
        for _ in 0..6 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut served = Vec::new();
        for _ in 0..3 {
            for connections in &mut loops {
                served.push(connections.accept().await.0);
            }
        }
        let counts = || {
            seats
                .iter()
                .map(|s| s.load(Ordering::Relaxed))
                .collect::<Vec<_>>()
        };
        assert_eq!(counts(), [3, 3], "six connections, three per loop");

        // Two connections of the first loop close: the next two go to it.
        let first_loop_ones: Vec<usize> = (0..served.len()).step_by(2).take(2).collect();
        for index in first_loop_ones.into_iter().rev() {
            drop(served.remove(index));
        }
        assert_eq!(counts(), [1, 3]);
        for _ in 0..2 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            served.push(loops[0].accept().await.0);
        }
        assert_eq!(counts(), [3, 3]);

        stop.cancel();
        acceptor.await.unwrap().unwrap();
        assert_eq!(loops[0].local_addr().unwrap(), addr);
    }

    #[tokio::test]
    async fn a_loop_that_has_ended_is_skipped() {
        let Running {
            addr,
            mut loops,
            acceptor,
            ..
        } = start_dealing();
        let mut survivor = loops.pop().unwrap();
        drop(loops);

        let mut clients = Vec::new();
        let mut served = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let accepted =
                tokio::time::timeout(std::time::Duration::from_secs(5), survivor.accept()).await;
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
        tokio::time::timeout(std::time::Duration::from_secs(5), acceptor)
            .await
            .expect("the dealer ends when no loop is left")
            .unwrap()
            .unwrap();
    }
}
