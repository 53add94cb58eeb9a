#!/usr/bin/env bash
# On a lent GPU machine (device tool): train the bundled model, run the test suite, a CUDA smoke run.
# Expects corpus/ (scripts/build_corpus.py) and .whl/ (the transformers wheel) carried; writes to $OUT.
# TRAIN_CONFIG picks the config (default: stage 1); TRAIN_ARGS adds options, e.g. for stage 2:
#   TRAIN_CONFIG=configs/train-bundled-long.yaml TRAIN_ARGS="--init-from segcli/bundled --steps 4000" bash scripts/gpu_train.sh
# or the repeated-string stage that grows induction heads, at a GPU batch size:
#   TRAIN_CONFIG=configs/train-bundled-recall.yaml TRAIN_ARGS="--init-from segcli/bundled --set batch_size=64 --set max_minutes=8" bash scripts/gpu_train.sh
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi -L; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/gpu.log"
timeout "${TRAIN_TIMEOUT:-450}" python3 -m segcli train --config "${TRAIN_CONFIG:-configs/train-bundled.yaml}" ${TRAIN_ARGS:-} --out-dir /tmp/run \
  --log-jsonl "$OUT/train.jsonl" --quiet 2>&1 | tail -5 | tee -a "$OUT/gpu.log"
cp /tmp/run/model/model.safetensors /tmp/run/model/config.json /tmp/run/model/training.json "$OUT/" 2>/dev/null
timeout 70 python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -8 | tee "$OUT/pytest-gpu.log"
for p in fifo none; do
  timeout 25 python3 -m segcli run sample_docs/hamlet.txt sample_docs/milton_areopagitica.txt sample_docs/python_docs.txt \
    --model /tmp/run/model --memory $p --device cuda --dtype float32 --format jsonl --quiet | tail -1 \
    | python3 -c "import json,sys; d=json.load(sys.stdin); print('$p', 'bpb', round(d['bits_per_byte'],4), 'loss', round(d['loss'],4), 'tok/s', round(d['tokens_per_s']))"
done 2>&1 | tee -a "$OUT/gpu.log"
