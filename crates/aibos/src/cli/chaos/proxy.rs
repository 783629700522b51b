//! A loopback TCP proxy between the kernel and PostgreSQL, in the harness's
//! process, that can take the database away (every proxied connection cut;
//! new ones accepted and left without a byte, like a server that hangs or a
//! network that drops packets, so only the kernel's own timeouts end the
//! wait) and add latency (each chunk from the
//! server held back for a while before it is passed on, so every round trip
//! costs that much more, without limiting throughput).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Bytes read at once from either side.
const CHUNK_BYTES: usize = 16 * 1024;
/// Delayed chunks queued per direction of a connection; the reader waits
/// when it is full (back-pressure instead of unbounded memory).
const CHUNKS_IN_FLIGHT: usize = 256;

pub struct Proxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    /// Bumped to cut every open connection.
    cut: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port, forwarding to `target`.
    pub async fn start(target: String) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("the proxy cannot listen")?;
        let addr = listener.local_addr()?;
        let down = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (cut, _) = watch::channel(0u64);
        let task = {
            let (down, delay_ms, cut) = (down.clone(), delay_ms.clone(), cut.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if down.load(Ordering::SeqCst) {
                        // Held silent until the database comes back (or
                        // the proxy goes), then closed.
                        let mut back = cut.subscribe();
                        tokio::spawn(async move {
                            let _ = back.changed().await;
                            drop(client);
                        });
                        continue;
                    }
                    let target = target.clone();
                    let delay_ms = delay_ms.clone();
                    let cut = cut.subscribe();
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(&target).await {
                            relay(client, server, delay_ms, cut).await;
                        }
                    });
                }
            })
        };
        Ok(Proxy {
            addr,
            down,
            delay_ms,
            cut,
            task,
        })
    }

    /// The database is gone: every connection cut, new ones left unanswered.
    pub fn take_down(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    /// The database is back: the unanswered connections are closed (the
    /// kernel opens new ones), new ones are forwarded.
    pub fn bring_back(&self) {
        self.down.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut.send_modify(|n| *n += 1);
    }
}

/// Copies both ways until either side closes or the connection is cut.
async fn relay(
    client: TcpStream,
    server: TcpStream,
    delay_ms: Arc<AtomicU64>,
    mut cut: watch::Receiver<u64>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let no_delay = Arc::new(AtomicU64::new(0));
    tokio::select! {
        _ = pump(client_read, server_write, no_delay) => {}
        _ = pump(server_read, client_write, delay_ms) => {}
        _ = cut.changed() => {}
    }
}

/// One direction: each chunk read is written `delay_ms` after it was read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<AtomicU64>,
) {
    let (queue, mut queued) = mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
    let reader = async move {
        let mut buffer = vec![0u8; CHUNK_BYTES];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due = tokio::time::Instant::now()
                        + Duration::from_millis(delay_ms.load(Ordering::SeqCst));
                    if queue.send((due, buffer[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
