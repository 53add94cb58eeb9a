"""The scored policies' in-place paths at inference (segcli/memory/scored.py): `close_up` against the gather it
replaces, the [memory; segment] each `extend` hands the attention (never touched by an eviction before it is
read), and the native model at n_s = 1 and 3 under inference mode against the same stream with autograd on
(the plain forms: concatenation, gathers, masked softmax)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from segcli.memory import make_policy
from segcli.memory.scored import HELD, close_up, gather, rows_but_one

SCORED = ("tova", "h2o", "snapkv", "keynorm")
no_shift = lambda k, d: k  # noqa: E731


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64], ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 9, 8), (2, 3, 6, 5), (1, 2, 5)], ids=["b1h4", "b2h3", "no-last-dim"])
def test_close_up_equals_the_gather(shape, dtype):
    g = torch.Generator().manual_seed(0)
    b, h, s = shape[:3]
    for trial in range(12):
        x = (torch.randn(*shape, generator=g) * 100).to(dtype)
        drop = torch.randint(0, s, (b, h, 1), generator=g)
        if trial == 0:
            drop[:] = s - 1  # the newest pair dropped: nothing moves
        if trial == 1:
            drop[:] = 0  # the oldest: everything after it moves
        want = gather(x, rows_but_one(drop, s, 0), (b, h, s - 1))
        with torch.inference_mode():
            y = x.clone()
            assert close_up((y,), drop)
        assert torch.equal(y.narrow(2, 0, s - 1), want)


def test_close_up_leaves_what_it_cannot_do_alone():
    x = torch.randn(1, 2, 6, 4)
    drop = torch.zeros(1, 2, 1, dtype=torch.long)
    with torch.inference_mode():
        strided = torch.randn(1, 2, 4, 6).transpose(-1, -2)  # not contiguous
        kept = strided.clone()
        assert not close_up((strided,), drop) and torch.equal(strided, kept)
        assert not close_up((x, torch.randn(1, 2, 5)), drop)  # not all of S rows
    with torch.enable_grad():
        assert not close_up((x,), drop)


@pytest.mark.parametrize("how", ["extend", "extend_unevicted"])
@pytest.mark.parametrize("policy", SCORED)
def test_extend_hands_the_attention_the_memory_before_it(policy, how):
    """Under inference mode every extend's k_all / v_all is the memory as it was, then the segment, up to the
    attention that reads it, whatever eviction the extend or the last observe did in place (`extend_unevicted`:
    keynorm too is evicted by the observe after it, as the native model calls it)."""
    p = make_policy(policy, memory_size=6, recent_tokens=2, window=2)
    extend = getattr(p, how)
    observed = p.needs_attention is not None or how == "extend_unevicted"
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        st = p.init_state(1, 2, 4, device="cpu", dtype=torch.float32)
        for t in [4, 3, 1, 1, 1, 1, 2, 1, 1, 1, 5, 1, 1]:
            mem_k, mem_v = st.k.clone(), st.v.clone()
            k, v = torch.randn(1, 2, t, 4, generator=g), torch.randn(1, 2, t, 4, generator=g)
            st, k_all, v_all, m = extend(st, k, v, k, no_shift)
            assert m == mem_k.shape[2]
            assert torch.equal(k_all, torch.cat([mem_k, k], 2)) and torch.equal(v_all, torch.cat([mem_v, v], 2))
            if observed:
                st = p.observe(st, torch.rand(1, 2, m + t, generator=g) if p.needs_attention else None)
            assert st.k.shape[2] <= 6 and bool((st.pos[..., 1:] > st.pos[..., :-1]).all())


@pytest.mark.parametrize("n_s", [1, 3])
@pytest.mark.parametrize("policy", SCORED)
def test_inference_streams_what_autograd_streams(policy, n_s):
    model = tiny_model(seed=5)
    ids = torch.randint(0, 8192, (1, 30), generator=torch.Generator().manual_seed(2))
    sizes = dict(memory_size=7, recent_tokens=3, window=2)
    runs = []
    for ctx in (torch.enable_grad, torch.inference_mode):  # autograd first: its cached RoPE tables serve both
        with ctx():
            mem = model.new_memory(policy, **sizes)
            logits, stats = [], []
            for s in range(0, ids.shape[1], n_s):
                out = model(ids[:, s : s + n_s], mem)
                mem = out.memory
                logits.append(out.logits.detach().clone())
                stats.append([(x.slots, x.evicted, x.oldest_age, x.mean_age) for x in mem.stats()])
            runs.append((torch.cat(logits, 1), stats, [{n: getattr(st, n).detach().clone() for n in HELD}
                                                       for st in mem.states]))
    (plain, plain_stats, plain_states), (fast, fast_stats, fast_states) = runs
    assert (fast - plain).abs().max() <= 1e-4
    assert fast_stats == plain_stats
    for a, b in zip(fast_states, plain_states):
        assert torch.equal(a["pos"], b["pos"])
        assert torch.allclose(a["k"], b["k"], atol=1e-5) and torch.allclose(a["score"], b["score"], atol=1e-5)
