#!/usr/bin/env bash
# One lease of a GPU machine (issues 3 and 5), run from the repository root:
#   1. stage-3 training on CUDA (experiments/bundled-model/configs/train-bundled-gpu.yaml) for the time the lease leaves, with
#      tests/engine/test_cuda.py running beside it (correctness only: no timing is taken while it runs);
#   2. then, alone on the GPU, the benchmark on CUDA in float32 and in bfloat16.
# Everything lands in $OUT (the device tool brings back at most 8 files): log.txt, train.jsonl,
# model.safetensors + model-config.json (the trained model, float16), cuda-float32.json, cuda-bfloat16.json.
#   BUDGET=580 OUT=/tmp/segcli-gpu bash experiments/bundled-model/gpu_session.sh
#   CONFIG=experiments/bundled-model/configs/train-bundled-gpu2.yaml RUN=runs/seglm-bundled-gpu2 INIT=runs/seglm-bundled-gpu/model BUDGET=400 ...
# Needs the corpus (corpus/train) and the starting model (INIT) in place. To continue the shipped model:
#   CONFIG=experiments/bundled-model/configs/train-bundled-gpu2.yaml RUN=runs/seglm-bundled-gpu3 INIT=segcli/bundled DTYPES=bfloat16 BENCH_S=120 BUDGET=580 ...
set -u
OUT=${OUT:-/tmp/segcli-gpu}; mkdir -p "$OUT"
BUDGET=${BUDGET:-580}    # seconds this script may take in all
BENCH_S=${BENCH_S:-75}   # each benchmark run
DTYPES=${DTYPES:-float32 bfloat16}   # benchmark runs, in order (session 6's bfloat16 run needed more than 70 s)
CONFIG=${CONFIG:-experiments/bundled-model/configs/train-bundled-gpu.yaml}
RUN=${RUN:-runs/seglm-bundled-gpu}               # where the run writes (passed as --out-dir)
INIT=${INIT:-runs/seglm-bundled-recall5/model}   # the model to start from (passed as --init-from)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
exec > >(tee -a "$OUT/log.txt") 2>&1

export GIT_COMMIT=${GIT_COMMIT:-}  # bench.py records it: the copy on a device machine may carry stale git metadata
echo "== machine ($(date -u +%FT%TZ), commit ${GIT_COMMIT:-unknown})"
nvidia-smi -L
python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"

echo "== tests/engine/test_cuda.py (in the background)"
(timeout 300 python3 -m pytest -q -p no:cacheprovider tests/engine/test_cuda.py > /tmp/pytest-cuda.txt 2>&1; echo "pytest exit $?" >> /tmp/pytest-cuda.txt) &
PYTEST_PID=$!

train() {  # $1: extra --set, $2: out dir
    local n; n=$(echo $DTYPES | wc -w)
    local secs=$(( $(left) - n * BENCH_S - 30 ))
    local mins; mins=$(python3 -c "print(round(max(0.5, ($secs - 50) / 60), 2))")  # ~50 s: tokenizing, loading, last validation, saving
    echo "== training: max_minutes=$mins (timeout $secs s) $1"
    timeout "$secs" python3 -m segcli train --config "$CONFIG" --init-from "$INIT" --set "max_minutes=$mins" $1 \
        --out-dir "$2" --log-jsonl "$OUT/train.jsonl" -q
}
train "" "$RUN"; rc=$?
if [ $rc -ne 0 ] && [ $(( $(date +%s) - T0 )) -lt 150 ]; then
    echo "training failed early (exit $rc): again in float32 (amp off)"
    RUN=$RUN-fp32; train "--set amp=false" "$RUN"; rc=$?
fi
echo "training exit $rc after $(( $(date +%s) - T0 )) s"
if [ ! -f "$RUN/model/model.safetensors" ] && [ -f "$RUN/checkpoint.pt" ]; then
    echo "no final model: converting the last checkpoint"
    python3 - "$RUN" "$INIT" <<'PY'
import sys, torch
from segcli.models.seglm import SegLMForCausalLM
run, init = sys.argv[1:3]
state = torch.load(f"{run}/checkpoint.pt", map_location="cpu", weights_only=False)
m = SegLMForCausalLM.from_pretrained(init, dtype=torch.float32)
m.load_state_dict(state["model"]); m.half().save_pretrained(f"{run}/model"); print("step", state["step"])
PY
fi
cp "$RUN/model/model.safetensors" "$OUT/" && cp "$RUN/model/config.json" "$OUT/model-config.json"
tail -n 3 "$OUT/train.jsonl" | cut -c1-600

wait $PYTEST_PID; echo "== tests/engine/test_cuda.py"; tail -n 15 /tmp/pytest-cuda.txt

for dt in $DTYPES; do
    echo "== benchmark, CUDA $dt (timeout $BENCH_S s, $(left) s left)"
    timeout "$BENCH_S" python3 benchmarks/bench.py --device cuda --dtype $dt --sections roofline,native,hf --scale 1 \
        --out "$OUT/cuda-$dt.json"
    echo "benchmark exit $?"
done
echo "== done after $(( $(date +%s) - T0 )) s"
