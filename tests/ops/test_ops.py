"""Fast forms of the math against plain float32 references."""

import pytest
import torch

from segcli.ops.attention import (
    band_attention, fused_split_attention, reference_attention, single_query_attention, split_attention,
)
from segcli.ops.linear_attention import (
    chunk_linear_memory, empty_state, naive_linear_memory, recurrent_linear_memory,
)
from segcli.ops.rope import apply_rope, inv_frequencies, rope_cos_sin, shift_rope


@pytest.mark.parametrize("m", [0, 1, 9], ids=lambda m: f"mem{m}")
@pytest.mark.parametrize("t", [1, 6], ids=lambda t: f"seg{t}")
def test_split_attention_matches_concatenated_mask(m, t):
    g = torch.Generator().manual_seed(m * 10 + t)
    q, k, v = (torch.randn(2, 3, t, 8, generator=g) for _ in range(3))
    km, vm = (torch.randn(2, 3, m, 8, generator=g) for _ in range(2))
    out, mass = split_attention(q, km, vm, k, v)
    allowed = torch.cat([torch.ones(t, m, dtype=torch.bool), torch.ones(t, t, dtype=torch.bool).tril()], 1)
    ref = reference_attention(q, torch.cat([km, k], 2), torch.cat([vm, v], 2), allowed)
    assert (out - ref).abs().max() < 1e-5
    if m:
        s = (q @ torch.cat([km, k], 2).transpose(-1, -2)) / 8**0.5
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
        assert (mass - p[..., :m].sum(-1)).abs().max() < 1e-5
    else:
        assert mass is None


def test_rope_depends_only_on_distance_and_shifts_compose():
    inv = inv_frequencies(16, 10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def rot(x, p):
        c, s = rope_cos_sin(torch.tensor([p]), inv, torch.float32)
        return apply_rope(x[None], c, s)[0]

    assert abs(rot(q, 7) @ rot(k, 3) - rot(q, 1_000_007) @ rot(k, 1_000_003)) < 1e-4
    assert (shift_rope(rot(k, 3), 11, inv) - rot(k, 14)).abs().max() < 1e-5


def _qkv(seed, t=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, t, 4, generator=g) for _ in range(3)]


def test_linear_chunk_equals_recurrent_outputs_and_state():
    state_c = state_r = None
    for seg in range(4):
        q, k, v = _qkv(seg)
        out_c, state_c = chunk_linear_memory(q, k, v, state_c)
        out_r, state_r = recurrent_linear_memory(q, k, v, state_r)
        assert (out_c - out_r).abs().max() < 1e-5
        assert (state_c.mu - state_r.mu).abs().max() < 1e-5
        assert (state_c.nu - state_r.nu).abs().max() < 1e-5
        assert state_c.n == state_r.n == 12 * (seg + 1)


def test_linear_read_equals_explicit_linear_attention_over_earlier_segments():
    state = empty_state(2, 2, 4, 4)
    ks, vs = [], []
    for seg in range(4):
        q, k, v = _qkv(100 + seg)
        out, state = chunk_linear_memory(q, k, v, state)
        past_k = torch.cat(ks, 2) if ks else k[:, :, :0]
        past_v = torch.cat(vs, 2) if vs else v[:, :, :0]
        assert (out - naive_linear_memory(q, past_k, past_v)).abs().max() < 1e-5
        ks.append(k)
        vs.append(v)


@torch.no_grad()
@pytest.mark.parametrize("t", [1, 8, 33], ids=lambda t: f"seg{t}")
def test_fused_split_attention_matches_reference(t):
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(1, 4, t, 16, generator=g) * 2 for _ in range(3))
    km, vm = (torch.randn(1, 4, 50, 16, generator=g) * 2 for _ in range(2))
    out, mass = fused_split_attention(q, km, vm, k, v)
    ref_out, ref_mass = split_attention(q, km, vm, k, v)
    assert (out - ref_out).abs().max() < 1e-5 and (mass - ref_mass).abs().max() < 1e-5


@pytest.mark.parametrize("m", [0, 1, 37], ids=lambda m: f"mem{m}")
def test_single_query_attention_matches_masked_reference(m):
    g = torch.Generator().manual_seed(m)
    q, k, v = (torch.randn(2, 3, 1, 8, generator=g) * 2 for _ in range(3))
    km, vm = (torch.randn(2, 3, m, 8, generator=g) * 2 for _ in range(2))
    k_all, v_all = torch.cat([km, k], 2), torch.cat([vm, v], 2)
    out, mass = single_query_attention(q, k_all, v_all, m)
    ref = reference_attention(q, k_all, v_all, torch.ones(1, m + 1, dtype=torch.bool))
    assert (out - ref).abs().max() < 1e-5
    if m:
        p = torch.softmax((q @ k_all.transpose(-1, -2)) / 8**0.5, -1)
        assert (mass - p[..., :m].sum(-1)).abs().max() < 1e-6
    else:
        assert mass is None


@pytest.mark.parametrize("m,t,band", [(0, 6, 3), (3, 6, 3), (5, 9, 8), (8, 4, 8)])
def test_band_attention_equals_one_query_at_a_time(m, t, band):
    """Query i reads the `band` keys before it and itself: the single-query form on that slice, one by one."""
    g = torch.Generator().manual_seed(10 * m + t)
    q = torch.randn(2, 3, t, 8, generator=g) * 2
    k_all, v_all = (torch.randn(2, 3, m + t, 8, generator=g) * 2 for _ in range(2))
    out, mass = band_attention(q, k_all, v_all, m, band)
    for i in range(t):
        lo, hi = max(0, m + i - band), m + i + 1
        ref, ref_mass = single_query_attention(q[:, :, i : i + 1], k_all[:, :, lo:hi], v_all[:, :, lo:hi], hi - 1 - lo)
        assert (out[:, :, i : i + 1] - ref).abs().max() < 1e-5
        if ref_mass is None:
            assert mass[:, :, i].abs().max() == 0
        else:
            assert (mass[:, :, i] - ref_mass[..., 0]).abs().max() < 1e-6
