#!/usr/bin/env bash
# Builds shardserve and runs the demo: a tiny model made on the spot, served by a coordinator
# and two pipeline-stage workers, one generation, its text and tokens/s. Pass a model (folder
# or Hub id) and other `shardctl demo` flags to change it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (https://rustup.rs) first" >&2
    exit 1
fi
bash scripts/setup.sh
cargo build --workspace --bins
exec target/debug/shardctl demo "$@"
