"""Any Hugging Face causal LM, streamed through segcli's policies as transformers cache layers (`segcli.hf`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..config import RunConfig
from ..errors import UsageError
from ..hf import SegcliCache, cache_kwarg, make_cache, register_attention
from .base import Backend, file_sha256, model_fingerprint


def _attention_modules(model) -> list:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]


@dataclass
class HFBackend(Backend):
    kind = "hf"
    attn_modules: list = field(default_factory=list)  # the model's attention modules (they record the memory mass)

    def new_memory(self, cfg: RunConfig, batch: int = 1) -> SegcliCache:
        return make_cache(self.model, cfg.policy())

    def step(self, ids: Tensor, memory: SegcliCache):
        t = ids.shape[1]
        start = memory.seen
        limit = self.identity.get("max_positions")
        if limit is not None and start + t > limit:
            raise UsageError(
                f"{self.identity['model']}: learned absolute positions end at {limit} tokens; this model cannot stream "
                f"past them (use --max-tokens {limit} or a rotary model)")
        masses: list[Tensor] = []
        for mod in self.attn_modules:
            mod._segcli_layer = memory.layers[mod.layer_idx]
            mod._segcli_masses = masses
        pos = torch.arange(start, start + t, device=ids.device)[None]
        out = self.model(input_ids=ids, position_ids=pos, use_cache=True, **{cache_kwarg(self.model): memory})
        mass = float(torch.stack(masses).mean()) if masses else None
        return out.logits, memory, mass


def load_hf(cfg: RunConfig, path: Path, model_cfg, device: torch.device, dtype: torch.dtype) -> HFBackend:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
            attn_implementation=register_attention())
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{path}: cannot load as a causal LM ({str(e).splitlines()[0]})") from None
    model.to(device).eval()
    backend_tok = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend_tok is None:
        raise UsageError(f"{path}: segcli needs a fast tokenizer (tokenizer.json)")
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    text_cfg = model.config.get_text_config()
    has_rotary = any(type(m).__name__.endswith("RotaryEmbedding") for m in model.modules())
    identity = {
        "model": str(path),
        "model_type": model.config.model_type,
        "model_sha256": model_fingerprint(path),
        "tokenizer_sha256": file_sha256(path / "tokenizer.json") if (path / "tokenizer.json").exists() else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_positions": None if has_rotary else getattr(text_cfg, "max_position_embeddings", None),
    }
    return HFBackend(model, backend_tok, bos, device, dtype, identity, attn_modules=_attention_modules(model))
