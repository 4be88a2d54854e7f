//! Admission of client requests: their bodies are read under a size limit, a deadline
//! and a node-wide memory budget, and only then does a request count against the
//! node-wide limit on requests in flight. Every client dialect goes through the one
//! [`CLIENTS`] gate; nothing here knows a dialect (errors are [`BodyError`]s, which
//! become [`crate::error::Error`]s that each dialect maps to its own envelope).
//!
//! # Design
//!
//! A request passes the gate in two steps:
//!
//! 1. [`Gate::read`] buffers its body. A `Content-Length` above the dialect's limit is
//!    refused at once, before a byte is read (413). Otherwise the body is read under a
//!    deadline ([`BODY_TIMEOUT`], 408), and every chunk takes its size from a byte budget
//!    shared by all connections ([`BODY_BUDGET_BYTES`]) as it arrives: a client that
//!    trickles its body holds only the bytes it has sent. When the budget is spent, the
//!    read waits for bytes to be given back (within its deadline), which also stops
//!    reading from that client's socket. The budget taken stays with the request as a
//!    [`Lease`] until the dialect drops it, i.e. until the request is answered, so it
//!    also covers what the dialect builds from the body (parsed fields are no larger).
//! 2. [`Gate::enter`] then takes a permit of the in-flight limit ([`MAX_IN_FLIGHT`]),
//!    held while the handler runs.
//!
//! Why bodies come first: a permit held while a body arrives is held for as long as
//! the client likes (up to the deadline). 300 connections trickling PUT bodies used to
//! hold all 256 permits, and every other request on the node waited ~10 s. Now such
//! clients hold only their connections (bounded by the server's connection cap and
//! closed by the deadline) and the bytes they sent (bounded by the budget), and the
//! in-flight limit bounds only work the node does: handlers, forwards, writer queue.
//!
//! The hot path stays cheap: a request without a body (a bare GET) arms no timer,
//! allocates nothing and takes no budget; a body that is already there when it is read
//! (a small PUT arrives with its headers) arms no timer either: the deadline's timer is
//! created only when the body has to be waited for. A one-chunk body is kept as it came
//! (no copy).
//!
//! # Caveats
//!
//! * A body's budget is taken as its bytes arrive, not reserved up front, so large
//!   bodies arriving together while the budget is spent wait on each other until some
//!   finish or time out (408); the budget is sized for twenty maximum-size bodies so
//!   that this takes a deliberate flood.
//! * A body that comes in several chunks is copied into one buffer, whose capacity (at
//!   most twice what arrived) is what it is charged for, before it grows. A chunk is
//!   already in memory when it is charged (hyper has read it): a read waiting for budget
//!   holds one such chunk, at most what hyper reads at once (`MAX_HEAD_BYTES` in
//!   `http/server.rs`, 64 KiB), outside the budget.
//! * The budget covers request bodies and the dialect's parse of them, not copies made
//!   further down (the value handed to storage and replication), which the in-flight
//!   limit and the writer's queue bound.
//! * The gate is process-wide, because memory is: one process serves one node.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use tokio::sync::{Semaphore, SemaphorePermit, TryAcquireError};
use tokio::time::{Instant, Sleep};

use crate::error::{Error, ErrorKind};

/// How long a client may take to send its body, counted from when its handler starts
/// reading it. Ten seconds lets a 6 MiB body through a link of 5 Mbit/s, and keeps a
/// client that trickles its body from holding its connection and bytes for longer.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of request bodies the node holds at once, across all connections (see the
/// module doc). 128 MiB holds twenty bodies of the largest size a dialect accepts
/// (`/kv-store`: 6 MiB, room for a percent-encoded 2 MiB value) or about half a million
/// ordinary PUTs, and beside the 256 MiB storage cache keeps a node's worst case under
/// half a GiB, where the request count alone (256 requests of 6 MiB) allowed 1.5 GiB.
pub const BODY_BUDGET_BYTES: usize = 128 * 1024 * 1024;
/// Client requests handled at once, once their bodies are read; more wait for a permit
/// (backpressure). One limit for the whole client surface, every dialect included. 256
/// keeps a few hundred concurrent clients busy (forwards, writer batches) while bounding
/// what a burst queues behind the node's own limits (`node::MAX_FORWARDS`, the
/// writer's queue).
pub const MAX_IN_FLIGHT: usize = 256;

/// The gate every client dialect's requests pass.
pub static CLIENTS: Gate = Gate::new(BODY_BUDGET_BYTES, MAX_IN_FLIGHT);

/// What a dialect allows for one request's body.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest body accepted; more is refused with [`BodyError::TooLarge`].
    pub max_bytes: usize,
    /// Time the whole body may take to arrive.
    pub deadline: Duration,
}

/// Why a body was not read.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the request body did not arrive within {after:?}")]
    Timeout { after: Duration },
    #[error("could not read the request body: {0}")]
    Read(String),
}

impl From<BodyError> for Error {
    fn from(e: BodyError) -> Self {
        let kind = match e {
            BodyError::TooLarge { .. } => ErrorKind::TooLarge,
            BodyError::Timeout { .. } => ErrorKind::Timeout,
            BodyError::Read(_) => ErrorKind::BadRequest,
        };
        Error::new(kind, e.to_string())
    }
}

/// A body budget and an in-flight limit. See the module doc.
pub struct Gate {
    budget: Semaphore,
    budget_bytes: usize,
    in_flight: Semaphore,
    in_flight_limit: usize,
}

/// Bytes of the body budget held by one request; given back when dropped.
#[must_use = "the budget is given back when the lease is dropped"]
pub struct Lease<'g> {
    permit: Option<SemaphorePermit<'g>>,
}

impl Lease<'_> {
    /// Bytes of budget this lease holds.
    pub fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }
}

/// A body read in full, with the budget it holds.
pub struct Buffered<'g> {
    bytes: Bytes,
    lease: Lease<'g>,
}

impl<'g> Buffered<'g> {
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Drops the bytes but keeps their budget, for what the dialect built from them.
    pub fn into_lease(self) -> Lease<'g> {
        self.lease
    }
}

/// A permit of the in-flight limit; the request counts as in flight until it is dropped.
#[must_use = "the request stops counting as in flight when the permit is dropped"]
pub struct InFlight<'g> {
    _permit: SemaphorePermit<'g>,
}

impl Gate {
    /// A gate with a budget of `budget_bytes` and `in_flight` permits.
    pub const fn new(budget_bytes: usize, in_flight: usize) -> Self {
        Self {
            budget: Semaphore::const_new(budget_bytes),
            budget_bytes,
            in_flight: Semaphore::const_new(in_flight),
            in_flight_limit: in_flight,
        }
    }

    /// Requests holding an in-flight permit now (the `/metrics` gauge).
    pub fn in_flight(&self) -> usize {
        self.in_flight_limit
            .saturating_sub(self.in_flight.available_permits())
    }

    /// Bytes of budget not held by any request now.
    pub fn available_budget(&self) -> usize {
        self.budget.available_permits()
    }

    /// Reads `body` in full under `limits` and this gate's budget (see the module doc).
    /// On any error the budget taken so far is given back.
    pub async fn read<B>(&self, mut body: B, limits: Limits) -> Result<Buffered<'_>, BodyError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut lease = Lease { permit: None };
        if body.is_end_stream() {
            return Ok(Buffered {
                bytes: Bytes::new(),
                lease,
            });
        }
        // A limit above the budget could never be met: the read would wait for ever.
        let max = limits.max_bytes.min(self.budget_bytes);
        let too_large = BodyError::TooLarge {
            limit: limits.max_bytes,
        };
        if body.size_hint().lower() > max as u64 {
            return Err(too_large);
        }
        let deadline = Instant::now() + limits.deadline;
        let timeout = BodyError::Timeout {
            after: limits.deadline,
        };
        // Created the first time the read has to wait, so a body that is already
        // there costs no timer.
        let mut timer: Option<Pin<Box<Sleep>>> = None;
        let mut first: Option<Bytes> = None;
        let mut joined: Vec<u8> = Vec::new();
        loop {
            let frame = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(frame) => Poll::Ready(Some(frame)),
                Poll::Pending => expired(&mut timer, deadline, cx).map(|()| None),
            })
            .await
            .ok_or_else(|| timeout.clone())?;
            let data = match frame {
                None => break,
                Some(Err(e)) => return Err(BodyError::Read(e.to_string())),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue, // trailers: nothing to keep
                },
            };
            if data.is_empty() {
                continue;
            }
            let held = first.as_ref().map_or(0, Bytes::len) + joined.len();
            let need = held + data.len();
            if need > max {
                return Err(too_large);
            }
            // What the request holds once this chunk is kept: the chunk itself while it is
            // the only one, then the capacity of the buffer the chunks are joined in
            // (doubled as it fills, never past the limit: at most twice what arrived).
            // Charged before the buffer grows.
            let (charge, grow_to) = if held == 0 {
                (data.len(), None)
            } else if need > joined.capacity() {
                let target = need.max(2 * joined.capacity()).min(max);
                (target, Some(target))
            } else {
                (joined.capacity(), None)
            };
            let more = charge.saturating_sub(lease.bytes());
            if more > 0 {
                self.take_budget(&mut lease, more, &mut timer, deadline)
                    .await
                    .map_err(|()| timeout.clone())?;
            }
            if held == 0 {
                first = Some(data);
            } else {
                if let Some(target) = grow_to {
                    joined.reserve_exact(target - joined.len());
                }
                if let Some(only) = first.take() {
                    joined.extend_from_slice(&only);
                }
                joined.extend_from_slice(&data);
            }
            if body.is_end_stream() {
                break;
            }
        }
        let bytes = match first {
            Some(only) => only,
            None => Bytes::from(joined),
        };
        Ok(Buffered { bytes, lease })
    }

    /// Adds `more` bytes of budget to `lease`, waiting for them until `deadline`.
    async fn take_budget<'g>(
        &'g self,
        lease: &mut Lease<'g>,
        more: usize,
        timer: &mut Option<Pin<Box<Sleep>>>,
        deadline: Instant,
    ) -> Result<(), ()> {
        // `more` is at most the budget (the limit is), which a u32 holds; a budget past
        // 4 GiB would be a broken configuration.
        let n = u32::try_from(more).map_err(|_| ())?;
        let permit = match self.budget.try_acquire_many(n) {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => {
                let acquire = self.budget.acquire_many(n);
                tokio::pin!(acquire);
                poll_fn(|cx| match acquire.as_mut().poll(cx) {
                    Poll::Ready(Ok(permit)) => Poll::Ready(Ok(permit)),
                    Poll::Ready(Err(_)) => Poll::Ready(Err(())),
                    Poll::Pending => expired(timer, deadline, cx).map(|()| Err(())),
                })
                .await?
            }
            // Never closed: the gate owns its semaphores and closes neither.
            Err(TryAcquireError::Closed) => return Err(()),
        };
        match &mut lease.permit {
            Some(held) => held.merge(permit),
            empty => *empty = Some(permit),
        }
        Ok(())
    }

    /// Waits for a permit of the in-flight limit.
    pub async fn enter(&self) -> InFlight<'_> {
        match self.in_flight.acquire().await {
            Ok(permit) => InFlight { _permit: permit },
            Err(_) => unreachable!("the gate never closes its in-flight semaphore"),
        }
    }
}

/// Ready once `deadline` has passed; arms `timer` the first time it is asked.
fn expired(
    timer: &mut Option<Pin<Box<Sleep>>>,
    deadline: Instant,
    cx: &mut std::task::Context<'_>,
) -> Poll<()> {
    timer
        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)))
        .as_mut()
        .poll(cx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::{Frame, SizeHint};
    use tokio::sync::mpsc;

    /// A body fed through a channel, with a chosen size hint (what `Content-Length`
    /// gives hyper's bodies).
    struct TestBody {
        rx: mpsc::UnboundedReceiver<Result<Bytes, String>>,
        hint: SizeHint,
        ended: bool,
    }

    fn channel(hint: SizeHint) -> (mpsc::UnboundedSender<Result<Bytes, String>>, TestBody) {
        let (tx, rx) = mpsc::unbounded_channel();
        let body = TestBody {
            rx,
            hint,
            ended: false,
        };
        (tx, body)
    }

    impl Body for TestBody {
        type Data = Bytes;
        type Error = String;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, String>>> {
            match self.rx.poll_recv(cx) {
                Poll::Ready(None) => {
                    self.ended = true;
                    Poll::Ready(None)
                }
                Poll::Ready(Some(item)) => Poll::Ready(Some(item.map(Frame::data))),
                Poll::Pending => Poll::Pending,
            }
        }

        fn is_end_stream(&self) -> bool {
            self.ended || self.hint.upper() == Some(0)
        }

        fn size_hint(&self) -> SizeHint {
            self.hint
        }
    }

    fn limits(max_bytes: usize, deadline_ms: u64) -> Limits {
        Limits {
            max_bytes,
            deadline: Duration::from_millis(deadline_ms),
        }
    }

    fn chunks(parts: &[&[u8]]) -> TestBody {
        let (tx, body) = channel(SizeHint::default());
        for part in parts {
            tx.send(Ok(Bytes::copy_from_slice(part))).expect("send");
        }
        body
    }

    #[tokio::test]
    async fn bodies_are_read_in_full_and_charged_to_the_budget() {
        let gate = Gate::new(1_000, 4);
        let one = gate
            .read(chunks(&[b"val=abc"]), limits(100, 1_000))
            .await
            .expect("one chunk");
        assert_eq!(&one.bytes()[..], b"val=abc");
        assert_eq!(gate.available_budget(), 1_000 - 7);
        let many = gate
            .read(chunks(&[b"val=", b"a", b"bc", b"&x=1"]), limits(100, 1_000))
            .await
            .expect("several chunks");
        assert_eq!(&many.bytes()[..], b"val=abc&x=1");
        let charged = 1_000 - 7 - gate.available_budget();
        assert!(
            (11..=22).contains(&charged),
            "a joined body is charged its buffer, at most twice its size: {charged}"
        );
        // The lease outlives the bytes; dropping it gives everything back.
        let lease = many.into_lease();
        assert_eq!(lease.bytes(), charged);
        drop(lease);
        drop(one);
        assert_eq!(gate.available_budget(), 1_000);
    }

    #[tokio::test]
    async fn an_empty_body_takes_nothing() {
        let gate = Gate::new(1_000, 4);
        let body = TestBody {
            rx: mpsc::unbounded_channel().1,
            hint: SizeHint::with_exact(0),
            ended: false,
        };
        let read = gate.read(body, limits(100, 1_000)).await.expect("empty");
        assert!(read.bytes().is_empty());
        assert_eq!(gate.available_budget(), 1_000);
    }

    #[tokio::test]
    async fn a_content_length_over_the_limit_is_refused_before_reading() {
        let gate = Gate::new(1_000, 4);
        // Nothing is ever sent: a reader that waited for the body would time out.
        let (_tx, body) = channel(SizeHint::with_exact(1_000_000_000_000_000_000));
        let started = std::time::Instant::now();
        let err = gate.read(body, limits(100, 5_000)).await.err();
        assert_eq!(err, Some(BodyError::TooLarge { limit: 100 }));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(gate.available_budget(), 1_000);
    }

    #[tokio::test]
    async fn a_streamed_body_over_the_limit_is_refused_and_gives_its_budget_back() {
        let gate = Gate::new(1_000, 4);
        let body = chunks(&[&[b'a'; 60], &[b'b'; 60]]);
        let err = gate.read(body, limits(100, 1_000)).await.err();
        assert_eq!(err, Some(BodyError::TooLarge { limit: 100 }));
        assert_eq!(gate.available_budget(), 1_000);
    }

    #[tokio::test]
    async fn a_limit_above_the_budget_is_capped_by_it() {
        let gate = Gate::new(50, 4);
        let err = gate
            .read(chunks(&[&[b'a'; 60]]), limits(100, 1_000))
            .await
            .err();
        assert_eq!(err, Some(BodyError::TooLarge { limit: 100 }));
        assert_eq!(gate.available_budget(), 50);
    }

    #[tokio::test]
    async fn a_slow_body_times_out_and_gives_its_budget_back() {
        let gate = Gate::new(1_000, 4);
        let (tx, body) = channel(SizeHint::with_exact(10));
        tx.send(Ok(Bytes::from_static(b"val="))).expect("send");
        let started = std::time::Instant::now();
        let err = gate.read(body, limits(100, 200)).await.err();
        assert_eq!(
            err,
            Some(BodyError::Timeout {
                after: Duration::from_millis(200)
            })
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(gate.available_budget(), 1_000);
    }

    #[tokio::test]
    async fn a_broken_body_is_a_read_error_and_gives_its_budget_back() {
        let gate = Gate::new(1_000, 4);
        let (tx, body) = channel(SizeHint::default());
        tx.send(Ok(Bytes::from_static(b"val=abc"))).expect("send");
        tx.send(Err("connection reset".into())).expect("send");
        let err = gate.read(body, limits(100, 1_000)).await.err();
        assert_eq!(
            err,
            Some(BodyError::Read("connection reset".into())),
            "the client's error is reported"
        );
        assert_eq!(gate.available_budget(), 1_000);
    }

    #[tokio::test]
    async fn a_read_waits_for_budget_until_its_deadline() {
        let gate = Gate::new(100, 4);
        let holder = gate
            .read(chunks(&[&[b'a'; 80]]), limits(100, 1_000))
            .await
            .expect("first body");
        // 50 more bytes do not fit: the read waits, and times out if nothing is given back.
        let err = gate
            .read(chunks(&[&[b'b'; 50]]), limits(100, 200))
            .await
            .err();
        assert!(matches!(err, Some(BodyError::Timeout { .. })), "{err:?}");
        assert_eq!(gate.available_budget(), 20);
        // Given back while it waits, the read goes through.
        let waiting = gate.read(chunks(&[&[b'b'; 50]]), limits(100, 5_000));
        let release = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(holder);
        };
        let (read, ()) = tokio::join!(waiting, release);
        let read = read.expect("read once the budget is back");
        assert_eq!(read.bytes().len(), 50);
        drop(read);
        assert_eq!(gate.available_budget(), 100);
    }

    #[tokio::test]
    async fn a_trickled_body_holds_only_what_arrived() {
        let gate = &Gate::new(1_000_000, 4);
        // It announces 4 KiB but sends ten bytes, one at a time.
        let (tx, body) = channel(SizeHint::with_exact(4_096));
        let read = gate.read(body, limits(10_000, 5_000));
        let trickle = async move {
            for _ in 0..10 {
                tx.send(Ok(Bytes::from_static(b"x"))).expect("send");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let held = 1_000_000 - gate.available_budget();
            drop(tx);
            held
        };
        let (read, held) = tokio::join!(read, trickle);
        assert!(
            (10..=20).contains(&held),
            "ten bytes arrived, {held} are charged"
        );
        assert_eq!(read.expect("read").bytes().len(), 10);
        assert_eq!(gate.available_budget(), 1_000_000);
    }

    #[tokio::test]
    async fn in_flight_permits_are_bounded() {
        let gate = Gate::new(1_000, 2);
        assert_eq!(gate.in_flight(), 0);
        let a = gate.enter().await;
        let _b = gate.enter().await;
        assert_eq!(gate.in_flight(), 2);
        let third = tokio::time::timeout(Duration::from_millis(50), gate.enter()).await;
        assert!(third.is_err(), "a third request must wait");
        drop(a);
        assert_eq!(gate.in_flight(), 1);
        let third = tokio::time::timeout(Duration::from_secs(5), gate.enter()).await;
        assert!(
            third.is_ok(),
            "a permit given back lets the next request in"
        );
    }
}
