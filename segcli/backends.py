"""Model backends behind one small interface: load, new_memory, step, memory_stats.

`load_backend` picks the native `seglm` model or a Hugging Face causal LM from
the checkpoint's config; both stream through the same memory policies.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import RunConfig
from .errors import UsageError
from .memory import make_policy
from .memory.base import LayerStats
from .ops.layout import column_major_linears

BUNDLED_DIR = Path(__file__).parent / "bundled"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bf16 matmuls are slow on CPUs: float32 there
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(path: Path) -> str:
    """sha256 over config.json and the weight files (full content up to 64 MB each, else size + ends)."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            continue
        h.update(f.name.encode())
        size = f.stat().st_size
        with open(f, "rb") as fh:
            if size <= 64 << 20:
                h.update(fh.read())
            else:
                h.update(str(size).encode() + fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()


@dataclass
class Backend:
    """What the runner needs from a model."""

    kind: str  # "native" | "hf"
    model: Any
    tokenizer: Any  # tokenizers.Tokenizer
    bos_id: int | None
    device: torch.device
    dtype: torch.dtype
    identity: dict[str, Any]

    @property
    def trained_length(self) -> int | None:
        """The longest span of keys the model was trained to attend over, where its config records it."""
        return getattr(self.model.config, "trained_length", None) if self.kind == "native" else None

    def new_memory(self, cfg: RunConfig, batch: int = 1):
        policy = make_policy(cfg.memory, **cfg.sizes())
        return self.model.new_memory(policy, batch)

    def step(self, ids: Tensor, memory) -> tuple[Tensor, Any, float | None]:
        out = self.model(ids, memory)
        mass = None if out.memory_mass is None else float(out.memory_mass.float().mean())
        return out.logits, out.memory, mass

    def memory_stats(self, memory) -> list[LayerStats]:
        return memory.stats()

    def sliding_window(self, memory, segment_size: int) -> int | None:
        """W when streaming `memory` at `segment_size` (1) is a causal sliding window of W keys that `step_window`
        computes many tokens at a time; None when it must go token by token (other policies, the HF backend)."""
        if self.kind != "native" or segment_size != 1:
            return None
        return memory.policy.sliding_window()

    def step_window(self, ids: Tensor, memory, band: int) -> tuple[Tensor, Any, list[float | None], list[list[LayerStats]]]:
        """ids (1, T) as T segments of one token through a sliding-window memory of `band` keys, in one pass.

        Returns logits (1, T, V), the memory after the last token, and per token what `step` and
        `memory_stats` would have returned after it: the mass (None while the memory was empty) and the
        layers' stats.
        """
        policy = memory.policy
        before = policy.slots(memory.states[0])
        out = self.model(ids, memory, band=band)
        t = ids.shape[1]
        mass = out.memory_mass.float().mean(0).tolist()  # (L, T) -> T
        mass = [None if before + i == 0 else x for i, x in enumerate(mass)]
        per_layer = [policy.stats_each(s, before, t) for s in out.memory.states]  # L lists of T
        return out.logits, out.memory, mass, [list(layers) for layers in zip(*per_layer)]


def resolve_model_dir(model: str | None, revision: str | None = None) -> Path:
    if model is None:
        if not (BUNDLED_DIR / "model.safetensors").exists():
            raise UsageError("the bundled model is not installed in this copy of segcli; pass --model DIR")
        return BUNDLED_DIR
    p = Path(model)
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise UsageError(f"{model}: not a model directory (no config.json); pass a saved checkpoint folder")
        return p
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return hub_snapshot(model, revision)
    raise UsageError(f"{model}: no such model directory")


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """A hub model from the local cache, or downloaded when the network allows it."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: try the network below
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UsageError(f"{repo_id}: not a local folder and not in the Hugging Face cache (HF_HUB_OFFLINE is set)")
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{repo_id}: not a local folder and the hub could not provide it ({type(e).__name__})") from None


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    if (path / "tokenizer.json").exists():
        try:
            return Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
            raise UsageError(f"{path}/tokenizer.json: cannot load tokenizer ({e})") from None
    raise UsageError(f"{path}: no tokenizer.json next to the model")


def special_id(tokenizer, path: Path, names: tuple[str, ...]) -> int | None:
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    for name in names:
        tok = cfg.get(name)
        if isinstance(tok, dict):
            tok = tok.get("content")
        if isinstance(tok, str) and tokenizer.token_to_id(tok) is not None:
            return tokenizer.token_to_id(tok)
    return None


def load_backend(cfg: RunConfig) -> Backend:
    """Load the model named by cfg.model (the bundled one when None) onto cfg.device."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from .models import seglm  # noqa: F401  (registers the Auto classes)

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    path = resolve_model_dir(cfg.model, cfg.revision)
    try:
        model_cfg = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{path}: config.json is not a model config ({str(e).splitlines()[0]})") from None
    if model_cfg.model_type == "seglm":
        backend = _load_native(path, model_cfg, device, dtype)
    else:
        from .hf import load_hf_backend

        backend = load_hf_backend(cfg, path, device, dtype)
    if device.type == "cpu":
        column_major_linears(backend.model)  # faster CPU matmuls, same values (segcli/ops/layout.py)
    return backend


def _load_native(path: Path, model_cfg, device: torch.device, dtype: torch.dtype) -> Backend:
    from .models.seglm import SegLMForCausalLM

    with torch.device("meta"):  # shapes only, no memory: name a missing or misshapen tensor before loading
        _check_weights(path, SegLMForCausalLM(model_cfg))
    try:
        model = SegLMForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{path}: cannot load the checkpoint ({str(e).splitlines()[0]})") from None
    model.to(device).eval()
    tok = load_tokenizer(path)
    bos = model_cfg.bos_token_id
    identity = {
        "model": "bundled" if path == BUNDLED_DIR else str(path),
        "model_type": "seglm",
        "model_sha256": model_fingerprint(path),
        "tokenizer_sha256": file_sha256(path / "tokenizer.json"),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return Backend("native", model, tok, bos, device, dtype, identity)


def _check_weights(path: Path, model) -> None:
    """from_pretrained fills missing tensors with random init; a user must hear about it."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{path}: no *.safetensors weights")
    names: dict[str, tuple] = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for n in sf.keys():
                names[n] = tuple(sf.get_slice(n).get_shape())
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items() if n != "lm_head.weight" or n in names}
    missing = sorted(set(expected) - set(names))
    if missing:
        raise UsageError(f"{path}: checkpoint is missing tensors: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    wrong = [n for n in expected if names[n] != expected[n]]
    if wrong:
        n = wrong[0]
        raise UsageError(f"{path}: tensor {n} has shape {list(names[n])}, the config expects {list(expected[n])}")


