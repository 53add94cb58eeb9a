"""Model backends behind one small interface (`base.Backend`), one module per kind, and a loader registry.

`load_backend(cfg)` reads the checkpoint's config and hands it to the loader of its kind: the native
`seglm` model (`native.py`), a Hugging Face causal LM with recurrent layers (mamba, rwkv, xlstm and the
hybrids: `recurrent.py`, whose layers' own state is their memory) or any other Hugging Face causal LM
(`hf.py`). Every kind streams through the same memory policies (`segcli.memory`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..config import RunConfig
from ..errors import UsageError
from ..ops.layout import column_major_linears
from ..cache import stamp_model
from .folder_checks import (
    captured_warnings, check_bound_fits, check_folder, check_model_name, check_weights, reason,
)
from .base import BUNDLED_DIR, Backend, resolve_device, resolve_dtype, resolve_model_dir
from .gguf import SHORT_NAMES, convert, gguf_file_of, short_name_path

Loader = Callable[[RunConfig, Path, object, torch.device, torch.dtype], Backend]


def _native(*args) -> Backend:
    from .native import load_native

    return load_native(*args)


def _hf(*args) -> Backend:
    from .hf import load_hf

    return load_hf(*args)


def _recurrent(*args) -> Backend:
    from .recurrent import load_recurrent

    return load_recurrent(*args)


LOADERS: dict[str, Loader] = {"native": _native, "hf": _hf, "recurrent": _recurrent}  # backend kind -> loader(cfg, path, config, device, dtype)


def backend_kind(model_cfg) -> str:
    """Which loader takes a checkpoint with this config."""
    if model_cfg.model_type == "seglm":
        return "native"
    from .recurrent import is_recurrent

    return "recurrent" if is_recurrent(model_cfg) else "hf"


def gguf_source(model: str | None) -> Path | None:
    """The GGUF file `--model` names (a .gguf file, a folder holding one and no config.json, or a short name such
    as `smollm2`), else None."""
    if model is None:
        return None
    if model in SHORT_NAMES and not Path(model).exists():
        return short_name_path(model)
    return gguf_file_of(Path(model))


def load_backend(cfg: RunConfig, guard: bool = True) -> Backend:
    """Load the model named by cfg.model (the bundled one when None) onto cfg.device. A Hugging Face model is checked
    against one plain forward first (`segcli.backends.guard`: a model that would stream differently is refused);
    only `segcli check`, which measures that difference itself, loads with guard=False."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    with captured_warnings() as warned:  # library warnings are not the user's output (--debug's traceback shows them)
        backend = _load(cfg, device, dtype, guard)
    backend.load_warnings = warned
    return backend


def _load(cfg: RunConfig, device: torch.device, dtype: torch.dtype, guard: bool) -> Backend:
    from .native import seglm_config

    check_model_name(cfg.model)
    source = gguf_source(cfg.model)
    converted = convert(source) if source is not None else None
    path = converted.folder if converted else resolve_model_dir(cfg.model, cfg.revision)
    raw = check_folder(path)  # nothing that hangs a reader, config.json a JSON object of possible sizes
    check_weights(path, every=raw.get("model_type") == "seglm")  # the native loader reads every *.safetensors
    check_bound_fits(path / "config.json", raw, dtype, device)  # before a model of 10**9 layers is built
    model_cfg = seglm_config(path)  # the native model's, without the Auto classes (issue 29: seconds of imports)
    if model_cfg is None:
        from transformers import AutoConfig

        from ..models.seglm import modeling_seglm  # noqa: F401  (registers seglm with the Auto classes)

        try:
            model_cfg = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"{path}: config.json is not a model config ({reason(e)})") from None
    backend = LOADERS[backend_kind(model_cfg)](cfg, path, model_cfg, device, dtype)
    if converted:  # the run's config names the file the user gave, and its hash; the folder is a cache
        backend.identity.update(model=str(source), gguf_sha256=converted.sha256, gguf_converted=str(converted.folder))
        backend.load_notes = [converted.note] if converted.note else []
    if device.type == "cpu":
        column_major_linears(backend.model)  # faster CPU matmuls, same values (segcli/ops/layout.py)
    if hasattr(backend, "model"):
        stamp_model(backend.model, backend.identity, dtype, device)  # what its checks' answers are kept under
    if guard and hasattr(backend, "check_continuation"):
        backend.check_continuation()  # every family, every release: its cache and routes are transformers code
    return backend


__all__ = ["Backend", "BUNDLED_DIR", "LOADERS", "load_backend", "resolve_device", "resolve_dtype"]
