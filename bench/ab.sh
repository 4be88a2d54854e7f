#!/usr/bin/env bash
# A/B of two kvs builds or settings on one cluster shape, interleaved like
# bench/compare.sh (the same preload, wrk scripts and table): each round runs every
# (op, concurrency) cell on A, then on B.
#
# usage: bench/ab.sh SHAPE "A_ENV" "B_ENV" [BIN_A [BIN_B]]
#   SHAPE: 3x3 (3 nodes, K=3) or 4x2 (4 nodes, K=2; wrk enters at node 1, which
#          forwards the half of the keys it does not hold)
#   A_ENV, B_ENV: environment of each cluster's nodes ("" for none), e.g.
#          "KVS_RPC_HTTP_ONLY=1" ""
#   BIN_A, BIN_B: binaries (default target/release/kvs for both)
#   OPS="get put", CONCS="1 64", DURATION=5, ROUNDS=3
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${DURATION:-5}"
ROUNDS="${ROUNDS:-3}"
OPS="${OPS:-get put}"
CONCS="${CONCS:-1 64}"
KEYS=10000
SHAPE=$1 A_ENV=$2 B_ENV=$3
case "$SHAPE" in
  3x3) nodes=3 k=3 ;;
  4x2) nodes=4 k=2 ;;
  *) echo "SHAPE must be 3x3 or 4x2" >&2; exit 2 ;;
esac
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
KVS=target/release/kvs
BIN_A=${4:-$KVS} BIN_B=${5:-${4:-$KVS}}
[ -x "$BIN_A" ] && [ -x "$BIN_B" ] || { echo "build the binaries first: $BIN_A $BIN_B" >&2; exit 2; }
# shellcheck source=bench/lib.sh
source bench/lib.sh

echo "== A: $BIN_A ${A_ENV:-(no extra environment)}; B: $BIN_B ${B_ENV:-(no extra environment)}" >&2
KVS_ENV=$A_ENV start_kvs 75 "$nodes" "$k" "$BIN_A"; preload kvs http://127.0.75.1:8080
KVS_ENV=$B_ENV start_kvs 76 "$nodes" "$k" "$BIN_B"; preload kvs http://127.0.76.1:8080
for round in $(seq 1 "$ROUNDS"); do
  for op in $OPS; do
    for c in $CONCS; do
      measure "$round" A http://127.0.75.1:8080 bench/wrk/kvs.lua "$op" "$c"
      measure "$round" B http://127.0.76.1:8080 bench/wrk/kvs.lua "$op" "$c"
    done
  done
done
stop_all
summarize A
