#!/usr/bin/env python3
"""Container test: the seed's 4-node K=2 cluster as Docker containers, with faults.

Builds the image (deploy/image.sh), then, exactly as seed 001 writes it: a private
network 10.0.0.0/16, nodes 10.0.0.21-24:8080 started with K=2, VIEW and IPPORT, node i
published on host port 808i. Each node keeps its data in its own volume. Then:

  1. writes keys through the published ports and reads them back through every node;
  2. disconnects node 4 from the network, writes more, reconnects it: its partition's
     keys must reach it within 5 s;
  3. `docker kill`s node 2, writes more, starts it again on its volume: it must hold its
     partition's keys within 5 s;
  4. `docker stop`s node 3 (SIGTERM) and times the graceful shutdown, then starts a new
     container on its volume without VIEW or K: it must come back with its view;
  5. checks every acknowledged key through every node, and that the replicas of each
     partition agree.

Prints the figures (image size, time to build, convergence times, stop time) and exits
non-zero on any lost key, disagreement or convergence over 5 s. Every container, the
network and the volumes it made are removed on exit, failure or Ctrl-C. Bounded: every
wait has a deadline, every HTTP call a timeout.

usage: python3 deploy/container_test.py [--keep] [--no-build]
"""
import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
IMAGE = "kvs"
NET = "kvs-ci-mynet"
SUBNET = "10.0.0.0/16"
NODES = 4
K = 2
BOUND = 5.0          # the contract: replicas agree within 5 s of a fault healing
READY_LIMIT = 30.0
HTTP_TIMEOUT = 5.0


def ip(i):
    return f"10.0.0.{20 + i}"


def name(i):
    return f"kvs-ci-node{i}"


def volume(i):
    return f"kvs-ci-data{i}"


VIEW = ",".join(f"{ip(i)}:8080" for i in range(1, NODES + 1))


def log(msg):
    print(msg, flush=True)


def sh(*args, check=True, quiet=False):
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout.strip()


def cleanup():
    for i in range(1, NODES + 1):
        sh("docker", "rm", "-f", name(i), check=False)
    sh("docker", "network", "rm", NET, check=False)
    for i in range(1, NODES + 1):
        sh("docker", "volume", "rm", "-f", volume(i), check=False)


def run_node(i):
    # The seed's line, plus a name and a volume for the node's data.
    sh("docker", "run", "-d", "--name", name(i), "-p", f"{8080 + i}:8080", f"--ip={ip(i)}",
       f"--net={NET}", "-e", f"K={K}", "-e", f"VIEW={VIEW}", "-e", f"IPPORT={ip(i)}:8080",
       "-v", f"{volume(i)}:/data", IMAGE)


def request(host, port, method, path, fields=None):
    """(status, json) or (None, error text) on a transport error."""
    c = http.client.HTTPConnection(host, port, timeout=HTTP_TIMEOUT)
    try:
        body = urllib.parse.urlencode(fields or {})
        c.request(method, path, body, {"Content-Type": "application/x-www-form-urlencoded"})
        r = c.getresponse()
        data = r.read()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, {"raw": data[:200].decode(errors="replace")}
    except (OSError, http.client.HTTPException) as e:
        return None, str(e)
    finally:
        c.close()


def published(i, method, path, fields=None):
    """Through node i's published port on the host, as a user of the seed would."""
    return request("127.0.0.1", 8080 + i, method, path, fields)


def direct(i, method, path, fields=None):
    """Straight to the container on the private network (the host has the bridge)."""
    return request(ip(i), 8080, method, path, fields)


def wait_ready(i, via=published):
    deadline = time.time() + READY_LIMIT
    while time.time() < deadline:
        st, body = via(i, "GET", "/api/v1/status")
        # A member is ready once it holds its cluster's key.
        if st == 200 and body.get("ready", True):
            return
        time.sleep(0.1)
    logs = sh("docker", "logs", "--tail", "20", name(i), check=False)
    raise RuntimeError(f"node {i} not ready within {READY_LIMIT} s; its log:\n{logs}")


class Store:
    """What the test wrote and had acknowledged: key -> value, and a causal payload."""

    def __init__(self):
        self.acked = {}
        self.token = ""
        self.retries = 0

    def put(self, i, key, val):
        # A 503 is retryable (a replica cut off a moment ago may still be tried first,
        # and a write whose outcome is unknown is never re-sent by the node itself), as a
        # client of the seed would retry.
        deadline = time.time() + 20
        while True:
            st, body = published(i, "PUT", f"/kv-store/{key}", {"val": val, "causal_payload": self.token})
            if st in (200, 201):
                break
            if st not in (None, 503) or time.time() > deadline:
                raise RuntimeError(f"PUT {key} via node {i}: {st} {body}")
            self.retries += 1
            time.sleep(0.2)
        self.token = body["causal_payload"]
        self.acked[key] = val

    def write_batch(self, prefix, n, via):
        for j in range(n):
            self.put(via[j % len(via)], f"{prefix}{j}", f"{prefix}-value-{j}")


def partitions():
    """partition id -> member node numbers, as node 1 sees them."""
    st, body = published(1, "GET", "/kv-store/get_all_partition_ids")
    assert st == 200, body
    out = {}
    for pid in body["partition_id_list"]:
        st, m = published(1, "GET", "/kv-store/get_partition_members", {"partition_id": pid})
        assert st == 200, m
        out[pid] = [int(a.split(":")[0].split(".")[-1]) - 20 for a in m["partition_members"]]
    return out


def key_partition(store, key):
    st, body = published(1, "GET", f"/kv-store/{key}", {"causal_payload": store.token})
    if st != 200:
        raise RuntimeError(f"GET {key}: {st} {body}")
    return body["partition_id"]


def converge(node, keys, store, via, limit=BOUND):
    """Seconds until `node` serves every key in `keys` from its own state (empty causal
    payload) with the acknowledged value; raises after `limit` (plus a grace to report)."""
    start = time.time()
    pending = set(keys)
    while pending and time.time() - start < limit + 5:
        for key in list(pending):
            st, body = via(node, "GET", f"/kv-store/{key}", {"causal_payload": ""})
            if st == 200 and body.get("value") == store.acked[key]:
                pending.discard(key)
        if pending:
            time.sleep(0.05)
    took = time.time() - start
    if pending:
        raise RuntimeError(f"node {node} still misses {len(pending)} keys after {took:.1f} s, e.g. {sorted(pending)[:3]}")
    if took > limit:
        raise RuntimeError(f"node {node} took {took:.2f} s to converge (bound {limit} s)")
    return took


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="leave the containers running at the end")
    ap.add_argument("--no-build", action="store_true", help="use the existing kvs image")
    args = ap.parse_args()

    def on_signal(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_signal)

    cleanup()
    figures = {}
    try:
        if not args.no_build:
            t = time.time()
            log(subprocess.run([os.path.join(ROOT, "deploy", "image.sh"), IMAGE], check=True,
                               capture_output=True, text=True).stdout.strip())
            figures["image build s"] = round(time.time() - t, 1)
        figures["image MB"] = round(int(sh("docker", "image", "inspect", "-f", "{{.Size}}", IMAGE)) / 1e6, 1)

        sh("docker", "network", "create", f"--subnet={SUBNET}", NET)
        t = time.time()
        for i in range(1, NODES + 1):
            run_node(i)
        for i in range(1, NODES + 1):
            wait_ready(i)
        figures["cluster ready s"] = round(time.time() - t, 2)
        parts = partitions()
        log(f"cluster up: partitions {parts}")
        assert len(parts) == NODES // K and all(len(m) == K for m in parts.values()), parts

        store = Store()
        store.write_batch("a", 200, via=[1, 2, 3, 4])
        for i in range(1, NODES + 1):
            for key in list(store.acked)[:: 20]:
                st, body = published(i, "GET", f"/kv-store/{key}", {"causal_payload": store.token})
                assert st == 200 and body["value"] == store.acked[key], (i, key, st, body)
        log(f"wrote {len(store.acked)} keys through the published ports; read back through every node")

        # 2. Cut node 4 off the network, write, reconnect.
        sh("docker", "network", "disconnect", NET, name(4))
        store.write_batch("b", 100, via=[1, 2, 3])
        sh("docker", "network", "connect", f"--ip={ip(4)}", NET, name(4))
        p4 = next(p for p, m in parts.items() if 4 in m)
        mine = [k for k in store.acked if key_partition(store, k) == p4]
        figures["reconnect convergence s"] = round(converge(4, mine, store, via=direct), 3)
        log(f"node 4 disconnected, 100 keys written, reconnected: its {len(mine)} keys "
            f"there in {figures['reconnect convergence s']} s")

        # 3. docker kill node 2, write, start it again on its volume.
        sh("docker", "kill", name(2))
        store.write_batch("c", 100, via=[1, 3, 4])
        t = time.time()
        sh("docker", "start", name(2))
        wait_ready(2, via=direct)
        figures["restart ready s"] = round(time.time() - t, 2)
        p2 = next(p for p, m in parts.items() if 2 in m)
        mine = [k for k in store.acked if key_partition(store, k) == p2]
        figures["restart convergence s"] = round(converge(2, mine, store, via=direct), 3)
        log(f"node 2 killed, 100 keys written, restarted: ready in {figures['restart ready s']} s, "
            f"its {len(mine)} keys there {figures['restart convergence s']} s later")

        # 4. docker stop node 3: SIGTERM, graceful.
        t = time.time()
        sh("docker", "stop", "-t", "10", name(3))
        figures["docker stop s"] = round(time.time() - t, 2)
        code = sh("docker", "inspect", "-f", "{{.State.ExitCode}}", name(3))
        if figures["docker stop s"] > 5 or code != "0":
            raise RuntimeError(f"docker stop took {figures['docker stop s']} s, exit code {code}")
        # A new container on the same volume, given neither VIEW nor K: what it knows of
        # the cluster can only come from the volume.
        sh("docker", "rm", name(3))
        sh("docker", "run", "-d", "--name", name(3), "-p", "8083:8080", f"--ip={ip(3)}", f"--net={NET}",
           "-e", f"IPPORT={ip(3)}:8080", "-v", f"{volume(3)}:/data", IMAGE)
        wait_ready(3, via=direct)
        st, body = direct(3, "GET", "/kv-store/get_partition_id")
        p3 = next(p for p, m in parts.items() if 3 in m)
        if st != 200 or body.get("partition_id") != p3:
            raise RuntimeError(f"a new container on node 3's volume answers {st} {body}, expected partition {p3}")
        log(f"node 3 stopped gracefully in {figures['docker stop s']} s (exit 0); a new container "
            f"on its volume, without VIEW or K, is back in partition {p3}")

        # 5. Everything, everywhere.
        lost = []
        for i in range(1, NODES + 1):
            for key, val in store.acked.items():
                st, body = direct(i, "GET", f"/kv-store/{key}", {"causal_payload": store.token})
                if st != 200 or body.get("value") != val:
                    lost.append((i, key, st, body))
        disagree = 0
        for key, val in store.acked.items():
            members = parts[key_partition(store, key)]
            local = {m: direct(m, "GET", f"/kv-store/{key}", {"causal_payload": ""})[1] for m in members}
            if any(not isinstance(b, dict) or b.get("value") != val for b in local.values()):
                disagree += 1
        log(f"checked {len(store.acked)} acknowledged keys through all {NODES} nodes: "
            f"{len(lost)} lost or wrong; replicas disagreeing on {disagree} keys")
        logs = sh("docker", "logs", "--tail", "3", name(1), check=False)
        log(f"node 1's log (docker logs, last lines):\n{logs}")
        figures["PUT retries after a 503"] = store.retries
        log("figures: " + json.dumps(figures))
        if lost or disagree:
            for item in lost[:10]:
                log(f"  lost: {item}")
            return 1
        log("PASS")
        return 0
    except (RuntimeError, AssertionError, subprocess.CalledProcessError) as e:
        log(f"FAIL: {e}")
        if isinstance(e, subprocess.CalledProcessError):
            log(e.stderr or "")
        for i in range(1, NODES + 1):
            log(f"--- docker logs {name(i)} (last 15 lines)")
            log(sh("docker", "logs", "--tail", "15", name(i), check=False))
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
