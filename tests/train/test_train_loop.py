"""The training loop (segcli/train/loop.py): `segcli train` on tiny configs, step losses against values recorded
before training became a package, the streamed loss; the bundled model as the default of `segcli run`."""

import json

import pytest
import torch

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
        f"corpus: {corpus}\nout_dir: {tmp_path / 'run'}\n"  # tokenizer: the bundled one by default

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
    assert json.loads((model_dir / "config.json").read_text())["trained_length"] == 128, "seq_len: the span notes' limit"
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


def test_sequence_loss_counts_only_scored_targets(monkeypatch):
    import numpy as np

    from segcli.models.seglm import SegLMConfig, SegLMForCausalLM
    import segcli.train.loop as loop
    from segcli.train import Plan, TrainConfig, sequence_loss

    torch.manual_seed(0)
    model = SegLMForCausalLM(SegLMConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, dropout=0.0)).eval()
    x = torch.randint(0, 50, (2, 41))
    scored = torch.from_numpy(np.random.default_rng(1).random((2, 41)) < 0.6)
    scored[:, 1:11] = False  # the whole first segment unscored: it must add nothing, not NaN
    starts, engine_stream = [], loop.stream

    def watched(step, memory, segments):  # the engine's one segment loop, watched
        segments = list(segments)
        starts.extend(start for _, start in segments)
        return engine_stream(step, memory, segments)

    with torch.no_grad():
        monkeypatch.setattr(loop, "stream", watched)
        got = sequence_loss(model, x, Plan("full", 10, 64), TrainConfig(), torch.float32, backward=False, scored=scored)
        monkeypatch.undo()
        assert starts == [0, 10, 20, 30], "segments go through segcli.engine.loop.stream"
        logits = model(x[:, :-1], model.new_memory("full", 2)).logits  # one causal forward = full memory
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(2, 40)
    want = float(nll[scored[:, 1:]].mean())
    assert abs(got - want) < 1e-5
    with torch.no_grad():  # a segment size that does not divide the length: the last segment is short
        short = sequence_loss(model, x, Plan("full", 16, 64), TrainConfig(), torch.float32, backward=False, scored=scored)
    assert abs(short - want) < 1e-5


def test_init_from_and_copy_data_train_from_a_saved_model(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text((SAMPLE / "milton_areopagitica.txt").read_text(encoding="utf-8")[:80000], encoding="utf-8")
    base = (f"corpus: {corpus}\ntokenizer: {BUNDLED_TOKENIZER}\n"
            "seq_len: 256\nbatch_size: 2\nsteps: 2\nwarmup_steps: 1\nval_every: 2\ncheckpoint_every: 2\nval_fraction: 0.3\n"
            "policies: {fifo: 1}\nsegment_sizes: [64]\nmemory_sizes: [128]\n")
    first = tmp_path / "first.yaml"
    first.write_text(base + f"out_dir: {tmp_path / 'a'}\n"
                     "model: {hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}\n")
    assert runner.invoke(app, ["train", "--config", str(first), "--quiet"]).exit_code == 0
    second = tmp_path / "second.yaml"
    second.write_text(base + f"out_dir: {tmp_path / 'b'}\n"
                      "tasks: {copy: {prob: 0.5, passages: 2, length: [8, 16], gap: [4, 64]}, repeat: {prob: 0.5}}\n"
                      "model: {smear_keys: true}\nsmear_lr_scale: 20\n")  # switches smeared keys on in the loaded model
    log = tmp_path / "log.jsonl"
    res = runner.invoke(app, ["train", "--config", str(second), "--quiet", "--init-from", str(tmp_path / "a" / "model"),
                              "--log-jsonl", str(log)])
    assert res.exit_code == 0, res.output
    events = [json.loads(x) for x in log.read_text().splitlines()]
    assert events[0]["params"] < 1_000_000, "the small saved model was loaded, not a default-sized one"
    val = [e for e in events if e["event"] == "val"][-1]
    assert {"val_copy_fifo", "val_copy_none", "val_repeat_fifo", "val_repeat_none"} <= set(val)
    from segcli.models.seglm import SegLMForCausalLM

    tuned = SegLMForCausalLM.from_pretrained(tmp_path / "b" / "model")
    beta = torch.stack([layer.attn.key_smear for layer in tuned.model.layers]).detach()
    # started at 0; two Adam steps at lr 2e-3 x 20 move each share ~0.04 (at lr alone they could not pass 0.004)
    assert tuned.config.smear_keys and beta.abs().min() > 0.01, beta
    bad = runner.invoke(app, ["train", "--config", str(second), "--quiet", "--init-from", str(tmp_path)])
    assert bad.exit_code == 2 and "init_from" in bad.output


def test_a_jump_moves_the_second_half_away_from_the_first(tmp_path):
    from conftest import tiny_model
    from segcli.train import Plan, TrainConfig, sequence_loss

    model = tiny_model(smear_keys=True)
    x = torch.randint(1, 200, (2, 65))
    x[:, 40:56] = x[:, 5:21]  # a copy across the halves (inputs 0..31 | 32..63)
    cfg = TrainConfig()
    losses = [sequence_loss(model, x, Plan("fifo", 32, 64, skips={32: j}), cfg, torch.float32, backward=False)
              for j in (0, 0, 5000)]
    assert losses[0] == losses[1] and abs(losses[2] - losses[0]) > 1e-3, losses
    full_row = sequence_loss(model, x, Plan("full", 64, 64), cfg, torch.float32, backward=False)
    assert losses[0] == pytest.approx(full_row, abs=1e-5), "no jump: the halves through memory = one causal pass"


# Recorded at d4fe22f (segcli/train.py, before training became a package) with the same config in the flat
# format (copy_prob 0.4, copy_passages 2, copy_len [6, 20], copy_gap [2, 40], repeat_prob 0.3, repeat_len [3, 16],
# repeat_ids uniform, jump_prob 0.5, jump [100, 900]); the package reproduced them bit for bit on that machine.
RECORDED_STEPS = [  # loss, policy, segment size, memory size, positions jumped
    (9.020782320911348, "fifo", 96, 96, 192), (9.01171588897705, "fifo", 64, 48, None),
    (8.984743532710052, "fifo", 96, 96, 276), (8.998855686873842, "sink", 64, 48, None),
    (8.893369514904721, "fifo", 96, 96, 417), (8.848978042602539, "fifo", 64, 48, None),
]
RECORDED_VAL = {"val_fifo": 8.79986572265625, "val_none": 8.814471880594889, "val_copy_fifo": 8.792445182800293,
                "val_copy_none": 8.795623779296875, "val_repeat_fifo": 8.99693143304019, "val_repeat_none": 8.998392033704462}


@pytest.mark.parametrize("form", ["tasks", "flat"])
def test_step_losses_equal_the_values_recorded_before_the_package(tmp_path, form):
    from segcli.train import from_dict, train

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text((SAMPLE / "milton_areopagitica.txt").read_text(encoding="utf-8")[:60000],
                                               encoding="utf-8")
    common = dict(corpus=str(tmp_path / "corpus"), out_dir=str(tmp_path / "run"), tokenizer=str(BUNDLED_TOKENIZER),
                  model=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, smear_keys=True),
                  seq_len=192, batch_size=3, steps=6, warmup_steps=2, lr=3e-3, val_every=6, checkpoint_every=6,
                  val_batches=1, val_fraction=0.3, smear_lr_scale=10.0,
                  policies={"fifo": 2, "linear": 1, "compressive": 1, "sink": 1}, segment_sizes=[32, 64],
                  memory_sizes=[48], seed=4, device="cpu", keep_best=False)
    if form == "flat":
        data = {**common, "copy_prob": 0.4, "copy_passages": 2, "copy_len": [6, 20], "copy_gap": [2, 40], "repeat_prob": 0.3,
                "repeat_len": [3, 16], "repeat_ids": "uniform", "jump_prob": 0.5, "jump": [100, 900]}
    else:
        data = {**common, "tasks": {"copy": {"prob": 0.4, "passages": 2, "length": [6, 20], "gap": [2, 40]},
                                    "repeat": {"prob": 0.3, "length": [3, 16], "ids": "uniform"},
                                    "jump": {"prob": 0.5, "skip": [100, 900], "passages": 2, "length": [6, 20]}}}
    events = list(train(from_dict(data)))
    steps = [e.data for e in events if e.kind == "step"]
    got = [(s["loss"], s["policy"], s["segment_size"], s["memory_size"], s.get("jump")) for s in steps]
    assert [g[1:] for g in got] == [r[1:] for r in RECORDED_STEPS], "the same settings and jumps, step by step"
    assert [g[0] for g in got] == pytest.approx([r[0] for r in RECORDED_STEPS], rel=1e-5, abs=0)
    val = [e.data for e in events if e.kind == "val"][-1]
    assert val == pytest.approx(RECORDED_VAL, rel=1e-5, abs=0)
