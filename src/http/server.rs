//! The loop that accepts connections and serves each with hyper's HTTP/1 connection.
//!
//! # Connections
//!
//! [`serve`] accepts connections itself and serves each with hyper's HTTP/1 connection
//! (`axum::serve` sets no timer, so none of hyper's timeouts ran). What bounds a
//! connection:
//!
//! * **Its number**: at most [`MAX_CONNECTIONS`] (fewer when the process may open fewer
//!   than twice that many files) are open at once; beyond that the accept loop waits for
//!   one to close, and new clients wait in the listen backlog.
//! * **Time to send a request's head**: [`IDLE_TIMEOUT`], hyper's `header_read_timeout`.
//!   hyper arms it whenever the connection starts reading a head, which in hyper 1.x is
//!   also while a keep-alive connection waits for its next request
//!   (`proto/h1/conn.rs::poll_read_head`), so it closes idle connections as well as
//!   ones that stall, or trickle, mid-header. Bodies have their own deadline
//!   ([`super::body::BODY_TIMEOUT`]).
//! * **The size of a head**: [`MAX_HEAD_BYTES`], which is also what hyper buffers for a
//!   connection at most.
//! * **Time a response write may stall**: [`WRITE_STALL_TIMEOUT`]. A client that stops
//!   reading its response would otherwise hold the connection and the response for
//!   ever. A client that reads slowly but steadily is not cut off.
//!
//! On the shutdown signal the loop stops accepting, every connection finishes the
//! request it is serving (idle ones close at once), and [`serve`] returns once all have
//! closed. No handler needs the peer's address: internal calls are recognised by the
//! member proof they carry (`node::keys`), not by where they come from.
//!
//! Caveats:
//!
//! * The connection cap is one pool for clients and peers alike. Someone able to open
//!   [`MAX_CONNECTIONS`] connections can keep peers' calls waiting until the idle timeout
//!   closes them; a per-address cap would be the next step.
//! * hyper allocates and registers the head timer afresh for every request (about a
//!   thousand instructions, a few per cent of a GET's cost in `bench/callgrind.sh`).
//! * The internal endpoint reads its body with its own size limit but without the
//!   client gate's deadline and budget.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tower::Service as _;

use crate::node::Node;

/// Connections open at once, clients and peers together. Each costs a file descriptor
/// and, idle, about 10 KiB (hyper's state and its 8 KiB read buffer), so 10,000 is about
/// 100 MiB and half of this machine's 20,000 descriptors, the other half left for the
/// node's own calls to its peers (up to `MAX_FORWARDS` = 1,024 in flight) and its files;
/// it is far above what clients and peers need (load tests use 64 to a few hundred). The
/// cap is halved again when the process may open fewer than twice as many files.
pub const MAX_CONNECTIONS: usize = 10_000;
/// Time a connection gets to send a request's head, counted from when it is opened or
/// has had its previous answer: it closes idle keep-alive connections and ones that
/// stall mid-header. It must stay ABOVE the internal client's pool idle timeout
/// (`rpc::POOL_IDLE`, 20 s), so that a peer drops an idle pooled connection before this
/// node closes it and never sends a call on a connection that is being closed (a lost
/// forwarded write would answer "outcome unknown"). 30 s is also what hyper chooses when
/// it has a timer.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Testing aid: when set, [`IDLE_TIMEOUT`] is this many milliseconds instead, so a test
/// can watch idle connections close without waiting 30 s. Below `rpc::POOL_IDLE` it
/// breaks the rule above, so tests that set it must not depend on calls between nodes.
/// Never set it in production. Read once per process.
pub const IDLE_TIMEOUT_ENV: &str = "KVS_IDLE_TIMEOUT_MS";
/// A response write that makes no progress for this long fails and closes its
/// connection. As long as [`IDLE_TIMEOUT`]: a client gets as long to take its answer as
/// to send its next request, and even a 4 MiB sync page over a slow link makes progress
/// far more often.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head (request line and headers) accepted; hyper answers 431 past
/// it. It is also about the most hyper buffers for a connection (its `max_buf_size`,
/// which a read can overshoot by what one read brings), so heads being received hold
/// about 64 KiB × [`MAX_CONNECTIONS`] (640 MiB) at most however slowly they come, where
/// hyper's default (~400 KiB, unchecked until a head fails to parse) allowed 4 GiB. Real heads are a few hundred
/// bytes; 64 KiB leaves room for long query strings, and bodies are still read 64 KiB
/// per system call.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Pause of the accept loop after an error that is not one connection's own (out of file
/// descriptors, say): retrying at once would spin, and waiting lets connections close.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(250);

/// Serves `node` on `listener` until `shutdown` resolves, then lets the requests in
/// flight finish and returns (see the module doc).
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let app = super::router(node);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(idle_timeout())
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES);
    let cap = connection_cap();
    tracing::debug!(cap, idle = ?idle_timeout(), "accepting connections");
    let slots = Arc::new(Semaphore::new(cap));
    // hyper-util's `GracefulShutdown` does not take connections that can be upgraded
    // (peers' streams, `rpc::stream`), so the loop does its part: it tells every
    // connection to finish, then waits until every slot is back.
    let (stopping, stop) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
        };
        let (stream, remote) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::warn!("accept failed: {e}; pausing {ACCEPT_ERROR_PAUSE:?}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        // Answers go out as soon as they are written. Without it, Nagle's algorithm holds
        // a small write back while an earlier one is unacknowledged, and the receiver
        // delays its acknowledgement (up to 40 ms): a peer's stream, with several
        // answers in flight, met that wait on about 1 % of its calls.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%remote, "TCP_NODELAY not set: {e}");
        }
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |req: Request<Incoming>| app.clone().call(req));
        let io = TokioIo::new(StallGuard::new(stream, WRITE_STALL_TIMEOUT));
        let conn = http.serve_connection(io, service).with_upgrades();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%remote, "connection ended: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    // Every connection gives its slot back when it has closed.
    let _all = slots
        .acquire_many(u32::try_from(cap).unwrap_or(u32::MAX))
        .await;
    Ok(())
}

/// Errors of one incoming connection (it went away before it was accepted), after which
/// the loop just accepts the next.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// [`MAX_CONNECTIONS`], or half the file descriptors the process may open if that is
/// less: connections beyond it would fail to accept, and the node needs descriptors of
/// its own.
fn connection_cap() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return MAX_CONNECTIONS;
    }
    usize::try_from(limit.rlim_cur / 2)
        .map_or(MAX_CONNECTIONS, |half| half.clamp(1, MAX_CONNECTIONS))
}

/// [`IDLE_TIMEOUT`], or the test override of [`IDLE_TIMEOUT_ENV`].
fn idle_timeout() -> Duration {
    static IDLE: OnceLock<Duration> = OnceLock::new();
    *IDLE.get_or_init(|| {
        let ms = std::env::var(IDLE_TIMEOUT_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        match ms {
            Some(ms) => {
                tracing::warn!(
                    "{IDLE_TIMEOUT_ENV}={ms}: connections idle for {ms} ms are closed (a testing aid)"
                );
                Duration::from_millis(ms.max(1))
            }
            None => IDLE_TIMEOUT,
        }
    })
}

/// A connection's socket whose writes fail once they have made no progress for `limit`
/// ([`WRITE_STALL_TIMEOUT`]). The timer is created the first time a write has to wait and
/// re-armed only when a new wait starts, so writes that go straight through cost
/// nothing. Written here because neither hyper, hyper-util nor tokio bound a stalled
/// write, and the crate that does (tokio-io-timeout) is this one struct.
struct StallGuard {
    io: TcpStream,
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether a write is waiting now (the timer is armed for it).
    waiting: bool,
}

impl StallGuard {
    fn new(io: TcpStream, limit: Duration) -> Self {
        Self {
            io,
            limit,
            timer: None,
            waiting: false,
        }
    }

    /// Passes a write's outcome through, failing it once it waited too long.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.waiting = false;
            return polled;
        }
        if !self.waiting {
            let deadline = Instant::now() + self.limit;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.waiting = true;
        }
        let expired = self
            .timer
            .as_mut()
            .is_some_and(|timer| timer.as_mut().poll(cx).is_ready());
        if !expired {
            return Poll::Pending;
        }
        self.waiting = false;
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client took nothing of its response for {:?}",
                self.limit
            ),
        )))
    }
}

impl AsyncRead for StallGuard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallGuard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair on loopback: the server's side guarded with `limit`.
    async fn pair(limit: Duration) -> (StallGuard, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (server, _) = accepted.expect("accept");
        (StallGuard::new(server, limit), client.expect("connect"))
    }

    /// Writes `total` bytes, or until a write fails.
    async fn write(guard: &mut StallGuard, total: usize) -> io::Result<()> {
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            guard.write_all(&chunk).await?;
            sent += chunk.len();
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_write_the_client_takes_nothing_of_fails_after_the_limit() {
        let limit = Duration::from_millis(300);
        let (mut guard, _client) = pair(limit).await;
        // Nobody reads: the socket buffers fill, then the write waits until the limit.
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(20), write(&mut guard, usize::MAX))
            .await
            .expect("the stalled write must fail, not hang");
        let e = outcome.expect_err("a write nobody reads cannot succeed");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(started.elapsed() >= limit);
    }

    #[tokio::test]
    async fn pauses_shorter_than_the_limit_do_not_fail_a_write() {
        let (mut guard, mut client) = pair(Duration::from_secs(2)).await;
        // The client pauses (the writer waits on full buffers), then reads everything.
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0;
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let until = total + 8 * 1024 * 1024;
                while total < until {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => return total,
                        Ok(n) => total += n,
                    }
                }
            }
            while let Ok(n) = client.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n;
            }
            total
        });
        let total = 32 * 1024 * 1024;
        write(&mut guard, total)
            .await
            .expect("every pause was short");
        guard.shutdown().await.expect("shutdown");
        drop(guard);
        assert_eq!(reader.await.expect("reader"), total);
    }
}
