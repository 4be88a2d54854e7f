#!/usr/bin/env bash
# Coverage-guided fuzzing of one kvs parser under libFuzzer, on the stable toolchain.
#
#   fuzz/run.sh TARGET [SECONDS] [libFuzzer options...]
#
# TARGET is one of `kvs::fuzz::TARGETS` (form token envelope response wal wal_open
# wal_payload key_state); SECONDS defaults to 300. It writes the target's seeds into
# fuzz/corpus/TARGET (through an ignored test of tests/fuzz.rs), then runs
# `cargo fuzz run -s none TARGET` (no sanitizer: the stable toolchain has none) as one
# process for SECONDS. The corpus grows in fuzz/corpus/TARGET; a crash, timeout or
# out-of-memory input lands in fuzz/artifacts/TARGET (both are git-ignored); replay one
# with `cargo fuzz run -s none TARGET fuzz/artifacts/TARGET/<file>`.
set -euo pipefail

targets="form token envelope response wal wal_open wal_payload key_state"
target=${1:-}
if [ -z "$target" ] || ! [[ " $targets " == *" $target "* ]]; then
  echo "usage: fuzz/run.sh TARGET [SECONDS] [libFuzzer options...]; TARGET is one of: $targets" >&2
  exit 2
fi
seconds=${2:-300}
shift $(( $# < 2 ? $# : 2 ))
cd "$(dirname "$0")/.."

command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz

KVS_FUZZ_CORPUS=fuzz/corpus cargo test --quiet --test fuzz write_seed_corpus -- \
  --ignored --exact >/dev/null
mkdir -p "fuzz/artifacts/$target"

# wal_open's scratch file: in memory where possible (its fsyncs then cost nothing),
# removed at the end.
scratch=$(mktemp -d /dev/shm/kvs-fuzz.XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# Messages that carry a view (4,096 slots) and WAL files of a few records are larger than
# libFuzzer's default input size (4 KiB, or the largest seed).
case "$target" in
  envelope | response | wal | wal_open) max_len=16384 ;;
  *) max_len=4096 ;;
esac

# -timeout: an input that takes over 10 s is a hang (the slowest real ones take
# milliseconds); -rss_limit_mb: libFuzzer's memory cap, on top of the targets' own
# allocation bound; -print_final_stats: the run count and coverage at the end.
KVS_FUZZ_DIR=$scratch cargo fuzz run -s none "$target" "fuzz/corpus/$target" -- \
  -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "$@"
