#!/usr/bin/env python3
"""View-change benchmark: time, throughput and keys moved when nodes join or leave.

Starts real `kvs` processes on 127.88.<scenario>.<i>:8080 (data and one log per node in a
temp dir), loads N keys of B bytes (default 100,000 x 1 KiB) with a pool of keep-alive
clients, then changes the view with `PUT /kv-store/update_view` while a background thread
polls the coordinator's `/api/v1/status` for progress. Scenarios:

  k1      4 nodes, K=1 (4 partitions); add a 5th node: a 5th partition, ~1/5 of the keys move.
  k2      4 nodes, K=2 (2 partitions); add a 5th (a proxy: nothing moves), then a 6th
          (a 3rd partition with the proxy: ~1/3 of the keys move, copied to both replicas).
  remove  after each add scenario, remove an original replica from the (proxy-free)
          cluster so its partition dissolves; without k1/k2 it runs on its own 5-node K=1
          cluster. The minimum is what the dissolved partition held.

For every change it reports the wall time of the update_view request, keys and bytes moved
(unique keys that changed partition, as the coordinator counts them) and copies written,
MB/s (MB = 10^6 bytes), and keys moved versus the theoretical minimum (N / P' for an add
that creates partition number P', 0 for a proxy add, the dissolved partition's keys for a
remove). After each change it waits for the per-node key counts to settle (handed-over
keys are deleted in the background), checks that they add up to N per replica set, and
reads a random sample of keys through random members with an empty causal_payload.

Bounded: a global time limit (--time-limit, default 1200 s), a timeout on every HTTP
call, and every started process is stopped (SIGTERM, then SIGKILL) on exit, error or
Ctrl-C. The temp dir is removed unless --keep.

usage: cargo build --release && python3 bench/rebalance.py [--keys N] [--value-bytes B]
           [--scenarios k1,k2,remove] [--json PATH] [--keep] [--threads T] [--sample S]
           [--time-limit SECONDS]
"""
import argparse
import http.client
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

BIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "kvs")
PORT = 8080
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SECRET = "kvs-rebalance-bench"
OP_TIMEOUT = 10          # one client GET/PUT or status call
CHANGE_TIMEOUT = 300     # one update_view request
SETTLE_TIMEOUT = 60      # key counts settling after a change
MB = 1e6

DEADLINE = None          # set in main
PROCS = []               # every Popen started, for cleanup
STOP = threading.Event()  # tells background threads to stop


class BenchError(RuntimeError):
    pass


def remaining():
    left = DEADLINE - time.time()
    if left <= 0:
        raise BenchError("global time limit reached")
    return left


def log(msg):
    print(msg, flush=True)


def call(conn, method, path, fields, ok=(200, 201)):
    """One request on a keep-alive connection; returns (status, json body)."""
    conn.request(method, path, urllib.parse.urlencode(fields), FORM)
    resp = conn.getresponse()
    raw = resp.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"raw": raw[:200].decode("utf-8", "replace")}
    if ok is not None and resp.status not in ok:
        raise BenchError(f"{method} {path} on {conn.host}: {resp.status} {body}")
    return resp.status, body


def status(addr, timeout=OP_TIMEOUT):
    conn = http.client.HTTPConnection(addr.split(":")[0], PORT, timeout=min(timeout, remaining()))
    try:
        return call(conn, "GET", "/api/v1/status", {}, ok=(200,))[1]
    finally:
        conn.close()


def key_name(i):
    return f"key{i:07d}"


def value_of(i, size):
    """A deterministic value of exactly `size` bytes ([a-z0-9], no URL escaping), unique per key."""
    head = f"{i:010d}"
    filler = "abcdefghijklmnopqrstuvwxyz0123456789"
    s = head + filler * (size // len(filler) + 1)
    return s[:size]


# ---------------------------------------------------------------------------------------
# Processes


class Cluster:
    def __init__(self, name, subnet, k, tmp):
        self.name, self.subnet, self.k = name, subnet, k
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir, exist_ok=True)
        self.procs = {}   # addr -> Popen
        self.members = []  # current view members, in order

    def addr(self, i):
        return f"127.88.{self.subnet}.{i}:{PORT}"

    def start(self, addrs, view):
        """Starts nodes `addrs`; `view` is the VIEW list, or None for a node added later."""
        for a in addrs:
            ip = a.split(":")[0]
            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex((ip, PORT)) == 0:
                    raise BenchError(f"{a} is already in use by another process")
            env = dict(os.environ, IPPORT=a, K=str(self.k), CLUSTER_SECRET=SECRET, RUST_LOG="info",
                       DATA_DIR=os.path.join(self.dir, ip))
            env.pop("VIEW", None)
            if view is not None:
                env["VIEW"] = ",".join(view)
            out = open(os.path.join(self.dir, f"{ip}.log"), "wb")
            p = subprocess.Popen([BIN], env=env, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
            out.close()
            PROCS.append(p)
            self.procs[a] = p
        for a in addrs:
            self.wait_ready(a)
        if view is not None:
            self.members = list(view)

    def wait_ready(self, a):
        end = time.time() + 20
        while True:
            if self.procs[a].poll() is not None:
                raise BenchError(f"{a} exited with {self.procs[a].returncode}:\n{self.log_tail(a)}")
            try:
                # Ready: answering, and (a member) holding the cluster key; before every
                # member does, a request forwarded to a keyless one gets 503.
                if status(a, timeout=2).get("ready", True):
                    return
                raise BenchError(f"{a} is not ready yet")
            except (OSError, http.client.HTTPException, BenchError):
                if time.time() > end:
                    raise BenchError(f"{a} not ready after 20 s:\n{self.log_tail(a)}")
                remaining()
                time.sleep(0.1)

    def log_tail(self, a):
        return log_tail(os.path.join(self.dir, f"{a.split(':')[0]}.log"))


def log_tail(path, lines=8):
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join("    " + ln for ln in text[-lines:])
    except OSError as e:
        return f"    (no log: {e})"


def stop_all():
    STOP.set()
    live = [p for p in PROCS if p.poll() is None]
    for p in live:
        try:
            p.send_signal(signal.SIGTERM)
        except OSError:
            pass
    end = time.time() + 5
    for p in live:
        try:
            p.wait(timeout=max(0.1, end - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


# ---------------------------------------------------------------------------------------
# Load and verification


def run_pool(name, n_items, threads, host_for, work, progress_every=5.0):
    """Runs work(conn, i) for i in range(n_items) on `threads` threads; item i of thread t
    goes to host_for(t, i) over that thread's keep-alive connection to the host. Returns
    (elapsed, per-thread lists of results)."""
    counter = [0]
    lock = threading.Lock()
    errors = []
    results = [[] for _ in range(threads)]

    def worker(t):
        conns = {}
        try:
            for i in range(t, n_items, threads):
                if STOP.is_set() or errors:
                    return
                host = host_for(t, i).split(":")[0]
                for attempt in range(5):
                    conn = conns.get(host)
                    if conn is None:
                        conn = conns[host] = http.client.HTTPConnection(host, PORT, timeout=OP_TIMEOUT)
                    try:
                        remaining()
                        results[t].append(work(conn, i))
                        break
                    except (OSError, http.client.HTTPException) as e:
                        conns.pop(host).close()
                        if attempt == 4:
                            raise BenchError(f"{name}: item {i} via {host}: {e!r}")
                        time.sleep(0.2 * (attempt + 1))
                with lock:
                    counter[0] += 1
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            for c in conns.values():
                c.close()

    ts = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    start = time.perf_counter()
    for t in ts:
        t.start()
    last = start
    while any(t.is_alive() for t in ts) and not errors:
        time.sleep(0.2)
        now = time.perf_counter()
        if now - last >= progress_every:
            last = now
            done = counter[0]
            log(f"    {name}: {done}/{n_items} ({done / (now - start):.0f}/s)")
        remaining()
    elapsed = time.perf_counter() - start
    if errors:
        STOP.set()
        raise errors[0]
    return elapsed, results


def load(cluster, n, size, threads):
    hosts = list(cluster.members)

    def put(conn, i):
        call(conn, "PUT", f"/kv-store/{key_name(i)}", {"val": value_of(i, size), "causal_payload": ""})

    log(f"  loading {n} keys of {size} B with {threads} threads over {len(hosts)} nodes")
    elapsed, _ = run_pool("load", n, threads, lambda t, i: hosts[t % len(hosts)], put)
    log(f"  loaded {n} keys in {elapsed:.1f} s: {n / elapsed:.0f} PUT/s, {n * size / elapsed / MB:.1f} MB/s")
    return {"keys": n, "seconds": round(elapsed, 3), "puts_per_s": round(n / elapsed, 1)}


def verify(cluster, n, size, sample, threads, seed):
    """Reads `sample` random keys through random members with an empty causal_payload."""
    rng = random.Random(seed)
    keys = rng.sample(range(n), min(sample, n))
    hosts = list(cluster.members)
    parts = {}

    def get(conn, j):
        i = keys[j]
        st, body = call(conn, "GET", f"/kv-store/{key_name(i)}", {"causal_payload": ""}, ok=None)
        if st != 200:
            return ("error", i, f"{st} {body.get('error', body)}")
        if body.get("value") != value_of(i, size):
            got = body.get("value")
            return ("wrong", i, f"value of {len(got) if isinstance(got, str) else got!r} chars, prefix {str(got)[:12]!r}")
        return ("ok", i, body.get("partition_id"))

    via = [rng.choice(hosts) for _ in keys]  # a random member per read
    elapsed, results = run_pool("verify", len(keys), threads, lambda t, j: via[j], get, progress_every=10)
    flat = [r for rs in results for r in rs]
    ok = sum(1 for r in flat if r[0] == "ok")
    bad = [r for r in flat if r[0] != "ok"]
    for r in flat:
        if r[0] == "ok":
            parts[r[2]] = parts.get(r[2], 0) + 1
    verdict = "OK" if ok == len(keys) else "FAILED"
    log(f"  verify: {ok}/{len(keys)} sampled keys read back with their {size} B value via "
        f"{len(hosts)} members ({elapsed:.1f} s) {verdict}; sample per partition {dict(sorted(parts.items()))}")
    for r in bad[:5]:
        log(f"    {r[0]}: {key_name(r[1])}: {r[2]}")
    return {"sampled": len(keys), "ok": ok, "failed": len(bad),
            "examples": [f"{r[0]} {key_name(r[1])}: {r[2]}" for r in bad[:5]]}


def settle(cluster, n, extra=()):
    """Waits until each partition's replicas agree on a key count, the counts add up to n, and
    proxies and the `extra` nodes (just removed) hold nothing. Returns (settled, seconds, per-node counts, per-partition counts)."""
    start = time.time()
    while True:
        counts, view = {}, None
        for a in list(cluster.members) + list(extra):
            try:
                s = status(a)
            except (OSError, http.client.HTTPException, BenchError) as e:
                counts[a] = f"unreachable: {e}"
                continue
            counts[a] = s.get("keys")
            if a == cluster.members[0]:
                view = s.get("view")
        per_part = {}
        good = view is not None
        if view:
            members_in_parts = set()
            for p in view["partitions"]:
                c = {counts.get(m) for m in p["members"]}
                members_in_parts.update(p["members"])
                per_part[p["partition_id"]] = max((x for x in c if isinstance(x, int)), default=None)
                good &= len(c) == 1 and isinstance(next(iter(c)), int)
            good &= sum(v or 0 for v in per_part.values()) == n
            good &= all(counts.get(m) == 0 for m in view["members"] if m not in members_in_parts)
            good &= all(counts.get(m) == 0 for m in extra)
        waited = time.time() - start
        if good or waited > SETTLE_TIMEOUT or time.time() > DEADLINE:
            return good, waited, counts, per_part
        time.sleep(0.5)


def show_counts(cluster, n, good, waited, counts, per_part):
    short = " ".join(f"{a.split(':')[0].rsplit('.', 1)[1]}:{c}" for a, c in counts.items())
    total = sum(v or 0 for v in per_part.values())
    k = cluster.k
    state = f"settled in {waited:.1f} s" if good else f"NOT settled after {waited:.1f} s"
    log(f"  key counts per node (node:keys) {short}")
    on_members = sum(c for a, c in counts.items() if isinstance(c, int) and a in cluster.members)
    log(f"  per partition {dict(sorted(per_part.items()))}, sum {total} (expected {n}), "
        f"all members {on_members} (expected {n * k}): {state}")


# ---------------------------------------------------------------------------------------
# View changes


def reset_peak_rss(cluster):
    """Resets the peak resident set size of every running node (Linux: clear_refs 5)."""
    for p in cluster.procs.values():
        if p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass


def peak_rss(cluster):
    """The largest peak resident set size (VmHWM, bytes) of the running nodes since the
    last reset_peak_rss, or None where /proc does not tell."""
    peaks = []
    for p in cluster.procs.values():
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            pass
    return max(peaks) if peaks else None


def change(cluster, kind, target, n, size, expected_min, label):
    coord = cluster.members[0]
    change_name = f"{kind} {target}"
    before = status(coord)
    p_before = len(before["view"]["partitions"])
    log(f"  {label}: PUT /kv-store/update_view?type={kind} ip_port={target} on {coord} "
        f"({p_before} partitions before)")

    polled = {}

    def poll():
        conn_last = 0.0
        while not STOP.is_set() and not done.is_set():
            try:
                s = status(coord, timeout=5)
                vc = s.get("view_change") or {}
                if vc.get("change") == change_name and vc.get("epoch", 0) > before["epoch"]:
                    polled.update(vc)
                    now = time.time()
                    if now - conn_last >= 1.0:
                        conn_last = now
                        log(f"    [{vc.get('elapsed_ms', 0) / 1000:6.1f} s] phase {vc.get('phase'):<10} "
                            f"pulls {vc.get('pulls_done')}/{vc.get('pulls_total')} "
                            f"moved {vc.get('keys_moved')} keys {vc.get('bytes_moved', 0) / MB:.1f} MB, "
                            f"copied {vc.get('keys_copied')} ({vc.get('bytes_copied', 0) / MB:.1f} MB)")
            except (OSError, http.client.HTTPException, BenchError):
                pass
            done.wait(0.5)

    done = threading.Event()
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    conn = http.client.HTTPConnection(coord.split(":")[0], PORT, timeout=min(CHANGE_TIMEOUT, remaining()))
    reset_peak_rss(cluster)
    t0 = time.perf_counter()
    try:
        st, reply = call(conn, "PUT", f"/kv-store/update_view?type={kind}", {"ip_port": target}, ok=None)
    finally:
        wall = time.perf_counter() - t0
        done.set()
        conn.close()
        poller.join(timeout=10)
    rss = peak_rss(cluster)
    if st != 200:
        raise BenchError(f"update_view {change_name}: {st} {reply} after {wall:.1f} s")
    after = status(coord)
    vc = after.get("view_change") or {}
    if vc.get("change") != change_name or vc.get("phase") != "done":
        log(f"    note: coordinator's view_change is {vc}")
    log(f"  {label}: answered {reply} in {wall:.2f} s (coordinator: {vc.get('elapsed_ms')} ms, phase {vc.get('phase')})")

    if kind == "add":
        cluster.members.append(target)
    else:
        cluster.members.remove(target)
    p_after = reply.get("number_of_partitions")

    good, waited, counts, per_part = settle(cluster, n, extra=[target] if kind == "remove" else ())
    show_counts(cluster, n, good, waited, counts, per_part)

    km, bm = vc.get("keys_moved", 0), vc.get("bytes_moved", 0)
    kc, bc = vc.get("keys_copied", 0), vc.get("bytes_copied", 0)
    if expected_min is None:  # an add that creates partition number p_after
        expected_min = n / p_after if p_after > p_before else 0
    ratio = km / expected_min if expected_min else None  # a proxy add: compare km with 0
    new_part = None
    if kind == "add" and isinstance(reply.get("partition_id"), int) and reply["partition_id"] >= 0:
        new_part = per_part.get(reply["partition_id"])
    res = {
        "cluster": cluster.name, "k": cluster.k, "change": label, "request": change_name,
        "partitions_before": p_before, "partitions_after": p_after,
        "partition_id": reply.get("partition_id"),
        "wall_s": round(wall, 3), "coordinator_elapsed_ms": vc.get("elapsed_ms"),
        "keys_moved": km, "bytes_moved": bm, "payload_bytes_moved": km * size,
        "keys_copied": kc, "bytes_copied": bc,
        "mb_per_s_moved": round(bm / MB / wall, 2), "mb_per_s_copied": round(bc / MB / wall, 2),
        "keys_per_s_moved": round(km / wall, 1),
        "min_keys": round(expected_min, 1), "moved_vs_min": round(ratio, 4) if ratio is not None else None,
        "moved_minus_min": round(km - expected_min, 1),
        "new_partition_keys": new_part, "pulls": vc.get("pulls_total"),
        "settled": good, "settle_s": round(waited, 2), "keys_per_partition": per_part,
        "keys_per_node": counts, "peak_rss_bytes": rss,
    }
    ratio_s = f"{ratio:.4f}" if ratio is not None else ("at the minimum" if km == 0 else f"{km} over")
    log(f"  {label}: moved {km} keys ({bm / MB:.1f} MB, payload {km * size / MB:.1f} MB), "
        f"copies {kc} ({bc / MB:.1f} MB); {bm / MB / wall:.1f} MB/s moved, {bc / MB / wall:.1f} MB/s copied; "
        f"minimum {expected_min:.0f} keys, moved/min = {ratio_s}; "
        f"largest node peak RSS during the change {rss / MB if rss else float('nan'):.0f} MB")
    return res


def scenario(name, subnet, k, initial, steps, args, tmp, out):
    """steps: list of (kind, node index, label); a remove's minimum is measured beforehand."""
    log(f"\n=== {name}: {initial} nodes, K={k}, {args.keys} keys x {args.value_bytes} B ===")
    cl = Cluster(name, subnet, k, tmp)
    view = [cl.addr(i) for i in range(1, initial + 1)]
    cl.start(view, view)
    log(f"  started {', '.join(view)}")
    out["loads"][name] = load(cl, args.keys, args.value_bytes, args.threads)
    good, waited, counts, per_part = settle(cl, args.keys)
    show_counts(cl, args.keys, good, waited, counts, per_part)
    out["verifications"].append({"cluster": name, "after": "load",
                                 **verify(cl, args.keys, args.value_bytes, args.sample, args.threads, 1)})
    for step, (kind, idx, label) in enumerate(steps, start=2):
        target = cl.addr(idx)
        expected_min = None
        if kind == "add":
            cl.start([target], None)
        else:
            s = status(target)
            if s.get("role") != "replica":
                raise BenchError(f"{target} is {s.get('role')}, not a replica")
            view = s["view"]
            if view["members"] and len(view["members"]) % k != 0:
                raise BenchError(f"{name}: the cluster has proxies; a remove would not dissolve a partition")
            # Its partition dissolves: the minimum is what that partition holds now.
            good, waited, counts, per_part = settle(cl, args.keys)
            expected_min = per_part.get(s["partition_id"])
            if not good or expected_min is None:
                raise BenchError(f"{name}: key counts did not settle before the remove: {counts}")
            log(f"  partition {s['partition_id']} of {target} holds {expected_min} keys: the minimum to move")
        res = change(cl, kind, target, args.keys, args.value_bytes, expected_min, f"{name}: {label}")
        res["verify"] = verify(cl, args.keys, args.value_bytes, args.sample, args.threads, step)
        out["verifications"].append({"cluster": name, "after": label, **res["verify"]})
        out["results"].append(res)


def table(results):
    cols = [("change", "{}", 30), ("P", "{}", 5), ("wall s", "{:.2f}", 7), ("moved", "{}", 7),
            ("minimum", "{:.0f}", 8), ("ratio", "{}", 7), ("MB moved", "{:.1f}", 8), ("copies", "{}", 7),
            ("MB copied", "{:.1f}", 9), ("MB/s mv", "{:.1f}", 7), ("MB/s cp", "{:.1f}", 7),
            ("keys/s", "{:.0f}", 7), ("RSS MB", "{}", 6), ("verify", "{}", 11)]
    head = " ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, _, w) in enumerate(cols))
    lines = [head, "-" * len(head)]
    for r in results:
        v = r["verify"]
        vals = [r["change"], f"{r['partitions_before']}->{r['partitions_after']}", r["wall_s"], r["keys_moved"],
                r["min_keys"], (f"{r['moved_vs_min']:.3f}" if r["moved_vs_min"] is not None
                                else "=min" if r["keys_moved"] == 0 else "over"),
                r["bytes_moved"] / MB, r["keys_copied"], r["bytes_copied"] / MB, r["mb_per_s_moved"],
                r["mb_per_s_copied"], r["keys_per_s_moved"],
                f"{r['peak_rss_bytes'] / MB:.0f}" if r["peak_rss_bytes"] else "?", f"{v['ok']}/{v['sampled']}"]
        cells = []
        for i, ((_, fmt, w), x) in enumerate(zip(cols, vals)):
            s = fmt.format(x)
            cells.append(f"{s:<{w}}" if i == 0 else f"{s:>{w}}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main():
    global DEADLINE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--value-bytes", type=int, default=1024)
    ap.add_argument("--scenarios", default="k1,k2,remove", help="comma-separated subset of k1,k2,remove")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (data and node logs)")
    ap.add_argument("--threads", type=int, default=16, help="client threads for loading and verifying")
    ap.add_argument("--sample", type=int, default=2000, help="keys read back after each change")
    ap.add_argument("--time-limit", type=float, default=1200, help="global limit in seconds")
    args = ap.parse_args()
    scen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scen) - {"k1", "k2", "remove"}
    if unknown or not scen or args.keys < 1 or args.value_bytes < 1 or args.threads < 1:
        ap.error(f"bad arguments (unknown scenarios: {sorted(unknown)})")
    DEADLINE = time.time() + args.time_limit
    command = " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv)
    log(f"command: {command}")
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} not found: run cargo build --release first")
    load_avg = os.getloadavg()
    bin_mtime = os.path.getmtime(BIN)
    log(f"binary {os.path.realpath(BIN)}, {os.cpu_count()} CPUs, load average {load_avg[0]:.2f} at start; "
        f"time limit {args.time_limit:.0f} s; binary built {time.ctime(bin_mtime)}")

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    tmp = tempfile.mkdtemp(prefix="kvs-rebalance-")
    log(f"data and node logs in {tmp}" + ("" if args.keep else " (removed at the end; --keep keeps it)"))
    out = {"command": command, "keys": args.keys, "value_bytes": args.value_bytes, "scenarios": scen,
           "cpus": os.cpu_count(), "load_average_at_start": load_avg, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "loads": {}, "verifications": [], "results": [], "error": None}
    rm = "remove" in scen
    failed = False
    try:
        if "k1" in scen:
            steps = [("add", 5, "K=1 add 5th node")]
            if rm:
                steps.append(("remove", 2, "K=1 remove node 2"))
            scenario("k1", 1, 1, 4, steps, args, tmp, out)
        if "k2" in scen:
            steps = [("add", 5, "K=2 add 5th (proxy)"), ("add", 6, "K=2 add 6th")]
            if rm:
                steps.append(("remove", 3, "K=2 remove node 3"))
            scenario("k2", 2, 2, 4, steps, args, tmp, out)
        if rm and "k1" not in scen and "k2" not in scen:
            scenario("remove", 3, 1, 5, [("remove", 2, "K=1 remove node 2")], args, tmp, out)
    except (BenchError, KeyboardInterrupt, OSError, http.client.HTTPException) as e:
        failed = True
        out["error"] = f"{type(e).__name__}: {e}"
        log(f"\nFAILED: {out['error']}")
        for name in os.listdir(tmp):
            d = os.path.join(tmp, name)
            for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                if f.endswith(".log"):
                    log(f"  last lines of {name}/{f}:")
                    log(log_tail(os.path.join(d, f)))
    finally:
        stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if out["results"]:
        log(f"\n{args.keys} keys x {args.value_bytes} B; MB = 10^6 bytes; 'moved' = unique keys that changed "
            f"partition, 'copies' = copies written (MB include per-key metadata); ratio = moved / minimum; "
            f"verify = sampled reads correct; RSS MB = largest peak resident memory of a node during the change")
        log(table(out["results"]))
        for name, l in out["loads"].items():
            log(f"load {name}: {l['keys']} keys in {l['seconds']:.1f} s ({l['puts_per_s']:.0f} PUT/s)")
    out["load_average_at_end"] = os.getloadavg()
    if os.path.exists(BIN) and os.path.getmtime(BIN) != bin_mtime:
        out["warning"] = "the kvs binary was rebuilt during the run: nodes may run different builds"
        log(f"WARNING: {out['warning']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        log(f"results written to {args.json}")
    bad_verify = any(v["failed"] for v in out["verifications"])
    if failed or bad_verify:
        sys.exit(1)


if __name__ == "__main__":
    main()
