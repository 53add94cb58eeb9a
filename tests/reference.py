"""Plain reference forwards of the native model, written independently of the memory code:
the whole sequence at once, with an explicit (T, T) attention mask or explicit per-query key sets."""

from __future__ import annotations

import torch
from torch import Tensor

from segcli.ops.attention import reference_attention
from segcli.ops.rope import apply_rope, inv_frequencies, rope_cos_sin


def _qkv(layer, h, cos, sin):
    b, n, c = h.shape
    q, k, v = layer.attn.qkv(h).view(b, n, 3, layer.attn.h, layer.attn.d).permute(2, 0, 3, 1, 4)
    return q, k, v


def smeared(layer, kr: Tensor) -> Tensor:
    """Smeared keys of a whole sequence: k_t + beta_h * k_{t-1}, k_{-1} = 0 (unchanged without smear_keys)."""
    beta = layer.attn.key_smear
    if beta is None:
        return kr
    previous = torch.nn.functional.pad(kr, (0, 0, 1, 0))[:, :, :-1]  # (B, H, N, D): row t holds k_{t-1}
    return kr + beta.view(1, -1, 1, 1) * previous


def masked_forward(model, ids: Tensor, allowed: Tensor) -> Tensor:
    """Logits of a whole-sequence forward where query i sees key j iff allowed[i, j]."""
    cfg = model.config
    x = model.model.embed_tokens(ids)
    n = ids.shape[1]
    cos, sin = rope_cos_sin(torch.arange(n), inv_frequencies(cfg.head_dim, cfg.rope_theta), x.dtype)
    for layer in model.model.layers:
        q, k, v = _qkv(layer, layer.attn_norm(x), cos, sin)
        a = reference_attention(apply_rope(q, cos, sin), smeared(layer, apply_rope(k, cos, sin)), v, allowed)
        x = x + layer.attn.o(a.transpose(1, 2).reshape(x.shape))
        x = x + layer.mlp(layer.mlp_norm(x))
    return model.lm_head(model.model.norm(x))


def causal(n: int) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


def sliding_window(n: int, width: int) -> Tensor:
    """Query i sees keys i-width+1 .. i."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (j <= i) & (j > i - width)


def sink_forward(model, ids: Tensor, n_sink: int, n_c: int) -> Tensor:
    """StreamingLLM at segment size 1, query by query: keys = the first n_sink tokens + the last n_c
    before the query + itself, positions re-assigned inside that cache (sinks sit just before the window)."""
    cfg = model.config
    inv = inv_frequencies(cfg.head_dim, cfg.rope_theta)
    x = model.model.embed_tokens(ids)
    n = ids.shape[1]
    for layer in model.model.layers:
        h = layer.attn_norm(x)
        q, k, v = _qkv(layer, h, None, None)
        outs = []
        for i in range(n):
            window = list(range(max(0, i - n_c), i + 1))
            sinks = [j for j in range(min(n_sink, n)) if j < window[0]]
            keys = sinks + window
            # true positions for the window; sinks placed right before it
            pos = [window[0] - len(sinks) + s for s in range(len(sinks))] + window
            ck, sk = rope_cos_sin(torch.tensor(pos), inv, x.dtype)
            cq, sq = rope_cos_sin(torch.tensor([i]), inv, x.dtype)
            qi = apply_rope(q[:, :, i : i + 1], cq, sq)
            ki = apply_rope(k[:, :, keys], ck, sk)
            if layer.attn.key_smear is not None:  # + beta * the key before each, rotated one position earlier
                before = torch.stack([k[:, :, j - 1] if j else torch.zeros_like(k[:, :, 0]) for j in keys], 2)
                cb, sb = rope_cos_sin(torch.tensor(pos) - 1, inv, x.dtype)
                ki = ki + layer.attn.key_smear.view(1, -1, 1, 1) * apply_rope(before, cb, sb)
            outs.append(reference_attention(qi, ki, v[:, :, keys], torch.ones(1, len(keys), dtype=torch.bool)))
        a = torch.cat(outs, 2)
        x = x + layer.attn.o(a.transpose(1, 2).reshape(x.shape))
        x = x + layer.mlp(layer.mlp_norm(x))
    return model.lm_head(model.model.norm(x))


def streamed(model, ids: Tensor, policy: str, segment_size: int, **sizes):
    """Logits of the model streamed segment by segment through `policy`; returns (logits, memory)."""
    mem = model.new_memory(policy, ids.shape[0], **sizes)
    outs = []
    for s in range(0, ids.shape[1], segment_size):
        out = model(ids[:, s : s + segment_size], mem)
        mem = out.memory
        outs.append(out.logits)
    return torch.cat(outs, 1), mem
