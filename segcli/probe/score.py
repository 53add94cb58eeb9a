"""Score one prompt through the memory: its tokens stream like any document, the answer teacher-forced after them.

    s = score(backend, cfg, prompt)          # one streaming pass over prompt + answer
    s.correct, s.answer_nll, s.in_memory

The BOS token, the prompt and the answer are one token stream cut into segments of n_s from its start (at
n_s = 1 under a sliding-window policy, `Backend.step_window` passes as `Stream` does); the logits at the
answer's positions give its NLL and whether the argmax is the answer at every one of its tokens (greedy exact
match, without generating). A cell therefore costs one pass over its prompt plus the answer's tokens.

`generate_tokens > 0` also decodes greedily after the prompt: the memory is copied before the segment where the
prompt ends, that segment's prompt part is stepped from the copy, then one token per step, as `segcli generate`
does; the teacher-forced pass is unchanged by it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..backends import Backend
from ..config import RunConfig
from ..engine.loop import split, stream
from ..engine.stream import WINDOW_CHUNK, pass_size
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


def held(cfg: RunConfig, positions: range, query: int) -> bool | None:
    """Whether every stream position in `positions` is among the keys the query at `query` attends to: its own
    segment (positions from the segment's start up to the query), or what the policy holds of the earlier ones.
    Exact pairs only: None where the policy keeps summaries (average, compressive's pooled slots, linear) or
    is not known here."""
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
    if name == "compressive" and lo >= seg - policy.memory_size:
        return True  # still in the exact FIFO part
    return None


def stepper(backend: Backend, memory, segment_size: int):
    """(step function, tokens per step) for streaming at this segment size, as `Stream` does it."""
    band = backend.sliding_window(memory, segment_size)
    if band:
        def band_step(ids, mem):
            logits, mem, _, _ = backend.step_window(ids, mem, band)
            return logits, mem, None

        return band_step, pass_size(band, WINDOW_CHUNK)
    return backend.step, segment_size


@torch.inference_mode()
def score(backend: Backend, cfg: RunConfig, prompt: Prompt, generate_tokens: int = 0) -> Score:
    bos = [] if backend.bos_id is None else [backend.bos_id]
    seq = bos + prompt.ids + prompt.answer_ids
    n_ans = len(prompt.answer_ids)
    first = len(seq) - n_ans - 1  # stream position whose logits predict the answer's first token
    offset = len(bos)  # stream position of prompt token 0
    device = backend.device
    ids = torch.tensor(seq[:-1], dtype=torch.long, device=device)[None]  # (1, N)
    targets = torch.tensor(prompt.answer_ids, dtype=torch.long, device=device)  # (A,)
    memory = backend.new_memory(cfg)
    step, size = stepper(backend, memory, cfg.segment_size)
    fork, fork_start = (copy.deepcopy(memory), 0) if generate_tokens and first < size else (None, 0)
    rows: list[torch.Tensor] = []
    seconds = 0.0
    for s in stream(step, memory, split(ids, size), device):
        start = s.item
        end = start + s.logits.shape[1]
        seconds += s.seconds
        if end > first:
            rows.append(s.logits[0, max(first - start, 0) :].float())  # (<=T, V)
        if generate_tokens and fork is None and start + size <= first < start + 2 * size:
            fork, fork_start = copy.deepcopy(s.memory), start + size  # the memory before the prompt's last segment
    logits = torch.cat(rows)[:n_ans]  # (A, V)
    nll = F.cross_entropy(logits, targets, reduction="none")  # (A,)
    correct = bool((logits.argmax(-1) == targets).all())
    needle = [p + offset for a, b in prompt.needle for p in range(a, b)]
    in_mem = held(cfg, needle, first)
    generated = None
    if generate_tokens:  # not timed: `seconds` is the probe's cost, one pass
        generated = backend.tokenizer.decode(greedy(backend, step, fork, ids[:, fork_start : first + 1], size,
                                                    generate_tokens))
    return Score(correct, float(nll.sum()), n_ans, nll.tolist(), in_mem, ids.shape[1], seconds, generated)


def greedy(backend: Backend, step, memory: Any, rest: torch.Tensor, size: int, n: int) -> list[int]:
    """Step the prompt's remaining tokens `rest` (1, R) from `memory`, then decode n tokens greedily, one per
    step (stopping at the end-of-text token)."""
    for s in stream(step, memory, split(rest, size)):
        logits, memory = s.logits, s.memory
    out: list[int] = []
    for _ in range(n):
        nxt = int(logits[0, -1].float().argmax())
        if backend.eos_id is not None and nxt == backend.eos_id:
            break
        out.append(nxt)
        logits, memory, _ = backend.step(torch.tensor([[nxt]], device=backend.device), memory)
    return out
