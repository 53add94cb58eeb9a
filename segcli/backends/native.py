"""The native `seglm` model: its attention layers read [Mem; segment] through the policy directly.

It loads as `SegLM`, the model in torch alone: its config is read as `SegLMConfig` and its weights from
model.safetensors, as `SegLMForCausalLM.from_pretrained` would, without transformers' Auto classes and model code
(seconds of imports before the first record, issue 29). A checkpoint laid out otherwise (sharded, extra tensors,
an untied head left out) goes through `from_pretrained` as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..config import RunConfig
from ..errors import UsageError
from ..memory.base import LayerStats, state_row
from .folder_checks import check_model_fits, reason
from .base import BUNDLED_DIR, Backend, cached_sha256, model_fingerprint


class NativeBackend(Backend):
    kind = "native"

    @property
    def trained_length(self) -> int | None:
        return getattr(self.model.config, "trained_length", None)

    @property
    def eos_id(self) -> int | None:
        return self.bos_id  # the bundled tokenizer's <|endoftext|> both opens and ends a document

    def new_memory(self, cfg: RunConfig, batch: int = 1):
        return self.model.new_memory(cfg.policy(), batch)

    def step(self, ids: Tensor, memory) -> tuple[Tensor, object, float | None]:
        out = self.model(ids, memory)
        mass = None if out.memory_mass is None else float(out.memory_mass.float().mean())
        return out.logits, out.memory, mass

    def row_memory(self, memory, b: int, batch: int):
        return dataclasses.replace(memory, states=[state_row(s, b, batch) for s in memory.states])

    def sliding_window(self, memory, segment_size: int) -> int | None:
        """The pass bound when segment size 1 has a parallel form under this policy (fifo: its window; sink,
        compressive, xl, average, linear: their token passes), so `step_window` takes up to that many tokens."""
        return memory.policy.token_pass() if segment_size == 1 else None

    def step_window(self, ids: Tensor, memory, band: int) -> tuple[Tensor, object, list[float | None], list[list[LayerStats]]]:
        """ids (1, T) as T segments of one token, in one token pass (`policy.extend_each`; `band`: the pass bound).

        Returns logits (1, T, V), the memory after the last token, and per token what `step` and
        `memory_stats` would have returned after it: the mass (None while the memory was empty) and the
        layers' stats. First tokens the policy must still step one by one (sink's sinks) go through `step`.
        """
        policy, t = memory.policy, ids.shape[1]
        lead = min(t, policy.serial_tokens(memory.states[0]))
        logits, masses, stats = [], [], []
        for j in range(lead):
            lg, memory, mass = self.step(ids[:, j : j + 1], memory)
            logits.append(lg)
            masses.append(mass)
            stats.append(self.memory_stats(memory))
        if lead < t:
            empty = policy.is_empty(memory.states[0])
            out = self.model(ids[:, lead:], memory, band=band)
            mass = out.memory_mass.float().mean(0).tolist()  # (L, T) -> T
            if empty:
                mass[0] = None
            masses += mass
            stats += [list(layers) for layers in zip(*out.extras["stats_each"])]  # L lists of T -> T lists of L
            logits.append(out.logits)
            memory = out.memory
        return logits[0] if len(logits) == 1 else torch.cat(logits, 1), memory, masses, stats


    def packs(self, memory) -> int | None:
        """The policy's segment-pass bound (fifo: its window, so no buffer grows past what the steps reach; full),
        at most PACK_TOKENS; None for the other policies."""
        bound = memory.policy.segment_pass()
        return min(bound, PACK_TOKENS) if bound else None

    def segment_pass(self, memory, segment_size: int) -> int | None:
        """Tokens per forward when segments of `segment_size` (> 1) go several to a forward (`step_segments`): a
        multiple of it within `packs`, at least two segments; None: they step one by one."""
        bound = self.packs(memory) if segment_size > 1 else None
        n = bound // segment_size * segment_size if bound else 0
        return n if n >= 2 * segment_size else None

    def step_segments(self, ids: Tensor, memory, segment_size: int):
        """ids (1, T) as segments of `segment_size` tokens (the last may be shorter) in one segment pass."""
        t = ids.shape[1]
        return self.step_packed(ids, memory, [min(segment_size, t - i) for i in range(0, t, segment_size)])

    def step_packed(self, ids: Tensor, memory, lengths: list[int]):
        """ids (1, T) as consecutive segments of `lengths` tokens in one segment pass (`policy.extend_segments`):
        logits (1, T, V), the memory after the last, and per segment what `step` and `memory_stats` would have
        returned after it (the mass None where the memory was empty before it)."""
        empty = memory.policy.is_empty(memory.states[0])
        out = self.model(ids, memory, segments=lengths)
        masses = out.memory_mass.float().mean(0).tolist()  # (L, J) -> J
        if empty:
            masses[0] = None
        stats = [list(layers) for layers in zip(*out.extras["stats_each"])]  # L lists of J -> J lists of L
        return out.logits, out.memory, masses, stats


PACK_TOKENS = 512  # most tokens per segment pass: a (T, memory + T) score matrix per head, and a forward long
#   enough that the weights' reads no longer rule it (19-token documents: one forward each ran at ~1.6k tokens/s)


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    if (path / "tokenizer.json").exists():
        try:
            return Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
            raise UsageError(f"{path}/tokenizer.json: cannot load tokenizer ({reason(e)})") from None
    raise UsageError(f"{path}: no tokenizer.json next to the model")


def seglm_config(path: Path):
    """The `SegLMConfig` of a native checkpoint, read directly (what `AutoConfig` returns for it, without importing
    the Auto classes); None for any other model, and for a config.json the Auto path should judge (remote code,
    or one `SegLMConfig` refuses: AutoConfig then says why, in its usual words)."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("model_type") != "seglm" or "auto_map" in raw:
        return None
    from ..models.seglm import SegLMConfig

    try:
        return SegLMConfig.from_pretrained(path, name_or_path=path)  # as AutoConfig calls it
    except Exception:  # noqa: BLE001
        return None


def load_native(cfg: RunConfig, path: Path, model_cfg, device: torch.device, dtype: torch.dtype) -> NativeBackend:
    from ..models.seglm import SegLM

    with shapes_only():  # no memory: name a missing or misshapen tensor before loading
        shapes = SegLM(model_cfg)
    check_model_fits(path / "config.json", shapes, dtype, device)  # its bytes against the free memory, before loading
    _check_weights(path, shapes)
    model = _load_weights(path, shapes, dtype)
    if model is None:  # a layout only transformers' loader knows what to make of: its model, as before
        from ..models.seglm import SegLMForCausalLM

        try:
            model = SegLMForCausalLM.from_pretrained(path, dtype=dtype)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"{path}: cannot load the checkpoint ({reason(e)})") from None
    model.to(device).eval()
    tok = load_tokenizer(path)
    identity = {
        "model": "bundled" if path == BUNDLED_DIR else str(path),
        "model_type": "seglm",
        "model_sha256": model_fingerprint(path),
        "tokenizer_sha256": cached_sha256(path / "tokenizer.json"),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return NativeBackend(model, tok, model_cfg.bos_token_id, device, dtype, identity)


class _NoNormalInit(TorchFunctionMode):
    """Skips `nn.init.normal_` (nn.Embedding's init): on the meta device it runs torch's Python reference of
    `normal_`, which imports torch._dynamo, ~1.4 s of `segcli run`'s start-up (issue 29). Thread-local, as torch's
    device context is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is nn.init.normal_:  # normal_(tensor, mean, std, generator), its tensor by keyword
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Modules built inside are shapes on the meta device (no memory, no random init)."""
    with torch.device("meta"), _NoNormalInit():
        yield


def _load_weights(path: Path, model, dtype: torch.dtype):
    """`model` (a SegLM on the meta device) with the weights of path/model.safetensors in `dtype`: what
    `SegLMForCausalLM.from_pretrained(path, dtype=dtype)` loads, when the file holds exactly the model's tensors
    (the head left out where the config ties it to the embeddings). None for any other layout."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if [f.name for f in files] != ["model.safetensors"]:  # sharded, or other files from_pretrained would not read
        return None
    tied = model.config.tie_word_embeddings
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    tensors = load_file(files[0])
    if set(tensors) != expected:
        return None
    model.load_state_dict({n: t.to(dtype) for n, t in tensors.items()}, strict=False, assign=True)
    if tied:  # assign replaced the embedding's parameter; the head shares the new one, as transformers ties them
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config.dtype = dtype  # as from_pretrained records it
    return model


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
