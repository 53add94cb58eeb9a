"""Does segcli stream this model exactly? Streamed runs against one plain forward of the model itself.

    report = check(backend, doc, cfg)          # doc: a TokenizedDocument; cfg: the policy to check
    report.verdict                             # "exact" | "differs" | "refused"

Each `Setting` streams the document's tokens through the backend's memory at one segment size and compares the
logits and the summed NLL with one plain forward of the same model, where DESIGN §1 gives an equivalence:

- `full` at every segment size = the plain forward;
- `fifo` (n_c) at any segment size = the plain forward with each query seeing the n_c tokens before its
  segment and its own segment (at n_s = 1: a sliding window of n_c + 1), intersected with the model's own
  windows; `xl` = the same with n_c = n_s; `none` = each segment alone;
- every bounded policy with a memory larger than the text = the plain forward.

The plain forward is masked through transformers' own mask functions (`segcli.hf.extra_mask`), so the model's
sliding windows, chunks, softcapping, sinks and position biases are those of the model. Policies with no such
equivalence (average, linear) are checked for refusal only. Nothing here prints.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..backends import Backend
from ..config import CHECK_SEGMENT_SIZES, CHECK_TOKENS, RunConfig
from ..documents import TokenizedDocument
from ..errors import SegcliError, UsageError
from .loop import stream
from .stream import pass_stepper

from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "sample_docs" / "python_docs.txt"  # in a source checkout
FILLER = (  # the sample when segcli is installed without its sample documents
    "A segment of text is read by the model one piece at a time. Each piece attends to what the memory kept of "
    "the earlier pieces, and to itself. When the memory keeps every earlier key and value, the result must be "
    "the same as reading the whole text at once; when it keeps only the newest ones, the result must be the same "
    "as reading the text with a window that hides the older ones. These are the equivalences this check tests, "
    "on the user's own model, before any number from a longer run is trusted. The text itself matters little: "
    "it only has to be long enough that windows, chunks and memories are crossed several times over.\n")
DEFAULT_TOKENS = CHECK_TOKENS  # the check's text: the first tokens of the sample (in config: --help reads it)
SEGMENT_SIZES = CHECK_SEGMENT_SIZES  # full's segment sizes: token by token, odd, and longer than a short window
SMALL_MEMORY = 16  # fifo's memory when the user's is larger than the text (so that eviction happens)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}  # relative: |dNLL| / |NLL| and max |dlogit| / max |logit|
LOW_PRECISION_TOLERANCE = 2e-2  # bfloat16, float16: kernels that accumulate in another order differ this much


@dataclass
class Setting:
    """One streamed run against the plain forward that DESIGN §1 says it equals."""

    policy: str
    segment_size: int
    sizes: dict[str, int]  # the policy's size options in this run
    reference: str  # what it is compared with: "plain" = one plain forward of the model, masked as described
    verdict: str  # "exact" | "differs" | "refused"
    tokens: int = 0
    nll: float | None = None  # summed NLL streamed, nats
    reference_nll: float | None = None  # summed NLL of the plain forward
    delta_nll: float | None = None  # nll - reference_nll
    max_dlogit: float | None = None  # max |streamed logit - plain logit|
    reason: str | None = None  # why it was refused (one line)


@dataclass
class CheckReport:
    model: str
    family: str
    attn_implementation: str
    dtype: str
    tokens: int
    policy: str
    layers: str = ""  # the attention layer kinds segcli found, e.g. "2 sliding (window 4096), 1 full"
    settings: list[Setting] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why

    @property
    def verdict(self) -> str:
        """differs if any setting differs, else refused if any was refused, else exact."""
        kinds = {s.verdict for s in self.settings}
        return "differs" if "differs" in kinds else "refused" if "refused" in kinds else "exact"

    @property
    def exit_code(self) -> int:
        return {"exact": 0, "differs": 1, "refused": 2}[self.verdict]

    def record(self) -> dict[str, Any]:
        return {"type": "check", **{k: v for k, v in dataclasses.asdict(self).items()}, "verdict": self.verdict}


def sample_text() -> str:
    """The default text of a check: the start of sample_docs/python_docs.txt, else a filler paragraph."""
    try:
        return SAMPLE.read_text(encoding="utf-8")[:8000]
    except OSError:
        return FILLER * 8


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)


def plan(cfg: RunConfig, n: int, segment_sizes=SEGMENT_SIZES) -> tuple[list[tuple[str, int, dict, str]], list[str]]:
    """The settings to run for cfg's policy on n tokens: (policy, segment size, sizes, reference), and notes."""
    full = [("full", s, {}, "plain") for s in segment_sizes]
    big = {"memory_size": n + 1, "sink_tokens": cfg.sink_tokens, "compress_rate": cfg.compress_rate,
           "compressed_size": cfg.compressed_size, "layer_budget": "uniform"}  # n + 1 slots in every layer
    p, nc = cfg.memory, cfg.memory_size
    ns = cfg.segment_size if cfg.segment_size < n else min(8, n)  # a segment the text has several of
    out, notes = list(full), []
    if p == "fifo":
        c = nc if nc < n else min(SMALL_MEMORY, max(1, n // 4))  # a memory the text overflows
        if nc >= n:
            notes.append(f"fifo: --memory-size {nc} holds the whole text; checked with {c} slots instead")
        for s in sorted({1, ns}):
            out.append(("fifo", s, {"memory_size": c}, f"plain, {c} tokens before the segment"))
        out.append(("fifo", ns, {"memory_size": n + 1}, "plain (memory larger than the text)"))
    elif p == "xl":
        for s in sorted({7, ns}):
            out.append(("xl", s, {}, "plain, the previous segment"))
    elif p == "none":
        for s in sorted({7, ns}):
            out.append(("none", s, {}, "plain, each segment alone"))
    elif p in ("sink", "compressive"):
        sizes = {k: big[k] for k in cfg.policy().parameters}
        out.append((p, ns, sizes, "plain (memory larger than the text)"))
    elif p != "full":
        out.append((p, ns, {k: getattr(cfg, k) for k in cfg.policy().parameters}, "refusal only"))
        notes.append(f"{p}: it has no equivalence to a plain forward (README, 'Memory policies'); only whether segcli "
                     "refuses it on this model is checked")
    return out, notes


def mask_rule(cfg: RunConfig, n: int) -> tuple[str, int, int] | None:
    """What the plain forward masks beyond the model's own masks, as (policy, segment size, memory size) for
    `segcli.hf.visible_in_stream`; None: nothing (full, or a memory larger than the n tokens)."""
    if cfg.memory in ("xl", "none"):
        return (cfg.memory, cfg.segment_size, cfg.segment_size)
    if cfg.memory == "fifo" and cfg.memory_size < n:
        return ("fifo", cfg.segment_size, cfg.memory_size)
    return None


def check(backend: Backend, doc: TokenizedDocument, cfg: RunConfig, segment_sizes=SEGMENT_SIZES,
          on_setting: Callable[[int, int, str, int], None] | None = None) -> CheckReport:
    """Stream `doc` under `full` at `segment_sizes` and under cfg's policy where it has an equivalence to a plain
    forward, each against one plain forward of the model, streamed as `segcli run` streams (its token and segment
    passes included). `on_setting(i, total, policy, segment size)` is called before each setting (progress).
    Raises UsageError when the backend cannot take a plain forward."""
    if not hasattr(backend, "reference_logits"):
        raise UsageError(f"segcli check compares Hugging Face models with their own plain forward; the {backend.kind} "
                         "model's equivalences are segcli's test suite (pass --model DIR)")
    n = len(doc)
    ids = torch.tensor(doc.input_ids, dtype=torch.long, device=backend.device)[None]  # (1, N)
    targets = torch.tensor(doc.target_ids, dtype=torch.long, device=backend.device)
    settings, notes = plan(cfg, n, segment_sizes)
    report = CheckReport(model=backend.identity.get("model", ""), family=backend.identity.get("model_type", ""),
                         attn_implementation=backend.identity.get("attn_implementation", ""),
                         dtype=str(backend.dtype).removeprefix("torch."), tokens=n, policy=cfg.memory,
                         layers=backend.identity.get("attention_layers", ""), notes=notes)
    references: dict[Any, torch.Tensor | None] = {}
    tol = tolerance(backend.dtype)
    for i, (policy, ns, sizes, described) in enumerate(settings):
        if on_setting is not None:
            on_setting(i, len(settings), policy, ns)
        run_cfg = dataclasses.replace(cfg, memory=policy, segment_size=ns, **sizes)
        setting = Setting(policy, ns, sizes, described, "exact", tokens=n)
        try:
            logits = _streamed(backend, run_cfg, ids)
        except UsageError as e:
            setting.verdict, setting.reason = "refused", str(e)
            report.settings.append(setting)
            continue
        if described == "refusal only":
            continue
        rule = mask_rule(run_cfg, n)
        if rule not in references:
            references[rule] = backend.reference_logits(ids, rule)
        ref = references[rule]
        if ref is None:
            setting.verdict = "refused"
            setting.reason = (f"{report.family}: builds no masks through transformers' mask interface, so no plain "
                              f"forward can be masked as a {policy} stream is")
            report.settings.append(setting)
            continue
        nll = float(F.cross_entropy(logits.double(), targets, reduction="sum"))  # float64: a float32 sum rounds
        ref_nll = float(F.cross_entropy(ref.double(), targets, reduction="sum"))  # away differences of 1e-5
        dlogit = float((logits.float() - ref.float()).abs().max())
        scale = max(1.0, float(ref.float().abs().max()))
        setting.nll, setting.reference_nll, setting.delta_nll, setting.max_dlogit = nll, ref_nll, nll - ref_nll, dlogit
        exact = math.isfinite(nll) and abs(nll - ref_nll) <= tol * max(1.0, abs(ref_nll)) and dlogit <= tol * scale
        setting.verdict = "exact" if exact else "differs"
        report.settings.append(setting)
    return report


@torch.inference_mode()
def _streamed(backend: Backend, cfg: RunConfig, ids: torch.Tensor) -> torch.Tensor:
    """(N, V) logits of ids streamed at cfg.segment_size through a fresh memory under cfg's policy."""
    memory = backend.new_memory(cfg)
    step, size = pass_stepper(backend, memory, cfg.segment_size)  # as `segcli run` streams: passes where they exist
    segments = ((ids[:, s : s + size], s) for s in range(0, ids.shape[1], size))
    try:
        return torch.cat([s.logits[0] for s in stream(step, memory, segments)], 0)
    except SegcliError:
        raise
    except (RuntimeError, ValueError, IndexError) as e:  # the model's forward failed on this memory: not streamable
        line = (str(e).splitlines() or [""])[0][:120]
        raise UsageError(f"{backend.identity.get('model_type')}: its forward fails under --memory {cfg.memory} "
                         f"({type(e).__name__}: {line})") from None
