"""Issue 6, reliability: bad input, pipes and signals, endless stdin, memory state files,
numerics on long streams, determinism. Every DESIGN §4 contract has a test here."""

from __future__ import annotations

import importlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from segcli.cli import app
from segcli.engine.run import TIMING_FIELDS
from segcli.config import RunConfig, explicit_keys, resolve
from segcli.documents import (
    Document, StreamedDocument, decode, decode_stream, stream_tokens, tokenize,
)
from segcli.errors import UsageError
from segcli.memory import POLICY_NAMES, REGISTRY, make_policy

from conftest import ROOT, SAMPLE, save_with_tokenizer, signal_at_step, steps_only, tiny_model

runner = CliRunner()
SIZES = {"memory_size": 24, "sink_tokens": 2, "compress_rate": 3, "compressed_size": 5, "layer_budget": "pyramid",
         "recent_tokens": 8, "window": 4}


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def records(result):
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def policy_args(policy: str) -> list:
    """--memory P plus only the size options P uses."""
    out: list = ["--memory", policy]
    for k in REGISTRY[policy].parameters:
        out += [f"--{k.replace('_', '-')}", SIZES[k]]
    return out


def untimed(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMING_FIELDS}


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return ["--model", tiny_model_dir, "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


# -- 1. bad input: one stderr line, exit 2, no traceback ------------------------------------------------------------

def assert_one_error_line(res, code: int, needle: str) -> None:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("segcli: error: "), res.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_bytes(b"")
    (d / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (d / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (d / "malformed.yaml").write_text("memory: [fifo\n")
    (d / "unknown.yaml").write_text("memory: fifo\nsegmnet_size: 4\n")
    (d / "wrongtype.yaml").write_text("segment_size: sixteen\n")
    (d / "list.yaml").write_text("- memory\n")
    (d / "policy.yaml").write_text("memory: lru\n")
    (d / "notmodel").mkdir()
    (d / "notmodel" / "config.json").write_text("{\"hello\": 1}")
    # a checkpoint missing a tensor, and one with a wrong-shaped tensor
    from safetensors.torch import load_file, save_file

    for name, edit in [("missing", lambda t: t.pop("model.norm.weight")),
                       ("wrongshape", lambda t: t.__setitem__("model.norm.weight", torch.ones(7)))]:
        m = save_with_tokenizer(tiny_model(), d / name)
        tensors = load_file(str(m / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(m / "model.safetensors"), metadata={"format": "pt"})
    return d


BAD_INPUT = [
    # (id, args, needle)
    ("missing-file", ["run", "{bad}/nope.txt"], "no such file"),
    ("directory-without-documents", ["run", "{bad}", "--glob", "*.nothing"], "no files match"),  # a folder is a corpus
    ("empty-document", ["run", "{bad}/empty.txt"], "empty"),
    ("binary-data", ["run", "{bad}/binary.bin"], "binary"),
    ("invalid-utf8", ["run", "{bad}/latin1.txt"], "invalid UTF-8 at byte 3"),
    ("segment-size-0", ["run", "{doc}", "-s", "0"], "--segment-size"),
    ("segment-size-negative", ["run", "{doc}", "-s", "-5"], "--segment-size"),
    ("memory-size-0", ["run", "{doc}", "--memory-size", "0"], "--memory-size"),
    ("memory-size-huge", ["run", "{doc}", "--memory-size", str(1 << 40)], "--memory-size"),
    ("sink-negative", ["run", "{doc}", "--memory", "sink", "--sink-tokens", "-1"], "--sink-tokens"),
    ("compress-rate-0", ["run", "{doc}", "--memory", "compressive", "--compress-rate", "0"], "--compress-rate"),
    ("max-tokens-0", ["run", "{doc}", "--max-tokens", "0"], "--max-tokens"),
    ("yaml-unknown-policy", ["run", "{doc}", "-c", "{bad}/policy.yaml"], "unknown memory policy 'lru'"),
    ("yaml-malformed", ["run", "{doc}", "-c", "{bad}/malformed.yaml"], "malformed YAML"),
    ("yaml-unknown-key", ["run", "{doc}", "-c", "{bad}/unknown.yaml"], "unknown key 'segmnet_size'"),
    ("yaml-wrong-type", ["run", "{doc}", "-c", "{bad}/wrongtype.yaml"], "must be int"),
    ("yaml-not-mapping", ["run", "{doc}", "-c", "{bad}/list.yaml"], "mapping"),
    ("yaml-missing", ["run", "{doc}", "-c", "{bad}/none.yaml"], "not found"),
    ("not-a-model", ["run", "{doc}", "--model", "{bad}/notmodel"], "notmodel"),
    ("model-dir-missing", ["run", "{doc}", "--model", "{bad}/nomodel"], "no such model"),
    ("checkpoint-missing-tensor", ["run", "{doc}", "--model", "{bad}/missing"], "model.norm.weight"),
    ("checkpoint-wrong-shape", ["run", "{doc}", "--model", "{bad}/wrongshape"], "tensor model.norm.weight has shape [7], the config expects [32]"),
    ("output-missing-folder", ["run", "{doc}", "--output", "{bad}/no/out.jsonl"], "does not exist"),
    ("save-memory-missing-folder", ["run", "{doc}", "--save-memory", "{bad}/no/m.safetensors"], "does not exist"),
    ("load-memory-missing", ["run", "{doc}", "--load-memory", "{bad}/no.safetensors"], "no such file"),
    ("load-memory-not-safetensors", ["run", "{doc}", "--load-memory", "{bad}/latin1.txt"], "not a safetensors file"),
    ("stdin-twice", ["run", "-", "-"], "only once"),
]


@pytest.mark.parametrize("args, needle", [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT])
def test_bad_input_one_line_exit_2(base, bad_files, doc_path, args, needle):
    args = [a.format(bad=bad_files, doc=doc_path) for a in args]
    if "--model" in args:
        base = base[2:]
    res = invoke(*args, *base)
    assert_one_error_line(res, 2, needle)
    assert res.stdout == ""


def test_bad_input_no_traceback_even_for_usage_errors(base, doc_path):
    """Typer's own usage errors (non-integer, unknown choice) exit 2 without a traceback."""
    for args, needle in [(["-s", "1.5"], "--segment-size"), (["-s", "x"], "--segment-size"),
                         (["--memory", "lru"], "--memory"), (["--memory-size", "many"], "--memory-size")]:
        res = invoke("run", doc_path, *base, *args)
        assert res.exit_code == 2 and "Traceback" not in res.output and needle in res.output


def test_unreadable_file(base, tmp_path, monkeypatch):
    """Permission denied (simulated: tests may run as root, which reads anything)."""
    p = tmp_path / "secret.txt"
    p.write_text("hello")
    import builtins

    def deny(path, *args, **kwargs):
        if str(path) == str(p):
            raise PermissionError(13, "Permission denied")
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(importlib.import_module("segcli.reader"), "open", deny, raising=False)
    assert_one_error_line(invoke("run", p, *base), 2, "permission denied")


def test_invalid_utf8_replace_only_when_asked(base, bad_files):
    res = invoke("run", bad_files / "latin1.txt", *base, "--errors", "replace")
    (summary,) = [r for r in records(res) if r["type"] == "summary"]
    assert summary["bytes"] == len("caf\ufffd au lait\n".encode())  # U+FFFD is 3 bytes


def test_stdin_bad_input(base):
    assert_one_error_line(invoke("run", "-", *base, input=b""), 2, "<stdin>: the document is empty")
    assert_one_error_line(invoke("run", "-", *base, input=b"ab\x00cd"), 2, "binary")
    assert_one_error_line(invoke("run", "-", *base, input=b"ok \xff\xfe"), 2, "invalid UTF-8 at byte 3")


def test_invalid_utf8_deep_in_a_stream_names_the_byte():
    data = ("\u00e9t\u00e9 " * 3000).encode()
    bad = data + b"\xc3(" + b" tail"
    f = io.BytesIO(bad)
    with pytest.raises(UsageError, match=f"invalid UTF-8 at byte {len(data)};"):
        list(decode_stream(f.read, "<stdin>", chunk_bytes=1001))  # the bad byte is many reads in
    f = io.BytesIO(data + b"\xe2\x82")  # a character cut short at the very end
    with pytest.raises(UsageError, match=f"invalid UTF-8 at byte {len(data)} .truncated"):
        list(decode_stream(f.read, "<stdin>", chunk_bytes=1001))
    f = io.BytesIO(bad)
    assert "".join(decode_stream(f.read, "<stdin>", "replace", chunk_bytes=7)) == bad.decode("utf-8", "replace")


def test_document_shorter_than_one_token(tokenizer):
    """With a BOS every non-empty text has a scored token; without one, a one-token text has none."""
    doc = Document("x", "a", 1)
    assert len(tokenize(doc, tokenizer, 0)) == 1
    with pytest.raises(UsageError, match="shorter than one scored token"):
        tokenize(doc, tokenizer, None)
    streamed = StreamedDocument("x", stream_tokens(iter(["a"]), tokenizer), None)
    with pytest.raises(UsageError, match="shorter than one scored token"):
        list(streamed.windows(4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_gpu(base, doc_path):
    args = [a for a in base if a not in ("--device", "cpu")]
    assert_one_error_line(invoke("run", doc_path, *args, "--device", "cuda"), 2, "no CUDA GPU")


def test_options_that_do_not_apply_to_the_policy(tmp_path):
    """--sink-tokens with fifo is refused when the user set it (CLI or YAML), not for defaults."""
    cfg = RunConfig(memory="fifo")
    cfg.check_options_apply(explicit_keys(RunConfig, None, {"memory": "fifo", "sink_tokens": None}))
    with pytest.raises(UsageError, match="--sink-tokens does not apply to --memory fifo"):
        cfg.check_options_apply(explicit_keys(RunConfig, None, {"sink_tokens": 2}))
    y = tmp_path / "c.yaml"
    y.write_text("memory: fifo\ncompress_rate: 8\n")
    with pytest.raises(UsageError, match="--compress-rate does not apply"):
        resolve(RunConfig, y, {}).check_options_apply(explicit_keys(RunConfig, y, {}))
    default = ROOT / "configs" / "default.yaml"  # restates every default: sets nothing
    resolve(RunConfig, default, {}).check_options_apply(explicit_keys(RunConfig, default, {}))
    for name, cls in REGISTRY.items():  # every policy accepts its own options
        RunConfig(memory=name).check_options_apply(set(cls.parameters))


# -- 2. pipes and signals (subprocesses, started together: each pays the import time once) ---------------------------

def _cmd(model_dir, *args):
    return [sys.executable, "-m", "segcli", "run", *map(str, args), "--model", str(model_dir), "--device", "cpu",
            "--format", "jsonl", "-q"]


@pytest.fixture(scope="module")
def procs(tiny_model_dir, tmp_path_factory):
    """Start every subprocess scenario at once (imports dominate their run time)."""
    d = tmp_path_factory.mktemp("procs")
    big = d / "big.txt"
    big.write_text((SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[:20000])  # ~6,000 tokens
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    started = {
        "pipe": subprocess.Popen(f"{' '.join(_cmd(tiny_model_dir, big, '-s', 1))} | head -n 2; "
                                 "echo \"rc=${PIPESTATUS[0]}\"", shell=True, executable="/bin/bash", **pipe),
        "sigterm": subprocess.Popen(_cmd(tiny_model_dir, big, "-s", 1), **pipe),
    }
    yield started
    for p in started.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def _check_jsonl(lines: list[bytes]) -> list[dict]:
    return [json.loads(x) for x in lines if x.strip()]  # every line whole: json.loads fails on a torn line


def _finish(p: subprocess.Popen, timeout: float = 60) -> tuple[bytes, bytes]:
    """The rest of stdout and stderr (not communicate(): it would skip what readline buffered)."""
    rest = p.stdout.read()
    err = p.stderr.read()
    p.wait(timeout)
    return rest, err


def test_broken_pipe_is_quiet(procs):
    p = procs["pipe"]
    out, err = _finish(p, 120)
    lines = out.decode().splitlines()
    assert lines[-1] == "rc=0", out
    assert len(_check_jsonl([x.encode() for x in lines[:-1]])) == 2
    assert err == b"", err  # no BrokenPipeError, no "Exception ignored"


def test_sigterm_stops_within_one_segment_lines_whole(procs):
    p = procs["sigterm"]
    first = p.stdout.readline()  # the first segment is out: the loop is running
    assert json.loads(first)["type"] == "segment"
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    rest, err = _finish(p)
    assert p.returncode == 143, err
    lines = [x for x in err.decode().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("segcli: interrupted by SIGTERM; stopped after "), err
    n_segments = int(lines[0].split("stopped after ")[1].split()[0])
    recs = _check_jsonl([first, *rest.splitlines()])
    assert all(r["type"] == "segment" for r in recs)  # no summary of a partial run
    assert len(recs) == n_segments < 6000  # stopped early, every computed segment written whole
    assert time.time() - t0 < 30


def test_stdin_first_segments_before_input_ends_and_sigint_while_waiting(base, doc_path, monkeypatch, signals_passed_on):
    """stdin that stays open: segments of the first read are written before the next read;
    a SIGINT while blocked on that read stops at once (exit 130, one line, lines whole)."""
    seen_at_second_read = []

    calls = []

    def open_pipe(n):
        calls.append(n)
        if len(calls) == 1:
            return doc_path.read_bytes()[:2000]
        sys.stdout.flush()
        seen_at_second_read.append(sys.stdout.buffer.getvalue())
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # "blocked" on a pipe that never sends more
        raise AssertionError("the signal did not interrupt the blocked read")

    monkeypatch.setattr(importlib.import_module("segcli.reader"), "read_stdin", open_pipe)
    res = invoke("run", "-", *base, "-s", 16)
    assert res.exit_code == 130 and res.stderr.strip() == "segcli: interrupted by SIGINT", res.output
    before = _check_jsonl(seen_at_second_read[0].splitlines())
    assert len(before) >= 20 and all(r["type"] == "segment" for r in before)  # reported before the input ended
    assert _check_jsonl(res.stdout_bytes.splitlines()) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_run_with_output_leaves_no_file(base, doc_path, tmp_path, monkeypatch, sig, signals_passed_on):
    """In-process: the signal arrives during segment 3; the loop stops before segment 4,
    exits 128 + signal, and --output leaves neither the target nor its temporary file."""
    calls = signal_at_step(monkeypatch, sig)
    previous = signal.getsignal(sig)
    res = invoke("run", doc_path, *base, "-s", 32, "--output", tmp_path / "out.jsonl")
    assert signal.getsignal(sig) == previous  # handlers restored
    assert res.exit_code == 128 + sig and len(calls) == 3
    assert res.stderr.strip() == f"segcli: interrupted by {sig.name}; stopped after 3 segments; no summary"
    assert list(tmp_path.iterdir()) == []
    assert signals_passed_on == [sig]  # then handed on to the handler that was there before


def test_output_file_atomic_on_failure(base, doc_path, tmp_path, monkeypatch):
    """A run that fails mid-way leaves neither the target nor a temporary file behind."""
    from segcli.backends.native import NativeBackend as Backend

    real, calls = Backend.step, []

    def failing(self, ids, memory):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(self, ids, memory)

    monkeypatch.setattr(Backend, "step", failing)
    steps_only(monkeypatch)
    target = tmp_path / "out.jsonl"
    res = invoke("run", doc_path, *base, "-s", 32, "--output", target)
    assert_one_error_line(res, 1, "disk on fire")
    assert list(tmp_path.iterdir()) == []


# -- 3. endless stdin: incremental tokenization equals whole-text tokenization ----------------------------------------

def _windows_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.start, x.input_ids, x.target_ids, x.byte_start) == (y.start, y.input_ids, y.target_ids, y.byte_start)
        assert np.array_equal(x.end_bytes, y.end_bytes)


def _streamed(data: bytes, tok, chunk: int, bos, max_tokens=None):
    f = io.BytesIO(data)
    return StreamedDocument("s", stream_tokens(decode_stream(f.read, "s", chunk_bytes=chunk), tok), bos, max_tokens)


@pytest.mark.parametrize("name", ["hamlet.txt", "python_docs.txt", "recall.json", "README.md"])
def test_incremental_tokenization_equals_whole(tokenizer, name):
    data = (SAMPLE / name).read_bytes()[:150_000]
    text = data.decode("utf-8")
    for chunk, bos, max_tokens in [(65536, 0, None), (997, 0, None), (4096, None, None), (3001, 0, 777), (5000, None, 777)]:
        whole = tokenize(decode(data, "w"), tokenizer, bos)
        if max_tokens:
            whole = whole.truncated(max_tokens, text)
        s = _streamed(data, tokenizer, chunk, bos, max_tokens)
        _windows_equal(list(s.windows(50)), list(whole.windows(50)))
        assert (s.n_tokens, s.n_bytes, s.n_words, s.first_byte) == (len(whole), whole.n_bytes, whole.n_words, whole.first_byte)


def test_incremental_tokenization_tricky_boundaries(tokenizer):
    """Whitespace runs, special-token text, multi-byte characters cut at every byte offset."""
    data = ("a\n\n\nb  c<|endoftext|>d \n\n  \u00e9\u20ac\U0001F600 x\t\ty\r\n  don't 123 " * 12).encode()
    for chunk in (1, 2, 3, 5, 8, 13):
        whole = tokenize(decode(data, "w"), tokenizer, 0)
        s = _streamed(data, tokenizer, chunk, 0)
        _windows_equal(list(s.windows(7)), list(whole.windows(7)))
        assert (s.n_words, s.n_bytes) == (whole.n_words, whole.n_bytes)


def test_stdin_streams_in_bounded_memory(tokenizer):
    """An endless stream: the first window comes after one read, and the buffered text stays small."""
    reads = []
    line = b"the quick brown fox jumps over the lazy dog\n" * 100  # 4.4 KB

    def endless(n):
        reads.append(n)
        return line

    s = StreamedDocument("s", stream_tokens(decode_stream(endless, "s", chunk_bytes=4096), tokenizer), 0)
    windows = s.windows(64)
    next(windows)
    assert len(reads) == 1  # reported before the input ends
    for _ in range(2000):  # ~ 128k tokens, 2,000 reads: the pending state does not grow
        next(windows)
    frame = windows.gi_frame
    assert len(frame.f_locals["ids"]) < 2000


def test_stdin_and_file_identical_records(base, doc_path):
    a = records(invoke("run", doc_path, *base, "-s", 50, "--per-token"))
    b = records(invoke("run", "-", *base, "-s", 50, "--per-token", input=doc_path.read_bytes()))
    for x, y in zip(a, b):
        x, y = untimed(x), untimed(y)
        x.pop("document", None), y.pop("document", None)
        x.pop("documents", None), y.pop("documents", None)
        if x["type"] == "summary":
            x.pop("config"), y.pop("config")
        assert x == y
    assert len(a) == len(b)


# -- 4. memory state files ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_save_then_load_memory_equals_one_run(base, two_docs, tmp_path, policy):
    meta = save_then_load(base, two_docs, tmp_path, policy)
    # plain keys: nothing beyond the policy's state (no smeared key in any layer)
    assert "last_keys" not in meta and all(d["fields"].get("last_key", {"value": None}) == {"value": None}
                                           for d in meta["layers"])


@pytest.fixture(scope="module")
def smeared_base(tmp_path_factory):
    from conftest import save_with_tokenizer, tiny_model

    path = save_with_tokenizer(tiny_model(smear_keys=True), tmp_path_factory.mktemp("smeared") / "model")
    return ["--model", path, "--device", "cpu", "-q"]


@pytest.mark.parametrize("policy", ["fifo", "none"])
def test_save_then_load_memory_of_a_smeared_key_model_equals_one_run(smeared_base, two_docs, tmp_path, policy):
    # the next document's first token smears in the last key of the saved one, so the file must carry it
    meta = save_then_load(smeared_base, two_docs, tmp_path, policy)
    assert [d["fields"].get("last_key") for d in meta["layers"]] == (
        [{"tensor": "layer0.last_key"}, {"tensor": "layer1.last_key"}] if policy == "fifo" else [None, None])


def save_then_load(base, two_docs, tmp_path, policy) -> dict:
    """Stream a then b in one run, and a (saving its memory) then b (loading it) in two; the second
    document's numbers must be bitwise equal. Returns the memory file's metadata."""
    a, b = two_docs
    common = [*base, *policy_args(policy), "-s", 16, "--max-tokens", 90]
    together = records(invoke("run", a, b, *common))
    mem = tmp_path / "m.safetensors"
    first = records(invoke("run", a, *common, "--save-memory", mem))
    second = records(invoke("run", b, *common, "--load-memory", mem))
    seg_b = [untimed(r) for r in together if r["type"] == "segment" and r["document"] == str(b)]
    assert seg_b and seg_b == [untimed(r) for r in second if r["type"] == "segment"]  # bitwise equal numbers
    assert first[-1]["config"]["memory_file"] == str(mem)
    from safetensors import safe_open

    with safe_open(str(mem), "pt") as f:
        meta = json.loads(f.metadata()["segcli"])
    assert meta["policy"] == policy and meta["seen"] == 90 and meta["segcli_version"]
    assert meta["model_sha256"] == first[-1]["config"]["model_sha256"]
    assert meta["tokenizer_sha256"] == first[-1]["config"]["tokenizer_sha256"]
    return meta


def test_load_memory_refuses_mismatch(base, tiny_model_dir, doc_path, tmp_path):
    mem = tmp_path / "m.safetensors"
    records(invoke("run", doc_path, *base, "--memory", "fifo", "--memory-size", 24, "--max-tokens", 40,
                   "--save-memory", mem))
    other = save_with_tokenizer(tiny_model(seed=1), tmp_path / "other")
    tok = tmp_path / "tok"
    save_with_tokenizer(tiny_model(), tok)
    t = json.loads((tok / "tokenizer.json").read_text())
    t["added_tokens"][0]["content"] = "<|end|>"  # same model, another tokenizer
    (tok / "tokenizer.json").write_text(json.dumps(t))
    args = [doc_path, "--load-memory", mem, "--max-tokens", 20, "--device", "cpu", "-q"]
    assert_one_error_line(invoke("run", *args, "--model", other, "--memory-size", 24), 2, "another model")
    assert_one_error_line(invoke("run", *args, "--model", tok, "--memory-size", 24), 2, "another tokenizer")
    assert_one_error_line(invoke("run", *args, "--model", tiny_model_dir, "--memory-size", 25), 2,
                          "pass --memory fifo --memory-size 24")
    assert_one_error_line(invoke("run", *args, "--model", tiny_model_dir, "--memory", "sink"), 2, "saved with policy fifo")
    assert_one_error_line(invoke("run", *args, "--model", tiny_model_dir, "--memory-size", 24, "--dtype", "bfloat16"),
                          2, "pass --dtype float32")


# -- 5. numerics ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_million_token_stream_stays_finite(policy):
    """1M random pairs in 16k-token segments: every state tensor and read stays finite and bounded."""
    g = torch.Generator().manual_seed(0)
    p = make_policy(policy, memory_size=512, sink_tokens=4, compress_rate=4, compressed_size=128)
    b, h, d, t = 1, 1, 4, 1 << 14
    state = p.init_state(b, h, d, device="cpu", dtype=torch.float32)
    shift = lambda k, delta: k  # noqa: E731 - positions are not under test here
    with torch.inference_mode():
        for _ in range((1 << 20) // t):
            k = torch.randn(b, h, t, d, generator=g) * 3 + 1  # a biased stream: the mean must not drift
            v = torch.randn(b, h, t, d, generator=g) * 3 - 1
            p.read(state, shift)
            state = p.update(state, k, v, k)
        st = p.stats(state)
        mem = p.read(state, shift)
    tensors = [x for x in vars(mem).values() if isinstance(x, torch.Tensor)] if mem is not None else []
    assert all(torch.isfinite(x).all() for x in tensors)
    assert math.isfinite(st.key_norm) and math.isfinite(st.value_norm) and st.key_norm < 100
    if policy in ("average",):
        assert abs(float(mem.k.mean()) - 1) < 0.05 and abs(float(mem.v.mean()) + 1) < 0.05
    if policy == "linear":
        assert state.n == 1 << 20 and torch.isfinite(state.mu).all() and torch.isfinite(state.nu).all()


def test_model_at_million_token_positions_is_finite(tiny_model_dir):
    """The tiny model, its memory jumped to position 1M, gives finite logits for every policy."""
    from segcli.models.seglm import SegLMForCausalLM

    model = SegLMForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, 8192, (1, 256), generator=torch.Generator().manual_seed(0))
    for policy in POLICY_NAMES:
        mem = model.new_memory(policy, memory_size=64, sink_tokens=4, compress_rate=4, compressed_size=16)
        mem.seen = 1_000_000
        with torch.inference_mode():
            for _ in range(3):
                out = model(ids, mem)
                mem = out.memory
                assert torch.isfinite(out.logits).all(), policy


def test_nan_in_a_segment_is_an_error_naming_it(base, doc_path, monkeypatch):
    from segcli.backends.native import NativeBackend as Backend

    real, calls = Backend.step, []

    def poisoned(self, ids, memory):
        logits, memory, mass = real(self, ids, memory)
        calls.append(1)
        if len(calls) == 3:
            logits = logits.clone()
            logits[0, 5, 7] = float("nan")
        return logits, memory, mass

    monkeypatch.setattr(Backend, "step", poisoned)
    steps_only(monkeypatch)
    res = invoke("run", doc_path, *base, "-s", 32)
    assert_one_error_line(res, 1, "segment 2 (tokens 64-96) produced a non-finite loss")
    assert len([r for r in res.stdout.splitlines() if r.strip()]) == 2  # segments 0, 1 were reported


# -- 6. determinism -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["compressive", "linear"])
def test_same_command_twice_byte_identical_apart_from_timing(base, doc_path, policy):
    args = ["run", doc_path, *base, *policy_args(policy), "-s", 40, "--per-token", "--max-tokens", 300]

    def canonical(res):
        return [json.dumps(untimed(r), sort_keys=True) for r in records(res)]

    assert canonical(invoke(*args)) == canonical(invoke(*args))
