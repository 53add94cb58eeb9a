"""The family matrix (issue 17): every listed family streams as the model itself computes; others do or are refused.

Each family's tiny random model (tests/hf/hf_families.py: hidden 64, 2-4 layers, initializer_range 0.08, built once
per module from the family's own config class) is saved with the bundled tokenizer, loaded through segcli's own
loader, and run under eager and SDPA attention (where the family has it in the installed transformers). Every
streamed run is compared with one plain forward of the same model over the same 80 tokens (`segcli.engine.check`,
the library behind `segcli check`):

- full at n_s 1, 7, 64 = the plain forward;
- fifo with a memory larger than the text = the plain forward;
- fifo (n_c 6, and 24: past the sliding families' window of 16) at n_s 1 and 8 = the plain forward with each
  query seeing the n_c tokens before its segment, intersected with the model's own windows;
- xl = the same with n_c = n_s; none = each segment alone; sink and compressive with a memory larger than the
  text = the plain forward;

to 1e-4 relative on the summed NLL and 1e-4 on the logits (tests/hf/test_hf_scored.py checks tova, h2o, snapkv and
keynorm eviction for eviction against the native model). The families of EXTRA_FAMILIES (not in the issue's list)
must be exact or refused with one line, never different. Policies without such an equivalence (sink past its
window, average, compressive past its window, linear, tova, h2o, snapkv, keynorm) must stream (finite logits) or be refused with one line.
With SEGCLI_FAMILY_RESULTS=FILE, the outcomes are written to FILE (scripts/family_table.py renders the README).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import transformers

from conftest import BUNDLED_TOKENIZER, SAMPLE
from hf_families import API_FAMILIES, EXTRA_FAMILIES, FAMILIES, record, save_family, write_results
from segcli.backends import load_backend
from segcli.config import RunConfig
from segcli.documents import Document, tokenize
from segcli.engine.check import check
from segcli.errors import UsageError

TOKENS = 80  # five windows of the sliding families, two segments at n_s 64, fifo-24 overflowed twice over
IMPLEMENTATIONS = ("eager", "sdpa")
# (policy, RunConfig fields): the equivalence checks of each policy (check() adds full at n_s 1, 7, 64 to the first)
EXACT = {
    "full": {},
    "fifo": {"memory_size": 6, "segment_size": 8},
    "fifo-24": {"memory_size": 24, "segment_size": 5},
    "xl": {"segment_size": 8},
    "none": {"segment_size": 8},
    "sink": {"sink_tokens": 2, "segment_size": 8},
    "compressive": {"compress_rate": 2, "compressed_size": 4, "segment_size": 8},
}
# policies streamed past their window (no equivalence): they must run or be refused
RUNS = {
    "sink": {"sink_tokens": 2, "memory_size": 6, "segment_size": 8},
    "compressive": {"memory_size": 6, "compress_rate": 2, "compressed_size": 4, "segment_size": 8},
    "average": {"segment_size": 8},
    "linear": {"segment_size": 8},
    "tova": {"memory_size": 6, "segment_size": 8},
    "h2o": {"memory_size": 6, "recent_tokens": 2, "segment_size": 8},
    "snapkv": {"memory_size": 6, "window": 2, "segment_size": 8},
    "keynorm": {"memory_size": 6, "segment_size": 8},
}


@pytest.fixture(scope="module", autouse=True)
def recorded_outcomes():
    """After the module: the outcomes for scripts/family_table.py (conftest runs torch on one thread already)."""
    yield
    write_results()


@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.transformers_api) if name in API_FAMILIES
                                        else name for name in list(FAMILIES) + list(EXTRA_FAMILIES)])
def family(request, tmp_path_factory):
    name = request.param
    path = save_family(name, tmp_path_factory.mktemp(name) / "model", BUNDLED_TOKENIZER)
    if path is None:
        pytest.skip(f"{name}: not in transformers {transformers.__version__}")
    backend = load_backend(RunConfig(model=str(path), device="cpu", dtype="float32"))
    if backend.kind != "hf":
        pytest.skip(f"{name}: streamed by the {backend.kind} backend (tests/recurrent)")
    text = (SAMPLE / "python_docs.txt").read_text(encoding="utf-8")[:3000]
    doc = tokenize(Document(name, text, len(text.encode("utf-8"))), backend.tokenizer, backend.bos_id)
    return name, path, backend, doc.truncated(TOKENS, text)


def use(family, impl: str):
    name, path, backend, doc = family
    try:
        backend.use_attention_implementation(impl)
    except UsageError:
        pytest.skip(f"{name}: no {impl} attention in transformers {transformers.__version__}")
    return name, backend, doc


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_streams_equal_one_plain_forward(family, impl):
    name, backend, doc = use(family, impl)
    for label, fields in EXACT.items():
        policy = label.split("-")[0]
        cfg = dataclasses.replace(RunConfig(device="cpu", dtype="float32"), memory=policy, **fields)
        report = check(backend, doc, cfg, segment_sizes=(1, 7, 64) if label == "full" else ())
        settings = [s for s in report.settings if s.policy == policy]
        assert settings, label
        assert not [s for s in settings if s.verdict == "differs"], (label, settings)  # never silently different
        refused = [s for s in settings if s.verdict == "refused"]
        if refused:  # one line naming the family; counted as a refusal in the table, never as exact
            assert name in EXTRA_FAMILIES, (label, refused)  # every listed family is exact
            assert all(s.reason.startswith(f"{backend.identity['model_type']}:") and "\n" not in s.reason
                       for s in refused), refused
            record(name, impl, policy, "refused", refused[0].reason)
            continue
        for s in settings:
            assert abs(s.delta_nll) <= 1e-4 * abs(s.reference_nll), (label, s)
            assert s.max_dlogit <= 1e-4, (label, s)
        record(name, impl, policy, "exact")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_other_policies_run_or_refuse(family, impl):
    name, backend, doc = use(family, impl)
    ids = torch.tensor(doc.input_ids[:40])[None]  # five segments: every bounded memory overflows
    for policy, fields in RUNS.items():
        cfg = dataclasses.replace(RunConfig(device="cpu", dtype="float32"), memory=policy, **fields)
        try:
            memory = backend.new_memory(cfg)
        except UsageError as e:
            assert str(e).startswith(f"{backend.identity['model_type']}:") and "\n" not in str(e)
            record(name, impl, policy + "+", "refused", str(e))
            continue
        with torch.inference_mode():
            for s in range(0, ids.shape[1], cfg.segment_size):
                logits, memory, mass = backend.step(ids[:, s : s + cfg.segment_size], memory)
                assert torch.isfinite(logits).all(), (policy, s)
                assert mass is None or 0 <= mass <= 1 + 1e-6
        assert all(st.capacity is None or st.slots <= st.capacity for st in memory.stats())
        record(name, impl, policy + "+", "runs")


def test_the_mass_on_memory_comes_from_eager_attention(family):
    """Eager attention returns its probabilities: the mass on memory is read from them (a fraction in (0, 1));
    SDPA returns none, and the mass is not reported rather than computed another way."""
    name, backend, doc = use(family, "eager")
    ids = torch.tensor(doc.input_ids[:24])[None]
    memory = backend.new_memory(RunConfig(memory="full", segment_size=8))
    masses = []
    with torch.inference_mode():
        for s in range(0, 24, 8):
            masses.append(backend.step(ids[:, s : s + 8], memory)[2])
    if masses[1] is None:
        pytest.skip(f"{name}: its eager attention module returns no probabilities")
    assert masses[0] is None and all(0 < m < 1 for m in masses[1:]) and all(math.isfinite(m) for m in masses[1:])
