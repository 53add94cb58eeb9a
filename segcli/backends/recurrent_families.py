"""Recurrent and hybrid families: how each makes, continues, describes and saves a stream's state.

A family is one `Family` object (how its stream state is made, how the forward continues it, what its parts are),
looked up by model type in `FAMILIES`; every family that uses transformers' Cache API for its states (conv and
recurrent states in `LinearAttentionLayer`s) is the base `Family`, with no code of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import UsageError
from ..memory import MemoryPolicy
from ..memory.recurrent_state import StateStats, attention_stats, recurrent_stats


def layer_types(model_cfg) -> list[str]:
    cfg = model_cfg.get_text_config() if hasattr(model_cfg, "get_text_config") else model_cfg
    types = getattr(cfg, "layer_types", None) or getattr(cfg, "layers_block_type", None) or []
    return list(types) if isinstance(types, (list, tuple)) else []


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_argument(model) -> str:
    """The name the model's forward takes its cache under: `cache` (transformers 5.24), `cache_params` (the mamba
    family in 5.17) or `past_key_values` (other families in 5.17). A wrong name would be swallowed by **kwargs and
    the model would run every segment from an empty state."""
    params = _forward_parameters(type(model))
    for name in ("cache", "cache_params", "past_key_values"):
        if name in params:
            return name
    raise UsageError(f"{model.config.model_type}: its forward takes no cache argument; segcli cannot carry its state")


class Family:
    """How one family keeps a stream's state. The default: a transformers Cache built from the config."""

    def new_cache(self, model) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def forward(self, model, ids: Tensor, pos: Tensor, cache: Any) -> tuple[Tensor, Any]:
        kw = {cache_argument(model): cache}
        if "position_ids" in _forward_parameters(type(model)):  # absolute positions (bamba's RoPE restarts without)
            kw["position_ids"] = pos
        out = model(input_ids=ids, use_cache=True, **kw)
        return out.logits, cache

    def components(self, model, cache: Any, seen: int) -> list[StateStats]:
        """The memory's parts: attention caches and recurrent states, one StateStats each (see recurrent_state)."""
        from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin

        from ..hf import PolicyLayer

        out = []
        for i, layer in enumerate(getattr(cache, "layers", [])):
            if isinstance(layer, PolicyLayer):
                out.append(StateStats(**dataclasses.asdict(layer.stats()), kind="attention", layer=i))
            elif isinstance(layer, CacheLayerMixin):
                window = getattr(layer, "sliding_window", None)
                out.append(attention_stats(i, _tensor(getattr(layer, "keys", None)), _tensor(getattr(layer, "values", None)),
                                           None if window is None else window - 1, seen))
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                conv = [t for t in layer.conv_states.values() if isinstance(t, Tensor)]
                states = [t for t in layer.recurrent_states.values() if isinstance(t, Tensor)]
                if conv or states or not isinstance(layer, CacheLayerMixin):
                    out.append(recurrent_stats(i, conv, states, [], seen if (conv or states) else 0))
        return out

    def attention_layers(self, model) -> int:
        return sum(t in ("full_attention", "sliding_attention", "chunked_attention", "hybrid", "hybrid_sliding",
                         "attention") for t in layer_types(model.config))

    policy_caches: ClassVar[bool] = True  # whether other policies than full and none can run on its attention layers

    def layer_kinds(self, model) -> tuple[list, dict[int, Any], list[tuple[int, int]]]:
        """Per layer, how its attention part attends (segcli.hf.LayerKind; "shared" for a layer without one), the
        model's own cache layers for the layers without attention, and (index, states) of the layers with both."""
        from transformers import DynamicCache
        from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin

        from ..hf import LayerKind

        types = layer_types(model.config)
        kinds, placeholders, both = [], {}, []
        for i, layer in enumerate(DynamicCache(config=model.config).layers):
            window = getattr(layer, "sliding_window", None)
            chunked = i < len(types) and types[i] == "chunked_attention"
            kind = LayerKind("full") if window is None else LayerKind("chunked" if chunked else "sliding", int(window))
            if isinstance(layer, LinearAttentionCacheLayerMixin) and isinstance(layer, CacheLayerMixin):
                both.append((i, layer.number_of_states))
            elif not isinstance(layer, CacheLayerMixin):  # recurrent or placeholder layers stay the model's own
                placeholders[i] = layer
                kind = LayerKind("shared")
            kinds.append(kind)
        return kinds, placeholders, both

    def policy_cache(self, model, policy: MemoryPolicy) -> Any:
        """A Cache whose attention layers keep `policy`'s memory (segcli.hf's PolicyLayer, with the model's own
        attention and masks) and whose recurrent layers are the model's own."""
        from ..hf import SegcliCache, rotary_shifts

        kinds, placeholders, both = self.layer_kinds(model)
        shifts = rotary_shifts(model) if policy.name == "sink" else None
        cache = SegcliCache(policy, shift_keys=shifts, kinds=kinds, placeholders=placeholders)
        for i, n in both:
            mine = cache.layers[i]
            cache.layers[i] = HybridPolicyLayer(policy, mine.kind, mine.shift_keys, mine.positions, i, mine.frame,
                                                mine.layers, number_of_states=n)
        return cache

    def export(self, model, cache: Any) -> dict[str, Tensor | int]:
        """The state's tensors and counts by name (a memory file's entries: recurrent_files)."""
        from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin

        out: dict[str, Tensor | int] = {}
        for i, layer in enumerate(getattr(cache, "layers", [])):
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                for k, started in layer.has_previous_state.items():
                    for part, states in (("conv", layer.conv_states), ("state", layer.recurrent_states)):
                        if started and isinstance(states.get(k), Tensor):
                            out[f"layer{i}.{part}{k}"] = states[k]
            if isinstance(layer, CacheLayerMixin) and isinstance(getattr(layer, "keys", None), Tensor) \
                    and layer.keys.numel():
                out[f"layer{i}.keys"], out[f"layer{i}.values"] = layer.keys, layer.values
                if hasattr(layer, "cumulative_length"):
                    out[f"layer{i}.cumulative_length"] = int(layer.cumulative_length)
        return out

    def restore(self, model, entries: dict[str, Tensor | int], cache: Any = None) -> Any:
        """A fresh state object (`cache`, else a new one) holding `entries` (as `export` named them; checked by
        recurrent_files)."""
        from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin

        cache = self.new_cache(model) if cache is None else cache
        for i, layer in enumerate(getattr(cache, "layers", [])):
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                for k in layer.has_previous_state:
                    conv, state = entries.get(f"layer{i}.conv{k}"), entries.get(f"layer{i}.state{k}")
                    for t in (conv, state):
                        if t is not None:
                            layer.device, layer.dtype = t.device, t.dtype
                    if conv is not None:
                        layer.conv_states[k], layer.is_conv_states_initialized[k] = conv.clone(), True
                        layer.conv_kernel_size[k] = conv.shape[-1]
                    if state is not None:
                        layer.recurrent_states[k], layer.is_recurrent_states_initialized[k] = state.clone(), True
                    layer.has_previous_state[k] = conv is not None or state is not None
            keys = entries.get(f"layer{i}.keys")
            if isinstance(layer, CacheLayerMixin) and keys is not None:
                layer.device, layer.dtype = keys.device, keys.dtype
                layer.keys, layer.values, layer.is_initialized = keys.clone(), entries[f"layer{i}.values"].clone(), True
                if hasattr(layer, "_sliding_window_tensor"):
                    layer._sliding_window_tensor = layer._sliding_window_tensor.to(keys.device)
                if f"layer{i}.cumulative_length" in entries:
                    layer.cumulative_length = entries[f"layer{i}.cumulative_length"]
        return cache


def _hybrid_policy_layer_class() -> type:
    from transformers.cache_utils import LinearAttentionLayer

    from ..hf import PolicyLayer

    class HybridPolicyLayer(PolicyLayer, LinearAttentionLayer):
        """A layer that holds both a recurrent state (its mamba part: conv and SSM states, as transformers'
        LinearAttentionLayer keeps them) and an attention memory under a segcli policy (PolicyLayer): zamba's and
        zamba2's hybrid layers, falcon_h1's."""

        def __init__(self, policy, kind, shift_keys, positions, index, frame, layers: int = 1, number_of_states: int = 1):
            PolicyLayer.__init__(self, policy, kind, shift_keys, positions, index, frame, layers)
            LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

        def lazy_initialization(self, *args, **kwargs) -> None:
            if len(args) == 2 and not kwargs:  # (key_states, value_states): the attention part
                return PolicyLayer.lazy_initialization(self, *args)
            return LinearAttentionLayer.lazy_initialization(self, *args, **kwargs)

    return HybridPolicyLayer


def HybridPolicyLayer(*args, **kwargs):  # noqa: N802 - builds the class on first use (transformers imported lazily)
    global HybridPolicyLayer
    HybridPolicyLayer = _hybrid_policy_layer_class()
    return HybridPolicyLayer(*args, **kwargs)


def _tensor(x: Any) -> Tensor | None:
    return x if isinstance(x, Tensor) else None


class MiniMaxFamily(Family):
    policy_caches = False  # its own cache class: only full and none on its attention layers

    """MiniMax keeps its lightning-attention states in a cache of its own (`MiniMaxCache`, no config) whose layer 0,
    a linear layer, never grows, while sequence lengths and mask sizes are read from layer 0: segcli's subclass reads
    them from the first attention layer, so that a segment that continues the cache gets the right positions and
    mask (the issue measured minimax exact only with a hand-made 4D mask otherwise)."""

    def new_cache(self, model) -> Any:
        from transformers.cache_utils import DynamicLayer

        types = layer_types(model.config)
        cache = _answered_by_attention(_model_module(model).MiniMaxCache)()
        cache.layers = [DynamicLayer() for _ in types]
        cache.layer_class_to_replicate = None
        cache.linear_cache = [None] * len(types)  # None: a fresh lightning state (the layer makes zeros)
        first = next((i for i, t in enumerate(types) if t != "linear_attention"), 0)
        cache.attention_layer = {i: first for i, t in enumerate(types) if t == "linear_attention"}
        return cache

    def components(self, model, cache: Any, seen: int) -> list[StateStats]:
        types = layer_types(model.config)
        out = [s for s in super().components(model, cache, seen) if types[s.layer] != "linear_attention"]
        for i, t in enumerate(types):
            if t == "linear_attention":
                kv = cache.linear_cache[i] if i < len(cache.linear_cache) else None
                kv = kv if isinstance(kv, Tensor) else None
                out.append(recurrent_stats(i, [], [kv] if kv is not None else [], [], seen if kv is not None else 0))
        return out

    def export(self, model, cache: Any) -> dict[str, Tensor | int]:
        out = super().export(model, cache)
        out.update({f"layer{i}.linear": kv for i, kv in enumerate(cache.linear_cache) if isinstance(kv, Tensor)})
        return out

    def restore(self, model, entries: dict[str, Tensor | int]) -> Any:
        cache = super().restore(model, entries)
        for i in range(len(cache.linear_cache)):
            kv = entries.get(f"layer{i}.linear")
            cache.linear_cache[i] = kv.clone() if kv is not None else None
        return cache


@functools.cache
def _answered_by_attention(base: type) -> type:
    """`base` (a Cache class) whose sequence lengths and mask sizes for a layer without attention are those of the
    attention layer that `attention_layer` names: transformers reads them from layer 0 by default, which in a hybrid
    whose first layer is recurrent never grows."""
    class StreamCache(base):
        attention_layer: dict[int, int] = {}  # linear layer -> the attention layer that answers for it

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return super().get_seq_length(self.attention_layer.get(layer_idx, layer_idx))

        def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
            return super().get_mask_sizes(query_length, self.attention_layer.get(layer_idx, layer_idx))

    return StreamCache


class RwkvFamily(Family):
    """RWKV (v4) passes its state as `state=`: five tensors (B, hidden, layers): the feed-forward and attention
    token shifts (a width-2 convolution window), the WKV numerator and denominator, and their running maximum
    (a log-scale stabiliser: bytes, no norm)."""

    def new_cache(self, model) -> Any:
        return None  # the model makes the zero state on the first call

    def forward(self, model, ids: Tensor, pos: Tensor, cache: Any) -> tuple[Tensor, Any]:
        out = model(input_ids=ids, state=cache, use_cache=True)
        return out.logits, out.state

    def components(self, model, cache: Any, seen: int) -> list[StateStats]:
        n = model.config.num_hidden_layers
        if cache is None:
            return [recurrent_stats(i, [], [], [], 0) for i in range(n)]
        return [recurrent_stats(i, [cache[0][:, :, i], cache[1][:, :, i]], [cache[2][:, :, i], cache[3][:, :, i]],
                                [cache[4][:, :, i]], seen) for i in range(n)]

    def attention_layers(self, model) -> int:
        return 0

    NAMES = ("ffn_shift", "attention_shift", "numerator", "denominator", "maximum")  # state[0..4], (B, hidden, L)

    def export(self, model, cache: Any) -> dict[str, Tensor | int]:
        return {} if cache is None else dict(zip(self.NAMES, cache))

    def restore(self, model, entries: dict[str, Tensor | int]) -> Any:
        return [entries[n].clone() for n in self.NAMES] if self.NAMES[0] in entries else None


class XlstmFamily(Family):
    """xLSTM's `xLSTMCache` holds per block (C, n, m): the matrix memory, the normaliser and the log-scale
    stabiliser m (bytes, no norm). The cache sizes its heads from the config's q/k width rounded up to 64 while the
    layers use hidden_size x qk_dim_factor unrounded (a hidden size of 64 with the default factor 0.5: 64 against
    32); segcli sizes the state from the layers themselves, so such models stream too."""

    def new_cache(self, model) -> Any:
        cfg = model.config
        mod = _model_module(model)
        param = next(model.parameters())
        cache = mod.xLSTMCache(cfg, 1, dtype=param.dtype, device=param.device)
        layer = model.backbone.blocks[0].mlstm_layer
        heads = cfg.num_heads
        dqk, dv = layer.qk_dim // heads, layer.v_dim // heads
        z = functools.partial(torch.zeros, dtype=param.dtype, device=param.device)
        cache.rnn_state = {i: (z(1, heads, dqk, dv), z(1, heads, dqk), z(1, heads, 1)) for i in cache.rnn_state}
        return cache

    def components(self, model, cache: Any, seen: int) -> list[StateStats]:
        return [recurrent_stats(i, [], [c, n], [m], seen) for i, (c, n, m) in sorted(cache.rnn_state.items())]

    def attention_layers(self, model) -> int:
        return 0

    def export(self, model, cache: Any) -> dict[str, Tensor | int]:
        out: dict[str, Tensor | int] = {"seqlen_offset": int(cache.seqlen_offset.sum())}
        for i, (c, n, m) in cache.rnn_state.items():
            out.update({f"layer{i}.C": c, f"layer{i}.n": n, f"layer{i}.m": m})
        return out

    def restore(self, model, entries: dict[str, Tensor | int]) -> Any:
        cache = self.new_cache(model)
        if "layer0.C" in entries:
            cache.rnn_state = {i: tuple(entries[f"layer{i}.{p}"].clone() for p in "Cnm") for i in cache.rnn_state}
            cache.seqlen_offset += entries.get("seqlen_offset", 0)
        return cache


@dataclass
class GriffinState:
    """recurrent_gemma's stream state: its attention layers' cache, and per recurrent block the conv window and the
    RG-LRU state, which the model keeps on its modules; segcli keeps them here and puts them back for each call."""

    cache: Any
    blocks: dict[int, tuple[Tensor | None, Tensor | None]] = field(default_factory=dict)  # layer -> (conv, lru)


class RecurrentGemmaFamily(Family):
    policy_caches = False  # its state lives on its modules: only full and none on its attention layers

    def _blocks(self, model) -> dict[int, Any]:
        return {i: layer.temporal_block for i, layer in enumerate(model.model.layers)
                if hasattr(layer.temporal_block, "rg_lru")}

    def new_cache(self, model) -> Any:
        """The attention layers' cache answers for the recurrent ones: before 5.24 recurrent_gemma's config has no
        layer_types, every cache layer is a sliding one, and the masks read their sizes from layer 0, a recurrent
        block that never writes to it (a segment that continues the cache got a mask of the wrong size)."""
        blocks = self._blocks(model)
        cache = super().new_cache(model)
        first = next((i for i in range(len(cache.layers)) if i not in blocks), 0)
        cache.__class__ = _answered_by_attention(type(cache))
        cache.attention_layer = {i: first for i in blocks}
        return GriffinState(cache, {i: (None, None) for i in blocks})

    def forward(self, model, ids: Tensor, pos: Tensor, cache: GriffinState) -> tuple[Tensor, Any]:
        blocks = self._blocks(model)
        for i, b in blocks.items():  # None: the block starts from zeros (it makes them itself)
            b.conv1d_state, b.rg_lru.recurrent_states = cache.blocks[i]
        try:
            logits, _ = super().forward(model, ids, pos, cache.cache)
            cache.blocks = {i: (b.conv1d_state, b.rg_lru.recurrent_states) for i, b in blocks.items()}
        finally:
            for b in blocks.values():  # the model holds no stream's state between calls
                b.conv1d_state = b.rg_lru.recurrent_states = None
        return logits, cache

    def components(self, model, cache: GriffinState, seen: int) -> list[StateStats]:
        out = super().components(model, cache.cache, seen)
        for i, (conv, lru) in sorted(cache.blocks.items()):
            parts = [t for t in (conv, lru) if t is not None]
            out.append(recurrent_stats(i, [conv] if conv is not None else [], [lru] if lru is not None else [], [],
                                       seen if parts else 0))
        return out

    def attention_layers(self, model) -> int:
        return len(model.model.layers) - len(self._blocks(model))

    def export(self, model, cache: GriffinState) -> dict[str, Tensor | int]:
        out = super().export(model, cache.cache)
        for i, (conv, lru) in cache.blocks.items():
            out.update({k: v for k, v in ((f"layer{i}.conv", conv), (f"layer{i}.lru", lru)) if v is not None})
        return out

    def restore(self, model, entries: dict[str, Tensor | int]) -> Any:
        blocks = {i: tuple(entries[k].clone() if k in entries else None for k in (f"layer{i}.conv", f"layer{i}.lru"))
                  for i in self._blocks(model)}
        return GriffinState(super().restore(model, entries, self.new_cache(model).cache), blocks)


FAMILIES: dict[str, Family] = {"minimax": MiniMaxFamily(), "rwkv": RwkvFamily(), "xlstm": XlstmFamily(),
                               "recurrent_gemma": RecurrentGemmaFamily()}  # model type -> family; others: Family()


def _model_module(model):
    import sys

    return sys.modules[type(model).__module__]
