//! The `/key-value-store*` dialect of seed 002 (a sharded store with shard-count mode).
//!
//! # Contract
//!
//! Bodies are JSON; every answer is a JSON object with `"message"`. Shard ids and member
//! lists are strings (`"shard-id":"1"`, `"view":"a:8080,b:8080"`), key counts numbers.
//!
//! | request | answer |
//! |---|---|
//! | `GET /key-value-store-shard/shard-ids` | 200 `shard-ids` (`"0,1"`) |
//! | `GET /key-value-store-shard/node-shard-id` | 200 `shard-id`; 404 for a node in no shard |
//! | `GET /key-value-store-shard/shard-id-members/<id>` | 200 `shard-id-members`; 404 unknown shard |
//! | `GET /key-value-store-shard/shard-id-key-count/<id>` | 200 `shard-id-key-count`; 404 unknown shard |
//! | `PUT /key-value-store-shard/add-member/<id>` `{"socket-address"}` | 200; 404 unknown shard |
//! | `PUT /key-value-store-shard/reshard` `{"shard-count"}` | 200; 400 when the nodes up < 2 × count |
//! | `GET /key-value-store-view` | 200 `view`: the members that are up, in VIEW order |
//! | `PUT /key-value-store-view` `{"socket-address"}` | 201; 404 when already a member |
//! | `DELETE /key-value-store-view` `{"socket-address"}` | 200; 404 when not a member |
//! | `PUT /key-value-store/<key>` `{"value","causal-metadata"}` | 201 added / 200 updated: `version, causal-metadata, shard-id` |
//! | `GET /key-value-store/<key>` `{"causal-metadata"}` | 200 `version, causal-metadata, value`; 404 `doesExist: false` |
//! | `DELETE /key-value-store/<key>` `{"causal-metadata"}` | 200 `version, causal-metadata, shard-id`; 404 as GET |
//!
//! Errors are `{"error": <what>, "message": "Error in <METHOD>"}` with the status
//! [`status_of`] gives, except the reshard refusal, whose body the seed fixes as
//! `{"message": "Not enough nodes to provide fault-tolerance with the given shard count!"}`.
//! Keys are 1 to [`MAX_KEY_CHARS`] characters (the rest of the path, percent-decoded).
//!
//! # Versions and metadata
//!
//! `causal-metadata` is the client's causal token (opaque; `""` is the empty context).
//! `version` names one write: the token of exactly that write's own context (see
//! `node::context`), the same string on every replica and in every view. A PUT or DELETE
//! answers `causal-metadata` = `version` (what its client has now observed is exactly
//! the write's context). A GET answers the write's `version`, and as `causal-metadata`
//! that same string when the client's metadata is already within the write's context
//! (no metadata, or the metadata of that write or of anything it followed), so the GET
//! returns exactly what the PUT returned; when the client has observed more, it gets its
//! observations joined with the write's, as causal consistency needs.
//!
//! The view shows the members the failure detector believes up (`node::shards`): a
//! stopped replica drops out within seconds and reappears at its place when it answers
//! again; its shard membership does not change meanwhile. A reshard deals the members
//! that are up (`Node::reshard_live`). A node started later with no
//! `SHARD_COUNT` announces itself to the members and joins the view in no shard.

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{json_reply as ok, Answer, BodyFormat, Dialect, Request, INVALID_ENDPOINT};
use crate::clock::CausalToken;
use crate::error::{Error, ErrorKind};
use crate::node::{Node, MAX_VALUE_BYTES};
use crate::placement::{parse_addr, Change, ChangeError, Role};
use crate::rpc::WriteReply;

/// Longest key accepted, in characters.
pub const MAX_KEY_CHARS: usize = 50;
/// Largest request body: a [`MAX_VALUE_BYTES`] value however JSON escapes it (most
/// characters stay one byte; a few become up to six), plus the metadata.
pub const MAX_BODY_BYTES: usize = 3 * MAX_VALUE_BYTES + 64 * 1024;
const KEYS: &str = "/key-value-store/";
const VIEW: &str = "/key-value-store-view";
const SHARD: &str = "/key-value-store-shard/";
/// The seed's wording of a reshard refused for want of nodes.
const NOT_ENOUGH_NODES: &str =
    "Not enough nodes to provide fault-tolerance with the given shard count!";

/// This dialect, as the HTTP layer sees it.
pub const DIALECT: Dialect = Dialect {
    name: "key-value-store",
    owns: |path| {
        path.starts_with(KEYS)
            || path.starts_with(SHARD)
            || path == VIEW
            || path.strip_prefix(VIEW) == Some("/")
    },
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
    GetView,
    PutView,
    DeleteView,
    ShardIds,
    NodeShardId,
    ShardMembers(u32),
    ShardKeyCount(u32),
    AddMember(u32),
    Reshard,
}

impl Endpoint {
    /// The endpoint's name in the request metrics (`Dialect::endpoint_of`).
    fn name(&self) -> &'static str {
        match self {
            Endpoint::GetKey(_) => "get",
            Endpoint::PutKey(_) => "put",
            Endpoint::DeleteKey(_) => "delete",
            Endpoint::GetView => "view_get",
            Endpoint::PutView => "view_put",
            Endpoint::DeleteView => "view_delete",
            Endpoint::ShardIds => "shard_ids",
            Endpoint::NodeShardId => "node_shard_id",
            Endpoint::ShardMembers(_) => "shard_members",
            Endpoint::ShardKeyCount(_) => "shard_key_count",
            Endpoint::AddMember(_) => "add_member",
            Endpoint::Reshard => "reshard",
        }
    }

    fn parse(method: &Method, path: &str) -> Result<Endpoint, Error> {
        if let Some(raw) = path.strip_prefix(KEYS) {
            let key = super::path_key(raw)?;
            return match *method {
                Method::GET => Ok(Endpoint::GetKey(key)),
                Method::PUT => Ok(Endpoint::PutKey(key)),
                Method::DELETE => Ok(Endpoint::DeleteKey(key)),
                _ => Err(method_not_allowed()),
            };
        }
        if let Some(rest) = path.strip_prefix(SHARD) {
            let mut parts = rest.splitn(2, '/');
            let name = parts.next().unwrap_or_default();
            let id = parts.next();
            let takes_id = matches!(
                name,
                "shard-id-members" | "shard-id-key-count" | "add-member"
            );
            let known = takes_id || matches!(name, "shard-ids" | "node-shard-id" | "reshard");
            let endpoint = match (name, id, method) {
                ("shard-ids", None, &Method::GET) => Endpoint::ShardIds,
                ("node-shard-id", None, &Method::GET) => Endpoint::NodeShardId,
                ("shard-id-members", Some(id), &Method::GET) => Endpoint::ShardMembers(shard(id)?),
                ("shard-id-key-count", Some(id), &Method::GET) => {
                    Endpoint::ShardKeyCount(shard(id)?)
                }
                ("add-member", Some(id), &Method::PUT) => Endpoint::AddMember(shard(id)?),
                ("reshard", None, &Method::PUT) => Endpoint::Reshard,
                _ if known && takes_id == id.is_some() => return Err(method_not_allowed()),
                _ => return Err(no_such_endpoint()),
            };
            return Ok(endpoint);
        }
        match *method {
            Method::GET => Ok(Endpoint::GetView),
            Method::PUT => Ok(Endpoint::PutView),
            Method::DELETE => Ok(Endpoint::DeleteView),
            _ => Err(method_not_allowed()),
        }
    }
}

/// A shard id from a path: the ids clients see are decimal strings.
fn shard(text: &str) -> Result<u32, Error> {
    text.parse().map_err(|_| {
        Error::new(
            ErrorKind::NotFound,
            format!("Shard ID {text:?} does not exist"),
        )
    })
}

/// The one place where errors become status codes in this dialect.
/// Refusals the seed words itself are mapped in [`error_response`].
pub fn status_of(kind: ErrorKind) -> StatusCode {
    super::status_of_kind(kind)
}

/// `{"error": <what>, "message": "Error in <METHOD>"}`, with the seed's own wording for
/// the refusals it names.
fn error_response(e: Error, method: &str) -> Response {
    let (status, body) = match &e.refused {
        Some(ChangeError::AlreadyMember(_)) => (
            StatusCode::NOT_FOUND,
            json!({"error": "Socket address already exists in the view", "message": format!("Error in {method}")}),
        ),
        Some(ChangeError::NotMember(_)) => (
            StatusCode::NOT_FOUND,
            json!({"error": "Socket address does not exist in the view", "message": format!("Error in {method}")}),
        ),
        Some(ChangeError::NoSuchShard(_)) => (
            StatusCode::NOT_FOUND,
            json!({"error": "Shard ID does not exist", "message": format!("Error in {method}")}),
        ),
        Some(ChangeError::NotEnoughNodes { .. }) => (
            StatusCode::BAD_REQUEST,
            json!({"message": NOT_ENOUGH_NODES}),
        ),
        _ => (
            status_of(e.kind),
            json!({"error": e.message, "message": format!("Error in {method}")}),
        ),
    };
    if status.is_server_error() {
        tracing::warn!("answering {status}: {}", e.message);
    }
    (status, Json(body)).into_response()
}

fn no_such_endpoint() -> Error {
    Error::new(ErrorKind::NotFound, "no such endpoint")
}

fn method_not_allowed() -> Error {
    Error::new(
        ErrorKind::MethodNotAllowed,
        "this endpoint does not support this method",
    )
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
            check_key(&key)?;
            let token = metadata(node, body).await?;
            let client = token.clone();
            let reply = node
                .get(&key, token, super::level(&request.fields, "r")?, true)
                .await?;
            let Some((value, _)) = reply.value else {
                return Ok(ok(
                    StatusCode::NOT_FOUND,
                    json!({"doesExist": false, "error": "Key does not exist", "message": "Error in GET"}),
                ));
            };
            let version = node.encode_context(&reply.context)?;
            let within = client
                .parts
                .iter()
                .all(|(p, vv)| reply.context.get(p).is_some_and(|c| c.dominates(vv)));
            let metadata = if within {
                version.clone()
            } else {
                node.encode_token(&reply.token)?
            };
            Ok(ok(
                StatusCode::OK,
                json!({
                    "message": "Retrieved successfully",
                    "version": version,
                    "causal-metadata": metadata,
                    "value": super::value_text(&value),
                }),
            ))
        }
        Endpoint::PutKey(key) => {
            let value =
                super::value_field(body).ok_or_else(|| Error::bad_request("Value is missing"))?;
            check_key(&key)?;
            let token = metadata(node, body).await?;
            let (reply, status, message) =
                super::put_json(node, &request, &key, value, token).await?;
            written(node, status, message, &reply)
        }
        Endpoint::DeleteKey(key) => {
            check_key(&key)?;
            let token = metadata(node, body).await?;
            let reply = node
                .delete(&key, token, super::level(&request.fields, "w")?, true)
                .await?;
            if reply.created {
                return Ok(ok(
                    StatusCode::NOT_FOUND,
                    json!({"doesExist": false, "error": "Key does not exist", "message": "Error in DELETE"}),
                ));
            }
            written(node, StatusCode::OK, "Deleted successfully", &reply)
        }
        Endpoint::GetView => Ok(ok(
            StatusCode::OK,
            json!({"message": "View retrieved successfully", "view": node.live_members()?.join(",")}),
        )),
        Endpoint::PutView => {
            let addr = socket_address(body)?;
            node.authorize_admin(super::admin_credential(&request.headers))?;
            // A member that is down is out of the view clients see; adding it back is
            // what the seed's restarted replicas do, and it is already in: it reappears
            // as soon as it answers.
            let down = node.view().is_some_and(|v| v.is_member(&addr))
                && !node.live_members()?.contains(&addr);
            if !down {
                node.change_view(Change::Add(addr)).await?;
            }
            Ok(ok(
                StatusCode::CREATED,
                json!({"message": "Replica added successfully to the view"}),
            ))
        }
        Endpoint::DeleteView => {
            let addr = socket_address(body)?;
            node.authorize_admin(super::admin_credential(&request.headers))?;
            node.change_view(Change::Remove(addr)).await?;
            Ok(ok(
                StatusCode::OK,
                json!({"message": "Replica deleted successfully from the view"}),
            ))
        }
        Endpoint::ShardIds => {
            let ids: Vec<String> = view_of(node)?
                .partition_ids()
                .map(|i| i.to_string())
                .collect();
            Ok(ok(
                StatusCode::OK,
                json!({"message": "Shard IDs retrieved successfully", "shard-ids": ids.join(",")}),
            ))
        }
        Endpoint::NodeShardId => {
            let view = view_of(node)?;
            let id = match view.role_of(node.addr()) {
                Some(Role::Replica(uid)) => view.index_of(uid),
                _ => None,
            }
            .ok_or_else(|| Error::not_found("This node is not a member of any shard"))?;
            Ok(ok(
                StatusCode::OK,
                json!({"message": "Shard ID of the node retrieved successfully", "shard-id": id.to_string()}),
            ))
        }
        Endpoint::ShardMembers(id) => {
            let members = node
                .live_replicas_at(id)?
                .ok_or_else(|| Error::not_found("Shard ID does not exist"))?;
            Ok(ok(
                StatusCode::OK,
                json!({"message": "Members of shard ID retrieved successfully", "shard-id-members": members.join(",")}),
            ))
        }
        Endpoint::ShardKeyCount(id) => {
            let count = node.partition_key_count(id).await.map_err(|e| {
                if e.kind == ErrorKind::NotFound {
                    Error::not_found("Shard ID does not exist")
                } else {
                    e
                }
            })?;
            Ok(ok(
                StatusCode::OK,
                json!({"message": "Key count of shard ID retrieved successfully", "shard-id-key-count": count}),
            ))
        }
        Endpoint::AddMember(id) => {
            let addr = socket_address(body)?;
            node.authorize_admin(super::admin_credential(&request.headers))?;
            node.change_view(Change::AddToShard { addr, shard: id })
                .await?;
            Ok(ok(
                StatusCode::OK,
                json!({"message": "Node added to shard successfully"}),
            ))
        }
        Endpoint::Reshard => {
            let count = match body.get("shard-count") {
                Some(Value::Number(n)) => n.as_u64(),
                Some(Value::String(s)) => s.trim().parse().ok(),
                _ => None,
            }
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::bad_request("shard-count must be a positive whole number"))?;
            node.authorize_admin(super::admin_credential(&request.headers))?;
            node.reshard_live(count).await?;
            Ok(ok(
                StatusCode::OK,
                json!({"message": "Resharding done successfully"}),
            ))
        }
    }
}

/// The answer to a PUT or DELETE that was applied (see the module doc on versions).
fn written(
    node: &Node,
    status: StatusCode,
    message: &str,
    reply: &WriteReply,
) -> Result<Response, Error> {
    let version = node.encode_context(&reply.token.parts)?;
    Ok(ok(
        status,
        json!({
            "message": message,
            "version": version,
            "causal-metadata": version,
            "shard-id": reply.index.to_string(),
        }),
    ))
}

fn check_key(key: &str) -> Result<(), Error> {
    super::check_key_length(key, MAX_KEY_CHARS)
}

/// The client's `causal-metadata` (absent, null and `""` are the empty context).
async fn metadata(node: &Node, body: &Value) -> Result<CausalToken, Error> {
    match body.get("causal-metadata") {
        None | Some(Value::Null) => node.parse_token("").await,
        Some(Value::String(s)) => node.parse_token(s).await,
        Some(_) => Err(Error::bad_request("causal-metadata must be a string")),
    }
}

/// The `socket-address` of a view or shard change, checked as an `ip:port`.
fn socket_address(body: &Value) -> Result<String, Error> {
    let text = body
        .get("socket-address")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::bad_request("socket-address is missing"))?;
    parse_addr(text).map_err(|e| Error::bad_request(format!("socket-address: {e}")))
}

/// The node's view, or the retryable error of a node in no cluster.
fn view_of(node: &Node) -> Result<Arc<crate::placement::View>, Error> {
    node.view().ok_or_else(|| {
        Error::unavailable(
            "this node is not part of a cluster yet: add it with PUT /key-value-store-view on a member",
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
            p(Method::GET, "/key-value-store/a%20b"),
            Ok(Endpoint::GetKey("a b".into()))
        );
        assert_eq!(
            p(Method::PUT, "/key-value-store/x"),
            Ok(Endpoint::PutKey("x".into()))
        );
        assert_eq!(
            p(Method::GET, "/key-value-store-view"),
            Ok(Endpoint::GetView)
        );
        assert_eq!(
            p(Method::DELETE, "/key-value-store-view"),
            Ok(Endpoint::DeleteView)
        );
        assert_eq!(
            p(Method::GET, "/key-value-store-shard/shard-ids"),
            Ok(Endpoint::ShardIds)
        );
        assert_eq!(
            p(Method::GET, "/key-value-store-shard/shard-id-members/2"),
            Ok(Endpoint::ShardMembers(2))
        );
        assert_eq!(
            p(Method::PUT, "/key-value-store-shard/add-member/1"),
            Ok(Endpoint::AddMember(1))
        );
        assert_eq!(
            p(Method::PUT, "/key-value-store-shard/reshard"),
            Ok(Endpoint::Reshard)
        );
        let kind = |m: Method, path: &str| p(m, path).map_err(|e| e.kind);
        assert_eq!(
            kind(Method::POST, "/key-value-store/x"),
            Err(ErrorKind::MethodNotAllowed)
        );
        assert_eq!(
            kind(Method::GET, "/key-value-store-shard/reshard"),
            Err(ErrorKind::MethodNotAllowed)
        );
        assert_eq!(
            kind(Method::GET, "/key-value-store-shard/shard-id-members/x"),
            Err(ErrorKind::NotFound)
        );
        assert_eq!(
            kind(Method::GET, "/key-value-store-shard/nothing"),
            Err(ErrorKind::NotFound)
        );
        let name = |m: Method, path: &str| (DIALECT.endpoint_of)(&m, path);
        assert_eq!(name(Method::DELETE, "/key-value-store/x"), "delete");
        assert_eq!(name(Method::GET, "/key-value-store-view"), "view_get");
        assert_eq!(name(Method::PUT, "/key-value-store-view/"), "view_put");
        assert_eq!(
            name(Method::GET, "/key-value-store-shard/shard-id-key-count/1"),
            "shard_key_count"
        );
        assert_eq!(
            name(Method::GET, "/key-value-store-shard/reshard"),
            INVALID_ENDPOINT
        );
    }

    #[test]
    fn paths_belong_to_this_dialect_only_when_they_should() {
        for path in [
            "/key-value-store/k",
            "/key-value-store-view",
            "/key-value-store-view/",
            "/key-value-store-shard/shard-ids",
        ] {
            assert!((DIALECT.owns)(path), "{path}");
        }
        for path in [
            "/kv-store/k",
            "/key-value-store",
            "/key-value-store-views",
            "/",
        ] {
            assert!(!(DIALECT.owns)(path), "{path}");
        }
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key(&"k".repeat(50)).is_ok());
        assert_eq!(
            check_key(&"k".repeat(51)).map_err(|e| e.message),
            Err("Key is too long".into())
        );
        assert!(check_key(&"é".repeat(50)).is_ok());
        assert!(check_key("").is_err());
    }
}
