//! The cluster key at a node: who may call it, how the key is formed and handed over,
//! and the admin token. The key itself and what is derived from it are in `auth`.
//!
//! # Who may call a node
//!
//! [`Node::admit`] decides, before a call is decoded further than its envelope:
//!
//! * A node in a cluster (a view, or a change it is joining) that holds the key admits
//!   only calls carrying the member proof. Holding no key yet (the cluster is forming,
//!   or the node's disk was wiped), it admits none: it cannot tell members from others.
//! * A node in no cluster (started without `VIEW`, or removed) has no one to check
//!   against and admits every call: whoever adds it first is its cluster (see the
//!   caveats in `auth`). It holds no data a caller could take or destroy.
//! * The two messages that hand the key out are admitted everywhere and carry their own
//!   checks (below).
//!
//! Past admission, `Node::handle_rpc` refuses state-changing calls from senders outside
//! the node's view and the change in progress (a removed node keeps the key), and a node
//! adopts views only from members ([`Current::knows`]).
//!
//! # Forming the key
//!
//! A node in a cluster without the key runs [`Node::acquire_key`]: every
//! [`KEY_RETRY`]-ish interval it sends [`Request::KeyRequest`] with a fresh nonce to every
//! other member it knows. A member holding the key delivers it by *calling the asker's
//! address from its own view* with [`Request::KeyDelivery`] quoting the nonce; the asker
//! accepts a delivery only for a nonce it sent. So the key only ever reaches the process
//! listening at a member's address, and no one can plant a key in a node. A member
//! without a key answers [`KeyAnswer::NoKey`]. The view's first member
//! (`auth::generator`) draws a new key once every other member of its view has answered
//! `NoKey` — a cluster forming for the first time, or re-formed on wiped disks, which is
//! then a new cluster whose predecessor's tokens are refused. Every node persists the key
//! (`writer::durable::META_CLUSTER_KEY`) before it uses or hands it out.
//!
//! Forming is quick whichever member starts last. A keyless member remembers the latest
//! nonce of each member that asked it, and delivers the key to them as soon as it
//! obtains one; and being asked ends its own pause between rounds (the asker may be the
//! generator, about to draw). Before, a member that asked just before the key was drawn
//! waited out its pause (up to [`KEY_RETRY_MAX`]) while the generator, already serving
//! clients, forwarded it requests it refused with 503.
//!
//! A node joining a running cluster (an added node) drops any key from an earlier
//! cluster when it learns the change and fetches the cluster's key from the members of
//! the change's old view, which know it as a newcomer.
//!
//! # Admin token
//!
//! With `ADMIN_TOKEN` set, membership changes need it ([`Node::authorize_admin`]); the
//! dialects take it from a request header. Without it, anyone who can reach a node can
//! change the membership, as the seeds expect; the node warns once at start.
//!
//! # Caveats
//!
//! * Forming needs every member of the first view reachable once: the first member
//!   cannot tell "holds no key" from "is down". Until then the cluster answers clients
//!   503 ("forming"). Later, one reachable member is enough to hand the key to a wiped
//!   node.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::{lock, Current, Node, WriterCmd};
use crate::auth::{self, ClusterKey, Nonce, NONCE_LEN};
use crate::clock::TokenKey;
use crate::error::{Error, ErrorKind, Result};
use crate::rpc::{Envelope, KeyAnswer, Request, Response};

/// Timeout of a key request, which includes the delivery call it makes.
const KEY_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// First pause between rounds of key requests; doubles up to [`KEY_RETRY_MAX`]. Short,
/// because a forming cluster answers clients only once every member has the key.
const KEY_RETRY: Duration = Duration::from_millis(50);
/// Longest pause between rounds: a node waiting for a member to come back asks once a
/// second.
const KEY_RETRY_MAX: Duration = Duration::from_secs(1);
/// How long a client request waits for this node to obtain the key before it gets a
/// retryable error; covers a cluster whose members start a few seconds apart.
pub const KEY_WAIT: Duration = Duration::from_secs(5);
/// Nonces of key requests in flight: each round makes one, and a delivery may arrive
/// until its request times out.
const MAX_PENDING_NONCES: usize = 64;
/// A nonce is honoured this long after it was sent (above [`KEY_CALL_TIMEOUT`]).
const NONCE_LIFETIME: Duration = Duration::from_secs(10);
/// Askers remembered for a delivery once the key is here (members only; a bound all
/// the same).
const MAX_WAITING: usize = 256;
/// At most one delivery to each address per this interval: a key request costs the
/// receiver a call, and anyone can send one.
const DELIVERY_DEBOUNCE: Duration = Duration::from_millis(200);

/// The cluster key with what is derived from it, computed once.
pub struct Keys {
    pub key: ClusterKey,
    /// The cluster's identity in tokens.
    pub id: u64,
    pub token_key: TokenKey,
    proof: String,
}

impl Keys {
    fn new(key: ClusterKey) -> Self {
        Self {
            id: key.id(),
            token_key: key.token_key(),
            proof: key.member_proof(),
            key,
        }
    }
}

/// Why a call was not admitted; the HTTP layer turns it into a status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The call lacks this cluster's member proof.
    NotAMember(String),
    /// This node cannot check calls yet (it is waiting for the key).
    NotReady(String),
}

/// Key-exchange state that is not durable: nonces in flight and recent deliveries.
#[derive(Default)]
pub(super) struct Exchange {
    nonces: BTreeMap<Nonce, Instant>,
    delivered: BTreeMap<String, Instant>,
    /// Members whose key request this node answered `NoKey`: their latest nonce and
    /// when it came. Served once this node holds the key.
    waiting: BTreeMap<String, (Nonce, Instant)>,
}

impl Node {
    /// The cluster key and what derives from it, if this node holds it.
    pub fn keys(&self) -> Option<Arc<Keys>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Publishes the key a layout carries (after the writer persisted it).
    pub(super) fn adopt_key(self: &Arc<Self>, key: Option<&ClusterKey>) {
        let same = match (self.keys(), key) {
            (Some(held), Some(key)) => held.key == *key,
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        let keys = key.map(|k| Arc::new(Keys::new(k.clone())));
        self.transport
            .set_member_proof(keys.as_ref().map(|k| k.proof.clone()));
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        if key.is_some() {
            self.keys_changed.notify_waiters();
        }
    }

    /// The keys, waiting up to [`KEY_WAIT`] while this node obtains them.
    pub(super) async fn wait_for_keys(&self) -> Result<Arc<Keys>> {
        // Every client request with a token comes here: once the keys are held, answer
        // without registering on the notifier (a lock every worker thread shares) or
        // reading the clock.
        if let Some(keys) = self.keys() {
            return Ok(keys);
        }
        let deadline = tokio::time::Instant::now() + KEY_WAIT;
        loop {
            let changed = self.keys_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(keys) = self.keys() {
                return Ok(keys);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(Error::unavailable(
                    "this node has not yet received its cluster's key (the cluster is forming, \
                     or waiting for a member to come back); retry shortly",
                ));
            }
        }
    }

    /// Whether `given` is this node's `CLUSTER_SECRET` (the outer gate of the internal
    /// endpoint), compared in constant time.
    pub fn secret_matches(&self, given: &[u8]) -> bool {
        crate::auth::secrets_match(given, self.secret.as_bytes())
    }

    /// Whether `proof` is this cluster's member proof (false while the node holds no
    /// key). Decides how large a body the internal endpoint reads before admission.
    pub fn proves_membership(&self, proof: Option<&[u8]>) -> bool {
        match (self.keys(), proof) {
            (Some(keys), Some(p)) => auth::secrets_match(p, keys.proof.as_bytes()),
            _ => false,
        }
    }

    /// Whether a call may be handled at all; see the module doc. `proof` is the member
    /// proof the call carried.
    pub fn admit(&self, env: &Envelope, proof: Option<&[u8]>) -> std::result::Result<(), Refusal> {
        if matches!(
            env.body,
            Request::KeyRequest { .. } | Request::KeyDelivery { .. } | Request::Join { .. }
        ) {
            return Ok(());
        }
        let cur = self.current();
        if cur.view.is_none() && cur.transition.is_none() {
            return Ok(());
        }
        match self.keys() {
            Some(_) => {
                if self.proves_membership(proof) {
                    Ok(())
                } else {
                    Err(Refusal::NotAMember(format!(
                        "the call from {:?} does not carry this cluster's member proof",
                        env.from
                    )))
                }
            }
            None => Err(Refusal::NotReady(
                "this node has not yet received its cluster's key".into(),
            )),
        }
    }

    /// `KeyRequest` from `from`: deliver the key to `from`'s address if it is a member.
    /// Without a key, the request is remembered ([`Exchange::waiting`]) so that the key
    /// reaches the asker as soon as this node has it.
    pub(super) async fn on_key_request(
        self: &Arc<Self>,
        from: &str,
        nonce: Nonce,
    ) -> Result<Response> {
        let cur = self.current();
        let member = cur.view.is_some() && cur.knows(from) && from != self.addr;
        let Some(keys) = self.keys() else {
            if member {
                let mut exchange = lock(&self.exchange);
                let now = Instant::now();
                exchange
                    .waiting
                    .retain(|_, (_, at)| now.duration_since(*at) < NONCE_LIFETIME);
                if exchange.waiting.len() < MAX_WAITING || exchange.waiting.contains_key(from) {
                    exchange.waiting.insert(from.to_string(), (nonce, now));
                }
                drop(exchange);
                self.key_asked.notify_one();
            }
            return Ok(Response::Key(KeyAnswer::NoKey));
        };
        if !member {
            return Err(Error::bad_request(format!(
                "{from} is not a member of this node's view"
            )));
        }
        self.deliver_key(&keys, from, nonce).await
    }

    /// Delivers the key to `to`'s address (a member), answering its request `nonce`.
    async fn deliver_key(
        self: &Arc<Self>,
        keys: &Keys,
        to: &str,
        nonce: Nonce,
    ) -> Result<Response> {
        {
            let mut exchange = lock(&self.exchange);
            let now = Instant::now();
            if exchange
                .delivered
                .get(to)
                .is_some_and(|t| now.duration_since(*t) < DELIVERY_DEBOUNCE)
            {
                return Err(Error::unavailable("a key was delivered there just now"));
            }
            exchange
                .delivered
                .retain(|_, t| now.duration_since(*t) < DELIVERY_DEBOUNCE);
            exchange.delivered.insert(to.to_string(), now);
        }
        let delivery = Request::KeyDelivery {
            nonce,
            key: keys.key.clone(),
        };
        match self
            .send(to, &self.envelope(delivery), KEY_CALL_TIMEOUT)
            .await
        {
            Ok(Response::Ok) => Ok(Response::Key(KeyAnswer::Delivered)),
            Ok(Response::Error(e)) => Err(e),
            Ok(other) => Err(super::unexpected(&other)),
            Err(e) => Err(e.into()),
        }
    }

    /// `KeyDelivery`: adopt the key if it answers a request this node sent.
    pub(super) async fn on_key_delivery(
        self: &Arc<Self>,
        nonce: Nonce,
        key: ClusterKey,
    ) -> Result<Response> {
        let sent = {
            let mut exchange = lock(&self.exchange);
            let now = Instant::now();
            exchange
                .nonces
                .retain(|_, at| now.duration_since(*at) < NONCE_LIFETIME);
            exchange.nonces.remove(&nonce).is_some()
        };
        if !sent {
            return Err(Error::bad_request(
                "no key request of this node quotes that nonce",
            ));
        }
        self.store_key(key).await?;
        Ok(Response::Ok)
    }

    /// Persists `key` through the writer, publishes it, and hands it to the members
    /// whose requests this node answered without one.
    async fn store_key(self: &Arc<Self>, key: ClusterKey) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_writer(WriterCmd::SetKey { key, tx }).await?;
        let layout = rx
            .await
            .map_err(|_| Error::unavailable("the node is shutting down"))??;
        self.apply_layout(layout);
        let node = self.clone();
        lock(&self.tasks).spawn(async move { node.deliver_to_waiting().await });
        Ok(())
    }

    /// Delivers the key to every member whose recent request was answered `NoKey`:
    /// without this, a member that asked just before the key was drawn would wait out
    /// its retry pause (up to [`KEY_RETRY_MAX`]) while this node forwards it clients'
    /// requests that it refuses.
    async fn deliver_to_waiting(self: &Arc<Self>) {
        let Some(keys) = self.keys() else {
            return;
        };
        let waiting = std::mem::take(&mut lock(&self.exchange).waiting);
        let cur = self.current();
        let deliveries = waiting
            .into_iter()
            .filter(|(to, (_, at))| at.elapsed() < NONCE_LIFETIME && cur.knows(to))
            .map(|(to, (nonce, _))| {
                let keys = keys.clone();
                async move {
                    if let Err(e) = self.deliver_key(&keys, &to, nonce).await {
                        tracing::debug!(%to, "delivering the cluster key failed: {e}");
                    }
                }
            });
        join_all(deliveries).await;
    }

    /// A fresh nonce, remembered until a delivery quotes it or it expires.
    fn new_nonce(&self) -> Nonce {
        let nonce: Nonce = rand::random::<[u8; NONCE_LEN]>();
        let mut exchange = lock(&self.exchange);
        if exchange.nonces.len() >= MAX_PENDING_NONCES {
            // The oldest is the least likely to be answered still.
            if let Some(oldest) = exchange
                .nonces
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(n, _)| *n)
            {
                exchange.nonces.remove(&oldest);
            }
        }
        exchange.nonces.insert(nonce, Instant::now());
        nonce
    }

    /// Starts [`Node::acquire_key`] unless it runs already or is not needed.
    pub(super) fn spawn_key_acquisition(self: &Arc<Self>) {
        let cur = self.current();
        let needed = self.keys().is_none() && (cur.view.is_some() || cur.transition.is_some());
        if !needed || self.acquiring_key.swap(true, Ordering::AcqRel) {
            return;
        }
        let node = self.clone();
        lock(&self.tasks).spawn(async move {
            node.acquire_key().await;
            node.acquiring_key.store(false, Ordering::Release);
            // A layout swapped in meanwhile may need the key again.
            node.spawn_key_acquisition();
        });
    }

    /// Obtains the cluster key from the members (or draws it, as the first member of a
    /// cluster forming); see the module doc. Returns once the node holds a key or is in
    /// no cluster any more.
    async fn acquire_key(self: &Arc<Self>) {
        let mut pause = KEY_RETRY;
        let mut logged = false;
        loop {
            if self.keys().is_some() {
                break;
            }
            let cur = self.current();
            let peers = key_peers(&cur, &self.addr);
            if cur.view.is_none() && cur.transition.is_none() {
                return;
            }
            let nonce = self.new_nonce();
            let answers = join_all(
                peers
                    .iter()
                    .map(|p| self.call(p, Request::KeyRequest { nonce }, KEY_CALL_TIMEOUT)),
            )
            .await;
            if self.keys().is_some() {
                break;
            }
            let mut no_key = Vec::new();
            let mut other = Vec::new();
            for (peer, answer) in peers.iter().zip(answers) {
                match answer {
                    Ok(Response::Key(KeyAnswer::NoKey)) => no_key.push(peer.clone()),
                    Ok(_) => other.push(format!("{peer}: no key delivered")),
                    Err(e) => other.push(format!("{peer}: {e}")),
                }
            }
            if let Some(view) = &cur.view {
                let first = auth::generator(&view.members) == Some(self.addr.as_str());
                let all_keyless = view
                    .members
                    .iter()
                    .filter(|m| **m != self.addr)
                    .all(|m| no_key.contains(m));
                if first && all_keyless {
                    let key = ClusterKey::from_bytes(rand::random());
                    match self.store_key(key).await {
                        Ok(()) => {
                            tracing::info!(
                                members = view.members.len(),
                                "drew a new cluster key: this cluster is formed"
                            );
                            break;
                        }
                        Err(e) => tracing::warn!("could not store a new cluster key: {e}"),
                    }
                }
            }
            if !logged && pause >= KEY_RETRY_MAX {
                tracing::warn!(
                    "still waiting for the cluster key ({}); clients get 503 until it arrives",
                    if other.is_empty() {
                        "every member is still forming".to_string()
                    } else {
                        other.join("; ")
                    }
                );
                logged = true;
            }
            // A member asking us means it is up and keyless too, and if it is the
            // generator it may draw the key on this very round: ask again soon.
            pause = tokio::select! {
                () = tokio::time::sleep(pause) => (pause * 2).min(KEY_RETRY_MAX),
                () = self.key_asked.notified() => {
                    tokio::time::sleep(KEY_RETRY).await;
                    KEY_RETRY
                }
            };
        }
        if logged {
            tracing::info!("received the cluster key");
        }
        // Calls to the members failed while the key was missing: catch up now.
        self.learn_from_members().await;
    }

    /// `Err` unless `credential` is the admin token (or no admin token is set).
    pub fn authorize_admin(&self, credential: Option<&str>) -> Result<()> {
        let Some(expected) = &self.admin_token else {
            return Ok(());
        };
        match credential {
            Some(given) if auth::secrets_match(given.as_bytes(), expected.as_bytes()) => Ok(()),
            Some(_) => Err(Error::new(
                ErrorKind::Unauthorized,
                "the admin token is wrong",
            )),
            None => Err(Error::new(
                ErrorKind::Unauthorized,
                "this cluster's membership changes need its admin token",
            )),
        }
    }
}

/// Whom a node without the key asks for it: the other members of its view and of the
/// change in progress (a joining node knows only the latter), sorted.
fn key_peers(cur: &Current, me: &str) -> Vec<String> {
    let mut peers: Vec<String> = Vec::new();
    if let Some(v) = &cur.view {
        peers.extend(v.members.iter().cloned());
    }
    if let Some(t) = &cur.transition {
        peers.extend(t.from().members.iter().cloned());
        peers.extend(t.to().members.iter().cloned());
    }
    peers.retain(|p| p != me);
    peers.sort();
    peers.dedup();
    peers
}
