//! The one Rust client of kvs: `kvs local`, `kvs bench` and the tests talk to nodes
//! through it.
//!
//! Two layers:
//!
//! * [`Client`] is the transport: one HTTP/1.1 request to one node (`ip:port`), built
//!   with [`Client::request`] and sent with [`Call::send`], answered by a [`Response`]
//!   (status and body bytes, [`Response::json`] to parse). Any method, path and query,
//!   headers, and a form, JSON or raw body.
//! * One small handle per client dialect, borrowed from a `Client` for one node:
//!   [`Client::kv_store`] ([`KvStore`], seeds 000/001) and [`Client::v1`] ([`V1`], the
//!   project's own API; only `status` so far). Each knows its paths, forms and content
//!   types, and nothing else; seed 002's `/key-value-store` and seed 003's `/kvs` go
//!   beside them as `key_value_store.rs` and `kvs.rs`.
//! * [`session::Session`]: a causal session of the own API that sends each key request
//!   straight to a replica of its partition (what the CLI and `kvs bench --direct` use).
//!
//! ```no_run
//! # async fn demo() -> Result<(), kvs::client::ClientError> {
//! let client = kvs::client::Client::new();
//! let node = client.kv_store("127.0.0.1:8080");
//! let reply = node.put("greeting", "hello", "").await?;
//! let body: serde_json::Value = reply.json()?;
//! let token = body["causal_payload"].as_str().unwrap_or_default();
//! let read = node.get("greeting", token).await?;
//! println!("{} {}", read.status, read.text());
//! # Ok(())
//! # }
//! ```
//!
//! # Design
//!
//! * **Every answer is an answer.** A 404 or a 503 is a [`Response`] like a 200: the seed
//!   dialects put their errors in JSON bodies that callers (tests above all) look at.
//!   [`ClientError`] is only for what is not an answer: the request could not be built,
//!   no connection, no (complete) answer in time, a connection that broke, a body over
//!   the cap, or a body that is not what the caller asked for ([`Response::json`]).
//! * **Bounded.** Every call has a deadline for the whole exchange, body included
//!   ([`Builder::timeout`], or [`Call::timeout`] per call), connecting has its own
//!   shorter one ([`Builder::connect_timeout`]), and a body is read up to
//!   [`Builder::max_body`] bytes, no further. Nothing in here panics on what a node sends.
//! * **Pooled.** hyper-util's pooled client, as the node-to-node transport uses: a
//!   connection is reused by the next call to the same node. Idle connections are closed
//!   after 20 s ([`Builder::pool_idle_timeout`]), below the server's 30 s, so a call is not
//!   sent on a connection the server is closing. `Client` is cheap to clone; clones share
//!   the pool.
//! * **Cheap on the hot path** (`kvs bench`): a call makes one string for the URI (paths
//!   are formatted straight into it: [`Client::request`] takes any `Display`), one for a
//!   form body (sized up front), the header map, and the node address of the
//!   [`Response`]; the body is hyper's buffer, and [`Response::json`] can borrow from it.
//!   Measured with valgrind's DHAT, a `kvs bench` request costs 25 heap allocations in all
//!   (hyper's included), where bench's own client took 38 to 41.
//! * **Plain.** No retries, no redirects, no proxies, no cookies, no compression, no TLS:
//!   the nodes speak plain HTTP/1.1 on addresses the caller names. (hyper does resend a
//!   request it found it could not start on a pooled connection that had closed.)
//!
//! # Caveats
//!
//! * A call that times out or fails after it was sent may or may not have taken effect
//!   at the node; the client does not retry, the caller decides.
//! * The dialect handles put keys into paths as given, so tests can send invalid ones;
//!   valid keys (`[A-Za-z0-9_]`) need no escaping, and a key that makes the URI invalid
//!   is a [`ClientError::InvalidRequest`].
//! * A pooled connection to a node that went away can fail the next call on it: when
//!   the node vanished without closing it (SIGSTOP, a cut network), or when the call
//!   races the node's close. Callers that kill and restart nodes under the client's feet
//!   (the tests) turn pooling off with `pool_max_idle_per_host(0)`.
//! * A server that answers before it has read the whole request body (an early 413) may
//!   show up as [`ClientError::Transport`] (a broken pipe) instead of the answer; the
//!   tests keep a raw-socket client for that case.

mod kv_store;
pub mod session;
mod v1;

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

pub use hyper::header;
pub use hyper::{Method, StatusCode};
pub use kv_store::KvStore;
pub use v1::V1;

/// Default deadline of a whole call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default deadline for making a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default cap on a response body: a `/kv-store` value is at most 2 MiB, and JSON may
/// escape each byte into six.
pub const DEFAULT_MAX_BODY: usize = 16 * 1024 * 1024;
/// Default time an idle pooled connection is kept: below the server's idle timeout
/// (`IDLE_TIMEOUT`, 30 s), like the node-to-node transport's.
pub const DEFAULT_POOL_IDLE: Duration = Duration::from_secs(20);

/// Content type of form bodies (the `/kv-store` dialect).
pub const FORM: &str = "application/x-www-form-urlencoded";
/// Content type of JSON bodies.
pub const JSON: &str = "application/json";

/// Bytes of a body quoted in an error.
const EXCERPT: usize = 300;

/// Why a call got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The request could not be built (a bad address, path, header or body); nothing
    /// was sent.
    #[error("invalid request to {addr}: {reason}")]
    InvalidRequest { addr: String, reason: String },
    /// No connection to the node: refused, unreachable, or not made within the connect
    /// timeout. Nothing was sent.
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// No complete answer within the call's deadline.
    #[error("no answer from {addr} within {after:?}")]
    Timeout { addr: String, after: Duration },
    /// The exchange failed once connected: the connection was reset or closed before
    /// the whole answer came, or the answer was not HTTP. The request may have been
    /// acted on.
    #[error("connection to {addr} failed: {reason}")]
    Transport { addr: String, reason: String },
    /// The answer's body is longer than the cap (`limit` bytes); the rest was not read.
    #[error("{addr} answered {status} with a body over {limit} bytes")]
    TooLarge {
        addr: String,
        status: u16,
        limit: usize,
    },
    /// The node answered, but not what the caller can use (e.g. not JSON): the status,
    /// why, and the start of the body.
    #[error("{addr} answered {status}, {reason}: {body:?}")]
    BadAnswer {
        addr: String,
        status: u16,
        reason: String,
        body: String,
    },
}

/// Settings of a [`Client`]; [`Client::builder`] starts from the defaults.
#[derive(Clone, Debug)]
pub struct Builder {
    timeout: Duration,
    connect_timeout: Duration,
    max_body: usize,
    pool_idle_timeout: Duration,
    pool_max_idle_per_host: usize,
    local_address: Option<IpAddr>,
    admin_token: Option<String>,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
            pool_idle_timeout: DEFAULT_POOL_IDLE,
            pool_max_idle_per_host: usize::MAX,
            local_address: None,
            admin_token: None,
        }
    }
}

impl Builder {
    /// Deadline of a whole call (connect, send, answer, body), unless the call sets its own.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Deadline for making a connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Longest response body read; a longer one is [`ClientError::TooLarge`].
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// How long an idle connection stays in the pool.
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    /// Idle connections kept per node; 0 makes every call use a fresh connection.
    pub fn pool_max_idle_per_host(mut self, n: usize) -> Self {
        self.pool_max_idle_per_host = n;
        self
    }

    /// Connections leave from this local address (a node's own IP, or a test posing as
    /// another host on loopback).
    pub fn local_address(mut self, ip: Option<IpAddr>) -> Self {
        self.local_address = ip;
        self
    }

    /// The cluster's `ADMIN_TOKEN`, sent as `Authorization: Bearer <token>` with the
    /// dialects' membership changes (e.g. [`KvStore::update_view`]). Empty means none.
    pub fn admin_token(mut self, token: Option<String>) -> Self {
        self.admin_token = token.filter(|t| !t.is_empty());
        self
    }

    pub fn build(self) -> Client {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(self.connect_timeout));
        connector.set_local_address(self.local_address);
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.pool_idle_timeout)
            .pool_max_idle_per_host(self.pool_max_idle_per_host)
            .build(connector);
        Client {
            http,
            timeout: self.timeout,
            max_body: self.max_body,
            admin_token: self.admin_token,
        }
    }
}

/// An HTTP client for kvs nodes. Cheap to clone: clones share the connection pool.
#[derive(Clone, Debug)]
pub struct Client {
    http: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    max_body: usize,
    admin_token: Option<String>,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    /// A client with the default settings.
    pub fn new() -> Self {
        Builder::default().build()
    }

    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The `/kv-store` dialect (seeds 000/001) of node `addr` (`ip:port`).
    pub fn kv_store<'a>(&'a self, addr: &'a str) -> KvStore<'a> {
        KvStore::new(self, addr)
    }

    /// The project's own API (`/api/v1`) of node `addr` (`ip:port`).
    pub fn v1<'a>(&'a self, addr: &'a str) -> V1<'a> {
        V1::new(self, addr)
    }

    /// Starts a request `method http://<addr><path>`; `path` starts with `/` and may end
    /// in a query (`/kv-store/update_view?type=add`). It is formatted straight into the
    /// URI, so `format_args!` costs no string of its own.
    pub fn request<'a>(
        &'a self,
        method: Method,
        addr: &'a str,
        path: impl fmt::Display,
    ) -> Call<'a> {
        let uri = format!("http://{addr}{path}");
        let mut error = None;
        if addr.is_empty() || addr.bytes().any(|b| b"/?#@".contains(&b) || b <= b' ') {
            error = Some(format!("{addr:?} is not an ip:port address"));
        } else if !uri[7 + addr.len()..].starts_with('/') {
            error = Some(format!(
                "the path {:?} does not start with '/'",
                &uri[7 + addr.len()..]
            ));
        }
        Call {
            client: self,
            addr,
            request: hyper::Request::builder().method(method).uri(uri),
            body: Bytes::new(),
            timeout: self.timeout,
            error,
        }
    }

    /// The admin token given to the builder, if any.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// Sends `request`, reads the answer up to the cap. No deadline of its own.
    async fn exchange(
        &self,
        addr: &str,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<Response, ClientError> {
        let response = self.http.request(request).await.map_err(|e| {
            let reason = chain(&e);
            if e.is_connect() {
                ClientError::Connect {
                    addr: addr.to_owned(),
                    reason,
                }
            } else {
                ClientError::Transport {
                    addr: addr.to_owned(),
                    reason,
                }
            }
        })?;
        let status = response.status();
        let too_large = || ClientError::TooLarge {
            addr: addr.to_owned(),
            status: status.as_u16(),
            limit: self.max_body,
        };
        let announced = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > self.max_body as u64) {
            return Err(too_large());
        }
        let body = Limited::new(response.into_body(), self.max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<LengthLimitError>().is_some() {
                    too_large()
                } else {
                    ClientError::Transport {
                        addr: addr.to_owned(),
                        reason: chain(&*e),
                    }
                }
            })?
            .to_bytes();
        Ok(Response {
            addr: addr.to_owned(),
            status,
            body,
        })
    }
}

/// An error and its sources, `outer: inner: ...` (hyper's own message alone is terse).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A request being built; [`Call::send`] sends it. Errors in building (a header that
/// is not valid) surface from `send` as [`ClientError::InvalidRequest`].
#[must_use = "a call does nothing until it is sent"]
pub struct Call<'a> {
    client: &'a Client,
    addr: &'a str,
    request: hyper::http::request::Builder,
    body: Bytes,
    timeout: Duration,
    error: Option<String>,
}

impl Call<'_> {
    /// Adds a header (appended: a name given twice is sent twice).
    pub fn header<K, V>(mut self, name: K, value: V) -> Self
    where
        K: TryInto<HeaderName>,
        <K as TryInto<HeaderName>>::Error: Into<hyper::http::Error>,
        V: TryInto<HeaderValue>,
        <V as TryInto<HeaderValue>>::Error: Into<hyper::http::Error>,
    {
        self.request = self.request.header(name, value);
        self
    }

    /// `Authorization: Bearer <token>`.
    pub fn bearer(self, token: &str) -> Self {
        self.header(AUTHORIZATION, format!("Bearer {token}"))
    }

    /// A form body (`application/x-www-form-urlencoded`) of these fields, in order.
    pub fn form(self, fields: &[(&str, &str)]) -> Self {
        self.form_encoded(encode_form(fields))
    }

    /// A body that is already form-encoded, sent as it is with the form content type.
    pub fn form_encoded(self, body: impl Into<Bytes>) -> Self {
        self.body_with_type(FORM, body.into())
    }

    /// `value` as a JSON body (`application/json`).
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => self.body_with_type(JSON, body.into()),
            Err(e) => {
                self.error
                    .get_or_insert(format!("cannot encode the JSON body: {e}"));
                self
            }
        }
    }

    /// A raw body, with no content type (add one with [`Call::header`] if it needs one).
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// This call's deadline instead of the client's.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn body_with_type(mut self, content_type: &'static str, body: Bytes) -> Self {
        if let Some(headers) = self.request.headers_mut() {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        }
        self.body = body;
        self
    }

    /// Sends the request and reads the whole answer, within the deadline.
    pub async fn send(self) -> Result<Response, ClientError> {
        let Call {
            client,
            addr,
            request,
            body,
            timeout,
            error,
        } = self;
        let invalid = |reason: String| ClientError::InvalidRequest {
            addr: addr.to_owned(),
            reason,
        };
        if let Some(reason) = error {
            return Err(invalid(reason));
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| invalid(e.to_string()))?;
        match tokio::time::timeout(timeout, client.exchange(addr, request)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                addr: addr.to_owned(),
                after: timeout,
            }),
        }
    }
}

/// Encodes `fields` as `application/x-www-form-urlencoded`, in order.
pub fn encode_form(fields: &[(&str, &str)]) -> String {
    let size: usize = fields.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    form_urlencoded::Serializer::new(String::with_capacity(size))
        .extend_pairs(fields)
        .finish()
}

/// A node's answer: whatever its status.
#[derive(Clone, Debug)]
pub struct Response {
    /// The node that answered.
    pub addr: String,
    pub status: StatusCode,
    pub body: Bytes,
}

impl Response {
    /// The body parsed as JSON: a [`serde_json::Value`], or any type that deserializes
    /// (and may borrow from the body). Not JSON of that shape: [`ClientError::BadAnswer`].
    pub fn json<'de, T: Deserialize<'de>>(&'de self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| self.bad_answer(&format!("not the JSON expected ({e})")))
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    /// A [`ClientError::BadAnswer`] about this answer: its status, `reason`, and the
    /// start of its body.
    pub fn bad_answer(&self, reason: &str) -> ClientError {
        ClientError::BadAnswer {
            addr: self.addr.clone(),
            status: self.status.as_u16(),
            reason: reason.to_owned(),
            body: String::from_utf8_lossy(&self.body[..self.body.len().min(EXCERPT)]).into_owned(),
        }
    }
}

#[cfg(test)]
mod tests;
