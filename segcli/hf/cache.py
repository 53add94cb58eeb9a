"""`make_cache`: a cache for a model under a segcli policy, once the model is known to stream under it as it
computes it (`refusals`), with what the policy needs installed first: the rotary rule that moves sink's keys,
the hooks that read attention probabilities, the per-layer masks, the frame of a bounded memory."""

from __future__ import annotations

from ..errors import UsageError
from ..memory import MemoryPolicy, make_policy
from .attention import track_memory_mass
from .budgets import budget_check, per_layer_budgets, track_budget_masks
from .features import model_features
from .layers import SegcliCache, _placeholders
from .refusals import _observed_problem, bounded_frame, refusal
from .rotary import rotary_shifts


def make_cache(model, policy: str | MemoryPolicy = "fifo", **sizes: int) -> SegcliCache:
    """A cache for `model(..., cache=...)` / `model.generate(..., cache=...)` under `policy`; UsageError (one line)
    where the policy cannot stream this model as the model itself computes it."""
    pol = make_policy(policy, **sizes) if isinstance(policy, str) else policy
    feats = model_features(model)
    reason = refusal(feats, pol)
    if reason:
        raise UsageError(reason)
    shifts = rotary_shifts(model) if pol.name == "sink" else None
    if pol.needs_attention:
        track_memory_mass(model)  # the hooks that hand each layer's attention to the policy's `observe`
        problem = _observed_problem(model, feats, pol)
        if problem:
            raise UsageError(problem)
    frame = "absolute"
    per_layer = per_layer_budgets(pol)
    if pol.capacity(1) is not None or per_layer:
        frame, problem = bounded_frame(model)
        if problem:
            raise UsageError(f"{problem} (--memory {pol.name})")
    if per_layer:
        track_budget_masks(model)
        flags = f"--layer-budget {pol.layer_budget} --memory {pol.name}"
        if frame != "absolute":
            raise UsageError(f"{feats.family}: it counts positions from the oldest slot in the cache (ALiBi over the "
                             f"cache's length), one length for every layer; {flags} is refused")
        problem = budget_check(model)
        if problem:
            raise UsageError(f"{problem} ({flags})")
    return SegcliCache(pol, shift_keys=shifts, kinds=list(feats.layers), placeholders=_placeholders(model, feats),
                       frame=frame, per_layer=per_layer)
