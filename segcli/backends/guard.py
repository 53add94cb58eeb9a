"""The load-time guard: a Hugging Face model streams as that model, or it is refused before any number is reported.

segcli's streaming of a Hugging Face model rests on transformers code paths that any release can change (cache
layers, mask builders, a recurrent layer's scan and convolution, the exact routes of `recurrent_routes`). So every
Hugging Face model, whatever its family and whatever the transformers version, is checked once when it is loaded:
`PROBE_TOKENS` fixed pseudo-random tokens in one plain forward against the same tokens streamed through the memory
segcli would use for `full` in segments of 5, 1, 1 and 5 tokens (a first chunk, single tokens, a chunk that
continues a state). A relative logit gap above `tolerance(dtype)` is one line and exit 2, naming the family, the gap
and the transformers version; a run never finishes with another model's numbers.

Cost: five forwards over 12 tokens per load (docs/PERFORMANCE.md, "Load-time guard"). `segcli check` stays the
thorough, per-policy check over a real document.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..errors import UsageError

PROBE_TOKENS = 12
PIECES = (5, 1, 1, PROBE_TOKENS - 7)  # a first chunk, two single tokens, a chunk that continues a state


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 5e-2  # rounding of one forward against pieces, relative to the logits


def probe_ids(vocab: int, device: torch.device) -> Tensor:
    """(1, PROBE_TOKENS) fixed pseudo-random token ids below `vocab`."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, PROBE_TOKENS), generator=gen).to(device)


@torch.inference_mode()
def continuation_gap(whole: Callable[[Tensor, Tensor], Tensor], start: Callable[[], object],
                     piece: Callable[[Tensor, Tensor, object], tuple[Tensor, object]], vocab: int,
                     device: torch.device) -> float:
    """max |logits of the streamed pieces - logits of one forward| / max |logits of one forward|.

    whole(ids, pos) -> (1, N, V) logits of one plain forward; start() -> an empty stream state;
    piece(ids, pos, state) -> ((1, n, V) logits, state) for the next n tokens."""
    ids = probe_ids(vocab, device)  # (1, N)
    pos = torch.arange(PROBE_TOKENS, device=device)[None]  # (1, N)
    ref = whole(ids, pos).float()
    state, parts, at = start(), [], 0
    for n in PIECES:
        logits, state = piece(ids[:, at:at + n], pos[:, at:at + n], state)
        parts.append(logits.float())
        at += n
    return float((torch.cat(parts, 1) - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def refuse_unless_exact(family: str, gap: float, dtype: torch.dtype, what: str = "streaming it in segments") -> None:
    """One UsageError line where `gap` is above the dtype's tolerance (a NaN gap is refused too)."""
    if gap <= tolerance(dtype):
        return
    import transformers

    raise UsageError(f"{family}: {what} differs from one forward under transformers {transformers.__version__} "
                     f"(relative logit gap {gap:.1e} on a {PROBE_TOKENS}-token check at load); segcli refuses it rather "
                     "than report another model's numbers")
