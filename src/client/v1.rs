//! The project's own API under `/api/v1` (DESIGN.md §5.4). Only what the tools use so
//! far: the node's status.

use std::time::Duration;

use super::{Client, ClientError, Method, Response};

/// Node `addr`'s `/api/v1` endpoints.
#[derive(Clone, Copy, Debug)]
pub struct V1<'a> {
    client: &'a Client,
    addr: &'a str,
    timeout: Option<Duration>,
}

impl<'a> V1<'a> {
    pub(super) fn new(client: &'a Client, addr: &'a str) -> Self {
        Self {
            client,
            addr,
            timeout: None,
        }
    }

    /// Calls through this handle get `timeout` instead of the client's.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// `GET /api/v1/status`: the node's role, view, readiness, key count and the view
    /// change in progress (JSON).
    pub async fn status(self) -> Result<Response, ClientError> {
        let call = self
            .client
            .request(Method::GET, self.addr, "/api/v1/status");
        match self.timeout {
            Some(t) => call.timeout(t),
            None => call,
        }
        .send()
        .await
    }
}
