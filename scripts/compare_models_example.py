"""The README's `segcli compare --model A,B` example: a small transformer (Llama architecture) under a fifo memory next
to a Mamba2, whose recurrent state is its memory, at a similar number of memory bytes, on one sample document.

    python scripts/compare_models_example.py                  # build both models under /tmp/segcli-compare, print the command
    python scripts/compare_models_example.py --run            # ... and run it (a table on a terminal)
    python scripts/compare_models_example.py --out DIR --run -- --format jsonl   # extra arguments go to segcli compare

Both models are built from their configs with random weights (seed 0) and saved with segcli's bundled tokenizer
(vocabulary 8,192), so they need no download and tokenize the document identically. Random weights predict about
as badly as each other: the example shows what the table reports (bits per byte, tokens/s, memory bytes per model),
not which architecture models text better. The transformer has 4 layers of 4 query heads and 2 key-value heads of 64
(hidden 256); the Mamba2 4 layers of 8 heads of 64 (hidden 256, expand 2) with a 64-wide SSM state. The report's
memory.bytes counts what the memory's tensors hold: for fifo its buffer (room for 2 x 64 pairs at --memory-size 64
and segments of 32, with each key's and value's norm), for the Mamba2 its conv and SSM states; both about 0.55 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "segcli" / "bundled" / "tokenizer.json"
V = 8192
LLAMA = dict(vocab_size=V, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, bos_token_id=0, eos_token_id=0,
             pad_token_id=0)
MAMBA2 = dict(vocab_size=V, hidden_size=256, num_hidden_layers=4, num_heads=8, head_dim=64, expand=2, state_size=64,
              n_groups=1, conv_kernel=4, chunk_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
MEMORY_SIZE = 64
DOC = "sample_docs/hamlet.txt"
SEGMENT_SIZES = "32"
MAX_TOKENS = 2048


def build(out: Path) -> dict[str, Path]:
    """Both models, seeded, saved with the bundled tokenizer; returns name -> folder."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Mamba2Config, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    made = {}
    for name, cfg in (("llama-fifo", LlamaConfig(**LLAMA)), ("mamba2", Mamba2Config(**MAMBA2))):
        torch.manual_seed(0)
        path = out / name
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        made[name] = path
    return made


def command(models: dict[str, Path], extra: list[str]) -> list[str]:
    return ["segcli", "compare", DOC, "--model", ",".join(str(p) for p in models.values()), "--memory", "fifo",
            "--memory-size", str(MEMORY_SIZE), "--segment-sizes", SEGMENT_SIZES, "--max-tokens", str(MAX_TOKENS),
            "--device", "cpu", "--dtype", "float32", "--seed", "0", *extra]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/segcli-compare"), help="where the two models are saved")
    ap.add_argument("--run", action="store_true", help="run the compare command (one torch thread)")
    ap.add_argument("extra", nargs="*", help="more arguments for segcli compare (after --)")
    args = ap.parse_args()
    models = build(args.out)
    cmd = command(models, args.extra)
    print("OMP_NUM_THREADS=1 " + shlex.join(cmd), file=sys.stderr)
    if args.run:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        sys.exit(subprocess.run([sys.executable, "-m", "segcli", *cmd[1:]], cwd=ROOT, env=env).returncode)
    print(json.dumps({k: str(v) for k, v in models.items()}))


if __name__ == "__main__":
    main()
