#!/usr/bin/env bash
# Builds the kvs image offline: a statically linked binary (glibc, crt-static), then
# `docker build` of a FROM-scratch image around it. Usage: deploy/image.sh [TAG] (kvs).
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-kvs}"
target="$(rustc -vV | sed -n 's/^host: //p')"
# A target directory of its own: other RUSTFLAGS would otherwise rebuild the usual one.
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked --target "$target" --target-dir target/static
mkdir -p target/docker
cp "target/static/$target/release/kvs" target/docker/kvs
strip target/docker/kvs
if readelf -d target/docker/kvs | grep -q NEEDED; then
  echo "target/docker/kvs is dynamically linked; the image needs a static binary" >&2
  exit 1
fi
docker build -q -t "$tag" . >/dev/null
echo "built image $tag: $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.1f MB", $1/1e6}')"
