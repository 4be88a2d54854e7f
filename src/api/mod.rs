//! Client dialects. Each file is one dialect: its [`Dialect`] entry (the paths it owns,
//! how its bodies are encoded, its largest body), its `Endpoint` enum, its wire types and
//! the one place where its errors become status codes and messages. They all call the
//! same [`crate::node::Node`] in dialect-neutral types.
//!
//! The HTTP layer (`crate::http`) reads and decodes every request before a dialect sees
//! it (one gate, one in-flight limit for the whole node) and hands it over as a
//! [`Request`]; a dialect never touches a socket or a body stream.

pub mod key_value_store;
pub mod kv_store;
pub mod kvs;
pub mod v1;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;

use crate::error::{Error, ErrorKind};
use crate::node::Node;
use crate::quorum::Level;

/// Every dialect the node serves, in the order their paths are matched.
const DIALECTS: [&Dialect; 4] = [
    &kv_store::DIALECT,
    &key_value_store::DIALECT,
    &kvs::DIALECT,
    &v1::DIALECT,
];

/// How a dialect's request bodies are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/x-www-form-urlencoded`, merged with the query string's fields.
    Form,
    /// One JSON document; the query string's fields are kept apart.
    Json,
}

/// A client request as a dialect receives it: read, bounded and decoded.
pub struct Request {
    pub method: Method,
    /// The path as sent (still percent-encoded).
    pub path: String,
    pub headers: HeaderMap,
    /// Form fields: the query string's, and for [`BodyFormat::Form`] the body's (which
    /// win).
    pub fields: HashMap<String, String>,
    /// The body of a [`BodyFormat::Json`] dialect (`Null` when empty).
    pub json: serde_json::Value,
}

/// The future a dialect's handler returns.
pub type Answer = Pin<Box<dyn Future<Output = Response> + Send>>;

/// One client dialect, as the HTTP layer sees it.
pub struct Dialect {
    pub name: &'static str,
    /// Whether a path belongs to this dialect.
    pub owns: fn(&str) -> bool,
    pub format: BodyFormat,
    /// Largest body accepted (413 beyond).
    pub max_body_bytes: usize,
    pub handle: fn(Arc<Node>, Request) -> Answer,
    /// The dialect's answer for an error found before its handler ran.
    pub error: fn(Error) -> Response,
    /// A short, stable name for the endpoint a method and path (one this dialect owns)
    /// address, one per variant of the dialect's `Endpoint` enum, or [`INVALID_ENDPOINT`]:
    /// the `endpoint` label of the request metrics (`http::metrics`), which must not
    /// carry keys or grow with what clients send.
    pub endpoint_of: fn(&Method, &str) -> &'static str,
}

/// The endpoint name of a request a dialect refuses before serving it (no such
/// endpoint, a method the endpoint does not take, a malformed key or id).
pub const INVALID_ENDPOINT: &str = "invalid";

/// The status code of an error of each kind, as every dialect maps it unless its
/// contract says otherwise (each dialect's `status_of` starts from this).
pub fn status_of_kind(kind: ErrorKind) -> StatusCode {
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
        ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorKind::Unsatisfiable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
    }
}

/// The dialect that owns `path`, if any.
pub fn dialect_of(path: &str) -> Option<&'static Dialect> {
    DIALECTS.into_iter().find(|d| (d.owns)(path))
}

/// The answer for a path no dialect owns. It keeps the envelope `/kv-store` always gave
/// it (a JSON object with `"error"`), which suits the other dialects' clients too.
pub fn unknown_path() -> Response {
    kv_store::unknown_path()
}

/// The key named by the rest of a path, percent-decoded (the JSON dialects take any
/// characters, up to their length limit).
pub(crate) fn path_key(raw: &str) -> Result<String, Error> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|k| k.into_owned())
        .map_err(|e| Error::bad_request(format!("the key is not UTF-8: {e}")))
}

/// The seeds 002/003 key rule: 1 to `max` characters, with their wording.
pub(crate) fn check_key_length(key: &str, max: usize) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::bad_request("Key is missing"));
    }
    if key.chars().count() > max {
        return Err(Error::bad_request("Key is too long"));
    }
    Ok(())
}

/// The level a request names in field `name` (`r` for reads, `w` for writes; see
/// `crate::quorum`), `None` when it names none (the cluster's default applies).
pub(crate) fn level(fields: &HashMap<String, String>, name: &str) -> Result<Option<Level>, Error> {
    fields
        .get(name)
        .map(|text| {
            text.parse()
                .map_err(|e| Error::bad_request(format!("{name}: {e}")))
        })
        .transpose()
}

/// A JSON dialect's PUT (seeds 002 and 003 answer it alike): writes `value` at the
/// request's `w=` level and returns the reply with the status and message the seeds
/// give it (201 "Added successfully" for a new key, 200 "Updated successfully").
pub(crate) async fn put_json(
    node: &Arc<Node>,
    request: &Request,
    key: &str,
    value: Vec<u8>,
    token: crate::clock::CausalToken,
) -> Result<(crate::rpc::WriteReply, StatusCode, &'static str), Error> {
    let w = level(&request.fields, "w")?;
    let reply = node.put(key, value, token, w, true).await?;
    let (status, message) = if reply.created {
        (StatusCode::CREATED, "Added successfully")
    } else {
        (StatusCode::OK, "Updated successfully")
    };
    Ok((reply, status, message))
}

/// A JSON answer.
pub(crate) fn json_reply(status: StatusCode, body: serde_json::Value) -> Response {
    use axum::response::IntoResponse;
    (status, axum::Json(body)).into_response()
}

/// The body of a JSON dialect's request: an object, or `Null` when there was none.
pub(crate) fn json_object(request: &Request) -> Result<&serde_json::Value, Error> {
    let body = &request.json;
    if body.is_object() || body.is_null() {
        Ok(body)
    } else {
        Err(Error::bad_request("the body must be a JSON object"))
    }
}

/// The `value` of a JSON dialect's PUT: a string as its text, any other JSON value as
/// its JSON text; `None` when absent or `null`.
pub(crate) fn value_field(body: &serde_json::Value) -> Option<Vec<u8>> {
    match body.get("value") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone().into_bytes()),
        Some(other) => Some(other.to_string().into_bytes()),
    }
}

/// A stored value as the text of a JSON answer: its bytes when they are UTF-8, with
/// U+FFFD for each invalid sequence otherwise (what `String::from_utf8_lossy` gives). The
/// standard check runs a word at a time over ASCII where `from_utf8_lossy` walks byte by
/// byte: about 1,800 instructions for a 256-byte value (callgrind), a tenth of a GET's
/// own work.
pub(crate) fn value_text(value: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(value) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(value),
    }
}

/// The admin credential a request carries: the token of an `Authorization: Bearer`
/// header (see `Node::authorize_admin`). Any dialect's admin endpoints pass it on.
pub fn admin_credential(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                axum::http::header::AUTHORIZATION,
                v.parse().expect("header value"),
            );
            admin_credential(&h).map(str::to_owned)
        };
        assert_eq!(with("Bearer s3cret"), Some("s3cret".into()));
        assert_eq!(with("bearer  s3cret "), Some("s3cret".into()));
        assert_eq!(with("Basic dXNlcjpwYXNz"), None);
        assert_eq!(with("s3cret"), None);
        assert_eq!(admin_credential(&HeaderMap::new()), None);
    }
}
