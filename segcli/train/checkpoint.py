"""What a run writes: resumable checkpoints (weights, optimizer, RNG states, log) and the final model."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from .config import TrainConfig


def save_checkpoint(path: Path, model, opt, step: int, steps: int, log: list, np_rng: np.random.Generator,
                    py_rng: random.Random) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "steps": steps, "log": log,
                "np_rng": np_rng.bit_generator.state, "py_rng": py_rng.getstate(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model, opt, np_rng: np.random.Generator, py_rng: random.Random,
                    device: torch.device) -> tuple[int, list]:
    """Restore a checkpoint into model, optimizer and RNGs; returns its step and log."""
    if not path.exists():
        raise UsageError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)  # RNG states must stay on the CPU
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    np_rng.bit_generator.state = state["np_rng"]
    py_rng.setstate(state["py_rng"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["log"]  # steps: the current config's (it may extend the run)


def save_final(model, cfg: TrainConfig, out: Path, log: list, seconds: float) -> Path:
    """out/model: the weights (float16), the tokenizer and `training.json` (the config and the last 50 steps)."""
    final = out / "model"
    model.eval()
    model.config.trained_length = max(cfg.seq_len, model.config.trained_length or 0)  # run-time span notes
    # float16 storage halves the file (the bundled model must stay <= 25 MB); runs upcast to float32.
    model.to("cpu").to(torch.float16).save_pretrained(final)
    shutil.copy(cfg.tokenizer_path(), final / "tokenizer.json")
    (final / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "model_max_length": 1000000000}, indent=1))
    (final / "training.json").write_text(json.dumps({"config": cfg.to_dict(), "seconds": seconds,
                                                     "steps": log[-1]["step"] if log else 0, "log": log[-50:]}, indent=1))
    return final
