"""`segcli policies`: the memory policies, their update rule and parameters, and what each does to which layer kind.

Attention layers (every layer of a transformer, the attention layers of a hybrid) keep what the policy's rule keeps.
Recurrent layers (Mamba, RWKV, xLSTM, gated delta nets, the recurrent layers of hybrids) keep their own fixed-size
state, updated by the layer itself once per segment: every policy but `none` carries it to the next segment, and
`none` resets it (README: "Recurrent and hybrid models").
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..config import RunConfig
from ..memory.catalog import CATALOG, POLICY_ON_ATTENTION  # torch-free: listing the policies loads no model code
from .common import DebugOpt, Format, handle_errors
from .output import PipeConsole, Writer, default_format, new_table


def policies(
    format: Annotated[Optional[Format], typer.Option(
        "--format", "-f", help="Output format. [default: table on a terminal, jsonl in a pipe]")] = None,
    debug: DebugOpt = False,
) -> None:
    """List the memory policies, their update rule, parameters and memory bound, and what each does to the
    recurrent layers (Mamba, RWKV, xLSTM, ...) and to the attention layers of hybrid models."""
    _policies(format.value if format else None, debug=debug)


def recurrent_rule(name: str) -> str:
    """What policy `name` does to a recurrent layer's state (conv window and SSM / linear-attention / RNN state)."""
    return "state reset at every segment" if name == "none" else "state carried (the layer's own update)"


def sliding_rule(name: str) -> str:
    """What policy `name` does to a transformer's sliding-window and chunked layers (segcli.hf)."""
    if name == "full":
        return "the last window - 1 pairs, as transformers' own cache keeps"
    if name == "none":
        return "the segment alone"
    if name in ("fifo", "xl"):
        return "the newest of its pairs that the window reaches"
    if name in ("sink", "average", "compressive"):
        return "only the newest run of exact pairs the window reaches (moved sinks and pooled slots are not read)"
    if name == "linear":
        return "refused (the linear memory summarises tokens past the window)"
    return "refused (slots chosen by content cannot be placed inside a window)"


def hybrid_rule(name: str) -> str:
    """What policy `name` does to the attention layers of a hybrid (recurrent + attention) model."""
    if name == "full":
        return "the model's own key-value cache"
    if name in POLICY_ON_ATTENTION:
        return "the segment alone"
    if name == "linear":
        return "refused (segcli's attention function does not run on hybrids)"
    if name in ("tova", "h2o", "snapkv"):
        return ("as on a transformer, under eager attention (refused where the attention modules hand no "
                "probabilities on: zamba, zamba2)")
    return "as on a transformer (segcli's policy layers, the model's own attention)"


def policies_table(rows: list[dict]) -> Table:
    """The `policy` records as one table (their text as text: `[memory; segment]` is not markup)."""
    table = new_table("memory policies", [("policy", "left"), ("update rule (attention layers)", "left"),
                                          ("parameters", "left"), ("size", "left"),
                                          ("sliding / chunked layers", "left"), ("recurrent layers", "left"),
                                          ("hybrids' attention layers", "left")])
    for r in rows:
        table.add_row(r["name"], r["rule"], ", ".join(r["parameters"]) or "-", r["bound"], r["sliding_layers"],
                      r["recurrent_layers"], r["hybrid_attention_layers"])
    return table


def policy_records() -> list[dict]:
    """One `policy` record per registered policy: its rule, parameters and their defaults, bound, and layer kinds."""
    defaults = RunConfig().sizes()
    return [{"type": "policy", "name": name, "rule": p.rule, "parameters": list(p.parameters),
             "defaults": {k: defaults[k] for k in p.parameters}, "bound": p.size_rule,
             "sliding_layers": sliding_rule(name), "recurrent_layers": recurrent_rule(name),
             "hybrid_attention_layers": hybrid_rule(name)} for name, p in CATALOG.items()]


@handle_errors
def _policies(format: str | None, debug: bool = False) -> None:
    rows = policy_records()
    fmt = default_format(format, None)
    writer = Writer("csv" if fmt == "csv" else "jsonl", None, has_output_option=False)  # stdout; closed stdout: one line, exit 2
    if fmt == "table":
        PipeConsole(file=writer.stream).print(policies_table(rows))
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
