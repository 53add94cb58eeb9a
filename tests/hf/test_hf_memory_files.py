"""Memory files of Hugging Face transformers (segcli/state.py, body "hf"): `run A --save-memory m` then `run B
--load-memory m` gives B the numbers of `run A B` under every policy the model streams (the policy states, the
scored policies' scores and positions, the slots' true positions under sliding windows, carried through a real
file); a file of another model, tokenizer, policy, sizes or dtype, or one whose state this model could not have
produced, is one error line (exit 2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
import test_inputs_and_errors as reliability  # noqa: E402
from hf_families import save_family  # noqa: E402
from test_inputs_and_errors import invoke, policy_args, records, save_then_load  # noqa: E402

from conftest import BUNDLED_TOKENIZER, save_with_tokenizer, tiny_model  # noqa: E402
from segcli.memory import POLICY_NAMES  # noqa: E402

pytestmark = pytest.mark.transformers_api  # .ci/run runs this module again under an older transformers 5

# what a sliding-window family streams (slots chosen by content and the linear memory are refused there)
WINDOWED = ("full", "none", "fifo", "xl", "sink", "compressive", "average")


@pytest.fixture(autouse=True)
def uniform_budget(monkeypatch):
    """The reliability helpers' sizes with the uniform layer budget (the windowed families refuse the pyramid;
    pyramid memory files on full-attention models: tests/hf/test_hf_pyramid.py)."""
    monkeypatch.setitem(reliability.SIZES, "layer_budget", "uniform")


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = save_family(name, tmp_path_factory.mktemp(name) / "model", BUNDLED_TOKENIZER)
            if made[name] is None:
                pytest.skip(f"this transformers has no {name}")
        return made[name]

    return get


def base(path: Path) -> list:
    return ["--model", path, "--device", "cpu", "-q"]


def test_every_policy_the_family_supports_is_covered():
    assert set(WINDOWED) < set(POLICY_NAMES) and {"tova", "h2o", "linear"} <= set(POLICY_NAMES)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_llama_save_then_load_equals_one_run(family_dir, two_docs, tmp_path, policy):
    meta = save_then_load(base(family_dir("llama")), two_docs, tmp_path, policy)
    layers = meta["hf"]["layers"]
    assert meta["hf"]["family"] == "llama" and len(layers) == 3
    assert all(d["seen"] == 90 and d["kind"] == "full" for d in layers)
    assert meta["hf"]["positions"] is None  # no sliding layer: every slot sits where the masks say
    if policy in ("tova", "h2o", "snapkv", "keynorm"):  # the scores and true positions travel with the pairs
        assert {"pos", "score", "budget"} <= set(layers[0]["state"]["fields"])


# mistral (every layer sliding) under every windowed policy; gemma2 (sliding and full layers alternating) under
# those whose saved slots keep their true positions, and full (window - 1 pairs in its sliding layers only)
SLIDING_ROUND_TRIPS = [("mistral", p) for p in WINDOWED] + [("gemma2", p) for p in ("full", "sink", "compressive",
                                                                                   "average")]


@pytest.mark.parametrize("name,policy", SLIDING_ROUND_TRIPS)
def test_sliding_window_family_save_then_load_equals_one_run(family_dir, two_docs, tmp_path, name, policy):
    """Sliding layers (window 16): under full they keep window - 1 pairs; under sink, compressive and average the
    slots' true positions (which of them a window reaches) are saved with the memory."""
    meta = save_then_load(base(family_dir(name)), two_docs, tmp_path, policy)
    kinds = {(d["kind"], d["window"]) for d in meta["hf"]["layers"]}
    assert ("sliding", 16) in kinds
    assert (meta["hf"]["positions"] is not None) == (policy in ("sink", "compressive", "average"))


def _saved(path: Path, doc: Path, tmp_path: Path, *policy: str) -> Path:
    mem = tmp_path / "m.safetensors"
    records(invoke("run", doc, *base(path), *policy, "-s", 16, "--max-tokens", 60, "--save-memory", mem))
    return mem


def one_error_line(result, needle: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("segcli: error: --load-memory") and needle in lines[0], lines
    assert "Traceback" not in result.output
    return lines[0]


def test_mismatched_files_are_refused_in_one_line(family_dir, two_docs, tmp_path):
    llama = family_dir("llama")
    a, b = two_docs
    mem = _saved(llama, a, tmp_path, "--memory", "h2o", "--memory-size", 24)
    load = [b, "--load-memory", mem, "-s", 16, "--max-tokens", 20]
    other = save_family("llama3-rope", tmp_path / "other", BUNDLED_TOKENIZER)  # another model
    tok = tmp_path / "tok"  # the same model, another tokenizer
    save_family("llama", tok, BUNDLED_TOKENIZER)
    t = json.loads((tok / "tokenizer.json").read_text())
    t["added_tokens"][0]["content"] = "<|end|>"
    (tok / "tokenizer.json").write_text(json.dumps(t))
    native = save_with_tokenizer(tiny_model(), tmp_path / "native")
    h2o = ["--memory", "h2o", "--memory-size", 24]
    one_error_line(invoke("run", *load, *base(other), *h2o), "saved with another model")
    one_error_line(invoke("run", *load, *base(native), *h2o), "saved with another model")
    one_error_line(invoke("run", *load, *base(tok), *h2o), "saved with another tokenizer")
    one_error_line(invoke("run", *load, *base(llama), "--memory", "tova", "--memory-size", 24), "saved with policy h2o")
    one_error_line(invoke("run", *load, *base(llama), "--memory", "h2o", "--memory-size", 25),
                   "pass --memory h2o --memory-size 24 --recent-tokens 12")
    one_error_line(invoke("run", *load, *base(llama), *h2o, "--dtype", "bfloat16"), "pass --dtype float32")
    # a native model's file on a transformer, a transformer's on the native model
    (tmp_path / "n").mkdir()
    nmem = _saved(native, a, tmp_path / "n", "--memory", "fifo", "--memory-size", 24)
    one_error_line(invoke("run", b, "--load-memory", nmem, *base(llama), "--memory", "fifo", "--memory-size", 24),
                   "saved with another model")
    one_error_line(invoke("run", b, "--load-memory", mem, *base(native), *h2o), "saved with another model")


def _tampered(mem: Path, out: Path, edit) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(mem), "pt") as f:
        meta = json.loads(f.metadata()["segcli"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    save_file(tensors, str(out), metadata={"segcli": json.dumps(meta)})
    return out


@pytest.mark.parametrize("what,needle", [
    ("heads", "layer 0: k has shape"),
    ("positions", "a position lies outside the tokens seen"),
    ("layers", "2 cache layers saved, the model has 3"),
    ("seen", "layer 1 has seen 59 tokens, the file says 60"),
    ("family", "saved from a mistral model, this run's model is a llama"),
])
def test_a_state_this_model_could_not_have_produced_is_refused(family_dir, two_docs, tmp_path, what, needle):
    llama = family_dir("llama")
    a, b = two_docs
    policy = ["--memory", "h2o", "--memory-size", 24]
    mem = _saved(llama, a, tmp_path, *policy)

    def edit(meta, tensors):
        hf = meta["hf"]
        if what == "heads":
            tensors["layer0.k"] = tensors["layer0.k"][:, :1].contiguous()
        elif what == "positions":
            tensors["layer0.pos"] = tensors["layer0.pos"] + 100
        elif what == "layers":
            hf["layers"] = hf["layers"][:2]
        elif what == "seen":
            hf["layers"][1]["seen"] = 59
        elif what == "family":
            hf["family"] = "mistral"

    bad = _tampered(mem, tmp_path / "bad.safetensors", edit)
    one_error_line(invoke("run", b, "--load-memory", bad, *base(llama), *policy, "-s", 16, "--max-tokens", 20), needle)


def test_memory_report_after_loading_is_the_one_of_the_unbroken_run(family_dir, two_docs, tmp_path):
    """The per-segment memory statistics of B (slots, bytes, norms, ages, evictions) after a file are those of `run
    A B`, and so is the final state: saving again after B gives the same tensors."""
    from safetensors.torch import load_file

    llama = family_dir("mistral")
    a, b = two_docs
    common = [*base(llama), *policy_args("sink"), "-s", 16, "--max-tokens", 90]
    both, once = tmp_path / "both.safetensors", tmp_path / "a.safetensors"
    together = records(invoke("run", a, b, *common, "--save-memory", both))
    records(invoke("run", a, *common, "--save-memory", once))
    again = tmp_path / "b.safetensors"
    second = records(invoke("run", b, *common, "--load-memory", once, "--save-memory", again))
    mem_b = [r["memory"] for r in together if r["type"] == "segment" and r["document"] == str(b)]
    assert mem_b == [r["memory"] for r in second if r["type"] == "segment"]
    x, y = load_file(str(both)), load_file(str(again))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
