#!/usr/bin/env python3
"""Partition test of the seed-003 `/kvs` dialect: both sides stay available, causal
sessions read their own writes, an unmet causal context is refused, and after the heal
every replica converges (within 5 s) on one deterministic winner per key.

What it runs: four real `kvs` nodes, each in its own Linux network namespace
(`kvspart-<i>`, address 10.231.2.<i>, veth `kvspart<i>h`/`kvspart<i>n` on the bridge
`kvspart0`, host end 10.231.2.254), started the seed-003 way: `ADDRESS=<ip>:13800`,
`VIEW=<all four>`, `REPL_FACTOR=2` (plus `CLUSTER_SECRET` and a `DATA_DIR` in a temp
dir). Node 4 also has a second address, 10.231.3.4, on a second bridge `kvspartb`
(host end 10.231.3.254). The clients run in the host namespace. Traffic goes only to
those namespaces' addresses.

Steps (every request bounded by a timeout, the whole run by --time-limit):

 1. Layout: every node answers `GET /kvs/shards` and `/kvs/shards/<id>` identically:
    2 shards of 2 replicas, consecutive in VIEW order (nodes 1,2 = shard "1", nodes
    3,4 = shard "2"); every node is ready (`/api/v1/status`) and sees every peer alive.
 2. Load: --keys keys through random nodes, one causal session passing its
    `causal-context` along; every PUT answers 201. Which shard holds each key comes
    from the replies (`"address"` names the replica when the node passed the request
    on) and is checked against the shards' key counts; then every replica must serve
    every key (the pre-partition baseline).
 3. Partition: iptables DROP (INPUT and OUTPUT, in every namespace) between side A
    {1,3} and side B {2,4}: each side holds one replica of each shard. After --grace
    seconds (the failure detector settles: a write forwarded to the far replica in the
    first second of a partition may answer 503 after the 3 s forward timeout, since
    writes are not retried on another replica; see README "Guarantees and limits"), two
    causal sessions per side, each talking only to its side's nodes, run a planned
    workload (deterministic for --seed):
      - conflict keys: both sides write different values concurrently; then, after a
        barrier, the side the seed picks writes (or deletes) once more, later in wall
        time, so its version carries the larger timestamp and must be the one winner
        (the store's rule: latest timestamp, then replica id);
      - keys deleted on one side only (must stay 404 everywhere after the heal), keys
        updated on one side only, keys created on one side, new keys created on both;
      - then each session keeps writing the keys only it touches (each write read back)
        until --partition-seconds after the cut, while Bob and Carol (below) run;
      - every request must succeed with exactly the status the side's own history
        implies (PUT 201/200, DELETE 200, GET 200 with the value or 404): both sides
        stay available. Each write is read back (read-your-writes) through a random
        node of the side, untouched keys must still read their loaded value, and each
        session re-reads all its keys at the end. A write answered 503 (outcome
        unknown) is a failure; its key is then only required to end up the same on
        every replica.
    Then Bob/Carol: Bob (a fresh session) writes a key on side A (node 1) and hands his
    causal-context to Carol, who reads the key on side B (nodes 2 and 4) where the
    write cannot have arrived: she must get 400 `{"error":"Unable to satisfy
    request","message":"Error in GET"}` (never an older value), within 1 s + --grace
    (the node waits up to 1 s for its peers to catch it up, then asks the other
    replicas). Done for a loaded key and a new key in each shard.
 4. Heal (flush the namespaces' rules) and measure convergence: the time until every
    replica of each key's shard, asked directly with an empty context `{}` (a replica
    of the key's shard serves it itself; an answer carrying `"address"` was served by
    someone else and does not count), serves the expected final state of every key:
    the planned winner of each conflict, 404 for deleted keys, the last write
    otherwise. Bound: 5 s. Then a full pass through every node, the key counts of
    every shard on every node, and Carol's read with Bob's context (now 200, Bob's
    value).
 5. Multi-homing: a client that reaches node 4 through 10.231.3.4:13800 (node 4 listens
    on every interface, its ADDRESS not being a loopback address) writes, reads,
    deletes and counts keys and gets the same answers as through 10.231.2.x.

Exit code 0 when everything held, 1 with the failures listed otherwise (130 when
interrupted); a summary with the figures (convergence ms, requests during the
partition, winners checked, Carol's answer times) is printed either way. The
namespaces, bridges, iptables rules and nodes are removed on exit, error, Ctrl-C or
SIGTERM, and leftovers of an aborted run are removed at start (nodes still running in
`kvspart-<i>` namespaces, which only this script creates, are killed by pid). Node
logs stay in the temp dir when the run fails (or with --keep).

Needs root (ip netns, iptables) and the release binary:

  cargo build --release
  sudo python3 nemesis/partition_kvs.py [--seed S] [--grace 2] [--keys 200]
       [--partition-seconds 6] [--binary target/release/kvs] [--time-limit 300] [--keep]

A run takes about 12 s (seeds 1-8 each pass with --grace 2; with --grace 0 the known
limitation above shows as a few 503s after 3 s).

It does not import nemesis/nemesis.py and uses other names (10.231.2.0/24, 10.231.3.0/24,
`kvspart*`), so both can run at once.
"""
import argparse
import concurrent.futures
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

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
N = 4
REPL = 2
SUBNET = "10.231.2"
SUBNET_B = "10.231.3"
BRIDGE = "kvspart0"
BRIDGE_B = "kvspartb"
HOST_IP = f"{SUBNET}.254"
HOST_IP_B = f"{SUBNET_B}.254"
MULTI_HOMED = 4
PORT = 13800
SECRET = "kvs-partition-test"
OP_TIMEOUT = 8.0          # above the dialect's 5 s deadline for "no replica reachable"
CONVERGENCE_BOUND = 5.0   # seconds, after the heal
CATCHUP_WAIT = 1.0        # how long a replica waits for its peers before refusing a context
UNSATISFIABLE = {"error": "Unable to satisfy request", "message": "Error in GET"}
SIDE_A = (1, 3)           # one replica of each shard per side
SIDE_B = (2, 4)


def log(msg):
    print(msg, flush=True)


def sh(*args, check=True):
    r = subprocess.run(args, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


class Failed(Exception):
    """A check that makes the run fail at once (later steps would mean nothing)."""


# ---------------------------------------------------------------------------------------
# The network


def ns(i):
    return f"kvspart-{i}"


def ip(i):
    return f"{SUBNET}.{i}"


def addr(i):
    return f"{ip(i)}:{PORT}"


class Net:
    forward_rules = [["FORWARD", "-i", b, "-o", b, "-j", "ACCEPT"] for b in (BRIDGE, BRIDGE_B)]

    def __init__(self):
        self.cut_now = False

    def setup(self):
        self.teardown(quiet=True)  # leftovers of an aborted run
        for bridge, host_ip in ((BRIDGE, HOST_IP), (BRIDGE_B, HOST_IP_B)):
            sh("ip", "link", "add", bridge, "type", "bridge")
            sh("ip", "addr", "add", f"{host_ip}/24", "dev", bridge)
            sh("ip", "link", "set", bridge, "up")
        # Docker sets the FORWARD policy to DROP; frames between our namespaces cross it.
        for rule in self.forward_rules:
            sh("iptables", "-I", *rule)
        for i in range(1, N + 1):
            self._veth(i, f"kvspart{i}h", f"kvspart{i}n", BRIDGE, f"{ip(i)}/24", new_ns=True)
        self._veth(MULTI_HOMED, f"kvspartb{MULTI_HOMED}h", f"kvspartb{MULTI_HOMED}n", BRIDGE_B,
                   f"{SUBNET_B}.{MULTI_HOMED}/24", new_ns=False)

    @staticmethod
    def _veth(i, host_end, ns_end, bridge, cidr, new_ns):
        if new_ns:
            sh("ip", "netns", "add", ns(i))
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        sh("ip", "link", "set", host_end, "master", bridge)
        sh("ip", "link", "set", host_end, "up")
        sh("ip", "link", "set", ns_end, "netns", ns(i))
        sh("ip", "netns", "exec", ns(i), "ip", "addr", "add", cidr, "dev", ns_end)
        sh("ip", "netns", "exec", ns(i), "ip", "link", "set", ns_end, "up")
        if new_ns:
            sh("ip", "netns", "exec", ns(i), "ip", "link", "set", "lo", "up")

    def teardown(self, quiet=False):
        for i in range(1, N + 1):
            # Processes still in our namespaces are nodes an aborted run of this script
            # started: end them by pid, or they would outlive their namespace.
            pids = sh("ip", "netns", "pids", ns(i), check=False).split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            sh("ip", "link", "del", f"kvspart{i}h", check=False)
            sh("ip", "netns", "del", ns(i), check=False)
        sh("ip", "link", "del", f"kvspartb{MULTI_HOMED}h", check=False)
        for bridge in (BRIDGE, BRIDGE_B):
            sh("ip", "link", "del", bridge, check=False)
        for rule in self.forward_rules:
            while subprocess.run(["iptables", "-D", *rule], capture_output=True).returncode == 0:
                pass
        if not quiet:
            log("network torn down")

    def cut(self, side_a, side_b):
        """Drops every packet between the two sides, in both directions, in every namespace."""
        def far(i):
            out = [ip(i)]
            if i == MULTI_HOMED:
                out.append(f"{SUBNET_B}.{MULTI_HOMED}")
            return out
        for mine, theirs in ((side_a, side_b), (side_b, side_a)):
            for i in mine:
                for j in theirs:
                    for a in far(j):
                        sh("ip", "netns", "exec", ns(i), "iptables", "-A", "OUTPUT", "-d", a, "-j", "DROP")
                        sh("ip", "netns", "exec", ns(i), "iptables", "-A", "INPUT", "-s", a, "-j", "DROP")
        self.cut_now = True

    def heal(self):
        for i in range(1, N + 1):
            sh("ip", "netns", "exec", ns(i), "iptables", "-F")
        self.cut_now = False


# ---------------------------------------------------------------------------------------
# Nodes


class Nodes:
    def __init__(self, binary, tmp):
        self.binary, self.tmp = binary, tmp
        self.procs = {}

    def start(self, i):
        env = {k: v for k, v in os.environ.items()
               if k not in ("K", "IPPORT", "SOCKET_ADDRESS", "SHARD_COUNT", "LISTEN", "ADMIN_TOKEN",
                            "KVS_REBUILD", "VIEW", "ADDRESS", "REPL_FACTOR", "DATA_DIR")}
        env.update(ADDRESS=addr(i), VIEW=",".join(addr(j) for j in range(1, N + 1)),
                   REPL_FACTOR=str(REPL), CLUSTER_SECRET=SECRET,
                   DATA_DIR=os.path.join(self.tmp, f"node{i}"),
                   RUST_LOG=os.environ.get("RUST_LOG", "info"))
        out = open(os.path.join(self.tmp, f"node{i}.log"), "ab")
        self.procs[i] = subprocess.Popen(["ip", "netns", "exec", ns(i), self.binary], env=env,
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()

    def check_alive(self):
        for i, p in self.procs.items():
            if p.poll() is not None:
                raise Failed(f"node {i} exited with {p.returncode}: see {self.tmp}/node{i}.log")

    def stop_all(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---------------------------------------------------------------------------------------
# HTTP


class Reply:
    def __init__(self, status, body, elapsed, raw=b""):
        self.status, self.body, self.elapsed, self.raw = status, body, elapsed, raw

    def __repr__(self):
        return f"{self.status} {json.dumps(self.body)[:300]} ({self.elapsed * 1000:.0f} ms)"


def allowed(host):
    return host.startswith(f"{SUBNET}.") or host.startswith(f"{SUBNET_B}.") or host.startswith("127.")


def call(target, method, path, body=None, timeout=OP_TIMEOUT):
    """One request on a fresh connection (so a request never rides a connection the
    server may have closed: a failed write is never ambiguous because of the client).
    Returns a Reply; status None for a transport error."""
    host, port = target.rsplit(":", 1)
    if not allowed(host):
        raise AssertionError(f"refusing to send to {target}: not ours")
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    t0 = time.monotonic()
    try:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        c.request(method, path, data, headers)
        r = c.getresponse()
        raw = r.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = {"raw": raw[:200].decode(errors="replace")}
        return Reply(r.status, parsed if isinstance(parsed, dict) else {"raw": parsed},
                     time.monotonic() - t0, raw)
    except (OSError, http.client.HTTPException) as e:
        return Reply(None, {"transport": f"{type(e).__name__}: {e}"}, time.monotonic() - t0)
    finally:
        c.close()


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.by_status = {}
        self.max_latency = 0.0
        self.failures = []

    def count(self, rep):
        with self.lock:
            self.requests += 1
            self.by_status[rep.status] = self.by_status.get(rep.status, 0) + 1
            self.max_latency = max(self.max_latency, rep.elapsed)

    def fail(self, msg):
        with self.lock:
            self.failures.append(msg)
        log(f"  FAIL: {msg}")


class Session:
    """One causal client session: sends its latest causal-context with every request."""

    def __init__(self, name, ctx=None):
        self.name = name
        self.ctx = dict(ctx or {})

    def key(self, method, node, key, value=None, stats=None, target=None):
        body = {"causal-context": self.ctx}
        if value is not None:
            body["value"] = value
        rep = call(target or addr(node), method, f"/kvs/keys/{key}", body)
        if rep.status is not None and isinstance(rep.body.get("causal-context"), dict):
            self.ctx = rep.body["causal-context"]
        if stats:
            stats.count(rep)
        return rep


describe = repr


# ---------------------------------------------------------------------------------------
# Layout


def layout_of(i):
    """(shard ids, {shard id: replicas}) as node i answers, or None."""
    rep = call(addr(i), "GET", "/kvs/shards", timeout=2)
    if rep.status != 200 or not isinstance(rep.body.get("shards"), list):
        return None
    out = {}
    for sid in rep.body["shards"]:
        r = call(addr(i), "GET", f"/kvs/shards/{sid}", timeout=4)
        if r.status != 200 or str(r.body.get("shard-id")) != str(sid):
            return None
        out[str(sid)] = list(r.body.get("replicas", []))
    return out


def wait_ready(nodes, limit=40):
    """Until every node is ready, sees every peer alive, and answers the same layout."""
    deadline = time.time() + limit
    last = None
    while time.time() < deadline:
        nodes.check_alive()
        views, ok = [], True
        for i in range(1, N + 1):
            st = call(addr(i), "GET", "/api/v1/status", timeout=2)
            peers = st.body.get("peers") or []
            if st.status != 200 or not st.body.get("ready") or \
                    any(isinstance(p, dict) and p.get("health", p.get("state", "alive")) != "alive" for p in peers):
                ok, last = False, f"node {i} status: {describe(st)}"
                break
            kc = call(addr(i), "GET", "/kvs/key-count", timeout=4)
            if kc.status != 200:
                ok, last = False, f"node {i} key-count: {describe(kc)}"
                break
            views.append(layout_of(i))
        if ok and views[0] is not None and all(v == views[0] for v in views):
            return views[0]
        if ok:
            last = f"layouts differ or missing: {views}"
        time.sleep(0.2)
    raise Failed(f"cluster not ready within {limit} s: {last}")


# ---------------------------------------------------------------------------------------
# The plan of the partition workload


class Plan:
    """Deterministic for a seed. Per side, per session, phase-1 and phase-2 op lists
    [(key, op, value)] (op "PUT"/"DELETE"); `final` maps every key to its expected state
    after the heal (a value, or None for absent)."""

    def __init__(self, rng, keys, load_values):
        self.final = dict(load_values)
        self.kinds = {}
        self.ops = {(side, s): {1: [], 2: []} for side in "AB" for s in (0, 1)}
        self.late = {}          # conflict key -> (late side, last op)
        pool = list(keys)
        rng.shuffle(pool)
        n = len(pool)
        n_conf, n_del, n_upd = max(4, n // 10), max(2, n // 10), max(4, n // 5)
        conflict, pool = pool[:n_conf], pool[n_conf:]
        deleted, pool = pool[:n_del], pool[n_del:]
        updated, pool = pool[:n_upd], pool[n_upd:]
        self.untouched = pool  # Bob takes two of them later
        new_one = [f"new{side.lower()}{j:02d}" for side in "AB" for j in range(max(2, n // 20))]
        new_both = [f"newboth{j:02d}" for j in range(max(2, n // 50))]
        counter = [0]

        def val(side, s, key):
            counter[0] += 1
            return f"{side}{s}-{key}-{counter[0]}"

        def owner(side):
            return (side, rng.randrange(2))

        for key in conflict + new_both:
            late = rng.choice("AB")
            early = "B" if late == "A" else "A"
            seqs = {}
            for side in "AB":
                who = owner(side)
                seq = [(key, "PUT", val(side, who[1], key)) for _ in range(rng.randint(1, 3))]
                if side == early and rng.random() < 0.25:
                    seq.append((key, "DELETE", None))
                self.ops[who][1].append(seq)
                seqs[side] = who
            who = seqs[late]
            if rng.random() < 0.25:
                last = (key, "DELETE", None)
            else:
                last = (key, "PUT", val(late, who[1], key))
            self.ops[who][2].append([last])
            self.final[key] = last[2]
            self.late[key] = (late, last[1])
            self.kinds[key] = "conflict" if key in conflict else "conflict-new"
        for key in deleted:
            side = rng.choice("AB")
            who = owner(side)
            seq = [(key, "PUT", val(side, who[1], key))] if rng.random() < 0.3 else []
            seq.append((key, "DELETE", None))
            self.ops[who][1].append(seq)
            self.final[key] = None
            self.kinds[key] = "deleted"
        for key in updated:
            side = rng.choice("AB")
            who = owner(side)
            seq = [(key, "PUT", val(side, who[1], key)) for _ in range(rng.randint(1, 3))]
            self.ops[who][1].append(seq)
            self.final[key] = seq[-1][2]
            self.kinds[key] = "updated"
        for key in new_one:
            side = key[3].upper()
            who = owner(side)
            seq = [(key, "PUT", val(side, who[1], key)) for _ in range(rng.randint(1, 2))]
            self.ops[who][1].append(seq)
            self.final[key] = seq[-1][2]
            self.kinds[key] = "new"
        for key in self.untouched:
            self.kinds[key] = "untouched"
        # Interleave each session's per-key sequences at random, keeping each key's order.
        for who, phases in self.ops.items():
            for ph in (1, 2):
                seqs = [list(s) for s in phases[ph]]
                flat = []
                while seqs:
                    s = rng.choice(seqs)
                    flat.append(s.pop(0))
                    if not s:
                        seqs.remove(s)
                phases[ph] = flat


# ---------------------------------------------------------------------------------------
# The partition workload


class SideState:
    """What one side of the partition holds: only its own writes since the cut."""

    def __init__(self, initial):
        self.state = dict(initial)
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            return self.state.get(key)

    def set(self, key, value):
        with self.lock:
            self.state[key] = value


# The side's state of a key after a write whose outcome is unknown (a 503 or a transport
# error: it may or may not have been applied). Already a failure; the key is then left
# out of the exact checks (after the heal its replicas must still agree).
UNKNOWN = "<unknown>"


def expect_read(stats, who, rep, key, want, node, why):
    if want is UNKNOWN:
        return True
    if want is None:
        good = rep.status == 404 and rep.body.get("doesExist") is False
    else:
        good = rep.status == 200 and rep.body.get("value") == want
    if not good:
        stats.fail(f"{who} {why}: GET {key} at node {node}: expected "
                   f"{'404' if want is None else repr(want)}, got {describe(rep)}")
    return good


def write(session, op, key, value, node, state, stats, where, uncertain):
    """One PUT or DELETE; its status must be exactly what the side's history implies
    (PUT: 201 if the key is absent on this side, else 200; DELETE: 200). Returns whether
    the write certainly took effect."""
    before = state.get(key)
    rep = session.key(op, node, key, value, stats)
    if op == "PUT":
        want = {201, 200} if before is UNKNOWN else {201} if before is None else {200}
        good = rep.status in want and rep.body.get("replaced") is (rep.status == 200)
    else:
        want = {200, 404} if before is UNKNOWN else {200} if before is not None else {404}
        good = rep.status in want
    if not good:
        stats.fail(f"session {session.name}: {op} {key} at node {node}: expected "
                   f"{'/'.join(map(str, sorted(want)))}, got {describe(rep)}")
    if rep.status not in (200, 201, 404):
        state.set(key, UNKNOWN)
        uncertain.add(key)
        return False
    state.set(key, value if op == "PUT" else None)
    if op == "PUT":
        where(key, rep, node)
    return True


def run_session(session, side, nodes_of_side, ops, state, untouched, load_values, stats, rng, stop, where,
                uncertain):
    for key, op, value in ops:
        if stop.is_set():
            return
        node = rng.choice(nodes_of_side)
        if not write(session, op, key, value, node, state, stats, where, uncertain):
            continue
        if rng.random() < 0.5:
            n2 = rng.choice(nodes_of_side)
            expect_read(stats, f"session {session.name}", session.key("GET", n2, key, stats=stats),
                        key, state.get(key), n2, "read-your-writes")
        if untouched and rng.random() < 0.2:
            k2 = rng.choice(untouched)
            n2 = rng.choice(nodes_of_side)
            expect_read(stats, f"session {session.name}", session.key("GET", n2, k2, stats=stats),
                        k2, load_values[k2], n2, "untouched key")


def steady(session, nodes_of_side, owned, state, untouched, load_values, stats, rng, until, cap, where,
           uncertain):
    """Keeps writing (and reading back) the keys only this session touches, until `until`
    (monotonic) or `cap` writes."""
    n = 0
    while owned and time.monotonic() < until and n < cap:
        n += 1
        key = rng.choice(owned)
        value = f"{session.name}-{key}-s{n}"
        node = rng.choice(nodes_of_side)
        if write(session, "PUT", key, value, node, state, stats, where, uncertain):
            n2 = rng.choice(nodes_of_side)
            expect_read(stats, f"session {session.name}", session.key("GET", n2, key, stats=stats),
                        key, value, n2, "read-your-writes")
        if untouched and rng.random() < 0.3:
            k2 = rng.choice(untouched)
            n2 = rng.choice(nodes_of_side)
            expect_read(stats, f"session {session.name}", session.key("GET", n2, k2, stats=stats),
                        k2, load_values[k2], n2, "untouched key")
        time.sleep(0.002)
    return n


def reread_all(session, nodes_of_side, keys, state, stats, rng):
    for key in sorted(set(keys)):
        node = rng.choice(nodes_of_side)
        expect_read(stats, f"session {session.name}", session.key("GET", node, key, stats=stats),
                    key, state.get(key), node, "final re-read")


def in_threads(jobs, limit):
    threads = [threading.Thread(target=j, daemon=True) for j in jobs]
    for t in threads:
        t.start()
    deadline = time.time() + limit
    for t in threads:
        t.join(timeout=max(0.1, deadline - time.time()))
    if any(t.is_alive() for t in threads):
        raise Failed(f"workload threads still running after {limit} s")


# ---------------------------------------------------------------------------------------
# Convergence


def served_locally(rep):
    return "address" not in rep.body


def matches(rep, want):
    if want is None:
        return rep.status == 404
    return rep.status == 200 and rep.body.get("value") == want


def converge(expected, replicas_of_key, limit, pool):
    """Polls every (key, replica) with an empty context until each replica serves the
    expected state itself. Returns (seconds or None, [(key, node, last reply)] left)."""
    t0 = time.monotonic()
    pending = [(k, r) for k in sorted(expected) for r in replicas_of_key[k]]
    last = {}
    requests = 0
    while pending and time.monotonic() - t0 < limit:
        futures = {pool.submit(call, addr(r), "GET", f"/kvs/keys/{k}", {"causal-context": {}}, 2.0): (k, r)
                   for k, r in pending}
        still = []
        for f, (k, r) in futures.items():
            rep = f.result()
            requests += 1
            last[(k, r)] = rep
            if not (served_locally(rep) and matches(rep, expected[k])):
                still.append((k, r))
        pending = still
        if pending:
            time.sleep(0.01)
    took = time.monotonic() - t0
    return (None if pending else took), [(k, r, last.get((k, r))) for k, r in pending], requests


# ---------------------------------------------------------------------------------------
# The run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--grace", type=float, default=2.0,
                    help="seconds after the cut before the availability checks (failure detector "
                         "settling), and Carol's allowance beyond the 1 s catch-up wait")
    ap.add_argument("--keys", type=int, default=200)
    ap.add_argument("--partition-seconds", type=float, default=6.0,
                    help="how long the partition lasts (from the cut; the sessions keep writing until then)")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "kvs"))
    ap.add_argument("--time-limit", type=float, default=300)
    ap.add_argument("--keep", action="store_true", help="keep the node logs even on success")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("partition_kvs.py needs root (ip netns, iptables)")
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} does not exist: cargo build --release first (or --binary)")
    if args.keys < 20 or args.keys > 5000:
        sys.exit("--keys must be between 20 and 5000")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    t_start = time.monotonic()
    log(f"partition_kvs: seed {seed}, {args.keys} keys, grace {args.grace} s; binary {args.binary}")

    tmp = tempfile.mkdtemp(prefix="kvs-partition-")
    net = Net()
    nodes = Nodes(args.binary, tmp)
    stop = threading.Event()
    failures = []
    summary = {}

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def on_alarm(signum, frame):
        raise Failed(f"time limit of {args.time_limit:.0f} s reached")

    # SIGINT too: a shell starts background jobs with it ignored, and Ctrl-C must tear down.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.time_limit))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    interrupted = False
    try:
        # 1. Nodes and layout.
        net.setup()
        for i in range(1, N + 1):
            nodes.start(i)
        t = time.monotonic()
        layout = wait_ready(nodes)
        log(f"ready in {time.monotonic() - t:.1f} s; shards: {layout}")
        want = {"1": [addr(1), addr(2)], "2": [addr(3), addr(4)]}
        if layout != want:
            raise Failed(f"layout {layout}, expected {want} (REPL_FACTOR=2: consecutive in VIEW order)")
        shard_of_node = {i: sid for sid, reps in layout.items() for i in range(1, N + 1) if addr(i) in reps}
        node_of_addr = {addr(i): i for i in range(1, N + 1)}
        replicas_of_shard = {sid: [node_of_addr[a] for a in reps] for sid, reps in layout.items()}
        for sid, reps in replicas_of_shard.items():
            if len(set(reps) & set(SIDE_A)) != 1 or len(set(reps) & set(SIDE_B)) != 1:
                raise Failed(f"sides {SIDE_A}/{SIDE_B} do not hold one replica of shard {sid} each")

        # 2. Load.
        stats_load = Stats()
        loader = Session("loader")
        keys = [f"key{i:04d}" for i in range(args.keys)]
        load_values = {}
        shard_of_key = {}

        def shard_from(rep, node):
            a = rep.body.get("address")
            return shard_of_node[node_of_addr[a]] if a in node_of_addr else shard_of_node[node]

        shard_lock = threading.Lock()

        def record_shard(key, rep, node):
            """The shard a write's reply says holds `key`; every reply must say the same."""
            if "address" in rep.body and rep.body["address"] not in node_of_addr:
                stats.fail(f"{key}: reply names {rep.body['address']!r}, no member")
                return
            sid = shard_from(rep, node)
            with shard_lock:
                if shard_of_key.setdefault(key, sid) != sid:
                    stats.fail(f"{key}: one reply put it in shard {shard_of_key[key]}, another in {sid}")

        t = time.monotonic()
        for j, key in enumerate(keys):
            node = rng.randint(1, N)
            value = f"load-{key}-{seed}"
            rep = loader.key("PUT", node, key, value, stats_load)
            if rep.status != 201 or rep.body.get("message") != "Added successfully":
                raise Failed(f"load: PUT {key} at node {node}: expected 201, got {describe(rep)}")
            if "address" in rep.body and rep.body["address"] not in node_of_addr:
                raise Failed(f"load: PUT {key}: address {rep.body['address']!r} is no member")
            load_values[key] = value
            shard_of_key[key] = shard_from(rep, node)
            if j % 5 == 0:  # read back through another node, with the context
                n2 = rng.randint(1, N)
                r2 = loader.key("GET", n2, key, stats=stats_load)
                if not matches(r2, value):
                    raise Failed(f"load: GET {key} at node {n2} after writing it: {describe(r2)}")
        load_s = time.monotonic() - t
        per_shard = {sid: sum(1 for k in keys if shard_of_key[k] == sid) for sid in layout}
        log(f"loaded {len(keys)} keys in {load_s:.2f} s ({stats_load.requests} requests); per shard {per_shard}")
        replicas_of_key = {k: replicas_of_shard[shard_of_key[k]] for k in keys}
        took, left, _ = converge(load_values, replicas_of_key, 10, pool)
        if took is None:
            raise Failed(f"before the partition, replicas did not all serve the loaded keys within 10 s: {left[:5]}")
        log(f"baseline: every replica serves every loaded key ({took * 1000:.0f} ms after the load)")
        for i in range(1, N + 1):
            for sid in layout:
                r = call(addr(i), "GET", f"/kvs/shards/{sid}")
                if r.status != 200 or r.body.get("key-count") != per_shard[sid]:
                    raise Failed(f"shard {sid} key-count at node {i}: {describe(r)}; the replies put "
                                 f"{per_shard[sid]} keys there")

        # 3. Partition.
        plan = Plan(random.Random(rng.randrange(1 << 30)), keys, load_values)
        bob_keys = {}
        for sid in sorted(layout):
            for k in plan.untouched:
                if shard_of_key[k] == sid and k not in bob_keys.values():
                    bob_keys[f"loaded key, shard {sid}"] = k
                    break
        untouched = [k for k in plan.untouched if k not in bob_keys.values()]
        sides = {"A": SIDE_A, "B": SIDE_B}
        states = {s: SideState(load_values) for s in "AB"}
        sessions = {(s, j): Session(f"{s}{j}", loader.ctx) for s in "AB" for j in (0, 1)}
        srngs = {who: random.Random(rng.randrange(1 << 30)) for who in sessions}
        stats = Stats()
        uncertain = set()  # keys with a write of unknown outcome (each one already a failure)
        log(f"cutting {{{','.join(map(str, SIDE_A))}}} from {{{','.join(map(str, SIDE_B))}}}; "
            f"workload after {args.grace} s")
        net.cut(SIDE_A, SIDE_B)
        t_cut = time.monotonic()
        time.sleep(args.grace)
        nodes.check_alive()

        def job(who, phase):
            side = who[0]
            return lambda: run_session(sessions[who], side, sides[side], plan.ops[who][phase], states[side],
                                       untouched, load_values, stats, srngs[who], stop, record_shard,
                                       uncertain)

        t = time.monotonic()
        in_threads([job(who, 1) for who in sessions], 120)
        # The barrier: every phase-1 write has been answered; the late ones come after it.
        time.sleep(0.02)
        t_barrier = time.monotonic()
        in_threads([job(who, 2) for who in sessions], 60)
        t_phase2_done = time.monotonic()
        log(f"  planned writes done: {stats.requests} requests in {t_phase2_done - t:.2f} s "
            f"(the late writes began {t_barrier - t:.2f} s in); sessions keep writing their own keys "
            f"until {args.partition_seconds:.0f} s after the cut while Bob and Carol run")
        # Then the sessions keep writing the keys only they touch, while Bob and Carol run.
        owned = {who: sorted({k for k, _, _ in plan.ops[who][1] if plan.kinds[k] in ("updated", "new")})
                 for who in sessions}
        steady_writes = {}
        until = t_cut + max(args.partition_seconds, args.grace + 1)

        def steady_job(who):
            def run():
                steady_writes[who] = steady(sessions[who], sides[who[0]], owned[who], states[who[0]], untouched,
                                            load_values, stats, srngs[who], until, 3000, record_shard,
                                            uncertain)
            return run

        steady_threads = [threading.Thread(target=steady_job(who), daemon=True) for who in sessions]
        for th in steady_threads:
            th.start()

        # Bob and Carol.
        carol = []
        bob_final = {}
        bob_sessions = {}
        for label, key in list(bob_keys.items()):
            bob_sessions[label] = (key, Session(f"bob:{label}"))
        for j in range(8):  # new keys until one has landed in each shard
            if {sid for label, (k, _) in bob_sessions.items() if label.startswith("new")
                    for sid in [shard_of_key.get(k)]} >= set(layout):
                break
            key = f"bobnew{j}"
            bob_sessions[f"new key {key}"] = (key, Session(f"bob:{key}"))
            bob = bob_sessions[f"new key {key}"][1]
            rep = bob.key("PUT", SIDE_A[0], key, f"bob-{key}", stats)
            if rep.status != 201:
                stats.fail(f"Bob: PUT {key} at node {SIDE_A[0]}: expected 201, got {describe(rep)}")
                uncertain.add(key)
                del bob_sessions[f"new key {key}"]
                continue
            record_shard(key, rep, SIDE_A[0])
            bob_final[key] = f"bob-{key}"
            bob_sessions[f"new key {key}, shard {shard_of_key[key]}"] = bob_sessions.pop(f"new key {key}")
        for label, (key, bob) in bob_sessions.items():
            if key in bob_final:
                continue
            rep = bob.key("PUT", SIDE_A[0], key, f"bob-{key}", stats)
            if rep.status != 200:
                stats.fail(f"Bob: PUT {key} at node {SIDE_A[0]}: expected 200, got {describe(rep)}")
                uncertain.add(key)
                continue
            bob_final[key] = f"bob-{key}"
        carol_bound = CATCHUP_WAIT + args.grace
        carol_lock = threading.Lock()

        def carol_reads(label, key, ctx, node):
            rep = call(addr(node), "GET", f"/kvs/keys/{key}", {"causal-context": ctx})
            stats.count(rep)
            with carol_lock:
                carol.append((label, key, node, rep))

        jobs = [(lambda lb=label, k=key, c=dict(bob.ctx), n=n: carol_reads(lb, k, c, n))
                for label, (key, bob) in bob_sessions.items() if key in bob_final for n in SIDE_B]
        in_threads(jobs, OP_TIMEOUT + 5)
        for label, key, node, rep in sorted(carol, key=lambda c: (c[0], c[2])):
            fields = {k: rep.body.get(k) for k in UNSATISFIABLE}
            ok = rep.status == 400 and fields == UNSATISFIABLE
            extra = sorted(set(rep.body) - set(UNSATISFIABLE))
            log(f"  Carol ({label}: {key}) at node {node}: {rep.status} {json.dumps(rep.body)[:120]} "
                f"in {rep.elapsed * 1000:.0f} ms" + (f" (extra fields {extra})" if extra else ""))
            if not ok:
                stats.fail(f"Carol: GET {key} at node {node} with Bob's context: expected 400 "
                           f"{json.dumps(UNSATISFIABLE)}, got {describe(rep)}")
            elif rep.elapsed > carol_bound:
                stats.fail(f"Carol: GET {key} at node {node}: the 400 took {rep.elapsed:.2f} s, "
                           f"over {carol_bound:.1f} s")
        for th in steady_threads:
            th.join(timeout=max(1.0, until - time.monotonic() + OP_TIMEOUT + 5))
        if any(th.is_alive() for th in steady_threads):
            raise Failed("steady writers still running after the partition time")
        for who in sessions:
            for k in owned[who]:
                plan.final[k] = states[who[0]].get(k)
        in_threads([(lambda who=who: reread_all(
            sessions[who], sides[who[0]],
            [k for ph in (1, 2) for k, _, _ in plan.ops[who][ph]], states[who[0]], stats, srngs[who]))
            for who in sessions], 60)
        partition_s = time.monotonic() - t_cut
        log(f"partition workload: {stats.requests} requests in {partition_s - args.grace:.2f} s after the grace "
            f"({sum(steady_writes.values())} steady writes), statuses {dict(sorted(stats.by_status.items(), key=str))}, "
            f"max latency {stats.max_latency * 1000:.0f} ms, failures {len(stats.failures)}")
        nodes.check_alive()
        summary["partition"] = {"requests": stats.requests, "seconds": round(partition_s, 2),
                                "statuses": {str(k): v for k, v in stats.by_status.items()},
                                "max_latency_ms": round(stats.max_latency * 1000),
                                "carol_ms": [round(c[3].elapsed * 1000) for c in carol]}
        failures += stats.failures

        # 4. Heal and converge.
        expected = dict(plan.final)
        expected.update(bob_final)
        for k in uncertain:
            expected.pop(k, None)
        missing = [k for k in expected if k not in shard_of_key]
        if missing:
            raise Failed(f"no write reply told the shard of {missing[:5]}")
        if uncertain:
            log(f"  {len(uncertain)} keys had a write of unknown outcome: after the heal their replicas "
                f"must agree, on either outcome")
        log("healing")
        net.heal()
        t_heal = time.monotonic()
        conv_limit = 15.0
        replicas_of_key = {k: replicas_of_shard[shard_of_key[k]] for k in expected}
        took_rest, left, conv_requests = converge(expected, replicas_of_key,
                                                  conv_limit - (time.monotonic() - t_heal), pool)
        # Keys with a write of unknown outcome: their replicas must come to agree.
        agreed = {}
        while uncertain and took_rest is not None and time.monotonic() - t_heal < conv_limit:
            for k in sorted(uncertain - set(agreed)):
                if k not in shard_of_key:  # a new key whose only write failed: ask where it lives
                    rep = call(addr(1), "GET", f"/kvs/keys/{k}", {"causal-context": {}}, 2.0)
                    if rep.status in (200, 404):
                        shard_of_key[k] = shard_from(rep, 1)
                    continue
                answers = [call(addr(r), "GET", f"/kvs/keys/{k}", {"causal-context": {}}, 2.0)
                           for r in replicas_of_shard[shard_of_key[k]]]
                states_seen = {(a.status, a.body.get("value")) for a in answers}
                if all(served_locally(a) and a.status in (200, 404) for a in answers) and len(states_seen) == 1:
                    agreed[k] = answers[0].body.get("value") if answers[0].status == 200 else None
            if len(agreed) == len(uncertain):
                break
            time.sleep(0.01)
        if len(agreed) != len(uncertain):
            failures.append(f"replicas of keys with a write of unknown outcome did not agree within "
                            f"{conv_limit:.0f} s: {sorted(uncertain - set(agreed))[:10]}")
            took_rest = None
        expected.update(agreed)
        replicas_of_key = {k: replicas_of_shard[shard_of_key[k]] for k in expected}
        conv_s = (time.monotonic() - t_heal) if took_rest is not None else None
        if conv_s is None:
            for k, r, rep in left[:10]:
                failures.append(f"not converged after {conv_limit:.0f} s: {k} ({plan.kinds.get(k, 'bob')}) at node "
                                f"{r}: expected {expected[k]!r}, got {rep!r}")
            log(f"  did NOT converge within {conv_limit:.0f} s: {len(left)} (key, replica) pairs left")
        else:
            log(f"converged {conv_s * 1000:.0f} ms after the heal ({conv_requests} polling requests)")
            if conv_s > CONVERGENCE_BOUND:
                failures.append(f"convergence took {conv_s * 1000:.0f} ms, over {CONVERGENCE_BOUND * 1000:.0f} ms")
        summary["convergence_ms"] = None if conv_s is None else round(conv_s * 1000)

        # Full passes: every key at every node (replicas serve it, the others forward it),
        # twice, a moment apart: the answers must stay put.
        bad_keys = {k for k, _, _ in left}

        def full_pass(label):
            bad = 0
            futures = {pool.submit(call, addr(i), "GET", f"/kvs/keys/{k}", {"causal-context": {}}): (k, i)
                       for k in sorted(expected) for i in range(1, N + 1)}
            for f, (k, i) in futures.items():
                rep = f.result()
                local = i in replicas_of_key[k]
                if not matches(rep, expected[k]) or served_locally(rep) != local or \
                        (not local and node_of_addr.get(rep.body.get("address")) not in replicas_of_key[k]):
                    bad += 1
                    bad_keys.add(k)
                    if bad <= 10:
                        failures.append(f"{label}: GET {k} ({plan.kinds.get(k, 'bob')}) at node {i}: expected "
                                        f"{expected[k]!r} served {'locally' if local else 'by a replica'}, "
                                        f"got {describe(rep)}")
            return bad, len(futures)

        if conv_s is not None:
            bad1, n1 = full_pass("after convergence")
            time.sleep(0.5)
            bad2, n2 = full_pass("0.5 s later")
            log(f"full passes: {n1 - bad1}/{n1} and {n2 - bad2}/{n2} answers as expected")
        # The concurrent writes: the planned winner (the later write) on every replica.
        checked = [k for k in plan.late if k not in uncertain]
        won = [k for k in checked if conv_s is not None and k not in bad_keys]
        summary["winners"] = (len(won), len(checked),
                              sum(1 for k in won if plan.late[k][1] == "DELETE"))
        deleted = [k for k, v in expected.items() if v is None and k not in agreed]
        summary["deleted"] = (sum(1 for k in deleted if conv_s is not None and k not in bad_keys), len(deleted))
        summary["uncertain"] = len(uncertain)

        # Key counts: the expected live keys per shard, on every node.
        live = {sid: sum(1 for k, v in expected.items() if v is not None and shard_of_key[k] == sid)
                for sid in layout}
        t = time.monotonic()
        while True:
            wrong = []
            for i in range(1, N + 1):
                for sid in layout:
                    r = call(addr(i), "GET", f"/kvs/shards/{sid}")
                    if r.status != 200 or r.body.get("key-count") != live[sid]:
                        wrong.append(f"/kvs/shards/{sid} at node {i}: {describe(r)}")
                r = call(addr(i), "GET", "/kvs/key-count")
                if r.status != 200 or r.body.get("key-count") != live[shard_of_node[i]] or \
                        str(r.body.get("shard-id")) != shard_of_node[i]:
                    wrong.append(f"/kvs/key-count at node {i}: {describe(r)}")
            if not wrong or time.monotonic() - t > 3:
                break
            time.sleep(0.1)
        failures += [f"key count: {w} (expected {live})" for w in wrong[:8]]
        log(f"key counts per shard {live}: " + ("every node agrees" if not wrong else f"{len(wrong)} wrong"))

        # Carol again, now that the partition has healed: Bob's writes are there.
        carol_after = [0, 0]
        for label, (key, bob) in bob_sessions.items():
            if key not in bob_final:
                continue
            for n in SIDE_B:
                rep = call(addr(n), "GET", f"/kvs/keys/{key}", {"causal-context": bob.ctx})
                carol_after[1] += 1
                if not matches(rep, bob_final[key]):
                    failures.append(f"Carol after the heal: GET {key} at node {n} with Bob's context: expected "
                                    f"{bob_final[key]!r}, got {describe(rep)}")
                else:
                    carol_after[0] += 1
        log(f"Carol after the heal, with Bob's contexts at nodes {SIDE_B}: {carol_after[0]}/{carol_after[1]} "
            f"reads return Bob's value")

        # 5. Multi-homing: node 4 through its second address.
        second = f"{SUBNET_B}.{MULTI_HOMED}:{PORT}"
        mh = Session("multi-homed")
        mh_keys = {}
        mh_ok = 0
        for j in range(8):
            key = f"multihomed{j}"
            rep = mh.key("PUT", None, key, f"mh-{key}", target=second)
            if rep.status != 201:
                failures.append(f"multi-homed: PUT {key} via {second}: expected 201, got {describe(rep)}")
                break
            sid = shard_from(rep, MULTI_HOMED)
            mh_keys[key] = sid
            mh_ok += 1
            if set(mh_keys.values()) >= set(layout):
                break
        for key, sid in mh_keys.items():
            for target in (second, addr(1), addr(2)):
                rep = mh.key("GET", None, key, target=target)
                if not matches(rep, f"mh-{key}"):
                    failures.append(f"multi-homed: GET {key} via {target}: expected 'mh-{key}', got {describe(rep)}")
                else:
                    mh_ok += 1
        mh_written, mh_shards = len(mh_keys), sorted(set(mh_keys.values()))
        if mh_keys:
            key = sorted(mh_keys)[0]
            rep = mh.key("DELETE", None, key, target=second)
            r2 = mh.key("GET", None, key, target=addr(3))
            if rep.status != 200 or r2.status != 404:
                failures.append(f"multi-homed: DELETE {key} via {second}: {describe(rep)}, then GET at node 3: "
                                f"{describe(r2)}")
            else:
                mh_ok += 2
                del mh_keys[key]
        for sid in mh_keys.values():  # the multi-homed keys still there count too
            live[sid] += 1
        t = time.monotonic()
        while True:
            a = call(second, "GET", "/kvs/key-count")
            b = call(addr(MULTI_HOMED), "GET", "/kvs/key-count")
            s2 = call(second, "GET", "/kvs/shards")
            sid = shard_of_node[MULTI_HOMED]
            good = (a.status == 200 and b.status == 200 and a.body.get("key-count") == b.body.get("key-count")
                    == live[sid] and str(a.body.get("shard-id")) == sid
                    and s2.status == 200 and s2.body.get("shards") == sorted(layout))
            if good or time.monotonic() - t > 3:
                break
            time.sleep(0.1)
        if not good:
            failures.append(f"multi-homed: key-count via {second}: {describe(a)}; via {addr(MULTI_HOMED)}: "
                            f"{describe(b)}; expected {live[sid]}; shards via {second}: {describe(s2)}")
        else:
            mh_ok += 3
        log(f"multi-homed node {MULTI_HOMED} via {second}: {mh_ok} answers as expected "
            f"({mh_written} keys written there, in shards {mh_shards})")
        summary["multi_homed_ok"] = mh_ok
        nodes.check_alive()
    except Failed as e:
        failures.append(str(e))
        log(f"FAIL: {e}")
    except KeyboardInterrupt as e:
        interrupted = True
        failures.append(f"interrupted ({e or 'Ctrl-C'})")
        log(f"interrupted ({e or 'Ctrl-C'})")
    finally:
        signal.alarm(0)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        nodes.stop_all()
        net.teardown()

    total = time.monotonic() - t_start
    log("\nsummary")
    p = summary.get("partition", {})
    log(f"  seed {seed}; keys loaded {args.keys}")
    if p:
        log(f"  partition: {p['requests']} requests in {p['seconds']} s, statuses {p['statuses']}, "
            f"max latency {p['max_latency_ms']} ms; Carol's 400s in {p['carol_ms']} ms")
    if "convergence_ms" in summary:
        log(f"  convergence after the heal: {summary['convergence_ms']} ms (bound {CONVERGENCE_BOUND * 1000:.0f} ms)")
    if "winners" in summary:
        won, checked, deletes = summary["winners"]
        log(f"  concurrent writes from both sides: {won}/{checked} keys show the planned winner (the later write; "
            f"{deletes} of them a delete) on every node; deleted keys 404 on every node: "
            f"{summary['deleted'][0]}/{summary['deleted'][1]}"
            + (f"; keys with a write of unknown outcome: {summary['uncertain']}" if summary["uncertain"] else ""))
    if "multi_homed_ok" in summary:
        log(f"  multi-homed answers as expected: {summary['multi_homed_ok']}")
    log(f"  total runtime {total:.1f} s")
    for f in failures[:40]:
        log(f"  failure: {f}")
    if len(failures) > 40:
        log(f"  ... and {len(failures) - 40} more")
    failed = bool(failures)
    if failed or args.keep:
        log(f"node logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    log("RESULT: " + ("FAIL" if failed else "PASS") + f" (seed {seed})")
    sys.exit(130 if interrupted else (1 if failed else 0))


if __name__ == "__main__":
    main()
