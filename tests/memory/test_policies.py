"""Memory policies as pure functions on random key-value streams (no model)."""

import pytest
import torch

from segcli.memory import POLICY_NAMES, make_policy
from segcli.memory.compressive import mean_pool

B, H, D = 1, 2, 4
SIZES = dict(memory_size=10, sink_tokens=3, compress_rate=4, compressed_size=5)
no_shift = lambda k, d: k  # noqa: E731


def stream(policy, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = policy.init_state(B, H, D, device="cpu", dtype=torch.float32)
    ks, vs = [], []
    for t in lengths:
        k, v = torch.randn(B, H, t, D, generator=g), torch.randn(B, H, t, D, generator=g)
        with torch.inference_mode():
            state = policy.update(state, k, v, k)
        ks.append(k)
        vs.append(v)
    return state, torch.cat(ks, 2), torch.cat(vs, 2)


def same_set(a, b):
    """Equal as multisets of slots (memory order is free)."""
    key = lambda x: x[0, 0].sum(-1).sort().values  # noqa: E731
    return a.shape == b.shape and torch.allclose(key(a), key(b), atol=1e-6)


@pytest.mark.parametrize("lengths", [[3, 3, 3], [7, 1, 12, 5, 2], [25]], ids=str)
def test_fifo_keeps_the_last_n_c_pairs(lengths):
    state, k, v = stream(make_policy("fifo", **SIZES), lengths)
    mem = make_policy("fifo", **SIZES).read(state, no_shift)
    assert same_set(mem.k, k[:, :, -10:]) and same_set(mem.v, v[:, :, -10:])


def test_xl_keeps_the_previous_segment():
    state, k, v = stream(make_policy("xl"), [6, 6, 6])
    mem = make_policy("xl").read(state, no_shift)
    assert torch.equal(mem.k, k[:, :, -6:])


def test_average_equals_plain_mean():
    p = make_policy("average")
    state, k, v = stream(p, [5, 1, 9, 30])
    mem = p.read(state, no_shift)
    assert (mem.k[:, :, 0] - k.mean(2)).abs().max() < 1e-6
    assert (mem.v[:, :, 0] - v.mean(2)).abs().max() < 1e-6


def test_sink_keeps_first_tokens_and_window():
    p = make_policy("sink", **SIZES)
    state, k, v = stream(p, [2, 5, 11, 4])
    mem = p.read(state, no_shift)
    expect = torch.cat([k[:, :, :3], k[:, :, -10:]], 2)
    assert same_set(mem.k, expect)


def test_compressive_pools_what_fifo_drops():
    p = make_policy("compressive", **SIZES)
    lengths = [7, 13, 4, 9, 30, 2]
    state, k, v = stream(p, lengths)
    n = k.shape[2]
    dropped = n - 10
    full = dropped // 4
    pooled = mean_pool(k[:, :, : full * 4], 4)
    partial = k[:, :, full * 4 : dropped]
    keep = 5 - (1 if partial.shape[2] else 0)
    expect = [pooled[:, :, -keep:]] + ([partial.mean(2, keepdim=True)] if partial.shape[2] else []) + [k[:, :, -10:]]
    mem = p.read(state, no_shift)
    assert same_set(mem.k, torch.cat(expect, 2))


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_memory_is_bounded_over_5000_tokens(name):
    p = make_policy(name, **SIZES)
    g = torch.Generator().manual_seed(1)
    state = p.init_state(B, H, D, device="cpu", dtype=torch.float32)
    sizes, slots = [], []
    for i in range(500):
        t = 10
        k = torch.randn(B, H, t, D, generator=g)
        with torch.inference_mode():
            state = p.update(state, k, k, k)
        st = p.stats(state)
        sizes.append(st.bytes)
        slots.append(st.slots)
        if st.capacity is not None:
            assert st.slots <= st.capacity
    if name == "full":
        assert slots[-1] == 5000
    else:
        cap = p.capacity(10)
        assert max(slots) <= cap
        assert max(sizes[250:]) <= max(sizes[:250]), "bytes held must stop growing once the memory is full"
