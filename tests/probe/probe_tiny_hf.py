"""A tiny random Llama saved with the bundled tokenizer (no downloads), for the probe, compare and lm-eval tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from conftest import BUNDLED_TOKENIZER


def build_llama(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # sharpen the random attention so that positions matter
        for name, p in model.named_parameters():
            if ("q_proj" in name or "k_proj" in name) and p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(path)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER), bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>")
    tok.save_pretrained(path)
    return path


def build_gpt2(path: Path, n_positions: int = 128) -> Path:
    """A tiny GPT-2: learned absolute positions that end at `n_positions`."""
    from transformers import GPT2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=8192, n_embd=32, n_layer=2, n_head=2,
                                                        n_positions=n_positions, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER), bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(path)
    return path
