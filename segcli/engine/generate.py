"""Continue a document after streaming it through the memory (both backends).

The document goes through the memory segment by segment (as in `segcli run`),
then each new token is fed back as a segment of one token, so the memory keeps
its policy while generating. Sampling is seeded: same seed, same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..backends import Backend
from ..config import RunConfig
from .loop import split, stream
from .stream import pass_stepper


@dataclass
class GenerateSettings:
    max_new_tokens: int = 64  # tokens to add
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass
    seed: int = 0
    stop_at_eos: bool = True


def sample_next(logits: torch.Tensor, s: GenerateSettings, gen: torch.Generator) -> int:
    """logits (V,) float32 -> one token id (greedy, or temperature + top-p sampling)."""
    if s.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < s.top_p  # smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def generate(backend: Backend, prompt_ids: list[int], cfg: RunConfig, s: GenerateSettings,
             on_prompt: Callable[[int, int], None] | None = None) -> Iterator[int]:
    """Stream `prompt_ids` through the memory, then yield up to max_new_tokens sampled ids. `on_prompt(done, total)`
    is called after each call that reads prompt tokens (progress for the caller to show)."""
    gen = torch.Generator().manual_seed(s.seed)
    memory = backend.new_memory(cfg)
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=backend.device)[None]  # (1, N)
    step_fn, size = pass_stepper(backend, memory, cfg.segment_size)
    with torch.inference_mode():
        for step in stream(step_fn, memory, split(ids, size)):
            logits, memory = step.logits, step.memory
            if on_prompt is not None:
                on_prompt(min(step.item + size, ids.shape[1]), ids.shape[1])
        for _ in range(s.max_new_tokens):
            nxt = sample_next(logits[0, -1].float(), s, gen)
            if s.stop_at_eos and backend.eos_id is not None and nxt == backend.eos_id:
                return
            yield nxt
            logits, memory, _ = backend.step(torch.tensor([[nxt]], device=backend.device), memory)
