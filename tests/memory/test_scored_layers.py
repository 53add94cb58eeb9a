"""The scored policies' eviction of every layer at once (`ScoredPolicy.observe_layers`, segcli/memory/scored.py)
against the same layers evicted one by one (`MemoryPolicy.observe_layers`, the plain form): the same pairs,
scores, positions and norms, bit for bit, on random states and attention and on the native model's streams."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from segcli.memory import make_policy
from segcli.memory.base import MemoryPolicy
from segcli.memory.scored import HELD

SCORED = ("tova", "h2o", "snapkv", "keynorm")
SIZES = dict(memory_size=6, recent_tokens=2, window=2)
no_shift = lambda k, d: k  # noqa: E731


def one_by_one(policy):
    """The policy with the interface's default `observe_layers`: `observe` layer after layer."""
    policy.observe_layers = lambda states, attns: MemoryPolicy.observe_layers(policy, states, attns)
    return policy


@pytest.mark.parametrize("policy", SCORED)
def test_layers_evicted_together_keep_what_each_keeps_alone(policy):
    layers, b, h, d = 3, 2, 2, 4
    together, alone = make_policy(policy, **SIZES), one_by_one(make_policy(policy, **SIZES))
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        runs = [[p.init_layer_state(i, layers, b, h, d, device="cpu", dtype=torch.float32) for i in range(layers)]
                for p in (together, alone)]
        shared_from = None
        for step, t in enumerate([4, 3, 3, 1, 1, 1, 2, 2, 1, 5, 5, 1, 1, 3]):
            new = [(torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)) for _ in range(layers)]
            for p, states in zip((together, alone), runs):
                attns = []
                for i, (k, v) in enumerate(new):
                    mem_k = states[i].k.clone()
                    states[i], k_all, _, m = p.extend_unevicted(states[i], k, v, k, no_shift)
                    assert torch.equal(k_all, torch.cat([mem_k, k], 2))  # the layer's memory as it was, then k
                    g_attn = torch.Generator().manual_seed(100 * step + i)  # the same attention for both runs
                    attns.append(torch.rand(b, h, m + t, generator=g_attn) if p.needs_attention else None)
                states[:] = p.observe_layers(states, attns)
            for a, c in zip(*runs):
                for name in HELD:
                    assert torch.equal(getattr(a, name), getattr(c, name)), (step, name)
                assert (a.evicted, a.pending, a.seen) == (c.evicted, c.pending, c.seen)
                assert a.k.shape[2] <= 6
            bases = {st.k.untyped_storage().data_ptr() for st in runs[0]}
            if len(bases) == 1 and shared_from is None:
                shared_from = step
        assert shared_from is not None and shared_from <= 3  # the layers' buffers are one (the stacked eviction ran)


@pytest.mark.parametrize("n_s", [1, 4])
@pytest.mark.parametrize("policy", SCORED)
def test_native_model_streams_the_same_either_way(policy, n_s):
    model = tiny_model(seed=7)
    ids = torch.randint(0, 8192, (1, 40), generator=torch.Generator().manual_seed(4))
    runs = []
    for p in (make_policy(policy, **SIZES), one_by_one(make_policy(policy, **SIZES))):
        with torch.inference_mode():
            mem = model.new_memory(p)
            logits, stats = [], []
            for s in range(0, ids.shape[1], n_s):
                out = model(ids[:, s : s + n_s], mem)
                mem = out.memory
                logits.append(out.logits.clone())
                stats.append([(x.slots, x.evicted, x.bytes, x.key_norm, x.mean_age) for x in mem.stats()])
            runs.append((torch.cat(logits, 1), stats, [{n: getattr(st, n).clone() for n in HELD} for st in mem.states]))
    (fast, fast_stats, fast_states), (plain, plain_stats, plain_states) = runs
    assert torch.equal(fast, plain) and fast_stats == plain_stats
    for a, c in zip(fast_states, plain_states):
        assert all(torch.equal(a[n], c[n]) for n in HELD)


def test_pyramid_budgets_evict_layer_by_layer():
    """Budgets that differ per layer cannot share one selection: each layer is evicted alone, to its budget."""
    p = make_policy("tova", memory_size=6, layer_budget="pyramid")
    budgets = p.budgets(3)
    with torch.inference_mode():
        states = [p.init_layer_state(i, 3, 1, 2, 4, device="cpu", dtype=torch.float32) for i in range(3)]
        for t in [5, 5, 5]:
            attns = []
            for i in range(3):
                k = torch.randn(1, 2, t, 4)
                states[i], _, _, m = p.extend_unevicted(states[i], k, k, k, no_shift)
                attns.append(torch.rand(1, 2, m + t))
            states = p.observe_layers(states, attns)
        assert [st.k.shape[2] for st in states] == [min(b, 15) for b in budgets]


@pytest.mark.parametrize("policy", SCORED)
def test_odd_segment_sizes_and_batch_2_stream_the_same_either_way(policy):
    """Sizes that change between segments (a short last one, token steps after a segment) and two streams."""
    model = tiny_model(seed=7, num_hidden_layers=3)
    sizes = [5, 5, 3, 1, 1, 1, 7, 7, 2, 4, 4]
    ids = torch.randint(0, 8192, (2, sum(sizes)), generator=torch.Generator().manual_seed(4))
    runs = []
    for p in (make_policy(policy, **SIZES), one_by_one(make_policy(policy, **SIZES))):
        with torch.inference_mode():
            mem, s, logits = model.new_memory(p, batch=2), 0, []
            for n in sizes:
                out = model(ids[:, s : s + n], mem)
                mem, s = out.memory, s + n
                logits.append(out.logits.clone())
            runs.append((torch.cat(logits, 1), [{n: getattr(st, n).clone() for n in HELD} for st in mem.states]))
    (fast, fast_states), (plain, plain_states) = runs
    assert torch.equal(fast, plain)
    assert all(torch.equal(a[n], c[n]) for a, c in zip(fast_states, plain_states) for n in HELD)


def test_layers_observed_apart_leave_the_others_as_they_were():
    """observe_layers on some of the stacked layers evicts those alone and never touches the others' rows."""
    p = make_policy("keynorm", memory_size=6)
    with torch.inference_mode():
        states = [p.init_layer_state(i, 3, 1, 2, 4, device="cpu", dtype=torch.float32) for i in range(3)]
        for t in [4, 3, 1, 1]:
            for i in range(3):
                k = torch.randn(1, 2, t, 4)
                states[i] = p.extend_unevicted(states[i], k, k, k, no_shift)[0]
            if t == 1 and states[0].seen == 9:  # the second token step: the first two layers, then the last
                before = states[2].k.clone()
                head = p.observe_layers(states[:2], [None, None])
                assert torch.equal(states[2].k, before) and [st.k.shape[2] for st in head] == [6, 6]
                states = head + p.observe_layers(states[2:], [None])
            else:
                states = p.observe_layers(states, [None] * 3)
        assert [st.k.shape[2] for st in states] == [6, 6, 6]
