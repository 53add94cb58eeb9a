"""Token passes at segment size 1 (sink, compressive, xl, average, linear; fifo for reference): `Stream`'s fast
form against its token-by-token path (`window_chunk=0`), every reported field and the memory left afterwards."""

import copy
import math

import pytest
import torch

from conftest import SAMPLE, save_with_tokenizer, tiny_model
from segcli.backends import load_backend
from segcli.config import RunConfig
from segcli.documents import Document, tokenize
from segcli.engine.stream import Stream
from segcli.state import flatten_state

TEXT = (SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[:800]  # ~230 tokens
SKIP = ("seconds", "tokens_per_s")  # timings differ

CASES = {  # id -> (policy, sizes, window_chunk)
    "xl": ("xl", {}, 128),
    "xl-chunk7": ("xl", {}, 7),
    "average": ("average", {}, 128),
    "average-chunk50": ("average", {}, 50),
    "linear": ("linear", {}, 128),
    "linear-chunk33": ("linear", {}, 33),
    "sink-nc20": ("sink", dict(memory_size=20), 128),  # n_c below the chunk: passes of n_c
    "sink-nc64-chunk64": ("sink", dict(memory_size=64), 64),  # at
    "sink-nc64-chunk48": ("sink", dict(memory_size=64), 48),  # above
    "sink-nc1000": ("sink", dict(memory_size=1000), 128),  # larger than the document
    "sink-none": ("sink", dict(memory_size=16, sink_tokens=0), 128),
    "sink-9": ("sink", dict(memory_size=16, sink_tokens=9), 5),  # sinks fill over two passes
    "compressive-nc20": ("compressive", dict(memory_size=20), 128),
    "compressive-small": ("compressive", dict(memory_size=12, compress_rate=3, compressed_size=5), 128),
    "compressive-rate1": ("compressive", dict(memory_size=8, compress_rate=1, compressed_size=7), 6),
    "compressive-one-slot": ("compressive", dict(memory_size=10, compress_rate=4, compressed_size=1), 10),
    "compressive-nc64-chunk48": ("compressive", dict(memory_size=64, compress_rate=5, compressed_size=9), 48),
    "compressive-nc1000": ("compressive", dict(memory_size=1000), 128),
    "fifo": ("fifo", dict(memory_size=20), 128),
}


@pytest.fixture(scope="module", params=[False, True], ids=["plain-keys", "smeared-keys"])
def model_dir(request, tmp_path_factory):
    return save_with_tokenizer(tiny_model(seed=4, smear_keys=request.param), tmp_path_factory.mktemp("m") / "model")


def assert_fields_equal(got: dict, want: dict, tol: float, where) -> None:
    for key, x in want.items():
        if key in SKIP:
            continue
        if isinstance(x, float):
            assert math.isclose(got[key], x, rel_tol=tol, abs_tol=tol), (where, key, got[key], x)
        else:
            assert got[key] == x, (where, key, got[key], x)


def assert_same_memory(a, b, tol=1e-5) -> None:
    """The same per-layer states: every counter exactly, every tensor (packed windows) within tol, the same
    buffer sizes."""
    assert a.seen == b.seen
    for sa, sb in zip(a.states, b.states):
        ta, tb = {}, {}
        assert flatten_state(sa, "s", ta) == flatten_state(sb, "s", tb)
        assert ta.keys() == tb.keys()
        for name in ta:
            assert ta[name].shape == tb[name].shape, name
            assert torch.allclose(ta[name], tb[name], atol=tol, rtol=tol), (name, (ta[name] - tb[name]).abs().max())
        if hasattr(sa, "window"):
            assert sa.window.capacity == sb.window.capacity


def run_both(backend, cfg, doc, chunk, memory=None):
    fast = Stream(backend, cfg, memory=copy.deepcopy(memory), window_chunk=chunk)
    slow = Stream(backend, cfg, memory=copy.deepcopy(memory), window_chunk=0)
    assert fast.band is not None and slow.band is None
    return list(fast.segments(doc)), fast, list(slow.segments(doc)), slow


def compare(fast, slow):
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        ra, rb = a.record(), b.record()
        ma, mb = ra.pop("memory"), rb.pop("memory")
        assert_fields_equal(ra, rb, 1e-4, a.segment)
        assert_fields_equal(ma, mb, 1e-5, a.segment)
        assert a.token_nll == pytest.approx(b.token_nll, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_token_pass_reports_what_token_steps_report(model_dir, case):
    policy, sizes, chunk = CASES[case]
    cfg = RunConfig(model=str(model_dir), memory=policy, segment_size=1, device="cpu", **sizes)
    backend = load_backend(cfg)
    doc = tokenize(Document("d", TEXT, len(TEXT.encode())), backend.tokenizer, backend.bos_id)
    fast, s_fast, slow, s_slow = run_both(backend, cfg, doc, chunk)
    assert len(fast) == len(doc) > 200
    compare(fast, slow)
    assert fast[0].memory.attn_mass_memory is None and fast[1].memory.attn_mass_memory is not None
    assert_same_memory(s_fast.memory, s_slow.memory)
    # and a second document continues either memory the same way
    more, _, more_slow, _ = run_both(backend, cfg, doc, chunk, memory=s_slow.memory)
    compare(more, more_slow)


@pytest.mark.parametrize("case", ["sink-9", "compressive-small", "average", "linear", "xl"])
def test_token_pass_continues_a_memory_streamed_at_another_segment_size(model_dir, case):
    """A non-empty start: the memory after 2 (sink: inside its sinks) or 37 tokens streamed at n_s = 3 or 1."""
    policy, sizes, chunk = CASES[case]
    cfg = RunConfig(model=str(model_dir), memory=policy, segment_size=1, device="cpu", **sizes)
    backend = load_backend(cfg)
    doc = tokenize(Document("d", TEXT, len(TEXT.encode())), backend.tokenizer, backend.bos_id)
    start = backend.new_memory(cfg)
    ns = 1 if policy == "xl" else 3  # an xl memory is one segment: continued at its own segment size
    with torch.inference_mode():
        for s in range(0, 2 if policy == "sink" else 37, ns):
            _, start, _ = backend.step(torch.tensor([doc.input_ids[s : s + ns]]), start)
    fast, s_fast, slow, s_slow = run_both(backend, cfg, doc, chunk, memory=start)
    compare(fast, slow)
    assert_same_memory(s_fast.memory, s_slow.memory)


def test_policies_without_a_token_pass_go_token_by_token(tiny_model_dir):
    for memory, ns in (("tova", 1), ("full", 1), ("none", 1), ("fifo", 2), ("sink", 3)):
        cfg = RunConfig(model=str(tiny_model_dir), memory=memory, segment_size=ns, device="cpu")
        assert Stream(load_backend(cfg), cfg).band is None, memory
