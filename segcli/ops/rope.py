"""Rotary position embeddings (RoPE), Llama's rotate-half convention.

Angles are computed in float64 and cast afterwards: at position 10^6 a float32
angle is off by ~0.06 rad, which would make long streams drift.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inv_frequencies(head_dim: int, theta: float, device=None) -> Tensor:
    """(head_dim/2,) float64 inverse frequencies."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    return 1.0 / (theta**exponent)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions (T,) int or float -> cos, sin (T, head_dim) in `dtype`."""
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., T, D), cos/sin (T, D) -> x rotated to the positions cos/sin were made for (x's dtype)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def signed_sin(sin: Tensor) -> Tensor:
    """sin (..., D) -> [-sin_1, sin_2] (the halves): the table `rope_rolled` multiplies the rolled x with."""
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat([-s1, s2], dim=-1)


def rope_rolled(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """`apply_rope(x, cos, sin)` with sin_signed = `signed_sin(sin)` (computed once per table): rotate_half(x) * sin
    = roll(x, D/2) * [-sin_1, sin_2], so x * cos + roll(x) * sin_signed is the same floats (negation is exact)
    in four kernels instead of seven (no chunk, neg, cat)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def shift_rope(x: Tensor, delta: int | float, inv_freq: Tensor) -> Tensor:
    """Rotate already-rotated keys x (..., D) by `delta` more positions (rotations compose)."""
    if delta == 0:
        return x
    cos, sin = rope_cos_sin(torch.tensor([delta], device=x.device), inv_freq.to(x.device), x.dtype)
    return apply_rope(x, cos[0], sin[0])


def shift_rope_each(x: Tensor, deltas: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotated keys x (B, H, S, D) shifted by each of T deltas (T,) -> (B, H, T, S, D): row t is
    `shift_rope(x, deltas[t])`, with the same float operations (a zero shift leaves the keys exact)."""
    cos, sin = rope_cos_sin(deltas, inv_freq.to(x.device), x.dtype)  # (T, D)
    return apply_rope(x[:, :, None], cos[:, None], sin[:, None])
