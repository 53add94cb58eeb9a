"""sink's token pass on Hugging Face models (issue 29): at segment size 1, the tokens after the sinks go through one
forward per pass, each query reading the sinks moved to just before its own window (`segcli.hf.sinks`); every
reported field (NLL, per-token lists, memory statistics) and the memory left afterwards equal the token-by-token
path's, on a full-attention family, a sliding-window family (mistral: every layer sliding), qwen2 with its first
layer full and the rest sliding, and gemma3_text's alternating layers with two rotary sets."""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUNDLED_TOKENIZER, SAMPLE
from hf_families import model_of, save_family

from segcli.backends import load_backend
from segcli.backends.hf import sink_pieces
from segcli.config import RunConfig
from segcli.documents import Document, tokenize
from segcli.engine.stream import Stream
from segcli.hf import rotary_shifts
from segcli.hf.sinks import with_moved_sinks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_hf_token_pass import pass_equals_steps  # noqa: E402
from test_token_parallel import compare

pytestmark = pytest.mark.transformers_api  # masks, cache layers and the attention interface: run under 5.17 too

TEXT = (SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[:700]  # ~200 tokens
CASES = {  # id -> (sizes, window_chunk)
    "nc20": ({"memory_size": 20}, 128),  # windows (16) narrower than the band: each layer's own window rules
    "nc8-chunk5": ({"memory_size": 8}, 5),  # passes of 5: the sinks fill inside the first, the window mid-pass
    "nc64-chunk48": ({"memory_size": 64, "sink_tokens": 9}, 48),
    "no-sinks": ({"memory_size": 12, "sink_tokens": 0}, 128),  # fifo by another name
    "nc1000": ({"memory_size": 1000}, 128),  # larger than the document: never moved
}


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2-sliding", "gemma3_text"])
def family_dir(request, tmp_path_factory):
    path = save_family(request.param, tmp_path_factory.mktemp(request.param) / "model", BUNDLED_TOKENIZER)
    if path is None:
        pytest.skip(f"{request.param}: not in this transformers")
    return path


def streams(backend, cfg, doc, chunk, memory=None):
    fast = Stream(backend, cfg, memory=copy.deepcopy(memory), window_chunk=chunk)
    slow = Stream(backend, cfg, memory=copy.deepcopy(memory), window_chunk=0)
    assert fast.passes and fast.band is not None and not slow.passes
    return list(fast.segments(doc)), fast, list(slow.segments(doc)), slow


def same_memory(a, b):
    assert a.seen == b.seen
    for la, lb in zip(a.memory_layers, b.memory_layers):
        sa, sb = la.state, lb.state
        wa, wb = sa.window, sb.window
        assert (wa.filled, wa.capacity, sa.evicted, sa.seen) == (wb.filled, wb.capacity, sb.evicted, sb.seen)
        assert torch.allclose(wa.view()[0], wb.view()[0], atol=1e-5, rtol=1e-4)
        assert torch.allclose(sa.sink_k, sb.sink_k, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_sink_token_pass_reports_what_token_steps_report(family_dir, case):
    sizes, chunk = CASES[case]
    cfg = RunConfig(model=str(family_dir), memory="sink", segment_size=1, device="cpu", **sizes)
    backend = load_backend(cfg)
    doc = tokenize(Document("d", TEXT, len(TEXT.encode())), backend.tokenizer, backend.bos_id)
    fast = pass_equals_steps(backend, cfg, doc, chunk, streams, same_memory)
    assert len(fast) == len(doc) > 150


def test_a_memory_streamed_at_another_segment_size_continues_in_passes(family_dir):
    cfg = RunConfig(model=str(family_dir), memory="sink", segment_size=1, device="cpu", memory_size=10)
    backend = load_backend(cfg)
    doc = tokenize(Document("d", TEXT, len(TEXT.encode())), backend.tokenizer, backend.bos_id)
    for upto in (2, 31):  # inside the sinks; past the window's filling
        start = backend.new_memory(cfg)
        with torch.inference_mode():
            for s in range(0, upto, 3):
                _, start, _ = backend.step(torch.tensor([doc.input_ids[s : s + 3]]), start)
        fast, s_fast, slow, s_slow = streams(backend, cfg, doc, 32, memory=start)
        compare(fast, slow)
        same_memory(s_fast.memory, s_slow.memory)


def test_sink_pieces_split_where_one_pass_cannot_hold_both_sides():
    from segcli.hf import LayerKind
    from segcli.memory import make_policy

    p = make_policy("sink", sink_tokens=4, memory_size=10)  # the window first drops a pair for the token at 15
    full, narrow, wide = LayerKind("full"), LayerKind("sliding", 11), LayerKind("sliding", 12)
    assert sink_pieces(p, 0, 10, [full]) == [(0, 10)]  # nothing moves: the sinks may fill inside
    assert sink_pieces(p, 0, 20, [full]) == [(0, 15), (15, 20)]
    assert sink_pieces(p, 4, 15, [full, narrow]) == [(0, 15)]
    assert sink_pieces(p, 12, 8, [full, narrow]) == [(0, 8)]  # moved from the 4th on, in the same pass
    assert sink_pieces(p, 12, 8, [full, wide]) == [(0, 3), (3, 8)]  # a window of 11 before could reach the sinks
    assert sink_pieces(p, 12, 8, [LayerKind("chunked", 8)]) == [(0, 3), (3, 8)]
    assert sink_pieces(p, 15, 5, [wide]) == [(0, 5)]


def test_moved_queries_score_the_sinks_as_moved_keys():
    """[q; R_-t q] . [0; k] = q . R_t k: the doubled head dimension gives query t the sinks moved t positions."""
    model = model_of("llama", "sdpa")
    (rule, *_) = rotary_shifts(model)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 6, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
    q2, k2 = with_moved_sinks(q, k, 2, rule, torch.arange(6))
    got = q2 @ k2.repeat_interleave(2, 1).transpose(-1, -2)  # (1, 4, 6, 9)
    kk = k.repeat_interleave(2, 1)
    assert torch.allclose(got[..., 2:], q @ kk[:, :, 2:].transpose(-1, -2), atol=1e-5)
    for t in range(6):
        moved = rule(kk[:, :, :2], t)
        assert torch.allclose(got[:, :, t, :2], (q[:, :, t : t + 1] @ moved.transpose(-1, -2))[:, :, 0], atol=1e-5)


def test_eager_and_pyramid_step_token_by_token(tmp_path):
    path = save_family("llama", tmp_path / "model", BUNDLED_TOKENIZER)
    cfg = RunConfig(model=str(path), memory="sink", segment_size=1, device="cpu", memory_size=10,
                    layer_budget="pyramid")
    backend = load_backend(cfg)
    assert Stream(backend, cfg).band is None
    cfg = RunConfig(model=str(path), memory="sink", segment_size=4, device="cpu", memory_size=10)
    assert not Stream(backend, cfg).passes  # segments of sink: no segment pass
    backend.use_attention_implementation("eager")
    cfg = RunConfig(model=str(path), memory="sink", segment_size=1, device="cpu", memory_size=10)
    assert Stream(backend, cfg).band is None


def test_a_model_whose_pass_differs_steps(monkeypatch, tmp_path):
    """A pass that does not equal stepping on the model (here: sinks never moved) is found by the check: it steps."""
    from segcli.backends import hf

    path = save_family("llama", tmp_path / "model", BUNDLED_TOKENIZER)
    monkeypatch.setattr(hf, "moved_sinks", lambda *a, **k: contextlib.nullcontext([]))
    cfg = RunConfig(model=str(path), memory="sink", segment_size=1, device="cpu", memory_size=10)
    backend = load_backend(cfg)
    assert Stream(backend, cfg).band is None
