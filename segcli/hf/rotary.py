"""sink: re-rotating keys with the model's own rotary rule.

Keys sit in the cache rotated at their absolute positions; `sink` re-rotates its sinks with the shift
`rotary_shifts` finds per layer by checking it against the model's own keys at shifted positions (half-split or
interleaved rotary, partial rotary, one frequency set per layer type, NoPE layers; refused where no rule reproduces
the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from ..errors import UsageError
from .attention import cache_kwarg
from .features import model_features, text_config


def _rotate(k: Tensor, ang: Tensor, inv: Tensor, interleaved: bool, offset: int) -> Tensor:
    """k (..., D) rotated by the angles ang (rd/2,) or (T, rd/2) (one row per row of k's T) on dims offset ..
    offset + rd, rd = 2 len(inv): delta more positions is ang = delta inv."""
    rd = 2 * inv.shape[0]
    cos, sin = ang.cos().to(k.dtype), ang.sin().to(k.dtype)
    x = k[..., offset : offset + rd]
    if interleaved:  # pairs (2i, 2i + 1) share frequency i (GPT-J, Cohere, GLM)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        r = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
    else:  # halves (i, i + rd/2) share frequency i (Llama's rotate_half)
        x1, x2 = x[..., : rd // 2], x[..., rd // 2 :]
        r = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    return torch.cat([k[..., :offset], r, k[..., offset + rd :]], -1)


@dataclass(frozen=True)
class Rotary:
    """One layer's rotary rule: which frequencies, on which dims, in which pairing (None inv: no rotation)."""

    inv: Tensor | None = None
    interleaved: bool = False
    offset: int = 0

    def __call__(self, k: Tensor, delta: int) -> Tensor:
        if self.inv is None or delta == 0 or k.shape[-2] == 0:
            return k
        return _rotate(k, float(delta) * self.inv.to(k.device, torch.float64), self.inv, self.interleaved, self.offset)

    def each(self, x: Tensor, deltas: Tensor) -> Tensor:
        """x (..., T, D) with row t moved by deltas[t] (T,) more positions: one shift per query of a pass."""
        if self.inv is None:
            return x
        ang = deltas.to(x.device, torch.float64)[:, None] * self.inv.to(x.device, torch.float64)[None]  # (T, rd/2)
        return _rotate(x, ang, self.inv, self.interleaved, self.offset)

    def describe(self) -> str:
        if self.inv is None:
            return "none"
        return f"{'interleaved' if self.interleaved else 'half-split'} on dims {self.offset}..{self.offset + 2 * len(self.inv)}"


def _inv_freqs(model) -> list[Tensor]:
    """Candidate rotary frequency sets: every `*inv_freq` buffer, and the frequencies of every sin/cos position
    table (GPT-J, CodeGen keep `embed_positions` (P, rd) = [sin(p f) | cos(p f)] instead)."""
    found: list[Tensor] = []

    def add(f: Tensor) -> None:
        if not any(g.shape == f.shape and torch.allclose(g, f, rtol=1e-6, atol=0) for g in found):
            found.append(f)

    for mod in model.modules():
        for name, buf in mod.named_buffers(recurse=False):
            if not buf.is_floating_point() or "original" in name:
                continue
            if name.endswith("inv_freq") and buf.dim() == 1:
                add(buf.detach().double().cpu())
            elif buf.dim() == 2 and buf.shape[0] >= 3 and buf.shape[1] >= 2 and buf.shape[1] % 2 == 0:
                t = buf.detach()[:3].double().cpu()
                h = t.shape[1] // 2
                if not (torch.allclose(t[0, :h], t.new_zeros(h)) and torch.allclose(t[0, h:], t.new_ones(h))):
                    continue
                f = torch.atan2(t[1, :h], t[1, h:])  # the angle of position 1: the frequencies themselves
                if torch.allclose(t[2], torch.cat([(2 * f).sin(), (2 * f).cos()]), atol=1e-5):
                    add(f)
    return found


def _probe_keys(model, start: int, n: int) -> list[Tensor | None]:
    """Every layer's keys for the same n tokens placed at positions start .. start + n - 1 (transformers' cache)."""
    cfg = text_config(model)
    ids = (torch.arange(n) * 7 + 3) % cfg.vocab_size
    dev = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[None].to(dev), position_ids=torch.arange(start, start + n, device=dev)[None],
              use_cache=True, **{cache_kwarg(model): cache})
    out = []
    for layer in cache.layers:
        k = getattr(layer, "keys", None)
        out.append(k[:, :, -n:].float() if isinstance(k, Tensor) and k.dim() == 4 and k.shape[2] >= n else None)
    return out


def rotary_shifts(model) -> list[Rotary]:
    """Per layer, the shift that moves the model's own keys by delta positions, checked against the model: its
    keys for the same tokens at positions p and p + 5 must be the shift of each other. Raises UsageError where
    no rule (half-split or interleaved, on the first or last dims, with any of the model's frequency sets, or no
    rotation) reproduces them."""
    cached = getattr(model, "_segcli_rotary", None)
    if cached is not None:
        return cached
    feats = model_features(model)
    invs = _inv_freqs(model)
    learned = "learned absolute positions" in feats.limit_reason  # keys keep their own positions: nothing to move
    n, delta = 3, 5
    at0, shifted = _probe_keys(model, 0, n), _probe_keys(model, delta, n)
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    rules: list[Rotary] = []
    for i, (k0, k1) in enumerate(zip(at0, shifted)):
        if k0 is None:
            rules.append(Rotary())
            continue
        d = k0.shape[-1]
        candidates = [Rotary()] + [Rotary(inv, il, off) for inv in invs if 2 * inv.shape[0] <= d
                                   for il in (False, True) for off in sorted({0, d - 2 * inv.shape[0]})]
        scale = float(k1.abs().max()) or 1.0
        errors = [float((c(k0.double(), delta) - k1.double()).abs().max()) / scale for c in candidates]
        best = min(range(len(candidates)), key=errors.__getitem__)
        if errors[best] > tol and learned and not invs:
            best = 0
        elif errors[best] > tol:
            raise UsageError(
                f"{feats.family}: the keys of layer {i} do not follow a rotary rule segcli can re-apply (best match "
                f"off by {errors[best]:.1e}), so --memory sink cannot move its sinks; use fifo or full")
        rules.append(candidates[best])
    model._segcli_rotary = rules
    return rules
