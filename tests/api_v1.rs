//! Process-level tests of the own API (`/api/v1`, `api::v1`): binary values, siblings
//! made by concurrent writers and resolved by a write carrying the read's context,
//! conditional writes, a listing of 10,000 keys across partitions, and the admin token
//! on membership changes. Address ranges `127.77.124.0/24` and `127.77.125.0/24`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Cluster, POLL_INTERVAL};
use kvs::client::{header, Client, Method};
use serde_json::{json, Value};

const SCENARIO: Duration = Duration::from_secs(240);
const CONVERGENCE: Duration = Duration::from_secs(10);
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One JSON request to `/api/v1`: its status and body.
async fn call(
    http: &Client,
    addr: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut req = http.request(method.clone(), addr, path);
    if let Some(body) = body {
        req = req.json(&body);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path} to {addr}: {e}"));
    let body = resp
        .json::<Value>()
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", resp.text()));
    (resp.status.as_u16(), body)
}

/// The values of a read's siblings, sorted (base64 ones decoded as lossy text).
fn values(read: &Value) -> Vec<String> {
    let mut out: Vec<String> = read["siblings"]
        .as_array()
        .map(|s| {
            s.iter()
                .map(|v| match v["value"].as_str() {
                    Some(text) => text.to_string(),
                    None => v["value_base64"].as_str().unwrap_or("?").to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn values_siblings_conditions_and_listing() {
    let c = Cluster::start(124, 4, 2).await;
    let http = Client::builder().timeout(Duration::from_secs(30)).build();
    c.within(SCENARIO, async {
        let (a, b) = (c.addr(0).to_owned(), c.addr(3).to_owned());

        // Binary values: every byte value, through a node that may forward.
        let bytes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        let body = json!({"value_base64": B64.encode(&bytes)});
        let (status, put) = call(&http, &a, Method::PUT, "/api/v1/kv/bin", Some(body), &[]).await;
        assert_eq!(status, 201, "{put}");
        let token = put["token"].as_str().expect("token").to_string();
        let (status, read) = call(
            &http,
            &b,
            Method::GET,
            "/api/v1/kv/bin",
            None,
            &[("X-Causal-Token", &token)],
        )
        .await;
        assert_eq!(status, 200, "{read}");
        let got = read["siblings"][0]["value_base64"]
            .as_str()
            .expect("base64");
        assert_eq!(B64.decode(got).expect("base64"), bytes);
        assert!(read["siblings"][0].get("value").is_none(), "{read}");

        // Two writers without a context: two siblings, at every node once converged.
        let key = "/api/v1/kv/shared%20key";
        let one = call(
            &http,
            &a,
            Method::PUT,
            key,
            Some(json!({"value": "from a"})),
            &[],
        );
        let two = call(
            &http,
            &b,
            Method::PUT,
            key,
            Some(json!({"value": "from b"})),
            &[],
        );
        let (one, two) = tokio::join!(one, two);
        assert!(
            matches!(one.0, 200 | 201) && matches!(two.0, 200 | 201),
            "{one:?} {two:?}"
        );
        let deadline = Instant::now() + CONVERGENCE;
        let read = loop {
            let (status, read) = call(&http, &b, Method::GET, key, None, &[]).await;
            assert_eq!(status, 200, "{read}");
            if values(&read) == ["from a", "from b"] {
                break read;
            }
            assert!(Instant::now() < deadline, "siblings never appeared: {read}");
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        let context = read["context"].as_str().expect("context").to_string();

        // Someone writes again meanwhile: a conditional write with the old context fails,
        // a plain one with it replaces exactly what the read saw.
        let (status, _) = call(
            &http,
            &a,
            Method::PUT,
            key,
            Some(json!({"value": "third"})),
            &[],
        )
        .await;
        // 201 when it reached a replica the siblings had not reached yet (this write
        // carries no token, so it need not wait for them).
        assert!(matches!(status, 200 | 201), "{status}");
        let stale = json!({"value": "x", "context": context, "condition": "unchanged"});
        let (status, refused) = call(&http, &a, Method::PUT, key, Some(stale), &[]).await;
        assert_eq!(status, 412, "{refused}");
        assert_eq!(error_code(&refused), "precondition_failed");
        let resolve = json!({"value": "resolved", "context": context});
        let (status, put) = call(&http, &b, Method::PUT, key, Some(resolve), &[]).await;
        assert!(matches!(status, 200 | 201), "{put}");
        let token = put["token"].as_str().expect("token").to_string();
        let deadline = Instant::now() + CONVERGENCE;
        let read = loop {
            let (_, read) = call(
                &http,
                &a,
                Method::GET,
                key,
                None,
                &[("X-Causal-Token", &token)],
            )
            .await;
            if values(&read) == ["resolved", "third"] {
                break read;
            }
            assert!(Instant::now() < deadline, "not resolved: {read}");
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        // With the current context the condition holds, and the key has one value.
        let current =
            json!({"value": "final", "context": read["context"], "condition": "unchanged"});
        let (status, put) = call(
            &http,
            &a,
            Method::PUT,
            key,
            Some(current),
            &[("X-Causal-Token", &token)],
        )
        .await;
        assert_eq!(status, 200, "{put}");
        let token = put["token"].as_str().expect("token").to_string();
        let (_, read) = call(
            &http,
            &b,
            Method::GET,
            key,
            None,
            &[("X-Causal-Token", &token)],
        )
        .await;
        assert_eq!(values(&read), ["final"], "{read}");

        // Create-only: refused on a key with a value, accepted on a new one.
        let absent = json!({"value": "y", "condition": "absent"});
        let (status, refused) = call(&http, &a, Method::PUT, key, Some(absent.clone()), &[]).await;
        assert_eq!(
            (status, error_code(&refused)),
            (412, "precondition_failed"),
            "{refused}"
        );
        let (status, _) = call(&http, &a, Method::PUT, "/api/v1/kv/new", Some(absent), &[]).await;
        assert_eq!(status, 201);

        // A context is bound to its key, and forged ones are refused.
        let other = json!({"value": "z", "context": read["context"]});
        let (status, refused) =
            call(&http, &a, Method::PUT, "/api/v1/kv/new", Some(other), &[]).await;
        assert_eq!(
            (status, error_code(&refused)),
            (400, "bad_request"),
            "{refused}"
        );
        let bad = json!({"value": "z", "context": "k1.AAAA.AAAA"});
        assert_eq!(
            call(&http, &a, Method::PUT, key, Some(bad), &[]).await.0,
            400
        );
        let both = json!({"value": "z", "value_base64": "eg=="});
        assert_eq!(
            call(&http, &a, Method::PUT, key, Some(both), &[]).await.0,
            400
        );
        let unknown = json!({"value": "z", "colour": "red"});
        assert_eq!(
            call(&http, &a, Method::PUT, key, Some(unknown), &[])
                .await
                .0,
            400
        );

        // Delete with the context; then the key is gone everywhere for this session.
        let (_, read) = call(
            &http,
            &b,
            Method::GET,
            key,
            None,
            &[("X-Causal-Token", &token)],
        )
        .await;
        let del = json!({"context": read["context"]});
        let (status, deleted) = call(&http, &b, Method::DELETE, key, Some(del), &[]).await;
        assert_eq!(status, 200, "{deleted}");
        let token = deleted["token"].as_str().expect("token").to_string();
        for node in [&a, &b] {
            let (status, gone) = call(
                &http,
                node,
                Method::GET,
                key,
                None,
                &[("X-Causal-Token", &token)],
            )
            .await;
            assert_eq!((status, error_code(&gone)), (404, "not_found"), "{gone}");
            assert!(gone["context"].is_string(), "{gone}");
        }
        let (status, _) = call(&http, &a, Method::DELETE, "/api/v1/kv/never", None, &[]).await;
        assert_eq!(status, 404);

        // Listing: 10,000 keys over both partitions, in pages of 700, each exactly once.
        let wanted: BTreeSet<String> = (0..10_000).map(|i| format!("item-{i:05}")).collect();
        let keys: Vec<String> = wanted.iter().cloned().collect();
        let load = keys
            .chunks(keys.len() / 32 + 1)
            .enumerate()
            .map(|(n, chunk)| {
                let (http, addr) = (http.clone(), c.addr(n % 4).to_owned());
                async move {
                    for k in chunk {
                        let path = format!("/api/v1/kv/{k}");
                        let body = json!({"value": k});
                        let (status, answer) =
                            call(&http, &addr, Method::PUT, &path, Some(body), &[]).await;
                        assert_eq!(status, 201, "{answer}");
                    }
                }
            });
        futures_util::future::join_all(load).await;
        let deadline = Instant::now() + CONVERGENCE;
        loop {
            let mut seen = BTreeSet::new();
            let mut cursor = String::new();
            let mut pages = 0;
            loop {
                let path = format!("/api/v1/kv?prefix=item-&limit=700&cursor={cursor}");
                let (status, page) = call(&http, &b, Method::GET, &path, None, &[]).await;
                assert_eq!(status, 200, "{page}");
                let page_keys = page["keys"].as_array().expect("keys");
                assert!(page_keys.len() <= 700);
                for k in page_keys {
                    let k = k.as_str().expect("key").to_string();
                    assert!(seen.insert(k.clone()), "{k} listed twice");
                }
                pages += 1;
                assert!(pages < 1_000, "the listing does not end");
                match page["cursor"].as_str() {
                    Some(next) => cursor = next.to_string(),
                    None => break,
                }
            }
            // Replicas may still be receiving the last writes: every key listed is one
            // we wrote, and once converged all are.
            assert!(seen.is_subset(&wanted));
            if seen == wanted {
                assert!(pages >= 15, "pages of at most 700: {pages}");
                break;
            }
            assert!(Instant::now() < deadline, "{} of 10000 listed", seen.len());
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        let (status, page) = call(
            &http,
            &a,
            Method::GET,
            "/api/v1/kv?prefix=item-0999&limit=50",
            None,
            &[],
        )
        .await;
        assert_eq!(status, 200);
        let listed: BTreeSet<&str> = page["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(listed.len(), 10, "{page}");
        for (bad, why) in [
            ("limit=0", "zero"),
            ("limit=abc", "text"),
            ("cursor=%21%21", "junk"),
        ] {
            let (status, body) = call(
                &http,
                &a,
                Method::GET,
                &format!("/api/v1/kv?{bad}"),
                None,
                &[],
            )
            .await;
            assert_eq!(status, 400, "{why}: {body}");
        }

        // Members and partitions: every member, both partitions with their key counts.
        let (status, members) = call(&http, &a, Method::GET, "/api/v1/members", None, &[]).await;
        assert_eq!(status, 200, "{members}");
        assert_eq!(
            members["members"].as_array().map(Vec::len),
            Some(4),
            "{members}"
        );
        let (status, parts) = call(&http, &a, Method::GET, "/api/v1/partitions", None, &[]).await;
        assert_eq!(status, 200, "{parts}");
        let parts = parts["partitions"].as_array().expect("partitions").clone();
        assert_eq!(parts.len(), 2);
        let total: u64 = parts.iter().filter_map(|p| p["keys"].as_u64()).sum();
        // 10,000 items, "bin", "new", the two siblings' key was deleted.
        assert_eq!(total, 10_002, "{parts:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_operations_need_the_admin_token() {
    let token = "v1-admin-secret";
    let c = Cluster::start_with_spares(125, 3, 1, 2, &[("ADMIN_TOKEN", token)]).await;
    let http = Client::builder().timeout(Duration::from_secs(120)).build();
    c.within(SCENARIO, async {
        c.start_spare(3).await;
        let addr = c.addr(0).to_owned();
        let add = json!({"addr": c.addr(3)});
        let bearer = format!("Bearer {token}");
        for auth in [None, Some("Bearer wrong")] {
            let headers: Vec<(&str, &str)> = auth
                .map(|a| (header::AUTHORIZATION.as_str(), a))
                .into_iter()
                .collect();
            let (status, body) = call(
                &http,
                &addr,
                Method::POST,
                "/api/v1/members",
                Some(add.clone()),
                &headers,
            )
            .await;
            assert_eq!((status, error_code(&body)), (401, "unauthorized"), "{body}");
        }
        let path = format!("/api/v1/members/{}", c.addr(1));
        assert_eq!(
            call(&http, &addr, Method::DELETE, &path, None, &[]).await.0,
            401
        );
        assert_eq!(c.view_of(0).await.map(|v| v.1.len()), Some(3), "unchanged");
        // Data needs no admin token.
        let (status, _) = call(
            &http,
            &addr,
            Method::PUT,
            "/api/v1/kv/k",
            Some(json!({"value": "v"})),
            &[],
        )
        .await;
        assert_eq!(status, 201);

        let auth = [(header::AUTHORIZATION.as_str(), bearer.as_str())];
        let (status, view) = call(
            &http,
            &addr,
            Method::POST,
            "/api/v1/members",
            Some(add),
            &auth,
        )
        .await;
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["members"].as_array().map(Vec::len), Some(4), "{view}");
        let bad = json!({"addr": "not an address"});
        let (status, body) = call(
            &http,
            &addr,
            Method::POST,
            "/api/v1/members",
            Some(bad),
            &auth,
        )
        .await;
        assert_eq!((status, error_code(&body)), (400, "bad_request"), "{body}");
        let (status, view) = call(&http, &addr, Method::DELETE, &path, None, &auth).await;
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["members"].as_array().map(Vec::len), Some(3), "{view}");
        // The key written before both changes is still there.
        let (status, read) = call(&http, c.addr(2), Method::GET, "/api/v1/kv/k", None, &[]).await;
        assert_eq!(status, 200, "{read}");
        assert_eq!(values(&read), ["v"]);
    })
    .await;
}
