//! The client against a tiny axum server on 127.0.0.1 (port 0): what goes on the wire,
//! and every way a call can fail.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::any;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::*;

/// What the echo route saw.
async fn echo(ConnectInfo(peer): ConnectInfo<SocketAddr>, request: Request) -> Json<Value> {
    let (parts, body) = request.into_parts();
    let header = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("(body error: {e})"));
    Json(json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "content_type": header(header::CONTENT_TYPE),
        "authorization": header(header::AUTHORIZATION),
        "x_test": header(header::HeaderName::from_static("x-test")),
        "body": body,
        "peer_port": peer.port(),
    }))
}

/// Starts the test server; returns its `ip:port`.
async fn server() -> String {
    let app = Router::new()
        .route(
            "/slow",
            any(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .route("/big", any(|| async { "x".repeat(64 * 1024) }))
        .route(
            "/big-chunked",
            any(|| async {
                let chunks = (0..64).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 1024]));
                axum::body::Body::from_stream(futures_util::stream::iter(chunks))
            }),
        )
        .route(
            "/text",
            any(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "not json").into_response() }),
        )
        .route(
            "/missing",
            any(|| async { (StatusCode::NOT_FOUND, Json(json!({"result": "error"}))) }),
        )
        .fallback(echo);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    addr
}

#[tokio::test]
async fn kv_store_requests_are_forms_on_the_dialects_paths() {
    let addr = server().await;
    let client = Client::new();
    let node = client.kv_store(&addr);

    let reply = node.get("k1", "").await.expect("answer");
    assert_eq!(reply.status, StatusCode::OK);
    let seen: Value = reply.json().expect("json");
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["path"], "/kv-store/k1");
    assert_eq!(seen["content_type"], FORM);
    assert_eq!(seen["body"], "causal_payload=");
    assert_eq!(seen["authorization"], Value::Null);

    // Form encoding: spaces, separators, slashes and non-ASCII are escaped.
    let seen: Value = node
        .put("k_2", "a b&c=d/é+", "tok=en")
        .await
        .expect("answer")
        .json()
        .expect("json");
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["path"], "/kv-store/k_2");
    assert_eq!(
        seen["body"],
        "val=a+b%26c%3Dd%2F%C3%A9%2B&causal_payload=tok%3Den"
    );

    let seen: Value = node
        .delete("k3", "t")
        .await
        .expect("answer")
        .json()
        .expect("json");
    assert_eq!(
        (&seen["method"], &seen["body"]),
        (&json!("DELETE"), &json!("causal_payload=t"))
    );

    let seen: Value = node
        .partition_members(3)
        .await
        .expect("answer")
        .json()
        .expect("json");
    assert_eq!(seen["path"], "/kv-store/get_partition_members");
    assert_eq!(seen["body"], "partition_id=3");

    for (reply, path) in [
        (node.partition_id().await, "/kv-store/get_partition_id"),
        (
            node.all_partition_ids().await,
            "/kv-store/get_all_partition_ids",
        ),
    ] {
        let seen: Value = reply.expect("answer").json().expect("json");
        assert_eq!(seen["path"], path);
        assert_eq!(
            seen["content_type"], FORM,
            "an empty form, as the tests sent"
        );
        assert_eq!(seen["body"], "");
    }

    // update_view: the kind in the query, the node in the form; no token, no header.
    let seen: Value = node
        .update_view("add", "127.0.0.9:8080")
        .await
        .expect("answer")
        .json()
        .expect("json");
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["path"], "/kv-store/update_view");
    assert_eq!(seen["query"], "type=add");
    assert_eq!(seen["body"], "ip_port=127.0.0.9%3A8080");
    assert_eq!(seen["authorization"], Value::Null);
}

#[tokio::test]
async fn the_admin_token_goes_with_view_changes_only() {
    let addr = server().await;
    let client = Client::builder().admin_token(Some("s3cret".into())).build();
    let node = client.kv_store(&addr);
    let seen: Value = node
        .update_view("remove", "127.0.0.9:8080")
        .await
        .expect("answer")
        .json()
        .expect("json");
    assert_eq!(seen["query"], "type=remove");
    assert_eq!(seen["authorization"], "Bearer s3cret");
    let seen: Value = node
        .put("k", "v", "")
        .await
        .expect("answer")
        .json()
        .expect("json");
    assert_eq!(seen["authorization"], Value::Null);
    // An empty token is no token.
    let client = Client::builder().admin_token(Some(String::new())).build();
    assert_eq!(client.admin_token(), None);
}

#[tokio::test]
async fn low_level_calls_carry_json_raw_bodies_headers_and_queries() {
    let addr = server().await;
    let client = Client::new();
    let seen: Value = client
        .request(Method::POST, &addr, "/anything?x=1&y=two")
        .json(&json!({"socket-address": "127.0.0.9:8080"}))
        .header("x-test", "yes")
        .bearer("tok")
        .send()
        .await
        .expect("answer")
        .json()
        .expect("json");
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/anything");
    assert_eq!(seen["query"], "x=1&y=two");
    assert_eq!(seen["content_type"], JSON);
    assert_eq!(seen["body"], r#"{"socket-address":"127.0.0.9:8080"}"#);
    assert_eq!(seen["x_test"], "yes");
    assert_eq!(seen["authorization"], "Bearer tok");

    // A raw body has no content type; a later body's type replaces an earlier one.
    let seen: Value = client
        .request(Method::PUT, &addr, "/raw")
        .body(&b"\x00\x01"[..])
        .send()
        .await
        .expect("answer")
        .json()
        .expect("json");
    assert_eq!(seen["content_type"], Value::Null);
    assert_eq!(seen["body"], "\u{0}\u{1}");
    let seen: Value = client
        .request(Method::PUT, &addr, format_args!("/p/{}", 7))
        .json(&1)
        .form(&[("a", "b")])
        .send()
        .await
        .expect("answer")
        .json()
        .expect("json");
    assert_eq!(seen["path"], "/p/7");
    assert_eq!(seen["content_type"], FORM);
    assert_eq!(seen["body"], "a=b");
}

#[tokio::test]
async fn error_statuses_are_answers() {
    let addr = server().await;
    let reply = Client::new()
        .request(Method::GET, &addr, "/missing")
        .send()
        .await
        .expect("a 404 is an answer");
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.json::<Value>().expect("json")["result"], "error");
}

#[tokio::test]
async fn a_body_that_is_not_json_is_a_bad_answer_with_status_and_body() {
    let addr = server().await;
    let reply = Client::new()
        .request(Method::GET, &addr, "/text")
        .send()
        .await
        .expect("answer");
    assert_eq!(reply.text(), "not json");
    match reply.json::<Value>() {
        Err(ClientError::BadAnswer {
            status,
            body,
            addr: a,
            ..
        }) => {
            assert_eq!(
                (status, body.as_str(), a.as_str()),
                (500, "not json", &*addr)
            );
        }
        other => panic!("expected a bad answer, got {other:?}"),
    }
    // Typed parsing, borrowing from the body.
    #[derive(serde::Deserialize)]
    struct Seen<'a> {
        method: &'a str,
    }
    let reply = Client::new()
        .request(Method::PATCH, &addr, "/x")
        .send()
        .await
        .expect("answer");
    assert_eq!(reply.json::<Seen<'_>>().expect("shape").method, "PATCH");
    assert!(matches!(
        reply.json::<Vec<u8>>(),
        Err(ClientError::BadAnswer { status: 200, .. })
    ));
}

#[tokio::test]
async fn a_slow_answer_times_out_at_the_calls_deadline() {
    let addr = server().await;
    let client = Client::builder()
        .timeout(Duration::from_millis(200))
        .build();
    let started = Instant::now();
    let outcome = client.request(Method::GET, &addr, "/slow").send().await;
    assert_eq!(
        outcome.expect_err("timed out"),
        ClientError::Timeout {
            addr: addr.clone(),
            after: Duration::from_millis(200)
        }
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    // A call's own deadline overrides the client's; so does a dialect handle's.
    let outcome = client
        .request(Method::GET, &addr, "/slow")
        .timeout(Duration::from_millis(50))
        .send()
        .await;
    assert!(
        matches!(outcome, Err(ClientError::Timeout { after, .. }) if after == Duration::from_millis(50))
    );
    let outcome = Client::new()
        .v1(&addr)
        .timeout(Duration::from_millis(50))
        .status()
        .await
        .expect("the echo route answers at once");
    assert_eq!(
        outcome.json::<Value>().expect("json")["path"],
        "/api/v1/status"
    );
}

#[tokio::test]
async fn bodies_over_the_cap_are_refused_announced_or_streamed() {
    let addr = server().await;
    let client = Client::builder().max_body(1024).build();
    for path in ["/big", "/big-chunked"] {
        let outcome = client.request(Method::GET, &addr, path).send().await;
        assert_eq!(
            outcome.expect_err("too large"),
            ClientError::TooLarge {
                addr: addr.clone(),
                status: 200,
                limit: 1024
            },
            "{path}"
        );
    }
    // At the cap exactly, the body is read.
    let client = Client::builder().max_body(64 * 1024).build();
    for path in ["/big", "/big-chunked"] {
        let reply = client
            .request(Method::GET, &addr, path)
            .send()
            .await
            .expect("at the cap");
        assert_eq!(reply.body.len(), 64 * 1024, "{path}");
    }
}

#[tokio::test]
async fn a_closed_port_is_a_connect_error() {
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").to_string()
    };
    let outcome = Client::new().kv_store(&addr).get("k", "").await;
    match outcome {
        Err(ClientError::Connect { addr: a, reason }) => {
            assert_eq!(a, addr);
            assert!(!reason.is_empty());
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_requests_are_refused_before_sending() {
    let client = Client::new();
    for (addr, path) in [
        ("127.0.0.1:9", "no-slash"),
        ("127.0.0.1:9/x", "/y"),
        ("", "/y"),
        ("127.0.0.1:9", "/a b"),
    ] {
        let outcome = client.request(Method::GET, addr, path).send().await;
        assert!(
            matches!(outcome, Err(ClientError::InvalidRequest { .. })),
            "{addr} {path}: {outcome:?}"
        );
    }
    let outcome = client
        .request(Method::GET, "127.0.0.1:9", "/")
        .header("bad header", "x")
        .send()
        .await;
    assert!(matches!(outcome, Err(ClientError::InvalidRequest { .. })));
}

#[tokio::test]
async fn connections_are_reused_unless_pooling_is_off() {
    let addr = server().await;
    let port = |client: Client| {
        let addr = addr.clone();
        async move {
            let mut ports = Vec::new();
            for _ in 0..3 {
                let seen: Value = client
                    .request(Method::GET, &addr, "/who")
                    .send()
                    .await
                    .expect("answer")
                    .json()
                    .expect("json");
                ports.push(seen["peer_port"].as_u64().expect("port"));
            }
            ports
        }
    };
    let pooled = port(Client::new()).await;
    assert!(pooled.iter().all(|p| *p == pooled[0]), "{pooled:?}");
    let fresh = port(Client::builder().pool_max_idle_per_host(0).build()).await;
    assert!(fresh[0] != fresh[1] && fresh[1] != fresh[2], "{fresh:?}");
}

#[test]
fn forms_encode_like_serde_urlencoded() {
    let fields = [("val", "a b&c=é"), ("causal_payload", ""), ("x", "+/%")];
    assert_eq!(
        encode_form(&fields),
        serde_urlencoded::to_string(fields).expect("encodes")
    );
    assert_eq!(encode_form(&[]), "");
}
