"""`segcli policies`: the memory policies, their update rule and parameters."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..config import RunConfig
from ..memory import REGISTRY
from .common import Format
from .output import new_table


def policies(format: Annotated[Optional[Format], typer.Option("--format", "-f", help="table or jsonl.")] = None) -> None:
    """List the memory policies, their update rule, parameters and memory bound."""
    defaults = RunConfig().sizes()
    rows = []
    for name, cls in REGISTRY.items():
        rows.append({"type": "policy", "name": name, "rule": cls.rule, "parameters": list(cls.parameters),
                     "defaults": {k: defaults[k] for k in cls.parameters}, "bound": cls.size_rule})
    fmt = (format.value if format else None) or ("table" if sys.stdout.isatty() else "jsonl")
    if fmt == "table":
        table = new_table("memory policies", [("policy", "left"), ("update rule", "left"), ("parameters", "left"), ("size", "left")])
        for r in rows:
            table.add_row(r["name"], r["rule"], ", ".join(r["parameters"]) or "-", r["bound"])
        Console().print(table)
    elif fmt == "json":
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(json.dumps(r))
