"""Memory files for recurrent and hybrid models: a stream's state as named tensors plus a JSON description, and back.

    tensors, body = save_state(backend, memory)          # what segcli.state writes: tensors + meta["recurrent"] = body
    memory = load_state(backend, cfg, body, tensors)      # ValueError naming the first thing that does not fit

A `RecurrentMemory` holds the family's own state object (a transformers Cache, rwkv's five tensors, xLSTM's cache,
recurrent_gemma's per-block states): `Family.export` names its tensors (`layer{i}.conv{k}`, `layer{i}.state{k}`,
`layer{i}.keys`, ...) and counts (`layer{i}.cumulative_length`, ...), `Family.restore` puts them back into a fresh
state object. Nothing in a file is trusted: every tensor must have the name, dtype and shape that this model's own
state has after one token (`template`: the model run once on a fresh state; key-value caches may differ in length,
up to the layer's window), every count must be a whole number of tokens, and the body must name this model type.

The body: {"format": 1, "family": model type, "seen": tokens streamed, "since_reset": tokens the states summarise,
"counts": {name: int}, "tensors": [names]}; tensors are stored under "recurrent.{name}".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..config import RunConfig
from .recurrent import POLICY_ON_ATTENTION, RecurrentBackend, RecurrentMemory

FORMAT = 1
PREFIX = "recurrent."
MAX_COUNT = 1 << 53


def save_state(backend: RecurrentBackend, memory: RecurrentMemory) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The memory's tensors (own CPU storage, contiguous: safetensors refuses shared storage) and its description.
    The recurrent parts only: under a bounded policy a hybrid's attention layers hold segcli.hf policy states, which
    segcli.state writes beside them (as it writes a transformer's)."""
    entries = backend.family.export(backend.model, memory.cache)
    tensors = {PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in entries.items() if isinstance(v, Tensor)}
    counts = {k: int(v) for k, v in entries.items() if not isinstance(v, Tensor)}
    body = {"format": FORMAT, "family": backend.model_type, "seen": memory.seen, "since_reset": memory.since_reset,
            "counts": counts, "tensors": sorted(k for k, v in entries.items() if isinstance(v, Tensor))}
    return tensors, body


def _count(x: Any, name: str) -> int:
    if type(x) is not int or not 0 <= x <= MAX_COUNT:
        raise ValueError(f"{name} is {x!r}, expected a whole number of tokens from 0 to {MAX_COUNT}")
    return x


def template(backend: RecurrentBackend, policy=None) -> dict[str, Tensor | int]:
    """What this model's state under `policy` (None: full) holds after one token: the names, dtypes and shapes a
    file must match (under a bounded policy a hybrid's attention layers are segcli.hf's and export nothing here)."""
    with torch.inference_mode():
        ids = torch.zeros(1, 1, dtype=torch.long, device=backend.device)
        pos = torch.zeros(1, 1, dtype=torch.long, device=backend.device)
        fresh = backend.family.new_cache(backend.model) if policy is None else backend.fresh_cache(policy)
        _, cache = backend.family.forward(backend.model, ids, pos, fresh)
    return backend.family.export(backend.model, cache)


def load_state(backend: RecurrentBackend, cfg: RunConfig, body: Any, tensors: dict[str, Tensor]) -> RecurrentMemory:
    """The memory `body` and `tensors` describe, for this run's model and policy (segcli.state has checked the model,
    tokenizer, policy and dtype against the file's metadata already)."""
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ValueError(f"recurrent state format {body.get('format') if isinstance(body, dict) else body!r}, "
                         f"this segcli reads format {FORMAT}")
    if body.get("family") != backend.model_type:
        raise ValueError(f"saved from a {body.get('family')} model, this run's model is a {backend.model_type}")
    seen, since = _count(body.get("seen"), "seen"), _count(body.get("since_reset"), "since_reset")
    if since > seen:
        raise ValueError(f"since_reset {since} exceeds seen {seen}")
    names, counts = body.get("tensors"), body.get("counts")
    if not isinstance(names, list) or not isinstance(counts, dict):
        raise ValueError("the recurrent state lists no tensors or counts")
    policy = cfg.policy()
    like = template(backend, policy)
    entries: dict[str, Tensor | int] = {}
    for name in names:
        if not isinstance(name, str) or PREFIX + name not in tensors:
            raise ValueError(f"tensor {name!r} is missing")
        want = like.get(name)
        t = tensors[PREFIX + name]
        if not isinstance(want, Tensor):
            raise ValueError(f"tensor {name} is not part of a {backend.model_type} state")
        if t.dtype != want.dtype:
            raise ValueError(f"{name} is {str(t.dtype).removeprefix('torch.')}, expected {str(want.dtype).removeprefix('torch.')}")
        grows = name.endswith((".keys", ".values"))  # a key-value cache: any length (the window checks below)
        if t.dim() != want.dim() or any(a != b for i, (a, b) in enumerate(zip(t.shape, want.shape))
                                        if not (grows and i == t.dim() - 2)):
            raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(want.shape)}"
                             + (" (any length on axis -2)" if grows else ""))
        entries[name] = t.to(backend.device)
    for name, x in counts.items():
        if not isinstance(like.get(name), int) or isinstance(like.get(name), bool):
            raise ValueError(f"count {name!r} is not part of a {backend.model_type} state")
        entries[name] = _count(x, name)
    missing = sorted(set(like) - set(entries)) if since else []
    if missing:
        raise ValueError(f"the state lacks {missing[0]}")
    if backend.n_attention and policy.name not in POLICY_ON_ATTENTION:  # segcli.hf's layers on the attention layers:
        cache = backend.family.restore(backend.model, entries, backend.fresh_cache(policy))  # segcli.state fills them
    else:
        cache = backend.family.restore(backend.model, entries)
    return RecurrentMemory(policy, cache, seen, since)
