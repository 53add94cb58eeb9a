"""Typed run configuration, loaded from YAML and overridden by CLI options.

YAML keys are the CLI option names (`segment_size` or `segment-size`). Unknown
keys and wrong types are errors; the resolved config is written into every
summary so a run can be reproduced.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError
from .memory import POLICY_NAMES, REGISTRY, make_policy

FORMATS = ("table", "jsonl", "json", "csv")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_SIZE = 1 << 24  # largest segment or memory size accepted (16M pairs): larger is a typo, not a plan
SIZE_OPTIONS = ("memory_size", "sink_tokens", "compress_rate", "compressed_size")  # policy-specific options


@dataclass
class RunConfig:
    model: str | None = None  # model directory or hub id; None = the bundled model
    memory: str = "fifo"  # memory policy (segcli policies)
    segment_size: int = 128  # tokens per segment, n_s
    memory_size: int = 512  # FIFO pairs, n_c (fifo, sink, compressive)
    sink_tokens: int = 4  # sink pairs kept for ever (sink)
    compress_rate: int = 4  # pairs pooled into one compressed slot (compressive)
    compressed_size: int = 128  # compressed slots, n_cm (compressive)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    seed: int = 0  # seeds torch (sampling, random init)
    revision: str | None = None  # hub revision (Hugging Face models)
    trust_remote_code: bool = False  # allow a hub model's own code
    errors: str = "strict"  # invalid UTF-8: strict (error) | replace (U+FFFD)

    def sizes(self) -> dict[str, int]:
        """The policy size parameters."""
        return {
            "memory_size": self.memory_size,
            "sink_tokens": self.sink_tokens,
            "compress_rate": self.compress_rate,
            "compressed_size": self.compressed_size,
        }

    def policy(self):
        """The memory policy these options describe (the one place a config becomes a policy)."""
        return make_policy(self.memory, **self.sizes())

    def validate(self) -> "RunConfig":
        if self.memory not in POLICY_NAMES:
            raise UsageError(f"unknown memory policy {self.memory!r}; choose one of: {', '.join(POLICY_NAMES)}")
        for name in ("segment_size", "memory_size", "compress_rate", "compressed_size", "sink_tokens"):
            low = 0 if name == "sink_tokens" else 1
            n = getattr(self, name)
            if not low <= n <= MAX_SIZE:
                raise UsageError(f"--{name.replace('_', '-')} must be an integer from {low} to {MAX_SIZE}, got {n}")
        if self.device not in DEVICES:
            raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.errors not in ("strict", "replace"):
            raise UsageError(f"--errors must be strict or replace, got {self.errors!r}")
        return self

    def check_options_apply(self, explicit: set[str]) -> "RunConfig":
        """Refuse policy options the user set that the chosen policy does not use
        (e.g. --sink-tokens with --memory fifo): they would be silently ignored."""
        uses = REGISTRY[self.memory].parameters
        stray = [k for k in SIZE_OPTIONS if k in explicit and k not in uses]
        if stray:
            names = ", ".join(f"--{k.replace('_', '-')}" for k in stray)
            used = ", ".join(f"--{k.replace('_', '-')}" for k in uses) or "no size options"
            raise UsageError(f"{names} does not apply to --memory {self.memory} (it uses {used}); remove it")
        return self


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
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def from_mapping(cls, data: dict[str, Any], source: str = "config"):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are UsageErrors."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    out = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            raise UsageError(f"{source}: unknown key {raw_key!r}; known keys: {', '.join(sorted(known))}")
        if not _type_ok(value, hints[key]):
            want = getattr(hints[key], "__name__", str(hints[key]))
            raise UsageError(f"{source}: key {raw_key!r} must be {want}, got {type(value).__name__} {value!r}")
        out[key] = float(value) if hints[key] is float else value
    return cls(**out)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file not found: {p}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config file {p}: {e.__class__.__name__}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"malformed YAML in {p}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{p}: top level must be a mapping of option: value")
    return data


def resolve(cls, config_file: str | Path | None, overrides: dict[str, Any]):
    """YAML file (if any), then CLI overrides that were given (not None)."""
    base = from_mapping(cls, load_yaml(config_file), str(config_file)) if config_file else cls()
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **given)


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


