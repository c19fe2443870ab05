#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, from the binaries scripts/build-cuda.sh built
# and this repository alone (no network), in a few minutes. Prints one JSON line per result:
#   1. CPU-vs-CUDA logits and greedy tokens on a tiny model the check generates itself;
#   2. NCCL: communicator init and an all-reduce on the GPU;
#   3. decode tokens/s at concurrency 1 and 16 (CONCURRENCY) for Qwen3-0.6B-, 8B- and 32B-shaped
#      models with seeded random bf16 weights, through one worker, beside candle-transformers'
#      own model on the same GPU in this run at batch 1 and 16 ("ratio": ours / candle-transformers;
#      the batch-16 aggregate over the batch-1 rate is the batching gain);
#   4. the same models through a 2-stage pipeline of two workers on the one GPU, one request at
#      a time.
# The shapes are the real configs (vocab 151936); the tokenizer is the project's own small BPE,
# so ids past its vocabulary decode to no text (the benchmark counts ids).
# Environment: BIN_DIR (default target-cuda/release), DEVICE (cuda:0), SHAPES ("0.6b 8b 32b"),
# PROMPT_TOKENS (128), OUTPUT_TOKENS (64), REQUESTS (3, per level of the pipeline runs),
# CONCURRENCY ("1,16").
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN_DIR:-target-cuda/release}
DEVICE=${DEVICE:-cuda:0}
SHAPES=${SHAPES:-"0.6b 8b 32b"}
PROMPT=${PROMPT_TOKENS:-128}
OUTPUT=${OUTPUT_TOKENS:-64}
REQUESTS=${REQUESTS:-3}
CONCURRENCY=${CONCURRENCY:-1,16}
for b in shardctl coordinator worker; do
    [ -x "$BIN/$b" ] || { echo "gpu-check: $BIN/$b is missing; build it with scripts/build-cuda.sh" >&2; exit 1; }
done
# Where the GPU machines keep CUDA, NCCL and the driver.
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export HF_HUB_OFFLINE=1 RUST_LOG=${RUST_LOG:-warn}
WORK=$(mktemp -d)
CLUSTER_PID=
cleanup() {
    [ -n "$CLUSTER_PID" ] && kill -TERM "$CLUSTER_PID" 2>/dev/null && wait "$CLUSTER_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

fail() { # name message
    printf '{"check":"%s","ok":false,"error":"%s"}\n' "$1" "$(echo "$2" | tr -d '"\n' | cut -c1-400)"
}

# 1. CPU vs CUDA on a generated tiny checkpoint.
$BIN/shardctl dev tiny-model --arch qwen3 --out "$WORK/tiny" --layers 4 --seed 3 >/dev/null
$BIN/shardctl dev check-device --model "$WORK/tiny" --device "$DEVICE" 2>"$WORK/err" || fail cpu_vs_device_logits "$(cat "$WORK/err")"

# 2. NCCL.
$BIN/shardctl dev check-nccl --device "$DEVICE" 2>"$WORK/err" || fail nccl_all_reduce "$(cat "$WORK/err")"

# 3 and 4. Decode rates of real shapes with random weights.
shape_args() {
    case $1 in
        0.6b) echo "--layers 28 --hidden 1024 --intermediate 3072 --heads 16 --kv-heads 8 --head-dim 128 --tie-embeddings true" ;;
        8b) echo "--layers 36 --hidden 4096 --intermediate 12288 --heads 32 --kv-heads 8 --head-dim 128 --tie-embeddings false" ;;
        32b) echo "--layers 64 --hidden 5120 --intermediate 25600 --heads 64 --kv-heads 8 --head-dim 128 --tie-embeddings false" ;;
        # A trial run of this script without a GPU (DEVICE=cpu SHAPES=tiny).
        tiny) echo "--layers 4 --hidden 256 --intermediate 512 --heads 4 --kv-heads 2 --head-dim 64 --tie-embeddings true" ;;
        *) echo "gpu-check: unknown shape $1 (0.6b, 8b, 32b, tiny)" >&2; exit 1 ;;
    esac
}

start_cluster() { # model workers
    local out="$WORK/up.out"
    $BIN/shardctl up --model "$1" --workers "$2" --random-weights --device "$DEVICE" --dtype bf16 \
        --listen 127.0.0.1:0 --ready-timeout-s 240 >"$out" 2>"$WORK/up.err" &
    CLUSTER_PID=$!
    for _ in $(seq 2400); do
        grep -q '^ready ' "$out" && break
        kill -0 "$CLUSTER_PID" 2>/dev/null || break
        sleep 0.1
    done
    URL=$(sed -n 's/^ready //p' "$out")
    [ -n "$URL" ]
}

stop_cluster() {
    kill -TERM "$CLUSTER_PID" 2>/dev/null || true
    wait "$CLUSTER_PID" 2>/dev/null || true
    CLUSTER_PID=
}

for shape in $SHAPES; do
    model="$WORK/qwen3-$shape"
    # shellcheck disable=SC2046
    $BIN/shardctl dev tiny-model --arch qwen3 --out "$model" $(shape_args "$shape") --vocab 4096 \
        --config-vocab 151936 --max-position-embeddings 40960 --dtype bf16 --no-weights >/dev/null
    common=(--prompt-tokens "$PROMPT" --output-tokens "$OUTPUT" --json)
    # candle-transformers alone on the GPU first (the largest shape does not fit twice), at
    # batch 1 and 16.
    if ! $BIN/shardctl bench --baseline "$model" --baseline-random --baseline-only --baseline-device "$DEVICE" \
        --baseline-dtype bf16 --concurrency "$CONCURRENCY" --label "qwen3-$shape candle-transformers" "${common[@]}" \
        >"$WORK/base.json" 2>"$WORK/err"; then
        fail "decode_qwen3_$shape" "$(cat "$WORK/err")"
        continue
    fi
    cat "$WORK/base.json"
    for stages in 1 2; do
        if ! start_cluster "$model" "$stages"; then
            fail "decode_qwen3_${shape}_${stages}_stages" "$(tail -3 "$WORK/up.err")"
            stop_cluster
            continue
        fi
        if [ "$stages" = 1 ]; then levels=(--concurrency "$CONCURRENCY"); else levels=(--concurrency 1 --requests "$REQUESTS"); fi
        $BIN/shardctl bench --coordinator "$URL" --baseline-from "$WORK/base.json" "${levels[@]}" \
            --label "qwen3-$shape stages=$stages device=$DEVICE" "${common[@]}" 2>"$WORK/err" \
            || fail "decode_qwen3_${shape}_${stages}_stages" "$(cat "$WORK/err")"
        stop_cluster
    done
done
