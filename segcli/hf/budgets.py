"""Per-layer budgets: each layer's own columns of the one mask.

Per-layer budgets (`--layer-budget pyramid`: each layer its own number of slots, PyramidKV's schedule) are exact
where every layer is full attention in the absolute frame: transformers builds one mask per layer type from one
layer's sizes, so `SegcliCache.get_mask_sizes` sizes it by the layer that sees the most slots (v), and a forward
pre-hook on each attention module (`_budget_hook`) hands it the mask's newest v_l + T columns, those of its own keys
[its v_l slots; segment] (eager and SDPA use the mask as given; SDPA's causal skip, a None mask, comes only with
one query or with no memory in any layer, where every layer needs none). `budget_check` verifies it once per model
on seven tokens against one plain forward with a window per layer (`layer_masks`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, Iterator

import torch
from torch import Tensor

from ..memory import MemoryPolicy, make_policy
from ..memory.scored import layer_budgets
from .attention import _hooks_once, cache_kwarg, extra_mask, visible_in_stream
from .features import Features, attention_modules, model_features, text_config
from .layers import PolicyLayer, SegcliCache


def per_layer_budgets(policy: MemoryPolicy) -> bool:
    """Whether `policy` gives each layer its own number of slots (--layer-budget pyramid on a policy that sizes
    its layers by it; the others hold the same slots in every layer whatever the option says)."""
    return getattr(policy, "layer_budget", "uniform") != "uniform" and (
        policy.kind == "linear" or "layer_budget" in policy.parameters)


def _budget_refusal(features: Features, policy: MemoryPolicy) -> str | None:
    """Why per-layer budgets cannot be streamed exactly on this model (None: they can). transformers builds one
    mask per layer type from one layer's sizes; segcli sizes it by the layer that sees the most slots and hands each
    full-attention layer the mask's newest columns (`_budget_hook`). Windows, shared layers and ALiBi do not follow."""
    f, name, budget = features.family, policy.name, policy.layer_budget
    if policy.kind == "linear":
        return (f"{f}: --layer-budget {budget} sizes each layer's slots, and --memory linear keeps no slots (one "
                "d_k x d_v state per head); use --layer-budget uniform")
    odd = [k for k in features.layers if k.kind != "full"]
    if odd:
        k = odd[0]
        what = (f"its {k.kind}-window layers (window {k.window})" if k.window else
                "its layers that read another layer's pairs")
        return (f"{f}: --layer-budget {budget} --memory {name}: {what} are masked by transformers from one layer's "
                "sizes per layer type, and segcli narrows that mask per layer only where every layer is full "
                "attention; use --layer-budget uniform")
    if features.alibi:
        return (f"{f}: --layer-budget {budget} --memory {name}: its ALiBi biases are built over one kv length for "
                "every layer, not over each layer's own slots; use --layer-budget uniform")
    return None


@functools.cache
def _mask_position(cls: type) -> int | None:
    """Where `attention_mask` sits among the positional arguments of the module's forward (None: not there)."""
    names = [p for p in inspect.signature(cls.forward).parameters if p != "self"]
    return names.index("attention_mask") if "attention_mask" in names else None


def _swap_mask(module, args: tuple, kwargs: dict, change: Callable) -> tuple | None:
    """(args, kwargs) with the module's attention mask replaced by change(mask), or None (no 4-D mask found)."""
    if "attention_mask" in kwargs:
        mask = kwargs["attention_mask"]
        if isinstance(mask, Tensor) and mask.dim() == 4:
            return args, {**kwargs, "attention_mask": change(mask)}
        return None
    i = _mask_position(type(module))
    if i is not None and i < len(args) and isinstance(args[i], Tensor) and args[i].dim() == 4:
        return (*args[:i], change(args[i]), *args[i + 1 :]), kwargs
    return None


def _budget_hook(module, args, kwargs):
    """Before a layer's attention: the mask (B, 1, T, v + T) is sized by the layer that sees the most slots (v, see
    `SegcliCache.get_mask_sizes`); this layer's keys are [its v_l slots; segment], positions seen - v_l ..: its
    columns are the newest v_l + T. A None mask (SDPA's causal skip: one query, or no memory anywhere) needs none."""
    cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("layer_past")))
    if not isinstance(cache, SegcliCache) or not cache.per_layer:
        return None
    idx = module.layer_idx
    if not isinstance(idx, int) or idx >= len(cache.layers) or not isinstance(cache.layers[idx], PolicyLayer):
        return None
    layer = cache.layers[idx]  # not yet updated with this segment: its slots are those the mask was sized for

    def own(mask: Tensor) -> Tensor:
        keep = layer._visible() + mask.shape[-2]
        return mask[..., -keep:] if mask.shape[-1] > keep else mask

    return _swap_mask(module, args, kwargs, own)


def track_budget_masks(model) -> list:
    """Forward pre-hooks (installed once per model) that hand each attention module its own columns of the mask
    under per-layer budgets (`_budget_hook`); they change nothing for any other cache. Returns the handles."""
    return _hooks_once(model, "_segcli_budget_hooks",
                       lambda m: m.register_forward_pre_hook(_budget_hook, with_kwargs=True))


@contextlib.contextmanager
def layer_masks(model, allowed: list[Callable]) -> Iterator[list]:
    """Within the block, a plain forward (no cache) of the model's own attention in which layer l's mask is also
    and-ed with `allowed[l](b, h, q, kv)` (positions): the reference for per-layer memories. Masks are
    materialised (no SDPA causal skip). Yields a list that gets one entry per layer mask changed."""
    changed: list = []

    def hook(module, args, kwargs):
        idx = module.layer_idx
        if not isinstance(idx, int) or idx >= len(allowed):
            return None

        def narrow(mask: Tensor) -> Tensor:
            q = torch.arange(mask.shape[-2], device=mask.device)[:, None] + mask.shape[-1] - mask.shape[-2]
            kv = torch.arange(mask.shape[-1], device=mask.device)[None, :]
            ok = allowed[idx](0, 0, q, kv)  # (T, N) positions: no cache, kv index = position
            changed.append(idx)
            if mask.dtype == torch.bool:
                return mask & ok
            return mask.masked_fill(~ok, torch.finfo(mask.dtype).min)

        return _swap_mask(module, args, kwargs, narrow)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    try:
        with extra_mask(model, lambda b, h, q, kv: kv >= 0):
            yield changed
    finally:
        for h in handles:
            h.remove()


def budget_check(model) -> str | None:
    """Why per-layer budgets do not reproduce the model (None: they do), checked once per attention implementation:
    seven tokens at segment size 2 through fifo memories of different sizes per layer (PyramidKV's schedule for
    n_c = 2) against one plain forward whose every layer is masked to its own window (`layer_masks`)."""
    feats = model_features(model)
    done = getattr(model, "_segcli_budget", {})
    if feats.attn in done:
        return done[feats.attn]
    cfg = text_config(model)
    dev = next(model.parameters()).device
    n, ns = 7, 2
    ids = ((torch.arange(n) * 17 + 9) % cfg.vocab_size)[None].to(dev)
    policy = make_policy("fifo", memory_size=2, layer_budget="pyramid")
    track_budget_masks(model)
    try:
        with torch.no_grad():
            cache = SegcliCache(policy, kinds=list(feats.layers), per_layer=True)
            arg = {cache_kwarg(model): cache}
            streamed = torch.cat([model(input_ids=ids[:, s : s + ns], position_ids=torch.arange(s, min(n, s + ns),
                                        device=dev)[None], use_cache=True, **arg).logits
                                  for s in range(0, n, ns)], 1).float()
            budgets = layer_budgets(policy.memory_size, len(cache.memory_layers), policy.layer_budget)
            with layer_masks(model, [visible_in_stream("fifo", ns, c) for c in budgets]) as found:
                plain = model(input_ids=ids, position_ids=torch.arange(n, device=dev)[None]).logits.float()
    except (RuntimeError, ValueError, IndexError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        first_line = (str(e).splitlines() or [""])[0][:120]
        problem = (f"{feats.family}: its forward fails on layers holding different numbers of slots "
                   f"({type(e).__name__}: {first_line})")
    else:
        tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
        diff = float((streamed - plain).abs().max()) / max(1.0, float(plain.abs().max()))
        problem = None
        if len(found) < len(budgets):
            problem = f"{feats.family}: its attention modules take no attention mask segcli can narrow per layer"
        elif diff > tol:
            problem = (f"{feats.family}: per-layer budgets do not reproduce the model's own attention (relative "
                       f"|dlogit| {diff:.1e} on a seven-token check)")
    model._segcli_budget = {**done, feats.attn: problem}
    return problem
