#!/usr/bin/env bash
# Side-by-side figures in one run on this machine, with one neutral load tool (wrk):
#   kvs 3 nodes K=3, kvs 4 nodes K=2, a 3-member etcd (its v3 JSON gateway), and a
#   hello-world axum server (the ceiling for one HTTP request here).
# Workload: 10,000 keys, 256-byte values, GET-only and PUT-only, concurrency 1 and 64.
# All systems are started and preloaded first (on their own loopback addresses), then
# measured interleaved: each round runs every (op, concurrency) cell against every system
# back to back, so a slow spell of the machine (a shared VM) hits all of them alike.
# Prints a markdown table of the median round per cell (req/s, p50, p99, the spread of
# req/s over the rounds) and the ratios kvs/etcd, kvs/hello.
#
# usage: bench/compare.sh     (DURATION=5 seconds per run, ROUNDS=3; needs root once to
#                              apt-get install wrk and etcd-server if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${DURATION:-5}"
ROUNDS="${ROUNDS:-3}"
KEYS=10000

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v etcd >/dev/null || need+=(etcd-server)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --locked --quiet --bin kvs --example hello
KVS=target/release/kvs
HELLO=target/release/examples/hello

tmp=$(mktemp -d)
pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap 'stop_all; rm -rf "$tmp"' EXIT

wait_http() { # url method [body]
  for _ in $(seq 1 100); do
    if curl -sf -o /dev/null -X "$2" ${3:+-d "$3"} "$1"; then return 0; fi
    sleep 0.1
  done
  echo "no answer from $1" >&2
  return 1
}

start_kvs() { # subnet nodes k
  local view="" i
  for i in $(seq 1 "$2"); do view="${view:+$view,}127.0.$1.$i:8080"; done
  for i in $(seq 1 "$2"); do
    IPPORT="127.0.$1.$i:8080" VIEW="$view" K="$3" DATA_DIR="$tmp/kvs$1-$i" RUST_LOG=warn \
      "$KVS" >"$tmp/kvs$1-$i.log" 2>&1 &
    pids+=($!)
  done
  for i in $(seq 1 "$2"); do wait_http "http://127.0.$1.$i:8080/kv-store/get_partition_id" GET; done
}

start_etcd() {
  local cluster="" i
  for i in 1 2 3; do cluster="${cluster:+$cluster,}m$i=http://127.0.73.$i:2380"; done
  for i in 1 2 3; do
    etcd --name "m$i" --data-dir "$tmp/etcd$i" \
      --listen-client-urls "http://127.0.73.$i:2379" --advertise-client-urls "http://127.0.73.$i:2379" \
      --listen-peer-urls "http://127.0.73.$i:2380" --initial-advertise-peer-urls "http://127.0.73.$i:2380" \
      --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token kvs-bench \
      --log-level error >"$tmp/etcd$i.log" 2>&1 &
    pids+=($!)
  done
  for i in 1 2 3; do wait_http "http://127.0.73.$i:2379/v3/kv/range" POST '{"key":"eA=="}'; done
}

preload() { # kind base-url
  python3 - "$1" "$2" "$KEYS" <<'PY'
import base64, http.client, json, sys, threading, urllib.parse
kind, base, keys = sys.argv[1], sys.argv[2], int(sys.argv[3])
host = urllib.parse.urlparse(base).netloc
value = "v" * 256
def worker(lo, hi):
    c = http.client.HTTPConnection(host, timeout=10)
    for i in range(lo, hi):
        if kind == "etcd":
            body = json.dumps({"key": base64.b64encode(f"k{i}".encode()).decode(),
                               "value": base64.b64encode(value.encode()).decode()})
            c.request("POST", "/v3/kv/put", body, {"Content-Type": "application/json"})
        else:
            c.request("PUT", f"/kv-store/k{i}", "val=" + value,
                      {"Content-Type": "application/x-www-form-urlencoded"})
        r = c.getresponse(); r.read()
        if r.status >= 300:
            sys.exit(f"preload {kind}: k{i}: {r.status}")
step = keys // 16
ts = [threading.Thread(target=worker, args=(j * step, keys if j == 15 else (j + 1) * step)) for j in range(16)]
[t.start() for t in ts]; [t.join() for t in ts]
PY
}

results="$tmp/results"
: >"$results"
measure() { # round system url script op conc
  local threads out rps p50 p99
  threads=$([ "$6" = 1 ] && echo 1 || echo 2)
  out=$(MODE=$5 KEYS=$KEYS wrk -t"$threads" -c"$6" -d"${DURATION}s" --latency -s "$4" "$3")
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  if grep -q "Non-2xx" <<<"$out"; then
    echo "warning: $2 $5 c=$6: $(grep Non-2xx <<<"$out")" >&2
  fi
  echo "$1 $2 $5 $6 $rps $p50 $p99" >>"$results"
  echo "  round $1: $2 $5 c=$6: $rps req/s, p50 $p50, p99 $p99" >&2
}

echo "== starting kvs (3 nodes, K=3), kvs (4 nodes, K=2), etcd (3 members), hello" >&2
start_kvs 71 3 3; preload kvs http://127.0.71.1:8080
start_kvs 72 4 2; preload kvs http://127.0.72.1:8080
start_etcd; preload etcd http://127.0.73.1:2379
"$HELLO" 127.0.74.1:8080 & pids+=($!)
wait_http http://127.0.74.1:8080/x GET
systems=(
  "kvs-3xK3 http://127.0.71.1:8080 bench/wrk/kvs.lua"
  "kvs-4xK2 http://127.0.72.1:8080 bench/wrk/kvs.lua"
  "etcd-3 http://127.0.73.1:2379 bench/wrk/etcd.lua"
  "hello http://127.0.74.1:8080 bench/wrk/kvs.lua"
)
for round in $(seq 1 "$ROUNDS"); do
  for op in get put; do
    for c in 1 64; do
      for sys in "${systems[@]}"; do
        # shellcheck disable=SC2086 # the entry is three words on purpose
        measure "$round" $sys "$op" "$c"
      done
    done
  done
done
stop_all

python3 - "$results" "$DURATION" "$ROUNDS" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
def ms(t):
    for unit, f in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if t.endswith(unit) and t[: -len(unit)].replace(".", "").isdigit():
            return float(t[: -len(unit)]) * f
    return float("nan")
cells = {}
for rnd, s, op, c, r, p50, p99 in rows:
    cells.setdefault((s, op, int(c)), []).append((float(r), ms(p50), ms(p99)))
# The median round by req/s (with its latencies), and the spread of req/s.
data = {}
for key, runs in cells.items():
    runs.sort()
    data[key] = runs[(len(runs) - 1) // 2] + (runs[0][0], runs[-1][0])
print(f"wrk, {sys.argv[3]} interleaved rounds of {sys.argv[2]} s per cell, median round shown; "
      "10,000 keys, 256-byte values, one entry node per system\n")
print("| system | op | conc | req/s | p50 ms | p99 ms | req/s over the rounds | kvs-3xK3 / this |")
print("|---|---|---|---|---|---|---|---|")
order = ["kvs-3xK3", "kvs-4xK2", "etcd-3", "hello"]
def place(item):
    (s, op, c), _ = item
    return (order.index(s) if s in order else len(order), op, c)
for (s, op, c), (r, p50, p99, lo, hi) in sorted(data.items(), key=place):
    mine = data.get(("kvs-3xK3", op, c))
    ratio = f"{mine[0] / r:.2f}" if mine and s != "kvs-3xK3" else ""
    print(f"| {s} | {op.upper()} | {c} | {r:,.0f} | {p50:.2f} | {p99:.2f} | {lo:,.0f}–{hi:,.0f} | {ratio} |")
PY
