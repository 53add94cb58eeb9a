"""TOVA and H2O on the native model against references written from the papers' algorithms: one forward per
segment with eager attention and its weights, then eviction from a plain per-layer cache (lists of positions,
keys and values), with no segcli memory code. At n_s = 1 the references drop pairs one at a time as the papers
do (TOVA: the lowest head-mean attention of the current token; H2O: the lowest accumulated score outside the
recent window); at n_s = 8 they keep the n_c best of [cache; segment] by sorting in plain Python."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_model
from reference import streamed
from segcli.ops.rope import apply_rope, inv_frequencies, rope_cos_sin

N = 48


def sharp_model():
    model = tiny_model(seed=11)
    with torch.no_grad():  # sharper still than tiny_model: attention far from uniform, scores far from ties
        for layer in model.model.layers:
            layer.attn.qkv.weight.mul_(1.5)
    return model


class PlainCache:
    """One layer's cache: per head a list of (position, key, value, score)."""

    def __init__(self, heads: int):
        self.heads = [[] for _ in range(heads)]


def reference_stream(model, ids, n_s: int, policy: str, n_c: int, recent: int = 0):
    cfg = model.config
    inv = inv_frequencies(cfg.head_dim, cfg.rope_theta)
    caches = [PlainCache(cfg.num_attention_heads) for _ in model.model.layers]
    logits = []
    for s in range(0, ids.shape[1], n_s):
        seg = ids[:, s : s + n_s]
        t = seg.shape[1]
        cos, sin = rope_cos_sin(torch.arange(s, s + t), inv, torch.float32)
        x = model.model.embed_tokens(seg)
        for layer, cache in zip(model.model.layers, caches):
            h = layer.attn_norm(x)
            q, k, v = layer.attn.qkv(h).view(1, t, 3, layer.attn.h, layer.attn.d).permute(2, 0, 3, 1, 4)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            outs, probs = [], []
            for hd, pairs in enumerate(cache.heads):
                ks = torch.stack([p[1] for p in pairs] + list(k[0, hd]))  # (m + T, D)
                vs = torch.stack([p[2] for p in pairs] + list(v[0, hd]))
                m = len(pairs)
                sc = q[0, hd] @ ks.T / math.sqrt(cfg.head_dim)  # (T, m + T) eager scores
                mask = torch.arange(m + t)[None] <= torch.arange(m, m + t)[:, None]
                p = torch.softmax(sc.masked_fill(~mask, float("-inf")), -1)
                outs.append(p @ vs)
                probs.append(p)
            a = torch.stack(outs)[None]  # (1, H, T, D)
            x = x + layer.attn.o(a.transpose(1, 2).reshape(1, t, -1))
            x = x + layer.mlp(layer.mlp_norm(x))
            evict(cache, probs, k[0], v[0], s, policy, n_c, recent)
        logits.append(model.lm_head(model.model.norm(x)))
    return torch.cat(logits, 1), caches


def evict(cache, probs, k, v, s, policy, n_c, recent):
    t = k.shape[1]
    for hd, pairs in enumerate(cache.heads):  # append the segment; h2o: every query's weights accumulate
        pairs += [[s + i, k[hd, i], v[hd, i], 0.0] for i in range(t)]
        for j, pair in enumerate(pairs):
            pair[3] += float(probs[hd][:, j].sum())
    if policy == "tova":
        last = [sum(float(probs[hd][-1, j]) for hd in range(len(probs))) / len(probs) for j in range(len(cache.heads[0]))]
        order = list(range(len(last)))
        if t == 1:  # TOVA's step: drop the lowest
            while len(order) > n_c:
                order.remove(min(order, key=lambda j: last[j]))
        else:
            order = sorted(sorted(order, key=lambda j: -last[j])[:n_c])
        for hd in range(len(cache.heads)):
            cache.heads[hd] = [cache.heads[hd][j] for j in order]
    else:  # h2o
        for hd, pairs in enumerate(cache.heads):
            if t == 1:  # H2O's step: drop the lowest score outside the recent window
                while len(pairs) > n_c:
                    older = pairs[: len(pairs) - recent]
                    pairs.remove(min(older, key=lambda p: p[3]))
            elif len(pairs) > n_c:
                older, newest = pairs[: len(pairs) - recent], pairs[len(pairs) - recent :]
                heavy = sorted(sorted(older, key=lambda p: -p[3])[: n_c - recent], key=lambda p: p[0])
                cache.heads[hd] = heavy + newest


def segcli_stream(model, ids, n_s, policy, **sizes):
    return streamed(model, ids, policy, n_s, **sizes)


@torch.no_grad()
@pytest.mark.parametrize("n_s", [1, 8], ids=["ns1", "ns8"])
@pytest.mark.parametrize("policy,sizes", [("tova", dict(memory_size=12)), ("h2o", dict(memory_size=12, recent_tokens=4))],
                         ids=["tova", "h2o"])
def test_matches_the_papers_algorithm(policy, sizes, n_s):
    model = sharp_model()
    ids = torch.randint(0, 8192, (1, N), generator=torch.Generator().manual_seed(3))
    want, caches = reference_stream(model, ids, n_s, policy, sizes["memory_size"], sizes.get("recent_tokens", 0))
    got, mem = segcli_stream(model, ids, n_s, policy, **sizes)
    assert (got - want).abs().max() <= 1e-4
    for state, cache in zip(mem.states, caches):  # the same pairs held, per head, and (h2o) the same scores
        for hd, pairs in enumerate(cache.heads):
            assert state.pos[0, hd].tolist() == [p[0] for p in pairs]
            if policy == "h2o":
                assert torch.allclose(state.score[0, hd], torch.tensor([p[3] for p in pairs]), atol=1e-4)
    full = segcli_stream(model, ids, n_s, "full")[0]
    assert (got - full).abs().max() > 1e-2, "the memory must have evicted something that mattered"
