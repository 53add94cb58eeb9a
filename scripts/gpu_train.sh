#!/usr/bin/env bash
# Train the bundled model on a lent GPU machine (device tool), then a quick held-out check.
# Expects: corpus/ (scripts/build_corpus.py) and .whl/ (transformers wheel) carried; writes to $OUT.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi -L; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/gpu.log"
timeout "${TRAIN_TIMEOUT:-420}" python3 -m segcli train --config configs/train-bundled.yaml --out-dir /tmp/run \
  --log-jsonl "$OUT/train.jsonl" --quiet 2>&1 | tail -20 | tee -a "$OUT/gpu.log"
if [ ! -f /tmp/run/model/model.safetensors ] && [ -f /tmp/run/checkpoint.pt ]; then
  echo "training was cut off: exporting the last checkpoint" | tee -a "$OUT/gpu.log"
  python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.log"
import torch
from segcli.train import load_train_config, save_final
from segcli.models.seglm import SegLMConfig, SegLMForCausalLM
cfg = load_train_config("configs/train-bundled.yaml", {"out_dir": "/tmp/run"})
state = torch.load("/tmp/run/checkpoint.pt", map_location="cpu", weights_only=False)
m = SegLMForCausalLM(SegLMConfig(**cfg.model)); m.load_state_dict(state["model"])
save_final(m, cfg, __import__("pathlib").Path("/tmp/run"), state["log"], 0.0)
PY
fi
cp /tmp/run/model/model.safetensors /tmp/run/model/config.json /tmp/run/model/training.json "$OUT/" 2>/dev/null
for p in fifo none full; do
  timeout 60 python3 -m segcli run sample_docs/hamlet.txt sample_docs/milton_areopagitica.txt sample_docs/python_docs.txt \
    --model /tmp/run/model --memory $p --device cuda --dtype float32 --format jsonl --quiet | grep '"summary"' \
    | python3 -c "import json,sys; d=json.load(sys.stdin); print('$p', 'bpb', round(d['bits_per_byte'],4), 'loss', round(d['loss'],4), 'gap', d['boundary']['gap'])"
done 2>&1 | tee -a "$OUT/gpu.log"
