"""The batched fifo statistics (`segcli.backends.base.norm_means`, `fifo_stats`) against the plain per-layer
ones (`Tensor.mean`, `Fifo.stats`): the same floats bit for bit, on one thread and on two."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from conftest import BUNDLED_TOKENIZER, SAMPLE
from segcli.backends import load_backend
from segcli.backends.base import REDUCE_GRAIN, fifo_stats, norm_means
from segcli.config import RunConfig
from segcli.engine.stream import Stream
from segcli.memory import make_policy
from segcli.memory.window import Window


@pytest.fixture(params=[1, 2])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_norm_means_equal_mean_bit_for_bit(threads):
    rng = random.Random(threads)
    checked = 0
    for _ in range(400):
        b, h = rng.choice([1, 1, 2, 3]), rng.choice([1, 2, 4, 8, 12, 32])
        m = rng.choice([1, 2, 3, 7, 8, 9, 16, 31, 64, 65, 127, 128, 129, 300, 511, 512, 513, 1000])
        cap = max(64, m + rng.choice([0, 0, 1, 5, 100, 600]))
        start = rng.randint(0, cap - m)
        buffers = [torch.rand(b, h, cap) * rng.uniform(0.1, 30) for _ in range(2 * rng.randint(1, 12))]
        got = norm_means(buffers, start, start + m)
        if got is None:  # a view torch reduces another way: the caller asks `mean`
            contiguous = m == cap and b * h > 1
            assert m < 2 or contiguous or (threads > 1 and len(buffers) * b * h * m >= REDUCE_GRAIN)
            continue
        checked += 1
        assert got == [float(x[:, :, start : start + m].mean()) for x in buffers]
    assert checked > 150


def pushed(policy, lengths, heads=4, dim=16):
    """A fifo layer's state after segments of `lengths`, pushed in place (inference)."""
    state = policy.init_state(1, heads, dim, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        for t in lengths:
            k, v = torch.randn(1, heads, t, dim) * 3, torch.randn(1, heads, t, dim)
            state = policy.extend(state, k, v, k, lambda x, d: x)[0]
    return state


@pytest.mark.parametrize("memory_size", [1, 5, 24, 512])
def test_fifo_stats_equal_the_policy(threads, memory_size):
    policy = make_policy("fifo", memory_size=memory_size)
    rng = random.Random(memory_size)
    for lengths in ([1], [2], [1] * 70, [16] * 40, [128] * 9, [rng.randint(1, 200) for _ in range(20)]):
        torch.manual_seed(len(lengths))
        layers = [(policy, pushed(policy, lengths)) for _ in range(6)]
        assert fifo_stats(layers) == [policy.stats(s) for _, s in layers]


def test_fifo_stats_other_layouts(threads):
    """Layers of different windows (a pyramid budget), a packed window (as a memory file holds it) and an
    empty memory: every one as its policy reports it, or None to ask the policies."""
    policy = make_policy("fifo", memory_size=64)
    a, b = pushed(policy, [16] * 9), pushed(policy, [16] * 2)
    layers = [(policy, a), (policy, b), (policy, a)]
    assert fifo_stats(layers) == [policy.stats(s) for _, s in layers]
    packed = pushed(policy, [16] * 9)
    packed.window = packed.window.packed()  # the view spans its whole buffer
    assert fifo_stats([(policy, packed)] * 2) == [policy.stats(packed)] * 2
    empty = policy.init_state(1, 4, 16, device="cpu", dtype=torch.float32)
    assert fifo_stats([(policy, empty)]) is None
    assert isinstance(empty.window, Window)
    sink = make_policy("sink", memory_size=64)
    assert fifo_stats([(sink, pushed(sink, [16] * 3))]) is None


def test_backend_stats_equal_the_memory_stats(tmp_path, threads):
    """Through both backends' `memory_stats` during a stream: what the memory's own `stats()` returns."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=4096)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER), bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(tmp_path)
    from segcli.documents import Document, tokenize

    text = (SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[:3000]
    for model in (str(tmp_path), None):  # the HF backend, then the bundled native model
        run = RunConfig(model=model, memory="fifo", memory_size=40, segment_size=16, device="cpu")
        backend = load_backend(run)
        doc = tokenize(Document("d", text, len(text.encode())), backend.tokenizer, backend.bos_id)
        stream = Stream(backend, run, window_chunk=0)  # segment by segment: the memory is each record's own
        n = 0
        for r in stream.segments(doc):
            stats = backend.memory_stats(stream.memory)
            assert stats == stream.memory.stats()
            assert r.memory.key_norm == sum(s.key_norm for s in stats) / len(stats)
            n += 1
            if n == 12:
                break


def test_totals_add_the_same_floats_as_token_by_token():
    """Totals.add sums in runs; the plain form, one token at a time, gives the same floats bit for bit."""
    from types import SimpleNamespace

    from segcli.engine.stream import Totals

    rng = random.Random(0)
    for ns in (1, 3, 16, 100, 128, 512):
        totals = Totals(ns)
        sq = first = rest = 0.0
        pos, pos_n = [0.0] * len(totals.pos_nll), [0] * len(totals.pos_n)
        first_n = rest_n = 0
        for _ in range(30):
            nll = [rng.uniform(0, 12) for _ in range(rng.randint(1, ns))]
            totals.add(SimpleNamespace(tokens=len(nll), bytes=1, nll=sum(nll), seconds=0.1, token_nll=nll,
                                       memory=SimpleNamespace(bytes=0, by_kind=None, attn_mass_memory=None)))
            for i, x in enumerate(nll):
                sq += x * x
                pos[i // totals.bucket] += x
                pos_n[i // totals.bucket] += 1
                if i < totals.k:
                    first, first_n = first + x, first_n + 1
                else:
                    rest, rest_n = rest + x, rest_n + 1
        assert (totals.nll_sq, totals.pos_nll, totals.pos_n) == (sq, pos, pos_n)
        assert (totals.first_nll, totals.first_n, totals.rest_nll, totals.rest_n) == (first, first_n, rest, rest_n)
