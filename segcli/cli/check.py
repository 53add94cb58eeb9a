"""`segcli check`: does segcli stream this model exactly? Streamed runs against one plain forward of the model."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.text import Text

from ..config import CHECK_SEGMENT_SIZES, CHECK_TOKENS
from ..errors import UsageError
from ..memory import POLICY_NAMES
from .common import (
    CompressedOpt, ConfigOpt, DebugOpt, DeviceOpt, ErrorsOpt, MemorySizeOpt, QuietOpt, default,
    RateOpt, RevisionOpt, SegmentSizeOpt, SinkOpt, ThreadsOpt, TrustOpt, handle_errors, say, value,
)
from .options import build_config, make_progress
from .output import PipeConsole, default_format, new_table, stdout_stream

if TYPE_CHECKING:
    from ..engine.check import CheckReport

VERDICT_STYLE = {"exact": "green", "differs": "bold red", "refused": "yellow"}
SHORT = {"memory_size": "n_c", "sink_tokens": "n_sink", "compress_rate": "c", "compressed_size": "n_cm"}


def check(
    doc: Annotated[Optional[str], typer.Argument(metavar="DOC",
        help="Text to stream (default: the start of a sample document); '-' reads stdin.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", metavar="DIR|ID", help="Hugging Face model directory or hub id to check (required, here or in "
                                               "--config: the bundled model is segcli's own, with no plain forward of "
                                               "another library to compare with).")] = None,
    memory: Annotated[Optional[str], typer.Option(
        metavar="POLICY", help=f"Memory policy to check besides full ({', '.join(POLICY_NAMES)}). {default('memory')}")] = None,
    segment_size: SegmentSizeOpt = None,
    memory_size: MemorySizeOpt = None,
    sink_tokens: SinkOpt = None,
    compress_rate: RateOpt = None,
    compressed_size: CompressedOpt = None,
    max_tokens: Annotated[int, typer.Option(metavar="N", help="Tokens of the text to stream.")] = CHECK_TOKENS,
    segment_sizes: Annotated[str, typer.Option(
        metavar="N,...", help="Segment sizes of the full-memory runs, comma-separated.")] = (
        ",".join(map(str, CHECK_SEGMENT_SIZES))),
    attn_implementation: Annotated[Optional[str], typer.Option(
        metavar="eager|sdpa", help="The attention to check. [default: the one transformers picks for the model]")] = None,
    device: DeviceOpt = None,
    dtype: Annotated[Optional[str], typer.Option(
        metavar="DTYPE", help="float32 (exact comparisons), bfloat16 or float16. [default: float32]")] = None,
    config: ConfigOpt = None,
    format: Annotated[Optional[str], typer.Option(
        "--format", "-f", metavar="table|json", help="table or json. [default: table on a terminal, json in a pipe]")] = None,
    errors: ErrorsOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check that segcli streams a Hugging Face model exactly: its text streamed under full memory at several segment sizes, and under the given policy where the README's exact equivalences (section "Memory policies") apply (fifo at segment size 1 = a sliding window within the model's own windows, xl = fifo with n_c = n_s, a memory larger than the text = full), each against one plain forward of the model's own attention.

    Prints each setting's delta NLL and max |delta logit| and a verdict; exit 0 when exact, 1 when it differs, 2 when refused. See the README's section "Using your own model"."""
    _check(**locals())


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--segment-sizes must be positive integers separated by commas, got {text!r}")
    return sizes


@handle_errors
def _check(doc, max_tokens, segment_sizes, attn_implementation, format, config, quiet, debug, **options):
    stdout = stdout_stream(has_output_option=False)
    fmt = format or ("table" if default_format(None, None) == "table" else "json")
    if fmt not in ("table", "json"):
        raise UsageError(f"--format must be table or json, got {fmt!r}")
    if attn_implementation not in (None, "eager", "sdpa"):
        raise UsageError(f"--attn-implementation must be eager or sdpa, got {attn_implementation!r}")
    if max_tokens < 2:
        raise UsageError(f"--max-tokens must be at least 2, got {max_tokens}")
    sizes = _sizes(segment_sizes)
    options = {k: value(v) for k, v in options.items()}
    options["dtype"] = options.get("dtype") or "float32"
    cfg = build_config(config, check_apply=True, **options)
    if cfg.model is None:
        raise UsageError("segcli check needs --model DIR or a hub id of a Hugging Face model: the bundled model is "
                         "segcli's own, with no plain forward of another library to compare with")
    from ..backends import load_backend  # torch and transformers: once the options are checked, never for --help
    from ..documents import Document, tokenize
    from ..engine.check import check as run_check, sample_text
    from ..reader import Reader

    reader = Reader(cfg.errors, max_tokens)
    source = None
    if doc is not None:
        (source,) = reader.sources([doc])
        reader.check([source])
    backend = load_backend(cfg, guard=False)  # check measures the difference itself
    if not hasattr(backend, "reference_logits"):  # the HF and recurrent backends have a plain forward to compare with
        raise UsageError(f"segcli check compares Hugging Face models with their own plain forward; the {backend.kind} "
                         "backend is not one (pass --model DIR of a transformers checkpoint)")
    if attn_implementation:
        if not hasattr(backend, "use_attention_implementation"):
            raise UsageError(f"--attn-implementation: the {backend.kind} backend runs the attention its model loads with")
        backend.use_attention_implementation(attn_implementation)
    if source is not None:
        tdoc = reader.tokenized(source, backend)
    else:
        text = sample_text()
        tdoc = tokenize(Document("sample", text, len(text.encode("utf-8"))), backend.tokenizer,
                        backend.bos_id).truncated(max_tokens, text)
    if len(tdoc) < 2:
        raise UsageError(f"{tdoc.name}: needs at least 2 tokens to check, got {len(tdoc)}")
    with make_progress(quiet, None) as progress:  # on a terminal: which setting, of how many
        task = progress.add_task("check", total=None, rate="")

        def on_setting(i: int, total: int, policy: str, ns: int) -> None:
            progress.update(task, total=total, completed=i, description=escape(f"check {i + 1}/{total}: {policy} "
                                                                                f"n_s={ns}"))

        report = run_check(backend, tdoc, cfg, sizes, on_setting=on_setting)
    if not quiet:
        for note in report.notes:
            say(f"note: {note}")
    if fmt == "json":
        stdout.write(json.dumps(report.record(), indent=1) + "\n")
    else:
        render(report, PipeConsole(file=stdout))
    stdout.flush()
    raise typer.Exit(report.exit_code)


def render(report: CheckReport, console) -> None:
    table = new_table(f"segcli check: {report.family} ({report.attn_implementation} attention, {report.dtype}; "
                      f"layers: {report.layers}), {report.tokens} tokens", [
        ("memory", "left"), ("n_s", "right"), ("sizes", "left"), ("compared with", "left"), ("dNLL", "right"),
        ("max |dlogit|", "right"), ("verdict", "left")])
    for s in report.settings:
        sizes = " ".join(f"{SHORT.get(k, k)}={v}" for k, v in s.sizes.items()) or "-"
        table.add_row(s.policy, str(s.segment_size), sizes, s.reference,
                      f"{s.delta_nll:+.1e}" if s.delta_nll is not None else "-",
                      f"{s.max_dlogit:.1e}" if s.max_dlogit is not None else "-",
                      Text(s.verdict, style=VERDICT_STYLE[s.verdict]))
    console.print(table)
    for s in report.settings:
        if s.reason:
            console.print(f"refused: {s.reason}", markup=False, highlight=False, soft_wrap=True)
    console.print(Text.assemble("verdict: ", (report.verdict, VERDICT_STYLE[report.verdict])), highlight=False)
