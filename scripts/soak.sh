#!/usr/bin/env bash
# A soak under faults (not part of the README's test command): 2 replicas of the reference model
# over 4 workers with real etcd, 32 greedy streams kept going for 10 minutes, a random worker
# kill -9'd every 30 s and started again. Every stream must complete with its fault-free tokens
# or end UNAVAILABLE, nothing may hang, and no KV block may be left; prints the counts.
#
#   bash scripts/soak.sh                      # 600 s, 32 streams, a kill every 30 s
#   SOAK_SECONDS=120 SOAK_STREAMS=16 SOAK_KILL_EVERY_S=20 bash scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --etcd
cargo build --workspace --bins
cargo test -p shardserve-tests --test soak -- --ignored --nocapture
