#!/usr/bin/env bash
# Cost per request as the data grows: loads N keys of 100 bytes (k0..k{N-1}) into a
# 3-node K=3 cluster on disk with `kvs load -c 64`, reports the load rate and each node's
# RSS and data directory size, then GET c64 with wrk over the N keys (ROUNDS runs of
# DURATION s; the median shown) and each node's RSS again. Beside it, a reference cluster
# loaded with REF keys (default 10,000) the same way, measured in the same rounds,
# alternating with the N-key cluster: the VM's speed drifts by a factor of two within an
# hour here, so only a ratio from interleaved rounds compares two sizes.
#
# usage: bench/scale.sh N     (e.g. 10000, 1000000; needs about 1 KB of disk per key
#                              per node; DURATION=5, ROUNDS=3)
#        REF=0 bench/scale.sh N   no reference cluster
#        QUIET_AFTER=PATH bench/scale.sh N   waits, after the load and before the GETs,
#                              until PATH does not exist (at most 2 hours): a long load
#                              may share the machine, the GETs must not
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:?usage: bench/scale.sh N}
DURATION="${DURATION:-5}"
ROUNDS="${ROUNDS:-3}"
REF="${REF:-10000}"
KEYS=$N
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
cargo build --release --locked --quiet --bin kvs
KVS=${CARGO_TARGET_DIR:-target}/release/kvs
# shellcheck source=bench/lib.sh
source bench/lib.sh

rss() { # the N-key cluster's (or the given) nodes' resident memory, MiB
  local p out=""
  for p in "${@:-${main[@]}}"; do out="$out $(( $(ps -o rss= -p "$p") / 1024 ))"; done
  echo "${out# }"
}
disk() { # the nodes' data directories, MiB (subnet: 79, the N-key cluster, or 87)
  local i out=""
  for i in 1 2 3; do out="$out $(du -sm "$tmp/kvs${1:-79}-$i" | cut -f1)"; done
  echo "${out# }"
}

python3 - "$N" "$tmp/keys.tsv" <<'PY'
import sys
n, path, v = int(sys.argv[1]), sys.argv[2], "v" * 100
with open(path, "w") as f:
    for i in range(n):
        f.write(f"k{i}\t{v}\n")
PY
start_kvs 79 3 3
main=("${pids[@]}")
echo "== loading $N keys of 100 bytes" >&2
started=$(date +%s.%N)
"$KVS" load --cluster 127.0.79.1:8080,127.0.79.2:8080,127.0.79.3:8080 -c 64 "$tmp/keys.tsv" >&2
took=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
sleep 2 # the replicas finish syncing
echo "loaded $N keys in ${took} s: $(awk -v n="$N" -v t="$took" 'BEGIN { printf "%.0f", n / t }') keys/s" \
  "; RSS MiB $(rss); disk MiB $(disk)"
if [ -n "${QUIET_AFTER:-}" ]; then
  for _ in $(seq 1 720); do [ -e "$QUIET_AFTER" ] || break; sleep 10; done
  echo "quiet from $(date +%T): RSS MiB $(rss); disk MiB $(disk)"
fi
if [ "$REF" -gt 0 ]; then
  start_kvs 87 3 3
  ref=("${pids[@]:3}")
  head -n "$REF" "$tmp/keys.tsv" >"$tmp/ref.tsv"
  "$KVS" load --cluster 127.0.87.1:8080,127.0.87.2:8080,127.0.87.3:8080 -c 64 "$tmp/ref.tsv" >&2
  sleep 2
  echo "reference: $REF keys; RSS MiB $(rss "${ref[@]}"); disk MiB $(disk 87)"
fi
for round in $(seq 1 "$ROUNDS"); do
  measure "$round" "kvs-3xK3-$N" http://127.0.79.1:8080 bench/wrk/kvs.lua get 64
  if [ "$REF" -gt 0 ]; then
    KEYS=$REF measure "$round" "kvs-3xK3-$REF" http://127.0.87.1:8080 bench/wrk/kvs.lua get 64
  fi
done
echo "after the GETs: RSS MiB $(rss); disk MiB $(disk)"
if [ "$REF" -gt 0 ]; then
  echo "reference after the GETs: RSS MiB $(rss "${ref[@]}"); disk MiB $(disk 87)"
fi
stop_all
WORKLOAD="100-byte values, each cluster's keys" summarize "kvs-3xK3-$N"
