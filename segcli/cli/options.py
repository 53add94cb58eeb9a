"""What every command does with its options: typed configs from the YAML file and the options given,
and the progress bar on stderr."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from rich.progress import (
    BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)

from ..config import RunConfig, default_threads, explicit_keys, resolve_many
from .common import err_console, value

CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(RunConfig))


@dataclass
class OutputOptions:
    """Where and how a command writes its records (also YAML keys)."""

    format: str | None = None  # table | jsonl | json | csv (None: table on a terminal, else jsonl)
    output: str | None = None  # write to this file (atomically) instead of stdout


def build_configs(config: str | None, options: dict[str, Any], *extra: type, check_apply: bool = True) -> tuple:
    """(RunConfig, *extra) from the YAML file and the options given (None: not given), checked; with
    `check_apply`, a policy option the chosen policy does not use is refused. `options` may hold other
    keys (ignored here)."""
    classes = (RunConfig, *extra)
    names = {f.name for c in classes for f in dataclasses.fields(c)}
    given = {k: value(v) for k, v in options.items() if k in names}
    out = resolve_many(classes, config, given)
    cfg = out[0].validate()
    if check_apply:  # e.g. --sink-tokens with --memory fifo
        cfg.check_options_apply(explicit_keys(RunConfig, config, {k: v for k, v in given.items() if k in CONFIG_FIELDS}))
    for o in out[1:]:
        if hasattr(o, "validate"):
            o.validate()
    use_threads(cfg.threads)
    return (cfg, *out[1:])


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op threads before any work: `threads`, else config.default_threads(). Returns the count.
    Every command that computes comes through here (build_configs), so the rule is the same everywhere."""
    import torch

    n = default_threads() if threads is None else threads
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def build_config(config: str | None, check_apply: bool = False, **options: Any) -> RunConfig:
    """The RunConfig alone (see `build_configs`)."""
    return build_configs(config, options, check_apply=check_apply)[0]


def make_progress(quiet: bool, total: int | None, in_bytes: bool = False) -> Progress:
    """The progress bar on stderr: on a terminal only (elsewhere rich draws nothing but ends with a blank line).
    `in_bytes`: the count is the input's bytes (shown as 1.2/24.0 MB), else items (segments, tokens)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(),
        DownloadColumn() if in_bytes else MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, transient=True, disable=quiet or not err_console.is_terminal,
    )


# -- options every command that runs a model shares, written once ----------------------------------------------------

def _shared() -> dict[str, tuple[Any, Any]]:
    from .common import (
        CompressedOpt, ConfigOpt, DebugOpt, DeviceOpt, DTypeOpt, ErrorsOpt, ModelOpt, QuietOpt, RateOpt, RevisionOpt,
        SeedOpt, SinkOpt, ThreadsOpt, TrustOpt, MemorySizeOpt, RecentOpt, WindowOpt, LayerBudgetOpt,
    )

    return {  # name -> (annotation, default)
        "model": (ModelOpt, None), "memory_size": (MemorySizeOpt, None), "sink_tokens": (SinkOpt, None),
        "compress_rate": (RateOpt, None), "compressed_size": (CompressedOpt, None),
        "recent_tokens": (RecentOpt, None), "window": (WindowOpt, None), "layer_budget": (LayerBudgetOpt, None), "device": (DeviceOpt, None),
        "dtype": (DTypeOpt, None), "config": (ConfigOpt, None), "seed": (SeedOpt, None), "errors": (ErrorsOpt, None),
        "revision": (RevisionOpt, None), "trust_remote_code": (TrustOpt, None), "threads": (ThreadsOpt, None), "quiet": (QuietOpt, False),
        "debug": (DebugOpt, False),
    }


MODEL_OPTIONS = ("model", "device", "dtype", "revision", "trust_remote_code", "seed", "errors", "threads")
SIZE_OPTIONS = ("memory_size", "sink_tokens", "compress_rate", "compressed_size", "recent_tokens", "window",
                "layer_budget")
RUN_OPTIONS = (*SIZE_OPTIONS, *MODEL_OPTIONS, "config", "quiet", "debug")  # what run, compare, generate, probe share


def shared_options(*names: str) -> Callable:
    """Add the named shared options (defined once in `_shared`) to a command's signature, after its own.

    The command takes them as `**options`; Typer reads the signature, so `--help` lists them and parses them
    as if they were written out in every command."""
    shared = _shared()

    def add(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)  # real annotations: Typer reads them from __signature__
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in own}
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=shared[n][1], annotation=shared[n][0])
                 for n in names if n not in taken]
        fn.__signature__ = sig.replace(parameters=own + extra)
        return fn

    return add


def arguments(local: dict[str, Any]) -> dict[str, Any]:
    """A command's arguments from its `locals()`: its own parameters and the shared `**options`, flat."""
    return {**{k: v for k, v in local.items() if k != "options"}, **local.get("options", {})}
