"""Hugging Face causal LMs through the memory policies: tiny random models built from configs
(no downloads), saved with a tokenizer, streamed through `segcli run --model DIR`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPTNeoXConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config,
)
from typer.testing import CliRunner

from conftest import BUNDLED_TOKENIZER, SAMPLE
from segcli.cli import app
from segcli.hf import cache_kwarg, make_cache
from segcli.memory import POLICY_NAMES, REGISTRY

pytestmark = pytest.mark.transformers_api  # .ci/run runs this module again under an older transformers 5

V = 8192
CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "qwen2": lambda: Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=128),
    "gpt2": lambda: GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=4096),
}
runner = CliRunner()


def build(arch: str, path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]())
    with torch.no_grad():  # sharpen the random attention so positions matter
        for name, p in model.named_parameters():
            if any(s in name for s in ("q_proj", "k_proj", "query_key_value", "c_attn")) and p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(path)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER), bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_dir(request, tmp_path_factory):
    return request.param, build(request.param, tmp_path_factory.mktemp(request.param) / "model")


@pytest.fixture(scope="module")
def text():
    return (SAMPLE / "python_docs.txt").read_text(encoding="utf-8")[:2000]


def run(model_dir, doc, *args) -> list[dict]:
    res = runner.invoke(app, ["run", str(doc), "--model", str(model_dir), "-q", "--format", "jsonl", "--device", "cpu", *map(str, args)])
    assert res.exit_code == 0, res.output
    return [json.loads(x) for x in res.stdout.splitlines()]


def plain_ids(model_dir, text):
    tok = AutoTokenizer.from_pretrained(model_dir)  # the model's own tokenizer class, as segcli loads it
    return torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])


def reference_nll(model_dir, ids, mask=None) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.where(mask, 0.0, torch.finfo(torch.float32).min)[None, None]}
        logits = model(ids[:, :-1], **kw).logits[0]
    return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))


@pytest.fixture(scope="module")
def doc(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("hfdoc") / "doc.txt"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("n_s", [1, 5, 64])
def test_full_equals_one_plain_forward(hf_dir, doc, text, n_s):
    arch, d = hf_dir
    ids = plain_ids(d, text)[:, :120]
    recs = run(d, doc, "--memory", "full", "--segment-size", n_s, "--max-tokens", ids.shape[1] - 1)
    assert abs(recs[-1]["nll"] - reference_nll(d, ids)) <= 1e-3


def test_fifo_at_segment_size_1_equals_sliding_window(hf_dir, doc, text):
    arch, d = hf_dir
    ids = plain_ids(d, text)[:, :81]
    n_c = 6
    t = ids.shape[1] - 1
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    window = (j <= i) & (j >= i - n_c)
    recs = run(d, doc, "--memory", "fifo", "--memory-size", n_c, "--segment-size", 1, "--max-tokens", t)
    ref = reference_nll(d, ids, window)
    assert abs(recs[-1]["nll"] - ref) <= 1e-3
    assert abs(recs[-1]["nll"] - reference_nll(d, ids)) > 1e-2, "the window must matter"


def test_xl_equals_fifo_with_memory_size_segment_size(hf_dir, doc):
    arch, d = hf_dir
    xl = run(d, doc, "--memory", "xl", "--segment-size", 8, "--max-tokens", 100)
    fifo = run(d, doc, "--memory", "fifo", "--memory-size", 8, "--segment-size", 8, "--max-tokens", 100)
    assert abs(xl[-1]["nll"] - fifo[-1]["nll"]) <= 1e-3


@pytest.mark.parametrize("hf_dir", ["llama", "gpt2"], indirect=True)  # rotary and learned positions; every policy
@pytest.mark.parametrize("policy", POLICY_NAMES)  # on every family, briefly: tests/hf/test_hf_families.py
def test_every_policy_bounded_over_3000_tokens(hf_dir, policy):
    arch, d = hf_dir
    sizes = {"memory_size": 64, "sink_tokens": 4, "compress_rate": 4, "compressed_size": 16, "recent_tokens": 16,
             "window": 8, "layer_budget": "uniform"}
    opts = [x for k in REGISTRY[policy].parameters for x in (f"--{k.replace('_', '-')}", sizes[k])]
    recs = run(d, SAMPLE / "hamlet.txt", "--memory", policy, "--segment-size", 100, *opts, "--max-tokens", 3000)
    segs = [r for r in recs if r["type"] == "segment"]
    assert recs[-1]["tokens"] == 3000 and all(math.isfinite(s["loss"]) for s in segs)
    if policy == "full":
        assert segs[-1]["memory"]["slots"] == 3000
    else:
        assert all(s["memory"]["slots"] <= s["memory"]["capacity"] for s in segs)
        assert max(s["memory"]["bytes"] for s in segs[15:]) <= max(s["memory"]["bytes"] for s in segs[:15])


def test_make_cache_with_generate(hf_dir):
    arch, d = hf_dir
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    ids = torch.randint(1, V, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=8, do_sample=False)
        arg = cache_kwarg(model)  # `cache` or, before its rename in transformers 5, `past_key_values`
        full = model.generate(ids, max_new_tokens=8, do_sample=False, **{arg: make_cache(model, "full")})
        fifo = model.generate(ids, max_new_tokens=8, do_sample=False, **{arg: make_cache(model, "fifo", memory_size=8)})
    assert torch.equal(plain, full), "an unbounded cache must generate exactly what the default cache does"
    assert fifo.shape == plain.shape


def test_cache_kwarg_follows_the_forward_signature(hf_dir):
    # transformers renamed forward's `past_key_values` to `cache` within 5.x (5.17 has the old name, 5.24 the new);
    # a name the forward does not take lands in its **kwargs and the model silently runs without segcli's memory
    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs): ...

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs): ...

    assert (cache_kwarg(Old()), cache_kwarg(New())) == ("past_key_values", "cache")
    model = AutoModelForCausalLM.from_pretrained(hf_dir[1]).eval()
    cache = make_cache(model, "fifo", memory_size=8)
    with torch.no_grad():
        model(torch.arange(1, 13)[None], position_ids=torch.arange(12)[None], use_cache=True, **{cache_kwarg(model): cache})
    assert cache.get_seq_length() == 12 and cache.stats()[0].slots == 8  # the installed version's model filled our cache


def test_learned_positions_stop_with_a_clear_error(tmp_path, doc):
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER), bos_token="<|endoftext|>").save_pretrained(tmp_path)
    res = runner.invoke(app, ["run", str(doc), "--model", str(tmp_path), "-q", "--max-tokens", "200"])
    assert res.exit_code == 2 and "learned absolute positions end at 64" in res.output


def test_hub_id_without_network_is_one_clear_error(monkeypatch, doc):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = runner.invoke(app, ["run", str(doc), "--model", "nobody/not-a-cached-model", "-q"])
    assert res.exit_code == 2 and "not in the Hugging Face cache" in res.output
