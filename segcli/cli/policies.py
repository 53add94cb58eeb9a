"""`segcli policies`: the memory policies, their update rule and parameters."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from ..config import RunConfig
from ..memory import REGISTRY
from .common import DebugOpt, Format, handle_errors
from .output import PipeConsole, Writer, default_format, new_table


def policies(
    format: Annotated[Optional[Format], typer.Option(
        "--format", "-f", help="table (default on a terminal), jsonl (default in a pipe), json or csv.")] = None,
    debug: DebugOpt = False,
) -> None:
    """List the memory policies, their update rule, parameters and memory bound."""
    _policies(format.value if format else None, debug=debug)


@handle_errors
def _policies(format: str | None, debug: bool = False) -> None:
    defaults = RunConfig().sizes()
    rows = []
    for name, cls in REGISTRY.items():
        rows.append({"type": "policy", "name": name, "rule": cls.rule, "parameters": list(cls.parameters),
                     "defaults": {k: defaults[k] for k in cls.parameters}, "bound": cls.size_rule})
    fmt = default_format(format, None)
    writer = Writer("csv" if fmt == "csv" else "jsonl", None)  # stdout; closed stdout: one line, exit 2
    if fmt == "table":
        table = new_table("memory policies", [("policy", "left"), ("update rule", "left"), ("parameters", "left"),
                                              ("size", "left")])
        for r in rows:
            table.add_row(r["name"], r["rule"], ", ".join(r["parameters"]) or "-", r["bound"])
        PipeConsole(file=writer.stream).print(table)
        writer.stream.flush()
    elif fmt == "json":
        writer.stream.write(json.dumps(rows, indent=1) + "\n")
        writer.stream.flush()
    elif fmt == "csv":  # one row per policy; the lists and the defaults as one cell each
        for r in rows:
            writer.write({**r, "parameters": " ".join(r["parameters"]),
                          "defaults": " ".join(f"{k}={v}" for k, v in r["defaults"].items())})
    else:
        for r in rows:
            writer.write(r)
    writer.close(True)
