"""`segcli check --model DIR`: exact on a model segcli streams exactly (exit 0), differs on one whose attention was
broken (exit 1), refused where a policy cannot be streamed (exit 2); a table on request, JSON in a pipe."""

from __future__ import annotations

import json

import pytest
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from typer.testing import CliRunner

from conftest import BUNDLED_TOKENIZER, SAMPLE
from hf_families import save_family
from segcli.cli import app

pytestmark = pytest.mark.transformers_api  # .ci/run runs this module again under an older transformers 5

runner = CliRunner()
FAST = ["--max-tokens", "80", "--segment-sizes", "1,9", "--device", "cpu", "-q"]



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {name: str(save_family(name, tmp_path_factory.mktemp(name) / "model", BUNDLED_TOKENIZER))
            for name in ("llama", "mistral", "bloom")}


def check(*args) -> tuple[int, dict]:
    res = runner.invoke(app, ["check", *map(str, args), *FAST, "--format", "json"])
    assert res.exit_code in (0, 1, 2), res.output
    assert "Traceback" not in res.output
    return res.exit_code, json.loads(res.stdout)


def broken_sdpa(sdpa):
    """SDPA that drops the mask whenever a memory precedes the segment (keys > queries)."""
    def broken(module, query, key, value, attention_mask, **kwargs):
        if key.shape[2] > query.shape[2]:
            attention_mask = None
            kwargs["is_causal"] = False
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    return broken


def test_exact_model_exits_0(models):
    res = runner.invoke(app, ["check", "--model", models["llama"], *FAST, "--format", "table"])
    assert res.exit_code == 0, res.output
    assert "verdict: exact" in res.stdout and "differs" not in res.stdout


def test_json_names_every_setting(models, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text((SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[:1500], encoding="utf-8")
    code, report = check(doc, "--model", models["mistral"], "--memory", "fifo", "--memory-size", "24",
                         "--segment-size", "8")
    assert code == 0 and report["verdict"] == "exact" and report["family"] == "mistral"
    got = {(s["policy"], s["segment_size"], s["sizes"].get("memory_size")) for s in report["settings"]}
    assert got == {("full", 1, None), ("full", 9, None), ("fifo", 1, 24), ("fifo", 8, 24), ("fifo", 8, 81)}
    assert all(s["verdict"] == "exact" and abs(s["delta_nll"]) < 1e-3 for s in report["settings"])


def test_a_broken_attention_differs_and_exits_1(models, monkeypatch):
    """SDPA that drops the mask whenever a memory precedes the segment: the plain forward (no memory) is unchanged,
    every streamed setting with a memory reads the future of its segment."""
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", broken_sdpa(ALL_ATTENTION_FUNCTIONS["sdpa"]))
    res = runner.invoke(app, ["check", "--model", models["llama"], *FAST, "--format", "table",
                              "--attn-implementation", "sdpa"])
    assert res.exit_code == 1, res.output
    assert "differs" in res.stdout and "verdict: differs" in res.stdout


def test_the_same_broken_model_is_refused_at_load_by_run(models, monkeypatch, tmp_path):
    """What check reports as 'differs', run refuses before any number (the load-time check of every HF model): one
    line naming the family, the gap and the transformers version, exit 2, nothing on stdout."""
    import transformers

    doc = tmp_path / "doc.txt"
    doc.write_text((SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[:600], encoding="utf-8")
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", broken_sdpa(ALL_ATTENTION_FUNCTIONS["sdpa"]))
    res = runner.invoke(app, ["run", str(doc), "--model", models["llama"], "--device", "cpu", "-q",
                              "--format", "jsonl"])
    assert res.exit_code == 2 and res.stdout == "", res.output
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("segcli: error: llama: streaming it in segments differs from one forward under "
                           f"transformers {transformers.__version__} (relative logit gap"), line


def test_a_refused_policy_exits_2(models):
    code, report = check("--model", models["bloom"], "--memory", "linear")
    assert code == 2 and report["verdict"] == "refused"
    (refused,) = [s for s in report["settings"] if s["verdict"] == "refused"]
    assert refused["policy"] == "linear" and refused["reason"].startswith("bloom: --memory linear")
    assert all(s["verdict"] == "exact" for s in report["settings"] if s["policy"] == "full")


@pytest.mark.parametrize("args,words", [(["--format", "csv"], "--format must be table or json"),
                                        (["--segment-sizes", "1,x"], "--segment-sizes"),
                                        (["--attn-implementation", "flash"], "--attn-implementation"),
                                        (["--memory", "fifo", "--sink-tokens", "2"], "--sink-tokens")])
def test_bad_options_are_one_line(models, args, words):
    res = runner.invoke(app, ["check", "--model", models["llama"], *FAST, *args])
    assert res.exit_code == 2 and words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output


def test_the_bundled_model_is_not_checked():
    res = runner.invoke(app, ["check", *FAST])
    assert res.exit_code == 2 and "Hugging Face" in res.stderr, res.output
