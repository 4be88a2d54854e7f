//! The HTTP surface of a node: the client dialects, the status endpoint and the
//! internal endpoint peers call.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, Limited};
use serde_json::json;

use super::{Node, Refusal};
use crate::placement::Role;
use crate::rpc::{self, Envelope};

/// Path of the status endpoint (JSON; read-only, no secret needed).
pub const STATUS_PATH: &str = "/api/v1/status";

/// The whole HTTP surface of a node.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route(rpc::RPC_PATH, post(rpc_endpoint))
        .route(STATUS_PATH, get(status_endpoint))
        .merge(crate::api::kv_store::router())
        .fallback(crate::api::kv_store::unknown_path)
        .with_state(node)
}

/// Serves `node` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Arc<Node>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(node).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// `GET /api/v1/status`: whether the node is ready (a member holding the cluster key, or
/// a node in no cluster), its view, role, transition, the progress of the view change it
/// coordinates, and what its failure detector believes about each peer. What `kvs local`
/// polls to show a rebalance.
async fn status_endpoint(State(node): State<Arc<Node>>) -> HttpResponse {
    let cur = node.current();
    let keys = node
        .store
        .read()
        .and_then(|t| t.key_count())
        .map_err(|e| e.to_string());
    let view = cur.view.as_ref().map(|v| {
        json!({
            "epoch": v.epoch,
            "k": v.k,
            "members": v.members,
            "partitions": v.partitions.iter().enumerate().map(|(i, p)| json!({
                "partition_id": i,
                "uid": p.uid,
                "members": p.replicas,
                "slots": v.slots.iter().filter(|&&u| u == p.uid).count(),
            })).collect::<Vec<_>>(),
        })
    });
    let (role, partition_id) = match cur.view.as_ref().and_then(|v| v.role_of(&node.addr)) {
        Some(Role::Replica(uid)) => (
            "replica",
            cur.view
                .as_ref()
                .and_then(|v| v.index_of(uid))
                .map(i64::from),
        ),
        Some(Role::Proxy) => ("proxy", None),
        None => ("none", None),
    };
    // A member is ready to serve once it holds the cluster key; a node in no cluster
    // has nothing to wait for.
    let ready = (cur.view.is_none() && cur.transition.is_none()) || node.keys().is_some();
    let body = json!({
        "node": node.addr,
        "ready": ready,
        "epoch": cur.epoch(),
        "role": role,
        "partition_id": partition_id,
        "keys": keys.ok(),
        "view": view,
        "transition": cur.transition.as_ref().map(|t| json!({
            "change": t.proposal.change.to_string(),
            "from_epoch": t.from().epoch,
            "to_epoch": t.to().epoch,
        })),
        "view_change": node.progress(),
        "disk": node.disk_health(),
        "peers": node.peer_health(),
    });
    (StatusCode::OK, Json(body)).into_response()
}

async fn rpc_endpoint(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Body,
) -> HttpResponse {
    let given = headers
        .get(rpc::SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !crate::auth::secrets_match(given, node.secret.as_bytes()) {
        return (StatusCode::UNAUTHORIZED, "bad or missing cluster secret").into_response();
    }
    if headers.get(rpc::PROTO_HEADER).map(|v| v.as_bytes())
        != Some(rpc::PROTOCOL_VERSION.as_bytes())
    {
        return (
            StatusCode::BAD_REQUEST,
            "unsupported internal protocol version",
        )
            .into_response();
    }
    let bytes = match Limited::new(body, rpc::MAX_RPC_BYTES).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return (StatusCode::PAYLOAD_TOO_LARGE, "internal message too large").into_response()
        }
    };
    let env: Envelope = match rpc::decode(&bytes) {
        Ok(env) => env,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("undecodable message: {e}")).into_response()
        }
    };
    let proof = headers.get(rpc::MEMBER_HEADER).map(|v| v.as_bytes());
    match node.admit(&env, proof) {
        Ok(()) => {}
        Err(Refusal::NotAMember(why)) => return (StatusCode::FORBIDDEN, why).into_response(),
        Err(Refusal::NotReady(why)) => {
            return (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
        }
    }
    let resp = node.handle_rpc(env).await;
    (
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        rpc::encode(&resp),
    )
        .into_response()
}
