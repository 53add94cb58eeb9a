"""Score one prompt through the memory: its tokens stream like any document, the answer teacher-forced after them.

    s = score(backend, cfg, prompt)          # one streaming pass over prompt + answer
    s.correct, s.answer_nll, s.in_memory

    pre = Prefix(backend, cfg, ids)          # a context streamed once ...
    lp, greedy = pre.continuation(a_ids)     # ... and continued by several answers (lm-eval's choices), or
    new_ids = pre.decode(16)                 # decoded greedily after it

The BOS token, the prompt and the answer are one token stream cut into segments of n_s from its start (computed
in token or segment passes where the backend has them, as `Stream` does: `engine.stream.pass_stepper`); the logits at the
answer's positions give its NLL and whether the argmax is the answer at every one of its tokens (greedy exact
match, without generating). A cell therefore costs one pass over its prompt plus the answer's tokens.

A `Prefix` streams every segment of the context but the one its last token falls in, and keeps that memory;
each continuation steps that last segment's context tokens and its own tokens from a copy of it (the last one
from the memory itself), so the segments are exactly those of the context and the continuation streamed as one
document, and the context's earlier segments are computed once for all continuations. Generation steps the
same tail, then one token per step, as `segcli generate` does.

`check` (optional, on `Prefix` and `score`) is called before every pass and every decoded token: a stop signal
ends a long prompt there (the caller's `check` raises), not only between prompts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from ..backends import Backend
from ..config import RunConfig
from ..engine.loop import split, stream
from ..engine.stream import pass_stepper
from .tasks import Prompt


@dataclass
class Score:
    correct: bool  # the argmax equals the answer at every answer token
    answer_nll: float  # nats, summed over the answer's tokens
    answer_tokens: int
    answer_token_nll: list[float]  # nats per answer token
    in_memory: bool | None  # the needle's pairs are among the keys the first answer token attends to (None: unknown)
    tokens: int  # tokens streamed (BOS, prompt, answer but its last)
    seconds: float  # wall time of the steps
    generated: str | None = None  # greedy continuation of the prompt (with generate_tokens)


def held(cfg: RunConfig, positions, query: int) -> bool | None:
    """Whether every stream position in `positions` is among the keys the query at `query` attends to: its own
    segment (positions from the segment's start up to the query), or what the policy holds of the earlier ones.
    Exact pairs only: None where the policy keeps summaries (average, compressive's pooled slots, linear) or
    is not known here; False for compressive once the needle is older than its pooled slots can reach."""
    ns = cfg.segment_size
    seg = (query // ns) * ns  # segments are cut from the stream's start
    earlier = [p for p in positions if p < seg]
    if not earlier:
        return True
    policy = cfg.policy()
    lo = min(earlier)
    name = policy.name
    if name == "full":
        return True
    if name == "none":
        return False
    if name == "fifo":
        return lo >= seg - policy.memory_size
    if name == "xl":
        return lo >= seg - ns
    if name == "sink":
        window_start = max(policy.sink_tokens, seg - policy.memory_size)
        return all(p < policy.sink_tokens or p >= window_start for p in earlier)
    if name == "compressive":
        if lo >= seg - policy.memory_size:
            return True  # still in the exact FIFO part
        if lo < seg - policy.memory_size - policy.compressed_size * policy.compress_rate:
            return False  # older than anything the compressed slots can summarise
    return None


def checked(passes: Iterable[Any], check: Callable[[], None]) -> Iterator[Any]:
    """`passes`, with `check()` called before each (it raises to stop: a signal during a long prompt)."""
    for item in passes:
        check()
        yield item


def _no_check() -> None:
    pass


class Prefix:
    """A context streamed through a fresh memory up to the segment its last token falls in. `check()` runs before
    every pass and decoded token (it raises to stop the prompt)."""

    @torch.inference_mode()
    def __init__(self, backend: Backend, cfg: RunConfig, ids: list[int], check: Callable[[], None] = _no_check):
        if not ids:
            raise ValueError("a prefix needs at least one token")
        self.check = check
        self.backend, self.device = backend, backend.device
        self.memory = backend.new_memory(cfg)
        self.step, self.size = pass_stepper(backend, self.memory, cfg.segment_size)
        start = (len(ids) - 1) // self.size * self.size  # where the segment holding the last context token starts
        self.tail = ids[start:]
        self.seconds, self.tokens, self.spent = 0.0, start, False
        head = torch.tensor(ids[:start], dtype=torch.long, device=self.device)[None]  # (1, start)
        for s in stream(self.step, self.memory, checked(split(head, self.size), check), self.device):
            self.memory = s.memory
            self.seconds += s.seconds

    def _memory(self, last: bool) -> Any:
        """The memory to continue from: a copy, or the memory itself for the last continuation."""
        if self.spent:
            raise RuntimeError("the prefix's memory was given to its last continuation")
        self.spent = last
        return self.memory if last else copy.deepcopy(self.memory)

    def _stream(self, ids: list[int], memory) -> tuple[list[torch.Tensor], Any]:
        x = torch.tensor(ids, dtype=torch.long, device=self.device)[None]  # (1, T)
        rows = []
        for s in stream(self.step, memory, checked(split(x, self.size), self.check), self.device):
            rows.append(s.logits[0])
            memory = s.memory
            self.seconds += s.seconds
        self.tokens += len(ids)
        return rows, memory

    @torch.inference_mode()
    def continuation(self, cont: list[int], last: bool = False) -> tuple[torch.Tensor, bool]:
        """Per-token log-probs (A,) of `cont` after the context, and whether it is the greedy continuation (the
        argmax at every one of its tokens)."""
        rows, _ = self._stream(self.tail + cont[:-1], self._memory(last))
        logits = torch.cat(rows)[len(self.tail) - 1 :].float()  # (A, V)
        targets = torch.tensor(cont, dtype=torch.long, device=self.device)
        lp = F.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
        return lp, bool((logits.argmax(-1) == targets).all())

    @torch.inference_mode()
    def decode(self, n: int, pick: Callable[[torch.Tensor], int] | None = None, stop: Callable[[list[int]], bool] | None = None,
               eos: int | None = None, last: bool = False) -> list[int]:
        """Up to n tokens after the context, one per step: `pick(logits (V,))` (greedy by default), ending at
        `eos` or when `stop(tokens so far)` says so. Not counted in `seconds` or `tokens`."""
        pick = pick or (lambda logits: int(logits.argmax()))
        seconds, tokens = self.seconds, self.tokens
        rows, memory = self._stream(self.tail, self._memory(last))
        logits = rows[-1][-1].float()
        out: list[int] = []
        while len(out) < n:
            nxt = pick(logits)
            if eos is not None and nxt == eos:
                break
            out.append(nxt)
            if stop is not None and stop(out):
                break
            self.check()
            step_logits, memory, _ = self.backend.step(torch.tensor([[nxt]], device=self.device), memory)
            logits = step_logits[0, -1].float()
        self.seconds, self.tokens = seconds, tokens
        return out


def score(backend: Backend, cfg: RunConfig, prompt: Prompt, generate_tokens: int = 0,
          check: Callable[[], None] = _no_check) -> Score:
    bos = [] if backend.bos_id is None else [backend.bos_id]
    pre = Prefix(backend, cfg, bos + prompt.ids, check)
    generated = None
    if generate_tokens:  # not timed: `seconds` is the probe's cost, one pass
        generated = backend.tokenizer.decode(pre.decode(generate_tokens, eos=backend.eos_id))
    lp, correct = pre.continuation(prompt.answer_ids, last=True)
    nll = (-lp).tolist()
    first = len(bos) + len(prompt.ids) - 1  # stream position whose logits predict the answer's first token
    needle = [p + len(bos) for a, b in prompt.needle for p in range(a, b)]
    return Score(correct, float(-lp.sum()), len(nll), nll, held(cfg, needle, first), pre.tokens, pre.seconds, generated)
