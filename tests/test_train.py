"""`segcli train` on a tiny config, then the checkpoint in `segcli run --model`; the bundled model."""

import json

from typer.testing import CliRunner

from conftest import BUNDLED_TOKENIZER, SAMPLE
from segcli.cli import app

runner = CliRunner()


def test_tiny_training_run_resume_and_load(tmp_path, doc_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = (SAMPLE / "milton_areopagitica.txt").read_text(encoding="utf-8")
    (corpus / "a.txt").write_text(text[:60000], encoding="utf-8")
    (corpus / "b.txt").write_text(text[60000:], encoding="utf-8")
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"corpus: {corpus}\ntokenizer: {BUNDLED_TOKENIZER}\nout_dir: {tmp_path / 'run'}\n"
        "model: {hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}\n"
        "seq_len: 128\nbatch_size: 4\nsteps: 6\nwarmup_steps: 2\nval_every: 3\ncheckpoint_every: 3\n"
        "policies: {fifo: 1, linear: 1, compressive: 1}\nsegment_sizes: [32, 64]\nmemory_sizes: [32]\nval_fraction: 0.3\n"
    )
    log = tmp_path / "log.jsonl"
    res = runner.invoke(app, ["train", "--config", str(cfg), "--quiet", "--steps", "3", "--log-jsonl", str(log)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--config", str(cfg), "--quiet", "--resume", "--log-jsonl", str(log)])
    assert res.exit_code == 0, res.output
    events = [json.loads(x) for x in log.read_text().splitlines()]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6], "resume continues where the checkpoint stopped"
    assert events[-1]["event"] == "done"
    model_dir = tmp_path / "run" / "model"
    out = runner.invoke(app, ["run", str(doc_path), "--model", str(model_dir), "--max-tokens", "100", "-q", "--format", "jsonl"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.splitlines()[-1])["tokens"] == 100


def test_bundled_model_is_the_default_and_memory_helps(doc_path):
    def loss(policy):
        res = runner.invoke(app, ["run", str(doc_path), "--memory", policy, "--segment-size", "16", "-q",
                                  "--format", "jsonl", "--device", "cpu"])
        assert res.exit_code == 0, res.output
        summary = json.loads(res.stdout.splitlines()[-1])
        assert summary["config"]["model"] == "bundled"
        return summary["loss"]

    assert loss("fifo") < loss("none") - 0.2
