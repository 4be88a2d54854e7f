//! The trust boundary, tried as an attacker would: nobody outside a cluster can change
//! it, read its internals or plant writes, with or without `CLUSTER_SECRET`; clients'
//! tokens cannot be forged or carried over to a cluster re-formed on wiped disks; a write
//! cannot make other readers depend on writes the partition cannot obtain; membership
//! changes can be locked with an admin token.
//!
//! Each test owns the address range `127.77.<id>.0/24` with ids 80..=89 (see
//! `tests/common`). The attacker's non-member address is `.200` of the range.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::Cluster;
use kvs::client::{header, Client, Method};
use kvs::clock::{CausalToken, TokenKey, VersionVector};
use kvs::placement::View;
use kvs::quorum::Level;
use kvs::replica::SnapshotRequest;
use kvs::rpc::{decode, encode, Envelope, Request, Response};

/// Time limit of each scenario.
const SCENARIO_LIMIT: Duration = Duration::from_secs(120);

/// The public default of `CLUSTER_SECRET` (what a node started without one uses).
const PUBLIC_SECRET: &str = "kvs-default-cluster-secret";

/// What an attacker's internal call got back: the status and, if it decodes, the answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    response: Option<Response>,
}

/// Posts `body` to `node`'s internal endpoint as `claimed`, from a socket bound to
/// `from_ip`, with `secret` (and no member proof: the attacker has no cluster key).
async fn attack(node: &str, from_ip: &str, claimed: &str, secret: &str, body: Request) -> Answer {
    let client = Client::builder()
        .local_address(from_ip.parse::<std::net::IpAddr>().ok())
        .timeout(Duration::from_secs(10))
        .max_body(kvs::rpc::MAX_RPC_BYTES)
        .build();
    let resp = client
        .request(Method::POST, node, kvs::rpc::RPC_PATH)
        .header(kvs::rpc::SECRET_HEADER, secret)
        .header(kvs::rpc::PROTO_HEADER, kvs::rpc::PROTOCOL_VERSION)
        .body(encode(&Envelope {
            from: claimed.to_string(),
            epoch: 99,
            body,
        }))
        .send()
        .await
        .expect("the node answers");
    Answer {
        status: resp.status.as_u16(),
        response: decode(&resp.body).ok(),
    }
}

fn ip_of(addr: &str) -> String {
    addr.split(':').next().expect("ip:port").to_string()
}

/// The IP the attacker uses for itself: `.200` of the cluster's range.
fn outsider_ip(c: &Cluster) -> String {
    let ip = ip_of(c.addr(0));
    let (net, _) = ip.rsplit_once('.').expect("IPv4");
    format!("{net}.200")
}

/// Every attack of the hardening review against every node of `c` (3 nodes, K=3),
/// made with `secret`; then checks that every key is still there on every node, the view
/// is unchanged, and nothing leaked.
async fn replay_attacks(c: &Cluster, secret: &str) {
    let mut client = c.session("honest");
    let mut keys = BTreeMap::new();
    for i in 0..12 {
        let key = format!("key_{i}");
        let val = format!("value_{i}");
        client.write(i % 3, &key, &val).await;
        keys.insert(key, val);
    }
    let epoch_before: Vec<_> = futures_join(c).await;
    let outsider = outsider_ip(c);
    let stranger = format!("{outsider}:8080");
    // A made-up view of three non-members, with the cluster's own (derivable) id, far
    // in the future: what made every node delete its keys before.
    let real = View::bootstrap(c.view.clone(), 3).expect("view");
    let mut fake = View::bootstrap(
        (1..=3)
            .map(|i| format!("{outsider}:{}", 9000 + i))
            .collect(),
        3,
    )
    .expect("view");
    fake.cluster = real.cluster;
    fake.epoch = 99;
    // A token naming a write far beyond anything the partition has.
    let mut poison = CausalToken::empty(0);
    poison.observe(0, &[(42, 1_000_000)].into_iter().collect::<VersionVector>());

    for i in 0..3 {
        let target = c.addr(i).to_string();
        let member = c.addr((i + 1) % 3).to_string();
        let attempts: Vec<(String, String, Request)> = vec![
            // From a non-member address.
            (
                outsider.clone(),
                stranger.clone(),
                Request::Install(fake.clone()),
            ),
            (outsider.clone(), stranger.clone(), Request::Status),
            (
                outsider.clone(),
                stranger.clone(),
                Request::Snapshot(SnapshotRequest {
                    partition: 0,
                    epoch: None,
                    slots: None,
                    after: None,
                    max_entries: 1000,
                    max_bytes: 1 << 20,
                }),
            ),
            // Posing as a member, from a socket bound to that member's own IP.
            (
                ip_of(&member),
                member.clone(),
                Request::Install(fake.clone()),
            ),
            (ip_of(&member), member.clone(), Request::Status),
            (
                ip_of(&member),
                member.clone(),
                Request::Put {
                    key: "key_0".into(),
                    value: Some(b"injected".to_vec()),
                    token: poison.clone(),
                    w: Level::ONE,
                    mode: Default::default(),
                },
            ),
            (
                ip_of(&member),
                member.clone(),
                Request::Get {
                    key: "key_1".into(),
                    token: CausalToken::default(),
                    r: Level::ONE,
                },
            ),
        ];
        for (from_ip, claimed, body) in attempts {
            let what = format!("{body:?}").chars().take(60).collect::<String>();
            let a = attack(&target, &from_ip, &claimed, secret, body).await;
            assert_eq!(
                a.status, 403,
                "{what} to {target} as {claimed} from {from_ip}: {a:?}"
            );
            assert!(a.response.is_none(), "{what}: answered {a:?}");
            if i == 0 {
                println!("{what}... as {claimed} from {from_ip}: {}", a.status);
            }
        }
        // A forged key delivery is refused (no request of the node quotes it) ...
        let a = attack(
            &target,
            &outsider,
            &stranger,
            secret,
            Request::KeyDelivery {
                nonce: [7; 16],
                key: kvs::auth::ClusterKey::from_bytes([9; 32]),
            },
        )
        .await;
        assert!(
            matches!(a.response, Some(Response::Error(_))),
            "forged delivery: {a:?}"
        );
        // ... and a key request hands nothing to a non-member, nor to someone posing as
        // a member (the key goes to the member's own address, which did not ask).
        for (from_ip, claimed) in [
            (outsider.clone(), stranger.clone()),
            (ip_of(&member), member.clone()),
        ] {
            let a = attack(
                &target,
                &from_ip,
                &claimed,
                secret,
                Request::KeyRequest { nonce: [1; 16] },
            )
            .await;
            assert!(
                matches!(a.response, Some(Response::Error(_))),
                "key request as {claimed}: {a:?}"
            );
        }
    }

    println!("forged key delivery and key requests: refused, nothing handed out");
    // Without the member proof, a large internal message is not even read.
    let a = attack(
        c.addr(0),
        &outsider,
        &stranger,
        secret,
        Request::Put {
            key: "big".into(),
            value: Some(vec![b'x'; 1 << 20]),
            token: CausalToken::default(),
            w: Level::ONE,
            mode: Default::default(),
        },
    )
    .await;
    assert_eq!(a.status, 413, "{a:?}");
    // Nothing changed: same views, every key with its value on every node, the
    // honest client's token still good, no node removed itself.
    assert_eq!(futures_join(c).await, epoch_before, "views changed");
    for i in 0..3 {
        for (key, val) in &keys {
            let (status, body) = c.get(i, key, &client.token).await;
            assert_eq!(status, 200, "GET {key} at node {i}: {body}");
            assert_eq!(common::value_of(&body), *val, "GET {key} at node {i}");
        }
        assert!(
            !c.log_tail(i).contains("removed from the cluster"),
            "{}",
            c.log_tail(i)
        );
    }
    // The cluster still works for honest clients.
    client.write(1, "after_attack", "fine").await;
    assert_eq!(client.read(2, "after_attack").await, "fine");
    println!(
        "after the attacks: same views, all {} keys on all 3 nodes, writes still work",
        keys.len()
    );
}

/// `(epoch, members)` of every node.
async fn futures_join(c: &Cluster) -> Vec<Option<(u64, Vec<String>)>> {
    let mut out = Vec::new();
    for i in 0..3 {
        out.push(c.view_of(i).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn outsiders_change_and_learn_nothing_in_a_cluster_without_a_secret() {
    let c = Cluster::start_with_secret(80, 3, 3, "").await;
    c.within(SCENARIO_LIMIT, replay_attacks(&c, PUBLIC_SECRET))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outsiders_change_and_learn_nothing_even_knowing_the_cluster_secret() {
    let secret = "an-operator-secret";
    let c = Cluster::start_with_secret(81, 3, 3, secret).await;
    c.within(SCENARIO_LIMIT, async {
        // Without the secret, the node does not even decode the call.
        let a = attack(
            c.addr(0),
            &outsider_ip(&c),
            "x:1",
            PUBLIC_SECRET,
            Request::Status,
        )
        .await;
        assert_eq!(a.status, 401, "{a:?}");
        // With it (an insider who is not a member), the member proof still stops it.
        replay_attacks(&c, secret).await;
    })
    .await;
}

/// A cluster re-formed on wiped disks is a new cluster: its predecessor's tokens get
/// 400. So does a token tagged with a key anyone could derive (the old scheme).
#[tokio::test(flavor = "multi_thread")]
async fn tokens_of_a_wiped_and_reformed_cluster_and_forged_tokens_are_refused() {
    let c = Cluster::start_with_secret(82, 3, 3, "").await;
    c.within(SCENARIO_LIMIT, async {
        let mut old = c.session("old");
        old.write(0, "k", "v1").await;
        let old_token = old.token.clone();
        assert_eq!(old.read(1, "k").await, "v1");

        // A token built with the formerly derivable key and cluster id.
        let view = View::bootstrap(c.view.clone(), 3).expect("view");
        let mut forged = CausalToken::empty(view.cluster);
        forged.observe(0, &[(42, 1_000_000)].into_iter().collect::<VersionVector>());
        let forged = forged.encode(&TokenKey::derive(PUBLIC_SECRET));
        for i in 0..3 {
            let (status, body) = c.put(i, "k2", "v", &forged).await;
            assert_eq!(status, 400, "forged token at node {i}: {body}");
            if i == 0 {
                println!("token forged with the old derivable key: {status} {body}");
            }
            let (status, body) = c.get(i, "k", &forged).await;
            assert_eq!(status, 400, "forged token at node {i}: {body}");
        }

        for i in 0..3 {
            c.stop(i).await;
        }
        for i in 0..3 {
            c.wipe(i);
        }
        c.restart_all(&[0, 1, 2]).await;
        for i in 0..3 {
            let (status, body) = c.get(i, "k", &old_token).await;
            assert_eq!(status, 400, "old token at node {i}: {body}");
            if i == 0 {
                println!("token of the wiped cluster, GET at the re-formed one: {status} {body}");
            }
            common::assert_error(&body);
            let (status, body) = c.put(i, "k", "v2", &old_token).await;
            assert_eq!(status, 400, "old token at node {i}: {body}");
        }
        // A fresh client is served by the new cluster.
        let mut fresh = c.session("fresh");
        fresh.write(2, "k", "v2").await;
        assert_eq!(fresh.read(0, "k").await, "v2");
    })
    .await;
}

/// A write whose token names a write the partition cannot obtain (its only holder is
/// down) is refused with 503 and stores nothing, so no other reader inherits the
/// dependency; once the holder is back, the same write goes through.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_depending_on_unobtainable_writes_is_refused_not_stored() {
    let c = Cluster::start(83, 2, 2).await;
    c.within(SCENARIO_LIMIT, async {
        c.stop(1).await;
        let mut carrier = c.session("carrier");
        carrier.write(0, "first", "a").await;
        c.stop(0).await;
        c.restart(1).await;

        let (status, body) = carrier.put(1, "second", "b").await;
        assert_eq!(status, 503, "depends on a write only node 0 has: {body}");
        println!("write depending on a write only a downed replica holds: {status} {body}");
        common::assert_error(&body);
        // Nothing was stored: other clients neither see the write nor inherit its
        // dependency, and keep working on this partition.
        let mut other = c.session("other");
        let (status, body) = other.get(1, "second").await;
        assert_eq!(status, 404, "{body}");
        other.write(1, "third", "c").await;
        assert_eq!(other.read(1, "third").await, "c");
        let (status, body) = other.get(1, "first").await;
        assert_eq!(status, 404, "node 1 never received it: {body}");

        c.restart(0).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = carrier.put(1, "second", "b").await;
            if status == 200 || status == 201 {
                break;
            }
            assert_eq!(status, 503, "{body}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "never accepted: {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(carrier.read(1, "first").await, "a");
        assert_eq!(carrier.read(0, "second").await, "b");
    })
    .await;
}

/// With `ADMIN_TOKEN` set, `update_view` needs it (401 otherwise, in the dialect's
/// error envelope); reads and writes do not.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_token_guards_membership_changes() {
    let token = "let-me-change-things";
    let c = Cluster::start_with_spares(84, 2, 1, 2, &[("ADMIN_TOKEN", token)]).await;
    c.within(SCENARIO_LIMIT, async {
        c.start_spare(2).await;
        // Arbitrary Authorization values (none, a wrong one, one without `Bearer`), so
        // the low-level call rather than `update_view` with the client's admin token.
        let http = Client::builder().timeout(Duration::from_secs(60)).build();
        let change = |auth: Option<String>| {
            let http = http.clone();
            let addr = c.addr(0).to_owned();
            let body = common::form(&[("ip_port", c.addr(2))]);
            async move {
                let mut req = http
                    .request(Method::PUT, &addr, "/kv-store/update_view?type=add")
                    .form_encoded(body);
                if let Some(a) = auth {
                    req = req.header(header::AUTHORIZATION, a);
                }
                let resp = req.send().await.expect("answer");
                let body: serde_json::Value = resp.json().expect("JSON");
                (resp.status.as_u16(), body)
            }
        };
        for auth in [
            None,
            Some("Bearer wrong".to_string()),
            Some(token.to_string()),
        ] {
            let (status, body) = change(auth.clone()).await;
            assert_eq!(status, 401, "{auth:?}: {body}");
            common::assert_error(&body);
        }
        assert_eq!(c.view_of(0).await.map(|v| v.1.len()), Some(2), "unchanged");
        // Data requests need no admin token.
        let mut client = c.session("client");
        client.write(0, "k", "v").await;
        assert_eq!(client.read(1, "k").await, "v");
        let (status, body) = change(Some(format!("Bearer {token}"))).await;
        assert_eq!(status, 200, "{body}");
        common::assert_success(&body);
        assert_eq!(c.view_of(2).await.map(|v| v.1.len()), Some(3));
        let (status, body) = c
            .request(
                0,
                Method::GET,
                "/kv-store/get_all_partition_ids",
                String::new(),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    })
    .await;
}

/// A member whose disk was wiped (the generator of the key among them) gets the same
/// cluster key back from the others: clients' tokens stay valid, and it serves them.
#[tokio::test(flavor = "multi_thread")]
async fn a_wiped_member_gets_the_cluster_key_back_from_the_others() {
    let c = Cluster::start_with_secret(85, 3, 3, "").await;
    c.within(SCENARIO_LIMIT, async {
        let mut client = c.session("client");
        client.write(1, "k", "v").await;
        c.stop(0).await;
        c.wipe(0);
        c.restart(0).await;
        // Same key: the token is accepted, and node 0 catches up to serve it.
        assert_eq!(client.read(0, "k").await, "v");
        client.write(0, "k2", "v2").await;
        assert_eq!(client.read(2, "k2").await, "v2");
        let log = c.log_tail(0);
        let since_restart = log.rsplit("start #2").next().unwrap_or_default();
        assert!(!since_restart.contains("drew a new cluster key"), "{log}");
    })
    .await;
}
