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
everyone's keys, through random nodes. A share of the writes (--delete-fraction) are
deletes of one of the client's own keys (`DELETE /kv-store/<key>` with the session's
causal_payload): 200 when there was a value to delete (a tombstone is written), 404 when
the replica, reflecting everything the token names, saw none (nothing is written). A
delete takes the client's next seq like a put, so the history records it as a write of
"deleted" and the causal bookkeeping (which write of a key depends on which) covers it.
Every operation is recorded (invoke, ok, fail, unknown; a delete answered 404 is
"absent"). A write answered 503 saying its outcome is unknown counts as unknown, not
failed: the store may still apply it.

What an answer proves. A value proves that write; a 404 proves the key is deleted or was
never written, as far as the reader's token reaches. A DELETE is answered by a replica
that first reflects the token, so it reads too: a 404 read "absent", a 200 read "some
value". The checker then reports:

  lost writes        a key whose final value (read through every member once all faults
                     are healed, with an empty token) is older than its last
                     acknowledged write, or a final 404 where that write is a put no
                     delete of unknown outcome after it could have removed
  resurrected        a key whose last acknowledged operation is a delete, yet a final
                     read returns a value that delete superseded
  causal anomalies   an answer older than what the client's token already covered (its
                     own acknowledged writes and deletes, values it read before, and what
                     those depended on): a value older than a covered write or delete; a
                     404 (to a GET or a DELETE) when the newest covered write is a put and
                     no delete after it, acknowledged or of unknown outcome and issued
                     before the answer, explains the absence; a DELETE answered 200 when
                     the newest covered write is a delete and no put after it explains a
                     live value (a deleted value come back during the run)
  deletes            issued, ok (200), 404 (nothing to delete), failed, unknown; a run in
                     which no delete answered 200 fails (the deletes were not exercised)
  divergence         members answering different final values for a key
  unanswered         final reads that got no answer (an error, not a value or a 404)
  convergence        after each heal: time until every replica of each partition serves
                     (with an empty token) the last write or delete acknowledged during
                     the fault, or a later one
  quorum             quorum writes issued, ok, 503, other; quorum reads likewise; quorum
                     reads that missed an earlier acknowledged quorum write (below): any
                     fails the run, and so does a run in which no quorum read was held
                     to one (the check was not exercised)

A read may legitimately return a write whose outcome its writer never learned (a 503
or a timeout) instead of a later acknowledged one, when the later write did not depend
on it (they are concurrent siblings and the dialect shows one winner); the same holds
for a 404 that an unknown-outcome delete concurrent with the covered put explains, and
for such a put shown (or found by a DELETE) after an acknowledged delete. Those are
counted as siblings, not as anomalies (nor as lost or resurrected at the end). The
report also says how many 404s were held to a covered write and how many values to a
covered delete, so a run in which the delete rules never applied shows it.

Quorum reads and writes. A share of the main run's operations (--quorum-fraction, 20%)
carry a consistency level in the query string: `?w=quorum` on PUT and DELETE, `?r=quorum`
on GET. The main cluster has K=2, where a quorum is both replicas: every fault that cuts
off, kills or stops a replica makes its partition's quorum requests fail, a write with
503 "outcome unknown" (counted as unknown: the write is durable on one replica and may
spread), a read with 503 (a failure). That is the level's contract, not a store error.
Then the quorum phase (--quorum-seconds, 21; 0 turns it off): the main cluster is
stopped and a fresh one of --quorum-nodes (6) nodes with K=--quorum-k (3) starts in the
same namespaces (two partitions of 3; a quorum is 2, so one faulty replica leaves a
majority), with its logs under <tmp>/quorum. Every client operation is at quorum. After
3 s of calm come faults on replicas a, b, c of one partition, shuffled, in 6 s slots
(4 s fault, 2 s heal) as many as the length holds: isolate a, kill -9 b (restarted on its
data), cut a|b (c reaches both), pause c. The phase has its own history, final reads and
convergence, and every check above applies to it.

The quorum check: no quorum read missed an earlier quorum write. A quorum write is a PUT
at w=quorum answered 200/201 or a DELETE at w=quorum answered 200 (a DELETE answered 404
wrote nothing; writes at w=1 promise nothing to a quorum read and are not held). For each
quorum read (a GET at r=quorum answered 200 or 404) of key k, every quorum write of k
whose answer arrived before the read was sent (t1 < t0, one clock) is a floor, and the
answer is held to it exactly as the causal check holds an answer to a covered write: it
must be that write or one causally after it; a concurrent sibling may win instead (a
write the floor did not depend on, such as one of unknown outcome its writer's token
never took in; a 404 explained by a delete issued before the answer that follows the
floor or is concurrent with it), counted as a sibling. An answer the floor supersedes (an
older value, a value the floor deleted, a 404 nothing deletes after a floor that is a
put) is a violation. A read sent before the write was acknowledged is concurrent with it
and not held to it; a DELETE's own answer is no quorum read (its replica merges no peers).

Bounded: every phase has a fixed length, every HTTP call a timeout, the whole run a time
limit; the namespaces, the bridge, the iptables rule and every process are removed on
exit, error or Ctrl-C. Needs root (ip netns, iptables).

usage: cargo build --release && sudo python3 nemesis/nemesis.py [--nodes 4] [--k 2]
           [--clients 6] [--delete-fraction 0.15] [--fault-seconds 8] [--heal-seconds 6]
           [--quorum-fraction 0.2] [--quorum-seconds 21] [--quorum-nodes 6] [--quorum-k 3]
           [--seed S] [--json PATH]
       python3 nemesis/nemesis.py --self-test     (the checker alone, no root needed)
"""
import argparse
import bisect
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

# What a read of an absent key (a 404) is recorded as: seq 0, "no write".
ABSENT = 0
# What a DELETE answered 200 read: some live value, which one unknown.
LIVE = -1
# Write outcomes after which the write may be (or is) in the store.
MAYBE_APPLIED = ("ok", "unknown", "pending")


def write_outcome(status, body, delete):
    """What an answer to a PUT or DELETE proves about the write: "ok" (applied), "absent"
    (a DELETE answered 404: the replica, reflecting the client's token, had no value to
    delete and wrote nothing), "fail" (certainly not applied) or "unknown"."""
    if status == 200 or (status == 201 and not delete):
        return "ok"
    if status == 404 and delete:
        return "absent"
    if status is None:
        # A refused connection certainly delivered nothing: a plain failure. Anything
        # else (reset, timeout) may have been acted on: unknown.
        return "fail" if body.get("refused") else "unknown"
    # A forwarded write whose replica may have received it, one whose disk failed during
    # the commit, or one short of its w= quorum is answered 503 "... outcome is unknown
    # ..." (see the store's node::routing and node::quorum): it may still be applied.
    # Other errors are refusals.
    if status >= 500 and "outcome is unknown" in str(body.get("error", "")):
        return "unknown"
    return "fail"


class History:
    def __init__(self):
        self.lock = threading.Lock()
        self.ops = []
        self.phase = "setup"
        # (key, seq) -> {"deps": {key: seq} the writer's session depended on, "outcome": ...,
        #                "delete": whether it is a delete, "t0": when it was issued}
        self.writes = {}
        # key -> seqs of its deletes, in issue order
        self.deletes = {}

    def add(self, op):
        with self.lock:
            op["phase"] = self.phase
            self.ops.append(op)


class Client(threading.Thread):
    """One causal session. `deps` maps each key to the newest write of it this session
    depends on (seqs are the writer's, increasing over time)."""

    def __init__(self, cid, nodes, keys_per_client, clients, history, rng, stop, delete_fraction, quorum=0.0):
        super().__init__(daemon=True)
        self.cid, self.nodes, self.history, self.rng, self.stop = cid, nodes, history, rng, stop
        self.delete_fraction = delete_fraction
        # The share of operations sent at w=quorum / r=quorum (0: none, and no random
        # draw for it, so a run without quorum ops is the run it was before they existed).
        self.quorum = quorum
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

    def quorum_op(self):
        return bool(self.quorum) and self.rng.random() < self.quorum

    def call(self, i, method, key, fields, level=""):
        """`level`: a consistency level for the query string ("w=quorum", "r=quorum"), or none."""
        path = f"/kv-store/{key}" + (f"?{level}" if level else "")
        try:
            return request(f"{Net.ip(i)}:{PORT}", method, path, fields, conn=self.conn(i))
        except (OSError, http.client.HTTPException) as e:
            c = self.conns.pop(i, None)
            if c:
                c.close()
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
            if self.rng.random() < 0.5:
                self.write(i, self.rng.choice(self.own), delete=self.rng.random() < self.delete_fraction)
            else:
                self.read(i, self.rng.choice(self.all_keys))
            time.sleep(0.005)

    def write(self, i, key, delete):
        """A PUT, or a DELETE: both are writes of the key at the client's next seq."""
        q = self.quorum_op()
        level = "w=quorum" if q else ""
        t0 = time.time()
        floor = self.deps.get(key, 0)
        self.seq += 1
        seq = self.seq
        with self.history.lock:
            self.history.writes[(key, seq)] = {"deps": dict(self.deps), "outcome": "pending",
                                               "delete": delete, "t0": t0, "quorum": q}
            if delete:
                self.history.deletes.setdefault(key, []).append(seq)
        if delete:
            st, body = self.call(i, "DELETE", key, {"causal_payload": self.token}, level)
        else:
            st, body = self.call(i, "PUT", key, {"val": f"{self.cid}:{seq}", "causal_payload": self.token}, level)
        outcome = write_outcome(st, body, delete)
        with self.history.lock:
            self.history.writes[(key, seq)]["outcome"] = outcome
        if outcome == "ok":
            self.token = body.get("causal_payload", self.token)
            self.depend(key, seq)
        # A 404 to a DELETE carries no causal_payload: the session's token, and so what
        # it depends on, stays as it was.
        op = {"client": self.cid, "f": "delete" if delete else "write", "key": key, "seq": seq,
              "node": i, "status": st, "outcome": outcome, "t0": t0, "t1": time.time(),
              "partition": body.get("partition_id"), "q": q}
        if delete:
            # A 404 is also a read of "absent" by a replica that reflected the token: the
            # checker holds it to what the token covered when the delete was issued.
            op["floor"] = floor
        self.history.add(op)

    def read(self, i, key):
        q = self.quorum_op()
        t0 = time.time()
        floor = self.deps.get(key, 0)
        st, body = self.call(i, "GET", key, {"causal_payload": self.token}, "r=quorum" if q else "")
        got = None
        outcome = "unknown" if st is None and not body.get("refused") else "fail"
        if st == 200:
            outcome = "ok"
            got = int(str(body.get("value", ":0")).split(":")[-1] or 0)
            self.token = body.get("causal_payload", self.token)
            self.depend(key, got)
        elif st == 404:
            # Deleted or never written. The answer carries no causal_payload, so the
            # session depends on nothing new.
            outcome, got = "ok", ABSENT
        self.history.add({"client": self.cid, "f": "read", "key": key, "got": got, "floor": floor,
                          "node": i, "status": st, "outcome": outcome, "t0": t0, "t1": time.time(),
                          "partition": body.get("partition_id"), "q": q})


# ---------------------------------------------------------------------------------------
# Checker


class Order:
    """Causal order among the writes (puts and deletes) of one key. Write s depends on
    deps_s[key], which depends on its own deps[key], and so on: each write has one parent
    (a smaller seq; 0 for none), so the writes of a key form a tree rooted at 0, and
    "follows" is "descends from". One depth-first pass gives every write its enter and
    exit times, which answer that in constant time (a history holds tens of thousands of
    reads, and walking parent chains for each made the check take minutes)."""

    def __init__(self, history):
        self.writes = history.writes
        # Per key, the deletes and the puts that are or may be in the store, by seq: what
        # can explain a 404, and a live value.
        self.deletes, self.puts = {}, {}
        children = {}
        for (key, seq), w in self.writes.items():
            if w["outcome"] in MAYBE_APPLIED:
                (self.deletes if w.get("delete") else self.puts).setdefault(key, []).append(seq)
            children.setdefault(key, {}).setdefault(w["deps"].get(key, 0), []).append(seq)
        for seqs in list(self.deletes.values()) + list(self.puts.values()):
            seqs.sort()
        self.span = {}
        clock = 0
        for key, kids in children.items():
            # A parent with no record of its own (never the case for writes this script
            # issued) hangs from the root, as the parent walk in `follows` treats it.
            orphans = [p for p in kids if p and (key, p) not in self.writes]
            kids.setdefault(0, []).extend(orphans)
            enter = {}
            stack = [(0, False)]
            while stack:
                node, leaving = stack.pop()
                if leaving:
                    self.span[(key, node)] = (enter[node], clock)
                else:
                    enter[node] = clock
                    stack.append((node, True))
                    stack.extend((c, False) for c in kids.get(node, ()))
                clock += 1

    def is_delete(self, key, seq):
        return bool(self.writes.get((key, seq), {}).get("delete"))

    def follows(self, key, later, earlier):
        """Whether write (key, later) causally follows (key, earlier) (or is it)."""
        a, b = self.span.get((key, earlier)), self.span.get((key, later))
        if a and b:
            return a[0] <= b[0] and b[1] <= a[1]
        s = later  # a seq with no record (hand-made histories): walk its parents
        while s > earlier and s > 0:
            s = self.writes.get((key, s), {"deps": {}})["deps"].get(key, 0)
        return s == earlier

    def explained(self, key, floor, candidates, before):
        """Whether a write among `candidates` (sorted seqs of the key's writes of the other
        kind than `floor`, the newest the reader covered) explains an answer `floor`
        cannot: 'ok' if one follows `floor`, 'concurrent' if one is a sibling of it (it
        may win), else 'stale'. Only writes issued before the answer count."""
        first_later = bisect.bisect_right(candidates, floor)
        rel = "stale"
        for c in candidates[first_later:]:
            if self.writes[(key, c)]["t0"] >= before:
                break  # one writer per key, one write at a time: the rest came later still
            if self.follows(key, c, floor):
                return "ok"
            rel = "concurrent"  # issued later, without having seen the floor
        if any(not self.follows(key, floor, c) for c in candidates[:first_later]):
            rel = "concurrent"  # issued earlier, and the floor did not see it
        return rel

    def relation(self, key, got, floor, before=float("inf")):
        """How an answer for `key` relates to `floor`, the newest write of it the reader
        depended on. `got` is the seq of the put whose value was read, ABSENT for a 404,
        or LIVE for a DELETE answered 200 (some value was there). A 404 after a covered
        put needs a delete, a live value after a covered delete needs a put, issued
        before `before` (when the answer came). 'ok' (floor or after it), 'stale'
        (strictly before it) or 'concurrent' (a sibling the dialect may show instead)."""
        if not floor or got == floor:
            return "ok"
        if got == ABSENT:
            if self.is_delete(key, floor):
                return "ok"
            return self.explained(key, floor, self.deletes.get(key, []), before)
        if got == LIVE:
            if not self.is_delete(key, floor):
                return "ok"
            return self.explained(key, floor, self.puts.get(key, []), before)
        if got > floor and self.follows(key, got, floor):
            return "ok"
        if got < floor and self.follows(key, floor, got):
            return "stale"
        return "concurrent"


def quorum_check(history, order):
    """No quorum read missed an earlier quorum write. For every quorum read (GET at
    r=quorum answered 200 or 404) of key k, the quorum writes of k (PUT at w=quorum
    answered 200/201, DELETE at w=quorum answered 200) that completed before the read
    was invoked (their t1 < its t0: real time, one clock) are floors the answer is held
    to, exactly as a covered write is in the causal check (`Order.relation`): the answer
    must be that write or one that follows it ('ok'), or a sibling that may win
    ('concurrent': a write the floor did not depend on, e.g. one of unknown outcome the
    writer's token never took in; a 404 that a delete issued before the answer and
    concurrent with the floor explains). 'stale', an answer the floor causally
    supersedes (an older value, a value the floor deleted, a 404 nothing deletes after
    the floor), is a violation. A read invoked before the write completed (concurrent
    with it) is not held to it. A DELETE answered 404 wrote nothing, so it is no floor;
    a DELETE's own answer is not a quorum read. A floor that a floor already found 'ok'
    follows is 'ok' too (what follows the later one follows the earlier), so only the
    others are evaluated. Returns (violations, siblings, checked): violations are the
    reads with "missed" (the seq of the quorum write they missed) added; checked counts
    the quorum reads that had a floor at all."""
    acked = {}
    for op in history.ops:
        if op.get("q") and op["f"] in ("write", "delete") and op["outcome"] == "ok":
            acked.setdefault(op["key"], []).append((op["t1"], op["seq"]))
    for ws in acked.values():
        ws.sort()
    violations, siblings, checked = [], 0, 0
    for op in history.ops:
        if not (op.get("q") and op["f"] == "read" and op["outcome"] == "ok"):
            continue
        key, ws = op["key"], acked.get(op["key"], [])
        prior = sorted(seq for _, seq in ws[:bisect.bisect_left(ws, (op["t0"],))])
        if not prior:
            continue
        checked += 1
        oks, missed, concurrent = [], None, False
        for floor in reversed(prior):  # newest first: it usually settles the rest
            if any(order.follows(key, o, floor) for o in oks):
                continue
            rel = order.relation(key, op["got"], floor, before=op.get("t1", float("inf")))
            if rel == "ok":
                oks.append(floor)
            elif rel == "stale":
                missed = floor if missed is None else missed
            else:
                concurrent = True
        if missed is not None:
            violations.append(dict(op, missed=missed))
        elif concurrent:
            siblings += 1
    return violations, siblings, checked


def check(history, final):
    """The history against causal consistency, and the final reads (`final`: key ->
    {node: seq of the value read, ABSENT for a 404, None for no answer}) against the
    acknowledged writes. Returns a dict of lists (and counts) the run reports."""
    order = Order(history)
    anomalies, siblings = [], 0
    # How often the delete rules applied: 404s whose token covered a write of the key,
    # and values read although the token covered a delete.
    checked_404s = checked_after_delete = 0
    for op in history.ops:
        if op["f"] == "read" and op["outcome"] == "ok":
            got = op["got"]
        elif op["f"] == "delete" and op["outcome"] == "absent":
            got = ABSENT
        elif op["f"] == "delete" and op["outcome"] == "ok":
            # A 200: the replica, reflecting the token, had a value to delete.
            got = LIVE
        else:
            continue
        if op["floor"]:
            checked_404s += got == ABSENT
            checked_after_delete += got != ABSENT and order.is_delete(op["key"], op["floor"])
        rel = order.relation(op["key"], got, op["floor"], before=op.get("t1", float("inf")))
        if rel == "stale":
            anomalies.append(op)
        elif rel == "concurrent":
            siblings += 1
    last_acked = {}
    for (key, seq), w in history.writes.items():
        if w["outcome"] == "ok" and seq > last_acked.get(key, 0):
            last_acked[key] = seq
    lost, resurrected, unanswered, divergent, final_siblings = [], [], [], [], 0
    for key, last in last_acked.items():
        values = final.get(key, {})
        if len(set(values.values())) > 1:
            divergent.append((key, values))
        for node, got in values.items():
            if got is None:
                unanswered.append((key, node))
                continue
            rel = order.relation(key, got, last)
            if rel == "stale":
                # Older than the last acknowledged operation: a value that a delete had
                # removed is back, or an acknowledged put is gone (or older than itself).
                (resurrected if order.is_delete(key, last) else lost).append((key, node, got, last))
            elif rel == "concurrent":
                final_siblings += 1
    deleted_keys = sorted(key for key, last in last_acked.items() if order.is_delete(key, last))
    quorum_violations, quorum_siblings, quorum_checked = quorum_check(history, order)
    return {"quorum_violations": quorum_violations, "quorum_siblings": quorum_siblings,
            "quorum_checked": quorum_checked,
            "anomalies": anomalies, "siblings": siblings, "lost": lost, "resurrected": resurrected,
            "unanswered": unanswered, "divergent": divergent, "final_siblings": final_siblings,
            "deleted_keys": deleted_keys, "checked_404s": checked_404s,
            "checked_after_delete": checked_after_delete}


def self_test():
    """The checker on hand-made histories: what it must flag and what it must allow. Every
    expectation is an exact list or count, so a checker that flags nothing fails it."""
    assert write_outcome(200, {}, False) == "ok" and write_outcome(201, {}, False) == "ok"
    assert write_outcome(200, {}, True) == "ok" and write_outcome(404, {}, True) == "absent"
    assert write_outcome(None, {"refused": True}, True) == "fail"
    assert write_outcome(None, {"transport": "timed out"}, True) == "unknown"
    assert write_outcome(503, {"error": "the write's outcome is unknown: reset"}, True) == "unknown"
    assert write_outcome(503, {"error": "no replica of partition 0 could serve"}, False) == "fail"
    assert write_outcome(404, {}, False) == "fail" and write_outcome(400, {}, True) == "fail"

    h = History()

    def w(key, seq, dep, outcome, delete=False, t0=0.0):
        h.writes[(key, seq)] = {"deps": {key: dep} if dep else {}, "outcome": outcome, "delete": delete, "t0": t0}

    def read(key, got, floor, label, t1=1e9):
        return {"f": "read", "key": key, "got": got, "floor": floor, "outcome": "ok", "t1": t1, "label": label}

    # Key k, puts only. Writer: 1 (ok) <- 2 (ok) <- 4 (ok); 3 failed, issued after 2 (not in 4's past).
    for seq, dep, outcome in [(1, 0, "ok"), (2, 1, "ok"), (3, 2, "fail"), (4, 2, "ok")]:
        w("k", seq, dep, outcome)
    # Key d: put 1 (ok) <- delete 2 (ok) <- put 3 (ok) <- delete 4 (outcome unknown,
    # issued at t=100).
    w("d", 1, 0, "ok")
    w("d", 2, 1, "ok", delete=True)
    w("d", 3, 2, "ok")
    w("d", 4, 3, "unknown", delete=True, t0=100.0)
    # Key e: delete 1 (unknown) and put 2 (ok) that did not depend on it: concurrent.
    w("e", 1, 0, "unknown", delete=True)
    w("e", 2, 0, "ok")
    # Key g: put 1 (ok) <- delete 2 answered 404 (nothing written: explains nothing).
    w("g", 1, 0, "ok")
    w("g", 2, 1, "absent", delete=True)
    # Key r: put 1 (ok) <- delete 2 (ok): deleted for good.
    w("r", 1, 0, "ok")
    w("r", 2, 1, "ok", delete=True)
    # Key s: put 1 (ok) <- delete 2 (ok) <- put 3 (unknown): 3 may show at the end.
    w("s", 1, 0, "ok")
    w("s", 2, 1, "ok", delete=True)
    w("s", 3, 2, "unknown")
    # Key u: put 1 (unknown) and delete 2 (ok) that did not depend on it: concurrent.
    w("u", 1, 0, "unknown")
    w("u", 2, 0, "ok", delete=True)
    # Key h: put 1 (unknown, yet read by someone) and a later delete 2 (ok) whose writer
    # never saw it: the delete is concurrent with the put, not after it.
    w("h", 1, 0, "unknown")
    w("h", 2, 0, "ok", delete=True)

    h.ops = [
        read("k", 4, 4, "k same"), read("k", 2, 1, "k newer"), read("k", 1, 4, "k stale value"),
        read("k", ABSENT, 2, "k 404 after covered put, no delete"), read("k", 3, 4, "k failed sibling"),
        read("k", 4, 0, "k no floor"), read("k", ABSENT, 0, "k 404 no floor"),
        read("d", ABSENT, 2, "d 404 after covered delete"),
        read("d", 1, 2, "d value after covered delete"),
        read("d", 3, 2, "d put after covered delete"),
        read("d", ABSENT, 1, "d 404, acked delete after covered put"),
        read("d", ABSENT, 3, "d 404, unknown delete issued before", t1=200.0),
        read("d", ABSENT, 3, "d 404, unknown delete issued after", t1=50.0),
        read("e", ABSENT, 2, "e 404, concurrent unknown delete"),
        read("u", 1, 2, "u concurrent put after acked delete"),
        read("h", ABSENT, 1, "h 404, later delete that did not see the put"),
        # A DELETE answered 404 is a read of "absent" held to the token's floor.
        {"f": "delete", "key": "g", "seq": 2, "floor": 1, "outcome": "absent", "t1": 1e9,
         "label": "g delete 404 after covered put"},
        {"f": "delete", "key": "r", "seq": 3, "floor": 2, "outcome": "absent", "t1": 1e9,
         "label": "r delete 404 after covered delete"},
        # A DELETE answered 200 found a live value: after a covered delete, a put must
        # explain it.
        {"f": "delete", "key": "r", "seq": 4, "floor": 2, "outcome": "ok", "t1": 1e9,
         "label": "r delete 200 after covered delete, no put since"},
        {"f": "delete", "key": "s", "seq": 4, "floor": 2, "outcome": "ok", "t1": 1e9,
         "label": "s delete 200, the unknown put after the delete"},
        {"f": "delete", "key": "u", "seq": 3, "floor": 2, "outcome": "ok", "t1": 1e9,
         "label": "u delete 200, the concurrent unknown put"},
        {"f": "delete", "key": "d", "seq": 5, "floor": 3, "outcome": "ok", "t1": 1e9,
         "label": "d delete 200 after covered put"},
        # A read of g after the 404 delete: that delete wrote nothing, so it explains nothing.
        read("g", ABSENT, 1, "g 404 after covered put, delete answered 404"),
        # Ops the checker must skip: a failed read, a delete of unknown outcome.
        {"f": "read", "key": "k", "got": None, "floor": 4, "outcome": "fail", "label": "failed read"},
        {"f": "delete", "key": "d", "seq": 4, "floor": 3, "outcome": "unknown", "label": "unknown delete"},
    ]
    final = {
        "k": {1: 4, 2: 3, 3: 2, 4: None, 5: ABSENT},   # 3: sibling; 2 and 404: lost; 4: no answer
        "d": {1: ABSENT, 2: 3},                     # 404 explained by the unknown delete 4
        "e": {1: ABSENT},                           # the concurrent unknown delete won
        "g": {1: ABSENT},                           # last acknowledged: put 1; nothing deletes it
        "r": {1: ABSENT, 2: 1},                     # 2: resurrected
        "s": {1: 3, 2: ABSENT},                     # the later put landed on 1 (not resurrected)
        "u": {1: 1, 2: ABSENT},                     # the concurrent put won on 1 (not resurrected)
        "h": {1: ABSENT, 2: ABSENT},                # deleted everywhere
    }
    r = check(h, final)
    assert [o["label"] for o in r["anomalies"]] == [
        "k stale value", "k 404 after covered put, no delete", "d value after covered delete",
        "d 404, unknown delete issued after", "g delete 404 after covered put",
        "r delete 200 after covered delete, no put since",
        "g 404 after covered put, delete answered 404"], [o["label"] for o in r["anomalies"]]
    # k: the failed put 3; e and h: the concurrent delete; u: the concurrent put (read,
    # and found by a delete).
    assert r["siblings"] == 5, r["siblings"]
    assert sorted(r["lost"]) == [("g", 1, ABSENT, 1), ("k", 3, 2, 4), ("k", 5, ABSENT, 4)], r["lost"]
    assert r["resurrected"] == [("r", 2, 1, 2)], r["resurrected"]
    assert r["unanswered"] == [("k", 4)], r["unanswered"]
    # k's sibling 3, e's winning delete, u's winning put.
    assert r["final_siblings"] == 3, r["final_siblings"]
    assert sorted(k for k, _ in r["divergent"]) == ["d", "k", "r", "s", "u"], r["divergent"]
    assert r["deleted_keys"] == ["h", "r", "s", "u"], r["deleted_keys"]
    assert (r["checked_404s"], r["checked_after_delete"]) == (10, 6), (r["checked_404s"], r["checked_after_delete"])
    # None of those ops is a quorum op: the quorum check has nothing to hold.
    assert (r["quorum_violations"], r["quorum_siblings"], r["quorum_checked"]) == ([], 0, 0)

    # The quorum check: quorum reads against the quorum writes that completed before
    # they began (real times t0/t1). The reads carry no causal floor (floor 0: a session
    # that never saw the key), so only the quorum check can flag them.
    h = History()

    def qw(key, seq, dep, outcome, t0, t1, delete=False, q=True):
        h.writes[(key, seq)] = {"deps": {key: dep} if dep else {}, "outcome": outcome, "delete": delete,
                                "t0": t0, "quorum": q}
        h.ops.append({"f": "delete" if delete else "write", "key": key, "seq": seq, "floor": 0,
                      "outcome": outcome, "t0": t0, "t1": t1, "q": q})

    def qr(key, got, t0, t1, label, q=True, outcome="ok"):
        h.ops.append({"f": "read", "key": key, "got": got, "floor": 0, "outcome": outcome, "t0": t0,
                      "t1": t1, "q": q, "label": label})

    # Key qa: quorum puts 1 (done at 11) <- 2 (issued 20, done at 21).
    qw("qa", 1, 0, "ok", 10, 11)
    qw("qa", 2, 1, "ok", 20, 21)
    qr("qa", 1, 25, 26, "qa missed put 2")
    qr("qa", 2, 25, 26, "qa read put 2")
    qr("qa", 1, 20.5, 22, "qa concurrent with put 2")      # began before 2 completed
    qr("qa", ABSENT, 15, 16, "qa 404 after put 1")         # nothing deletes 1
    qr("qa", ABSENT, 5, 6, "qa 404 before any write")      # no floor: not checked
    qr("qa", 1, 25, 26, "qa not a quorum read", q=False)   # not held to quorum writes
    qr("qa", None, 25, 26, "qa failed read", outcome="fail")
    # Key qb: quorum put 1 (done at 11) <- quorum delete 2 (done at 21).
    qw("qb", 1, 0, "ok", 10, 11)
    qw("qb", 2, 1, "ok", 20, 21, delete=True)
    qr("qb", 1, 30, 31, "qb value the delete removed")
    qr("qb", ABSENT, 30, 31, "qb 404 after the delete")
    qr("qb", 1, 15, 16, "qb value before the delete")
    # Key qc: quorum put 1 (done at 11); put 2 at w=quorum answered 503 (unknown, issued
    # 12); put 3 (issued 14, done at 15) whose token never took in 2: 2 and 3 are siblings.
    qw("qc", 1, 0, "ok", 10, 11)
    qw("qc", 2, 1, "unknown", 12, 13.5)
    qw("qc", 3, 1, "ok", 14, 15)
    qr("qc", 2, 20, 21, "qc unknown sibling of put 3")
    qr("qc", 1, 20, 21, "qc missed put 3")
    # Key qd: a put acknowledged at w=1, then a quorum read that misses it: w=1 gives no
    # quorum guarantee, so the quorum check holds nothing against it.
    qw("qd", 1, 0, "ok", 10, 11, q=False)
    qr("qd", ABSENT, 20, 21, "qd 404 after a w=1 put")
    # Key qe: put 1 (quorum, done at 11) <- delete 2 at w=quorum answered 503 (unknown,
    # issued 12): a 404 answered after 12 is explained by it, one answered before is not.
    qw("qe", 1, 0, "ok", 10, 11)
    qw("qe", 2, 1, "unknown", 12, 13.5, delete=True)
    qr("qe", ABSENT, 20, 21, "qe 404, the unknown delete")
    qr("qe", ABSENT, 11.5, 11.8, "qe 404 answered before the delete was issued")
    # Key qf: a delete at w=quorum answered 404 wrote nothing: no floor.
    qw("qf", 1, 0, "absent", 10, 11, delete=True)
    qr("qf", ABSENT, 20, 21, "qf 404 after a delete answered 404")
    r = check(h, {})
    assert [o["label"] for o in r["quorum_violations"]] == [
        "qa missed put 2", "qa 404 after put 1", "qb value the delete removed", "qc missed put 3",
        "qe 404 answered before the delete was issued"], [o["label"] for o in r["quorum_violations"]]
    assert [o["missed"] for o in r["quorum_violations"]] == [2, 1, 2, 3, 1], r["quorum_violations"]
    # qc's unknown put 2 (qe's unknown delete follows put 1: its 404 is simply 'ok').
    assert r["quorum_siblings"] == 1, r["quorum_siblings"]
    # Every successful quorum read with a floor: qa 4, qb 3, qc 2, qe 2 (not "qa 404
    # before any write", "qd", "qf", the w=1 read, the failed read).
    assert r["quorum_checked"] == 11, r["quorum_checked"]
    assert r["anomalies"] == [], r["anomalies"]  # the causal check has no floors to hold

    # The constant-time "follows" agrees with walking the parent chain, on a random
    # history of one writer whose session sometimes loses track of its own writes.
    rng = random.Random(7)
    h = History()
    for seq in range(1, 400):
        parent = rng.choice([seq - 1, rng.randrange(seq), 0])
        h.writes[("x", seq)] = {"deps": {"x": parent} if parent else {}, "outcome": "ok"}
    order = Order(h)

    def walk(later, earlier):
        s = later
        while s > earlier:
            s = h.writes.get(("x", s), {"deps": {}})["deps"].get("x", 0)
        return s == earlier

    def ancestor(s):  # some write s descends from: half the pairs are related
        for _ in range(rng.randrange(5)):
            s = h.writes.get(("x", s), {"deps": {}})["deps"].get("x", 0)
        return s

    pairs = [(a, ancestor(a) if rng.random() < 0.5 else rng.randrange(400))
             for a in (rng.randrange(400) for _ in range(20000))]
    answers = [order.follows("x", a, b) for a, b in pairs]
    assert answers == [walk(a, b) for a, b in pairs]
    assert 5000 < sum(answers) < 15000, sum(answers)  # both answers are exercised
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


def read_seq(node, key, timeout=OP_TIMEOUT):
    """Reads `key` through `node` with an empty token: the seq of the value it answers,
    ABSENT for a 404, None for no answer (an error or a transport failure)."""
    try:
        st, body = request(f"{Net.ip(node)}:{PORT}", "GET", f"/kv-store/{key}", {"causal_payload": ""},
                           timeout=timeout)
        if st == 404:
            return ABSENT
        return int(body["value"].split(":")[1]) if st == 200 else None
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError):
        return None


def converge_after_heal(history, parts, fault_start, limit):
    """Seconds until every replica of every partition serves the last write (put or
    delete) acknowledged during the fault (per partition), or a later write of that key,
    read with an empty token directly from the replica."""
    kp = key_partitions(history)
    targets = {}
    with history.lock:
        for op in history.ops:
            if op["f"] in ("write", "delete") and op["outcome"] == "ok" and op["t1"] >= fault_start:
                p = kp.get(op["key"])
                if p is not None:
                    targets[p] = (op["key"], op["seq"])

    def serves(key, seq, got):
        if got is None:
            return False
        if got != ABSENT:
            return got >= seq
        # A 404 is the target itself when it is a delete, or a later delete (which the
        # workload, still running, may have issued since) taking effect.
        with history.lock:
            for d in reversed(history.deletes.get(key, [])):
                if d < seq:
                    return False
                if history.writes[(key, d)]["outcome"] in MAYBE_APPLIED:
                    return True
            return False

    t0 = time.time()
    pending = [(p, r, key, seq) for p, (key, seq) in targets.items() for r in parts.get(p, [])]
    while pending and time.time() - t0 < limit:
        pending = [(p, r, key, seq) for p, r, key, seq in pending
                   if not serves(key, seq, read_seq(r, key, timeout=1))]
        if pending:
            time.sleep(0.02)
    return (time.time() - t0) if not pending else None


def final_reads(parts, keys):
    """Every key read through every member with an empty token (key -> {node: seq, ABSENT
    or None}). Every member, not only the key's replicas as the history last saw them: a
    key moved by a view change, or one whose only answers were 404s (which name no
    partition), is still read on each of its replicas, and a non-replica's forwarded
    answer is some replica's."""
    members = sorted({r for rs in parts.values() for r in rs})
    final = {}
    for key in keys:
        final[key] = {}
        for r in members:
            t = time.time()
            final[key][r] = read_seq(r, key)
            if os.environ.get("NEMESIS_DEBUG") and time.time() - t > 0.3:
                log(f"  slow final read of {key} at node {r}: {time.time() - t:.2f} s: {final[key][r]}")
    return final


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def settle_final(parts, keys):
    """Final reads, repeated until every member agrees on every key or 10 s have passed
    (replicas agree within moments of the last heal). Returns (final, differing keys)."""
    t_final = time.time()
    while True:
        final = final_reads(parts, keys)
        differ = [k for k, v in final.items() if len(set(v.values())) > 1]
        if not differ or time.time() - t_final > 10:
            break
        if os.environ.get("NEMESIS_DEBUG"):
            log(f"  still divergent: {[(k, final[k]) for k in differ[:3]]}")
        time.sleep(0.2)
    log(f"final reads of {len(keys)} keys through every member: all agree ({time.time() - t_final:.2f} s after "
        f"the workload stopped)" if not differ else "final reads: replicas still disagree after 10 s")
    return final, differ


def phase_table(history, phases):
    """Figures per phase: operations, rate, outcomes, the isolated node's share, convergence."""
    log(f"\n{'phase':<34} {'ops':>6} {'ops/s':>6} {'ok':>6} {'fail':>6} {'unknown':>7} "
        f"{'minority ok/ops':>16} {'conv s':>7}")
    for ph in phases:
        for label in ([ph["name"], f"healed after {ph['name']}"] if ph["name"] != "baseline" else ["baseline"]):
            ops = [o for o in history.ops if o["phase"] == label]
            span = (max(o["t1"] for o in ops) - min(o["t0"] for o in ops)) if ops else 0
            rate = f"{len(ops) / span:.0f}" if span > 0 else ""
            # A delete answered 404 was served (the key was already absent).
            ok = sum(o["outcome"] in ("ok", "absent") for o in ops)
            fail = sum(o["outcome"] == "fail" for o in ops)
            unk = sum(o["outcome"] == "unknown" for o in ops)
            minority = ""
            if ph["isolated"] and label == ph["name"]:
                mops = [o for o in ops if o["node"] == ph["isolated"]]
                minority = f"{sum(o['outcome'] in ('ok', 'absent') for o in mops)}/{len(mops)}"
            conv = f"{ph['convergence_s']:.3f}" if (label != ph["name"] or label == "baseline") and \
                ph["convergence_s"] is not None else ""
            log(f"{label[:34]:<34} {len(ops):>6} {rate:>6} {ok:>6} {fail:>6} {unk:>7} {minority:>16} {conv:>7}")


def quorum_counts(history):
    """What the quorum operations of a history got. Writes (puts and deletes at
    w=quorum): ok (acknowledged by a quorum), absent (a delete answered 404: nothing to
    delete), 503 (short of the quorum: outcome unknown; or no replica could serve),
    other (refused, transport error or timeout). Reads (GETs at r=quorum): ok (200 or
    404), 503 (fewer replicas than the quorum answered), other."""
    c = {"writes": 0, "writes_ok": 0, "writes_absent": 0, "writes_503": 0, "writes_other": 0,
         "reads": 0, "reads_ok": 0, "reads_503": 0, "reads_other": 0}
    for o in history.ops:
        if not o.get("q"):
            continue
        kind = "reads" if o["f"] == "read" else "writes"
        c[kind] += 1
        if o["outcome"] == "ok":
            c[f"{kind}_ok"] += 1
        elif o["outcome"] == "absent":
            c["writes_absent"] += 1
        elif o["status"] == 503:
            c[f"{kind}_503"] += 1
        else:
            c[f"{kind}_other"] += 1
    return c


def report_quorum(history, result, what):
    """Logs the quorum figures of a history and its quorum check; returns whether they fail
    the run (a violation, or no quorum read held to an earlier quorum write at all)."""
    c = quorum_counts(history)
    log(f"quorum writes{what}: {c['writes']} issued, {c['writes_ok']} ok, {c['writes_absent']} 404 (nothing "
        f"to delete), {c['writes_503']} 503, {c['writes_other']} other failures/unknown")
    log(f"quorum reads{what}: {c['reads']} issued, {c['reads_ok']} ok (200 or 404), {c['reads_503']} 503, "
        f"{c['reads_other']} other failures")
    violations = result["quorum_violations"]
    log(f"quorum reads that missed an earlier acknowledged quorum write: {len(violations)} (quorum reads held "
        f"to one: {result['quorum_checked']}; answered a concurrent sibling: {result['quorum_siblings']})")
    for op in violations[:10]:
        log(f"  quorum violation: {op}")
    if not result["quorum_checked"]:
        log(f"no quorum read{what} followed an acknowledged quorum write: the quorum check was not exercised")
    return bool(violations) or not result["quorum_checked"]


def quorum_phase(args, rng, net, tmp, deadline, clusters):
    """The quorum phase: a fresh cluster of --quorum-nodes nodes with K=--quorum-k (two
    partitions of 3 replicas by default, so a majority survives one faulty replica), in
    the same namespaces, its logs under <tmp>/quorum. Every client operation is sent at
    w=quorum / r=quorum. A calm stretch, then faults on replicas of one partition (a, b,
    c) that leave it a majority: isolate a, kill -9 b (restarted on its data), cut a|b
    (c still reaches both), pause c; shuffled, as many 6 s slots (4 s fault, 2 s heal)
    as --quorum-seconds holds, at least one. Then final reads and the whole check.
    Returns (failed, summary for --json)."""
    qtmp = os.path.join(tmp, "quorum")
    os.makedirs(qtmp, exist_ok=True)
    n, k = args.quorum_nodes, args.quorum_k
    nodes = Nodes(n, k, args.binary, qtmp)
    clusters.append(nodes)
    net.heal()
    t_start = time.time()
    for i in range(1, n + 1):
        nodes.start(i)
    for i in range(1, n + 1):
        nodes.wait_ready(i)
    parts = members_of(nodes.addr(1))
    log(f"\nquorum phase: {n} nodes, K={k}, partitions {parts}; every operation at w=quorum / r=quorum "
        f"(ready in {time.time() - t_start:.1f} s)")
    rs = parts[sorted(parts)[0]]
    a, b, c = rs[0], rs[1 % len(rs)], rs[2 % len(rs)]

    def isolate(x):
        for j in range(1, n + 1):
            if j != x:
                net.cut(x, j)

    faults = [
        (f"q: isolate {a}", lambda: isolate(a), net.heal),
        (f"q: kill -9 {b}", lambda: nodes.kill(b), lambda: (nodes.start(b), nodes.wait_ready(b))),
        (f"q: split {a}|{b} ({c} reaches both)", lambda: net.cut(a, b), net.heal),
        (f"q: pause {c}", lambda: nodes.signal(c, signal.SIGSTOP), lambda: nodes.signal(c, signal.SIGCONT)),
    ]
    rng.shuffle(faults)
    fault_s, heal_s = 4.0, 2.0
    calm = min(3.0, args.quorum_seconds / 4)
    slots = max(1, int((args.quorum_seconds - calm) // (fault_s + heal_s)))
    faults = faults[:slots]

    history, stop = History(), threading.Event()
    clients = [Client(cid, n, args.keys_per_client, args.clients, history, random.Random(rng.randrange(1 << 30)),
                      stop, args.delete_fraction, quorum=1.0)
               for cid in range(args.clients)]
    history.phase = "baseline"
    for cl in clients:
        cl.start()
    phases = [{"name": "baseline", "isolated": None, "t0": 0, "convergence_s": None}]
    try:
        time.sleep(calm)
        for name, inject, heal in faults:
            if time.time() + fault_s + heal_s + 30 > deadline:
                log("time limit: skipping the remaining quorum faults")
                break
            history.phase = name
            t_fault = time.time()
            log(f"fault: {name}")
            inject()
            time.sleep(fault_s)
            heal()
            history.phase = f"healed after {name}"
            conv = converge_after_heal(history, parts, t_fault, limit=30)
            log(f"  healed; replicas converged in {conv:.3f} s" if conv is not None
                else "  healed; replicas did NOT converge within 30 s")
            phases.append({"name": name, "isolated": a if "isolate" in name else None, "t0": t_fault,
                           "convergence_s": conv})
            time.sleep(max(0.0, heal_s - (conv or 0)))
    finally:
        stop.set()
        for cl in clients:
            cl.join(timeout=OP_TIMEOUT + 2)
    history.phase = "final"
    keys = [f"c{cid}_k{j}" for cid in range(args.clients) for j in range(args.keys_per_client)]
    final, _ = settle_final(parts, keys)
    result = check(history, final)
    phase_table(history, phases)
    convs = [ph["convergence_s"] for ph in phases[1:] if ph["convergence_s"] is not None]
    not_converged = sum(ph["convergence_s"] is None for ph in phases[1:])
    anomalies, lost, resurrected = result["anomalies"], result["lost"], result["resurrected"]
    unanswered, divergent = result["unanswered"], result["divergent"]
    log(f"\nquorum phase: operations: {len(history.ops)}; lost acknowledged writes: {len(lost)}; resurrected "
        f"deleted keys: {len(resurrected)}; causal anomalies: {len(anomalies)} (siblings: {result['siblings']}); "
        f"replicas disagreeing at the end: {len(divergent)}; final reads unanswered: {len(unanswered)}")
    if convs:
        log(f"quorum phase: convergence after heal: max {max(convs):.3f} s over {len(convs)} heals; "
            f"not converged: {not_converged}")
    quorum_failed = report_quorum(history, result, " (quorum phase)")
    for op in anomalies[:10]:
        log(f"  anomaly: {op}")
    for item in lost[:10] + resurrected[:10] + unanswered[:10] + divergent[:10]:
        log(f"  lost/resurrected/unanswered/divergent: {item}")
    crashed = [cl.error for cl in clients if cl.error]
    if crashed:
        log(f"quorum workload clients that crashed: {crashed}")
    nodes.stop_all()
    log(f"quorum phase took {time.time() - t_start:.1f} s")
    failed = bool(lost or resurrected or anomalies or divergent or unanswered or not_converged or crashed
                  or quorum_failed or (convs and max(convs) > CONVERGENCE_BOUND))
    summary = {"phases": [ph["name"] for ph in phases], "ops": len(history.ops), "lost": len(lost),
               "resurrected": len(resurrected), "anomalies": len(anomalies), "divergent": len(divergent),
               "unanswered": len(unanswered), "convergence": convs, "counts": quorum_counts(history),
               "violations": len(result["quorum_violations"]), "checked": result["quorum_checked"],
               "siblings": result["quorum_siblings"]}
    return failed, summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--keys-per-client", type=int, default=4)
    ap.add_argument("--delete-fraction", type=float, default=0.15,
                    help="share of the writes that are deletes of one of the client's own keys")
    ap.add_argument("--fault-seconds", type=float, default=8)
    ap.add_argument("--heal-seconds", type=float, default=6)
    ap.add_argument("--quorum-fraction", type=float, default=0.2,
                    help="share of the main run's operations sent at w=quorum / r=quorum (0: none)")
    ap.add_argument("--quorum-seconds", type=float, default=21,
                    help="length of the quorum phase's workload, on its own K=--quorum-k cluster (0: no phase)")
    ap.add_argument("--quorum-nodes", type=int, default=6)
    ap.add_argument("--quorum-k", type=int, default=3)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "kvs"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--history", default=None, help="write every recorded operation to this JSON file")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--time-limit", type=float, default=900)
    ap.add_argument("--self-test", action="store_true", help="only check the checker on made-up histories")
    args = ap.parse_args()
    if not 0 <= args.delete_fraction <= 1:
        ap.error("--delete-fraction must be between 0 and 1")
    if not 0 <= args.quorum_fraction <= 1:
        ap.error("--quorum-fraction must be between 0 and 1")
    if args.quorum_seconds < 0 or (args.quorum_seconds and not 1 <= args.quorum_k <= args.quorum_nodes):
        ap.error("--quorum-seconds must be 0 or more, and --quorum-k between 1 and --quorum-nodes")
    self_test()
    if args.self_test:
        return
    if os.geteuid() != 0:
        sys.exit("nemesis needs root (ip netns, iptables)")
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} does not exist: cargo build --release first (or --binary)")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    log(f"nemesis: seed {seed}, {args.nodes} nodes, K={args.k}, {args.clients} clients "
        f"(deletes: {args.delete_fraction:.0%} of writes; at quorum: {args.quorum_fraction:.0%} of operations); "
        f"quorum phase: " + (f"{args.quorum_seconds:g} s, {args.quorum_nodes} nodes, K={args.quorum_k}"
                             if args.quorum_seconds else "off") + f"; binary {args.binary}")

    deadline = time.time() + args.time_limit
    tmp = tempfile.mkdtemp(prefix="kvs-nemesis-")
    spares = [args.nodes + 1, args.nodes + 2]
    net = Net(max(args.nodes + len(spares), args.quorum_nodes if args.quorum_seconds else 0))
    nodes = Nodes(args.nodes, args.k, args.binary, tmp)
    # Every cluster started, for the cleanup (the quorum phase adds its own).
    clusters = [nodes]
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
        everyone = range(1, args.nodes + len(spares) + 1)

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
                          random.Random(rng.randrange(1 << 30)), stop, args.delete_fraction, args.quorum_fraction)
                   for c in range(args.clients)]
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
        final, differ = settle_final(parts, keys)
        t_check = time.time()
        result = check(history, final)
        anomalies, lost, resurrected = result["anomalies"], result["lost"], result["resurrected"]
        unanswered, divergent = result["unanswered"], result["divergent"]
        log(f"history checked in {time.time() - t_check:.2f} s")

        names = [ph["name"] for ph in phases]
        phase_table(history, phases)
        convs = [ph["convergence_s"] for ph in phases[1:] if ph["convergence_s"] is not None]
        not_converged = sum(ph["convergence_s"] is None for ph in phases[1:])
        deletes = [o for o in history.ops if o["f"] == "delete"]
        counts = {k: sum(o["outcome"] == k for o in deletes) for k in ("ok", "absent", "fail", "unknown")}
        log(f"\noperations: {len(history.ops)}; puts acknowledged: "
            f"{sum(1 for w in history.writes.values() if w['outcome'] == 'ok' and not w.get('delete'))}")
        log(f"deletes: {len(deletes)} issued, {counts['ok']} ok (200), {counts['absent']} 404 (nothing to "
            f"delete), {counts['fail']} failed, {counts['unknown']} unknown; keys whose last acknowledged "
            f"operation is a delete (must read 404 everywhere): {len(result['deleted_keys'])}")
        log(f"lost acknowledged writes: {len(lost)}")
        log(f"resurrected deleted keys: {len(resurrected)}")
        log(f"causal anomalies: {len(anomalies)} (reads of concurrent unacknowledged siblings: "
            f"{result['siblings']}; 404s checked against a covered write: {result['checked_404s']}, "
            f"values read after a covered delete: {result['checked_after_delete']})")
        log(f"replicas disagreeing at the end: {len(divergent)} keys (final concurrent siblings: "
            f"{result['final_siblings']}); final reads unanswered: {len(unanswered)}")
        if convs:
            log(f"convergence after heal: p50 {percentile(convs, 0.5):.3f} s, p99 {percentile(convs, 0.99):.3f} s, "
                f"max {max(convs):.3f} s over {len(convs)} heals; not converged: {not_converged}")
        quorum_failed = report_quorum(history, result, "") if args.quorum_fraction else False
        for op in anomalies[:10]:
            log(f"  anomaly: {op}")
        for item in lost[:10]:
            log(f"  lost: key {item[0]} at node {item[1]}: final seq {item[2]} (0: 404), "
                f"last acknowledged {item[3]}")
        for item in resurrected[:10]:
            log(f"  resurrected: key {item[0]} at node {item[1]}: final seq {item[2]}, "
                f"deleted by acknowledged delete {item[3]}")
        for item in unanswered[:10]:
            log(f"  unanswered: key {item[0]} at node {item[1]}")
        for item in divergent[:10]:
            log(f"  divergent: {item}")
        crashed = [c.error for c in clients if c.error]
        if crashed:
            log(f"workload clients that crashed: {crashed}")
        # Deletes that never took effect would leave the delete checks vacuous.
        no_deletes = args.delete_fraction > 0 and not counts["ok"]
        if no_deletes:
            log("no delete answered 200: the delete workload was not exercised")
        main_failed = bool(lost or resurrected or anomalies or divergent or unanswered or not_converged or crashed
                           or no_deletes or quorum_failed or (convs and max(convs) > CONVERGENCE_BOUND))
        if args.history:
            with open(args.history, "w") as f:
                json.dump(history.ops, f)
        # The main cluster is done: the quorum phase starts its own in the same namespaces.
        nodes.stop_all()
        q_failed, q_summary = (quorum_phase(args, rng, net, tmp, deadline, clusters) if args.quorum_seconds
                               else (False, None))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"seed": seed, "phases": phases, "names": names, "lost": len(lost),
                           "resurrected": len(resurrected), "anomalies": len(anomalies),
                           "siblings": result["siblings"], "divergent": len(divergent),
                           "unanswered": len(unanswered), "final_siblings": result["final_siblings"],
                           "deletes": dict(counts, issued=len(deletes)),
                           "convergence": convs, "ops": len(history.ops),
                           "quorum": dict(quorum_counts(history), violations=len(result["quorum_violations"]),
                                          checked=result["quorum_checked"], siblings=result["quorum_siblings"]),
                           "quorum_phase": q_summary}, f, indent=1)
        failed = main_failed or q_failed
        log("RESULT: " + ("FAIL" if failed else "PASS") + f" (seed {seed})"
            + (" (the main run failed)" if main_failed else "") + (" (the quorum phase failed)" if q_failed else ""))
    except KeyboardInterrupt:
        log(f"interrupted ({interrupted or 'Ctrl-C'})")
    finally:
        stop.set()
        for cluster in clusters:
            cluster.stop_all()
        net.teardown()
        if failed or args.keep:
            log(f"node logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
