"""Issue 29: `segcli run` loads the native model as `SegLM` (torch alone), not through transformers'
`SegLMForCausalLM.from_pretrained`; the two give the same config, the same parameters (tied the same way) and the
same logits and memories, and a checkpoint laid out otherwise still goes through `from_pretrained`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, save_with_tokenizer, tiny_model
from segcli.backends import BUNDLED_DIR
from segcli.backends.native import load_native, seglm_config
from segcli.config import RunConfig
from segcli.models.seglm import SegLM, SegLMForCausalLM

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory) -> Path:
    return save_with_tokenizer(tiny_model(seed=1, tie_word_embeddings=False, smear_keys=True),
                               tmp_path_factory.mktemp("untied") / "model")


def both(path: Path, dtype: torch.dtype = torch.float32):
    """(the backend's model, transformers' from_pretrained of the same checkpoint), both in eval mode."""
    backend = load_native(RunConfig(), path, seglm_config(path), CPU, dtype)
    return backend.model, SegLMForCausalLM.from_pretrained(path, dtype=dtype).eval()


def tied(model) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


def streamed(model, ids: torch.Tensor, policy: str, segment: int) -> list[torch.Tensor]:
    memory, out = model.new_memory(policy, memory_size=16), []
    with torch.inference_mode():
        for piece in ids.split(segment, dim=1):
            res = model(piece, memory)
            memory = res.memory
            out.append(res.logits)
    return out


@pytest.mark.parametrize("which", ["bundled", "tiny", "untied"])
def test_segcli_loads_what_from_pretrained_loads(which, tiny_model_dir, untied_dir):
    path = {"bundled": BUNDLED_DIR, "tiny": tiny_model_dir, "untied": untied_dir}[which]
    fast, hf = both(path)
    assert type(fast) is SegLM and not fast.training
    assert fast.config.to_dict() == hf.config.to_dict()
    want, got = hf.state_dict(), fast.state_dict()
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert tied(fast) == tied(hf) == hf.config.tie_word_embeddings
    assert sum(p.numel() for p in fast.parameters()) == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, hf.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    for policy, segment in (("fifo", 16), ("sink", 7), ("full", 40)):
        for a, b in zip(streamed(fast, ids, policy, segment), streamed(hf, ids, policy, segment)):
            assert torch.equal(a, b), policy


def test_bfloat16_loads_the_same(tiny_model_dir):
    fast, hf = both(tiny_model_dir, torch.bfloat16)
    assert all(torch.equal(fast.state_dict()[n], t) and t.dtype == torch.bfloat16 for n, t in hf.state_dict().items())


def test_the_config_is_what_autoconfig_reads(tiny_model_dir):
    from transformers import AutoConfig

    assert seglm_config(BUNDLED_DIR).to_dict() == AutoConfig.from_pretrained(BUNDLED_DIR).to_dict()
    assert seglm_config(tiny_model_dir).to_dict() == AutoConfig.from_pretrained(tiny_model_dir).to_dict()


def test_other_configs_go_to_autoconfig(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert seglm_config(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "seglm", "auto_map": {"AutoConfig": "x.Y"}}))
    assert seglm_config(tmp_path) is None  # remote code: AutoConfig decides
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "seglm", "hidden_size": 30,
                                                      "num_attention_heads": 4}))
    assert seglm_config(tmp_path) is None  # refused: AutoConfig names the problem, as before
    (tmp_path / "config.json").write_text("{not json")
    assert seglm_config(tmp_path) is None


def test_a_checkpoint_laid_out_otherwise_goes_through_from_pretrained(tmp_path, tiny_model_dir):
    import shutil

    path = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    tensors = load_file(path / "model.safetensors")
    save_file({**tensors, "model.extra": torch.zeros(2)}, path / "model.safetensors", metadata={"format": "pt"})
    fast, hf = both(path)
    assert type(fast) is SegLMForCausalLM
    assert all(torch.equal(fast.state_dict()[n], t) for n, t in hf.state_dict().items())


def test_a_run_with_the_bundled_model_imports_no_transformers_model_code(tmp_path):
    """What the first record of `segcli run` waits for: no transformers.modeling_utils (torch.distributed.tensor,
    dynamo, ... with it), no Auto classes, no Hugging Face backend, no torch._dynamo (nn.Embedding's init on the
    meta device would import it)."""
    doc = tmp_path / "one.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog.\n", encoding="utf-8")
    unwanted = ["transformers.modeling_utils", "transformers.models.auto", "torch._dynamo", "segcli.hf",
                "segcli.backends.hf", "segcli.backends.recurrent", "segcli.backends.guard"]
    code = (f"import sys; from typer.testing import CliRunner; from segcli.cli import app\n"
            f"res = CliRunner().invoke(app, ['run', {str(doc)!r}, '--format', 'jsonl'])\n"
            f"assert res.exit_code == 0, res.output\n"
            f"print([m for m in {unwanted!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
