"""`segcli generate` on both backends: deterministic with --seed, memory bounded while generating."""

import json

import pytest
import torch
from typer.testing import CliRunner

from segcli.cli import app
from segcli.engine.generate import GenerateSettings, sample_next

runner = CliRunner()


def gen(*args):
    res = runner.invoke(app, ["generate", *map(str, args), "--format", "json", "-q", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_bundled_generate_is_deterministic_with_seed(doc_path):
    a = gen(doc_path, "-n", 24, "--seed", 5, "--memory", "fifo", "--memory-size", 64)
    b = gen(doc_path, "-n", 24, "--seed", 5, "--memory", "fifo", "--memory-size", 64)
    c = gen(doc_path, "-n", 24, "--seed", 6, "--memory", "fifo", "--memory-size", 64)
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
    assert a["token_ids"] != c["token_ids"]
    assert 0 < a["generated_tokens"] <= 24 and a["config"]["model"] == "bundled"


def test_text_format_streams_the_same_text(doc_path):
    js = gen(doc_path, "-n", 16, "--seed", 2)
    res = runner.invoke(app, ["generate", str(doc_path), "-n", "16", "--seed", "2", "-q", "--device", "cpu"])
    assert res.exit_code == 0 and res.stdout == js["text"] + "\n"


def test_generate_on_a_hf_model(tmp_path, doc_path):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from conftest import BUNDLED_TOKENIZER

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER), bos_token="<|endoftext|>").save_pretrained(tmp_path)
    out = gen(doc_path, "--model", tmp_path, "-n", 8, "--temperature", 0, "--memory", "sink", "--memory-size", 16)
    assert out["generated_tokens"] == 8 and out["config"]["model_type"] == "llama"


@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_sampling_respects_top_p(top_p):
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, GenerateSettings(temperature=1.0, top_p=top_p), g) for _ in range(300)}
    assert draws == ({0, 1, 2, 3} if top_p == 1.0 else {0})
    assert sample_next(logits, GenerateSettings(temperature=0), g) == 0


@pytest.mark.parametrize("option,bad,message", [
    ("--temperature", "nan", "--temperature must be a finite number >= 0"),
    ("--temperature", "inf", "--temperature must be a finite number >= 0"),
    ("--temperature", "-0.5", "--temperature must be a finite number >= 0"),
    ("--top-p", "nan", "--top-p must be in (0, 1]"),
    ("--top-p", "1.5", "--top-p must be in (0, 1]"),
    ("--max-new-tokens", "-1", "--max-new-tokens must be >= 0"),
], ids=lambda x: str(x))
def test_bad_sampling_values_exit_2_with_one_line(doc_path, option, bad, message):
    res = runner.invoke(app, ["generate", str(doc_path), option, bad, "-q", "--device", "cpu"])
    assert res.exit_code == 2
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("segcli: error: ") and message in lines[0], res.stderr


@pytest.mark.parametrize("model,memory,ns", [("bundled", "fifo", 1), ("hf", "fifo", 1), ("hf", "full", 8),
                                             ("hf", "fifo", 4)])
def test_the_prompt_read_in_passes_gives_the_tokens_of_stepping(tmp_path, doc_path, model, memory, ns):
    """generate reads its prompt through the token and segment passes where the backend has them: greedy ids
    equal those of a loop that steps every segment (backend.step), the way generate read prompts before."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from conftest import BUNDLED_TOKENIZER
    from segcli.backends import load_backend
    from segcli.config import RunConfig
    from segcli.engine.generate import generate
    from segcli.engine.stream import pass_stepper
    from segcli.engine.loop import split

    path = None
    if model == "hf":
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=1024)).save_pretrained(tmp_path)
        PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER), bos_token="<|endoftext|>").save_pretrained(tmp_path)
        path = str(tmp_path)
    sizes = {"memory_size": 24} if memory == "fifo" else {}
    cfg = RunConfig(model=path, memory=memory, segment_size=ns, device="cpu", **sizes)
    backend = load_backend(cfg)
    prompt = backend.tokenizer.encode(doc_path.read_text()[:900]).ids[:200]
    assert pass_stepper(backend, backend.new_memory(cfg), ns)[1] > ns  # a pass, not segment by segment
    s = GenerateSettings(max_new_tokens=12, temperature=0)
    seen: list[tuple[int, int]] = []
    got = list(generate(backend, prompt, cfg, s, on_prompt=lambda done, total: seen.append((done, total))))
    with torch.inference_mode():
        memory = backend.new_memory(cfg)
        for ids, _ in split(torch.tensor([prompt]), ns):
            logits, memory, _ = backend.step(ids, memory)
        want = []
        for _ in range(12):
            nxt = int(logits[0, -1].float().argmax())
            if backend.eos_id is not None and nxt == backend.eos_id:
                break
            want.append(nxt)
            logits, memory, _ = backend.step(torch.tensor([[nxt]]), memory)
    assert got == want and len(got) > 0
    assert seen[-1] == (len(prompt), len(prompt)) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_max_prompt_tokens_reads_the_end_of_the_document(doc_path):
    whole = gen(doc_path, "-n", 4, "--temperature", 0)
    last = gen(doc_path, "-n", 4, "--temperature", 0, "--max-prompt-tokens", 50)
    assert last["prompt_tokens"] == 50 < whole["prompt_tokens"]
    res = runner.invoke(app, ["generate", str(doc_path), "--max-prompt-tokens", "0", "-q"])
    assert res.exit_code == 2 and "--max-prompt-tokens must be >= 1" in res.output
