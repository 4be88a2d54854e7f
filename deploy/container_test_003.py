#!/usr/bin/env python3
"""Container test of seed 003: the `/kvs` dialect, view-change, a partition, multi-homing.

Builds the image (deploy/image.sh) unless --no-build, then, in the seed's `docker run`
style (`-p <hostport>:13800 --net --ip --name -e ADDRESS -e VIEW [-e REPL_FACTOR]`):
two private networks, "home" 10.31.0.0/16 (every node's ADDRESS, 10.31.0.11-14:13800)
and "away" 10.32.0.0/16 (the other side of a partition, a node's second interface);
node i is published on host port 13830+i and keeps its data in its own volume. Then:

  1. two nodes, no REPL_FACTOR (r = 1: two shards of one node); 500 PUTs through the
     published ports, each carrying the `causal-context` of the reply before; every key
     read back through both nodes. `/kvs/shards`, `/kvs/shards/<id>` and `/kvs/key-count`
     agree on every node, the counts sum to 500, and a reply carries `"address"` exactly
     when the node that got the request proxied it (the owner answers without it, the
     other node names the owner, the owners' tallies equal the shards' key counts);
  2. two more nodes started with VIEW = all four and REPL_FACTOR=2, then
     `PUT /kvs/view-change {"view": all four, "repl-factor": 2}` at node 1: 200, two
     shards of two replicas whose counts sum to 500, within 6 s (the figure is printed);
     the new replicas hold their keys as soon as it answers; every key readable through
     every node, answered locally by exactly its shard's two replicas and proxied by the
     others;
  3. a partition: one replica of each shard leaves "home" and joins "away" (Docker
     isolates the two bridges; the harness adds no forwarding rule), so each side holds
     one replica of each shard. Both sides keep serving reads and writes for keys of
     both shards through their nodes' published ports (which Docker moves to the "away"
     address), write the same keys concurrently (two rounds, the second 6 s after the
     cut), and each side's one-sided writes stay invisible to the other side until the
     heal. The heal reconnects the nodes to "home" at their old addresses (`docker
     network connect --ip`) and drops "away"; every key's replicas must agree within 5 s
     (the figure is printed), on the value written last (the design's latest-timestamp
     rule), and no one-sided write is lost;
  4. multi-homing: the same two nodes join "away" again, so they are on both networks
     and Docker forwards their published ports to the "away" address (Docker 20.10 picks
     the network whose name sorts first, newer ones may pick the one joined last: "away"
     either way; checked in the DNAT rule when iptables shows it): they still answer
     through the published ports and on the "away" address directly, and still serve and
     proxy keys;
  5. deletes: `DELETE /kvs/keys/<k>` answers 200 `{"doesExist":true,"message":"Deleted
     successfully"}`, then GET is 404 `{"doesExist":false,"error":"Key does not exist",
     "message":"Error in GET"}` on every node and a second DELETE 404 "Error in DELETE";
     the key counts drop by the keys deleted; a replica `docker stop`ped while its shard's
     keys are deleted and `docker start`ed again must not serve them (with the client's
     context at once, without any within 5 s) and they stay deleted.

Prints the figures and exits non-zero on any failed check, with the request and answer
that failed and the nodes' logs. Every container, both networks and the volumes are
removed on exit, failure or Ctrl-C (the harness makes no iptables rule). Bounded: every
wait has a deadline, every HTTP call a timeout, and the whole run an alarm.

usage: python3 deploy/container_test_003.py [--keep] [--no-build] [--image TAG]
"""
import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from container_test import log, sh  # noqa: E402  (the same helpers as the seed-001 test)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
IMAGE = "kvs"                      # what deploy/image.sh (and container_test.py) builds
NET_A = "kvs-ci-003-home"          # every node's ADDRESS is on this network
SUBNET_A = "10.31.0.0/16"
NET_B = "kvs-ci-003-away"          # the other side of the partition; a second interface
SUBNET_B = "10.32.0.0/16"
PORT = 13800
NODES = 4
KEYS = 500
BOUND = 5.0                        # replicas agree within 5 s of a fault healing
VIEW_CHANGE_LIMIT = 6.0            # the contract: a view change answers within 6 s
READY_LIMIT = 30.0
HTTP_TIMEOUT = 12.0                # above the store's 5 s before a 503
VIEW_CHANGE_TIMEOUT = 60.0
PARTITION_HOLD = 6.0               # seconds between the cut and the second round of writes
RUN_LIMIT = 480                    # the whole run, in seconds (SIGALRM)
KEY_FIELDS = {"doesExist", "message", "error", "value", "replaced", "address", "causal-context"}


def ip(i):
    return f"10.31.0.{10 + i}"


def ip_b(i):
    return f"10.32.0.{10 + i}"


def addr(i):
    return f"{ip(i)}:{PORT}"


def name(i):
    return f"kvs-ci-003-node{i}"


def volume(i):
    return f"kvs-ci-003-data{i}"


def host_port(i):
    return 13830 + i


VIEW2 = ",".join(addr(i) for i in (1, 2))
VIEW4 = ",".join(addr(i) for i in range(1, NODES + 1))
NODE_OF = {addr(i): i for i in range(1, NODES + 1)}


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


def cleanup():
    for i in range(1, NODES + 1):
        sh("docker", "rm", "-f", name(i), check=False)
    for net in (NET_A, NET_B):
        sh("docker", "network", "rm", net, check=False)
    for i in range(1, NODES + 1):
        sh("docker", "volume", "rm", "-f", volume(i), check=False)


def run_node(image, i, view, repl_factor=None):
    # The seed's line, plus a volume for the node's data.
    line = ["docker", "run", "-d", "-p", f"{host_port(i)}:{PORT}", f"--net={NET_A}", f"--ip={ip(i)}",
            f"--name={name(i)}", "-e", f"ADDRESS={addr(i)}", "-e", f"VIEW={view}"]
    if repl_factor is not None:
        line += ["-e", f"REPL_FACTOR={repl_factor}"]
    sh(*line, "-v", f"{volume(i)}:/data", image)


class Reply:
    """One exchange, kept whole so that a failed check can show it."""

    def __init__(self, where, method, path, sent, status, body):
        self.where, self.method, self.path, self.sent = where, method, path, sent
        self.status, self.body = status, body

    def get(self, field, default=None):
        return self.body.get(field, default) if isinstance(self.body, dict) else default

    def __str__(self):
        sent = "" if self.sent is None else " " + json.dumps(self.sent)
        return f"{self.method} {self.where}{self.path}{sent} -> {self.status} {json.dumps(self.body)}"


def call(i, method, path, body=None, timeout=HTTP_TIMEOUT, host=None):
    """Through node i's published port (or straight to `host`:13800); never raises."""
    where_host, where_port = (host, PORT) if host else ("127.0.0.1", host_port(i))
    c = http.client.HTTPConnection(where_host, where_port, timeout=timeout)
    where = f"http://{where_host}:{where_port}"
    try:
        data = json.dumps(body) if body is not None else None
        c.request(method, path, data, {"Content-Type": "application/json"})
        r = c.getresponse()
        raw = r.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = {"raw": raw[:300].decode(errors="replace")}
        return Reply(where, method, path, body, r.status, parsed)
    except (OSError, http.client.HTTPException) as e:
        return Reply(where, method, path, body, None, f"transport error: {e}")
    finally:
        c.close()


class Session:
    """A client: passes the `causal-context` of every reply into its next request."""

    def __init__(self):
        self.ctx = {}

    def req(self, i, method, key, value=None, host=None):
        sent = {"causal-context": self.ctx}
        if value is not None:
            sent["value"] = value
        r = call(i, method, f"/kvs/keys/{key}", sent, host=host)
        ctx = r.get("causal-context")
        if ctx is not None:
            check(isinstance(ctx, dict), f"causal-context is not a JSON object: {r}")
            self.ctx = ctx
        return r


def expect_fields(r, status, fields):
    check(r.status == status and isinstance(r.body, dict), f"expected {status}: {r}")
    for f, v in fields.items():
        check(r.body.get(f) == v, f"expected {f}={json.dumps(v)}: {r}")
    extra = set(r.body) - KEY_FIELDS
    check(not extra, f"fields outside the contract {sorted(extra)}: {r}")


def expect_put(r, created):
    if created:
        expect_fields(r, 201, {"message": "Added successfully", "replaced": False})
    else:
        expect_fields(r, 200, {"message": "Updated successfully", "replaced": True})
    check(isinstance(r.get("causal-context"), dict), f"a PUT reply without a causal-context: {r}")


def expect_value(r, value):
    expect_fields(r, 200, {"doesExist": True, "message": "Retrieved successfully", "value": value})
    check(isinstance(r.get("causal-context"), dict), f"a GET reply without a causal-context: {r}")


def expect_missing(r, op):
    expect_fields(r, 404, {"doesExist": False, "error": "Key does not exist", "message": f"Error in {op}"})


def proxied_to(r):
    """Node number the reply names as the owner, None when the node answered itself."""
    a = r.get("address")
    if a is None:
        return None
    check(a in NODE_OF, f"\"address\" {a!r} is not a member's ADDRESS: {r}")
    return NODE_OF[a]


def wait_up(i, ready, limit=READY_LIMIT):
    """Until node i answers its status; with `ready`, until it is in a view and holds its
    cluster's key (a node still looking for its cluster says "ready" with no view)."""
    deadline = time.time() + limit
    while time.time() < deadline:
        r = call(i, "GET", "/api/v1/status", timeout=2)
        if r.status == 200 and (not ready or (r.get("ready") and r.get("view"))):
            return
        time.sleep(0.1)
    raise Failure(f"node {i} not {'ready' if ready else 'answering'} within {limit} s: last {r}")


def wait_until(what, limit, probe):
    """Seconds until probe() returns None; probe returns what is still wrong."""
    t = time.time()
    while True:
        wrong = probe()
        if wrong is None:
            return time.time() - t
        if time.time() - t > limit:
            raise Failure(f"{what}: not within {limit} s: {wrong}")
        time.sleep(0.1)


def cluster_state(nodes, r_factor, shard_count, total):
    """What is wrong with the shard endpoints on `nodes` (None: all agree and add up), and
    the agreed shards: id -> (key count, sorted replica node numbers)."""
    seen = None
    for i in nodes:
        r = call(i, "GET", "/kvs/shards")
        if r.status != 200 or r.get("message") != "Shard membership retrieved successfully":
            return f"{r}", None
        ids = r.get("shards")
        if not isinstance(ids, list) or len(ids) != shard_count or not all(isinstance(s, str) for s in ids):
            return f"expected {shard_count} string shard ids: {r}", None
        shards = {}
        for s in ids:
            r = call(i, "GET", f"/kvs/shards/{s}")
            if (r.status != 200 or r.get("message") != "Shard information retrieved successfully"
                    or r.get("shard-id") != s or not isinstance(r.get("key-count"), int)
                    or not isinstance(r.get("replicas"), list) or len(r.get("replicas")) != r_factor
                    or any(a not in NODE_OF for a in r.get("replicas"))):
                return f"shard {s} on node {i}: {r}", None
            shards[s] = (r.get("key-count"), sorted(NODE_OF[a] for a in r.get("replicas")))
        if seen is not None and shards != seen:
            return f"node {i} sees shards {shards}, another node {seen}", None
        seen = shards
        own = [s for s, (_, reps) in shards.items() if i in reps]
        r = call(i, "GET", "/kvs/key-count")
        if (r.status != 200 or r.get("message") != "Key count retrieved successfully"
                or [r.get("shard-id")] != own or r.get("key-count") != shards[own[0]][0]):
            return f"node {i} (in shard {own}, count {shards[own[0]][0] if own else None}): {r}", None
    members = sorted(n for _, reps in seen.values() for n in reps)
    if members != sorted(nodes):
        return f"the shards' replicas {seen} are not the members {sorted(nodes)} once each", None
    if sum(c for c, _ in seen.values()) != total:
        return f"key counts {seen} do not sum to {total}", None
    return None, seen


def agreed_shards(nodes, r_factor, shard_count, total, limit=BOUND):
    """Waits (up to `limit`) for the shard endpoints of every node to agree and add up."""
    state = {}

    def probe():
        wrong, state["shards"] = cluster_state(nodes, r_factor, shard_count, total)
        state.setdefault("first", wrong)
        return wrong
    took = wait_until("the shard endpoints agreeing", limit, probe)
    if state["first"] is not None:
        log(f"  (the shard endpoints agreed after {took:.2f} s; at first: {state['first']})")
    r = call(nodes[0], "GET", "/kvs/shards/no-such-shard")
    check(r.status == 404, f"an unknown shard: expected 404: {r}")
    return state["shards"], took


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="leave the containers running at the end")
    ap.add_argument("--no-build", action="store_true", help="use the existing image")
    ap.add_argument("--image", default=IMAGE, help=f"image tag to build and run ({IMAGE})")
    args = ap.parse_args()
    image = args.image

    def on_signal(signum, frame):
        raise KeyboardInterrupt()

    def on_alarm(signum, frame):
        raise Failure(f"the run took over {RUN_LIMIT} s")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)

    cleanup()
    figures = {}
    try:
        if not args.no_build:
            t = time.time()
            log(subprocess.run([os.path.join(ROOT, "deploy", "image.sh"), image], check=True,
                               capture_output=True, text=True).stdout.strip())
            figures["image build s"] = round(time.time() - t, 1)
        signal.alarm(RUN_LIMIT)
        sh("docker", "network", "create", f"--subnet={SUBNET_A}", NET_A)
        sh("docker", "network", "create", f"--subnet={SUBNET_B}", NET_B)

        # 1. Two nodes, r = 1: two shards of one node.
        t = time.time()
        for i in (1, 2):
            run_node(image, i, VIEW2)
        for i in (1, 2):
            wait_up(i, ready=True)
        figures["2 nodes ready s"] = round(time.time() - t, 2)
        values = {}
        put_via = {}
        client = Session()
        t = time.time()
        for n in range(KEYS):
            key, via = f"key{n}", 1 + n % 2
            r = client.req(via, "PUT", key, f"value{n}")
            expect_put(r, created=True)
            put_via[key] = (via, proxied_to(r), str(r))
            values[key] = f"value{n}"
        for n in range(0, KEYS, 25):
            key = f"key{n}"
            r = client.req(2 - n % 2, "PUT", key, f"value{n}-updated")
            expect_put(r, created=False)
            values[key] = f"value{n}-updated"
        figures["500 PUTs s"] = round(time.time() - t, 2)
        owner = {}
        for key in values:
            local = []
            for i in (1, 2):
                r = client.req(i, "GET", key)
                expect_value(r, values[key])
                if proxied_to(r) is None:
                    local.append(i)
                else:
                    check(proxied_to(r) != i, f"node {i} names itself as the owner: {r}")
                    check(proxied_to(r) in (1, 2), f"an owner outside the view: {r}")
                    other = r
            check(len(local) == 1, f"{key}: answered without \"address\" by nodes {local} (r = 1: exactly its owner)")
            owner[key] = local[0]
            check(proxied_to(other) == owner[key], f"{key}: owned by node {owner[key]}, but {other}")
            via, named, put = put_via[key]
            check(named == (None if via == owner[key] else owner[key]),
                  f"{key} is node {owner[key]}'s, yet its PUT through node {via} answered {put}")
        shards, _ = agreed_shards([1, 2], 1, 2, KEYS, limit=0)
        for s, (count, reps) in shards.items():
            mine = sum(1 for k in values if owner[k] == reps[0])
            check(mine == count, f"shard {s} ({reps}) counts {count} keys, but {mine} keys answer there")
        log(f"r = 1: 500 chained PUTs through 2 nodes, read back through both; shards {shards}; "
            f"\"address\" exactly on the proxied replies")

        # 2. Two more nodes, then a view change to four with r = 2.
        for i in (3, 4):
            run_node(image, i, VIEW4, repl_factor=2)
        for i in (3, 4):
            wait_up(i, ready=False)
        t = time.time()
        sent = {"view": VIEW4, "repl-factor": 2}
        r = call(1, "PUT", "/kvs/view-change", sent, timeout=VIEW_CHANGE_TIMEOUT)
        took = time.time() - t
        figures["view-change s"] = round(took, 2)
        log(f"view change 2 nodes r=1 -> 4 nodes r=2: {took:.2f} s")
        check(r.status == 200 and r.get("message") == "View change successful", f"view change: {r}")
        answer = r.get("shards")
        check(isinstance(answer, list) and len(answer) == 2, f"view change: expected 2 shards: {r}")
        vc = {}
        for s in answer:
            check(isinstance(s, dict) and isinstance(s.get("shard-id"), str)
                  and isinstance(s.get("key-count"), int) and isinstance(s.get("replicas"), list)
                  and len(s["replicas"]) == 2 and all(a in NODE_OF for a in s["replicas"]),
                  f"view change: a shard is not {{shard-id, key-count, 2 replicas}}: {r}")
            vc[s["shard-id"]] = (s["key-count"], sorted(NODE_OF[a] for a in s["replicas"]))
        check(sorted(n for _, reps in vc.values() for n in reps) == [1, 2, 3, 4],
              f"view change: the replicas are not the four nodes once each: {r}")
        check(sum(c for c, _ in vc.values()) == KEYS, f"view change: counts do not sum to {KEYS}: {r}")
        check(took <= VIEW_CHANGE_LIMIT, f"view change took {took:.2f} s (the contract: {VIEW_CHANGE_LIMIT} s)")
        shards, _ = agreed_shards([1, 2, 3, 4], 2, 2, KEYS)
        check(shards == vc, f"the shard endpoints say {shards}, the view change answered {vc}")
        shard_of = {}
        for key in values:
            local, named = [], []
            for i in range(1, NODES + 1):
                r = client.req(i, "GET", key)
                expect_value(r, values[key])
                p = proxied_to(r)
                if p is None:
                    local.append(i)
                else:
                    named.append((i, p, r))
            s = [s for s, (_, reps) in shards.items() if reps == local]
            check(len(s) == 1, f"{key}: answered without \"address\" by nodes {local}, not one shard's replicas {shards}")
            shard_of[key] = s[0]
            for i, p, r in named:
                check(p in local, f"{key} is on nodes {local}, but {r}")
        for s, (count, reps) in shards.items():
            mine = sum(1 for k in values if shard_of[k] == s)
            check(mine == count, f"shard {s} counts {count} keys, but {mine} keys answer on its replicas {reps}")
        for key in values:                # the new replicas hold their keys themselves
            for i in (3, 4):
                if i in shards[shard_of[key]][1]:
                    r = call(i, "GET", f"/kvs/keys/{key}", {"causal-context": {}})
                    expect_value(r, values[key])
                    check(proxied_to(r) is None, f"new replica {i} of {key} proxied a read: {r}")
        log(f"r = 2: shards {shards}; every key read through all 4 nodes, answered by its 2 replicas, "
            f"proxied with \"address\" by the others")

        # 3. Partition: one replica of each shard leaves "home" for "away".
        ids = sorted(shards)
        side_p = [shards[s][1][0] for s in ids]     # one replica of each shard
        side_q = [shards[s][1][1] for s in ids]     # the other one
        on_side = {"P": dict(zip(ids, side_p)), "Q": dict(zip(ids, side_q))}
        by_shard = {s: [k for k in values if shard_of[k] == s] for s in ids}
        conflict = [k for s in ids for k in by_shard[s][0:20]]
        only = {"P": [k for s in ids for k in by_shard[s][20:45]],
                "Q": [k for s in ids for k in by_shard[s][45:70]]}
        untouched = [k for s in ids for k in by_shard[s][70:90]]
        before = dict(values)
        for i in side_p:
            sh("docker", "network", "disconnect", NET_A, name(i))
            sh("docker", "network", "connect", f"--ip={ip_b(i)}", NET_B, name(i))
        t_cut = time.time()
        log(f"partition: nodes {side_p} on {NET_B} | nodes {side_q} on {NET_A}")
        for i in side_p:
            wait_up(i, ready=True, limit=10)
        sides = {"P": Session(), "Q": Session()}
        for side in sides.values():
            side.ctx = client.ctx
        wrote = {"P": {}, "Q": {}}
        later = {}                        # a key both sides wrote -> the side that wrote last
        n = 0

        def write(side, key, v):
            r = sides[side].req(on_side[side][shard_of[key]], "PUT", key, v)
            expect_put(r, created=False)
            check(proxied_to(r) is None, f"side {side}'s replica of {key} proxied a write: {r}")
            wrote[side][key] = v

        for rnd in (1, 2):
            if rnd == 2:                  # hold the partition: timeouts, retries, sync rounds
                time.sleep(max(0.0, t_cut + PARTITION_HOLD - time.time()))
            for j, key in enumerate(conflict):    # the same keys from both sides, interleaved
                order = ("P", "Q") if (j + rnd) % 2 == 0 else ("Q", "P")
                for side in order:
                    write(side, key, f"{side}-{rnd}-{key}")
                    n += 1
                later[key] = order[1]
            for side in ("P", "Q"):
                for key in only[side]:
                    write(side, key, f"{side}-only-{rnd}-{key}")
                    n += 1
        for side in ("P", "Q"):           # each side reads its writes and the old keys
            for key, v in wrote[side].items():
                expect_value(sides[side].req(on_side[side][shard_of[key]], "GET", key), v)
            for key in untouched:
                expect_value(sides[side].req(on_side[side][shard_of[key]], "GET", key), before[key])
        # Side Q's nodes reach each other: a Q node proxies the other shard's keys to the
        # Q replica (the P replica being cut off).
        t = time.time()
        proxied = 0
        for s in ids:
            via = on_side["Q"][[o for o in ids if o != s][0]]
            for key in [k for k in only["Q"] if shard_of[k] == s][:3]:
                r = sides["Q"].req(via, "GET", key)
                expect_value(r, wrote["Q"][key])
                check(proxied_to(r) == on_side["Q"][s], f"node {via} should proxy {key} to node {on_side['Q'][s]}: {r}")
                proxied += 1
        figures["partition: proxied read within a side, mean s"] = round((time.time() - t) / proxied, 3)
        # The partition holds: neither side sees the other's one-sided writes.
        for side, other in (("P", "Q"), ("Q", "P")):
            for key in only[other][::5]:
                expect_value(sides[side].req(on_side[side][shard_of[key]], "GET", key), before[key])
        figures["partition: writes during it"] = n
        figures["partition s"] = round(time.time() - t_cut, 2)
        log(f"partitioned {figures['partition s']} s: {n} writes in two rounds on both sides "
            f"({len(conflict)} keys written by both), "
            f"each side read its own writes for both shards; none crossed")

        # Heal: back on "home" at the same addresses (the heal), then off "away".
        for i in side_p:
            sh("docker", "network", "connect", f"--ip={ip(i)}", NET_A, name(i))
        t_heal = time.time()
        for i in side_p:
            sh("docker", "network", "disconnect", NET_B, name(i))
        touched = conflict + only["P"] + only["Q"]
        final = {}

        def local_values(key):
            """What each replica of `key` answers by itself (empty context)."""
            got = {}
            for i in shards[shard_of[key]][1]:
                r = call(i, "GET", f"/kvs/keys/{key}", {"causal-context": {}}, timeout=2)
                got[i] = r.get("value") if r.status == 200 and proxied_to(r) is None else f"<{r}>"
            return got

        pending = set(touched)

        def diverged():
            # A key whose replicas agree stays agreed (both hold the winner): checked
            # again as a whole below.
            for key in list(pending):
                got = local_values(key)
                if len(set(got.values())) == 1:
                    final[key] = got.popitem()[1]
                    pending.discard(key)
                else:
                    example = (key, got)
            return None if not pending else f"{len(pending)} keys differ between their replicas, e.g. {example}"
        wait_until("replicas converging after the heal", BOUND + 10, diverged)
        took = time.time() - t_heal
        figures["convergence after heal s"] = round(took, 3)
        log(f"healed: every written key's replicas agree {took:.3f} s after the heal")
        check(took <= BOUND, f"replicas took {took:.2f} s to agree after the heal (bound {BOUND} s)")
        for key in touched:
            got = local_values(key)
            check(set(got.values()) == {final[key]}, f"{key}: the replicas agreed on {final[key]!r}, now {got}")
        for key in conflict:
            check(final[key] in (wrote["P"][key], wrote["Q"][key]),
                  f"{key}: the replicas agree on {final[key]!r}, which neither side wrote")
        for side in ("P", "Q"):
            for key in only[side]:
                check(final[key] == wrote[side][key], f"{key}: side {side}'s write {wrote[side][key]!r} "
                      f"is lost: the replicas hold {final[key]!r}")
        wins = sum(1 for k in conflict if final[k] == wrote["P"][k])
        for key in conflict:              # the design: the latest write wins (ties by node)
            check(final[key] == wrote[later[key]][key],
                  f"{key}: side {later[key]} wrote {wrote[later[key]][key]!r} last, yet the replicas "
                  f"agree on {final[key]!r}")
        values.update(final)
        reader = Session()
        for key in touched:
            for i in range(1, NODES + 1):
                expect_value(reader.req(i, "GET", key), values[key])
        log(f"concurrent writes: the later write won on all {len(conflict)} keys (side P's {wins}, "
            f"side Q's {len(conflict) - wins}); "
            f"no one-sided write lost; every node reads the same values")
        agreed_shards([1, 2, 3, 4], 2, 2, KEYS)

        # 4. Multi-homed: the P nodes join "away" again, on top of "home".
        for i in side_p:
            sh("docker", "network", "connect", f"--ip={ip_b(i)}", NET_B, name(i))
        try:                              # where Docker forwards the ports (read only)
            nat = sh("iptables", "-t", "nat", "-S", "DOCKER", check=False)
        except OSError:
            nat = ""
        for i in side_p:
            target = [line.split("--to-destination ")[-1] for line in nat.splitlines()
                      if f"--dport {host_port(i)} " in line and "--to-destination" in line]
            log(f"  node {i}: on {NET_A} {ip(i)} and {NET_B} {ip_b(i)}; published port {host_port(i)} "
                f"-> {target[0] if target else '(no DNAT rule seen)'}")
            check(not target or target[0] == f"{ip_b(i)}:{PORT}",
                  f"Docker forwards node {i}'s published port to {target[0]}, not its {NET_B} address")
            r = call(i, "GET", "/kvs/key-count")
            check(r.status == 200, f"multi-homed node {i} through its published port: {r}")
            r = call(i, "GET", "/kvs/key-count", host=ip_b(i))
            check(r.status == 200, f"multi-homed node {i} on its {NET_B} address: {r}")
            r = call(i, "GET", "/kvs/key-count", host=ip(i))
            check(r.status == 200, f"multi-homed node {i} on its ADDRESS: {r}")
            mine = [k for k in values if i in shards[shard_of[k]][1]][:10]
            theirs = [k for k in values if i not in shards[shard_of[k]][1]][:10]
            for key in mine + theirs:
                r = reader.req(i, "GET", key)
                expect_value(r, values[key])
                check((proxied_to(r) is None) == (key in mine), f"node {i} {'proxied' if key in mine else 'did not proxy'} {key}: {r}")
            r = reader.req(i, "PUT", theirs[0], values[theirs[0]] + "-mh")
            expect_put(r, created=False)
            check(proxied_to(r) in shards[shard_of[theirs[0]]][1], f"a proxied PUT through node {i}: {r}")
            values[theirs[0]] += "-mh"
        log(f"multi-homed nodes {side_p} answer through their published ports and on both addresses, "
            f"and serve and proxy keys")

        # 5. Deletes.
        gone = [k for s in ids for k in by_shard[s][90:120]]
        deleter = Session()
        deleter.ctx = reader.ctx
        for n, key in enumerate(gone):
            via = 1 + n % NODES
            r = deleter.req(via, "DELETE", key)
            expect_fields(r, 200, {"doesExist": True, "message": "Deleted successfully"})
            reps = shards[shard_of[key]][1]
            check(proxied_to(r) is None if via in reps else proxied_to(r) in reps,
                  f"a DELETE through node {via} of a key on nodes {reps}: {r}")
            values.pop(key)
        for key in gone:
            for i in range(1, NODES + 1):
                expect_missing(deleter.req(i, "GET", key), "GET")
        expect_missing(deleter.req(2, "DELETE", gone[0]), "DELETE")
        counts = {s: c - sum(1 for k in gone if shard_of[k] == s) for s, (c, _) in shards.items()}
        shards, took = agreed_shards([1, 2, 3, 4], 2, 2, len(values))
        check({s: c for s, (c, _) in shards.items()} == counts, f"key counts {shards} after the deletes, expected {counts}")
        log(f"deleted {len(gone)} keys: 404 on every node; key counts {counts} (settled in {took:.2f} s)")

        down = side_q[1]                  # a replica that stayed on "home" only
        s_down = [s for s in ids if down in shards[s][1]][0]
        peer = [i for i in shards[s_down][1] if i != down][0]
        t = time.time()
        sh("docker", "stop", "-t", "10", name(down))
        figures["docker stop s"] = round(time.time() - t, 2)
        gone2 = [k for k in by_shard[s_down][120:140]]
        up = [i for i in range(1, NODES + 1) if i != down]
        for n, key in enumerate(gone2):
            r = deleter.req(up[n % len(up)], "DELETE", key)
            expect_fields(r, 200, {"doesExist": True, "message": "Deleted successfully"})
            values.pop(key)
        for key in gone2:
            expect_missing(deleter.req(peer, "GET", key), "GET")
        t = time.time()
        sh("docker", "start", name(down))
        wait_up(down, ready=True)
        figures["restart ready s"] = round(time.time() - t, 2)
        for key in gone2:                 # with the client's context: never the old value
            expect_missing(deleter.req(down, "GET", key), "GET")

        def resurrected():
            for key in gone2 + gone:
                if shard_of[key] != s_down:
                    continue
                r = call(down, "GET", f"/kvs/keys/{key}", {"causal-context": {}}, timeout=2)
                if r.status != 404:
                    return f"node {down} after its restart: {r}"
            r = call(down, "GET", "/kvs/key-count")
            want = counts[s_down] - len(gone2)
            if r.get("key-count") != want:
                return f"node {down}'s key count is not {want}: {r}"
            return None
        took = wait_until(f"node {down} dropping the keys deleted while it was stopped", BOUND, resurrected)
        figures["deletes reach the restarted node s"] = round(took, 3)
        time.sleep(2)                     # a few anti-entropy rounds later: still deleted
        wrong = resurrected()
        check(wrong is None, f"a deleted key came back: {wrong}")
        counts[s_down] -= len(gone2)
        shards, _ = agreed_shards([1, 2, 3, 4], 2, 2, len(values))
        check({s: c for s, (c, _) in shards.items()} == counts, f"key counts {shards}, expected {counts}")
        log(f"node {down} stopped, {len(gone2)} of its shard's keys deleted, started again: "
            f"they are gone there {took:.3f} s after it was ready, and stay gone")

        final_reader = Session()
        for key in list(values) + gone + gone2:
            for i in range(1, NODES + 1):
                r = final_reader.req(i, "GET", key)
                if key in values:
                    expect_value(r, values[key])
                else:
                    expect_missing(r, "GET")
        log(f"final sweep: {len(values)} keys and {len(gone) + len(gone2)} deleted keys checked on all 4 nodes")
        log("figures: " + json.dumps(figures))
        log("PASS")
        return 0
    except (Failure, AssertionError, RuntimeError, subprocess.CalledProcessError) as e:
        signal.alarm(0)
        log(f"FAIL: {e}")
        if isinstance(e, subprocess.CalledProcessError):
            log(e.stderr or "")
        log("figures so far: " + json.dumps(figures))
        for i in range(1, NODES + 1):
            log(f"--- docker logs {name(i)} (last 30 lines)")
            log(sh("docker", "logs", "--tail", "30", name(i), check=False))
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        signal.alarm(0)
        if not args.keep:
            cleanup()
            log("containers, networks and volumes removed")


if __name__ == "__main__":
    sys.exit(main())
