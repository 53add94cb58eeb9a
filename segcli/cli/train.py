"""`segcli train`: train the native model with segment-level recurrence."""

from __future__ import annotations

import json
import re
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import UsageError
from ..config import MAX_THREADS
from .common import DebugOpt, DeviceOpt, QuietOpt, ThreadsOpt, err_console, handle_errors, value
from .options import use_threads


def train(
    config: Annotated[Optional[str], typer.Option(
        "--config", "-c", metavar="FILE", help="Training YAML; examples: the bundled model's stages in "
                                               "experiments/bundled-model/ (their corpus: scripts/build_corpus.py).")] = None,
    corpus: Annotated[Optional[str], typer.Option(
        metavar="DIR", help="Folder of .txt files (overrides the YAML). [default: the YAML's, else corpus/train]")] = None,
    out_dir: Annotated[Optional[str], typer.Option(
        metavar="DIR", help="Where checkpoints and the final model go. [default: the YAML's, else runs/seglm]")] = None,
    steps: Annotated[Optional[int], typer.Option(
        metavar="N", help="Optimizer steps (overrides the YAML and turns off max_minutes time fitting). "
                          "[default: the YAML's, else 1000]")] = None,
    seed: Annotated[Optional[int], typer.Option(metavar="N", help="Random seed. [default: the YAML's, else 0]")] = None,
    device: DeviceOpt = None,
    init_from: Annotated[Optional[str], typer.Option(
        metavar="DIR", help="Start from this saved model folder, or bundled (overrides the YAML). "
                            "[default: the YAML's, else a fresh model]")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from out_dir/checkpoint.pt.")] = False,
    log_jsonl: Annotated[Optional[str], typer.Option(
        metavar="FILE", help="Also append every step as JSON to this file.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE",
                    help="Set any training-config key (value read as YAML; a dotted key sets a nested one), "
                         "e.g. --set batch_size=128 --set tasks.copy.prob=0.5; repeatable.")] = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train the native model (memory carried across segments, policies drawn per step) and save
    it with save_pretrained; the result loads with `segcli run --model OUT_DIR/model`."""
    _train(**locals())


SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # a number YAML 1.2 reads as a float


def parse_settings(items: list[str]) -> dict:
    """["key=value", ...] -> {key: value read as YAML} (a dotted key stays dotted: segcli.train.config applies it)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        try:
            v = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f"--set {item!r}: the value is not valid YAML") from None
        if isinstance(v, str) and SCIENTIFIC.fullmatch(v):  # YAML 1.1 reads 3e-4 (no dot) as a string
            v = float(v)
        out[key.strip()] = v
    return out


@handle_errors
def _train(config, corpus, out_dir, steps, seed, device, init_from, resume, log_jsonl, set_, threads, quiet, debug):
    from ..backends import resolve_device
    from ..train import load_train_config, train as run_training  # heavy imports only when training

    cfg = load_train_config(config, {"corpus": corpus, "out_dir": out_dir, "steps": steps, "seed": seed, "device": value(device),
                                       "init_from": init_from}, parse_settings(set_ or []))
    resolve_device(cfg.device)  # --device cuda (or device: cuda) without a GPU: exit 2 before anything is written
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"--threads must be an integer from 1 to {MAX_THREADS}, got {threads}")
    n_threads = use_threads(threads)
    log = open(log_jsonl, "a", encoding="utf-8") if log_jsonl else None
    progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                        disable=quiet or not err_console.is_terminal)  # elsewhere: the messages, no bar
    try:
        with progress:
            task = progress.add_task("train", total=cfg.steps, info="")
            for ev in run_training(cfg, resume=resume):
                if log:
                    log.write(json.dumps({"event": ev.kind, "step": ev.step, **ev.data}) + "\n")
                    log.flush()
                if ev.kind == "start":
                    progress.update(task, total=ev.data["steps"], completed=ev.step)
                    if not quiet:
                        err_console.print(f"training {ev.data['params']:,} parameters on {ev.data['tokens']:,} tokens "
                                          f"({ev.data['device']}, {n_threads} threads)", markup=False)
                elif ev.kind == "step":
                    progress.update(task, completed=ev.step, total=ev.data["steps"],
                                    info=escape(f"loss {ev.data['loss']:.3f} {ev.data['policy']} n_s={ev.data['segment_size']}"))
                elif ev.kind == "val" and not quiet:
                    progress.console.print(f"step {ev.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.data.items()),
                                           markup=False)
                elif ev.kind == "done" and not quiet:
                    err_console.print(f"saved {ev.data['model_dir']} after {ev.data['seconds']:.0f} s", markup=False)
    finally:
        if log:
            log.close()
