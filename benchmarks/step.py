"""The native model's step, old code against new, interleaved segment by segment in one process.

    git worktree add /tmp/base <old commit>
    OMP_NUM_THREADS=1 python benchmarks/step.py --base /tmp/base --segment-sizes 16,128 --segments 40

Loads the bundled model (fifo 512 by default) in this checkout's code and, from the `--base` checkout, the
old `SegLMForCausalLM` and memory policies (imported as the package `segcli_base`) with the same weights and
the same CPU weight layout. Both fill their memory with the same 1,024 tokens (segments of 128), then step the
same segments of n_s tokens, alternating old and new segment by segment, `model(ids, memory)` and nothing
else. Prints per segment size the tokens/s of each, new over old, and the largest difference in logits and in
the attention mass on memory between the two (the change should leave the numbers the same).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def import_base(root: Path):
    """The package `segcli` of another checkout, imported as `segcli_base`."""
    spec = importlib.util.spec_from_file_location("segcli_base", root / "segcli" / "__init__.py",
                                                  submodule_search_locations=[str(root / "segcli")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["segcli_base"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="checkout of the old code")
    ap.add_argument("--segment-sizes", default="16,128")
    ap.add_argument("--segments", type=int, default=40, help="timed segments per size and side")
    ap.add_argument("--memory", default="fifo")
    ap.add_argument("--memory-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from loops import corpus_text, tokenized
    from segcli.backends import load_backend
    from segcli.config import RunConfig

    cfg = RunConfig(memory=args.memory, memory_size=args.memory_size, device="cpu")
    backend = load_backend(cfg)
    new = backend.model
    base = import_base(args.base.resolve())
    import segcli_base.models.seglm.modeling_seglm as old_modeling
    from segcli_base.ops.layout import column_major_linears

    old = old_modeling.SegLMForCausalLM(new.config)
    old.load_state_dict(new.state_dict())
    old.eval()
    column_major_linears(old)
    ids_all = torch.tensor(tokenized(backend, corpus_text()).input_ids)[None]
    fill = 1024
    print(f"base: {args.base} ({base.__name__}); memory {args.memory} {args.memory_size}; threads {args.threads}")
    with torch.inference_mode():
        for ns in (int(s) for s in args.segment_sizes.split(",")):
            mems = {}
            for name, model in (("old", old), ("new", new)):
                mem = model.new_memory(args.memory, 1, memory_size=args.memory_size)  # each side's own policy
                for j in range(0, fill, 128):
                    mem = model(ids_all[:, j : j + 128], mem).memory
                mems[name] = mem
            secs = {"old": 0.0, "new": 0.0}
            dl = dm = 0.0
            warm = 3
            for i in range(warm + args.segments):
                ids = ids_all[:, fill + i * ns : fill + (i + 1) * ns]
                outs = {}
                order = ("old", "new") if i % 2 else ("new", "old")  # alternate which goes first
                for name in order:
                    model = old if name == "old" else new
                    t0 = time.perf_counter()
                    out = model(ids, mems[name])
                    dt = time.perf_counter() - t0
                    mems[name] = out.memory
                    outs[name] = out
                    if i >= warm:
                        secs[name] += dt
                dl = max(dl, float((outs["old"].logits - outs["new"].logits).abs().max()))
                if outs["old"].memory_mass is not None:
                    dm = max(dm, float((outs["old"].memory_mass - outs["new"].memory_mass).abs().max()))
            tok = args.segments * ns
            r_old, r_new = tok / secs["old"], tok / secs["new"]
            print(f"n_s={ns}: old {r_old:,.1f} tok/s, new {r_new:,.1f} tok/s, new/old {r_new / r_old:.3f}x; "
                  f"max |logits diff| {dl:.2e}, max |mass diff| {dm:.2e}")


if __name__ == "__main__":
    main()
