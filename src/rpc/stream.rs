//! Calls to peers multiplexed over one long-lived connection per peer.
//!
//! # Design
//!
//! [`StreamTransport`] keeps, per peer, one TCP connection that was upgraded from HTTP
//! (`GET` [`STREAM_PATH`] with `Upgrade: kvs-rpc/PROTOCOL_VERSION`, carrying the same
//! three headers as every [`super::RPC_PATH`] call) to a plain sequence of frames:
//!
//! ```text
//! [payload length: u32 LE][call id: u64 LE][kind: u8][payload]
//! ```
//!
//! A call is a frame of kind [`CALL`] carrying the postcard [`Envelope`]; its answer
//! comes back, in any order, as a frame with the same id: [`ANSWER`] (a postcard
//! [`Response`]) or [`REFUSED`] (a text, what the HTTP endpoint would have answered
//! with a 4xx/5xx status). Calls from many tasks share the connection: each side has
//! one writer task that takes every frame waiting in its queue and writes them with
//! one system call, where pooled HTTP/1.1 cost one write and one read per call on each
//! side, plus HTTP's parsing and headers. This is what the forwarding hop and
//! replication pay on every request.
//!
//! What a stream carries: the frequent, small calls ([`streams`]: pings, pokes,
//! forwarded reads and writes, sync pulls). View-change steps, snapshot pages and the
//! key exchange keep the HTTP endpoint: they are rare, some are large (a large page
//! would hold up the small calls queued behind it on one connection), and some are
//! made before the caller holds a member proof.
//!
//! # Trust
//!
//! The upgrade request passes the same gate as an HTTP call (cluster secret, protocol
//! version) and must prove membership; a node that refuses (it holds no key yet, or an
//! older build) answers with an HTTP status and the caller uses HTTP for that peer for
//! [`HTTP_FALLBACK`]. The receiver re-checks the proof the stream was opened with
//! against its current key before each call and applies the same admission rules
//! (`Node::admit`) as the HTTP endpoint, so a call on a stream is admitted exactly when
//! the same call over HTTP would be.
//!
//! # Failures
//!
//! * A connection that cannot be made (or upgraded) fails the call as
//!   [`CallError::NotSent`]: nothing was sent.
//! * A connection that breaks fails every call waiting on it as
//!   [`CallError::Unreachable`] (they may have been delivered), as a broken HTTP
//!   connection did; the next call opens a new one.
//! * A stream idle for [`CLIENT_IDLE`] is dropped by its caller before the receiver's
//!   [`SERVER_IDLE`] closes it, so a call is never sent on a stream being closed.
//! * A call that times out on a stream on which nothing arrived since it began closes
//!   the stream: a partition drops packets without closing the connection, and TCP's
//!   retransmissions may resume long after the partition heals, where a new connection
//!   works at once. (A call that times out while other answers arrive leaves it open.)
//! * Connection attempts to one peer are made one at a time, and each call whose
//!   attempt fails tries again: a peer that restarts is reachable by the next call.
//!
//! # Caveats
//!
//! * Streams are not counted in the server's connection cap: only members can open
//!   them (one per peer in practice), and a member is trusted not to flood.
//! * At shutdown, calls being served on a stream are cut off with the process where an
//!   HTTP call would be finished first; the caller sees an unreachable peer.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{HeaderValue, CONNECTION, HOST, UPGRADE};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::metric_names as names;

use super::{
    decode, encode, CallError, CallFuture, Envelope, HttpTransport, Request, Response, Transport,
    MEMBER_HEADER, PROTOCOL_VERSION, PROTO_HEADER, SECRET_HEADER,
};

/// Path of the upgrade request.
pub const STREAM_PATH: &str = "/_internal/v1/stream";
/// The protocol name a stream is upgraded to (with [`PROTOCOL_VERSION`] after a slash).
pub const UPGRADE_NAME: &str = "kvs-rpc";
/// Frame kinds.
pub const CALL: u8 = 0;
pub const ANSWER: u8 = 1;
pub const REFUSED: u8 = 2;
/// Bytes of a frame's head: payload length, call id, kind.
pub const FRAME_HEAD: usize = 13;
/// Frames one side may have queued for its writer; senders wait beyond it.
pub const QUEUE: usize = 1_024;
/// Calls a receiver serves at once on one stream; it stops reading beyond it.
pub const MAX_IN_FLIGHT: usize = 1_024;
/// A receiver closes a stream on which no frame arrived for this long.
pub const SERVER_IDLE: Duration = Duration::from_secs(60);
/// A caller stops using a stream idle this long (below [`SERVER_IDLE`]).
pub const CLIENT_IDLE: Duration = Duration::from_secs(20);
/// After a refused upgrade, calls to that peer use HTTP this long before trying again.
pub const HTTP_FALLBACK: Duration = Duration::from_secs(10);
/// Calls whose message is larger than this go over HTTP (they would hold up the small
/// calls behind them on the stream).
pub const MAX_STREAMED_CALL: usize = 256 * 1024;
/// Bytes of frames gathered into one write.
const WRITE_BATCH: usize = 256 * 1024;
/// Time to open a connection and upgrade it.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Whether a call of this kind travels on a stream (see the module doc).
pub fn streams(request: &Request) -> bool {
    matches!(
        request,
        Request::Ping
            | Request::Poke { .. }
            | Request::Get { .. }
            | Request::Put { .. }
            | Request::Sync(_)
    )
}

/// The value of the `Upgrade` header of a stream of this build.
pub fn upgrade_token() -> String {
    format!("{UPGRADE_NAME}/{PROTOCOL_VERSION}")
}

/// One frame read off a stream.
pub struct Frame {
    pub id: u64,
    pub kind: u8,
    pub payload: Vec<u8>,
}

/// A frame ready to write: head and payload.
pub fn frame(id: u64, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEAD + payload.len());
    // Payloads are bounded far below 4 GiB (`MAX_RPC_BYTES`).
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    out
}

/// Reads the next frame; `None` when the other side closed the stream between frames.
/// A payload larger than `max` is an error (the stream is then unusable).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> io::Result<Option<Frame>> {
    let mut head = [0u8; FRAME_HEAD];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let [l0, l1, l2, l3, i0, i1, i2, i3, i4, i5, i6, i7, kind] = head;
    let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes (at most {max})"),
        ));
    }
    let id = u64::from_le_bytes([i0, i1, i2, i3, i4, i5, i6, i7]);
    let mut payload = vec![0; len];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame { id, kind, payload }))
}

/// Writes the frames of `queue` until every sender is gone, each time with everything
/// waiting in the queue (up to [`WRITE_BATCH`] bytes) in one write.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    mut queue: mpsc::Receiver<Vec<u8>>,
) -> io::Result<()> {
    let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
    while let Some(first) = queue.recv().await {
        if first.len() >= WRITE_BATCH {
            w.write_all(&first).await?;
            continue;
        }
        batch.extend_from_slice(&first);
        // Let the tasks that are ready run first: under load, they are the handlers
        // about to queue more frames, and the write below then carries them too (six
        // frames per write instead of one and a half, forwarding GETs at 64 clients).
        // Idle, no task is ready and this returns at once.
        tokio::task::yield_now().await;
        while batch.len() < WRITE_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.extend_from_slice(&next),
                Err(_) => break,
            }
        }
        w.write_all(&batch).await?;
        batch.clear();
    }
    w.shutdown().await
}

/// Calls waiting for their answers on one connection; `None` once it is closed.
type Pending = Mutex<Option<HashMap<u64, oneshot::Sender<Frame>>>>;

/// What a connection's caller side and its reading task share.
struct Shared {
    pending: Pending,
    born: Instant,
    /// One more than the milliseconds since `born` when the last frame arrived; 0
    /// until one does.
    last_heard: AtomicU64,
    /// Tells the connection's task to drop the socket.
    kill: tokio::sync::Notify,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// One upgraded connection to a peer, as the caller sees it.
struct Conn {
    frames: mpsc::Sender<Vec<u8>>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    /// Milliseconds since `shared.born` of the last call, for [`CLIENT_IDLE`].
    last_used: AtomicU64,
}

impl Conn {
    fn is_open(&self) -> bool {
        lock(&self.shared.pending).is_some()
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_used.load(Ordering::Relaxed));
        self.shared.born.elapsed().saturating_sub(last)
    }

    /// Whether nothing arrived on the stream since `since`.
    fn silent_since(&self, since: Instant) -> bool {
        match self.shared.last_heard.load(Ordering::Relaxed) {
            0 => true,
            heard => self.shared.born + Duration::from_millis(heard - 1) < since,
        }
    }

    /// Fails every call waiting on the stream and drops its socket.
    fn close(&self) {
        lock(&self.shared.pending).take();
        self.shared.kill.notify_one();
    }

    async fn call(&self, to: &str, body: &[u8]) -> Result<Response, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match lock(&self.shared.pending).as_mut() {
            Some(waiting) => waiting.insert(id, tx),
            None => return Err(CallError::NotSent(to.into(), "stream closed".into())),
        };
        // Forgets the call if it is dropped (timed out) before its answer.
        let _forget = Forget {
            pending: &self.shared.pending,
            id,
        };
        self.last_used
            .store(self.shared.now_ms(), Ordering::Relaxed);
        if self.frames.send(frame(id, CALL, body)).await.is_err() {
            return Err(CallError::NotSent(to.into(), "stream closed".into()));
        }
        match rx.await {
            Ok(Frame {
                kind: ANSWER,
                payload,
                ..
            }) => decode(&payload)
                .map_err(|e| CallError::Refused(to.into(), format!("undecodable answer: {e}"))),
            Ok(Frame { payload, .. }) => Err(CallError::Refused(
                to.into(),
                String::from_utf8_lossy(&payload).into_owned(),
            )),
            Err(_) => Err(CallError::Unreachable(
                to.into(),
                "stream closed while the call was in flight".into(),
            )),
        }
    }
}

struct Forget<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some(waiting) = lock(self.pending).as_mut() {
            waiting.remove(&self.id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps guarded here stay consistent whatever panicked while holding them.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a caller knows about one peer.
#[derive(Default)]
struct Peer {
    /// Serializes connection attempts, so a burst of calls opens one connection.
    connecting: tokio::sync::Mutex<()>,
    state: Mutex<PeerState>,
}

#[derive(Default)]
enum PeerState {
    #[default]
    None,
    Open(Arc<Conn>),
    /// The peer refused the upgrade: use HTTP until then.
    HttpUntil(Instant),
}

/// Which way a call goes.
enum Route {
    Stream(Arc<Conn>),
    Http,
}

/// The real transport: streams to peers that accept them, HTTP otherwise (see the
/// module doc).
pub struct StreamTransport {
    http: HttpTransport,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
}

impl StreamTransport {
    pub fn new(http: HttpTransport) -> Self {
        Self {
            http,
            peers: Mutex::new(HashMap::new()),
        }
    }

    fn peer(&self, to: &str) -> Arc<Peer> {
        lock(&self.peers).entry(to.to_string()).or_default().clone()
    }

    /// An open stream to `to`, or HTTP when the peer refuses streams or this node has no
    /// member proof yet.
    async fn route(&self, to: &str) -> Result<Route, CallError> {
        let Some(proof) = self.http.proof() else {
            return Ok(Route::Http);
        };
        let peer = self.peer(to);
        if let Some(route) = usable(&peer) {
            return Ok(route);
        }
        let _one_at_a_time = peer.connecting.lock().await;
        if let Some(route) = usable(&peer) {
            return Ok(route);
        }
        let opened = tokio::time::timeout(CONNECT_TIMEOUT, self.open(to, proof))
            .await
            .unwrap_or_else(|_| {
                Err(Opened::Failed(format!(
                    "no stream within {CONNECT_TIMEOUT:?}"
                )))
            });
        let outcome = match &opened {
            Ok(_) => 0,
            Err(Opened::Refused(_)) => 1,
            Err(Opened::Failed(_)) => 2,
        };
        metrics::counter!(names::RPC_STREAMS_TOTAL, "outcome" => names::STREAM_OUTCOMES[outcome])
            .increment(1);
        let mut state = lock(&peer.state);
        match opened {
            Ok(conn) => {
                *state = PeerState::Open(conn.clone());
                Ok(Route::Stream(conn))
            }
            Err(Opened::Refused(why)) => {
                tracing::debug!(peer = to, "stream refused, using HTTP: {why}");
                *state = PeerState::HttpUntil(Instant::now() + HTTP_FALLBACK);
                Ok(Route::Http)
            }
            Err(Opened::Failed(why)) => {
                // The next call tries again: a peer that restarts is reachable at once.
                *state = PeerState::None;
                Err(CallError::NotSent(to.into(), why))
            }
        }
    }

    /// Connects to `to`, upgrades the connection and starts its reader and writer.
    async fn open(&self, to: &str, proof: HeaderValue) -> Result<Arc<Conn>, Opened> {
        let failed = |e: &dyn std::fmt::Display| Opened::Failed(e.to_string());
        let addr = tokio::net::lookup_host(to)
            .await
            .map_err(|e| failed(&e))?
            .next()
            .ok_or_else(|| Opened::Failed(format!("{to} resolves to no address")))?;
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| failed(&e))?;
        if let Some(ip) = self.http.local_ip() {
            if ip.is_ipv4() == addr.is_ipv4() {
                socket
                    .bind(SocketAddr::new(ip, 0))
                    .map_err(|e| failed(&e))?;
            }
        }
        let tcp = socket.connect(addr).await.map_err(|e| failed(&e))?;
        tcp.set_nodelay(true).map_err(|e| failed(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| failed(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("stream upgrade connection: {e}");
            }
        });
        let request = hyper::Request::get(STREAM_PATH)
            .header(HOST, to)
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, upgrade_token())
            .header(SECRET_HEADER, self.http.secret())
            .header(PROTO_HEADER, PROTOCOL_VERSION)
            .header(MEMBER_HEADER, proof)
            .body(Empty::<Bytes>::new())
            .map_err(|e| failed(&e))?;
        let mut response = sender.send_request(request).await.map_err(|e| failed(&e))?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(Opened::Refused(response.status().to_string()));
        }
        let upgraded = hyper::upgrade::on(&mut response)
            .await
            .map_err(|e| failed(&e))?;
        let (read, write) = tokio::io::split(TokioIo::new(upgraded));
        let (frames, queue) = mpsc::channel(QUEUE);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Some(HashMap::new())),
            born: Instant::now(),
            last_heard: AtomicU64::new(0),
            kill: tokio::sync::Notify::new(),
        });
        let task = shared.clone();
        let peer = to.to_string();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                r = read_answers(read, &task) => r,
                r = write_frames(write, queue) => r,
                () = task.kill.notified() => Ok(()),
            };
            if let Err(e) = outcome {
                tracing::debug!(%peer, "stream to peer closed: {e}");
            }
            // Dropping the senders fails every call still waiting.
            lock(&task.pending).take();
        });
        Ok(Arc::new(Conn {
            frames,
            shared,
            next_id: AtomicU64::new(0),
            last_used: AtomicU64::new(0),
        }))
    }
}

/// Why [`StreamTransport::open`] did not give a stream.
enum Opened {
    /// The peer answered the upgrade with an HTTP status: use HTTP.
    Refused(String),
    /// No connection: the call cannot be sent either way.
    Failed(String),
}

/// The route the peer's state already decides, if any; forgets a closed or idle stream.
fn usable(peer: &Peer) -> Option<Route> {
    let mut state = lock(&peer.state);
    match &*state {
        PeerState::Open(conn) if conn.is_open() && conn.idle_for() < CLIENT_IDLE => {
            Some(Route::Stream(conn.clone()))
        }
        PeerState::HttpUntil(until) if Instant::now() < *until => Some(Route::Http),
        PeerState::None => None,
        _ => {
            *state = PeerState::None;
            None
        }
    }
}

/// Hands each answer to the call waiting for it, until the stream ends.
async fn read_answers<R: AsyncRead + Unpin>(read: R, shared: &Shared) -> io::Result<()> {
    let mut read = BufReader::with_capacity(64 * 1024, read);
    while let Some(frame) = read_frame(&mut read, super::MAX_RPC_BYTES).await? {
        shared
            .last_heard
            .store(shared.now_ms().saturating_add(1), Ordering::Relaxed);
        let waiter = lock(&shared.pending)
            .as_mut()
            .and_then(|w| w.remove(&frame.id));
        if let Some(waiter) = waiter {
            // The caller may have given up (timed out) meanwhile.
            let _ = waiter.send(frame);
        }
    }
    Ok(())
}

impl Transport for StreamTransport {
    fn set_member_proof(&self, proof: Option<String>) {
        self.http.set_member_proof(proof);
        // Streams opened with the old proof (or none) are refused from now on.
        lock(&self.peers).clear();
    }

    fn call(&self, to: &str, envelope: &Envelope, timeout: Duration) -> CallFuture<'_> {
        if !streams(&envelope.body) {
            return self.http.call(to, envelope, timeout);
        }
        let body = encode(envelope);
        let to = to.to_string();
        Box::pin(async move {
            let started = Instant::now();
            // The stream the call went on, if it times out there.
            let used: Mutex<Option<Arc<Conn>>> = Mutex::new(None);
            let call = async {
                if body.len() > MAX_STREAMED_CALL {
                    return self.http.call_once(&to, body).await;
                }
                match self.route(&to).await? {
                    Route::Stream(conn) => {
                        *lock(&used) = Some(conn.clone());
                        conn.call(&to, &body).await
                    }
                    Route::Http => self.http.call_once(&to, body).await,
                }
            };
            match tokio::time::timeout(timeout, call).await {
                Ok(result) => result,
                Err(_) => {
                    // Nothing heard on the stream for the whole call: it may be cut off
                    // (a partition drops packets without closing anything), and TCP may
                    // take long to resume after it heals. The next call opens a new one.
                    if let Some(conn) = lock(&used).take() {
                        if conn.silent_since(started) {
                            tracing::debug!(peer = %to, "closing a silent stream");
                            conn.close();
                        }
                    }
                    Err(CallError::Timeout(to, timeout))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_batch() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (tx, rx) = mpsc::channel(8);
        let writer = tokio::spawn(write_frames(client, rx));
        for id in 0..5u64 {
            tx.send(frame(id, CALL, &vec![id as u8; id as usize * 100]))
                .await
                .expect("queue open");
        }
        drop(tx);
        writer.await.expect("joins").expect("writes");
        let mut server = BufReader::new(server);
        for id in 0..5u64 {
            let f = read_frame(&mut server, 1 << 20)
                .await
                .expect("reads")
                .expect("a frame");
            assert_eq!((f.id, f.kind), (id, CALL));
            assert_eq!(f.payload, vec![id as u8; id as usize * 100]);
        }
        assert!(read_frame(&mut server, 1 << 20)
            .await
            .expect("eof")
            .is_none());
    }

    #[tokio::test]
    async fn oversized_and_cut_frames_are_errors() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client
            .write_all(&frame(1, CALL, &[0; 100]))
            .await
            .expect("writes");
        assert!(read_frame(&mut server, 99).await.is_err());

        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let whole = frame(1, CALL, &[0; 100]);
        client.write_all(&whole[..50]).await.expect("writes");
        drop(client);
        assert!(read_frame(&mut server, 1 << 20).await.is_err());
    }

    /// A peer that does not take streams (an older build, or one without the key)
    /// answers the upgrade with a status: the call goes over HTTP, and so do the next
    /// ones for a while.
    #[tokio::test]
    async fn a_refused_upgrade_falls_back_to_http() {
        use axum::routing::post;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("address").to_string();
        let rpc_calls = Arc::new(AtomicU64::new(0));
        let counted = rpc_calls.clone();
        let app = axum::Router::new().route(
            super::super::RPC_PATH,
            post(move || {
                counted.fetch_add(1, Ordering::Relaxed);
                async { encode(&Response::Ok) }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let (transport, env) = member_and_ping();
        for _ in 0..3 {
            let answer = transport.call(&addr, &env, Duration::from_secs(5)).await;
            assert!(matches!(answer, Ok(Response::Ok)), "{answer:?}");
        }
        assert_eq!(rpc_calls.load(Ordering::Relaxed), 3);
        let peer = transport.peer(&addr);
        assert!(matches!(*lock(&peer.state), PeerState::HttpUntil(_)));
    }

    /// A transport holding a member proof, and a ping to send with it.
    fn member_and_ping() -> (StreamTransport, Envelope) {
        let transport = StreamTransport::new(HttpTransport::new("s".into(), None));
        transport.set_member_proof(Some("ab".repeat(32)));
        let env = Envelope {
            from: "127.0.0.1:1".into(),
            epoch: 1,
            body: Request::Ping,
        };
        (transport, env)
    }

    /// Nobody listening: the call certainly was not delivered.
    #[tokio::test]
    async fn no_listener_is_not_sent() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        let addr = listener.local_addr().expect("address").to_string();
        drop(listener);
        let (transport, env) = member_and_ping();
        let answer = transport.call(&addr, &env, Duration::from_secs(5)).await;
        assert!(matches!(answer, Err(CallError::NotSent(..))), "{answer:?}");
    }

    /// A peer that takes the stream but never answers (as across a partition): the call
    /// times out, the silent stream is closed, and the next call opens a new one.
    #[tokio::test]
    async fn a_silent_stream_is_closed_when_a_call_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("address").to_string();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if socket.read_exact(&mut byte).await.is_err() {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let answer = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                         upgrade: {}\r\n\r\n",
                        upgrade_token()
                    );
                    if socket.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    // Reads every call, answers none.
                    let mut sink = [0u8; 4096];
                    while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
                });
            }
        });
        let (transport, env) = member_and_ping();
        let answer = transport
            .call(&addr, &env, Duration::from_millis(300))
            .await;
        assert!(matches!(answer, Err(CallError::Timeout(..))), "{answer:?}");
        let peer = transport.peer(&addr);
        assert!(
            matches!(&*lock(&peer.state), PeerState::Open(conn) if !conn.is_open()),
            "the silent stream is still open"
        );
        let answer = transport
            .call(&addr, &env, Duration::from_millis(300))
            .await;
        assert!(matches!(answer, Err(CallError::Timeout(..))), "{answer:?}");
        assert_eq!(accepted.load(Ordering::Relaxed), 2, "no new connection");
    }
}
