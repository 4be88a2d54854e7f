//! The project's own API under `/api/v1` (DESIGN.md §5.4), described for tools in
//! `api/openapi.yaml` (OpenAPI 3.1).
//!
//! # Contract
//!
//! Bodies and answers are JSON. Values are any bytes: a request gives `value` (text) or
//! `value_base64` (standard base64); an answer gives each value as `value` when it is
//! UTF-8 text, else as `value_base64`. Keys are the rest of the path, percent-decoded,
//! 1 to [`MAX_KEY_BYTES`] bytes of UTF-8.
//!
//! | request | answer |
//! |---|---|
//! | `GET /api/v1/kv/<key>` | 200 `{key, siblings: [{version, timestamp_ms, value \| value_base64}], context, token, partition_id, served_by, epoch}`; 404 when no sibling holds a value (with `context` and `token`) |
//! | `PUT /api/v1/kv/<key>` `{value \| value_base64, context?, condition?}` | 201 (no value existed) / 200 `{created, timestamp_ms, token, partition_id, served_by}` |
//! | `DELETE /api/v1/kv/<key>` `{context?, condition?}` (body optional) | 200 `{deleted: true, token, ...}`; 404 when nothing existed |
//! | `GET /api/v1/kv?prefix=&limit=&cursor=` | 200 `{keys, cursor}`: one page (`node::listing`); `cursor` null at the end |
//! | `GET /api/v1/members` | 200 `{epoch, members: [{addr, role, partition_id, health}]}` |
//! | `GET /api/v1/layout` | 200 `{epoch, slots, partitions: [{partition_id, replicas}], slot_runs: [[first_slot, partition_id]]}`: where each slot lives, for clients that route themselves |
//! | `GET /api/v1/partitions` | 200 `{epoch, k, partitions: [{partition_id, uid, replicas, live_replicas, slots, keys}]}` |
//! | `POST /api/v1/members` `{addr, partition?}` | admin: add a node (to a partition, in shard-count mode); 200 the new view |
//! | `DELETE /api/v1/members/<addr>` | admin: remove a node; 200 the new view |
//! | `POST /api/v1/reshard` `{partitions}` | admin: deal the members into this many partitions (shard-count mode) |
//! | `PUT /api/v1/view` `{members, replication?}` | admin: replace the member list |
//!
//! `GET /api/v1/status` (the node's own status) is served by the HTTP layer.
//!
//! **Siblings and contexts.** A read returns every concurrent value of the key and one
//! `context` (signed, bound to the key: `keycontext`). A write that carries it replaces
//! exactly the siblings the read returned; a write without one adds a sibling, never
//! silently overwriting (`writemode`). A DELETE without a context removes every value
//! the accepting replica holds, like the seed dialects' delete. `condition`:
//! `"unchanged"` (needs `context`) fails with 412 if the key has a version the context
//! does not name; `"absent"` fails with 412 if the key has a value. Conditions are
//! checked at the accepting replica (not a cluster-wide compare-and-set; see
//! `writemode`).
//!
//! **Sessions.** A request may carry the causal token of the client's previous answer
//! in the `X-Causal-Token` header; every key answer has the next one in `token`. Reads
//! then never go back in time, across keys and partitions. `r=` / `w=` query fields set
//! the quorum (`crate::quorum`).
//!
//! **Admin operations** need `Authorization: Bearer <ADMIN_TOKEN>` when the cluster has
//! one. **Errors** are `{"error": {"code", "message"}}` with the codes of [`code_of`]; a
//! 405 names the methods the path takes in `Allow`.

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

mod render;

use super::{json_reply as reply, Answer, BodyFormat, Dialect, Request};
use crate::clock::CausalToken;
use crate::error::{Error, ErrorKind};
use crate::node::{Node, MAX_KEY_BYTES, MAX_VALUE_BYTES};
use crate::placement::{parse_addr, Change, Role, View};
use crate::replica::{Condition, Supersedes, WriteMode};
use render::{decode_cursor, encode_cursor, layout, read_answer, write_answer};

/// Largest request body: a [`MAX_VALUE_BYTES`] value in base64 or JSON-escaped, plus the
/// context.
pub const MAX_BODY_BYTES: usize = 3 * MAX_VALUE_BYTES + 64 * 1024;
/// Keys a listing page returns unless `limit` says otherwise.
pub const DEFAULT_PAGE: u32 = 100;
/// Request header carrying the client's causal token.
pub const TOKEN_HEADER: &str = "x-causal-token";
const PREFIX: &str = "/api/v1/";

/// This dialect, as the HTTP layer sees it.
pub const DIALECT: Dialect = Dialect {
    name: "v1",
    owns: |path| path.starts_with(PREFIX),
    format: BodyFormat::Json,
    max_body_bytes: MAX_BODY_BYTES,
    handle: |node, request| Box::pin(handle(node, request)) as Answer,
    error: error_response,
    endpoint_of: |method, path| {
        Endpoint::parse(method, path).map_or(super::INVALID_ENDPOINT, |e| e.name())
    },
};

/// The endpoints of this dialect.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    GetKey(String),
    PutKey(String),
    DeleteKey(String),
    ListKeys,
    Members,
    AddMember,
    RemoveMember(String),
    Partitions,
    Layout,
    Reshard,
    ReplaceView,
}

impl Endpoint {
    /// The endpoint's name in the request metrics (`Dialect::endpoint_of`).
    fn name(&self) -> &'static str {
        match self {
            Endpoint::GetKey(_) => "get",
            Endpoint::PutKey(_) => "put",
            Endpoint::DeleteKey(_) => "delete",
            Endpoint::ListKeys => "list",
            Endpoint::Members => "members",
            Endpoint::AddMember => "add_member",
            Endpoint::RemoveMember(_) => "remove_member",
            Endpoint::Partitions => "partitions",
            Endpoint::Layout => "layout",
            Endpoint::Reshard => "reshard",
            Endpoint::ReplaceView => "replace_view",
        }
    }

    fn parse(method: &Method, path: &str) -> Result<Endpoint, Error> {
        let rest = path.strip_prefix(PREFIX).unwrap_or_default();
        let one = |allowed: Method, endpoint: Endpoint| {
            if *method == allowed {
                Ok(endpoint)
            } else {
                Err(method_not_allowed())
            }
        };
        if let Some(raw) = rest.strip_prefix("kv/") {
            let key = super::path_key(raw)?;
            return match *method {
                Method::GET => Ok(Endpoint::GetKey(key)),
                Method::PUT => Ok(Endpoint::PutKey(key)),
                Method::DELETE => Ok(Endpoint::DeleteKey(key)),
                _ => Err(method_not_allowed()),
            };
        }
        if let Some(raw) = rest.strip_prefix("members/") {
            return one(
                Method::DELETE,
                Endpoint::RemoveMember(super::path_key(raw)?),
            );
        }
        match rest {
            "kv" => one(Method::GET, Endpoint::ListKeys),
            "members" => match *method {
                Method::GET => Ok(Endpoint::Members),
                Method::POST => Ok(Endpoint::AddMember),
                _ => Err(method_not_allowed()),
            },
            "partitions" => one(Method::GET, Endpoint::Partitions),
            "layout" => one(Method::GET, Endpoint::Layout),
            "reshard" => one(Method::POST, Endpoint::Reshard),
            "view" => one(Method::PUT, Endpoint::ReplaceView),
            _ => Err(Error::not_found("no such endpoint")),
        }
    }
}

fn method_not_allowed() -> Error {
    Error::new(
        ErrorKind::MethodNotAllowed,
        "this endpoint does not support this method",
    )
}

/// The one place where errors become status codes in this dialect.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    super::status_of_kind(kind)
}

/// The machine-readable code of an error.
pub fn code_of(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::BadRequest => "bad_request",
        ErrorKind::TooLarge => "too_large",
        ErrorKind::Timeout => "timeout",
        ErrorKind::NotFound => "not_found",
        ErrorKind::Unauthorized => "unauthorized",
        ErrorKind::Conflict => "conflict",
        ErrorKind::Unavailable => "unavailable",
        ErrorKind::Internal => "internal",
        ErrorKind::OutcomeUnknown => "outcome_unknown",
        ErrorKind::MethodNotAllowed => "method_not_allowed",
        ErrorKind::Unsatisfiable => "unsatisfiable",
        ErrorKind::PreconditionFailed => "precondition_failed",
    }
}

fn error_body(e: &Error) -> Value {
    json!({"error": {"code": code_of(e.kind), "message": e.message}})
}

fn error_response(e: Error) -> axum::response::Response {
    let status = status_of(e.kind);
    if status.is_server_error() {
        tracing::warn!("answering {status}: {}", e.message);
    }
    reply(status, error_body(&e))
}

async fn handle(node: Arc<Node>, request: Request) -> axum::response::Response {
    match Endpoint::parse(&request.method, &request.path) {
        Ok(endpoint) => serve(&node, endpoint, request)
            .await
            .unwrap_or_else(error_response),
        Err(e) => refused(e, &request.path),
    }
}

/// The answer to a request `Endpoint::parse` refused: a 405 names the methods the path
/// does take in `Allow`, as RFC 9110 (15.5.6) requires.
fn refused(e: Error, path: &str) -> axum::response::Response {
    let not_allowed = e.kind == ErrorKind::MethodNotAllowed;
    let mut response = error_response(e);
    if not_allowed {
        if let Ok(allow) = allowed_methods(path).parse() {
            response
                .headers_mut()
                .insert(axum::http::header::ALLOW, allow);
        }
    }
    response
}

/// The methods `path` takes, comma-separated.
fn allowed_methods(path: &str) -> String {
    [Method::GET, Method::PUT, Method::POST, Method::DELETE]
        .iter()
        .filter(|m| Endpoint::parse(m, path).is_ok())
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A PUT's body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    value: Option<String>,
    value_base64: Option<String>,
    context: Option<String>,
    condition: Option<ConditionName>,
}

/// A DELETE's body (optional).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeleteBody {
    context: Option<String>,
    condition: Option<ConditionName>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ConditionName {
    Unchanged,
    Absent,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddMemberBody {
    addr: String,
    partition: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReshardBody {
    partitions: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewBody {
    members: Vec<String>,
    replication: Option<u32>,
}

/// The request's body as `T`: a JSON object (an absent body, or `null`, is `{}`). Not an
/// array, which serde would take for a struct, field by field in order.
fn body<T: for<'de> Deserialize<'de>>(request: &Request) -> Result<T, Error> {
    let value = match super::json_object(request)? {
        Value::Null => json!({}),
        other => other.clone(),
    };
    serde_json::from_value(value).map_err(|e| Error::bad_request(format!("bad body: {e}")))
}

async fn serve(
    node: &Arc<Node>,
    endpoint: Endpoint,
    request: Request,
) -> Result<axum::response::Response, Error> {
    match endpoint {
        Endpoint::GetKey(key) => {
            check_key(&key)?;
            let token = session(node, &request).await?;
            let level = super::level(&request.fields, "r")?;
            let read = node.get(&key, token, level, true).await?;
            read_answer(node, &key, read)
        }
        Endpoint::PutKey(key) => {
            check_key(&key)?;
            let put: PutBody = body(&request)?;
            let value = match (put.value, put.value_base64) {
                (Some(text), None) => text.into_bytes(),
                (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|e| Error::bad_request(format!("value_base64: {e}")))?,
                _ => {
                    return Err(Error::bad_request(
                        "give the value as exactly one of value and value_base64",
                    ))
                }
            };
            let mode = mode(node, &key, put.context, put.condition).await?;
            let token = session(node, &request).await?;
            let level = super::level(&request.fields, "w")?;
            let written = node
                .write(&key, Some(value), token, level, mode, true)
                .await?;
            let status = if written.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            write_answer(node, status, json!({"created": written.created}), &written)
        }
        Endpoint::DeleteKey(key) => {
            check_key(&key)?;
            let delete: DeleteBody = body(&request)?;
            let mode = match delete.context {
                // Without a context a delete removes everything (see the module doc).
                None => WriteMode {
                    supersedes: Supersedes::Everything,
                    condition: condition_of(delete.condition),
                },
                context => mode(node, &key, context, delete.condition).await?,
            };
            let token = session(node, &request).await?;
            let level = super::level(&request.fields, "w")?;
            let written = node.write(&key, None, token, level, mode, true).await?;
            if written.created {
                let missing = Error::not_found(format!("key {key:?} does not exist"));
                let mut answer = error_body(&missing);
                answer["token"] = json!(node.encode_token(&written.token)?);
                answer["epoch"] = json!(node.epoch());
                return Ok(reply(StatusCode::NOT_FOUND, answer));
            }
            write_answer(node, StatusCode::OK, json!({"deleted": true}), &written)
        }
        Endpoint::ListKeys => list(node, &request).await,
        Endpoint::Members => {
            let view = view_of(node)?;
            let members: Vec<Value> = view
                .members
                .iter()
                .map(|m| {
                    let (role, partition) = match view.role_of(m) {
                        Some(Role::Replica(uid)) => ("replica", view.index_of(uid)),
                        Some(Role::Proxy) => ("proxy", None),
                        None => ("none", None),
                    };
                    json!({
                        "addr": m,
                        "role": role,
                        "partition_id": partition,
                        "health": node.health_of(m).as_str(),
                    })
                })
                .collect();
            Ok(reply(
                StatusCode::OK,
                json!({"epoch": view.epoch, "members": members}),
            ))
        }
        Endpoint::Partitions => {
            let view = view_of(node)?;
            let mut partitions = Vec::with_capacity(view.partitions.len());
            for (index, p) in (0u32..).zip(&view.partitions) {
                let live = node.live_replicas_at(index)?.map_or(0, |r| r.len());
                partitions.push(json!({
                    "partition_id": index,
                    "uid": p.uid,
                    "replicas": p.replicas,
                    "live_replicas": live,
                    "slots": view.slots.iter().filter(|&&u| u == p.uid).count(),
                    // A partition none of whose replicas answers has no count now.
                    "keys": node.partition_key_count(index).await.ok(),
                }));
            }
            Ok(reply(
                StatusCode::OK,
                json!({"epoch": view.epoch, "k": view.k(), "partitions": partitions}),
            ))
        }
        Endpoint::Layout => {
            let view = view_of(node)?;
            Ok(reply(StatusCode::OK, layout(&view)))
        }
        Endpoint::AddMember => {
            let add: AddMemberBody = body(&request)?;
            let addr = parse_addr(&add.addr).map_err(|e| Error::bad_request(e.to_string()))?;
            let change = match add.partition {
                None => Change::Add(addr),
                Some(shard) => Change::AddToShard { addr, shard },
            };
            admin(node, &request, change).await
        }
        Endpoint::RemoveMember(addr) => {
            let addr = parse_addr(&addr).map_err(|e| Error::bad_request(e.to_string()))?;
            admin(node, &request, Change::Remove(addr)).await
        }
        Endpoint::Reshard => {
            let reshard: ReshardBody = body(&request)?;
            admin(node, &request, Change::Reshard(reshard.partitions)).await
        }
        Endpoint::ReplaceView => {
            let view: ViewBody = body(&request)?;
            let members = view
                .members
                .iter()
                .map(|m| parse_addr(m).map_err(|e| Error::bad_request(e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            let change = Change::Replace {
                members,
                replication: view.replication,
            };
            admin(node, &request, change).await
        }
    }
}

fn check_key(key: &str) -> Result<(), Error> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(Error::bad_request(format!(
            "the key must be 1 to {MAX_KEY_BYTES} bytes"
        )));
    }
    Ok(())
}

fn condition_of(name: Option<ConditionName>) -> Option<Condition> {
    name.map(|c| match c {
        ConditionName::Unchanged => Condition::Unchanged,
        ConditionName::Absent => Condition::Absent,
    })
}

/// What a write replaces: what `context` names (nothing without one).
async fn mode(
    node: &Node,
    key: &str,
    context: Option<String>,
    condition: Option<ConditionName>,
) -> Result<WriteMode, Error> {
    let seen = match context.as_deref().map(str::trim) {
        None | Some("") => {
            if matches!(condition, Some(ConditionName::Unchanged)) {
                return Err(Error::bad_request(
                    "the condition \"unchanged\" needs the context of a read",
                ));
            }
            Default::default()
        }
        Some(text) => node.parse_key_context(key, text).await?,
    };
    Ok(WriteMode {
        supersedes: Supersedes::Seen(seen),
        condition: condition_of(condition),
    })
}

/// The client's causal token (`X-Causal-Token`; none: an empty one).
async fn session(node: &Node, request: &Request) -> Result<CausalToken, Error> {
    let text = match request.headers.get(TOKEN_HEADER) {
        None => "",
        Some(v) => v
            .to_str()
            .map_err(|_| Error::bad_request("X-Causal-Token is not text"))?,
    };
    node.parse_token(text).await
}

/// `GET /api/v1/kv`: one page of the listing.
async fn list(node: &Arc<Node>, request: &Request) -> Result<axum::response::Response, Error> {
    let prefix = request.fields.get("prefix").map_or("", String::as_str);
    let limit = match request.fields.get("limit") {
        None => DEFAULT_PAGE,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=crate::node::MAX_PAGE).contains(n))
            .ok_or_else(|| {
                Error::bad_request(format!(
                    "limit must be a number from 1 to {}",
                    crate::node::MAX_PAGE
                ))
            })?,
    };
    let after = match request.fields.get("cursor").map(String::as_str) {
        None | Some("") => None,
        Some(text) => Some(decode_cursor(text)?),
    };
    let page = node.list_keys(prefix, after, limit).await?;
    Ok(reply(
        StatusCode::OK,
        json!({"keys": page.keys, "cursor": page.next.map(|p| encode_cursor(&p))}),
    ))
}

fn view_of(node: &Node) -> Result<Arc<View>, Error> {
    node.view()
        .ok_or_else(|| Error::unavailable("this node is in no cluster yet"))
}

/// Carries out an admin change and answers the new view.
async fn admin(
    node: &Arc<Node>,
    request: &Request,
    change: Change,
) -> Result<axum::response::Response, Error> {
    node.authorize_admin(super::admin_credential(&request.headers))?;
    let view = node.change_view(change).await?;
    let partitions: Vec<Value> = (0u32..)
        .zip(&view.partitions)
        .map(|(i, p)| json!({"partition_id": i, "uid": p.uid, "replicas": p.replicas}))
        .collect();
    Ok(reply(
        StatusCode::OK,
        json!({"epoch": view.epoch, "members": view.members, "partitions": partitions}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_endpoints() {
        let parse = |m: Method, p: &str| Endpoint::parse(&m, p);
        assert_eq!(
            parse(Method::GET, "/api/v1/kv/a%2Fb"),
            Ok(Endpoint::GetKey("a/b".into()))
        );
        assert_eq!(parse(Method::GET, "/api/v1/kv"), Ok(Endpoint::ListKeys));
        assert_eq!(
            parse(Method::DELETE, "/api/v1/members/127.0.0.1:8080"),
            Ok(Endpoint::RemoveMember("127.0.0.1:8080".into()))
        );
        assert_eq!(
            parse(Method::POST, "/api/v1/kv").map_err(|e| e.kind),
            Err(ErrorKind::MethodNotAllowed)
        );
        assert_eq!(
            parse(Method::GET, "/api/v1/nothing").map_err(|e| e.kind),
            Err(ErrorKind::NotFound)
        );
    }

    #[test]
    fn a_refused_method_is_answered_with_the_allowed_ones() {
        let allow = |path: &str, method: Method| {
            let e = Endpoint::parse(&method, path).expect_err("refused");
            let response = refused(e, path);
            let allow = response.headers().get(axum::http::header::ALLOW);
            (
                response.status(),
                allow.map(|v| v.to_str().unwrap_or("?").to_owned()),
            )
        };
        let not_allowed = StatusCode::METHOD_NOT_ALLOWED;
        assert_eq!(
            allow("/api/v1/kv/a%2Fb", Method::POST),
            (not_allowed, Some("GET, PUT, DELETE".into()))
        );
        assert_eq!(
            allow("/api/v1/kv", Method::HEAD),
            (not_allowed, Some("GET".into()))
        );
        assert_eq!(
            allow("/api/v1/members", Method::PATCH),
            (not_allowed, Some("GET, POST".into()))
        );
        assert_eq!(
            allow("/api/v1/members/127.0.0.1:8080", Method::GET),
            (not_allowed, Some("DELETE".into()))
        );
        assert_eq!(
            allow("/api/v1/view", Method::TRACE),
            (not_allowed, Some("PUT".into()))
        );
        // Only a 405 names methods: no such endpoint, a key that is not UTF-8.
        assert_eq!(
            allow("/api/v1/nothing", Method::GET),
            (StatusCode::NOT_FOUND, None)
        );
        assert_eq!(
            allow("/api/v1/kv/%FF", Method::GET),
            (StatusCode::BAD_REQUEST, None)
        );
    }

    #[test]
    fn bodies_are_objects() {
        let with = |json: Value| Request {
            method: Method::PUT,
            path: "/api/v1/kv/k".into(),
            headers: Default::default(),
            fields: Default::default(),
            json,
        };
        let put: PutBody = body(&with(json!({"value": "v"}))).expect("an object");
        assert_eq!(put.value.as_deref(), Some("v"));
        let none: DeleteBody = body(&with(Value::Null)).expect("no body");
        assert!(none.context.is_none() && none.condition.is_none());
        // serde would read these field by field: `value`, `value_base64`, `context`,
        // `condition`; `partitions`.
        for array in [json!(["v", null, null, "absent"]), json!([])] {
            let refused = body::<PutBody>(&with(array)).err().map(|e| e.kind);
            assert_eq!(refused, Some(ErrorKind::BadRequest));
        }
        let refused = body::<ReshardBody>(&with(json!([2]))).err().map(|e| e.kind);
        assert_eq!(refused, Some(ErrorKind::BadRequest));
        let refused = body::<DeleteBody>(&with(json!("text")))
            .err()
            .map(|e| e.kind);
        assert_eq!(refused, Some(ErrorKind::BadRequest));
    }

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let position = (4095, "a:b:c".to_string());
        assert_eq!(decode_cursor(&encode_cursor(&position)), Ok(position));
        assert!(decode_cursor("!!").is_err());
        assert!(
            decode_cursor(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("x")).is_err()
        );
    }
}
