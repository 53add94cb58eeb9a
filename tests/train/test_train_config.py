"""The training config (segcli/train/config.py): base chains, the task registry's YAML, the old flat format."""

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import ROOT
from segcli.errors import UsageError
from segcli.train import TrainConfig, from_dict, resolve_config
from segcli.train.config import check_config
from segcli.train.tasks import CopyTask, JumpTask, RepeatTask

STAGES = ROOT / "experiments" / "bundled-model" / "configs"
BEFORE = json.loads((Path(__file__).parent / "bundled_stages_flat.json").read_text())["stages"]


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("stage", sorted(BEFORE))
def test_each_stage_override_resolves_to_the_config_its_old_full_file_gave(stage):
    got = resolve_config(STAGES / f"{stage}.yaml")
    assert got == from_dict(BEFORE[stage], stage)
    check_config(dataclasses.replace(got, init_from=None))  # every value valid (the runs/ it starts from aside)
    text = (STAGES / f"{stage}.yaml").read_text()
    assert stage == "train-bundled" or "base: " in text, "a stage states what it changes from its base"


def test_the_stages_restate_no_key_of_their_base():
    import yaml

    for path in STAGES.glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        if "base" not in data:
            continue
        base = resolve_config(path.parent / data["base"]).to_dict()
        same = [k for k, v in data.items() if k not in ("base", "tasks") and base.get(k) == v]
        for name, settings in (data.get("tasks") or {}).items():
            same += [f"tasks.{name}.{k}" for k, v in settings.items() if base["tasks"].get(name, {}).get(k) == v]
        assert not same, f"{path.name} restates {same}"


def test_the_shipped_training_record_loads_as_the_last_stage():
    record = json.loads((ROOT / "segcli" / "bundled" / "training.json").read_text())["config"]  # the flat format
    assert from_dict(record, "training.json") == resolve_config(STAGES / "train-bundled-jump.yaml")


def test_flat_keys_map_onto_tasks_as_the_flat_format_trained():
    cfg = from_dict({"copy_prob": 0.0, "copy_passages": 4, "copy_len": [5, 9], "repeat_prob": 0.25, "jump_prob": 0.5,
                     "jump": [10, 20], "tokenizer": "segcli/bundled/tokenizer.json", "init_from": "segcli/bundled"})
    assert cfg.tasks == {"repeat": RepeatTask(prob=0.25),  # copy_prob 0: copying was off
                         "jump": JumpTask(prob=0.5, skip=[10, 20], passages=4, length=[5, 9])}  # jumps copied copy_*
    assert (cfg.tokenizer, cfg.init_from) == ("bundled", "bundled"), "the repository-relative paths of the bundled files"
    assert from_dict({}) == TrainConfig() and TrainConfig().tasks == {}
    assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, "a training.json record loads back"


def test_base_chains_merge_tasks_and_replace_everything_else(tmp_path):
    write(tmp_path, "lab/root.yaml", "seq_len: 512\nmodel: {hidden_size: 64, dropout: 0.1}\npolicies: {fifo: 3, none: 1}\n"
          "tasks:\n  copy: {prob: 0.5, gap: [4, 40]}\n  repeat: {prob: 0.2}\n  jump: {prob: 0.1}\n")
    write(tmp_path, "lab/mid.yaml", "base: root.yaml\nseq-len: 1024\n")
    leaf = write(tmp_path, "leaf.yaml", "base: lab/mid.yaml\nmodel: {}\npolicies: {xl: 1}\n"
                 "tasks: {copy: {passages: 5}, repeat: null, jump: {skip: [9, 9]}}\n")
    cfg = resolve_config(leaf)
    assert cfg.seq_len == 1024 and cfg.model == {} and cfg.policies == {"xl": 1}, "keys replace the base's, mappings too"
    assert cfg.tasks == {"copy": CopyTask(prob=0.5, passages=5, gap=[4, 40]), "jump": JumpTask(prob=0.1, skip=[9, 9])}
    cfg = resolve_config(leaf, {"tasks.copy.gap": [1, 2], "tasks.jump": None, "model.dropout": 0.2})
    assert cfg.tasks == {"copy": CopyTask(prob=0.5, passages=5, gap=[1, 2])} and cfg.model == {"dropout": 0.2}


@pytest.mark.parametrize("files, words", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "loops back"),
    ({"a.yaml": "base: missing.yaml\n"}, "not found"),
    ({"a.yaml": "base: [b.yaml]\n"}, "base must be the path"),
    ({"a.yaml": "tasks: {copy: {gap: [1, 2]}}\n"}, "tasks.copy needs prob"),
    ({"a.yaml": "tasks: {copy: {prob: 0.1, len: [1, 2]}}\n"}, "unknown key 'len'"),
    ({"a.yaml": "tasks: {markov: {prob: 0.1}}\n"}, "unknown task 'markov'"),
    ({"a.yaml": "tasks: [copy]\n"}, "tasks must be a mapping"),
    ({"a.yaml": "copy_prob: 0.5\ntasks: {repeat: {prob: 0.1}}\n"}, "tasks.copy.prob"),
    ({"a.yaml": "tasks: {copy: {prob: 1.5}}\n"}, "tasks.copy.prob must be in [0, 1]"),
    ({"a.yaml": "val_every: 0\n"}, "val_every must be >= 1"),
    ({"a.yaml": "segment_sizes: []\n"}, "segment_sizes must be a non-empty list"),
    ({"a.yaml": "policies: {fifo: 0}\n"}, "not all 0"),
])
def test_bad_configs_are_usage_errors_naming_what_is_wrong(tmp_path, files, words):
    from segcli.train import load_train_config

    for name, text in files.items():
        write(tmp_path, name, text)
    with pytest.raises(UsageError) as err:
        load_train_config(tmp_path / "a.yaml", {})
    assert words in str(err.value) and "\n" not in str(err.value), err.value
