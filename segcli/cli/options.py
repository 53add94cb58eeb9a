"""What every command does with its options: typed configs from the YAML file and the options given,
and the progress bar on stderr."""

from __future__ import annotations

import dataclasses
import inspect
import os
import stat
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from rich.text import Text
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


LINE_EVERY_S = 10.0  # LineProgress: seconds between its lines


def stdout_is_pipe() -> bool:
    """Whether stdout is a pipe or socket (`segcli run doc | jq`): what goes down it may come out on this terminal."""
    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (AttributeError, ValueError, OSError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class LineProgress(Progress):
    """Progress on a terminal whose records go down a pipe (`segcli run doc | jq`): the other end may print them on
    this same terminal, where a redrawn bar would share their lines (rich moves the cursor back over what it drew
    last, and over what they printed). Instead a whole line on stderr every LINE_EVERY_S seconds of work, which
    their lines can only come before or after. The tasks are kept as rich keeps them; nothing is drawn live."""

    def __init__(self, *columns: Any, in_bytes: bool = False, **kwargs: Any):
        super().__init__(*columns, **{**kwargs, "disable": True})
        self.in_bytes = in_bytes
        self._last = time.monotonic()

    def update(self, task_id: Any, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        now = time.monotonic()
        if now - self._last >= LINE_EVERY_S:
            self._last = now
            self.console.print(self.line(self._tasks[task_id]), markup=False, highlight=False, soft_wrap=True)

    def line(self, task: Any) -> str:
        def amount(n: float) -> str:
            return f"{n / 1e6:,.1f} MB" if self.in_bytes else f"{n:,.0f}"

        done = amount(task.completed) + (f" of {amount(task.total)} ({task.completed / task.total:.0%})"
                                         if task.total else "")
        rate = task.fields.get("rate") or ""
        what = Text.from_markup(task.description).plain  # as the bar shows it (descriptions are escaped markup)
        return f"segcli: {what}: {done}" + (f", {rate}" if rate else "") + f", {task.elapsed or 0:,.0f} s"


def make_progress(quiet: bool, total: int | None, in_bytes: bool = False) -> Progress:
    """The progress bar on stderr: on a terminal only (elsewhere rich draws nothing but ends with a blank line); a
    line every few seconds instead where stdout is a pipe (`LineProgress`). `in_bytes`: the count is the input's
    bytes (shown as 1.2/24.0 MB), else items (segments, tokens)."""
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
               DownloadColumn() if in_bytes else MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
    live = not quiet and err_console.is_terminal
    if live and stdout_is_pipe():
        return LineProgress(*columns, in_bytes=in_bytes, console=err_console)
    return Progress(*columns, console=err_console, transient=True, disable=not live)


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
