"""Softmax attention of a segment over [memory; segment so far].

`split_attention` never concatenates memory and segment: it scores both blocks,
normalises them jointly with one log-sum-exp, and returns the fraction of the
attention mass that went to memory as a by-product. `fused_split_attention` is
the same computation with a fused attention kernel per block (memory: no mask;
segment: causal), merged through the two blocks' log-sum-exps: no score matrix
in memory and the memory mass still exact. `attend` picks the fast form where it
applies. `reference_attention` is the plain concatenate-and-mask form the tests
compare both with. `band_attention` is the sliding-window form: each query reads a
fixed number of keys before it and itself (fifo at n_s = 1 computed many tokens at a time);
`pass_attention` is its general form for the other policies' passes at n_s = 1: any per-query key set over
[memory; pass], plus slot blocks outside it (sinks, compressed slots, a running mean), one softmax per query.
`segment_pass_attention` computes consecutive segments of any lengths in one pass (small documents through a
carried memory): each query reads the memory its own segment's step held and its segment up to itself.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


def causal_mask(t: int, device) -> Tensor:
    """(T, T) bool, True where a query may attend (key index <= query index)."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


def split_attention(
    q: Tensor, k_mem: Tensor | None, v_mem: Tensor | None, k: Tensor, v: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor | None]:
    """q, k, v (B, H, T, D) for the segment; k_mem, v_mem (B, H, M, D) or None.

    Every query sees all M memory slots and, causally, its own segment.
    Returns out (B, H, T, D) and mass (B, H, T): attention probability on memory
    (None when there is no memory).
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    t = q.shape[-2]
    s_seg = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, T)
    s_seg = s_seg.masked_fill(~causal_mask(t, q.device), float("-inf"))
    if k_mem is None or k_mem.shape[-2] == 0:
        return torch.softmax(s_seg, dim=-1) @ v, None
    s_mem = (q @ k_mem.transpose(-1, -2)) * scale  # (B, H, T, M)
    m = torch.maximum(s_mem.amax(-1, keepdim=True), s_seg.amax(-1, keepdim=True))  # (B, H, T, 1)
    p_mem = torch.exp(s_mem - m)
    p_seg = torch.exp(s_seg - m)
    z_mem = p_mem.sum(-1, keepdim=True)
    z = z_mem + p_seg.sum(-1, keepdim=True)  # (B, H, T, 1)
    out = (p_mem @ v_mem + p_seg @ v) / z  # (B, H, T, D)
    return out, (z_mem / z).squeeze(-1)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
FUSED_MIN_QUERIES = 8  # below this the two kernel launches cost more than the plain form


def _flash_cpu(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, H, T, D), logsumexp (B, H, T)) from PyTorch's fused CPU attention kernel."""
    out, lse = _FLASH_CPU(q, k, v, 0.0, causal, scale=scale)[:2]
    return out, lse


def fused_split_attention(
    q: Tensor, k_mem: Tensor, v_mem: Tensor, k: Tensor, v: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Same contract as `split_attention` with M > 0, on fused kernels (CPU, no autograd)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    o_mem, lse_mem = _flash_cpu(q, k_mem, v_mem, False, scale)
    o_seg, lse_seg = _flash_cpu(q, k, v, True, scale)
    w_mem = torch.sigmoid(lse_mem - lse_seg)  # = exp(lse_mem - logaddexp(lse_mem, lse_seg))
    out = o_seg + w_mem[..., None].to(o_seg.dtype) * (o_mem - o_seg)
    return out, w_mem


def attend(q: Tensor, k_all: Tensor, v_all: Tensor, m: int, k: Tensor, v: Tensor, scale: float | None = None):
    """[memory; segment] attention, on the fastest form that applies.

    k_all/v_all (B, H, m + T, D): the m memory slots, then the segment; k, v (B, H, T, D): the segment
    itself (the same values; the caller's may carry gradients that k_all's copy does not). One query at
    inference reads k_all in one softmax; CPU float32 inference with >= 8 queries uses the fused kernels.
    """
    if q.shape[-2] == 1 and not torch.is_grad_enabled():
        return single_query_attention(q, k_all, v_all, m, scale)
    k_mem, v_mem = k_all.narrow(2, 0, m), v_all.narrow(2, 0, m)
    if (
        _FLASH_CPU is not None and m > 0 and q.device.type == "cpu" and q.dtype == torch.float32
        and q.shape[-2] >= FUSED_MIN_QUERIES and not torch.is_grad_enabled()
    ):
        return fused_split_attention(q, k_mem, v_mem, k, v, scale)
    return split_attention(q, k_mem, v_mem, k, v, scale)


def single_query_attention(q: Tensor, k_all: Tensor, v_all: Tensor, m: int, scale: float | None = None):
    """One query per stream reading [memory; itself]: q (B, H, 1, D), k_all/v_all (B, H, m + 1, D).

    With a single query there is nothing to mask (it sees every memory slot and itself), so this is
    one softmax over the joined keys: a handful of kernels instead of the split form's two halves.
    Returns out (B, H, 1, D) and mass (B, H, 1) on the m memory slots (None when m == 0).
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    p = torch.softmax((q * scale) @ k_all.transpose(-1, -2), dim=-1)  # (B, H, 1, m + 1)
    out = p @ v_all  # (B, H, 1, D)
    return out, (p[..., :m].sum(-1) if m else None)


def band_attention(q: Tensor, k_all: Tensor, v_all: Tensor, m: int, band: int, scale: float | None = None):
    """A causal sliding window over [memory; segment]: query i (key index m + i) reads keys m + i - band .. m + i.

    q (B, H, T, D); k_all/v_all (B, H, m + T, D) with m <= band. This is what T single-token steps through a
    fifo memory of `band` slots compute (DESIGN: fifo at n_s = 1 is a sliding window of width n_c + 1), in one
    pass. Returns out (B, H, T, D) and mass (B, H, T): each query's attention on the keys before it (its
    memory at n_s = 1; 0 for a query with nothing before it, where the token path reports no mass).
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    t, s = q.shape[-2], k_all.shape[-2]
    i = torch.arange(m, m + t, device=q.device)[:, None]  # (T, 1) key index of each query
    j = torch.arange(s, device=q.device)[None]  # (1, S)
    allowed = (j <= i) & (j >= i - band)  # (T, S)
    p = torch.softmax(((q * scale) @ k_all.transpose(-1, -2)).masked_fill(~allowed, float("-inf")), dim=-1)
    out = p @ v_all  # (B, H, T, D)
    mass = 1.0 - p.diagonal(offset=m, dim1=-2, dim2=-1)  # (B, H, T): everything but the query's own key
    return out, mass


def band_mask(m: int, t: int, band: int, device) -> Tensor:
    """(T, m + T) bool: query i (key index m + i) reads keys m + i - band .. m + i."""
    i = torch.arange(m, m + t, device=device)[:, None]  # (T, 1) key index of each query
    j = torch.arange(m + t, device=device)[None]  # (1, S)
    return (j <= i) & (j >= i - band)


def slot_scores(q: Tensor, k_slots: Tensor, allowed: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Scaled scores of queries q (B, H, T, D) on slots outside [memory; pass]: k_slots (B, H, P, D) shared by
    every query, or (B, H, T, P, D) one set per query. allowed (T, P) or (B, H, T, P) bool masks slots a query
    does not hold. Returns (B, H, T, P), -inf where masked: a `pass_attention` block."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if k_slots.dim() == 4:
        s = (q * scale) @ k_slots.transpose(-1, -2)
    else:
        s = torch.einsum("bhtd,bhtpd->bhtp", q * scale, k_slots)
    return s if allowed is None else s.masked_fill(~allowed, float("-inf"))


def pass_attention(q: Tensor, k_all: Tensor, v_all: Tensor, own: int, allowed: Tensor,
                   blocks: tuple[tuple[Tensor, Tensor], ...] = (), scores_at: tuple[int, Tensor] | None = None,
                   scale: float | None = None):
    """T single-token steps in one pass: query i reads the keys allowed[i] (T, S) of k_all/v_all (B, H, S, D),
    its own key `own + i` among them, and the slots of each block (scores, values): scores (B, H, T, P) from
    `slot_scores`, values (B, H, P, D) shared or (B, H, T, P, D) per query. scores_at = (j, scores (B, H, T, P)):
    those scores replace the ones of keys j .. j + P - 1 (keys a query reads shifted: sinks).

    One softmax per query over all of them (what its single-token step computes over [its memory; itself]).
    Returns out (B, H, T, D) and mass (B, H, T): attention on everything but the query's own key.
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = (q * scale) @ k_all.transpose(-1, -2)  # (B, H, T, S)
    if scores_at is not None:
        s[..., scores_at[0] : scores_at[0] + scores_at[1].shape[-1]] = scores_at[1]
    s = s.masked_fill_(~allowed, float("-inf"))
    if not blocks:
        p = torch.softmax(s, dim=-1)
        return p @ v_all, 1.0 - p.diagonal(offset=own, dim1=-2, dim2=-1)
    sizes = [b[0].shape[-1] for b in blocks]
    p = torch.softmax(torch.cat([b[0] for b in blocks] + [s], -1), dim=-1)
    parts = p.split(sizes + [s.shape[-1]], -1)
    out = parts[-1] @ v_all  # (B, H, T, D)
    for pb, (_, vb) in zip(parts, blocks):
        out = out + (pb @ vb if vb.dim() == 4 else torch.einsum("bhtp,bhtpd->bhtd", pb, vb))
    return out, 1.0 - parts[-1].diagonal(offset=own, dim1=-2, dim2=-1)  # (B, H, T)


def segment_masks(m: int, lengths: list[int], size: int | None, device) -> tuple[Tensor, Tensor]:
    """Masks of consecutive segments of `lengths` tokens pushed at once onto a window holding m pairs, over its
    joined keys [memory; segments] (S = m + T): allowed (T, S), the keys each query's own segment step reads (the
    `size` pairs before its segment, every one when size is None, and its segment up to itself), and memory (T, S),
    those of them that were memory for that step (before its segment)."""
    t = sum(lengths)
    starts = torch.tensor([0, *lengths[:-1]], device=device).cumsum(0) + m  # (J,) key index of each segment's first
    first = torch.repeat_interleave(starts, torch.tensor(lengths, device=device))[:, None]  # (T, 1)
    i = torch.arange(m, m + t, device=device)[:, None]  # (T, 1) key index of each query
    j = torch.arange(m + t, device=device)[None]  # (1, S)
    memory = j < first
    if size is not None:
        memory &= j >= first - size
    return memory | ((j >= first) & (j <= i)), memory


@dataclass(frozen=True)
class SegmentPass:
    """What `segment_pass_attention` needs of a segment pass's masks, built once for all of a forward's layers."""

    bias: Tensor  # (T, S) additive: 0 where `segment_masks`' allowed, -inf elsewhere
    memory: Tensor  # (T, S) 1.0 on each query's segment's memory, else 0 (in the scores' dtype)
    lows: tuple[int, ...]  # per query, the first key it may read (non-decreasing: segments only move the window on)


@functools.lru_cache(maxsize=4)
def segment_pass_masks(m: int, lengths: tuple[int, ...], size: int | None, device: str,
                       dtype: torch.dtype) -> SegmentPass:
    """`segment_masks` as a `SegmentPass` (cached: every layer of a forward asks for the same; never written)."""
    allowed, memory = segment_masks(m, list(lengths), size, device)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    lows, start = [], m
    for n in lengths:
        lows += [0 if size is None else max(0, start - size)] * n
        start += n
    return SegmentPass(bias, memory.to(dtype), tuple(lows))


PASS_QUERIES = 128  # queries per block of a segment pass: each block reads only the keys its queries may


def segment_pass_attention(q: Tensor, k_all: Tensor, v_all: Tensor, masks: SegmentPass,
                           scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Consecutive segments in one pass: each query reads the keys `segment_masks` allows it of k_all/v_all
    (B, H, S, D), one softmax per query (what its segment's step computes over [its memory; its segment so far]).
    Returns out (B, H, T, D) and mass (B, H, T): each query's attention on its segment's memory.

    The queries go PASS_QUERIES at a time, each block over the keys from its first query's lowest to its last
    query: a block skips the window its queries no longer hold and the keys after them (half the scores of a
    pass of 512 tokens over a memory of 512)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    t, s = q.shape[-2], k_all.shape[-2]
    m = s - t
    out = q.new_empty(q.shape)
    mass = q.new_empty(q.shape[:-1])
    for c0 in range(0, t, PASS_QUERIES):
        c1 = min(t, c0 + PASS_QUERIES)
        lo, hi = masks.lows[c0], m + c1
        scores = (q[:, :, c0:c1] * scale) @ k_all[:, :, lo:hi].transpose(-1, -2)  # (B, H, c, hi - lo)
        scores += masks.bias[c0:c1, lo:hi]
        p = _softmax_(scores)
        out[:, :, c0:c1] = p @ v_all[:, :, lo:hi]  # (assigned, not out=: a strided block on any device)
        mass[:, :, c0:c1] = (p * masks.memory[c0:c1, lo:hi]).sum(-1)
    return out, mass


def reference_attention(q: Tensor, k_all: Tensor, v_all: Tensor, allowed: Tensor) -> Tensor:
    """Plain masked softmax attention: q (B,H,T,D), k_all/v_all (B,H,S,D), allowed (T,S) bool."""
    s = (q @ k_all.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v_all


def scored_attention(q: Tensor, k_all: Tensor, v_all: Tensor, m: int, k: Tensor, v: Tensor, n_last: int,
                     scale: float | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """`attend`, plus what an attention-scored memory needs: the attention probability of the segment's last
    `n_last` queries on every key of [memory; segment], summed over those queries.

    q, k, v (B, H, T, D); k_all/v_all (B, H, m + T, D). Returns out (B, H, T, D), mass (B, H, T) or None, and
    attn (B, H, m + T) float32, detached (scores never carry gradient). At inference one explicit softmax over
    [memory; segment], computed in place in its score matrix (the causal mask written into the segment's block
    only), gives the output and every query's probabilities: on CPU at n_s = 128 about the fused kernels' time
    (`attend`), where a fresh (T, S) matrix per step costs more than the softmax itself (new pages). With
    autograd on, h2o (n_last = T) takes one masked softmax on keys that carry the segment's gradients; tova and
    snapkv take `attend` and score their last queries' rows again.
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    t = q.shape[-2]
    if t == 1 and not torch.is_grad_enabled():  # one query sees every key (a token step): nothing to mask
        p = torch.softmax((q * scale) @ k_all.transpose(-1, -2), dim=-1)  # (B, H, 1, m + 1)
        return p @ v_all, (p[..., :m].sum(-1) if m else None), p[:, :, 0].float()
    if not torch.is_grad_enabled() and q.dtype == torch.float32:  # half precision: the forms below, scored in float32
        p = (q * scale) @ k_all.transpose(-1, -2)  # (B, H, T, S) scores, then probabilities in place
        p.narrow(-1, m, t).add_(causal_bias(t, p.dtype, q.device))  # memory: every query sees all of it
        p = _softmax_(p)
        out = p @ v_all  # (B, H, T, D)
        mass = p[..., :m].sum(-1) if m else None
        last = p if n_last >= t else p.narrow(-2, t - n_last, n_last)
        return out, mass, last.float().sum(-2)
    if n_last >= t:
        keys = torch.cat([k_all[:, :, :m], k], 2)  # gradients via k, v
        values = torch.cat([v_all[:, :, :m], v], 2)
        p = torch.softmax(((q * scale) @ keys.transpose(-1, -2)).masked_fill(~_segment_mask(m, t, t, q.device),
                                                                             float("-inf")), dim=-1)  # (B, H, T, S)
        out = p @ values
        mass = p[..., :m].sum(-1) if m else None
        return out, mass, p.detach().float().sum(-2)
    out, mass = attend(q, k_all, v_all, m, k, v, scale)
    return out, mass, last_query_attention(q[:, :, t - n_last :].detach(), k_all, m, t, scale)


_BIASES: dict[tuple, Tensor] = {}  # (dtype, device, inference mode) -> the largest causal bias built yet


def causal_bias(t: int, dtype: torch.dtype, device) -> Tensor:
    """(T, T) additive causal mask, 0 where a query may attend and -inf above the diagonal (added to finite scores:
    exactly `masked_fill`'s result, ~8x faster in place on a strided block than masked_fill_ with a bool mask).
    A view of one cached (T', T') mask, T' the largest T yet (its top-left block is the causal mask of any smaller
    T): one tensor per dtype and device however many segment lengths a run sees. Inference only: never written."""
    key = (dtype, str(device), torch.is_inference_mode_enabled())
    got = _BIASES.get(key)
    if got is None or got.shape[0] < t:
        got = _BIASES[key] = torch.zeros(t, t, dtype=dtype, device=device).masked_fill_(~causal_mask(t, device),
                                                                                      float("-inf"))
    return got[:t, :t]


def _softmax_(x: Tensor) -> Tensor:
    """softmax over the last dim written into x itself (no autograd): `torch.softmax`'s kernel, its values."""
    return torch._softmax(x, -1, False, out=x) if hasattr(torch, "_softmax") else x.copy_(torch.softmax(x, -1))


def _segment_mask(m: int, t: int, n: int, device) -> Tensor:
    """(n, m + T) bool for the last n of T queries over [memory; segment]: all memory, causal in the segment."""
    i = torch.arange(m + t - n, m + t, device=device)[:, None]
    return torch.arange(m + t, device=device)[None] <= i


def last_query_attention(q_last: Tensor, k_all: Tensor, m: int, t: int, scale: float | None = None) -> Tensor:
    """Attention probabilities of the last n queries q_last (B, H, n, D) of a T-query segment over
    [memory; segment] k_all (B, H, m + T, D), summed over the n queries: (B, H, m + T) float32."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q_last.shape[-1])
    n = q_last.shape[-2]
    s = ((q_last * scale) @ k_all.transpose(-1, -2)).float()  # (B, H, n, S)
    return torch.softmax(s.masked_fill(~_segment_mask(m, t, n, q_last.device), float("-inf")), dim=-1).sum(-2)
