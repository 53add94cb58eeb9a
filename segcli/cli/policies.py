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
        p = cls(**defaults)
        bound = {"full": "grows with the document", "xl": "segment_size", "linear": "d_k x d_v per head"}.get(
            name, " + ".join(cls.parameters) if cls.parameters else str(p.capacity(1)))
        rows.append({"type": "policy", "name": name, "rule": cls.rule, "parameters": list(cls.parameters), "bound": bound})
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
