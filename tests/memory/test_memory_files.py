"""Memory state files (segcli/state.py): files in the format before the smeared key moved into the layer
states still load and continue exactly; a damaged or foreign file is one UsageError line (exit 2), never a
raw exception; an xl memory loads only at the segment size it was saved at."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import save_with_tokenizer, tiny_model
from segcli.backends import load_backend
from segcli.cli import app
from segcli.config import RunConfig
from segcli.errors import UsageError
from segcli.state import load_memory

runner = CliRunner()
SIZES = {"memory_size": 24, "sink_tokens": 2, "compress_rate": 3, "compressed_size": 5}
POLICY_SIZES = {"fifo": ["memory_size"], "sink": ["memory_size", "sink_tokens"],
                "compressive": ["memory_size", "compress_rate", "compressed_size"]}
UNTIMED = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")}  # noqa: E731


def options(policy: str, n_s: int = 16) -> list[str]:
    out = ["--memory", policy, "-s", str(n_s), "--max-tokens", "90"]
    for k in POLICY_SIZES.get(policy, []):
        out += [f"--{k.replace('_', '-')}", str(SIZES[k])]
    return out


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def records(res) -> list[dict]:
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def segments(recs: list[dict], doc=None) -> list[dict]:
    return [UNTIMED(r) | {"document": None} for r in recs if r["type"] == "segment" and doc in (None, r["document"])]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {smear: save_with_tokenizer(tiny_model(smear_keys=smear), d / ("smeared" if smear else "plain"))
            for smear in (False, True)}


@pytest.fixture(scope="module")
def docs(two_docs):
    return two_docs


def read(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["segcli"]), {k: f.get_tensor(k) for k in f.keys()}


def write(path, meta, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"segcli": json.dumps(meta)})


def saved(models, docs, tmp_path, policy, smear=False, n_s=16):
    """Stream document a, saving its memory; the file's path."""
    mem = tmp_path / f"{policy}.safetensors"
    records(invoke("run", docs[0], "--model", models[smear], "--device", "cpu", "-q", *options(policy, n_s),
                   "--save-memory", mem))
    return mem


# -- the format before: last keys apart, whole window buffers -----------------------------------------------------------

OLD_LINEAR = "segcli.ops.linear_attention:LinearState"


def as_format_1(meta: dict, tensors: dict) -> tuple[dict, dict]:
    """A format-2 file in the layout format 1 wrote (segcli before the smeared key moved into the states):
    each layer's last key as `last_key{i}` listed in metadata `last_keys`; window buffers at full capacity
    (front + max(64, 2 x size) slots; 64 or twice the pairs for full), their pairs past the front reserve;
    the linear state as the ops' LinearState."""
    meta, tensors = json.loads(json.dumps(meta)), dict(tensors)
    last_keys = []

    def old_window(desc):
        f = desc["fields"]
        size, front, n = f["size"]["value"], f["front"]["value"], f["end"]["value"] - f["start"]["value"]
        cap = front + (max(64, 2 * size) if size is not None else max(64, 2 * n))
        start = front + (cap - front - n) // 2  # as after some sliding: start past the front reserve
        for name in ("k", "v", "kn", "vn"):
            key = f[name]["tensor"]
            x = tensors[key]
            buf = x.new_zeros(*x.shape[:2], cap, *x.shape[3:])
            buf[:, :, start : start + n] = x[:, :, f["start"]["value"] : f["end"]["value"]]
            tensors[key] = buf
        f["start"], f["end"] = {"value": start}, {"value": start + n}

    for i, layer in enumerate(meta["layers"]):
        fields = layer["fields"]
        key = fields.pop("last_key", {"value": None})
        if "tensor" in key:
            tensors[f"last_key{i}"] = tensors.pop(key["tensor"])
            last_keys.append({"tensor": f"last_key{i}"})
        if layer["type"] == "segcli.memory.linear:LinearMemoryState":
            layer["type"] = OLD_LINEAR
        if "window" in fields:
            old_window(fields["window"])
    meta["format"] = 1
    meta["last_keys"] = last_keys or None
    return meta, tensors


@pytest.mark.parametrize("smear", [False, True], ids=["plain-keys", "smeared-keys"])
@pytest.mark.parametrize("policy", ["full", "none", "fifo", "xl", "sink", "average", "compressive", "linear"])
def test_a_format_1_file_loads_and_continues_as_one_run(models, docs, tmp_path, policy, smear):
    a, b = docs
    common = ["--model", models[smear], "--device", "cpu", "-q", *options(policy)]
    together = segments(records(invoke("run", a, b, *common)), str(b))
    meta, tensors = read(saved(models, docs, tmp_path, policy, smear))
    old = tmp_path / "old.safetensors"
    write(old, *as_format_1(meta, tensors))
    old_meta, _ = read(old)
    assert old_meta["format"] == 1
    assert (old_meta["last_keys"] is not None) == (smear and policy != "none")
    loaded = segments(records(invoke("run", b, *common, "--load-memory", old)))
    assert together and loaded == together  # bitwise the same numbers, the memory's bytes held included


def test_format_1_last_keys_written_by_none_are_ignored(models, docs, tmp_path):
    """Format 1 saved last keys under `none` too; `none` never smeared them into the next segment."""
    a, b = docs
    common = ["--model", models[True], "--device", "cpu", "-q", *options("none")]
    meta, tensors = read(saved(models, docs, tmp_path, "none", True))
    meta, tensors = as_format_1(meta, tensors)
    tensors |= {"last_key0": torch.ones(1, 2, 1, 16), "last_key1": torch.ones(1, 2, 1, 16)}
    meta["last_keys"] = [{"tensor": "last_key0"}, {"tensor": "last_key1"}]
    write(tmp_path / "old.safetensors", meta, tensors)
    loaded = segments(records(invoke("run", b, *common, "--load-memory", tmp_path / "old.safetensors")))
    assert loaded == segments(records(invoke("run", a, b, *common)), str(b))  # the keys never reached b


@pytest.mark.parametrize("policy", ["fifo", "none", "linear"])
def test_format_2_keeps_each_layer_s_last_key_in_its_state(models, docs, tmp_path, policy):
    meta, tensors = read(saved(models, docs, tmp_path, policy, smear=True))
    assert meta["format"] == 2 and "last_keys" not in meta
    keys = [layer["fields"].get("last_key") for layer in meta["layers"]]
    if policy == "none":
        assert keys == [None, None]  # nothing of a segment reaches the next, not even its last key
    else:
        assert keys == [{"tensor": "layer0.last_key"}, {"tensor": "layer1.last_key"}]
        assert all(tensors[f"layer{i}.last_key"].shape == (1, 2, 1, 16) for i in range(2))
    plain, _ = read(saved(models, docs, tmp_path, policy, smear=False))
    assert all(layer["fields"].get("last_key", {"value": None}) == {"value": None} for layer in plain["layers"])


def test_a_saved_window_holds_its_pairs_not_its_room(models, docs, tmp_path):
    meta, tensors = read(saved(models, docs, tmp_path, "fifo"))
    w = meta["layers"][0]["fields"]["window"]["fields"]
    assert (w["start"]["value"], w["end"]["value"]) == (0, 24)
    assert tensors["layer0.window.k"].shape == (1, 2, 24, 16)


# -- damaged or foreign files: one line, exit 2 ------------------------------------------------------------------------

def damaged(policy: str, change):
    """(policy, change(meta, tensors)) cases; the change edits a good file's metadata or tensors in place."""
    return pytest.param(policy, change, id=f"{policy}-{change.__name__}")


def tensor_wrong_shape(m, t):
    t["layer0.window.k"] = t["layer0.window.k"][..., :15]
    return "window.k has shape [1, 2, 24, 15], expected [1, 2, *, 16]"


def tensor_wrong_dtype(m, t):
    t["layer1.window.v"] = t["layer1.window.v"].double()
    return "window.v is float64, expected float32"


def tensor_missing(m, t):
    del t["layer0.window.kn"]
    return "tensor 'layer0.window.kn' is missing"


def tensor_used_twice(m, t):
    m["layers"][0]["fields"]["window"]["fields"]["v"] = {"tensor": "layer0.window.k"}
    return "used twice"


def tensor_where_a_count_belongs(m, t):
    t["count"] = torch.zeros(1)
    m["layers"][0]["fields"]["seen"] = {"tensor": "count"}
    return "seen is a tensor, expected int"


def window_end_past_its_buffer(m, t):
    m["layers"][1]["fields"]["window"]["fields"]["end"] = {"value": 1000}
    return "window.start 0 and end 1000 do not fit its 24 slots"


def window_start_huge(m, t):
    m["layers"][1]["fields"]["window"]["fields"]["start"] = {"value": 1e30}
    return "window.start is 1e+30, expected a count"


def window_start_negative(m, t):
    m["layers"][0]["fields"]["window"]["fields"]["start"] = {"value": -3}
    return "window.start is -3, expected a count"


def state_of_another_type(m, t):
    m["layers"][0]["type"] = "segcli.memory.sink:SinkState"
    return "layer 0: state is a segcli.memory.sink:SinkState, this policy keeps a segcli.memory.fifo:FifoState"


def state_of_foreign_code(m, t):
    m["layers"][0]["type"] = "os:system"
    return "state is a os:system"


def unknown_field(m, t):
    m["layers"][0]["fields"]["extra"] = {"value": 1}
    return "state has unknown field extra"


def layer_state_seen_disagrees(m, t):
    m["layers"][0]["fields"]["seen"] = {"value": 89}
    return "seen 89, the file says 90 tokens"


def seen_1e30(m, t):
    m["seen"] = 1e30
    return "seen is 1e+30, expected a whole number of tokens"


def seen_negative(m, t):
    m["seen"] = -5
    return "seen is -5, expected a whole number of tokens"


def seen_fraction(m, t):
    m["seen"] = 89.5
    return "seen is 89.5"


def seen_text(m, t):
    m["seen"] = "90"
    return "seen is '90'"


def seen_bool(m, t):
    m["seen"] = True
    return "seen is True"


def seen_past_float64_integers(m, t):
    m["seen"] = 2**60
    return f"seen is {2**60}"


def layers_not_a_list(m, t):
    m["layers"] = {"0": 1}
    return "0 layers saved, the model has 2"


def sinks_wrong_count(m, t):
    t["layer0.sink_k"] = t["layer0.sink_k"][:, :, :1]
    return "sink_k has shape [1, 2, 1, 16], expected [1, 2, 2, 16]"


def pooled_pairs_too_many(m, t):
    t["layer0.pk"] = torch.zeros(1, 2, 3, 16)
    t["layer0.pv"] = torch.zeros(1, 2, 3, 16)
    return "3 pairs wait for pooling"


def linear_state_wrong_shape(m, t):
    t["layer1.mu"] = t["layer1.mu"][:, :1]
    return "mu has shape [1, 1, 16, 16], expected [1, 2, 16, 16]"


def average_count_wrong(m, t):
    m["layers"][0]["fields"]["n"] = {"value": 7}
    return "7 pairs averaged, the file says 90 tokens"


def xl_segment_missing(m, t):
    m["layers"][0]["fields"]["k"] = {"value": None}
    return "k and v must both be tensors"


def last_key_wrong_shape(m, t):
    t["layer0.last_key"] = torch.zeros(1, 2, 3, 16)
    return "last_key has shape [1, 2, 3, 16], expected [1, 2, 1, 16]"


def format_unknown(m, t):
    m["format"] = 3
    return "memory file format 3; this segcli reads format 1, 2"


@pytest.mark.parametrize("policy,change", [
    *(damaged("fifo", c) for c in (tensor_wrong_shape, tensor_wrong_dtype, tensor_missing, tensor_used_twice,
                                   tensor_where_a_count_belongs, window_end_past_its_buffer, window_start_huge,
                                   window_start_negative, state_of_another_type, state_of_foreign_code, unknown_field,
                                   layer_state_seen_disagrees, seen_1e30, seen_negative, seen_fraction, seen_text,
                                   seen_bool, seen_past_float64_integers, layers_not_a_list, last_key_wrong_shape,
                                   format_unknown)),
    damaged("sink", sinks_wrong_count), damaged("compressive", pooled_pairs_too_many),
    damaged("linear", linear_state_wrong_shape), damaged("average", average_count_wrong),
    damaged("xl", xl_segment_missing),
])
def test_a_damaged_file_is_refused_with_one_line(models, docs, tmp_path, policy, change):
    smear = change is last_key_wrong_shape
    meta, tensors = read(saved(models, docs, tmp_path, policy, smear))
    needle = change(meta, tensors)
    bad = tmp_path / "bad.safetensors"
    write(bad, meta, tensors)
    cfg = RunConfig(model=str(models[smear]), memory=policy, segment_size=16, device="cpu",
                    **{k: SIZES[k] for k in POLICY_SIZES.get(policy, [])})
    with pytest.raises(UsageError) as e:
        load_memory(str(bad), load_backend(cfg), cfg)
    message = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in message and message.startswith(f"--load-memory {bad}: ")
    assert needle in message, message


def test_the_cli_refuses_a_damaged_file_with_one_line_and_exit_2(models, docs, tmp_path):
    meta, tensors = read(saved(models, docs, tmp_path, "fifo"))
    meta["seen"] = 1e30
    write(tmp_path / "bad.safetensors", meta, tensors)
    res = invoke("run", docs[1], "--model", models[False], "--device", "cpu", "-q", *options("fifo"),
                 "--load-memory", tmp_path / "bad.safetensors")
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "seen is 1e+30" in lines[0], res.stderr


# -- xl: one segment of n_s pairs -------------------------------------------------------------------------------------

def test_an_xl_memory_loads_only_at_the_segment_size_it_was_saved_at(models, docs, tmp_path):
    a, b = docs
    mem = saved(models, docs, tmp_path, "xl", n_s=64)
    common = ["--model", models[False], "--device", "cpu", "-q", "--memory", "xl", "--max-tokens", "90"]
    res = invoke("run", b, *common, "-s", 128, "--load-memory", mem)
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "saved at --segment-size 64, this run uses 128: pass --segment-size 64" in lines[0]
    together = segments(records(invoke("run", a, b, *common, "-s", 64)), str(b))
    assert segments(records(invoke("run", b, *common, "-s", 64, "--load-memory", mem))) == together


def test_an_xl_file_without_its_segment_size_loads_where_its_segment_fits(models, docs, tmp_path):
    meta, tensors = read(saved(models, docs, tmp_path, "xl", n_s=64))
    del meta["segment_size"]  # a file written by the library, not the CLI
    write(tmp_path / "bare.safetensors", meta, tensors)
    common = ["--model", models[False], "--device", "cpu", "-q", "--memory", "xl", "--max-tokens", "90"]
    res = invoke("run", docs[1], *common, "-s", 32, "--load-memory", tmp_path / "bare.safetensors")
    assert res.exit_code == 2 and "holds segments of 64 tokens, more than this run's --segment-size 32" in res.stderr
    records(invoke("run", docs[1], *common, "-s", 128, "--load-memory", tmp_path / "bare.safetensors"))
