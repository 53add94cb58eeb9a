"""The native model in torch: a pre-norm RoPE transformer whose attention reads [Mem; segment].

    logits, memory = model(segment_ids, memory)   # memory is data, passed in and returned

Positions. Tokens get their absolute position in the document; keys are rotated
(RoPE) once, when their segment is computed, and stored rotated. Since RoPE
scores depend only on the distance between query and key, every exact pair in
memory (full, fifo, xl, the sink window) keeps its true distance to the query,
which is what makes `full` equal one causal forward and `fifo` at n_s = 1 equal
a sliding window. Summary slots (average, compressive) are means of rotated
keys: they sit at the mean of their tokens' rotations. Sink pairs are re-rotated
at read time to sit just before the window (StreamingLLM), so distances stay
bounded. The linear memory is position-free (raw q, k). Angles are computed in
float64, so positions in the millions stay exact.

Two faces, one body. `SegLM` is the model in torch alone, what `segcli run` loads (segcli.backends.native):
transformers' model code costs seconds to import (issue 29). `modeling_seglm.SegLMForCausalLM` is the same
modules, parameter names and forward as a transformers `PreTrainedModel` (training, save_pretrained /
from_pretrained, the Auto classes). Both take their layers and forward from `SegLMBodyMixin` and `SegLMHeadMixin`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...memory import MemoryPolicy, make_policy
from ...memory.base import Carried, LayerStats
from ...ops.attention import attend, scored_attention
from ...ops.linear_attention import read_memory
from ...ops.rope import inv_frequencies, rope_cos_sin, rope_rolled, shift_rope, shift_rope_each, signed_sin
from ...ops.smear import smear_keys

if TYPE_CHECKING:
    from .configuration_seglm import SegLMConfig


@dataclass
class SegMemory:
    """Per-layer memory states of one stream, plus the position of its next token. With smear_keys each
    layer's state also holds its last key (`Carried.last_key`) for the next segment's first key."""

    policy: MemoryPolicy
    states: list[Any]
    seen: int = 0  # tokens consumed = absolute position of the next token

    def stats(self) -> list[LayerStats]:
        return [self.policy.stats(s) for s in self.states]


@dataclass
class SegLMOutput:
    logits: Tensor  # (B, T, V)
    memory: SegMemory
    loss: Tensor | None = None  # mean cross-entropy when labels were given
    memory_mass: Tensor | None = None  # (L,) mean attention mass on memory per layer; (L, T) per query with band
    extras: dict = field(default_factory=dict)


_DNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
DNN_MIN_ROWS = 4  # from 4 rows oneDNN is 1.5-4x faster on every weight of the bundled model (measured per
#   shape, one thread); at 1-2 rows MKL's product with the column-major weight (a GEMV) is the faster one
_packed: "weakref.WeakKeyDictionary[nn.Linear, tuple]" = weakref.WeakKeyDictionary()  # Linear -> (weight, version, ptr, packed)


def linear(x: Tensor, mod: nn.Linear) -> Tensor:
    """`mod(x)` without the module call. CPU float32 inference with >= DNN_MIN_ROWS rows runs oneDNN's linear on
    a copy of the weight packed once for it (kept until the weight changes): 2-2.5x MKL's rate at 16-128 rows
    on the AMD EPYC CI machine (`benchmarks/step.py`), where MKL takes its generic path. A different summation
    order: outputs agree with F.linear to float32 rounding (~1e-6 relative), not bit for bit."""
    w = mod.weight
    if (
        _DNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
        and x.numel() >= DNN_MIN_ROWS * x.shape[-1] and not torch.is_grad_enabled()
    ):
        return _DNN_LINEAR(x, _packed_weight(mod, w), mod.bias, "none", [], "")
    return F.linear(x, w, mod.bias)


def _packed_weight(mod: nn.Linear, w: Tensor) -> Tensor:
    got = _packed.get(mod)
    if got is None or got[0] is not w or got[1] != w._version or got[2] != w.data_ptr():
        with torch.inference_mode(False), torch.no_grad():
            got = (w, w._version, w.data_ptr(), torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), 128))
        _packed[mod] = got
    return got[3]


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)  # fused gate and up projections
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        g, u = linear(x, self.gate_up).chunk(2, dim=-1)
        return linear(F.silu(g) * u, self.down)


class SegLMAttention(nn.Module):
    def __init__(self, cfg: SegLMConfig):
        super().__init__()
        self.h, self.d = cfg.num_attention_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)  # fused Q, K, V
        self.o = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.memory_gate = nn.Parameter(torch.zeros(self.h))  # linear memory: sigmoid mix per head
        self.key_smear = nn.Parameter(torch.zeros(self.h)) if cfg.smear_keys else None  # beta per head

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, policy: MemoryPolicy, state: Any, shift_keys,
                band: int | None = None, segments: list[int] | None = None):
        """Returns (y, state, mass, each, awaiting): `each` the memory stats after each token of a token pass
        (band) or after each segment of a segment pass (`segments`: their lengths; mass then (J,), per segment),
        else None; `awaiting` (attn,) when the state still waits for `policy.observe(state, attn)` (the
        model observes every layer at once after its forward: `MemoryPolicy.observe_layers`), else None."""
        b, t, c = x.shape
        each = awaiting = None
        qkv = linear(x, self.qkv).view(b, t, 3, self.h, self.d).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        q, k, v = qkv.unbind(0)
        qr, kr = rope_rolled(qkv[:2], cos, sin).unbind(0)  # q and k rotated together; sin is the signed table
        stop = _detached if torch.is_grad_enabled() else _unchanged  # no detach calls at inference
        if self.key_smear is not None:  # the linear memory keeps reading the raw (unsmeared) k
            # the key before this segment's first: the previous segment's last, where the state carries one
            last_key = stop(kr.narrow(2, t - 1, 1))  # (B, H, 1, D)
            kr = smear_keys(kr, state.last_key if isinstance(state, Carried) else None, self.key_smear)
        if policy.kind == "linear" and band is not None:  # T one-token segments: each reads the state before it
            g = torch.sigmoid(self.memory_gate).view(1, self.h, 1, 1)
            empty = state.n == 0
            a_mem, state, each = policy.read_each(state, q, stop(k), stop(v))
            out = g * a_mem + (1 - g) * v  # a one-token segment's softmax over itself is its value
            if empty:  # the first token of an empty memory has nothing to mix in
                out[:, :, :1] = v[:, :, :1]
            mass = g.mean().expand(t)
        elif policy.kind == "linear":
            out = F.scaled_dot_product_attention(qr, kr, v, is_causal=True)  # (B, H, T, D)
            g = torch.sigmoid(self.memory_gate).view(1, self.h, 1, 1)
            if state.n:  # an empty memory has nothing to mix in
                out = g * read_memory(q, state) + (1 - g) * out
                mass = g.mean().expand(1)
            else:
                mass = None
            # Memory never carries gradient across segments (Transformer-XL's stop-gradient).
            state = policy.update(state, stop(kr), stop(v), stop(k))
        elif band is not None:  # T single-token steps in one pass (segment size 1): mass per query (T,)
            state, out, mass, each = policy.extend_each(state, qr, stop(kr), stop(v), stop(k), shift_keys)
            mass = mass.mean((0, 1))
        elif segments is not None:  # consecutive segments of these lengths in one pass: mass per segment (J,)
            state, out, mass, each = policy.extend_segments(state, qr, stop(kr), stop(v), stop(k), shift_keys,
                                                            segments)
            mass = torch.stack([part.mean() for part in mass.split(segments, -1)])
        else:
            # scored policies (tova, h2o, snapkv, keynorm) evict after the attention, keynorm too, once every layer
            # has run (`observe_layers`): a token step then closes up the memory in place instead of copying it
            # (`MemoryPolicy.extend_unevicted`), and the layers' evictions can run as one
            state, k_all, v_all, m = policy.extend_unevicted(state, stop(kr), stop(v), stop(k), shift_keys)
            # k_all = [memory before this segment; segment] (a view for window policies); the segment
            # part is taken from kr/v themselves so gradients flow within the segment.
            if policy.needs_attention is not None:  # tova, h2o, snapkv: evict by the attention just computed
                out, mass, attn = scored_attention(qr, k_all, v_all, m, kr, v, policy.score_queries(t))
                awaiting = (attn,)  # attn (B, H, m + T); no GQA here: one query head per KV head
            else:
                out, mass = attend(qr, k_all, v_all, m, kr, v)
                awaiting = (None,)  # keynorm: evicted once [memory; segment] has been read
            mass = None if mass is None else mass.mean()
        if self.key_smear is not None and isinstance(state, Carried):  # `none` carries nothing, not even this
            state = replace(state, last_key=last_key)
        y = linear(out.transpose(1, 2).reshape(b, t, c), self.o)
        return y, state, mass, each, awaiting


def _unchanged(x: Tensor) -> Tensor:
    return x


def _detached(x: Tensor) -> Tensor:
    return x.detach()


def embed(weight: Tensor, ids: Tensor) -> Tensor:
    """`F.embedding(ids, weight)`: rows of weight (V, C) for ids (B, T) -> (B, T, C). A column-major weight (a
    tied lm_head re-stored by `column_major_linears`) is gathered along its contiguous transpose: each row of
    the row-major lookup would read C values 4V bytes apart (~0.8 ms at T = 128, 8,192 x 256), the
    transposed gather reads T values from each of C rows (~0.03 ms). The same values either way."""
    if weight.dim() == 2 and not weight.is_contiguous() and weight.t().is_contiguous():
        b, t = ids.shape
        return weight.t().index_select(1, ids.reshape(-1)).t().contiguous().view(b, t, -1)
    return F.embedding(ids, weight)


class SegLMBlock(nn.Module):
    def __init__(self, cfg: SegLMConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = SegLMAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, policy, state, shift_keys, band=None, segments=None):
        a, state, mass, each, awaiting = self.attn(_rms_norm(self.attn_norm, x), cos, sin, policy, state, shift_keys,
                                                   band, segments)
        drop = self.drop if self.training and self.drop.p > 0 else _unchanged  # no module calls at inference
        x = x + drop(a)
        return x + drop(self.mlp(_rms_norm(self.mlp_norm, x))), state, mass, each, awaiting


def _rms_norm(norm: nn.RMSNorm, x: Tensor) -> Tensor:
    """`norm(x)` without the module call (the same function RMSNorm.forward calls)."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


class SegLMBodyMixin:
    """Embeddings, blocks, final norm and the RoPE tables: the body of `SegLMBody` and of transformers' `SegLMModel`
    (modeling_seglm), which set `self.config` and call `build_body` in their `__init__`. (No class annotations
    here: transformers reads `config`'s from the classes that mix this in.)"""

    def build_body(self, config: SegLMConfig) -> None:
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SegLMBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._inv_freq: dict[torch.device, Tensor] = {}  # per device; not a buffer, so loading never leaves it uninitialised
        self._rope_block: dict = {}  # (device, dtype) -> (first position, cos, sin)

    ROPE_BLOCK = 4096  # positions whose cos/sin are computed at once (float64, then cast)

    def rope_tables(self, start: int, t: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, signed sin (T, D) for positions start .. start+T-1 (`rope_rolled`'s tables), sliced from a
        cached block."""
        key = (device, dtype)
        block = self._rope_block.get(key)
        if block is None or not (block[0] <= start and start + t <= block[0] + block[1].shape[0]):
            n = max(self.ROPE_BLOCK, t)
            cos, sin = rope_cos_sin(torch.arange(start, start + n, device=device), self.inv_freq(device), dtype)
            block = (start, cos, signed_sin(sin))
            self._rope_block[key] = block
        lo = start - block[0]
        return block[1][lo : lo + t], block[2][lo : lo + t]

    def inv_freq(self, device: torch.device) -> Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = inv_frequencies(self.config.head_dim, self.config.rope_theta, device)
        return self._inv_freq[device]

    def shift_keys(self, k: Tensor, delta: int | Tensor) -> Tensor:
        """Rotated keys (B, H, S, D) shifted by `delta` positions; a (T,) tensor of deltas gives one shifted copy
        per delta, (B, H, T, S, D) (token passes: each query's own shift)."""
        if isinstance(delta, Tensor):
            return shift_rope_each(k, delta, self.inv_freq(k.device))
        return shift_rope(k, delta, self.inv_freq(k.device))

    def forward(self, input_ids: Tensor, memory: SegMemory, band: int | None = None, segments: list[int] | None = None):
        b, t = input_ids.shape
        x = embed(self.embed_tokens.weight, input_ids)  # (B, T, C)
        cos, sin = self.rope_tables(memory.seen, t, input_ids.device, x.dtype)  # (T, D)
        states, masses, each, attns = [], [], [], []
        for layer, state in zip(self.layers, memory.states):
            x, state, mass, stats, awaiting = layer(x, cos, sin, memory.policy, state, self.shift_keys, band, segments)
            states.append(state)
            masses.append(mass)
            each.append(stats)
            if awaiting is not None:  # every layer or none: they all take the same branch
                attns.append(awaiting[0])
        if attns:  # a layer's memory is read again only by the next segment: every layer evicts now, at once
            states = memory.policy.observe_layers(states, attns)
        mem = SegMemory(memory.policy, states, memory.seen + t)
        mass = None if any(m is None for m in masses) else torch.stack(masses)
        return self.norm(x), mem, mass, (each if band is not None or segments is not None else None)


class SegLMHeadMixin:
    """The language-model head over the body, memories and the forward: `SegLM`'s and transformers'
    `SegLMForCausalLM`'s (modeling_seglm), which set `self.config`, set `self.model` to their body and call
    `build_head`."""

    def build_head(self, config: SegLMConfig) -> None:
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def new_memory(self, policy: MemoryPolicy | str, batch: int = 1, dtype: torch.dtype | None = None, **sizes) -> SegMemory:
        """An empty memory for `batch` streams under `policy` (dtype: the activations' dtype)."""
        if isinstance(policy, str):
            policy = make_policy(policy, **sizes)
        p = next(self.parameters())
        cfg = self.config
        n = cfg.num_hidden_layers
        states = [  # per layer: policies with per-layer budgets (--layer-budget pyramid) size each one
            policy.init_layer_state(i, n, batch, cfg.num_attention_heads, cfg.head_dim, device=p.device,
                                    dtype=dtype or p.dtype)
            for i in range(n)
        ]
        return SegMemory(policy, states, 0)

    def forward(self, input_ids: Tensor, memory: SegMemory | None = None, labels: Tensor | None = None,
                band: int | None = None, segments: list[int] | None = None, **_):
        """input_ids (B, T): one segment. Returns logits (B, T, V) and the updated memory.

        band: compute the T tokens as T segments of one token each, in one pass (a token pass). Only for a
        policy with a parallel form at n_s = 1 whose pass bound is `band` (`policy.token_pass()`: fifo's is its
        window n_c, the band of keys each query reads); T <= band keeps every reported number the token path's.
        memory_mass is then (L, T), and extras["stats_each"] holds per layer the T stats the steps would report.

        segments: the input is consecutive segments of these lengths (summing to T), computed in one pass (a
        segment pass), each query reading what its own segment's step would (`policy.extend_segments`; only where
        `policy.segment_pass()` bounds T). memory_mass is then (L, J) and extras["stats_each"] holds per layer the
        J stats after each segment.
        """
        if memory is None:
            memory = self.new_memory("none", input_ids.shape[0])
        if band is not None and band != memory.policy.token_pass():
            raise ValueError(f"band={band}: the {memory.policy.name} memory is not a sliding window of {band} keys "
                             "(it has no token pass of that bound)")
        if segments is not None and (band is not None or sum(segments) != input_ids.shape[1]
                                     or not sum(segments) <= (memory.policy.segment_pass() or 0)):
            raise ValueError(f"segments={list(segments)[:8]}: not one segment pass of {input_ids.shape[1]} tokens "
                             f"under {memory.policy.name} (at most {memory.policy.segment_pass()})")
        h, memory, mass, each = self.model(input_ids, memory, band, segments)
        logits = linear(h, self.lm_head)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        extras = {} if each is None else {"stats_each": each}
        return SegLMOutput(logits=logits, memory=memory, loss=loss, memory_mass=mass, extras=extras)


class SegLMBody(SegLMBodyMixin, nn.Module):
    def __init__(self, config: SegLMConfig):
        super().__init__()
        self.config = config
        self.build_body(config)


class SegLM(SegLMHeadMixin, nn.Module):
    """The native model in torch alone: `SegLMForCausalLM`'s modules, parameter names and forward, without
    transformers' PreTrainedModel, whose import costs `segcli run` seconds (issue 29). `segcli run` loads this one
    (segcli.backends.native); training, save_pretrained and the Auto classes use `SegLMForCausalLM`."""

    def __init__(self, config: SegLMConfig):
        super().__init__()
        self.config = config
        self.model = SegLMBody(config)
        self.build_head(config)
        if config.tie_word_embeddings:  # as transformers ties SegLMForCausalLM's (`_tied_weights_keys`)
            self.lm_head.weight = self.model.embed_tokens.weight
