"""Shared fixtures: tiny random-initialised native models (no downloads), saved with the bundled tokenizer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from segcli.models.seglm import SegLMConfig, SegLMForCausalLM

# In-process runs use tiny models, which are launch-bound: one thread is as fast, and it cannot be slowed by a
# second process contending for the other core (a shared machine slowed two-thread steps ~50x).
torch.set_num_threads(1)

# Every check runs every time (segcli.backends.checks): tests patch segcli's code in memory, and subprocesses inherit
# this; tests of the remembered answers set it back for themselves.
os.environ["SEGCLI_CHECK_CACHE"] = "0"

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_TOKENIZER = ROOT / "segcli" / "bundled" / "tokenizer.json"
SAMPLE = ROOT / "sample_docs"


def pytest_configure(config):
    config.addinivalue_line("markers", "transformers_api: depends on transformers' API (forward's arguments, caches, "
                            "masks, attention modules); .ci/run runs these again under an older transformers 5")


TINY = dict(vocab_size=8192, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tiny_model(seed: int = 0, **overrides) -> SegLMForCausalLM:
    torch.manual_seed(seed)
    model = SegLMForCausalLM(SegLMConfig(**{**TINY, **overrides})).eval()
    # A random init with std 0.02 makes attention nearly uniform; sharpen it so tests can see positions.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.qkv.weight.mul_(8.0)
            if layer.attn.key_smear is not None:  # trained-like nonzero shares, one sign per head
                layer.attn.key_smear.copy_(torch.linspace(0.8, -0.6, layer.attn.h))
    return model


def save_with_tokenizer(model: SegLMForCausalLM, path: Path) -> Path:
    model.save_pretrained(path)
    shutil.copy(BUNDLED_TOKENIZER, path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    return path


def excerpt(tmp_path_factory, sample: str, chars: int, tag: str = "doc") -> Path:
    """The first `chars` characters of sample_docs/`sample` as a document of its own (a module's test text)."""
    p = tmp_path_factory.mktemp(tag) / "doc.txt"
    p.write_text((SAMPLE / sample).read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_with_tokenizer(tiny_model(), tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def doc_path(tmp_path_factory) -> Path:
    """A ~1,500-token excerpt of a held-out sample document."""
    text = (SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[:5000]
    p = tmp_path_factory.mktemp("docs") / "excerpt.txt"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def two_docs(tmp_path_factory) -> tuple[Path, Path]:
    """Two consecutive 1,500-character pieces of a sample document (a memory saved after the first continues)."""
    text = (SAMPLE / "milton_areopagitica.txt").read_text(encoding="utf-8")
    d = tmp_path_factory.mktemp("ab")
    (d / "a.txt").write_text(text[:1500])
    (d / "b.txt").write_text(text[1500:3000])
    return d / "a.txt", d / "b.txt"


def steps_only(monkeypatch) -> None:
    """Every segment of the native backend its own `step` (no segment passes at small n_s): for tests that act at
    the N-th segment by patching `NativeBackend.step`."""
    from segcli.backends.native import NativeBackend

    monkeypatch.setattr(NativeBackend, "segment_pass", lambda self, memory, segment_size: None)


def signal_at_step(monkeypatch, sig: int, at: int = 3) -> list[int]:
    """Make the native backend's `at`-th segment step send `sig` to this process; the list counts the steps."""
    import os

    from segcli.backends.native import NativeBackend

    steps_only(monkeypatch)
    real, calls = NativeBackend.step, []

    def signalling(self, ids, memory):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), sig)
        return real(self, ids, memory)

    monkeypatch.setattr(NativeBackend, "step", signalling)
    return calls


@pytest.fixture
def signals_passed_on():
    """Record-only handlers for the signals a stopped in-process command hands on to the handler that was there
    before (segcli.cli.common.pass_on; without these, a test's own os.kill would stop pytest); restored after."""
    import signal

    got: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in signals}
    yield got
    for s, handler in previous.items():
        signal.signal(s, handler)
