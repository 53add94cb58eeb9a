"""Configuration of the native model `seglm`."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class SegLMConfig(PreTrainedConfig):
    """A small decoder-only transformer (pre-norm, RoPE, SwiGLU) whose attention reads a memory."""

    model_type = "seglm"

    vocab_size: int = 8192  # BPE vocabulary
    hidden_size: int = 256  # model width
    num_hidden_layers: int = 6  # transformer blocks
    num_attention_heads: int = 4  # heads per block (head_dim = hidden_size / heads)
    intermediate_size: int = 688  # SwiGLU hidden width
    rope_theta: float = 10000.0  # RoPE base
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    initializer_range: float = 0.02  # std of the normal init
    dropout: float = 0.0  # residual dropout (training only)
    smear_keys: bool = False  # keys add a learned share of the previous token's key (segcli.ops.smear)
    trained_length: int | None = None  # tokens per training sequence: the most keys any query saw in training
    tie_word_embeddings: bool = True  # share input and output embeddings
    bos_token_id: int | None = 0  # prepended to every document (<|endoftext|>)
    eos_token_id: int | None = 0
    pad_token_id: int | None = None

    def validate_architecture(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("head_dim must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
