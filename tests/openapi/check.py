#!/usr/bin/env python3
"""The own API's OpenAPI description (`api/openapi.yaml`) against the code and a live node.

1. **Valid**: the file is OpenAPI 3.1.0 and passes `openapi-spec-validator`.
2. **Complete**: its operations are exactly the endpoints the server has. The table
   `V1_ENDPOINTS` below names each endpoint of `src/api/v1/mod.rs` by its metric name
   (`Endpoint::name`) and `HTTP_LAYER` each route of `src/http/mod.rs`'s router; both
   tables are checked against the source (every name `Endpoint::name` returns, every
   `.route(...)`), and the spec's paths and methods against the tables. Then, on the
   live node, every operation of the spec must be served (not 405, not "no such
   endpoint") and every other common method on its path refused (405; `/`: 404).
3. **Conformant**: schemathesis runs against one live node (`kvs serve --memory`, K=1,
   VIEW of itself, on a loopback address: 127.77.126.1:8080 by default), bounded in
   examples per operation and in time, with the checks of `schemathesis.toml` beside
   this file: not_a_server_error, status_code_conformance, content_type_conformance,
   response_schema_conformance, negative_data_rejection and unsupported_method.

The admin operations (add, remove, reshard, replace the view) are tested too, but only
on their refusal paths: the node gets a random ADMIN_TOKEN that schemathesis never
sees, and `v1/mod.rs` parses a request (400) and checks its credential (401) before it
changes anything, so no generated request can change the membership or make the node
call an address schemathesis made up. After the run the script checks that this held:
the node's own request counters (`/metrics`) show the admin endpoints answered nothing
but 400, 401 (or the body gate's 408/413), and its view (epoch, members) is unchanged.

The node is always stopped (only the process this script started), every wait is
bounded and so is the whole run (--budget). Exits 0 when everything holds, 1 otherwise.
Needs the packages of `tests/openapi/requirements.txt` (`.ci/run` installs them in a
virtualenv):

    cargo build --release
    python3 -m venv target/openapi-venv
    target/openapi-venv/bin/pip install -r tests/openapi/requirements.txt
    target/openapi-venv/bin/python tests/openapi/check.py [--max-examples 25]
"""

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = os.path.join(REPO, "api", "openapi.yaml")

# The endpoints of `src/api/v1/mod.rs`, by the name `Endpoint::name` gives each variant
# (the `endpoint` label of the request metrics): method and path as the spec writes it.
V1_ENDPOINTS = {
    "get": ("GET", "/api/v1/kv/{key}"),
    "put": ("PUT", "/api/v1/kv/{key}"),
    "delete": ("DELETE", "/api/v1/kv/{key}"),
    "list": ("GET", "/api/v1/kv"),
    "members": ("GET", "/api/v1/members"),
    "add_member": ("POST", "/api/v1/members"),
    "remove_member": ("DELETE", "/api/v1/members/{addr}"),
    "partitions": ("GET", "/api/v1/partitions"),
    "layout": ("GET", "/api/v1/layout"),
    "reshard": ("POST", "/api/v1/reshard"),
    "replace_view": ("PUT", "/api/v1/view"),
}
ADMIN_ENDPOINTS = {"add_member", "remove_member", "reshard", "replace_view"}

# The routes of `src/http/mod.rs`'s router, by the first argument of `.route(...)`:
# method and path, or None for a route that is not part of the client API.
HTTP_LAYER = {
    ("STATUS_PATH", "get"): ("GET", "/api/v1/status"),
    ("METRICS_PATH", "get"): ("GET", "/metrics"),
    ('"/"', "get"): ("GET", "/"),
    ("rpc::RPC_PATH", "post"): None,  # node-to-node calls (postcard, member proof)
    ("rpc::stream::STREAM_PATH", "get"): None,  # a peer's stream (upgrade, member proof)
}

LAYER_PATHS = {op[1] for op in HTTP_LAYER.values() if op}

# A concrete request path for each path template, for the live probe.
PROBE_PATHS = {
    "/api/v1/kv/{key}": "/api/v1/kv/openapi-probe",
    "/api/v1/members/{addr}": "/api/v1/members/127.77.126.254:9",
}
PROBE_METHODS = ("GET", "PUT", "POST", "DELETE", "PATCH")

# schemathesis's checks and per-operation settings.
ST_CONFIG = os.path.join(REPO, "tests", "openapi", "schemathesis.toml")
# Statuses the admin endpoints may answer in this setup.
ADMIN_REFUSALS = {"400", "401", "408", "413"}

# No proxy for loopback calls, whatever the environment says.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class Failure(Exception):
    pass


class Budget(BaseException):
    """The whole run's time is up (not an Exception, so no wait mistakes it for "not yet")."""


def on_alarm(signum, frame):
    raise Budget("the whole run exceeded its time budget")


def read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------- 1. valid


def load_and_validate():
    import yaml
    from openapi_spec_validator import validate

    with open(SPEC, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    if spec.get("openapi") != "3.1.0":
        raise Failure(f"{SPEC}: openapi is {spec.get('openapi')!r}, not 3.1.0")
    validate(spec)
    n = sum(1 for p in spec["paths"].values() for m in p if m in ("get", "put", "post", "delete", "patch"))
    log(f"valid: {os.path.relpath(SPEC, REPO)} is OpenAPI 3.1.0 with {len(spec['paths'])} paths, {n} operations")
    return spec


# ---------------------------------------------------------------- 2. complete


def spec_operations(spec):
    ops = set()
    for path, item in spec["paths"].items():
        for method in item:
            if method in ("get", "put", "post", "delete", "patch", "head", "options", "trace"):
                ops.add((method.upper(), path))
    return ops


def check_tables_against_source():
    v1 = read("src/api/v1/mod.rs")
    body = re.search(r"fn name\(&self\) -> &'static str \{(.*?)\n    \}", v1, re.S)
    if not body:
        raise Failure("src/api/v1/mod.rs: cannot find Endpoint::name (update check.py with the code)")
    names = set(re.findall(r'Endpoint::\w+(?:\(_\))?\s*=>\s*"(\w+)"', body.group(1)))
    variants = re.search(r"enum Endpoint \{(.*?)\}", v1, re.S)
    n_variants = len(re.findall(r"^\s*\w+(?:\(\w+\))?,", variants.group(1), re.M)) if variants else -1
    if not names or n_variants != len(names):
        raise Failure(f"src/api/v1/mod.rs: {n_variants} Endpoint variants but {len(names)} names in Endpoint::name: {sorted(names)}")
    if names != set(V1_ENDPOINTS):
        raise Failure(
            "src/api/v1/mod.rs's endpoints differ from check.py's table: "
            f"only in the code {sorted(names - set(V1_ENDPOINTS))}, only in the table {sorted(set(V1_ENDPOINTS) - names)}"
        )
    http = read("src/http/mod.rs")
    router = re.search(r"pub fn router\(.*?\n\}", http, re.S)
    routes = set(re.findall(r"\.route\(\s*([^,]+?)\s*,\s*(get|post|put|delete|patch)\(", router.group(0) if router else ""))
    if routes != set(HTTP_LAYER):
        raise Failure(
            "src/http/mod.rs's router differs from check.py's table: "
            f"only in the code {sorted(routes - set(HTTP_LAYER))}, only in the table {sorted(set(HTTP_LAYER) - routes)}"
        )
    # The paths the table gives the constants must be the code's.
    consts = dict(re.findall(r'pub const (\w+_PATH): &str = "([^"]*)";', http))
    for (const, _), op in HTTP_LAYER.items():
        if op and const in consts and consts[const] != op[1]:
            raise Failure(f"src/http/mod.rs: {const} is {consts[const]!r}, the table says {op[1]!r}")
    log(f"complete: the tables match the code ({len(names)} endpoints in src/api/v1/mod.rs, {len(routes)} routes in src/http/mod.rs)")


def check_spec_against_tables(spec):
    wanted = set(V1_ENDPOINTS.values()) | {op for op in HTTP_LAYER.values() if op}
    got = spec_operations(spec)
    if got != wanted:
        raise Failure(
            "api/openapi.yaml's operations differ from the server's: "
            f"missing {sorted(wanted - got)}, not served {sorted(got - wanted)}"
        )
    log(f"complete: the spec's {len(got)} operations are exactly the server's")


def call(base, method, path, body=None, headers=None, timeout=10):
    """One request: (status, headers, body bytes); HTTP errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with HTTP.open(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def check_live_routes(spec, base):
    """Every operation of the spec is served, every other method on its path refused."""
    served = spec_operations(spec)
    for path in spec["paths"]:
        concrete = PROBE_PATHS.get(path, path)
        if "{" in concrete:
            raise Failure(f"check.py: no probe path for {path}")
        for method in PROBE_METHODS:
            # Bodies are empty: admin operations answer 400 (no body) or 401, nothing changes.
            status, headers, raw = call(base, method, concrete)
            no_endpoint = status == 404 and b"no such endpoint" in raw
            if (method, path) in served:
                if status == 405 or no_endpoint:
                    raise Failure(f"{method} {concrete}: the spec lists it but the server answers {status} {raw[:200]!r}")
                continue
            if not (status == 405 or (path == "/" and no_endpoint)):
                raise Failure(f"{method} {concrete}: answered {status}, but the spec does not list {method} {path}")
            if status == 405:
                # RFC 9110: a 405 names the methods the resource takes (the HTTP layer's
                # routes take HEAD as well, answered like GET without a body).
                allow = {m.strip() for m in (headers.get("Allow") or "").split(",") if m.strip()}
                wanted = {m for m, p in served if p == path}
                if path in LAYER_PATHS:
                    wanted.add("HEAD")
                if allow != wanted:
                    raise Failure(f"{method} {concrete}: 405 with Allow {sorted(allow)}, the spec says {sorted(wanted)}")
    log(f"complete: the live node serves every operation of the spec and refuses the other methods of "
        f"{len(spec['paths'])} paths (405s name the right methods in Allow)")


# ---------------------------------------------------------------- 3. conformant


class Node:
    def __init__(self, binary, addr, workdir):
        self.binary = binary
        self.addr = addr
        self.base = f"http://{addr}"
        self.log_path = os.path.join(workdir, "node.log")
        self.admin_token = secrets.token_urlsafe(32)
        self.proc = None

    def start(self):
        host, port = self.addr.rsplit(":", 1)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, int(port)))
            except OSError as e:
                raise Failure(f"cannot bind {self.addr} ({e}): is something else using it? (--addr)")
        env = {k: v for k, v in os.environ.items() if k not in (
            "VIEW", "K", "IPPORT", "SOCKET_ADDRESS", "SHARD_COUNT", "ADDRESS", "REPL_FACTOR",
            "ADMIN_TOKEN", "CLUSTER_SECRET", "DATA_DIR", "LISTEN", "R", "W")}
        env.update({"K": "1", "VIEW": self.addr, "IPPORT": self.addr, "ADMIN_TOKEN": self.admin_token,
                    "RUST_LOG": env.get("RUST_LOG", "info")})
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([self.binary, "serve", "--memory"], env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT)
        log(f"started a node (K=1, in memory, ADMIN_TOKEN set) on {self.addr}, pid {self.proc.pid}")

    def status(self):
        status, _, raw = call(self.base, "GET", "/api/v1/status", timeout=2)
        if status != 200:
            raise Failure(f"/api/v1/status answered {status}")
        return json.loads(raw)

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Failure(f"the node exited with {self.proc.returncode} while starting\n{self.tail()}")
            try:
                s = self.status()
                if s.get("ready") and (s.get("view") or {}).get("members") == [self.addr]:
                    return s
                last = f"not ready yet: {s.get('ready')}, {s.get('view')}"
            except (OSError, ValueError, Failure) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.2)
        raise Failure(f"the node was not ready within {timeout} s ({last})\n{self.tail()}")

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        log(f"stopped the node (pid {self.proc.pid}, exit {self.proc.returncode})")

    def tail(self, lines=20):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"


def schemathesis_command():
    st = os.path.join(os.path.dirname(sys.executable), "st")
    if os.access(st, os.X_OK):
        return [st]
    return [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())"]


def run_schemathesis(node, args, workdir):
    cmd = schemathesis_command() + [
        "--config-file", ST_CONFIG,
        "run", SPEC,
        "--url", node.base,
        "--max-examples", str(args.max_examples),
        "--seed", str(args.seed),
        "--workers", "1",
        "--request-timeout", "10",
        "--generation-database", "none",
        "--phases", "examples,coverage,fuzzing",
        "--no-color",
    ]
    log("running: " + " ".join(cmd[len(schemathesis_command()):]))
    # Its own process group: on a timeout it and anything it started are stopped together.
    proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, NO_PROXY="*", no_proxy="*", SCHEMATHESIS_TELEMETRY="false"))
    try:
        proc.wait(timeout=args.st_timeout)
    except subprocess.TimeoutExpired:
        raise Failure(f"schemathesis did not finish within {args.st_timeout} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    return proc.returncode


def metric_counts(node):
    """`kvs_http_requests_total` of the v1 dialect: {endpoint: {status: count}}."""
    status, _, raw = call(node.base, "GET", "/metrics")
    if status != 200:
        raise Failure(f"/metrics answered {status}")
    counts = {}
    for line in raw.decode().splitlines():
        if not line.startswith("kvs_http_requests_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        if labels.get("dialect") != "v1":
            continue
        value = float(line.rsplit(" ", 1)[1])
        by_status = counts.setdefault(labels["endpoint"], {})
        by_status[labels["status"]] = by_status.get(labels["status"], 0) + int(value)
    return counts


def check_every_endpoint_exercised(before, after):
    """Every endpoint got requests from schemathesis (counted by the node itself)."""
    sent = {name: sum(after.get(name, {}).values()) - sum(before.get(name, {}).values()) for name in V1_ENDPOINTS}
    untested = sorted(name for name, n in sent.items() if n <= 0)
    if untested:
        raise Failure(f"schemathesis sent no request to the endpoints {untested}")


def check_nothing_changed(node, before, counts):
    for endpoint in sorted(ADMIN_ENDPOINTS):
        answered = counts.get(endpoint, {})
        other = {s: n for s, n in answered.items() if s not in ADMIN_REFUSALS}
        if other:
            raise Failure(f"admin endpoint {endpoint} answered {other}: it must only refuse in this test")
    after = node.status()
    b, a = before.get("view") or {}, after.get("view") or {}
    if (b.get("epoch"), b.get("members")) != (a.get("epoch"), a.get("members")) or after.get("transition"):
        raise Failure(f"the view changed during the run: {b} -> {a}, transition {after.get('transition')}")
    log(f"admin endpoints only refused ({', '.join(f'{e}: {counts.get(e, {})}' for e in sorted(ADMIN_ENDPOINTS))}); "
        f"view unchanged (epoch {a.get('epoch')}, members {a.get('members')})")


# ---------------------------------------------------------------- main


def run(args, workdir):
    spec = load_and_validate()
    check_tables_against_source()
    check_spec_against_tables(spec)
    node = Node(args.kvs, args.addr, workdir)
    try:
        node.start()
        before = node.wait_ready()
        check_live_routes(spec, node.base)
        counts_before = metric_counts(node)
        t = time.monotonic()
        code = run_schemathesis(node, args, workdir)
        log(f"schemathesis exited with {code} after {time.monotonic() - t:.1f} s")
        if node.proc.poll() is not None:
            raise Failure(f"the node died during the run (exit {node.proc.returncode})\n{node.tail()}")
        counts = metric_counts(node)
        log("requests the node answered (the probe's and schemathesis's), by endpoint and status: "
            + "; ".join(f"{e} {dict(sorted(s.items()))}" for e, s in sorted(counts.items())))
        check_every_endpoint_exercised(counts_before, counts)
        check_nothing_changed(node, before, counts)
        if code != 0:
            raise Failure(f"schemathesis found failures (exit {code}); see its report above")
    finally:
        node.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kvs", nargs="?", default=os.path.join(REPO, "target", "release", "kvs"),
                    help="the kvs binary (default: target/release/kvs)")
    ap.add_argument("--addr", default="127.77.126.1:8080", help="the node's ip:port (loopback only)")
    ap.add_argument("--max-examples", type=int, default=25, help="schemathesis's test cases per operation and phase")
    ap.add_argument("--seed", type=int, default=1, help="schemathesis's random seed (a run is repeatable)")
    ap.add_argument("--st-timeout", type=int, default=180, help="seconds schemathesis may take")
    ap.add_argument("--budget", type=int, default=300, help="seconds for the whole run")
    args = ap.parse_args()
    if not args.addr.startswith("127."):
        sys.exit("openapi check: --addr must be a loopback address (127.x.y.z:port)")
    if not os.access(args.kvs, os.X_OK):
        sys.exit(f"openapi check: no kvs binary at {args.kvs} (cargo build --release first)")
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.budget)
    workdir = tempfile.mkdtemp(prefix="kvs-openapi-")
    try:
        run(args, workdir)
    except (Failure, Budget) as e:
        signal.alarm(0)
        print(f"openapi check FAILED after {time.monotonic() - T0:.1f} s: {e}\n(node log in {workdir})", file=sys.stderr)
        sys.exit(1)
    signal.alarm(0)
    shutil.rmtree(workdir, ignore_errors=True)
    log(f"openapi check passed in {time.monotonic() - T0:.1f} s")


if __name__ == "__main__":
    main()
