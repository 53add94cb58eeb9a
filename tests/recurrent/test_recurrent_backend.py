"""The recurrent backend around the streams: routing, refusals (one line, exit 2), the load-time check of every
family, the memory report of states, generate and compare on recurrent models, and the
exact selective scan (segcli/ops/scan.py) in both its forms."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recurrent_families import FAMILIES, V, build_config  # noqa: E402
from test_recurrent_stream import model_maker, save_model  # noqa: E402

from conftest import SAMPLE, excerpt  # noqa: E402
from segcli.cli import app  # noqa: E402
from segcli.config import RunConfig  # noqa: E402
from segcli.ops.scan import chunk_selective_scan, recurrent_selective_scan  # noqa: E402

pytestmark = pytest.mark.transformers_api  # .ci/run runs this module again under an older transformers 5

runner = CliRunner()


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    return excerpt(tmp_path_factory, "hamlet.txt", 300, "recdoc2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return model_maker(tmp_path_factory)


def invoke(*args):
    return runner.invoke(app, [*map(str, args)])


def records(res) -> list[dict]:
    assert res.exit_code == 0, res.output
    return [json.loads(x) for x in res.stdout.splitlines()]


def one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("segcli: error: ") and "Traceback" not in res.output, res.output
    return lines[0]


def test_recurrent_configs_route_to_the_recurrent_backend():
    from transformers import LlamaConfig

    from segcli.backends import backend_kind

    for name in FAMILIES:
        cfg = build_config(name)
        if cfg is not None:
            assert backend_kind(cfg) == "recurrent", name
    assert backend_kind(LlamaConfig()) == "hf"


@pytest.mark.parametrize("name,policy,says", [
    ("jamba", "linear", "--memory linear changes the attention"),
    ("minimax", "fifo", "--memory fifo on its 1 attention layer is not supported"),
    ("recurrent_gemma", "sink", "--memory sink on its 1 attention layer is not supported"),
    ("kimi_linear", "fifo", "its attention layers do not cache key-value pairs"),  # MLA: latent + rotary parts
])
def test_what_a_hybrid_cannot_do_is_refused_in_one_line(model_dir, doc, name, policy, says):
    line = one_error_line(invoke("run", doc, "--model", model_dir(name), "--memory", policy, "--format", "jsonl"))
    assert line.startswith(f"segcli: error: {name}: ") and says in line and f"--memory {policy}" in line, line


def test_pure_recurrent_model_carries_its_state_under_every_policy_but_none(model_dir, doc):
    path = model_dir("mamba2")
    nll = {p: next(r for r in records(invoke("run", doc, "--model", path, "--memory", p, "-s", 16, "-q",
                                             "--format", "jsonl")) if r["type"] == "summary")["nll"]
           for p in ("full", "fifo", "linear", "none")}
    assert nll["fifo"] == nll["full"] == nll["linear"] != nll["none"]


def test_every_family_is_checked_at_load(model_dir, monkeypatch):
    """Every recurrent model streams only if a short probe in pieces equals one forward, whatever its family: mamba
    without its exact route (its torch scan restarts at zero) is refused in one line naming the family, the gap and
    the transformers version; with it, it loads."""
    import transformers

    from segcli.backends import load_backend, recurrent
    from segcli.config import RunConfig
    from segcli.errors import UsageError

    cfg = RunConfig(model=str(model_dir("mamba")), device="cpu", memory="full")
    assert load_backend(cfg).kind == "recurrent"
    monkeypatch.setattr(recurrent, "install_routes", lambda model: [])
    with pytest.raises(UsageError, match=r"^mamba: streaming its recurrent state in segments differs from one forward "
                       rf"under transformers {re.escape(transformers.__version__)} \(relative logit gap [0-9.e+-]+ on a "
                       r"12-token check at load\)") as e:
        load_backend(cfg)
    assert "\n" not in str(e.value)


def test_xlstm_with_the_default_qk_factor_streams(tmp_path, doc):
    """hidden 64 with qk_dim_factor 0.5: transformers' own xLSTMCache is sized 64 wide, the layers 32 (a cached
    forward crashes); segcli sizes the state from the layers and streams it exactly."""
    from transformers import xLSTMConfig

    from test_recurrent_stream import plain_forward, token_ids

    cfg = xLSTMConfig(vocab_size=V, hidden_size=64, embedding_dim=64, num_heads=4, num_blocks=2, num_hidden_layers=2,
                      qk_dim_factor=0.5, chunk_size=16)
    path = save_model("xlstm", tmp_path / "model", cfg)
    ref, _ = plain_forward(path, token_ids(path, doc))
    s = next(r for r in records(invoke("run", doc, "--model", path, "--memory", "full", "-s", 5, "-q",
                                       "--format", "jsonl")) if r["type"] == "summary")
    assert abs(s["nll"] - float(ref.sum())) <= 1e-4 * float(ref.sum())


@pytest.mark.parametrize("name", ["rwkv", "xlstm"])
def test_stabilisers_count_as_bytes_not_norms(model_dir, name):
    """rwkv's running maximum and xlstm's m are log-scale offsets: in the bytes, never in the state norm."""
    from segcli.backends import load_backend
    from segcli.config import RunConfig

    cfg = RunConfig(model=str(model_dir(name)), device="cpu", memory="full")
    backend = load_backend(cfg)
    memory = backend.new_memory(cfg)
    with torch.inference_mode():
        _, memory, _ = backend.step(torch.arange(1, 9)[None], memory)
        before = backend.memory_stats(memory)
        if name == "rwkv":
            memory.cache[4].fill_(1e6)
            stabiliser = memory.cache[4][:, :, 0]
        else:
            for _, _, m in memory.cache.rnn_state.values():
                m.fill_(1e6)
            stabiliser = memory.cache.rnn_state[0][2]
        after = backend.memory_stats(memory)
    assert [s.state_norm for s in after] == [s.state_norm for s in before]
    assert [s.conv_norm for s in after] == [s.conv_norm for s in before]
    assert all(s.kind == "recurrent" and s.state_norm > 0 for s in after)
    assert after[0].bytes > stabiliser.numel() * stabiliser.element_size() > 0


def test_hybrid_report_lists_attention_first_and_counts_every_state(model_dir, doc):
    from segcli.backends import load_backend
    from segcli.config import RunConfig
    from segcli.memory.recurrent_state import by_kind

    cfg = RunConfig(model=str(model_dir("zamba")), device="cpu", memory="full")
    backend = load_backend(cfg)
    memory = backend.new_memory(cfg)
    with torch.inference_mode():
        _, memory, _ = backend.step(torch.arange(1, 12)[None], memory)
    stats = backend.memory_stats(memory)
    kinds = [s.kind for s in stats]
    assert kinds == sorted(kinds, key=lambda k: k != "attention") and set(kinds) == {"attention", "recurrent"}
    report = by_kind(stats)
    assert report["attention"]["slots"] == 11 and report["attention"]["layers"] == 2  # zamba's 2 hybrid layers
    assert report["recurrent"]["layers"] == 5 and report["recurrent"]["tokens"] == 11
    state_bytes = sum(t.numel() * t.element_size() for layer in memory.cache.layers
                      for d in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {}))
                      for t in d.values() if t is not None)
    assert report["recurrent"]["bytes"] == state_bytes
    seg = records(invoke("run", doc, "--model", model_dir("zamba"), "--memory", "full", "-s", 32, "-q",
                         "--format", "jsonl"))[0]
    assert seg["memory"]["slots"] == 32 and seg["memory"]["bytes"] > state_bytes  # attention pairs + states


def test_none_holds_nothing_between_segments(model_dir, doc):
    segs = [r for r in records(invoke("run", doc, "--model", model_dir("qwen3_next"), "--memory", "none", "-s", 16,
                                      "-q", "--format", "jsonl")) if r["type"] == "segment"]
    assert all(r["memory"]["bytes"] == 0 and r["memory"]["slots"] == 0 for r in segs)


def test_generate_and_compare_take_a_recurrent_model(model_dir, doc):
    path = model_dir("mamba2")
    gen = invoke("generate", doc, "--model", path, "-n", 6, "--temperature", 0, "--device", "cpu", "-s", 8)
    assert gen.exit_code == 0 and gen.stdout.strip(), gen.output
    rows = [r for r in records(invoke("compare", doc, "--model", path, "--segment-sizes", "1,16", "--memory",
                                      "full,none", "--format", "jsonl", "--device", "cpu")) if r["type"] == "row"]
    full = [r["loss"] for r in rows if r["policy"] == "full"]
    assert len(rows) == 4 and abs(full[0] - full[1]) < 1e-5


# -- the scan -----------------------------------------------------------------------------------------------------------

def _scan_inputs(b=2, d=6, n=4, t=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(u=r(b, d, t), dt=r(b, d, t) * 0.5, A=-torch.rand(d, n, generator=g) * 2, B=r(b, n, t), C=r(b, n, t),
                D=r(d), z=r(b, d, t), dt_bias=r(d) * 0.1, dt_softplus=True)


@pytest.mark.parametrize("chunk", [1, 8, 64], ids=lambda c: f"chunk{c}")
def test_chunk_scan_equals_recurrent_scan_output_and_state(chunk):
    x = _scan_inputs()
    h0 = torch.randn(2, 6, 4)
    y1, h1 = recurrent_selective_scan(**x, initial_state=h0, output_final_state=True)
    y2, h2 = chunk_selective_scan(**x, initial_state=h0, output_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(y2, y1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h2, h1, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", [recurrent_selective_scan, chunk_selective_scan], ids=["recurrent", "chunk"])
def test_scan_in_pieces_with_the_state_equals_the_whole(form):
    x = _scan_inputs()
    whole, h = form(**x, output_final_state=True)
    cut = 20
    first = {k: (v[..., :cut] if k in ("u", "dt", "B", "C", "z") else v) for k, v in x.items()}
    rest = {k: (v[..., cut:] if k in ("u", "dt", "B", "C", "z") else v) for k, v in x.items()}
    y1, h1 = form(**first, output_final_state=True)
    y2, h2 = form(**rest, initial_state=h1, output_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], -1), whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h2, h, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,verdict", [("mamba2", "exact"), ("jamba", "exact"), ("kimi_linear", "refused")])
def test_engine_check_takes_a_recurrent_backend(model_dir, name, verdict):
    """segcli check's engine (segcli.engine.check) on recurrent and hybrid models: full at several segment sizes and
    fifo against the backend's `reference_logits` (a plain forward, masked as the stream is on attention layers)."""
    from segcli.backends import load_backend
    from segcli.documents import Document, tokenize
    from segcli.engine.check import check, sample_text

    cfg = RunConfig(model=str(model_dir(name)), device="cpu", memory="fifo", memory_size=16, dtype="float32")
    backend = load_backend(cfg)
    text = sample_text()[:1200]
    report = check(backend, tokenize(Document("sample", text, len(text.encode())), backend.tokenizer, backend.bos_id), cfg)
    assert report.verdict == verdict, [(s.policy, s.segment_size, s.verdict, s.reason) for s in report.settings]
    assert all(s.verdict == "exact" for s in report.settings if s.policy == "full")


@pytest.mark.parametrize("name", ["mamba2", "jamba"])
def test_save_memory_then_load_memory_equals_one_run(model_dir, tmp_path, name):
    """`run A --save-memory m` then `run B --load-memory m` gives B the numbers of `run A B` (its state carried
    through a memory file); a file of another policy is refused in one line."""
    text = (SAMPLE / "hamlet.txt").read_text(encoding="utf-8")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(text[:400], encoding="utf-8")
    b.write_text(text[5000:5400], encoding="utf-8")
    common = ("--model", model_dir(name), "--memory", "full", "--segment-size", 16, "--format", "jsonl", "-q",
              "--device", "cpu")
    both = [r for r in records(invoke("run", a, b, *common)) if r["type"] == "segment" and r["document"] == str(b)]
    mem = tmp_path / "m.safetensors"
    records(invoke("run", a, *common, "--save-memory", mem))
    second = [r for r in records(invoke("run", b, *common, "--load-memory", mem)) if r["type"] == "segment"]
    assert [r["nll"] for r in second] == pytest.approx([r["nll"] for r in both], rel=1e-5, abs=1e-4)
    assert [r["memory"]["bytes"] for r in second] == [r["memory"]["bytes"] for r in both]
    line = one_error_line(invoke("run", b, *[c if c != "full" else "fifo" for c in common], "--load-memory", mem))
    assert "saved with policy full" in line


def test_segcli_check_on_a_recurrent_model_is_exact(model_dir):
    res = invoke("check", "--model", model_dir("mamba2"), "--format", "json", "--max-tokens", 64, "-q")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["family"] == "mamba2" and {s["verdict"] for s in report["settings"]} == {"exact"}
