"""Scoring a probe prompt: one streaming pass over the prompt and the teacher-forced answer, whose logits equal
one plain forward's under `full`; greedy decoding from a copy of the memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segcli.backends import load_backend
from segcli.config import RunConfig
from segcli.probe import FILLER, Haystack, make_prompt
from segcli.probe.score import score
from segcli.probe.tasks import TASK_NAMES


class Counting:
    """A backend that counts the tokens it is stepped over (every other attribute is the backend's)."""

    def __init__(self, backend):
        self.backend, self.tokens = backend, 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def step(self, ids, memory):
        self.tokens += ids.shape[1]
        return self.backend.step(ids, memory)

    def step_window(self, ids, memory, band):
        self.tokens += ids.shape[1]
        return self.backend.step_window(ids, memory, band)

    def step_segments(self, ids, memory, segment_size):
        self.tokens += ids.shape[1]
        return self.backend.step_segments(ids, memory, segment_size)


@pytest.fixture(scope="module")
def native(tiny_model_dir):
    return load_backend(RunConfig(model=str(tiny_model_dir), device="cpu"))


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from probe_tiny_hf import build_llama

    path = build_llama(tmp_path_factory.mktemp("probe-llama") / "model")
    return load_backend(RunConfig(model=str(path), device="cpu"))


@pytest.fixture(scope="module", params=["native", "hf_llama"])
def backend(request):
    return request.getfixturevalue(request.param)


def filler(backend) -> Haystack:
    return Haystack.from_ids("filler", backend.tokenizer.encode(FILLER.read_text(encoding="utf-8")).ids, backend.tokenizer)


def plain_answer(backend, prompt) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer log-probs and argmaxes from one forward of the whole sequence (the full cache)."""
    seq = [backend.bos_id] + prompt.ids + prompt.answer_ids
    with torch.inference_mode():
        logits, _, _ = backend.step(torch.tensor(seq[:-1])[None], backend.new_memory(RunConfig(memory="full")))
    a = len(prompt.answer_ids)
    lp = F.log_softmax(logits[0, -a:].float(), -1)
    return lp.gather(-1, torch.tensor(prompt.answer_ids)[:, None])[:, 0], lp.argmax(-1)


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("ns", [1, 7, 64])
def test_full_streamed_scores_like_one_forward(backend, task, ns):
    p = make_prompt(task, backend.tokenizer, filler(backend), 200, 40, 0, seed=0)
    lp, argmax = plain_answer(backend, p)
    s = score(backend, RunConfig(memory="full", segment_size=ns), p)
    assert s.answer_tokens == len(p.answer_ids)
    assert s.answer_nll == pytest.approx(float(-lp.sum()), abs=1e-3)
    assert s.answer_token_nll == pytest.approx((-lp).tolist(), abs=1e-3)
    assert s.correct == bool((argmax == torch.tensor(p.answer_ids)).all())
    assert s.in_memory is True


@pytest.mark.parametrize("memory, ns", [("full", 32), ("fifo", 1), ("fifo", 32), ("none", 16), ("sink", 8)])
def test_a_prompt_costs_one_pass_over_prompt_and_answer(native, memory, ns):
    """BOS + prompt + answer (its last token is only a target): every token stepped once, none again."""
    p = make_prompt("niah", native.tokenizer, filler(native), 300, 50, 0, seed=0)
    counting = Counting(native)
    cfg = RunConfig(memory=memory, segment_size=ns, memory_size=64)
    s = score(counting, cfg, p)
    assert counting.tokens == s.tokens == 1 + len(p.ids) + len(p.answer_ids) - 1


def test_answer_nll_of_band_pass_equals_token_steps(native):
    """fifo at n_s = 1 goes through the sliding-window pass: the same numbers as one step per token."""
    p = make_prompt("passkey", native.tokenizer, filler(native), 150, 30, 0, seed=1)
    cfg = RunConfig(memory="fifo", segment_size=1, memory_size=40)
    a = score(native, cfg, p)
    seq = [native.bos_id] + p.ids + p.answer_ids
    memory, nll = native.new_memory(cfg), []
    with torch.inference_mode():
        for i, t in enumerate(seq[:-1]):
            logits, memory, _ = native.step(torch.tensor([[t]]), memory)
            if i >= len(seq) - 1 - len(p.answer_ids):
                nll.append(float(F.cross_entropy(logits[0].float(), torch.tensor([seq[i + 1]]))))
    assert a.answer_token_nll == pytest.approx(nll, abs=1e-4)
    assert a.in_memory is False  # the needle is ~100 tokens back, the window 40


@pytest.mark.parametrize("ns", [1, 16, 500])
def test_generate_decodes_greedily_from_the_prompt(backend, ns):
    p = make_prompt("passkey", backend.tokenizer, filler(backend), 180, 50, 0, seed=2)
    cfg = RunConfig(memory="fifo", segment_size=ns, memory_size=64)
    with_text = score(backend, cfg, p, generate_tokens=6)
    without = score(backend, cfg, p)
    assert with_text.answer_token_nll == without.answer_token_nll  # generation leaves the scoring pass alone
    # the reference: the prompt streamed alone, then one token per step
    memory = backend.new_memory(cfg)
    ids = torch.tensor([backend.bos_id] + p.ids)[None]
    out = []
    with torch.inference_mode():
        for start in range(0, ids.shape[1], ns):
            logits, memory, _ = backend.step(ids[:, start : start + ns], memory)
        for _ in range(6):
            nxt = int(logits[0, -1].argmax())
            if nxt == backend.eos_id:
                break
            out.append(nxt)
            logits, memory, _ = backend.step(torch.tensor([[nxt]]), memory)
    assert with_text.generated == backend.tokenizer.decode(out)


@pytest.mark.parametrize("memory, ns", [("full", 7), ("fifo", 1), ("fifo", 16), ("xl", 16), ("none", 64)])
def test_a_prefix_continued_several_ways_equals_one_stream_each(backend, memory, ns):
    """lm-eval's choices: the context's earlier segments once, each continuation from a copy of that memory, with
    the segments of context + continuation streamed as one document."""
    from segcli.probe.score import Prefix

    ctx = [backend.bos_id] + backend.tokenizer.encode(FILLER.read_text(encoding="utf-8")[:400]).ids
    conts = [backend.tokenizer.encode(t).ids for t in (" the river", " a quiet morning in the town", " x")]
    cfg = RunConfig(memory=memory, segment_size=ns, memory_size=24)
    pre = Prefix(backend, cfg, ctx)
    got = [pre.continuation(c, last=i == len(conts) - 1) for i, c in enumerate(conts)]
    for (lp, greedy), cont in zip(got, conts):
        seq = ctx + cont
        memory_, rows = backend.new_memory(cfg), []
        with torch.inference_mode():
            for start in range(0, len(seq) - 1, ns):
                logits, memory_, _ = backend.step(torch.tensor([seq[:-1][start : start + ns]]), memory_)
                rows.append(logits[0])
        ref = F.log_softmax(torch.cat(rows)[len(ctx) - 1 :].float(), -1)
        want = ref.gather(-1, torch.tensor(cont)[:, None])[:, 0]
        assert lp.tolist() == pytest.approx(want.tolist(), abs=1e-4)
        assert greedy == bool((ref.argmax(-1) == torch.tensor(cont)).all())
    with pytest.raises(RuntimeError, match="last continuation"):
        pre.continuation(conts[0])
