"""Issue 32, reliability: a memory file carries its own integrity. Each tensor's sha256 is saved in its metadata and
checked on load (flipped bits: one line, exit 2, "corrupt"); NaN and infinities are refused naming the tensor; the
statistics a state stores beside its tensors (key and value norms, keynorm's scores) are computed again, never
trusted; a metadata string never breaks an error onto a second line; and `--load-memory` refuses a FIFO, a device,
a socket or a folder before opening it, so nothing waits."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from segcli.backends import load_backend
from segcli.cli import app
from segcli.config import RunConfig
from segcli.errors import UsageError
from segcli.state import DIGESTS, load_memory

runner = CliRunner()
TIMED = ("seconds", "tokens_per_s")
SIZES = {"fifo": ["--memory-size", "64"], "keynorm": ["--memory-size", "48"], "h2o": ["--memory-size", "48"],
         "sink": ["--memory-size", "40", "--sink-tokens", "4"], "full": [], "tova": ["--memory-size", "48"],
         "snapkv": ["--memory-size", "48", "--window", "4"],
         "compressive": ["--memory-size", "40", "--compress-rate", "3", "--compressed-size", "5"]}


def options(policy="fifo"):
    return ["--memory", policy, *SIZES[policy], "-s", "16", "--max-tokens", "90", "--device", "cpu", "-q"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def segments(res) -> list[dict]:
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMED} for r in recs if r["type"] == "segment"]


def one_line(res, code=2) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("segcli: error: "), res.stderr
    return lines[0]


def read(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["segcli"]), {k: f.get_tensor(k) for k in f.keys()}


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def write(path, meta, tensors, sign=False):
    """A memory file of `meta` and `tensors`; sign: with digests of these tensors (as a writer that saved exactly
    these numbers would), else with the digests `meta` holds."""
    if sign:
        meta = {**meta, DIGESTS: {k: sha(v) for k, v in tensors.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"segcli": json.dumps(meta)})
    return path


@pytest.fixture(scope="module")
def saved(tiny_model_dir, two_docs, tmp_path_factory):
    """policy -> the memory file after document a (made once per policy)."""
    folder, made = tmp_path_factory.mktemp("memories"), {}

    def get(policy="fifo"):
        if policy not in made:
            made[policy] = folder / f"{policy}.safetensors"
            segments(invoke("run", two_docs[0], "--model", tiny_model_dir, *options(policy), "--save-memory",
                            made[policy]))
        return made[policy]

    return get


def continued(tiny_model_dir, two_docs, mem, policy="fifo"):
    return invoke("run", two_docs[1], "--model", tiny_model_dir, *options(policy), "--load-memory", mem)


@pytest.fixture(scope="module")
def fifo_run(tiny_model_dir):
    cfg = RunConfig(model=str(tiny_model_dir), memory="fifo", memory_size=64, segment_size=16, device="cpu")
    return load_backend(cfg), cfg


# -- digests -------------------------------------------------------------------------------------------------------

def test_the_saved_digests_are_the_sha256_of_each_tensor_s_bytes_in_the_file(saved):
    raw = saved().read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header.pop("__metadata__")["segcli"])
    assert meta["format"] == 2 and set(meta[DIGESTS]) == set(header) and header
    for name, entry in header.items():
        lo, hi = entry["data_offsets"]
        assert meta[DIGESTS][name] == hashlib.sha256(raw[8 + n + lo : 8 + n + hi]).hexdigest()


def test_flipped_bits_in_tensor_data_are_refused_as_corrupt(saved, tiny_model_dir, two_docs, tmp_path):
    raw = bytearray(saved().read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    rng = random.Random(0)
    for bit in rng.sample(range((len(raw) - start) * 8), 1000):
        raw[start + bit // 8] ^= 1 << (bit % 8)
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    line = one_line(continued(tiny_model_dir, two_docs, bad))
    assert f"--load-memory {bad}: the file is corrupt: the bytes of tensor " in line
    assert "do not match the sha256 saved with them" in line


def test_one_flipped_bit_is_enough(saved, fifo_run, tmp_path):
    meta, tensors = read(saved())
    tensors["layer1.window.v"].view(-1)[5] = torch.nextafter(tensors["layer1.window.v"].view(-1)[5], torch.tensor(9.0))
    with pytest.raises(UsageError, match=r"corrupt: the bytes of tensor layer1\.window\.v do not match"):
        load_memory(str(write(tmp_path / "m.safetensors", meta, tensors)), *fifo_run)


@pytest.mark.parametrize("damage", ["a tensor without a digest", "a digest without a tensor", "digests not a table"])
def test_digests_that_do_not_name_the_file_s_tensors_are_corrupt(saved, fifo_run, tmp_path, damage):
    meta, tensors = read(saved())
    if damage == "a tensor without a digest":
        tensors["extra"] = torch.zeros(3)
        needle = "tensor extra has no sha256 in its metadata"
    elif damage == "a digest without a tensor":
        meta[DIGESTS]["ghost"] = "0" * 64
        needle = "tensor ghost is listed in its metadata but missing"
    else:
        meta[DIGESTS] = "0" * 64
        needle = f"its tensor digests ({DIGESTS}) are missing or damaged"
    path = write(tmp_path / "m.safetensors", meta, tensors)
    with pytest.raises(UsageError) as e:
        load_memory(str(path), *fifo_run)
    assert str(e.value) == f"--load-memory {path}: the file is corrupt: {needle}; use another copy, or save the memory again"


def test_a_file_from_before_the_digests_loads_and_continues(saved, tiny_model_dir, two_docs, tmp_path):
    """Format 2 files written before segcli saved digests have none: accepted, with nothing to check."""
    meta, tensors = read(saved())
    assert meta.pop(DIGESTS, None)
    old = write(tmp_path / "old.safetensors", meta, tensors)
    together = invoke("run", *two_docs, "--model", tiny_model_dir, *options())
    expected = [r for r in segments(together) if r["document"] == str(two_docs[1])]
    assert segments(continued(tiny_model_dir, two_docs, old)) == expected


# -- statistics are computed again -----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["fifo", "sink", "full", "compressive", "keynorm", "h2o", "tova", "snapkv"])
def test_a_tampered_stored_statistic_is_computed_again(saved, tiny_model_dir, two_docs, tmp_path, policy):
    """Stored norms x 1000 (and scores that are a function of the key: keynorm's norms, tova's and snapkv's 0s), the
    digests signed again as a writer of these numbers would have: the run reports and evicts as from the true file,
    not the stored numbers."""
    meta, tensors = read(saved(policy))
    scores = policy in ("keynorm", "tova", "snapkv")  # scores set as pairs enter (the key norm, or 0), never changed
    stats = [k for k in tensors if k.endswith((".kn", ".vn")) or (scores and k.endswith(".score"))]
    assert stats
    for k in stats:
        tensors[k] = tensors[k] * 1000 + 1
    tampered = write(tmp_path / "tampered.safetensors", meta, tensors, sign=True)
    got = segments(continued(tiny_model_dir, two_docs, tampered, policy))
    assert got == segments(continued(tiny_model_dir, two_docs, saved(policy), policy))
    assert got[0]["memory"]["key_norm"] < 100  # the memory's own norms (x 1000 would be thousands)


# -- NaN and infinities ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,word", [(float("nan"), "NaN"), (float("inf"), "an infinite value"),
                                        (float("-inf"), "an infinite value")])
def test_a_non_finite_tensor_is_refused_naming_it(saved, fifo_run, tmp_path, value, word):
    meta, tensors = read(saved())
    tensors["layer1.window.k"].view(-1)[7] = value
    path = write(tmp_path / "m.safetensors", meta, tensors, sign=True)
    with pytest.raises(UsageError) as e:
        load_memory(str(path), *fifo_run)
    message = str(e.value)
    assert message.startswith(f"--load-memory {path}: tensor layer1.window.k holds {word}; ") and "\n" not in message
    assert "--dtype" not in message  # not the numerics hint a non-finite loss gets


def test_a_non_finite_tensor_is_one_line_from_the_cli(saved, tiny_model_dir, two_docs, tmp_path):
    meta, tensors = read(saved())
    tensors["layer0.window.v"].view(-1)[0] = float("nan")
    path = write(tmp_path / "nan.safetensors", meta, tensors, sign=True)
    assert "tensor layer0.window.v holds NaN" in one_line(continued(tiny_model_dir, two_docs, path))


# -- metadata strings in messages ----------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["policy", "dtype", "model", "layer type", "tensor name"])
def test_a_metadata_string_with_a_newline_stays_on_one_line(saved, tiny_model_dir, two_docs, tmp_path, field):
    meta, tensors = read(saved())
    evil = "x\nsegcli: error: forged\r\x1b[31m\u2028y"
    if field == "policy":
        meta["policy"] = evil
    elif field == "dtype":
        meta["dtype"] = evil
    elif field == "model":
        meta["model"], meta["model_sha256"] = evil, evil
    elif field == "layer type":
        meta["layers"][0]["type"] = evil
    else:
        meta["layers"][0]["fields"]["window"]["fields"]["k"] = {"tensor": evil}
    path = write(tmp_path / "m.safetensors", meta, tensors)
    line = one_line(continued(tiny_model_dir, two_docs, path))
    assert "forged" in line and "\\x1b" in line and "\x1b" not in line
    assert "\\n" in line or "\\u2028" in line or repr(evil)[1:-1] in line


# -- not a regular file: refused before it is opened -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/null", "socket", "folder"])
def test_load_memory_refuses_what_is_not_a_regular_file_promptly(tiny_model_dir, two_docs, tmp_path, kind):
    """A FIFO with no writer used to wait for ever (even past SIGINT); a device likewise."""
    held = None
    if kind == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)
        needle = "is a FIFO (named pipe), not a regular file"
    elif kind == "socket":
        path = tmp_path / "sock"
        held = socket.socket(socket.AF_UNIX)
        held.bind(str(path))
        needle = "is a socket, not a regular file"
    elif kind == "folder":
        path = tmp_path
        needle = "is a directory"
    else:
        path = kind
        needle = "is a character device, not a regular file"
    try:
        p = subprocess.run([sys.executable, "-m", "segcli", "run", str(two_docs[1]), "--model", str(tiny_model_dir),
                            *options(), "--load-memory", str(path)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL)
    finally:
        if held is not None:
            held.close()
    assert p.returncode == 2, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"segcli: error: --load-memory {path}: "), p.stderr
    assert needle in lines[0]


def test_check_source_refuses_the_same_before_any_work(saved, tmp_path):
    """`check_source`: what a command can call before loading its model (it opens nothing that is not a file)."""
    from segcli.state import check_source

    os.mkfifo(tmp_path / "pipe")
    check_source(str(saved()))
    for path, needle in ((tmp_path / "pipe", "is a FIFO (named pipe)"), ("/dev/zero", "is a character device"),
                         (tmp_path, "is a directory"), (tmp_path / "none", "no such file")):
        with pytest.raises(UsageError) as e:
            check_source(str(path))
        assert str(e.value).startswith(f"--load-memory {path}: {needle}")
