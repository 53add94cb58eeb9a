"""What every command does with its options: typed configs from the YAML file and the options given,
and the progress bar on stderr."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..config import RunConfig, explicit_keys, resolve_many
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
    return (cfg, *out[1:])


def build_config(config: str | None, check_apply: bool = False, **options: Any) -> RunConfig:
    """The RunConfig alone (see `build_configs`)."""
    return build_configs(config, options, check_apply=check_apply)[0]


def make_progress(quiet: bool, total: int | None) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, transient=True, disable=quiet,
    )
