"""What the native model keeps in each layer's memory state, against plain references: the smeared key of
the segment's last token (every policy but `none`), and the linear memory as `chunk_linear_memory` computes it."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from reference import causal, smeared, streamed
from segcli.memory import POLICY_NAMES
from segcli.memory.base import Carried
from segcli.ops.attention import reference_attention
from segcli.ops.linear_attention import chunk_linear_memory
from segcli.ops.rope import apply_rope, inv_frequencies, rope_cos_sin

N = 50
SIZES = dict(memory_size=16, sink_tokens=2, compress_rate=3, compressed_size=4)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 8192, (1, N), generator=torch.Generator().manual_seed(11))


def layer0_qkv(model, ids):
    """Layer 0's raw q, k, v (B, H, N, D) and its keys rotated to their positions, from a plain forward."""
    layer = model.model.layers[0]
    h = layer.attn_norm(model.model.embed_tokens(ids))
    q, k, v = layer.attn.qkv(h).view(1, ids.shape[1], 3, layer.attn.h, layer.attn.d).permute(2, 0, 3, 1, 4)
    cfg = model.config
    cos, sin = rope_cos_sin(torch.arange(ids.shape[1]), inv_frequencies(cfg.head_dim, cfg.rope_theta), q.dtype)
    return q, k, v, apply_rope(q, cos, sin), apply_rope(k, cos, sin)


@torch.no_grad()
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_each_layer_state_holds_the_last_unsmeared_key_except_under_none(ids, policy):
    model = tiny_model(seed=5, smear_keys=True)
    _, mem = streamed(model, ids, policy, 7, **SIZES)
    *_, kr = layer0_qkv(model, ids)
    state = mem.states[0]
    if policy == "none":
        assert not isinstance(state, Carried) and not hasattr(state, "last_key")
    else:
        assert isinstance(state, Carried) and state.last_key.shape == (1, 2, 1, 16)
        assert (state.last_key - kr[:, :, -1:]).abs().max() <= 1e-6
    plain = streamed(tiny_model(seed=5), ids, policy, 7, **SIZES)[1]
    assert all(getattr(s, "last_key", None) is None for s in plain.states)  # plain keys: nothing carried


@torch.no_grad()
@pytest.mark.parametrize("smear", [False, True], ids=["plain-keys", "smeared-keys"])
def test_the_linear_memory_layer_is_chunk_linear_memory_mixed_with_causal_attention(ids, smear):
    model = tiny_model(seed=6, smear_keys=smear)
    attn = model.model.layers[0].attn
    attn.memory_gate.copy_(torch.tensor([1.5, -0.5]))  # a gate per head, not the init's 1/2
    got = []
    hook = attn.register_forward_hook(lambda mod, args, out: got.append(out[0]))
    try:
        streamed(model, ids, "linear", 16)
    finally:
        hook.remove()
    q, k, v, qr, kr = layer0_qkv(model, ids)
    kr = smeared(model.model.layers[0], kr)  # the whole sequence smeared: the last key carried across segments
    g = torch.sigmoid(attn.memory_gate).view(1, -1, 1, 1)
    state = None
    for i, s in enumerate(range(0, N, 16)):
        seg = slice(s, s + 16)
        t = q[:, :, seg].shape[2]
        soft = reference_attention(qr[:, :, seg], kr[:, :, seg], v[:, :, seg], causal(t))
        a_mem, new = chunk_linear_memory(q[:, :, seg], k[:, :, seg], v[:, :, seg], state)
        mixed = soft if state is None else g * a_mem + (1 - g) * soft  # the first segment has no memory
        state = new
        want = attn.o(mixed.transpose(1, 2).reshape(1, t, -1))
        assert (got[i] - want).abs().max() <= 1e-5, i
