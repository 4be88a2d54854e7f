# Shared by bench/compare.sh and bench/ab.sh: starting systems on loopback, preloading
# them, one wrk measurement, and the summary table. Source it after setting KEYS and
# DURATION; it sets up $tmp (removed on exit) and stops what it started.
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

start_kvs() { # subnet nodes k [binary]   (extra environment: KVS_ENV="NAME=VALUE ...")
  local view="" i bin="${4:-$KVS}"
  for i in $(seq 1 "$2"); do view="${view:+$view,}127.0.$1.$i:8080"; done
  for i in $(seq 1 "$2"); do
    # shellcheck disable=SC2086 # KVS_ENV is a list of assignments on purpose
    env ${KVS_ENV:-} IPPORT="127.0.$1.$i:8080" VIEW="$view" K="$3" DATA_DIR="$tmp/kvs$1-$i" \
      RUST_LOG=warn "$bin" >"$tmp/kvs$1-$i.log" 2>&1 &
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

# The markdown table of the median round per cell; $1 names the column of ratios.
summarize() { # reference-system
python3 - "$results" "$DURATION" "$ROUNDS" "$1" "${WORKLOAD:-10,000 keys, 256-byte values}" <<'PY'
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
      f"{sys.argv[5]}, one entry node per system\n")
ref = sys.argv[4]
print(f"| system | op | conc | req/s | p50 ms | p99 ms | req/s over the rounds | {ref} / this |")
print("|---|---|---|---|---|---|---|---|")
order = list(dict.fromkeys(r[1] for r in rows))  # systems in the order they ran
def place(item):
    (s, op, c), _ = item
    return (order.index(s) if s in order else len(order), op, c)
for (s, op, c), (r, p50, p99, lo, hi) in sorted(data.items(), key=place):
    mine = data.get((ref, op, c))
    ratio = f"{mine[0] / r:.2f}" if mine and s != ref else ""
    print(f"| {s} | {op.upper()} | {c} | {r:,.0f} | {p50:.2f} | {p99:.2f} | {lo:,.0f}–{hi:,.0f} | {ratio} |")
PY
}
