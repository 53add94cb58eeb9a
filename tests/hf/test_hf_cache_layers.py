"""segcli's cache layers on windowed models: what each layer kind holds and what it hands the model's attention."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_families import W, build_config
from segcli.hf import Positions, cache_kwarg, make_cache
from segcli.memory import make_policy

pytestmark = pytest.mark.transformers_api  # .ci/run runs this module again under an older transformers 5


def stream(model, cache, n: int, ns: int) -> None:
    ids = torch.randint(1, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for s in range(0, n, ns):
            x = ids[:, s : s + ns]
            model(x, position_ids=torch.arange(s, s + x.shape[1])[None], use_cache=True, **{cache_kwarg(model): cache})


@pytest.fixture(scope="module")
def gemma2():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(build_config("gemma2"), attn_implementation="eager").eval()


def test_full_keeps_the_window_in_sliding_layers_and_everything_in_full_ones(gemma2):
    """The ordinary cache: transformers' own keeps window - 1 pairs in a sliding layer; so does `full` here."""
    cache = make_cache(gemma2, "full")
    stream(gemma2, cache, 100, 7)
    kinds = gemma2.config.layer_types
    slots = [s.slots for s in cache.stats()]
    assert slots == [W - 1 if k == "sliding_attention" else 100 for k in kinds]


def test_a_sliding_layer_reads_only_its_window(gemma2):
    """fifo with more slots than the window: the sliding layers are handed at most window - 1 of them."""
    cache = make_cache(gemma2, make_policy("fifo", memory_size=3 * W))
    stream(gemma2, cache, 90, 5)
    for layer, kind in zip(cache.layers, gemma2.config.layer_types):
        assert layer.n_slots == 3 * W  # it holds what the policy holds
        assert layer.visible == (W - 1 if kind == "sliding_attention" else 3 * W)  # it reads what its window allows


def test_sinks_outside_the_window_are_not_read_by_sliding_layers(gemma2):
    cache = make_cache(gemma2, "sink", sink_tokens=2, memory_size=W // 2)
    stream(gemma2, cache, 60, 1)
    for layer, kind in zip(cache.layers, gemma2.config.layer_types):
        assert layer.n_slots == 2 + W // 2
        assert layer.visible == (W // 2 if kind == "sliding_attention" else 2 + W // 2)


@pytest.mark.parametrize("policy,sizes,tail", [
    ("fifo", dict(memory_size=8), 8), ("xl", {}, 4), ("none", {}, 0), ("full", {}, 40),
    ("sink", dict(sink_tokens=2, memory_size=8), 8),  # the sinks (positions 0, 1) are not next to the window
    ("compressive", dict(memory_size=8, compress_rate=2, compressed_size=4), 8),  # pooled slots are no positions
    ("average", {}, 0),
])
def test_positions_replay_the_policy(policy, sizes, tail):
    """The exact pairs at the newest positions, found by running the policy on positions instead of keys."""
    pos = Positions(make_policy(policy, **sizes))
    for _ in range(10):
        pos.advance(4)
    assert pos.seen == 40 and pos.tail == tail


def test_sinks_are_exact_pairs_until_the_window_moves():
    pos = Positions(make_policy("sink", sink_tokens=2, memory_size=8))
    pos.advance(6)
    assert pos.tail == 6  # nothing evicted: sinks and window are the positions 0 .. 5
    pos.advance(6)
    assert pos.tail == 8  # the window (positions 4 .. 11); the sinks 0, 1 are far behind it
