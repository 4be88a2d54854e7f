//! The receiving end of a peer's stream (`GET` [`rpc::stream::STREAM_PATH`], upgraded):
//! the frame protocol and why it exists are in `rpc::stream`.
//!
//! The upgrade passes the internal endpoint's outer gate (secret, protocol version) and
//! must prove membership. After it, each call frame is checked as an HTTP call would be:
//! the proof the stream was opened with must still be this node's (the key can change
//! when the node leaves one cluster and joins another; the stream is closed then), then
//! `Node::admit`, then the call is served in a task of its own and its answer queued for
//! the stream's writer. At most [`stream::MAX_IN_FLIGHT`] calls are served at once per
//! stream: beyond that the loop stops reading, and the caller's writes wait in TCP.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{CONNECTION, UPGRADE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response as HttpResponse};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, BufReader};
use tokio::sync::{mpsc, Semaphore};

use super::internal::{outer_gate, refusal_status};
use crate::metric_names as names;
use crate::node::Node;
use crate::rpc::stream::{self, frame, read_frame, write_frames, ANSWER, REFUSED};
use crate::rpc::{self, Envelope};

pub(super) async fn stream_endpoint(
    State(node): State<Arc<Node>>,
    mut request: Request,
) -> HttpResponse {
    if let Err(refusal) = outer_gate(&node, request.headers()) {
        return refusal.into_response();
    }
    let proof = request
        .headers()
        .get(rpc::MEMBER_HEADER)
        .map(|v| v.as_bytes().to_vec());
    if !node.proves_membership(proof.as_deref()) {
        return (
            StatusCode::FORBIDDEN,
            "streams are for members of this node's cluster",
        )
            .into_response();
    }
    let Some(proof) = proof else {
        // proves_membership is false without a proof.
        return StatusCode::FORBIDDEN.into_response();
    };
    let token = stream::upgrade_token();
    if request.headers().get(UPGRADE).map(|v| v.as_bytes()) != Some(token.as_bytes()) {
        return (
            StatusCode::BAD_REQUEST,
            format!("expected Upgrade: {token}"),
        )
            .into_response();
    }
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => serve(node, TokioIo::new(upgraded), proof).await,
            Err(e) => tracing::debug!("stream upgrade failed: {e}"),
        }
    });
    let mut response = HttpResponse::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response
        .headers_mut()
        .insert(CONNECTION, axum::http::HeaderValue::from_static("upgrade"));
    if let Ok(value) = axum::http::HeaderValue::from_str(&token) {
        response.headers_mut().insert(UPGRADE, value);
    }
    response
}

/// Serves the calls of one stream until the caller closes it, it idles for
/// [`stream::SERVER_IDLE`], the caller's proof stops being valid, or the stream fails.
async fn serve<S>(node: Arc<Node>, io: S, proof: Vec<u8>)
where
    S: AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(io);
    let (answers, queue) = mpsc::channel(stream::QUEUE);
    let mut writer = tokio::spawn(write_frames(write, queue));
    let outcome = tokio::select! {
        r = read_calls(&node, read, &proof, answers) => r,
        r = &mut writer => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        },
    };
    if let Err(e) = outcome {
        tracing::debug!("stream from a peer closed: {e}");
    }
    // The reader is done; the writer finishes the answers of calls still being served
    // (it ends when the last of them drops its sender), bounded by the connection's
    // write-stall timeout.
    if !writer.is_finished() {
        let _ = writer.await;
    }
}

async fn read_calls<R: AsyncRead + Unpin>(
    node: &Arc<Node>,
    read: R,
    proof: &[u8],
    answers: mpsc::Sender<Vec<u8>>,
) -> Result<(), String> {
    let mut read = BufReader::with_capacity(64 * 1024, read);
    let in_flight = Arc::new(Semaphore::new(stream::MAX_IN_FLIGHT));
    loop {
        let next = tokio::time::timeout(
            stream::SERVER_IDLE,
            read_frame(&mut read, rpc::MAX_RPC_BYTES),
        )
        .await;
        let call = match next {
            Ok(Ok(Some(call))) => call,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("idle for {:?}", stream::SERVER_IDLE)),
        };
        if !node.proves_membership(Some(proof)) {
            return Err("the caller's member proof is no longer valid".into());
        }
        let refuse = |status: StatusCode, why: &str| {
            frame(call.id, REFUSED, format!("{status}: {why}").as_bytes())
        };
        let env: Envelope = match rpc::decode(&call.payload) {
            Ok(env) => env,
            Err(e) => {
                let answer = refuse(
                    StatusCode::BAD_REQUEST,
                    &format!("undecodable message: {e}"),
                );
                answers.send(answer).await.map_err(|e| e.to_string())?;
                continue;
            }
        };
        if let Err(refusal) = node.admit(&env, Some(proof)) {
            let (status, why) = refusal_status(refusal);
            answers
                .send(refuse(status, &why))
                .await
                .map_err(|e| e.to_string())?;
            continue;
        }
        metrics::counter!(names::RPC_STREAM_CALLS_TOTAL).increment(1);
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let node = node.clone();
        let answers = answers.clone();
        let id = call.id;
        tokio::spawn(async move {
            let response = node.handle_rpc(env).await;
            // The stream may have closed meanwhile: the answer has nowhere to go.
            let _ = answers
                .send(frame(id, ANSWER, &rpc::encode(&response)))
                .await;
            drop(permit);
        });
    }
}
