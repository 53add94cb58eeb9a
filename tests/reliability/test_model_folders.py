"""Issue 32, reliability: a model folder that is broken says so in one line (exit 2), and nothing read waits for ever.

Broken folders are built from a tiny llama (and a tiny mamba for the recurrent backend, the native tiny model for the
native one) saved with save_pretrained, then damaged one way each: a special file where a file should be (FIFO,
socket, device), an impossible config value, a config that could not fit in memory, a weight file cut short or not
safetensors at all, a tensor missing or of another shape. Special files and the config of 10**9 layers run in a
subprocess with a timeout, so that a regression fails instead of hanging (or filling the machine's memory).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from segcli.backends import folder_checks as fc
from segcli.cli import app
from segcli.errors import UsageError

from conftest import BUNDLED_TOKENIZER, ROOT, SAMPLE

runner = CliRunner()
LLAMA = dict(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def save_hf(cfg, path: Path) -> Path:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER), bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    return save_hf(LlamaConfig(**LLAMA), tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def mamba(tmp_path_factory) -> Path:
    from transformers import MambaConfig

    return save_hf(MambaConfig(vocab_size=8192, hidden_size=32, num_hidden_layers=2, state_size=8),
                   tmp_path_factory.mktemp("mamba") / "model")


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("doc") / "doc.txt"
    p.write_text((SAMPLE / "python_docs.txt").read_text(encoding="utf-8")[:600], encoding="utf-8")
    return p


def variant(src: Path, dst: Path, config: dict | None = None) -> Path:
    """A copy of the model folder `src`, its config.json's keys set from `config`."""
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def one_error_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("segcli: error: "), stderr
    for raw in ("Traceback", "RuntimeError", "SafetensorError", "UserWarning", "Exception"):
        assert raw not in lines[0], lines[0]
    return lines[0]


def run(doc: Path, model: Path, *extra):
    return runner.invoke(app, ["run", str(doc), "--model", str(model), "--device", "cpu", "-q", "--max-tokens", "8",
                               *map(str, extra)])


# -- special files and configs too large to build: a subprocess with a timeout ----------------------------------------

DRIVER = """
import json, sys
from typer.testing import CliRunner
from segcli.cli import app
runner = CliRunner()
for model in sys.argv[2:]:
    res = runner.invoke(app, ["run", sys.argv[1], "--model", model, "--device", "cpu", "-q", "--max-tokens", "8"])
    print(json.dumps({"model": model, "code": res.exit_code, "stderr": res.stderr}), flush=True)
"""


def run_isolated(doc: Path, models: list[Path], timeout: float = 180) -> dict[str, dict]:
    """`segcli run` on each model, in one fresh process (warnings print as they would for a user) killed after
    `timeout` seconds: a model that makes the run wait for ever fails the test instead of hanging it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", DRIVER, str(doc), *map(str, models)], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr
    return {r["model"]: r for r in map(json.loads, p.stdout.splitlines())}


@pytest.fixture(scope="module")
def isolated(llama, mamba, tiny_model_dir, doc, tmp_path_factory) -> tuple[dict[str, dict], dict[str, tuple]]:
    """Every case run once: {folder: result} and {case: (folder, words its error line must hold)}."""
    root = tmp_path_factory.mktemp("special")
    cases: dict[str, tuple[Path, list[str]]] = {}

    def fifo_in(src: Path, name: str, case: str) -> None:
        d = variant(src, root / case)
        (d / name).unlink(missing_ok=True)
        os.mkfifo(d / name)
        cases[case] = (d, [str(d / name), "FIFO", "not a regular file"])

    fifo_in(llama, "model.safetensors", "fifo-weights")  # measured: waited for ever
    fifo_in(llama, "config.json", "fifo-config")
    fifo_in(llama, "tokenizer.json", "fifo-tokenizer")
    fifo_in(llama, "tokenizer_config.json", "fifo-tokenizer-config")
    fifo_in(mamba, "model.safetensors", "fifo-recurrent")
    fifo_in(tiny_model_dir, "model.safetensors", "fifo-native")
    d = variant(llama, root / "socket")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "vocab.txt"))  # any file transformers may open by pattern
    sock.close()
    cases["socket"] = (d, [str(d / "vocab.txt"), "a socket"])
    d = variant(llama, root / "device")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").symlink_to("/dev/zero")  # a device reads for ever
    cases["char-device"] = (d, [str(d / "tokenizer.json"), "a character device"])
    d = root / "gguf"
    d.mkdir()
    os.mkfifo(d / "model.gguf")
    cases["fifo-gguf"] = (d / "model.gguf", [str(d / "model.gguf"), "FIFO"])
    cases["fifo-gguf-in-folder"] = (d, [str(d / "model.gguf"), "FIFO"])
    cases["layers-1e9"] = (variant(llama, root / "layers", {"num_hidden_layers": 10**9}),  # measured: 4 GB at 180 s
                           ["num_hidden_layers 1,000,000,000", "needs at least", "GiB", "bytes), more than"])
    cases["layers-1e9-recurrent"] = (variant(mamba, root / "mamba-layers", {"num_hidden_layers": 10**9}),
                                     ["num_hidden_layers 1,000,000,000", "needs at least"])
    cases["layers-1e9-native"] = (variant(tiny_model_dir, root / "native-layers", {"num_hidden_layers": 10**9}),
                                  ["num_hidden_layers 1,000,000,000", "needs at least"])
    cases["vocab-0"] = (variant(llama, root / "vocab0", {"vocab_size": 0}),  # measured: torch's UserWarning first
                        ["config.json", "vocab_size is 0", "positive whole number"])
    cases["hidden-negative"] = (variant(llama, root / "neg", {"hidden_size": -256}),  # measured: exit 1
                                ["config.json", "hidden_size is -256"])
    cases["intact"] = (llama, [])
    return run_isolated(doc, [c[0] for c in cases.values()]), cases


SPECIAL = ["fifo-weights", "fifo-config", "fifo-tokenizer", "fifo-tokenizer-config", "fifo-recurrent", "fifo-native",
           "socket", "char-device", "fifo-gguf", "fifo-gguf-in-folder", "layers-1e9", "layers-1e9-recurrent",
           "layers-1e9-native", "vocab-0", "hidden-negative"]


@pytest.mark.parametrize("case", SPECIAL)
def test_refused_in_one_line_without_waiting(isolated, case):
    """One line naming the file (or config key) and what is wrong, exit 2; no warning lines before it."""
    results, cases = isolated
    folder, needles = cases[case]
    res = results[str(folder)]
    assert res["code"] == 2, res["stderr"]
    line = one_error_line(res["stderr"])
    for needle in needles:
        assert needle in line, line


def test_intact_folder_still_runs(isolated):
    results, cases = isolated
    res = results[str(cases["intact"][0])]
    assert res["code"] == 0 and res["stderr"] == "", res["stderr"]


# -- damaged folders, in process ----------------------------------------------------------------------------------------

def _cut(nbytes: int):
    def edit(d: Path) -> None:
        os.truncate(d / "model.safetensors", nbytes if nbytes > 0 else (d / "model.safetensors").stat().st_size + nbytes)
    return edit


def _write(name: str, data: bytes):
    def edit(d: Path) -> None:
        (d / name).write_bytes(data)
    return edit


def _tensors(change):
    def edit(d: Path) -> None:
        tensors = load_file(str(d / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return edit


UP = "model.layers.1.mlp.up_proj.weight"
DAMAGED = [
    # (id, config keys set, edit of the folder, words the error line must hold)
    ("hidden-zero", {"hidden_size": 0}, None, ["hidden_size is 0"]),
    ("layers-zero", {"num_hidden_layers": 0}, None, ["num_hidden_layers is 0"]),
    ("heads-negative", {"num_attention_heads": -4}, None, ["num_attention_heads is -4"]),
    ("intermediate-negative", {"intermediate_size": -1}, None, ["intermediate_size is -1"]),
    ("head-dim-zero", {"head_dim": 0}, None, ["head_dim is 0"]),
    ("kv-heads-fraction", {"num_key_value_heads": 1.5}, None, ["num_key_value_heads is 1.5"]),
    ("kv-heads-not-dividing", {"num_key_value_heads": 3}, None,
     ["num_attention_heads 4 is not a multiple of num_key_value_heads 3"]),
    ("heads-not-dividing-hidden", {"num_attention_heads": 5, "num_key_value_heads": 5, "head_dim": None}, None,
     ["hidden_size 64 is not a multiple of num_attention_heads 5"]),
    ("intermediate-1e12", {"intermediate_size": 10**12}, None,  # fits no machine: the model built on the meta device
     ["config.json", "the model (", "parameters in float32) needs", "GiB", "more than"]),
    ("config-not-json", None, _write("config.json", b"{oops"), ["config.json: not valid JSON"]),
    ("config-json-list", None, _write("config.json", b"[1, 2]"), ["config.json: holds a JSON list"]),
    ("tokenizer-config-not-json", None, _write("tokenizer_config.json", b"\xff\xfe"),
     ["tokenizer_config.json: not UTF-8"]),
    ("weights-truncated-header", None, _cut(100), ["model.safetensors: not a whole safetensors file"]),  # measured
    ("weights-truncated-data", None, _cut(-1000), ["model.safetensors: not a whole safetensors file",
                                                   "not fully covered"]),
    ("weights-not-safetensors", None, _write("model.safetensors", b"PK\x03\x04" + bytes(range(256)) * 64),
     ["model.safetensors: not a whole safetensors file"]),
    ("weights-missing-tensor", None, _tensors(lambda t: t.pop(UP)), ["missing tensors", UP]),
    ("weights-wrong-shape", None, _tensors(lambda t: t.update({UP: torch.zeros(3, 3)})),
     [f"tensor {UP} has shape [3, 3], the config expects [128, 64]"]),
]


@pytest.mark.parametrize("config, edit, needles", [c[1:] for c in DAMAGED], ids=[c[0] for c in DAMAGED])
def test_damaged_llama_folder(llama, doc, tmp_path, config, edit, needles):
    d = variant(llama, tmp_path / "model", config)
    if edit:
        edit(d)
    res = run(doc, d)
    assert res.exit_code == 2, res.output
    line = one_error_line(res.stderr)
    assert str(d) in line
    for needle in needles:
        assert needle in line, line


def test_sharded_checkpoint_shard_cut_short(llama, doc, tmp_path):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(llama).save_pretrained(d, max_shard_size="1MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama / name, d / name)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1 and run(doc, d).exit_code == 0
    os.truncate(shards[-1], 5000)
    res = run(doc, d)
    assert res.exit_code == 2
    assert f"{shards[-1]}: not a whole safetensors file" in one_error_line(res.stderr)
    (d / "model.safetensors.index.json").write_text('{"weight_map": 5}')
    res = run(doc, d)
    assert "model.safetensors.index.json: has no weight_map" in one_error_line(res.stderr)


@pytest.mark.parametrize("config, needle", [({"state_size": -8}, "state_size is -8"),
                                            ({"vocab_size": 0}, "vocab_size is 0"),
                                            ({"expand": 0}, "expand is 0")], ids=["state", "vocab", "expand"])
def test_damaged_recurrent_folder(mamba, doc, tmp_path, config, needle):
    res = run(doc, variant(mamba, tmp_path / "model", config))
    assert res.exit_code == 2
    assert needle in one_error_line(res.stderr)


@pytest.mark.parametrize("config, edit, needle", [
    ({"hidden_size": -32}, None, "hidden_size is -32"),
    ({"intermediate_size": 10**12}, None, "parameters in float32) needs"),
    (None, _cut(100), "model.safetensors: not a whole safetensors file"),
    (None, _cut(-1000), "not fully covered"),
], ids=["hidden-negative", "intermediate-1e12", "truncated-header", "truncated-data"])
def test_damaged_native_folder(tiny_model_dir, doc, tmp_path, config, edit, needle):
    d = variant(tiny_model_dir, tmp_path / "model", config)
    if edit:
        edit(d)
    res = run(doc, d)
    assert res.exit_code == 2
    assert needle in one_error_line(res.stderr)


# -- the pure checks ----------------------------------------------------------------------------------------------------

def test_config_problem_names_key_and_value():
    assert fc.config_problem(dict(LLAMA)) is None
    assert fc.config_problem({**LLAMA, "head_dim": None, "sliding_window": None, "time_step_rank": "auto",
                              "num_local_experts": 0}) is None  # null: the family's default; 0 experts: a dense model
    assert fc.config_problem({**LLAMA, "vocab_size": 0}) == "vocab_size is 0; it must be a positive whole number"
    assert fc.config_problem({**LLAMA, "num_hidden_layers": True}) == \
        "num_hidden_layers is true; it must be a positive whole number"
    assert fc.config_problem({"model_type": "x", "text_config": {**LLAMA, "hidden_size": -1}}) == \
        "text_config.hidden_size is -1; it must be a positive whole number"
    assert fc.config_problem({**LLAMA, "intermediate_size": [128, 0]}) == \
        "intermediate_size is [128, 0]; it must be a positive whole number"
    assert fc.config_problem({**LLAMA, "num_local_experts": 2, "num_experts_per_tok": 3}) == \
        "num_experts_per_tok 3 is more than num_local_experts 2"
    assert fc.config_problem({"n_embd": 64, "n_head": 5}) == \
        "n_embd 64 is not a multiple of n_head 5 (and no head_dim is given): the heads split the width evenly"
    assert fc.config_problem({"hidden_size": 64, "num_attention_heads": 5, "head_dim": 16}) is None


def test_memory_bounds_and_message(tmp_path):
    raw = {"num_hidden_layers": 10**9, "hidden_size": 64, "vocab_size": 8192}
    need = fc.lower_bound_bytes(raw, 4)
    assert need == (8192 * 64 + 10**9 * 64) * 4 + 10**9 * fc.LAYER_OVERHEAD
    with pytest.raises(UsageError) as e:
        fc.check_bound_fits(tmp_path / "config.json", raw, torch.float32, torch.device("cpu"),
                            available=[("of memory available (MemAvailable)", 8 << 30)])
    assert str(e.value) == (
        f"{tmp_path}/config.json: a model with num_hidden_layers 1,000,000,000, hidden_size 64, vocab_size 8,192 "
        f"needs at least {need / 2**30:,.1f} GiB ({need:,} bytes), more than the 8.0 GiB of memory available "
        "(MemAvailable); check the config's sizes, or load it where there is more memory")
    # unknown free memory: the cap stands in
    with pytest.raises(UsageError, match="segcli's cap of 1,024.0 GiB"):
        fc.check_fits(tmp_path, 2 << 40, "x", [("free", None)])
    fc.check_fits(tmp_path, 1 << 30, "x", [("free", 2 << 30), ("free on cuda:0", None)])


def test_meta_model_bytes_are_the_loaded_model_bytes():
    """The estimate is the bytes the loaded model's parameters and buffers take, in the run's dtype."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**LLAMA)
    meta = fc.meta_model(cfg, Path("config.json"))
    assert all(p.device.type == "meta" for p in meta.parameters())
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(cfg)
    params = sum(p.numel() for p in real.parameters())
    assert params == 2 * 8192 * 64 + 2 * (4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    buffers = sum(b.numel() * b.element_size() for b in real.buffers())
    assert fc.tensor_bytes_of(meta, 4) == params * 4 + buffers
    assert fc.tensor_bytes_of(meta, 2) == params * 2 + buffers  # bfloat16 weights; the rotary buffer stays float32


def test_meta_model_refuses_what_transformers_cannot_build(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**LLAMA)
    cfg.intermediate_size = -5  # past the key checks (a config object, not config.json)
    with pytest.raises(UsageError, match=r"config.json: transformers cannot build a llama model from it \(.*negative"):
        fc.meta_model(cfg, tmp_path / "config.json")
    cfg.intermediate_size, cfg.num_hidden_layers = 128, fc.META_LAYERS + 1
    assert fc.meta_model(cfg, tmp_path / "config.json") is None  # too many layers to build: the bound decides


def test_regular_file_names_the_kind(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    assert fc.regular_file(tmp_path / "link") == tmp_path / "link"  # symlinks followed (the hub cache's are)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(UsageError, match=r"pipe: is a FIFO \(named pipe\), not a regular file"):
        fc.regular_file(tmp_path / "pipe")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(UsageError, match="dangling: a broken symbolic link"):
        fc.regular_file(tmp_path / "dangling")
    with pytest.raises(UsageError, match="is a directory"):
        fc.regular_file(tmp_path)


def test_refuse_incomplete_names_the_tensor(tmp_path):
    fc.refuse_incomplete(tmp_path, {"missing_keys": set(), "mismatched_keys": set()})
    with pytest.raises(UsageError, match=r"missing tensors the config needs: a, b, c \.\.\. \(4 in all\)"):
        fc.refuse_incomplete(tmp_path, {"missing_keys": {"d", "c", "b", "a"}})
    with pytest.raises(UsageError, match=r"tensor w has shape \[3\], the config expects \[4\] \(and 1 more\)"):
        fc.refuse_incomplete(tmp_path, {"mismatched_keys": {("w", torch.Size([3]), torch.Size([4])),
                                                            ("x", torch.Size([1]), torch.Size([2]))}})


def test_warnings_while_loading_are_kept_off_stderr_and_on_the_error():
    """Captured, not printed; an error carries them as notes (what a --debug traceback shows)."""
    with fc.captured_warnings() as lines:
        warnings.warn("first", UserWarning)
    assert len(lines) == 1 and lines[0].startswith("UserWarning: first (test_model_folders.py:")
    with pytest.raises(UsageError) as e:
        with fc.captured_warnings():
            warnings.warn("zero-element tensors", UserWarning)
            raise UsageError("broken")
    assert len(e.value.__notes__) == 1 and e.value.__notes__[0].startswith(
        "warning while loading: UserWarning: zero-element tensors")


def test_warnings_while_loading_are_shown_under_debug(monkeypatch):
    monkeypatch.setenv("SEGCLI_DEBUG", "1")  # what --debug sets for the command (cli.common.debug_env)
    with pytest.warns(UserWarning, match="shown"):
        with fc.captured_warnings() as lines:
            warnings.warn("shown", UserWarning)
    assert lines == []


def test_debug_env_is_the_commands_only(monkeypatch):
    from segcli.cli.common import debug_env

    monkeypatch.delenv("SEGCLI_DEBUG", raising=False)
    with debug_env(True):
        assert os.environ["SEGCLI_DEBUG"] == "1"
    assert "SEGCLI_DEBUG" not in os.environ


def test_reason_drops_exception_names():
    assert fc.reason(RuntimeError("Error while deserializing header: x\nmore")) == "Error while deserializing header: x"
    assert fc.reason(ValueError("Class validation error for validator 'v':\n    ValueError: hidden 64 heads 5")) == \
        "hidden 64 heads 5"
    assert fc.reason(KeyError()) == "KeyError"


def test_a_gpu_load_needs_the_gpu_memory_too(monkeypatch, tmp_path):
    """On CUDA the weights are read into CPU memory, then moved: both must hold them (mem_get_info: the GPU's)."""
    from transformers import LlamaConfig

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 80 << 30))
    cpu, gpu = fc.free_memory(torch.device("cuda", 0))
    assert cpu[0] == "of memory available (MemAvailable)" and gpu == ("free on cuda:0", 1 << 30)
    meta = fc.meta_model(LlamaConfig(**{**LLAMA, "vocab_size": 1 << 22}), tmp_path / "config.json")
    need = fc.tensor_bytes_of(meta, 2)
    assert need > 1 << 30  # two embeddings of 2**22 x 64 in bfloat16: 1 GiB, and the layers
    with pytest.raises(UsageError, match=rf"needs 1.0 GiB \({need:,} bytes\), more than the 1.0 GiB free on cuda:0"):
        fc.check_model_fits(tmp_path, meta, torch.bfloat16, torch.device("cuda", 0),
                            available=[("of memory available (MemAvailable)", 64 << 30), gpu])
