//! A client session of the own API (`/api/v1`) that routes by the cluster's layout:
//! what the CLI, `kvs bench --direct` and applications use.
//!
//! # Design
//!
//! * **Causal session.** The session keeps the token of its last answer and sends it
//!   with every key request (`X-Causal-Token`), so its reads never go back in time,
//!   across keys, partitions and nodes.
//! * **Direct routing.** It learns the layout (`GET /api/v1/layout`: which partition
//!   holds each slot and its replicas) from the first seed node that answers, hashes
//!   each key to its slot itself ([`crate::placement::slot_of`]) and sends the request
//!   to a replica of that partition, taking turns among them, so no node forwards it.
//!   Every key answer says the answering node's view epoch; an epoch newer than the
//!   layout's makes the session learn the layout again before its next request. A
//!   session made with [`Session::entry`] sends everything to its seed nodes instead
//!   (each then forwards what it does not hold), to compare the two.
//! * **Retries.** A request that certainly did not take effect (no connection; a 503
//!   "unavailable", which for a write means "not applied") goes to the partition's next
//!   replica, up to once per replica; a read is also retried after a timeout or a broken
//!   connection (reads are idempotent). A write that may have been applied is never
//!   resent: a second copy would be a new sibling; the caller gets the error.
//!
//! Caveats: a session is one sequence of requests (`&mut self`); run several for
//! concurrency. The layout is refreshed on evidence (a newer epoch, a replica that
//! refuses), not on a timer.

use base64::Engine;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Client, ClientError, Method, Response};
use crate::placement::slot_of;

/// Characters kept as they are in a key's path segment (RFC 3986 unreserved).
const KEY_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Why a session call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The cluster answered with an error (`code` from the API's error shape).
    #[error("{status} {code}: {message}")]
    Answer {
        status: u16,
        code: String,
        message: String,
    },
    /// No node gave an answer.
    #[error("{0}")]
    Transport(ClientError),
}

impl ApiError {
    /// The API's error code (`not_found`, `unavailable`, ...), or `transport`.
    pub fn code(&self) -> &str {
        match self {
            ApiError::Answer { code, .. } => code,
            ApiError::Transport(_) => "transport",
        }
    }
}

/// Where each slot lives (`GET /api/v1/layout`).
#[derive(Clone, Debug, Deserialize)]
pub struct Layout {
    pub epoch: u64,
    pub slots: u32,
    pub partitions: Vec<PartitionReplicas>,
    /// `[first_slot, partition_id]` runs.
    pub slot_runs: Vec<[u32; 2]>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PartitionReplicas {
    pub partition_id: u32,
    pub replicas: Vec<String>,
}

impl Layout {
    /// The replicas of the partition holding `slot`.
    fn replicas_of_slot(&self, slot: u32) -> Option<&[String]> {
        let run = self.slot_runs.partition_point(|run| run[0] <= slot);
        let partition = self.slot_runs.get(run.checked_sub(1)?)?[1];
        self.partitions
            .iter()
            .find(|p| p.partition_id == partition)
            .map(|p| p.replicas.as_slice())
    }
}

/// One concurrent value of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiblingValue {
    pub version: String,
    pub timestamp_ms: u64,
    pub value: Vec<u8>,
}

/// A read: every sibling and the context that replaces them all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    /// Empty when the key does not exist.
    pub siblings: Vec<SiblingValue>,
    pub context: String,
}

/// What a write may replace and require (see `writemode`).
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteOptions<'a> {
    /// The context of a read: replace exactly its siblings. `None`: add a sibling (a
    /// delete without one removes everything).
    pub context: Option<&'a str>,
    /// `"unchanged"` or `"absent"`.
    pub condition: Option<&'a str>,
}

/// A causal session of the own API (see the module doc).
pub struct Session {
    http: Client,
    seeds: Vec<String>,
    direct: bool,
    layout: Option<Layout>,
    stale: bool,
    token: String,
    turn: usize,
}

impl Session {
    /// A session that routes each key to its partition's replicas, learning the
    /// layout from `seeds`.
    pub fn direct(http: Client, seeds: Vec<String>) -> Self {
        Self {
            http,
            seeds,
            direct: true,
            layout: None,
            stale: true,
            token: String::new(),
            turn: 0,
        }
    }

    /// A session that sends every request to `seeds` (entry nodes that forward).
    pub fn entry(http: Client, seeds: Vec<String>) -> Self {
        Self {
            direct: false,
            ..Self::direct(http, seeds)
        }
    }

    /// The layout this session routes by, learning it first if it has none.
    pub async fn layout(&mut self) -> Result<&Layout, ApiError> {
        if self.stale || self.layout.is_none() {
            let answer = self.ask_seeds(Method::GET, "/api/v1/layout", None).await?;
            let layout: Layout = answer.json().map_err(ApiError::Transport)?;
            self.layout = Some(layout);
            self.stale = false;
        }
        self.layout
            .as_ref()
            .ok_or_else(|| ApiError::Transport(no_node("no layout")))
    }

    /// `GET /api/v1/kv/<key>`.
    pub async fn get(&mut self, key: &str) -> Result<Read, ApiError> {
        let path = key_path(key);
        match self.key_call(key, Method::GET, &path, None).await {
            Ok(body) => Ok(Read {
                siblings: siblings(&body),
                context: body["context"].as_str().unwrap_or_default().to_string(),
            }),
            Err((ApiError::Answer { status: 404, .. }, Some(body))) => Ok(Read {
                siblings: Vec::new(),
                context: body["context"].as_str().unwrap_or_default().to_string(),
            }),
            Err((e, _)) => Err(e),
        }
    }

    /// `PUT /api/v1/kv/<key>`: returns whether the key had no value before.
    pub async fn put(
        &mut self,
        key: &str,
        value: &[u8],
        options: WriteOptions<'_>,
    ) -> Result<bool, ApiError> {
        let mut body = match std::str::from_utf8(value) {
            Ok(text) => json!({ "value": text }),
            Err(_) => json!({ "value_base64": B64.encode(value) }),
        };
        add_options(&mut body, options);
        let answer = self
            .key_call(key, Method::PUT, &key_path(key), Some(body))
            .await
            .map_err(|(e, _)| e)?;
        Ok(answer["created"].as_bool().unwrap_or(false))
    }

    /// `DELETE /api/v1/kv/<key>`: returns whether there was something to delete.
    pub async fn delete(&mut self, key: &str, options: WriteOptions<'_>) -> Result<bool, ApiError> {
        let mut body = json!({});
        add_options(&mut body, options);
        match self
            .key_call(key, Method::DELETE, &key_path(key), Some(body))
            .await
        {
            Ok(_) => Ok(true),
            Err((ApiError::Answer { status: 404, .. }, _)) => Ok(false),
            Err((e, _)) => Err(e),
        }
    }

    /// One page of `GET /api/v1/kv`: keys and the cursor of the next page.
    pub async fn list(
        &mut self,
        prefix: &str,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<String>, Option<String>), ApiError> {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("prefix", prefix)
            .append_pair("limit", &limit.to_string())
            .append_pair("cursor", cursor.unwrap_or_default())
            .finish();
        let answer = self
            .ask_seeds(Method::GET, &format!("/api/v1/kv?{query}"), None)
            .await?;
        let body: Value = answer.json().map_err(ApiError::Transport)?;
        let keys = body["keys"]
            .as_array()
            .map(|k| {
                k.iter()
                    .filter_map(|k| k.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        Ok((keys, body["cursor"].as_str().map(String::from)))
    }

    /// Any other `/api/v1` call (status, members, partitions, admin changes), sent to
    /// the seeds in turn; the admin token of the client goes with it.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ApiError> {
        let answer = self.ask_seeds(method, path, body).await?;
        answer.json().map_err(ApiError::Transport)
    }

    /// Sends to the seeds in turn until one answers; an error answer is the error.
    async fn ask_seeds(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Response, ApiError> {
        let mut last = no_node("no seed node given");
        for i in 0..self.seeds.len() {
            let seed = self.seeds[(self.turn + i) % self.seeds.len()].clone();
            match self.send(&seed, method.clone(), path, body.as_ref()).await {
                Ok(answer) => return checked(answer).map_err(|(e, _)| e),
                Err(e) => last = e,
            }
        }
        Err(ApiError::Transport(last))
    }

    /// A key request, to the key's replicas (direct) or the seeds, with the retries of
    /// the module doc. The error comes with its body when there was one.
    async fn key_call(
        &mut self,
        key: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, (ApiError, Option<Value>)> {
        let targets = if self.direct {
            let slot = slot_of(key);
            let layout = self.layout().await.map_err(|e| (e, None))?;
            layout
                .replicas_of_slot(slot)
                .map(<[String]>::to_vec)
                .unwrap_or_default()
        } else {
            self.seeds.clone()
        };
        if targets.is_empty() {
            return Err((ApiError::Transport(no_node("no replica for the key")), None));
        }
        let read = method == Method::GET;
        self.turn = self.turn.wrapping_add(1);
        let mut last = None;
        for i in 0..targets.len() {
            let target = &targets[(self.turn + i) % targets.len()];
            let answer = match self.send(target, method.clone(), path, body.as_ref()).await {
                Ok(answer) => answer,
                Err(e) => {
                    let resend = read || matches!(e, ClientError::Connect { .. });
                    last = Some((ApiError::Transport(e), None));
                    if resend {
                        self.stale = true;
                        continue;
                    }
                    break;
                }
            };
            let value: Option<Value> = answer.json().ok();
            if let Some(v) = &value {
                self.observe(v);
            }
            match checked(answer) {
                Ok(_) => return Ok(value.unwrap_or(Value::Null)),
                // Not applied (or a read that can go elsewhere): the next replica.
                Err((e @ ApiError::Answer { status: 503, .. }, _))
                    if read || e.code() == "unavailable" =>
                {
                    self.stale = true;
                    last = Some((e, value));
                }
                Err((e, _)) => return Err((e, value)),
            }
        }
        Err(last.unwrap_or_else(|| (ApiError::Transport(no_node("no replica answered")), None)))
    }

    /// Takes the token and epoch of a key answer.
    fn observe(&mut self, answer: &Value) {
        if let Some(token) = answer["token"].as_str() {
            self.token = token.to_string();
        }
        let epoch = answer["epoch"].as_u64().unwrap_or(0);
        if self.layout.as_ref().is_some_and(|l| epoch > l.epoch) {
            self.stale = true;
        }
    }

    async fn send(
        &self,
        addr: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response, ClientError> {
        let mut call = self.http.request(method, addr, path);
        if let Some(body) = body {
            call = call.json(body);
        }
        if !self.token.is_empty() {
            call = call.header("x-causal-token", self.token.as_str());
        }
        if let Some(admin) = self.http.admin_token() {
            call = call.bearer(admin);
        }
        call.send().await
    }
}

fn no_node(reason: &str) -> ClientError {
    ClientError::Connect {
        addr: String::new(),
        reason: reason.to_string(),
    }
}

fn key_path(key: &str) -> String {
    format!("/api/v1/kv/{}", utf8_percent_encode(key, KEY_SEGMENT))
}

fn add_options(body: &mut Value, options: WriteOptions<'_>) {
    if let Some(context) = options.context {
        body["context"] = json!(context);
    }
    if let Some(condition) = options.condition {
        body["condition"] = json!(condition);
    }
}

/// A 2xx answer as is; any other as an [`ApiError::Answer`] (with its body).
fn checked(answer: Response) -> Result<Response, (ApiError, Option<Value>)> {
    if answer.status.is_success() {
        return Ok(answer);
    }
    let body: Option<Value> = answer.json().ok();
    let error = body.as_ref().map(|b| &b["error"]);
    Err((
        ApiError::Answer {
            status: answer.status.as_u16(),
            code: error
                .and_then(|e| e["code"].as_str())
                .unwrap_or("unknown")
                .to_string(),
            message: error
                .and_then(|e| e["message"].as_str())
                .map_or_else(|| answer.text().into_owned(), String::from),
        },
        body,
    ))
}

fn siblings(body: &Value) -> Vec<SiblingValue> {
    body["siblings"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|s| SiblingValue {
                    version: s["version"].as_str().unwrap_or_default().to_string(),
                    timestamp_ms: s["timestamp_ms"].as_u64().unwrap_or(0),
                    value: match (s["value"].as_str(), s["value_base64"].as_str()) {
                        (Some(text), _) => text.as_bytes().to_vec(),
                        (None, Some(b64)) => B64.decode(b64).unwrap_or_default(),
                        (None, None) => Vec::new(),
                    },
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_map_to_their_runs() {
        let layout = Layout {
            epoch: 1,
            slots: 10,
            partitions: vec![
                PartitionReplicas {
                    partition_id: 0,
                    replicas: vec!["a".into()],
                },
                PartitionReplicas {
                    partition_id: 1,
                    replicas: vec!["b".into()],
                },
            ],
            slot_runs: vec![[0, 0], [4, 1], [7, 0]],
        };
        let owner = |s| layout.replicas_of_slot(s).map(|r| r[0].clone());
        assert_eq!(owner(0).as_deref(), Some("a"));
        assert_eq!(owner(3).as_deref(), Some("a"));
        assert_eq!(owner(4).as_deref(), Some("b"));
        assert_eq!(owner(6).as_deref(), Some("b"));
        assert_eq!(owner(9).as_deref(), Some("a"));
    }

    #[test]
    fn keys_are_escaped_in_paths() {
        assert_eq!(key_path("a b/ü"), "/api/v1/kv/a%20b%2F%C3%BC");
        assert_eq!(key_path("k-1_x.y~"), "/api/v1/kv/k-1_x.y~");
    }
}
