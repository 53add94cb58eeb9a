"""Memory state files: save a stream's memory after a document, load it to continue another.

Streaming document A with `--save-memory m.safetensors`, then B with
`--load-memory m.safetensors`, gives the same numbers as `segcli run A B` (one
stream, memory carried across documents).

A file is safetensors. Every tensor of every layer's state is an entry named
`layer{i}.{field}` (nested dataclasses add `.{field}`: `layer0.ring.k`); one
metadata entry, "segcli", holds JSON: format version, segcli version, model
identity and hash, tokenizer hash, policy and sizes, tokens seen, dtype, and per
layer the state's dataclass type with its non-tensor fields (ints, None), and for a
model with smeared keys each layer's last key (`last_key{i}`). States
are serialised generically by walking dataclass fields, so a new policy needs no
code here as long as its state is a dataclass of tensors, numbers and dataclasses.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .errors import UsageError
from .files import require_file, require_writable

FORMAT = 1
META_KEY = "segcli"


# -- generic dataclass <-> (tensors, JSON) ----------------------------------------------------------------------------

def flatten_state(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """A JSON description of `obj`; its tensors go into `tensors` under names starting with `prefix`."""
    if isinstance(obj, Tensor):
        # own, contiguous CPU storage: states hold views into larger buffers (safetensors refuses shared storage)
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"tensor": prefix}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        return {
            "type": f"{cls.__module__}:{cls.__qualname__}",
            "fields": {f.name: flatten_state(getattr(obj, f.name), f"{prefix}.{f.name}", tensors)
                       for f in dataclasses.fields(obj)},
        }
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot save a memory state field of type {type(obj).__name__} ({prefix})")


def rebuild_state(desc: dict[str, Any], tensors: dict[str, Tensor], device: torch.device) -> Any:
    if "tensor" in desc:
        return tensors[desc["tensor"]].to(device)
    if "value" in desc:
        return desc["value"]
    module, _, qualname = desc["type"].partition(":")
    if not module.startswith("segcli."):  # never import arbitrary code named by a file
        raise ValueError(f"state type {desc['type']} is not a segcli type")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not dataclasses.is_dataclass(cls):
        raise ValueError(f"state type {desc['type']} is not a dataclass")
    return cls(**{name: rebuild_state(d, tensors, device) for name, d in desc["fields"].items()})


# -- files --------------------------------------------------------------------------------------------------------------

def check_target(path: str) -> None:
    """Fail before any work when the file could not be written."""
    require_writable(path, "--save-memory")


def save_memory(path: str, memory, backend, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `memory` (a SegMemory) atomically to `path`; returns the metadata written."""
    from safetensors.torch import save_file

    from .models.seglm import SegMemory

    if not isinstance(memory, SegMemory):
        raise UsageError("--save-memory works with the native seglm model only")
    tensors: dict[str, Tensor] = {}
    layers = [flatten_state(s, f"layer{i}", tensors) for i, s in enumerate(memory.states)]
    last_keys = None if memory.last_keys is None else [flatten_state(k, f"last_key{i}", tensors)
                                                       for i, k in enumerate(memory.last_keys)]
    meta = {
        "format": FORMAT,
        "segcli_version": __version__,
        "model": backend.identity.get("model"),
        "model_sha256": backend.identity.get("model_sha256"),
        "tokenizer_sha256": backend.identity.get("tokenizer_sha256"),
        "policy": memory.policy.name,
        "sizes": memory.policy.describe(),
        "seen": memory.seen,
        "dtype": str(backend.dtype).removeprefix("torch."),
        "layers": layers,
        "last_keys": last_keys,  # smeared-key models: each layer's last key (the next token smears it in)
        **(extra or {}),
    }
    target = Path(path)
    check_target(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return meta


def read_memory_file(path: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors import safe_open

    p = require_file(path, f"--load-memory {path}")
    try:
        with safe_open(str(p), "pt") as f:
            meta_text = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except PermissionError:
        raise UsageError(f"--load-memory {path}: permission denied") from None
    except Exception:  # noqa: BLE001 - safetensors raises its own error types for any malformed file
        raise UsageError(f"--load-memory {path}: not a safetensors file (expected a file written by --save-memory)") from None
    if meta_text is None:
        raise UsageError(f"--load-memory {path}: no segcli metadata (expected a file written by --save-memory)")
    try:
        meta = json.loads(meta_text)
    except json.JSONDecodeError:
        raise UsageError(f"--load-memory {path}: corrupt segcli metadata") from None
    if meta.get("format") != FORMAT:
        raise UsageError(f"--load-memory {path}: memory file format {meta.get('format')!r}; "
                         f"this segcli reads format {FORMAT}")
    return meta, tensors


def load_memory(path: str, backend, cfg):
    """The SegMemory saved in `path`, checked against this run's model, tokenizer, policy and dtype."""
    from .models.seglm import SegMemory

    if backend.kind != "native":
        raise UsageError("--load-memory works with the native seglm model only")
    meta, tensors = read_memory_file(path)
    ident = backend.identity
    if meta.get("model_sha256") != ident.get("model_sha256"):
        raise UsageError(f"--load-memory {path}: saved with another model ({meta.get('model')}, "
                         f"sha256 {str(meta.get('model_sha256'))[:12]}); this run uses {ident.get('model')} "
                         f"(sha256 {str(ident.get('model_sha256'))[:12]}): pass the same --model")
    if meta.get("tokenizer_sha256") != ident.get("tokenizer_sha256"):
        raise UsageError(f"--load-memory {path}: saved with another tokenizer (sha256 "
                         f"{str(meta.get('tokenizer_sha256'))[:12]}); this model's is {str(ident.get('tokenizer_sha256'))[:12]}")
    policy = cfg.policy()
    if meta.get("policy") != policy.name or meta.get("sizes") != policy.describe():
        saved = " ".join([f"--memory {meta.get('policy')}"] + [f"--{k.replace('_', '-')} {v}" for k, v in (meta.get("sizes") or {}).items()])
        raise UsageError(f"--load-memory {path}: saved with policy {meta.get('policy')} {meta.get('sizes')}, "
                         f"this run uses {policy.name} {policy.describe()}; pass {saved}")
    dtype = str(backend.dtype).removeprefix("torch.")
    if meta.get("dtype") != dtype:
        raise UsageError(f"--load-memory {path}: saved in {meta.get('dtype')}, this run computes in {dtype}; "
                         f"pass --dtype {meta.get('dtype')}")
    n_layers = len(backend.model.model.layers)
    if len(meta.get("layers", [])) != n_layers:
        raise UsageError(f"--load-memory {path}: {len(meta.get('layers', []))} layers saved, the model has {n_layers}")
    try:
        states = [rebuild_state(d, tensors, backend.device) for d in meta["layers"]]
        last_keys = meta.get("last_keys")
        last_keys = None if last_keys is None else [rebuild_state(d, tensors, backend.device) for d in last_keys]
    except (KeyError, TypeError, ValueError, AttributeError, ImportError) as e:
        raise UsageError(f"--load-memory {path}: cannot rebuild the memory state ({e})") from None
    return SegMemory(policy, states, int(meta["seen"]), last_keys)
