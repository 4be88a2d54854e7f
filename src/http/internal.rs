//! The internal endpoint peers call (`POST` [`rpc::RPC_PATH`]): the outer gate of the
//! cluster secret and the protocol version, a body bounded by whether the caller proves
//! membership, then the node's admission rules (`node::keys`) and its dispatch.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use http_body_util::{BodyExt, Limited};

use crate::node::{Node, Refusal};
use crate::rpc::{self, Envelope};

pub(super) async fn rpc_endpoint(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Body,
) -> HttpResponse {
    if let Err(refusal) = outer_gate(&node, &headers) {
        return refusal.into_response();
    }
    // Members' calls may be large (sync pages); anyone else's must be small, and every
    // body must arrive in time, so that callers without the cluster key hold little
    // memory and no connection for long.
    let proof = headers.get(rpc::MEMBER_HEADER).map(|v| v.as_bytes());
    let limit = if node.proves_membership(proof) {
        rpc::MAX_RPC_BYTES
    } else {
        rpc::MAX_UNPROVEN_RPC_BYTES
    };
    let bytes = match tokio::time::timeout(
        rpc::RPC_BODY_TIMEOUT,
        Limited::new(body, limit).collect(),
    )
    .await
    {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(_)) => {
            return (StatusCode::PAYLOAD_TOO_LARGE, "internal message too large").into_response()
        }
        Err(_) => {
            return (
                StatusCode::REQUEST_TIMEOUT,
                "internal message body too slow",
            )
                .into_response()
        }
    };
    let env: Envelope = match rpc::decode(&bytes) {
        Ok(env) => env,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("undecodable message: {e}")).into_response()
        }
    };
    if let Err(refusal) = node.admit(&env, proof) {
        return refusal_status(refusal).into_response();
    }
    let resp = node.handle_rpc(env).await;
    (
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        rpc::encode(&resp),
    )
        .into_response()
}

/// The cluster secret and the protocol version, which every internal call and every
/// stream must present.
pub(super) fn outer_gate(
    node: &Node,
    headers: &HeaderMap,
) -> Result<(), (StatusCode, &'static str)> {
    let given = headers
        .get(rpc::SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !node.secret_matches(given) {
        return Err((StatusCode::UNAUTHORIZED, "bad or missing cluster secret"));
    }
    if headers.get(rpc::PROTO_HEADER).map(|v| v.as_bytes())
        != Some(rpc::PROTOCOL_VERSION.as_bytes())
    {
        return Err((
            StatusCode::BAD_REQUEST,
            "unsupported internal protocol version",
        ));
    }
    Ok(())
}

/// What a refusal of `Node::admit` answers: its status, and the text a stream carries.
pub(super) fn refusal_status(refusal: Refusal) -> (StatusCode, String) {
    match refusal {
        Refusal::NotAMember(why) => (StatusCode::FORBIDDEN, why),
        Refusal::NotReady(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}
