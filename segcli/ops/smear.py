"""Smeared keys (Olsson et al. 2022, "In-context learning and induction heads", section on
architectural changes): each key also carries a learned share of the previous token's key,

    k'_t = k_t + beta_h * k_{t-1}          (k_{-1} = 0 at the start of a document)

so a single attention layer can match "the token after an earlier copy of my previous token":
an induction (copy) head forms in one layer instead of needing a previous-token head in an
earlier layer. beta starts at 0 (the model is unchanged until training moves it). Applied to
keys already rotated to their positions, so a smeared key keeps relative-position invariance
and is stored, evicted, averaged and re-rotated like any other key.
"""

from __future__ import annotations

import torch
from torch import Tensor


def smear_keys(k: Tensor, prev: Tensor | None, beta: Tensor) -> Tensor:
    """k (B, H, T, D) rotated keys of a segment; prev (B, H, 1, D) the key just before it, or None at
    the start of a document (zeros); beta (H,). Returns k + beta * (k shifted one position right)."""
    if prev is None:
        prev = torch.zeros_like(k[:, :, :1])
    before = prev if k.shape[2] == 1 else torch.cat([prev, k[:, :, :-1]], 2)  # (B, H, T, D): k_{t-1}
    return torch.addcmul(k, beta.view(1, -1, 1, 1).to(k.dtype), before)
