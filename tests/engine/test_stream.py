"""The runner's sliding-window passes at segment size 1 (fifo) against token-by-token steps."""

import math

import pytest
import torch

from conftest import SAMPLE, save_with_tokenizer, tiny_model
from segcli.backends import load_backend
from segcli.config import RunConfig
from segcli.documents import Document, tokenize
from segcli.engine.stream import WINDOW_CHUNK, Stream, pass_size

TEXT = (SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[:800]  # ~230 tokens


@pytest.fixture(scope="module", params=[False, True], ids=["plain-keys", "smeared-keys"])
def model_dir(request, tmp_path_factory):
    return save_with_tokenizer(tiny_model(seed=4, smear_keys=request.param), tmp_path_factory.mktemp("m") / "model")


def records(backend, cfg, doc, window_chunk):
    stream = Stream(backend, cfg, window_chunk=window_chunk)
    return [r for r in stream.segments(doc)], stream


def assert_fields_equal(got: dict, want: dict, tol: float, segment: int) -> None:
    """Every field of `want` in `got`: floats within tol (relative and absolute), the rest exactly."""
    for key, x in want.items():
        if isinstance(x, float):
            assert math.isclose(got[key], x, rel_tol=tol, abs_tol=tol), (segment, key)
        else:
            assert got[key] == x, (segment, key)


@pytest.mark.parametrize("memory_size,chunk", [(20, 128), (64, 48), (1000, 128)])
def test_banded_passes_report_what_token_steps_report(model_dir, memory_size, chunk):
    cfg = RunConfig(model=str(model_dir), memory="fifo", segment_size=1, memory_size=memory_size, device="cpu")
    backend = load_backend(cfg)
    doc = tokenize(Document("d", TEXT, len(TEXT.encode())), backend.tokenizer, backend.bos_id)
    fast, s_fast = records(backend, cfg, doc, chunk)
    slow, s_slow = records(backend, cfg, doc, 0)
    assert s_fast.band == memory_size and s_fast.chunk == min(chunk, memory_size) and s_slow.band is None
    assert len(fast) == len(slow) == len(doc) > 200
    for a, b in zip(fast, slow):
        ra, rb = a.record(), b.record()
        ma, mb = ra.pop("memory"), rb.pop("memory")
        for key in ("seconds", "tokens_per_s"):
            ra.pop(key), rb.pop(key)
        assert_fields_equal(ra, rb, 1e-4, a.segment)
        assert_fields_equal(ma, mb, 1e-5, a.segment)
        assert a.token_ids == b.token_ids and a.token_end_bytes == b.token_end_bytes and a.byte_start == b.byte_start
    assert fast[0].memory.attn_mass_memory is None and fast[1].memory.attn_mass_memory is not None
    assert fast[-1].memory.slots == min(memory_size, len(doc))
    # the memory left for the next document (or --save-memory) is the token loop's
    assert s_fast.memory.seen == s_slow.memory.seen
    for a, b in zip(s_fast.memory.states, s_slow.memory.states):
        for x, y in zip(a.window.view(), b.window.view()):
            assert torch.allclose(x, y, atol=1e-4)


def test_other_policies_and_sizes_go_token_by_token(tiny_model_dir):
    for memory, ns in (("tova", 1), ("full", 1), ("fifo", 2)):
        cfg = RunConfig(model=str(tiny_model_dir), memory=memory, segment_size=ns, device="cpu")
        assert Stream(load_backend(cfg), cfg).band is None


def test_passes_shorten_for_big_windows():
    """A pass scores chunk x (n_c + chunk) pairs per head: long windows get shorter passes, not huge score matrices."""
    assert [pass_size(n_c, WINDOW_CHUNK) for n_c in (5, 512, 8192, 65536, 2_000_000)] == [5, 128, 128, 16, 1]


def test_span_note_names_spans_past_the_trained_length():
    from segcli.engine.stream import attention_span, span_note

    def cfg(memory, n_s, **sizes):
        return RunConfig(memory=memory, segment_size=n_s, **sizes)

    assert attention_span(cfg("fifo", 128, memory_size=2048), 50_000) == 2176
    assert attention_span(cfg("fifo", 128, memory_size=2048), 1000) == 1000, "a short document never fills it"
    assert attention_span(cfg("full", 128), 57_558) == 57_558
    assert attention_span(cfg("full", 128), None) is None, "a stdin stream's length is unknown"
    assert attention_span(cfg("linear", 64), 10**6) == 64, "the linear memory's read is position-free"
    assert attention_span(cfg("xl", 512), 10**6) == 1024
    note = span_note(cfg("fifo", 128, memory_size=2048), 2048, 50_000)
    assert "2,176 keys" in note and "2,048 tokens" in note and "--memory-size 1920" in note
    note = span_note(cfg("full", 128), 2048, 57_558)
    assert "57,558 keys" in note and "--memory fifo --memory-size 1920" in note
    for quiet in (span_note(cfg("fifo", 128, memory_size=512), 2048, 50_000),  # 640 keys
                  span_note(cfg("full", 128), 2048, 2048),
                  span_note(cfg("full", 128), None, 57_558),  # no trained length recorded (HF, older models)
                  span_note(cfg("linear", 128), 2048, 10**6)):
        assert quiet is None
