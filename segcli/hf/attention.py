"""The model's own attention, reached from outside: the masks of a plain forward narrowed to what a stream sees
(`extra_mask`, `visible_in_stream`, the reference `segcli check` compares with), hooks that read its
probabilities, segcli's attention function, and the name of the forward's cache argument (`cache_kwarg`).

The `linear` policy needs the attention itself to change (a linear read mixed in by a gate), so it runs
through segcli's attention function ("segcli", see `register_attention`): the model's own eager attention
function over the segment, plus the linear read with a fixed gate of 0.5 per head (HF models have no trained
gate).

The attention mass on memory comes from the model's own attention probabilities where it returns them (eager:
`track_memory_mass`); SDPA returns none, and the mass is then not reported (None). tova, h2o and snapkv evict by
the probabilities of the model's own eager attention, handed to their `observe` by a hook per attention module.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, Iterator

import torch
from torch import Tensor
from transformers import AttentionInterface, masking_utils

from ..errors import UsageError
from ..ops.linear_attention import read_memory
from .features import _eager_of, attention_modules, text_config
from .layers import _PENDING, PolicyLayer, SegcliCache

LINEAR_GATE = 0.5


# -- the model's own reference: one plain forward with an extra mask -----------------------------------------------

@contextlib.contextmanager
def extra_mask(model, allowed: Callable) -> Iterator[list]:
    """Within the block, every mask the model builds through transformers' mask interface is and-ed with
    `allowed(batch_idx, head_idx, q_idx, kv_idx)` (positions), the layer types' own patterns kept: one plain
    forward then computes e.g. a sliding window intersected with the model's own windows. Yields a list that
    gets one entry per mask built (empty: the model builds none this way, and the block changed nothing)."""
    impl = text_config(model)._attn_implementation
    table = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    original = table[impl]
    calls: list = []

    def masked(*args, mask_function=masking_utils.causal_mask_function, **kwargs):
        calls.append(1)
        kwargs["allow_is_causal_skip"] = False
        return original(*args, mask_function=masking_utils.and_masks(mask_function, allowed), **kwargs)

    had_local = impl in table._local_mapping
    table[impl] = masked
    try:
        yield calls
    finally:
        if had_local:
            table[impl] = original
        else:
            del table[impl]


def visible_in_stream(policy: str, segment_size: int, memory_size: int, start: int = 0) -> Callable:
    """allowed(b, h, q, kv) for a forward whose positions are absolute: what a query at position q sees of position kv
    when streamed at `segment_size` under fifo (memory_size slots), xl, none or full (causality is the model's own),
    the segments counted from position `start` (0: a plain forward of the whole stream; the first position of a pass
    of several segments, as `backends.hf` computes them)."""
    n, c, p0 = segment_size, memory_size, start
    if policy == "full":
        return lambda b, h, q, kv: kv >= 0
    if policy == "none":
        return lambda b, h, q, kv: kv >= p0 + (q - p0) // n * n
    if policy == "xl":
        return lambda b, h, q, kv: kv >= p0 + (q - p0) // n * n - n
    if policy == "fifo":
        return lambda b, h, q, kv: kv >= p0 + (q - p0) // n * n - c
    raise ValueError(f"no plain-forward mask for --memory {policy}")


# -- attention mass on memory, from the model's own probabilities ---------------------------------------------------

def _hooks_once(model, attr: str, install: Callable) -> list:
    """`install(module)` on every attention module, once per model (the handles kept as `model.<attr>`)."""
    handles = getattr(model, attr, None)
    if handles is None:
        handles = [install(m) for m in attention_modules(model)]
        setattr(model, attr, handles)
    return handles


def _mass_hook(module, args, kwargs, output) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("layer_past")))
    if not isinstance(cache, SegcliCache) or not isinstance(output, tuple) or len(output) < 2:
        return
    idx = module.layer_idx  # None: one module shared by several layers (zamba's shared attention block)
    if not isinstance(idx, int) or idx >= len(cache.layers):  # or reading another's pairs, without a layer (gemma3n)
        return
    layer = cache.layers[idx]
    w = output[1]
    if not isinstance(layer, PolicyLayer) or layer.policy.kind == "linear" or not isinstance(w, Tensor):
        return
    m = layer.visible
    if w.dim() != 4 or w.shape[-1] != m + w.shape[-2]:  # not (B, H, T, m + T) probabilities of this segment
        return
    if m:
        layer.mass = w[..., :m].float().sum(-1).mean()  # the share on memory
    if layer.policy.needs_attention and layer.state.pending:  # evict by the attention the segment just paid
        q = layer.policy.score_queries(w.shape[-2])
        heads = layer.state.k.shape[1]
        a = w[:, :, -q:].float().sum(2)  # (B, H, m + T): summed over the last q queries
        a = a.reshape(a.shape[0], heads, -1, a.shape[-1]).sum(2)  # (B, H_kv, m + T): over each group's heads
        # on a copy, never in place: the model may still read what `update` returned after this hook (gemma3n's
        # shared_kv_states feed its later layers the [memory; segment] this layer read)
        layer.state = layer.policy.evict(layer.state, a, in_place=False)
        layer.n_slots = layer.policy.slots(layer.state)


def track_memory_mass(model) -> list:
    """Forward hooks (installed once per model) that read each attention module's own probabilities (eager
    attention returns them) into its cache layer: the mass on memory, and for the policies that evict by
    attention (tova, h2o, snapkv) their `observe`. SDPA returns none: nothing is recorded. Returns the handles."""
    return _hooks_once(model, "_segcli_hooks", lambda m: m.register_forward_hook(_mass_hook, with_kwargs=True))


# -- segcli's attention function: the linear memory's read ------------------------------------------------------------

def _repeat_kv(x: Tensor, n: int) -> Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def segcli_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """The model's own eager attention over the segment, plus the linear memory's read mixed in by a fixed gate."""
    eager = _eager_of(module)
    if eager is None:
        raise UsageError(f"{type(module).__name__} has no eager attention function segcli can wrap for --memory linear")
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)  # out (B, T, H, D)
    layer = getattr(_PENDING, "layer", None)
    _PENDING.layer = None
    if layer is None or layer.index != getattr(module, "layer_idx", -1):
        return out, weights
    st = layer.read_state
    if st is not None and st.n:
        n_rep = query.shape[1] // st.mu.shape[1]
        a_mem = read_memory(query, type(st)(mu=_repeat_kv(st.mu, n_rep), nu=_repeat_kv(st.nu, n_rep), n=st.n))
        out = LINEAR_GATE * a_mem.transpose(1, 2).to(out.dtype) + (1 - LINEAR_GATE) * out
        layer.mass = torch.tensor(LINEAR_GATE)
    return out, weights


def register_attention() -> str:
    """Register segcli's attention function (and its mask: eager's additive one) with transformers under "segcli";
    returns the name. Called by the loaders that need it, not at import: importing this module changes nothing."""
    AttentionInterface.register("segcli", segcli_attention)
    masking_utils.AttentionMaskInterface.register("segcli", masking_utils.eager_mask)
    return "segcli"


def cache_kwarg(model) -> str:
    """The name of `model.forward`'s cache argument: `cache` in recent transformers 5 releases (5.24 has it and
    deprecates `past_key_values`), `past_key_values` in earlier ones (5.17). A name the forward does not take
    would be swallowed by its **kwargs and the model would silently run with a fresh cache, without memory."""
    return _cache_kwarg_of(type(model))


@functools.cache
def _cache_kwarg_of(cls: type) -> str:  # once per model class: signature() costs ~50 us, a token step ~5 ms
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
