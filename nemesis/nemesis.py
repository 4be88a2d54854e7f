#!/usr/bin/env python3
"""Nemesis: real kvs nodes in network namespaces, injected faults, a causal workload, a checker.

Every node runs in its own Linux network namespace (`kvsnem-<i>`), with its own address
10.231.0.<i> on a private bridge (`kvsnem0`, the host side is 10.231.0.254); the
clients run in the host namespace and reach every node over the bridge. Faults:

  isolate N      node N cannot talk to any other node (clients still reach it: what it
                 answers is the minority side's availability)
  split P        the replicas of partition P cannot talk to each other
  one-way A>B    packets from A to B are dropped, B to A still pass
  kill N         kill -9 node N, restart it on its data after the fault
  pause N        SIGSTOP node N, SIGCONT after the fault

The workload: C clients, each a causal session (it passes the causal_payload of every
answer into its next request), writes its own keys (value = "<client>:<seq>") and reads
everyone's keys, through random nodes. Every operation is recorded (invoke, ok, fail,
unknown). The checker then reports:

  lost writes        a key whose final value (read through every replica once all faults
                     are healed) is older than its last acknowledged write
  causal anomalies   a successful read returning a value older than one the client's
                     token already covered (its own acknowledged write, a value it read
                     before, or anything those depended on)
  divergence         replicas of a partition answering different final values
  convergence        after each heal: time until every replica of each partition serves
                     (with an empty token) the last write acknowledged during the fault

A read may legitimately return a write whose outcome its writer never learned (a 503
or a timeout) instead of a later acknowledged one, when the later write did not depend
on it (they are concurrent siblings and the dialect shows one winner); those are counted
separately, not as anomalies.

Bounded: every phase has a fixed length, every HTTP call a timeout, the whole run a time
limit; the namespaces, the bridge, the iptables rule and every process are removed on
exit, error or Ctrl-C. Needs root (ip netns, iptables).

usage: cargo build --release && sudo python3 nemesis/nemesis.py [--nodes 4] [--k 2]
           [--clients 6] [--fault-seconds 8] [--heal-seconds 6] [--seed S] [--json PATH]
"""
import argparse
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SUBNET = "10.231.0"
BRIDGE = "kvsnem0"
HOST_IP = f"{SUBNET}.254"
PORT = 8080
OP_TIMEOUT = 5.0
SECRET = "kvs-nemesis"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
CONVERGENCE_BOUND = 5.0


def log(msg):
    print(msg, flush=True)


def sh(*args, check=True):
    """Runs a command, returning its stdout; raises with its stderr on failure."""
    r = subprocess.run(args, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


# ---------------------------------------------------------------------------------------
# The network: namespaces on a bridge


class Net:
    def __init__(self, n):
        self.n = n
        self.forward_rule = ["FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"]
        self.made = False

    @staticmethod
    def ns(i):
        return f"kvsnem-{i}"

    @staticmethod
    def ip(i):
        return f"{SUBNET}.{i}"

    def setup(self):
        self.teardown(quiet=True)  # leftovers of an aborted run
        self.made = True
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        # Docker sets the FORWARD policy to DROP; frames between our namespaces cross it.
        sh("iptables", "-I", *self.forward_rule)
        for i in range(1, self.n + 1):
            ns, host_end, ns_end = self.ns(i), f"kvsnem{i}h", f"kvsnem{i}n"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            sh("ip", "link", "set", host_end, "master", BRIDGE)
            sh("ip", "link", "set", host_end, "up")
            sh("ip", "link", "set", ns_end, "netns", ns)
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.ip(i)}/24", "dev", ns_end)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_end, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def teardown(self, quiet=False):
        for i in range(1, self.n + 1):
            sh("ip", "link", "del", f"kvsnem{i}h", check=False)
            sh("ip", "netns", "del", self.ns(i), check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
        while subprocess.run(["iptables", "-D", *self.forward_rule], capture_output=True).returncode == 0:
            pass
        if not quiet:
            log("network torn down")

    def drop(self, i, j, inbound=True, outbound=True):
        """In node i's namespace, drops packets to (and from) node j."""
        if outbound:
            sh("ip", "netns", "exec", self.ns(i), "iptables", "-A", "OUTPUT", "-d", self.ip(j), "-j", "DROP")
        if inbound:
            sh("ip", "netns", "exec", self.ns(i), "iptables", "-A", "INPUT", "-s", self.ip(j), "-j", "DROP")

    def cut(self, i, j):
        self.drop(i, j)
        self.drop(j, i)

    def heal(self):
        for i in range(1, self.n + 1):
            sh("ip", "netns", "exec", self.ns(i), "iptables", "-F")


# ---------------------------------------------------------------------------------------
# Nodes


class Nodes:
    def __init__(self, n, k, binary, tmp):
        self.n, self.k, self.binary, self.tmp = n, k, binary, tmp
        self.procs = {}
        self.view = [f"{Net.ip(i)}:{PORT}" for i in range(1, n + 1)]

    def addr(self, i):
        return f"{Net.ip(i)}:{PORT}"

    def start(self, i):
        """Starts node i: with VIEW if it is one of the initial nodes, else as a spare to add."""
        env = dict(os.environ, K=str(self.k), IPPORT=self.addr(i),
                   DATA_DIR=os.path.join(self.tmp, f"node{i}"), CLUSTER_SECRET=SECRET,
                   RUST_LOG=os.environ.get("RUST_LOG", "info"))
        env.pop("VIEW", None)
        if i <= self.n:
            env["VIEW"] = ",".join(self.view)
        out = open(os.path.join(self.tmp, f"node{i}.log"), "ab")
        self.procs[i] = subprocess.Popen(["ip", "netns", "exec", Net.ns(i), self.binary], env=env,
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()

    def wait_ready(self, i, limit=30):
        deadline = time.time() + limit
        while time.time() < deadline:
            if self.procs[i].poll() is not None:
                raise RuntimeError(f"node {i} exited: see {self.tmp}/node{i}.log")
            try:
                st, body = request(self.addr(i), "GET", "/api/v1/status", {}, timeout=1)
                # A member is ready once it holds its cluster's key.
                if st == 200 and body.get("ready", True):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"node {i} not ready within {limit} s")

    def kill(self, i):
        p = self.procs.pop(i)
        p.kill()
        p.wait()

    def signal(self, i, sig):
        os.kill(self.procs[i].pid, sig)

    def stop_all(self):
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except OSError:
                    pass
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def request(addr, method, path, fields, timeout=OP_TIMEOUT, conn=None):
    """One request; returns (status, json body). Raises OSError/HTTPException on transport errors."""
    host, port = addr.split(":")
    own = conn is None
    c = conn or http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        c.request(method, path, urllib.parse.urlencode(fields), FORM)
        r = c.getresponse()
        body = r.read()
        try:
            return r.status, json.loads(body)
        except ValueError:
            return r.status, {"raw": body[:200].decode(errors="replace")}
    finally:
        if own:
            c.close()


# ---------------------------------------------------------------------------------------
# Workload and history


class History:
    def __init__(self):
        self.lock = threading.Lock()
        self.ops = []
        self.phase = "setup"
        # (key, seq) -> {"deps": {key: seq} the writer's session depended on, "outcome": ...}
        self.writes = {}

    def add(self, op):
        with self.lock:
            op["phase"] = self.phase
            self.ops.append(op)


class Client(threading.Thread):
    """One causal session. `deps` maps each key to the newest write of it this session
    depends on (seqs are the writer's, increasing over time)."""

    def __init__(self, cid, nodes, keys_per_client, clients, history, rng, stop):
        super().__init__(daemon=True)
        self.cid, self.nodes, self.history, self.rng, self.stop = cid, nodes, history, rng, stop
        self.own = [f"c{cid}_k{j}" for j in range(keys_per_client)]
        self.all_keys = [f"c{c}_k{j}" for c in range(clients) for j in range(keys_per_client)]
        self.token = ""
        self.deps = {}
        self.seq = 0
        self.conns = {}
        self.error = None

    def conn(self, i):
        if i not in self.conns:
            self.conns[i] = http.client.HTTPConnection(Net.ip(i), PORT, timeout=OP_TIMEOUT)
        return self.conns[i]

    def depend(self, key, seq):
        """The session now depends on write (key, seq) and on what that write depended on."""
        with self.history.lock:
            w = self.history.writes.get((key, seq))
            deps = dict(w["deps"]) if w else {}
        deps[key] = max(deps.get(key, 0), seq)
        for k, s in deps.items():
            if s > self.deps.get(k, 0):
                self.deps[k] = s

    def call(self, i, method, key, fields):
        try:
            return request(f"{Net.ip(i)}:{PORT}", method, f"/kv-store/{key}", fields, conn=self.conn(i))
        except (OSError, http.client.HTTPException) as e:
            c = self.conns.pop(i, None)
            if c:
                c.close()
            # A refused connection certainly delivered nothing: a plain failure. Anything
            # else (reset, timeout) may have been acted on: unknown.
            return None, {"transport": str(e), "refused": isinstance(e, ConnectionRefusedError)}

    def run(self):
        try:
            self.loop()
        except Exception as e:  # a bug in the workload must fail the run, not thin it out
            self.error = f"client {self.cid}: {type(e).__name__}: {e}"
            log(self.error)

    def loop(self):
        while not self.stop.is_set():
            i = self.rng.randint(1, self.nodes)
            t0 = time.time()
            if self.rng.random() < 0.5:
                key = self.rng.choice(self.own)
                self.seq += 1
                seq = self.seq
                with self.history.lock:
                    self.history.writes[(key, seq)] = {"deps": dict(self.deps), "outcome": "pending"}
                st, body = self.call(i, "PUT", key, {"val": f"{self.cid}:{seq}", "causal_payload": self.token})
                outcome = "ok" if st in (200, 201) else \
                    ("unknown" if st is None and not body.get("refused") else "fail")
                with self.history.lock:
                    self.history.writes[(key, seq)]["outcome"] = outcome
                if outcome == "ok":
                    self.token = body.get("causal_payload", self.token)
                    self.depend(key, seq)
                self.history.add({"client": self.cid, "f": "write", "key": key, "seq": seq, "node": i,
                                  "status": st, "outcome": outcome, "t0": t0, "t1": time.time(),
                                  "partition": body.get("partition_id")})
            else:
                key = self.rng.choice(self.all_keys)
                floor = self.deps.get(key, 0)
                st, body = self.call(i, "GET", key, {"causal_payload": self.token})
                got = None
                outcome = "unknown" if st is None and not body.get("refused") else "fail"
                if st == 200:
                    outcome = "ok"
                    got = int(str(body.get("value", ":0")).split(":")[-1] or 0)
                    self.token = body.get("causal_payload", self.token)
                    self.depend(key, got)
                elif st == 404:
                    outcome, got = "ok", 0
                self.history.add({"client": self.cid, "f": "read", "key": key, "got": got, "floor": floor,
                                  "node": i, "status": st, "outcome": outcome, "t0": t0, "t1": time.time(),
                                  "partition": body.get("partition_id")})
            time.sleep(0.005)


# ---------------------------------------------------------------------------------------
# Checker


class Order:
    """Causal order among the writes of one key: write s depends on deps_s[key], which
    depends on its own deps[key], and so on: a chain of decreasing seqs."""

    def __init__(self, history):
        self.writes = history.writes

    def follows(self, key, later, earlier):
        """Whether write (key, later) causally follows (key, earlier) (or is it)."""
        s = later
        while s > earlier:
            s = self.writes.get((key, s), {"deps": {}})["deps"].get(key, 0)
        return s == earlier

    def relation(self, key, got, floor):
        """How a value `got` read for `key` relates to `floor`, the newest write of it the
        reader depended on: 'ok' (floor or after it), 'stale' (strictly before it, or
        missing) or 'concurrent' (a sibling the dialect may show instead)."""
        if not floor or got == floor:
            return "ok"
        if not got:
            return "stale"
        if got > floor and self.follows(key, got, floor):
            return "ok"
        if got < floor and self.follows(key, floor, got):
            return "stale"
        return "concurrent"


def check(history, final):
    order = Order(history)
    anomalies, siblings = [], 0
    for op in history.ops:
        if op["f"] == "read" and op["outcome"] == "ok":
            rel = order.relation(op["key"], op["got"], op["floor"])
            if rel == "stale":
                anomalies.append(op)
            elif rel == "concurrent":
                siblings += 1
    last_acked = {}
    for (key, seq), w in history.writes.items():
        if w["outcome"] == "ok" and seq > last_acked.get(key, 0):
            last_acked[key] = seq
    lost, divergent, final_siblings = [], [], 0
    for key, last in last_acked.items():
        values = final.get(key, {})
        if len(set(values.values())) > 1:
            divergent.append((key, values))
        for node, got in values.items():
            rel = order.relation(key, got, last) if got is not None else "stale"
            if rel == "stale":
                lost.append((key, node, got, last))
            elif rel == "concurrent":
                final_siblings += 1
    return anomalies, siblings, lost, divergent, final_siblings


def self_test():
    """The checker on hand-made histories: what it must flag and what it must allow."""
    h = History()
    # Writer 0 on key k: 1 (ok) <- 2 (ok) <- 4 (ok); 3 failed, issued after 2 (not in 4's past).
    for seq, dep, outcome in [(1, 0, "ok"), (2, 1, "ok"), (3, 2, "fail"), (4, 2, "ok")]:
        h.writes[("k", seq)] = {"deps": {"k": dep} if dep else {}, "outcome": outcome}

    def read(got, floor):
        return {"f": "read", "key": "k", "got": got, "floor": floor, "outcome": "ok"}

    h.ops = [read(4, 4), read(2, 1), read(1, 4), read(0, 2), read(3, 4), read(4, 0)]
    anomalies, siblings, lost, divergent, final_siblings = check(
        h, {"k": {1: 4, 2: 3, 3: 2, 4: None}})
    assert [(o["got"], o["floor"]) for o in anomalies] == [(1, 4), (0, 2)], anomalies
    assert siblings == 1, siblings                      # 3 is concurrent with 4
    assert sorted((n, g) for _, n, g, _ in lost) == [(3, 2), (4, None)], lost
    assert final_siblings == 1 and len(divergent) == 1, (final_siblings, divergent)
    log("checker self-test passed")


# ---------------------------------------------------------------------------------------
# The run


def members_of(addr):
    st, body = request(addr, "GET", "/kv-store/get_all_partition_ids", {})
    parts = {}
    for p in body["partition_id_list"]:
        st, m = request(addr, "GET", "/kv-store/get_partition_members", {"partition_id": p})
        parts[p] = [int(a.split(":")[0].rsplit(".", 1)[1]) for a in m["partition_members"]]
    return parts


def key_partitions(history):
    out = {}
    with history.lock:
        for op in history.ops:
            if op.get("partition") is not None and op["outcome"] == "ok":
                out[op["key"]] = op["partition"]
    return out


def converge_after_heal(history, parts, fault_start, limit):
    """Seconds until every replica of every partition serves the last write acknowledged
    during the fault (per partition), read with an empty token directly from the replica."""
    kp = key_partitions(history)
    targets = {}
    with history.lock:
        for op in history.ops:
            if op["f"] == "write" and op["outcome"] == "ok" and op["t1"] >= fault_start:
                p = kp.get(op["key"])
                if p is not None:
                    targets[p] = (op["key"], op["seq"])
    t0 = time.time()
    pending = [(p, r, key, seq) for p, (key, seq) in targets.items() for r in parts.get(p, [])]
    while pending and time.time() - t0 < limit:
        still = []
        for p, r, key, seq in pending:
            try:
                st, body = request(f"{Net.ip(r)}:{PORT}", "GET", f"/kv-store/{key}", {"causal_payload": ""},
                                   timeout=1)
                ok = st == 200 and int(body["value"].split(":")[1]) >= seq
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                ok = False
            if not ok:
                still.append((p, r, key, seq))
        pending = still
        if pending:
            time.sleep(0.02)
    return (time.time() - t0) if not pending else None


def final_reads(history, parts, keys):
    kp = key_partitions(history)
    final = {}
    for key in keys:
        p = kp.get(key)
        replicas = parts.get(p, []) if p is not None else []
        final[key] = {}
        for r in replicas:
            try:
                t = time.time()
                st, body = request(f"{Net.ip(r)}:{PORT}", "GET", f"/kv-store/{key}", {"causal_payload": ""})
                if os.environ.get("NEMESIS_DEBUG") and time.time() - t > 0.3:
                    log(f"  slow final read of {key} at node {r}: {time.time() - t:.2f} s: {st} {body}")
                final[key][r] = int(body["value"].split(":")[1]) if st == 200 else None
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                final[key][r] = None
    return final


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--keys-per-client", type=int, default=4)
    ap.add_argument("--fault-seconds", type=float, default=8)
    ap.add_argument("--heal-seconds", type=float, default=6)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "kvs"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--history", default=None, help="write every recorded operation to this JSON file")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--time-limit", type=float, default=900)
    ap.add_argument("--self-test", action="store_true", help="only check the checker on made-up histories")
    args = ap.parse_args()
    self_test()
    if args.self_test:
        return
    if os.geteuid() != 0:
        sys.exit("nemesis needs root (ip netns, iptables)")
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} does not exist: cargo build --release first (or --binary)")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    log(f"nemesis: seed {seed}, {args.nodes} nodes, K={args.k}, {args.clients} clients; binary {args.binary}")

    deadline = time.time() + args.time_limit
    tmp = tempfile.mkdtemp(prefix="kvs-nemesis-")
    spares = [args.nodes + 1, args.nodes + 2]
    net = Net(args.nodes + len(spares))
    nodes = Nodes(args.nodes, args.k, args.binary, tmp)
    stop = threading.Event()
    history = History()
    interrupted = []

    def on_signal(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    failed = True
    try:
        net.setup()
        for i in list(range(1, args.nodes + 1)) + spares:
            nodes.start(i)
        for i in list(range(1, args.nodes + 1)) + spares:
            nodes.wait_ready(i)
        parts = members_of(nodes.addr(1))
        log(f"partitions: {parts}")
        p0 = sorted(parts)[0]
        a, b = parts[p0][0], parts[p0][1 % len(parts[p0])]
        other = next(i for i in range(1, args.nodes + 1) if i not in parts[p0])
        everyone = range(1, net.n + 1)

        def isolate(x):
            for j in everyone:
                if j != x:
                    net.cut(x, j)

        adds = {}

        def add_in_background(target, via):
            def run():
                t = time.time()
                try:
                    adds[target] = request(nodes.addr(via), "PUT", "/kv-store/update_view?type=add",
                                           {"ip_port": nodes.addr(target)}, timeout=120) + (time.time() - t,)
                except (OSError, http.client.HTTPException) as e:
                    adds[target] = (None, {"transport": str(e)}, time.time() - t)
            th = threading.Thread(target=run, daemon=True)
            th.start()
            return th

        def finish_add(target, via, thread):
            thread.join(timeout=130)
            st, body, took = adds.get(target, (None, {"error": "no answer"}, 0))
            log(f"  add {target}: {st} {body} after {took:.1f} s")
            if st != 200:
                st, body = request(nodes.addr(via), "PUT", "/kv-store/update_view?type=add",
                                   {"ip_port": nodes.addr(target)}, timeout=120)
                log(f"  re-issued add {target}: {st} {body}")

        faults = [
            (f"isolate {a}", lambda: isolate(a), net.heal),
            (f"split partition {p0} ({a}|{b})", lambda: net.cut(a, b), net.heal),
            (f"one-way {other}>{a}", lambda: net.drop(other, a, inbound=False), net.heal),
            (f"kill -9 {b}", lambda: nodes.kill(b), lambda: (nodes.start(b), nodes.wait_ready(b))),
            (f"pause {a}", lambda: nodes.signal(a, signal.SIGSTOP), lambda: nodes.signal(a, signal.SIGCONT)),
            (f"isolate {other}", lambda: isolate(other), net.heal),
        ]
        rng.shuffle(faults)
        # Then view changes under load: one while a member is cut off (it completes once
        # the member is back, or is re-issued), one that moves a third of the keys.
        pending = {}
        faults.append((f"add {spares[0]} while isolate {other}",
                       lambda: (isolate(other), pending.update(t=add_in_background(spares[0], a))),
                       lambda: (net.heal(), finish_add(spares[0], a, pending["t"]))))
        faults.append((f"add {spares[1]} (keys move)",
                       lambda: pending.update(t=add_in_background(spares[1], b)),
                       lambda: finish_add(spares[1], b, pending["t"])))

        clients = [Client(c, args.nodes, args.keys_per_client, args.clients, history,
                          random.Random(rng.randrange(1 << 30)), stop) for c in range(args.clients)]
        history.phase = "baseline"
        for c in clients:
            c.start()
        time.sleep(args.heal_seconds)
        phases = [{"name": "baseline", "isolated": None, "t0": 0, "convergence_s": None}]
        for name, inject, heal in faults:
            if time.time() + args.fault_seconds + args.heal_seconds + 30 > deadline:
                log("time limit: skipping the remaining faults")
                break
            isolated = int(name.split()[-1]) if "isolate" in name else None
            history.phase = name
            t_fault = time.time()
            log(f"fault: {name}")
            inject()
            time.sleep(args.fault_seconds)
            heal()
            history.phase = f"healed after {name}"
            new_parts = members_of(nodes.addr(1))
            if new_parts != parts:
                log(f"  partitions now: {new_parts}")
            parts = new_parts
            conv = converge_after_heal(history, parts, t_fault, limit=30)
            log(f"  healed; replicas converged in {conv:.3f} s" if conv is not None
                else "  healed; replicas did NOT converge within 30 s")
            phases.append({"name": name, "isolated": isolated, "t0": t_fault, "convergence_s": conv})
            time.sleep(max(0.0, args.heal_seconds - (conv or 0)))
        stop.set()
        for c in clients:
            c.join(timeout=OP_TIMEOUT + 2)
        history.phase = "final"
        keys = [f"c{c}_k{j}" for c in range(args.clients) for j in range(args.keys_per_client)]
        # Replicas agree within moments of the last heal; give them up to 10 s.
        t_final = time.time()
        while True:
            final = final_reads(history, parts, keys)
            differ = [k for k, v in final.items() if len(set(v.values())) > 1]
            if not differ or time.time() - t_final > 10:
                break
            if os.environ.get("NEMESIS_DEBUG"):
                log(f"  still divergent: {[(k, final[k]) for k in differ[:3]]}")
            time.sleep(0.2)
        log(f"final reads of {len(keys)} keys: every replica agrees ({time.time() - t_final:.2f} s after "
            f"the workload stopped)" if not differ else "final reads: replicas still disagree after 10 s")
        t_check = time.time()
        anomalies, siblings, lost, divergent, final_siblings = check(history, final)
        log(f"history checked in {time.time() - t_check:.2f} s")

        # Figures per phase.
        log(f"\n{'phase':<34} {'ops':>6} {'ops/s':>6} {'ok':>6} {'fail':>6} {'unknown':>7} "
            f"{'minority ok/ops':>16} {'conv s':>7}")
        names = [ph["name"] for ph in phases]
        for ph in phases:
            for label in ([ph["name"], f"healed after {ph['name']}"] if ph["name"] != "baseline" else ["baseline"]):
                ops = [o for o in history.ops if o["phase"] == label]
                span = (max(o["t1"] for o in ops) - min(o["t0"] for o in ops)) if ops else 0
                rate = f"{len(ops) / span:.0f}" if span > 0 else ""
                ok = sum(o["outcome"] == "ok" for o in ops)
                fail = sum(o["outcome"] == "fail" for o in ops)
                unk = sum(o["outcome"] == "unknown" for o in ops)
                minority = ""
                if ph["isolated"] and label == ph["name"]:
                    mops = [o for o in ops if o["node"] == ph["isolated"]]
                    minority = f"{sum(o['outcome'] == 'ok' for o in mops)}/{len(mops)}"
                conv = f"{ph['convergence_s']:.3f}" if (label != ph["name"] or label == "baseline") and \
                    ph["convergence_s"] is not None else ""
                log(f"{label[:34]:<34} {len(ops):>6} {rate:>6} {ok:>6} {fail:>6} {unk:>7} {minority:>16} {conv:>7}")
        convs = [ph["convergence_s"] for ph in phases[1:] if ph["convergence_s"] is not None]
        not_converged = sum(ph["convergence_s"] is None for ph in phases[1:])
        log(f"\noperations: {len(history.ops)}; writes acknowledged: "
            f"{sum(1 for w in history.writes.values() if w['outcome'] == 'ok')}")
        log(f"lost acknowledged writes: {len(lost)}")
        log(f"causal anomalies: {len(anomalies)} (reads of concurrent unacknowledged siblings: {siblings})")
        log(f"replicas disagreeing at the end: {len(divergent)} keys (final concurrent siblings: {final_siblings})")
        if convs:
            log(f"convergence after heal: p50 {percentile(convs, 0.5):.3f} s, p99 {percentile(convs, 0.99):.3f} s, "
                f"max {max(convs):.3f} s over {len(convs)} heals; not converged: {not_converged}")
        for op in anomalies[:10]:
            log(f"  anomaly: {op}")
        for item in lost[:10]:
            log(f"  lost: key {item[0]} at node {item[1]}: final seq {item[2]}, last acknowledged {item[3]}")
        for item in divergent[:10]:
            log(f"  divergent: {item}")
        crashed = [c.error for c in clients if c.error]
        if crashed:
            log(f"workload clients that crashed: {crashed}")
        failed = bool(lost or anomalies or divergent or not_converged or crashed
                      or (convs and max(convs) > CONVERGENCE_BOUND))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"seed": seed, "phases": phases, "names": names, "lost": len(lost),
                           "anomalies": len(anomalies), "siblings": siblings, "divergent": len(divergent),
                           "convergence": convs, "ops": len(history.ops)}, f, indent=1)
        if args.history:
            with open(args.history, "w") as f:
                json.dump(history.ops, f)
        log("RESULT: " + ("FAIL" if failed else "PASS") + f" (seed {seed})")
    except KeyboardInterrupt:
        log(f"interrupted ({interrupted or 'Ctrl-C'})")
    finally:
        stop.set()
        nodes.stop_all()
        net.teardown()
        if failed or args.keep:
            log(f"node logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
