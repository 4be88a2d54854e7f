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
KVS=${CARGO_TARGET_DIR:-target}/release/kvs
HELLO=${CARGO_TARGET_DIR:-target}/release/examples/hello

# shellcheck source=bench/lib.sh
source bench/lib.sh

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

summarize kvs-3xK3
