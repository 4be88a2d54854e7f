//! An in-process transport for tests that run whole nodes in one process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use kvs::node::{Node, NodeConfig};
use kvs::placement::View;
use kvs::rpc::{CallError, CallFuture, Envelope, Response, Transport};
use kvs::storage::MemoryStore;

/// Delivers every call to the named node's `handle_rpc` on its own task, through the
/// codec. A name with no running node is "nobody there".
#[derive(Default)]
pub struct Loopback {
    nodes: Mutex<HashMap<String, Weak<Node>>>,
}

impl Transport for Loopback {
    fn call(&self, to: &str, envelope: &Envelope, timeout: Duration) -> CallFuture<'_> {
        let node = self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(to)
            .and_then(Weak::upgrade);
        let bytes = kvs::rpc::encode(envelope);
        let to = to.to_string();
        Box::pin(async move {
            let Some(node) = node else {
                return Err(CallError::NotSent(to, "nobody there".into()));
            };
            let env: Envelope = kvs::rpc::decode(&bytes)
                .map_err(|e| CallError::Refused(to.clone(), e.to_string()))?;
            let task = tokio::spawn(async move { kvs::rpc::encode(&node.handle_rpc(env).await) });
            match tokio::time::timeout(timeout, task).await {
                Ok(Ok(answer)) => kvs::rpc::decode::<Response>(&answer)
                    .map_err(|e| CallError::Unreachable(to, e.to_string())),
                Ok(Err(e)) => Err(CallError::Unreachable(to, e.to_string())),
                Err(_) => Err(CallError::Timeout(to, timeout)),
            }
        })
    }
}

impl Loopback {
    /// Delivers calls to `name` to `node` from now on.
    pub fn register(&self, name: &str, node: &Arc<Node>) {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Arc::downgrade(node));
    }

    /// Starts a node named `addr` on `store` with this transport, a member of `view` (a
    /// blank node when `None`; `k` as `K` gives it), and delivers calls to it.
    pub fn start_node(
        self: &Arc<Self>,
        addr: &str,
        view: Option<View>,
        k: Option<usize>,
        store: Arc<MemoryStore>,
    ) -> Arc<Node> {
        let cfg = NodeConfig {
            addr: addr.to_string(),
            env_view: view,
            k,
            secret: "loopback-test".into(),
            admin_token: None,
            join: None,
            levels: Default::default(),
            tombstone_horizon: Duration::from_secs(60),
            auto_replace_after: None,
        };
        let node = Node::start(cfg, store, self.clone()).expect("node starts");
        self.register(addr, &node);
        node
    }
}
