//! How `/api/v1` renders what the node answers: a read's siblings with their values
//! (text or base64), a write's fields, listing cursors and the layout. The dialect's
//! endpoints, bodies and error mapping are in `mod.rs`.

use axum::http::StatusCode;
use base64::Engine;
use serde_json::{json, Value};

use super::{error_body, reply};
use crate::clock::Dot;
use crate::error::Error;
use crate::node::Node;
use crate::placement::View;
use crate::rpc::{ReadReply, WriteReply};

fn version_id(dot: Dot) -> String {
    format!("{:x}-{}", dot.replica, dot.counter)
}

/// A value as the answer shows it: text when it is UTF-8, else base64.
fn value_fields(value: &[u8], into: &mut serde_json::Map<String, Value>) {
    match std::str::from_utf8(value) {
        Ok(text) => into.insert("value".into(), json!(text)),
        Err(_) => into.insert(
            "value_base64".into(),
            json!(base64::engine::general_purpose::STANDARD.encode(value)),
        ),
    };
}

pub(super) fn read_answer(
    node: &Node,
    key: &str,
    read: ReadReply,
) -> Result<axum::response::Response, Error> {
    let mut siblings = Vec::new();
    let winner = read.value.as_ref().zip(read.siblings.winner);
    let others = read
        .siblings
        .others
        .iter()
        .map(|s| (s.dot, s.timestamp_us, s.value.as_slice()));
    let all = winner
        .map(|((value, ts), dot)| (dot, *ts, value.as_slice()))
        .into_iter()
        .chain(others);
    for (dot, timestamp_us, value) in all {
        let mut sibling = serde_json::Map::new();
        sibling.insert("version".into(), json!(version_id(dot)));
        sibling.insert("timestamp_ms".into(), json!(timestamp_us / 1000));
        value_fields(value, &mut sibling);
        siblings.push(Value::Object(sibling));
    }
    let context = node.encode_key_context(key, &read.siblings.context)?;
    let token = node.encode_token(&read.token)?;
    if siblings.is_empty() {
        let missing = Error::not_found(format!("key {key:?} does not exist"));
        let mut answer = error_body(&missing);
        answer["context"] = json!(context);
        answer["token"] = json!(token);
        answer["epoch"] = json!(node.epoch());
        return Ok(reply(StatusCode::NOT_FOUND, answer));
    }
    Ok(reply(
        StatusCode::OK,
        json!({
            "key": key,
            "siblings": siblings,
            "context": context,
            "token": token,
            "partition_id": read.index,
            "served_by": read.served_by,
            "epoch": node.epoch(),
        }),
    ))
}

pub(super) fn write_answer(
    node: &Node,
    status: StatusCode,
    mut answer: Value,
    written: &WriteReply,
) -> Result<axum::response::Response, Error> {
    answer["timestamp_ms"] = json!(written.timestamp_us / 1000);
    answer["token"] = json!(node.encode_token(&written.token)?);
    answer["partition_id"] = json!(written.index);
    answer["served_by"] = json!(written.served_by);
    answer["epoch"] = json!(node.epoch());
    Ok(reply(status, answer))
}

/// A listing position as an opaque cursor: `<slot>:<key>` in URL-safe base64. Not
/// signed: a made-up cursor only starts the listing elsewhere.
pub(super) fn encode_cursor((slot, key): &(u32, String)) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{slot}:{key}"))
}

pub(super) fn decode_cursor(text: &str) -> Result<(u32, String), Error> {
    let bad = || Error::bad_request("cursor is not one a listing returned");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim())
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (slot, key) = text.split_once(':').ok_or_else(bad)?;
    let slot = slot.parse::<u32>().map_err(|_| bad())?;
    Ok((slot, key.to_string()))
}

/// Which partition holds each slot, as runs: `[first_slot, partition_id]`, each run
/// lasting until the next one's first slot. What a client needs to send each key
/// straight to a replica of its partition (it hashes keys to slots itself,
/// `placement::slot_of`).
pub(super) fn layout(view: &View) -> Value {
    let mut runs: Vec<[u32; 2]> = Vec::new();
    for (slot, uid) in (0u32..).zip(&view.slots) {
        let index = view.index_of(*uid).unwrap_or_default();
        if runs.last().is_none_or(|run| run[1] != index) {
            runs.push([slot, index]);
        }
    }
    let partitions: Vec<Value> = (0u32..)
        .zip(&view.partitions)
        .map(|(i, p)| json!({"partition_id": i, "replicas": p.replicas}))
        .collect();
    json!({
        "epoch": view.epoch,
        "slots": view.slots.len(),
        "partitions": partitions,
        "slot_runs": runs,
    })
}
