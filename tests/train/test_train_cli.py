"""`segcli train` as a user meets it (typer's CliRunner on segcli.cli.app): any working directory, bad values
refused with exit 2 and one line before anything is written."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import SAMPLE
from segcli.cli import app

runner = CliRunner()

MODEL = "model: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}\n"
TINY = ("seq_len: 64\nbatch_size: 1\nsteps: 1\nwarmup_steps: 1\nval_every: 1\ncheckpoint_every: 1\nval_batches: 1\n"
        "val_fraction: 0.0\nsegment_sizes: [32]\nmemory_sizes: [32]\ndevice: cpu\n")  # with MODEL: seconds on a CPU


@pytest.fixture()
def elsewhere(tmp_path, monkeypatch):
    """A working directory far from the repository, holding a small corpus."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text((SAMPLE / "milton_areopagitica.txt").read_text(encoding="utf-8")[:30000],
                                               encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("tokenizer", ["", "tokenizer: bundled\n", "tokenizer: segcli/bundled/tokenizer.json\n"],
                         ids=["default", "bundled", "old-repo-path"])
def test_train_works_from_any_directory_with_the_bundled_tokenizer(elsewhere, tokenizer):
    (elsewhere / "t.yaml").write_text("corpus: corpus\nout_dir: run\n" + tokenizer + MODEL + TINY)
    res = runner.invoke(app, ["train", "--config", "t.yaml", "--quiet", "--log-jsonl", "log.jsonl"])
    assert res.exit_code == 0, res.output
    events = [json.loads(x) for x in (elsewhere / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "step", "checkpoint", "done"]
    model = elsewhere / "run" / "model"
    assert json.loads((model / "config.json").read_text())["num_hidden_layers"] == 1
    record = json.loads((model / "training.json").read_text())["config"]
    assert record["tokenizer"] == "bundled" and record["tasks"] == {}
    from segcli.backends import BUNDLED_DIR

    assert (model / "tokenizer.json").read_bytes() == (BUNDLED_DIR / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("model, words", [
    ("{num_layers: 1}", ["'num_layers'", "num_hidden_layers", "hidden_size"]),  # issue 21: it trained the full model
    ("{hidden_size: wide}", ["'hidden_size'", "int"]),
    ("{hidden_size: 30, num_attention_heads: 4}", ["multiple of num_attention_heads"]),
])
def test_bad_model_keys_exit_2_naming_the_key(elsewhere, model, words):
    (elsewhere / "t.yaml").write_text(TINY + f"corpus: corpus\nout_dir: run\nmodel: {model}\n")
    res = runner.invoke(app, ["train", "--config", "t.yaml", "--quiet"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert all(w in res.output for w in words), res.output
    assert not (elsewhere / "run").exists(), "refused before anything is written"


def test_device_is_validated(elsewhere, monkeypatch):
    (elsewhere / "t.yaml").write_text("corpus: corpus\nout_dir: run\n" + MODEL + TINY)
    res = runner.invoke(app, ["train", "--config", "t.yaml", "--quiet", "--device", "gpu"])
    assert res.exit_code == 2 and "gpu" in res.output, res.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in (["--device", "cuda"], ["--set", "device=cuda"]):
        res = runner.invoke(app, ["train", "--config", "t.yaml", "--quiet", "--log-jsonl", "log.jsonl", *args])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
        assert "no CUDA GPU" in res.output and "--device cpu" in res.output, res.output
    (elsewhere / "bad.yaml").write_text("corpus: corpus\n" + MODEL + TINY.replace("device: cpu", "device: tpu"))
    res = runner.invoke(app, ["train", "--config", "bad.yaml", "--quiet"])
    assert res.exit_code == 2 and "device" in res.output and "tpu" in res.output, res.output
    assert not (elsewhere / "run").exists() and not (elsewhere / "log.jsonl").exists()


def test_set_overrides_any_config_key_and_rejects_bad_ones(tmp_path):
    from segcli.cli.train import parse_settings
    from segcli.train import load_train_config

    cfg_path = tmp_path / "t.yaml"
    cfg_path.write_text("batch_size: 4\nmax_minutes: 30\ntasks: {copy: {prob: 0.5, length: [8, 16]}}\n")
    cfg = load_train_config(str(cfg_path), {}, parse_settings(["batch_size=64", "tasks.copy.length=[4, 9]", "lr=3e-4",
                                                               "steps=7", "model.rope_theta=5e5"]))
    assert (cfg.batch_size, cfg.tasks["copy"].length, cfg.lr, cfg.steps, cfg.max_minutes) == (64, [4, 9], 3e-4, 7, None)
    assert cfg.tasks["copy"].prob == 0.5 and cfg.model == {"rope_theta": 5e5}
    assert parse_settings(["out_dir=nan", "corpus=inf"]) == {"out_dir": "nan", "corpus": "inf"}, "only 1e-3-style numbers convert"
    for bad, words in ((["--set", "bogus=1"], "unknown key"), (["--set", "batch_size"], "KEY=VALUE"),
                       (["--set", "batch_size=many"], "batch_size"), (["--set", "tasks.repeat={prob: 0.1, ids: zipf}"], "ids"),
                       (["--set", "tasks.copy.prob=0.7", "--set", "tasks.repeat.prob=0.5"], "sum to <= 1"),
                       (["--set", "tasks.zipf.prob=1"], "unknown task 'zipf'"), (["--set", "tasks.copy.len=[1, 2]"], "'len'"),
                       (["--set", "copy_prob=0.5"], "tasks.copy.prob"),  # the old flat key next to tasks: names the new one
                       (["--set", "smear_lr_scale=0"], "smear_lr_scale"), (["--set", "policies={lru: 1}"], "lru")):
        res = runner.invoke(app, ["train", "--config", str(cfg_path), "--quiet", *bad])
        assert res.exit_code == 2 and words in res.output and len(res.output.strip().splitlines()) == 1, (bad, res.output)


def test_a_corpus_without_text_exits_2_before_anything_is_written(elsewhere):
    (elsewhere / "empty").mkdir()
    (elsewhere / "t.yaml").write_text("corpus: empty\nout_dir: run\n" + MODEL + TINY)
    res = runner.invoke(app, ["train", "--config", "t.yaml", "--quiet"])
    assert res.exit_code == 2 and "no .txt files" in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (elsewhere / "run").exists()
