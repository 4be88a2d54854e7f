//! The `/kv-store` dialect of seeds 000/001.
//!
//! # Contract
//!
//! Requests are form-encoded, on GET too (`curl -X GET -d 'causal_payload=...'`); fields
//! may also come in the query string (the body wins). Every response is JSON with
//! `"result"` and `"msg"` (`"success"` or `"error"`); errors add `"error"`.
//!
//! | request | answer |
//! |---|---|
//! | `GET /kv-store/<key>` (`causal_payload`) | 200 `value, partition_id, causal_payload, timestamp`; 404 unknown key |
//! | `PUT /kv-store/<key>` (`val`, `causal_payload`) | 201 new / 200 existing: `partition_id, causal_payload, timestamp` |
//! | `DELETE /kv-store/<key>` (`causal_payload`) | 200 `partition_id, causal_payload, timestamp`; 404 unknown key |
//! | `GET /kv-store/get_partition_id` | `partition_id` (-1 on a proxy) |
//! | `GET /kv-store/get_all_partition_ids` | `partition_id_list` |
//! | `GET /kv-store/get_partition_members` (`partition_id`) | `partition_members` |
//! | `PUT /kv-store/update_view?type=add` (`ip_port`) | `partition_id` (-1 for a proxy), `number_of_partitions` |
//! | `PUT /kv-store/update_view?type=remove` (`ip_port`) | `number_of_partitions` |
//!
//! `DELETE` is this project's extension (the seeds have no delete in this dialect): it
//! writes a tombstone (see `replica`), so the key stays deleted on every replica.
//!
//! Keys are 1–200 characters of `[A-Za-z0-9_]`. `timestamp` is the Unix time in seconds at
//! which the replica that accepted the write accepted it. `update_view` answers once the
//! change is complete (see `node::reconfig`); `type` may also come as a form field.
//! Status codes come from [`status_of`] alone: 409 for adding a member or a node of
//! another configuration, 404 for removing a non-member, 503 for an unreachable node or
//! a change that cannot complete now, 401 for an `update_view` without the admin token
//! when the node has one (`ADMIN_TOKEN`, sent as `Authorization: Bearer <token>`).
//!
//! Requests reach this file read and decoded by the HTTP layer (`crate::http`): bodies
//! of at most [`MAX_BODY_BYTES`] (413), fields decoded as `http::form` says (400 for a
//! field that is not UTF-8). [`Endpoint::parse`] names the endpoint from the method and
//! path; [`status_of`] is the one mapping from errors to status codes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{Answer, BodyFormat, Dialect, Request, INVALID_ENDPOINT};
use crate::error::{Error, ErrorKind};
use crate::node::{Node, MAX_VALUE_BYTES};
use crate::placement::{parse_addr, Change, Role};
use crate::rpc::WriteReply;

/// Largest request body accepted. Percent-encoding can triple a value's size, so this
/// leaves room for a [`MAX_VALUE_BYTES`] value (2 MiB) however it is encoded.
pub const MAX_BODY_BYTES: usize = 3 * MAX_VALUE_BYTES + 64 * 1024;
/// Longest key accepted.
pub const MAX_KEY_CHARS: usize = 200;
/// Where this dialect's paths start.
const PREFIX: &str = "/kv-store/";

/// This dialect, as the HTTP layer sees it.
pub const DIALECT: Dialect = Dialect {
    name: "kv-store",
    owns: |path| path.starts_with(PREFIX),
    format: BodyFormat::Form,
    max_body_bytes: MAX_BODY_BYTES,
    handle: |node, request| Box::pin(handle(node, request)) as Answer,
    error: error_response,
    endpoint_of: |method, path| {
        Endpoint::parse(method, path).map_or(INVALID_ENDPOINT, |e| e.name())
    },
};

/// The endpoints of this dialect. Names under `/kv-store/` that are endpoints cannot be
/// keys.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    Get(String),
    Put(String),
    Delete(String),
    PartitionId,
    AllPartitionIds,
    PartitionMembers,
    UpdateView,
}

impl Endpoint {
    /// The endpoint's name in the request metrics (`Dialect::endpoint_of`).
    fn name(&self) -> &'static str {
        match self {
            Endpoint::Get(_) => "get",
            Endpoint::Put(_) => "put",
            Endpoint::Delete(_) => "delete",
            Endpoint::PartitionId => "get_partition_id",
            Endpoint::AllPartitionIds => "get_all_partition_ids",
            Endpoint::PartitionMembers => "get_partition_members",
            Endpoint::UpdateView => "update_view",
        }
    }

    /// The endpoint of `method` on `path` (which starts with [`PREFIX`]).
    fn parse(method: &Method, path: &str) -> Result<Endpoint, Error> {
        let raw = path.strip_prefix(PREFIX).unwrap_or(path);
        if raw.contains('/') {
            return Err(no_such_endpoint());
        }
        let name = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|e| Error::bad_request(format!("bad path: {e}")))?;
        let endpoint = match (name.as_ref(), method) {
            ("get_partition_id", &Method::GET) => Endpoint::PartitionId,
            ("get_all_partition_ids", &Method::GET) => Endpoint::AllPartitionIds,
            ("get_partition_members", &Method::GET) => Endpoint::PartitionMembers,
            ("update_view", &Method::PUT) => Endpoint::UpdateView,
            (_, m) if ![Method::GET, Method::PUT, Method::DELETE].contains(m) => {
                return Err(method_not_allowed())
            }
            ("update_view", _) => return Err(method_not_allowed()),
            (reserved, &Method::PUT) if RESERVED.contains(&reserved) => {
                return Err(Error::bad_request(format!(
                    "{reserved} is an endpoint name and cannot be used as a key"
                )))
            }
            (reserved, _) if RESERVED.contains(&reserved) => return Err(method_not_allowed()),
            (key, m) => {
                check_key(key)?;
                match *m {
                    Method::GET => Endpoint::Get(key.to_owned()),
                    Method::PUT => Endpoint::Put(key.to_owned()),
                    _ => Endpoint::Delete(key.to_owned()),
                }
            }
        };
        Ok(endpoint)
    }
}

/// Names under `/kv-store/` that are endpoints.
const RESERVED: [&str; 4] = [
    "get_partition_id",
    "get_all_partition_ids",
    "get_partition_members",
    "update_view",
];

/// The one place where errors become status codes in this dialect.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    super::status_of_kind(kind)
}

fn error_response(e: Error) -> Response {
    let status = status_of(e.kind);
    if status.is_server_error() {
        tracing::warn!("answering {status}: {}", e.message);
    }
    (
        status,
        Json(json!({"result": "error", "msg": "error", "error": e.message})),
    )
        .into_response()
}

fn success(status: StatusCode, mut fields: Value) -> Response {
    if let Some(map) = fields.as_object_mut() {
        map.insert("result".into(), json!("success"));
        map.insert("msg".into(), json!("success"));
    }
    (status, Json(fields)).into_response()
}

/// Answer for any path no dialect serves.
pub fn unknown_path() -> Response {
    error_response(no_such_endpoint())
}

fn no_such_endpoint() -> Error {
    Error::new(ErrorKind::NotFound, "no such endpoint")
}

fn method_not_allowed() -> Error {
    Error::new(
        ErrorKind::MethodNotAllowed,
        "this dialect supports GET, PUT and DELETE only",
    )
}

async fn handle(node: Arc<Node>, request: Request) -> Response {
    serve(&node, request).await.unwrap_or_else(error_response)
}

async fn serve(node: &Arc<Node>, request: Request) -> Result<Response, Error> {
    let Request {
        method,
        path,
        headers,
        mut fields,
        ..
    } = request;
    let payload = fields.get("causal_payload").cloned().unwrap_or_default();
    let token = || node.parse_token(&payload);
    match Endpoint::parse(&method, &path)? {
        Endpoint::PartitionId => {
            let view = view_of(node)?;
            let id: i64 = match view.role_of(node.addr()) {
                Some(Role::Replica(uid)) => view.index_of(uid).map_or(-1, i64::from),
                _ => -1,
            };
            Ok(success(StatusCode::OK, json!({"partition_id": id})))
        }
        Endpoint::AllPartitionIds => {
            let ids: Vec<u32> = view_of(node)?.partition_ids().collect();
            Ok(success(StatusCode::OK, json!({"partition_id_list": ids})))
        }
        Endpoint::PartitionMembers => {
            let text = fields
                .get("partition_id")
                .ok_or_else(|| Error::bad_request("partition_id is missing"))?;
            let id: u32 = text.trim().parse().map_err(|_| {
                Error::bad_request(format!("partition_id {text:?} is not a partition id"))
            })?;
            let view = view_of(node)?;
            let members = view.replicas_at(id).ok_or_else(|| {
                Error::new(ErrorKind::NotFound, format!("there is no partition {id}"))
            })?;
            Ok(success(
                StatusCode::OK,
                json!({"partition_members": members}),
            ))
        }
        Endpoint::UpdateView => {
            node.authorize_admin(super::admin_credential(&headers))?;
            update_view(node, &fields).await
        }
        Endpoint::Get(key) => {
            let token = token().await?;
            let reply = node
                .get(&key, token, super::level(&fields, "r")?, true)
                .await?;
            let (value, ts) = reply
                .value
                .ok_or_else(|| Error::new(ErrorKind::NotFound, "key does not exist"))?;
            let mut answer = KeyAnswer::new(node, reply.index, &reply.token, ts / 1000)?;
            answer.value = Some(&value);
            Ok(answer.into_response(StatusCode::OK))
        }
        Endpoint::Put(key) => {
            let value = fields
                .remove("val")
                .ok_or_else(|| Error::bad_request("val is missing"))?;
            let token = token().await?;
            let reply = node
                .put(
                    &key,
                    value.into_bytes(),
                    token,
                    super::level(&fields, "w")?,
                    true,
                )
                .await?;
            let status = if reply.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            write_success(node, status, &reply)
        }
        Endpoint::Delete(key) => {
            let token = token().await?;
            let reply = node
                .delete(&key, token, super::level(&fields, "w")?, true)
                .await?;
            if reply.created {
                return Err(Error::new(ErrorKind::NotFound, "key does not exist"));
            }
            write_success(node, StatusCode::OK, &reply)
        }
    }
}

fn check_key(key: &str) -> Result<(), Error> {
    let ok = !key.is_empty()
        && key.chars().count() <= MAX_KEY_CHARS
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::bad_request(format!(
            "key must be 1 to {MAX_KEY_CHARS} characters of [A-Za-z0-9_]"
        )))
    }
}

fn seconds(ms: u64) -> String {
    (ms / 1000).to_string()
}

/// The success envelope of a key's GET, PUT or DELETE. It is the hot path, so it is
/// written straight into one buffer sized for it instead of going through a
/// `serde_json::Value` map; the bytes are what `success` would write for the same fields
/// (keys in the map's alphabetical order, serde_json's escaping), which a test checks.
struct KeyAnswer<'a> {
    causal_payload: String,
    partition_id: u32,
    timestamp: u64,
    value: Option<&'a [u8]>,
}

impl<'a> KeyAnswer<'a> {
    fn new(
        node: &Node,
        partition_id: u32,
        token: &crate::clock::CausalToken,
        ms: u64,
    ) -> Result<Self, Error> {
        Ok(Self {
            causal_payload: node.encode_token(token)?,
            partition_id,
            timestamp: ms,
            value: None,
        })
    }

    fn to_json(&self) -> Vec<u8> {
        let value = self.value.map(super::value_text);
        let mut out = Vec::with_capacity(
            128 + self.causal_payload.len() + value.as_ref().map_or(0, |v| v.len()),
        );
        out.extend_from_slice(b"{\"causal_payload\":");
        json_str(&mut out, &self.causal_payload);
        out.extend_from_slice(b",\"msg\":\"success\",\"partition_id\":");
        out.extend_from_slice(self.partition_id.to_string().as_bytes());
        out.extend_from_slice(b",\"result\":\"success\",\"timestamp\":");
        json_str(&mut out, &seconds(self.timestamp));
        if let Some(v) = &value {
            out.extend_from_slice(b",\"value\":");
            json_str(&mut out, v);
        }
        out.push(b'}');
        out
    }

    fn into_response(self, status: StatusCode) -> Response {
        let body = self.to_json();
        (
            status,
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    }
}

/// Appends `s` as a JSON string. Most values need no escaping, and checking that is far
/// cheaper than escaping byte by byte; the rest go through serde_json.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if !needs_escape(s.as_bytes()) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("writing a JSON string into a Vec cannot fail");
    }
}

/// Whether `s` holds a byte a JSON string must escape. A fold without an early exit, so
/// that the compiler vectorizes it: with `all`, which stops at the first such byte, a
/// 256-byte value cost about 2,500 instructions to check (callgrind), with this a few
/// hundred.
fn needs_escape(s: &[u8]) -> bool {
    s.iter().fold(false, |found, &b| {
        found | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

/// The answer to a PUT or DELETE that was applied.
fn write_success(node: &Node, status: StatusCode, reply: &WriteReply) -> Result<Response, Error> {
    Ok(
        KeyAnswer::new(node, reply.index, &reply.token, reply.timestamp_us / 1000)?
            .into_response(status),
    )
}

/// The node's view, or the retryable error of a node in no cluster.
fn view_of(node: &Node) -> Result<std::sync::Arc<crate::placement::View>, Error> {
    node.view().ok_or_else(|| {
        Error::unavailable(
            "this node is not part of a cluster yet: add it with PUT /kv-store/update_view?type=add on a member",
        )
    })
}

/// `PUT /kv-store/update_view?type=add|remove` with `ip_port`.
async fn update_view(
    node: &Arc<Node>,
    fields: &HashMap<String, String>,
) -> Result<Response, Error> {
    let kind = fields
        .get("type")
        .ok_or_else(|| Error::bad_request("type is missing: use ?type=add or ?type=remove"))?;
    let text = fields
        .get("ip_port")
        .ok_or_else(|| Error::bad_request("ip_port is missing"))?;
    let addr = parse_addr(text).map_err(|e| Error::bad_request(format!("ip_port: {e}")))?;
    let change = match kind.trim() {
        "add" => Change::Add(addr),
        "remove" => Change::Remove(addr),
        other => {
            return Err(Error::bad_request(format!(
                "type {other:?} is not add or remove"
            )))
        }
    };
    tracing::info!(%change, "update_view requested");
    let view = node.change_view(change.clone()).await?;
    let partitions = view.partition_count();
    Ok(match &change {
        Change::Add(added) => {
            // The added node's partition in the new view; -1 for a proxy.
            let id = match view.role_of(added) {
                Some(Role::Replica(uid)) => view.index_of(uid).map_or(-1, i64::from),
                _ => -1,
            };
            success(
                StatusCode::OK,
                json!({"partition_id": id, "number_of_partitions": partitions}),
            )
        }
        // Remove (this dialect asks for no other change).
        _ => success(StatusCode::OK, json!({"number_of_partitions": partitions})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written key answer is byte for byte what serde_json writes for the same
    /// fields, whatever the value holds.
    #[test]
    fn key_answers_are_what_serde_json_writes() {
        let check = |value: Option<&[u8]>| {
            let answer = KeyAnswer {
                causal_payload: "c2.abc-_".into(),
                partition_id: 7,
                timestamp: 1_796_284_522_123,
                value,
            };
            let mut expected = json!({
                "causal_payload": "c2.abc-_",
                "msg": "success",
                "partition_id": 7,
                "result": "success",
                "timestamp": "1796284522",
            });
            if let Some(v) = value {
                expected["value"] = json!(String::from_utf8_lossy(v));
            }
            let expected = serde_json::to_vec(&expected).expect("serialize");
            assert_eq!(
                String::from_utf8_lossy(&answer.to_json()),
                String::from_utf8_lossy(&expected)
            );
        };
        check(None);
        check(Some(b""));
        check(Some(b"plain value"));
        check(Some(
            b"quote \" backslash \\ newline \n tab \t nul \0 del \x7f",
        ));
        check(Some("caf\u{e9} \u{1f600}".as_bytes()));
        check(Some(&[0xff, 0xfe, b'a']));
        use proptest::prelude::*;
        proptest!(|(v in proptest::collection::vec(any::<u8>(), 0..64))| check(Some(&v)));
    }

    #[test]
    fn endpoints_have_metric_names() {
        let name = |m: Method, path: &str| (DIALECT.endpoint_of)(&m, path);
        assert_eq!(name(Method::GET, "/kv-store/abc"), "get");
        assert_eq!(name(Method::PUT, "/kv-store/abc"), "put");
        assert_eq!(name(Method::DELETE, "/kv-store/abc"), "delete");
        assert_eq!(name(Method::PUT, "/kv-store/update_view"), "update_view");
        assert_eq!(
            name(Method::GET, "/kv-store/get_partition_members"),
            "get_partition_members"
        );
        assert_eq!(name(Method::GET, "/kv-store/a-b"), INVALID_ENDPOINT);
        assert_eq!(name(Method::POST, "/kv-store/abc"), INVALID_ENDPOINT);
        assert_eq!(name(Method::GET, "/kv-store/a/b"), INVALID_ENDPOINT);
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key("abc_XYZ_09").is_ok());
        assert!(check_key(&"a".repeat(200)).is_ok());
        assert!(check_key(&"a".repeat(201)).is_err());
        assert!(check_key("").is_err());
        assert!(check_key("a-b").is_err());
        assert!(check_key("é").is_err());
    }

    #[test]
    fn every_kind_has_a_status() {
        assert_eq!(status_of(ErrorKind::BadRequest), StatusCode::BAD_REQUEST);
        assert_eq!(
            status_of(ErrorKind::TooLarge),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            status_of(ErrorKind::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(status_of(ErrorKind::Conflict), StatusCode::CONFLICT);
        assert_eq!(status_of(ErrorKind::Unauthorized), StatusCode::UNAUTHORIZED);
        assert_eq!(
            status_of(ErrorKind::OutcomeUnknown),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
