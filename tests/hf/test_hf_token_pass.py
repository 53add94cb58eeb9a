"""Token and segment passes on Hugging Face models (issue 29): at segment size 1 (and for larger segments), full and
fifo compute many tokens (many segments) in one forward of the model, each query masked to what its own step would
read; every reported field (NLL, per-token
lists, memory statistics) and the memory left afterwards equal the token-by-token path's, on a full-attention
family, a sliding-window family and one whose layers alternate sliding and full attention."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from conftest import BUNDLED_TOKENIZER, SAMPLE
from hf_families import save_family
from segcli.backends import load_backend
from segcli.config import RunConfig
from segcli.documents import Document, tokenize
from segcli.engine.stream import Stream

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_token_parallel import compare  # noqa: E402  (every field, memory stats and per-token NLL)

pytestmark = pytest.mark.transformers_api  # masks and cache layers: .ci/run runs this again under 5.17

TEXT = (SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[:700]  # ~200 tokens
CASES = {  # id -> (policy, sizes, window_chunk, segment size)
    "full": ("full", {}, 128, 1),
    "full-chunk37": ("full", {}, 37, 1),
    "fifo-nc20": ("fifo", dict(memory_size=20), 128, 1),
    "fifo-nc64-chunk48": ("fifo", dict(memory_size=64), 48, 1),
    "fifo-nc1000": ("fifo", dict(memory_size=1000), 128, 1),
    "full-ns7": ("full", {}, 128, 7),
    "fifo-nc20-ns4": ("fifo", dict(memory_size=20), 128, 4),
    "fifo-nc64-ns16": ("fifo", dict(memory_size=64), 128, 16),
    "fifo-nc1000-ns16-chunk40": ("fifo", dict(memory_size=1000), 40, 16),
}


@pytest.fixture(scope="module", params=["llama", "mistral", "gemma3_text"])
def family_dir(request, tmp_path_factory):
    return save_family(request.param, tmp_path_factory.mktemp(request.param) / "model", BUNDLED_TOKENIZER)


def streams(backend, cfg, doc, chunk, memory=None):
    fast = Stream(backend, cfg, memory=copy.deepcopy(memory), window_chunk=chunk)
    slow = Stream(backend, cfg, memory=copy.deepcopy(memory), window_chunk=0)
    assert not slow.passes
    if cfg.segment_size > 1:  # passes of whole segments: a multiple of n_s, at least two, within the windows
        # full keeps a sliding layer's window - 1 pairs as a fifo of them; fifo holds n_c in every layer
        window = getattr(backend.model.config.get_text_config(), "sliding_window", None)
        held = [window - 1] if window and cfg.memory == "full" else [cfg.memory_size] if cfg.memory == "fifo" else []
        can = min([chunk, 128, *held]) // cfg.segment_size >= 2
        assert fast.passes == can and (not can or fast.chunk % cfg.segment_size == 0)
    else:
        assert fast.passes and fast.band is not None
    return list(fast.segments(doc)), fast, list(slow.segments(doc)), slow


def same_memory(a, b):
    assert a.seen == b.seen
    for la, lb in zip(a.memory_layers, b.memory_layers):
        wa, wb = la.state.window, lb.state.window
        assert (wa.filled, wa.capacity, la.state.evicted if hasattr(la.state, "evicted") else 0) == (
            wb.filled, wb.capacity, lb.state.evicted if hasattr(lb.state, "evicted") else 0)
        ka, kb = wa.view()[0], wb.view()[0]
        assert torch.allclose(ka, kb, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_token_pass_reports_what_token_steps_report(family_dir, case):
    policy, sizes, chunk, ns = CASES[case]
    cfg = RunConfig(model=str(family_dir), memory=policy, segment_size=ns, device="cpu", **sizes)
    backend = load_backend(cfg)
    doc = tokenize(Document("d", TEXT, len(TEXT.encode())), backend.tokenizer, backend.bos_id)
    fast = pass_equals_steps(backend, cfg, doc, chunk)
    assert len(fast) == -(-len(doc) // ns) and len(doc) > 150


def pass_equals_steps(backend, cfg, doc, chunk, streams=streams, same_memory=same_memory) -> list:
    """`doc` through passes of `chunk` tokens and stepped: every record, the memory left and the summed NLL agree,
    and so does a second document that continues the memory. Returns the passes' results."""
    fast, s_fast, slow, s_slow = streams(backend, cfg, doc, chunk)
    compare(fast, slow)
    same_memory(s_fast.memory, s_slow.memory)
    total_fast, total_slow = sum(r.nll for r in fast), sum(r.nll for r in slow)
    assert abs(total_fast - total_slow) <= 1e-4 * abs(total_slow)
    more, _, more_slow, _ = streams(backend, cfg, doc, chunk, memory=s_slow.memory)  # a second document continues
    compare(more, more_slow)
    return fast


def test_policies_and_attention_without_a_pass_step_token_by_token(family_dir):
    for memory, ns, extra in (("none", 4, {}), ("sink", 4, {}), ("h2o", 1, {}), ("fifo", 1, {"layer_budget": "pyramid"})):
        cfg = RunConfig(model=str(family_dir), memory=memory, segment_size=ns, device="cpu", **extra)
        try:
            backend = load_backend(cfg)
            stream = Stream(backend, cfg)
        except Exception as e:  # noqa: BLE001 - a policy this family refuses has nothing to step
            assert "refuse" in str(e) or "cannot" in str(e) or "--layer-budget" in str(e), e
            continue
        assert not stream.passes and stream.band is None, (memory, ns, extra)
