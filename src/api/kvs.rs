//! The `/kvs` dialect of seed 003 (sharded, optionally replicated, whole-view changes).
//!
//! # Contract
//!
//! Bodies are JSON; every answer is a JSON object with `"message"`. Shard ids are
//! strings counted from `"1"` (the shard clients of the other dialects call index 0 is
//! `"1"` here), key counts numbers, replica lists arrays of `ip:port`.
//!
//! | request | answer |
//! |---|---|
//! | `PUT /kvs/keys/<key>` `{"value","causal-context"?}` | 201 `{"message":"Added successfully","replaced":false}` / 200 `"Updated successfully"`, `"replaced":true` |
//! | `GET /kvs/keys/<key>` `{"causal-context"?}` | 200 `{"doesExist":true,"message":"Retrieved successfully","value"}`; 404 `doesExist: false` |
//! | `DELETE /kvs/keys/<key>` `{"causal-context"?}` | 200 `{"doesExist":true,"message":"Deleted successfully"}`; 404 as GET |
//! | `GET /kvs/key-count` | 200 `key-count` and `shard-id` of this node's shard; 404 for a node in no shard |
//! | `GET /kvs/shards` | 200 `shards`: the ids |
//! | `GET /kvs/shards/<id>` | 200 `shard-id`, `key-count`, `replicas`; 404 unknown shard |
//! | `PUT /kvs/view-change` `{"view","repl-factor"?}` | 200 `shards`: `[{shard-id, key-count, replicas}]` (+ `address` for a shard of one replica) |
//!
//! Every key answer, errors included, carries `"causal-context"`, the object the client
//! sends with its next request, and `"address"` of the replica that served it when, and
//! only when, the node that received the request passed it to another node. Errors are
//! `{"error": <what>, "message": "Error in <METHOD>"}`: 400 for bad input (`"Value is
//! missing"`, `"Key is too long"`), and `"Unable to satisfy request"` with 503 when no
//! replica of the key's shard could be reached, or 400 when the replicas reachable have
//! not received writes the client's context depends on (see `ErrorKind::Unsatisfiable`).
//! Keys are 1 to [`MAX_KEY_CHARS`] characters (the rest of the path, percent-decoded).
//!
//! # Causal context
//!
//! The context is `{"token": <the cluster's causal token>}` (opaque to clients, signed
//! by the cluster key like every dialect's token). `{}`, a missing or `null` context, and
//! an object without `"token"` are the empty context; a bare token string is accepted
//! too. Consistency is the node's: a read never returns a value older than what the
//! context covers, across shards and view changes.
//!
//! # View changes
//!
//! `view-change` replaces the whole member list in one change ([`Change::Replace`]):
//! nodes join and leave at once and the replication factor may change; without
//! `repl-factor` the cluster keeps its own. The answer comes once every node is in the
//! new view and every moved key is on its new replicas. Nodes joining must be running
//! and blank (started with the new `VIEW`: they wait for the change, see `node::join`).
//! It is an admin operation: with `ADMIN_TOKEN` set it needs `Authorization: Bearer`.

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::{json_reply as ok, Answer, BodyFormat, Dialect, Request, INVALID_ENDPOINT};
use crate::clock::CausalToken;
use crate::error::{Error, ErrorKind};
use crate::node::{Node, MAX_VALUE_BYTES};
use crate::placement::{parse_view_list, Change, Role, View};

/// Longest key accepted, in characters.
pub const MAX_KEY_CHARS: usize = 50;
/// Largest request body: a [`MAX_VALUE_BYTES`] value however JSON escapes it, plus the
/// context.
pub const MAX_BODY_BYTES: usize = 3 * MAX_VALUE_BYTES + 64 * 1024;
const PREFIX: &str = "/kvs/";
const KEYS: &str = "keys/";
/// The seed's error text for a request no replica could serve.
const UNSATISFIABLE: &str = "Unable to satisfy request";
/// The field of the context object that holds the token.
const TOKEN: &str = "token";

/// This dialect, as the HTTP layer sees it.
pub const DIALECT: Dialect = Dialect {
    name: "kvs",
    owns: |path| path.starts_with(PREFIX),
    format: BodyFormat::Json,
    max_body_bytes: MAX_BODY_BYTES,
    handle: |node, request| Box::pin(handle(node, request)) as Answer,
    error: |e| error_response(e, "request"),
    endpoint_of: |method, path| {
        Endpoint::parse(method, path).map_or(INVALID_ENDPOINT, |e| e.name())
    },
};

/// The endpoints of this dialect.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    GetKey(String),
    PutKey(String),
    DeleteKey(String),
    KeyCount,
    Shards,
    /// A shard by the index clients of the other dialects see (the id minus one).
    Shard(u32),
    ViewChange,
}

impl Endpoint {
    /// The endpoint's name in the request metrics (`Dialect::endpoint_of`).
    fn name(&self) -> &'static str {
        match self {
            Endpoint::GetKey(_) => "get",
            Endpoint::PutKey(_) => "put",
            Endpoint::DeleteKey(_) => "delete",
            Endpoint::KeyCount => "key_count",
            Endpoint::Shards => "shards",
            Endpoint::Shard(_) => "shard",
            Endpoint::ViewChange => "view_change",
        }
    }

    fn parse(method: &Method, path: &str) -> Result<Endpoint, Error> {
        let rest = path.strip_prefix(PREFIX).unwrap_or_default();
        if let Some(raw) = rest.strip_prefix(KEYS) {
            let key = super::path_key(raw)?;
            return match *method {
                Method::GET => Ok(Endpoint::GetKey(key)),
                Method::PUT => Ok(Endpoint::PutKey(key)),
                Method::DELETE => Ok(Endpoint::DeleteKey(key)),
                _ => Err(method_not_allowed()),
            };
        }
        let (endpoint, allowed) = match rest.split_once('/') {
            Some(("shards", id)) => (Endpoint::Shard(shard_index(id)?), Method::GET),
            None if rest == "key-count" => (Endpoint::KeyCount, Method::GET),
            None if rest == "shards" => (Endpoint::Shards, Method::GET),
            None if rest == "view-change" => (Endpoint::ViewChange, Method::PUT),
            _ => return Err(Error::not_found("no such endpoint")),
        };
        if *method != allowed {
            return Err(method_not_allowed());
        }
        Ok(endpoint)
    }
}

/// The index of the shard a client calls `id` ("1" is index 0); `NotFound` for text
/// that names no shard.
fn shard_index(id: &str) -> Result<u32, Error> {
    id.parse::<u32>()
        .ok()
        .and_then(|n| n.checked_sub(1))
        .ok_or_else(|| Error::not_found(format!("Shard ID {id:?} does not exist")))
}

/// The id clients see for the shard at `index`.
fn shard_id(index: u32) -> String {
    (u64::from(index) + 1).to_string()
}

fn method_not_allowed() -> Error {
    Error::new(
        ErrorKind::MethodNotAllowed,
        "this endpoint does not support this method",
    )
}

/// The one place where errors become status codes in this dialect.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        // A read whose context cannot be met: the seed's 400, not a retryable 503.
        ErrorKind::Unsatisfiable => StatusCode::BAD_REQUEST,
        other => super::status_of_kind(other),
    }
}

/// `{"error": <what>, "message": "Error in <METHOD>"}`; an unreachable shard and an
/// unsatisfiable context both say "Unable to satisfy request", the seed's words.
fn error_response(e: Error, method: &str) -> Response {
    let status = status_of(e.kind);
    let what = match e.kind {
        ErrorKind::Unavailable | ErrorKind::OutcomeUnknown | ErrorKind::Unsatisfiable => {
            UNSATISFIABLE.to_string()
        }
        _ => e.message.clone(),
    };
    if status.is_server_error() {
        tracing::warn!("answering {status}: {}", e.message);
    }
    (
        status,
        Json(json!({"error": what, "message": format!("Error in {method}")})),
    )
        .into_response()
}

async fn handle(node: Arc<Node>, request: Request) -> Response {
    let method = request.method.as_str().to_owned();
    serve(&node, request)
        .await
        .unwrap_or_else(|e| error_response(e, &method))
}

async fn serve(node: &Arc<Node>, request: Request) -> Result<Response, Error> {
    let endpoint = Endpoint::parse(&request.method, &request.path)?;
    let body = super::json_object(&request)?;
    match endpoint {
        Endpoint::GetKey(key) => {
            super::check_key_length(&key, MAX_KEY_CHARS)?;
            let token = context(node, body).await?;
            let reply = node
                .get(&key, token, super::level(&request.fields, "r")?, true)
                .await?;
            let mut answer = Map::new();
            let status = match reply.value {
                Some((value, _)) => {
                    answer.insert("doesExist".into(), json!(true));
                    answer.insert("message".into(), json!("Retrieved successfully"));
                    answer.insert("value".into(), json!(super::value_text(&value)));
                    StatusCode::OK
                }
                None => {
                    answer.insert("doesExist".into(), json!(false));
                    answer.insert("error".into(), json!("Key does not exist"));
                    answer.insert("message".into(), json!("Error in GET"));
                    StatusCode::NOT_FOUND
                }
            };
            key_answer(node, status, answer, &reply.token, &reply.served_by)
        }
        Endpoint::PutKey(key) => {
            let value =
                super::value_field(body).ok_or_else(|| Error::bad_request("Value is missing"))?;
            super::check_key_length(&key, MAX_KEY_CHARS)?;
            let token = context(node, body).await?;
            let (reply, status, message) =
                super::put_json(node, &request, &key, value, token).await?;
            let mut answer = Map::new();
            answer.insert("message".into(), json!(message));
            answer.insert("replaced".into(), json!(!reply.created));
            key_answer(node, status, answer, &reply.token, &reply.served_by)
        }
        Endpoint::DeleteKey(key) => {
            super::check_key_length(&key, MAX_KEY_CHARS)?;
            let token = context(node, body).await?;
            let reply = node
                .delete(&key, token, super::level(&request.fields, "w")?, true)
                .await?;
            let mut answer = Map::new();
            let status = if reply.created {
                // Nothing was there to delete (and nothing was written).
                answer.insert("doesExist".into(), json!(false));
                answer.insert("error".into(), json!("Key does not exist"));
                answer.insert("message".into(), json!("Error in DELETE"));
                StatusCode::NOT_FOUND
            } else {
                answer.insert("doesExist".into(), json!(true));
                answer.insert("message".into(), json!("Deleted successfully"));
                StatusCode::OK
            };
            key_answer(node, status, answer, &reply.token, &reply.served_by)
        }
        Endpoint::KeyCount => {
            let view = view_of(node)?;
            let index = match view.role_of(node.addr()) {
                Some(Role::Replica(uid)) => view.index_of(uid),
                _ => None,
            }
            .ok_or_else(|| Error::not_found("This node is not a member of any shard"))?;
            let count = node.partition_key_count(index).await?;
            Ok(ok(
                StatusCode::OK,
                json!({"message": "Key count retrieved successfully", "key-count": count, "shard-id": shard_id(index)}),
            ))
        }
        Endpoint::Shards => {
            let ids: Vec<String> = view_of(node)?.partition_ids().map(shard_id).collect();
            Ok(ok(
                StatusCode::OK,
                json!({"message": "Shard membership retrieved successfully", "shards": ids}),
            ))
        }
        Endpoint::Shard(index) => {
            let view = view_of(node)?;
            let replicas = view
                .replicas_at(index)
                .ok_or_else(|| Error::not_found("Shard ID does not exist"))?
                .to_vec();
            let count = node.partition_key_count(index).await?;
            Ok(ok(
                StatusCode::OK,
                json!({
                    "message": "Shard information retrieved successfully",
                    "shard-id": shard_id(index),
                    "key-count": count,
                    "replicas": replicas,
                }),
            ))
        }
        Endpoint::ViewChange => {
            let members = view_field(body)?;
            let replication = repl_factor(body)?;
            node.authorize_admin(super::admin_credential(&request.headers))?;
            let view = node
                .change_view(Change::Replace {
                    members,
                    replication,
                })
                .await?;
            let mut shards = Vec::new();
            for (index, p) in (0u32..).zip(&view.partitions) {
                let mut shard = json!({
                    "shard-id": shard_id(index),
                    "key-count": node.partition_key_count(index).await?,
                    "replicas": p.replicas,
                });
                if let ([only], Some(map)) = (p.replicas.as_slice(), shard.as_object_mut()) {
                    map.insert("address".into(), json!(only));
                }
                shards.push(shard);
            }
            Ok(ok(
                StatusCode::OK,
                json!({"message": "View change successful", "shards": shards}),
            ))
        }
    }
}

/// A key request's answer: `fields`, the client's next context and, when another node
/// served the request, its address.
fn key_answer(
    node: &Node,
    status: StatusCode,
    mut fields: Map<String, Value>,
    token: &CausalToken,
    served_by: &str,
) -> Result<Response, Error> {
    fields.insert(
        "causal-context".into(),
        json!({ TOKEN: node.encode_token(token)? }),
    );
    if served_by != node.addr() {
        fields.insert("address".into(), json!(served_by));
    }
    Ok(ok(status, Value::Object(fields)))
}

/// The client's `causal-context` (see the module doc).
async fn context(node: &Node, body: &Value) -> Result<CausalToken, Error> {
    let token = match body.get("causal-context") {
        None | Some(Value::Null) => None,
        Some(Value::Object(map)) => match map.get(TOKEN) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(_) => {
                return Err(Error::bad_request(
                    "causal-context.token must be the string a response gave",
                ))
            }
        },
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => {
            return Err(Error::bad_request(
                "causal-context must be the object a response gave (or {})",
            ))
        }
    };
    node.parse_token(token.unwrap_or_default()).await
}

/// The `view` of a view change: a comma-separated string (as `VIEW`) or an array.
fn view_field(body: &Value) -> Result<Vec<String>, Error> {
    let text = match body.get("view") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::bad_request("view must list ip:port strings"))?
            .join(","),
        _ => return Err(Error::bad_request("view is missing")),
    };
    parse_view_list(&text).map_err(|e| Error::bad_request(format!("view: {e}")))
}

/// The optional `repl-factor` of a view change: a positive whole number.
fn repl_factor(body: &Value) -> Result<Option<u32>, Error> {
    let n = match body.get("repl-factor") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        Some(_) => None,
    };
    n.and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n > 0)
        .map(Some)
        .ok_or_else(|| Error::bad_request("repl-factor must be a positive whole number"))
}

/// The node's view, or the retryable error of a node in no cluster.
fn view_of(node: &Node) -> Result<Arc<View>, Error> {
    node.view().ok_or_else(|| {
        Error::unavailable(
            "this node is not part of a cluster: add it with PUT /kvs/view-change on a member",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_parsed() {
        let p = |m: Method, path: &str| Endpoint::parse(&m, path);
        assert_eq!(
            p(Method::GET, "/kvs/keys/a%20b"),
            Ok(Endpoint::GetKey("a b".into()))
        );
        assert_eq!(
            p(Method::DELETE, "/kvs/keys/x"),
            Ok(Endpoint::DeleteKey("x".into()))
        );
        assert_eq!(p(Method::GET, "/kvs/key-count"), Ok(Endpoint::KeyCount));
        assert_eq!(p(Method::GET, "/kvs/shards"), Ok(Endpoint::Shards));
        assert_eq!(p(Method::GET, "/kvs/shards/1"), Ok(Endpoint::Shard(0)));
        assert_eq!(p(Method::PUT, "/kvs/view-change"), Ok(Endpoint::ViewChange));
        let kind = |m: Method, path: &str| p(m, path).map_err(|e| e.kind);
        assert_eq!(
            kind(Method::POST, "/kvs/keys/x"),
            Err(ErrorKind::MethodNotAllowed)
        );
        assert_eq!(
            kind(Method::GET, "/kvs/view-change"),
            Err(ErrorKind::MethodNotAllowed)
        );
        assert_eq!(kind(Method::GET, "/kvs/shards/0"), Err(ErrorKind::NotFound));
        assert_eq!(kind(Method::GET, "/kvs/shards/x"), Err(ErrorKind::NotFound));
        assert_eq!(kind(Method::GET, "/kvs/nothing"), Err(ErrorKind::NotFound));
        let name = |m: Method, path: &str| (DIALECT.endpoint_of)(&m, path);
        assert_eq!(name(Method::GET, "/kvs/keys/a%20b"), "get");
        assert_eq!(name(Method::PUT, "/kvs/keys/x"), "put");
        assert_eq!(name(Method::GET, "/kvs/shards/1"), "shard");
        assert_eq!(name(Method::PUT, "/kvs/view-change"), "view_change");
        assert_eq!(name(Method::GET, "/kvs/view-change"), INVALID_ENDPOINT);
        assert_eq!(name(Method::GET, "/kvs/shards/x"), INVALID_ENDPOINT);
    }

    #[test]
    fn view_change_fields_are_read() {
        let body = json!({"view": "10.0.0.1:13800, 10.0.0.2:13800", "repl-factor": 2});
        assert_eq!(
            view_field(&body).expect("valid"),
            vec!["10.0.0.1:13800", "10.0.0.2:13800"]
        );
        assert_eq!(repl_factor(&body).expect("valid"), Some(2));
        let body = json!({"view": ["10.0.0.1:13800"], "repl-factor": "1"});
        assert_eq!(view_field(&body).expect("valid").len(), 1);
        assert_eq!(repl_factor(&body).expect("valid"), Some(1));
        assert_eq!(repl_factor(&json!({})).expect("valid"), None);
        for bad in [
            json!({"repl-factor": 0}),
            json!({"repl-factor": -1}),
            json!({"repl-factor": "x"}),
        ] {
            assert!(repl_factor(&bad).is_err(), "{bad}");
        }
        for bad in [
            json!({}),
            json!({"view": ""}),
            json!({"view": "nonsense"}),
            json!({"view": [1]}),
        ] {
            assert!(view_field(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unsatisfiable_is_400_and_unreachable_503_with_the_same_words() {
        assert_eq!(status_of(ErrorKind::Unsatisfiable), StatusCode::BAD_REQUEST);
        assert_eq!(
            status_of(ErrorKind::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn paths_belong_to_this_dialect_only_when_they_should() {
        for path in ["/kvs/keys/k", "/kvs/shards", "/kvs/view-change"] {
            assert!((DIALECT.owns)(path), "{path}");
        }
        for path in ["/kv-store/k", "/kvs", "/kvsx/keys/k", "/key-value-store/k"] {
            assert!(!(DIALECT.owns)(path), "{path}");
        }
    }
}
