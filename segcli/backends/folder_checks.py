"""Checks on a model folder before anything in it is loaded: each is one UsageError line (exit 2) naming the file or
the config key, and what to do about it (DESIGN §4: "a model path that is not a model").

    raw = check_folder(path)                           # special files, config.json's values; the config dict
    check_weights(path)                                # each weight file loading reads is whole safetensors
    check_fits(path, lower_bound_bytes(raw, 4), ...)   # a config that could not fit is refused before it allocates
    need = tensor_bytes_of(meta_model, dtype)          # the exact bytes, from the model built on the meta device

Why before: a FIFO, socket or device read as a file waits for ever (or reads for ever); a config whose
num_hidden_layers is 10**9 builds modules until the machine runs out of memory; a negative or zero size reaches
torch as an exception or a warning about zero-element tensors; a truncated safetensors file reaches the user as the
library's own exception. None of that is the user's problem to decode.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import warnings
from pathlib import Path
from typing import Any, Iterator

from ..errors import SegcliError, UsageError
from ..files import file_kind

MAX_JSON_BYTES = 64 << 20  # a config or tokenizer_config.json larger than this is not one (and is not read whole)
LAYER_OVERHEAD = 16 << 10  # bytes of Python objects per layer's modules at the least (measured: 20-37 KiB)
META_LAYERS = 4096  # above this many layers the model is not built on the meta device (~1 ms a layer): the bound decides
MEMORY_CAP_BYTES = 1 << 40  # where the free memory cannot be read: a model above 1 TiB is refused all the same

# config keys that size a tensor or a loop: a positive whole number where present and not null (a list: each entry)
SIZE_KEYS = (
    "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer", "n_layers", "num_layers",
    "num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads", "num_key_value_heads", "num_kv_heads",
    "n_head_kv", "multi_query_group_num", "head_dim", "kv_channels", "vocab_size", "padded_vocab_size",
    "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "d_ff", "moe_intermediate_size",
    "shared_expert_intermediate_size", "attention_hidden_size", "state_size", "ssm_state_size", "conv_kernel",
    "mamba_d_conv", "mamba_d_state", "mamba_expand", "expand", "n_groups", "time_step_rank",
    "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length", "context_length",
)
COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "n_shared_experts", "num_experts_per_tok")
HIDDEN = ("hidden_size", "n_embd", "d_model")
LAYERS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
HEADS = ("num_attention_heads", "n_head", "n_heads", "attention_heads")
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_head_kv")
VOCAB = ("vocab_size", "padded_vocab_size")
NOT_MODEL_CONFIGS = ("quantization_config",)  # nested dicts named *_config whose keys are no model sizes


def reason(e: BaseException, limit: int = 200) -> str:
    """The informative line of a library's exception message, without its class name: the first line, or where that
    only introduces the next (transformers' strict-config errors: "Class validation error ...:"), the next one."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    line = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    head, sep, rest = line.partition(": ")
    if sep and head.isidentifier() and head.endswith(("Error", "Exception")):
        line = rest
    return line[:limit]


# -- files ---------------------------------------------------------------------------------------------------------------

def regular_file(path: Path) -> Path:
    """`path` when it is a regular file (symlinks followed); UsageError naming what it is otherwise. Checked before
    a file is opened: reading a FIFO waits for a writer that may never come, a device reads for ever."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        what = "a broken symbolic link" if path.is_symlink() else "missing"
        raise UsageError(f"{path}: {what}; the model folder is incomplete (save or download it again)") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path}: is {file_kind(mode)}, not a regular file; a model folder holds plain files "
                         "(replace it with the file itself)")
    return path


def special_files(folder: Path) -> None:
    """Every entry of a model folder that is not a directory must be a regular file (transformers opens files by
    pattern: tokenizer files, vocabularies, generation_config.json, ...); hidden entries (.gitattributes, .cache) are
    never read and are left alone."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise UsageError(f"{folder}: cannot list the model folder ({e.strerror or type(e).__name__})") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir():
                continue
        except OSError:
            pass
        regular_file(entry)


def json_object(path: Path) -> dict:
    """The JSON object in `path` (a regular file of at most MAX_JSON_BYTES); UsageError naming the file otherwise."""
    regular_file(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise UsageError(f"{path}: {size:,} bytes, too large for a {path.name} (segcli reads at most "
                         f"{MAX_JSON_BYTES:,}); save the model again")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text, so not JSON; save the model again") from None
    except ValueError as e:
        raise UsageError(f"{path}: not valid JSON ({str(e).splitlines()[0]}); save the model again") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: holds a JSON {type(raw).__name__.replace('dict', 'object').replace('str', 'string')}"
                         ", not an object of keys; save the model again")
    return raw


def safetensors_header(path: Path) -> None:
    """UsageError unless `path` is a whole safetensors file: its header parses and its tensors' bytes are all there
    (safetensors itself says which: a truncated file, or not safetensors at all)."""
    from safetensors import safe_open

    regular_file(path)
    try:
        with safe_open(str(path), "pt"):
            pass
    except Exception as e:  # noqa: BLE001 - SafetensorError, and what the Rust reader raises for a file it cannot map
        detail = reason(e).removeprefix("Error while deserializing header: ")
        raise UsageError(f"{path}: not a whole safetensors file ({detail}); it is truncated or "
                         "not safetensors at all (save or download it again)") from None


def weight_files(folder: Path, every: bool = False) -> list[Path]:
    """The safetensors files loading reads: every *.safetensors of the folder (`every`: the native loader's glob), else
    those model.safetensors.index.json maps tensors to, else model.safetensors where it exists."""
    if every:
        return sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        raw = json_object(index)
        shards = raw.get("weight_map")
        if not isinstance(shards, dict) or not shards or not all(isinstance(v, str) for v in shards.values()):
            raise UsageError(f"{index}: has no weight_map of tensor names to shard files; save the model again")
        names = sorted(set(shards.values()))
        outside = [n for n in names if Path(n).is_absolute() or ".." in Path(n).parts]
        if outside:
            raise UsageError(f"{index}: names a shard outside the model folder ({outside[0]}); save the model again")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.exists() or single.is_symlink() else []


def check_folder(folder: Path) -> dict:
    """A model folder's config.json as a dict, once nothing in the folder can hang a reader, config.json is a JSON
    object whose sizes are possible (`check_config`) and tokenizer_config.json (where there is one) is an object."""
    special_files(folder)
    raw = json_object(folder / "config.json")
    check_config(raw, folder / "config.json")
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.exists():
        json_object(tok_cfg)
    return raw


def check_weights(folder: Path, every: bool = False) -> None:
    """Every weight file loading reads (`weight_files`) is a whole safetensors file."""
    for f in weight_files(folder, every):
        safetensors_header(f)


# -- config values -------------------------------------------------------------------------------------------------------

def _sub_configs(raw: dict, prefix: str = "") -> Iterator[tuple[str, dict]]:
    """(key path prefix, dict) for the config and every nested model config (text_config, ...)."""
    yield prefix, raw
    for k, v in raw.items():
        if isinstance(v, dict) and k.endswith("config") and k not in NOT_MODEL_CONFIGS:
            yield from _sub_configs(v, f"{prefix}{k}.")


def _first(d: dict, keys: tuple[str, ...]) -> tuple[str, Any] | None:
    for k in keys:
        if isinstance(d.get(k), int) and not isinstance(d.get(k), bool):
            return k, d[k]
    return None


def config_problem(raw: dict) -> str | None:
    """What makes a config impossible (a size that is negative, zero or fractional; heads that do not divide the
    width they split; more experts per token than experts), in words naming the key and value; None: none found."""
    for prefix, d in _sub_configs(raw):
        for key in (*SIZE_KEYS, *COUNT_KEYS):
            value = d.get(key)
            if value is None or isinstance(value, str):  # null: the family's default; "auto" (time_step_rank)
                continue
            least = 1 if key in SIZE_KEYS else 0
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not (
                        math.isfinite(v) and v.is_integer())) or v < least:
                    need = "a positive whole number" if least else "a whole number, 0 or more"
                    return f"{prefix}{key} is {json.dumps(value)}; it must be {need}"
        hidden, heads, kv = _first(d, HIDDEN), _first(d, HEADS), _first(d, KV_HEADS)
        if heads and kv and heads[1] % kv[1]:
            return (f"{prefix}{heads[0]} {heads[1]} is not a multiple of {prefix}{kv[0]} {kv[1]}: each key-value head "
                    "serves a whole group of query heads")
        if hidden and heads and d.get("head_dim") is None and hidden[1] % heads[1]:
            return (f"{prefix}{hidden[0]} {hidden[1]} is not a multiple of {prefix}{heads[0]} {heads[1]} (and no "
                    "head_dim is given): the heads split the width evenly")
        experts, per_token = _first(d, ("num_local_experts", "num_experts", "n_routed_experts")), \
            _first(d, ("num_experts_per_tok",))
        if experts and per_token and experts[1] and per_token[1] > experts[1]:
            return f"{prefix}num_experts_per_tok {per_token[1]} is more than {prefix}{experts[0]} {experts[1]}"
    return None


def check_config(raw: dict, where: Path) -> None:
    """UsageError naming the key and value where `config_problem` finds one."""
    problem = config_problem(raw)
    if problem:
        raise UsageError(f"{where}: {problem}; fix config.json or save the model again")


# -- memory --------------------------------------------------------------------------------------------------------------

def lower_bound_bytes(raw: dict, itemsize: int) -> int:
    """Bytes the model of this config needs at the least, from a few sizes alone (no model is built): the embedding
    (vocab x hidden), one norm per layer (hidden) and the Python objects of each layer's modules. Every family has at
    least these, so a config this cannot fit is refused before building it takes the machine's memory."""
    total = 0
    for _, d in _sub_configs(raw):
        hidden, layers, vocab = (_first(d, keys) for keys in (HIDDEN, LAYERS, VOCAB))
        h, n, v = (max(0, x[1]) if x else 0 for x in (hidden, layers, vocab))
        total += (v * h + n * h) * itemsize + n * LAYER_OVERHEAD
    return total


def layer_count(raw: dict) -> int:
    """The most layers any (sub-)config names (0 where none does)."""
    return max([x[1] for _, d in _sub_configs(raw) if (x := _first(d, LAYERS))] or [0])


def sizes_named(raw: dict) -> str:
    """The sizes the bound rests on, as `key value` pairs (for the message)."""
    d = raw.get("text_config") if isinstance(raw.get("text_config"), dict) and not _first(raw, LAYERS) else raw
    found = [x for keys in (LAYERS, HIDDEN, VOCAB) if (x := _first(d, keys))]
    return ", ".join(f"{k} {v:,}" for k, v in found)


def tensor_bytes_of(model, itemsize: int) -> int:
    """Bytes of a model's parameters in a run dtype of `itemsize` bytes (floating ones; others keep their own) plus
    its buffers: what loading it allocates. The model may live on the meta device (no memory)."""
    total = 0
    for p in model.parameters():
        total += p.numel() * (itemsize if p.is_floating_point() else p.element_size())
    for b in model.buffers():
        total += b.numel() * b.element_size()
    return total


def free_memory(device) -> list[tuple[str, int | None]]:
    """(where, free bytes or None) for each memory a load onto `device` fills: the CPU's MemAvailable (weights are
    read there first), and the GPU's free memory for a CUDA device."""
    from ..memory.budget import available_bytes

    out: list[tuple[str, int | None]] = [("of memory available (MemAvailable)", available_bytes())]
    if getattr(device, "type", None) == "cuda":
        import torch

        out.append((f"free on {device}", torch.cuda.mem_get_info(device)[0]))
    return out


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(where: Path, need: int, what: str, available: list[tuple[str, int | None]],
               at_least: bool = False) -> None:
    """UsageError when `need` bytes (`what` says of what; `at_least`: a lower bound) exceed any of the `available`
    memories (None: unknown, then MEMORY_CAP_BYTES stands in)."""
    for place, free in available:
        limit = free if free is not None else MEMORY_CAP_BYTES
        if need > limit:
            have = f"the {gib(limit)} {place}" if free is not None else f"segcli's cap of {gib(limit)}"
            raise UsageError(f"{where}: {what} needs {'at least ' if at_least else ''}{gib(need)} ({need:,} bytes), "
                             f"more than {have}; check the config's sizes, or load it where there is more memory")


def meta_model(model_cfg, where: Path):
    """The causal LM a transformers config describes, built on the meta device (shapes only, no memory, no init);
    None for remote code (not run twice) and configs with more than META_LAYERS layers. UsageError naming the config
    when transformers cannot build it (a size no key check knew)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    text = model_cfg.get_text_config() if hasattr(model_cfg, "get_text_config") else model_cfg
    if getattr(model_cfg, "auto_map", None) or (getattr(text, "num_hidden_layers", 0) or 0) > META_LAYERS:
        return None
    cls = AutoModelForCausalLM._model_mapping.get(type(model_cfg), None)
    if cls is None:
        return None
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # an older transformers 5: init on the meta device, which costs time, not memory
        no_init_weights = contextlib.nullcontext
    try:
        with torch.device("meta"), no_init_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(copy.deepcopy(model_cfg))
    except Exception as e:  # noqa: BLE001 - whatever the family's constructor says of a size it cannot build
        raise UsageError(f"{where}: transformers cannot build a {model_cfg.model_type} model from it ({reason(e)}); "
                         "fix config.json or save the model again") from None


def check_model_fits(where: Path, model, dtype, device, available=None) -> int:
    """The bytes `model` (on the meta device) takes in `dtype`; UsageError when they cannot fit (`free_memory`)."""
    import torch

    itemsize = torch.empty(0, dtype=dtype).element_size()
    need = tensor_bytes_of(model, itemsize)
    n = sum(p.numel() for p in model.parameters())
    check_fits(where, need, f"the model ({n:,} parameters in {str(dtype).removeprefix('torch.')})",
               available if available is not None else free_memory(device))
    return need


def check_bound_fits(where: Path, raw: dict, dtype, device, available=None) -> int:
    """`lower_bound_bytes` of the config, refused (naming the sizes) when even that cannot fit."""
    import torch

    need = lower_bound_bytes(raw, torch.empty(0, dtype=dtype).element_size())
    check_fits(where, need, f"a model with {sizes_named(raw)}",
               available if available is not None else free_memory(device), at_least=True)
    return need


def check_hf_model_fits(path: Path, model_cfg, dtype, device) -> None:
    """A transformers config's model, built on the meta device (`meta_model`), against the free memory."""
    model = meta_model(model_cfg, path / "config.json")
    if model is not None:
        check_model_fits(path / "config.json", model, dtype, device)


def refuse_incomplete(where: Path, info: dict | None) -> None:
    """UsageError for what transformers' loading info says it had to make up: tensors missing from the checkpoint
    (initialised at random) or of another shape than the config's (`mismatched_keys`)."""
    if not info:
        return
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda x: str(x[0]))
    if mismatched:
        name, got, want = (list(mismatched[0]) + [None, None])[:3]
        shapes = f" has shape {list(got)}, the config expects {list(want)}" if got is not None else " has another shape"
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise UsageError(f"{where}: tensor {name}{shapes}{more}; the weights do not match config.json")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" ... ({len(missing)} in all)" if len(missing) > 3 else ""
        raise UsageError(f"{where}: the checkpoint is missing tensors the config needs: {', '.join(missing[:3])}{more} "
                         "(they would be random); save or download the model again")


# -- warnings ------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """Warnings raised inside (torch's, transformers', safetensors') kept as lines in the yielded list instead of
    printed: a load's outcome is one line, its data or its error. An error leaving the block carries them as notes,
    which a --debug traceback shows. Under --debug (SEGCLI_DEBUG=1) they are printed as they come."""
    lines: list[str] = []
    if os.environ.get("SEGCLI_DEBUG"):
        yield lines
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield lines
        except SegcliError as e:
            lines.extend(_lines(caught))
            for line in lines:
                e.add_note(f"warning while loading: {line}")
            raise
        lines.extend(_lines(caught))


def _lines(caught) -> list[str]:
    out = []
    for w in caught:
        line = f"{w.category.__name__}: {(str(w.message).splitlines() or [''])[0]} ({Path(w.filename).name}:{w.lineno})"
        if line not in out:
            out.append(line)
    return out


NAME_MAX, PATH_MAX = 255, 4096  # the longest file name and path Linux opens (bytes)


def check_model_name(model: str | None) -> None:
    """A --model that no file system could hold (a part over NAME_MAX bytes, the whole over PATH_MAX) is refused as
    what it is, before it reaches open() as "File name too long" (exit 1)."""
    if model is None:
        return
    raw = model.encode("utf-8", "surrogateescape")
    longest = max((len(part) for part in raw.split(b"/")), default=0)
    if len(raw) > PATH_MAX or longest > NAME_MAX:
        raise UsageError(f"--model: a name of {len(model):,} characters is no model folder, GGUF file or hub id "
                         f"(paths hold at most {PATH_MAX} bytes, {NAME_MAX} per name); give a shorter one")
