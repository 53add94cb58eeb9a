"""`segcli train` on a tiny config, then the checkpoint in `segcli run --model`; the bundled model."""

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


def test_insert_copies_repeats_passages_verbatim_within_bounds():
    import numpy as np

    from segcli.train import insert_copies

    rng = np.random.default_rng(0)
    x = np.arange(4 * 600).reshape(4, 600)  # distinct tokens: a copy is identifiable by its values
    orig = x.copy()
    mask = insert_copies(x, rng, passages=3, length=(10, 30), gap=(5, 100))
    assert mask.any(axis=1).all(), "every row got at least one passage"
    for b in range(4):
        runs = np.flatnonzero(np.diff(np.concatenate([[0], mask[b].astype(int), [0]])))
        for lo, hi in zip(runs[::2], runs[1::2]):
            assert 10 <= hi - lo <= 30, "one run per passage (a gap of >= 5 separates copies)"
            src = int(x[b, lo] - orig[b, 0])  # where the copied values came from
            assert np.array_equal(x[b, lo:hi], orig[b, src : src + hi - lo]), "copies are verbatim"
            assert src + (hi - lo) <= lo, "the source precedes its copy"
        assert np.array_equal(x[b][~mask[b]], orig[b][~mask[b]]), "nothing else changes"


@pytest.mark.parametrize("ids", ["unigram", "uniform"])
def test_repeat_rows_are_periodic_and_their_first_string_unscored(ids):
    import numpy as np

    from segcli.train import TrainConfig, draw_batch

    tokens = 1000 + np.arange(20_000) % 5000
    cfg = TrainConfig(seq_len=300, repeat_prob=1.0, repeat_len=[5, 40], repeat_ids=ids)
    vocab = 300 if ids == "uniform" else None
    x, mask, scored = draw_batch(tokens, np.array([0, 8192]), 8192, cfg, 6, np.random.default_rng(0), vocab)
    x, mask, scored = x.numpy(), mask.numpy(), scored.numpy()
    for b in range(6):
        m = int((~scored[b]).sum()) - 1  # positions 0..m unscored
        assert 5 <= m <= 40 and not scored[b, : m + 1].any() and scored[b, m + 1 :].all()
        assert np.array_equal(x[b, m:], x[b, :-m]), "the row repeats with period m"
        lo, hi = (1000, 6000) if ids == "unigram" else (1, 300)  # corpus ids, or any id but 0 of the vocabulary
        assert len(set(x[b, :m])) > m // 2 and x[b].min() >= lo and x[b].max() < hi
        assert np.array_equal(mask[b], scored[b])


def test_sequence_loss_counts_only_scored_targets():
    import numpy as np

    from segcli.models.seglm import SegLMConfig, SegLMForCausalLM
    from segcli.train import TrainConfig, sequence_loss

    torch.manual_seed(0)
    model = SegLMForCausalLM(SegLMConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, dropout=0.0)).eval()
    x = torch.randint(0, 50, (2, 41))
    scored = torch.from_numpy(np.random.default_rng(1).random((2, 41)) < 0.6)
    scored[:, 1:11] = False  # the whole first segment unscored: it must add nothing, not NaN
    with torch.no_grad():
        got = sequence_loss(model, x, "full", 10, 64, TrainConfig(), torch.float32, backward=False, scored=scored)
        logits = model(x[:, :-1], model.new_memory("full", 2)).logits  # one causal forward = full memory
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(2, 40)
    want = float(nll[scored[:, 1:]].mean())
    assert abs(got - want) < 1e-5
    with torch.no_grad():  # a segment size that does not divide the length: the last segment is short
        short = sequence_loss(model, x, "full", 16, 64, TrainConfig(), torch.float32, backward=False, scored=scored)
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
    second.write_text(base + f"out_dir: {tmp_path / 'b'}\ncopy_prob: 0.5\nrepeat_prob: 0.5\ncopy_passages: 2\ncopy_len: [8, 16]\ncopy_gap: [4, 64]\n"
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


def test_set_overrides_any_config_key_and_rejects_bad_ones(tmp_path):
    from segcli.cli.train import parse_settings
    from segcli.train import load_train_config

    cfg_path = tmp_path / "t.yaml"
    cfg_path.write_text("batch_size: 4\nmax_minutes: 30\ncopy_len: [8, 16]\n")
    cfg = load_train_config(str(cfg_path), {}, parse_settings(["batch_size=64", "copy_len=[4, 9]", "lr=3e-4", "steps=7"]))
    assert (cfg.batch_size, cfg.copy_len, cfg.lr, cfg.steps, cfg.max_minutes) == (64, [4, 9], 3e-4, 7, None)
    assert parse_settings(["out_dir=nan", "corpus=inf"]) == {"out_dir": "nan", "corpus": "inf"}, "only 1e-3-style numbers convert"
    for bad, words in ((["--set", "bogus=1"], "unknown key"), (["--set", "batch_size"], "KEY=VALUE"),
                       (["--set", "batch_size=many"], "batch_size"), (["--set", "repeat_ids=zipf"], "repeat_ids"),
                       (["--set", "smear_lr_scale=0"], "smear_lr_scale")):
        res = runner.invoke(app, ["train", "--config", str(cfg_path), "--quiet", *bad])
        assert res.exit_code == 2 and words in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_jump_rows_copy_first_half_passages_into_the_second():
    import numpy as np

    from segcli.train import TrainConfig, jump_batch

    cfg = TrainConfig(seq_len=256, copy_passages=3, copy_len=[8, 24])
    ids = np.random.default_rng(1).integers(1, 8000, size=4096)  # distinct-enough runs: no chance matches of 8
    x, scored = jump_batch(ids, np.array([0, 1000, 2000]), 1024, cfg, 6, np.random.default_rng(0))
    assert x.shape == scored.shape == (6, 257)
    assert not scored[:, 128].any() and scored.sum() == 6 * 256, "only the first target after the jump is unscored"
    found = 0
    for row in x.numpy():
        first, second = row[1:128].tolist(), row[129:].tolist()
        # every 8-token run that the copies put in the second half occurs in the first half
        runs = {tuple(first[i : i + 8]) for i in range(len(first) - 7)}
        found += sum(tuple(second[i : i + 8]) in runs for i in range(len(second) - 7))
    assert found >= 6 * 3, found
    tight = TrainConfig(seq_len=256, copy_passages=8, copy_len=[8, 40])  # passages fill the second half: no overrun
    for seed in range(50):
        jump_batch(ids, np.array([0, 1000, 2000]), 1024, tight, 4, np.random.default_rng(seed))


def test_a_jump_moves_the_second_half_away_from_the_first(tmp_path):
    from conftest import tiny_model
    from segcli.train import TrainConfig, sequence_loss

    model = tiny_model(smear_keys=True)
    x = torch.randint(1, 200, (2, 65))
    x[:, 40:56] = x[:, 5:21]  # a copy across the halves (inputs 0..31 | 32..63)
    cfg = TrainConfig()
    losses = [sequence_loss(model, x, "fifo", 32, 64, cfg, torch.float32, backward=False, jump=j) for j in (0, 0, 5000)]
    assert losses[0] == losses[1] and abs(losses[2] - losses[0]) > 1e-3, losses
    full_row = sequence_loss(model, x, "full", 64, 64, cfg, torch.float32, backward=False)
    assert losses[0] == pytest.approx(full_row, abs=1e-5), "no jump: the halves through memory = one causal pass"
