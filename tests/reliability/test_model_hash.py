"""Issue 32, reliability: a model's identity (`model_sha256`, the model hash of memory files) covers every byte
of the files that define the model, whatever their size, and the per-file digests cached by file identity are
used only while the file is unchanged; an unwritable or damaged cache never fails a run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_with_tokenizer, tiny_model
from segcli.backends import base, load_backend
from segcli.config import RunConfig
from segcli.errors import UsageError
from segcli.state import load_memory, save_memory

OLD = 1_600_000_000_000_000_000  # an mtime long past (2020), in ns


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCLI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def reads(monkeypatch):
    """Counts the files `file_sha256` reads (every hash of a whole file goes through it)."""
    real, got = base.file_sha256, []

    def counting(path):
        got.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(base, "file_sha256", counting)
    return got


def settled(path, mtime=OLD):
    """`path` as a file last changed long ago (its ctime is now: `RACY_NS` 0 lets such an entry count)."""
    os.utime(path, ns=(mtime, mtime))
    return path


def folder(tmp_path, weights: bytes, name="m"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "seglm"}))
    (d / "model.safetensors").write_bytes(weights)
    (d / "tokenizer.json").write_text("{}")
    (d / "notes.txt").write_text("not part of the model")
    return d


# -- what the hash covers ----------------------------------------------------------------------------------------------

def test_one_byte_in_the_middle_of_a_weight_file_changes_the_hash(tmp_path):
    weights = bytearray(os.urandom(3 << 20))
    a = folder(tmp_path, bytes(weights), "a")
    weights[len(weights) // 2] ^= 1
    b = folder(tmp_path, bytes(weights), "b")
    assert base.model_fingerprint(a) != base.model_fingerprint(b)


def test_the_hash_is_every_model_file_s_full_sha256_by_name_and_size(tmp_path):
    """By design, no size threshold: each file's sha256 over all its bytes (the old hash took size plus the first
    and last MiB of files over 64 MB). Tokenizer files and other files are not part of it."""
    d = folder(tmp_path, os.urandom(1 << 20))
    (d / "model-00002-of-00002.bin").write_bytes(b"second shard")
    (d / "modeling_custom.py").write_text("# the model's own code (trust_remote_code)\n")
    files = ["config.json", "model-00002-of-00002.bin", "model.safetensors", "modeling_custom.py"]
    assert [f.name for f in base.model_files(d)] == files
    lines = "".join(f"{n}\t{(d / n).stat().st_size}\t{hashlib.sha256((d / n).read_bytes()).hexdigest()}\n"
                    for n in files)
    assert base.model_fingerprint(d) == hashlib.sha256(lines.encode()).hexdigest()
    before = base.model_fingerprint(d)
    (d / "notes.txt").write_text("edited")
    (d / "tokenizer.json").write_text('{"x": 1}')
    assert base.model_fingerprint(d) == before
    (d / "config.json").write_text(json.dumps({"model_type": "seglm", "rope_theta": 5}))
    assert base.model_fingerprint(d) != before


def test_a_memory_file_does_not_load_into_a_copy_with_one_weight_changed(tmp_path):
    model = save_with_tokenizer(tiny_model(), tmp_path / "model")
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    tensors = load_file(copy / "model.safetensors")
    name = sorted(tensors)[len(tensors) // 2]  # a tensor in the middle of the file
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[tensors[name].numel() // 2] += 1.0
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})

    cfg = RunConfig(model=str(model), memory="fifo", memory_size=8, segment_size=8, device="cpu")
    backend = load_backend(cfg)
    with torch.inference_mode():
        _, memory, _ = backend.step(torch.arange(1, 9).view(1, 8), backend.new_memory(cfg))
    save_memory(str(tmp_path / "m.safetensors"), memory, backend)

    other_cfg = dataclasses.replace(cfg, model=str(copy))
    other = load_backend(other_cfg)
    assert other.identity["model_sha256"] != backend.identity["model_sha256"]
    assert other.identity["tokenizer_sha256"] == backend.identity["tokenizer_sha256"]
    with pytest.raises(UsageError) as e:
        load_memory(str(tmp_path / "m.safetensors"), other, other_cfg)
    assert "saved with another model" in str(e.value)


# -- the cache of file digests -----------------------------------------------------------------------------------------

@pytest.fixture
def no_racy(monkeypatch):
    monkeypatch.setattr(base, "RACY_NS", 0)


def test_an_unchanged_file_is_not_read_again(tmp_path, cache, reads, no_racy):
    d = folder(tmp_path, os.urandom(1 << 20))
    for f in d.iterdir():
        settled(f)
    first = base.model_fingerprint(d)
    assert sorted(reads) == ["config.json", "model.safetensors"]
    reads.clear()
    assert base.model_fingerprint(d) == first and reads == []
    index = json.loads((cache / "hashes.json").read_text())
    entry = index[str((d / "model.safetensors").resolve())]
    assert entry["sha256"] == hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()


def _same_size_other_bytes(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("change", ["mtime", "size", "inode", "content, mtime put back"])
def test_a_changed_file_is_hashed_again(tmp_path, reads, no_racy, change):
    p = settled(folder(tmp_path, os.urandom(1 << 20)) / "model.safetensors")
    before = base.cached_sha256(p)
    if change == "mtime":
        settled(p, OLD + 1)  # the same bytes, another mtime (by one ns)
    elif change == "size":
        with open(p, "ab") as f:
            f.write(b"\0")
        settled(p)
    elif change == "inode":  # the same bytes and times in a new file renamed over it
        tmp = p.with_name("new")
        shutil.copyfile(p, tmp)
        settled(tmp)
        os.replace(tmp, p)
    else:  # another byte in the middle, the mtime set back: only the ctime tells
        p.write_bytes(_same_size_other_bytes(p))
        settled(p)
    reads.clear()
    after = base.cached_sha256(p)
    assert reads == ["model.safetensors"]
    assert after == hashlib.sha256(p.read_bytes()).hexdigest()
    assert (after == before) == (change in ("mtime", "inode"))


def test_a_file_changed_just_before_it_was_hashed_is_hashed_again(tmp_path, reads):
    """Within the file system's timestamp granularity a second write could leave size and times as they were:
    such an entry is never used (RACY_NS)."""
    p = folder(tmp_path, os.urandom(1 << 10)) / "model.safetensors"  # written just now
    base.cached_sha256(p)
    base.cached_sha256(p)
    assert reads == ["model.safetensors", "model.safetensors"]


@pytest.mark.parametrize("damage", ["not JSON", "a list", "entries of the wrong kind", "a forged old entry"])
def test_a_damaged_cache_is_no_error(tmp_path, cache, reads, no_racy, damage):
    p = settled(folder(tmp_path, os.urandom(1 << 10)) / "model.safetensors")
    truth = hashlib.sha256(p.read_bytes()).hexdigest()
    cache.mkdir(parents=True)
    key = str(p.resolve())
    st = p.stat()
    ident = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
             "dev": st.st_dev}
    text = {"not JSON": "{\"half", "a list": "[1, 2]",
            "entries of the wrong kind": json.dumps({key: {**ident, "sha256": 5, "hashed_ns": "x"}}),
            "a forged old entry": json.dumps({key: {**ident, "size": 1, "sha256": "0" * 64, "hashed_ns": 1 << 62}})}
    (cache / "hashes.json").write_text(text[damage])
    assert base.cached_sha256(p) == truth and reads == ["model.safetensors"]
    reads.clear()
    assert base.cached_sha256(p) == truth and reads == []  # the cache was rewritten whole


def test_an_unwritable_cache_root_still_hashes(tmp_path, monkeypatch, reads, no_racy):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SEGCLI_CACHE", str(blocker / "cache"))
    d = folder(tmp_path, os.urandom(1 << 10))
    for f in d.iterdir():
        settled(f)
    first = base.model_fingerprint(d)
    assert base.model_fingerprint(d) == first and len(reads) == 4  # hashed every time, never an error
    assert blocker.read_text() == "not a folder"
    monkeypatch.setenv("SEGCLI_CACHE", str(tmp_path / "writable"))
    assert base.model_fingerprint(d) == first


def test_a_read_only_cache_folder_still_hashes(tmp_path, cache, reads, no_racy):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    cache.mkdir(parents=True)
    p = settled(folder(tmp_path, os.urandom(1 << 10)) / "model.safetensors")
    cache.chmod(0o500)
    try:
        assert base.cached_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()
        assert list(cache.iterdir()) == []  # no temporary file left behind
    finally:
        cache.chmod(0o700)


def test_a_run_s_config_names_the_changed_model(tmp_path):
    """The run's `config.model_sha256` (the identity the backends report) follows the weights."""
    model = save_with_tokenizer(tiny_model(), tmp_path / "model")
    cfg = RunConfig(model=str(model), device="cpu")
    first = load_backend(cfg).identity["model_sha256"]
    tensors = load_file(model / "model.safetensors")
    name = max(tensors)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] *= -1
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert load_backend(cfg).identity["model_sha256"] != first
