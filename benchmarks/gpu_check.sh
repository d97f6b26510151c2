#!/usr/bin/env bash
# GPU checks: what the CPU-only test suite cannot run. One line per check: PASS/FAIL, seconds, the figure.
#
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine, after `make venv`
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # the script itself, on any machine, in a minute
#
# Checks: default training on the GPU in bf16 (easy-VQA, test accuracy and wall time), evaluate and predict
# on the GPU, a GPU-trained run evaluated on the CPU, fp16 with its gradient scaler, --compile, torchrun
# with one process per GPU (nccl), and the attention benchmark on the GPU. Logs and runs go to $OUT_DIR.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
OUT_DIR=${OUT_DIR:-runs/gpu-check}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

if [ "$QUICK" = 1 ]; then
    DATA="$OUT_DIR/tiny"
    [ -f "$DATA/train.jsonl" ] || "$PY" -c "import sys; sys.path.insert(0, '.'); \
from tests.tiny_data import make_tiny_dataset; make_tiny_dataset('$DATA')"
    TRAIN=(--data "$DATA" --epochs 1 --image-size 32 --dim 32 --num-heads 2 --images-per-batch 4 --warmup-steps 2)
    SHORT=("${TRAIN[@]}")
    BENCH=(--quick)
else
    DATA=easy-vqa
    TRAIN=(--data easy-vqa)
    SHORT=(--data easy-vqa --epochs 1)
    BENCH=()
fi
GPUS=1
if [ "$DEVICE" != cpu ]; then
    GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
fi

failed=0
check() {  # check NAME COMMAND...: run it, log to $OUT_DIR/NAME.log, print one line
    local name=$1; shift
    local start=$SECONDS
    if "$@" > "$OUT_DIR/$name.log" 2>&1; then
        printf 'PASS %-18s %4ds  %s\n' "$name" $((SECONDS - start)) "$(summary "$name")"
    else
        failed=$((failed + 1))
        printf 'FAIL %-18s %4ds  %s\n' "$name" $((SECONDS - start)) "$(tail -n 1 "$OUT_DIR/$name.log")"
    fi
}
summary() {  # the figure a check's log ends with
    "$PY" - "$OUT_DIR/$1.log" <<'PY'
import json, sys
lines = [line for line in open(sys.argv[1], encoding="utf-8", errors="replace").read().splitlines() if line.strip()]
for line in reversed(lines):
    try:
        d = json.loads(line)
    except ValueError:
        continue
    if isinstance(d, dict):
        keys = [k for k in d if k.endswith("accuracy") and not isinstance(d[k], dict)] + ["answer", "seconds"]
        print(", ".join(f"{k}={d[k]:.4g}" if isinstance(d[k], float) else f"{k}={d[k]}" for k in keys if k in d))
        break
else:
    print(lines[-1] if lines else "")
PY
}

if [ "$DEVICE" != cpu ] && [ "$GPUS" -lt 1 ]; then
    echo "FAIL cuda               no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)'))"
    exit 1
fi
[ "$DEVICE" != cpu ] && echo "GPU: $("$PY" -c "import torch; print(torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())")"

RUN="$OUT_DIR/train-bf16"
check train-bf16 "$PY" -m mmfuse.cli train "${TRAIN[@]}" --device "$DEVICE" --precision bf16 --out "$RUN" \
    --no-progress --json
check evaluate "$PY" -m mmfuse.cli evaluate --checkpoint "$RUN" --device "$DEVICE" --json
IMAGE=$("$PY" - "$RUN" <<'PY'
import sys
from mmfuse.data import load_split
from mmfuse.runs import read_run_config
print(load_split(read_run_config(sys.argv[1])["data"], "test", image_size=32).image_paths[0])
PY
)
check predict "$PY" -m mmfuse.cli predict --checkpoint "$RUN" --device "$DEVICE" --image "$IMAGE" \
    --question "what color is the shape?" --json
check gpu-run-on-cpu "$PY" -m mmfuse.cli evaluate --checkpoint "$RUN" --device cpu --json
if [ "$DEVICE" != cpu ]; then
    check train-fp16 "$PY" -m mmfuse.cli train "${SHORT[@]}" --device "$DEVICE" --precision fp16 \
        --out "$OUT_DIR/train-fp16" --no-progress --json
fi
[ "$QUICK" = 1 ] && [ "$DEVICE" = cpu ] ||  # compiling for the CPU takes minutes: not in the script's self-test
check train-compile "$PY" -m mmfuse.cli train "${SHORT[@]}" --device "$DEVICE" --compile \
    --out "$OUT_DIR/train-compile" --no-progress --json
TORCHRUN="$(dirname "$PY")/torchrun"
NPROC=$GPUS
[ "$DEVICE" = cpu ] && NPROC=2
check torchrun "$TORCHRUN" --nproc-per-node "$NPROC" -m mmfuse.cli train "${SHORT[@]}" --device "$DEVICE" \
    --out "$OUT_DIR/torchrun" --no-progress --json
check attention-bench "$PY" -m benchmarks.run --only attention --device "$DEVICE" "${BENCH[@]}" \
    --out "$OUT_DIR/bench"
echo "$failed check(s) failed; logs in $OUT_DIR"
exit $((failed > 0))
