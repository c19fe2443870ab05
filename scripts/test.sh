#!/usr/bin/env bash
# Runs every test of shardserve on a fresh Debian/Ubuntu machine that has only Rust installed:
# the unit tests, the reference tests against transformers' outputs, and the integration tests
# that start real etcd, coordinator and worker processes. Installs protoc and etcd when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (https://rustup.rs) first" >&2
    exit 1
fi
bash scripts/setup.sh --etcd
# The integration tests start the built binaries, so build them first.
cargo build --workspace --bins
cargo test --workspace "$@"
