#!/usr/bin/env bash
# Instructions per request, counted by callgrind: repeatable where wall-clock figures on
# a shared 2-core VM are not (the same binary and load give the same count within ~2 %).
# Starts a 3-node K=3 cluster (127.0.82.1-3) with every node under callgrind, preloads
# 1,000 keys, then counts the instructions all three nodes execute (user space only)
# while 8 keep-alive clients send N requests of one kind to node 1.
#
# usage: bench/callgrind.sh [BIN] [get|put] [N]     (defaults: target/release/kvs put 2000;
#        KEEP=DIR keeps the three nodes' profiles there)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/kvs}; MODE=${2:-put}; N=${3:-2000}
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
tmp=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"' EXIT
view=127.0.82.1:8080,127.0.82.2:8080,127.0.82.3:8080
for i in 1 2 3; do
  IPPORT=127.0.82.$i:8080 VIEW=$view K=3 DATA_DIR=$tmp/n$i RUST_LOG=warn \
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$tmp/n$i.out" \
    "$BIN" >"$tmp/n$i.log" 2>&1 &
  pids+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 600); do
    curl -sf -o /dev/null "http://127.0.82.$i:8080/kv-store/get_partition_id" && break
    sleep 0.2
  done
done
load() { # mode count
  python3 - "$1" "$2" <<'PY'
import http.client, sys, threading
mode, n, clients = sys.argv[1], int(sys.argv[2]), 8
def client(t):
    c = http.client.HTTPConnection("127.0.82.1:8080", timeout=60)
    for i in range(t, n, clients):
        key = f"/kv-store/k{(i * 7919) % 1000}"
        if mode == "get":
            c.request("GET", key)
        else:
            c.request("PUT", key, "val=" + "v" * 256,
                      {"Content-Type": "application/x-www-form-urlencoded"})
        r = c.getresponse(); r.read()
        if r.status >= 300:
            sys.exit(f"{mode} {key}: {r.status}")
ts = [threading.Thread(target=client, args=(t,)) for t in range(clients)]
[t.start() for t in ts]; [t.join() for t in ts]
PY
}
load put 1000
sleep 2
for p in "${pids[@]}"; do callgrind_control -i on "$p" >/dev/null; done
load "$MODE" "$N"
sleep 1
for p in "${pids[@]}"; do callgrind_control -d "$p" >/dev/null; done
# KEEP=DIR keeps the profiles (for callgrind_annotate).
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$tmp"/n*.out* "$KEEP"/; fi
python3 - "$tmp" "$N" "$MODE" <<'PY'
import glob, sys
tmp, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
total = 0
for f in sorted(glob.glob(f"{tmp}/n*.out.1")):
    for line in open(f):
        if line.startswith(("summary:", "totals:")):
            total += int(line.split()[1])
            break
print(f"{mode}: {total / n:,.0f} instructions per request (3 nodes, {n} requests)")
PY
