"""Weight layout for inference on CPU.

`nn.Linear` keeps its weight as (out, in), row-major, and computes x @ W^T. On
the CPU build segcli ships with (MKL), the product reads a weight whose storage
is (in, out)-contiguous markedly faster when x has one row (the token-by-token
case is a matrix-vector product bound by weight bandwidth), and about as fast
with more rows. `column_major_linears` re-stores every Linear weight that way:
same values, same logical shape (out, in), only the strides change, so every
caller (F.linear, tied embeddings, state_dict) sees the same tensor. Measured on
the 2-core CI machine, float32, the bundled model's 25 matmuls of one token run
back to back (`python benchmarks/layout.py`): 4.67 -> 2.87 ms at T = 1 (1.63x);
1.08x at T = 4, 1.04x at 16, 0.96x at 128 (within run-to-run noise).
"""

from __future__ import annotations

import torch
from torch import nn


def column_major(w: torch.Tensor) -> torch.Tensor:
    """w (out, in) -> the same values with (in, out)-contiguous storage, shape (out, in)."""
    return w.detach().t().contiguous().t()


@torch.no_grad()
def column_major_linears(model: nn.Module) -> int:
    """Re-store every nn.Linear weight of `model` column-major (see module doc), in place.

    Weights shared between modules (a tied lm_head and token embedding) stay one
    tensor. Returns how many distinct weights were re-stored.

    The model's other parameters are copied as well, so that no tensor still points
    into the file it was loaded from: transformers memory-maps safetensors checkpoints,
    the re-storing reads every weight through that map, and one small tensor left in it
    (a norm, a bias) keeps every page read resident. A random Qwen2.5-0.5B-shaped model
    (1.9 GB of float32 weights): 4.2 GB RSS after `load_backend` without the copies,
    2.3 GB with them (benchmarks/hf_size.py).
    """
    new: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        if type(mod) is nn.Linear:  # subclasses (quantized layers) may rely on their own layout
            w = mod.weight
            if id(w) not in new and w.dim() == 2 and w.is_contiguous() and w.is_floating_point():
                new[id(w)] = nn.Parameter(column_major(w), requires_grad=w.requires_grad)
    restored = len(new)
    if restored:  # the other parameters (norms, biases: a few MB) get storage of their own too (see above)
        for p in model.parameters():
            if id(p) not in new:
                new[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    for mod in model.modules():  # re-point every holder of a re-stored weight, embeddings included
        for name, p in list(mod.named_parameters(recurse=False)):
            if id(p) in new:
                setattr(mod, name, new[id(p)])
    return restored
