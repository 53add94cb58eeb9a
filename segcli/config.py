"""Typed run configuration, loaded from YAML and overridden by CLI options.

YAML keys are the CLI option names (`segment_size` or `segment-size`). Unknown
keys and wrong types are errors; the resolved config is written into every
summary so a run can be reproduced.
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import UsageError
from .memory import CATALOG, POLICY_NAMES, make_policy  # torch-free: the policy classes load in make_policy

FORMATS = ("table", "jsonl", "json", "csv")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_SIZE = 1 << 24  # largest segment or memory size accepted (16M pairs): larger is a typo, not a plan
SIZE_OPTIONS = ("memory_size", "sink_tokens", "compress_rate", "compressed_size", "recent_tokens", "window",
                "layer_budget")  # policy-specific options
LAYER_BUDGETS = ("uniform", "pyramid")
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.manual_seed and torch.Generator.manual_seed accept
MAX_THREADS = 4096  # torch intra-op threads accepted; more is a typo
MAX_YAML_BYTES = 1 << 20  # a config file larger than this is not a config (a device, a log given by mistake)
MAX_YAML_DEPTH = 32  # nesting of mappings and sequences; a config needs 3 or 4 levels
CHECK_TOKENS = 256  # `segcli check`'s text: the first tokens of the sample
CHECK_SEGMENT_SIZES = (1, 7, 64)  # its full-memory segment sizes: token by token, odd, longer than a short window


@dataclass
class RunConfig:
    model: str | None = None  # model directory or hub id; None = the bundled model
    memory: str = "fifo"  # memory policy (segcli policies)
    segment_size: int = 128  # tokens per segment, n_s
    memory_size: int = 512  # FIFO pairs, n_c (fifo, sink, compressive)
    sink_tokens: int = 4  # sink pairs kept for ever (sink)
    compress_rate: int = 4  # pairs pooled into one compressed slot (compressive)
    compressed_size: int = 128  # compressed slots, n_cm (compressive)
    recent_tokens: int | None = None  # newest pairs always kept, r <= n_c (h2o); None = memory_size // 2
    window: int = 32  # observation window: last queries scoring, newest pairs kept (snapkv)
    layer_budget: str = "uniform"  # uniform | pyramid: slots per layer (tova, h2o, snapkv, keynorm)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    seed: int = 0  # seeds torch (sampling, random init)
    revision: str | None = None  # hub revision (Hugging Face models)
    trust_remote_code: bool = False  # allow a hub model's own code
    errors: str = "strict"  # invalid UTF-8: strict (error) | replace (U+FFFD)
    threads: int | None = None  # torch intra-op threads; None = default_threads() (records hold the count used)

    def sizes(self) -> dict[str, int | str | None]:
        """The policy size parameters."""
        return {
            "memory_size": self.memory_size,
            "sink_tokens": self.sink_tokens,
            "compress_rate": self.compress_rate,
            "compressed_size": self.compressed_size,
            "recent_tokens": self.recent_tokens,
            "window": self.window,
            "layer_budget": self.layer_budget,
        }

    def policy(self):
        """The memory policy these options describe (the one place a config becomes a policy)."""
        return make_policy(self.memory, **self.sizes())

    def validate(self) -> "RunConfig":
        """Every field, with one line naming the value and what would be valid (exit 2)."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            v = getattr(self, f.name)
            if not _type_ok(v, hints[f.name]):
                raise UsageError(f"--{f.name.replace('_', '-')} must be {_type_name(hints[f.name])}, got {short(v)}")
        for name in ("model", "revision"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise UsageError(f"--{name} is empty; give a {'model directory or hub id' if name == 'model' else 'hub revision'}"
                                 " or leave it out")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise UsageError(f"--seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]} (what torch accepts), "
                             f"got {short(self.seed)}")
        if self.memory not in POLICY_NAMES:
            raise unknown_policy(self.memory)
        for name in ("segment_size", "memory_size", "compress_rate", "compressed_size", "sink_tokens"):
            low = 0 if name == "sink_tokens" else 1
            n = getattr(self, name)
            if not low <= n <= MAX_SIZE:
                raise UsageError(f"--{name.replace('_', '-')} must be an integer from {low} to {MAX_SIZE}, got {short(n)}")
        if self.recent_tokens is not None and not 0 <= self.recent_tokens <= self.memory_size:
            raise UsageError(f"--recent-tokens must be an integer from 0 to --memory-size ({self.memory_size}), "
                             f"got {short(self.recent_tokens)}")
        if not 1 <= self.window <= MAX_SIZE:
            raise UsageError(f"--window must be an integer from 1 to {MAX_SIZE} (queries scoring the memory), "
                             f"got {short(self.window)}")
        if self.layer_budget not in LAYER_BUDGETS:
            raise UsageError(f"--layer-budget must be one of {', '.join(LAYER_BUDGETS)}, got {short(self.layer_budget)}")
        if self.device not in DEVICES:
            raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {short(self.device)}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {short(self.dtype)}")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise UsageError(f"--threads must be an integer from 1 to {MAX_THREADS}, got {short(self.threads)}")
        if self.errors not in ("strict", "replace"):
            raise UsageError(f"--errors must be strict or replace, got {short(self.errors)}")
        return self

    def check_options_apply(self, explicit: set[str]) -> "RunConfig":
        """Refuse policy options the user set that the chosen policy does not use
        (e.g. --sink-tokens with --memory fifo): they would be silently ignored."""
        uses = CATALOG[self.memory].parameters
        stray = [k for k in SIZE_OPTIONS if k in explicit and k not in uses]
        if stray:
            names = ", ".join(f"--{k.replace('_', '-')}" for k in stray)
            used = ", ".join(f"--{k.replace('_', '-')}" for k in uses) or "no size options"
            raise UsageError(f"{names} does not apply to --memory {self.memory} (it uses {used}); remove it")
        return self


def unknown_policy(name: Any, option: str = "--memory") -> UsageError:
    """The one wording of an unknown policy name, whichever command or option (or YAML key) gave it."""
    return UsageError(f"{option}: unknown memory policy {short(name)}; choose one of: {', '.join(POLICY_NAMES)}")


def available_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_threads(environ: Mapping[str, str] | None = None, cpus: int | None = None) -> int:
    """torch's intra-op threads when --threads is not given: OMP_NUM_THREADS when it is set to a positive integer,
    else the cores this process may use minus one, at least 1. One core is left to the rest of the machine: torch's
    own default (every core) collapses on a busy one (issue 31: 67-130 tokens/s with 2 threads on a loaded 2-core
    machine, ~1,050 with 1)."""
    environ = os.environ if environ is None else environ
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return min(int(omp), MAX_THREADS)
    return max(1, (available_cpus() if cpus is None else cpus) - 1)


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return isinstance(value, (list, tuple)) and (not args or all(_type_ok(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def _type_name(annotation: Any) -> str:
    """`int`, `str or null`, `list of int`: for messages."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return getattr(annotation, "__name__", str(annotation))


_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 40, 40, 4, 4, 2


def short(value: Any) -> str:
    """A value for a one-line message, whatever its size (a huge number or nested list stays short)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 30:
        return f"an integer of {len(str(abs(value)))} digits"
    return _short.repr(value)


def _field_names(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _checked(key: str, raw_key: Any, value: Any, annotation: Any, source: str) -> Any:
    if not _type_ok(value, annotation):
        raise UsageError(f"{source}: key {short(raw_key)} must be {_type_name(annotation)}, "
                         f"got {type(value).__name__} {short(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{source}: key {short(raw_key)} must be a finite number, got {value}")
    return float(value) if annotation is float else value


def from_mapping(cls, data: dict[str, Any], source: str = "config"):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are UsageErrors."""
    return from_mappings((cls,), data, source)[0]


def from_mappings(classes: tuple[type, ...], data: dict[str, Any], source: str = "config") -> tuple:
    """One mapping (a YAML file) into several dataclasses at once, e.g. (RunConfig, RunOptions):
    each key goes to the class with that field (the first, if several have it); a key that none
    of them has is an error naming every known key; wrong types and non-finite floats too."""
    known = [_field_names(c) for c in classes]
    parts: list[dict[str, Any]] = [{} for _ in classes]
    seen: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key in seen:  # `segment_size` and `segment-size` both given
            raise UsageError(f"{source}: key {short(raw_key)} repeats {short(seen[key])}; give it once")
        seen[key] = raw_key
        i = next((i for i, names in enumerate(known) if key in names), None)
        if i is None:
            names = sorted({n for k in known for n in k})
            raise UsageError(f"{source}: unknown key {short(raw_key)}; known keys: {', '.join(names)}")
        parts[i][key] = _checked(key, raw_key, value, known[i][key], source)
    return tuple(c(**p) for c, p in zip(classes, parts))


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors and aliases (`&a`, `*a`: an alias bomb expands
    exponentially in whatever walks the result), with a bounded nesting depth (deep nesting
    otherwise ends in RecursionError) and no repeated keys (PyYAML keeps the last silently)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused("anchors and aliases (&name, *name) are not supported; write the values out", event.start_mark)
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _Refused(f"nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            keys = set()
            for key_node, _ in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key is not None and key in keys and key != "<<":
                    raise _Refused(f"key {short(key)} appears twice", key_node.start_mark)
                keys.add(key)
        return super().construct_mapping(node, deep=deep)


class _Refused(yaml.YAMLError):
    def __init__(self, problem: str, mark):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


def parse_yaml(text: str, name: str = "config") -> Any:
    """Parse YAML text with the restricted loader; a UsageError (exit 2) names the problem and line."""
    try:
        loader = _ConfigLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except _Refused as e:
        raise UsageError(f"{name} line {e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None)
        raise UsageError(f"malformed YAML in {name}{where}" + (f": {problem}" if problem else "")) from None
    except RecursionError:  # a parser path the depth bound does not cover
        raise UsageError(f"malformed YAML in {name}: nested too deeply") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file of option: value, read with `parse_yaml` (at most MAX_YAML_BYTES)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"config file not found: {p}") from None
    except (IsADirectoryError, PermissionError, OSError) as e:
        raise UsageError(f"cannot read config file {p}: {e.strerror or e.__class__.__name__}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise UsageError(f"config file {p} is larger than {MAX_YAML_BYTES >> 20} MiB; a config is a short YAML mapping")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {p}: not UTF-8 (byte {e.start})") from None
    data = parse_yaml(text, str(p))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{p}: top level must be a mapping of option: value")
    return data


def resolve(cls, config_file: str | Path | None, overrides: dict[str, Any]):
    """YAML file (if any), then CLI overrides that were given (not None)."""
    return resolve_many((cls,), config_file, overrides)[0]


def resolve_many(classes: tuple[type, ...], config_file: str | Path | None, overrides: dict[str, Any]) -> tuple:
    """Several dataclasses from one YAML file (see `from_mappings`), then the CLI options that were
    given (not None), each to the class with that field. A flag must be None when not given (an
    Optional[bool] option), or its default would override the YAML."""
    data = load_yaml(config_file) if config_file else {}
    bases = from_mappings(classes, data, str(config_file)) if config_file else tuple(c() for c in classes)
    stray = set(overrides) - {f.name for c in classes for f in fields(c)}
    if stray:
        raise ValueError(f"options {sorted(stray)} are fields of none of {[c.__name__ for c in classes]}")
    out = []
    for base in bases:
        names = {f.name for f in fields(base)}
        given = {k: v for k, v in overrides.items() if v is not None and k in names}
        out.append(dataclasses.replace(base, **given))
    return tuple(out)


def explicit_keys(cls, config_file: str | Path | None, overrides: dict[str, Any]) -> set[str]:
    """Options the user set: CLI options given, and YAML keys whose value differs from the
    built-in default (restating a default, as configs/default.yaml does, sets nothing)."""
    given = {k for k, v in overrides.items() if v is not None}
    if config_file:
        defaults = cls()
        for raw_key, value in load_yaml(config_file).items():
            key = str(raw_key).replace("-", "_")
            if getattr(defaults, key, object()) != value:
                given.add(key)
    return given


