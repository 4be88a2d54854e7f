//! `GET /`: the node's live status page, for a person with a browser.
//!
//! # Design
//!
//! The page is one static file, [`PAGE`] (`status_page.html`: HTML, CSS and JavaScript
//! together), compiled into the binary and served as it is: the server renders nothing,
//! so the page costs the node no more than a small static answer and the node's layers
//! know nothing of it. Its script polls, every 1.5 s and each call bounded by a
//! timeout, three endpoints of the same node:
//!
//! * `GET /api/v1/status` (`Node::status_report`): the view (partitions, their replicas
//!   and slots, the proxies), this node's failure-detector verdicts on every peer (a
//!   member is shown `up`, `suspect` or `down`), the change in progress and, on the node
//!   coordinating it, its phase and the keys and bytes moved so far;
//! * `GET /api/v1/partitions`: the key count of every partition, when the node serves it;
//!   otherwise the page shows this node's own count for its partition and `?` for the rest;
//! * `GET /metrics` (Prometheus text): request rate from the deltas of
//!   `kvs_http_requests_total` between two scrapes, mean latency from those of
//!   `kvs_http_request_duration_seconds_sum` and `_count`, p99 interpolated in the
//!   bucket deltas (as Prometheus' `histogram_quantile` does); `n/a` while the node has
//!   no such endpoint.
//!
//! A failed or refused fetch is shown (a banner, the source's state in the footer, a red
//! or amber dot by the time of the last update) and the last good data stays on screen;
//! polling goes on. The DOM carries stable hooks for tests and scripts: every member is
//! one element with `data-member="<ip:port>"` and `data-health="up|suspect|down|unknown"`,
//! every partition one with `data-partition="<id>"` (and `data-live`, `data-state`),
//! `#updated` changes on every successful refresh (its `data-refreshes` counts them).
//! `tests/browser/status_page.py` checks them in a real headless browser.
//!
//! The answer says `Cache-Control: no-store` and carries a Content-Security-Policy that
//! lets the page load nothing from anywhere (no fonts, scripts, styles or images other
//! than its own inline ones) and connect to its own origin only, so "self-contained" is
//! enforced by the browser as well as checked by the tests below.
//!
//! # Caveats
//!
//! * Everything is as the answering node sees it: its view (which may trail the cluster's
//!   by a gossip round during a change), its failure detector's verdicts, its own request
//!   counters. Another node's page may differ, in a network partition above all.
//! * The change's progress (phase, keys moved) is known only to the node coordinating it;
//!   elsewhere the page shows the learned transition with an indeterminate bar. The
//!   status reports no total of keys to move, so the bar follows the pulls done (or the
//!   phase alone before the pulls are planned).
//! * The rates include the page's own polls (three requests per refresh per open page).
//! * The page cannot fall over to another node: a browser script may only call the origin
//!   that served it. When that node dies the page says so and keeps its last data.
//! * Like `/api/v1/status`, the page needs no secret and shows no data values; it is
//!   read-only. It does show the cluster's addresses to whoever can reach the node.

use axum::http::header;
use axum::response::IntoResponse;

/// The whole page: HTML, CSS and JavaScript, with no external assets.
pub const PAGE: &str = include_str!("status_page.html");

/// What the browser may do with the page: run its own inline script and styles, fetch
/// from its own origin, and nothing else.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; img-src data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `GET /` (and `HEAD /`).
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PAGE,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{Method, Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::Service;

    use super::*;
    use crate::node::{Node, NodeConfig};
    use crate::rpc::{CallError, CallFuture, Envelope, Transport};
    use crate::storage::MemoryStore;

    /// A network with no one on it: the node under test is in no cluster.
    struct Nobody;

    impl Transport for Nobody {
        fn call(&self, to: &str, _: &Envelope, _: Duration) -> CallFuture<'_> {
            let to = to.to_string();
            Box::pin(async move { Err(CallError::NotSent(to, "no network in this test".into())) })
        }
    }

    fn node() -> Arc<Node> {
        let cfg = NodeConfig {
            addr: "127.0.0.1:1".into(),
            env_view: None,
            k: Some(2),
            secret: "s".into(),
            admin_token: None,
            join: None,
            levels: Default::default(),
            tombstone_horizon: Duration::from_secs(60),
            auto_replace_after: None,
        };
        Node::start(cfg, Arc::new(MemoryStore::new()), Arc::new(Nobody)).expect("starts")
    }

    async fn call(method: Method, path: &str) -> (StatusCode, axum::http::HeaderMap, String) {
        let mut app = super::super::router(node());
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .expect("request");
        let response = app.call(request).await.expect("infallible");
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        let text = String::from_utf8(bytes.to_vec()).expect("UTF-8");
        (parts.status, parts.headers, text)
    }

    /// The values of every `attr` (`src=`, `href=`, ...) in `html`.
    fn values_of<'a>(html: &'a str, attr: &str) -> Vec<&'a str> {
        html.match_indices(attr)
            .map(|(i, _)| {
                let rest = html[i + attr.len()..].trim_start_matches(['"', '\'', ' ']);
                let end = rest.find(['"', '\'', ' ', ')', '>']).unwrap_or(rest.len());
                &rest[..end]
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_page_is_served_at_the_root_as_html_that_is_not_cached() {
        let (status, headers, body) = call(Method::GET, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        assert_eq!(
            headers[header::CONTENT_SECURITY_POLICY],
            CONTENT_SECURITY_POLICY
        );
        assert_eq!(body, PAGE);
        // HEAD answers the same headers.
        let (status, headers, _) = call(Method::HEAD, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_rest_of_the_surface_is_unchanged() {
        // Other methods on `/` and unknown paths still get the one 404 of the dialects.
        for (method, path) in [
            (Method::POST, "/"),
            (Method::PUT, "/"),
            (Method::DELETE, "/"),
            (Method::GET, "/index.html"),
            (Method::GET, "/nothing/here"),
        ] {
            let (status, headers, body) = call(method.clone(), path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
            assert!(
                headers[header::CONTENT_TYPE]
                    .to_str()
                    .unwrap()
                    .starts_with("application/json"),
                "{method} {path}"
            );
            let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            assert!(json.get("error").is_some(), "{method} {path}: {body}");
        }
        // The status endpoint the page polls is still JSON.
        let (status, _, body) = call(Method::GET, crate::http::STATUS_PATH).await;
        assert_eq!(status, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(json["node"], "127.0.0.1:1");
    }

    #[test]
    fn the_page_is_self_contained() {
        for attr in ["src=", "href=", "url(", "@import", "action="] {
            for value in values_of(PAGE, attr) {
                let v = value.to_ascii_lowercase();
                assert!(
                    !(v.starts_with("http:") || v.starts_with("https:") || v.starts_with("//")),
                    "{attr}{value} loads something from elsewhere"
                );
            }
        }
        // The only absolute URL in the file is the SVG namespace name (an identifier that
        // is never fetched).
        let rest = PAGE
            .to_ascii_lowercase()
            .replace("http://www.w3.org/2000/svg", "");
        for scheme in ["http://", "https://", "ws://", "wss://"] {
            assert!(!rest.contains(scheme), "the page names a {scheme} address");
        }
        // Every fetch goes to this node's own paths.
        for value in values_of(PAGE, "fetchText(") {
            assert!(
                value.starts_with("SOURCES.") || value == "path",
                "fetchText({value})"
            );
        }
        for path in ["'/api/v1/status'", "'/api/v1/partitions'", "'/metrics'"] {
            assert!(PAGE.contains(path), "the page polls {path}");
        }
        assert!(!PAGE.contains("<link rel=\"stylesheet\""));
    }

    #[test]
    fn the_page_has_the_hooks_the_browser_test_reads() {
        for hook in [
            "id=\"updated\"",
            "data-refreshes",
            "'data-member'",
            "'data-health'",
            "'data-partition'",
            "'data-live'",
            "id=\"error\"",
            "id=\"change\"",
            "id=\"partitions\"",
            "id=\"proxies\"",
            "id=\"traffic\"",
        ] {
            assert!(PAGE.contains(hook), "the page lacks {hook}");
        }
        for health in ["'up'", "'suspect'", "'down'"] {
            assert!(PAGE.contains(health), "the page never shows {health}");
        }
    }
}
