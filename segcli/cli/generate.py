"""`segcli generate`: stream a document through the memory, then continue it."""

from __future__ import annotations

import json
import math
from typing import Any, Annotated

import typer

from ..errors import UsageError
from .common import PolicyOpt, SegmentSizeOpt, handle_errors
from .options import RUN_OPTIONS, arguments, build_config, make_progress, shared_options
from .output import stdout_stream


@shared_options(*RUN_OPTIONS)
def generate(
    doc: Annotated[str, typer.Argument(metavar="DOC", help="Document to continue; '-' reads stdin.", show_default=False)],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", metavar="N", help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    format: Annotated[str, typer.Option("--format", "-f", metavar="text|json", help="text or json.")] = "text",
    max_prompt_tokens: Annotated[int | None, typer.Option(
        "--max-prompt-tokens", metavar="N",
        help="Read only the last N tokens of DOC.", show_default="the whole document")] = None,
    memory: PolicyOpt = None,
    segment_size: SegmentSizeOpt = None,
    **options: Any,
) -> None:
    """Stream DOC through the memory, then continue it by sampling; the text goes to stdout."""
    _generate(**arguments(locals()))


@handle_errors
def _generate(doc, max_new_tokens, temperature, top_p, format, max_prompt_tokens, config, quiet, debug, **options):
    stdout = stdout_stream(has_output_option=False)  # a closed stdout: one line, exit 2, before any work
    if format not in ("text", "json"):
        raise UsageError(f"--format must be text or json, got {format!r}")
    if max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:  # false for nan too
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise UsageError(f"--max-prompt-tokens must be >= 1, got {max_prompt_tokens}")
    cfg = build_config(config, check_apply=True, **options)
    from ..backends import load_backend  # torch and transformers: after the options are checked, not for --help
    from ..engine.generate import GenerateSettings, generate as run_generate
    from ..engine.run import config_block
    from ..reader import Reader

    reader = Reader(cfg.errors)
    (source,) = reader.sources([doc])
    reader.check([source])
    backend = load_backend(cfg)
    tdoc = reader.tokenized(source, backend)
    prompt = tdoc.input_ids + [tdoc.target_ids[-1]]
    if max_prompt_tokens is not None:
        prompt = prompt[-max_prompt_tokens:]  # the end of the document is what the continuation follows
    settings = GenerateSettings(max_new_tokens, temperature, top_p, cfg.seed)
    out: list[int] = []
    shown = ""
    with make_progress(quiet, len(prompt)) as progress:  # on a terminal: the prompt's tokens as they are read
        task = progress.add_task("reading the prompt", total=len(prompt), rate="")

        def on_prompt(done: int, total: int) -> None:
            progress.update(task, completed=done)
            if done >= total:
                progress.remove_task(task)

        tokens = run_generate(backend, prompt, cfg, settings, on_prompt=on_prompt)
        first = next(tokens, None)  # the prompt is read before the first token comes
    for tid in _chain(first, tokens):
        out.append(tid)
        if format == "text":
            full = backend.tokenizer.decode(out)
            if not full.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
                stdout.write(full[len(shown):])
                stdout.flush()
                shown = full
    full = backend.tokenizer.decode(out)
    if format == "text":
        stdout.write(full[len(shown):] + "\n")
    else:
        stdout.write(json.dumps({"type": "generation", "prompt_tokens": len(prompt), "generated_tokens": len(out),
                                 "token_ids": out, "text": full, "temperature": temperature, "top_p": top_p,
                                 "config": config_block(cfg, backend)}, ensure_ascii=False) + "\n")


def _chain(first, rest):
    """The generated ids: the first (taken while the progress bar showed the prompt) and the rest."""
    if first is None:
        return
    yield first
    yield from rest
