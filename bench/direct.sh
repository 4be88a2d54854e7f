#!/usr/bin/env bash
# What forwarding costs, and what direct routing gets back: GET c64 on the own API with
# `kvs bench` (the project's load generator, whose `v1-direct` mode is the client library
# routing each key by the layout), in interleaved rounds on two clusters on disk:
#   3xK3 entry  3 nodes, K=3, every request to node 1 (which holds every key)
#   4xK2 entry  4 nodes, K=2, every request to node 1 (which forwards the half of the
#               keys it does not hold)
#   4xK2 direct the same cluster, each request straight to a replica of its key
# Prints the median round per cell and each cell over the 3xK3 figure (the issue's
# targets: entry >= 0.70, direct >= 0.90).
#
# usage: bench/direct.sh     (DURATION=5 seconds per run, ROUNDS=3, KEYS=10000)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${DURATION:-5}"
ROUNDS="${ROUNDS:-3}"
KEYS="${KEYS:-10000}"
cargo build --release --locked --quiet --bin kvs
KVS=${CARGO_TARGET_DIR:-target}/release/kvs
# shellcheck source=bench/lib.sh
source bench/lib.sh

# Every key is written (k0 .. k{KEYS-1}, the names `kvs bench` picks from), so every GET
# finds its key: a GET of a key a replica does not hold asks a peer before it answers
# 404, and random preloading left a third of the keys unwritten, which made the peers
# of the entry node busy and the figures depend on that.
start_kvs 77 3 3; preload kvs http://127.0.77.1:8080
start_kvs 78 4 2; preload kvs http://127.0.78.1:8080
all4=127.0.78.1:8080,127.0.78.2:8080,127.0.78.3:8080,127.0.78.4:8080
cells=(
  "3xK3-entry v1 127.0.77.1:8080"
  "4xK2-entry v1 127.0.78.1:8080"
  "4xK2-direct v1-direct $all4"
)
for round in $(seq 1 "$ROUNDS"); do
  for cell in "${cells[@]}"; do
    read -r name api targets <<<"$cell"
    "$KVS" bench --api "$api" --targets "$targets" --reads 1 --keys "$KEYS" \
      --duration "$DURATION" -c 64 --quiet --json "$tmp/$name-$round.json" >/dev/null
    echo "  round $round: $name: $(python3 -c 'import json, sys
g = json.load(open(sys.argv[1]))["get"]
print("%.0f GET/s, p99 %.2f ms, %d errors" % (g["per_sec"], g["p99_ms"], g["errors"]))' "$tmp/$name-$round.json")" >&2
  done
done
stop_all
python3 - "$tmp" "$ROUNDS" "$DURATION" <<'PY'
import json, sys
tmp, rounds, duration = sys.argv[1], int(sys.argv[2]), sys.argv[3]
names = ["3xK3-entry", "4xK2-entry", "4xK2-direct"]
median = {}
print(f"kvs bench, own API, GET c64, {rounds} interleaved rounds of {duration} s, median round shown\n")
print("| cell | GET/s | p50 ms | p99 ms | GET/s over the rounds | errors | / 3xK3-entry |")
print("|---|---|---|---|---|---|---|")
for n in names:
    runs = sorted((json.load(open(f"{tmp}/{n}-{r}.json"))["get"] for r in range(1, rounds + 1)),
                  key=lambda g: g["per_sec"])
    median[n] = m = runs[(len(runs) - 1) // 2]
    ratio = "" if n == names[0] else f"{m['per_sec'] / median[names[0]]['per_sec']:.2f}"
    errors = sum(g["errors"] for g in runs)
    print(f"| {n} | {m['per_sec']:,.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
          f"{runs[0]['per_sec']:,.0f}–{runs[-1]['per_sec']:,.0f} | {errors} | {ratio} |")
PY
