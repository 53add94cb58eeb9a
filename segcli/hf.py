"""Hugging Face causal LMs through the same memory policies (transformers 5 cache layers).

    from segcli.hf import make_cache
    cache = make_cache(model, policy="fifo", memory_size=512)
    model(input_ids, position_ids=pos, **{cache_kwarg(model): cache})

`PolicyLayer` is a transformers `CacheLayerMixin`: `update` hands the attention
[memory slots; the new segment] and folds the segment into the policy's state,
and `get_mask_sizes` tells the mask builder that every query sees every memory
slot and, causally, its own segment. The policy objects are the ones the native
model uses (`segcli.memory`): one copy of the math.

Positions: pass explicit `position_ids` (absolute positions; `make_cache` users
who do not pass them get `cache.get_seq_length()`, which counts every token seen,
so they are absolute too). Keys sit in the cache rotated at their absolute
positions, so rotary models keep exact relative positions under eviction; `sink`
re-rotates its sink keys next to the window with the model's own inverse
frequencies (StreamingLLM). Models with learned absolute positions (GPT-2) cannot
be re-positioned: past `max_position_embeddings` they stop with a clear error.

The `linear` policy needs the attention itself to change (a linear read mixed in
by a gate), so it runs through segcli's attention function ("segcli", see
`register_attention`) with a fixed gate of 0.5 per head (HF models have no trained gate); with
another attention implementation `make_cache(policy="linear")` refuses.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface, Cache
from transformers.cache_utils import CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .memory import MemoryPolicy, make_policy
from .memory.base import LayerStats
from .ops.attention import attend
from .ops.linear_attention import read_memory
from .ops.rope import rope_cos_sin, apply_rope

LINEAR_GATE = 0.5


def rotary_shift_fn(model) -> Any:
    """shift(k, delta): rotate post-RoPE keys by delta positions with the model's own frequencies."""
    rot = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if rot is None or not hasattr(rot, "inv_freq"):
        return lambda k, delta: k  # learned positions: nothing to re-rotate
    inv = rot.inv_freq.detach().to(torch.float64)

    def shift(k: Tensor, delta: int) -> Tensor:
        if delta == 0 or k.shape[2] == 0:
            return k
        rd = 2 * inv.shape[0]  # rotary dims (partial rotary: the first rd dims)
        cos, sin = rope_cos_sin(torch.tensor([delta], device=k.device), inv.to(k.device), k.dtype)
        return torch.cat([apply_rope(k[..., :rd], cos[0], sin[0]), k[..., rd:]], -1)

    return shift


class PolicyLayer(CacheLayerMixin):
    """One layer's memory under a segcli policy, as a transformers cache layer."""

    is_sliding = False
    is_compileable = False

    def __init__(self, policy: MemoryPolicy, shift_keys=None):
        super().__init__()
        self.policy = policy
        self.shift_keys = shift_keys or (lambda k, d: k)
        self.state: Any = None
        self.read_state: Any = None  # linear: the state before the current segment
        self.seen = 0
        self.n_slots = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.state = self.policy.init_state(b, h, d, device=key_states.device, dtype=key_states.dtype)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.policy.kind == "linear":
            self.read_state, keys, values = self.state, key_states, value_states
            self.state = self.policy.update(self.state, key_states, value_states, key_states)
        else:  # [memory; segment], a view of the policy's buffer where it can be
            self.state, keys, values, _ = self.policy.extend(self.state, key_states, value_states, key_states, self.shift_keys)
        self.seen += key_states.shape[2]
        self.n_slots = self.policy.slots(self.state)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # kv index j stands for position j + offset: memory slots land before every query, the segment causally.
        return self.n_slots + query_length, self.seen - self.n_slots

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        cap = self.policy.capacity(1)
        return -1 if cap is None else cap

    def stats(self) -> LayerStats:
        if self.state is None:
            return LayerStats(0, self.policy.capacity(1), 0, 0.0, 0.0, 0, 0.0)
        return self.policy.stats(self.state)


class SegcliCache(Cache):
    """A transformers Cache whose layers keep a bounded memory under one segcli policy."""

    def __init__(self, policy: MemoryPolicy, num_layers: int, shift_keys=None):
        super().__init__(layers=[PolicyLayer(policy, shift_keys) for _ in range(num_layers)])
        self.policy = policy
        self.masses: list[Tensor] = []  # filled by segcli's attention function

    @property
    def seen(self) -> int:
        return self.layers[0].seen

    def stats(self) -> list[LayerStats]:
        return [layer.stats() for layer in self.layers]


def make_cache(model, policy: str | MemoryPolicy = "fifo", **sizes: int) -> SegcliCache:
    """A cache for `model(..., cache=...)` / `model.generate(..., cache=...)` under `policy`."""
    pol = make_policy(policy, **sizes) if isinstance(policy, str) else policy
    cfg = model.config.get_text_config()
    if pol.kind == "linear" and cfg._attn_implementation != "segcli":
        raise ValueError("the linear memory changes the attention itself: load the model with attn_implementation='segcli'")
    return SegcliCache(pol, cfg.num_hidden_layers, rotary_shift_fn(model))


def _repeat_kv(x: Tensor, n: int) -> Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def segcli_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """[memory; segment] attention with the memory mass recorded (and the linear memory's read)."""
    t = query.shape[2]
    n_rep = query.shape[1] // key.shape[1]
    k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    m = k.shape[2] - t
    out, mass = attend(query, k, v, m, k[:, :, m:], v[:, :, m:], scale=scaling)
    layer = getattr(module, "_segcli_layer", None)
    if layer is not None and layer.policy.kind == "linear" and layer.read_state is not None and layer.read_state.n:
        st = layer.read_state
        mu, nu = _repeat_kv(st.mu, n_rep), _repeat_kv(st.nu, n_rep)
        a_mem = read_memory(query, type(st)(mu=mu, nu=nu, n=st.n))
        out = LINEAR_GATE * a_mem + (1 - LINEAR_GATE) * out
        mass = torch.full_like(query[..., 0], LINEAR_GATE)
    sink = getattr(module, "_segcli_masses", None)
    if sink is not None and mass is not None:
        sink.append(mass.float().mean())
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register segcli's attention function (and its mask) with transformers under "segcli"; returns the name.
    Called by the loaders that need it, not at import: importing this module changes nothing in transformers."""
    AttentionInterface.register("segcli", segcli_attention)
    AttentionMaskInterface.register("segcli", sdpa_mask)
    return "segcli"



def cache_kwarg(model) -> str:
    """The name of `model.forward`'s cache argument: `cache` in recent transformers 5 releases (5.24 has it and
    deprecates `past_key_values`), `past_key_values` in earlier ones (5.17). A name the forward does not take
    would be swallowed by its **kwargs and the model would silently run with a fresh cache, without memory."""
    return _cache_kwarg_of(type(model))


@functools.cache
def _cache_kwarg_of(cls: type) -> str:  # once per model class: signature() costs ~50 us, a token step ~5 ms
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
