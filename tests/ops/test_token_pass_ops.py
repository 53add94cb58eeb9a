"""The token-pass math (segment size 1, T tokens at once) against one query or one token at a time."""

import pytest
import torch

from segcli.ops.attention import band_attention, band_mask, pass_attention, reference_attention, slot_scores
from segcli.ops.linear_attention import chunk_linear_memory, empty_state, token_linear_memory
from segcli.ops.rope import inv_frequencies, shift_rope, shift_rope_each


@pytest.mark.parametrize("m,t,band", [(0, 5, 3), (4, 6, 4), (3, 1, 8)])
def test_pass_attention_with_slot_blocks_is_one_softmax_per_query(m, t, band):
    g = torch.Generator().manual_seed(m * 7 + t)
    q = torch.randn(2, 3, t, 8, generator=g)
    k_all, v_all = (torch.randn(2, 3, m + t, 8, generator=g) for _ in range(2))
    shared_k, shared_v = (torch.randn(2, 3, 4, 8, generator=g) for _ in range(2))  # slots every query may read
    own_k, own_v = (torch.randn(2, 3, t, 1, 8, generator=g) for _ in range(2))  # one slot per query
    reads = torch.rand(t, 4, generator=g) > 0.4
    has_own = torch.arange(t)[:, None] % 2 == 0
    allowed = band_mask(m, t, band, "cpu")
    out, mass = pass_attention(q, k_all, v_all, m, allowed, ((slot_scores(q, shared_k, reads), shared_v),
                                                             (slot_scores(q, own_k, has_own), own_v)))
    for i in range(t):
        ks = torch.cat([shared_k[:, :, reads[i]], own_k[:, :, i, : int(has_own[i])], k_all[:, :, allowed[i]]], 2)
        vs = torch.cat([shared_v[:, :, reads[i]], own_v[:, :, i, : int(has_own[i])], v_all[:, :, allowed[i]]], 2)
        ref = reference_attention(q[:, :, i : i + 1], ks, vs, torch.ones(1, ks.shape[2], dtype=torch.bool))
        assert (out[:, :, i : i + 1] - ref).abs().max() < 1e-5
        p = torch.softmax((q[:, :, i : i + 1] @ ks.transpose(-1, -2)) / 8**0.5, -1)
        assert (mass[:, :, i] - p[..., :-1].sum(-1)[..., 0]).abs().max() < 1e-5  # all but its own key (the last)
    plain, plain_mass = pass_attention(q, k_all, v_all, m, allowed)
    ref, ref_mass = band_attention(q, k_all, v_all, m, band)
    assert (plain - ref).abs().max() < 1e-6 and (plain_mass - ref_mass).abs().max() < 1e-6


def test_scores_at_replace_the_scores_of_keys_read_shifted():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 3, 4, generator=g)
    k_all, v_all = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    per_query = torch.randn(1, 2, 3, 2, 4, generator=g)  # query i reads keys 0, 1 as per_query[i]
    allowed = torch.ones(3, 5, dtype=torch.bool).tril(2)
    out, _ = pass_attention(q, k_all, v_all, 2, allowed, scores_at=(0, slot_scores(q, per_query)))
    for i in range(3):
        ks = torch.cat([per_query[:, :, i], k_all[:, :, 2 : 3 + i]], 2)
        ref = reference_attention(q[:, :, i : i + 1], ks, v_all[:, :, : 3 + i], torch.ones(1, 3 + i, dtype=torch.bool))
        assert (out[:, :, i : i + 1] - ref).abs().max() < 1e-5


def test_shift_rope_each_is_shift_rope_per_delta():
    inv = inv_frequencies(8, 10000.0)
    x = torch.randn(1, 2, 3, 8)
    deltas = torch.tensor([0, 5, 123456])
    each = shift_rope_each(x, deltas, inv)
    assert each.shape == (1, 2, 3, 3, 8)
    for i, d in enumerate(deltas.tolist()):
        assert torch.equal(each[:, :, i], shift_rope(x, d, inv))  # the same float operations


@pytest.mark.parametrize("start", [0, 9], ids=["empty", "after-9"])
def test_token_linear_memory_equals_one_token_segments(start):
    g = torch.Generator().manual_seed(start)
    q, k, v = (torch.randn(2, 2, 12, 4, generator=g) for _ in range(3))
    state = empty_state(2, 2, 4, 4)
    if start:
        _, state = chunk_linear_memory(*(torch.randn(2, 2, start, 4, generator=g) for _ in range(3)), state)
    out, final = token_linear_memory(q, k, v, state)
    s = state
    for i in range(12):
        one, s = chunk_linear_memory(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], s)
        assert (out[:, :, i : i + 1] - one).abs().max() < 1e-5
    assert final.n == s.n == start + 12
    assert (final.mu - s.mu).abs().max() < 1e-5 and (final.nu - s.nu).abs().max() < 1e-5
    if not start:
        assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
