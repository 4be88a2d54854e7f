//! How a forming cluster obtains its key (`node/keys.rs`), on whole nodes in one process
//! (in-memory stores, the loopback transport of `common::loopback`).
//!
//! A keyless member asks the others with a pause that doubles up to a second between
//! rounds. A member started last used to find the others deep in that pause: the
//! generator drew the key at its next round, and each other member obtained it at its
//! own, so the cluster answered clients 503 (a forwarded request refused by a keyless
//! member) for up to two pauses after its last member came up.

mod common;

use std::sync::Arc;
use std::time::Duration;

use kvs::node::Node;
use kvs::placement::View;
use kvs::storage::MemoryStore;

use common::loopback::Loopback;

/// Bound on the whole scenario.
const LIMIT: Duration = Duration::from_secs(30);

fn start(transport: &Arc<Loopback>, addr: &str, view: &View) -> Arc<Node> {
    transport.start_node(
        addr,
        Some(view.clone()),
        Some(1),
        Arc::new(MemoryStore::new()),
    )
}

/// The generator (the view's first member) and a second member have waited long enough
/// for their pauses to reach the longest; the third member comes up. Every member holds
/// the one key within a few of the shortest pauses, not the longest.
#[tokio::test(flavor = "multi_thread")]
async fn the_key_reaches_every_member_soon_after_the_last_one_starts() {
    tokio::time::timeout(LIMIT, async {
        let transport = Arc::new(Loopback::default());
        let members: Vec<String> = (1..=3).map(|i| format!("127.0.0.{i}:7000")).collect();
        let view = View::bootstrap(members.clone(), 1).expect("valid view");
        let mut nodes = vec![
            start(&transport, &members[0], &view),
            start(&transport, &members[1], &view),
        ];
        // Rounds at 0, 50, 150, 350, 750 and 1,550 ms, then one a second.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert!(
            nodes.iter().all(|n| n.keys().is_none()),
            "no key before every member answered"
        );
        let started = std::time::Instant::now();
        nodes.push(start(&transport, &members[2], &view));
        while nodes.iter().any(|n| n.keys().is_none()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = started.elapsed();
        let ids: Vec<u64> = nodes
            .iter()
            .filter_map(|n| n.keys())
            .map(|k| k.id)
            .collect();
        assert!(ids.iter().all(|id| *id == ids[0]), "one key: {ids:?}");
        // The generator's and the second member's next rounds would come up to a
        // second later each; being asked, and the delivery to those who asked, make it
        // a few 50 ms rounds. 400 ms leaves room for a slow machine and still fails the
        // old behaviour most of the time.
        assert!(
            took < Duration::from_millis(400),
            "every member held the key {took:?} after the last one started"
        );
    })
    .await
    .expect("within the limit");
}
