"""Does a model copy? A quick probe of in-context copying (induction), for use during training.

For each gap, B rows of [BOS; passage; filler of `gap` tokens; passage again] go through the
model in one segment with `full` memory (= one causal forward), and the script prints the mean
loss on the passage's first and second occurrence (first token of each skipped). Two kinds of
passage: a string of tokens drawn from the held-out sample documents' unigram distribution
(only copying predicts its repeat) and a natural-text passage from them. A model that copies
shows a repeat loss far below the first-occurrence loss; one that does not shows them equal.
Filler is text from elsewhere in the documents. Held-out text only, so it never saw these.

  python experiments/bundled-model/copy_probe.py --model runs/seglm-bundled-recall/model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segcli.backends import load_backend
from segcli.config import RunConfig

SAMPLES = Path(__file__).resolve().parents[2] / "sample_docs"
DOCS = ("hamlet.txt", "milton_areopagitica.txt", "python_docs.txt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--gaps", default="0,300,1000", help="filler tokens between the two occurrences")
    ap.add_argument("--length", type=int, default=64, help="passage length in tokens")
    ap.add_argument("--rows", type=int, default=8, help="rows per gap and kind")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    backend = load_backend(RunConfig(model=args.model, memory="full", device="cpu", dtype="float32"))
    ids = np.concatenate([np.array(backend.tokenizer.encode((SAMPLES / d).read_text(encoding="utf-8")).ids) for d in DOCS])
    rng = np.random.default_rng(args.seed)
    bos = [] if backend.bos_id is None else [backend.bos_id]
    n = args.length
    results = []
    for gap in (int(g) for g in args.gaps.split(",")):
        for kind in ("unigram", "text"):
            rows = []
            for _ in range(args.rows):
                if kind == "unigram":
                    passage = ids[rng.integers(0, len(ids), n)]
                else:
                    s = int(rng.integers(0, len(ids) - n))
                    passage = ids[s : s + n]
                f = int(rng.integers(0, len(ids) - gap))
                rows.append(np.concatenate([bos, passage, ids[f : f + gap], passage]))
            x = torch.from_numpy(np.stack(rows)).long()
            with torch.inference_mode():
                logits, _, _ = backend.step(x[:, :-1], backend.new_memory(RunConfig(memory="full"), batch=len(rows)))
                nll = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="none").view(len(rows), -1)
            b = len(bos)  # target index t predicts x[t + 1]
            first = nll[:, b : b + n - 1].mean().item()  # x[b+1 .. b+n-1]: the passage after its first token
            second = nll[:, -(n - 1) :].mean().item()
            results.append({"kind": kind, "gap": gap, "length": n, "first": first, "repeat": second, "ratio": second / first})
    print("| passage | gap | loss first | loss repeat | ratio |\n|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['kind']} | {r['gap']} | {r['first']:.3f} | {r['repeat']:.3f} | {r['ratio']:.2f} |")
    print(json.dumps({"model": args.model or "bundled", "results": results}))


if __name__ == "__main__":
    main()
