"""The scored policies' fast paths (segcli/memory/scored.py) against their plain forms: `drop_one` against `keep`,
eviction into buffers with room (inference) against concatenation (autograd on), the stored norms against norms
of the held pairs, and a state continued twice."""

from __future__ import annotations

import pytest
import torch

from segcli.memory import make_policy
from segcli.memory.scored import HELD, flat_rows, rows_but_one

SCORED = ("tova", "h2o", "snapkv", "keynorm")
SIZES = dict(memory_size=12, recent_tokens=4, window=3)
no_shift = lambda k, d: k  # noqa: E731


def segments(lengths, b=1, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    for t in lengths:
        k, v = torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)
        yield k, v, torch.rand(b, h, 1, generator=g)  # attention: scaled per pair below


def run(policy, lengths, *, grad: bool, b=1, h=2, d=8):
    """Stream the segments through extend + observe (random attention); the states after each segment."""
    p = make_policy(policy, **SIZES)
    st = p.init_state(b, h, d, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    out = []
    ctx = torch.enable_grad() if grad else torch.inference_mode()
    with ctx:
        for k, v, _ in segments(lengths, b, h, d):
            st, k_all, v_all, m = p.extend(st, k, v, k, no_shift)
            assert torch.equal(k_all[:, :, m:], k) and torch.equal(v_all[:, :, m:], v)
            if p.needs_attention is not None:
                st = p.observe(st, torch.rand(b, h, k_all.shape[2], generator=g))
            out.append({name: getattr(st, name).clone() for name in HELD} | {"stats": p.stats(st)})
    return out


@pytest.mark.parametrize("lengths", [[5, 5, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3], [1] * 30, [12, 4, 4, 4, 7, 1, 1]],
                         ids=["mixed", "tokens", "segments"])
@pytest.mark.parametrize("policy", SCORED)
def test_rooms_hold_what_concatenation_holds(policy, lengths):
    fast, plain = run(policy, lengths, grad=False), run(policy, lengths, grad=True)
    for a, b in zip(fast, plain):
        for name in HELD:
            assert torch.equal(a[name], b[name]), name
        sa, sb = a["stats"], b["stats"]
        assert (sa.slots, sa.evicted, sa.oldest_age, sa.mean_age) == (sb.slots, sb.evicted, sb.oldest_age, sb.mean_age)
        assert sa.key_norm == pytest.approx(sb.key_norm, rel=1e-6) and sa.bytes >= sb.bytes


@pytest.mark.parametrize("policy", SCORED)
def test_drop_one_leaves_out_what_keep_leaves_out(policy):
    p = make_policy(policy, **SIZES)
    g = torch.Generator().manual_seed(3)
    big = make_policy(policy, **{**SIZES, "memory_size": 100})  # holds [memory; segment] of 13 without evicting
    for trial in range(20):
        k = torch.randn(2, 3, 13, 4, generator=g)
        st = big.extend(big.init_state(2, 3, 4, device="cpu", dtype=torch.float32), k, k.flip(-1), k, no_shift)[0]
        attn = None if trial % 5 == 0 else torch.rand(2, 3, st.k.shape[2], generator=g)
        if attn is not None:
            st = p.scored(st, attn)
        budget = st.k.shape[2] - 1
        drop = p.drop_one(st, attn, budget)
        keep = p.keep(st, attn, budget)
        for room in (0, 1, 3):
            rows = rows_but_one(drop, budget + 1, room).view(2, 3, budget + room)
            assert torch.equal(rows[..., :budget].flatten(), flat_rows(keep, budget + 1))
            first = (torch.arange(6) * (budget + 1)).view(2, 3, 1)  # the room: each head's first pair
            assert torch.equal(rows[..., budget:], first.expand(2, 3, room))


def test_a_state_continued_twice_stays_what_it_was():
    p = make_policy("tova", **SIZES)
    with torch.inference_mode():
        st = p.init_state(1, 2, 8, device="cpu", dtype=torch.float32)
        for k, v, _ in segments([12, 1, 1]):
            st, k_all, _, _ = p.extend(st, k, v, k, no_shift)
            st = p.observe(st, torch.rand(1, 2, k_all.shape[2]))
        kept = st.k.clone()
        a = torch.ones(1, 2, 1, 8)
        first = p.extend(st, a, a, a, no_shift)[1]  # into the room
        second = p.extend(st, 2 * a, 2 * a, 2 * a, no_shift)[1]  # the room is taken: a new tensor
        assert torch.equal(st.k, kept)
        assert torch.equal(first[:, :, -1:], a) and torch.equal(second[:, :, -1:], 2 * a)
        assert torch.equal(first[:, :, :-1], kept) and torch.equal(second[:, :, :-1], kept)


def test_stats_read_the_stored_norms_and_a_state_without_them():
    p = make_policy("h2o", **SIZES)
    with torch.inference_mode():
        st = p.init_state(1, 2, 8, device="cpu", dtype=torch.float32)
        for k, v, _ in segments([12, 3, 3]):
            st, k_all, _, _ = p.extend(st, k, v, k, no_shift)
            st = p.observe(st, torch.rand(1, 2, k_all.shape[2]))
        s = p.stats(st)
        assert s.key_norm == pytest.approx(float(st.k.norm(dim=-1).mean()), rel=1e-6)
        assert s.value_norm == pytest.approx(float(st.v.norm(dim=-1).mean()), rel=1e-6)
        ages = st.seen - st.pos
        assert s.oldest_age == int(ages.max()) and s.mean_age == pytest.approx(float(ages.double().mean()))
        old = type(st)(**{**{n: getattr(st, n) for n in ("k", "v", "pos", "score")}, "seen": st.seen,
                          "budget": st.budget})  # a state read from a file written before the norms were kept
        assert old.kn is None and p.stats(old).key_norm == pytest.approx(s.key_norm, rel=1e-6)
        p.check_state(old, batch=1, heads=2, head_dim=8, dtype=torch.float32, seen=st.seen)
        nxt = p.extend(old, *(torch.ones(1, 2, 1, 8),) * 2, None, no_shift)[0]
        assert torch.allclose(nxt.kn, nxt.k.norm(dim=-1))


@pytest.mark.parametrize("m,t,n_last", [(0, 8, 8), (5, 8, 1), (12, 16, 3), (40, 16, 16)])
def test_scored_attention_at_inference_is_the_masked_softmax(m, t, n_last):
    """The inference form (explicit softmax in place in its score matrix) against a plain masked softmax:
    output, memory mass and the last queries' summed probabilities."""
    from segcli.ops.attention import scored_attention

    g = torch.Generator().manual_seed(m + t)
    q, k_all, v_all = (torch.randn(2, 3, n, 8, generator=g) for n in (t, m + t, m + t))
    allowed = torch.arange(m + t)[None] <= torch.arange(m, m + t)[:, None]  # (T, S): all memory, causal segment
    p = torch.softmax((q @ k_all.transpose(-1, -2) / 8 ** 0.5).masked_fill(~allowed, float("-inf")), -1)
    with torch.inference_mode():
        out, mass, attn = scored_attention(q, k_all, v_all, m, k_all[:, :, m:], v_all[:, :, m:], n_last)
    torch.testing.assert_close(out, p @ v_all)
    torch.testing.assert_close(attn, p[:, :, t - n_last:].sum(-2))
    if m:
        torch.testing.assert_close(mass, p[..., :m].sum(-1))
    else:
        assert mass is None


@pytest.mark.parametrize("t", [3, 8, 16, 5])
def test_causal_bias_is_one_cached_mask_whatever_the_lengths(t):
    """Segment lengths a run sees (each document's last segment its own) share one cached mask: a view of the
    largest yet, equal to the plain causal mask of each length."""
    from segcli.ops.attention import _BIASES, causal_bias, causal_mask

    with torch.inference_mode():
        for n in (t, 2 * t, t, 1):
            got = causal_bias(n, torch.float32, "cpu")
            want = torch.zeros(n, n).masked_fill(~causal_mask(n, "cpu"), float("-inf"))
            assert torch.equal(got, want)
    assert sum(1 for key in _BIASES if key[0] == torch.float32 and key[1] == "cpu") <= 2  # in and out of inference


@pytest.mark.parametrize("n_last", [1, 2, 12])
def test_half_precision_scores_what_autograd_scores(n_last):
    """In bfloat16 (CUDA's default dtype) a softmax in the model's dtype makes ties that reorder the kept pairs:
    the inference form scores there as the autograd form does (tova, snapkv: the last queries in float32), so an
    inference stream keeps what a training stream keeps."""
    from segcli.ops.attention import scored_attention

    g = torch.Generator().manual_seed(n_last)
    m, t = 20, 12
    q, k_all, v_all = (torch.randn(1, 2, n, 16, generator=g).bfloat16() for n in (t, m + t, m + t))
    args = (q, k_all, v_all, m, k_all[:, :, m:], v_all[:, :, m:], n_last)
    want = scored_attention(*args)
    with torch.inference_mode():
        got = scored_attention(*args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
