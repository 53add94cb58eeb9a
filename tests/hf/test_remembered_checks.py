"""Issue 29 (start-up): the load-time guard, the frame check and the token-pass check ran their forwards on every
start (seconds on a 135M model); their answers are remembered per model and software (segcli.backends.checks)."""

from __future__ import annotations

import json

import pytest

from segcli import cache as checks
from segcli.backends import load_backend
from segcli.backends.hf import HFBackend
from segcli.config import RunConfig

from conftest import BUNDLED_TOKENIZER
from hf_families import save_family


@pytest.fixture
def cached(monkeypatch, tmp_path):
    monkeypatch.setenv("SEGCLI_CHECK_CACHE", "1")
    monkeypatch.setenv("SEGCLI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "checks.json"


def save_tiny(name: str, path):
    return save_family(name, path, BUNDLED_TOKENIZER)


def counting(monkeypatch):
    calls = []
    real = checks.remembered

    def spy(model, name, compute):
        def counted():
            calls.append(name)
            return compute()
        return real(model, name, counted)

    for module in ("segcli.backends.hf", "segcli.backends.recurrent"):
        monkeypatch.setattr(f"{module}.remembered", spy)
    monkeypatch.setattr(checks, "remembered", spy)
    return calls


def test_a_second_load_runs_no_check(cached, monkeypatch, tmp_path):
    path = save_tiny("llama", tmp_path / "m")
    calls = counting(monkeypatch)
    cfg = RunConfig(model=str(path), memory="fifo", memory_size=16, segment_size=4)
    backend = load_backend(cfg)
    assert backend.step  # loaded
    backend.new_memory(cfg)
    first = list(calls)
    assert "continuation" in first
    assert set(json.loads(cached.read_text()).keys())  # remembered on disk
    calls.clear()
    again = load_backend(cfg)
    again.new_memory(cfg)
    assert calls == []  # every answer from the first load


def test_another_model_or_dtype_is_checked_again(cached, monkeypatch, tmp_path):
    path = save_tiny("llama", tmp_path / "m")
    calls = counting(monkeypatch)
    load_backend(RunConfig(model=str(path)))
    calls.clear()
    load_backend(RunConfig(model=str(path), dtype="bfloat16"))
    assert "continuation" in calls
    calls.clear()
    config = path / "config.json"  # another model: its config changed (model_sha256 covers it)
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 2e-06'))
    load_backend(RunConfig(model=str(path)))
    assert "continuation" in calls


def test_a_failed_check_is_not_remembered_as_passed(cached, monkeypatch, tmp_path):
    """A model whose stream differs is refused every time, from the remembered gap as from a fresh one."""
    from segcli.errors import UsageError

    path = save_tiny("llama", tmp_path / "m")
    real = HFBackend.step

    def off(self, ids, memory):  # a broken stream: every logit shifted
        logits, memory, mass = real(self, ids, memory)
        return logits + 1.0, memory, mass

    monkeypatch.setattr(HFBackend, "step", off)
    for _ in range(2):
        with pytest.raises(UsageError, match="differ"):
            load_backend(RunConfig(model=str(path)))


def test_no_stamp_no_cache(cached):
    class Model:
        pass

    assert checks.remembered(Model(), "x", lambda: 3.0) == 3.0
    assert not cached.exists()


def test_the_key_holds_the_source_stamp(cached, monkeypatch):
    class Model:
        _segcli_stamp = {"model_sha256": "a" * 64, "dtype": "torch.float32", "device": "cpu"}

    assert checks.remembered(Model(), "x", lambda: 1.5) == 1.5
    assert checks.remembered(Model(), "x", lambda: 2.5) == 1.5  # remembered
    monkeypatch.setattr(checks, "software", lambda: {"segcli_source": "changed"})
    assert checks.remembered(Model(), "x", lambda: 2.5) == 2.5  # another segcli: checked again
    monkeypatch.setenv("SEGCLI_CHECK_CACHE", "0")
    assert checks.remembered(Model(), "y", lambda: 7) == 7 and "y" not in cached.read_text()
