#!/usr/bin/env python3
"""The status page (`GET /`) in a real headless browser.

Starts a 4-node K=2 cluster of the given `kvs` binary on loopback (127.77.122.1-4 by
default, in memory), starts Debian's `chromium` headless with a DevTools port, loads
`http://<node 1>/`, and checks through the DevTools protocol that:

1. the page shows all 4 members `up` and both partitions, and refreshes itself
   (`#updated` changes); screenshot `target/status-page.png`;
2. after one node is killed (SIGKILL of that process only), the SAME page, not
   reloaded, shows that member `down` and its partition with one live replica;
   screenshot `target/status-page-node-down.png`;
3. the page threw no JavaScript exception and requested nothing from another origin.

Everything it starts (nodes, browser) is stopped in all cases. Every wait is bounded,
and so is the whole run (--budget, 180 s). Exits 0 on success, 1 with a message naming
what was expected and what the page showed otherwise.

Python's standard library only: the DevTools WebSocket is spoken by the small client
below (text frames, masking, ping/pong, fragmentation; nothing else is needed).

    cargo build --release && python3 tests/browser/status_page.py [target/release/kvs]
"""

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


# ---------------------------------------------------------------- HTTP helpers


def get_json(url, timeout=1.0):
    with HTTP.open(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def wait_for(what, predicate, timeout, interval=0.25):
    """Polls `predicate` (returning a truthy result or None) until it holds; raises
    Failure naming `what` and the last thing it saw otherwise."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Failure:
            raise
        except Exception as e:  # noqa: BLE001 - any other error is "not yet"
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise Failure(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last})" if last else ""))
        time.sleep(interval)


# ---------------------------------------------------------------- the cluster


class Cluster:
    def __init__(self, binary, net, port, workdir):
        self.binary = binary
        self.addrs = [f"{net}.{h}:{port}" for h in range(1, 5)]
        self.workdir = workdir
        self.procs = {}
        self.logs = {}

    def start(self):
        for addr in self.addrs:
            host, port = addr.rsplit(":", 1)
            # A process left from an earlier run (or someone else's) would answer for ours.
            with socket.socket() as s:
                # As the node itself binds: connections of an earlier run lingering in
                # TIME_WAIT do not count, a listener does.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((host, int(port)))
                except OSError as e:
                    raise Failure(f"cannot bind {addr} ({e}): is something else using it? (--net)")
        env = {k: v for k, v in os.environ.items() if k not in (
            "VIEW", "K", "IPPORT", "SOCKET_ADDRESS", "SHARD_COUNT", "ADDRESS", "REPL_FACTOR",
            "ADMIN_TOKEN", "CLUSTER_SECRET", "DATA_DIR", "LISTEN")}
        env.update({"K": "2", "VIEW": ",".join(self.addrs), "RUST_LOG": env.get("RUST_LOG", "info")})
        for addr in self.addrs:
            path = os.path.join(self.workdir, addr.replace(":", "_") + ".log")
            self.logs[addr] = path
            out = open(path, "ab")
            self.procs[addr] = subprocess.Popen(
                [self.binary, "serve", "--memory"],
                env=dict(env, IPPORT=addr),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            out.close()
        log(f"started 4 nodes (K=2, in memory): {', '.join(self.addrs)}")

    def wait_ready(self, timeout):
        def ready():
            for addr, p in self.procs.items():
                if p.poll() is not None:
                    raise Failure(f"node {addr} exited with {p.returncode} while starting\n{self.tail(addr)}")
            for addr in self.addrs:
                s = get_json(f"http://{addr}/api/v1/status")
                view = s.get("view") or {}
                if not s.get("ready") or sorted(view.get("members", [])) != sorted(self.addrs):
                    return None
                if len(view.get("partitions", [])) != 2:
                    return None
            return True
        wait_for("every node to be ready with 4 members in 2 partitions", ready, timeout)

    def write_keys(self, n):
        """Writes n keys through node 1 (forwarded to their partitions), so the page has
        key counts to show."""
        for i in range(n):
            req = urllib.request.Request(f"http://{self.addrs[0]}/kv-store/page_test_{i}",
                                         data=f"val=v{i}".encode(), method="PUT",
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
            with HTTP.open(req, timeout=5) as r:
                if r.status not in (200, 201):
                    raise Failure(f"writing key {i} through {self.addrs[0]} answered {r.status}")
        log(f"wrote {n} keys through {self.addrs[0]}")

    def kill(self, addr):
        p = self.procs[addr]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        log(f"killed {addr} (pid {p.pid}, SIGKILL)")

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)

    def tail(self, addr, lines=15):
        try:
            with open(self.logs[addr], errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"


# ---------------------------------------------------------------- DevTools


class DevTools:
    """A DevTools protocol session over a WebSocket (RFC 6455, client side)."""

    def __init__(self, ws_url, timeout=10):
        u = urllib.parse.urlparse(ws_url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((
            f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise Failure("the browser closed the DevTools connection during the handshake")
            head += chunk
        head, self.buf = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise Failure(f"DevTools WebSocket handshake refused: {head.decode(errors='replace')}")
        self.next_id = 0
        self.events = []

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise Failure("the browser closed the DevTools connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _send_frame(self, opcode, payload):
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big") if n else b""
        self.sock.sendall(head + mask + masked)

    def _message(self):
        parts = []
        while True:
            b0, b1 = self._read(2)
            fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
                continue
            if opcode == 0xA:  # pong
                continue
            if opcode == 0x8:
                raise Failure("the browser closed the DevTools connection")
            parts.append(payload)
            if fin:
                return json.loads(b"".join(parts).decode())

    def call(self, method, timeout=15, **params):
        self.next_id += 1
        mid = self.next_id
        self._send_frame(0x1, json.dumps({"id": mid, "method": method, "params": params}).encode())
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"DevTools {method} got no answer within {timeout} s")
            self.sock.settimeout(left)
            try:
                msg = self._message()
            except socket.timeout:
                raise Failure(f"DevTools {method} got no answer within {timeout} s") from None
            if msg.get("id") == mid:
                if "error" in msg:
                    raise Failure(f"DevTools {method} failed: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def evaluate(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise Failure(f"evaluating in the page failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def find_chromium(given):
    for name in ([given] if given else []) + ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name)
        if path:
            return path
    raise Failure("no chromium found (Debian: apt-get install chromium), or pass --chromium")


class Browser:
    def __init__(self, exe, workdir):
        self.profile = os.path.join(workdir, "chromium-profile")
        os.makedirs(self.profile)
        self.log_path = os.path.join(workdir, "chromium.log")
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "--no-first-run", "--no-default-browser-check",
             "--no-proxy-server", "--disable-extensions", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--mute-audio",
             "--hide-scrollbars", "--window-size=1280,900", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        self.session = None

    def connect(self, timeout):
        port_file = os.path.join(self.profile, "DevToolsActivePort")

        def port():
            if self.proc.poll() is not None:
                raise Failure(f"chromium exited with {self.proc.returncode}:\n{self.tail()}")
            with open(port_file) as f:
                lines = f.read().split("\n")
            return int(lines[0]) if lines and lines[0].strip() else None
        p = wait_for("chromium's DevTools port", port, timeout, interval=0.1)

        def page_target():
            targets = get_json(f"http://127.0.0.1:{p}/json/list")
            pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
            return pages[0] if pages else None
        target = wait_for("a page target in chromium", page_target, timeout)
        self.session = DevTools(target["webSocketDebuggerUrl"])
        return self.session

    def stop(self):
        if self.session:
            self.session.close()
        if self.proc.poll() is None:
            # Its own process group: the renderer and GPU helpers it started go too.
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)

    def tail(self, lines=20):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"


# ---------------------------------------------------------------- the page

# What the test reads of the page: every member with its health, every partition with
# its live replicas, the refresh counter, the error banner.
READ_DOM = """JSON.stringify({
  members: Array.from(document.querySelectorAll('[data-member]')).map(e => [e.dataset.member, e.dataset.health]),
  partitions: Array.from(document.querySelectorAll('[data-partition]')).map(e => [e.dataset.partition, e.dataset.live, e.dataset.state]),
  refreshes: Number((document.getElementById('updated') || {dataset: {}}).dataset.refreshes || 0),
  updated: (document.getElementById('updated') || {}).textContent,
  error: (document.getElementById('error') || {}).hidden === false ? document.getElementById('error').textContent : null,
  marker: window.__statusPageTestMarker || null,
})"""


def read_dom(dt):
    return json.loads(dt.evaluate(READ_DOM))


def screenshot(dt, path):
    metrics = dt.call("Page.getLayoutMetrics")
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    height = max(300, min(4000, int(size["height"])))
    r = dt.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1})
    data = base64.b64decode(r["data"])
    if not data.startswith(b"\x89PNG"):
        raise Failure(f"the screenshot for {path} is not a PNG")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    log(f"screenshot {os.path.relpath(path, REPO)} ({len(data)} bytes, 1280x{height})")


def run(args, workdir):
    cluster = Cluster(args.kvs, args.net, args.port, workdir)
    browser = None
    try:
        cluster.start()
        cluster.wait_ready(timeout=30)
        log("cluster ready: 4 members, 2 partitions")
        cluster.write_keys(200)
        browser = Browser(find_chromium(args.chromium), workdir)
        dt = browser.connect(timeout=30)
        dt.call("Runtime.enable")
        dt.call("Network.enable")
        dt.call("Page.enable")
        dt.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        origin = f"http://{cluster.addrs[0]}"
        url = origin + "/"
        nav = dt.call("Page.navigate", url=url)
        if nav.get("errorText"):
            raise Failure(f"loading {url} failed: {nav['errorText']}")
        log(f"chromium loaded {url}")
        everyone = sorted(cluster.addrs)

        def all_up():
            d = read_dom(dt)
            members = dict(d["members"])
            if len(d["members"]) != 4 or sorted(members) != everyone:
                return None
            if any(h != "up" for h in members.values()):
                return None
            if sorted(p[0] for p in d["partitions"]) != ["0", "1"] or any(p[1] != "2" for p in d["partitions"]):
                return None
            return d if d["refreshes"] >= 2 else None
        try:
            first = wait_for("the page to show 4 members up and 2 partitions with 2 live replicas each", all_up, 30)
        except Failure as e:
            raise Failure(f"{e}\n  the page showed: {read_dom(dt)}") from None
        log(f"page shows {len(first['members'])} members up, partitions {[p[0] for p in first['partitions']]}, "
            f"{first['refreshes']} refreshes (updated {first['updated']})")
        # Marks this document: a reload would lose it.
        dt.evaluate("window.__statusPageTestMarker = 'loaded-once'; true")
        time.sleep(1.6)  # one more refresh, so the screenshot shows settled data
        screenshot(dt, os.path.join(args.out, "status-page.png"))

        victim = cluster.addrs[-1]
        before = read_dom(dt)["refreshes"]
        cluster.kill(victim)
        t_kill = time.monotonic()

        def shows_down():
            d = read_dom(dt)
            if d["marker"] != "loaded-once":
                raise Failure("the page was reloaded (the test's marker is gone)")
            members = dict(d["members"])
            if members.get(victim) != "down" or sorted(members) != everyone:
                return None
            if any(members[a] != "up" for a in everyone if a != victim):
                return None
            lives = {p[0]: p[1] for p in d["partitions"]}
            if lives.get("1") != "1" or lives.get("0") != "2":
                return None
            return d if d["refreshes"] > before else None
        try:
            after = wait_for(f"the same page to show {victim} down (and partition 1 with 1 live replica)", shows_down, 30)
        except Failure as e:
            raise Failure(f"{e}\n  the page showed: {read_dom(dt)}") from None
        log(f"page shows {victim} down {time.monotonic() - t_kill:.1f} s after the kill, without a reload "
            f"(refreshes {before} -> {after['refreshes']}); partitions {after['partitions']}")
        time.sleep(1.6)
        screenshot(dt, os.path.join(args.out, "status-page-node-down.png"))

        # Nothing the page did went anywhere but its own node, and nothing threw.
        exceptions = [e for e in dt.events if e["method"] == "Runtime.exceptionThrown"]
        if exceptions:
            raise Failure(f"the page threw: {exceptions[0]['params']['exceptionDetails']}")
        urls = sorted({e["params"]["request"]["url"] for e in dt.events if e["method"] == "Network.requestWillBeSent"})
        foreign = [u for u in urls if not (u.startswith(origin + "/") or u.startswith("data:"))]
        if foreign:
            raise Failure(f"the page requested other origins: {foreign}")
        log(f"no JavaScript exceptions; the page requested only {', '.join(urllib.parse.urlparse(u).path for u in urls)}")
    except Failure:
        for addr in cluster.addrs:
            if addr in cluster.logs:
                print(f"--- last lines of {addr}'s log:\n{cluster.tail(addr, 8)}", file=sys.stderr)
        raise
    finally:
        if browser:
            browser.stop()
        cluster.stop()
        log("stopped the browser and the cluster")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kvs", nargs="?", default=os.path.join(REPO, "target", "release", "kvs"),
                    help="the kvs binary (default: target/release/kvs)")
    ap.add_argument("--chromium", help="the browser (default: chromium on the PATH)")
    ap.add_argument("--net", default="127.77.122", help="the nodes' addresses are NET.1-4 (loopback only)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--out", default=os.path.join(REPO, "target"), help="where the screenshots go")
    ap.add_argument("--budget", type=int, default=180, help="seconds for the whole run")
    args = ap.parse_args()
    if not args.net.startswith("127."):
        sys.exit("status page test: --net must be a loopback prefix (127.x.y)")
    if not os.access(args.kvs, os.X_OK):
        sys.exit(f"status page test: no kvs binary at {args.kvs} (cargo build --release first)")
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.budget)
    workdir = tempfile.mkdtemp(prefix="kvs-status-page-")
    try:
        run(args, workdir)
    except (Failure, Budget) as e:
        signal.alarm(0)
        print(f"status page test FAILED after {time.monotonic() - T0:.1f} s: {e}\n(logs in {workdir})", file=sys.stderr)
        sys.exit(1)
    signal.alarm(0)
    shutil.rmtree(workdir, ignore_errors=True)
    log(f"status page test passed in {time.monotonic() - T0:.1f} s")


if __name__ == "__main__":
    main()
