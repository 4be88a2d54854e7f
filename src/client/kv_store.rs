//! The `/kv-store` dialect (seeds 000/001, DESIGN.md §5.1): form bodies on every
//! request, GET included; JSON answers with `result`/`msg`, errors included.

use std::time::Duration;

use super::{Call, Client, ClientError, Method, Response};

/// Node `addr`'s `/kv-store` endpoints. Every call answers a [`Response`] whatever its
/// status (404 unknown key, 400 bad input, 503 partition unreachable are answers):
/// `response.json::<serde_json::Value>()` reads the reply.
#[derive(Clone, Copy, Debug)]
pub struct KvStore<'a> {
    client: &'a Client,
    addr: &'a str,
    timeout: Option<Duration>,
    /// `r=` of reads and `w=` of writes and deletes, when given (see `crate::quorum`).
    read_level: Option<&'a str>,
    write_level: Option<&'a str>,
}

impl<'a> KvStore<'a> {
    pub(super) fn new(client: &'a Client, addr: &'a str) -> Self {
        Self {
            client,
            addr,
            timeout: None,
            read_level: None,
            write_level: None,
        }
    }

    /// Key reads through this handle send `r=<read>`, writes and deletes `w=<write>`
    /// (a replica count, `quorum` or `all`); `None` leaves the node's default.
    pub fn levels(mut self, read: Option<&'a str>, write: Option<&'a str>) -> Self {
        self.read_level = read;
        self.write_level = write;
        self
    }

    /// `fields`, plus `name=level` when a level is set.
    fn with_level<'f>(
        fields: &[(&'f str, &'f str)],
        name: &'f str,
        level: Option<&'f str>,
    ) -> Vec<(&'f str, &'f str)> {
        let mut all = fields.to_vec();
        all.extend(level.map(|l| (name, l)));
        all
    }

    /// The node's address.
    pub fn addr(&self) -> &'a str {
        self.addr
    }

    /// Calls through this handle get `timeout` instead of the client's (a view change
    /// answers only once every key has moved).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Each helper builds its call in a statement of its own: the temporaries of
    /// `format_args!` are not `Send` and must not live across the `.await`.
    fn call(self, method: Method, path: std::fmt::Arguments<'_>) -> Call<'a> {
        let call = self.client.request(method, self.addr, path);
        match self.timeout {
            Some(t) => call.timeout(t),
            None => call,
        }
    }

    /// `GET /kv-store/<key>`, form `causal_payload` (may be empty).
    pub async fn get(self, key: &str, causal_payload: &str) -> Result<Response, ClientError> {
        let call = self
            .call(Method::GET, format_args!("/kv-store/{key}"))
            .form(&Self::with_level(
                &[("causal_payload", causal_payload)],
                "r",
                self.read_level,
            ));
        call.send().await
    }

    /// `PUT /kv-store/<key>`, form `val`, `causal_payload`.
    pub async fn put(
        self,
        key: &str,
        val: &str,
        causal_payload: &str,
    ) -> Result<Response, ClientError> {
        let call = self
            .call(Method::PUT, format_args!("/kv-store/{key}"))
            .form(&Self::with_level(
                &[("val", val), ("causal_payload", causal_payload)],
                "w",
                self.write_level,
            ));
        call.send().await
    }

    /// `DELETE /kv-store/<key>`, form `causal_payload`.
    pub async fn delete(self, key: &str, causal_payload: &str) -> Result<Response, ClientError> {
        let call = self
            .call(Method::DELETE, format_args!("/kv-store/{key}"))
            .form(&Self::with_level(
                &[("causal_payload", causal_payload)],
                "w",
                self.write_level,
            ));
        call.send().await
    }

    /// `PUT /kv-store/update_view?type=<kind>`, form `ip_port`: `kind` is `add` or
    /// `remove` (anything else is sent as given, for the node to refuse). Carries the
    /// client's admin token, if it has one.
    pub async fn update_view(self, kind: &str, ip_port: &str) -> Result<Response, ClientError> {
        let kind: String = form_urlencoded::byte_serialize(kind.as_bytes()).collect();
        let mut call = self
            .call(
                Method::PUT,
                format_args!("/kv-store/update_view?type={kind}"),
            )
            .form(&[("ip_port", ip_port)]);
        if let Some(token) = self.client.admin_token() {
            call = call.bearer(token);
        }
        call.send().await
    }

    /// `GET /kv-store/get_partition_id` (with an empty form).
    pub async fn partition_id(self) -> Result<Response, ClientError> {
        let call = self
            .call(Method::GET, format_args!("/kv-store/get_partition_id"))
            .form(&[]);
        call.send().await
    }

    /// `GET /kv-store/get_all_partition_ids` (with an empty form).
    pub async fn all_partition_ids(self) -> Result<Response, ClientError> {
        let call = self
            .call(Method::GET, format_args!("/kv-store/get_all_partition_ids"))
            .form(&[]);
        call.send().await
    }

    /// `GET /kv-store/get_partition_members`, form `partition_id`.
    pub async fn partition_members(self, partition_id: i64) -> Result<Response, ClientError> {
        let call = self
            .call(Method::GET, format_args!("/kv-store/get_partition_members"))
            .form(&[("partition_id", &partition_id.to_string())]);
        call.send().await
    }
}
