#!/usr/bin/env bash
# Reproduces the README's benchmark figures on this machine: a Qwen3-shaped random model
# (8 layers, hidden 512, f32 on CPU) served by 1, 2 and 3 pipeline stages (and by tensor-parallel
# groups of 2: 1 stage × 2 ranks, 2 stages × 2 ranks), measured with
# `shardctl bench`; the 1-stage run also measures candle-transformers' own model in-process on
# the same weights (--baseline). One JSON document per run on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
# The optimised build a deployment runs (the dev profile keeps overflow checks in our own code).
cargo build --release --workspace --bins >&2
BIN=target/release
MODEL=$(mktemp -d)
trap 'rm -rf "$MODEL"' EXIT
$BIN/shardctl dev tiny-model --arch qwen3 --out "$MODEL" --layers 8 --hidden 512 --intermediate 1536 \
    --heads 8 --kv-heads 4 --head-dim 64 --vocab 1024 --seed 7 >&2
PROMPT=${PROMPT_TOKENS:-128}
OUTPUT=${OUTPUT_TOKENS:-64}
run() { # stages concurrency requests [extra bench args]; TP=N makes each stage N ranks
    local stages=$1 conc=$2 reqs=$3; shift 3
    local tp=${TP:-1}
    local out; out=$(mktemp)
    RUST_LOG=warn $BIN/shardctl up --model "$MODEL" --workers $((stages * tp)) --tp "$tp" --listen 127.0.0.1:0 >"$out" &
    local pid=$!
    for _ in $(seq 600); do grep -q '^ready ' "$out" && break; sleep 0.1; done
    local url; url=$(sed -n 's/^ready //p' "$out")
    [ -n "$url" ] || { echo "cluster did not start" >&2; kill $pid; exit 1; }
    $BIN/shardctl bench --coordinator "$url" --prompt-tokens "$PROMPT" --output-tokens "$OUTPUT" \
        --concurrency "$conc" --requests "$reqs" --label "stages=$stages tp=$tp concurrency=$conc" --json "$@"
    kill -TERM $pid; wait $pid || true; rm -f "$out"
}
run 1 1 6 --baseline "$MODEL"
run 2 1 6
run 3 1 6
run 1 8 16
run 2 8 16
TP=2 run 1 1 6
TP=2 run 2 1 6
