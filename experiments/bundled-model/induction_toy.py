"""The classic induction task on a tiny model: seglm next to a Llama of the same shape.

Rows are a random string (vocabulary 64 unless --vocab, length 4-31) repeated to fill 128 tokens; the loss
counts only the repeats (its first occurrence is unpredictable). A model that has formed
induction heads drives it towards 0; ln V is chance (4.16 at 64). Both models see the same
batches from the same seed, so their curves can be compared step by step: the question it
answers is whether seglm's architecture learns copying more slowly than a standard one.

  python experiments/bundled-model/induction_toy.py --arch seglm --steps 1500
  python experiments/bundled-model/induction_toy.py --arch llama --steps 1500
  python experiments/bundled-model/induction_toy.py --arch seglm --smear-keys --steps 500   # smeared keys (segcli.ops.smear)
  python experiments/bundled-model/induction_toy.py --arch seglm --smear-keys --vocab 8192 --steps 400 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

N, B = 128, 32


def build(arch: str, V: int, smear_keys: bool = False):
    if arch == "seglm":
        from segcli.models.seglm import SegLMConfig, SegLMForCausalLM

        return SegLMForCausalLM(SegLMConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=128, dropout=0.0, smear_keys=smear_keys))
    if smear_keys:
        raise SystemExit("--smear-keys is a seglm option")
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                                        tie_word_embeddings=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("seglm", "llama"), default="seglm")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=64, help="vocabulary size (chance loss ln V)")
    ap.add_argument("--smear-keys", action="store_true", help="seglm with smeared keys (each key + beta x the previous one)")
    ap.add_argument("--init-from", help="a saved seglm folder to start from (its vocabulary; --smear-keys adds the shares)")
    ap.add_argument("--smear-lr-scale", type=float, default=1.0, help="the smeared-key shares learn at lr x this")
    ap.add_argument("--every", type=int, default=100, help="print every this many steps")
    ap.add_argument("--save", help="with --init-from: save the trained model (and the bundled tokenizer) in this folder")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.init_from:
        from segcli.models.seglm import SegLMForCausalLM
        from segcli.train import TrainConfig, make_optimizer

        model = SegLMForCausalLM.from_pretrained(args.init_from, dtype=torch.float32, smear_keys=args.smear_keys)
        V = model.config.vocab_size
        opt = make_optimizer(model, TrainConfig(lr=args.lr, weight_decay=0.0, smear_lr_scale=args.smear_lr_scale),
                             torch.device("cpu"))
    else:
        V = args.vocab
        model = build(args.arch, V, args.smear_keys)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(0)
    t0 = time.time()
    print(f"{args.arch}{' (smeared keys)' if args.smear_keys else ''}: {sum(p.numel() for p in model.parameters()):,} parameters; step, loss on repeats, seconds")
    for step in range(args.steps):
        x = np.zeros((B, N + 1), dtype=np.int64)
        scored = np.ones((B, N + 1), dtype=bool)
        for b in range(B):
            m = int(rng.integers(4, 32))
            x[b] = np.resize(rng.integers(1 if args.init_from else 0, V, m), N + 1)
            scored[b, : m + 1] = False
        x_t, sc = torch.from_numpy(x), torch.from_numpy(scored)
        logits = model(x_t[:, :-1]).logits
        nll = F.cross_entropy(logits.flatten(0, 1), x_t[:, 1:].flatten(), reduction="none").view(B, N)
        loss = nll[sc[:, 1:]].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps - 1:
            print(step, round(loss.item(), 3), round(time.time() - t0), flush=True)
    if args.save and args.init_from:
        import shutil
        from pathlib import Path

        model.save_pretrained(args.save)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(args.init_from) / name, Path(args.save) / name)


if __name__ == "__main__":
    main()
