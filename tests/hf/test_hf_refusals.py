"""Every refusal of issue 17: where a family cannot be streamed as the model computes it under a policy, segcli says
so in one line naming the family, the feature and the policy (exit 2), and never reports numbers of another model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import BUNDLED_TOKENIZER, excerpt
from hf_families import V, model_of, save_family
from segcli.cli import app
from segcli.errors import UsageError
from segcli.hf import make_cache

pytestmark = pytest.mark.transformers_api  # .ci/run runs this module again under an older transformers 5

runner = CliRunner()



@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    return excerpt(tmp_path_factory, "python_docs.txt", 2000, "refusal-doc")


def saved(name: str, tmp_path_factory) -> str:
    path = save_family(name, tmp_path_factory.mktemp(name) / "model", BUNDLED_TOKENIZER)
    if path is None:
        pytest.skip(f"{name}: not in this transformers")
    return str(path)


def refused_line(res) -> str:
    """The CLI refused: exit 2, one `segcli: error:` line, no traceback, nothing on stdout."""
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segcli: error: ") and "Traceback" not in res.output, res.output
    assert res.stdout == ""
    return lines[0]


def one_line(e: UsageError, family: str, *words: str) -> None:
    text = str(e)
    assert "\n" not in text and text.startswith(f"{family}:"), text
    for w in words:
        assert w in text, text


def test_recurrent_layers_are_refused():
    model = model_of("qwen3_next")
    with pytest.raises(UsageError) as e:
        make_cache(model, "fifo", memory_size=8)
    one_line(e.value, "qwen3_next", "linear_attention", "not a key-value cache")


def test_bidirectional_attention_is_refused():
    model = model_of("gemma3_text", use_bidirectional_attention=True)
    with pytest.raises(UsageError) as e:
        make_cache(model, "full")
    one_line(e.value, "gemma3_text", "bidirectional")


@pytest.mark.parametrize("policy", ["keynorm", "tova"])
def test_slots_chosen_by_content_are_refused_in_windowed_models_only(policy):
    with pytest.raises(UsageError) as e:
        make_cache(model_of("mistral"), policy, memory_size=8)
    one_line(e.value, "mistral", policy, "sliding windows")
    llama = model_of("llama")
    llama.set_attn_implementation("eager")
    make_cache(llama, policy, memory_size=8)  # no window to place them in: every slot is visible


@pytest.mark.parametrize("name,words", [("gemma2", ("sliding-window layers", "--memory linear")),
                                        ("bloom", ("--memory linear", "segcli's attention function"))])
def test_linear_memory_refused(name, words, doc, tmp_path_factory):
    line = refused_line(runner.invoke(app, ["run", str(doc), "--model", saved(name, tmp_path_factory), "-q",
                                            "--memory", "linear", "--device", "cpu", "--max-tokens", "40"]))
    assert line.startswith(f"segcli: error: {name}:") and all(w in line for w in words), line


def test_per_layer_budgets_are_refused_in_windowed_models():
    """PyramidKV's budgets: narrowed per layer on all-full-attention models (tests/hf/test_hf_pyramid.py); a
    sliding window's mask cannot be narrowed that way."""
    from segcli.memory import make_policy

    with pytest.raises(UsageError) as e:
        make_cache(model_of("mistral"), make_policy("fifo", memory_size=8, layer_budget="pyramid"))
    one_line(e.value, "mistral", "--layer-budget pyramid", "sliding-window layers", "uniform")


def test_linear_memory_without_segcli_attention_is_refused_by_make_cache():
    with pytest.raises(UsageError) as e:
        make_cache(model_of("llama"), "linear")
    one_line(e.value, "llama", "attn_implementation='segcli'")


def test_chunked_attention_under_sdpa_refuses_a_memory_without_exact_pairs():
    model = model_of("llama4_text")
    model.set_attn_implementation("sdpa")
    for policy in ("none", "average"):
        with pytest.raises(UsageError) as e:
            make_cache(model, policy)
        one_line(e.value, "llama4_text", "chunk mask", f"--memory {policy}")
    model.set_attn_implementation("eager")
    make_cache(model, "none")  # eager always builds the chunk mask


def test_a_forward_that_fails_on_a_short_memory_is_refused(monkeypatch, doc, tmp_path_factory):
    """A family whose forward builds something over every token seen (as ALiBi over the cache length does in some
    releases) fails once the memory is shorter; segcli finds it on three tokens, before any output, and refuses."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaAttention.forward

    def over_every_token(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layer = cache.layers[self.layer_idx] if cache is not None else None
        if layer is not None and getattr(layer, "n_slots", 0) < getattr(layer, "seen", 0):
            raise RuntimeError("The size of tensor a (2) must match the size of tensor b (3) at dimension 3")
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", over_every_token)
    path = saved("llama", tmp_path_factory)
    line = refused_line(runner.invoke(app, ["run", str(doc), "--model", path, "-q", "--memory", "fifo",
                                            "--memory-size", "8", "--device", "cpu", "--max-tokens", "40"]))
    assert "llama: its forward fails on a memory shorter than the tokens seen" in line and "--memory fifo" in line
    res = runner.invoke(app, ["run", str(doc), "--model", path, "-q", "--memory", "full", "--device", "cpu",
                              "--max-tokens", "40", "--format", "jsonl"])
    assert res.exit_code == 0, res.output  # full never holds fewer pairs than tokens seen


def test_sink_without_a_rotary_rule_is_refused():
    """XGLM adds sinusoidal absolute positions to its inputs: its keys follow no rotation segcli can re-apply."""
    model = model_of("xglm")
    with pytest.raises(UsageError) as e:
        make_cache(model, "sink", sink_tokens=2, memory_size=8)
    one_line(e.value, "xglm", "rotary rule", "--memory sink")
    make_cache(model, "fifo", memory_size=8)


@pytest.mark.parametrize("impl", ["flash_attention_2", "flex_attention"])
def test_attention_implementations_other_than_eager_and_sdpa_are_refused(impl):
    """Their masks do not follow the cache's sizes the way eager's and SDPA's do (and cannot be checked here)."""
    model = model_of("llama")
    model.config._attn_implementation_internal = impl  # as if loaded with it (no GPU kernels needed to refuse)
    with pytest.raises(UsageError) as e:
        make_cache(model, "fifo", memory_size=8)
    one_line(e.value, "llama", repr(impl), "'sdpa' or 'eager'")


def test_longrope_past_its_original_length_is_refused(doc, tmp_path):
    cfg = AutoConfig.for_model(
        "phi3", vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, original_max_position_embeddings=64,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                         "long_factor": [2.0] * 8, "original_max_position_embeddings": 64})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER), bos_token="<|endoftext|>").save_pretrained(tmp_path)
    line = refused_line(runner.invoke(app, ["run", str(doc), "--model", str(tmp_path), "-q", "--memory", "fifo",
                                            "--memory-size", "16", "--device", "cpu", "--max-tokens", "100"]))
    assert "longrope rotary embedding changes its frequencies past 64 positions" in line and "--max-tokens 64" in line
    res = runner.invoke(app, ["run", str(doc), "--model", str(tmp_path), "-q", "--memory", "fifo", "--memory-size",
                              "16", "--device", "cpu", "--max-tokens", "64", "--format", "jsonl"])
    assert res.exit_code == 0 and json.loads(res.stdout.splitlines()[-1])["tokens"] == 64, res.output


def test_falcon_loads_and_streams(doc, tmp_path_factory):
    """falcon did not load at all under segcli's old attention function ('segcli'); it loads as transformers does."""
    res = runner.invoke(app, ["run", str(doc), "--model", saved("falcon", tmp_path_factory), "-q", "--memory", "fifo",
                              "--memory-size", "8", "--segment-size", "4", "--device", "cpu", "--max-tokens", "40",
                              "--format", "jsonl"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[-1])["tokens"] == 40
