//! The ceiling for one HTTP request on this machine: an axum server that answers GET
//! with a fixed body and PUT by reading the body, nothing else. `bench/compare.sh`
//! measures it beside kvs and etcd.
//!
//! usage: cargo run --release --example hello -- 127.0.0.1:18080

use axum::routing::get;
use axum::Router;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18080".into());
    let app = Router::new().route(
        "/{*path}",
        get(|| async { "hello" })
            .put(|body: axum::body::Bytes| async move { format!("{}", body.len()) }),
    );
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
