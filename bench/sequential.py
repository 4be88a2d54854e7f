#!/usr/bin/env python3
"""Sequential PUT/GET loop against a local 4-node K=2 cluster: a first throughput figure.

Starts `kvs local` on 127.0.77.1-4:8080 (data in a temp dir), runs N sequential PUTs
then N sequential GETs from one keep-alive client that passes its causal_payload along,
against node 1 (a replica: half the keys are local, half forwarded) and, separately,
against every node in turn. Prints requests/s and mean latency, then stops the cluster.
Bounded: N requests per phase (default 2000) and a 120 s overall limit.

usage: cargo build --release && python3 bench/sequential.py [N]
"""
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
NODES = [f"127.0.77.{i}" for i in range(1, 5)]
BIN = os.path.join(os.path.dirname(__file__), "..", "target", "release", "kvs")
DEADLINE = time.time() + 120
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def call(conn, method, path, fields):
    conn.request(method, path, urllib.parse.urlencode(fields), FORM)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    if resp.status not in (200, 201):
        raise RuntimeError(f"{method} {path}: {resp.status} {body}")
    return body


def phase(name, hosts, method, make_fields):
    conns = [http.client.HTTPConnection(h, 8080, timeout=10) for h in hosts]
    token = phase.token
    per_partition = {}
    start = time.perf_counter()
    for i in range(N):
        if time.time() > DEADLINE:
            raise RuntimeError("time limit reached")
        body = call(conns[i % len(conns)], method, f"/kv-store/key{i}", make_fields(i, token))
        token = body["causal_payload"]
        per_partition[body["partition_id"]] = per_partition.get(body["partition_id"], 0) + 1
    elapsed = time.perf_counter() - start
    phase.token = token
    print(f"{name:<34} {N / elapsed:8.0f} req/s   mean {elapsed / N * 1e3:6.3f} ms")
    return per_partition


phase.token = ""


def main():
    with tempfile.TemporaryDirectory() as data:
        cluster = subprocess.Popen(
            [BIN, "local", "--nodes", "4", "-k", "2", "--subnet", "77", "--data-dir", data],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in cluster.stdout:
                if "Ctrl-C" in line:
                    break
            value = "v" * 100
            print(f"4 nodes, K=2, {N} sequential requests per phase, 100-byte values, durable PUTs")
            counts = phase("PUT via node 1", NODES[:1], "PUT", lambda i, t: {"val": value, "causal_payload": t})
            phase("GET via node 1", NODES[:1], "GET", lambda i, t: {"causal_payload": t})
            phase("PUT round-robin over 4 nodes", NODES, "PUT", lambda i, t: {"val": value, "causal_payload": t})
            phase("GET round-robin over 4 nodes", NODES, "GET", lambda i, t: {"causal_payload": t})
            ratio = max(counts.values()) / min(counts.values())
            print(f"keys per partition (from PUT replies): {dict(sorted(counts.items()))}, max/min = {ratio:.3f}")
        finally:
            cluster.send_signal(signal.SIGINT)
            try:
                cluster.wait(timeout=10)
            except subprocess.TimeoutExpired:
                cluster.kill()


if __name__ == "__main__":
    main()
