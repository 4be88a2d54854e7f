//! The HTTP surface of a node: one router for the client dialects, the status endpoint
//! and the internal endpoint peers call, and the loop that serves connections.
//!
//! # Design
//!
//! Every client request goes through one path, whatever its dialect:
//!
//! 1. [`api::dialect_of`] names the dialect that owns the path (`/kv-store/...`,
//!    `/key-value-store...`); a path no dialect owns gets the one 404 of
//!    [`api::unknown_path`].
//! 2. The body is read through the node-wide gate of [`body`] (size limit of the
//!    dialect, deadline, memory budget), then decoded the way the dialect takes it: form
//!    fields ([`form`]; query and body merged, the body wins) or a JSON document (query
//!    fields apart).
//! 3. The request takes one permit of the node-wide in-flight limit, the same for every
//!    dialect, and the dialect's handler runs with the decoded [`api::Request`]. The
//!    body's budget and the permit are held until the handler answers.
//!
//! Errors of steps 2 and 3 are answered in the dialect's own error shape. Nothing in this
//! module knows an endpoint, a field or a status code of a dialect; nothing in `api`
//! reads sockets or bodies.
//!
//! Every client request is counted and timed by dialect, endpoint (the dialect's own
//! name for it, `Dialect::endpoint_of`) and status ([`metrics`]).
//!
//! * [`server`]: accepting connections and the limits on each (time, size, number).
//! * [`internal`]: the endpoint peers call, and [`stream`]: the streams they open to
//!   multiplex their frequent calls (`rpc::stream`).
//! * `GET` [`STATUS_PATH`]: the node's own status (`Node::status_report`).
//! * `GET` [`METRICS_PATH`]: its metrics, in the Prometheus text format ([`metrics`]).
//! * `GET /`: the live status page ([`status_page`]); other methods on `/` get the
//!   dialects' 404 like any path no one owns.

pub mod body;
pub mod form;
mod internal;
pub mod metrics;
mod server;
pub mod status_page;
mod stream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

pub use server::{serve, IDLE_TIMEOUT, IDLE_TIMEOUT_ENV, MAX_CONNECTIONS, MAX_HEAD_BYTES};

use crate::api::{self, BodyFormat, Dialect};
use crate::error::Error;
use crate::metric_names::NO_DIALECT;
use crate::node::Node;
use crate::rpc;

/// Path of the status endpoint (JSON; read-only, no secret needed).
pub const STATUS_PATH: &str = "/api/v1/status";
/// Path of the metrics endpoint (Prometheus text; read-only, no secret needed).
pub const METRICS_PATH: &str = "/metrics";

/// The whole HTTP surface of a node.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route(rpc::RPC_PATH, post(internal::rpc_endpoint))
        .route(rpc::stream::STREAM_PATH, get(stream::stream_endpoint))
        .route(STATUS_PATH, get(status_endpoint))
        .route(METRICS_PATH, get(metrics::endpoint))
        .route("/", get(status_page::page).fallback(client_request))
        .fallback(client_request)
        .with_state(node)
}

async fn status_endpoint(State(node): State<Arc<Node>>) -> Response {
    (StatusCode::OK, Json(node.status_report())).into_response()
}

/// Every request that is not the node's own: admitted through the gate, decoded and
/// handed to the dialect that owns its path (see the module doc), then counted.
async fn client_request(State(node): State<Arc<Node>>, request: Request) -> Response {
    let arrived = Instant::now();
    let (parts, body) = request.into_parts();
    let dialect = api::dialect_of(parts.uri.path());
    let (name, endpoint) = match dialect {
        Some(d) => (d.name, (d.endpoint_of)(&parts.method, parts.uri.path())),
        None => (NO_DIALECT, NO_DIALECT),
    };
    let response = match dialect {
        Some(dialect) => serve_client(node, dialect, parts, body).await,
        None => api::unknown_path(),
    };
    metrics::record_request(name, endpoint, response.status(), arrived.elapsed());
    response
}

/// Steps 2 and 3 of the module doc for a request `dialect` owns.
async fn serve_client(
    node: Arc<Node>,
    dialect: &'static Dialect,
    parts: axum::http::request::Parts,
    body: axum::body::Body,
) -> Response {
    let gate = &body::CLIENTS;
    let limits = body::Limits {
        max_bytes: dialect.max_body_bytes,
        deadline: body::BODY_TIMEOUT,
    };
    let buffered = match gate.read(body, limits).await {
        Ok(b) => b,
        Err(e) => return (dialect.error)(e.into()),
    };
    let decoded = decode(dialect, parts.uri.query(), buffered.bytes());
    // The decoded fields are no larger than the body (decoding only shrinks), so the
    // body's budget stands for them until the answer.
    let _budget = buffered.into_lease();
    let (fields, json) = match decoded {
        Ok(d) => d,
        Err(e) => return (dialect.error)(e),
    };
    let _in_flight = gate.enter().await;
    (dialect.handle)(
        node,
        api::Request {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            headers: parts.headers,
            fields,
            json,
        },
    )
    .await
}

/// The fields and JSON document of a request, as its dialect takes them.
fn decode(
    dialect: &Dialect,
    query: Option<&str>,
    body: &[u8],
) -> Result<(HashMap<String, String>, serde_json::Value), Error> {
    let mut fields = HashMap::new();
    if let Some(query) = query {
        form::parse_form(query.as_bytes(), &mut fields)?;
    }
    let json = match dialect.format {
        BodyFormat::Form => {
            form::parse_form(body, &mut fields)?;
            serde_json::Value::Null
        }
        BodyFormat::Json if body.iter().all(u8::is_ascii_whitespace) => serde_json::Value::Null,
        BodyFormat::Json => serde_json::from_slice(body)
            .map_err(|e| Error::bad_request(format!("the body is not valid JSON: {e}")))?,
    };
    Ok((fields, json))
}
