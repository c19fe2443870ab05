#!/usr/bin/env bash
# Reproduces the README's benchmark figures on this machine, with a model of Qwen3-0.6B's layer
# shapes (28 layers, hidden 1024, 16 heads / 8 KV heads of 128, MLP 3072; bf16 weights on disk,
# run in f32 on CPU; a small vocabulary) and `shardctl bench`. One JSON document per run:
#  1. one worker at concurrency 1, 8, 16 and 32, beside candle-transformers' own model in this
#     process at batch 1, 8, 16 and 32 on the same weights (--baseline);
#  2. one stage on one core, then two stages on one core each, at concurrency 16;
#  3. decode at context 10 and at context 1,000 (one worker, one request at a time);
#  4. an open loop: Poisson arrivals at 0.25 and 0.5 requests/s;
#  5. prefix caching, each beside caching off in the same command: 16 requests sharing a
#     768-token prefix (32 tokens of their own, 32 new); 4 conversations of 4 turns of 192 new
#     tokens; unique prompts (what the lookup costs when nothing is shared);
#  6. replicas: one replica on one core, then 2 replicas (`--replicas 2`) on one core each, at
#     concurrency 16;
#  7. structured output: decoding held to a JSON schema against free decoding at concurrency 8,
#     on the same shapes with Qwen3's real vocabulary (151,643 BPE tokens and its added tokens,
#     from the `qwen.tiktoken` the `dashscope` package ships on PyPI; embedding and lm_head of
#     151,936 rows) and random weights, and llguidance's mask time per token.
#  8. quantization at load: one worker with `--quantize q8_0` at concurrency 1 and 8, beside
#     candle-transformers' f32 model in this process on the same weights (--baseline);
#  9. GGUF: the model in f32, then written as GGUF files in Q8_0 and in Q4_K and served in their
#     block types, each on one worker at concurrency 1 and 8, with each worker's resident memory
#     once loaded (VmRSS) and at its peak (VmHWM, from /proc) at the same --kv-memory.
# FAST=1 uses an 8-layer, hidden-512 model instead (a minute instead of half an hour).
# ONLY=prefix runs part 5 alone (ONLY=multi-turn its multi-turn run), ONLY=replicas part 6,
# ONLY=structured part 7, ONLY=quantize part 8, ONLY=gguf part 9.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
# The optimised build a deployment runs (the dev profile keeps overflow checks in our own code).
cargo build --release --workspace --bins >&2
BIN=target/release
MODEL=$(mktemp -d)
trap 'rm -rf "$MODEL"' EXIT
if [ -n "${FAST:-}" ]; then
    SHAPE=(--layers 8 --hidden 512 --intermediate 1536 --heads 8 --kv-heads 4 --head-dim 64)
else
    SHAPE=(--layers 28 --hidden 1024 --intermediate 3072 --heads 16 --kv-heads 8 --head-dim 128)
fi
$BIN/shardctl dev tiny-model --arch qwen3 --out "$MODEL" "${SHAPE[@]}" --dtype bf16 --vocab 1024 \
    --max-position-embeddings 4096 --seed 7 >&2
run() { # workers threads-per-worker label [bench args]
    local workers=$1 threads=$2 label=$3; shift 3
    local out; out=$(mktemp)
    RUST_LOG=warn $BIN/shardctl up --model "${SERVE:-$MODEL}" --workers "$workers" --worker-threads "$threads" \
        --kv-memory "${KV_MEMORY:-2GiB}" ${REPLICAS:+--replicas "$REPLICAS"} ${RANDOM_WEIGHTS:+--random-weights} ${QUANTIZE:+--quantize "$QUANTIZE"} \
        --listen 127.0.0.1:0 >"$out" &
    local pid=$!
    for _ in $(seq 1200); do grep -q '^ready ' "$out" && break; sleep 0.1; done
    local url; url=$(sed -n 's/^ready //p' "$out")
    [ -n "$url" ] || { echo "cluster did not start" >&2; kill $pid; exit 1; }
    local w loaded=()
    if [ -n "${PEAK_RSS:-}" ]; then # each worker's resident memory once loaded, before any request
        for w in $(pgrep -P $pid -x worker); do loaded+=("$w:$(awk '/^VmRSS/ {print $2 * 1024}' "/proc/$w/status")"); done
    fi
    $BIN/shardctl bench --coordinator "$url" --label "$label" --json "$@"
    if [ -n "${PEAK_RSS:-}" ]; then # and its peak, loading and serving, as one JSON line a worker
        local l
        for l in "${loaded[@]}"; do
            w=${l%%:*}
            awk -v label="$label" -v pid="$w" -v loaded="${l#*:}" '/^VmHWM/ {printf "{\"label\": \"%s\", \"worker_pid\": %s, \"loaded_rss_bytes\": %.0f, \"peak_rss_bytes\": %.0f}\n", label, pid, loaded, $2 * 1024}' "/proc/$w/status"
        done
    fi
    kill -TERM $pid; wait $pid || true; rm -f "$out"
}
CORES=$(nproc)
if [ -z "${ONLY:-}" ]; then
run 1 "$CORES" "1 worker" --prompt-tokens 128 --output-tokens 64 --concurrency 1,8,16,32 --baseline "$MODEL"
run 1 1 "1 stage, 1 core" --prompt-tokens 128 --output-tokens 64 --concurrency 16
run 2 1 "2 stages, 1 core each" --prompt-tokens 128 --output-tokens 64 --concurrency 16
run 1 "$CORES" "context 10" --prompt-tokens 10 --output-tokens 32 --concurrency 1
run 1 "$CORES" "context 1000" --prompt-tokens 1000 --output-tokens 32 --concurrency 1
run 1 "$CORES" "open loop" --prompt-tokens 128 --output-tokens 64 --request-rate "${RATES:-0.25,0.5}" --requests 12
fi
if [ -z "${ONLY:-}" ] || [ "${ONLY:-}" = prefix ]; then
# With caching off every request holds its whole prompt's KV: 4 GiB keeps all 16 admitted.
KV_MEMORY=4GiB run 1 "$CORES" "shared prefix" --shared-prefix 768 --prompt-tokens 32 --output-tokens 32 --concurrency 16 --requests 16
fi
if [ -z "${ONLY:-}" ] || [ "${ONLY:-}" = prefix ] || [ "${ONLY:-}" = multi-turn ]; then
KV_MEMORY=4GiB run 1 "$CORES" "multi-turn" --multi-turn 4 --prompt-tokens 192 --output-tokens 32 --concurrency 4
fi
if [ -z "${ONLY:-}" ] || [ "${ONLY:-}" = prefix ]; then
KV_MEMORY=4GiB run 1 "$CORES" "no shared prefix" --shared-prefix 0 --prompt-tokens 128 --output-tokens 64 --concurrency 8 --requests 16
fi
if [ -z "${ONLY:-}" ] || [ "${ONLY:-}" = replicas ]; then
run 1 1 "1 replica, 1 core" --prompt-tokens 128 --output-tokens 64 --concurrency 16
REPLICAS=2 run 2 1 "2 replicas, 1 core each" --prompt-tokens 128 --output-tokens 64 --concurrency 16
fi
if [ -z "${ONLY:-}" ] || [ "${ONLY:-}" = quantize ]; then
QUANTIZE=q8_0 run 1 "$CORES" "q8_0" --prompt-tokens 128 --output-tokens 64 --concurrency 1,8 --baseline "$MODEL"
fi
if [ -z "${ONLY:-}" ] || [ "${ONLY:-}" = gguf ]; then
GGUF=$(mktemp -d)
for t in q8_0 q4_k; do
    $BIN/shardctl dev tiny-model --arch qwen3 --out "$GGUF/$t" "${SHAPE[@]}" --dtype f32 --vocab 1024 \
        --max-position-embeddings 4096 --seed 7 --gguf $t >&2
done
PEAK_RSS=1 run 1 "$CORES" "f32" --prompt-tokens 128 --output-tokens 64 --concurrency 1,8
PEAK_RSS=1 SERVE="$GGUF/q8_0" run 1 "$CORES" "gguf q8_0" --prompt-tokens 128 --output-tokens 64 --concurrency 1,8
PEAK_RSS=1 SERVE="$GGUF/q4_k" run 1 "$CORES" "gguf q4_k" --prompt-tokens 128 --output-tokens 64 --concurrency 1,8
rm -rf "$GGUF"
fi
if [ -z "${ONLY:-}" ] || [ "${ONLY:-}" = structured ]; then
WHEELS=$(mktemp -d)
python3 -m pip download --quiet --no-deps --dest "$WHEELS" "dashscope==2.0.2" >&2
python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("dashscope/resources/qwen.tiktoken"))' \
    "$WHEELS"/dashscope-*.whl >"$WHEELS/qwen.tiktoken"
rm -rf "$MODEL"
MODEL=$(mktemp -d)
$BIN/shardctl dev tiny-model --arch qwen3 --out "$MODEL" "${SHAPE[@]}" --config-vocab 151936 --no-weights \
    --max-position-embeddings 4096 >&2
python3 scripts/qwen-vocab.py "$WHEELS/qwen.tiktoken" "$MODEL/tokenizer.json"
rm -rf "$WHEELS"
cat >"$MODEL/order.schema.json" <<'SCHEMA'
{"type": "object", "properties": {"customer": {"type": "string"}, "items": {"type": "array", "items": {
  "type": "object", "properties": {"name": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
  "note": {"type": "string"}}, "required": ["name", "qty"]}}}, "required": ["customer", "items"]}
SCHEMA
RANDOM_WEIGHTS=1 run 1 "$CORES" "structured" --json-schema "$MODEL/order.schema.json" --prompt-tokens 128 \
    --output-tokens 64 --concurrency 8 --requests 16
fi
