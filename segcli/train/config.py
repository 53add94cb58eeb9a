"""The training config: typed dataclasses loaded from YAML, unknown keys rejected.

    base: stage2.yaml          # optional: the config this one changes (path relative to this file)
    seq_len: 2048              # a key replaces the base's value (a mapping value too: model, policies) ...
    tasks:                     # ... except under tasks, where each task's settings merge into the base's
      copy: {gap: [300, 1700]} #   (the base's other copy settings stay)
      jump: null               #   null removes a task

Resolution: the `base` chain (root first), then this file, then `--set KEY=VALUE` settings (a dotted
KEY such as `tasks.copy.prob` or `model.rope_theta` sets one nested key; null removes it), then the
CLI's own options. `tokenizer: bundled` and `init_from: bundled` mean the package's own tokenizer and
model, found wherever segcli is installed (the old spellings `segcli/bundled/tokenizer.json` and
`segcli/bundled` read the same).

The flat format of earlier versions (`copy_prob`, `copy_len`, ..., `repeat_*`, `jump_prob`, `jump`: one
top-level key per task setting) still loads: a config whose merged keys are flat is mapped onto `tasks`
as those versions trained it (a task is on when its prob is > 0; the jump steps copy `copy_passages`
passages of `copy_len` tokens). Flat keys and `tasks` in one config are an error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DEVICES, from_mapping, load_yaml
from ..errors import UsageError
from ..memory import POLICY_NAMES
from .tasks import Task, check_tasks, make_tasks

BUNDLED = "bundled"  # tokenizer / init_from: the package's own
LEGACY_BUNDLED = {"tokenizer": "segcli/bundled/tokenizer.json", "init_from": "segcli/bundled"}  # repo-root relative
MAX_BASES = 32  # a longer base chain is a loop nobody meant


@dataclass
class TrainConfig:
    corpus: str = "corpus/train"  # folder of UTF-8 .txt files (searched recursively)
    tokenizer: str = BUNDLED  # tokenizer.json to use (bundled: the package's)
    out_dir: str = "runs/seglm"  # checkpoints and the final model
    model: dict = field(default_factory=dict)  # SegLMConfig fields (with init_from: changes to the saved config)
    seq_len: int = 1024  # tokens per training sequence (memory is carried inside it)
    batch_size: int = 32  # sequences per step
    steps: int = 1000  # optimizer steps
    lr: float = 2e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of lr
    warmup_steps: int = 100  # linear warm-up
    weight_decay: float = 0.1
    smear_lr_scale: float = 1.0  # the key_smear shares (one scalar per head) learn at lr x this
    grad_clip: float = 1.0
    policies: dict = field(default_factory=lambda: {"fifo": 1.0})  # policy -> sampling weight
    segment_sizes: list = field(default_factory=lambda: [128])  # drawn uniformly per step
    memory_sizes: list = field(default_factory=lambda: [512])  # drawn uniformly per step (n_c)
    sink_tokens: int = 4
    compress_rate: int = 4
    val_fraction: float = 0.01  # share of 4096-token blocks held out for validation
    val_every: int = 200  # steps between validation losses
    val_batches: int = 8
    checkpoint_every: int = 200  # steps between resumable checkpoints
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bfloat16 autocast on CUDA (CPU always float32)
    max_minutes: float | None = None  # if set, steps are reduced to fit after timing the first steps
    keep_best: bool = True  # save the weights with the best validation loss (early stopping)
    init_from: str | None = None  # a saved model folder to start from (fine-tuning; bundled: the package's model)
    tasks: dict[str, Task] = field(default_factory=dict)  # data task name -> its config (segcli.train.tasks)

    def tokenizer_path(self) -> Path:
        return bundled_dir() / "tokenizer.json" if self.tokenizer == BUNDLED else Path(self.tokenizer)

    def init_path(self) -> Path | None:
        return None if self.init_from is None else bundled_dir() if self.init_from == BUNDLED else Path(self.init_from)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (the `training.json` record; loads back with `from_dict`)."""
        return dataclasses.asdict(self)  # tasks too: {name: {setting: value}}


def bundled_dir() -> Path:
    from ..backends import BUNDLED_DIR

    return BUNDLED_DIR


# -- the flat format of earlier versions ------------------------------------------------------------------
FLAT_KEYS = {  # flat key -> (task, setting)
    "copy_prob": ("copy", "prob"), "copy_passages": ("copy", "passages"), "copy_len": ("copy", "length"),
    "copy_gap": ("copy", "gap"), "copy_gap_scale": ("copy", "gap_scale"),
    "repeat_prob": ("repeat", "prob"), "repeat_len": ("repeat", "length"), "repeat_ids": ("repeat", "ids"),
    "jump_prob": ("jump", "prob"), "jump": ("jump", "skip"),
}
JUMP_FROM_COPY = {"copy_passages": "passages", "copy_len": "length"}  # the flat jump steps used the copy settings


def from_flat(data: dict[str, Any]) -> dict[str, Any]:
    """A flat-format mapping with its task keys moved under `tasks` (a task is on when its prob is > 0)."""
    out = {k: v for k, v in data.items() if k not in FLAT_KEYS}
    tasks: dict[str, dict] = {}
    for key, (task, setting) in FLAT_KEYS.items():
        if key in data:
            tasks.setdefault(task, {})[setting] = data[key]
    for key, setting in JUMP_FROM_COPY.items():
        if key in data:
            tasks.setdefault("jump", {})[setting] = data[key]
    on = {}
    for name, settings in tasks.items():
        prob = settings.get("prob", 0.0)
        if not isinstance(prob, (int, float)) or isinstance(prob, bool) or prob != 0:  # a bad prob: let the checks name it
            on[name] = {**settings, "prob": prob}
    out["tasks"] = on
    return out


# -- loading -------------------------------------------------------------------------------------------
def normalise(data: dict, source: str) -> dict:
    """Keys as field names (`seq-len` -> `seq_len`), at the top level and inside `tasks`."""
    out = {}
    for raw, value in data.items():
        key = str(raw).replace("-", "_")
        if key in out:
            raise UsageError(f"{source}: key {raw!r} given twice")
        if key == "tasks" and isinstance(value, dict):
            value = {str(n): ({str(k).replace("-", "_"): v for k, v in s.items()} if isinstance(s, dict) else s)
                     for n, s in value.items()}
        out[key] = value
    return out


def merge(base: dict, over: dict) -> dict:
    """`over`'s keys replace `base`'s, except under `tasks`: each task's settings merge, null removes a task."""
    out = {**base, **{k: v for k, v in over.items() if k != "tasks"}}
    if "tasks" in over:
        tasks = over["tasks"]
        if isinstance(tasks, dict) and isinstance(base.get("tasks"), dict):
            merged = dict(base["tasks"])
            for name, settings in tasks.items():
                if settings is None:
                    merged.pop(name, None)
                elif isinstance(settings, dict) and isinstance(merged.get(name), dict):
                    merged[name] = {**merged[name], **settings}
                else:
                    merged[name] = settings
            tasks = merged
        out["tasks"] = tasks
    return out


def read_layers(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The YAML at `path` merged onto its `base` chain (each base's path relative to the file naming it)."""
    real = path.resolve()
    if real in seen:
        raise UsageError(f"{path}: base chain loops back to {path}")
    if len(seen) >= MAX_BASES:
        raise UsageError(f"{path}: more than {MAX_BASES} bases in one chain")
    data = normalise(load_yaml(path), str(path))
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise UsageError(f"{path}: base must be the path of another training YAML, got {base!r}")
    return merge(read_layers(path.parent / base, (*seen, real)), data)


def apply_settings(data: dict, settings: dict[str, Any]) -> dict:
    """--set KEY=VALUE on the merged mapping: a dotted KEY sets one nested key, null removes it."""
    out = dict(data)
    for raw, value in settings.items():
        path = [p.replace("-", "_") for p in str(raw).split(".")]
        if path[0] == "base":
            raise UsageError("--set base=...: base names a file's base; give --config that file instead")
        if len(path) == 1:
            out[path[0]] = value
            continue
        node = out
        for depth, key in enumerate(path[:-1]):
            child = node.get(key)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise UsageError(f"--set {raw}: {'.'.join(path[: depth + 1])} is not a mapping")
            node[key] = child = dict(child)  # copies: the base mappings stay as loaded
            node = child
        if value is None:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return out


def from_dict(data: dict[str, Any], source: str = "train config") -> TrainConfig:
    """A merged mapping (flat or with `tasks`) -> TrainConfig; unknown keys and wrong types are UsageErrors."""
    data = normalise(data, source)
    flat = sorted(k for k in data if k in FLAT_KEYS)
    if flat:
        if "tasks" in data:
            raise UsageError(f"{source}: the flat task keys ({', '.join(flat)}) and tasks: in one config; "
                             f"write them under tasks (e.g. {flat[0]} -> tasks.{'.'.join(FLAT_KEYS[flat[0]])})")
        data = from_flat(data)
    for key, old in LEGACY_BUNDLED.items():
        if data.get(key) == old:
            data[key] = BUNDLED
    tasks = make_tasks(data.pop("tasks", {}) or {}, source)
    return dataclasses.replace(from_mapping(TrainConfig, data, source), tasks=tasks)


def resolve_config(path: str | Path | None, settings: dict[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig that `path` (with its bases) and `settings` give, before any value checks."""
    data = read_layers(Path(path)) if path else {}
    source = str(path or "train config") + (" with --set" if settings else "")
    return from_dict(apply_settings(data, settings or {}), source)


def load_train_config(path: str | Path | None, overrides: dict[str, Any],
                      settings: dict[str, Any] | None = None) -> TrainConfig:
    """The YAML at `path` (with its bases) with `settings` (any keys, checked like the YAML's) applied, then
    `overrides` (the CLI's own options; None means not given); every value checked."""
    cfg = resolve_config(path, settings)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if overrides.get("steps") is not None or "steps" in (settings or {}):  # an explicit step count: no time fitting
        cfg = dataclasses.replace(cfg, max_minutes=None)
    return check_config(cfg)


def check_config(cfg: TrainConfig) -> TrainConfig:
    for p in cfg.policies:
        if p not in POLICY_NAMES:
            raise UsageError(f"train config: unknown policy {p!r} in policies; choose from: {', '.join(POLICY_NAMES)}")
    check_model_keys(cfg.model)
    for name, low in (("seq_len", 2), ("batch_size", 1), ("steps", 0), ("warmup_steps", 0), ("val_every", 1),
                      ("val_batches", 1), ("checkpoint_every", 1), ("sink_tokens", 0), ("compress_rate", 1)):
        if getattr(cfg, name) < low:
            raise UsageError(f"train config: {name} must be >= {low}, got {getattr(cfg, name)}")
    for name in ("segment_sizes", "memory_sizes"):
        sizes = getattr(cfg, name)
        if not sizes or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
            raise UsageError(f"train config: {name} must be a non-empty list of integers >= 1, got {sizes}")
    weights = list(cfg.policies.values())
    if not weights or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights) \
            or not sum(weights) > 0:
        raise UsageError(f"train config: policies must map policy names to weights >= 0, not all 0; got {cfg.policies}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UsageError(f"train config: val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.device not in DEVICES:
        raise UsageError(f"train config: device must be one of {', '.join(DEVICES)}, got {cfg.device!r}")
    if not cfg.smear_lr_scale > 0:
        raise UsageError(f"train config: smear_lr_scale must be > 0, got {cfg.smear_lr_scale}")
    check_tasks(cfg.tasks, cfg)
    init = cfg.init_path()
    if init is not None and not (init / "config.json").is_file():
        raise UsageError(f"train config: init_from {cfg.init_from}: not a saved model folder (no config.json)")
    return cfg


def check_model_keys(model: dict[str, Any]) -> None:
    """`model:` keys: SegLMConfig's own fields with values of their types, and a config they can build
    (SegLMConfig itself would keep an unknown key as a stray attribute and build the default model)."""
    from huggingface_hub.errors import StrictDataclassError

    from ..models.seglm import SegLMConfig

    own = SegLMConfig.__annotations__  # name -> type (as a string)
    keys = dataclasses.make_dataclass("ModelKeys", [(k, t, field(default=None)) for k, t in own.items()])
    from_mapping(keys, model, "train config: model")  # unknown keys (naming the valid ones) and wrong types
    try:
        SegLMConfig(**model)
    except (TypeError, ValueError, StrictDataclassError) as e:
        raise UsageError(f"train config: bad model settings ({str(e).strip().splitlines()[-1].strip()})") from None
