"""Memory state files: save a stream's memory after a document, load it to continue another.

Streaming document A with `--save-memory m.safetensors`, then B with
`--load-memory m.safetensors`, gives the same numbers as `segcli run A B` (one
stream, memory carried across documents).

A file is safetensors. Every tensor of every layer's state is an entry named
`layer{i}.{field}` (nested dataclasses add `.{field}`: `layer0.window.k`); one
metadata entry, "segcli", holds JSON: format version, segcli version, model
identity and hash, tokenizer hash, policy and sizes, tokens seen, dtype, and per
layer the state's dataclass type with its non-tensor fields (ints, None). A
model with smeared keys keeps each layer's last key in the layer's state
(`layer{i}.last_key`). States are serialised generically by walking dataclass
fields, so a new policy needs no code here as long as its state is a dataclass
of tensors, numbers and dataclasses; a part with a `packed()` method (a window
buffer) is stored as what it holds, not as the room it has.

Reading a file trusts nothing in it: each layer is rebuilt against a fresh state
of this run's policy (same dataclass, same fields, tensors and counts where it
has them), then the policy checks shapes, dtypes and counts (`check_state`);
anything else is one UsageError line (exit 2).

Format 2 (this one). Its metadata holds `tensor_sha256`: per tensor, the sha256
of its bytes as stored. An addition, not a new layout (a segcli before it reads
these files and ignores it), so the format number stays: a format-2 file with
`tensor_sha256` must match it, whole (a mismatch: the file is corrupt, one line);
one without it (written before segcli saved digests) loads with no digest to
check. Format 1 (segcli before the smeared key moved into the layer states) kept
the last keys apart, as metadata `last_keys` with entries `last_key{i}`, and
whole window buffers; it still loads, never with digests.

Whatever the format, reading refuses (one line) anything that is not a regular
file (a FIFO or device is never opened, so nothing waits) and any tensor holding
NaN or an infinity; the statistics a state stores beside its tensors (window and
scored key and value norms, keynorm's scores) are computed again from the
tensors, never trusted.

A Hugging Face transformer's memory (body "hf") is its segcli.hf cache: per cache layer (`PolicyLayer`) its kind
(full, sliding with its window, chunked), tokens seen and policy state, flattened as above, the scored policies'
scores and absolute positions and the per-layer budgets inside the states; where a sliding window needs them, the
true positions of the slots (the policy replayed on positions: `positions.*`); layers the model keeps itself (shared
key-value layers) hold nothing (null). A recurrent or hybrid model's memory (body "recurrent") is its layers' own
states (segcli.backends.recurrent_files) and, under a bounded policy on a hybrid's attention layers, the same
"attention" description of its segcli.hf layers. Reading either rebuilds every layer against a fresh cache of this
run (the model stepped once on one token says each layer's heads, head size and dtype) and checks it as above.

An `xl` memory is one segment: a file records the segment size it was saved at
(`segment_size`) and loads only at that segment size; a file that does not
record it loads when its segment fits (no larger than this run's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .errors import UsageError, one_line
from .files import AtomicOutput, file_kind, require_file, require_writable

FORMAT = 2
READS = (1, 2)  # formats this segcli loads
DIGESTS = "tensor_sha256"  # {tensor name: sha256 of its bytes}; format 2 files written since segcli checks them
META_KEY = "segcli"
MAX_COUNT = 1 << 53  # largest token count or position a file may hold (exact in float64, the RoPE angles' type)


class StateFileError(ValueError):
    """A memory file's state is not one this run's policy could have written."""


# -- generic dataclass <-> (tensors, JSON) ----------------------------------------------------------------------------

def flatten_state(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """A JSON description of `obj`; its tensors go into `tensors` under names starting with `prefix`."""
    if isinstance(obj, Tensor):
        # own, contiguous CPU storage: states hold views into larger buffers (safetensors refuses shared storage)
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"tensor": prefix}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        packed = getattr(obj, "packed", None)
        obj = packed() if packed is not None else obj
        cls = type(obj)
        return {
            "type": f"{cls.__module__}:{cls.__qualname__}",
            "fields": {f.name: flatten_state(getattr(obj, f.name), f"{prefix}.{f.name}", tensors)
                       for f in dataclasses.fields(obj)},
        }
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot save a memory state field of type {type(obj).__name__} ({prefix})")


def type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def rebuild_state(desc: Any, tensors: dict[str, Tensor], device: torch.device, like: Any, name: str,
                  used: set[str]) -> Any:
    """The state `desc` describes, built like `like` (a fresh state of this run's policy): the same dataclass
    (or one of its bases: an older file), the same fields, a tensor where `like` has a tensor or None, a
    count (an int, 0 .. MAX_COUNT) where it has an int. Shapes and dtypes are the policy's `check_state`."""
    if not isinstance(desc, dict):
        raise StateFileError(f"{name} is not a state description")
    if "tensor" in desc:
        key = desc["tensor"]
        if not isinstance(key, str) or key not in tensors:
            raise StateFileError(f"{name}: tensor {key!r} is missing")
        if key in used:
            raise StateFileError(f"{name}: tensor {key} is used twice")
        if not (like is None or isinstance(like, Tensor)):
            raise StateFileError(f"{name} is a tensor, expected {type(like).__name__}")
        used.add(key)
        return tensors[key].to(device)
    if "value" in desc:
        x = desc["value"]
        if isinstance(like, int) and not isinstance(like, bool):
            if type(x) is not int or not 0 <= x <= MAX_COUNT:
                raise StateFileError(f"{name} is {x!r}, expected a count from 0 to {MAX_COUNT}")
        elif like is None or isinstance(like, Tensor):
            if x is not None:
                raise StateFileError(f"{name} is {x!r}, expected {'a tensor' if like is not None else 'nothing'}")
        elif type(x) is not type(like):
            raise StateFileError(f"{name} is {x!r}, expected a {type(like).__name__}")
        return x
    if not (dataclasses.is_dataclass(like) and not isinstance(like, type)):
        raise StateFileError(f"{name} is a {desc.get('type')}, expected {type(like).__name__}")
    cls = type(like)
    if desc.get("type") not in {type_name(c) for c in cls.__mro__ if dataclasses.is_dataclass(c)}:
        raise StateFileError(f"{name} is a {desc.get('type')}, this policy keeps a {type_name(cls)}")
    fields = desc.get("fields")
    if not isinstance(fields, dict):
        raise StateFileError(f"{name} has no fields")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise StateFileError(f"{name} has unknown field {unknown[0]}")
    needed = [n for n, f in known.items() if n not in fields and f.default is dataclasses.MISSING
              and f.default_factory is dataclasses.MISSING]
    if needed:
        raise StateFileError(f"{name} lacks field {needed[0]}")
    return cls(**{n: rebuild_state(d, tensors, device, getattr(like, n), n if name == "state" else f"{name}.{n}", used)
                  for n, d in fields.items()})


def packed_state(obj: Any) -> Any:
    """`obj` with every part that has a `packed()` (a window buffer) packed: what it holds, not its room."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        packed = getattr(obj, "packed", None)
        if packed is not None:
            return packed()
        return dataclasses.replace(obj, **{f.name: packed_state(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                           if dataclasses.is_dataclass(getattr(obj, f.name))})
    return obj


# -- files --------------------------------------------------------------------------------------------------------------

def check_target(path: str) -> None:
    """Fail before any work when the file could not be written."""
    require_writable(path, "--save-memory")


def check_source(path: str) -> None:
    """Fail before any work when `path` could not be loaded as a memory file: missing, a folder, or not a regular
    file (a FIFO or device, never opened: it could make the run wait for ever). `read_memory_file` checks again."""
    where = f"--load-memory {path}"
    require_file(path, where)
    os.close(open_regular(path, where))


def save_memory(path: str, memory, backend, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `memory` to `path`, whole or not at all; returns the metadata written."""
    data, meta = memory_file(memory, backend, extra)
    with AtomicOutput(path, "--save-memory", binary=True) as out:
        out.file.write(data)
    return meta


def memory_file(memory, backend, extra: dict[str, Any] | None = None) -> tuple[bytes, dict[str, Any]]:
    """The bytes of a memory file holding `memory`, and its metadata (a command puts them in place together
    with its other outputs). The header (model, tokenizer, policy, sizes, position, dtype) is every
    backend's; the body is its kind's (`BODIES`)."""
    from safetensors.torch import save

    if backend.kind not in BODIES:
        raise UsageError(f"--save-memory does not work with {backend.kind} models yet")
    tensors, body = BODIES[backend.kind][0](memory, backend)
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
        **body,
        **(extra or {}),
        DIGESTS: {name: tensor_sha256(t) for name, t in sorted(tensors.items())},
    }
    return save(tensors, metadata={META_KEY: json.dumps(meta)}), meta


def native_body(memory, backend) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The seglm memory: every layer's policy state (the smeared key inside it)."""
    tensors: dict[str, Tensor] = {}
    return tensors, {"layers": [flatten_state(s, f"layer{i}", tensors) for i, s in enumerate(memory.states)]}


def recurrent_body(memory, backend) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A recurrent or hybrid model's memory: its layers' own states (segcli.backends.recurrent_files), and the policy
    states of a hybrid's attention layers where segcli.hf's layers hold them (a bounded policy)."""
    from .backends.recurrent_files import save_state

    try:
        tensors, body = save_state(backend, memory)
    except ValueError as e:
        raise UsageError(f"--save-memory: {e}") from None
    out: dict[str, Any] = {"layers": [], "recurrent": body}
    if _policy_layers(memory.cache):
        out["attention"] = attention_body(memory.cache, tensors)
    return tensors, out


def hf_body(memory, backend) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A Hugging Face transformer's memory: its segcli.hf cache layers' policy states (`attention_body`)."""
    tensors: dict[str, Tensor] = {}
    return tensors, {"layers": [], "hf": {"family": backend.identity.get("model_type"),
                                          **attention_body(memory, tensors)}}


ATTENTION_FORMAT = 1


def _policy_layers(cache) -> list:
    from .hf import PolicyLayer

    return [layer for layer in getattr(cache, "layers", []) if isinstance(layer, PolicyLayer)]


def attention_body(cache, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """segcli.hf's layers of `cache` (a SegcliCache): per cache layer its kind and window, tokens seen and flattened
    policy state (`layer{i}.*`; null for a layer the model keeps itself, or before any token), and the positions of
    the slots where sliding windows need them (`positions.*`)."""
    from .hf import PolicyLayer

    layers: list[Any] = []
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, PolicyLayer):
            layers.append(None)
            continue
        layers.append({"kind": layer.kind.kind, "window": layer.kind.window, "seen": layer.seen,
                       "state": None if layer.state is None else flatten_state(layer.state, f"layer{i}", tensors)})
    pos = getattr(cache, "positions", None)
    positions = None if pos is None else {"seen": pos.seen, "state": flatten_state(pos.state, "positions", tensors)}
    return {"format": ATTENTION_FORMAT, "layers": layers, "positions": positions}


def kv_shapes(backend, cfg) -> dict[int, tuple]:
    """Per segcli.hf layer of this run's memory, (batch, key-value heads, head dim, dtype) of its pairs: what the
    model hands a fresh memory for one token."""
    memory = backend.new_memory(cfg)
    ids = torch.full((1, 1), backend.bos_id or 0, dtype=torch.long, device=backend.device)
    with torch.inference_mode():
        _, memory, _ = backend.step(ids, memory)
    cache = getattr(memory, "cache", memory)
    return {i: layer.kv_shape for i, layer in enumerate(getattr(cache, "layers", []))
            if getattr(layer, "kv_shape", None) is not None}


def restore_attention(body: Any, tensors: dict[str, Tensor], cache, shapes: dict[int, tuple], seen: int,
                      device: torch.device) -> None:
    """Put the policy states `body` (attention_body) describes into the fresh segcli.hf layers of `cache`, each
    rebuilt against its layer's policy and checked (`check_state`); StateFileError or ValueError naming the first
    thing that does not fit."""
    from .hf import PolicyLayer

    if not isinstance(body, dict) or body.get("format") != ATTENTION_FORMAT:
        raise StateFileError(f"attention layer format {body.get('format') if isinstance(body, dict) else body!r}, "
                             f"this segcli reads format {ATTENTION_FORMAT}")
    layers = body.get("layers")
    if not isinstance(layers, list) or len(layers) != len(cache.layers):
        n = len(layers) if isinstance(layers, list) else 0
        raise StateFileError(f"{n} cache layers saved, the model has {len(cache.layers)}")
    used: set[str] = set()
    for i, (desc, layer) in enumerate(zip(layers, cache.layers)):
        mine = isinstance(layer, PolicyLayer)
        if desc is None and not mine:
            continue
        if desc is None or not mine:
            raise StateFileError(f"layer {i}: " + ("no memory saved for it" if mine else
                                                   "a memory saved for a layer the model keeps itself"))
        if not isinstance(desc, dict):
            raise StateFileError(f"layer {i} is not a layer description")
        kind = (desc.get("kind"), desc.get("window"))
        if kind != (layer.kind.kind, layer.kind.window):
            raise StateFileError(f"layer {i} was saved as a {kind[0]} layer (window {kind[1]}); this model's is "
                                 f"{layer.kind.kind} (window {layer.kind.window})")
        if desc.get("seen") != seen:
            raise StateFileError(f"layer {i} has seen {desc.get('seen')!r} tokens, the file says {seen}")
        if desc.get("state") is None:
            if seen:
                raise StateFileError(f"layer {i} holds no state after {seen} tokens")
            continue
        if i not in shapes:
            raise StateFileError(f"layer {i}: the model hands it no key-value pairs")
        b, h, d, dtype = shapes[i]
        try:
            like = layer.policy.init_layer_state(i, layer.layers, b, h, d, device=device, dtype=dtype)
            state = rebuild_state(desc["state"], tensors, device, like, "state", used)
            layer.policy.check_state(state, batch=b, heads=h, head_dim=d, dtype=dtype, seen=seen)
        except (StateFileError, ValueError) as e:
            raise StateFileError(f"layer {i}: {e}") from None
        layer.restore(packed_state(recomputed(state, layer.policy)), seen, device)
    positions, pos = body.get("positions"), getattr(cache, "positions", None)
    if (positions is None) != (pos is None):
        raise StateFileError("the slots' positions are " + ("missing" if pos is not None else "saved, but this run "
                                                            "keeps none"))
    if pos is not None:
        if not isinstance(positions, dict) or positions.get("seen") != seen:
            raise StateFileError(f"the slots' positions are not those of {seen} tokens")
        like = pos.policy.init_state(1, 1, 1, device="cpu", dtype=torch.float64)
        try:
            state = rebuild_state(positions.get("state"), tensors, torch.device("cpu"), like, "state", used)
            pos.policy.check_state(state, batch=1, heads=1, head_dim=1, dtype=torch.float64, seen=seen)
        except (StateFileError, ValueError) as e:
            raise StateFileError(f"positions: {e}") from None
        pos.restore(packed_state(state), seen)


def tensor_sha256(t: Tensor) -> str:
    """sha256 of a tensor's bytes as a memory file stores them (C order, little-endian)."""
    t = t.detach().to("cpu").contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def open_regular(path: str, where: str) -> int:
    """A descriptor open on `path` for reading, where `path` is a regular file; else one UsageError line, before
    anything is opened: a FIFO with no writer, a terminal or a device would make the open or the read wait for ever.
    Opened without blocking, and checked again through the descriptor (a path swapped in between)."""
    def refuse(what: str):
        return UsageError(f"{where}: is {what}, not a regular file; pass a memory file written by --save-memory")

    def failed(e: OSError):
        return UsageError(f"{where}: " + ("permission denied" if isinstance(e, PermissionError)
                                          else "no such file" if isinstance(e, FileNotFoundError)
                                          else e.strerror or type(e).__name__))

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise failed(e) from None
    if not stat.S_ISREG(mode):
        raise refuse(file_kind(mode))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise failed(e) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise refuse(file_kind(mode))
    return fd


def read_memory_file(path: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The metadata and tensors of a memory file; one UsageError line for a path that is not a regular file, a file
    that is not a segcli memory file, or a format this segcli does not read."""
    from safetensors import safe_open

    where = f"--load-memory {path}"
    require_file(path, where)
    fd = open_regular(path, where)
    try:  # read through the descriptor checked above (Linux: its /proc name), not the path again
        name = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else path
        with safe_open(name, "pt") as f:
            meta_text = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except PermissionError:
        raise UsageError(f"{where}: permission denied") from None
    except Exception:  # noqa: BLE001 - safetensors raises its own error types for any malformed file
        raise UsageError(f"{where}: not a safetensors file (expected a file written by --save-memory)") from None
    finally:
        os.close(fd)
    if meta_text is None:
        raise UsageError(f"{where}: no segcli metadata (expected a file written by --save-memory)")
    try:
        meta = json.loads(meta_text)
    except (json.JSONDecodeError, RecursionError):
        raise UsageError(f"{where}: corrupt segcli metadata") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{where}: corrupt segcli metadata")
    if meta.get("format") not in READS:
        raise UsageError(f"{where}: memory file format {meta.get('format')!r}; "
                         f"this segcli reads format {', '.join(map(str, READS))}")
    return meta, tensors


def has_digests(meta: dict[str, Any]) -> bool:
    """Whether a file's tensors are to be checked against digests: format 2 with `tensor_sha256` (format 1 never
    had them)."""
    return meta["format"] >= 2 and DIGESTS in meta


def check_digests(path: str, meta: dict[str, Any], digests: dict[str, str]) -> None:
    """One UsageError line unless the file's `tensor_sha256` names exactly its tensors, each with the sha256 of its
    bytes (`digests`, computed as the file was read). A file without it (format 1, or format 2 from a segcli before
    the digests) has nothing to check."""
    if not has_digests(meta):
        return
    corrupt = f"--load-memory {path}: the file is corrupt"
    again = "use another copy, or save the memory again"
    saved = meta[DIGESTS]
    if not isinstance(saved, dict):
        raise UsageError(f"{corrupt}: its tensor digests ({DIGESTS}) are missing or damaged; {again}")
    for name in sorted(set(saved) | set(digests)):
        if name not in saved:
            raise UsageError(f"{corrupt}: tensor {name} has no sha256 in its metadata; {again}")
        if name not in digests:
            raise UsageError(f"{corrupt}: tensor {name} is listed in its metadata but missing; {again}")
        if saved[name] != digests[name]:
            raise UsageError(f"{corrupt}: the bytes of tensor {name} do not match the sha256 saved with them; {again}")


def check_finite(path: str, tensors: dict[str, Tensor]) -> None:
    """One UsageError line naming the first tensor (by name) that holds NaN or an infinity: a run continues only
    from finite numbers, and such a memory would fail later, far from its cause (as a non-finite loss)."""
    for name, t in sorted(tensors.items()):
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "an infinite value"
            raise UsageError(f"--load-memory {path}: tensor {name} holds {bad}; a memory holds finite numbers only: "
                             "the file is damaged, or was saved from a run whose numbers had already failed")


def recomputed(state: Any, policy) -> Any:
    """`state` (read from a file) with every statistic it stores beside its tensors computed again from them, as the
    policy computes them when pairs enter: a window's and a scored state's key and value norms, and scores that are
    a function of the key (keynorm's norms; tova's and snapkv's zeros). Accumulated scores (h2o's attention) are
    state, not statistics: the policy's check_state bounds them."""
    from .memory.scored import ScoredPolicy, ScoredState, norms
    from .memory.window import Window

    if isinstance(state, Window):  # the float32 norms a window writes as pairs enter
        return dataclasses.replace(state, kn=norms(state.k), vn=norms(state.v))
    if not (dataclasses.is_dataclass(state) and not isinstance(state, type)):
        return state
    changes = {}
    for f in dataclasses.fields(state):  # parts: a window inside a fifo, sink or compressive state
        part = getattr(state, f.name)
        if dataclasses.is_dataclass(part) and not isinstance(part, type):
            changes[f.name] = recomputed(part, policy)
    if isinstance(state, ScoredState) and isinstance(state.k, Tensor):
        kn = norms(state.k)
        if state.kn is not None:
            changes.update(kn=kn, vn=norms(state.v))
        if isinstance(policy, ScoredPolicy) and type(policy).scored is ScoredPolicy.scored:  # set as pairs enter
            score = torch.empty_like(state.score)
            policy.entering_into(score, kn)
            changes["score"] = score
    return dataclasses.replace(state, **changes) if changes else state


def count_field(meta: dict[str, Any], key: str, path: str) -> int:
    """meta[key] as a token count (an int from 0 to MAX_COUNT), or one UsageError line."""
    x = meta.get(key)
    if type(x) is not int or not 0 <= x <= MAX_COUNT:
        raise UsageError(f"--load-memory {path}: {key} is {x!r}, expected a whole number of tokens from 0 to "
                         f"{MAX_COUNT}; the file is damaged or was not written by --save-memory")
    return x


def load_memory(path: str, backend, cfg):
    """The memory saved in `path`, checked against this run's model, tokenizer, policy, dtype and (xl)
    segment size, its tensors against the digests saved with them; a file that is damaged or was not written for
    this run is one UsageError line (its strings' control characters escaped: `shown`)."""
    try:
        return _load_memory(path, backend, cfg)
    except UsageError as e:
        raise UsageError(one_line(str(e))) from None


def _load_memory(path: str, backend, cfg):
    if backend.kind not in BODIES:
        raise UsageError(f"--load-memory does not work with {backend.kind} models yet")
    meta, tensors = read_memory_file(path)
    digests = {name: tensor_sha256(t) for name, t in tensors.items()} if has_digests(meta) else {}
    ident = backend.identity
    if meta.get("model_sha256") != ident.get("model_sha256"):
        raise UsageError(f"--load-memory {path}: saved with another model ({meta.get('model')}, "
                         f"sha256 {str(meta.get('model_sha256'))[:12]}); this run uses {ident.get('model')} "
                         f"(sha256 {str(ident.get('model_sha256'))[:12]}): pass the same --model")
    if meta.get("tokenizer_sha256") != ident.get("tokenizer_sha256"):
        raise UsageError(f"--load-memory {path}: saved with another tokenizer (sha256 "
                         f"{str(meta.get('tokenizer_sha256'))[:12]}); this model's is {str(ident.get('tokenizer_sha256'))[:12]}")
    policy = cfg.policy()
    sizes = meta.get("sizes")
    if meta.get("policy") != policy.name or sizes != policy.describe():
        saved = " ".join([f"--memory {meta.get('policy')}"]
                         + [f"--{k.replace('_', '-')} {v}" for k, v in (sizes.items() if isinstance(sizes, dict) else [])])
        raise UsageError(f"--load-memory {path}: saved with policy {meta.get('policy')} {sizes}, "
                         f"this run uses {policy.name} {policy.describe()}; pass {saved}")
    dtype = str(backend.dtype).removeprefix("torch.")
    if meta.get("dtype") != dtype:
        raise UsageError(f"--load-memory {path}: saved in {meta.get('dtype')}, this run computes in {dtype}; "
                         f"pass --dtype {meta.get('dtype')}")
    if policy.name == "xl" and "segment_size" in meta:
        saved_ns = count_field(meta, "segment_size", path)
        if saved_ns != cfg.segment_size:
            raise UsageError(f"--load-memory {path}: an xl memory is one segment; this one was saved at "
                             f"--segment-size {saved_ns}, this run uses {cfg.segment_size}: pass --segment-size {saved_ns}")
    memory = BODIES[backend.kind][1](path, meta, tensors, backend, cfg, policy)
    # Last, so that a file edited by hand (its digests stale) is told what in it does not fit this run first; a
    # corrupt file's flipped bits may well make NaN or an infinity: it is told it is corrupt.
    check_digests(path, meta, digests)
    check_finite(path, tensors)
    return memory


def recurrent_memory(path: str, meta: dict[str, Any], tensors: dict[str, Tensor], backend, cfg, policy):
    from .backends.recurrent_files import load_state

    try:
        memory = load_state(backend, cfg, meta.get("recurrent"), tensors)
        if _policy_layers(memory.cache):
            restore_attention(meta.get("attention"), tensors, memory.cache, kv_shapes(backend, cfg), memory.seen,
                              backend.device)
        elif meta.get("attention") is not None:
            raise StateFileError("attention layer memories saved, but this run keeps its model's own cache")
    except ValueError as e:  # StateFileError included
        raise UsageError(f"--load-memory {path}: {e}; the file is damaged or was not written by --save-memory "
                         "for this run") from None
    return memory


def hf_memory(path: str, meta: dict[str, Any], tensors: dict[str, Tensor], backend, cfg, policy):
    """The segcli.hf cache of an "hf" file: a fresh cache of this run (the backend refuses a policy the model cannot
    take here), every layer's state rebuilt against its own and checked."""
    seen = count_field(meta, "seen", path)
    body = meta.get("hf")
    family = backend.identity.get("model_type")
    if not isinstance(body, dict) or body.get("family") != family:
        saved = body.get("family") if isinstance(body, dict) else None
        raise UsageError(f"--load-memory {path}: saved from a {saved} model, this run's model is a {family}; "
                         "pass the same --model")
    cache = backend.new_memory(cfg)
    try:
        restore_attention(body, tensors, cache, kv_shapes(backend, cfg), seen, backend.device)
    except ValueError as e:
        raise UsageError(f"--load-memory {path}: {e}; the file is damaged or was not written by --save-memory "
                         "for this run") from None
    return cache


def native_memory(path: str, meta: dict[str, Any], tensors: dict[str, Tensor], backend, cfg, policy):
    """The SegMemory of a seglm file: each layer rebuilt against this run's fresh state and checked."""
    from .models.seglm import SegMemory

    layers = meta.get("layers")
    model = backend.model
    n_layers = len(model.model.layers)
    if not isinstance(layers, list) or len(layers) != n_layers:
        n = len(layers) if isinstance(layers, list) else 0
        raise UsageError(f"--load-memory {path}: {n} layers saved, the model has {n_layers}")
    seen = count_field(meta, "seen", path)
    fresh = model.new_memory(policy, 1)  # what this run's states look like
    cfg_model = model.config
    shape = dict(batch=1, heads=cfg_model.num_attention_heads, head_dim=cfg_model.head_dim,
                 dtype=next(model.parameters()).dtype, seen=seen)
    last_keys = meta.get("last_keys") if meta["format"] == 1 else None  # format 1 kept them apart
    if last_keys is not None and (not isinstance(last_keys, list) or len(last_keys) != n_layers):
        raise UsageError(f"--load-memory {path}: last_keys does not hold one key per layer")
    states, used = [], set()
    for i, (desc, like) in enumerate(zip(layers, fresh.states)):
        try:
            state = rebuild_state(desc, tensors, backend.device, like, "state", used)
            if last_keys is not None:
                key = rebuild_state(last_keys[i], tensors, backend.device, None, f"last_keys[{i}]", used)
                if hasattr(state, "last_key"):  # `none` never used it
                    state = dataclasses.replace(state, last_key=key)
            policy.check_state(state, **shape)
            state = recomputed(state, policy)
        except (StateFileError, ValueError) as e:
            raise UsageError(f"--load-memory {path}: layer {i}: {e}; the file is damaged or was not written "
                             "by --save-memory for this run") from None
        if policy.name == "xl" and "segment_size" not in meta and state.capacity > cfg.segment_size:
            raise UsageError(f"--load-memory {path}: an xl memory is one segment; this one holds segments of "
                             f"{state.capacity} tokens, more than this run's --segment-size {cfg.segment_size}: "
                             f"pass --segment-size {state.capacity}")
        states.append(packed_state(state))
    return SegMemory(policy, states, seen)


BODIES = {  # backend kind -> (the file body of a memory, the memory of a file body)
    "native": (native_body, native_memory),
    "recurrent": (recurrent_body, recurrent_memory),
    "hf": (hf_body, hf_memory),
}
