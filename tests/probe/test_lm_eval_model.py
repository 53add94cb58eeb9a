"""The lm-eval model "segcli" on local task files (no downloads): under `full` memory its log-likelihoods, rolling
log-likelihoods and greedy generations are those of plain `lm_eval --model hf` on the same tiny model; a small
memory changes them. Skipped where lm-eval (the optional `segcli[eval]` extra) is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

DOCS = [
    {"text": "The grass is green. The sky is blue. The sun is", "target": " yellow",
     "choices": [" yellow", " green", " purple"], "label": 0},
    {"text": "One, two, three, four,", "target": " five", "choices": [" five", " seven"], "label": 0},
    {"text": "To be, or not to be, that is the", "target": " question", "choices": [" question", " answer", " river"],
     "label": 0},
    {"text": "The river ran clear and cold. Children skipped flat stones across the shallows while their parents "
             "washed linen on the rocks. Further down, where the banks grew steep, an old man sat with a",
     "target": " fishing line", "choices": [" fishing line", " sky", " a"], "label": 1},
]
TASKS = {
    "segcli_ll": {"output_type": "loglikelihood", "doc_to_text": "{{text}}", "doc_to_target": "{{target}}",
                  "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}]},
    "segcli_mc": {"output_type": "multiple_choice", "doc_to_text": "{{text}}", "doc_to_target": "{{label}}",
                  "doc_to_choice": "{{choices}}", "metric_list": [{"metric": "acc"}]},
    "segcli_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                       "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]},
    "segcli_gen": {"output_type": "generate_until", "doc_to_text": "{{text}}", "doc_to_target": "{{target}}",
                   "generation_kwargs": {"until": ["."], "max_gen_toks": 6, "do_sample": False},
                   "metric_list": [{"metric": "exact_match"}]},
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    import yaml

    d = tmp_path_factory.mktemp("lm-eval-tasks")
    data = d / "docs.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in DOCS), encoding="utf-8")
    for name, spec in TASKS.items():
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **spec}
        (d / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from probe_tiny_hf import build_llama

    return build_llama(tmp_path_factory.mktemp("lm-eval-llama") / "model")


@pytest.fixture(scope="module", autouse=True)
def offline():
    old = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def evaluate(task_dir, model: str, model_args: str) -> dict:
    import segcli.eval.harness  # noqa: F401  (registers "segcli")

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), device="cpu", batch_size=1,
                                  log_samples=True, task_manager=TaskManager(include_path=str(task_dir)))
    return {task: sorted(samples, key=lambda s: s["doc_id"]) for task, samples in out["samples"].items()}


def responses(samples: list[dict]) -> list:
    return [s["resps"] for s in samples]


def flat_numbers(x) -> list[float]:
    if isinstance(x, (list, tuple)):
        return [v for item in x for v in flat_numbers(item)]
    return [float(x)] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


@pytest.fixture(scope="module")
def hf_results(task_dir, hf_dir):
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (pip install 'lm-eval[hf]')")
    return evaluate(task_dir, "hf", f"pretrained={hf_dir},max_length=2048,dtype=float32")


@pytest.mark.parametrize("args", ["memory=full,segment_size=4", "memory=fifo,memory_size=4096,segment_size=1",
                                  "memory=sink,memory_size=4096,segment_size=8"])
def test_full_memory_gives_plain_hf_numbers(task_dir, hf_dir, hf_results, args):
    ours = evaluate(task_dir, "segcli", f"model={hf_dir},{args}")
    for task in ("segcli_ll", "segcli_mc", "segcli_rolling"):
        a, b = responses(ours[task]), responses(hf_results[task])
        assert len(flat_numbers(b)) == {"segcli_ll": 4, "segcli_mc": 11, "segcli_rolling": 4}[task]
        assert flat_numbers(a) == pytest.approx(flat_numbers(b), rel=1e-4, abs=1e-4), task
        greedy = [[bool(x[1]) for x in s["resps"][0:] for x in x if isinstance(x, (list, tuple))] for s in ours[task]]
        greedy_hf = [[bool(x[1]) for x in s["resps"][0:] for x in x if isinstance(x, (list, tuple))] for s in hf_results[task]]
        assert greedy == greedy_hf, task
    assert [s["filtered_resps"] for s in ours["segcli_gen"]] == [s["filtered_resps"] for s in hf_results["segcli_gen"]]


def test_a_small_memory_changes_the_numbers(task_dir, hf_dir, hf_results):
    ours = evaluate(task_dir, "segcli", f"model={hf_dir},memory=fifo,memory_size=2,segment_size=2")
    a, b = flat_numbers(responses(ours["segcli_ll"])), flat_numbers(responses(hf_results["segcli_ll"]))
    assert a != pytest.approx(b, rel=1e-3)


def test_the_bundled_native_model_runs_every_request_type(task_dir):
    ours = evaluate(task_dir, "segcli", "model=bundled,memory=fifo,memory_size=64,segment_size=16")
    assert set(ours) == set(TASKS)
    lls = flat_numbers(responses(ours["segcli_ll"]))
    assert lls and all(x == x for x in lls)  # finite numbers
    assert all(isinstance(s["filtered_resps"][0], str) for s in ours["segcli_gen"])


def test_unknown_model_args_are_refused(hf_dir):
    from segcli.eval.harness import SegcliLM

    with pytest.raises(ValueError, match="unknown memroy"):
        SegcliLM(model=str(hf_dir), memroy="fifo")
    with pytest.raises(ValueError, match="device 'cuda:1'"):
        SegcliLM(model=str(hf_dir), device="cuda:1")


def test_the_command_line(task_dir, hf_dir, tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "segcli.eval", "--model", "segcli", "--model_args",
                        f"model={hf_dir},memory=fifo,memory_size=512,segment_size=128", "--tasks", "segcli_ll",
                        "--include_path", str(task_dir), "--device", "cpu", "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "segcli_ll" in p.stdout and "perplexity" in p.stdout
