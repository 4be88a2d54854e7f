#!/usr/bin/env python3
"""Container test of seed 002: the seed's `docker run` lines, shards, add-member, reshard.

Builds the image (deploy/image.sh) unless --no-build, then, as seed 002 writes it: a
private network 10.10.0.0/16, six nodes 10.10.0.2-7:8080 started with SOCKET_ADDRESS,
VIEW and SHARD_COUNT=2, node i published on host port 8081+i. Then:

  1. checks the shard ids, each node's shard and the members (3 per shard, round-robin
     in VIEW order, as the seed's example shows);
  2. writes 600 keys, each PUT carrying the metadata of the one before, through the
     nodes in turn; reads every key back through another node with that metadata; the
     shards' key counts must sum to 600 and be within 25 % of each other;
  3. starts a seventh node with the seed's line for it (no SHARD_COUNT, a VIEW that
     includes it): it must appear in every node's view, in no shard; `add-member` puts
     it in shard 1, whose key count it must then report as its own peers do, and it
     must serve every key of its shard;
  4. `reshard` to 10 shards must be refused with the seed's message; `reshard` to 3
     must balance the 7 nodes (3 shards of 2 or 3) and keep every key readable, the
     counts summing to 600;
  5. `docker stop`s one node: it must leave every view within 10 s; started again on
     its volume, it must come back at its place and hold all its shard's keys.

Prints the figures (times to leave and rejoin the view, reshard time, keys moved) and
exits non-zero on any failed check. Every container, the network and the volumes are
removed on exit, failure or Ctrl-C. Bounded: every wait has a deadline, every HTTP call
a timeout.

usage: python3 deploy/container_test_002.py [--keep] [--no-build]
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
IMAGE = "kvs"
NET = "kvs-ci-net002"
SUBNET = "10.10.0.0/16"
FIRST = 6            # nodes started with SHARD_COUNT
ALL = 7              # the seventh joins later
SHARDS = 2
KEYS = 600
READY_LIMIT = 30.0
VIEW_LIMIT = 10.0    # the seed: a stopped replica leaves the views within ~10 s
HTTP_TIMEOUT = 30.0  # view changes answer when their data has moved


def ip(i):
    return f"10.10.0.{i + 1}"


def addr(i):
    return f"{ip(i)}:8080"


def name(i):
    return f"kvs-ci-002-node{i}"


def volume(i):
    return f"kvs-ci-002-data{i}"


VIEW6 = ",".join(addr(i) for i in range(1, FIRST + 1))
VIEW7 = ",".join(addr(i) for i in range(1, ALL + 1))


def cleanup():
    for i in range(1, ALL + 1):
        sh("docker", "rm", "-f", name(i), check=False)
    sh("docker", "network", "rm", NET, check=False)
    for i in range(1, ALL + 1):
        sh("docker", "volume", "rm", "-f", volume(i), check=False)


def run_node(i, view, shard_count):
    # The seed's line, plus a volume for the node's data.
    line = ["docker", "run", "-d", "-p", f"{8081 + i}:8080", f"--net={NET}", f"--ip={ip(i)}",
            "--name", name(i), "-e", f"SOCKET_ADDRESS={addr(i)}", "-e", f"VIEW={view}"]
    if shard_count is not None:
        line += ["-e", f"SHARD_COUNT={shard_count}"]
    sh(*line, "-v", f"{volume(i)}:/data", IMAGE)


def call(i, method, path, body=None):
    """(status, json) through node i's published port, or (None, error text)."""
    c = http.client.HTTPConnection("127.0.0.1", 8081 + i, timeout=HTTP_TIMEOUT)
    try:
        data = json.dumps(body) if body is not None else None
        c.request(method, path, data, {"Content-Type": "application/json"})
        r = c.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, {"raw": raw[:200].decode(errors="replace")}
    except (OSError, http.client.HTTPException) as e:
        return None, str(e)
    finally:
        c.close()


def wait_ready(i):
    deadline = time.time() + READY_LIMIT
    while time.time() < deadline:
        st, body = call(i, "GET", "/api/v1/status")
        if st == 200 and body.get("ready") and body.get("view"):
            return
        time.sleep(0.1)
    logs = sh("docker", "logs", "--tail", "30", name(i), check=False)
    raise RuntimeError(f"node {i} not ready within {READY_LIMIT} s; its log:\n{logs}")


def expect(st, body, status, what):
    if st != status:
        raise AssertionError(f"{what}: expected {status}, got {st} {body}")
    return body


def view_of(i):
    st, body = call(i, "GET", "/key-value-store-view")
    expect(st, body, 200, f"view of node {i}")
    return body["view"].split(",") if body["view"] else []


def shard_ids(i):
    st, body = call(i, "GET", "/key-value-store-shard/shard-ids")
    expect(st, body, 200, "shard-ids")
    return body["shard-ids"].split(",")


def members(i, shard):
    st, body = call(i, "GET", f"/key-value-store-shard/shard-id-members/{shard}")
    expect(st, body, 200, f"members of shard {shard}")
    return body["shard-id-members"].split(",")


def key_count(i, shard):
    st, body = call(i, "GET", f"/key-value-store-shard/shard-id-key-count/{shard}")
    expect(st, body, 200, f"key count of shard {shard}")
    assert isinstance(body["shard-id-key-count"], int), body
    return body["shard-id-key-count"]


def wait_until(what, limit, check):
    t = time.time()
    while time.time() - t < limit:
        if check():
            return time.time() - t
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {limit} s")


def check_all_keys(values, metadata, nodes):
    for n, (key, value) in enumerate(values.items()):
        i = nodes[n % len(nodes)]
        st, body = call(i, "GET", f"/key-value-store/{key}", {"causal-metadata": metadata})
        expect(st, body, 200, f"GET {key} on node {i}")
        assert body["value"] == value, (key, body)


def counts(via):
    ids = shard_ids(via)
    return {s: key_count(via, s) for s in ids}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="leave the containers running")
    ap.add_argument("--no-build", action="store_true", help="use the existing kvs image")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(KeyboardInterrupt()))

    cleanup()
    figures = {}
    try:
        if not args.no_build:
            log(subprocess.run([os.path.join(ROOT, "deploy", "image.sh"), IMAGE], check=True,
                               capture_output=True, text=True).stdout.strip())
        sh("docker", "network", "create", f"--subnet={SUBNET}", NET)
        t = time.time()
        for i in range(1, FIRST + 1):
            run_node(i, VIEW6, SHARDS)
        for i in range(1, FIRST + 1):
            wait_ready(i)
        figures["cluster ready s"] = round(time.time() - t, 2)

        # 1. Shards as the seed deals them: member j to shard j mod 2.
        assert shard_ids(1) == ["0", "1"], shard_ids(1)
        for s in range(SHARDS):
            want = [addr(i) for i in range(1, FIRST + 1) if (i - 1) % SHARDS == s]
            for i in (1, 4):
                assert members(i, s) == want, (s, members(i, s), want)
        for i in range(1, FIRST + 1):
            st, body = call(i, "GET", "/key-value-store-shard/node-shard-id")
            expect(st, body, 200, "node-shard-id")
            assert body["shard-id"] == str((i - 1) % SHARDS), (i, body)
        assert view_of(3) == VIEW6.split(","), view_of(3)
        log("six nodes in two shards of three, as the seed deals them")

        # 2. 600 causally chained PUTs over the nodes, reads elsewhere.
        values, metadata = {}, ""
        t = time.time()
        for n in range(KEYS):
            key, value = f"key{n}", f"value{n}"
            st, body = call(1 + n % FIRST, "PUT", f"/key-value-store/{key}",
                            {"value": value, "causal-metadata": metadata})
            expect(st, body, 201, f"PUT {key}")
            assert body["shard-id"] in ("0", "1"), body
            if n == 0:
                assert body["version"] == body["causal-metadata"], body
            metadata = body["causal-metadata"]
            values[key] = value
        figures["600 PUTs s"] = round(time.time() - t, 2)
        check_all_keys(values, metadata, [2, 3, 4, 5, 6, 1])
        c = counts(2)
        assert sum(c.values()) == KEYS, c
        assert max(c.values()) <= 1.25 * min(c.values()), c
        log(f"600 chained PUTs read back through other nodes; counts {c}")

        # 3. A seventh node, started the seed's way for it, then added to shard 1.
        run_node(7, VIEW7, None)
        wait_ready(7)
        figures["join s"] = round(wait_until(
            "node 7 in every view", 10, lambda: all(addr(7) in view_of(i) for i in range(1, ALL + 1))), 2)
        st, body = call(7, "GET", "/key-value-store-shard/node-shard-id")
        assert st == 404, (st, body)
        t = time.time()
        st, body = call(2, "PUT", "/key-value-store-shard/add-member/1", {"socket-address": addr(7)})
        expect(st, body, 200, "add-member")
        figures["add-member s"] = round(time.time() - t, 2)
        st, body = call(7, "GET", "/key-value-store-shard/node-shard-id")
        assert st == 200 and body["shard-id"] == "1", (st, body)
        assert addr(7) in members(1, 1)
        assert key_count(7, "1") == c["1"], (key_count(7, "1"), c)
        mine = {k: v for k, v in values.items()}
        check_all_keys(mine, metadata, [7])
        log(f"node 7 joined the view, then shard 1 with its {c['1']} keys")

        # 4. Reshard: refused to 10, done to 3.
        st, body = call(3, "PUT", "/key-value-store-shard/reshard", {"shard-count": 10})
        assert st == 400 and body == {
            "message": "Not enough nodes to provide fault-tolerance with the given shard count!"}, (st, body)
        t = time.time()
        st, body = call(3, "PUT", "/key-value-store-shard/reshard", {"shard-count": 3})
        expect(st, body, 200, "reshard 3")
        assert body["message"] == "Resharding done successfully", body
        figures["reshard 2->3 s"] = round(time.time() - t, 2)
        assert shard_ids(5) == ["0", "1", "2"], shard_ids(5)
        sizes = sorted(len(members(5, s)) for s in range(3))
        assert sizes == [2, 2, 3], sizes
        c3 = counts(6)
        assert sum(c3.values()) == KEYS, c3
        assert max(c3.values()) <= 1.25 * min(c3.values()), c3
        check_all_keys(values, metadata, [1, 2, 3, 4, 5, 6, 7])
        log(f"reshard 10 refused; reshard 3: sizes {sizes}, counts {c3}, every key readable")

        # 5. A stopped replica leaves the views, and comes back with its keys.
        sh("docker", "stop", "-t", "5", name(2))
        others = [1, 3, 4, 5, 6, 7]
        figures["leave views s"] = round(wait_until(
            "node 2 out of every view", VIEW_LIMIT,
            lambda: all(addr(2) not in view_of(i) for i in others)), 2)
        sh("docker", "start", name(2))
        figures["rejoin views s"] = round(wait_until(
            "node 2 back in every view, at its place", 30,
            lambda: all(view_of(i)[1:2] == [addr(2)] for i in others)), 2)
        wait_ready(2)
        st, body = call(2, "GET", "/key-value-store-shard/node-shard-id")
        expect(st, body, 200, "node 2's shard")
        shard = body["shard-id"]
        assert key_count(2, shard) == c3[shard], (key_count(2, shard), c3)
        check_all_keys(values, metadata, [2])
        log("node 2 left every view, came back at its place with its shard's keys")

        log("figures: " + json.dumps(figures))
        log("PASS")
        return 0
    except (AssertionError, RuntimeError) as e:
        log(f"FAIL: {e}")
        for i in range(1, ALL + 1):
            tail = sh("docker", "logs", "--tail", "15", name(i), check=False)
            log(f"--- node {i}\n{tail}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if not args.keep:
            cleanup()
            log("containers, network and volumes removed")


if __name__ == "__main__":
    sys.exit(main())
