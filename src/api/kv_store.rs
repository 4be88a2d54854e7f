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
//! change is complete (see `server::reconfig`); `type` may also come as a form field.
//! Status codes come from [`status_of`] alone: 409 for adding a member or a node of
//! another configuration, 404 for removing a non-member, 503 for an unreachable node or
//! a change that cannot complete now, 401 for an `update_view` without the admin token
//! when the node has one (`ADMIN_TOKEN`, sent as `Authorization: Bearer <token>`).
//!
//! Every request is admitted through the node's client gate (`api::body`): its body is
//! read first, at most [`MAX_BODY_BYTES`] (413, at once when `Content-Length` says so)
//! within [`body::BODY_TIMEOUT`] (408), and only then does it take one of the node's in-flight
//! permits. Form fields are percent-decoded as `application/x-www-form-urlencoded`
//! says (malformed escapes are kept as they are); a name or value that is not UTF-8
//! once decoded is refused with 400 naming the field, never stored altered.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use axum::Router;

use axum::extract::rejection::PathRejection;
use serde_json::{json, Value};

use crate::api::body::{self, Limits};
use crate::error::{Error, ErrorKind};
use crate::placement::{parse_addr, Change, Role};
use crate::rpc::WriteReply;
use crate::server::{Node, MAX_VALUE_BYTES};

/// Largest request body accepted. Percent-encoding can triple a value's size, so this
/// leaves room for a [`MAX_VALUE_BYTES`] value (2 MiB) however it is encoded.
pub const MAX_BODY_BYTES: usize = 3 * MAX_VALUE_BYTES + 64 * 1024;
/// What this dialect allows a request body: [`MAX_BODY_BYTES`], within
/// [`body::BODY_TIMEOUT`].
const BODY_LIMITS: Limits = Limits {
    max_bytes: MAX_BODY_BYTES,
    deadline: body::BODY_TIMEOUT,
};
/// Longest field name quoted back in an error.
const QUOTED_NAME_CHARS: usize = 64;
/// Names under `/kv-store/` that are endpoints; they cannot be used as keys.
const RESERVED: [&str; 4] = [
    "get_partition_id",
    "get_all_partition_ids",
    "get_partition_members",
    "update_view",
];
/// Longest key accepted.
pub const MAX_KEY_CHARS: usize = 200;

pub fn router() -> Router<Arc<Node>> {
    Router::new()
        .route(
            "/kv-store/{name}",
            get(get_endpoint)
                .put(put_endpoint)
                .delete(delete_endpoint)
                .fallback(method_not_allowed),
        )
        // `{name}` does not match an empty segment; an empty key is a bad key, not a
        // missing endpoint.
        .route(
            "/kv-store/",
            get(empty_key)
                .put(empty_key)
                .delete(empty_key)
                .fallback(method_not_allowed),
        )
}

/// The one place where errors become status codes in this dialect.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Timeout => StatusCode::REQUEST_TIMEOUT,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        // Retryable by the client, like an unavailable node (a retry is a new write).
        ErrorKind::OutcomeUnknown => StatusCode::SERVICE_UNAVAILABLE,
    }
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
pub async fn unknown_path() -> Response {
    error_response(Error::new(ErrorKind::NotFound, "no such endpoint"))
}

/// A request past the node's gate (`api::body`): its form fields, the body budget they
/// stand for and its in-flight permit, all held until the request is answered.
struct Admitted {
    fields: HashMap<String, String>,
    _budget: body::Lease<'static>,
    _in_flight: body::InFlight<'static>,
}

/// Reads the body (bounded in size, time and node-wide memory), parses the form fields
/// of the query string and the body (the body wins), and only then waits for a permit
/// of the in-flight limit. A bare GET takes only the permit.
async fn admit(query: Option<String>, body: Body) -> Result<Admitted, Error> {
    let gate = &body::CLIENTS;
    let buffered = gate.read(body, BODY_LIMITS).await?;
    let mut fields = HashMap::new();
    if let Some(query) = &query {
        parse_form(query.as_bytes(), &mut fields)?;
    }
    parse_form(buffered.bytes(), &mut fields)?;
    // The fields are no larger than the body (decoding only shrinks), so the body's
    // budget stands for them.
    let budget = buffered.into_lease();
    let in_flight = gate.enter().await;
    Ok(Admitted {
        fields,
        _budget: budget,
        _in_flight: in_flight,
    })
}

/// Adds the pairs of the form-encoded `source` to `fields`, decoded as
/// `form_urlencoded::parse` decodes them (a later pair wins; malformed escapes stay as
/// they are), except that a name or value that is not UTF-8 once decoded is refused
/// (400, naming the field) rather than altered. `pub(crate)` for the fuzz target
/// `fuzz::form`.
pub(crate) fn parse_form(source: &[u8], fields: &mut HashMap<String, String>) -> Result<(), Error> {
    for pair in source.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &[][..]),
        };
        let name = decode(name).ok_or_else(|| {
            let shown: String = String::from_utf8_lossy(name)
                .chars()
                .take(QUOTED_NAME_CHARS)
                .collect();
            Error::bad_request(format!(
                "a form field name is not valid UTF-8 once percent-decoded: {shown:?}"
            ))
        })?;
        let value = decode(value).ok_or_else(|| {
            let shown: String = name.chars().take(QUOTED_NAME_CHARS).collect();
            Error::bad_request(format!(
                "form field {shown:?} is not valid UTF-8 once percent-decoded"
            ))
        })?;
        fields.insert(name, value);
    }
    Ok(())
}

/// One form-encoded name or value: `+` is a space, `%XX` a byte (malformed escapes stay
/// as they are); `None` when the result is not UTF-8.
fn decode(raw: &[u8]) -> Option<String> {
    if !raw.iter().any(|&b| b == b'%' || b == b'+') {
        // Nothing to decode, the common case (`val=` and plain characters): only
        // validate, which is several times cheaper than decoding byte by byte.
        return std::str::from_utf8(raw).ok().map(str::to_owned);
    }
    let spaced: std::borrow::Cow<'_, [u8]> = if raw.contains(&b'+') {
        raw.iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect::<Vec<u8>>()
            .into()
    } else {
        raw.into()
    };
    percent_encoding::percent_decode(&spaced)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

/// The key (or endpoint name) from the path, with the dialect's error envelope when the
/// path cannot be decoded (e.g. invalid UTF-8).
fn path_name(path: Result<Path<String>, PathRejection>) -> Result<String, Error> {
    path.map(|Path(name)| name)
        .map_err(|e| Error::bad_request(format!("bad path: {e}")))
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

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(json!({"result": "error", "msg": "error",
            "error": "this dialect supports GET, PUT and DELETE only"})),
    )
        .into_response()
}

async fn empty_key() -> Response {
    error_response(
        check_key("")
            .err()
            .unwrap_or_else(|| Error::internal("the empty key passed the key check")),
    )
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
        let value = self.value.map(String::from_utf8_lossy);
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
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("writing a JSON string into a Vec cannot fail");
    }
}

/// The answer to a PUT or DELETE that was applied.
fn write_success(node: &Node, status: StatusCode, reply: &WriteReply) -> Result<Response, Error> {
    Ok(KeyAnswer::new(node, reply.index, &reply.token, reply.timestamp_ms)?.into_response(status))
}

async fn get_endpoint(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    let result = async {
        let name = path_name(path)?;
        let request = admit(query, body).await?;
        let fields = &request.fields;
        match name.as_str() {
            "get_partition_id" => {
                let view = view_of(&node)?;
                let id: i64 = match view.role_of(node.addr()) {
                    Some(Role::Replica(uid)) => view.index_of(uid).map_or(-1, i64::from),
                    _ => -1,
                };
                Ok(success(StatusCode::OK, json!({"partition_id": id})))
            }
            "get_all_partition_ids" => {
                let ids: Vec<u32> = view_of(&node)?.partition_ids().collect();
                Ok(success(StatusCode::OK, json!({"partition_id_list": ids})))
            }
            "update_view" => Ok(method_not_allowed().await),
            "get_partition_members" => {
                let text = fields
                    .get("partition_id")
                    .ok_or_else(|| Error::bad_request("partition_id is missing"))?;
                let id: u32 = text.trim().parse().map_err(|_| {
                    Error::bad_request(format!("partition_id {text:?} is not a partition id"))
                })?;
                let view = view_of(&node)?;
                let members = view.replicas_at(id).ok_or_else(|| {
                    Error::new(ErrorKind::NotFound, format!("there is no partition {id}"))
                })?;
                Ok(success(
                    StatusCode::OK,
                    json!({"partition_members": members}),
                ))
            }
            key => {
                check_key(key)?;
                let token = node
                    .parse_token(fields.get("causal_payload").map_or("", |s| s))
                    .await?;
                let reply = node.get(key, token, true).await?;
                let (value, ts) = reply
                    .value
                    .ok_or_else(|| Error::new(ErrorKind::NotFound, "key does not exist"))?;
                let mut answer = KeyAnswer::new(&node, reply.index, &reply.token, ts)?;
                answer.value = Some(&value);
                Ok(answer.into_response(StatusCode::OK))
            }
        }
    }
    .await;
    result.unwrap_or_else(error_response)
}

async fn put_endpoint(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let name = path_name(path)?;
        let mut request = admit(query, body).await?;
        let fields = &mut request.fields;
        if name == "update_view" {
            node.authorize_admin(super::admin_credential(&headers))?;
            return update_view(&node, fields).await;
        }
        check_key(&name)?;
        if RESERVED.contains(&name.as_str()) {
            return Err(Error::bad_request(format!(
                "{name} is an endpoint name and cannot be used as a key"
            )));
        }
        let value = fields
            .remove("val")
            .ok_or_else(|| Error::bad_request("val is missing"))?;
        let token = node
            .parse_token(fields.get("causal_payload").map_or("", |s| s))
            .await?;
        let reply = node.put(&name, value.into_bytes(), token, true).await?;
        let status = if reply.created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        write_success(&node, status, &reply)
    }
    .await;
    result.unwrap_or_else(error_response)
}

async fn delete_endpoint(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    let result = async {
        let name = path_name(path)?;
        let request = admit(query, body).await?;
        let fields = &request.fields;
        check_key(&name)?;
        if RESERVED.contains(&name.as_str()) {
            return Ok(method_not_allowed().await);
        }
        let token = node
            .parse_token(fields.get("causal_payload").map_or("", |s| s))
            .await?;
        let reply = node.delete(&name, token, true).await?;
        if reply.created {
            return Err(Error::new(ErrorKind::NotFound, "key does not exist"));
        }
        write_success(&node, StatusCode::OK, &reply)
    }
    .await;
    result.unwrap_or_else(error_response)
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
    let out = node.update_view(change.clone()).await?;
    let partitions = out.view.partition_count();
    Ok(match change {
        Change::Add(_) => success(
            StatusCode::OK,
            json!({
                "partition_id": out.partition_index.map_or(-1, i64::from),
                "number_of_partitions": partitions,
            }),
        ),
        // Remove (this dialect asks for no other change).
        _ => success(StatusCode::OK, json!({"number_of_partitions": partitions})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forms decode exactly as form_urlencoded decodes them, on the split-only fast path
    /// and through percent-decoding alike, when every field is UTF-8 once decoded; any
    /// field that is not is an error. This alphabet cannot spell U+FFFD (its escapes
    /// decode to `"`, `*`, 0xa2 and 0xaa), so a U+FFFD in form_urlencoded's lossy
    /// output marks exactly the forms that must be refused.
    #[test]
    fn forms_parse_as_form_urlencoded_parses_them() {
        use proptest::prelude::*;
        let alphabet = prop_oneof![
            Just(b'&'),
            Just(b'='),
            Just(b'%'),
            Just(b'+'),
            Just(b'2'),
            Just(b'a'),
            Just(0xc3u8),
            Just(0xa9u8),
            Just(0xffu8),
        ];
        proptest!(|(source in proptest::collection::vec(alphabet, 0..24))| {
            let mut parsed = HashMap::new();
            let result = parse_form(&source, &mut parsed);
            let pairs: Vec<(String, String)> = form_urlencoded::parse(&source)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            if pairs.iter().any(|(k, v)| k.contains('\u{fffd}') || v.contains('\u{fffd}')) {
                let e = result.expect_err("a form with invalid UTF-8 must be refused");
                prop_assert_eq!(e.kind, ErrorKind::BadRequest);
            } else {
                prop_assert!(result.is_ok(), "{:?}", result);
                prop_assert_eq!(parsed, pairs.into_iter().collect::<HashMap<_, _>>());
            }
        });
    }

    #[test]
    fn invalid_utf8_in_a_field_is_refused_naming_the_field() {
        for source in [
            &b"val=\xff"[..],
            b"causal_payload=&val=%FF",
            b"val=caf%C3",
            b"val=\xc3+",
        ] {
            let e = parse_form(source, &mut HashMap::new()).expect_err("refused");
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert!(e.message.contains("\"val\""), "{}", e.message);
        }
        let e = parse_form(b"v%FFl=1", &mut HashMap::new()).expect_err("refused");
        assert!(e.message.contains("name"), "{}", e.message);
        let mut fields = HashMap::new();
        parse_form(
            "val=caf\u{e9}&x=caf%C3%A9+%EF%BF%BD".as_bytes(),
            &mut fields,
        )
        .expect("valid UTF-8");
        assert_eq!(fields["val"], "caf\u{e9}");
        assert_eq!(fields["x"], "caf\u{e9} \u{fffd}");
        // Malformed escapes are left as they are, as before.
        parse_form(b"val=%zz%2", &mut fields).expect("malformed escapes are kept");
        assert_eq!(fields["val"], "%zz%2");
    }

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
